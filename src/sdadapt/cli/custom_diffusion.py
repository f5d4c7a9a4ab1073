"""``python -m sdadapt merge-custom-diffusion A B ... -o OUT --model toy|PATH``.

A thin argparse shell over :func:`sdadapt.custom_diffusion.merge_custom_diffusion`; heavy imports
happen when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .option_rules import only_with
from .options import add_output_options, positive_int, safe_text, torch_dtype

__all__ = ["register"]


def _lines(path: str, what: str) -> list[str]:
    from ..errors import InputError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot read it ({exc.__class__.__name__}); give a UTF-8 text file, one prompt a line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{what} {path}: no prompts in it (one prompt a line)")
    return lines


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..custom_diffusion import merge_custom_diffusion
    from ..errors import InputError
    from ..formats.custom_diffusion import save_custom_diffusion_file, token_files
    from ..formats.files import check_output_file
    from ..jobs.models import load_system

    if args.prompts and len(args.prompts) != len(args.inputs):
        raise InputError(f"--prompts: give one file per input ({len(args.inputs)}), in the same order; got {len(args.prompts)}")
    out = Path(args.out)
    check_output_file(out, overwrite=args.overwrite, suffix=None)
    prompts = [_lines(p, "--prompts") for p in args.prompts] if args.prompts else None
    reg = _lines(args.reg_prompts, "--reg-prompts") if args.reg_prompts else None
    system = load_system(args.model, tokenizer=args.tokenizer)
    merged = merge_custom_diffusion(args.inputs, system=system, prompts=prompts, reg_prompts=reg,
                                    reg_count=args.reg_count, seed=args.seed, rtol=args.rtol)
    dtype = torch_dtype(args.dtype)
    weights = {k: (v.to(dtype) if dtype is not None else v) for k, v in merged.weights.items()}
    written = save_custom_diffusion_file(out, weights, embeddings=merged.embeddings, prompts=merged.prompts,
                                         overwrite=args.overwrite)
    tokens = ", ".join(safe_text(t) for t in merged.tokens)
    print(f"wrote {safe_text(written[0])}: {len(merged.layers())} cross-attention layers (K/V merged in closed form), "
          f"tokens {tokens}" + (f"; token files {', '.join(safe_text(p.name) for p in token_files(out, len(merged.embeddings)))}"
                                 if merged.embeddings else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``merge-custom-diffusion``."""
    merge = sub.add_parser(
        "merge-custom-diffusion",
        help="merge single-concept Custom Diffusion results into one (the paper's closed-form K/V merge)",
        description="Per cross-attention to_k/to_v: W = argmin ||(W - W0) C_reg^T|| subject to W C_i^T = W_i C_i^T for "
        "every concept i (C_i: text features of its prompts with its modifier token, C_reg: of the regularisation "
        "prompts), solved in closed form in float64. Writes the merged diffusers Custom Diffusion file and every "
        "modifier token beside it (OUT-token.EXT, or OUT-token1.EXT ... for several).",
    )
    merge.add_argument("inputs", nargs="+", metavar="CD", help="Custom Diffusion files or folders, one concept each")
    merge.add_argument("--model", required=True, help="the base model: toy, a toy-system file, a diffusers folder or a single-file checkpoint")
    merge.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint (see train --tokenizer)")
    merge.add_argument("--prompts", action="append", default=None, metavar="FILE",
                       help="per input (repeat, in order): its prompts, one a line (default: the prompts sdadapt's "
                       "training recorded in the file, else 'photo of a TOKEN')")
    merge.add_argument("--reg-prompts", default=None, metavar="FILE",
                       help="regularisation prompts, one a line (~200 ordinary captions; default: the model's class "
                       "prompts — the toy has them)")
    merge.add_argument("--reg-count", type=positive_int, default=200, help="how many class prompts without --reg-prompts (default 200)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the class prompts (default 0)")
    merge.add_argument("--rtol", type=float, default=3e-2,
                       help="keep only constraint directions above this fraction of the strongest (default 0.03; "
                       "1e-10: the paper's exact constraints, which blow up on near-collinear prompt features)")
    only_with(merge, ["--reg-count", "--seed"], needs="no --reg-prompts", when=lambda args: args.reg_prompts is None,
              message="{option} picks the model's class prompts, which --reg-prompts FILE replaces: leave {option} out "
              "(or --reg-prompts, to use the class prompts)")
    add_output_options(merge, out_help="output .safetensors (or .bin) file; token files are written beside it",
                       dtype_help="the inputs' dtype")
    merge.set_defaults(run=_cmd_merge)
