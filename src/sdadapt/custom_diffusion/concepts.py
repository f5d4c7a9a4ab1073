"""diffusers' ``--concepts_list`` for Custom Diffusion (``train custom-diffusion --concepts-list FILE.json``).

diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` trains several concepts from a
JSON list, one table per concept::

    [{"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
      "instance_data_dir": "./data/cat", "class_data_dir": "./real_reg/samples_cat/"},
     {"instance_prompt": "photo of a <new2> wooden pot", "class_prompt": "wooden pot",
      "instance_data_dir": "./data/wooden_pot", "class_data_dir": "./real_reg/samples_wooden_pot/"}]

with diffusers' semantics (its ``CustomDiffusionDataset``): every image directly in a concept's
``instance_data_dir`` trains on that concept's ``instance_prompt`` (caption files are not read); its
class images are the first ``num_class_images`` of its ``class_data_dir``, each on its
``class_prompt``; a ``class_data_dir`` holding fewer is topped up with images the unadapted model
makes for the ``class_prompt``, written into the folder (diffusers' class-image generation; the
folder is made when missing). Relative paths are read from the current folder, as diffusers opens
them (not from the JSON file's folder).

The concepts become sdadapt's own data structures, nothing parallel: :func:`concept_records` gives
the training images as :class:`~sdadapt.training.data.ImageRecord` (one ``folder`` label per
concept), :func:`concept_class_images` the class images as
:class:`~sdadapt.training.reg_data.RegImages` (the prior data a ``--reg-data-dir`` gives, every image
once, not balanced by kohya's rule: diffusers cycles through all of them); a
:class:`~sdadapt.training.data.Dataset` of each and ``fit(..., prior=(reg_dataset, weight))`` train them.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..images import IMAGE_SUFFIXES, is_image_file
from ..training.data import ImageRecord, image_size, kohya_folder_name
from ..training.reg_data import RegImages

if TYPE_CHECKING:
    from ..training.data_parallel import DataParallel

__all__ = [
    "CONCEPT_KEYS",
    "DIFFUSERS_NUM_CLASS_IMAGES",
    "Concept",
    "concept_class_images",
    "concept_records",
    "concepts_record",
    "missing_class_images",
    "read_concepts_list",
]

#: the keys of a concept table (diffusers' ``--concepts_list``; every other key is refused)
CONCEPT_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")
#: diffusers' ``--num_class_images`` default: the class images each concept has (per concept)
DIFFUSERS_NUM_CLASS_IMAGES = 200
#: the seed offset between concepts' generated class images (concept ``i`` draws from ``seed + i·offset``)
_CONCEPT_SEED_OFFSET = 100_003


@dataclass(frozen=True)
class Concept:
    """One concept of a concepts list, checked.

    Attributes:
        where: its place in the file (``"concepts.json: [1]"``), for messages.
        instance_prompt: the caption of every one of its images (names a modifier token).
        instance_data_dir: the folder of its images (the images directly in it).
        class_prompt: the caption of its class images and the prompt that generates missing ones
            (``None``: a run without class images).
        class_data_dir: the folder of its class images (may not exist yet: made when generating).
    """

    where: str
    instance_prompt: str
    instance_data_dir: Path
    class_prompt: str | None = None
    class_data_dir: Path | None = None


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def read_concepts_list(path: str | os.PathLike, *, tokens: Sequence[str] = (), prior: bool = True) -> tuple[Concept, ...]:
    """Read and check diffusers' concepts-list JSON (no image is read; sizes and pixels come later).

    Args:
        path: the JSON file: a non-empty list of tables with :data:`CONCEPT_KEYS`.
        tokens: the run's modifier tokens: each ``instance_prompt`` must name one (``()``: not checked).
        prior: class images are wanted, so each concept needs ``class_prompt`` and ``class_data_dir``
            (``False``: they may be left out and are not used, as diffusers without
            ``--with_prior_preservation``).

    Returns:
        The concepts in file order; relative folders as written (read from the current folder).

    Raises:
        InputError: not JSON, not a non-empty list of tables, an unknown key (naming the closest), a
            missing or empty key, a value that is not text, an ``instance_data_dir`` that is not a
            folder or holds no images, a ``class_data_dir`` that is a file (diffusers' ``--real_prior``
            lists, not supported), or an ``instance_prompt`` naming none of ``tokens``. Every message
            names the file and the concept.
        FileNotFoundError: no such file.
    """
    from ..methods.textual_inversion import mentions

    file = Path(path)
    source = f"--concepts-list {file}"
    if not file.is_file():
        raise FileNotFoundError(f"{source}: no such file (diffusers' concepts list: a JSON list of "
                                "{\"instance_prompt\", \"class_prompt\", \"instance_data_dir\", \"class_data_dir\"} tables)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{source}: not a JSON file ({exc}); write a JSON list of concept tables") from None
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{source}: the file must be a non-empty JSON list of concept tables "
                         "([{\"instance_prompt\": \"photo of a <new1> cat\", \"instance_data_dir\": \"data/cat\", "
                         "\"class_prompt\": \"cat\", \"class_data_dir\": \"reg/cat\"}, ...]); got "
                         + ("an empty list" if isinstance(raw, list) else type(raw).__name__))
    concepts: list[Concept] = []
    for index, table in enumerate(raw):
        where = f"{source}: [{index}]"
        if not isinstance(table, dict):
            raise InputError(f"{where}: a concept must be a table with {', '.join(CONCEPT_KEYS)}, got {table!r}")
        for key in table:
            if key not in CONCEPT_KEYS:
                close = difflib.get_close_matches(str(key), CONCEPT_KEYS, n=1)
                raise InputError(f"{where}: unknown key {key!r}" + (f"; did you mean {close[0]}?" if close else "")
                                 + f" (a concept has {', '.join(CONCEPT_KEYS)})")
        required = CONCEPT_KEYS if prior else ("instance_prompt", "instance_data_dir")
        values: dict[str, Any] = {}
        for key in CONCEPT_KEYS:
            value = table.get(key)
            if value is None:
                if key in required:
                    raise InputError(f"{where}: no {key}" + ("" if key.startswith("instance") else
                                     " (each concept's class images need their prompt and folder; --no-prior trains "
                                     "without class images)"))
                continue
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{where}: {key} must be non-empty text, got {value!r}")
            values[key] = value
        folder = Path(values["instance_data_dir"])
        if not folder.is_dir():
            raise InputError(f"{where}: instance_data_dir {folder} is not a folder (a relative path is read from the "
                             "current folder, as diffusers)")
        if not _images_in(folder):
            raise InputError(f"{where}: instance_data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) directly "
                             "in it")
        prompt = values["instance_prompt"]
        if tokens and not any(mentions(prompt, t) for t in tokens):
            raise InputError(f"{where}: instance_prompt {prompt!r} names none of the modifier tokens "
                             f"{'+'.join(tokens)}; write the concept's token in it (e.g. 'photo of a {tokens[0]} cat')")
        class_dir = Path(values["class_data_dir"]) if prior and "class_data_dir" in values else None
        if class_dir is not None and class_dir.exists() and not class_dir.is_dir():
            raise InputError(f"{where}: class_data_dir {class_dir} is a file; give a folder of class images (diffusers' "
                             "--real_prior retrieval lists, images.txt / caption.txt, are not supported)")
        concepts.append(Concept(where, prompt, folder, values.get("class_prompt") if prior else None, class_dir))
    return tuple(concepts)


def _labels(folders: Sequence[Path]) -> list[str]:
    """One label per folder: its name, a repeated one numbered `` (2)``, `` (3)`` … (kohya's subset labels)."""
    labels: list[str] = []
    for folder in folders:
        name = kohya_folder_name(folder)
        label, number = name, 2
        while label in labels:
            label, number = f"{name} ({number})", number + 1
        labels.append(label)
    return labels


def concept_records(concepts: Sequence[Concept], *, repeats: int = 1) -> tuple[list[ImageRecord], list[str]]:
    """The training images of ``concepts``: every image directly in each ``instance_data_dir`` (sorted
    by name), captioned with its concept's ``instance_prompt`` (diffusers' ``CustomDiffusionDataset``:
    ``(x, concept["instance_prompt"]) for x in instance_data_dir``).

    Returns:
        ``(records, notes)``: each record's ``folder`` is its concept's folder name (numbered when two
        concepts' folders share a name); notes on caption files and sub-folders not read.

    Raises:
        ImageFolderError: an unreadable image (names the file).
    """
    records: list[ImageRecord] = []
    notes: list[str] = []
    for concept, label in zip(concepts, _labels([c.instance_data_dir for c in concepts])):
        files = _images_in(concept.instance_data_dir)
        records.extend(ImageRecord(file, concept.instance_prompt, repeats, label, image_size(file)) for file in files)
        captions = [f for f in files if f.with_suffix(".txt").is_file() or f.with_suffix(".caption").is_file()]
        if captions:
            notes.append(f"{concept.where}: {len(captions)} caption file(s) beside the images not read: every image of "
                         f"the concept trains on its instance_prompt {concept.instance_prompt!r}, as diffusers")
        subfolders = sorted(p.name for p in concept.instance_data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subfolders:
            notes.append(f"{concept.where}: sub-folders of {concept.instance_data_dir} not read "
                         f"({', '.join(subfolders[:5])}{' ...' if len(subfolders) > 5 else ''})")
    return records, notes


def missing_class_images(concepts: Sequence[Concept], *, count: int = DIFFUSERS_NUM_CLASS_IMAGES) -> list[int]:
    """How many class images each concept lacks: ``count`` minus the images directly in its
    ``class_data_dir`` (0 when it has enough; a missing folder has none; 0 for a concept without one)."""
    from ..training.class_folder import class_image_files

    out = []
    for concept in concepts:
        folder = concept.class_data_dir
        out.append(max(0, count - len(class_image_files(folder))) if folder is not None else 0)
    return out


def concept_class_images(system, concepts: Sequence[Concept], *, count: int = DIFFUSERS_NUM_CLASS_IMAGES, seed: int = 0,
                         size: tuple[int, int] | None = None, steps: int = 25,
                         progress: Callable[[int, int, Any], None] | None = None,
                         group: DataParallel | None = None) -> RegImages:
    """Each concept's class images, generated where its ``class_data_dir`` holds fewer than ``count``
    (diffusers' ``train_custom_diffusion.py``: ``num_class_images - cur_class_images`` images of
    ``class_prompt``, saved into the folder), then read back.

    The missing images are what the unadapted ``system`` makes for the concept's ``class_prompt``
    (call this before preparing the adaptation), at ``size`` (height, width; ``None``: the system's):
    concept ``i``'s folder is topped up by :func:`sdadapt.training.class_folder.fill_class_folder`
    with ``count`` prompts from seed ``seed + i·100003`` (image ``n`` is the one an empty folder would
    get; each written as ``{n}-{sha1 of its 8-bit pixels}.png``, diffusers' name, PNG instead of JPEG:
    lossless), the folder made when missing. Then each concept's first ``count`` images
    (:func:`~sdadapt.training.class_folder.class_image_files` order: ``{n}-`` files by ``n``, then the
    others by name) train on its ``class_prompt`` (diffusers: the first ``num_class_images`` of the
    folder's listing).

    ``group`` (data parallel, :func:`sdadapt.training.data_parallel.active`; call on every rank): the
    missing images are made once across the ranks (:func:`sdadapt.methods.class_images` ``group=``:
    one process's images, bit for bit), only rank 0 writes them, and every rank reads the folder after
    it has (one machine, or folders every machine reads).

    Returns:
        :class:`~sdadapt.training.reg_data.RegImages`: every class image once (``repeats`` 1; not
        balanced by kohya's rule), each record's ``folder`` its concept's class folder name.

    Raises:
        ValueError: ``count`` < 1, or a concept without ``class_prompt`` / ``class_data_dir``.
        PeerProcessError: with ``group``, another rank failed first.
    """
    from ..training.class_folder import class_image_files, fill_class_folder

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count (--class-images) must be an integer >= 1 (class images per concept), got {count!r}")
    bare = [c.where for c in concepts if c.class_prompt is None or c.class_data_dir is None]
    if bare:
        raise ValueError(f"{bare[0]}: no class_prompt / class_data_dir for its class images; give both, or train "
                         "without class images (--no-prior)")
    records: list[ImageRecord] = []
    notes: list[str] = []
    dirs: dict[str, dict[str, int]] = {}
    for index, (concept, label) in enumerate(zip(concepts, _labels([c.class_data_dir for c in concepts]))):  # type: ignore[misc]
        folder: Path = concept.class_data_dir  # type: ignore[assignment]
        if group is None or group.main:  # (data parallel: rank 0 writes; the others read the folder after it)
            folder.mkdir(parents=True, exist_ok=True)
        short = fill_class_folder(system, folder, [concept.class_prompt] * count,  # type: ignore[list-item]
                                  seed=seed + index * _CONCEPT_SEED_OFFSET, size=size, steps=steps, progress=progress,
                                  group=group)
        if short:
            notes.append(f"{concept.where}: {short} class image(s) of {concept.class_prompt!r} generated into {folder} "
                         f"({count - short} there, {count} wanted)")
        files = class_image_files(folder)[:count]
        records.extend(ImageRecord(file, concept.class_prompt, 1, label, image_size(file)) for file in files)  # type: ignore[arg-type]
        dirs[label] = {"n_repeats": 1, "img_count": len(files)}
    return RegImages(records, len(records), dirs, notes, list(records))


def concepts_record(path: str | os.PathLike, concepts: Sequence[Concept], *, count: int | None = None) -> dict[str, Any]:
    """The concepts as plain values (the ``--resume`` record; JSON-able, folders absolute: a relative
    folder read from another current folder is other images)."""
    def absolute(folder: Path | None) -> str | None:
        return None if folder is None else str(Path(folder).resolve())

    return {"concepts_list": str(Path(path).resolve()), "class_images": count,
            "concepts": [{"instance_prompt": c.instance_prompt, "instance_data_dir": absolute(c.instance_data_dir),
                          "class_prompt": c.class_prompt, "class_data_dir": absolute(c.class_data_dir)} for c in concepts]}
