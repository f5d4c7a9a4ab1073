"""extract-lora reports the error of the file it writes, and keeps full accuracy by default.

The fine-tune adds a known rank-3 change to every LoRA target of a tiny SD1 UNet, extracted at
rank 8, so the exact answer is "no error". The file is read back two independent ways —
diffusers' own LoRA loader (loaded and fused into a fresh base UNet) and a naive float64
``(alpha / r) · up ⋅ down`` from the raw safetensors tensors — and the printed "largest relative
error" must be the error those give: tiny without a clamp, and the clamp's real cost (large) with
``--clamp-quantile 0.99``; fp16/bf16 files include the cast.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import tiny_unet_sd1  # noqa: E402

from sdadapt.cli import main  # noqa: E402
from sdadapt.loratools.checkpoint_layers import is_lora_target  # noqa: E402
from sdadapt.loratools.extract import extract_layer, factors_from_svd, lowrank_error  # noqa: E402
from sdadapt.loratools.resize import factored_svd  # noqa: E402

TRUE_RANK, RANK = 3, 8
_PRINTED = re.compile(r"largest relative error ‖Δ − LoRA‖/‖Δ‖ = (\S+) \(unet:(\S+)\)")


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """Base and tuned tiny SD1 UNets (diffusers UNet files); the tuned one differs by rank 3."""
    folder = tmp_path_factory.mktemp("extract_report")
    base = {k: v.contiguous() for k, v in tiny_unet_sd1().state_dict().items()}
    tuned = dict(base)
    g = torch.Generator().manual_seed(7)
    targets = []
    for key, value in base.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and value.dim() in (2, 4) and is_lora_target("unet", layer, tuple(value.shape), conv=False):
            out_f, in_f = value.shape[0], value[0].numel()
            delta = torch.randn(out_f, TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, in_f, generator=g)
            tuned[key] = value + (delta * (0.3 / math.sqrt(TRUE_RANK * in_f))).reshape(value.shape)
            targets.append(layer)
    assert len(targets) > 50 and min(min(base[t + ".weight"].shape[:2]) for t in targets) >= RANK
    paths = {"base": folder / "base.safetensors", "tuned": folder / "tuned.safetensors"}
    save_file(base, paths["base"])
    save_file(tuned, paths["tuned"])
    return {"paths": paths, "base": base, "tuned": tuned, "targets": targets}


def _extract(capsys, unets, out, *options) -> tuple[float, str]:
    code = main(["extract-lora", str(unets["paths"]["base"]), str(unets["paths"]["tuned"]), "--rank", str(RANK),
                 "-o", str(out), "--quiet", *options])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    match = _PRINTED.search(stdout)
    assert match, stdout
    return float(match.group(1)), match.group(2)


def _delta(unets, layer) -> torch.Tensor:
    key = layer + ".weight"
    return (unets["tuned"][key].double() - unets["base"][key].double()).reshape(unets["base"][key].shape[0], -1)


def _naive_file_errors(unets, path) -> dict[str, float]:
    """‖Δ − (alpha/r)·up⋅down‖/‖Δ‖ per layer, straight from the file's kohya tensors, in float64."""
    raw = load_file(str(path))
    errors = {}
    for layer in unets["targets"]:
        name = "lora_unet_" + layer.replace(".", "_")
        down, up = raw[name + ".lora_down.weight"].double(), raw[name + ".lora_up.weight"].double()
        r = down.shape[0]
        product = float(raw[name + ".alpha"]) / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))
        want = _delta(unets, layer)
        errors[layer] = float(torch.linalg.norm(want - product) / torch.linalg.norm(want))
    return errors


def _diffusers_fused_errors(unets, path) -> dict[str, float]:
    """The same errors through diffusers: load the file into a fresh base UNet, fuse, compare weights."""
    unet = tiny_unet_sd1()
    unet.load_state_dict(unets["base"])
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="extracted")
    unet.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    errors = {}
    for key, base in unets["base"].items():
        layer = key[: -len(".weight")]
        if layer in unets["targets"]:
            want = _delta(unets, layer)
            got = (fused[key].double() - base.double()).reshape(want.shape)
            errors[layer] = float(torch.linalg.norm(want - got) / torch.linalg.norm(want))
        else:
            assert torch.equal(fused[key], base), key  # a layer the LoRA does not touch stays bit-identical
    assert set(errors) == set(unets["targets"])
    return errors


def test_default_extract_is_exact_through_diffusers_and_says_so(unets, tmp_path, capsys):
    out = tmp_path / "exact.safetensors"
    printed, _ = _extract(capsys, unets, out)
    fused = _diffusers_fused_errors(unets, out)
    assert max(fused.values()) < 1e-3  # the tuned UNet, through diffusers' loader and fuse
    assert max(_naive_file_errors(unets, out).values()) < 1e-5
    assert printed < 1e-5  # and the report says so (float32 round-off)


def test_clamp_is_opt_in_and_its_cost_is_what_is_printed(unets, tmp_path, capsys):
    out = tmp_path / "kohya.safetensors"
    printed, worst_layer = _extract(capsys, unets, out, "--clamp-quantile", "0.99")
    naive = _naive_file_errors(unets, out)
    fused = _diffusers_fused_errors(unets, out)
    assert max(naive.values()) > 1e-2  # kohya's clamp really costs accuracy on this fine-tune
    assert printed == pytest.approx(max(naive.values()), rel=5e-3)  # printed with 3 significant digits
    assert printed == pytest.approx(max(fused.values()), rel=5e-3)
    assert worst_layer == max(naive, key=naive.get)


@pytest.mark.parametrize("dtype, floor", [("fp16", 1e-5), ("bf16", 1e-4)])
def test_half_precision_files_report_the_cast(unets, tmp_path, capsys, dtype, floor):
    out = tmp_path / f"{dtype}.safetensors"
    printed, worst_layer = _extract(capsys, unets, out, "--dtype", dtype)
    assert all(v.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
               for k, v in load_file(str(out)).items() if not k.endswith(".alpha"))
    naive = _naive_file_errors(unets, out)
    assert max(naive.values()) > floor  # the cast is visible (float32 alone gives ~1e-7)
    assert printed == pytest.approx(max(naive.values()), rel=5e-3)
    assert worst_layer == max(naive, key=naive.get)


# ------------------------------------------------------------------------ the library's measure
@settings(max_examples=25, deadline=None)
@given(
    st.integers(3, 12), st.integers(3, 12), st.sampled_from([(), (3, 3)]), st.integers(1, 5),
    st.sampled_from([None, 0.8, 0.99]), st.sampled_from([None, torch.float16, torch.bfloat16]),
    st.sampled_from(["up", "sqrt"]), st.sampled_from([None, 2.5]), st.integers(0, 2**16),
)
def test_extract_layer_residual_is_the_error_of_the_returned_factors(out_f, in_f, kernel, rank, clamp, dtype, split,
                                                                   alpha, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, *kernel, generator=g)
    tuned = base + torch.randn(base.shape, generator=g) ** 3  # heavy tails: the clamp bites
    layer = extract_layer(base, tuned, rank=rank, alpha=alpha, clamp_quantile=clamp, split=split, dtype=dtype)
    assert layer.up.dtype == (dtype or torch.float32) and layer.down.dtype == (dtype or torch.float32)
    r = layer.rank
    product = (layer.alpha / r) * (layer.up.double().reshape(out_f, r) @ layer.down.double().reshape(r, -1))
    diff = (tuned.double() - base.double()).reshape(out_f, -1)
    naive = float(torch.linalg.norm(diff - product))  # naive float64 reference
    assert layer.residual_norm == pytest.approx(naive, rel=1e-4, abs=1e-5 * float(torch.linalg.norm(diff)))
    s = torch.linalg.svdvals(diff)
    bound = float(torch.sqrt((s[r:] ** 2).sum()))  # Eckart–Young: no rank-r LoRA does better
    assert layer.residual_norm >= bound - 1e-5 * float(torch.linalg.norm(diff))


def test_factored_residual_includes_clamp_and_cast():
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(40, 6, generator=g) ** 3, torch.randn(6, 30, generator=g)
    u, s, vh = factored_svd(up, down)
    dense = (up @ down).double()
    for clamp, dtype in ((None, None), (0.9, None), (None, torch.bfloat16), (0.9, torch.float16)):
        new_up, new_down, alpha, residual = factors_from_svd(u, s, vh, rank=4, clamp_quantile=clamp, dtype=dtype)
        naive = float(torch.linalg.norm(dense - (alpha / 4) * (new_up.double() @ new_down.double())))
        assert residual == pytest.approx(naive, rel=1e-4), (clamp, dtype)
    assert lowrank_error((up, down), up, down) == pytest.approx(0.0, abs=1e-9)
    assert lowrank_error(dense, up, down, scale=0.5) == pytest.approx(0.5 * float(torch.linalg.norm(dense)), rel=1e-6)


def test_resize_reports_the_error_of_the_factors_it_writes_in_fp16():
    """resize-lora of an fp16 LoRA: the reported error includes the cast to fp16 (the file's error)."""
    from sdadapt.loratools.resize import resize_lora_state
    from sdadapt.adapters.lora import lora_delta_weight

    g = torch.Generator().manual_seed(0)
    up = (torch.randn(16, 8, generator=g)).half()
    down = (torch.randn(8, 12, generator=g)).half()
    state = {"a.lora_up.weight": up, "a.lora_down.weight": down, "a.alpha": torch.tensor(8.0)}
    out, report = resize_lora_state(state, rank=8)  # full rank: the only error is the fp16 cast
    assert out["a.lora_up.weight"].dtype == torch.float16
    want = lora_delta_weight(up.double(), down.double(), 1.0)
    r = out["a.lora_down.weight"].shape[0]
    got = lora_delta_weight(out["a.lora_up.weight"].double(), out["a.lora_down.weight"].double(),
                            float(out["a.alpha"]) / r)
    file_error = float((want - got).norm())
    assert file_error > 1e-6, "the cast must cost something, or this test proves nothing"
    assert abs(report["a"].residual_norm - file_error) <= 1e-6 * max(1.0, file_error) + 1e-9


def test_report_worst_layer_is_the_largest_relative_error():
    from pathlib import Path

    from sdadapt.loratools.output import LayerReport, LoRAJobReport

    report = LoRAJobReport(Path("x.safetensors"), "sd1")
    assert report.worst_layer() is None
    report.layers = {"unet:a": LayerReport(4, 4.0, residual_norm=1.0, norm=10.0),
                     "unet:b": LayerReport(4, 4.0, residual_norm=3.0, norm=1000.0),
                     "unet:c": LayerReport(4, 4.0, residual_norm=0.5, norm=2.0)}
    assert report.worst_layer() == ("unet:c", 0.25)
