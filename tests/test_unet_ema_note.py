"""A diffusers folder with an EMA copy beside its UNet (``unet_ema/``: diffusers' examples, SimpleTuner, EveryDream2)
says that ``unet/`` is what runs and how to make a model of the EMA weights (it was used silently)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("diffusers")
from test_cli_train import _tiny_pipeline

from sdadapt.jobs.models import load_system


def test_a_folder_with_unet_ema_says_which_unet_runs(tmp_path):
    root = _tiny_pipeline(tmp_path / "pipe", prediction_type="epsilon")
    lines: list[str] = []
    load_system(str(root), log=lines.append)
    assert not any("unet_ema" in line for line in lines)
    shutil.copytree(root / "unet", root / "unet_ema")
    load_system(str(root), log=lines.append)
    assert any("its unet/ is used, not the EMA copy in unet_ema/" in line and "--ema" in line for line in lines)
