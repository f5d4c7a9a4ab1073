"""``generate`` on SD2 leaves Clip skip unapplied, as A1111 (``sd_hijack_open_clip.py`` never reads the setting, yet
writes "Clip skip: 2" into the infotext) and ComfyUI (its SD2 states are OpenCLIP's penultimate layer already);
SD1 applies it. ``train --clip-skip`` keeps kohya's use on SD2 (tests/test_text_conditioning_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from test_cli_train import _tiny_pipeline

from sdadapt.images import read_image
from sdadapt.jobs.generate import run_generate


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    root = _tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipe")
    if request.param == "sd2":  # OpenCLIP-H as converted for SD2: gelu
        config_file = root / "text_encoder" / "config.json"
        config = json.loads(config_file.read_text())
        config["hidden_act"] = "gelu"
        config_file.write_text(json.dumps(config))
    return request.param, root


def test_clip_skip_changes_sd1_images_and_not_sd2_ones(model, tmp_path):
    kind, root = model
    pixels, lines = {}, []
    for skip in (1, 2):
        result = run_generate(prompt="a red circle", out=tmp_path / f"skip{skip}.png", model=str(root), steps=2,
                              width=16, height=16, seed=3, clip_skip=skip, device="cpu", log=lines.append)
        (file,) = result["files"]
        pixels[skip] = read_image(file)
        if skip == 2:
            assert "Clip skip: 2" in (tmp_path / "skip2.png").read_bytes().decode("latin-1")  # written as A1111 does
    noted = [line for line in lines if "--clip-skip 2: not applied on SD2" in line]
    if kind == "sd2":
        assert torch.equal(pixels[1], pixels[2]) and len(noted) == 1
    else:
        assert not torch.equal(pixels[1], pixels[2]) and not noted


def _te_lora(path, layer_indices, *, width: int = 32, inner: int = 64) -> None:
    """A kohya text-encoder LoRA on the given CLIP layers (q/k/v/out and fc1/fc2), random non-zero factors."""
    from safetensors.torch import save_file

    g, state = torch.Generator().manual_seed(0), {}
    for n in layer_indices:
        for module, (out, inp) in {"self_attn_q_proj": (width, width), "self_attn_out_proj": (width, width),
                                   "mlp_fc1": (inner, width), "mlp_fc2": (width, inner)}.items():
            name = f"lora_te_text_model_encoder_layers_{n}_{module}"
            state[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(state, path, {"ss_network_module": "networks.lora"})


def test_text_encoder_layers_past_sd2s_are_left_out_with_a_note(model, tmp_path):
    """ComfyUI's LoRA extraction writes OpenCLIP-H's layer 23 for SD2, which SD2 never reads (diffusers' and sdadapt's
    SD2 text encoder stops before it; A1111 and ComfyUI apply it to a layer whose output is unused, kohya skips it):
    left out on SD2 (here a 2-layer encoder, so layer 2 is "past"); on SD1 such a file is for another model."""
    kind, root = model
    with_past, without = tmp_path / "with_past.safetensors", tmp_path / "without.safetensors"
    _te_lora(with_past, [0, 2])
    _te_lora(without, [0])
    options = {"prompt": "a red circle", "model": str(root), "steps": 2, "width": 16, "height": 16, "seed": 3,
               "device": "cpu"}
    if kind == "sd1":
        with pytest.raises(ValueError, match="does not fit this model's text_encoder"):
            run_generate(out=tmp_path / "refused.png", loras=[str(with_past)], **options)
        return
    lines = []
    first = run_generate(out=tmp_path / "past.png", loras=[str(with_past)], log=lines.append, **options)
    second = run_generate(out=tmp_path / "plain.png", loras=[str(without)], **options)
    plain = run_generate(out=tmp_path / "none.png", **options)
    assert torch.equal(read_image(first["files"][0]), read_image(second["files"][0]))
    assert not torch.equal(read_image(first["files"][0]), read_image(plain["files"][0]))  # (the LoRA acts)
    assert any("(4 layers; 4 layers on text-encoder layers SD2 never reads, left out)" in line for line in lines), lines


def test_merge_lora_leaves_out_openclip_layer_23_on_an_sd2_file_without_it(tmp_path):
    """sdadapt's (and diffusers' reverse script's) SD2 files hold OpenCLIP-H's 23 layers SD2 reads; a LoRA with layer
    23 merges there as if that layer were absent (reported), and the rest exactly as without it."""
    import transformers
    from tiny_checkpoints import tiny_sd1_parts, write_single_file

    from sdadapt.formats.files import read_safetensors
    from sdadapt.loratools.bake import merge_loras_into_checkpoint

    parts = tiny_sd1_parts()
    torch.manual_seed(5)
    parts["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=23, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    base = write_single_file(parts, tmp_path / "sd2.safetensors", architecture="sd2")
    with_23, without = tmp_path / "with_23.safetensors", tmp_path / "without.safetensors"
    _te_lora(with_23, [0, 23], width=64, inner=128)
    _te_lora(without, [0], width=64, inner=128)
    report = merge_loras_into_checkpoint(base, [with_23], tmp_path / "a.safetensors")
    merge_loras_into_checkpoint(base, [without], tmp_path / "b.safetensors")
    merged, plain = read_safetensors(tmp_path / "a.safetensors")[0], read_safetensors(tmp_path / "b.safetensors")[0]
    original = read_safetensors(base)[0]
    assert merged.keys() == plain.keys() and all(torch.equal(merged[k], plain[k]) for k in merged)
    assert any(not torch.equal(merged[k], original[k]) for k in merged)
    assert sorted(report.unmatched) == sorted(f"with_23.safetensors: text_encoder:text_model.encoder.layers.23.{m}"
                                              for m in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))


def _tiny_sd2_file(path):
    import transformers
    from tiny_checkpoints import tiny_sd1_parts, write_single_file

    parts = tiny_sd1_parts()
    torch.manual_seed(5)
    parts["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    return write_single_file(parts, path, architecture="sd2")


_V_CONFIG = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
"""
_EPS_CONFIG = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085   # (v2-inference.yaml: no parameterization, LDM's eps)
"""


def test_a1111s_config_beside_an_sd2_file_gives_its_prediction(tmp_path, capsys):
    """A1111 builds a checkpoint from ``<stem>.yaml`` beside it (SD2-768-v files are shared with
    ``v2-inference-v.yaml`` copied so; EveryDream2 writes it): its ``parameterization`` is the prediction type."""
    from sdadapt.cli import main
    from sdadapt.formats.single_file import read_single_file

    path = _tiny_sd2_file(tmp_path / "model.safetensors")
    assert read_single_file(path).prediction_type == "epsilon"  # (nothing says v: the tiny UNet fails the weight test)
    (tmp_path / "model.yaml").write_text(_V_CONFIG)
    checkpoint = read_single_file(path)
    assert checkpoint.sidecar_config == tmp_path / "model.yaml" and checkpoint.prediction_type == "v_prediction"
    code = main(["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "folder"), "-q"])
    assert code == 0 and "v_prediction from model.yaml beside it" in capsys.readouterr().out
    import json

    scheduler = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    (tmp_path / "model.yaml").write_text(_EPS_CONFIG)
    assert read_single_file(path).prediction_type == "epsilon"
    (tmp_path / "model.yaml").write_text("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n"
                                         "    denoiser_config:\n      params:\n        scaling_config:\n"
                                         "          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    assert read_single_file(path).prediction_type == "v_prediction"  # (an SGM config: its denoiser scaling)
    (tmp_path / "model.yaml").write_text("something: else\n")  # (no model config: the file's own rules)
    assert read_single_file(path).sidecar_prediction_type is None and read_single_file(path).prediction_type == "epsilon"
