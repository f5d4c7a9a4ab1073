"""``extract_lora_state``: the LoRA of two models in memory is the LoRA ``extract_lora`` writes for the same two
models saved as files, and it reproduces a low-rank fine-tune's deltas."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdadapt
from sdadapt.errors import InputError
from sdadapt.formats import WeightFileError
from sdadapt.loratools import extract_lora, extract_lora_state
from docs_pages import run_block_with
from tiny_models import tiny_unet_sd1


def _pair(seed: int = 0):
    """A tiny diffusers UNet and a copy whose attention projections moved by a rank-2 delta (float64 exact)."""
    base = tiny_unet_sd1()
    tuned = tiny_unet_sd1()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("attn2.to_k", "attn1.to_q")):
                out_f, in_f = module.weight.shape
                delta = (torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g)) * 0.05
                module.weight += delta
                deltas[name] = delta
    return base, tuned, deltas


def test_in_memory_equals_the_file_job(tmp_path):
    base, tuned, _ = _pair()
    components, report = extract_lora_state(base, tuned, rank=4, device="cpu")
    assert report.path is None and report.base_model == "sd1"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "tuned.safetensors")
    written = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors",
                           rank=4, device="cpu")
    assert written.path == tmp_path / "lora.safetensors" and written.layers.keys() == report.layers.keys()
    loaded, _ = sdadapt.load_lora(tmp_path / "lora.safetensors")
    assert loaded.keys() == components.keys()
    for component, state in components.items():
        assert loaded[component].keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(loaded[component][key], tensor), key
    # the state dicts themselves (not modules) read the same
    again, _ = extract_lora_state(base.state_dict(), tuned.state_dict(), rank=4, device="cpu")
    assert all(torch.equal(again["unet"][k], v) for k, v in components["unet"].items())


def test_a_rank_2_fine_tune_comes_back_exactly():
    base, tuned, deltas = _pair(seed=3)
    components, report = extract_lora_state(base, tuned, rank=2, device="cpu")
    state = components["unet"]
    assert {k.rsplit(".lora_down", 1)[0] for k in state if k.endswith("lora_down.weight")} == set(deltas)
    for name, delta in deltas.items():
        down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        torch.testing.assert_close(scale * up @ down, delta.double(), rtol=0, atol=1e-5)
    assert all(layer.residual_norm <= 1e-4 * max(layer.norm, 1e-12) for layer in report.layers.values())


def test_bad_inputs_name_what_is_wrong():
    base, tuned, _ = _pair()
    with pytest.raises(WeightFileError, match="no layer differs"):
        extract_lora_state(base, base, rank=2, device="cpu")
    with pytest.raises(InputError, match="rank"):
        extract_lora_state(base, tuned, rank=0, device="cpu")
    with pytest.raises(WeightFileError, match="<tuned state dict>.*not a tensor"):
        extract_lora_state(base, {"conv_in.weight": [1, 2]}, rank=2, device="cpu")


def test_the_docs_snippet_runs(tmp_path, monkeypatch):
    base, tuned, _ = _pair()
    monkeypatch.chdir(tmp_path)
    run_block_with("lora-tools.md", "extract_lora_state", {"sdadapt": sdadapt, "base_unet": base, "tuned_unet": tuned})
    loaded, _ = sdadapt.load_lora(tmp_path / "style.safetensors")
    assert set(loaded) == {"unet"} and loaded["unet"]
