"""Gradient accumulation ends each epoch with a short step, as kohya's and diffusers' loops do.

References (transcribed below, cited by line):

* accelerate@16cb6eb80dd9aa8b4df1a63ef57863e455d53b83 ``src/accelerate/accelerator.py``:
  ``_do_sync`` (1229-1236): at the data loader's last batch the counter resets to 0 and the gradients
  sync (an optimiser step); otherwise ``step += 1`` and they sync when ``step % num_steps == 0``;
  ``backward`` (2838-2840): ``loss = loss / self.gradient_accumulation_steps`` for every batch, the
  short step's too. ``optimizer.py`` (113, 162) / ``scheduler.py`` (61): the optimiser and the
  scheduler act only when the gradients sync.
* kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb ``train_network.py``: 799-801
  (``max_train_steps = max_train_epochs · ceil(len(train_dataloader) / A)``), 978-979 (steps an epoch
  ``ceil(len / A)``), 1401-1421 (``for epoch ...: for step, batch ...: with accelerator.accumulate``),
  1486-1488 (``if accelerator.sync_gradients: global_step += 1``), 1605 (``global_step >=
  max_train_steps``: stop), 1693-1694 (epoch saves after each ``save_every_n_epochs``-th epoch).

So B batches an epoch with accumulation A make ⌈B/A⌉ optimiser steps, the last of ``B mod A``
batches, and E epochs are ``E·⌈B/A⌉`` steps (B=5, A=2, E=3: 9).
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.fit import epoch_batches_of, make_optimizer, micro_batches_of_step, step_of_micro_batch
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss

fit_module = importlib.import_module("sdadapt.methods.fit")  # (the package's ``fit`` is the function)
_TRAIN_STEP = fit_module.train_step


# ----------------------------------------------------------------------------- references
def accelerate_groups(per_epoch: int, accumulation: int, epochs: int, max_train_steps: int) -> list[list[int]]:
    """The batches (positions e·B + i) each optimiser step of kohya's loop takes, by accelerate's
    ``_do_sync`` (accelerator.py:1229-1236) and kohya's loop (train_network.py:1401-1421, 1486-1488, 1605)."""
    groups: list[list[int]] = []
    current: list[int] = []
    counter = 0  # Accelerator.step
    global_step = 0
    for epoch in range(epochs):
        for i in range(per_epoch):
            end_of_dataloader = i == per_epoch - 1
            if end_of_dataloader:
                counter = 0
                sync = True
            else:
                counter += 1
                sync = counter % accumulation == 0
            current.append(epoch * per_epoch + i)
            if sync:
                groups.append(current)
                current = []
                global_step += 1
                if global_step >= max_train_steps:
                    return groups
    return groups


def diffusers_linear(step: int, total: int, warmup: int = 0) -> float:
    """diffusers' ``get_linear_schedule_with_warmup`` lambda (kohya's ``linear``)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def test_the_mapping_is_accelerates():
    for per_epoch in range(1, 9):
        for accumulation in range(1, 6):
            s = math.ceil(per_epoch / accumulation)
            want = accelerate_groups(per_epoch, accumulation, 3, 3 * s)
            got = [list(micro_batches_of_step(k, accumulation=accumulation, per_epoch=per_epoch)) for k in range(3 * s)]
            assert got == want, (per_epoch, accumulation)
            assert [step_of_micro_batch(m, accumulation=accumulation, per_epoch=per_epoch)
                    for m in range(3 * per_epoch)] == [k for k, g in enumerate(want) for _ in g]
    assert [len(micro_batches_of_step(k, accumulation=2, per_epoch=5)) for k in range(9)] == [2, 2, 1] * 3
    # no epochs (image tensors): A batches every step
    assert micro_batches_of_step(4, accumulation=3, per_epoch=0) == range(12, 15)
    assert step_of_micro_batch(14, accumulation=3, per_epoch=0) == 4
    with pytest.raises(ValueError, match="accumulation >= 1"):
        micro_batches_of_step(0, accumulation=0, per_epoch=5)


# ----------------------------------------------------------------------------- fit against the reference loop
def _data(count: int = 5):
    system = build_toy(seed=1)
    pixels, _ = concept_data("cross", count, seed=0)
    dataset = Dataset(records_from_tensors(pixels, [f"img{i}" for i in range(count)]))
    encode_buckets(dataset, system.encode_images, images=pixels)
    return system, dataset


def _config(steps: int, accumulation: int, schedule: str = "linear", **options) -> FitConfig:
    return FitConfig(steps=steps, batch_size=1, learning_rate=3e-2, schedule=schedule, warmup_steps=0, seed=0,
                     step=StepConfig(accumulation_steps=accumulation, max_grad_norm=None), **options)


def _fit(steps: int, accumulation: int, monkeypatch, *, count=5, schedule="linear", save_at=None, state_dir=None,
         resume=None, **options):
    """fit (toy LoRA, ``count`` images, batch 1); returns (the batches given to train_step in order,
    the weights and LR after each step, the progress records)."""
    system, dataset = _data(count)
    batches: list[dict] = []
    real = _TRAIN_STEP

    def recording(model, batch, **kwargs):
        batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        return real(model, batch, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", recording)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    weights, progress = [], []

    def on_step(info):
        weights.append([p.detach().clone() for p in adaptation.params])
        progress.append((info.step, info.lr, info.epoch, info.epoch_end, info.epochs_done))
        if info.step == save_at:
            info.save_state(state_dir)

    fit(system, adaptation, dataset, config=_config(steps, accumulation, schedule, **options), on_step=on_step,
        resume=resume)
    return batches, weights, progress, dataset


def _reference(batches: list[dict], groups: list[list[int]], accumulation: int, total: int, *, schedule="linear"):
    """kohya's loop over the same batches: per batch ``loss / A`` backward (accelerator.py:2840); at a
    sync the scheduler's LR, the optimiser step, zeroed gradients (optimizer.py:113, 162)."""
    system, _ = _data()
    adaptation = METHODS["lora"].adapt(system, seed=1)
    params = list(adaptation.params)
    config = _config(total, accumulation, schedule)
    optimizer = make_optimizer([{"params": params, "lr": config.learning_rate, "lr_scale": 1.0,
                                 "base_lr": config.learning_rate}], config)
    state = TrainState(seed=config.seed)
    denoiser = system.denoiser()

    def model(x, t, ids):
        return denoiser(x, t, system.condition(ids))

    out = []
    for step, group in enumerate(groups):
        factor = diffusers_linear(step, total) if schedule == "linear" else 1.0
        for g in optimizer.param_groups:
            g["lr"] = config.learning_rate * factor
        for i in group:
            prepared = prepare_batch(batches[i], state=state, config=config.step, alphas_cumprod=system.alphas_cumprod)
            (step_loss(model, prepared, config.step) / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(([p.detach().clone() for p in params], config.learning_rate * factor))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_fit_takes_kohyas_steps_grads_lr_and_weights(monkeypatch):
    """B=5, A=2, 3 epochs: 9 steps of 2, 2, 1 batches; each step's weights and LR those of kohya's loop."""
    batches, weights, progress, dataset = _fit(9, 2, monkeypatch)
    assert len(batches) == 15  # (the old mapping: 18 — steps ran on across the epochs' ends)
    # each epoch's batches are that epoch's shuffle (the reference's data loader)
    config = _config(9, 2)
    for epoch in range(3):
        want = [dataset.batch_latents(bucket, positions, [False] * len(positions))
                for bucket, positions in epoch_batches_of(dataset, config, epoch=epoch)]
        for i, latents in enumerate(want):
            torch.testing.assert_close(batches[epoch * 5 + i]["latents"], latents, rtol=0, atol=0)
    groups = accelerate_groups(5, 2, 3, 9)
    reference = _reference(batches, groups, 2, 9)
    for step, ((w, lr), got, info) in enumerate(zip(reference, weights, progress, strict=True)):
        _same(got, w)
        assert info[1] == pytest.approx(lr, rel=1e-12), step
    # epochs end at steps 3, 6, 9 (kohya's epoch saves / samples / validation come there)
    assert [(s, e, end, done) for s, _, e, end, done in progress] == [
        (1, 1, False, 0), (2, 1, False, 0), (3, 1, True, 1), (4, 2, False, 1), (5, 2, False, 1), (6, 2, True, 2),
        (7, 3, False, 2), (8, 3, False, 2), (9, 3, True, 3)]


def test_max_train_steps_crossing_an_epoch(monkeypatch):
    batches, weights, progress, _ = _fit(4, 2, monkeypatch)
    assert len(batches) == 7  # epoch 1's 5 batches (steps 1-3), then 2 of epoch 2 (step 4)
    reference = _reference(batches, accelerate_groups(5, 2, 3, 4), 2, 4)
    for (w, _), got in zip(reference, weights, strict=True):
        _same(got, w)


def test_a_dividing_b_is_unchanged(monkeypatch):
    """A divides B (4 batches, A=2): every step two batches, as before the short steps (the same as kohya)."""
    batches, weights, progress, _ = _fit(4, 2, monkeypatch, count=4)
    assert len(batches) == 8
    groups = accelerate_groups(4, 2, 2, 4)
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for (w, _), got in zip(_reference(batches, groups, 2, 4), weights, strict=True):
        _same(got, w)
    assert [p[3] for p in progress] == [False, True, False, True]


def test_resume_mid_epoch_reproduces_the_straight_run(monkeypatch, tmp_path):
    _, straight, _, _ = _fit(7, 2, monkeypatch, schedule="constant", save_at=4, state_dir=tmp_path / "s")
    assert json.loads((tmp_path / "s" / "state.json").read_text())["micro_step"] == 7  # steps 1-4: 2 + 2 + 1 + 2
    batches, resumed, _, _ = _fit(7, 2, monkeypatch, schedule="constant", resume=tmp_path / "s")
    assert len(batches) == 5  # steps 5-7: batches 7-8, 9, 10-11
    _same(resumed[-1], straight[-1])


def test_initial_step_inside_an_epoch_follows_the_mapping(monkeypatch):
    """kohya's initial_step K=4 (inside epoch 2: its batches 5-6 trained, 7-8 next): with the skip, steps 5-7
    take the straight run's batches 7-8, 9, 10-11; without it, as many batches from the first one."""
    straight, _, _, _ = _fit(7, 2, monkeypatch, schedule="constant")
    skipped, _, progress, _ = _fit(7, 2, monkeypatch, schedule="constant", initial_step=4, skip_until_initial_step=True)
    plain, _, _, _ = _fit(7, 2, monkeypatch, schedule="constant", initial_step=4)
    for got, want in ((skipped, straight[7:12]), (plain, straight[:5])):
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            torch.testing.assert_close(a["latents"], b["latents"], rtol=0, atol=0)
    assert [(s, e, end) for s, _, e, end, _ in progress] == [(5, 2, False), (6, 2, True), (7, 3, False)]


def test_a_state_saved_with_the_old_mapping_is_refused(monkeypatch, tmp_path):
    _fit(3, 2, monkeypatch, schedule="constant", save_at=3, state_dir=tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    assert meta["micro_step"] == 5
    meta["micro_step"] = 6  # the old version's step 3: 3 · A batches, one of them epoch 2's
    del meta["batches_per_epoch"]  # (the old version recorded no epoch length)
    (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="saved by an older sdadapt"):
        _fit(5, 2, monkeypatch, schedule="constant", resume=tmp_path / "s")


def test_captured_step_takes_the_short_steps_too(monkeypatch):
    """--cuda-graph (here its eager fallback, CPU) counts the short step's batches as the eager step does."""
    _, eager, _, _ = _fit(3, 2, monkeypatch, schedule="constant")
    batches, captured, _, _ = _fit(3, 2, monkeypatch, schedule="constant", cuda_graph=True)
    assert batches == []  # (CapturedStep ran the micro-batches, not train_step)
    for a, b in zip(captured, eager, strict=True):
        _same(a, b)


def test_train_epochs_are_kohyas_step_counts(tmp_path, capsys):
    """--epochs 2 with 5 batches an epoch (5 images, batch 1) and accumulation 2: 2·⌈5/2⌉ = 6 steps, the
    epoch save after step 3 (the old count: ⌈2·5/2⌉ = 5 steps, the save after step 3 — ⌈2.5⌉)."""
    images = captioned_pngs(tmp_path / "img", [(32, 32)] * 5)
    out = tmp_path / "a.safetensors"
    args = [a if a != "2" else "1" for a in lora_train_args(images)]  # batch 1
    assert main([*args, "--epochs", "2", "--gradient-accumulation-steps", "2", "--save-every-n-epochs", "1",
                 "--seed", "1", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("6", "6", "2")
    periodic = sorted(p.name for p in tmp_path.glob("a-*.safetensors"))
    assert len(periodic) == 1, periodic
    with safe_open(str(tmp_path / periodic[0]), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("3", "1")
