"""``python -m sdadapt invert``: invert a real image (null-text / negative-prompt / DDIM inversion),
write its reconstruction, the inversion, and optionally an edit."""

from __future__ import annotations

import argparse
import sys

from .option_rules import only_with
from .options import add_output_options, positive_int, progress_bar

__all__ = ["register"]


def _cmd_invert(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..inversion.job import run_invert

    if args.dtype != "keep":  # (the shared output option; the inversion is kept in float32 so it replays exactly)
        raise InputError(f"--dtype {args.dtype}: invert writes its inversion in float32 so that it replays exactly; "
                         "leave --dtype out")

    result = run_invert(
        args.image, prompt=args.prompt, out=args.out, method=args.method, guidance=args.guidance, steps=args.steps,
        model=args.model, edit_prompt=args.edit_prompt, source_steps=args.source_steps, init=args.init,
        negative=args.negative, comments=args.comments, overwrite=args.overwrite, progress=progress_bar(args, "invert", unit="step"),
        optimize_pooled=args.optimize_pooled,
    )
    for note in (result.get("resized"), result.get("converted"), result.get("guidance_note")):
        if note and not args.quiet:
            print(f"note: {note}", file=sys.stderr)
    print(f"{result['method']}: reconstruction PSNR {result['psnr']:.2f} dB in {result['seconds']:.1f} s")
    for label, path in result["files"].items():
        print(f"{label + ':':<16}{path}")
    return 0



def register(sub: argparse._SubParsersAction) -> None:
    """Add ``invert`` to a CLI."""
    invert = sub.add_parser(
        "invert",
        help="invert a real image (null-text / negative-prompt / DDIM inversion) to reconstruct or edit it",
        description="Invert IMAGE with its caption: DDIM inversion (the pivot), then null-text inversion (per-step "
        "unconditional embeddings optimised so guided sampling lands on the pivot), negative-prompt inversion "
        "(no optimisation) or plain DDIM inversion. Writes OUT.png (the reconstruction), OUT.safetensors (the "
        "inversion: embeddings, timesteps, guidance, the latent at T) and, with --edit-prompt, OUT-edit.png "
        "regenerated from the same inversion with the new prompt (a prompt swap, no attention control). Images "
        "of another size are resized/cropped to the model's, and grayscale/RGBA converted (said on stderr).",
    )
    invert.add_argument("image", help=".png/.jpg image")
    invert.add_argument("--prompt", required=True,
                        help="the image's caption, read as generate reads it: emphasis, BREAK, prompt editing "
                        "[a:b:0.4], alternation [a|b], AND (per-step conditions through the inversion); --negative "
                        "and --edit-prompt too")
    invert.add_argument("--method", choices=("null-text", "negative-prompt", "ddim"), default="null-text")
    invert.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's, 7.5; an EDM model such as "
                        "Playground v2.5: 5, its model card's for the Euler scheduler inversion runs)")
    invert.add_argument("--steps", type=positive_int, default=50,
                        help="DDIM steps (default 50; an EDM model, Playground v2.5: Euler steps on its σ grid)")
    invert.add_argument("--model", default="toy", metavar="toy|toy-image|PATH",
                        help="'toy' (built in), 'toy-image' (the image-embedding toy), a diffusers folder or a single file")
    invert.add_argument("--edit-prompt", default=None, help="also write OUT-edit.png regenerated with this prompt")
    invert.add_argument("--source-steps", type=int, default=0,
                        help="for the edit: keep the source prompt for the first K steps (default 0)")
    invert.add_argument("--init", choices=("null", "negative-prompt"), default="null",
                        help="null-text's start: the empty prompt (paper) or the negative-prompt inversion")
    invert.add_argument("--negative", default="", help="prompt of the starting null embedding (default empty)")
    invert.add_argument("--no-comments", dest="comments", action="store_false",
                        help="keep '#' in --prompt/--negative/--edit-prompt as text (default: as generate, A1111's "
                        "\"Enable comments\": '#' and the rest of its line are left out)")
    invert.add_argument("--optimize-pooled", action="store_true",
                        help="SDXL: null-text also optimises the pooled null embedding (text_embeds) per step, "
                        "as Null-SDXL does (default: only the text states)")
    only_with(invert, ["--source-steps"], needs="--edit-prompt TEXT", when=lambda args: args.edit_prompt is not None)
    only_with(invert, ["--optimize-pooled"], needs="--method null-text (the default)",
              when=lambda args: args.method == "null-text")
    only_with(invert, ["--init"], needs="--method null-text (the default)", when=lambda args: args.method == "null-text",
              message="{option} is null-text inversion's start: it does nothing with another --method; leave {option} out")
    add_output_options(invert, out_help="output .png (the inversion is written beside it as .safetensors)",
                       dtype_help="the inversion is float32 so it replays exactly; any other value is refused")
    invert.set_defaults(run=_cmd_invert)
