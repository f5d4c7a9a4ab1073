"""EveryDream2's single-file checkpoints: its ``utils/convert_diff_to_ckpt.py`` (5098db8, lines 175-199) maps the
VAE's mid-block attention only from diffusers' pre-0.15 names (``query`` / ``key`` / ``value`` / ``proj_attn``), so a
checkpoint it writes from a newer diffusers keeps ``mid.attn_1.to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` as 2-D
Linear weights under ``first_stage_model.``; these read as LDM's ``q`` / ``k`` / ``v`` / ``proj_out`` (were refused:
"16 unknown source keys")."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import tiny_sd1_file

from sdadapt.formats.files import read_safetensors, write_safetensors
from sdadapt.formats.model_keys import convert_checkpoint

pytest.importorskip("diffusers")

_LDM_TO_DIFFUSERS_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _everydream_form(state: dict) -> dict:
    """What EveryDream2's converter leaves for the VAE's mid-block attention: diffusers' names, (C, C) weights."""
    out = {}
    for key, value in state.items():
        for side in ("encoder", "decoder"):
            for ldm, name in _LDM_TO_DIFFUSERS_NAMES.items():
                for p in ("weight", "bias"):
                    if key == f"first_stage_model.{side}.mid.attn_1.{ldm}.{p}":
                        key = f"first_stage_model.{side}.mid.attn_1.{name}.{p}"
                        value = value.flatten(1) if p == "weight" else value
        out[key] = value
    return out


def test_an_everydream_checkpoint_reads_as_the_checkpoint_it_was_made_from(tmp_path):
    original = tiny_sd1_file(tmp_path / "ldm.safetensors")
    state, metadata = read_safetensors(original)
    everydream = _everydream_form(state)
    assert sum("mid.attn_1.to_" in k for k in everydream) == 16 and everydream.keys() != state.keys()
    write_safetensors(tmp_path / "ed2.safetensors", everydream, metadata)
    from sdadapt.diffusers_system import DiffusersSystem

    ours = DiffusersSystem.from_single_file(tmp_path / "ed2.safetensors")
    want = DiffusersSystem.from_single_file(original)
    for component in ("unet", "vae", "text_encoder"):
        got, expected = getattr(ours, component).state_dict(), getattr(want, component).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), component
    converted, report = convert_checkpoint(everydream, to="diffusers", strict=False)
    assert not report.unmatched and any("EveryDream2" in note for note in report.notes)
    back, _ = convert_checkpoint(converted, to="ldm", strict=False)  # (written back in LDM's own names)
    assert {k for k in back if "mid.attn_1." in k} == {k for k in state if k.startswith("first_stage_model.") and "mid.attn_1." in k}
