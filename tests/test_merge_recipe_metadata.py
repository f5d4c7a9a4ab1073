"""``sd_merge_recipe`` carries supermerger's own names for what A1111's dict lacks.

The reference is a transcription of supermerger's writer (hako-mikan/sd-webui-supermerger
``scripts/mergers/mergers.py``, ``smerge``: the MBW text parsing and the ``merge_recipe`` dict);
the fields sdadapt records must read the same there.
"""

from __future__ import annotations

import json

import pytest

from sdadapt.merge.recipe import KeyPolicy, MergeStep, a1111_metadata

SUPERMERGER_NAMES = ("base_alpha", "base_beta", "weights_alpha", "weights_beta", "weights_alpha_orig",
                     "weights_beta_orig", "mbw", "elemental_merge")


def supermerger_recipe(weights_a: str, weights_b: str, base_alpha: float, base_beta: float, useblocks: bool,
                       usebeta: bool, deep: str, calcmode: str = "normal") -> dict:
    """supermerger ``smerge``'s handling of these inputs up to ``merge_recipe`` (SD1/SDXL, no XL conversion)."""
    if len(deep) > 0:
        deep = deep.replace("\n", ",")
        deep = deep.replace(calcmode + ",", "")
        deep = deep.split(",")
    weights_a_excluded = [float(w) for w in weights_a.split(',')] if useblocks else [None] * 110
    weights_b_excluded = [float(w) for w in weights_b.split(',')] if useblocks and usebeta else [None] * 110
    if useblocks:
        weights_a_t = weights_a.split(',', 1)
        weights_b_t = weights_b.split(',', 1)
        base_alpha = float(weights_a_t[0])
        weights_a = [float(w) for w in weights_a_t[1].split(',')]
        if usebeta:
            base_beta = float(weights_b_t[0])
            weights_b = [float(w) for w in weights_b_t[1].split(',')]
        if len(weights_a) == 19:
            weights_a = weights_a + [0]
        if len(weights_b) == 19:
            weights_b = weights_b + [0]
    weights_a_excluded = ",".join(str(x) for x in weights_a_excluded if x is not None)
    weights_b_excluded = ",".join(str(x) for x in weights_b_excluded if x is not None)
    return {
        "type": "sd-webui-supermerger",
        "weights_alpha": weights_a if useblocks else None,
        "weights_beta": weights_b if useblocks else None,
        "weights_alpha_orig": weights_a_excluded if useblocks else None,
        "weights_beta_orig": weights_b_excluded if useblocks else None,
        "base_alpha": base_alpha,
        "base_beta": base_beta,
        "mbw": useblocks,
        "elemental_merge": deep,
        "calcmode": calcmode,
    }


def _written(step: MergeStep) -> dict:
    meta = a1111_metadata(step, hashes={"a": "1" * 64, "b": "2" * 64, "c": "3" * 64}, legacy_hashes={},
                          input_metadata={})
    return json.loads(meta["sd_merge_recipe"])


SD1_A = [round(0.04 * i, 2) for i in range(26)]
SD1_B = [round(1 - 0.03 * i, 2) for i in range(26)]
XL_A = [round(0.05 * i, 2) for i in range(20)]


@pytest.mark.parametrize("case", ["scalars", "blocks", "blocks-25", "xl-blocks", "alpha-blocks-only", "elemental"])
def test_supermerger_fields_read_as_supermerger_writes_them(case):
    text = lambda values: ",".join(str(v) for v in values)  # noqa: E731
    deep = ""
    if case == "scalars":
        step = MergeStep("triple-sum", ("a", "b", "c"), alpha=0.3, options={"beta": 0.2})
        ref = supermerger_recipe("", "", 0.3, 0.2, False, False, "")
    elif case == "blocks":
        step = MergeStep("triple-sum", ("a", "b", "c"), block_weights=tuple(SD1_A), block_beta=tuple(SD1_B),
                         options={"beta": SD1_B[0]})
        ref = supermerger_recipe(text(SD1_A), text(SD1_B), 0.0, 0.0, True, True, "")
    elif case == "blocks-25":  # sdadapt's BASE-less form: BASE from base_alpha / options["beta"]
        step = MergeStep("sum-twice", ("a", "b", "c"), block_weights=tuple(SD1_A[1:]), base_alpha=SD1_A[0],
                         block_beta=tuple(SD1_B[1:]), options={"beta": SD1_B[0]})
        ref = supermerger_recipe(text(SD1_A), text(SD1_B), 0.0, 0.0, True, True, "")
    elif case == "xl-blocks":
        step = MergeStep("weighted-sum", ("a", "b"), block_weights=tuple(XL_A))
        ref = supermerger_recipe(text(XL_A), "", 0.0, 0.0, True, False, "")
    elif case == "alpha-blocks-only":
        step = MergeStep("triple-sum", ("a", "b", "c"), block_weights=tuple(SD1_A), options={"beta": 0.4})
        ref = supermerger_recipe(text(SD1_A), "", 0.0, 0.4, True, False, "")
    else:
        deep = "IN04 IN05:attn2:0.5\nOUT02:proj:0.25,NOT M00:norm:1"
        step = MergeStep("weighted-sum", ("a", "b"), alpha=0.5, elemental=deep)
        ref = supermerger_recipe("", "", 0.5, 0.0, False, False, deep)
    got = _written(step)
    assert "beta" not in got  # the old, unread name
    for name in SUPERMERGER_NAMES:
        if name in got:
            assert got[name] == ref[name], name
    written = {n for n in SUPERMERGER_NAMES if n in got}
    if case == "elemental":
        assert written == {"elemental_merge"}  # a plain weighted sum stays A1111's dict plus the rules
    else:
        assert {"base_alpha"} <= written
        assert ("base_beta" in written) == ("beta" in step.options)
        assert ("mbw" in written) == (case not in ("scalars",))
    # A1111's own fields are still there, as modules/extras.py writes them
    assert got["multiplier"] == step.alpha and got["primary_model_hash"] == "1" * 64 and got["type"] == "sdadapt"


def test_plain_weighted_sum_has_only_a1111_fields():
    got = _written(MergeStep("weighted-sum", ("a", "b"), alpha=0.5, policy=KeyPolicy()))
    a1111 = {"type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method",
             "multiplier", "save_as_half", "custom_name", "config_source", "bake_in_vae", "discard_weights",
             "is_inpainting", "is_instruct_pix2pix"}
    assert a1111 <= set(got) and not (set(SUPERMERGER_NAMES) & set(got))
