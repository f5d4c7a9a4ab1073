"""EMA (``--ema-decay``) during a run, against diffusers' examples: samples are made with the weights the saves hold
(the EMA with ``--ema-save weights``, as ``train_text_to_image.py`` validates with ``ema_unet`` swapped in), and a
resume keeps the EMA it was saved with — a state without one resumed with ``--ema-decay`` stopped on a bare
``KeyError('ema.0')``; one with an EMA resumed without it (or at another decay) lost the averages silently."""

from __future__ import annotations

import pytest
import torch

import sdadapt.jobs.train as train_job
from sdadapt import sampling
from sdadapt.jobs import TrainOptions, run_train


def test_samples_see_the_weights_the_saves_hold(cross_captions, tmp_path, monkeypatch):
    seen: dict[str, list] = {"sample": [], "ema": [], "raw": []}
    holder = {}
    real_generate, real_fit = sampling.generate, train_job.fit

    def spy_generate(system, *args, **kwargs):
        seen["sample"].append([p.detach().clone() for p in holder["adaptation"].params])
        return real_generate(system, *args, **kwargs)

    def spy_fit(system, adaptation, *args, on_step=None, **kwargs):
        holder["adaptation"] = adaptation

        def wrapped(info):
            seen["raw"].append([p.detach().clone() for p in adaptation.params])
            with info.averaged():
                seen["ema"].append([p.detach().clone() for p in adaptation.params])
            on_step(info)

        return real_fit(system, adaptation, *args, on_step=wrapped, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy_generate)
    monkeypatch.setattr(train_job, "fit", spy_fit)
    (tmp_path / "prompts.txt").write_text("a red cross --s 2\n")
    run_train(
        "lora",
        TrainOptions(
            images=cross_captions,
            steps=4,
            learning_rate=5e-3,
            out=tmp_path / "out" / "a.safetensors",
            ema_decay=0.5,
            sample_prompts=tmp_path / "prompts.txt",
            sample_every_n_steps=2,
            sample_steps=2,
            log_with="csv",
        ),
    )
    assert len(seen["sample"]) == 2
    for sample, step in zip(seen["sample"], (2, 4)):
        ema, raw = seen["ema"][step - 1], seen["raw"][step - 1]
        assert all(torch.equal(a, b) for a, b in zip(sample, ema)), step
        assert any(not torch.equal(a, b) for a, b in zip(ema, raw)), step  # (the two differ: the test can fail)


@pytest.mark.parametrize("saved,resumed", [(None, 0.9), (0.9, None), (0.9, 0.99)])
def test_a_resume_keeps_the_ema_it_was_saved_with(cross_captions, tmp_path, saved, resumed):
    def train(name, **more):
        out = tmp_path / name / f"{name}.safetensors"
        return run_train("lora", TrainOptions(images=cross_captions, steps=4, learning_rate=5e-3, out=out, log_with="csv",
                                              **more))

    train("a", save_every_n_steps=2, ema_decay=saved)
    state = next((tmp_path / "a").rglob("state.json")).parent
    with pytest.raises(ValueError, match="ema-decay") as caught:
        train("b", resume=state, ema_decay=resumed)
    assert "KeyError" not in repr(caught.value)
    assert train("c", resume=state, ema_decay=saved) is not None


@pytest.mark.parametrize("saved_ema,loaded_ema", [(False, True), (True, False)])
def test_load_training_state_refuses_another_ema(tmp_path, saved_ema, loaded_ema):
    """The library path (``fit(resume=...)``): ``load_training_state`` names the EMA, not a bare KeyError."""
    from sdadapt.training.step import EMA, TrainState, load_training_state, save_training_state

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    save_training_state(
        tmp_path,
        named_params={"p": param},
        optimizer=optimizer,
        state=TrainState(ema=EMA([param], decay=0.9) if saved_ema else None),
    )
    with pytest.raises(ValueError, match="EMA"):
        load_training_state(
            tmp_path,
            named_params={"p": param},
            optimizer=optimizer,
            state=TrainState(ema=EMA([param], decay=0.9) if loaded_ema else None),
        )
    load_training_state(
        tmp_path,
        named_params={"p": param},
        optimizer=optimizer,
        state=TrainState(ema=EMA([param], decay=0.9) if saved_ema else None),
    )
