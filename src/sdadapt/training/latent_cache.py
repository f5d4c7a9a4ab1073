"""Encode once, train many times: a folder cache of latents and text states as safetensors.

Every training step that re-runs the VAE encoder and the frozen text encoder pays for work whose
result never changes. Encode the dataset once::

    with LatentCacheWriter("cache/", fingerprint={"vae": "sd15-vae", "resolution": "512"}) as w:
        for name, image, caption in data:
            w.add(name, latents=vae_encode(image)[0], cond=text_encode(caption)[0])
    cache = LatentCache("cache/", fingerprint={"vae": "sd15-vae", "resolution": "512"})
    for batch in cache.batches(8, seed=0, epoch=e):   # {"latents": (8,C,H,W), "cond": (8,L,D), "names": [...]}
        train_step(model, batch, ...)

Items are grouped by latent shape (aspect-ratio buckets): a batch never mixes shapes. Shards are
written atomically, the index (``cache.json``) last, so an interrupted encode leaves a folder
that :class:`LatentCache` refuses with a clear message instead of a silently short dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..formats.files import WeightFileError, atomic_write, write_safetensors

__all__ = ["LatentCacheWriter", "LatentCache", "CacheMismatchError"]

_FORMAT = "sdadapt-latent-cache/1"


class CacheMismatchError(ValueError):
    """The cache was built for another model/resolution than the one asked for."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class LatentCacheWriter:
    """Collects items and writes them as shards of ``shard_size`` items.

    Each item is a name plus named tensors (``latents`` (C,H,W) is required; ``cond`` (L,D), a
    pooled embedding, a time-ids vector ... are free-form). Tensors are stored as given (pass
    fp16/bf16 to halve the cache). ``fingerprint`` (strings) records what produced the cache.
    """

    def __init__(self, folder: str | os.PathLike, *, fingerprint: Mapping[str, str] | None = None, shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        if (self.folder / "cache.json").exists():
            raise FileExistsError(f"{self.folder}: a latent cache is already there; delete the folder to rebuild it")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = {str(k): str(v) for k, v in (fingerprint or {}).items()}
        self.shard_size = shard_size
        self._pending: list[tuple[str, dict[str, Tensor]]] = []
        self._index: list[dict] = []
        self._fields: tuple[str, ...] | None = None
        self._shards = 0
        self._names: set[str] = set()

    def add(self, name: str, **tensors: Tensor) -> None:
        """Queue one item; ``latents`` (C,H,W) required, every item must carry the same fields."""
        if "latents" not in tensors or tensors["latents"].ndim != 3:
            raise ValueError(f"item {name!r}: needs latents=(C, H, W) tensor (got fields {sorted(tensors)})")
        fields = tuple(sorted(tensors))
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise ValueError(f"item {name!r} has fields {list(fields)}; earlier items have {list(self._fields)}")
        if name in self._names:
            raise ValueError(f"item name {name!r} added twice")
        self._names.add(name)
        self._pending.append((name, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        shard = _shard_name(self._shards)
        flat: dict[str, Tensor] = {}
        for slot, (name, tensors) in enumerate(self._pending):
            for field, value in tensors.items():
                flat[f"{slot}.{field}"] = value
            self._index.append({"name": name, "shard": shard, "slot": slot, "shape": list(tensors["latents"].shape)})
        write_safetensors(self.folder / shard, flat, {"format": _FORMAT})
        self._shards += 1
        self._pending = []

    def close(self) -> Path:
        """Write the last shard and the index; returns the folder."""
        self._flush()
        record = {"format": _FORMAT, "fingerprint": self.fingerprint, "fields": list(self._fields or ()), "items": self._index}
        atomic_write(self.folder / "cache.json", lambda tmp: Path(tmp).write_text(json.dumps(record)))
        return self.folder

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class LatentCache:
    """Read side: indexable items, shape buckets and seeded batches; tensors are read lazily (mmap).

    Args:
        fingerprint: the entries the cache must have been built with (e.g. the VAE and the
            resolution); a mismatch raises :class:`CacheMismatchError` naming the entry.
    """

    def __init__(self, folder: str | os.PathLike, *, fingerprint: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        index_file = self.folder / "cache.json"
        if not index_file.is_file():
            shards = sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else []
            hint = " (shards exist: the encode was interrupted; delete the folder and re-encode)" if shards else ""
            raise WeightFileError(f"{self.folder}: not a latent cache, cache.json missing{hint}")
        record = json.loads(index_file.read_text())
        if record.get("format") != _FORMAT:
            raise WeightFileError(f"{index_file}: unknown cache format {record.get('format')!r}; expected {_FORMAT}")
        for key, want in (fingerprint or {}).items():
            have = record["fingerprint"].get(key)
            if have != str(want):
                raise CacheMismatchError(
                    f"{self.folder}: cache built with {key}={have!r}, asked for {key}={want!r}; re-encode it into a new folder"
                )
        self.fingerprint: dict[str, str] = record["fingerprint"]
        self.fields: list[str] = record["fields"]
        self.items: list[dict] = record["items"]
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _handle(self, shard: str):
        if shard not in self._open:
            path = self.folder / shard
            if not path.is_file():
                raise WeightFileError(f"{path}: shard listed in cache.json is missing; re-encode the cache")
            self._open[shard] = safe_open(str(path), framework="pt")
        return self._open[shard]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.items[index]
        handle = self._handle(item["shard"])
        return {field: handle.get_tensor(f"{item['slot']}.{field}") for field in self.fields}  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return [item["name"] for item in self.items]

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """Item indices grouped by latent shape (C, H, W)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(tuple(item["shape"]), []).append(i)
        return groups

    def collate(self, indices: list[int]) -> dict[str, object]:
        """Stack items into a batch ``{field: (B, ...), "names": [...]}``; shapes must agree."""
        rows = [self[i] for i in indices]
        batch: dict[str, object] = {}
        for field in self.fields:
            values = [r[field] for r in rows]
            if len({tuple(v.shape) for v in values}) > 1:
                raise ValueError(f"field {field!r} differs in shape across items {indices}; batch within one bucket")
            batch[field] = torch.stack(values)
        batch["names"] = [self.items[i]["name"] for i in indices]
        return batch

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, drop_last: bool = True) -> Iterator[dict[str, object]]:
        """One epoch of shuffled same-shape batches, deterministic in ``(seed, epoch)``.

        ``drop_last`` (default) keeps every batch the same size — needed for static-shape
        compiled / CUDA-graph steps.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        chunks: list[list[int]] = []
        for _, indices in sorted(self.buckets().items()):
            order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                if len(chunk) == batch_size or not drop_last:
                    chunks.append(chunk)
        for c in torch.randperm(len(chunks), generator=g).tolist():
            yield self.collate(chunks[c])
