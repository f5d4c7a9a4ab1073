"""kohya's block-wise LoRA network_args: lr weights and ranks per UNet block, network_args parsing.

Reference (kohya-ss/sd-scripts ``networks/lora.py``, read at HEAD):

* ``get_block_lr_weight``: presets over ``n = 12`` (SDXL 9) blocks, ``x_i = i / (n - 1)``:
  ``sine`` = sin(π x_i / 2), ``cosine`` = the same for reversed i, ``linear`` = x_i,
  ``reverse_linear`` = reversed, ``zeros`` = 0; ``NAME+N`` adds N. A comma list has empty items
  = 0, is cut when long and padded with 1.0 when short; a weight not ``> block_lr_zero_threshold``
  becomes 0; an absent part is all 1.0; the result is down + mid + up (SDXL: 1.0 + ... + 1.0).
* ``get_block_index``: ``RE_UPDOWN`` on the LoRA name: down ``1 + 3i + j`` (samplers j -> 2),
  mid 12, up ``13 + 3i + j``; SDXL (LDM names): input ``1 + N``, middle ``10 + N``, output ``13 + N``.
* ``remove_block_dims_and_alphas``: a block of lr weight 0 gets rank 0, i.e. no modules;
  ``prepare_optimizer_params``: a UNet block's lr = (unet_lr or learning_rate) × its weight; the
  text encoders keep ``text_encoder_lr``.
"""

from __future__ import annotations

import json
import math
import re
import types

import pytest
from safetensors import safe_open
from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sdxl

from sdadapt.errors import InputError
from sdadapt.methods.lora import prepare_locon, prepare_loha, prepare_lora
from sdadapt.methods.lora_blocks import (
    block_count,
    block_lr_weights,
    block_plan,
    check_block_args,
    kohya_block_index,
    preset_lr_weights,
)


# ------------------------------------------------------------------ references written here
def _preset_reference(name: str, n: int, offset: float = 0.0) -> list[float]:
    """kohya's formulas in float64, index by index."""
    out = []
    for i in range(n):
        r = n - 1 - i  # the reversed index
        value = {"sine": math.sin(math.pi * (i / (n - 1)) / 2), "cosine": math.sin(math.pi * (r / (n - 1)) / 2),
                 "linear": i / (n - 1), "reverse_linear": r / (n - 1), "zeros": 0.0}[name]
        out.append(value + offset)
    return out


#: kohya's RE_UPDOWN, applied to the names in a kohya file (an independent reading of the block)
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def _file_block(key: str) -> int:
    name = key.split(".")[0]
    m = _RE_UPDOWN.search(name)
    if m:
        i, j = int(m.group(2)), int(m.group(4))
        idx = 3 * i + (2 if m.group(3) in ("upsamplers", "downsamplers") else j)
        return 1 + idx if m.group(1) == "down" else 13 + idx
    return 12 if "mid_block_" in name else -1


def _system(sdxl: bool = False):
    unet = tiny_unet_sdxl() if sdxl else tiny_unet_sd1()
    return types.SimpleNamespace(unet=unet, text_encoder=tiny_clip(), base_model="sdxl" if sdxl else "sd1")


# ------------------------------------------------------------------ pure math
@pytest.mark.parametrize("name", ["sine", "cosine", "linear", "reverse_linear", "zeros"])
@pytest.mark.parametrize("offset", [None, "0.5", "1"])
@pytest.mark.parametrize("n", [12, 9])
def test_presets_follow_kohyas_formulas(name, offset, n):
    spec = name if offset is None else f"{name}+{offset}"
    got = preset_lr_weights(spec, count=n)
    want = _preset_reference(name, n, float(offset or 0))
    assert len(got) == n
    assert got == pytest.approx(want, abs=1e-15)
    if name == "cosine":
        assert got[0] == pytest.approx(1 + float(offset or 0)) and got[-1] == pytest.approx(float(offset or 0))


def test_block_lr_weights_layout_padding_threshold_and_sdxl():
    assert block_lr_weights() is None
    w = block_lr_weights(down="sine", zero_threshold=0.0)
    assert len(w) == 25 == block_count(sdxl=False)
    assert w[:12] == pytest.approx(_preset_reference("sine", 12)) and w[12:] == [1.0] * 13
    # short list padded with 1.0, empty items are 0, the threshold zeroes the small ones, only in the parts given
    w = block_lr_weights(down="0.5,,0.05,2", mid="0.2", up="1,0.1", zero_threshold=0.1)
    assert w[:12] == [0.5, 0.0, 0.0, 2.0] + [1.0] * 8
    assert w[12] == 0.2
    assert w[13:] == [1.0, 0.0] + [1.0] * 10
    # long lists are cut to 12
    assert block_lr_weights(up=",".join(["0.3"] * 15))[13:] == [0.3] * 12
    # the "+N" offset lifts zeros above the threshold
    assert block_lr_weights(down="zeros+0.25", zero_threshold=0.2)[:12] == [0.25] * 12
    assert block_lr_weights(down="zeros+0.25", zero_threshold=0.3)[:12] == [0.0] * 12
    # SDXL: 9 + 3 + 9 between two 1.0 (embeddings, out)
    w = block_lr_weights(down="linear", mid="0,0.5", sdxl=True)
    assert len(w) == 23 == block_count(sdxl=True)
    assert w[0] == 1.0 and w[-1] == 1.0
    assert w[1:10] == pytest.approx(_preset_reference("linear", 9))
    assert w[10:13] == [0.0, 0.5, 1.0] and w[13:22] == [1.0] * 9


def test_block_index_of_sd1_and_sdxl_layer_names():
    """Hand-derived from kohya's rule on full-size SD1 and SDXL names (diffusers and LDM spellings)."""
    sd = {
        "down_blocks.0.attentions.0.proj_in": 1,
        "down_blocks.0.resnets.1.conv1": 2,
        "down_blocks.0.downsamplers.0.conv": 3,
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k": 8,
        "down_blocks.3.resnets.1.conv2": 11,
        "mid_block.attentions.0.proj_out": 12,
        "mid_block.resnets.1.conv1": 12,
        "up_blocks.0.resnets.2.conv1": 15,
        "up_blocks.0.upsamplers.0.conv": 15,
        "up_blocks.1.attentions.0.proj_in": 16,
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": 24,
        "input_blocks.4.1.proj_in": 4,  # LDM = down_blocks.1.attentions.0
        "model.diffusion_model.output_blocks.11.1.proj_out": 24,
        "conv_in": -1,
    }
    for name, want in sd.items():
        assert kohya_block_index(name, sdxl=False) == want, name
    sdxl = {
        "down_blocks.1.attentions.0.proj_in": 5,  # input_blocks.4.1
        "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q": 9,  # input_blocks.8.1
        "down_blocks.0.downsamplers.0.conv": 4,  # input_blocks.3.0.op
        "mid_block.attentions.0.proj_in": 11,  # middle_block.1
        "mid_block.resnets.1.conv1": 12,  # middle_block.2
        "up_blocks.0.attentions.2.proj_out": 15,  # output_blocks.2.1
        "up_blocks.2.resnets.2.conv2": 21,  # output_blocks.8.0
        "output_blocks.5.1.proj_in": 18,
    }
    for name, want in sdxl.items():
        assert kohya_block_index(name, sdxl=True, up_blocks_with_attention={0, 1}) == want, name


def test_block_plan_dims_alphas_and_zero_lr_blocks():
    dims = ",".join(str(i % 4) for i in range(25))
    plan = block_plan(sdxl=False, rank=8, alpha=None, conv_rank=None, conv_alpha=None, block_dims=dims,
                      down_lr_weight="zeros+1", up_lr_weight="0,1")
    assert plan.dims[:13] == [i % 4 for i in range(13)]
    assert plan.dims[13] == 0 and plan.dims[14:] == [i % 4 for i in range(14, 25)]  # up[0] has weight 0
    assert plan.alphas == [float(i % 4) for i in range(25)]  # alpha not given: each block's rank (scale 1)
    assert plan.conv_dims is None
    plan = block_plan(sdxl=False, rank=8, alpha=2.0, conv_rank=3, conv_alpha=None, mid_lr_weight="0")
    assert plan.dims == [8] * 12 + [0] + [8] * 12 and plan.alphas == [2.0] * 25
    assert plan.conv_dims == [3] * 12 + [0] + [3] * 12 and plan.conv_alphas == [3.0] * 25
    assert block_plan(sdxl=False, rank=4, alpha=None, conv_rank=None, conv_alpha=None) is None


# ------------------------------------------------------------------ modules, ranks, lr scales
def test_lr_weights_choose_the_modules_and_their_scales_on_a_tiny_sd_unet():
    """Tiny SD1 UNet: transformers in down_blocks.0 (blocks 1, 2), mid (12), up_blocks.1 (16, 17, 18),
    12 kohya layers each (proj_in, 4 x attn1, 4 x attn2, 2 x ff, proj_out)."""
    system = _system()
    full = prepare_lora(system, rank=4)
    assert len(full.handles["unet"].modules) == 6 * 12 and full.lr_scales is None
    full.remove()
    up = "1,1,1,0.5,0,0.25"  # blocks 13..18 -> up_blocks.1.attentions.0/1/2 = 16, 17, 18 get 0.5, 0, 0.25
    a = prepare_lora(system, rank=4, down_lr_weight="zeros", mid_lr_weight="2", up_lr_weight=up)
    layers = list(a.handles["unet"].modules)
    assert len(layers) == 3 * 12  # mid, up 16 and 18; down (weight 0) and block 17 (weight 0) get none
    assert {kohya_block_index(n, sdxl=False) for n in layers} == {12, 16, 18}
    scale_of = {}
    for component, handle in a.handles.items():
        for layer, module in handle.modules.items():
            for p in module.parameters():
                scale_of[id(p)] = (component, layer)
    assert len(a.lr_scales) == len(a.params)
    want = {12: 2.0, 16: 0.5, 18: 0.25}
    for p, scale in zip(a.params, a.lr_scales):
        component, layer = scale_of[id(p)]
        assert scale == (want[kohya_block_index(layer, sdxl=False)] if component == "unet" else 1.0)
    assert any(c == "text_encoder" for c, _ in scale_of.values())  # the text encoder keeps its modules, at 1.0
    a.remove()


def test_block_ranks_in_the_saved_kohya_file(tmp_path):
    system = _system()
    dims = [0] * 25
    dims[1], dims[2], dims[12], dims[16], dims[17], dims[18] = 1, 2, 3, 4, 0, 6
    conv = [0] * 25
    conv[2], conv[13], conv[15] = 5, 2, 7  # down_blocks.0.resnets.1, up_blocks.0.resnets.0, up_blocks.0.upsamplers
    alphas = [float(d) / 2 for d in dims]
    a = prepare_lora(system, rank=8, block_dims=",".join(map(str, dims)), block_alphas=",".join(map(str, alphas)),
                     conv_block_dims=",".join(map(str, conv)), text_encoder=False)
    path = a.save(tmp_path / "blocks.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        downs = {k: f.get_slice(k).get_shape() for k in keys if k.endswith("lora_down.weight")}
        kept_alphas = {k: float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    seen = set()
    for key, shape in downs.items():
        block = _file_block(key)
        kxk = len(shape) == 4 and shape[2:] != [1, 1]
        want = conv[block] if kxk else dims[block]
        assert want > 0 and shape[0] == want, (key, shape, want)
        alpha = kept_alphas[key.replace("lora_down.weight", "alpha")]
        assert alpha == (float(want) if kxk else alphas[block])
        seen.add((block, kxk))
    assert seen == {(1, False), (2, False), (12, False), (16, False), (18, False), (2, True), (13, True), (15, True)}
    # 1x1 convs and Linears of resnet blocks follow block_dims (0 for blocks 13, 15: no time_emb_proj there)
    assert not any(_file_block(k) in (13, 15) and len(s) == 2 for k, s in downs.items())
    args = json.loads(meta["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["conv_block_dims"] == ",".join(map(str, conv))
    assert "conv_dim" in args  # still the file's own summary


def test_sdxl_block_dims_take_23_values():
    system = _system(sdxl=True)
    dims = [0] * 23
    dims[5], dims[11], dims[14] = 2, 3, 5  # input_blocks.4, middle_block.1, output_blocks.1
    a = prepare_lora(system, rank=8, block_dims=",".join(map(str, dims)), text_encoder=False)
    ranks = {}
    for layer, module in a.handles["unet"].modules.items():
        down = next(p for n, p in module.named_parameters() if "down" in n)
        ranks.setdefault(layer.split(".transformer_blocks")[0].rsplit(".proj", 1)[0], set()).add(down.shape[0])
    assert ranks == {"down_blocks.1.attentions.0": {2}, "mid_block.attentions.0": {3}, "up_blocks.0.attentions.1": {5}}
    a.remove()
    with pytest.raises(InputError, match="23 comma-separated values"):
        prepare_lora(system, rank=8, block_dims=",".join(["1"] * 25))


def test_optimiser_group_lrs_after_one_step_match_the_block_weights(tmp_path):
    """One AdamW step from lora_up = 0 moves each up weight by lr·g/(|g|+eps) ≈ ±lr: the largest |lora_up|
    of a module is its group's learning rate (constant schedule, no warm-up, no clipping)."""
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "model")
    images = _images(tmp_path / "images")
    out = tmp_path / "l.safetensors"
    # tiny pipeline (1 layer per block): down_blocks.0.attentions.0 = block 1, mid = 12, up_blocks.1.attentions.0/1 = 16, 17
    code = main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "1", "--lr-scheduler", "constant",
                 "--lr-warmup-steps", "0", "--max-grad-norm", "0", "--unet-lr", "0.01", "--text-encoder-lr", "0.001",
                 "--network-args", "down_lr_weight=0,0.5", "mid_lr_weight=0.2", "up_lr_weight=1,1,1,0.75,0", "algo=lora",
                 "--network-dropout", "0", "--batch-size", "2", "-q", "-o", str(out)])
    assert code == 0
    want = {1: 0.005, 12: 0.002, 16: 0.0075}
    with safe_open(str(out), "pt") as f:
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
        meta = f.metadata()
    blocks = {}
    for key, up in ups.items():
        if key.startswith("lora_te"):
            assert up.abs().max().item() == pytest.approx(0.001, rel=0.02), key
            continue
        block = _file_block(key)
        blocks.setdefault(block, []).append(up.abs().max().item())
    assert set(blocks) == set(want)  # block 17 (weight 0) has no modules
    for block, values in blocks.items():
        assert max(values) == pytest.approx(want[block], rel=0.02), block
    args = json.loads(meta["ss_network_args"])
    assert args["down_lr_weight"] == "0,0.5" and args["mid_lr_weight"] == "0.2" and args["up_lr_weight"] == "1,1,1,0.75,0"
    assert meta["ss_network_dropout"] == "0.0" and args["dropout"] == "0.0" and "algo" not in args


# ------------------------------------------------------------------ config, CLI and refusals
def _method_options():
    from sdadapt.methods import LORA_OPTIONS

    return {o.name for o in LORA_OPTIONS}


def test_toml_network_args_and_kohya_keys(tmp_path):
    from sdadapt.cli.train import read_config

    config = tmp_path / "train.toml"
    config.write_text('network_dropout = 0.1\nnetwork_args = ["conv_dim=4", "conv_alpha=1", "down_lr_weight=sine+0.5", '
                      '"block_lr_zero_threshold=0.6", "use_cp=True", "rank_dropout=0.2", "algo=locon"]\n')
    _, methods, _ = read_config(config, fields={"steps"}, method_options=_method_options())
    assert methods == {"dropout": 0.1, "conv_rank": "4", "conv_alpha": "1", "down_lr_weight": "sine+0.5",
                       "block_lr_zero_threshold": "0.6", "use_tucker": "True", "rank_dropout": "0.2", "algo": "locon"}


@pytest.mark.parametrize("item, message", [
    ("down_lr_weigth=sine", "did you mean down_lr_weight"),
    ("block_dims", "write KEY=VALUE"),
])
def test_unknown_network_args_are_refused(item, message):
    from sdadapt.network_args import parse_network_args

    with pytest.raises(InputError, match=message):
        parse_network_args([item], method_options=_method_options())


def test_lycoris_algo_must_name_the_method():
    from sdadapt.network_args import check_lycoris_args

    for method, algo in (("locon", "locon"), ("locon", "lora"), ("lora", "lora"), ("loha", "loha")):
        chosen = {"algo": algo, "rank": 4}
        check_lycoris_args(method, chosen)
        assert chosen == {"rank": 4}
    with pytest.raises(InputError, match="train loha"):
        check_lycoris_args("lora", {"algo": "loha"})
    with pytest.raises(InputError, match="train ia3"):
        check_lycoris_args("lora", {"algo": "ia3"})
    with pytest.raises(InputError, match="train glora"):
        check_lycoris_args("lora", {"algo": "glora"})
    with pytest.raises(InputError, match="not dylora"):
        check_lycoris_args("lora", {"algo": "dylora"})
    with pytest.raises(InputError, match="train dora"):
        check_lycoris_args("lora", {"algo": "lora", "dora_wd": "True"})
    check_lycoris_args("dora", {"algo": "lora", "dora_wd": "True"})
    check_lycoris_args("dora", {"algo": "LoCon", "dora_wd": "true"})  # LyCORIS reads the algo case-insensitively
    check_lycoris_args("loha", {"algo": " LoHa"})


@pytest.mark.parametrize("kwargs, message", [
    (dict(down_lr_weight="sin"), "unknown lr weight preset 'sin'"),
    (dict(down_lr_weight="cosine+x"), "after '\\+' must be a number"),
    (dict(up_lr_weight="0"), "one number is not a list here"),
    (dict(block_dims="4,4"), "block_dims must have 25 comma-separated values"),
    (dict(block_dims=",".join(["a"] * 25)), "comma-separated integers"),
    (dict(block_alphas=",".join(["1"] * 25)), "block_alphas takes effect only with block_dims"),
    (dict(block_dims=",".join(["4"] * 25), conv_block_alphas=",".join(["1"] * 25)), "conv_block_alphas needs conv_block_dims"),
    (dict(down_lr_weight="zeros", mid_lr_weight="0", up_lr_weight="zeros"), "nothing of the UNet would train"),
    (dict(mid_lr_weight="-1", block_lr_zero_threshold="-2"), "must be finite and >= 0"),
])
def test_bad_block_options_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        prepare_lora(_system(), rank=4, **kwargs)


def test_dropouts_and_tucker_map_onto_the_family_config():
    system = _system()
    a = prepare_locon(system, rank=4, dropout=0.1, rank_dropout=0.2, module_dropout=0.3, use_tucker=True)
    module = a.handles["unet"].modules["down_blocks.0.resnets.0.conv1"]
    assert (module.dropout, module.rank_dropout, module.module_dropout) == (0.1, 0.2, 0.3)
    assert any("mid" in n for n, _ in module.named_parameters())  # the Tucker core
    assert a.handles["text_encoder"].modules  # text encoder modules get the dropouts too
    assert all(m.module_dropout == 0.3 for m in a.handles["text_encoder"].modules.values())
    a.remove()
    loha = prepare_loha(system, rank=4, rank_dropout=0.1)  # (LyCORIS' rank dropout: ΔW's output rows)
    assert all(m.rank_dropout == 0.1 for m in loha.handles["unet"].modules.values())
    loha.remove()
    with pytest.raises(InputError, match="loha has no dropout"):  # (no rank activations to drop)
        prepare_loha(system, rank=4, dropout=0.1)


def test_block_options_are_checked_before_the_model_loads():
    check_block_args({"block_dims": ",".join(["2"] * 25)})
    check_block_args({"block_dims": ",".join(["2"] * 23)})  # SDXL's count: checked again once the model is known
    with pytest.raises(InputError, match="must have 25"):
        check_block_args({"block_dims": "2,2"})
    with pytest.raises(InputError, match="unknown lr weight preset"):
        check_block_args({"up_lr_weight": "sinus"})


def test_inject_layer_configs_override_ranks_and_refuse_unknown_layers():
    from sdadapt.adapters import LoRAConfig
    from sdadapt.inject import inject
    from sdadapt.targets import UNET_KOHYA

    unet = tiny_unet_sd1()
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    handle = inject(unet, UNET_KOHYA, LoRAConfig(rank=2), layer_configs={name: LoRAConfig(rank=5, alpha=1.0)})
    state = handle.state_dict()
    assert state[f"{name}.lora_down.weight"].shape[0] == 5 and float(state[f"{name}.alpha"]) == 1.0
    assert state["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_down.weight"].shape[0] == 2
    handle.remove()
    with pytest.raises(ValueError, match="the target does not choose"):
        inject(unet, UNET_KOHYA, LoRAConfig(rank=2), layer_configs={"conv_in": LoRAConfig(rank=5)})
    assert not any("sdadapt" in k for k in unet.state_dict())  # a refused inject leaves the model as it was
