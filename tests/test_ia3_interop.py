"""(IA)³ against the installed lycoris-lora package: its module, its kohya network, its files.

* LyCORIS' ``IA3Module`` on plain Linear / Conv2d layers, on outputs and on inputs, at strengths
  1 and 0.6: sdadapt built from its saved tensors gives the same outputs (merged and hooked).
* Files written by LyCORIS' kohya network (``algo=ia3``) on a tiny SD1 UNet + CLIP — its ``ia3``
  preset's layers, written as patterns (see below), and conv blocks — load with ``load_lora``,
  apply with the same outputs, round-trip bit for bit and ``inspect`` as ``ia3``.
* sdadapt-written files load into a LyCORIS network with ``load_weights`` (kohya's
  ``network_weights`` path) and give sdadapt's outputs.

LyCORIS 4.1.3's ``create_network_from_weights`` cannot build IA3 modules from a file at all
(``IA3Module.make_module_from_state_dict`` takes one tensor, the loader passes ``weight`` and
``on_input``: a TypeError), and its built-in ``preset=ia3`` matches no diffusers layer (it
``re.match``-es ``"to_k"`` against full paths). The tests use the network + ``load_weights`` and
a preset file with the same layers as anchored patterns.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_lycoris_files import _loads_applies_and_round_trips, _te_out
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs
from torch import nn

import sdadapt
from sdadapt.adapters import IA3Module
from sdadapt.formats import describe_file, load_lora, save_lora
from sdadapt.formats.diffusers import save_peft
from sdadapt.loratools.convert import convert_lora

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install lycoris-lora)")
from lycoris.kohya import create_network
from lycoris.modules.ia3 import IA3Module as LycorisIA3

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

#: LyCORIS' built-in ``ia3`` preset (lycoris/config.py) with its names as anchored patterns
IA3_PRESET = r"""
enable_conv = false
unet_target_module = []
unet_target_name = ['.*to_k$', '.*to_v$', '.*ff\.net\.2$']
text_encoder_target_module = []
text_encoder_target_name = ['.*k_proj$', '.*v_proj$', '.*mlp\.fc2$']

[name_algo_map.'.*ff\.net\.2$']
train_on_input = true

[name_algo_map.'.*mlp\.fc2$']
train_on_input = true
"""


@pytest.mark.parametrize("on_input", [False, True], ids=["on-output", "on-input"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_lycoris_ia3_module_equals_sdadapt(kind, on_input, multiplier):
    torch.manual_seed(0)
    layer = nn.Linear(6, 8) if kind == "linear" else nn.Conv2d(4, 8, 3, stride=2, padding=1)
    x = torch.randn(3, 5, 6) if kind == "linear" else torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        y_base = layer(x)
    lyco = LycorisIA3("m", layer, multiplier=multiplier, train_on_input=on_input)
    with torch.no_grad():
        lyco.weight.copy_(torch.randn_like(lyco.weight) * 0.5)
    lyco.apply_to()
    with torch.no_grad():
        y_lyco = layer(x)
    assert not torch.allclose(y_lyco, y_base, atol=1e-3)
    state = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    assert set(state) == {"weight", "on_input"} and int(state["on_input"]) == int(on_input)

    twin = nn.Sequential(nn.Linear(6, 8) if kind == "linear" else nn.Conv2d(4, 8, 3, stride=2, padding=1))
    twin[0].load_state_dict(layer.state_dict())
    handle = sdadapt.load_adapter(twin, {f"0.{k}": v for k, v in state.items()})
    handle.set_scale(multiplier)
    assert isinstance(handle.modules["0"], IA3Module)
    with torch.no_grad():
        assert torch.allclose(twin(x), y_lyco, atol=1e-5, rtol=1e-5)
        handle.merge()
        assert torch.allclose(twin(x), y_lyco, atol=1e-5, rtol=1e-5)
        merged, _ = lyco.get_merged_weight(multiplier=multiplier)
        assert torch.allclose(twin[0].weight, merged.reshape(twin[0].weight.shape), atol=1e-6)
        assert torch.equal(twin[0].bias, lyco.org_module[0].bias)  # the bias is not scaled


def _lycoris_network(unet, te, preset, **kwargs):
    net = create_network(1.0, 4, 1.0, None, te, unet, algo="ia3", preset=preset, **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    return net


CASES = [
    pytest.param("ia3-preset", {}, {"linear"}, id="ia3-preset"),
    pytest.param("unet-convblock-only", {"conv_dim": 4}, {"conv"}, id="conv-blocks"),
]


@pytest.mark.parametrize("preset, kwargs, layer_kinds", CASES)
def test_lycoris_ia3_file_loads_applies_round_trips_and_inspects(preset, kwargs, layer_kinds, tmp_path):
    if preset == "ia3-preset":
        preset_file = tmp_path / "ia3.toml"
        preset_file.write_text(IA3_PRESET)
        preset = str(preset_file)
    unet, te = tiny_unet_sd1(), tiny_clip()
    inputs, ids = unet_inputs(unet), torch.tensor([[0, 5, 7, 9, 2]])
    net = _lycoris_network(unet, te, preset, **kwargs)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path / "lyco-ia3.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    y_unet, y_te = run_unet(unet, inputs), _te_out(te, ids)
    original = load_file(str(path))
    on_input = {k for k, v in original.items() if k.endswith(".on_input") and int(v) == 1}
    if "linear" in layer_kinds:  # the preset's feed-forward outputs scale their inputs
        assert on_input and all("ff_net_2" in k or "mlp_fc2" in k for k in on_input)
    else:
        assert any(v.dim() == 4 for k, v in original.items() if k.endswith(".weight"))

    # applied and merged == lycoris' forward; file -> canonical -> file: the same keys and bits
    handles, _ = _loads_applies_and_round_trips(path, inputs, ids, y_unet, y_te, tmp_path)
    assert all(isinstance(a, IA3Module) for h in handles for a in h.modules.values())
    meta = load_lora(tmp_path / "again.safetensors")[1]
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "ia3"' in meta["ss_network_args"]

    summary = describe_file(path)
    assert summary["kind"] == "lycoris" and summary["family"] == "ia3"
    assert set(summary["algorithms"]) == {"ia3"}
    assert summary["ranks"] == {"none (IA3 vectors)": summary["modules"]} == summary["alphas"]


def test_sdadapt_ia3_file_loads_into_lycoris_network(tmp_path):
    """``prepare_ia3`` (the ``ia3`` method) on a tiny SD1 UNet + CLIP saves a LyCORIS file; LyCORIS'
    network on the same layers (the preset file above) loads it with ``load_weights`` — every key
    used, none missing — and computes sdadapt's outputs."""
    from safetensors.torch import save_file

    from sdadapt.methods.ia3 import prepare_ia3

    unet, te = tiny_unet_sd1(), tiny_clip()
    inputs, ids = unet_inputs(unet), torch.tensor([[0, 5, 7, 9, 2]])
    adaptation = prepare_ia3(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"))
    torch.manual_seed(7)
    with torch.no_grad():
        for p in adaptation.params:
            p.copy_(torch.randn_like(p) * 0.3)
    y_unet, y_te = run_unet(unet, inputs), _te_out(te, ids)
    path = adaptation.save(tmp_path / "ours.safetensors")
    written = load_file(str(path))
    flags = {k: int(v) for k, v in written.items() if k.endswith(".on_input")}
    assert flags and all(v == (("ff_net_2" in k) or ("mlp_fc2" in k)) for k, v in flags.items())

    preset_file = tmp_path / "ia3.toml"
    preset_file.write_text(IA3_PRESET)
    fresh_unet, fresh_te = tiny_unet_sd1(), tiny_clip()
    net = _lycoris_network(fresh_unet, fresh_te, str(preset_file))
    # lycoris on a transformers-5 CLIPTextModel names its layers without `text_model`
    own = set(net.state_dict())
    renamed = {k if k in own else k.replace("lora_te_text_model_encoder_", "lora_te_encoder_"): v
               for k, v in written.items()}
    assert set(renamed) == own
    save_file(renamed, str(tmp_path / "for-lycoris.safetensors"))
    net.load_weights(str(tmp_path / "for-lycoris.safetensors"))
    assert torch.allclose(run_unet(fresh_unet, inputs), y_unet, atol=2e-5, rtol=1e-4)
    assert torch.allclose(_te_out(fresh_te, ids), y_te, atol=2e-5, rtol=1e-4)
    adaptation.remove()
    assert torch.equal(run_unet(unet, inputs), run_unet(tiny_unet_sd1(), inputs))


#: a preset file naming the feed-forward output layers, without LyCORIS' ia3 ``name_algo_map``
FF_PRESET = r"""
unet_target_module = []
unet_target_name = ['.*to_k$', '.*ff\.net\.2$']
text_encoder_target_module = []
text_encoder_target_name = ['.*k_proj$', '.*mlp\.fc2$']
"""


@pytest.mark.parametrize("preset", ["attn-mlp", "file"])
def test_other_presets_scale_outputs_as_lycoris(preset, tmp_path, monkeypatch):
    """Only the built-in ``ia3`` preset scales ``ff.net.2`` / ``mlp.fc2`` on their inputs: with another
    preset or a preset file LyCORIS (no ``train_on_input``) scales every layer's outputs, and so does
    ``prepare_ia3`` — the same modules, the same ``on_input`` flags."""
    from lycoris.kohya import LycorisNetworkKohya
    from transformers_versions import lycoris_te_name

    from sdadapt.methods.ia3 import prepare_ia3

    if preset == "file":
        (tmp_path / "ff.toml").write_text(FF_PRESET)
        preset = str(tmp_path / "ff.toml")
    monkeypatch.setattr(LycorisNetworkKohya, "NAME_ALGO_MAP", {})  # (class state an earlier ia3 preset leaves)
    unet, te = tiny_unet_sd1(), tiny_clip()
    adaptation = prepare_ia3(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"), targets=preset)
    ours = load_file(str(adaptation.save(tmp_path / "ours.safetensors")))
    adaptation.remove()
    net = _lycoris_network(tiny_unet_sd1(), tiny_clip(), preset)
    theirs = {k: int(v) for k, v in net.state_dict().items() if k.endswith(".on_input")
              and "time_embedding" not in k}  # (4.1's TimestepEmbedding class: docs/lycoris.md "Presets")
    flags = {lycoris_te_name(k): int(v) for k, v in ours.items() if k.endswith(".on_input")}
    assert any("ff_net_2" in k for k in flags) and any("mlp_fc2" in k for k in flags)
    assert flags == theirs and not any(flags.values())


# --------------------------------------------------------------------------------------- peft IA3
peft = pytest.importorskip("peft", reason="peft is not installed")


class _ConvNet(nn.Module):
    """Convolutions and Linears, biased and not, for peft's IA3 on both layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1, bias=False)  # outputs scaled (no bias: exact)
        self.conv_ff = nn.Conv2d(6, 6, 1)  # feed-forward: inputs scaled
        self.proj = nn.Linear(6, 5, bias=False)
        self.ff = nn.Linear(5, 4)

    def forward(self, x):
        h = self.conv_ff(torch.relu(self.conv_a(x)))
        return self.ff(torch.relu(self.proj(h.mean(dim=(2, 3)))))


def _peft_cases():
    return [
        pytest.param(lambda: tiny_unet_sd1(), ["to_k", "to_v", "ff.net.2"], ["ff.net.2"], id="sd1-unet"),
        pytest.param(lambda: _ConvNet(), ["conv_a", "conv_ff", "proj", "ff"], ["conv_ff", "ff"], id="conv-linear"),
        # peft's feedforward list entries are plain suffixes: "ff" makes conv_ff feed-forward too
        pytest.param(lambda: _ConvNet(), ["conv_a", "conv_ff", "proj", "ff"], ["ff"], id="ff-suffix"),
        # a string is a pattern of the whole name (peft's re.fullmatch): conv_ff and ff, not the conv conv_a
        pytest.param(lambda: _ConvNet(), ["conv_a", "conv_ff", "proj", "ff"], r"(conv_)?f+", id="ff-pattern"),
    ]


def _run(model, kind):
    with torch.no_grad():
        if kind == "sd1-unet":
            return run_unet(model, unet_inputs(model))
        return model(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("build, targets, feedforward", _peft_cases())
def test_peft_ia3_round_trips_both_ways(build, targets, feedforward, tmp_path, request):
    kind = request.node.callspec.id
    torch.manual_seed(0)
    model = build()
    base_out = _run(model, kind)
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    peft_model = peft.get_peft_model(model, config)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.4 * torch.randn_like(p))
    y_peft = _run(model, kind)
    assert not torch.allclose(y_peft, base_out, atol=1e-4)
    folder = tmp_path / "peft-ia3"
    peft_model.save_pretrained(str(folder))

    # peft -> sdadapt: load_lora reads the folder, the family is (IA)³, the outputs are peft's
    components, _ = load_lora(folder)
    state = components["model"]
    assert {k.rsplit(".", 1)[1] for k in state} == {"weight", "on_input", "scales_bias"}
    # output-scaled vectors say that peft scales their bias too (checked where a layer is known)
    assert {k[: -len(".scales_bias")] for k in state if k.endswith(".scales_bias")} == {
        k[: -len(".on_input")] for k, v in state.items() if k.endswith(".on_input") and not int(v)}
    torch.manual_seed(0)
    fresh = build()
    handle = sdadapt.load_adapter(fresh, state)
    assert all(isinstance(a, IA3Module) for a in handle.modules.values())
    ff_layers = {n for n, a in handle.modules.items() if a.train_input}
    if kind == "ff-pattern":
        assert ff_layers == {"conv_ff", "ff"}
    else:
        assert ff_layers and all(n.endswith(tuple(feedforward)) for n in ff_layers)
    if kind == "ff-suffix":
        assert ff_layers == {"conv_ff", "ff"}
    assert torch.allclose(_run(fresh, kind), y_peft, atol=2e-5, rtol=1e-4)
    summary = describe_file(folder)
    assert summary["kind"] == "peft-ia3" and summary["family"] == "ia3"
    assert summary["components"] == {"model": len(handle.modules)}
    if kind == "sd1-unet":  # peft -> kohya: scales_bias is never written; the model resolves it
        kohya = tmp_path / "kohya.safetensors"
        with pytest.raises(sdadapt.errors.InputError, match="load_adapter"):
            save_lora(kohya, {"unet": state})  # (the writer cannot tell a bias: refused)
        assert not kohya.exists()
        # convert knows SD's UNet: to_k / to_v have no bias there, so the file is LyCORIS' (IA)³ exactly
        report = convert_lora(folder, kohya, to="kohya", base_model="sd1")
        assert report.families == {"ia3": 30} and report.max_delta == 0.0  # 24 to_k/to_v, 6 ff.net.2
        _lycoris_gives(kohya, tmp_path, y_peft)
        kohya.unlink()
        save_lora(kohya, {"unet": handle.state_dict()})  # through the model (to_k/to_v: bias-free): LyCORIS' keys
        assert {k.rsplit(".", 1)[1] for k in load_file(str(kohya))} == {"weight", "on_input"}
        torch.manual_seed(0)
        again = build()
        sdadapt.load_adapter(again, load_lora(kohya)[0]["unet"])
        assert torch.allclose(_run(again, kind), y_peft, atol=2e-5, rtol=1e-4)

    # sdadapt -> peft: save_peft of sdadapt's state; PeftModel.from_pretrained computes the same
    out = tmp_path / "ours"
    save_peft(out, handle.state_dict())
    torch.manual_seed(0)
    again = build()
    loaded = peft.PeftModel.from_pretrained(again, str(out))
    assert loaded.peft_config["default"].peft_type == peft.PeftType.IA3
    assert torch.allclose(_run(again, kind), y_peft, atol=2e-5, rtol=1e-4)


def _lycoris_gives(path, tmp_path, want):
    """LyCORIS' kohya network (algo=ia3, the ia3 preset's layers, ``load_weights``: kohya's
    ``network_weights`` path) loads the kohya file ``path`` on a fresh tiny SD1 UNet, every UNet key used,
    and computes ``want``. (LyCORIS 4.1.3's ``create_lycoris_from_weights`` cannot build (IA)³ modules
    from a file: the module docstring.)"""
    preset_file = tmp_path / "ia3-preset.toml"
    preset_file.write_text(IA3_PRESET)
    torch.manual_seed(0)
    fresh = tiny_unet_sd1()
    net = _lycoris_network(fresh, tiny_clip(), str(preset_file))
    written = load_file(str(path))
    assert set(written) == {k for k in net.state_dict() if k.startswith("lora_unet_")}
    assert not net.load_weights(str(path)).get("unexpected keys")
    assert torch.allclose(run_unet(fresh, unet_inputs(fresh)), want, atol=2e-5, rtol=1e-4)


def test_peft_ia3_convert_to_kohya_refuses_a_biased_output_layer_naming_it(tmp_path):
    """peft (IA)³ on SD UNet layers with a bias scaled on their outputs (``to_out.0``): peft scales the
    bias too, a kohya/LyCORIS file cannot say so — convert refuses, naming the layer, and writes nothing;
    the bias-free ``to_k`` beside it does not make the refusal go away."""
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(tiny_unet_sd1(), peft.IA3Config(target_modules=["to_k", "to_out.0"],
                                                                      feedforward_modules=[]))
    folder = tmp_path / "peft-ia3"
    peft_model.save_pretrained(str(folder))
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(sdadapt.errors.InputError, match=r"unet: 12 \(IA\)³ layer\(s\) come from a peft adapter.*to_out\.0"):
        convert_lora(folder, out, to="kohya", base_model="sd1")
    assert not out.exists()


def test_peft_ia3_text_encoder_convert_to_kohya_keeps_only_input_scaled_layers(tmp_path):
    """A peft (IA)³ adapter on the CLIP text encoder (``--component text_encoder``): every CLIP projection has a
    bias, so output-scaled ``k_proj`` / ``v_proj`` stay refused by name (nothing written) — even though their
    names end like nothing in SD_UNET_BIAS_FREE, and as a UNet they would not pass either; input-scaled
    ``fc2`` alone converts exactly."""
    torch.manual_seed(0)
    clip = peft.get_peft_model(tiny_clip(), peft.IA3Config(target_modules=["k_proj", "v_proj", "fc2"],
                                                            feedforward_modules=["fc2"]))
    folder = tmp_path / "peft-te"
    clip.save_pretrained(str(folder))
    out = tmp_path / "kohya.safetensors"
    for component in ("text_encoder", None):
        with pytest.raises(sdadapt.errors.InputError, match=r"(text_encoder|unet): 4 \(IA\)³ layer\(s\) come from a peft "
                                                            r"adapter.*self_attn\.k_proj"):
            convert_lora(folder, out, to="kohya", base_model="sd1", component=component)
        assert not out.exists()
    ff_only = tmp_path / "peft-te-ff"
    torch.manual_seed(0)
    peft.get_peft_model(tiny_clip(), peft.IA3Config(target_modules=["fc2"], feedforward_modules=["fc2"])
                        ).save_pretrained(str(ff_only))
    report = convert_lora(ff_only, out, to="kohya", base_model="sd1", component="text_encoder")
    assert report.families == {"ia3": 2} and report.max_delta == 0.0
    assert all(k.startswith("lora_te_") for k in load_file(str(out)))


def test_peft_ia3_on_a_biased_output_layer_is_refused_with_the_model():
    """peft scales an output-scaled layer's bias; LyCORIS / sdadapt do not: with the model at hand
    the conversion refuses that layer (naming it) instead of changing the output differently."""
    from sdadapt.formats.peft_ia3 import from_peft_ia3

    model = nn.Sequential(nn.Linear(3, 4))
    state = {"base_model.model.0.ia3_l": torch.ones(4, 1) * 1.5}
    # without the model: read as written, with peft's bias scaling recorded
    assert set(from_peft_ia3(state, None)) == {"0.weight", "0.on_input", "0.scales_bias"}
    with pytest.raises(sdadapt.errors.InputError, match=r"0\.ia3_l scales the outputs of 0, which has a bias"):
        from_peft_ia3(state, None, model=model)


@pytest.mark.parametrize("bias", [True, False])
def test_peft_ia3_folder_read_without_the_model_is_exact_or_refused_where_applied(bias, tmp_path):
    """``load_lora(folder)`` cannot see the model: an output-scaled vector on a biased layer is refused
    by load_adapter / apply_lora / merge-lora (each knows the layer's bias), never applied with another
    output; on a bias-free layer it gives peft's outputs exactly, and saving it back to peft keeps them."""
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 3))  # noqa: E731
    model = build()
    x = torch.randn(5, 4)
    peft_model = peft.get_peft_model(model, peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
        y_peft = model(x)
    folder = tmp_path / "peft"
    peft_model.save_pretrained(str(folder))
    state = load_lora(folder)[0]["model"]
    assert set(state) == {"0.weight", "0.on_input", "0.scales_bias", "2.weight", "2.on_input"}
    torch.manual_seed(0)
    fresh = build()
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    if bias:
        with pytest.raises(ValueError, match=r"^0: a peft IA3 vector scales this layer's outputs together with its bias"):
            sdadapt.load_adapter(fresh, state)
        with pytest.raises(ValueError, match="peft IA3 vector"):
            sdadapt.apply_lora(fresh, state)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())
        assert not any(n.endswith("sdadapt") for n, _ in fresh.named_modules())
        return
    handle = sdadapt.load_adapter(fresh, state)
    with torch.no_grad():
        assert torch.allclose(fresh(x), y_peft, atol=1e-6)
    save_peft(tmp_path / "again", state)  # the flag is peft's own semantics: not written
    torch.manual_seed(0)
    again = peft.PeftModel.from_pretrained(build(), str(tmp_path / "again"))
    with torch.no_grad():
        assert torch.allclose(again(x), y_peft, atol=1e-6)
    handle.remove()
