"""LyCORIS' ``rank_dropout`` for LoHa and LoKr (kohya_ss's shipped "SDXL - LoKR v1.0" preset sets 0.1): while
training, each output row of ΔW is dropped with probability p, one draw per forward for the whole batch, no rescaling
(lycoris/modules/lokr.py and loha.py ``get_weight``). Against lycoris-lora's own modules, driven from the same RNG
state, and end to end through ``train lokr`` (refused before: "lokr has no rank_dropout")."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sdadapt.adapters import geometry_of
from sdadapt.adapters.loha import LoHaModule
from sdadapt.adapters.lokr import LoKrModule
from sdadapt.cli import main

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

LAYERS = {"linear": (lambda: nn.Linear(8, 6), (3, 8)), "conv3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5))}
FAMILIES = {"lokr": ("lycoris.modules.lokr", "LokrModule", LoKrModule),
            "loha": ("lycoris.modules.loha", "LohaModule", LoHaModule)}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rank_dropout_drops_the_rows_lycoris_drops(family, kind):
    module_name, class_name, ours_type = FAMILIES[family]
    lycoris = pytest.importorskip(module_name, reason="lycoris-lora is not installed")
    make, x_shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    theirs = getattr(lycoris, class_name)("lora_x", layer, lora_dim=2, alpha=1.0, rank_dropout=0.5).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    tensors = {k: v.detach().clone() for k, v in theirs.state_dict().items() if not k.startswith("org")}
    ours = ours_type.from_file_tensors(geometry_of(layer), tensors).double()
    ours.rank_dropout = 0.5
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    theirs.train()
    ours.train()
    dropped = 0
    for seed in range(6):  # (several draws: some rows dropped, some kept)
        torch.manual_seed(seed)
        want = theirs(x) - layer(x)
        torch.manual_seed(seed)
        got = ours(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.manual_seed(seed)
        dropped += int((torch.rand(6) <= 0.5).sum())
    assert 0 < dropped < 36
    ours.eval()  # (no dropout outside training: the whole ΔW)
    torch.testing.assert_close(ours(x), nn.functional.linear(x, ours.delta_weight()) if kind == "linear"
                               else nn.functional.conv2d(x, ours.delta_weight(), padding=1))


def test_train_lokr_takes_rank_dropout_as_the_kohya_ss_preset_writes_it(red_circles, tmp_path):
    out = tmp_path / "lokr.safetensors"
    assert main(["train", "lokr", "--images", str(red_circles), "--steps", "2", "--batch-size", "2", "--no-prior",
                 "--network-args", "rank_dropout=0.1", "rank_dropout_scale=False", "-o", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        assert "rank_dropout" in f.metadata()["ss_network_args"]
