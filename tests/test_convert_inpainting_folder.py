"""A converted inpainting checkpoint's diffusers folder opens as an inpainting pipeline in diffusers: its
``model_index.json`` names ``StableDiffusionInpaintPipeline`` for a 9-channel UNet (it named the text-to-image
pipeline, which fails on the first step: 9 channels against 4) and carries ``_diffusers_version``, without which
``StableDiffusionInpaintPipeline.from_pretrained`` stops on a KeyError."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from tiny_checkpoints import tiny_sd1_parts, write_single_file

from sdadapt.cli import main


@pytest.mark.parametrize("channels,pipeline", [(9, "StableDiffusionInpaintPipeline"), (4, "StableDiffusionPipeline")])
def test_a_converted_folder_opens_as_its_pipeline(tmp_path, channels, pipeline):
    parts = tiny_sd1_parts()
    config = dict(parts["unet"].config)
    config["in_channels"] = channels
    torch.manual_seed(0)
    parts["unet"] = diffusers.UNet2DConditionModel.from_config(config).eval()
    source = write_single_file(parts, tmp_path / "model.safetensors", architecture="sd1")
    folder = tmp_path / "folder"
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(folder), "-q"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["_diffusers_version"] == diffusers.__version__
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(loaded).__name__ == pipeline and loaded.unet.config.in_channels == channels
    if channels == 9:
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True)
        with torch.no_grad():  # (latents, mask and masked image in: 9 channels)
            assert pipe.unet(torch.randn(1, 9, 8, 8), 10, torch.zeros(1, 77, 64)).sample.shape == (1, 4, 8, 8)
