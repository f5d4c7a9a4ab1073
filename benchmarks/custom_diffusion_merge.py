"""Custom Diffusion closed-form merge: the feature solve per key vs once for all keys.

Every ``to_k``/``to_v`` of a UNet reads the same text features (768-wide for SD1), so the merge's
expensive part — ``M = C_regᵀ C_reg`` over the regularisation features, its solve and the
pseudo-inverse of ``C M⁻¹ Cᵀ`` — depends only on the features. Two variants compute the *same*
merged weights of an SD1-sized set of random K/V weights (16 cross-attention layers × K and V,
320–1280 outputs, 768 inputs; two concepts):

1. ``per-key`` — :func:`sdadapt.custom_diffusion.merge_custom_diffusion_weights` per key (what
   ``merge_custom_diffusion`` did before: the whole solve 32 times);
2. ``shared`` — :func:`sdadapt.custom_diffusion.solve_concepts` once, then
   :meth:`~sdadapt.custom_diffusion.ConceptSolve.merge` per key (what it does now).

Before timing, the two must agree to 1e-12 (max |Δ| relative to the largest weight). Features: per
concept ``--concept-rows`` rows (its prompts' tokens), ``--reg-rows`` regularisation rows (200
prompts × 76 positions = 15200 by default, what ``merge_custom_diffusion`` takes), float64.
Timing: best and median of ``--repeats`` whole merges each.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/custom_diffusion_merge.py --threads 1
    python benchmarks/custom_diffusion_merge.py --reg-rows 4000 --repeats 1   # quick

Writes ``benchmarks/results/custom_diffusion_merge-cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sdadapt.custom_diffusion import merge_custom_diffusion_weights, solve_concepts

#: SD1.5's attn2 output widths: down 320×2, 640×2, 1280×2; mid 1280; up 1280×3, 640×3, 320×3
SD1_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)


def _problem(*, context: int, concept_rows: int, reg_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    features = [torch.randn(concept_rows, context, generator=g, **f64) for _ in range(2)]
    reg = torch.randn(reg_rows, context, generator=g, **f64)
    keys = {}
    for i, out in enumerate(SD1_WIDTHS):
        for proj in ("to_k", "to_v"):
            base = torch.randn(out, context, generator=g) * context**-0.5  # float32, as a UNet holds it
            keys[f"layer{i}.{proj}"] = (base, [base + 0.01 * torch.randn(out, context, generator=g) for _ in features])
    return features, reg, keys


def per_key(features, reg, keys, *, ridge: float, rtol: float) -> dict[str, torch.Tensor]:
    return {k: merge_custom_diffusion_weights(base.double(), ws, features, reg, ridge=ridge, rtol=rtol).float()
            for k, (base, ws) in keys.items()}


def shared(features, reg, keys, *, ridge: float, rtol: float) -> dict[str, torch.Tensor]:
    solve = solve_concepts(features, reg, ridge=ridge, rtol=rtol)
    return {k: solve.merge(base.double(), ws).float() for k, (base, ws) in keys.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=768)
    parser.add_argument("--concept-rows", type=int, default=60)
    parser.add_argument("--reg-rows", type=int, default=200 * 76)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "custom_diffusion_merge-cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    features, reg, keys = _problem(context=args.context, concept_rows=args.concept_rows, reg_rows=args.reg_rows)
    ridge, rtol = 1e-3, 3e-2  # merge_custom_diffusion's defaults
    # agreement first (in float64, before the float32 cast)
    one = next(iter(keys.values()))
    a = merge_custom_diffusion_weights(one[0].double(), one[1], features, reg, ridge=ridge, rtol=rtol)
    b = solve_concepts(features, reg, ridge=ridge, rtol=rtol).merge(one[0].double(), one[1])
    error = float((a - b).abs().max() / a.abs().max())
    if error > 1e-12:
        raise SystemExit(f"per-key and shared solves disagree: relative max |Δ| {error:.3g}")
    times: dict[str, list[float]] = {"per-key": [], "shared": []}
    for r in range(args.repeats):
        for name, fn in sorted((("per-key", per_key), ("shared", shared)), key=lambda x: (x[0] == "shared") ^ (r % 2)):
            start = time.perf_counter()
            fn(features, reg, keys, ridge=ridge, rtol=rtol)
            times[name].append(time.perf_counter() - start)
    result = {
        "keys": len(keys), "context": args.context, "concept_rows": args.concept_rows, "reg_rows": args.reg_rows,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "max_relative_difference": error,
        **{f"{n}_seconds_best": min(t) for n, t in times.items()},
        **{f"{n}_seconds_median": statistics.median(t) for n, t in times.items()},
    }
    result["speedup_best"] = result["per-key_seconds_best"] / result["shared_seconds_best"]
    result["per_key_seconds_each"] = result["per-key_seconds_best"] / len(keys)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
