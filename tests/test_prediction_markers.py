"""A single file's ``v_pred`` / ``ztsnr`` marker tensors (ComfyUI's ``save_checkpoint`` and ``SDXL.model_type``, A1111's
``load_model_weights``: NoobAI-XL V-Pred and its merges carry them) read and written, and the zero-terminal-SNR
schedule as A1111 rescales it (``rescale_zero_terminal_snr_abar``, modules/sd_models.py v1.10, transcribed below), for a
marked model and for ``generate --noise-schedule "Zero Terminal SNR"`` (A1111's "Noise schedule for sampling")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sampler_stand_ins import sd_alphas_cumprod

from sdadapt.formats.files import WeightFileError, read_weights, write_safetensors
from sdadapt.formats.prediction_markers import marker_tensors, read_markers
from sdadapt.samplers.sigma_space import model_sigmas
from sdadapt.training.diffusion import (
    a1111_zero_terminal_snr_alphas_cumprod,
    scheduler_alphas_cumprod,
    zero_terminal_snr_alphas_cumprod,
)


def _ldm_alphas_cumprod() -> torch.Tensor:
    """LDM's ``alphas_cumprod`` buffer: the float64 numpy schedule as a float32 tensor (``to_torch``)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def _rescale_zero_terminal_snr_abar(alphas_cumprod):
    """A1111's ``rescale_zero_terminal_snr_abar`` as v1.10 writes it."""
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= (alphas_bar_sqrt_T)
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = 4.8973451890853435e-08
    return alphas_bar


def test_the_schedule_is_a1111s_rescale_and_its_sigma_table_a1111s():
    """sdadapt's ᾱ of a ``rescale_betas_zero_snr`` schedule is A1111's float32 rescale of LDM's buffer, the last entry
    0 (read back as A1111's 4.897e-08 by the σ table: ``CompVisDenoiser.sigmas`` bit for bit); the float64 rescale
    is another schedule in the last bits (the test can tell them apart)."""
    want = _rescale_zero_terminal_snr_abar(_ldm_alphas_cumprod())
    got = scheduler_alphas_cumprod({"rescale_betas_zero_snr": True})
    assert got.dtype == torch.float32 and float(got[-1]) == 0.0
    assert torch.equal(got[:-1], want[:-1])
    assert torch.equal(a1111_zero_terminal_snr_alphas_cumprod(_ldm_alphas_cumprod()), got)
    assert torch.equal(model_sigmas(got, torch.float32), ((1 - want) / want) ** 0.5)
    float64 = zero_terminal_snr_alphas_cumprod(sd_alphas_cumprod()).float()
    assert (float64[:-1] != want[:-1]).sum() > 100
    assert torch.equal(scheduler_alphas_cumprod({}), _ldm_alphas_cumprod())  # (no rescale: LDM's buffer)
    with pytest.raises(ValueError, match="must decrease"):
        a1111_zero_terminal_snr_alphas_cumprod(torch.linspace(0.1, 0.9, 10))


def test_read_markers_takes_the_keys_whatever_their_shape_and_leaves_edm_v_to_its_reader():
    from sdadapt.formats.prediction_markers import edm_v_range

    state = {"model.diffusion_model.x": torch.zeros(2), "v_pred": torch.tensor([]), "ztsnr": torch.zeros(1)}
    markers, rest = read_markers(state, source="f.safetensors")
    assert markers == {"v_pred", "ztsnr"} and list(rest) == ["model.diffusion_model.x"]
    assert read_markers({"a": torch.zeros(1)}, source="f")[0] == frozenset()
    cosxl = {**state, "edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.001)}
    assert list(read_markers(cosxl, source="f")[1]) == ["model.diffusion_model.x"]  # (CosXL's: tests/test_cosxl.py)
    assert edm_v_range(cosxl, source="f") == pytest.approx((0.001, 120.0))
    # (ComfyUI's CheckpointSave of a Playground v2.5 model: the markers at Playground's σ range, no edm_mean / edm_std)
    with pytest.raises(WeightFileError, match=r"at σ 0.002-80, Playground v2.5's range.*put back edm_mean"):
        edm_v_range({**state, "edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
                    source="f.safetensors")
    written = marker_tensors(architecture="sdxl", v_prediction=True, zero_terminal_snr=True)
    assert list(written) == ["v_pred", "ztsnr"]
    assert all(t.dtype == torch.float32 and t.shape == (0,) for t in written.values())  # (ComfyUI's torch.tensor([]))
    assert list(marker_tensors(architecture="sdxl", v_prediction=True, zero_terminal_snr=False)) == ["v_pred"]
    assert marker_tensors(architecture="sd2", v_prediction=True, zero_terminal_snr=False) == {}
    assert list(marker_tensors(architecture="sd1", v_prediction=False, zero_terminal_snr=True)) == ["ztsnr"]


# ---- single files ---------------------------------------------------------------------------------------------------
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    return tiny_sdxl_file(tmp_path_factory.mktemp("markers") / "plain.safetensors")


def _with(path: Path, out: Path, extra: dict, metadata: dict | None = None) -> Path:
    state, meta = read_weights(path)
    write_safetensors(out, {**state, **extra}, {**meta, **(metadata or {})})
    return out


def test_a_noobai_style_file_is_a_ztsnr_v_model_and_says_so_in_every_form(sdxl_file, tmp_path):
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.formats.detect import describe_file
    from sdadapt.formats.single_file import read_single_file

    marked = _with(sdxl_file, tmp_path / "vpred.safetensors", {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    checkpoint = read_single_file(marked)
    assert (checkpoint.prediction_type, checkpoint.zero_terminal_snr) == ("v_prediction", True)
    system = DiffusersSystem.from_checkpoint(checkpoint)
    assert system.prediction_type == "v_prediction" and system.zero_terminal_snr
    assert system.scheduler_config["rescale_betas_zero_snr"] is True
    assert torch.equal(system.alphas_cumprod, scheduler_alphas_cumprod({"rescale_betas_zero_snr": True}))
    plain = DiffusersSystem.from_single_file(sdxl_file)
    assert plain.prediction_type == "epsilon" and not plain.zero_terminal_snr
    assert "v-prediction, zero terminal SNR: v_pred / ztsnr" in describe_file(marked)["model"]
    # written again: an LDM file with both markers (ComfyUI's empty float32 tensors), a folder with the config
    system.save_model(tmp_path / "again.safetensors")
    state, meta = read_weights(tmp_path / "again.safetensors")
    assert state["v_pred"].shape == (0,) and state["ztsnr"].shape == (0,) and meta["modelspec.prediction_type"] == "v"
    system.save_model(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_pretrained(tmp_path / "folder" / "scheduler").config.rescale_betas_zero_snr is True
    for again in (DiffusersSystem.from_single_file(tmp_path / "again.safetensors"),
                  DiffusersSystem.from_folder(tmp_path / "folder")):
        assert again.prediction_type == "v_prediction" and again.zero_terminal_snr
        assert torch.equal(again.alphas_cumprod, system.alphas_cumprod)
    plain.save_model(tmp_path / "plain_again.safetensors")  # (an ε model gets no marker)
    assert not {"v_pred", "ztsnr"} & set(read_weights(tmp_path / "plain_again.safetensors")[0])


def test_v_pred_alone_and_comfyuis_predict_key(sdxl_file, tmp_path):
    from sdadapt.formats.single_file import read_single_file

    only_v = read_single_file(_with(sdxl_file, tmp_path / "v.safetensors", {"v_pred": torch.tensor([])},
                                    {"modelspec.prediction_type": "epsilon"}))
    assert (only_v.prediction_type, only_v.zero_terminal_snr) == ("v_prediction", False)  # (the key wins)
    keyed = read_single_file(_with(sdxl_file, tmp_path / "k.safetensors", {}, {"modelspec.predict_key": "v"}))
    assert (keyed.prediction_type, keyed.markers) == ("v_prediction", frozenset())
    assert read_single_file(sdxl_file).prediction_type == "epsilon"


def test_convert_keeps_the_markers_and_says_them(sdxl_file, tmp_path, capsys):
    from sdadapt.cli import main

    marked = _with(sdxl_file, tmp_path / "vpred.safetensors", {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    assert main(["convert", str(marked), "--to", "ldm", "-q", "-o", str(tmp_path / "out.safetensors")]) == 0
    assert "v-prediction, zero terminal SNR: v_pred / ztsnr markers (a folder's" in capsys.readouterr().out
    state, _ = read_weights(tmp_path / "out.safetensors")
    assert {"v_pred", "ztsnr"} <= set(state)
    edm_v = _with(sdxl_file, tmp_path / "cosxl.safetensors", {"edm_vpred.sigma_max": torch.tensor(120.0)})
    assert main(["convert", str(edm_v), "--to", "ldm", "-q", "-o", str(tmp_path / "cosxl_out.safetensors")]) == 0
    state, _ = read_weights(tmp_path / "cosxl_out.safetensors")  # (CosXL's markers kept, σ_min ComfyUI's default)
    assert float(state["edm_vpred.sigma_max"]) == 120.0 and float(state["edm_vpred.sigma_min"]) == pytest.approx(0.002)
    assert "v_pred" not in state


# ---- generate --noise-schedule ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("noise_schedule") / "pipe", prediction_type="v_prediction")


def test_generate_zero_terminal_snr_is_the_ztsnr_models_run_and_reads_back(tiny_sd, tmp_path):
    """``--noise-schedule "Zero Terminal SNR"`` on a plain model gives the image of the same model whose scheduler
    config says ``rescale_betas_zero_snr`` (two paths to one schedule), on A1111's grid and on diffusers'; the
    infotext says "Noise Schedule: Zero Terminal SNR" (after the prompt fields, before the sampler's), and reads back
    as the option."""
    from PIL import Image

    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    ztsnr = tmp_path / "ztsnr"
    shutil.copytree(tiny_sd, ztsnr)
    config_file = ztsnr / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rescale_betas_zero_snr": True}))
    for sampler, schedule in (("Euler", "karras"), ("DDIM", None)):
        run = {"prompt": "a cat", "negative": "blurry", "steps": 3, "seed": 2, "sampler": sampler, "width": 32,
               "height": 32, **({"schedule": schedule, "rho": 5.0} if schedule else {})}
        said = []
        run_generate(model=str(tiny_sd), out=tmp_path / "option.png", noise_schedule="zero-terminal-snr",
                     overwrite=True, log=said.append, **run)
        assert not any(line.startswith("refiner") for line in said)  # (no refiner: nothing said of one)
        run_generate(model=str(ztsnr), out=tmp_path / "config.png", overwrite=True, **run)
        run_generate(model=str(tiny_sd), out=tmp_path / "plain.png", overwrite=True, **run)
        images = {name: Image.open(tmp_path / f"{name}.png") for name in ("option", "config", "plain")}
        pixels = {name: np.asarray(image) for name, image in images.items()}
        assert np.array_equal(pixels["option"], pixels["config"]), sampler
        assert not np.array_equal(pixels["option"], pixels["plain"]), sampler
        text = images["option"].text["parameters"]
        assert text == images["config"].text["parameters"].replace("Model: ztsnr", "Model: pipe")
        assert "Noise Schedule" not in images["plain"].text["parameters"]
        assert ", Noise Schedule: Zero Terminal SNR, " in text
        if schedule:  # (A1111's order: the noise schedule is set before the sampler writes its grid's fields)
            assert text.index("Noise Schedule") < text.index("Schedule rho")
        options, not_taken = infotext_options(parse_infotext(text))
        assert options["noise_schedule"] == "zero-terminal-snr" and not any("Noise Schedule" in n for n in not_taken)
    with pytest.raises(ValueError, match=r"--noise-schedule 'cosine': not one of default, zero-terminal-snr \(or A1111's "
                                         r"'Default', 'Zero Terminal SNR'\)"):
        run_generate(model=str(tiny_sd), prompt="a", out=tmp_path / "x.png", noise_schedule="cosine")
    with pytest.raises(ValueError, match="no ᾱ schedule to rescale"):
        run_generate(model="toy", prompt="a", out=tmp_path / "x.png", noise_schedule="Zero Terminal SNR")
    assert not (tmp_path / "x.png").exists()


def _sd2_768_layout_file(path: Path, *, bias_std: float, metadata: dict | None = None) -> Path:
    """A tiny SD2 file in SD2's UNet layout (four levels, the last three attending, three layers per up block), its
    ``output_blocks.11.1…norm1.bias`` drawn with standard deviation ``bias_std``."""
    import diffusers
    from tiny_checkpoints import _clip, _vae, write_single_file

    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64,
        attention_head_dim=1, use_linear_projection=True, norm_num_groups=32,
    ).eval()
    with torch.no_grad():
        bias = unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(8)) * bias_std)
    write_single_file({"unet": unet, "vae": _vae(4, 0.18215), "text_encoder": _clip(5, open_clip=True)}, path,
                      architecture="sd2")
    if metadata:
        _with(path, path, {}, metadata)
    return path


def test_an_sd2_file_without_metadata_is_told_by_comfyuis_weight_test(tmp_path, capsys):
    """ComfyUI's ``SD20.model_type``: std(``output_blocks.11.1.transformer_blocks.0.norm1.bias``) > 0.09 is a 768-v
    model; ModelSpec (or a marker) says it first; ``convert`` says which way it read the file."""
    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.formats.single_file import read_single_file

    v = _sd2_768_layout_file(tmp_path / "v.safetensors", bias_std=0.2)
    eps = _sd2_768_layout_file(tmp_path / "eps.safetensors", bias_std=0.05)
    said = _sd2_768_layout_file(tmp_path / "said.safetensors", bias_std=0.2,
                                metadata={"modelspec.prediction_type": "epsilon"})
    assert [read_single_file(f).prediction_type for f in (v, eps, said)] == ["v_prediction", "epsilon", "epsilon"]
    system = DiffusersSystem.from_single_file(v)
    assert system.prediction_type == "v_prediction" and system.unet.config.upcast_attention  # (SD2-v's config)
    assert main(["convert", str(v), "--to", "ldm", "-q", "-o", str(tmp_path / "out.safetensors")]) == 0
    assert "written as v-prediction (a 768-v model by ComfyUI's weight test" in capsys.readouterr().out
    assert read_weights(tmp_path / "out.safetensors")[1]["modelspec.prediction_type"] == "v"
    assert main(["convert", str(eps), "--to", "ldm", "-q", "-o", str(tmp_path / "out_eps.safetensors")]) == 0
    assert "written as epsilon (ComfyUI's weight test says no 768-v model" in capsys.readouterr().out
    assert read_weights(tmp_path / "out_eps.safetensors")[1]["modelspec.prediction_type"] == "epsilon"
    # an ε model whose weights look 768-v (a fine-tuned SD2-512): its folder written back as a file says ε, and reads
    # back so (it used to say nothing: read back by the weight test as v, the convert failed)
    assert main(["convert", str(said), "--to", "diffusers", "-q", "-o", str(tmp_path / "said")]) == 0
    assert main(["convert", str(tmp_path / "said"), "--to", "ldm", "-q", "-o", str(tmp_path / "again.safetensors")]) == 0
    assert read_weights(tmp_path / "again.safetensors")[1]["modelspec.prediction_type"] == "epsilon"
    assert read_single_file(tmp_path / "again.safetensors").prediction_type == "epsilon"
    # ModelSpec's SD2 architecture says it too, before the weights do (kohya writes -v2-512 for ε, -768-v for v)
    base = _sd2_768_layout_file(tmp_path / "512.safetensors", bias_std=0.2,
                                metadata={"modelspec.architecture": "stable-diffusion-v2-512"})
    v768 = _sd2_768_layout_file(tmp_path / "768.safetensors", bias_std=0.05,
                                metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert [read_single_file(f).prediction_type for f in (base, v768)] == ["epsilon", "v_prediction"]


def test_a_lora_trained_on_a_ztsnr_model_says_it_trained_on_that_schedule(tiny_sd, tmp_path, capsys):
    """kohya's ``ss_zero_terminal_snr`` says the steps trained on the zero-terminal-SNR schedule: a model on it already
    (here its config's ``rescale_betas_zero_snr``, as a ``ztsnr`` checkpoint reads) trains so without the option."""
    from safetensors import safe_open
    from test_cli_train import _images

    from sdadapt.cli import main

    ztsnr = tmp_path / "ztsnr"
    shutil.copytree(tiny_sd, ztsnr)
    config_file = ztsnr / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rescale_betas_zero_snr": True}))
    images = _images(tmp_path / "imgs", n=2)
    for model, name in ((ztsnr, "z"), (tiny_sd, "plain")):
        out = tmp_path / f"{name}.safetensors"
        assert main(["train", "lora", "--images", str(images), "--model", str(model), "--steps", "1", "-q",
                     "-o", str(out)]) == 0, capsys.readouterr().err
        with safe_open(out, "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_zero_terminal_snr"] == str(name == "z") and meta["ss_v_parameterization"] == "True"


@pytest.mark.parametrize("sampler, steps", [("ddim", 500), ("plms", 500), ("ddim_cfgpp", 500), ("unipc_a1111", 20)])
def test_a1111s_timestep_samplers_read_the_last_alpha_as_a1111_holds_it(sampler, steps):
    """A1111's DDIM, PLMS, DDIM CFG++ (500 steps reach t = 999) and UniPC (its VP schedule's log α at t = 1) on a
    zero-terminal-SNR schedule read ᾱ_999 as A1111 holds it, 4.897e-08 (``a1111_alphas_cumprod``): the run on the
    zero is the run on that value, and finite (ᾱ = 0 gave NaN)."""
    from sampler_stand_ins import stand_in

    from sdadapt.samplers import sample_latents
    from sdadapt.samplers.sigma_space import (
        A1111_ZERO_SNR_ALPHA_CUMPROD,
        a1111_alphas_cumprod,
    )

    ac = scheduler_alphas_cumprod({"rescale_betas_zero_snr": True})
    held = ac.clone()
    held[-1] = A1111_ZERO_SNR_ALPHA_CUMPROD
    assert torch.equal(a1111_alphas_cumprod(ac), held)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    run = {"sampler": sampler, "num_steps": steps, "schedule": "automatic" if sampler == "ddim" else None}
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, alphas_cumprod=ac, **run)
    assert torch.isfinite(got).all()
    assert torch.equal(got, sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, alphas_cumprod=held, **run))
    v = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, alphas_cumprod=ac, prediction_type="v_prediction",
                       **run)
    assert torch.isfinite(v).all()


def test_merge_keeps_the_first_inputs_markers_and_takes_those_every_other_input_has(sdxl_file, tmp_path, capsys):
    """The markers travel as the merge's model description (``merge.model_metadata``'s rule): the first input's,
    a disagreement noted; a marker the first lacks and every other input has is taken, said."""
    from sdadapt.cli import main

    marked = _with(sdxl_file, tmp_path / "vpred.safetensors", {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    only_v = _with(sdxl_file, tmp_path / "only_v.safetensors", {"v_pred": torch.tensor([])})

    def merge(*inputs: Path, operator: str = "weighted-sum") -> tuple[set[str], str]:
        out = tmp_path / "merged.safetensors"
        options = ["--alpha", "0.5"] if operator == "weighted-sum" else []
        assert main(["merge", operator, *map(str, inputs), *options, "--overwrite", "-o", str(out)]) == 0
        said = capsys.readouterr().out
        return {"v_pred", "ztsnr"} & set(read_weights(out)[0]), said

    assert merge(marked, marked)[0] == {"v_pred", "ztsnr"}
    keys, said = merge(sdxl_file, marked)
    assert keys == {"v_pred", "ztsnr"} and "v_pred: plain.safetensors has none; every other input has it" in said
    keys, said = merge(marked, sdxl_file)
    assert keys == {"v_pred", "ztsnr"}
    assert "ztsnr: vpred.safetensors has it, plain.safetensors not; the merge has it, as vpred" in said
    keys, said = merge(sdxl_file, marked, only_v, operator="add-difference")  # (A + (B − C)·α: v_pred in B and C)
    assert keys == {"v_pred"} and "ztsnr: vpred.safetensors has it, plain.safetensors, only_v.safetensors not; the " \
                                  "merge lacks it, as plain" in said
    out = tmp_path / "copied.safetensors"  # (--copy-extra-keys: the marker copied with B's other keys, and said so)
    assert main(["merge", "add-difference", *map(str, (sdxl_file, marked, only_v)), "--copy-extra-keys", "-o",
                 str(out)]) == 0
    assert {"v_pred", "ztsnr"} <= set(read_weights(out)[0])
    assert "the merge has it: check that the inputs predict alike" in capsys.readouterr().out
