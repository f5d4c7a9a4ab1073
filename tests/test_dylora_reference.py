"""DyLoRA against kohya's networks/dylora.py and networks/extract_lora_from_dylora.py.

Reference: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  networks/dylora.py:28-173 (DyLoRAModule: init, forward, state_dict, _load_from_state_dict),
  networks/dylora.py:176-216 (create_network: unit, conv_dim == network_dim),
  networks/extract_lora_from_dylora.py:37-71 (split_lora_model).
The transcriptions below follow those lines in float64, with the random draw passed in.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sdadapt.adapters.base import geometry_of
from sdadapt.adapters.dylora import DyLoRAConfig, DyLoRAModule, dylora_forward, dylora_trainable_rank
from sdadapt.errors import InputError
from sdadapt.loratools.dylora import dylora_cut, dylora_cut_state


# ------------------------------------------------------------------ transcription of kohya's DyLoRAModule
class KohyaDyLoRA(nn.Module):
    """networks/dylora.py:28-173, with ``random.randint`` replaced by the ``draw`` attribute."""

    def __init__(self, lora_name, org_module, lora_dim, alpha, unit):
        super().__init__()
        self.lora_name, self.lora_dim, self.unit = lora_name, lora_dim, unit
        assert self.lora_dim % self.unit == 0
        if org_module.__class__.__name__ == "Conv2d":
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
        alpha = self.lora_dim if alpha is None or alpha == 0 else alpha
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha))
        self.is_conv2d = org_module.__class__.__name__ == "Conv2d"
        self.is_conv2d_3x3 = self.is_conv2d and org_module.kernel_size == (3, 3)
        if self.is_conv2d and self.is_conv2d_3x3:
            kernel_size = org_module.kernel_size
            self.stride, self.padding = org_module.stride, org_module.padding
            self.lora_A = nn.ParameterList([org_module.weight.new_zeros((1, in_dim, *kernel_size)) for _ in range(lora_dim)])
            self.lora_B = nn.ParameterList([org_module.weight.new_zeros((out_dim, 1, 1, 1)) for _ in range(lora_dim)])
        else:
            self.lora_A = nn.ParameterList([org_module.weight.new_zeros((1, in_dim)) for _ in range(lora_dim)])
            self.lora_B = nn.ParameterList([org_module.weight.new_zeros((out_dim, 1)) for _ in range(lora_dim)])
        for lora in self.lora_A:
            torch.nn.init.kaiming_uniform_(lora, a=math.sqrt(5))
        for lora in self.lora_B:
            torch.nn.init.zeros_(lora)
        self.org_forward = org_module.forward
        self.draw = 0

    def forward(self, x):
        result = self.org_forward(x)
        trainable_rank = self.draw  # (kohya: random.randint(0, self.lora_dim - 1))
        trainable_rank = trainable_rank - trainable_rank % self.unit
        for i in range(0, trainable_rank):
            self.lora_A[i].requires_grad = False
            self.lora_B[i].requires_grad = False
        for i in range(trainable_rank, trainable_rank + self.unit):
            self.lora_A[i].requires_grad = True
            self.lora_B[i].requires_grad = True
        for i in range(trainable_rank + self.unit, self.lora_dim):
            self.lora_A[i].requires_grad = False
            self.lora_B[i].requires_grad = False
        lora_A = torch.cat(tuple(self.lora_A), dim=0)
        lora_B = torch.cat(tuple(self.lora_B), dim=1)
        if self.is_conv2d_3x3:
            ab = torch.nn.functional.conv2d(x, lora_A, stride=self.stride, padding=self.padding)
            ab = torch.nn.functional.conv2d(ab, lora_B)
        else:
            ab = x
            if self.is_conv2d:
                ab = ab.reshape(ab.size(0), ab.size(1), -1).transpose(1, 2)
            ab = torch.nn.functional.linear(ab, lora_A)
            ab = torch.nn.functional.linear(ab, lora_B)
            if self.is_conv2d:
                ab = ab.transpose(1, 2).reshape(ab.size(0), -1, *x.size()[2:])
        return result + ab * self.scale * math.sqrt(self.lora_dim / (trainable_rank + self.unit))

    def kohya_state_dict(self):
        """networks/dylora.py:123-149 (the keys it writes)."""
        lora_A_weight = torch.cat(tuple(self.lora_A), dim=0)
        if self.is_conv2d and not self.is_conv2d_3x3:
            lora_A_weight = lora_A_weight.unsqueeze(-1).unsqueeze(-1)
        lora_B_weight = torch.cat(tuple(self.lora_B), dim=1)
        if self.is_conv2d and not self.is_conv2d_3x3:
            lora_B_weight = lora_B_weight.unsqueeze(-1).unsqueeze(-1)
        return {f"{self.lora_name}.lora_down.weight": lora_A_weight.detach(),
                f"{self.lora_name}.lora_up.weight": lora_B_weight.detach(),
                f"{self.lora_name}.alpha": self.alpha}


def kohya_split(lora_sd, rank):
    """networks/extract_lora_from_dylora.py:51-66, one rank of the loop."""
    new_sd = {}
    for key, value in lora_sd.items():
        if "lora_down" in key:
            new_sd[key] = value[:rank].contiguous()
        elif "lora_up" in key:
            new_sd[key] = value[:, :rank].contiguous()
        else:
            new_sd[key] = value
    return new_sd


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
    "conv3x3": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 5, 5)),
}


def _pair(kind, rank=6, alpha=3.0, unit=2):  # (alpha / R exact in the float32 scale buffer)
    torch.manual_seed(0)
    layer = LAYERS[kind][0]().double()
    kohya = KohyaDyLoRA("lora_x", layer, rank, alpha, unit).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in kohya.lora_B:
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64))
    ours = DyLoRAModule(geometry_of(layer), rank, alpha, unit=unit, dtype=torch.float64)
    ours.load_file_tensors({k.split(".", 1)[1]: v for k, v in kohya.kohya_state_dict().items()})
    x = torch.randn(LAYERS[kind][1], generator=g, dtype=torch.float64)
    return layer, kohya, ours, x


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("draw", [0, 3, 5])
def test_forward_and_grads_match_kohya(kind, draw):
    layer, kohya, ours, x = _pair(kind)
    kohya.draw = draw
    want = kohya(x)
    ours.draw_trainable_rank = lambda: dylora_trainable_rank(draw, 2)  # the same draw
    got = layer(x) + ours(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (want * torch.linspace(-1, 1, want.numel(), dtype=want.dtype).reshape(want.shape)).sum().backward()
    (got * torch.linspace(-1, 1, got.numel(), dtype=got.dtype).reshape(got.shape)).sum().backward()
    start = draw - draw % 2
    for i in range(6):
        for k_rows, o_rows in ((kohya.lora_A, ours.lora_down), (kohya.lora_B, ours.lora_up)):
            if start <= i < start + 2:
                torch.testing.assert_close(o_rows[i].grad.reshape(k_rows[i].grad.shape), k_rows[i].grad,
                                           rtol=1e-12, atol=1e-12)
            else:  # kohya's frozen rows: no gradient at all (optimisers skip them)
                assert k_rows[i].grad is None and o_rows[i].grad is None


def test_optimizer_step_touches_only_the_slice_as_kohya():
    layer, kohya, ours, x = _pair("linear")
    kohya.draw, start = 2, 2
    ours.draw_trainable_rank = lambda: start
    opt_k = torch.optim.AdamW(kohya.parameters(), lr=0.1, weight_decay=0.5)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=0.1, weight_decay=0.5)
    for module, opt, out in ((kohya, opt_k, kohya(x)), (ours, opt_o, layer(x) + ours(x))):
        out.square().sum().backward()
        opt.step()
    torch.testing.assert_close(ours.file_tensors()["lora_down.weight"],
                               kohya.kohya_state_dict()["lora_x.lora_down.weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.file_tensors()["lora_up.weight"],
                               kohya.kohya_state_dict()["lora_x.lora_up.weight"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_file_tensors_are_kohyas_state_dict_and_eval_is_the_file(kind):
    layer, kohya, ours, x = _pair(kind)
    want = {k.split(".", 1)[1]: v for k, v in kohya.kohya_state_dict().items()}
    got = ours.file_tensors()
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=0)
    ours.eval()  # the saved file's LoRA: the full rank at factor sqrt(R/R) = 1
    kohya.draw = 6 - 2
    torch.testing.assert_close(layer(x) + ours(x), kohya(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer._conv_forward(x, layer.weight + ours.delta_weight(), layer.bias)
                               if isinstance(layer, nn.Conv2d) else layer(x) + x @ ours.delta_weight().T,
                               layer(x) + ours(x), rtol=1e-12, atol=1e-12)


def test_draws_cover_the_multiples_of_unit_from_the_torch_stream():
    module = DyLoRAModule(geometry_of(nn.Linear(3, 3)), 8, unit=4)
    py_state = random.getstate()
    torch.manual_seed(1)
    draws = [module.draw_trainable_rank() for _ in range(64)]
    assert set(draws) == {0, 4}
    assert random.getstate() == py_state  # (not Python's global random, which kohya uses)
    torch.manual_seed(1)
    assert [module.draw_trainable_rank() for _ in range(64)] == draws
    module = DyLoRAModule(geometry_of(nn.Linear(3, 3)), 3, unit=1)
    assert {module.draw_trainable_rank() for _ in range(200)} == {0, 1, 2}


def test_gradient_checkpointing_recomputes_the_same_slice():
    from torch.utils.checkpoint import checkpoint

    layer = nn.Linear(4, 4).double()
    module = DyLoRAModule(geometry_of(layer), 8, 2.0, unit=1, dtype=torch.float64)
    with torch.no_grad():
        for col in module.lora_up:
            col.normal_()
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for use_checkpoint in (False, True):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = checkpoint(module, x, use_reentrant=False) if use_checkpoint else module(x)
        out.square().sum().backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in module.parameters()])
    assert sum(g is not None for g in grads[0]) == 2
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_pure_forward_factor_and_detached_rows():
    geometry = geometry_of(nn.Linear(2, 2))
    downs = [torch.ones(1, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    ups = [torch.ones(2, 1, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    x = torch.ones(1, 2, dtype=torch.float64)
    out = dylora_forward(x, ups, downs, 0.5, geometry, trainable_rank=0, unit=2)
    torch.testing.assert_close(out, torch.full((1, 2), 4 * 2 * 0.5 * math.sqrt(4 / 2), dtype=torch.float64))
    out.sum().backward()
    assert [d.grad is not None for d in downs] == [True, True, False, False]


def test_config_refuses_rank_not_multiple_of_unit():
    with pytest.raises(ValueError, match="multiple of unit"):
        DyLoRAConfig(rank=6, unit=4)
    with pytest.raises(ValueError, match="multiple of unit"):
        DyLoRAModule(geometry_of(nn.Linear(3, 3)), 6, unit=4)


# ------------------------------------------------------------------ cutting (extract_lora_from_dylora.py)
def test_cut_matches_kohya_split(tmp_path):
    from sdadapt.formats.files import write_safetensors

    g = torch.Generator().manual_seed(2)
    state = {"lora_unet_a.lora_down.weight": torch.randn(8, 5, generator=g),
             "lora_unet_a.lora_up.weight": torch.randn(4, 8, generator=g),
             "lora_unet_a.alpha": torch.tensor(3.0),
             "lora_unet_c.lora_down.weight": torch.randn(8, 5, 3, 3, generator=g),
             "lora_unet_c.lora_up.weight": torch.randn(4, 8, 1, 1, generator=g),
             "lora_unet_c.alpha": torch.tensor(8.0)}
    for rank in (2, 5, 8):
        want, got = kohya_split(state, rank), dylora_cut_state(state, rank)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    src = write_safetensors(tmp_path / "dy.safetensors", state, {"ss_network_module": "networks.dylora",
                                                                  "ss_network_args": json.dumps({"unit": "2"}),
                                                                  "ss_training_comment": "hi", "ss_network_dim": "8"})
    out = dylora_cut(src, tmp_path / "dy4.safetensors", rank=4)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("lora_unet_a.lora_up.weight"), state["lora_unet_a.lora_up.weight"][:, :4])
        assert torch.equal(f.get_tensor("lora_unet_c.alpha"), torch.tensor(8.0))  # alpha kept (kohya)
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"] == "split from DyLoRA, rank 8 to 4; hi"
    with pytest.raises(InputError, match="multiple of the DyLoRA unit 2"):
        dylora_cut(src, tmp_path / "dy3.safetensors", rank=3)
    with pytest.raises(InputError, match="from 1 to the file's 8"):
        dylora_cut_state(state, 9)
    from sdadapt.cli import main

    assert main(["cut-dylora", str(src), "--rank", "6", "--dtype", "fp16", "-q", "-o", str(tmp_path / "c.safetensors")]) == 0
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        got = f.get_tensor("lora_unet_c.lora_down.weight")
    assert got.dtype == torch.float16 and torch.equal(got, state["lora_unet_c.lora_down.weight"][:6].half())


# ------------------------------------------------------------------ training from a kohya TOML
def test_kohya_toml_trains_dylora(red_circles, tmp_path, capsys):
    from sdadapt.cli import main

    config = tmp_path / "train.toml"
    config.write_text('network_module = "networks.dylora"\nnetwork_dim = 4\nnetwork_alpha = 2\n'
                      'network_args = ["unit=2"]\n')
    out = tmp_path / "dy.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "--no-prior", "-q", "-o", str(out)]) != 0
    assert "train dylora" in capsys.readouterr().err  # never a plain LoRA in silence
    assert main(["train", "dylora", "--images", str(red_circles), "--config", str(config), "--steps", "2",
                 "--batch-size", "2", "--no-prior", "-q", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        downs = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_down.weight")}
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
    assert meta["ss_network_module"] == "networks.dylora" and json.loads(meta["ss_network_args"])["unit"] == "2"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert downs and all(v.shape[0] == 4 for v in downs.values())
    assert any(v.abs().sum() > 0 for v in ups.values())  # it trained
    from sdadapt.formats.detect import detect_kind

    assert detect_kind(list(downs) + list(ups), meta) == "kohya-lora"  # every LoRA reader's file
    config.write_text('network_module = "networks.dylora"\nnetwork_dim = 6\nnetwork_args = ["unit=4"]\n')
    assert main(["train", "dylora", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "--no-prior", "-q", "-o", str(tmp_path / "bad.safetensors")]) != 0
    assert "--network-dim 6 is not a multiple of unit 4" in capsys.readouterr().err


def test_init_is_kohyas_row_by_row():
    for kind in LAYERS:
        layer = LAYERS[kind][0]()
        torch.manual_seed(3)
        kohya = KohyaDyLoRA("x", layer, 4, 1.0, 2)
        torch.manual_seed(3)
        ours = DyLoRAModule(geometry_of(layer), 4, 1.0, unit=2)
        want = {k.split(".", 1)[1]: v for k, v in kohya.kohya_state_dict().items()}
        for key, value in ours.file_tensors().items():
            assert torch.equal(value.detach(), want[key].to(value.dtype)), (kind, key)


def test_prepare_refuses_what_kohya_asserts_or_ignores():
    from sdadapt.methods import METHODS
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    with pytest.raises(InputError, match="conv_dim 4 must equal network_dim 8"):
        METHODS["dylora"].adapt(system, rank=8, conv_rank=4)
    with pytest.raises(InputError, match="conv_alpha 1 differs from the network alpha 8"):
        METHODS["dylora"].adapt(system, rank=8, conv_rank=8, conv_alpha=1.0)
    with pytest.raises(ValueError, match="dylora has no option dropout"):
        METHODS["dylora"].adapt(system, rank=8, dropout=0.1)
    adaptation = METHODS["dylora"].adapt(system, rank=4, alpha=2.0, unit=2, conv_rank=4, loraplus_lr_ratio=4.0)
    try:
        modules = [m for h in adaptation.handles.values() for m in h.modules.values()]
        assert all(isinstance(m, DyLoRAModule) and m.unit == 2 and float(m.alpha) == 2.0 for m in modules)
        assert any(m.geometry.is_kxk for m in modules)  # conv_dim adds the 3x3 convolutions
        assert len(adaptation.params) == sum(2 * m.rank for m in modules) == len(adaptation.lr_scales)
        assert sorted(set(adaptation.lr_scales)) == [1.0, 4.0]  # LoRA+: the lora_up columns
        assert adaptation.network_args["unit"] == "2"
    finally:
        adaptation.remove()
