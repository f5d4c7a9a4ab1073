"""kohya's --fp8-base, --full-fp16 and --full-bf16 on LyCORIS' OFT / BOFT, GLoRA and norm modules (train_norm).

Each method trains two steps on the toy model with each flag and writes what it trained: the adapters'
tensors in the half dtype (``--full-*``: kohya saves the network as trained), never in fp8 (``--fp8-base``
stores only the frozen base), every zero-initialised factor moved. OFT's Cayley map on fp16/bf16 blocks
runs in float32 (torch has no half-precision inverse on CPU): checked against the float32 formula.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import sdadapt
from sdadapt.adapters import OFTConfig
from sdadapt.adapters.oft import oft_delta_weight

FLAGS = {
    "fp8-base": (["--fp8-base", "--mixed-precision", "bf16"], torch.float32),
    "full-fp16": (["--full-fp16", "--mixed-precision", "fp16"], torch.float16),
    "full-bf16": (["--full-bf16", "--mixed-precision", "bf16"], torch.bfloat16),
}
#: the smallest run that still trains every module two steps: one 8-px image a step (the flags' dtypes,
#: what is saved and the norm bound do not depend on the image size or the batch)
SMALL = ["--resolution", "8", "--batch-size", "1"]
#: method, its extra arguments, the tensor names that start at zero (they must have trained)
METHODS = {
    "diag-oft": ([], ("oft_blocks",)),
    "boft": ([], ("oft_blocks",)),
    "glora": ([], ("a2.weight", "b2.weight")),
    "lora+train_norm": (["--network-args", "train_norm=true"], ("lora_up.weight", "w_norm", "b_norm")),
}


@pytest.mark.parametrize("flag", list(FLAGS))
@pytest.mark.parametrize("method", list(METHODS))
def test_each_flag_trains_and_saves_what_it_trained(method, flag, red_circles, tmp_path):
    from sdadapt.cli import main

    args, dtype = FLAGS[flag]
    extra, zero_init = METHODS[method]
    out = tmp_path / "a.safetensors"
    code = main(["train", method.split("+")[0], "--images", str(red_circles), *args, *extra, "--no-prior", "--steps", "2",
                 *SMALL, "--no-save-state", "-q", "-o", str(out)])
    assert code == 0
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    weights = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert weights and {v.dtype for v in weights.values()} == {dtype}
    for name in zero_init:
        moved = [v for k, v in weights.items() if k.endswith("." + name)]
        assert moved and any(v.abs().max() > 0 for v in moved), name
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert meta["ss_fp8_base" if flag == "fp8-base" else "ss_" + flag.replace("-", "_")] == "True"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("butterfly", [False, True])
def test_half_oft_blocks_rotate_in_float32(dtype, butterfly):
    """fp16/bf16 oft_blocks (--full-fp16/--full-bf16): the module's ΔW is the float32 formula on the same
    (half) values, rounded once at the end; the gradient reaches the half blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear), OFTConfig(dim=4, butterfly=butterfly, constraint=1e-2,
                                                                          rescaled=True))
    adapter = next(iter(handle.modules.values()))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    adapter.to(dtype)
    weight = model[0].weight.detach().to(dtype)
    got = adapter.merge_delta(weight)
    want = oft_delta_weight(weight.float(), adapter.oft_blocks.detach().float(), rescale=adapter.rescale.detach().float(),
                            constraint=float(adapter.alpha)).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want) and want.abs().max() > 1e-2
    got.float().square().sum().backward()
    assert adapter.oft_blocks.grad is not None and adapter.oft_blocks.grad.dtype == dtype
    assert adapter.oft_blocks.grad.abs().max() > 0


@pytest.mark.parametrize("method", ["diag-oft", "boft"])
def test_scale_weight_norms_bounds_every_layers_oft_blocks(method, red_circles, tmp_path):
    """--scale-weight-norms on OFT: LyCORIS' rule, ‖oft_blocks‖_F ≤ the bound after every step (the learning
    rate is large enough that the blocks pass it)."""
    from sdadapt.cli import main

    out = tmp_path / "o.safetensors"
    assert main(["train", method, "--images", str(red_circles), "--scale-weight-norms", "0.01", "--lr", "0.05",
                 "--no-prior", "--steps", "2", *SMALL, "--no-save-state", "-q", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        norms = [float(f.get_tensor(k).norm()) for k in f.keys() if k.endswith(".oft_blocks")]  # noqa: SIM118
        assert f.metadata()["ss_scale_weight_norms"] == "0.01"
    assert norms and max(norms) <= 0.01 * (1 + 1e-5) and max(norms) > 0.005


def test_scale_weight_norms_bounds_the_lora_modules_and_skips_train_norms_as_lycoris(red_circles, tmp_path, capsys):
    """kohya_ss's "sd15 - LoKr v1.1" preset sets train_norm with scale_weight_norms: LyCORIS' norm modules have no max
    norm (apply_max_norm returns (None, None)) and its kohya network skips them, bounding the others. Refused before."""
    from sdadapt.cli import main

    out = tmp_path / "n.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--scale-weight-norms", "0.01", "--network-args",
                 "train_norm=true", "--no-prior", "--steps", "2", "--batch-size", "2", "--learning-rate", "1e-2",
                 "-o", str(out)]) == 0
    assert "not train_norm's norm modules (LyCORIS defines no max norm" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        norms = []
        for up in (k for k in keys if k.endswith(".lora_up.weight")):
            base = up[: -len(".lora_up.weight")]
            w_up, w_down = f.get_tensor(up).double().flatten(1), f.get_tensor(base + ".lora_down.weight").double()
            scale = float(f.get_tensor(base + ".alpha")) / w_down.shape[0]
            norms.append(float((w_up @ w_down.flatten(1)).norm()) * scale)
        assert any(k.endswith(".w_norm") for k in keys)
    assert norms and max(norms) <= 0.01 * (1 + 1e-5) and max(norms) > 0.005
