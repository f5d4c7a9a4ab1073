"""The options every command shares, the numbers type, the progress bar, and merge commands made
from the operators' declarations (so a new command or operator is covered without editing here)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdadapt.cli import build_parser, main
from sdadapt.cli.merge import number_or_blocks, operator_dest
from sdadapt.cli.options import DTYPE_CHOICES, ExtendNumbers, ProgressBar, close_progress, numbers
from sdadapt.merge.engine import merge_state_dicts
from sdadapt.merge.operators import OPERATORS, REQUIRED, Operator, OperatorOption, weighted_sum
from sdadapt.merge.recipe import MergeStep
from test_merge_engine import U, load_file_metadata, mini, save

#: commands that only read (no output options); every other command must take the shared ones
READ_ONLY = {"inspect"}
#: the settings every merge sub-command shares, beyond its operator's declared options
MERGE_SHARED = {"help", "out", "overwrite", "quiet", "dtype", "no_recipe", "compute_dtype", "device", "components",
                "keep_ema", "copy_extra_keys", "reset_position_ids", "discard", "allow_nonfinite", "elemental",
                "adjust", "exclude", "include", "presets"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every parser below the root: ``(("merge", "ties"), parser)``, ..."""
    for name, child in _subparsers(parser).items():
        yield (*path, name), child
        yield from _walk(child, (*path, name))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return parser._option_string_actions.get(flag)


COMMANDS = dict(_walk(build_parser()))


def test_the_walk_sees_every_command():
    names = {" ".join(path) for path in COMMANDS}
    assert {"inspect", "demo", "train", "extract-lora", "resize-lora", "merge-lora", "combine-loras", "merge",
            "merge block-weighted"} <= names
    assert {f"merge {name}" for name in OPERATORS} <= names
    assert READ_ONLY <= names  # a stale entry here would excuse nothing


@pytest.mark.parametrize("path", [p for p in COMMANDS if " ".join(p) not in READ_ONLY], ids=" ".join)
def test_every_writing_command_has_the_shared_output_options(path):
    parser = COMMANDS[path]
    out, long_out = _option(parser, "-o"), _option(parser, "--out")
    assert out is not None and out is long_out and out.metavar == "OUT"
    overwrite = _option(parser, "--overwrite")
    assert isinstance(overwrite, argparse._StoreTrueAction) and overwrite.default is False
    quiet = _option(parser, "-q")
    assert isinstance(quiet, argparse._StoreTrueAction) and quiet is _option(parser, "--quiet") and quiet.default is False
    dtype = _option(parser, "--dtype")
    assert dtype is not None and tuple(dtype.choices) == DTYPE_CHOICES == ("keep", "fp32", "fp16", "bf16")
    assert dtype.default == "keep" and "default keep" in dtype.help
    for old in ("--save-dtype", "--save_dtype"):
        assert _option(parser, old) is None


def test_read_only_commands_take_no_output_options():
    for name in READ_ONLY:
        parser = COMMANDS[(name,)]
        assert all(_option(parser, flag) is None for flag in ("-o", "--overwrite", "--dtype"))


def test_every_list_of_numbers_uses_the_one_numbers_type():
    seen = 0
    for path, parser in COMMANDS.items():
        for action in parser._actions:
            if set(action.option_strings) & {"--weights", "--scale", "--block-weights"} and action.help != argparse.SUPPRESS:
                # (a hidden flag of a command that does not take it takes any value: its error names the right command)
                assert action.type is numbers, (path, action.option_strings)
                seen += 1
    assert seen >= 7  # ties/dare/task-arithmetic/block-weighted --weights, two --scale, --block-weights


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("text, want", [
    ("1", (1.0,)), ("0,1, 0.5", (0.0, 1.0, 0.5)), ("-1,2e-1", (-1.0, 0.2)), (" 3 ,4 ", (3.0, 4.0)),
])
def test_numbers_parses(text, want):
    assert numbers(text) == want


@pytest.mark.parametrize("text, named", [
    ("", "empty string"), ("1,,2", "empty item 2"), ("1,", "empty item 2"), ("a", "'a' is not a number"),
    ("1,x,3", "'x' is not a number"), ("nan", "'nan' is not a finite"), ("1,-inf", "'-inf' is not a finite"),
    ("1;2", "'1;2' is not a number"),
])
def test_numbers_rejects_with_a_message_naming_the_item(text, named):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        numbers(text)
    assert named in str(info.value)


def test_numbers_on_the_command_line(capsys):
    parse = build_parser().parse_args
    args = parse(["merge-lora", "BASE", "L1", "L2", "--scale", "1,0.5", "-o", "o.safetensors"])
    assert args.scale == (1.0, 0.5) and args.loras == ["L1", "L2"]
    assert parse(["merge-lora", "BASE", "L1", "L2", "--scale", "1", "-0.5", "-o", "o"]).scale == (1.0, -0.5)
    assert parse(["combine-loras", "L1", "L2", "--scale=-1,0.5", "-o", "o"]).scale == (-1.0, 0.5)
    assert parse(["combine-loras", "L1", "-o", "o"]).scale == (1.0,)
    args = parse(["merge-lora", "BASE", "L1", "--block-weights", "1,0", "--block-weights", "0,1", "-o", "o"])
    assert args.block_weights == [(1.0, 0.0), (0.0, 1.0)]
    assert parse(["merge", "ties", "B", "M1", "M2", "--weights", "0.5,2", "-o", "o"]).op_weights == (0.5, 2.0)
    assert parse(["merge", "block-weighted", "A", "B", "--weights", "0,1", "-o", "o"]).weights == (0.0, 1.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["merge", "ties", "B", "M1", "M2", "--weights", "1,x", "-o", "o.safetensors"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --weights" in err and "'x' is not a number" in err
    with pytest.raises(SystemExit):
        main(["merge-lora", "BASE", "L1", "--scale", "1,,2", "-o", "o.safetensors"])
    assert "argument --scale" in capsys.readouterr().err


def test_extend_numbers_is_what_the_scale_options_use():
    for path in (("merge-lora",), ("combine-loras",)):
        action = _option(COMMANDS[path], "--scale")
        assert isinstance(action, ExtendNumbers) and action.nargs == "+"


# ------------------------------------------------------------------------------------- progress bar
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_builtin_bar_prints_count_rate_and_eta_to_stderr_only(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    clock = Clock()
    bar = ProgressBar("job", unit="tensor", clock=clock, min_interval=0.0)
    bar(1, 4, "first.key")  # t = 0: no rate yet
    clock.now += 4.0
    bar(2, 4, 0.25)  # 2 done in 4 s: 0.5 tensor/s, 2 left: ETA 0:04
    clock.now += 2.0
    bar(3, 4)
    clock.now += 100.0
    bar(4, 4)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.split("\r")
    assert "job [" in lines[1] and "1/4" in lines[1] and "? tensor/s" in lines[1] and "first.key" in lines[1]
    assert "2/4" in lines[2] and "0.5 tensor/s" in lines[2] and "ETA 0:04" in lines[2] and "loss=0.25" in lines[2]
    assert "3/4" in lines[3] and "ETA 0:02" in lines[3]
    assert "4/4" in lines[4] and "ETA 0:00" in lines[4] and "in 1:46" in lines[4] and err.endswith("\n")
    assert err.count("\n") == 1


def test_builtin_bar_redraws_at_most_every_min_interval(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    clock = Clock()
    bar = ProgressBar("job", clock=clock, min_interval=1.0)
    for i in range(1, 101):
        clock.now += 0.05
        bar(i, 100)
    err = capsys.readouterr().err
    assert err.count("\r") <= 10 and "100/100" in err  # 5 s of work, ~1 redraw a second, and the last always


def test_close_progress_ends_a_half_drawn_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = ProgressBar("job", min_interval=0.0)
    bar(1, 3)
    close_progress()
    err = capsys.readouterr().err
    assert err.endswith("\n") and "1/3" in err
    close_progress()  # nothing open: nothing written
    assert capsys.readouterr().err == ""


def test_tqdm_bar_when_installed_goes_to_stderr(capsys):
    pytest.importorskip("tqdm")
    bar = ProgressBar("job", unit="step")
    bar(1, 2, 0.5)
    bar(2, 2, 0.25)
    out, err = capsys.readouterr()
    assert out == "" and "job" in err and "2/2" in err and "loss=0.25" in err


def test_a_command_without_tqdm_draws_the_builtin_bar_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    a, b = (save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("ab"))
    assert main(["merge", "weighted-sum", a, b, "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "\r" not in out and "ETA" not in out
    assert "merge weighted-sum [" in err and "tensor/s" in err and "ETA" in err and err.endswith("\n")
    assert main(["merge", "weighted-sum", a, b, "--alpha", "0.5", "-o", str(tmp_path / "q.safetensors"), "-q"]) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------- merge commands from declarations
def _declared_vs_parser(name: str, op: Operator, parser: argparse.ArgumentParser) -> None:
    positionals = [a for a in parser._actions if not a.option_strings]
    assert [a.metavar for a in positionals] == list(op.input_names)
    if op.variadic:
        assert positionals[-1].nargs == "+"
    generated = {a.dest: a for a in parser._actions if a.dest.startswith("op_")}
    assert set(generated) == {operator_dest(o.name) for o in op.options}, name
    others = {a.dest for a in parser._actions if a.option_strings and not a.dest.startswith("op_")
              and a.help != argparse.SUPPRESS}  # (hidden: other tools' block-weight flags, answered with a hint)
    assert others == MERGE_SHARED, name  # nothing hand-written beside the declaration
    for option in op.options:
        action = generated[operator_dest(option.name)]
        assert option.flag in action.option_strings
        assert option.help in action.help
        if option.per_model:
            assert action.type is numbers and action.default is None
        elif option.type is bool:
            assert isinstance(action, argparse.BooleanOptionalAction) and action.default is option.default
        elif option.name in ("beta", "lam"):  # one number, a per-block list or a preset (cli.merge.per_block_fields)
            assert action.type is number_or_blocks and action.required is option.required
        else:  # (--alpha: a float, and a comma list names where per-block alphas go: cli.merge._one_alpha)
            assert action.type is option.type or option.name == "alpha" and action.type("0.25") == 0.25
            assert action.required is option.required
            assert action.default == (None if option.required else option.default)
            assert (tuple(action.choices) if action.choices else None) == option.choices


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_operator_has_a_generated_command_matching_its_declaration(name):
    _declared_vs_parser(name, OPERATORS[name], COMMANDS[("merge", name)])


def test_command_defaults_are_the_declared_defaults():
    for name, op in OPERATORS.items():
        inputs = ["A", "B", "C"][: len(op.input_names)] if not op.variadic else ["BASE", "M1", "M2"]
        required = [arg for o in op.options if o.required for arg in (o.flag, "0.5")]
        args = build_parser().parse_args(["merge", name, *inputs, *required, "-o", "o.safetensors"])
        for option in op.options:
            want = 0.5 if option.required else option.default
            assert getattr(args, operator_dest(option.name)) == want, (name, option.name)


def _scaled_sum(tensors, weights, *, base=None, gain: float = 1.0, compute_dtype=torch.float32):
    return weighted_sum(tensors, weights, compute_dtype=compute_dtype).mul_(gain)


def test_a_new_operator_is_a_new_command_and_recipe_option(tmp_path, monkeypatch, capsys):
    op = Operator(_scaled_sum, "ab", (OperatorOption("alpha", float, REQUIRED, "weight of B"),
                                      OperatorOption("gain", float, 1.0, "multiplies the result")),
                  summary="gain*((1-alpha)*A + alpha*B)", description="A scaled weighted sum (test).")
    monkeypatch.setitem(OPERATORS, "scaled-sum", op)
    parser = dict(_walk(build_parser()))[("merge", "scaled-sum")]
    _declared_vs_parser("scaled-sum", op, parser)
    a, b = (save(tmp_path, f"{n}.safetensors", mini(i, dtype=torch.float32)) for i, n in enumerate("ab"))
    out = tmp_path / "o.safetensors"
    assert main(["merge", "scaled-sum", a, b, "--alpha", "0.25", "--gain", "2", "-o", str(out), "-q"]) == 0
    key = U + "out.2.weight"
    want = 2 * (0.75 * load_file(a)[key] + 0.25 * load_file(b)[key])
    assert torch.allclose(load_file(str(out))[key], want)
    step = json.loads(load_file_metadata(out)["sdadapt_merge_recipe"])["step"]
    assert step["operator"] == "scaled-sum" and step["options"] == {"gain": 2.0} and step["alpha"] == 0.25
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["merge", "scaled-sum", a, b, "-o", str(out)])  # --alpha is declared required
    assert "--alpha" in capsys.readouterr().err


# ------------------------------------------------------------------------------- recipe validation
def test_a_recipe_with_an_undeclared_option_is_refused_naming_it(tmp_path, capsys):
    files = [save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abc")]
    merged = tmp_path / "ties.safetensors"
    assert main(["merge", "ties", *files, "--density", "0.5", "-o", str(merged), "-q"]) == 0
    recipe = json.loads(load_file_metadata(merged)["sdadapt_merge_recipe"])
    recipe["step"]["options"]["sharpness"] = 3
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    capsys.readouterr()
    assert main(["merge", "--recipe", str(path), "-o", str(tmp_path / "replay.safetensors")]) == 3  # WeightFileError
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "'sharpness'" in err and "ties has no option" in err and "density" in err  # names it and what is allowed
    assert not (tmp_path / "replay.safetensors").exists()


@pytest.mark.parametrize("kwargs, named", [
    ({"operator": "ties", "options": {"sharpness": 3}}, "'sharpness'"),
    ({"operator": "weighted-sum", "alpha": 0.5, "seed": 3}, "'seed'"),  # only random operators take a seed
    ({"operator": "ties", "alpha": 0.5}, "'alpha'"),  # task-vector operators take lam, not alpha
    ({"operator": "model-stock", "weights": (1.0, 1.0)}, "'weights'"),
    ({"operator": "ties", "options": {"density": "0.2"}}, "'density' must be a number"),
    ({"operator": "dare", "options": {"consensus": "vote"}, "seed": 0}, "'consensus' must be one of"),
    ({"operator": "dare", "options": {"seed": 1}}, "step field"),
    ({"operator": "no-such-op"}, "unknown merge operator"),
])
def test_merge_steps_are_checked_against_the_declaration(kwargs, named):
    kwargs = dict(kwargs)
    inputs = ("a", "b", "c")
    with pytest.raises(ValueError) as info:
        MergeStep(inputs=inputs, **kwargs)
    assert named in str(info.value)


def test_the_engine_checks_options_with_the_same_declaration():
    from sdadapt.merge import operators as ops
    from sdadapt.merge.engine import DictSource, MergedSource

    key = U + "out.2.weight"
    states = [{key: torch.randn(4, 6, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    step = MergeStep("ties", ("base", "m1", "m2"), options={"density": 1})  # an int where a float is declared: fine
    merged, _ = merge_state_dicts(step, states)
    assert torch.equal(merged[key], ops.ties([states[1][key], states[2][key]], base=states[0][key], density=1.0))
    step.options["sharpness"] = 3  # the options dict can change after the step was checked
    with pytest.raises(ValueError, match="ties has no option 'sharpness'"):
        MergedSource(step, sources=[DictSource(s, name=n) for s, n in zip(states, step.inputs)])
