"""ComfyUI's own LoRA files (``diffusion_model.<LDM name>`` / ``text_encoders.clip_l.transformer.<CLIP name>``, as its
"Extract and Save Lora" node writes them): merged into a real checkpoint where ComfyUI's loader puts each delta
(checked against the checkpoint's own tensors plus ``up @ down``, a norm's ``diff`` / ``diff_b`` added as they
are), keys round-tripping exactly through kohya and back, SDXL's names, and a LoRA layer's bias delta refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdadapt.cli import main
from sdadapt.formats import detect_kind, load_lora
from sdadapt.formats.comfy_lora import from_comfy, is_comfy_lora_keys, to_comfy
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)


@pytest.fixture(scope="module")
def base_ldm(plain_sd, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("comfy") / "base.safetensors"
    assert main(["convert", str(plain_sd), "--to", "ldm", "-q", "-o", str(out)]) == 0
    return out


def _comfy_name(ldm_key: str) -> str | None:
    """A checkpoint key's module under ComfyUI's LoRA naming (its model's state-dict names), else ``None``."""
    for ldm, comfy in (("model.diffusion_model.", "diffusion_model."),
                       ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer.")):
        if ldm_key.startswith(ldm):
            return comfy + ldm_key[len(ldm):].rsplit(".", 1)[0]
    return None


def _extracted(base: dict, *, rank: int = 2, seed: int = 0) -> tuple[dict, dict]:
    """A file as ComfyUI's node lays it out with its defaults (bias_diff on): random factors for every UNet and
    text-encoder weight of two or more dimensions (the token and position tables too), each bias's delta as
    ``diff_b``, a norm's weight delta as ``diff``; and each checkpoint key's expected delta as ComfyUI's loader
    computes it (``up.flatten(1) @ down.flatten(1)``, alpha absent: scale 1; ``diff`` / ``diff_b`` as they are)."""
    g = torch.Generator().manual_seed(seed)
    file, deltas = {}, {}
    for key, weight in base.items():
        module = _comfy_name(key)
        if module is None or not key.endswith(".weight"):
            continue
        if weight.dim() >= 2:
            down = torch.randn(rank, *weight.shape[1:], generator=g) * 0.1
            up = torch.randn(weight.shape[0], rank, *([1] * (weight.dim() - 2)), generator=g) * 0.1
            file[f"{module}.lora_up.weight"], file[f"{module}.lora_down.weight"] = up, down
            deltas[key] = (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight.shape)
        else:  # (a norm: GroupNorm / LayerNorm)
            file[f"{module}.diff"] = torch.randn(weight.shape, generator=g) * 0.1
            deltas[key] = file[f"{module}.diff"].double()
        bias = key[:-len("weight")] + "bias"
        if bias in base:
            file[f"{module}.diff_b"] = torch.randn(base[bias].shape, generator=g) * 0.1
            deltas[bias] = file[f"{module}.diff_b"].double()
    return file, deltas


def test_merged_where_comfyuis_loader_puts_each_delta(base_ldm, tmp_path):
    base = load_file(base_ldm)
    file, deltas = _extracted(base)
    save_file(file, tmp_path / "comfy.safetensors")
    assert is_comfy_lora_keys(file) and detect_kind(list(file), {}) == "comfy-lora"
    components, _ = load_lora(tmp_path / "comfy.safetensors", layers_per_block=1)  # (the tiny UNet's)
    assert set(components) == {"unet", "text_encoder"}
    assert main(["merge-lora", str(base_ldm), str(tmp_path / "comfy.safetensors"), "--scale", "0.7", "-q",
                 "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == set(base)
    norms = sum(1 for key in deltas if key.endswith(".bias"))
    assert norms > 4 and len(deltas) > 60  # (every kind of layer: attention, resnets, convs, norms, CLIP)
    for key, value in merged.items():
        want = base[key].double() + 0.7 * deltas[key] if key in deltas else base[key].double()
        assert torch.allclose(value.double(), want, atol=1e-5), key


def test_keys_round_trip_exactly_through_kohya_and_back(base_ldm, tmp_path, capsys):
    from sdadapt.formats import from_kohya, to_kohya

    file, _ = _extracted(load_file(base_ldm), seed=1)
    components = from_comfy(file, layers_per_block=1)  # (the tiny UNet's: its LDM numbering has 2 per block)
    assert set(components) == {"unet", "text_encoder"}
    assert "conv_in.lora_up.weight" in components["unet"]
    assert "down_blocks.0.resnets.0.norm1.w_norm" in components["unet"]  # (a norm: LyCORIS' tensors)
    kohya = to_kohya(components, base_model="sd1")
    again = to_comfy(from_kohya(kohya), base_model="sd1", layers_per_block=1)
    assert set(again) == set(file) and all(torch.equal(again[k], file[k]) for k in file)
    save_file({k: v for k, v in file.items() if "input_blocks.2.0" not in k and "output_blocks" not in k
               and "input_blocks.3" not in k and "middle_block" not in k}, tmp_path / "c.safetensors")
    assert main(["convert", str(tmp_path / "c.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 0
    assert "max |ΔW| 0 " in capsys.readouterr().out  # (the names both layouts spell alike at 1 or 2 per block)
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "comfy", "-o", str(tmp_path / "c2.safetensors")]) == 0
    assert load_file(tmp_path / "c2.safetensors").keys() == load_file(tmp_path / "c.safetensors").keys()
    assert main(["inspect", str(tmp_path / "c.safetensors")]) == 0
    assert "kind:       comfy-lora" in capsys.readouterr().out


def test_sdxl_names_and_text_encoders():
    canonical = {
        "unet": {"up_blocks.0.upsamplers.0.conv.lora_up.weight": torch.zeros(1),
                 "up_blocks.1.upsamplers.0.conv.lora_up.weight": torch.zeros(1),
                 "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora_down.weight": torch.zeros(1),
                 "mid_block.resnets.1.conv2.alpha": torch.zeros(())},
        "text_encoder": {"text_model.encoder.layers.3.mlp.fc1.lora_up.weight": torch.zeros(1)},
        "text_encoder_2": {"text_model.encoder.layers.30.self_attn.out_proj.hada_w1_a": torch.zeros(1)},
    }
    flat = to_comfy(canonical, base_model="sdxl")
    assert set(flat) == {
        "diffusion_model.output_blocks.2.2.conv.lora_up.weight", "diffusion_model.output_blocks.5.2.conv.lora_up.weight",
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.lora_down.weight",
        "diffusion_model.middle_block.2.out_layers.3.alpha",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.lora_up.weight",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.30.self_attn.out_proj.hada_w1_a"}
    assert {c: set(s) for c, s in from_comfy(flat).items()} == {c: set(s) for c, s in canonical.items()}
    sd2 = to_comfy({"text_encoder": canonical["text_encoder"]}, base_model="sd2")
    assert list(sd2) == ["text_encoders.clip_h.transformer.text_model.encoder.layers.3.mlp.fc1.lora_up.weight"]
    with pytest.raises(ValueError, match="SDXL's"):
        to_comfy({"text_encoder_2": canonical["text_encoder_2"]}, base_model="sd1")
    assert not is_comfy_lora_keys(["diffusion_model.input_blocks.0.0.weight", "diffusion_model.out.2.bias"])


def test_a_lora_layers_bias_delta_merges_and_runs_as_merged():
    """A LoRA layer with a bias delta (diff_b, ComfyUI's bias_diff): injected, its output is the merged layer's —
    the bias moved by the strength alone, not by alpha / r — for a Linear and a Conv2d; kept by the file."""
    from torch import nn

    from sdadapt import apply_lora, load_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(1), nn.Linear(6 * 5 * 5, 3))
    state = {"0.lora_down.weight": torch.randn(2, 4, 3, 3), "0.lora_up.weight": torch.randn(6, 2, 1, 1),
             "0.alpha": torch.tensor(1.0), "0.diff_b": torch.randn(6),
             "2.lora_down.weight": torch.randn(2, 150), "2.lora_up.weight": torch.randn(3, 2), "2.diff_b": torch.randn(3)}
    x = torch.randn(2, 4, 5, 5)
    merged = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(1), nn.Linear(150, 3))
    merged.load_state_dict(model.state_dict())
    bias_before = merged[0].bias.detach().clone()
    apply_lora(merged, state, scale=0.7)
    assert torch.allclose(merged[0].bias, bias_before + 0.7 * state["0.diff_b"])
    handle = load_adapter(model, state)
    handle.set_scale(0.7)
    with torch.no_grad():
        assert torch.allclose(model(x), merged(x), atol=1e-4)
        handle.merge()  # (the injected adapters merged: the same layer again)
        assert torch.allclose(model(x), merged(x), atol=1e-4)
        handle.unmerge()
    assert torch.equal(handle.state_dict()["0.diff_b"], state["0.diff_b"])
    assert torch.equal(handle.state_dict()["2.diff_b"], state["2.diff_b"])


def test_generate_merges_a_text_encoder_tables_delta(plain_sd, tmp_path):  # noqa: F811
    """ComfyUI's extraction reaches the CLIP token and position tables (nn.Embedding): merged as their weights'
    deltas (apply_lora), undone after."""
    from transformers import CLIPTextModel

    from sdadapt import apply_lora

    encoder = CLIPTextModel.from_pretrained(plain_sd / "text_encoder")
    table = encoder.get_input_embeddings()  # (transformers 5 has no text_model level; the key names it anyway)
    before = table.weight.detach().clone()
    up, down = torch.randn(table.num_embeddings, 2), torch.randn(2, table.embedding_dim)
    applied = apply_lora(encoder, {"text_model.embeddings.token_embedding.lora_up.weight": up,
                                   "text_model.embeddings.token_embedding.lora_down.weight": down}, scale=0.5)
    assert torch.allclose(table.weight, before + 0.5 * up @ down, atol=1e-5)
    applied.undo()
    assert torch.equal(table.weight, before)


def test_block_weights_scale_the_bias_delta_and_refactoring_says_it_is_not_written():
    from sdadapt.adapters.registry import scale_file_tensors
    from sdadapt.loratools.resize import resize_lora_state

    layer = {"lora_down.weight": torch.randn(2, 8), "lora_up.weight": torch.randn(6, 2), "diff_b": torch.randn(6)}
    half = scale_file_tensors(layer, 0.5)
    assert torch.equal(half["diff_b"], layer["diff_b"] * 0.5) and torch.equal(half["lora_up.weight"],
                                                                              layer["lora_up.weight"] * 0.5)
    assert torch.equal(half["lora_down.weight"], layer["lora_down.weight"])
    state = {f"to_q.{k}": v for k, v in layer.items()}
    out, report = resize_lora_state(state, rank=1)
    assert report["to_q"].bias_dropped == pytest.approx(float(layer["diff_b"].norm()))
    assert set(out) == {"to_q.lora_down.weight", "to_q.lora_up.weight", "to_q.alpha"}


def test_comfyuis_zero_projection_of_clip_l_is_left_out():
    """ComfyUI's CLIP-L has an identity text_projection (the SD1 encoder has none): its extraction writes an
    all-zero LoRA there, which changes nothing and is left out; a non-zero one is kept (and refused on apply)."""
    layer = "text_encoders.clip_l.transformer.text_projection"
    q_proj = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    zero = {f"{layer}.lora_up.weight": torch.zeros(8, 2), f"{layer}.lora_down.weight": torch.zeros(2, 8),
            f"{q_proj}.lora_up.weight": torch.ones(8, 2), f"{q_proj}.lora_down.weight": torch.ones(2, 8)}
    assert set(from_comfy(zero)["text_encoder"]) == {"text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight",
                                                     "text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight"}
    moved = {**zero, f"{layer}.lora_up.weight": torch.ones(8, 2)}
    assert "text_projection.lora_up.weight" in from_comfy(moved)["text_encoder"]
    clip_g = {k.replace("clip_l", "clip_g"): v for k, v in zero.items()}  # (SDXL's second encoder has one)
    assert "text_projection.lora_up.weight" in from_comfy(clip_g)["text_encoder_2"]


def test_inspect_counts_the_layers_with_a_bias_delta(tmp_path, capsys):
    file = {"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1),
            "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
            "diffusion_model.input_blocks.1.1.proj_in.diff_b": torch.zeros(320),
            "diffusion_model.input_blocks.1.1.proj_out.lora_up.weight": torch.zeros(320, 2, 1, 1),
            "diffusion_model.input_blocks.1.1.proj_out.lora_down.weight": torch.zeros(2, 320, 1, 1)}
    save_file(file, tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "bias_deltas: 1" in out and "family:     lora" in out


def test_a_dora_layers_bias_delta_moves_the_bias_by_the_strength():
    """DoRA over a LoRA with a bias delta: the weight as DoRA's, the bias moved by the strength alone — injected,
    merged by apply_lora and merged by the handle, the same layer."""
    from torch import nn

    from sdadapt import apply_lora, load_adapter

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 6))
    state = {"0.lora_down.weight": torch.randn(2, 8), "0.lora_up.weight": torch.randn(6, 2),
             "0.dora_scale": torch.rand(6, 1) + 0.5, "0.diff_b": torch.randn(6)}
    merged = nn.Sequential(nn.Linear(8, 6))
    merged.load_state_dict(model.state_dict())
    bias_before = merged[0].bias.detach().clone()
    apply_lora(merged, state, scale=0.6)
    assert torch.allclose(merged[0].bias, bias_before + 0.6 * state["0.diff_b"])
    handle = load_adapter(model, state)
    handle.set_scale(0.6)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(model[0](x), merged[0](x), atol=1e-5)
        handle.merge()
        assert torch.allclose(model[0](x), merged[0](x), atol=1e-5)
