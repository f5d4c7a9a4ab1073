"""Five small kohya / diffusers / A1111 compatibility points, each against a transcription of the reference.

* ``--clip-skip`` on SDXL / SD2: kohya sd-scripts @48d368fa ``library/sdxl_train_util.py:351-352``
  (``verify_sdxl_training_args``: "clip_skip will be unexpected", SDXL's text encoding ignores it) and
  ``library/train_util.py:4421-4422`` (``verify_training_args``: v2 with clip_skip warned); ``train_network.py:1028``
  writes ``"ss_clip_skip": args.clip_skip`` (``None`` unless given; made text at line 1223).
* ``--lr_scheduler_args num_cycles=C`` with ``--lr_scheduler cosine``: kohya @48d368fa ``library/train_util.py``
  ``get_scheduler_fix`` (5265; the args read at 5288-5292 with ``ast.literal_eval``; ``cosine`` at 5371-5377 gets
  them as its only extra keywords) -> transformers' ``get_cosine_schedule_with_warmup`` (``num_cycles`` waves,
  default 0.5).
* ``ss_lr_warmup_steps``: kohya @48d368fa ``train_network.py:1018`` writes ``args.lr_warmup_steps`` as given
  (``int_or_float``, ``library/train_util.py:3664-3676``: "20" -> 20, "0.1" -> 0.1).
* A ``vae.``-prefixed LDM VAE: diffusers @58eb52c0 ``src/diffusers/loaders/single_file_utils.py:387``
  (``LDM_VAE_KEYS = ["first_stage_model.", "vae."]``) and ``convert_ldm_vae_checkpoint`` (1481-1493: the last
  prefix present wins, its keys read without it) — and diffusers' own ``AutoencoderKL.from_single_file``.
* A 4-channel ``conv_in`` delta on an inpainting UNet's 9-channel ``conv_in``: A1111
  ``extensions-builtin/Lora/networks.py`` @873edba4 ``network_apply_weights`` (stored copy id 433457214):
  ``if len(self.weight.shape) == 4 and self.weight.shape[1] == 9: updown = F.pad(updown, (0, 0, 0, 0, 0, 5))``;
  the LoRA delta as ``network_lora.py`` / ``lyco_helpers.rebuild_conventional`` / ``network.py`` ``calc_scale``.
"""

from __future__ import annotations

import ast
import csv
import math

import pytest
import torch
from kohya_arguments import int_or_float
from torch import nn

from sdadapt.apply import apply_lora
from sdadapt.jobs import TrainOptions
from sdadapt.jobs.train import _clip_skip_notes, _ss_lr_warmup_steps
from sdadapt.jobs.train_schedule import (
    check_schedule_options,
    lr_scheduler_kwargs,
    schedule_fit_args,
)
from sdadapt.methods import FitConfig

F64 = torch.float64


# ------------------------------------------------------------------------------ 1. --clip-skip on SDXL / SD2
def test_clip_skip_on_sdxl_and_sd2_is_noted_as_kohya_warns():
    sdxl = _clip_skip_notes(TrainOptions(images=".", clip_skip=2), "sdxl")
    assert len(sdxl) == 1 and "does nothing on SDXL" in sdxl[0] and "--clip-skip 2" in sdxl[0]
    sd2 = _clip_skip_notes(TrainOptions(images=".", clip_skip=2), "sd2")
    assert len(sd2) == 1 and "SD2" in sd2[0] and "used" in sd2[0] and "kohya warns" in sd2[0]
    assert _clip_skip_notes(TrainOptions(images=".", clip_skip=2), "sd1") == []  # (kohya: no warning for SD1)
    assert _clip_skip_notes(TrainOptions(images=".", clip_skip=3), None) == []  # (a toy: refused elsewhere)
    assert _clip_skip_notes(TrainOptions(images="."), "sdxl") == []  # not given: nothing to say


# ------------------------------------------------------------------------------ 3. ss_lr_warmup_steps
@pytest.mark.parametrize("given", ["20", "0.1", "0.25", "1", "5%"])
def test_ss_lr_warmup_steps_is_the_value_given_as_kohya_writes_it(given):
    raw = int_or_float(given)
    assert _ss_lr_warmup_steps(float(raw), 7) == str(raw)  # (sdadapt's options hold a float)
    assert _ss_lr_warmup_steps(0, 0) == "0"  # (kohya's default 0)
    assert _ss_lr_warmup_steps(None, 12) == "12"  # none given: sdadapt's own default, the steps it warms up


# ------------------------------------------------------------------------------ 2. cosine num_cycles
def _kohya_cosine64(step: int, *, warmup: int, total: int, num_cycles: float) -> float:
    """transformers 5.24 ``_get_cosine_schedule_with_warmup_lr_lambda`` (min_lr_rate 0), in Python floats."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


@pytest.mark.parametrize("args, warmup, total", [(("num_cycles=1",), 3, 20), (("num_cycles=1.5",), 0.1, 30),
                                                 (("num_cycles=0.75",), 0, 17), (("num_cycles=0.5",), 2, 12),
                                                 (("num_cycles=0",), 4, 10), ((), 3, 20)])
def test_cosine_with_num_cycles_in_the_args_is_the_schedule_kohya_builds(args, warmup, total):
    from transformers.optimization import get_cosine_schedule_with_warmup

    lr = 1e-3
    options = TrainOptions(images=".", learning_rate=lr, lr_scheduler="cosine", lr_warmup_steps=warmup,
                           lr_scheduler_args=args)
    check_schedule_options(options)
    config = FitConfig(steps=total, learning_rate=lr, **schedule_fit_args(options, total=total))
    # kohya's get_scheduler_fix: int(share · steps); its args by ast.literal_eval, passed as they are to cosine
    kwargs = {k: ast.literal_eval(v) for k, v in (a.split("=") for a in args)}
    steps = int(warmup * total) if isinstance(warmup, float) else warmup
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps, num_training_steps=total, **kwargs)
    for step in range(total + 1):
        want = lr * _kohya_cosine64(step, warmup=steps, total=total, num_cycles=kwargs.get("num_cycles", 0.5))
        assert config.lr_at(step, lr) == pytest.approx(want, rel=1e-12, abs=1e-18), step
        assert config.lr_at(step, lr) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-18), step
        optimizer.step()
        scheduler.step()


def test_num_cycles_in_the_args_is_refused_where_kohya_fails():
    # kohya passes num_cycles itself to these (a duplicate keyword): their own option
    for name in ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"):
        with pytest.raises(ValueError, match="--lr-scheduler-num-cycles"):
            lr_scheduler_kwargs(TrainOptions(images=".", lr_scheduler=name, lr_scheduler_args=("num_cycles=2",)))
    # transformers' linear / constant take no num_cycles (a TypeError in kohya)
    for name in ("linear", "constant"):
        with pytest.raises(ValueError, match=f"not an argument of --lr-scheduler {name}"):
            lr_scheduler_kwargs(TrainOptions(images=".", lr_scheduler=name, lr_scheduler_args=("num_cycles=2",)))
    with pytest.raises(ValueError, match="finite number >= 0"):
        lr_scheduler_kwargs(TrainOptions(images=".", lr_scheduler="cosine", lr_scheduler_args=("num_cycles=-1",)))
    assert lr_scheduler_kwargs(TrainOptions(images=".", lr_scheduler="cosine", lr_scheduler_args=("num_cycles=2",))) \
        == {"num_cycles": 2.0}
    # without it (or with --lr-scheduler-type) cosine stays the one half-wave schedule it was
    fit = schedule_fit_args(TrainOptions(images=".", lr_scheduler="cosine"), total=10)
    assert (fit["schedule"], fit["num_cycles"]) == ("cosine", 1)


def test_a_kohya_toml_with_cosine_num_cycles_trains_and_writes_kohyas_metadata(three_shapes, tmp_path):
    """A 4-step toy run of a kohya TOML: the logged LRs are transformers' cosine of 1 wave, and the
    metadata says ``cosine``, the warm-up share as given (``0.25``) and ``ss_clip_skip`` ``None``."""
    from safetensors import safe_open

    from sdadapt.cli import main

    config = tmp_path / "run.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{three_shapes}'\n"
                      f"output_dir = '{tmp_path}'\noutput_name = 'out'\nlearning_rate = 1e-3\nmax_train_steps = 4\n"
                      "resolution = '32,32'\ntrain_batch_size = 1\nseed = 3\nlr_scheduler = 'cosine'\n"
                      "lr_warmup_steps = 0.25\nlr_scheduler_args = ['num_cycles=1']\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--quiet"]) == 0
    with open(tmp_path / "out-log.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    assert rates == pytest.approx([1e-3 * _kohya_cosine64(s, warmup=1, total=4, num_cycles=1) for s in range(4)],
                                  rel=1e-6, abs=1e-12)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as file:
        meta = file.metadata()
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"], meta["ss_clip_skip"]) == ("cosine", "0.25", "None")


# ------------------------------------------------------------------------------ 4. a vae.-prefixed LDM VAE
def test_a_vae_prefixed_ldm_vae_is_read_as_diffusers_reads_it(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from sdadapt.errors import WeightFileError
    from sdadapt.external_vae import load_vae
    from sdadapt.formats.model_keys import diffusers_to_ldm
    from sdadapt.formats.vae_file import read_vae_weights

    config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32),
              "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 8}
    torch.manual_seed(1)
    source = diffusers.AutoencoderKL(**config).eval()
    torch.manual_seed(0)
    model_vae = diffusers.AutoencoderKL(**config).eval()
    ldm = diffusers_to_ldm({f"vae.{k}": v for k, v in source.state_dict().items()})  # first_stage_model.* keys
    state = {"vae." + k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.items()}  # LDM_VAE_KEYS
    save_file(state, tmp_path / "vae.safetensors")
    ours = load_vae(tmp_path / "vae.safetensors", like=model_vae, architecture="sd1")
    want = source.state_dict()
    assert ours.state_dict().keys() == want.keys() and all(torch.equal(ours.state_dict()[k], want[k]) for k in want)
    source.save_pretrained(tmp_path / "config")
    theirs = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "config"),
                                                      local_files_only=True)
    assert all(torch.equal(ours.state_dict()[k], v.float()) for k, v in theirs.state_dict().items())
    # a first_stage_model.* tensor beside the vae.* ones is not read (diffusers: the vae. prefix wins)
    state["first_stage_model.decoder.conv_out.bias"] = torch.full((3,), 7.0)
    save_file(state, tmp_path / "both.safetensors")
    expected = {k: tuple(v.shape) for k, v in model_vae.state_dict().items()}
    read = read_vae_weights(tmp_path / "both.safetensors", expected=expected)
    assert read.dropped == ["first_stage_model.decoder.conv_out.bias"]
    assert all(torch.equal(read.state[k], want[k]) for k in want)
    # ... so one missing from the vae.* part is missing, whatever first_stage_model.* holds
    state["first_stage_model.encoder.conv_in.bias"] = state.pop("vae.encoder.conv_in.bias")
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(WeightFileError, match="short.safetensors"):
        read_vae_weights(tmp_path / "short.safetensors", expected=expected)


# ------------------------------------------------------------------------------ 5. inpainting conv_in
def _a1111_lora_updown64(down: torch.Tensor, up: torch.Tensor, alpha: float, multiplier: float,
                         orig_weight: torch.Tensor) -> torch.Tensor:
    """A1111: network_lora calc_updown (rebuild_conventional: up (out, r) @ down (r, in·k·k), reshaped to
    (out, in, k, k)), finalize_updown (× alpha / dim × multiplier), then networks.py network_apply_weights'
    zero pad of a 9-input-channel conv weight's update."""
    output_shape = [up.size(0), down.size(1), *down.shape[2:]]
    updown = (up.reshape(up.size(0), -1).to(F64) @ down.reshape(down.size(0), -1).to(F64)).reshape(output_shape)
    if orig_weight.size().numel() == updown.size().numel():
        updown = updown.reshape(orig_weight.shape)
    updown = updown * (alpha / down.shape[0]) * multiplier
    if len(orig_weight.shape) == 4 and orig_weight.shape[1] == 9:
        updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
    return updown


def _conv_in_model(name: str = "conv_in", in_channels: int = 9) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.add_module(name, nn.Conv2d(in_channels, 6, 3, padding=1).to(F64))
    return model


def _lora(prefix: str, in_channels: int = 4, **extra) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {f"{prefix}.lora_down.weight": torch.randn(2, in_channels, 3, 3, generator=generator, dtype=F64),
            f"{prefix}.lora_up.weight": torch.randn(6, 2, 1, 1, generator=generator, dtype=F64),
            f"{prefix}.alpha": torch.tensor(1.0, dtype=F64), **extra}


def test_a_4_channel_conv_in_delta_is_zero_padded_on_an_inpainting_conv_in_as_a1111():
    model = _conv_in_model()
    w0 = model.conv_in.weight.detach().clone()
    state = _lora("conv_in")
    applied = apply_lora(model, state, scale=0.7)
    want = w0 + _a1111_lora_updown64(state["conv_in.lora_down.weight"], state["conv_in.lora_up.weight"], 1.0, 0.7, w0)
    torch.testing.assert_close(model.conv_in.weight.detach(), want, rtol=1e-12, atol=1e-15)
    assert torch.equal(model.conv_in.weight.detach()[:, 4:], w0[:, 4:])  # the mask / masked-image channels unchanged
    applied.undo()
    assert torch.equal(model.conv_in.weight.detach(), w0)
    # the LDM name of the same layer
    ldm = nn.Module()
    ldm.add_module("input_blocks", nn.ModuleList([nn.ModuleList([_conv_in_model().conv_in])]))
    apply_lora(ldm, _lora("input_blocks.0.0"), scale=0.7)
    torch.testing.assert_close(ldm.input_blocks[0][0].weight.detach(), want, rtol=1e-12, atol=1e-15)


def test_other_conv_in_mismatches_are_still_refused():
    with pytest.raises(ValueError):  # a 4-channel delta on a 9-channel layer that is not conv_in
        apply_lora(_conv_in_model("conv_other"), _lora("conv_other"))
    with pytest.raises(ValueError):  # a 5-channel delta on the inpainting conv_in
        apply_lora(_conv_in_model(), _lora("conv_in", in_channels=5))
    with pytest.raises(ValueError):  # a 4-channel delta on an 8-channel conv_in
        apply_lora(_conv_in_model(in_channels=8), _lora("conv_in"))
    with pytest.raises(ValueError, match="DoRA"):  # DoRA reads the base weight: no padding for it
        apply_lora(_conv_in_model(), _lora("conv_in", **{"conv_in.dora_scale": torch.ones(6, 1, 1, 1, dtype=F64)}))
    # a plain 4-channel conv_in is as before
    model = _conv_in_model(in_channels=4)
    w0 = model.conv_in.weight.detach().clone()
    state = _lora("conv_in")
    apply_lora(model, state, scale=1.0)
    want = w0 + _a1111_lora_updown64(state["conv_in.lora_down.weight"], state["conv_in.lora_up.weight"], 1.0, 1.0, w0)
    torch.testing.assert_close(model.conv_in.weight.detach(), want, rtol=1e-12, atol=1e-15)
