"""supermerger's Adjust ("fine") and per-block beta, against float64 transcriptions of
hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` (``fineman``, ``colorcalc``,
``FINETUNES``, ``blockfromkey``) written here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.errors import InputError, MergeError
from sdadapt.merge.adjust import adjust_factors, parse_adjust
from sdadapt.merge.engine import merge_state_dicts
from sdadapt.merge.recipe import MergeStep, step_from_dict, step_to_dict
from merge_layouts import layout, random_tensor
from test_merge_engine import load_file_metadata, save

f64 = torch.float64
U = "model.diffusion_model."

# ------------------------------------------------------------------ float64 transcriptions of supermerger

COLS = [[-1, 1 / 3, 2 / 3], [1, 1, 0], [0, -1, -1], [1, 0, 1]]
COLSXL = [[0, 0, 1], [1, 0, 0], [-1, -1, 0], [-1, 1, 0]]
FINETUNES = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.out.2.bias",
]


def ref_colorcalc(cols, isxl):
    colors = COLSXL if isxl else COLS
    outs = [[y * cols[i] * 0.02 for y in x] for i, x in enumerate(colors)]
    return [sum(x) for x in zip(*outs)]


def ref_fineman(fine, isxl):
    if fine.find(",") == -1:
        return None
    tmp = [t.strip() for t in fine.split(",")]
    fines = [0.0] * 8
    for i, f in enumerate(tmp[0:8]):
        try:
            fines[i] = float(f)
        except Exception:
            pass
    fine = fines
    return [
        1 - fine[0] * 0.01,
        1 + fine[0] * 0.02,
        1 - fine[1] * 0.01,
        1 + fine[1] * 0.02,
        1 - fine[2] * 0.01,
        [fine[3] * 0.02] + ref_colorcalc(fine[4:8], isxl),
    ]


def ref_adjust(theta, fine_text, isxl):
    """supermerger's Stage 1 "##### Adjust" on LDM keys (float64)."""
    fine = ref_fineman(fine_text, isxl) if fine_text.rstrip(",0") != "" else ""
    out = dict(theta)
    for key in theta:
        if any(item in key for item in FINETUNES) and fine:
            index = FINETUNES.index(key)
            if 5 > index:
                out[key] = out[key] * fine[index]
            else:
                out[key] = out[key] + torch.tensor(fine[5], dtype=f64)
    return out


BLOCKID = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def ref_blockfromkey_sd1(key):
    """supermerger ``blockfromkey`` for SD1 (not isxl, not isflux)."""
    re_inp = re.compile(r'\.input_blocks\.(\d+)\.')
    re_mid = re.compile(r'\.middle_block\.(\d+)\.')
    re_out = re.compile(r'\.output_blocks\.(\d+)\.')
    weight_index = -1
    if 'time_embed' in key:
        weight_index = 0
    elif '.out.' in key:
        weight_index = 25 - 1
    else:
        m = re_inp.search(key)
        if m:
            weight_index = int(m.groups()[0])
        elif re_mid.search(key):
            weight_index = 12
        else:
            m = re_out.search(key)
            if m:
                weight_index = 12 + 1 + int(m.groups()[0])
    return BLOCKID[weight_index + 1]


def ref_beta(key, base_beta, weights_b):
    """supermerger's ``current_beta`` with useblocks and usebeta: weights_b has no BASE (25 values)."""
    weight_index = BLOCKID.index(ref_blockfromkey_sd1(key))
    return weights_b[weight_index - 1] if weight_index > 0 else base_beta


# ------------------------------------------------------------------ models


def sd1(seed, dtype=f64):
    return {k: random_tensor(k, s, dtype, seed) for k, s in layout("tiny-sd1").items()}


def sdxl(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g, dtype=f64)
    return {
        U + "input_blocks.0.0.weight": r(8, 4, 3, 3), U + "input_blocks.0.0.bias": r(8),
        U + "label_emb.0.0.weight": r(8, 8),
        U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "out.0.weight": r(8), U + "out.0.bias": r(8), U + "out.2.weight": r(4, 8, 3, 3), U + "out.2.bias": r(4),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": r(8, 8),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": r(24, 8),
    }


def _float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith("position_ids")]


# ------------------------------------------------------------------ Adjust


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-20, 20, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=8),
       isxl=st.booleans())
def test_adjust_factors_are_supermergers_fineman(values, isxl):
    text = ",".join(str(v) for v in values) + ("" if len(values) > 1 else ",0")
    want = ref_fineman(text, isxl)
    got = adjust_factors(parse_adjust(text), architecture="sdxl" if isxl else "sd1")
    assert list(got[:5]) == pytest.approx(want[:5], rel=0, abs=1e-15)
    assert list(got[5]) == pytest.approx(want[5], rel=0, abs=1e-15)


@pytest.mark.parametrize("operator, alpha, options", [("weighted-sum", 0.3, {}), ("triple-sum", 0.3, {"beta": 0.2})])
def test_adjust_on_sd1_matches_supermerger_after_the_merge(operator, alpha, options):
    A, B, C = sd1(0), sd1(1), sd1(2)
    text = "3,-2,1.5,4,1,-2,0.5,2"
    states = [A, B] if operator == "weighted-sum" else [A, B, C]
    step = MergeStep(operator, tuple("abc"[: len(states)]), alpha=alpha, options=options, adjust=parse_adjust(text),
                     compute_dtype="fp64", dtype="fp64")
    out, report = merge_state_dicts(step, states)
    plain, _ = merge_state_dicts(MergeStep(operator, step.inputs, alpha=alpha, options=options, compute_dtype="fp64",
                                           dtype="fp64"), states)
    want = ref_adjust(plain, text, isxl=False)
    changed = [k for k in out if not torch.equal(out[k], plain[k])]
    assert sorted(changed) == sorted(FINETUNES)
    for key in FINETUNES:
        assert torch.allclose(out[key], want[key], rtol=1e-13, atol=1e-15), key
    assert any("adjust 3,-2,1.5,4,1,-2,0.5,2 (supermerger) on 6 sd1 keys" in n for n in report.notes)
    # the merge itself is the float64 formula: weighted sum (1-a)A + aB before the adjust
    key = FINETUNES[4]
    base = (1 - alpha) * A[key] + alpha * B[key] if operator == "weighted-sum" else \
        (1 - alpha - 0.2) * A[key] + alpha * B[key] + 0.2 * C[key]
    assert torch.allclose(out[key], base * (1 - 1.5 * 0.01), rtol=1e-13, atol=1e-15)


def test_adjust_on_sdxl_uses_the_sdxl_colour_table():
    A, B = sdxl(0), sdxl(1)
    text = "0,0,0,1,2,-3,4,5"
    out, report = merge_state_dicts(MergeStep("weighted-sum", ("a", "b"), alpha=0.5, adjust=parse_adjust(text),
                                              compute_dtype="fp64", dtype="fp64"), [A, B])
    plain = {k: 0.5 * A[k] + 0.5 * B[k] for k in A}
    want = ref_adjust(plain, text, isxl=True)
    bias = U + "out.2.bias"
    assert torch.allclose(out[bias], want[bias], rtol=1e-13, atol=1e-15)
    assert not torch.allclose(out[bias], ref_adjust(plain, text, isxl=False)[bias])  # SD1's table differs
    assert any("sdxl keys" in n for n in report.notes)


def test_adjust_on_diffusers_keys_is_the_same_as_on_ldm_keys():
    pytest.importorskip("diffusers")
    from sdadapt.formats.model_keys import convert_checkpoint

    ldm = [sd1(i, torch.float32) for i in range(2)]
    diffusers = [convert_checkpoint(s, to="diffusers")[0] for s in ldm]
    assert "unet.conv_out.bias" in diffusers[0]
    step = MergeStep("weighted-sum", ("a", "b"), alpha=0.4, adjust=(1, 2, 3, 4, 5, 6, 7, 8))
    out_ldm, _ = merge_state_dicts(step, ldm)
    out_diff, _ = merge_state_dicts(step, diffusers)
    back = convert_checkpoint(out_diff, to="ldm")[0]
    assert set(back) == set(out_ldm)
    assert all(torch.equal(back[k], out_ldm[k]) for k in out_ldm)


def test_adjust_is_refused_where_its_keys_are_not_merged():
    A, B = sd1(0), sd1(1)
    step = MergeStep("weighted-sum", ("a", "b"), alpha=0.5, adjust=(1,))
    lacking = {k: v for k, v in A.items() if k != U + "out.0.bias"}
    with pytest.raises(MergeError, match=r"1 of its 6 keys are not merged: model\.diffusion_model\.out\.0\.bias "
                                         r"\(not in a\b"):
        merge_state_dicts(step, [lacking, B])
    from dataclasses import replace

    from sdadapt.merge.recipe import KeyPolicy

    with pytest.raises(MergeError, match=r"6 of its 6 keys.*unet not merged by the policy"):
        merge_state_dicts(replace(step, policy=KeyPolicy(components=("text_encoder",))), [A, B])
    with pytest.raises(MergeError, match="matches discard pattern"):
        merge_state_dicts(replace(step, policy=KeyPolicy(discard=r"\.out\.2\.")), [A, B])
    # all zeros is no adjustment (supermerger skips it): nothing is checked or changed
    zero, _ = merge_state_dicts(replace(step, adjust=(0,) * 8), [lacking, B])
    plain, _ = merge_state_dicts(replace(step, adjust=None), [lacking, B])
    assert all(torch.equal(zero[k], plain[k]) for k in plain)


def test_adjust_refuses_an_out_2_bias_without_4_latent_channels_before_writing():
    A, B = sd1(0), sd1(1)
    for state in (A, B):
        state[U + "out.2.bias"] = torch.zeros(8, dtype=f64)
    with pytest.raises(MergeError, match=r"out\.2\.bias has shape \(8,\).*4 latent channels"):
        merge_state_dicts(MergeStep("weighted-sum", ("a", "b"), alpha=0.5, adjust=(0, 0, 0, 1)), [A, B])


def test_adjust_values_are_checked():
    with pytest.raises(InputError, match="1 to 8 numbers"):
        parse_adjust("1,2,3,4,5,6,7,8,9")
    with pytest.raises(InputError, match="comma-separated numbers"):
        parse_adjust("1,x")
    with pytest.raises(InputError, match="adjust"):
        MergeStep("weighted-sum", ("a", "b"), alpha=0.5, adjust=(float("nan"),))
    assert parse_adjust("1, 2") == (1.0, 2.0, 0, 0, 0, 0, 0, 0)


# ------------------------------------------------------------------ per-block beta


@pytest.mark.parametrize("operator", ["triple-sum", "sum-twice"])
def test_per_block_beta_follows_supermergers_block_of_each_key(operator):
    A, B, C = sd1(0), sd1(1), sd1(2)
    betas = tuple(round(0.02 * i - 0.1, 2) for i in range(26))  # BASE first, every block different
    step = MergeStep(operator, ("a", "b", "c"), alpha=0.3, options={"beta": betas[0]}, block_beta=betas,
                     compute_dtype="fp64", dtype="fp64")
    out, report = merge_state_dicts(step, [A, B, C])
    seen = set()
    for key in _float_keys(A):
        beta = ref_beta(key, betas[0], list(betas[1:]))
        seen.add(beta)
        a, b, c = A[key], B[key], C[key]
        want = (1 - 0.3 - beta) * a + 0.3 * b + beta * c if operator == "triple-sum" else \
            (1 - beta) * ((1 - 0.3) * a + 0.3 * b) + beta * c
        assert torch.allclose(out[key], want, rtol=1e-12, atol=1e-14), key
    assert len(seen) >= 10  # many blocks took part
    assert any("per-block beta for sd1" in n for n in report.notes)


def test_per_block_beta_checks():
    with pytest.raises(InputError, match="weighted-sum has no beta.*triple-sum"):
        MergeStep("weighted-sum", ("a", "b"), alpha=0.5, block_beta=(0.1,) * 26)
    A, B, C = sd1(0), sd1(1), sd1(2)
    with pytest.raises(ValueError, match="26"):
        merge_state_dicts(MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.1},
                                    block_beta=(0.1,) * 7), [A, B, C])
    with pytest.raises(InputError, match=r"extract \(per-block beta, .*'beta'"):
        merge_state_dicts(MergeStep("extract", ("a", "b", "c"), alpha=0.3, options={"beta": 0.1},
                                    block_beta=(0.1,) * 25 + (1.5,)), [A, B, C])
    # 25 values: BASE from options["beta"]
    step = MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.4}, block_beta=(0.0,) * 25)
    out, _ = merge_state_dicts(step, [A, B, C])
    te = next(k for k in _float_keys(A) if k.startswith("cond_stage_model"))
    assert torch.allclose(out[te], (0.3 * A[te] + 0.3 * B[te] + 0.4 * C[te]).to(out[te].dtype), atol=1e-6)


def test_recipe_round_trip_keeps_adjust_and_block_beta_and_old_recipes_unchanged():
    step = MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.1}, block_beta=(0.1,) * 20,
                     adjust=(1, 2))
    data = step_to_dict(step)
    assert data["adjust"] == [1, 2, 0, 0, 0, 0, 0, 0] and data["block_beta"] == [0.1] * 20
    assert step_from_dict(json.loads(json.dumps(data))) == step
    plain = step_to_dict(MergeStep("weighted-sum", ("a", "b"), alpha=0.3))
    assert "adjust" not in plain and "block_beta" not in plain


# ------------------------------------------------------------------ command line


def run(*argv: str) -> int:
    return main(["merge", *argv])


def test_cli_adjust_and_per_block_beta_replay_bit_exactly(tmp_path, capsys):
    files = [save(tmp_path, f"{n}.safetensors", sd1(i, torch.float16)) for i, n in enumerate("abc")]
    out = tmp_path / "o.safetensors"
    betas = ",".join(str(round(0.01 * i, 2)) for i in range(26))
    assert run("triple-sum", *files, "--alpha", "0.3", "--beta", betas, "--adjust=-1,2,0,1,0,0,3",
               "-o", str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "r.safetensors"), "-q") == 0
    assert (tmp_path / "r.safetensors").read_bytes() == out.read_bytes()
    meta = load_file_metadata(out)
    step = json.loads(meta["sdadapt_merge_recipe"])["step"]
    assert step["adjust"] == [-1, 2, 0, 1, 0, 0, 3, 0]
    assert step["block_beta"] == [round(0.01 * i, 2) for i in range(26)] and step["options"]["beta"] == 0.0
    a1111 = json.loads(meta["sd_merge_recipe"])
    # supermerger's names (mergers.py smerge): BASE apart, the blocks without it, the text as typed
    assert a1111["base_beta"] == 0.0 and a1111["weights_beta"] == step["block_beta"][1:]
    assert a1111["weights_beta_orig"] == ",".join(str(v) for v in step["block_beta"])
    # one number is a plain beta; a wrong count is refused naming the forms
    assert run("sum-twice", *files, "--alpha", "0.3", "--beta", "0.2", "-o", str(tmp_path / "p.safetensors"),
               "-q") == 0
    assert "block_beta" not in json.loads(load_file_metadata(tmp_path / "p.safetensors")["sdadapt_merge_recipe"])["step"]
    capsys.readouterr()
    assert run("sum-twice", *files, "--alpha", "0.3", "--beta", "0.2,0.3", "-o", str(tmp_path / "q.safetensors")) != 0
    assert "26 values" in capsys.readouterr().err and not (tmp_path / "q.safetensors").exists()


# ------------------------------------------------------------------ include / exclude


def ref_excluder(block, block26, inex, ex_blocks, ex_elems, key):
    """supermerger ``excluder`` + ``ex_returner``: True = the key is skipped (kept as A)."""
    if ex_blocks == [] and ex_elems == [""]:
        return False
    include = True if inex == "Include" else False
    if block26 in ex_blocks:
        return not include
    if block in ex_elems or block in ex_blocks:
        return not include
    if "Adjust" in ex_blocks and key in FINETUNES:
        return not include
    for ke in ex_elems:
        if ke != "" and ke in key:
            return not include
    if "VAE" in ex_blocks and "first_stage_model" in key:
        return not include
    return include


@pytest.mark.parametrize("inex", ["Exclude", "Include"])
@pytest.mark.parametrize("ex_blocks, ex_elems", [(["IN04", "OUT05"], ["attn2"]), (["BASE", "M00"], [""]),
                                                 ([], ["proj_in", "norm"]), (["IN01"], ["to_k"])])
def test_include_exclude_keep_a_exactly_where_supermerger_skips(inex, ex_blocks, ex_elems):
    A, B = sd1(0), sd1(1)
    rules = [" ".join(ex_blocks) + ":"] if ex_blocks else []
    rules += [":" + e for e in ex_elems if e]
    policy = {"exclude" if inex == "Exclude" else "include": ", ".join(rules)}
    from sdadapt.merge.recipe import KeyPolicy

    out, report = merge_state_dicts(MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.2},
                                              policy=KeyPolicy(**policy), compute_dtype="fp64", dtype="fp64"),
                                    [A, B, sd1(2)])
    skipped = {k for k in _float_keys(A)
               if ref_excluder(ref_blockfromkey_sd1(k), ref_blockfromkey_sd1(k), inex, ex_blocks, ex_elems, k)}
    assert skipped and skipped != set(_float_keys(A))
    assert {k for k in _float_keys(A) if torch.equal(out[k], A[k])} == skipped
    assert {k for k, why in report.copied.items() if "kept the first input" in why} == skipped


def test_include_exclude_rules_are_checked_and_recorded(tmp_path):
    from sdadapt.merge.recipe import KeyPolicy

    with pytest.raises(InputError, match="BLOCKS:ELEMENTS"):
        KeyPolicy(exclude="IN04:attn2:0.5")
    with pytest.raises(InputError, match="include/exclude rule 'IN99:': 'IN99' is not a block"):
        KeyPolicy(include="IN99:")
    with pytest.raises(InputError, match="NOT needs the elements"):
        KeyPolicy(exclude="IN04:NOT")
    files = [save(tmp_path, f"{n}.safetensors", sd1(i, torch.float32)) for i, n in enumerate("ab")]
    out = tmp_path / "o.safetensors"
    assert run("weighted-sum", *files, "--alpha", "0.5", "--exclude", "OUT00-OUT11:", "--include", ":proj", "-o",
               str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "r.safetensors"), "-q") == 0
    assert (tmp_path / "r.safetensors").read_bytes() == out.read_bytes()
    policy = json.loads(load_file_metadata(out)["sdadapt_merge_recipe"])["step"]["policy"]
    assert policy["exclude"] == "OUT00-OUT11:" and policy["include"] == ":proj"
    a1111 = json.loads(load_file_metadata(out)["sd_merge_recipe"])
    assert a1111["exclude"] == "OUT00-OUT11:" and a1111["include"] == ":proj"
    plain = step_to_dict(MergeStep("weighted-sum", ("a", "b"), alpha=0.3))["policy"]
    assert "exclude" not in plain and "include" not in plain


def test_exclude_still_applies_inside_include():
    from sdadapt.merge.recipe import KeyPolicy

    A, B = sd1(0), sd1(1)
    out, _ = merge_state_dicts(MergeStep("weighted-sum", ("a", "b"), alpha=0.5, compute_dtype="fp64", dtype="fp64",
                                         policy=KeyPolicy(include="IN01-IN05:", exclude=":attn")), [A, B])
    inside = {f"IN{i:02d}" for i in range(1, 6)}
    merged = {k for k in _float_keys(A) if ref_blockfromkey_sd1(k) in inside and "attn" not in k}
    assert merged and any("attn" in k and ref_blockfromkey_sd1(k) in inside for k in A)
    assert {k for k in _float_keys(A) if not torch.equal(out[k], A[k])} == merged


def test_diffusers_naming_gives_the_ldm_result_for_self_block_beta_and_include_exclude():
    """supermerger reads LDM names: a diffusers-named file must merge as its LDM twin (self's ``norm``
    skip is judged on the LDM name: ``resnets.0.norm1`` is ``in_layers.0``, which self scales)."""
    pytest.importorskip("diffusers")
    from sdadapt.formats.model_keys import convert_checkpoint
    from sdadapt.merge.recipe import KeyPolicy

    ldm = [sd1(i, torch.float32) for i in range(3)]
    diffusers = [convert_checkpoint(s, to="diffusers")[0] for s in ldm]
    steps = [
        MergeStep("self", ("a",), alpha=0.5, adjust=(1, 2, 3, 4)),
        MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.1},
                  block_beta=tuple(i / 40 for i in range(26))),
        MergeStep("weighted-sum", ("a", "b"), alpha=0.3,
                  policy=KeyPolicy(exclude="IN01 OUT11:, :attn2", include="NOT M00:")),
    ]
    for step in steps:
        n = len(step.inputs)
        out_ldm, _ = merge_state_dicts(step, ldm[:n])
        out_diffusers, _ = merge_state_dicts(step, diffusers[:n])
        back = convert_checkpoint(out_diffusers, to="ldm")[0]
        assert set(back) == set(out_ldm)
        assert [k for k in out_ldm if not torch.equal(back[k], out_ldm[k])] == [], step.operator
        if step.operator == "self":
            scaled = U + "input_blocks.1.0.in_layers.0.weight"  # a GroupNorm supermerger's self scales
            assert torch.equal(out_ldm[scaled], 0.5 * ldm[0][scaled])


def test_docs_adjust_beta_and_exclude_example_runs():
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("merge.md")) if "adjust=(0, 0, 2, 1)" in block)
    run_block("merge.md", index)


# ------------------------------------------------------------------ self / plus random

SELFKEYS = ["to_out", "proj_out", "norm"]


def ref_self(theta_0, current_alpha):
    """supermerger Stage 1, calcmode "self" (float64)."""
    out = dict(theta_0)
    for key in theta_0:
        if any(selfkey in key for selfkey in SELFKEYS):
            continue
        if current_alpha == 0:
            continue
        out[key] = (theta_0[key].clone()) * current_alpha
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.9, -1.5])
def test_self_scales_a_except_supermergers_selfkeys(alpha):
    A = sd1(0)
    out, report = merge_state_dicts(MergeStep("self", ("a",), alpha=alpha, compute_dtype="fp64", dtype="fp64"), [A])
    want = ref_self(A, alpha)
    kept = [k for k in _float_keys(A) if any(s in k for s in SELFKEYS)]
    assert kept and all(torch.equal(out[k], A[k]) for k in kept)
    for key in _float_keys(A):
        assert torch.allclose(out[key], want[key], rtol=1e-14, atol=0), key
    assert all("supermerger's self" in report.copied[k] for k in kept)


def test_plus_random_is_a_plus_alpha_noise_seeded_per_key():
    A = sd1(0)
    step = MergeStep("plus-random", ("a",), alpha=0.25, seed=7, compute_dtype="fp64", dtype="fp64")
    out, _ = merge_state_dicts(step, [A])
    from sdadapt.merge.operators import key_generator

    for key in _float_keys(A):
        if any(s in key for s in SELFKEYS):
            assert torch.equal(out[key], A[key])
            continue
        noise = torch.randn(A[key].shape, generator=key_generator(7, key), dtype=f64)
        assert torch.allclose(out[key], A[key] + 0.25 * noise, rtol=1e-14, atol=1e-15), key
    # a key's noise does not depend on the other keys; another seed gives other noise
    some = {k: A[k] for k in list(A)[::3]}
    part, _ = merge_state_dicts(step, [some])
    assert all(torch.equal(part[k], out[k]) for k in part)
    other, _ = merge_state_dicts(MergeStep("plus-random", ("a",), alpha=0.25, seed=8, compute_dtype="fp64",
                                           dtype="fp64"), [A])
    key = U + "input_blocks.0.0.weight"
    assert not torch.equal(other[key], out[key])
    noise = (out[key] - A[key]) / 0.25
    assert abs(float(noise.mean())) < 0.5 and 0.5 < float(noise.std()) < 1.5
    # a negative alpha subtracts the same noise (supermerger: theta += randn * alpha)
    negative, _ = merge_state_dicts(MergeStep("plus-random", ("a",), alpha=-0.25, seed=7, compute_dtype="fp64",
                                              dtype="fp64"), [A])
    want = A[key] - 0.25 * torch.randn(A[key].shape, generator=key_generator(7, key), dtype=f64)
    assert torch.allclose(negative[key], want, rtol=1e-14, atol=1e-15)


def test_self_and_plus_random_commands_take_one_model_and_replay(tmp_path):
    a = save(tmp_path, "a.safetensors", sd1(0, torch.float32))
    out = tmp_path / "o.safetensors"
    assert run("plus-random", a, "--alpha", "0.1", "--seed", "3", "-o", str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "r.safetensors"), "-q") == 0
    assert (tmp_path / "r.safetensors").read_bytes() == out.read_bytes()
    assert json.loads(load_file_metadata(out)["sdadapt_merge_recipe"])["step"]["seed"] == 3
    assert run("self", a, "--alpha", "0.5", "--elemental", "IN04::1", "-o", str(tmp_path / "s.safetensors"), "-q") == 0
    with pytest.raises(InputError, match="self takes 1 input"):
        merge_state_dicts(MergeStep("self", ("a", "b"), alpha=0.5), [sd1(0), sd1(1)])
