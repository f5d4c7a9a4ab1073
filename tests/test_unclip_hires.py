"""SD 2.1 unCLIP and the txt2img hires fix as A1111 runs it, and the unCLIP image kept to its run.

A AUTOMATIC1111/stable-diffusion-webui modules/processing.py @ 0027ce1f6e58, ``sample_hr_pass``: with a pixel upscaler
``decoded_samples = np.array(image) / 255`` (in [0, 1]) is encoded by ``images_tensor_to_samples`` (which does
``2x − 1`` itself, modules/sd_samplers_common.py) and handed as is to ``img2img_image_conditioning`` →
``unclip_image_conditioning`` (embedder, noise augmentor at level 0) for a ``crossattn-adm`` model; with a latent
upscaler (inpainting mask weight 1) ``txt2img_image_conditioning``: zeros. The first pass is txt2img: zeros. The
unconditional branch is zeros throughout (sd_samplers_cfg_denoiser: ``image_uncond = torch.zeros_like``).

The tiny random unCLIP-H file is tests/test_unclip_single_file.py's ``stability_file``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_unclip_single_file import D, spy_class_labels, stability_file

from sdadapt.formats.files import write_safetensors


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from sdadapt.jobs.models import load_system

    path = tmp_path_factory.mktemp("unclip-hires") / "h.safetensors"
    write_safetensors(path, stability_file("h", 0), {})
    return load_system(str(path))


def _a1111_class_input(system, vae_pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 [√ᾱ₀·e + √(1 − ᾱ₀)·n ‖ cos 0 ‖ sin 0] (H: identity stats) of e = the embedder on A's
    ``decoded_samples``: the pixels the VAE encodes (A's ``2x − 1`` of them) taken back to [0, 1]."""
    decoded_samples = (vae_pixels.double() + 1) / 2  # (B, 3, H, W) in [0, 1]
    e = system.unclip.encode_image(decoded_samples.float()).double()
    ac0 = system.unclip.noise_alphas_cumprod[0].double()
    n = torch.randn(e.shape, generator=torch.Generator().manual_seed(seed)).double()
    batch = e.shape[0]
    return torch.cat([ac0.sqrt() * e + (1 - ac0).sqrt() * n, torch.ones(batch, D // 2, dtype=torch.float64),
                      torch.zeros(batch, D // 2, dtype=torch.float64)], 1)


def _run(system, monkeypatch, tmp_path, upscaler: str):
    """run_generate txt2img 32 x 32 + hires x2 (2 steps each, CFG 3) on ``system``: (class labels of every UNet call,
    the pixels the hires pass's VAE encoded)."""
    import sdadapt.jobs.generate as generate_job
    from sdadapt.jobs import run_generate

    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: system)
    encoded = []
    original_encode = system.encode_images

    def encode(pixels):
        encoded.append(pixels.detach().clone())
        return original_encode(pixels)

    monkeypatch.setattr(system, "encode_images", encode)
    seen = spy_class_labels(system.unet)
    try:
        run_generate(model="unclip", prompt="a", out=tmp_path / "o.png", steps=2, seed=9, width=32, height=32,
                     guidance=3.0, sampler="euler", hires_scale=2.0, hires_steps=2, hires_denoising=0.6,
                     hires_upscaler=upscaler)
    finally:
        del system.unet.forward
    return seen, encoded


def test_pixel_upscaler_hires_pass_is_conditioned_on_a1111s_decoded_samples(system, monkeypatch, tmp_path):
    """First pass: zeros in both branches. Hires pass (pixel-lanczos): the conditional branch's class input is the
    embedding of the upscaled first pass as A1111 hands it ([0, 1] pixels), the unconditional zeros; after the run
    the system holds no unCLIP image (it is the run's)."""
    system.unclip_image = None
    seen, encoded = _run(system, monkeypatch, tmp_path, "pixel-lanczos")
    (pixels,) = encoded
    assert pixels.shape == (1, 3, 64, 64) and float(pixels.min()) >= -1.0
    want = _a1111_class_input(system, pixels, seed=9)
    first = [labels for labels in seen if labels.shape[0] == 2 and not labels.any()]
    assert len(first) == 2 and len(seen) == 4  # (Euler: one call per step, cond and uncond in one batch)
    for labels in seen[2:]:
        uncond, cond = labels.chunk(2)
        assert torch.equal(uncond, torch.zeros_like(uncond))
        torch.testing.assert_close(cond.double(), want, rtol=0, atol=1e-5)
    # (not the [-1, 1] pixels' embedding, which img2img hands over: A1111's hires pass differs from its img2img)
    other = _a1111_class_input(system, pixels * 2 - 1, seed=9)
    assert (other - want).abs().max() > 1e-3
    assert system.unclip_image is None


def test_latent_upscaler_hires_pass_stays_on_zeros(system, monkeypatch, tmp_path):
    system.unclip_image = None
    seen, encoded = _run(system, monkeypatch, tmp_path, "latent")
    assert not encoded and len(seen) == 4
    assert all(not labels.any() for labels in seen)


def test_sample_image_scopes_the_hires_image_and_keeps_a_users_image(system):
    """A Python user's own ``system.unclip_image`` conditions the first pass, the hires pass's own image the second,
    and the user's is back afterwards (also after an exception inside the scope)."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.unclip import unclip_image_scope

    mine = torch.randn(1, 2 * D, generator=torch.Generator().manual_seed(4))
    system.unclip_image = mine
    seen = spy_class_labels(system.unet)
    try:
        options = {"seed": 2, "steps": 1, "guidance": 3.0, "sampler": "euler", "negative": "", "height": 32,
                   "width": 32}
        sample_image(system, ["a"], options, hires=HiresRequest((64, 64), steps=1, denoising=0.5,
                                                                upscaler="pixel-lanczos"))
        assert system.unclip_image is mine
        first_cond, hires_cond = seen[0].chunk(2)[1], seen[-1].chunk(2)[1]
        torch.testing.assert_close(first_cond, mine)
        assert (hires_cond - mine).abs().max() > 1e-3
        with pytest.raises(RuntimeError), unclip_image_scope(system, torch.zeros(1, 2 * D)):
            assert not system.unclip_image.any()
            raise RuntimeError
        assert system.unclip_image is mine
    finally:
        del system.unet.forward
        system.unclip_image = None
