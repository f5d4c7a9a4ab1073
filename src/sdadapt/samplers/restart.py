"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes") as A1111 runs it
(``modules/sd_samplers_extra.py: restart_sampler``; its "Restart" sampler). diffusers and k-diffusion have none.

Heun steps (k-diffusion's ``sample_heun`` rule, Euler onto σ = 0) down a σ grid, with restart segments: after
the step that reaches the grid's σ nearest ``σ_min_r`` the sample is re-noised up to the grid's σ nearest
``σ_max_r`` (``x += s_noise·√(σ_max_r'² − σ'²)·z``) and Heun-stepped back down on a Karras grid between them,
``restart_times`` times. A1111's automatic list, for n ≥ 20 steps: ``restart_steps = 9``, ``restart_times = 1``
(n ≥ 36: ``n // 4`` and 2), the main grid rebuilt as Karras σ over ``n − restart_steps·restart_times`` steps between
the given grid's σ_0 and its last σ above 0, and one restart at σ ≈ 0.1 up to σ ≈ 2 with ``restart_steps + 1``
Karras σ (``restart_steps`` Heun steps); below 20 steps, no restart (plain Heun on the grid). Model calls: two per
step onto σ > 0, one onto 0.

The grid is A1111's: its "Automatic" for Restart is Karras (ρ = 7 between the model's σ_min and σ_max), any
other :mod:`.schedules` grid with ``schedule=``. The model runs at ``x·c_in`` and the unrounded ``t(σ)``
(:func:`.sigma_space.sigma_to_t`); the noise of each restart is drawn from ``generator``, where A1111 calls
``randn_like``.

**Dtypes** (:mod:`.sigma_space`): on float32 and half latents everything is A1111's float32 — the σ table, the
grid, the rebuilt Karras grid and the restart segments (``get_sigmas_karras`` on the float32 σ' ``.item()``), the
nearest-σ picks (``argmin |σ − key|`` on the float32 grid), ``t(σ)``, ``x·c_in``, the re-noise
``noise·s_noise·√(σ_max_r'² − σ'²)`` on float32 0-dim σ, and k-diffusion's Heun step — so a float32 run is
A1111's ``restart_sampler`` (``modules/sd_samplers_extra.py`` at 598aef8) on k-diffusion 4601bf0 bit for bit.
Float64 latents keep all of it in float64 (a precise mode).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .schedules import ScheduleOptions, schedule_sigmas
from .sigma_space import (
    check_grid_steps,
    check_prediction_type,
    first_sample,
    grid_table,
    karras_sigmas,
    sgm_of,
    sigma_slope,
    sigma_to_t,
    step_noise,
    timestep_batch,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["RestartList", "restart_sample", "restart_steps"]

#: A1111's ``restart_list``: ``{σ_min_r: (segment σ count, times, σ_max_r)}`` (each key and σ_max_r read as the
#: nearest σ of the grid)
RestartList = dict[float, tuple[int, int, float]]


def _karras(n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype) -> Tensor:
    """k-diffusion's ``get_sigmas_karras(n, σ_min, σ_max)`` (sampling.py:17-23 at 4601bf0: a ``dtype`` ramp, the
    ends' 1/ρ powers as Python floats) with its appended 0: (n + 1,) in ``dtype``."""
    return torch.cat([karras_sigmas(sigma_min, sigma_max, n, dtype=dtype), torch.zeros(1, dtype=dtype)])


def _nearest(sigmas: Tensor, value: float) -> int:
    """``argmin |σ − value|`` in the grid's dtype (the first on a tie, as A1111's ``torch.argmin``)."""
    return int(torch.argmin((sigmas - value).abs()))


def restart_steps(sigmas: Tensor, restart_list: RestartList | None = None) -> list[tuple[float, float]]:
    """The (σ, σ') pairs A1111's ``restart_sampler`` steps through for the grid ``sigmas`` (n+1,) descending
    (A1111's ``get_sigmas``), computed in its dtype: with ``restart_list`` None, its automatic list (see the
    module; the main grid rebuilt as Karras σ from 20 steps on). A pair whose σ is above the previous σ' is a
    restart (re-noise first). The σ are the grid dtype's values as Python floats.
    """
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = _karras(steps - r_steps * r_times, float(sigmas[-2]), float(sigmas[0]), sigmas.dtype)
            restart_list = {0.1: (r_steps + 1, r_times, 2.0)}
        else:
            restart_list = {}
    at = {_nearest(sigmas, key): value for key, value in restart_list.items()}
    grid = sigmas.tolist()
    pairs: list[tuple[float, float]] = []
    for i in range(len(grid) - 1):
        pairs.append((grid[i], grid[i + 1]))
        if i + 1 in at:
            r_steps, r_times, r_max = at[i + 1]
            min_idx, max_idx = i + 1, _nearest(sigmas, r_max)
            if max_idx < min_idx:
                segment = _karras(int(r_steps), grid[min_idx], grid[max_idx], sigmas.dtype)[:-1].tolist()
                for _ in range(int(r_times)):
                    pairs.extend(itertools.pairwise(segment))
    return pairs


def restart_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                   prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                   callback: StepCallback | None = None, karras: bool = False, schedule: str | None = None,
                   schedule_options: ScheduleOptions | None = None,
                   s_noise: float = 1.0, restart_list: RestartList | None = None,
                   discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """Restart sampling from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W) (A1111's "Restart"; see the module).

    ``num_steps``: n, A1111's sampling steps: n Heun steps in all (with the automatic list and n ≥ 20,
    ``n − r·k`` on the main grid and ``r·k`` in the k restart segments of r steps). ``karras``: the default grid
    (Karras σ, A1111's pick for Restart); ``schedule``: another of :mod:`.schedules` (``discard_next_to_last_sigma``:
    A1111's option, :func:`.schedules.schedule_sigmas`). ``s_noise``: the re-noising scale; ``restart_list``:
    A1111's ``{σ_min_r: (σ count, times, σ_max_r)}`` instead of its automatic one. ``model(x_in, t)`` gets float32
    timesteps t(σ) (B,); ``callback(i, t, x)`` after each Heun step. Float32 and half latents run A1111's float32
    arithmetic bit for bit, float64 latents a float64 one (the module's "Dtypes"). ``start``: img2img by A1111's rule
    (``sample_img2img`` hands ``restart_sampler`` the grid from ``start``'s index on, ``x = init + x_T·σ_start``;
    the restart list and the rebuilt Karras grid then follow that shorter grid's step count and ends).

    Raises:
        ValueError: an unknown prediction type or schedule, ``num_steps`` below 1 (or above T on a schedule of
            training steps: :func:`.sigma_space.check_grid_steps`), a negative ``s_noise``.
    """
    check_prediction_type("restart", prediction_type)
    if s_noise < 0:
        raise ValueError(f"restart: s_noise must be >= 0, got {s_noise}")
    del karras  # the default grid is Karras already
    schedule = schedule or "karras"
    train = grid_table(alphas_cumprod, x_T, schedule)  # (A1111's float32 table; float64 for float64 latents)
    check_grid_steps(num_steps, train.shape[0], schedule=schedule, label="restart: num_steps")
    grid = schedule_sigmas(schedule, int(num_steps), train, discard_next_to_last_sigma=discard_next_to_last_sigma,
                           options=schedule_options)
    if start is not None:  # img2img: A1111's sigma_sched = sigmas[index:] (sdadapt.img2img)
        from ..img2img import start_index

        grid = grid[start_index(start, len(grid) - 1, rule="a1111"):]
    pairs = restart_steps(grid, restart_list)
    positive = sorted({s for pair in pairs for s in pair if s > 0})
    times = dict(zip(positive, sigma_to_t(torch.tensor(positive, dtype=train.dtype), train).tolist(), strict=True))

    def slope(x: Tensor, sigma: float) -> Tensor:
        return sigma_slope(model, x, sigma, timestep_batch(times[sigma], x), prediction_type=prediction_type,
                           dtype=x_T.dtype)

    def up(sigma_to: float, sigma_from: float) -> Tensor:
        """A1111's ``(old_sigma ** 2 - last_sigma ** 2) ** 0.5`` on 0-dim σ in the grid's dtype."""
        s_to, s_from = (torch.tensor(v, dtype=train.dtype, device=x_T.device) for v in (sigma_to, sigma_from))
        return (s_to ** 2 - s_from ** 2) ** 0.5

    first = float(grid[0])  # (the given grid's σ_0: from 20 steps on the rebuilt one's may differ in the last bit)
    x = (first_sample(x_T, grid[0], sgm_noise_multiplier=sgm_of(schedule_options)) if start is None
         else start.noised(x_T, first))
    last: float | None = None
    for i, (s, s_next) in enumerate(pairs):
        if last is not None and last < s:  # a restart: back up to σ with fresh noise
            x = x + step_noise(x, generator, x.dtype) * s_noise * up(s, last)
        d = slope(x, s)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:  # (k-diffusion's (d + d_2)/2·dt: halving is exact, so it is this bit for bit)
            x_2 = x + d * (s_next - s)
            x = x + (d + slope(x_2, s_next)) * ((s_next - s) / 2)
        last = s_next
        if callback is not None:
            callback(i, timestep_batch(times[s], x), x)
    return x.to(x_T.dtype)
