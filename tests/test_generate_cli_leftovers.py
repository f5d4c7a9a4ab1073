"""generate's leftovers (brief T3): refusals that came after the model load (or the hires fix's first pass) now
come from the options alone, a refused ``--subseed -1`` says no drawn seed first, and the step-ranged tag LoRA's
UNet groups are returned rather than appended to an argument. Each test fails on the behaviour before its fix."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdadapt.cli import main


def _never_loaded(monkeypatch):
    import sdadapt.jobs.generate as job

    monkeypatch.setattr(job, "load_system", lambda *a, **k: pytest.fail("the model was loaded"))
    return job


@pytest.fixture()
def init_png(tmp_path):
    from PIL import Image

    path = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


# ------------------------------------------------------------------ DPM fast / adaptive img2img at t_enc = 0
def _a1111_t_enc(steps: int, strength: float, fixed: int | None) -> tuple[int, int]:
    """A1111's ``setup_img2img_steps`` (modules/sd_samplers_common.py), transcribed: ``(steps, t_enc)``."""
    if fixed is not None:  # (opts.img2img_fix_steps, or the hires pass's steps=)
        return (int(fixed / min(strength, 0.999)) if strength > 0 else 0), fixed - 1
    return steps, int(min(strength, 0.999) * steps)


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive", "euler", "ddim", "dpmpp_2m"])
def test_the_option_check_refuses_exactly_a1111s_t_enc_0_for_dpm_fast_and_adaptive(sampler):
    """Over steps 1..40 and many strengths, with and without fixed steps: refused iff A1111's t_enc is 0 (DPM fast /
    adaptive) or fixed steps leave no grid (any sampler); the strength or steps the message offers then pass."""
    import re

    from sdadapt.jobs.generate_hires import check_img2img_pass

    strengths = [0.0, 0.01, 0.0333, 1 / 30, 0.04, 0.05, 0.1, 0.2499, 0.25, 0.3, 0.5, 0.75, 0.999, 1.0]
    refused = 0
    for steps, strength, fix in itertools.product(range(1, 41), strengths, (False, True)):
        fixed = steps if fix else None
        total, t_enc = _a1111_t_enc(steps, strength, fixed)
        should = total < 1 or (sampler in ("dpm_fast", "dpm_adaptive") and t_enc == 0)
        try:
            check_img2img_pass(sampler, steps=steps, strength=strength, fixed_steps=fixed)
        except ValueError as exc:
            assert should, (steps, strength, fixed, str(exc))
            refused += 1
            offered = re.search(r"use --denoising-strength ([0-9.]+) or more", str(exc))
            if offered:  # (the least strength it names runs a step)
                check_img2img_pass(sampler, steps=steps, strength=float(offered.group(1)), fixed_steps=fixed)
            elif total >= 1:
                check_img2img_pass(sampler, steps=2, strength=max(strength, 0.5), fixed_steps=2 if fix else None)
        else:
            assert not should, (steps, strength, fixed)
    assert refused > 0


@pytest.mark.parametrize(("steps", "strength", "fixed"), [(4, 0.2, None), (4, 0.25, None), (1, 1.0, None),
                                                         (4, 0.5, 1), (4, 0.5, 2), (4, 0.0, 4)])
def test_the_option_check_agrees_with_the_sampler_it_stands_in_for(steps, strength, fixed):
    """The same request through sdadapt.sampling.generate (the sampler's own refusal, on the toy): refused by both
    or by neither."""
    from sdadapt.jobs.generate_hires import check_img2img_pass
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system("toy", device=torch.device("cpu"))
    init = system.encode_images(torch.zeros(1, 3, 32, 32))
    try:
        check_img2img_pass("dpm_fast", steps=steps, strength=strength, fixed_steps=fixed)
        early = None
    except ValueError as exc:
        early = exc
    try:
        generate(system, ["a red circle"], sampler="dpm_fast", steps=steps, seed=0, init_latents=init,
                 denoising_strength=strength, img2img_steps=fixed)
        late = None
    except ValueError as exc:
        late = exc
    assert (early is None) == (late is None), (early, late)


def test_generate_refuses_dpm_fast_img2img_at_t_enc_0_before_loading_the_model(tmp_path, init_png, monkeypatch,
                                                                               capsys):
    _never_loaded(monkeypatch)
    code = main(["generate", "--prompt", "a red circle", "--init-image", str(init_png), "--sampler", "DPM fast",
                 "--denoising-strength", "0.03", "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("--sampler dpm_fast: img2img with --denoising-strength 0.03 and --steps 25" in err
            and "use --denoising-strength 0.04 or more" in err), err


@pytest.mark.parametrize(("extra", "words"), [
    (["--hires-steps", "1", "--hires-sampler", "DPM adaptive"], "--hires-sampler dpm_adaptive: img2img with "
                                                               "--hires-steps 1 run exactly"),
    (["--steps", "1", "--sampler", "dpm_fast"], "--sampler dpm_fast: img2img with --steps 1 run exactly"),
])
def test_generate_refuses_a_hires_pass_at_t_enc_0_before_loading_the_model(tmp_path, monkeypatch, extra, words):
    """The hires pass runs A1111's fixed steps (hr_second_pass_steps or steps): one step is t_enc = 0. Refused
    before the load, where it was refused after the first pass."""
    job = _never_loaded(monkeypatch)
    options = dict(zip(extra[::2], extra[1::2]))
    with pytest.raises(ValueError, match=words):
        job.run_generate(prompt="a castle", out=tmp_path / "x.png", hires_scale=2.0,
                         hires_steps=int(options.get("--hires-steps", 0)), steps=int(options.get("--steps", 25)),
                         sampler=options.get("--sampler", "euler"), hires_sampler=options.get("--hires-sampler"))


def test_fixed_steps_at_strength_0_are_refused_before_loading(tmp_path, init_png, monkeypatch):
    job = _never_loaded(monkeypatch)
    with pytest.raises(ValueError, match="--denoising-strength 0 with a fixed step count"):
        job.run_generate(prompt="a", out=tmp_path / "x.png", init_image=init_png, denoising_strength=0.0,
                         img2img_fix_steps=True, steps=3)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize(("fixed", "strength"), [(50, 0.01), (50, 0.05), (50, 0.0501), (10, 0.0099), (10, 0.01)])
def test_a_fixed_step_grid_too_long_is_refused_by_the_samplings_rule_before_the_first_pass(fixed, strength, sampler):
    """The hires pass's grid int(N / strength) checked once the model's T is known, before sampling: refused
    exactly when sdadapt.sampling's own check refuses it (which ran after the first pass); never for Euler, whose
    σ grid takes any length (A1111's k-diffusion samplers)."""
    from types import SimpleNamespace

    from sdadapt.jobs.generate import _check_img2img_passes, _check_step_counts
    from sdadapt.sampling import _img2img_request

    grids = _check_img2img_passes(sampler, steps=25, init_image=None, denoising_strength=0.75, fix_steps=False,
                                  hires=True, hires_sampler=None, hires_steps=fixed, hires_denoising=strength)
    system = SimpleNamespace(alphas_cumprod=torch.zeros(1000))
    try:
        _check_step_counts(system, steps=25, hires_steps=fixed, fixed_grids=grids)
        early = None
    except ValueError as exc:
        early = exc
    try:
        _img2img_request(sampler, torch.zeros(1, 4, 2, 2), 1, 25, strength, fixed, num_train_steps=1000)
        late = None
    except ValueError as exc:
        late = exc
    assert (early is None) == (late is None), (early, late)
    assert (early is None) == (sampler == "euler" or int(fixed / strength) <= 1000), early
    if early is not None:
        assert "--hires-denoising" in str(early)


# ------------------------------------------------------------------ --subseed -1 refused before a seed is said
@pytest.mark.parametrize("extra", [["--subseed", "-1"], ["--seed", "-1", "--ensd", "31337"],
                                   ["--seed", "-1", "--subseed", "-1", "--subseed-strength", "0.5"]])
def test_subseed_options_without_noise_are_refused_before_any_seed_is_drawn_or_said(tmp_path, monkeypatch, capsys,
                                                                                    extra):
    import random

    _never_loaded(monkeypatch)
    monkeypatch.setattr(random, "randrange", lambda *a: pytest.fail("a seed was drawn"))
    with pytest.raises(SystemExit) as stop:  # (a usage error, as every only_with rule's)
        main(["generate", "--prompt", "a red circle", *extra, "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "drew" not in err, err
    assert "shapes A1111's noise, drawn only with --noise a1111 (or a1111-cpu)" in err, err


def test_the_library_says_a_drawn_seed_only_once_the_options_are_checked(tmp_path, monkeypatch):
    """run_generate (no option parser): the refusal first, no "drew" line; a request that passes says it, before
    the model loads."""
    job = _never_loaded(monkeypatch)
    lines: list[str] = []
    with pytest.raises(ValueError, match="add --noise a1111"):
        job.run_generate(prompt="a", out=tmp_path / "x.png", seed=-1, subseed=-1, log=lines.append)
    with pytest.raises(ValueError, match="--subseed/--subseed-strength"):
        job.run_generate(prompt="a", out=tmp_path / "x.png", seed=-1, noise="a1111", subseed=3, subseed_strength=2.0,
                         log=lines.append)
    assert not [line for line in lines if "drew" in line], lines

    class Loaded(Exception):
        pass

    monkeypatch.setattr(job, "load_system", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):
        job.run_generate(prompt="a", out=tmp_path / "x.png", seed=-1, noise="a1111", subseed=-1, log=lines.append)
    drawn = [line for line in lines if "drew" in line]
    assert [line.split(" -1:")[0] for line in drawn] == ["--seed", "--subseed"], lines


# ------------------------------------------------------------------ _apply_lora_parts returns the held UNet groups
def test_held_unet_groups_merged_by_hand_are_the_merged_file_bit_for_bit(tmp_path):
    """A step-ranged tag holds its UNet part back: the groups returned, merged in order, give the weights (and the
    report) of the file merged at once; before they are merged the UNet is the base model's."""
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.apply import apply_lora
    from sdadapt.formats.files import write_safetensors
    from sdadapt.jobs.generate import _apply_lora_file, _apply_lora_parts
    from sdadapt.jobs.models import load_system

    ckpt = tiny_sd1_file(tmp_path / "sd1.safetensors")
    g = torch.Generator().manual_seed(0)
    layers = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64, ()),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32, ()),
              "lora_unet_down_blocks_1_resnets_0_conv1": (64, 32, (3, 3)),
              "lora_unet_up_blocks_0_resnets_1_conv2": (64, 64, (3, 3))}
    state = {}
    for key, (out, inp, kernel) in layers.items():
        state[f"{key}.lora_down.weight"] = torch.randn(4, inp, *kernel, generator=g) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(out, 4, *((1, 1) if kernel else ()), generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(2.0)
    lora = write_safetensors(tmp_path / "style.safetensors", state, {})
    blocks = tuple(0.25 + i / 40 for i in range(26))  # (a group per block weight: several groups, in order)
    options = dict(unet_scale=0.6, option="<lora:style>", block_weights=blocks)

    held = load_system(str(ckpt), device="cpu")
    base_unet = {k: v.clone() for k, v in held.unet.state_dict().items()}
    report, groups = _apply_lora_parts(held, lora, 0.8, hold_unet=True, **options)
    assert len(groups) >= 3 and all(module is held.unet for module, _, _ in groups)
    assert all(torch.equal(v, base_unet[k]) for k, v in held.unet.state_dict().items())
    for module, part, scale in groups:
        apply_lora(module, part, scale=scale)
    merged = load_system(str(ckpt), device="cpu")
    assert _apply_lora_file(merged, lora, 0.8, **options) == report
    for name in ("unet", "text_encoder"):
        want, got = getattr(merged, name).state_dict(), getattr(held, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert not all(torch.equal(v, base_unet[k]) for k, v in merged.unet.state_dict().items())
    assert _apply_lora_parts(merged, lora, 0.8, **options)[1] == []  # (nothing held without hold_unet)


# ------------------------------------------------------------------ (review) the checks as run_generate runs them
@pytest.mark.parametrize(("options", "words"), [
    ({"img2img_fix_steps": True, "steps": 50, "denoising_strength": 0.01, "sampler": "ddim"},
     "--sampler ddim: 50 steps run exactly at --denoising-strength 0.01 need a grid of 5000 steps"),
    ({"hires_scale": 2.0, "hires_steps": 20, "hires_denoising": 0.01, "sampler": "unipc"},
     "--sampler unipc: 20 steps run exactly at --hires-denoising 0.01 need a grid of 2000 steps"),
    ({"hires_scale": 2.0, "hires_denoising": 0.02, "steps": 30, "sampler": "ddim"},
     "--sampler ddim: 30 steps run exactly at --hires-denoising 0.02 need a grid of 1500 steps"),
])
def test_run_generate_refuses_a_fixed_step_grid_longer_than_the_models_right_after_the_load(tmp_path, init_png,
                                                                                          monkeypatch, options,
                                                                                          words):
    """The grid int(N / strength) of --img2img-fix-steps' pass and of the hires pass, against the loaded model's T
    (a stand-in with 1000 timesteps), on samplers that step the model's timesteps (k-diffusion's build any
    length): refused by run_generate before anything else runs on the model."""
    from types import SimpleNamespace

    import sdadapt.jobs.generate as job

    monkeypatch.setattr(job, "load_system", lambda *a, **k: SimpleNamespace(alphas_cumprod=torch.zeros(1000)))
    extra = {} if "hires_scale" in options else {"init_image": init_png}
    with pytest.raises(ValueError, match=words):
        job.run_generate(prompt="a", out=tmp_path / "x.png", **extra, **options)


@pytest.mark.parametrize("noise", ["a1111", "a1111-cpu"])
def test_the_a1111_noise_options_pass_the_parser_with_either_noise_source(tmp_path, monkeypatch, noise):
    """(review) The usage rule refuses the variation / resize / ENSD options only without --noise: with --noise a1111
    or a1111-cpu every one of them (typed at its default value or not) reaches run_generate as given."""
    from sdadapt import jobs

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"files": [], "seed": kwargs["seed"], "subseed": kwargs["subseed"]}

    monkeypatch.setattr(jobs, "run_generate", fake)
    argv = ["generate", "--prompt", "a", "--noise", noise, "--subseed", "-1", "--subseed-strength", "0.3",
            "--seed-resize-from", "512x768", "--ensd", "31337", "-o", str(tmp_path / "x.png")]
    assert main(argv) == 0
    assert (seen["noise"], seen["subseed"], seen["subseed_strength"], seen["seed_resize_from"], seen["ensd"]) == (
        noise, -1, 0.3, (768, 512), 31337)
    assert main(["generate", "--prompt", "a", "--noise", noise, "--ensd", "0", "--subseed-strength", "0",
                 "-o", str(tmp_path / "x.png")]) == 0
    seen.clear()
    assert main(["generate", "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 0  # (none typed: the defaults)
    assert (seen["noise"], seen["subseed"], seen["subseed_strength"], seen["seed_resize_from"], seen["ensd"]) == (
        None, None, 0.0, None, 0)


@pytest.mark.parametrize(("steps", "strength", "fixed"), [(4, 0.2, None), (4, 0.25, None), (3, 0.5, 1)])
def test_the_option_check_agrees_with_dpm_adaptive_too(steps, strength, fixed):
    """(review) As for DPM fast: the request through sdadapt.sampling.generate with DPM adaptive (the sampler's own
    refusal, on the toy) is refused exactly when the option check refuses it."""
    from sdadapt.jobs.generate_hires import check_img2img_pass
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system("toy", device=torch.device("cpu"))
    init = system.encode_images(torch.zeros(1, 3, 32, 32))
    outcomes = []
    for run in (lambda: check_img2img_pass("dpm_adaptive", steps=steps, strength=strength, fixed_steps=fixed),
                lambda: generate(system, ["a red circle"], sampler="dpm_adaptive", steps=steps, seed=0,
                                 init_latents=init, denoising_strength=strength, img2img_steps=fixed)):
        try:
            run()
            outcomes.append(None)
        except ValueError as exc:
            outcomes.append(str(exc))
    assert (outcomes[0] is None) == (outcomes[1] is None), outcomes
