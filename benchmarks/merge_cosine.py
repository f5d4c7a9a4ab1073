"""cosine-a / cosine-b: the similarity computed once (pre-pass hands it on) vs computed in both passes.

supermerger's cosine calc modes are two-pass: a pre-pass pools every key's per-column similarity
to ``s_min``/``s_max``, then the merge pass needs the same key's similarity again. sdadapt used to
compute it again in the merge pass (``recompute (old)``, that code kept below as the reference);
now the pre-pass keeps each key's :class:`~sdadapt.merge.supermerger_modes.CosineStatistic` (one
value per column, and a 0-d whole-tensor cosine for cosineA) and ``cosine_merge`` takes it
(``statistic once (sdadapt)``). Random float32 tensors, one thread, in one process:

* per shape of the SD1.5 UNet (every distinct shape timed, best of ``--repeats``, weighted by how
  many keys have it): the pre-pass and the merge pass of each way, summed to a whole-UNet estimate;
* ``--every N``: the engine (``merge_state_dicts``) over every N-th UNet key of an in-memory float32
  SD1.5-shaped model, old wiring vs new (both passes, the cast and the checks included), the two
  ways alternating ``--engine-rounds`` times, the best of each kept.

Every merged tensor is checked bitwise equal between the two ways.

    python benchmarks/merge_cosine.py                 # cosine-a and cosine-b, engine over every 4th key
    python benchmarks/merge_cosine.py --every 0       # the per-shape table only

Prints a markdown table and the JSON it writes to ``benchmarks/results/merge_cosine.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from sdadapt.merge.engine import merge_state_dicts
from sdadapt.merge.operators import OPERATORS, PrePass
from sdadapt.merge.recipe import MergeStep
from sdadapt.merge.supermerger_modes import cosine_key_statistic, cosine_merge, cosine_range

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared synthetic layouts


# ---------------------------------------------------------------- the old path (before the change)


def _flat_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1)) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))


def _columns(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def old_statistic(tensors, *, normalize: bool, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sdadapt's ``cosine_statistic`` before the change (the pre-pass kept only this, for pooling)."""
    a, b = (_columns(t.to(compute_dtype, copy=True)) for t in tensors)
    if normalize:
        return F.cosine_similarity(F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0), dim=0)
    return (F.cosine_similarity(a, b, dim=0) + _flat_cos(a, b)) / 2.0


def old_merge(tensors, alpha: float, *, normalize: bool, s_min: float, s_max: float,
              compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sdadapt's ``cosine_merge`` before the change: the similarity computed again."""
    a, b = (t.to(compute_dtype, copy=True) for t in tensors)
    if not bool(torch.any(a)) or not bool(torch.any(b)):
        return a
    x, y = _columns(a), _columns(b)
    if normalize:
        x, y = F.normalize(x, p=2, dim=0), F.normalize(y, p=2, dim=0)
    similarity = (F.cosine_similarity(x, y, dim=0) + _flat_cos(x, y)) / 2.0
    spread = s_max - s_min
    scaled = (similarity - s_min) / spread if spread != 0 else torch.ones_like(similarity)
    k = (scaled - (abs(alpha) if normalize else alpha)).clip(min=0.0, max=1.0)
    return torch.lerp(b, a, k)


def old_operator(name: str):
    normalize = name == "cosine-a"
    new = OPERATORS[name]
    return dataclasses.replace(
        new,
        fn=lambda tensors, weights, *, base=None, s_min, s_max, compute_dtype=torch.float32: old_merge(
            tensors, weights, normalize=normalize, s_min=s_min, s_max=s_max, compute_dtype=compute_dtype),
        prepass=PrePass(lambda tensors, *, compute_dtype=torch.float32: old_statistic(
            tensors, normalize=normalize, compute_dtype=compute_dtype), cosine_range, new.prepass.skip),
    )


# ---------------------------------------------------------------- timing


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g) * 0.05
    return a, a * 0.8 + torch.randn(shape, generator=g) * 0.03


def per_shape(unet: dict[str, tuple[int, ...]], normalize: bool, repeats: int) -> dict:
    counts = Counter(unet.values())
    s_min, s_max, alpha = -0.2, 0.9, 0.1
    totals = {"old_prepass": 0.0, "old_merge": 0.0, "new_prepass": 0.0, "new_merge": 0.0}
    for shape, count in sorted(counts.items(), key=lambda item: -torch.Size(item[0]).numel()):
        a, b = _pair(shape, len(shape))
        stat = cosine_key_statistic((a, b), normalize=normalize)
        want = old_merge((a, b), alpha, normalize=normalize, s_min=s_min, s_max=s_max)
        got = cosine_merge((a, b), alpha, normalize=normalize, s_min=s_min, s_max=s_max, statistic=stat)
        if not torch.equal(got, want):
            raise AssertionError(f"shape {shape}: the merge with the kept statistic differs from the old one")
        times = {
            "old_prepass": _best(lambda: old_statistic((a, b), normalize=normalize), repeats),
            "old_merge": _best(lambda: old_merge((a, b), alpha, normalize=normalize, s_min=s_min, s_max=s_max), repeats),
            "new_prepass": _best(lambda: cosine_key_statistic((a, b), normalize=normalize), repeats),
            "new_merge": _best(lambda: cosine_merge((a, b), alpha, normalize=normalize, s_min=s_min, s_max=s_max,
                                                    statistic=stat), repeats),
        }
        for name, seconds in times.items():
            totals[name] += seconds * count
    columns = sum(torch.Size(s[1:]).numel() for s in unet.values())
    return {"seconds": totals, "kept_values": columns, "kept_mib_float32": columns * 4 / 2**20,
            "keys": len(unet), "distinct_shapes": len(counts)}


def engine(unet: dict[str, tuple[int, ...]], operator: str, every: int, rounds: int) -> dict:
    from merge_layouts import random_tensor

    keys = list(unet)[::every]
    states = [{k: random_tensor(k, unet[k], torch.float32, seed) for k in keys} for seed in (1, 2)]
    for k in keys:  # B: partly A, so the similarities spread
        states[1][k] = states[0][k] * 0.8 + states[1][k] * 0.6
    step = MergeStep(operator, ("a", "b"), alpha=0.1)
    saved, old_wiring = OPERATORS[operator], old_operator(operator)
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    outputs: dict[str, dict] = {}
    try:
        for _ in range(rounds):  # alternating, best of the rounds: the machine's load hits both ways alike
            for way, wiring in (("old", old_wiring), ("new", saved)):
                OPERATORS[operator] = wiring
                start = time.perf_counter()
                outputs[way], _ = merge_state_dicts(step, states)
                seconds[way].append(time.perf_counter() - start)
    finally:
        OPERATORS[operator] = saved
    old, new = outputs["old"], outputs["new"]
    if any(not torch.equal(new[k], old[k]) for k in old):
        raise AssertionError(f"{operator}: the engine's output differs from the old wiring's")
    old_seconds, new_seconds = min(seconds["old"]), min(seconds["new"])
    return {"keys": len(keys), "parameters": sum(torch.Size(unet[k]).numel() for k in keys),
            "old_seconds": old_seconds, "new_seconds": new_seconds, "all_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="engine run over every N-th UNet key (0: skip it)")
    parser.add_argument("--engine-rounds", type=int, default=2, help="engine runs of each way, alternating (best kept)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from merge_layouts import layout

    unet = {k: s for k, s in layout("sd1-unet").items() if k.startswith("model.diffusion_model.")}
    results: dict = {}
    lines = ["| operator | pass | recompute (old) s | statistic once (sdadapt) s | new/old |", "|---|---|---|---|---|"]
    for operator in ("cosine-a", "cosine-b"):
        row = per_shape(unet, operator == "cosine-a", args.repeats)
        t = row["seconds"]
        old_total, new_total = t["old_prepass"] + t["old_merge"], t["new_prepass"] + t["new_merge"]
        row["ratios"] = {"merge_pass": t["new_merge"] / t["old_merge"], "prepass": t["new_prepass"] / t["old_prepass"],
                         "both_passes": new_total / old_total}
        for label, old, new in (("pre-pass", t["old_prepass"], t["new_prepass"]),
                                ("merge pass", t["old_merge"], t["new_merge"]), ("both", old_total, new_total)):
            lines.append(f"| {operator} | {label} (SD1.5 UNet, per-shape sum) | {old:.2f} | {new:.2f} | {new / old:.2f} |")
        if args.every > 0:
            row["engine"] = run = engine(unet, operator, args.every, args.engine_rounds)
            run["ratio"] = run["new_seconds"] / run["old_seconds"]
            lines.append(f"| {operator} | engine, every {args.every}th UNet key ({run['keys']} keys, "
                         f"{run['parameters'] / 1e6:.0f}M values) | {run['old_seconds']:.2f} | {run['new_seconds']:.2f} | "
                         f"{run['ratio']:.2f} |")
        results[operator] = row
    kept = results["cosine-a"]
    lines.append("")
    lines.append(f"kept between the passes: {kept['kept_values']} values ({kept['kept_mib_float32']:.1f} MiB float32) "
                 f"over {kept['keys']} UNet keys; one value per column (+ one 0-d value per key for cosine-a)")
    print("\n".join(lines))
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": args.threads},
           "repeats": args.repeats, "results": results,
           "notes": "random float32 SD1.5 UNet shapes; per-shape rows: best of the repeats x the number of keys of "
                    "that shape; every merged tensor checked bitwise equal between the two ways"}
    text = json.dumps(out, indent=2)
    print(text)
    results_file = ROOT / "benchmarks" / "results" / "merge_cosine.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
