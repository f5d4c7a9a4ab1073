"""Review of this session's new code: cases its own tests left open, each killing a mutant that survived them.

* The txt2img hires pass with a latent upscaler, an inpainting model and ``--inpainting-mask-weight`` below 1 when the
  enlarged first pass is cropped to the hires size (A1111 ``modules/processing.py`` @ 0027ce1 ``sample_hr_pass``:
  ``truncate_x/y``): the image conditioning is cut as the latents are (``sdadapt.jobs.generate_hires.sample_image``;
  A1111 itself leaves it uncut there and fails), so the pass runs and its ``c_concat`` is the crop of A1111's
  ``inpainting_image_conditioning`` of the decoded upscale (tests/test_unclip_gaps.py's transcription).
* ``invert`` on an EDM model without ``--guidance``: the model card's scale (5 for the Euler scheduler inversion runs),
  as ``generate`` takes it, not the SD paper's 7.5 (a review fix).
* unCLIP img2img with ``--noise a1111``: image i's level-0 noise is the A1111 source's draw for its seed
  (``sdadapt.unclip.unclip_level0_noise``: CUDA's first draw after ``torch.manual_seed(seed)``, Philox), as the hires
  pass takes it — the documented choice where A1111's own img2img value is its session's (docs/clip-inversion.md).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_inpaint import _plain_sd_folder, inpainting_sd, inpainting_system  # noqa: F401  (shared fixtures)
from test_unclip_gaps import (  # noqa: F401
    _a1111_class_input,
    _a1111_decode_first_stage,
    _png,
    _spy_upscaled,
    h_file,
    h_system,
)
from test_unclip_single_file import D, spy_class_labels


def test_latent_hires_crop_cuts_the_inpainting_conditioning_as_the_latents(inpainting_system, monkeypatch):  # noqa: F811
    from sdadapt.jobs.generate_hires import (
        HiresRequest,
        crop_hires_latents,
        sample_image,
    )

    system = inpainting_system
    upscaled = _spy_upscaled(monkeypatch)
    seen = []
    handle = system.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:  # (32x32 enlarged to 64x64, cropped to 64 high x 48 wide: 16 px of columns off)
        image = sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler",
                                                   "negative": "", "height": 32, "width": 32},
                             hires=HiresRequest((64, 48), steps=2, denoising=0.5, upscaler="latent", upscale_to=(64, 64)),
                             inpainting_mask_weight=0.5)
    finally:
        handle.remove()
    assert tuple(image.shape[-2:]) == (64, 48)
    (samples,) = upscaled
    source = _a1111_decode_first_stage(system, samples)  # (B, 3, 64, 64)
    with torch.no_grad():
        latents = system.vae.encode(source * 0.5).latent_dist.mean * system.scaling_factor  # lerp(x, 0, 0.5)
    full = torch.cat([torch.ones(1, 1, *latents.shape[-2:]), latents], dim=1)  # (1, 5, 64/f, 64/f)
    f = int(system.vae_factor)  # (the tiny VAE's factor)
    theirs = crop_hires_latents(full, upscale_to=(64, 64), size=(64, 48), factor=f)
    t_x = 16 // f
    assert tuple(theirs.shape[-2:]) == (64 // f, 48 // f) and t_x > 0
    torch.testing.assert_close(theirs, full[..., :, t_x // 2:64 // f - (t_x + 1) // 2], rtol=0, atol=0)
    hires_calls = [x for x in seen if tuple(x.shape[-2:]) == (64 // f, 48 // f)]
    assert len(hires_calls) == 2
    for x in hires_calls:
        for half in x.chunk(x.shape[0]):
            torch.testing.assert_close(half[:, 4:], theirs, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ invert's guidance default on an EDM model
def test_invert_without_guidance_takes_an_edm_models_card_scale_and_says_so(tmp_path, capsys, monkeypatch):
    """``invert`` on a Playground-like model without ``--guidance``: the model card's scale for the Euler scheduler
    the inversion runs (5: ``edm_default_guidance("euler")``, what ``generate --sampler euler`` takes there), the same
    files as ``--guidance 5`` and not the SD paper's 7.5 that it used before; a note says so. (The toy keeps 7.5.)"""
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.inversion import job, load_inversion

    system = _small_playground_system(tmp_path)
    real_load = job.load_model
    monkeypatch.setattr(job, "load_model", lambda model, **k: system if model == "pg" else real_load(model, **k))
    source = tmp_path / "in.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
                    ).save(source)
    # (ddim: negative-prompt inversion's guided step is the conditional one at any scale on SDXL too, pooled included)
    common = ["invert", str(source), "--prompt", "a red cube", "--model", "pg", "--steps", "2",
              "--method", "ddim"]
    assert main([*common, "-o", str(tmp_path / "default.png")]) == 0
    assert "guidance 5, the EDM model's model card default" in capsys.readouterr().err
    assert main([*common, "--guidance", "5", "-o", str(tmp_path / "five.png")]) == 0
    assert main([*common, "--guidance", "7.5", "-o", str(tmp_path / "sd.png")]) == 0
    assert "model card" not in capsys.readouterr().err
    assert load_inversion(tmp_path / "default.safetensors").guidance == 5.0
    png = {name: (tmp_path / f"{name}.png").read_bytes() for name in ("default", "five", "sd")}
    assert png["default"] == png["five"] and png["default"] != png["sd"]
    toy = job.run_invert(source, prompt="a red cube", out=tmp_path / "toy.png", method="ddim", steps=2)
    assert toy["guidance"] == 7.5 and toy["guidance_note"] is None


def _small_playground_system(tmp_path):
    """tests/test_playground_edm.py's Playground-like file as a diffusers folder with a 16 px UNet sample size (as
    tests/test_edm_inversion.py's CLI test: the file's own 256 px make an inversion minutes long), loaded."""
    import json

    from test_playground_edm import playground_files

    from sdadapt.diffusers_system import DiffusersSystem

    pg, _ = playground_files(tmp_path)
    folder = tmp_path / "pg"
    DiffusersSystem.from_single_file(pg).save_model(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 8}))
    system = DiffusersSystem.from_folder(folder)
    assert system.edm is not None and system.image_size == 16
    return system


# ------------------------------------------------------------------ unCLIP img2img's level-0 noise with --noise a1111
def test_unclip_img2img_with_a1111_noise_draws_each_images_philox_row(h_system, tmp_path, monkeypatch):  # noqa: F811
    import numpy as np

    import sdadapt.jobs.generate as generate_job
    from sdadapt.jobs import run_generate
    from sdadapt.resize_modes import init_image_pixels
    from sdadapt.samplers.a1111_noise import philox_randn

    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: h_system)
    init = _png(tmp_path / "init.png", np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    seen = spy_class_labels(h_system.unet)
    try:
        run_generate(model="unclip", prompt="a", out=tmp_path / "o.png", steps=1, seed=11, width=32, height=32,
                     guidance=3.0, sampler="euler", init_image=init, denoising_strength=1.0, count=2, noise="a1111")
    finally:
        del h_system.unet.forward
    pixels = init_image_pixels(init, (32, 32), mode="just")[None]
    conds = [labels.chunk(2)[1] for labels in seen]
    assert len(conds) == 2
    for i, cond in enumerate(conds):
        want = _a1111_class_input(h_system, pixels, philox_randn(11 + i, (1, D)))
        torch.testing.assert_close(cond.double(), want, rtol=0, atol=1e-5)
        cpu = _a1111_class_input(h_system, pixels, torch.randn(1, D, generator=torch.Generator().manual_seed(11 + i)))
        assert (cond.double() - cpu).abs().max() > 1e-5  # (not sdadapt's own CPU draw of a run without --noise)
