"""Format translations: kohya <-> canonical <-> diffusers/peft, detection, and applying files to models.

The round trips are pure translation (no diffusers needed): random LoRA states over real layer
paths of the tiny test models (listed below and checked against the live models when diffusers is
installed), random ranks and non-integer alphas, must come back bit for bit.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdadapt
from sdadapt.errors import NonFiniteError
from sdadapt.formats import (
    LayerNotFoundError,
    WeightFileError,
    from_diffusers,
    from_kohya,
    load_diffusers,
    load_kohya,
    load_lora,
    load_peft,
    save_diffusers,
    save_kohya,
    save_peft,
    to_diffusers,
    to_kohya,
    write_safetensors,
)
from sdadapt.formats.diffusers import METADATA_KEY
from sdadapt.formats.layers import split_key
from sdadapt.formats.unet_names import attention_up_blocks, diffusers_to_ldm_unet

# ------------------------------------------------------------------------ real layer paths
# Every nn.Linear / nn.Conv2d of tests/tiny_models.py's models (checked by test_paths_are_real).


def _attention(prefix: str, blocks: int) -> list[str]:
    out = [f"{prefix}.proj_in"]
    for t in range(blocks):
        tb = f"{prefix}.transformer_blocks.{t}"
        out += [f"{tb}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        out += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
    return out + [f"{prefix}.proj_out"]


def _resnet(prefix: str, shortcut: bool) -> list[str]:
    return [f"{prefix}.conv1", f"{prefix}.time_emb_proj", f"{prefix}.conv2"] + ([f"{prefix}.conv_shortcut"] if shortcut else [])


SD1_UNET_PATHS = [
    "conv_in",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    *_attention("down_blocks.0.attentions.0", 1),
    *_attention("down_blocks.0.attentions.1", 1),
    *_resnet("down_blocks.0.resnets.0", False),
    *_resnet("down_blocks.0.resnets.1", False),
    "down_blocks.0.downsamplers.0.conv",
    *_resnet("down_blocks.1.resnets.0", True),
    *_resnet("down_blocks.1.resnets.1", False),
    *[p for j in range(3) for p in _resnet(f"up_blocks.0.resnets.{j}", True)],
    "up_blocks.0.upsamplers.0.conv",
    *[p for j in range(3) for p in _attention(f"up_blocks.1.attentions.{j}", 1)],
    *[p for j in range(3) for p in _resnet(f"up_blocks.1.resnets.{j}", True)],
    *_attention("mid_block.attentions.0", 1),
    *_resnet("mid_block.resnets.0", False),
    *_resnet("mid_block.resnets.1", False),
    "conv_out",
]

SDXL_UNET_PATHS = [
    "conv_in",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
    *_resnet("down_blocks.0.resnets.0", False),
    *_resnet("down_blocks.0.resnets.1", False),
    "down_blocks.0.downsamplers.0.conv",
    *_attention("down_blocks.1.attentions.0", 2),
    *_attention("down_blocks.1.attentions.1", 2),
    *_resnet("down_blocks.1.resnets.0", True),
    *_resnet("down_blocks.1.resnets.1", False),
    *[p for j in range(3) for p in _attention(f"up_blocks.0.attentions.{j}", 2)],
    *[p for j in range(3) for p in _resnet(f"up_blocks.0.resnets.{j}", True)],
    "up_blocks.0.upsamplers.0.conv",
    *[p for j in range(3) for p in _resnet(f"up_blocks.1.resnets.{j}", True)],
    *_attention("mid_block.attentions.0", 2),
    *_resnet("mid_block.resnets.0", False),
    *_resnet("mid_block.resnets.1", False),
    "conv_out",
]

# canonical (transformers-4 spelling) CLIP paths
CLIP_PATHS = [
    f"text_model.encoder.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
]
CLIP_PROJECTION_PATHS = CLIP_PATHS + ["text_projection"]

COMPONENT_PATHS = {
    "sd1": {"unet": SD1_UNET_PATHS, "text_encoder": CLIP_PATHS},
    "sdxl": {"unet": SDXL_UNET_PATHS, "text_encoder": CLIP_PATHS, "text_encoder_2": CLIP_PROJECTION_PATHS},
}

_LDM_HEADS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _linear_conv_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def test_paths_are_real():
    tiny = pytest.importorskip("tiny_models")
    pytest.importorskip("diffusers")
    assert sorted(_linear_conv_paths(tiny.tiny_unet_sd1())) == sorted(SD1_UNET_PATHS)
    assert sorted(_linear_conv_paths(tiny.tiny_unet_sdxl())) == sorted(SDXL_UNET_PATHS)
    projection = sorted(_linear_conv_paths(tiny.tiny_clip(with_projection=True)))
    assert projection == sorted(CLIP_PROJECTION_PATHS)
    # transformers 5 flattens CLIPTextModel (no `text_model.`); 4.x keeps it
    plain = {n.removeprefix("text_model.") for n in _linear_conv_paths(tiny.tiny_clip())}
    assert plain == {p.removeprefix("text_model.") for p in CLIP_PATHS}


# ------------------------------------------------------------------------ strategies
_ALPHAS = st.one_of(
    st.sampled_from([1.0, 0.5, 4.0, 8.0, 0.1, 1e-3]),
    st.floats(min_value=2.0**-10, max_value=1024.0, width=32, allow_nan=False, allow_infinity=False),
)
_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def component_states(draw, base_model: str, *, alphas: bool = True):
    """``{component: canonical state}`` over real layer paths, random ranks/alphas/kernels."""
    paths = COMPONENT_PATHS[base_model]
    components = draw(st.lists(st.sampled_from(sorted(paths)), min_size=1, max_size=len(paths), unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(_DTYPES)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component in components:
        layers = draw(st.lists(st.sampled_from(paths[component]), min_size=1, max_size=8, unique=True))
        state: dict[str, torch.Tensor] = {}
        for layer in layers:
            rank = draw(st.integers(1, 12))
            kernel = draw(st.sampled_from([(), (1, 1), (3, 3)]))
            fan_in, fan_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
            state[f"{layer}.lora_down.weight"] = torch.randn(rank, fan_in, *kernel, generator=g).to(dtype)
            state[f"{layer}.lora_up.weight"] = torch.randn(fan_out, rank, *([1] * len(kernel)), generator=g).to(dtype)
            if alphas:
                alpha = draw(st.one_of(st.just(float(rank)), _ALPHAS))
                state[f"{layer}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        out[component] = state
    return out


def _assert_components_equal(got, want) -> None:
    assert set(got) == set(want)
    for component, state in want.items():
        assert set(got[component]) == set(state), component
        for key, value in state.items():
            other = got[component][key]
            assert other.dtype == value.dtype, key
            assert other.shape == value.shape, key
            assert torch.equal(other, value), key


_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------ kohya round trips


@_SETTINGS
@given(components=component_states("sd1"))
def test_kohya_round_trip_sd1(components):
    state = to_kohya(components, base_model="sd1")
    assert len(state) == sum(len(s) for s in components.values())  # no two layers collide
    for key in state:
        assert _KOHYA_KEY.match(key), key
        if key.startswith("lora_unet_"):
            assert not key[len("lora_unet_") :].startswith(_LDM_HEADS), f"SD1 UNet keys use diffusers paths: {key}"
        else:
            assert key.startswith("lora_te_text_model_encoder_layers_"), key
    _assert_components_equal(from_kohya(state), components)


@_SETTINGS
@given(components=component_states("sdxl"))
def test_kohya_round_trip_sdxl_with_ldm_unet_names(components):
    state = to_kohya(components, base_model="sdxl")
    assert len(state) == sum(len(s) for s in components.values())
    for key in state:
        assert _KOHYA_KEY.match(key), key
        if key.startswith("lora_unet_"):
            assert key[len("lora_unet_") :].startswith(_LDM_HEADS), f"SDXL UNet keys use LDM paths: {key}"
        else:
            assert key.startswith(("lora_te1_", "lora_te2_")), key
    for key in components.get("text_encoder_2", {}):
        assert f"lora_te2_{split_key(key)[0].replace('.', '_')}" in {k.split(".", 1)[0] for k in state}
    _assert_components_equal(from_kohya(state), components)


def test_kohya_sdxl_unet_names_are_the_known_ldm_names():
    one = {"unet": {}}
    for path in ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "mid_block.resnets.1.conv2", "up_blocks.0.upsamplers.0.conv", "conv_in", "add_embedding.linear_2"):
        one["unet"][f"{path}.lora_down.weight"] = torch.zeros(1, 1)
    keys = {k.split(".", 1)[0] for k in to_kohya(one, base_model="sdxl")}
    assert keys == {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_2_2_conv",  # up block 0 has attention -> upsampler at .2
        "lora_unet_input_blocks_0_0",
        "lora_unet_label_emb_0_2",
    }


def test_kohya_accepts_live_transformers5_text_encoder_paths():
    # transformers 5's CLIPTextModel has no `text_model.`; the file must still say text_model
    live = {"encoder.layers.1.mlp.fc2.lora_down.weight": torch.ones(2, 3), "encoder.layers.1.mlp.fc2.alpha": torch.tensor(1.0)}
    state = to_kohya({"text_encoder": live}, base_model="sd1")
    assert set(state) == {"lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight", "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"}
    back = from_kohya(state)["text_encoder"]
    assert set(back) == {"text_model.encoder.layers.1.mlp.fc2.lora_down.weight", "text_model.encoder.layers.1.mlp.fc2.alpha"}


def test_kohya_rejects_unknown_base_model_and_component():
    with pytest.raises(ValueError, match="base_model"):
        to_kohya({"unet": {}}, base_model="sd3")
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_kohya({"text_encoder_2": {"a.alpha": torch.tensor(1.0)}}, base_model="sd1")


def test_from_kohya_lists_foreign_keys():
    with pytest.raises(WeightFileError, match="not kohya LoRA keys") as info:
        from_kohya({"unet.down_blocks.0.lora_A.weight": torch.zeros(1), "lora_unet_x.lora_down.weight": torch.zeros(1)}, source="f.safetensors")
    assert "f.safetensors" in str(info.value) and "unet.down_blocks.0.lora_A.weight" in str(info.value)


# ------------------------------------------------------------------------ diffusers round trips


@_SETTINGS
@given(components=component_states("sdxl"))
def test_diffusers_round_trip_keeps_per_layer_ranks_and_alphas(components):
    state, metadata = to_diffusers(components)
    assert not any(k.endswith(".alpha") for k in state), "diffusers files carry no alpha tensors"
    for key in state:
        assert key.split(".", 1)[0] in components and key.endswith((".lora_A.weight", ".lora_B.weight")), key
    assert set(metadata) == {"format", METADATA_KEY} and metadata["format"] == "pt"
    config = json.loads(metadata[METADATA_KEY])
    assert {f"{c}.r" for c in components} <= set(config)
    back = from_diffusers(state, metadata)
    _assert_components_equal(back, components)


@settings(max_examples=40, deadline=None)
@given(components=component_states("sd1"))
def test_diffusers_metadata_means_the_same_alphas_to_peft(components):
    """peft (what diffusers hands the config to) must read every layer's alpha as we meant it."""
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    _, metadata = to_diffusers(components)
    config = json.loads(metadata[METADATA_KEY])
    for component, state in components.items():
        alpha_pattern = config[f"{component}.alpha_pattern"]
        rank_pattern = config[f"{component}.rank_pattern"]
        for key, value in state.items():
            if not key.endswith(".alpha"):
                continue
            layer = key[: -len(".alpha")]
            alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), layer), config[f"{component}.lora_alpha"])
            rank = rank_pattern.get(get_pattern_key(list(rank_pattern), layer), config[f"{component}.r"])
            assert float(alpha) == float(value), layer
            assert rank == state[f"{layer}.lora_down.weight"].shape[0], layer


@settings(max_examples=25, deadline=None)
@given(components=component_states("sd1", alphas=False))
def test_diffusers_without_alphas_means_alpha_equals_rank(components):
    state, metadata = to_diffusers(components)
    for meta in (metadata, None):
        back = from_diffusers(state, meta)
        for component, comp_state in components.items():
            for key, value in comp_state.items():
                assert torch.equal(back[component][key], value)
                if key.endswith(".lora_down.weight"):
                    alpha = back[component][key.replace(".lora_down.weight", ".alpha")]
                    assert float(alpha) == value.shape[0]


def test_diffusers_old_spellings_are_read():
    down, up = torch.randn(2, 4), torch.randn(4, 2)
    for key_down, key_up in [
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"),
    ]:
        back = from_diffusers({key_down: down, key_up: up})
        assert set(back["unet"]) == {f"mid_block.attentions.0.transformer_blocks.0.attn1.to_q.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert float(back["unet"]["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.alpha"]) == 2.0
    te = from_diffusers(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_linear_layer.down.weight": down,
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_linear_layer.up.weight": up,
        }
    )
    assert torch.equal(te["text_encoder"]["text_model.encoder.layers.0.self_attn.out_proj.lora_up.weight"], up)


# ------------------------------------------------------------------------ file round trips


@settings(max_examples=15, deadline=None)
@given(components=component_states("sd1"), base_model=st.sampled_from(["sd1", "sd2"]))
def test_save_load_kohya_file_round_trip(tmp_path_factory, components, base_model):
    path = tmp_path_factory.mktemp("kohya") / "my_lora.safetensors"
    save_kohya(path, components, base_model=base_model, metadata={"ss_tag": "x"})
    back, metadata = load_kohya(path)
    _assert_components_equal(back, components)
    assert metadata["ss_tag"] == "x"
    assert metadata["modelspec.title"] == "my_lora"


@settings(max_examples=15, deadline=None)
@given(components=component_states("sdxl"))
def test_save_load_kohya_sdxl_file_round_trip(tmp_path_factory, components):
    path = tmp_path_factory.mktemp("kohya") / "xl.safetensors"
    save_kohya(path, components, base_model="sdxl")
    back, metadata = load_kohya(path)
    _assert_components_equal(back, components)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


@settings(max_examples=15, deadline=None)
@given(components=component_states("sdxl"))
def test_save_load_diffusers_file_round_trip(tmp_path_factory, components):
    path = tmp_path_factory.mktemp("diffusers") / "pytorch_lora_weights.safetensors"
    save_diffusers(path, components)
    back, metadata = load_diffusers(path)
    _assert_components_equal(back, components)
    assert METADATA_KEY in metadata


def test_save_kohya_in_half_precision_keeps_alpha_float32(tmp_path):
    components = {"unet": _lora_for(["mid_block.attentions.0.proj_in"], rank=4, alpha=1.5)}
    path = tmp_path / "h.safetensors"
    save_kohya(path, components, dtype=torch.float16)
    back, _ = load_kohya(path)
    state = back["unet"]
    assert state["mid_block.attentions.0.proj_in.lora_down.weight"].dtype == torch.float16
    assert state["mid_block.attentions.0.proj_in.alpha"].dtype == torch.float32
    assert float(state["mid_block.attentions.0.proj_in.alpha"]) == 1.5


def _lora_for(layers, *, rank, alpha, fan_in=6, fan_out=5, kernel=(), seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        state[f"{layer}.lora_down.weight"] = torch.randn(rank, fan_in, *kernel, generator=g)
        state[f"{layer}.lora_up.weight"] = torch.randn(fan_out, rank, *([1] * len(kernel)), generator=g)
        state[f"{layer}.alpha"] = torch.tensor(float(alpha))
    return state


def test_kohya_metadata_fields(tmp_path):
    unet = {
        **_lora_for(["down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"], rank=4, alpha=2),
        **_lora_for(["up_blocks.1.attentions.0.proj_out"], rank=8, alpha=8, seed=1),
        **_lora_for(["down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.1.conv2"], rank=2, alpha=0.5, kernel=(3, 3), seed=2),
    }
    te = _lora_for(["text_model.encoder.layers.0.self_attn.q_proj"], rank=4, alpha=2, seed=3)
    path = tmp_path / "meta_test.safetensors"
    save_kohya(path, {"unet": unet, "text_encoder": te}, base_model="sd1")
    _, metadata = load_kohya(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2.0"  # kohya's str(float) (extract_lora_from_models.py:253)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_v2"] == "False"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "meta_test"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.title"] == "meta_test"
    assert metadata["modelspec.resolution"] == "512x512"
    date = datetime.fromisoformat(metadata["modelspec.date"])  # kohya's: local time, whole seconds, no offset
    assert date.tzinfo is None and metadata["modelspec.date"] == date.isoformat() and len(metadata["modelspec.date"]) == 19
    assert metadata["modelspec.implementation_version"].startswith("sdadapt/")


@pytest.mark.parametrize(
    "base_model, version, v2, architecture, resolution",
    [
        ("sd2", "sd_v2", "True", "stable-diffusion-v2-512/lora", "512x512"),
        ("sd2-v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "768x768"),
        ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "1024x1024"),
    ],
)
def test_kohya_metadata_per_base_model(tmp_path, base_model, version, v2, architecture, resolution):
    path = tmp_path / "m.safetensors"
    save_kohya(path, {"unet": _lora_for(["mid_block.attentions.0.proj_in"], rank=3, alpha=1.25)}, base_model=base_model)
    _, metadata = load_kohya(path)
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == (version, v2)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "1.25"
    assert json.loads(metadata["ss_network_args"]) == {}
    if base_model == "sdxl":
        assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_save_kohya_refuses_nan(tmp_path):
    state = _lora_for(["mid_block.attentions.0.proj_in"], rank=2, alpha=1)
    state["mid_block.attentions.0.proj_in.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="proj_in.lora_up.weight"):  # an output: not a broken input file
        save_kohya(tmp_path / "nan.safetensors", {"unet": state})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ load_lora detection


def _components_sd1():
    return {
        "unet": _lora_for(["mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.2.proj_in"], rank=4, alpha=1.5),
        "text_encoder": _lora_for(["text_model.encoder.layers.1.self_attn.v_proj"], rank=2, alpha=3, seed=4),
    }


def test_load_lora_detects_kohya(tmp_path):
    path = tmp_path / "k.safetensors"
    save_kohya(path, _components_sd1())
    components, metadata = load_lora(path)
    _assert_components_equal(components, _components_sd1())
    assert metadata["ss_network_module"] == "networks.lora"


def test_load_lora_detects_diffusers(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_diffusers(path, _components_sd1())
    components, metadata = load_lora(path)
    _assert_components_equal(components, _components_sd1())
    assert METADATA_KEY in metadata


def test_load_lora_detects_a_peft_folder_and_its_file(tmp_path):
    state = _components_sd1()["unet"]
    folder = tmp_path / "adapter"
    save_peft(folder, state)
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    components, _ = load_lora(folder)
    assert set(components) == {"model"}
    _assert_components_equal(components, {"model": state})
    components, _ = load_lora(folder / "adapter_model.safetensors")
    _assert_components_equal(components, {"model": state})
    _assert_components_equal({"model": load_peft(folder)}, {"model": state})


def test_load_lora_detects_a_legacy_pt_kohya_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(to_kohya(_components_sd1()), path)
    components, _ = load_lora(path)
    _assert_components_equal(components, _components_sd1())


def test_load_lora_reads_lycoris_and_refuses_unsupported_algorithms_clearly(tmp_path):
    # LoHa loads (tests/test_lycoris_files.py covers it in depth), so does OFT (tests/test_oft.py)
    g = torch.Generator().manual_seed(0)
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state = {f"{layer}.{k}": torch.randn(4, 4, generator=g) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    state[f"{layer}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "loha.safetensors"
    write_safetensors(path, state, {"ss_network_module": "lycoris.kohya"})
    components, _ = load_lora(path)
    assert set(components["unet"]) == {f"down_blocks.0.attentions.0.proj_in.{k}" for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    # LyCORIS 2's old `oft_diag` (the rotation itself) loads as OFT (tests/test_oft.py: applied as A1111 does)
    old_oft = tmp_path / "oft_diag.safetensors"
    write_safetensors(old_oft, {f"{layer}.oft_diag": torch.zeros(2, 2, 2)}, {"ss_network_module": "lycoris.kohya"})
    assert set(load_lora(old_oft)[0]["unet"]) == {"down_blocks.0.attentions.0.proj_in.oft_diag"}
    # a LyCORIS tensor no family reads (4.x T-LoRA `q_layer.weight`): refused naming the key
    tucker = tmp_path / "tlora.safetensors"
    write_safetensors(tucker, {f"{layer}.q_layer.weight": torch.zeros(2, 2)}, {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(WeightFileError) as info:
        load_lora(tucker)
    message = str(info.value)
    assert str(tucker) in message and "q_layer.weight" in message and "LyCORIS" in message


@pytest.mark.parametrize(
    "state, kind",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, "checkpoint"),
        ({"emb_params": torch.zeros(2, 8)}, "embedding"),
    ],
)
def test_load_lora_names_what_a_non_lora_file_is(tmp_path, state, kind):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, state)
    article = {"checkpoint": "a", "embedding": "an"}[kind]
    with pytest.raises(WeightFileError, match=f"this is {article} {kind} file"):
        load_lora(path)


# ------------------------------------------------------------------------ applying to models




def _tiny():
    tiny = pytest.importorskip("tiny_models")
    pytest.importorskip("diffusers")
    return tiny


def test_unknown_layer_raises_layer_not_found_with_suggestions():
    tiny = _tiny()
    unet = tiny.tiny_unet_sd1()
    good = _lora_for(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"], rank=2, alpha=2, fan_in=32, fan_out=32)
    bad = _lora_for(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq"], rank=2, alpha=2, fan_in=32, fan_out=32)
    with pytest.raises(LayerNotFoundError) as info:
        sdadapt.load_adapter(unet, {**good, **bad})
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq" in message
    assert "nearest" in message and "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in message
    assert "1 of 2" in message
    assert not any(".sdadapt." in k for k in unet.state_dict()), "a failed load left adapters behind"


def test_text_encoder_keys_on_a_unet_explain_the_mix_up():
    tiny = _tiny()
    state = _lora_for(["text_model.encoder.layers.0.self_attn.q_proj"], rank=2, alpha=2, fan_in=32, fan_out=32)
    with pytest.raises(LayerNotFoundError, match="text encoder"):
        sdadapt.load_adapter(tiny.tiny_unet_sd1(), state)


@pytest.mark.parametrize("which", ["down", "up", "rank"])
def test_shape_mismatch_raises_value_error_naming_the_layer(which):
    tiny = _tiny()
    unet = tiny.tiny_unet_sd1()
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear(32 -> 64)
    state = _lora_for([layer], rank=4, alpha=4, fan_in=32, fan_out=64)
    if which == "down":
        state[f"{layer}.lora_down.weight"] = torch.randn(4, 33)
    elif which == "up":
        state[f"{layer}.lora_up.weight"] = torch.randn(65, 4)
    else:
        state[f"{layer}.lora_up.weight"] = torch.randn(64, 8)
    with pytest.raises(ValueError) as info:
        sdadapt.load_adapter(unet, state)
    assert layer in str(info.value)
    assert not any(".sdadapt." in k for k in unet.state_dict())


def test_failed_load_adapter_leaves_requires_grad_alone():
    tiny = _tiny()
    unet = tiny.tiny_unet_sd1()
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    state = _lora_for([layer], rank=4, alpha=4, fan_in=33, fan_out=64)
    with pytest.raises(ValueError):
        sdadapt.load_adapter(unet, state)
    assert all(p.requires_grad for p in unet.parameters())


class _Renamed(torch.nn.Module):
    """A module tree that holds the *same* layer objects under other names (an LDM-named UNet)."""

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        for path, layer in layers.items():
            parent: torch.nn.Module = self
            *heads, leaf = path.split(".")
            for head in heads:
                if head not in parent._modules:
                    parent.add_module(head, torch.nn.Module())
                parent = parent._modules[head]
            parent.add_module(leaf, layer)


def _ldm_view(unet, prefix: str) -> _Renamed:
    named = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    up_attention = attention_up_blocks(named)
    layers = {}
    for name, module in named.items():
        ldm = diffusers_to_ldm_unet(name, up_blocks_with_attention=up_attention)
        assert ldm is not None, name
        layers[prefix + ldm] = module
    assert len(layers) == len(named)
    return _Renamed(layers)


def _random_lora_for_model(unet, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, module) in enumerate(unet.named_modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        rank = 1 + i % 4
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        else:
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        state[f"{name}.lora_down.weight"] = torch.randn(*down_shape, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(*up_shape, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(rank * 0.75)
    return state


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_ldm_named_files_apply_to_diffusers_unets(tmp_path, layout):
    tiny = _tiny()
    make = tiny.tiny_unet_sdxl if layout == "sdxl" else tiny.tiny_unet_sd1
    sdxl = layout == "sdxl"
    reference = make()
    inputs = tiny.unet_inputs(reference, sdxl=sdxl)
    base = tiny.run_unet(reference, inputs)
    diffusers_state = _random_lora_for_model(reference, seed=5)
    handle = sdadapt.load_adapter(reference, diffusers_state)
    assert len(handle) == len({k.rsplit(".", 2)[0] for k in diffusers_state if k.endswith("lora_down.weight")})
    want = tiny.run_unet(reference, inputs)
    assert not torch.allclose(want, base, atol=1e-4), "the LoRA should change the output"

    # 1) a kohya SDXL-style file (LDM-named UNet keys) -> diffusers-named UNet
    path = tmp_path / "ldm_named.safetensors"
    save_kohya(path, {"unet": diffusers_state}, base_model="sdxl")
    raw, _ = sdadapt.formats.read_weights(path)
    assert all(k[len("lora_unet_") :].startswith(_LDM_HEADS) for k in raw)
    components, _ = load_kohya(path)
    unet = make()
    sdadapt.load_adapter(unet, components["unet"])
    torch.testing.assert_close(tiny.run_unet(unet, inputs), want, rtol=0, atol=1e-5)

    # 2) raw LDM-named state (as an LDM trainer would hand it over) -> diffusers-named UNet
    unet = make()
    up_attention = attention_up_blocks(_linear_conv_paths(unet))
    ldm_state = {}
    for key, value in diffusers_state.items():
        layer, suffix = split_key(key)
        ldm_state[f"{diffusers_to_ldm_unet(layer, up_blocks_with_attention=up_attention)}.{suffix}"] = value
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in ldm_state)
    handle = sdadapt.load_adapter(unet, ldm_state)
    assert set(handle.names) == {k.rsplit(".", 2)[0] for k in diffusers_state if k.endswith("lora_down.weight")}
    torch.testing.assert_close(tiny.run_unet(unet, inputs), want, rtol=0, atol=1e-5)



@pytest.mark.parametrize(
    "layout",
    [
        "sd1",
        "sdxl",
    ],
)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "checkpoint-prefix"])
def test_diffusers_named_files_apply_to_ldm_named_unets(layout, prefix):
    tiny = _tiny()
    make = tiny.tiny_unet_sdxl if layout == "sdxl" else tiny.tiny_unet_sd1
    reference = make()
    inputs = tiny.unet_inputs(reference, sdxl=layout == "sdxl")
    diffusers_state = _random_lora_for_model(reference, seed=6)
    sdadapt.load_adapter(reference, diffusers_state)
    want = tiny.run_unet(reference, inputs)

    unet = make()
    view = _ldm_view(unet, prefix)  # same layer objects, LDM names
    handle = sdadapt.load_adapter(view, diffusers_state)
    assert all(name.startswith(prefix) and name[len(prefix) :].replace(".", "_").startswith(_LDM_HEADS) for name in handle.names)
    torch.testing.assert_close(tiny.run_unet(unet, inputs), want, rtol=0, atol=1e-5)


def test_kohya_text_encoder_applies_to_a_transformers5_clip(tmp_path):
    tiny = pytest.importorskip("tiny_models")
    pytest.importorskip("transformers")
    clip = tiny.tiny_clip()
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        base = clip(ids).last_hidden_state
    te = _lora_for(["text_model.encoder.layers.1.self_attn.q_proj", "text_model.encoder.layers.0.mlp.fc1"], rank=2, alpha=1, fan_in=32, fan_out=32)
    te["text_model.encoder.layers.0.mlp.fc1.lora_up.weight"] = torch.randn(37, 2)
    path = tmp_path / "te.safetensors"
    save_kohya(path, {"text_encoder": te})
    components, _ = load_lora(path)
    handle = sdadapt.load_adapter(clip, components["text_encoder"])
    assert len(handle) == 2
    with torch.no_grad():
        assert not torch.allclose(clip(ids).last_hidden_state, base)
