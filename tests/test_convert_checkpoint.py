"""``python -m sdadapt convert --to diffusers|ldm`` for whole SD checkpoints (tiny random models, offline).

Checked against the real consumers: diffusers' ``StableDiffusionPipeline.from_pretrained`` reads the
written folder, diffusers' ``from_single_file(config=<folder>)`` the written LDM file.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import load_file
from tiny_checkpoints import _clip, _vae, tiny_sd1_parts, write_single_file

from sdadapt.cli import main
from sdadapt.diffusers_system import DiffusersSystem
from sdadapt.formats.files import write_safetensors


def _convert(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv), "-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sd1_parts():
    """``tiny_sd1_parts()`` (float32), built once for the module: tests copy what they change."""
    return tiny_sd1_parts()


@pytest.fixture(scope="module")
def sd1_file(sd1_parts, tmp_path_factory):
    """The float32 tiny SD1 model as an LDM file (the tests only read it)."""
    return write_single_file(sd1_parts, tmp_path_factory.mktemp("sd1_fp32") / "raw.safetensors", architecture="sd1")


def _half_sd1_file(path, parts=None):
    """A tiny SD1 file with an fp16 UNet and text encoder and an fp32 VAE (as many published files), from a copy
    of ``parts`` (default: a new ``tiny_sd1_parts()``); tests/test_convert_interrupted.py writes one too."""
    parts = {name: copy.deepcopy(module) for name, module in (parts or tiny_sd1_parts()).items()}
    parts["unet"].half()
    parts["text_encoder"].half()
    return write_single_file(parts, path, architecture="sd1")


@pytest.fixture(scope="module")
def half_sd1_file(sd1_parts, tmp_path_factory):
    """:func:`_half_sd1_file` of the module's parts; the tests only read it (one that could write it takes a copy)."""
    return _half_sd1_file(tmp_path_factory.mktemp("sd1_half") / "m.safetensors", sd1_parts)


@pytest.fixture(scope="module")
def sd1_round_trip(half_sd1_file, tmp_path_factory):
    """A mixed fp16/fp32 SD1 LDM file -> diffusers folder -> LDM file, both with --dtype keep."""
    root = tmp_path_factory.mktemp("sd1")
    source = half_sd1_file
    for argv in ([source, "--to", "diffusers", "-o", root / "folder"],
                 [root / "folder", "--to", "ldm", "-o", root / "back.safetensors"]):
        assert main(["convert", *map(str, argv), "-q"]) == 0
    return source, root / "folder", root / "back.safetensors"


def test_ldm_file_to_folder_to_file_is_bit_identical_per_key(sd1_round_trip):
    source, _, back = sd1_round_trip
    before, after = load_file(source), load_file(back)
    assert set(after) == set(before)
    for key, tensor in before.items():
        want = torch.float32 if key.startswith("first_stage_model.") else torch.float16
        assert after[key].dtype == tensor.dtype == want, key  # keep: each tensor's own dtype in the file
        assert torch.equal(after[key], tensor), key
    with safe_open(back, "pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "back" and meta["modelspec.prediction_type"] == "epsilon"  # (as kohya writes it)
    assert set(json.loads(meta["sdadapt.configs"])) == {"unet", "text_encoder", "vae"}


def test_folder_loads_in_real_diffusers_pipeline_and_equals_the_single_file(sd1_round_trip):
    source, folder, _ = sd1_round_trip
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ours = DiffusersSystem.from_single_file(source)
    for file, dtype in (("unet/diffusion_pytorch_model.safetensors", torch.float16), ("text_encoder/model.safetensors",
                        torch.float16), ("vae/diffusion_pytorch_model.safetensors", torch.float32)):
        assert {t.dtype for t in load_file(folder / file).values()} == {dtype}, file  # as in the single file
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, ours.unet, ours.vae, ours.text_encoder):
        module.float()
    torch.manual_seed(0)
    x, ctx, ids = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64), torch.randint(0, 49408, (1, 77))
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 10, ctx).sample, ours.unet(x, 10, ctx).sample)
        assert torch.equal(pipe.vae.decode(x).sample, ours.vae.decode(x).sample)
        assert torch.equal(pipe.vae.encode(image).latent_dist.mean, ours.vae.encode(image).latent_dist.mean)
        assert torch.equal(pipe.text_encoder(ids)[0], ours.text_encoder(ids)[0])
    assert pipe.tokenizer("a photo").input_ids == ours.tokenizer("a photo").input_ids
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_folder_tokenizer_has_the_legacy_vocabulary_files(sd1_round_trip, tmp_path):
    """transformers 4's slow CLIPTokenizer (kohya's sd-scripts) reads vocab.json + merges.txt only."""
    import shutil

    from transformers import CLIPTokenizer

    _, folder, _ = sd1_round_trip
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / "tokenizer" / name, legacy / name)
    full, slow = CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(legacy)
    text = ["a photograph of an astronaut riding a horse, highly detailed", "Zebra-stripes & 3 cats!!"]
    assert slow(text, padding="max_length", max_length=77).input_ids == full(text, padding="max_length", max_length=77).input_ids
    assert len(json.loads((legacy / "vocab.json").read_text())) == 49408
    from sdadapt.clip_tokenizer import CLIPTokenizer as Shipped  # openai's bpe_simple_vocab_16e6, read by sdadapt

    shipped = Shipped.load(None)
    lines = (legacy / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and lines[1:] == [" ".join(m) for m in sorted(shipped.ranks, key=shipped.ranks.get)]
    assert json.loads((legacy / "vocab.json").read_text(encoding="utf-8")) == shipped.encoder


def test_ldm_file_from_a_folder_loads_with_real_diffusers_from_single_file(tmp_path, capsys):
    from test_cli_train import _tiny_pipeline

    folder = _tiny_pipeline(tmp_path / "pipe", prediction_type="v_prediction")
    (folder / "model_index.json").write_text(json.dumps({  # as save_pretrained writes it (from_single_file reads it)
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False}))
    out = tmp_path / "model.safetensors"
    code, line, _ = _convert(capsys, folder, "--to", "ldm", "-o", out)
    assert code == 0 and "max |Δ| 0 (read back)" in line and "from a diffusers folder" in line
    with safe_open(out, "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"  # the folder's scheduler said so
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
                   for k in handle.keys())  # noqa: SIM118
    single = diffusers.StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert set(mine) == set(theirs), name
        for key, tensor in theirs.items():
            assert torch.equal(mine[key].float(), tensor.float()), (name, key)


def _sdxl_parts() -> dict:
    """tiny_sdxl_parts' model with a 128-wide second encoder: diffusers' single-file loader tells SDXL's
    two encoders apart by width (768 vs 1280), so they must differ as in the real model (built here
    directly: tiny_sdxl_parts would build a UNet and an encoder only to replace them)."""
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 + 128, attention_head_dim=(1, 2), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=32,
    ).eval()
    torch.manual_seed(7)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        projection_dim=32)).eval()
    return {"unet": unet, "vae": _vae(1, 0.13025), "text_encoder": _clip(2, open_clip=False),
            "text_encoder_2": text_encoder_2}


def test_sdxl_round_trip_and_real_sdxl_pipeline(tmp_path, capsys):
    parts = _sdxl_parts()
    source = write_single_file(parts, tmp_path / "xl.safetensors", architecture="sdxl")
    code, line, _ = _convert(capsys, source, "--to", "diffusers", "-o", tmp_path / "xl")
    assert code == 0 and "of an sdxl model" in line and "text_encoder_2" in line and "max |Δ| 0 (read back)" in line
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    # the scheduler diffusers' own converter writes for SDXL (convert_from_ckpt.py's scheduler_dict, transcribed; its
    # from_single_file takes the hub's SDXL config, the same Euler): once a DDIM with DDIM's defaults, which an SDXL
    # pipeline does not correct (timesteps 800 ... 0, the last ᾱ 1, x̂0 clipped), then diffusers' DDIM settings
    theirs = diffusers.EulerDiscreteScheduler.from_config({
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading"})
    theirs.register_to_config(clip_sample=False)  # (the converter's, for every scheduler it writes)
    assert type(pipe.scheduler) is diffusers.EulerDiscreteScheduler
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    for scheduler in (pipe.scheduler, theirs):
        scheduler.set_timesteps(5)
    assert pipe.scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert torch.equal(pipe.scheduler.sigmas, theirs.sigmas)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the folder holds the model the file was made of
        mine, theirs = parts[name].state_dict(), getattr(pipe, name).state_dict()
        assert set(mine) == set(theirs), name
        for key, tensor in mine.items():
            assert torch.equal(theirs[key], tensor), (name, key)
    code, _, _ = _convert(capsys, tmp_path / "xl", "--to", "ldm", "-o", tmp_path / "back.safetensors")
    before, after = load_file(source), load_file(tmp_path / "back.safetensors")
    assert code == 0 and set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    single = diffusers.StableDiffusionXLPipeline.from_single_file(  # (the folder's tokenizers: loaded just above)
        str(tmp_path / "back.safetensors"), config=str(tmp_path / "xl"), local_files_only=True,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(mine) == set(theirs), name
        assert all(torch.equal(mine[k], v) for k, v in theirs.items()), name


def test_dtype_fp16_rounds_each_tensor_once(sd1_file, tmp_path, capsys):
    source = sd1_file
    out = tmp_path / "half.safetensors"
    code, line, _ = _convert(capsys, source, "--to", "ldm", "--dtype", "fp16", "-o", out)
    before, after = load_file(source), load_file(out)
    assert code == 0 and set(after) == set(before)
    worst = 0.0
    for key, tensor in before.items():
        assert after[key].dtype == torch.float16, key
        assert torch.equal(after[key], tensor.half()), key
        worst = max(worst, float((tensor.double() - tensor.half().double()).abs().max()))
    assert worst > 0 and f"max |Δ| {worst:.3g} (read back)" in line
    assert "float16" in line and "as in the input" not in line


def _with_ema(source, path, *, drop=None, ckpt=False):
    """``source`` plus a CompVis LitEma copy of its UNet (each tensor + 1), ``drop`` left out."""
    state = load_file(source)
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        name = "model_ema." + "".join(key.split(".")[1:])
        if name != drop:
            state[name] = state[key] + 1
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    if ckpt:
        torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, path)
    else:
        write_safetensors(path, state, {})
    return path


def test_ema_extraction_and_default_raw_weights(sd1_file, tmp_path, capsys):
    source = sd1_file
    with_ema = _with_ema(source, tmp_path / "ema.ckpt", ckpt=True)
    raw = load_file(source)
    unet_keys = [k for k in raw if k.startswith("model.diffusion_model.")]

    code, line, _ = _convert(capsys, with_ema, "--to", "ldm", "-o", tmp_path / "pruned.safetensors")
    pruned = load_file(tmp_path / "pruned.safetensors")
    assert code == 0 and set(pruned) == set(raw)  # no model_ema.*, no global_step
    assert all(torch.equal(pruned[k], v) for k, v in raw.items())  # the raw weights, not mixed
    assert f"EMA copy dropped ({len(unet_keys)} tensors; --ema writes it" in line
    assert "global_step" in line and "max |Δ| 0 (read back)" in line

    code, line, _ = _convert(capsys, with_ema, "--to", "ldm", "--ema", "-o", tmp_path / "ema.safetensors")
    averaged = load_file(tmp_path / "ema.safetensors")
    assert code == 0 and set(averaged) == set(raw)
    for key, tensor in raw.items():
        assert torch.equal(averaged[key], tensor + 1 if key in unet_keys else tensor), key
    assert "EMA weights written as the UNet" in line

    incomplete = _with_ema(source, tmp_path / "partial_ema.safetensors", drop="model_ema." + "".join(unet_keys[3].split(".")[1:]))
    code, _, err = _convert(capsys, incomplete, "--to", "ldm", "--ema", "-o", tmp_path / "x.safetensors")
    assert code != 0 and "the EMA copy lacks 1 of the" in err and not (tmp_path / "x.safetensors").exists()
    code, _, err = _convert(capsys, source, "--to", "ldm", "--ema", "-o", tmp_path / "y.safetensors")
    assert code != 0 and "has no EMA weights" in err


def test_vae_baked_in(sd1_parts, tmp_path, capsys):
    parts = {**sd1_parts, "vae": copy.deepcopy(sd1_parts["vae"]).half()}  # an fp16 VAE replaced by an fp32 one,
    source = write_single_file(parts, tmp_path / "m.safetensors", architecture="sd1")  # written fp32: not via fp16
    other = _vae(6, 0.18215)  # (tiny_sd1_parts(seed=5)'s VAE)
    vae_file = tmp_path / "vae.safetensors"
    write_safetensors(vae_file, {k: v.detach().clone() for k, v in other.state_dict().items()}, {})
    code, line, _ = _convert(capsys, source, "--to", "diffusers", "--vae", vae_file, "--dtype", "fp32", "-o",
                             tmp_path / "out")
    assert code == 0 and "baked in" in line
    written = load_file(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in other.state_dict().items())


def test_overwrite_rules(half_sd1_file, tmp_path, capsys):
    source = half_sd1_file
    out = tmp_path / "folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _convert(capsys, source, "--to", "diffusers", "-o", out)
    assert code != 0 and "--overwrite" in err
    code, _, err = _convert(capsys, source, "--to", "diffusers", "-o", out, "--overwrite")
    assert code != 0 and "not a diffusers model" in err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert _convert(capsys, source, "--to", "diffusers", "-o", out)[0] == 0
    code, _, _ = _convert(capsys, source, "--to", "diffusers", "-o", out, "--overwrite", "--dtype", "fp32")
    assert code == 0 and (out / "model_index.json").is_file()
    assert load_file(out / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    inside = out / "m.safetensors"  # replacing the folder would delete the input
    inside.write_bytes(source.read_bytes())
    code, _, err = _convert(capsys, inside, "--to", "diffusers", "-o", out, "--overwrite")
    assert code != 0 and "which replacing the folder would delete" in err and inside.is_file()
    link = tmp_path / "link"  # a link to a model folder: the link is replaced, the folder it names kept
    link.symlink_to(out)
    assert _convert(capsys, source, "--to", "diffusers", "-o", link, "--overwrite")[0] == 0
    assert link.is_dir() and not link.is_symlink() and inside.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refusals_name_the_fix(half_sd1_file, tmp_path, capsys):
    source = shutil.copyfile(half_sd1_file, tmp_path / "m.safetensors")  # (a copy: one case names it as OUT)
    cases = [
        ([source, "--to", "kohya", "-o", tmp_path / "a.safetensors"], "converts --to diffusers (a folder) or --to ldm", 2),
        ([source, "--to", "diffusers", "-o", tmp_path / "a.safetensors"], "writes a folder; give OUT without a suffix", 2),
        ([source, "--to", "ldm", "-o", tmp_path / "folder"], "name OUT *.safetensors", 2),
        ([source, "--to", "ldm", "--base-model", "sd2", "-o", tmp_path / "a.safetensors"], "--base-model", 2),
        ([source, "--to", "ldm", "-o", source, "--overwrite"], "is also the input", 2),
    ]
    lora = tmp_path / "lora.safetensors"
    write_safetensors(lora, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, {})
    cases += [([lora, "--to", "ldm", "-o", tmp_path / "b.safetensors"], "converts --to kohya|diffusers|peft", 2),
              ([lora, "--to", "kohya", "--ema", "-o", tmp_path / "b.safetensors"], "--ema is for whole checkpoints", 2)]
    state = load_file(source)
    unet_only = tmp_path / "unet_only.safetensors"
    write_safetensors(unet_only, {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, {})
    cases.append(([unet_only, "--to", "diffusers", "-o", tmp_path / "c"], "a partial checkpoint: it holds a UNet", 3))
    alien = tmp_path / "alien.safetensors"  # an LDM-named model of another architecture (SD3-like blocks)
    write_safetensors(alien, {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2),
                              "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 4, 3, 3),
                              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, {})
    cases.append(([alien, "--to", "diffusers", "-o", tmp_path / "d"], "not an SD1/SD2/SDXL checkpoint", 3))
    for argv, message, exit_code in cases:
        code, _, err = _convert(capsys, *argv)
        assert code == exit_code and message in err, (argv, code, err)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def _sd2_parts() -> dict:
    """A tiny SD2 model: linear ``proj_in``, 64-wide heads, an OpenCLIP (GELU) text encoder."""
    from tiny_checkpoints import _clip, _vae

    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 1), use_linear_projection=True, norm_num_groups=32,
    ).eval()
    return {"unet": unet, "vae": _vae(4, 0.18215), "text_encoder": _clip(5, open_clip=True)}


def test_sd2_v_prediction_is_set_on_request_and_kept(tmp_path, capsys):
    parts = _sd2_parts()
    parts["unet"].to(torch.bfloat16)  # keep: bf16 and fp16 tensors (the OpenCLIP in_proj split and joined) exact
    parts["text_encoder"].half()
    source = write_single_file(parts, tmp_path / "sd2.safetensors", architecture="sd2")
    # the hint (read with the file, whichever the target: the cheaper LDM file here)
    code, line, _ = _convert(capsys, source, "--to", "ldm", "-o", tmp_path / "eps.safetensors")
    assert code == 0 and "of an sd2 model" in line and "--prediction-type v_prediction" in line
    code, line, _ = _convert(capsys, source, "--to", "diffusers", "--prediction-type", "v_prediction", "-o", tmp_path / "v")
    assert code == 0 and "of an sd2-v model" in line and "max |Δ| 0 (read back)" in line
    scheduler = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "v", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    code, line, _ = _convert(capsys, tmp_path / "v", "--to", "ldm", "-o", tmp_path / "v.safetensors")
    with safe_open(tmp_path / "v.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert code == 0 and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    before, after = load_file(source), load_file(tmp_path / "v.safetensors")
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert {v.dtype for v in after.values()} == {torch.bfloat16, torch.float16, torch.float32}


def test_folder_unet_ema_from_real_ema_model(tmp_path, capsys):
    """A folder's ``unet_ema/`` as diffusers' ``EMAModel.save_pretrained`` writes it: --ema makes it the UNet."""
    from test_cli_train import _tiny_pipeline

    folder = _tiny_pipeline(tmp_path / "pipe", prediction_type="epsilon")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    from diffusers.training_utils import EMAModel

    ema_unet = {k: v.clone() for k, v in unet.state_dict().items()}  # (float32)
    ema = EMAModel(unet.parameters(), model_cls=diffusers.UNet2DConditionModel, model_config=unet.config)
    ema.shadow_params = [p.detach() + 1 for p in ema.shadow_params]
    ema.save_pretrained(str(folder / "unet_ema"))
    import shutil

    shutil.rmtree(folder / "unet")
    unet.half().save_pretrained(folder / "unet")  # an fp16 UNet beside an fp32 EMA: each written in its own dtype
    code, line, _ = _convert(capsys, folder, "--to", "ldm", "-o", tmp_path / "raw.safetensors")
    assert code == 0 and "EMA copy dropped" in line and "max |Δ| 0 (read back)" in line
    raw = load_file(tmp_path / "raw.safetensors")
    assert {v.dtype for k, v in raw.items() if k.startswith("model.diffusion_model.")} == {torch.float16}
    code, line, _ = _convert(capsys, folder, "--to", "diffusers", "--ema", "-o", tmp_path / "ema")
    assert code == 0 and "EMA weights written as the UNet" in line
    written = load_file(tmp_path / "ema" / "unet" / "diffusion_pytorch_model.safetensors")
    for key, tensor in ema_unet.items():
        assert written[key].dtype == torch.float32 and torch.equal(written[key], tensor + 1), key
    assert not (tmp_path / "ema" / "unet_ema").exists()
