"""Block maps (SD1/SD2 26, SDXL 20) on LDM and diffusers keys, parsing, LoRA block weights."""

from __future__ import annotations

import collections

import pytest
import torch

from sdadapt.merge.blocks import (
    BLOCKS_SD,
    BLOCKS_SDXL,
    block_alpha_fn,
    diffusers_block,
    ldm_block,
    parse_block_weights,
)
from sdadapt.loratools.block_weights import lora_block_weights
from sdadapt.loratools.combine import layer_delta

pytest.importorskip("diffusers")
from merge_layouts import layout  # noqa: E402

U = "model.diffusion_model."


def test_parse_block_weights_forms():
    w26 = ",".join(str(i / 25) for i in range(26))
    parsed = parse_block_weights(w26, architecture="sd1")
    assert list(parsed) == list(BLOCKS_SD) and parsed["BASE"] == 0.0 and parsed["OUT11"] == 1.0
    parsed = parse_block_weights([0.5] * 25, architecture="sd2", base_alpha=0.1)
    assert parsed["BASE"] == 0.1 and parsed["IN00"] == 0.5
    xl = parse_block_weights(list(range(20)), architecture="sdxl")
    assert list(xl) == list(BLOCKS_SDXL) and xl["M00"] == 10 and xl["OUT08"] == 19
    reduced = parse_block_weights(list(range(26)), architecture="sdxl")  # supermerger's SD1 -> XL reduction
    assert reduced["IN08"] == 9 and reduced["M00"] == 13 and reduced["OUT00"] == 14 and reduced["OUT08"] == 22
    with pytest.raises(ValueError, match="base_alpha"):
        parse_block_weights([1.0] * 25, architecture="sd1")
    with pytest.raises(ValueError, match="give 26 values .* with BASE first$"):  # (no base_alpha: 25 do not fit)
        parse_block_weights([1.0] * 20, architecture="sd1")
    with pytest.raises(ValueError, match=r"or 25 without BASE \(base_alpha given\)"):
        parse_block_weights([1.0] * 20, architecture="sd1", base_alpha=0.5)
    with pytest.raises(ValueError, match="numbers"):
        parse_block_weights("0,one", architecture="sd1")


def test_sd1_ldm_blocks_follow_the_documented_policy():
    keys = layout("sd1-unet")
    blocks = {k: ldm_block(k, architecture="sd1") for k in keys}
    assert None not in blocks.values()
    assert set(blocks.values()) == set(BLOCKS_SD)  # every block is used
    assert blocks[U + "time_embed.0.weight"] == "IN00"
    assert blocks[U + "input_blocks.0.0.weight"] == "IN00"
    assert blocks[U + "out.2.weight"] == "OUT11" and blocks[U + "out.0.bias"] == "OUT11"
    assert blocks[U + "middle_block.1.proj_in.weight"] == "M00"
    assert blocks[U + "input_blocks.4.1.proj_in.weight"] == "IN04"
    assert blocks[U + "output_blocks.11.1.proj_out.weight"] == "OUT11"
    assert {k for k, b in blocks.items() if b == "IN03"} == {U + "input_blocks.3.0.op.weight", U + "input_blocks.3.0.op.bias"}
    assert all(b == "BASE" for k, b in blocks.items() if not k.startswith(U))
    assert ldm_block("model_ema.diffusion_modelinput_blocks11", architecture="sd1") is None  # EMA: reported


def test_sdxl_ldm_blocks():
    keys = layout("sdxl-unet")
    blocks = {k: ldm_block(k, architecture="sdxl") for k in keys}
    assert None not in blocks.values() and set(blocks.values()) == set(BLOCKS_SDXL)
    assert blocks[U + "label_emb.0.0.weight"] == "IN00" and blocks[U + "time_embed.2.bias"] == "IN00"
    assert blocks[U + "out.2.weight"] == "OUT08"
    assert blocks[U + "output_blocks.2.2.conv.weight"] == "OUT02"  # the upsampler of an attention block
    assert blocks[U + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == "IN07"
    counts = collections.Counter(blocks.values())
    assert counts["IN03"] == 2 and counts["IN06"] == 2  # downsamplers only
    assert ldm_block(U + "input_blocks.10.0.in_layers.2.weight", architecture="sdxl") is None  # no IN10 in SDXL


@pytest.mark.parametrize("name, arch", [("sd1-unet", "sd1"), ("sdxl-unet", "sdxl")])
def test_diffusers_keys_get_the_blocks_of_their_ldm_names(name, arch):
    from sdadapt.formats.model_keys import key_plan

    diffusers = layout(name, "diffusers")
    plan, report = key_plan(diffusers, to="ldm", architecture=arch)
    assert report.ok
    pairs = [(ldm, src.keys[0]) for ldm, src in plan.items() if len(src.keys) == 1]
    assert len(pairs) > 300
    for ldm, diff in pairs:
        assert diffusers_block(diff, architecture=arch) == ldm_block(ldm, architecture=arch), (ldm, diff)


def test_block_alpha_fn_reports_unknown_keys_with_base_weight():
    weights = parse_block_weights([0.25] + [1.0] * 25, architecture="sd1")
    alpha = block_alpha_fn(weights, architecture="sd1", naming="ldm")
    assert alpha(U + "input_blocks.1.1.proj_in.weight") == (1.0, "IN01")
    assert alpha("first_stage_model.decoder.conv_in.weight") == (0.25, "BASE")
    assert alpha(U + "some_new_layer.weight") == (0.25, None)


def _lora(out, inp, r, seed):
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(r, inp, generator=g), "lora_up.weight": torch.randn(out, r, generator=g),
            "alpha": torch.tensor(float(r) / 2)}


def test_lora_block_weights_scale_each_layer_delta_by_its_block():
    # SD1 LoRA layer names are diffusers paths; the expected slots are written out by hand
    layers = {
        ("unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"): "IN02",
        ("unet", "down_blocks.2.attentions.0.proj_in"): "IN07",
        ("unet", "mid_block.attentions.0.proj_out"): "M00",
        ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"): "OUT05",
        ("unet", "up_blocks.3.attentions.0.proj_out"): "OUT09",
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): "BASE",
    }
    state: dict[str, dict[str, torch.Tensor]] = {}
    for i, (component, layer) in enumerate(layers):
        for name, t in _lora(6, 5, 2, i).items():
            state.setdefault(component, {})[f"{layer}.{name}"] = t
    vector = [1.0] * 26
    value = {"BASE": 0.0, "IN02": 0.5, "IN07": -1.0, "M00": 2.0, "OUT05": 0.25, "OUT09": 1.5}
    for block, v in value.items():
        vector[BLOCKS_SD.index(block)] = v
    before = {c: {k: v.clone() for k, v in s.items()} for c, s in state.items()}
    scaled = lora_block_weights(state, vector)
    for (component, layer), block in layers.items():
        def delta(s):
            return layer_delta({k[len(layer) + 1 :]: v for k, v in s[component].items() if k.startswith(layer + ".")})
        assert torch.allclose(delta(scaled), value[block] * delta(before), atol=1e-6), (layer, block)
    assert all(torch.equal(state[c][k], before[c][k]) for c in state for k in state[c])  # input untouched


def test_lora_block_weights_sdxl_ldm_names_and_short_vectors():
    state = {"unet": {}}
    for i, layer in enumerate(["input_blocks.4.1.proj_in", "output_blocks.0.1.proj_out", "input_blocks.1.0.in_layers.2"]):
        for name, t in _lora(4, 4, 2, i).items():
            state["unet"][f"{layer}.{name}"] = t
    # 12 values: BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05
    vector = [1, 0.5, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1]
    scaled = lora_block_weights(state, vector)
    up = "lora_up.weight"
    assert torch.allclose(scaled["unet"][f"input_blocks.4.1.proj_in.{up}"], 0.5 * state["unet"][f"input_blocks.4.1.proj_in.{up}"])
    assert torch.allclose(scaled["unet"][f"output_blocks.0.1.proj_out.{up}"], 3 * state["unet"][f"output_blocks.0.1.proj_out.{up}"])
    # IN01 is not among the 12 slots: weight 1, tensor unchanged
    assert scaled["unet"][f"input_blocks.1.0.in_layers.2.{up}"] is state["unet"][f"input_blocks.1.0.in_layers.2.{up}"]
    with pytest.raises(ValueError, match="is for SD1/SD2"):
        lora_block_weights(state, [1.0] * 17, base_model="sdxl")
    with pytest.raises(ValueError, match="12 or 20"):
        lora_block_weights(state, [1.0] * 7)


def test_lora_block_weights_scale_every_linear_family_and_refuse_dora():
    """Block weights on a file state scale each family's delta exactly (its declared linear tensors);
    DoRA, whose merged weight is linear in none, is refused with a pointer to merge-lora."""
    from sdadapt.adapters.base import LayerGeometry
    from sdadapt.adapters.registry import FAMILIES, build_adapter, file_layer_delta

    vector = [1.0] * 26
    vector[2] = 0.3  # IN01
    for name, family in FAMILIES.items():
        layer, geometry = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", LayerGeometry(8, 6)  # IN01 on SD1
        base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        if family.module_type.adapts_norms:  # LyCORIS norm modules: a LayerNorm of the same block
            layer, geometry = layer.rsplit(".", 2)[0] + ".norm1", LayerGeometry(8, 8, norm="layer")
            base = torch.randn(8, generator=torch.Generator().manual_seed(0))
        for config in family.examples:
            module = build_adapter(config, geometry)
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            if module.uses_base_weight:
                module.init_from_base(base)
            tensors = {k: v.detach() for k, v in module.file_tensors().items()}
            state = {"unet": {f"{layer}.{k}": v for k, v in tensors.items()}}
            if not family.module_type.linear_keys:
                with pytest.raises(ValueError, match="not linear"):
                    lora_block_weights(state, vector)
                continue
            scaled = lora_block_weights(state, vector)["unet"]
            got, _ = file_layer_delta({k[len(layer) + 1:]: v for k, v in scaled.items()}, geometry, base_weight=base,
                                      dtype=torch.float64)
            want, _ = file_layer_delta(tensors, geometry, base_weight=base, scale=0.3, dtype=torch.float64)
            torch.testing.assert_close(got, want, msg=f"{name} {config}")
