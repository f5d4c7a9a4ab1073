"""A VAE given on its own (kohya's ``--vae``): read it from any layout as diffusers-named tensors.

| what ``path`` is | how it is read |
|---|---|
| an LDM VAE file (``encoder.down.0…``, ``quant_conv.*``; with or without ``first_stage_model.``, or ``vae.`` as diffusers' ``single_file_utils`` allows: its ``vae.*`` part) | the one LDM -> diffusers key map (:mod:`.model_keys`, :mod:`.vae_keys`) |
| a full SD1/SD2/SDXL checkpoint (``model.diffusion_model.*`` …) | its ``first_stage_model.*`` part, as kohya allows |
| a diffusers ``AutoencoderKL`` file (``encoder.down_blocks.0…``, optionally ``vae.``-prefixed: of a whole-model file, its ``vae.*`` part) | as it is (old diffusers attention names ``query``/``key``/``value``/``proj_attn`` renamed) |
| a diffusers folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``/``.bin``), or a model folder holding ``vae/`` | the weights file; ``config.json`` is checked against the model's VAE |

``.safetensors`` files are read with safetensors, ``.ckpt``/``.pt``/``.bin`` only with
``torch.load(weights_only=True)`` after the pickle scan (:func:`sdadapt.formats.files.read_weights`).
Nothing here imports diffusers: :func:`read_vae_weights` returns tensors checked against the
shapes of the VAE they will replace (``expected``), and :func:`sdadapt.external_vae.load_vae`
builds the module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..errors import WeightFileError
from .files import (
    check_finite,
    read_safetensors_header,
    read_safetensors_tensors,
    read_weights,
    sniff_format,
)
from .key_source import KeyMapError, KeyReport, fit_report, name_keys
from .model_keys import checkpoint_architecture, convert_checkpoint
from .single_file import file_hashes, unwrap_state_dict

__all__ = ["LATENT_FAMILIES", "VaeWeights", "read_vae_weights", "vae_identity", "vae_weights_file"]

#: which architectures share one latent space (SD1 and SD2 use the same VAE; SDXL's is another)
LATENT_FAMILIES = {"sd1": "SD1/SD2", "sd2": "SD1/SD2", "sdxl": "SDXL"}
_LDM_VAE_PREFIX = "first_stage_model."
#: pre-0.14 diffusers spelling of the mid-block attention (e.g. older sdxl-vae-fp16-fix uploads)
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
#: LDM training leftovers in some VAE files (the GAN discriminator and the loss's log-variance)
_TRAINING_ONLY = ("loss.", "model_ema.")
_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


@dataclass
class VaeWeights:
    """A VAE read by :func:`read_vae_weights`.

    Attributes:
        path: what was given (a file or a folder).
        weights_file: the file the tensors came from (a folder's ``diffusion_pytorch_model.*``).
        layout: ``"ldm"``, ``"checkpoint"`` (a full SD checkpoint's VAE), ``"diffusers"`` or
            ``"diffusers-folder"``.
        state: ``{diffusers AutoencoderKL key: tensor}`` (no prefix), the keys and shapes of ``expected``.
        config: a folder's ``config.json`` (``{}`` for files).
        architecture: ``"sd1"``/``"sd2"``/``"sdxl"`` when the source says (a full checkpoint), else ``None``.
        dropped: keys left out on purpose (training-only ``loss.*``, EMA copies, the checkpoint's other parts).
    """

    path: Path
    weights_file: Path
    layout: str
    state: dict[str, Tensor]
    config: dict = field(default_factory=dict)
    architecture: str | None = None
    dropped: list[str] = field(default_factory=list)


def vae_weights_file(path: str | os.PathLike) -> tuple[Path, dict]:
    """The weights file a VAE path names and its folder's ``config.json`` (``{}`` for a file).

    A folder: a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.*``)
    or a model folder holding one as ``vae/`` (kohya retries with ``subfolder="vae"`` too).

    Raises:
        WeightFileError: no such file or folder; a folder without VAE weights or with a damaged config.
    """
    given = Path(path)
    if given.is_file():
        return given, {}
    if not given.is_dir():
        raise WeightFileError(f"--vae {given}: no such file or folder (give an LDM/diffusers VAE .safetensors/.ckpt file, "
                              "a full SD checkpoint, or a diffusers AutoencoderKL folder)")
    folder = given / "vae" if not (given / "config.json").is_file() and (given / "vae").is_dir() else given
    weights = next((folder / name for name in _FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise WeightFileError(f"--vae {given}: not a diffusers VAE folder (no {' / '.join(_FOLDER_WEIGHTS[:2])} in {folder}); "
                              "give the folder AutoencoderKL.save_pretrained writes, or the VAE file itself")
    config: dict = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightFileError(f"--vae {folder / 'config.json'}: not readable JSON ({exc}); copy the folder again") from None
        if not isinstance(config, dict):
            raise WeightFileError(f"--vae {folder / 'config.json'}: not a JSON table; copy the folder again")
    return weights, config


def _read_source(file: Path) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """``(tensors, {key: shape} of the whole file)``; of a full safetensors checkpoint only the
    ``first_stage_model.*`` tensors are read (positioned reads, not gigabytes of UNet)."""
    try:
        if sniff_format(file) == "safetensors":
            header, _ = read_safetensors_header(file)
            shapes = {k: tuple(entry["shape"]) for k, entry in header.items()}
            if any(k.startswith("model.diffusion_model.") for k in shapes):
                return read_safetensors_tensors(file, [k for k in shapes if k.startswith(_LDM_VAE_PREFIX)]), shapes
        raw, _ = read_weights(file)
    except WeightFileError as exc:
        raise type(exc)(f"--vae: {exc}") from None
    raw = unwrap_state_dict(raw)
    return raw, {k: tuple(v.shape) for k, v in raw.items()}


def _layout(keys: list[str]) -> str:
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "vae.encoder.down_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.", _LDM_VAE_PREFIX, "vae.encoder.down.", "vae.decoder.up."))
           for k in keys):
        return "ldm"
    return "unknown"


def _from_ldm(file: Path, state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """LDM VAE keys (with the ``first_stage_model.`` prefix) -> diffusers keys fitted to ``expected``."""
    target = {f"vae.{k}": shape for k, shape in expected.items()}
    try:
        converted, report = convert_checkpoint(state, to="diffusers", strict=False, target_shapes=target)
    except KeyMapError as exc:
        raise WeightFileError(f"--vae {file}: {exc}") from None
    _raise_unless_fits(file, report)
    return {k.removeprefix("vae."): v for k, v in converted.items()}


def _check_fits(file: Path, state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    _raise_unless_fits(file, fit_report({k: tuple(v.shape) for k, v in state.items()}, expected))


def _raise_unless_fits(file: Path, report: KeyReport) -> None:
    if not report.ok:
        raise WeightFileError(f"--vae {file}: does not fit the model's VAE: {report.problems()}")


def _latent_channels(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    shape = shapes.get("decoder.conv_in.weight")  # (C, latent channels, 3, 3)
    return int(shape[1]) if shape is not None and len(shape) == 4 else None


def read_vae_weights(path: str | os.PathLike, *, expected: Mapping[str, tuple[int, ...]],
                     architecture: str | None = None) -> VaeWeights:
    """Read a VAE from any layout of the module table as the keys and shapes of ``expected``.

    Args:
        path: a VAE file, a full SD checkpoint, or a diffusers VAE folder.
        expected: ``{diffusers AutoencoderKL key: shape}`` of the VAE it replaces (its ``state_dict()``).
        architecture: the model's ``"sd1"``/``"sd2"``/``"sdxl"``: a full checkpoint of the other latent
            space (SDXL vs SD1/SD2) is refused.

    Raises:
        WeightFileError: missing, truncated, corrupt or unsafe file; no VAE in it; NaN/inf weights; a VAE of another
            latent space (other latent channels, an SDXL checkpoint for an SD1 model ...) or other
            shapes (the message names the file, what it holds and what the model expects).
    """
    given = Path(path)
    file, config = vae_weights_file(given)
    raw, shapes = _read_source(file)
    layout = _layout(list(shapes))
    dropped = [k for k in raw if k.startswith(_TRAINING_ONLY)]
    conv_in = next((tuple(v.shape) for k, v in raw.items() if k.endswith("decoder.conv_in.weight")
                    and not k.startswith(_TRAINING_ONLY)), None)  # (the same name in both layouts)
    want, have = _latent_channels(expected), _latent_channels({"decoder.conv_in.weight": conv_in} if conv_in else {})
    if want is not None and have is not None and want != have:
        raise WeightFileError(f"--vae {file}: a VAE for {have}-channel latents (another latent space, e.g. SD3/Flux's 16); "
                              f"this model's VAE makes {want}-channel latents (SD1/SD2/SDXL: 4)")
    found_arch = None
    if layout == "checkpoint":
        try:
            found_arch = checkpoint_architecture(shapes)
        except KeyMapError:
            found_arch = None
        vae_part = {k: v for k, v in raw.items() if k.startswith(_LDM_VAE_PREFIX)}
        if not vae_part:
            raise WeightFileError(f"--vae {file}: a Stable Diffusion checkpoint without a VAE (no first_stage_model.* keys); "
                                  "give a checkpoint with its VAE, or the VAE file itself")
        dropped += [k for k in shapes if not k.startswith(_LDM_VAE_PREFIX) and not k.startswith(_TRAINING_ONLY)]
        if architecture is not None and found_arch is not None and LATENT_FAMILIES[found_arch] != LATENT_FAMILIES[architecture]:
            raise WeightFileError(f"--vae {file}: the VAE of an {LATENT_FAMILIES[found_arch]} checkpoint, whose latents "
                                  f"this {LATENT_FAMILIES[architecture]} model was not trained on; give an "
                                  f"{LATENT_FAMILIES[architecture]} VAE")
        state = _from_ldm(file, vae_part, expected)
    elif layout == "ldm":
        kept = {k: v for k, v in raw.items() if not k.startswith(_TRAINING_ONLY)}
        if any(k.startswith("vae.") for k in kept):  # (diffusers' LDM_VAE_KEYS: a vae. prefix, its vae.* part read)
            dropped += [k for k in kept if not k.startswith("vae.")]
            kept = {k.removeprefix("vae."): v for k, v in kept.items() if k.startswith("vae.")}
        state = _from_ldm(file, {k if k.startswith(_LDM_VAE_PREFIX) else _LDM_VAE_PREFIX + k: v for k, v in kept.items()},
                          expected)
    elif layout == "diffusers":
        if any(k.startswith("vae.") for k in raw):  # a whole diffusers model in one file: its vae.* part
            dropped += [k for k in raw if not k.startswith("vae.")]
            raw = {k: v for k, v in raw.items() if k.startswith("vae.")}
        state = {}
        for key, tensor in raw.items():
            key = key.removeprefix("vae.")
            for old, new in _OLD_ATTENTION.items():
                key = key.replace(old, new) if ".attentions." in key else key
            state[key] = tensor
        for key, shape in expected.items():  # (C, C, 1, 1) 1x1-conv attention weights -> Linear (C, C)
            if key in state and tuple(state[key].shape) != tuple(shape) and state[key].numel() == math.prod(shape) \
                    and tuple(s for s in state[key].shape if s != 1) == tuple(s for s in shape if s != 1):
                state[key] = state[key].reshape(shape)
    else:
        raise WeightFileError(f"--vae {file}: no VAE weights found (keys such as {name_keys(list(raw), limit=3) or 'none'}); "
                              "give an LDM VAE (encoder.down.*, quant_conv.*), a diffusers AutoencoderKL file or folder, "
                              "or a full SD checkpoint")
    _check_fits(file, state, expected)
    check_finite(state, source=f"--vae {file}")
    return VaeWeights(given, file, "diffusers-folder" if given.is_dir() else layout, state, config, found_arch, dropped)


_IDENTITIES: dict[tuple[str, int, int], dict[str, str]] = {}


def vae_identity(path: str | os.PathLike) -> dict[str, str]:
    """What names a VAE in a run record and kohya's metadata: ``{"name", "path", "legacy", "sha256"}``.

    ``name``: the file's (or folder's) base name (kohya's ``ss_vae_name``); ``legacy`` / ``sha256``:
    kohya's ``ss_vae_hash`` / ``ss_new_vae_hash`` of the weights file
    (:func:`sdadapt.formats.single_file.file_hashes`; a folder: of its weights file). Hashed once per
    file state (path, size, modification time) in a process.

    Raises:
        WeightFileError: no such file or folder / no weights in the folder.
    """
    given = Path(path)
    file, _ = vae_weights_file(given)
    info = file.stat()
    key = (str(file.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = file_hashes(file)
    # kohya's os.path.basename(args.vae): the name given, not a link's target (a hub cache's blob hash)
    name = Path(os.path.abspath(given)).name
    return {"name": name, "path": str(given.resolve()), **_IDENTITIES[key]}
