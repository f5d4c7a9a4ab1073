"""``python -m sdadapt aesthetic-embedding``: the mean CLIP image embedding of a folder of images."""

from __future__ import annotations

import argparse

from ..plurals import plural
from .options import add_output_options, positive_int, torch_dtype

__all__ = ["register"]


def _cmd_aesthetic_embedding(args: argparse.Namespace) -> int:
    from ..jobs.aesthetic import run_aesthetic_embedding
    from ..jobs.models import resolve_device

    result = run_aesthetic_embedding(
        args.images, out=args.out, model=args.model, clip=args.clip, overwrite=args.overwrite,
        dtype=torch_dtype(args.dtype), normalize_each=args.normalize_each, batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    print(f"wrote {result['file']}: (1, {result['dim']}) mean of {plural(result['images'], 'image')} by the {result['encoder']}, "
          f"norm {result['norm']:.3f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``aesthetic-embedding`` to a CLI."""
    command = sub.add_parser(
        "aesthetic-embedding",
        help="make an aesthetic-gradient embedding (mean CLIP image embedding) from a folder of images",
        description="Average the CLIP image embeddings of the images in IMAGES and write the (1, D) vector "
        "unnormalised, as the A1111 aesthetic-gradients extension and vicgalle's script do: a .pt the extension "
        "lists, or .safetensors. Use it with generate --aesthetic FILE. The toy model's judge CLIP (--model toy, "
        "default) or a local transformers CLIP model folder (--clip DIR; for SD1 openai/clip-vit-large-patch14).",
    )
    command.add_argument("images", metavar="IMAGES", help="a folder of images (.png, .jpg ...)")
    which = command.add_mutually_exclusive_group()
    which.add_argument("--model", default="toy", metavar="toy|toy-image|PATH",
                       help="the toy system whose judge CLIP embeds the images (default toy)")
    which.add_argument("--clip", default=None, metavar="DIR",
                       help="a transformers CLIP model folder (config.json + weights) with an image tower")
    command.add_argument("--normalize-each", action="store_true",
                         help="average unit-length embeddings (default: raw embeddings, as the original tools do)")
    command.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (default 32)")
    command.add_argument("--device", default="auto")
    add_output_options(command, out_help="output .pt (the A1111 extension's file) or .safetensors",
                       dtype_help="float32")
    command.set_defaults(run=_cmd_aesthetic_embedding)
