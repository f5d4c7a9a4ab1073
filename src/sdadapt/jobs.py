"""The jobs behind ``python -m sdadapt demo`` and ``python -m sdadapt train``, as functions.

Both return plain dicts (scores, paths, timings) and report progress through a callback; the
command line draws the bar and prints the tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .images import image_grid, load_image_folder, write_png
from .methods import METHODS, FitConfig, class_images, fit

__all__ = ["run_demo", "run_train", "load_system"]

Progress = Callable[[int, int, float], None]


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _prior(system, method, count: int, seed: int):
    """DreamBooth's prior-preservation data: what the unadapted model makes for held-in prompts."""
    if not method.prior_preservation:
        return None
    from .toy.shapes import sample_scenes

    prompts = [f"a {s.colour} {s.shape}" for s in sample_scenes(count, seed=seed + 77)]
    images, captions = class_images(system, prompts, seed=seed)
    return images, captions, 1.0


def run_demo(
    *,
    method: str = "lora",
    concept: str = "cross",
    images: int = 8,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path = "sdadapt-demo",
    weights: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Teach the pretrained toy model a held-out concept; score before and after; write files.

    Writes ``OUT/before_after.png`` (rows: training images, before, after), the adapter file
    ``OUT/<concept>-<method>.safetensors`` and returns
    ``{"before": scores, "after": scores, "files": {...}, "seconds": ..., "losses": [...]}``.
    """
    from .toy import load_toy
    from .toy.evaluate import concept_data, score

    spec = _method(method)
    start = time.perf_counter()
    system = load_toy(weights)
    train_images, captions = concept_data(concept, images, seed=seed)
    before, before_images = score(system, concept, train_images)
    prior = _prior(system, spec, count=2 * images, seed=seed)
    adaptation = spec.prepare(system)
    config = FitConfig(steps=steps or spec.steps, learning_rate=spec.learning_rate, seed=seed)
    losses = fit(system, adaptation, train_images, captions, config=config, prior=prior, callback=progress)
    after, after_images = score(system, concept, train_images)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = adaptation.save(folder / f"{concept}-{method}{spec.file_suffix}",
                              metadata={"sdadapt_demo": f"{method} on toy concept {concept!r}, {config.steps} steps"})
    n = before_images.shape[0] // 2
    rows = [train_images[:n], before_images[:n], after_images[:n]]
    grid = image_grid(torch.cat([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, 0, 0, n - r.shape[0]), value=1.0) for r in rows]),
                      columns=n)
    picture = write_png(folder / "before_after.png", torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0])
    return {
        "method": method,
        "concept": concept,
        "before": before,
        "after": after,
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "files": {"grid": str(picture), "adapter": str(adapter)},
    }


def load_system(model: str, *, device: str = "cpu"):
    """``"toy"`` -> the shipped toy system; a path -> a diffusers Stable Diffusion folder."""
    if model == "toy":
        from .toy import load_toy

        return load_toy(device=device)
    from .diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(model, device=device)


def run_train(
    method: str,
    *,
    images: str | Path,
    prompt: str | None,
    model: str = "toy",
    out: str | Path | None = None,
    steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Train ``method`` on a folder of images + captions (``NAME.txt``, or ``prompt`` for all)."""
    spec = _method(method)
    system = load_system(model)
    pictures, captions = load_image_folder(images, size=system.image_size, default_caption=prompt)
    prior = _prior(system, spec, count=2 * len(captions), seed=seed) if model == "toy" else None
    if spec.prior_preservation and prior is None:
        raise ValueError(f"{method} needs class images for prior preservation; with --model PATH use 'full' or a LoRA method")
    adaptation = spec.prepare(system)
    config = FitConfig(steps=steps or spec.steps, learning_rate=learning_rate or spec.learning_rate,
                       batch_size=batch_size, seed=seed)
    start = time.perf_counter()
    losses = fit(system, adaptation, pictures, captions, config=config, prior=prior, callback=progress)
    target = Path(out) if out is not None else Path(f"{Path(images).name}-{method}{spec.file_suffix}")
    saved = adaptation.save(target, metadata={"sdadapt_train": f"{method}, {config.steps} steps, {len(captions)} images"})
    return {"method": method, "images": len(captions), "losses": losses, "seconds": time.perf_counter() - start, "file": str(saved)}
