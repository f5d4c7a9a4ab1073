"""What two generated PNGs are compared by: the image, not the file (generate's PNGs carry A1111's parameters text,
which names the run's options)."""

from __future__ import annotations

import os


def pixels(path: str | os.PathLike) -> bytes:
    """The decoded image's channel bytes (``sdadapt.images.read_image_channels``)."""
    from sdadapt.images import read_image_channels

    return read_image_channels(path).tobytes()
