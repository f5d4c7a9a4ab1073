"""Quality of every registered method on the toy model's held-out concepts.

For each method in ``sdadapt.methods.METHODS`` (plus the no-adaptation baseline) × held-out concept
(the shape "cross", the colour "purple") × seed: teach the pretrained toy model the concept from
``--images`` images, then score with the toy judge CLIP — held-out-concept accuracy, image-image
similarity to the training images, image-text similarity to the prompt (the DreamBooth and
textual-inversion papers' metrics), prior accuracy on held-in prompts (drift shows as a drop) —
and record the adapter file size and the training time. Prints a markdown table (means over
seeds) and writes JSON to ``benchmarks/results/quality.json``.

    python benchmarks/quality.py                      # all methods, both concepts, 2 seeds
    python benchmarks/quality.py --methods lora full --seeds 0
    python benchmarks/quality.py --methods clip-inversion --weights toy-image   # on the image variant
    python benchmarks/quality.py --methods dreambooth --no-prior   # the same fine-tune without class images
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdadapt.jobs import prior_images
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import load_toy
from sdadapt.toy.evaluate import CONCEPTS, concept_data, score

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("concept_accuracy", "image_image", "image_text", "prior_accuracy")


def _weights(name: str | None):
    if name == "toy-image":
        from sdadapt.toy.image_variant import IMAGE_WEIGHTS

        return IMAGE_WEIGHTS
    return name


def run_one(method: str | None, concept: str, seed: int, *, images: int, steps: int | None, prior: bool | None,
            weights: str | None = None) -> dict:
    system = load_toy(_weights(weights))
    train_images, captions = concept_data(concept, images, seed=seed)
    row = {"method": (method or "baseline") + (f" [{weights}]" if weights else ""), "concept": concept, "seed": seed,
           "prior_images": 0, "size_bytes": 0, "train_seconds": 0.0}
    if method is not None:
        spec = METHODS[method]
        if spec.prior == "required" and prior is False:  # DreamBooth's fine-tune without its class images: the drift
            prior_data = None
        else:
            prior_data = prior_images(system, spec, enabled=prior, count=2 * images, seed=seed)
        if prior is not None and (prior_data is not None) != (spec.prior != "off"):
            row["method"] = f"{method} {'+' if prior else 'no '}prior" + (f" [{weights}]" if weights else "")
        row["prior_images"] = 0 if prior_data is None else len(prior_data[1])
        # trigger-word methods (textual inversion, DreamArtist) learn the concept's own word
        adaptation = spec.adapt(system, seed=seed, **({"token": concept} if spec.trigger else {}))
        config = FitConfig(steps=steps or spec.steps, learning_rate=spec.learning_rate, seed=seed)
        start = time.perf_counter()
        fit(system, adaptation, train_images, captions, config=config, prior=prior_data)
        row["train_seconds"] = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            row["size_bytes"] = adaptation.save(Path(tmp) / f"a{spec.file_suffix}").stat().st_size
    # an adaptation that samples its own way (DreamArtist: the learned negative) is scored as it samples
    sampler = getattr(adaptation, "sample", None) if method is not None else None
    scores, _ = score(system, concept, train_images, seeds=(100 + seed, 200 + seed), sampler=sampler)
    row.update(scores)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["concept"]), []).append(r)
    out = []
    for (method, concept), rs in groups.items():
        entry = {"method": method, "concept": concept, "seeds": len(rs)}
        for key in (*METRICS, "prior_images", "size_bytes", "train_seconds"):
            entry[key] = statistics.fmean(r[key] for r in rs)
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| method | concept | concept acc. | image-image | image-text | prior acc. | class images | file size | train time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        size = "—" if not s["size_bytes"] else f"{s['size_bytes'] / 2**20:.2f} MiB"
        tt = "—" if not s["train_seconds"] else f"{s['train_seconds']:.0f} s"
        lines.append(f"| {s['method']} | {s['concept']} | {s['concept_accuracy']:.2f} | {s['image_image']:.3f} | "
                     f"{s['image_text']:.3f} | {s['prior_accuracy']:.2f} | {s['prior_images']:.0f} | {size} | {tt} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="override every method's default steps")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=None,
                        help="force prior preservation on/off for every method (default: each method's own)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-adaptation rows")
    parser.add_argument("--weights", default=None,
                        help="toy weights to adapt: a toy-system file or 'toy-image' (the image variant); default the shipped toy-v1")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args(argv)
    rows = []
    for concept in args.concepts:
        for seed in args.seeds:
            for method in ([] if args.no_baseline else [None]) + args.methods:
                row = run_one(method, concept, seed, images=args.images, steps=args.steps, prior=args.prior, weights=args.weights)
                rows.append(row)
                print(f"{row['method']:>10} {concept:>7} seed {seed}: " + " ".join(f"{k} {row[k]:.3f}" for k in METRICS),
                      file=sys.stderr, flush=True)
    summary = summarise(rows)
    print(markdown(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "images": args.images,
                                    "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
