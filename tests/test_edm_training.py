"""Training an EDM-formulation model (Playground v2.5) as diffusers does, against the real diffusers.

- D huggingface/diffusers examples/dreambooth/train_dreambooth_lora_sdxl.py (commit 58eb52c0), ``--do_edm_style_training``
  with an EDM scheduler: ``EDMEulerScheduler.from_pretrained`` (1118-1120); latents ``(z − mean)·sf/std`` (1687-1694);
  indices ``randint(0, T)`` into ``scheduler.timesteps`` (1702-1712); ``add_noise`` (1716); ``get_sigmas`` (1645-1655);
  ``precondition_inputs`` (1720-1725); the UNet at ``timesteps`` (1748-1754); ``precondition_outputs`` (1776-1781); no
  weighting for an EDM scheduler (1789-1794); target ``model_input`` (1797-1806); ``F.mse_loss`` (1825-1835; the
  prior loss 1808-1823, 1856-1858).
- D schedulers/scheduling_edm_euler.py (the installed 0.42.1, imported and run): the σ grid of ``__init__`` (105-124),
  ``add_noise`` (536-581), ``precondition_*``; scheduling_edm_dpmsolver_multistep.py's ``precondition_*`` (the same).
Tiny Playground-like single file: tests/test_playground_edm.py's ``playground_files``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.nn import functional as F

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import test_playground_edm
from test_playground_edm import CONFIG

from sdadapt.samplers.edm import EDMSchedule
from sdadapt.training.edm import edm_training_sigmas
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss, train_step

T = 1000

# the shared tiny Playground-like file and its system (module-scoped fixtures of test_playground_edm)
files, system = test_playground_edm.files, test_playground_edm.system


def _stand_in(x, t, _cond=None):
    """A smooth stand-in for the UNet output F(c_in·x, c_noise) (B, C, H, W), any dtype."""
    return torch.tanh(0.7 * x + 0.3 * t.view(-1, 1, 1, 1)) + 0.1 * x.roll(1, dims=1)


# ----------------------------------------------------------------------------------------------- the σ grid
@pytest.mark.parametrize("change", [{}, {"sigma_schedule": "exponential"}, {"sigma_min": 0.01, "sigma_max": 20.0, "rho": 5.0},
                                    {"num_train_timesteps": 50}])
def test_training_grid_is_edm_euler_schedulers_own(change):
    """σ grid and c_noise bit for bit those of D's EDMEulerScheduler (the scheduler the training script builds)."""
    config = {**CONFIG, **change}
    scheduler = diffusers.EDMEulerScheduler.from_config(config)
    sigmas = edm_training_sigmas(EDMSchedule.from_config(config), config["num_train_timesteps"])
    assert sigmas.dtype == torch.float32 and torch.equal(sigmas, scheduler.sigmas[:-1])
    assert torch.equal(0.25 * torch.log(sigmas), scheduler.timesteps)


# ------------------------------------------------------------------------------ (1) the loss, float64 reference
def _reference_loss(x0, noise, index, schedule, *, weights=None):
    """D's EDM loss transcribed in float64: the scheduler's float32 σ (its __init__, 105-111), x_σ = x0 + ε·σ, the UNet
    on c_in·x_σ at ¼·ln σ, D = c_skip·x_σ + c_out·F (± for ε / v), mean((D − x0)²), no weighting (1789-1794)."""
    ramp = torch.arange(T + 1, dtype=torch.float64) / T
    if schedule.sigma_schedule == "karras":
        hi, lo = schedule.sigma_max ** (1 / schedule.rho), schedule.sigma_min ** (1 / schedule.rho)
        grid = (hi + ramp * (lo - hi)) ** schedule.rho
    else:
        grid = torch.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max), T + 1).exp().flip(0)
    sigma = grid.float().double()[index].view(-1, 1, 1, 1)
    x0, noise, sd = x0.double(), noise.double(), schedule.sigma_data
    noisy = x0 + noise * sigma
    out = _stand_in(noisy / (sigma ** 2 + sd ** 2).sqrt(), 0.25 * sigma.log().flatten())
    sign = 1.0 if schedule.prediction_type == "epsilon" else -1.0
    denoised = sd ** 2 / (sigma ** 2 + sd ** 2) * noisy + sign * sigma * sd / (sigma ** 2 + sd ** 2).sqrt() * out
    per = ((denoised - x0) ** 2).flatten(1).mean(1)
    return (per if weights is None else per * weights.double()).mean()


@pytest.mark.parametrize("change", [{}, {"prediction_type": "v_prediction"}, {"sigma_schedule": "exponential"},
                                    {"sigma_data": 1.0}])
def test_step_loss_is_diffusers_edm_loss_in_float64(change):
    schedule = EDMSchedule.from_config({**CONFIG, **change})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, 4, 6, 6, generator=g)
    index = torch.tensor([0, 1, 517, 999])  # σ_max, the next, the middle, the smallest drawn
    config = StepConfig(edm=schedule)
    prepared = prepare_batch({"latents": x0, "noise": noise, "timesteps": index, "cond": None}, state=TrainState(),
                             config=config, alphas_cumprod=torch.ones(T))
    loss = step_loss(_stand_in, prepared, config)
    want = _reference_loss(x0, noise, index, schedule)
    assert abs(loss.double() - want) <= 1e-6 * want, (float(loss), float(want))
    # the batch's per-image weights (DreamBooth's prior weight, a dataset's loss_weight) still multiply each image's mean
    weights = torch.tensor([0.5, 1.0, 2.0, 0.0])
    prepared = prepare_batch({"latents": x0, "noise": noise, "timesteps": index, "loss_weight": weights}, state=TrainState(),
                             config=config, alphas_cumprod=torch.ones(T))
    weighted = _reference_loss(x0, noise, index, schedule, weights=weights)
    assert abs(step_loss(_stand_in, prepared, config).double() - weighted) <= 1e-6 * weighted


def test_drawn_indices_are_uniform_over_the_grid_without_its_last_value():
    """Without fixed timesteps the step draws indices in [0, T) (D: randint(0, T)): c_noise takes grid values only,
    σ_min (index T) never; the draws are the DDPM step's own (same generator use)."""
    schedule = EDMSchedule.from_config(CONFIG)
    state, plain = TrainState(seed=4), TrainState(seed=4)
    x0 = torch.zeros(4096, 1, 1, 1)
    prepared = prepare_batch({"latents": x0}, state=state, config=StepConfig(edm=schedule), alphas_cumprod=torch.ones(T))
    ddpm = prepare_batch({"latents": x0}, state=plain, config=StepConfig(), alphas_cumprod=torch.ones(T) * 0.5)
    grid = 0.25 * torch.log(edm_training_sigmas(schedule, T))
    assert torch.equal(prepared["t"], grid[ddpm["t"]])
    assert ddpm["t"].min() >= 0 and ddpm["t"].max() == T - 1 and len(ddpm["t"].unique()) > 900


# ---------------------------------------------------------------- (2) one optimiser step against D's code path
def _diffusers_step(system, params, latents, noise, indices, cond, scheduler_config, precondition_cls):
    """The training script's EDM step (the lines in the module docstring) on the system's UNet: (loss, gradients)."""
    scheduler = diffusers.EDMEulerScheduler.from_config(scheduler_config)  # (1118-1120: from_pretrained on the folder)
    preconditioner = precondition_cls.from_config(scheduler_config)
    timesteps = scheduler.timesteps[indices]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas (1645-1655)
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    inputs = preconditioner.precondition_inputs(noisy, sigmas)
    out = system.unet(inputs, timesteps, cond["context"],
                      added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    prediction = preconditioner.precondition_outputs(noisy, out, sigmas)
    loss = F.mse_loss(prediction.float(), latents.float(), reduction="mean")
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("precondition", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_one_step_on_a_tiny_playground_model_is_diffusers_training_step(system, prediction_type, precondition):
    schedule = dataclasses.replace(system.edm, prediction_type=prediction_type)
    scheduler_config = {**system.scheduler_config, "prediction_type": prediction_type}
    params = [system.unet.conv_out.weight, system.unet.conv_in.weight]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latents = system.encode_images(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)  # (the latents' mean/std applied)
        cond = system.condition(system.tokenize(["a red cube", "a blue ball"]))
    noise, indices = torch.randn(latents.shape, generator=g), torch.tensor([3, 870])
    for p in system.unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in params]
    try:
        want_loss, want = _diffusers_step(system, params, latents, noise, indices, cond, scheduler_config,
                                          getattr(diffusers, precondition))
        config = StepConfig(edm=schedule, max_grad_norm=None)
        batch = {"latents": latents, "cond": cond, "noise": noise, "timesteps": indices}
        prepared = prepare_batch(batch, state=TrainState(), config=config, alphas_cumprod=system.alphas_cumprod)
        loss = step_loss(system.denoiser(), prepared, config)
        grads = torch.autograd.grad(loss, params)
        assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0), (float(loss), float(want_loss))
        for ours, theirs in zip(grads, want):
            assert theirs.abs().max() > 1e-4 and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), \
                (ours - theirs).abs().max()
        # the whole train_step with an SGD step: p − lr·g of D's gradients
        optimizer = torch.optim.SGD(params, lr=0.5)
        metrics = train_step(system.denoiser(), batch, params=params, optimizer=optimizer, state=TrainState(),
                             config=config, alphas_cumprod=system.alphas_cumprod)
        assert torch.allclose(metrics["loss"], want_loss, rtol=1e-6, atol=0)
        for p, b, theirs in zip(params, before, want):
            assert torch.allclose(p.detach(), b - 0.5 * theirs, atol=1e-6, rtol=1e-6)
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
                p.requires_grad_(False)


def test_class_images_of_an_edm_model_come_from_its_own_scheduler(system):
    """DreamBooth's class images (D: made by the model's pipeline, i.e. its EDMDPMSolverMultistepScheduler)."""
    from sdadapt.methods.finetune import class_images

    images, prompts = class_images(system, ["a cube"], seed=5, steps=2, size=(16, 16))
    assert prompts == ["a cube"]
    assert torch.equal(images, system.sample(["a cube"], seed=5, steps=2, height=16, width=16, sampler="dpmsolver++"))


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("option", [dict(min_snr_gamma=5.0), dict(debiased_estimation=True), dict(p2_gamma=1.0),
                                    dict(v_pred_like_loss=0.1), dict(loss="huber", huber_schedule="snr"),
                                    dict(input_perturbation=0.1)])  # (timestep_range maps: test_edm_options.py)
def test_options_with_no_edm_form_are_refused_by_name(option):
    name = next(iter(option)) if "huber_schedule" not in option else "huber_schedule"
    with pytest.raises(ValueError, match=f"EDM-formulation.*{name}"):
        StepConfig(edm=EDMSchedule(), **option)
    StepConfig(edm=EDMSchedule(), noise_offset=0.05, adaptive_noise_scale=0.01, pyramid_noise_iterations=3,
               loss="huber", huber_c=0.2)  # (the noise options change ε; the constant Huber c needs no timestep)


# ------------------------------------------------------------------------ (3) train end to end, then generate
def test_train_lora_end_to_end_and_generate_with_it(files, tmp_path):
    """`sdadapt train lora` on the Playground file trains (the loss finite, the LoRA moved) and `generate` loads the
    LoRA into the EDM model and samples with it (the image differs from the model's own); refusals by name."""
    from caption_images import two_captioned_images
    from PIL import Image
    from safetensors import safe_open

    from sdadapt.cli import main

    images = two_captioned_images(tmp_path / "images")
    out = tmp_path / "pg-lora.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cube --w 16 --h 16 --s 2\n")
    assert main(["train", "lora", "--images", str(images), "--model", str(files[0]), "--steps", "2", "--resolution", "64",
                 "--unet-lr", "0.05", "--network-dim", "4", "--lr-scheduler", "constant", "--sample-prompts", str(prompts),
                 "--sample-every-n-steps", "2", "--sample-sampler", "dpmsolver++", "--save-state", "-q",
                 "-o", str(out)]) == 0
    assert len(list((tmp_path / "pg-lora-samples").glob("*.png"))) == 1, list(tmp_path.iterdir())
    step = json.loads((tmp_path / "pg-lora-state" / "state.json").read_text())["config"]  # (the steps' StepConfig)
    assert step["edm"] == dataclasses.asdict(EDMSchedule.from_config(CONFIG)) and step["min_snr_gamma"] is None
    with safe_open(str(out), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
        assert ups and max(float(u.abs().max()) for u in ups) > 0  # (lora_up starts at 0)
        assert f.metadata()["ss_min_snr_gamma"] == "None"  # (the default min-SNR turned off for EDM, as recorded)
    common = ["generate", "--model", str(files[0]), "--prompt", "a cube", "--seed", "2", "--steps", "3", "--width", "64",
              "--height", "64", "--sampler", "dpmsolver++", "-q"]
    assert main([*common, "--lora", f"{out}:1.0", "-o", str(tmp_path / "with.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "without.png")]) == 0
    with_lora = torch.tensor(list(Image.open(tmp_path / "with.png").convert("RGB").getdata()), dtype=torch.float32)
    without = torch.tensor(list(Image.open(tmp_path / "without.png").convert("RGB").getdata()), dtype=torch.float32)
    assert (with_lora - without).abs().max() > 0

    from sdadapt.jobs.train import run_train

    with pytest.raises(ValueError, match="EDM-formulation.*--min-snr-gamma"):
        run_train("lora", images=str(images), model=str(files[0]), out=str(tmp_path / "x.safetensors"), steps=1,
                  min_snr_gamma=3.0)


def test_full_fine_tune_saves_an_edm_model_that_loads_and_samples(files, tmp_path):
    """A native fine-tune of the Playground file writes an LDM file that is again an EDM model (edm_mean / edm_std
    kept), with changed UNet weights, and samples."""
    from caption_images import two_captioned_images
    from safetensors.torch import load_file

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.jobs.train import TrainOptions, _edm_options, run_train

    images = two_captioned_images(tmp_path / "images")
    out = tmp_path / "pg-ft.safetensors"
    run_train("full", images=str(images), model=str(files[0]), out=str(out), steps=1, resolution=(64, 64),
              learning_rate=1e-3, lr_scheduler="constant")
    saved, source = load_file(out), load_file(files[0])
    assert torch.equal(saved["edm_mean"], source["edm_mean"]) and torch.equal(saved["edm_std"], source["edm_std"])
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(saved[key].float(), source[key].float())
    tuned = DiffusersSystem.from_single_file(out)
    assert tuned.edm == EDMSchedule.from_config(CONFIG)
    image = tuned.sample(["a cube"], seed=0, steps=2, height=16, width=16, sampler="dpmsolver++")
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="not trained with dreamartist"):
        _edm_options("dreamartist", TrainOptions(model=str(files[0]), images=str(images)), [])
    with pytest.raises(ValueError, match="--zero-terminal-snr"):
        _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images), zero_terminal_snr=True), [])
    with pytest.raises(ValueError, match="sample images would use ddim"):
        _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images)), [], sample_samplers=["ddim", "euler"])
    notes: list[str] = []
    kept = _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images)), notes, sample_samplers=["euler"])
    assert kept.min_snr_gamma == 0.0 and "min-SNR weighting" in notes[0]
