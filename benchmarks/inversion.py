"""Reconstruction quality and time of DDIM / negative-prompt / null-text inversion on the toy model.

For a fixed set of rendered toy images (held-in shapes and colours) with their captions: invert at
guidance 7.5, regenerate from the inversion, and report the PSNR of the reconstruction against
the input (dB, images in [-1, 1]) and the seconds per image (inversion + reconstruction). Prints a
markdown table (means over images) and writes JSON to ``benchmarks/results/inversion.json``.

    python benchmarks/inversion.py                    # 50 and 10 DDIM steps, 6 images
    python benchmarks/inversion.py --steps 50 --images 3
    python benchmarks/inversion.py --figure docs/images/null-text-inversion.png   # the docs picture only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sdadapt.images import image_grid, write_png
from sdadapt.inversion import invert_image, psnr, regenerate_image
from sdadapt.toy import load_toy
from sdadapt.toy.shapes import Scene, caption, render

RESULTS = Path(__file__).resolve().parent / "results"
SCENES = (
    Scene("circle", "red", "large", "left", "gray"),
    Scene("square", "blue", "small", "top", "white"),
    Scene("triangle", "green", "large", "center", "black"),
    Scene("ring", "orange", "large", "right", "gray"),
    Scene("diamond", "cyan", "small", "bottom", "black"),
    Scene("square", "yellow", "large", "center", "white"),
)
VARIANTS = {
    "DDIM inversion": {"method": "ddim"},
    "negative-prompt inversion": {"method": "negative-prompt"},
    "null-text inversion (paper defaults)": {"method": "null-text"},
    "null-text inversion, init = negative prompt": {"method": "null-text", "init": "negative-prompt"},
}


def figure(path: Path, system) -> None:
    """Rows: input, DDIM / negative-prompt / null-text (init negative prompt) reconstructions at 50
    steps and guidance 7.5, then a colour edit from the null-text inversion with source_steps 0 and 10."""
    rows = []
    for scene, colour in ((SCENES[0], "blue"), (SCENES[5], "green"), (SCENES[2], "red")):
        image, prompt = render(scene), caption(scene)
        row = [image]
        for options in ({"method": "ddim"}, {"method": "negative-prompt"}, {"method": "null-text", "init": "negative-prompt"}):
            inversion = invert_image(system, image, prompt, num_steps=50, guidance=7.5, **options)
            row.append(regenerate_image(system, inversion)[0])
        edit = prompt.replace(scene.colour, colour)
        row += [regenerate_image(system, inversion, prompt=edit, source_steps=k)[0] for k in (0, 10)]
        rows.append(torch.stack(row))
    grid = image_grid(torch.cat(rows), columns=6)
    write_png(path, torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[50, 10])
    parser.add_argument("--images", type=int, default=len(SCENES))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=RESULTS / "inversion.json")
    parser.add_argument("--figure", type=Path, default=None, help="only draw the docs picture to this PNG")
    args = parser.parse_args(argv)
    system = load_toy()
    if args.figure is not None:
        figure(args.figure, system)
        print(f"wrote {args.figure}")
        return 0
    rows = []
    for steps in args.steps:
        for scene in SCENES[: args.images]:
            image, prompt = render(scene), caption(scene)
            for name, options in VARIANTS.items():
                start = time.perf_counter()
                inversion = invert_image(system, image, prompt, guidance=args.guidance, num_steps=steps, **options)
                reconstruction = regenerate_image(system, inversion)[0]
                seconds = time.perf_counter() - start
                rows.append({"variant": name, "steps": steps, "prompt": prompt, "psnr": psnr(reconstruction, image),
                             "seconds": seconds})
                print(f"{steps:3d} steps {name:<45} {prompt[:40]:<40} {rows[-1]['psnr']:6.2f} dB {seconds:6.1f} s",
                      file=sys.stderr, flush=True)
    lines = ["| method | DDIM steps | PSNR (dB), mean | min | max | seconds / image |", "|---|---:|---:|---:|---:|---:|"]
    summary = []
    for steps in args.steps:
        for name in VARIANTS:
            rs = [r for r in rows if r["variant"] == name and r["steps"] == steps]
            entry = {"variant": name, "steps": steps, "psnr": statistics.fmean(r["psnr"] for r in rs),
                     "psnr_min": min(r["psnr"] for r in rs), "psnr_max": max(r["psnr"] for r in rs),
                     "seconds": statistics.fmean(r["seconds"] for r in rs)}
            summary.append(entry)
            lines.append(f"| {name} | {steps} | {entry['psnr']:.1f} | {entry['psnr_min']:.1f} | {entry['psnr_max']:.1f} | "
                         f"{entry['seconds']:.1f} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "guidance": args.guidance,
                                    "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
