"""``python -m sdadapt upscale IMAGE ...``: A1111's Extras tab "Upscale" (:mod:`sdadapt.extras_upscale`) — images
enlarged by Lanczos, Nearest or an ESRGAN model file, written as PNGs with A1111's ``postprocessing`` text (or as
JPEG / WebP with it as the EXIF comment, as A1111 writes them)."""

from __future__ import annotations

import argparse
import sys

from .option_rules import only_with
from .options import (
    add_image_save_options,
    add_output_options,
    progress_bar,
    width_height,
)

__all__ = ["register"]

_HELP = "upscale images as A1111's Extras tab does (Lanczos, Nearest or an ESRGAN model file: R-ESRGAN 4x+, ...)"


def _cmd_upscale(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import numpy as np
    import torch

    from ..errors import InputError
    from ..extras_upscale import ExtrasUpscale, extras_upscale, postprocessing_text
    from ..images import check_output_suffix, write_image
    from ..jobs.generate_batch import batch_images
    from ..jobs.generate_runs import check_outputs_free
    from ..jobs.infotext_read import read_infotext
    from ..jobs.models import resolve_device
    from ..sd_upscale import SD_UPSCALERS, pixel_upscaler

    if args.dtype != "keep":
        raise InputError(f"--dtype {args.dtype}: upscale writes 8-bit images; leave it out")
    if not 0.0 <= args.upscaler_2_visibility <= 1.0:
        raise InputError(f"--upscaler-2-visibility must be in [0, 1] (A1111's slider), got "
                         f"{args.upscaler_2_visibility}")
    if args.max_side_length < 0:
        raise InputError(f"--max-side-length must be 0 (no limit) or more, got {args.max_side_length}")
    device = resolve_device(args.device)
    try:
        upscaler = pixel_upscaler("--upscaler", args.upscaler, SD_UPSCALERS, device=device, folder=args.upscaler_dir)
        second = None if args.upscaler_2 is None else pixel_upscaler("--upscaler-2", args.upscaler_2, SD_UPSCALERS,
                                                                       device=device, folder=args.upscaler_dir)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    settings = ExtrasUpscale(upscaler=SD_UPSCALERS.get(upscaler, upscaler) if isinstance(upscaler, str) else upscaler,
                             scale=args.scale_by, size=args.scale_to, crop=args.crop,
                             max_side_length=args.max_side_length,
                             upscaler_2=SD_UPSCALERS.get(second, second) if isinstance(second, str) else second,
                             visibility_2=args.upscaler_2_visibility)
    inputs = []
    for given in args.images:
        if os.path.isdir(given):
            inputs += batch_images(given)
        elif os.path.isfile(given):
            inputs.append(Path(given))
        else:
            raise InputError(f"{given}: no such image or folder")
    single = len(args.images) == 1 and not os.path.isdir(args.images[0])
    out = Path(args.out)
    outputs = [out] if single else [out / f"{image.stem}.{args.image_format}" for image in inputs]
    if single and args.image_format != "png":
        raise InputError(f"--image-format {args.image_format}: for an --out folder (several images); one output's "
                         f"format is its name's suffix ({out.name})")
    try:
        check_output_suffix(outputs[0], what="upscale's output")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if len({path.name for path in outputs}) < len(outputs):
        raise InputError("two images of the same name would be written as one file in the --out folder; upscale the "
                         "folders one by one")
    check_outputs_free(outputs, overwrite=args.overwrite)
    from PIL import Image

    bar = progress_bar(args, "upscale", unit="image") if len(inputs) > 1 else None
    for done, (source, target) in enumerate(zip(inputs, outputs)):
        try:
            with Image.open(source) as opened:
                image = opened.convert("RGB")
        except OSError as exc:
            raise InputError(f"{source}: not an image Pillow reads ({exc})") from None
        upscaled, info = extras_upscale(image, settings)
        text = postprocessing_text(info)
        chunks = {}
        try:  # (A1111 keeps the image's own text, then adds its postprocessing)
            chunks["parameters"] = read_infotext(source)
        except ValueError:
            pass
        chunks.update({"postprocessing": text, "extras": text} if text else {})
        # (a JPEG's / WebP's / AVIF's comment: A1111's postprocessing text, its "extras" section)
        written = write_image(target, torch.from_numpy(np.ascontiguousarray(np.array(upscaled))), text=chunks,
                              comment_key="extras", quality=args.jpeg_quality, lossless=args.webp_lossless)
        print(f"wrote {written} ({upscaled.width}x{upscaled.height})")
        if bar is not None:
            bar(done + 1, len(inputs), target.name)
    if not args.quiet:
        print(f"{len(inputs)} image(s) upscaled by {getattr(settings.upscaler, 'name', settings.upscaler)}",
              file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``upscale`` to a CLI."""
    upscale = sub.add_parser("upscale", help=_HELP, description=(
        "Enlarge images as A1111's Extras tab 'Upscale' does: its Upscaler.upscale with Lanczos, Nearest or an "
        "ESRGAN model (tiled as A1111 tiles it), by a factor or to a size, a second upscaler blended in; each "
        "written as a PNG with A1111's 'postprocessing' text beside the image's own parameters."))
    upscale.add_argument("images", nargs="+", metavar="IMAGE",
                         help="images (PNG, JPEG, WebP, ...) or folders of them")
    upscale.add_argument("--upscaler", default="lanczos", metavar="NAME|FILE",
                         help="lanczos (default), nearest, none, or an ESRGAN model file (.pth / .safetensors)")
    how = upscale.add_mutually_exclusive_group()
    how.add_argument("--scale-by", type=float, default=4.0, metavar="F",
                     help="A1111's 'Scale by' / 'Resize' (default 4, its default)")
    how.add_argument("--scale-to", type=width_height, default=None, metavar="WxH",
                     help="A1111's 'Scale to': the factor that covers WxH, then cropped to it (centred)")
    upscale.add_argument("--no-crop", dest="crop", action="store_false",
                         help="with --scale-to: keep the upscaled image whole (A1111's 'Crop to fit' off)")
    upscale.add_argument("--max-side-length", type=int, default=0, metavar="PX",
                         help="with --scale-by: bring the longer side down to PX (A1111's 'Max side length'; 0: none)")
    upscale.add_argument("--upscaler-2", default=None, metavar="NAME|FILE",
                         help="A1111's 'Upscaler 2': a second upscaler blended in at --upscaler-2-visibility")
    upscale.add_argument("--upscaler-2-visibility", type=float, default=0.0, metavar="V",
                         help="how much of --upscaler-2's image is blended in (0 to 1, default 0)")
    upscale.add_argument("--upscaler-dir", default=None, metavar="DIR",
                         help="where --upscaler / --upscaler-2 find models by A1111's names (its models/ESRGAN: "
                         "'4x-UltraSharp', 'R-ESRGAN 4x+')")
    upscale.add_argument("--device", default="auto", help="where an ESRGAN model runs (auto, cpu, cuda, mps)")
    group = add_output_options(upscale, out_help="the output image (one IMAGE: .png, .jpg, .webp or .avif) or folder "
                               "(several, or a folder: NAME.png each)", dtype_help="8-bit images; any other value "
                               "is refused")
    add_image_save_options(group, folder="several IMAGEs, or a folder")
    only_with(upscale, ["--no-crop"], needs="--scale-to WxH", when=lambda args: args.scale_to is not None)
    only_with(upscale, ["--max-side-length"], needs="--scale-by (not --scale-to)",
              when=lambda args: args.scale_to is None)
    only_with(upscale, ["--upscaler-2-visibility"], needs="--upscaler-2 NAME|FILE",
              when=lambda args: args.upscaler_2 is not None)
    upscale.set_defaults(run=_cmd_upscale)
