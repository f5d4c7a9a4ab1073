"""Checkpoint merge: sdadapt's streaming engine vs load-everything-then-merge (A1111's way).

Writes two synthetic checkpoints with the real key layout and shapes of SD1.5 (UNet 860M + CLIP-L
123M + VAE 84M parameters, ~2 GB in fp16) or SDXL (~6.9 GB), random fp16 values, then runs each
merge in a fresh subprocess and reports wall time and peak RSS (the child's ``VmHWM``), and
the throughput of a plain file copy of one input as the I/O ceiling:

* ``sdadapt``: ``merge_file(weighted-sum, alpha 0.5)``, streaming, no recipe (no hashing);
* ``sdadapt + recipe``: the same with the recipe metadata (sha256 of both inputs: one extra read each);
* ``load-all (A1111)``: ``load_file`` both, ``A[k] = (1 - a)·A[k] + a·B[k]`` in the stored dtype into
  A's dict (as ``modules/extras.py`` does), ``save_file``;
* ``file copy``: ``shutil.copyfile`` of one input.

    python benchmarks/merge.py                 # --scale sd15 (default), also small / sdxl
    python benchmarks/merge.py --scale sdxl --skip-load-all   # when RAM is short

Prints a markdown table; writes ``benchmarks/results/merge.json`` (one entry per scale).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared synthetic layouts

_CHILD = r"""
import json, os, resource, shutil, sys, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
mode, a, b, out = sys.argv[1:5]
start = time.perf_counter()
if mode.startswith("sdadapt"):
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), out, save_recipe=(mode == "sdadapt+recipe"), overwrite=True)
elif mode == "load-all":
    from safetensors.torch import load_file, save_file
    alpha = 0.5
    theta_1 = load_file(b)
    theta_0 = load_file(a)
    for key in theta_0:
        if "model" in key and key in theta_1 and theta_0[key].is_floating_point():
            theta_0[key] = (1 - alpha) * theta_0[key] + alpha * theta_1[key]
    del theta_1
    save_file(theta_0, out)
elif mode == "copy":
    shutil.copyfile(a, out)
elif mode == "baseline":
    import safetensors.torch, sdadapt.merge.engine
seconds = time.perf_counter() - start
try:  # VmHWM: this process image's peak RSS (ru_maxrss can carry the parent's over fork+exec)
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak}))
"""


def _child(mode: str, a: Path, b: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(a), str(b), str(out)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _make_inputs(scale: str, folder: Path) -> tuple[Path, Path, dict]:
    from merge_layouts import layout, write_random_checkpoint

    if scale == "small":
        shapes = dict(layout("sd1-unet"))  # the real SD1.5 UNet with a tiny CLIP and VAE
        architecture = "sd1"
    else:
        shapes = layout(scale)
        architecture = "sd1" if scale == "sd15" else "sdxl"
    ids_key = ("cond_stage_model.transformer.text_model.embeddings.position_ids" if architecture == "sd1"
               else "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    extra = {ids_key: torch.arange(77 if scale != "small" else 8).reshape(1, -1)}
    paths = []
    for name, seed in (("a", 1), ("b", 2)):
        path = folder / f"{scale}-{name}.safetensors"
        if not path.exists():
            write_random_checkpoint(path, shapes, seed=seed, extra=extra)
        paths.append(path)
    numel = {part: 0 for part in ("unet", "text_encoders", "vae")}
    for key, shape in shapes.items():
        part = ("unet" if key.startswith("model.diffusion_model.") else
                "vae" if key.startswith("first_stage_model.") else "text_encoders")
        n = 1
        for d in shape:
            n *= d
        numel[part] += n
    largest = max(shapes.values(), key=lambda s: torch.Size(s).numel())
    info = {"tensors": len(shapes) + 1, "parameters": numel, "largest_tensor": list(largest),
            "file_bytes": paths[0].stat().st_size}
    return paths[0], paths[1], info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["small", "sd15", "sdxl"], default="sd15")
    parser.add_argument("--dir", default=None, help="folder for the synthetic checkpoints (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--skip-load-all", action="store_true", help="skip the load-everything baseline (needs ~2x model RAM)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sdadapt-merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        a, b, info = _make_inputs(args.scale, folder)
        generate = time.perf_counter() - t0
        rows = {"baseline (import torch + sdadapt)": _child("baseline", a, b, folder / "none", args.threads)}
        modes = ["copy", "sdadapt", "sdadapt+recipe"] + ([] if args.skip_load_all else ["load-all"])
        for mode in modes:
            out = folder / f"out-{mode}.safetensors"
            rows[mode] = _child(mode, a, b, out, args.threads)
            out.unlink(missing_ok=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    size = info["file_bytes"]
    base_rss = rows["baseline (import torch + sdadapt)"]["peak_rss"]
    labels = {"copy": "file copy (one input)", "sdadapt": "sdadapt streaming", "sdadapt+recipe": "sdadapt + recipe (sha256)",
              "load-all": "load-all then merge (A1111)"}
    lines = [
        f"### merge benchmark: {args.scale} ({size / 2**30:.2f} GiB per fp16 input, {info['tensors']} tensors, "
        f"largest {info['largest_tensor']})",
        "",
        "| method | time (s) | read+write throughput (GiB/s) | peak RSS (MiB) | above `import torch` (MiB) |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        row = rows[mode]
        moved = size * (2 if mode == "copy" else 3)  # bytes read + written
        row["throughput_gib_s"] = moved / row["seconds"] / 2**30
        row["rss_above_baseline"] = row["peak_rss"] - base_rss
        lines.append(f"| {labels[mode]} | {row['seconds']:.1f} | {row['throughput_gib_s']:.2f} | "
                     f"{row['peak_rss'] / 2**20:.0f} | {row['rss_above_baseline'] / 2**20:.0f} |")
    print("\n".join(lines))
    results_file = ROOT / "benchmarks" / "results" / "merge.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(results_file.read_text()) if results_file.exists() else {}
    existing[args.scale] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "input": info,
        "generate_seconds": generate,
        "baseline_rss": base_rss,
        "results": {labels.get(k, k): v for k, v in rows.items()},
        "notes": "each method in a fresh subprocess; inputs just written (page cache warm); peak RSS = VmHWM of the child",
    }
    results_file.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\nwrote {results_file.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
