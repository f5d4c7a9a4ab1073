"""Review of what a re-written LoRA file keeps of its source's metadata (sdadapt.formats.kohya.kohya_metadata's
``source``, metadata_base_model, carried_metadata): the rules the first tests left open.

kohya sd-scripts (sd-scripts@48d368fa) library/sdxl_model_util / model_util ``get_model_version_str_for_sd1_sd2``
writes ``ss_base_model_version`` ``sd_v1`` / ``sd_v2`` / ``sd_v2_v`` / ``sdxl_base_v1-0``; older files carry only
``ss_v2``. LyCORIS (lycoris/kohya.py ``create_network``) reads ``algo`` from ``ss_network_args`` (default ``lora``;
``locon`` its old name), and only its lora/locon/dylora algos write kohya's lora_down / lora_up / alpha layout."""

from __future__ import annotations

import json

import torch

from sdadapt.formats.kohya import (
    STALE_METADATA,
    carried_metadata,
    kohya_metadata,
    metadata_base_model,
)

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _lora(rank=4):
    g = torch.Generator().manual_seed(0)
    return {"unet": {f"{ATTN}.lora_down.weight": torch.randn(rank, 16, generator=g),
                     f"{ATTN}.lora_up.weight": torch.randn(16, rank, generator=g), f"{ATTN}.alpha": torch.tensor(2.0)}}


def test_the_base_model_kohya_metadata_names():
    assert metadata_base_model({"ss_base_model_version": "sd_v2_v"}) == "sd2-v"
    assert metadata_base_model({"ss_base_model_version": "sd_v2"}) == "sd2"
    assert metadata_base_model({"ss_v2": "True"}) == "sd2"  # (an older file: ss_v2 alone)
    assert metadata_base_model({"ss_v2": "False"}) is None and metadata_base_model({}) is None
    assert metadata_base_model({"ss_base_model_version": "sdxl_base_v0-9"}) == "sdxl"
    assert metadata_base_model({"ss_base_model_version": "sd_v1"}) == "sd1"


def test_an_sd2_v_files_base_keys_survive_a_copy_for_sd2_v_and_not_for_sd2():
    source = {"ss_base_model_version": "sd_v2_v", "ss_v2": "True", "modelspec.resolution": "640x640",
              "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v"}
    same = kohya_metadata(_lora(), base_model="sd2-v", source=source)
    assert same["modelspec.resolution"] == "640x640"  # (kept: the file is for the model its keys name)
    other = kohya_metadata(_lora(), base_model="sd2", source=source)
    assert other["ss_base_model_version"] == "sd_v2" and other["modelspec.resolution"] == "512x512"
    assert other["modelspec.prediction_type"] == "epsilon"  # (the source's "v" dropped; kohya's for a non-v model)
    assert same["modelspec.prediction_type"] == "v"
    old = kohya_metadata(_lora(), base_model="sd1", source={"ss_v2": "True", "modelspec.resolution": "768x768"})
    assert old["ss_v2"] == "False" and old["modelspec.resolution"] == "512x512"
    # kohya's sai_model_spec writes the prediction type for every SD model: "v" with v_parameterization
    assert kohya_metadata(_lora(), base_model="sdxl", extra={"ss_v_parameterization": "True"})[
        "modelspec.prediction_type"] == "v"
    assert kohya_metadata(_lora(), base_model="sdxl")["modelspec.prediction_type"] == "epsilon"


def test_a_lycoris_source_keeps_its_network_keys_only_for_a_lora_layout_algo():
    args = {"algo": "locon", "preset": "attn-only", "dropout": "0.1"}
    locon = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
             "ss_network_args": json.dumps(args)}
    kept = kohya_metadata(_lora(), source=locon)
    assert kept["ss_network_module"] == "lycoris.kohya" and json.loads(kept["ss_network_args"]) == args
    loha = {**locon, "ss_network_args": json.dumps({**args, "algo": "loha"})}  # (tensors that are not LoHa's)
    fresh = kohya_metadata(_lora(), source=loha)
    assert fresh["ss_network_module"] == "networks.lora" and "algo" not in json.loads(fresh["ss_network_args"])
    broken = {**locon, "ss_network_args": "[1, 2]"}  # (not an object: read as no args, algo lora)
    assert kohya_metadata(_lora(), source=broken)["ss_network_args"] == "[1, 2]"


def test_carried_metadata_drops_every_stale_key():
    source = {key: "x" for key in STALE_METADATA} | {"ss_seed": "1", "modelspec.title": "t"}
    assert carried_metadata(source) == {"ss_seed": "1", "modelspec.title": "t"}
    assert carried_metadata(None) == {}


def test_a_lycoris_file_keeps_its_args_only_when_they_name_its_algo():
    g = torch.Generator().manual_seed(1)
    loha = {"unet": {f"{ATTN}.hada_w1_a": torch.randn(16, 4, generator=g), f"{ATTN}.hada_w1_b": torch.randn(4, 16, generator=g),
                     f"{ATTN}.hada_w2_a": torch.randn(16, 4, generator=g), f"{ATTN}.hada_w2_b": torch.randn(4, 16, generator=g),
                     f"{ATTN}.alpha": torch.tensor(4.0)}}
    args = {"algo": "loha", "preset": "full", "dropout": "0.05"}
    source = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "4",
              "ss_network_args": json.dumps(args)}
    assert json.loads(kohya_metadata(loha, source=source)["ss_network_args"]) == args
    wrong = {**source, "ss_network_args": json.dumps({**args, "algo": "lokr"})}
    assert json.loads(kohya_metadata(loha, source=wrong)["ss_network_args"]) == {"algo": "loha"}


def test_lycoris_algo_aliases_name_the_same_network():
    """``diff`` names the ``full`` algo (sdadapt.formats.kohya._ALGO_ALIASES, as the LyCORIS files it reads name it):
    a full-rank file keeps a source that called it ``diff``."""
    full = {"unet": {f"{ATTN}.diff": torch.randn(16, 16), f"{ATTN}.diff_b": torch.randn(16)}}
    source = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "1",
              "ss_network_args": json.dumps({"algo": "diff", "preset": "full"})}
    assert json.loads(kohya_metadata(full, source=source)["ss_network_args"]) == {"algo": "diff", "preset": "full"}
