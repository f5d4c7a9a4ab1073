"""kohya's ``zero_terminal_snr``, ``adaptive_noise_scale``, ``noise_offset_random_strength`` and
``huber_scale``: the formulas against float64 references written here, the step's draws (eager and
captured alike, no host sync), the SNR-0 edge cases, and ``train``'s flags, TOML keys, refusals,
run record and ``ss_*`` metadata.

Reference behaviour (kohya-ss/sd-scripts, library/train_util.py and library/custom_train_functions.py):

* ``get_noise_noisy_latents_and_timesteps``: ``noise = randn_like(latents)``; with ``noise_offset``
  and ``noise_offset_random_strength`` the strength is ``torch.rand(1) * noise_offset`` (one draw per
  batch); then ``apply_noise_offset``.
* ``apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale)``: with an adaptive scale,
  ``noise_offset = clamp(noise_offset + scale * |latents.mean((2, 3), keepdim)|, 0)``; then
  ``noise + noise_offset * randn(B, C, 1, 1)``. ``adaptive_noise_scale`` without ``noise_offset``
  is refused ("adaptive_noise_scale requires noise_offset").
* ``get_huber_threshold_if_needed``: exponential ``exp(-alpha * t) * huber_scale`` with
  ``alpha = -ln(huber_c) / T``; snr ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` (not scaled);
  constant ``huber_c * huber_scale``.
* ``fix_noise_scheduler_betas_for_zero_terminal_snr``: ``sqrt(alphas_bar)`` shifted so the last is 0
  and scaled so the first is unchanged, back to betas; the training scheduler only (``get_my_scheduler``
  builds the sampling scheduler without it). ``ss_zero_terminal_snr``, ``ss_adaptive_noise_scale``,
  ``ss_noise_offset_random_strength``, ``ss_huber_scale`` in train_network.py's metadata.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from tiny_models import ConvDenoiser

from sdadapt.cli import main
from sdadapt.jobs.train import (
    TrainOptions,
    _check_resume,
    _inactive_option_notes,
    _write_run_record,
)
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.fit import zero_terminal_snr_clashes
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import diffusion as D
from sdadapt.training import step as step_module
from sdadapt.training import step_capture
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, train_step


# ------------------------------------------------------------------------------ references
def _kohya_zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """kohya's enforce_zero_terminal_snr, written out in float64."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    s0, sT = sqrt_ab[0].item(), sqrt_ab[-1].item()
    rescaled = [(v - sT) * s0 / (s0 - sT) for v in sqrt_ab.tolist()]
    ab = [v * v for v in rescaled]
    alphas = [ab[0]] + [ab[i] / ab[i - 1] for i in range(1, len(ab))]
    return torch.tensor([1 - a for a in alphas], dtype=torch.float64)


def _reference_noise(latents: torch.Tensor, seed: int, *, offset: float, random_strength: bool,
                     adaptive: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, t) in kohya's draw order from a generator seeded ``seed``, the offset per (b, c) by loops."""
    g = torch.Generator().manual_seed(seed)
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    strength = offset
    if random_strength:
        strength = float(torch.rand((1,), generator=g)[0]) * offset
    shift = torch.randn((b, c, 1, 1), generator=g, dtype=latents.dtype)
    out = noise.clone()
    for i in range(b):
        for j in range(c):
            s = strength
            if adaptive is not None:
                s = max(0.0, strength + adaptive * abs(float(latents[i, j].double().mean())))
            out[i, j] += s * shift[i, j, 0, 0]
    t = torch.randint(0, 1000, (b,), generator=g)
    return out, t


# ------------------------------------------------------------------------------ pure math
def test_zero_terminal_snr_alphas_cumprod_is_kohyas_rescale():
    betas = D.noise_schedule("scaled_linear")
    want = torch.cumprod(1 - _kohya_zero_terminal_snr_betas(betas), 0)
    ac = D.alphas_cumprod_of(betas)
    got = D.zero_terminal_snr_alphas_cumprod(ac)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, D.alphas_cumprod_of(D.rescale_zero_terminal_snr(betas)), rtol=1e-10, atol=1e-12)
    assert got[0] == ac[0] and got[-1] == 0.0 and bool((got[1:] <= got[:-1]).all())
    torch.testing.assert_close(D.zero_terminal_snr_alphas_cumprod(got), got, rtol=0, atol=1e-15)  # idempotent
    f32 = D.zero_terminal_snr_alphas_cumprod(ac.float())
    assert f32.dtype == torch.float32 and f32[-1] == 0.0
    with pytest.raises(ValueError, match="must decrease"):
        D.zero_terminal_snr_alphas_cumprod(ac.flip(0))


@pytest.mark.parametrize("scale", [0.5, -3.0])
@pytest.mark.parametrize("offset", [0.1, torch.tensor([0.03])])
def test_adaptive_offset_strength_matches_a_per_channel_loop(scale, offset):
    latents = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) + torch.arange(4.0).view(1, 4, 1, 1) - 1.5
    got = D.adaptive_offset_strength(latents, offset, scale=scale)
    base = float(offset) if not isinstance(offset, torch.Tensor) else float(offset[0])
    assert got.shape == (3, 4, 1, 1)
    for b in range(3):
        for c in range(4):
            want = max(0.0, base + scale * abs(latents[b, c].double().mean().item()))
            assert math.isclose(float(got[b, c, 0, 0]), want, rel_tol=1e-5, abs_tol=1e-6)
    if scale < 0:
        assert float(got.min()) == 0.0  # clamped, as kohya


def test_huber_scale_scales_the_constant_and_exponential_schedules_only():
    t = torch.tensor([0, 10, 500, 999])
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear"))
    c, s = 0.2, 3.0
    alpha = -math.log(c) / 1000
    torch.testing.assert_close(D.huber_c_for(t, huber_c=c, schedule="constant", scale=s), torch.full((4,), c * s))
    torch.testing.assert_close(D.huber_c_for(t, huber_c=c, schedule="exponential", alphas_cumprod=ac, scale=s),
                               torch.tensor([math.exp(-alpha * float(x)) * s for x in t]))
    sigma = [math.sqrt((1 - float(ac[x])) / float(ac[x])) for x in t]
    torch.testing.assert_close(D.huber_c_for(t, huber_c=c, schedule="snr", alphas_cumprod=ac, scale=s),
                               torch.tensor([(1 - c) / (1 + sg) ** 2 + c for sg in sigma]))


@pytest.mark.parametrize("schedule", ["exponential", "snr"])
@pytest.mark.parametrize("terminal", [False, True])
def test_huber_schedules_make_no_float64_tensor(schedule, terminal):
    """MPS has no float64: the per-step Huber c stays float32 on t's device (kohya's float32 values), a
    zero-terminal-SNR end (ᾱ_T = 0, σ_T = ∞) included, where ``snr`` gives c."""
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    if terminal:
        ac = ac.clone()
        ac[-1] = 0.0
    made = []

    class Float64Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(str(func) for x in pytree.tree_leaves(out)
                        if isinstance(x, torch.Tensor) and x.dtype == torch.float64)
            return out

    t = torch.tensor([0, 10, 500, 999])
    with Float64Outputs():
        c = D.huber_c_for(t, huber_c=0.1, schedule=schedule, alphas_cumprod=ac)
    assert made == [] and c.dtype == torch.float32 and bool(torch.isfinite(c).all())
    if schedule == "snr" and terminal:
        assert float(c[-1]) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ the step's draws
@pytest.mark.parametrize("random_strength, adaptive", [(False, 0.5), (True, None), (True, -0.2)])
def test_the_step_draws_kohyas_noise_in_kohyas_order(random_strength, adaptive):
    latents = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.7
    config = StepConfig(noise_offset=0.1, noise_offset_random_strength=random_strength, adaptive_noise_scale=adaptive)
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear"))
    prepared = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=5), config=config, alphas_cumprod=ac)
    noise, t = _reference_noise(latents, 5, offset=0.1, random_strength=random_strength, adaptive=adaptive)
    torch.testing.assert_close(prepared["target"], noise, rtol=1e-12, atol=1e-12)  # ε target
    assert torch.equal(prepared["t"], t)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(prepared["x_t"], a.sqrt() * latents + (1 - a).sqrt() * noise, rtol=1e-12, atol=1e-12)


def test_the_random_strength_is_one_draw_per_batch_in_zero_to_the_offset():
    """The strength each batch's offset used, read back from its ε target ``ε + s·n`` (ε and n
    replayed from the generator): one ``s = u·X`` shared by the batch's rows, a fresh u each batch."""
    state = TrainState(seed=0)
    config = StepConfig(noise_offset=0.2, noise_offset_random_strength=True)
    drawn, used = [], []
    for _ in range(200):
        g = torch.Generator().set_state(state.generator.get_state())
        eps = torch.randn((4, 1, 1, 1), generator=g, dtype=torch.float64)  # the noise
        drawn.append(float(torch.rand((1,), generator=g)[0]) * 0.2)
        shift = torch.randn((4, 1, 1, 1), generator=g, dtype=torch.float64)  # the offset's own draw
        prepared = prepare_batch({"latents": torch.zeros(4, 1, 1, 1, dtype=torch.float64), "cond": None}, state=state,
                                 config=config, alphas_cumprod=torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))
        strength = ((prepared["target"] - eps) / shift).flatten()  # (4,): the same s for every row
        torch.testing.assert_close(strength, torch.full((4,), drawn[-1], dtype=torch.float64), rtol=1e-6, atol=1e-9)
        used.append(float(strength[0]))
    assert 0.0 <= min(used) < 0.02 and 0.18 < max(used) < 0.2
    assert len(set(drawn)) == len(drawn)  # a new draw each batch


def test_default_options_draw_and_compute_what_they_did():
    """huber_scale=1 and the new options off: the same draws and numbers as a config without them."""
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    old = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=3), alphas_cumprod=ac,
                        config=StepConfig(noise_offset=0.05, loss="huber"))
    new = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=3), alphas_cumprod=ac,
                        config=StepConfig(noise_offset=0.05, loss="huber", huber_scale=1.0, adaptive_noise_scale=None,
                                          noise_offset_random_strength=False))
    assert torch.equal(old["x_t"], new["x_t"]) and old["huber_c"] == new["huber_c"] == 0.1


def test_huber_scale_reaches_the_loss():
    latents = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear"))
    prepared = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=0), alphas_cumprod=ac,
                             config=StepConfig(loss="huber", huber_c=0.1, huber_scale=4.0))
    assert prepared["huber_c"] == pytest.approx(0.4)
    prediction = torch.zeros_like(latents)
    d = (prediction - prepared["target"]).flatten(1)
    want = (2 * 0.4 * ((d * d + 0.16).sqrt() - 0.4)).mean(1).mean()
    got = step_module.step_loss(lambda x, t, c: prediction, prepared, StepConfig(loss="huber"))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)


_NOISY = StepConfig(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.3, loss="huber",
                    huber_schedule="exponential", huber_scale=2.0, max_grad_norm=None)


def test_eager_and_captured_steps_draw_the_same(fake_cuda_graphs, prepared_batches):
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    eager_seen, captured_seen = prepared_batches(step_module, "x_t"), prepared_batches(step_capture, "x_t")
    torch.manual_seed(0)
    model = ConvDenoiser()
    eager_state = TrainState(seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(4):
        train_step(model, {"latents": latents, "cond": None}, params=list(model.parameters()), optimizer=opt,
                   state=eager_state, config=_NOISY, alphas_cumprod=ac)
    captured = step_capture.CapturedStep(model, params=list(model.parameters()), optimizer=opt, config=_NOISY,
                                         alphas_cumprod=ac, warmup_steps=1)
    captured_state = TrainState(seed=7)
    for _ in range(4):  # warm-up, capture, two replays
        captured({"latents": latents, "cond": None}, state=captured_state)
    assert captured.graph_count == 1
    assert len(eager_seen) == len(captured_seen) == 4
    for (a,), (b,) in zip(eager_seen, captured_seen):
        assert torch.equal(a, b)
    assert torch.equal(eager_state.generator.get_state(), captured_state.generator.get_state())


def test_the_new_noise_options_make_no_host_sync():
    torch.manual_seed(0)
    model = ConvDenoiser()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0)
    ac = D.zero_terminal_snr_alphas_cumprod(D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float())
    batch = {"latents": torch.randn(4, 4, 4, 4), "cond": None}
    config = StepConfig(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.3, loss="huber",
                        huber_schedule="snr", huber_scale=2.0, min_snr_gamma=5.0, prediction_type="v_prediction")

    def step():
        train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)

    with HostSyncs() as syncs:
        step()  # optimiser state
        for _ in range(3):
            syncs.events.clear()
            step()
            assert [str(e) for e in syncs.events] == []


# ------------------------------------------------------------------------------ zero terminal SNR
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_last_timestep_of_a_zero_terminal_snr_schedule_trains_finite(prediction_type):
    ac = D.zero_terminal_snr_alphas_cumprod(D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float())
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    config = StepConfig(prediction_type=prediction_type, min_snr_gamma=5.0, loss="huber", huber_schedule="snr",
                        huber_c=0.1, debiased_estimation=prediction_type != "epsilon")
    prepared = prepare_batch({"latents": latents, "cond": None, "noise": noise, "timesteps": torch.tensor([999, 0])},
                             state=TrainState(seed=0), config=config, alphas_cumprod=ac)
    assert torch.equal(prepared["x_t"][0], noise[0])  # pure noise: √ᾱ_T = 0
    want_target = {"epsilon": noise[0], "v_prediction": -latents[0], "sample": latents[0]}[prediction_type]
    torch.testing.assert_close(prepared["target"][0], want_target)
    weights, huber_c = prepared["weights"], prepared["huber_c"]
    assert torch.isfinite(weights).all() and torch.isfinite(huber_c).all()
    # min-SNR's limits at SNR 0: ε-loss min(SNR, γ)/SNR -> 1, v-loss min(SNR, γ)/(SNR+1) -> 0, x0-loss min(SNR, γ) -> 0;
    # debiased (v): 1/(SNR+1) = 1
    assert float(weights[0]) == {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}[prediction_type]
    assert float(huber_c[0]) == pytest.approx(0.1)  # σ_T = ∞: (1-c)/(1+σ)² + c = c
    loss = step_module.step_loss(lambda x, t, c: torch.zeros_like(x), prepared, config)
    assert torch.isfinite(loss)


def test_debiased_estimation_with_epsilon_is_what_zero_terminal_snr_cannot_train():
    assert zero_terminal_snr_clashes(StepConfig(debiased_estimation=True, prediction_type="epsilon"))
    assert not zero_terminal_snr_clashes(StepConfig(debiased_estimation=True, prediction_type="v_prediction"))
    assert not zero_terminal_snr_clashes(StepConfig(min_snr_gamma=5.0, loss="huber", huber_schedule="snr"))
    ac = D.zero_terminal_snr_alphas_cumprod(D.alphas_cumprod_of(D.noise_schedule("scaled_linear")))
    assert 1 / math.sqrt(float(D.snr(torch.tensor([998]), ac))) > 1000  # why: 1/√SNR next to the end


def test_a_model_on_the_zero_snr_schedule_already_refuses_what_it_cannot_train():
    """A model whose own ᾱ ends at 0 (a ``ztsnr`` checkpoint, a ``rescale_betas_zero_snr`` config) is checked as
    ``--zero-terminal-snr`` is: debiased estimation with ε would weigh its last timestep by 1/√0."""
    system = build_toy(seed=1)
    system.alphas_cumprod = D.zero_terminal_snr_alphas_cumprod(system.alphas_cumprod)
    images, captions = concept_data("cross", 2, seed=0)
    with pytest.raises(ValueError, match=r"this model's zero-terminal-SNR schedule .* cannot train debiased "
                                         "estimation with epsilon"):
        fit(system, METHODS["lora"].adapt(system, seed=1), images, captions, config=FitConfig(
            steps=1, batch_size=2, warmup_steps=0, step=StepConfig(debiased_estimation=True)))


def test_fit_trains_on_the_rescaled_schedule_and_leaves_the_systems(monkeypatch):
    fit_module = importlib.import_module("sdadapt.methods.fit")
    seen = []
    real = fit_module.train_step

    def spy(*args, alphas_cumprod, **kwargs):
        seen.append(alphas_cumprod)
        return real(*args, alphas_cumprod=alphas_cumprod, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", spy)
    system = build_toy(seed=1)
    before = system.alphas_cumprod.clone()
    images, captions = concept_data("cross", 2, seed=0)
    config = FitConfig(steps=1, batch_size=2, warmup_steps=0, zero_terminal_snr=True)
    losses = fit(system, METHODS["lora"].adapt(system, seed=1), images, captions, config=config)
    assert len(losses) == 1 and math.isfinite(losses[0])
    torch.testing.assert_close(seen[0], D.zero_terminal_snr_alphas_cumprod(before))
    assert seen[0][-1] == 0 and torch.equal(system.alphas_cumprod, before)
    other = build_toy(seed=1)
    with pytest.raises(ValueError, match="debiased estimation with epsilon"):  # the toy predicts ε
        fit(other, METHODS["lora"].adapt(other, seed=1), images, captions, config=FitConfig(
            steps=1, batch_size=2, warmup_steps=0, zero_terminal_snr=True, step=StepConfig(debiased_estimation=True)))


# ------------------------------------------------------------------------------ train: flags, TOML, metadata
def test_a_kohya_config_with_the_four_options_trains_with_them_and_records_them(red_circles, tmp_path, train_fit_calls,
                                                                               capsys):
    config = tmp_path / "kohya.toml"
    config.write_text("""
[training_arguments]
noise_offset = 0.05
noise_offset_random_strength = true
adaptive_noise_scale = 0.01
zero_terminal_snr = true
loss_type = "huber"
huber_schedule = "constant"
huber_scale = 2.5
""")
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "--batch-size", "2", "--no-prior", "-o", str(out)]) == 0
    assert "zero terminal SNR is meant for v-prediction" in capsys.readouterr().err  # the toy predicts ε
    (fit_config,) = [call.config for call in train_fit_calls]
    step = fit_config.step
    assert fit_config.zero_terminal_snr
    assert (step.noise_offset, step.noise_offset_random_strength, step.adaptive_noise_scale, step.huber_scale) == (
        0.05, True, 0.01, 2.5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_zero_terminal_snr"], meta["ss_noise_offset_random_strength"], meta["ss_adaptive_noise_scale"],
            meta["ss_huber_scale"]) == ("True", "True", "0.01", "2.5")


def test_the_flags_reach_the_options():
    from sdadapt.cli import build_parser

    args = build_parser().parse_args(["train", "lora", "--images", ".", "--zero-terminal-snr", "--noise-offset", "0.1",
                                      "--noise-offset-random-strength", "--adaptive-noise-scale", "-0.5",
                                      "--huber-scale", "0.5"])
    assert (args.zero_terminal_snr, args.noise_offset_random_strength, args.adaptive_noise_scale, args.huber_scale) == (
        True, True, -0.5, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"adaptive_noise_scale": 0.3}, "adaptive_noise_scale=0.3 adds to the noise offset, so it needs noise_offset > 0"),
    ({"noise_offset": 0.1, "adaptive_noise_scale": math.inf}, "adaptive_noise_scale must be a finite number"),
    ({"huber_scale": math.inf}, "huber_scale must be a finite number > 0"),
    ({"huber_scale": 0.0}, "huber_scale must be a finite number > 0"),
])
def test_the_step_config_refuses_what_would_be_ignored_or_unbounded(kwargs, message):
    """kohya: "adaptive_noise_scale requires noise_offset" — the library refuses it too (the step
    would otherwise ignore it without a word)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        StepConfig(**kwargs)
    StepConfig(adaptive_noise_scale=0.0)  # 0 adds nothing: allowed (train reports it unused)


@pytest.mark.parametrize("flags, message", [
    (["--adaptive-noise-scale", "0.01"], "--adaptive-noise-scale 0.01 adds to the noise offset, so it needs --noise-offset"),
    (["--noise-offset", "0.1", "--adaptive-noise-scale", "nan"], "--adaptive-noise-scale must be a finite number"),
    (["--huber-scale", "0"], "--huber-scale must be > 0"),
    (["--zero-terminal-snr", "--debiased-estimation-loss", "--prediction-type", "epsilon"],
     "debiased estimation with epsilon prediction"),
    (["--zero-terminal-snr", "--debiased-estimation-loss"], "debiased estimation with epsilon prediction"),  # after loading
])
def test_bad_combinations_are_refused_before_training(red_circles, tmp_path, capsys, flags, message):
    out = tmp_path / "x.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), *flags, "--steps", "1", "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dreamartist_reconstruction_is_refused_with_zero_terminal_snr():
    with pytest.raises(ValueError, match="--zero-terminal-snr with --rec-weight"):
        TrainOptions(images=".", zero_terminal_snr=True, method_options={"token": "<x>", "rec_weight": 0.5})


def test_options_given_without_what_they_act_with_are_reported():
    notes = " | ".join(_inactive_option_notes(TrainOptions(images=".", noise_offset_random_strength=True,
                                                            adaptive_noise_scale=0.0, huber_scale=2.0)))
    assert "--noise-offset-random-strength, --adaptive-noise-scale 0: not used without --noise-offset" in notes
    assert "--huber-scale 2.0: not used by --loss-type l2" in notes
    notes = _inactive_option_notes(TrainOptions(images=".", loss_type="huber", huber_scale=2.0))
    assert any("--huber-scale 2.0: not used by --huber-schedule snr" in n for n in notes)
    assert not _inactive_option_notes(TrainOptions(images=".", loss_type="huber", huber_schedule="constant", huber_scale=2.0,
                                                   noise_offset=0.1, noise_offset_random_strength=True,
                                                   adaptive_noise_scale=0.1))


def test_resume_refuses_a_changed_noise_record_and_reads_older_records(tmp_path):
    options = TrainOptions(images=".", noise_offset=0.1, noise_offset_random_strength=True)
    _write_run_record(tmp_path, "lora", options, 1, 2)
    (tmp_path / "state.json").write_text(json.dumps({"step": 1}))
    assert _check_resume(tmp_path, "lora", options)["noise"]["noise_offset_random_strength"] is True
    with pytest.raises(ValueError, match="noise_offset_random_strength True \\(now False\\)"):
        _check_resume(tmp_path, "lora", TrainOptions(images=".", noise_offset=0.1))
    with pytest.raises(ValueError, match="zero_terminal_snr False \\(now True\\)"):
        _check_resume(tmp_path, "lora", TrainOptions(images=".", noise_offset=0.1, noise_offset_random_strength=True,
                                                     zero_terminal_snr=True))
    record = json.loads((tmp_path / "run.json").read_text())
    del record["noise"]  # a record from before these options: trained without them
    (tmp_path / "run.json").write_text(json.dumps(record))
    _check_resume(tmp_path, "lora", TrainOptions(images="."))
    with pytest.raises(ValueError, match="noise_offset_random_strength False"):
        _check_resume(tmp_path, "lora", options)
