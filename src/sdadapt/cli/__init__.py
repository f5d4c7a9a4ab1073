"""``python -m sdadapt``: the jobs a person runs from a shell (one module per command group)."""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main", "build_parser"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..formats import describe_file

    summary = describe_file(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"file:       {summary['file']}")
    print(f"kind:       {summary['kind']}")
    print(f"tensors:    {summary['tensors']}")
    print(f"size:       {summary['size_bytes'] / 2**20:.2f} MiB ({summary['size_bytes']} bytes)")
    print(f"dtypes:     {', '.join(f'{k} x{v}' for k, v in summary['dtypes'].items())}")
    for field in ("modules", "components", "family", "algorithms", "ranks", "alphas"):
        if field in summary:
            value = summary[field]
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
            print(f"{field + ':':<11} {text}")
    metadata = summary["metadata"]
    print(f"metadata:   {len(metadata)} entries")
    for key in sorted(metadata):
        value = metadata[key]
        if len(value) > 100:
            value = value[:97] + "..."
        print(f"  {key}: {value}")
    return 0


class ProgressBar:
    """A one-line stderr progress bar (tqdm when installed); ``bar(step, total, loss)``."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.perf_counter()
        self._tqdm = None  # created at the first step, so a job failing earlier prints no bar

    def __call__(self, step: int, total: int, loss: float) -> None:
        if step == 1 and self._tqdm is None:
            try:
                from tqdm import tqdm  # optional

                self._tqdm = tqdm(desc=self.label, unit="step", file=sys.stderr, total=total)
            except ImportError:
                pass
        if self._tqdm is not None:
            self._tqdm.total = total
            self._tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._tqdm.update(step - self._tqdm.n)
            if step == total:
                self._tqdm.close()
            return
        if step != total and step % max(1, total // 50):
            return
        width = 30
        filled = int(width * step / total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (total - step) if step else 0.0
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} loss {loss:.4f} "
                         f"{elapsed:.0f}s<{eta:.0f}s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _score_table(before: dict, after: dict) -> str:
    names = {"concept_accuracy": "held-out concept accuracy", "image_image": "image-image similarity",
             "image_text": "image-text similarity", "prior_accuracy": "prior (held-in) accuracy"}
    lines = [f"{'score':<28}{'before':>8}{'after':>8}"]
    for key, label in names.items():
        lines.append(f"{label:<28}{before[key]:>8.3f}{after[key]:>8.3f}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..jobs import run_demo

    print(f"teaching the toy model the held-out concept {args.concept!r} with {args.method} "
          f"from {args.images} images (the model has never seen it)", file=sys.stderr)
    result = run_demo(method=args.method, concept=args.concept, images=args.images, steps=args.steps, prior=args.prior,
                      seed=args.seed, out=args.out, progress=ProgressBar(args.method))
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
                       progress=ProgressBar(args.method))
    losses = result["losses"]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    prior = f" + {result['prior_images']} class images" if result["prior_images"] else ""
    print(f"trained {result['method']} on {result['images']} images{prior} in {result['seconds']:.0f} s; "
          f"loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}")
    print(f"wrote {result['file']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdadapt",
        description="sdadapt: adapt Stable-Diffusion-style models (LoRA family, embeddings, merges).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = sub.add_parser(
        "inspect",
        help="say what a weights file is (kohya/diffusers/peft LoRA, LyCORIS, embedding, hypernetwork, checkpoint)",
        description="Detect what a weights file is and print its module count, ranks, alphas, dtypes, size and metadata.",
    )
    inspect.add_argument("file", help=".safetensors (or legacy .pt/.ckpt/.bin, read with weights_only=True)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_cmd_inspect)

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
    demo.add_argument("--out", default="sdadapt-demo", help="output folder (default ./sdadapt-demo)")
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
    train.add_argument("-o", "--out", default=None, help="output file (default: <folder>-<method>.safetensors)")
    train.set_defaults(run=_cmd_train)
    from . import loratools  # extract-lora, resize-lora, merge-lora, combine-loras

    loratools.register(sub)
    from .merge import register as register_merge

    register_merge(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    from ..formats import WeightFileError

    try:
        return int(args.run(args))
    except (WeightFileError, OSError, ValueError, ImportError) as exc:
        # one line, no traceback: the message names the file and the fix
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

