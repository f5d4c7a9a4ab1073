"""Folds: one injection path for OFT's conv_dim, one place deciding kohya's resize method, one
``alpha / r`` rule for the low-rank families' scale. Each test compares the folded code with the
behaviour it replaced (written out here) or catches a caller that decides on its own again."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs
from torch import nn

import sdadapt
from sdadapt.adapters import GLoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig, OFTConfig
from sdadapt.adapters.base import AdapterModule, geometry_of
from sdadapt.errors import InputError
from sdadapt.images import scale_image, write_png
from sdadapt.inject import LayerFitError
from sdadapt.methods.lycoris_presets import lycoris_preset
from sdadapt.methods.oft import prepare_boft, prepare_diag_oft
from sdadapt.targets import select


# ------------------------------------------------------------------ 1. OFT through the one inject path
def _old_walk(system, *, butterfly: bool, rank: int, conv_rank: int, text_encoder: bool) -> dict[str, sdadapt.AdapterHandle]:
    """What methods/oft.py did before the fold: its own walk over the preset's layers choosing a
    conv config per kxk convolution, passed to inject as layer_configs."""
    config = OFTConfig(dim=rank, butterfly=butterfly)
    conv = OFTConfig(dim=conv_rank, butterfly=butterfly)
    preset = lycoris_preset("full").on(system)
    handles = {}
    for component, model, targets in preset.parts(system, unet=True, text_encoder=text_encoder):
        layer_configs = {layer: conv for layer, module in select(model, targets) if geometry_of(module, name=layer).is_kxk}
        handles[component] = sdadapt.inject(model, targets, config, layer_configs=layer_configs or None)
    return handles


def _system():
    torch.manual_seed(0)
    return SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip(), base_model="sd1")


@pytest.mark.parametrize("butterfly", [False, True], ids=["diag-oft", "boft"])
def test_oft_conv_dim_through_inject_is_the_old_second_walk(butterfly):
    """prepare_diag_oft / prepare_boft with conv_rank != rank inject the same layers with the same
    tensors (keys, shapes; kxk convolutions at conv_rank) as the old per-layer walk, and with the same
    block values both UNets compute the same outputs bit for bit."""
    prepare = prepare_boft if butterfly else prepare_diag_oft
    new_system, old_system = _system(), _system()
    text_encoder = not butterfly  # (the tiny CLIP's 37-wide fc1 has no butterfly split)
    adaptation = prepare(new_system, rank=4, conv_rank=2, text_encoder=text_encoder)
    old = _old_walk(old_system, butterfly=butterfly, rank=4, conv_rank=2, text_encoder=text_encoder)
    assert set(adaptation.handles) == set(old) == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    for component, handle in adaptation.handles.items():
        ours, theirs = handle.state_dict(), old[component].state_dict()
        assert list(ours) == list(theirs)
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    kxk = [n for n, a in adaptation.handles["unet"].modules.items() if a.geometry.is_kxk]
    assert kxk and all(adaptation.handles["unet"].modules[n].rank == 2 for n in kxk)  # conv_rank, not rank
    assert any(a.rank == 4 for a in adaptation.handles["unet"].modules.values())
    torch.manual_seed(3)
    for component, handle in adaptation.handles.items():
        state = {k: v + 0.05 * torch.randn_like(v) if k.endswith("oft_blocks") else v
                 for k, v in handle.state_dict().items()}
        handle.load_state_dict(state)
        old[component].load_state_dict(state)
    inputs = unet_inputs(new_system.unet)
    assert torch.equal(run_unet(new_system.unet, inputs), run_unet(old_system.unet, inputs))


def test_oft_config_conv_dim_and_a_layer_that_does_not_fit():
    """OFTConfig.conv_dim sizes kxk convolutions only; a layout that does not fit one layer is a
    LayerFitError naming it (the train method: an InputError naming network_dim), nothing injected."""
    model = nn.Sequential(nn.Linear(3, 16), nn.Conv2d(3, 16, 3), nn.Conv2d(3, 16, 1))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), OFTConfig(dim=4, conv_dim=2))
    assert {n: a.oft_blocks.shape[-1] for n, a in handle.modules.items()} == {"0": 4, "1": 2, "2": 4}  # 1x1: dim
    handle.remove()
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), OFTConfig(dim=4))
    assert {n: a.oft_blocks.shape[-1] for n, a in handle.modules.items()} == {"0": 4, "1": 4, "2": 4}
    handle.remove()
    with pytest.raises(ValueError, match="conv_dim must be a positive int"):
        OFTConfig(conv_dim=0)
    odd = nn.Sequential(nn.Linear(3, 8), nn.Linear(3, 37))
    with pytest.raises(LayerFitError, match=r"^1: BOFT cannot split a layer of 37"):
        sdadapt.inject(odd, sdadapt.by_type(nn.Linear), OFTConfig(dim=2, butterfly=True))
    assert not any(n.endswith("sdadapt") for n, _ in odd.named_modules())
    system = _system()
    with pytest.raises(InputError, match=r"^conv_in: BOFT cannot split.*network_dim / --network-dim"):
        prepare_boft(system, rank=1)
    assert not any(n.endswith("sdadapt") for n, _ in system.unet.named_modules())


def test_layer_fit_error_keeps_sdadapt_errors_as_they_are(monkeypatch):
    """inject wraps a family's plain ValueError as LayerFitError (a ValueError: exit code 2 as before),
    but an sdadapt error raised while building (its own class and exit code) passes through unchanged."""
    from sdadapt.adapters.oft import OFTModule
    from sdadapt.errors import WeightFileError, exit_code_for

    model = nn.Sequential(nn.Linear(3, 8))
    with pytest.raises(LayerFitError) as info:
        sdadapt.inject(nn.Sequential(nn.Linear(3, 37)), sdadapt.by_type(nn.Linear), OFTConfig(dim=2, butterfly=True))
    assert exit_code_for(info.value) == 2 and isinstance(info.value.__cause__, ValueError)

    def refuse(*args, **kwargs):
        raise WeightFileError("x.safetensors: unreadable")

    monkeypatch.setattr(OFTModule, "from_config", classmethod(refuse))
    with pytest.raises(WeightFileError) as info:
        sdadapt.inject(model, sdadapt.by_type(nn.Linear), OFTConfig(dim=4))
    assert type(info.value) is WeightFileError and exit_code_for(info.value) == 3
    assert not any(n.endswith("sdadapt") for n, _ in model.named_modules())


# ------------------------------------------------------------------ 2. one place decides the resize method
def test_every_training_caller_takes_the_method_from_interpolation_for(tmp_path, monkeypatch):
    """Bucket images (data._scaled), loss masks and face crops ask resampling.interpolation_for: a
    changed default there reaches all three (each compared with scale_image at that method); a given
    method is kept."""
    from sdadapt import resampling
    from sdadapt.resampling import interpolation_for, kohya_default
    from sdadapt.training.data import ImageRecord, _scaled
    from sdadapt.training.face_crop import face_crop
    from sdadapt.training.loss_masks import mask_like_image

    assert interpolation_for(None, (10, 10), (5, 5)) == kohya_default((10, 10), (5, 5)) == "area"
    assert interpolation_for(None, (10, 10), (5, 20)) == "lanczos"
    assert interpolation_for("cubic", (10, 10), (5, 5)) == "cubic"
    asked = []
    monkeypatch.setattr(resampling, "kohya_default", lambda size, target: asked.append((size, target)) or "nearest")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 12, 16, generator=g) * 2 - 1
    path = write_png(tmp_path / "a.png", image)
    record = ImageRecord(path=path, caption="", size=(12, 16), bucket=(8, 8), resized=(9, 12), crop=(0, 2))
    from sdadapt.images import read_image

    decoded = read_image(path)
    assert torch.equal(_scaled(record), scale_image(decoded, (9, 12), interpolation="nearest"))
    mask = torch.rand(1, 12, 16, generator=g)
    want = scale_image(mask, (9, 12), interpolation="nearest", bounds=(0.0, 1.0))[:, 0:8, 2:10]
    want = nn.functional.interpolate(want[None], size=(4, 4), mode="area")[0]
    assert torch.equal(mask_like_image(mask, record, size=(4, 4)), want)
    crop = face_crop(image, (8, 8), (8, 6, 4, 4), (4.0, 4.0), random_crop=False, rng=random.Random(0))
    assert len(asked) == 3 and asked[-1] == ((12, 16), (8, 11))  # (face_crop_window: scaled to 8x11, cut at (0, 1))
    assert torch.equal(crop, scale_image(image, (8, 11), interpolation="nearest")[:, 0:8, 1:9])
    explicit = face_crop(image, (8, 8), (8, 6, 4, 4), (4.0, 4.0), random_crop=False, rng=random.Random(0),
                         interpolation="bilinear")
    assert len(asked) == 3  # a given method is not asked for
    assert torch.equal(explicit, scale_image(image, (8, 11), interpolation="bilinear")[:, 0:8, 1:9])


# ------------------------------------------------------------------ 3. one alpha / r rule
@pytest.mark.parametrize("config, kernel", [
    (LoRAConfig(rank=3, alpha=5.0), ()),
    (LoRAConfig(rank=4, alpha=2.0, rank_stabilized=True), ()),
    (LoRAConfig(rank=2, alpha=3.0, conv_rank=3, conv_alpha=1.0, use_tucker=True), (3, 3)),
    (LoHaConfig(rank=3, alpha=1.5), (3, 3)),
    (LoKrConfig(rank=2, alpha=3.0, factor=2), ()),
    (LoKrConfig(rank=2, alpha=3.0, factor=2, decompose_both=True), (3, 3)),
    (GLoRAConfig(rank=2, alpha=7.0), ()),
], ids=["lora", "rslora", "locon-tucker", "loha-conv", "lokr", "lokr-both", "glora"])
def test_low_rank_scale_is_the_files_alpha_over_rank(config, kernel):
    """The scale each low-rank family applies is float(alpha) / r of the tensors it saves (what every
    reader of its file computes), times the strength; a family without the flag scales by 1."""
    layer = nn.Conv2d(8, 12, kernel) if kernel else nn.Linear(8, 12)
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), config)
    adapter = handle.modules["0"]
    assert adapter.scale_is_alpha_over_rank
    want = float(adapter.file_tensors()["alpha"]) / adapter.rank
    assert adapter.base_scale() == want and float(adapter.scale) == pytest.approx(want, rel=1e-7)
    handle.set_scale(0.3)
    assert float(adapter.scale) == pytest.approx(0.3 * want, rel=1e-6)


def test_lokr_with_two_full_factors_scales_by_one_and_others_by_one():
    layer = nn.Linear(8, 12)
    handle = sdadapt.inject(nn.Sequential(layer), sdadapt.by_type(nn.Linear), LoKrConfig(rank=10_000, alpha=3.0, factor=2))
    adapter = handle.modules["0"]
    assert adapter.layout.rank is None and adapter.base_scale() == 1.0
    handle.remove()
    handle = sdadapt.inject(nn.Sequential(layer), sdadapt.by_type(nn.Linear), OFTConfig(dim=4, constraint=0.5))
    adapter = handle.modules["0"]
    assert not adapter.scale_is_alpha_over_rank and adapter.base_scale() == 1.0  # OFT's alpha is a constraint
    assert not AdapterModule.scale_is_alpha_over_rank


# ------------------------------------------------------------------ 5. old LyCORIS oft_diag through merge-lora
def test_merge_lora_bakes_an_old_oft_diag_file_as_apply_lora(tmp_path):
    """merge-lora of a kohya-named ``oft_diag`` file (the key layout A1111 reads; LyCORIS dev builds of
    Nov 2023 - Feb 2024) into an LDM checkpoint gives apply_lora's weights (tests/test_oft.py checks
    apply_lora against A1111's math), through the one delta path."""
    from safetensors.torch import save_file
    from test_loratools_families import (
        _applied,
        _flat,
        _read_back,
        _rel_error,
        _write_checkpoint,
    )

    from sdadapt.loratools.bake import merge_loras_into_checkpoint

    unet = tiny_unet_sd1()
    base = _flat(unet)
    ckpt = _write_checkpoint(tmp_path / "base.safetensors", base, naming="ldm", arch="sd1")
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"):
        out = unet.get_submodule(layer).weight.shape[0]
        b = 4
        tensors[f"lora_unet_{layer.replace('.', '_')}.oft_diag"] = (
            torch.eye(b).repeat(out // b, 1, 1) + 0.2 * torch.randn(out // b, b, b, generator=g))
    lora = tmp_path / "old-oft.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "baked.safetensors"
    report = merge_loras_into_checkpoint(ckpt, [lora], out, strengths=0.7)
    assert report.merged and not report.unmatched
    got, want = _read_back(out, naming="ldm", arch="sd1"), _applied(base, [(lora, 0.7)])
    assert _rel_error(got, want, base) < 1e-5
    changed = [k for k in base if not torch.equal(want[k], base[k])]
    assert sorted(changed) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                               "unet.down_blocks.0.resnets.0.conv1.weight"]


def test_lycoris_page_oft_conv_dim_example_runs(capsys):
    """docs/lycoris.md's OFT ``py`` block (conv_dim, LayerFitError) runs and prints what its comments say."""
    from docs_pages import code_blocks

    blocks = [b for b in code_blocks("lycoris.md", language="py") if "conv_dim=2" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/lycoris.md", "exec"), {})  # noqa: S102 - the docs example
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "{'0': (4, 4, 4), '1': (8, 2, 2)}"
    assert lines[1].startswith("0: BOFT cannot split a layer of 37 output channels with dim=2")


# ------------------------------------------------------------------ 6. convert's read-back compares bytes first
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("size", [1, 3, 6, 13])
def test_convert_read_back_byte_comparison_keeps_what_it_reports(dtype, size):
    """``_max_delta``'s fast path (the same bytes, read as wide integers) changes nothing it reports: the
    last element differing (odd sizes: no int64 view), a view at a storage offset, NaN at the same place
    (0), a NaN that appears (NaN), ±0 (0), an integer that differs (inf)."""
    from pathlib import Path

    from sdadapt.jobs.convert_model import _max_delta, _same_bytes

    def delta(a, b):
        return _max_delta({"t": a}, {"t": b}, name="unet", path=Path("x"))

    g = torch.Generator().manual_seed(size)
    base = (torch.rand(size + 1, generator=g) * 8).to(dtype)
    a = base[1:]  # (a storage offset of one element)
    assert a.storage_offset() == 1 and _same_bytes(a, a.clone()) and delta(a, a.clone()) == 0.0
    b = a.clone()
    if dtype == torch.bool:
        b[-1] = ~b[-1]
    else:
        b[-1] = b[-1] + 1
    assert not _same_bytes(a, b)
    want = float("inf") if not dtype.is_floating_point else float((b[-1].double() - a[-1].double()).abs())
    assert delta(a, b) == want and want > 0
    if dtype.is_floating_point:
        nan = a.clone()
        nan[-1] = float("nan")
        assert delta(nan, nan.clone()) == 0.0  # (the same NaN in both)
        assert math.isnan(delta(a, nan)) and math.isnan(delta(nan, a))
        zero, negative = torch.zeros(size, dtype=dtype), -torch.zeros(size, dtype=dtype)
        assert not _same_bytes(zero, negative) and delta(zero, negative) == 0.0


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_peft_text_encoder_lora_converts_with_the_files_text_model_names(tmp_path, to):
    """A peft LoRA on a transformers-5 CLIPTextModel names its layers ``encoder.layers.…`` (no ``text_model.``);
    kohya/diffusers files spell ``text_model.encoder.…``: convert writes that spelling and its read-back
    check compares like with like (before: 'the layers read back differ'), and the file applies as peft does."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from sdadapt.formats import load_lora
    from sdadapt.loratools.convert import convert_lora

    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_clip(), peft.LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False))
    folder = tmp_path / "peft"
    model.save_pretrained(str(folder))
    ids = torch.tensor([[0, 5, 7, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    out = tmp_path / "out.safetensors"
    report = convert_lora(folder, out, to=to, base_model="sd1" if to == "kohya" else None, component="text_encoder")
    assert report.max_delta == 0.0
    prefix = "lora_te_text_model_encoder_layers_" if to == "kohya" else "text_encoder.text_model.encoder.layers."
    assert all(k.startswith(prefix) for k in load_file(str(out)))
    plain = tiny_clip()
    sdadapt.apply_lora(plain, load_lora(out)[0]["text_encoder"])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_sd_bias_free_rule_is_for_the_unet_only():
    """resolve_sd_bias_free drops the ``scales_bias`` flag of SD UNet attention q/k/v only (both layouts'
    names, both attention blocks); the same names in another component, and biased UNet layers, keep it."""
    from sdadapt.formats.peft_ia3 import resolve_sd_bias_free

    one = torch.tensor(1)
    layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_v",  # (LDM naming)
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
              "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
              "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qk"]
    state = {f"{layer}.scales_bias": one for layer in layers}
    kept = resolve_sd_bias_free(state, component="unet")
    assert sorted(kept) == sorted(f"{layer}.scales_bias" for layer in layers[2:])
    assert resolve_sd_bias_free(state, component="text_encoder") == state
