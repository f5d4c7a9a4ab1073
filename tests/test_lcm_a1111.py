"""``lcm`` with a ``schedule`` is A1111's "LCM" sampler (AUTOMATIC1111/stable-diffusion-webui
``modules/sd_samplers_lcm.py``), bit for bit on float32 latents.

The reference below transcribes A1111's ``LCMCompVisDenoiser`` (modules/sd_samplers_lcm.py:10-63) with the parts
of k-diffusion it inherits (``DiscreteSchedule``/``DiscreteEpsDDPMDenoiser``, k_diffusion/external.py:41-113 at
4601bf0), ``sample_lcm`` (modules/sd_samplers_lcm.py:66-80), k-diffusion's ``get_sigmas_karras`` /
``get_sigmas_exponential`` / ``get_sigmas_polyexponential`` (k_diffusion/sampling.py:17-37), A1111's schedule
functions given this denoiser (modules/sd_schedulers.py: ``sgm_uniform``, ``normal_scheduler``, ``simple_scheduler``,
``ddim_scheduler``, ``kl_optimal``) and A1111's ``KDiffusionSampler`` start (``x = x·sigmas[0]``; img2img
``xi = x + noise·sigmas[steps − t_enc − 1]``). (Checked against the real k-diffusion classes subclassed as A1111's
file does, and A1111's schedule functions: 0 difference, 72 runs of 1–60 steps on 10 schedules.)
"""

from __future__ import annotations

import math

import pytest
import torch
from sampler_stand_ins import rel_err, sd_alphas_cumprod, stand_in

from sdadapt.img2img import (
    Img2ImgStart,
    a1111_img2img_steps,
    a1111_start_index,
    img2img_rule,
)
from sdadapt.samplers import resolve_schedule, sample_latents
from sdadapt.samplers.lcm import lcm_sample


# ------------------------------------------------------------------------------------- the transcription
class A1111LCM:
    """``LCMCompVisDenoiser`` on ``ac`` (1000,) in ``dtype``: float32 as A1111 runs it (its ᾱ buffer float32);
    float64, sdadapt's precise mode (ᾱ as given)."""

    def __init__(self, ac: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.skip = 1000 // 50
        valid = torch.zeros(50, dtype=dtype)
        for x in range(50):  # alphas_cumprod_valid[original_timesteps - 1 - x] = alphas_cumprod[999 - x·skip]
            valid[49 - x] = ac.to(dtype)[999 - x * self.skip]
        self.sigmas = ((1 - valid) / valid) ** 0.5  # DiscreteEpsDDPMDenoiser.__init__
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip + (self.skip - 1)

    def t_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp((timestep - (self.skip - 1)) / self.skip, min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()  # DiscreteSchedule.t_to_sigma
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        start, end = self.sigma_to_t(self.sigmas[-1]), self.sigma_to_t(self.sigmas[0])
        t = torch.linspace(float(start), float(end), n, dtype=self.sigmas.dtype)
        return torch.cat([self.t_to_sigma(t), self.sigmas.new_zeros(1)])

    def schedule(self, name: str, n: int) -> torch.Tensor:
        lo, hi = self.sigmas[0].item(), self.sigmas[-1].item()  # model_wrap.sigmas[0].item(), [-1].item()
        dt, zero = self.sigmas.dtype, self.sigmas.new_zeros(1)
        if name == "automatic":
            return self.get_sigmas(n)
        if name == "karras":
            ramp = torch.linspace(0, 1, n, dtype=dt)
            return torch.cat([(hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, zero])
        if name == "exponential":
            return torch.cat([torch.linspace(math.log(hi), math.log(lo), n, dtype=dt).exp(), zero])
        if name == "polyexponential":
            ramp = torch.linspace(1, 0, n, dtype=dt) ** 1.0  # rho = 1
            return torch.cat([(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp(), zero])
        # A1111's modules/sd_schedulers.py with this denoiser as inner_model
        if name in ("normal", "sgm_uniform"):  # normal_scheduler, sgm_uniform
            start, end = self.sigma_to_t(torch.tensor(hi, dtype=dt)), self.sigma_to_t(torch.tensor(lo, dtype=dt))
            ts = (torch.linspace(float(start), float(end), n + 1, dtype=dt)[:-1] if name == "sgm_uniform"
                  else torch.linspace(float(start), float(end), n, dtype=dt))
            return torch.tensor([float(self.t_to_sigma(t)) for t in ts] + [0.0], dtype=dt)
        if name == "simple":  # simple_scheduler
            ss = len(self.sigmas) / n
            return torch.tensor([float(self.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0], dtype=dt)
        if name == "ddim":  # ddim_scheduler
            ss, x, sigs = max(len(self.sigmas) // n, 1), 1, []
            while x < len(self.sigmas):
                sigs.append(float(self.sigmas[x]))
                x += ss
            return torch.tensor(sigs[::-1] + [0.0], dtype=dt)
        assert name == "kl_optimal"
        a_min, a_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
        i = torch.arange(n + 1)
        return torch.tan(i / n * a_min + (1.0 - i / n) * a_max)

    def __call__(self, model, x: torch.Tensor, sigma: torch.Tensor, seen: list) -> torch.Tensor:
        c_out, c_in = -sigma[:, None, None, None], 1 / (sigma[:, None, None, None] ** 2 + 1.0) ** 0.5
        t = self.sigma_to_t(sigma)
        seen.append(t)
        eps = model(x * c_in, t)
        output = x + eps * c_out
        scaled = self.sigma_to_t(sigma)[:, None, None, None] * (10.0 if x.dtype == torch.float32 else
                                                               torch.tensor(10.0, dtype=x.dtype))
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        return c_out * output + c_skip * x


def a1111_lcm(x_T: torch.Tensor, n: int, schedule: str, seed: int, *, init: torch.Tensor | None = None,
              strength: float | None = None, seen: list | None = None) -> torch.Tensor:
    """A1111's LCM sampler (txt2img, or img2img from ``init`` at ``strength``) with :func:`stand_in`, its
    ``randn_like`` the draws of ``torch.Generator().manual_seed(seed)``."""
    wrap = A1111LCM(sd_alphas_cumprod(), x_T.dtype)
    sigmas = wrap.schedule(schedule, n)
    if init is None:
        x = x_T * sigmas[0]
    else:  # KDiffusionSampler.sample_img2img
        steps, t_enc = a1111_img2img_steps(n, strength)
        sigmas = sigmas[steps - t_enc - 1:]
        x = init + x_T * sigmas[0]
    g = torch.Generator().manual_seed(seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):  # sample_lcm
        x = wrap(stand_in, x, sigmas[i] * s_in, [] if seen is None else seen)
        if sigmas[i + 1] > 0:
            x += sigmas[i + 1] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x


def run(x_T: torch.Tensor, n: int, schedule: str, seed: int, *, seen: list | None = None, **kwargs) -> torch.Tensor:
    def model(x, t, cond):
        if seen is not None:
            seen.append(t)
        return stand_in(x, t)

    return sample_latents(model, x_T, None, sampler="lcm", alphas_cumprod=sd_alphas_cumprod(), num_steps=n,
                          schedule=schedule, generator=torch.Generator().manual_seed(seed), **kwargs)


def _noise(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential", "polyexponential"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_on_a_schedule_is_a1111s_lcm_bit_for_bit(schedule, n):
    x_T = _noise(n)
    seen_ref, seen = [], []
    ref = a1111_lcm(x_T, n, schedule, 3, seen=seen_ref)
    got = run(x_T, n, schedule, 3, seen=seen)
    assert torch.equal(got, ref)
    assert len(seen) == len(seen_ref) == n
    for t, t_ref in zip(seen, seen_ref):  # the model sees A1111's quantized int64 timesteps
        assert t.dtype == torch.int64 and torch.equal(t, t_ref)


def test_the_model_sees_lcms_quantized_timesteps():
    seen = []
    run(_noise(0), 4, "automatic", 0, seen=seen)
    assert [int(t[0]) for t in seen] == [999, 679, 339, 19]  # linspace(999, 19, 4) snapped to 20·j + 19
    seen = []
    run(_noise(0), 8, "karras", 0, seen=seen)
    assert [int(t[0]) for t in seen] == [999, 919, 799, 659, 479, 259, 99, 19]
    seen = []
    run(_noise(0), 60, "automatic", 0, seen=seen)  # more steps than the table: timesteps repeat, as in A1111
    ts = [int(t[0]) for t in seen]
    assert len(ts) == 60 and all((t - 19) % 20 == 0 for t in ts) and ts[0] == 999 and ts[-1] == 19
    assert len(set(ts)) < 60


def test_automatic_and_uniform_are_lcms_own_grid_and_float64_runs_the_same_in_float64():
    x_T = _noise(5)
    assert resolve_schedule("lcm", "Automatic") == "uniform"  # A1111's uniform calls the denoiser's get_sigmas
    assert torch.equal(run(x_T, 4, "uniform", 1), run(x_T, 4, "automatic", 1))
    x64 = x_T.double()
    got = run(x64, 4, "automatic", 1)
    assert got.dtype == torch.float64
    assert torch.equal(got, a1111_lcm(x64, 4, "automatic", 1))
    one64, one32 = run(x64, 1, "automatic", 1), run(x_T, 1, "automatic", 1)  # (one step: no noise drawn)
    assert 0 < float((one64 - one32.double()).abs().max() / one64.abs().max()) < 1e-6


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_takes_a1111s_rule(strength):
    x_T, init = _noise(1), _noise(2) * 0.5
    assert img2img_rule("lcm", "uniform") == "a1111" and img2img_rule("lcm") == "diffusers"
    ref = a1111_lcm(x_T, 8, "automatic", 4, init=init, strength=strength)
    got = run(x_T, 8, "automatic", 4, start=Img2ImgStart(init=init, strength=strength))
    assert torch.equal(got, ref)
    seen = []
    run(x_T, 8, "automatic", 4, start=Img2ImgStart(init=init, strength=strength), seen=seen)
    assert len(seen) == 8 - a1111_start_index(*a1111_img2img_steps(8, strength))


def test_without_a_schedule_lcm_stays_diffusers_lcmscheduler():
    x_T = _noise(3)
    seen = []
    run(x_T, 4, None, 0, seen=seen)
    assert [int(t[0]) for t in seen] == [999, 759, 499, 259]  # LCMScheduler's own timesteps


@pytest.mark.parametrize("schedule", ["sgm_uniform", "normal", "simple", "ddim", "kl_optimal"])
@pytest.mark.parametrize("n", [3, 7, 25])
def test_a1111s_other_schedules_read_the_lcm_denoiser(schedule, n):
    """A1111's schedule functions get the LCM denoiser as ``inner_model``: its 50 σ (simple, ddim), its quantized
    ``sigma_to_t`` and rescaled ``t_to_sigma`` (normal, sgm_uniform), its σ range (kl_optimal: last σ > 0, so the
    last step adds noise, as in A1111)."""
    x_T = _noise(n)
    seen_ref, seen = [], []
    ref = a1111_lcm(x_T, n, schedule, 2, seen=seen_ref)
    assert torch.equal(run(x_T, n, schedule, 2, seen=seen), ref)
    assert len(seen) == len(seen_ref) and all(torch.equal(a, b) for a, b in zip(seen, seen_ref))


def test_discard_next_to_last_sigma_is_a1111s_setting():
    x_T = _noise(4)
    wrap = A1111LCM(sd_alphas_cumprod())
    longer = wrap.get_sigmas(5)
    sigmas = torch.cat([longer[:-2], longer[-1:]])  # KDiffusionSampler.get_sigmas
    seen = []
    run(x_T, 4, "automatic", 0, discard_next_to_last_sigma=True, seen=seen)
    assert [int(t[0]) for t in seen] == [int(wrap.sigma_to_t(s)) for s in sigmas[:-1]]
    # (the third σ, t = 24.5 in the table, sits 3e-8 from the tie between entries 24 and 25 in log σ: torch 2.13's
    # float32 log/exp pick 499, torch 2.14's 519 — A1111 on that torch picks the same, as the line above checks)
    assert [int(t[0]) for t in seen] in ([999, 759, 499, 259], [999, 759, 519, 259])


def test_a1111s_sigma_settings_shape_the_schedules_that_take_them():
    """A1111's "sigma max" setting (``ScheduleOptions``): ``automatic`` / ``uniform`` call the denoiser's
    ``get_sigmas(n)``, which ignores it; ``normal`` and ``karras`` start at the nearest LCM timestep of σ = 5."""
    from sdadapt.samplers import ScheduleOptions

    x_T, options = _noise(6), ScheduleOptions(sigma_max=5.0)
    assert torch.equal(run(x_T, 4, "automatic", 0, schedule_options=options), run(x_T, 4, "automatic", 0))
    for name in ("normal", "karras"):
        seen = []
        run(x_T, 4, name, 0, schedule_options=options, seen=seen)
        assert int(seen[0][0]) == 799, name  # σ_39 = 5.09 of the table, t = 20·39 + 19


def test_refusals_name_the_fix():
    x_T = _noise(0)
    with pytest.raises(ValueError, match="ε prediction only.*without a schedule"):
        run(x_T, 4, "automatic", 0, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="ε prediction only"):
        run(x_T, 4, "karras", 0, prediction_type="sample")
    with pytest.raises(ValueError, match="unknown schedule 'turbo'"):
        run(x_T, 4, "turbo", 0)
    with pytest.raises(ValueError, match="give a schedule too"):  # called directly, A1111's options without a grid
        lcm_sample(lambda x, t: stand_in(x, t), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=4,
                   discard_next_to_last_sigma=True)


@pytest.mark.parametrize("schedule", ["automatic", "karras"])
def test_masked_inpainting_blends_the_consistency_output_as_a1111(schedule):
    """A1111's LCM with a mask: ``CFGDenoiser`` blends ``init·mask + nmask·denoised`` over the ``LCMCompVisDenoiser``
    output at every call, ``samples·nmask + init·mask`` at the end (was refused: σ could not be read back)."""
    x_T, init, n, strength = _noise(3), _noise(4), 6, 0.6
    latmask = torch.zeros(1, 1, 8, 8)
    latmask[..., 2:6, 1:5] = 1.0
    wrap = A1111LCM(sd_alphas_cumprod(), torch.float32)
    steps, t_enc = a1111_img2img_steps(n, strength)
    sigmas = wrap.schedule(schedule, n)[steps - t_enc - 1:]
    x, g = init + x_T * sigmas[0], torch.Generator().manual_seed(2)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = init * (1.0 - latmask) + latmask * wrap(stand_in, x, sigmas[i] * s_in, [])
        if sigmas[i + 1] > 0:
            x += sigmas[i + 1] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    want = x * latmask + init * (1.0 - latmask)
    got = run(x_T, n, schedule, 2, start=Img2ImgStart(init=init, strength=strength, mask=latmask))
    assert torch.equal(got, want), rel_err(got, want)


def test_generate_runs_a1111s_lcm_with_a_schedule(tmp_path):
    """``generate --sampler LCM --schedule automatic`` (the toy model through ``run_generate``) reaches A1111's LCM:
    ``automatic`` and ``uniform`` give one image, no schedule (diffusers' LCMScheduler) and Karras others."""
    import numpy as np
    from PIL import Image

    from sdadapt.jobs import run_generate

    def image(name, **kw):
        run_generate(prompt="a red circle", out=tmp_path / name, steps=4, seed=1, sampler="LCM", **kw)
        return np.asarray(Image.open(tmp_path / name)).astype(np.int16)

    auto, uniform = image("auto.png", schedule="automatic"), image("uniform.png", schedule="Uniform")
    plain, karras = image("plain.png"), image("karras.png", schedule="karras")
    assert np.array_equal(auto, uniform)
    assert not np.array_equal(auto, plain) and not np.array_equal(auto, karras)
    with pytest.raises(ValueError, match="--schedule: unknown schedule|unknown schedule 'turbo'"):
        run_generate(prompt="x", out=tmp_path / "t.png", sampler="LCM", schedule="turbo")
