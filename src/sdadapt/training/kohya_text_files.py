"""kohya sd-scripts' text-encoder output files: ``--cache-text-encoder-outputs-to-disk``.

With ``--cache-text-encoder-outputs`` every caption is encoded once before training
(:mod:`sdadapt.training.text_cache`); ``--cache-text-encoder-outputs-to-disk`` (kohya's
``cache_text_encoder_outputs_to_disk``, which turns the cache on, as ``library/sdxl_train_util.py``
``verify_sdxl_training_args`` does) keeps each image's caption encoding in a ``.npz`` file beside the
image, named and laid out as kohya writes it, so that a second run (of sdadapt or of kohya) reads it
instead of running the text encoders again, and files kohya wrote are read here.

What kohya does (sd-scripts ``library/strategy_sdxl.py`` ``SdxlTextEncoderOutputsCachingStrategy``,
``library/train_util.py`` ``new_cache_text_encoder_outputs``):

* SDXL only. ``sdxl_train_network.py`` ``get_text_encoder_outputs_caching_strategy`` makes the only
  SD-family caching strategy; SD1/SD2 training (``train_network.py``) has none, so kohya writes and
  reads no file for them. sdadapt refuses the option for SD1/SD2 and the SDXL refiner (one encoder)
  and says to cache in memory instead.
* the file: ``os.path.splitext(image)[0] + "_te_outputs.npz"`` (``get_outputs_npz_path``), one per
  image, holding the encoding of that image's caption.
* the keys (``cache_batch_outputs``, ``np.savez``): ``hidden_state1`` (L, 768) the first encoder's
  penultimate states, ``hidden_state2`` (L, 1280) the second's, ``pool2`` (1280,) the second encoder's
  projected pooled output (of the first window with ``max_token_length``). ``L`` = 77, or ``n * 75 + 2``
  with ``max_token_length`` 150 / 225 (the windows' states joined, BOS and EOS once). The arrays are the
  encoders' dtype, a bfloat16 one written as float32 (numpy has no bfloat16): float32 or float16.
* the check (``is_disk_cached_outputs_expected``): the file exists and has the three keys; otherwise the
  caption is encoded again and the file rewritten (``--skip_cache_check``: not even that). No shape is
  compared and an unreadable file stops kohya ("Error loading file").

sdadapt reads kohya's three keys and writes them in kohya's dtype rule, and adds one key of its own,
``sdadapt`` (a JSON string: the caption it encoded, the dtypes the run's in-memory cache held, and
``made_by``: what produced the outputs, :meth:`KohyaTextFiles.made_by`), which kohya's reader ignores
(``load_outputs_npz`` reads the three keys by name, sd-scripts@48d368fa library/strategy_sdxl.py:256-261;
``is_disk_cached_outputs_expected`` checks only them, 238-254). ``made_by`` holds a fingerprint of the two text
encoders' weights (:func:`~sdadapt.training.model_fingerprint.module_fingerprint`: a fixed sample of every
tensor, names, shapes and dtypes; a fine-tune, another checkpoint, a merged LoRA or an fp16 copy give another),
one of the tokenizers (the ids of a fixed probe caption: another vocabulary, padding or added tokens) and
``--max-token-length``. SDXL's conditioning takes the penultimate layer whatever ``--clip-skip`` says
(:meth:`DiffusersSystem.condition <sdadapt.diffusers_system.DiffusersSystem.condition>`), and
``--weighted-captions`` is refused with the cache, so neither is recorded.

An entry is encoded again and its file rewritten (atomically, :func:`sdadapt.formats.files.atomic_write`; named
in the run's report with the reason) when it is unreadable or cut short, lacks a key, has another shape than this
model and ``--max-token-length`` give, is not floating point, was written by sdadapt for another caption, or
for another text encoder, other tokenizers or another ``--max-token-length``. A file kohya wrote carries no
caption and no ``made_by`` (nor does one an older sdadapt wrote), so it is used as kohya uses it, and the report
says how many such files were trusted: delete those ``_te_outputs.npz`` files after changing captions or the
model, as with kohya. The fingerprint samples the weights (measured: about 20 ms for SDXL's two encoders on a
CPU, :mod:`~sdadapt.training.model_fingerprint`): a change at unsampled positions only (one token's embedding
row retrained) is not seen.

What is encoded is the caption as one use writes it (``caption_prefix`` / ``caption_suffix`` and the
separators applied, :func:`sdadapt.training.text_cache.caption_variants`); kohya encodes the bare
``info.caption``. The step trains on the same bits whether a caption's outputs were encoded now or read
back from the file the last run wrote (float32 and float16 rows are stored as they are; bfloat16 rows are
stored as float32 and cast back, exactly).

One file, one image (:func:`~sdadapt.training.kohya_latent_files.claim_files`): two images whose files would be one
(``a.png`` and ``a.jpg`` of one folder) are refused before anything is encoded (:meth:`KohyaTextFiles.check_images`,
then again as the captions are read), and so is one image listed with two captions (its file keeps one); the same
image listed twice with one caption is one file. Data parallel (torchrun, :attr:`KohyaTextFiles.group`): each file is
checked and made by one rank, kohya's ``new_cache_text_encoder_outputs`` split (image ``i`` by process
``i % num_processes``, then ``wait_for_everyone``; :func:`~sdadapt.training.data_parallel.deal_out`), before every
rank reads every file.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..formats.files import atomic_write
from .data_parallel import DataParallel
from .kohya_latent_files import claim_files, deal_out_files
from .model_fingerprint import array_digest, module_fingerprint
from .text_cache import TextConditionCache

__all__ = ["TE_OUTPUTS_SUFFIX", "KohyaTextFiles", "read_npz_text_outputs", "te_outputs_path_for", "write_npz_text_outputs"]

#: kohya's SdxlTextEncoderOutputsCachingStrategy.SDXL_TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX (library/strategy_sdxl.py)
TE_OUTPUTS_SUFFIX = "_te_outputs.npz"
_KEYS = ("hidden_state1", "hidden_state2", "pool2")
_OWN_KEY = "sdadapt"
#: tokenized to fingerprint the tokenizers (words, punctuation, emphasis, a number, non-ASCII, an unknown word)
_PROBE = "a photo of sks, (masterpiece:1.2), [blurry] 1girl 2024 caf\u00e9 \u00fcber \u6771\u4eac zxqvj"
#: what a ``made_by`` entry that differs means, in the report
_MADE_BY_WORDS = {"text_encoders": "another text encoder (its weights' fingerprint {have}, this model's {want})",
                  "tokenizers": "other tokenizers (a probe caption gives other token ids)",
                  "max_token_length": "--max-token-length {have} (this run: {want})"}
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def te_outputs_path_for(image: str | os.PathLike) -> Path:
    """The text-encoder output file kohya reads for ``image``: ``<image without its extension>_te_outputs.npz``
    (``SdxlTextEncoderOutputsCachingStrategy.get_outputs_npz_path``: ``os.path.splitext(path)[0] + suffix``)."""
    return Path(os.path.splitext(os.fspath(image))[0] + TE_OUTPUTS_SUFFIX)


@dataclass(frozen=True)
class _Entry:
    hidden_state1: Tensor  # (L, D1)
    hidden_state2: Tensor  # (L, D2)
    pool2: Tensor  # (P,)
    caption: str | None  # the caption sdadapt encoded; None in a file kohya wrote
    dtypes: dict[str, str]  # sdadapt's: the in-memory cache's dtype of "context" / "text_embeds"
    made_by: dict[str, Any] | None = None  # sdadapt's: what produced the outputs; None: kohya's or an older sdadapt's


def read_npz_text_outputs(path: str | os.PathLike, *, shapes: Sequence[tuple[int, ...]],
                          caption: str | None = None, made_by: Mapping[str, Any] | None = None) -> _Entry | str:
    """One kohya text-encoder output file -> its arrays as tensors (the dtype stored), or the reason it
    cannot serve (a string): unreadable or cut short, a missing key, another shape than ``shapes`` =
    ((L, D1), (L, D2), (P,)) of ``hidden_state1`` / ``hidden_state2`` / ``pool2``, not floating point, or
    written by sdadapt for another caption than ``caption`` or with another entry of ``made_by``
    (:meth:`KohyaTextFiles.made_by`; a file without the record, kohya's, is not compared)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing:
                return f"no {' / '.join(repr(k) for k in missing)} array"
            arrays = [npz[k] for k in _KEYS]
            own = json.loads(str(npz[_OWN_KEY][()])) if _OWN_KEY in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    for key, array, shape in zip(_KEYS, arrays, shapes):
        if tuple(array.shape) != tuple(shape):
            return f"{key} of shape {tuple(array.shape)}, this model and --max-token-length give {tuple(shape)}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"{key} of dtype {array.dtype}, not floating point"
    written_for = own.get("caption") if isinstance(own, dict) else None
    if caption is not None and written_for is not None and written_for != caption:
        return f"written for the caption {written_for!r}, the image's caption is now {caption!r}"
    written_by = own.get("made_by") if isinstance(own, dict) and isinstance(own.get("made_by"), dict) else None
    for key, want in (made_by or {}).items():
        if written_by is not None and written_by.get(key) != want:
            words = _MADE_BY_WORDS.get(key, key + " {have} (this run: {want})")
            return "written for " + words.format(have=written_by.get(key), want=want)
    dtypes = own.get("dtypes", {}) if isinstance(own, dict) else {}
    return _Entry(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays), caption=written_for,
                  dtypes={k: v for k, v in dtypes.items() if v in _DTYPES}, made_by=written_by)


def _kohya_array(tensor: Tensor) -> np.ndarray:
    """kohya's dtype rule (strategy_sdxl.py ``cache_batch_outputs``): bfloat16 -> float32, others as they are."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


def write_npz_text_outputs(path: str | os.PathLike, hidden_state1: Tensor, hidden_state2: Tensor, pool2: Tensor, *,
                           caption: str, dtypes: dict[str, str] | None = None,
                           made_by: Mapping[str, Any] | None = None) -> Path:
    """Write one image's kohya text-encoder output file atomically: ``hidden_state1`` (L, D1),
    ``hidden_state2`` (L, D2), ``pool2`` (P,) in kohya's dtype rule (a bfloat16 tensor as float32), and
    sdadapt's ``sdadapt`` key (JSON: ``caption``, the in-memory ``dtypes`` and, unless ``None``, ``made_by``:
    :meth:`KohyaTextFiles.made_by`), which kohya's reader ignores."""
    own: dict[str, Any] = {"caption": caption, "dtypes": dtypes or {}}
    if made_by is not None:
        own["made_by"] = dict(made_by)
    arrays = {"hidden_state1": _kohya_array(hidden_state1), "hidden_state2": _kohya_array(hidden_state2),
              "pool2": _kohya_array(pool2), _OWN_KEY: np.array(json.dumps(own, ensure_ascii=False))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # (a file object: numpy adds no second ".npz" to the temporary name)
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def _refusal(system: Any) -> str | None:
    second = getattr(system, "text_encoder_2", None)
    if not getattr(system, "is_sdxl", False) or second is None or getattr(system, "is_refiner", False):
        kind = "the SDXL refiner (one text encoder)" if getattr(system, "is_refiner", False) else "this model"
        return (f"--cache-text-encoder-outputs-to-disk (kohya's cache_text_encoder_outputs_to_disk) writes kohya's "
                f"SDXL _te_outputs.npz files (two text encoders); kohya caches no text-encoder outputs to disk for "
                f"{kind} (sd-scripts' SD1/SD2 train_network.py has no caching strategy): use "
                "--cache-text-encoder-outputs (in memory) instead")
    return None


@dataclass
class KohyaTextFiles:
    """The text-encoder output files of ``--cache-text-encoder-outputs-to-disk``: the hook
    ``FitConfig.text_encoder_outputs_files`` (called once, before the first step, by ``fit``'s text cache).

    Args:
        system: an SDXL :class:`~sdadapt.diffusers_system.DiffusersSystem` (two text encoders; others are refused).
        log: called with each line of :meth:`report` once the files are read and written.
        group: this rank's place in a data-parallel run (:func:`~sdadapt.training.data_parallel.active`): each
            file is then checked and made by one rank (kohya's ``new_cache_text_encoder_outputs`` split) before every
            rank reads them all; ``None``: one process.

    Attributes:
        read, encoded: images whose caption's outputs came from their file / were encoded and written;
        trusted: files without sdadapt's record of the model (kohya's; an older sdadapt's) read as kohya reads them;
        rewritten: files that were there but could not serve, with the reason.
    """

    system: Any
    log: Callable[[str], None] | None = None
    group: DataParallel | None = None
    read: int = 0
    encoded: int = 0
    trusted: int = 0
    rewritten: list[tuple[Path, str]] = field(default_factory=list)
    #: the files :meth:`_share_out` had the ranks write in this run (counted as encoded, not again as read)
    _fresh: set[str] = field(default_factory=set, repr=False)
    #: the files claimed so far and their images (:func:`~sdadapt.training.kohya_latent_files.claim_files`)
    _claims: dict[str, tuple[Path, str, Any, str]] = field(default_factory=dict, repr=False)
    #: :meth:`made_by`, computed once
    _made_by: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        refusal = _refusal(self.system)
        if refusal is not None:
            raise ValueError(refusal)

    def made_by(self) -> dict[str, Any]:
        """What produces this run's outputs, as the files record it (computed once per run): ``text_encoders``,
        :func:`~sdadapt.training.model_fingerprint.module_fingerprint` of the two encoders; ``tokenizers``, a
        digest of the ids :meth:`tokenize` gives a fixed probe caption (both tokenizers, the padded length);
        ``max_token_length``."""
        if self._made_by is None:
            ids = self.system.tokenize([_PROBE])
            tokens = array_digest(ids.detach().cpu().numpy().astype(np.int64))
            self._made_by = {"text_encoders": module_fingerprint(self.system.text_encoder, self.system.text_encoder_2),
                             "tokenizers": tokens,
                             "max_token_length": int(getattr(self.system, "max_token_length", 75))}
        return self._made_by

    def _shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int]]:
        """((L, D1), (L, D2), (P,)) from the tokenizer's length and the encoders' configs (no encoder run)."""
        length = int(self.system.tokenize([""]).shape[-1])
        first, second = self.system.text_encoder.config, self.system.text_encoder_2.config
        return (length, first.hidden_size), (length, second.hidden_size), (second.projection_dim,)

    def check_images(self, images: Iterable[str | os.PathLike]) -> None:
        """Refuse, before anything is encoded, two different images whose files would be one (``a.png`` and ``a.jpg``
        of one folder: kohya's name drops the extension); an image listed twice is fine (its captions are checked
        when :meth:`__call__` reads them).

        Raises:
            ValueError: naming both images and the file (:func:`~sdadapt.training.kohya_latent_files.claim_files`).
        """
        claim_files({}, ((Path(image), te_outputs_path_for(image), None, "") for image in images),
                    option="--cache-text-encoder-outputs-to-disk", what="text-encoder outputs")

    def __call__(self, encode: Callable[[list[str]], TextConditionCache], entries: Sequence[tuple[str | os.PathLike, str]],
                 texts: Sequence[str]) -> TextConditionCache:
        """The run's text cache: each image's file in ``entries`` ((image path, its caption as a use writes it))
        read where it serves; the other captions of ``texts`` (every caption the run can draw) encoded by
        ``encode`` (:func:`~sdadapt.training.text_cache.cache_text_conditions` as the run calls it) and each
        image's file among them written. Returns the cache with one row per text, as ``encode(texts)`` gives.

        An image listed twice with one caption has one file; with :attr:`group` the files are first made once
        across the ranks (:meth:`_share_out`), then every rank reads every file.

        Raises:
            ValueError: a caption of ``entries`` is not among ``texts``; two images, or one image with two captions,
                for one file (:func:`~sdadapt.training.kohya_latent_files.claim_files`).
            PeerProcessError: another rank failed first.
        """
        shapes = self._shapes()
        texts = list(dict.fromkeys(texts))
        known = set(texts)
        for image, caption in entries:
            if caption not in known:
                raise ValueError(f"{image}: its caption {caption!r} is not among the run's captions")
        claim_files(self._claims, ((Path(image), te_outputs_path_for(image), caption, f"with the caption {caption!r}")
                                   for image, caption in entries),
                    option="--cache-text-encoder-outputs-to-disk", what="text-encoder outputs")
        files: dict[str, tuple[Path, str]] = {}
        for image, caption in entries:  # (an image listed twice: one file, claim_files saw one caption)
            files.setdefault(os.path.realpath(te_outputs_path_for(image)), (te_outputs_path_for(image), caption))
        if self.group is not None:
            self._share_out(encode, list(files.values()), shapes)
        cache = self._read_or_encode(encode, list(files.values()), texts, shapes)
        if self.log is not None:
            for line in self.report():
                self.log(line)
        return cache

    def _share_out(self, encode: Callable[[list[str]], TextConditionCache], files: list[tuple[Path, str]],
                   shapes: tuple[tuple[int, ...], ...]) -> None:
        """Data parallel: rank ``r`` checks the files ``r, r + world, ...`` and encodes and writes those missing or
        unusable (their captions only), then the ranks exchange what each did
        (:func:`~sdadapt.training.kohya_latent_files.deal_out_files`, the split of kohya's
        ``new_cache_text_encoder_outputs``: sd-scripts@48d368fa library/train_util.py:1320-1330, then
        ``wait_for_everyone``, 2647-2651); the counts then hold every rank's work, and the files written now are not
        counted again as read."""

        def make(mine: list[int]) -> list[str]:
            share = [files[i] for i in mine]
            return self._read_or_encode(encode, share, list(dict.fromkeys(c for _, c in share)), shapes, share=True)

        deal_out_files(self, len(files), self.group, make,  # type: ignore[arg-type]
                       what="the sharing out of the text-encoder output files (--cache-text-encoder-outputs-to-disk)")

    def _read_or_encode(self, encode: Callable[[list[str]], TextConditionCache], files: Sequence[tuple[Path, str]],
                        texts: list[str], shapes: tuple[tuple[int, ...], ...], *, share: bool = False) -> Any:
        """Read the ``files`` ((file, caption)) that serve, encode the other ``texts`` and write the files among them
        (a caption another file holds copied from it); the cache of ``texts``, or with ``share`` (a rank's share of
        :meth:`_share_out`) the files written, without counting reads (the whole pass counts them after)."""
        width = shapes[0][1]
        found: dict[str, _Entry] = {}
        to_write: list[tuple[Path, str]] = []
        for path, caption in files:
            got = (read_npz_text_outputs(path, shapes=shapes, caption=caption, made_by=self.made_by())
                   if path.exists() else None)
            if isinstance(got, _Entry):
                found.setdefault(caption, got)
                if not share and str(path) not in self._fresh:
                    self.read += 1
                    self.trusted += got.made_by is None
                continue
            if got is not None:
                self.rewritten.append((path, got))
            to_write.append((path, caption))
        missing = [t for t in texts if t not in found]
        fresh = encode(missing) if missing else None
        if fresh is not None:
            dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in fresh.values.items()}
        elif share and not found:
            return []
        else:
            own = next((e.dtypes for e in found.values() if set(e.dtypes) >= {"context", "text_embeds"}), None)
            first = next(iter(found.values()))
            dtypes = own or {"context": str(first.hidden_state1.dtype).removeprefix("torch."),
                             "text_embeds": str(first.pool2.dtype).removeprefix("torch.")}
        context_dtype, pooled_dtype = _DTYPES[dtypes["context"]], _DTYPES[dtypes["text_embeds"]]
        for path, caption in to_write:
            if caption in found:  # another image's file holds this caption: copied, no encoder run
                entry = found[caption]
                write_npz_text_outputs(path, entry.hidden_state1, entry.hidden_state2, entry.pool2, caption=caption,
                                       dtypes=dtypes, made_by=entry.made_by)  # (a kohya file's copy: still unvouched)
                self.read += 1
                continue
            row = fresh.rows[caption]  # type: ignore[union-attr]
            context, pooled = fresh.values["context"][row], fresh.values["text_embeds"][row]  # type: ignore[union-attr]
            write_npz_text_outputs(path, context[..., :width], context[..., width:], pooled, caption=caption, dtypes=dtypes,
                                   made_by=self.made_by())
            self.encoded += 1
        if share:
            return [str(path) for path, _ in to_write]
        contexts, pooled_rows = [], []
        for text in texts:
            if text in found:
                entry = found[text]
                contexts.append(torch.cat([entry.hidden_state1.to(context_dtype), entry.hidden_state2.to(context_dtype)], -1))
                pooled_rows.append(entry.pool2.to(pooled_dtype))
            else:
                row = fresh.rows[text]  # type: ignore[union-attr]
                contexts.append(fresh.values["context"][row].cpu())  # type: ignore[union-attr]
                pooled_rows.append(fresh.values["text_embeds"][row].cpu())  # type: ignore[union-attr]
        values = {"context": torch.stack(contexts), "text_embeds": torch.stack(pooled_rows)}
        time_ids_dtype = fresh.time_ids_dtype if fresh is not None else torch.float32  # (DiffusersSystem.condition's)
        return TextConditionCache({text: i for i, text in enumerate(texts)}, values, time_ids_dtype)

    def report(self) -> list[str]:
        """The run's lines: how many images' text-encoder outputs were read and how many encoded, the kohya
        files trusted without a caption check, and each rewritten file with its reason."""
        lines = [(f"--cache-text-encoder-outputs-to-disk: {self.read} image(s)' text-encoder outputs read from their "
                  f"{TE_OUTPUTS_SUFFIX} files, {self.encoded} encoded and written beside the images (kohya's layout)")]
        if self.trusted:
            lines.append(f"  {self.trusted} of the files read carry no caption (kohya wrote them) or no record of the text "
                         "encoders (an older sdadapt wrote them) and were used as kohya uses them: delete the "
                         f"{TE_OUTPUTS_SUFFIX} files after changing the captions or the model")
        lines += [f"  {path}: {why}; encoded again and rewritten" for path, why in self.rewritten]
        return lines
