"""``generate``'s A1111 extras around img2img and the hires fix: --resize-mode, --img2img-fix-steps,
--hires-prompt / --hires-negative (hr_prompt, hr_negative_prompt) and --hires-sampler (hr_sampler_name)."""

from __future__ import annotations

import pytest
import torch

from sdadapt import samplers


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tests.test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_hires"), prediction_type="epsilon")


@pytest.fixture()
def spy(monkeypatch):
    """Every sample_latents call: (sampler, num_steps, start, cond, uncond)."""
    seen, real = [], samplers.sample_latents

    def record(model, x_T, cond, **kw):
        seen.append((kw["sampler"], kw["num_steps"], kw.get("start"), cond, kw.get("uncond")))
        return real(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", record)
    return seen


def test_hires_prompt_negative_and_sampler_shape_only_the_second_pass(tiny_sd, spy):
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    options = {"seed": 3, "steps": 5, "guidance": 2.0, "sampler": "euler", "negative": "blurry"}
    hires = HiresRequest((48, 48), steps=4, denoising=0.5, prompt="a castle at night", negative="daylight",
                         sampler="dpm_fast")
    sample_image(system, ["a photo"], options, hires=hires)
    (s1, n1, start1, cond1, uncond1), (s2, n2, start2, cond2, uncond2) = spy

    def encode(text):
        return system.condition(system.tokenize([text]))

    assert (s1, n1, start1) == ("euler", 5, None)
    assert torch.equal(cond1, encode("a photo")) and torch.equal(uncond1, encode("blurry"))
    # A1111's hires pass: hr_sampler_name with the fix-steps rule (4 of int(4 / 0.5) = 8), hr_prompt, hr_negative
    assert s2 == "dpm_fast" and n2 == 8 and start2.index == 8 - 3 - 1
    assert torch.equal(cond2, encode("a castle at night")) and torch.equal(uncond2, encode("daylight"))


def test_hires_prompt_with_prompt_editing_is_planned_for_the_hires_steps(tiny_sd, monkeypatch):
    from sdadapt.jobs import generate_hires
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_guidance import plan_prompt

    import sdadapt.sampling

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    plans, real_generate = [], sdadapt.sampling.generate

    def record(system, prompts, **kw):
        plans.append((prompts, kw.get("plan"), kw.get("negative")))
        return real_generate(system, prompts, **kw)

    monkeypatch.setattr(sdadapt.sampling, "generate", record)

    def plan_for(steps):
        return plan_prompt("a [cat:dog:0.5]", "", steps=steps)

    hires = generate_hires.HiresRequest((48, 48), steps=4, denoising=0.5, prompt="a [cat:dog:0.5]")
    generate_hires.sample_image(system, ["a photo"], {"seed": 1, "steps": 3, "sampler": "euler", "negative": ""},
                                hires=hires, plan_for=plan_for)
    (p1, plan1, _), (p2, plan2, _) = plans
    assert p1 == ["a photo"] and plan1 is None
    assert plan2 is not None and plan2.texts == plan_for(4).texts  # (the hires prompt's schedule, for its 4 steps)


def test_img2img_fix_steps_runs_exactly_steps_on_a_longer_grid(tiny_sd, tmp_path, spy):
    from sdadapt.images import write_png
    from sdadapt.jobs import run_generate

    write_png(tmp_path / "init.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    run_generate(model=str(tiny_sd), prompt="a photo", out=tmp_path / "out.png", steps=6, sampler="euler", seed=3,
                 guidance=2.0, init_image=tmp_path / "init.png", denoising_strength=0.4, img2img_fix_steps=True)
    (_, total, start, _, _), = spy
    # A1111's setup_img2img_steps with img2img_fix_steps: steps = int(6 / 0.4) = 15, t_enc = 6 - 1
    assert total == 15 and start.index == 15 - 5 - 1


@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_cli_resize_mode_reaches_the_init_latents(tiny_sd, tmp_path, spy, mode):
    from sdadapt.cli import main
    import numpy as np
    from PIL import Image

    from sdadapt.images import write_png
    from sdadapt.jobs.models import load_system
    from test_img2img_resize import _a1111_resize_image

    write_png(tmp_path / "init.png", torch.rand(3, 20, 44, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--quiet", "--out", str(tmp_path / "o.png"), "--init-image", str(tmp_path / "init.png"),
                 "--resize-mode", mode]) == 0
    system = load_system(str(tiny_sd))
    size = system.image_size
    theirs = _a1111_resize_image({"crop": 1, "fill": 2}[mode], Image.open(tmp_path / "init.png").convert("RGB"),
                                 size, size)  # (A1111's resize_image on the 8-bit image)
    pixels = torch.from_numpy(np.asarray(theirs).astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    expected = system.encode_images(pixels[None])
    (_, _, start, _, _), = spy
    assert torch.equal(start.init[:1], expected)


def test_hires_text_options_need_a_hires_pass_and_an_img2img_sampler(tmp_path):
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="give --hires-scale"):
        run_generate(prompt="x", out=tmp_path / "a.png", hires_prompt="y")
    with pytest.raises(ValueError, match="--hires-sampler: .*'Euler CFG\\+\\+'"):
        run_generate(prompt="x", out=tmp_path / "a.png", hires_scale=2, hires_sampler="Euler CFG++")
    with pytest.raises(ValueError, match="--hires-sampler: give the sampler without its 'karras' grid"):
        run_generate(prompt="x", out=tmp_path / "a.png", hires_scale=2, hires_sampler="DPM++ 2M Karras")
    with pytest.raises(ValueError, match="--resize-mode must be one of just, crop, fill"):
        run_generate(prompt="x", out=tmp_path / "a.png", resize_mode="pad")


def test_cli_hires_sampler_takes_a1111s_label(tiny_sd, tmp_path, spy):
    from sdadapt.cli import main

    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a photo", "--steps", "4", "--sampler", "Euler a",
                 "--quiet", "--out", str(tmp_path / "o.png"), "--width", "16", "--height", "16", "--hires-scale", "2",
                 "--hires-sampler", "DPM++ 2M", "--hires-prompt", "a castle"]) == 0
    assert [call[0] for call in spy] == ["euler_a", "dpmsolver++"]
    # (diffusers' rule without --schedule, A1111's fixed hires steps: the last 4 of int(4 / 0.7) = 5)
    assert spy[1][2].index == 1 and spy[1][1] == 5


def test_hires_steps_reach_a_diffusers_rule_hires_sampler(tiny_sd, spy):
    """--hires-steps with a sampler on diffusers' rule (DDIM): the hires grid is built for the hires steps, not
    --steps (``img2img_steps or steps``), and diffusers' strength rule cuts it."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    options = {"seed": 3, "steps": 4, "guidance": 2.0, "sampler": "euler"}
    sample_image(system, ["a photo"], options, hires=HiresRequest((48, 48), steps=6, denoising=0.5, sampler="ddim"))
    (_, n1, _, _, _), (s2, n2, start2, _, _) = spy
    assert n1 == 4 and s2 == "ddim" and n2 == 12 and start2.index == 6  # (the last 6 of int(6 / 0.5) = 12)


def test_img2img_fix_steps_is_not_silently_ignored_on_a_diffusers_rule_sampler(tiny_sd, tmp_path, spy):
    from sdadapt.images import write_png
    from sdadapt.jobs import run_generate

    write_png(tmp_path / "init.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    calls = []
    try:
        run_generate(model=str(tiny_sd), prompt="a photo", out=tmp_path / "out.png", steps=6, sampler="ddim",
                     seed=3, guidance=2.0, init_image=tmp_path / "init.png", denoising_strength=0.4,
                     img2img_fix_steps=True)
    except ValueError as exc:  # refused, by name
        assert "--img2img-fix-steps" in str(exc)
        return
    (_, total, start, _, _), = spy
    from sdadapt.img2img import start_index

    calls.append(total - start_index(start, total, rule="diffusers"))
    assert calls == [6]  # A1111's rule: exactly --steps run


def test_check_hires_request_refuses_each_bad_field_by_its_option():
    from sdadapt.jobs.generate_hires import HiresRequest, check_hires_request

    good = HiresRequest((64, 64), steps=4, denoising=0.5)
    assert check_hires_request(good) is good
    for bad, flag in ((HiresRequest((64, 64), denoising=0.0), "--hires-denoising"),
                      (HiresRequest((64, 64), denoising=1.5), "--hires-denoising"),
                      (HiresRequest((64, 64), steps=-1), "--hires-steps"),
                      (HiresRequest((64, 64), upscaler="esrgan"), "--hires-upscaler"),
                      (HiresRequest((64, 64), sampler="Euler CFG++"), "--hires-sampler"),
                      (HiresRequest((4, 64)), "--hires-scale")):
        with pytest.raises(ValueError, match=flag):
            check_hires_request(bad)


def test_a_low_hires_strength_is_run_or_refused_by_name():
    from sdadapt.toy.system import load_toy

    from sdadapt.sampling import generate

    toy = load_toy()
    latents = generate(toy, ["a red circle"], sampler="euler", steps=4, seed=1, output="latents")
    try:
        generate_latents = generate(toy, ["a red circle"], sampler="euler", steps=4, seed=1, init_latents=latents,
                                    denoising_strength=0.003, img2img_steps=4, output="latents")
    except ValueError as exc:
        assert "strength" in str(exc) or "denoising" in str(exc)
        return
    assert generate_latents.shape == latents.shape


# (ddim there is A1111's DDIM, which A1111 runs on its timesteps whatever the schedule type: taken)
@pytest.mark.parametrize("grid", [{"schedule": "karras", "hires_sampler": "ddpm"},
                                  {"karras": True, "hires_sampler": "euler_a"}])
def test_a_hires_sampler_without_the_first_pass_grid_is_refused_before_sampling(tiny_sd, tmp_path, spy, grid):
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="--hires-sampler"):
        run_generate(model=str(tiny_sd), prompt="a photo", out=tmp_path / "o.png", steps=4, sampler="euler",
                     seed=3, width=16, height=16, hires_scale=2, **grid)
    assert spy == [] and not (tmp_path / "o.png").exists()


def test_schedule_settings_with_a_gridless_hires_sampler_are_refused_before_loading(tmp_path):
    """--sigma-min & co. shape A1111's σ grids; a hires sampler without one (ddim: its own steps) would meet them
    only at the second pass (sample_latents refuses schedule_options without a schedule): refused up front, before
    the model is read (the model file here does not exist); a hires sampler with a grid gets past the check."""
    from sdadapt.jobs import run_generate

    common = dict(model=str(tmp_path / "none.safetensors"), prompt="a photo", out=tmp_path / "o.png", steps=4,
                  sampler="euler", seed=3, width=16, height=16, hires_scale=2, schedule="automatic", sigma_min=0.5)
    with pytest.raises(ValueError, match=r"--hires-sampler ddim runs on no σ grid.*--sigma-min"):
        run_generate(**common, hires_sampler="ddim")
    with pytest.raises(Exception) as caught:  # (the grid sampler passes the check and fails on the missing model)
        run_generate(**common, hires_sampler="euler_a")
    assert "σ grid" not in str(caught.value) and "none.safetensors" in str(caught.value)
