"""Which model ``--model`` names: the toy, a toy-system file, a diffusers folder, a single-file checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_SUFFIXES", "checkpoint_by_name", "load_system", "resolve_device"]


def _is_toy_file(model: str) -> bool:
    from ..formats.files import read_safetensors_header, sniff_format

    path = Path(model)
    if not path.is_file() or sniff_format(path) != "safetensors":
        return False
    return read_safetensors_header(path)[1].get("format") == "sdadapt-toy/1"


def resolve_device(device: str | None) -> str:
    """``"auto"``/``None`` -> ``"cuda"`` when available, else ``"cpu"``; others checked.

    Raises:
        ValueError: a CUDA/MPS device on a machine without one (names what is there).
    """
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: no MPS device here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
    return str(device)


def load_system(model: str, *, device: str = "cpu", tokenizer: str | None = None, prediction_type: str | None = None,
                clip_skip: int = 1, max_token_length: int = 75, vae: str | os.PathLike | None = None,
                log: Callable[[str], None] | None = None, clip_stats: str | os.PathLike | None = None):
    """``"toy"`` -> the shipped toy system; ``"toy-image"`` -> its image-embedding variant (CLIP
    inversion); a toy-system file (a toy fine-tune) -> that system;
    a folder -> a diffusers Stable Diffusion folder (SD1/SD2/SDXL); a ``.safetensors``/``.ckpt``
    file -> an SD1/SD2/SDXL single-file checkpoint (``tokenizer``: see
    :meth:`sdadapt.diffusers_system.DiffusersSystem.from_single_file`). ``max_token_length``: 75
    (default), 150 or 225 prompt tokens, Stable Diffusion models only (:mod:`sdadapt.text_chunks`).
    ``vae``: a VAE file or folder that replaces the model's (kohya's ``--vae``,
    :func:`sdadapt.external_vae.replace_vae`), Stable Diffusion models only; ``log(line)`` hears what
    was read. ``clip_stats``: an SD 2.1 unCLIP model's CLIP-embedding mean/std file (karlo's
    ``ViT-L-14_stats.th``, which an unCLIP-L single file needs for noise levels above 0: :mod:`sdadapt.unclip`)."""
    if model in ("toy", "toy-image") or _is_toy_file(model):
        if vae is not None:
            from ..errors import InputError

            raise InputError(f"--vae {vae}: the toy has no Stable Diffusion VAE to replace; --vae is for Stable Diffusion "
                             "models (a diffusers folder or a single-file checkpoint)")
        if tokenizer is not None or prediction_type is not None or clip_skip != 1 or clip_stats is not None:
            raise ValueError("--tokenizer, --prediction-type, --clip-skip and --clip-stats are for Stable Diffusion models, "
                             "not the toy")
        if max_token_length != 75:
            raise ValueError(f"--max-token-length {max_token_length}: long prompts are split into 75-token CLIP windows, "
                             "which Stable Diffusion models have; the toy's text encoder reads at most 14 words, so "
                             "leave the option out (75) for the toy")
        from ..toy import load_toy, load_toy_image

        if model == "toy-image":
            return load_toy_image(device=device)
        return load_toy(None if model == "toy" else model, device=device)
    from ..diffusers_system import load_model
    from ..inversion.variation import image_variation_refusal, is_image_variation_folder

    if is_image_variation_folder(model):  # (clip-invert / generate --image-vectors load it themselves)
        raise image_variation_refusal(model)
    if vae is not None:
        from ..formats.vae_file import vae_weights_file

        vae_weights_file(vae)  # a missing --vae is refused before the model loads
    system = load_model(model, tokenizer=tokenizer, prediction_type=prediction_type, clip_skip=clip_skip, device=device,
                        max_token_length=max_token_length, clip_stats=clip_stats)
    if log is not None and (Path(model) / "unet_ema").is_dir():  # (diffusers' examples, SimpleTuner, EveryDream2)
        log(f"{model}: its unet/ is used, not the EMA copy in unet_ema/ (as diffusers' from_pretrained); `python -m "
            "sdadapt convert MODEL --ema --to diffusers -o OUT` makes a model of the EMA weights")
    if vae is not None:
        from ..external_vae import replace_vae

        note = replace_vae(system, vae)
        if log is not None:
            log(note)
    return system


#: A1111's checkpoint files (``modules/sd_models.py`` ``list_models``)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def checkpoint_by_name(name: str, *, beside: str | os.PathLike, option: str = "--model",
                       suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> str:
    """A model named as A1111 names checkpoints (a prompts file's ``--sd_model``, an X/Y/Z "Checkpoint name") as a
    path: ``name`` itself where it exists, else A1111's ``get_closet_checkpoint_match`` over the files with
    ``suffixes`` in the folder of ``beside`` (the run's model; recursively): the one whose path there, or whose
    stem, is ``name``, else the shortest path containing ``name`` — each tried again without A1111's
    ``" [hash]"`` suffix.

    Raises:
        ValueError: no such file nor one named so (A1111's "Unknown checkpoint"), named by ``option``.
    """
    import re

    if Path(name).exists():
        return name
    base = Path(beside)
    if not base.exists():
        raise ValueError(f"{option} {name}: no such file, and {beside} names no folder to look in; give the "
                         "checkpoint's path")
    folder = base.parent
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in suffixes)
    names = {path.relative_to(folder).as_posix(): path for path in files}
    for wanted in (name, re.sub(r"\s*\[\w+\]$", "", name)):
        exact = names.get(wanted) or next((path for key, path in names.items() if Path(key).stem == wanted), None)
        if exact is not None:
            return str(exact)
        close = sorted((key for key in names if wanted in key), key=len)
        if close:
            return str(names[close[0]])
    raise ValueError(f"{option} {name}: no such file, nor one named so in {folder} (A1111's 'Unknown checkpoint'); "
                     "give its path or file name")
