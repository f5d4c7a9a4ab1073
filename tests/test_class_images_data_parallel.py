"""Prior preservation's class images under data parallel (two gloo ranks on the CPU): made once across the
processes, every process with all of them, bit for bit one process's; a DreamBooth run equal to one process with
the global batch; a Custom Diffusion ``--concepts-list`` run whose class images are still to be made works, each
file written once, by rank 0; the DreamBooth run with ``--class-data-dir`` (still empty) writes them once, by rank 0,
and trains bit for bit as without it; a rank failing while making them stops the other with ``PeerProcessError``.

The reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951,
examples/dreambooth/train_dreambooth.py:887-901 and examples/custom_diffusion/train_custom_diffusion.py:774-792:
``sample_dataloader = accelerator.prepare(DataLoader(PromptDataset(class_prompt, num_new_images),
batch_size=sample_batch_size))``, so process ``r`` makes the batches ``r, r + N, ...``
(huggingface/accelerate@16cb6eb80dd9aa8b4df1a63ef57863e455d53b83, src/accelerate/data_loader.py:213-233,
``BatchSamplerShard._iter_with_no_split``: ``idx % num_processes == process_index``), and every process saves its
own. sdadapt deals its chunks of 16 out the same way (``rank_chunks``), without accelerate's padding
(data_loader.py:235-271 repeats the first batches so every process gets as many: extra files in diffusers), each
chunk seeded as one process seeds it (diffusers' pipeline draws from the global RNG, ``set_seed(args.seed)`` the same
on every process: its processes' batches repeat each other's noise), then shares them (``share_chunks``)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from _fast_dist import fork_ranks
from safetensors.torch import load_file

from sdadapt.cli import main
from sdadapt.images import read_image_channels, to_uint8, write_png

#: five prompts in chunks of 2: chunks 0 and 2 (prompts 0, 1, 4) on rank 0, chunk 1 (prompts 2, 3) on rank 1
_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]
#: the DreamBooth run of both sides (SGD: the ranks sum gradients in another order; see test_train_data_parallel.py)
_DREAMBOOTH = ["train", "dreambooth", "--model", "toy", "--optimizer", "sgd-nesterov", "--learning-rate", "0.05",
               "--seed", "3", "--steps", "2", "--class-images", "2", "--prompt", "a red circle"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path, n: int, *, seed: int = 0, names: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        write_png(folder / f"{names}{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
    return folder


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """Both ranks, in one gloo group: class_images shared out; a DreamBooth run; a concepts-list run with class
    images to make; then rank 1 failing in its chunk."""
    import torch.distributed as dist

    from sdadapt.errors import PeerProcessError
    from sdadapt.methods import class_images
    from sdadapt.toy import load_toy
    from sdadapt.training.data_parallel import active, share_chunks, wait_for_all_ranks

    root = Path(folder)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    group = active()
    results: dict[str, object] = {}
    toy = load_toy()
    # 1. the library: five images in chunks of 2, every rank gets all five; rank 0 also makes them alone
    seen: list[tuple[int, int]] = []
    images, prompts = class_images(toy, _PROMPTS, seed=5, steps=2, batch=2, group=group,
                                   progress=lambda done, total, info: seen.append((done, total)))
    results["shared"], results["prompts"], results["progress"] = images, prompts, seen
    if rank == 0:
        results["one"] = class_images(toy, _PROMPTS, seed=5, steps=2, batch=2)[0]
    # share_chunks sends each chunk's dtype, shape and bits as they are (rank 0: chunks 0, 2, 4; rank 1: 1, 3)
    chunks = {0: torch.arange(6, dtype=torch.float16).reshape(2, 3) - 2.5, 1: torch.tensor([-0.0, 1.5], dtype=torch.bfloat16),
              2: torch.tensor(7, dtype=torch.int64), 3: torch.arange(4, dtype=torch.uint8).reshape(1, 2, 1, 2),
              4: torch.tensor([0.1, 1 / 3], dtype=torch.float64)}
    results["chunks"] = share_chunks({k: v for k, v in chunks.items() if k % world == rank}, 5, group)
    # 2. `train dreambooth` with 2 class images, a chunk each (the test made the chunks 1 image): global batch 2
    code, err = _quiet_main([*_DREAMBOOTH, "--images", str(root / "imgs"), "--batch-size", "1",
                             "-o", str(root / "dp.safetensors")])
    results["dreambooth"] = (code, err)
    # 3. `train custom-diffusion --concepts-list` whose class images are still to be made: written once, by rank 0
    results["concepts"] = _quiet_main(["train", "custom-diffusion", "--concepts-list", str(root / "c.json"), "--token",
                                       "<new1>+<new2>", "--init-word", "red+blue", "--model", "toy", "--resolution", "16",
                                       "--steps", "1", "--batch-size", "1", "--class-images", "2", "--seed", "3",
                                       "-o", str(root / "cd.safetensors")])
    # 4. the DreamBooth run again, its class images kept in --class-data-dir (still to be made): written once, by rank 0
    results["folder"] = _quiet_main([*_DREAMBOOTH, "--images", str(root / "imgs"), "--batch-size", "1",
                                     "--class-data-dir", str(root / "reg_db"), "-o", str(root / "dp-folder.safetensors")])
    wait_for_all_ranks("the test's runs")
    # 5. rank 1 fails making its chunk and leaves the group: rank 0's share of the chunks names the failure
    if rank == 1:
        def failing(*args, **kwargs):
            raise OSError("rank 1 fails making its class images (the test)")

        toy.sample = failing
        try:
            class_images(toy, _PROMPTS, seed=5, steps=1, batch=2, group=group)
        except OSError as exc:
            results["failed"] = str(exc)
        torch.save(results, root / f"rank{rank}.pt")
        dist.destroy_process_group()
        return
    try:
        class_images(toy, _PROMPTS, seed=5, steps=1, batch=2, group=group)
        results["peer"] = None
    except PeerProcessError as exc:
        results["peer"] = str(exc)
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_class_images_are_made_once_across_the_ranks_and_equal_one_process(tmp_path, monkeypatch):
    import sdadapt.custom_diffusion.concepts as concepts_module
    import sdadapt.training.class_folder as class_folder_module
    from sdadapt.methods import class_images
    from sdadapt.toy.system import ToySystem

    # the CLI's chunks of 16 class images made 1 image here (the forked ranks inherit it): 2 class images, one on each
    # rank, at a tenth of the sampling 16 would take; the one-process run below makes them in the same chunks
    monkeypatch.setitem(class_images.__wrapped__.__kwdefaults__, "batch", 1)
    writes = tmp_path / "writes.txt"
    real_write_png = class_folder_module.write_png

    def logged_write_png(path, image, **kwargs):  # (every class image written: which rank, which file)
        import time

        import torch.distributed as dist

        time.sleep(0.2)  # (a slow disk: another rank must not read the folder before the files are there)
        with open(writes, "a") as log:
            log.write(f"{dist.get_rank() if dist.is_initialized() else '-'} {Path(path).name}\n")
        return real_write_png(path, image, **kwargs)

    monkeypatch.setattr(class_folder_module, "write_png", logged_write_png)
    read = tmp_path / "read.txt"
    real_concept_class_images = concepts_module.concept_class_images

    def logged_concept_class_images(*args, **kwargs):  # (the class images each rank trains on)
        import torch.distributed as dist

        reg = real_concept_class_images(*args, **kwargs)
        with open(read, "a") as log:
            log.write(f"{dist.get_rank()}|{'+'.join(r.path.name for r in reg.records)}\n")
        return reg

    monkeypatch.setattr(concepts_module, "concept_class_images", logged_concept_class_images)
    samples = tmp_path / "samples.txt"
    real_sample = ToySystem.sample

    def logged_sample(self, prompts, *, seed=0, steps=25, **kwargs):  # (every sampler run: which rank, what)
        import torch.distributed as dist

        if steps == 25:  # (the runs' class images; the library part takes fewer steps)
            with open(samples, "a") as log:
                log.write(f"{dist.get_rank() if dist.is_initialized() else '-'}|{seed}|{'+'.join(prompts)}\n")
        return real_sample(self, prompts, seed=seed, steps=steps, **kwargs)

    monkeypatch.setattr(ToySystem, "sample", logged_sample)
    _images(tmp_path / "imgs", 2)
    _images(tmp_path / "circles", 1, seed=1)
    _images(tmp_path / "squares", 1, seed=2)
    _images(tmp_path / "reg_squares", 1, seed=3, names="own")  # concept 1 has 1 of its 2 class images
    (tmp_path / "c.json").write_text(json.dumps([
        {"instance_prompt": "a <new1> circle", "class_prompt": "a red circle", "instance_data_dir": str(tmp_path / "circles"),
         "class_data_dir": str(tmp_path / "reg_circles")},  # (made: no folder yet)
        {"instance_prompt": "a <new2> square", "class_prompt": "a blue square",
         "instance_data_dir": str(tmp_path / "squares"), "class_data_dir": str(tmp_path / "reg_squares")}]))

    fork_ranks(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)  # (tests/_fast_dist.py: forked ranks)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # 1. every rank holds the five images, bit for bit what one process makes; each rank made its own chunks
    one = ranks[0]["one"]
    assert one.shape == (5, 3, 32, 32) and one.dtype == torch.float32
    for rank in ranks:
        assert rank["shared"].dtype == one.dtype and torch.equal(rank["shared"], one)
        assert rank["prompts"] == _PROMPTS
    assert ranks[0]["progress"] == [(2, 3), (3, 3)] and ranks[1]["progress"] == [(2, 2)]  # (its own images)
    want = [torch.arange(6, dtype=torch.float16).reshape(2, 3) - 2.5, torch.tensor([-0.0, 1.5], dtype=torch.bfloat16),
            torch.tensor(7, dtype=torch.int64), torch.arange(4, dtype=torch.uint8).reshape(1, 2, 1, 2),
            torch.tensor([0.1, 1 / 3], dtype=torch.float64)]  # (not float32 values: sent as they are)
    for rank in ranks:
        for got, chunk in zip(rank["chunks"], want, strict=True):
            assert got.dtype == chunk.dtype and got.shape == chunk.shape and torch.equal(got, chunk)
        assert torch.signbit(rank["chunks"][1][0])  # (the bits: -0.0 stays -0.0)
    # the runs' class images, each made once: DreamBooth's 2 (seed 3 + i) one on each rank; the concepts' (concept
    # 0 from seed 3, concept 1 from 3 + 100003 + the 1 image there), a chunk each, dealt out concept by concept
    made_by = [line.split("|") for line in samples.read_text().splitlines()]
    assert len(made_by) == 7
    # (the concepts' start after the DreamBooth run's end; the DreamBooth run with --class-data-dir's after theirs)
    dreambooth, concepts, folder_run = made_by[:2], made_by[2:5], made_by[5:]
    assert sorted((r, seed) for r, seed, _ in dreambooth) == [("0", "3"), ("1", "4")]
    assert sorted((r, seed) for r, seed, _ in folder_run) == [("0", "3"), ("1", "4")]
    assert sorted((r, seed, p) for r, seed, p in concepts) == [
        ("0", "100007", "a blue square"), ("0", "3", "a red circle"), ("1", "4", "a red circle")]
    # 2. DreamBooth on 2 processes (batch 1 each, class images one per rank) = one process with batch 2
    for rank in ranks:
        assert rank["dreambooth"][0] == 0, rank["dreambooth"][1][-3000:]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([*_DREAMBOOTH, "--images", "imgs", "--batch-size", "2", "-o", "one.safetensors", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    a, b = load_file(tmp_path / "dp.safetensors"), load_file(tmp_path / "one.safetensors")
    assert set(a) == set(b) and a
    for key in a:  # (the tolerance of tests/test_train_data_parallel.py: the ranks sum gradients in another order)
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    logs = [(tmp_path / name).read_text().splitlines() for name in ("dp-log.csv", "one-log.csv")]
    assert [row.split(",")[:2] for row in logs[0]] == [row.split(",")[:2] for row in logs[1]]
    assert [float(row.split(",")[2]) for row in logs[0][1:]] == pytest.approx(
        [float(row.split(",")[2]) for row in logs[1][1:]], rel=1e-5)
    assert [float(row.split(",")[3]) for row in logs[0][1:]] == [float(row.split(",")[3]) for row in logs[1][1:]]
    # 3. the concepts list trained on both ranks; every class image written once, by rank 0
    for rank in ranks:
        assert rank["concepts"][0] == 0, rank["concepts"][1][-3000:]
    assert "class images are still to be generated" not in ranks[0]["concepts"][1]
    assert "[0]: 2 class image(s) of 'a red circle' generated into" in ranks[0]["concepts"][1]
    assert "[1]: 1 class image(s) of 'a blue square' generated into" in ranks[0]["concepts"][1]
    made = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("reg_circles", "reg_squares")}
    assert [n.split("-")[0] for n in made["reg_circles"]] == ["0", "1"]
    assert made["reg_squares"][1] == "own0.png" and made["reg_squares"][0].startswith("1-")
    written = [line.split() for line in writes.read_text().splitlines()]
    # every rank read every file, after rank 0 wrote them all
    assert sorted(read.read_text().splitlines()) == [f"{r}|{'+'.join(made['reg_circles'] + made['reg_squares'])}"
                                                     for r in (0, 1)]
    db_folder = sorted(p.name for p in (tmp_path / "reg_db").iterdir())
    assert [n.split("-")[0] for n in db_folder] == ["0", "1"]
    assert sorted(written) == sorted([["0", n] for n in made["reg_circles"] + db_folder] + [["0", made["reg_squares"][0]]])
    # the DreamBooth run with the folder trained bit for bit as the one without it (the same ranks, the same order)
    assert ranks[0]["folder"][0] == 0 and ranks[1]["folder"][0] == 0, ranks[0]["folder"][1][-3000:]
    assert "2 class image(s) generated into it (0 there, 2 wanted)" in ranks[0]["folder"][1]
    kept, memory = load_file(tmp_path / "dp-folder.safetensors"), load_file(tmp_path / "dp.safetensors")
    assert kept.keys() == memory.keys() and all(torch.equal(kept[k], memory[k]) for k in kept)
    # each file is the image its name's digest was taken of (diffusers' {n}-{sha1}), the two circles different
    for name, files in made.items():
        for file in files:
            if "-" in file:
                pixels = read_image_channels(tmp_path / name / file)[..., :3]
                assert hashlib.sha1(pixels.tobytes()).hexdigest() == Path(file).stem.split("-")[1]
    assert made["reg_circles"][0].split("-")[1] != made["reg_circles"][1].split("-")[1]
    # ... and they are one process's: the first circle is the one-image chunk 0 of 'a red circle' at seed 3
    first = class_images(_toy(), ["a red circle"], seed=3, size=(16, 16))[0]
    assert hashlib.sha1(to_uint8(first[0]).tobytes()).hexdigest() == Path(made["reg_circles"][0]).stem.split("-")[1]
    # 5. rank 1 failed making its chunk: rank 0 stopped with PeerProcessError naming itself, not a bare RuntimeError
    assert ranks[1]["failed"] == "rank 1 fails making its class images (the test)"
    peer = ranks[0]["peer"]
    assert peer is not None and "rank 0 of 2" in peer and "another process" in peer and "class images" in peer


def _toy():
    from sdadapt.toy import load_toy

    return load_toy()
