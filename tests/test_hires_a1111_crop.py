"""The hires fix with ``--hires-width`` and ``--hires-height`` out of proportion to the first pass, against
A1111's txt2img hires fix transcribed here (AUTOMATIC1111/stable-diffusion-webui ``modules/processing.py`` at
0027ce1f6e58: ``StableDiffusionProcessingTxt2Img.calculate_target_resolution`` — ``hr_upscale_to_x/y``,
``truncate_x/y`` — and ``sample_hr_pass``: enlarge to cover, encode, crop the latents ``[t // 2 : n − (t + 1) //
2]``, a fresh ImageRNG at the cropped shape); the hires pass of an inpainting (9-channel) model; A1111's empty
hires prompt."""

from __future__ import annotations

import random

import pytest
import torch

from sdadapt.cli import main
from sdadapt.jobs.generate_hires import (
    HiresRequest,
    check_hires_request,
    crop_hires_latents,
    hires_size,
    hires_upscale_size,
    sample_image,
)

#: A1111's ``shared.latent_upscale_modes`` for the two upscalers checked here: (mode, antialias)
_A1111_LATENT_MODES = {"latent": ("bilinear", False), "latent-nearest-exact": ("nearest-exact", False)}


def _a1111_target_resolution(width, height, hr_scale=2.0, hr_resize_x=0, hr_resize_y=0, opt_f=8):
    """``calculate_target_resolution`` (old hires behaviour off) -> ``(hr_upscale_to_x, hr_upscale_to_y,
    truncate_x, truncate_y)``."""
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        upscale_to_x, upscale_to_y = int(width * hr_scale), int(height * hr_scale)
    elif hr_resize_y == 0:
        upscale_to_x, upscale_to_y = hr_resize_x, hr_resize_x * height // width
    elif hr_resize_x == 0:
        upscale_to_x, upscale_to_y = hr_resize_y * width // height, hr_resize_y
    else:
        target_w, target_h = hr_resize_x, hr_resize_y
        src_ratio, dst_ratio = width / height, hr_resize_x / hr_resize_y
        if src_ratio < dst_ratio:
            upscale_to_x, upscale_to_y = hr_resize_x, hr_resize_x * height // width
        else:
            upscale_to_x, upscale_to_y = hr_resize_y * width // height, hr_resize_y
        truncate_x = (upscale_to_x - target_w) // opt_f
        truncate_y = (upscale_to_y - target_h) // opt_f
    return upscale_to_x, upscale_to_y, truncate_x, truncate_y


def _a1111_truncate(samples, truncate_x, truncate_y):
    """``sample_hr_pass``'s crop of the enlarged latents."""
    return samples[:, :, truncate_y // 2:samples.shape[2] - (truncate_y + 1) // 2,
                   truncate_x // 2:samples.shape[3] - (truncate_x + 1) // 2]


def _a1111_latent_start(samples, width, height, hr_resize_x, hr_resize_y, upscaler, opt_f=8):
    """``sample_hr_pass``'s latent branch: interpolate to ``hr_upscale_to // opt_f``, then crop."""
    up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, 2.0, hr_resize_x, hr_resize_y, opt_f)
    mode, antialias = _A1111_LATENT_MODES[upscaler]
    samples = torch.nn.functional.interpolate(samples, size=(up_y // opt_f, up_x // opt_f), mode=mode,
                                              antialias=antialias)
    return _a1111_truncate(samples, t_x, t_y)


# (first pass width, height; hires width, height): odd truncations, covers that are no multiple of 8
_CASES = [(48, 40, 64, 64), (40, 56, 64, 48), (512, 768, 1024, 1024), (520, 488, 1024, 1024),
          (768, 512, 512, 640), (64, 64, 128, 64), (64, 64, 64, 128)]


def test_cover_size_and_crop_are_a1111s_on_random_sizes():
    """hires_size / hires_upscale_size / crop_hires_latents = A1111's hr_upscale_to_x/y and truncate_x/y on
    random multiples of 8 (latents numbered, so any other offset differs): the result is the requested size,
    never stretched. Catches a stretch, the ``//2`` / ``(t+1)//2`` ends swapped, a cover on the wrong side."""
    rng = random.Random(0)
    cases = _CASES + [tuple(8 * rng.randint(4, 160) for _ in range(4)) for _ in range(300)]
    odd = 0
    for width, height, rx, ry in cases:
        up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, 2.0, rx, ry)
        assert hires_size(height, width, scale=None, hires_height=ry, hires_width=rx) == (ry, rx)
        assert hires_upscale_size(height, width, scale=None, hires_height=ry, hires_width=rx) == (up_y, up_x)
        latents = torch.arange(float(up_y // 8 * (up_x // 8))).reshape(1, 1, up_y // 8, up_x // 8)
        ours = crop_hires_latents(latents, upscale_to=(up_y, up_x), size=(ry, rx))
        assert ours.shape[-2:] == (ry // 8, rx // 8)
        assert torch.equal(ours, _a1111_truncate(latents, t_x, t_y))
        odd += (t_x % 2) + (t_y % 2)
        check_hires_request(HiresRequest((ry, rx), upscale_to=(up_y, up_x)))
    assert odd > 50  # (odd truncations: the two ends differ by one)
    # one side alone or a scale: A1111 crops nothing
    for kwargs in ({"hr_resize_x": 1024}, {"hr_resize_y": 1000}, {"hr_scale": 1.5}):
        up_x, up_y, t_x, t_y = _a1111_target_resolution(512, 768, **kwargs)
        ours = {"scale": kwargs.get("hr_scale"), "hires_width": kwargs.get("hr_resize_x"),
                "hires_height": kwargs.get("hr_resize_y")}
        assert hires_upscale_size(768, 512, **ours) == hires_size(768, 512, **ours) == (up_y, up_x)
        assert t_x == t_y == 0


def test_a_request_whose_cover_is_smaller_than_its_size_is_refused():
    with pytest.raises(ValueError, match="does not cover"):
        check_hires_request(HiresRequest((64, 64), upscale_to=(64, 56)))


def _run(monkeypatch, system, first_latents, hires, first_size):
    """``sample_image`` with ``generate`` recorded -> the generate calls' keywords."""
    import sdadapt.sampling

    calls = []

    def fake_generate(_system, prompts, **kwargs):
        calls.append(kwargs)
        if kwargs.get("output") == "latents":
            return first_latents.clone()
        return torch.zeros(1, 3, kwargs["height"], kwargs["width"])

    monkeypatch.setattr(sdadapt.sampling, "generate", fake_generate)
    sample_image(system, ["a photo"], {"steps": 4, "seed": 3, "height": first_size[0], "width": first_size[1]},
                 hires=hires)
    return calls


def _request(width, height, rx, ry, upscaler):
    return HiresRequest(hires_size(height, width, scale=None, hires_height=ry, hires_width=rx), denoising=0.5,
                        upscaler=upscaler,
                        upscale_to=hires_upscale_size(height, width, scale=None, hires_height=ry, hires_width=rx))


@pytest.mark.parametrize("upscaler", list(_A1111_LATENT_MODES))
@pytest.mark.parametrize("width, height, rx, ry", _CASES[:4])
def test_latent_upscalers_enlarge_to_cover_and_crop_as_a1111(monkeypatch, upscaler, width, height, rx, ry):
    """The hires pass's init latents are A1111's: interpolated to the cover size, then cropped; the pass runs at
    the requested size (its noise drawn there). The stretch sdadapt did before differs."""
    g = torch.Generator().manual_seed(2)
    first = torch.randn(1, 4, height // 8, width // 8, generator=g)
    calls = _run(monkeypatch, object(), first, _request(width, height, rx, ry, upscaler), (height, width))
    second = calls[-1]
    theirs = _a1111_latent_start(first, width, height, rx, ry, upscaler)
    assert (second["height"], second["width"]) == (ry, rx)
    assert torch.equal(second["init_latents"], theirs)
    mode, antialias = _A1111_LATENT_MODES[upscaler]
    stretched = torch.nn.functional.interpolate(first, size=(ry // 8, rx // 8), mode=mode, antialias=antialias)
    assert not torch.allclose(stretched, theirs)


class _System:
    """A stand-in system: ``decode_latents`` returns fixed pixels, ``encode_images`` records its input and
    returns its 8x8 means (floored at the edge, as the VAE's strided convolutions)."""

    vae_factor = 8

    def __init__(self, pixels):
        self.pixels, self.encoded = pixels, []
        self.alphas_cumprod = torch.ones(3)

    def decode_latents(self, latents):
        return self.pixels.clone()

    def encode_images(self, images):
        self.encoded.append(images.clone())
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


@pytest.mark.parametrize("width, height, rx, ry", _CASES[:2])
def test_pixel_lanczos_resizes_to_the_cover_then_crops_the_latents_as_a1111(monkeypatch, width, height, rx, ry):
    """``pixel-lanczos``: A1111 resizes the 8-bit first pass to ``hr_upscale_to`` (here 76 x 64 and 64 x 89: no
    multiple of 8), encodes it and crops the latents — not the pixels. Bit for bit the pixels of A1111's Lanczos
    upscaler (transcribed with PIL in tests/test_hires_pixel_upscale_a1111.py)."""
    pytest.importorskip("PIL.Image")
    from tests.test_hires_pixel_upscale_a1111 import _a1111_hires_input, _decoded

    up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, 2.0, rx, ry)
    assert up_x % 8 or up_y % 8
    decoded = _decoded(1, height, width)
    system = _System(decoded)
    calls = _run(monkeypatch, system, torch.zeros(1, 4, height // 8, width // 8),
                 _request(width, height, rx, ry, "pixel-lanczos"), (height, width))
    (encoded,) = system.encoded
    assert torch.equal(encoded, _a1111_hires_input(decoded, up_x, up_y))
    theirs = _a1111_truncate(system.encode_images(encoded), t_x, t_y)
    assert theirs.shape[-2:] == (ry // 8, rx // 8)
    assert torch.equal(calls[-1]["init_latents"], theirs)
    assert (calls[-1]["height"], calls[-1]["width"]) == (ry, rx)


# ------------------------------------------------------------------------------------ a tiny Stable Diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tests.test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_crop"), prediction_type="epsilon")


def test_cli_crop_writes_the_requested_size_with_a1111_noise_at_the_cropped_shape(tiny_sd, tmp_path, monkeypatch):
    """End to end (tiny model, VAE factor 2): ``--hires-width 64 --hires-height 64`` from 48 x 32 covers 96 x 64
    and crops 8 latent columns off each side; the PNG is 64 x 64; the hires pass starts from A1111's cropped
    latents and ``--noise a1111-cpu``'s fresh ImageRNG draw at the cropped shape (4, 32, 32)."""
    import sdadapt.sampling
    from sdadapt import samplers
    from sdadapt.images import decode_png
    from sdadapt.samplers.a1111_noise import A1111Seeds

    generated, real_generate = [], sdadapt.sampling.generate

    def spy_generate(system, prompts, **kwargs):
        out = real_generate(system, prompts, **kwargs)
        generated.append((system, kwargs, out))
        return out

    noises, real_sample = [], samplers.sample_latents

    def spy_sample(model, x_T, cond, **kw):
        noises.append(x_T.clone())
        return real_sample(model, x_T, cond, **kw)

    monkeypatch.setattr(sdadapt.sampling, "generate", spy_generate)
    monkeypatch.setattr(samplers, "sample_latents", spy_sample)
    out = tmp_path / "crop.png"
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
                 "--width", "48", "--height", "32", "--hires-width", "64", "--hires-height", "64",
                 "--hires-steps", "2", "--hires-denoising", "0.5", "--noise", "a1111-cpu", "--seed", "4", "--quiet",
                 "--out", str(out)]) == 0
    assert decode_png(out.read_bytes()).shape[:2] == (64, 64)
    (system, _, first), (_, kwargs, _) = generated
    f = system.vae_factor
    theirs = _a1111_latent_start(first, 48, 32, 64, 64, "latent", opt_f=f)
    assert theirs.shape[-2:] == (64 // f, 64 // f)
    assert torch.equal(kwargs["init_latents"], theirs)
    expected = A1111Seeds(source="cpu").for_batch(4, 1).start_noise((1, 4, 64 // f, 64 // f))
    assert torch.equal(noises[-1].cpu(), expected.to(noises[-1].dtype))


def test_an_empty_hires_prompt_is_the_first_pass_prompt_as_in_a1111(tiny_sd, tmp_path):
    """A1111's setup_prompts: ``hr_prompt == ''`` -> the prompt (and so for the negative). Before, sdadapt
    sampled the hires pass with an empty prompt and negative, which changes the image."""
    base = ["generate", "--model", str(tiny_sd), "--prompt", "a red photo", "--negative", "blurry", "--steps", "2",
            "--sampler", "euler", "--width", "16", "--height", "16", "--hires-scale", "2", "--hires-steps", "2",
            "--seed", "1", "--quiet"]
    runs = {name: tmp_path / f"{name}.png" for name in ("plain", "empty")}
    assert main([*base, "--out", str(runs["plain"])]) == 0
    assert main([*base, "--hires-prompt", "", "--hires-negative", "", "--out", str(runs["empty"])]) == 0
    assert runs["empty"].read_bytes() == runs["plain"].read_bytes()


# ------------------------------------------------------------------------------- an inpainting (9-channel) model


@pytest.fixture(scope="module")
def inpainting_sd(tiny_sd, tmp_path_factory):
    """The tiny model above with a random 9-channel (inpainting) UNet."""
    import shutil

    from test_inpaint import with_inpainting_unet

    root = shutil.copytree(tiny_sd, tmp_path_factory.mktemp("inpainting_sd_crop") / "model")
    shutil.rmtree(root / "unet")
    return with_inpainting_unet(root)


@pytest.fixture(scope="module")
def inpainting_system(inpainting_sd):
    from sdadapt.jobs.models import load_system

    return load_system(str(inpainting_sd), device=torch.device("cpu"))


def _a1111_hr_inpainting_conditioning(vae, scaling_factor, upscaled_pixels, latent_hw):
    """``sample_hr_pass``'s pixel branch for an inpainting model: ``img2img_image_conditioning(decoded_samples,
    samples)`` -> ``inpainting_image_conditioning`` with no mask at A1111's default mask weight 1: a mask of ones,
    ``lerp(image, image · (1 − 1), 1) = 0`` encoded as it is (VAE input 0: grey; A1111 samples the posterior,
    sdadapt and this transcription take its mean), the mask resized (nearest) to the latents -> (B, 5, h, w)."""
    conditioning_mask = upscaled_pixels.new_ones(1, 1, *upscaled_pixels.shape[-2:])
    conditioning_image = torch.lerp(upscaled_pixels, upscaled_pixels * (1.0 - conditioning_mask), 1.0)
    with torch.no_grad():
        conditioning_image = vae.encode(conditioning_image).latent_dist.mean * scaling_factor
    conditioning_mask = torch.nn.functional.interpolate(conditioning_mask, size=latent_hw)
    conditioning_mask = conditioning_mask.expand(conditioning_image.shape[0], -1, -1, -1)
    return torch.cat([conditioning_mask, conditioning_image], dim=1)


@pytest.mark.parametrize("upscaler, size, upscale_to", [
    ("pixel-lanczos", (64, 48), None),   # A1111 runs this one: the reference
    ("latent", (64, 48), None),          # A1111 fails here (issue #6281: the first pass's size); sdadapt as above
    ("latent", (48, 48), (64, 48)),      # cropped: A1111 fails (uncropped conditioning); sdadapt at the crop
])
def test_inpainting_model_hires_conditioning_is_a1111s_pixel_upscaler_one(inpainting_system, upscaler, size,
                                                                         upscale_to):
    """The c_concat every UNet call of the hires pass gets = A1111's for a pixel upscaler transcribed (mask of
    ones, the VAE latent of an all-0 image at the hires size), the same for the guidance's halves. Catches the first
    pass's size, the upscaled image conditioning the model, a black (−1) image, a mask of zeros."""
    system = inpainting_system
    seen = []
    handle = system.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        hires = HiresRequest(size, steps=2, denoising=0.5, upscaler=upscaler, upscale_to=upscale_to)
        image = sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler",
                                                   "negative": "", "height": 32, "width": 24}, hires=hires)
    finally:
        handle.remove()
    assert image.shape == (1, 3, *size)
    f = system.vae_factor
    latent_hw = (size[0] // f, size[1] // f)
    theirs = _a1111_hr_inpainting_conditioning(system.vae, system.scaling_factor, torch.rand(1, 3, *size), latent_hw)
    hires_calls = [x for x in seen if tuple(x.shape[-2:]) == latent_hw]
    assert len(hires_calls) == 2 and all(x.shape[1] == 9 for x in hires_calls)
    for x in hires_calls:
        for half in x.chunk(x.shape[0]):
            assert torch.allclose(half[:, 4:], theirs, atol=1e-6), (half[:, 4:] - theirs).abs().max()
    black = system.encode_images(-torch.ones(1, 3, *size))
    assert not torch.allclose(theirs[:, 1:], black, atol=1e-3)


# ------------------------------------------------------------------------------------------- review additions


@pytest.fixture(scope="module")
def tiny_system(tiny_sd):
    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sd), device=torch.device("cpu"))


def test_pixel_lanczos_crop_with_the_real_vae_at_an_odd_cover_is_a1111s(tiny_system, monkeypatch):
    """``pixel-lanczos`` with a real (tiny, factor 2) VAE: 52 x 40 -> 64 x 64 covers 83 x 64 pixels (odd, no
    multiple of the factor); the VAE's strided convolutions floor that to 41 latent columns, and A1111's
    ``truncate_x = (83 − 64) // f = 9`` cuts 4 off the left and 5 off the right -> 32. The init latents equal
    A1111's ``images_tensor_to_samples`` of its Lanczos pixels at the cover, then ``[t // 2 : n − (t + 1) // 2]``.
    Catches a pad / ceil in the encode, a crop of the pixels instead of the latents, the ends swapped."""
    pytest.importorskip("PIL.Image")
    from tests.test_hires_pixel_upscale_a1111 import _a1111_hires_input

    system = tiny_system
    f = system.vae_factor
    width, height, rx, ry = 52, 40, 64, 64
    up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, 2.0, rx, ry, opt_f=f)
    assert (up_x, up_y, t_x, t_y) == (83, 64, 9, 0)
    first = torch.randn(1, 4, height // f, width // f, generator=torch.Generator().manual_seed(7))
    calls = _run(monkeypatch, system, first, _request(width, height, rx, ry, "pixel-lanczos"), (height, width))
    with torch.no_grad():
        pixels = _a1111_hires_input(system.decode_latents(first), up_x, up_y)
        encoded = system.encode_images(pixels).float()
    assert encoded.shape[-1] == up_x // f  # (floored by the VAE)
    theirs = _a1111_truncate(encoded, t_x, t_y)
    assert theirs.shape[-2:] == (ry // f, rx // f)
    assert torch.equal(calls[-1]["init_latents"].float(), theirs)


@pytest.fixture(scope="module")
def tiny_sdxl_system(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("xl_crop") / "xl.safetensors")), device="cpu")


def test_sdxl_cropped_hires_pass_time_ids_are_a1111s_enlarged_size(tiny_sdxl_system):
    """A1111 0027ce1f ``calculate_hr_conds`` builds the hires conds with ``width=hr_upscale_to_x,
    height=hr_upscale_to_y``, and ``sd_models_xl.get_learned_conditioning`` makes them ``original_size_as_tuple`` and
    ``target_size_as_tuple`` (crop (0, 0) at the default settings): for 24 x 16 -> 32 x 32 (cover 48 x 32) every
    hires UNet call's time_ids are (32, 48, 0, 0, 32, 48), not the cropped (32, 32, 0, 0, 32, 32)."""
    system = tiny_sdxl_system
    seen = []

    def hook(_module, args, kwargs):
        x = args[0]
        seen.append((tuple(x.shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].detach().clone()))

    handle = system.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        hires = _request(24, 16, 32, 32, "latent")
        assert hires.upscale_to == (32, 48)
        sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler",
                                           "negative": "", "height": 16, "width": 24}, hires=hires)
    finally:
        handle.remove()
    f = system.vae_factor
    hires_calls = [ids for hw, ids in seen if hw == (32 // f, 32 // f)]
    assert hires_calls
    for ids in hires_calls:
        assert torch.equal(ids.float(), torch.tensor([[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]]).expand_as(ids))
