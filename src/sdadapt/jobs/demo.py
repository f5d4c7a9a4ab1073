"""``python -m sdadapt demo``: teach the toy model a held-out concept, score before and after."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..images import image_grid, write_png
from ..methods import METHODS, FitConfig, class_images, fit

if TYPE_CHECKING:
    from ..training.data_parallel import DataParallel

__all__ = ["run_demo", "prior_images", "Progress"]

#: ``progress(step, total, loss)`` after each training step
Progress = Callable[[int, int, float], None]


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Before any training: an existing output is kept unless ``overwrite``."""
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")


def _check_dtype(spec, dtype: torch.dtype | None) -> None:
    if dtype is not None and spec.file_suffix != ".safetensors":
        raise ValueError(f"{spec.name} writes {spec.file_suffix} files, which keep their own dtype; leave out --dtype")
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (or None), got {dtype}")


def _cast_file(path: Path, dtype: torch.dtype | None) -> None:
    """Rewrite the safetensors file ``path`` with its float tensors in ``dtype`` (scalars, e.g. alphas, kept)."""
    if dtype is None:
        return
    from ..formats.files import read_safetensors, write_safetensors

    tensors, metadata = read_safetensors(path)
    cast = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v for k, v in tensors.items()}
    write_safetensors(path, cast, metadata)


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def prior_images(
    system,
    method,
    *,
    class_prompt: str | None = None,
    enabled: bool | None = None,
    count: int,
    seed: int = 0,
    weight: float = 1.0,
    progress=None,
    size: tuple[int, int] | None = None,
    group: DataParallel | None = None,
    class_data_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[str], float] | None:
    """Class images for prior preservation, or ``None`` when the run goes without.

    Used when ``enabled`` (``None``: the method's ``prior`` default, or whenever a
    ``class_prompt`` or ``class_data_dir`` is given). The prompts are ``class_prompt`` repeated, or the
    system's own ``class_prompts(count, seed=)`` when it has one (the toy model: random held-in
    "a {colour} {shape}"); the images are what the *unadapted* ``system`` makes for them (so
    call this before preparing the adaptation), rounded to 8-bit pixels as an image file holds them
    (:func:`sdadapt.training.class_folder.as_saved`). ``group`` (data parallel, a
    :class:`~sdadapt.training.data_parallel.DataParallel`; call on every rank): made once across
    the ranks, every rank gets them all (:func:`sdadapt.methods.class_images`).

    ``class_data_dir`` (diffusers' ``--class_data_dir``): the class images are kept in that folder —
    the missing ones made and written there, the first ``count`` read back
    (:mod:`sdadapt.training.class_folder`): bit for bit the images made without it, so the next run
    makes none and trains the same. ``log`` gets a line saying what the folder held and what was made.

    Returns:
        ``(images (count, 3, H, W), prompts, weight)`` for :func:`sdadapt.methods.fit`, or ``None``.

    Raises:
        ValueError: prior preservation asked for (or required by the method, unless ``enabled=False``) on a
            user's model with no ``class_prompt``.
        InputError: ``class_data_dir`` is a file, or holds an image of another size or made for
            another class prompt (:func:`sdadapt.training.class_folder.read_class_folder`).
    """
    from ..training.class_folder import as_saved, fill_class_folder, read_class_folder

    wanted = enabled if enabled is not None else (method.prior != "off" or class_prompt is not None
                                                  or class_data_dir is not None)
    if not wanted:  # ("required" too when turned off by name: kohya's train_db.py without reg_data_dir, diffusers'
        # train_dreambooth.py without --with_prior_preservation)
        return None
    if count < 1:
        raise ValueError(f"need at least one class image for prior preservation, got {count}")
    if not weight >= 0:
        raise ValueError(f"the prior-preservation weight must be >= 0, got {weight}")
    if class_prompt is not None:
        prompts = [class_prompt] * count
    elif hasattr(system, "class_prompts"):  # a system with its own default class (the toy one)
        prompts = system.class_prompts(count, seed=seed)
    elif method.prior == "required" or enabled or class_data_dir is not None:
        raise ValueError(f"prior preservation for {method.name} needs a class prompt: pass --class-prompt "
                         "'a photo of a <class>' (the class your images belong to, e.g. 'a photo of a dog'), or "
                         "--reg-data-dir with your own class images (with a dataset config: an is_reg = true "
                         "subset), or --no-prior to train without prior preservation (what kohya's train_db.py / "
                         "sdxl_train.py do without class images)")
    else:
        return None
    if class_data_dir is None:
        images, captions = class_images(system, prompts, seed=seed, progress=progress, size=size, group=group)
        return as_saved(images), captions, weight
    made = fill_class_folder(system, class_data_dir, prompts, seed=seed, size=size, progress=progress, group=group)
    sized = size is not None and "height" in inspect.signature(system.sample).parameters  # (class_images' rule)
    native = getattr(system, "image_size", None)
    images, captions = read_class_folder(class_data_dir, count=count, class_prompt=class_prompt,
                                         size=size if sized else (native, native) if isinstance(native, int) else None)
    if log is not None:
        log(f"--class-data-dir {class_data_dir}: " + (f"{made} class image(s) generated into it ({count - made} there, "
                                                      f"{count} wanted)" if made else
                                                      f"{count} class image(s) read, none generated"))
    return images, captions, weight


def run_demo(
    *,
    method: str = "lora",
    concept: str = "cross",
    images: int = 8,
    steps: int | None = None,
    prior: bool | None = None,
    seed: int = 0,
    out: str | Path = "sdadapt-demo",
    weights: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """Teach the pretrained toy model a held-out concept; score before and after; write files.

    ``prior``: regularise with the model's own images of held-in prompts (``None``: the method's
    default — on for the LoRA family and DreamBooth). Writes ``OUT/before_after.png`` (rows:
    training images, before, after), the adapter file ``OUT/<concept>-<method>.safetensors`` and
    returns ``{"before": scores, "after": scores, "files": {...}, "seconds": ..., "losses": [...],
    "prior_images": n}``. Existing files there are refused before training unless ``overwrite``;
    ``dtype`` casts the adapter's float tensors (default: as trained, float32).
    """
    from ..toy import load_toy
    from ..toy.evaluate import concept_data, score

    from ..checks import positive_int

    spec = _method(method)
    positive_int(images, name="images (--images)", high=10_000)  # (0 images: nothing to learn from)
    folder = Path(out)
    adapter_path, picture_path = folder / f"{concept}-{method}{spec.file_suffix}", folder / "before_after.png"
    _refuse_existing([*spec.outputs(adapter_path), picture_path], overwrite)
    _check_dtype(spec, dtype)
    start = time.perf_counter()
    system = load_toy(weights)
    train_images, captions = concept_data(concept, images, seed=seed)
    before, before_images = score(system, concept, train_images)
    prior_data = prior_images(system, spec, enabled=prior, count=2 * images, seed=seed)
    # trigger-word methods (textual inversion, DreamArtist) learn the concept's own word
    adaptation = spec.adapt(system, seed=seed, **({"token": concept} if spec.trigger else {}))
    config = FitConfig(steps=steps or spec.steps, learning_rate=spec.learning_rate, seed=seed)
    losses = fit(system, adaptation, train_images, captions, config=config, prior=prior_data, callback=progress)
    # scored as the adaptation samples (DreamArtist: with its learned negative)
    after, after_images = score(system, concept, train_images, sampler=getattr(adaptation, "sample", None))
    folder.mkdir(parents=True, exist_ok=True)
    adapter = adaptation.save(adapter_path,
                              metadata={"sdadapt_demo": f"{method} on toy concept {concept!r}, {config.steps} steps"})
    _cast_file(adapter, dtype)
    n = before_images.shape[0] // 2
    rows = [train_images[:n], before_images[:n], after_images[:n]]
    grid = image_grid(torch.cat([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, 0, 0, n - r.shape[0]), value=1.0) for r in rows]),
                      columns=n)
    picture = write_png(picture_path, torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0])
    return {
        "method": method,
        "concept": concept,
        "before": before,
        "after": after,
        "losses": losses,
        "prior_images": 0 if prior_data is None else len(prior_data[1]),
        "seconds": time.perf_counter() - start,
        "files": {"grid": str(picture), "adapter": str(adapter)},
    }
