"""``merge-lora`` memory on an SD1.5-size UNet: the bake as it was at 8eb03ad vs as it is (peak RSS, held bytes, time).

Inputs (no download, every value random): ``merge_lora_bake.py``'s fp16 checkpoint with the real SD1.5 UNet's keys
and shapes, and fp16 adapter files in kohya's key layout on every Linear / Conv2d of the UNet's attention blocks,
resnets and down/up-samplers: rank-16 LoRA, LoHa and LoKr (``merge_lora_bake.py``'s) and a full delta
(``diff`` and ``diff_b``: the size of those layers' weights, 1.6 GiB).

Two paths, each bake in a fresh subprocess (so every peak is its own):

* ``head``: 8eb03ad's bake (``tests/merge_lora_head.py``'s transcription): each layer's module moved to float32
  in place by the delta it computes and kept so (an fp16 file's layers end up holding twice its size), three
  reductions per merged tensor (``has_nonfinite``, then ``cast_checked``'s own ``has_nonfinite`` and ``aminmax``),
  ``lora_delta_weight``'s product then scaled copy, ``load_lora`` holding the file it read to tell its kind while
  the loader reads it again (two copies of the file at once);
* ``sdadapt``: :func:`sdadapt.loratools.bake.BakedCheckpoint` as it is: one copy of the file read, modules kept
  at the file's dtype, each delta computed on a float32 working copy of one module, one reduction per tensor, the
  product scaled in place.

Per bake: wall and CPU seconds; ``peak_rss_mib`` (``VmHWM``, the process's resident high-water mark: every
resident page, the checkpoint's memory-mapped pages as they are read included; not ``ru_maxrss``, which Linux
carries over from the parent's memory at the fork); ``peak_anon_mib`` (the largest ``RssAnon`` a
thread sampling ``/proc/self/status`` every 2 ms saw: the process's own allocations, torch's included, without
the file mapping; a sampled peak can miss a spike shorter than that); ``held_mib`` (the bytes of the modules'
parameters and buffers at the end of the bake: what the adapter file costs for as long as the bake lives), all
over ``baseline`` (after the imports, before the bake). Both outputs are compared tensor by tensor (the change
must not move a bit).

    OMP_NUM_THREADS=2 python benchmarks/merge_lora_memory.py [--families lora loha lokr full] [--work DIR]

Writes ``benchmarks/results/merge_lora_memory.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared synthetic layouts, the HEAD transcription
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import environment, write_result  # noqa: E402

FAMILIES = ("lora", "loha", "lokr", "full")


# ----------------------------------------------------------------------------------- inputs
def make_full(path: Path) -> Path:
    """A full-delta file (``diff``, and ``diff_b`` where the layer has a bias; fp16, values ~N(0, 0.002)) on
    merge_lora_bake's layers."""
    from merge_layouts import SD15_UNET, diffusers_shapes

    from sdadapt.formats import save_kohya

    if path.exists():
        return path
    g = torch.Generator().manual_seed(4)
    state = {}
    shapes = diffusers_shapes(SD15_UNET)
    for key, shape in shapes.items():
        name = key[len("unet."):-len(".weight")]
        if not key.endswith(".weight") or len(shape) not in (2, 4) or not any(
                part in name for part in (".attentions.", ".resnets.", "samplers.")):
            continue
        state[f"{name}.diff"] = torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.002, generator=g)
        if key[: -len("weight")] + "bias" in shapes:
            state[f"{name}.diff_b"] = torch.empty(shape[0], dtype=torch.float16).normal_(0.0, 0.002, generator=g)
    save_kohya(path, {"unet": state}, base_model="sd1")
    return path


def make_inputs(work: Path, family: str) -> tuple[Path, Path]:
    from merge_lora_bake import make_checkpoint, make_lora

    base = make_checkpoint(work / "sd15-unet.safetensors")
    lora = make_full(work / "full.safetensors") if family == "full" else make_lora(work / f"{family}.safetensors", family)
    return base, lora


# --------------------------------------------------------------------------- one bake (child)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(path: str, base: str, lora: str, out: str) -> dict:
    """Bake ``lora`` into ``base`` with ``path`` ("head" or "sdadapt"); the numbers, as a dict."""
    from merge_lora_head import HeadBake, head_patched

    from sdadapt.loratools.bake import BakedCheckpoint
    from sdadapt.merge.engine import write_source

    baseline_rss, baseline_anon = _status_kib("VmRSS"), _status_kib("RssAnon")
    peak_anon = [baseline_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cls = HeadBake if path == "head" else BakedCheckpoint
    wall, cpu = time.perf_counter(), time.process_time()
    with head_patched() if path == "head" else contextlib.nullcontext():
        with cls(base, [lora], strengths=0.8) as baked:
            write_source(out, baked, overwrite=True)
            seen, held = set(), 0
            for entries in (*baked._plan.values(), *baked._bias_plan.values()):
                for entry in entries:
                    for t in (*entry.module.parameters(), *entry.module.buffers()):
                        if id(t) not in seen:
                            seen.add(id(t))
                            held += t.numel() * t.element_size()
            layers = sum(len(v) for v in baked._plan.values())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))
    mib = 1024.0
    return {
        "path": path, "layers": layers, "wall_s": wall, "cpu_s": cpu,
        "peak_rss_mib": (_status_kib("VmHWM") - baseline_rss) / mib,
        "peak_anon_mib": (peak_anon[0] - baseline_anon) / mib, "held_mib": held / 2**20,
        "baseline_rss_mib": baseline_rss / mib,
    }


# ------------------------------------------------------------------------------------ parent
def same_files(a: Path, b: Path) -> bool:
    from merge_lora_bake import same_files as same

    return same(a, b)


def run_child(path: str, base: Path, lora: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", path, str(base), str(lora), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    if result.returncode:
        raise SystemExit(f"the {path} bake of {lora.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--work", default=None, help="folder for the inputs and outputs (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_lora_memory.json"))
    parser.add_argument("--child", nargs=4, metavar=("PATH", "BASE", "LORA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="merge-lora-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        print(f"{'file':5} {'MiB':>6} {'path':8} {'wall s':>7} {'CPU s':>6} {'peak RSS':>9} {'peak anon':>10} "
              f"{'held':>7}  (MiB over the baseline)")
        for family in args.families:
            base, lora = make_inputs(work, family)
            runs = {}
            for path in ("head", "sdadapt"):  # (fresh processes: the order does not matter for the peaks)
                runs[path] = run_child(path, base, lora, work / f"{path}.safetensors")
                r = runs[path]
                print(f"{family:5} {lora.stat().st_size / 2**20:>6.0f} {path:8} {r['wall_s']:>7.1f} {r['cpu_s']:>6.1f} "
                      f"{r['peak_rss_mib']:>9.0f} {r['peak_anon_mib']:>10.0f} {r['held_mib']:>7.0f}", flush=True)
            equal = same_files(work / "head.safetensors", work / "sdadapt.safetensors")
            rows.append({"family": family, "file_mib": lora.stat().st_size / 2**20,
                         "checkpoint_mib": base.stat().st_size / 2**20, "bit_identical": equal, **runs})
            if not equal:
                raise SystemExit(f"{family}: the two bakes differ; the change must be bit-identical")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"checkpoint": "SD1.5 UNet shapes (sd1-unet layout), fp16, random", "strength": 0.8, **environment(),
              "rows": rows}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
