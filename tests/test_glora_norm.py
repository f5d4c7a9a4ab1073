"""LyCORIS GLoRA and norm modules against lycoris-lora's own modules, key maps, metadata and refusals.

The family property suites (tests/test_adapter_families.py, tests/test_loratools_families.py) run on
both families' examples; the files LyCORIS' kohya network writes (algo=glora, train_norm=True) are in
tests/test_lycoris_files.py and tests/test_loratools_families.py. Here: each module against the real
``lycoris.modules`` one on tiny layers (delta, merged weights and forward), SDXL's LDM key names of
norm layers, kohya metadata, and the refusals.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import tiny_unet_sdxl
from torch import nn

import sdadapt
from sdadapt.adapters import GLoRAConfig, LoRAConfig, NormConfig, geometry_of
from sdadapt.adapters.registry import file_layer_delta
from sdadapt.errors import InputError
from sdadapt.formats import load_lora, save_lora

lycoris_glora = pytest.importorskip("lycoris.modules.glora", reason="lycoris-lora is not installed")
lycoris_norms = pytest.importorskip("lycoris.modules.norms")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

GLORA_LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "conv3x3-strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
}


def _randomized(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("alpha", [3.0, 0.0])
@pytest.mark.parametrize("kind", list(GLORA_LAYERS))
def test_glora_equals_lycoris_module(kind, alpha):
    """LyCORIS' GLoRAModule (its state dict as the file tensors): the same ΔW at a strength, the same
    forward, loaded and merged; alpha 0 means alpha = r (scale 1) in both."""
    make, x_shape = GLORA_LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    theirs = lycoris_glora.GLoRAModule("lora_x", layer, multiplier=0.7, lora_dim=2, alpha=alpha).double()
    _randomized(theirs, seed=1)
    tensors = {k: v.detach().clone() for k, v in theirs.custom_state_dict().items()}
    assert set(tensors) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_delta = theirs.get_diff_weight(multiplier=0.7)[0]
        want_y = theirs(x)  # org forward + op(x, ΔW)
    delta, bias = file_layer_delta(tensors, geometry_of(layer), base_weight=layer.weight.detach(), scale=0.7,
                                   dtype=torch.float64)
    assert bias is None and delta.shape == layer.weight.shape
    assert torch.allclose(delta, want_delta, atol=1e-12, rtol=1e-10)
    assert delta.abs().max() > 1e-2

    twin = nn.Sequential(make().double())
    twin[0].load_state_dict(layer.state_dict())
    handle = sdadapt.load_adapter(twin, {f"0.{k}": v for k, v in tensors.items()}, dtype=torch.float64)
    handle.set_scale(0.7)
    with torch.no_grad():
        assert torch.allclose(twin(x), want_y, atol=1e-12, rtol=1e-10)
        handle.merge()
        assert torch.allclose(twin[0].weight, layer.weight + want_delta, atol=1e-12, rtol=1e-10)
        assert torch.allclose(twin(x), want_y, atol=1e-12, rtol=1e-10)
        handle.unmerge()
        assert torch.equal(twin[0].weight, layer.weight)


@pytest.mark.parametrize("kind", ["groupnorm", "layernorm"])
def test_norm_offsets_equal_lycoris_norm_module(kind):
    """LyCORIS' NormModule: w' = w + m·w_norm, b' = b + m·b_norm; its forward = the norm layer with them."""
    torch.manual_seed(0)
    # a non-default eps: the delta's normalisation must use the layer's own
    make = (lambda: nn.GroupNorm(2, 8, eps=1e-2)) if kind == "groupnorm" else (lambda: nn.LayerNorm(8, eps=1e-2))
    layer = make().double()
    with torch.no_grad():  # a non-trivial base affine
        layer.weight.add_(torch.randn_like(layer.weight) * 0.3)
        layer.bias.add_(torch.randn_like(layer.bias) * 0.3)
    theirs = lycoris_norms.NormModule("lora_n", layer, multiplier=0.6).double()
    _randomized(theirs, seed=4)
    tensors = {"w_norm": theirs.w_norm.detach().clone(), "b_norm": theirs.b_norm.detach().clone()}
    x = torch.randn((2, 8, 3, 3) if kind == "groupnorm" else (2, 5, 8), dtype=torch.float64)
    with torch.no_grad():
        want_y = theirs(x)
        want_w, want_b = theirs.get_merged_weight(multiplier=0.6)
    delta, bias = file_layer_delta(tensors, geometry_of(layer), scale=0.6, dtype=torch.float64)
    assert torch.allclose(layer.weight + delta, want_w, atol=1e-14) and torch.allclose(layer.bias + bias, want_b, atol=1e-14)

    twin = nn.Sequential(make().double())
    twin[0].load_state_dict(layer.state_dict())
    handle = sdadapt.load_adapter(twin, {f"0.{k}": v for k, v in tensors.items()}, dtype=torch.float64)
    handle.set_scale(0.6)
    with torch.no_grad():
        assert torch.allclose(twin(x), want_y, atol=1e-12)
        handle.merge()
        assert torch.allclose(twin[0].weight, want_w, atol=1e-14) and torch.allclose(twin[0].bias, want_b, atol=1e-14)
        assert torch.allclose(twin(x), want_y, atol=1e-12)
    handle.remove()
    assert torch.equal(twin[0].weight, layer.weight) and torch.equal(twin[0].bias, layer.bias)


def test_sdxl_norm_and_glora_layers_write_ldm_names_and_read_back(tmp_path):
    """SDXL kohya files name UNet layers in LDM (input_blocks_1_0_in_layers_0 is down_blocks.0.resnets.0.norm1);
    norm layers map both ways like every other layer, and the metadata says train_norm beside the algo."""
    unet = tiny_unet_sdxl()
    norms = sdadapt.inject(unet, sdadapt.by_type(nn.GroupNorm, nn.LayerNorm), NormConfig(), name="norms")
    glora = sdadapt.inject(unet, sdadapt.by_regex(r".*attn1\.to_(q|v)$"), GLoRAConfig(rank=2, alpha=1.0), name="g")
    _randomized(norms, seed=5)
    _randomized(glora, seed=6)
    state = {**norms.state_dict(), **glora.state_dict()}
    path = tmp_path / "sdxl.safetensors"
    save_lora(path, {"unet": state}, base_model="sdxl")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_1_0_in_layers_0.w_norm" in keys  # down_blocks.0.resnets.0.norm1
    assert "lora_unet_out_0.b_norm" in keys  # conv_norm_out
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_norm3.") for k in keys)
    assert any(k.endswith("attn1_to_q.a1.weight") for k in keys)
    args = json.loads(metadata["ss_network_args"])
    assert metadata["ss_network_module"] == "lycoris.kohya" and args["algo"] == "glora" and args["train_norm"] == "True"
    components, _ = load_lora(path)
    assert set(components["unet"]) == set(state)
    assert all(torch.equal(components["unet"][k], v) for k, v in state.items())


def test_layer_kind_mix_ups_are_refused_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="cannot adapt a normalisation layer"):
        sdadapt.inject(model, sdadapt.by_type(nn.LayerNorm), LoRAConfig(rank=2))
    with pytest.raises(TypeError, match="GroupNorm/LayerNorm layers only"):
        sdadapt.inject(model, sdadapt.by_type(nn.Linear), NormConfig())
    with pytest.raises(ValueError, match=r"0: .*GroupNorm/LayerNorm layers only"):
        sdadapt.load_adapter(model, {"0.w_norm": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"1\.w_norm: norm offset of shape \(3,\)"):
        sdadapt.load_adapter(model, {"1.w_norm": torch.zeros(3)})
    assert not any(n.endswith("sdadapt") for n, _ in model.named_modules())


def test_glora_lycoris_1x_layout_is_refused_by_name():
    """LyCORIS 1.x wrote a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r): refused, saying so."""
    layer = nn.Linear(6, 5)
    old = {"a1.weight": torch.zeros(2, 6), "a2.weight": torch.zeros(6, 2), "b1.weight": torch.zeros(2, 6),
           "b2.weight": torch.zeros(5, 2), "alpha": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="LyCORIS 1.x's transposed GLoRA"):
        file_layer_delta(old, geometry_of(layer), base_weight=layer.weight)


def test_resize_and_combine_refuse_norm_layers(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.LayerNorm), NormConfig())
    _randomized(handle, seed=1)
    path = tmp_path / "norm.safetensors"
    save_lora(path, {"unet": {f"down_blocks.0.attentions.0.{k}": v for k, v in handle.state_dict().items()}})
    from sdadapt.loratools import resize_lora

    with pytest.raises(InputError, match="norm module's offsets .* no rank"):
        resize_lora(path, tmp_path / "out.safetensors", rank=2)
    from sdadapt.loratools import combine_loras

    with pytest.raises(InputError, match="norm module's offsets .* no rank"):
        combine_loras([path, path], tmp_path / "out.safetensors", mode="svd", rank=2)
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_rewrites_norm_and_glora_layers(tmp_path):
    """``convert --dtype`` of a LyCORIS file with norm modules (1-D offsets) and GLoRA layers (no
    delta without the base weight): written, read back and compared."""
    from sdadapt.loratools.convert import convert_lora

    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    norms = sdadapt.inject(model, sdadapt.by_type(nn.LayerNorm), NormConfig(), name="n")
    glora = sdadapt.inject(model, sdadapt.by_type(nn.Linear), GLoRAConfig(rank=2, alpha=1.0), name="g")
    _randomized(norms, seed=2)
    _randomized(glora, seed=3)
    state = {f"down_blocks.0.attentions.0.{k}": v for k, v in {**norms.state_dict(), **glora.state_dict()}.items()}
    source = tmp_path / "lyco.safetensors"
    save_lora(source, {"unet": state})
    report = convert_lora(source, tmp_path / "half.safetensors", to="kohya", dtype=torch.float16, base_model="sd1")
    assert report.families == {"norm": 1, "glora": 1} and report.layers == {"unet": 2}
    assert 0 < report.max_delta < 1e-3  # the norm offsets' fp16 rounding; GLoRA compared tensor by tensor
    back = load_lora(tmp_path / "half.safetensors")[0]["unet"]
    assert set(back) == set(state)
    assert all(torch.allclose(back[k].float(), v.float(), atol=1e-3) for k, v in state.items())


@pytest.mark.parametrize("preset", ["attn-mlp", "unet-convblock-only", "full", "full-lin", "unet-transformer-only"])
def test_train_norm_adapts_the_norms_lycoris_adapts(preset, tmp_path, monkeypatch):
    """``train lora --network-args train_norm=True preset=P`` puts norm modules on exactly the
    GroupNorm/LayerNorm layers LyCORIS' kohya network (train_norm=True) does, and saves LyCORIS' keys
    with ``train_norm`` in ``ss_network_args``; ``remove()`` restores the model. (LyCORIS 4.1's
    ``TimestepEmbedding`` preset class is dropped, as tests/test_lycoris_presets.py does: on SD UNets
    it stops ``full`` with "duplicated lora name"; it holds no norm.)"""
    from types import SimpleNamespace

    from safetensors import safe_open
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.methods.lora import prepare_lora

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from lycoris.config import PRESET

    cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP"):  # create_network's apply_preset sets class state: restored afterwards
        monkeypatch.setattr(cls, attr, getattr(cls, attr))
    filtered = dict(PRESET[preset])
    filtered["unet_target_module"] = [m for m in filtered["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(PRESET, preset, filtered)
    unet, te = tiny_unet_sd1(), tiny_clip()
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, te, unet, preset=preset, algo="lora", train_norm=True)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    theirs = tmp_path / "lyco.safetensors"
    net.save_weights(str(theirs), torch.float32, {})

    unet, te = tiny_unet_sd1(), tiny_clip()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    adaptation = prepare_lora(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"), rank=2, targets=preset,
                              train_norm=True)
    ours = adaptation.save(tmp_path / "ours.safetensors")
    adaptation.remove()
    assert unet.state_dict().keys() == before.keys() and all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())

    def norm_layers(path):
        with safe_open(str(path), "pt") as f:
            return {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith((".w_norm", ".b_norm"))}, f.metadata()

    (want, _), (got, metadata) = norm_layers(theirs), norm_layers(ours)
    assert want and got == want
    assert json.loads(metadata["ss_network_args"])["train_norm"] == "True"


def test_train_norm_refuses_targets_without_norms():
    from types import SimpleNamespace

    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.methods.lora import prepare_lora

    unet = tiny_unet_sd1()
    system = SimpleNamespace(unet=unet, text_encoder=tiny_clip(), base_model="sd1")
    with pytest.raises(InputError, match="attention modules hold no GroupNorm/LayerNorm"):
        prepare_lora(system, rank=2, targets="attention", train_norm=True)
    assert not any(n.endswith("sdadapt") for n, _ in unet.named_modules())


def test_train_glora_writes_the_file_lycoris_writes(tmp_path, monkeypatch):
    """``train glora --network-targets attn-mlp``: the same layers, tensor names and shapes as LyCORIS'
    kohya network with ``algo=glora preset=attn-mlp`` writes (so LyCORIS, ComfyUI and sdadapt read it),
    ``ss_network_args`` algo glora, and ΔW = 0 at init."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.methods import prepare_glora

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP"):  # create_network's apply_preset sets class state: restored afterwards
        monkeypatch.setattr(cls, attr, getattr(cls, attr))
    from lycoris.config import PRESET

    filtered = dict(PRESET["attn-mlp"])  # (4.1's TimestepEmbedding class: sdadapt follows 3.x, docs/lycoris.md "Presets")
    filtered["unet_target_module"] = [m for m in filtered["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(PRESET, "attn-mlp", filtered)
    unet, te = tiny_unet_sd1(), tiny_clip()
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, te, unet, preset="attn-mlp", algo="glora")
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    theirs = tmp_path / "lyco.safetensors"
    net.save_weights(str(theirs), torch.float32, {})

    unet, te = tiny_unet_sd1(), tiny_clip()
    adaptation = prepare_glora(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"), rank=2, alpha=1.0,
                               targets="attn-mlp")
    with torch.no_grad():
        for handle in adaptation.handles.values():
            for name, module in handle.modules.items():
                assert float(module.merge_delta(handle._layers[name].weight).abs().max()) == 0.0
    ours = adaptation.save(tmp_path / "ours.safetensors")
    adaptation.remove()

    def shapes(path):
        with safe_open(str(path), "pt") as f:
            return ({k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): tuple(f.get_slice(k).get_shape())
                     for k in f.keys()}, f.metadata())

    (want, _), (got, metadata) = shapes(theirs), shapes(ours)
    assert any(k.endswith(".b2.weight") and len(s) == 2 for k, s in want.items())
    assert got == want
    assert json.loads(metadata["ss_network_args"])["algo"] == "glora"
