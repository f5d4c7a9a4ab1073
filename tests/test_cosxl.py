"""CosXL (SDXL layout, EDM v-prediction: ComfyUI's ``ModelType.V_PREDICTION_EDM``): read, generated, written.

- C ComfyUI (mirror, comfy/): supported_models.py ``SDXL.model_type`` (``edm_vpred.sigma_max`` -> V_PREDICTION_EDM, σ_max
  and σ_min from the file's keys), model_base.py ``model_sampling`` (V_PREDICTION on ModelSamplingContinuousEDM),
  model_sampling.py (``V_PREDICTION.calculate_denoised``, ``EPS.calculate_input`` / ``noise_scaling``,
  ``ModelSamplingContinuousEDM``: σ_data 1, ``timestep = ¼·ln σ``), k_diffusion/sampling.py ``get_sigmas_karras`` and
  ``sample_euler``, comfy_extras/nodes_model_merging.py ``save_checkpoint`` (the 0-dim float32 markers, no v_pred) —
  transcribed below.
- D huggingface/diffusers (installed): ``EDMEulerScheduler`` with ``prediction_type="v_prediction"``, σ_data 1 and
  the file's σ range, in ``StableDiffusionXLPipeline`` (imported and run).
Tiny random models: tests/test_convert_checkpoint's SDXL parts with the markers added as a CosXL file carries them.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file

from sdadapt.formats.edm import edm_v_scheduler
from sdadapt.formats.files import WeightFileError, write_safetensors
from sdadapt.formats.prediction_markers import edm_v_range
from sdadapt.samplers.edm import EDMSchedule, edm_euler_sample, edm_precondition

RANGE = (0.002, 120.0)  # (CosXL's: its edm_vpred.sigma_min / sigma_max)
READ = tuple(float(torch.tensor(v)) for v in RANGE)  # (the float32 values the file holds, as C reads them: .item())


def _with(source, path, extra):
    state = load_file(source)
    state.update(extra)
    write_safetensors(path, state, {})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a tiny CosXL-like single file, the same weights as a plain SDXL file)."""
    from test_convert_checkpoint import _sdxl_parts
    from tiny_checkpoints import write_single_file

    root = tmp_path_factory.mktemp("cosxl")
    plain = write_single_file(_sdxl_parts(), root / "plain.safetensors", architecture="sdxl")
    markers = {"edm_vpred.sigma_max": torch.tensor(RANGE[1]), "edm_vpred.sigma_min": torch.tensor(RANGE[0])}
    return _with(plain, root / "cosxl.safetensors", markers), plain


@pytest.fixture(scope="module")
def system(files):
    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_single_file(files[0])


# ----------------------------------------------------------------------------- ComfyUI, transcribed (C)
def _comfy_denoised(x, out, sigma, sigma_data=1.0):
    """C ``V_PREDICTION.calculate_denoised`` over ``EPS.calculate_input``'s c_in (the model sees c_in·x)."""
    return x * sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2) - out * sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5


def _comfy_karras(n, sigma_min, sigma_max, rho=7.0):
    """C ``get_sigmas_karras`` (float32 ramp), zero appended."""
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, torch.zeros(1)])


def _stand_in(x, t):
    return torch.tanh(0.7 * x + 0.3 * t.view(-1, 1, 1, 1)) + 0.1 * x


def test_preconditioning_and_euler_on_karras_are_comfyuis():
    """c_skip·x + c_out·F at σ_data 1, v: C's V_PREDICTION.calculate_denoised; c_noise C's ¼·ln σ; the Euler run on
    the Karras grid from noise·√(1+σ_max²) (C's noise_scaling at max denoise): C's sample_euler, to float32 rounding."""
    sigma = torch.tensor([0.002, 0.03, 0.5, 1.0, 7.0, 120.0], dtype=torch.float64)
    x, out = torch.randn(6, 4, 2, 2, dtype=torch.float64), torch.randn(6, 4, 2, 2, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma.view(-1, 1, 1, 1), sigma_data=1.0,
                                                    prediction_type="v_prediction")
    assert torch.allclose(c_skip * x + c_out * out, _comfy_denoised(x, out, sigma.view(-1, 1, 1, 1)), rtol=1e-12)
    assert torch.allclose(c_in.flatten(), 1 / (sigma ** 2 + 1) ** 0.5) and torch.allclose(c_noise.flatten(), 0.25 * sigma.log())
    schedule = EDMSchedule.from_config(edm_v_scheduler(*RANGE))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    steps = 8
    ours = edm_euler_sample(_stand_in, noise, schedule=schedule, num_steps=steps)  # (it scales the noise itself)
    sigmas = _comfy_karras(steps, *RANGE)
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
    for i in range(steps):  # (C sample_euler, s_churn 0: d = (x − D)/σ, x += d·(σ_next − σ))
        s = sigmas[i]
        c_in = 1 / (s ** 2 + 1) ** 0.5
        denoised = _comfy_denoised(x, _stand_in(x * c_in, (0.25 * s.log()).expand(1)), s)
        x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    assert torch.allclose(ours, x, atol=2e-4, rtol=1e-4), (ours - x).abs().max()


# ----------------------------------------------------------------------------- reading
def test_the_single_file_is_told_by_its_edm_vpred_keys_as_comfyui_tells_it(files, system, tmp_path):
    from sdadapt.formats.single_file import read_single_file

    assert read_single_file(files[0]).edm_v == pytest.approx(RANGE) and read_single_file(files[1]).edm_v is None
    assert system.edm == EDMSchedule.from_config(edm_v_scheduler(*READ))
    assert (system.edm.sigma_data, system.edm.prediction_type, system.edm.sigma_max) == (1.0, "v_prediction", 120.0)
    assert system.latent_stats is None and system.vae.config.scaling_factor == pytest.approx(0.13025)
    only_max = {"edm_vpred.sigma_max": torch.tensor(80.5)}  # (C: σ_min 0.002 where the file gives none)
    assert edm_v_range(only_max, source="f") == (0.002, 80.5)
    assert edm_v_range({"edm_vpred.sigma_min": torch.tensor(0.01)}, source="f") is None  # (C reads σ_max's key)
    for bad, words in (({"edm_vpred.sigma_max": torch.tensor([1.0, 2.0])}, "one finite number"),
                       ({"edm_vpred.sigma_max": torch.tensor(0.001)}, "0 < σ_min < σ_max"),
                       ({"edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
                        "a Playground model saved by ComfyUI")):
        with pytest.raises(WeightFileError, match=words):
            edm_v_range(bad, source="f.safetensors")


def test_generate_is_diffusers_sdxl_pipeline_with_an_edm_v_euler_scheduler(system):
    """sdadapt's sample = D's StableDiffusionXLPipeline with EDMEulerScheduler(v, σ_data 1, the file's σ range):
    latents and images, guidance and a negative; the plain-SDXL reading is far off."""
    options = dict(steps=6, guidance=4.0, height=16, width=16)
    ours = system.sample(["a red cube"], negative="blurry", seed=3, sampler="euler", output="latents", **options)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet,
        scheduler=diffusers.EDMEulerScheduler.from_config(system.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    call = dict(negative_prompt="blurry", num_inference_steps=6, guidance_scale=4.0, height=16, width=16)
    theirs = pipe("a red cube", generator=torch.Generator().manual_seed(3), output_type="latent", **call).images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    images = system.sample(["a red cube"], negative="blurry", seed=3, sampler="euler", **options)
    decoded = pipe("a red cube", generator=torch.Generator().manual_seed(3), output_type="pt", **call).images
    assert torch.allclose(images / 2 + 0.5, decoded, atol=1e-5)
    edm = system.edm
    try:
        system.edm = None
        plain = system.sample(["a red cube"], negative="blurry", seed=3, sampler="euler", output="latents", **options)
    finally:
        system.edm = edm
    assert (plain - theirs).abs().max() > 0.5


# ----------------------------------------------------------------------------- writing
def test_save_writes_comfyuis_markers_and_reads_back(files, system, tmp_path):
    """The LDM file has C's save_checkpoint keys (0-dim float32 σ_max / σ_min, no v_pred, no edm_mean) and the same
    weights; C's model_type rule reads it as V_PREDICTION_EDM at the range; sdadapt reads the same model back."""
    from sdadapt.diffusers_system import DiffusersSystem

    out = system.save_model(tmp_path / "again.safetensors")
    state = load_file(out)
    for key, value in (("edm_vpred.sigma_max", RANGE[1]), ("edm_vpred.sigma_min", RANGE[0])):
        assert state[key].shape == () and state[key].dtype == torch.float32 and float(state[key]) == pytest.approx(value)
    assert not {"v_pred", "edm_mean", "edm_std"} & set(state)
    original = load_file(files[0])
    assert all(torch.equal(original[k], v) for k, v in state.items() if k in original)

    def comfy_model_type(sd):  # (C supported_models.SDXL.model_type, transcribed)
        if "edm_mean" in sd and "edm_std" in sd:
            return "EDM", {}
        if "edm_vpred.sigma_max" in sd:
            settings = {"sigma_max": float(sd["edm_vpred.sigma_max"].item())}
            if "edm_vpred.sigma_min" in sd:
                settings["sigma_min"] = float(sd["edm_vpred.sigma_min"].item())
            return "V_PREDICTION_EDM", settings
        return ("V_PREDICTION" if "v_pred" in sd else "EPS"), {}

    kind, settings = comfy_model_type(state)
    assert kind == "V_PREDICTION_EDM" and settings == pytest.approx({"sigma_max": RANGE[1], "sigma_min": RANGE[0]})
    assert DiffusersSystem.from_single_file(out).edm == system.edm


def test_a_marker_in_another_model_is_refused_naming_it(files, tmp_path):
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.formats.single_file import read_single_file

    sd1 = tiny_sd1_file(tmp_path / "sd1.safetensors")
    marked = _with(sd1, tmp_path / "sd1_marked.safetensors", {"edm_vpred.sigma_max": torch.tensor(120.0)})
    with pytest.raises(WeightFileError, match="sd1_marked.safetensors: edm_vpred.sigma_max .* in an sd1 checkpoint"):
        read_single_file(marked)
    both = _with(files[0], tmp_path / "both.safetensors", {"edm_mean": torch.zeros(1, 4, 1, 1),
                                                           "edm_std": torch.ones(1, 4, 1, 1)})
    with pytest.raises(WeightFileError, match="beside edm_mean / edm_std"):
        read_single_file(both)


def test_merges_keep_the_sigma_range_of_the_first_input_and_say_a_mix(files, tmp_path, capsys):
    """The σ range is the first input's (copied, never averaged: two CosXL ranges stay the first's); a plain model
    first drops it with a note naming --copy-extra-keys, which keeps it — ComfyUI's "CosXL-ify a finetune" recipe,
    add-difference FINETUNE COSXL BASE."""
    from sdadapt.cli import main

    cosxl, plain = files
    other = _with(cosxl, tmp_path / "other.safetensors", {"edm_vpred.sigma_max": torch.tensor(80.5)})

    def merged(name, *argv):
        assert main(["merge", *argv, "-q", "-o", str(tmp_path / name)]) == 0
        state = load_file(tmp_path / name)
        return {k: float(v) for k, v in state.items() if k.startswith("edm_vpred.")}, capsys.readouterr()

    keys, _ = merged("a.safetensors", "weighted-sum", str(cosxl), str(other), "--alpha", "0.5")
    assert keys == pytest.approx({"edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002})
    keys, _ = merged("b.safetensors", "weighted-sum", str(cosxl), str(plain), "--alpha", "0.5")
    assert keys == pytest.approx({"edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002})
    keys, said = merged("c.safetensors", "add-difference", str(plain), str(cosxl), str(plain), "--alpha", "1")
    assert keys == {} and "--copy-extra-keys" in said.out + said.err
    keys, _ = merged("d.safetensors", "add-difference", str(plain), str(cosxl), str(plain), "--alpha", "1",
                     "--copy-extra-keys")
    assert keys == pytest.approx({"edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002})
