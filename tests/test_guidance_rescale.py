"""Guidance rescale ("CFG rescale", :mod:`sdadapt.guidance_rescale`): the formula against a float64 reference written
here and against diffusers' own ``rescale_noise_cfg``; diffusers' ``StableDiffusionPipeline(guidance_rescale=)`` against
``sdadapt.sampling.generate`` on diffusers' grid (ε and v models); A1111's "CFG Rescale" extension (its
``cfg_replace``, transcribed) against the guidance on A1111's grids, where it rescales x̂0; the prompt-plan path
against the plain one; and ``generate --guidance-rescale`` end to end: the infotext written and read back, ``AND``
refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.guidance_rescale import check_guidance_rescale, rescale_guidance
from sdadapt.training.diffusion import guided


def _reference(guided_out: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """The paper's rescale in float64, sample by sample, std written out (Bessel's correction, as torch.std)."""
    out = []
    for g, c in zip(guided_out.double(), cond.double()):
        def std(x):
            flat = x.flatten()
            return ((flat - flat.mean()) ** 2).sum().div(flat.numel() - 1).sqrt()

        out.append(phi * g * std(c) / std(g) + (1 - phi) * g)
    return torch.stack(out)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).filter(
    lambda s: int(np.prod(s)) > 1), phi=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_formula_is_the_papers_sample_by_sample(batch, shape, phi, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(batch, *shape, generator=g, dtype=dtype) * 3
    cond = torch.randn(batch, *shape, generator=g, dtype=dtype)
    got = rescale_guidance(out, cond, phi)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got.double(), _reference(out, cond, phi), rtol=tol, atol=tol)


def test_phi_0_is_the_guidance_itself_and_phi_1_takes_the_conditional_spread():
    g = torch.Generator().manual_seed(0)
    out, cond = torch.randn(2, 4, 3, 3, generator=g) * 5, torch.randn(2, 4, 3, 3, generator=g)
    assert rescale_guidance(out, cond, 0.0) is out
    full = rescale_guidance(out, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)
    # (the direction is the guidance's: a positive multiple of it per sample)
    ratio = full / out
    assert torch.allclose(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), rtol=1e-5)


@pytest.mark.parametrize("phi", [-0.1, 1.5, float("nan"), float("inf")])
def test_a_phi_outside_0_1_is_refused(phi):
    with pytest.raises(ValueError, match=r"guidance rescale is a blend in \[0, 1\]"):
        check_guidance_rescale(phi)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        guided(lambda x, t, c: x, torch.zeros(1, 2), torch.zeros(1, 2), 7.0, guidance_rescale=phi)


def _toy_model(x, t, cond):
    """A model whose two branches differ in spread: cond (B, 1, 1, 1) scales and shifts the input."""
    return x * (1 + cond) + cond.tanh() * t.float().reshape(-1, 1, 1, 1) / 1000


def test_the_outputs_path_is_diffusers_rescale_noise_cfg():
    diffusers_sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500])
    cond, uncond = torch.full((2, 1, 1, 1), 0.7), torch.full((2, 1, 1, 1), -0.2)
    ours = guided(_toy_model, cond, uncond, 7.5, guidance_rescale=0.7)(x, t)
    out_c, out_u = _toy_model(x, t, cond), _toy_model(x, t, uncond)
    combined = out_u + 7.5 * (out_c - out_u)  # (diffusers' pipeline)
    theirs = diffusers_sd.rescale_noise_cfg(combined, out_c, guidance_rescale=0.7)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, combined)  # (the rescale did something)


def _a1111_extension_cfg_replace(x_out, conds_list, uncond, cond_scale, fi):
    """CFG_Rescale_webui's ``cfg_replace`` (its replacement of A1111's ``CFGDenoiser.combine_denoised``), transcribed:
    ``x_out`` the branches' x̂0, the negatives last."""
    denoised_uncond = x_out[-uncond.shape[0]:]
    denoised = torch.clone(denoised_uncond)
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            if fi == 0:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
            else:
                xcfg = (denoised_uncond[i] + (x_out[cond_index] - denoised_uncond[i]) * (cond_scale * weight))
                xrescaled = xcfg * (torch.std(x_out[cond_index]) / torch.std(xcfg))
                denoised[i] = fi * xrescaled + (1.0 - fi) * xcfg
    return denoised


def test_on_a1111s_grids_it_is_the_a1111_extensions_rescale_of_the_denoised():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 300])
    cond, uncond = torch.full((2, 1, 1, 1), 0.4), torch.full((2, 1, 1, 1), -0.3)
    sigma = 1.7

    def read(out):  # (an ε model read to x̂0 at σ, as k-diffusion's CompVisDenoiser)
        return x * (sigma**2 + 1) ** 0.5 - sigma * out

    ours = guided(_toy_model, cond, uncond, 6.0, guidance_rescale=0.7).denoised_by_branch(read, x, t, sigma=sigma)
    x_out = torch.cat([read(_toy_model(x, t, cond)), read(_toy_model(x, t, uncond))])  # (conds, then uncond)
    theirs = _a1111_extension_cfg_replace(x_out, [[(0, 1.0)], [(1, 1.0)]], uncond, 6.0, 0.7)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (ours - theirs).abs().max()
    plain = guided(_toy_model, cond, uncond, 6.0).denoised_by_branch(read, x, t, sigma=sigma)
    assert torch.equal(plain, _a1111_extension_cfg_replace(x_out, [[(0, 1.0)], [(1, 1.0)]], uncond, 6.0, 0))
    assert not torch.allclose(ours, plain)
    # (x̂0's spread, not the outputs': not the outputs' rescale read to x̂0)
    on_outputs = read(guided(_toy_model, cond, uncond, 6.0, guidance_rescale=0.7)(x, t))
    assert not torch.allclose(ours, on_outputs, atol=1e-4)


def test_a_prompt_plans_guidance_is_the_plain_guidance_and_refuses_and():
    from sdadapt.prompt_guidance import plan_prompt

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 6, 6, generator=g), torch.tensor([700])
    conds = {"a cat": torch.full((1, 1, 1, 1), 0.5), "": torch.full((1, 1, 1, 1), -0.1)}
    plan = plan_prompt("a cat", "", steps=4)
    scheduled = plan.guidance(_toy_model, [conds["a cat"]], [conds[""]], 5.0, guidance_rescale=0.6)
    plain = guided(_toy_model, conds["a cat"], conds[""], 5.0, guidance_rescale=0.6)
    assert torch.equal(scheduled(x, t), plain(x, t))

    def read(out):
        return x - 0.5 * out

    assert torch.allclose(scheduled.denoised_by_branch(read, x, t, sigma=0.5),
                          plain.denoised_by_branch(read, x, t, sigma=0.5), rtol=0, atol=1e-6)
    weighted = plan_prompt("a cat:0.5", "", steps=4)  # (one sub-prompt of weight 0.5: the extension's xcfg)
    half = weighted.guidance(_toy_model, [conds["a cat"]], [conds[""]], 5.0, guidance_rescale=0.6)
    assert torch.allclose(half(x, t), guided(_toy_model, conds["a cat"], conds[""], 2.5, guidance_rescale=0.6)(x, t),
                          rtol=1e-6, atol=1e-6)
    both = plan_prompt("a cat AND a dog", "", steps=4)
    with pytest.raises(ValueError, match="2 AND sub-prompts"):
        both.guidance(_toy_model, [conds["a cat"], conds["a cat"]], [conds[""]], 5.0, guidance_rescale=0.6)
    assert both.guidance(_toy_model, [conds["a cat"], conds["a cat"]], [conds[""]], 5.0) is not None


# ---- in v: ComfyUI's / reForge's RescaleCFG ------------------------------------------------------------------------
def _comfyui_rescale_cfg(args, multiplier):
    """ComfyUI's ``RescaleCFG.patch``'s ``rescale_cfg`` (comfy_extras/nodes_model_advanced.py), transcribed: ``cond`` /
    ``uncond`` are ``input − x̂0`` of each branch, the result ``input − x̂0'``."""
    cond = args["cond"]
    uncond = args["uncond"]
    cond_scale = args["cond_scale"]
    sigma = args["sigma"]
    sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
    x_orig = args["input"]
    x = x_orig / (sigma * sigma + 1.0)
    cond = ((x - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
    uncond = ((x - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
    x_cfg = uncond + cond_scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_rescaled = x_cfg * (ro_pos / ro_cfg)
    x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
    return x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_in_v_it_is_comfyuis_rescale_cfg(prediction_type):
    from sdadapt.guidance_rescale import GuidanceRescale
    from sdadapt.samplers.sigma_space import denoised

    g = torch.Generator().manual_seed(4)
    x_sigma = torch.randn(2, 4, 8, 8, generator=g) * 3  # (k-diffusion's x at σ)
    sigma = torch.tensor([2.5, 2.5])
    x_in, t = x_sigma / (sigma[0] ** 2 + 1) ** 0.5, torch.tensor([600, 600])
    cond, uncond = torch.full((2, 1, 1, 1), 0.6), torch.full((2, 1, 1, 1), -0.4)

    def read(out):
        return denoised(out, x_sigma, sigma[0], prediction_type)

    ours = guided(_toy_model, cond, uncond, 7.0, guidance_rescale=GuidanceRescale(0.7, "v")).denoised_by_branch(
        read, x_in, t, sigma=sigma)
    d_c, d_u = read(_toy_model(x_in, t, cond)), read(_toy_model(x_in, t, uncond))
    args = {"cond": x_sigma - d_c, "uncond": x_sigma - d_u, "cond_scale": 7.0, "sigma": sigma, "input": x_sigma}
    theirs = x_sigma - _comfyui_rescale_cfg(args, 0.7)  # (ComfyUI's cfg_result: the denoised)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
    combined = guided(_toy_model, cond, uncond, 7.0, guidance_rescale=0.7).denoised_by_branch(read, x_in, t,
                                                                                              sigma=sigma)
    assert (ours - combined).abs().max() > 1e-2  # (not the x̂0 rescale of A1111's extension)
    if prediction_type == "v_prediction":  # (a v model's v are its outputs: the outputs' rescale, read)
        on_outputs = read(guided(_toy_model, cond, uncond, 7.0, guidance_rescale=0.7)(x_in, t))
        assert torch.allclose(ours, on_outputs, rtol=1e-5, atol=1e-5)


def test_a_run_in_v_needs_a_calls_sigma():
    from sdadapt.guidance_rescale import GuidanceRescale
    from sdadapt.samplers import guidance_rescale_for_run

    v = GuidanceRescale(0.7, "v")
    for sampler, schedule in [("ddim", "automatic"), ("plms", None), ("unipc_a1111", None), ("lcm", None)]:
        with pytest.raises(ValueError, match="steps on timesteps here"):
            guidance_rescale_for_run(v, sampler, schedule=schedule, prediction_type="epsilon")
    with pytest.raises(ValueError, match="the model predicts epsilon, not v"):
        guidance_rescale_for_run(v, "euler", schedule=None, prediction_type="epsilon")
    with pytest.raises(ValueError, match="an EDM model .* on the UNet outputs"):
        guidance_rescale_for_run(v, "dpmsolver++", schedule=None, prediction_type="v_prediction", edm=True)
    assert guidance_rescale_for_run(0.7, "dpmsolver++", schedule=None, prediction_type="epsilon",
                                    edm=True) == GuidanceRescale(0.7)
    assert guidance_rescale_for_run(v, "euler", schedule="karras", prediction_type="epsilon") == v
    assert guidance_rescale_for_run(v, "dpmpp_2s_a", schedule=None, prediction_type="epsilon") == v
    outputs_v = guidance_rescale_for_run(v, "dpmsolver++", schedule=None, prediction_type="v_prediction")
    assert outputs_v == GuidanceRescale(0.7, "v", outputs_are_v=True)
    assert guidance_rescale_for_run(0.7, "ddim", schedule=None, prediction_type="epsilon") == GuidanceRescale(0.7)
    assert guidance_rescale_for_run(0.0, "ddim", schedule=None, prediction_type="epsilon") is None
    with pytest.raises(ValueError, match="this call combines the model outputs"):  # (the guard where no σ is read)
        guided(_toy_model, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 3.0, guidance_rescale=v)(
            torch.zeros(1, 4, 2, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match="space is one of combined, v"):
        GuidanceRescale(0.7, "x0")


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "GuidanceRescale")
    assert scope["in_v"].shape == (1, 4, 8, 8) and torch.isfinite(scope["in_v"]).all()
    plain = scope["read"](scope["model"](scope["x"], scope["t"], scope["cond"]))
    assert not torch.allclose(scope["in_v"], plain)


# ---- generate end to end: the toy (System protocol path) -----------------------------------------------------------

def _png(path):
    from PIL import Image

    image = Image.open(path)
    return np.asarray(image), image.text["parameters"]


def test_generate_rescales_writes_cfg_rescale_and_reads_it_back(tmp_path):
    pytest.importorskip("PIL")
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    run = {"prompt": "a red circle", "negative": "blue", "steps": 5, "seed": 4, "guidance": 6.0, "sampler": "Euler",
           "schedule": "karras"}
    run_generate(out=tmp_path / "r.png", guidance_rescale=0.7, **run)
    run_generate(out=tmp_path / "p.png", **run)
    (rescaled, text), (plain, plain_text) = _png(tmp_path / "r.png"), _png(tmp_path / "p.png")
    assert not np.array_equal(rescaled, plain)
    assert "CFG Rescale: 0.7, " in text and "CFG Rescale" not in plain_text
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["guidance_rescale"] == 0.7 and not any("CFG Rescale" in line for line in not_taken)
    for field in ("CFG Rescale φ", "CFG rescale"):  # (the extension's older field; SD.Next's)
        options, _ = infotext_options(parse_infotext(text.replace("CFG Rescale:", f"{field}:")))
        assert options["guidance_rescale"] == 0.7
    # at guidance 1 nothing is combined, so nothing is rescaled (diffusers runs no guidance there either)
    run_generate(out=tmp_path / "r1.png", guidance_rescale=0.7, **{**run, "guidance": 1.0})
    run_generate(out=tmp_path / "p1.png", **{**run, "guidance": 1.0})
    assert np.array_equal(_png(tmp_path / "r1.png")[0], _png(tmp_path / "p1.png")[0])


def test_generate_in_v_writes_reforges_fields_and_reads_them_back(tmp_path):
    pytest.importorskip("PIL")
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    run = {"prompt": "a red circle", "negative": "blue", "steps": 5, "seed": 4, "guidance": 6.0, "sampler": "Euler",
           "schedule": "karras", "guidance_rescale": 0.7}
    run_generate(out=tmp_path / "v.png", guidance_rescale_space="v", **run)
    run_generate(out=tmp_path / "c.png", **run)
    (in_v, text), (combined, _) = _png(tmp_path / "v.png"), _png(tmp_path / "c.png")
    assert not np.array_equal(in_v, combined)
    assert "rescale_cfg_enabled: True, rescale_cfg_version: Normal, rescale_cfg_multiplier: 0.7, " in text
    assert "CFG Rescale" not in text
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["guidance_rescale"] == 0.7 and options["guidance_rescale_space"] == "v"
    assert not any("rescale_cfg" in line for line in not_taken)
    older = text.replace("rescale_cfg_version: Normal, ", "")  # (reForge's first release wrote no version)
    assert infotext_options(parse_infotext(older))[0]["guidance_rescale_space"] == "v"
    other = infotext_options(parse_infotext(text.replace("Normal", "Alternative")))  # (another formula)
    assert "guidance_rescale" not in other[0] and any("rescale_cfg_multiplier" in line for line in other[1])
    with pytest.raises(ValueError, match="--guidance-rescale-space v: .*the model predicts epsilon, not v"):
        run_generate(out=tmp_path / "x.png", guidance_rescale_space="v", **{**run, "schedule": None})
    assert not (tmp_path / "x.png").exists()


def test_generate_refuses_and_and_a_bad_phi_before_any_output(tmp_path):
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="--guidance-rescale.*2 AND sub-prompts"):
        run_generate(prompt="a red circle AND a blue square", out=tmp_path / "a.png", guidance_rescale=0.7)
    with pytest.raises(ValueError, match=r"--guidance-rescale: guidance rescale is a blend in \[0, 1\]"):
        run_generate(prompt="a", out=tmp_path / "a.png", guidance_rescale=2.0)
    assert not list(tmp_path.iterdir())


def test_the_cli_takes_guidance_rescale_and_its_cfg_alias(tmp_path, capsys):
    pytest.importorskip("PIL")
    from sdadapt.cli import main

    assert main(["generate", "--prompt", "a red circle", "--steps", "3", "--cfg-rescale", "0.5", "-o",
                 str(tmp_path / "c.png")]) == 0
    assert "CFG Rescale: 0.5, " in _png(tmp_path / "c.png")[1]


# ---- diffusers' pipeline: StableDiffusionPipeline(guidance_rescale=) -----------------------------------------------
@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def tiny_sd(request, tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp(f"rescale_{request.param}"), prediction_type=request.param)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_generate_is_diffusers_pipeline_with_guidance_rescale(tiny_sd, sampler):
    """sdadapt's txt2img with ``guidance_rescale=0.7`` = StableDiffusionPipeline's, the scheduler sdadapt mimics and
    the same seeded generator; the rescale moves the latents far more than the two differ."""
    import diffusers

    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    run = dict(seed=5, steps=6, guidance=5.0, sampler=sampler, negative="blurry", output="latents")
    ours = generate(system, ["a photo"], guidance_rescale=0.7, **run)
    plain = generate(system, ["a photo"], **run)
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": system.prediction_type}
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++")
    pipe = diffusers.StableDiffusionPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo", num_inference_steps=6, guidance_scale=5.0, guidance_rescale=0.7, negative_prompt="blurry",
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-4, gap
    assert (ours - plain).abs().max().item() > 100 * max(gap, 1e-6)
    from sdadapt.guidance_rescale import GuidanceRescale

    in_v = GuidanceRescale(0.7, "v")
    if system.prediction_type == "v_prediction":  # (a v model's outputs are v: ComfyUI's RescaleCFG is diffusers')
        assert torch.equal(generate(system, ["a photo"], guidance_rescale=in_v, **run), ours)
    else:
        with pytest.raises(ValueError, match="the model predicts epsilon, not v"):
            generate(system, ["a photo"], guidance_rescale=in_v, **run)


def test_a_diffusers_model_rescales_every_pass_on_a1111s_grid_and_in_a_prompt_plan(tiny_sd, tmp_path, monkeypatch):
    """``DiffusersSystem.sample`` carries the rescale: a hires run on A1111's grid rescales every guided call of both
    passes (x̂0, by branch), a scheduled prompt's too (its prompt plan)."""
    from sdadapt import guidance_rescale
    from sdadapt.jobs import run_generate

    phis, real = [], guidance_rescale.rescale_guidance

    def spy(out, cond, phi):
        phis.append(phi)
        return real(out, cond, phi)

    monkeypatch.setattr(guidance_rescale, "rescale_guidance", spy)
    run = {"model": str(tiny_sd), "negative": "blurry", "steps": 3, "seed": 2, "sampler": "Euler",
           "schedule": "karras", "width": 32, "height": 32, "guidance": 6.0, "hires_scale": 1.5,
           "hires_denoising": 0.6, "hires_steps": 2}
    run_generate(out=tmp_path / "a.png", prompt="a cat", guidance_rescale=0.7, **run)
    assert phis == [0.7] * (3 + 2)  # (Euler: one call a step; the hires pass its 2 steps)
    phis.clear()
    run_generate(out=tmp_path / "b.png", prompt="a [cat:dog:2]", guidance_rescale=0.7, **run)
    assert phis == [0.7] * (3 + 2)
    phis.clear()
    run_generate(out=tmp_path / "c.png", prompt="a cat", **run)
    assert all(phi == 0 for phi in phis)
