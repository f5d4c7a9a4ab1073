"""Inpainting (:mod:`sdadapt.inpaint`): inpainting checkpoints (9-channel UNet) against diffusers'
StableDiffusionInpaintPipeline, A1111's mask blend on a 4-channel model against a float64 transcription of
``CFGDenoiser.forward`` + k-diffusion's ``sample_euler``, and the mask preparation against numpy transcriptions."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdadapt import inpaint, samplers
from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers.sigma_space import discrete_sigmas, training_sigmas
from sdadapt.sampling import generate

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()
SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


#: the tiny SD folder (epsilon), built once per process (``plain_sd`` is imported by other test modules too; the
#: tests only read it)
_PLAIN_SD: list = []


def _plain_sd_folder(tmp_path_factory):
    """The tiny SD folder of the CLI tests (epsilon), built on the first call."""
    if not _PLAIN_SD:
        from tests.test_cli_train import _tiny_pipeline

        _PLAIN_SD.append(_tiny_pipeline(tmp_path_factory.mktemp("plain_sd"), prediction_type="epsilon"))
    return _PLAIN_SD[0]


@pytest.fixture(scope="module")
def inpainting_sd(tmp_path_factory):
    """The tiny SD folder of the CLI tests with a random 9-channel (inpainting) UNet (a copy of ``plain_sd``'s
    folder, its UNet replaced)."""
    import shutil

    root = tmp_path_factory.mktemp("inpainting_sd")
    shutil.copytree(_plain_sd_folder(tmp_path_factory), root, dirs_exist_ok=True)
    return with_inpainting_unet(root)


@pytest.fixture(scope="module")
def inpainting_system(inpainting_sd):
    """``inpainting_sd`` loaded once (the tests that only sample it, or read it, share it)."""
    return _system(inpainting_sd)


def with_inpainting_unet(root):
    """The tiny SD folder ``root`` (its ``unet`` folder absent or replaced) with a random 9-channel (inpainting)
    UNet (seed 1) and an inpainting ``model_index.json``; returns ``root``."""
    torch.manual_seed(1)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    ).save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInpaintPipeline"}))
    return root


def _system(root):
    from sdadapt.jobs.models import load_system

    return load_system(str(root), device=torch.device("cpu"))


def _pipeline(system, sampler):
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    elif sampler == "euler":
        scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULE)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++")
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_txt2img_on_an_inpainting_model_equals_diffusers_inpaint_pipeline_with_a_mask_of_ones(inpainting_system,
                                                                                              sampler):
    """A1111's txt2img_image_conditioning (grey image, mask 1) = diffusers' inpaint pipeline given a mask of ones
    at strength 1 (its masked image: image · (mask < 0.5) = 0, the grey image), the masked image's latent passed in
    (sdadapt encodes with the posterior mean, diffusers would sample it). Measured: max |Δ| 1.5e-5 (ddim, latents
    up to 27), 3.6e-5 (euler, up to 53) at 8 steps; 4 steps run the same code."""
    system = inpainting_system
    size = system.image_size
    assert system.latent_shape(size, size)[0] == 4  # (the VAE's channels, not the UNet's 9)
    ours = generate(system, ["a photo"], seed=5, steps=4, guidance=3.0, sampler=sampler, output="latents")
    grey = system.encode_images(torch.zeros(1, 3, size, size))
    theirs = _pipeline(system, sampler)(
        "a photo", image=torch.zeros(1, 3, size, size), mask_image=torch.ones(1, 1, size, size),
        masked_image_latents=grey, strength=1.0, num_inference_steps=4, guidance_scale=3.0, negative_prompt="",
        height=size, width=size, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == theirs.shape == (1, 4, size // system.vae_factor, size // system.vae_factor)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.75), ("dpmsolver++", 0.6)])
def test_masked_img2img_on_an_inpainting_model_equals_diffusers_inpaint_pipeline(inpainting_system, sampler, strength):
    """An init image + mask on an inpainting model: the c_concat of inpaint.masked_image / conditioning_mask /
    image_conditioning (A1111's inpainting_image_conditioning, weight 1) = the pipeline's mask_processor
    (binarized) and prepare_mask_latents; the same init latents and seed; no latent blend (diffusers has none for
    9-channel UNets). Measured: max |Δ| 6.7e-6 (both, latents up to 7.7) at 10 steps; 5 steps (3 run, dpmsolver++'s
    second order included) run the same code."""
    system = inpainting_system
    size = system.image_size
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    mask_u8 = torch.zeros(size, size)
    mask_u8[4:20, 8:30] = 255.0
    pixel_mask = inpaint.conditioning_mask(mask_u8)
    masked = inpaint.masked_image(image, pixel_mask, 1.0)
    assert torch.equal(masked, image * (pixel_mask < 0.5))  # diffusers' masked image
    conditioning = system.inpainting_conditioning(masked, pixel_mask)
    init = system.encode_images(image)
    ours = generate(system, ["a photo"], seed=7, steps=5, guidance=3.0, sampler=sampler, init_latents=init,
                    denoising_strength=strength, inpaint_conditioning=conditioning, output="latents")
    theirs = _pipeline(system, sampler)(
        "a photo", image=init, mask_image=pixel_mask, masked_image_latents=system.encode_images(masked),
        strength=strength, num_inference_steps=5, guidance_scale=3.0, negative_prompt="", height=size, width=size,
        generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_an_instruct_pix2pix_unet_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        inpaint.check_inpainting_unet(8, 4)
    assert inpaint.check_inpainting_unet(9, 4) and not inpaint.check_inpainting_unet(4, 4)


def _toy(x, t, cond):
    """A toy ε-model, nonlinear in x and t, mixing neighbouring cells (so the kept area reaches the repainted one)."""
    tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000.0
    return 0.3 * x + 0.2 * torch.sin(torch.roll(x, 1, dims=-1) * 2.0 + tt) + 0.1 * tt


def _latmask(h=4, w=4):
    m = torch.zeros(1, 1, h, w)
    m[..., 1:3, :3] = 1.0
    return m


def _a1111_euler(init, noise, latmask, sigmas, times):
    """k-diffusion's sample_euler with A1111's CFGDenoiser blend after each call and the final
    ``samples·nmask + init·mask``, in float64 (σ grid and timesteps as given)."""
    init, noise, nmask = init.double(), noise.double(), latmask.double()
    mask = 1 - nmask
    x = init + noise * float(sigmas[0])
    for i in range(len(times)):
        s = float(sigmas[i])
        eps = _toy((x / (s * s + 1) ** 0.5), torch.tensor([float(times[i])], dtype=torch.float64), None)
        denoised = init * mask + nmask * (x - s * eps)
        x = x + (x - denoised) / s * (float(sigmas[i + 1]) - s)
    return x * nmask + init * mask


@pytest.mark.parametrize("schedule", [None, "karras"])
def test_the_4_channel_blend_is_a1111s_cfg_denoiser_on_euler(schedule):
    """Euler with a mask = the float64 transcription of A1111's blend (denoised = init·mask + nmask·denoised after
    each model call, then samples·nmask + init·mask) on diffusers' linspace grid and on Karras σ (timesteps t(σ)).
    Measured: max |Δ| 4e-7 / 1.1e-6."""
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    latmask, steps, index = _latmask(), 7, 2  # (7 steps: fractional linspace timesteps, 166.5·k)
    ours = samplers.sample_latents(_toy, noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps,
                                   schedule=schedule, start=Img2ImgStart(init, index=index, mask=latmask))
    times, sigmas = discrete_sigmas(ALPHAS_CUMPROD, steps, karras=schedule == "karras")
    times = times.float().double()  # (the model gets float32 timesteps)
    theirs = _a1111_euler(init, noise, latmask, sigmas[index:], times[index:])
    assert torch.allclose(ours.double(), theirs, atol=1e-5), (ours.double() - theirs).abs().max()
    kept = latmask.expand_as(init) == 0
    assert torch.equal(ours[kept], init[kept])  # the kept area is the init latent, exactly
    unmasked = samplers.sample_latents(_toy, noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD,
                                       num_steps=steps, schedule=schedule, start=Img2ImgStart(init, index=index))
    assert not torch.allclose(ours[~kept], unmasked[~kept], atol=1e-3)  # the blend reaches the repainted area


def test_the_4_channel_blend_on_ddim_is_a1111s_mask_before_denoising():
    """DDIM with a mask = A1111's CFGDenoiserTimesteps (mask_before_denoising: the model sees init·mask + nmask·x_t,
    the DDIM update uses x_t), on diffusers' strength rule, transcribed in float64."""
    g = torch.Generator().manual_seed(1)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    latmask, steps, strength = _latmask(), 10, 0.6
    ours = samplers.sample_latents(_toy, noise, None, sampler="ddim", alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps,
                                   start=Img2ImgStart(init, strength=strength, mask=latmask))
    ac = ALPHAS_CUMPROD.double()
    ts = list(range(0, 1000, 100))[::-1]
    ts = [t + 1 for t in ts][steps - int(steps * strength):]  # (leading spacing, steps_offset 1; get_timesteps)
    nmask = latmask.double()
    x = ac[ts[0]].sqrt() * init.double() + (1 - ac[ts[0]]).sqrt() * noise.double()
    for t in ts:
        a, a_prev = ac[t], (ac[t - 100] if t - 100 >= 0 else ac[0])
        eps = _toy(init.double() * (1 - nmask) + nmask * x, torch.tensor([t]), None)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    theirs = x * nmask + init.double() * (1 - nmask)
    assert torch.allclose(ours.double(), theirs, atol=1e-5), (ours.double() - theirs).abs().max()


def test_mask_with_karras_on_dpm_solver_is_refused():
    init = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="Karras"):
        samplers.sample_latents(_toy, init, None, sampler="dpmsolver++", alphas_cumprod=ALPHAS_CUMPROD, num_steps=5,
                                karras=True, start=Img2ImgStart(init, strength=0.5, mask=_latmask()))


@pytest.fixture(scope="module")
def plain_sd(tmp_path_factory):
    return _plain_sd_folder(tmp_path_factory)


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "4", "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), *extra])


def _png(path):
    from sdadapt.images import decode_png

    return decode_png(path.read_bytes()).astype(np.int16)


def _masks(tmp_path, size=32):
    Image.new("L", (size, size), 0).save(tmp_path / "black.png")
    Image.new("L", (size, size), 255).save(tmp_path / "white.png")
    return tmp_path / "black.png", tmp_path / "white.png"


def test_cli_mask_on_a_plain_model_keeps_the_black_area_and_repaints_the_white(plain_sd, tmp_path, monkeypatch):
    """--mask all black: the latents are the init image's (A1111's final samples·nmask + init·mask) and A1111's
    overlay pastes the original pixels back: the source PNG, byte for byte (without the overlay: the VAE round
    trip of the init latents); all white (blur 4 keeps it white): the plain img2img image."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs
    from sdadapt.jobs.models import load_system

    black, white = _masks(tmp_path)
    assert _cli(plain_sd, tmp_path / "src.png") == 0
    assert _cli(plain_sd, tmp_path / "img2img.png", "--init-image", str(tmp_path / "src.png")) == 0
    assert _cli(plain_sd, tmp_path / "white_out.png", "--init-image", str(tmp_path / "src.png"),
                "--mask", str(white)) == 0
    assert _cli(plain_sd, tmp_path / "black_out.png", "--init-image", str(tmp_path / "src.png"),
                "--mask", str(black)) == 0
    assert np.array_equal(_png(tmp_path / "white_out.png"), _png(tmp_path / "img2img.png"))
    assert np.array_equal(_png(tmp_path / "black_out.png"), _png(tmp_path / "src.png"))
    monkeypatch.setattr(InpaintInputs, "overlay", lambda self, image: image)
    assert _cli(plain_sd, tmp_path / "latent_only.png", "--init-image", str(tmp_path / "src.png"),
                "--mask", str(black)) == 0
    system = load_system(str(plain_sd), device=torch.device("cpu"))
    src = torch.from_numpy(_png(tmp_path / "src.png").astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    round_trip = ((system.decode_latents(system.encode_images(src))[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert np.abs(_png(tmp_path / "latent_only.png") - round_trip.numpy().astype(np.int16)).max() <= 1
    assert not np.array_equal(_png(tmp_path / "latent_only.png"), _png(tmp_path / "img2img.png"))


def test_overlay_is_a1111s_apply_overlay():
    """mask_for_overlay = clip(2·mask, 0, 255); the original pasted (premultiplied) with alpha 255 − that, then
    alpha-composited over the generated image: numpy transcription of the straight-alpha result."""
    rng = np.random.default_rng(1)
    gen = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    orig = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    mask = np.tile(np.array([0, 30, 64, 100, 127, 128, 200, 255], dtype=np.uint8), (6, 1))
    out = np.asarray(inpaint.overlay_original(Image.fromarray(gen), Image.fromarray(orig), Image.fromarray(mask, "L")))
    alpha = (255 - np.clip(mask.astype(np.float64) * 2, 0, 255))[..., None] / 255
    theirs = orig * alpha + gen * (1 - alpha)
    assert np.abs(out.astype(np.float64) - theirs).max() <= 2  # (PIL's 8-bit premultiply / composite rounding)
    assert np.array_equal(out[:, 0], orig[:, 0]) and np.array_equal(out[:, 5:], gen[:, 5:])


def test_cli_white_mask_on_an_inpainting_model_is_its_plain_img2img(inpainting_sd, tmp_path):
    """An inpainting model: a white mask's conditioning (mask 1, the masked image all 0) is the one img2img without
    a mask gets (A1111's txt2img conditioning: a grey image under a mask of ones); a real mask changes the image."""
    black, white = _masks(tmp_path)
    assert _cli(inpainting_sd, tmp_path / "src.png") == 0
    assert _cli(inpainting_sd, tmp_path / "plain.png", "--init-image", str(tmp_path / "src.png")) == 0
    assert _cli(inpainting_sd, tmp_path / "white_out.png", "--init-image", str(tmp_path / "src.png"),
                "--mask", str(white)) == 0
    assert np.array_equal(_png(tmp_path / "white_out.png"), _png(tmp_path / "plain.png"))
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (0, 0, 16, 32))
    half.save(tmp_path / "half.png")
    assert _cli(inpainting_sd, tmp_path / "half_out.png", "--init-image", str(tmp_path / "src.png"),
                "--mask", str(tmp_path / "half.png"), "--inpainting-fill", "latent-nothing") == 0
    assert not np.array_equal(_png(tmp_path / "half_out.png"), _png(tmp_path / "plain.png"))


def test_cli_mask_options_need_a_mask_and_an_init_image(plain_sd, tmp_path, capsys):
    black, _ = _masks(tmp_path)
    assert _cli(plain_sd, tmp_path / "a.png", "--mask-blur", "2") != 0
    assert "give one" in capsys.readouterr().err
    assert _cli(plain_sd, tmp_path / "a.png", "--mask", str(black)) != 0
    assert "--init-image" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------------------------------- mask preparation
def test_binary_mask_invert_and_latent_mask_are_a1111s():
    """create_binary_mask (an RGBA mask's alpha > 128; any other mask its luminance, unrounded), ImageOps.invert,
    and latmask = round(RGB bicubic resize / 255)."""
    values = np.array([[0, 128, 129, 255]] * 4, dtype=np.uint8)
    grey = inpaint.binary_mask(Image.fromarray(values, "L"))
    assert np.array_equal(np.asarray(grey), values)  # (A1111: convert("L") only)
    rgb = inpaint.binary_mask(Image.fromarray(np.repeat(values[..., None], 3, axis=2), "RGB"))
    assert np.array_equal(np.asarray(rgb), values)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = values  # (transparency: the alpha is the mask, thresholded)
    mask = inpaint.binary_mask(Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(np.asarray(mask), np.where(values > 128, 255, 0))
    assert np.array_equal(np.asarray(inpaint.invert_mask(mask)), 255 - np.asarray(mask))
    big = np.zeros((32, 32), dtype=np.uint8)
    big[8:24, 4:20] = 255
    ours = inpaint.latent_mask(Image.fromarray(big, "L"), (4, 4))
    theirs = np.around(np.asarray(Image.fromarray(big, "L").convert("RGB").resize((4, 4)), dtype=np.float32)[..., 0]
                       / 255)
    assert ours.shape == (1, 1, 4, 4) and np.array_equal(ours[0, 0].numpy(), theirs)


def test_blur_mask_is_opencvs_gaussian_blur_x_then_y():
    """cv2.GaussianBlur(mask, (k, 1), σx) then (1, k), k = 2·int(2.5σ + 0.5) + 1, BORDER_REFLECT_101 (transcribed
    with numpy: reflect padding, OpenCV's 8-bit fixed-point kernel — the normalised Gaussian × 256, rounded with the
    error carried tap to tap, the centre 256 − the rest — and (Σ + 128) >> 8 after each pass; more in
    tests/test_generate_masks_a1111.py)."""
    rng = np.random.default_rng(0)
    mask = (rng.random((12, 20)) > 0.5).astype(np.float64) * 255
    sx, sy = 1.5, 0.8

    def blur(a, sigma, axis):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        r = np.arange(k) - (k - 1) / 2
        w = np.exp(-r * r / (2 * sigma * sigma))
        w /= w.sum()
        taps, err = np.zeros(k, dtype=np.int64), 0.0
        for i in range(k // 2):
            taps[i] = taps[k - 1 - i] = round(w[i] * 256 + err)
            err = w[i] * 256 + err - taps[i]
        taps[k // 2] = 256 - 2 * taps[: k // 2].sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (k // 2, k // 2)
        p = np.pad(a.astype(np.int64), pad, mode="reflect")
        out = sum(taps[j] * np.take(p, np.arange(j, j + a.shape[axis]), axis=axis) for j in range(k))
        return np.clip((out + 128) >> 8, 0, 255)

    theirs = blur(blur(mask, sx, 1), sy, 0)
    ours = inpaint.blur_mask(torch.from_numpy(mask).float(), x=sx, y=sy)
    assert np.array_equal(ours.numpy(), theirs)


def test_fill_latent_and_masked_image_follow_a1111():
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    latmask = _latmask()
    assert torch.equal(inpaint.fill_latent(init, latmask, "original"), init)
    assert torch.equal(inpaint.fill_latent(init, latmask, "latent-nothing"), init * (1 - latmask))
    noised = inpaint.fill_latent(init, latmask, "latent-noise", noise)
    assert torch.equal(noised, init * (1 - latmask) + noise * latmask)
    image = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    pixel = torch.zeros(1, 1, 8, 8)
    pixel[..., :4] = 1
    assert torch.allclose(inpaint.masked_image(image, pixel, 0.25), image * (1 - 0.25 * pixel))  # A1111's lerp
    with pytest.raises(ValueError, match="inpainting-fill"):
        inpaint.fill_latent(init, latmask, "mirror")


def test_an_inpainting_model_round_trips_through_an_ldm_single_file(inpainting_sd, inpainting_system, tmp_path):
    """The 9-channel UNet written as one LDM .safetensors (model.diffusion_model.input_blocks.0.0.weight of 9 input
    channels) loads back as an inpainting model and makes the same latents."""
    from safetensors import safe_open

    system = inpainting_system
    file = system.save_model(tmp_path / "inpainting.safetensors")
    with safe_open(str(file), "pt") as f:
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").shape[1] == 9
    from sdadapt.jobs.models import load_system

    again = load_system(str(file), device=torch.device("cpu"), tokenizer=str(inpainting_sd / "tokenizer"))
    assert again.unet.config.in_channels == 9
    ours = generate(system, ["a photo"], seed=1, steps=4, sampler="euler", output="latents")
    theirs = generate(again, ["a photo"], seed=1, steps=4, sampler="euler", output="latents")
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_a", "heun", "lms", "dpm_2", "dpmpp_2s_a", "dpmsolver++"])
def test_every_img2img_sampler_keeps_the_unmasked_latent_and_repaints_the_rest(sampler):
    """Invariants of the blend on the other samplers: the kept area is init exactly; a mask of ones is plain img2img
    (the blend is the identity there); the repainted area differs from the unmasked run (the kept area feeds it)."""
    g = torch.Generator().manual_seed(2)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    start = Img2ImgStart(init, strength=0.7) if sampler == "dpmsolver++" else Img2ImgStart(init, index=2)

    def run(mask):
        return samplers.sample_latents(_toy, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=6,
                                       generator=torch.Generator().manual_seed(0),
                                       start=Img2ImgStart(start.init, index=start.index, strength=start.strength,
                                                          mask=mask))

    latmask = _latmask()
    ours, plain, ones = run(latmask), run(None), run(torch.ones(1, 1, 4, 4))
    kept = latmask.expand_as(init) == 0
    assert torch.equal(ours[kept], init[kept])
    assert torch.allclose(ones, plain, atol=1e-5)
    assert not torch.allclose(ours[~kept], plain[~kept], atol=1e-3)


# ------------------------------------------------------------------------------------------- added by review RI
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler,schedule,karras", [
    ("euler", None, False), ("euler", None, True), ("euler", "exponential", False), ("heun", None, False),
    ("dpm_2", None, False), ("dpmpp_2s_a", None, True), ("restart", None, False), ("dpmsolver++", None, False),
    ("dpmsolver++", "exponential", False), ("unipc", None, False)])
def test_a_keep_everything_mask_makes_every_x0_the_init_latent(sampler, schedule, karras, prediction_type):
    """masked_model with a latent mask of zeros: every x̂0 the sampler reads is the init latent, so a deterministic
    sampler run from noise lands on it (the model's output rewritten at the σ the sampler uses, in every prediction
    type; the σ read back from the call's timesteps)."""
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    wrapped = inpaint.masked_model(_toy, init=init, latmask=torch.zeros(1, 1, 4, 4), sampler=sampler,
                                   alphas_cumprod=ALPHAS_CUMPROD, prediction_type=prediction_type,
                                   linear_timesteps=schedule is None and not karras)
    out = samplers.sample_latents(wrapped, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=7,
                                  schedule=schedule, karras=karras, prediction_type=prediction_type,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, init, rtol=0, atol=1e-10), (out - init).abs().max()  # (measured <= 2e-15)


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_a", "dpmsolver++", "dpmsolver++_sde"])
def test_mask_on_a1111s_grid_reads_sigma_exactly_and_diffusers_karras_is_refused(sampler):
    """On A1111's grids DPM2 and DPM-Solver++ call the model at the unrounded t(σ) (k-diffusion's form), so the
    blend reads σ back exactly: an all-keep mask returns the init latent; on diffusers' Karras σ (rounded
    timesteps) a mask is refused, naming the fix."""
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    with pytest.raises(ValueError, match="rounds them.*A1111's"):
        samplers.sample_latents(_toy, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=7,
                                karras=True, generator=torch.Generator().manual_seed(0),
                                start=Img2ImgStart(init, index=0, mask=_latmask()))
    samplers.sample_latents(_toy, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=7,
                            schedule="exponential", generator=torch.Generator().manual_seed(0),
                            start=Img2ImgStart(init, index=0, mask=_latmask()))  # (taken)
    wrapped = inpaint.masked_model(_toy, init=init, latmask=torch.zeros(1, 1, 4, 4), sampler=sampler,
                                   alphas_cumprod=ALPHAS_CUMPROD, prediction_type="epsilon", linear_timesteps=False)
    out = samplers.sample_latents(wrapped, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=7,
                                  schedule="exponential", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, init, atol=1e-7), (out - init).abs().max()


def test_latent_mask_of_a_wide_image_is_h_by_w():
    """latmask on a non-square grid: PIL's resize takes (w, h); the mask's left column stays on the left."""
    big = np.zeros((16, 48), dtype=np.uint8)
    big[:, :12] = 255
    ours = inpaint.latent_mask(Image.fromarray(big, "L"), (2, 6))
    assert ours.shape == (1, 1, 2, 6)
    assert ours[0, 0, :, 0].eq(1).all() and ours[0, 0, :, -1].eq(0).all()


def test_image_conditioning_is_the_nearest_mask_and_the_masked_latents():
    """c_concat = [nearest-resized mask, masked latents] on the channels (A1111's / diffusers' order)."""
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 3:] = 1.0  # (a column boundary that bilinear would blur)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    c = inpaint.image_conditioning(mask, latents)
    assert c.shape == (2, 5, 4, 4) and torch.equal(c[:, 1:], latents)
    assert torch.equal(c[:, :1], mask[..., ::2, ::2].expand(2, -1, -1, -1))
    seen = []
    run = inpaint.concat_conditioning(lambda x, t, cond: seen.append(x) or x[:, :4], c)
    x = torch.randn(4, 4, 4, 4)
    run(x, torch.tensor([1]), None)
    assert torch.equal(seen[0][:, :4], x) and torch.equal(seen[0][:, 4:], torch.cat([c, c]))


def test_txt2img_conditioning_is_a_grey_image_under_a_mask_of_ones():
    image, mask = inpaint.txt2img_masked_image(2, 8, 16)
    assert image.shape == (2, 3, 8, 16) and torch.equal(image, torch.zeros_like(image))
    assert mask.shape == (1, 1, 8, 16) and torch.equal(mask, torch.ones_like(mask))


def test_conditioning_mask_is_rounded():
    mask = torch.tensor([[0.0, 100.0, 127.0, 128.0, 200.0, 255.0]])
    assert torch.equal(inpaint.conditioning_mask(mask)[0, 0], torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("fill", ["latent-noise", "latent-nothing", "fill", "original"])
def test_inpaint_inputs_fill_and_noise_follow_the_seed(fill, tmp_path):
    """InpaintInputs.init_latents: latent-noise uses the seed's CPU-generator noise (generate's start noise),
    latent-nothing zeros the masked latent; original and fill keep the encoded image's latent unmasked."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    g = torch.Generator().manual_seed(0)
    init = torch.randn(1, 4, 4, 4, generator=g)
    inputs = InpaintInputs(init, _latmask(), None, fill)
    out = inputs.init_latents(11)
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(11))
    expected = inpaint.fill_latent(init, _latmask(), fill, noise if fill == "latent-noise" else None)
    assert torch.equal(out, expected)


def test_an_sdxl_inpainting_single_file_equals_diffusers_xl_inpaint_pipeline(tmp_path):
    """A tiny SDXL UNet with 9 input channels written as an LDM single file: loads as an inpainting model, its latent
    is the VAE's 4 channels, and txt2img (A1111's grey image under a mask of ones) and masked img2img equal
    StableDiffusionXLInpaintPipeline (time_ids (H, W, 0, 0, H, W), no aesthetic score), masked-image latents passed
    in. Measured: max |Δ| ~1e-5 on latents up to ~19 (at 6 steps; 3 steps run the same code)."""
    from tiny_checkpoints import tiny_sdxl_parts, write_single_file

    from sdadapt.jobs.models import load_system

    parts = tiny_sdxl_parts()
    torch.manual_seed(4)
    parts["unet"] = diffusers.UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 9}).eval()
    system = load_system(str(write_single_file(parts, tmp_path / "xl_inpaint.safetensors", architecture="sdxl")),
                         device="cpu")
    assert system.unet.config.in_channels == 9
    size = 32
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet, scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    ours = generate(system, ["a photo"], seed=5, steps=3, guidance=3.0, sampler="ddim", height=size, width=size,
                    output="latents")
    theirs = pipe("a photo", image=torch.zeros(1, 3, size, size), mask_image=torch.ones(1, 1, size, size),
                  masked_image_latents=system.encode_images(torch.zeros(1, 3, size, size)), strength=1.0,
                  num_inference_steps=3, guidance_scale=3.0, height=size, width=size,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask_u8 = torch.zeros(size, size)
    mask_u8[4:20, 8:30] = 255.0
    pixel_mask = inpaint.conditioning_mask(mask_u8)
    masked = inpaint.masked_image(image, pixel_mask, 1.0)
    init = system.encode_images(image)
    ours = generate(system, ["a photo"], seed=7, steps=3, guidance=3.0, sampler="ddim", height=size, width=size,
                    init_latents=init, denoising_strength=0.75,
                    inpaint_conditioning=system.inpainting_conditioning(masked, pixel_mask), output="latents")
    theirs = pipe("a photo", image=init, mask_image=pixel_mask, masked_image_latents=system.encode_images(masked),
                  strength=0.75, num_inference_steps=3, guidance_scale=3.0, height=size, width=size,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("linear", [True, False])
def test_masked_model_blends_x0_at_the_sigma_of_a_fractional_timestep(linear, prediction_type):
    """One call of masked_model at a fractional timestep: the x̂0 its output gives at the call's σ (linear in t
    on diffusers' grids, log-linear for t(σ) grids) is init·(1 − latmask) + latmask·x̂0(model), to float64
    precision."""
    from sdadapt.samplers.sigma_space import sigmas_at, t_to_sigma, vp_data_prediction

    train = training_sigmas(ALPHAS_CUMPROD)
    t = torch.tensor([166.5, 832.5], dtype=torch.float64)
    sigma = (sigmas_at(t, train) if linear else t_to_sigma(t, train)).view(-1, 1, 1, 1)
    alpha = 1 / (sigma * sigma + 1).sqrt()
    g = torch.Generator().manual_seed(4)
    init = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    x_in = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) * 3
    wrapped = inpaint.masked_model(_toy, init=init, latmask=_latmask(), sampler="euler", alphas_cumprod=ALPHAS_CUMPROD,
                                   prediction_type=prediction_type, linear_timesteps=linear)
    read = vp_data_prediction(wrapped(x_in, t, None), x_in, alpha, sigma * alpha, prediction_type)
    model = vp_data_prediction(_toy(x_in, t, None), x_in, alpha, sigma * alpha, prediction_type)
    expected = init * (1 - _latmask().double()) + _latmask().double() * model
    assert torch.allclose(read, expected, rtol=0, atol=1e-10), (read - expected).abs().max()


def test_fill_masked_pixels_keeps_the_unmasked_pixels_and_fills_the_masked_with_their_colours():
    """A1111's masking.fill: the unmasked pixels come back unchanged (the radius-0 layer on top), the masked ones
    take the surrounding colour (here one colour: exactly it, up to 8-bit premultiply rounding)."""
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :8] = (200, 40, 90)  # the kept half: one colour
    image[:, 8:] = np.random.default_rng(0).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    out = np.asarray(inpaint.fill_masked_pixels(Image.fromarray(image), Image.fromarray(mask, "L"))).astype(int)
    assert np.array_equal(out[:, :8], image[:, :8].astype(int))
    assert np.abs(out[:, 8:] - np.array([200, 40, 90])).max() <= 2


@pytest.mark.parametrize("fill", ["original", "fill"])
def test_inpaint_inputs_wire_the_mask_the_fill_and_the_conditioning(inpainting_system, tmp_path, fill):
    """inpaint_inputs on an inpainting model, a 16 x 16 mask for a 32 x 32 image: the mask binary, blurred, then
    Lanczos-resized to the output size; the init latent encodes the image (fill: masking.fill's pixels); latmask from
    that mask; c_concat from the masked (filled) image and the rounded pixel mask."""
    from sdadapt.jobs.generate_inpaint import _pil, _tensor, inpaint_inputs

    system = inpainting_system
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    small = np.zeros((16, 16), dtype=np.uint8)
    small[3:11, 5:14] = 255
    Image.fromarray(small, "L").save(tmp_path / "mask.png")
    got = inpaint_inputs(system, tmp_path / "img.png", tmp_path / "mask.png", height=32, width=32, mask_blur=1.0,
                         inpainting_fill=fill)
    blurred = inpaint.blur_mask(torch.from_numpy(small.astype(np.float32)), x=1.0, y=1.0)
    mask = Image.fromarray(blurred.to(torch.uint8).numpy(), "L").resize((32, 32), resample=Image.LANCZOS)
    assert np.array_equal(np.asarray(got.mask), np.asarray(mask))
    image = _tensor(Image.open(tmp_path / "img.png").convert("RGB"))
    assert np.array_equal(np.asarray(got.original), np.asarray(_pil(image)))
    if fill == "fill":
        image = _tensor(inpaint.fill_masked_pixels(_pil(image), mask))
    with torch.no_grad():
        init = system.encode_images(image[None])
        assert torch.allclose(got.init, init, atol=1e-6)
        assert torch.equal(got.latmask, inpaint.latent_mask(mask, tuple(init.shape[-2:])))
        pixel = inpaint.conditioning_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        expected = system.inpainting_conditioning(inpaint.masked_image(image[None], pixel), pixel)
    assert got.conditioning is not None and torch.allclose(got.conditioning, expected, atol=1e-6)


def test_a_blur_wider_than_the_mask_reflects_again_as_opencv():
    # (σ 4: a 21-tap kernel on 8 rows; bit-exact OpenCV rows: tests/test_generate_masks_a1111.py)
    flat = inpaint.blur_mask(torch.full((8, 40), 255.0), x=1.0, y=4.0)
    assert torch.equal(flat, torch.full((8, 40), 255.0))  # (a constant mask stays constant at any width)
    assert inpaint.blur_mask(torch.zeros(8, 40), x=4.0, y=0.0).shape == (8, 40)  # (σ 0 skips the y pass)


def test_the_mask_follows_the_resize_mode_and_bad_masks_are_refused_before_loading(plain_sd, tmp_path):
    """A1111 resizes the mask with the image's resize mode: a mask white in the left quarter of a 32 x 64 image,
    cropped to 32 x 32 (its centre half), repaints nothing; stretched, the left quarter. A file that is no image and
    --inpainting-mask-weight without --mask are refused by name, before any model loads."""
    from sdadapt.jobs.generate_inpaint import check_inpaint_options, inpaint_inputs
    from sdadapt.jobs.models import load_system

    image, mask = tmp_path / "wide.png", tmp_path / "mask.png"
    Image.fromarray(np.full((32, 64, 3), 128, dtype=np.uint8), "RGB").save(image)
    quarter = np.zeros((32, 64), dtype=np.uint8)
    quarter[:, :16] = 255
    Image.fromarray(quarter, "L").save(mask)
    system = load_system(str(plain_sd), device="cpu")
    crop = inpaint_inputs(system, image, mask, height=32, width=32, mask_blur=0, resize_mode="crop")
    just = inpaint_inputs(system, image, mask, height=32, width=32, mask_blur=0, resize_mode="just")
    assert crop.latmask.sum() == 0
    assert just.latmask[..., :, :1].eq(1).all() and just.latmask[..., :, -1:].eq(0).all()
    (tmp_path / "not.png").write_text("no image")
    with pytest.raises(ValueError, match=r"--mask .*not.png: not an image"):
        check_inpaint_options(mask=tmp_path / "not.png", init_image=image, mask_blur=None, invert_mask=False,
                              inpainting_fill="original", inpainting_mask_weight=1.0)
    # (A1111's img2img without a mask weighs an inpainting model's conditioning; its txt2img has no weight)
    check_inpaint_options(mask=None, init_image=image, mask_blur=None, invert_mask=False,
                          inpainting_fill="original", inpainting_mask_weight=0.5)
    with pytest.raises(ValueError, match="--inpainting-mask-weight weighs .* give --init-image"):
        check_inpaint_options(mask=None, init_image=None, mask_blur=None, invert_mask=False,
                              inpainting_fill="original", inpainting_mask_weight=0.5)
