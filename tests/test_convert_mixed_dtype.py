"""``convert FOLDER --to ldm --dtype keep`` on components whose weights mix dtypes (fp16 weights,
fp32 norms), saved by the real diffusers / transformers ``save_pretrained`` (sharded too): every
tensor keeps its own dtype and bytes."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file
from test_cli_train import _tiny_pipeline

from sdadapt.cli import main


def _mixed(module: torch.nn.Module) -> torch.nn.Module:
    """fp16 everywhere except the norms (fp32), as mixed-precision fine-tunes save them."""
    module.half()
    for sub in module.modules():
        if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            sub.float()
    return module


def _folder_state(folder) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_mixed_dtype_folder_round_trips_byte_identical(tmp_path, capsys):
    folder = _tiny_pipeline(tmp_path / "pipe", prediction_type="epsilon")
    import shutil

    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                      ("text_encoder", transformers.CLIPTextModel)):
        model = cls.from_pretrained(folder / name)
        shutil.rmtree(folder / name)
        _mixed(model).save_pretrained(folder / name, max_shard_size="40KB" if name == "unet" else "10GB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1  # sharded
    before = {name: _folder_state(folder / name) for name in ("unet", "vae", "text_encoder")}
    for state in before.values():
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16, torch.float32}

    assert main(["convert", str(folder), "--to", "ldm", "-o", str(tmp_path / "m.safetensors"), "--dtype", "keep",
                 "-q"]) == 0
    ldm = load_file(tmp_path / "m.safetensors")
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."):
        kinds = {v.dtype for k, v in ldm.items() if k.startswith(prefix) and v.is_floating_point()}
        assert kinds == {torch.float16, torch.float32}, (prefix, kinds)
    assert main(["convert", str(tmp_path / "m.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "back"),
                 "--dtype", "keep", "-q"]) == 0
    from sdadapt.formats.clip_keys import add_text_model

    for name, state in before.items():
        if name == "text_encoder":  # (written under the hub's text_model. names, whatever transformers saved here)
            state = {add_text_model(key, ""): value for key, value in state.items()}
        after = _folder_state(tmp_path / "back" / name)
        assert len(set(state) - set(after)) <= 1, set(state) - set(after)  # (transformers' position_ids at most)
        for key, tensor in state.items():
            if key not in after:
                continue
            assert after[key].dtype == tensor.dtype, (name, key)
            assert torch.equal(after[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), (name, key)
    capsys.readouterr()
