"""Latent/text-state cache: exact round trip, buckets, determinism, and refusing bad folders."""

from __future__ import annotations

import pytest
import torch

from sdadapt.formats.files import WeightFileError
from sdadapt.training.latent_cache import CacheMismatchError, LatentCache, LatentCacheWriter


def _items(n=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        h, w = (8, 8) if i % 3 else (8, 12)  # two aspect buckets
        out.append((f"img{i}", torch.randn(4, h, w, generator=g), torch.randn(5, 6, generator=g).half()))
    return out


def _write(folder, items, **kw):
    with LatentCacheWriter(folder, fingerprint={"vae": "tiny", "res": 64}, **kw) as w:
        for name, lat, cond in items:
            w.add(name, latents=lat, cond=cond)


def test_round_trip_is_exact_across_shards(tmp_path):
    items = _items()
    _write(tmp_path / "c", items, shard_size=3)
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 3
    cache = LatentCache(tmp_path / "c", fingerprint={"vae": "tiny"})
    assert len(cache) == 7 and cache.names() == [n for n, _, _ in items]
    for i, (_, lat, cond) in enumerate(items):
        row = cache[i]
        assert torch.equal(row["latents"], lat) and torch.equal(row["cond"], cond) and row["cond"].dtype == torch.float16


def test_batches_stay_in_a_bucket_cover_the_data_and_are_seeded(tmp_path):
    items = _items(11)
    _write(tmp_path / "c", items, shard_size=4)
    cache = LatentCache(tmp_path / "c")
    assert {k: len(v) for k, v in cache.buckets().items()} == {(4, 8, 12): 4, (4, 8, 8): 7}
    epoch = list(cache.batches(2, seed=1, epoch=0, drop_last=False))
    names = sorted(n for b in epoch for n in b["names"])
    assert names == sorted(n for n, _, _ in items)
    lookup = {n: lat for n, lat, _ in items}
    for b in epoch:
        assert b["latents"].shape[0] == len(b["names"])
        for row, n in zip(b["latents"], b["names"]):
            assert torch.equal(row, lookup[n])
    again = list(cache.batches(2, seed=1, epoch=0, drop_last=False))
    assert [b["names"] for b in again] == [b["names"] for b in epoch]
    other = list(cache.batches(2, seed=1, epoch=1, drop_last=False))
    assert [b["names"] for b in other] != [b["names"] for b in epoch]
    full = list(cache.batches(3, seed=0))
    assert all(len(b["names"]) == 3 for b in full) and len(full) == 1 + 2  # 4 -> 1 batch, 7 -> 2


def test_fingerprint_mismatch_and_interrupted_encode_are_refused(tmp_path):
    _write(tmp_path / "c", _items(3))
    with pytest.raises(CacheMismatchError, match="vae='tiny'.*vae='sdxl'"):
        LatentCache(tmp_path / "c", fingerprint={"vae": "sdxl"})
    w = LatentCacheWriter(tmp_path / "d", shard_size=1)
    w.add("a", latents=torch.zeros(4, 2, 2))  # shard written, index never
    with pytest.raises(WeightFileError, match="interrupted"):
        LatentCache(tmp_path / "d")
    with pytest.raises(FileExistsError):
        LatentCacheWriter(tmp_path / "c")


def test_writer_rejects_inconsistent_items(tmp_path):
    w = LatentCacheWriter(tmp_path / "c")
    w.add("a", latents=torch.zeros(4, 2, 2), cond=torch.zeros(3))
    with pytest.raises(ValueError, match="fields"):
        w.add("b", latents=torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="twice"):
        w.add("a", latents=torch.zeros(4, 2, 2), cond=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        w.add("c", latents=torch.zeros(2, 2), cond=torch.zeros(3))


def test_cached_batches_train_like_fresh_tensors(tmp_path):
    """A step fed from the cache sees exactly the tensors it would have computed."""
    from sdadapt.training.step import StepConfig, TrainState, train_step

    items = [(f"i{k}", torch.randn(4, 8, 8), torch.randn(6)) for k in range(4)]
    _write(tmp_path / "c", items)
    batch = next(LatentCache(tmp_path / "c").batches(4, seed=0))
    order = [int(n[1:]) for n in batch["names"]]
    fresh = {"latents": torch.stack([items[k][1] for k in order]), "cond": torch.stack([items[k][2] for k in order])}
    ac = torch.linspace(0.99, 0.01, 1000)
    results = []
    for b in (batch, fresh):
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 4)
        model = lambda x, t, c: x * lin(c.float())[:, :, None, None]  # noqa: E731
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        results.append(train_step(model, b, params=list(lin.parameters()), optimizer=opt, state=TrainState(seed=3),
                                  config=StepConfig(), alphas_cumprod=ac)["loss"])
    assert torch.equal(results[0], results[1])
