"""``python -m sdadapt clip-invert``: learn CLIP-image-embedding vectors of a concept from a folder of
images (an SD 2.1 unCLIP or lambdalabs image-variation diffusers folder, or the toys); ``generate --image-vectors FILE`` uses them."""

from __future__ import annotations

import argparse

from .option_rules import only_with
from .options import add_clip_stats_option, add_output_options, positive_int, progress_bar

__all__ = ["register"]


def _cmd_clip_invert(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..inversion.clip_job import run_clip_invert

    if args.dtype not in ("keep", "fp32"):  # (the shared output option; the vectors are written in float32)
        raise InputError(f"--dtype {args.dtype}: clip-invert writes its vectors in float32 (as save_image_vectors); "
                         "leave --dtype out")
    result = run_clip_invert(
        args.images, out=args.out, model=args.model, captions=args.captions, prompt=args.prompt,
        num_vectors=args.vectors, init=args.init, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
        noise_level=args.noise_level, seed=args.seed, device=args.device, overwrite=args.overwrite,
        progress=progress_bar(args, "clip-invert", unit="step"), clip_stats=args.clip_stats,
    )
    k, d = result["vectors"]
    print(f"wrote {result['file']} ({k} vector(s) of width {d} for the {result['site']} site, from {result['images']} "
          f"image(s), start {result['init']}, final loss {result['final_loss']:.5f}, {result['seconds']:.1f} s)")
    return 0


def _noise_level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer level 0..999, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the noise level must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``clip-invert`` to a CLI."""
    command = sub.add_parser(
        "clip-invert",
        help="learn image-embedding vectors of a concept from a few images (SD 2.1 unCLIP, image variation, toy-image)",
        description="CLIP inversion (docs/clip-inversion.md): learn K vectors in the image-embedding space a model takes "
        "(SD 2.1 unCLIP's noise-augmented CLIP image embedding; an image-variation model's cross-attention "
        "tokens; the toys' image input) from the images of a folder, the model frozen. The vectors start at the "
        "images' mean embedding (the folder's own image_encoder/) and are written as OUT.safetensors; generate "
        "--image-vectors OUT.safetensors samples from them, mixed with a prompt (image-variation models take no "
        "prompt: the vectors are the whole condition). Images of another size are resized (shorter side) and centre-cropped to the model's size.",
    )
    command.add_argument("--images", required=True, metavar="DIR", help="folder of the concept's .png/.jpg images")
    command.add_argument("--model", default="toy-image", metavar="toy-image|toy|PATH",
                         help="a diffusers SD 2.1 unCLIP folder (stable-diffusion-2-1-unclip) or single file "
                         "(sd21-unclip-h/-l .ckpt/.safetensors), an image-variation "
                         "folder (lambdalabs sd-image-variations-diffusers; no --prompt/--captions there), or the "
                         "built-in 'toy-image' (default) / 'toy'")
    command.add_argument("--captions", action="store_true",
                         help="train with each image's NAME.txt caption (the vectors then carry what the captions do "
                         "not say); default: the empty prompt (the vectors carry the whole concept)")
    command.add_argument("--prompt", default=None, metavar="TEXT",
                         help="one caption for every image (with --captions: for the images without a caption file)")
    command.add_argument("--steps", type=positive_int, default=300, help="optimisation steps (default 300)")
    command.add_argument("--lr", type=_positive_float, default=5e-2,
                         help="AdamW learning rate, warm-up then cosine (default 0.05)")
    command.add_argument("--batch-size", type=positive_int, default=4, help="images per step (default 4)")
    command.add_argument("--vectors", type=positive_int, default=1, metavar="K",
                         help="vectors to learn (default 1; unCLIP and the toys take one image embedding, an "
                         "image-variation model reads K tokens)")
    command.add_argument("--noise-level", type=_noise_level, default=0, metavar="L",
                         help="unCLIP's image-embedding noise level 0..999, used in training and stored for "
                         "generation (default 0, the pipelines'; > 0 needs the folder's image_normalizer/, or for "
                         "an unCLIP-L single file --clip-stats)")
    add_clip_stats_option(command, use="needed for --noise-level > 0 on an unCLIP-L single file", model_dest="model")
    command.add_argument("--init", choices=("auto", "images", "zeros"), default="auto",
                         help="the start: the images' mean CLIP image embedding (images; auto when the model has an "
                         "image encoder) or zeros")
    command.add_argument("--seed", type=int, default=0, help="the seed of the batches and noises (default 0)")
    command.add_argument("--device", default="auto")
    only_with(command, ["--noise-level"], needs="an SD unCLIP --model PATH",
              when=lambda args: args.model not in ("toy", "toy-image"),
              message="{option} is SD unCLIP's image-embedding noise augmentation; the toys have none: leave {option} out")
    add_output_options(command, out_help="output .safetensors (the vectors, written atomically)",
                       dtype_help="the vectors are float32; fp16/bf16 are refused")
    command.set_defaults(run=_cmd_clip_invert)
