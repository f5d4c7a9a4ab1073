"""Playground v2.5 (SDXL layout, EDM formulation): read, converted, generated, merged — against the real diffusers.

- D huggingface/diffusers 0.42.1 (the installed package, imported and run): schedulers/scheduling_edm_euler.py and
  scheduling_edm_dpmsolver_multistep.py (``precondition_*``, ``set_timesteps``, ``step``),
  pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (``init_noise_sigma``, the decode's
  ``latents * latents_std / scaling_factor + latents_mean``), loaders/single_file_utils.py (``edm_mean`` ->
  ``playground-v2-5``; ``from_single_file(config=FOLDER)``).
- C ComfyUI comfy/supported_models.py ``SDXL.model_type`` (``edm_mean`` -> EDM), comfy/latent_formats.py
  ``SDXL_Playground_2_5`` (the published latent mean / std below, scale factor 0.5).
Tiny random models: tests/test_convert_checkpoint's SDXL parts (encoders 64 and 128 wide, as diffusers' single-file
loader needs them to differ) with Playground's latent statistics added as a file would carry them.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file

from sdadapt.formats.edm import PLAYGROUND_SCHEDULER
from sdadapt.formats.files import WeightFileError, write_safetensors
from sdadapt.samplers.edm import EDMSchedule, edm_dpmsolver_sample, edm_euler_sample, edm_precondition, edm_sigmas

MEAN = [-1.6574, 1.886, -1.383, 2.5155]  # C: latent_formats.SDXL_Playground_2_5
STD = [8.4927, 5.9022, 6.5498, 5.2299]
CONFIG = {k: v for k, v in PLAYGROUND_SCHEDULER.items() if not k.startswith("_")}


def _with_edm(source, path, *, keys=("edm_mean", "edm_std"), std=STD):
    state = load_file(source)
    stats = {"edm_mean": torch.tensor(MEAN).view(1, 4, 1, 1), "edm_std": torch.tensor(std).view(1, 4, 1, 1)}
    state.update({k: stats[k] for k in keys})
    write_safetensors(path, state, {})
    return path


def playground_files(root):
    """(a tiny Playground-like single file ``root/pg.safetensors``, the same weights as a plain SDXL file
    ``root/plain.safetensors``): the builder the EDM tests share (import it from here)."""
    from test_convert_checkpoint import _sdxl_parts
    from tiny_checkpoints import write_single_file

    plain = write_single_file(_sdxl_parts(), root / "plain.safetensors", architecture="sdxl")
    return _with_edm(plain, root / "pg.safetensors"), plain


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(Playground-like file, the same weights as a plain SDXL file)."""
    return playground_files(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def system(files):
    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_single_file(files[0])


def _stand_in(x, t):
    """A smooth stand-in for the UNet output F(c_in·x, c_noise) (B, C, H, W), t (B,)."""
    return torch.tanh(0.7 * x + 0.3 * t.view(-1, 1, 1, 1)) + 0.1 * x


def _diffusers_loop(scheduler, x, steps, generator=None):
    """The SDXL pipeline's loop over D's scheduler with the stand-in model (no guidance)."""
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = _stand_in(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return x


def test_preconditioning_is_diffusers_and_comfyuis():
    """c_in, c_noise and D = c_skip·x + c_out·F equal D's precondition_* (ε and v) and C's EDM.calculate_denoised (ε,
    transcribed: x·σd²/(σ²+σd²) + F·σ·σd/√(σ²+σd²))."""
    sigma = torch.tensor([0.002, 0.03, 0.5, 1.0, 7.0, 80.0])
    x, out = torch.randn(6, 4, 2, 2, dtype=torch.float64), torch.randn(6, 4, 2, 2, dtype=torch.float64)
    for prediction in ("epsilon", "v_prediction"):
        scheduler = diffusers.EDMEulerScheduler(prediction_type=prediction)
        for i, s in enumerate(sigma):
            c_skip, c_out, c_in, c_noise = edm_precondition(s, sigma_data=0.5, prediction_type=prediction)
            assert torch.equal(x[i] * c_in, scheduler.precondition_inputs(x[i], s))
            assert torch.equal(c_noise.reshape(1), scheduler.precondition_noise(s).reshape(1))
            assert torch.equal(c_skip * x[i] + c_out * out[i], scheduler.precondition_outputs(x[i], out[i], s))
            if prediction == "epsilon":
                s64 = s.double()
                comfy = x[i] * 0.25 / (s64 ** 2 + 0.25) + out[i] * s64 * 0.5 / (s64 ** 2 + 0.25) ** 0.5
                assert torch.allclose(c_skip.double() * x[i] + c_out.double() * out[i], comfy, rtol=1e-6)


@pytest.mark.parametrize("change", [{}, {"sigma_schedule": "exponential"}, {"final_sigmas_type": "sigma_min"}])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_sigma_grids_are_diffusers_bit_for_bit(change, steps):
    config = {**CONFIG, **change}
    schedule = EDMSchedule.from_config(config)
    for sampler, cls in (("euler", diffusers.EDMEulerScheduler), ("dpmsolver++", diffusers.EDMDPMSolverMultistepScheduler)):
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(steps)
        assert torch.equal(edm_sigmas(schedule, steps, sampler=sampler), scheduler.sigmas), (sampler, change)


DPM_CASES = [({}, 6), ({}, 16), ({"solver_order": 3}, 16), ({"solver_type": "heun"}, 6), ({"solver_order": 1}, 4),
             ({"final_sigmas_type": "sigma_min"}, 16), ({"euler_at_final": True}, 16), ({"lower_order_final": False}, 5),
             ({"prediction_type": "v_prediction"}, 6), ({"algorithm_type": "sde-dpmsolver++"}, 6),
             ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 16)]


@pytest.mark.parametrize("change, steps", DPM_CASES)
def test_dpmsolver_is_diffusers_edm_dpmsolver_step_for_step(change, steps):
    config = {**CONFIG, **change}
    torch.manual_seed(1)
    x = torch.randn(2, 4, 4, 4)
    theirs = _diffusers_loop(diffusers.EDMDPMSolverMultistepScheduler(**config), x, steps, torch.Generator().manual_seed(9))
    ours = edm_dpmsolver_sample(_stand_in, x, schedule=EDMSchedule.from_config(config), num_steps=steps,
                                algorithm_type=config["algorithm_type"], generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.parametrize("change, steps", [({}, 7), ({"final_sigmas_type": "sigma_min"}, 3),
                                           ({"prediction_type": "v_prediction", "sigma_schedule": "exponential"}, 5)])
def test_euler_is_diffusers_edm_euler_step_for_step(change, steps):
    config = {**CONFIG, **change}
    torch.manual_seed(2)
    x = torch.randn(1, 4, 4, 4)
    theirs = _diffusers_loop(diffusers.EDMEulerScheduler.from_config(config), x, steps)
    ours = edm_euler_sample(_stand_in, x, schedule=EDMSchedule.from_config(config), num_steps=steps)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def _pipeline(system, sampler):
    cls = diffusers.EDMEulerScheduler if sampler == "euler" else diffusers.EDMDPMSolverMultistepScheduler
    extra = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmsolver++_sde" else {}
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet,
        scheduler=cls.from_config({**system.scheduler_config, **extra}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["dpmsolver++", "euler", "dpmsolver++_sde"])
def test_generate_is_diffusers_sdxl_pipeline_with_its_edm_scheduler(system, sampler):
    """sdadapt's sample = D's StableDiffusionXLPipeline with the EDM scheduler (latents and decoded images: the
    latent mean/std applied before the VAE), guidance and a negative prompt; the plain-SDXL reading is far off."""
    options = dict(steps=6, guidance=4.0, height=16, width=16)
    ours = system.sample(["a red cube"], negative="blurry", seed=3, sampler=sampler, output="latents", **options)
    pipe = _pipeline(system, sampler)
    theirs = pipe("a red cube", negative_prompt="blurry", num_inference_steps=6, guidance_scale=4.0, height=16, width=16,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    images = system.sample(["a red cube"], negative="blurry", seed=3, sampler=sampler, **options)
    decoded = pipe("a red cube", negative_prompt="blurry", num_inference_steps=6, guidance_scale=4.0, height=16,
                   width=16, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.allclose(images / 2 + 0.5, decoded, atol=1e-5), (images / 2 + 0.5 - decoded).abs().max()
    if sampler == "euler":  # what sdadapt did before: the EDM model read as plain SDXL (discrete DDPM ε, no stats)
        edm, stats = system.edm, system.latent_stats
        try:
            system.edm, system.latent_stats = None, None
            plain = system.sample(["a red cube"], negative="blurry", seed=3, sampler=sampler, output="latents", **options)
            plain_images = system.decode_latents(theirs)
        finally:
            system.edm, system.latent_stats = edm, stats
        assert (plain - theirs).abs().max() > 0.5 and (plain_images / 2 + 0.5 - decoded).abs().max() > 0.05


def test_guidance_rescale_is_diffusers_sdxl_pipelines_on_the_unet_outputs(system):
    """``guidance_rescale`` on an EDM model: diffusers' SDXL pipeline rescales the guided UNet output before its EDM
    scheduler preconditions it; sdadapt's EDM path does the same."""
    options = dict(steps=5, guidance=5.0, height=16, width=16)
    ours = system.sample(["a red cube"], negative="blurry", seed=4, sampler="dpmsolver++", output="latents",
                         guidance_rescale=0.7, **options)
    plain = system.sample(["a red cube"], negative="blurry", seed=4, sampler="dpmsolver++", output="latents", **options)
    theirs = _pipeline(system, "dpmsolver++")(
        "a red cube", negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0, guidance_rescale=0.7,
        height=16, width=16, generator=torch.Generator().manual_seed(4), output_type="latent").images
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5 and (ours - plain).abs().max().item() > 1e3 * max(gap, 1e-7), gap


def test_perturbed_attention_is_diffusers_sdxl_pag_pipeline_with_its_edm_scheduler(system):
    """PAG on an EDM model: StableDiffusionXLPAGPipeline with the EDM scheduler adds its term to the guided UNet
    output before the scheduler preconditions it; sdadapt's EDM path does the same."""
    from sdadapt.perturbed_attention import PerturbedAttentionGuidance

    options = {"steps": 5, "guidance": 5.0, "height": 16, "width": 16}
    with PerturbedAttentionGuidance(system.unet, scale=2.0) as pag:
        ours = system.sample(["a red cube"], negative="blurry", seed=4, sampler="dpmsolver++", output="latents",
                             perturbed_attention=pag, **options)
    plain = system.sample(["a red cube"], negative="blurry", seed=4, sampler="dpmsolver++", output="latents", **options)
    scheduler = diffusers.EDMDPMSolverMultistepScheduler.from_config(system.scheduler_config)
    pipe = diffusers.StableDiffusionXLPAGPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet, scheduler=scheduler,
        pag_applied_layers="mid")
    pipe.set_progress_bar_config(disable=True)
    saved = dict(system.unet.attn_processors)
    try:
        theirs = pipe("a red cube", negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0,
                      pag_scale=2.0, height=16, width=16, generator=torch.Generator().manual_seed(4),
                      output_type="latent").images
    finally:
        system.unet.set_attn_processor(saved)
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5 and (ours - plain).abs().max().item() > 1e3 * max(gap, 1e-7), gap


def test_encode_is_diffusers_img2img_rule_and_decode_inverts_it(system):
    """encode: (μ − mean)·scaling/std (D pipeline_stable_diffusion_xl_img2img.py prepare_latents)."""
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    posterior = system.vae.encode(image).latent_dist.mean
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    assert torch.allclose(system.encode_images(image), (posterior - mean) * 0.5 / std, atol=1e-6)
    latents = torch.randn(1, 4, 8, 8)
    expected = system.vae.decode(latents * std / 0.5 + mean).sample.clamp(-1, 1)
    assert torch.allclose(system.decode_latents(latents), expected, atol=1e-6)


def test_the_single_file_is_told_by_its_edm_keys(files, system):
    from sdadapt.formats.detect import describe_file
    from sdadapt.formats.single_file import read_single_file

    pg, plain = files
    checkpoint = read_single_file(pg)
    assert checkpoint.edm_stats == ([float(v) for v in torch.tensor(MEAN)], [float(v) for v in torch.tensor(STD)])
    assert read_single_file(plain).edm_stats is None
    assert system.edm == EDMSchedule.from_config(CONFIG) and system.scheduler_config == PLAYGROUND_SCHEDULER
    assert system.vae.config.scaling_factor == 0.5 and system.latent_stats == checkpoint.edm_stats
    assert "Playground v2.5" in describe_file(pg)["model"] and "Playground" not in describe_file(plain)["model"]


def _convert(*argv):
    from sdadapt.cli import main

    return main(["convert", *map(str, argv), "-q"])


def test_convert_both_ways_keeps_the_edm_keys_and_diffusers_reads_both(files, system, tmp_path):
    """file -> folder -> file: every tensor bit-identical, edm_mean / edm_std too; the folder is D's Playground layout
    (EDMDPMSolverMultistepScheduler, vae latents_mean / latents_std, scaling 0.5) and D reads the file back with
    ``from_single_file(config=folder)``; sdadapt reads the folder as EDM and samples it as the file."""
    from sdadapt.diffusers_system import DiffusersSystem

    pg, _ = files
    assert _convert(pg, "--to", "diffusers", "-o", tmp_path / "folder") == 0
    assert _convert(tmp_path / "folder", "--to", "ldm", "-o", tmp_path / "back.safetensors") == 0
    before, after = load_file(pg), load_file(tmp_path / "back.safetensors")
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert after["edm_mean"].dtype == torch.float32 and after["edm_mean"].shape == (1, 4, 1, 1)
    scheduler = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in scheduler.items() if not k.startswith("_")} == CONFIG
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert list(pipe.vae.config.latents_mean) == system.latent_stats[0] and pipe.vae.config.scaling_factor == 0.5
    single = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "back.safetensors"), config=str(tmp_path / "folder"), local_files_only=True,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
    assert type(single.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert list(single.vae.config.latents_std) == system.latent_stats[1]
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())
    folder = DiffusersSystem.from_folder(tmp_path / "folder")
    assert folder.edm == system.edm and folder.latent_stats == system.latent_stats
    options = dict(steps=3, guidance=2.0, height=16, width=16, sampler="dpmsolver++", output="latents")
    assert torch.allclose(folder.sample(["a"], **options), system.sample(["a"], **options), atol=1e-5)


def test_a_file_sdadapt_writes_keeps_an_edm_models_own_scheduler(files, tmp_path):
    """An EDM folder whose scheduler is not Playground's (Euler, σ_max 120, exponential grid) written as one file and
    read back: the file's ``sdadapt.configs`` holds its scheduler config, which wins over Playground's (the σ range
    and grid change every sample; other tools assume Playground's). A file without it is read as Playground's."""
    from sdadapt.diffusers_system import DiffusersSystem

    pg, _ = files
    assert _convert(pg, "--to", "diffusers", "-o", tmp_path / "folder") == 0
    path = tmp_path / "folder" / "scheduler" / "scheduler_config.json"
    own = {**json.loads(path.read_text()), "_class_name": "EDMEulerScheduler", "sigma_max": 120.0,
           "sigma_schedule": "exponential"}
    path.write_text(json.dumps(own))
    folder = DiffusersSystem.from_folder(tmp_path / "folder")
    assert _convert(tmp_path / "folder", "--to", "ldm", "-o", tmp_path / "own.safetensors") == 0
    back = DiffusersSystem.from_single_file(tmp_path / "own.safetensors")
    assert back.scheduler_config == folder.scheduler_config and back.edm == folder.edm and back.edm.sigma_max == 120.0
    options = dict(steps=3, guidance=2.0, height=16, width=16, output="latents")
    want = folder.sample(["a"], **options)
    assert torch.allclose(back.sample(["a"], **options), want, atol=1e-5)
    playground = DiffusersSystem.from_single_file(pg)  # (the same weights, no configs: Playground's scheduler)
    assert playground.scheduler_config["sigma_max"] == 80.0
    assert (playground.sample(["a"], **options) - want).abs().max() > 1e-2  # (the scheduler read matters)


def test_bad_edm_inputs_are_refused_by_name(files, system, tmp_path):
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.formats.single_file import read_single_file
    from tiny_checkpoints import tiny_sd1_file

    _, plain = files
    with pytest.raises(WeightFileError, match="edm_std missing"):
        read_single_file(_with_edm(plain, tmp_path / "half.safetensors", keys=("edm_mean",)))
    with pytest.raises(WeightFileError, match="edm_std positive"):
        read_single_file(_with_edm(plain, tmp_path / "zero.safetensors", std=[1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(WeightFileError, match="in an sd1 checkpoint"):
        read_single_file(_with_edm(tiny_sd1_file(tmp_path / "sd1.safetensors"), tmp_path / "sd1edm.safetensors"))
    with pytest.raises(ValueError, match="thresholding=True"):
        EDMSchedule.from_config({**CONFIG, "thresholding": True})
    with pytest.raises(ValueError, match="sampler 'ddim' has no EDM form.*--sampler dpmsolver\\+\\+"):
        system.sample(["a"], steps=2, height=16, width=16, sampler="ddim")
    with pytest.raises(ValueError, match="leave out a schedule"):  # (karras, its own grid, runs: test_edm_library)
        system.sample(["a"], steps=2, height=16, width=16, sampler="euler", schedule="exponential")
    bare = DiffusersSystem(system.unet, diffusers.AutoencoderKL.from_config(
        {**system.vae.config, "latents_mean": None, "latents_std": None}), system.text_encoder, system.tokenizer,
        system.scheduler_config, text_encoder_2=system.text_encoder_2, tokenizer_2=system.tokenizer_2)
    with pytest.raises(ValueError, match="no latents_mean / latents_std"):
        bare.save_model(tmp_path / "bare.safetensors")


def test_merge_refuses_edm_with_plain_sdxl_and_keeps_the_stats_between_edm_models(files, tmp_path):
    """EDM + plain SDXL: refused in either order before a byte is written (same shapes: nothing else stops it). Two EDM
    models: the weights merge, edm_mean / edm_std are the first model's (the engine copies keys outside the model parts)."""
    from sdadapt.errors import MergeError
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep

    pg, plain = files
    for pair in ((pg, plain), (plain, pg)):
        with pytest.raises(MergeError, match=r"pg\.safetensors is an EDM model .*plain\.safetensors a plain SDXL"):
            merge_file(MergeStep("weighted-sum", tuple(map(str, pair)), alpha=0.5), tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()
    other = load_file(pg)
    other = {k: (v + 0.01 if k.startswith("model.diffusion_model.") or k == "edm_mean" else v) for k, v in other.items()}
    write_safetensors(tmp_path / "pg2.safetensors", other, {})
    merge_file(MergeStep("weighted-sum", (str(pg), str(tmp_path / "pg2.safetensors")), alpha=0.3), tmp_path / "m.safetensors")
    merged, source = load_file(tmp_path / "m.safetensors"), load_file(pg)
    assert torch.equal(merged["edm_mean"], source["edm_mean"]) and torch.equal(merged["edm_std"], source["edm_std"])
    key = next(k for k in source if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    assert not torch.equal(merged[key], source[key])


def test_invert_loads_an_edm_model(files):
    """`invert` inverts an EDM model through its Euler ODE (tests/test_edm_inversion.py); training it:
    tests/test_edm_training.py."""
    from sdadapt.inversion.job import load_model

    assert load_model(str(files[0])).edm == EDMSchedule.from_config(CONFIG)
    assert load_model(str(files[1])).edm is None  # (the plain SDXL file inverts by DDIM as before)
