"""``python -m sdadapt demo`` and ``python -m sdadapt train METHOD``: training from the shell."""

from __future__ import annotations

import argparse
import sys

from .options import add_output_options, progress_bar, torch_dtype

__all__ = ["register"]


def _score_table(before: dict, after: dict) -> str:
    names = {"concept_accuracy": "held-out concept accuracy", "image_image": "image-image similarity",
             "image_text": "image-text similarity", "prior_accuracy": "prior (held-in) accuracy"}
    lines = [f"{'score':<28}{'before':>8}{'after':>8}"]
    for key, label in names.items():
        lines.append(f"{label:<28}{before[key]:>8.3f}{after[key]:>8.3f}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..jobs import run_demo

    if not args.quiet:
        print(f"teaching the toy model the held-out concept {args.concept!r} with {args.method} "
              f"from {args.images} images (the model has never seen it)", file=sys.stderr)
    result = run_demo(method=args.method, concept=args.concept, images=args.images, steps=args.steps, prior=args.prior,
                      seed=args.seed, out=args.out, overwrite=args.overwrite, dtype=torch_dtype(args.dtype),
                      progress=progress_bar(args, args.method, unit="step"))
    print(_score_table(result["before"], result["after"]))
    print(f"prior images:      {result['prior_images'] or 'none (no prior preservation)'}")
    print(f"before/after grid: {result['files']['grid']}")
    print(f"adapter:           {result['files']['adapter']}")
    print(f"time:              {result['seconds']:.0f} s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..jobs import run_train

    result = run_train(args.method, images=args.images, prompt=args.prompt, model=args.model, out=args.out,
                       steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, class_prompt=args.class_prompt,
                       class_count=args.class_images, prior=args.prior, prior_weight=args.prior_weight, seed=args.seed,
                       overwrite=args.overwrite, dtype=torch_dtype(args.dtype),
                       progress=progress_bar(args, args.method, unit="step"))
    losses = result["losses"]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    prior = f" + {result['prior_images']} class images" if result["prior_images"] else ""
    print(f"trained {result['method']} on {result['images']} images{prior} in {result['seconds']:.0f} s; "
          f"loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}")
    print(f"wrote {result['file']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``train`` to a CLI."""
    from ..methods import METHODS

    methods = sorted(METHODS)
    demo = sub.add_parser(
        "demo",
        help="teach the built-in toy model a concept it has never seen and show before/after scores and pictures",
        description="Teach the shipped toy text-to-image model a held-out concept from a handful of images, print "
        "before/after scores (held-out-concept accuracy, image-image and image-text similarity, prior accuracy), "
        "write a PNG grid and the adapter file. About a minute on a 2-core CPU; no downloads.",
    )
    demo.add_argument("--method", choices=methods, default="lora")
    demo.add_argument("--concept", choices=["cross", "purple"], default="cross", help="held-out shape or colour to teach")
    demo.add_argument("--images", type=int, default=8, help="training images (default 8)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    demo.add_argument("--prior", action=argparse.BooleanOptionalAction, default=None,
                      help="regularise with the model's own images of held-in prompts (prior preservation; "
                      "default: the method's — on for the LoRA family and dreambooth)")
    demo.add_argument("--seed", type=int, default=0)
    add_output_options(demo, out_help="output folder for before_after.png and CONCEPT-METHOD.safetensors "
                       "(default ./sdadapt-demo)", required=False, default="sdadapt-demo",
                       dtype_help="float32, as trained; applies to the adapter file")
    demo.set_defaults(run=_cmd_demo)

    train = sub.add_parser(
        "train",
        help="train a method on your own folder of images and captions",
        description="Train METHOD on the images in --images (captions from NAME.txt beside each image, or --prompt "
        "for all) on the toy model or a local diffusers Stable Diffusion folder, and write the result.",
    )
    train.add_argument("method", choices=methods)
    train.add_argument("--images", required=True, help="folder of .png/.jpg images (+ optional NAME.txt captions)")
    train.add_argument("--prompt", default=None, help="caption for images without a .txt file")
    train.add_argument("--model", default="toy", help="'toy' (built in) or a diffusers SD1.x/SD2.x folder")
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--class-prompt", default=None,
                       help="prior preservation: the class your images belong to, e.g. 'a photo of a dog'; the "
                       "unadapted model's images of it are trained on alongside yours (DreamBooth / reg images)")
    train.add_argument("--class-images", type=int, default=None, help="how many class images (default: 2 x your images)")
    train.add_argument("--prior-weight", type=float, default=1.0, help="weight of the class images' loss (default 1)")
    train.add_argument("--prior", action=argparse.BooleanOptionalAction, default=None,
                       help="force prior preservation on/off (default: on with --class-prompt, on the toy model "
                       "for the LoRA family and dreambooth)")
    train.add_argument("--seed", type=int, default=0)
    add_output_options(train, out_help="output file (default: <images folder>-<method>.safetensors)", required=False,
                       dtype_help="float32, as trained")
    train.set_defaults(run=_cmd_train)
