"""Validation loss on held-out images (kohya's validation_split & co.): sdadapt.training.validation + fit."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from _fast_s1 import one_level_toy

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors
from sdadapt.training.step import StepConfig
from sdadapt.training.validation import (
    eval_mode,
    split_for_validation,
    validation_timesteps,
)


@pytest.mark.parametrize("low, high", [(0, 1000), (0, 1), (100, 900), (0, 999), (3, 17), (250, 1000)])
def test_validation_timesteps_are_kohyas_linspace(low, high):
    assert validation_timesteps(low, high) == np.linspace(low, high, 4 + 2, dtype=int)[1:-1].tolist()
    assert validation_timesteps(low, high, count=7) == np.linspace(low, high, 9, dtype=int)[1:-1].tolist()
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]


def _kohya_split(paths: list[str], split: float, seed: int) -> tuple[list[str], list[str]]:
    """kohya's split_train_val, as written in library/train_util.py (the global random module, its state restored)."""
    dataset = sorted(paths)
    previous = random.getstate()
    random.seed(seed)
    random.shuffle(dataset)
    random.setstate(previous)
    train = dataset[:math.ceil(len(dataset) * (1 - split))]
    held = dataset[len(dataset) - round(len(dataset) * split):]
    return train, held


@pytest.mark.parametrize("count, split, seed", [(10, 0.2, 0), (7, 0.3, 42), (20, 0.1, 5), (3, 0.5, 1), (1, 0.5, 3),
                                                (9, 0.25, 1234)])
def test_the_split_is_kohyas_draw_disjoint_and_the_right_size(count, split, seed):
    paths = [f"/data/10_cat/img{i:03d}.png" for i in range(count)]
    shuffled = list(reversed(paths))  # (the order given does not matter: sorted first, as kohya's glob)
    train, held = split_for_validation(shuffled, split=split, seed=seed)
    kohya_train, kohya_held = _kohya_split(paths, split, seed)
    assert train == kohya_train
    assert not set(train) & set(held) and sorted(train + held) == paths
    assert len(held) == count - math.ceil(count * (1 - split)) and len(train) >= 1
    # kohya's held-out part is its last round(n·split): the same images wherever it does not share one with training
    assert held == kohya_held[len(kohya_held) - len(held):]
    assert split_for_validation(paths, split=split, seed=seed) == (train, held)  # deterministic
    assert split_for_validation(paths, split=0.0, seed=seed) == (paths, [])


@pytest.mark.parametrize("split", [1.0, -0.1, 1.5, float("nan")])
def test_a_split_outside_0_1_is_refused(split):
    with pytest.raises(ValueError, match=r"validation_split must be in \[0, 1\)"):
        split_for_validation(["a", "b"], split=split, seed=0)


@pytest.mark.parametrize("name", ["validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_every_n_values_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        FitConfig(**{name: value})


def test_eval_mode_restores_each_modules_own_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    model[2].eval()
    with eval_mode([model]):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[2].training and not model[2][0].training


SEED, VALIDATION_SEED = 3, 11


def _toy_run(*, validation=None, dataset: bool = False, steps: int = 4, on_step=None, **options):
    """A LoRA (with dropout: eval mode matters) on the toy, batch 2; returns (losses, the trained tensors, the system).
    The toy here and below is ``one_level_toy`` (every layer kind, a ninth of the UNet's ops: the passes are most of
    this file's time)."""
    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1, rank=4, dropout=0.3, rank_dropout=0.2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # no zero up-projections: the adapters change the output from the start (dropout shows)
        for p in adaptation.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    images, captions = concept_data("red", 6, seed=2)
    data = images
    if dataset:
        data = Dataset(records_from_tensors(images, captions))
        encode_buckets(data, system.encode_images, images=images)
    config = FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=SEED,
                       **{"step": StepConfig(min_snr_gamma=5.0), **options})
    losses = fit(system, adaptation, data, None if dataset else captions, config=config, on_step=on_step,
                 validation=validation(system) if callable(validation) else validation)
    return losses, [p.detach().clone() for p in adaptation.params], system


def _held_out():
    return concept_data("blue", 5, seed=4)


@pytest.fixture(scope="module")
def plain_run():
    """The 4-step run without validation that two tests below compare against (built once)."""
    return _toy_run(steps=4)


def _reference(system, images, captions, *, batch_size: int, seed: int) -> float:
    """The validation loss written out in float64 from kohya's rule: the model in eval mode; for each held-out
    batch in order, at t = 200, 400, 600, 800: ε ~ N(0, 1) from one generator seeded with the validation seed
    (then the timestep draw prepare_batch makes and discards), x_t = √ᾱ x0 + √(1 − ᾱ) ε, the min-SNR-5 weighted
    MSE against ε; the mean of the (batch, timestep) losses."""
    model = copy.deepcopy(system).double().eval()
    ac = system.alphas_cumprod.double()
    g = torch.Generator().manual_seed(seed)
    values = []
    ts = (200, 400, 600, 800)
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            x0 = torch.nn.functional.pixel_unshuffle(images[start:start + batch_size].double(), 2)  # (b, C, H, W)
            b = x0.shape[0]
            cond = model.condition(model.tokenize(captions[start:start + batch_size]))
            noises = []
            for _ in ts:  # the draws in the pass's order: each timestep's noise, then its discarded timestep draw
                noises.append(torch.randn(x0.shape, generator=g).double())
                torch.randint(0, len(ac), (b,), generator=g)
            # the 4 timesteps in one float64 forward (4b, C, H, W), timestep-major: rows k·b .. k·b+b-1 are ts[k]
            noise = torch.cat(noises)
            a = ac[torch.tensor(ts)].repeat_interleave(b)  # (4b,)
            x_t = a.sqrt()[:, None, None, None] * x0.repeat(len(ts), 1, 1, 1) + (1 - a).sqrt()[:, None, None, None] * noise
            prediction = model.unet(x_t, torch.tensor(ts).repeat_interleave(b), cond["context"].repeat(len(ts), 1, 1),
                                    cond["image_embeds"].repeat(len(ts), 1))
            snr = a / (1 - a)
            weight = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
            per_example = ((prediction - noise) ** 2).flatten(1).mean(1).mul(weight)  # (4b,)
            values.extend(per_example.view(len(ts), b).mean(1).tolist())  # one value per (batch, timestep)
    return sum(values) / len(values)


def test_the_validation_loss_is_the_float64_reference_at_the_steps_asked():
    images, captions = _held_out()
    seen: list[tuple[int, float, tuple[str, ...], float]] = []

    def on_step(info):
        if info.validation_loss is not None:
            seen.append((info.step, info.validation_loss, info.validated,
                         _reference(system_of[0], images, captions, batch_size=2, seed=VALIDATION_SEED)))

    system_of: list = []

    def held(system):
        system_of.append(system)
        return images, captions

    _toy_run(validation=held, steps=5, on_step=on_step, validate_every_n_steps=2, validation_seed=VALIDATION_SEED)
    # steps 2 and 4 by steps; the last step ends the run (one epoch with image tensors)
    assert [(s, v) for s, _, v, _ in seen] == [(2, ("step",)), (4, ("step",)), (5, ("epoch",))]
    for _, loss, _, reference in seen:
        assert loss == pytest.approx(reference, rel=2e-5)
    assert len({round(loss, 7) for _, loss, _, _ in seen}) == 3  # the weights changed between the passes


def test_training_with_validation_is_bit_identical_to_training_without(plain_run):
    plain_losses, plain_weights, _ = plain_run
    images, captions = _held_out()
    losses, weights, system = _toy_run(validation=(images, captions), steps=4, validate_every_n_steps=1)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))
    assert system.training and all(m.training for m in system.modules())  # the modes are back
    # the same in dataset mode, validating every epoch (3 batches an epoch)
    data = Dataset(records_from_tensors(images, captions))
    plain = _toy_run(dataset=True, steps=4)
    encode_buckets(data, one_level_toy(seed=1).encode_images, images=images)
    seen = []
    with_validation = _toy_run(dataset=True, steps=4, validation=data, on_step=lambda i: seen.append(i.validated))
    assert with_validation[0] == plain[0] and all(torch.equal(a, b) for a, b in zip(with_validation[1], plain[1]))
    assert seen == [(), (), ("epoch",), ("epoch",)]  # epoch 1 ends at step 3; the last step ends epoch 2


def test_max_validation_steps_scores_the_first_batches_only_and_the_seed_defaults_to_the_runs():
    images, captions = _held_out()
    systems: list = []
    seen: list[tuple[float, float]] = []

    def held(system):
        systems.append(system)
        return images, captions

    def on_step(info):
        if info.validation_loss is not None:  # the first batch (2 images); the noise from the run's seed
            seen.append((info.validation_loss, _reference(systems[0], images[:2], captions[:2], batch_size=2, seed=SEED)))

    _toy_run(validation=held, steps=2, on_step=on_step, validate_every_n_epochs=1, max_validation_steps=1)
    assert len(seen) == 1 and seen[0][0] == pytest.approx(seen[0][1], rel=2e-5)


def test_validation_data_of_the_wrong_kind_is_refused():
    images, captions = _held_out()
    with pytest.raises(ValueError, match="must be a sdadapt.training.data.Dataset"):
        _toy_run(dataset=True, validation=(images, captions))
    with pytest.raises(ValueError, match=r"\(images \(M, 3, H, W\), M captions\)"):
        _toy_run(validation=(images, captions[:2]))
    with pytest.raises(ValueError, match="has no latents yet"):
        _toy_run(dataset=True, validation=Dataset(records_from_tensors(images, captions)))


@pytest.mark.parametrize("dataset", [False, True])
def test_cached_text_encoder_outputs_give_the_same_validation_loss(dataset):
    """The held-out captions join the cache (fit's _text_cache): the same losses as encoding them at each pass."""
    images, captions = _held_out()
    runs = []
    for cache in (False, True):
        system = one_level_toy(seed=1).eval()
        adaptation = METHODS["lora"].adapt(system, seed=1, rank=4, text_encoder=False)
        train_images, train_captions = concept_data("red", 4, seed=2)
        data, validation = train_images, (images, captions)
        if dataset:
            data = Dataset(records_from_tensors(train_images, train_captions))
            encode_buckets(data, system.encode_images, images=train_images)
            validation = Dataset(records_from_tensors(images, captions))
            encode_buckets(validation, system.encode_images, images=images)
        seen = []
        fit(system, adaptation, data, None if dataset else train_captions, validation=validation,
            config=FitConfig(steps=2, batch_size=2, warmup_steps=0, seed=SEED, validate_every_n_steps=1,
                             cache_text_encoder_outputs=cache),
            on_step=lambda info, seen=seen: seen.append(info.validation_loss))
        runs.append(seen)
    assert len(runs[0]) == 2 and runs[0] == pytest.approx(runs[1], rel=1e-6, abs=0)


@pytest.mark.parametrize("steps, accumulation, per_epoch, every_steps, every_epochs, expected", [
    # 3 batches an epoch, 7 steps: epochs end at 3 and 6, the last step (7) ends the third
    (7, 1, 3, None, None, {3: ("epoch",), 6: ("epoch",), 7: ("epoch",)}),
    (7, 1, 3, None, 2, {6: ("epoch",)}),
    (7, 1, 3, 2, 3, {2: ("step",), 4: ("step",), 6: ("step",), 7: ("epoch",)}),
    (6, 1, 3, 3, None, {3: ("step", "epoch"), 6: ("step", "epoch")}),
    # 2 micro-batches a step, an epoch's 3 batches as 2 + 1 (kohya's / accelerate's short step at the epoch's end):
    # step 2 (micro-batch 3) finishes epoch 1, step 4 (micro-batch 6) epoch 2
    (4, 2, 3, None, 2, {4: ("epoch",)}),
    (4, 2, 3, None, None, {2: ("epoch",), 4: ("epoch",)}),
    # image tensors: the run is one epoch
    (5, 1, 0, None, None, {5: ("epoch",)}),
    (5, 1, 0, None, 2, {}),
])
def test_the_passes_run_at_kohyas_steps_and_epochs(steps, accumulation, per_epoch, every_steps, every_epochs, expected):
    from sdadapt.methods.fit import _validation_due

    config = FitConfig(steps=steps, validate_every_n_steps=every_steps, validate_every_n_epochs=every_epochs)
    due = {s: _validation_due(config, s, accumulation, per_epoch) for s in range(1, steps + 1)}
    assert {s: d for s, d in due.items() if d} == expected


def test_held_out_captions_follow_the_caption_schedule_of_the_step_just_trained():
    """kohya's validation dataset reads the training step and epoch (its collator sets them): the token
    warm-up has as many tags in a pass after step s as the step's own training captions (not step 0's at
    every pass), and caption_dropout_every_n_epochs empties them in the epochs it empties training's."""
    from sdadapt.training.data import CaptionOptions

    images, _ = _held_out()
    caption = "t0, t1, t2, t3, t4, t5"
    for options, expected in (
        # warm-up over 4 steps from 1 tag: the pass after step s (1-based) sees ⌊(s − 1)·5/4⌋ + 1 tags
        (CaptionOptions(token_warmup_steps=4, token_warmup_min=1), [1, 2, 3, 4, 6, 6]),
        # every 2nd epoch (3 batches an epoch, so steps 4-6) drops every caption
        (CaptionOptions(dropout_every_n_epochs=2), [6, 6, 6, 0, 0, 0]),
    ):
        system = one_level_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1, rank=4)
        train_images, train_captions = concept_data("red", 6, seed=2)
        data = Dataset(records_from_tensors(train_images, train_captions), captions=options)
        encode_buckets(data, system.encode_images, images=train_images)
        held = Dataset(records_from_tensors(images[:2], [caption] * 2), captions=options)
        encode_buckets(held, system.encode_images, images=images[:2])
        seen: list[list[str]] = []
        tokenize = system.tokenize

        def spying(prompts, tokenize=tokenize, seen=seen):
            if not torch.is_grad_enabled():  # a validation pass (the training draws run with gradients on)
                seen.append(list(prompts))
            return tokenize(prompts)

        system.tokenize = spying
        fit(system, adaptation, data, validation=held, config=FitConfig(
            steps=6, batch_size=2, warmup_steps=0, seed=SEED, validate_every_n_steps=1, validate_every_n_epochs=99))
        held_tags = [len([tag for tag in texts[0].split(", ") if tag]) for texts in seen]
        assert held_tags == expected, options


def test_whatever_a_pass_draws_from_the_global_generator_leaves_the_runs_draws_alone(monkeypatch, plain_run):
    """fit forks torch's global RNG around the pass: a model that draws in eval mode (here the pass
    itself) changes none of the adapters' dropout masks the later steps draw from it."""
    import sdadapt.training.validation as validation_module

    real = validation_module.validation_loss

    def drawing(*args, **kwargs):
        torch.rand(1000)  # e.g. a module that keeps a random draw in eval mode
        return real(*args, **kwargs)

    plain = plain_run
    monkeypatch.setattr(validation_module, "validation_loss", drawing)
    with_validation = _toy_run(validation=_held_out(), steps=4, validate_every_n_steps=1)
    assert with_validation[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(with_validation[1], plain[1]))


def test_a_schedule_free_run_is_validated_at_its_averaged_weights():
    """kohya's optimizer_eval_fn before the pass: the loss of x (what is saved), not of y (where the
    gradients are taken)."""
    images, captions = _held_out()
    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1, rank=4)
    train_images, train_captions = concept_data("red", 6, seed=2)
    seen: list[tuple[float, float]] = []

    def on_step(info):
        if info.validation_loss is not None:
            info.use_weights()  # x in the parameters (eval mode)
            seen.append((info.validation_loss, _reference(system, images, captions, batch_size=2, seed=SEED)))

    fit(system, adaptation, train_images, train_captions, on_step=on_step, validation=(images, captions),
        config=FitConfig(steps=4, batch_size=2, learning_rate=0.05, warmup_steps=0, seed=SEED, optimizer="adamw-schedulefree",
                         validate_every_n_steps=2, step=StepConfig(min_snr_gamma=5.0)))
    assert len(seen) == 2
    for loss, reference in seen:
        assert loss == pytest.approx(reference, rel=2e-5)


@pytest.mark.parametrize("most, batches", [(None, 3), (2, 2), (1, 1), (7, 3)])
def test_max_validation_steps_limits_a_held_out_datasets_batches(most, batches):
    """Dataset mode (train's): 5 held-out images in batches of 2 are 3 batches a pass, each scored at the 4
    timesteps; --max-validation-steps M keeps the first M."""
    images, captions = _held_out()
    system = one_level_toy(seed=1)
    held = Dataset(records_from_tensors(images, captions))
    encode_buckets(held, system.encode_images, images=images)
    forwards: list[int] = []
    unet_forward = system.unet.forward

    def counting(*args, **kwargs):
        if not torch.is_grad_enabled():
            forwards.append(args[0].shape[0])
        return unet_forward(*args, **kwargs)

    system.unet.forward = counting
    adaptation = METHODS["lora"].adapt(system, seed=1, rank=4)
    train_images, train_captions = concept_data("red", 4, seed=2)
    data = Dataset(records_from_tensors(train_images, train_captions))
    encode_buckets(data, system.encode_images, images=train_images)
    fit(system, adaptation, data, validation=held, config=FitConfig(
        steps=1, batch_size=2, warmup_steps=0, seed=SEED, max_validation_steps=most))
    from sdadapt.training.data import epoch_batches

    # the first M batches of the held-out epoch drawn from the validation seed, each at the 4 timesteps
    sizes = [len(positions) for _, positions in epoch_batches(held, 2, seed=SEED, epoch=0)]
    assert sorted(sizes) == [1, 2, 2]
    assert forwards == [size for size in sizes[:batches] for _ in range(4)]


@pytest.mark.parametrize("options", [
    {"gradient_checkpointing": True},  # (the checkpoint wrappers' mode: eval in the pass, train after)
    {"fused_backward": True, "step": StepConfig(max_grad_norm=None, min_snr_gamma=5.0)},
    {"ema_decay": 0.9},
    {"text_encoder_lr": 1e-4},  # (the text encoder's LoRA trains: its modes restored too)
    {"cuda_graph": True},  # (stand-in graphs that replay the captured step on the CPU)
], ids=["checkpointing", "fused-backward", "ema", "text-encoder", "cuda-graph"])
def test_with_the_step_options_a_validated_run_trains_bit_for_bit_as_one_without(options, request):
    replays = []
    if options.get("cuda_graph"):
        request.getfixturevalue("replaying_cuda_graphs")
        from conftest import ReplayingCUDAGraph

        real_replay = ReplayingCUDAGraph.replay
        request.getfixturevalue("monkeypatch").setattr(
            ReplayingCUDAGraph, "replay", lambda graph: (replays.append(1), real_replay(graph))[1])
    # 3 steps: two trained after a pass; with cuda_graph 5 (a layout is captured after 3 eager steps: replays at 4 and 5)
    steps = 5 if options.get("cuda_graph") else 3
    plain = _toy_run(steps=steps, **options)
    replays_without = len(replays)
    validated = _toy_run(validation=_held_out(), steps=steps, validate_every_n_steps=1, **options)
    assert validated[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(validated[1], plain[1]))
    assert all(m.training for m in validated[2].modules())
    # (the captured steps replayed after the passes as often as without them)
    assert replays_without * 2 == len(replays) and bool(replays) == bool(options.get("cuda_graph"))
