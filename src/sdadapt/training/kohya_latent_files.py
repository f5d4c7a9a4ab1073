"""kohya sd-scripts' latent cache files: ``--cache-latents-to-disk`` (kohya's ``cache_latents_to_disk``).

Each training image's VAE latents are kept in a ``.npz`` file beside the image, named and laid out as
kohya sd-scripts writes them, so that a second run (of sdadapt or of kohya) reads them instead of
running the VAE encoder again, and files kohya wrote are read here.

What kohya does (sd-scripts, ``library/strategy_sd.py`` ``SdSdxlLatentsCachingStrategy`` and
``library/strategy_base.py`` ``LatentsCachingStrategy``, the current layout; ``library/train_util.py``
``is_disk_cached_latents_is_expected``, the older check):

* the file: ``<stem>_<W:04d>x<H:04d>_sd.npz`` (SDXL: ``_sdxl.npz``), ``W x H`` the image file's own size
  (``get_latents_npz_path`` with ``info.image_size``); an older ``<stem>.npz`` is used instead when it
  exists (read *and* written there, "support old .npz").
* the keys (SD / SDXL: no ``_<h>x<w>`` key suffix, which only kohya's multi-resolution FLUX / SD3 / Lumina
  caches use; ``save_latents_to_disk``): ``latents`` (C, H/8, W/8) float32, the VAE's latents *unscaled*
  (kohya multiplies by the scaling factor at each step); ``original_size`` ``[W, H]`` of the image;
  ``crop_ltrb`` ``BucketManager.get_crop_ltrb(bucket, image size)``; with ``flip_aug`` also
  ``latents_flipped`` (the mirrored image's latents); with ``alpha_mask`` also ``alpha_mask`` (H, W).
* the check (``_default_is_disk_cached_latents_expected``): the file exists and has ``latents`` (with
  ``flip_aug`` ``latents_flipped``, with ``alpha_mask`` ``alpha_mask``); ``--skip_cache_check`` skips it.
  Otherwise the image is encoded again and the file rewritten. The current SD/SDXL check looks at no
  shape; the older ``is_disk_cached_latents_is_expected`` also compared ``latents.shape[1:3]`` with the
  bucket // 8 — sdadapt does (a wrong-size entry is re-encoded and rewritten, never trained on).
* an unreadable file: kohya logs "Error loading file" and stops. sdadapt encodes the image again and
  rewrites the file (a cache is derived data; a file cut short by an interrupted write is the usual
  case), saying so in the run's report.

sdadapt writes the posterior *mean* (kohya writes a posterior *sample*, ``latent_dist.sample()``); both are
``(C, H/8, W/8)`` float32 unscaled latents that either tool reads.

The VAE that made them: sdadapt adds one key of its own, ``sdadapt`` (a JSON string), which kohya ignores — its
reader and its check take the keys they need by name (sd-scripts@48d368fa library/strategy_base.py:460-467 and
586-595) and its writer keeps the keys already in a file (598-639, ``for key in npz.files``). The record holds a
fingerprint of the VAE's encoder (:func:`~sdadapt.training.model_fingerprint.module_fingerprint` of ``vae.encoder``
and ``vae.quant_conv``: another ``--vae`` or checkpoint, or another dtype, gives another; a VAE whose decoder
alone was fine-tuned, as ``sd-vae-ft-mse``, encodes the same latents and gives the same) and a digest of the
``latents`` array it vouches for, so that a file kohya rewrote (its writer carries the record over to latents of
its own VAE) counts as kohya's. A file whose record names another VAE is encoded again and rewritten, named in
the run's report; a file without a valid record (kohya's, an older sdadapt's) is used as kohya uses it and counted
in the report: delete those files after changing ``--vae``. A change of the VAE's weights only at positions the
fingerprint does not sample is not seen (:mod:`~sdadapt.training.model_fingerprint`). Files are written atomically (a
temporary file renamed into place, :func:`sdadapt.formats.files.atomic_write`) and read with
``numpy.load(..., allow_pickle=False)``. sdadapt's loss masks (``alpha_mask`` / ``masked_loss``) are read
from the image files at each run (no VAE involved): a file's ``alpha_mask`` is neither needed nor written.

Data parallel (torchrun): :meth:`KohyaLatentFiles.share_out` makes each file once across the ranks, kohya's split
(``new_cache_latents``: image ``i`` by process ``i % num_processes``, then ``wait_for_everyone``), before every rank
reads every file.

One file, one image: two different images whose files would be one (``a.png`` and ``a.jpg`` of one size in one
folder; both beside an old ``a.npz``) are refused before anything is encoded (:func:`claim_files`), where kohya
would train the second on the first's latents or overwrite them. The same image listed twice (two subsets of one
folder, a class image that is also a training image) is one file, as in kohya, when both uses need the same latents.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..formats.files import atomic_write
from .data import ImageRecord, _load
from .data_parallel import DataParallel
from .model_fingerprint import array_digest, module_fingerprint

__all__ = ["KohyaLatentFiles", "claim_files", "crop_ltrb", "deal_out_files", "npz_path_for", "read_npz_latents",
           "write_npz_latents"]

#: kohya's SdSdxlLatentsCachingStrategy suffixes (library/strategy_sd.py)
_SD_SUFFIX, _SDXL_SUFFIX, _OLD_SUFFIX = "_sd.npz", "_sdxl.npz", ".npz"
_OWN_KEY = "sdadapt"


def npz_path_for(image: str | os.PathLike, *, size: tuple[int, int], sdxl: bool = False) -> Path:
    """The latent file kohya reads for ``image`` of ``size`` = (height, width) pixels (the file's own size):
    ``<stem>.npz`` when that older file exists, else ``<stem>_<W:04d>x<H:04d>_sd.npz`` (``_sdxl.npz``
    with ``sdxl``) — kohya's ``SdSdxlLatentsCachingStrategy.get_latents_npz_path``."""
    image = Path(image)
    old = image.with_name(image.stem + _OLD_SUFFIX)
    if old.exists():
        return old
    height, width = size
    return image.with_name(f"{image.stem}_{width:04d}x{height:04d}{_SDXL_SUFFIX if sdxl else _SD_SUFFIX}")


def claim_files(taken: dict[str, tuple[Path, str, Hashable, str]], claims: Iterable[tuple[Path, Path, Hashable, str]], *,
                option: str, what: str) -> None:
    """Record which image each cache file belongs to, refusing a file claimed by two images or for two contents.

    ``claims``: ``(image, its file, what the file must hold, that in words)`` each; ``taken``: the claims so far
    (``{real path of the file: (image, real path of the image, need, words)}``, updated in place), so that the
    files of several calls (training, validation and class images) are checked against one another. The same
    image claiming its file again for the same content is fine (an image listed twice: kohya keys its images by
    path, ``register_image``, sd-scripts@48d368fa library/train_util.py:983-985, so it is one image there too).

    kohya checks nothing here: ``glob_images`` (train_util.py:2847-2856) lists ``a.png`` and ``a.jpg`` both, and
    their files are one (``get_latents_npz_path``, library/strategy_sd.py:152-157, the image's name without its
    extension, and its size; ``get_outputs_npz_path``, library/strategy_sdxl.py:235-236): with the file there
    the second image passes kohya's check and trains on the first's latents or caption, else it overwrites them.

    Raises:
        ValueError: two different images (real paths) claim one file (rename one), or one image claims its file
            for two different contents (``option`` and ``what`` name the option and what the file keeps).
    """
    for image, file, need, words in claims:
        key, real = os.path.realpath(file), os.path.realpath(image)
        before = taken.setdefault(key, (Path(image), real, need, words))
        first, first_real, first_need, first_words = before
        if first_real != real:
            raise ValueError(f"{option}: {first} and {image} would keep their {what} in one file, {file} (kohya names "
                             "it after the image's name without its extension): the one would be trained on or "
                             "overwrite the other's; rename one of the two images")
        if first_need != need:
            raise ValueError(f"{option}: {image} is used {first_words} and {words}, but its one file {file} can keep "
                             f"the {what} of one of these: use the image once, or copy it under another name for "
                             "the other use")


def deal_out_files(cache: Any, count: int, group: DataParallel,
                   make: Callable[[list[int]], list[str]], *, what: str) -> None:
    """Make ``count`` cache files once across the ranks, the ``share_out`` of :class:`KohyaLatentFiles` and of
    :class:`~sdadapt.training.kohya_text_files.KohyaTextFiles` (``cache``): rank ``r`` calls ``make(items)`` with its
    items ``r, r + world, ...`` (:func:`~.data_parallel.deal_out`, kohya's split), which checks them, writes those
    missing or unusable, counting in ``cache.read`` / ``cache.encoded`` / ``cache.rewritten`` as it goes, and returns
    the files it wrote; then the ranks exchange what each counted. Afterwards those counts hold every rank's work
    (the report of rank 0 names it all) and ``cache._fresh`` every file written, so that reading them back does not
    count them again as read.

    Raises:
        PeerProcessError: another rank failed first.
    """
    from .data_parallel import deal_out

    def work(mine: list[int]) -> dict[str, object]:
        read, encoded, seen = cache.read, cache.encoded, len(cache.rewritten)
        written = make(mine)
        done = {"read": cache.read - read, "encoded": cache.encoded - encoded,
                "rewritten": [[str(p), why] for p, why in cache.rewritten[seen:]], "written": written}
        cache.read, cache.encoded = read, encoded  # (counted once, from the exchange below)
        del cache.rewritten[seen:]
        return done

    for theirs in deal_out(count, group, work, what=what):
        cache.read += int(theirs["read"])
        cache.encoded += int(theirs["encoded"])
        cache.rewritten += [(Path(p), why) for p, why in theirs["rewritten"]]
        cache._fresh.update(theirs["written"])


def crop_ltrb(bucket: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's ``BucketManager.get_crop_ltrb`` (library/train_util.py): ``(left, top, right, bottom)`` of
    an image of ``size`` = (height, width) fitted into ``bucket`` = (height, width), as Stability AI's
    preprocessing computes it (the ``crop_ltrb`` key; kohya's SDXL crop conditioning)."""
    bucket_w, bucket_h = bucket[1], bucket[0]
    image_ar = size[1] / size[0]
    if bucket_w / bucket_h > image_ar:
        width, height = bucket_h * image_ar, bucket_h
    else:
        width, height = bucket_w, bucket_w / image_ar
    left, top = (bucket_w - width) // 2, (bucket_h - height) // 2
    return left, top, left + width, top + height


def read_npz_latents(path: str | os.PathLike, *, shape: tuple[int, ...], flip: bool,
                     made_by: Mapping[str, str] | None = None) -> tuple[Tensor, Tensor | None] | str:
    """``(latents (C, h, w), mirrored latents or None)`` from a kohya latent file, float32 as stored, or
    the reason it cannot serve (a string): missing keys, another size than ``shape`` (this run's bucket),
    no ``latents_flipped`` with ``flip``, unreadable, or written by sdadapt with another VAE than ``made_by``
    (:meth:`KohyaLatentFiles.made_by`; a file without a valid record, kohya's, is not compared). Reads the
    current keys (``latents`` ...) and none of the multi-resolution ``latents_<h>x<w>`` ones (kohya writes
    those for FLUX / SD3 only)."""
    got = _read(path, shape=shape, flip=flip, made_by=made_by)
    return got if isinstance(got, str) else got[:2]


def _digest(latents: np.ndarray) -> str:
    """The ``latents`` array a record vouches for (a file kohya rewrote keeps the record, not the latents)."""
    return array_digest(np.asarray(latents, dtype=np.float32))


def _read(path: str | os.PathLike, *, shape: tuple[int, ...], flip: bool,
          made_by: Mapping[str, str] | None) -> tuple[Tensor, Tensor | None, bool] | str:
    """:func:`read_npz_latents`, and whether the file carries sdadapt's valid record of the VAE."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if "latents" not in names:
                return "no 'latents' array"
            plain = npz["latents"]
            mirrored = npz["latents_flipped"] if flip and "latents_flipped" in names else None
            own = json.loads(str(npz[_OWN_KEY][()])) if _OWN_KEY in names else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if tuple(plain.shape) != tuple(shape):
        return f"latents of shape {tuple(plain.shape)}, this run's bucket needs {tuple(shape)}"
    if flip and mirrored is None:
        return "no 'latents_flipped' (flip_aug needs it)"
    if flip and tuple(mirrored.shape) != tuple(shape):
        return f"latents_flipped of shape {tuple(mirrored.shape)}, this run's bucket needs {tuple(shape)}"
    if not np.issubdtype(plain.dtype, np.floating) or (mirrored is not None and not np.issubdtype(mirrored.dtype, np.floating)):
        return f"latents of dtype {plain.dtype}, not floating point"
    written_by = own.get("made_by") if isinstance(own, dict) else None
    vouched = isinstance(written_by, dict) and own.get("latents") == _digest(plain)
    for key, want in (made_by or {}).items():
        if vouched and written_by.get(key) != want:  # type: ignore[union-attr]
            return (f"written for another VAE (its encoder's fingerprint {written_by.get(key)}, this model's {want})"  # type: ignore[union-attr]
                    if key == "vae" else f"written for {key} {written_by.get(key)} (this run: {want})")  # type: ignore[union-attr]
    return _tensor(plain), (_tensor(mirrored) if mirrored is not None else None), vouched


def _use(record: ImageRecord) -> str:
    """How a record's image is prepared for its latents, in words (:meth:`KohyaLatentFiles.claim`)."""
    (bh, bw), (rh, rw), (top, left) = record.bucket, record.resized, record.crop
    how = f", {record.interpolation} resampling" if record.interpolation is not None else ""
    return f"at {bw}x{bh} (scaled to {rw}x{rh}, cropped at x={left}, y={top}{how})"


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def write_npz_latents(path: str | os.PathLike, latents: Tensor, *, original_size: tuple[int, int],
                      crop: tuple[float, float, float, float], flipped: Tensor | None = None,
                      made_by: Mapping[str, str] | None = None) -> Path:
    """Write one image's kohya latent file atomically: ``latents`` (C, h, w) and ``flipped`` as float32
    (kohya's ``save_latents_to_disk``: ``latents_tensor.float().cpu().numpy()``), ``original_size`` =
    ``[W, H]`` (from ``original_size`` = (height, width)) and ``crop_ltrb``; with ``made_by``
    (:meth:`KohyaLatentFiles.made_by`) also sdadapt's ``sdadapt`` key (JSON: ``made_by`` and a digest of these
    ``latents``), which kohya ignores. The file holds only these keys (a stale ``latents_flipped`` or
    ``alpha_mask`` of another size is not carried over)."""
    arrays = {"latents": latents.detach().float().cpu().numpy(),
              "original_size": np.array((original_size[1], original_size[0])), "crop_ltrb": np.array(crop)}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.detach().float().cpu().numpy()
    if made_by is not None:
        arrays[_OWN_KEY] = np.array(json.dumps({"made_by": dict(made_by), "latents": _digest(arrays["latents"])}))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # (a file object: numpy adds no second ".npz" to the temporary name)
            np.savez(handle, **arrays)

    return atomic_write(path, write)


@dataclass
class KohyaLatentFiles:
    """The ``latents_of`` hook of :func:`sdadapt.training.data.encode_buckets` for ``--cache-latents-to-disk``.

    For each batch of records it reads every image's valid latent file and encodes the others (the VAE's
    unscaled latents, :meth:`DiffusersSystem.vae_latents`, written to their file), then scales both
    alike (:meth:`DiffusersSystem.scale_vae_latents`): an image trains on the same bits whether its latents
    were encoded now or read back from the file the last run wrote. A system without these two methods
    (the toy) stores what its ``encode_images`` gives.

    Attributes:
        read, encoded: how many images' latents came from files / from the VAE (``encoded`` counts the
            rewritten ones too); ``rewritten``: files that were there but could not serve, with the reason;
        trusted: files read without sdadapt's record of the VAE (kohya's, an older sdadapt's; counted with a VAE
            to compare only, :meth:`made_by`).
    """

    system: object
    read: int = 0
    encoded: int = 0
    trusted: int = 0
    rewritten: list[tuple[Path, str]] = field(default_factory=list)
    _shapes: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict, repr=False)
    #: the files :meth:`share_out` had the ranks write in this run (read back by :meth:`__call__`, counted as encoded)
    _fresh: set[str] = field(default_factory=set, repr=False)
    #: the files claimed so far (:func:`claim_files`) and their images
    _claims: dict[str, tuple[Path, str, Hashable, str]] = field(default_factory=dict, repr=False)
    #: :meth:`made_by`, computed once (``()``: not yet)
    _made_by: dict[str, str] | None | tuple[()] = field(default=(), repr=False)

    def made_by(self) -> dict[str, str] | None:
        """What makes this run's latents, as the files record it (computed once per run): ``{"vae":``
        :func:`~sdadapt.training.model_fingerprint.module_fingerprint` of the VAE's ``encoder`` and ``quant_conv``
        ``}`` (the whole VAE when it has no ``encoder``); ``None`` for a system without a ``vae`` module (the toy),
        whose files record nothing."""
        if self._made_by == ():
            vae = getattr(self.system, "vae", None)
            if not isinstance(vae, nn.Module):
                self._made_by = None
            else:
                encoder = getattr(vae, "encoder", None)
                parts = (encoder, getattr(vae, "quant_conv", None)) if isinstance(encoder, nn.Module) else (vae,)
                self._made_by = {"vae": module_fingerprint(*parts)}
        return self._made_by  # type: ignore[return-value]

    @property
    def sdxl(self) -> bool:
        return isinstance(getattr(self.system, "text_encoder_2", None), nn.Module)

    def _raw(self, pixels: Tensor) -> Tensor:
        encode: Callable[[Tensor], Tensor] = getattr(self.system, "vae_latents", self.system.encode_images)  # type: ignore[attr-defined]
        with torch.no_grad():
            return encode(pixels).detach().float().cpu()

    def _scaled(self, raw: Tensor) -> Tensor:
        scale = getattr(self.system, "scale_vae_latents", None)
        with torch.no_grad():
            return (scale(raw) if scale is not None else raw).float()

    def _shape(self, bucket: tuple[int, int]) -> tuple[int, ...]:
        """The (C, h, w) latents of a ``bucket`` image (the system's ``latent_shape``, else one encode of zeros)."""
        if bucket not in self._shapes:
            shape_of = getattr(self.system, "latent_shape", None)
            self._shapes[bucket] = (tuple(shape_of(*bucket)) if shape_of is not None
                                    else tuple(self._raw(torch.zeros(1, 3, *bucket)).shape[1:]))
        return self._shapes[bucket]

    def __call__(self, records: list[ImageRecord], *, flip: bool) -> tuple[Tensor, Tensor | None]:
        """One batch of records of one bucket -> ``(latents (n, C, h, w), mirrored (n, C, h, w) or None)``,
        scaled for training, float32 on the CPU."""
        plain, mirrored, _ = self._read_or_encode(records, flip=flip)
        # (contiguous whatever layout the VAE gave: a file read back and an encode give the same tensor, bit for bit,
        # in the same layout; the in-memory path keeps the VAE's, channels-last from some CPU kernels, with the same values)
        latents = self._scaled(torch.stack(plain)).contiguous()  # type: ignore[arg-type]
        return latents, (self._scaled(torch.stack(mirrored)).contiguous() if flip else None)  # type: ignore[arg-type]

    def claim(self, records: Iterable[ImageRecord]) -> None:
        """Check, before anything is encoded, that no two images of this run (all calls so far) share a latent file,
        and that an image listed twice needs the same latents both times (the same bucket, scale, crop and
        resampling); :meth:`share_out` and :meth:`__call__` check their records so too.

        Raises:
            ValueError: a record given as a tensor (no file to keep its latents beside); two images, or two uses
                of one image, for one file (:func:`claim_files`).
        """
        records = list(records)
        if any(r.path is None for r in records):
            raise ValueError("--cache-latents-to-disk keeps each image's latents beside its file; these images were "
                             "given as tensors (build the dataset with find_images)")
        claim_files(self._claims, ((r.path, self._path(r), (r.bucket, r.resized, r.crop, r.interpolation), _use(r))
                                   for r in records), option="--cache-latents-to-disk", what="latents")

    def _path(self, record: ImageRecord) -> Path:
        return npz_path_for(record.path, size=record.size, sdxl=self.sdxl)  # type: ignore[arg-type]

    def share_out(self, records: Sequence[ImageRecord], *, flip: bool, group: DataParallel | None,
                  batch: int = 4) -> None:
        """Data parallel: make every record's file once across the ranks, before :meth:`__call__` reads them all.

        kohya's ``new_cache_latents`` (sd-scripts@48d368fa library/train_util.py:1147-1185, 2625-2629): with
        ``cache_to_disk``, process ``process_index`` checks and encodes the images ``i`` with ``i % num_processes ==
        process_index`` only, then ``accelerator.wait_for_everyone()``; every process then reads every file
        (:func:`~.data_parallel.deal_out`). Here rank ``r`` checks the files ``r, r + world, ...`` (the records' files
        in the dataset's order, the same on every rank; an image listed twice is one file), encodes and writes the
        missing or unusable ones ``batch`` at a time (per bucket), then the ranks exchange what each did. Afterwards
        :attr:`encoded` / :attr:`rewritten` hold every rank's counts (the report of rank 0 names them all), and the
        files written now are not counted again as :attr:`read`. Without ``group`` only :meth:`claim` (one process:
        :meth:`__call__` does it all).

        Raises:
            ValueError: as :meth:`claim`.
            PeerProcessError: another rank failed first.
        """
        self.claim(records)
        if group is None:
            return
        files: dict[str, ImageRecord] = {}
        for record in records:  # (the first record of each file: the others need the same latents, claim says)
            files.setdefault(os.path.realpath(self._path(record)), record)
        distinct = list(files.values())

        def make(mine: list[int]) -> list[str]:
            by_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
            for i in mine:
                by_bucket.setdefault(distinct[i].bucket, []).append(distinct[i])
            written: list[str] = []
            for part in by_bucket.values():
                for start in range(0, len(part), batch):
                    written += [str(p) for p in self._read_or_encode(part[start: start + batch], flip=flip, count=False,
                                                                     keep=False)[2]]
            return written

        deal_out_files(self, len(distinct), group, make,
                       what="the sharing out of the latent files (--cache-latents-to-disk)")

    def _read_or_encode(self, records: Sequence[ImageRecord], *, flip: bool, count: bool = True,
                        keep: bool = True) -> tuple[list[Tensor | None], list[Tensor | None], list[Path]]:
        """Each record's unscaled latents (C, h, w) and mirrored ones (with ``flip``, else ``None``) from its valid
        file, or encoded (one batch: the records share a bucket) and written to it; and the files written.
        ``count``: a file read counts in :attr:`read` (not one :meth:`share_out` wrote in this run); ``keep=False``:
        the latents are not returned (``[]``, ``[]``)."""
        self.claim(records)
        plain: list[Tensor | None] = [None] * len(records)
        mirrored: list[Tensor | None] = [None] * len(records)
        missing: list[tuple[int, Path]] = []
        pending: dict[str, int] = {}  # the files this batch writes -> the record encoded for it
        again: list[tuple[int, int]] = []  # (an image listed twice in the batch, the record encoded for it)
        for i, record in enumerate(records):
            path = self._path(record)
            if str(path) in pending:  # (claim: the same image, the same latents; encoded and written once)
                again.append((i, pending[str(path)]))
                continue
            found = (_read(path, shape=self._shape(record.bucket), flip=flip, made_by=self.made_by())
                     if path.exists() else None)
            if isinstance(found, tuple):
                plain[i], mirrored[i], vouched = found
                if count and str(path) not in self._fresh:
                    self.read += 1
                    self.trusted += not vouched and self.made_by() is not None
                continue
            if found is not None:
                self.rewritten.append((path, found))
            missing.append((i, path))
            pending[str(path)] = i
        if missing:
            pixels = torch.stack([_load(records[i]) for i, _ in missing])
            raw = self._raw(pixels)
            raw_flipped = self._raw(torch.flip(pixels, dims=[3])) if flip else None
            for k, (i, path) in enumerate(missing):
                record = records[i]
                write_npz_latents(path, raw[k], original_size=record.size, crop=crop_ltrb(record.bucket, record.size),
                                  flipped=raw_flipped[k] if raw_flipped is not None else None, made_by=self.made_by())
                plain[i] = raw[k]
                mirrored[i] = raw_flipped[k] if raw_flipped is not None else None
            self.encoded += len(missing)
        for i, first in again:
            plain[i], mirrored[i] = plain[first], mirrored[first]
        if not keep:
            return [], [], [path for _, path in missing]
        return plain, mirrored, [path for _, path in missing]

    def report(self) -> list[str]:
        """The run's lines: how many latents were read from files and how many encoded, and each rewritten file."""
        lines = [(f"--cache-latents-to-disk: {self.read} image(s)' latents read from their .npz files, {self.encoded} "
                  "encoded by the VAE and written beside the images (kohya's layout)")]
        if self.trusted:
            lines.append(f"  {self.trusted} of the files read carry no record of the VAE (kohya or an older sdadapt wrote "
                         "them) and were used as kohya uses them: delete the latent .npz files after changing --vae or "
                         "the model")
        lines += [f"  {path}: {why}; encoded again and rewritten" for path, why in self.rewritten]
        return lines
