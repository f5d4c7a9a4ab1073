"""A1111's schedule settings in the infotext: ``KDiffusionSampler.get_sigmas`` (A1111 v1.10) writes "Schedule min
sigma" / "Schedule max sigma" when set and not the model's own σ, "Schedule rho" for a scheduler with a ρ of its own
(Karras 7, Polyexponential 1) when set and not that, "Beta schedule alpha/beta" whenever Beta runs — and nothing when
Automatic is the sampler's own grid (no scheduler). Transcribed as ``_a1111_fields`` and checked on the toy's PNGs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from sampler_stand_ins import sd_alphas_cumprod

from sdadapt.jobs import run_generate
from sdadapt.jobs.models import load_system
from sdadapt.samplers.schedules import ScheduleOptions
from sdadapt.samplers.sigma_space import model_sigmas


def _a1111_fields(label: str | None, opts: dict, m_sigma_min: float, m_sigma_max: float) -> dict:
    """``get_sigmas``' extra_generation_params (label: the scheduler run; None: Automatic without one)."""
    out: dict = {}
    if label is None:
        return out
    if opts.get("sigma_min", 0) != 0 and opts["sigma_min"] != m_sigma_min:
        out["Schedule min sigma"] = opts["sigma_min"]
    if opts.get("sigma_max", 0) != 0 and opts["sigma_max"] != m_sigma_max:
        out["Schedule max sigma"] = opts["sigma_max"]
    default_rho = {"Karras": 7.0, "Polyexponential": 1.0}.get(label, -1)
    if default_rho != -1 and opts.get("rho", 0) != 0 and opts["rho"] != default_rho:
        out["Schedule rho"] = opts["rho"]
    if label == "Beta":
        out["Beta schedule alpha"], out["Beta schedule beta"] = opts.get("beta_alpha", 0.6), opts.get("beta_beta", 0.6)
    return out


CASES = [("karras", "Karras", {"rho": 5.0, "sigma_min": 0.05}), ("karras", "Karras", {"rho": 7.0}),
         ("polyexponential", "Polyexponential", {"rho": 1.0, "sigma_max": 20.0}),
         ("exponential", "Exponential", {"rho": 3.0}), ("beta", "Beta", {}), ("beta", "Beta", {"beta_alpha": 0.5}),
         ("uniform", "Uniform", {"sigma_max": 20.0}), ("automatic", None, {"sigma_max": 20.0, "rho": 3.0})]


@pytest.mark.parametrize("schedule, label, opts", CASES)
def test_the_infotext_has_a1111s_schedule_fields(tmp_path, schedule, label, opts):
    run_generate(prompt="a red circle", out=tmp_path / "a.png", sampler="euler", steps=3, schedule=schedule, **opts)
    text = Image.open(tmp_path / "a.png").text["parameters"].split("\n")[-1]
    fields = dict(item.split(": ", 1) for item in text.split(", "))
    written = {k: float(v) for k, v in fields.items() if k.startswith(("Schedule m", "Schedule rho", "Beta"))}
    sigmas = model_sigmas(load_system("toy").alphas_cumprod, torch.float32)  # (A1111's model_wrap.sigmas)
    assert written == _a1111_fields(label, opts, float(sigmas[0]), float(sigmas[-1]))


def test_the_models_own_bounds_are_not_written():
    """σ settings equal to the model's own are A1111's no-ops and stay out, as in its get_sigmas."""
    sigmas = model_sigmas(sd_alphas_cumprod(), torch.float32)
    own = ScheduleOptions(sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]))
    assert own.infotext_fields("karras", sigmas) == {}
    assert ScheduleOptions(sigma_min=0.1).infotext_fields("karras", sigmas) == {"Schedule min sigma": 0.1}
