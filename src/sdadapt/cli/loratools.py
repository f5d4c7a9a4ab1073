"""``python -m sdadapt extract-lora | resize-lora | merge-lora | combine-loras | cut-dylora``.

Thin argparse shells over :mod:`sdadapt.loratools`; heavy imports happen when a command runs.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..plurals import plural
from .option_rules import only_with
from .options import (
    ExtendNumbers,
    add_output_options,
    numbers,
    progress_bar,
    safe_text,
    torch_dtype,
)

__all__ = ["register"]

_BASE_MODELS = ("sd1", "sd2", "sd2-v", "sdxl")


def _clamp(value: float) -> float | None:
    return None if value >= 1.0 else value


def _summary(report, verb: str) -> str:
    if not report.layers:
        return f"{verb} {safe_text(report.path)}: no layers, base model {report.base_model}"
    by_component: dict[str, int] = {}
    for name in report.layers:
        component = name.split(":", 1)[0]
        by_component[component] = by_component.get(component, 0) + 1
    ranks = sorted({info.rank for info in report.layers.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    parts = ", ".join(f"{safe_text(c)} {n}" for c, n in by_component.items())
    line = (f"{verb} {safe_text(report.path)}: {plural(len(report.layers), 'layer')} ({parts}), rank {rank_text}, "
            f"base model {report.base_model}")
    worst = report.worst_layer()
    if worst is not None:
        line += f"\nlargest relative error ‖Δ − LoRA‖/‖Δ‖ = {worst[1]:.3g} ({safe_text(worst[0])})"
    return line


#: per reason, how many skipped layers :func:`skipped_lines` names (the rest are counted)
_NAMES_SHOWN = 3
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def skipped_lines(skipped: dict[str, str], *, names: int = _NAMES_SHOWN) -> list[str]:
    """``report.skipped`` (``{"component:layer": reason}``) as one line per reason: the count, the reason and the first
    ``names`` layers (``extract-lora`` on a checkpoint whose text encoder did not change skips its 70-200 layers for
    one reason; they were one line each). Reasons that differ in one number only (``max |Δ| = 3e-06 <= min_layer_diff
    0.01``) are one reason, that number shown as the values it took (``max |Δ| = 0 or 3e-06``; from four values on as
    their range, ``max |Δ| = 0..0.0004``). Reasons that differ in two numbers or more (a max |Δ| and the --min-diff
    that keeps it, a shape's sides) stay one line each: ranges taken one number at a time would pair values no
    layer had (``(320..640, 320..640)`` for the shapes (320, 640) and (640, 320))."""
    groups: dict[str, list[tuple[str, str, list[str]]]] = {}
    for name, reason in skipped.items():
        template = _NUMBER.sub("{}", reason.replace("{", "{{").replace("}", "}}"))
        groups.setdefault(template, []).append((name, reason, _NUMBER.findall(reason)))
    lines = []
    for template, members in groups.items():
        columns = list(zip(*(numbers for _, _, numbers in members)))
        varying = [i for i, column in enumerate(columns) if len({float(v) for v in column}) > 1]
        if len(varying) > 1:  # numbers that belong together: each reason as it is
            exact: dict[str, list[str]] = {}
            for name, reason, _ in members:
                exact.setdefault(reason, []).append(name)
            lines.extend(_skipped_line(reason, layers, names) for reason, layers in exact.items())
            continue
        texts = [column[0] for column in columns]
        for i in varying:  # (each value as the reasons wrote it)
            written = {float(v): v for v in reversed(columns[i])}
            distinct = [written[v] for v in sorted(written)]
            texts[i] = (f"{distinct[0]}..{distinct[-1]}" if len(distinct) > 3 else
                        " or ".join(distinct) if len(distinct) == 2 else
                        f"{distinct[0]}, {distinct[1]} or {distinct[2]}")
        lines.append(_skipped_line(template.format(*texts), [name for name, _, _ in members], names))
    return lines


def _skipped_line(reason: str, layers: list[str], names: int) -> str:
    shown = ", ".join(safe_text(name) for name in layers[:names])
    more = f", ... ({len(layers) - names} more)" if len(layers) > names else ""
    return f"  {len(layers)} × {safe_text(reason)}: {shown}{more}"


def _print_skipped(report) -> None:
    if not report.skipped:
        return
    print(f"skipped {len(report.skipped)} layer(s):", file=sys.stderr)
    for line in skipped_lines(report.skipped):
        print(line, file=sys.stderr)


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..loratools.extract import extract_lora

    report = extract_lora(
        args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank, alpha=args.alpha,
        conv_alpha=args.conv_alpha, method=args.dynamic_method or "fixed", param=args.dynamic_param,
        clamp_quantile=_clamp(args.clamp_quantile), min_diff=args.min_diff, min_layer_diff=args.min_layer_diff,
        split=args.split, randomized=args.randomized, niter=args.niter, device=args.device,
        base_model=args.base_model, dtype=torch_dtype(args.dtype), overwrite=args.overwrite,
        progress=progress_bar(args, "extract", unit="layer"),
    )
    _print_skipped(report)
    print(_summary(report, "wrote"))
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from ..loratools.resize import resize_lora

    report = resize_lora(
        args.lora, args.out, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method or "fixed",
        param=args.dynamic_param, clamp_quantile=_clamp(args.clamp_quantile), split=args.split,
        base_model=args.base_model, dtype=torch_dtype(args.dtype), overwrite=args.overwrite,
        progress=progress_bar(args, "resize", unit="component"), base=args.base,
    )
    _print_skipped(report)
    print(_summary(report, "wrote"))
    return 0


def _cmd_cut_dylora(args: argparse.Namespace) -> int:
    from ..loratools.dylora import dylora_cut

    path = dylora_cut(args.lora, args.out, rank=args.rank, unit=args.unit, dtype=torch_dtype(args.dtype),
                      overwrite=args.overwrite)
    print(f"wrote {safe_text(str(path))} (rank {args.rank})")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..loratools.bake import merge_loras_into_checkpoint

    report = merge_loras_into_checkpoint(
        args.base, args.loras, args.out, strengths=list(args.scale),
        block_weights=[list(v) for v in args.block_weights] if args.block_weights else None,
        dtype=torch_dtype(args.dtype), skip_unmatched=args.skip_unmatched, overwrite=args.overwrite,
        progress=progress_bar(args, "merge-lora", unit="tensor"), allow_nonfinite=args.allow_nonfinite,
    )
    if report.unmatched:
        print(f"skipped {len(report.unmatched)} LoRA layer(s) that match nothing:", file=sys.stderr)
        for name in report.unmatched[:10]:
            print(f"  {safe_text(name)}", file=sys.stderr)
    print(f"wrote {safe_text(report.path)}: {plural(len(report.merged), 'tensor')} changed by {plural(len(args.loras), 'LoRA')}")
    return 0


def _cmd_combine(args: argparse.Namespace) -> int:
    from ..loratools.combine import combine_loras

    if args.mode == "svd" and args.rank is None:
        raise ValueError("--mode svd needs --rank")
    report = combine_loras(
        args.loras, args.out, strengths=list(args.scale), mode=args.mode, rank=args.rank, conv_rank=args.conv_rank,
        method=args.dynamic_method or "fixed", param=args.dynamic_param, clamp_quantile=_clamp(args.clamp_quantile),
        base_model=args.base_model, dtype=torch_dtype(args.dtype), overwrite=args.overwrite, base=args.base,
    )
    _print_skipped(report)
    files = plural(len(args.loras), "file")
    print(_summary(report, f"combined {files} ({args.mode}), wrote"))
    return 0


def _common(parser: argparse.ArgumentParser, *, base_model: bool = True, keep: str) -> None:
    output = add_output_options(parser, dtype_help=keep)
    if base_model:
        output.add_argument("--base-model", choices=_BASE_MODELS, default=None,
                            help="kohya naming/metadata of the output (default: detected from the input)")


def _scale(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--scale", type=numbers, nargs="+", action=ExtendNumbers, default=(1.0,), metavar="S",
                        help=f"strength: one for all LoRAs or one per LoRA, as 1,0.5 or 1 0.5 ({what})")


def _dynamic(parser: argparse.ArgumentParser, *, split: bool = True) -> None:
    parser.add_argument("--dynamic-method", choices=["sv_ratio", "sv_cumulative", "sv_fro"], default=None,
                        help="choose each layer's rank (capped at --rank): sv_ratio keeps σ > σ_max/P, "
                        "sv_cumulative keeps a fraction P of Σσ, sv_fro a fraction P of the Frobenius norm "
                        "(kohya's rules, including kohya's +1)")
    parser.add_argument("--dynamic-param", type=float, default=None, help="P of --dynamic-method")
    parser.add_argument("--clamp-quantile", type=float, default=1.0, metavar="Q",
                        help="clamp the factors to [-h, h], h = the Q quantile of their signed values (kohya's "
                        "outlier clamp; --clamp-quantile 0.99 gives the files kohya's extract_lora_from_models.py "
                        "writes). It guards fp16 files against outliers but can cost much accuracy; the printed "
                        "error includes it. Default 1: off")
    if split:
        parser.add_argument("--split", choices=["up", "sqrt"], default="up",
                            help="where the singular values go: all in up (kohya, default) or sqrt on each side")
    only_with(parser, ["--dynamic-param"], needs="--dynamic-method METHOD",
              when=lambda args: args.dynamic_method is not None)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``extract-lora``, ``resize-lora``, ``merge-lora`` and ``combine-loras`` to a CLI."""
    extract = sub.add_parser(
        "extract-lora",
        help="extract a LoRA from a base and a fine-tuned checkpoint (SVD of the difference)",
        description="Extract the difference TUNED - BASE as a kohya LoRA: truncated SVD of every attention/MLP "
        "layer of the UNet and text encoder(s) (with --conv-rank also the ResNet convs, LoCon). "
        "Inputs: LDM single-file checkpoints (.safetensors/.ckpt) or diffusers UNet files of the same model.",
    )
    extract.add_argument("base", help="the original model")
    extract.add_argument("tuned", help="the fine-tuned model")
    extract.add_argument("--rank", type=int, default=4, help="LoRA rank (the cap with --dynamic-method; default 4)")
    extract.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convs; enables LoCon extraction")
    extract.add_argument("--alpha", type=float, default=None, help="alpha to write (default: alpha = rank, scale 1)")
    extract.add_argument("--conv-alpha", type=float, default=None, help="alpha of 3x3 convs (default: their rank)")
    _dynamic(extract)
    extract.add_argument("--min-diff", type=float, default=0.01,
                         help="leave out a text encoder whose largest |difference| is at most this (kohya, default 0.01)")
    extract.add_argument("--min-layer-diff", type=float, default=0.0,
                         help="leave out any layer whose largest |difference| is at most this (default 0)")
    extract.add_argument("--randomized", action="store_true", help="randomized low-rank SVD (faster on big layers)")
    extract.add_argument("--niter", type=int, default=2, help="power iterations of --randomized (default 2)")
    extract.add_argument("--device", default=None, help="where to run the SVDs (default: cuda when available)")
    only_with(extract, ["--niter"], needs="--randomized", when=lambda args: args.randomized)
    only_with(extract, ["--conv-alpha"], needs="--conv-rank R", when=lambda args: args.conv_rank is not None,
              message="{option} is the alpha of the 3x3 convs, which only --conv-rank R extracts: add --conv-rank R, "
              "or leave {option} out")
    _common(extract, keep="float32")
    extract.set_defaults(run=_cmd_extract)

    resize = sub.add_parser(
        "resize-lora",
        help="resize a LoRA (or LoHa/LoKr/full/DoRA file) to a LoRA of a smaller or per-layer dynamic rank",
        description="Reduce an adapter's rank by SVD of each layer's delta and write a kohya LoRA. Every family "
        "is accepted: LoRA/LoCon layers keep alpha/rank (the strength); LoHa, LoKr, full-diff, Tucker and DoRA "
        "layers become the truncated SVD of their dense delta (alpha = rank). Reads kohya, LyCORIS or diffusers "
        "files. DoRA, and LoHa/LoKr layers whose flattened factors do not tell the layer's shape, need --base.",
    )
    resize.add_argument("lora", help="adapter file of any family (kohya, LyCORIS or diffusers)")
    resize.add_argument("--base", default=None, metavar="CKPT",
                        help="the checkpoint the file was made for: gives the layer shapes LoHa/LoKr files cannot "
                        "tell, and DoRA's base weights")
    resize.add_argument("--rank", type=int, default=4, help="new rank (the cap with --dynamic-method; default 4)")
    resize.add_argument("--conv-rank", type=int, default=None,
                        help="new rank of conv layers, 1x1 ones too as kohya's resize (default --rank)")
    _dynamic(resize)
    _common(resize, keep="each layer's own")
    resize.set_defaults(run=_cmd_resize)

    merge = sub.add_parser(
        "merge-lora",
        help="bake one or more adapter files (LoRA, LoCon, LoHa, LoKr, Tucker, full, DoRA) into a checkpoint",
        description="Write BASE with adapter files merged in: W + scale * block_weight * delta per layer, where delta "
        "is each file's own family's (LoRA/LoCon (alpha/rank)*up@down, LoHa, LoKr, Tucker, full diff; DoRA moves W "
        "towards its W' by the scale), in float32, cast once. Streams BASE tensor by tensor; keys and untouched "
        "tensors are kept.",
    )
    merge.add_argument("base", help="checkpoint (LDM single file or diffusers UNet file)")
    merge.add_argument("loras", nargs="+", metavar="LORA", help="adapter files (kohya, LyCORIS or diffusers)")
    _scale(merge, "default 1")
    merge.add_argument("--block-weights", type=numbers, action="append", default=None, metavar="W,W,...",
                       help="LoRA block weights (12/20 values SDXL, 17/26 SD1/SD2, kohya LBW order); "
                       "once for all LoRAs or once per LoRA")
    merge.add_argument("--skip-unmatched", action="store_true",
                       help="merge the LoRA layers that match the checkpoint and report the rest (default: error)")
    merge.add_argument("--allow-nonfinite", action="store_true",
                       help="let NaN/inf already in BASE pass through unchanged (default: refused, naming the "
                       "tensor); NaN/inf the LoRAs produce is always refused")
    _common(merge, base_model=False, keep="each checkpoint tensor's own")
    merge.set_defaults(run=_cmd_merge)

    combine = sub.add_parser(
        "combine-loras",
        help="combine several adapter files (any family) into one LoRA (exact concatenation, or SVD to a rank)",
        description="One kohya LoRA equal to sum(scale_i * delta_i) for files of any family (LoRA/LoCon, LoHa, "
        "LoKr, full, Tucker, DoRA). --mode concat is exact: LoRA ranks are concatenated and the other families' "
        "dense deltas factored at their numerical rank (capped by --rank/--conv-rank if given); --mode svd "
        "re-compresses each layer to --rank. DoRA, and LoHa/LoKr layers whose flattened factors do not tell the "
        "layer's shape, need --base; "
        "DoRA files apply in the order given.",
    )
    combine.add_argument("loras", nargs="+", metavar="LORA")
    combine.add_argument("--base", default=None, metavar="CKPT",
                         help="the checkpoint the files were made for: gives the layer shapes LoHa/LoKr files "
                         "cannot tell, and DoRA's base weights")
    _scale(combine, "default 1")
    combine.add_argument("--mode", choices=["concat", "svd"], default="concat")
    combine.add_argument("--rank", type=int, default=None,
                         help="target rank of --mode svd (with --mode concat: cap of the non-LoRA layers' rank)")
    combine.add_argument("--conv-rank", type=int, default=None, help="target rank of 3x3 convs (--mode svd)")
    _dynamic(combine, split=False)
    _common(combine, keep="float32")
    combine.set_defaults(run=_cmd_combine)

    cut = sub.add_parser(
        "cut-dylora",
        help="cut a DyLoRA file to a lower rank (kohya's extract_lora_from_dylora.py)",
        description="Keep the first R rows of every lora_down and the first R columns of every lora_up of a DyLoRA "
        "file (kohya networks.dylora; any LoRA file is cut the same way); alpha is kept as kohya's tool keeps it.",
    )
    cut.add_argument("lora", help="DyLoRA .safetensors file")
    cut.add_argument("--rank", type=int, required=True, help="the rank to keep (a multiple of the training unit)")
    cut.add_argument("--unit", type=int, default=None,
                     help="the DyLoRA unit (default: the file's, from its metadata: kohya networks.dylora's unit, "
                     "LyCORIS algo=dylora's block_size; not a DyLoRA file: any rank)")
    add_output_options(cut, dtype_help="each tensor's own dtype")
    cut.set_defaults(run=_cmd_cut_dylora)
