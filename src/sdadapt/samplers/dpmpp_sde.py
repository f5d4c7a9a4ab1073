"""DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, A1111's "DPM++ SDE" / "DPM++ SDE Karras"):
step for step diffusers' ``DPMSolverSDEScheduler``, its Brownian-tree noise included.

Each step from σ_i to σ_{i+1} is two ancestral DPM-Solver++ first-order steps (η = 1): to the
log-midpoint ``σ_mid = √(σ_i·σ_{i+1})`` with the model's x̂0 at σ_i, then, from the same x, the whole
way to σ_{i+1} with the model's x̂0 at the midpoint sample. An ancestral step σ → σ' goes to σ_down
deterministically, ``x' = (σ_down/σ)·x + (1 − σ_down/σ)·x̂0``, and adds ``σ_up·z``
(:func:`.sigma_space.ancestral_step`). The last step (σ_{i+1} = 0) is Euler onto x̂0. So ``n`` steps
cost ``2n − 1`` model calls, the timesteps interleaved ``t_0, t(σ_mid,0), t_1, ..., t_{n−1}``.

The noise z of an interval [σ', σ] is the increment of one Brownian motion over it divided by
``√(σ − σ')`` (torchsde's ``BrownianInterval``, as diffusers' ``BatchedBrownianTree`` builds it), so the
noise of the two stages of a step are correlated and the image hardly changes with the step count.
torchsde is needed for this sampler only; it is imported when the sampler runs.

**On A1111's grids** (a ``schedule``) the run is k-diffusion's ``sample_dpmpp_sde`` as A1111 calls it
(k_diffusion/sampling.py:543-582 at 4601bf0, η = 1, r = ½, on its ``CompVisDenoiser`` / ``CompVisVDenoiser``):
the same two stages in its arithmetic — ``t = −log σ``, ``h``, ``s = t + h/2`` as 0-dim tensors, σ read back as
``e^(−t)``, each stage ``x' = (e^(−t_down)/e^(−t))·x − expm1(t − t_down)·x̂0`` plus ``σ_up·noise(e^(−t), σ')``
(:func:`.sigma_space.ancestral_step` on the same 0-dim values), the midpoint's model call at ``e^(−s)`` and its
``t(σ)`` on the σ table. On float32 (and half) latents everything is float32 — A1111's σ table, grid and ``t(σ)``
(:func:`.sigma_space.discrete_start`), the tree — and the result is k-diffusion's bit for bit; float64 latents run
the same form in float64 (a precise mode, as the other samplers on A1111's grids). Without a ``schedule`` the
steps are diffusers' (float32 σ, float64 ratios), as above.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .a1111_noise import A1111Noise, randn_local
from .sigma_space import (
    ZERO_SNR_ALPHA_CUMPROD,
    ancestral_step,
    check_prediction_type,
    denoise,
    discrete_start,
    grid_table,
    grid_timesteps,
    initial_noise_sigma,
    karras_sigmas,
    sigma_to_t,
    sigmas_at,
    timestep_batch,
    work_dtype,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["brownian_noise", "brownian_tree_seed", "dpmpp_sde_grid", "dpmpp_sde_sample"]

#: the seeds diffusers draws for the Brownian tree when ``noise_sampler_seed`` is None: [0, 2⁶³ − 1)
_SEED_HIGH = 2**63 - 1


def _torchsde():
    try:
        import torchsde
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("sampler dpmpp_sde (A1111's 'DPM++ SDE') draws its noise from a Brownian tree of the "
                          "torchsde package, which is not installed: pip install torchsde "
                          "(or pip install 'sdadapt[interop]')") from err
    return torchsde


def brownian_tree_seed(generator: torch.Generator | None) -> int:
    """The seed of the Brownian tree, drawn as diffusers' ``DPMSolverSDEScheduler`` draws it without a
    ``noise_sampler_seed`` (``torch.randint(0, 2⁶³ − 1, [])``), but from ``generator`` (the global RNG
    when it is None, as in diffusers). A diffusers loop built with ``noise_sampler_seed`` = this value,
    drawn from the generator after the start noise, gives this sampler's result."""
    device = generator.device if generator is not None else None
    return int(torch.randint(0, _SEED_HIGH, [], generator=generator, device=device))


def dpmpp_sde_grid(alphas_cumprod: Tensor, num_steps: int, *, karras: bool = False, spacing: str = "linspace",
                   steps_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The grid of diffusers' ``DPMSolverSDEScheduler.set_timesteps(num_steps)`` on ``alphas_cumprod`` (T,)
    (A1111's grids: :func:`.sigma_space.discrete_sigmas`, as :func:`dpmpp_sde_sample` runs them).

    Returns:
        ``(timesteps (n,), sigmas (n+1,), mid_timesteps (n−1,), mid_sigmas (n−1,))`` float64 CPU:
        the timesteps by ``spacing`` (linspace unrounded, float64 as the class keeps them), σ linear in t
        (or Karras σ between the last and first of those, timesteps ``t(σ)`` unrounded), σ_n = 0; the
        log-midpoints ``√(σ_i σ_{i+1})`` of the steps before the last and their timesteps ``t(σ)``.

    Raises:
        ValueError: ``num_steps`` below 1 or above T on a grid of training steps
            (:func:`.sigma_space.check_grid_steps`), an unknown spacing.
    """
    train = _float32_training_sigmas(alphas_cumprod)
    timesteps = grid_timesteps(num_steps, train.shape[0], spacing, steps_offset)
    sigmas = sigmas_at(timesteps, train)
    if karras:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
        timesteps = sigma_to_t(sigmas, train)
    mids = (sigmas[:-1] * sigmas[1:]).sqrt()
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]), sigma_to_t(mids, train), mids


def _float32_training_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """σ of each training step (T,) float64, computed in float32 as ``DPMSolverSDEScheduler`` computes
    them (``((1 − ᾱ)/ᾱ)^½`` on its float32 ᾱ). The Brownian tree is queried at float32 σ, and a σ one
    float32 step off moves that noise by up to ~1%, so the grid follows diffusers' rounding here (the
    other σ samplers compute σ in float64). A zero last ᾱ is read as :data:`.sigma_space.ZERO_SNR_ALPHA_CUMPROD`."""
    ac = alphas_cumprod.detach().float().cpu()
    if float(ac[-1]) == 0.0:
        ac = torch.cat([ac[:-1], ac.new_full((1,), ZERO_SNR_ALPHA_CUMPROD)])
    return (((1 - ac) / ac) ** 0.5).double()


#: the A1111 noise source the Brownian trees being queried draw from (None: torchsde's own ``_randn``)
_TREE_SOURCE: ContextVar[str | None] = ContextVar("sdadapt_brownian_tree_source", default=None)


def _draw_from_source(torchsde) -> None:
    """Route torchsde's ``_randn`` through :data:`_TREE_SOURCE` (installed once; torchsde's own draws where it is
    None, so other users of torchsde see no change): A1111 replaces that function with its ``randn_local``, the
    first float32 draw of a generator of the noise source seeded with torchsde's seed, then cast and moved."""
    module = torchsde._brownian.brownian_interval
    if getattr(module._randn, "_sdadapt_source_hook", False):
        return
    original = module._randn

    def _randn(size, dtype, device, seed):
        source = _TREE_SOURCE.get()
        if source is None:
            return original(size, dtype, device, seed)
        return randn_local(int(seed), tuple(size), source=source).to(device=device, dtype=dtype)

    _randn._sdadapt_source_hook = True  # type: ignore[attr-defined]
    module._randn = _randn


class _BrownianNoise:
    """diffusers' ``BrownianTreeNoiseSampler`` over [σ_min, σ_max] with one seed for the whole batch (or, given a
    tuple of seeds, one tree per image, as A1111 seeds them):
    ``noise(σ, σ') = (W(σ) − W(σ'))·sign / √|σ − σ'|`` (B,C,H,W). torchsde keeps the interval's ends
    rounded to 6 decimals and clamps queries outside it (diffusers' end points are), with a warning that is
    silenced here. ``source`` (``"nv"``/``"cpu"``): the trees draw A1111's :func:`.a1111_noise.randn_local`
    of that source instead of torchsde's generator on ``like``'s device; they then live on the CPU, where those
    draws are made (one copy of each step's noise to ``like``'s device, not one per draw: ~50 draws a query)."""

    def __init__(self, like: Tensor, sigma_min: float, sigma_max: float, seed: int | tuple[int, ...],
                 source: str | None = None):
        # a tuple of seeds: one tree per image (A1111's BrownianTreeNoiseSampler(seed=the images' seeds))
        sizes = [(like.shape, seed)] if isinstance(seed, int) else [(like.shape[1:], s) for s in seed]
        self.batched = not isinstance(seed, int)
        self.source, self.device = source, like.device
        tree_device = like.device if source is None else torch.device("cpu")
        torchsde = _torchsde()
        if source is not None:
            _draw_from_source(torchsde)
        token = _TREE_SOURCE.set(source)
        try:  # (the trees draw their first increment here)
            self.trees = [torchsde.BrownianInterval(t0=sigma_min, t1=sigma_max, size=size, dtype=like.dtype,
                                                    device=tree_device, entropy=s, tol=1e-6, pool_size=24,
                                                    halfway_tree=True) for size, s in sizes]
        finally:
            _TREE_SOURCE.reset(token)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = (float(sigma_next), float(sigma)) if sigma_next < sigma else (float(sigma), float(sigma_next))
        sign = -1.0 if sigma_next < sigma else 1.0
        token = _TREE_SOURCE.set(self.source)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
                w = torch.stack([tree(a, b) for tree in self.trees]) if self.batched else self.trees[0](a, b)
                w = w * sign
        finally:
            _TREE_SOURCE.reset(token)
        return (w / float((sigma_next - sigma).abs().sqrt())).to(self.device)


def brownian_noise(like: Tensor, sigma_min: float, sigma_max: float, seed: int | tuple[int, ...], *,
                   source: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """k-diffusion's ``BrownianTreeNoiseSampler`` over [σ_min, σ_max] for samples shaped like ``like``
    (B,C,H,W): ``noise(σ, σ')`` (B,C,H,W) is the Brownian increment over [σ', σ] over ``√|σ − σ'|`` (σ, σ':
    0-d tensors). ``seed``: one tree for the batch, or a tuple of B seeds, one tree per image (A1111's).
    ``source``: None, torchsde's own draws (a generator on ``like``'s device); ``"nv"``/``"cpu"``, A1111's
    (:func:`.a1111_noise.randn_local` of that source, as A1111's patched torchsde draws, on any device).
    Needs torchsde."""
    return _BrownianNoise(like, sigma_min, sigma_max, seed, source)


def _no_noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    raise RuntimeError("dpmpp_sde: a run that only steps onto σ = 0 draws no noise")  # pragma: no cover


def _sigma_round_trip(sigma: Tensor) -> Tensor:
    """``σ → t = −log σ → e^(−t)`` in float32, the noise levels diffusers queries its tree at (the
    negations are exact: ``exp(log σ)``, σ with log's and exp's rounding)."""
    return sigma.log().exp()


#: x̂0 (B,C,H,W) of the model at (x, σ, timestep)
_X0At = Callable[[Tensor, float | Tensor, float], Tensor]
#: the Brownian noise of an interval (σ, σ') (B,C,H,W)
_Noise = Callable[[Tensor, Tensor], Tensor]


def _diffusers_ancestral(x: Tensor, x0: Tensor, sigma: Tensor, sigma_to: Tensor, noise: _Noise) -> Tensor:
    """One of ``DPMSolverSDEScheduler.step``'s ancestral first-order steps σ → σ_to (float32 0-dim σ): from
    σ's round trip, the ratio ``σ_down/σ`` in float64, plus ``σ_up·noise``."""
    s_from = _sigma_round_trip(sigma)
    down, up = ancestral_step(float(s_from), float(sigma_to))
    ratio = down / float(s_from)
    return x * ratio + x0 * (1.0 - ratio) + noise(s_from, sigma_to) * up


def _diffusers_step(x: Tensor, x0: Tensor, i: int, sigmas: Tensor, *, mid_times: list[float], x0_at: _X0At,
                    noise: _Noise) -> Tensor:
    """diffusers' two stages from σ_i to σ_{i+1} > 0 (``sigmas`` (n+1,) float32): to the float32 log-midpoint with
    x̂0, then from x the whole way with the midpoint's x̂0 (model at ``mid_times[i]``, the grid's ``t(σ_mid)``)."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    t_i, t_next = sigma.log().neg(), sigma_next.log().neg()
    s_mid = (t_i + (t_next - t_i) * 0.5).neg().exp()  # float32, as diffusers' midpoint σ
    x_mid = _diffusers_ancestral(x, x0, sigma, s_mid, noise)
    x0_mid = x0_at(x_mid, float(s_mid), mid_times[i])
    return _diffusers_ancestral(x, x0_mid, sigma, _sigma_round_trip(sigma_next), noise)


def _kdiffusion_step(x: Tensor, x0: Tensor, i: int, sigmas: Tensor, *, table: Tensor, x0_at: _X0At,
                     noise: _Noise, eta: float = 1.0) -> Tensor:
    """k-diffusion's ``sample_dpmpp_sde`` step from σ_i to σ_{i+1} > 0 (``sigmas`` (n+1,) in x's dtype), η ``eta``,
    r = ½, in its order (k_diffusion/sampling.py:562-580 at 4601bf0); the midpoint's model call at ``t(e^(−s))`` on
    the σ ``table`` (T,). Its ``(1 − fac)·x̂0 + fac·x̂0_mid`` is x̂0_mid (fac = 1/(2r) = 1: the same number but for
    a zero's sign)."""
    dt = x.dtype
    t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()  # t_fn
    h = t_next - t
    s = t + h * 0.5
    sigma_t, sigma_s = t.neg().exp(), s.neg().exp()  # sigma_fn
    down, up = ancestral_step(float(sigma_t), float(sigma_s), eta, dtype=dt)
    s_ = torch.tensor(down, dtype=dt).log().neg()
    x_2 = (s_.neg().exp() / sigma_t) * x - (t - s_).expm1() * x0
    x_2 = x_2 + noise(sigma_t, sigma_s) * up
    x0_2 = x0_at(x_2, sigma_s, float(sigma_to_t(sigma_s.reshape(1), table)[0]))
    down, up = ancestral_step(float(sigma_t), float(t_next.neg().exp()), eta, dtype=dt)
    t_next_ = torch.tensor(down, dtype=dt).log().neg()
    x = (t_next_.neg().exp() / sigma_t) * x - (t - t_next_).expm1() * x0_2
    return x + noise(sigma_t, t_next.neg().exp()) * up


def dpmpp_sde_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                     prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                     callback: StepCallback | None = None, karras: bool = False, spacing: str = "linspace",
                     steps_offset: int = 0, noise_sampler_seed: int | None = None,
                     schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                     discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                     eta: float = 1.0) -> Tensor:
    """DPM-Solver++ SDE from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``DPMSolverSDEScheduler`` (``use_karras_sigmas=karras``, ``timestep_spacing=spacing``, ``steps_offset``).

    ``model(x_in, t)``: the (guided) model at ``x/√(σ²+1)`` and float32 timesteps t (B,), called
    ``2·num_steps − 1`` times (see the module). The Brownian tree's seed is ``noise_sampler_seed`` or,
    when None, one ``torch.randint(0, 2⁶³ − 1)`` drawn from ``generator`` before the first step
    (:func:`brownian_tree_seed`; diffusers draws it from the global RNG); an
    :class:`~.a1111_noise.A1111Noise` as ``generator``: one tree per image seeded with the image's seed, as
    A1111 builds them. The trees have the sample's dtype (on A1111's grids the work dtype) and device. ``callback(i, t, x)`` sees each step's sample
    (after both stages). ``schedule_options``: A1111's settings for ``schedule`` (:class:`.schedules.ScheduleOptions`).
    ``prediction_type`` "sample" is taken too (diffusers' class refuses it). ``schedule``: one of A1111's σ
    grids (:func:`.sigma_space.discrete_sigmas`, with ``discard_next_to_last_sigma``), run as k-diffusion's
    ``sample_dpmpp_sde`` (see the module: bit for bit on float32 and half latents, whose trees are float32 as
    A1111's x; float64 latents in float64); a last σ above 0 (``kl_optimal``) gets a full two-stage step.
    ``start``: img2img by A1111's rule (``sample_img2img``: the grid from ``start``'s index on,
    ``x = init + x_T·σ_start``); the Brownian tree still spans the whole grid's σ (A1111's
    ``create_noise_sampler(x, sigmas, p)`` gets the untruncated ``sigmas``, as diffusers' scheduler uses its own).

    ``eta``: k-diffusion's η of both stages' ancestral steps (A1111's "Eta for ancestral samplers"), with a
    ``schedule`` (diffusers' class has none).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T], a negative ``eta`` or one
            other than 1 without a schedule.
        ImportError: torchsde is not installed (``pip install torchsde``).
    """
    if eta < 0 or (eta != 1.0 and schedule is None):
        raise ValueError(f"dpmpp_sde: eta (A1111's 'Eta for ancestral samplers', >= 0) is k-diffusion's, on A1111's "
                         f"grids: give a schedule (schedule='automatic' is A1111's default), got eta={eta}"
                         + (" without one" if schedule is None else ""))
    if schedule is None:
        check_prediction_type("dpmpp_sde", prediction_type)
        timesteps, grid, mid_times, _ = dpmpp_sde_grid(alphas_cumprod, num_steps, karras=karras, spacing=spacing,
                                                       steps_offset=steps_offset)
        times, sigmas = timesteps.tolist(), grid.float()  # diffusers keeps σ in float32 and computes its coefficients there
        x = x_T.to(work_dtype(x_T)) * initial_noise_sigma(sigmas, spacing)
        step = partial(_diffusers_step, mid_times=mid_times.tolist())
        tree_like = x_T  # (diffusers builds the tree from its sample: fp16 latents, an fp16 tree, the same draws)
    else:  # A1111's grid, float32 (float64 latents: float64), x = x_T·σ_0: k-diffusion's run
        times, grid_list, x = discrete_start("dpmpp_sde", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                             prediction_type=prediction_type, schedule=schedule,
                                             schedule_options=schedule_options,
                                             discard_next_to_last_sigma=discard_next_to_last_sigma)
        sigmas = torch.tensor(grid_list, dtype=x.dtype)
        step = partial(_kdiffusion_step, table=grid_table(alphas_cumprod, x_T, schedule), eta=eta)
        tree_like = x  # (A1111 samples float32 x, half latents too: a float32 tree)
    seed: int | tuple[int, ...] = (int(noise_sampler_seed) if noise_sampler_seed is not None else generator.seeds
                                   if isinstance(generator, A1111Noise) else brownian_tree_seed(generator))
    positive = sigmas[sigmas > 0]  # (the whole grid's: the tree's ends, img2img too)
    first = 0
    if start is not None:  # img2img: A1111's sigmas[index:], x = init + noise·σ (sdadapt.img2img)
        from ..img2img import start_index

        first = start_index(start, len(times), rule="a1111")
        x = start.noised(x_T, float(sigmas[first]))
    source = generator.source if isinstance(generator, A1111Noise) else None  # (A1111's draws inside the trees)
    # no tree when every step run lands on σ = 0 (one step; the seed is drawn all the same)
    noise = (_BrownianNoise(tree_like, float(positive.min()), float(positive.max()), seed, source)
             if bool((sigmas[first + 1:] > 0).any()) else _no_noise)

    def x0_at(x: Tensor, sigma: float | Tensor, t: float) -> Tensor:
        return denoise(model, x, sigma, timestep_batch(t, x), prediction_type=prediction_type, dtype=x_T.dtype)

    for i in range(first, len(times)):
        s = float(sigmas[i])
        x0 = x0_at(x, s, times[i])
        if float(sigmas[i + 1]) == 0:  # σ_next = 0: Euler onto x̂0
            x = x + (x - x0) / s * (0.0 - s)
        else:
            x = step(x, x0, i, sigmas, x0_at=x0_at, noise=noise)
        if callback is not None:
            callback(i - first, timestep_batch(times[i], x), x)
    return x.to(x_T.dtype)
