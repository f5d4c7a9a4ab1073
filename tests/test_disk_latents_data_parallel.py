"""``--cache-latents-to-disk`` under data parallel (two gloo ranks on the CPU, forked: tests/_fast_dist.py).

kohya's rule (sd-scripts@48d368fa library/train_util.py:1147-1185 ``BaseDataset.new_cache_latents``): with
``cache_to_disk`` the image ``i`` is checked and, when its file is missing or unusable, encoded by the process with
``i % num_processes == process_index`` only; then ``accelerator.wait_for_everyone()`` (2625-2629) and every process
reads every file. :func:`_fast_dist.kohya_owner` transcribes the split. Here: every file written exactly once across the ranks,
by its owner; every rank's latents bit for bit one process's; a second run writes nothing; an unusable file is
rewritten once, by its owner, and both ranks report it.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
from _fast_dist import fork_ranks, free_port, kohya_owner, logged_writes, logging_writes
from test_train_data_parallel import _torchrun

from sdadapt.images import write_png
from sdadapt.training import kohya_latent_files
from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset

N = 5  # (odd: rank 0 owns 0, 2, 4; rank 1 owns 1, 3)


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(N):
        write_png(folder / f"img{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text(f"a photo {i}")
    return folder


def _dataset(folder: Path) -> Dataset:
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    return Dataset(records, flip=True)


def _logging_writes(log: Path):
    """``write_npz_latents`` logging each write's ``(rank, file name)`` to ``log``."""
    return logging_writes(kohya_latent_files.write_npz_latents, log)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from sdadapt.toy import load_toy
    from sdadapt.training.data_parallel import active

    root = Path(folder)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    group, toy, results = active(), load_toy(), {}
    for run in ("first", "second", "third"):
        if run == "third" and rank == 0:  # img3 (rank 1's) cut short, as by an interrupted write
            path = next((root / "imgs").glob("img3_*.npz"))
            path.write_bytes(path.read_bytes()[:40])
        dist.barrier()
        dataset, disk = _dataset(root / "imgs"), kohya_latent_files.KohyaLatentFiles(toy)
        disk.share_out(dataset.records, flip=dataset.flip, group=group, batch=2)
        encode_buckets(dataset, toy.encode_images, latents_of=disk)
        dist.barrier()  # (every rank done reading this run's files before rank 0 cuts one short for the next)
        results[run] = {"latents": dataset.latents, "flipped": dataset.latents_flipped,
                        "counts": (disk.read, disk.encoded, [(p.name, why[:11]) for p, why in disk.rewritten])}
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_each_file_is_written_once_by_its_owner_and_every_rank_reads_all(tmp_path, monkeypatch):
    from sdadapt.toy import load_toy

    images = _images(tmp_path / "imgs")
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_latent_files, "write_npz_latents", _logging_writes(log))  # (the forks inherit it)
    fork_ranks(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    writes = logged_writes(log)
    names = [p.name for p in sorted(images.glob("*.png"))]  # (find_images' order: the dataset's)
    npz = {f"img{i}_0032x0032_sd.npz": i for i in range(N)}
    # first run: each file once, by kohya's owner; second: none; third: the cut file only, by its owner (rank 1)
    first, third = writes[:N], writes[N:]
    assert sorted(name for _, name in first) == sorted(npz)
    assert all(rank == kohya_owner(npz[name], 2) for rank, name in first), first
    assert third == [(1, "img3_0032x0032_sd.npz")]
    assert names == [f"img{i}.png" for i in range(N)]
    # every rank: the latents of one process encoding them all (the in-memory path), bit for bit, in every run
    alone = _dataset(images)
    encode_buckets(alone, load_toy().encode_images)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for run in ("first", "second", "third"):
            for key, reference in (("latents", alone.latents), ("flipped", alone.latents_flipped)):
                assert results[run][key].keys() == reference.keys()
                for bucket in reference:
                    assert torch.equal(results[run][key][bucket], reference[bucket]), (rank, run, key)
        # the counts name every rank's work (rank 0's report): read + encoded = the images, each once
        assert results["first"]["counts"] == (0, N, [])
        assert results["second"]["counts"] == (N, 0, [])
        assert results["third"]["counts"] == (N - 1, 1, [("img3_0032x0032_sd.npz", "unreadable ")])


def test_train_writes_each_file_once_across_the_ranks(tmp_path, monkeypatch):
    """``train`` under torchrun's variables: rank 0 reports every rank's encodes; a second run reads all and trains
    bit for bit as the first."""
    images = _images(tmp_path / "imgs")
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_latent_files, "write_npz_latents", _logging_writes(log))
    args = ["train", "lora", "--model", "toy", "--images", str(images), "--steps", "1", "--batch-size", "1",
            "--seed", "1", "--cache-latents-to-disk", "--flip-aug", "--rank", "2"]
    runs = []
    for name in ("a", "b"):  # (each rank's exit status checked)
        rank0 = _torchrun([*args, "-o", str(tmp_path / f"{name}.safetensors")], tmp_path)[0]
        runs.append(rank0.stdout + rank0.stderr)
    writes = logged_writes(log)
    assert sorted(name for _, name in writes) == sorted(f"img{i}_0032x0032_sd.npz" for i in range(N))
    assert all(rank == kohya_owner(int(name[3]), 2) for rank, name in writes), writes
    assert "0 image(s)' latents read from their .npz files, 5 encoded" in runs[0]
    assert "5 image(s)' latents read from their .npz files, 0 encoded" in runs[1]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
