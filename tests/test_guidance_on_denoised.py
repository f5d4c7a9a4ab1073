"""On A1111's grids classifier-free guidance, ``AND`` sub-prompts and the inpainting blend run on x̂0, as A1111's
``CFGDenoiser`` runs them over its ``CompVisDenoiser`` (modules/sd_samplers_cfg_denoiser.py ``forward`` and
``combine_denoised``): each branch's output read to x̂0 in float32 first, then ``u + Σ (c_i − u)·(w_i·s)`` on those,
then ``init·mask + nmask·x̂0`` — bit for bit (sdadapt.denoised_branches). Combining the model outputs first is the
same up to float rounding (5e-7..1.1e-6 relative at the end at scale 7.5); diffusers' grids keep that (diffusers'
pipelines combine ε). The samplers are k-diffusion 4601bf0 transcribed in tests/test_kdiffusion_float32.py."""

from __future__ import annotations

import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32, _get_sigmas, _sigma_to_t
from test_kdiffusion_float32 import _karras, _kd_euler, _run_reference, _x_T

from sdadapt.img2img import Img2ImgStart
from sdadapt.prompt_guidance import plan_prompt
from sdadapt.samplers import sample_latents
from sdadapt.samplers.euler import euler_sample
from sdadapt.training.diffusion import guided


def _unet(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A stand-in model whose output depends on each row's conditioning ``cond`` (B, L, D) (rows independent, so a
    batch of uncond and cond rows gives each row's own output)."""
    c = cond[:, 0, 0].to(x.dtype).view(-1, 1, 1, 1)
    return stand_in(x * (1 + c), t) + 0.3 * c


def _cond(value: float, batch: int = 2) -> torch.Tensor:
    return torch.full((batch, 3, 4), value)


def _x0(prediction_type: str, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor, half: bool = False):
    """A1111's ``CompVisDenoiser`` / ``CompVisVDenoiser`` of :func:`_unet` at σ ``s`` (B,): float32 scalings, the
    model's (half) output promoted by them."""
    c = lambda v: v[:, None, None, None]
    c_in = c(1 / (s ** 2 + 1.0) ** 0.5)
    out = _unet(x * c_in, _sigma_to_t(s), cond)
    out = out.half() if half else out
    if prediction_type == "epsilon":
        return x + out * c(-s)
    return out * c(-s * 1.0 / (s ** 2 + 1.0) ** 0.5) + x * c(1.0 / (s ** 2 + 1.0))


def _cfg_denoiser(prediction_type: str, parts: list[tuple[float, float]], negative: float, scale: float, *,
                  half: bool = False, init: torch.Tensor | None = None, latmask: torch.Tensor | None = None):
    """A1111's ``CFGDenoiser.forward`` over :func:`_x0`: one batch ``[sub-prompts..., negative]``, then
    ``combine_denoised`` (``denoised = clone(u); denoised += (x_out[c] − u)·(w·s)``), then the inpainting blend
    ``init·mask + nmask·denoised`` (``mask = 1 − latmask``)."""
    def model(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        conds = torch.cat([_cond(v, b) for v, _ in parts] + [_cond(negative, b)])
        k = len(parts) + 1
        x_out = _x0(prediction_type, x.repeat(k, 1, 1, 1), s.repeat(k), conds, half)
        uncond = x_out[-b:]
        denoised = torch.clone(uncond)
        for j, (_, weight) in enumerate(parts):
            denoised += (x_out[j * b:(j + 1) * b] - uncond) * (weight * scale)
        if latmask is not None:
            denoised = init * (1.0 - latmask) + latmask * denoised
        return denoised
    return model


def _sigmas(schedule: str, steps: int) -> torch.Tensor:
    return _get_sigmas(steps) if schedule == "uniform" else _karras(steps)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2s_a"])
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_guidance_on_a1111_grids_is_a1111s_cfg_denoiser(sampler, schedule, prediction_type, scale):
    steps = 12
    x_T = _x_T(3)
    want = _run_reference(sampler, _cfg_denoiser(prediction_type, [(0.5, 1.0)], -0.25, scale), x_T,
                          _sigmas(schedule, steps))
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=scale, sampler=sampler,
                         alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type, schedule=schedule,
                         generator=torch.Generator().manual_seed(7))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


def test_combining_model_outputs_is_off_by_rounding_and_diffusers_grids_keep_it():
    """The control: the same run guiding the model outputs (diffusers' way) differs from A1111's in the last bits
    (this file's tests can fail); without a schedule (diffusers' grid) ``sample_latents`` is exactly that run."""
    x_T, steps = _x_T(3), 12
    want = _run_reference("euler", _cfg_denoiser("epsilon", [(0.5, 1.0)], -0.25, 7.5), x_T, _sigmas("karras", steps))
    on_outputs = guided(_unet, _cond(0.5), _cond(-0.25), 7.5)
    plain = euler_sample(lambda x, t: on_outputs(x, t, None), x_T, alphas_cumprod=AC, num_steps=steps,
                         schedule="karras")
    assert not torch.equal(plain, want) and rel_err(plain, want) < 1e-5
    diffusers = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler="euler",
                               alphas_cumprod=AC, num_steps=steps)
    assert torch.equal(diffusers, euler_sample(lambda x, t: on_outputs(x, t, None), x_T, alphas_cumprod=AC,
                                               num_steps=steps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_and_sub_prompts_combine_on_x0(prediction_type):
    """A prompt plan's ``AND`` (weights 1 and 0.5) through :class:`~sdadapt.prompt_guidance.ScheduledGuidance`, with
    a ``before_model_call`` hook between (its wrapper passes the x̂0 reading on)."""
    steps, values = 10, {"a": 0.5, " b": -0.75, "n": -0.25}
    plan = plan_prompt("a AND b:0.5", "n", steps=steps)
    model = plan.guidance(_unet, [_cond(values[t]) for t in plan.texts], [_cond(values[t]) for t in
                                                                            plan.negative_texts], 7.5)
    x_T = _x_T(5)
    calls = []
    got = sample_latents(model, x_T, None, sampler="heun", alphas_cumprod=AC, num_steps=steps,
                         prediction_type=prediction_type, schedule="karras",
                         before_model_call=lambda done, n: calls.append(done))
    want = _run_reference("heun", _cfg_denoiser(prediction_type, [(0.5, 1.0), (-0.75, 0.5)], -0.25, 7.5), x_T,
                          _sigmas("karras", steps))
    assert torch.equal(got, want), rel_err(got, want)
    assert len(calls) == 2 * steps - 1  # (Heun: two calls a step, one on the last)


@pytest.mark.parametrize("scale", [7.5, 1.0])
def test_half_outputs_are_read_in_float32(scale):
    """A model returning half outputs: A1111's float32 σ scalings promote them (``eps·c_out`` in float32); at scale
    1 the model on the prompt alone (no negative pass), read the same way."""
    def half_unet(x, t, cond):
        return _unet(x, t, cond).half()

    steps, x_T = 8, _x_T(9)
    got = sample_latents(half_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=scale, sampler="euler",
                         alphas_cumprod=AC, num_steps=steps, schedule="karras")
    if scale == 1.0:
        reference = lambda x, s: _x0("epsilon", x, s, _cond(0.5, x.shape[0]), half=True)
    else:
        reference = _cfg_denoiser("epsilon", [(0.5, 1.0)], -0.25, scale, half=True)
    want = _run_reference("euler", reference, x_T, _sigmas("karras", steps))
    assert torch.equal(got, want), rel_err(got, want)


def test_inpainting_blends_x0_as_a1111():
    """A masked img2img run on A1111's grid: ``sigmas[index:]``, ``x = init + noise·σ``, the blend on x̂0 after the
    guidance, and ``samples·nmask + init·mask`` at the end (A1111's ``CFGDenoiser`` and ``sample_img2img``)."""
    steps, index = 10, 3
    x_T = _x_T(11)
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(12))
    latmask = torch.zeros(1, 1, *x_T.shape[2:])
    latmask[..., 1:4, 2:5] = 1.0
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=7.5, sampler="euler",
                         alphas_cumprod=AC, num_steps=steps, schedule="karras",
                         start=Img2ImgStart(init, index=index, mask=latmask))
    sigmas = _sigmas("karras", steps)[index:]
    denoiser = _cfg_denoiser("epsilon", [(0.5, 1.0)], -0.25, 7.5, init=init, latmask=latmask)
    samples = _kd_euler(denoiser, init + x_T * sigmas[0], sigmas)
    want = init * (1.0 - latmask) + latmask * samples
    assert torch.equal(got, want), rel_err(got, want)


class _ByBranchOnly:
    """A model that gives x̂0 only by branch: a sampler calling it for a plain output fails the test."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, t, cond):
        raise AssertionError("the sampler combined on the model output, not on x̂0")

    def denoised_by_branch(self, read, x, t, cond, *, sigma):
        self.calls += 1
        return read(stand_in(x, t))


A1111_SAMPLERS = ["lms", "euler", "heun", "dpm_2", "dpm_2_a", "euler_a", "dpmsolver++", "dpmsolver++_sde", "dpmpp_sde",
                  "dpmpp_2s_a", "dpmsolver++_3m_sde", "dpmsolver++_sde_heun", "restart", "lcm", "dpm_fast",
                  "dpm_adaptive"]


@pytest.mark.parametrize("sampler", A1111_SAMPLERS)
def test_every_a1111_sampler_reads_its_model_calls_by_branch(sampler):
    """Every sampler A1111 runs through k-diffusion asks for x̂0 by branch on A1111's grids (``dpm_fast`` and
    ``dpm_adaptive``: always), and that reading equals reading the plain output (no guidance: nothing to combine)."""
    schedule = None if sampler in ("dpm_fast", "dpm_adaptive") else "karras"
    x_T = _x_T(13)
    run = {"sampler": sampler, "alphas_cumprod": AC, "num_steps": 6, "schedule": schedule}
    model = _ByBranchOnly()
    got = sample_latents(model, x_T, None, generator=torch.Generator().manual_seed(3), **run)
    want = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, generator=torch.Generator().manual_seed(3),
                          **run)
    assert model.calls > 0 and torch.equal(got, want), rel_err(got, want)


def test_the_refiner_switch_passes_the_reading_on():
    """:meth:`~sdadapt.jobs.generate_refiner.RefinerHandoff.switched`'s model sends the by-branch reading to the model
    it picks (base or refiner)."""
    from sdadapt.jobs.generate_refiner import _Switched

    base, refiner = _ByBranchOnly(), _ByBranchOnly()
    switched = _Switched(lambda t: base if float(t[0]) > 500 else refiner)
    x_T = _x_T(17)
    got = sample_latents(switched, x_T, None, sampler="euler", alphas_cumprod=AC, num_steps=8, schedule="karras")
    want = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler", alphas_cumprod=AC, num_steps=8,
                          schedule="karras")
    assert base.calls > 0 and refiner.calls > 0 and torch.equal(got, want)


@pytest.mark.parametrize("schedule", ["automatic", "karras"])
def test_a1111s_lcm_guides_its_consistency_outputs(schedule):
    """A1111's LCM sampler (``lcm`` on a schedule) with guidance: ``combine_denoised`` over the ``LCMCompVisDenoiser``
    outputs of both halves (tests/test_lcm_a1111.py's transcription), then ``sample_lcm``'s noise."""
    from test_lcm_a1111 import A1111LCM

    n, scale, x_T = 6, 4.0, _x_T(19)
    wrap = A1111LCM(AC, F32)
    sigmas = wrap.schedule(schedule, n)
    g = torch.Generator().manual_seed(5)
    x = x_T * sigmas[0]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        u = wrap(lambda a, t: _unet(a, t, _cond(-0.25)), x, sigmas[i] * s_in, [])
        c = wrap(lambda a, t: _unet(a, t, _cond(0.5)), x, sigmas[i] * s_in, [])
        x = torch.clone(u)
        x += (c - u) * (1.0 * scale)
        if sigmas[i + 1] > 0:
            x += sigmas[i + 1] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=scale, sampler="lcm",
                         alphas_cumprod=AC, num_steps=n, schedule=schedule, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, x), rel_err(got, x)
