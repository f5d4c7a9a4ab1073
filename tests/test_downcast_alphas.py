"""A1111's "Downcast alphas_cumprod" (:func:`sdadapt.samplers.sigma_space.downcast_alphas_cumprod`): ᾱ held as float16,
as every A1111 before v1.7.0-225 held it on a half model. k-diffusion then builds its ``CompVisDenoiser`` table from the
half buffer in float16 (σ and log σ), reads ``t(σ)`` against those float16 logs (its ``low − high`` in float16) and
takes σ_min / σ_max from them. Checked here against k-diffusion 4601bf0 transcribed with float16 buffers (the loops
of tests/test_kdiffusion_float32.py; A1111's ``normal_scheduler`` / ``sgm_uniform``): whole runs bit for bit, every
schedule's grid; the refusals; A1111's infotext backcompat by Version; ``generate --downcast-alphas-cumprod``."""

from __future__ import annotations

import pytest
import tiny_sd_fixtures
import torch
from sampler_stand_ins import kdiffusion_sigma_to_t, rel_err, stand_in
from test_dpm_adaptive_float32 import AC
from test_kdiffusion_float32 import _run_reference

from sdadapt.samplers import SAMPLERS, check_downcast_run, sample_latents
from sdadapt.samplers.schedules import schedule_sigmas
from sdadapt.samplers.sigma_space import downcast_alphas_cumprod, model_sigmas

tiny_sd = tiny_sd_fixtures.tiny_sd

AC16 = AC.float().half()  # (LDM's float32 buffer, .half() by A1111)
SIGMAS16 = ((1 - AC16) / AC16) ** 0.5  # (CompVisDenoiser.__init__ on a half buffer: float16 arithmetic)
LOG_SIGMAS16 = SIGMAS16.log()  # (DiscreteSchedule's log_sigmas buffer, float16)


def _t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``t_to_sigma`` on the float16 buffer (float32 weights)."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * LOG_SIGMAS16[low] + w * LOG_SIGMAS16[high]).exp()


def _get_sigmas(n: int) -> torch.Tensor:
    """``get_sigmas(n)``: A1111's uniform grid, with 0."""
    sig = _t_to_sigma(torch.linspace(len(SIGMAS16) - 1, 0, n))
    return torch.cat([sig, sig.new_zeros([1])])


def _karras(n: int) -> torch.Tensor:
    """``get_sigmas_karras(n, sigmas[0].item(), sigmas[-1].item())`` on the half buffer."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = SIGMAS16[0].item() ** (1 / 7.0), SIGMAS16[-1].item() ** (1 / 7.0)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7.0, torch.zeros(1)])


def _normal(n: int, *, sgm: bool) -> torch.Tensor:
    """A1111's ``normal_scheduler`` / ``sgm_uniform``: ``t(σ_max)`` … ``t(σ_min)`` by ``sigma_to_t``, σ by
    ``t_to_sigma``, then 0."""
    start = kdiffusion_sigma_to_t(LOG_SIGMAS16, torch.tensor(SIGMAS16[-1].item()))
    end = kdiffusion_sigma_to_t(LOG_SIGMAS16, torch.tensor(SIGMAS16[0].item()))
    times = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return torch.cat([torch.stack([_t_to_sigma(t) for t in times]), torch.zeros(1)])


def _denoiser(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A1111's ``CompVisDenoiser`` of :func:`stand_in` over the half buffer: ``t`` from its float16 logs."""
    c_in = (1 / (s**2 + 1.0) ** 0.5)[:, None, None, None]
    return x + stand_in(x * c_in, kdiffusion_sigma_to_t(LOG_SIGMAS16, s)) * (-s)[:, None, None, None]


def test_the_table_is_k_diffusions_of_a_half_buffer():
    table = model_sigmas(downcast_alphas_cumprod(AC), torch.float32)
    assert table.dtype == torch.float16 and torch.equal(table, SIGMAS16)
    assert torch.equal(model_sigmas(downcast_alphas_cumprod(AC), torch.float64), SIGMAS16)  # (whatever the latents)
    assert downcast_alphas_cumprod(AC).dtype == torch.float16


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2s_a"])
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("steps", [1, 9])
def test_a_run_is_k_diffusions_on_the_half_buffer(sampler, schedule, steps):
    """Bit for bit; the float32 table's run (A1111 ≥ 1.7.0-225) is another (Karras most: its σ_max moves)."""
    x_T = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(steps))
    sigmas = _get_sigmas(steps) if schedule == "uniform" else _karras(steps)
    want = _run_reference(sampler, _denoiser, x_T, sigmas)

    def run(alphas):
        return sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, schedule=schedule,
                              alphas_cumprod=alphas, num_steps=steps, generator=torch.Generator().manual_seed(7))

    got = run(downcast_alphas_cumprod(AC))
    assert got.dtype == torch.float32 and torch.equal(got, want), rel_err(got, want)
    if steps > 1:
        assert rel_err(run(AC), want) > 1e-5


@pytest.mark.parametrize("schedule", ["uniform", "normal", "sgm_uniform", "karras", "exponential", "polyexponential",
                                      "kl_optimal", "simple", "ddim", "beta", "align_your_steps"])
def test_every_schedule_is_a1111s_on_the_half_buffer(schedule):
    """uniform, normal, sgm_uniform: the transcriptions (``t(σ)`` and ``σ(t)`` on the float16 logs); the others
    read only σ_min / σ_max or the table's entries, so they are the float32 schedule of the float16 values."""
    table = model_sigmas(downcast_alphas_cumprod(AC), torch.float32)
    got = schedule_sigmas(schedule, 10, table)
    if schedule == "uniform":
        want = _get_sigmas(10)
    elif schedule in ("normal", "sgm_uniform"):
        want = _normal(10, sgm=schedule == "sgm_uniform")
    else:
        want = schedule_sigmas(schedule, 10, SIGMAS16.float())
    assert got.dtype == torch.float32 and torch.equal(got, want), (got - want).abs().max()


def test_every_sigma_sampler_runs_and_the_rest_are_refused():
    """Every sampler on every A1111 schedule it takes runs on the half table (finite, float32); A1111's timestep
    samplers, LCM and diffusers' grids are refused, naming the fix."""
    x_T = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    half = downcast_alphas_cumprod(AC)
    ran = 0
    for name in SAMPLERS:
        for schedule in ("automatic", "karras", "beta", None):
            try:
                check_downcast_run(name, schedule=schedule)
            except ValueError as exc:
                if "takes no schedule" in str(exc):  # (the sampler's own refusal of that schedule)
                    continue
                assert "leave the downcast out" in str(exc)
                with pytest.raises(ValueError, match="Downcast alphas_cumprod"):
                    sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, schedule=schedule,
                                   alphas_cumprod=half, num_steps=3)
                continue
            try:
                out = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, schedule=schedule,
                                     alphas_cumprod=half, num_steps=3, generator=torch.Generator().manual_seed(1))
            except ValueError as exc:
                assert "takes no schedule" in str(exc), (name, schedule, exc)
                continue
            assert out.dtype == torch.float32 and torch.isfinite(out).all(), (name, schedule)
            ran += 1
    assert ran > 40
    for name, schedule in (("ddim", "automatic"), ("plms", None), ("unipc_a1111", None), ("lcm", None),
                           ("euler", None), ("ddpm", "automatic")):
        with pytest.raises(ValueError, match="leave the downcast out"):
            check_downcast_run(name, schedule=schedule)


@pytest.mark.parametrize("version,downcast", [
    ("v1.6.0-2-g4afaaf8a", True), ("v1.7.0", True), ("v1.7.0-224-gabc", True), ("v1.7.0-RC-5-gabc", True),
    ("v1.7.0-225-g0123", False), ("v1.8.0", False), ("1.8.0-RC", False), ("v1.10.1", False),
    ("f2.0.1v1.10.1-previous-313-g8a042934", False), ("sdadapt 0.1.0", False), (None, False)])
def test_an_old_infotext_turns_the_downcast_on_as_a1111s_backcompat(version, downcast):
    """A1111's ``backcompat``: Version (read by its ``parse_version``) before v1.7.0-225 sets "Downcast
    alphas_cumprod"; Forge's versions and others it cannot parse do not; the field itself is taken as written."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = "a cat\nSteps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    options, not_taken = infotext_options(parse_infotext(text + ("" if version is None else f", Version: {version}")))
    assert options.get("downcast_alphas_cumprod", False) is downcast
    written, not_taken = infotext_options(parse_infotext(text + ", Downcast alphas_cumprod: True, Version: v1.9.4"))
    assert written["downcast_alphas_cumprod"] is True and not [line for line in not_taken if "Downcast" in line]



def test_where_the_run_would_not_read_it_the_downcast_is_reported_not_taken():
    """On a timestep sampler (A1111's DDIM, PLMS) or diffusers' grid (sdadapt's own infotext without a Schedule type)
    the backcompat's (or the field's) downcast is not taken but said, so ``--infotext`` still runs; an A1111 < 1.9
    infotext, which names no schedule, is read as A1111 pastes it (Automatic: its k-diffusion grid) and takes it."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    for sampler, tail in (("DDIM", ", Version: v1.5.2"), ("PLMS", ", Downcast alphas_cumprod: True, Version: v1.5.2"),
                          ("Euler a", ", Downcast alphas_cumprod: True, Version: sdadapt 0.1.0")):
        text = f"a cat\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 512x512{tail}"
        options, not_taken = infotext_options(parse_infotext(text))
        assert "downcast_alphas_cumprod" not in options
        assert [line for line in not_taken if f"which {sampler} here does not read" in line]
    options, not_taken = infotext_options(parse_infotext(
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.5.2"))
    assert (options["schedule"], options["downcast_alphas_cumprod"]) == ("automatic", True)
    hires = ("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Hires upscale: 2, "
             "Hires sampler: DDIM, Version: v1.6.0")
    options, not_taken = infotext_options(parse_infotext(hires))
    assert "downcast_alphas_cumprod" not in options and [line for line in not_taken if "DDIM here" in line]
    options, _ = infotext_options(parse_infotext(hires.replace("Hires sampler: DDIM", "Hires sampler: Euler a, "
                                                               "Hires schedule type: Karras")))
    assert options["downcast_alphas_cumprod"] is True


def test_generate_writes_the_field_and_reads_it_back(tiny_sd, tmp_path):
    """``generate --downcast-alphas-cumprod`` (a tiny SD model, Euler on Karras): "Downcast alphas_cumprod: True"
    written where A1111's ``apply_alpha_schedule_override`` puts it, ``--infotext`` makes the same image, without it
    another; the refusals (the toy's schedule, which float16 rounds to σ 0; DDIM without a schedule; a PLMS hires
    pass) come before any output."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.jobs import run_generate

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a red circle", "--steps", "6", "--sampler", "Euler",
            "--schedule", "karras", "--seed", "4", "--width", "32", "--height", "32"]
    assert main([*base, "--downcast-alphas-cumprod", "--out", str(tmp_path / "a.png")]) == 0
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert "Downcast alphas_cumprod: True" in text
    assert main(["generate", "--model", str(tiny_sd), "--infotext", str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "b.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    a, b, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(np.float64) for n in ("a", "b", "plain"))
    assert np.array_equal(a, b) and not np.array_equal(a, plain) and a.std() > 1.0
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="--downcast-alphas-cumprod: .*round to 1 in float16"):
        run_generate(model="toy", prompt="a red circle", sampler="euler", schedule="karras",
                     downcast_alphas_cumprod=True, out=out / "t.png", steps=2)
    with pytest.raises(ValueError, match="--downcast-alphas-cumprod: .* ddim without a schedule"):
        run_generate(model="toy", prompt="a red circle", sampler="ddim", downcast_alphas_cumprod=True,
                     out=out / "c.png", steps=2)
    with pytest.raises(ValueError, match="--downcast-alphas-cumprod: .* plms"):
        run_generate(model="toy", prompt="a red circle", sampler="euler", schedule="karras", hires_scale=1.5,
                     hires_sampler="PLMS", downcast_alphas_cumprod=True, out=out / "d.png", steps=2)
    assert not out.exists()


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "downcast_alphas_cumprod(alphas_cumprod)")
    assert torch.isfinite(scope["old_seed"]).all() and not torch.equal(scope["old_seed"], scope["float32_run"])
    from sdadapt.toy import build_toy

    with pytest.raises(ValueError, match="first 2 ᾱ round to 1 in float16"):
        downcast_alphas_cumprod(build_toy(seed=1).alphas_cumprod)
