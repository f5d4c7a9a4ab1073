"""``python -m sdadapt extract-lora | resize-lora | merge-lora | combine-loras``.

Thin argparse shells over :mod:`sdadapt.loratools`; heavy imports happen when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["register", "LineProgress"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_BASE_MODELS = ("sd1", "sd2", "sd2-v", "sdxl")


class LineProgress:
    """``progress(done, total, label)`` as a one-line stderr bar (redrawn about 50 times per job)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        if done != total and done % max(1, total // 50):
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        sys.stderr.write(f"\r{self.title} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s<{eta:.0f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, _DTYPES[name])


def _progress(args: argparse.Namespace, title: str):
    return None if args.quiet else LineProgress(title)


def _clamp(value: float) -> float | None:
    return None if value >= 1.0 else value


def _summary(report, verb: str) -> str:
    by_component: dict[str, int] = {}
    for name in report.layers:
        component = name.split(":", 1)[0]
        by_component[component] = by_component.get(component, 0) + 1
    ranks = sorted({info.rank for info in report.layers.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    parts = ", ".join(f"{c} {n}" for c, n in by_component.items())
    line = f"{verb} {report.path}: {len(report.layers)} layers ({parts}), rank {rank_text}, base model {report.base_model}"
    if report.layers:
        worst = max(report.layers.items(), key=lambda kv: kv[1].residual_norm / max(kv[1].norm, 1e-30))
        rel = worst[1].residual_norm / max(worst[1].norm, 1e-30)
        line += f"\nlargest relative error ‖Δ − LoRA‖/‖Δ‖ = {rel:.3g} ({worst[0]})"
    return line


def _print_skipped(report) -> None:
    if not report.skipped:
        return
    print(f"skipped {len(report.skipped)} layer(s):", file=sys.stderr)
    for name, reason in list(report.skipped.items())[:10]:
        print(f"  {name}: {reason}", file=sys.stderr)
    if len(report.skipped) > 10:
        print(f"  ... and {len(report.skipped) - 10} more", file=sys.stderr)


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..loratools.extract import extract_lora

    report = extract_lora(
        args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank, alpha=args.alpha,
        conv_alpha=args.conv_alpha, method=args.dynamic_method or "fixed", param=args.dynamic_param,
        clamp_quantile=_clamp(args.clamp_quantile), min_diff=args.min_diff, min_layer_diff=args.min_layer_diff,
        split=args.split, randomized=args.randomized, niter=args.niter, device=args.device,
        base_model=args.base_model, dtype=_dtype(args.save_dtype), overwrite=args.overwrite,
        progress=_progress(args, "extract"),
    )
    _print_skipped(report)
    print(_summary(report, "wrote"))
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from ..loratools.resize import resize_lora

    report = resize_lora(
        args.lora, args.out, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method or "fixed",
        param=args.dynamic_param, clamp_quantile=_clamp(args.clamp_quantile), split=args.split,
        base_model=args.base_model, dtype=_dtype(args.save_dtype), overwrite=args.overwrite,
        progress=_progress(args, "resize"),
    )
    print(_summary(report, "wrote"))
    return 0


def _block_weights(texts: list[str] | None) -> list[list[float]] | None:
    if not texts:
        return None
    vectors = []
    for text in texts:
        try:
            vectors.append([float(v) for v in text.replace(" ", "").split(",") if v])
        except ValueError:
            raise ValueError(f"--block-weights {text!r}: expected comma-separated numbers, e.g. '1,0,0,0,1,1,...'") from None
    return vectors


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..loratools.bake import merge_loras_into_checkpoint

    report = merge_loras_into_checkpoint(
        args.base, args.loras, args.out, strengths=args.scale, block_weights=_block_weights(args.block_weights),
        dtype=_dtype(args.save_dtype), skip_unmatched=args.skip_unmatched, overwrite=args.overwrite,
        progress=_progress(args, "merge"),
    )
    if report.unmatched:
        print(f"skipped {len(report.unmatched)} LoRA layer(s) that match nothing:", file=sys.stderr)
        for name in report.unmatched[:10]:
            print(f"  {name}", file=sys.stderr)
    print(f"wrote {report.path}: {len(report.merged)} tensors changed by {len(args.loras)} LoRA(s)")
    return 0


def _cmd_combine(args: argparse.Namespace) -> int:
    from ..loratools.combine import combine_loras

    if args.mode == "svd" and args.rank is None:
        raise ValueError("--mode svd needs --rank")
    report = combine_loras(
        args.loras, args.out, strengths=args.scale, mode=args.mode, rank=args.rank, conv_rank=args.conv_rank,
        method=args.dynamic_method or "fixed", param=args.dynamic_param, clamp_quantile=_clamp(args.clamp_quantile),
        base_model=args.base_model, dtype=_dtype(args.save_dtype), overwrite=args.overwrite,
    )
    print(f"wrote {report.path} ({args.mode}) from {len(args.loras)} LoRAs")
    return 0


def _common(parser: argparse.ArgumentParser, *, base_model: bool = True) -> None:
    parser.add_argument("-o", "--out", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--save-dtype", choices=sorted(_DTYPES), default=None,
                        help="dtype of the written weights (default: fp32 for new LoRAs, each tensor's own otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if base_model:
        parser.add_argument("--base-model", choices=_BASE_MODELS, default=None,
                            help="kohya naming/metadata of the output (default: detected from the input)")


def _dynamic(parser: argparse.ArgumentParser, clamp_default: float, *, split: bool = True) -> None:
    parser.add_argument("--dynamic-method", choices=["sv_ratio", "sv_cumulative", "sv_fro"], default=None,
                        help="choose each layer's rank (capped at --rank): sv_ratio keeps σ > σ_max/P, "
                        "sv_cumulative keeps a fraction P of Σσ, sv_fro a fraction P of the Frobenius norm "
                        "(kohya's rules, including kohya's +1)")
    parser.add_argument("--dynamic-param", type=float, default=None, help="P of --dynamic-method")
    parser.add_argument("--clamp-quantile", type=float, default=clamp_default,
                        help=f"clamp factor values to this quantile like kohya (default {clamp_default:g}; 1 = off)")
    if split:
        parser.add_argument("--split", choices=["up", "sqrt"], default="up",
                            help="where the singular values go: all in up (kohya, default) or sqrt on each side")


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
    _dynamic(extract, 0.99)
    extract.add_argument("--min-diff", type=float, default=0.01,
                         help="leave out a text encoder whose largest |difference| is at most this (kohya, default 0.01)")
    extract.add_argument("--min-layer-diff", type=float, default=0.0,
                         help="leave out any layer whose largest |difference| is at most this (default 0)")
    extract.add_argument("--randomized", action="store_true", help="randomized low-rank SVD (faster on big layers)")
    extract.add_argument("--niter", type=int, default=2, help="power iterations of --randomized (default 2)")
    extract.add_argument("--device", default=None, help="where to run the SVDs (default: cuda when available)")
    _common(extract)
    extract.set_defaults(run=_cmd_extract)

    resize = sub.add_parser(
        "resize-lora",
        help="resize a LoRA to a smaller or per-layer dynamic rank (same strength)",
        description="Reduce a LoRA's rank by SVD of each layer's delta; alpha is rescaled so alpha/rank (the "
        "strength) is unchanged. Reads kohya or diffusers LoRAs, writes kohya.",
    )
    resize.add_argument("lora", help="LoRA file (kohya or diffusers)")
    resize.add_argument("--rank", type=int, default=4, help="new rank (the cap with --dynamic-method; default 4)")
    resize.add_argument("--conv-rank", type=int, default=None, help="new rank of 3x3 conv layers (default --rank)")
    _dynamic(resize, 1.0)
    _common(resize)
    resize.set_defaults(run=_cmd_resize)

    merge = sub.add_parser(
        "merge-lora",
        help="bake one or more LoRAs into a checkpoint",
        description="Write BASE with LoRAs merged in: W + scale * (alpha/rank) * up @ down per layer, in float32, "
        "cast once. Streams BASE tensor by tensor; keys and untouched tensors are kept.",
    )
    merge.add_argument("base", help="checkpoint (LDM single file or diffusers UNet file)")
    merge.add_argument("loras", nargs="+", metavar="LORA", help="LoRA files (kohya or diffusers)")
    merge.add_argument("--scale", type=float, nargs="+", default=[1.0],
                       help="strength: one for all LoRAs or one per LoRA (default 1.0)")
    merge.add_argument("--block-weights", action="append", default=None, metavar="W,W,...",
                       help="LoRA block weights (12/20 values SDXL, 17/26 SD1/SD2, kohya LBW order); "
                       "once for all LoRAs or once per LoRA")
    merge.add_argument("--skip-unmatched", action="store_true",
                       help="merge the LoRA layers that match the checkpoint and report the rest (default: error)")
    _common(merge, base_model=False)
    merge.set_defaults(run=_cmd_merge)

    combine = sub.add_parser(
        "combine-loras",
        help="combine several LoRAs into one (exact rank concatenation, or SVD to a rank)",
        description="One LoRA equal to sum(scale_i * LoRA_i): --mode concat is exact (rank = sum of ranks); "
        "--mode svd re-compresses each layer to --rank.",
    )
    combine.add_argument("loras", nargs="+", metavar="LORA")
    combine.add_argument("--scale", type=float, nargs="+", default=[1.0], help="one for all or one per LoRA")
    combine.add_argument("--mode", choices=["concat", "svd"], default="concat")
    combine.add_argument("--rank", type=int, default=None, help="target rank of --mode svd")
    combine.add_argument("--conv-rank", type=int, default=None, help="target rank of 3x3 convs (--mode svd)")
    _dynamic(combine, 1.0, split=False)
    _common(combine)
    combine.set_defaults(run=_cmd_combine)
