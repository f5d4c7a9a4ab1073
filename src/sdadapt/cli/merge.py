"""``python -m sdadapt merge ...``: checkpoint merges from the shell.

    python -m sdadapt merge weighted-sum A B --alpha 0.3 -o OUT
    python -m sdadapt merge add-difference A B C --alpha 1.0 -o OUT
    python -m sdadapt merge ties BASE M1 M2 [M3 ...] --density 0.2 -o OUT
    python -m sdadapt merge dare BASE M1 M2 [...] --drop 0.9 --seed 0 -o OUT
    python -m sdadapt merge slerp A B --alpha 0.5 -o OUT
    python -m sdadapt merge block-weighted A B --weights "0,1,...,1" -o OUT
    python -m sdadapt merge --recipe FILE -o OUT

Heavy imports happen inside the run functions.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["register", "ProgressBar"]


class ProgressBar:
    """``bar(done, total)`` on stderr: tqdm when installed, else a one-line bar."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.perf_counter()
        self._tqdm: Any = None
        self._tried = False

    def __call__(self, done: int, total: int) -> None:
        if not self._tried:
            self._tried = True
            try:
                from tqdm import tqdm  # optional

                self._tqdm = tqdm(desc=self.label, total=total, unit="tensor", file=sys.stderr)
            except ImportError:
                self._tqdm = None
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
            if done == total:
                self._tqdm.close()
            return
        if done != total and done % max(1, total // 50):
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _policy(args: argparse.Namespace):
    from ..merge.recipe import KeyPolicy

    return KeyPolicy(
        components=tuple(args.components.split(",")) if args.components else KeyPolicy().components,
        ema="copy" if args.keep_ema else "prune",
        only_in_others="copy" if args.copy_extra_keys else "drop",
        reset_position_ids=args.reset_position_ids,
        discard=args.discard,
    )


def _run(step, args: argparse.Namespace, *, out: str, known_hashes=None, verify: bool = False) -> int:
    from ..merge.engine import merge_file

    progress = None if args.quiet else ProgressBar(f"merge {step.operator}")
    started = time.perf_counter()
    report = merge_file(step, out, overwrite=args.overwrite, save_recipe=not getattr(args, "no_recipe", False),
                        device=args.device, progress=progress, known_hashes=known_hashes, verify_hashes=verify)
    print(report.summary())
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0


def _step(args: argparse.Namespace, operator: str, inputs: list[str], **fields: Any):
    from ..merge.recipe import MergeStep

    return MergeStep(operator=operator, inputs=tuple(inputs), dtype=None if args.dtype == "keep" else args.dtype,
                     compute_dtype=args.compute_dtype, policy=_policy(args), **fields)


def _weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _cmd_two(args: argparse.Namespace) -> int:
    return _run(_step(args, args.operator, [args.a, args.b], alpha=args.alpha), args, out=args.out)


def _cmd_three(args: argparse.Namespace) -> int:
    return _run(_step(args, args.operator, [args.a, args.b, args.c], alpha=args.alpha), args, out=args.out)


def _cmd_task(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.operator != "model-stock":
        options["lam"] = args.lam
    if args.operator == "ties":
        options["density"] = args.density
    if args.operator == "dare":
        options["drop"] = args.drop
        options["consensus"] = args.consensus
    step = _step(args, args.operator, [args.base, *args.models], weights=_weights(args.model_weights),
                 options=options, seed=getattr(args, "seed", None))
    return _run(step, args, out=args.out)


def _cmd_block(args: argparse.Namespace) -> int:
    inputs = [args.a, args.b] + ([args.c] if args.c else [])
    operator = "add-difference" if args.c else "weighted-sum"
    values = _weights(args.weights)
    step = _step(args, operator, inputs, alpha=None, block_weights=values, base_alpha=args.base_alpha)
    return _run(step, args, out=args.out)


def _cmd_merge(args: argparse.Namespace) -> int:
    if getattr(args, "operator_run", None) is not None:
        return int(args.operator_run(args))
    if not args.recipe:
        args.merge_parser.print_help(sys.stderr)
        return 2
    if not args.recipe_out:
        raise ValueError("merge --recipe needs -o OUT (the file to write)")
    from ..merge.recipe import load_recipe

    step, hashes = load_recipe(args.recipe)
    if args.device is None:
        args.device = "cpu"
    args.out = args.recipe_out
    args.no_recipe = False
    return _run(step, args, out=args.recipe_out, known_hashes=hashes, verify=not args.no_verify)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", required=True, help="output .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dtype", choices=["keep", "fp16", "bf16", "fp32"], default="keep",
                        help="output dtype of float tensors (default: the first input's)")
    parser.add_argument("--compute-dtype", choices=["fp32", "fp64"], default="fp32", help="dtype the math runs in")
    parser.add_argument("--device", default="cpu", help="compute device, e.g. cuda (tensors move one at a time)")
    parser.add_argument("--components", default=None,
                        help="comma list of parts to merge: unet,text_encoder,text_encoder_2,vae (default all); "
                        "the others are copied from the first input")
    parser.add_argument("--keep-ema", action="store_true", help="keep the first input's model_ema.* (default: pruned)")
    parser.add_argument("--copy-extra-keys", action="store_true",
                        help="copy keys only later inputs have (default: dropped, as A1111 does)")
    parser.add_argument("--reset-position-ids", action="store_true",
                        help="write CLIP position_ids as 0..n-1 (fixes files broken by older mergers)")
    parser.add_argument("--discard", default=None, metavar="REGEX", help="drop output keys matching REGEX")
    parser.add_argument("--no-recipe", action="store_true",
                        help="do not store the recipe / input hashes in the file (skips hashing the inputs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``merge`` and its sub-commands to the ``python -m sdadapt`` parser."""
    merge = subparsers.add_parser(
        "merge",
        help="merge checkpoints (weighted sum, add difference, TIES, DARE, SLERP, block weights, recipes)",
        description="Merge whole checkpoints tensor by tensor in bounded memory, writing a .safetensors file with "
        "its recipe (A1111 sd_merge_recipe + a replayable sdadapt recipe). alpha is the weight of the SECOND "
        "model (A1111); ComfyUI's ratio is 1 - alpha.",
    )
    merge.add_argument("--recipe", default=None, metavar="FILE",
                       help="replay a recipe: its .json, or a merged .safetensors that carries one")
    merge.add_argument("-o", "--out", dest="recipe_out", metavar="OUT", default=None, help="output file for --recipe")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (--recipe)")
    merge.add_argument("--no-verify", action="store_true",
                       help="with --recipe: do not check the inputs' sha256 against the recorded ones")
    merge.add_argument("--device", default=None, help=argparse.SUPPRESS)
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(run=_cmd_merge, operator_run=None, merge_parser=merge)
    ops = merge.add_subparsers(dest="operator", metavar="OPERATOR")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = ops.add_parser(name, help=help_text, description=description)
        return parser

    for name, help_text, formula, default in (
        ("weighted-sum", "(1-alpha)*A + alpha*B", "A1111 weighted sum: (1 - alpha)*A + alpha*B; alpha is B's weight "
         "(0 gives A back, 1 gives B).", None),
        ("slerp", "spherical interpolation of A and B", "Spherical interpolation per tensor (lerp when nearly "
         "parallel); alpha 0 = A, 1 = B.", None),
    ):
        p = add(name, help_text, formula)
        p.add_argument("a", metavar="A")
        p.add_argument("b", metavar="B")
        p.add_argument("--alpha", type=float, required=default is None, default=default, help="weight of B")
        _common(p)
        p.set_defaults(operator_run=_cmd_two)
    for name, help_text, formula in (
        ("add-difference", "A + alpha*(B - C)", "A1111 add difference: A + alpha*(B - C). Inpainting recipe: "
         "A = sd15-inpainting, B = your model, C = sd15, alpha 1."),
        ("train-difference", "A + 1.8*alpha*w*(B - C)", "supermerger train difference: the B - C difference "
         "scaled per element by |B - A| / (|B - C| + |B - A|)."),
    ):
        p = add(name, help_text, formula)
        p.add_argument("a", metavar="A")
        p.add_argument("b", metavar="B")
        p.add_argument("c", metavar="C")
        p.add_argument("--alpha", type=float, default=1.0, help="strength (default 1.0)")
        _common(p)
        p.set_defaults(operator_run=_cmd_three)
    for name, help_text, description in (
        ("ties", "TIES: trim, elect sign, disjoint mean", "TIES-merging: trim every task vector (model - BASE) to "
         "its top --density by magnitude (paper default 0.2), elect the sign of their sum, average the agreeing "
         "entries, add lam times that to BASE."),
        ("dare", "DARE: random drop and rescale", "DARE: drop each task-vector entry with probability --drop "
         "(paper 0.9), rescale survivors by 1/(1-drop), then TIES sign consensus (or a plain sum). Randomness is "
         "seeded per key from --seed, so the result does not depend on order or threads."),
        ("model-stock", "Model Stock: interpolate the mean toward BASE", "Model Stock: t*mean(models) + "
         "(1-t)*BASE with t = k*cos/(1+(k-1)*cos) from the angle between the task vectors, per tensor."),
        ("task-arithmetic", "BASE + lam*sum(w_i*(M_i - BASE))", "Task arithmetic: add the weighted task vectors "
         "to BASE."),
    ):
        p = add(name, help_text, description)
        p.add_argument("base", metavar="BASE")
        p.add_argument("models", metavar="MODEL", nargs="+")
        if name != "model-stock":
            p.add_argument("--lam", type=float, default=1.0, help="scale of the merged task vector (default 1)")
            p.add_argument("--weights", dest="model_weights", default=None,
                           help="comma list, one weight per MODEL (default 1 each)")
        else:
            p.set_defaults(model_weights=None)
        if name == "ties":
            p.add_argument("--density", type=float, default=0.2, help="kept fraction per task vector (default 0.2)")
        if name == "dare":
            p.add_argument("--drop", type=float, default=0.9, help="drop probability p (default 0.9)")
            p.add_argument("--seed", type=int, default=0, help="merge seed (default 0); recorded in the file")
            p.add_argument("--consensus", choices=["sum", "none"], default="sum",
                           help="sum: TIES sign election (DARE-TIES, default); none: plain sum (DARE-linear)")
        _common(p)
        p.set_defaults(operator_run=_cmd_task)
    p = add("block-weighted", "weighted sum (or add difference with C) with one alpha per UNet block",
            "Block-weighted merge: --weights gives one alpha per block, BASE first: 26 values for SD1/SD2 "
            "(BASE, IN00..IN11, M00, OUT00..OUT11) or 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08); 25/19 "
            "without BASE plus --base-alpha. BASE covers the text encoders and VAE; time_embed/label_emb count as "
            "IN00, the final out layers as the last OUT block. With C: A + alpha_block*(B - C).")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("c", metavar="C", nargs="?", default=None)
    p.add_argument("--weights", required=True, help='comma list of block alphas, e.g. "0,1,1,...,1"')
    p.add_argument("--base-alpha", type=float, default=None, help="BASE alpha when --weights has no BASE value")
    _common(p)
    p.set_defaults(operator_run=_cmd_block)
