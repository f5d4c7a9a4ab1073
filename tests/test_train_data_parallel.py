"""``python -m sdadapt train`` under torchrun: two gloo processes on the CPU, each with ``--batch-size b``,
train the same weights as one process with ``--batch-size 2b`` (same steps, LR and losses), only rank 0
writes and reports, a resumed run continues on both; what cannot train data-parallel is refused; the
pieces (:mod:`sdadapt.training.data_parallel`) against plain references."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from _fast_dist import cli_ranks, fork_ranks
from safetensors import safe_open
from safetensors.torch import load_file

from sdadapt.cli import main
from sdadapt.images import write_png
from sdadapt.training.data_parallel import (
    DataParallel,
    _buckets,
    rank_rows,
    shard_prepared,
)

#: SGD with Nesterov momentum, not AdamW: the ranks sum gradients in another order than one process, and
#: AdamW's m/√v turns a rounding-level difference of a near-zero gradient into a full ±lr step on one
#: element (tests/test_fsdp.py says the same). Measured: largest difference 6e-8 on weights up to 8.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png(folder / f"img{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text(f"a photo {i}")
    return folder


def _torchrun(args: list[str], cwd: Path, world: int = 2, *, other_cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """``python -m sdadapt *args`` in ``world`` processes with the variables torchrun sets (gloo on the CPU); ranks > 0
    in ``other_cwd`` when given (what they write with relative paths lands there). The ranks are forks of the test
    process (tests/_fast_dist.py: no rank re-imports torch and sdadapt), each with its own stdout and stderr."""
    done = cli_ranks(args, cwd, world, other_cwd=other_cwd)
    for rank, result in enumerate(done):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-3000:]}"
    return done


def _log(path: Path) -> list[tuple[int, int, float, float]]:
    """The run log's (step, epoch, loss, lr) rows (the seconds differ)."""
    rows = path.read_text().splitlines()[1:]
    return [(int(s), int(e), float(loss), float(lr)) for s, e, loss, lr, *_ in (r.split(",") for r in rows)]


def _assert_same_weights(parallel: Path, single: Path) -> None:
    a, b = load_file(parallel), load_file(single)
    assert set(a) == set(b) and a
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
        moved += int(b[key].abs().max() > 0)
    assert moved > len(a) // 2


def _assert_same_log(parallel: Path, single: Path) -> None:
    ours, theirs = _log(parallel), _log(single)
    assert [(s, e, lr) for s, e, _, lr in ours] == [(s, e, lr) for s, e, _, lr in theirs]
    assert [loss for *_, loss, _ in ours] == pytest.approx([loss for *_, loss, _ in theirs], rel=1e-5)
    # the other columns (the max-norm statistics, the validation losses) too, where the run logs them
    columns, *rows = parallel.read_text().splitlines()
    their_columns, *their_rows = single.read_text().splitlines()
    assert columns == their_columns
    extra = [i for i, name in enumerate(columns.split(",")) if name not in ("step", "epoch", "loss", "lr", "seconds")]
    for row, their_row in zip(rows, their_rows):
        ours_, theirs_ = row.split(","), their_row.split(",")
        assert [ours_[i] == "" for i in extra] == [theirs_[i] == "" for i in extra]
        assert [float(ours_[i]) for i in extra if ours_[i]] == pytest.approx(
            [float(theirs_[i]) for i in extra if theirs_[i]], rel=1e-5, abs=1e-7)


def _two_blocks(folder: Path, batch_sizes: tuple[int, int], counts: tuple[int, int] = (4, 3)) -> Path:
    """A dataset TOML of two ``[[datasets]]`` blocks (``counts`` images) with ``batch_sizes``."""
    _images(folder / "a", counts[0])
    _images(folder / "b", counts[1])
    toml = folder / f"data{batch_sizes[0]}.toml"
    toml.write_text("".join(f"""[[datasets]]
resolution = 32
batch_size = {size}
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "{(folder / name).as_posix()}"
""" for name, size in zip("ab", batch_sizes)))
    return toml


def test_lora_on_two_processes_equals_one_process_with_the_global_batch(tmp_path):
    # two [[datasets]] blocks, batch sizes 1 and 2 per process: global batches of 2 (4 images: 2 batches, one row
    # per rank) and 4 (3 images: one batch of 2 + 1 rows, the losses weighted 4/3 and 2/3); 3 steps an epoch, as
    # one process with the blocks' batch sizes 2 and 4. DreamBooth-style class images (a second forward) come
    # with the toy lora (4 of them, --class-images: the largest global batch's rows; sampling the default 14 on each
    # rank and in the one process was a third of the test's time). Rank 1 runs in a folder of its own: it must write
    # nothing there.
    # With it: the text encoder's LoRA (its own LR), kohya's max-norm scaling, an EMA, and the validation loss
    # after every step of 2 + 1 held-out images (--validation-split 0.4 of blocks of 6 and 4: 4 and 3 train), a
    # validation batch of 2 (a row each) and one of 1 (rank 1 has none): each rank scores its rows, the log's
    # validation losses (and max-norm statistics) are the one process's.
    (tmp_path / "rank1").mkdir()
    args = ["train", "lora", "--model", "toy", "--epochs", "1", "--optimizer", "sgd-nesterov", "--learning-rate", "0.5",
            "--seed", "3", "--text-encoder-lr", "0.2", "--scale-weight-norms", "0.5", "--ema-decay", "0.9",
            "--validation-split", "0.4", "--validate-every-n-steps", "1", "--class-images", "4"]
    ranks = _torchrun([*args, "--dataset-config", str(_two_blocks(tmp_path, (1, 2), (6, 4))), "-o", "dp.safetensors"],
                      tmp_path, other_cwd=tmp_path / "rank1")
    assert "validation loss (3 held-out images)" in ranks[0].stdout
    assert "trained lora" in ranks[0].stdout and "wrote dp.safetensors" in ranks[0].stdout
    assert ranks[1].stdout == "" and "loading toy" not in ranks[1].stderr  # rank 1 trains silently
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "data1.toml", "dp-log.csv", "dp.safetensors", "rank1"]
    assert not list((tmp_path / "rank1").iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([*args, "--dataset-config", str(_two_blocks(tmp_path / "one", (2, 4), (6, 4))), "-o",
                     "one.safetensors", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    _assert_same_weights(tmp_path / "dp.safetensors", tmp_path / "one.safetensors")
    _assert_same_log(tmp_path / "dp-log.csv", tmp_path / "one-log.csv")
    assert [s for s, *_ in _log(tmp_path / "dp-log.csv")] == [1, 2, 3]  # (an epoch: 2 + 1 global batches)
    header, *rows = (tmp_path / "dp-log.csv").read_text().splitlines()
    assert "validation_step_loss" in header and "max_key_norm" in header and all(r.split(",")[-2] for r in rows)
    moved_te = [k for k, v in load_file(tmp_path / "dp.safetensors").items()
                if k.startswith("lora_te_") and k.endswith("lora_up.weight") and v.abs().max() > 0]
    assert moved_te  # (the text encoder's LoRA trained: its up weights start at zero)
    with safe_open(tmp_path / "dp.safetensors", "pt") as f:
        meta = f.metadata()
    assert [d["batch_size_per_device"] for d in json.loads(meta["ss_datasets"])] == [1, 2]


def test_full_fine_tune_with_accumulation_and_resume_on_two_processes(tmp_path, capsys):
    # 5 images, global batch 4 (2 per process): 2 batches an epoch, accumulated 2 by 2: one step an epoch
    _images(tmp_path / "imgs", 5)
    # --color-aug: the pixels augmented at every step, each process VAE-encoding its own rows of the global batch
    args = ["train", "full", "--images", "imgs", "--model", "toy", "--optimizer", "sgd-nesterov", "--learning-rate",
            "0.05", "--seed", "3", "--gradient-accumulation-steps", "2", "--save-state-on-train-end", "--ddp-timeout", "5",
            "--color-aug"]
    _torchrun([*args, "--epochs", "2", "--batch-size", "2", "-o", "dp.safetensors"], tmp_path)
    record = json.loads((tmp_path / "dp-state" / "run.json").read_text())
    assert record["world_size"] == 2 and record["batch_size"] == 2
    with safe_open(tmp_path / "dp.safetensors", "pt") as f:
        meta = f.metadata()
    # kohya's: per device 2, total = 2 × 2 processes × 2 accumulation
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "8"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([*args, "--epochs", "2", "--batch-size", "4", "-o", "one.safetensors", "--quiet"]) == 0
        _assert_same_weights(tmp_path / "dp.safetensors", tmp_path / "one.safetensors")
        # a state of 2 processes resumed in one: refused (the global batch would change)
        capsys.readouterr()
        assert main([*args, "--epochs", "4", "--batch-size", "2", "-o", "dp.safetensors", "--resume", "dp-state",
                     "--overwrite", "--quiet"]) != 0
        assert "processes 2 (now 1" in capsys.readouterr().err
        assert main([*args, "--epochs", "4", "--batch-size", "4", "-o", "one.safetensors", "--resume", "one-state",
                     "--overwrite", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    _torchrun([*args, "--epochs", "4", "--batch-size", "2", "-o", "dp.safetensors", "--resume", "dp-state", "--overwrite"],
              tmp_path)
    _assert_same_weights(tmp_path / "dp.safetensors", tmp_path / "one.safetensors")
    _assert_same_log(tmp_path / "dp-log.csv", tmp_path / "one-log.csv")
    assert [s for s, *_ in _log(tmp_path / "dp-log.csv")] == [1, 2, 3, 4]


def test_rank_0_saves_nothing_after_a_peer_failure_when_the_weights_are_not_a_reported_steps(tmp_path):
    from types import SimpleNamespace

    from sdadapt.errors import PeerProcessError
    from sdadapt.jobs.train import TrainOptions, _save_after_peer_failure

    saves = []
    outputs = SimpleNamespace(periodic=lambda step: tmp_path / f"out-step{step:06d}.safetensors", state=tmp_path / "st")
    options = TrainOptions(images="x")

    def note(trained_steps: int | None, info_step: int | None, *, overwrite: bool = False) -> str:
        exc = PeerProcessError("boom")
        if trained_steps is not None:
            exc.trained_steps = trained_steps
        info = None if info_step is None else SimpleNamespace(step=info_step)
        return _save_after_peer_failure(exc, info, 5, outputs, dataclasses.replace(options, overwrite=overwrite),
                                        lambda i, path: saves.append((i.step, path)))

    assert "saved nothing" in note(3, 2) and "past step 2" in note(3, 2)  # (failed after step 3's update)
    assert "saved nothing (no step had finished)" in note(0, None) and "training had ended" in note(5, 5)
    assert not saves
    assert note(2, 2).startswith("rank 0 saved the weights after step 2 of 5") and saves == [(2, outputs.periodic(2))]
    outputs.periodic(2).write_bytes(b"")
    assert "exists; --overwrite" in note(2, 2) and len(saves) == 1
    assert "saved the weights" in note(2, 2, overwrite=True) and len(saves) == 2


@pytest.mark.parametrize(("argv", "words"), [
    (["lora", "--cuda-graph"], "--cuda-graph"),
    (["full", "--fused-backward-pass", "--max-grad-norm", "0"], "--fused-backward-pass"),
])
def test_what_cannot_train_data_parallel_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.setenv("WORLD_SIZE", "2")  # (refused before the process group is joined: no second process needed)
    monkeypatch.setenv("RANK", "0")
    images = _images(tmp_path / "imgs", 1)
    code = main(["train", argv[0], "--images", str(images), "--model", "toy", "--steps", "1", *argv[1:],
                 "-o", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code != 0 and "2 processes" in err and words in err and "loading" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_rank_rows_split_the_global_batch_like_tensor_split():
    for total in range(1, 11):
        for world in (1, 2, 3, 4):
            pieces = torch.arange(total).tensor_split(world)
            mean = 0.0
            for rank in range(world):
                start, stop, factor = rank_rows(total, rank, world)
                if len(pieces[rank]):
                    assert list(range(start, stop)) == pieces[rank].tolist()
                else:
                    assert (start, stop, factor) == (0, 1, 0.0)
                values = torch.arange(total, dtype=torch.float64)[start:stop] ** 2
                mean += factor * float(values.mean()) / world
            # the mean over ranks of the factor-weighted slice means is the global batch's mean
            assert mean == pytest.approx(float((torch.arange(total, dtype=torch.float64) ** 2).mean()))


def test_shard_prepared_takes_the_rows_of_every_batch_tensor():
    g = torch.Generator().manual_seed(0)
    prepared = {"x_t": torch.randn(5, 4, 2, 2, generator=g), "t": torch.arange(5), "target": torch.randn(5, 4, 2, 2),
                "weights": torch.ones(5), "cond": {"ids": torch.arange(15).reshape(5, 3), "time_ids": torch.ones(5, 6), "shared": torch.ones(1, 3)},
                "huber_c": 0.1, "latents": torch.randn(5, 4, 2, 2),
                "prior": {"x_t": torch.randn(2, 4, 2, 2), "weights": torch.ones(2), "t": torch.arange(2)},
                "prior_weight": 1.0}
    first = shard_prepared(prepared, DataParallel(0, 2))
    second = shard_prepared(prepared, DataParallel(1, 2))
    assert torch.equal(first["x_t"], prepared["x_t"][:3]) and torch.equal(second["x_t"], prepared["x_t"][3:])
    assert torch.equal(second["cond"]["ids"], prepared["cond"]["ids"][3:]) and second["cond"]["time_ids"].shape == (2, 6)
    assert second["cond"]["shared"] is prepared["cond"]["shared"]  # (not the batch's rows: left as it is)
    assert "share" not in shard_prepared({**prepared, "x_t": prepared["x_t"][:4]}, DataParallel(1, 2))  # (even: none)
    # n_rank · world / B: 3·2/5 and 2·2/5, so (1.2·mean₃ + 0.8·mean₂) / 2 is the mean of the 5
    assert first["weights"].tolist() == pytest.approx([1.2] * 3) and second["weights"].tolist() == pytest.approx([0.8] * 2)
    assert (first["share"], second["share"]) == pytest.approx((1.2, 0.8))  # (a method's extra loss: step_loss)
    assert torch.equal(first["prior"]["t"], torch.tensor([0])) and torch.equal(second["prior"]["t"], torch.tensor([1]))
    assert first["prior"]["weights"].tolist() == [1.0] and first["huber_c"] == 0.1 and first["prior_weight"] == 1.0


def test_gradient_buckets_keep_one_dtype_and_the_size_limit():
    grads = [torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(30), torch.zeros(10), torch.zeros(200)]
    buckets = _buckets(grads, limit=160)  # 40 float32 elements
    assert sorted(i for b in buckets for i in b) == list(range(5))
    for bucket in buckets:
        assert len({grads[i].dtype for i in bucket}) == 1
        assert len(bucket) == 1 or sum(grads[i].numel() * grads[i].element_size() for i in bucket) <= 160
    assert [0, 2] in buckets and [4] in buckets  # (10 + 30 float32 fill one bucket; the 200 alone)


def test_launched_process_group_joins_with_the_launchers_variables_and_leaves(monkeypatch):
    import datetime

    import torch.distributed as dist

    from sdadapt.training.data_parallel import launched_process_group

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    with launched_process_group("cpu", timeout_minutes=7):
        pass
    assert calls == [("init", "gloo", {"timeout": datetime.timedelta(minutes=7)}), ("barrier",), ("destroy",)]
    calls.clear()
    with pytest.raises(RuntimeError), launched_process_group("cpu"):  # an error: no barrier (the others may be gone)
        raise RuntimeError("boom")
    assert calls == [("init", "gloo", {"timeout": None}), ("destroy",)]


def test_ddp_timeout_is_read_from_a_kohya_config_in_minutes(tmp_path):
    from train_inputs import read_train_toml

    from sdadapt.jobs import TrainOptions

    values, _, notes = read_train_toml(tmp_path / "k.toml", "ddp_timeout = 30\n")
    assert values == {"ddp_timeout": 30} and not any("ddp_timeout" in n for n in notes)
    values, _, _ = read_train_toml(tmp_path / "k.toml", "ddp_timeout = 0\n")  # (kohya's 0: torch's default)
    assert values == {}
    with pytest.raises(ValueError, match="--ddp-timeout"):
        TrainOptions(images="x", ddp_timeout=0)


#: ``train`` of a LoRA for 4 steps that rank 1 does not finish (_train_until_rank_1_fails); images and LR in the folder given
# (--no-prior, in both processes' run and the one-process run compared with them: sampling class images was most
# of these runs' time; DP with class batches is test_lora_on_two_processes_equals_one_process_with_the_global_batch's)
_KILLED_RUN = ["train", "lora", "--model", "toy", "--optimizer", "sgd-nesterov", "--learning-rate", "0.5",
               "--lr-scheduler", "constant", "--seed", "3", "--save-state", "--no-prior"]


def _train_until_rank_1_fails(rank: int, folder: Path) -> tuple[int, str]:
    """Both ranks run ``train`` (:data:`_KILLED_RUN`, global batch 4, in the group already joined); rank 1's third
    gradient all-reduce raises instead, and rank 1 leaves the group. ``(exit code, stderr)``."""
    import contextlib
    import io

    import sdadapt.training.data_parallel as dp

    if rank == 0:
        _images(folder / "imgs", 4)
    dp.wait_for_all_ranks("the test's images")
    original, calls = dp.average_gradients, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError("rank 1 fails in step 3 (the test)")
        return original(*args, **kwargs)

    if rank == 1:
        dp.average_gradients = failing
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([*_KILLED_RUN, "--images", str(folder / "imgs"), "--steps", "4", "--batch-size", "2", "-o",
                         str(folder / "dp.safetensors")])
    finally:
        dp.average_gradients = original
    return code, err.getvalue()


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    """The collectives on 2 gloo ranks: gradient averaging (a gradient missing on one rank, bf16, buckets
    of a few bytes), the fp16 loss scaler's skip decision, the loss mean, then rank 1 failing in ``train``
    (:func:`_train_until_rank_1_fails`) and leaving early."""
    import datetime

    import torch.distributed as dist

    from sdadapt.errors import PeerProcessError
    from sdadapt.training.data_parallel import average_gradients, mean_over_ranks
    from sdadapt.training.step import StepConfig, TrainState, clip_and_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    group = DataParallel(rank, world)
    results: dict[str, object] = {}
    # gradients: rank-dependent values; p1's gradient only on rank 1, p2's nowhere, p3 in bf16
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n, dtype in
              ((5, torch.float32), (3, torch.float32), (2, torch.float32), (4, torch.bfloat16), (7, torch.float32))]
    for i, p in enumerate(params):
        if i == 2 or (i == 1 and rank == 0):
            continue
        p.grad = (torch.arange(p.numel(), dtype=torch.float32) * (i + 1) + 10 * rank + 0.25).to(p.dtype)
    average_gradients(params, group, bucket_bytes=24)  # (6 float32 values a bucket: several all-reduces)
    results["grads"] = [None if p.grad is None else p.grad.clone() for p in params]
    # fp16 loss scaler: an inf on rank 1 only; after the average both ranks skip the step and halve the scale
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    state = TrainState()
    state.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    state.scaler.scale(torch.ones(()))  # (its scale is made at the first scale())
    config = StepConfig(mixed_precision="fp16", max_grad_norm=1.0)
    decisions = []
    for bad in (True, False):
        weight.grad = torch.full((4,), 8.0 * (rank + 1))
        if bad and rank == 1:
            weight.grad[2] = float("inf")
        average_gradients([weight], group)
        clip_and_step([weight], optimizer, state, config)
        decisions.append((int(state.skipped_steps), float(state.scaler.get_scale()), weight.detach().clone()))
    results["scaler"] = decisions
    results["loss"] = [float(v) for v in mean_over_ranks([torch.tensor(1.0 + rank), torch.tensor(3.0 * rank)], group)]
    dist.barrier()
    # `train` on both ranks; rank 1 fails at its third gradient all-reduce (in step 3) and leaves the group: rank 0's
    # all-reduce fails (PeerProcessError, exit 11) and it saves what 2 steps trained, as on Ctrl-C
    results["train"] = _train_until_rank_1_fails(rank, Path(out).parent)
    if rank == 1:  # rank 1 leaves: rank 0's next collective names the failure instead of a bare RuntimeError
        dist.destroy_process_group()
        return
    try:
        mean_over_ranks([torch.tensor(1.0)], group)
        results["peer"] = None
    except PeerProcessError as exc:
        results["peer"] = str(exc)
    torch.save(results, out)
    dist.destroy_process_group()


def test_collectives_average_gradients_agree_on_fp16_skips_and_name_a_failed_peer_after_rank_0_saved(tmp_path):
    from sdadapt.errors import PeerProcessError, exit_code_for

    out = str(tmp_path / "collectives.pt")
    fork_ranks(_collectives_worker, args=(2, _free_port(), out), nprocs=2)  # (tests/_fast_dist.py: forked ranks)
    results = torch.load(out, weights_only=True)

    def grad(i: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        n = (5, 3, 2, 4, 7)[i]
        return (torch.arange(n, dtype=torch.float64) * (i + 1) + 10 * rank + 0.25).to(dtype).double()

    grads = results["grads"]
    for i, dtype in ((0, torch.float32), (3, torch.bfloat16), (4, torch.float32)):
        expected = (grad(i, 0, dtype) + grad(i, 1, dtype)) / 2
        assert grads[i].dtype == dtype
        torch.testing.assert_close(grads[i].double(), expected, rtol=0 if dtype == torch.float32 else 2**-7, atol=0)
    # only on rank 1: rank 0 counts zeros, so the mean is half rank 1's (as one process's mean over both halves)
    torch.testing.assert_close(grads[1].double(), grad(1, 1, torch.float32) / 2, rtol=0, atol=0)
    assert grads[2] is None  # no gradient anywhere: the optimiser skips it as one process would
    (skips_bad, scale_bad, w_bad), (skips_good, scale_good, w_good) = results["scaler"]
    assert (skips_bad, scale_bad) == (1, 4.0) and torch.equal(w_bad, torch.ones(4))  # rank 0 skipped too
    # the good step: mean gradient (8 + 16) / 2 = 12 at scale 4 → 3 per element, clipped to norm 1 (0.5 each)
    assert (skips_good, scale_good) == (1, 4.0) and torch.allclose(w_good, torch.full((4,), 1 - 0.1 * 0.5))
    assert results["loss"] == [1.5, 1.5]
    peer = results["peer"]
    assert peer is not None and "rank 0 of 2" in peer and "another process" in peer and "its own output" in peer
    assert exit_code_for(PeerProcessError(peer)) == 11
    # `train`, rank 1 failed in step 3: rank 0 saved the weights and the state after step 2, and said so
    code, err = results["train"]
    assert code == 11, err[-3000:]
    assert "rank 0 of 2" in err and "another process" in err
    assert f"rank 0 saved the weights after step 2 of 4: {tmp_path / 'dp-step000002.safetensors'}" in err
    assert f"continue with --resume {tmp_path / 'dp-state'}" in err
    assert not (tmp_path / "dp.safetensors").exists()
    assert json.loads((tmp_path / "dp-state" / "state.json").read_text())["step"] == 2
    # ... which are one process's after 2 steps with the global batch
    assert main([*_KILLED_RUN, "--images", str(tmp_path / "imgs"), "--steps", "2", "--batch-size", "4", "-o",
                 str(tmp_path / "one.safetensors"), "--quiet"]) == 0
    _assert_same_weights(tmp_path / "dp-step000002.safetensors", tmp_path / "one.safetensors")


def test_a_methods_extra_loss_is_weighted_by_the_ranks_share_of_an_uneven_batch():
    # the mean over ranks of each rank's step loss (its rows, its share) is the one-process loss of the global
    # batch, with a batch-mean extra loss (DreamArtist's reconstruction), a constant one (a norm penalty) and
    # a class batch (prior preservation)
    from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss

    g = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000).cumprod(0)
    batch = {"latents": torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64), "cond": torch.randn(5, 3, generator=g)}
    prior = ({"latents": torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), "cond": torch.randn(3, 3)}, 0.7)
    config = StepConfig()
    prepared = prepare_batch(batch, state=TrainState(seed=1), config=config, alphas_cumprod=alphas.double(), prior=prior)

    def model(x, t, cond):
        return x * 0.5 + cond.double().sum(1).reshape(-1, 1, 1, 1)

    def extra(prep, prediction):
        return (prediction - prep["latents"]).abs().mean() * 0.3 + 0.125

    for world in (2, 3, 6):  # 5 rows on 6 ranks: one rank has none (share 0); float32 losses (step_loss)
        mean = sum(float(step_loss(model, shard_prepared(prepared, DataParallel(r, world)), config, extra))
                   for r in range(world)) / world
        assert mean == pytest.approx(float(step_loss(model, prepared, config, extra)), rel=1e-6)


def test_a_sharded_validation_pass_scores_each_ranks_rows_and_averages_to_the_whole_pass():
    # batches of 5, 2 and 1 rows on 2 and 3 ranks: each rank's model sees only its rows (none more), and the mean
    # over the ranks of their passes is the one-process pass (the noise drawn for the whole batch on every rank)
    import functools

    from sdadapt.training.step import StepConfig
    from sdadapt.training.validation import validation_loss

    g = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000).cumprod(0)
    batches = [{"latents": torch.randn(n, 4, 2, 2, generator=g), "cond": torch.randn(n, 3, generator=g)} for n in (5, 2, 1)]
    seen: list[int] = []

    def model(x, t, cond):
        seen.append(x.shape[0])
        return x * 0.5 + cond.sum(1).reshape(-1, 1, 1, 1)

    def run(group=None) -> float:
        shard = None if group is None else functools.partial(shard_prepared, group=group)
        return float(validation_loss(model, batches, config=StepConfig(), alphas_cumprod=alphas, timesteps=[200, 600],
                                     seed=4, shard=shard))

    whole = run()
    assert seen == [5, 5, 2, 2, 1, 1]
    for world in (2, 3):
        seen.clear()
        mean = sum(run(DataParallel(r, world)) for r in range(world)) / world
        assert mean == pytest.approx(whole, rel=1e-6)
        # the rows each rank ran (a rank without a row of a batch runs its row 0 at weight 0)
        expected = [len(torch.arange(n).tensor_split(world)[r]) or 1 for r in range(world) for n in (5, 5, 2, 2, 1, 1)]
        assert seen == expected


def _fit_config(optimizer: str):
    from sdadapt.methods import FitConfig

    return FitConfig(steps=3, batch_size=4, learning_rate=0.5 if optimizer == "sgd-nesterov" else 0.05,
                     warmup_steps=0, seed=3, optimizer=optimizer)


def _fit_run(optimizer: str, *, lora_seed: int, switch_on_rank0: bool) -> list[torch.Tensor]:
    """``fit`` of a LoRA (seed ``lora_seed``) on the toy over 4 concept images, global batch 4; with
    ``switch_on_rank0`` the schedule-free averaged weights are used after step 2 on rank 0 only (a
    sample or save there)."""
    from sdadapt.methods import METHODS, fit
    from sdadapt.toy import build_toy
    from sdadapt.toy.evaluate import concept_data
    from sdadapt.training.data_parallel import is_main_process

    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=lora_seed)
    images, captions = concept_data("cross", 4, seed=0)

    def on_step(info) -> None:
        if switch_on_rank0 and info.step == 2 and is_main_process():
            info.use_weights()

    fit(system, adaptation, images, captions, config=_fit_config(optimizer), on_step=on_step)
    return [p.detach().clone() for p in adaptation.params]


def _fit_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    # each rank's LoRA starts from its own seed: fit trains from rank 0's
    results = {name: _fit_run(name, lora_seed=1 + rank, switch_on_rank0=name == "sgd-schedulefree")
               for name in ("sgd-nesterov", "sgd-schedulefree")}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_fit_on_two_ranks_starts_from_rank_0s_weights_and_keeps_schedule_free_ranks_equal(tmp_path):
    out = str(tmp_path / "fit.pt")
    fork_ranks(_fit_worker, args=(2, _free_port(), out), nprocs=2)  # (tests/_fast_dist.py: forked ranks)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for name in ("sgd-nesterov", "sgd-schedulefree"):
        single = _fit_run(name, lora_seed=1, switch_on_rank0=name == "sgd-schedulefree")
        for a, b, ref in zip(ranks[0][name], ranks[1][name], single):
            assert torch.equal(a, b), name  # the ranks hold the same weights, bit for bit
            torch.testing.assert_close(a, ref, rtol=RTOL, atol=ATOL)
