"""A1111's "img2img alternative test" (generate --img2img-alt): the Euler noise inversion against a transcription of
the script's loops over k-diffusion's CompVisDenoiser, its noise blend and hand-over, the A1111 RNG it leaves
unspent, and the run end to end (start noise reaching the sampler, the cache, fields written and read back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdadapt.inversion.euler_noise import (
    IMG2IMG_ALT_FIELDS,
    GivenStartSeeds,
    Img2ImgAlternative,
    blend_noise,
    euler_noise_inversion,
    img2img_alt_noise,
    sigma_max_of,
)
from sdadapt.samplers.a1111_noise import A1111Noise, A1111Seeds
from sdadapt.samplers.sigma_space import model_sigmas
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)


class _KDiffusionDiscrete:
    """k-diffusion's ``DiscreteSchedule`` / ``CompVisDenoiser`` / ``CompVisVDenoiser`` (external.py at 4601bf0) as
    A1111 holds them: float32 σ from a float32 ᾱ."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.float()
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def get_sigmas(self, n: int) -> torch.Tensor:
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    @staticmethod
    def get_scalings(sigma: torch.Tensor, v: bool) -> tuple[torch.Tensor, ...]:
        if v:  # (CompVisVDenoiser, sigma_data 1: c_skip, c_out, c_in)
            c_in = 1 / (sigma ** 2 + 1.0 ** 2) ** 0.5
            return 1 / (sigma ** 2 + 1), -sigma * 1.0 / (sigma ** 2 + 1.0 ** 2) ** 0.5, c_in
        return -sigma, 1 / (sigma ** 2 + 1.0 ** 2) ** 0.5  # (DiscreteEpsDDPMDenoiser: c_out, c_in)


def _a1111_find_noise(model, init, cond, uncond, cfg_scale, steps, *, v=False, sigma_adjustment=False):
    """scripts/img2imgalt.py's find_noise_for_image / find_noise_for_image_sigma_adjustment, transcribed."""
    dnw, skip = _KDiffusionDiscrete(ALPHAS_CUMPROD), 1 if v else 0
    x = init
    s_in = x.new_ones([x.shape[0]])
    sigmas = dnw.get_sigmas(steps).flip(0)
    for i in range(1, len(sigmas)):
        x_in = torch.cat([x] * 2)
        sigma_in = torch.cat([(sigmas[i - 1] if sigma_adjustment else sigmas[i]) * s_in] * 2)
        cond_in = torch.cat([uncond, cond])
        c_out, c_in = [k[:, None, None, None] for k in dnw.get_scalings(sigma_in, v)[skip:]]
        if sigma_adjustment and i == 1:
            t = dnw.sigma_to_t(torch.cat([sigmas[i] * s_in] * 2))
        else:
            t = dnw.sigma_to_t(sigma_in)
        eps = model(x_in * c_in, t, cond_in)
        denoised_uncond, denoised_cond = (x_in + eps * c_out).chunk(2)
        denoised = denoised_uncond + (denoised_cond - denoised_uncond) * cfg_scale
        if sigma_adjustment:
            d = (x - denoised) / (2 * sigmas[i]) if i == 1 else (x - denoised) / sigmas[i - 1]
        else:
            d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i] - sigmas[i - 1])
    return x / sigmas[-1] if sigma_adjustment else x / x.std()


def _model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in network: its output depends on the input, the timestep and each row's condition."""
    mix = torch.tensor([[0.7, -0.2, 0.1, 0.0], [0.1, 0.5, -0.3, 0.2], [0.0, 0.3, 0.6, -0.1], [-0.2, 0.0, 0.1, 0.8]])
    mixed = torch.einsum("oc,bchw->bohw", mix, x)
    return torch.tanh(mixed + cond.mean(dim=(1, 2))[:, None, None, None]) * (1 + t[:, None, None, None] / 1000)


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 12), guidance=st.sampled_from([0.0, 1.0, 1.5, 7.0]), v=st.booleans(),
       adjust=st.booleans(), batch=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_the_inversion_is_the_scripts_loop(steps, guidance, v, adjust, batch, seed):
    """Both of the script's loops (plain: model at σ_i, x / x.std(); sigma adjustment: model at σ_{i−1}, its first
    timestep at σ_1 and d over 2σ_1, x / σ_max), on ε and on v (c_skip dropped as the script drops it), any steps,
    CFG and batch: equal to the float32 transcription bit for bit."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(batch, 4, 3, 5, generator=g)
    cond, uncond = torch.randn(batch, 3, 8, generator=g), torch.randn(batch, 3, 8, generator=g)
    ours = euler_noise_inversion(_model, init, cond, uncond, guidance=guidance, steps=steps,
                                 train_sigmas=model_sigmas(ALPHAS_CUMPROD, torch.float32),
                                 prediction_type="v_prediction" if v else "epsilon", sigma_adjustment=adjust)
    theirs = _a1111_find_noise(_model, init, cond, uncond, guidance, steps, v=v, sigma_adjustment=adjust)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_the_inversion_runs_the_branches_apart_where_their_shapes_differ():
    """A long decode prompt (154 states) against a short negative (77): the script's torch.cat fails; here each
    branch runs on its own, the same numbers as the batched call where the conditions do match."""
    g = torch.Generator().manual_seed(4)
    init = torch.randn(1, 4, 3, 3, generator=g)
    cond, uncond = torch.randn(1, 6, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    table = model_sigmas(ALPHAS_CUMPROD, torch.float32)
    apart = euler_noise_inversion(_model, init, cond, uncond, guidance=1.5, steps=5, train_sigmas=table)
    same = euler_noise_inversion(_model, init, cond, torch.cat([uncond, uncond], 1), guidance=1.5, steps=5,
                                 train_sigmas=table)
    uncond_mean_kept = torch.cat([uncond, uncond], 1)  # (the stand-in reads the mean: the same uncond branch)
    batched = _a1111_find_noise(_model, init, cond, uncond_mean_kept, 1.5, 5)
    assert torch.equal(same, batched)
    assert torch.allclose(apart, batched, atol=1e-6)


@given(r=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
@settings(max_examples=30, deadline=None)
def test_the_blend_is_the_scripts_formula(r, seed):
    g = torch.Generator().manual_seed(seed)
    inverted, random = torch.randn(1, 4, 2, 3, generator=g), torch.randn(1, 4, 2, 3, generator=g)
    expected = ((1 - r) * inverted.double() + r * random.double()) / ((r ** 2 + (1 - r) ** 2) ** 0.5)
    assert torch.allclose(blend_noise(inverted, random, r).double(), expected, atol=1e-6)
    assert torch.equal(blend_noise(inverted, random, 0.0), inverted)
    assert torch.equal(blend_noise(inverted, random, 1.0), random)


def test_the_handed_noise_starts_img2img_from_the_blend_times_sigma_max():
    """img2img's first sample ``init + noise·σ_start`` at strength 1 (σ_start = get_sigmas(n)[0] = σ_max) is the
    blended noise times σ_max — the script's aim — up to float32 rounding; σ_max is exp(log σ_max) as k-diffusion's
    t_to_sigma(999) gives it."""
    g = torch.Generator().manual_seed(2)
    init, noise = torch.randn(1, 4, 4, 4, generator=g) * 3, torch.randn(1, 4, 4, 4, generator=g)
    table = model_sigmas(ALPHAS_CUMPROD, torch.float32)
    sigma_max = sigma_max_of(table)
    assert torch.equal(sigma_max, _KDiffusionDiscrete(ALPHAS_CUMPROD).get_sigmas(7)[0])
    start = img2img_alt_noise(noise, init, sigma_max)
    assert torch.allclose(init + start * sigma_max, noise * sigma_max, atol=1e-4)


def test_a1111_noise_keeps_its_first_draw_for_the_sampler():
    """The script never draws A1111's start noise from ``p.rng``: the start is the given noise, the sampler's first
    draw is the RNG's first-time calculation (variation and ENSD included), later draws its generators'."""
    seeds = A1111Seeds(source="cpu", subseed=9, subseed_strength=0.3, ensd=31337)
    start = torch.randn(1, 4, 3, 3)
    given_noise = GivenStartSeeds(seeds, start).for_batch(5, 1)
    plain = seeds.for_batch(5, 1)
    assert torch.equal(given_noise.start_noise((1, 4, 3, 3)), start)
    first = plain.start_noise((1, 4, 3, 3))
    assert torch.equal(given_noise.next_noise(torch.zeros(1, 4, 3, 3)), first)
    assert torch.equal(given_noise.next_noise(torch.zeros(1, 4, 3, 3)), plain.next_noise(torch.zeros(1, 4, 3, 3)))
    assert GivenStartSeeds(seeds, start).source == "cpu" and given_noise.seeds == (5,)
    with pytest.raises(ValueError, match="start noise"):
        GivenStartSeeds(seeds, start).for_batch(5, 1).start_noise((1, 4, 3, 4))
    assert isinstance(plain, A1111Noise)


@pytest.mark.parametrize("bad", [{"decode_steps": 0}, {"randomness": 1.5}, {"randomness": -0.1},
                                 {"decode_guidance": float("nan")}, {"decode_guidance": -1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Img2ImgAlternative("a photo", **bad)


def test_the_fields_are_the_scripts_and_a_real_infotext_reads_back():
    """The six fields in the script's order, whole numbers as A1111's UI writes them; an A1111 infotext of the script
    (an image shared online, trimmed) read back to the same settings."""
    from sdadapt.jobs.infotext import format_infotext
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    alt = Img2ImgAlternative("photo a melprsn woman", decode_steps=30, sigma_adjustment=True)
    assert tuple(alt.infotext_fields()) == IMG2IMG_ALT_FIELDS
    text = format_infotext("p", "", alt.infotext_fields())
    assert text.endswith("Decode prompt: photo a melprsn woman, Decode negative prompt: , Decode CFG scale: 1, "
                         "Decode steps: 30, Randomness: 0, Sigma Adjustment: True")
    real = ("photo a melprsn woman\nNegative prompt: ugly\nSteps: 30, Sampler: Euler, CFG scale: 7, Seed: 3390913259, "
            "Size: 896x1072, Model hash: 2f23e688b6, Model: mel-paprika-v1, Denoising strength: 0.7, Mask blur: 4, "
            "Decode prompt: photo a melprsn woman, Decode negative prompt: , Decode CFG scale: 1, Decode steps: 30, "
            "Randomness: 0, Sigma Adjustment: True")
    options, _ = infotext_options(parse_infotext(real), img2img=True)
    assert options["img2img_alt"] is True and options["denoising_strength"] == 0.7
    read = Img2ImgAlternative(options["decode_prompt"], decode_negative=options.get("decode_negative", ""),
                              decode_steps=options["decode_steps"], decode_guidance=options["decode_guidance"],
                              randomness=options["randomness"], sigma_adjustment=options["sigma_adjustment"])
    assert read == alt
    options, not_taken = infotext_options(parse_infotext(real))  # (no init image: said, not taken)
    assert "img2img_alt" not in options and any(line.startswith("Decode steps: needs the init image")
                                                for line in not_taken)


def _image(path, seed=0, size=32):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.mark.parametrize("noise", [None, "a1111"])
def test_the_run_starts_from_the_images_inverted_noise(plain_sd, tmp_path, monkeypatch, noise):  # noqa: F811
    """run_generate --img2img-alt on the tiny SD: the noise handed to the sampler is the script's — the image's
    inversion (computed here again from the model's own conditions and network: the decode texts, not the prompt),
    blended with the seed's start noise, less init/σ_max — and it is found once for two images of one init image
    (each its own seed's random part); the images are that sampler run's."""
    from generate_recorder import record_generate

    from sdadapt.inversion import euler_noise
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.models import load_system

    calls = record_generate(monkeypatch)
    inversions = []
    real = euler_noise.euler_noise_inversion
    monkeypatch.setattr(euler_noise, "euler_noise_inversion", lambda *a, **k: inversions.append(1) or real(*a, **k))
    alt = Img2ImgAlternative("a red house", decode_negative="blurry", decode_steps=5, decode_guidance=1.5,
                             randomness=0.25, sigma_adjustment=noise is None)
    result = run_generate(model=str(plain_sd), prompt="a blue house", out=str(tmp_path / "o.png"), steps=4,
                          sampler="euler", init_image=str(_image(tmp_path / "in.png")), denoising_strength=1.0,
                          noise=noise, seed=7, count=2, img2img_alt=alt, **({"schedule": "automatic"} if noise else {}))
    assert len(inversions) == 1 and len(calls) == 2
    system = load_system(str(plain_sd))
    table = model_sigmas(system.alphas_cumprod, torch.float32)
    init = calls[0][0]["init_latents"]
    inverted = _a1111_find_noise(system.denoiser(), init, system.prompt_condition("a red house"),
                                 system.prompt_condition("blurry"), 1.5, 5, sigma_adjustment=noise is None)
    for i, (options, _) in enumerate(calls):
        assert options["init_latents"] is init and options["seed"] == 7 + i
        if noise is None:
            random = torch.randn(init.shape, generator=torch.Generator().manual_seed(7 + i))
            handed = options["start_noise"]
        else:
            random = A1111Seeds(source="nv").for_batch(7 + i, 1).start_noise(tuple(init.shape))
            handed = options["noise"].start
        expected = img2img_alt_noise(blend_noise(inverted, random, 0.25), init, sigma_max_of(table))
        assert torch.allclose(handed, expected, atol=1e-5), (handed - expected).abs().max()
    fields = result["infotexts"][0].split("\n")[-1]
    assert "Denoising strength: 1, " in fields
    assert ("Decode prompt: a red house, Decode negative prompt: blurry, Decode CFG scale: 1.5, Decode steps: 5, "
            "Randomness: 0.25, Sigma Adjustment: " + str(noise is None) + ", Version") in fields


def _cli(model, tmp_path, *extra):
    from sdadapt.cli import main

    try:
        return main(["generate", "--model", str(model), "--prompt", "a photo", "--seed", "3", "--quiet",
                     "--init-image", str(_image(tmp_path / "in.png")), *extra])
    except SystemExit as exc:  # (an option refused by the parser)
        return exc.code


def test_cli_defaults_are_the_scripts_overrides_and_the_infotext_remakes_the_image(
        plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """--img2img-alt alone: Euler, steps = decode steps, strength 1, the prompt as the decode prompt (A1111's ticked
    overrides); --infotext of the image with the init image makes it again, byte for byte."""
    from generate_recorder import record_generate

    calls = record_generate(monkeypatch)
    assert _cli(plain_sd, tmp_path, "--img2img-alt", "--decode-steps", "3", "--out", str(tmp_path / "a.png")) == 0
    (options, _), = calls
    assert options["sampler"] == "euler" and options["steps"] == 3 and options["denoising_strength"] == 1.0
    from sdadapt.images import read_png_text

    text = read_png_text(tmp_path / "a.png")["parameters"]
    assert "Steps: 3, Sampler: Euler" in text and "Decode prompt: a photo, Decode negative prompt: , " \
        "Decode CFG scale: 1, Decode steps: 3, Randomness: 0, Sigma Adjustment: False" in text
    assert _cli(plain_sd, tmp_path, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    calls.clear()
    assert _cli(plain_sd, tmp_path, "--img2img-alt", "--steps", "2", "--decode-steps", "4", "--denoising-strength",
                "0.6", "--sampler", "heun", "--decode-prompt", "a cat", "--out", str(tmp_path / "c.png")) == 0
    (options, _), = calls  # (each override untied: the given options stay)
    assert (options["sampler"], options["steps"], options["denoising_strength"]) == ("heun", 2, 0.6)
    text = read_png_text(tmp_path / "c.png")["parameters"]
    assert text.startswith("a photo\n") and "Decode prompt: a cat," in text and "Decode steps: 4," in text


@pytest.mark.parametrize("extra, message", [
    (["--randomness", "0.5"], "only applies with --img2img-alt"),
    (["--img2img-alt", "--randomness", "2"], "Randomness"),
    (["--img2img-alt", "--hires-scale", "2"], "hires"),
    (["--img2img-alt", "--loopback", "2"], "--loopback"),
    (["--img2img-alt", "--noise-multiplier", "1.1"], "--noise-multiplier"),
    (["--img2img-alt", "--xyz-x", "steps", "2,3"], "one at a time"),
])
def test_cli_refusals(plain_sd, tmp_path, capsys, extra, message):  # noqa: F811
    assert _cli(plain_sd, tmp_path, *extra, "--out", str(tmp_path / "o.png")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_mask_and_models_it_cannot_call_are_refused(plain_sd, tmp_path, capsys):  # noqa: F811
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    assert _cli(plain_sd, tmp_path, "--img2img-alt", "--mask", str(mask), "--out", str(tmp_path / "o.png")) == 2
    assert "leave --mask out" in capsys.readouterr().err
    from sdadapt.cli import main

    assert main(["generate", "--model", "toy", "--prompt", "a", "--quiet", "--init-image",
                 str(_image(tmp_path / "in.png", size=16)), "--img2img-alt", "--out", str(tmp_path / "t.png")]) == 2
    assert "toy model" in capsys.readouterr().err


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "euler_noise_inversion(model")
    assert scope["noise"].shape == (1, 4, 8, 8)
