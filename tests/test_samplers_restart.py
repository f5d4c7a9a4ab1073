"""``restart`` (A1111's "Restart", ``modules/sd_samplers_extra.py: restart_sampler``; no diffusers class): against
A1111's function transcribed (tests/test_restart_a1111_float32.py) run in float64 (its Karras grid, same noise),
its step and model-call counts, and the registry / labels."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from sampler_stand_ins import (
    assert_guidance_is_the_guided_model,
    rel_err,
    sd_alphas_cumprod,
    stand_in,
)
from test_restart_a1111_float32 import _denoiser64, a1111_restart_sampler, get_sigmas_karras

from sdadapt.samplers import (
    KARRAS_SAMPLERS,
    SAMPLERS,
    SCHEDULE_SAMPLERS,
    resolve_schedule,
    sample_latents,
)
from sdadapt.samplers.labels import A1111_MISSING, sampler_from_label
from sdadapt.samplers.restart import restart_sample, restart_steps
from sdadapt.samplers.sigma_space import training_sigmas


def _counted_noise(seed: int, drawn: list[int]):
    """A1111's ``randn_like`` as float64 draws of a seeded generator, each draw counted in ``drawn``."""
    g = torch.Generator().manual_seed(seed)

    def randn_like(like: torch.Tensor) -> torch.Tensor:
        drawn.append(1)
        return torch.randn(like.shape, generator=g, dtype=torch.float64)
    return randn_like


@pytest.mark.parametrize("n", [1, 2, 5, 19, 20, 27, 36, 40])
def test_restart_is_a1111s_function(n):
    ac = sd_alphas_cumprod()
    train = training_sigmas(ac)
    x_T = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    seen, calls = [], []
    got = restart_sample(lambda x, t: (calls.append(1), stand_in(x, t))[1], x_T, alphas_cumprod=ac, num_steps=n,
                         generator=torch.Generator().manual_seed(3), callback=lambda i, t, x: seen.append(i))
    sigmas = get_sigmas_karras(n, float(train[0]), float(train[-1]), dtype=torch.float64)  # A1111's "Automatic"
    drawn: list[int] = []
    want, model_sigmas_seen = a1111_restart_sampler(_denoiser64, x_T * sigmas[0], sigmas, _counted_noise(3, drawn))
    assert seen == list(range(n))  # n Heun steps in all, restarts included
    assert len(calls) == len(model_sigmas_seen) == 2 * n - 1
    assert len(drawn) == (0 if n < 20 else 1 if n < 36 else 2)  # one draw per restart
    assert rel_err(got, want) < 1e-10, rel_err(got, want)


def test_restart_with_a_list_and_a_schedule():
    ac = sd_alphas_cumprod()
    train = training_sigmas(ac)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    restart_list = {0.5: (4, 3, 5.0), 3.0: (3, 1, 8.0)}
    got = restart_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=12, restart_list=restart_list, s_noise=0.8,
                         generator=torch.Generator().manual_seed(1))
    sigmas = get_sigmas_karras(12, float(train[0]), float(train[-1]), dtype=torch.float64)
    want, seen = a1111_restart_sampler(_denoiser64, x_T * sigmas[0], sigmas, _counted_noise(1, []), s_noise=0.8,
                                       restart_list={k: list(v) for k, v in restart_list.items()})
    assert len(seen) == 2 * (12 + 3 * 3 + 1 * 2) - 1  # (4 σ: 3 steps) three times, (3 σ: 2 steps) once
    assert rel_err(got, want) < 1e-10
    # on another schedule: the same function given that grid
    from sdadapt.samplers.schedules import schedule_sigmas
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="Restart", alphas_cumprod=ac,
                         num_steps=24, schedule="exponential", generator=torch.Generator().manual_seed(2))
    sig = schedule_sigmas("exponential", 24, train)
    want, _ = a1111_restart_sampler(_denoiser64, x_T * sig[0], sig, _counted_noise(2, []))
    assert rel_err(got, want) < 1e-10


def test_restart_pairs_jump_up_once_per_restart():
    sigmas = get_sigmas_karras(40, 0.03, 14.6, dtype=torch.float64)
    pairs = restart_steps(sigmas)
    ups = [i for i in range(1, len(pairs)) if pairs[i][0] > pairs[i - 1][1]]
    assert len(pairs) == 40 and len(ups) == 2  # n ≥ 36: 10-step segments, twice
    assert all(1.8 < pairs[i][0] < 2.3 for i in ups)  # back up to σ ≈ 2
    assert restart_steps(sigmas[:11]) == list(itertools.pairwise(sigmas[:11].tolist()))  # < 20 steps: no restart
    # a given list: no segment when σ_max_r is not above σ_min_r on the grid (A1111's max_idx < min_idx) or times = 0
    plain = list(itertools.pairwise(sigmas.tolist()))
    assert restart_steps(sigmas, {1.0: (4, 2, 0.5)}) == plain
    assert restart_steps(sigmas, {1.0: (4, 2, 1.0)}) == plain
    assert restart_steps(sigmas, {1.0: (4, 0, 5.0)}) == plain
    one = restart_steps(sigmas, {1.0: (4, 1, 5.0)})
    assert len(one) == 40 + 3 and sum(one[i][0] > one[i - 1][1] for i in range(1, len(one))) == 1


def test_registered_names_labels_and_options():
    assert "restart" in SAMPLERS and "restart" in KARRAS_SAMPLERS and "restart" in SCHEDULE_SAMPLERS
    assert sampler_from_label("Restart") == ("restart", False) and "restart" not in A1111_MISSING
    assert resolve_schedule("restart", "automatic") == "karras"
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = restart_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=8)
    assert torch.equal(plain, restart_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=8, karras=True))
    with pytest.raises(ValueError, match="s_noise must be >= 0"):
        restart_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=8, s_noise=-1)
    assert_guidance_is_the_guided_model("restart", functools.partial(restart_sample, alphas_cumprod=ac.float()),
                                        alphas_cumprod=ac.float(), karras=False, num_steps=21)
