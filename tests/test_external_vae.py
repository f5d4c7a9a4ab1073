"""kohya's ``--vae``: a VAE given on its own replaces the model's (every layout; training latents,
samples, the run record, ``--resume``, ``ss_vae_*`` metadata; bad files named)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdadapt.cli import main
from sdadapt.errors import WeightFileError
from sdadapt.external_vae import load_vae
from sdadapt.formats.model_keys import diffusers_to_ldm

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_cli_train import (  # (after the skips: it builds diffusers models)
    _images,
    _tiny_pipeline,
)

#: the tiny VAE of test_cli_train._tiny_pipeline, built with other random weights
_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32), "layers_per_block": 1,
           "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
           "norm_num_groups": 8}


def _tiny_vae(seed: int, **changes):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(**{**_CONFIG, **changes}).eval()


def _ldm(vae, *, prefix: bool) -> dict[str, torch.Tensor]:
    """``vae`` in LDM naming through sdadapt's one key map (``first_stage_model.`` kept or stripped)."""
    state = diffusers_to_ldm({f"vae.{k}": v for k, v in vae.state_dict().items()})
    return {(k if prefix else k.removeprefix("first_stage_model.")): v.contiguous() for k, v in state.items()}


def _write_layout(vae, tmp_path, layout: str):
    """``vae`` written in one of the layouts ``--vae`` reads; returns the path to give."""
    if layout == "ldm":
        save_file(_ldm(vae, prefix=False), tmp_path / "vae.safetensors")
        return tmp_path / "vae.safetensors"
    if layout == "ldm-prefixed":
        save_file(_ldm(vae, prefix=True), tmp_path / "vae.safetensors")
        return tmp_path / "vae.safetensors"
    if layout == "ldm-ckpt":  # a legacy pickle, the weights nested under state_dict (plus a training-only key)
        torch.save({"state_dict": {**_ldm(vae, prefix=False), "loss.logvar": torch.zeros(())}}, tmp_path / "vae.ckpt")
        return tmp_path / "vae.ckpt"
    if layout == "diffusers-file":
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
        return tmp_path / "vae.safetensors"
    if layout == "diffusers-old-attention":  # pre-0.14 diffusers names, prefixed with vae.
        renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state = {}
        for key, value in vae.state_dict().items():
            for new, old in renames.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            state[f"vae.{key}"] = value.contiguous()
        save_file(state, tmp_path / "vae.safetensors")
        return tmp_path / "vae.safetensors"
    if layout == "diffusers-folder":
        vae.save_pretrained(tmp_path / "vae-folder")
        return tmp_path / "vae-folder"
    if layout == "model-folder":  # a diffusers pipeline folder: its vae/ (kohya retries with subfolder="vae")
        vae.save_pretrained(tmp_path / "model" / "vae")
        return tmp_path / "model"
    if layout == "full-checkpoint":  # an SD1 single file: UNet / CLIP-L keys beside first_stage_model.*
        state = {**_ldm(vae, prefix=True), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                 "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
        save_file(state, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    raise AssertionError(layout)


LAYOUTS = ("ldm", "ldm-prefixed", "ldm-ckpt", "diffusers-file", "diffusers-old-attention", "diffusers-folder",
           "model-folder", "full-checkpoint")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_the_same_weights_and_encodes_as_the_source_vae(tmp_path, layout):
    model_vae, source = _tiny_vae(0), _tiny_vae(1)
    path = _write_layout(source, tmp_path, layout)
    loaded = load_vae(path, like=model_vae, architecture="sd1")
    want = source.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    assert loaded.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        # the same float32 weights through the same module: equal to float rounding (stated: 1e-6)
        torch.testing.assert_close(loaded.encode(x).latent_dist.mean, source.encode(x).latent_dist.mean, atol=1e-6, rtol=0)
        assert not torch.allclose(loaded.encode(x).latent_dist.mean, model_vae.encode(x).latent_dist.mean, atol=1e-3)


def test_sdadapts_ldm_vae_file_agrees_with_diffusers_own_single_file_loader(tmp_path):
    """The LDM file written through sdadapt's key map is the file diffusers' AutoencoderKL.from_single_file
    reads (offline, with the folder's config), and sdadapt reads diffusers' written-back LDM the same way."""
    source = _tiny_vae(1)
    source.save_pretrained(tmp_path / "config")
    path = _write_layout(source, tmp_path, "ldm-prefixed")
    theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    ours = load_vae(path, like=_tiny_vae(0))
    want = theirs.state_dict()
    assert ours.state_dict().keys() == want.keys()
    assert all(torch.equal(ours.state_dict()[k], want[k].float()) for k in want)


def test_bad_vae_files_are_refused_naming_the_file(tmp_path):
    model_vae = _tiny_vae(0)
    with pytest.raises(WeightFileError, match="no such file or folder"):
        load_vae(tmp_path / "missing.safetensors", like=model_vae)
    good = _write_layout(_tiny_vae(1), tmp_path, "ldm")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="truncated.safetensors"):
        load_vae(truncated, like=model_vae)
    save_file({"some.other.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightFileError, match=r"other\.safetensors: no VAE weights"):
        load_vae(tmp_path / "other.safetensors", like=model_vae)
    # a VAE for 16-channel latents (SD3/Flux-like)
    save_file(_ldm(_tiny_vae(1, latent_channels=16), prefix=False), tmp_path / "flux.safetensors")
    with pytest.raises(WeightFileError, match=r"flux\.safetensors: a VAE for 16-channel latents.*4-channel"):
        load_vae(tmp_path / "flux.safetensors", like=model_vae)
    # other block widths: named keys and shapes
    save_file(_ldm(_tiny_vae(1, block_out_channels=(8, 16), norm_num_groups=4), prefix=False), tmp_path / "small.safetensors")
    with pytest.raises(WeightFileError, match=r"small\.safetensors: does not fit the model's VAE"):
        load_vae(tmp_path / "small.safetensors", like=model_vae)
    # a VAE missing its decoder
    save_file({k: v for k, v in _ldm(_tiny_vae(1), prefix=False).items() if not k.startswith("decoder.")},
              tmp_path / "half.safetensors")
    with pytest.raises(WeightFileError, match=r"half\.safetensors: does not fit.*missing"):
        load_vae(tmp_path / "half.safetensors", like=model_vae)
    # an SDXL folder (scaling factor 0.13025) for an SD1 model
    _tiny_vae(1, scaling_factor=0.13025).save_pretrained(tmp_path / "sdxl-vae")
    with pytest.raises(WeightFileError, match=r"sdxl-vae.*scaling_factor 0\.13025 \(the model's 0\.18215\).*another latent"):
        load_vae(tmp_path / "sdxl-vae", like=model_vae, architecture="sd1")
    # an SDXL checkpoint's VAE for an SD1 model
    state = {**_ldm(_tiny_vae(1), prefix=True), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
             "conditioner.embedders.1.model.ln_final.weight": torch.ones(8)}
    save_file(state, tmp_path / "xl.safetensors")
    with pytest.raises(WeightFileError, match=r"xl\.safetensors: the VAE of an SDXL checkpoint.*SD1/SD2 model"):
        load_vae(tmp_path / "xl.safetensors", like=model_vae, architecture="sd1")
    # a checkpoint without its VAE; a folder without weights
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "novae.safetensors")
    with pytest.raises(WeightFileError, match=r"novae\.safetensors: a Stable Diffusion checkpoint without a VAE"):
        load_vae(tmp_path / "novae.safetensors", like=model_vae)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(WeightFileError, match="empty-folder: not a diffusers VAE folder"):
        load_vae(tmp_path / "empty-folder", like=model_vae)


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (eval, ("1",))

    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": Boom()}, handle)
    with pytest.raises(WeightFileError, match="evil.ckpt"):
        load_vae(tmp_path / "evil.ckpt", like=_tiny_vae(0))


def test_the_toy_refuses_vae():
    from sdadapt.jobs.models import load_system

    with pytest.raises(ValueError, match="the toy has no Stable Diffusion VAE"):
        load_system("toy", vae="x.safetensors")


def _spy_latents(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (pixels, latents) pair a training run caches (``encode_buckets``' encoder, wrapped)."""
    from sdadapt.training import data

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = data.encode_buckets

    def spy(dataset, encode, **kwargs):
        def recorded(images):
            latents = encode(images)
            seen.append((images.detach().clone(), latents.detach().clone()))
            return latents
        return real(dataset, recorded, **kwargs)

    monkeypatch.setattr(data, "encode_buckets", spy)
    return seen


def test_train_with_vae_caches_that_vaes_latents_records_it_and_resume_refuses_another(tmp_path, monkeypatch, capsys):
    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", n=2)
    given, other = _tiny_vae(1), _tiny_vae(2)
    (tmp_path / "given").mkdir()
    (tmp_path / "other").mkdir()
    given_path = _write_layout(given, tmp_path / "given", "ldm")
    other_path = _write_layout(other, tmp_path / "other", "diffusers-folder")
    seen = _spy_latents(monkeypatch)
    common = ["train", "lora", "--images", str(images), "--model", str(root), "--steps", "2", "--batch-size", "1",
              "--no-prior", "-q"]
    out = tmp_path / "a.safetensors"
    assert main([*common, "--vae", str(given_path), "--save-every-n-steps", "1", "-o", str(out)]) == 0, capsys.readouterr().err
    own = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    scale = float(own.config.scaling_factor)
    assert seen
    with torch.no_grad():
        for pixels, latents in seen:  # the cached latents are the given VAE's (mean * scaling factor), not the model's
            torch.testing.assert_close(latents, given.encode(pixels).latent_dist.mean * scale, atol=1e-5, rtol=0)
            assert not torch.allclose(latents, own.encode(pixels).latent_dist.mean * scale, atol=1e-3)
    metadata = __import__("sdadapt").load_lora(out)[1]
    assert metadata["ss_vae_name"] == "vae.safetensors"
    import hashlib

    assert metadata["ss_new_vae_hash"] == hashlib.sha256(given_path.read_bytes()).hexdigest()
    assert len(metadata["ss_vae_hash"]) == 8
    record = json.loads((tmp_path / "a-state" / "run.json").read_text())
    assert record["vae"] == {"path": str(given_path.resolve()), "sha256": metadata["ss_new_vae_hash"]}
    # another VAE gives other latents: resuming with it (or with the model's own) is refused, naming both
    capsys.readouterr()
    assert main([*common, "--vae", str(other_path), "--resume", str(tmp_path / "a-state"),
                 "-o", str(tmp_path / "b.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "vae" in err and str(given_path.resolve()) in err and str(other_path.resolve()) in err
    assert main([*common, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")]) != 0
    assert "the model's own" in capsys.readouterr().err
    # the same weights under another path are the same VAE
    from sdadapt.jobs.train import TrainOptions, _check_resume

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(given_path.read_bytes())
    options = TrainOptions(images=str(images), model=str(root), steps=2, batch_size=1, prior=False, vae=str(copy))
    assert _check_resume(tmp_path / "a-state", "lora", options)["vae"]["sha256"] == metadata["ss_new_vae_hash"]


def test_a_kohya_toml_with_vae_trains_with_it(tmp_path, monkeypatch, capsys):
    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", n=1)
    given = _tiny_vae(1)
    path = _write_layout(given, tmp_path, "ldm-prefixed")
    seen = _spy_latents(monkeypatch)
    config = tmp_path / "kohya.toml"
    config.write_text(f'pretrained_model_name_or_path = "{root}"\ntrain_data_dir = "{images}"\nvae = "{path}"\n'
                      f'max_train_steps = 1\ntrain_batch_size = 1\nnetwork_module = "networks.lora"\nnetwork_dim = 4\n'
                      f'output_dir = "{tmp_path}"\noutput_name = "k"\ncache_latents = true\n')
    assert main(["train", "lora", "--config", str(config), "--no-prior", "-q"]) == 0, capsys.readouterr().err
    scale = float(diffusers.AutoencoderKL.from_pretrained(root / "vae").config.scaling_factor)
    with torch.no_grad():
        for pixels, latents in seen:
            torch.testing.assert_close(latents, given.encode(pixels).latent_dist.mean * scale, atol=1e-5, rtol=0)
    assert load_file(str(tmp_path / "k.safetensors"))  # (written)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_vae_name"] == "vae.safetensors"


def test_generate_decodes_with_the_given_vae(tmp_path, capsys):
    from sdadapt.images import read_image

    root = _tiny_pipeline(tmp_path / "pipe")
    own_copy = diffusers.AutoencoderKL.from_pretrained(root / "vae")
    same = _write_layout(own_copy, tmp_path, "ldm")  # the model's own VAE as an LDM file: the same image
    (tmp_path / "o").mkdir()
    other = _write_layout(_tiny_vae(1), tmp_path / "o", "diffusers-file")
    common = ["generate", "--model", str(root), "--prompt", "a photo", "--steps", "2", "--width", "32", "--height", "32", "-q"]
    assert main([*common, "-o", str(tmp_path / "plain.png")]) == 0, capsys.readouterr().err
    assert main([*common, "--vae", str(same), "-o", str(tmp_path / "same.png")]) == 0, capsys.readouterr().err
    assert main([*common, "--vae", str(other), "-o", str(tmp_path / "other.png")]) == 0, capsys.readouterr().err
    plain, again, changed = (read_image(tmp_path / f"{n}.png") for n in ("plain", "same", "other"))
    assert torch.equal(plain, again)
    assert not torch.equal(plain, changed)


# ------------------------------------------------------------------------------------------- review (rv8)
def test_a_half_precision_vae_file_is_upcast_to_the_models_float32(tmp_path):
    """vae-ft-mse / sdxl-vae-fp16-fix ship float16 files: the VAE runs in float32 (kohya's
    ``--no_half_vae``; SDXL's VAE overflows in float16), holding exactly the file's values."""
    source = _tiny_vae(1)
    half = {k: v.half() for k, v in _ldm(source, prefix=False).items()}
    save_file(half, tmp_path / "vae-fp16.safetensors")
    loaded = load_vae(tmp_path / "vae-fp16.safetensors", like=_tiny_vae(0))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    want = {k: v.half().float() for k, v in source.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)


def test_a_whole_diffusers_model_in_one_file_gives_its_vae_part(tmp_path):
    source = _tiny_vae(1)
    state = {**{f"vae.{k}": v.contiguous() for k, v in source.state_dict().items()},
             "unet.conv_in.weight": torch.zeros(8, 4, 3, 3), "text_encoder.text_model.final_layer_norm.weight": torch.ones(8)}
    save_file(state, tmp_path / "whole.safetensors")
    loaded = load_vae(tmp_path / "whole.safetensors", like=_tiny_vae(0))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_vae_holding_nan_is_refused_naming_the_file(tmp_path):
    state = _ldm(_tiny_vae(1), prefix=False)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].clone()
    state["decoder.conv_out.weight"].view(-1)[5] = float("nan")
    save_file(state, tmp_path / "nan-vae.safetensors")
    with pytest.raises(WeightFileError, match=r"nan-vae\.safetensors.*NaN or inf.*decoder\.conv_out\.weight"):
        load_vae(tmp_path / "nan-vae.safetensors", like=_tiny_vae(0))


def test_an_ldm_training_checkpoint_drops_its_ema_and_loss_entries(tmp_path):
    """The un-pruned vae-ft-mse-840000.ckpt also holds ``model_ema.*`` bookkeeping and the GAN loss."""
    source = _tiny_vae(1)
    state = {**_ldm(source, prefix=False), "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
             "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "vae-ft-mse.ckpt")
    loaded = load_vae(tmp_path / "vae-ft-mse.ckpt", like=_tiny_vae(0))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_vae_identity_is_kohyas_name_and_hashes(tmp_path):
    """kohya: ``ss_vae_name = os.path.basename(args.vae)``; ``ss_vae_hash``: sha256 of the 64 KiB at
    offset 1 MiB, 8 hex digits (train_util.model_hash); ``ss_new_vae_hash``: sha256 of the file."""
    import hashlib
    import os

    from sdadapt.formats.vae_file import vae_identity

    data = torch.randint(0, 256, (3 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "0123abcd").write_bytes(data)  # a hub cache: the named file is a link to a blob
    os.symlink(tmp_path / "blobs" / "0123abcd", tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors")
    identity = vae_identity(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors")
    assert identity["name"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert identity["legacy"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert identity["sha256"] == hashlib.sha256(data).hexdigest()
    _tiny_vae(1).save_pretrained(tmp_path / "sdxl-vae-fp16-fix")  # a folder: its name; the hashes of its weights file
    folder = vae_identity(f"{tmp_path / 'sdxl-vae-fp16-fix'}{os.sep}")
    weights = (tmp_path / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert folder["name"] == "sdxl-vae-fp16-fix" and folder["sha256"] == hashlib.sha256(weights).hexdigest()


def test_a_diffusers_file_with_1x1_conv_attention_weights_is_read_as_linear(tmp_path):
    """Some LDM -> diffusers conversions keep the mid-block attention as (C, C, 1, 1) convolutions."""
    source = _tiny_vae(1)
    state = {k: (v[:, :, None, None] if ".attentions." in k and k.endswith("weight") and v.dim() == 2 else v).contiguous()
             for k, v in source.state_dict().items()}
    assert any(v.dim() == 4 and ".attentions." in k for k, v in state.items())
    save_file(state, tmp_path / "conv-attention.safetensors")
    loaded = load_vae(tmp_path / "conv-attention.safetensors", like=_tiny_vae(0))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_the_new_vae_is_in_eval_mode_on_the_models_device(tmp_path):
    path = _write_layout(_tiny_vae(1), tmp_path, "ldm")
    like = _tiny_vae(0).to("meta")  # (a device other than the file's CPU tensors, without an accelerator)
    loaded = load_vae(path, like=like)
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert not loaded.training and all(not m.training for m in loaded.modules())


def test_a_full_safetensors_checkpoint_reads_only_its_vae_tensors(tmp_path, monkeypatch):
    """An SDXL checkpoint is ~7 GB: ``--vae`` on it reads the ``first_stage_model.*`` tensors only."""
    from sdadapt.formats import files, vae_file

    path = _write_layout(_tiny_vae(1), tmp_path, "full-checkpoint")
    asked: list[str] = []
    real = files.read_safetensors_tensors

    def spy(file, keys):
        asked.extend(keys)
        return real(file, keys)

    def whole(*args, **kwargs):
        raise AssertionError("the whole checkpoint was read")

    monkeypatch.setattr(vae_file, "read_safetensors_tensors", spy)
    monkeypatch.setattr(vae_file, "read_weights", whole)
    load_vae(path, like=_tiny_vae(0), architecture="sd1")
    assert asked and all(k.startswith("first_stage_model.") for k in asked)


@pytest.mark.parametrize("kind", ["lora", "unet-diffusers", "unet-ldm"])
def test_a_lora_or_unet_file_given_as_vae_is_refused_naming_it(tmp_path, kind):
    states = {
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
        "unet-diffusers": {"conv_in.weight": torch.zeros(8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
        "unet-ldm": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
    }
    save_file(states[kind], tmp_path / f"{kind}.safetensors")
    expected = r"no VAE weights found" if kind != "unet-ldm" else r"a Stable Diffusion checkpoint without a VAE"
    with pytest.raises(WeightFileError, match=rf"--vae .*{kind}\.safetensors: {expected}"):
        load_vae(tmp_path / f"{kind}.safetensors", like=_tiny_vae(0))


@pytest.mark.parametrize("value", [None, "x", [1], {"a": 1}])
def test_a_damaged_vae_config_is_refused_naming_the_file(tmp_path, value):
    _tiny_vae(1).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": value}))
    with pytest.raises(WeightFileError, match=r"--vae .*vae: its config\.json describes another VAE: scaling_factor"):
        load_vae(tmp_path / "vae", like=_tiny_vae(0))
