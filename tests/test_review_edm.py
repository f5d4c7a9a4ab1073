"""Review of the EDM (Playground v2.5) sampler and file reading: the cases the first tests left open, each against
the installed diffusers (huggingface/diffusers 0.42.1 schedulers/scheduling_edm_dpmsolver_multistep.py ``step``:
``lower_order_final`` / ``lower_order_second`` use ``len(self.timesteps) < 15``, so 15 steps is the first count
that keeps the full order to the end)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdadapt.formats.edm import (
    PLAYGROUND_SCHEDULER,
    edm_stats,
    has_edm_stats,
    vae_latent_stats,
)
from sdadapt.formats.files import WeightFileError
from sdadapt.samplers.edm import (
    EDMSchedule,
    check_edm_request,
    edm_dpmsolver_sample,
    edm_euler_sample,
    edm_precondition,
    edm_sigmas,
)

CONFIG = {k: v for k, v in PLAYGROUND_SCHEDULER.items() if not k.startswith("_")}


def _stand_in(x, t):
    """A smooth stand-in for the UNet output (B, C, H, W) at c_noise t (B,)."""
    return torch.tanh(0.7 * x + 0.3 * t.view(-1, 1, 1, 1)) + 0.1 * x


def _diffusers_loop(scheduler, x, steps):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = _stand_in(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("change", [{}, {"final_sigmas_type": "sigma_min"}, {"solver_order": 3}])
@pytest.mark.parametrize("steps", [14, 15])
def test_the_order_drops_at_the_end_below_15_steps_only(change, steps):
    """14 steps: the last two steps lower their order; 15: they keep it (σ_min end) — diffusers' rule exactly."""
    config = {**CONFIG, **change}
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    theirs = _diffusers_loop(diffusers.EDMDPMSolverMultistepScheduler(**config), x, steps)
    ours = edm_dpmsolver_sample(_stand_in, x, schedule=EDMSchedule.from_config(config), num_steps=steps)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_bad_schedules_and_requests_are_refused_by_name():
    for change, match in (({"sigma_schedule": "linear"}, "sigma_schedule"), ({"solver_order": 4}, "solver_order 1-3"),
                          ({"sigma_min": 90.0}, "sigma_min < sigma_max"), ({"sigma_data": 0.0}, "sigma_data > 0"),
                          ({"prediction_type": "sample"}, "prediction_type")):
        with pytest.raises(ValueError, match=match):
            EDMSchedule.from_config({**CONFIG, **change})
    with pytest.raises(ValueError, match="prediction_type 'epsilon' or 'v_prediction', got 'sample'"):
        edm_precondition(torch.tensor(1.0), sigma_data=0.5, prediction_type="sample")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        edm_sigmas(EDMSchedule(), 0, sampler="euler")
    with pytest.raises(ValueError, match="no third-order step"):
        edm_dpmsolver_sample(_stand_in, torch.zeros(1, 4, 2, 2), schedule=EDMSchedule(solver_order=3), num_steps=2,
                             algorithm_type="sde-dpmsolver++")
    check_edm_request("euler", schedule_options=type("Options", (), {"is_default": True})())  # (nothing refused)
    for option, match in (({"clip_sample": 1.0}, "leave out clip_sample"), ({"noise": "a1111-cpu"}, "A1111's noise"),
                          ({"refiner": object()}, "a refiner"), ({"schedule": "karras"}, "a schedule"),
                          ({"schedule_options": type("Options", (), {"is_default": False})()}, "schedule options")):
        with pytest.raises(ValueError, match=match):
            check_edm_request("dpmsolver++", **option)


def test_latent_statistics_need_both_halves():
    """A file with edm_mean alone is not told EDM (ComfyUI and diffusers test edm_mean and edm_std); empty or non-finite
    statistics are refused by name; a VAE config with only latents_mean has no statistics (diffusers' decode needs
    both)."""
    assert has_edm_stats(["state_dict.edm_mean", "state_dict.edm_std", "model.diffusion_model.x"])
    assert not has_edm_stats(["edm_mean", "model.diffusion_model.x"]) and not has_edm_stats(["edm_std"])
    with pytest.raises(WeightFileError, match="one per latent channel"):
        edm_stats({"edm_mean": torch.zeros(0), "edm_std": torch.zeros(0)}, source="x.safetensors")
    with pytest.raises(WeightFileError, match="x.safetensors: .*finite"):
        edm_stats({"edm_mean": torch.tensor([0.0, float("nan")]), "edm_std": torch.ones(2)}, source="x.safetensors")
    assert vae_latent_stats({"latents_mean": [0.1, 0.2], "latents_std": None}) is None
    assert vae_latent_stats({"latents_std": [1.0]}) is None
    assert vae_latent_stats({"latents_mean": [0.5], "latents_std": [2]}) == ([0.5], [2.0])


@pytest.mark.parametrize("sampler", ["euler", "dpmsolver++"])
def test_edm_sample_latents_guides_and_announces_each_model_call(sampler):
    """``before_model_call(steps_done, calls)`` before every UNet call (as sample_latents tells the interrupt / preview
    hooks), the step callback still called; guidance u + s·(c − u) over the UNet outputs."""
    from sdadapt.samplers.edm import edm_sample_latents

    calls, steps = [], []

    def model(x, t, cond):
        return _stand_in(x, t) * (1.0 if cond == "c" else 0.5)

    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    schedule = EDMSchedule.from_config(CONFIG)
    out = edm_sample_latents(model, x, "c", sampler=sampler, schedule=schedule, num_steps=3, uncond="u",
                             guidance_scale=3.0, before_model_call=lambda s, c: calls.append((s, c)),
                             callback=lambda i, s, x: steps.append(i))
    assert steps == [0, 1, 2] and [s for s, _ in calls] == [0, 1, 2] and all(c == 0 for _, c in calls)

    def guided(x, t):
        u = _stand_in(x, t) * 0.5
        return u + 3.0 * (_stand_in(x, t) - u)

    sample = edm_euler_sample if sampler == "euler" else edm_dpmsolver_sample
    torch.testing.assert_close(out, sample(guided, x, schedule=schedule, num_steps=3), rtol=1e-5, atol=1e-5)
