"""What the `train` tests feed the toy model: folders of random captioned PNGs and the command line."""

from __future__ import annotations

from pathlib import Path

import torch

from sdadapt.images import write_png

__all__ = ["captioned_pngs", "lora_train_args", "random_png", "read_train_toml"]


def captioned_pngs(folder: Path, sizes: list[tuple[int, int]], *, caption: str | list[str] = "a red circle") -> Path:
    """``folder`` made and filled with ``0.png, 1.png ...`` of random pixels, one per ``(height, width)``
    in ``sizes`` (all drawn from one generator seeded 0), each with its ``.txt`` caption: ``caption``,
    or ``caption[i]`` when a list is given."""
    captions = [caption] * len(sizes) if isinstance(caption, str) else caption
    if len(captions) != len(sizes):
        raise ValueError(f"{len(captions)} captions for {len(sizes)} images")
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, ((h, w), text) in enumerate(zip(sizes, captions)):
        write_png(folder / f"{i}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"{i}.txt").write_text(text)
    return folder


def random_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """One PNG of random pixels (``size`` = (height, width), drawn from a generator seeded ``seed``) at
    ``path``, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    write_png(path, torch.rand(3, *size, generator=g) * 2 - 1)


def lora_train_args(images: Path, *extra) -> list[str]:
    """``train lora`` on ``images`` at batch size 2 without prior preservation, then ``extra`` (as text)."""
    return ["train", "lora", "--images", str(images), "--batch-size", "2", "--no-prior", *map(str, extra)]


def read_train_toml(path: Path, text: str) -> tuple[dict, dict, list[str]]:
    """``text`` written to ``path`` and read as ``train --config`` reads it (every ``TrainOptions`` field and
    method option a name): ``(train options, method options, notes)``."""
    import dataclasses

    from sdadapt.cli.train import _method_options, read_config
    from sdadapt.jobs import TrainOptions

    path.write_text(text)
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    return read_config(path, fields=fields, method_options=set(_method_options()))
