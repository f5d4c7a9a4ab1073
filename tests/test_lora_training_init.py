"""``init=gaussian`` for a trained LoRA: peft's ``init_lora_weights="gaussian"`` (``nn.init.normal_(lora_A, std=1/r)``,
``lora_B`` zeros), the start diffusers' DreamBooth LoRA scripts train from; kohya's kaiming stays the default."""

from __future__ import annotations

import json

import pytest
import torch

from sdadapt.errors import InputError
from sdadapt.methods.lora import prepare_lora
from sdadapt.toy import build_toy


def _downs_and_ups(adaptation):
    downs = [p for p in adaptation.params if p.dim() >= 2 and p.shape[0] == 4]
    ups = [p for p in adaptation.params if p.dim() >= 2 and p.shape[-1] == 4 and p.shape[0] != 4]
    return downs, ups


def test_gaussian_starts_the_down_factor_at_std_one_over_r_and_the_up_factor_at_zero():
    system = build_toy(seed=0)
    torch.manual_seed(0)
    gaussian = prepare_lora(system, rank=4, init="gaussian")
    downs, ups = _downs_and_ups(gaussian)
    values = torch.cat([d.detach().reshape(-1) for d in downs])
    assert values.numel() > 10_000 and abs(float(values.std()) - 1 / 4) < 0.01 and abs(float(values.mean())) < 0.01
    assert all(not u.detach().any() for u in ups)
    gaussian.remove()
    kaiming = prepare_lora(system, rank=4)  # (kohya's kaiming_uniform(a=√5): std 1/√(3·in), in = 64 here: ~0.07)
    spread = float(torch.cat([d.detach().reshape(-1) for d in _downs_and_ups(kaiming)[0]]).std())
    assert spread < 0.15
    kaiming.remove()
    with pytest.raises(InputError, match="kaiming or gaussian"):
        prepare_lora(system, rank=4, init="pissa")


def test_the_command_line_takes_it_as_a_network_arg_and_records_it(tmp_path):
    from test_cli_train import _images

    from sdadapt.cli import main
    from sdadapt.formats.files import read_safetensors_header

    images = _images(tmp_path / "imgs", n=2, size=32)
    out = tmp_path / "g.safetensors"
    assert main(["train", "lora", "--images", str(images), "--model", "toy", "--steps", "1", "-q",
                 "--network-args", "init=gaussian", "-o", str(out)]) == 0
    _, metadata = read_safetensors_header(out)
    assert json.loads(metadata["ss_network_args"]).get("init") == "gaussian"
