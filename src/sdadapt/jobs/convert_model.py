"""Whole Stable Diffusion checkpoints from one format to the other: ``convert IN -o OUT --to diffusers|ldm``.

What kohya's ``tools/convert_diffusers20_original_sd.py`` and diffusers'
``convert_original_stable_diffusion_to_diffusers.py`` / ``convert_diffusers_to_original_stable_diffusion.py``
do, for SD1, SD2 (v-prediction too) and SDXL:

* an LDM single file (``.safetensors``, or a legacy ``.ckpt`` read with ``weights_only``) or a
  diffusers folder is loaded (:meth:`sdadapt.diffusers_system.DiffusersSystem.from_checkpoint` /
  :meth:`~sdadapt.diffusers_system.DiffusersSystem.from_folder`) and written with
  :meth:`~sdadapt.diffusers_system.DiffusersSystem.save_model` — a diffusers folder (``--to
  diffusers``) or one LDM ``.safetensors`` (``--to ldm``), atomically;
* ``dtype=None`` (``--dtype keep``) writes every tensor in the dtype the input holds it in (an LDM
  file's tensors are loaded as they are, a folder's components in their files' dtype; what is not
  — a mixed-dtype component, a baked VAE — is cast back tensor by tensor); a dtype casts all;
* the written model is pruned as kohya's and A1111's prune: only the UNet, text encoder(s) and
  VAE — EMA copies, optimizer state, ``global_step`` and the LDM schedule buffers are left out;
* ``ema=True``: an LDM file's CompVis ``LitEma`` copy (``model_ema.<UNet key without "model." and
  without dots>``) becomes the UNet (diffusers' ``extract_ema=True``), every UNet tensor from it or
  an error (never mixed); a diffusers folder's ``unet_ema/`` likewise;
* ``vae``: a VAE file or folder baked in (:func:`sdadapt.external_vae.replace_vae`);
* the output is written beside ``OUT`` first and read back there through its consumers' loader
  (diffusers/transformers ``from_pretrained`` for a folder, the single-file reader for a file), compared with
  what was written, tensor by tensor (float64; 0 for keep), and only then renamed into place: a failed check
  leaves ``OUT`` as it was.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError, OutputError, OutputExistsError, SdadaptError, WeightFileError
from ..formats.files import raise_naming_output

__all__ = ["CHECKPOINT_TARGETS", "ModelConversion", "convert_model", "is_model_folder", "recover_interrupted"]

#: ``convert --to`` targets for whole checkpoints
CHECKPOINT_TARGETS = ("diffusers", "ldm")
_SAVE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
#: dtypes every CPU op and loader handles (an fp8 file's tensors are compared in float64 and read back in float32)
_COMMON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: LDM prefixes of each part a whole SD checkpoint has (SD1/SD2 text encoder, SDXL's two)
_LDM_PARTS = {"UNet": ("model.diffusion_model.",), "VAE": ("first_stage_model.",),
              "text encoder": ("cond_stage_model.", "conditioner.embedders.")}
_EMA_PREFIX = "model_ema."
_EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")


@dataclass
class ModelConversion:
    """What :func:`convert_model` wrote.

    Attributes:
        path: the written folder or file.
        target: ``"diffusers"`` (a folder) or ``"ldm"`` (one ``.safetensors``).
        source_format: ``"ldm"`` (a single file) or ``"diffusers"`` (a folder).
        base_model: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"``.
        tensors: ``{component: tensors written}``.
        dtypes: ``{dtype name: tensors written in it}``.
        size_in, size_out: bytes of the input and the output (a folder: all its files).
        ema: ``"used"`` (the EMA weights are the UNet), ``"dropped"`` (the input had them) or ``"none"``.
        ema_tensors: the input's EMA tensors (without ``decay``/``num_updates``).
        dropped: other input entries left out (schedule buffers, ``global_step``, CLIP ``position_ids`` ...).
        max_delta: largest |Δ| between what was loaded (after ``vae``) and the output read back (float64;
            NaN where both hold NaN at the same place counts as equal: ``nan`` says a NaN appeared or
            vanished, ``inf`` that an infinity did or integer tensors differ).
        notes: what else to know (the VAE baked in, an assumed prediction type ...).
        unclip: ``"h"`` / ``"l"`` for an SD 2.1 unCLIP model (its image embedder: :mod:`sdadapt.unclip`), else ``None``.
    """

    path: Path
    target: str
    source_format: str
    base_model: str
    tensors: dict[str, int]
    dtypes: dict[str, int]
    size_in: int
    size_out: int
    ema: str
    ema_tensors: int
    dropped: list[str] = field(default_factory=list)
    max_delta: float = 0.0
    notes: list[str] = field(default_factory=list)
    unclip: str | None = None


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (holds ``model_index.json``)."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------- output checks
def _check_output(out: Path, *, to: str, overwrite: bool, source: Path, vae: Path | None = None) -> None:
    from ..formats.files import check_output_file

    if to == "ldm":
        if out.suffix.lower() != ".safetensors":
            raise InputError(f"{out}: --to ldm writes one .safetensors file; name OUT *.safetensors (or --to diffusers "
                             "for a diffusers folder)")
        check_output_file(out, overwrite=overwrite)
    else:
        if out.suffix:
            raise InputError(f"{out}: --to diffusers writes a folder; give OUT without a suffix (e.g. "
                             f"{out.with_suffix('')}), or --to ldm for one .safetensors file")
        if os.path.lexists(out) and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; --to diffusers writes a folder: write elsewhere")
        if out.is_dir() and any(out.iterdir()):  # (an empty folder is written into)
            if not overwrite:
                raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
            if not is_model_folder(out):
                raise OutputError(f"{out}: is a folder that is not a diffusers model (no model_index.json); "
                                  "--overwrite replaces only a model folder: write elsewhere")
    if os.path.lexists(out) and source.exists() and os.path.samefile(out, source):
        raise InputError(f"{out}: is also the input; write the output elsewhere")
    if out.is_dir():  # replacing it removes what it holds: never an input of this conversion
        for what, path in (("the input", source), ("the --vae", vae)):
            if path is not None and path.resolve().is_relative_to(out.resolve()):
                raise InputError(f"{out}: holds {what} {path}, which replacing the folder would delete; write the "
                                 "output elsewhere")


def _staging_name(out: Path, pid: int | str, part: str) -> Path:
    """The temporary beside ``out`` that :func:`_write_checked` writes and :func:`_move_into_place` renames (``part``: ``new`` or ``old``)."""
    if out.suffix:
        return out.with_name(f".{out.stem.replace('.', '_')}-{pid}-{part}.safetensors")
    return out.with_name(f".{out.name.replace('.', '_')}-{pid}-{part}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or unknowable): leave its files alone
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_interrupted(out: Path) -> list[str]:
    """Tidy what a killed ``convert`` left beside ``out`` (``.OUT-<pid>-new`` / ``.OUT-<pid>-old``).

    :func:`_move_into_place` replaces a folder with two renames (``OUT -> .OUT-pid-old``, ``.OUT-pid-new -> OUT``);
    a process killed between them leaves no ``OUT`` and the previous model as ``.OUT-pid-old``, the only
    good copy. Leftovers of processes still running are not touched. Then:

    * ``OUT`` missing and one ``-old`` left: it is renamed back to ``OUT`` (the state before the
      interrupted run; the usual ``--overwrite`` rules then apply to it);
    * ``OUT`` missing and several ``-old`` left: refused, naming them (which one is wanted is the
      user's call);
    * ``OUT`` present: a ``-old`` is the copy the interrupted run had already replaced: removed;
    * ``-new`` (a write that never became ``OUT``): removed.

    Returns:
        one line per action, for the log.

    Raises:
        OutputError: several previous copies and no ``OUT``.
    """
    prefix = f".{(out.stem if out.suffix else out.name).replace('.', '_')}-"
    found: dict[str, list[tuple[Path, int]]] = {"new": [], "old": []}
    if out.parent.is_dir():
        for path in out.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            pid_text, _, part = path.name[len(prefix):].removesuffix(".safetensors").partition("-")
            if part in found and (part == "new" or not out.suffix) and pid_text.isdigit() \
                    and path == _staging_name(out, pid_text, part) and not _pid_alive(int(pid_text)):
                # (a file OUT is replaced by one rename: it never has an ``-old``)
                found[part].append((path, int(pid_text)))
    lines = []
    old = sorted(found["old"], key=lambda item: item[0].lstat().st_mtime)
    if not os.path.lexists(out) and len(old) > 1:
        raise OutputError(f"{out}: missing, and interrupted conversions left {len(old)} previous copies: "
                          f"{', '.join(str(p) for p, _ in old)}; rename the one you want to {out.name} (or remove them) "
                          "and run again")
    if not os.path.lexists(out) and old:
        path, pid = old.pop()
        os.replace(path, out)
        lines.append(f"{out}: restored from {path.name}, the previous copy an interrupted convert (pid {pid}) left")
    for path, pid in old:
        _remove(path)
        lines.append(f"removed {path.name}: the copy of {out.name} an interrupted convert (pid {pid}) had replaced")
    for path, pid in found["new"]:
        _remove(path)
        lines.append(f"removed {path.name}: an unfinished write of an interrupted convert (pid {pid})")
    return lines


def _write_checked(system, out: Path, *, to: str, modules: Mapping[str, nn.Module], dtype: torch.dtype | None,
                   metadata: dict[str, str], log: Callable[[str], None] | None) -> float:
    """``save_model`` to a temporary beside ``out`` (:func:`_staging_name`), read it back there (:func:`_read_back`,
    its prediction type checked), and only then put it in ``out``'s place — a file with one rename, a folder
    replacing an existing one with two (``OUT -> .OUT-pid-old``, ``.OUT-pid-new -> OUT``; :func:`recover_interrupted`
    mends a run killed between them). A failed write or check leaves ``out`` as it was (an existing one kept, a new
    one not made, nor the folders it would have made) and no temporary.

    Returns:
        the read-back's max |Δ|.
    """
    made = [folder for folder in out.parents if not folder.exists()]  # (deepest first: removed again on failure)
    fresh = _staging_name(out, os.getpid(), "new")
    try:
        system.save_model(fresh, dtype=dtype, metadata=metadata)
        if log is not None:
            log(f"reading {out} back")
        try:
            delta, prediction = _read_back(fresh, to, modules, dtype=dtype)
        except SdadaptError as exc:
            raise_naming_output(exc, fresh, out)
        if prediction != system.prediction_type:
            raise WeightFileError(f"{out}: read back, it predicts {prediction}, not {system.prediction_type}")
        _move_into_place(fresh, out)
    except BaseException:
        if os.path.lexists(fresh):
            _remove(fresh)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break  # (not empty: something else is in it now)
        raise
    return delta


def _move_into_place(fresh: Path, out: Path) -> None:
    """``fresh`` (a checked file or folder beside ``out``) becomes ``out``, replacing an existing one."""
    if out.suffix or not os.path.lexists(out):  # a file, or a new folder: one rename
        os.replace(fresh, out)
        return
    old = _staging_name(out, os.getpid(), "old")
    os.replace(out, old)
    try:
        os.replace(fresh, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_symlink():  # OUT was a link to a model folder: the link is replaced, the folder it named kept
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading
def _ema_state(state: Mapping[str, Tensor], file: Path) -> dict[str, Tensor]:
    """The LDM state with every ``model.diffusion_model.*`` tensor taken from its ``model_ema.*`` copy."""
    from ..formats.model_keys import ema_key

    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    names = {k: ema_key(k) for k in unet}  # CompVis LitEma naming
    missing = [k for k, name in names.items() if name not in state]
    if missing:
        raise WeightFileError(f"{file}: --ema: the EMA copy lacks {len(missing)} of the {len(unet)} UNet tensors (e.g. "
                              f"{names[missing[0]]} for {missing[0]}); convert without --ema (the raw weights)")
    for key, name in names.items():
        if tuple(state[name].shape) != tuple(state[key].shape):
            raise WeightFileError(f"{file}: --ema: {name} has shape {tuple(state[name].shape)}, the UNet's {key} "
                                  f"{tuple(state[key].shape)}; convert without --ema")
    return {k: (state[names[k]] if k in names else v) for k, v in state.items() if not k.startswith(_EMA_PREFIX)}


def _check_whole(state: Mapping[str, Tensor], file: Path) -> None:
    """Refuse a partial checkpoint (a UNet or VAE alone) and another architecture's (SD3, Flux ...) UNet."""
    from ..formats.key_source import KeyMapError
    from ..formats.model_keys import key_plan

    present = [part for part, prefixes in _LDM_PARTS.items() if any(k.startswith(prefixes) for k in state)]
    missing = [part for part in _LDM_PARTS if part not in present]
    if missing and present:
        raise WeightFileError(
            f"{file}: a partial checkpoint: it holds a {' and a '.join(present)} but no {' or '.join(missing)}; "
            "convert writes whole SD1/SD2/SDXL models (UNet, text encoder(s), VAE). A VAE alone bakes into a model "
            "with --vae; a UNet alone needs its base checkpoint (merge it in first)")
    try:
        _, report = key_plan({k: tuple(v.shape) for k, v in state.items()}, to="diffusers")
    except KeyMapError as exc:
        raise WeightFileError(f"{file}: {exc}") from None
    foreign = [k for k in report.unmatched if k.startswith("model.diffusion_model.")]
    if foreign:
        raise WeightFileError(
            f"{file}: not an SD1/SD2/SDXL checkpoint: {len(foreign)} UNet tensor(s) match no SD UNet layer (e.g. "
            f"{foreign[0]}); convert handles Stable Diffusion 1.x, 2.x and XL only (SD3, Flux and others have "
            "other layers)")


def _load_file(file: Path, *, ema: bool, prediction_type: str | None, clip_stats: str | os.PathLike | None = None):
    """-> (system, {component: {module key: dtype}}, ema tensors, dropped keys, notes)."""
    from ..diffusers_system import DiffusersSystem
    from ..formats.files import read_weights
    from ..formats.model_keys import split_components
    from ..formats.single_file import split_single_file, unwrap_state_dict

    raw, metadata = read_weights(file)
    if metadata.get("format") == "sdadapt-toy/1":
        raise InputError(f"{file}: sdadapt's toy model, not a Stable Diffusion checkpoint: it has no LDM or diffusers "
                         "form to convert to")
    state = unwrap_state_dict(raw)
    extras = sorted(set(raw) - {f"state_dict.{k}" for k in state} - set(state))
    if any(k.startswith("state_dict.") for k in raw):  # a .ckpt: global_step, optimizer state ... (non-tensors: metadata)
        extras += sorted(k for k in metadata if not k.startswith(("modelspec.", "sdadapt.")))
    _check_whole(state, file)
    ema_keys = [k for k in state if k.startswith(_EMA_PREFIX) and k not in _EMA_SCALARS]
    if ema and not ema_keys:
        raise InputError(f"{file}: --ema: the file has no EMA weights (model_ema.* tensors); leave --ema out")
    model = _ema_state(state, file) if ema else {k: v for k, v in state.items() if not k.startswith(_EMA_PREFIX)}
    checkpoint = split_single_file(model, metadata=metadata, path=file)
    # the file's own tensors, each in its dtype (no float32 copy beside them: an SDXL fp16 file would need
    # ~3x its size in memory); --dtype casts them when writing
    system = DiffusersSystem.from_checkpoint(checkpoint, prediction_type=prediction_type, keep_dtypes=True,
                                             clip_stats=clip_stats)
    notes = []
    if checkpoint.unclip is not None:  # (SD 2.1 unCLIP: sdadapt.formats.unclip)
        if clip_stats is not None:
            normaliser = f"from {clip_stats}"
        elif checkpoint.unclip.needs_clip_stats:
            normaliser = "missing (karlo's ViT-L-14_stats.th: --clip-stats)"
        else:
            normaliser = "identity (LDM's, no clip_stats_path)"
        notes.append(f"SD 2.1 unCLIP-{checkpoint.unclip.variant.upper()} file: v-prediction (its LDM config's), image "
                     f"encoder from embedder.model.visual.*, normaliser {normaliser}")
    elif checkpoint.markers:  # (v_pred / ztsnr: sdadapt.formats.prediction_markers)
        from ..formats.prediction_markers import markers_said

        notes.append(f"{markers_said(checkpoint.markers)} markers (a folder's scheduler config says them, an LDM file "
                     "its markers)" + (f"; --prediction-type {prediction_type} given" if prediction_type is not None
                                       else ""))
    elif prediction_type is None and checkpoint.sidecar_prediction_type is not None:
        notes.append(f"{checkpoint.sidecar_prediction_type} from {checkpoint.sidecar_config.name} beside it (A1111's "
                     "model config)")
    elif prediction_type is None and checkpoint.architecture == "sd2" and not any(
            key in metadata for key in ("modelspec.prediction_type", "modelspec.predict_key")):
        notes.append("SD2 file without prediction metadata: written as "
                     + ("v-prediction (a 768-v model by ComfyUI's weight test; --prediction-type epsilon if it is not)"
                        if checkpoint.sd2_v_by_weights else
                        "epsilon (ComfyUI's weight test says no 768-v model; --prediction-type v_prediction if it is)"))
    modules = system.components()
    flat = {f"{c}.{k}": v.dtype for c, part in checkpoint.components.items() for k, v in part.items()}
    dtypes = split_components(flat, expected={c: m.state_dict().keys() for c, m in modules.items()})
    return system, dtypes, len(ema_keys), sorted(checkpoint.dropped) + extras, notes


def _header_dtypes(folder: Path) -> dict[str, torch.dtype] | None:
    """``{key: dtype}`` of a diffusers component folder's weights (its plain or sharded ``.safetensors``,
    not a ``.fp16`` variant); ``None`` without any."""
    from ..formats.files import read_safetensors_header
    from ..formats.header import TORCH_DTYPES

    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    if not files:
        return None
    found: dict[str, torch.dtype] = {}
    for path in files:
        header, _ = read_safetensors_header(path)
        found.update({k: TORCH_DTYPES[str(v["dtype"])] for k, v in header.items() if str(v["dtype"]) in TORCH_DTYPES})
    return found


def _load_folder(folder: Path, *, ema: bool, prediction_type: str | None, clip_stats: str | os.PathLike | None = None):
    from ..diffusers_system import DiffusersSystem
    from ..formats.model_keys import split_components

    stored = {}  # the UNet and VAE in the dtype their files hold (diffusers loads float32: 2x an fp16 SDXL UNet)
    for component in ("unet", "vae"):
        kinds = set((_header_dtypes(folder / component) or {}).values())
        if len(kinds) == 1 and kinds <= set(_COMMON_DTYPES):
            stored[component] = kinds.pop()
    system = DiffusersSystem.from_folder(folder, prediction_type=prediction_type, torch_dtypes=stored, clip_stats=clip_stats)
    modules = system.components()
    ema_folder = folder / "unet_ema"
    ema_tensors = 0
    notes: list[str] = []
    dropped: list[str] = []
    if ema_folder.is_dir():
        ema_tensors = len(_header_dtypes(ema_folder) or {})
    if ema:
        if not ema_folder.is_dir():
            raise InputError(f"{folder}: --ema: the folder has no unet_ema/ (EMA weights); leave --ema out")
        from diffusers import UNet2DConditionModel

        averaged = UNet2DConditionModel.from_pretrained(ema_folder).state_dict()
        try:
            system.unet.load_state_dict(averaged, strict=True, assign=True)  # (its own dtype: cast below)
        except RuntimeError as exc:
            raise WeightFileError(f"{ema_folder}: --ema: the EMA UNet does not fit the model's UNet "
                                  f"({str(exc).splitlines()[0]}); convert without --ema") from None
    dtypes: dict[str, dict[str, torch.dtype]] = {}
    for component, module in modules.items():
        found = _header_dtypes(ema_folder if ema and component == "unet" else folder / component)
        if found is None:
            notes.append(f"{component}: no .safetensors weights to read dtypes from: written as loaded")
            continue
        dtypes.update(split_components({f"{component}.{k}": v for k, v in found.items()},
                                       expected={component: module.state_dict().keys()}))
    return system, dtypes, ema_tensors, dropped, notes


def _cast_like(module: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Each floating parameter and buffer of ``module`` in the dtype ``dtypes`` names for it (in place)."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        want = dtypes.get(name)
        if want is not None and want.is_floating_point and tensor.is_floating_point() and tensor.dtype != want:
            tensor.data = tensor.data.to(want)


def _max_delta(written: Mapping[str, Tensor], read: Mapping[str, Tensor], *, name: str, path: Path) -> float:
    """Largest |a - b| (float64) over two state dicts of one component; they must hold the same keys
    (CLIP ``position_ids``, which files leave out, aside)."""
    a = {k: v for k, v in written.items() if not k.endswith("position_ids")}
    b = {k: v for k, v in read.items() if not k.endswith("position_ids")}
    if set(a) != set(b):
        extra = sorted(set(a) ^ set(b))
        raise WeightFileError(f"{path}: read back, the {name} has other tensors than were written "
                              f"({', '.join(extra[:3])}); the output is not what was meant")
    worst = 0.0
    for key, tensor in a.items():
        other = b[key]
        if tensor.shape != other.shape:
            raise WeightFileError(f"{path}: read back, {name} {key} has shape {tuple(other.shape)}, written "
                                  f"{tuple(tensor.shape)}")
        if tensor.numel() == 0 or (tensor.dtype == other.dtype and (
                _same_bytes(tensor, other) or (tensor.dtype in _COMMON_DTYPES and torch.equal(tensor, other)))):
            continue  # (the same bytes, or equal values (±0): |Δ| 0 without the float64 copies)
        if not tensor.is_floating_point():
            if not torch.equal(tensor, other):
                worst = _worse(worst, float("inf"))
            continue
        worst = _worse(worst, _tensor_delta(tensor, other))
    return worst


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` (same dtype and shape) hold the same bytes, compared as the widest integers their
    size allows (an fp16 ``torch.equal`` compares element by element, ~20x slower on a CPU). The same bytes
    are the same values, NaN at the same places included (``_tensor_delta``'s 0); ``False`` also where
    the tensors cannot be viewed so (not contiguous, another device): the caller compares values then."""
    if a.device != b.device or not (a.is_contiguous() and b.is_contiguous()):
        return False
    size = a.numel() * a.element_size()
    for wide in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if size % wide.itemsize == 0:
            try:
                return torch.equal(a.reshape(-1).view(wide), b.reshape(-1).view(wide))
            except RuntimeError:  # (a storage offset not aligned to the wider type)
                continue
    return False


def _tensor_delta(written: Tensor, read: Tensor) -> float:
    """Largest |a - b| (float64) of two same-shaped floating tensors, NaN and inf told honestly: a
    NaN at the same place in both, or the same infinity, is equal; a NaN that appears or vanishes is
    NaN, an infinity against anything else inf (Python's ``max`` would skip a NaN)."""
    x, y = written.double(), read.double()
    same = (x == y) | (x.isnan() & y.isnan())  # (equal infinities compare equal; their difference would be NaN)
    if bool(same.all()):
        return 0.0
    x, y = x[~same], y[~same]
    if bool((x.isnan() | y.isnan()).any()):
        return float("nan")
    return float((x - y).abs().max())  # (inf where an infinity meets a finite value or the other infinity)


def _worse(a: float, b: float) -> float:
    """The worse of two |Δ|: NaN over everything, then the larger."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def _read_back(target: Path, to: str, modules: Mapping[str, nn.Module], *, dtype: torch.dtype | None) -> tuple[float, str]:
    """Read the output as its consumers do, one component at a time (a folder: diffusers/transformers
    ``from_pretrained``, asked for the dtype the component was written in when it is one, as a user
    loading an fp16 model does — not a float32 copy of an SDXL UNet; a file: the single-file reader
    and key map) and compare it with ``modules`` (``dtype``: what the written tensors were cast to).

    Returns:
        ``(max |Δ|, the prediction type it declares)``.
    """
    worst = 0.0
    if to == "diffusers":
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection, "image_encoder": CLIPVisionModelWithProjection}
        for name, module in modules.items():
            kinds = {dtype or v.dtype for v in module.state_dict().values() if v.is_floating_point()}
            options = {"torch_dtype": kinds.pop()} if kinds <= set(_COMMON_DTYPES) and len(kinds) == 1 and name in (
                "unet", "vae") else {}
            state = classes[name].from_pretrained(target / name, **options).state_dict()
            worst = _worse(worst, _max_delta(module.state_dict(), state, name=name, path=target))
            del state
        config = json.loads((target / "scheduler" / "scheduler_config.json").read_text())
        prediction = config.get("prediction_type", "epsilon")
    else:
        from safetensors import safe_open

        from ..formats.files import read_safetensors_header
        from ..formats.model_keys import split_components
        from ..formats.single_file import split_single_file

        # As A1111, ComfyUI and diffusers' from_single_file read a file: safetensors' memory map (the header
        # validated first). Its pages are the page cache's, which the kernel can drop under pressure, so the read-back
        # adds no second anonymous copy of the model (sdadapt's own reader allocates every tensor).
        _, metadata = read_safetensors_header(target)
        with safe_open(target, framework="pt") as mapped:
            tensors = {key: mapped.get_tensor(key) for key in mapped.keys()}  # noqa: SIM118 (safe_open is no dict)
        checkpoint = split_single_file(tensors, metadata=metadata, path=target)
        del tensors
        flat = {f"{c}.{k}": v for c, part in checkpoint.components.items() for k, v in part.items()}
        states = split_components(flat, expected={c: m.state_dict().keys() for c, m in modules.items()})
        for name, module in modules.items():
            worst = _worse(worst, _max_delta(module.state_dict(), states.get(name, {}), name=name, path=target))
        prediction = checkpoint.prediction_type
    return worst, prediction


# ------------------------------------------------------------------------------------------- the job
def convert_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    vae: str | os.PathLike | None = None,
    ema: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    clip_stats: str | os.PathLike | None = None,
) -> ModelConversion:
    """Write the SD1/SD2/SDXL model at ``source`` as a diffusers folder or an LDM single file.

    Args:
        source: an LDM single file (``.safetensors``/``.ckpt``) or a diffusers pipeline folder.
        out: the folder (``to="diffusers"``, no suffix) or ``.safetensors`` file (``to="ldm"``).
        to: ``"diffusers"`` or ``"ldm"`` (the same format as the input works too: prune, cast, bake a VAE).
        dtype: ``torch.float32``/``float16``/``bfloat16`` for every floating tensor; ``None``: each
            tensor's dtype in the input.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; default: the input's (an LDM file's
            ModelSpec metadata, else epsilon; a folder's scheduler config).
        vae: a VAE file/folder to bake in (kohya's ``--vae``; :mod:`sdadapt.external_vae`).
        ema: write the input's EMA UNet (LDM ``model_ema.*``, a folder's ``unet_ema/``) instead of
            the raw one.
        overwrite: replace an existing ``out`` (a folder only when it is a diffusers model; an empty
            folder is written into without it).
        log: hears progress lines.
        clip_stats: an SD 2.1 unCLIP-L model's CLIP-embedding mean/std (karlo's ``ViT-L-14_stats.th``, diffusers'
            ``clip_stats_path``): needed to write an unCLIP-L file as a diffusers folder (its ``image_normalizer/``);
            unCLIP-H's is identity (:mod:`sdadapt.unclip`).

    Returns:
        :class:`ModelConversion`.

    Raises:
        InputError: a contradictory request (``out``'s form vs ``to``, ``--ema`` without EMA weights).
        WeightFileError: not a whole SD1/SD2/SDXL checkpoint (a partial one, another architecture).
        OutputExistsError: ``out`` exists and not ``overwrite``.
    """
    if to not in CHECKPOINT_TARGETS:
        raise InputError(f"to must be one of {CHECKPOINT_TARGETS}, got {to!r}")
    if dtype not in _SAVE_DTYPES:
        raise InputError(f"dtype must be float32, float16 or bfloat16 (or None: keep), got {dtype}")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise InputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    src, target = Path(source), Path(out)
    recovered = recover_interrupted(target)  # (before the checks: a restored OUT is an existing OUT)
    for line in recovered:
        if log is not None:
            log(line)
    folder_input = is_model_folder(src)
    if src.is_dir() and not folder_input:
        raise InputError(f"{src}: a folder without model_index.json is not a diffusers Stable Diffusion model; give "
                         "an LDM .safetensors/.ckpt file or a diffusers pipeline folder")
    _check_output(target, to=to, overwrite=overwrite, source=src, vae=Path(vae) if vae is not None else None)
    if vae is not None:
        from ..formats.vae_file import vae_weights_file

        vae_weights_file(vae)  # a missing --vae is refused before the model loads
    if log is not None:
        log(f"reading {src}")
    if folder_input:
        system, dtypes, ema_tensors, dropped, notes = _load_folder(src, ema=ema, prediction_type=prediction_type,
                                                                   clip_stats=clip_stats)
    else:
        system, dtypes, ema_tensors, dropped, notes = _load_file(src, ema=ema, prediction_type=prediction_type,
                                                                 clip_stats=clip_stats)
    notes[:0] = recovered
    if vae is not None:
        from ..external_vae import replace_vae

        system.vae.float()  # replace_vae reads the new VAE in the old one's dtype: float32 loses nothing
        replace_vae(system, vae)
        notes.append(f"VAE from {vae} baked in")
    modules = system.components()
    if dtype is None:
        for name, module in modules.items():
            _cast_like(module, dtypes.get(name, {}))
    metadata = {}
    if not folder_input:
        from ..formats.files import read_safetensors_header, sniff_format

        if sniff_format(src) == "safetensors":
            kept = read_safetensors_header(src)[1]
            metadata = {k: v for k, v in kept.items() if k in ("modelspec.author", "modelspec.description",
                                                               "modelspec.license", "modelspec.tags")}
    metadata["modelspec.title"] = target.stem
    if log is not None:
        log(f"writing {target}")
    delta = _write_checked(system, target, to=to, modules=modules, dtype=dtype, metadata=metadata, log=log)
    written_dtypes: dict[str, int] = {}
    counts = {}
    for name, module in modules.items():
        state = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        counts[name] = len(state)
        for value in state.values():
            kind = str(dtype if dtype is not None and value.is_floating_point() else value.dtype).removeprefix("torch.")
            written_dtypes[kind] = written_dtypes.get(kind, 0) + 1
    return ModelConversion(
        path=target, target=to, source_format="diffusers" if folder_input else "ldm", base_model=system.base_model,
        tensors=counts, dtypes=written_dtypes, size_in=_size(src), size_out=_size(target),
        ema="used" if ema else ("dropped" if ema_tensors else "none"), ema_tensors=ema_tensors, dropped=dropped,
        max_delta=delta, notes=notes, unclip=system.unclip.variant if system.unclip is not None else None)
