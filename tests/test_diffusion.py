"""Diffusion math vs diffusers' schedulers and naive float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.training import diffusion as D

diffusers = pytest.importorskip("diffusers")

SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _fake_model(x, t, cond):
    """Deterministic, non-linear in x and t, depends on cond: enough to catch any indexing slip."""
    tf = t.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    c = cond if isinstance(cond, torch.Tensor) else torch.zeros(())
    return (0.3 * torch.tanh(x) * torch.cos(tf / 150) + 0.05 * x + c.reshape(-1, *([1] * (x.ndim - 1)))).to(x.dtype)


# ----------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_schedules_match_diffusers(name, ztsnr):
    cfg = dict(SD_CONFIG, beta_schedule=name, rescale_betas_zero_snr=ztsnr)
    if name == "linear":
        cfg.update(beta_start=0.0001, beta_end=0.02)
    ref = diffusers.DDPMScheduler(**cfg)
    betas = D.noise_schedule(
        "cosine" if name == "squaredcos_cap_v2" else name,
        beta_start=cfg["beta_start"],
        beta_end=cfg["beta_end"],
        zero_terminal_snr=ztsnr,
    )
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas.float(), ref.betas, atol=2e-6, rtol=1e-4)
    ac = D.alphas_cumprod_of(betas)
    # diffusers cumprods in float32 (and bumps ᾱ_T to 2^-24 under zero SNR); compare with that slack
    torch.testing.assert_close(ac[:-1].float(), ref.alphas_cumprod[:-1], atol=1e-5, rtol=1e-4)
    if ztsnr:
        assert ac[-1] == 0 and D.snr(torch.tensor([999]), ac)[0] == 0


def test_scaled_linear_naive_reference():
    betas = D.noise_schedule("scaled_linear")
    naive = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    np.testing.assert_allclose(betas.numpy(), naive, rtol=1e-12)
    ac, prod = D.alphas_cumprod_of(betas).numpy(), 1.0
    for i in (0, 1, 500, 999):
        prod = float(np.prod(1 - np.array(naive[: i + 1])))
        assert ac[i] == pytest.approx(prod, rel=1e-12)


def test_zero_terminal_snr_keeps_first_step():
    betas = D.noise_schedule("scaled_linear")
    rescaled = D.rescale_zero_terminal_snr(betas)
    a, b = D.alphas_cumprod_of(betas), D.alphas_cumprod_of(rescaled)
    assert b[0] == pytest.approx(float(a[0]), rel=1e-12) and b[-1].abs() < 1e-15
    assert torch.all(b[1:] < b[:-1])  # still monotone


# ------------------------------------------------------------------------ noising and targets
def _ac():
    return D.alphas_cumprod_of(D.noise_schedule("scaled_linear"))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 999), st.sampled_from(["epsilon", "v_prediction", "sample"]))
def test_targets_and_inverses_float64(batch, t0, pred):
    g = torch.Generator().manual_seed(t0)
    ac = _ac()
    x0 = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0] = t0
    xt = D.add_noise(x0, eps, t, ac)
    a = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    target = D.target_for(pred, x0, eps, t, ac)
    naive = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[pred]
    torch.testing.assert_close(target, naive)
    # the perfect prediction recovers x0 and ε
    torch.testing.assert_close(D.predicted_x0(pred, xt, target, t, ac), x0, atol=1e-6, rtol=1e-6)
    if pred != "sample" or bool((ac[t] < 0.999).all()):
        torch.testing.assert_close(D.predicted_noise(pred, xt, target, t, ac), eps, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_add_noise_and_velocity_match_diffusers(pred):
    ref = diffusers.DDPMScheduler(**SD_CONFIG, prediction_type=pred)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ac = ref.alphas_cumprod
    torch.testing.assert_close(D.add_noise(x0, eps, t, ac), ref.add_noise(x0, eps, t))
    if pred == "v_prediction":
        torch.testing.assert_close(D.target_for(pred, x0, eps, t, ac), ref.get_velocity(x0, eps, t))


def test_add_noise_keeps_dtype_and_computes_wide():
    ac = _ac()
    x0 = torch.randn(2, 4, 4, 4).bfloat16()
    out = D.add_noise(x0, torch.randn_like(x0), torch.tensor([3, 900]), ac)
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ loss weights
def test_min_snr_weights_equalise_the_three_parameterisations():
    """min(SNR,γ)·‖x0 - x̂0‖² is the same loss whichever target the model regresses."""
    ac, g = _ac(), torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([10, 200, 400, 700, 990])
    xt = D.add_noise(x0, eps, t, ac)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    snr = D.snr(t, ac)
    reference = torch.minimum(snr, torch.full_like(snr, 5.0)) * ((x0 - x0_hat) ** 2).flatten(1).mean(1)
    a = ac[t].reshape(-1, 1, 1, 1)
    eps_hat = (xt - a.sqrt() * x0_hat) / (1 - a).sqrt()
    outputs = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
    for pred, out in outputs.items():
        target = D.target_for(pred, x0, eps, t, ac)
        w = D.min_snr_weight(snr, 5.0, pred)
        per = ((out - target) ** 2).flatten(1).mean(1) * w
        torch.testing.assert_close(per, reference, rtol=1e-9, atol=1e-12)


def test_min_snr_matches_diffusers_training_formula():
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(**SD_CONFIG)
    t = torch.tensor([0, 5, 100, 600, 999])
    snr_ref = compute_snr(ref, t)
    torch.testing.assert_close(D.snr(t, ref.alphas_cumprod), snr_ref)
    base = torch.stack([snr_ref, 5 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(D.min_snr_weight(snr_ref, 5.0, "epsilon"), base / snr_ref)
    torch.testing.assert_close(D.min_snr_weight(snr_ref, 5.0, "v_prediction"), base / (snr_ref + 1))


def test_weights_at_zero_terminal_snr_are_finite():
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear", zero_terminal_snr=True))
    s = D.snr(torch.tensor([0, 999]), ac)
    for pred in D.PREDICTION_TYPES:
        assert torch.isfinite(D.min_snr_weight(s, 5.0, pred)).all()
    assert torch.isfinite(D.debiased_weight(s)).all()
    assert D.min_snr_weight(s, 5.0, "epsilon")[1] == 1.0  # the ε-limit as SNR -> 0
    assert D.min_snr_weight(s, 5.0, "v_prediction")[1] == 0.0


def test_debiased_and_p2_weights():
    s = torch.tensor([1e-3, 0.5, 4.0, 5000.0], dtype=torch.float64)
    torch.testing.assert_close(D.debiased_weight(s), 1 / torch.tensor([1e-3, 0.5, 4.0, 1000.0], dtype=torch.float64).sqrt())
    torch.testing.assert_close(D.debiased_weight(s, "v_prediction"), 1 / (torch.tensor([1e-3, 0.5, 4.0, 1000.0], dtype=torch.float64) + 1))
    torch.testing.assert_close(D.p2_weight(s, gamma=0.5, k=1.0), (1 + s) ** -0.5)


# ------------------------------------------------------------------------------- noise helpers
def test_offset_noise_is_a_per_channel_constant_shift():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8)
    out = D.offset_noise(noise, 0.1, generator=g1)
    shift = out - noise
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    torch.testing.assert_close(shift[:, :, 0, 0], 0.1 * torch.randn(2, 4, generator=g2))


def test_pyramid_noise_unit_std_and_spatially_correlated():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 32, 32, generator=g)
    out = D.pyramid_noise(noise, iterations=6, discount=0.8, generator=g)
    assert out.shape == noise.shape and out.std().item() == pytest.approx(1.0, abs=1e-5)
    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert neighbour_corr(out) > neighbour_corr(noise) + 0.2
    # same generator state -> same noise (reproducible)
    again = D.pyramid_noise(noise, iterations=6, discount=0.8, generator=torch.Generator().manual_seed(0).manual_seed(0))
    assert again.shape == out.shape


def test_perturbed_noise_adds_scaled_gaussian():
    noise = torch.zeros(10000)
    out = D.perturbed_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(0.1, rel=0.05)


# ------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["l2", "huber", "smooth_l1", "l1"])
def test_diffusion_loss_naive(kind):
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    c = torch.tensor([0.1, 0.3, 1.0], dtype=torch.float64)
    loss = D.diffusion_loss(p, q, weights=w, kind=kind, huber_c=c)
    total = 0.0
    for b in range(3):
        vals = []
        for d in (p[b] - q[b]).flatten().tolist():
            cb = float(c[b])
            vals.append({
                "l2": d * d,
                "l1": abs(d),
                "huber": 2 * cb * (math.sqrt(d * d + cb * cb) - cb),
                "smooth_l1": 2 * (math.sqrt(d * d + cb * cb) - cb),
            }[kind])
        total += float(w[b]) * sum(vals) / len(vals)
    assert loss.item() == pytest.approx(total / 3, rel=1e-12)


def test_pseudo_huber_limits():
    d = torch.tensor([1e-4, 100.0], dtype=torch.float64)
    c = 0.1
    per = 2 * c * (torch.sqrt(d * d + c * c) - c)
    assert per[0] == pytest.approx(float(d[0] ** 2), rel=1e-3)  # quadratic near 0
    assert per[1] == pytest.approx(2 * c * float(d[1]), rel=1e-2)  # linear far away
    assert D.diffusion_loss(d[None, 1:], torch.zeros(1, 1, dtype=torch.float64), kind="huber", huber_c=c) == pytest.approx(float(per[1]))


def test_huber_schedules():
    ac = _ac()
    t = torch.tensor([0, 500, 999])
    assert torch.equal(D.huber_c_for(t, huber_c=0.1), torch.full((3,), 0.1))
    exp = D.huber_c_for(t, huber_c=0.1, schedule="exponential", alphas_cumprod=ac)
    torch.testing.assert_close(exp.double(), torch.exp(math.log(0.1) / 1000 * t.double()), check_dtype=False)
    snr_c = D.huber_c_for(t, huber_c=0.1, schedule="snr", alphas_cumprod=ac)
    sig = ((1 - ac[t]) / ac[t]).sqrt()
    torch.testing.assert_close(snr_c.double(), 0.9 / (1 + sig) ** 2 + 0.1, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        D.huber_c_for(t, huber_c=0.1, schedule="snr")


def test_loss_rejects_shape_mismatch_and_unknown_kind():
    with pytest.raises(ValueError, match="shape"):
        D.diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown loss"):
        D.diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="l3")


def test_sample_timesteps_range_and_errors():
    t = D.sample_timesteps(4000, 1000, generator=torch.Generator().manual_seed(0), low=200, high=300)
    assert t.min() >= 200 and t.max() <= 299 and t.dtype == torch.int64 and len(t.unique()) == 100
    with pytest.raises(ValueError, match="range"):
        D.sample_timesteps(1, 1000, low=500, high=400)


# ------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(spacing):
    ref = diffusers.DDIMScheduler(**SD_CONFIG, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    for n in (1, 7, 48, 50):
        ref.set_timesteps(n)
        ours = D.ddim_timesteps(n, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        assert ours.tolist() == ref.timesteps.tolist(), (spacing, n)


def test_numpy_grids_equal_numpy_bit_for_bit_at_every_step_count():
    """Half-way timesteps round by the last bit: trailing spacing takes numpy's arange (torch's differs at
    50 of the step counts 1-1000: n = 48 gave 937 where diffusers has 936), linspace numpy's linspace."""
    for n in range(1, 1001):
        assert np.array_equal(D.numpy_arange(1000, 0, -1000 / n).numpy(), np.arange(1000, 0, -1000 / n)), n
        assert np.array_equal(D.numpy_linspace(999, n).numpy(), np.linspace(0, 999, n)), n
    for start, stop, step in ((0, 1, 0.1), (3.5, -2, -0.7), (1, 1, 1), (5, 0, 1)):
        assert np.array_equal(D.numpy_arange(start, stop, step).numpy(), np.arange(start, stop, step))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sampling_matches_diffusers(pred, eta):
    ref = diffusers.DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=pred)
    ref.set_timesteps(12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.tensor([0.2, -0.1]), torch.zeros(2)
    noises = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(12)]
    xr = x.clone()
    for i, t in enumerate(ref.timesteps):
        tt = t.expand(2)
        u, c = _fake_model(xr, tt, uncond), _fake_model(xr, tt, cond)
        xr = ref.step(u + 7.5 * (c - u), t, xr, eta=eta, variance_noise=noises[i]).prev_sample
    ours = _run_ddim_with_noises(x, cond, uncond, pred, eta, noises)
    torch.testing.assert_close(ours, xr, atol=2e-5, rtol=1e-4)


def _run_ddim_with_noises(x, cond, uncond, pred, eta, noises, clip=None):
    ac = diffusers.DDIMScheduler(**SD_CONFIG).alphas_cumprod
    steps = D.ddim_timesteps(12)
    fn = D.guided(_fake_model, cond, uncond, 7.5)
    for i, t in enumerate(steps.tolist()):
        out = fn(x, torch.full((2,), t), cond)
        x = D.ddim_step(out, t, t - 1000 // 12, x, ac, prediction_type=pred, eta=eta, noise=noises[i], clip_sample=clip)
    return x


def test_ddim_clip_sample_matches_diffusers():
    ref = diffusers.DDIMScheduler(**SD_CONFIG, clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    cond, uncond = torch.tensor([0.2, -0.1]), torch.zeros(2)
    xr = x.clone()
    for t in ref.timesteps:
        u, c = _fake_model(xr, t.expand(2), uncond), _fake_model(xr, t.expand(2), cond)
        xr = ref.step(u + 7.5 * (c - u), t, xr).prev_sample
    ours = _run_ddim_with_noises(x, cond, uncond, "epsilon", 0.0, [None] * 12, clip=0.5)
    torch.testing.assert_close(ours, xr, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours, _run_ddim_with_noises(x, cond, uncond, "epsilon", 0.0, [None] * 12))


def test_ddim_sample_equals_manual_loop_and_batches_cfg():
    ac = _ac().float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([0.2, -0.1]), torch.zeros(2)
    calls = []

    def counting(x_, t_, c_):
        calls.append(x_.shape[0])
        return _fake_model(x_, t_, c_)

    out = D.ddim_sample(counting, x, cond, alphas_cumprod=ac, num_steps=12, uncond=uncond, guidance_scale=7.5)
    assert calls == [4] * 12  # one batched forward of cond+uncond per step
    torch.testing.assert_close(out, _run_ddim_with_noises(x, cond, uncond, "epsilon", 0.0, [None] * 12), atol=1e-5, rtol=1e-5)


def test_ddim_inversion_matches_diffusers_inverse_scheduler_and_reconstructs():
    ref = diffusers.DDIMInverseScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(25)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cond = torch.tensor([0.05, -0.02], dtype=torch.float64)

    def smooth(x, t, c):  # ε independent of x: DDIM inversion is then exactly invertible
        return (torch.sin(t.double() / 97).reshape(-1, 1, 1, 1) + c.reshape(-1, 1, 1, 1)).expand_as(x).to(x.dtype)

    ac = ref.alphas_cumprod.double()
    latents = D.ddim_invert(smooth, x0, cond, alphas_cumprod=ac, num_steps=25)
    assert len(latents) == 26
    # diffusers' inverse scheduler: same update, same timesteps
    x = x0.clone()
    for t in ref.timesteps:
        x = ref.step(smooth(x, t.expand(2), cond), t, x).prev_sample
    torch.testing.assert_close(latents[-1], x, atol=1e-7, rtol=1e-5)  # diffusers keeps ᾱ in float32
    rec = D.ddim_sample(smooth, latents[-1], cond, alphas_cumprod=ac, num_steps=25)
    torch.testing.assert_close(rec, x0, atol=1e-9, rtol=1e-9)
    assert (latents[-1] - x0).abs().mean() > 0.5  # it really went somewhere


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_matches_diffusers(pred, spacing):
    offset = 1 if spacing == "leading" else 0
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(15)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([0.2, -0.1]), torch.zeros(2)
    xr = x * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(xr, t)
        u, c = _fake_model(inp, t.expand(2), uncond), _fake_model(inp, t.expand(2), cond)
        xr = ref.step(u + 5.0 * (c - u), t, xr).prev_sample
    ours = D.euler_sample(
        _fake_model, x, cond, alphas_cumprod=ref.alphas_cumprod, num_steps=15, uncond=uncond,
        guidance_scale=5.0, prediction_type=pred, spacing=spacing, steps_offset=offset,
    )
    torch.testing.assert_close(ours, xr, atol=5e-4, rtol=1e-4)


def test_samplers_denoise_a_point_mass():
    """With the exact ε-predictor of a data distribution concentrated at x*, both samplers land on x*."""
    ac = _ac()
    target = torch.full((1, 2, 3, 3), 0.7, dtype=torch.float64)

    def exact_eps(x, t, c):
        a = torch.as_tensor(np.interp(t.double().numpy(), np.arange(1000), ac.numpy()), dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    noise = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(D.ddim_sample(exact_eps, noise, None, alphas_cumprod=ac, num_steps=20, final_alpha_cumprod=1.0), target, atol=1e-6, rtol=0)
    torch.testing.assert_close(D.euler_sample(exact_eps, noise, None, alphas_cumprod=ac, num_steps=20), target, atol=1e-6, rtol=0)
