"""Combinations on the optimiser / LR / step path that each option's own tests do not reach: group
LRs (text-encoder LR × LoRA+ × block weights × the polynomial schedule × the text encoder stopping
mid-run × resume), Adafactor's relative step against the groups' LRs, the max-norm pass with a
fused backward, dropouts and LoRA+, optimiser arguments with a resume, zero terminal SNR with every
loss weighting at t = 999, and the noise options drawn together (eager == captured).

Reference behaviour (kohya-ss/sd-scripts, diffusers):

* train_network.py builds the optimiser with ``lr=args.learning_rate`` and groups from
  ``network.prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)``: each group's LR is
  ``unet_lr`` / ``text_encoder_lr`` × the block's lr weight (networks/lora.py ``get_lr_weight``),
  the ``lora_up`` ("plus") groups × ``loraplus_*lr_ratio``; a group whose LR is 0 is left out of the
  optimiser ("NO LR skipping!"), so it never trains, whatever the optimiser.
* diffusers ``get_polynomial_decay_schedule_with_warmup`` (kohya's ``get_scheduler_fix``) is a
  ``LambdaLR`` whose factor is computed from ``lr_init = optimizer.defaults["lr"]`` (kohya's
  ``--learning_rate``, not ``--unet_lr``) and multiplies every group's initial LR; it refuses
  ``lr_end >= lr_init``.
* transformers' ``Adafactor`` with ``relative_step=True`` computes its step size from the step
  count and never reads ``group["lr"]`` (kohya's ``get_optimizer`` even pops the groups' ``lr``,
  warning "unet_lr and text_encoder_lr are ignored"): the groups' LRs (LoRA+, block weights)
  change nothing.
* train_util.py ``get_noise_noisy_latents_and_timesteps``: ε, the offset's random strength, the
  offset (adaptive), multires noise, the timesteps, then the ip-noise strength and its ε'.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from tiny_models import ConvDenoiser

from sdadapt.jobs.train import TrainOptions, _lr_scheduler_kwargs
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import diffusion as D
from sdadapt.training import step as step_module
from sdadapt.training import step_capture
from sdadapt.training.max_norm import adapters_in, delta_norms, scale_weight_norms_
from sdadapt.training.step import (
    StepConfig,
    TrainState,
    prepare_batch,
    step_loss,
    train_step,
)

fit_module = importlib.import_module("sdadapt.methods.fit")
_IMAGES, _CAPTIONS = concept_data("cross", 4, seed=0)


def _polynomial_factor64(step: int, *, reference: float, warmup: int, total: int, power: float, lr_end: float) -> float:
    """diffusers' polynomial LambdaLR factor, in float64: the multiplier of every group's initial LR."""
    if step < warmup:
        return step / max(1, warmup)
    if step > total:
        return lr_end / reference
    remaining = 1.0 - (step - warmup) / (total - warmup)
    return ((reference - lr_end) * remaining ** power + lr_end) / reference


def _spy_optimizer(monkeypatch) -> list[dict[int, float]]:
    """Each optimiser step's ``{id(param): its group's lr}`` (over the params that have a gradient)."""
    seen: list[dict[int, float]] = []
    real = fit_module.make_optimizer

    def make(groups, config):
        optimizer = real(groups, config)

        def record(opt, args, kwargs):
            seen.append({id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"] if p.grad is not None})

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(fit_module, "make_optimizer", make)
    return seen


def _lora(system, **options):
    adaptation = METHODS["lora"].adapt(system, seed=1, **options)
    # block lr weights as kohya's: one factor per UNet layer (here every other layer at 0.5)
    layers: dict[str, float] = {}
    weights = []
    for component, layer, _, _ in adaptation._entries():
        weights.append(layers.setdefault(layer, 0.5 if len(layers) % 2 else 1.0) if component == "unet" else 1.0)
    adaptation.lr_scales = [a * b for a, b in zip(adaptation.lr_scales or [1.0] * len(weights), weights)]
    return adaptation


_GROUPS = FitConfig(steps=4, batch_size=2, learning_rate=2e-2, schedule_base_lr=4e-2, text_encoder_lr=5e-3,
                    text_encoder_steps=2, schedule="polynomial", lr_power=2.0, lr_end=1e-4, warmup_steps=1,
                    step=StepConfig(min_snr_gamma=5.0))


def test_group_lrs_are_te_or_unet_lr_times_block_weight_times_loraplus_times_the_polynomial_factor(monkeypatch, tmp_path):
    """kohya: group LR = (unet_lr | text_encoder_lr) × block weight × LoRA+ ratio, times diffusers'
    polynomial factor computed from --learning_rate (not --unet_lr); the text encoder leaves the
    steps at text_encoder_steps; a resume past the stop continues bit for bit."""
    seen = _spy_optimizer(monkeypatch)
    system = build_toy(seed=1)
    adaptation = _lora(system, loraplus_lr_ratio=4.0)
    names = {id(p): (component, name) for component, _, name, p in adaptation._entries()}
    scales = {id(p): s for p, s in zip(adaptation.params, adaptation.lr_scales)}
    assert {scales[i] for i in scales} == {1.0, 0.5, 4.0, 2.0}  # LoRA+ × block weights, every product present
    te_params = [p for p in adaptation.params if names[id(p)][0] != "unet"]
    after_stop: list[torch.Tensor] = []

    def on_step(progress):
        if progress.step == 2:
            after_stop.extend(p.detach().clone() for p in te_params)
        if progress.step == 3:
            progress.save_state(tmp_path / "state")

    fit(system, adaptation, _IMAGES, _CAPTIONS, config=_GROUPS, on_step=on_step)
    straight = [p.detach().clone() for p in adaptation.params]
    assert len(seen) == 4
    for step, lrs in enumerate(seen):
        factor = _polynomial_factor64(step, reference=4e-2, warmup=1, total=4, power=2.0, lr_end=1e-4)
        assert (step < 2) == any(names[i][0] != "unet" for i in lrs)  # the text encoder trains for 2 steps
        for i, lr in lrs.items():
            base = 5e-3 if names[i][0] != "unet" else 2e-2
            want = base * scales[i] * factor
            assert lr == pytest.approx(want, rel=1e-12, abs=1e-20), (step, names[i])
        if step == 3:  # the last step's factor is (lr_end/L + ...) from --learning_rate, not from the unet lr
            assert factor != pytest.approx(_polynomial_factor64(3, reference=2e-2, warmup=1, total=4, power=2.0, lr_end=1e-4))
    assert all(torch.equal(a, b) for a, b in zip(after_stop, te_params))  # untouched after the stop

    resumed_system = build_toy(seed=1)
    resumed = _lora(resumed_system, loraplus_lr_ratio=4.0)
    fit(resumed_system, resumed, _IMAGES, _CAPTIONS, config=_GROUPS, resume=tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed.params))


def test_polynomial_factor_comes_from_the_optimizer_lr_as_diffusers_lambdalr_with_unet_and_te_groups():
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    learning_rate, unet_lr, te_lr = 1e-3, 3e-4, 5e-5
    config = FitConfig(steps=12, learning_rate=unet_lr, schedule_base_lr=learning_rate, text_encoder_lr=te_lr,
                       warmup_steps=3, schedule="polynomial", lr_power=1.5, lr_end=5e-4)  # lr_end above unet_lr: kohya takes it
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": unet_lr}, {"params": [params[1]], "lr": te_lr},
                                 {"params": [params[2]], "lr": unet_lr * 16}], lr=learning_rate)  # (16: LoRA+)
    scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, 3, 12, lr_end=5e-4, power=1.5)
    for step in range(14):
        unet, text, plus = (group["lr"] for group in optimizer.param_groups)
        assert config.lr_at(step, unet_lr) == pytest.approx(unet, rel=1e-12, abs=1e-20)
        assert config.lr_at(step, te_lr) == pytest.approx(text, rel=1e-12, abs=1e-20)
        assert config.lr_at(step, unet_lr) * 16 == pytest.approx(plus, rel=1e-12, abs=1e-20)
        optimizer.step()
        scheduler.step()
    with pytest.raises(ValueError, match="below learning_rate"):
        FitConfig(learning_rate=unet_lr, schedule_base_lr=learning_rate, schedule="polynomial", lr_end=learning_rate)


def test_train_checks_lr_end_against_learning_rate_and_passes_it_as_the_schedule_reference():
    given = TrainOptions(images=".", learning_rate=1e-3, unet_lr=2e-4, lr_scheduler="polynomial",
                         lr_scheduler_args=("lr_end=5e-4",))  # above --unet-lr, below --learning-rate: kohya trains it
    assert _lr_scheduler_kwargs(given) == {"lr_end": 5e-4}
    with pytest.raises(ValueError, match="must be below --learning-rate"):
        _lr_scheduler_kwargs(dataclasses.replace(given, lr_scheduler_args=("lr_end=1e-3",)))
    with pytest.raises(ValueError, match="must be below --unet-lr"):  # no --learning-rate: --unet-lr is the reference
        _lr_scheduler_kwargs(dataclasses.replace(given, learning_rate=None, lr_scheduler_args=("lr_end=2e-4",)))


def test_train_polynomial_with_unet_lr_decays_by_the_learning_rate_factor_and_records_both(tmp_path):
    """kohya: ss_learning_rate is --learning_rate, ss_unet_lr --unet_lr; the UNet's LR is unet_lr × the
    factor diffusers computes from --learning_rate (here lr_end lies between the two: kohya trains it)."""
    import csv

    from safetensors import safe_open
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "model")
    images = _images(tmp_path / "images")
    out = tmp_path / "o.safetensors"
    assert main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "3", "--batch-size", "2",
                 "--lr", "0.02", "--unet-lr", "0.01", "--lr-scheduler", "polynomial", "--lr-scheduler-power", "2",
                 "--lr-scheduler-args", "lr_end=0.015", "--lr-warmup-steps", "0", "-q", "-o", str(out)]) == 0
    with open(tmp_path / "o-log.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    want = [0.01 * _polynomial_factor64(s, reference=0.02, warmup=0, total=3, power=2.0, lr_end=0.015) for s in range(3)]
    assert rates == pytest.approx(want, rel=1e-5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (float(meta["ss_learning_rate"]), float(meta["ss_unet_lr"])) == (0.02, 0.01)


# ------------------------------------------------------------------------------ Adafactor's relative step
_RELATIVE = FitConfig(steps=2, batch_size=2, learning_rate=1e-3, warmup_steps=0, schedule="constant", optimizer="adafactor",
                      optimizer_args=(("relative_step", True), ("scale_parameter", True)), step=StepConfig())


def _adafactor_run(scales: list[float], config: FitConfig = _RELATIVE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    before = [p.detach().clone() for p in adaptation.params]
    adaptation.lr_scales = scales
    fit(system, adaptation, _IMAGES, _CAPTIONS, config=config)
    return before, [p.detach().clone() for p in adaptation.params]


def test_adafactor_relative_step_ignores_group_lrs_as_kohya_but_a_zero_factor_still_freezes():
    n = len(METHODS["lora"].adapt(build_toy(seed=1), seed=1).params)
    plus = [16.0 if i % 2 else 0.5 for i in range(n)]  # LoRA+-like and block-weight-like factors
    plus[:4] = [0.0] * 4  # a block at lr weight 0 (DreamArtist's neg_lr_weight=0, block_lr 0)
    before, ratios = _adafactor_run(plus)
    _, ones = _adafactor_run([0.0] * 4 + [1.0] * (n - 4))
    assert all(torch.equal(a, b) for a, b in zip(ratios, ones))  # the factors change nothing ...
    assert all(torch.equal(a, b) for a, b in zip(before[:4], ratios[:4]))  # ... but 0 leaves them as they were
    assert not all(torch.equal(a, b) for a, b in zip(before[4:], ratios[4:]))
    # with the LR (relative_step=False) the factors count, and 0 still trains nothing
    fixed = dataclasses.replace(_RELATIVE, optimizer_args=(("relative_step", False),))
    before, scaled = _adafactor_run(plus, fixed)
    _, unscaled = _adafactor_run([0.0] * 4 + [1.0] * (n - 4), fixed)
    assert all(torch.equal(a, b) for a, b in zip(before[:4], scaled[:4]))
    assert not all(torch.equal(a, b) for a, b in zip(scaled[4:], unscaled[4:]))
    with pytest.raises(ValueError, match="every parameter has a learning rate of 0"):
        _adafactor_run([0.0] * n)


def test_relative_step_notes_name_the_lr_factors_it_leaves_unused():
    from sdadapt.jobs import train_optimizer

    options = TrainOptions(images=".", optimizer="Adafactor", unet_lr=1e-4,
                           method_options={"loraplus_lr_ratio": 16.0, "down_lr_weight": "sine"})
    notes = " | ".join(train_optimizer.relative_step_notes(options, (), learning_rate=1e-4))
    assert "--unet-lr 0.0001, loraplus_lr_ratio 16.0, down_lr_weight sine: not used with Adafactor's relative step" in notes
    assert "a weight of 0 still leaves its parameters out" in notes


@pytest.mark.parametrize("options, message", [
    ({"optimizer": "sgd-nesterov"}, "optimizer 'sgd-nesterov'"),
    ({"fused_backward": True, "step": StepConfig(max_grad_norm=None)}, "fused_backward"),
])
def test_cuda_graph_refuses_what_it_cannot_capture_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(cuda_graph=True, **options)


# ------------------------------------------------------------------------------ max norm
_NORM = FitConfig(steps=3, batch_size=2, learning_rate=3e-2, warmup_steps=0, schedule="constant",
                  step=StepConfig(max_grad_norm=None), scale_weight_norms=0.02, text_encoder_steps=2)


def _norm_run(config: FitConfig, **options):
    system = build_toy(seed=1)
    adaptation = _lora(system, loraplus_lr_ratio=4.0, **options)
    torch.manual_seed(0)
    fit(system, adaptation, _IMAGES, _CAPTIONS, config=config)
    return adaptation, adapters_in([system.unet, system.text_encoder], adaptation.params)


def test_max_norm_after_a_fused_backward_step_is_the_usual_loops_with_loraplus_blocks_and_te_stop():
    """The fused backward steps inside backward(); the max-norm pass runs after it, once per step."""
    usual, _ = _norm_run(_NORM)
    fused, fused_adapters = _norm_run(dataclasses.replace(_NORM, fused_backward=True))
    for a, b in zip(usual.params, fused.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(delta_norms(fused_adapters).max()) <= 0.02 * (1 + 1e-5)


def test_max_norm_pass_draws_no_dropout_and_uses_the_undropped_delta():
    """Rank / module dropout happen in the forward only: the pass reads ΔW as saved (kohya reads
    the state dict) and consumes no random numbers, so a run's draws do not move."""
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1, rank_dropout=0.5, module_dropout=0.5, dropout=0.3)
    with torch.no_grad():
        for p in adaptation.params:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    adapters = adapters_in([system.unet, system.text_encoder], adaptation.params)
    system.unet.train()
    with torch.no_grad():
        eval_norms = [float(torch.linalg.vector_norm(a.eval().delta_weight().double())) for a in adapters]
    for a in adapters:
        a.train()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    scale_weight_norms_(adapters, 0.5)
    assert torch.equal(rng, torch.get_rng_state())
    with torch.no_grad():
        after = [float(torch.linalg.vector_norm(a.delta_weight().double())) for a in adapters]
    for before, now in zip(eval_norms, after):
        assert now == pytest.approx(min(before, 0.5), rel=1e-5)


def test_max_norm_refuses_dora_with_loraplus_before_the_first_step():
    system = build_toy(seed=1)
    adaptation = METHODS["dora"].adapt(system, seed=1, loraplus_lr_ratio=4.0)
    with pytest.raises(ValueError, match="DoRA renormalises"):
        fit(system, adaptation, _IMAGES, _CAPTIONS, config=_NORM)


# ------------------------------------------------------------------------------ optimizer args and resume
@pytest.mark.parametrize("optimizer, args", [
    ("adamw", (("betas", (0.8, 0.95)), ("eps", 1e-6))),
    ("adamw8bit", (("betas", (0.8, 0.95)), ("eps", 1e-6), ("block_size", 64))),
    ("adamw-bf16", (("betas", (0.8, 0.95)),)),
])
def test_optimizer_args_reach_the_groups_and_a_resume_is_bit_exact(optimizer, args, tmp_path):
    config = FitConfig(steps=3, batch_size=2, learning_rate=1e-2, warmup_steps=0, schedule="constant", optimizer=optimizer,
                       optimizer_args=args, text_encoder_lr=2e-3, step=StepConfig(), cuda_graph=True)  # (CPU: eager)
    made = []
    real = fit_module.make_optimizer

    def spy(groups, cfg):
        made.append(real(groups, cfg))
        return made[-1]

    def run(resume=None, on_step=None):
        system = build_toy(seed=1)
        adaptation = _lora(system, loraplus_lr_ratio=2.0)
        fit(system, adaptation, _IMAGES, _CAPTIONS, config=config, resume=resume, on_step=on_step)
        return [p.detach().clone() for p in adaptation.params]

    fit_module.make_optimizer, saved = spy, fit_module.make_optimizer
    try:
        straight = run(on_step=lambda p: p.step == 2 and p.save_state(tmp_path / "s"))
        resumed = run(resume=tmp_path / "s")
    finally:
        fit_module.make_optimizer = saved
    for group in made[0].param_groups:
        assert tuple(group["betas"]) == (0.8, 0.95)
        assert group.get("eps", 1e-6) == dict(args).get("eps", group.get("eps"))
        if "block_size" in dict(args):
            assert group["block_size"] == 64
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


# ------------------------------------------------------------------------------ zero terminal SNR at t = 999
def _ac() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return D.zero_terminal_snr_alphas_cumprod(torch.cumprod(1 - betas, 0)).float()


_ZT_CONFIGS = [
    StepConfig(prediction_type="v_prediction", scale_v_pred_loss_like_noise_pred=True, min_snr_gamma=5.0,
               debiased_estimation=True, loss="huber", huber_schedule="snr"),
    StepConfig(prediction_type="v_prediction", min_snr_gamma=1.0, debiased_estimation=True, loss="smooth_l1",
               huber_schedule="snr"),
    StepConfig(prediction_type="v_prediction", scale_v_pred_loss_like_noise_pred=True, loss="l2"),
    StepConfig(prediction_type="epsilon", min_snr_gamma=5.0, loss="huber", huber_schedule="snr"),
    StepConfig(prediction_type="epsilon", min_snr_gamma=5.0, loss="huber", huber_schedule="exponential", p2_gamma=1.0),
]


@pytest.mark.parametrize("config", _ZT_CONFIGS, ids=range(len(_ZT_CONFIGS)))
@pytest.mark.parametrize("masked", [False, True])
def test_zero_terminal_snr_losses_and_gradients_are_finite_at_the_last_timesteps(config, masked):
    config = dataclasses.replace(config, timestep_range=(997, 1000))
    ac = _ac()
    assert float(ac[-1]) == 0.0
    torch.manual_seed(0)
    model = ConvDenoiser()
    batch = {"latents": torch.randn(3, 4, 4, 4), "cond": None}
    if masked:
        batch["loss_mask"] = torch.cat([torch.zeros(1, 1, 4, 4), torch.rand(2, 1, 4, 4)])  # one sample all masked
    state = TrainState(seed=1)
    for _ in range(4):
        prepared = prepare_batch(batch, state=state, config=config, alphas_cumprod=ac)
        loss = step_loss(model, prepared, config)
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(prepared["weights"]).all() and math.isfinite(float(loss.detach()))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert int(prepared["t"].max()) <= 999


def test_zero_terminal_snr_refuses_the_unbounded_weights_by_name():
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    for step, message in ((StepConfig(debiased_estimation=True), "debiased estimation with epsilon"),
                          (StepConfig(v_pred_like_loss=0.2), "v_pred_like_loss")):
        config = FitConfig(steps=1, batch_size=2, zero_terminal_snr=True, step=step)
        with pytest.raises(ValueError, match=message):
            fit(system, adaptation, _IMAGES, _CAPTIONS, config=config)


# ------------------------------------------------------------------------------ the noise options together
_NOISES = StepConfig(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05,
                     pyramid_noise_iterations=3, pyramid_noise_discount=0.3, input_perturbation=0.1,
                     input_perturbation_random_strength=True, max_grad_norm=None, min_snr_gamma=5.0)


def test_the_noise_options_draw_in_kohyas_order():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ac = _ac()
    state = TrainState(seed=11)
    prepared = prepare_batch({"latents": latents, "cond": None}, state=state, config=_NOISES, alphas_cumprod=ac)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(TrainState(seed=11).generator.get_state(), g.get_state())
    noise = torch.randn(latents.shape, generator=g)
    strength = torch.rand((1,), generator=g) * 0.1
    strength = D.adaptive_offset_strength(latents, strength, scale=0.05)
    noise = D.offset_noise(noise, strength, generator=g)
    noise = D.pyramid_noise(noise, iterations=3, discount=0.3, generator=g)
    t = D.sample_timesteps(2, 1000, generator=g, low=0, high=1000, device=latents.device)
    gamma = torch.rand((1,), generator=g) * 0.1
    x_t = D.add_noise(latents, D.perturbed_noise(noise, gamma, generator=g), t, ac)
    assert torch.equal(prepared["t"], t)
    assert torch.equal(prepared["x_t"], x_t)
    assert torch.equal(state.generator.get_state(), g.get_state())


def test_the_noise_options_together_draw_the_same_eager_and_captured(fake_cuda_graphs, prepared_batches):
    ac = _ac()
    keys = ("x_t", "t", "target")
    eager_seen, captured_seen = prepared_batches(step_module, *keys), prepared_batches(step_capture, *keys)
    torch.manual_seed(0)
    model = ConvDenoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [{"latents": torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(i)), "cond": None}
               for i in range(4)]
    eager_state, captured_state = TrainState(seed=7), TrainState(seed=7)
    for batch in batches:
        train_step(model, batch, params=list(model.parameters()), optimizer=opt, state=eager_state, config=_NOISES,
                   alphas_cumprod=ac)
    captured = step_capture.CapturedStep(model, params=list(model.parameters()), optimizer=opt, config=_NOISES,
                                         alphas_cumprod=ac, warmup_steps=1)
    for batch in batches:  # warm-up, capture, 2 replays
        captured(batch, state=captured_state)
    assert captured.graph_count == 1 and len(eager_seen) == len(captured_seen) == 4
    for a, b in zip(eager_seen, captured_seen):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert torch.equal(eager_state.generator.get_state(), captured_state.generator.get_state())
