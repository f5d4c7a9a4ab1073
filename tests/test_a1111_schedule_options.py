"""A1111's schedule settings (``ScheduleOptions``: sigma min/max, rho, Beta α/β, old Karras σ) against a float64
transcription of A1111's ``KDiffusionSampler.get_sigmas`` with k-diffusion's and ``sd_schedulers``' grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdadapt.samplers import sample_latents
from sdadapt.samplers.schedules import ScheduleOptions, schedule_sigmas
from sdadapt.samplers.sigma_space import training_sigmas

stats = pytest.importorskip("scipy.stats")


def _train() -> np.ndarray:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return training_sigmas(torch.cumprod(1 - betas, 0)).numpy()


class Model:
    """k-diffusion's ``DiscreteSchedule`` (quantize off) on ascending training σ."""

    def __init__(self, sigmas: np.ndarray):
        self.sigmas, self.log_sigmas = sigmas, np.log(sigmas)

    def sigma_to_t(self, sigma: float) -> float:
        log_sigma = math.log(sigma)
        low = min(int(np.cumsum(log_sigma - self.log_sigmas >= 0).argmax()), len(self.sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: float) -> float:
        lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
        return math.exp((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])

    def get_sigmas(self, n: int) -> list[float]:
        return [self.t_to_sigma(t) for t in np.linspace(len(self.sigmas) - 1, 0, n)] + [0.0]


def karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return list((hi + ramp * (lo - hi)) ** rho) + [0.0]


def exponential(n, sigma_min, sigma_max):
    return list(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))) + [0.0]


def polyexponential(n, sigma_min, sigma_max, rho=1.0):
    ramp = np.linspace(1, 0, n) ** rho
    return list(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))) + [0.0]


def kl_optimal(n, sigma_min, sigma_max):
    i = np.arange(n + 1)
    return list(np.tan(i / n * math.atan(sigma_min) + (1.0 - i / n) * math.atan(sigma_max)))


def normal(n, sigma_min, sigma_max, model, sgm=False):
    start, end = model.sigma_to_t(sigma_max), model.sigma_to_t(sigma_min)
    ts = np.linspace(start, end, n + 1)[:-1] if sgm else np.linspace(start, end, n)
    return [model.t_to_sigma(t) for t in ts] + [0.0]


def beta(n, sigma_min, sigma_max, alpha, b):
    return [sigma_min + stats.beta.ppf(q, alpha, b) * (sigma_max - sigma_min) for q in 1 - np.linspace(0, 1, n)] + [0.0]


#: A1111's Scheduler table: name -> (function(n, sigma_min, sigma_max, model, opts, **rho), default_rho)
SCHEDULERS = {
    "uniform": (lambda n, lo, hi, m, o: m.get_sigmas(n), -1),
    "karras": (lambda n, lo, hi, m, o, **kw: karras(n, lo, hi, **kw), 7.0),
    "exponential": (lambda n, lo, hi, m, o: exponential(n, lo, hi), -1),
    "polyexponential": (lambda n, lo, hi, m, o, **kw: polyexponential(n, lo, hi, **kw), 1.0),
    "sgm_uniform": (lambda n, lo, hi, m, o: normal(n, lo, hi, m, sgm=True), -1),
    "kl_optimal": (lambda n, lo, hi, m, o: kl_optimal(n, lo, hi), -1),
    "normal": (lambda n, lo, hi, m, o: normal(n, lo, hi, m), -1),
    "beta": (lambda n, lo, hi, m, o: beta(n, lo, hi, o["beta_dist_alpha"], o["beta_dist_beta"]), -1),
    "simple": (lambda n, lo, hi, m, o: [m.sigmas[-(1 + int(x * len(m.sigmas) / n))] for x in range(n)] + [0.0], -1),
}


def a1111_get_sigmas(name: str, steps: int, model: Model, opts: dict, discard: bool = False) -> list[float]:
    """A1111's ``KDiffusionSampler.get_sigmas`` (a named schedule), transcribed."""
    steps += 1 if discard else 0
    m_min, m_max = float(model.sigmas[0]), float(model.sigmas[-1])
    lo, hi = (0.1, 10) if opts["use_old_karras_scheduler_sigmas"] else (m_min, m_max)
    kwargs = {}
    if opts["sigma_min"] != 0 and opts["sigma_min"] != m_min:
        lo = opts["sigma_min"]
    if opts["sigma_max"] != 0 and opts["sigma_max"] != m_max:
        hi = opts["sigma_max"]
    function, default_rho = SCHEDULERS[name]
    if default_rho != -1 and opts["rho"] != 0 and opts["rho"] != default_rho:
        kwargs["rho"] = opts["rho"]
    sigmas = function(steps, lo, hi, model, opts, **kwargs)
    if discard:
        sigmas = sigmas[:-2] + sigmas[-1:]
    return sigmas


def _opts(options: ScheduleOptions) -> dict:
    return {"sigma_min": options.sigma_min, "sigma_max": options.sigma_max, "rho": options.rho,
            "beta_dist_alpha": options.beta_alpha, "beta_dist_beta": options.beta_beta,
            "use_old_karras_scheduler_sigmas": options.old_karras_sigmas}


OPTIONS = [
    ScheduleOptions(rho=5.0),
    ScheduleOptions(rho=2.5, sigma_min=0.3, sigma_max=9.0),
    ScheduleOptions(old_karras_sigmas=True),
    ScheduleOptions(old_karras_sigmas=True, sigma_max=20.0, rho=7.0),
    ScheduleOptions(sigma_min=0.05, beta_alpha=0.5, beta_beta=0.8),
    # the model's own σ_min keeps the old Karras bound 0.1 (A1111 replaces a bound only by another value)
    ScheduleOptions(old_karras_sigmas=True, sigma_min=float(_train()[0]), sigma_max=float(_train()[-1])),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(i) for i in range(len(OPTIONS))])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedule_options_equal_a1111s_get_sigmas(name, options):
    train = _train()
    model = Model(train)
    for steps, discard in ((9, False), (6, True)):
        want = np.array(a1111_get_sigmas(name, steps, model, _opts(options), discard))
        got = schedule_sigmas(name, steps, torch.from_numpy(train), discard_next_to_last_sigma=discard,
                              options=options).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-12 * max(1.0, np.abs(want).max()), (name, steps, discard)


def test_default_settings_and_the_models_own_bounds_change_nothing():
    train = torch.from_numpy(_train())
    same = [ScheduleOptions(), ScheduleOptions(rho=7.0), ScheduleOptions(sigma_min=float(train[0]))]
    for name in ("karras", "exponential", "normal", "sgm_uniform", "beta", "kl_optimal", "uniform"):
        plain = schedule_sigmas(name, 8, train)
        for options in same:
            assert torch.equal(schedule_sigmas(name, 8, train, options=options), plain), (name, options)
    assert torch.equal(schedule_sigmas("polyexponential", 8, train, options=ScheduleOptions(rho=1.0)),
                       schedule_sigmas("polyexponential", 8, train))
    # rho is Karras' and Polyexponential's only: the exponential grid ignores it, as in A1111
    assert torch.equal(schedule_sigmas("exponential", 8, train, options=ScheduleOptions(rho=3.0)),
                       schedule_sigmas("exponential", 8, train))


def _stand_in(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x_in + (t.double().view(-1, 1, 1, 1) / 1000.0) * 0.1


def test_sample_latents_runs_the_tuned_grid_and_refuses_options_without_a_schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen: list[float] = []

    def record(x, t, c):
        seen.append(float(t[0]))
        return _stand_in(x, t)

    options = ScheduleOptions(rho=4.0, sigma_max=12.0)
    tuned = sample_latents(record, x_T, None, sampler="euler", alphas_cumprod=ac, num_steps=5, schedule="karras",
                           schedule_options=options)
    grid = schedule_sigmas("karras", 5, training_sigmas(ac), options=options)
    from sdadapt.samplers.sigma_space import sigma_to_t

    assert np.allclose(seen, sigma_to_t(grid[:-1], training_sigmas(ac)).float().double().numpy(), atol=1e-4)
    plain = sample_latents(lambda x, t, c: _stand_in(x, t), x_T, None, sampler="euler",
                           alphas_cumprod=ac, num_steps=5, schedule="karras")
    assert not torch.allclose(tuned, plain)
    same = sample_latents(lambda x, t, c: _stand_in(x, t), x_T, None, sampler="euler", alphas_cumprod=ac, num_steps=5,
                          schedule="karras", schedule_options=ScheduleOptions())
    assert torch.equal(same, plain)
    with pytest.raises(ValueError, match="give a schedule too"):
        sample_latents(lambda x, t, c: _stand_in(x, t), x_T, None, sampler="euler", alphas_cumprod=ac, num_steps=5,
                       schedule_options=options)
    with pytest.raises(ValueError, match=">= 0"):
        ScheduleOptions(rho=-1.0)


def test_generate_command_takes_the_schedule_settings(tmp_path):
    from sdadapt.jobs import run_generate

    run_generate(prompt="a red circle", out=tmp_path / "a.png", steps=3, sampler="DPM++ 2M Karras", rho=5.0,
                 sigma_min=0.2)
    with pytest.raises(ValueError, match="add --schedule"):
        run_generate(prompt="x", out=tmp_path / "b.png", sampler="euler", rho=5.0)


def test_every_schedule_sampler_runs_the_tuned_grid():
    """``sample_latents(schedule_options=...)`` reaches the σ grid of every sampler with one: the model sees
    the first timestep ``t(σ_max)`` of the tuned grid (``sigma_max`` lowered to 5), not the plain one's."""
    from sdadapt.samplers import SCHEDULE_SAMPLERS
    from sdadapt.samplers.sigma_space import sigma_to_t

    pytest.importorskip("torchsde")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    options = ScheduleOptions(sigma_max=5.0, rho=4.0)
    want = float(sigma_to_t(torch.tensor([5.0], dtype=torch.float64), training_sigmas(ac))[0])
    for name in SCHEDULE_SAMPLERS:
        first: list[float] = []

        def record(x, t, c, first=first):
            first.append(float(t.reshape(-1)[0]))
            return _stand_in(x.double(), t).to(x.dtype)

        sample_latents(record, x_T, None, sampler=name, alphas_cumprod=ac, num_steps=6, schedule="karras",
                       schedule_options=options, generator=torch.Generator().manual_seed(1))
        if name == "lcm":  # A1111's LCM calls the model at the nearest of its 50 timesteps
            assert first[0] == 799.0, first[0]
            continue
        assert abs(first[0] - want) <= 0.51, (name, first[0], want)  # (some samplers round t to an integer)
