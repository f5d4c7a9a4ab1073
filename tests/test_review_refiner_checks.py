"""Review of the refiner handoff's checks and switch rule (sdadapt.jobs.generate_refiner) on stand-in systems (only the
attributes the checks read), so each refusal is pinned without building models: a pair refused names the model at
fault; A1111's cut (sd_samplers_common.apply_refiner: ``completed_ratio = (999 - argmin|sigmas - σ|) / 1000``,
switch when ``>= switch_at``) and diffusers' (``t < round(T - f·T)``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdadapt.jobs.generate_refiner import (
    RefinerHandoff,
    check_refiner_pair,
    handoff_report,
    refiner_cutoff,
)


def _acp():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # (SDXL's scaled_linear)
    return torch.cumprod(1 - betas, 0).float()


def _system(*, refiner=False, sdxl=True, channels=4, scaling=0.13025, prediction="epsilon", acp=None, edm=None):
    return SimpleNamespace(is_refiner=refiner, is_sdxl=sdxl, vae=SimpleNamespace(config=SimpleNamespace(
        latent_channels=channels)), scaling_factor=scaling, vae_factor=8, prediction_type=prediction,
        alphas_cumprod=_acp() if acp is None else acp, edm=edm)


def test_pairs_that_cannot_hand_latents_over_are_refused_by_name():
    base, refiner = _system(), _system(refiner=True)
    check_refiner_pair(base, refiner)
    for pair, match in (((base, _system()), "no Stable Diffusion model"),  # (a model refiner needs a UNet)
                        ((_system(sdxl=False), refiner), "not SDXL"),
                        ((_system(refiner=True), refiner), "the refiner itself"),
                        ((base, _system(refiner=True, scaling=0.18215)), "latent space"),
                        ((base, _system(refiner=True, channels=16)), "latent space"),
                        ((_system(prediction="v_prediction"), refiner), "predicts epsilon, the base v_prediction"),
                        ((base, _system(refiner=True, acp=_acp() * 0.999)), "training schedule")):
        with pytest.raises(ValueError, match=match):
            check_refiner_pair(*pair)
    with pytest.raises(ValueError, match="EDM model"):
        RefinerHandoff(_system(edm=object()), refiner, switch_at=0.8)


@pytest.mark.parametrize("switch_at", [0.0, 1.0, -0.2, 1.5])
def test_switch_at_outside_the_open_interval_is_refused(switch_at):
    with pytest.raises(ValueError, match="--refiner-switch-at must be in \\(0, 1\\)"):
        refiner_cutoff(switch_at)


def test_a1111_grid_cut_is_apply_refiners_ratio_at_the_nearest_index():
    """On A1111's grid the call at model index i is the refiner's when (999 - i) / 1000 >= f: f = 0.8 switches at
    i = 199 (ratio 0.8 exactly) and not at i = 200; a fractional t goes by its nearest index."""
    handoff = RefinerHandoff(_system(), _system(refiner=True), switch_at=0.8)
    assert handoff.cutoff == 200
    assert [handoff.late(t, a1111_grid=True) for t in (200.0, 199.0, 199.4, 199.6)] == [False, True, True, False]
    assert [handoff.late(t) for t in (200.0, 199.9, 199.0)] == [False, True, True]  # (diffusers: t < 200)


def test_the_refiner_keeps_the_run_and_counts_calls_per_run():
    """Once a call went to the refiner, later calls do too (a Restart sampler climbing back above the cut); the
    decoder is the refiner only when the last run gave it a call; a taken-over handoff sends every call to it."""
    base_calls, refiner_calls = [], []
    handoff = RefinerHandoff(_system(), _system(refiner=True), switch_at=0.5)
    model = handoff.switched(lambda x, t, c: base_calls.append(float(t)) or x,
                             lambda x, t, c: refiner_calls.append(float(t)) or x)
    x = torch.zeros(1)
    for t in (900.0, 600.0, 400.0, 700.0):
        model(x, torch.tensor(t))
    assert base_calls == [900.0, 600.0] and refiner_calls == [400.0, 700.0]
    assert handoff.calls == {"base": 2, "refiner": 2} and handoff.decoder("base") is handoff.refiner
    handoff.switched(lambda x, t, c: x, lambda x, t, c: x)(x, torch.tensor(999.0))  # (a run the base keeps)
    assert handoff.decoder("base") == "base" and handoff.calls == {"base": 3, "refiner": 2}
    whole = handoff.taken_over()
    whole.switched(lambda x, t, c: x, lambda x, t, c: x)(x, torch.tensor(999.0))
    assert whole.cutoff == math.inf and handoff.calls == {"base": 3, "refiner": 3} and whole.decoder("b") is whole.refiner
    assert "3 model calls on the base, 3 on the refiner (switch at 0.5: timesteps below 500)" in handoff_report(handoff)


def test_a_scheduled_guidance_is_told_the_runs_call_count():
    """A prompt plan's guidance on either side gets the run's call count (not each model's own), as A1111's step."""
    seen = []

    class Scheduled:
        calls = None

        def __init__(self, name):
            self.name = name

        def __call__(self, x, t, c):
            seen.append((self.name, self.calls))
            return x

    handoff = RefinerHandoff(_system(), _system(refiner=True), switch_at=0.5)
    model = handoff.switched(Scheduled("base"), Scheduled("refiner"))
    for t in (900.0, 600.0, 400.0, 100.0):
        model(torch.zeros(1), torch.tensor(t))
    assert seen == [("base", 0), ("base", 1), ("refiner", 2), ("refiner", 3)]
