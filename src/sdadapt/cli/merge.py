"""``python -m sdadapt merge ...``: checkpoint merges from the shell.

    python -m sdadapt merge weighted-sum A B --alpha 0.3 -o OUT
    python -m sdadapt merge add-difference A B C --alpha 1.0 -o OUT
    python -m sdadapt merge ties BASE M1 M2 [M3 ...] --density 0.2 -o OUT   (--lam 1, or one per block / a preset)
    python -m sdadapt merge dare BASE M1 M2 [...] --drop 0.9 --seed 0 -o OUT
    python -m sdadapt merge slerp A B --alpha 0.5 -o OUT
    python -m sdadapt merge cosine-a A B --alpha "0,0.2,...,1" -o OUT   (26/20 values, BASE first: one per block)
    python -m sdadapt merge block-weighted A B [C] --weights "0,1,...,1" -o OUT
    python -m sdadapt merge --recipe FILE -o OUT

One sub-command per registered operator, made from its declaration (inputs, options with their
types, defaults and help: :func:`operator_declarations`), so a new operator is a new command with no
code here. The parsers are built from the torch-free :data:`sdadapt.merge_tables.OPERATOR_SPECS`, so
``merge --help``, each operator's ``--help`` and usage errors import no torch. ``--alpha``, ``--beta``
and ``--lam`` take one number, one per block (supermerger's MBW list, BASE first) or a supermerger
preset name (:func:`per_block_fields`, the recipe's ``block_weights`` / ``block_beta``; ``--presets FILE``
replaces the built-in presets); ``block-weighted`` is weighted sum / add difference with one alpha per
UNet block (also 25/19 values plus --base-alpha). Heavy imports happen inside the run functions.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import Any

from .options import (
    BooleanFlag,
    add_output_options,
    dtype_name,
    numbers,
    progress_bar,
    safe_text,
)

__all__ = ["register", "operator_dest", "operator_declarations", "number_or_blocks", "per_block_fields",
           "PER_BLOCK_HELP", "PresetName"]


def operator_declarations() -> Mapping[str, Any]:
    """Every merge operator's name -> its declaration (inputs, options, help text; an
    :class:`~sdadapt.merge_tables.OperatorDeclaration`), in ``merge --help``'s order: the built-in ones'
    :data:`sdadapt.merge_tables.OPERATOR_SPECS` (torch-free, so that ``--help`` and usage errors import no torch),
    or, once :mod:`sdadapt.merge.operators` is imported (an operator added at run time,
    ``OPERATORS[name] = Operator(...)``, needs it), its registry :data:`~sdadapt.merge.operators.OPERATORS`."""
    from ..merge_tables import OPERATOR_SPECS

    registry = sys.modules.get(f"{__name__.rsplit('.', 2)[0]}.merge.operators")
    if registry is None or not hasattr(registry, "OPERATORS"):  # (not imported, or half-imported)
        return OPERATOR_SPECS
    return registry.OPERATORS


def operator_dest(name: str) -> str:
    """The argparse attribute of operator option ``name`` (prefixed: never collides with the shared ones)."""
    return f"op_{name}"


def _policy(args: argparse.Namespace):
    from ..merge.recipe import KeyPolicy

    components = tuple(c.strip() for c in args.components.split(",") if c.strip()) if args.components else None
    return KeyPolicy(
        components=components or KeyPolicy().components,
        ema="copy" if args.keep_ema else "prune",
        only_in_others="copy" if args.copy_extra_keys else "drop",
        reset_position_ids=args.reset_position_ids,
        discard=args.discard,
        exclude=args.exclude,
        include=args.include,
    )


def _run(step, args: argparse.Namespace, *, out: str, quiet: bool, overwrite: bool, save_recipe: bool,
         known_hashes=None, verify: bool = False) -> int:
    from ..merge.engine import merge_file

    progress = None if quiet else progress_bar(args, f"merge {step.operator}", unit="tensor")
    started = time.perf_counter()
    report = merge_file(step, out, overwrite=overwrite, save_recipe=save_recipe, device=args.device,
                        progress=progress, known_hashes=known_hashes, verify_hashes=verify,
                        allow_nonfinite=getattr(args, "allow_nonfinite", False))
    print(safe_text(report.summary(), keep_newlines=True))
    print(f"wrote {safe_text(out)} in {time.perf_counter() - started:.1f} s")
    return 0


def _step(args: argparse.Namespace, operator: str, inputs: list[str], **fields: Any):
    from ..merge.recipe import MergeStep

    return MergeStep(operator=operator, inputs=tuple(inputs), dtype=dtype_name(args.dtype),
                     compute_dtype=args.compute_dtype, policy=_policy(args), elemental=args.elemental,
                     adjust=args.adjust, **fields)


#: the per-block form of ``--alpha`` / ``--beta`` / ``--lam`` (supermerger's MBW weights text: BASE first)
PER_BLOCK_HELP = ("or one per block, comma-separated, BASE first: 26 values for SD1/SD2 (BASE, IN00..IN11, M00, "
                  "OUT00..OUT11) or 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08; also SD1's 26, reduced, or "
                  "110, one per SDXL layer), as supermerger's MBW weights (BASE = text encoders and VAE); or a "
                  "supermerger preset name (GRAD_V, FLAT_25, WRAP08, ...; --presets FILE for your own list)")

#: operator option -> the MergeStep field its per-block list goes to (alpha/beta: its BASE value stays the
#: option's value; lam: the list is the per-block lam itself, the lam option left at 1)
_PER_BLOCK_FIELD = {"alpha": "block_weights", "beta": "block_beta", "lam": "block_weights"}

#: the list lengths an operator command takes (the engine checks them against the model: 20/110 SDXL only)
_BLOCK_COUNTS = (26, 20, 110)


class PresetName(str):
    """A per-block option given as a preset name (resolved by :func:`per_block_fields`)."""

    __slots__ = ()


def number_or_blocks(text: str) -> float | tuple[float, ...] | PresetName:
    """argparse type of ``--alpha``, ``--beta`` and ``--lam``: one number (a float), comma-separated
    per-block values (a tuple; the count is checked by :func:`per_block_fields`) or, as supermerger
    reads a weights text without a comma, a preset name (a :class:`PresetName`)."""
    if "," not in text:
        try:
            value = float(text)
        except ValueError:
            if not text.strip():
                raise argparse.ArgumentTypeError("expected a number, comma-separated numbers or a preset name; "
                                                 "got an empty string") from None
            return PresetName(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value
    return numbers(text)


def per_block_fields(values: dict[str, Any], *, presets: Mapping[str, str] | None = None) -> dict[str, tuple[float, ...]]:
    """Move per-block ``--alpha`` / ``--beta`` / ``--lam`` lists out of ``values`` (one code path for all).

    ``values``: option name -> parsed value. A preset name (:class:`PresetName`) is first replaced by
    its values from ``presets`` (a :func:`sdadapt.merge_presets.parse_presets` table; default
    supermerger's built-in list), as supermerger's ``wpreseter`` does. A tuple of 26 (SD1/SD2), 20
    (SDXL) or 110 (SDXL, one per layer) values, BASE first, becomes the step field ``block_weights``
    / ``block_beta`` (the recipe's spelling, the engine's one path). ``alpha`` / ``beta``: the BASE
    value stays the option's value, as supermerger records ``base_alpha`` / ``base_beta``. ``lam``:
    the list is the per-block lam (``block_weights`` scales lam, so lam itself is left out, i.e. 1).

    Returns:
        ``{"block_weights": ..., "block_beta": ...}`` for the lists given (``values`` is updated in place).

    Raises:
        ValueError: an unknown or random preset name, a list of another length (the message says
            which counts fit, why 25/19 do not, and that 61 is supermerger's Flux list).
    """
    from ..merge.blocks import FLUX_VALUES
    from ..merge_presets import resolve_preset

    fields: dict[str, tuple[float, ...]] = {}
    for name, field_name in _PER_BLOCK_FIELD.items():
        given = values.get(name)
        if isinstance(given, PresetName):
            given = resolve_preset(given, presets=presets, option=f"--{name}")
        if not isinstance(given, tuple):
            continue
        if len(given) not in _BLOCK_COUNTS:
            hint = (f"; {len(given)} is the UNet blocks alone: put BASE's {name} first" if len(given) in (19, 25)
                    else f"; {FLUX_VALUES} values are supermerger's Flux list (CLIP, T5, IN, D00..D18, S00..S37, OUT), "
                    "and sdadapt merges SD1/SD2/SDXL" if len(given) == FLUX_VALUES else "")
            raise ValueError(f"--{name} takes one number {PER_BLOCK_HELP}; got {len(given)} values{hint}")
        if name == "lam":
            del values[name]
        else:
            values[name] = given[0]
        fields[field_name] = given
    return fields


def _cmd_operator(args: argparse.Namespace) -> int:
    from ..merge.operators import ENGINE_OPTIONS, STEP_FIELDS, get_operator

    op = get_operator(args.operator)
    values = {o.name: getattr(args, operator_dest(o.name)) for o in op.options}
    for name in ENGINE_OPTIONS & set(values):  # left out at their default: the recipe stays as before they existed
        if values[name] == op.option(name).default:
            del values[name]
    blocks = per_block_fields(values, presets=_presets(args))  # (names: resolved by the parser, --presets read there)
    fields = {name: values.pop(name) for name in STEP_FIELDS if name in values}
    inputs = [args.base, *args.models] if op.variadic else [getattr(args, n.lower()) for n in op.input_names]
    step = _step(args, args.operator, inputs, options=values, **fields, **blocks)
    return _run(step, args, out=args.out, quiet=args.quiet, overwrite=args.overwrite, save_recipe=not args.no_recipe)


def _resolve_preset_names(args: argparse.Namespace) -> None:
    """Replace preset names in ``--alpha`` / ``--beta`` / ``--lam`` by their values (in place)."""
    named = [(operator_dest(n), f"--{n}") for n in _PER_BLOCK_FIELD
             if isinstance(getattr(args, operator_dest(n), None), PresetName)]
    if getattr(args, "presets", None) and getattr(args, "operator_run", None) is _cmd_block:
        raise ValueError("argument --presets: block-weighted --weights takes numbers only; for a preset name use "
                         "weighted-sum / add-difference --alpha NAME --presets FILE")
    presets = _presets(args)  # (read whenever given: a mistyped path is an error even when no name uses it)
    if named:
        # (torch-free: an unknown name is refused without torch)
        from ..merge_presets import resolve_preset

        for dest, flag in named:
            setattr(args, dest, resolve_preset(getattr(args, dest), presets=presets, option=f"argument {flag}"))


def _presets(args: argparse.Namespace) -> dict[str, str] | None:
    """``--presets FILE`` read (it replaces the built-in list, as supermerger's mbwpresets.txt does)."""
    if not getattr(args, "presets", None):
        return None
    from ..merge_presets import read_presets

    return read_presets(args.presets)


def _cmd_block(args: argparse.Namespace) -> int:
    inputs = [args.a, args.b] + ([args.c] if args.c else [])
    operator = "add-difference" if args.c else "weighted-sum"
    step = _step(args, operator, inputs, alpha=None, block_weights=args.weights, base_alpha=args.base_alpha)
    return _run(step, args, out=args.out, quiet=args.quiet, overwrite=args.overwrite, save_recipe=not args.no_recipe)


def _cmd_merge(args: argparse.Namespace) -> int:
    if getattr(args, "operator_run", None) is not None:
        given = [flag for flag, value in (("-o", args.recipe_out), ("--overwrite", args.recipe_overwrite),
                                          ("-q", args.recipe_quiet), ("--dtype", args.recipe_dtype != "keep"),
                                          ("--no-verify", args.no_verify),
                                          ("--allow-nonfinite", args.recipe_allow_nonfinite)) if value]
        if given:
            raise ValueError(f"{' '.join(given)} before the operator name apply to --recipe only; put them after it: "
                             f"merge {args.operator} ... {' '.join(given)}")
        if not args.out:
            raise ValueError(f"merge {args.operator} needs -o OUT (the file to write), after the inputs")
        return int(args.operator_run(args))
    if not args.recipe:
        args.merge_parser.print_help(sys.stderr)
        return 2
    if not args.recipe_out:
        raise ValueError("merge --recipe needs -o OUT (the file to write)")
    from dataclasses import replace

    from ..merge.recipe import load_recipe

    step, hashes = load_recipe(args.recipe)
    if args.recipe_dtype != "keep":
        step = replace(step, dtype=dtype_name(args.recipe_dtype))
    args.device = args.device or "cpu"
    args.allow_nonfinite = args.recipe_allow_nonfinite
    return _run(step, args, out=args.recipe_out, quiet=args.recipe_quiet, overwrite=args.recipe_overwrite,
                save_recipe=True, known_hashes=hashes, verify=not args.no_verify)


def _settings(parser: argparse.ArgumentParser) -> None:
    """The merge-only settings every merge sub-command takes (after the shared output options)."""
    # (-o is checked in _cmd_merge, not by argparse: an -o written before the operator name went to --recipe, and
    # the message says so only when it did)
    output = add_output_options(parser, out_help="output .safetensors file (written atomically; required)",
                                required=False, dtype_help="the first input's dtype, per tensor")
    output.add_argument("--no-recipe", action="store_true",
                        help="do not store the recipe / input hashes in the file (skips hashing the inputs)")
    group = parser.add_argument_group("merge settings")
    group.add_argument("--compute-dtype", choices=["fp32", "fp64"], default="fp32", help="dtype the math runs in")
    group.add_argument("--device", default="cpu", help="compute device, e.g. cuda (tensors move one at a time)")
    group.add_argument("--components", default=None,
                       help="comma list of parts to merge: unet,text_encoder,text_encoder_2,vae,image_encoder (default "
                       "all; image_encoder: SD 2.1 unCLIP's embedder); the others are copied from the first input")
    group.add_argument("--keep-ema", action="store_true", help="keep the first input's model_ema.* (default: pruned)")
    group.add_argument("--copy-extra-keys", action="store_true",
                       help="copy keys only later inputs have (default: dropped, as A1111 does)")
    group.add_argument("--reset-position-ids", action="store_true",
                       help="write CLIP position_ids as 0..n-1 (fixes files broken by older mergers)")
    group.add_argument("--discard", default=None, metavar="REGEX",
                       help="drop output keys matching REGEX (re.search; matched in linear time: no backreferences "
                       "or lookaround)")
    group.add_argument("--allow-nonfinite", action="store_true",
                       help="let NaN/inf already in an input pass through unchanged (default: refused, naming the "
                       "tensor); NaN/inf the merge itself produces is always refused")
    group.add_argument("--elemental", default=None, metavar="RULES",
                       help="supermerger elemental merge: 'BLOCKS:ELEMENTS:RATIO' rules, separated by commas or "
                       "newlines, e.g. \"IN04 IN05:attn2:0.5\" (blocks by space, ranges IN04-IN07, NOT inverts; "
                       "elements are key substrings; blank = all); applied after block weights, later rules win")
    group.add_argument("--exclude", default=None, metavar="RULES",
                       help="supermerger's Exclude: keys matching any 'BLOCKS:ELEMENTS' rule keep the first input, e.g. "
                       "\"IN04 OUT05:, :attn2\" (blocks as --elemental; elements are key substrings; BASE = text "
                       "encoders and VAE; the VAE alone: --components)")
    group.add_argument("--include", default=None, metavar="RULES",
                       help="supermerger's Include: only keys matching a 'BLOCKS:ELEMENTS' rule are merged, the others "
                       "keep the first input")
    group.add_argument("--presets", default=None, metavar="FILE",
                       help="block-weight presets file in supermerger's mbwpresets.txt format (NAME<TAB>values lines; "
                       "NAME:values too); it replaces the built-in supermerger list for the preset names the per-block "
                       "strengths (alpha, beta, lam) take")
    group.add_argument("--adjust", default=None, type=numbers, metavar="A,B,C,D,E,F,G,H",
                       help="supermerger's Adjust: 8 numbers (detail in, detail out, contrast, brightness, 4 colours; "
                       "fewer are padded with 0) that rescale the UNet's conv_in/out.0/out.2 after the merge")


_INPUT_HELP = {
    "A": "first model: decides the output's keys, naming and (with --dtype keep) dtypes",
    "B": "second model",
    "C": "the model the difference B - C is taken from",
    "BASE": "the model the task vectors MODEL - BASE are taken from; decides the output's keys and dtypes",
    "MODEL": "fine-tuned models",
}


#: the sub-commands ``block-weighted`` runs with one alpha per block (with C: add difference)
_BLOCK_COMMAND = {"weighted-sum": "A B", "add-difference": "A B C"}

#: block-weight flags of other tools (supermerger's MBW, block-weighted's own) a user may give an operator command
_BLOCK_FLAGS = ("--block-weights", "--mbw", "--base-alpha")


def _block_hint(name: str) -> str:
    """Where per-block weights go for operator ``name`` (a block-weight flag of another tool was given)."""
    blocks = ("26 values for SD1/SD2 (BASE, IN00..IN11, M00, OUT00..OUT11); 20, 26 (reduced) or 110 (one per layer) "
              "for SDXL; BASE first")
    names = operator_declarations()[name].option_names
    if "alpha" in names:
        same = (f", the same as block-weighted {_BLOCK_COMMAND[name]} --weights W,W,..." if name in _BLOCK_COMMAND
                else "; in a recipe: \"block_weights\"")
        also = " (and --beta the same way)" if "beta" in names else ""
        return f"{name} takes one --alpha or one per block: --alpha W,W,... ({blocks}){also}{same}"
    if "lam" not in names:
        return f"{name} has no strength to set per block (no alpha or lam), so it takes no block weights"
    return (f"{name} takes one --lam (block weights scale it) or one per block: --lam W,W,... ({blocks}) or a "
            "preset name; in a recipe: \"block_weights\"")


def _strength_hint(name: str, flag: str) -> str:
    """What operator ``name`` takes instead of ``flag`` (``--alpha`` / ``--beta``, which it does not have)."""
    names = operator_declarations()[name].option_names
    if "lam" in names:
        return (f"{name} has no {flag.lstrip('-')}; its strength is --lam: one number, one per block (W,W,..., 26 "
                "values for SD1/SD2; 20, 26 or 110 for SDXL; BASE first) or a preset name")
    if "alpha" in names:
        return f"{name} has no {flag.lstrip('-')}; it takes --alpha (one number, one per block or a preset name)"
    return f"{name} has no strength setting (no alpha, beta or lam): its result depends on its inputs alone"


class _StrengthElsewhere(argparse.Action):
    """``--alpha`` / ``--beta`` on an operator without it: stop at once, saying what the operator takes."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        parser.error(f"{option_string}: {_strength_hint(self.dest.removeprefix('misplaced_'), option_string or '')}")


class _BlockWeightsElsewhere(argparse.Action):
    """A block-weight flag the operator's command does not take: stop at once (before argparse
    reports the missing ``--alpha``) and say which command or recipe field takes it."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        parser.error(f"{option_string}: {_block_hint(self.dest.removeprefix('misplaced_'))}")


def _operator_parser_class(merge: argparse.ArgumentParser) -> type:
    """The operator commands' parser class: preset names resolved once every flag is read."""

    class OperatorParser(type(merge)):  # type: ignore[misc]
        def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
            # preset names resolve once every flag is read (--presets may come after them): an unknown
            # name is a usage error, before anything is opened
            namespace, extras = super().parse_known_args(args, namespace)
            try:
                _resolve_preset_names(namespace)
            except ValueError as exc:
                self.error(str(exc))
            return namespace, extras

    return OperatorParser


def _add_operator_option(group: argparse._ArgumentGroup, option) -> None:
    """One declared :class:`~sdadapt.merge_tables.OperatorOption` as a command-line flag."""
    kwargs: dict[str, Any] = {"dest": operator_dest(option.name)}
    default_text = " (required)" if option.required else "" if option.default is None else f" (default {option.default})"
    if option.per_model:
        kwargs.update(type=numbers, default=None, metavar="W,W,...")
    elif option.name in _PER_BLOCK_FIELD and option.type is float:  # number, list or preset: per_block_fields
        kwargs.update(type=number_or_blocks, required=option.required, default=None if option.required else option.default,
                      metavar=f"{option.name.upper()}[,...]")
        default_text += "; " + PER_BLOCK_HELP
    elif option.type is bool:
        kwargs.update(action=BooleanFlag, default=option.default)
        default_text = f" (default --{'' if option.default else 'no-'}{option.name.replace('_', '-')})"
    else:
        kwargs.update(type=option.type, choices=option.choices, required=option.required,
                      default=None if option.required else option.default)
        if option.choices is None:
            kwargs["metavar"] = option.name.upper()
    group.add_argument(option.flag, help=option.help + default_text, **kwargs)


def _add_operator_command(ops: argparse._SubParsersAction, name: str, op) -> argparse.ArgumentParser:
    inputs = " ".join(op.input_names) + (" [MODEL ...]" if op.variadic else "")
    parser = ops.add_parser(name, help=op.summary, description=f"{op.description}  Inputs: {inputs}.")
    if op.variadic:
        parser.add_argument("base", metavar="BASE", help=_INPUT_HELP["BASE"])
        parser.add_argument("models", metavar="MODEL", nargs="+",
                            help=f"{_INPUT_HELP['MODEL']} (at least {op.min_models})")
    else:
        for input_name in op.input_names:
            parser.add_argument(input_name.lower(), metavar=input_name,
                                help=(op.input_help or {}).get(input_name, _INPUT_HELP[input_name]))
    if op.options:
        group = parser.add_argument_group(f"{name} options")
        for option in op.options:
            _add_operator_option(group, option)
    taken = {flag for action in parser._actions for flag in action.option_strings}
    for flag in (*_BLOCK_FLAGS, "--weights"):  # --weights: block-weighted's (the task-vector operators declare theirs)
        if flag not in taken:
            parser.add_argument(flag, action=_BlockWeightsElsewhere, dest=f"misplaced_{name}", nargs="?",
                                help=argparse.SUPPRESS)  # (any value: the hint, not "not a number")
    for flag in ("--alpha", "--beta"):
        if flag not in taken:
            parser.add_argument(flag, action=_StrengthElsewhere, dest=f"misplaced_{name}", nargs="?",
                                help=argparse.SUPPRESS)
    _settings(parser)
    parser.set_defaults(operator_run=_cmd_operator)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``merge`` and its sub-commands (one per registered operator, :func:`operator_declarations`) to the
    ``python -m sdadapt`` parser."""

    merge = subparsers.add_parser(
        "merge",
        help="merge checkpoints (weighted sum, add difference, TIES, DARE, SLERP, block weights, recipes)",
        description="Merge whole checkpoints tensor by tensor in bounded memory, writing a .safetensors file with "
        "its recipe (A1111 sd_merge_recipe + a replayable sdadapt recipe). alpha is the weight of the SECOND "
        "model (A1111); ComfyUI's ratio is 1 - alpha. Without an OPERATOR: replay --recipe.",
    )
    merge.add_argument("--recipe", default=None, metavar="FILE",
                       help="replay a recipe: its .json, or a merged .safetensors that carries one")
    merge.add_argument("--no-verify", action="store_true",
                       help="with --recipe: do not check the inputs' sha256 against the recorded ones")
    merge.add_argument("--allow-nonfinite", action="store_true", dest="recipe_allow_nonfinite",
                       help="with --recipe: let NaN/inf already in an input pass through (default: refused)")
    merge.add_argument("--device", default=None, help=argparse.SUPPRESS)
    add_output_options(merge, out_help="output .safetensors file of --recipe", required=False,
                       dtype_help="the dtype the recipe records", dest_prefix="recipe_")
    merge.set_defaults(run=_cmd_merge, operator_run=None, merge_parser=merge)
    ops = merge.add_subparsers(dest="operator", metavar="OPERATOR", parser_class=_operator_parser_class(merge))
    for name, op in operator_declarations().items():
        _add_operator_command(ops, name, op)

    p = ops.add_parser(
        "block-weighted", help="weighted sum (or add difference with C) with one alpha per UNet block",
        description="Block-weighted merge: --weights gives one alpha per block, BASE first: 26 values for SD1/SD2 "
        "(BASE, IN00..IN11, M00, OUT00..OUT11) or 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08); 25/19 "
        "without BASE plus --base-alpha. BASE covers the text encoders and VAE; time_embed/label_emb count as "
        "IN00, the final out layers as the last OUT block. With C: A + alpha_block*(B - C). The same as "
        "weighted-sum / add-difference --alpha W,W,... (26/20 values, BASE first).",
    )
    p.add_argument("a", metavar="A", help=_INPUT_HELP["A"])
    p.add_argument("b", metavar="B", help=_INPUT_HELP["B"])
    p.add_argument("c", metavar="C", nargs="?", default=None, help="optional: add difference A + alpha*(B - C)")
    group = p.add_argument_group("block-weighted options")
    group.add_argument("--weights", type=numbers, required=True, metavar="W,W,...",
                       help='block alphas, comma-separated, e.g. "0,1,1,...,1" (a preset name: weighted-sum / '
                       'add-difference --alpha NAME)')
    group.add_argument("--base-alpha", type=float, default=None, help="BASE alpha when --weights has no BASE value")
    _settings(p)
    p.set_defaults(operator_run=_cmd_block)
