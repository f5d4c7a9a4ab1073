"""Dynamic thresholding ("CFG Scale Fix", :mod:`sdadapt.dynamic_thresholding`): the formula and the schedules against
mcmonkey's ``DynThresh`` (sd-dynamic-thresholding 73e4e04 ``dynthres_core.py``, transcribed below; Forge's built-in
``lib_dynamic_thresholding/dynthres_core.py`` is the same file), hypothesis over shapes, ``AND`` weights and every
option; invariants; whole runs on A1111's σ grids against k-diffusion's loops with A1111's ``CFGDenoiser`` whose
``combine_denoised`` is the extension's (its step count over ``total_steps``) and with Forge's / ComfyUI's CFG function
(``x − (x − x̂0)``, the step ``999 − timestep(σ)``); the refusals; the infotext fields both ways; ``generate``."""

from __future__ import annotations

import math

import pytest
import tiny_sd_fixtures
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import stand_in
from test_dpm_adaptive_float32 import AC, LOG_SIGMAS, _get_sigmas, _sigma_to_t
from test_kdiffusion_float32 import _karras, _kd_euler, _kd_heun

from sdadapt.dynamic_thresholding import (
    COMBINES_OUTPUTS,
    DYNAMIC_THRESHOLDING_MODES,
    DynamicThresholding,
    check_dynamic_thresholding_run,
    dynamic_threshold,
    dynamic_thresholding_fields,
    dynamic_thresholding_from_fields,
    parse_dynamic_thresholding,
    scheduled_scale,
)

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd


# ---- the extension's DynThresh, transcribed (its experiment modes left out: 0 in every tool) ------------------------
class _DynThresh:
    def __init__(self, mimic_scale, threshold_percentile, mimic_mode, mimic_scale_min, cfg_mode, cfg_scale_min,
                 sched_val, max_steps, separate_feature_channels, scaling_startpoint, variability_measure,
                 interpolate_phi):
        self.mimic_scale, self.threshold_percentile = mimic_scale, threshold_percentile
        self.mimic_mode, self.cfg_mode, self.max_steps = mimic_mode, cfg_mode, max_steps
        self.cfg_scale_min, self.mimic_scale_min, self.sched_val = cfg_scale_min, mimic_scale_min, sched_val
        self.sep_feat_channels, self.scaling_startpoint = separate_feature_channels, scaling_startpoint
        self.variability_measure, self.interpolate_phi = variability_measure, interpolate_phi
        self.step = 0

    def interpret_scale(self, scale, mode, min):
        scale -= min
        max = self.max_steps - 1
        frac = self.step / max
        if mode == "Constant":
            pass
        elif mode == "Linear Down":
            scale *= 1.0 - frac
        elif mode == "Half Cosine Down":
            scale *= math.cos(frac)
        elif mode == "Cosine Down":
            scale *= math.cos(frac * 1.5707)
        elif mode == "Linear Up":
            scale *= frac
        elif mode == "Half Cosine Up":
            scale *= 1.0 - math.cos(frac)
        elif mode == "Cosine Up":
            scale *= 1.0 - math.cos(frac * 1.5707)
        elif mode == "Power Up":
            scale *= math.pow(frac, self.sched_val)
        elif mode == "Power Down":
            scale *= 1.0 - math.pow(frac, self.sched_val)
        elif mode == "Linear Repeating":
            portion = (frac * self.sched_val) % 1.0
            scale *= (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
        elif mode == "Cosine Repeating":
            scale *= math.cos(frac * 6.28318 * self.sched_val) * 0.5 + 0.5
        elif mode == "Sawtooth":
            scale *= (frac * self.sched_val) % 1.0
        scale += min
        return scale

    def dynthresh(self, cond, uncond, cfg_scale, weights):
        mimic_scale = self.interpret_scale(self.mimic_scale, self.mimic_mode, self.mimic_scale_min)
        cfg_scale = self.interpret_scale(cfg_scale, self.cfg_mode, self.cfg_scale_min)
        conds_per_batch = cond.shape[0] / uncond.shape[0]
        cond_stacked = cond.reshape((-1, int(conds_per_batch)) + uncond.shape[1:])
        diff = cond_stacked - uncond.unsqueeze(1)
        if weights is not None:
            diff = diff * weights
        relative = diff.sum(1)
        mim_target = uncond + relative * mimic_scale
        cfg_target = uncond + relative * cfg_scale
        mim_flattened = mim_target.flatten(2)
        cfg_flattened = cfg_target.flatten(2)
        mim_means = mim_flattened.mean(dim=2).unsqueeze(2)
        cfg_means = cfg_flattened.mean(dim=2).unsqueeze(2)
        mim_centered = mim_flattened - mim_means
        cfg_centered = cfg_flattened - cfg_means
        if self.sep_feat_channels:
            if self.variability_measure == 'STD':
                mim_scaleref = mim_centered.std(dim=2).unsqueeze(2)
                cfg_scaleref = cfg_centered.std(dim=2).unsqueeze(2)
            else:
                mim_scaleref = mim_centered.abs().max(dim=2).values.unsqueeze(2)
                cfg_scaleref = torch.quantile(cfg_centered.abs(), self.threshold_percentile, dim=2).unsqueeze(2)
        else:
            if self.variability_measure == 'STD':
                mim_scaleref = mim_centered.std()
                cfg_scaleref = cfg_centered.std()
            else:
                mim_scaleref = mim_centered.abs().max()
                cfg_scaleref = torch.quantile(cfg_centered.abs(), self.threshold_percentile)
        if self.scaling_startpoint == 'ZERO':
            scaling_factor = mim_scaleref / cfg_scaleref
            result = cfg_flattened * scaling_factor
        else:
            if self.variability_measure == 'STD':
                cfg_renormalized = (cfg_centered / cfg_scaleref) * mim_scaleref
            else:
                max_scaleref = torch.maximum(mim_scaleref, cfg_scaleref)
                cfg_clamped = cfg_centered.clamp(-max_scaleref, max_scaleref)
                cfg_renormalized = (cfg_clamped / max_scaleref) * mim_scaleref
            result = cfg_renormalized + cfg_means
        actual_res = result.unflatten(2, mim_target.shape[2:])
        if self.interpolate_phi != 1.0:
            actual_res = actual_res * self.interpolate_phi + cfg_target * (1.0 - self.interpolate_phi)
        return actual_res


def _reference(setting: DynamicThresholding, *, max_steps: int = 999) -> _DynThresh:
    return _DynThresh(setting.mimic_scale, setting.threshold_percentile, setting.mimic_mode, setting.mimic_scale_min,
                      setting.cfg_mode, setting.cfg_scale_min, setting.sched_val, max_steps,
                      setting.separate_feature_channels, setting.scaling_startpoint, setting.variability_measure,
                      setting.interpolate_phi)


def _a1111_weights(weights, batch: int) -> torch.Tensor:
    """The extension's ``torch.tensor(conds_list).select(2, 1)`` reshaped (B, n, 1, 1, 1): float32."""
    conds_list = [[(i * len(weights) + j, w) for j, w in enumerate(weights)] for i in range(batch)]
    tensor = torch.tensor(conds_list).select(2, 1)
    return tensor.reshape(*tensor.shape, 1, 1, 1)


settings_strategy = st.builds(
    DynamicThresholding, mimic_scale=st.floats(0.0, 30.0), threshold_percentile=st.floats(0.9, 1.0),
    mimic_mode=st.sampled_from(DYNAMIC_THRESHOLDING_MODES), mimic_scale_min=st.floats(0.0, 5.0),
    cfg_mode=st.sampled_from(DYNAMIC_THRESHOLDING_MODES), cfg_scale_min=st.floats(0.0, 5.0),
    sched_val=st.floats(0.0, 6.0), separate_feature_channels=st.booleans(),
    scaling_startpoint=st.sampled_from(["MEAN", "ZERO"]), variability_measure=st.sampled_from(["AD", "STD"]),
    interpolate_phi=st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(setting=settings_strategy, batch=st.integers(1, 3), channels=st.integers(1, 4), h=st.integers(2, 6),
       w=st.integers(2, 6), weights=st.lists(st.floats(0.1, 1.5), min_size=1, max_size=3),
       scale=st.floats(1.0, 30.0), step=st.integers(0, 19), seed=st.integers(0, 2**16))
def test_the_combination_is_the_extensions_dynthresh(setting, batch, channels, h, w, weights, scale, step, seed):
    """Float64 x̂0: :meth:`DynamicThresholding.combine` at ``frac = step / 19`` is ``DynThresh.dynthresh`` of a run of
    20 steps at ``step``, its cond rows per image and AND weights as A1111 hands them over."""
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64)
    conds = [uncond + torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) * 0.3 for _ in weights]
    reference = _reference(setting, max_steps=20)
    reference.step = step
    stacked_rows = torch.stack(conds, dim=1).reshape(-1, channels, h, w)  # (image-major, as A1111's conds_list)
    want = reference.dynthresh(stacked_rows, uncond, scale, _a1111_weights(weights, batch))
    got = setting.combine(uncond, list(zip(conds, weights)), scale, frac=step / 19)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(DYNAMIC_THRESHOLDING_MODES), scale=st.floats(0.0, 30.0), minimum=st.floats(0.0, 10.0),
       step=st.integers(0, 30), value=st.floats(0.0, 8.0))
def test_the_schedules_are_the_extensions_interpret_scale(mode, scale, minimum, step, value):
    reference = _DynThresh(0, 1, mode, 0, mode, 0, value, 31, True, "MEAN", "AD", 1.0)
    reference.step = step
    assert scheduled_scale(scale, mode, minimum=minimum, frac=step / 30, value=value) == \
        reference.interpret_scale(scale, mode, minimum)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(2.0, 30.0), mimic=st.floats(1.0, 10.0),
       separate=st.booleans())
def test_invariants_written_out_in_float64(seed, scale, mimic, separate):
    """MEAN / AD at the 100th percentile: the result keeps the guided result's mean, and its largest deviation is the
    smaller of the guided and the mimic result's (per channel, or over the batch: it only ever shrinks); φ 0 is plain
    guidance; the mimic scale equal to the scale gives plain guidance back (the clamp at its own maximum)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    out = dynamic_threshold(u, delta, scale=scale, mimic_scale=mimic, separate_feature_channels=separate)
    guided, mimicked = u + delta * scale, u + delta * mimic
    dims = (2, 3) if separate else (0, 1, 2, 3)

    def centred(x):
        return x - x.mean(dim=(2, 3), keepdim=True)

    assert torch.allclose(out.mean(dim=(2, 3)), guided.mean(dim=(2, 3)), atol=1e-12)
    largest = torch.minimum(centred(mimicked).abs().amax(dim=dims), centred(guided).abs().amax(dim=dims))
    assert torch.allclose(centred(out).abs().amax(dim=dims), largest, atol=1e-12)
    assert torch.equal(dynamic_threshold(u, delta, scale=scale, mimic_scale=mimic, interpolate_phi=0.0), guided)
    for startpoint in ("MEAN", "ZERO"):
        for measure in ("AD", "STD"):
            same = dynamic_threshold(u, delta, scale=scale, mimic_scale=scale, scaling_startpoint=startpoint,
                                     variability_measure=measure, separate_feature_channels=separate)
            assert torch.allclose(same, guided, atol=1e-12)


def test_the_settings_refuse_what_the_panels_cannot_give():
    for bad in ({"mimic_scale": -1.0}, {"threshold_percentile": 95.0}, {"interpolate_phi": 1.5},
                {"mimic_mode": "Linear down"}, {"scaling_startpoint": "mean"}, {"variability_measure": "MAD"},
                {"step_rule": "steps"}, {"mimic_scale": float("nan")}):
        with pytest.raises(ValueError, match="dynamic thresholding's"):
            DynamicThresholding(**bad)
    setting = DynamicThresholding()
    assert setting.frac(call=3, total_steps=1, t=0.0) == 0.0  # (a run of one call: the extension divides by zero)
    forge = DynamicThresholding(step_rule="timesteps")
    assert forge.frac(call=0, total_steps=10, t=torch.tensor([998.6, 3.0])) == 0.0  # (999 − round(998.6))
    assert forge.frac(call=0, total_steps=10, t=1.0) == 1.0


# ---- whole runs on A1111's σ grids ---------------------------------------------------------------------------------
def _guided_stand_in(x, t, c):
    """A tiny model whose outputs depend on its condition (B, 2): ``stand_in`` scaled and a rolled term."""
    return stand_in(x, t) * (1 + c[:, :1, None, None]) + 0.2 * c[:, 1:2, None, None] * x.roll(1, -1)


_COND, _UNCOND = torch.tensor([[0.5, 1.0], [0.3, -0.5]]), torch.tensor([[0.0, -1.0], [0.1, 0.2]])


def _compvis(x, sigma, cond):
    """A1111's ``CompVisDenoiser`` (ε) of :func:`_guided_stand_in`: x̂0 = x − σ·ε at t = sigma_to_t(σ), float32."""
    c_in = 1 / (sigma**2 + 1) ** 0.5
    return x + _guided_stand_in(x * c_in[:, None, None, None], _sigma_to_t(sigma), cond) * (-sigma)[:, None, None, None]


class _A1111CFGDenoiser:
    """A1111's ``CFGDenoiser.forward`` (cond rows first, the negative's last) with the extension's
    ``combine_denoised``: ``main_class.step = self.step`` and ``max_steps = self.total_steps``."""

    def __init__(self, dt: _DynThresh, scale: float, total_steps: int):
        self.dt, self.scale, self.step, self.dt.max_steps = dt, scale, 0, total_steps

    def __call__(self, x, sigma):
        b = x.shape[0]
        x_out = _compvis(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([_COND, _UNCOND]))
        self.dt.step = self.step
        denoised = self.dt.dynthresh(x_out[:-b], x_out[-b:], self.scale, _a1111_weights([1.0], b))
        self.step += 1
        return denoised


def _comfyui_timestep(sigma):
    """ComfyUI's / Forge's ``ModelSamplingDiscrete.timestep``: the nearest training step in log σ."""
    return (sigma.log() - LOG_SIGMAS[:, None]).abs().argmin(dim=0).view(sigma.shape)


class _ForgeCFGFunction:
    """Forge's ``sampling_function`` with the built-in's ``sampler_dyn_thresh`` as its CFG function (ComfyUI's node
    less its mimic == scale shortcut): the CFG result ``x − fn(args)``, args' cond/uncond ``x − x̂0``."""

    def __init__(self, dt: _DynThresh, scale: float):
        self.dt, self.scale = dt, scale

    def __call__(self, x, sigma):
        b = x.shape[0]
        cond_pred, uncond_pred = _compvis(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                          torch.cat([_COND, _UNCOND])).split(b)
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "input": x, "sigma": sigma}
        inp = args["input"]
        cond, uncond = inp - args["cond"], inp - args["uncond"]
        self.dt.step = 999 - _comfyui_timestep(args["sigma"])[0].item()
        return x - (inp - self.dt.dynthresh(cond, uncond, self.scale, None))


_SCHEDULED = DynamicThresholding(mimic_scale=4.0, mimic_mode="Cosine Down", mimic_scale_min=1.0,
                                 cfg_mode="Power Up", cfg_scale_min=6.0, sched_val=2.0, threshold_percentile=0.95)


@pytest.mark.parametrize("sampler,schedule", [("euler", "uniform"), ("heun", "karras"), ("euler", "karras")])
@pytest.mark.parametrize("setting", [DynamicThresholding(mimic_scale=5.0), _SCHEDULED,
                                     DynamicThresholding(mimic_scale=3.0, variability_measure="STD",
                                                         separate_feature_channels=False, interpolate_phi=0.7)],
                         ids=["constant", "scheduled", "std-batch"])
def test_a_run_is_a1111s_cfg_denoiser_with_the_extension(sampler, schedule, setting):
    """sdadapt's Euler / Heun on A1111's float32 grids with the setting = k-diffusion's loop over A1111's
    CFGDenoiser with the extension's combine_denoised (Heun: 2n − 1 calls over A1111's ``total_steps`` of 2n)."""
    from sdadapt.samplers import sample_latents

    steps, scale = 6, 11.0
    x_T = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    sigmas = _get_sigmas(steps) if schedule == "uniform" else _karras(steps)
    total = steps if sampler == "euler" else 2 * steps  # (A1111's total_steps: 2n for a second-order sampler)
    denoiser = _A1111CFGDenoiser(_reference(setting), scale, total)
    want = (_kd_euler if sampler == "euler" else _kd_heun)(denoiser, x_T * sigmas[0], sigmas)
    assert denoiser.step == (steps if sampler == "euler" else 2 * steps - 1)  # (Heun's last step: one call)

    def run(dt):
        return sample_latents(_guided_stand_in, x_T, _COND, uncond=_UNCOND, guidance_scale=scale, sampler=sampler,
                              schedule=schedule, alphas_cumprod=AC, num_steps=steps, dynamic_thresholding=dt)

    got, plain = run(setting), run(None)
    gap = (got - want).abs().max().item()
    assert gap <= 2e-5 * want.abs().max().item(), gap
    assert (got - plain).abs().max().item() > 1000 * gap


@pytest.mark.parametrize("setting", [DynamicThresholding(mimic_scale=5.0, step_rule="timesteps"),
                                     DynamicThresholding(**{**_SCHEDULED.__dict__, "step_rule": "timesteps"})],
                         ids=["constant", "scheduled"])
def test_a_run_with_the_timestep_rule_is_forges_cfg_function(setting):
    from sdadapt.samplers import sample_latents

    steps, scale = 8, 11.0
    x_T = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    sigmas = _karras(steps)
    want = _kd_euler(_ForgeCFGFunction(_reference(setting), scale), x_T * sigmas[0], sigmas)
    got = sample_latents(_guided_stand_in, x_T, _COND, uncond=_UNCOND, guidance_scale=scale, sampler="euler",
                         schedule="karras", alphas_cumprod=AC, num_steps=steps, dynamic_thresholding=setting)
    gap = (got - want).abs().max().item()
    assert gap <= 2e-5 * want.abs().max().item(), gap
    if setting.scheduled:  # (the calls' count would schedule other scales)
        calls = sample_latents(_guided_stand_in, x_T, _COND, uncond=_UNCOND, guidance_scale=scale, sampler="euler",
                               schedule="karras", alphas_cumprod=AC, num_steps=steps,
                               dynamic_thresholding=_SCHEDULED)
        assert (calls - got).abs().max().item() > 1000 * gap


def test_and_sub_prompts_and_a_skipped_negative_combine_as_a1111(system):
    """A prompt plan with ``AND`` (weights 1 and 0.6) by branch = the extension's dynthresh of the read branches with
    A1111's weights; a skipped call (Skip Early CFG) combines at scale 1 with the first sub-prompt as the negative,
    as A1111's ``combine_denoised(x_out, conds_list, uncond, 1.0)``; the plain plan equals ``guided``."""
    from guidance_terms import branch_inputs

    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.training.diffusion import guided
    from sdadapt.uncond_skip import UncondSkip

    model, cond, uncond, x, t = branch_inputs(system, "a cat", "blurry", seed=5, t=600)
    dog = system.condition(system.tokenize(["a dog"]))
    setting = _SCHEDULED

    def read(out):
        return x * 1.25 - 0.75 * out

    plan = plan_prompt("a cat AND a dog :0.6", "blurry", steps=5)
    outs = [read(model(x, t, c)) for c in (cond, dog, uncond)]
    for skip in (None, UncondSkip(skip_early=0.1)):  # (Skip Early CFG: call 0 skips, call 1 not)
        scheduled = plan.guidance(model, [cond, dog], [uncond], 8.0, uncond_skip=skip, total_steps=5,
                                  dynamic_thresholding=setting)
        for call in range(2):
            reference = _reference(setting, max_steps=5)
            reference.step = call
            skipped = skip is not None and call / 5 <= 0.1
            want = reference.dynthresh(torch.cat(outs[:2]), outs[0] if skipped else outs[2], 1.0 if skipped else 8.0,
                                       _a1111_weights([1.0, 0.6], 1))
            got = scheduled.denoised_by_branch(read, x, t, sigma=0.75)
            assert torch.allclose(got, want, atol=1e-5), (skip, call, (got - want).abs().max())
    plain_plan = plan_prompt("a cat", "blurry", steps=5).guidance(model, [cond], [uncond], 8.0, total_steps=5,
                                                                  dynamic_thresholding=setting)
    plain = guided(model, cond, uncond, 8.0, total_steps=5, dynamic_thresholding=setting)
    for _ in range(3):
        assert torch.allclose(plain_plan.denoised_by_branch(read, x, t, sigma=0.75),
                              plain.denoised_by_branch(read, x, t, sigma=0.75), atol=1e-6)
    at_one = guided(model, cond, uncond, 1.0, dynamic_thresholding=DynamicThresholding(mimic_scale=7.0))
    reference = _reference(DynamicThresholding(mimic_scale=7.0))
    want = reference.dynthresh(outs[0], outs[2], 1.0, None)  # (A1111 runs the negative at scale 1 too)
    assert torch.allclose(at_one.denoised_by_branch(read, x, t, sigma=0.75), want, atol=1e-5)


# ---- where it runs -------------------------------------------------------------------------------------------------
def test_the_refusals_are_where_a_run_would_combine_outputs():
    """check_dynamic_thresholding_run refuses exactly the sampler / schedule pairs whose run does not combine x̂0 by
    branch (the run itself raises there, or the check names timesteps / EDM), over every sampler."""
    from sdadapt.sampler_tables import SAMPLERS
    from sdadapt.samplers import sample_latents

    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    setting = DynamicThresholding(mimic_scale=5.0)
    for name in SAMPLERS:
        for schedule in ("automatic", "karras", None):
            try:
                check_dynamic_thresholding_run(name, schedule=schedule)
                refused = None
            except ValueError as exc:
                refused = str(exc)
            try:
                sample_latents(_guided_stand_in, x_T, _COND[:1], uncond=_UNCOND[:1], guidance_scale=5.0,
                               sampler=name, schedule=schedule, alphas_cumprod=AC, num_steps=3,
                               generator=torch.Generator().manual_seed(1), dynamic_thresholding=setting)
                ran = True
            except ValueError as exc:
                ran = "takes no schedule" in str(exc) or "schedule" in str(exc) and "dynamic" not in str(exc)
                if ran:  # (a schedule the sampler itself refuses: not ours to tell)
                    continue
            assert (refused is None) == ran, (name, schedule, refused)
    assert set(COMBINES_OUTPUTS) <= set(SAMPLERS)
    with pytest.raises(ValueError, match="an EDM model"):
        check_dynamic_thresholding_run("euler", schedule="karras", edm=True)


def test_a_guidance_rescale_or_diffusers_grid_is_refused(system):
    from guidance_terms import branch_inputs

    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.training.diffusion import guided

    model, cond, uncond, x, t = branch_inputs(system, seed=1, t=500)
    setting = DynamicThresholding()
    with pytest.raises(ValueError, match="no tool runs both"):
        guided(model, cond, uncond, 7.0, guidance_rescale=0.7, dynamic_thresholding=setting)
    with pytest.raises(ValueError, match="no tool runs both"):
        plan_prompt("a cat", "", steps=3).guidance(model, [cond], [uncond], 7.0, guidance_rescale=0.7,
                                                   dynamic_thresholding=setting)
    with pytest.raises(ValueError, match="combines the model outputs"):
        guided(model, cond, uncond, 7.0, dynamic_thresholding=setting)(x, t)
    with pytest.raises(ValueError, match="combines the model outputs"):
        plan_prompt("a cat", "", steps=3).guidance(model, [cond], [uncond], 7.0, dynamic_thresholding=setting)(x, t)


# ---- infotext and generate -----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(setting=st.builds(
    DynamicThresholding, mimic_scale=st.sampled_from([1.0, 4.5, 7.0, 20.0]),
    threshold_percentile=st.sampled_from([0.9, 0.95, 0.99, 1.0]),
    mimic_mode=st.sampled_from(DYNAMIC_THRESHOLDING_MODES), mimic_scale_min=st.sampled_from([0.0, 2.5]),
    cfg_mode=st.sampled_from(DYNAMIC_THRESHOLDING_MODES), cfg_scale_min=st.sampled_from([0.0, 3.0]),
    sched_val=st.sampled_from([1.0, 4.0, 2.5]), separate_feature_channels=st.booleans(),
    scaling_startpoint=st.sampled_from(["MEAN", "ZERO"]), variability_measure=st.sampled_from(["AD", "STD"]),
    interpolate_phi=st.sampled_from([1.0, 0.5]), step_rule=st.sampled_from(["calls", "timesteps"])))
def test_the_fields_read_back_as_the_setting(setting):
    """Written (as text, the infotext way) and read back: the same setting, up to what A1111 leaves unwritten (a
    Constant mode's minimum, an unread scheduler value) and its percentile read as ``% × 0.01``."""
    from sdadapt.jobs.infotext_read import parse_infotext

    fields = dynamic_thresholding_fields(setting)
    text = "a cat\nSteps: 20, " + ", ".join(f"{key}: {value}" for key, value in fields.items())
    back, taken = dynamic_thresholding_from_fields(parse_infotext(text))
    assert sorted(taken) == sorted(fields)
    expected = dict(setting.__dict__)
    if setting.step_rule == "calls":
        expected["threshold_percentile"] = round(setting.threshold_percentile * 100, 6) * 0.01
        if setting.mimic_mode == "Constant":
            expected["mimic_scale_min"] = 0.0
        if setting.cfg_mode == "Constant":
            expected["cfg_scale_min"] = 0.0
        if "Scheduler value" not in fields:
            expected["sched_val"] = 4.0
    assert back == DynamicThresholding(**expected)


def test_real_infotexts_of_both_tools_are_read():
    """An A1111 infotext as the extension writes it (its percentile in %, a mode with its minimum and scheduler
    value) and Forge's; written off: taken, nothing to run."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    a1111 = ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 20, Seed: 1, Size: 512x512, "
             "Dynamic thresholding enabled: True, Mimic scale: 7, Separate Feature Channels: True, Scaling Startpoint:"
             " MEAN, Variability Measure: AD, Interpolate Phi: 1, Threshold percentile: 99.5, CFG mode: Half Cosine "
             "Up, CFG scale minimum: 3, Scheduler value: 4, Version: v1.10.1")
    options, not_taken = infotext_options(parse_infotext(a1111))
    assert options["dynamic_thresholding"] == DynamicThresholding(
        mimic_scale=7.0, threshold_percentile=99.5 * 0.01, cfg_mode="Half Cosine Up", cfg_scale_min=3.0,
        sched_val=4.0)
    assert not [line for line in not_taken if "hreshold" in line or "Mimic" in line or "CFG mode" in line]
    forge = ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 15, Seed: 1, Size: 512x512, dynthres_enabled: True, "
             "dynthres_mimic_scale: 7, dynthres_threshold_percentile: 1, dynthres_mimic_mode: Constant, "
             "dynthres_mimic_scale_min: 0, dynthres_cfg_mode: Constant, dynthres_cfg_scale_min: 0, "
             "dynthres_sched_val: 1, dynthres_separate_feature_channels: enable, dynthres_scaling_startpoint: MEAN, "
             "dynthres_variability_measure: AD, dynthres_interpolate_phi: 1, Version: f2.0.1")
    options, not_taken = infotext_options(parse_infotext(forge))
    assert options["dynamic_thresholding"] == DynamicThresholding(mimic_scale=7.0, step_rule="timesteps")
    assert not [line for line in not_taken if "dynthres" in line]
    off, not_taken = infotext_options(parse_infotext(forge.replace("dynthres_enabled: True", "dynthres_enabled: False")))
    assert "dynamic_thresholding" not in off and not [line for line in not_taken if "dynthres" in line]
    with pytest.raises(ValueError, match="not the numbers"):
        infotext_options(parse_infotext(a1111.replace("Mimic scale: 7", "Mimic scale: high")))


def test_the_command_line_words_make_the_setting():
    assert parse_dynamic_thresholding(["7"]) == DynamicThresholding(mimic_scale=7.0)
    assert parse_dynamic_thresholding(["4.5", "cfg_mode=Linear Down", "cfg_scale_min=2",
                                       "separate_feature_channels=false", "step_rule=timesteps"]) == \
        DynamicThresholding(mimic_scale=4.5, cfg_mode="Linear Down", cfg_scale_min=2.0,
                            separate_feature_channels=False, step_rule="timesteps")
    for words, match in ((["high"], "mimic scale, a number"), (["7", "phi=1"], "not KEY=VALUE"),
                         (["7", "sched_val=x"], "sched_val is a number"), ([], "mimic scale first"),
                         (["7", "separate_feature_channels=yes"], "true or false")):
        with pytest.raises(ValueError, match=match):
            parse_dynamic_thresholding(words)


@pytest.mark.parametrize("rule", ["calls", "timesteps"])
def test_generate_writes_the_tools_fields_and_reads_them_back(tiny_sd, tmp_path, rule):
    """``generate --dynamic-thresholding`` on a tiny SD model (A1111's Euler with AND): the tool's fields, and
    ``--infotext`` of the image gives the same image; without it another image."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a cat AND a dog :0.5", "--steps", "4", "--width",
            "32", "--height", "32", "--sampler", "Euler", "--schedule", "automatic", "--seed", "2", "--guidance", "14"]
    words = ["--dynamic-thresholding", "5", "cfg_mode=Linear Down", "cfg_scale_min=4", f"step_rule={rule}"]
    assert main([*base, *words, "--out", str(tmp_path / "a.png")]) == 0
    text = Image.open(tmp_path / "a.png").text["parameters"]
    if rule == "calls":
        assert ("Dynamic thresholding enabled: True, Mimic scale: 5, Separate Feature Channels: True, Scaling "
                "Startpoint: MEAN, Variability Measure: AD, Interpolate Phi: 1, Threshold percentile: 100, CFG mode: "
                "Linear Down, CFG scale minimum: 4") in text
    else:
        # (Forge's forge_dynamic_thresholding.py extra_generation_params, in its order)
        assert ("dynthres_enabled: True, dynthres_mimic_scale: 5, dynthres_threshold_percentile: 1, "
                "dynthres_mimic_mode: Constant, dynthres_mimic_scale_min: 0, dynthres_cfg_mode: Linear Down, "
                "dynthres_cfg_scale_min: 4, dynthres_sched_val: 1, dynthres_separate_feature_channels: enable, "
                "dynthres_scaling_startpoint: MEAN, dynthres_variability_measure: AD, dynthres_interpolate_phi: 1"
                ) in text
    assert main([*base[:-2], "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    a, b, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b", "plain"))
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


def test_generate_refuses_before_any_output(tiny_sd, tmp_path, capsys):
    from sdadapt.cli import main
    from sdadapt.jobs import run_generate

    run = {"model": str(tiny_sd), "steps": 2, "width": 32, "height": 32, "prompt": "a cat",
           "dynamic_thresholding": DynamicThresholding()}
    with pytest.raises(ValueError, match="--dynamic-thresholding and --guidance-rescale"):
        run_generate(out=tmp_path / "a.png", guidance_rescale=0.7, sampler="euler", schedule="karras", **run)
    with pytest.raises(ValueError, match="--dynamic-thresholding: .* plms here steps on timesteps"):
        run_generate(out=tmp_path / "b.png", sampler="PLMS", **run)
    with pytest.raises(ValueError, match="--dynamic-thresholding: .* euler without a schedule"):
        run_generate(out=tmp_path / "c.png", sampler="euler", **run)
    with pytest.raises(ValueError, match="--dynamic-thresholding: .* unipc combines the model outputs"):
        run_generate(out=tmp_path / "d.png", sampler="euler", schedule="karras", hires_scale=1.5,
                     hires_sampler="unipc", **{**run, "dynamic_thresholding": DynamicThresholding(
                         step_rule="timesteps")})  # (Forge's: the UNet patched, every pass)
    assert not list(tmp_path.iterdir())
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--dynamic-thresholding", "7", "x",
                 "--out", str(tmp_path / "e.png")]) == 2
    assert "--dynamic-thresholding: 'x' is not KEY=VALUE" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rule", ["calls", "timesteps"])
def test_a_hires_sampler_of_its_own_runs_plain_cfg_under_a1111s_extension(tiny_sd, tmp_path, monkeypatch, rule):
    """A1111's extension wraps ``p.sampler_name`` only, and A1111 builds the hires pass's own sampler
    (``hr_sampler_name``) by its plain name: that pass runs plain CFG — UniPC too, which the extension refuses only
    as the first pass's sampler. Forge's built-in ("timesteps") patches the UNet: both passes; "Use same sampler"
    keeps it in both under either rule."""
    from generate_recorder import record_generate

    from sdadapt.jobs import run_generate

    calls = record_generate(monkeypatch)
    setting = DynamicThresholding(mimic_scale=5.0, step_rule=rule)
    run = {"model": str(tiny_sd), "steps": 2, "width": 32, "height": 32, "prompt": "a cat", "sampler": "euler",
           "schedule": "karras", "hires_scale": 1.5, "denoising_strength": 0.5, "dynamic_thresholding": setting}
    lines = []
    run_generate(out=tmp_path / "a.png", hires_sampler="dpmpp_2m" if rule == "timesteps" else "unipc", **run,
                 log=lines.append)
    run_generate(out=tmp_path / "b.png", **run)
    thresholded = [kw.get("dynamic_thresholding") for kw, _ in calls]
    assert thresholded == ([setting, None] if rule == "calls" else [setting, setting]) + [setting, setting]
    assert any("the hires pass's own sampler (unipc) runs plain CFG" in line for line in lines) == (rule == "calls")


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "DynamicThresholding(mimic_scale")
    assert scope["fixed"].shape == (1, 3, 32, 32) and torch.isfinite(scope["fixed"]).all()
    plain = scope["generate"](scope["toy"], ["a red circle"], sampler="euler", schedule="karras", steps=8, seed=3,
                              guidance=12.0)
    assert (scope["fixed"] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("sampler,options", [("euler_a", {"schedule": "automatic", "inpaint": True}),
                                             ("dpmpp_2m", {"schedule": "karras", "img2img": True}),
                                             ("dpmpp_2m", {"schedule": "karras", "uncond_skip": True}),
                                             ("dpmpp_2s_a", {}), ("restart", {"schedule": "exponential"})])
def test_every_a1111_path_takes_it_and_the_mimic_at_the_scale_is_plain_guidance(system, sampler, options):
    """img2img, the inpainting blend, Skip Early CFG and the k-diffusion-only samplers: with the mimic scale at the
    guidance scale the run is plain guidance's (the clamp at its own maximum), with a lower one another run."""
    from guidance_terms import branch_inputs, path_options

    from sdadapt.samplers import sample_latents

    model, cond, uncond, x, _ = branch_inputs(system, seed=9, t=0)
    kwargs = path_options(options)

    def run(dt):
        return sample_latents(model, x, cond, sampler=sampler, alphas_cumprod=system.alphas_cumprod, num_steps=4,
                              uncond=uncond, guidance_scale=9.0, generator=torch.Generator().manual_seed(1),
                              dynamic_thresholding=dt, **kwargs)

    plain = run(None)
    assert torch.allclose(run(DynamicThresholding(mimic_scale=9.0)), plain, atol=1e-4)
    # (another run: ten times the tolerance above; Skip Early CFG guides few of the 4 steps, and how far the clamp moves
    # them depends on the tiny UNet's random weights, 0.005 with diffusers 0.35's initialisation)
    assert (run(DynamicThresholding(mimic_scale=2.0)) - plain).abs().max() > 1e-3
