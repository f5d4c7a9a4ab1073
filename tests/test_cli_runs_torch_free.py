"""Command lines that reach a command's run function and stop there with a usage message import no torch:
``python -m sdadapt merge`` alone (its help, exit 2), an unknown or random ``--alpha`` / ``--lam`` preset name, an
unreadable ``--presets FILE``, a missing ``-o``. Every run goes through :func:`sdadapt.cli.options.terminate_as_interrupt`
(whose handler bookkeeping is :mod:`sdadapt.held_signals`, torch-free) and the presets are
:mod:`sdadapt.merge_presets` (torch-free; :mod:`sdadapt.merge.presets` re-exports it)."""

from __future__ import annotations

import json
import subprocess
import sys

# (each command line in one fresh interpreter; whether torch was imported after it)
from test_cli_startup import _CLI_RUNNER, SRC, _env


def test_merge_usage_errors_found_in_the_run_and_bare_merge_import_no_torch(tmp_path):
    presets = tmp_path / "mine.txt"
    presets.write_text("MINE\t" + ",".join(["0.5"] * 26) + "\nRAND\t" + ",".join(["R"] * 26) + "\n", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    out = str(tmp_path / "out.safetensors")
    cases = {  # argv -> what the one error line says (None: bare merge, its help on stderr)
        ("merge",): None,
        ("merge", "weighted-sum", "A", "B", "--alpha", "NOPE", "-o", out):
            "argument --alpha: invalid float value: 'NOPE' (not a number, comma-separated numbers or a preset name in "
            "supermerger's built-in presets: GRAD_V, GRAD_A,",
        ("merge", "ties", "BASE", "M1", "--density", "0.2", "--lam", "ALL_R", "-o", out):
            "argument --lam: ALL_R is supermerger's random preset",
        ("merge", "weighted-sum", "A", "B", "--alpha", "GRAD_V", "--presets", str(presets), "-o", out):
            "argument --alpha: invalid float value: 'GRAD_V' (not a number, comma-separated numbers or a preset name "
            "in the presets file: MINE)",
        ("merge", "weighted-sum", "A", "B", "--alpha", "RAND", "--presets", str(presets), "-o", out):
            "argument --alpha: preset 'RAND' in the presets file holds supermerger's random entries",
        ("merge", "weighted-sum", "A", "B", "--alpha", "0.3", "--presets", str(missing), "-o", out):
            f"{missing}: cannot read the presets file",
        ("merge", "weighted-sum", "A", "B", "--alpha", "0.3"):
            "merge weighted-sum needs -o OUT (the file to write), after the inputs",
        ("merge", "-o", out, "weighted-sum", "A", "B", "--alpha", "0.3"):
            "-o before the operator name apply to --recipe only; put them after it",
        ("merge", "--recipe", "r.json"): "merge --recipe needs -o OUT (the file to write)",
        ("merge", "--help"): None,
    }
    argvs = [list(argv) for argv in cases]
    done = subprocess.run([sys.executable, "-c", _CLI_RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          check=False, timeout=300, env={**_env(), "PYTHONPATH": str(SRC), "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert [argv for argv, *_ in results] == argvs
    for argv, code, torch_loaded, text in results:
        line = " ".join(argv)
        assert not torch_loaded, f"python -m sdadapt {line} imported torch"
        want = cases[tuple(argv)]
        if want is None:
            continue
        assert code == 2 and text.count("\n") == 1 and text.startswith("error: "), (line, text)
        assert want in text, (line, text)
    by_argv = {" ".join(argv): (code, text) for argv, code, _, text in results}
    assert by_argv["merge"][0] == 2 and by_argv["merge --help"][0] == 0
    assert by_argv["merge"][1] == by_argv["merge --help"][1]  # bare merge: its help (on stderr), exit 2


def test_the_torch_free_homes_are_the_objects_the_old_names_give():
    """The names that always were importable from sdadapt.merge.presets and sdadapt.formats.files are the
    torch-free modules' own objects (one definition, no copy)."""
    from sdadapt import held_signals, merge_presets
    from sdadapt.formats import files
    from sdadapt.merge import presets

    assert presets.__all__ == merge_presets.__all__
    assert all(getattr(presets, name) is getattr(merge_presets, name) for name in merge_presets.__all__)
    assert files.signals_held is held_signals.signals_held and "signals_held" in files.__all__
    assert not hasattr(files, "_put_back")  # (one copy of the put-back loop: held_signals.put_back)


def test_the_registry_operator_takes_the_spec_fields_defaults_and_checks():
    """``Operator`` (fn first: ``Operator(fn, inputs, options, ...)``) declares ``OperatorSpec``'s fields with the same
    defaults, and refuses a bad declaration with the spec's messages (one ``__post_init__``, in
    ``OperatorDeclaration``)."""
    from dataclasses import fields

    import pytest

    from sdadapt.merge.operators import Operator, weighted_sum
    from sdadapt.merge_tables import OperatorOption, OperatorSpec

    spec_defaults = {f.name: f.default for f in fields(OperatorSpec)}
    operator_defaults = {f.name: f.default for f in fields(Operator)}
    assert {name: operator_defaults[name] for name in spec_defaults} == spec_defaults
    assert [f.name for f in fields(Operator)][:3] == ["fn", "inputs", "options"]
    alpha = OperatorOption("alpha", float)
    op = Operator(weighted_sum, "ab", (alpha,))
    assert (op.fn, op.inputs, op.options, op.input_names, op.spec) == (
        weighted_sum, "ab", (alpha,), ("A", "B"), OperatorSpec("ab", (alpha,)))
    for declare in (Operator, lambda *a: OperatorSpec(*a[1:])):
        with pytest.raises(ValueError, match=r"Operator.inputs must be one of a, ab, abc, base\+models, got 'abcd'"):
            declare(weighted_sum, "abcd")
        with pytest.raises(ValueError, match=r"Operator options repeat a name: \['alpha', 'alpha'\]"):
            declare(weighted_sum, "ab", (alpha, OperatorOption("alpha", float)))
