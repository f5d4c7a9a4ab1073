"""Small correctness fixes: held signals, folders a failed write made, the train output check's exit
codes, quoted kohya values, kohya's caption fallback path, and the LR schedule over fp16 steps the
loss scaler skipped."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import warnings
from pathlib import Path

import pytest
import torch

from accelerate_sandbox import accelerate_sandbox
from sdadapt.errors import DiskSpaceError
from sdadapt.formats import files
from sdadapt.formats.files import atomic_write, staged_outputs, write_safetensors


# ------------------------------------------------------------------------------ held signals
@contextlib.contextmanager
def _handlers(**handlers):
    """Install ``SIGINT=...`` / ``SIGTERM=...`` handlers for the test; put back what was there."""
    saved = {getattr(signal, name): signal.signal(getattr(signal, name), handler) for name, handler in handlers.items()}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_every_signal_held_by_a_write_is_delivered_in_order():
    calls: list[int] = []
    with _handlers(SIGINT=lambda n, f: calls.append(n), SIGTERM=lambda n, f: calls.append(n),
                   SIGHUP=lambda n, f: calls.append(n)):
        with files.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # (twice: delivered once, as the kernel keeps one pending)
            assert calls == []
        assert calls == [signal.SIGTERM, signal.SIGINT]


def test_a_sigterm_held_behind_a_raising_sigint_is_not_lost():
    """SIGINT's handler raises KeyboardInterrupt when it is delivered; the SIGTERM that arrived after it
    during the block still reaches its handler (before: the loop stopped at the first exception)."""
    calls: list[int] = []

    def interrupt(number, frame):
        calls.append(number)
        raise KeyboardInterrupt

    with _handlers(SIGINT=interrupt, SIGTERM=lambda n, f: calls.append(n)):
        with pytest.raises(KeyboardInterrupt), files.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGINT, signal.SIGTERM]


def test_a_second_raising_handler_keeps_the_first_exception_as_its_context():
    class First(Exception):
        pass

    class Second(Exception):
        pass

    def first(number, frame):
        raise First

    def second(number, frame):
        raise Second

    with _handlers(SIGINT=first, SIGTERM=second), pytest.raises(Second) as raised, files.signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(raised.value.__context__, First)


# ------------------------------------------------------------------------- folders of failed writes
def _fail(tmp: str) -> None:
    Path(tmp).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    existing = tmp_path / "there"
    existing.mkdir()
    target = existing / "new" / "deeper" / "out.safetensors"
    with pytest.raises(DiskSpaceError):
        atomic_write(target, _fail)
    assert sorted(os.listdir(tmp_path)) == ["there"] and os.listdir(existing) == []  # the made ones gone, "there" kept


def test_a_failed_write_into_an_existing_empty_folder_keeps_it(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(DiskSpaceError):
        atomic_write(folder / "out.bin", _fail)
    assert folder.is_dir() and os.listdir(folder) == []


def test_a_ctrl_c_during_the_write_removes_the_made_folder(tmp_path):
    def interrupted(tmp: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "made" / "out.bin", interrupted)
    assert os.listdir(tmp_path) == []


def test_a_folder_made_by_a_failed_write_is_kept_when_another_file_is_in_it(tmp_path):
    target = tmp_path / "made" / "out.bin"

    def other_writer_then_fail(tmp: str) -> None:
        (tmp_path / "made" / "someone-else.txt").write_text("x")
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        atomic_write(target, other_writer_then_fail)
    assert sorted(os.listdir(tmp_path / "made")) == ["someone-else.txt"]


def test_a_folder_another_writer_made_meanwhile_is_not_removed_by_a_failed_write(tmp_path, monkeypatch):
    """Two writers making the same new folder: the one that did not make it (its mkdir found it there)
    leaves it when its write fails, and removes only the deeper folder it made itself."""
    shared = tmp_path / "shared"
    real_mkdir = os.mkdir

    def racing_mkdir(path, *args, **kwargs):
        if Path(path) == shared:
            real_mkdir(path)  # (the other writer, between this write's look and its mkdir)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    if hasattr(pathlib, "_NormalAccessor"):  # Python 3.10: Path.mkdir calls the os.mkdir its accessor bound at import
        monkeypatch.setattr(pathlib._NormalAccessor, "mkdir", staticmethod(racing_mkdir))
    with pytest.raises(DiskSpaceError):
        atomic_write(shared / "mine" / "out.bin", _fail)
    assert os.listdir(tmp_path) == ["shared"] and os.listdir(shared) == []


def test_a_ctrl_c_while_the_folders_are_made_removes_those_made(tmp_path, monkeypatch):
    """A SIGINT arriving right after a folder is made (before the write notes it) is held until the
    folders are noted: the KeyboardInterrupt then removes them."""
    real_mkdir = Path.mkdir

    def mkdir_then_ctrl_c(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name == "a":
            os.kill(os.getpid(), signal.SIGINT)

    def interrupt(number, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_ctrl_c)
    with _handlers(SIGINT=interrupt), pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a" / "b" / "out.bin", lambda tmp: None)
    assert os.listdir(tmp_path) == []


def test_a_failed_staged_save_removes_the_folders_its_writes_made(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), staged_outputs() as stage:
        write_safetensors(out / "one.safetensors", {"w": torch.zeros(2)}, stage=stage)
        write_safetensors(out / "c" / "two.safetensors", {"w": torch.zeros(2)}, stage=stage)
        raise RuntimeError("the save failed after its writes")
    assert os.listdir(tmp_path) == []
    with staged_outputs() as stage:  # a block that ends normally keeps them, with the files
        write_safetensors(out / "one.safetensors", {"w": torch.zeros(2)}, stage=stage)
    assert os.listdir(out) == ["one.safetensors"]


def test_a_failed_staged_save_removes_each_empty_folder_it_made_beside_one_that_is_not(tmp_path):
    """Two staged writes made two sibling folders; another writer's file is in the second: the block's
    failure removes the first (empty) one all the same and keeps the second, with the file."""
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError), staged_outputs() as stage:
        write_safetensors(tmp_path / "a" / "x" / "one.safetensors", {"w": torch.zeros(2)}, stage=stage)
        write_safetensors(tmp_path / "a" / "y" / "two.safetensors", {"w": torch.zeros(2)}, stage=stage)
        (tmp_path / "a" / "y" / "someone-else.txt").write_text("x")
        raise RuntimeError("the save failed after its writes")
    assert os.listdir(tmp_path / "a") == ["y"] and os.listdir(tmp_path / "a" / "y") == ["someone-else.txt"]


def test_a_failed_training_state_save_leaves_no_empty_state_folder(tmp_path, monkeypatch):
    from sdadapt.training.step import TrainState, save_training_state

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def full_disk(tmp, head, offsets, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_write_payload", full_disk)
    with pytest.raises(DiskSpaceError):
        save_training_state(tmp_path / "run-state", named_params={"w": weight}, optimizer=optimizer, state=TrainState())
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- the train output check's exit codes
def _kohya_lora(path: Path) -> Path:
    from sdadapt.formats import save_kohya

    g = torch.Generator().manual_seed(0)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    save_kohya(path, {"unet": {f"{layer}.lora_down.weight": torch.randn(2, 6, generator=g),
                               f"{layer}.lora_up.weight": torch.randn(5, 2, generator=g),
                               f"{layer}.alpha": torch.tensor(2.0)}})
    return path


@pytest.mark.parametrize("blocked", ["a file", "a dangling link"])
def test_an_unwritable_output_path_exits_7_in_train_and_in_the_other_writers(three_shapes, tmp_path, capsys, blocked):
    """train's own output check and the writers' shared one say the same thing with the same exit code
    (OutputError: 7, docs/security.md) for -o under a file or a dangling link."""
    from train_inputs import lora_train_args

    from sdadapt.cli import main

    blocker = tmp_path / "blocker"
    if blocked == "a file":
        blocker.write_text("x")
    else:
        blocker.symlink_to(tmp_path / "gone")
    lora = _kohya_lora(tmp_path / "a.safetensors")
    capsys.readouterr()
    codes, errs = [], []
    for argv in (lora_train_args(three_shapes, "--steps", "1", "-o", blocker / "x.safetensors"),
                 ["combine-loras", str(lora), "-o", str(blocker / "x.safetensors"), "-q"]):
        codes.append(main(argv))
        errs.append(capsys.readouterr().err)
    messages = [err.strip().splitlines()[-1] for err in errs]
    what = "a file, not a folder" if blocked == "a file" else "a link to a missing folder"
    assert codes == [7, 7] and all(what in m for m in messages), messages
    assert "step/s" not in errs[0] and "caching latents" not in errs[0]  # (train's check: before any work)
    assert not (tmp_path / "gone").exists()


def test_train_output_exists_exits_8_and_a_wrong_suffix_7(three_shapes, tmp_path, capsys):
    from train_inputs import lora_train_args

    from sdadapt.cli import main

    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old")
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", out)) == 8
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", tmp_path / "x.pt")) == 7
    assert "name the output *.safetensors" in capsys.readouterr().err
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", tmp_path)) == 7  # a folder
    assert "is a folder" in capsys.readouterr().err


# ------------------------------------------------------------- kohya's caption fallback: the path, not the stem
def _kohya_read_caption(img_path: str, caption_extension: str) -> str | None:
    """sd-scripts' library/train_util.py DreamBoothDataset.read_caption (48d368fa), without wildcards."""
    base_name = os.path.splitext(img_path)[0]
    base_name_face_det = base_name
    tokens = base_name.split("_")
    if len(tokens) >= 5:
        base_name_face_det = "_".join(tokens[:-4])
    for cap_path in [base_name + caption_extension, base_name_face_det + caption_extension]:
        if os.path.isfile(cap_path):
            with open(cap_path, encoding="utf-8") as f:
                return f.readlines()[0].strip()
    return None


def test_the_face_caption_fallback_cuts_the_path_as_kohya_in_folders_with_underscores(tmp_path):
    from sdadapt.images import write_png
    from sdadapt.training.data import find_images

    root = tmp_path / "data"
    cats, dogs = root / "10_my_cat", root / "5_dog"
    cats.mkdir(parents=True)
    dogs.mkdir()
    names = {cats: ("a_b_c", "me_40_30_20_24", "plain_1", "own_1_2_3_4"), dogs: ("x_y", "w_1_2_3", "you_40_30_20_24")}
    for folder, stems in names.items():
        for stem in stems:
            write_png(folder / f"{stem}.png", torch.zeros(3, 8, 8))
    (root / "10.txt").write_text("10.txt beside the folder")  # kohya: 10_my_cat/a_b_c.png's fallback
    (root / "5.txt").write_text("5.txt beside the folder")  # kohya: 5_dog/w_1_2_3.png's
    (cats / "me.txt").write_text("me's caption")
    (cats / "own_1_2_3_4.txt").write_text("its own")
    (cats / "own.txt").write_text("not this one")
    (dogs / "you.txt").write_text("you's caption")
    records, notes = find_images(root, caption_extension=".txt", uncaptioned=True)
    got = {str(r.path): r.caption for r in records}
    class_tokens = {cats: "my_cat", dogs: "dog"}  # (kohya's caption of an image without one: N_<class tokens>)
    expected = {str(folder / f"{stem}.png"): _kohya_read_caption(str(folder / f"{stem}.png"), ".txt") or class_tokens[folder]
                for folder, stems in names.items() for stem in stems}
    assert got == expected
    assert got[str(cats / "a_b_c.png")] == "10.txt beside the folder"  # (the stem alone has too few parts)
    assert got[str(dogs / "w_1_2_3.png")] == "5.txt beside the folder"
    assert got[str(cats / "plain_1.png")] == "my_cat" and got[str(dogs / "x_y.png")] == "dog"
    note = next(n for n in notes if "read_caption" in n)
    assert f"a_b_c.png <- {root / '10.txt'}" in note and "me_40_30_20_24.png <- me.txt" in note


# ---------------------------------------------------------------- quoted values: one conversion for every key
def _kohya_scalar_options() -> list[tuple[str, str, object]]:
    from test_kohya_config_coverage import _PROBE, KOHYA_OPTIONS

    probes = {"flag": (True, False), "int": (2, 0, 1), "float": (0.5, 0.0, 2.0)}
    return [(name, kind, value) for name, (kind, _) in sorted(KOHYA_OPTIONS.items()) if kind in probes
            for value in probes[kind] if _PROBE[kind] is not None]


def _read(tmp_path, name: str, value) -> tuple[str, object]:
    from train_inputs import read_kohya_table

    try:
        return "read", read_kohya_table(tmp_path / "c.toml", {name: value})
    except ValueError as exc:
        return "refused", str(exc).replace(repr(str(value).lower()), "V").replace(str(value).lower(), "V").replace(
            repr(value), "V").replace(str(value), "V")


@pytest.mark.parametrize("name, kind, value", _kohya_scalar_options())
def test_every_kohya_flag_and_number_quoted_reads_as_unquoted(tmp_path, name, kind, value):
    """``key = "false"`` / ``key = "2"`` (GUIs and hand edits quote values) means what ``key = false`` /
    ``key = 2`` means, for every kohya option of a bool or number kind: the same options, method options
    and notes, or the same refusal. Before, kohya's own keys were read before the conversion (a quoted
    "false" turned use_8bit_adam, network_train_unet_only, v_parameterization ... on, and refused
    deepspeed / no_metadata)."""
    quoted = str(value).lower() if isinstance(value, bool) else str(value)
    if name == "network_alpha":  # (the one exception: kohya stops on a quoted one, networks/lora.py:72 —
        assert _read(tmp_path, name, quoted)[0] == "refused"  # tests/test_kohya_polish.py)
        assert _read(tmp_path, name, value)[0] == "read"
        return
    assert _read(tmp_path, name, quoted) == _read(tmp_path, name, value)


# --------------------------------------------------------- fp16 steps the loss scaler skipped: the LR schedule
def _accelerate_lrs(skips: list[int], steps: int) -> list[float]:
    """The LR of each step of an fp16 (GradScaler) run through accelerate's optimizer and scheduler
    wrappers — kohya's — whose steps ``skips`` have inf gradients. In this process (a subprocess cost a
    fresh torch import): accelerate's global state, the environment and torch's thread count are put back."""
    import math

    from accelerate import Accelerator

    with accelerate_sandbox():
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # (accelerate makes one on CUDA only; kohya's fp16 runs)
        w = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([w], lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 10)
        optimizer, schedule = accelerator.prepare(optimizer, schedule)
        lrs = []
        for i in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])  # (the LR this step uses)
            accelerator.backward(w.sum() * (math.inf if i in skips else 1.0))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        return lrs


def test_train_step_does_not_step_the_lr_scheduler_after_a_skipped_fp16_step_as_accelerate():
    pytest.importorskip("accelerate")
    import math

    from sdadapt.training.step import StepConfig, TrainState, train_step

    skips, steps = [1, 3, 4], 7
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 10)
    state, config = TrainState(), StepConfig(mixed_precision="fp16", max_grad_norm=None)
    poison = {"now": False}

    def extra_loss(prepared, prediction):  # (inf gradients at the chosen steps)
        return w.sum() * (math.inf if poison["now"] else 1.0)

    lrs, updated = [], []
    for i in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        poison["now"] = i in skips
        before = w.detach().clone()
        train_step(lambda x, t, c: x * 0, {"latents": torch.zeros(1, 1, 2, 2)}, params=[w], optimizer=optimizer,
                   state=state, config=config, alphas_cumprod=torch.linspace(0.99, 0.01, 10), lr_scheduler=schedule,
                   extra_loss=extra_loss)
        updated.append(not torch.equal(w.detach(), before))
    assert [i for i, u in enumerate(updated) if not u] == skips  # (torch's scaler skipped exactly those)
    assert lrs == pytest.approx(_accelerate_lrs(skips, steps), rel=1e-12)
    assert state.step == steps and int(state.skipped_steps) == len(skips)


@pytest.mark.parametrize("precision", ["bf16", "disabled fp16 scaler"])
def test_without_an_active_fp16_scaler_nothing_is_counted_and_the_scheduler_always_steps(precision):
    """bf16 (no scaler) and a disabled scaler skip no step: the count stays the host int 0 (so fit adds
    nothing to its one host read per step) and a given scheduler steps every time, inf gradients or not."""
    import math

    from sdadapt.training.step import StepConfig, TrainState, train_step

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 10)
    state = TrainState()
    if precision == "bf16":
        config = StepConfig(mixed_precision="bf16", max_grad_norm=None)
    else:
        config = StepConfig(mixed_precision="fp16", max_grad_norm=None)
        state.scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i in range(3):
        train_step(lambda x, t, c: x * 0, {"latents": torch.zeros(1, 1, 2, 2)}, params=[w], optimizer=optimizer,
                   state=state, config=config, alphas_cumprod=torch.linspace(0.99, 0.01, 10), lr_scheduler=schedule,
                   extra_loss=lambda prepared, prediction, i=i: w.sum() * (math.inf if i == 1 else 1.0))
    assert state.skipped_steps == 0 and type(state.skipped_steps) is int
    assert schedule.last_epoch == 3


class _PoisonedScaler(torch.amp.GradScaler):
    """torch's scaler that writes an inf into the first gradient before unscaling at the chosen optimiser
    steps (counted from 0): the step torch then skips, as after an fp16 overflow."""

    poison: frozenset[int] = frozenset()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def unscale_(self, optimizer):
        if self.calls in self.poison:
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.view(-1)[0] = float("inf")
        self.calls += 1
        return super().unscale_(optimizer)


def _fp16_fit(monkeypatch, skips: set[int], **run_kwargs):
    from fit_runs import toy_lora_run

    import sdadapt.training.step as step_module
    from sdadapt.methods import FitConfig
    from sdadapt.training.step import StepConfig

    scalers: list[_PoisonedScaler] = []

    def poisoned(params, device_type):
        scaler = type("Poisoned", (_PoisonedScaler,), {"poison": frozenset(skips)})(device_type)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(step_module, "loss_scaler", poisoned)
    # (7 steps of batch 1: the fp16 toy steps are this file's costliest part; the schedule still moves at each
    # step taken, and a skip falls on each side of the save)
    config = FitConfig(steps=7, learning_rate=1e-2, schedule="linear", warmup_steps=2, batch_size=1, seed=0,
                       step=StepConfig(mixed_precision="fp16"))
    seen: list[tuple[int, float, list[torch.Tensor]]] = []
    extra = run_kwargs.pop("on_step", None)

    def on_step(info):
        seen.append((info.step, info.lr, []))
        if extra is not None:
            extra(info)

    _, weights = toy_lora_run(config, on_step=on_step, **run_kwargs)
    return config, seen, weights


def test_fit_schedules_the_lr_by_the_optimiser_steps_taken_and_resumes_the_count(monkeypatch, tmp_path):
    """kohya (accelerate): a step the fp16 scaler skips does not advance the LR schedule, while the step
    count (saves, samples, the end) does. fit's LR of each step is the schedule at the steps taken before
    it; a state saved after a skip resumes the same LRs and weights."""
    skips = {1, 2, 4}  # (0-based optimiser steps: two before the save after step 4, one the first step resumed)
    folder = tmp_path / "state"
    # (the straight run saves its state after step 4, as fit_runs.straight_and_resumed: one fp16 fit fewer)
    config, seen, weights = _fp16_fit(monkeypatch, skips,
                                      on_step=lambda info: info.save_state(folder) if info.step == 4 else None)
    assert [s for s, _, _ in seen] == list(range(1, 8))  # every step counted (kohya's global_step)
    taken = [sum(1 for j in range(i) if j not in skips) for i in range(7)]
    assert [lr for _, lr, _ in seen] == pytest.approx([config.lr_at(t, config.learning_rate) for t in taken], rel=1e-12)
    assert len({round(lr, 12) for _, lr, _ in seen}) > 3  # (a schedule that moves: the test can tell)

    import json

    assert json.loads((folder / "state.json").read_text())["skipped_steps"] == 2
    _, resumed, resumed_weights = _fp16_fit(monkeypatch, {s - 4 for s in skips if s >= 4}, resume=folder)
    assert [s for s, _, _ in resumed] == [5, 6, 7]
    assert [lr for _, lr, _ in resumed] == pytest.approx([lr for _, lr, _ in seen[4:]], rel=1e-12)
    assert all(torch.allclose(a, b) for a, b in zip(weights, resumed_weights))


# ------------------------------------------------------ dpmpp_sde: the Brownian tree in the latents' dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dpmpp_sde_draws_diffusers_brownian_noise_for_half_latents(monkeypatch, dtype):
    """diffusers' DPMSolverSDEScheduler builds its BrownianTreeNoiseSampler from the sample (its dtype):
    every noise sdadapt's dpmpp_sde adds for fp16/bf16 latents is, bit for bit, what that sampler draws for
    the same σ pair (before: a float32 tree, its increments not rounded as diffusers' are)."""
    pytest.importorskip("torchsde")
    scheduling = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_sde")
    import sdadapt.samplers.dpmpp_sde as sde

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    draws: list[tuple[float, float, torch.Tensor]] = []
    made: list[tuple[float, float]] = []
    real_init, real_call = sde._BrownianNoise.__init__, sde._BrownianNoise.__call__

    def init(self, like, sigma_min, sigma_max, seed, *options):
        made.append((sigma_min, sigma_max))
        real_init(self, like, sigma_min, sigma_max, seed, *options)

    def call(self, sigma, sigma_next):
        out = real_call(self, sigma, sigma_next)
        draws.append((sigma, sigma_next, out))
        return out

    monkeypatch.setattr(sde._BrownianNoise, "__init__", init)
    monkeypatch.setattr(sde._BrownianNoise, "__call__", call)
    sde.dpmpp_sde_sample(lambda x, t: 0.3 * torch.tanh(x), x_T, alphas_cumprod=ac, num_steps=5, noise_sampler_seed=123)
    assert made and len(draws) == 8
    reference = scheduling.BrownianTreeNoiseSampler(x_T, made[0][0], made[0][1], 123)
    for sigma, sigma_next, ours in draws:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde's "Should have ta>=t0" at the clamped interval ends
            theirs = reference(sigma, sigma_next)
        assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs)


def test_a_failed_peft_save_leaves_no_empty_adapter_folder(tmp_path, monkeypatch):
    from sdadapt.formats.diffusers import load_peft, save_peft

    layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{layer}.lora_down.weight": torch.ones(2, 6), f"{layer}.lora_up.weight": torch.ones(5, 2),
             f"{layer}.alpha": torch.tensor(2.0)}
    real = files.atomic_write

    def config_fails(path, write, **kwargs):
        if Path(path).name == "adapter_config.json":
            raise OSError(28, "No space left on device")
        return real(path, write, **kwargs)

    monkeypatch.setattr("sdadapt.formats.diffusers.atomic_write", config_fails)
    with pytest.raises(OSError):
        save_peft(tmp_path / "adapter", state)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_peft(tmp_path / "adapter", state)
    assert sorted(load_peft(tmp_path / "adapter")) == sorted(state)
