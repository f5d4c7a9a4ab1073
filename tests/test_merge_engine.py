"""Streaming engine: sources, writer, key policy, chains, recipes, memory bound."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sdadapt.formats.files import WeightFileError
from sdadapt.merge.engine import MergeError, MergedSource, merge_file, merge_state_dicts
from sdadapt.merge.recipe import KeyPolicy, MergeStep, load_recipe, step_from_dict, step_to_dict
from sdadapt.merge.sources import legacy_hash, open_source, sha256_of, short_hash
from sdadapt.merge.writer import write_streaming

U = "model.diffusion_model."
IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def mini(seed: int, *, in_channels: int = 4, dtype=torch.float16, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A small SD1-like LDM checkpoint: UNet blocks, CLIP (with position_ids), VAE, EMA, schedule buffers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(shape, generator=g) * 0.1).to(dtype)

    state = {
        U + "input_blocks.0.0.weight": r(8, in_channels, 3, 3),
        U + "input_blocks.0.0.bias": r(8),
        U + "time_embed.0.weight": r(16, 8),
        U + "input_blocks.1.1.proj_in.weight": r(8, 8, 1, 1),
        U + "input_blocks.4.1.proj_in.weight": r(8, 8, 1, 1),
        U + "middle_block.1.proj_out.weight": r(8, 8, 1, 1),
        U + "output_blocks.11.1.proj_out.weight": r(8, 8, 1, 1),
        U + "out.2.weight": r(4, 8, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        IDS: torch.arange(8).reshape(1, 8),
        "first_stage_model.decoder.conv_in.weight": r(8, 4, 3, 3),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": r(8, in_channels, 3, 3),
        "alphas_cumprod": torch.linspace(1, 0.01, 10),
    }
    state.update(extra or {})
    return state


def save(tmp: Path, name: str, state: dict, metadata: dict | None = None) -> str:
    path = tmp / name
    save_file(state, str(path), metadata=metadata)
    return str(path)


@pytest.fixture
def abc(tmp_path):
    return [save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abc")]


# ---------------------------------------------------------------- writer and sources


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
                    min_size=6, max_size=6),
    shuffle=st.randoms(),
)
def test_writer_is_byte_identical_to_safetensors_save_file(tmp_path_factory, shapes, dtypes, shuffle):
    tmp = tmp_path_factory.mktemp("w")
    tensors = {}
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        tensors[f"t{i}.w"] = (torch.randn(shape) * 5).to(dtype)
    meta = {"format": "pt"}
    save_file(tensors, str(tmp / "ref.safetensors"), metadata=meta)
    items = list(tensors.items())
    shuffle.shuffle(items)  # tensors may arrive in any order
    calls = []
    write_streaming(tmp / "mine.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, items,
                    metadata=meta, progress=lambda d, t: calls.append((d, t)))
    assert (tmp / "mine.safetensors").read_bytes() == (tmp / "ref.safetensors").read_bytes()
    assert calls[-1] == (len(tensors), len(tensors)) and len(calls) == len(tensors)


def test_writer_refuses_bad_input_and_leaves_nothing_behind(tmp_path, monkeypatch):
    plan = {"a": (torch.float32, (2,)), "b": (torch.float16, (3,))}
    out = tmp_path / "o.safetensors"
    with pytest.raises(WeightFileError, match="'a' is torch.float16"):
        write_streaming(out, plan, [("a", torch.zeros(2, dtype=torch.float16))])
    with pytest.raises(WeightFileError, match="never arrived.*'b'"):
        write_streaming(out, plan, [("a", torch.zeros(2))])
    with pytest.raises(WeightFileError, match="arrived twice"):
        write_streaming(out, plan, [("a", torch.zeros(2)), ("a", torch.zeros(2))])
    with pytest.raises(WeightFileError, match="not in the plan"):
        write_streaming(out, plan, [("c", torch.zeros(2))])
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_streaming(out, plan, [("a", torch.zeros(2)), ("b", torch.zeros(3, dtype=torch.float16))])
    assert out.read_bytes() == b"keep"
    write_streaming(out, plan, [("b", torch.ones(3, dtype=torch.float16)), ("a", torch.ones(2))], overwrite=True)
    assert torch.equal(load_file(out)["b"], torch.ones(3, dtype=torch.float16))

    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))
    with pytest.raises(OSError, match="not enough disk space"):
        write_streaming(tmp_path / "big.safetensors", plan, [])


def test_sources_read_lazily_fresh_tensors_and_legacy_files(tmp_path):
    state = mini(0)
    path = save(tmp_path, "m.safetensors", state, {"k": "v"})
    with open_source(path) as src:
        assert set(src.keys()) == set(state) and src.metadata == {"k": "v"}
        for key, value in state.items():
            assert src.shape(key) == tuple(value.shape) and src.dtype(key) == value.dtype
            got = src.get(key)
            assert torch.equal(got, value)
        got = src.get(U + "out.2.weight")
        got += 1  # the caller owns it
        assert torch.equal(src.get(U + "out.2.weight"), state[U + "out.2.weight"])
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 5}, ckpt)
    with open_source(ckpt) as src:
        assert set(src.keys()) == set(state) and not src.lazy
        assert torch.equal(src.get(U + "time_embed.0.weight"), state[U + "time_embed.0.weight"])
    with pytest.raises(WeightFileError, match="no such file"):
        open_source(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state, "obj": Path("x")}, bad)
    with pytest.raises(WeightFileError, match="weights_only"):
        open_source(bad)
    import hashlib

    data = Path(path).read_bytes()
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()
    assert short_hash(sha256_of(path)) == hashlib.sha256(data).hexdigest()[:10]
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


# ---------------------------------------------------------------- engine semantics


def test_weighted_sum_file_matches_float64_and_applies_the_key_policy(tmp_path, abc):
    a, b, _ = abc
    report = merge_file(MergeStep("weighted-sum", (a, b), alpha=0.3), tmp_path / "o.safetensors")
    out, A, B = load_file(tmp_path / "o.safetensors"), load_file(a), load_file(b)
    for key in (U + "input_blocks.0.0.weight", U + "out.2.weight", "first_stage_model.decoder.conv_in.weight"):
        want = 0.7 * A[key].double() + 0.3 * B[key].double()
        assert out[key].dtype == torch.float16
        assert torch.allclose(out[key].double(), want, atol=1e-3, rtol=1e-3)
        assert key in report.merged
    assert torch.equal(out[IDS], A[IDS]) and out[IDS].dtype == torch.int64  # never interpolated
    assert not any(k.startswith("model_ema.") for k in out)  # pruned by default
    assert torch.equal(out["alphas_cumprod"], A["alphas_cumprod"])  # "other" keys copied from A
    assert "EMA pruned" in report.dropped["model_ema.decay"]


def test_components_ema_extra_keys_and_discard(tmp_path):
    a = save(tmp_path, "a.safetensors", mini(0, extra={"cond_stage_model.only_a": torch.ones(2)}))
    b = save(tmp_path, "b.safetensors", mini(1, extra={"cond_stage_model.only_b": torch.full((2,), 3.0)}))
    policy = KeyPolicy(components=("unet",), ema="copy", only_in_others="copy", discard=r"first_stage_model\.")
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5, policy=policy, dtype="fp32"), tmp_path / "o.safetensors")
    out, A = load_file(tmp_path / "o.safetensors"), load_file(a)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[te], A[te].float())  # not merged, but cast to the output dtype
    assert torch.equal(out["model_ema.diffusion_modelinput_blocks00weight"], A["model_ema.diffusion_modelinput_blocks00weight"].float())
    assert torch.equal(out["cond_stage_model.only_b"], torch.full((2,), 3.0))  # copied from B
    assert torch.equal(out["cond_stage_model.only_a"], torch.ones(2))  # A-only: A's value
    assert not any(k.startswith("first_stage_model.") for k in out)
    assert out[U + "out.2.weight"].dtype == torch.float32
    # ema="merge" merges the EMA copy like any other tensor
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5, policy=KeyPolicy(ema="merge")), tmp_path / "e.safetensors")
    ema = "model_ema.diffusion_modelinput_blocks00weight"
    want = 0.5 * A[ema].double() + 0.5 * load_file(b)[ema].double()
    merged = load_file(tmp_path / "e.safetensors")
    assert torch.allclose(merged[ema].double(), want, atol=1e-3)
    unet_key = U + "out.2.weight"  # ... and the model itself still (it used to be copied from A then)
    assert torch.allclose(merged[unet_key].double(), 0.5 * A[unet_key].double() + 0.5 * load_file(b)[unet_key].double(),
                          atol=1e-3)
    assert not torch.equal(merged[unet_key], A[unet_key].float())
    # the A1111 default drops B-only keys
    report = merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "p.safetensors")
    assert "cond_stage_model.only_b" not in load_file(tmp_path / "p.safetensors")
    assert "cond_stage_model.only_b" in report.dropped


def test_position_ids_broken_in_a_are_detected_and_reset(tmp_path):
    broken = mini(0, extra={IDS: torch.tensor([[0.0, 1.0, 2.0, 2.9999, 4.0, 5.0, 6.0, 7.0]])})  # an old float merge
    a = save(tmp_path, "a.safetensors", broken)
    b = save(tmp_path, "b.safetensors", mini(1))
    report = merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "o.safetensors")
    assert report.broken_position_ids == [IDS] and "reset-position-ids" in report.summary()
    assert torch.equal(load_file(tmp_path / "o.safetensors")[IDS], broken[IDS])  # copied as is, not merged
    fixed = MergeStep("weighted-sum", (a, b), alpha=0.5, policy=KeyPolicy(reset_position_ids=True))
    merge_file(fixed, tmp_path / "f.safetensors")
    ids = load_file(tmp_path / "f.safetensors")[IDS]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(8).reshape(1, 8))


def test_inpainting_conv_in_merges_the_shared_channels(tmp_path):
    a = save(tmp_path, "inpaint.safetensors", mini(0, in_channels=9))
    b = save(tmp_path, "custom.safetensors", mini(1))
    c = save(tmp_path, "base.safetensors", mini(2))
    report = merge_file(MergeStep("add-difference", (a, b, c), alpha=1.0), tmp_path / "o.safetensors")
    out, A, B, C = (load_file(p) for p in (tmp_path / "o.safetensors", a, b, c))
    key = U + "input_blocks.0.0.weight"
    assert out[key].shape == (8, 9, 3, 3)
    want = A[key][:, :4].double() + B[key].double() - C[key].double()
    assert torch.allclose(out[key][:, :4].double(), want, atol=2e-3)
    assert torch.equal(out[key][:, 4:], A[key][:, 4:])  # extra channels keep A's values
    assert key in report.channel_merged and report.flags["is_inpainting"]
    assert json.loads(load_file_metadata(tmp_path / "o.safetensors")["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(MergeError, match="more input channels"):
        merge_file(MergeStep("weighted-sum", (b, a), alpha=0.5), tmp_path / "x.safetensors")


def load_file_metadata(path) -> dict:
    from sdadapt.formats.files import read_safetensors_header

    return read_safetensors_header(path)[1]


def test_different_architectures_are_refused_naming_keys(tmp_path):
    a = save(tmp_path, "a.safetensors", mini(0))
    wide = mini(1)
    wide[U + "middle_block.1.proj_out.weight"] = torch.zeros(16, 16, 1, 1, dtype=torch.float16)
    b = save(tmp_path, "b.safetensors", wide)
    with pytest.raises(MergeError, match=r"middle_block\.1\.proj_out\.weight.*\(8, 8, 1, 1\).*\(16, 16, 1, 1\)"):
        merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    xl = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4), U + "label_emb.0.0.weight": torch.zeros(2, 2)}
    c = save(tmp_path, "xl.safetensors", xl)
    with pytest.raises(MergeError, match="sd1.*sdxl"):
        merge_file(MergeStep("weighted-sum", (a, c), alpha=0.5), tmp_path / "o.safetensors")
    with pytest.raises(WeightFileError, match="nope.safetensors: no such file"):
        merge_file(MergeStep("weighted-sum", (a, str(tmp_path / "nope.safetensors")), alpha=0.5), tmp_path / "o.safetensors")


def test_missing_keys_in_b_or_c_keep_a(tmp_path):
    a = save(tmp_path, "a.safetensors", mini(0))
    partial = mini(1)
    del partial[U + "out.2.weight"]
    b = save(tmp_path, "b.safetensors", partial)
    c = save(tmp_path, "c.safetensors", mini(2))
    report = merge_file(MergeStep("add-difference", (a, c, b), alpha=1.0), tmp_path / "o.safetensors")
    assert torch.equal(load_file(tmp_path / "o.safetensors")[U + "out.2.weight"], load_file(a)[U + "out.2.weight"])
    assert "missing in b.safetensors" in report.copied[U + "out.2.weight"]


def test_block_weights_give_each_block_its_alpha(tmp_path, abc):
    a, b, _ = abc
    vector = [0.0] * 26
    vector[1 + 4] = 1.0  # IN04
    vector[14 + 11] = 0.5  # OUT11 (holds out.*)
    vector[0] = 0.25  # BASE
    merge_file(MergeStep("weighted-sum", (a, b), block_weights=tuple(vector)), tmp_path / "o.safetensors")
    out, A, B = load_file(tmp_path / "o.safetensors"), load_file(a), load_file(b)

    def lerp(key, w):
        return ((1 - w) * A[key].double() + w * B[key].double())

    assert torch.equal(out[U + "input_blocks.4.1.proj_in.weight"], B[U + "input_blocks.4.1.proj_in.weight"])
    assert torch.equal(out[U + "input_blocks.1.1.proj_in.weight"], A[U + "input_blocks.1.1.proj_in.weight"])
    assert torch.equal(out[U + "time_embed.0.weight"], A[U + "time_embed.0.weight"])  # IN00 = 0
    for key, w in ((U + "out.2.weight", 0.5), ("first_stage_model.decoder.conv_in.weight", 0.25)):
        assert torch.allclose(out[key].double(), lerp(key, w), atol=1e-3)


def test_dare_is_reproducible_per_key_and_records_its_seed(tmp_path, abc):
    step = MergeStep("dare", tuple(abc), options={"drop": 0.5}, seed=11, dtype="fp32")
    merge_file(step, tmp_path / "one.safetensors")
    merge_file(step, tmp_path / "two.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    # order independence: computing keys in another order gives the same tensors
    with MergedSource(step) as merged:
        keys = merged.keys()
        shuffled = keys[:]
        random.Random(0).shuffle(shuffled)
        by_order = {k: merged.get(k) for k in shuffled}
    ref = load_file(tmp_path / "one.safetensors")
    assert all(torch.equal(by_order[k], ref[k]) for k in keys)
    other = MergeStep("dare", tuple(abc), options={"drop": 0.5}, seed=12, dtype="fp32")
    merge_file(other, tmp_path / "three.safetensors")
    key = U + "out.2.weight"
    assert not torch.equal(load_file(tmp_path / "three.safetensors")[key], ref[key])
    # no seed: one is drawn and recorded, and the replay is exact
    merge_file(MergeStep("dare", tuple(abc), options={"drop": 0.5}), tmp_path / "four.safetensors")
    recorded, _ = load_recipe(tmp_path / "four.safetensors")
    assert isinstance(recorded.seed, int)


def test_recipe_metadata_and_bit_exact_replay(tmp_path, abc):
    a, b, c = abc
    inner = MergeStep("weighted-sum", (a, b), alpha=0.4)
    step = MergeStep("ties", (c, inner, b), options={"density": 0.5}, dtype="bf16")
    merge_file(step, tmp_path / "o.safetensors")
    meta = load_file_metadata(tmp_path / "o.safetensors")
    recipe = json.loads(meta["sdadapt_merge_recipe"])
    assert recipe["format"] == "sdadapt-merge-recipe" and recipe["library"].startswith("sdadapt ")
    assert recipe["step"]["inputs"][0]["sha256"] == sha256_of(c)
    assert recipe["step"]["inputs"][1]["step"]["alpha"] == 0.4
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] == sha256_of(c) and a1111["secondary_model_hash"] is None
    models = json.loads(meta["sd_merge_models"])
    assert set(models) == {sha256_of(p) for p in (a, b, c)}
    assert models[sha256_of(a)]["name"] == "a.safetensors" and models[sha256_of(a)]["legacy_hash"] == legacy_hash(a)
    # replay from the file's own metadata: identical bytes
    replayed, hashes = load_recipe(tmp_path / "o.safetensors")
    assert replayed == step and hashes[c] == sha256_of(c)
    merge_file(replayed, tmp_path / "again.safetensors", known_hashes=hashes, verify_hashes=True)
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()
    assert step_from_dict(json.loads(json.dumps(step_to_dict(step)))) == step
    # a changed input is caught
    save(tmp_path, "c.safetensors", mini(9))
    with pytest.raises(WeightFileError, match="differs from the recipe"):
        merge_file(replayed, tmp_path / "x.safetensors", known_hashes=hashes, verify_hashes=True)
    # opt-out: no recipe, no hashes
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.4), tmp_path / "plain.safetensors", save_recipe=False)
    assert load_file_metadata(tmp_path / "plain.safetensors") == {"format": "pt"}


def test_ancestry_of_a_merged_input_is_folded_into_sd_merge_models(tmp_path, abc):
    a, b, c = abc
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "ab.safetensors")
    merge_file(MergeStep("weighted-sum", (str(tmp_path / "ab.safetensors"), c), alpha=0.5), tmp_path / "abc.safetensors")
    models = json.loads(load_file_metadata(tmp_path / "abc.safetensors")["sd_merge_models"])
    assert {sha256_of(p) for p in (a, b, c, tmp_path / "ab.safetensors")} == set(models)
    assert models[sha256_of(tmp_path / "ab.safetensors")]["sd_merge_recipe"]["interp_method"] == "Weighted sum"


def test_chain_without_intermediate_file_equals_two_steps_in_float32(tmp_path, abc):
    a, b, c = abc
    inner = MergeStep("weighted-sum", (a, b), alpha=0.3)
    merge_file(MergeStep("add-difference", (inner, c, a), alpha=0.5), tmp_path / "chain.safetensors", save_recipe=False)
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.3, dtype="fp32"), tmp_path / "mid.safetensors", save_recipe=False)
    two = MergeStep("add-difference", (str(tmp_path / "mid.safetensors"), c, a), alpha=0.5, dtype="fp16")
    merge_file(two, tmp_path / "two.safetensors", save_recipe=False)
    chain, twostep = load_file(tmp_path / "chain.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(chain) == set(twostep)
    merged = [k for k in chain if k.startswith(("model.", "cond_stage_model.", "first_stage_model."))]
    assert len(merged) > 8 and all(torch.equal(chain[k], twostep[k]) for k in merged)
    # with dtype=None a chain keeps the dtypes of its first file input (fp16 here), not the float32 hand-over
    assert chain[U + "out.2.weight"].dtype == torch.float16 and chain["alphas_cumprod"].dtype == torch.float32


def test_mixed_ldm_and_diffusers_inputs_merge_like_all_ldm(tmp_path):
    pytest.importorskip("diffusers")
    from merge_layouts import layout, write_random_checkpoint

    from sdadapt.formats.model_keys import convert_checkpoint

    shapes = layout("tiny-sd1")
    a = write_random_checkpoint(tmp_path / "a.safetensors", shapes, seed=1)
    b = write_random_checkpoint(tmp_path / "b.safetensors", shapes, seed=2)
    converted, report = convert_checkpoint(load_file(b), to="diffusers")
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp_path / "b_diffusers.safetensors"))
    merge_file(MergeStep("weighted-sum", (str(a), str(b)), alpha=0.4), tmp_path / "ldm.safetensors")
    rep = merge_file(MergeStep("weighted-sum", (str(a), str(tmp_path / "b_diffusers.safetensors")), alpha=0.4),
                     tmp_path / "mixed.safetensors")
    assert any("diffusers naming; converted to ldm" in n for n in rep.notes)
    ldm, mixed = load_file(tmp_path / "ldm.safetensors"), load_file(tmp_path / "mixed.safetensors")
    assert set(ldm) == set(mixed)
    same = [k for k in ldm if torch.equal(ldm[k], mixed[k])]
    assert len(same) == len(ldm), sorted(set(ldm) - set(same))[:5]


def test_merge_state_dicts_in_memory_matches_the_file_path(tmp_path, abc):
    states = [load_file(p) for p in abc]
    merged, report = merge_state_dicts(MergeStep("ties", ("base", "m1", "m2"), options={"density": 0.3}), states)
    merge_file(MergeStep("ties", tuple(abc), options={"density": 0.3}), tmp_path / "o.safetensors", save_recipe=False)
    from_file = load_file(tmp_path / "o.safetensors")
    assert set(merged) == set(from_file) and all(torch.equal(merged[k], from_file[k]) for k in merged)
    assert all(torch.equal(s[k], load_file(p)[k]) for s, p in zip(states, abc) for k in s)  # inputs untouched


def test_existing_output_is_refused_before_any_work(tmp_path, abc):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_file(MergeStep("weighted-sum", tuple(abc[:2]), alpha=0.5), out)
    merge_file(MergeStep("weighted-sum", tuple(abc[:2]), alpha=0.5), out, overwrite=True)
    assert len(load_file(out)) > 5


# ---------------------------------------------------------------- memory bound


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)

    def peak():
        try:  # VmHWM: peak RSS of this process image (ru_maxrss may carry the parent's over fork+exec)
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    from safetensors.torch import load_file, save_file
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep
    a, b, out, naive = sys.argv[1:5]
    print(peak())  # the baseline: the imports' peak, before any tensor is read
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), out)
    print(peak())  # the streaming merge's peak
    # then, in the same process, a load-everything merge (A1111's way): the peak is a high-water mark,
    # so this reads max(streaming, naive), which is above the bound only if the naive merge is
    x, y = load_file(a), load_file(b)
    save_file({k: (0.5 * x[k].float() + 0.5 * y[k].float()).half() for k in x}, naive)
    print(peak())
    """
)


def _rss(*args: str) -> list[int]:
    """The peaks (bytes) the script printed: after its imports, after the streaming merge, after a load-all merge."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.split()]


def test_streaming_peak_rss_stays_within_a_few_tensors(tmp_path):
    # two ~150 MB fp16 checkpoints of 4-8 MB tensors (300 MB of input)
    largest = 4 << 20  # elements: 8 MB in fp16
    plan = {f"model.diffusion_model.layer{i}.weight": (torch.float16, ((2 << 20) if i % 2 else largest,)) for i in range(24)}

    def tensors(seed):  # (distinct values per tensor and file; one randn per file, the memory use is the same)
        noise = torch.randn(largest, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
        for i, (key, (dtype, shape)) in enumerate(plan.items()):
            yield key, noise.roll(i)[: shape[0]].to(dtype)

    for name, seed in (("a", 0), ("b", 1)):
        write_streaming(tmp_path / f"{name}.safetensors", plan, tensors(seed))
    size = (tmp_path / "a.safetensors").stat().st_size
    assert size > 140e6
    # one process: its peak after the imports (the baseline), after the merge, after a load-all merge
    baseline, peak, naive = _rss(*(str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "o", "n")))
    largest_bytes = largest * 2
    bound = baseline + 10 * largest_bytes + (24 << 20)  # measured: about 7x the largest tensor
    assert peak - baseline < 2 * size / 3, (peak, baseline)  # far less than even one input
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB (baseline {baseline / 2**20:.0f})"
    # the same bound catches a load-everything merge (A1111's way)
    assert naive > bound, (naive, bound)
    with open_source(tmp_path / "o.safetensors") as out, open_source(tmp_path / "a.safetensors") as a:
        key = "model.diffusion_model.layer3.weight"
        assert out.dtype(key) == torch.float16 and out.shape(key) == a.shape(key)
    np.testing.assert_equal(len(load_file(tmp_path / "o.safetensors")), len(plan))


def test_a_recipe_moved_with_its_inputs_still_replays(tmp_path, abc):
    step = MergeStep("add-difference", tuple(abc), alpha=0.7)
    merge_file(step, tmp_path / "o.safetensors")
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in abc:
        Path(path).rename(moved / Path(path).name)
    (moved / "recipe.json").write_text(load_file_metadata(tmp_path / "o.safetensors")["sdadapt_merge_recipe"])
    replayed, hashes = load_recipe(moved / "recipe.json")
    assert [Path(p).parent for p in replayed.inputs] == [moved] * 3 and set(hashes) == set(replayed.inputs)
    merge_file(replayed, tmp_path / "again.safetensors", known_hashes=hashes, verify_hashes=True)
    one, two = load_file(tmp_path / "o.safetensors"), load_file(tmp_path / "again.safetensors")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
