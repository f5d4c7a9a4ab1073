"""img2img on the samplers beyond Euler/DDIM/DPM++ 2M: diffusers' rule on UniPC, DPM single-step, DDPM and LCM
against the real StableDiffusionImg2ImgPipeline; A1111's rule on DPM fast / adaptive, Restart and DPM++ SDE
(k-diffusion's ``sample_img2img``, transcribed here), and on the DPM-Solver samplers when they run on an A1111
schedule."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from sdadapt import samplers
from sdadapt.img2img import Img2ImgStart, a1111_img2img_steps, a1111_start_index, img2img_rule, start_index
from sdadapt.samplers.sigma_space import sigma_to_t, t_to_sigma, training_sigmas
from sdadapt.sampling import generate

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()
TRAIN = training_sigmas(ALPHAS_CUMPROD)


def _a1111_uniform_sigmas(n):
    """k-diffusion's ``DiscreteSchedule.get_sigmas(n)`` (A1111's grid for DPM fast / adaptive), float64:
    σ log-linear in t at ``linspace(T − 1, 0, n)``, then 0."""
    t = torch.linspace(len(TRAIN) - 1, 0, n, dtype=torch.float64)
    lo, hi, w = t.floor().long(), t.ceil().long(), t - t.floor()
    log = TRAIN.log()
    return torch.cat([((1 - w) * log[lo] + w * log[hi]).exp(), torch.zeros(1, dtype=torch.float64)])


def _sigma_sched(sigmas, steps, strength):
    """A1111's setup_img2img_steps (no fix-steps) + ``sigmas[steps - t_enc - 1:]``, transcribed."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:], t_enc


def _init_and_noise():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64).float(), torch.randn(1, 4, 4, 4, generator=g)


def _oracle(init, calls):
    """An ε-model that knows the init latent: ε = (x·√(σ²+1) − init)/σ at the σ of its (fractional) timestep; the
    probability-flow ODE from ``init + σ·noise`` is then ``x(σ) = init + σ·noise`` exactly."""
    def model(x, t, cond):
        sigma = float(t_to_sigma(t.double()[:1], TRAIN)[0])
        calls.append(sigma)
        return ((x.double() * (sigma * sigma + 1) ** 0.5 - init.double()) / sigma).float()
    return model


# ---- A1111's rule: DPM fast / adaptive (k-diffusion's DPMSolver between sigma_sched[0] and sigma_sched[-2]) ----

@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_dpm_fast_img2img_runs_a1111s_sigma_sched_ends_and_n(strength):
    """A1111: sigma_max = sigma_sched[0], sigma_min = sigma_sched[-2], n = len(sigma_sched) - 1, x = init +
    noise·sigma_sched[0]. With the oracle the ODE is solved exactly, so the result is init + noise·σ_min."""
    init, noise = _init_and_noise()
    steps = 12
    sched, t_enc = _sigma_sched(_a1111_uniform_sigmas(steps), steps, strength)
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler="dpm_fast", alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=steps, eta=0.0, start=Img2ImgStart(init, strength=strength))
    assert len(calls) == len(sched) - 1 == t_enc + 1                     # A1111's n model calls
    assert calls[0] == pytest.approx(float(sched[0]), rel=1e-4)          # starts at sigma_sched[0]
    expected = init.double() + noise.double() * float(sched[-2])         # ends at sigma_sched[-2]
    assert torch.allclose(out.double(), expected, atol=1e-4), (out.double() - expected).abs().max()


def test_dpm_adaptive_img2img_ends_at_a1111s_sigma_min():
    init, noise = _init_and_noise()
    steps, strength = 10, 0.5
    sched, _ = _sigma_sched(_a1111_uniform_sigmas(steps), steps, strength)
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler="dpm_adaptive",
                                  alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps, eta=0.0,
                                  start=Img2ImgStart(init, strength=strength))
    assert calls[0] == pytest.approx(float(sched[0]), rel=1e-4)
    assert max(calls) == pytest.approx(float(sched[0]), rel=1e-4)
    expected = init.double() + noise.double() * float(sched[-2])
    assert torch.allclose(out.double(), expected, atol=1e-3), (out.double() - expected).abs().max()


@pytest.mark.parametrize("sampler, calls_made", [("dpm_fast", 1), ("dpm_adaptive", 0)])
def test_dpm_fast_and_adaptive_at_t_enc_0_do_what_k_diffusion_does(sampler, calls_made):
    """A strength below 1/steps: t_enc = 0, sigma_sched = [σ, 0], A1111 passes σ_min = σ_max. k-diffusion's
    DPMSolver takes that as reverse sampling: eta > 0 raises "eta must be 0 for reverse sampling"; eta = 0
    returns x = init + noise·σ untouched (dpm_solver_fast still calls the model once, for a zero-length step)."""
    init, noise = _init_and_noise()
    steps, strength = 12, 0.05
    sched, t_enc = _sigma_sched(_a1111_uniform_sigmas(steps), steps, strength)
    assert t_enc == 0 and len(sched) == 2
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=steps, eta=0.0, start=Img2ImgStart(init, strength=strength))
    assert len(calls) == calls_made
    expected = init.double() + noise.double() * float(sched[0])
    assert torch.allclose(out.double(), expected, atol=1e-5), (out.double() - expected).abs().max()
    with pytest.raises(ValueError, match=r"strength below 1/12.*eta must be 0 for reverse sampling.*raise the strength or the steps"):
        samplers.sample_latents(_oracle(init, []), noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                num_steps=steps, eta=1.0, start=Img2ImgStart(init, strength=strength))


@pytest.mark.parametrize("sampler, calls_made", [("dpm_fast", 2), ("dpm_adaptive", None)])
def test_dpm_fast_and_adaptive_at_t_enc_1_run_with_eta(sampler, calls_made):
    """Only t_enc = 0 makes σ_min = σ_max: at t_enc = 1 (sigma_sched of 3) k-diffusion's DPMSolver runs forward and
    takes eta > 0 (A1111's default 1); DPM fast makes A1111's n = 2 model calls from sigma_sched[0]. (review RX)"""
    init, noise = _init_and_noise()
    steps, strength = 12, 0.1
    sched, t_enc = _sigma_sched(_a1111_uniform_sigmas(steps), steps, strength)
    assert t_enc == 1 and len(sched) == 3
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=steps, eta=1.0, start=Img2ImgStart(init, strength=strength),
                                  generator=torch.Generator().manual_seed(1))
    assert calls and calls[0] == pytest.approx(float(sched[0]), rel=1e-4)
    assert calls_made is None or len(calls) == calls_made
    assert torch.isfinite(out).all() and out.shape == init.shape


def test_vp_add_noise_start_at_every_first_index_and_dtype():
    """The fold behind vp_start (σ grid) and vp_timestep_start (integer timesteps): diffusers' add_noise at every
    first index, the last one (one step left) too; first = n only on diffusers' rule (the init back); vp_start
    takes A1111's rule for an index (clamped to n − 1: a step always runs); results in x_T's dtype. (review RX)"""
    from sdadapt.img2img import vp_add_noise_start, vp_timestep_start
    from sdadapt.samplers.dpm_solver import vp_start

    init, noise = _init_and_noise()
    sigmas = _a1111_uniform_sigmas(6)  # (7,): 6 steps, then 0
    n = len(sigmas) - 1
    for first in range(n):
        abar = 1 / (float(sigmas[first]) ** 2 + 1)
        expected = abar ** 0.5 * init.double() + (1 - abar) ** 0.5 * noise.double()
        got_first, x = vp_start(Img2ImgStart(init, index=first), noise, sigmas.tolist(), rule="diffusers")
        assert got_first == first and x.dtype == noise.dtype
        assert torch.allclose(x.double(), expected, atol=1e-6), (first, (x.double() - expected).abs().max())
    got_first, x = vp_start(Img2ImgStart(init, index=n + 3), noise, sigmas.tolist(), rule="diffusers")
    abar = 1 / (float(sigmas[n - 1]) ** 2 + 1)
    assert got_first == n - 1
    assert torch.allclose(x.double(), abar ** 0.5 * init.double() + (1 - abar) ** 0.5 * noise.double(), atol=1e-6)
    timesteps = [999, 749, 499, 249]
    for first in range(len(timesteps)):
        a = float(ALPHAS_CUMPROD.double()[timesteps[first]])
        got_first, x = vp_timestep_start(Img2ImgStart(init, index=first), noise, timesteps, ALPHAS_CUMPROD)
        assert got_first == first
        assert torch.allclose(x.double(), a ** 0.5 * init.double() + (1 - a) ** 0.5 * noise.double(), atol=1e-6)
    assert vp_timestep_start(Img2ImgStart(init, index=4), noise, timesteps, ALPHAS_CUMPROD)[0] == 4
    assert torch.equal(vp_timestep_start(Img2ImgStart(init, strength=0.0), noise, timesteps, ALPHAS_CUMPROD)[1], init)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        first, x = vp_add_noise_start(Img2ImgStart(init.to(dtype)), noise.to(dtype), [0.5, 0.9], rule="a1111")
        assert first == 0 and x.dtype == dtype


# ---- A1111's rule: Restart and DPM++ SDE ---------------------------------------------------------------------------

def _karras_grid(n):
    """k-diffusion's get_sigmas_karras(n, σ_min, σ_max) with the model's σ ends (A1111's grid for Restart)."""
    s_min, s_max = float(TRAIN[0]), float(TRAIN[-1])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def _restart_sigmas(sigmas):
    """The σ at which A1111's ``restart_sampler`` calls the model on ``sigmas`` (transcribed: the automatic
    restart list; heun steps, Euler onto 0)."""
    sigmas = sigmas.tolist()
    steps = len(sigmas) - 1
    restart_list = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = _karras_grid_between(steps - r_steps * r_times, sigmas[-2], sigmas[0])
        restart_list = {0.1: [r_steps + 1, r_times, 2]}
    nearest = {int(torch.argmin((torch.tensor(sigmas) - k).abs())): v for k, v in restart_list.items()}
    calls, step_list = [], []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in nearest:
            r_steps, r_times, r_max = nearest[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin((torch.tensor(sigmas) - r_max).abs()))
            if max_idx < min_idx:
                seg = _karras_grid_between(r_steps, sigmas[min_idx], sigmas[max_idx])[:-1]
                for _ in range(r_times):
                    step_list.extend(zip(seg[:-1], seg[1:], strict=True))
    for old, new in step_list:
        calls.append(old)
        if new != 0:
            calls.append(new)
    return calls


def _karras_grid_between(n, s_min, s_max):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return [*((s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7).tolist(), 0.0]


@pytest.mark.parametrize("steps,strength", [(10, 0.6), (30, 0.8)])
def test_restart_img2img_runs_restart_sampler_on_the_truncated_grid(steps, strength):
    """A1111 hands restart_sampler sigma_sched: the restart list and the rebuilt Karras grid follow its length."""
    init, noise = _init_and_noise()
    sched, _ = _sigma_sched(_karras_grid(steps), steps, strength)
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler="restart", alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=steps, start=Img2ImgStart(init, strength=strength),
                                  generator=torch.Generator().manual_seed(1))
    assert calls == pytest.approx(_restart_sigmas(sched), rel=1e-4)
    assert torch.allclose(out, init, atol=1e-4)  # (the oracle's ODE lands on init; a restart re-noises on its path)


def test_dpmpp_sde_img2img_truncates_the_grid_and_keeps_the_whole_grids_brownian_tree(monkeypatch):
    pytest.importorskip("torchsde")
    from sdadapt.samplers import dpmpp_sde

    init, noise = _init_and_noise()
    steps, strength = 8, 0.5
    full = dpmpp_sde.dpmpp_sde_grid(ALPHAS_CUMPROD, steps)[1]
    sched, t_enc = _sigma_sched(full, steps, strength)
    spans, real = [], dpmpp_sde._BrownianNoise.__init__

    def spy(self, like, sigma_min, sigma_max, seed, source=None):
        spans.append((sigma_min, sigma_max))
        real(self, like, sigma_min, sigma_max, seed, source)

    monkeypatch.setattr(dpmpp_sde._BrownianNoise, "__init__", spy)
    calls = []
    out = samplers.sample_latents(_oracle(init, calls), noise, None, sampler="dpmpp_sde", alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=steps, start=Img2ImgStart(init, strength=strength),
                                  generator=torch.Generator().manual_seed(1))
    positive = full.float()[full > 0]
    # A1111's create_noise_sampler(x, sigmas, p): the untruncated grid's σ range
    assert spans == [(pytest.approx(float(positive.min())), pytest.approx(float(positive.max())))]
    # the model at each kept σ (and the log-midpoints between): 2·(t_enc + 1) − 1 calls, starting at sigma_sched[0]
    assert len(calls) == 2 * (t_enc + 1) - 1
    assert calls[0] == pytest.approx(float(sched[0]), rel=1e-4)
    assert calls[::2] == pytest.approx(sched[:-1].tolist(), rel=1e-4)
    assert torch.allclose(out, init, atol=1e-4)  # (its last step is Euler onto the oracle's x̂0)


def test_a_strength_only_start_on_an_a1111_sampler_takes_a1111s_t_enc():
    """``Img2ImgStart(init, strength=S)`` handed to an A1111-rule sampler starts where A1111's t_enc says."""
    init, noise = _init_and_noise()
    calls = []
    samplers.sample_latents(_oracle(init, calls), noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD,
                            num_steps=10, start=Img2ImgStart(init, strength=0.45))
    assert len(calls) == int(0.45 * 10) + 1
    assert start_index(Img2ImgStart(init, strength=0.45), 10, rule="a1111") == a1111_start_index(10, 4)


# ---- the rule follows the grid: DPM-Solver on one of A1111's schedules ----------------------------------------------

@pytest.mark.parametrize("sampler", ["dpmsolver++", "dpmsolver++_sde", "unipc", "dpmsingle"])
def test_a_dpm_solver_on_an_a1111_schedule_takes_a1111s_rule(sampler):
    """A1111 runs DPM++ 2M (SDE) on its grid with sample_img2img's t_enc rule: sdadapt does so whenever a
    ``schedule`` is given; without one, diffusers' rule. DPM++ 2M (SDE) call the model at the unrounded t(σ), as
    A1111 (k-diffusion's form on its grid); UniPC and DPM single-step, diffusers' only, at the rounded one."""
    assert img2img_rule(sampler, "karras") == "a1111" and img2img_rule(sampler, None) == "diffusers"
    from sdadapt.samplers.schedules import schedule_sigmas
    from sdadapt.sampling import _img2img_request

    init, noise = _init_and_noise()
    steps, strength = 10, 0.55
    start, total = _img2img_request(sampler, init, 1, steps, strength, None, schedule="exponential")
    assert total == steps and start.index == a1111_start_index(*a1111_img2img_steps(steps, strength))
    sched, t_enc = _sigma_sched(schedule_sigmas("exponential", steps, TRAIN), steps, strength)
    seen = []

    def model(x, t, cond):
        seen.append((float(t[0]), x.double().clone()))
        return torch.zeros_like(x)

    samplers.sample_latents(model, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=total,
                            schedule="exponential", start=start, generator=torch.Generator().manual_seed(0))
    s0 = float(sched[0])
    t0 = float(sigma_to_t(torch.tensor([s0], dtype=torch.float64), TRAIN)[0])
    t0 = t0 if sampler.startswith("dpmsolver++") else round(t0)
    assert abs(seen[0][0] - t0) < 1e-2 and len(seen) == t_enc + 1
    # the VP sample α·(init + noise·σ) = (init + noise·σ)/√(σ² + 1): A1111's xi as the model sees it
    assert torch.allclose(seen[0][1], (init.double() + noise.double() * s0) / math.sqrt(s0 * s0 + 1), atol=1e-5)


# ---- diffusers' rule: against StableDiffusionImg2ImgPipeline ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tests.test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_samplers"), prediction_type="epsilon")


_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
_SCHEDULERS = {
    "unipc": lambda: diffusers.UniPCMultistepScheduler(**_BETAS),
    "dpmsingle": lambda: diffusers.DPMSolverSinglestepScheduler(**_BETAS),
    "ddpm": lambda: diffusers.DDPMScheduler(**_BETAS),
    "lcm": lambda: diffusers.LCMScheduler(**_BETAS),
    "pndm": lambda: diffusers.PNDMScheduler(**_BETAS),
}


@pytest.mark.parametrize("sampler,steps,strength", [("unipc", 10, 0.6), ("unipc", 7, 0.35), ("dpmsingle", 10, 0.6),
                                                    ("dpmsingle", 9, 0.7), ("ddpm", 8, 0.5), ("lcm", 4, 0.5),
                                                    ("lcm", 6, 0.8), ("pndm", 10, 0.6), ("pndm", 6, 0.5),
                                                    ("pndm", 8, 0.75)])
def test_img2img_equals_diffusers_img2img_pipeline(tiny_sd, sampler, steps, strength):
    """sdadapt's img2img = StableDiffusionImg2ImgPipeline with the scheduler sdadapt mimics (get_timesteps,
    set_begin_index, add_noise), the same init latents and seeded generator, within 1e-4 on the output latents.
    (dpmsingle at 9 × 0.7 starts on an order-2 step: diffusers runs it as order 1.)"""
    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    init = torch.randn(1, *system.latent_shape(system.image_size, system.image_size),
                       generator=torch.Generator().manual_seed(3))
    ours = generate(system, ["a photo"], seed=5, steps=steps, guidance=3.0, sampler=sampler, init_latents=init,
                    denoising_strength=strength, output="latents")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=_SCHEDULERS[sampler](), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = _SCHEDULERS[sampler]()  # (the constructor rewrites an old DDPM config: steps_offset, clip_sample)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo", image=init, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
                  negative_prompt="", generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("sampler", ["unipc", "dpmsingle", "ddpm", "lcm", "pndm"])
def test_diffusers_rule_at_strength_zero_returns_the_init_latent(sampler):
    init, noise = _init_and_noise()
    out = samplers.sample_latents(lambda x, t, c: x, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                  num_steps=4, start=Img2ImgStart(init, strength=0.0),
                                  generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, init)


def test_dpmpp_2m_sde_img2img_on_an_a1111_schedule_keeps_the_whole_grids_brownian_tree(monkeypatch):
    """DPM++ 2M SDE with A1111's noise (a Brownian tree per image): A1111's ``sample_img2img`` hands
    ``create_noise_sampler(x, sigmas, p)`` the untruncated grid, so the tree spans its σ range, not sigma_sched's."""
    pytest.importorskip("torchsde")
    from sdadapt.samplers import dpmpp_sde
    from sdadapt.samplers.a1111_noise import A1111Noise
    from sdadapt.samplers.schedules import schedule_sigmas
    from sdadapt.sampling import _img2img_request

    init, noise = _init_and_noise()
    steps, strength = 10, 0.5
    start, total = _img2img_request("dpmsolver++_sde", init, 1, steps, strength, None, schedule="exponential")
    spans, real = [], dpmpp_sde.brownian_noise

    def spy(like, sigma_min, sigma_max, seed, **kw):
        spans.append((sigma_min, sigma_max))
        return real(like, sigma_min, sigma_max, seed, **kw)

    monkeypatch.setattr(dpmpp_sde, "brownian_noise", spy)
    samplers.sample_latents(lambda x, t, c: 0.1 * x, noise, None, sampler="dpmsolver++_sde",
                            alphas_cumprod=ALPHAS_CUMPROD, num_steps=total, schedule="exponential", start=start,
                            generator=A1111Noise([5], source="cpu"))
    full = schedule_sigmas("exponential", steps, TRAIN)
    positive = full[full > 0]
    assert start.index > 0 and len(spans) == 1
    assert spans[0] == (pytest.approx(float(positive.min())), pytest.approx(float(positive.max())))
