"""kohya's dataset TOML (``--dataset-config``) and fine-tuning metadata (``--in-json``).

**The dataset TOML** (kohya's ``library/config_util.py``): ``[general]`` options for everything,
``[[datasets]]`` blocks (each its resolution, batch size and buckets) and their ``[[datasets.subsets]]``
(each a folder of images with its own repeats, captions and options). A value is looked up in the
subset, then its dataset, then ``[general]``, then the run's own options (the flags / main TOML:
kohya's command-line arguments), then kohya's default — :func:`read_dataset_config` resolves every
subset so.

* A **DreamBooth-style subset** has ``image_dir`` (the images directly in it; ``N_name``
  sub-folders are not read, as kohya), ``num_repeats``, captions from ``NAME`` + ``caption_extension``
  beside each image or else ``class_tokens``, and ``is_reg = true`` for regularisation images (the
  prior data: :mod:`sdadapt.training.reg_data`, balanced against the training images by kohya's rule).
* A **fine-tuning subset** has ``metadata_file`` (kohya's metadata JSON or JSONL: image key →
  ``caption`` and ``tags``; the caption is ``caption + caption_separator + tags``) and
  ``image_dir`` for relative keys (a key is the file's stem, as kohya's ``merge_captions_to_metadata``
  writes it, or its name or path). A dataset is one kind or the other, as in kohya.

Caption options (shuffle, keep tokens, dropouts, prefix/suffix, wildcards, token warm-up …) may
differ per subset: each subset's images carry their own :class:`~sdadapt.training.data.CaptionOptions`
(:attr:`ImageRecord.captions`), and so may ``alpha_mask`` (kohya's masked loss by the alpha channel:
each record's :attr:`ImageRecord.alpha_mask`, :mod:`sdadapt.training.loss_masks`; the run's
``--alpha-mask`` is its fallback). ``flip_aug``, ``random_crop`` and ``color_aug`` are one setting of
the cached dataset, so the training subsets must agree on them (and the regularisation subsets among
themselves). Several ``[[datasets]]`` blocks are kohya's several datasets: each block's options
(:attr:`DatasetConfig.blocks`) bucket and batch its own subsets' images (:attr:`SubsetConfig.dataset`,
:attr:`~sdadapt.training.data.ImageRecord.dataset`, :attr:`~sdadapt.training.data.Dataset.batch_sizes`:
a batch never mixes blocks), its ``is_reg`` subsets balanced against its own training images, its
``validation_split`` / ``validation_seed`` its own. Unknown keys are an error naming the
closest one (and the block: ``datasets[1]``); kohya keys sdadapt cannot honour are refused when set.

**``--in-json FILE``** with ``--images DIR`` is kohya's fine-tuning data without a dataset TOML:
one fine-tuning subset (:func:`in_json_config`).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InputError
from ..images import IMAGE_SUFFIXES, ImageFolderError, is_image_file
from ..plurals import plural
from .data import (
    ASSEMBLY_BEFORE,
    ASSEMBLY_KOHYA,
    ASSEMBLY_KOHYA_2,
    EMPTIES_KEPT,
    FIRST_LINE_CAPTIONS,
    ImageRecord,
    find_images,
    image_size,
    kohya_folder_name,
)
from .face_crop import parse_face_crop_range
from .reg_data import RegImages, balance_reg_images

__all__ = [
    "SUBSET_CAPTION_KEYS",
    "DatasetConfig",
    "SubsetConfig",
    "dataset_records",
    "dataset_toml_has_reg",
    "dataset_toml_keys",
    "in_json_config",
    "kohya_bucket_range",
    "kohya_config_dataset_dirs",
    "kohya_datasets_metadata",
    "kohya_tag_frequency",
    "metadata_caption",
    "read_config_table",
    "read_dataset_config",
    "read_metadata_file",
    "record_changes",
    "subset_records",
    "toml_reader",
]

#: subset keys that are caption options (kohya's names; each subset may set its own)
SUBSET_CAPTION_KEYS = ("shuffle_caption", "keep_tokens", "caption_separator", "keep_tokens_separator",
                       "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
                       "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                       "token_warmup_min", "token_warmup_step")
#: the image augmentations: one setting per cached dataset
_AUGMENT_KEYS = ("flip_aug", "random_crop", "color_aug")

# kohya's schema (config_util.ConfigSanitizer), value kinds: "bool", "int", "number", "text", "table",
# "pair" (two numbers), "resolution" (one int or two)
_SUBSET_COMMON = {"color_aug": "bool", "face_crop_aug_range": "pair", "flip_aug": "bool", "num_repeats": "int",
                  "random_crop": "bool", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "text",
                  "secondary_separator": "text", "caption_separator": "text", "enable_wildcard": "bool",
                  "token_warmup_min": "int", "token_warmup_step": "number", "caption_prefix": "text",
                  "caption_suffix": "text", "custom_attributes": "table", "resize_interpolation": "text",
                  "caption_dropout_every_n_epochs": "int", "caption_dropout_rate": "number",
                  "caption_tag_dropout_rate": "number"}
_DREAMBOOTH_SHARED = {"caption_extension": "text", "class_tokens": "text", "cache_info": "bool"}
_DREAMBOOTH_OWN = {"image_dir": "text", "is_reg": "bool", "alpha_mask": "bool", "conditioning_data_dir": "text"}
_FINETUNE_OWN = {"metadata_file": "text", "image_dir": "text", "alpha_mask": "bool"}
_DATASET_OWN = {"batch_size": "int", "bucket_no_upscale": "bool", "bucket_reso_steps": "int", "enable_bucket": "bool",
                "max_bucket_reso": "int", "min_bucket_reso": "int", "validation_seed": "int", "validation_split": "number",
                "resolution": "resolution", "network_multiplier": "number", "resize_interpolation": "text"}
_GENERAL = {**_DATASET_OWN, **_SUBSET_COMMON, **_DREAMBOOTH_SHARED}

#: kohya's defaults (config_util's *Params dataclasses), used when neither the file nor the run gives a value
_KOHYA_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0, "keep_tokens_separator": "",
    "secondary_separator": None, "enable_wildcard": False, "color_aug": False, "flip_aug": False,
    "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None, "caption_suffix": None,
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None, "validation_seed": 0,
    "validation_split": 0.0, "resize_interpolation": None, "is_reg": False, "class_tokens": None,
    "caption_extension": ".caption", "cache_info": False, "alpha_mask": False, "resolution": None,
    "network_multiplier": 1.0, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
}

#: kohya keys refused when set to anything but kohya's default: why, and what to do
_REFUSED = {
    "network_multiplier": "one network multiplier (1) for every dataset here; leave it out",
}
#: kohya keys that change nothing here: the note said
_NOTED = {
    "cache_info": "image sizes are read from the file headers",
    "custom_attributes": "not used by Stable Diffusion training",
}

#: the dataset block's keys -> TrainOptions names (the rest keep their names)
_DATASET_OPTION_NAMES = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                         "bucket_reso_steps", "bucket_no_upscale")


def _absolute(path: Path | None) -> str | None:
    """``path`` made absolute (from the current folder, symbolic links followed), as text."""
    return None if path is None else str(Path(path).resolve())


@dataclass(frozen=True)
class SubsetConfig:
    """One subset, every value resolved (subset → dataset → general → the run's options → kohya's default).

    Attributes:
        where: where it is written (``"datasets[0].subsets[1]"``, ``"--in-json"``), for messages.
        image_dir: the images' folder (DreamBooth-style; fine-tuning: the base of relative keys).
        metadata_file: the metadata JSON/JSONL of a fine-tuning subset (``None``: DreamBooth-style).
        is_reg: regularisation images (the prior data).
        num_repeats: how often each image is seen per epoch (before balancing, for ``is_reg``).
        class_tokens: caption of images without a caption file (DreamBooth-style; a training
            subset falls back to the run's ``class_tokens`` (``--prompt``), an ``is_reg`` subset
            only to the file's own values).
        caption_extension: the caption files' suffix (with its dot).
        captions: the caption options, kohya's names (:data:`SUBSET_CAPTION_KEYS`) → values.
        flip_aug, random_crop, color_aug: the image augmentations.
        face_crop_aug_range: kohya's face crop (LO, HI) (:mod:`sdadapt.training.face_crop`), ``None``: off.
        alpha_mask: kohya's per-subset ``alpha_mask``: the subset's images weigh their loss by their
            alpha channel (:mod:`sdadapt.training.loss_masks`; the run's ``--alpha-mask`` is the
            fallback, so a subset's ``false`` beats it); the others' masks are all ones.
        resize_interpolation: kohya's per-subset (or dataset / ``[general]``) ``resize_interpolation``
            (:mod:`sdadapt.resampling`; the run's ``--resize-interpolation`` is the fallback);
            ``None``: sdadapt's scaling.
        dataset: the index of its ``[[datasets]]`` block (its resolution, batch size and buckets:
            :attr:`DatasetConfig.blocks`).
        conditioning_data_dir: kohya's subset ``conditioning_data_dir``: with ``masked_loss``, the folder of its
            images' mask images (the red channel weighs the loss; :mod:`sdadapt.training.loss_masks`); ``None``: none.
    """

    where: str
    image_dir: Path | None
    metadata_file: Path | None
    is_reg: bool
    num_repeats: int
    class_tokens: str | None
    caption_extension: str
    captions: dict[str, Any]
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    dataset: int = 0
    conditioning_data_dir: Path | None = None

    @property
    def label(self) -> str:
        """kohya's name of the subset in ``ss_dataset_dirs`` / ``ss_tag_frequency``: the folder's or
        the metadata file's name (``image_dir = "."``: the current folder's name, as ``--images .``)."""
        if self.metadata_file is not None:
            return Path(str(self.metadata_file)).name
        return kohya_folder_name(self.image_dir)

    def record(self) -> dict[str, Any]:
        """The subset as plain values (the ``--resume`` record; JSON-able). Paths are absolute: a
        relative ``image_dir`` read from another current folder is other images."""
        return {"where": self.where, "image_dir": _absolute(self.image_dir),
                "metadata_file": _absolute(self.metadata_file), "is_reg": self.is_reg,
                "num_repeats": self.num_repeats, "class_tokens": self.class_tokens,
                "caption_extension": self.caption_extension, "captions": dict(self.captions),
                "flip_aug": self.flip_aug, "random_crop": self.random_crop, "color_aug": self.color_aug,
                **({"face_crop_aug_range": list(self.face_crop_aug_range)}  # (when set: older records lack it)
                   if self.face_crop_aug_range is not None else {}),
                **({"alpha_mask": True} if self.alpha_mask else {}),  # (the same)
                **({"resize_interpolation": self.resize_interpolation} if self.resize_interpolation else {}),
                **({"dataset": self.dataset} if self.dataset else {}),  # (the same)
                **({"conditioning_data_dir": _absolute(self.conditioning_data_dir)}
                   if self.conditioning_data_dir is not None else {})}


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset TOML (or ``--in-json``) resolved.

    Attributes:
        source: the file read.
        subsets: the subsets used, in order (duplicates and ``num_repeats < 1`` left out, as kohya).
        options: the run options the dataset block decides (``TrainOptions`` names: ``resolution``
            as (height, width), ``batch_size``, ``enable_bucket``, ``min_bucket_reso``,
            ``max_bucket_reso``, ``bucket_reso_steps``, ``bucket_no_upscale``, and the training
            subsets' ``flip_aug`` / ``random_crop`` / ``color_aug``).
        reg_augment: the regularisation subsets' ``flip_aug`` / ``random_crop`` / ``color_aug``.
        finetuning: the first block's subsets are fine-tuning ones (``metadata_file``) rather than
            DreamBooth-style ones (each block is one kind; each subset's own: its ``metadata_file``).
        notes: what was skipped or changes nothing here.
        blocks: kohya's several ``[[datasets]]`` blocks: each block's own :attr:`options` (its
            ``resolution``, ``batch_size`` and bucket settings; :attr:`options` has the first's), in
            file order (:attr:`SubsetConfig.dataset` indexes it). Empty: one block.
    """

    source: Path
    subsets: tuple[SubsetConfig, ...]
    options: dict[str, Any]
    reg_augment: dict[str, bool] = field(default_factory=dict)
    finetuning: bool = False
    notes: tuple[str, ...] = ()
    blocks: tuple[dict[str, Any], ...] = ()

    @property
    def train_subsets(self) -> tuple[SubsetConfig, ...]:
        return tuple(s for s in self.subsets if not s.is_reg)

    def record(self) -> dict[str, Any]:
        """What decides the images and their draws (the ``--resume`` record; JSON-able)."""
        def plain(options: Mapping[str, Any]) -> dict[str, Any]:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}

        return {"source": _absolute(self.source), "subsets": [s.record() for s in self.subsets],
                "options": plain(self.options),
                **({"blocks": [plain(b) for b in self.blocks]} if self.blocks else {})}  # (one block: as before)


def record_changes(before: Any, after: Any, *, at: str = "") -> list[str]:
    """What differs between two :meth:`DatasetConfig.record` values (as JSON reads them back), one
    ``"subsets[0].num_repeats 3 (now 4)"`` per changed value (``--resume``'s message)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in dict.fromkeys([*before, *after])
                for change in record_changes(before.get(key), after.get(key), at=f"{at}.{key}" if at else str(key))]
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{at}: {plural(len(before), 'entry', many='entries')} (now {len(after)})"]
        return [change for i, (b, a) in enumerate(zip(before, after)) for change in record_changes(b, a, at=f"{at}[{i}]")]
    return [] if before == after else [f"{at or 'the dataset'} {before!r} (now {after!r})"]


def dataset_toml_keys(path: Any) -> set[str]:
    """The keys a kohya dataset TOML (or JSON) at ``path`` sets anywhere: its ``[general]``, ``[[datasets]]`` and their
    subsets' (what it decides over the run's options; the run report's kohya-defaults line leaves them out). Empty
    without one or when it cannot be read (the run reads it and reports that)."""
    if not path:
        return set()
    try:
        data = read_config_table(path, flag="--dataset-config", allow_json=True)
    except (OSError, ValueError, ImportError):
        return set()
    keys = set(data.get("general", {})) if isinstance(data.get("general"), dict) else set()
    for dataset in data.get("datasets", []) if isinstance(data.get("datasets"), list) else []:
        if isinstance(dataset, dict):
            keys |= set(dataset)
            for subset in dataset.get("subsets", []) if isinstance(dataset.get("subsets"), list) else []:
                keys |= set(subset) if isinstance(subset, dict) else set()
    return keys


def dataset_toml_has_reg(path: Any) -> bool:
    """Whether the kohya dataset TOML (or JSON) at ``path`` has an ``is_reg = true`` subset (its class images, the
    only ones kohya reads beside a dataset config). False without one or when it cannot be read (the run reads it
    and reports that)."""
    if not path:
        return False
    try:
        data = read_config_table(path, flag="--dataset-config", allow_json=True)
    except (OSError, ValueError, ImportError):
        return False
    datasets = data.get("datasets", []) if isinstance(data.get("datasets"), list) else []
    return any(isinstance(subset, dict) and subset.get("is_reg") is True
               for dataset in datasets if isinstance(dataset, dict)
               for subset in (dataset.get("subsets", []) if isinstance(dataset.get("subsets"), list) else []))


def read_config_table(path: str | os.PathLike, *, flag: str, allow_json: bool = False) -> dict:
    """A TOML file as a dict (``allow_json``: a ``.json`` file as JSON, as kohya's ``load_user_config``
    reads a dataset config); ``flag`` names the option in the messages (``--config``, ``--dataset-config``).

    Raises:
        FileNotFoundError: no such file.
        InputError: not UTF-8 text, or not valid TOML / JSON.
        ImportError: Python 3.10 without ``tomli``.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {file}: no such file")
    if allow_json and file.suffix.lower() == ".json":
        try:
            return json.loads(_utf8_text(file, flag=flag))
        except json.JSONDecodeError as exc:
            raise InputError(f"{flag} {file}: not valid JSON ({exc})") from None
    tomllib = toml_reader(f"{flag} TOML files")
    try:
        return tomllib.loads(_utf8_text(file, flag=flag))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{flag} {file}: not valid TOML ({exc})") from None


def toml_reader(what: str) -> ModuleType:
    """The TOML reader: ``tomllib`` (Python 3.11+), or on Python 3.10 ``tomli`` (the same API, ``loads`` and
    ``TOMLDecodeError``). ``what`` names what is read, in the error.

    Raises:
        ImportError: Python 3.10 without ``tomli``.
    """
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ImportError(f"reading {what} on Python 3.10 needs tomli: pip install tomli (Python 3.11+ "
                              "reads TOML itself)") from None
    return tomllib


def _utf8_text(file: Path, *, flag: str = "") -> str:
    """The text of ``file`` decoded as UTF-8 (its bytes as they are, line ends too: what ``tomllib.load``
    reads), as kohya opens its dataset configs, metadata and prompt files (``flag``: the option that named it).

    Raises:
        InputError: ``file`` is not UTF-8 text (naming it, where the first bad byte is, and the fix).
    """
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag + ' ' if flag else ''}{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                         "it as UTF-8 (kohya reads UTF-8 only too)") from None


def _checked(value: Any, kind: str, where: str) -> Any:
    """``value`` of kohya's schema ``kind``, converted (resolution: kohya's (width, height))."""
    def fail(what: str) -> InputError:
        return InputError(f"{where}: must be {what}, got {value!r}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("a whole number")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise fail("text (in quotes)")
        return value
    if kind == "table":
        if not isinstance(value, dict):
            raise fail("a table")
        return value
    if kind == "pair":
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                    for v in value)):
            raise fail("two numbers, e.g. [0.4, 0.6]")
        return tuple(value)
    if kind == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (value[0], value[1])
        raise fail("SIZE or [WIDTH, HEIGHT] (whole numbers, e.g. 512 or [768, 512])")
    raise AssertionError(kind)  # pragma: no cover


def _check_keys(table: Mapping[str, Any], schema: Mapping[str, str], where: str, source: str, *,
                extra: Sequence[str] = ()) -> dict[str, Any]:
    """The table's values checked against ``schema``; an unknown key is an error naming the closest."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra:
            continue
        if key == "conditioning_data_dir" and key not in schema:  # (kohya's: a subset's own, masked loss / ControlNet)
            raise InputError(f"{source}: {where}.conditioning_data_dir: kohya reads a subset's own mask folder (its "
                             "masked loss); write it in a [[datasets.subsets]] block")
        if key not in schema:
            close = difflib.get_close_matches(key, sorted(set(schema) | set(extra)), n=1)
            raise InputError(f"{source}: unknown key {key!r} in {where}" + (f"; did you mean {close[0]}?" if close else "")
                             + f" (its keys: {', '.join(sorted(set(schema) | set(extra)))})")
        out[key] = _checked(value, schema[key], f"{source}: {where}.{key}")
    return out


def read_dataset_config(path: str | os.PathLike, *, fallback: Mapping[str, Any]) -> DatasetConfig:
    """Read and resolve a kohya dataset TOML (or its JSON form); no image is read yet.

    Args:
        path: the file (``.toml``, or ``.json`` as kohya's ``load_user_config`` reads).
        fallback: the run's own values by kohya's names (kohya's command-line arguments: the last
            place looked before kohya's default). A key absent from it and not kohya's default in
            the file is refused (sdadapt has no such option); ``resolution`` is (width, height).

    Raises:
        InputError: an unknown key (naming the closest), a value of the wrong kind, a missing
            ``image_dir`` / ``metadata_file``, DreamBooth-style and fine-tuning subsets in one
            dataset, a kohya option sdadapt cannot honour, or subsets that disagree on ``flip_aug`` /
            ``random_crop`` / ``color_aug`` (every message names the block, ``datasets[1]``, and the
            subset).
        FileNotFoundError: no such file.
    """
    file = Path(path)
    source = f"--dataset-config {file}"
    raw = read_config_table(file, flag="--dataset-config", allow_json=True)
    if not isinstance(raw, dict):
        raise InputError(f"{source}: the file must be a table with [general] and [[datasets]]")
    for key in raw:
        if key not in ("general", "datasets"):
            close = difflib.get_close_matches(key, ["general", "datasets"], n=1)
            raise InputError(f"{source}: unknown top-level key {key!r}" + (f"; did you mean {close[0]}?" if close else "")
                             + " (a dataset TOML has [general] and [[datasets]] with [[datasets.subsets]]; the training "
                             "options go in --config)")
    general_raw = raw.get("general", {})
    if not isinstance(general_raw, dict):
        raise InputError(f"{source}: [general] must be a table")
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise InputError(f"{source}: datasets must be [[datasets]] tables")
    if not datasets:
        raise InputError(f"{source}: no [[datasets]] block; add one with [[datasets.subsets]] image_dir = '...'")
    general = _check_keys(general_raw, _GENERAL, "[general]", source)
    notes: list[str] = []

    def look(name: str, tables: Sequence[tuple[str, dict]]) -> tuple[Any, str | None]:
        for where, table in tables:
            if name in table:
                return table[name], where
        return None, None

    def resolve(name: str, tables: Sequence[tuple[str, dict]]) -> Any:
        value, where = look(name, tables)
        if where is not None:
            if name in _REFUSED and value != _KOHYA_DEFAULTS[name]:
                raise InputError(f"{source}: {where}.{name} = {value!r}: {_REFUSED[name]}")
            if name in _NOTED and value != _KOHYA_DEFAULTS[name]:
                note = f"{where}.{name}: ignored ({_NOTED[name]})"
                if note not in notes:
                    notes.append(note)
            if name not in fallback and name not in _REFUSED and name not in _NOTED and name not in _DREAMBOOTH_OWN \
                    and name not in _FINETUNE_OWN and name != "caption_separator" and value != _KOHYA_DEFAULTS.get(name):
                raise InputError(f"{source}: {where}.{name} = {value!r}: this kohya option is not supported by sdadapt "
                                 "yet; leave it out")
            return value
        return fallback[name] if name in fallback else _KOHYA_DEFAULTS.get(name)

    def unset(name: str, flag: str, tables: Sequence[tuple[str, dict]]) -> None:
        """Note (once) a key the file leaves to the run whose value there is not kohya's default: kohya's command line
        defaults differ from sdadapt's (``.caption`` files, batch size 1, no buckets)."""
        if look(name, tables)[1] is None and name in fallback and fallback[name] not in (None, _KOHYA_DEFAULTS[name]):
            note = (f"{name} is not in the file: the run's {fallback[name]!r} ({flag}) applies, where kohya's default "
                    f"would be {_KOHYA_DEFAULTS[name]!r}; write {name} in the TOML to train as kohya would either way")
            if note not in notes:
                notes.append(note)

    blocks: list[dict[str, Any]] = []
    kinds: list[bool] = []
    subsets: list[SubsetConfig] = []
    for index, dataset_raw in enumerate(datasets):
        block = f"datasets[{index}]"
        subsets_raw = dataset_raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw) or not subsets_raw:
            raise InputError(f"{source}: {block} has no [[datasets.subsets]]; add one with image_dir = 'FOLDER'")
        with_metadata = ["metadata_file" in s for s in subsets_raw]
        finetuning = all(with_metadata)
        if any(with_metadata) and not finetuning:
            raise InputError(f"{source}: {block} mixes DreamBooth-style subsets (image_dir) and fine-tuning subsets "
                             "(metadata_file); kohya refuses the same: give each kind its own [[datasets]] block, list "
                             "every image in the metadata, or give every subset an image_dir with caption files")
        kinds.append(finetuning)
        dataset_schema = {**_DATASET_OWN, **_SUBSET_COMMON, **({} if finetuning else _DREAMBOOTH_SHARED)}
        dataset = _check_keys(dataset_raw, dataset_schema, block, source, extra=("subsets",))
        subset_schema = {**_SUBSET_COMMON, **(_FINETUNE_OWN if finetuning else {**_DREAMBOOTH_SHARED, **_DREAMBOOTH_OWN})}
        subset_tables = [_check_keys(s, subset_schema, f"{block}.subsets[{i}]", source) for i, s in enumerate(subsets_raw)]
        required = "metadata_file" if finetuning else "image_dir"
        for i, table in enumerate(subset_tables):
            if required not in table:
                raise InputError(f"{source}: {block}.subsets[{i}] has no {required} (each "
                                 + ("fine-tuning subset names its metadata JSON" if finetuning else
                                    "DreamBooth-style subset names its folder of images, e.g. image_dir = 'img/dog'") + ")")
        dataset_tables = [(block, dataset), ("[general]", general)]
        options: dict[str, Any] = {}
        for name in _DATASET_OPTION_NAMES:
            value = resolve(name, dataset_tables)
            if name == "resolution" and value is not None:
                value = (int(value[1]), int(value[0]))  # kohya's (width, height) -> (height, width)
            options[name] = value
        for name in ("validation_split", "validation_seed"):  # kohya's dataset-level split (TrainOptions names), when given
            if look(name, dataset_tables)[1] is not None or len(datasets) > 1:  # (several: each block's own, resolved)
                options[name] = resolve(name, dataset_tables)
        resolve("network_multiplier", dataset_tables)  # (refused when set)
        for name, flag in (("batch_size", "--batch-size"), ("enable_bucket", "--enable-bucket")):
            unset(name, flag, dataset_tables)
        _interpolation(resolve("resize_interpolation", dataset_tables), where=f"{source}: {block}")
        blocks.append(options)

        from ..config_paths import config_path

        seen: set[str] = set()  # (kohya drops a repeated subset within a dataset; another dataset may use it again)
        for i, table in enumerate(subset_tables):
            where = f"{block}.subsets[{i}]"
            tables = [(where, table), *dataset_tables]
            for name in ("cache_info", "custom_attributes"):
                resolve(name, tables)
            faces = parse_face_crop_range(resolve("face_crop_aug_range", tables), source=f"{source}: {where}.face_crop_aug_range")
            repeats = resolve("num_repeats", tables)
            image_dir, metadata = (None if table.get(key) is None else config_path(str(table[key]), where=f"{source}: "
                                                                                  f"{where}.{key}")
                                   for key in ("image_dir", "metadata_file"))
            identity = str(metadata if finetuning else image_dir)
            if identity in seen:
                notes.append(f"{where}: ignored, it repeats {'metadata_file' if finetuning else 'image_dir'} {identity!r} of an "
                             "earlier subset (kohya uses the first one)")
                continue
            if repeats < 1:
                notes.append(f"{where}: ignored, num_repeats = {repeats} (kohya skips subsets with fewer than 1 repeat)")
                continue
            seen.add(identity)
            extension = str(resolve("caption_extension", tables) or ".caption") if not finetuning else ".caption"
            if not finetuning:
                unset("caption_extension", "--caption-extension", tables)
            if extension and not extension.startswith("."):
                extension = "." + extension  # (kohya adds the dot)
            is_reg = bool(table.get("is_reg", False))
            if finetuning:
                class_tokens = None
            elif is_reg:  # the file's own only: the run's --prompt (the trained subject's words) never captions prior images
                class_tokens = look("class_tokens", tables)[0]
            else:
                class_tokens = resolve("class_tokens", tables)
            subsets.append(SubsetConfig(
                where=where, image_dir=Path(image_dir) if image_dir is not None else None,
                metadata_file=Path(metadata) if metadata is not None else None, is_reg=is_reg,
                num_repeats=repeats, class_tokens=class_tokens or None, caption_extension=extension,
                captions={name: resolve(name, tables) for name in SUBSET_CAPTION_KEYS},
                **{name: bool(resolve(name, tables)) for name in _AUGMENT_KEYS}, face_crop_aug_range=faces,
                alpha_mask=bool(resolve("alpha_mask", tables)),
                resize_interpolation=_interpolation(resolve("resize_interpolation", tables), where=f"{source}: {where}"),
                dataset=index, conditioning_data_dir=(
                    Path(config_path(str(table["conditioning_data_dir"]), where=f"{source}: {where}.conditioning_data_dir"))
                    if table.get("conditioning_data_dir") else None)))
        if not any(not s.is_reg and s.dataset == index for s in subsets):
            raise InputError(f"{source}: {block} has no training subset (every subset is is_reg = true or ignored); add "
                             "one with the images to learn" + (", or leave the block out" if len(datasets) > 1 else ""))
    augment = _agreed(subsets, is_reg=False, source=source)
    options = {**blocks[0], **augment}  # (the run's: the first block's; each block's own in DatasetConfig.blocks)
    reg_augment = _agreed(subsets, is_reg=True, source=source) if any(s.is_reg for s in subsets) else {}
    return DatasetConfig(file, tuple(subsets), options, reg_augment, kinds[0], tuple(notes),
                         tuple(blocks) if len(blocks) > 1 else ())


def _interpolation(value: Any, *, where: str) -> str | None:
    """A ``resize_interpolation`` value checked (``None`` / ``""``: not given)."""
    if value is None or value == "":
        return None
    from ..resampling import check_interpolation

    try:
        return check_interpolation(value)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None


def _agreed(subsets: Sequence[SubsetConfig], *, is_reg: bool, source: str) -> dict[str, Any]:
    """The one ``flip_aug`` / ``random_crop`` / ``color_aug`` / ``face_crop_aug_range`` of the training (or
    regularisation) subsets."""
    group = [s for s in subsets if s.is_reg == is_reg]
    first = group[0]
    for subset in group[1:]:
        for name in (*_AUGMENT_KEYS, "face_crop_aug_range"):
            if getattr(subset, name) != getattr(first, name):
                kind = "regularisation" if is_reg else "training"
                raise InputError(f"{source}: {subset.where}.{name} = {str(getattr(subset, name)).lower()} but "
                                 f"{first.where} has {str(getattr(first, name)).lower()}: the {kind} images are one cached "
                                 f"dataset here, with one {name} setting; give every {kind} subset the same {name}")
    return {name: getattr(first, name) for name in (*_AUGMENT_KEYS, "face_crop_aug_range")}


def in_json_config(metadata_file: str | os.PathLike, *, image_dir: str | os.PathLike | None,
                   fallback: Mapping[str, Any]) -> DatasetConfig:
    """kohya's ``--in_json`` (with ``--train_data_dir``): one fine-tuning subset, every option the run's.

    Raises:
        FileNotFoundError: no such metadata file.
    """
    file = Path(metadata_file)
    if not file.is_file():
        raise FileNotFoundError(f"--in-json {file}: no such file (kohya's fine-tuning metadata JSON: image key -> "
                                "caption / tags)")
    value = {name: fallback.get(name, _KOHYA_DEFAULTS[name]) for name in SUBSET_CAPTION_KEYS}
    repeats = int(fallback.get("num_repeats", 1))
    subset = SubsetConfig(where="--in-json", image_dir=Path(image_dir) if image_dir is not None else None,
                          metadata_file=file, is_reg=False, num_repeats=repeats, class_tokens=None,
                          caption_extension=".caption", captions=value,
                          **{name: bool(fallback.get(name, False)) for name in _AUGMENT_KEYS},
                          face_crop_aug_range=parse_face_crop_range(fallback.get("face_crop_aug_range")),
                          alpha_mask=bool(fallback.get("alpha_mask", False)),
                          resize_interpolation=_interpolation(fallback.get("resize_interpolation"), where="--in-json"))
    options = {name: fallback.get(name) for name in _DATASET_OPTION_NAMES}
    if options["resolution"] is not None:
        options["resolution"] = (int(options["resolution"][1]), int(options["resolution"][0]))
    options.update({name: getattr(subset, name) for name in (*_AUGMENT_KEYS, "face_crop_aug_range")})
    return DatasetConfig(file, (subset,), options, {}, True, ())


def read_metadata_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """kohya's fine-tuning metadata: ``{image key: {"caption": ..., "tags": ...}}`` from a JSON file,
    or a JSONL file of ``{"image_path", "caption", "tags"}`` lines.

    Raises:
        InputError: not UTF-8 text, or not JSON / JSONL of that shape (naming the file and line).
    """
    file = Path(path)
    text = _utf8_text(file)
    if file.suffix.lower() == ".jsonl":
        out: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{file}:{number}: not a JSON line ({exc})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
                raise InputError(f"{file}:{number}: each line needs \"image_path\" (and \"caption\" / \"tags\")")
            out[entry["image_path"]] = {k: entry[k] for k in ("caption", "tags") if k in entry}
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{file}: kohya's metadata is a JSON object of image key -> {{\"caption\": ..., \"tags\": ...}}")
    return data


def _image_of(key: str, image_dir: Path | None, where: str) -> Path | None:
    """The image file a metadata key names: the path itself, or the key plus an image suffix (a stem)."""
    base = Path(key)
    if not base.is_absolute():
        if image_dir is None:
            raise InputError(f"{where}: image key {key!r} is a relative path, so the images' folder is needed: give "
                             "image_dir in the subset (--images DIR with --in-json), as kohya")
        base = image_dir / key
    if base.is_file() and base.suffix.lower() in IMAGE_SUFFIXES:
        return base
    for suffix in IMAGE_SUFFIXES:
        for candidate in (base.with_name(base.name + suffix), base.with_name(base.name + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def metadata_caption(caption: str, tags: str | None, *, separator: str = ",", wildcards: bool = False,
                     assembly: str = ASSEMBLY_KOHYA) -> tuple[str, bool]:
    """A fine-tuning metadata entry's caption as kohya's ``FineTuningDataset`` makes it, and whether it
    was cut (``(caption, cut)``: :attr:`~sdadapt.training.data.ImageRecord.suffix_cut`).

    Without ``wildcards``: ``caption + separator + tags`` (``tags`` alone for an empty caption; empty or
    no tags: the caption), cut to its first line (``cut``: it had several). With ``wildcards``: the tags'
    newlines made ``separator`` and ``separator + tags`` added to each non-empty caption line, the empty
    ones left out (``""`` when there is none: kohya's join, even with tags); without tags (``None``) the
    caption's lines as they are, empty ones too (kohya draws one of them, an empty one trains ``""``; a
    caption of empty lines only is empty, :func:`subset_records`).
    ``assembly`` :data:`~sdadapt.training.data.ASSEMBLY_KOHYA_2` (``train``'s new runs): the text as kohya
    makes it, white space as written (the tokenizers fold its runs to one space, so the model reads the same
    ids); :data:`~sdadapt.training.data.ASSEMBLY_KOHYA` (the default here, runs recorded before): white space
    inside each line folded to one space (each line stripped). :data:`~sdadapt.training.data.ASSEMBLY_BEFORE`
    (runs recorded before): an entry with only tags takes the tags, empty lines are left out, empty tags
    (``""``) add nothing, and ``cut`` is never set.
    """
    if assembly not in (ASSEMBLY_KOHYA, ASSEMBLY_BEFORE, ASSEMBLY_KOHYA_2):
        raise ValueError(f"assembly must be {ASSEMBLY_KOHYA!r} or {ASSEMBLY_BEFORE!r} (runs recorded before) or "
                         f"{ASSEMBLY_KOHYA_2!r}, got {assembly!r}")
    if assembly == ASSEMBLY_BEFORE:
        if wildcards:
            if tags:
                tags = tags.replace("\n", separator)
                caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip()) or tags
        elif tags:
            caption = f"{caption}{separator}{tags}" if caption else tags
        if not wildcards:
            caption = caption.split("\n")[0]
        return "\n".join(" ".join(line.split()) for line in caption.split("\n") if line.strip()), False
    cut = False
    if wildcards:
        if tags is not None:  # (kohya: "tags is not None", so "" adds a separator to each line too)
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    else:
        if tags:
            caption = f"{caption}{separator}{tags}" if caption else tags
        caption, *rest = caption.split("\n")
        cut = bool(rest)
    if assembly == ASSEMBLY_KOHYA_2:  # (kohya's FineTuningDataset keeps the text as the metadata has it)
        return caption, cut
    return "\n".join(" ".join(line.split()) for line in caption.split("\n")), cut


def subset_records(subset: SubsetConfig, *, uncaptioned: bool = False, source: str = "--dataset-config",
                   caption_lines: str = FIRST_LINE_CAPTIONS, empties: str = EMPTIES_KEPT,
                   assembly: str = ASSEMBLY_KOHYA) -> tuple[list[ImageRecord], list[str]]:
    """The images of one subset, with captions and repeats; each record's ``folder`` is the
    subset's :attr:`~SubsetConfig.label`.

    DreamBooth-style: the images directly in ``image_dir``, captioned by their caption file or else
    ``class_tokens``. Fine-tuning: the metadata's images, captioned ``caption + caption_separator +
    tags`` (as kohya; without ``enable_wildcard`` only the caption's first line). ``uncaptioned``: an
    image without any caption gets ``""`` (a trigger-word method's templates) instead of an error.
    ``caption_lines``, ``empties``: how a caption file of several lines and an empty caption are read
    (:func:`~sdadapt.training.data.find_images`). A metadata entry with a caption or tags whose
    caption comes out empty (an empty first line: ``"\nsecond line"``) trains on ``""``, as kohya's
    (``empties`` :data:`~sdadapt.training.data.EMPTIES_DROPPED`: refused, as runs recorded before); one
    with neither a caption nor tags is refused (kohya would train it on ``""`` too). ``assembly``: how an
    entry's caption and tags are put together (:func:`metadata_caption`).

    Raises:
        ImageFolderError: no such folder, no images, images without a caption, missing image files
            (naming the subset and the fix).
    """
    where = f"--in-json {subset.metadata_file}" if subset.where == "--in-json" else f"{source}: {subset.where}"
    wildcards = bool(subset.captions.get("enable_wildcard"))
    if subset.metadata_file is None:
        folder = subset.image_dir
        if folder is None or not folder.is_dir():
            raise ImageFolderError(f"{where}: image_dir {folder} is not a folder (a relative path is read from the "
                                   "current folder, as kohya)")
        if not any(is_image_file(p) for p in folder.iterdir()):
            # (kohya's DreamBoothDataset: "ignore subset with image_dir=...: no images found"; it is in no
            # ss_dataset_dirs / ss_datasets entry, its folder's ss_tag_frequency entry is empty) — but a folder
            # whose images sit in sub-folders (kohya's train_data_dir / reg_data_dir layout given as image_dir) is
            # a mistake a skip would hide (a reg subset would train without its class images)
            inner = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(
                is_image_file(q) for q in p.iterdir()))
            if inner:
                raise ImageFolderError(f"{where}: image_dir {folder} holds no images itself; its sub-folders "
                                       f"{', '.join(inner[:5])}{' ...' if len(inner) > 5 else ''} do: a subset is one "
                                       "folder — give each its own [[datasets.subsets]] image_dir (the N_name layout "
                                       "is --images / --reg-data-dir's)")
            return [], [f"{subset.where}: image_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): the subset "
                        "is skipped, as kohya skips it"]
        try:
            records, notes = find_images(folder, default_caption=subset.class_tokens, caption_extension=subset.caption_extension,
                                         repeats=subset.num_repeats, uncaptioned=uncaptioned, multiline=wildcards,
                                         subfolders=False, caption_lines=caption_lines, empties=empties)
        except ImageFolderError as exc:
            text = str(exc).replace("or pass --prompt for all of them", "or set class_tokens for the subset")
            raise ImageFolderError(f"{where}: {text}") from None
        for record in records:
            record.folder = subset.label
        skipped = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if skipped:
            notes.append(f"sub-folders not read ({', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}): a subset "
                         "is the images directly in image_dir, as kohya; give each folder its own subset")
        return records, [f"{subset.where}: {n}" for n in notes]
    if not subset.metadata_file.is_file():
        raise ImageFolderError(f"{where}: metadata_file {subset.metadata_file}: no such file (kohya's fine-tuning metadata "
                               "JSON; a relative path is read from the current folder, as kohya)")
    try:
        metadata = read_metadata_file(subset.metadata_file)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    separator = str(subset.captions.get("caption_separator") or ",")
    records: list[ImageRecord] = []
    missing: list[str] = []
    uncaptioned_keys: list[str] = []
    blank: list[str] = []
    for key, entry in metadata.items():
        caption = entry.get("caption") or ""
        tags = entry.get("tags")
        if not isinstance(caption, str) or not (tags is None or isinstance(tags, str)):
            raise InputError(f"{where}: {subset.metadata_file}: {key!r}: caption and tags must be text")
        given = bool(caption or tags)  # (kohya: the first line of caption + separator + tags, "" when it is empty)
        caption, cut = metadata_caption(caption, tags, separator=separator, wildcards=wildcards, assembly=assembly)
        if uncaptioned and not caption.strip():
            caption = ""  # (a trigger-word method's templates take the place of a caption of empty lines only)
        if wildcards and tags is not None:
            tags = tags.replace("\n", separator)  # (kohya's tags_list: as they went into the caption)
        image = _image_of(key, subset.image_dir, where)
        if image is None:
            missing.append(key)
            continue
        if not caption.strip() and given and empties == EMPTIES_KEPT:  # ("\n": kohya draws one of its empty lines)
            blank.append(key)
        elif not caption.strip() and not uncaptioned:
            uncaptioned_keys.append(key)
        # (kohya's tags_list: the tags as they went into the caption, "" when there are none)
        listed = tags or ""
        records.append(ImageRecord(image, caption, subset.num_repeats, subset.label, image_size(image), tags=listed,
                                   suffix_cut=cut))
    if missing:
        raise ImageFolderError(f"{where}: {len(missing)} image(s) of {subset.metadata_file} not found "
                               f"({', '.join(missing[:5])}) in {subset.image_dir}; a key is the image's stem, name or path")
    if uncaptioned_keys:
        raise ImageFolderError(f"{where}: {len(uncaptioned_keys)} image(s) of {subset.metadata_file} have neither a caption "
                               f"nor tags ({', '.join(uncaptioned_keys[:5])}); add them to the metadata")
    if not records:
        raise ImageFolderError(f"{where}: {subset.metadata_file} lists no images")
    notes = [f"{subset.where}: {len(blank)} image(s) of {subset.metadata_file} have an empty caption (its first line "
             f"is empty: {', '.join(blank[:3])}{', ...' if len(blank) > 3 else ''}): "
             + ("they count as uncaptioned" if uncaptioned else "they train on the empty caption") + ", as kohya's"] if blank else []
    return records, notes


def _labels(subsets: Sequence[SubsetConfig]) -> list[str]:
    """Each subset's label: its :attr:`~SubsetConfig.label`, a repeated one numbered `` (2)``,
    `` (3)`` … (kohya's ``ss_dataset_dirs`` names)."""
    labels: list[str] = []
    for subset in subsets:
        label, number = subset.label, 2
        while label in labels:
            label, number = f"{subset.label} ({number})", number + 1
        labels.append(label)
    return labels


def kohya_config_dataset_dirs(config: DatasetConfig, records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs`` with a dataset config (train_network.py's ``use_user_config`` branch):
    ``{name: {"n_repeats": N, "img_count": n}}`` of the training subsets only, in config order, each named by
    its folder's or metadata file's name (:attr:`SubsetConfig.label`), a repeated name numbered `` (2)``,
    `` (3)`` … among the training subsets (kohya leaves the ``is_reg`` subsets out of the numbering and
    the key, and writes no ``ss_reg_dataset_dirs`` then).

    Args:
        records: the training images (of :func:`dataset_records`: each one's ``folder`` its subset's
            label from there); ``img_count`` counts them per subset, a subset without any is left out.
    """
    counts: dict[str, int] = {}
    for record in records:
        counts[record.folder] = counts.get(record.folder, 0) + 1
    out: dict[str, dict[str, int]] = {}
    for subset, label in zip(config.subsets, _labels(config.subsets)):
        if subset.is_reg or label not in counts:
            continue
        key, number = subset.label, 2
        while key in out:
            key, number = f"{subset.label} ({number})", number + 1
        out[key] = {"n_repeats": subset.num_repeats, "img_count": counts[label]}
    return out


def dataset_records(config: DatasetConfig, *, uncaptioned: bool = False,
                    kept: Callable[[list[ImageRecord]], list[ImageRecord]] | None = None,
                    caption_lines: str = FIRST_LINE_CAPTIONS, empties: str = EMPTIES_KEPT,
                    assembly: str = ASSEMBLY_KOHYA) -> tuple[
        list[ImageRecord], RegImages | None, dict[str, SubsetConfig], list[str]]:
    """Every subset's images: ``(training records, regularisation images, subsets by label, notes)``.

    The regularisation subsets' images are balanced against the training samples (images x
    repeats) by kohya's rule (:func:`sdadapt.training.reg_data.balance_reg_images`), as one list in
    subset order. Each record's ``folder`` is its subset's label (the folder's or metadata file's
    name; a repeated name gets `` (2)``, `` (3)`` … as kohya's ``ss_dataset_dirs``), the key of the
    returned ``{label: subset}``. ``uncaptioned``: training images without any caption get ``""``
    (a trigger-word method's templates) instead of an error. Each record's
    :attr:`~sdadapt.training.data.ImageRecord.dataset` is its subset's block; several blocks'
    regularisation images are balanced each against its own block's training samples, as kohya's
    datasets. ``kept(training records)``: those of
    them that will train, which the regularisation images are balanced against (kohya's
    ``validation_split`` holds images out before it counts; default: all). ``caption_lines``,
    ``empties``: how a caption file of several lines and an empty caption are read
    (:func:`~sdadapt.training.data.find_images`); ``assembly``: how a fine-tuning entry's caption and
    tags are put together (:func:`metadata_caption`).

    Raises:
        ImageFolderError: see :func:`subset_records`.
    """
    source = (f"--in-json {config.source}" if config.subsets and config.subsets[0].where == "--in-json"
              else f"--dataset-config {config.source}")
    notes = list(config.notes)
    by_label: dict[str, SubsetConfig] = {}
    train: list[ImageRecord] = []
    reg_records: list[ImageRecord] = []
    for subset, label in zip(config.subsets, _labels(config.subsets)):
        records, subset_notes = subset_records(subset, uncaptioned=uncaptioned and not subset.is_reg, source=source,
                                               caption_lines=caption_lines, empties=empties, assembly=assembly)
        by_label[label] = subset
        for record in records:
            record.folder = label
            record.alpha_mask = subset.alpha_mask  # (kohya's per-subset alpha_mask: loss_masks reads it)
            record.mask_folder = subset.conditioning_data_dir  # (kohya's per-subset mask folder, with masked_loss)
            record.interpolation = subset.resize_interpolation  # (kohya's per-subset resize_interpolation)
            record.dataset = subset.dataset  # (its [[datasets]] block: bucketed and batched with its block only)
        (reg_records if subset.is_reg else train).extend(records)
        notes.extend(subset_notes)
    if not train:
        raise ImageFolderError(f"{source}: no training images: every training subset's image_dir is empty (kohya "
                               "stops on it too); put images in one")
    reg = None
    counted = (train if kept is None else kept(train)) if reg_records else train
    with_training = {r.dataset for r in counted}
    for block in dict.fromkeys(r.dataset for r in reg_records if r.dataset not in with_training):
        # (kohya balances class images per dataset against its training images: none there, none used; it warns)
        notes.append(f"{source}: datasets[{block}] has no training images, so its class images (is_reg subsets) are "
                     "not used, as kohya leaves them out")
    reg_records = [r for r in reg_records if r.dataset in with_training]
    if reg_records:
        # kohya balances each dataset's regularisation images against that dataset's training images
        parts = [balance_reg_images([r for r in reg_records if r.dataset == block],
                                    train_samples=sum(r.repeats for r in counted if r.dataset == block),
                                    source=f"{source}: datasets[{block}]" if config.blocks else source)
                 for block in dict.fromkeys(r.dataset for r in reg_records)]
        reg = parts[0] if len(parts) == 1 else RegImages(
            [r for part in parts for r in part.records], sum(part.samples for part in parts),
            {k: v for part in parts for k, v in part.dirs.items()}, [n for part in parts for n in part.notes],
            [r for part in parts for r in part.found])
        notes.extend(reg.notes)
    return train, reg, by_label, notes


def kohya_datasets_metadata(config: DatasetConfig, dataset: Any, reg: RegImages | None, *, batch_size: int,
                            resolution: tuple[int, int],
                            blocks: Sequence[tuple[int, tuple[int, int]]] = ()) -> list[dict[str, Any]]:
    """kohya's ``ss_datasets`` (train_network.py with a dataset config): one entry per ``[[datasets]]``
    block with its subsets (``img_count``, ``num_repeats``, the augmentations and caption options, the
    folder's or metadata file's name, ``class_tokens`` / ``is_reg``), its batch size, resolution,
    buckets (``bucket_info``) and ``tag_frequency``.

    Args:
        dataset: the training :class:`~sdadapt.training.data.Dataset` (buckets planned; each record's
            :attr:`~sdadapt.training.data.ImageRecord.dataset` its block).
        reg: the regularisation images (``None``: none).
        batch_size, resolution: the (one) block's batch size and (height, width) of training.
        blocks: several blocks (:attr:`DatasetConfig.blocks`): each one's ``(batch size, (height, width))``
            as trained, in order, in place of ``batch_size`` / ``resolution``.
    """
    from .data import Dataset, tag_frequency_of

    counts: dict[str, int] = {}
    for record in [*dataset.records, *(reg.records if reg is not None else ())]:
        counts[record.folder] = counts.get(record.folder, 0) + 1
    reg_counts = dict(reg.dirs) if reg is not None else {}
    sizes = list(blocks) if config.blocks else [(batch_size, resolution)]
    options = list(config.blocks) if config.blocks else [config.options]
    entries: list[dict[str, Any]] = [{"subsets": []} for _ in sizes]
    for subset, label in zip(config.subsets, _labels(config.subsets)):
        if label not in counts and label not in reg_counts:
            continue  # (kohya's datasets leave a subset without images out of their subsets)
        own = subset.captions
        entry: dict[str, Any] = {
            "img_count": reg_counts.get(label, {}).get("img_count", counts.get(label, 0)) if subset.is_reg else counts.get(label, 0),
            "num_repeats": subset.num_repeats, "color_aug": subset.color_aug, "flip_aug": subset.flip_aug,
            "random_crop": subset.random_crop, "shuffle_caption": bool(own.get("shuffle_caption")),
            "keep_tokens": own.get("keep_tokens", 0), "keep_tokens_separator": own.get("keep_tokens_separator", ""),
            "secondary_separator": own.get("secondary_separator"), "enable_wildcard": bool(own.get("enable_wildcard")),
            "caption_prefix": own.get("caption_prefix"), "caption_suffix": own.get("caption_suffix"),
            "resize_interpolation": None}
        if subset.image_dir is not None:
            entry["image_dir"] = subset.image_dir.name
        if subset.metadata_file is not None:  # (a block is one kind: kohya's FineTuningDataset)
            entry["metadata_file"] = subset.metadata_file.name
        else:
            entry["class_tokens"] = subset.class_tokens
            entry["is_reg"] = subset.is_reg
        entries[subset.dataset]["subsets"].append(entry)
        if subset.is_reg:  # kohya's num_reg_images: the block's images x repeats, before balancing
            entries[subset.dataset]["reg"] = entries[subset.dataset].get("reg", 0) + (
                reg_counts.get(label, {}).get("img_count", 0) * subset.num_repeats)
    folder_of = {label: subset.label for subset, label in zip(config.subsets, _labels(config.subsets))}
    out = []
    for block, ((size, (height, width)), own, entry) in enumerate(zip(sizes, options, entries)):
        part = Dataset([r for r in dataset.records if r.dataset == block], captions=dataset.captions)
        finetuning = any("metadata_file" in s for s in entry["subsets"])
        low, high = kohya_bucket_range(own, [r.bucket for r in part.records])
        out.append({"is_dreambooth": not finetuning, "batch_size_per_device": size,
                    "num_train_images": part.samples_per_epoch,
                    "num_reg_images": (reg.samples if reg is not None else 0) if not config.blocks else entry.get("reg", 0),
                    "resolution": [width, height], "enable_bucket": bool(own.get("enable_bucket")),
                    "min_bucket_reso": low, "max_bucket_reso": high,
                    "tag_frequency": _by_folder(tag_frequency_of([*part.records, *(  # kohya counts is_reg subsets too
                        r for r in (reg.found if reg is not None else ()) if r.dataset == block)],
                        templates=dataset.captions.templates), folder_of,
                        folders=[s.label for s in config.subsets if s.dataset == block]),
                    "bucket_info": part.bucket_info(),
                    "resize_interpolation": None, "subsets": entry["subsets"]})
    return out


def kohya_bucket_range(options: Mapping[str, Any], buckets: Sequence[tuple[int, int]]) -> tuple[int | None, int | None]:
    """kohya's dataset ``min_bucket_reso`` / ``max_bucket_reso`` (``BaseDataset``; its metadata's
    ``ss_min_bucket_reso`` / ``ss_max_bucket_reso`` and ``ss_datasets`` entries): the configured values
    (``options``' ``min_bucket_reso`` / ``max_bucket_reso``, ``enable_bucket``, ``bucket_reso_steps``)
    moved onto the bucket step (the minimum down, the maximum up); ``(None, None)`` without buckets. A limit nobody set (sdadapt's own default, from the resolution) is the smallest / largest
    side of the (height, width) ``buckets`` in use."""
    if not options.get("enable_bucket"):
        return None, None
    step = int(options.get("bucket_reso_steps") or _KOHYA_DEFAULTS["bucket_reso_steps"])
    low, high = options.get("min_bucket_reso"), options.get("max_bucket_reso")
    low = int(low) - int(low) % step if low is not None else min((min(b) for b in buckets), default=None)
    high = int(high) + (-int(high)) % step if high is not None else max((max(b) for b in buckets), default=None)
    return low, high


def _by_folder(frequency: Mapping[str, Mapping[str, int]], folder_of: Mapping[str, str], *,
               folders: Sequence[str] = ()) -> dict[str, dict[str, int]]:
    """A dataset's tag counts keyed by subset label (``a``, ``a (2)``) re-keyed by folder name as
    kohya's ``set_tag_frequency`` keys them: one folder's subsets in one dataset add up; each of ``folders``
    (the dataset's subsets' names) has an entry, ``{}`` for one whose images were all skipped or held out
    (kohya calls ``set_tag_frequency`` before it skips a subset without images)."""
    out: dict[str, dict[str, int]] = {}
    for label, tags in frequency.items():
        counts = out.setdefault(folder_of.get(label, label), {})
        for tag, n in tags.items():
            counts[tag] = counts.get(tag, 0) + n
    for folder in folders:
        out.setdefault(folder, {})
    return out


def kohya_tag_frequency(datasets: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` with a dataset config (train_network.py): each
    :func:`kohya_datasets_metadata` entry's ``tag_frequency`` merged, a folder used by several
    ``[[datasets]]`` blocks counted once (the first block's counts).

    Args:
        datasets: the ``ss_datasets`` entries, in order.

    Returns:
        ``{folder name: {tag: count}}``.
    """
    merged: dict[str, dict[str, int]] = {}
    for entry in datasets:
        for folder, tags in entry["tag_frequency"].items():
            merged.setdefault(folder, dict(tags))
    return merged
