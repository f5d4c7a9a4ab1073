"""Target presets and combinators on diffusers UNets, LDM-named UNets and CLIP text encoders."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdadapt import LoRAConfig, inject
from sdadapt.formats.unet_names import attention_up_blocks, diffusers_to_ldm_unet
from sdadapt.targets import (
    PRESETS,
    TEXT_ENCODER,
    UNET_ATTENTION,
    UNET_CROSS_ATTENTION_KV,
    UNET_KOHYA,
    UNET_LOCON,
    NoTargetsError,
    Target,
    by_name,
    by_regex,
    by_type,
    everything,
    select,
    select_outermost,
)

from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sdxl

UNET_PRESETS = {
    "UNET_ATTENTION": UNET_ATTENTION,
    "UNET_CROSS_ATTENTION_KV": UNET_CROSS_ATTENTION_KV,
    "UNET_KOHYA": UNET_KOHYA,
    "UNET_LOCON": UNET_LOCON,
}


def names(model: nn.Module, target) -> list[str]:
    return [n for n, _ in select(model, target)]


@pytest.fixture(scope="module")
def sd1():
    return tiny_unet_sd1()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_unet_sdxl()


# --- hand-derived expectations ----------------------------------------------------------------
# tiny SD1: attention blocks down_blocks.0.attentions.{0,1}, mid_block.attentions.0,
# up_blocks.1.attentions.{0,1,2} -> 6 blocks of 1 transformer block each.
# tiny SDXL: down_blocks.1.attentions.{0,1}, mid_block.attentions.0, up_blocks.0.attentions.{0,1,2}
# -> 6 blocks of 2 transformer blocks each (transformer_layers_per_block=(1, 2); mid uses the last).
# Per transformer block: attn1/attn2 x to_q/to_k/to_v/to_out.0 (8), ff.net.0.proj, ff.net.2;
# per attention block: proj_in, proj_out.
# Resnet layers (LoCon): conv1, time_emb_proj, conv2 (+ conv_shortcut when channels change):
#   down 0: 2x3 + downsampler 1 = 7; down 1: 2x3 + 1 shortcut = 7; mid: 2x3 = 6;
#   up 0: 3x(3+1) + upsampler 1 = 13; up 1: 3x(3+1) = 12            -> 45 in both layouts.
EXPECTED = {
    "sd1": {
        "UNET_ATTENTION": 6 * 8,
        "UNET_CROSS_ATTENTION_KV": 6 * 2,
        "UNET_KOHYA": 6 * (10 + 2),
        "UNET_LOCON": 6 * (10 + 2) + 45,
    },
    "sdxl": {
        "UNET_ATTENTION": 12 * 8,
        "UNET_CROSS_ATTENTION_KV": 12 * 2,
        "UNET_KOHYA": 12 * 10 + 6 * 2,
        "UNET_LOCON": 12 * 10 + 6 * 2 + 45,
    },
}
NEVER = ("conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2",
         "add_embedding.linear_1", "add_embedding.linear_2")


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_preset_counts_on_diffusers_unets(layout, preset, sd1, sdxl):
    unet = sd1 if layout == "sd1" else sdxl
    chosen = select(unet, UNET_PRESETS[preset])
    assert len(chosen) == EXPECTED[layout][preset]
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for _, m in chosen)
    assert not set(NEVER) & {n for n, _ in chosen}
    # the preset names work as strings too
    key = {"UNET_ATTENTION": "unet-attention", "UNET_CROSS_ATTENTION_KV": "unet-cross-kv",
           "UNET_KOHYA": "unet-kohya", "UNET_LOCON": "unet-locon"}[preset]
    assert PRESETS[key] is UNET_PRESETS[preset]
    assert names(unet, key) == [n for n, _ in chosen]


def test_preset_membership_sd1(sd1):
    kohya = set(names(sd1, UNET_KOHYA))
    locon = set(names(sd1, UNET_LOCON))
    attention = set(names(sd1, UNET_ATTENTION))
    kv = set(names(sd1, UNET_CROSS_ATTENTION_KV))
    tb = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert "down_blocks.0.attentions.0.proj_in" in kohya
    assert isinstance(sd1.get_submodule("down_blocks.0.attentions.0.proj_in"), nn.Conv2d)  # SD1: 1x1 conv
    assert {f"{tb}.attn2.to_k", f"{tb}.attn2.to_v"} <= kv
    assert f"{tb}.attn2.to_q" not in kv and f"{tb}.attn1.to_k" not in kv
    assert {f"{tb}.attn1.to_q", f"{tb}.attn1.to_out.0", f"{tb}.attn2.to_k"} <= attention
    assert f"{tb}.ff.net.0.proj" in kohya and f"{tb}.ff.net.0.proj" not in attention
    assert {"mid_block.attentions.0.proj_out", "up_blocks.1.attentions.2.proj_out"} <= kohya
    assert not any(".resnets." in n or "samplers" in n for n in kohya)
    assert {"down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
            "mid_block.resnets.1.time_emb_proj", "down_blocks.0.downsamplers.0.conv",
            "up_blocks.0.upsamplers.0.conv"} <= locon
    assert kv < attention < kohya < locon
    # no norms anywhere
    for n in locon:
        assert not isinstance(sd1.get_submodule(n), (nn.GroupNorm, nn.LayerNorm))


def test_preset_membership_sdxl(sdxl):
    kohya = set(names(sdxl, UNET_KOHYA))
    assert isinstance(sdxl.get_submodule("down_blocks.1.attentions.0.proj_in"), nn.Linear)  # SDXL: Linear
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in kohya
    assert not any(n.startswith("down_blocks.0.") for n in kohya)  # block 0 has no attention
    assert not any(n.startswith("add_embedding") for n in names(sdxl, UNET_LOCON))


# --- LDM-named UNets ----------------------------------------------------------------------------


def ldm_tree(unet: nn.Module, prefix: str = "") -> nn.Module:
    """An LDM/"compvis"-named copy of ``unet``'s leaf layers (optionally under ``prefix``)."""
    paths = [n for n, _ in unet.named_modules()]
    up_attention = attention_up_blocks(paths)
    root = nn.Module()
    for path, module in unet.named_modules():
        if not path or len(module._modules) > 0:
            continue
        ldm = diffusers_to_ldm_unet(path, up_blocks_with_attention=up_attention)
        if ldm is None:
            continue
        parent = root
        parts = (prefix + ldm).split(".")
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(parts[-1], copy.deepcopy(module))
    return root


LDM_ANCHORS = {
    "sd1": {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": nn.Linear,
        "input_blocks.1.1.proj_in": nn.Conv2d,
        "input_blocks.1.0.in_layers.2": nn.Conv2d,
        "input_blocks.1.0.in_layers.0": nn.GroupNorm,
        "input_blocks.1.0.emb_layers.1": nn.Linear,
        "input_blocks.3.0.op": nn.Conv2d,
        "input_blocks.4.0.skip_connection": nn.Conv2d,
        "middle_block.1.proj_in": nn.Conv2d,
        "middle_block.2.out_layers.3": nn.Conv2d,
        "output_blocks.2.1.conv": nn.Conv2d,
        "output_blocks.3.1.proj_out": nn.Conv2d,
        "output_blocks.5.1.transformer_blocks.0.attn2.to_v": nn.Linear,
        "input_blocks.0.0": nn.Conv2d,
        "out.2": nn.Conv2d,
        "time_embed.0": nn.Linear,
    },
    "sdxl": {
        "input_blocks.3.0.op": nn.Conv2d,
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q": nn.Linear,
        "input_blocks.4.1.proj_in": nn.Linear,
        "middle_block.1.transformer_blocks.1.ff.net.2": nn.Linear,
        "output_blocks.0.1.proj_out": nn.Linear,
        "output_blocks.2.2.conv": nn.Conv2d,
        "output_blocks.5.0.skip_connection": nn.Conv2d,
        "label_emb.0.0": nn.Linear,
        "out.2": nn.Conv2d,
    },
}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_presets_select_equivalent_modules_on_ldm_names(layout, prefix, sd1, sdxl):
    unet = sd1 if layout == "sd1" else sdxl
    tree = ldm_tree(unet, prefix)
    live = dict(tree.named_modules())
    for path, cls in LDM_ANCHORS[layout].items():
        assert isinstance(live[prefix + path], cls), path
    up_attention = attention_up_blocks([n for n, _ in unet.named_modules()])
    for preset_name, preset in UNET_PRESETS.items():
        expected = {prefix + diffusers_to_ldm_unet(n, up_blocks_with_attention=up_attention)
                    for n in names(unet, preset)}
        got = set(names(tree, preset))
        assert got == expected, (preset_name, sorted(got ^ expected)[:6])
        assert len(got) == EXPECTED[layout][preset_name]
    for never in ("input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "label_emb.0.0"):
        assert prefix + never not in set(names(tree, UNET_LOCON))


# --- text encoders --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_projection", [False, True])
def test_text_encoder_preset(with_projection):
    clip = tiny_clip(with_projection=with_projection)
    chosen = names(clip, TEXT_ENCODER)
    assert len(chosen) == 2 * 6  # 2 layers x q/k/v/out_proj + fc1/fc2
    from transformers_versions import CLIP_TEXT_MODEL

    root = "text_model." if with_projection else CLIP_TEXT_MODEL  # (transformers 5's CLIPTextModel has no text_model)
    assert hasattr(clip, "text_model") == bool(root)
    assert f"{root}encoder.layers.0.self_attn.q_proj" in chosen
    assert f"{root}encoder.layers.1.mlp.fc2" in chosen
    assert all(isinstance(clip.get_submodule(n), nn.Linear) for n in chosen)
    assert "text_projection" not in chosen
    assert not any("embeddings" in n or "norm" in n for n in chosen)
    assert names(clip, "text-encoder") == chosen
    with pytest.raises(NoTargetsError):
        select(clip, UNET_KOHYA)


# --- combinators ----------------------------------------------------------------------------------


def test_composition(sd1):
    all_names = [n for n, _ in sd1.named_modules() if n]
    attention, kv, kohya = (set(names(sd1, t)) for t in (UNET_ATTENTION, UNET_CROSS_ATTENTION_KV, UNET_KOHYA))
    assert set(names(sd1, UNET_ATTENTION & ~UNET_CROSS_ATTENTION_KV)) == attention - kv
    assert len(attention - kv) == 6 * 6
    assert set(names(sd1, UNET_ATTENTION | UNET_KOHYA)) == kohya
    assert set(names(sd1, UNET_KOHYA & by_type(nn.Conv2d))) == {n for n in kohya if "proj_" in n}
    assert set(names(sd1, ~~UNET_KOHYA)) == kohya
    assert set(names(sd1, ~UNET_KOHYA)) == set(all_names) - kohya
    assert set(names(sd1, everything)) == set(all_names)
    assert "UNET_KOHYA" in repr(UNET_KOHYA & ~by_name("x"))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_boolean_algebra_on_name_sets(data):
    pool = ["a", "a.b", "a.b.c", "a.d", "e", "e.f", "e.f.g", "h"]
    model = nn.Module()
    for path in pool:
        parent = model
        *head, last = path.split(".")
        for part in head:
            parent = parent._modules[part]
        parent.add_module(last, nn.Linear(1, 1) if last in ("c", "d", "g") else nn.Module())
    sets = [data.draw(st.frozensets(st.sampled_from(pool))) for _ in range(3)]
    a, b, c = (Target(lambda n, m, s=s: n in s, f"in{sorted(s)}") for s in sets)
    A, B, C = (set(s) for s in sets)
    everyone = set(pool)

    def chosen(target):
        return {n for n, m in model.named_modules() if n and target(n, m)}

    assert chosen(a & b) == A & B
    assert chosen(a | b) == A | B
    assert chosen(~a) == everyone - A
    assert chosen(~(a | b)) == chosen(~a & ~b)
    assert chosen(a & (b | c)) == chosen((a & b) | (a & c))
    assert chosen((a | by_type(nn.Linear)) & ~c) == (A | {"a.b.c", "a.d", "e.f.g"}) - C
    if A:
        assert set(names(model, a)) == A
    else:
        with pytest.raises(NoTargetsError):
            select(model, a)


class MyLinear(nn.Linear):
    pass


def test_by_name_by_regex_by_type(sd1):
    kv = set(names(sd1, UNET_CROSS_ATTENTION_KV))
    assert set(names(sd1, by_name("*attn2.to_k", "*attn2.to_v"))) == kv
    assert set(names(sd1, "*.attn2.to_k")) == {n for n in kv if n.endswith("to_k")}
    assert set(names(sd1, ["conv_in", "conv_out"])) == {"conv_in", "conv_out"}
    assert names(sd1, by_name("down_blocks.?.attentions.*.proj_in")) == [
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.1.proj_in"]
    # glob matches the whole name; regex searches
    assert names(sd1, by_regex(r"attn2\.to_[kv]$")) == names(sd1, UNET_CROSS_ATTENTION_KV)
    with pytest.raises(NoTargetsError):
        select(sd1, by_name("*attn2.to"))  # a glob must match the whole name
    assert set(names(sd1, by_regex(r"^up_blocks\.1\.attentions\.0\.proj"))) == {
        "up_blocks.1.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_out"}

    model = nn.Sequential(nn.Linear(2, 2), MyLinear(2, 2), nn.Conv2d(2, 2, 1), nn.ReLU())
    assert names(model, by_type(nn.Linear)) == ["0", "1"]
    assert names(model, by_type(MyLinear)) == ["1"]
    assert names(model, by_type(nn.Linear, nn.Conv2d)) == ["0", "1", "2"]
    with pytest.raises(ValueError):
        by_name()
    with pytest.raises(ValueError):
        by_type()


def test_no_targets_error_lists_module_names(sd1):
    with pytest.raises(NoTargetsError) as info:
        select(sd1, TEXT_ENCODER)
    message = str(info.value)
    assert "TEXT_ENCODER" in message
    assert "conv_in" in message and "time_embedding.linear_1" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(NoTargetsError, match="nothing_like_this|conv_in"):
        inject(sd1, by_name("nothing_like_this"), LoRAConfig(rank=2))
    assert not any("sdadapt" in n for n, _ in sd1.named_modules())


def test_adapters_are_never_selected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    handle = inject(model, by_type(nn.Linear), LoRAConfig(rank=1))
    assert "0.sdadapt.default" in dict(model.named_modules())
    assert names(model, everything) == ["0", "1"]
    assert names(model, by_regex("sdadapt") | by_type(nn.Linear)) == ["0", "1"]
    handle.remove()


def test_select_outermost_drops_modules_inside_a_selected_one(sd1):
    """The units checkpointing, FSDP sharding and fused-backward groups use: every selected module
    not inside another selected one, in module order; nothing selected is still an error."""
    blocks = by_regex(r"^(down_blocks\.\d+|down_blocks\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+)$")
    chosen = select(sd1, blocks)
    outer = select_outermost(sd1, blocks)
    assert [n for n, _ in outer] == [n for n, _ in chosen if not n.startswith("down_blocks.") or n.count(".") == 1]
    assert any(n.startswith("down_blocks.0.resnets.") for n, _ in chosen)  # the case that is dropped exists
    assert all(dict(chosen)[n] is m for n, m in outer)
    with pytest.raises(NoTargetsError):
        select_outermost(sd1, by_name("nothing_like_this"))
