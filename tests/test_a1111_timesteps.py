"""A1111's timestep samplers (v1.6+ ``sd_samplers_timesteps_impl``: ``ddim``, ``plms``, ``ddim_cfgpp``;
``sd_samplers_timesteps.py``'s ``get_timesteps`` and ``sample_img2img``), transcribed below over A1111's
``CFGDenoiserTimesteps`` (ε outputs combined; ``CompVisTimestepsVDenoiser`` reads v as ε per branch on LDM's float32
``sqrt_alphas_cumprod`` buffers; CFG++'s ``cond_scale_miltiplier`` and ``last_noise_uncond``), against
``sdadapt.samplers.a1111_timesteps`` bit for bit; the guided model is :func:`sdadapt.training.diffusion.guided`'s (its
x̂0-by-branch reading gives the per-branch ε). ``ddim`` with a schedule (``sample_latents``, ``generate --sampler
DDIM --schedule automatic``) runs A1111's DDIM, without one diffusers' ``DDIMScheduler``; ``plms`` and ``ddim_cfgpp``
are A1111's always."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_stand_ins import rel_err, sd_alphas_cumprod, stand_in

from sdadapt.img2img import Img2ImgStart, a1111_img2img_steps
from sdadapt.inpaint import blend_denoised, masked_model
from sdadapt.samplers import sample_latents
from sdadapt.samplers.a1111_timesteps import (
    a1111_ddim_cfgpp_sample,
    a1111_ddim_sample,
    a1111_plms_sample,
    a1111_timesteps,
)
from sdadapt.training.diffusion import guided

AC32 = sd_alphas_cumprod().float()  # (A1111's buffer)
# LDM's register_schedule: to_torch(np.sqrt(alphas_cumprod)) and to_torch(np.sqrt(1. - alphas_cumprod)), float64 roots
SQRT_AC = torch.tensor(np.sqrt(sd_alphas_cumprod().numpy()), dtype=torch.float32)
SQRT_ONE_MINUS_AC = torch.tensor(np.sqrt(1.0 - sd_alphas_cumprod().numpy()), dtype=torch.float32)


def _get_timesteps(steps: int) -> torch.Tensor:
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def _unet(x, t, c):
    return stand_in(x * (1 + c), t) + 0.3 * c


class _CFG:
    """A1111's CFGDenoiserTimesteps over the stand-in: cond 0.5, uncond -0.25; v read as ε per branch
    (``predict_eps_from_z_and_v`` on the buffers); with a mask (mask_before_denoising) the input blended with the init
    latent first; ``cond_scale_miltiplier`` and ``need_last_noise_uncond`` as ``ddim_cfgpp`` sets them."""

    def __init__(self, prediction_type, scale, init=None, latmask=None, *, conds=((0.5, 1.0),), skip_early=0.0,
                 total_steps=1):
        self.prediction_type, self.scale, self.init, self.latmask = prediction_type, scale, init, latmask
        self.conds, self.skip_early, self.total_steps, self.step = conds, skip_early, total_steps, 0
        self.cond_scale_miltiplier, self.need_last_noise_uncond, self.last_noise_uncond = 1.0, False, None

    def _eps(self, x, timesteps, c):
        out = _unet(x, timesteps, torch.full((x.shape[0], 1, 1, 1), c))  # (the conditioning a float32 tensor)
        if self.prediction_type == "v_prediction":
            i = timesteps.to(torch.int)
            out = SQRT_AC[i, None, None, None] * out + SQRT_ONE_MINUS_AC[i, None, None, None] * x
        return out

    def __call__(self, x, timesteps):
        if self.latmask is not None:
            x = x * self.latmask + self.init * (1 - self.latmask)
        skip_uncond = self.skip_early != 0.0 and self.step / self.total_steps <= self.skip_early
        outs = [self._eps(x, timesteps, c) for c, _ in self.conds]
        outs.append(outs[0] if skip_uncond else self._eps(x, timesteps, -0.25))  # (skipped: the fake uncond)
        x_out = torch.stack(outs)  # (conds_list's entries, then the uncond)
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-1])
        cond_scale = 1.0 if skip_uncond else self.scale * self.cond_scale_miltiplier
        denoised = torch.clone(x_out[-1])
        for cond_index, (_, weight) in enumerate(self.conds):
            denoised += (x_out[cond_index] - x_out[-1]) * (weight * cond_scale)
        self.step += 1
        return denoised


def _cfg(prediction_type, scale, init=None, latmask=None, **options):
    return _CFG(prediction_type, scale, init, latmask, **options)


def _a1111_ddim(model, x, timesteps, eta, g, cfgpp=False):
    """``sd_samplers_timesteps_impl.ddim`` / ``ddim_cfgpp`` as A1111 v1.10 writes them (randn_like: ``g``'s
    draws)."""
    alphas_cumprod = AC32
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu()) * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
    if cfgpp:
        model.cond_scale_miltiplier = 1 / 12.5
        model.need_last_noise_uncond = True
    s_in = x.new_ones(x.shape[0])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * (model.last_noise_uncond if cfgpp else e_t)
        noise = sigma_t * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


def _a1111_plms(model, x, timesteps):
    """``sd_samplers_timesteps_impl.plms`` as A1111 v1.10 writes it."""
    alphas_cumprod = AC32
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def get_x_prev_and_pred_x0(e_t, index):
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        return x_prev, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts)
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = model(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, _ = get_x_prev_and_pred_x0(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


def _cond(v):
    return torch.full((2, 1, 1, 1), v)


def _x_T(seed):
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def _guided(scale):
    return guided(_unet, _cond(0.5), _cond(-0.25), scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_a1111_ddim_is_a1111s(prediction_type, eta, steps):
    x_T = _x_T(steps)
    want = _a1111_ddim(_cfg(prediction_type, 7.5), x_T, _get_timesteps(steps), eta, torch.Generator().manual_seed(4))
    got = a1111_ddim_sample(_guided(7.5), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                            prediction_type=prediction_type, eta=eta, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want), rel_err(got, want)
    assert torch.equal(a1111_timesteps(steps), _get_timesteps(steps))


def _transcribed(sampler, model, x, timesteps, eta=0.0):
    """A1111's ``sampler`` ("ddim", "plms", "ddim_cfgpp") transcribed, run from ``x`` over ``timesteps``."""
    if sampler == "plms":
        return _a1111_plms(model, x, timesteps)
    return _a1111_ddim(model, x, timesteps, eta, torch.Generator().manual_seed(4), cfgpp=sampler == "ddim_cfgpp")


_OURS = {"ddim": a1111_ddim_sample, "plms": a1111_plms_sample, "ddim_cfgpp": a1111_ddim_cfgpp_sample}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 13])
@pytest.mark.parametrize("discard", [False, True])
def test_a1111_plms_is_a1111s(prediction_type, steps, discard):
    """PLMS: the first step's two calls (the second at x_prev and the next timestep, a v output read there), then
    Adams-Bashforth of order 2, 3, 4; "Always discard next-to-last sigma" one more timestep."""
    x_T = _x_T(steps + 50)
    want = _a1111_plms(_cfg(prediction_type, 7.5), x_T, _get_timesteps(steps + discard))
    got = a1111_plms_sample(_guided(7.5), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                            prediction_type=prediction_type, discard_next_to_last_sigma=discard)
    assert torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("scale", [1.0, 5.0, 12.5])
def test_a1111_ddim_cfgpp_is_a1111s(prediction_type, eta, scale):
    """DDIM CFG++: guidance at scale/12.5 (the negative run at CFG 1 too) and each step along the negative's ε."""
    steps, x_T = 9, _x_T(61)
    want = _a1111_ddim(_cfg(prediction_type, scale), x_T, _get_timesteps(steps), eta,
                       torch.Generator().manual_seed(4), cfgpp=True)
    got = a1111_ddim_cfgpp_sample(_guided(scale), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                                  prediction_type=prediction_type, eta=eta, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want), rel_err(got, want)
    plain = a1111_ddim_sample(_guided(scale), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                              prediction_type=prediction_type, eta=eta, generator=torch.Generator().manual_seed(4))
    assert rel_err(got, plain) > 1e-3  # (CFG++ is another sampler)


def test_ddim_cfgpp_without_guidance_is_ddim():
    """A model with no negative (no guidance of sdadapt's): CFG++ steps along its own output, DDIM's step."""
    x_T = _x_T(62)

    def model(x, t):
        return _unet(x, t, 0.5)

    got = a1111_ddim_cfgpp_sample(model, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=8)
    want = a1111_ddim_sample(model, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddim_cfgpp"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_are_a1111s(sampler, prediction_type, strength, masked):
    """``sample_img2img``: t_enc by A1111's rule, ``init·√ᾱ + noise·√(1−ᾱ)`` at ``timesteps[t_enc]``, the run over
    ``timesteps[:t_enc]``; with a mask (``sample_latents``' blend, :func:`sdadapt.inpaint.masked_model`'s timestep
    form), the input blend before each call (a v output read as ε at the blended input) and the final
    ``samples·nmask + init·mask``."""
    steps, x_T = 10, _x_T(21)
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(22))
    latmask = None
    if masked:  # (soft edges, as a blurred mask's latent mask: the blended input differs inside the mask too)
        latmask = torch.zeros(1, 1, 6, 6)
        latmask[..., 1:4, 2:5] = 1.0
        latmask[..., 0, 2:5] = 0.5
        latmask[..., 1:4, 1] = 0.25
    total, t_enc = a1111_img2img_steps(steps, strength)
    timesteps = _get_timesteps(total)
    a = AC32[timesteps[t_enc]]
    xi = init * torch.sqrt(a) + x_T * torch.sqrt(1 - a)
    want = _transcribed(sampler, _cfg(prediction_type, 5.0, init, latmask), xi, timesteps[:t_enc])
    if masked:
        want = want * latmask + init * (1 - latmask)
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=5.0, sampler=sampler,
                         alphas_cumprod=sd_alphas_cumprod(), num_steps=steps, prediction_type=prediction_type,
                         schedule="automatic" if sampler == "ddim" else None,
                         start=Img2ImgStart(init, strength=strength, mask=latmask),
                         generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("sampler", ["plms", "ddim_cfgpp"])
@pytest.mark.parametrize(("steps", "strength"), [(21, 0.5), (30, 0.75), (10, 0.95), (20, 0.5)])
def test_img2img_with_the_discarded_timestep_counts_t_enc_on_the_steps_asked_for(sampler, steps, strength):
    """sd_samplers_timesteps.sample_img2img: ``setup_img2img_steps(p, steps)`` gives t_enc on the steps asked for,
    then ``get_timesteps`` adds the discarded next-to-last one to the grid; sdadapt took t_enc on the grid's count
    (one timestep later whenever int(s·n) and int(s·(n + 1)) differ)."""
    x_T = _x_T(23)
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(24))
    total, t_enc = a1111_img2img_steps(steps, strength)
    timesteps = _get_timesteps(total + 1)
    a = AC32[timesteps[t_enc]]
    xi = init * torch.sqrt(a) + x_T * torch.sqrt(1 - a)
    want = _transcribed(sampler, _cfg("epsilon", 5.0, init, None), xi, timesteps[:t_enc])
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=5.0, sampler=sampler,
                         alphas_cumprod=sd_alphas_cumprod(), num_steps=steps, prediction_type="epsilon",
                         start=Img2ImgStart(init, strength=strength), discard_next_to_last_sigma=True,
                         generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("sampler", ["plms", "ddim_cfgpp"])
def test_skip_early_cfg_and_and_prompts_are_a1111s(sampler):
    """A prompt plan's ``AND`` (weights) and A1111's Skip Early CFG on the timestep samplers: a skipped call's
    first sub-prompt in the negative's place, at scale 1 (CFG++: no multiplier, and the step along that stand-in)."""
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.uncond_skip import UncondSkip

    steps, x_T = 8, _x_T(71)
    plan = plan_prompt("a AND b:0.7", steps=steps)
    conds = {"a": _cond(0.5), " b": _cond(0.2)}
    model = plan.guidance(_unet, [conds[text] for text in plan.texts], [_cond(-0.25)], 6.0,
                          uncond_skip=UncondSkip(skip_early=0.4), total_steps=steps)
    got = sample_latents(model, x_T, None, sampler=sampler, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                         generator=torch.Generator().manual_seed(4))
    reference = _cfg("epsilon", 6.0, conds=((0.5, 1.0), (0.2, 0.7)), skip_early=0.4, total_steps=steps)
    want = _transcribed(sampler, reference, x_T, _get_timesteps(steps))
    assert torch.equal(got, want), rel_err(got, want)
    calls = len(_get_timesteps(steps)) - 1  # (8 steps: 8 timesteps, 7 steps — as A1111's get_timesteps)
    assert reference.step == (calls + 1 if sampler == "plms" else calls)  # (PLMS's first step: two calls)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddim_cfgpp"])
@pytest.mark.parametrize("strength", [0.35, 0.8])
def test_skip_early_cfg_on_img2img_counts_a1111s_steps(sampler, strength):
    """Skip Early CFG on an img2img pass of a timestep sampler: A1111 launches it with ``t_enc + 1`` steps
    (``CFGDenoiser.total_steps``), so its skipped calls are those with ``step / (t_enc + 1) <= skip`` — A1111's DDIM
    asked for by its schedule ("automatic", resolved to none) counts them by A1111's rule too."""
    from sdadapt.uncond_skip import UncondSkip

    steps, x_T, skip = 10, _x_T(81), 0.3
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(82))
    total, t_enc = a1111_img2img_steps(steps, strength)
    timesteps = _get_timesteps(total)
    a = AC32[timesteps[t_enc]]
    xi = init * torch.sqrt(a) + x_T * torch.sqrt(1 - a)
    reference = _cfg("epsilon", 6.0, skip_early=skip, total_steps=t_enc + 1)
    want = _transcribed(sampler, reference, xi, timesteps[:t_enc])
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=6.0, sampler=sampler,
                         alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                         schedule="automatic" if sampler == "ddim" else None,
                         start=Img2ImgStart(init, strength=strength), uncond_skip=UncondSkip(skip_early=skip),
                         generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want), rel_err(got, want)


def test_sampler_names_and_labels():
    from sdadapt.sampler_tables import (
        A1111_MISSING,
        a1111_label,
        run_schedule,
        takes_eta_ddim,
    )
    from sdadapt.samplers.labels import sampler_schedule_from_label

    assert sampler_schedule_from_label("PLMS") == ("plms", None)
    assert sampler_schedule_from_label("DDIM CFG++") == ("ddim_cfgpp", None)
    assert (a1111_label("plms"), a1111_label("ddim_cfgpp")) == ("PLMS", "DDIM CFG++")
    assert "plms" not in A1111_MISSING and "ddim cfg++" not in A1111_MISSING
    assert [run_schedule(name, "automatic") for name in ("ddim", "plms", "ddim_cfgpp")] == ["automatic"] * 3
    assert [run_schedule(name, None) for name in ("ddim", "plms", "ddim_cfgpp")] == [None] * 3
    # (A1111 runs them on its timesteps whatever the schedule type: "Sampler: PLMS, Schedule type: Karras")
    assert [run_schedule(name, "Karras") for name in ("ddim", "plms", "ddim_cfgpp")] == ["automatic"] * 3
    with pytest.raises(ValueError, match="unknown schedule"):
        run_schedule("plms", "karas")
    assert [takes_eta_ddim(name, schedule) for name, schedule in
            (("ddim", None), ("ddim", "automatic"), ("ddim_cfgpp", None), ("plms", "automatic"))] == [
        False, True, True, False]


@pytest.mark.parametrize("masked", [False, True])
def test_sample_latents_ddim_with_a_schedule_runs_it(masked):
    from sdadapt.samplers import sample_latents
    from sdadapt.training.diffusion import ddim_sample

    x_T, steps = _x_T(41), 9
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(42))
    latmask = torch.zeros(1, 1, 6, 6)
    latmask[..., 2:5, 1:4] = 1.0
    start = Img2ImgStart(init, strength=0.6, mask=latmask) if masked else None
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=4.0, sampler="ddim",
                         alphas_cumprod=sd_alphas_cumprod(), num_steps=steps, schedule="automatic", start=start,
                         eta=0.5, generator=torch.Generator().manual_seed(4))
    model = _guided(4.0)
    if masked:
        model = guided(masked_model(model, init=init, latmask=latmask, sampler="ddim",
                                    alphas_cumprod=sd_alphas_cumprod(), prediction_type="epsilon"), None, None, 1.0)
    want = a1111_ddim_sample(model, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps, eta=0.5,
                             start=None if start is None else Img2ImgStart(init, strength=0.6),
                             generator=torch.Generator().manual_seed(4))
    if masked:
        want = blend_denoised(want, init, latmask)
    assert torch.equal(got, want), rel_err(got, want)
    if not masked:
        plain = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=4.0, sampler="ddim",
                               alphas_cumprod=sd_alphas_cumprod(), num_steps=steps)
        assert torch.equal(plain, ddim_sample(_guided(4.0), x_T, None, alphas_cumprod=sd_alphas_cumprod(),
                                              num_steps=steps))


def test_generate_ddim_with_a_schedule_is_a1111s_and_reads_back(tmp_path):
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--negative", "blue", "--sampler", "DDIM", "--steps", "6", "--seed", "2"]
    assert main(["generate", *base, "--schedule", "automatic", "-o", str(tmp_path / "a1111.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "diffusers.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "a1111.png"), "-o", str(tmp_path / "again.png")]) == 0
    a, d, again = (Image.open(tmp_path / f"{n}.png") for n in ("a1111", "diffusers", "again"))
    assert ", Sampler: DDIM, Schedule type: Automatic," in a.text["parameters"]
    assert "Schedule type" not in d.text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(d))
    assert np.array_equal(np.asarray(a), np.asarray(again)) and a.text["parameters"] == again.text["parameters"]


def test_bad_requests_are_refused():
    x_T = _x_T(1)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        a1111_ddim_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        a1111_ddim_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=4, eta=-1.0)
    with pytest.raises(ValueError, match="reads ε or v"):
        a1111_ddim_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=4, prediction_type="sample")


def test_generate_eta_ddim(tmp_path, capsys):
    """``--eta-ddim`` (A1111's "Eta DDIM") on A1111's DDIM: written as A1111 writes it (not 0) and read back."""
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--sampler", "DDIM", "--schedule", "automatic", "--steps", "5", "--seed", "3"]
    assert main(["generate", *base, "--eta-ddim", "0.5", "-o", str(tmp_path / "eta.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "zero.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "eta.png"), "-o", str(tmp_path / "again.png")]) == 0
    eta, zero, again = (Image.open(tmp_path / f"{n}.png") for n in ("eta", "zero", "again"))
    assert ", Eta DDIM: 0.5, " in eta.text["parameters"] and "Eta" not in zero.text["parameters"]
    assert not np.array_equal(np.asarray(eta), np.asarray(zero))
    assert np.array_equal(np.asarray(eta), np.asarray(again)) and eta.text["parameters"] == again.text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--prompt", "a", "--sampler", "DDIM", "--eta-ddim", "0.5", "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "--eta-ddim is A1111's 'Eta DDIM'" in capsys.readouterr().err


@pytest.mark.parametrize("label", ["PLMS", "DDIM CFG++"])
def test_generate_runs_them_and_reads_back(tmp_path, label):
    """``generate --sampler PLMS`` / ``"DDIM CFG++"``: the toy's image made with A1111's sampler (not diffusers'
    PNDM / DDIM), its infotext's sampler label, and the PNG alone making the same image again."""
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--negative", "blue", "--steps", "6", "--seed", "2", "--guidance", "6"]
    assert main(["generate", *base, "--sampler", label, "-o", str(tmp_path / "a.png")]) == 0
    other = "pndm" if label == "PLMS" else "DDIM"
    assert main(["generate", *base, "--sampler", other, "--schedule", "automatic", "-o", str(tmp_path / "b.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "a.png"), "-o", str(tmp_path / "again.png")]) == 0
    a, b, again = (Image.open(tmp_path / f"{n}.png") for n in ("a", "b", "again"))
    assert f", Sampler: {label}, " in a.text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(a), np.asarray(again)) and a.text["parameters"] == again.text["parameters"]


def test_generate_eta_ddim_on_ddim_cfgpp(tmp_path, capsys):
    """``--eta-ddim`` is taken by DDIM CFG++ (written, read back) and refused for PLMS, which has no eta."""
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--steps", "5", "--seed", "3"]
    assert main(["generate", *base, "--sampler", "DDIM CFG++", "--eta-ddim", "0.7", "-o", str(tmp_path / "e.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "e.png"), "-o", str(tmp_path / "again.png")]) == 0
    e, again = Image.open(tmp_path / "e.png"), Image.open(tmp_path / "again.png")
    assert ", Eta DDIM: 0.7, " in e.text["parameters"]
    assert np.array_equal(np.asarray(e), np.asarray(again))
    capsys.readouterr()
    assert main(["generate", *base, "--sampler", "PLMS", "--eta-ddim", "0.5", "-o", str(tmp_path / "x.png")]) == 2
    assert "its own DDIM and DDIM CFG++" in capsys.readouterr().err


def test_infotext_eta_ddim_of_another_sampler_says_why():
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    options, not_taken = infotext_options(parse_infotext(
        "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Eta DDIM: 0.5"))
    assert "eta_ddim" not in options
    assert "Eta DDIM: A1111's setting of its DDIM and DDIM CFG++; not taken with Sampler 'Euler a'" in not_taken
    options, _ = infotext_options(parse_infotext(
        "a castle\nSteps: 20, Sampler: DDIM CFG++, CFG scale: 7, Seed: 1, Size: 512x512, Eta DDIM: 0.5"))
    assert options["eta_ddim"] == 0.5 and options["sampler"] == "DDIM CFG++"


@pytest.mark.parametrize("sampler", ["plms", "ddim_cfgpp"])
def test_more_steps_than_timesteps_are_refused_before_the_run(sampler):
    """A1111's timesteps ``range(0, T, T // n)`` need n ≤ T: refused with why (not counted among the samplers that
    take any step count), as the function itself refuses."""
    from sdadapt.img2img import check_step_count, takes_any_step_count

    assert not takes_any_step_count(sampler)
    with pytest.raises(ValueError, match=rf"steps 1200: at most 1000.*A1111's {sampler} steps its timesteps") as info:
        check_step_count(sampler, None, steps=1200, num_train_steps=1000)
    assert "plms" not in str(info.value).split("any step count")[1]
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        _OURS[sampler](_guided(2.0), _x_T(1), alphas_cumprod=sd_alphas_cumprod(), num_steps=1001)


@pytest.mark.parametrize("label", ["PLMS", "DDIM CFG++", "UniPC"])
def test_generate_takes_ngms_on_them_without_a_schedule(tmp_path, label):
    """A1111's timestep samplers are A1111's without ``--schedule``: NGMS (which compares the call's timesteps there,
    as A1111 hands them over) is taken; A1111 writes it once a call skipped — never at these timesteps for a
    small NGMS, after the first call for one above them."""
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--negative", "blue", "--sampler", label, "--steps", "5", "--seed", "3"]
    assert main(["generate", *base, "--ngms", "0.5", "-o", str(tmp_path / "small.png")]) == 0
    assert main(["generate", *base, "--ngms", "2000", "-o", str(tmp_path / "large.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "none.png")]) == 0
    small, large, none = (Image.open(tmp_path / f"{n}.png") for n in ("small", "large", "none"))
    assert "NGMS" not in small.text["parameters"] and ", NGMS: 2000, " in large.text["parameters"]
    assert np.array_equal(np.asarray(small), np.asarray(none))
    assert not np.array_equal(np.asarray(large), np.asarray(none))
