"""Generated sizes are multiples of 8, A1111's and diffusers' rule: SD1's UNet halves the latents three times, so
520 x 512 (latents 65 x 64) does not halve evenly — diffusers' UNet resizes each upsampler's output to its skip's
size before the convolution (``forward_upsample_size``), as ComfyUI and Forge do (A1111's ``TorchHijackForUnet``
resizes LDM's after it: the last row / column of each uneven level differs). sdadapt's sample runs the same UNet: it
equals diffusers' StableDiffusionPipeline at such sizes."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """A tiny SD folder whose VAE halves three times (factor 8, as SD's) and whose UNet halves once more."""
    from test_cli_train import _tiny_pipeline

    root = _tiny_pipeline(tmp_path_factory.mktemp("eight") / "pipe", prediction_type="epsilon")
    torch.manual_seed(1)
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    ).save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_a_size_of_eight_the_unet_does_not_halve_is_diffusers_pipelines(eight, sampler):
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system(str(eight), device=torch.device("cpu"))
    assert system.vae_factor == 8 and system.size_multiple == 16
    run = dict(seed=3, steps=4, guidance=5.0, sampler=sampler, negative="blurry", height=40, width=56)
    ours = generate(system, ["a photo"], output="latents", **run)
    assert ours.shape[-2:] == (5, 7)  # (5 and 7 latents: the UNet's one halving is uneven on both sides)
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    scheduler = (diffusers.DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
                 if sampler == "ddim" else diffusers.EulerDiscreteScheduler(**betas, timestep_spacing="linspace"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    call = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=40, width=56,
                generator=torch.Generator().manual_seed(3))
    theirs = pipe("a photo", output_type="latent", **call).images
    assert (ours - theirs).abs().max().item() < 1e-4
    image = generate(system, ["a photo"], **run)
    decoded = pipe("a photo", output_type="pt", **{**call, "generator": torch.Generator().manual_seed(3)}).images
    assert image.shape[-2:] == (40, 56) and (image / 2 + 0.5 - decoded).abs().max().item() < 1e-4


def test_a_side_that_is_no_multiple_of_eight_is_refused_naming_the_nearest(eight, tmp_path, monkeypatch):
    import sdadapt.jobs.generate as job

    monkeypatch.setattr(job, "load_system", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"image size 44x40: both sides must be multiples of 8 \(the nearest: 48x40\)"):
        job.run_generate(prompt="a", model=str(eight), out=tmp_path / "x.png", width=44, height=40, steps=1)


def test_a1111_upsampling_runs_the_models_unet_as_a1111s_cat(eight, tmp_path, monkeypatch):
    """`--a1111-upsampling` at 56 x 40 (latents 7 x 5, halved unevenly): the PNG is the one A1111's own
    ``TorchHijackForUnet`` (transcribed in tests/test_a1111_upsampling.py) makes of the same UNet, called as LDM's is
    (no ``output_size``) — another image than diffusers' order; at 64 x 64 the same image; the hooks off after."""
    import numpy as np
    from diffusers.models.unets import unet_2d_blocks
    from PIL import Image
    from test_a1111_upsampling import TorchHijackForUnet

    import sdadapt.jobs.generate as job
    from sdadapt.cli import main

    systems, real_load = [], job.load_system

    def held(*args, **kwargs):
        systems.append(real_load(*args, **kwargs))
        return systems[-1]

    monkeypatch.setattr(job, "load_system", held)

    def run(name, *extra, size=("56", "40")):
        assert main(["generate", "--model", str(eight), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                     "--seed", "5", "--quiet", "--out", str(tmp_path / name), "--width", size[0], "--height",
                     size[1], *extra]) == 0
        return np.asarray(Image.open(tmp_path / name))

    ours, plain = run("a1111.png", "--a1111-upsampling"), run("plain.png")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in systems[0].unet.modules())
    with monkeypatch.context() as patch:  # (A1111's cat on the blocks, LDM's calls of the upsamplers)
        patch.setattr(unet_2d_blocks, "torch", TorchHijackForUnet())
        real_held = held

        def as_ldm(*args, **kwargs):
            system = real_held(*args, **kwargs)
            system.unet.num_upsamplers = 0
            return system

        patch.setattr(job, "load_system", as_ldm)
        theirs = run("theirs.png")
    assert np.array_equal(ours, theirs) and not np.array_equal(ours, plain)
    assert np.array_equal(run("even.png", "--a1111-upsampling", size=("64", "64")),
                          run("even-plain.png", size=("64", "64")))
