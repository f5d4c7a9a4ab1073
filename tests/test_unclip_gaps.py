"""SD 2.1 unCLIP loose ends: the level-0 noise per image, a diffusers-named first merge input, ``--clip-stats`` on an
unCLIP-H model, and the txt2img hires pass with a latent upscaler at an inpainting mask weight below 1.

References (transcribed below, not imported):

* A AUTOMATIC1111/stable-diffusion-webui ``modules/processing.py`` @ 0027ce1f6e58: ``unclip_image_conditioning``
  (embedder, then ``noise_augmentor(c_adm, noise_level=0)``, ``cat``), ``inpainting_image_conditioning`` (no mask:
  ones; ``lerp(x, x·(1 − mask), inpainting_mask_weight)`` encoded; the mask resized to the latents), and
  ``StableDiffusionProcessingTxt2Img.sample_hr_pass``: with a latent upscaler and ``inpainting_mask_weight < 1``,
  ``img2img_image_conditioning(decode_first_stage(sd_model, samples), samples)`` of the upscaled latents.
* A ``modules/rng.py``: ``ImageRNG.first`` → ``randn(seed, …)`` → ``manual_seed(seed)`` = ``torch.manual_seed`` (GPU
  and CPU sources): the global CUDA generator is left seeded with the batch's last seed.
* stablediffusion ``ldm/modules/encoders/modules.py:341`` ``CLIPEmbeddingNoiseAugmentation.forward`` → ``q_sample``
  (``ldm/modules/diffusionmodules/upscaling.py:44``): ``torch.randn_like(x_start)`` — one row per batch item, from
  the global generator on the embedding's device.

The tiny random unCLIP files are tests/test_unclip_single_file.py's ``stability_file``; the tiny inpainting model is
tests/test_inpaint.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_inpaint import _plain_sd_folder, inpainting_sd, inpainting_system  # noqa: F401  (shared fixtures)
from test_unclip_single_file import D, spy_class_labels, stability_file

from sdadapt.formats.files import read_weights, write_safetensors


@pytest.fixture(scope="module")
def h_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("unclip-gaps") / "sd21-unclip-h.safetensors"
    write_safetensors(path, stability_file("h", 0), {})
    return path


@pytest.fixture(scope="module")
def h_system(h_file):
    from sdadapt.jobs.models import load_system

    return load_system(str(h_file))


def _a1111_class_input(system, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """float64 ``unclip_image_conditioning`` of ``pixels`` (B, 3, H, W) with the augmentation noise ``noise`` (B, D):
    [√ᾱ₀·e + √(1 − ᾱ₀)·n ‖ cos 0 ‖ sin 0] (H: identity stats; LDM's Timestep embedding of level 0)."""
    e = system.unclip.encode_image(pixels.float()).double()
    ac0 = system.unclip.noise_alphas_cumprod[0].double()
    batch = e.shape[0]
    return torch.cat([ac0.sqrt() * e + (1 - ac0).sqrt() * noise.double(), torch.ones(batch, D // 2, dtype=torch.float64),
                      torch.zeros(batch, D // 2, dtype=torch.float64)], 1)


def _png(path, pixels: np.ndarray):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------- 1. the level-0 noise per image
def test_each_image_of_a_count_run_draws_its_level0_noise_from_its_own_seed(h_system, tmp_path, monkeypatch):
    """img2img on unCLIP-H, ``count=3`` from seed 5: image i's class input is the init image's embedding with the noise
    of seed 5 + i (the seed its infotext gives), so it is made again from that seed alone; each image has its own
    row, as A1111's ``randn_like`` gives every batch item its own. (Before: every image took seed 5's row.)"""
    import sdadapt.jobs.generate as generate_job
    from sdadapt.jobs import run_generate
    from sdadapt.resize_modes import init_image_pixels

    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: h_system)
    init = _png(tmp_path / "init.png", np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    seen = spy_class_labels(h_system.unet)
    try:
        run_generate(model="unclip", prompt="a", out=tmp_path / "o.png", steps=1, seed=5, width=32, height=32,
                     guidance=3.0, sampler="euler", init_image=init, denoising_strength=1.0, count=3)
    finally:
        del h_system.unet.forward
    pixels = init_image_pixels(init, (32, 32), mode="just")[None]
    conds = [labels.chunk(2)[1] for labels in seen]
    assert len(conds) == 3  # (one Euler step per image)
    for i, cond in enumerate(conds):
        noise = torch.randn(1, D, generator=torch.Generator().manual_seed(5 + i))
        torch.testing.assert_close(cond.double(), _a1111_class_input(h_system, pixels, noise), rtol=0, atol=1e-5)
    assert (conds[1] - conds[0]).abs().max() > 1e-4 and (conds[2] - conds[1]).abs().max() > 1e-4
    assert h_system.unclip_image is None


def test_a1111_sources_draw_what_cuda_draws_after_manual_seed():
    """``unclip_level0_noise`` with an A1111 source is the first draw of CUDA's generator after
    ``torch.manual_seed(seed)`` (Philox; checked against a real GPU when there is one), the same for "nv" and "cpu"
    (A1111 seeds torch's global generator for both); without a source sdadapt's CPU generator."""
    from sdadapt.samplers.a1111_noise import philox_randn
    from sdadapt.unclip import unclip_level0_noise

    want = philox_randn(123, (2, D))
    assert torch.equal(unclip_level0_noise(123, (2, D), source="nv"), want)
    assert torch.equal(unclip_level0_noise(123, (2, D), source="cpu"), want)
    cpu = torch.randn(2, D, generator=torch.Generator().manual_seed(123))
    assert torch.equal(unclip_level0_noise(123, (2, D)), cpu) and not torch.allclose(cpu, want)
    with pytest.raises(ValueError, match="unknown noise source"):
        unclip_level0_noise(1, (1, D), source="gpu")
    if torch.cuda.is_available():  # (A1111's q_sample: torch.randn_like on CUDA after rng.randn's manual_seed)
        torch.manual_seed(123)
        cuda = torch.randn(2, D, device="cuda").cpu()
        torch.testing.assert_close(unclip_level0_noise(123, (2, D), source="nv"), cuda, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- 2. diffusers-named first merge input
@pytest.fixture(scope="module")
def merge_files(tmp_path_factory):
    from test_unclip_loose import _another, _plain_sd2

    from sdadapt.formats.model_keys import ldm_to_diffusers

    root = tmp_path_factory.mktemp("unclip-gaps-merge")
    h0 = stability_file("h", 0)
    states = {"h0": h0, "h1": _another(h0, 1), "l1": _another(stability_file("l", 0), 3)}
    states["plain1"] = _plain_sd2(states["h1"])
    out = {}
    for name, state in states.items():
        out[name] = root / f"{name}.safetensors"
        write_safetensors(out[name], state, {})
    out["h0-diffusers"] = root / "h0-diffusers.safetensors"  # (no marker, no noise augmentor: diffusers' layout)
    write_safetensors(out["h0-diffusers"], ldm_to_diffusers(h0), {})
    return out


def test_a_diffusers_named_first_input_gets_the_unclip_checks(merge_files, tmp_path):
    """With A diffusers-named: H with L is refused (before: merged without a word), H with H is noted and its
    image_encoder merged (the LDM merge's embedder in diffusers names), H with plain SD2 is noted as an unCLIP result
    with A's parts kept."""
    from sdadapt.formats.model_keys import ldm_to_diffusers
    from sdadapt.merge import MergeError, MergeStep, merge_file

    a = str(merge_files["h0-diffusers"])
    out = tmp_path / "hl.safetensors"
    with pytest.raises(MergeError, match=r"h0-diffusers\.safetensors is an SD 2\.1 unCLIP-H .* l1\.safetensors an "
                                         r"unCLIP-L"):
        merge_file(MergeStep("weighted-sum", (a, str(merge_files["l1"])), alpha=0.5), out)
    assert not out.exists()

    report = merge_file(MergeStep("weighted-sum", (a, str(merge_files["h1"])), alpha=0.5), tmp_path / "hh.safetensors")
    assert any("SD 2.1 unCLIP-H inputs: the image embedder (image_encoder.*) is merged" in n for n in report.notes)
    merge_file(MergeStep("weighted-sum", (str(merge_files["h0"]), str(merge_files["h1"])), alpha=0.5),
               tmp_path / "ldm.safetensors")
    got = read_weights(tmp_path / "hh.safetensors")[0]
    want = ldm_to_diffusers(read_weights(tmp_path / "ldm.safetensors")[0])
    encoder = [k for k in want if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(got[k], want[k]) for k in encoder)
    a_state = read_weights(a)[0]
    assert any(not torch.equal(got[k], a_state[k]) for k in encoder)  # (merged, not A's copied)

    report = merge_file(MergeStep("weighted-sum", (a, str(merge_files["plain1"])), alpha=0.5),
                        tmp_path / "hp.safetensors")
    note = next(n for n in report.notes if "plain SD2" in n)
    assert "h0-diffusers.safetensors is SD 2.1 unCLIP-H" in note and "unet.class_embedding.*, image_encoder.*" in note


# ------------------------------------------------------------------------------- 3. --clip-stats on unCLIP-H
def test_clip_stats_on_an_h_model_is_refused_naming_why(h_file, tmp_path):
    """H's noise augmentor has no CLIP stats (LDM config without clip_stats_path; diffusers' converter ignores one):
    refused for an H file (generate, convert) and an H folder (width ≠ 768); an L folder still takes them."""
    from sdadapt.jobs import run_generate
    from sdadapt.unclip import unclip_parts_from_folder

    stats = tmp_path / "ViT-L-14_stats.th"
    torch.save((torch.zeros(D), torch.ones(D)), stats)
    why = "unCLIP-H model, whose noise augmentor takes no CLIP stats"
    with pytest.raises(ValueError, match=why):
        run_generate(model=str(h_file), prompt="a", out=tmp_path / "o.png", steps=1, width=32, height=32,
                     clip_stats=stats)
    assert not (tmp_path / "o.png").exists()
    from sdadapt.jobs.convert_model import convert_model

    with pytest.raises(ValueError, match=why):
        convert_model(h_file, tmp_path / "folder", to="diffusers", clip_stats=stats)
    (tmp_path / "h").mkdir()
    torch.save((torch.zeros(1024), torch.ones(1024)), tmp_path / "h.th")
    with pytest.raises(ValueError, match=why):
        unclip_parts_from_folder(tmp_path / "h", dim=1024, clip_stats=tmp_path / "h.th")
    torch.save((torch.zeros(768), torch.ones(768) * 2), tmp_path / "l.th")
    parts = unclip_parts_from_folder(tmp_path / "h", dim=768, clip_stats=tmp_path / "l.th")
    assert torch.equal(parts.normalizer[1], torch.full((1, 768), 2.0))


# ------------------------------------------------------------------------------- 4. latent hires, mask weight < 1
def _spy_upscaled(monkeypatch) -> list:
    """Record the latent upscaler's output (A1111's ``samples`` after ``interpolate``)."""
    from sdadapt import img2img

    seen = []
    original = img2img.upscale_latents

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(img2img, "upscale_latents", spy)
    return seen


def _a1111_decode_first_stage(system, samples: torch.Tensor) -> torch.Tensor:
    """LDM ``decode_first_stage``: ``first_stage_model.decode(samples / scale_factor)``, not clamped."""
    with torch.no_grad():
        return system.vae.decode(samples / system.scaling_factor).sample.float()


def test_latent_hires_on_unclip_below_weight_1_is_conditioned_on_the_decoded_upscale(h_system, tmp_path, monkeypatch):
    """run_generate txt2img + hires (latent) at mask weight 0.5 with ``--noise a1111``: the first pass on zeros, the
    hires pass's conditional class input = A1111's ``unclip_image_conditioning(decode_first_stage(upscaled))``
    with the level-0 noise A1111 draws there (CUDA's first draw after ``torch.manual_seed(seed)``), the unconditional
    zeros. (Before: the weight without an init image was refused; at weight 1 the pass stays on zeros.)"""
    import sdadapt.jobs.generate as generate_job
    from sdadapt.jobs import run_generate
    from sdadapt.samplers.a1111_noise import philox_randn

    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: h_system)
    upscaled = _spy_upscaled(monkeypatch)
    seen = spy_class_labels(h_system.unet)
    try:
        run_generate(model="unclip", prompt="a", out=tmp_path / "o.png", steps=2, seed=9, width=32, height=32,
                     guidance=3.0, sampler="euler", hires_scale=2.0, hires_steps=2, hires_denoising=0.6,
                     hires_upscaler="latent", inpainting_mask_weight=0.5, noise="a1111")
    finally:
        del h_system.unet.forward
    (samples,) = upscaled
    decoded = _a1111_decode_first_stage(h_system, samples)
    want = _a1111_class_input(h_system, decoded, philox_randn(9, (1, D)))
    assert len(seen) == 4 and all(not labels.any() for labels in seen[:2])
    for labels in seen[2:]:
        uncond, cond = labels.chunk(2)
        assert not uncond.any()
        torch.testing.assert_close(cond.double(), want, rtol=0, atol=1e-5)
    clamped = _a1111_class_input(h_system, decoded.clamp(-1, 1), philox_randn(9, (1, D)))
    if (clamped - want).abs().max() > 1e-4:  # (the VAE's output as A1111 hands it over, not clamped)
        assert (seen[-1].chunk(2)[1].double() - clamped).abs().max() > 1e-5
    assert h_system.unclip_image is None


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_latent_hires_on_an_inpainting_model_below_weight_1_is_a1111s(inpainting_system, monkeypatch, weight):  # noqa: F811
    """The hires pass's c_concat (both halves of every call) = A1111's ``inpainting_image_conditioning`` of the
    decoded upscaled latents without a mask: ones, and ``lerp(x, 0, W) = x·(1 − W)`` encoded (the posterior mean, as
    sdadapt encodes), the mask resized to the latents. Not the grey image of weight 1."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    system = inpainting_system
    upscaled = _spy_upscaled(monkeypatch)
    seen = []
    handle = system.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler", "negative": "",
                                           "height": 32, "width": 32},
                     hires=HiresRequest((64, 64), steps=2, denoising=0.5, upscaler="latent"),
                     inpainting_mask_weight=weight)
    finally:
        handle.remove()
    (samples,) = upscaled
    source = _a1111_decode_first_stage(system, samples)
    mask = source.new_ones(1, 1, *source.shape[-2:])
    image = torch.lerp(source, source * (1.0 - mask), weight)
    with torch.no_grad():
        latents = system.vae.encode(image).latent_dist.mean * system.scaling_factor
    small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])
    theirs = torch.cat([small.expand(latents.shape[0], -1, -1, -1), latents], dim=1)
    hires_calls = [x for x in seen if tuple(x.shape[-2:]) == tuple(samples.shape[-2:])]
    assert len(hires_calls) == 2
    for x in hires_calls:
        for half in x.chunk(x.shape[0]):
            torch.testing.assert_close(half[:, 4:], theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        grey = system.encode_images(torch.zeros(1, 3, 64, 64))
    assert (theirs[:, 1:] - grey).abs().max() > 1e-3


def test_mask_weight_without_init_image_needs_the_hires_fix(tmp_path):
    """``--inpainting-mask-weight`` alone is still refused for plain txt2img (A1111's txt2img conditioning has no
    weight), now naming the hires fix as the other place it acts."""
    from sdadapt.jobs.generate_inpaint import check_inpaint_options

    options = {"mask": None, "init_image": None, "mask_blur": None, "invert_mask": False,
               "inpainting_fill": "original", "inpainting_mask_weight": 0.5}
    with pytest.raises(ValueError, match="--init-image or --hires-scale"):
        check_inpaint_options(**options)
    check_inpaint_options(**options, hires=True)
    with pytest.raises(ValueError):
        check_inpaint_options(**{**options, "inpainting_mask_weight": 1.5}, hires=True)


def test_pixel_hires_on_an_inpainting_model_below_weight_1_weighs_a1111s_decoded_samples(inpainting_system,  # noqa: F811
                                                                                       monkeypatch):
    """pixel-lanczos at weight 0.5: A1111's ``img2img_image_conditioning(decoded_samples, samples)`` with its
    ``decoded_samples`` in [0, 1] (the Lanczos pixels / 255), weighed ``x·(1 − W)`` and encoded as they are (the VAE
    reads them as [−1, 1]); not the [−1, 1] pixels the hires latents are encoded from."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    system = inpainting_system
    encoded = []
    original = system.encode_images

    def spy(images):
        encoded.append(images.detach().clone())
        return original(images)

    monkeypatch.setattr(system, "encode_images", spy)
    seen = []
    handle = system.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler", "negative": "",
                                           "height": 32, "width": 32},
                     hires=HiresRequest((64, 64), steps=2, denoising=0.5, upscaler="pixel-lanczos"),
                     inpainting_mask_weight=0.5)
    finally:
        handle.remove()
    pixels = next(e for e in encoded if e.shape[-1] == 64)  # (the hires start, after the first pass's grey: A1111's
    # images_tensor_to_samples does decoded_samples · 2 − 1)
    decoded_samples = (pixels + 1) / 2
    with torch.no_grad():
        latents = system.vae.encode(decoded_samples * 0.5).latent_dist.mean * system.scaling_factor
    theirs = torch.cat([torch.ones(1, 1, *latents.shape[-2:]), latents], dim=1)
    hires_calls = [x for x in seen if tuple(x.shape[-2:]) == tuple(latents.shape[-2:])]
    assert len(hires_calls) == 2
    for x in hires_calls:
        for half in x.chunk(x.shape[0]):
            torch.testing.assert_close(half[:, 4:], theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        other = system.vae.encode(pixels * 0.5).latent_dist.mean * system.scaling_factor
    assert (other - latents).abs().max() > 1e-3
