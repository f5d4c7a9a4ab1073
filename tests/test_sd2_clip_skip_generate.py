"""``generate`` on SD2 leaves Clip skip unapplied, as A1111 (``sd_hijack_open_clip.py`` never reads the setting, yet
writes "Clip skip: 2" into the infotext) and ComfyUI (its SD2 states are OpenCLIP's penultimate layer already);
SD1 applies it. ``train --clip-skip`` keeps kohya's use on SD2 (tests/test_text_conditioning_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from test_cli_train import _tiny_pipeline

from sdadapt.images import read_image
from sdadapt.jobs.generate import run_generate


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    root = _tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipe")
    if request.param == "sd2":  # OpenCLIP-H as converted for SD2: gelu
        config_file = root / "text_encoder" / "config.json"
        config = json.loads(config_file.read_text())
        config["hidden_act"] = "gelu"
        config_file.write_text(json.dumps(config))
    return request.param, root


def test_clip_skip_changes_sd1_images_and_not_sd2_ones(model, tmp_path):
    kind, root = model
    pixels, lines = {}, []
    for skip in (1, 2):
        result = run_generate(prompt="a red circle", out=tmp_path / f"skip{skip}.png", model=str(root), steps=2,
                              width=16, height=16, seed=3, clip_skip=skip, device="cpu", log=lines.append)
        (file,) = result["files"]
        pixels[skip] = read_image(file)
        if skip == 2:
            assert "Clip skip: 2" in (tmp_path / "skip2.png").read_bytes().decode("latin-1")  # written as A1111 does
    noted = [line for line in lines if "--clip-skip 2: not applied on SD2" in line]
    if kind == "sd2":
        assert torch.equal(pixels[1], pixels[2]) and len(noted) == 1
    else:
        assert not torch.equal(pixels[1], pixels[2]) and not noted
