"""hako-mikan's LoRA Block Weight in ``generate``'s ``<lora:NAME:M:lbw=...>`` tags, and the hires prompt's own
extra networks (A1111's ``hr_extra_network_data``).

References transcribed below from hako-mikan/sd-webui-lora-block-weight ``scripts/lora_block_weight.py``
(commit b403cb7): ``DEF_WEIGHT_PRESET``, ``BLOCKID*``, ``BLOCKS``, ``to26``, ``getinheritedweight`` and
``ratiodealer`` (without elementals); the diffusers -> LDM block numbering as the real SD1 (2 layers per block,
4 blocks) and SDXL (2 layers per block, 3 blocks) UNets lay it out, which is what A1111's layer names use.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from png_pixels import pixels as _pixels
from sdadapt.errors import InputError
from sdadapt.loratools.block_weights import (
    LBW_PRESETS,
    lbw_layer_weight,
    lbw_slot_weights,
    parse_lbw_presets,
    parse_lbw_spec,
)
from sdadapt.prompt_schedule import extra_network_tags

# ---- the extension, transcribed --------------------------------------------------------------------------------

DEF_WEIGHT_PRESET = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
FLUXALL:""" + ",".join(["1"] * 61)

BLOCKID26 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11",
             "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10",
             "OUT11"]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00", "OUT01",
             "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08"]
BLOCKNUMS = [12, 17, 20, 26]
BLOCKIDS = [BLOCKID12, BLOCKID17, BLOCKID20, BLOCKID26]
BLOCKS = ["encoder", *(f"diffusion_model_input_blocks_{i}_" for i in range(12)), "diffusion_model_middle_block_",
          *(f"diffusion_model_output_blocks_{i}_" for i in range(12)), "embedders", "transformer_resblocks"]


def to26(ratios):
    ids = BLOCKIDS[BLOCKNUMS.index(len(ratios))]
    output = [0] * 26
    for i, id in enumerate(ids):
        output[BLOCKID26.index(id)] = ratios[i]
    return output


def getinheritedweight(weight, offset):
    match = re.compile(r"X([+-])?([\d.]+)?").search(offset)
    if match.group(1) == "+":
        return float(weight) + float(match.group(2))
    elif match.group(1) == "-":
        return float(weight) - float(match.group(2))
    else:
        return float(weight)


def ratiodealer(key, lwei):
    ratio = 1
    for i, block in enumerate(BLOCKS):
        if block in key:
            if i == 26 or i == 27:
                i = 0
            ratio = lwei[i]
    return ratio


def _ldm_path(layer: str, *, blocks: int) -> str:
    """A diffusers UNet layer's LDM (compvis) path on a real SD1 (4 blocks) / SDXL (3 blocks) UNet: 2 layers per
    block, so down (i, j) -> input_blocks 3i+j+1, down i's sampler -> 3i+3, up (i, j) -> output_blocks 3i+j."""
    parts = layer.split(".")
    root = {"conv_in": "input_blocks.0.0", "time_embedding": "time_embed", "add_embedding": "label_emb",
            "conv_norm_out": "out.0", "conv_out": "out.2"}
    if parts[0] in root:
        return ".".join([root[parts[0]], *parts[1:]])
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        return ".".join(["middle_block", str(index), *parts[3:]])
    i, kind, j = int(parts[1]), parts[2], int(parts[3])
    if parts[0] == "down_blocks":
        n = 3 * i + 3 if kind == "downsamplers" else 3 * i + j + 1
        return f"input_blocks.{n}.{0 if kind != 'attentions' else 1}.{'.'.join(parts[4:])}"
    n = 3 * i + 2 if kind == "upsamplers" else 3 * i + j
    with_attention = i in ((0, 1) if blocks == 3 else (1, 2, 3))
    sub = {"resnets": 0, "attentions": 1, "upsamplers": 2 if with_attention else 1}[kind]
    return f"output_blocks.{n}.{sub}.{'.'.join(parts[4:])}"


def _layers(*, sdxl: bool) -> list[str]:
    """Every kind of LoRA layer of a real SD1 / SDXL UNet (attention, resnets, samplers, in/out, embeddings)."""
    blocks = 3 if sdxl else 4
    attention_down = (1, 2) if sdxl else (0, 1, 2)
    attention_up = (0, 1) if sdxl else (1, 2, 3)
    layers = ["conv_in", "time_embedding.linear_1", "conv_norm_out", "conv_out",
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.resnets.1.conv1"]
    layers += ["add_embedding.linear_2"] if sdxl else []
    for i in range(blocks):
        for j in range(2):
            layers.append(f"down_blocks.{i}.resnets.{j}.conv1")
            if i in attention_down:
                layers.append(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q")
                layers.append(f"down_blocks.{i}.attentions.{j}.proj_in")
        if i < blocks - 1:
            layers.append(f"down_blocks.{i}.downsamplers.0.conv")
            layers.append(f"up_blocks.{i}.upsamplers.0.conv")
        for j in range(3):
            layers.append(f"up_blocks.{i}.resnets.{j}.conv2")
            if i in attention_up:
                layers.append(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.ff.net.0.proj")
    return layers


# ---- presets, lengths, letters ----------------------------------------------------------------------------------

def test_builtin_presets_are_the_extensions():
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in DEF_WEIGHT_PRESET.splitlines()}
    assert LBW_PRESETS == {k: v for k, v in lines.items() if k != "FLUXALL"}  # (Flux's 61 values: not read)
    assert parse_lbw_presets(DEF_WEIGHT_PRESET + "\n# MINE:1,1\nbad line\n") == LBW_PRESETS
    for name, text in lines.items():
        if name != "FLUXALL":
            assert list(parse_lbw_spec(name)) == to26([float(w) for w in text.split(",")])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BLOCKNUMS).flatmap(
    lambda n: st.lists(st.floats(-2, 2, allow_nan=False).map(lambda v: round(v, 3)), min_size=n, max_size=n)))
def test_vectors_of_each_length_fill_the_26_slots_as_to26(values):
    assert list(lbw_slot_weights(values)) == to26(values)
    assert list(parse_lbw_spec(",".join(map(str, values)))) == to26(values)


@pytest.mark.parametrize("letter", ["X", "X+0.5", "X-1", "X+.25"])
def test_x_letters_are_the_inherited_weight(letter):
    text = ",".join([letter, *["1"] * 11, letter, "0", letter, "0.5", "2"])
    want = to26([getinheritedweight(0.7, v) if v.startswith("X") else float(v) for v in text.split(",")])
    assert list(parse_lbw_spec(text, x=0.7)) == want


@pytest.mark.parametrize(("spec", "words"), [("R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "random"),
                                             ("1,U,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "random"),
                                             ("MYSTERY", "INS"), ("1,0,1", "12, 17, 20 or 26"),
                                             ("1,a,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "not a number")])
def test_bad_lbw_values_are_refused_with_the_fix(spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_lbw_spec(spec)


# ---- which layer gets which factor ------------------------------------------------------------------------------

@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_each_layer_gets_the_extensions_ratio(sdxl):
    g = torch.Generator().manual_seed(3)
    slots = [round(v, 3) for v in (torch.rand(26, generator=g, dtype=torch.float64) * 3 - 1).tolist()]
    base_model = "sdxl" if sdxl else "sd1"
    for layer in _layers(sdxl=sdxl):
        key = "diffusion_model_" + _ldm_path(layer, blocks=3 if sdxl else 4).replace(".", "_")
        assert lbw_layer_weight(slots, "unet", layer, base_model=base_model) == ratiodealer(key, slots), (layer, key)
    text_keys = {"text_encoder": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
                 "text_encoder_2": "conditioner_embedders_1_model_transformer_resblocks_0_attn_in_proj"}
    for component, key in text_keys.items():
        assert lbw_layer_weight(slots, component, "text_model.encoder.layers.0.self_attn.q_proj",
                                base_model=base_model) == ratiodealer(key, slots) == slots[0]


# ---- the tag ----------------------------------------------------------------------------------------------------

def _tag(text):
    return extra_network_tags(text)[1][0]


def test_tag_reads_lbw_w_and_x_as_the_extension():
    from sdadapt.jobs.generate_prompt_tags import tag_block_weights

    assert tag_block_weights(_tag("<lora:a:0.8>")) is None
    assert tag_block_weights(_tag("<lora:a:0.8:lbw=OUTS>")) == tuple(to26([1.0, *[0.0] * 11, *[1.0] * 5]))
    assert tag_block_weights(_tag("<lora:a:0.8:w=OUTS>")) == tag_block_weights(_tag("<lora:a:0.8:lbw=OUTS>"))
    x17 = "X," + ",".join(["1"] * 16)
    assert tag_block_weights(_tag(f"<lora:a:1:lbw={x17}:x=0.3>"))[0] == 0.3  # (4 items: x= read)
    assert tag_block_weights(_tag(f"<lora:a:lbw={x17}:x=0.3>"))[0] == 1.0  # (3 items: the extension's 1)
    mine = {**LBW_PRESETS, "MINE": ",".join(["0.25"] * 12)}
    assert tag_block_weights(_tag("<lora:a:1:lbw=MINE>"), presets=mine) == tuple(to26([0.25] * 12))


@pytest.mark.parametrize("option", ["lbwe=ATTNDEEPON"])
def test_extension_options_not_built_are_refused_naming_the_tag(option):
    from sdadapt.jobs.generate_prompt_tags import tag_block_weights

    text = f"<lora:a:1:lbw=ALL:{option}>"
    with pytest.raises(InputError, match=re.escape(text)):
        tag_block_weights(_tag(text))


def test_preset_file_adds_to_the_builtin_presets(tmp_path):
    from sdadapt.jobs.generate_prompt_tags import read_lbw_presets

    file = tmp_path / "lbwpresets.txt"
    file.write_text("# my presets\nHALF:" + ",".join(["0.5"] * 26) + "\nINS:" + ",".join(["0"] * 17) + "\n")
    presets = read_lbw_presets(file)
    assert presets["HALF"] == ",".join(["0.5"] * 26) and presets["INS"] == ",".join(["0"] * 17)
    assert presets["OUTS"] == LBW_PRESETS["OUTS"]
    (tmp_path / "empty.txt").write_text("nothing here\n")
    with pytest.raises(InputError, match="no preset line"):
        read_lbw_presets(tmp_path / "empty.txt")


# ---- merged weights: ALL is no lbw, NONE is no LoRA, a vector is merge-lora --block-weights ---------------------

@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.formats.files import write_safetensors

    root = tmp_path_factory.mktemp("lbw")
    ckpt = tiny_sd1_file(root / "sd1.safetensors")
    g = torch.Generator().manual_seed(0)
    layers = {  # (kohya names: a text-encoder layer and UNet layers in down, mid and up blocks)
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64, ()),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32, ()),
        "lora_unet_down_blocks_0_downsamplers_0_conv": (32, 32, (3, 3)),
        "lora_unet_down_blocks_1_resnets_0_conv1": (64, 32, (3, 3)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (64, 64, ()),
        "lora_unet_up_blocks_0_resnets_1_conv2": (64, 64, (3, 3)),
        "lora_unet_up_blocks_1_attentions_0_proj_out": (32, 32, (1, 1)),
    }
    state = {}
    for key, (out, inp, kernel) in layers.items():
        state[f"{key}.lora_down.weight"] = torch.randn(4, inp, *kernel, generator=g) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(out, 4, *((1, 1) if kernel else ()), generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(2.0)
    write_safetensors(root / "style.safetensors", state, {})
    return ckpt, root / "style.safetensors"


_LOADED: dict = {}  # checkpoint path -> (system, its loaded weights): each file read once per module


def _merged(ckpt, lora, *, block_weights=None, te=0.8, unet=0.6):
    """The text encoder's and UNet's weights (copies) after merging ``lora`` into the checkpoint as loaded. The
    system is read once per file and its loaded weights put back before each merge (load_system is not what these
    tests test; the merge is, and it starts from the same bits)."""
    from sdadapt.jobs.generate import _apply_lora_file
    from sdadapt.jobs.models import load_system

    if str(ckpt) not in _LOADED:
        system = load_system(str(ckpt), device="cpu")
        _LOADED[str(ckpt)] = system, {name: {k: v.clone() for k, v in getattr(system, name).state_dict().items()}
                                      for name in ("text_encoder", "unet")}
    system, loaded = _LOADED[str(ckpt)]
    for name, state in loaded.items():
        getattr(system, name).load_state_dict(state)
    if lora is not None:
        _apply_lora_file(system, lora, te, unet_scale=unet, option="<lora:style>", block_weights=block_weights)
    return {**{f"te.{k}": v.clone() for k, v in system.text_encoder.state_dict().items()},
            **{f"unet.{k}": v.clone() for k, v in system.unet.state_dict().items()}}


def test_lbw_all_is_no_lbw_and_none_is_no_lora_bit_for_bit(sd1_file):
    """26 ones merge what no lbw merges; the 17-value ALL too, but for the layers in the blocks it leaves out (the
    extension's to26 zeros them: a LoCon's IN00/IN03/IN06/IN09-11/OUT00-02 layers); NONE merges nothing."""
    from sdadapt.merge.blocks import unet_block

    ckpt, lora = sd1_file
    plain, base = _merged(ckpt, lora), _merged(ckpt, None)
    ones, every, none = (_merged(ckpt, lora, block_weights=parse_lbw_spec(spec)) for spec in (",".join(["1"] * 26),
                                                                                              "ALL", "NONE"))
    assert sum(not torch.equal(base[k], plain[k]) for k in base) == 7
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    assert all(torch.equal(base[k], none[k]) for k in base)
    left_out = [k for k in plain if not torch.equal(plain[k], every[k])]
    assert len(left_out) == 2  # (the down sampler and an up-block resnet of the tiny UNet)
    for key in left_out:
        assert torch.equal(every[key], base[key])
        assert unet_block(key[len("unet."):].rsplit(".", 1)[0], architecture="sd1") not in BLOCKID17


def test_a_vector_merges_as_merge_lora_block_weights(sd1_file, tmp_path):
    from sdadapt.loratools.bake import merge_loras_into_checkpoint

    ckpt, lora = sd1_file
    vector = [0.5, 0.9, -0.75, 1.5, 0.25, 1, 1, 1, 1, 1, 1, 1, 1, 2.0, 1, 0.3, 1, -1.0, 1, 1, 1, 1, 1, 1, 1, 1]
    base = _merged(ckpt, None)
    tagged = _merged(ckpt, lora, block_weights=parse_lbw_spec(",".join(map(str, vector))), te=0.7, unet=0.7)
    baked = tmp_path / "baked.safetensors"
    merge_loras_into_checkpoint(ckpt, [lora], baked, strengths=0.7, block_weights=[vector])
    reference = _merged(baked, None)
    changed = [k for k in base if not torch.equal(base[k], reference[k])]
    assert len(changed) == 7
    for key in base:
        torch.testing.assert_close(tagged[key], reference[key], rtol=0, atol=1e-6)
    # (the vector moves the layers: not what no lbw merges)
    unweighted = _merged(ckpt, lora, te=0.7, unet=0.7)
    assert sum(not torch.equal(tagged[k], unweighted[k]) for k in changed) >= 4


def test_dora_layers_with_a_block_weight_are_refused(tmp_path):
    from sdadapt.jobs.generate_lbw import lbw_groups

    state = {"down_blocks.1.resnets.0.conv1.lora_down.weight": torch.zeros(2, 3, 3, 3),
             "down_blocks.1.resnets.0.conv1.lora_up.weight": torch.zeros(4, 2, 1, 1),
             "down_blocks.1.resnets.0.conv1.dora_scale": torch.ones(4, 1, 1, 1)}
    assert lbw_groups(state, "unet", 0.5, parse_lbw_spec("ALL"), sdxl=False)[0][0] == 0.5
    with pytest.raises(InputError, match="DoRA"):
        lbw_groups(state, "unet", 0.5, parse_lbw_spec("OUTS"), sdxl=False, tag="<lora:d:lbw=OUTS>")


def test_full_and_norm_bias_deltas_keep_the_multiplier_as_the_extension():
    """The extension's LORAANDSOON scales a full layer's ``weight`` (diff) and a norm layer's ``w_norm`` by the block
    ratio; their bias deltas stay at the tag's multiplier, also at ratio 0 (float64 reference: W + m·w·diff,
    b + m·diff_b)."""
    from sdadapt.jobs.generate_lbw import lbw_groups

    g = torch.Generator().manual_seed(3)
    full = {"down_blocks.1.resnets.0.conv1.diff": torch.randn(4, 3, 3, 3, generator=g),
            "down_blocks.1.resnets.0.conv1.diff_b": torch.randn(4, generator=g)}
    norm = {"up_blocks.1.resnets.0.norm1.w_norm": torch.randn(4, generator=g),
            "up_blocks.1.resnets.0.norm1.b_norm": torch.randn(4, generator=g)}
    lora = {"down_blocks.1.attentions.0.proj_in.lora_down.weight": torch.randn(2, 4, generator=g),
            "down_blocks.1.attentions.0.proj_in.lora_up.weight": torch.randn(4, 2, generator=g)}
    weights = parse_lbw_spec("INS")  # IN04/IN05 (down_blocks.1) 1 ... the OUT blocks 0
    for state, layer_weight in ((full, 1.0), (norm, 0.0)):
        (scale, merged), = lbw_groups(state, "unet", 0.8, weights, sdxl=False)
        assert scale == 0.8
        for key, value in state.items():
            expect = value if key.endswith(("diff_b", "b_norm")) else value * layer_weight
            assert torch.equal(merged[key], expect), key
    half = tuple(0.5 if 0 < i < 13 else 1.0 for i in range(26))  # the IN blocks at 0.5
    (scale, merged), = lbw_groups(full, "unet", 0.8, half, sdxl=False)
    assert scale == 0.8 and torch.equal(merged["down_blocks.1.resnets.0.conv1.diff_b"], full[
        "down_blocks.1.resnets.0.conv1.diff_b"])
    torch.testing.assert_close(merged["down_blocks.1.resnets.0.conv1.diff"].double() * scale,
                               full["down_blocks.1.resnets.0.conv1.diff"].double() * 0.8 * 0.5)
    (scale, merged), = lbw_groups(lora, "unet", 0.8, half, sdxl=False)  # a LoRA layer: one scale, its tensors as is
    assert scale == 0.8 * 0.5 and all(torch.equal(merged[k], v) for k, v in lora.items())


# ---- the hires prompt's networks --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from test_cli_train import _tiny_pipeline
    from tiny_lora import tiny_lora_state

    from sdadapt.formats.files import write_safetensors

    root = tmp_path_factory.mktemp("hires_tags")
    (root / "loras").mkdir()
    write_safetensors(root / "loras" / "ink.safetensors", tiny_lora_state(0), {})
    return _tiny_pipeline(root / "pipe"), root / "loras"


def _cli(pipe, out, prompt, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(pipe[0]), "--prompt", prompt, "--seed", "1", "--steps", "2",
                 "--sampler", "euler", "--guidance", "5", "--width", "32", "--height", "32", "--hires-scale", "2",
                 "--lora-dir", str(pipe[1]), "-q", "-o", str(out), *extra])


def _reference(pipe, prompt, hires_prompt, *, first_lora: bool, hires_lora: bool, seed: int = 1):
    """The image sampled by hand: the LoRA merged (apply_lora) for the passes that have it, undone otherwise,
    no conditions cache."""
    from contextlib import contextmanager

    from sdadapt.apply import apply_lora
    from sdadapt.formats import load_lora
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.models import load_system

    system = load_system(str(pipe[0]), device="cpu")
    components = load_lora(pipe[1] / "ink.safetensors")[0]

    def merge():
        return [apply_lora(getattr(system, c), state, scale=0.7) for c, state in components.items()]

    handles = merge() if first_lora else []

    @contextmanager
    def hires_networks():
        for handle in reversed(handles):
            handle.undo()
        second = merge() if hires_lora else []
        yield
        for handle in reversed(second):
            handle.undo()

    options = {"negative": "", "seed": seed, "steps": 2, "guidance": 5.0, "sampler": "euler", "karras": False,
               "height": 32, "width": 32, "cond": None, "plan": None}
    hires = HiresRequest((64, 64), prompt=hires_prompt)
    return sample_image(system, [prompt], options, hires=hires, hires_networks=hires_networks)[0]


def test_hires_prompt_with_the_same_tags_changes_nothing(pipe, tmp_path):
    assert _cli(pipe, tmp_path / "a.png", "a cat <lora:ink:0.7>") == 0
    assert _cli(pipe, tmp_path / "b.png", "a cat <lora:ink:0.7>", "--hires-prompt", "a cat <lora:ink:0.7>") == 0
    assert _pixels(tmp_path / "a.png") == _pixels(tmp_path / "b.png")


_SAME_EACH_CASE: dict = {}  # (what, checkpoint, ...) -> a reference image the parametrized cases share, made once


def _both_passes_with_the_lora(pipe):
    """:func:`_reference` with the LoRA in both passes, seed 1: the image both cases below differ from (made once)."""
    key = ("both", str(pipe[0]))
    if key not in _SAME_EACH_CASE:
        _SAME_EACH_CASE[key] = _reference(pipe, "a cat", "a cat", first_lora=True, hires_lora=True)
    return _SAME_EACH_CASE[key]


@pytest.mark.parametrize(("prompt", "hires_prompt"), [("a cat <lora:ink:0.7>", "a cat"),
                                                      ("a cat", "a cat <lora:ink:0.7>")])
def test_hires_prompt_tags_are_the_hires_pass_networks(pipe, tmp_path, prompt, hires_prompt):
    from sdadapt.images import write_png

    assert _cli(pipe, tmp_path / "cli.png", prompt, "--hires-prompt", hires_prompt, "--count", "2") == 0
    for index, seed in enumerate((1, 2)):
        image = _reference(pipe, "a cat", "a cat", first_lora="<lora" in prompt, hires_lora="<lora" in hires_prompt,
                           seed=seed)
        write_png(tmp_path / f"ref{index}.png", image)
        assert _pixels(tmp_path / f"cli-{index:02d}.png") == _pixels(tmp_path / f"ref{index}.png"), index
    write_png(tmp_path / "both.png", _both_passes_with_the_lora(pipe))
    assert _pixels(tmp_path / "both.png") != _pixels(tmp_path / "ref0.png")


def test_networks_switched_restores_the_first_pass_bits_and_the_cache():
    from sdadapt.apply import apply_lora
    from sdadapt.jobs.generate_hires import networks_switched

    class System:
        def condition(self, text):
            return text

    torch.manual_seed(0)
    system = System()
    system.unet = torch.nn.Module()
    system.unet.proj = torch.nn.Linear(4, 4)
    weight = system.unet.proj.weight
    before = weight.detach().clone()
    first_state = {"proj.lora_down.weight": torch.randn(2, 4), "proj.lora_up.weight": torch.randn(4, 2),
                   "proj.alpha": torch.tensor(2.0)}
    second_state = {k: v * 2 for k, v in first_state.items()}

    def apply(state):
        return lambda handles: handles.append(apply_lora(system.unet, state, scale=0.5))

    first: list = []
    apply(first_state)(first)
    merged = weight.detach().clone()
    system.condition = lambda text: "cached"
    with networks_switched(system, first=first, apply_first=apply(first_state), apply_second=apply(second_state)):
        assert system.condition("x") == "x"  # (the cache set aside: texts encode with the hires weights)
        assert not torch.equal(weight, merged) and not torch.equal(weight, before)
    assert torch.equal(weight, merged) and system.condition("x") == "cached" and len(first) == 1
    first[0].undo()
    assert torch.equal(weight, before)


def test_hires_tags_that_cannot_be_switched_exactly_are_refused(pipe, tmp_path):
    from sdadapt.jobs.generate import run_generate

    with pytest.raises(ValueError, match="--custom-diffusion"):
        run_generate(prompt="a cat <lora:ink:0.7>", hires_prompt="a cat", hires_scale=2.0, model=str(pipe[0]),
                     lora_dir=pipe[1], custom_diffusions=["cd.safetensors"], out=tmp_path / "x.png")


# ---- added by review RL -----------------------------------------------------------------------------------------

def test_commented_preset_lines_are_skipped_as_checkloadcond():
    line = ",".join(["1"] * 17)
    assert parse_lbw_presets(f"# OLD:{line}\nNEW:{line}  # note\nKEEP:{line}\n") == {"KEEP": line}


def test_a_unet_layer_outside_every_block_keeps_ratio_1():
    """The extension's ratiodealer leaves a UNet key no block matches at 1 (not BASE)."""
    slots = [0.25] * 26
    assert lbw_layer_weight(slots, "unet", "some_adapter.proj", base_model="sd1") == 1.0
    assert lbw_layer_weight(slots, "unet", "down_blocks.0.attentions.0.proj_in", base_model="sd1") == 0.25


def test_lbw_keeps_the_tags_te_and_unet_multipliers_apart(sd1_file):
    """A text-encoder layer merges at TE x BASE, a UNet layer at UNET x its block's weight."""
    ckpt, lora = sd1_file
    base_half = parse_lbw_spec(",".join(["0.5", *["1"] * 25]))
    tagged = _merged(ckpt, lora, block_weights=base_half, te=0.8, unet=0.6)
    te_ref, unet_ref = _merged(ckpt, lora, te=0.4, unet=0.4), _merged(ckpt, lora, te=0.6, unet=0.6)
    assert all(torch.equal(tagged[k], te_ref[k]) for k in tagged if k.startswith("te."))
    assert all(torch.equal(tagged[k], unet_ref[k]) for k in tagged if k.startswith("unet."))


def _presets(tmp_path):
    file = tmp_path / "lbwpresets.txt"
    file.write_text("MINE:" + ",".join(["0"] * 17) + "\n")
    return ["--lbw-presets", str(file)]


def test_hires_tag_lbw_from_the_preset_file_switches_the_hires_networks(pipe, tmp_path):
    """The hires prompt's lbw= (a --lbw-presets name) is part of what it merges: the same LoRA with all-zero
    blocks is no LoRA in the hires pass."""
    assert _cli(pipe, tmp_path / "lbw.png", "a cat <lora:ink:0.7>", "--hires-prompt", "a cat <lora:ink:0.7:lbw=MINE>",
                *_presets(tmp_path)) == 0
    assert _cli(pipe, tmp_path / "none.png", "a cat <lora:ink:0.7>", "--hires-prompt", "a cat") == 0
    assert _cli(pipe, tmp_path / "same.png", "a cat <lora:ink:0.7>") == 0
    assert _pixels(tmp_path / "lbw.png") == _pixels(tmp_path / "none.png")
    assert _pixels(tmp_path / "lbw.png") != _pixels(tmp_path / "same.png")


def test_prompt_tag_lbw_reads_the_preset_file(pipe, tmp_path):
    assert _cli(pipe, tmp_path / "lbw.png", "a cat <lora:ink:0.7:lbw=MINE>", "--hires-prompt", "a cat",
                *_presets(tmp_path)) == 0
    assert _cli(pipe, tmp_path / "plain.png", "a cat", "--hires-prompt", "a cat") == 0
    assert _pixels(tmp_path / "lbw.png") == _pixels(tmp_path / "plain.png")


def test_overlapping_hires_loras_are_undone_in_reverse_for_the_next_image(pipe, tmp_path):
    """Two hires tag LoRAs on the same layers: undone as a stack, so image 2's first pass is image 2 alone."""
    hires = ["--hires-prompt", "a cat <lora:ink:0.7> <lora:ink:0.3>"]
    assert _cli(pipe, tmp_path / "two.png", "a cat", *hires, "--count", "2") == 0
    from sdadapt.cli import main

    assert main(["generate", "--model", str(pipe[0]), "--prompt", "a cat", "--seed", "2", "--steps", "2",
                 "--sampler", "euler", "--guidance", "5", "--width", "32", "--height", "32", "--hires-scale", "2",
                 "--lora-dir", str(pipe[1]), "-q", "-o", str(tmp_path / "alone.png"), *hires]) == 0
    assert _pixels(tmp_path / "two-01.png") == _pixels(tmp_path / "alone.png")


def test_hires_hypernetwork_tags_that_differ_are_refused(pipe, tmp_path):
    from sdadapt.jobs.generate import run_generate

    (tmp_path / "hn").mkdir()
    (tmp_path / "hn" / "hn.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="<hypernet:> tags differ"):
        run_generate(prompt="a cat <hypernet:hn:1>", hires_prompt="a cat", hires_scale=2.0, model=str(pipe[0]),
                     hypernetwork_dir=tmp_path / "hn", out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_missing_preset_file_is_named(tmp_path):
    from sdadapt.jobs.generate_prompt_tags import read_lbw_presets

    with pytest.raises(InputError, match=re.escape(f"--lbw-presets {tmp_path / 'nope.txt'}: no such file")):
        read_lbw_presets(tmp_path / "nope.txt")


def test_the_same_hires_tags_with_custom_diffusion_are_not_refused(pipe, tmp_path):
    """Only a switch would undo --custom-diffusion's weights: the same tags in both prompts go on (here to the
    missing --custom-diffusion file's own error)."""
    from sdadapt.jobs.generate import run_generate

    with pytest.raises(Exception) as error:
        run_generate(prompt="a cat <lora:ink:0.7>", hires_prompt="a cat <lora:ink:0.7>", hires_scale=2.0,
                     model=str(pipe[0]), lora_dir=pipe[1], custom_diffusions=[str(tmp_path / "cd.safetensors")],
                     out=tmp_path / "x.png")
    assert "--hires-prompt" not in str(error.value) and "cd.safetensors" in str(error.value)


def test_the_prompts_page_lbw_example_runs():
    """docs/prompts.md's lbw block: its asserts are the claims (MIDD's mid block 1, IN01 0, BASE 1)."""
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("prompts.md")) if "parse_lbw_spec" in block)
    namespace = run_block("prompts.md", index)
    assert namespace["slots"][0] == 1.0 and len(namespace["slots"]) == 26


# ---- start= / stop= / step=: the UNet part switched per model call as the extension's counter -------------------

class _Extension:
    """hako-mikan's ``denoiser_callback`` (A1111's path: ``elif self.active``) for one tag named "ink", transcribed:
    ``on``: whether its multipliers are the tag's (True) or 0 (False); ``loradealer`` sets ``starts`` / ``stops``."""

    def __init__(self, start, stop):
        self.starts = {} if start is None else {"ink": [int(start), 0.7, 0.7]}
        self.stops = {} if stop is None else {"ink": int(stop)}
        self.on = True  # (activated at the tag's multipliers before sampling)

    def denoiser_callback(self, sampling_step):
        if self.starts and sampling_step == 0:
            for key, step_te_u in self.starts.items():
                self.on = False
        if self.starts:
            sets = []
            for key, step_te_u in self.starts.items():
                step, _te, _u = step_te_u
                if sampling_step > step - 2:
                    self.on = True
                    sets.append(key)
            for key in sets:
                if key in self.starts:
                    del self.starts[key]
        if self.stops:
            sets = []
            for key, step in self.stops.items():
                if sampling_step > step - 2:
                    self.on = False
                    sets.append(key)
            for key in sets:
                if key in self.stops:
                    del self.stops[key]


#: k-diffusion's samplers with a second model call per step after the callback, on every step but the last
#: (``sample_heun`` / ``sample_dpm_2``: unless σ_next is 0; ``..._ancestral`` ones: unless σ_down is 0;
#: ``sample_dpmpp_sde``: unless σ_next is 0)
_TWO_CALLS = {"heun", "dpm_2", "dpm_2_a", "dpmpp_2s_a", "dpmpp_sde"}


def _a1111_calls(sampler, steps):
    """A1111's ``state.sampling_step`` at each model call of k-diffusion's sampler: ``launch_sampling`` sets 0,
    ``callback_state`` sets ``i`` right after step i's first model call (a second call comes after it)."""
    sampling_step, seen = 0, []
    for i in range(steps):
        seen.append(sampling_step)  # (the step's first model call)
        sampling_step = i  # (callback({'i': i, ...}))
        if sampler in _TWO_CALLS and i < steps - 1:
            seen.append(sampling_step)
    return seen


def _extension_on(sampler, steps, start, stop):
    extension, on = _Extension(start, stop), []
    for sampling_step in _a1111_calls(sampler, steps):
        extension.denoiser_callback(sampling_step)
        on.append(extension.on)
    return on


@pytest.mark.parametrize(("text", "expected"), [
    ("<lora:a:0.8>", None), ("<lora:a:0.8:start=3>", (3, None)), ("<lora:a:0.8:stop=7>", (None, 7)),
    ("<lora:a:0.8:start=2:stop=9>", (2, 9)), ("<lora:a:0.8:start=1:stop=9:step=3-5>", (3, 5)),
    ("<lora:a:0.8:lbw=OUTS:step=0-4>", (0, 4)), ("<lora:a:0.8:start=-1>", (-1, None))])
def test_step_options_are_read_as_the_extension(text, expected):
    from sdadapt.jobs.generate_lbw_steps import StepRange, tag_step_range

    assert tag_step_range(_tag(text)) == (None if expected is None else StepRange(*expected))


@pytest.mark.parametrize(("option", "words"), [("start=2.5", "whole number"), ("stop=x", "whole number"),
                                               ("step=5", "step=A-B"), ("step=-3", "step=A-B"),
                                               ("step=1-2-3", "step=A-B")])
def test_bad_step_options_are_refused_naming_the_tag(option, words):
    from sdadapt.jobs.generate_lbw_steps import tag_step_range

    text = f"<lora:a:1:{option}>"
    with pytest.raises(InputError, match=re.escape(text) + ".*" + re.escape(words)):
        tag_step_range(_tag(text))


@settings(max_examples=150, deadline=None)
@given(sampler=st.sampled_from(["euler", "euler_a", "lms", "ddim", "dpmsolver++", *sorted(_TWO_CALLS)]),
       steps=st.integers(1, 7),
       start=st.none() | st.integers(-1, 9), stop=st.none() | st.integers(-1, 9))
def test_the_switch_follows_the_extensions_counter(sampler, steps, start, stop):
    """sdadapt's samplers announce (steps done, calls in the step) before each model call; read by
    a1111_sampling_step + unet_on they give the transcribed extension's on/off at every call of the same sampler."""
    from sdadapt import samplers
    from sdadapt.jobs.generate_lbw_steps import StepRange, a1111_sampling_step, unet_on

    seen = []
    samplers.sample_latents(lambda x, t, c: x * 0.1, torch.zeros(1, 1, 2, 2), None, sampler=sampler,
                            alphas_cumprod=torch.linspace(0.999, 0.01, 1000), num_steps=steps,
                            generator=torch.Generator().manual_seed(0),
                            before_model_call=lambda done, calls: seen.append((done, calls)))
    ours = [unet_on(StepRange(start, stop), a1111_sampling_step(done, calls)) for done, calls in seen]
    assert ours == _extension_on(sampler, steps, start, stop)


@settings(max_examples=40, deadline=None)
@given(ranges=st.lists(st.tuples(st.none() | st.integers(0, 6), st.none() | st.integers(0, 6)), min_size=1,
                       max_size=3))
def test_switched_parts_are_merged_in_order_and_undone_bit_for_bit(ranges):
    """Overlapping parts that switch at different calls: at every call the weights are a fresh merge of the parts
    that are on, in tag order; after release, the weights before, bit for bit."""
    from sdadapt.apply import apply_lora
    from sdadapt.jobs.generate_lbw_steps import (
        StepRange,
        StepSwitchedLoRAs,
        a1111_sampling_step,
        unet_on,
    )

    g = torch.Generator().manual_seed(len(ranges))
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    before = layer[0].weight.detach().clone()
    states = [{"0.lora_down.weight": torch.randn(2, 8, generator=g), "0.lora_up.weight": torch.randn(8, 2, generator=g),
               "0.alpha": torch.tensor(2.0)} for _ in ranges]
    switch = StepSwitchedLoRAs([(StepRange(*r), [(layer, state, 0.5 + i)]) for i, (r, state) in
                                enumerate(zip(ranges, states))])
    for done in range(7):
        switch(done, 0)
        on = [i for i, r in enumerate(ranges) if unet_on(StepRange(*r), a1111_sampling_step(done, 0))]
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 8))
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            fresh[0].weight.copy_(before)
        for i in on:
            apply_lora(fresh, states[i], scale=0.5 + i)
        assert torch.equal(layer[0].weight, fresh[0].weight), (done, on)
    switch.release()
    assert torch.equal(layer[0].weight, before)


def _cli_steps(pipe, out, prompt, *extra, sampler="euler"):
    from sdadapt.cli import main

    return main(["generate", "--model", str(pipe[0]), "--prompt", prompt, "--seed", "1", "--steps", "4",
                 "--sampler", sampler, "--guidance", "5", "--width", "32", "--height", "32",
                 "--lora-dir", str(pipe[1]), "-q", "-o", str(out), *extra])


def _switched_by_hand(pipe, wanted, *, sampler="euler", seed=1, init_image=None, hires=None):
    """The image sampled by hand, without generate's switch: the text-encoder part merged before sampling, the UNet
    part merged / undone by a forward pre-hook on the UNet from its call count (one UNet call per model call: the
    conditionings batch) as ``wanted`` says. Returns the image and the number of UNet calls made."""
    from sdadapt.apply import apply_lora
    from sdadapt.formats import load_lora
    from sdadapt.jobs.generate_hires import sample_image
    from sdadapt.jobs.models import load_system

    system = load_system(str(pipe[0]), device="cpu")
    components = load_lora(pipe[1] / "ink.safetensors")[0]
    apply_lora(system.text_encoder, components["text_encoder"], scale=0.7)
    merged, calls = [], [0]

    def pre_hook(module, args):
        on = wanted[calls[0]]
        calls[0] += 1
        if on and not merged:
            merged.append(apply_lora(system.unet, components["unet"], scale=0.7))
        elif not on and merged:
            merged.pop().undo()

    hook = system.unet.register_forward_pre_hook(pre_hook)
    options = {"negative": "", "seed": seed, "steps": 4, "guidance": 5.0, "sampler": sampler, "karras": False,
               "height": 32, "width": 32, "cond": None, "plan": None}
    extra = {} if hires is None else {"hires": hires}
    if init_image is not None:
        from sdadapt.jobs.generate_hires import init_latents_from_image

        extra.update(init_latents=init_latents_from_image(system, init_image, height=32, width=32),
                     denoising_strength=0.6)
    try:
        image = sample_image(system, ["a cat"], options, **extra)[0]
    finally:
        hook.remove()
    return image, calls[0]


def _stepped_reference(pipe, *, sampler, start, stop, seed, init_image=None):
    """The image with the LoRA switched by hand by the transcribed extension's counter (:func:`_switched_by_hand`)."""
    # (img2img runs part of the grid; Euler's on/off at a call does not depend on how many steps follow it)
    wanted = _extension_on(sampler, 4 if init_image is None else 20, start, stop)
    image, made = _switched_by_hand(pipe, wanted, sampler=sampler, seed=seed, init_image=init_image)
    assert made == len(wanted) or init_image is not None
    return image


@pytest.mark.parametrize(("sampler", "option", "start", "stop"), [
    ("euler", "start=3", 3, None), ("euler", "step=2-4", 2, 4), ("heun", "start=2", 2, None),
    ("heun", "stop=3", None, 3)])
def test_a_step_range_is_the_lora_switched_by_hand(pipe, tmp_path, sampler, option, start, stop):
    """Each image (two: the second starts from restored weights) equals the hand-switched one; Heun's switches
    fall between a step's two model calls."""
    from sdadapt.images import write_png

    assert _cli_steps(pipe, tmp_path / "cli.png", f"a cat <lora:ink:0.7:{option}>", "--count", "2",
                      sampler=sampler) == 0
    for index, seed in enumerate((1, 2)):
        write_png(tmp_path / f"ref{index}.png", _stepped_reference(pipe, sampler=sampler, start=start, stop=stop,
                                                                   seed=seed))
        assert _pixels(tmp_path / f"cli-{index:02d}.png") == _pixels(tmp_path / f"ref{index}.png"), index
    key = ("always", str(pipe[0]), sampler)  # (the same image for each case of one sampler: made once)
    if key not in _SAME_EACH_CASE:
        _SAME_EACH_CASE[key] = _stepped_reference(pipe, sampler=sampler, start=None, stop=None, seed=1)
    write_png(tmp_path / "always.png", _SAME_EACH_CASE[key])
    assert _pixels(tmp_path / "always.png") != _pixels(tmp_path / "ref0.png")


def test_start_0_and_a_stop_past_the_end_are_no_option_and_stop_0_is_the_text_encoder_part_alone(pipe, tmp_path):
    from sdadapt.images import write_png

    assert _cli_steps(pipe, tmp_path / "plain.png", "a cat <lora:ink:0.7>") == 0
    for name, option in (("start", "start=0"), ("late", "stop=9")):
        assert _cli_steps(pipe, tmp_path / f"{name}.png", f"a cat <lora:ink:0.7:{option}>") == 0
        assert _pixels(tmp_path / f"{name}.png") == _pixels(tmp_path / "plain.png"), option
    assert _cli_steps(pipe, tmp_path / "stop0.png", "a cat <lora:ink:0.7:stop=0>") == 0
    write_png(tmp_path / "te.png", _stepped_reference(pipe, sampler="euler", start=None, stop=0, seed=1))
    assert _pixels(tmp_path / "stop0.png") == _pixels(tmp_path / "te.png")
    assert _pixels(tmp_path / "stop0.png") != _pixels(tmp_path / "plain.png")


@pytest.mark.parametrize(("extra", "words"), [(("--sampler", "pndm"), "pndm")])
def test_step_ranges_that_cannot_be_counted_as_a1111_are_refused(pipe, tmp_path, extra, words):
    from sdadapt.jobs.generate import run_generate

    options = {"sampler": extra[1]} if extra[0] == "--sampler" else {"hires_scale": 2.0}
    with pytest.raises(ValueError, match=re.escape("<lora:ink:0.7:start=2>") + ".*" + words):
        run_generate(prompt="a cat <lora:ink:0.7:start=2>", model=str(pipe[0]), lora_dir=pipe[1],
                     out=tmp_path / "x.png", **options)
    assert not (tmp_path / "x.png").exists()


def test_the_prompts_page_step_range_example_runs():
    """docs/prompts.md's step-range block: its asserts are the claims (start=3:stop=5 on Euler, Heun's second call)."""
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("prompts.md")) if "a1111_sampling_step" in block)
    run_block("prompts.md", index)


def test_img2img_counts_its_shortened_schedule_from_0(pipe, tmp_path):
    from PIL import Image

    from sdadapt.images import write_png

    rng = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(tmp_path / "init.png")
    assert _cli_steps(pipe, tmp_path / "cli.png", "a cat <lora:ink:0.7:start=2>", "--init-image",
                      str(tmp_path / "init.png"), "--denoising-strength", "0.6") == 0
    write_png(tmp_path / "ref.png", _stepped_reference(pipe, sampler="euler", start=2, stop=None, seed=1,
                                                       init_image=tmp_path / "init.png"))
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "ref.png")
    write_png(tmp_path / "always.png", _stepped_reference(pipe, sampler="euler", start=None, stop=None, seed=1,
                                                          init_image=tmp_path / "init.png"))
    assert _pixels(tmp_path / "always.png") != _pixels(tmp_path / "ref.png")


# ---- review RS: refusals per sampler, merges per switch only, the protocol path, the report, errors mid-sampling --

@pytest.mark.parametrize("sampler", ["pndm"])
def test_each_sampler_without_the_counter_is_refused_naming_tag_and_sampler(sampler):
    from sdadapt.jobs.generate_lbw_steps import check_step_range_sampler

    with pytest.raises(InputError, match=re.escape("<lora:a:1:start=2>") + ".*" + sampler):
        check_step_range_sampler(sampler, "<lora:a:1:start=2>")


def test_samplers_that_follow_the_counter_are_not_refused():
    from sdadapt import samplers
    from sdadapt.jobs.generate_lbw_steps import (
        UNSTEPPED_SAMPLERS,
        check_step_range_sampler,
    )

    for name in set(samplers.SAMPLERS) - UNSTEPPED_SAMPLERS:
        check_step_range_sampler(name, "<lora:a:1:start=2>")


def test_parts_are_merged_at_a_switch_only_not_at_every_model_call(monkeypatch):
    """Performance: a merge per switch (and an undo per switch), none at the calls in between."""
    import sdadapt.apply as apply_module
    from sdadapt.jobs.generate_lbw_steps import StepRange, StepSwitchedLoRAs

    merges = []
    real = apply_module.apply_lora

    def counted(*args, **kwargs):
        merges.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "apply_lora", counted)
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    state = {"0.lora_down.weight": torch.randn(2, 8, generator=g), "0.lora_up.weight": torch.randn(8, 2, generator=g)}
    switch = StepSwitchedLoRAs([(StepRange(3, 6), [(layer, state, 1.0)])])
    for done in range(10):  # (on at steps 3, 4, 5 of a one-call sampler: one merge)
        for calls in (0, 1):
            switch(done, calls)
    assert len(merges) == 1
    switch.release()


def test_the_hook_reaches_the_samplers_through_the_protocol_path():
    """A system whose own sample takes no before_model_call (the toy) still has the hook called per model call."""
    from sdadapt.sampling import generate
    from sdadapt.toy.system import build_toy

    seen = []
    generate(build_toy(seed=0).eval(), ["a red circle"], seed=1, steps=3, sampler="heun",
             before_model_call=lambda done, calls: seen.append((done, calls)))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    from sdadapt.prompt_guidance import plan_prompt

    seen.clear()  # (prompt editing and AND: the plan guides inside the one announced call)
    generate(build_toy(seed=0).eval(), ["a red circle"], seed=1, steps=4, sampler="euler",
             plan=plan_prompt("a [red:blue:2] circle AND a ring", "x", steps=4),
             before_model_call=lambda done, calls: seen.append((done, calls)))
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_the_report_names_each_tags_step_range(pipe, tmp_path):
    from sdadapt.jobs.generate import run_generate

    result = run_generate(prompt="a cat <lora:ink:0.7:step=2-3>", model=str(pipe[0]), lora_dir=pipe[1], steps=3,
                          sampler="euler", width=32, height=32, out=tmp_path / "x.png")
    assert result["loras"][0]["steps"] == {"start": 2, "stop": 3}
    plain = run_generate(prompt="a cat <lora:ink:0.7>", model=str(pipe[0]), lora_dir=pipe[1], steps=3,
                         sampler="euler", width=32, height=32, out=tmp_path / "y.png")
    assert result["loras"][0]["layers"] == plain["loras"][0]["layers"] == 2  # (the UNet layer counted, unmerged)


@pytest.mark.parametrize(("prompt", "extra", "words"), [
    ("a cat <lora:ink:0.7:start=2>", {"sampler": " PNDM"}, "pndm"),  # (the canonical name is checked)
    ("a cat <lora:ink:0.7>", {"sampler": "euler", "hires_scale": 2.0, "hires_prompt": "a cat <lora:ink:0.7:start=2>"},
     "hires pass")])  # (a step range in the hires prompt alone is refused too)
def test_step_ranges_are_refused_by_alias_and_in_the_hires_prompt(pipe, tmp_path, prompt, extra, words):
    from sdadapt.jobs.generate import run_generate

    with pytest.raises(ValueError, match=re.escape("<lora:ink:0.7:start=2>") + ".*" + words):
        run_generate(prompt=prompt, model=str(pipe[0]), lora_dir=pipe[1], out=tmp_path / "x.png", **extra)
    assert not (tmp_path / "x.png").exists()


def test_the_hook_keeps_the_callers_callback():
    from sdadapt import samplers

    steps, seen = [], []
    samplers.sample_latents(lambda x, t, c: x * 0.1, torch.zeros(1, 1, 2, 2), None, sampler="heun",
                            alphas_cumprod=torch.linspace(0.999, 0.01, 1000), num_steps=3,
                            callback=lambda i, t, x: steps.append(i),
                            before_model_call=lambda done, calls: seen.append((done, calls)))
    assert steps == [0, 1, 2] and len(seen) == 5


def test_an_error_mid_sampling_leaves_the_unet_without_the_switched_part(pipe, tmp_path, monkeypatch):
    """The part is merged at the third model call; the fourth raises: the UNet's weights are the loaded ones."""
    import sdadapt.jobs.generate as generate_module

    loaded, real_load = [], generate_module.load_system

    def load(*args, **kwargs):
        system = real_load(*args, **kwargs)
        loaded.append((system, {k: v.clone() for k, v in system.unet.state_dict().items()}))
        calls = [0]

        def pre_hook(module, args):
            calls[0] += 1
            if calls[0] == 4:
                assert any(not torch.equal(v, loaded[0][1][k]) for k, v in system.unet.state_dict().items())
                raise RuntimeError("interrupted")

        system.unet.register_forward_pre_hook(pre_hook)
        return system

    monkeypatch.setattr(generate_module, "load_system", load)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_module.run_generate(prompt="a cat <lora:ink:0.7:start=2>", model=str(pipe[0]), lora_dir=pipe[1],
                                     steps=4, sampler="euler", guidance=5.0, width=32, height=32,
                                     out=tmp_path / "x.png")
    system, before = loaded[0]
    assert all(torch.equal(v, before[k]) for k, v in system.unet.state_dict().items())
    assert not (tmp_path / "x.png").exists()


def test_conditions_that_do_not_batch_are_one_announced_call():
    from sdadapt import samplers

    seen = []
    samplers.sample_latents(lambda x, t, c: x * 0.1, torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 4), sampler="euler",
                            uncond=torch.zeros(1, 2, 4), guidance_scale=5.0,
                            alphas_cumprod=torch.linspace(0.999, 0.01, 1000), num_steps=3,
                            before_model_call=lambda done, calls: seen.append((done, calls)))
    assert seen == [(0, 0), (1, 0), (2, 0)]




@pytest.mark.parametrize("mid", [False, True])
def test_a_lora_layer_with_a_bias_delta_moves_by_the_block_weight_once(mid):
    """A LoRA (or LoCon-Tucker) layer carrying a ``diff_b`` at block weight w: the extension scales its up factor
    (``lbw()``), so ΔW moves by w and the bias delta keeps the tag's multiplier. Each factor was scaled before
    (w³ ΔW, w⁴ with ``lora_mid``). Float64 reference written out: m·w·(α/r)·up @ down, and m·diff_b."""
    from sdadapt.adapters.base import LayerGeometry
    from sdadapt.adapters.registry import file_layer_delta
    from sdadapt.formats.layers import group_by_layer
    from sdadapt.jobs.generate_lbw import lbw_groups

    g = torch.Generator().manual_seed(4)
    layer = "down_blocks.1.resnets.0.conv1"
    if mid:  # (LoCon Tucker: down 1x1, mid kxk, up 1x1)
        factors = {"lora_down.weight": torch.randn(2, 3, 1, 1, generator=g, dtype=torch.float64),
                   "lora_mid.weight": torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64),
                   "lora_up.weight": torch.randn(4, 2, 1, 1, generator=g, dtype=torch.float64)}
        delta = torch.einsum("ia,abkl,bj->ijkl", factors["lora_up.weight"][:, :, 0, 0],
                             factors["lora_mid.weight"], factors["lora_down.weight"][:, :, 0, 0])
    else:
        factors = {"lora_down.weight": torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64),
                   "lora_up.weight": torch.randn(4, 2, 1, 1, generator=g, dtype=torch.float64)}
        delta = (factors["lora_up.weight"].reshape(4, 2) @ factors["lora_down.weight"].reshape(2, -1)).reshape(4, 3, 3, 3)
    state = {f"{layer}.{k}": v for k, v in {**factors, "alpha": torch.tensor(1.0, dtype=torch.float64),
                                             "diff_b": torch.randn(4, generator=g, dtype=torch.float64)}.items()}
    half = tuple(0.5 if 0 < i < 13 else 1.0 for i in range(26))  # the IN blocks at 0.5
    (scale, merged), = lbw_groups(state, "unet", 0.8, half, sdxl=False)
    tensors = group_by_layer(merged)[layer]
    got_w, got_b = file_layer_delta(tensors, LayerGeometry(4, 3, (3, 3), padding=(1, 1), has_bias=True),
                                    scale=scale, dtype=torch.float64)
    torch.testing.assert_close(got_w, 0.8 * 0.5 * 0.5 * delta, rtol=1e-12, atol=1e-12)  # (alpha 1 / rank 2)
    torch.testing.assert_close(got_b, 0.8 * state[f"{layer}.diff_b"], rtol=1e-12, atol=1e-12)
