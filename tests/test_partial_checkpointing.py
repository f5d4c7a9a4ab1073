"""Checkpointing part of a UNet (``enable_checkpointing(..., fraction=)``,
``FitConfig.gradient_checkpointing_fraction``, ``train --gradient-checkpointing-fraction``): the
blocks keeping the most activations are chosen, the trained weights are the same bits as without
checkpointing, and the activations kept for backward lie between none and all checkpointed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import load_toy
from sdadapt.training.grad_checkpointing import (
    UNET_BLOCKS,
    blocks_by_activation_memory,
    enable_checkpointing,
)
from sdadapt.training.step import StepConfig

# the toy UNet: level 0 = down_blocks.0 and up_blocks.1, level 1 = down_blocks.1, mid_block, up_blocks.0
TOY_ORDER = [
    "down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
    "down_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
    "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
    "down_blocks.1.resnets.0", "mid_block.resnets.0", "mid_block.resnets.1", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
]


def test_toy_unet_blocks_rank_by_resolution_then_transformers_first():
    assert blocks_by_activation_memory(load_toy().unet) == TOY_ORDER


def test_diffusers_sd_unet_ranks_its_highest_resolution_blocks_first():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_unet_sd1

    unet = tiny_unet_sd1()  # 2 levels; diffusers registers up_blocks before mid_block
    ranked = blocks_by_activation_memory(unet)
    assert ranked[:5] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "up_blocks.1.attentions.0",
                          "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    assert ranked[-2:] == ["mid_block.resnets.0", "mid_block.resnets.1"]  # deepest level, resnets last
    assert sorted(ranked) == sorted(n for n, _ in _outermost(unet))


def _outermost(model):
    from sdadapt.targets import select

    return [(n, m) for n, m in select(model, UNET_BLOCKS)]


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)


class SpatialTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(2, 2)


class Downsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.op = nn.Conv2d(2, 2, 3, stride=2)


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)


class LDMShapedUNet(nn.Module):
    """Module names and sampler classes of an LDM (A1111 checkpoint) UNet with 2 levels, 1 res per level."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(2, 2, 3)),  # conv_in: not a block
            nn.Sequential(ResBlock(), SpatialTransformer()),
            nn.Sequential(Downsample()),
            nn.Sequential(ResBlock(), SpatialTransformer()),
        ])
        self.middle_block = nn.Sequential(ResBlock(), SpatialTransformer(), ResBlock())
        self.output_blocks = nn.ModuleList([
            nn.Sequential(ResBlock(), SpatialTransformer()),
            nn.Sequential(ResBlock(), SpatialTransformer(), Upsample()),
            nn.Sequential(ResBlock(), SpatialTransformer()),
            nn.Sequential(ResBlock(), SpatialTransformer()),
        ])


def test_ldm_names_rank_by_the_samplers_before_each_block():
    ranked = blocks_by_activation_memory(LDMShapedUNet())
    # UNET_BLOCKS also picks the LDM sampler entries (input_blocks.2.0, output_blocks.1.2): each counts at
    # the level of its input
    level0 = ["input_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1",
              "input_blocks.1.0", "input_blocks.2.0", "output_blocks.2.0", "output_blocks.3.0"]
    level1 = ["input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
              "input_blocks.3.0", "middle_block.0", "middle_block.2", "output_blocks.0.0", "output_blocks.1.0",
              "output_blocks.1.2"]
    assert ranked == level0 + level1


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_enable_checkpointing_fraction_picks_the_top_of_the_ranking_and_undoes_itself(fraction):
    unet = load_toy().unet
    classes = {name: type(m) for name, m in unet.named_modules()}
    handle = enable_checkpointing(unet, UNET_BLOCKS, fraction=fraction)
    want = TOY_ORDER[: math.ceil(fraction * len(TOY_ORDER))]
    assert sorted(handle.names) == sorted(want)
    assert {n for n, m in unet.named_modules() if type(m).__name__.startswith("Checkpointed")} == set(want)
    handle.remove()
    assert {name: type(m) for name, m in unet.named_modules()} == classes


def test_fraction_is_validated():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        enable_checkpointing(load_toy().unet, UNET_BLOCKS, fraction=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        FitConfig(gradient_checkpointing=True, gradient_checkpointing_fraction=1.5)
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        FitConfig(gradient_checkpointing_fraction=0.5)


def _saved_bytes(unet, fraction: float | None) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward of the toy UNet
    (the activation memory checkpointing trades for recompute), with ``fraction`` of the blocks
    checkpointed (``None``: none)."""
    handle = enable_checkpointing(unet, UNET_BLOCKS, fraction=fraction) if fraction else None
    unet.train()
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g) if hasattr(unet, "config") else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(x, t, context).sample if context is not None else unet(x, t)
        out.float().square().mean().backward()
    finally:
        if handle is not None:
            handle.remove()
        unet.eval()
    return sum(seen.values())


def test_kept_activations_lie_between_none_and_all_checkpointed():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_unet_sd1

    unet = tiny_unet_sd1()
    none, half, full = (_saved_bytes(unet, f) for f in (None, 0.5, 1.0))
    assert full < half < none
    # the half keeping the most activations saves more than half of what checkpointing everything saves
    assert none - half > 0.5 * (none - full)


def test_fit_with_a_fraction_trains_the_same_weights_checkpointing_the_chosen_blocks(monkeypatch):
    system = load_toy()
    g = torch.Generator().manual_seed(0)
    images, captions = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, ["a red cross", "a blue circle", "a green square"]

    def train(**options):
        adaptation = METHODS["full"].prepare(system)
        try:
            fit(system, adaptation, images, captions,
                config=FitConfig(steps=2, batch_size=2, learning_rate=1e-3, warmup_steps=0, optimizer="adamw8bit",
                                 step=StepConfig(max_grad_norm=None), **options))
            return {k: v.detach().clone() for k, v in adaptation.parts["unet"].state_dict().items()}
        finally:
            adaptation.remove()

    plain = train()
    names = {id(m): n for n, m in system.unet.named_modules()}
    called = []
    original = torch.utils.checkpoint.checkpoint

    def recording(function, *args, **kwargs):
        called.append(names[id(function.__self__)])
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording)
    lean = train(gradient_checkpointing=True, gradient_checkpointing_fraction=0.4)
    assert lean.keys() == plain.keys()
    for key in plain:
        assert torch.equal(lean[key], plain[key]), key
    assert any(not torch.equal(plain[k], v) for k, v in system.unet.state_dict().items())  # it trained
    assert sorted(set(called)) == sorted(TOY_ORDER[:6]) and len(called) == 2 * 6  # ceil(0.4 · 15) blocks, 2 steps


def test_train_flag_and_toml_key(tmp_path):
    from train_inputs import read_train_toml

    from sdadapt.cli import build_parser

    options, _, notes = read_train_toml(tmp_path / "train.toml", "[training_arguments]\ngradient_checkpointing_fraction = 0.5\n")
    assert options == {"gradient_checkpointing_fraction": 0.5} and not notes
    args = build_parser().parse_args(["train", "full", "--gradient-checkpointing-fraction", "0.25"])
    assert args.gradient_checkpointing_fraction == 0.25


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.5])
def test_train_options_refuse_a_fraction_outside_0_1_naming_the_flag(tmp_path, fraction):
    """Refused where the other flags are (before images are read or a model loaded), by its flag name."""
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match=r"--gradient-checkpointing-fraction must be in \(0, 1\]"):
        TrainOptions(images=str(tmp_path), gradient_checkpointing_fraction=fraction)
    assert TrainOptions(images=str(tmp_path), gradient_checkpointing_fraction=1.0).gradient_checkpointing_fraction == 1.0


def test_train_cli_checkpoints_the_chosen_share_of_the_blocks(tmp_path, monkeypatch, capsys):
    """``train full --gradient-checkpointing-fraction 0.5`` (no --gradient-checkpointing) turns
    checkpointing on for ceil(n/2) blocks of the pipeline's UNet."""
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.targets import select

    root = _tiny_pipeline(tmp_path / "sd")
    n = len(select(DiffusersSystem.from_folder(root).unet, UNET_BLOCKS))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    code = main(["train", "full", "--images", str(_images(tmp_path / "imgs")), "--model", str(root), "--steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--no-save-state", "--gradient-checkpointing-fraction", "0.5",
                 "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert len(calls) == 2 * math.ceil(n / 2) and n > 1
    assert (tmp_path / "out").exists()  # the run wrote its model
