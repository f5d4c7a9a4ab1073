"""The aesthetic-gradient jobs of the command line: ``aesthetic-embedding`` and ``generate --aesthetic``.

* :func:`run_aesthetic_embedding` — the mean CLIP image embedding of a folder of images, written as
  the ``(1, D)`` ``.pt`` the A1111 extension loads (or ``.safetensors``);
* :func:`aesthetic_generation_conditioning` — what ``generate --aesthetic`` samples with: the
  prompt's conditioning personalised toward an embedding file (checked against the model first).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError, WeightFileError

__all__ = ["aesthetic_generation_conditioning", "check_aesthetic_request", "clip_image_encoder", "run_aesthetic_embedding"]

_SUFFIXES = (".pt", ".safetensors")


def clip_image_encoder(folder: str | os.PathLike, *, device: str = "cpu") -> tuple[Callable[[Tensor], Tensor], int]:
    """A local transformers CLIP model folder's image tower: ``(encode(pixel_values (B, 3, S, S)) -> (B, E), S)``.

    ``folder`` holds ``config.json`` + weights of a ``CLIPModel`` (``openai/clip-vit-large-patch14``
    for SD1: E = 768) or a ``CLIPVisionModelWithProjection`` (read by transformers: safetensors, or
    a ``.bin`` through ``torch.load(weights_only=True)``). ``encode`` is its projected image
    embedding (``get_image_features`` / ``image_embeds``); ``S`` its input size (224 for CLIP-L).

    Raises:
        InputError: transformers is not installed (the message says how to get it).
        WeightFileError: no such folder, no ``config.json``, or a model without a vision tower.
    """
    root = Path(folder)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise WeightFileError(f"--clip {root}: not a transformers CLIP model folder (no config.json); download e.g. "
                              "openai/clip-vit-large-patch14 (the CLIP of SD1) to a folder and pass that")
    try:
        kind = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightFileError(f"--clip {root}: unreadable config.json ({exc})") from None
    try:
        import transformers
    except ImportError:
        raise InputError("--clip needs the transformers package (pip install transformers); "
                         "or use --model toy for the toy model") from None
    if kind == "clip":
        model = transformers.CLIPModel.from_pretrained(root)

        def encode(pixels: Tensor) -> Tensor:
            return model.get_image_features(pixel_values=pixels)
    elif kind == "clip_vision_model":
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(root)

        def encode(pixels: Tensor) -> Tensor:
            return model(pixel_values=pixels).image_embeds
    else:
        raise WeightFileError(f"--clip {root}: a {kind!r} model, not CLIP with an image tower (model_type 'clip' or "
                              "'clip_vision_model'); a Stable Diffusion checkpoint holds CLIP's text tower only")
    # (float32 whatever the folder holds: transformers 5 loads an fp16 folder as fp16, 4 as float32)
    model.float().requires_grad_(False).eval().to(device)
    vision = getattr(model.config, "vision_config", model.config)
    size = int(vision.image_size)

    def on_device(pixels: Tensor) -> Tensor:
        return encode(pixels.to(device))

    return on_device, size


def run_aesthetic_embedding(
    images: str | os.PathLike,
    *,
    out: str | os.PathLike,
    model: str = "toy",
    clip: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    normalize_each: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict:
    """Write the aesthetic embedding of the images in ``images`` (a folder) to ``out``.

    ``e = mean_i g(image_i)`` (1, D), unnormalised as the A1111 extension and vicgalle's script
    store it (:func:`sdadapt.aesthetic.aesthetic_embedding_from_folder`). ``g``: with ``clip`` a
    local transformers CLIP model's projected image embedding (:func:`clip_image_encoder`, images
    resized/cropped to its input size and normalised with CLIP's mean/std); else the toy judge CLIP
    of ``model`` (``"toy"``, ``"toy-image"`` or a toy-system file; 32x32 images, D = 64).

    Args:
        out: ``.pt`` (a plain ``(1, D)`` tensor, the extension's file) or ``.safetensors``
            (key ``aesthetic_embedding`` + metadata).
        dtype: the stored dtype (``None``: float32).

    Returns:
        ``{"file", "images", "dim", "norm", "encoder", "seconds"}``.

    Raises:
        InputError: a model without an image tower and no ``clip``; a bad suffix.
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
        ImageFolderError: not a folder, no images, an unreadable image.
    """
    from ..aesthetic import (
        aesthetic_embedding_from_folder,
        clip_image_preprocess,
        image_files,
        save_aesthetic_embedding,
    )
    from ..formats.files import check_output_file

    target = Path(out)
    if target.suffix.lower() not in _SUFFIXES:
        raise InputError(f"{target}: aesthetic embeddings are written as .pt (the A1111 extension's) or .safetensors")
    check_output_file(target, overwrite=overwrite, suffix=None)
    files = image_files(images)
    start = time.perf_counter()
    if clip is not None:
        encoder, size = clip_image_encoder(clip, device=device)
        preprocess: Callable[[Tensor], Tensor] | None = clip_image_preprocess
        source = f"CLIP {Path(clip).name}"
    else:
        from .models import load_system

        if not _is_toy_model(model):
            raise InputError(f"--model {model}: Stable Diffusion models hold CLIP's text tower only; an aesthetic "
                             "embedding needs CLIP's image tower: pass --clip DIR (a transformers CLIP model folder, "
                             "openai/clip-vit-large-patch14 for SD1), or --model toy for the toy model")
        system = load_system(model, device=device)

        def encoder(images: Tensor) -> Tensor:
            return system.clip.encode_image(images.to(device))

        size, preprocess, source = system.image_size, None, f"toy judge CLIP ({model})"
    embedding = aesthetic_embedding_from_folder(images, encoder, size=size, batch_size=batch_size,
                                                normalize_each=normalize_each, preprocess=preprocess).cpu()
    stored = embedding.to(dtype) if dtype is not None else embedding
    metadata = ({"sdadapt_aesthetic_images": str(len(files)), "sdadapt_aesthetic_encoder": source,
                 "sdadapt_aesthetic_normalize_each": str(normalize_each).lower()}
                if target.suffix.lower() == ".safetensors" else None)
    written = save_aesthetic_embedding(target, stored, overwrite=overwrite, metadata=metadata)
    return {"file": str(written), "images": len(files), "dim": int(embedding.shape[-1]),
            "norm": float(embedding.norm()), "encoder": source, "seconds": time.perf_counter() - start}


def _is_toy_model(model: str) -> bool:
    """Whether ``--model`` names the toy (``toy``, ``toy-image`` or a toy-system file), as :func:`load_system` reads it."""
    from .models import _is_toy_file

    return model in ("toy", "toy-image") or _is_toy_file(model)


def _is_toy(system) -> bool:
    from ..toy.system import ToySystem

    return isinstance(system, ToySystem)


def _projection_width(system, projection: Tensor | nn.Module | None) -> int | None:
    """E of the text features the personalisation compares with the embedding (None: unknown)."""
    if isinstance(projection, Tensor):
        return int(projection.shape[0])
    config = getattr(system.text_encoder, "config", None)
    width = getattr(config, "projection_dim", None)
    if projection is None and type(system.text_encoder).__name__ == "CLIPTextModelWithProjection" and width:
        return int(width)
    return None


_NEEDS_CLIP = ("--aesthetic on a Stable Diffusion model needs --aesthetic-clip DIR: the CLIP model whose text tower the "
               "model uses (openai/clip-vit-large-patch14 for SD1), for its text_projection — SD checkpoints do not hold it")


def check_aesthetic_request(model: str, path: str | os.PathLike, *, clip: str | os.PathLike | None) -> None:
    """The checks of ``generate --aesthetic`` that need no model loaded: the file exists, and a
    Stable Diffusion ``model`` comes with ``clip`` (its text projection).

    Raises:
        FileNotFoundError: no such file (``--aesthetic`` or ``--aesthetic-clip``).
        InputError: a Stable Diffusion model without ``clip``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--aesthetic {path}: no such file")
    if clip is not None and not Path(clip).exists():
        raise FileNotFoundError(f"--aesthetic-clip {clip}: no such file or folder")
    if clip is None and not _is_toy_model(model):
        raise InputError(_NEEDS_CLIP)


def aesthetic_generation_conditioning(system, prompt: str, path: str | os.PathLike, *, steps: int = 5, lr: float = 1e-4,
                                      weight: float = 0.9, slerp: bool = False, clip: str | os.PathLike | None = None,
                                      text: str | None = None, text_angle: float = 0.1,
                                      text_negative: bool = False) -> object:
    """The conditioning ``generate --aesthetic FILE`` samples ``prompt`` with (what
    ``system.condition`` returns, the text states personalised; :func:`sdadapt.aesthetic.aesthetic_conditioning`).

    The projection into the embedding's space: ``clip`` (a local CLIP checkpoint or folder,
    :func:`sdadapt.aesthetic.load_text_projection`), else the system's own (the toy's fitted one).
    The file is checked against it before any work, whatever ``weight`` is.

    Raises:
        FileNotFoundError: no such file.
        WeightFileError: an unreadable file, or one whose width does not fit the model's text
            features (made with another CLIP).
        InputError: options out of range; a Stable Diffusion model without ``clip``; SDXL.
    """
    from ..aesthetic import (
        aesthetic_conditioning,
        load_aesthetic_embedding,
        load_text_projection,
        system_projection,
    )

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--aesthetic {file}: no such file")
    embedding = load_aesthetic_embedding(file)
    if getattr(system, "text_encoder_2", None) is not None:
        raise InputError("--aesthetic: aesthetic gradients personalise one CLIP text encoder (SD1/SD2, the toy model); "
                         "SDXL's two encoders are not supported (neither does the original method)")
    if clip is not None:
        projection = load_text_projection(clip)
    else:
        projection = system_projection(system)
        if projection is None and type(system.text_encoder).__name__ != "CLIPTextModelWithProjection":
            raise InputError(_NEEDS_CLIP)
    width = _projection_width(system, projection)
    if width is not None and width != embedding.shape[-1]:
        where = f"--aesthetic-clip {clip}" if clip is not None else "this model"
        raise WeightFileError(
            f"--aesthetic {file}: the embedding is {embedding.shape[-1]} wide but the text features of {where} are "
            f"{width} wide; make the embedding with the same CLIP (python -m sdadapt aesthetic-embedding IMAGES "
            f"{'--model toy' if _is_toy(system) else '--clip DIR'} -o FILE)"
        )
    device = system.alphas_cumprod.device
    embedding = embedding.to(device)
    if isinstance(projection, Tensor):
        projection = projection.to(device)
    return aesthetic_conditioning(system, [prompt], embedding, projection=projection, aesthetic_steps=steps, lr=lr,
                                  weight=weight, slerp=slerp, text=text, text_angle=text_angle,
                                  text_negative=text_negative)
