"""``restart`` (A1111's "Restart", ``modules/sd_samplers_extra.py: restart_sampler``; no diffusers class): against
a float64 transcription of A1111's function written here (its Karras grid, same noise), its step and model-call
counts, and the registry / labels."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from sampler_stand_ins import (
    assert_guidance_is_the_guided_model,
    rel_err,
    sd_alphas_cumprod,
    stand_in,
)

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


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def a1111_restart_sampler(model, x, sigmas, noises, s_noise=1.0, restart_list=None):
    """A1111's ``restart_sampler`` transcribed (float64; ``randn_like`` -> the next of ``noises``)."""
    calls = 0

    def to_d(x, sigma, denoised):
        return (x - denoised) / sigma

    def heun_step(x, old_sigma, new_sigma, second_order=True):
        nonlocal calls
        denoised = model(x, old_sigma)
        calls += 1
        d = to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0 or not second_order:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma)
            calls += 1
            d_2 = to_d(x_2, new_sigma, denoised_2)
            x = x + (d + d_2) / 2 * dt
        return x

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps, restart_times = 9, 1
            if steps >= 36:
                restart_steps = steps // 4
                restart_times = 2
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))  # noqa: RUF007 (A1111's)
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        old_sigma, new_sigma = float(old_sigma), float(new_sigma)
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noises.pop(0) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x, len(step_list), calls


def _denoiser(ac):
    """CompVisDenoiser on the stand-in ε model at t(σ) (log-σ interpolation, float32-held)."""
    log_train = training_sigmas(ac).log()

    def model(x, sigma):
        d = math.log(sigma) - log_train
        low = min(int((d >= 0).cumsum(0).argmax()), len(log_train) - 2)
        w = min(max(float((log_train[low] - math.log(sigma)) / (log_train[low] - log_train[low + 1])), 0.0), 1.0)
        t = torch.full((x.shape[0],), (1 - w) * low + w * (low + 1), dtype=torch.float32).double()
        return x - sigma * stand_in(x / math.sqrt(sigma * sigma + 1), t)
    return model


def _noises(seed, shape, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("n", [1, 2, 5, 19, 20, 27, 36, 40])
def test_restart_is_a1111s_function(n):
    ac = sd_alphas_cumprod()
    train = training_sigmas(ac)
    x_T = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    seen, calls = [], []
    got = restart_sample(lambda x, t: (calls.append(1), stand_in(x, t))[1], x_T, alphas_cumprod=ac, num_steps=n,
                         generator=torch.Generator().manual_seed(3), callback=lambda i, t, x: seen.append(i))
    sigmas = get_sigmas_karras(n, float(train[0]), float(train[-1]))  # A1111's "Automatic" for Restart
    noises = _noises(3, x_T.shape, 10)
    want, count, want_calls = a1111_restart_sampler(_denoiser(ac), x_T * sigmas[0], sigmas, noises)
    assert seen == list(range(count)) and count == n  # n Heun steps in all, restarts included
    assert len(calls) == want_calls == 2 * n - 1
    assert len(noises) == 10 - (0 if n < 20 else 1 if n < 36 else 2)  # one draw per restart
    assert rel_err(got, want) < 1e-10, rel_err(got, want)


def test_restart_with_a_list_and_a_schedule():
    ac = sd_alphas_cumprod()
    train = training_sigmas(ac)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    restart_list = {0.5: (4, 3, 5.0), 3.0: (3, 1, 8.0)}
    got = restart_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=12, restart_list=restart_list, s_noise=0.8,
                         generator=torch.Generator().manual_seed(1))
    sigmas = get_sigmas_karras(12, float(train[0]), float(train[-1]))
    want, count, _ = a1111_restart_sampler(_denoiser(ac), x_T * sigmas[0], sigmas, _noises(1, x_T.shape, 10),
                                           s_noise=0.8, restart_list={k: list(v) for k, v in restart_list.items()})
    assert count == 12 + 3 * 3 + 1 * 2  # (4 σ: 3 steps) three times, (3 σ: 2 steps) once
    assert rel_err(got, want) < 1e-10
    # on another schedule: the same function given that grid
    from sdadapt.samplers.schedules import schedule_sigmas
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="Restart", alphas_cumprod=ac,
                         num_steps=24, schedule="exponential", generator=torch.Generator().manual_seed(2))
    sig = schedule_sigmas("exponential", 24, train)
    want, _, _ = a1111_restart_sampler(_denoiser(ac), x_T * sig[0], sig, _noises(2, x_T.shape, 5))
    assert rel_err(got, want) < 1e-10


def test_restart_pairs_jump_up_once_per_restart():
    sigmas = get_sigmas_karras(40, 0.03, 14.6)
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
