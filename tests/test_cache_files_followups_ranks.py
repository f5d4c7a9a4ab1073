"""``--cache-text-encoder-outputs-to-disk`` under data parallel (two gloo ranks on the CPU, forked: tests/_fast_dist.py).

kohya's rule (sd-scripts@48d368fa library/train_util.py:1320-1330 ``BaseDataset.new_cache_text_encoder_outputs``):
with ``cache_to_disk`` the image ``i`` is checked and, when its file is missing or unusable, encoded by the process
with ``i % num_processes == process_index`` only; then ``accelerator.wait_for_everyone()`` (2647-2651) and every
process reads every file. :func:`_fast_dist.kohya_owner` transcribes the split. Here: every file written exactly once across
the ranks, by its owner (an image listed twice is one file); the files' arrays and every rank's cache bit for bit
one process's; a second run writes nothing; a cut file is rewritten once, by its owner, and both ranks report it.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _fast_dist import fork_ranks, free_port, kohya_owner, logged_writes, logging_writes
from test_train_data_parallel import _torchrun

from sdadapt.training import kohya_text_files
from sdadapt.training.kohya_text_files import KohyaTextFiles, te_outputs_path_for
from sdadapt.training.text_cache import cache_text_conditions

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

#: (image name, caption): img0 and img2 share a caption, img1 is listed twice (one file)
ENTRIES = [("img0.png", "ab cd"), ("img1.png", "ef gh ij"), ("img2.png", "ab cd"), ("img1.png", "ef gh ij"),
           ("img3.png", "kl"), ("img4.png", "mn op")]
FILES = ["img0", "img1", "img2", "img3", "img4"]  # the distinct files in the order of the entries
TEXTS = ["ab cd", "ef gh ij", "kl", "mn op", "a class prompt"]  # (the last: no file, encoded in memory by each rank)
_SYSTEM: list = []  # the tiny SDXL system the forks inherit


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny_systems import tiny_diffusers_system

    return tiny_diffusers_system(tmp_path_factory.mktemp("te_ranks"), sdxl=True, max_token_length=75)


def _encode(system):
    return lambda texts: cache_text_conditions(system, texts, batch=4, per_image_sizes=True)


def _entries(folder: Path) -> list[tuple[Path, str]]:
    return [(folder / name, caption) for name, caption in ENTRIES]


def _logging_writes(log: Path):
    """``write_npz_text_outputs`` logging each write's ``(rank, file name)`` to ``log``."""
    return logging_writes(kohya_text_files.write_npz_text_outputs, log)


def _summary(files: KohyaTextFiles, cache) -> dict:
    return {"rows": cache.rows, "values": cache.values, "time_ids_dtype": str(cache.time_ids_dtype),
            "counts": (files.read, files.encoded, files.trusted, [(p.name, why[:10]) for p, why in files.rewritten])}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from sdadapt.training.data_parallel import active

    root = Path(folder)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    system, group, results = _SYSTEM[0], active(), {}
    for run in ("first", "second", "third", "fourth"):
        if run == "third" and rank == 0:  # img1 (rank 1's) cut short, as by an interrupted write
            path = te_outputs_path_for(root / "imgs" / "img1.png")
            path.write_bytes(path.read_bytes()[:40])
        if run == "fourth" and rank == 0:  # img2 (rank 0's) gone: its caption copied from img0's file, a read
            te_outputs_path_for(root / "imgs" / "img2.png").unlink()
        dist.barrier()
        files = KohyaTextFiles(system, group=group)
        results[run] = _summary(files, files(_encode(system), _entries(root / "imgs"), TEXTS))
        dist.barrier()  # (every rank has read before rank 0 cuts a file)
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_each_text_file_is_written_once_by_its_owner_and_every_rank_reads_all(sdxl, tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_text_files, "write_npz_text_outputs", _logging_writes(log))  # (the forks inherit it)
    _SYSTEM[:] = [sdxl]
    fork_ranks(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    writes = logged_writes(log)
    # first run: each file once, by kohya's owner (its place among the distinct files); second: none; third: the cut
    # file only, by its owner (rank 1); fourth: the deleted file, by its owner (rank 0), copied from img0's
    first, later = writes[:len(FILES)], writes[len(FILES):]
    assert sorted(name for _, name in first) == sorted(f"{f}_te_outputs.npz" for f in FILES), writes
    assert all(rank == kohya_owner(FILES.index(name.removesuffix("_te_outputs.npz")), 2) for rank, name in first), first
    assert later == [(1, "img1_te_outputs.npz"), (0, "img2_te_outputs.npz")]
    # one process: the same arrays in every file, the same cache, the same counts
    (tmp_path / "alone").mkdir()
    alone = KohyaTextFiles(sdxl)
    reference = _summary(alone, alone(_encode(sdxl), _entries(tmp_path / "alone"), TEXTS))
    assert reference["counts"] == (0, len(FILES), 0, [])
    te_outputs_path_for(tmp_path / "alone" / "img2.png").unlink()  # (the fourth run's case, one process)
    again = KohyaTextFiles(sdxl)
    again(_encode(sdxl), _entries(tmp_path / "alone"), TEXTS)
    assert (again.read, again.encoded) == (len(FILES), 0)
    for name in FILES:
        with np.load(tmp_path / "imgs" / f"{name}_te_outputs.npz") as ours, \
                np.load(tmp_path / "alone" / f"{name}_te_outputs.npz") as theirs:
            assert ours.files == theirs.files
            for key in theirs.files:
                assert ours[key].dtype == theirs[key].dtype and ours[key].tobytes() == theirs[key].tobytes(), (name, key)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for run in ("first", "second", "third", "fourth"):
            got = results[run]
            assert got["rows"] == reference["rows"] and got["time_ids_dtype"] == reference["time_ids_dtype"]
            for key, value in reference["values"].items():
                assert got["values"][key].dtype == value.dtype and torch.equal(got["values"][key], value), (rank, run, key)
        # the counts name every rank's work: read + encoded = the distinct files, each once
        assert results["first"]["counts"] == (0, len(FILES), 0, [])
        assert results["second"]["counts"] == (len(FILES), 0, 0, [])
        assert results["third"]["counts"] == (len(FILES) - 1, 1, 0, [("img1_te_outputs.npz", "unreadable")])
        # (img2's copy counts as read by its owner, as one process counts it: the counts exchanged)
        assert results["fourth"]["counts"] == (len(FILES), 0, 0, [])


def test_train_writes_each_text_file_once_across_the_ranks(tmp_path, monkeypatch):
    """``train`` under torchrun's variables: the hook gets the run's group; rank 0 reports every rank's encodes; a
    second run reads all and trains bit for bit as the first."""
    from safetensors.torch import load_file
    from tiny_checkpoints import tiny_sdxl_file
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 3, caption=[f"sks toy, photo {i}" for i in range(3)])
    model = tiny_sdxl_file(tmp_path / "sdxl.safetensors")
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_text_files, "write_npz_text_outputs", _logging_writes(log))
    args = ["train", "lora", "--model", str(model), "--images", str(images), "--resolution", "16", "--steps", "1",
            "--batch-size", "1", "--seed", "3", "--rank", "2", "--no-text-encoder", "--cache-text-encoder-outputs-to-disk"]
    runs = []
    for name in ("a", "b"):  # (each rank's exit status checked)
        rank0 = _torchrun([*args, "-o", str(tmp_path / f"{name}.safetensors")], tmp_path)[0]
        runs.append(rank0.stdout + rank0.stderr)
    writes = logged_writes(log)
    assert sorted(name for _, name in writes) == [f"{i}_te_outputs.npz" for i in range(3)], writes
    assert all(rank == kohya_owner(int(name[0]), 2) for rank, name in writes), writes
    assert "0 image(s)' text-encoder outputs read from their _te_outputs.npz files, 3 encoded" in runs[0], runs[0][-3000:]
    assert "3 image(s)' text-encoder outputs read from their _te_outputs.npz files, 0 encoded" in runs[1], runs[1][-3000:]
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _latent_worker(rank: int, world: int, port: int, folder: str) -> None:
    import dataclasses

    import torch.distributed as dist
    from test_disk_latents_data_parallel import _dataset

    from sdadapt.toy import load_toy
    from sdadapt.training import kohya_latent_files
    from sdadapt.training.data import Dataset, encode_buckets
    from sdadapt.training.data_parallel import active

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    records = _dataset(Path(folder) / "imgs").records
    listed = [records[0], dataclasses.replace(records[0], caption="another subset"), *records[1:]]
    dataset, toy = Dataset(listed, flip=True), load_toy()
    disk = kohya_latent_files.KohyaLatentFiles(toy)
    disk.share_out(dataset.records, flip=True, group=active(), batch=2)
    encode_buckets(dataset, toy.encode_images, latents_of=disk)
    torch.save({"latents": dataset.latents, "counts": (disk.read, disk.encoded)}, Path(folder) / f"latents{rank}.pt")
    dist.destroy_process_group()


def test_an_image_listed_twice_is_one_latent_file_made_by_one_rank(tmp_path, monkeypatch):
    """``share_out`` deals out the distinct files (kohya: one image per path): img0 listed twice (two subsets of one
    folder) is written once and the other files keep their owners (img ``i`` by rank ``i % 2``)."""
    from test_disk_latents_data_parallel import N, _dataset, _images
    from test_disk_latents_data_parallel import _logging_writes as latent_writes

    from sdadapt.toy import load_toy
    from sdadapt.training import kohya_latent_files
    from sdadapt.training.data import encode_buckets

    images = _images(tmp_path / "imgs")
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_latent_files, "write_npz_latents", latent_writes(log))
    fork_ranks(_latent_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    writes = logged_writes(log)
    assert sorted(name for _, name in writes) == [f"img{i}_0032x0032_sd.npz" for i in range(N)], writes
    assert all(rank == kohya_owner(int(name[3]), 2) for rank, name in writes), writes
    alone = _dataset(images)
    encode_buckets(alone, load_toy().encode_images)
    (bucket,) = alone.latents
    want = torch.cat([alone.latents[bucket][:1], alone.latents[bucket]])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"latents{rank}.pt")
        assert torch.equal(got["latents"][bucket], want) and got["counts"] == (0, N), got["counts"]  # (one image, one file: counted once)
