"""Whole-checkpoint conversion diffusers -> LDM (and kohya's readers/writers) against transcriptions of the references.

tests/test_model_keys.py checks the LDM -> diffusers direction against diffusers' own (importable) single-file
converters. The other direction lives in scripts that are not part of the diffusers package, and kohya's
readers/writers are not installed; they are transcribed here (the logic, in the test only) and run on tiny
models with the real block layouts (their maps hard-code SD1/SD2's 4 and SDXL's 3 blocks):

- D1 huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951:
  scripts/convert_diffusers_to_original_stable_diffusion.py
- D2 huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951:scripts/convert_diffusers_to_original_sdxl.py
- K1 kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb:library/model_util.py
- K2 kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb:library/sdxl_model_util.py
- D3 huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951:src/diffusers/loaders/single_file_utils.py
  (``infer_diffusers_model_type``, imported)
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from sdadapt.formats.model_keys import (
    checkpoint_architecture,
    convert_checkpoint,
    diffusers_to_ldm,
    ldm_to_diffusers,
    split_components,
)
from sdadapt.formats.single_file import split_single_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


# ------------------------------------------------------------------ tiny models with the real block layouts


def _unet_sd(seed: int, *, linear: bool):
    """SD1 (1x1-conv proj_in) / SD2 (Linear proj_in) layout: 4 blocks, 2 layers, attention in down 0-2 / up 1-3."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, use_linear_projection=linear,
    ).eval()


def _unet_sdxl(seed: int):
    """SDXL layout: 3 blocks, attention in down 1-2 / up 0-1, depths (1, 2, 3), the text_time add-embedding."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), cross_attention_dim=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 8, norm_num_groups=4,
    ).eval()


def _vae(seed: int):
    """The SD VAE layout: 4 blocks of 2 resnets (the reverse scripts' maps hard-code it)."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=2,
    ).eval()


def _clip(seed: int, *, layers: int, act: str, projection: bool = False):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=layers, vocab_size=99,
        max_position_embeddings=7, hidden_act=act, projection_dim=8, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _file_spelling(model) -> dict[str, torch.Tensor]:
    """A component's tensors as diffusers' files spell them (``text_model.`` for a transformers-5 CLIPTextModel)."""
    state = model.state_dict()
    if isinstance(model, transformers.CLIPTextModel):
        state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def _models(arch: str) -> dict:
    if arch == "sd1":
        return {"unet": _unet_sd(0, linear=False), "vae": _vae(1), "text_encoder": _clip(2, layers=2, act="quick_gelu")}
    if arch == "sd2":  # 23 layers: D1 tells SD2 by text_model.encoder.layers.22 (D1:333)
        return {"unet": _unet_sd(0, linear=True), "vae": _vae(1), "text_encoder": _clip(2, layers=23, act="gelu")}
    return {"unet": _unet_sdxl(0), "vae": _vae(1), "text_encoder": _clip(2, layers=2, act="quick_gelu"),
            "text_encoder_2": _clip(3, layers=2, act="gelu", projection=True)}


@functools.cache
def _parts_and_ldm(arch: str) -> tuple[dict, dict]:
    """``({component: file-spelled state}, sdadapt's LDM state)`` of the tiny ``arch`` model (built once)."""
    parts = {name: _file_spelling(model) for name, model in _models(arch).items()}
    flat = {f"{c}.{k}": v for c, part in parts.items() for k, v in part.items()}
    return parts, diffusers_to_ldm(flat, architecture=arch)


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want))[:6], sorted(set(want) - set(got))[:6])
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


# ------------------------------------------------------------------ D1: SD1/SD2 diffusers -> LDM (transcribed)


def _d1_unet_maps():
    """D1:17-89 (unet_conversion_map, _resnet, _layer)."""
    top = [("time_embed.0.weight", "time_embedding.linear_1.weight"),
           ("time_embed.0.bias", "time_embedding.linear_1.bias"),
           ("time_embed.2.weight", "time_embedding.linear_2.weight"),
           ("time_embed.2.bias", "time_embedding.linear_2.bias"),
           ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
           ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
           ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
              ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return top, resnet, layer


def _convert_unet_by_maps(unet_state_dict, top, resnet, layer):
    """D1:92-109 convert_unet_state_dict (D2:135-152 is the same function over D2's maps)."""
    mapping = {k: k for k in unet_state_dict}
    for sd_name, hf_name in top:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in layer:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: unet_state_dict[k] for k, v in mapping.items()}


def _vae_map():
    """D1:116-150 vae_conversion_map (D2:121-154 is identical)."""
    out = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            out.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            out.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            out.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            out.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        out.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return out


def _reshape_weight_for_sd(w):
    """D1:171-176: HF linear (C, C) -> SD 1x1 conv (C, C, 1, 1)."""
    return w.reshape(*w.shape, 1, 1) if w.ndim != 1 else w


def _convert_vae_by_maps(vae_state_dict, attn):
    """D1:179-199 / D2:157-194 convert_vae_state_dict (the same body over their own attention names ``attn``):
    the VAE map, then ``attn`` inside the attentions, the mid attention's q/k/v/proj_out weights as 1x1 convs."""
    mapping = {k: k for k in vae_state_dict}
    for k, v in mapping.items():
        for sd_part, hf_part in _vae_map():
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new_state_dict = {v: vae_state_dict[k] for k, v in mapping.items()}
    for k, v in new_state_dict.items():
        for weight_name in ("q", "k", "v", "proj_out"):
            if f"mid.attn_1.{weight_name}.weight" in k:
                new_state_dict[k] = _reshape_weight_for_sd(v)
    return new_state_dict


def _d1_convert_vae(vae_state_dict):
    """D1:179-206 convert_vae_state_dict: the old ``query``/``key``/``value``/``proj_attn`` names, then the new
    ``to_q``... ones renamed (D1:196-205; their keys are not the reshaped ones: the two loops of D1 touch
    disjoint keys, so running them one after the other is D1's single loop)."""
    attn = [("norm.", "group_norm."), ("q.", "query."), ("k.", "key."), ("v.", "value."), ("proj_out.", "proj_attn.")]
    extra = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    new_state_dict = _convert_vae_by_maps(vae_state_dict, attn)
    keys_to_rename = {}
    for k in new_state_dict:
        for weight_name, real_weight_name in extra:
            if f"mid.attn_1.{weight_name}.weight" in k or f"mid.attn_1.{weight_name}.bias" in k:
                keys_to_rename[k] = k.replace(weight_name, real_weight_name)
    for k, v in keys_to_rename.items():
        if k in new_state_dict:
            new_state_dict[v] = _reshape_weight_for_sd(new_state_dict[k])
            del new_state_dict[k]
    return new_state_dict


_CODE2IDX = {"q": 0, "k": 1, "v": 2}


def _fuse_qkv(text_enc_dict, conversion):
    """D1:226-277 convert_text_enc_state_dict_v20 / D2:215-270 convert_openclip_text_enc_state_dict (same body
    over their own conversion lists): q, k, v concatenated along dim 0 into ``in_proj_*``, the rest relabelled."""
    protected = {re.escape(hf): sd for sd, hf in conversion}
    pattern = re.compile("|".join(protected.keys()))
    relabel = lambda key: pattern.sub(lambda m: protected[re.escape(m.group(0))], key)  # noqa: E731
    new_state_dict, weights, biases = {}, {}, {}
    for k, v in text_enc_dict.items():
        if k.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
            weights.setdefault(k[: -len(".q_proj.weight")], [None] * 3)[_CODE2IDX[k[-len("q_proj.weight")]]] = v
            continue
        if k.endswith((".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias")):
            biases.setdefault(k[: -len(".q_proj.bias")], [None] * 3)[_CODE2IDX[k[-len("q_proj.bias")]]] = v
            continue
        new_state_dict[relabel(k)] = v
    for k_pre, tensors in weights.items():
        new_state_dict[relabel(k_pre) + ".in_proj_weight"] = torch.cat(tensors)
    for k_pre, tensors in biases.items():
        new_state_dict[relabel(k_pre) + ".in_proj_bias"] = torch.cat(tensors)
    return new_state_dict


#: D1:214-225 textenc_conversion_lst (the SD2 text encoder gets a "transformer." prefix first, D1:337)
_D1_TEXT = [("resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
            (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
            ("ln_final.", "transformer.text_model.final_layer_norm."),
            ("token_embedding.weight", "transformer.text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "transformer.text_model.embeddings.position_embedding.weight")]


def _d1_checkpoint(parts):
    """D1:324-345 (the ``__main__`` assembly, without --half / saving)."""
    unet = {"model.diffusion_model." + k: v for k, v in _convert_unet_by_maps(parts["unet"], *_d1_unet_maps()).items()}
    vae = {"first_stage_model." + k: v for k, v in _d1_convert_vae(parts["vae"]).items()}
    text = parts["text_encoder"]
    if "text_model.encoder.layers.22.layer_norm2.bias" in text:  # D1:333 is_v20_model
        text = _fuse_qkv({"transformer." + k: v for k, v in text.items()}, _D1_TEXT)
        text = {"cond_stage_model.model." + k: v for k, v in text.items()}
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    return {**unet, **vae, **text}


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_ldm_files_are_diffusers_reverse_scripts_output(arch):
    """Every key, value and dtype of sdadapt's SD1/SD2 LDM state is what D1 writes (SD2: 23 layers, fused qkv,
    no text_projection / logit_scale — D1 writes none either)."""
    parts, ldm = _parts_and_ldm(arch)
    _assert_same(ldm, _d1_checkpoint(parts))


# ------------------------------------------------------------------ D2 / K2: SDXL diffusers -> LDM (transcribed)


def _d2_unet_maps():
    """D2:17-93: D1's maps with the label embedding, 3 blocks and SDXL's attention placement."""
    top, resnet, _ = _d1_unet_maps()
    top = top + [("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
                 ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
                 ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
                 ("label_emb.0.2.bias", "add_embedding.linear_2.bias")]
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(4):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i < 2:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))  # D2:85, applied after the line above
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return top, resnet, layer


def _d2_convert_vae(vae_state_dict):
    """D2:157-194: the new attention names only, reshaped to 1x1 convs."""
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    return _convert_vae_by_maps(vae_state_dict, attn)


#: D2:202-213 textenc_conversion_lst
_D2_TEXT = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
            (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
            ("ln_final.", "text_model.final_layer_norm."),
            ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight")]


def _d2_checkpoint(parts):
    """D2:325-343 (the ``__main__`` assembly): text_projection.weight (P, D) -> text_projection (D, P) by ``.T``."""
    unet = {"model.diffusion_model." + k: v for k, v in _convert_unet_by_maps(parts["unet"], *_d2_unet_maps()).items()}
    vae = {"first_stage_model." + k: v for k, v in _d2_convert_vae(parts["vae"]).items()}
    te1 = {"conditioner.embedders.0.transformer." + k: v for k, v in parts["text_encoder"].items()}
    te2 = {"conditioner.embedders.1.model." + k: v for k, v in _fuse_qkv(parts["text_encoder_2"], _D2_TEXT).items()}
    te2["conditioner.embedders.1.model.text_projection"] = te2.pop(
        "conditioner.embedders.1.model.text_projection.weight").T.contiguous()
    return {**unet, **vae, **te1, **te2}


def test_sdxl_ldm_file_is_diffusers_sdxl_script_output():
    """sdadapt's SDXL LDM state is D2's key for key: up_blocks.0's upsampler at ``output_blocks.2.2.conv`` (D2:85's
    rename of the ``.2.1.conv`` its block loop writes, diffusers PR #6933; sgm and kohya, K2:336, the same)."""
    parts, ldm = _parts_and_ldm("sdxl")
    _assert_same(ldm, _d2_checkpoint(parts))


def _k2_unet_map():
    """K2:299-380 make_unet_conversion_map: (sd prefix, hf prefix) pairs."""
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    out = []
    for sd, hf in layer:
        if "resnets" in hf:
            out += [(sd + sd_res, hf + hf_res) for sd_res, hf_res in resnet]
        else:
            out.append((sd, hf))
    out += [(f"time_embed.{j * 2}.", f"time_embedding.linear_{j + 1}.") for j in range(2)]
    out += [(f"label_emb.0.{j * 2}.", f"add_embedding.linear_{j + 1}.") for j in range(2)]
    return out + [("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]


def _k2_convert_unet(src_sd, conversion_map):
    """K2:390-405 convert_unet_state_dict: the longest known prefix (cut from the right) is replaced."""
    converted = {}
    for src_key, value in src_sd.items():
        fragments = src_key.split(".")[:-1]
        while fragments:
            prefix = ".".join(fragments) + "."
            if prefix in conversion_map:
                converted[conversion_map[prefix] + src_key[len(prefix):]] = value
                break
            fragments.pop(-1)
        assert fragments, f"key {src_key} not found in conversion map"
    return converted


def test_sdxl_unet_keys_are_kohyas_both_ways():
    """K2:383-412 convert_diffusers_unet_state_dict_to_sdxl / convert_sdxl_unet_state_dict_to_diffusers."""
    parts, ldm = _parts_and_ldm("sdxl")
    to_sd = {hf: sd for sd, hf in _k2_unet_map()}
    head = "model.diffusion_model."
    ours = {k.removeprefix(head): v for k, v in ldm.items() if k.startswith(head)}
    _assert_same(ours, _k2_convert_unet(parts["unet"], to_sd))
    _assert_same(_k2_convert_unet(ours, {sd: hf for sd, hf in _k2_unet_map()}), parts["unet"])


# ------------------------------------------------------------------ K1 / K2: kohya's text-encoder readers and writers


def _k2_read_te2(checkpoint):
    """K2:73-144 convert_sdxl_text_encoder_2_checkpoint: LDM OpenCLIP-bigG -> (kohya's CLIPTextModelWithProjection
    state, logit_scale); ``text_projection`` is renamed, NOT transposed (K2:99-100)."""
    prefix = "conditioner.embedders.1.model."

    def convert_key(key):
        key = key.replace(prefix + "transformer.", "text_model.encoder.")
        key = key.replace(prefix, "text_model.")
        if "resblocks" in key:
            key = key.replace(".resblocks.", ".layers.")
            if ".ln_" in key:
                key = key.replace(".ln_", ".layer_norm")
            elif ".mlp." in key:
                key = key.replace(".c_fc.", ".fc1.").replace(".c_proj.", ".fc2.")
            elif ".attn.out_proj" in key:
                key = key.replace(".attn.out_proj.", ".self_attn.out_proj.")
            elif ".attn.in_proj" in key:
                key = None
            else:
                raise ValueError(f"unexpected key in SD: {key}")
        elif ".positional_embedding" in key:
            key = key.replace(".positional_embedding", ".embeddings.position_embedding.weight")
        elif ".text_projection" in key:
            key = key.replace("text_model.text_projection", "text_projection.weight")
        elif ".logit_scale" in key:
            key = None
        elif ".token_embedding" in key:
            key = key.replace(".token_embedding.weight", ".embeddings.token_embedding.weight")
        elif ".ln_final" in key:
            key = key.replace(".ln_final", ".final_layer_norm")
        elif ".embeddings.position_ids" in key:  # K2:107-109 "ckpt from comfy has this key"
            key = None
        return key

    new_sd = {}
    for key in checkpoint:
        new_key = convert_key(key)
        if new_key is not None:
            new_sd[new_key] = checkpoint[key]
    for key in checkpoint:
        if ".resblocks" in key and ".attn.in_proj_" in key:
            values = torch.chunk(checkpoint[key], 3)
            suffix = ".weight" if "weight" in key else ".bias"
            pfx = key.replace(prefix + "transformer.resblocks.", "text_model.encoder.layers.")
            pfx = pfx.replace("_weight", "").replace("_bias", "").replace(".attn.in_proj", ".self_attn.")
            for name, value in zip(("q_proj", "k_proj", "v_proj"), values, strict=True):
                new_sd[pfx + name + suffix] = value
    return new_sd, checkpoint.get(prefix + "logit_scale", None)


def _k2_write_te2(checkpoint, logit_scale):
    """K2:415-476 convert_text_encoder_2_state_dict_to_sdxl (position_ids dropped, text_projection NOT transposed)."""
    def convert_key(key):
        if ".position_ids" in key:
            return None
        key = key.replace("text_model.encoder.", "transformer.").replace("text_model.", "")
        if "layers" in key:
            key = key.replace(".layers.", ".resblocks.")
            if ".layer_norm" in key:
                key = key.replace(".layer_norm", ".ln_")
            elif ".mlp." in key:
                key = key.replace(".fc1.", ".c_fc.").replace(".fc2.", ".c_proj.")
            elif ".self_attn.out_proj" in key:
                key = key.replace(".self_attn.out_proj.", ".attn.out_proj.")
            elif ".self_attn." in key:
                key = None
            else:
                raise ValueError(f"unexpected key in DiffUsers model: {key}")
        elif ".position_embedding" in key:
            key = key.replace("embeddings.position_embedding.weight", "positional_embedding")
        elif ".token_embedding" in key:
            key = key.replace("embeddings.token_embedding.weight", "token_embedding.weight")
        elif "text_projection" in key:
            key = key.replace("text_projection.weight", "text_projection")
        elif "final_layer_norm" in key:
            key = key.replace("final_layer_norm", "ln_final")
        return key

    new_sd = {}
    for key in checkpoint:
        new_key = convert_key(key)
        if new_key is not None:
            new_sd[new_key] = checkpoint[key]
    for key in checkpoint:
        if "layers" in key and "q_proj" in key:
            value = torch.cat([checkpoint[key], checkpoint[key.replace("q_proj", "k_proj")],
                               checkpoint[key.replace("q_proj", "v_proj")]])
            new_key = key.replace("text_model.encoder.layers.", "transformer.resblocks.")
            new_sd[new_key.replace(".self_attn.q_proj.", ".attn.in_proj_")] = value
    if logit_scale is not None:
        new_sd["logit_scale"] = logit_scale
    return new_sd


def test_sdxl_second_encoder_round_trips_through_kohya_and_projection_orientation():
    """kohya reads sdadapt's SDXL file and writes it back unchanged (K2:479-531 keeps the source's logit_scale,
    which sdadapt drops going to diffusers and does not write, as D2); kohya holds ``text_projection`` in the
    file's (D, P) orientation (K2:99-100, no transpose), diffusers and sdadapt as the Linear weight (P, D)."""
    parts, ldm = _parts_and_ldm("sdxl")
    prefix = "conditioner.embedders.1.model."
    ldm = {**ldm, prefix + "logit_scale": torch.tensor(4.6052)}
    te2 = {k: v for k, v in ldm.items() if k.startswith(prefix)}
    kohya_state, logit_scale = _k2_read_te2(te2)
    written = {prefix + k: v for k, v in _k2_write_te2(kohya_state, logit_scale).items()}
    _assert_same(written, te2)
    ours = {k: v for k, v in parts["text_encoder_2"].items()}
    assert torch.equal(kohya_state.pop("text_projection.weight"), ours.pop("text_projection.weight").T)
    _assert_same(kohya_state, ours)
    converted, report = convert_checkpoint(ldm, to="diffusers")
    assert prefix + "logit_scale" in report.dropped
    _assert_same(split_components(converted)["text_encoder_2"], parts["text_encoder_2"])


def _k1_read_sd2_te(checkpoint):
    """K1:585-658 convert_ldm_clip_checkpoint_v2 (resblocks.23, text_projection, logit_scale, position_ids dropped)."""
    def convert_key(key):
        if not key.startswith("cond_stage_model"):
            return None
        key = key.replace("cond_stage_model.model.transformer.", "text_model.encoder.")
        key = key.replace("cond_stage_model.model.", "text_model.")
        if "resblocks" in key:
            key = key.replace(".resblocks.", ".layers.")
            if ".ln_" in key:
                key = key.replace(".ln_", ".layer_norm")
            elif ".mlp." in key:
                key = key.replace(".c_fc.", ".fc1.").replace(".c_proj.", ".fc2.")
            elif ".attn.out_proj" in key:
                key = key.replace(".attn.out_proj.", ".self_attn.out_proj.")
            elif ".attn.in_proj" in key:
                key = None
            else:
                raise ValueError(f"unexpected key in SD: {key}")
        elif ".positional_embedding" in key:
            key = key.replace(".positional_embedding", ".embeddings.position_embedding.weight")
        elif ".text_projection" in key or ".logit_scale" in key:
            key = None
        elif ".token_embedding" in key:
            key = key.replace(".token_embedding.weight", ".embeddings.token_embedding.weight")
        elif ".ln_final" in key:
            key = key.replace(".ln_final", ".final_layer_norm")
        return key

    new_sd = {}
    for key in checkpoint:
        if ".resblocks.23." in key:
            continue
        new_key = convert_key(key)
        if new_key is not None:
            new_sd[new_key] = checkpoint[key]
    for key in checkpoint:
        if ".resblocks.23." in key:
            continue
        if ".resblocks" in key and ".attn.in_proj_" in key:
            values = torch.chunk(checkpoint[key], 3)
            suffix = ".weight" if "weight" in key else ".bias"
            pfx = key.replace("cond_stage_model.model.transformer.resblocks.", "text_model.encoder.layers.")
            pfx = pfx.replace("_weight", "").replace("_bias", "").replace(".attn.in_proj", ".self_attn.")
            for name, value in zip(("q_proj", "k_proj", "v_proj"), values, strict=True):
                new_sd[pfx + name + suffix] = value
    new_sd.pop("text_model.encoder.text_model.embeddings.position_ids", None)  # K1:649-653 (WD 1.4)
    new_sd.pop("text_model.embeddings.position_ids", None)
    return new_sd


def _k1_write_sd2_te(checkpoint, make_dummy_weights):
    """K1:1093-1161 convert_text_encoder_state_dict_to_sd_v2 (with dummy layer 23, text_projection, logit_scale)."""
    new_sd = {}
    for key, value in checkpoint.items():
        if ".position_ids" in key:
            continue
        new = key.replace("text_model.encoder.", "transformer.").replace("text_model.", "")
        if "layers" in new:
            new = new.replace(".layers.", ".resblocks.")
            if ".layer_norm" in new:
                new = new.replace(".layer_norm", ".ln_")
            elif ".mlp." in new:
                new = new.replace(".fc1.", ".c_fc.").replace(".fc2.", ".c_proj.")
            elif ".self_attn.out_proj" in new:
                new = new.replace(".self_attn.out_proj.", ".attn.out_proj.")
            elif ".self_attn." in new:
                continue
        elif ".position_embedding" in new:
            new = new.replace("embeddings.position_embedding.weight", "positional_embedding")
        elif ".token_embedding" in new:
            new = new.replace("embeddings.token_embedding.weight", "token_embedding.weight")
        elif "final_layer_norm" in new:
            new = new.replace("final_layer_norm", "ln_final")
        new_sd[new] = value
    for key in checkpoint:
        if "layers" in key and "q_proj" in key:
            value = torch.cat([checkpoint[key], checkpoint[key.replace("q_proj", "k_proj")],
                               checkpoint[key.replace("q_proj", "v_proj")]])
            new_key = key.replace("text_model.encoder.layers.", "transformer.resblocks.")
            new_sd[new_key.replace(".self_attn.q_proj.", ".attn.in_proj_")] = value
    if make_dummy_weights:
        keys = list(new_sd)
        for key in keys:
            if key.startswith("transformer.resblocks.22."):
                new_sd[key.replace(".22.", ".23.")] = new_sd[key].clone()
        width = new_sd[keys[0]].shape[-1]  # (K1:1158 writes the real 1024; the tiny model's width here)
        new_sd["text_projection"] = torch.ones((width, width), dtype=new_sd[keys[0]].dtype)
        new_sd["logit_scale"] = torch.tensor(1)
    return new_sd


def test_sd2_text_encoder_against_kohyas_reader_and_writer():
    """kohya reads sdadapt's SD2 file to the same CLIPTextModel state (K1:585-658); kohya's writer without a source
    checkpoint (K1:1198: dummy layer 23 = copy of 22, text_projection of ones, int64 logit_scale) is read by
    sdadapt with those three dropped, and without the dummies it is sdadapt's own output."""
    parts, ldm = _parts_and_ldm("sd2")
    prefix = "cond_stage_model.model."
    _assert_same(_k1_read_sd2_te(ldm), parts["text_encoder"])
    ours = {k: v for k, v in ldm.items() if k.startswith(prefix)}
    _assert_same({prefix + k: v for k, v in _k1_write_sd2_te(parts["text_encoder"], False).items()}, ours)
    kohya = {prefix + k: v for k, v in _k1_write_sd2_te(parts["text_encoder"], True).items()}
    converted, report = convert_checkpoint(kohya, to="diffusers", architecture="sd2")
    dummies = {k for k in kohya if ".resblocks.23." in k or k.endswith(("text_projection", "logit_scale"))}
    assert set(report.dropped) == dummies
    _assert_same(split_components(converted)["text_encoder"], parts["text_encoder"])


@pytest.mark.parametrize("arch, key", [
    ("sdxl", "conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids"),  # K2:107-109 (ComfyUI)
    ("sd2", "cond_stage_model.model.transformer.text_model.embeddings.position_ids"),  # K1:649-653 (WD 1.4)
])
def test_stray_position_ids_under_the_open_clip_prefix_are_dropped_as_kohya_does(arch, key):
    """Files saved by ComfyUI (SDXL) and WD 1.4 (SD2) carry a transformers position_ids buffer under the OpenCLIP
    prefix; kohya's readers drop it, sdadapt refused the whole checkpoint as having an unknown key."""
    _, ldm = _parts_and_ldm(arch)
    converted, report = convert_checkpoint({**ldm, key: torch.arange(7)[None]}, to="diffusers")  # strict: raised before
    assert report.dropped == (key,)
    _assert_same(converted, ldm_to_diffusers(ldm))
    assert split_single_file({**ldm, key: torch.arange(7)[None]}).dropped == [key]


# ------------------------------------------------------------------ D3: which model a file is


def test_sd2_unclip_file_is_sd2_as_diffusers_detects_it():
    """An SD 2.1 unCLIP file has a ``label_emb`` in its UNet beside the OpenCLIP-H ``cond_stage_model.model``;
    D3 infer_diffusers_model_type checks the 1024-wide cross-attention first and says "v2". sdadapt called it
    SDXL (its label_emb rule came first) and then asked for a second text encoder."""
    meta = {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2048),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "embedder.model.visual.proj": (1280, 1024),
    }
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in meta.items()}
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == "v2"
    assert checkpoint_architecture(meta) == "sd2"
    sdxl = {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}
    sdxl_meta = {k: torch.empty(s, device="meta") for k, s in sdxl.items()}
    assert single_file_utils.infer_diffusers_model_type(sdxl_meta) == "xl_base"
    assert checkpoint_architecture(sdxl) == "sdxl"
    assert checkpoint_architecture({"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}) == "sdxl"


# ------------------------------------------------------------------ configs read from the shapes of real-size files

#: the fields of the public diffusers configs that shapes decide or the architecture fixes (unet/, text_encoder*/, vae/
#: config.json of stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 (768-v) and -2-1-base, stable-diffusion-xl-
#: base-1.0). Text encoders: bos/eos are sdadapt's 49406/49407 where those files say 0/2 (transformers' legacy
#: argmax pooling; the real ids pick the <EOS> even after textual-inversion tokens, as kohya's pooling does).
HUB_UNET = {
    "sd1": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=768, use_linear_projection=False, transformer_layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4),
    "sd2-v": dict(sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                  use_linear_projection=True, upcast_attention=True),
    "sd2": dict(sample_size=64, attention_head_dim=[5, 10, 20, 20], upcast_attention=False),
    "sdxl": dict(sample_size=128, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                 cross_attention_dim=2048, use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
HUB_TEXT = {
    "sd1": [dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)],
    "sd2": [dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 hidden_act="gelu")],
    "sdxl": [dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu"),
             dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  hidden_act="gelu", projection_dim=1280)],
}
HUB_VAE = {"sd1": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                       scaling_factor=0.18215),
           "sd2": dict(scaling_factor=0.18215), "sdxl": dict(scaling_factor=0.13025, sample_size=1024)}


@functools.cache
def _real_size(arch: str) -> dict:
    """tests/test_model_keys.py's real-size components on the meta device (keys and shapes only), built once."""
    from test_model_keys import real_size

    return real_size(arch)


@pytest.mark.parametrize("arch, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sd2", "epsilon"),
                                              ("sdxl", "epsilon")])
def test_configs_from_real_size_shapes_are_the_public_ones(arch, prediction):
    from sdadapt.formats.single_file import text_encoder_config, unet_config, vae_config

    models = _real_size(arch)
    te2 = models.get("text_encoder_2")
    pooled = int(te2.text_projection.weight.shape[0]) if te2 is not None else None
    unet = unet_config(models["unet"].state_dict(), architecture=arch, prediction_type=prediction, pooled_dim=pooled)
    want = HUB_UNET["sd2-v" if (arch, prediction) == ("sd2", "v_prediction") else arch]
    assert {k: unet.get(k) for k in want} == want
    vae = vae_config(models["vae"].state_dict(), architecture=arch)
    assert {k: vae.get(k) for k in HUB_VAE[arch]} == HUB_VAE[arch]
    encoders = [m for name, m in sorted(models.items()) if name.startswith("text_encoder")]
    for model, want, open_clip in zip(encoders, HUB_TEXT[arch], (arch == "sd2", True), strict=False):
        state = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                 for k, v in model.state_dict().items()}
        config = text_encoder_config(state, open_clip=open_clip)
        assert {k: config.get(k) for k in want} == want


def test_ema_names_are_the_ones_diffusers_extract_ema_reads():
    """sdadapt's ``ema_key`` (what ``--ema`` reads and ``save_model(ema=...)`` writes) is CompVis LitEma's name, as
    D3 convert_ldm_unet_checkpoint(extract_ema=True) looks it up ("model_ema." + the key after "model.", no dots)."""
    from sdadapt.formats.model_keys import ema_key

    parts, ldm = _parts_and_ldm("sd1")
    unet = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    averaged = {**ldm, **{ema_key(k): v + 1 for k, v in unet.items()}}
    config = _models("sd1")["unet"].config
    theirs = single_file_utils.convert_ldm_unet_checkpoint(averaged, config, extract_ema=True)
    _assert_same(theirs, {k: v + 1 for k, v in parts["unet"].items()})
