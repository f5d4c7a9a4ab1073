"""Class images kept in a folder: diffusers' ``--class_data_dir`` (``train ... --class-data-dir DIR``).

diffusers' DreamBooth examples (``examples/dreambooth/train_dreambooth.py:858-904``,
``train_dreambooth_lora.py:814-857``, ``train_dreambooth_lora_sdxl.py:1038-1081``, and
``examples/custom_diffusion/train_custom_diffusion.py`` per concept; huggingface/diffusers@58eb52c)
count the images in ``--class_data_dir``, make the ``--num_class_images`` missing ones with the
unadapted pipeline, write each as ``{index}-{sha1 of its pixels}.jpg`` and train on the first
``num_class_images`` of the folder (``DreamBoothDataset``, ``train_dreambooth.py:647-655``); the next
run makes none. sdadapt does the same for DreamBooth-style prior preservation
(:func:`sdadapt.jobs.prior_images` ``class_data_dir=``) and Custom Diffusion's concepts
(:func:`sdadapt.custom_diffusion.concept_class_images`), with these choices:

* **PNG, not JPEG**: the files are ``{index}-{sha1}.png``, lossless, so the class images a run trains
  on are the 8-bit pixels it wrote. The class images made in memory (no folder) are rounded to the
  same 8-bit pixels (:func:`as_saved`, what a PNG or diffusers' PIL image holds), so a run with the
  folder trains bit for bit as one without it, whether the folder was empty, half full or full.
* **the same images as in memory**: image ``i`` of ``N`` is made exactly as
  :func:`sdadapt.methods.class_images` makes it for ``N`` prompts (chunks of its ``batch``, chunk
  ``k`` seeded ``seed + k·batch``). Topping up a folder that holds ``n`` images makes the chunks from
  the one holding image ``n`` on (up to ``batch - 1`` images made again and dropped, so each kept one
  is what a run with an empty folder makes), and writes each chunk as it is made: an interrupted run
  keeps what it wrote and the next one goes on from there.
* **the prompt in the file**: each written PNG keeps its prompt in a text chunk
  (:data:`PROMPT_KEY`). A run whose ``--class-prompt`` differs from the prompt a file records refuses
  the folder (its images show another class); a file that records none (your own images, diffusers'
  JPEGs) trains on ``--class-prompt`` as diffusers' do. Systems with their own class prompts (the toy
  model without ``--class-prompt``) caption each image with the prompt it records.
* **one size**: the class images are trained as one tensor at the size the run makes them (the
  training resolution, or the system's own size), so a folder image of another size is refused,
  naming it (diffusers resizes and centre-crops it; keep a folder per resolution instead, or give
  images of mixed sizes with ``--reg-data-dir``, which buckets them).
* **order**: ``{index}-...`` files by their index (image 10 after image 9, not after image 1), then
  the others by name; the first ``N`` train (diffusers: the first ``num_class_images`` the folder
  lists, in no set order).
* **data parallel** (``group=``, call on every rank): every rank lists the folder, the chunks are dealt
  out over the ranks as :func:`sdadapt.methods.class_images` deals them, rank 0 alone writes the files,
  and every rank waits for it before reading the folder (one machine, or a folder every machine sees).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..images import is_image_file, read_image, read_png_text, to_uint8, write_png

if TYPE_CHECKING:
    from .data_parallel import DataParallel

__all__ = ["PROMPT_KEY", "as_saved", "class_image_files", "fill_class_folder", "read_class_folder"]

#: the PNG text key of the prompt a class image was made for
PROMPT_KEY = "sdadapt class prompt"
_INDEXED = re.compile(r"(\d+)-")


def class_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` in the order their class images train: the
    ``{index}-...`` files by index (then name), then the others by name; ``[]`` for a missing folder."""
    root = Path(folder)
    if not root.is_dir():
        return []
    files = [p for p in root.iterdir() if is_image_file(p)]

    def key(path: Path) -> tuple[int, int, str]:
        match = _INDEXED.match(path.name)
        return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)

    return sorted(files, key=key)


def as_saved(images: Tensor) -> Tensor:
    """Class images as a run trains on them: (N, 3, H, W) in [-1, 1] rounded to 8-bit pixels
    (:func:`sdadapt.images.to_uint8`) and back, bit for bit what :func:`sdadapt.images.read_image`
    reads from the PNG :func:`~sdadapt.images.write_png` writes of each; float32, on ``images``' device."""
    pixels = np.stack([to_uint8(image) for image in images]) if len(images) else np.zeros((0, *images.shape[2:], 3), np.uint8)
    # (read_image's arithmetic: float32 u / 255, then ·2 − 1)
    out = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W)
    return out.contiguous().to(images.device)


def _chunk_size(batch: int | None) -> int:
    """``batch``, or :func:`sdadapt.methods.class_images`' own default (the chunks the in-memory path makes)."""
    if batch is not None:
        return batch
    from ..methods import class_images

    return int(inspect.signature(class_images).parameters["batch"].default)


def fill_class_folder(system, folder: str | os.PathLike, prompts: Sequence[str], *, seed: int = 0,
                      size: tuple[int, int] | None = None, steps: int | None = None, batch: int | None = None,
                      progress: Callable[[int, int, Any], None] | None = None,
                      group: DataParallel | None = None) -> int:
    """Top ``folder`` up to ``len(prompts)`` class images: image ``i`` for each ``i`` from the number
    already there up to ``len(prompts) - 1`` (an ``i`` a ``{i}-`` file holds already: the last free ``i``
    below ``len(prompts)`` instead), made as :func:`sdadapt.methods.class_images` makes image
    ``i`` of ``prompts`` (``seed``, ``size`` (height, width), ``steps`` and chunks of ``batch``; ``None``:
    its defaults) and written as ``{i}-{sha1 of its 8-bit pixels}.png`` with ``prompts[i]`` in the file
    (:data:`PROMPT_KEY`), atomically, chunk by chunk. The folder is made when missing; nothing is made
    when it holds enough. Call before preparing the adaptation (the unadapted system).

    ``progress(done, total, None)`` counts the images this process makes (made again and dropped ones
    too); ``group`` (data parallel; call on every rank): see the module notes.

    Returns:
        How many images were written (the same on every rank).

    Raises:
        InputError: ``folder`` is a file.
        PeerProcessError: with ``group``, another rank failed first.
    """
    from ..methods import class_images
    from .data_parallel import rank_chunks, wait_for_all_ranks

    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise InputError(f"--class-data-dir {root}: is a file; give a folder for the class images (made when missing)")
    count = len(prompts)
    files = class_image_files(root)
    have = len(files)
    if have >= count:
        return 0
    # the images to make: ``have .. count - 1``, or where a file already holds one of those indices (a removed
    # image below it), the last free ones below ``count`` (a folder with a gap is filled, not overwritten)
    taken = {int(match.group(1)) for match in map(_INDEXED.match, (p.name for p in files)) if match}
    todo = set([i for i in range(count) if i not in taken][have - count:])
    main = group is None or group.main
    world = 1 if group is None else group.world
    chunk = _chunk_size(batch)
    start = min(todo) // chunk * chunk  # (the chunk holding the first image made: whole, as the in-memory path makes it)
    chunks = math.ceil((count - start) / chunk)
    own = range(chunks) if group is None else rank_chunks(chunks, group)
    total = sum(min(chunk, count - start - k * chunk) for k in own)
    done = made = 0  # (this process's images before this round; in it, as class_images reports them)

    def report(now: int, _total: int, info: Any) -> None:
        nonlocal made
        made = now
        if progress is not None:
            progress(done + now, total, info)

    per_round = world * chunk  # (a round: a chunk per rank, dealt out as class_images deals them)
    for first in range(start, count, per_round):
        last = min(first + per_round, count)
        made = 0
        images, _ = class_images(system, list(prompts[first:last]), seed=seed + first, batch=chunk, size=size,
                                 progress=report, group=group, **({} if steps is None else {"steps": steps}))
        done += made
        if main:
            for offset in (k for k in range(last - first) if first + k in todo):
                digest = hashlib.sha1(to_uint8(images[offset]).tobytes()).hexdigest()  # (diffusers: the PIL image's bytes)
                write_png(root / f"{first + offset}-{digest}.png", images[offset], text={PROMPT_KEY: prompts[first + offset]})
    if group is not None:  # (before any rank lists the folder again)
        wait_for_all_ranks(f"the wait for rank 0's class images in {root}")
    return count - have


def read_class_folder(folder: str | os.PathLike, *, count: int, class_prompt: str | None,
                      size: tuple[int, int] | None = None) -> tuple[Tensor, list[str]]:
    """The first ``count`` class images of ``folder`` (:func:`class_image_files` order) and their captions.

    Args:
        count: how many (the folder must hold at least that many: :func:`fill_class_folder` first).
        class_prompt: every image's caption (``--class-prompt``); a file recording another prompt is
            refused. ``None``: each image's caption is the prompt it records (a system with its own
            class prompts).
        size: (height, width) every image must have (the size the run makes class images); ``None``:
            one size, any.

    Returns:
        ``(images (count, 3, H, W) float32 in [-1, 1], captions)``, the pixels as
        :func:`sdadapt.images.read_image` reads them.

    Raises:
        InputError: too few images, an image of another size, a recorded prompt other than
            ``class_prompt``, or no prompt for an image without ``class_prompt`` (each names the file).
        ImageFolderError: an unreadable image.
    """
    root = Path(folder)
    files = class_image_files(root)[:count]
    if len(files) < count:
        raise InputError(f"--class-data-dir {root}: holds {len(files)} class image(s), {count} wanted")
    images: list[Tensor] = []
    captions: list[str] = []
    for file in files:
        recorded = read_png_text(file).get(PROMPT_KEY)
        if class_prompt is None and recorded is None:
            raise InputError(f"--class-data-dir {root}: {file.name} records no prompt (it was not made by sdadapt); give "
                             "--class-prompt, the caption of every class image")
        if class_prompt is not None and recorded is not None and recorded != class_prompt:
            raise InputError(f"--class-data-dir {root}: {file.name} was made for the class prompt {recorded!r}, not "
                             f"{class_prompt!r}: give another folder for this class prompt (or remove the folder's "
                             "images to make them again)")
        image = read_image(file, alpha="drop")  # (3, H, W); alpha dropped, as train's own images and diffusers
        want = size if size is not None else (tuple(images[0].shape[1:]) if images else None)
        if want is not None and tuple(image.shape[1:]) != tuple(want):
            raise InputError(f"--class-data-dir {root}: {file.name} is {image.shape[2]}x{image.shape[1]} (width x height), "
                             f"the class images here are {want[1]}x{want[0]}: keep one folder per training resolution "
                             "(or remove the images of the other size to make them again); your own class images of "
                             "several sizes go in --reg-data-dir (bucketed)")
        images.append(image)
        captions.append(class_prompt if class_prompt is not None else recorded)  # type: ignore[arg-type]
    return torch.stack(images) if images else torch.zeros(0, 3, 0, 0), captions
