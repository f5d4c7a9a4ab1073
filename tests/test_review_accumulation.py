"""Review of the epoch-end short steps (commit 46f3062): the caption schedule's step and epoch follow the same
mapping as the batches, for training draws and for the validation pass.

kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb: ``train_network.py`` sets the dataset's current
step from ``global_step`` (the optimiser steps, 1486-1488) and epoch from the epoch loop (1401), and the
validation dataset takes the same (``val_dataset_group.set_current_step``/``set_current_epoch`` with the training
ones, before each validation pass). With gradient accumulation A and B batches an epoch, batch ``e·B + i`` is
optimiser step ``e·⌈B/A⌉ + i // A`` of epoch ``e`` (accelerate's syncs: tests/test_epoch_end_accumulation_reference.py
``accelerate_groups``), and the validation after step k reads step k and the epoch of its last batch.
"""

from __future__ import annotations

import pytest
from test_epoch_end_accumulation_reference import _config, _data, accelerate_groups

from sdadapt.methods import METHODS, fit
from sdadapt.training.data import CaptionOptions


@pytest.fixture()
def recorded(monkeypatch):
    """Every ``CaptionOptions.apply`` call: ``(the options' id, epoch, step)``."""
    calls: list[tuple[int, int, int]] = []
    real = CaptionOptions.apply

    def apply(self, caption, rng, *, epoch=0, step=0):
        calls.append((id(self), epoch, step))
        return real(self, caption, rng, epoch=epoch, step=step)

    monkeypatch.setattr(CaptionOptions, "apply", apply)
    return calls


def test_caption_schedule_steps_and_epochs_of_training_and_validation_draws(recorded):
    per_epoch, accumulation, steps = 5, 2, 9  # (9 steps of 2, 2, 1 batches: 3 epochs)
    system, dataset = _data(per_epoch)
    _, validation = _data(3)
    assert dataset.captions is not validation.captions
    adaptation = METHODS["lora"].adapt(system, seed=1)
    fit(system, adaptation, dataset, config=_config(steps, accumulation, validate_every_n_steps=1),
        validation=validation)
    groups = accelerate_groups(per_epoch, accumulation, 3, steps)
    train = [(e, s) for i, e, s in recorded if i == id(dataset.captions)]
    want = [(m // per_epoch, k) for k, group in enumerate(groups) for m in group]
    assert train[-len(want):] == want  # (the first draws may repeat batch 0: fit's first_batch)
    val = {(e, s) for i, e, s in recorded if i == id(validation.captions)}
    assert val == {(group[-1] // per_epoch, k) for k, group in enumerate(groups)}


def test_steps_past_an_epochs_end_count_the_started_epoch_as_kohya(tmp_path):
    """--steps 4 with 5 batches an epoch and accumulation 2 (⌈5/2⌉ = 3 steps an epoch): the run is in its second
    epoch, ``ss_num_epochs`` 2 — kohya's ``num_train_epochs = ceil(max_train_steps / num_update_steps_per_epoch)``
    (train_network.py:978-979)."""
    from safetensors import safe_open
    from train_inputs import captioned_pngs, lora_train_args

    from sdadapt.cli import main

    images = captioned_pngs(tmp_path / "img", [(32, 32)] * 5)
    out = tmp_path / "a.safetensors"
    args = [a if a != "2" else "1" for a in lora_train_args(images)]  # batch 1
    assert main([*args, "--steps", "4", "--gradient-accumulation-steps", "2", "--seed", "1", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("4", "4", "2")
