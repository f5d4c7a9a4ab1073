"""sdadapt's LoHa / LoKr / Tucker / DoRA math against the lycoris-lora package and peft.

* lycoris-lora (``pip install lycoris-lora``): its functional math on random tensors, and its modules
  (the ones ``lycoris.kohya`` trains with) on plain layers — sdadapt built from their saved tensors
  must produce the same output.
* peft LoHa / LoKr / DoRA on a tiny model: same tensors -> same outputs.
* DoRA files in both orientations vs the reference formula written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdadapt
from sdadapt.adapters import LoHaModule, LoKrModule, LoRAModule, factorization, geometry_of
from sdadapt.adapters.registry import adapter_from_file_tensors

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install lycoris-lora)")
from lycoris.functional import general as lyco_general  # noqa: E402
from lycoris.functional import locon as lyco_locon  # noqa: E402
from lycoris.functional import loha as lyco_loha  # noqa: E402
from lycoris.functional import lokr as lyco_lokr  # noqa: E402

TORCH = "torch"  # pin lycoris' eager reference path (no fused kernels / compile on CPU)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- functional math


def test_factorization_matches_lycoris_everywhere():
    for dim in [1, 2, 7, 8, 12, 127, 128, 250, 320, 360, 512, 640, 768, 1024, 1280, 2560]:
        for factor in [-1, 2, 4, 8, 16, 3]:
            assert factorization(dim, factor) == lyco_general.factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("kernel", [(), (3, 3), (1, 1)])
def test_loha_delta_matches_lycoris_functional(kernel):
    out_f, in_f, r = 6, 5, 3
    k = int(torch.tensor(kernel).prod()) if kernel else 1
    t = {"hada_w1_a": _rand(out_f, r, seed=1), "hada_w1_b": _rand(r, in_f * k, seed=2),
         "hada_w2_a": _rand(out_f, r, seed=3), "hada_w2_b": _rand(r, in_f * k, seed=4), "alpha": torch.tensor(1.5)}
    layer = nn.Linear(in_f, out_f) if not kernel else nn.Conv2d(in_f, out_f, kernel)
    ours = LoHaModule.from_file_tensors(geometry_of(layer), t).double().delta_weight()
    # lycoris wants (w1d=w1_b, w1u=w1_a, ...) with w*_b unflattened for convs
    unflat = lambda b: b.reshape(r, in_f, *kernel)  # noqa: E731
    theirs = lyco_loha.diff_weight(unflat(t["hada_w1_b"]), t["hada_w1_a"], unflat(t["hada_w2_b"]), t["hada_w2_a"],
                                   None, None, gamma=1.5 / r, backend=TORCH)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_loha_tucker_matches_lycoris_functional():
    out_f, in_f, r = 6, 5, 3
    t = {"hada_w1_a": _rand(r, out_f, seed=1), "hada_w1_b": _rand(r, in_f, seed=2), "hada_t1": _rand(r, r, 3, 3, seed=5),
         "hada_w2_a": _rand(r, out_f, seed=3), "hada_w2_b": _rand(r, in_f, seed=4), "hada_t2": _rand(r, r, 3, 3, seed=6),
         "alpha": torch.tensor(2.0)}
    ours = LoHaModule.from_file_tensors(geometry_of(nn.Conv2d(in_f, out_f, 3)), t).double().delta_weight()
    theirs = lyco_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"],
                                   t["hada_t2"], gamma=2.0 / r, backend=TORCH)
    assert torch.allclose(ours, theirs, atol=1e-12)


LOKR_LAYOUTS = [
    # (kernel, keys) for out 8 = 2·4, in 12 = 3·4 (factor -1) and r = 2
    ((), {"lokr_w1": (2, 3), "lokr_w2": (4, 4)}),
    ((), {"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}),
    ((), {"lokr_w1_a": (2, 2), "lokr_w1_b": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}),
    ((), {"lokr_w1_a": (2, 2), "lokr_w1_b": (2, 3), "lokr_w2": (4, 4)}),
    ((3, 3), {"lokr_w1": (2, 3), "lokr_w2": (4, 4, 3, 3)}),
    ((3, 3), {"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 36)}),
    ((3, 3), {"lokr_w1_a": (2, 2), "lokr_w1_b": (2, 3), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4), "lokr_t2": (2, 2, 3, 3)}),
]


@pytest.mark.parametrize("kernel, layout", LOKR_LAYOUTS)
def test_lokr_delta_matches_lycoris_functional(kernel, layout):
    t = {k: _rand(*shape, seed=i) for i, (k, shape) in enumerate(layout.items())}
    t["alpha"] = torch.tensor(3.0)
    layer = nn.Linear(12, 8) if not kernel else nn.Conv2d(12, 8, kernel)
    ours = LoKrModule.from_file_tensors(geometry_of(layer), t).double().delta_weight()
    ranks = [t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
    scale = 3.0 / ranks[0] if ranks else 1.0  # both full: scale 1 (LyCORIS forces alpha = r)
    w2b = t.get("lokr_w2_b")
    if w2b is not None and "lokr_t2" not in t and kernel:
        w2b = w2b.reshape(2, 4, *kernel)  # lycoris' functional takes w2_b unflattened
    theirs = lyco_lokr.kron_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                   t.get("lokr_w2_a"), w2b, t.get("lokr_t2"), scale=scale, backend=TORCH)
    assert torch.allclose(ours, theirs.reshape(ours.shape), atol=1e-12)


def test_locon_tucker_matches_lycoris_functional():
    r = 3
    t = {"lora_down.weight": _rand(r, 5, 1, 1, seed=1), "lora_mid.weight": _rand(r, r, 3, 3, seed=2),
         "lora_up.weight": _rand(6, r, 1, 1, seed=3), "alpha": torch.tensor(1.0)}
    ours = LoRAModule.from_file_tensors(geometry_of(nn.Conv2d(5, 6, 3)), t).double().delta_weight()
    theirs = lyco_locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"], t["lora_mid.weight"], gamma=1.0 / r, backend=TORCH)
    assert torch.allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_dora_weight_matches_lycoris_weight_decompose(wd_on_out, kernel):
    layer = nn.Linear(5, 6) if not kernel else nn.Conv2d(5, 6, kernel)
    geometry = geometry_of(layer)
    base = _rand(*geometry.weight_shape, seed=1)
    ones = [1] * len(kernel)
    scale_shape = (6, 1, *ones) if wd_on_out else (1, 5, *ones)
    t = {"lora_down.weight": _rand(2, 5, *kernel, seed=2), "lora_up.weight": _rand(6, 2, *ones, seed=3),
         "alpha": torch.tensor(1.0), "dora_scale": _rand(*scale_shape, seed=4).abs() + 0.5}
    adapter = adapter_from_file_tensors(geometry, t).double()
    assert adapter.wd_on_out is wd_on_out
    ours = adapter.adapted_weight(base)
    delta = (t["lora_up.weight"].reshape(6, 2) @ t["lora_down.weight"].reshape(2, -1)).reshape(base.shape) * 0.5
    theirs = lyco_general.weight_decompose(base + delta, t["dora_scale"], 1, wd_on_out, backend=TORCH)
    # lycoris adds float eps to the norm; the difference is of that order
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- lycoris modules


def _lycoris_module(cls_name, layer, **kwargs):
    from lycoris import modules

    module = getattr(modules, cls_name)("lora_test", layer, 1.0, **kwargs)
    module.apply_to()
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":
                p.mul_(1.2)
            elif not name.startswith("org"):
                p.copy_(torch.randn_like(p) * 0.3)
    return module


MODULE_CASES = [
    ("LohaModule", {"lora_dim": 3, "alpha": 1.5}),
    ("LohaModule", {"lora_dim": 2, "alpha": 4.0, "use_tucker": True}),
    ("LokrModule", {"lora_dim": 1, "alpha": 0.5, "factor": 2}),
    ("LokrModule", {"lora_dim": 1, "alpha": 2.0, "factor": 2, "decompose_both": True}),
    ("LokrModule", {"lora_dim": 1, "alpha": 2.0, "factor": 2, "use_tucker": True}),
    ("LokrModule", {"lora_dim": 2, "alpha": 7.0, "full_matrix": True}),
    ("LoConModule", {"lora_dim": 3, "alpha": 1.0, "use_tucker": True}),
    ("LoConModule", {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}),
    ("LoConModule", {"lora_dim": 2, "alpha": 3.0, "weight_decompose": True, "wd_on_out": False}),
    ("LohaModule", {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True, "wd_on_out": False}),
    ("LokrModule", {"lora_dim": 1, "alpha": 1.0, "factor": 2, "weight_decompose": True}),
    ("LokrModule", {"lora_dim": 2, "alpha": 1.0, "rs_lora": True, "factor": 2, "decompose_both": True}),
]


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("cls_name, kwargs", MODULE_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_lycoris_module_output_equals_sdadapt_built_from_its_saved_tensors(cls_name, kwargs, kind):
    torch.manual_seed(0)
    make = (lambda: nn.Linear(8, 12)) if kind == "linear" else (lambda: nn.Conv2d(8, 12, 3, padding=1, stride=2))
    layer, twin = make(), make()
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 8, 6, 6)
    module = _lycoris_module(cls_name, layer, **kwargs)
    with torch.no_grad():
        theirs = module(x)
    saved = {k: v.detach().clone() for k, v in module.custom_state_dict().items()}
    model = nn.Sequential(twin)
    handle = sdadapt.load_adapter(model, {f"0.{k}": v for k, v in saved.items()})
    with torch.no_grad():
        ours = model(x)
        assert torch.allclose(ours, theirs, atol=2e-5, rtol=1e-5), (ours - theirs).abs().max()
        handle.merge()  # the merged weight agrees with lycoris' forward too
        assert torch.allclose(model(x), theirs, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- peft


def _peft_model(config):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 1))
    twin = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 1))
    twin.load_state_dict(base.state_dict())
    model = peft.get_peft_model(base, config)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("hada_", "lokr_", "lora_")):
                p.copy_(torch.randn_like(p) * 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    return peft, model, twin


def _run(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(3, 12, generator=g), torch.randn(2, 2, 5, 5, generator=g)
    return model[0](x1), model[2](model[1](x2))


def _peft_state(peft, model, alpha):
    state = peft.get_peft_model_state_dict(model)
    out = {}
    for key, value in state.items():
        out[key.removeprefix("base_model.model.")] = value
    for layer in {k.rsplit(".", 1)[0] for k in out}:
        out[f"{layer}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("effective_conv2d", [False, True])
def test_peft_loha_equals_sdadapt(effective_conv2d):
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(r=2, alpha=3.0, target_modules=["0", "1", "2"], use_effective_conv2d=effective_conv2d)
    peft, model, twin = _peft_model(config)
    with torch.no_grad():
        theirs = _run(model.base_model.model)
    sdadapt.load_adapter(twin, _peft_state(peft, model, 3.0))
    with torch.no_grad():
        ours = _run(twin)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decompose_both, effective_conv2d", [(False, False), (True, True)])
def test_peft_lokr_equals_sdadapt(decompose_both, effective_conv2d):
    peft = pytest.importorskip("peft")
    # r = 1 keeps w2 decomposed on these small layers, where peft and LyCORIS both scale by alpha / r
    config = peft.LoKrConfig(r=1, alpha=2.0, target_modules=["0", "1", "2"], decompose_both=decompose_both,
                             decompose_factor=2, use_effective_conv2d=effective_conv2d)
    peft, model, twin = _peft_model(config)
    with torch.no_grad():
        theirs = _run(model.base_model.model)
    state = _peft_state(peft, model, 2.0)
    assert any(k.endswith("lokr_w2_b") for k in state)
    sdadapt.load_adapter(twin, state)
    with torch.no_grad():
        ours = _run(twin)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_peft_dora_file_equals_reference_formula(tmp_path):
    """peft's lora_magnitude_vector (per output row) read by sdadapt == m·V/‖V‖_row computed here."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "1", "2"], use_dora=True)
    peft, model, twin = _peft_model(config)
    original = {k: v.clone() for k, v in twin.state_dict().items()}
    with torch.no_grad():
        theirs = _run(model.base_model.model)
    model.save_pretrained(tmp_path / "dora")
    components, _ = sdadapt.load_lora(tmp_path / "dora")
    state = components["model"]
    assert {k.rsplit(".", 1)[-1] for k in state if "dora_scale" in k} == {"dora_scale"}
    sdadapt.load_adapter(twin, state)
    with torch.no_grad():
        ours = _run(twin)
    # the reference: W' = m ⊙ V / ‖V‖ per output row, V = W + (alpha/r)·B A
    with torch.no_grad():
        ref_model = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 1)).double()
        ref_model.load_state_dict(original)
        for i in range(3):
            w = ref_model[i].weight
            a = state[f"{i}.lora_down.weight"].double().reshape(2, -1)
            b = state[f"{i}.lora_up.weight"].double().reshape(w.shape[0], 2)
            v = w + (b @ a).reshape(w.shape) * 1.5
            m = state[f"{i}.dora_scale"].double().reshape(-1)
            norm = v.reshape(w.shape[0], -1).norm(dim=1)
            w.copy_(v * (m / norm).reshape(-1, *([1] * (w.dim() - 1))))
        g = torch.Generator().manual_seed(2)
        x1, x2 = torch.randn(3, 12, generator=g).double(), torch.randn(2, 2, 5, 5, generator=g).double()
        reference = (ref_model[0](x1), ref_model[2](ref_model[1](x2)))
    for a, b, c in zip(ours, theirs, reference):
        assert torch.allclose(a.double(), c, atol=1e-5, rtol=1e-5)
        assert torch.allclose(b.double(), c, atol=1e-5, rtol=1e-5)
    # and back to peft: sdadapt's writer gives peft the same adapter
    handle = sdadapt.load_adapter(nn.Sequential(nn.Linear(12, 8), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 1)), state)
    sdadapt.formats.save_peft(tmp_path / "back", handle.state_dict())
    fresh = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 1))
    fresh.load_state_dict(original)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "back")
    with torch.no_grad():
        again = _run(reloaded.base_model.model)
    for a, c in zip(again, reference):
        assert torch.allclose(a.double(), c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_dora_file_equals_reference_formula(wd_on_out, tmp_path):
    """A LyCORIS ``dora_scale`` file in either orientation == m·V/‖V‖ (row or column) computed here."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    module = _lycoris_module("LoConModule", conv, lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=wd_on_out)
    saved = {f"lora_unet_conv_in.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    path = tmp_path / "dora.safetensors"
    sdadapt.formats.write_safetensors(path, saved, {"ss_network_module": "lycoris.kohya"})
    components, _ = sdadapt.load_lora(path)
    state = components["unet"]
    assert tuple(state["conv_in.dora_scale"].shape) == ((6, 1, 1, 1) if wd_on_out else (1, 4, 1, 1))
    model = nn.Module()
    model.conv_in = nn.Conv2d(4, 6, 3, padding=1)
    model.conv_in.load_state_dict({"weight": module.org_weight.detach(), "bias": conv.bias.detach()})
    w0 = model.conv_in.weight.detach().double().clone()
    sdadapt.load_adapter(model, state)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ours = model.conv_in(x).double()
    v = w0 + (state["conv_in.lora_up.weight"].double().reshape(6, 2) @ state["conv_in.lora_down.weight"].double().reshape(2, -1)).reshape(w0.shape) * 0.5
    m = state["conv_in.dora_scale"].double()
    if wd_on_out:
        norm = v.reshape(6, -1).norm(dim=1).reshape(6, 1, 1, 1)
    else:
        norm = v.transpose(0, 1).reshape(4, -1).norm(dim=1).reshape(1, 4, 1, 1)
    reference = F.conv2d(x.double(), m * v / norm, conv.bias.double(), padding=1)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(module(x).double(), reference, atol=1e-5, rtol=1e-5)


def test_lycoris_wrapper_files_lycoris_prefix_load_as_the_unets(tmp_path):
    # LyCORIS' own wrapper (create_lycoris + save_weights; SimpleTuner's files): diffusers paths under "lycoris_"
    import logging

    from tiny_models import run_unet, tiny_unet_sd1, unet_inputs

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    for algo in ("lokr", "loha", "lora"):
        unet = tiny_unet_sd1(seed=2)
        inputs = unet_inputs(unet)
        base = run_unet(unet, inputs)
        network = lycoris.create_lycoris(unet, 1.0, 4, 2.0, algo=algo)
        network.apply_to()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in network.parameters():
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        want = run_unet(unet, inputs)
        path = tmp_path / f"{algo}.safetensors"
        network.save_weights(str(path), torch.float32, {})
        keys = list(sdadapt.formats.read_weights(path)[0])
        assert keys and all(k.startswith("lycoris_") for k in keys)
        components, _ = sdadapt.load_lora(path)
        assert list(components) == ["unet"]
        fresh = tiny_unet_sd1(seed=2)
        sdadapt.load_adapter(fresh, components["unet"])
        got = run_unet(fresh, inputs)
        assert (want - base).abs().max() > 1e-2
        assert (got - want).abs().max() < 1e-5, algo
