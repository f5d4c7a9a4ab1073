"""``--resize-mode latent``: A1111's fourth img2img resize mode, "Just resize (latent upscale)" — the init image
encoded at its own size and its latents stretched by ``F.interpolate(mode="bilinear")``
(``StableDiffusionProcessingImg2Img.init``: no ``resize_image`` for ``resize_mode == 3``, then
``interpolate(self.init_latent, size=(height // 8, width // 8), mode="bilinear")``), transcribed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdadapt.jobs.generate_hires import init_latents_from_image
from sdadapt.jobs.generate_inpaint import img2img_pixels
from sdadapt.resize_modes import init_image_pixels, latent_resize
from tests.test_img2img_pil_exact import CASES, _StandIn, _write
from tests.test_inpaint import inpainting_sd, plain_sd  # noqa: F401  (module fixtures: the tiny SD folders)


def _a1111_mode3_latents(path, width, height, encode, opt_f=8):
    """A1111's init for resize_mode 3: flattened on white, not resized, ``/ 255 · 2 − 1``, encoded, interpolated
    (``opt_f``: the VAE's factor, A1111's 8)."""
    img = Image.open(path).convert("RGBA")
    background = Image.new("RGBA", img.size, "#ffffff")
    background.paste(img, mask=img)
    image = np.moveaxis(np.array(background.convert("RGB")).astype(np.float32) / 255.0, 2, 0)
    pixels = torch.from_numpy(image[None]) * 2 - 1
    latent = encode(pixels)
    return pixels, torch.nn.functional.interpolate(latent, size=(height // opt_f, width // opt_f), mode="bilinear")


class _Sized(_StandIn):
    def latent_shape(self, height, width):
        return 4, height // 8, width // 8


@pytest.mark.parametrize("kind,source,target", CASES)
def test_latent_resize_encodes_the_image_at_its_size_and_stretches_the_latents(tmp_path, kind, source, target):
    path = _write(tmp_path / "init.png", kind, *source, seed=sum(source) + len(kind))
    system = _Sized()
    ours = init_latents_from_image(system, path, height=target[0], width=target[1], resize_mode="latent")
    pixels, theirs = _a1111_mode3_latents(path, target[1], target[0], lambda x: x[:, :, ::8, ::8])
    assert torch.equal(system.encoded[0], pixels)  # (the image's own size, A1111's pixels bit for bit)
    assert ours.shape == (1, 3, target[0] // 8, target[1] // 8) and torch.equal(ours, theirs)
    assert torch.equal(init_image_pixels(path, (5, 7), mode="latent"), pixels[0])  # (the size is not used)


def test_latent_resize_is_bilinear_without_aligned_corners():
    """A float64 reference of half-pixel-centred bilinear resampling (edges clamped)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 5, generator=g, dtype=torch.float64)
    out = latent_resize(x, (4, 8))

    def axis(n_in, n_out):
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
        src = src.clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, src - lo

    (ylo, yhi, fy), (xlo, xhi, fx) = axis(3, 4), axis(5, 8)
    rows = x[..., ylo, :] * (1 - fy)[:, None] + x[..., yhi, :] * fy[:, None]
    want = rows[..., xlo] * (1 - fx) + rows[..., xhi] * fx
    assert torch.allclose(out, want, atol=1e-12)


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), "--width", "64", "--height", "48", *extra])


@pytest.mark.parametrize("vae_encode", ["mean", "sample"])
def test_cli_latent_resize_samples_from_the_stretched_latents(plain_sd, tmp_path, monkeypatch,  # noqa: F811
                                                               vae_encode):
    """End to end: the sampler starts from A1111's mode-3 latents of the image (40 x 56 into 64 x 48), the mean or
    (``--vae-encode sample``) the seed's posterior sample, and the image differs from the pixel stretch's."""
    from generate_recorder import record_generate

    from sdadapt.jobs.models import load_system

    path = _write(tmp_path / "init.png", "RGB", 40, 56, seed=4)
    calls = record_generate(monkeypatch)
    assert _cli(plain_sd, tmp_path / "latent.png", "--init-image", str(path), "--resize-mode", "latent",
                "--vae-encode", vae_encode) == 0
    system = load_system(str(plain_sd), device=torch.device("cpu"))
    f = system.vae_factor
    ours = calls[0][0]["init_latents"]
    if vae_encode == "mean":
        with torch.no_grad():
            _, theirs = _a1111_mode3_latents(path, 64, 48, lambda x: system.encode_images(x).float(), opt_f=f)
        assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()  # (the VAE loaded again)
    assert ours.shape == (1, 4, 48 // f, 64 // f)
    assert _cli(plain_sd, tmp_path / "just.png", "--init-image", str(path), "--vae-encode", vae_encode) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "latent.png")),
                              np.asarray(Image.open(tmp_path / "just.png")))


def test_latent_resize_is_refused_with_a_mask_and_on_an_inpainting_model_of_another_size(inpainting_sd,  # noqa: F811
                                                                                        tmp_path, capsys):
    from sdadapt.jobs.models import load_system

    path = _write(tmp_path / "init.png", "RGB", 40, 56, seed=4)
    Image.new("L", (56, 40), 255).save(tmp_path / "mask.png")
    assert _cli(inpainting_sd, tmp_path / "a.png", "--init-image", str(path), "--mask", str(tmp_path / "mask.png"),
                "--resize-mode", "latent") != 0
    assert "(latent upscale)') with --mask" in capsys.readouterr().err
    system = load_system(str(inpainting_sd), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="inpainting model: the image is 56x40, the run 64x48"):
        img2img_pixels(system, path, height=48, width=64, resize_mode="latent")
    same = _write(tmp_path / "same.png", "RGB", 48, 64, seed=5)  # (the run's size: A1111 runs it)
    image, masked = img2img_pixels(system, same, height=48, width=64, resize_mode="latent")
    assert image.shape == (1, 3, 48, 64) and masked is not None
