"""A tiny training-image folder: two 64x64 images, each with a caption file, for tests that start `train`."""

from __future__ import annotations

from pathlib import Path


def two_captioned_images(folder: Path, caption: str = "a cube") -> Path:
    """Make ``folder`` with ``0.png`` / ``1.png`` (two solid colours) and their ``.txt`` captions; return it."""
    from PIL import Image

    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder
