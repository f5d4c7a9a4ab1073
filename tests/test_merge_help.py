"""``python -m sdadapt merge --help``, every operator's ``--help`` and merge's usage errors without torch.

The operators' declarations (names, inputs, options, help text, defaults) live in the torch-free
:mod:`sdadapt.merge_tables`; :mod:`sdadapt.merge.operators` binds each to its function by name. Checked here:

* in one fresh interpreter, ``merge --help``, ``merge OPERATOR --help`` for every operator and merge's usage errors
  (the hints of ``--beta`` / ``--mbw`` on an operator without them, a missing input, a misspelt flag) leave torch
  unimported, and print word for word what the same command lines print once ``sdadapt.merge.operators`` (the
  registry, with torch) is imported — the parsers then read :data:`~sdadapt.merge.operators.OPERATORS`;
* paragraphs of that help captured from the tree before the split (:data:`CAPTURED`);
* every built-in operator of the registry is its spec bound to a function (the same option objects, in the same
  order), and the command line reads the registry once it is imported (an operator added at run time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import sdadapt
from sdadapt.cli.merge import operator_declarations
from sdadapt.merge_tables import OPERATOR_SPECS, OperatorOption, OperatorSpec

SRC = Path(sdadapt.__file__).resolve().parents[1]  # (the tree under test, also for the fresh interpreter)

#: paragraphs of merge's help text as the tree before the split printed them (commit fc56c15, COLUMNS=100), the
#: operators' parsers built from sdadapt.merge.operators: (command line, how the paragraph begins) -> the paragraph
CAPTURED = {
    ('merge --help', 'positional arguments:'): (
        'positional arguments:\n'
        '  OPERATOR\n'
        '    weighted-sum        (1-alpha)*A + alpha*B\n'
        '    slerp               spherical interpolation of A and B\n'
        '    add-difference      A + alpha*(B - C)\n'
        '    difference          alpha*(A - B)\n'
        '    add                 A + alpha*B\n'
        '    train-difference    A + 1.8*alpha*w*(B - C)\n'
        '    task-arithmetic     BASE + lam*sum(w_i*(M_i - BASE))\n'
        '    ties                TIES: trim, elect sign, disjoint mean\n'
        '    dare                DARE: random drop and rescale\n'
        '    model-stock         Model Stock: interpolate the mean toward BASE\n'
        '    triple-sum          (1-alpha-beta)*A + alpha*B + beta*C\n'
        '    sum-twice           (1-beta)*((1-alpha)*A + alpha*B) + beta*C\n'
        '    cosine-a            supermerger cosineA: per-column lerp(B, A, k) from the similarity\n'
        '    cosine-b            supermerger cosineB: per-column lerp(B, A, k) from the similarity\n'
        '    smooth-add          A + alpha*gauss(median(B - C))\n'
        '    extract             A + lerp(B-A, C-A, alpha)*lerp(d, 1-d, beta)\n'
        "    tensor              rows [beta*n, (alpha+beta)*n) of A replaced by B's\n"
        "    tensor2             columns [beta*n, (alpha+beta)*n) of A replaced by B's\n"
        '    self                A*alpha (supermerger self)\n'
        '    plus-random         A + alpha*N(0,1) (supermerger plus random)\n'
        '    weighted-subtraction\n'
        '                        (A - alpha*beta*B)/(1 - alpha*beta)\n'
        '    euclidean-add-difference\n'
        '                        C + the RMS of the normalised A-C, B-C, at the norm of lerp(A, B, alpha) -\n'
        '                        C\n'
        '    multiply-difference\n'
        '                        C + |A-C|^(1-alpha)*|B-C|^alpha, signed by lerp(A, B, beta) - C\n'
        '    similarity-add-difference\n'
        '                        lerp(A + alpha*(B-C), lerp(A, B, alpha/2), beta*similarity(A, B))\n'
        "    top-k-tensor-sum    A's values rearranged in B's order on a band of magnitudes\n"
        '    distribution-crossover\n'
        '                        FFT crossover of A and B sorted by C\n'
        '    ties-add-difference\n'
        '                        C + alpha*TIES(top-beta(A-C), top-beta(B-C))\n'
        "    rotate              A's neurons turned toward B's by alpha of their Procrustes rotation\n"
        '    block-weighted      weighted sum (or add difference with C) with one alpha per UNet block'
    ),
    ('merge ties --help', 'TIES-merging'): (
        'TIES-merging: trim every task vector (MODEL - BASE) to its top --density by magnitude (paper\n'
        'default 0.2), elect the sign of their sum, average the agreeing entries, add lam times that to\n'
        'BASE. Inputs: BASE MODEL [MODEL ...].'
    ),
    ('merge ties --help', 'ties options:'): (
        'ties options:\n'
        '  --density DENSITY     kept fraction of each task vector, by magnitude (default 0.2)\n'
        '  --lam LAM[,...]       scale of the merged task vector (default 1.0); or one per block, comma-\n'
        '                        separated, BASE first: 26 values for SD1/SD2 (BASE, IN00..IN11, M00,\n'
        '                        OUT00..OUT11) or 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08; also\n'
        "                        SD1's 26, reduced, or 110, one per SDXL layer), as supermerger's MBW\n"
        '                        weights (BASE = text encoders and VAE); or a supermerger preset name\n'
        '                        (GRAD_V, FLAT_25, WRAP08, ...; --presets FILE for your own list)\n'
        '  --weights W,W,...     one weight per MODEL, comma-separated (default 1 each)\n'
        '  --normalize, --no-normalize\n'
        "                        average the agreeing entries (TIES' disjoint mean); --no-normalize sums\n"
        '                        them (default --normalize)'
    ),
    ('merge cosine-a --help', 'supermerger calcmode'): (
        'supermerger calcmode cosineA (Weight sum): a first pass over every key pools the similarity of A\n'
        'and B (the column cosine of the column-normalised tensors), drops the values below the 1st and\n'
        'above the 99th percentile and keeps s_min/s_max; then per key k = clip((s - s_min)/(s_max - s_min)\n'
        '- |alpha|, 0, 1) per column, result lerp(B, A, k): similar columns keep A, alpha pushes toward B.\n'
        'VAE keys stay A, and so does a key where A or B is all zeros (the similarity is 0/0 there:\n'
        'supermerger writes NaN; the report lists them). Inputs: A B.'
    ),
    ('merge triple-sum --help', 'positional arguments:'): (
        'positional arguments:\n'
        "  A                     first model: decides the output's keys, naming and (with --dtype keep)\n"
        '                        dtypes\n'
        '  B                     second model\n'
        '  C                     third model'
    ),
}

#: merge's usage errors, each with what its one line must say (parsed before any file is opened)
USAGE_ERRORS = {
    ("merge", "ties"): "the following arguments are required: BASE, MODEL",
    ("merge", "nosuch"): "argument OPERATOR: invalid choice: 'nosuch'",
    ("merge", "weighted-sum", "A", "B", "--beta", "1"): "weighted-sum has no beta; it takes --alpha",
    ("merge", "ties", "A", "B", "--alpha", "1"): "ties has no alpha; its strength is --lam",
    ("merge", "model-stock", "A", "B", "C", "--alpha", "1"): "model-stock has no strength setting",
    ("merge", "weighted-sum", "A", "B", "--mbw", "x"): "the same as block-weighted A B --weights",
    ("merge", "ties", "A", "B", "--block-weights", "x"): "ties takes one --lam (block weights scale it)",
    ("merge", "model-stock", "A", "B", "C", "--base-alpha", "1"): "model-stock has no strength to set per block",
    ("merge", "dare", "A", "B", "--consensus", "vote", "-o", "x"): "argument --consensus: invalid choice: 'vote'",
    ("merge", "weighted-sum", "A", "B", "-o", "x", "--alpha", "0.5", "--alpah", "1"): "did you mean --alpha?",
}

_RUNNER = """
import contextlib, io, json, runpy, sys
def run(argvs):
    results = []
    for argv in argvs:
        sys.argv = ["sdadapt", *argv]
        out, err = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module("sdadapt", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code
        results.append([code, "torch" in sys.modules, out.getvalue() + err.getvalue()])
    return results
argvs = json.loads(sys.argv[1])
free = run(argvs)                       # the parsers from sdadapt.merge_tables
import sdadapt.merge.operators          # the registry (torch): the parsers now read OPERATORS
full = run(argvs)
print(json.dumps({"free": free, "full": full}))
"""


def _paragraph(text: str, start: str) -> str:
    found = [block for block in text.split("\n\n") if block.startswith(start)]
    assert len(found) == 1, (start, text)
    return found[0]


def test_merge_help_and_usage_errors_are_torch_free_and_print_what_the_registry_prints():
    helps = [["merge", "--help"]] + [["merge", name, "--help"] for name in [*OPERATOR_SPECS, "block-weighted"]]
    argvs = helps + [list(argv) for argv in USAGE_ERRORS]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          check=False, timeout=300, env={**env, "PYTHONPATH": str(SRC), "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for argv, (code, torch_loaded, text), (full_code, _, full_text) in zip(argvs, results["free"], results["full"]):
        line = " ".join(argv)
        assert not torch_loaded, f"python -m sdadapt {line} imported torch"
        assert (code, text) == (full_code, full_text), line  # the spec tables print what the registry prints
        if argv in helps:
            assert code == 0 and text.startswith(f"usage: python -m sdadapt {' '.join(argv[:-1])} "), line
        else:
            assert code == 2 and text.count("\n") == 1 and text.startswith("error: "), (line, text)
            assert USAGE_ERRORS[tuple(argv)] in text, (line, text)
    texts = {" ".join(argv): text for argv, (_, _, text) in zip(argvs, results["free"])}
    for (line, start), want in CAPTURED.items():
        assert _paragraph(texts[line], start) == want, line
    for name, spec in OPERATOR_SPECS.items():  # every declaration reaches its command's help
        text = " ".join(texts[f"merge {name} --help"].split())
        assert " ".join(spec.description.split()) in text and f"Inputs: {' '.join(spec.input_names)}" in text, name
        assert all(option.flag in text for option in spec.options), name


def test_every_builtin_operator_is_its_spec_bound_to_a_function():
    from sdadapt.merge import operators

    assert list(operators.OPERATORS) == list(OPERATOR_SPECS)  # (merge --help's order)
    for name, spec in OPERATOR_SPECS.items():
        op = operators.OPERATORS[name]
        assert op.spec == spec and op.options is spec.options, name  # one declaration, not a copy
        assert all(getattr(op, f.name) is getattr(spec, f.name) for f in fields(OperatorSpec)), name
        assert callable(op.fn) and op.fn is not None, name
        assert operators.get_operator(name) is op
        assert (op.input_names, op.variadic, op.option_names, op.keyword_options, op.random) == (
            spec.input_names, spec.variadic, spec.option_names, spec.keyword_options, spec.random), name
    assert operators.OPERATORS["ties"].fn is operators.ties and operators.OPERATORS["self"].skip is not None
    assert operators.OPERATORS["cosine-a"].prepass is not None and operators.OPERATORS["cosine-b"].keep_first
    # the names the library always had are the tables' objects
    assert operators.OperatorOption is OperatorOption and sdadapt.merge.OperatorOption is OperatorOption
    assert operators.REQUIRED is sdadapt.merge_tables.REQUIRED and operators.WEIGHTS_CLIP.name == "weights_clip"
    with pytest.raises(ValueError, match="Operator.inputs must be one of"):
        OperatorSpec("abcd")
    with pytest.raises(ValueError, match="repeat a name"):
        OperatorSpec("ab", (OperatorOption("alpha", float), OperatorOption("alpha", float)))


def test_the_command_line_reads_the_registry_once_it_is_imported(monkeypatch):
    from sdadapt.merge import operators

    assert operator_declarations() is operators.OPERATORS  # (an operator added at run time is a command)
    monkeypatch.delitem(sys.modules, "sdadapt.merge.operators")
    assert operator_declarations() is OPERATOR_SPECS
