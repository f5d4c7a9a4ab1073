"""Soft inpainting against A1111's ``extensions-builtin/soft-inpainting/scripts/soft_inpainting.py`` transcribed
below (its ``latent_blend``, ``get_modified_nmask``, ``weighted_histogram_filter``, ``get_gaussian_kernel`` and the
mask arithmetic of ``apply_adaptive_masks``, as they are there: loops, in-place ops and all) and a k-diffusion Euler
loop over A1111's ``CFGDenoiser`` with its ``on_mask_blend``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter, ImageOps

from sdadapt import inpaint, samplers
from sdadapt.img2img import Img2ImgStart
from sdadapt.soft_inpainting import (
    SOFT_INPAINTING_FIELDS,
    SoftInpainting,
    difference_mask,
    gaussian_kernel,
    overlay_mask,
    parse_soft_inpainting,
    scheduled_nmask,
    soft_blend,
    soft_inpainting_fields,
    soft_inpainting_from_fields,
    weighted_histogram_filter,
)

BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()


# ------------------------------------------------------------------------------------ A1111's code, transcribed
def _a1111_latent_blend(detail, a, b, t):
    t2 = t.unsqueeze(0)
    t3 = t[0].unsqueeze(0).unsqueeze(0)
    one_minus_t2 = 1 - t2
    one_minus_t3 = 1 - t3
    a_scaled = a * one_minus_t2
    b_scaled = b * t2
    image_interp = a_scaled
    image_interp.add_(b_scaled)
    result_type = image_interp.dtype
    current_magnitude = torch.norm(image_interp, p=2, dim=1, keepdim=True).to(torch.float64).add_(0.00001)
    a_magnitude = torch.norm(a, p=2, dim=1, keepdim=True).to(torch.float64).pow_(detail) * one_minus_t3
    b_magnitude = torch.norm(b, p=2, dim=1, keepdim=True).to(torch.float64).pow_(detail) * t3
    desired_magnitude = a_magnitude
    desired_magnitude.add_(b_magnitude).pow_(1 / detail)
    factor = desired_magnitude
    factor.div_(current_magnitude)
    factor = factor.to(result_type)
    image_interp.mul_(factor)
    return image_interp


def _a1111_modified_nmask(power, scale, nmask, sigma):
    return torch.pow(nmask, (sigma ** power) * scale)


def _a1111_histogram_filter(img, kernel, kernel_center, percentile_min=0.0, percentile_max=1.0, min_width=1.0):
    def vec(x):
        return np.array(x)

    kernel_min = -kernel_center
    kernel_max = vec(kernel.shape) - kernel_center

    def single(idx):
        idx = vec(idx)
        min_index = np.maximum(0, idx + kernel_min)
        max_index = np.minimum(vec(img.shape), idx + kernel_max)
        window_shape = max_index - min_index
        values = []
        for window_tup in np.ndindex(tuple(window_shape)):
            image_index = vec(window_tup) + min_index
            kernel_index = image_index - idx + kernel_center
            values.append([img[tuple(image_index)], kernel[tuple(kernel_index)], 0.0, 1.0])
        values.sort(key=lambda x: x[0])
        total = 0
        for item in values:
            item[2] = total
            total += item[1]
            item[3] = total
        window_min = total * percentile_min
        window_max = total * percentile_max
        if window_max - window_min < min_width:
            window_center = (window_min + window_max) / 2
            window_min = window_center - min_width / 2
            window_max = window_center + min_width / 2
            if window_max > total:
                window_max = total
                window_min = total - min_width
            if window_min < 0:
                window_min = 0
                window_max = min_width
        value = 0
        value_weight = 0
        for item in values:
            if window_min >= item[3]:
                continue
            if window_max <= item[2]:
                break
            w = min(window_max, item[3]) - max(window_min, item[2])
            value += item[0] * w
            value_weight += w
        return value / value_weight if value_weight != 0 else 0

    img_out = img.copy()
    for index in np.ndindex(img.shape):
        img_out[index] = single(index)
    return img_out


def _a1111_kernel(stddev_radius=1.0, max_radius=2):
    def gaussian(sqr_mag):
        return math.exp(-sqr_mag / (stddev_radius * stddev_radius))

    zero_radius = max_radius + 1.0
    gauss_zero = gaussian(zero_radius * zero_radius)
    gauss_kernel_scale = 1 / (1 - gauss_zero)
    size = max_radius * 2 + 1
    kernel_center = max_radius
    kernel = np.zeros((size, size))
    for index in np.ndindex(kernel.shape):
        coordinate = np.array(index) - kernel_center
        x = gaussian(coordinate[0] ** 2.0 + coordinate[1] ** 2.0)
        x -= gauss_zero
        x *= gauss_kernel_scale
        kernel[index] = max(0.0, x)
    return kernel, kernel_center


def _a1111_smootherstep(x):
    return x * x * x * (x * (6 * x - 15) + 10)


def _a1111_adaptive_mask(setting, nmask, latent_orig, latent_processed):
    """``apply_adaptive_masks`` to its uint8 array (``nmask``: A1111's (C, h, w))."""
    latent_mask = nmask[0].float()
    mask_scalar = 1 - (torch.clamp(latent_mask, min=0, max=1) ** (setting.preservation_strength / 2))
    mask_scalar = (0.5 * (1 - setting.mask_influence) + mask_scalar * setting.mask_influence)
    mask_scalar = mask_scalar / (1.00001 - mask_scalar)
    mask_scalar = mask_scalar.cpu().numpy()
    latent_distance = torch.norm(latent_processed - latent_orig, p=2, dim=1)
    kernel, kernel_center = _a1111_kernel(stddev_radius=1.5, max_radius=2)
    out = []
    for distance_map in latent_distance:
        converted_mask = distance_map.float().cpu().numpy()
        converted_mask = _a1111_histogram_filter(converted_mask, kernel, kernel_center, percentile_min=0.9,
                                                 percentile_max=1, min_width=1)
        converted_mask = _a1111_histogram_filter(converted_mask, kernel, kernel_center, percentile_min=0.25,
                                                 percentile_max=0.75, min_width=1)
        half_weighted_distance = setting.difference_threshold * mask_scalar
        converted_mask = converted_mask / half_weighted_distance
        converted_mask = 1 / (1 + converted_mask ** setting.difference_contrast)
        converted_mask = _a1111_smootherstep(converted_mask)
        converted_mask = 1 - converted_mask
        converted_mask = 255. * converted_mask
        out.append(converted_mask.astype(np.uint8))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------ the math
def test_kernel_is_a1111s():
    kernel, centre = _a1111_kernel(1.5, 2)
    assert centre == 2 and np.array_equal(gaussian_kernel(1.5, 2), kernel)
    assert np.array_equal(gaussian_kernel(1.0, 3), _a1111_kernel(1.0, 3)[0])


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16), window=st.sampled_from(
    [(0.9, 1.0, 1.0), (0.25, 0.75, 1.0), (0.0, 1.0, 1.0), (0.5, 0.5, 0.3), (0.1, 0.2, 5.0)]), ties=st.booleans())
def test_weighted_histogram_filter_is_a1111s_bit_for_bit(h, w, seed, window, ties):
    """All pixels at once = A1111's per-pixel loop, float32 out, every window rule (narrow windows widened and
    pushed back inside the stack; ties kept in window order)."""
    rng = np.random.default_rng(seed)
    img = rng.random((h, w), dtype=np.float32) * 3
    if ties:
        img = np.round(img).astype(np.float32)
    kernel, centre = _a1111_kernel(1.5, 2)
    lo, hi, width = window
    theirs = _a1111_histogram_filter(img, kernel, centre, percentile_min=lo, percentile_max=hi, min_width=width)
    ours = weighted_histogram_filter(img, kernel, percentile_min=lo, percentile_max=hi, min_width=width)
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), batch=st.integers(1, 2), seed=st.integers(0, 999),
       power=st.sampled_from([1, 0.5, 2.3]), scale=st.sampled_from([0.5, 0.0, 3.0]),
       detail=st.sampled_from([4, 1, 7.5]), sigma=st.sampled_from([14.6146, 1.0, 0.0292, 0.0]))
def test_the_blend_is_a1111s_latent_blend_bit_for_bit(c, h, w, batch, seed, power, scale, detail, sigma):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(batch, c, h, w, generator=g), torch.randn(batch, c, h, w, generator=g)
    mask = torch.rand(h, w, generator=g)
    mask[0, 0], mask[-1, -1] = 0.0, 1.0
    setting = SoftInpainting(schedule_bias=power, preservation_strength=scale, transition_contrast_boost=detail)
    sigma32 = torch.tensor([sigma], dtype=torch.float32)
    theirs_t = _a1111_modified_nmask(power, scale, mask.expand(c, h, w).clone(), sigma32[0])
    theirs = _a1111_latent_blend(detail, a.clone(), b.clone(), theirs_t)
    t = scheduled_nmask(mask.expand(1, c, h, w).contiguous(), sigma, setting)  # (A1111's nmask: over the channels)
    assert torch.equal(t[0], theirs_t)
    ours = soft_blend(a, b, t, setting)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def test_the_blend_keeps_the_init_where_the_mask_keeps_and_takes_the_sample_where_it_repaints():
    """t = 0: the init latent (its magnitude over |init| + 1e-5); t = 1: the sample; the magnitudes in between."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    setting = SoftInpainting()
    norm = a.double().norm(dim=1, keepdim=True)
    kept = soft_blend(a, b, torch.zeros(1, 1, 3, 3), setting).double()
    assert torch.allclose(kept, a.double() * norm / (norm + 1e-5))
    norm = b.double().norm(dim=1, keepdim=True)
    assert torch.allclose(soft_blend(a, b, torch.ones(1, 1, 3, 3), setting).double(), b.double() * norm / (norm + 1e-5))
    half = soft_blend(a, b, torch.full((1, 1, 3, 3), 0.5), setting).double().norm(dim=1)
    want = ((a.double().norm(dim=1) ** 4 + b.double().norm(dim=1) ** 4) / 2) ** 0.25
    assert torch.allclose(half, want, rtol=1e-4)  # (the 1e-5 A1111 adds to |lin|)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 999), influence=st.sampled_from([0.0, 0.4, 1.0]),
       threshold=st.sampled_from([0.5, 2.0]), contrast=st.sampled_from([2.0, 0.75]), batch=st.integers(1, 2))
def test_difference_mask_is_a1111s_apply_adaptive_masks(seed, influence, threshold, contrast, batch):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(batch, 4, 6, 7, generator=g)
    moved = torch.linspace(0.0, 0.4, 7).view(1, 1, 1, 7) * (0.5 + torch.rand(1, 1, 6, 1, generator=g))
    samples = init + torch.randn(batch, 4, 6, 7, generator=g) * moved
    mask = torch.rand(6, 7, generator=g).clamp(0.05, 0.95)
    setting = SoftInpainting(mask_influence=influence, difference_threshold=threshold, difference_contrast=contrast)
    theirs = _a1111_adaptive_mask(setting, mask.expand(4, 6, 7), init, samples)
    with np.errstate(all="ignore"):
        ours = difference_mask(init, samples, mask[None, None], setting)
    assert ours.dtype == np.uint8 and ours.shape == (batch, 6, 7) and np.array_equal(ours, theirs)
    assert len(np.unique(ours)) > 1  # (a real spread: the test is not all 0 or all 255)


def test_overlay_mask_is_the_resized_blurred_mask():
    """A1111: ``resize_image(2, mask, W, H)`` (same aspect: Lanczos), ``create_binary_mask(round=False)``, blur 4."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    theirs = Image.fromarray(small, "L").convert("RGB").resize((48, 40), Image.LANCZOS).convert("L")
    theirs = theirs.filter(ImageFilter.GaussianBlur(radius=4))
    assert np.array_equal(np.asarray(overlay_mask(small, width=48, height=40)), np.asarray(theirs))


def test_the_composite_is_a1111s_apply_overlay_through_the_soft_mask():
    """The original over the generated image through the mask as it is (not doubled, unlike the plain overlay)."""
    rng = np.random.default_rng(2)
    gen, orig = (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2))
    mask = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
    masked = Image.new("RGBa", (8, 8))
    masked.paste(orig.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    theirs = gen.convert("RGBA")
    theirs.alpha_composite(masked.convert("RGBA"))
    assert np.array_equal(np.asarray(inpaint.composite_original(gen, orig, mask)), np.asarray(theirs.convert("RGB")))


# ---------------------------------------------------------------------------------------------- the sampler run
def _toy(x, t, cond):
    tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000.0
    return 0.3 * x + 0.2 * torch.sin(torch.roll(x, 1, dims=-1) * 2.0 + tt) + 0.1 * tt


def _soft_mask(h=4, w=5):
    m = torch.zeros(1, 1, h, w)
    m[..., 1:3, :] = torch.tensor([0.2, 0.5, 0.8, 1.0, 0.35])
    m[..., 3, 0] = 1.0
    return m


@pytest.mark.parametrize("schedule", [None, "karras"])
def test_euler_with_soft_inpainting_is_a1111s_cfg_denoiser_with_its_blend(schedule):
    """k-diffusion's Euler with A1111's blend hook after each call (soft inpainting's ``on_mask_blend`` at the call's
    σ) and no blend after sampling (its ``is_final_blend``): float32, A1111's arithmetic."""
    from sdadapt.samplers.sigma_space import discrete_sigmas

    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 5, generator=g), torch.randn(1, 4, 4, 5, generator=g)
    setting = SoftInpainting(schedule_bias=1.3, preservation_strength=0.7, transition_contrast_boost=3)
    latmask, steps, index = _soft_mask(), 7, 2
    ours = samplers.sample_latents(_toy, noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps,
                                   schedule=schedule,
                                   start=Img2ImgStart(init, index=index, mask=latmask, soft_inpainting=setting))
    times, sigmas = discrete_sigmas(ALPHAS_CUMPROD, steps, karras=schedule == "karras")
    sigmas, times = sigmas[index:].float(), times[index:].float()
    nmask = latmask[0].expand(4, 4, 5)
    x = init + noise * sigmas[0]
    for i in range(len(times)):
        s = sigmas[i:i + 1]
        eps = _toy(x / (s * s + 1) ** 0.5, times[i:i + 1], None)
        denoised = x - s * eps
        denoised = _a1111_latent_blend(3, init.clone(), denoised,
                                       _a1111_modified_nmask(1.3, 0.7, nmask, s[0]))
        x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    assert torch.allclose(ours, x, atol=2e-5), (ours - x).abs().max()
    plain = samplers.sample_latents(_toy, noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps,
                                    schedule=schedule, start=Img2ImgStart(init, index=index, mask=latmask.round()))
    assert (ours - plain).abs().max() > 1e-2  # (the soft blend is not the rounded mask's linear one)


def test_ddim_with_soft_inpainting_hands_the_blend_the_timestep():
    """A1111's timestep samplers blend the model's input before the call, their ``sigma`` the timestep (``nmask^(t·
    0.5)``: the original kept almost wholly early on); the DDIM update runs on x_t (diffusers' strength rule,
    leading spacing), no blend after: the loop transcribed."""
    g = torch.Generator().manual_seed(1)
    init, noise = torch.randn(1, 4, 4, 5, generator=g), torch.randn(1, 4, 4, 5, generator=g)
    latmask, setting, steps, strength = _soft_mask(), SoftInpainting(), 10, 0.6
    ours = samplers.sample_latents(_toy, noise, None, sampler="ddim", alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps,
                                   start=Img2ImgStart(init, strength=strength, mask=latmask, soft_inpainting=setting))
    ac = ALPHAS_CUMPROD.double()
    ts = [t + 1 for t in list(range(0, 1000, 100))[::-1]][steps - int(steps * strength):]
    nmask = latmask[0].expand(4, 4, 5)
    x = (ac[ts[0]].sqrt() * init.double() + (1 - ac[ts[0]]).sqrt() * noise.double()).float()
    for t in ts:
        a, a_prev = ac[t], (ac[t - 100] if t - 100 >= 0 else ac[0])
        x_in = _a1111_latent_blend(4, init.clone(), x.clone(),
                                   _a1111_modified_nmask(1, 0.5, nmask, torch.tensor(float(t))))
        eps = _toy(x_in.double(), torch.tensor([t]), None)
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def test_soft_inpainting_needs_a_mask_and_refuses_edm_and_bad_values():
    from sdadapt.sampling import generate
    from sdadapt.toy import build_toy

    with pytest.raises(ValueError, match="transition_contrast_boost"):
        SoftInpainting(transition_contrast_boost=0)
    with pytest.raises(ValueError, match="mask_influence"):
        SoftInpainting(mask_influence=1.5)
    with pytest.raises(ValueError, match="finite number"):
        SoftInpainting(difference_threshold=float("nan"))
    with pytest.raises(ValueError, match="finite number"):
        SoftInpainting(schedule_bias=-1)
    from sdadapt.samplers.edm import edm_inpaint_blend

    start = Img2ImgStart(torch.zeros(1, 4, 2, 2), strength=0.5, mask=torch.ones(1, 1, 2, 2),
                         soft_inpainting=SoftInpainting())
    with pytest.raises(ValueError, match="EDM"):
        edm_inpaint_blend(start, torch.zeros(1, 4, 2, 2), torch.linspace(1, 0, 5))
    system = build_toy()
    with pytest.raises(ValueError, match="inpaint_mask"):
        generate(system, ["a"], steps=2, soft_inpainting=SoftInpainting(), init_latents=torch.zeros(1, 12, 16, 16))


def test_fields_and_words_round_trip():
    setting = SoftInpainting(schedule_bias=1.5, difference_contrast=3)
    fields = soft_inpainting_fields(setting)
    assert list(fields) == list(SOFT_INPAINTING_FIELDS) and fields["Soft inpainting enabled"] is True
    read = soft_inpainting_from_fields({k: str(v) for k, v in fields.items()})
    assert read == (setting, list(SOFT_INPAINTING_FIELDS))
    assert soft_inpainting_from_fields({"Soft inpainting enabled": "True"})[0] == SoftInpainting()
    off = {"Soft inpainting enabled": "False", "Soft inpainting schedule bias": "2"}
    assert soft_inpainting_from_fields(off) == (None, list(off))
    assert soft_inpainting_from_fields({}) == (None, [])
    with pytest.raises(ValueError, match="schedule bias"):
        soft_inpainting_from_fields({"Soft inpainting enabled": "True", "Soft inpainting schedule bias": "x"})
    assert parse_soft_inpainting(["schedule_bias=1.5", "difference_contrast=3"]) == setting
    assert parse_soft_inpainting([]) == SoftInpainting()
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_soft_inpainting(["mask_blend_power=2"])


# --------------------------------------------------------------------------------------------- end to end (CLI)
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "4", "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), "--width", "64", "--height", "64", *extra])


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _scene(tmp_path, mask):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1) + rng.integers(0, 30, (64, 64, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(mask.astype(np.uint8), "L").save(tmp_path / "mask.png")
    return ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]


def _a1111_composite(generated, original, overlay_mask_small, size):
    """A1111's post_sample + apply_overlay: the 8-bit mask resized (Lanczos, same aspect), blurred 4, the original
    pasted through its inverse and alpha-composited over the generated image."""
    mask = Image.fromarray(overlay_mask_small, "L").convert("RGB").resize(size, Image.LANCZOS).convert("L")
    mask = mask.filter(ImageFilter.GaussianBlur(radius=4))
    masked = Image.new("RGBa", size)
    masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    out = generated.convert("RGBA")
    out.alpha_composite(masked.convert("RGBA"))
    return np.asarray(out.convert("RGB")).astype(np.int16)


def test_cli_soft_inpainting_is_a1111s_blend_composite_and_infotext(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """A grey-level mask: the latent mask keeps its fractions (A1111's mask_round off), the image is A1111's
    composite through the difference mask of the run's latents (transcribed above), the infotext carries A1111's
    fields, and ``--infotext`` of the PNG makes the same image."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    ramp = np.tile(np.linspace(0, 255, 64), (64, 1))
    ramp[:, :16] = 0
    args = _scene(tmp_path, ramp)
    seen = {}
    real_overlay = InpaintInputs.overlay

    def spy(self, image, **kw):
        seen.update(inputs=self, generated=image.clone(), **kw)
        return real_overlay(self, image, **kw)

    monkeypatch.setattr(InpaintInputs, "overlay", spy)
    import sdadapt.soft_inpainting as module

    blends = []
    real_blend = module.soft_blend

    def counted(init, current, t, setting):
        blends.append(setting)
        return real_blend(init, current, t, setting)

    monkeypatch.setattr(module, "soft_blend", counted)
    soft = ["--soft-inpainting", "preservation_strength=0.8", "difference_threshold=0.3"]
    assert _cli(plain_sd, tmp_path / "soft.png", *args, *soft) == 0
    assert len(blends) == 4 and blends[0].preservation_strength == 0.8  # (the blend at each of Euler's 4 calls)
    latmask = seen["inputs"].latmask.cpu()
    h, w = latmask.shape[-2:]  # (the tiny VAE halves the size)
    assert ((latmask > 0) & (latmask < 1)).any()  # (not rounded)
    assert torch.equal(latmask[..., :2], torch.zeros(1, 1, h, 2))  # (the black band, past the blur)

    setting = SoftInpainting(preservation_strength=0.8, difference_threshold=0.3)
    small = _a1111_adaptive_mask(setting, latmask[0].expand(4, h, w), seen["init"].cpu(), seen["latents"].cpu())[0]
    assert 0 < len(np.unique(small)) and small.min() < 128 < small.max()  # (both kept and changed areas)
    generated = ((seen["generated"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = _a1111_composite(Image.fromarray(generated), Image.open(tmp_path / "init.png").convert("RGB"),
                                small, (64, 64))
    out = _png(tmp_path / "soft.png")
    assert np.array_equal(out, expected)

    text = Image.open(tmp_path / "soft.png").text["parameters"]
    assert ("RNG: CPU, Soft inpainting enabled: True, Soft inpainting schedule bias: 1, Soft "
            "inpainting preservation strength: 0.8, Soft inpainting transition contrast boost: 4, Soft inpainting mask "
            "influence: 0, Soft inpainting difference threshold: 0.3, Soft inpainting difference contrast: 2, Mask "
            "blur: 4,") in text  # (A1111's: the script's process() before p.init's "Mask blur")
    monkeypatch.setattr(InpaintInputs, "overlay", real_overlay)
    assert _cli(plain_sd, tmp_path / "again.png", *args, "--infotext", str(tmp_path / "soft.png")) == 0
    assert np.array_equal(_png(tmp_path / "again.png"), out)
    assert _cli(plain_sd, tmp_path / "plain.png", *args) == 0
    assert not np.array_equal(_png(tmp_path / "plain.png"), out)


def test_cli_soft_inpainting_with_a_black_mask_keeps_the_picture(plain_sd, tmp_path):  # noqa: F811
    """Nothing to repaint: the latents barely move (the init's magnitude over itself + 1e-5), the difference mask is
    0 and the original is composited over everything — the source PNG, byte for byte."""
    args = _scene(tmp_path, np.zeros((64, 64)))
    assert _cli(plain_sd, tmp_path / "out.png", *args, "--soft-inpainting") == 0
    assert np.array_equal(_png(tmp_path / "out.png"), _png(tmp_path / "init.png"))


def test_cli_soft_inpainting_only_masked_keeps_everything_outside_the_region(plain_sd, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """"Only masked": the difference mask is brought back to the region (A1111's uncrop) on black: every pixel
    outside the region is the original's, and the region's is not all the original's."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    mask = np.zeros((64, 64))
    mask[20:36, 24:40] = 200
    args = _scene(tmp_path, mask)
    seen = {}
    real_overlay = InpaintInputs.overlay

    def spy(self, image, **kw):
        seen["region"] = self.region
        return real_overlay(self, image, **kw)

    monkeypatch.setattr(InpaintInputs, "overlay", spy)
    assert _cli(plain_sd, tmp_path / "out.png", *args, "--soft-inpainting", "--inpaint-full-res",
                "--inpaint-full-res-padding", "4", "--mask-blur", "2", "--width", "32", "--height", "32") == 0
    out, source = _png(tmp_path / "out.png"), _png(tmp_path / "init.png")
    assert out.shape == source.shape
    x1, y1, x2, y2 = seen["region"]
    assert 0 < x1 < 24 and 40 < x2 < 64 and 0 < y1 < 20 and 36 < y2 < 64
    outside = np.ones((64, 64), dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], source[outside])
    assert not np.array_equal(out[~outside], source[~outside])


def test_soft_inpainting_keeps_an_rgba_masks_alpha_and_needs_a_mask(plain_sd, tmp_path, capsys):  # noqa: F811
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 100), (0, 0, 0, 129), (0, 0, 0, 255)])
    assert list(inpaint.binary_mask(rgba).getdata()) == [0, 0, 255, 255]
    assert list(inpaint.binary_mask(rgba, rounded=False).getdata()) == [0, 100, 129, 255]
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "out.png", "--soft-inpainting")
    assert "--soft-inpainting only applies with --mask IMAGE" in capsys.readouterr().err
    from sdadapt.jobs.generate import run_generate

    with pytest.raises(ValueError, match="give --mask"):
        run_generate(model=str(plain_sd), prompt="a", out=str(tmp_path / "x.png"), soft_inpainting=SoftInpainting())
    with pytest.raises(TypeError, match="SoftInpainting"):
        run_generate(model=str(plain_sd), prompt="a", out=str(tmp_path / "x.png"), soft_inpainting={"a": 1})


def test_the_soft_inpainting_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "difference_mask(latents, out")
