"""Sampler leftovers (2): LoRA step ranges on DPM fast, DPM adaptive and Restart counted as A1111 counts them, PNDM
refused; DPM2 / DPM2 a below 4 steps on A1111's grid; kohya's Heun ``clip_sample`` in training previews.

The references are float64 transcriptions (here, and ``sampler_stand_ins``' DPMSolver) of k-diffusion 4601bf0
``k_diffusion/sampling.py`` (``DPMSolver.dpm_solver_fast`` / ``dpm_solver_adaptive``, ``PIDStepSizeController``, ``sample_dpm_2``,
``sample_dpm_2_ancestral``, ``get_sigmas_karras``), A1111's ``modules/sd_samplers_extra.py: restart_sampler`` and
``KDiffusionSampler.callback_state`` (``state.sampling_step = d['i']``, 0 at ``launch_sampling``), and
sd-webui-lora-block-weight b403cb7 ``denoiser_callback`` (A1111's path: ``elif self.active``).
"""

from __future__ import annotations

import math

import pytest
import torch
from sampler_stand_ins import KDiffusionDPMSolver, get_ancestral_step

from sdadapt import samplers
from sdadapt.errors import InputError
from sdadapt.jobs.generate_lbw_steps import (
    StepRange,
    StepSwitchedLoRAs,
    a1111_sampling_step,
    check_step_range_sampler,
)

F64 = torch.float64


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


AC = _alphas_cumprod()
TRAIN = ((1 - AC) / AC) ** 0.5  # (T,) ascending: σ_min = TRAIN[0], σ_max = TRAIN[-1]


# ---- the reference: A1111's counter and the extension's switch (one tag) ------------------------------------------

class _A1111:
    """A1111's ``state.sampling_step`` (0 at ``launch_sampling``, ``d['i']`` at each ``callback_state``) and the
    extension's multiplier of one tag (``denoiser_callback`` before every ``CFGDenoiser.forward``)."""

    def __init__(self, start: int | None, stop: int | None):
        self.sampling_step = 0
        self.starts = {} if start is None else {"ink": start}
        self.stops = {} if stop is None else {"ink": stop}
        self.on = True  # (load_networks: the tag's multiplier)
        self.seen: list[int] = []

    def callback(self, d: dict) -> None:
        self.sampling_step = int(d["i"])

    def denoiser_callback(self) -> None:
        step = self.sampling_step
        self.seen.append(step)
        if self.starts and step == 0:
            self.on = False
        if self.starts:
            for key in [k for k, n in self.starts.items() if step > n - 2]:
                self.on = True
                del self.starts[key]
        if self.stops:
            for key in [k for k, n in self.stops.items() if step > n - 2]:
                self.on = False
                del self.stops[key]


class _Net:
    """ε(x_in) = tanh(x_in·Wᵀ + b)·0.8 + 0.1·x_in, W = W₀ (+ up·down with the tag on); float64."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.layer = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(F64).requires_grad_(False)
        with torch.no_grad():
            self.layer[0].weight.copy_(torch.randn(8, 8, generator=g, dtype=F64) * 0.4)
            self.layer[0].bias.copy_(torch.randn(8, generator=g, dtype=F64) * 0.1)
        self.state = {"0.lora_down.weight": torch.randn(2, 8, generator=g) * 0.5,
                      "0.lora_up.weight": torch.randn(8, 2, generator=g) * 0.5}
        self.w0 = self.layer[0].weight.detach().clone()
        self.w_on = self.w0 + self.state["0.lora_up.weight"].to(F64) @ self.state["0.lora_down.weight"].to(F64)
        self.b = self.layer[0].bias.detach().clone()

    def eps_reference(self, x_in: torch.Tensor, on: bool) -> torch.Tensor:
        w = self.w_on if on else self.w0
        return torch.tanh(x_in @ w.T + self.b) * 0.8 + 0.1 * x_in

    def model(self, x_in: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        del t, cond
        return torch.tanh(self.layer(x_in.to(F64))) * 0.8 + 0.1 * x_in.to(F64)


def _x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 1, 2, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _denoiser(net: _Net, a1111: _A1111):
    """k-diffusion's CompVisDenoiser of ε prediction, through A1111's CFGDenoiser (the extension first)."""

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
        a1111.denoiser_callback()
        eps = net.eps_reference(x / (sigma * sigma + 1) ** 0.5, a1111.on)
        return x - sigma * eps

    return denoised


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [*((hi + ramp * (lo - hi)) ** rho).tolist(), 0.0]


def _restart_reference(denoised, callback, x, sigmas: list[float], noise) -> torch.Tensor:
    """A1111's ``restart_sampler`` (``restart_list=None``), float64."""
    steps = len(sigmas) - 1
    restart_list: dict = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = _karras(steps - r_steps * r_times, sigmas[-2], sigmas[0])
        restart_list = {0.1: [r_steps + 1, r_times, 2]}
    nearest = lambda value: min(range(len(sigmas)), key=lambda i: (abs(sigmas[i] - value), i))  # noqa: E731
    restart_list = {nearest(key): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            r_steps, r_times, r_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, nearest(r_max)
            if max_idx < min_idx:
                segment = _karras(r_steps, sigmas[min_idx], sigmas[max_idx])[:-1]
                for _ in range(r_times):
                    step_list.extend(zip(segment[:-1], segment[1:], strict=True))
    step_id, last = 0, None
    for old, new in step_list:
        if last is None:
            last = old
        elif last < old:
            x = x + noise(x) * (old ** 2 - last ** 2) ** 0.5
        d = (x - denoised(x, old)) / old
        callback({"i": step_id})
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            d_2 = (x_2 - denoised(x_2, new)) / new
            x = x + (d + d_2) / 2 * (new - old)
        step_id += 1
        last = new
    return x


def _reference(sampler: str, steps: int, step_range: StepRange, *, eta: float = 0.0, seed: int = 5,
               **options) -> tuple[torch.Tensor, list[int], dict]:
    net, a1111 = _Net(), _A1111(step_range.start, step_range.stop)
    g = torch.Generator().manual_seed(seed)

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=g, dtype=F64)

    denoised = _denoiser(net, a1111)
    sigma_min, sigma_max = float(TRAIN[0]), float(TRAIN[-1])
    x = _x_T() * sigma_max
    info: dict = {}
    # k-diffusion's DPMSolver, its info_callback A1111's callback_state
    solver = KDiffusionDPMSolver(lambda x, sigma: (x - denoised(x, sigma)) / sigma, noise, a1111.callback)
    if sampler == "dpm_fast":
        x = solver.fast(x, -math.log(sigma_max), -math.log(sigma_min), steps, eta=eta)
    elif sampler == "dpm_adaptive":
        x, info = solver.adaptive(x, -math.log(sigma_max), -math.log(sigma_min), eta=eta, **options)
    else:
        x = _restart_reference(denoised, a1111.callback, x, _karras(steps, sigma_min, sigma_max), noise)
    return x, a1111.seen, info


def _sdadapt(sampler: str, steps: int, step_range: StepRange, *, seed: int = 5, **options
             ) -> tuple[torch.Tensor, list[int]]:
    net = _Net()
    switch = StepSwitchedLoRAs([(step_range, [(net.layer, net.state, 1.0)])], sampler=sampler)
    seen: list[int] = []

    def before_model_call(done: int, calls: int) -> None:
        seen.append(a1111_sampling_step(done, calls, sampler=sampler))
        switch(done, calls)

    try:
        x = samplers.sample_latents(net.model, _x_T(), None, sampler=sampler, alphas_cumprod=AC, num_steps=steps,
                                    generator=torch.Generator().manual_seed(seed), before_model_call=before_model_call,
                                    **options)
    finally:
        switch.release()
    assert torch.equal(net.layer[0].weight, net.w0)  # (every merge undone, bit for bit)
    return x, seen


# ---- item 1: step ranges on DPM fast, DPM adaptive, Restart; PNDM refused -----------------------------------------

@pytest.mark.parametrize(("nfe", "step_range", "eta"), [
    (7, StepRange(start=2), 0.0), (9, StepRange(stop=3), 1.0), (10, StepRange(start=3, stop=4), 1.0),
    (2, StepRange(stop=1), 0.0)])
def test_dpm_fast_counts_its_solver_steps_as_k_diffusion_reports_them(nfe, step_range, eta):
    """k-diffusion's ``dpm_solver_fast`` calls back after each step's first ``eps`` call, so a step's later calls see
    the step itself: would catch counting model calls as steps, or calling back at the step's end."""
    ref, ref_seen, _ = _reference("dpm_fast", nfe, step_range, eta=eta)
    got, seen = _sdadapt("dpm_fast", nfe, step_range, eta=eta)
    assert seen == ref_seen
    assert len(seen) == nfe
    assert torch.allclose(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    plain, _ = _sdadapt("dpm_fast", nfe, StepRange(), eta=eta)
    assert not torch.allclose(plain, got)  # (the range changed the run)


@pytest.mark.parametrize(("options", "step_range", "eta"), [
    ({"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 2.0}, StepRange(start=4), 0.0),
    ({"order": 2, "rtol": 0.02, "atol": 0.0078, "h_init": 1.0}, StepRange(start=2, stop=6), 1.0)])
def test_dpm_adaptive_counts_tries_reported_after_all_their_calls(options, step_range, eta):
    """k-diffusion's ``dpm_solver_adaptive`` calls back after every try (rejected ones too) with
    ``i = steps − 1``: every call of try k sees max(k − 1, 0). Would catch counting accepted steps only, or
    switching inside a try."""
    ref, ref_seen, info = _reference("dpm_adaptive", 0, step_range, eta=eta, **options)
    assert info["n_reject"] > 0  # (the case has rejected tries, where accepted steps and tries part)
    stats: dict = {}
    got, seen = _sdadapt("dpm_adaptive", 10, step_range, eta=eta, info=stats, **options)
    assert seen == ref_seen
    assert stats["steps"] == info["steps"] and stats["n_reject"] == info["n_reject"]
    assert seen == [max(k - 1, 0) for k in range(info["steps"]) for _ in range(options["order"])]
    assert torch.allclose(got, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))


def test_dpm_adaptive_keeps_the_callers_own_try_hook_and_step_callback():
    net, tries, steps = _Net(), [], []
    samplers.sample_latents(net.model, _x_T(), None, sampler="dpm_adaptive", alphas_cumprod=AC, num_steps=10,
                            eta=0.0, h_init=2.0, tried=tries.append, callback=lambda i, t, x: steps.append(i),
                            before_model_call=lambda done, calls: None)
    assert tries == list(range(len(tries))) and len(tries) > len(steps) > 0
    assert steps == list(range(len(steps)))  # (the step callback: accepted steps, as before)


@pytest.mark.parametrize(("steps", "step_range"), [(5, StepRange(start=3)), (21, StepRange(start=8, stop=15))])
def test_restart_counts_every_heun_step_restart_segments_too(steps, step_range):
    """A1111's ``restart_sampler`` calls back with ``step_id`` after each Heun step's first call; 21 steps has a
    restart segment (9 Heun steps), whose steps count on. Would catch counting the main grid's steps only."""
    ref, ref_seen, _ = _reference("restart", steps, step_range)
    got, seen = _sdadapt("restart", steps, step_range)
    assert seen == ref_seen
    assert len(seen) == 2 * steps - 1 and seen[-1] == steps - 2  # (n Heun steps in all, the last onto σ = 0)
    assert torch.allclose(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_pndm_alone_is_refused_naming_why():
    with pytest.raises(InputError, match="A1111 has no pndm sampler.*PLMS"):
        check_step_range_sampler("pndm", "<lora:a:1:start=2>")
    for name in ("dpm_fast", "dpm_adaptive", "restart"):
        check_step_range_sampler(name, "<lora:a:1:start=2>")


# ---- item 2: DPM2 / DPM2 a below 4 steps on A1111's grid ------------------------------------------------------------

def _kd_dpm_2(sigmas: list[float], x: torch.Tensor, *, ancestral: bool, g: torch.Generator) -> torch.Tensor:
    """k-diffusion 4601bf0 ``sample_dpm_2`` (s_churn 0) / ``sample_dpm_2_ancestral`` (η 1) on the model of
    :class:`_Net` (tag off), float64: Euler where σ_next (σ_down) is 0, and then no noise drawn."""
    net = _Net()

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x - sigma * net.eps_reference(x / (sigma * sigma + 1) ** 0.5, False)

    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoised(x, s)) / s
        down, up = get_ancestral_step(s, s_next, 1.0) if ancestral else (s_next, 0.0)
        if down == 0:
            x = x + d * (down - s)
        else:
            mid = math.exp((math.log(s) + math.log(down)) / 2)
            x_2 = x + d * (mid - s)
            x = x + (x_2 - denoised(x_2, mid)) / mid * (down - s)
            if ancestral:
                x = x + torch.randn(x.shape, generator=g, dtype=F64) * up
    return x


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_a"])
@pytest.mark.parametrize("schedule", ["karras", "uniform"])
def test_dpm_2_below_4_steps_is_a1111s_discarded_grid_and_k_diffusions_last_step(sampler, schedule):
    """A1111 builds DPM2's grid for n + 1 steps and drops the next-to-last σ (``discard_next_to_last_sigma``): at
    n = 1 that is one Euler step from σ_max to 0; k-diffusion steps onto 0 by Euler (one model call) and, for
    DPM2 a, draws no noise there. Would catch the undiscarded grid, a second-order last step, or an extra draw
    (the generators' states after the run are compared)."""
    sigma_min, sigma_max = float(TRAIN[0]), float(TRAIN[-1])
    for n in (1, 2, 3, 4):
        if schedule == "karras":
            longer = _karras(n + 1, sigma_min, sigma_max)
        else:  # (A1111's get_sigmas: t evenly from 999 to 0, σ by log-σ interpolation, then 0)
            t = torch.linspace(999, 0, n + 1, dtype=F64)
            low, frac = t.floor().long(), t - t.floor()
            log_sigma = (1 - frac) * TRAIN.log()[low] + frac * TRAIN.log()[(low + 1).clamp(max=999)]
            longer = [*log_sigma.exp().tolist(), 0.0]
        grid = longer[:-2] + longer[-1:]
        g_ref, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        ref = _kd_dpm_2(grid, _x_T() * grid[0], ancestral=sampler == "dpm_2_a", g=g_ref)
        net, calls = _Net(), []
        got = samplers.sample_latents(lambda x, t, c: (calls.append(1), net.model(x, t, c))[1], _x_T(), None,
                                      sampler=sampler, alphas_cumprod=AC, num_steps=n, schedule=schedule, generator=g)
        assert len(calls) == 2 * n - 1, n
        assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max())), n
        assert torch.equal(g.get_state(), g_ref.get_state()), n  # (n − 1 draws for DPM2 a, none for DPM2)


# ---- item 3: kohya's Heun sample images clamp x̂0 (get_my_scheduler's clip_sample) ---------------------------------

def test_kohya_clip_sample_is_heuns_only():
    from sdadapt.sampling import kohya_clip_sample

    assert kohya_clip_sample("heun") == kohya_clip_sample("HEUN") == 1.0
    for name in ("ddim", "ddpm", "euler", "k_euler_a", "dpm_2", "dpmsolver++", "lms", "pndm"):
        assert kohya_clip_sample(name) is None, name


class _TinySystem:
    """The System protocol at its smallest (:mod:`sdadapt.sampling`'s protocol path): ε(x, t, c) =
    2·tanh(3·x + c) + t/1000 (x̂0 well beyond ±1, so the clamp acts), latents (1, 2, 4, 4)."""

    image_size = 32
    prediction_type = "epsilon"

    def __init__(self):
        from diffusers import HeunDiscreteScheduler

        self.alphas_cumprod = HeunDiscreteScheduler(beta_schedule="scaled_linear").alphas_cumprod.clone()

    def tokenize(self, prompts):
        return [len(p) for p in prompts]

    def condition(self, tokens):
        return torch.tensor(tokens, dtype=torch.float32).view(-1, 1, 1, 1) / 10

    def denoiser(self):
        return lambda x, t, c: 2 * torch.tanh(3 * x + c) + t.view(-1, 1, 1, 1).float() / 1000

    def encode_images(self, images):
        return torch.zeros(images.shape[0], 2, 4, 4)

    def decode_latents(self, latents):
        return latents

    def sample(self, prompts, *, seed=0, steps=25, guidance=2.0, negative=""):
        raise AssertionError("the protocol path samples heun")


def test_heun_preview_is_kohyas_scheduler_loop_with_clip_sample_set_on_its_config():
    """The training preview path (:func:`sdadapt.sampling.generate` with :func:`kohya_clip_sample`, the System
    protocol) against kohya 48d368fa's sample loop: ``HeunDiscreteScheduler`` (SD's betas),
    ``scheduler.config.clip_sample = True`` set as ``get_my_scheduler`` sets it, CFG, ``scale_model_input`` /
    ``step``. Would catch the clamp not reaching the sampler (the unclamped run is far off)."""
    from diffusers import HeunDiscreteScheduler

    from sdadapt.sampling import generate, kohya_clip_sample

    system, prompts, steps, scale = _TinySystem(), ["a red circle"], 6, 2.0
    got = generate(system, prompts, seed=1, steps=steps, sampler="heun", guidance=scale, output="latents",
                   clip_sample=kohya_clip_sample("heun"))
    plain = generate(system, prompts, seed=1, steps=steps, sampler="heun", guidance=scale, output="latents")
    sched = HeunDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    if hasattr(sched.config, "clip_sample") and sched.config.clip_sample is False:  # (kohya's lines)
        sched.config.clip_sample = True
    sched.set_timesteps(steps)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
    cond, uncond = system.condition(system.tokenize(prompts)), system.condition(system.tokenize([""]))
    model = system.denoiser()
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        u, c = model(x_in, t.expand(1), uncond), model(x_in, t.expand(1), cond)
        x = sched.step(u + scale * (c - u), t, x).prev_sample
    size = float(x.abs().max())
    assert float((got - x).abs().max()) < 1e-5 * size
    assert float((plain - x).abs().max()) > 1e-2 * size
    with pytest.raises(ValueError, match="heun sampler only"):
        generate(system, prompts, steps=2, sampler="euler", clip_sample=1.0, output="latents")


# ---- review RO: the clamp's other routes (a system's own sample, train's previews) ---------------------------------

class _OwnSampleSystem(_TinySystem):
    """:class:`_TinySystem` whose ``sample`` runs any sampler itself (as ``DiffusersSystem.sample``) and records
    the keywords it was given; ``takes_clip``: whether that ``sample`` takes ``clip_sample=``."""

    def __init__(self, *, takes_clip: bool):
        self.alphas_cumprod = AC.float()  # (not diffusers': no import for it)
        self.calls: list[dict] = []
        if takes_clip:
            def sample(prompts, *, seed=0, steps=25, guidance=2.0, negative="", sampler="ddim", height=None,
                       width=None, output="images", clip_sample=None):
                self.calls.append({"sampler": sampler, "clip_sample": clip_sample})
                return torch.zeros(len(prompts), 2, 4, 4)
        else:
            def sample(prompts, *, seed=0, steps=25, guidance=2.0, negative="", sampler="ddim", height=None,
                       width=None, output="images"):
                self.calls.append({"sampler": sampler})
                return torch.zeros(len(prompts), 2, 4, 4)
        self.sample = sample


def test_clip_sample_reaches_a_systems_own_sample_or_takes_the_protocol_path():
    """A system whose ``sample`` takes ``clip_sample=`` gets it; one whose ``sample`` takes ``sampler=`` but not
    ``clip_sample=`` is sampled through the protocol (with the clamp), not handed a keyword it has no place for
    (would catch dropping the ``_takes(system.sample, "clip_sample")`` condition), and ``clip_sample`` ≤ 0 is
    refused."""
    from sdadapt.sampling import generate

    own = _OwnSampleSystem(takes_clip=True)
    generate(own, ["a"], steps=2, sampler="heun", clip_sample=1.0, output="latents")
    assert own.calls == [{"sampler": "heun", "clip_sample": 1.0}]
    other = _OwnSampleSystem(takes_clip=False)
    got = generate(other, ["a"], seed=1, steps=2, sampler="heun", guidance=2.0, clip_sample=1.0, output="latents")
    assert other.calls == []  # (the protocol path: its own sample has no clip_sample)
    plain = _OwnSampleSystem(takes_clip=False)
    plain.sample = _TinySystem.sample.__get__(plain)  # (no sampler=: the protocol path)
    ref = generate(plain, ["a"], seed=1, steps=2, sampler="heun", guidance=2.0, clip_sample=1.0, output="latents")
    assert torch.equal(got, ref)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="heun sampler only"):
            generate(plain, ["a"], steps=2, sampler="heun", clip_sample=bad, output="latents")


def test_train_previews_clamp_heun_only_as_kohyas_get_my_scheduler(three_shapes, tmp_path, monkeypatch):
    """``train``'s sample images: ``--sample-sampler heun`` (and a prompt line's ``--ss heun``) run with
    ``clip_sample=1.0``, a line's ``--ss euler`` without (kohya builds each prompt's scheduler by its own name).
    Would catch the clamp not passed from train, or taken from ``--sample-sampler`` over the line's ``--ss``."""
    from train_inputs import lora_train_args

    from sdadapt import sampling
    from sdadapt.cli import main

    seen: list = []
    real_generate = sampling.generate

    def generate(*args, **kwargs):
        seen.append((kwargs.get("sampler"), kwargs.get("clip_sample")))
        return real_generate(*args, **{**kwargs, "steps": 1})

    monkeypatch.setattr(sampling, "generate", generate)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na red square --ss euler\na red square --ss HEUN\n")
    assert main(lora_train_args(three_shapes, "--steps", "1", "--sample-prompts", prompts,
                                "--sample-sampler", "heun", "--sample-steps", "1", "-q",
                                "-o", tmp_path / "a.safetensors")) == 0
    assert seen[:3] == [("heun", 1.0), ("euler", None), ("heun", 1.0)], seen
