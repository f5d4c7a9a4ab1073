"""A1111 infotext / RNG loose ends (docs/samplers.md "Noise and seeds", docs/clip-inversion.md "Sampler").

* ``RNG: CPU`` on inpainting: every ``--inpainting-fill`` draws what A1111's "CPU" source draws — a transcription of
  A1111's img2img draws (modules/processing.py ``StableDiffusionProcessingImg2Img.init`` / ``sample``, modules/rng.py
  ``ImageRNG``, modules/sd_samplers_kdiffusion.py ``sample_img2img`` / ``TorchHijack``) against sdadapt's run;
  an EDM (Playground) run writes no RNG (A1111 cannot sample such a model).
* counts in log lines: "1 model call", "2 model calls" (sdadapt.plurals, the one home).
* ``generate --image-vectors`` takes ``--noise`` and the σ settings: the same numbers as the plain generate path.
* the toy model samples with every sampler family through the shared sampler path.
"""

from __future__ import annotations

import types

import pytest
import torch

from sdadapt.cli import main
from sdadapt.images import decode_png, to_uint8
from sdadapt.plurals import plural


# ------------------------------------------------------------------------------------------------ counted nouns
def test_plural_says_one_and_many():
    assert plural(1, "model call") == "1 model call"
    assert plural(0, "model call") == "0 model calls"
    assert plural(2, "layer") == "2 layers"
    assert plural(1, "other entry", many="other entries") == "1 other entry"
    assert plural(3, "other entry", many="other entries") == "3 other entries"


def test_refiner_report_counts_one_call():
    from sdadapt.jobs.generate_refiner import handoff_report

    one = types.SimpleNamespace(switch_at=0.5, by_steps=True, cutoff=500, calls={"base": 1, "refiner": 1})
    assert handoff_report(one).startswith("refiner: 1 model call on the base, 1 on the refiner")
    two = types.SimpleNamespace(switch_at=0.5, by_steps=True, cutoff=500, calls={"base": 2, "refiner": 3})
    assert handoff_report(two).startswith("refiner: 2 model calls on the base, 3 on the refiner")



# ----------------------------------------------------------------------- --image-vectors: A1111 noise, σ settings
@pytest.fixture(scope="module")
def toy_image():
    from sdadapt.jobs.models import load_system

    return load_system("toy-image")


@pytest.mark.parametrize("sampler,schedule,noise,options", [
    ("euler_a", "karras", dict(source="cpu"), dict(sigma_max=3.0, rho=5.0)),
    ("dpm_2_a", None, dict(source="nv", subseed=9, subseed_strength=0.3, ensd=31337), None),
    ("euler", "beta", None, dict(beta_alpha=0.5, beta_beta=0.7)),
    ("ddim", None, dict(source="cpu", seed_resize_from=(48, 32)), None),
])
def test_vectors_none_equal_the_plain_generate_path(toy_image, sampler, schedule, noise, options):
    """``generate_with_vectors(vectors=None)`` with A1111's noise / σ settings is, bit for bit, the plain generate path
    (``sampling.generate``) on the same toy model and seed with the same settings — and the settings change the image
    (so they are not dropped on the way)."""
    from sdadapt.inversion.clip import generate_with_vectors
    from sdadapt.samplers.a1111_noise import A1111Seeds
    from sdadapt.samplers.schedules import ScheduleOptions
    from sdadapt.sampling import generate

    seeds = None if noise is None else A1111Seeds(**noise)
    grid = None if options is None else ScheduleOptions(**options)
    kwargs = dict(seed=3, steps=3, guidance=2.0, sampler=sampler, schedule=schedule)
    got = generate_with_vectors(toy_image, None, prompt="a red circle", count=1, schedule_options=grid, noise=seeds,
                                **kwargs)
    want = generate(toy_image, ["a red circle"], schedule_options=grid, noise=seeds, **kwargs)
    assert torch.equal(got, want)
    plain = generate_with_vectors(toy_image, None, prompt="a red circle", count=1, **kwargs)
    assert not torch.equal(got, plain)


def _vectors_file(system, tmp_path):
    from sdadapt.inversion import ImageVectors, image_conditioning, save_image_vectors

    c = image_conditioning(system)
    learnt = ImageVectors(vectors=torch.randn(1, c.dim, generator=torch.Generator().manual_seed(6)), site=c.site)
    save_image_vectors(tmp_path / "v.safetensors", learnt)
    return tmp_path / "v.safetensors", learnt


def test_generate_image_vectors_takes_noise_and_sigma_settings(toy_image, tmp_path):
    """``generate --image-vectors --noise a1111-cpu --subseed ... --schedule karras --sigma-max ...``: image i is
    ``generate_with_vectors`` with image i's A1111 seeds (``--subseed + i``; with a variation strength every image has
    ``--seed``, as ``generate``) and the σ settings."""
    from sdadapt.inversion.clip import generate_with_vectors
    from sdadapt.samplers.a1111_noise import A1111Seeds
    from sdadapt.samplers.schedules import ScheduleOptions

    vectors, learnt = _vectors_file(toy_image, tmp_path)
    png = tmp_path / "a.png"
    assert main(["generate", "--model", "toy-image", "--image-vectors", str(vectors), "--prompt", "a circle",
                 "--seed", "4", "--steps", "3", "--count", "2", "--sampler", "euler_a", "--noise", "a1111-cpu",
                 "--subseed", "7", "--subseed-strength", "0.25", "--schedule", "karras", "--sigma-max", "4", "-q",
                 "-o", str(png)]) == 0
    for i in range(2):
        want = generate_with_vectors(toy_image, learnt, prompt="a circle", count=1, seed=4, steps=3, guidance=2.0,
                                     sampler="euler_a", schedule="karras", schedule_options=ScheduleOptions(sigma_max=4.0),
                                     noise=A1111Seeds(source="cpu", subseed=7 + i, subseed_strength=0.25))[0]
        got = decode_png((tmp_path / f"a-{i:02d}.png").read_bytes())
        assert (got == to_uint8(want)).all()


def test_generate_image_vectors_refuses_what_cannot_apply(toy_image, tmp_path, capsys):
    """The σ settings without a schedule, and the variation seed without --noise, are refused by name as in
    ``generate``; options outside sampling (--width) stay refused with --image-vectors."""
    vectors, _ = _vectors_file(toy_image, tmp_path)
    base = ["generate", "--model", "toy-image", "--image-vectors", str(vectors), "--prompt", "", "--steps", "2",
            "-o", str(tmp_path / "t.png")]
    for extra, words in ((["--sigma-max", "4"], "add --schedule"), (["--subseed", "3"], "--noise a1111"),
                         (["--width", "32"], "--width does not apply with --image-vectors")):
        try:
            code = main([*base, *extra])
        except SystemExit as exc:
            code = exc.code
        assert code == 2 and words in capsys.readouterr().err, extra
    assert not (tmp_path / "t.png").exists()


# ----------------------------------------------------------------------------- RNG: CPU on inpainting fill modes
def _toy():
    from sdadapt.jobs.models import load_system

    return load_system("toy")


@pytest.mark.parametrize("fill", ["original", "fill", "latent-noise", "latent-nothing"])
@pytest.mark.parametrize("sampler", ["euler_a", "euler"])
def test_inpainting_draws_a1111s_cpu_numbers_for_every_fill(fill, sampler):
    """An inpainting run without ``--noise`` (whose infotext says ``RNG: CPU``) against A1111's img2img with its
    "CPU" source, transcribed here (A1111 v1.10):

    * ``StableDiffusionProcessingImg2Img.init`` (modules/processing.py): ``mask = 1 − latmask``, ``nmask = latmask``;
      "latent noise" (``inpainting_fill == 2``): ``init·mask + create_random_tensors(shape, seeds)·nmask`` — a *new*
      ``rng.ImageRNG`` of the seeds, its first draw; "latent nothing" (3): ``init·mask``; "fill" (0) and "original"
      (1) draw nothing (``masking.fill`` works on the pixels);
    * ``sample``: ``x = self.rng.next()`` (``p.rng``, the batch's ImageRNG, made in ``process_images_inner``: its own
      generators, untouched by the fill's draw); sd_samplers_kdiffusion.py ``sample_img2img``: ``t_enc =
      int(min(strength, 0.999)·steps)``, ``sigma_sched = sigmas[steps − t_enc − 1:]``, ``xi = init + x·σ_sched[0]``;
      k-diffusion's loop with ``randn_like`` → ``p.rng.next()`` (``TorchHijack``); ``CFGDenoiser.forward``:
      ``denoised = init·mask + nmask·denoised``; after sampling ``samples·nmask + init·mask``.

    sdadapt: :meth:`InpaintInputs.init_latents` then :func:`sdadapt.sampling.generate` with the latent mask, as
    ``generate`` runs it. The toy's UNet stands in for the model (its own float32 rounding: 1e-4)."""
    from test_a1111_noise import ReferenceImageRNG, _kdiffusion_sigmas, _sigma_to_t

    from sdadapt.jobs.generate_inpaint import InpaintInputs
    from sdadapt.samplers.sigma_space import training_sigmas
    from sdadapt.sampling import generate

    toy = _toy()
    seed, steps, strength, guidance = 11, 5, 0.7, 2.0
    shape = (12, 16, 16)
    init = torch.tanh(torch.randn((1, *shape), generator=torch.Generator().manual_seed(99)))
    latmask = torch.zeros(1, 1, 16, 16)
    latmask[..., 3:12, 5:14] = 1.0
    # --- A1111, transcribed
    mask, nmask = (1 - latmask).double(), latmask.double()
    a_init = init.double()
    if fill == "latent-noise":
        a_init = a_init * mask + ReferenceImageRNG("CPU", shape, [seed]).next().double() * nmask
    elif fill == "latent-nothing":
        a_init = a_init * mask
    rng = ReferenceImageRNG("CPU", shape, [seed])
    train = training_sigmas(toy.alphas_cumprod.double()).numpy()
    t_enc = int(min(strength, 0.999) * steps)
    sigmas = _kdiffusion_sigmas(train, steps)[steps - t_enc - 1:]
    x = a_init + rng.next().double() * sigmas[0]
    cond, uncond = toy.condition(["a red circle"]), toy.condition([""])
    eps = toy.denoiser()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = torch.full((1,), _sigma_to_t(train, s))
        x_in = (x / (s * s + 1) ** 0.5).float()
        with torch.no_grad():
            e_u, e_c = eps(x_in, t, uncond).double(), eps(x_in, t, cond).double()
        den = x - s * (e_u + guidance * (e_c - e_u))
        den = a_init * mask + nmask * den
        if sampler == "euler":
            x = x + (x - den) / s * (s_next - s)
        else:
            up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
            down = (s_next**2 - up**2) ** 0.5
            x = x + (x - den) / s * (down - s)
            if s_next > 0:
                x = x + rng.next().double() * up
    want = x * nmask + a_init * mask
    # --- sdadapt
    inputs = InpaintInputs(init, latmask, None, fill)
    got = generate(toy, ["a red circle"], seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                   schedule="automatic", init_latents=inputs.init_latents(seed), denoising_strength=strength,
                   output="latents", **inputs.generate_options())
    assert float((got.double() - want).abs().max()) < 1e-4


@pytest.mark.parametrize("sampler,draws", [("euler", False), ("dpmsolver++", False), ("dpmsolver++_sde", True)])
@pytest.mark.parametrize("img2img", [False, True])
def test_edm_samplers_draw_only_the_start_noise_but_the_sde(sampler, draws, img2img):
    """An EDM model (Playground v2.5) starts from the CPU generator's first draw (A1111's "CPU" ``ImageRNG`` first
    draw; tests/test_playground_edm.py: diffusers' pipeline with that generator), and its Euler and DPM-Solver++
    draw nothing after it — txt2img, img2img and inpainting (diffusers' blend re-noises with the start noise) — so
    ``RNG: CPU`` holds for them. The SDE DPM-Solver draws its step noise from the generator, where A1111's
    "DPM++ 2M SDE" samples a Brownian tree: no RNG field for it (A1111 cannot run an EDM model at all: its
    ``sd_models_config`` has no EDM case, so the field names the noise, not a reproducible A1111 run)."""
    from sdadapt.img2img import Img2ImgStart
    from sdadapt.jobs.infotext import InfotextRun
    from sdadapt.samplers.edm import EDMSchedule, edm_sample_latents

    def model(x, t, cond):
        return torch.tanh(0.7 * x + 0.3 * t.view(-1, 1, 1, 1)) + 0.1 * x

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    start = None
    if img2img:
        init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 2:6, 2:6] = 1.0
        start = Img2ImgStart(init, strength=0.6, mask=mask)
    runs = [edm_sample_latents(model, x_T, None, sampler=sampler, schedule=EDMSchedule(), num_steps=4, start=start,
                               generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1]) != draws
    rng = InfotextRun(prompt="p", sampler=sampler).for_image(0)
    assert ("RNG: CPU" in rng) != draws, rng


# ------------------------------------------------------------------------------- the toy through the shared path
FAMILIES = ["ddim", "euler", "euler_a", "heun", "dpm_2_a", "lms", "pndm", "dpmsolver++", "unipc", "dpmpp_2s_a",
            "dpmpp_sde", "dpmsolver++_sde", "lcm", "restart", "dpm_fast"]


@pytest.mark.parametrize("sampler", FAMILIES)
def test_toy_generate_is_the_shared_sampler_path(sampler):
    """``generate`` on the toy with every sampler family is :func:`sdadapt.samplers.sample_latents` on the toy's
    denoiser with its conditioning, the seed's CPU generator (start noise, then the samplers' noise) and, for
    ``ddim``, the toy's own DDIM settings (``ToySystem.ddim_options``) — which the toy's own ``sample`` runs too."""
    from sdadapt.samplers import sample_latents
    from sdadapt.sampling import generate

    toy = _toy()
    got = generate(toy, ["a blue square"], negative="red", seed=4, steps=4, guidance=2.5, sampler=sampler)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(1, 12, 16, 16, generator=g)
    with torch.no_grad():
        latents = sample_latents(toy.denoiser(), x_T, toy.condition(["a blue square"]), sampler=sampler,
                                 alphas_cumprod=toy.alphas_cumprod, num_steps=4, uncond=toy.condition(["red"]),
                                 guidance_scale=2.5, generator=g,
                                 **(dict(toy.ddim_options) if sampler == "ddim" else {}))
    assert torch.equal(got, toy.decode_latents(latents))


def test_toy_ddim_is_one_image_whichever_path_runs_it(tmp_path):
    """The toy's DDIM image does not change when an option sends it through the shared path: ``--noise a1111-cpu``
    draws the same numbers as sdadapt's CPU generator, so the PNG is the same as without it (before, the shared path
    ran DDIM without the toy's x̂0 clamp and final ᾱ = 1, another image)."""
    base = ["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "4", "--seed", "2", "-q"]
    assert main([*base, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--noise", "a1111-cpu", "-o", str(tmp_path / "b.png")]) == 0
    a, b = (decode_png((tmp_path / f"{n}.png").read_bytes()) for n in "ab")
    assert (a == b).all()
