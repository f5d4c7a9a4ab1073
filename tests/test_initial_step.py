"""kohya's ``initial_step`` / ``initial_epoch`` / ``skip_until_initial_step``.

Reference (kohya-ss/sd-scripts train_network.py, 2026-02): ``initial_step`` (or ``initial_epoch``:
``(initial_epoch - 1) * ceil(len(train_dataloader) / gradient_accumulation_steps)``) must be below
``max_train_steps`` (an assert); the LR scheduler is not moved ("lr scheduler will start from 0
without --resume"); the noise comes from the global generator, seeded as usual; with
``skip_until_initial_step`` the data loader skips the batches before that step (``skip_first_batches``),
otherwise no batch is skipped. The run trains up to ``max_train_steps``.

sdadapt's reading (FitConfig.initial_step, docs/train.md): the step counter starts at ``initial_step``
(steps k+1..N trained), the LR schedule at its beginning, the noise generator at the seed, the data
at step k+1's batches (skip) or at the first ones (no skip). So, exactly:

* skip: step ``k + j`` trains on the batches of step ``k + j`` of a run from step 0, at the LR and
  with the noise of its step ``j``;
* no skip: the run trains bit for bit as the first ``N - k`` steps of a run from step 0;
* a run started at ``k`` resumed from its state trains as the straight one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_inputs import lora_train_args, resumed_train_is_the_straight_one

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

N, K = 6, 3
CONFIG = FitConfig(steps=N, batch_size=2, learning_rate=1e-3, warmup_steps=1, schedule="cosine", seed=5)


def _dataset() -> Dataset:
    system = build_toy(seed=1)
    pixels, captions = concept_data("cross", 4, seed=0)
    dataset = Dataset(records_from_tensors(pixels, captions), flip=True)  # (flips: one more per-position draw)
    encode_buckets(dataset, system.encode_images, images=pixels)
    return dataset


def _run(config: FitConfig, monkeypatch, **fit_kwargs):
    """fit of a LoRA on the toy over :func:`_dataset`: per train_step call (the latents, the LR, the
    noise generator's state before it), the FitProgress (step, epoch) pairs, the final weights."""
    fit_module = importlib.import_module("sdadapt.methods.fit")
    real = fit_module.train_step
    calls = []

    def recording(model, batch, **kwargs):
        calls.append((batch["latents"].clone(), kwargs["optimizer"].param_groups[0]["lr"],
                      kwargs["state"].generator.get_state().clone()))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", recording)
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    progress = []
    user_on_step = fit_kwargs.pop("on_step", None)

    def on_step(info):
        progress.append((info.step, info.epoch, info.lr))
        if user_on_step is not None:
            user_on_step(info, adaptation)

    try:
        fit(system, adaptation, _dataset(), config=config, on_step=on_step, **fit_kwargs)
    finally:
        monkeypatch.setattr(fit_module, "train_step", real)
    return calls, progress, [p.detach().clone() for p in adaptation.params]


@pytest.fixture(scope="module")
def run_from_zero():
    """``_run(CONFIG)`` once for the module (a run from step 0), recording the LoRA's weights after each
    step: (train_step calls, progress, final weights, {step: weights after it}). Read only."""
    at: dict[int, list] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls, progress, weights = _run(CONFIG, monkeypatch, on_step=lambda info, adaptation: at.setdefault(
            info.step, [p.detach().clone() for p in adaptation.params]))
    return calls, progress, weights, at


def test_skipping_trains_the_later_batches_at_the_first_lrs_and_noise(monkeypatch, run_from_zero):
    full, full_progress, _, _ = run_from_zero  # (_run(CONFIG, monkeypatch))
    late, late_progress, _ = _run(dataclasses.replace(CONFIG, initial_step=K, skip_until_initial_step=True), monkeypatch)
    assert len(full) == N and len(late) == N - K
    assert len({float(lr) for _, lr, _ in full}) > 2  # (the schedule moves: the LR comparison can fail)
    for j, (latents, lr, noise) in enumerate(late):
        assert torch.equal(latents, full[K + j][0])  # the data of step K + j + 1
        assert lr == full[j][1] and torch.equal(noise, full[j][2])  # the schedule and the noise from the start
    assert [s for s, _, _ in late_progress] == list(range(K + 1, N + 1))
    assert [e for _, e, _ in late_progress] == [e for _, e, _ in full_progress[K:]]  # epochs counted from step K
    assert [lr for _, _, lr in late_progress] == [lr for _, _, lr in full_progress[:N - K]]


def test_without_skipping_it_trains_as_the_first_steps_of_a_run_from_zero(monkeypatch, run_from_zero):
    at = run_from_zero[3]  # (the weights after each step of _run(CONFIG, monkeypatch))
    late, progress, weights = _run(dataclasses.replace(CONFIG, initial_step=K), monkeypatch)
    assert len(late) == N - K and [s for s, _, _ in progress] == list(range(K + 1, N + 1))
    assert all(torch.equal(a, b) for a, b in zip(weights, at[N - K]))
    assert not all(torch.equal(a, b) for a, b in zip(weights, at[N]))


def test_a_run_started_at_a_step_resumes_as_it_trains_straight(monkeypatch, tmp_path):
    config = dataclasses.replace(CONFIG, initial_step=K - 1, skip_until_initial_step=True)
    state = tmp_path / "state"
    straight = _run(config, monkeypatch, on_step=lambda info, _: info.save_state(state) if info.step == K + 1 else None)
    resumed = _run(config, monkeypatch, resume=state)
    assert [s for s, _, _ in resumed[1]] == list(range(K + 2, N + 1))
    assert all(torch.equal(a, b) for a, b in zip(straight[2], resumed[2]))
    for (a, lr_a, g_a), (b, lr_b, g_b) in zip(straight[0][-len(resumed[0]):], resumed[0]):
        assert torch.equal(a, b) and lr_a == lr_b and torch.equal(g_a, g_b)


@pytest.mark.parametrize("bad", [-1, N, N + 2, True, 1.0])
def test_fit_refuses_a_start_outside_the_run(bad):
    with pytest.raises(ValueError, match="initial_step must be an integer in"):
        FitConfig(steps=N, initial_step=bad)


# ------------------------------------------------------------------------- train command
def test_train_counts_from_the_initial_step_in_names_metadata_log_and_record(red_circles, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    args = lora_train_args(red_circles, "--seed", "1", "--steps", "5", "--initial-step", "2", "--skip-until-initial-step",
                           "--save-every-n-steps", "2", "--save-state-on-train-end", "-o", out)
    assert main(args) == 0
    report = capsys.readouterr().err
    assert "starts at step 2 of 5 (kohya's initial_step): trains steps 3-5" in report
    assert "the data continues at step 3's batches" in report
    periodic = sorted(p.name for p in tmp_path.glob("a-*.safetensors"))
    assert periodic == ["a-step000004.safetensors"], periodic  # (not step 2: the run starts after it)
    for file, steps in ((tmp_path / periodic[0], "4"), (out, "5")):
        with safe_open(str(file), "pt") as f:
            assert f.metadata()["ss_steps"] == steps
    rows = (tmp_path / "a-log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["3", "4", "5"]
    record = json.loads((tmp_path / "a-state" / "run.json").read_text())
    assert record["initial_step"] == {"step": 2, "skip": True} and record["step"] == 5


def test_initial_epoch_is_kohyas_steps_per_epoch_count(red_circles, tmp_path, capsys):
    # 3 images, batch 2: 2 batches an epoch; accumulation 2: ceil(2 / 2) = 1 step an epoch -> epoch 3 starts at step 2
    assert main(lora_train_args(red_circles, "--steps", "4", "--gradient-accumulation-steps", "2", "--initial-epoch", "3",
                                "-o", tmp_path / "a.safetensors")) == 0
    report = capsys.readouterr().err
    assert "starts at step 2 of 4" in report and "the data starts at the first batches" in report


@pytest.mark.parametrize("extra, words", [
    (["--initial-step", "4"], "--initial-step 4 is not below the run's 4 steps"),
    (["--initial-epoch", "4"], "--initial-epoch 4: step 6 is not below the run's 4 steps"),
    (["--initial-step", "-1"], "--initial-step must be an integer >= 0"),
    (["--initial-epoch", "0"], "--initial-epoch must be an integer >= 1"),
])
def test_a_start_outside_the_run_is_refused_before_training(red_circles, tmp_path, capsys, extra, words):
    assert main(lora_train_args(red_circles, "--steps", "4", *extra, "-o", tmp_path / "a.safetensors")) == 2
    assert words in capsys.readouterr().err


def test_resume_continues_the_recorded_start_and_refuses_another(red_circles, tmp_path, capsys):
    args = lora_train_args(red_circles, "--seed", "2", "--steps", "4", "--initial-step", "1", "--skip-until-initial-step")
    assert resumed_train_is_the_straight_one(tmp_path, args)
    capsys.readouterr()
    moved = [a for a in args if a != "--skip-until-initial-step"]
    assert main([*moved, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "the run started at step 1 skipping the data before it" in capsys.readouterr().err
    plain = lora_train_args(red_circles, "--seed", "2", "--steps", "4")  # (left out: the record decides)
    assert main([*plain, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "d.safetensors"), "--quiet"]) == 0
    b, d = load_file(str(tmp_path / "b.safetensors")), load_file(str(tmp_path / "d.safetensors"))
    assert all(torch.equal(b[k], d[k]) for k in b)


def test_the_ema_counts_its_own_updates_not_the_initial_step(monkeypatch):
    """With ``initial_step`` K the progress steps start at K + 1 but the EMA has averaged only the steps taken:
    ``FitProgress.ema_updates`` (what ``train --ema-save beside`` writes as LDM ``num_updates`` / diffusers'
    ``optimization_step``) is 1, 2, … and equals the EMA's own count; 0 without an EMA."""
    seen = []
    _run(dataclasses.replace(CONFIG, initial_step=K, ema_decay=0.9), monkeypatch,
         on_step=lambda info, adaptation: seen.append((info.step, info.ema_updates)))
    assert seen == [(K + j + 1, j + 1) for j in range(N - K)]
    plain = []
    _run(dataclasses.replace(CONFIG, steps=2), monkeypatch, on_step=lambda info, adaptation: plain.append(info.ema_updates))
    assert plain == [0, 0]
