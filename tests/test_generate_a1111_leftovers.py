"""``generate``'s last differences from AUTOMATIC1111's img2img, against A1111's code transcribed here and in
tests/test_inpaint_only_masked.py (``modules/processing.py`` ``StableDiffusionProcessingImg2Img.init``,
``apply_overlay``; ``modules/images.py`` ``resize_image``; ``modules/sd_samplers_common.py``
``setup_img2img_steps``):

* ``--resize-mode`` with ``--inpaint-full-res``: A1111 takes both; with a region the crop is fitted by "Resize and
  fill" whatever the mode, with a blank mask the run is plain img2img *with* the mode;
* the "Only masked" paste-back is A1111's PIL path bit for bit (8-bit Lanczos "Crop and resize", paste, alpha
  composite);
* "Only masked" on SDXL: the crop is sampled with the generation size's ``time_ids``;
* fixed-step grids longer than the model's timesteps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sampler_stand_ins import kdiffusion_sigma_to_t

from sdadapt.inpaint_crop import crop_and_resize, paste_back
from tests.test_img2img_resize import _a1111_resize_image
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)
from tests.test_inpaint_only_masked import (
    _a1111_expand_crop_region,
    _a1111_get_crop_region,
    _a1111_paste,
)


def _cli(model, out, *extra, steps="3"):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", steps, "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), *extra])


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _scene(tmp_path, mask_box=(20, 12, 27, 19), size=(48, 40)):
    """An init image of ``size`` (w, h) and a mask of its size with one box (x1, y1, x2, y2) white (None: blank)."""
    w, h = size
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 20, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = Image.new("L", (w, h), 0)
    if mask_box is not None:
        mask.paste(255, mask_box)
    mask.save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


@pytest.fixture(scope="module")
def plain_img2img(plain_sd, tmp_path_factory):  # noqa: F811
    """The plain img2img runs (no mask) of ``_scene``'s 48 x 40 init image at 32 x 32 that several tests compare
    with, each made once: ``run(mode)`` -> the PNG of ``--resize-mode mode`` (None: the default, "Just resize")."""
    folder = tmp_path_factory.mktemp("plain_img2img")
    init, _ = _scene(folder, mask_box=None)  # (the same init image as every _scene's)
    runs = {}

    def run(mode):
        if mode not in runs:
            out = folder / f"{mode}.png"
            extra = [] if mode is None else ["--resize-mode", mode]
            assert _cli(plain_sd, out, "--width", "32", "--height", "32", "--init-image", str(init), *extra) == 0
            runs[mode] = _png(out)
        return runs[mode]

    return run


# --------------------------------------------------------------------- 1. --resize-mode with --inpaint-full-res
@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_a_blank_only_masked_mask_falls_back_to_img2img_with_the_resize_mode(plain_sd, plain_img2img, tmp_path,  # noqa: F811
                                                                             monkeypatch, capsys, mode):
    """A1111: a blank mask leaves ``crop_region`` None, so the init image goes through
    ``resize_image(self.resize_mode, ...)``: the run equals plain img2img with that mode (and not "Just resize"),
    and the image the VAE encodes is A1111's ``resize_image(mode)`` of the 48 x 40 image at 32 x 32 (within PIL's
    8-bit roundings between its Lanczos passes)."""
    from sdadapt.diffusers_system import DiffusersSystem

    init, blank = _scene(tmp_path, mask_box=None)
    size = ["--width", "32", "--height", "32", "--init-image", str(init)]
    encoded, real_encode = [], DiffusersSystem.encode_images

    def spy_encode(self, images):
        encoded.append(images.detach().cpu().clone())
        return real_encode(self, images)

    monkeypatch.setattr(DiffusersSystem, "encode_images", spy_encode)
    assert _cli(plain_sd, tmp_path / "blank.png", *size, "--mask", str(blank), "--inpaint-full-res",
                "--resize-mode", mode) == 0
    assert "blank" in capsys.readouterr().err
    assert np.array_equal(_png(tmp_path / "blank.png"), plain_img2img(mode))  # (plain img2img with the mode)
    assert not np.array_equal(_png(tmp_path / "blank.png"), plain_img2img(None))  # (not "Just resize")
    theirs = _a1111_resize_image({"crop": 1, "fill": 2}[mode], Image.open(init).convert("RGB"), 32, 32)
    theirs = torch.from_numpy(np.asarray(theirs, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert encoded[0].shape == (1, 3, 32, 32)
    assert (encoded[0][0] - theirs).abs().max() <= 3.0 / 127.5


def test_the_resize_mode_does_not_touch_an_only_masked_region(plain_sd, tmp_path):  # noqa: F811
    """A1111: with a region (``crop_region`` not None) the init image is not resized by the mode at all — cut to
    the region and fitted by ``resize_image(2, ...)`` — so every mode gives the same image."""
    init, mask = _scene(tmp_path, mask_box=(30, 8, 40, 30))
    args = ["--init-image", str(init), "--mask", str(mask), "--inpaint-full-res", "--width", "32", "--height", "24"]
    outs = []
    for mode in ("just", "crop", "fill"):
        assert _cli(plain_sd, tmp_path / f"{mode}.png", *args, "--resize-mode", mode) == 0
        outs.append(_png(tmp_path / f"{mode}.png"))
    assert outs[0].shape == (40, 48, 3)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], _png(init))


def test_check_inpaint_options_takes_a_resize_mode_with_only_masked(tmp_path):
    from sdadapt.jobs.generate_inpaint import check_inpaint_options

    init, mask = _scene(tmp_path)
    check_inpaint_options(mask=mask, init_image=init, mask_blur=None, invert_mask=False, inpainting_fill="original",
                          inpainting_mask_weight=1.0, inpaint_full_res=True)  # (no resize-mode rule left to break)


# ------------------------------------------------------------------------- 2. the paste-back, bit for bit
@st.composite
def _paste_cases(draw):
    h, w = draw(st.integers(2, 48)), draw(st.integers(2, 48))
    x1, y1 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    x2, y2 = draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h))
    gh, gw = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    kind = draw(st.sampled_from(["random", "box", "blank", "full"]))
    return (h, w), (x1, y1, x2, y2), (gh, gw), seed, kind


@settings(max_examples=250, deadline=None)
@given(case=_paste_cases())
def test_paste_back_equals_a1111s_pil_path_bit_for_bit(case):
    """``paste_back`` of a float image (made 8-bit by rounding, as sdadapt writes every PNG) equals A1111's
    ``uncrop`` + ``apply_overlay`` on that 8-bit image — ``resize_image(1, ...)``, ``paste`` on a transparent
    canvas, the original pasted through ``RGBa`` under the inverted mask and ``alpha_composite`` — on random
    images, regions, generation sizes and masks, every pixel; a PIL image passed in gives the same; where the mask
    is 0 the original's pixels come back."""
    (h, w), region, (gh, gw), seed, kind = case
    rng = np.random.default_rng(seed)
    original = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = {"random": lambda: rng.integers(0, 256, (h, w), dtype=np.uint8),
            "box": lambda: np.pad(np.full((region[3] - region[1], region[2] - region[0]), 255, np.uint8),
                                  ((region[1], h - region[3]), (region[0], w - region[2]))),
            "blank": lambda: np.zeros((h, w), np.uint8), "full": lambda: np.full((h, w), 255, np.uint8)}[kind]()
    mask_image = Image.fromarray(mask, "L")
    generated = torch.from_numpy(rng.uniform(-1.1, 1.1, (3, gh, gw))).float()  # (beyond [-1, 1]: clamped)
    ours = np.asarray(paste_back(generated, original=original, mask=mask_image, region=region))
    eight_bit = ((generated.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    theirs = np.asarray(_a1111_paste(Image.fromarray(eight_bit), original, mask_image, region))
    assert ours.shape == theirs.shape == (h, w, 3)
    assert np.array_equal(ours, theirs), np.abs(ours.astype(int) - theirs).max()
    from_pil = paste_back(Image.fromarray(eight_bit), original=original, mask=mask_image, region=region)
    assert np.array_equal(np.asarray(from_pil), theirs)
    keep = mask == 0
    assert np.array_equal(ours[keep], np.asarray(original)[keep])


@settings(max_examples=150, deadline=None)
@given(src=st.tuples(st.integers(1, 50), st.integers(1, 50)), dst=st.tuples(st.integers(1, 50), st.integers(1, 50)),
       seed=st.integers(0, 2 ** 31 - 1))
def test_crop_and_resize_is_a1111s_resize_image_mode_1(src, dst, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8))
    ours = crop_and_resize(image, *dst)
    assert ours.size == dst
    assert np.array_equal(np.asarray(ours), np.asarray(_a1111_resize_image(1, image, *dst)))


# --------------------------------------------------------------------------------------- 3. "Only masked" on SDXL
@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    return tiny_sdxl_file(tmp_path_factory.mktemp("xl_only_masked") / "xl.safetensors")


def test_only_masked_on_sdxl_is_a1111s_crop_time_ids_and_paste(sdxl_file, tmp_path, monkeypatch):
    """SDXL "Only masked": A1111's region (blurred mask, padding, grown to 32:24), the crop sampled at the
    generation size with that size's SDXL ``time_ids`` ``(24, 32, 0, 0, 24, 32)`` (A1111's ``SdConditioning``
    carries ``p.width``/``p.height``, not the init image's 48 x 40), the output at the init image's size, equal
    to A1111's uncrop + overlay of the generated crop bit for bit, every pixel where the blurred mask is 0 the
    init image's."""
    import diffusers

    from sdadapt import inpaint
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    init, mask_path = _scene(tmp_path)
    seen, time_ids = {}, []
    real_overlay, real_forward = InpaintInputs.overlay, diffusers.UNet2DConditionModel.forward

    def spy_overlay(self, image):
        seen.update(inputs=self, generated=image.clone())
        return real_overlay(self, image)

    def spy_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        time_ids.append((tuple(sample.shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].detach().cpu().clone()))
        return real_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(InpaintInputs, "overlay", spy_overlay)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", spy_forward)
    assert _cli(sdxl_file, tmp_path / "out.png", "--init-image", str(init), "--mask", str(mask_path), "--mask-blur",
                "2", "--inpaint-full-res", "--inpaint-full-res-padding", "3", "--width", "32", "--height", "24",
                "--denoising-strength", "0.9") == 0
    out, source = _png(tmp_path / "out.png"), _png(init)
    assert out.shape == source.shape == (40, 48, 3)
    raw = np.asarray(Image.open(mask_path).convert("L"), dtype=np.float32)
    blurred = inpaint.blur_mask(torch.from_numpy(raw), x=2, y=2).to(torch.uint8).numpy()
    region = _a1111_expand_crop_region(_a1111_get_crop_region(blurred, 3), 32, 24, 48, 40)
    assert seen["inputs"].region == region
    assert seen["generated"].shape == (3, 24, 32)
    assert time_ids, "the UNet was not called"
    for latent_size, ids in time_ids:  # (every call: the crop's latents, the generation size's time_ids)
        assert latent_size[0] * 32 == latent_size[1] * 24  # (the 32 x 24 crop's latents, not the 48 x 40 image's)
        assert torch.equal(ids, torch.tensor([[24.0, 32.0, 0.0, 0.0, 24.0, 32.0]]).expand_as(ids)), ids
    keep = blurred == 0
    assert np.array_equal(out[keep], source[keep]) and not np.array_equal(out, source)
    generated = ((seen["generated"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = _a1111_paste(Image.fromarray(generated), Image.open(init).convert("RGB"),
                            Image.fromarray(blurred, "L"), region)
    assert np.array_equal(out, np.asarray(expected).astype(np.int16))


# ------------------------------------------------------------- 4. exact-step grids longer than the model's timesteps
T = 1000
_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
_ALPHAS_CUMPROD = torch.cumprod(1 - _BETAS, 0)
_TRAIN_SIGMAS = ((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD).sqrt()  # (T,) ascending
#: A1111's k-diffusion samplers (their grids are continuous in t or σ: k-diffusion's get_sigmas(n) takes any n)
K_DIFFUSION = ["euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpmpp_2s_a", "dpmpp_sde", "restart"]
#: samplers run as diffusers' schedulers (integer timesteps): a grid past T is refused
SCHEDULERS = ["ddim", "dpmsolver++", "unipc", "ddpm", "pndm", "lcm", "dpmsingle"]


def _a1111_setup_img2img_steps(steps, denoising_strength):
    """A1111's ``sd_samplers_common.setup_img2img_steps`` with ``steps`` passed (the hires pass, or the setting
    "img2img does exactly the steps")."""
    requested = steps
    steps = int(requested / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
    t_enc = requested - 1
    return steps, t_enc


def _k_sigma_to_t(sigma):
    """k-diffusion's ``DiscreteSchedule.sigma_to_t`` (quantize=False), float64."""
    return kdiffusion_sigma_to_t(_TRAIN_SIGMAS.log(), sigma)


def _k_t_to_sigma(t):
    """k-diffusion's ``DiscreteSchedule.t_to_sigma``, float64."""
    log_sigmas = _TRAIN_SIGMAS.log()
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


def _reference_grid(grid, n):
    """``(σ (n,), the model's timesteps (n,))`` of the grid of ``n`` steps, float64, without the final 0: A1111's
    ``get_sigmas(n)`` (``uniform``: k-diffusion's ``get_sigmas``, t_to_sigma of ``linspace(T − 1, 0, n)``;
    ``karras``: ``get_sigmas_karras(n, σ_min, σ_max)``; timesteps ``sigma_to_t(σ)``) or diffusers'
    ``EulerDiscreteScheduler`` linspace grid (``None``: timesteps ``linspace(0, T − 1, n)[::-1]``, which diffusers
    sets for any n, σ by ``np.interp`` at them)."""
    if grid is None:
        t = np.linspace(0, T - 1, n)[::-1].copy()
        sigmas = torch.from_numpy(np.interp(t, np.arange(T), _TRAIN_SIGMAS.numpy()))
        return sigmas, torch.from_numpy(t)
    if grid == "uniform":
        sigmas = _k_t_to_sigma(torch.linspace(T - 1, 0, n, dtype=torch.float64))
    else:
        s_min, s_max = float(_TRAIN_SIGMAS[0]), float(_TRAIN_SIGMAS[-1])
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sigmas = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    return sigmas, _k_sigma_to_t(sigmas)


class _Enough(Exception):
    """Ends a sampler run once the calls a test reads were made."""


def _run_fixed(sampler, schedule, *, steps, strength, calls_needed=None):
    """sdadapt's img2img of ``steps`` exact steps (the hires pass's request) on a zero ε model: the calls' inputs
    and timesteps (the run stops after ``calls_needed`` calls when given: a test that reads the first call only
    need not pay for a 1000-step SDE run)."""
    from sdadapt import samplers
    from sdadapt.sampling import _img2img_request

    init = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    resolved = samplers.resolve_schedule(sampler, schedule)
    start, total = _img2img_request(sampler, init, 1, steps, strength, steps, schedule=resolved, num_train_steps=T)
    calls = []

    def model(x, t, cond):
        calls.append((x.clone(), t.double().clone()))
        if calls_needed is not None and len(calls) >= calls_needed:
            raise _Enough
        return torch.zeros_like(x)

    try:
        samplers.sample_latents(model, noise, None, sampler=sampler, alphas_cumprod=_ALPHAS_CUMPROD.float(),
                                num_steps=total, schedule=schedule, start=start,
                                generator=torch.Generator().manual_seed(3))
    except _Enough:
        pass
    return init, noise, total, calls


@pytest.mark.parametrize("sampler", K_DIFFUSION)
@pytest.mark.parametrize("grid", [None, "uniform", "karras"])
def test_k_diffusion_samplers_run_a_fixed_step_grid_longer_than_the_timesteps_as_a1111(sampler, grid):
    """``--hires-steps 1000`` at strength 0.75 on a 1000-step model: A1111's grid of int(1000 / 0.75) = 1333
    steps, ``sigma_sched = sigmas[1333 − 999 − 1:]``, first sample ``init + noise·σ₀``; sdadapt runs it: the
    first model call is at A1111's (or diffusers', for the sampler's own grid) σ₀ — its input
    ``(init + noise·σ₀)/√(σ₀² + 1)`` and timestep ``t(σ₀)`` — and (Euler) the 1000 calls walk
    ``sigma_sched[:-1]``."""
    total, t_enc = _a1111_setup_img2img_steps(1000, 0.75)
    assert (total, t_enc) == (1333, 999)
    init, noise, ours_total, calls = _run_fixed(sampler, grid, steps=1000, strength=0.75,
                                                calls_needed=None if sampler == "euler" else 1)
    assert ours_total == total
    first = total - t_enc - 1  # (A1111's sigma_sched = sigmas[first:], 1000 steps)
    if sampler == "restart" and grid is None:  # (A1111's Restart: a Karras grid of its own)
        grid = "karras"
    if sampler in ("dpm_2", "dpm_2_a") and grid is not None:  # (A1111: n + 1 σ less the next-to-last; σ₀ kept)
        sigmas, times = _reference_grid(grid, total + 1)
    else:
        sigmas, times = _reference_grid(grid, total)
    s0 = float(sigmas[first])
    x0, t0 = calls[0]
    torch.testing.assert_close(x0, ((init + noise * s0) / (s0 ** 2 + 1) ** 0.5).to(x0), rtol=1e-5, atol=1e-6)
    expected_t = float(times[first])  # (unrounded: DPM2 on A1111's grid too, as A1111 calls the model)
    assert abs(float(t0.flatten()[0]) - expected_t) < 2e-3
    if sampler == "euler":
        assert len(calls) == 1000
        ours = torch.stack([t.flatten()[0] for _, t in calls])
        torch.testing.assert_close(ours, times[first:].to(ours), atol=2e-3, rtol=0)


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_dpm_fast_and_adaptive_take_a_fixed_step_grid_longer_than_the_timesteps(sampler):
    """A1111's ``sample_img2img`` hands DPM fast / adaptive ``sigma_sched[0]`` and ``[-2]`` of the 1333-step
    uniform grid: the run starts at σ_max = σ₀ of that grid."""
    init, noise, total, calls = _run_fixed(sampler, None, steps=1000, strength=0.75, calls_needed=1)
    assert total == 1333 and calls
    s0 = float(_reference_grid("uniform", 1333)[0][1333 - 999 - 1])
    torch.testing.assert_close(calls[0][0], ((init + noise * s0) / (s0 ** 2 + 1) ** 0.5).to(calls[0][0]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_scheduler_samplers_refuse_a_grid_past_the_timesteps_with_a_fix_that_works(sampler):
    """diffusers' schedulers set at most ``num_train_timesteps`` steps (DDIM says so; sdadapt's DPM-Solver/UniPC
    grids would repeat a timestep): 1000 exact steps are refused at every strength, naming the most steps that fit
    (999: int(999 / 0.999) = 1000) and the samplers that take any count; 500 exact steps at 0.4 (a grid of 1250)
    name strength 0.5, which runs."""
    import diffusers

    from sdadapt.img2img import check_fixed_grid

    with pytest.raises(ValueError, match="cannot be larger"):
        diffusers.DDIMScheduler(num_train_timesteps=T).set_timesteps(1001)
    for strength in (0.3, 0.75, 0.999, 1.0):
        with pytest.raises(ValueError, match="no strength helps") as refused:
            check_fixed_grid(sampler, None, steps=1000, strength=strength, num_train_steps=T)
        assert "use at most 999 img2img_steps" in str(refused.value) and "euler" in str(refused.value)
    check_fixed_grid(sampler, None, steps=999, strength=1.0, num_train_steps=T)  # (int(999 / 0.999) = 1000)
    with pytest.raises(ValueError, match=r"use denoising_strength 0\.5 or more"):
        check_fixed_grid(sampler, None, steps=500, strength=0.4, num_train_steps=T)
    check_fixed_grid(sampler, None, steps=500, strength=0.5, num_train_steps=T)


@pytest.mark.parametrize("schedule", ["simple", "ddim"])
def test_k_diffusion_samplers_on_a1111s_training_step_schedules_are_refused_past_the_timesteps(schedule):
    from sdadapt.img2img import check_fixed_grid

    check_fixed_grid("euler", "uniform", steps=1000, strength=0.75, num_train_steps=T)  # (continuous: runs)
    with pytest.raises(ValueError, match=f"A1111's '{schedule}' schedule picks the model's training steps"):
        check_fixed_grid("euler", schedule, steps=1000, strength=0.75, num_train_steps=T)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 1200), strength=st.floats(0.001, 1.0), limit=st.integers(50, 1000))
def test_the_fix_a_refusal_names_is_accepted(steps, strength, limit):
    """Whatever ``check_fixed_grid`` refuses on a scheduler sampler, the strength or step count its message names is
    accepted (and a grid that fits is never refused)."""
    import re

    from sdadapt.img2img import a1111_img2img_steps, check_fixed_grid

    total = a1111_img2img_steps(steps, strength, requested=steps)[0]
    try:
        check_fixed_grid("ddim", None, steps=steps, strength=strength, num_train_steps=limit)
    except ValueError as exc:
        assert total > limit
        message = str(exc)
        least = re.search(r"use denoising_strength ([0-9.]+) or more", message)
        if least:
            check_fixed_grid("ddim", None, steps=steps, strength=float(least.group(1)), num_train_steps=limit)
        else:
            most = int(re.search(r"use at most (\d+) img2img_steps", message).group(1))
            assert int(steps / 0.999) > limit and int(most / 0.999) <= limit < int((most + 1) / 0.999)
            check_fixed_grid("ddim", None, steps=most, strength=1.0, num_train_steps=limit)
        return
    assert total <= limit


def test_cli_runs_img2img_of_1000_exact_steps_on_euler_and_refuses_ddim_with_the_right_fix(plain_sd, tmp_path,  # noqa: F811
                                                                                       capsys, monkeypatch):
    """``--img2img-fix-steps --steps 1000`` on the 1000-step tiny model: Euler runs it (A1111 does: a 1333-step
    grid: 1000 model calls, the first at A1111's σ₀ — the sampler's numbers are checked above, so here the model
    is a zero-ε stand-in and the test pays for the calls, not the UNet); DDIM is refused before loading with a fix
    that can help (not "use --denoising-strength 1 or more")."""
    from sdadapt import samplers

    real, timesteps = samplers.sample_latents, []

    def zero_eps_model(model, x, cond, **kwargs):
        def stand_in(x, t, *args, **kw):
            timesteps.append(float(torch.as_tensor(t).flatten()[0]))
            return torch.zeros_like(x)

        return real(stand_in, x, cond, **kwargs)

    monkeypatch.setattr(samplers, "sample_latents", zero_eps_model)
    init, _ = _scene(tmp_path, size=(16, 16))
    args = ["--init-image", str(init), "--width", "16", "--height", "16", "--img2img-fix-steps"]
    assert _cli(plain_sd, tmp_path / "euler.png", *args, steps="1000") == 0
    assert _png(tmp_path / "euler.png").shape == (16, 16, 3)
    _, times = _reference_grid("uniform", 1333)
    assert len(timesteps) == 1000 and abs(timesteps[0] - float(times[1333 - 999 - 1])) < 2e-3
    capsys.readouterr()
    from sdadapt.cli import main

    code = main(["generate", "--model", str(plain_sd), "--prompt", "a photo", "--steps", "1000", "--sampler", "ddim",
                 "--seed", "3", "--quiet", "--out", str(tmp_path / "ddim.png"), *args])
    err = capsys.readouterr().err
    assert code != 0 and "use at most 999 --steps" in err and "or more" not in err, err
    assert not (tmp_path / "ddim.png").exists()


# ------------------------------------------------------------------------------------------------- (review R6)
@pytest.mark.parametrize(("options", "words"), [
    ({"init_image": True, "img2img_fix_steps": True, "steps": 1000, "denoising_strength": 0.75},
     (r"--sampler euler: 1000 steps run exactly at --denoising-strength 0\.75 need a grid of 1333 steps.*"
      r"A1111's 'simple' schedule picks the model's training steps")),
    ({"hires_scale": 2.0, "hires_steps": 1000, "hires_denoising": 0.75},
     r"--sampler euler: 1000 steps run exactly at --hires-denoising 0\.75 need a grid of 1333 steps.*'simple'"),
    ({"hires_scale": 2.0, "hires_steps": 1000, "hires_denoising": 0.75, "hires_sampler": "heun"},
     r"--hires-sampler heun: 1000 steps run exactly at --hires-denoising 0\.75.*'simple'"),
])
def test_run_generate_checks_each_fixed_pass_on_the_schedule_it_runs_on(tmp_path, monkeypatch, options, words):
    """(review) run_generate hands the early grid check the pass's own resolved schedule: with ``--schedule simple``
    (training steps, refused past T) a 1000-step exact pass is refused right after the load, for the
    ``--img2img-fix-steps`` pass, the hires pass on the first pass's sampler (its schedule) and on
    ``--hires-sampler`` (its own resolution) — not let through as if the pass ran on the sampler's continuous grid
    (it would then be refused only when that pass runs, after the first)."""
    from types import SimpleNamespace

    import sdadapt.jobs.generate as job

    init, _ = _scene(tmp_path, size=(16, 16))
    loaded = []

    def stand_in(*args, **kwargs):
        loaded.append(True)
        return SimpleNamespace(alphas_cumprod=torch.zeros(T))

    monkeypatch.setattr(job, "load_system", stand_in)
    options = dict(options, **({"init_image": init} if options.get("init_image") else {}))
    with pytest.raises(ValueError, match=words):
        job.run_generate(prompt="a", out=tmp_path / "x.png", sampler="euler", schedule="simple", **options)
    assert loaded == [True]  # (refused with the model's T known, before any sampling)


@pytest.mark.parametrize("sampler", ["dpmsolver++", "dpmsolver++_sde", "dpmsolver++_3m_sde"])
def test_dpmpp_karras_takes_a_fixed_grid_past_the_timesteps_as_a1111(sampler):
    """A1111's "DPM++ 2M Karras" (k-diffusion's ``sample_dpmpp_2m`` on ``get_sigmas_karras(1333, ...)``) runs the
    hires pass of 1000 exact steps at 0.75 as Euler does; sdadapt's ``dpmsolver++`` on the ``karras`` schedule is
    that sampler on that grid (the run itself against k-diffusion transcribed: tests/test_samplers_past_timesteps.py),
    and so on ``--karras`` and on the other continuous schedules; ``simple`` picks training steps and stays refused."""
    from sdadapt.img2img import check_fixed_grid

    check_fixed_grid(sampler, "karras", steps=1000, strength=0.75, num_train_steps=T)
    check_fixed_grid(sampler, None, steps=1000, strength=0.75, num_train_steps=T, karras=True)
    check_fixed_grid(sampler, "exponential", steps=1000, strength=0.75, num_train_steps=T)
    with pytest.raises(ValueError, match="'simple' schedule picks the model's training steps"):
        check_fixed_grid(sampler, "simple", steps=1000, strength=0.75, num_train_steps=T)
    with pytest.raises(ValueError, match="integer timesteps, as diffusers' scheduler does"):
        check_fixed_grid(sampler, None, steps=1000, strength=0.75, num_train_steps=T)


def test_an_only_masked_mask_blank_after_invert_falls_back_with_the_resize_mode(plain_sd, plain_img2img, tmp_path,  # noqa: F811
                                                                               capsys):
    """(review) A1111's order: binary mask, invert, blur, *then* the blank check (``get_crop_region_v2`` on the
    prepared mask): an all-white mask with ``--invert-mask`` is blank, so the run is plain img2img with
    ``--resize-mode`` (48 x 40 -> 32 x 32 by "Resize and fill"), pixel for pixel, and not an inpaint of the whole
    image nor a "Just resize"."""
    init, mask = _scene(tmp_path, mask_box=(0, 0, 48, 40))
    size = ["--width", "32", "--height", "32", "--init-image", str(init), "--resize-mode", "fill"]
    assert _cli(plain_sd, tmp_path / "inv.png", *size, "--mask", str(mask), "--invert-mask", "--inpaint-full-res",
                "--mask-blur", "3") == 0
    assert "blank" in capsys.readouterr().err
    assert _cli(plain_sd, tmp_path / "whole.png", *size[:-2], "--mask", str(mask), "--inpaint-full-res") == 0
    out = _png(tmp_path / "inv.png")
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, plain_img2img("fill"))  # (plain img2img, --resize-mode fill)
    assert not np.array_equal(out, _png(tmp_path / "whole.png"))


def test_the_dpmpp_refusal_on_a_continuous_schedule_names_the_sampler_not_the_schedule():
    """Karras is continuous (k-diffusion's get_sigmas_karras takes any n): the refusal must not say it picks
    training steps; on 'simple' (which does) it must."""
    from sdadapt.img2img import check_fixed_grid

    with pytest.raises(ValueError) as karras:  # (dpmsingle: diffusers' scheduler; the DPM++ that are A1111's run)
        check_fixed_grid("dpmsingle", "karras", steps=1000, strength=0.75, num_train_steps=1000)
    assert "picks the model's training steps" not in str(karras.value)
    assert "integer timesteps on any schedule" in str(karras.value)
    with pytest.raises(ValueError, match="'simple' schedule picks the model's training steps"):
        check_fixed_grid("euler", "simple", steps=1000, strength=0.75, num_train_steps=1000)
