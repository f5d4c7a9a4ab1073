"""``python -m sdadapt convert``: LoRA-family files and embeddings between formats, with the reported
round-trip error checked against a float64 reference computed here from the two files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdadapt.cli import main

_SD1_UNET = [  # (kohya name, out, in[, k]) — SD1 kohya files use diffusers paths
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 8, 8),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 8, 12),
    ("lora_unet_up_blocks_1_attentions_2_proj_out", 16, 16),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 8, 8, 3),  # LoCon
]
_SD1_TE = [("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 12, 12),
           ("lora_te_text_model_encoder_layers_1_mlp_fc1", 24, 12)]
_SDXL = [  # LDM UNet names, two text encoders
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 8, 8),
    ("lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_2", 16, 32),
    ("lora_unet_middle_block_1_proj_in", 16, 16),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0", 16, 16),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 12, 12),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc2", 16, 24),
]
_ALPHAS = (1.0, 2.5, 4.0, 3.0, 0.5, 2.0)


def _lora_file(path, layers, *, rank=4, dtype=torch.float32, seed=0, metadata=None):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, out, inp, *kernel) in enumerate(layers):
        k = kernel[0] if kernel else None
        r = rank if i % 2 == 0 else rank - 1  # two ranks: rank_pattern must carry them
        down = torch.randn(r, inp, k, k, generator=g) if k else torch.randn(r, inp, generator=g)
        up = torch.randn(out, r, 1, 1, generator=g) if k else torch.randn(out, r, generator=g)
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        state[f"{name}.alpha"] = torch.tensor(_ALPHAS[i % len(_ALPHAS)])
    save_file(state, str(path), metadata=metadata)
    return state


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _reported(out: str) -> float:
    match = re.search(r"max \|Δ[Wv]\| ([0-9.e+-]+)", out)
    assert match, out
    return float(match.group(1))


def _delta64(state: dict, name: str) -> torch.Tensor:
    down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
    alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
    return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def _diffusers_delta64(state: dict, config: dict, component: str, layer: str) -> torch.Tensor:
    down = state[f"{component}.{layer}.lora_A.weight"].double()
    up = state[f"{component}.{layer}.lora_B.weight"].double()
    short = layer.removeprefix("text_model.")
    alpha = config.get(f"{component}.alpha_pattern", {}).get(short, config[f"{component}.lora_alpha"])
    return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def test_kohya_sd1_to_diffusers_and_back_is_bit_exact(tmp_path, capsys):
    src = tmp_path / "style.safetensors"
    original = _lora_file(src, _SD1_UNET + _SD1_TE, metadata={"ss_network_dim": "4", "ss_training_comment": "hi",
                                                             "ss_base_model_version": "sd_v1"})
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    code, out, err = _run(capsys, "convert", src, "-o", diffusers_file, "--to", "diffusers")
    assert code == 0, err
    assert "6 layers" in out and _reported(out) == 0.0
    written = load_file(str(diffusers_file))
    from safetensors import safe_open

    with safe_open(str(diffusers_file), "pt") as handle:
        meta = handle.metadata()
    # the training metadata travels with the tensors (convert --to kohya brings it back: test_metadata_carry.py);
    # the kohya file's own sshs hashes do not
    assert meta["ss_training_comment"] == "hi" and not any(k.startswith("sshs_") for k in meta)
    config = json.loads(meta["lora_adapter_metadata"])
    # the diffusers file's scales, read with diffusers' rules, equal the kohya alphas
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    torch.testing.assert_close(_diffusers_delta64(written, config, "unet", layer),
                               _delta64(original, "lora_unet_" + layer.replace(".", "_")), rtol=0, atol=0)
    te = "text_model.encoder.layers.1.mlp.fc1"
    torch.testing.assert_close(_diffusers_delta64(written, config, "text_encoder", te),
                               _delta64(original, "lora_te_" + te.replace(".", "_")), rtol=0, atol=0)

    back = tmp_path / "back.safetensors"
    code, out, err = _run(capsys, "convert", diffusers_file, "-o", back, "--to", "kohya")
    assert code == 0, err
    assert "sd1 naming" in out and _reported(out) == 0.0
    again = load_file(str(back))
    assert set(again) == set(original)
    for key, value in original.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


def test_reported_delta_is_the_float64_difference_of_the_two_files(tmp_path, capsys):
    src = tmp_path / "a.safetensors"
    original = _lora_file(src, _SD1_UNET, seed=3, metadata={"ss_base_model_version": "sd_v1",
                                                         "ss_training_comment": "kept"})
    half = tmp_path / "half.safetensors"
    code, out, err = _run(capsys, "convert", src, "-o", half, "--to", "kohya", "--dtype", "fp16")
    assert code == 0, err
    written = load_file(str(half))
    assert written["lora_unet_up_blocks_1_attentions_2_proj_out.lora_down.weight"].dtype == torch.float16
    want = max(float((_delta64(written, name) - _delta64(original, name)).abs().max()) for name, *_ in _SD1_UNET)
    assert want > 0
    assert _reported(out) == pytest.approx(want, rel=5e-3)
    from safetensors import safe_open

    with safe_open(str(half), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_training_comment"] == "kept"  # ss_* stay in kohya


def test_sdxl_kohya_ldm_names_to_diffusers_and_back(tmp_path, capsys):
    src = tmp_path / "xl.safetensors"
    original = _lora_file(src, _SDXL, seed=1)  # no metadata: the naming tells SDXL
    mid = tmp_path / "xl_diffusers.safetensors"
    code, out, err = _run(capsys, "convert", src, "-o", mid, "--to", "diffusers")
    assert code == 0, err
    keys = load_file(str(mid))
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert any(k.startswith("text_encoder_2.") for k in keys)
    back = tmp_path / "xl_back.safetensors"
    code, out, err = _run(capsys, "convert", mid, "-o", back, "--to", "kohya")
    assert code == 0, err
    assert "sdxl naming" in out and _reported(out) == 0.0
    again = load_file(str(back))
    assert set(again) == set(original)
    assert all(torch.equal(again[k], v) for k, v in original.items())


def test_unet_only_diffusers_file_without_a_hint_asks_for_base_model(tmp_path, capsys):
    src = tmp_path / "u.safetensors"
    _lora_file(src, [("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 8, 8)])
    mid = tmp_path / "u_d.safetensors"
    assert _run(capsys, "convert", src, "-o", mid, "--to", "diffusers")[0] == 0
    code, _, err = _run(capsys, "convert", mid, "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 2 and "--base-model" in err and not (tmp_path / "k.safetensors").exists()
    code, _, err = _run(capsys, "convert", mid, "-o", tmp_path / "k.safetensors", "--to", "kohya", "--base-model", "sdxl")
    assert code == 0, err
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in load_file(str(tmp_path / "k.safetensors"))
    # a second transformer block per attention is SDXL's alone: no --base-model needed
    deep = tmp_path / "deep.safetensors"
    _lora_file(deep, [("lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q", 8, 8)])
    assert _run(capsys, "convert", deep, "-o", tmp_path / "deep_d.safetensors", "--to", "diffusers")[0] == 0
    code, out, err = _run(capsys, "convert", tmp_path / "deep_d.safetensors", "-o", tmp_path / "deep_k.safetensors",
                          "--to", "kohya")
    assert code == 0 and "sdxl naming" in out, err
    assert "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.alpha" in load_file(str(tmp_path / "deep_k.safetensors"))


def _nested_module(layers: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A module tree whose Linear/Conv2d layers sit at the given dotted paths (peft targets them)."""
    root = torch.nn.Module()
    for path, shape in layers.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        layer = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=1) if len(shape) == 3 else torch.nn.Linear(shape[1], shape[0])
        parent.add_module(leaf, layer)
    return root


def test_to_peft_folder_loads_in_real_peft_with_the_same_deltas(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    src = tmp_path / "s.safetensors"
    original = _lora_file(src, _SD1_UNET + _SD1_TE, seed=2, metadata={"ss_base_model_version": "sd_v1"})
    code, out, err = _run(capsys, "convert", src, "-o", tmp_path / "peft", "--to", "peft")
    assert code == 2 and "--component" in err  # two components, one peft model
    code, out, err = _run(capsys, "convert", src, "-o", tmp_path / "peft", "--to", "peft", "--component", "unet")
    assert code == 0, err
    assert "4 layers" in out and _reported(out) == 0.0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(config) - {"peft_type", "task_type"} <= fields
    shapes = {name.removeprefix("lora_unet_"): (out_, in_, *k) for name, out_, in_, *k in _SD1_UNET}
    paths = {}
    for name, shape in shapes.items():  # kohya underscores -> the live module path
        path = (name.replace("_", ".").replace("down.blocks", "down_blocks").replace("up.blocks", "up_blocks")
                .replace("transformer.blocks", "transformer_blocks").replace("to.q", "to_q").replace("to.k", "to_k")
                .replace("proj.out", "proj_out"))
        paths[path] = shape
    model = _nested_module(paths)
    wrapped = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft"))
    for path, shape in paths.items():
        module = wrapped.base_model.model.get_submodule(path)
        got = module.get_delta_weight("default").double().flatten(1)
        want = _delta64(original, "lora_unet_" + path.replace(".", "_"))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and back: a peft folder -> kohya (component unet) -> the same tensors
    back = tmp_path / "from_peft.safetensors"
    code, out, err = _run(capsys, "convert", tmp_path / "peft", "-o", back, "--to", "kohya")  # sd1: its layers tell
    assert code == 0, err
    again = load_file(str(back))
    for name, *_ in _SD1_UNET:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert torch.equal(again[f"{name}.{suffix}"], original[f"{name}.{suffix}"])


def _loha_file(path, *, dtype=torch.float16):
    g = torch.Generator().manual_seed(4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{name}.hada_w1_a": torch.randn(8, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 8, generator=g),
             f"{name}.hada_w2_a": torch.randn(8, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 8, generator=g)}
    state = {k: v.to(dtype) for k, v in state.items()}
    state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return state


def test_lycoris_families_keep_their_family_or_are_refused_with_the_reason(tmp_path, capsys):
    loha = tmp_path / "loha.safetensors"
    original = _loha_file(loha)
    code, out, err = _run(capsys, "convert", loha, "-o", tmp_path / "d.safetensors", "--to", "diffusers")
    assert code == 2 and "loha" in err and "--to kohya" in err and not (tmp_path / "d.safetensors").exists()
    code, out, err = _run(capsys, "convert", loha, "-o", tmp_path / "p", "--to", "peft")
    assert code == 0 and (tmp_path / "p" / "adapter_config.json").exists(), err  # (peft's LoHaConfig adapter)
    code, out, err = _run(capsys, "convert", loha, "-o", tmp_path / "same.safetensors", "--to", "kohya")
    assert code == 2 and "already a kohya" in err  # same format, nothing to change
    code, out, err = _run(capsys, "convert", loha, "-o", tmp_path / "f32.safetensors", "--to", "kohya", "--dtype", "fp32")
    assert code == 0, err
    assert "loha 1" in out and _reported(out) == 0.0
    again = load_file(str(tmp_path / "f32.safetensors"))
    assert set(again) == set(original)
    assert all(torch.equal(again[k], v.float()) for k, v in original.items())
    # a LoCon file (3x3 conv LoRA) goes to diffusers and back keeping its conv layer
    locon = tmp_path / "locon.safetensors"
    conv = _lora_file(locon, _SD1_UNET[3:], metadata={"ss_base_model_version": "sd_v1"})
    assert _run(capsys, "convert", locon, "-o", tmp_path / "ld.safetensors", "--to", "diffusers")[0] == 0
    code, out, err = _run(capsys, "convert", tmp_path / "ld.safetensors", "-o", tmp_path / "lk.safetensors", "--to", "kohya",
                          "--base-model", "sd1")  # a lone resnet conv does not tell SD1 from SDXL
    assert code == 0, err
    back = load_file(str(tmp_path / "lk.safetensors"))
    assert set(back) == set(conv) and all(torch.equal(back[k], v) for k, v in conv.items())


def test_refusals_exit_with_the_documented_codes(tmp_path, capsys):
    src = tmp_path / "s.safetensors"
    _lora_file(src, _SD1_UNET[:1], metadata={"ss_base_model_version": "sd_v1"})
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}, str(checkpoint))
    code, _, err = _run(capsys, "convert", checkpoint, "-o", tmp_path / "x.safetensors", "--to", "kohya")
    assert code == 2 and "checkpoint" in err and "--to ldm" in err  # a checkpoint converts --to diffusers|ldm
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "x.pt", "--to", "diffusers")
    assert code == 7 and ".safetensors" in err  # OUT of the wrong form
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "x.safetensors", "--to", "peft")
    assert code == 7 and "folder" in err
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "x.safetensors", "--to", "a1111")
    assert code == 2 and "embedding format" in err
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "exists.safetensors", "--to", "diffusers")
    assert code == 8 and (tmp_path / "exists.safetensors").read_bytes() == b"x"
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "c.safetensors", "--to", "diffusers", "--component", "unet")
    assert code == 2 and "--component" in err
    code, _, err = _run(capsys, "convert", src, "-o", tmp_path / "t.safetensors", "--to", "diffusers", "--token", "x")
    assert code == 2 and "--token" in err


def test_a1111_embedding_to_diffusers_and_back_keeps_vectors_and_token(tmp_path, capsys):
    vectors = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    src = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "my-style", "step": 500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, str(src))
    learned = tmp_path / "learned_embeds.safetensors"
    code, out, err = _run(capsys, "convert", src, "-o", learned, "--to", "diffusers")
    assert code == 0, err
    assert "'my-style'" in out and "3 vector(s)" in out and _reported(out) == 0.0
    state = load_file(str(learned))
    assert list(state) == ["my-style"] and torch.equal(state["my-style"], vectors)
    back = tmp_path / "renamed.pt"
    code, out, err = _run(capsys, "convert", learned, "-o", back, "--to", "a1111", "--token", "renamed")
    assert code == 0, err
    data = torch.load(str(back), weights_only=True)
    assert torch.equal(data["string_to_param"]["*"], vectors) and data["name"] == "renamed" and data["step"] == 500
    assert data["sd_checkpoint"] == "abc"
    code, out, err = _run(capsys, "convert", back, "-o", tmp_path / "again.pt", "--to", "a1111")
    assert code == 2 and "already" in err
    code, out, err = _run(capsys, "convert", back, "-o", tmp_path / "h.safetensors", "--to", "kohya", "--dtype", "fp16")
    assert code == 0, err
    half = load_file(str(tmp_path / "h.safetensors"))["emb_params"]
    assert half.dtype == torch.float16
    assert _reported(out) == pytest.approx(float((half.double() - vectors.double()).abs().max()), rel=5e-3)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sd_v1"
    code, out, err = _run(capsys, "convert", tmp_path / "h.safetensors", "-o", tmp_path / "d.safetensors", "--to", "diffusers")
    assert code == 0, err
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as handle:
        meta = handle.metadata()
        assert torch.equal(handle.get_tensor("h"), half)  # the trigger is the kohya file's stem
    assert not any(k.startswith(("ss_", "modelspec.")) for k in meta) and meta["sd_checkpoint"] == "abc"
    code, out, err = _run(capsys, "convert", back, "-o", tmp_path / "p", "--to", "peft")
    assert code == 2 and "embedding" in err


@pytest.mark.parametrize(("width", "version"), [(768, "sd_v1"), (1024, "sd_v2"), (2048, "sdxl")])
def test_kohya_target_tells_the_base_model_from_the_text_width(tmp_path, capsys, width, version):
    """Without metadata, the cross-attention's context width tells SD1 (768), SD2 (1024), SDXL (2048):
    an SD2 LoRA is not labelled SD1 (sdadapt's --network-weights would then refuse it on SD2)."""
    src = tmp_path / "w.safetensors"
    _lora_file(src, [("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 8, width)], rank=2)
    mid = tmp_path / "w_d.safetensors"
    assert _run(capsys, "convert", src, "-o", mid, "--to", "diffusers")[0] == 0
    code, _, err = _run(capsys, "convert", mid, "-o", tmp_path / "w_k.safetensors", "--to", "kohya")
    assert code == 0, err
    with safe_open(str(tmp_path / "w_k.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"].startswith(version)
        keys = set(handle.keys())
    assert any(k.startswith("lora_unet_output_blocks_" if version == "sdxl" else "lora_unet_up_blocks_1") for k in keys)
