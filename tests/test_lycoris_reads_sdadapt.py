"""Files sdadapt trains (GLoRA, LoRA + train_norm, GLoRA + train_norm) loaded by LyCORIS itself.

``train glora`` / ``train lora --network-args train_norm=True`` build an ``AdapterAdaptation`` on a tiny SD1
UNet + CLIP; every adapter parameter gets a random non-zero value, the adaptation saves its LyCORIS file,
and lycoris-lora's kohya loader (``lycoris.kohya.create_network_from_weights`` + ``apply_to`` +
``load_weights``, what kohya's ``--network_weights`` and its merge scripts run) rebuilds the network on a
fresh copy of the same models: every module of the file must be rebuilt (no key dropped), and LyCORIS'
forward of the UNet and the text encoder must equal sdadapt's. float32: tolerance 2e-5 relative to the
change the adapters make.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs
from torch import nn

from sdadapt.methods import prepare_glora
from sdadapt.methods.lora import prepare_lora

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

CASES = [
    pytest.param(prepare_glora, {"targets": "attn-mlp"}, id="glora-attn-mlp"),
    pytest.param(prepare_glora, {"targets": "full", "train_norm": True}, id="glora-full-train_norm"),
    pytest.param(prepare_lora, {"targets": "unet-convblock-only", "train_norm": True}, id="lora-convblock-train_norm"),
    pytest.param(prepare_lora, {"targets": "attn-mlp", "train_norm": True, "alpha": 1.0}, id="lora-attn-mlp-train_norm"),
]


def _te_out(te: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return te(ids).last_hidden_state


def _rel(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    change = (want - base).norm()
    assert change > 1e-3 * base.norm(), "the adapters barely change the output: the test would prove nothing"
    return float((got - want).norm() / change)


@pytest.mark.parametrize("prepare, options", CASES)
def test_lycoris_kohya_loader_rebuilds_sdadapts_file(prepare, options, tmp_path, monkeypatch):
    cls = lycoris_kohya.LycorisNetworkKohya  # its constructor builds the default preset's modules first: 4.1's
    # TimestepEmbedding class repeats time_embedding on SD UNets ("duplicated lora name"; docs/lycoris.md "Presets")
    monkeypatch.setattr(cls, "UNET_TARGET_REPLACE_MODULE",
                        [m for m in cls.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"])
    inputs = unet_inputs(tiny_unet_sd1())
    ids = torch.tensor([[0, 5, 9, 17, 2], [0, 33, 2, 1, 1]])
    base_unet, base_te = run_unet(tiny_unet_sd1(), inputs), _te_out(tiny_clip(), ids)

    unet, te = tiny_unet_sd1(), tiny_clip()
    adaptation = prepare(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"), rank=2, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for handle in adaptation.handles.values():
            for p in handle.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    y_unet, y_te = run_unet(unet, inputs), _te_out(te, ids)
    path = adaptation.save(tmp_path / "ours.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    file_modules = {k.split(".")[0] for k in keys}
    assert any(k.endswith(".w_norm") for k in keys) == bool(options.get("train_norm"))

    fresh_unet, fresh_te = tiny_unet_sd1(), tiny_clip()
    holder = nn.Module()  # transformers 5's CLIPTextModel has no text_model: the ecosystem's names need one
    holder.text_model = fresh_te.text_model if hasattr(fresh_te, "text_model") else fresh_te
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, holder, fresh_unet,
                                                           for_inference=True)
    rebuilt = {m.lora_name for m in [*network.unet_loras, *network.text_encoder_loras]}
    assert rebuilt == file_modules
    network.apply_to(holder, fresh_unet, apply_text_encoder=True, apply_unet=True)
    assert network.load_weights(str(path)) == {}  # no missing or unexpected key
    assert _rel(run_unet(fresh_unet, inputs), y_unet, base_unet) < 2e-5
    if len(adaptation.handles) > 1:  # (unet-convblock-only adapts no text-encoder layer)
        assert _rel(_te_out(fresh_te, ids), y_te, base_te) < 2e-5
    else:
        assert torch.equal(_te_out(fresh_te, ids), base_te)
