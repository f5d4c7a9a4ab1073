"""(IA)³: the delta against a float64 reference written here, the module against the function,
the bias rule, strengths, merge/unmerge bits, key recognition, errors, the ``ia3`` method.

The property suite (tests/test_adapter_families.py) also runs the family's registered examples;
tests/test_ia3_interop.py checks it against the lycoris-lora package.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sdadapt
from sdadapt.adapters import IA3Config, IA3Module, geometry_of, ia3_delta_weight
from sdadapt.adapters.registry import (
    adapter_from_file_tensors,
    family_of_keys,
    file_layer_delta,
)
from sdadapt.errors import InputError
from sdadapt.formats.layers import split_key

TARGET = sdadapt.by_type(nn.Linear, nn.Conv2d)


def reference_merged(weight: torch.Tensor, vector: torch.Tensor, on_input: bool, m: float) -> torch.Tensor:
    """float64 ``W'[o, i, ...] = W[o, i, ...] · (1 + m · v[o or i])``, element by element."""
    w, v = weight.double(), vector.double().flatten()
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            out[o, i] = w[o, i] * (1 + m * float(v[i] if on_input else v[o]))
    return out


def _layer(kind: str, out_f: int = 5, in_f: int = 3, k: int = 3) -> nn.Module:
    return nn.Linear(in_f, out_f) if kind == "linear" else nn.Conv2d(in_f, out_f, k, padding=1)


def _input(kind: str, in_f: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 4, in_f) if kind == "linear" else (2, in_f, 6, 6), generator=g)


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 6), kernel=st.sampled_from([(), (1, 1), (3, 3), (1, 3)]),
       on_input=st.booleans(), m=st.sampled_from([1.0, 0.5, -0.7, 2.0]), seed=st.integers(0, 2**16))
def test_delta_and_module_match_the_reference(out_f, in_f, kernel, on_input, m, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f) if not kernel else nn.Conv2d(in_f, out_f, kernel)
    geometry = geometry_of(layer)
    channels = in_f if on_input else out_f
    shape = (channels,) if not kernel else (1, channels, 1, 1)
    vector = torch.randn(shape, generator=g, dtype=torch.float64)
    base = layer.weight.detach().double()
    ref = reference_merged(base, vector, on_input, m) - base
    assert torch.allclose(ia3_delta_weight(base, vector, on_input=on_input, scale=m), ref, atol=1e-12)
    module = IA3Module.from_file_tensors(geometry, {"weight": vector, "on_input": torch.tensor(int(on_input))})
    module.set_multiplier(m)
    assert module.weight.dtype == torch.float64 and int(module.on_input) == int(on_input)
    assert torch.allclose(module.merge_delta(base), ref, atol=1e-12)
    # forward (Δy from the base weight) == the layer's op with the merged delta, no bias
    x = torch.randn((3, in_f) if not kernel else (2, in_f, 5, 6), generator=g, dtype=torch.float64)
    assert torch.allclose(module(x, base), geometry.conv(x, ref), atol=1e-10)
    # the file path (registry) gives the same delta at the strength, and no bias delta
    delta, bias = file_layer_delta(module.file_tensors(), geometry, base_weight=base, scale=m, dtype=torch.float64)
    assert bias is None and torch.allclose(delta, ref, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True])
def test_zero_init_identity_bias_untouched_and_merge_restores_bits(kind, on_input):
    torch.manual_seed(0)
    model = nn.Sequential(_layer(kind))
    x = _input(kind)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
    handle = sdadapt.inject(model, TARGET, IA3Config(train_on_input=on_input))
    adapter = handle.modules["0"]
    assert torch.count_nonzero(adapter.weight) == 0
    assert set(model.state_dict()) >= set(original)  # base keys unchanged (the adapter sits beside)
    assert {k for k in model.state_dict() if ".sdadapt." not in k} == set(original)
    with torch.no_grad():
        assert torch.equal(model(x), y0)
        adapter.weight.copy_(torch.randn_like(adapter.weight))
        y = model(x)
        # the bias is not scaled: y - bias == (W ⊙ (1 + w)) x exactly as the reference, bias added once
        layer = model[0]
        merged = reference_merged(layer.weight.detach(), adapter.weight.detach(), on_input, 1.0).float()
        expected = nn.functional.linear(x, merged, layer.bias) if kind == "linear" else layer._conv_forward(x, merged, layer.bias)
        assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
        handle.merge()
        assert torch.equal(model[0].bias, original["0.bias"])
        assert torch.allclose(model(x), y, atol=1e-5, rtol=1e-5)
        handle.set_scale(0.25)
        handle.unmerge()
        for key, value in original.items():
            assert torch.equal(model.state_dict()[key], value), key
        handle.remove()
        assert torch.equal(model(x), y0)


def test_multiplier_is_lycoris_strength():
    """W(1 + m·w): strength m moves the output linearly, m = 0 is the base model."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6))
    x = _input("linear", in_f=4)
    with torch.no_grad():
        base = model(x)
    handle = sdadapt.inject(model, TARGET, IA3Config())
    with torch.no_grad():
        handle.modules["0"].weight.copy_(torch.randn(6))
        outputs = {}
        for m in (0.0, 0.5, 1.0):
            handle.set_scale(m)
            outputs[m] = model(x)
    assert torch.equal(outputs[0.0], base)
    assert torch.allclose(outputs[0.5] - base, 0.5 * (outputs[1.0] - base), atol=1e-6)


def test_keys_recognition_does_not_confuse_other_families():
    assert family_of_keys({"weight", "on_input"}).name == "ia3"
    with pytest.raises(ValueError, match="no adapter family"):
        family_of_keys({"weight"})  # a lone `.weight` (a norm, a base layer) is no family's
    assert split_key("a.to_k.lora_down.weight") == ("a.to_k", "lora_down.weight")
    assert split_key("a.to_k.weight") == ("a.to_k", "weight")
    assert family_of_keys({"lora_down.weight", "lora_up.weight", "alpha"}).name == "lora"


@pytest.mark.parametrize("tensors, message", [
    ({"weight": torch.zeros(4), "on_input": torch.tensor(0)}, r"to_k\.weight: IA3 vector of shape \(4,\) .* must be \(5,\)"),
    ({"weight": torch.zeros(5), "on_input": torch.tensor(1)}, r"to_k\.weight: .*on_input=1 .* must be \(3,\)"),
    ({"weight": torch.zeros(5), "on_input": torch.tensor(2)}, r"to_k\.on_input: must be one value 0 or 1"),
    ({"weight": torch.zeros(1, 5, 1, 1), "on_input": torch.tensor(0)}, r"to_k\.weight: .*must be \(5,\)"),
    ({"on_input": torch.tensor(0)}, r"to_k: IA3 tensors \['weight'\] are missing"),
])
def test_bad_tensors_name_the_key(tensors, message):
    geometry = geometry_of(nn.Linear(3, 5))
    with pytest.raises(ValueError, match=message):
        adapter_from_file_tensors(geometry, tensors, name="to_k")


def test_conv_vector_shape_is_lycoris():
    geometry = geometry_of(nn.Conv2d(3, 5, 3))
    assert tuple(IA3Module.from_config(IA3Config(), geometry).weight.shape) == (1, 5, 1, 1)
    assert tuple(IA3Module.from_config(IA3Config(train_on_input=True), geometry).weight.shape) == (1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"must be \(1, 5, 1, 1\)"):
        adapter_from_file_tensors(geometry, {"weight": torch.zeros(5), "on_input": torch.tensor(0)}, name="conv")
    with pytest.raises(TypeError, match="train_on_input must be a bool"):
        IA3Config(train_on_input="yes")  # type: ignore[arg-type]


def test_ia3_method_on_a_tiny_sd_unet_and_clip(tmp_path):
    """The ``ia3`` method picks LyCORIS' ia3 preset layers, feed-forward outputs on their inputs;
    ``train_on_input`` forces one axis; remove() restores the models bit for bit."""
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.methods import METHODS

    unet, te = tiny_unet_sd1(), tiny_clip()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    system = SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1")
    adaptation = METHODS["ia3"].prepare(system)
    unet_layers = adaptation.handles["unet"].modules
    te_layers = adaptation.handles["text_encoder"].modules
    assert unet_layers and all(n.endswith(("to_k", "to_v", "ff.net.2")) for n in unet_layers)
    assert te_layers and all(n.endswith(("k_proj", "v_proj", "mlp.fc2")) for n in te_layers)
    for layers in (unet_layers, te_layers):
        for name, adapter in layers.items():
            assert adapter.train_input == name.endswith(("ff.net.2", "mlp.fc2")), name
    assert len(adaptation.params) == len(unet_layers) + len(te_layers)
    with torch.no_grad():
        for p in adaptation.params:
            p.copy_(torch.randn_like(p))
    saved = {c: h.state_dict() for c, h in adaptation.handles.items()}
    path = adaptation.save(tmp_path / "ia3.safetensors")
    adaptation.remove()
    resumed = METHODS["ia3"].prepare(system, network_weights=str(path))  # kohya's --network_weights
    assert all(torch.equal(resumed.handles[c].state_dict()[k], v) for c, state in saved.items() for k, v in state.items())
    resumed.remove()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items()) and set(unet.state_dict()) == set(before)

    forced = METHODS["ia3"].prepare(system, train_on_input=False, text_encoder=False, targets="attn-only")
    assert set(forced.handles) == {"unet"}
    assert all(not a.train_input for a in forced.handles["unet"].modules.values())
    forced.remove()
    with pytest.raises(InputError, match="unknown LyCORIS preset"):
        METHODS["ia3"].prepare(system, targets="nope")


def test_train_ia3_on_a_diffusers_folder_with_kohya_network_args(tmp_path, capsys):
    """``train ia3 --network-args algo=ia3 preset=ia3`` (a kohya LyCORIS config's args) trains the
    vectors at the LR given and writes a LyCORIS IA3 file that loads back and changes the UNet."""
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline, _unet_outputs_with

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", n=2)
    out = tmp_path / "ia3.safetensors"
    code = main(["train", "ia3", "--images", str(images), "--model", str(root), "--steps", "2", "--lr", "5e-3",
                 "--network-args", "algo=ia3", "preset=ia3", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    state, metadata = sdadapt.load_lora(out)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert '"algo": "ia3"' in metadata["ss_network_args"] and '"preset": "ia3"' in metadata["ss_network_args"]
    flags = {k: int(v) for k, v in state["unet"].items() if k.endswith(".on_input")}
    assert flags and all(v == k.endswith("ff.net.2.on_input") for k, v in flags.items())
    assert any(torch.count_nonzero(v) for k, v in state["unet"].items() if k.endswith(".weight"))  # it trained
    before, after, handle = _unet_outputs_with(root, state["unet"])
    assert len(handle) == len(flags) and not torch.allclose(before, after)
    # a LoRA method refuses algo=ia3, naming the method to use
    assert main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "1",
                 "--network-args", "algo=ia3"]) == 2
    assert "train ia3" in capsys.readouterr().err


def test_lycoris_page_ia3_example_runs(tmp_path, monkeypatch):
    """docs/lycoris.md's (IA)³ example (its ```py block) runs and its assertions hold."""
    from docs_pages import code_blocks

    blocks = [b for b in code_blocks("lycoris.md", language="py") if "IA3Config" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/lycoris.md", "exec"), namespace)  # noqa: S102 - the docs example, as test_lycoris_docs runs it
    assert (tmp_path / "ia3.safetensors").is_file()
    assert namespace["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert set(namespace["state"]["unet"]) == {"0.weight", "0.on_input", "2.weight", "2.on_input"}


def test_fp16_save_keeps_on_input_an_integer(tmp_path):
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Linear(3, 4))
    handle = sdadapt.inject(model, TARGET, IA3Config(train_on_input=True))
    with torch.no_grad():
        handle.modules["0"].weight.fill_(0.25)
    path = tmp_path / "half.safetensors"
    sdadapt.save_lora(path, {"unet": handle.state_dict()}, format="kohya", dtype=torch.float16)
    written = load_file(str(path))
    assert written["lora_unet_0.weight"].dtype == torch.float16
    assert written["lora_unet_0.on_input"].dtype == torch.int64 and int(written["lora_unet_0.on_input"]) == 1


def test_resize_of_an_ia3_file_asks_for_the_base_naming_ia3(tmp_path):
    """An (IA)³ layer's delta is made from the base weight: resize-lora without --base says so
    (not the LoHa/DoRA reasons), and with the weight at hand it densifies the exact delta."""
    from sdadapt.errors import WeightFileError
    from sdadapt.loratools import resize_lora
    from sdadapt.loratools.resize import dense_layer_delta

    model = nn.Sequential(nn.Linear(3, 4, bias=False))
    handle = sdadapt.inject(model, TARGET, IA3Config(train_on_input=True))
    with torch.no_grad():
        handle.modules["0"].weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    path = tmp_path / "ia3.safetensors"
    sdadapt.save_lora(path, {"unet": handle.state_dict()}, format="kohya")
    with pytest.raises((InputError, WeightFileError), match=r"\(IA\)³ layer .*--base CKPT") as caught:
        resize_lora(path, tmp_path / "out.safetensors", rank=2)
    assert "LoHa" not in str(caught.value) and "DoRA" not in str(caught.value)
    tensors = {k.split(".", 1)[1]: v for k, v in handle.state_dict().items()}
    geometry = geometry_of(model[0])
    with pytest.raises(InputError, match=r"\(IA\)³ layer's delta W' - W depends on the base weight"):
        dense_layer_delta(tensors, geometry, name="unet:0")
    base = model[0].weight.detach()
    delta, _ = dense_layer_delta(tensors, geometry, base_weight=base, scale=0.5, name="unet:0")
    assert torch.allclose(delta, reference_merged(base, tensors["weight"], True, 0.5).float() - base, atol=1e-6)


@pytest.mark.parametrize("config, family", [
    (sdadapt.LoRAConfig(rank=2, alpha=1.0), "lora"),
    (sdadapt.LoKrConfig(rank=2, alpha=1.0, factor=2), "lokr"),
    (sdadapt.FullConfig(), "full"),
    (IA3Config(train_on_input=True), "ia3"),
])
def test_files_with_weight_keys_keep_their_family(config, family, tmp_path):
    """(IA)³'s bare ``weight`` key does not take other families' ``*.weight`` tensors: a LoRA, LoKr
    and full-diff file load, inspect and apply as their own family through ``load_lora``."""
    from safetensors.torch import load_file

    from sdadapt.adapters.registry import family_of_config
    from sdadapt.formats import describe_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Conv2d(6, 6, 3, padding=1))
    handle = sdadapt.inject(model, TARGET, config)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path / "adapter.safetensors"
    sdadapt.save_lora(path, {"unet": handle.state_dict()}, format="kohya")
    assert family_of_config(config).name == family
    state, _ = sdadapt.load_lora(path)
    assert {k: torch.equal(v, handle.state_dict()[k]) for k, v in state["unet"].items()} == dict.fromkeys(
        handle.state_dict(), True)
    assert describe_file(path)["family"] == family
    twin = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Conv2d(6, 6, 3, padding=1))
    loaded = sdadapt.load_adapter(twin, state["unet"])
    assert {type(m) for m in loaded.modules.values()} == {type(m) for m in handle.modules.values()}
    assert set(load_file(str(path))) >= {f"lora_unet_{k}" for k in handle.state_dict() if not k.endswith(".alpha")}


def test_glora_weight_keys_are_read_as_glora_not_as_ia3(tmp_path):
    """LyCORIS GLoRA's ``a1.weight`` ... end in ``.weight`` too: read as one GLoRA layer ``to_k``, not
    split into layers ``to_k.a1`` with an (IA)³-like ``weight``."""
    from safetensors.torch import save_file

    from sdadapt.adapters.registry import algorithm_of_keys
    from sdadapt.formats.layers import group_by_layer

    path = tmp_path / "glora.safetensors"
    save_file({"lora_unet_to_k.a1.weight": torch.zeros(4, 2), "lora_unet_to_k.a2.weight": torch.zeros(2, 4),
               "lora_unet_to_k.b1.weight": torch.zeros(6, 2), "lora_unet_to_k.b2.weight": torch.zeros(2, 4),
               "lora_unet_to_k.alpha": torch.tensor(1.0)}, str(path))
    groups = group_by_layer(sdadapt.load_lora(path)[0]["unet"])
    assert list(groups) == ["to_k"]
    assert set(groups["to_k"]) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}
    assert algorithm_of_keys(groups["to_k"]) == "glora"


def test_network_weights_with_the_other_axis_is_refused(tmp_path):
    """A file trained with --train-on-input resumed into a run scaling outputs: on a square layer the
    shapes agree, so the on_input flag is what tells; refused, naming the module and the option
    (a silent copy would save on_input=1 for a vector that scales outputs)."""
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.methods import METHODS

    system = SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip(), base_model="sd1")
    first = METHODS["ia3"].prepare(system, train_on_input=True, text_encoder=False, targets="attn-only")
    path = first.save(tmp_path / "inputs.safetensors")
    first.remove()
    with pytest.raises(InputError, match=r"attn[12]\.to_\w+ scales the layer's inputs, the run's adapter its outputs; "
                                         r"pass --train-on-input"):
        METHODS["ia3"].prepare(system, train_on_input=False, text_encoder=False, targets="attn-only",
                               network_weights=str(path))
    again = METHODS["ia3"].prepare(system, train_on_input=True, text_encoder=False, targets="attn-only",
                                   network_weights=str(path))
    assert all(a.train_input and int(a.on_input) == 1 for a in again.handles["unet"].modules.values())
    again.remove()
    from safetensors.torch import load_file, save_file

    other = {k: (v[:-1] if k.endswith(".weight") else v) for k, v in load_file(str(path)).items()}
    save_file(other, str(tmp_path / "other-model.safetensors"))
    with pytest.raises(InputError, match=r"\(IA\)³ vector does not fit the layer \(weight .*another base model"):
        METHODS["ia3"].prepare(system, train_on_input=True, text_encoder=False, targets="attn-only",
                               network_weights=str(tmp_path / "other-model.safetensors"))


def test_kohya_gui_config_for_ia3_trains(tmp_path, capsys):
    """A kohya_ss GUI LyCORIS config for algo=ia3 carries network_dim / network_alpha and conv_dim ...
    in network_args (LyCORIS' IA3Module ignores them): ``train ia3`` trains it, saying they are ignored;
    the same option as a flag is refused (an option of the rank-based methods)."""
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", n=2)
    config = tmp_path / "kohya.toml"
    config.write_text(f'''pretrained_model_name_or_path = "{root.as_posix()}"
train_data_dir = "{images.as_posix()}"
output_dir = "{tmp_path.as_posix()}"
output_name = "ia3"
max_train_steps = 1
learning_rate = 5e-3
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 1
network_args = ["algo=ia3", "preset=ia3", "conv_dim=4", "conv_alpha=1", "dropout=0", "rank_dropout=0", "use_tucker=False"]
''')
    assert main(["train", "ia3", "--config", str(config)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "ignored rank, alpha, conv_rank, conv_alpha, use_tucker, dropout, rank_dropout for ia3" in err
    _, metadata = sdadapt.load_lora(tmp_path / "ia3.safetensors")
    assert '"algo": "ia3"' in metadata["ss_network_args"]
    assert main(["train", "ia3", "--config", str(config), "--network-dim", "8", "--overwrite"]) == 2
    assert "--network-dim is an option of" in capsys.readouterr().err
