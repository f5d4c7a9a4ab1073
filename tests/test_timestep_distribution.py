"""Timestep distributions: diffusers' timestep bias and OneTrainer's timestep distributions against transcriptions of
their code written here, the draw (its distribution, its ranges), the step (default bit-identical, no host sync, the
captured step draws the same, EDM refuses it) and ``train``'s flags / TOML keys / run record.

References (read at these commits):

* diffusers 58eb52c0 ``examples/text_to_image/train_text_to_image_sdxl.py`` 559-597 ``generate_timestep_weights``
  and 1089-1100 (``torch.multinomial(weights, bsz, replacement=True)``); the ``--timestep_bias_*`` defaults 342-390.
* OneTrainer 23df3832 ``modules/modelSetup/mixin/ModelSetupNoiseMixin.py`` ``_get_timestep_discrete`` (continuous
  branch: uniform / logit-normal / heavy-tail / beta, the shift ``T·s·t/((s−1)·t + T)``, ``.int()``; discrete branch:
  cos-map / sigmoid / inverted-parabola weights over a shifted linspace times its derivative, ``torch.multinomial``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import ConvDenoiser

from sdadapt.cli import main
from sdadapt.jobs.train import (
    TrainOptions,
    _check_resume,
    _inactive_option_notes,
    _write_run_record,
)
from sdadapt.samplers.edm import EDMSchedule
from sdadapt.timestep_tables import TimestepSampling
from sdadapt.training import diffusion as D
from sdadapt.training import step as step_module
from sdadapt.training import step_capture
from sdadapt.training import timestep_distribution as TD
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, train_step


# ------------------------------------------------------------------------------ transcriptions
def _diffusers_weights(args, num_timesteps):
    """diffusers' generate_timestep_weights (train_text_to_image_sdxl.py 559-597), transcribed (its ``return
    ValueError`` for a multiplier <= 0 left out: sdadapt raises)."""
    weights = torch.ones(num_timesteps)
    num_to_bias = int(args.timestep_bias_portion * num_timesteps)
    if args.timestep_bias_strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif args.timestep_bias_strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif args.timestep_bias_strategy == "range":
        assert args.timestep_bias_begin >= 0 and args.timestep_bias_end <= num_timesteps
        bias_indices = slice(args.timestep_bias_begin, args.timestep_bias_end)
    else:
        return weights
    weights[bias_indices] *= args.timestep_bias_multiplier
    weights /= weights.sum()
    return weights


def _onetrainer_discrete_weights(distribution, noising_weight, noising_bias, shift, num_timestep):
    """OneTrainer's discrete-branch weights (``self.__weights``), transcribed."""
    linspace = torch.linspace(0, 1, num_timestep)
    linspace = linspace / (shift - shift * linspace + linspace)
    linspace_derivative = torch.linspace(0, 1, num_timestep)
    linspace_derivative = shift / (shift + linspace_derivative - (linspace_derivative * shift)).pow(2)
    if distribution == "cos_map":
        weights = 2.0 / (math.pi - 2.0 * math.pi * linspace + 2.0 * math.pi * linspace ** 2.0)
    elif distribution == "sigmoid":
        bias = noising_bias + 0.5
        weights = linspace / (shift - shift * linspace + linspace)
        weights = 1 / (1 + torch.exp(-noising_weight * (weights - bias)))
    else:
        bias = noising_bias + 0.5
        weights = torch.clamp(-noising_weight * ((linspace - bias) ** 2) + 2, min=0.0)
    weights *= linspace_derivative
    return weights


def _onetrainer_continuous(distribution, noising_weight, noising_bias, shift, T, min_timestep, max_timestep, generator,
                           batch_size):
    """OneTrainer's continuous branch, transcribed (``.int()`` at the end)."""
    num_timestep = max_timestep - min_timestep
    if distribution == "uniform":
        timestep = min_timestep + (max_timestep - min_timestep) * torch.rand(batch_size, generator=generator)
    elif distribution == "logit_normal":
        normal = torch.normal(noising_bias, noising_weight + 1.0, size=(batch_size,), generator=generator)
        timestep = normal.sigmoid() * num_timestep + min_timestep
    elif distribution == "heavy_tail":
        u = torch.rand(size=(batch_size,), generator=generator)
        u = 1.0 - u - noising_weight * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)
        timestep = u * num_timestep + min_timestep
    else:  # beta, the two closed forms
        alpha, beta = max(1e-4, noising_weight), max(1e-4, noising_bias)
        u = torch.rand(batch_size, generator=generator)
        u = u.pow(1.0 / alpha) if abs(beta - 1.0) < 1e-5 else 1.0 - u.pow(1.0 / beta)
        timestep = u * num_timestep + min_timestep
    timestep = T * shift * timestep / ((shift - 1) * timestep + T)
    return timestep.int()


def _args(strategy, multiplier=1.0, begin=0, end=1000, portion=0.25):
    return SimpleNamespace(timestep_bias_strategy=strategy, timestep_bias_multiplier=multiplier,
                           timestep_bias_begin=begin, timestep_bias_end=end, timestep_bias_portion=portion)


def _bias(strategy, multiplier=1.0, begin=0, end=1000, portion=0.25):
    return TimestepSampling(bias_strategy=strategy, bias_multiplier=multiplier, bias_begin=begin, bias_end=end,
                            bias_portion=portion)


# ------------------------------------------------------------------------------ diffusers' weights
@pytest.mark.parametrize("strategy", ["earlier", "later", "none"])
@pytest.mark.parametrize("portion", [0.0, 0.001, 0.25, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("multiplier", [0.5, 1.0, 2.0, 7.0])
def test_bias_weights_are_diffusers_generate_timestep_weights(strategy, portion, multiplier):
    ours = TD.bias_weights(_bias(strategy, multiplier, portion=portion), 1000)
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, _diffusers_weights(_args(strategy, multiplier, portion=portion), 1000))


@pytest.mark.parametrize("begin, end", [(200, 500), (0, 1000), (999, 1000), (500, 500), (600, 300), (0, 1)])
@pytest.mark.parametrize("multiplier", [0.25, 3.0])
def test_the_range_strategy_is_diffusers(begin, end, multiplier):
    ours = TD.bias_weights(_bias("range", multiplier, begin, end), 1000)
    assert torch.equal(ours, _diffusers_weights(_args("range", multiplier, begin, end), 1000))


def test_the_edges_of_the_bias():
    # later with portion 0: diffusers' slice(-0, None) is every timestep, so uniform; multiplier 1: uniform
    assert torch.equal(TD.bias_weights(_bias("later", 5.0, portion=0.0), 1000), torch.full((1000,), 1e-3))
    w = TD.bias_weights(_bias("later", 3.0, portion=0.25), 1000)
    assert torch.allclose(w[750:].sum(), torch.tensor(0.75 / 1.5)) and torch.allclose(w[0] * 3, w[999])
    assert torch.equal(w[:750], w[:1].expand(750)) and torch.equal(w[750:], w[-1:].expand(250))
    with pytest.raises(ValueError, match="timestep_bias_end 1001 .* must be <= the model's 1000"):
        TD.bias_weights(_bias("range", 2.0, 0, 1001), 1000)


@pytest.mark.parametrize("kwargs, message", [
    ({"bias_strategy": "later", "bias_multiplier": 0.0}, "multiplier <= 0 would stop training some timesteps"),
    ({"bias_strategy": "earlier", "bias_multiplier": -1.0}, "--timestep-bias-multiplier"),
    ({"bias_strategy": "earlier", "bias_portion": 1.5}, "--timestep-bias-portion"),
    ({"bias_strategy": "range", "bias_begin": -1}, "needs a first timestep >= 0"),
    ({"bias_strategy": "sooner"}, "--timestep-bias-strategy"),
    ({"distribution": "gamma"}, "--timestep-distribution"),
    ({"bias_strategy": "later", "distribution": "sigmoid"}, "give one of them"),
    ({"bias_strategy": "later", "shift": 2.0}, "give one of them"),
    ({"shift": 0.0}, "--timestep-shift"),
    ({"distribution": "logit_normal", "noising_weight": -1.0}, "must be > -1"),
    ({"distribution": "heavy_tail", "noising_weight": 2.0}, "SD3's mode sampling"),
    ({"distribution": "beta", "noising_weight": 0.5, "noising_bias": 2.0}, "global random state"),
    ({"distribution": "sigmoid", "noising_weight": math.nan}, "--noising-weight"),
])
def test_meaningless_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepSampling(**kwargs)


# ------------------------------------------------------------------------------ OneTrainer's weights
@pytest.mark.parametrize("distribution", ["cos_map", "sigmoid", "inverted_parabola"])
@pytest.mark.parametrize("shift", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("weight, bias, count", [(0.0, 0.0, 1000), (3.0, 0.2, 1000), (-2.0, -0.3, 700), (1.5, 0.0, 37)])
def test_onetrainer_weights_are_its_discrete_branch(distribution, shift, weight, bias, count):
    sampling = TimestepSampling(distribution=distribution, noising_weight=weight, noising_bias=bias, shift=shift)
    ours = TD.onetrainer_weights(sampling, count)
    assert torch.equal(ours, _onetrainer_discrete_weights(distribution, weight, bias, shift, count))


def test_onetrainer_weights_sit_in_the_range_and_an_all_zero_parabola_is_refused():
    sampling = TimestepSampling(distribution="sigmoid", noising_weight=2.0, shift=2.0)
    w = TD.timestep_weights(sampling, 1000, low=100, high=800)
    assert torch.equal(w[100:800], _onetrainer_discrete_weights("sigmoid", 2.0, 0.0, 2.0, 700))
    assert not w[:100].any() and not w[800:].any()
    with pytest.raises(ValueError, match="gives no timestep a finite weight > 0"):
        TD.onetrainer_weights(TimestepSampling(distribution="inverted_parabola", noising_weight=100.0,
                                               noising_bias=5.0), 1000)


@pytest.mark.parametrize("distribution, weight, bias", [
    ("uniform", 0.0, 0.0), ("logit_normal", 0.0, 0.0), ("logit_normal", 0.5, -0.7), ("heavy_tail", 0.0, 0.0),
    ("heavy_tail", 1.2, 0.0), ("heavy_tail", -1.0, 0.0), ("beta", 0.4, 1.0), ("beta", 1.0, 3.0)])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.4])
@pytest.mark.parametrize("low, high", [(0, 1000), (150, 600)])
def test_continuous_draws_are_onetrainers_on_the_same_generator(distribution, weight, bias, shift, low, high):
    sampling = TimestepSampling(distribution=distribution, noising_weight=weight, noising_bias=bias, shift=shift)
    ours = TD.continuous_timesteps(sampling, 4096, 1000, low=low, high=high, generator=torch.Generator().manual_seed(3))
    theirs = _onetrainer_continuous(distribution, weight, bias, shift, 1000, low, high,
                                    torch.Generator().manual_seed(3), 4096)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, theirs.long().clamp(0, 999))  # (clamp: a value of exactly T, 0 in these draws)


# ------------------------------------------------------------------------------ the draw
def _chi_square(draws: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(draws, minlength=probabilities.numel()).double()
    expected = probabilities.double() * draws.numel()
    keep = expected > 0
    assert not counts[~keep].any(), "a timestep of weight 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("sampling, low, high", [
    (_bias("later", 4.0, portion=0.3), 0, 1000),
    (_bias("range", 0.2, 100, 400), 50, 900),  # min/max: the bias weights kept in [low, high)
    (TimestepSampling(distribution="inverted_parabola", noising_weight=6.0, noising_bias=0.1), 0, 1000),
    (TimestepSampling(distribution="cos_map", shift=2.5), 200, 700),
])
def test_the_weighted_draw_follows_its_weights(sampling, low, high):
    weights = TD.timestep_weights(sampling, 1000, low=low, high=high).double()
    draws = TD.draw_timesteps(sampling, 200_000, 1000, low=low, high=high, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and low <= int(draws.min()) and int(draws.max()) < high
    chi2, dof = _chi_square(draws, weights / weights.sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    # the same generator: the inverse CDF of float32 uniforms, written here in float64
    g = torch.Generator().manual_seed(5)
    ours = TD.draw_timesteps(sampling, 512, 1000, low=low, high=high, generator=g)
    u = torch.rand(512, generator=torch.Generator().manual_seed(5)).double()
    cdf = (weights.cumsum(0) / weights.sum()).tolist()
    expected = [next(i for i, c in enumerate(cdf) if c > x) for x in u.tolist()]
    assert ours.tolist() == expected


def test_the_inverse_cdf_never_takes_a_timestep_of_weight_zero():
    weights = torch.tensor([0.0, 0.0, 1.0, 0.0, 3.0, 0.0])
    cdf = weights.cumsum(0) / weights.sum()  # 0, 0, .25, .25, 1, 1
    u = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.999999])  # (the edges of the flat steps included)
    assert TD.inverse_cdf(cdf, u).tolist() == [2, 2, 4, 4, 4]


def test_diffusers_range_with_kohyas_range_restricts_the_biased_weights():
    sampling = _bias("earlier", 10.0, portion=0.5)
    w = TD.timestep_weights(sampling, 1000, low=400, high=600)
    assert not w[:400].any() and not w[600:].any()
    assert torch.equal(w[400:500], w[400:500][:1].expand(100)) and torch.allclose(w[400] / w[500], torch.tensor(10.0))


def test_the_draw_is_reproducible_and_stays_on_the_generators_device():
    sampling = TimestepSampling(distribution="sigmoid", noising_weight=3.0)
    a = TD.draw_timesteps(sampling, 8, 1000, generator=torch.Generator().manual_seed(1), device="cpu")
    b = TD.draw_timesteps(sampling, 8, 1000, generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(a, b) and a.device.type == "cpu"


# ------------------------------------------------------------------------------ the step
def _batch(seed=0):
    return {"latents": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), "cond": None}


def test_the_default_draw_is_kohyas_randint_bit_for_bit():
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    outs = []
    for sampling in (None, TimestepSampling(), TimestepSampling(distribution="UNIFORM", bias_multiplier=3.0)):
        state = TrainState(seed=11)
        outs.append(prepare_batch(_batch(), state=state, config=StepConfig(timestep_range=(100, 900),
                                                                           timestep_sampling=sampling),
                                  alphas_cumprod=ac))
    g = torch.Generator().manual_seed(11)
    torch.randn((3, 4, 8, 8), generator=g)
    assert torch.equal(outs[0]["t"], torch.randint(100, 900, (3,), generator=g))
    for other in outs[1:]:
        assert torch.equal(other["t"], outs[0]["t"]) and torch.equal(other["x_t"], outs[0]["x_t"])


@pytest.mark.parametrize("sampling", [_bias("later", 3.0), TimestepSampling(distribution="logit_normal", shift=2.0),
                                      TimestepSampling(shift=3.0)])  # (OneTrainer's uniform, shifted: not kohya's)
def test_the_step_draws_its_timesteps_after_the_noise_from_the_distribution(sampling):
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    out = prepare_batch(_batch(), state=TrainState(seed=4), config=StepConfig(timestep_sampling=sampling,
                                                                               timestep_range=(10, 990)),
                        alphas_cumprod=ac)
    g = torch.Generator().manual_seed(4)
    torch.randn((3, 4, 8, 8), generator=g)
    assert torch.equal(out["t"], TD.draw_timesteps(sampling, 3, 1000, low=10, high=990, generator=g))


def test_an_edm_model_refuses_a_timestep_distribution():
    with pytest.raises(ValueError, match="diffusers' EDM training .* draws its σ-grid index uniformly"):
        StepConfig(edm=EDMSchedule(), timestep_sampling=_bias("later", 2.0))
    StepConfig(edm=EDMSchedule(), timestep_sampling=TimestepSampling())  # (uniform: the EDM draw)
    from sdadapt.jobs.train import _edm_options

    with pytest.raises(ValueError, match="these options have no meaning for it: timestep_sampling \\(OneTrainer cos_map"):
        _edm_options("lora", TrainOptions(images=".", timestep_distribution="cos_map"), [])
    _edm_options("lora", TrainOptions(images=".", min_timestep=100), [])  # (kohya's range: mapped onto the grid)


@pytest.mark.parametrize("sampling", [_bias("range", 2.0, 200, 600), TimestepSampling(distribution="cos_map"),
                                      TimestepSampling(distribution="heavy_tail", noising_weight=0.5, shift=3.0)])
def test_the_step_makes_no_host_sync(sampling):
    torch.manual_seed(0)
    model = ConvDenoiser()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0)
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    config = StepConfig(timestep_sampling=sampling, timestep_range=(100, 900), min_snr_gamma=5.0)
    batch = _batch()  # (made before the recording: it stands for latents on the device)
    with HostSyncs() as syncs:
        train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
        for _ in range(3):
            syncs.events.clear()
            train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
            assert [str(e) for e in syncs.events] == []


def test_eager_and_captured_steps_draw_the_same(fake_cuda_graphs, prepared_batches):
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    config = StepConfig(timestep_sampling=TimestepSampling(distribution="sigmoid", noising_weight=4.0), max_grad_norm=None)
    eager_seen, captured_seen = prepared_batches(step_module, "t"), prepared_batches(step_capture, "t")
    torch.manual_seed(0)
    model = ConvDenoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eager_state = TrainState(seed=7)
    for _ in range(4):
        train_step(model, _batch(), params=list(model.parameters()), optimizer=opt, state=eager_state, config=config,
                   alphas_cumprod=ac)
    captured = step_capture.CapturedStep(model, params=list(model.parameters()), optimizer=opt, config=config,
                                         alphas_cumprod=ac, warmup_steps=1)
    captured_state = TrainState(seed=7)
    for _ in range(4):
        captured(_batch(), state=captured_state)
    assert captured.graph_count == 1 and len(eager_seen) == len(captured_seen) == 4
    for (a,), (b,) in zip(eager_seen, captured_seen):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ train
def test_the_flags_reach_the_options():
    from sdadapt.cli import build_parser

    args = build_parser().parse_args(["train", "lora", "--images", ".", "--timestep-bias-strategy", "LATER",
                                      "--timestep-bias-multiplier", "2", "--timestep-bias-portion", "0.1",
                                      "--timestep-bias-begin", "5", "--timestep-bias-end", "50",
                                      "--timestep-distribution", "cos_map", "--noising-weight", "1.5",
                                      "--noising-bias", "-0.2", "--timestep-shift", "3"])
    assert (args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion,
            args.timestep_bias_begin, args.timestep_bias_end, args.timestep_distribution, args.noising_weight,
            args.noising_bias, args.timestep_shift) == ("later", 2.0, 0.1, 5, 50, "cos_map", 1.5, -0.2, 3.0)


def test_train_options_build_the_sampling_and_refuse_bad_values():
    assert TrainOptions(images=".").timestep_sampling() is None
    assert TrainOptions(images=".", timestep_bias_strategy="range", timestep_bias_multiplier=2.0, timestep_bias_begin=10,
                        timestep_bias_end=20).timestep_sampling() == _bias("range", 2.0, 10, 20)
    # (an end past T is refused against the loaded model's T — a model may have more than 1000: _check_timesteps)
    from sdadapt.jobs.train import _check_timesteps

    with pytest.raises(ValueError, match="--timestep-bias-end"):
        _check_timesteps(TrainOptions(images=".", timestep_bias_strategy="range", timestep_bias_end=1200), 1000)
    with pytest.raises(ValueError, match="gives no timestep a finite weight"):
        TrainOptions(images=".", timestep_distribution="inverted_parabola", noising_weight=50.0, noising_bias=3.0)


def test_a_toml_with_diffusers_names_trains_with_the_bias(red_circles, tmp_path, train_fit_calls):
    config = tmp_path / "c.toml"
    config.write_text('timestep_bias_strategy = "later"\ntimestep_bias_multiplier = 2.5\ntimestep_bias_portion = 0.5\n'
                      "min_timestep = 100\n")
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "2",
                 "--batch-size", "2", "--no-prior", "-o", str(out)]) == 0
    (call,) = train_fit_calls
    assert call.config.step.timestep_sampling == _bias("later", 2.5, portion=0.5)
    assert call.config.step.timestep_range == (100, 1000) and out.exists()


def test_a_onetrainer_distribution_trains_end_to_end(red_circles, tmp_path, train_fit_calls):
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--timestep-distribution", "logit_normal",
                 "--timestep-shift", "2", "--steps", "2", "--batch-size", "2", "--no-prior", "-o", str(out)]) == 0
    (call,) = train_fit_calls
    assert call.config.step.timestep_sampling == TimestepSampling(distribution="logit_normal", shift=2.0)
    assert out.exists()


def test_resume_refuses_a_changed_distribution(tmp_path):
    import json

    options = TrainOptions(images=".", timestep_distribution="sigmoid", noising_weight=2.0)
    _write_run_record(tmp_path, "lora", options, 1, 2)
    (tmp_path / "state.json").write_text(json.dumps({"step": 1}))
    _check_resume(tmp_path, "lora", options)
    with pytest.raises(ValueError, match="timestep_sampling 'OneTrainer sigmoid"):
        _check_resume(tmp_path, "lora", TrainOptions(images="."))
    plain = tmp_path / "plain"
    plain.mkdir()
    _write_run_record(plain, "lora", TrainOptions(images="."), 1, 2)  # (no entry: a record of the uniform draw)
    (plain / "state.json").write_text(json.dumps({"step": 1}))
    _check_resume(plain, "lora", TrainOptions(images="."))
    with pytest.raises(ValueError, match="timestep_sampling None"):
        _check_resume(plain, "lora", options)


def test_options_the_draw_does_not_read_are_reported():
    notes = " | ".join(_inactive_option_notes(TrainOptions(images=".", timestep_bias_multiplier=2.0, noising_weight=1.0)))
    assert "--timestep-bias-multiplier 2.0: not used by --timestep-bias-strategy none" in notes
    assert "--noising-weight 1.0: not used by --timestep-distribution uniform" in notes
    notes = " | ".join(_inactive_option_notes(TrainOptions(images=".", timestep_bias_strategy="range",
                                                           timestep_bias_portion=0.5, timestep_bias_end=900)))
    assert "--timestep-bias-portion 0.5: not used by --timestep-bias-strategy range" in notes
    assert "--timestep-bias-end" not in notes
    assert not _inactive_option_notes(TrainOptions(images=".", timestep_distribution="heavy_tail", noising_weight=0.5))
