"""Hypernetwork files: A1111's .pt dict and the .safetensors twin, both translation directions,
old keys, the settings' load defaults, a malicious pickle, the errors, and the training method."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hypernetworks import A1111Module, _randomise

import sdadapt
from sdadapt.formats.detect import describe_file
from sdadapt.formats.files import WeightFileError, read_weights
from sdadapt.formats.hypernetworks import (
    SETTING_KEYS,
    a1111_to_canonical,
    canonical_to_a1111,
    metadata_to_settings,
    read_hypernetwork_file,
    settings_to_metadata,
)
from sdadapt.hypernetworks import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkConfig,
    hypernetwork_settings,
)


def _a1111_save_dict(widths, *, layer_structure=(1, 2, 1), activation="relu", layer_norm=True, dropout=(0, 0, 0),
                     activate_output=False, seed=0) -> dict:
    """What A1111's Hypernetwork.save puts in torch.save: real state_dict() OrderedDicts in tuples."""
    torch.manual_seed(seed)
    out: dict = {}
    for w in widths:
        pair = []
        for _ in range(2):
            m = A1111Module(w, None, list(layer_structure), activation, "Normal", layer_norm, activate_output, list(dropout))
            _randomise(m, seed=seed + w)
            pair.append(m.state_dict())
        out[w] = tuple(pair)
    out.update({
        "step": 1500, "name": "anime-style", "layer_structure": [float(v) for v in layer_structure],
        "activation_func": activation, "is_layer_norm": layer_norm, "weight_initialization": "Normal",
        "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned-emaonly", "activate_output": activate_output,
        "use_dropout": any(dropout), "dropout_structure": list(dropout), "last_layer_dropout": dropout[-2] != 0,
        "optional_info": None,
    })
    return out


def _same(a: dict, b: dict) -> bool:
    """Equal nested dicts/tuples/lists with tensors compared exactly (dtype included) and types kept."""
    if type(a) is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)  # (order checked where it matters)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a1111_dict_round_trips_through_canonical_form_exactly(tmp_path):
    original = _a1111_save_dict([768, 320], layer_structure=(1, 1.5, 1.5, 1), dropout=(0, 0.3, 0.3, 0))
    tensors, settings_ = a1111_to_canonical(original, source="x.pt")
    # relu, LN and dropout take Sequential indices: Linear 0, 4, 8 and LayerNorm 2, 6, 9
    assert set(tensors) == {f"{w}.{i}.linear.{j}.{p}" for w in (768, 320) for i in (0, 1) for j in (0, 2, 4, 6, 8, 9)
                            for p in ("weight", "bias")}
    assert all(torch.equal(tensors[f"{w}.{i}.{k}"], v) for w in (768, 320) for i in (0, 1) for k, v in original[w][i].items())
    assert list(settings_) == list(SETTING_KEYS)
    back = canonical_to_a1111(tensors, settings_)
    assert list(back) == list(original)
    assert all(isinstance(back[w], tuple) and len(back[w]) == 2 for w in (768, 320))
    assert all(_same(dict(back[w][i]), dict(original[w][i])) for w in (768, 320) for i in (0, 1))
    assert all(_same(back[k], original[k]) for k in SETTING_KEYS)
    # and the other way: canonical -> A1111 -> canonical
    again_tensors, again_settings = a1111_to_canonical(back, source="x.pt")
    assert _same(again_tensors, tensors) and _same(again_settings, settings_)
    assert metadata_to_settings(settings_to_metadata(settings_)) == settings_


@pytest.mark.parametrize("activation", ["leakyrelu", "prelu"])  # (prelu: a learnt slope, linear.<i>.weight (1,))
def test_a1111_written_pt_loads_safely_and_runs_like_a1111(tmp_path, activation):
    path = tmp_path / "anime-style.pt"
    saved = _a1111_save_dict([64, 32], activation=activation, layer_norm=True)
    torch.save(saved, path)  # OrderedDicts with _metadata, tuples, int keys: all weights_only-loadable
    # the file reader (read_weights, flattened) and the dict translation agree
    read_tensors, read_settings = read_hypernetwork_file(path)
    dict_tensors, dict_settings = a1111_to_canonical(torch.load(path, weights_only=True), source=str(path))
    assert list(read_tensors) == list(dict_tensors) and _same(read_tensors, dict_tensors)
    assert read_settings == dict_settings and list(read_settings) == list(SETTING_KEYS)
    hn = sdadapt.load_hypernetwork(path)
    assert hn.widths == (64, 32) and hn.name == "anime-style" and hn.step == 1500
    assert hn.sd_checkpoint == "e1441589a6" and hn.sd_checkpoint_name == "v1-5-pruned-emaonly"
    assert hn.config == HypernetworkConfig(activation=activation, layer_norm=True)
    x = torch.randn(2, 7, 32)
    reference = A1111Module(32, dict(saved[32][1]), [1, 2, 1], activation, "Normal", True, False, [0, 0, 0]).eval()
    reference.multiplier = 0.4
    torch.testing.assert_close(hn.pair(32)[1](x, strength=0.4), reference(x))
    # saving it again writes the same dict A1111 wrote
    out = tmp_path / "again.pt"
    sdadapt.save_hypernetwork(out, hn)
    reread = torch.load(out, weights_only=True)
    assert list(reread) == list(saved)
    assert all(_same(dict(reread[w][i]), dict(saved[w][i])) for w in (64, 32) for i in (0, 1))
    assert all(_same(reread[k], saved[k]) for k in SETTING_KEYS)


def test_our_pt_is_what_a1111_loads(tmp_path):
    config = HypernetworkConfig(layer_structure=(1, 2, 2, 1), activation="swish", layer_norm=True,
                                dropout_structure=(0, 0.3, 0, 0), activate_output=True, weight_init="XavierUniform")
    hn = Hypernetwork([40, 24], config, name="mine", step=12)
    _randomise(hn)
    path = sdadapt.save_hypernetwork(tmp_path / "mine.pt", hn)
    obj = torch.load(path, weights_only=True)
    assert [k for k in obj if isinstance(k, int)] == [40, 24]
    assert [k for k in obj if isinstance(k, str)] == list(SETTING_KEYS)
    assert obj["layer_structure"] == [1.0, 2.0, 2.0, 1.0] and obj["activation_func"] == "swish"
    assert obj["use_dropout"] is True and obj["last_layer_dropout"] is False and obj["dropout_structure"] == [0.0, 0.3, 0.0, 0.0]
    assert obj["weight_initialization"] == "XavierUniform" and obj["is_layer_norm"] is True and obj["step"] == 12
    # A1111's loader: HypernetworkModule(size, sd[i], settings...) with a strict load_state_dict
    x = torch.randn(3, 24)
    for index in (0, 1):
        theirs = A1111Module(24, dict(obj[24][index]), obj["layer_structure"], obj["activation_func"],
                             obj["weight_initialization"], obj["is_layer_norm"], obj["activate_output"],
                             obj["dropout_structure"]).eval()
        torch.testing.assert_close(theirs(x), hn.pair(24)[index].eval()(x))


def test_old_linear1_linear2_files_and_load_defaults(tmp_path):
    g = torch.Generator().manual_seed(0)
    old = {f"linear{i}.{p}": torch.randn(*shape, generator=g) for i, p, shape in
           [(1, "weight", (64, 32)), (1, "bias", (64,)), (2, "weight", (32, 64)), (2, "bias", (32,))]}
    path = tmp_path / "very-old.pt"
    torch.save({32: (dict(old), dict(old))}, path)  # no settings at all
    tensors, settings_ = read_hypernetwork_file(path)
    assert sorted(tensors) == sorted(f"32.{i}.linear.{j}.{p}" for i in (0, 1) for j in (0, 1) for p in ("weight", "bias"))
    assert settings_["activate_output"] is True  # A1111's load default (False at creation)
    assert settings_["layer_structure"] == [1, 2, 1] and settings_["activation_func"] is None
    assert settings_["name"] == "very-old" and settings_["dropout_structure"] == [0, 0, 0]
    hn = sdadapt.load_hypernetwork(path)
    reference = A1111Module(32, dict(old), [1, 2, 1], None, "Normal", False, True, None).eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(hn.pair(32)[0](x), reference(x))
    # a converted old file in safetensors form reads too
    from safetensors.torch import save_file

    save_file({f"32.{i}.{k}": v.clone() for i in (0, 1) for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    assert torch.equal(sdadapt.load_hypernetwork(tmp_path / "old.safetensors").pair(32)[1].linear[1].bias, old["linear2.bias"])
    assert describe_file(path)["kind"] == "hypernetwork"


layer_structures = st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0]), min_size=0, max_size=3).map(lambda m: (1.0, *m, 1.0))


@st.composite
def hypernetworks(draw):
    structure = draw(layer_structures)
    dropout = draw(st.lists(st.sampled_from([0.0, 0.1, 0.3]), min_size=len(structure), max_size=len(structure)))
    config = HypernetworkConfig(
        layer_structure=structure,
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        layer_norm=draw(st.booleans()),
        dropout_structure=tuple(dropout),
        activate_output=draw(st.booleans()),
        weight_init=draw(st.sampled_from(["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])),
    )
    widths = draw(st.lists(st.integers(4, 24), min_size=1, max_size=3, unique=True))
    info = dict(
        name=draw(st.one_of(st.none(), st.text(min_size=1, max_size=12))),
        step=draw(st.integers(0, 10**6)),
        sd_checkpoint=draw(st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=10, max_size=10))),
        sd_checkpoint_name=draw(st.one_of(st.none(), st.text(max_size=20))),
        optional_info=draw(st.one_of(st.none(), st.text(max_size=30))),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    return widths, config, info, dtype


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=hypernetworks())
def test_save_load_round_trip_property(spec, tmp_path):
    widths, config, info, dtype = spec
    hn = Hypernetwork(widths, config, **info).to(dtype)
    _randomise(hn)
    for suffix in (".pt", ".safetensors"):
        path = sdadapt.save_hypernetwork(tmp_path / f"hn{suffix}", hn)
        back = sdadapt.load_hypernetwork(path, dtype=None)
        assert back.config == config
        # .pt keeps A1111's dict order; safetensors headers are sorted, so only the set is kept
        assert back.widths == tuple(widths) if suffix == ".pt" else set(back.widths) == set(widths)
        assert (back.name, back.step, back.sd_checkpoint, back.sd_checkpoint_name, back.optional_info) == (
            info["name"], info["step"], info["sd_checkpoint"], info["sd_checkpoint_name"], info["optional_info"])
        assert _same(back.file_tensors(), hn.file_tensors()), suffix
        assert hypernetwork_settings(back) == hypernetwork_settings(hn)
    # the two files say the same thing to read_weights (tensors and JSON metadata)
    pt_tensors, pt_meta = read_weights(tmp_path / "hn.pt")
    st_tensors, st_meta = read_weights(tmp_path / "hn.safetensors")
    assert _same(pt_tensors, st_tensors) and pt_meta == st_meta


def test_safetensors_twin_layout(tmp_path):
    hn = Hypernetwork([16], HypernetworkConfig(activation="relu"), name="n")
    path = sdadapt.save_hypernetwork(tmp_path / "n.safetensors", hn)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(f"16.{i}.linear.{j}.{p}" for i in (0, 1) for j in (0, 2) for p in ("weight", "bias"))
        meta = handle.metadata()
    assert set(meta) == set(SETTING_KEYS)
    assert json.loads(meta["layer_structure"]) == [1.0, 2.0, 1.0] and json.loads(meta["activation_func"]) == "relu"
    summary = describe_file(path)
    assert summary["kind"] == "hypernetwork"
    assert summary["widths"] == [16] and summary["layer_structure"] == [1.0, 2.0, 1.0]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_malicious_pt_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({768: ({"linear.0.weight": torch.zeros(1)}, {}), "name": _Evil(marker)}, path)
    with pytest.raises(WeightFileError, match=r"evil.pt: .*(run code|pickled Python object)"):
        sdadapt.load_hypernetwork(path)
    assert not marker.exists()


def _write(tmp_path, name, obj) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_files_that_are_not_usable_hypernetworks_are_named_and_explained(tmp_path):
    good = _a1111_save_dict([32], activation="relu", layer_norm=False)
    with pytest.raises(WeightFileError, match=r"lora.pt: not an A1111 hypernetwork \(tensors \[.lora_unet_x"):
        sdadapt.load_hypernetwork(_write(tmp_path, "lora.pt", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}))
    with pytest.raises(WeightFileError, match="width 32 has only the K MLP"):
        sdadapt.load_hypernetwork(_write(tmp_path, "one.pt", {**good, 32: (good[32][0],)}))
    with pytest.raises(WeightFileError, match=r"layer structure \[1.0, 0.5, 1.0\] gives \(16, 32\)"):
        # the settings say (1, 0.5, 1) but the tensors are (1, 2, 1)
        sdadapt.load_hypernetwork(_write(tmp_path, "edited.pt", {**good, "layer_structure": [1, 0.5, 1]}))
    with pytest.raises(WeightFileError, match=r"layer norm False.*unexpected \[.32.0.linear.3.bias"):
        # relu + LN file read as if it had no LayerNorm: Sequential indices differ
        sdadapt.load_hypernetwork(_write(tmp_path, "ln.pt", {**_a1111_save_dict([32]), "is_layer_norm": False}))
    with pytest.raises(WeightFileError, match="'is_layer_norm' is 'yes'"):
        sdadapt.load_hypernetwork(_write(tmp_path, "type.pt", {**good, "is_layer_norm": "yes"}))
    with pytest.raises(WeightFileError, match="unknown hypernetwork activation 'rrelu'"):
        sdadapt.load_hypernetwork(_write(tmp_path, "rrelu.pt", {**good, "activation_func": "rrelu"}))
    nan = {k: v.clone() for k, v in good[32][0].items()}
    nan["linear.0.weight"][0, 0] = float("nan")
    with pytest.raises(WeightFileError, match="NaN or inf"):
        sdadapt.load_hypernetwork(_write(tmp_path, "nan.pt", {**good, 32: (nan, good[32][1])}))
    with pytest.raises(WeightFileError, match=r"keys.pt: not an A1111 hypernetwork \(tensors \['32.0.net.0.weight'\]"):
        sdadapt.load_hypernetwork(_write(tmp_path, "keys.pt", {**good, 32: ({"net.0.weight": torch.zeros(1)}, good[32][1])}))
    from safetensors.torch import save_file

    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(WeightFileError, match="lora.safetensors: not an A1111 hypernetwork"):
        sdadapt.load_hypernetwork(tmp_path / "lora.safetensors")
    with pytest.raises(WeightFileError, match="no such file"):
        sdadapt.load_hypernetwork(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"\.pt .*or \.safetensors"):
        sdadapt.save_hypernetwork(tmp_path / "x.bin", Hypernetwork([8]))
    with pytest.raises(TypeError, match="Hypernetwork"):
        sdadapt.save_hypernetwork(tmp_path / "x.pt", {8: 1})  # type: ignore[arg-type]
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))


def test_training_method_trains_saves_an_a1111_file_and_removes_exactly(tmp_path):
    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy import build_toy
    from sdadapt.toy.evaluate import concept_data

    method = METHODS["hypernetwork"]
    assert method.file_suffix == ".pt"
    system = build_toy(seed=1)
    system.unet.conv_out.weight.requires_grad_(False)  # flags the adaptation must give back
    flags = [p.requires_grad for p in system.unet.parameters()]
    original = {k: v.clone() for k, v in system.unet.state_dict().items()}
    adaptation = method.adapt(system, seed=0)
    assert adaptation.hypernetwork.widths == (32, 64)
    assert not any(p.requires_grad for p in system.unet.parameters() if all(p is not q for q in adaptation.params))
    images, captions = concept_data("purple", 4, seed=0)
    before = [p.detach().clone() for p in adaptation.params]
    fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=method.learning_rate))
    assert any(not torch.equal(p, q) for p, q in zip(adaptation.params, before))
    path = adaptation.save(tmp_path / "purple.pt", metadata={"sdadapt_demo": "test"})
    loaded = sdadapt.load_hypernetwork(path)
    assert loaded.name == "purple" and loaded.optional_info == "sdadapt_demo: test"
    assert _same(loaded.file_tensors(), adaptation.hypernetwork.file_tensors())
    adaptation.remove()
    now = system.unet.state_dict()
    assert list(now) == list(original) and all(torch.equal(now[k], original[k]) for k in original)
    assert [p.requires_grad for p in system.unet.parameters()] == flags and flags[0] and not system.unet.conv_out.weight.requires_grad


def test_save_refuses_nan_weights_and_keeps_existing_files_when_asked(tmp_path):
    hn = Hypernetwork([8], name="x")
    path = sdadapt.save_hypernetwork(tmp_path / "x.pt", hn)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        sdadapt.save_hypernetwork(path, hn, overwrite=False)
    with torch.no_grad():
        hn.pair(8)[1].linear[0].weight[0, 0] = float("inf")
    for name in ("x.pt", "y.safetensors"):
        with pytest.raises(ValueError, match=r"8\.1\.linear\.0\.weight"):
            sdadapt.save_hypernetwork(tmp_path / name, hn)
    assert path.read_bytes() == before and not (tmp_path / "y.safetensors").exists()
