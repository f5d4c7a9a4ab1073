"""The ``pixel-lanczos`` hires upscaler against a transcription of A1111's non-latent hires input, with real PIL
calls: ``StableDiffusionProcessingTxt2Img.sample_hr_pass`` (AUTOMATIC1111/stable-diffusion-webui
``modules/processing.py`` at 0027ce1f6e58), ``images.resize_image`` mode 0 with ``upscaler_name="Lanczos"`` and
``UpscalerLanczos`` / ``Upscaler.upscale`` (``modules/upscaler.py`` at 984b952eb307). A stand-in system records
what the VAE is asked to encode; :func:`sdadapt.sampling.generate` is replaced by a recorder (no model)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from test_sd_upscale import _a1111_upscale

from sdadapt.img2img import LATENT_UPSCALERS, upscale_latents
from sdadapt.jobs.generate_hires import (
    HiresRequest,
    lanczos_upscale_pixels,
    sample_image,
)

LANCZOS = Image.Resampling.LANCZOS


def _a1111_resize_image_0(im, width, height, upscaler_name="Lanczos"):
    """``images.resize_image(0, im, width, height, upscaler_name=...)``'s ``resize``."""
    if upscaler_name is None or upscaler_name == "None" or im.mode == "L":
        return im.resize((width, height), resample=LANCZOS)
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:  # (UpscalerLanczos / UpscalerNearest with Upscaler.upscale: test_sd_upscale's transcription)
        im = _a1111_upscale(im, scale, {"Lanczos": LANCZOS, "Nearest": Image.Resampling.NEAREST}[upscaler_name])
    if im.width != width or im.height != height:
        im = im.resize((width, height), resample=LANCZOS)
    return im


def _a1111_hires_input(decoded: torch.Tensor, target_width: int, target_height: int,
                       upscaler_name: str = "Lanczos") -> torch.Tensor:
    """``sample_hr_pass``'s non-latent branch up to the VAE (``images_tensor_to_samples``' ``2x − 1``)."""
    lowres_samples = torch.clamp((decoded.to(dtype=torch.float32) + 1.0) / 2.0, min=0.0, max=1.0)
    batch_images = []
    for x_sample in lowres_samples:
        x_sample = 255. * np.moveaxis(x_sample.cpu().numpy(), 0, 2)
        x_sample = x_sample.astype(np.uint8)
        image = Image.fromarray(x_sample)
        image = _a1111_resize_image_0(image, target_width, target_height, upscaler_name)
        image = np.array(image).astype(np.float32) / 255.0
        image = np.moveaxis(image, 2, 0)
        batch_images.append(image)
    return torch.from_numpy(np.array(batch_images)) * 2 - 1


def _decoded(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Decoder-like pixels: past [-1, 1] in places (the clamp), and most values between two 8-bit levels with a
    fraction above one half (so rounding instead of truncating moves them a level)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 255, (batch, 3, height, width), generator=g).float()
    frac = 0.55 + 0.4 * torch.rand(batch, 3, height, width, generator=g)
    x = (levels + frac) / 255.0 * 2 - 1
    x[:, :, 0, :2] = torch.tensor([1.3, -1.4])  # clamped to 255 / 0
    return x


class _System:
    """A stand-in system: ``decode_latents`` returns fixed pixels, ``encode_images`` records its input."""

    vae_factor = 8

    def __init__(self, pixels: torch.Tensor):
        self.pixels, self.encoded, self.decoded_calls = pixels, [], 0
        self.alphas_cumprod = torch.ones(3)

    def decode_latents(self, latents):
        self.decoded_calls += 1
        return self.pixels.clone()

    def encode_images(self, images):
        self.encoded.append(images.clone())
        b, _, h, w = images.shape
        return torch.zeros(b, 4, h // 8, w // 8)


def _run(monkeypatch, system, first_latents, hires):
    """``sample_image`` with ``generate`` recorded: -> (the hires pass's ``init_latents``, all generate calls)."""
    import sdadapt.sampling

    calls = []

    def fake_generate(_system, prompts, **kwargs):
        calls.append(kwargs)
        if kwargs.get("output") == "latents":
            return first_latents.clone()
        return torch.zeros(1, 3, *hires.size)

    monkeypatch.setattr(sdadapt.sampling, "generate", fake_generate)
    sample_image(system, ["a photo"], {"steps": 4, "height": 8 * first_latents.shape[2],
                                       "width": 8 * first_latents.shape[3]}, hires=hires)
    return calls[-1]["init_latents"], calls


@pytest.mark.parametrize("first, target", [
    ((16, 24), (32, 48)),  # 2x: one Lanczos resize
    ((24, 16), (40, 24)),  # stretched (hires width and height out of proportion): upscale, then resize
    ((24, 24), (16, 16)),  # smaller: one plain resize
])
def test_pixel_lanczos_encodes_a1111s_hires_pixels_bit_for_bit(monkeypatch, first, target):
    """The pixels sample_image hands the VAE for ``pixel-lanczos`` are A1111's: truncated to 8 bits, PIL's
    Lanczos upscaler, /255 in float32, 2x − 1. Catches rounding instead of truncating, a float resize, a missing
    clamp, or a step of the upscaler chain left out."""
    decoded = _decoded(2, *first)
    system = _System(decoded)
    _run(monkeypatch, system, torch.zeros(2, 4, first[0] // 8, first[1] // 8),
         HiresRequest(target, denoising=0.5, upscaler="pixel-lanczos"))
    (encoded,) = system.encoded
    theirs = _a1111_hires_input(decoded, target[1], target[0])
    assert encoded.dtype == torch.float32 and encoded.shape == (2, 3, *target)
    assert torch.equal(encoded, theirs)
    # (the rounding that sdadapt's PNGs use would differ: the check can fail)
    rounded = torch.from_numpy(np.rint(255.0 * ((decoded + 1) / 2).clamp(0, 1).numpy()).astype(np.uint8))
    truncated = ((decoded + 1) / 2).clamp(0, 1).mul(255.0).to(torch.uint8)
    assert not torch.equal(rounded, truncated)


@pytest.mark.parametrize(("name", "label"), [("pixel-nearest", "Nearest"), ("pixel-none", "None")])
@pytest.mark.parametrize(("first", "target"), [((16, 24), (40, 56)), ((24, 16), (40, 24)), ((24, 24), (16, 16))])
def test_a1111s_nearest_and_none_pixel_upscalers(monkeypatch, name, label, first, target):
    """A1111's "Nearest" (UpscalerNearest, then its Lanczos steps) and "None" (one Lanczos resize to the size) hires
    upscalers: the pixels the VAE is handed, bit for bit."""
    decoded = _decoded(1, *first, seed=7)
    system = _System(decoded)
    _run(monkeypatch, system, torch.zeros(1, 4, first[0] // 8, first[1] // 8),
         HiresRequest(target, denoising=0.5, upscaler=name))
    (encoded,) = system.encoded
    assert torch.equal(encoded, _a1111_hires_input(decoded, target[1], target[0], label))
    if label == "Nearest" and first == (16, 24):  # (not the Lanczos chain: the check can fail)
        assert not torch.equal(encoded, _a1111_hires_input(decoded, target[1], target[0]))


@pytest.mark.parametrize("size, target", [
    ((104, 104), (120, 120)),  # 104 · (120/104) = 119.99…: A1111 resizes to 119, then 112, then 120
    ((16, 24), (24, 40)),      # scale max(1.5, 1.667): 26x40, dest 24x40, then 24x40
    ((40, 24), (40, 24)),      # same size: no resize
])
def test_lanczos_upscaler_chain_is_a1111s(size, target):
    """A1111's "Lanczos" upscaler resizes two or three times where the float product misses the size or the
    sides are out of proportion; one direct resize would differ."""
    decoded = _decoded(1, *size, seed=3)
    ours = lanczos_upscale_pixels(decoded, target)
    assert torch.equal(ours, _a1111_hires_input(decoded, target[1], target[0]))
    if size == (104, 104):  # (the chain matters here: one direct resize is not A1111's)
        eight = ((decoded[0] + 1) / 2).clamp(0, 1).mul(255.0).to(torch.uint8).permute(1, 2, 0).numpy()
        direct = np.asarray(Image.fromarray(eight).resize((target[1], target[0]), resample=LANCZOS))
        assert not torch.equal(ours[0], torch.from_numpy(direct.astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1)


def test_without_pillow_the_float_path_stays_within_a_few_levels(monkeypatch):
    """No Pillow: the documented float fallback (one float Lanczos resize) — not equal to A1111's, but within
    3 levels of 8 bits of it on a smooth image (measured 1.8–2.3: the truncation and PIL's two roundings)."""
    from sdadapt.resampling import resample

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij")
    decoded = torch.stack([0.8 * torch.sin(3 * xx + 2 * yy + phase) for phase in (0.3, 2.0, 4.1)])[None]
    theirs = _a1111_hires_input(decoded, 40, 32)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    ours = lanczos_upscale_pixels(decoded, (32, 40))
    assert torch.equal(ours[0], resample(decoded[0], (32, 40), interpolation="lanczos", bounds=(-1.0, 1.0)))
    assert not torch.equal(ours, theirs)
    assert (ours - theirs).abs().max().item() * 127.5 < 3.0


@pytest.mark.parametrize("upscaler", list(LATENT_UPSCALERS))
def test_latent_upscalers_neither_decode_nor_encode(monkeypatch, upscaler):
    """The latent upscalers' hires start is the interpolated latents themselves, as before this change: no decode,
    no encode, ``upscale_latents`` exactly."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 2, 3, generator=g)
    system = _System(torch.zeros(1, 3, 16, 24))
    start, _ = _run(monkeypatch, system, latents, HiresRequest((32, 40), denoising=0.5, upscaler=upscaler))
    assert system.decoded_calls == 0 and system.encoded == []
    assert torch.equal(start, upscale_latents(latents, (4, 5), upscaler=upscaler))

