"""Options that only apply with another one are refused when given alone (one usage error, exit 2)
instead of being silently ignored; given with it, or left out, they parse as before."""

from __future__ import annotations

import argparse

import pytest

from sdadapt.cli import build_parser, main
from sdadapt.cli.option_rules import CheckedParser, only_with

# (command line without the dependent option, the dependent option's tokens, text the fix names)
REFUSED = [
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-steps", "5"], "--aesthetic FILE"),
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-lr", "1e-4"], "--aesthetic FILE"),
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-weight", "0.5"], "--aesthetic FILE"),
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-slerp"], "--aesthetic FILE"),
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-text", "warm"], "--aesthetic FILE"),
    (["generate", "--prompt", "x", "-o", "x.png"], ["--aesthetic-clip", "clip/"], "--aesthetic FILE"),
    (["invert", "i.png", "--prompt", "p", "-o", "x.png"], ["--source-steps", "3"], "--edit-prompt TEXT"),
    (["invert", "i.png", "--prompt", "p", "--method", "ddim", "-o", "x.png"], ["--init", "null"], "another --method"),
    (["merge-custom-diffusion", "a", "b", "--model", "toy", "--reg-prompts", "r.txt", "-o", "x.safetensors"],
     ["--reg-count", "50"], "--reg-prompts FILE replaces"),
    (["merge-custom-diffusion", "a", "b", "--model", "toy", "--reg-prompts", "r.txt", "-o", "x.safetensors"],
     ["--seed", "0"], "--reg-prompts FILE replaces"),
    (["extract-lora", "a", "b", "-o", "x.safetensors"], ["--niter", "2"], "--randomized"),
    (["extract-lora", "a", "b", "-o", "x.safetensors"], ["--conv-alpha", "1"], "--conv-rank R"),
    (["extract-lora", "a", "b", "-o", "x.safetensors"], ["--dynamic-param", "0.9"], "--dynamic-method METHOD"),
    (["resize-lora", "a", "-o", "x.safetensors"], ["--dynamic-param", "0.9"], "--dynamic-method METHOD"),
    (["combine-loras", "a", "b", "-o", "x.safetensors"], ["--dynamic-param", "0.9"], "--dynamic-method METHOD"),
]


@pytest.mark.parametrize("argv,option,fix", REFUSED, ids=[f"{r[0][0]} {r[1][0]}" for r in REFUSED])
def test_an_option_without_the_one_it_needs_is_a_usage_error(argv, option, fix, capsys):
    code = _main_exit([*argv, *option])  # a default value counts as given too (--aesthetic-steps 5, --seed 0)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: python -m sdadapt {argv[0]}: {option[0]} ") and fix in err
    assert err.count("\n") == 1 and "--help" in err


def _main_exit(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits from inside main's parse
        return exc.code


def test_with_what_they_need_the_options_parse_to_their_values():
    parse = build_parser().parse_args
    args = parse(["generate", "--prompt", "x", "-o", "x.png", "--aesthetic", "a.pt", "--aesthetic-steps", "7",
                  "--aesthetic-slerp", "--aesthetic-clip", "clip/"])
    assert (args.aesthetic, args.aesthetic_steps, args.aesthetic_slerp, args.aesthetic_clip) == ("a.pt", 7, True, "clip/")
    args = parse(["invert", "i.png", "--prompt", "p", "-o", "x.png", "--edit-prompt", "q", "--source-steps", "3",
                  "--init", "negative-prompt"])
    assert (args.source_steps, args.init) == (3, "negative-prompt")
    args = parse(["merge-custom-diffusion", "a", "b", "--model", "toy", "--reg-count", "50", "--seed", "1", "-o", "x.safetensors"])
    assert (args.reg_count, args.seed) == (50, 1)
    args = parse(["extract-lora", "a", "b", "-o", "x.safetensors", "--randomized", "--niter", "3", "--conv-rank", "2",
                  "--conv-alpha", "1", "--dynamic-method", "sv_fro", "--dynamic-param", "0.9"])
    assert (args.niter, args.conv_alpha, args.dynamic_param) == (3, 1.0, 0.9)


def test_left_out_they_keep_their_documented_defaults():
    args = build_parser().parse_args(["generate", "--prompt", "x", "-o", "x.png"])
    assert (args.aesthetic_steps, args.aesthetic_lr, args.aesthetic_weight, args.aesthetic_slerp) == (5, 1e-4, 0.9, False)
    assert args.aesthetic_text is None and args.aesthetic_clip is None
    args = build_parser().parse_args(["merge-custom-diffusion", "a", "b", "--model", "toy", "-o", "x.safetensors"])
    assert (args.reg_count, args.seed) == (200, 0)
    args = build_parser().parse_args(["extract-lora", "a", "b", "-o", "x.safetensors"])
    assert (args.niter, args.conv_alpha, args.dynamic_param) == (2, None, None)


def test_rules_on_a_plain_parser_are_refused_and_string_defaults_get_their_type():
    with pytest.raises(TypeError, match="CheckedParser"):
        only_with(argparse.ArgumentParser(), ["--x"], needs="--y", when=lambda a: True)
    parser = CheckedParser(prog="p")
    parser.add_argument("--y")
    parser.add_argument("--x", type=int, default="7")
    parser.add_argument("--many", action="append")
    with pytest.raises(ValueError, match="no option --z"):
        only_with(parser, ["--z"], needs="--y", when=lambda a: True)
    with pytest.raises(ValueError, match="append or count"):
        only_with(parser, ["--many"], needs="--y", when=lambda a: True)
    only_with(parser, ["--x"], needs="--y", when=lambda a: a.y is not None)
    assert parser.parse_args([]).x == 7 and parser.parse_args(["--y", "1", "--x", "3"]).x == 3


def test_train_options_that_need_another_are_reported_not_refused(tmp_path, capsys):
    # kohya configs (and the GUIs writing them) carry keep_tokens, num_cycles and the bucket options whatever the
    # other setting is, and kohya runs them: the run report says which ones do nothing
    import torch

    from sdadapt.images import write_png
    from sdadapt.jobs import TrainOptions

    TrainOptions(images=str(tmp_path), keep_tokens=1)
    TrainOptions(images=str(tmp_path), lr_scheduler_num_cycles=3)
    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    out = tmp_path / "l.safetensors"
    # (--no-prior: sampling class images was most of this test's time; the notes do not depend on it)
    assert main(["train", "lora", "--images", str(images), "--model", "toy", "--no-bucket", "--min-bucket-reso", "16",
                 "--bucket-no-upscale", "--keep-tokens", "2", "--steps", "1", "--batch-size", "1", "--no-prior",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--min-bucket-reso, --bucket-no-upscale: not used without bucketing (--no-bucket)" in err
    assert "--keep-tokens 2: not used without --shuffle-caption or --caption-tag-dropout-rate" in err
    config = tmp_path / "c.toml"
    config.write_text(f'train_data_dir = "{images.as_posix()}"\nlr_scheduler_num_cycles = 4\nmax_train_steps = 1\n'
                      'train_batch_size = 1\nshuffle_caption = true\nkeep_tokens = 1\n')
    assert main(["train", "lora", "--config", str(config), "--model", "toy", "-o", str(tmp_path / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "--lr-scheduler-num-cycles 4: not used by --lr-scheduler" in err and "--keep-tokens" not in err


def test_merge_allow_nonfinite_before_the_operator_is_not_dropped(capsys):
    # the operator's own --allow-nonfinite (default off) used to overwrite the one given before its name
    assert main(["merge", "--allow-nonfinite", "weighted-sum", "A", "B", "--alpha", "0.5", "-o", "x.safetensors"]) == 2
    assert "--allow-nonfinite before the operator name apply to --recipe only" in capsys.readouterr().err
    args = build_parser().parse_args(["merge", "weighted-sum", "A", "B", "--alpha", "0.5", "-o", "x.safetensors",
                                      "--allow-nonfinite"])
    assert args.allow_nonfinite is True and args.recipe_allow_nonfinite is False


def test_a_namespace_given_to_the_parse_and_suppressed_defaults_keep_argparse_behaviour():
    parser = CheckedParser(prog="p")
    parser.add_argument("--y")
    parser.add_argument("--x", type=int, default="3")
    parser.add_argument("--s", type=int, default=argparse.SUPPRESS)
    parser.set_defaults(t=9)
    parser.add_argument("--t", type=int, default=argparse.SUPPRESS)
    only_with(parser, ["--x", "--s", "--t"], needs="--y", when=lambda a: a.y is not None)
    # typed, an option is given even when the caller's namespace already held a value for it
    for option in (["--x", "5"], ["--s", "1"], ["--t", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(option, namespace=argparse.Namespace(x=None, s=None, t=None))
    # not typed: the namespace's value stays, as argparse leaves it
    args = parser.parse_args([], namespace=argparse.Namespace(x="kept"))
    assert args.x == "kept" and not hasattr(args, "s") and args.t == 9
    # SUPPRESS: the attribute stays out (it was handed to the option's type as '==SUPPRESS==')
    args = parser.parse_args(["--y", "1"])
    assert vars(args) == {"y": "1", "x": 3, "t": 9}
    assert vars(parser.parse_args(["--y", "1", "--s", "4"])) == {"y": "1", "x": 3, "s": 4, "t": 9}
    plain = argparse.ArgumentParser()
    for action in parser._actions[1:]:
        plain._add_action(action)
    plain.set_defaults(t=9)
    assert vars(plain.parse_args(["--y", "1"])) == vars(parser.parse_args(["--y", "1"]))
