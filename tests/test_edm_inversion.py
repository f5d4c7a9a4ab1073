"""Null-text inversion of an EDM-formulation model (Playground v2.5) through its Euler ODE, against the real diffusers.

- D huggingface/diffusers 0.42.1 (the installed package, imported and run): schedulers/scheduling_edm_euler.py — the σ
  grid (``__init__`` 105-124, ``set_timesteps``), ``precondition_inputs`` / ``precondition_noise`` /
  ``precondition_outputs`` (177-247), ``step`` (427-526: ``derivative = (sample − x0)/σ``, ``prev = sample +
  derivative·dt``, 512-519); schedulers/scheduling_ddim_inverse.py ``step`` (311-385: the UNet output for the
  current latent taken at the next, higher timestep ``prev_timestep = timestep``, 339-349) — the rule the EDM pivot
  transcribes (sdadapt.inversion.core.EDMSteps).
- The SD null-text tolerances reused: tests/test_inversion.py ``test_null_text_optimisation_beats_plain_ddim_on_a_small_model``
  (nti < 0.5·ddim, long nti and npi < 1e-3·ddim, nti from npi < npi) and
  ``test_tensor_conditions_on_a_diffusers_unet`` (nti < ddim, nti < 0.9·npi).
Tiny Playground-like single file: tests/test_playground_edm.py's ``playground_files``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import test_playground_edm
from test_inversion import TinyDenoiser
from test_playground_edm import CONFIG

from sdadapt.formats.files import WeightFileError, write_safetensors
from sdadapt.inversion import (
    EDMSteps,
    invert_image,
    invert_latents,
    load_inversion,
    regenerate_image,
    sample_inversion,
    save_inversion,
)
from sdadapt.samplers.edm import EDMSchedule, edm_euler_sample, edm_precondition

files, system = test_playground_edm.files, test_playground_edm.system


def _stand_in(x, t, _cond=None):
    """A smooth non-linear stand-in for the UNet output F(c_in·x, c_noise) (B, C, H, W), in x's dtype."""
    return torch.tanh(0.7 * x + 0.3 * t.to(x.dtype).view(-1, 1, 1, 1)) + 0.1 * x.roll(1, dims=1)


def _gaussian_denoiser(s: float, sigma_data: float = 0.5):
    """F for which D(x; σ) = x·s²/(s² + σ²) exactly: the ideal denoiser of N(0, s²) data (a linear ODE)."""

    def model(x_in, c_noise, _cond=None):
        sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
        x = x_in.double() * (sigma ** 2 + sigma_data ** 2).sqrt()
        c_skip, c_out, _, _ = edm_precondition(sigma, sigma_data=sigma_data)
        return ((x * s * s / (s * s + sigma ** 2) - c_skip * x) / c_out).to(x_in.dtype)

    return model


def _reference_pivot(model, x0, config, steps):
    """The EDM pivot in float64: D's EDMEulerScheduler σ grid; per step σ_f = σ[i+1] → σ_t = σ[i]: the UNet on the
    current latent's own input u = x/√(σ_f² + σ_d²) at ¼·ln σ_t, x̃ = u·√(σ_t² + σ_d²) (the latent at σ_t with that
    input), D = c_skip·x̃ + c_out·F (precondition_outputs, − for v), x ← x + (x̃ − D)/σ_t·(σ_t − σ_f)."""
    scheduler = diffusers.EDMEulerScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    s, sd = scheduler.sigmas.double(), float(config["sigma_data"])
    sign = -1.0 if config["prediction_type"] == "v_prediction" else 1.0
    x = x0.double()
    out = [x]
    for i in reversed(range(steps)):
        sf, st = s[i + 1], s[i]
        u = x / torch.sqrt(sf ** 2 + sd ** 2)
        F = model(u, (0.25 * torch.log(st)).expand(x.shape[0]))
        xt = u * torch.sqrt(st ** 2 + sd ** 2)
        D = sd ** 2 / (st ** 2 + sd ** 2) * xt + sign * st * sd / torch.sqrt(st ** 2 + sd ** 2) * F
        x = x + (xt - D) / st * (st - sf)
        out.append(x)
    return out


# ------------------------------------------------------------------------------ (1) the step itself
@pytest.mark.parametrize("change, steps", [({}, 6), ({"final_sigmas_type": "sigma_min"}, 4),
                                           ({"prediction_type": "v_prediction", "sigma_schedule": "exponential"}, 5),
                                           ({"sigma_data": 1.0, "sigma_max": 14.6, "rho": 5.0}, 3)])
def test_pivot_is_a_float64_transcription_of_the_euler_step_run_upwards(change, steps):
    config = {**CONFIG, **change}
    rule = EDMSteps(EDMSchedule.from_config(config), steps)
    scheduler = diffusers.EDMEulerScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    assert torch.equal(rule.sigmas, scheduler.sigmas)
    x0 = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.7
    ours = rule.pivot(_stand_in, x0, None)
    want = _reference_pivot(_stand_in, x0, config, steps)
    assert len(ours) == steps + 1
    for a, b in zip(ours, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=2e-6 * float(b.abs().max()))
    assert float(want[-1].std()) > 0.3 * config["sigma_max"]  # (it ends at σ_max's scale)


def test_sampling_step_is_diffusers_edm_euler_step():
    """EDMSteps.step is D's EDMEulerScheduler.step (s_churn 0) bit for bit, and sdadapt's edm_euler_sample."""
    rule = EDMSteps(EDMSchedule.from_config(CONFIG), 5)
    scheduler = diffusers.EDMEulerScheduler.from_config(CONFIG)
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    ours = x
    for i, t in enumerate(scheduler.timesteps):
        out = _stand_in(scheduler.scale_model_input(x, t), t.expand(1))
        assert torch.equal(out, rule.model_output(_stand_in, ours, i, None))
        x = scheduler.step(out, t, x, return_dict=False)[0]
        ours = rule.step(out, ours, i)
        assert torch.equal(ours, x), i


def test_inversion_step_inverts_the_sampling_step_to_first_order():
    """Exact where the ODE's ε̂ is constant; one step's round-trip error O(Δσ²) (halving Δσ quarters it); on the
    exact denoiser of Gaussian data the 10-step round trip is close (the model at the unscaled current latent, or at
    the lower σ as plain forward Euler, is ~10-50x off there)."""
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))

    def constant(x_in, c_noise, _cond=None):  # F with (x − D)/σ = eps at every x, σ
        sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_precondition(sigma, sigma_data=0.5)
        x = x_in.double() / c_in
        return (((1 - c_skip) * x - sigma * eps) / c_out).float()

    rule = EDMSteps(EDMSchedule.from_config(CONFIG), 6)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.5
    pivot = rule.pivot(constant, x0, None)
    torch.testing.assert_close(pivot[-1], x0 + 80.0 * eps, rtol=0, atol=1e-4)
    x = pivot[-1]
    for i in range(6):
        x = rule.step(rule.model_output(constant, x, i, None), x, i)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)

    errors = []
    for h in (0.1, 0.05, 0.025):  # one step σ 1 → 1 + h and back (grid [1 + h, 1, 1])
        step = EDMSteps(EDMSchedule.from_config({**CONFIG, "sigma_min": 1.0, "sigma_max": 1.0 + h,
                                                 "final_sigmas_type": "sigma_min"}), 2)
        up = step.invert_step(_stand_in, x0 + 1.0 * eps, 0, None)
        back = step.step(step.model_output(_stand_in, up, 0, None), up, 0)
        errors.append(float((back - x0 - eps).abs().max()))
    assert all(3.5 < a / b < 4.5 for a, b in itertools.pairwise(errors)), errors  # (second order: a first-order inverse)

    model = _gaussian_denoiser(0.5)
    rule = EDMSteps(EDMSchedule.from_config(CONFIG), 10)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5
    x = rule.pivot(model, x0, None)[-1]
    for i in range(10):
        x = rule.step(rule.model_output(model, x, i, None), x, i)
    relative = float(((x - x0) ** 2).mean() / (x0 ** 2).mean())
    assert relative < 0.05, relative  # (measured 0.017; the model at the unscaled latent: 0.83, forward Euler: 0.22)


# --------------------------------------------------------- (2) null-text inversion reconstructs (SD tolerances)
def test_null_text_on_an_edm_stand_in_meets_the_sd_null_text_tolerances():
    """test_inversion.py's small conditional model as the UNet F of an EDM model, the SD test's criteria."""
    model = TinyDenoiser()
    edm = EDMSchedule.from_config(CONFIG)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    cond, null = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    errors = {}
    for name, options in (("ddim", {"method": "ddim"}), ("npi", {"method": "negative-prompt"}), ("nti", {}),
                          ("nti-long", {"inner_steps": 50, "learning_rate": 0.1}), ("nti-npi", {"init": "negative-prompt"})):
        inv = invert_latents(model, x0, cond, null, edm=edm, num_steps=10, guidance=7.5, **options)
        assert inv.edm == edm and inv.x_T.shape == x0.shape and torch.equal(inv.timesteps, EDMSteps(edm, 10).timesteps)
        errors[name] = float(((sample_inversion(model, inv) - x0) ** 2).mean())
    # the SD test's relative criteria as they are ...
    assert errors["nti"] < 0.5 * errors["ddim"], errors
    assert errors["nti-npi"] < errors["npi"], errors
    assert errors["nti-long"] < errors["npi"], errors
    # ... and its 1e-3·ddim bounds as what they are there, a relative MSE < 1e-3 · 55.6 (DDIM's drift on its
    # unit-power latent): plain EDM inversion drifts far less under guidance (measured ddim 0.49 relative, npi 0.028,
    # nti 0.035, nti 50 x 0.1 0.026, nti from npi 0.027)
    power = float((x0 ** 2).mean())
    assert max(errors["npi"], errors["nti-long"], errors["nti-npi"]) < 0.0556 * power, errors
    # first order in Δσ: 20 steps reconstruct ~4x better in RMS than 10 (measured 0.0064 -> 0.0009 MSE)
    inv = invert_latents(model, x0, cond, null, edm=edm, num_steps=20, guidance=7.5, init="negative-prompt")
    assert float(((sample_inversion(model, inv) - x0) ** 2).mean()) < errors["nti-npi"] / 4, errors
    assert all(p.grad is None for p in model.parameters())


def test_null_text_on_a_tiny_playground_model(system):
    """invert_image on the Playground-like system: encoded with the latents' mean / std, its Euler ODE, the SD
    null-text criteria on a diffusers UNet; DDIM on the same weights read as plain SDXL is another trajectory."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    size = system.image_size
    try:
        system.image_size = 16
        x0 = system.encode_images(image)
        runs = {name: invert_image(system, image, "a red cube", num_steps=5, guidance=7.5, **options)
                for name, options in (("ddim", {"method": "ddim"}), ("npi", {"method": "negative-prompt"}),
                                      ("nti", {"init": "negative-prompt", "inner_steps": 4}))}
    finally:
        system.image_size = size
    with torch.no_grad():
        err = {name: float(((sample_inversion(system.denoiser(), inv) - x0) ** 2).mean()) for name, inv in runs.items()}
    assert runs["nti"].edm == system.edm and runs["nti"].prediction_type == "epsilon"
    assert err["nti"] < err["ddim"] and err["nti"] < 0.9 * err["npi"], err
    assert all(p.grad is None for p in system.unet.parameters())


# ------------------------------------------- (3) guidance 1: sdadapt's EDM Euler sampler and diffusers' loop agree
def test_guidance_1_inversion_reconstructs_through_both_euler_samplers(system):
    steps = 6
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        x0 = system.encode_images(image)
        cond = system.condition(system.tokenize(["a red cube"]))
        uncond = system.condition(system.tokenize([""]))
        model = system.denoiser()
        inv = invert_latents(model, x0, cond, uncond, edm=system.edm, num_steps=steps, guidance=1.0, method="ddim")
        ours = sample_inversion(model, inv)
        # sdadapt's sampler starts from unit noise × init_noise_sigma
        sampler = edm_euler_sample(lambda x, t: model(x, t, cond), inv.x_T / system.edm.init_noise_sigma,
                                   schedule=system.edm, num_steps=steps)
        scheduler = diffusers.EDMEulerScheduler.from_config(system.scheduler_config)
        scheduler.set_timesteps(steps)
        x = inv.x_T.clone()
        for t in scheduler.timesteps:  # (the SDXL pipeline's loop, guidance 1)
            out = system.unet(scheduler.scale_model_input(x, t), t, cond["context"],
                              added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
            x = scheduler.step(out, t, x, return_dict=False)[0]
    scale = float(x0.abs().max())
    torch.testing.assert_close(sampler, ours, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(x, ours, rtol=0, atol=1e-5 * scale)
    assert float((ours - x0).abs().max()) < 10 * scale  # (a reconstruction, not a blow-up; quality: the stand-ins)
    assert abs(float(inv.x_T.std()) / system.edm.sigma_max - 1) < 0.5  # (σ_max's noise scale)


# --------------------------------------------------------------------------- (4) the file and the command
def test_invert_cli_on_a_playground_model_and_its_file_regenerates(files, system, tmp_path):
    """`python -m sdadapt invert` on the Playground-like model (written as its diffusers folder with a 16 px UNet
    sample size: the single file's 256 px make this test minutes long; the file loads as the same EDM system,
    tests/test_playground_edm.py), then the inversion file it writes regenerates its PNGs."""
    import json

    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.images import read_image
    from sdadapt.inversion.job import load_model

    assert load_model(str(files[0])).edm == system.edm  # (the single file: an EDM system, inverted, not refused)
    folder = tmp_path / "pg"
    system.save_model(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 8}))
    system = DiffusersSystem.from_folder(folder)
    assert system.image_size == 16 and system.edm is not None
    files = (folder, files[1])
    source = tmp_path / "in.png"
    pixels = (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(9)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(source)
    out = tmp_path / "out.png"
    assert main(["invert", str(source), "--prompt", "a red cube", "--model", str(files[0]), "--steps", "4",
                 "--guidance", "3", "--init", "negative-prompt", "--edit-prompt", "a blue ball", "-q",
                 "-o", str(out)]) == 0
    inv = load_inversion(tmp_path / "out.safetensors")
    assert inv.edm == system.edm and inv.method == "null-text" and inv.guidance == 3.0
    assert torch.equal(inv.timesteps, EDMSteps(system.edm, 4).timesteps)
    assert inv.x_T.shape == (1, 4, system.image_size // 2, system.image_size // 2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "sdadapt-inversion/2" and f.get_tensor("timesteps").dtype == torch.float32

    def png(images):
        return ((images[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def read(path):
        return torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.uint8).view(
            system.image_size, system.image_size, 3)

    # the file regenerates the command's PNGs (bit-identical reruns: the 8-bit images within one level)
    assert (png(regenerate_image(system, inv)).int() - read(out).int()).abs().max() <= 1
    edit = png(regenerate_image(system, inv, prompt="a blue ball"))
    assert (edit.int() - read(tmp_path / "out-edit.png").int()).abs().max() <= 1
    assert (edit.int() - read(out).int()).abs().max() > 0
    assert read_image(source, size=system.image_size).shape == (3, system.image_size, system.image_size)

    # the same weights read as plain SDXL (DDPM) refuse the EDM inversion, and the other way round
    plain = DiffusersSystem.from_single_file(files[1])
    with pytest.raises(ValueError, match="made on an EDM-formulation model.*discrete-time"):
        regenerate_image(plain, inv)
    ddim_inv = dataclasses.replace(inv, edm=None, timesteps=torch.tensor([751, 501, 251, 1]), alphas_cumprod=plain.alphas_cumprod)
    with pytest.raises(ValueError, match="made on a discrete-time.*EDM-formulation"):
        regenerate_image(system, ddim_inv)
    other = dataclasses.replace(inv, edm=dataclasses.replace(inv.edm, sigma_max=60.0))
    with pytest.raises(ValueError, match="another EDM schedule"):
        regenerate_image(system, other)


def test_edm_inversion_file_round_trips_and_damage_is_named(tmp_path):
    model = TinyDenoiser()
    edm = EDMSchedule.from_config({**CONFIG, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(4)
    x0, cond, null = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    inv = invert_latents(model, x0, cond, null, edm=edm, num_steps=3, method="negative-prompt", guidance=5.0)
    assert inv.prediction_type == "v_prediction" and inv.alphas_cumprod.shape == (0,)
    path = save_inversion(tmp_path / "inv.safetensors", inv)
    again = load_inversion(path)
    assert again.edm == edm and torch.equal(again.timesteps, inv.timesteps) and torch.equal(again.x_T, inv.x_T)
    assert torch.equal(sample_inversion(model, again), sample_inversion(model, inv))
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    broken = tmp_path / "broken.safetensors"
    write_safetensors(broken, tensors, {k: v for k, v in meta.items() if k != "edm"})
    with pytest.raises(WeightFileError, match="broken.safetensors.*'edm' schedule"):
        load_inversion(broken)
    write_safetensors(broken, {**tensors, "timesteps": tensors["timesteps"] * 1.01}, meta)
    with pytest.raises(WeightFileError, match="broken.safetensors.*σ timesteps"):
        load_inversion(broken)
    assert math.isclose(float(again.timesteps[0]), edm.sigma_max, rel_tol=1e-6)
