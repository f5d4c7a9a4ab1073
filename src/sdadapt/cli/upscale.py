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

_HELP = ("upscale images as A1111's Extras tab does (Lanczos, Nearest or an ESRGAN model file: R-ESRGAN 4x+, "
         "...), and crop, flip and split them for training as its preprocessing steps do")


def _cmd_upscale(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..optional_packages import require_pillow

    require_pillow("upscale reads, resizes and writes images with Pillow")  # (before any work, as one line)
    import numpy as np
    import torch

    from ..errors import InputError
    from ..extras_postprocess import extras_images
    from ..extras_upscale import ExtrasUpscale, postprocessing_text
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
    crop, flips, split = _preparation(args)
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
    if not single and out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".avif"):
        raise InputError(f"--out {out}: several images are written into a folder (--out FOLDER, each image's name "
                         f"there); give a folder, or upscale one image to {out.name}")
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
    if flips or split is not None:  # (NAME-1.png ... beside NAME.png: another input's name there would be overwritten)
        import re

        stems = {path.stem for path in outputs}
        taken = sorted(stem for stem in stems if (m := re.fullmatch(r"(.+)-\d+", stem)) and m.group(1) in stems)
        if taken:
            raise InputError(f"{taken[0]}: the name the flipped copies or pieces of another image get (NAME-1, "
                             "NAME-2, ...); upscale that image apart, or rename it")
    from PIL import Image, ImageOps

    bar = progress_bar(args, "upscale", unit="image") if len(inputs) > 1 else None
    written_count = 0
    for done, (source, target) in enumerate(zip(inputs, outputs)):
        try:
            with Image.open(source) as opened:  # (upright by its EXIF orientation: A1111's images.read, fix_image)
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except OSError as exc:
            raise InputError(f"{source}: not an image Pillow reads ({exc})") from None
        results = extras_images(image, upscale=settings, crop=crop, flips=flips, split=split)
        extra_targets = [target.with_name(f"{target.stem}{suffix}{target.suffix}") for _, _, suffix in results[1:]]
        check_outputs_free(extra_targets, overwrite=args.overwrite)  # (the pieces and copies, before any is written)
        try:  # (A1111 keeps the image's own text, then adds its postprocessing)
            parameters = {"parameters": read_infotext(source)}
        except ValueError:
            parameters = {}
        for (picture, info, _), path in zip(results, [target, *extra_targets]):
            text = postprocessing_text(info)
            chunks = {**parameters, **({"postprocessing": text, "extras": text} if text else {})}
            # (a JPEG's / WebP's / AVIF's comment: A1111's postprocessing text, its "extras" section)
            written = write_image(path, torch.from_numpy(np.ascontiguousarray(np.array(picture))), text=chunks,
                                  comment_key="extras", quality=args.jpeg_quality, lossless=args.webp_lossless)
            print(f"wrote {written} ({picture.width}x{picture.height})")
            written_count += 1
        if bar is not None:
            bar(done + 1, len(inputs), target.name)
    if not args.quiet:
        name = getattr(settings.upscaler, "name", settings.upscaler)
        print(f"{len(inputs)} image(s) " + ("processed" if name == "None" else f"upscaled by {name}")
              + (f", {written_count} file(s) written" if written_count != len(inputs) else ""), file=sys.stderr)
    return 0


def _preparation(args: argparse.Namespace) -> tuple:
    """``(crop, flips, split)`` of the Extras steps after the upscale (:mod:`sdadapt.extras_postprocess`)."""
    from ..errors import InputError
    from ..extras_postprocess import AutosizedCrop, SplitOversized

    try:
        crop = None if not args.autosized_crop else AutosizedCrop(
            min_dim=args.crop_dims[0], max_dim=args.crop_dims[1], min_area=args.crop_areas[0],
            max_area=args.crop_areas[1], threshold=args.crop_error_threshold,
            objective="Maximize area" if args.crop_objective == "area" else "Minimize error")
        split = None if not args.split_oversized else SplitOversized(threshold=args.split_threshold,
                                                                     overlap_ratio=args.overlap_ratio)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    flips = () if args.flipped_copies is None else tuple(flip.capitalize()
                                                         for flip in (args.flipped_copies or ["horizontal"]))
    return crop, flips, split


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
    prepare = upscale.add_argument_group("A1111's Extras steps after the upscale (its preprocessing for training)")
    prepare.add_argument("--autosized-crop", action="store_true",
                         help="A1111's 'Auto-sized crop': each image centre-cropped to the largest 64-step size within "
                         "--crop-dims and --crop-areas whose aspect is within --crop-error-threshold")
    prepare.add_argument("--crop-dims", type=int, nargs=2, default=(384, 768), metavar=("MIN", "MAX"),
                         help="auto-sized crop: the sides' bounds (default 384 768)")
    prepare.add_argument("--crop-areas", type=int, nargs=2, default=(64 * 64, 640 * 640), metavar=("MIN", "MAX"),
                         help="auto-sized crop: the area's bounds (default 4096 409600)")
    prepare.add_argument("--crop-objective", choices=("area", "error"), default="area",
                         help="auto-sized crop: 'Maximize area' (default) or 'Minimize error'")
    prepare.add_argument("--crop-error-threshold", type=float, default=0.1, metavar="F",
                         help="auto-sized crop: the largest aspect error (0 to 1, default 0.1)")
    prepare.add_argument("--flipped-copies", nargs="*", default=None, choices=("horizontal", "vertical", "both"),
                         metavar="FLIP", help="A1111's 'Create flipped copies': horizontal (the default), vertical, "
                         "both — each copy written beside the image (NAME-1.png ...)")
    prepare.add_argument("--split-oversized", action="store_true",
                         help="A1111's 'Split oversized images': an image much longer than the --scale-to size (or "
                         "the --max-side-length one) cut into overlapping pieces of that size")
    prepare.add_argument("--split-threshold", type=float, default=0.5, metavar="F",
                         help="split oversized: split when the aspect ratio over the target's is below F (default 0.5)")
    prepare.add_argument("--overlap-ratio", type=float, default=0.2, metavar="F",
                         help="split oversized: the share of a piece the next one overlaps (0 to 0.9, default 0.2)")
    group = add_output_options(upscale, out_help="the output image (one IMAGE: .png, .jpg, .webp or .avif) or folder "
                               "(several, or a folder: NAME.png each)", dtype_help="8-bit images; any other value "
                               "is refused")
    add_image_save_options(group, folder="several IMAGEs, or a folder")
    only_with(upscale, ["--no-crop"], needs="--scale-to WxH", when=lambda args: args.scale_to is not None)
    only_with(upscale, ["--max-side-length"], needs="--scale-by (not --scale-to)",
              when=lambda args: args.scale_to is None)
    only_with(upscale, ["--upscaler-2-visibility"], needs="--upscaler-2 NAME|FILE",
              when=lambda args: args.upscaler_2 is not None)
    only_with(upscale, ["--crop-dims", "--crop-areas", "--crop-objective", "--crop-error-threshold"],
              needs="--autosized-crop", when=lambda args: args.autosized_crop)
    only_with(upscale, ["--split-threshold", "--overlap-ratio"], needs="--split-oversized",
              when=lambda args: args.split_oversized)
    upscale.set_defaults(run=_cmd_upscale)
