"""UNet module paths: LDM <-> diffusers by rule, kohya underscores, and kohya module counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdadapt.adapters import LoRAConfig, geometry_of
from sdadapt.formats.layers import underscore_to_path
from sdadapt.formats.unet_names import (
    attention_up_blocks,
    diffusers_to_ldm_unet,
    is_ldm_unet_path,
    ldm_to_diffusers_unet,
)
from sdadapt.targets import UNET_KOHYA, UNET_LOCON, select

from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sdxl

#: the public SD1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json)
SD15_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


@pytest.fixture(scope="module")
def sd15():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**SD15_CONFIG)


@pytest.fixture(scope="module")
def unets(sd15):
    return {"sd1": tiny_unet_sd1(), "sdxl": tiny_unet_sdxl(), "sd15": sd15}


def module_paths(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "sd15"])
def test_every_path_round_trips(layout, unets):
    unet = unets[layout]
    paths = module_paths(unet)
    up_attention = attention_up_blocks(paths)
    ldm_paths = {}
    for path in paths:
        ldm = diffusers_to_ldm_unet(path, up_blocks_with_attention=up_attention)
        if ldm is None:
            continue
        assert is_ldm_unet_path(ldm), (path, ldm)
        assert ldm_to_diffusers_unet(ldm) == path, (path, ldm)
        ldm_paths[path] = ldm
    # injective, and every layer with weights has an LDM name
    assert len(set(ldm_paths.values())) == len(ldm_paths)
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm)) and path:
            assert path in ldm_paths, path
    # and the LDM side round-trips back
    for path, ldm in ldm_paths.items():
        assert diffusers_to_ldm_unet(ldm_to_diffusers_unet(ldm), up_blocks_with_attention=up_attention) == ldm


@pytest.mark.parametrize("layers_per_block", [1, 3])
def test_round_trip_other_layers_per_block(layers_per_block):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            **{**SD15_CONFIG, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
               "norm_num_groups": 8, "layers_per_block": layers_per_block}
        )
    paths = module_paths(unet)
    up_attention = attention_up_blocks(paths)
    group = layers_per_block + 1
    mapped = 0
    for path in paths:
        ldm = diffusers_to_ldm_unet(path, layers_per_block=layers_per_block, up_blocks_with_attention=up_attention)
        if ldm is not None:
            assert ldm_to_diffusers_unet(ldm, layers_per_block=layers_per_block) == path
            mapped += 1
    assert mapped > 100
    last = layers_per_block - 1
    assert diffusers_to_ldm_unet(f"down_blocks.1.resnets.{last}", layers_per_block=layers_per_block) == (
        f"input_blocks.{1 + group + last}.0")
    assert diffusers_to_ldm_unet("down_blocks.0.downsamplers.0.conv", layers_per_block=layers_per_block) == (
        f"input_blocks.{group}.0.op")
    assert diffusers_to_ldm_unet(
        "up_blocks.1.upsamplers.0.conv", layers_per_block=layers_per_block, up_blocks_with_attention=up_attention
    ) == f"output_blocks.{group + layers_per_block}.2.conv"


@pytest.mark.parametrize("layout", ["sd1", "sd15"])
def test_sd1_default_upsampler_layout(layout, unets):
    paths = module_paths(unets[layout])
    up_attention = attention_up_blocks(paths)
    for path in paths:
        assert diffusers_to_ldm_unet(path) == diffusers_to_ldm_unet(path, up_blocks_with_attention=up_attention)


def test_attention_up_blocks(unets):
    assert attention_up_blocks(module_paths(unets["sd1"])) == {1}
    assert attention_up_blocks(module_paths(unets["sdxl"])) == {0}
    assert attention_up_blocks(module_paths(unets["sd15"])) == {1, 2, 3}


# ------------------------------------------------------------------------------------ known pairs


def _sd15_table() -> list[tuple[str, str]]:
    """(LDM, diffusers) pairs written out from FORMATS.md §1.1 for SD1.5."""
    pairs = [
        ("input_blocks.0.0", "conv_in"),
        ("middle_block.0", "mid_block.resnets.0"),
        ("middle_block.1", "mid_block.attentions.0"),
        ("middle_block.2", "mid_block.resnets.1"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ]
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0", f"down_blocks.{i}.resnets.{j}"))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0", f"up_blocks.{i}.resnets.{j}"))
            if i >= 1:
                pairs.append((f"output_blocks.{3 * i + j}.1", f"up_blocks.{i}.attentions.{j}"))
        if i in (1, 2):
            pairs.append((f"output_blocks.{3 * i + 2}.2.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    # resnet internals and attention internals (identical names inside attention blocks)
    for ldm_inner, diffusers_inner in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
    ]:
        pairs.append((f"input_blocks.1.0.{ldm_inner}", f"down_blocks.0.resnets.0.{diffusers_inner}"))
        pairs.append((f"middle_block.2.{ldm_inner}", f"mid_block.resnets.1.{diffusers_inner}"))
        pairs.append((f"output_blocks.11.0.{ldm_inner}", f"up_blocks.3.resnets.2.{diffusers_inner}"))
    pairs += [
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
        ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
        ("input_blocks.8.1.transformer_blocks.0.attn2.to_k", "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k"),
        ("middle_block.1.transformer_blocks.0.ff.net.0.proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("output_blocks.3.1.proj_out", "up_blocks.1.attentions.0.proj_out"),
        ("output_blocks.11.1.transformer_blocks.0.attn1.to_out.0", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"),
    ]
    return pairs


SD15_PAIRS = _sd15_table()


def test_sd15_table_size():
    # 1 + 3 + 2 + 2 + 1 | 8 resnets + 6 attentions + 3 downsamplers | 12 + 9 + 2 | 15 + 9 internals
    assert len(SD15_PAIRS) == 9 + 8 + 6 + 3 + 12 + 9 + 2 + 15 + 7


@pytest.mark.parametrize("ldm, diffusers_path", SD15_PAIRS)
def test_sd15_known_pairs(ldm, diffusers_path, sd15):
    live = dict(sd15.named_modules())
    assert diffusers_path in live, diffusers_path
    up_attention = attention_up_blocks(live)
    assert diffusers_to_ldm_unet(diffusers_path, up_blocks_with_attention=up_attention) == ldm
    assert diffusers_to_ldm_unet(diffusers_path) == ldm  # SD1 default layout
    assert ldm_to_diffusers_unet(ldm) == diffusers_path


def test_sd15_attention_blocks_are_the_sixteen(sd15):
    """FORMATS §1.1: input_blocks 1,2,4,5,7,8; middle_block.1; output_blocks 3..11 are attention."""
    live = dict(sd15.named_modules())
    ldm_attention = sorted(
        diffusers_to_ldm_unet(n)
        for n, m in live.items()
        if type(m).__name__ == "Transformer2DModel"
    )
    expected = sorted(
        [f"input_blocks.{k}.1" for k in (1, 2, 4, 5, 7, 8)]
        + ["middle_block.1"]
        + [f"output_blocks.{k}.1" for k in range(3, 12)]
    )
    assert ldm_attention == expected


@pytest.mark.parametrize(
    "ldm, diffusers_path",
    [
        ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),  # block 0 has attention in SDXL
        ("output_blocks.5.0.skip_connection", "up_blocks.1.resnets.2.conv_shortcut"),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("middle_block.1.transformer_blocks.1.attn2.to_v", "mid_block.attentions.0.transformer_blocks.1.attn2.to_v"),
    ],
)
def test_sdxl_tiny_known_pairs(ldm, diffusers_path, unets):
    live = dict(unets["sdxl"].named_modules())
    assert diffusers_path in live
    assert diffusers_to_ldm_unet(diffusers_path, up_blocks_with_attention=attention_up_blocks(live)) == ldm
    assert ldm_to_diffusers_unet(ldm) == diffusers_path


@pytest.mark.parametrize(
    "path",
    ["encoder.layers.0.self_attn.q_proj", "text_model.final_layer_norm", "foo.bar", "down_blocks.0",
     "down_blocks.0.resnets", "mid_block", "up_blocks.0.upsamplers.0", "down_blocks.0.resnets.0.nonlinearity"],
)
def test_non_unet_paths_map_to_none(path):
    assert diffusers_to_ldm_unet(path) is None
    assert not is_ldm_unet_path(path)


@pytest.mark.parametrize("path", ["input_blocks.1.0.in_layers.1", "foo", "output_blocks", "middle_block.7"])
def test_ldm_paths_without_equivalent_map_to_none(path):
    assert ldm_to_diffusers_unet(path) is None


# ------------------------------------------------------------------------------------ underscores


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "sd15"])
def test_underscore_to_path_unet(layout, unets):
    paths = module_paths(unets[layout])
    up_attention = attention_up_blocks(paths)
    ldm = [diffusers_to_ldm_unet(p, up_blocks_with_attention=up_attention) for p in paths]
    wrong = [p for p in paths + [p for p in ldm if p] if underscore_to_path(p.replace(".", "_")) != p]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("with_projection", [False, True])
def test_underscore_to_path_clip(with_projection):
    clip = tiny_clip(with_projection=with_projection)
    from transformers_versions import CLIP_TEXT_MODEL

    # transformers-4 paths, as in kohya files (transformers 5's CLIPTextModel lacks the text_model level)
    prefix = "" if with_projection or CLIP_TEXT_MODEL else "text_model."
    paths = [prefix + p for p in module_paths(clip)]
    assert "text_model.encoder.layers.1.self_attn.out_proj" in paths
    wrong = [p for p in paths if underscore_to_path(p.replace(".", "_")) != p]
    assert not wrong, wrong[:10]


def test_underscore_to_path_kohya_examples():
    assert underscore_to_path("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert underscore_to_path("input_blocks_4_1_transformer_blocks_0_attn1_to_q") == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert underscore_to_path("text_model_encoder_layers_11_mlp_fc2") == "text_model.encoder.layers.11.mlp.fc2"
    assert underscore_to_path("up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0") == (
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0")


# ------------------------------------------------------------------------------------ kohya counts


def test_sd15_kohya_default_count_is_192(sd15):
    chosen = select(sd15, UNET_KOHYA)
    assert len(chosen) == 192  # FORMATS §1.2: 16 attention blocks x 12 layers
    per_block: dict[str, int] = {}
    for name, _ in chosen:
        block = name.split(".transformer_blocks.")[0].rsplit(".proj_", 1)[0]
        per_block[block] = per_block.get(block, 0) + 1
    assert len(per_block) == 16 and set(per_block.values()) == {12}
    # SD1: proj_in/proj_out are 1x1 convs, the rest Linear
    assert sum(isinstance(m, nn.Conv2d) for _, m in chosen) == 32
    assert all(m.kernel_size == (1, 1) for _, m in chosen if isinstance(m, nn.Conv2d))


def test_sd15_locon_count_is_278(sd15):
    chosen = select(sd15, UNET_LOCON)
    assert len(chosen) == 278  # FORMATS §1.2: kohya with conv_dim
    kohya = {n for n, _ in select(sd15, UNET_KOHYA)}
    extra = [n for n, _ in chosen if n not in kohya]
    resnets = {n.rsplit(".", 1)[0] for n in extra if ".resnets." in n}
    assert len(resnets) == 22
    assert sum(n.endswith(".conv_shortcut") for n in extra) == 14  # 2 down (channel change) + 12 up (concat)
    assert sum(n.endswith(".time_emb_proj") for n in extra) == 22
    assert sum("samplers" in n for n in extra) == 6
    # ranks: 228 layers at network_dim (Linear / 1x1), 50 at conv_dim (3x3: 22 resnets x 2 + 3 down + 3 up)
    config = LoRAConfig(rank=4, conv_rank=8)
    ranks = [config.rank_alpha_for(geometry_of(m, name=n))[0] for n, m in chosen]
    assert ranks.count(4) == 228 and ranks.count(8) == 50


def test_paths_with_a_mangled_index_are_not_unet_paths():
    # diffusers 0.34's save_lora_adapter deletes ".<adapter name>" from keys: adapter "a" writes "down_blocks.1ttentions"
    from sdadapt.formats.unet_names import attention_up_blocks, diffusers_to_ldm_unet, ldm_to_diffusers_unet

    for path in ("down_blocks.1ttentions.0.transformer_blocks.0ttn1.to_q", "up_blocks.x.resnets.0.conv1",
                 "down_blocks.0.resnets.y.conv1", "mid_block.resnets.z.conv1"):
        assert diffusers_to_ldm_unet(path) is None, path
    assert ldm_to_diffusers_unet("input_blocks.x.1.proj_in") is None
    assert attention_up_blocks(["up_blocks.1ttentions.0.proj_in", "up_blocks.2.attentions.0.proj_in"]) == {2}
