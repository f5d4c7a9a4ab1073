"""A1111's "Skip Early CFG" and "Negative Guidance minimum sigma" (NGMS, "NGMS all steps"): the decision per guided
call and the skipped call's combination, against A1111's ``CFGDenoiser.forward`` (v1.10,
modules/sd_samplers_cfg_denoiser.py) transcribed below over k-diffusion's samplers (tests/test_kdiffusion_float32.py)."""

from __future__ import annotations

import pytest
import torch
from sampler_stand_ins import rel_err
from test_dpm_adaptive_float32 import AC
from test_guidance_on_denoised import _cond, _sigmas, _unet, _x0
from test_kdiffusion_float32 import _run_reference, _x_T

from sdadapt.prompt_guidance import plan_prompt
from sdadapt.samplers import sample_latents
from sdadapt.uncond_skip import NGMS_FIELD, SKIP_EARLY_FIELD, UncondSkip


def _a1111_cfg_denoiser(parts, negative, scale, total_steps, *, skip_early=0.0, ngms=0.0, ngms_all=False,
                        fired=None):
    """``CFGDenoiser.forward`` over :func:`_x0` (ε): per call ``step`` the skip rules, then ``combine_denoised`` —
    on a skipped call over ``[sub-prompts..., first sub-prompt]`` at scale 1.0."""
    state = {"step": 0}

    def model(x, sigma):
        b, step = x.shape[0], state["step"]
        skip = False
        if skip_early != 0.0 and step / total_steps <= skip_early:
            skip, key = True, "Skip Early CFG"
        elif (step % 2 or ngms_all) and ngms > 0 and sigma[0] < ngms:
            skip, key = True, "NGMS"
        if skip and fired is not None:
            fired.append(key)
        conds = [_cond(v, b) for v, _ in parts] + ([] if skip else [_cond(negative, b)])
        k = len(conds)
        x_out = _x0("epsilon", x.repeat(k, 1, 1, 1), sigma.repeat(k), torch.cat(conds))
        if skip:
            x_out = torch.cat([x_out, x_out[:b]])  # fake_uncond: the first sub-prompt's
        uncond = x_out[-b:]
        denoised = torch.clone(uncond)
        for j, (_, weight) in enumerate(parts):
            denoised += (x_out[j * b:(j + 1) * b] - uncond) * (weight * (1.0 if skip else scale))
        state["step"] = step + 1
        return denoised
    return model


@pytest.mark.parametrize("sampler, calls_per_step", [("euler", 1), ("heun", 2), ("dpmpp_2s_a", 2)])
@pytest.mark.parametrize("rule", [{"skip_early": 0.3}, {"ngms": 2.0}, {"ngms": 2.0, "ngms_all_steps": True},
                                  {"skip_early": 0.2, "ngms": 1.0}])
def test_skipped_calls_are_a1111s(sampler, calls_per_step, rule):
    steps, x_T = 10, _x_T(21)
    total = steps * calls_per_step  # (A1111's total_steps: 2·steps for its second-order samplers)
    fired, seen = [], []
    want = _run_reference(sampler, _a1111_cfg_denoiser(
        [(0.5, 1.0)], -0.25, 7.5, total, skip_early=rule.get("skip_early", 0.0), ngms=rule.get("ngms", 0.0),
        ngms_all=rule.get("ngms_all_steps", False), fired=fired), x_T, _sigmas("karras", steps))
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler=sampler,
                         alphas_cumprod=AC, num_steps=steps, schedule="karras",
                         generator=torch.Generator().manual_seed(7), uncond_skip=UncondSkip(**rule, seen=seen.append))
    assert torch.equal(got, want), rel_err(got, want)
    assert seen == fired and len(fired) > 0
    plain = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler=sampler,
                           alphas_cumprod=AC, num_steps=steps, schedule="karras",
                           generator=torch.Generator().manual_seed(7))
    assert not torch.equal(got, plain)


def test_and_sub_prompts_take_the_first_as_the_negative_on_a_skipped_call():
    steps, x_T = 8, _x_T(23)
    values = {"a": 0.5, " b": -0.75, "n": -0.25}
    plan = plan_prompt("a AND b:0.5", "n", steps=steps)
    seen = []
    model = plan.guidance(_unet, [_cond(values[t]) for t in plan.texts],
                          [_cond(values[t]) for t in plan.negative_texts], 7.5,
                          uncond_skip=UncondSkip(skip_early=0.25, ngms=3.0, seen=seen.append), total_steps=steps)
    got = sample_latents(model, x_T, None, sampler="euler", alphas_cumprod=AC, num_steps=steps, schedule="karras")
    fired = []
    want = _run_reference("euler", _a1111_cfg_denoiser([(0.5, 1.0), (-0.75, 0.5)], -0.25, 7.5, steps,
                                                       skip_early=0.25, ngms=3.0, fired=fired),
                          x_T, _sigmas("karras", steps))
    assert torch.equal(got, want), rel_err(got, want)
    assert seen == fired and set(fired) == {SKIP_EARLY_FIELD, NGMS_FIELD}


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmsolver++", "unipc"])
def test_skip_early_everywhere_and_all_calls_skipped_is_the_prompt_alone(sampler):
    """Skip Early CFG needs no σ: every sampler takes it; at 1.0 every call runs the prompt alone, which is guidance
    scale 1 (no negative pass) bit for bit."""
    x_T = _x_T(25)
    run = {"sampler": sampler, "alphas_cumprod": AC, "num_steps": 6, "generator": torch.Generator().manual_seed(1)}
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5,
                         uncond_skip=UncondSkip(skip_early=1.0), **run)
    run["generator"] = torch.Generator().manual_seed(1)
    alone = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=1.0, **run)
    assert torch.equal(got, alone)


def test_ngms_needs_a1111s_grid_and_the_settings_are_checked():
    x_T = _x_T(27)
    with pytest.raises(ValueError, match="NGMS.*A1111's grids only; euler runs diffusers' grid.*schedule"):
        sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler="euler",
                       alphas_cumprod=AC, num_steps=4, uncond_skip=UncondSkip(ngms=1.0))
    with pytest.raises(ValueError, match="NGMS.*ddim runs diffusers' grid"):
        sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler="ddim",
                       alphas_cumprod=AC, num_steps=4, uncond_skip=UncondSkip(ngms=1.0))
    with pytest.raises(ValueError, match=r"model calls in \[0, 1\].*'Skip Early CFG'"):
        UncondSkip(skip_early=1.5)
    with pytest.raises(ValueError, match="Negative Guidance minimum sigma"):
        UncondSkip(ngms=-1.0)
    with pytest.raises(ValueError, match="σ.*schedule"):  # (a guided model called without σ)
        UncondSkip(ngms=1.0).skips(1, 10, None)


def test_the_rule_and_its_infotext_fields():
    rule = UncondSkip(skip_early=0.1, ngms=0.5, ngms_all_steps=True)
    assert [rule.skips(k, 20, 1.0) for k in range(4)] == [True, True, True, False]  # (k/20 <= 0.1: k <= 2)
    assert rule.skips(3, 20, 0.49) and not rule.skips(4, 20, 0.5)  # (all steps: even calls too; σ < ngms strictly)
    odd_only = UncondSkip(ngms=0.5)
    assert [odd_only.skips(k, 20, 0.1) for k in range(4)] == [False, True, False, True]
    assert rule.fields({NGMS_FIELD, SKIP_EARLY_FIELD}) == {"Skip Early CFG": 0.1, "NGMS": 0.5, "NGMS all steps": True}
    assert odd_only.fields(set()) == {} and odd_only.fields({NGMS_FIELD}) == {"NGMS": 0.5}
    # σ compared in float32, as A1111's sigma[0] < s_min_uncond: 0.1 + 1e-9 rounds to float32(0.1)
    assert not UncondSkip(ngms=0.1).skips(1, 10, 0.1 - 1e-9) and UncondSkip(ngms=0.1).skips(1, 10, 0.0999)
    # and the setting too: just above float32(0.1) it is float32(0.1), not above σ = float32(0.1)
    assert not UncondSkip(ngms=float(torch.tensor(0.1)) + 1e-12).skips(1, 10, 0.1)
