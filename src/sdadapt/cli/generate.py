"""``python -m sdadapt generate``: images from a model with LoRA files and embeddings applied."""

from __future__ import annotations

import argparse
import sys

from .options import add_output_options, positive_int, progress_bar

__all__ = ["register"]


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..jobs import run_generate

    def log(line: str) -> None:
        if not args.quiet or line.startswith("warning:"):
            print(line, file=sys.stderr)

    result = run_generate(
        model=args.model, prompt=args.prompt, negative=args.negative, loras=args.lora, embeddings=args.embedding,
        seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler, width=args.width,
        height=args.height, count=args.count, out=args.out, overwrite=args.overwrite, tokenizer=args.tokenizer,
        prediction_type=args.prediction_type, clip_skip=args.clip_skip, device=args.device,
        progress=progress_bar(args, "generate", unit="image") if args.count > 1 else None, log=log,
    )
    for file in result["files"]:
        print(f"wrote {file}")
    return 0



def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate`` to a CLI."""
    generate = sub.add_parser(
        "generate",
        help="make images from a prompt on the toy model or a Stable Diffusion model, with LoRAs and embeddings",
        description="Make a PNG from a prompt (DDIM or Euler, classifier-free guidance) on the toy model, a diffusers "
        "folder or an SD1/SD2/SDXL single-file checkpoint, with LoRA-family files merged in at a strength "
        "(--lora FILE:0.8) and textual-inversion embeddings (their file names become trigger words).",
    )
    generate.add_argument("--model", default="toy", metavar="toy|PATH",
                          help="'toy' (built in, default), a diffusers folder or a .safetensors/.ckpt checkpoint")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative", default="", help="negative prompt (default none)")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                          help="a LoRA/LyCORIS file to merge in at SCALE (default 1); repeat for several")
    generate.add_argument("--embedding", action="append", default=[], metavar="FILE",
                          help="a textual-inversion embedding; repeat for several")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default 25)")
    generate.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                          help="classifier-free guidance scale (default: the model's, SD 7.5, toy 2)")
    generate.add_argument("--sampler", choices=("ddim", "euler"), default="ddim")
    generate.add_argument("--width", type=positive_int, default=None, help="default: the model's size")
    generate.add_argument("--height", type=positive_int, default=None, help="default: the model's size")
    generate.add_argument("--count", type=positive_int, default=1, help="images (seeds SEED, SEED+1, ...; OUT-00.png ...)")
    generate.add_argument("--tokenizer", default=None, metavar="DIR", help="CLIP tokenizer for a single-file checkpoint")
    generate.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    generate.add_argument("--clip-skip", type=positive_int, default=1)
    generate.add_argument("--device", default="auto")
    group = add_output_options(generate, out_help="output .png", dtype_help="not used (images)")
    del group
    generate.set_defaults(run=_cmd_generate)
