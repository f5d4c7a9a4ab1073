"""``sdadapt.samplers.ddim_a1111.a1111_ddim_sample`` is A1111's own DDIM (v1.6+ timesteps sampler):
``sd_samplers_timesteps_impl.ddim`` and ``sd_samplers_timesteps.py`` (``get_timesteps``, ``sample_img2img``)
transcribed below over A1111's ``CFGDenoiserTimesteps`` (ε outputs combined; ``CompVisTimestepsVDenoiser`` reads v as
ε per branch), bit for bit; the guided model is :func:`sdadapt.training.diffusion.guided`'s (its x̂0-by-branch
reading gives the per-branch ε). ``ddim`` with a schedule (``sample_latents``, ``generate --sampler DDIM --schedule
automatic``) runs it; without one ``ddim`` stays diffusers' ``DDIMScheduler``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_stand_ins import rel_err, sd_alphas_cumprod, stand_in

from sdadapt.img2img import Img2ImgStart, a1111_img2img_steps
from sdadapt.inpaint import blend_denoised, masked_model
from sdadapt.samplers.ddim_a1111 import a1111_ddim_sample, a1111_ddim_timesteps
from sdadapt.training.diffusion import guided

AC32 = sd_alphas_cumprod().float()  # (A1111's buffer)


def _get_timesteps(steps: int) -> torch.Tensor:
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def _unet(x, t, c):
    return stand_in(x * (1 + c), t) + 0.3 * c


def _cfg(prediction_type, scale, init=None, latmask=None):
    """A1111's CFGDenoiserTimesteps over the stand-in: cond 0.5, uncond -0.25; v read as ε per branch; with a mask
    (mask_before_denoising) the input blended with the init latent first."""
    def model(x, timesteps):
        if latmask is not None:
            x = x * latmask + init * (1 - latmask)
        outs = []
        for c in (-0.25, 0.5):
            out = _unet(x, timesteps, c)
            if prediction_type == "v_prediction":
                a = AC32[timesteps.to(torch.int)][:, None, None, None]
                out = torch.sqrt(a) * out + torch.sqrt(1 - a) * x
            outs.append(out)
        u, cnd = outs
        den = torch.clone(u)
        den += (cnd - u) * (1.0 * scale)
        return den
    return model


def _a1111_ddim(model, x, timesteps, eta, g):
    """``sd_samplers_timesteps_impl.ddim`` as A1111 v1.10 writes it (randn_like: ``g``'s draws)."""
    alphas_cumprod = AC32
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu()) * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
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
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
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
    assert torch.equal(a1111_ddim_timesteps(steps), _get_timesteps(steps))


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_are_a1111s(strength, masked):
    """``sample_img2img``: t_enc by A1111's rule, ``init·√ᾱ + noise·√(1−ᾱ)`` at ``timesteps[t_enc]``, the run over
    ``timesteps[:t_enc]``; with a mask (:func:`sdadapt.inpaint.masked_model`'s DDIM form), the input blend before each
    call and the final ``samples·nmask + init·mask``."""
    steps, x_T = 10, _x_T(21)
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(22))
    latmask = None
    if masked:
        latmask = torch.zeros(1, 1, 6, 6)
        latmask[..., 1:4, 2:5] = 1.0
    total, t_enc = a1111_img2img_steps(steps, strength)
    timesteps = _get_timesteps(total)
    a = AC32[timesteps[t_enc]]
    xi = init * torch.sqrt(a) + x_T * torch.sqrt(1 - a)
    want = _a1111_ddim(_cfg("epsilon", 5.0, init, latmask), xi, timesteps[:t_enc], 0.0,
                       torch.Generator().manual_seed(4))
    model = _guided(5.0)
    if masked:
        want = want * latmask + init * (1 - latmask)
        model = guided(masked_model(model, init=init, latmask=latmask, sampler="ddim",
                                    alphas_cumprod=sd_alphas_cumprod(), prediction_type="epsilon"), None, None, 1.0)
    got = a1111_ddim_sample(model, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                            start=Img2ImgStart(init, strength=strength), generator=torch.Generator().manual_seed(4))
    if masked:
        got = blend_denoised(got, init, latmask)
    assert torch.equal(got, want), rel_err(got, want)


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
