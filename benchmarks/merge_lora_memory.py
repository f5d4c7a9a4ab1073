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
        [--quick] [--paths head sdadapt before] [--before SRC]

``--quick``: only the UNet's first up block (LDM ``output_blocks.0-2``: three 1280-channel resnets and the
upsampler, SD1.5's largest layers; a 324 MiB checkpoint) — each bake in seconds, the per-layer peaks the same.
``--before SRC``: a third path, ``before``, the bake of another sdadapt source tree (e.g. ``git archive HEAD
src | tar -x -C DIR``, then ``--before DIR/src``), compared bit for bit with ``sdadapt``; ``--paths`` picks the
paths run (default ``head sdadapt``, plus ``before`` when given).

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
def make_full(path: Path, keep=None) -> Path:
    """A full-delta file (``diff``, and ``diff_b`` where the layer has a bias; fp16, values ~N(0, 0.002)) on
    merge_lora_bake's layers (``keep(name)``: only those it accepts)."""
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
                part in name for part in (".attentions.", ".resnets.", "samplers.")) or (keep is not None and not keep(name)):
            continue
        state[f"{name}.diff"] = torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.002, generator=g)
        if key[: -len("weight")] + "bias" in shapes:
            state[f"{name}.diff_b"] = torch.empty(shape[0], dtype=torch.float16).normal_(0.0, 0.002, generator=g)
    save_kohya(path, {"unet": state}, base_model="sd1")
    return path


#: --quick: the first up block (LDM output_blocks.0-2 = diffusers up_blocks.0)
QUICK_CHECKPOINT = tuple(f"model.diffusion_model.output_blocks.{i}." for i in range(3))
QUICK_LAYERS = "up_blocks.0."


def make_inputs(work: Path, family: str, *, quick: bool = False) -> tuple[Path, Path]:
    from merge_lora_bake import make_checkpoint, make_lora

    tag = "-quick" if quick else ""
    keep_key = (lambda key: key.startswith(QUICK_CHECKPOINT)) if quick else None
    keep_layer = (lambda name: name.startswith(QUICK_LAYERS)) if quick else None
    base = make_checkpoint(work / f"sd15-unet{tag}.safetensors", keep_key)
    lora = (make_full(work / f"full{tag}.safetensors", keep_layer) if family == "full"
            else make_lora(work / f"{family}{tag}.safetensors", family, keep_layer))
    return base, lora


# --------------------------------------------------------------------------- one bake (child)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(path: str, base: str, lora: str, out: str) -> dict:
    """Bake ``lora`` into ``base`` with ``path`` ("head", or "sdadapt" / "before": the BakedCheckpoint of the
    sdadapt on PYTHONPATH); the numbers, as a dict."""
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


def run_child(path: str, base: Path, lora: Path, out: Path, *, src: Path = ROOT / "src") -> dict:
    out.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", path, str(base), str(lora), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)},
    )
    if result.returncode:
        raise SystemExit(f"the {path} bake of {lora.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--work", default=None, help="folder for the inputs and outputs (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_lora_memory.json"))
    parser.add_argument("--quick", action="store_true", help="only the first up block (seconds a bake)")
    parser.add_argument("--before", default=None, metavar="SRC", help="another sdadapt source tree: the 'before' path")
    parser.add_argument("--paths", nargs="+", default=None, choices=["head", "sdadapt", "before"])
    parser.add_argument("--child", nargs=4, metavar=("PATH", "BASE", "LORA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = args.paths or ["head", "sdadapt", *(["before"] if args.before else [])]
    if "before" in paths and not args.before:
        parser.error("--paths before needs --before SRC")
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
            base, lora = make_inputs(work, family, quick=args.quick)
            runs = {}
            for path in paths:  # (fresh processes: the order does not matter for the peaks)
                src = Path(args.before) if path == "before" else ROOT / "src"
                runs[path] = run_child(path, base, lora, work / f"{path}.safetensors", src=src)
                r = runs[path]
                print(f"{family:5} {lora.stat().st_size / 2**20:>6.0f} {path:8} {r['wall_s']:>7.1f} {r['cpu_s']:>6.1f} "
                      f"{r['peak_rss_mib']:>9.0f} {r['peak_anon_mib']:>10.0f} {r['held_mib']:>7.0f}", flush=True)
            ran = [work / f"{path}.safetensors" for path in paths]
            equal = all(same_files(ran[0], other) for other in ran[1:])
            rows.append({"family": family, "file_mib": lora.stat().st_size / 2**20,
                         "checkpoint_mib": base.stat().st_size / 2**20, "bit_identical": equal, **runs})
            if not equal:
                raise SystemExit(f"{family}: the bakes ({', '.join(paths)}) differ; the change must be bit-identical")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"checkpoint": "SD1.5 UNet shapes (sd1-unet layout), fp16, random"
              + (" — --quick: output_blocks.0-2 only" if args.quick else ""), "strength": 0.8, **environment(),
              "rows": rows}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
