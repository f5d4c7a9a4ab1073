"""What convert / --dtype / resize-lora / cut-dylora / combine-loras keep of a LoRA file's training metadata.

The references are transcriptions of kohya sd-scripts (sd-scripts@48d368fa):
* library/train_util.py:3259-3298 ``precalculate_safetensors_hashes`` / ``addnet_hash_safetensors`` /
  ``addnet_hash_legacy`` — the ``sshs_model_hash`` / ``sshs_legacy_hash`` every kohya save recomputes;
* networks/resize_lora.py:342-358 — resize keeps the input's metadata, rewrites the comment, dim and alpha;
* networks/merge_lora.py:205-222 — a merge writes fresh metadata, "Dynamic" when the layers' ranks differ.
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from sdadapt.formats import save_kohya
from sdadapt.formats.detect import dylora_network
from sdadapt.formats.files import read_weights
from sdadapt.formats.kohya import kohya_hashes
from sdadapt.loratools.combine import combine_loras
from sdadapt.loratools.convert import convert_lora
from sdadapt.loratools.dylora import dylora_cut
from sdadapt.loratools.resize import resize_lora

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"
STALE = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "deadbeef", "modelspec.hash_sha256": "0xabc"}
TRAINING = {
    "ss_training_comment": "my style", "ss_datasets": json.dumps([{"num_train_images": 12}]),
    "ss_learning_rate": "0.0001", "ss_seed": "42", "ss_output_name": "mystyle", "modelspec.title": "My Style",
    "modelspec.date": "2024-01-02T03:04:05", "modelspec.resolution": "768x768",
}


# ------------------------------------------------------------------------------ kohya's code, transcribed
def kohya_precalculate_hashes(tensors, metadata):
    """train_util.precalculate_safetensors_hashes (library/train_util.py:3259-3298), written out."""
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256()
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model_hash.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model_hash.hexdigest(), legacy.hexdigest()[0:8]


def kohya_resize_comment(metadata, new_rank, new_conv_rank, old_dim, dynamic_method=None, dynamic_param=None):
    """networks/resize_lora.py:346-356 (new_conv_rank defaults to new_rank, resize_lora.py:316)."""
    new_conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    comment = metadata.get("ss_training_comment", "")
    if not dynamic_method:
        conv_desc = "" if new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        return f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
    return f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old_dim}; {comment}"


def _file_hashes_ok(path) -> dict[str, str]:
    """The file's metadata, after checking its sshs hashes are kohya's of its own tensors and ss_ metadata."""
    tensors, _ = read_weights(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_precalculate_hashes(tensors, meta)
    return meta


# ---------------------------------------------------------------------------------------------- files
def _lora_state(rank=8, *, conv_rank=None, seed=0, width=32):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in (ATTN, ATTN2):
        state[f"{layer}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        state[f"{layer}.lora_up.weight"] = torch.randn(width, rank, generator=g) * 0.1
        state[f"{layer}.alpha"] = torch.tensor(rank / 2)
    if conv_rank:
        state[f"{CONV}.lora_down.weight"] = torch.randn(conv_rank, 8, 3, 3, generator=g)
        state[f"{CONV}.lora_up.weight"] = torch.randn(8, conv_rank, 1, 1, generator=g) * 0.1
        state[f"{CONV}.alpha"] = torch.tensor(float(conv_rank))
    return state


def _loha_state(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"{ATTN}.hada_w1_a": torch.randn(32, 4, generator=g), f"{ATTN}.hada_w1_b": torch.randn(4, 32, generator=g),
            f"{ATTN}.hada_w2_a": torch.randn(32, 4, generator=g), f"{ATTN}.hada_w2_b": torch.randn(4, 32, generator=g),
            f"{ATTN}.alpha": torch.tensor(4.0)}


def _write(path, state, network: dict[str, str]):
    """A kohya file as a trainer left it: its network keys, training keys and (now stale) hashes."""
    save_kohya(path, {"unet": state}, metadata={**TRAINING, **network, **STALE})
    return path


DYLORA = {"ss_network_module": "networks.dylora", "ss_network_dim": "8", "ss_network_alpha": "4",
          "ss_network_args": json.dumps({"unit": "4", "dropout": "0.1"})}


# ---------------------------------------------------------------------------------------------- tests
def test_kohya_hashes_are_kohyas_formula():
    g = torch.Generator().manual_seed(3)
    # 1.5 MB of tensor data, so the legacy hash reads real bytes (0x100000 … 0x110000, all of them)
    tensors = {"b.lora_down.weight": torch.randn(500, 1000, generator=g).half(), "a.alpha": torch.tensor(2.0),
               "c.lora_up.weight": torch.randn(400, 300, generator=g)}
    meta = {"ss_network_dim": "300", "modelspec.title": "ignored by the hash", "ss_seed": "1"}
    ours = kohya_hashes(tensors, meta)
    assert (ours["sshs_model_hash"], ours["sshs_legacy_hash"]) == kohya_precalculate_hashes(tensors, meta)
    # only ss_ metadata counts: a modelspec change keeps the hashes, an ss_ change does not
    assert kohya_hashes(tensors, {**meta, "modelspec.title": "other"}) == ours
    longer = kohya_hashes(tensors, {**meta, "ss_seed": "1234567890" * 4})  # (moves the data by 40 bytes)
    assert longer["sshs_model_hash"] == ours["sshs_model_hash"] and longer["sshs_legacy_hash"] != ours["sshs_legacy_hash"]
    assert kohya_hashes({**tensors, "a.alpha": torch.tensor(3.0)}, meta)["sshs_model_hash"] != ours["sshs_model_hash"]


def test_convert_dtype_keeps_a_dylora_file_a_dylora_file(tmp_path):
    src = _write(tmp_path / "dy.safetensors", _lora_state(8), DYLORA)
    out = tmp_path / "dy16.safetensors"
    convert_lora(src, out, to="kohya", dtype=torch.float16)
    meta = _file_hashes_ok(out)  # recomputed for the fp16 file (kohya recomputes them on every save)
    assert meta["sshs_model_hash"] != STALE["sshs_model_hash"] and "modelspec.hash_sha256" not in meta
    for key in (*DYLORA, *TRAINING):  # what trained it, as it was
        assert meta[key] == {**TRAINING, **DYLORA}[key], key
    network = dylora_network(meta)
    assert network is not None and network.unit == 4
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"


def test_convert_keeps_lycoris_network_args(tmp_path):
    lycoris = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "8", "ss_network_alpha": "4",
               "ss_network_args": json.dumps({"algo": "locon", "preset": "attn-mlp", "conv_dim": "4", "conv_alpha": "4",
                                              "dropout": "0.05", "rank_dropout": "0.1"})}
    src = _write(tmp_path / "locon.safetensors", _lora_state(8, conv_rank=4), lycoris)
    out = tmp_path / "locon_bf16.safetensors"
    convert_lora(src, out, to="kohya", dtype=torch.bfloat16)
    meta = _file_hashes_ok(out)
    assert {k: meta[k] for k in lycoris} == lycoris
    loha = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "4",
            "ss_network_args": json.dumps({"algo": "loha", "preset": "full", "module_dropout": "0.1"})}
    src = _write(tmp_path / "loha.safetensors", _loha_state(), loha)
    convert_lora(src, tmp_path / "loha16.safetensors", to="kohya", dtype=torch.float16)
    assert {k: v for k, v in _file_hashes_ok(tmp_path / "loha16.safetensors").items() if k in loha} == loha


def test_convert_regenerates_network_keys_that_do_not_describe_the_tensors(tmp_path):
    # a LoHa file whose metadata claims a plain kohya LoRA of rank 16 (wrong from the start): the tensors win
    src = _write(tmp_path / "mislabelled.safetensors", _loha_state(),
                 {"ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "16",
                  "ss_network_args": json.dumps({"conv_dim": "8"})})
    convert_lora(src, tmp_path / "out.safetensors", to="kohya", dtype=torch.float16)
    meta = _file_hashes_ok(tmp_path / "out.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"] == "my style"


def test_convert_for_another_base_model_rewrites_the_base_model_keys(tmp_path):
    src = _write(tmp_path / "sd1.safetensors", _lora_state(4), {})
    convert_lora(src, tmp_path / "sd2.safetensors", to="kohya", base_model="sd2", dtype=torch.float16)
    meta = _file_hashes_ok(tmp_path / "sd2.safetensors")
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.resolution"] == "512x512"  # (the sd1 file's 768x768 was for another model)
    assert meta["ss_seed"] == "42" and meta["modelspec.date"] == TRAINING["modelspec.date"]
    # the same base model: its own (here non-default) resolution stays
    convert_lora(src, tmp_path / "sd1b.safetensors", to="kohya", dtype=torch.float16)
    assert _file_hashes_ok(tmp_path / "sd1b.safetensors")["modelspec.resolution"] == "768x768"


@pytest.mark.parametrize("via", ["diffusers", "peft"])
def test_training_metadata_survives_a_round_trip_through_diffusers_and_peft(tmp_path, via):
    src = _write(tmp_path / "dy.safetensors", _lora_state(8), DYLORA)
    middle = tmp_path / ("mid.safetensors" if via == "diffusers" else "mid_peft")
    convert_lora(src, middle, to=via)
    weights = middle if via == "diffusers" else middle / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        carried = f.metadata()
    assert not set(STALE) & set(carried) and "sshs_model_hash" not in carried  # the kohya file's hashes are not its
    assert carried["format"] == "pt" and carried["ss_network_module"] == "networks.dylora"
    if via == "diffusers":  # its own peft config, not a stale one
        assert "lora_adapter_metadata" in carried
    back = tmp_path / "back.safetensors"
    convert_lora(middle, back, to="kohya", base_model="sd1" if via == "peft" else None)
    meta = _file_hashes_ok(back)
    assert {k: meta[k] for k in (*DYLORA, *TRAINING)} == {**TRAINING, **DYLORA}
    assert "lora_adapter_metadata" not in meta and dylora_network(meta).unit == 4


def test_resize_keeps_training_metadata_and_updates_what_it_changed(tmp_path):
    network = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
               "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4", "dropout": "0.1",
                                              "block_dims": "8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8"})}
    src = _write(tmp_path / "r8.safetensors", _lora_state(8, conv_rank=4), network)
    out = tmp_path / "r2.safetensors"
    resize_lora(src, out, rank=2, conv_rank=3)
    meta = _file_hashes_ok(out)
    source = dict(read_weights(src)[1])
    assert meta["ss_training_comment"] == kohya_resize_comment(source, 2, 3, 8) == \
        "dimension is resized from 8 to 2 (conv: 3); my style"
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "2", "1.0")
    # the training args stay, the shape args are the new file's (no stale conv_dim 4, no block_dims of 8)
    assert json.loads(meta["ss_network_args"]) == {"dropout": "0.1", "conv_dim": "3", "conv_alpha": "3"}
    assert {k: meta[k] for k in TRAINING if k != "ss_training_comment"} == \
        {k: v for k, v in TRAINING.items() if k != "ss_training_comment"}
    # dynamic: kohya's wording and "Dynamic"
    resize_lora(src, tmp_path / "dyn.safetensors", rank=8, method="sv_ratio", param=2.0)
    meta = _file_hashes_ok(tmp_path / "dyn.safetensors")
    assert meta["ss_training_comment"] == kohya_resize_comment(source, 8, None, 8, "sv_ratio", 2.0)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")


def test_resize_of_a_dylora_or_lycoris_file_is_a_plain_lora(tmp_path):
    src = _write(tmp_path / "dy.safetensors", _lora_state(8), DYLORA)
    resize_lora(src, tmp_path / "r4.safetensors", rank=4)
    meta = _file_hashes_ok(tmp_path / "r4.safetensors")
    assert meta["ss_network_module"] == "networks.lora" and dylora_network(meta) is None
    assert json.loads(meta["ss_network_args"]) == {} and meta["ss_network_dim"] == "4"
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 4; my style"
    # a LyCORIS LoCon: plain LoRA tensors, so a resize writes a kohya networks.lora (LyCORIS' preset / algo would
    # be args of another module)
    locon = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon", "preset": "full"})}
    src = _write(tmp_path / "locon.safetensors", _lora_state(6, conv_rank=2), locon)
    resize_lora(src, tmp_path / "locon_r2.safetensors", rank=2)
    meta = _file_hashes_ok(tmp_path / "locon_r2.safetensors")
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])) == \
        ("networks.lora", {"conv_dim": "2", "conv_alpha": "2"})
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 2; my style"
    # args naming a conv rank the resized file has no convolution for (a linear-only file): not carried over
    linear = {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({"conv_dim": "4", "dropout": "0.1"})}
    src = _write(tmp_path / "linear.safetensors", _lora_state(6), linear)
    resize_lora(src, tmp_path / "linear_r2.safetensors", rank=2)
    assert json.loads(_file_hashes_ok(tmp_path / "linear_r2.safetensors")["ss_network_args"]) == {"dropout": "0.1"}


def test_cut_dylora_hashes_are_the_cut_files(tmp_path):
    src = _write(tmp_path / "dy.safetensors", _lora_state(8), DYLORA)
    dylora_cut(src, tmp_path / "cut.safetensors", rank=4)
    meta = _file_hashes_ok(tmp_path / "cut.safetensors")
    assert meta["ss_training_comment"] == "split from DyLoRA, rank 8 to 4; my style"  # extract_lora_from_dylora.py:89
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.dylora"


def test_combine_writes_fresh_metadata_dynamic_when_ranks_differ(tmp_path):
    a = _write(tmp_path / "a.safetensors", _lora_state(8, seed=1, conv_rank=2), DYLORA)
    b = _write(tmp_path / "b.safetensors", _lora_state(4, seed=2), {})
    combine_loras([a, b], tmp_path / "ab.safetensors", strengths=[1.0, 0.5])
    meta = _file_hashes_ok(tmp_path / "ab.safetensors")
    # merge_lora.py:205-222: a new networks.lora, "Dynamic" when the merged layers differ; no input's training keys
    assert meta["ss_network_module"] == "networks.lora" and dylora_network(meta) is None
    # (both attention layers: 8 + 4 concatenated, a's conv layer 2: merge_lora.py counts every layer, conv ones too,
    # and writes no ss_network_args)
    assert meta["ss_network_dim"] == "Dynamic" and "ss_network_args" not in meta
    assert "ss_datasets" not in meta and "ss_seed" not in meta
    c = _write(tmp_path / "c.safetensors", {k: v for k, v in _lora_state(2, seed=3).items() if ATTN in k}, {})
    combine_loras([a, c], tmp_path / "ac.safetensors")  # attn1: 8 + 2, attn2: 8
    meta = _file_hashes_ok(tmp_path / "ac.safetensors")
    assert meta["ss_network_dim"] == "Dynamic"
    alphas = {float(v) for k, v in read_weights(tmp_path / "ac.safetensors")[0].items() if k.endswith(".alpha")
              and CONV not in k}
    assert meta["ss_network_alpha"] == ("Dynamic" if len(alphas) > 1 else str(alphas.pop()))  # (merge_lora.py: str(float))
    combine_loras([a, b], tmp_path / "svd.safetensors", mode="svd", rank=4)
    meta = _file_hashes_ok(tmp_path / "svd.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4")


def test_cli_convert_dtype_of_a_dylora_file_still_reads_as_dylora(tmp_path, capsys):
    from sdadapt.cli import main

    src = _write(tmp_path / "dy.safetensors", _lora_state(8), DYLORA)
    out = tmp_path / "dy16.safetensors"
    assert main(["convert", str(src), "--to", "kohya", "--dtype", "fp16", "-o", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "dylora" in capsys.readouterr().out.lower()
    meta = _file_hashes_ok(out)
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])["unit"]) == ("networks.dylora", "4")
