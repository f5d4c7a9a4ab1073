"""The test helpers that batch 22 folded duplicated copies into (``sampler_stand_ins``: SD's float64 ᾱ, the relative
error, k-diffusion's ``get_ancestral_step`` and ``DPMSolver``; ``step_size_runs.assert_resumed_run_is_straight``),
checked on their own: against diffusers, a naive formula, invariants, and a resume that is not one."""

from __future__ import annotations

import math

import pytest
import torch
from sampler_stand_ins import (
    SD_BETAS,
    KDiffusionDPMSolver,
    get_ancestral_step,
    rel_err,
    sd_alphas_cumprod,
)
from step_size_runs import (
    assert_resumed_run_is_straight,
    gradients,
    params_of,
    run,
    weights,
)
from torch import nn

from sdadapt.training.prodigy import Prodigy

SHAPES = [(4, 3), (5,)]


def test_sd_alphas_cumprod_is_diffusers_schedule_in_float64():
    diffusers = pytest.importorskip("diffusers")
    ac = sd_alphas_cumprod()
    want = diffusers.DDPMScheduler(**SD_BETAS).alphas_cumprod  # (float32: diffusers' own cumprod)
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    torch.testing.assert_close(ac.float(), want, rtol=1e-6, atol=1e-7)
    # (naive: the scaled-linear betas one by one, their product in Python floats)
    naive = [math.prod(1 - (0.00085**0.5 + j * (0.012**0.5 - 0.00085**0.5) / 999) ** 2 for j in range(i + 1))
             for i in (0, 500, 999)]
    assert [float(ac[i]) for i in (0, 500, 999)] == pytest.approx(naive, rel=1e-12)


def test_rel_err_is_the_max_difference_over_the_references_scale():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g, dtype=torch.float64)
    naive = max(abs(float(x) - float(y)) for x, y in zip(a.flatten(), b.flatten())) / max(abs(float(y)) for y in b.flatten())
    assert rel_err(a, b) == pytest.approx(naive, rel=1e-12)
    assert rel_err(b, b) == 0.0 and math.isfinite(rel_err(a, torch.zeros(3, 4)))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])
def test_get_ancestral_step_splits_the_target_variance(eta):
    for s_from, s_to in [(14.6, 9.0), (1.0, 0.5), (0.3, 0.0)]:
        down, up = get_ancestral_step(s_from, s_to, eta)
        assert down**2 + up**2 == pytest.approx(s_to**2, abs=1e-12) and 0.0 <= up <= s_to
        if eta == 0:
            assert (down, up) == (s_to, 0.0)
        else:  # (k-diffusion: σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)))
            assert up == pytest.approx(min(s_to, eta * s_to * math.sqrt(1 - s_to**2 / s_from**2)), abs=1e-12)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 9])
def test_dpm_solver_fast_makes_nfe_calls_and_reports_each_step(nfe):
    """k-diffusion's orders (order-3 steps, then 2, 1 or the remainder) use exactly ``nfe`` model calls; on ε = 0 (data
    at x itself) every step keeps x; the info callback sees i = 0, 1, ... once per step, after its first call."""
    seen, calls = [], []
    solver = KDiffusionDPMSolver(lambda x, sigma: (calls.append(sigma), torch.zeros_like(x))[1], lambda like: 0.0,
                                 lambda d: seen.append((d["i"], len(calls))))
    x = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(nfe), dtype=torch.float64)
    out = solver.fast(x, -math.log(14.6), -math.log(0.03), nfe)
    assert solver.calls == len(calls) == nfe and torch.equal(out, x)
    assert [i for i, _ in seen] == list(range(nfe // 3 + 1)) and seen[0] == (0, 1)  # (floor(nfe/3) + 1 steps)


def test_a_resume_that_is_not_one_fails_the_resume_check():
    """A proper resume (the state loaded) passes; one from a fresh optimiser (nothing loaded) fails; with no step left,
a weight apart or ``d`` apart alone fails it."""
    w, grads = weights(SHAPES), gradients(8, SHAPES)
    for load in (True, False):
        straight = params_of(w)
        reference = Prodigy(straight, d_coef=2.0)
        run(reference, straight, grads[:4])
        resumed = [nn.Parameter(p.detach().clone()) for p in straight]
        optimizer = Prodigy(resumed, d_coef=2.0)
        if load:
            optimizer.load_state_dict(reference.state_dict())
            assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])
            with torch.no_grad():
                resumed[1][0] += 1e-3
            with pytest.raises(AssertionError):  # (no step: equal d, a weight not)
                assert_resumed_run_is_straight(reference, straight, optimizer, resumed, [])
        else:
            with pytest.raises(AssertionError):  # (no step: equal weights, d not)
                assert_resumed_run_is_straight(reference, straight, optimizer, resumed, [])
            with pytest.raises(AssertionError):
                assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])
