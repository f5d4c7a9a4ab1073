"""``convert MODEL.safetensors --to diffusers`` and back: sdadapt against diffusers' own single-file loader.

One process, one random fp16 SD1.5 LDM checkpoint made by the script (real key names and shapes:
``tests/merge_layouts.py``; ``--small``: ``tests/tiny_checkpoints.py``'s tiny SD1, for a quick run). Phases, in order:

1. ``sdadapt ldm->diffusers``: :func:`sdadapt.jobs.convert_model.convert_model` ``to="diffusers"`` (what
   ``python -m sdadapt convert IN -o OUT --to diffusers`` runs: read, write, read back and compare);
2. ``diffusers ldm->diffusers``: ``StableDiffusionPipeline.from_single_file(IN, config=FOLDER,
   local_files_only=True, torch_dtype=float16)`` + ``save_pretrained`` (FOLDER: phase 1's output, for its
   JSON configs and tokenizer only — diffusers needs them offline);
3. ``sdadapt diffusers->ldm``: ``convert_model`` ``to="ldm"`` of phase 1's folder;
4. ``diffusers diffusers->ldm``: the installed diffusers package has no such function (its
   ``scripts/convert_diffusers_to_original_stable_diffusion.py`` lives in the repository, not the
   package): reported as not available.

Each phase runs ``--repeats`` times (default 2; the two forward conversions in alternating order, outputs
removed in between: the first writer of a run meets a cold page cache and dirty-page write-back the later one
does not); the table gives the best time. Per phase: wall seconds, the phase's peak RSS (``VmHWM`` of ``/proc/self/status``, reset before each
phase by writing 5 to ``/proc/self/clear_refs``; no psutil) and the bytes written. The two diffusers
folders are compared tensor by tensor (``max |Δ|`` over the UNet, VAE and text encoder), so the table
compares equal work.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/convert_checkpoint.py --small
    OMP_NUM_THREADS=1 python benchmarks/convert_checkpoint.py          # SD1.5 size (a 2.1 GB input)

Writes ``benchmarks/results/convert_checkpoint-{small,sd15}-cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared synthetic layouts


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux ``clear_refs`` 5); ``False`` where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _phase(name: str, fn: Callable[[], Path], rows: dict[str, dict]) -> None:
    """Run ``fn`` once and fold its seconds / peak RSS / output bytes into ``rows[name]`` (best seconds,
    largest peak, every time kept)."""
    import gc

    gc.collect()
    exact = _reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    row = rows.setdefault(name, {"phase": name, "seconds": seconds, "peak_rss": peak, "times": [],
                                 "peak_rss_method": "VmHWM reset per phase" if exact else "VmHWM since process start"})
    row["times"].append(seconds)
    row["seconds"] = min(row["times"])
    row["peak_rss"] = max(row["peak_rss"], peak)
    row["output_bytes"] = _size(out)
    gc.collect()


def _remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def make_input(folder: Path, *, small: bool) -> Path:
    """A random fp16 SD1 LDM checkpoint (tiny with ``small``, else SD1.5's shapes) in ``folder``."""
    name = "tiny-sd1" if small else "sd15"
    path = folder / f"{name}.safetensors"
    if path.exists():
        return path
    if small:  # (tests/tiny_checkpoints.py: SD's 32 norm groups, which the shapes-only config derivation assumes)
        from tiny_checkpoints import tiny_sd1_parts, write_single_file

        parts = tiny_sd1_parts()
        for module in parts.values():
            module.half()
        return write_single_file(parts, path, architecture="sd1")
    from merge_layouts import layout, write_random_checkpoint

    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    return write_random_checkpoint(path, layout(name), seed=1, extra={ids: torch.arange(77).reshape(1, -1)})


def _text_model_free(key: str) -> str:
    return key.removeprefix("text_model.")


def max_difference(a: Path, b: Path) -> float:
    """``max |Δ|`` over the tensors of the UNet, VAE and text-encoder weight files of two diffusers folders."""
    from safetensors import safe_open

    worst = 0.0
    for part in ("unet", "vae", "text_encoder"):
        files_a = sorted((a / part).glob("*.safetensors"))
        files_b = sorted((b / part).glob("*.safetensors"))
        if [f.name for f in files_a] != [f.name for f in files_b] or not files_a:
            raise SystemExit(f"{part}: the two folders hold different weight files: {files_a} vs {files_b}")
        for fa, fb in zip(files_a, files_b):
            with safe_open(str(fa), "pt") as ta, safe_open(str(fb), "pt") as tb:
                # (a text encoder's keys with or without ``text_model.``: sdadapt writes the hub's names, diffusers'
                # save_pretrained under transformers 5 drops the prefix; both folders load the same)
                keys_a, keys_b = ({_text_model_free(k): k for k in t.keys()} for t in (ta, tb))
                if set(keys_a) != set(keys_b):
                    raise SystemExit(f"{fa.name}: different keys: {sorted(set(keys_a) ^ set(keys_b))[:5]}")
                for key in keys_a:
                    x, y = ta.get_tensor(keys_a[key]), tb.get_tensor(keys_b[key])
                    if x.shape != y.shape:
                        raise SystemExit(f"{part}/{key}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
                    if x.is_floating_point() and x.numel():
                        worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny SD1 checkpoint (seconds) instead of SD1.5's size")
    parser.add_argument("--work", default=None, help="folder for the input and outputs (default: a temporary one, removed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each phase; the best time is reported")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = "small" if args.small else "sd15"
    out_json = Path(args.out or ROOT / "benchmarks" / "results" / f"convert_checkpoint-{scale}-cpu.json")
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sdadapt.jobs.convert_model import convert_model

    diffusers.utils.logging.set_verbosity_error()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = make_input(work, small=args.small)
        ours, theirs, back = work / "sdadapt-diffusers", work / "diffusers-diffusers", work / "sdadapt-ldm.safetensors"
        rows: dict[str, dict] = {}
        report: dict = {}

        def sdadapt_forward() -> Path:
            report["forward"] = convert_model(source, ours, to="diffusers")
            return ours

        def diffusers_forward() -> Path:
            pipe = StableDiffusionPipeline.from_single_file(str(source), config=str(ours), local_files_only=True,
                                                            torch_dtype=torch.float16)
            pipe.save_pretrained(str(theirs))
            return theirs

        def sdadapt_back() -> Path:
            report["back"] = convert_model(ours, back, to="ldm")
            return back

        forward = [("sdadapt ldm->diffusers", sdadapt_forward), ("diffusers ldm->diffusers", diffusers_forward)]
        for repeat in range(max(1, args.repeats)):
            _remove(ours, theirs, back)
            if repeat % 2:
                # (diffusers reads the configs from sdadapt's folder: it is written first, untimed)
                convert_model(source, ours, to="diffusers")
                _phase(*forward[1], rows)
                _remove(ours)
                _phase(*forward[0], rows)
            else:
                for name, fn in forward:
                    _phase(name, fn, rows)
            _phase("sdadapt diffusers->ldm", sdadapt_back, rows)
        difference = max_difference(ours, theirs)
        rows["diffusers diffusers->ldm"] = {
            "phase": "diffusers diffusers->ldm", "seconds": None, "peak_rss": None, "output_bytes": None,
            "note": "not in the diffusers package (scripts/convert_diffusers_to_original_stable_diffusion.py is in "
                    "its repository only)"}
        rows = [rows[name] for name in ("sdadapt ldm->diffusers", "diffusers ldm->diffusers", "sdadapt diffusers->ldm",
                                        "diffusers diffusers->ldm")]
        result = {
            "scale": scale, "input_bytes": source.stat().st_size, "input_dtype": "float16",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": max(1, args.repeats),
            "max_abs_difference_sdadapt_vs_diffusers_folders": difference,
            "sdadapt_read_back_max_delta": {"forward": report["forward"].max_delta, "back": report["back"].max_delta}
            if hasattr(report.get("forward"), "max_delta") else None,
            "rows": rows,
        }
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'phase':<28}{'seconds':>10}{'peak RSS MiB':>14}{'output MiB':>12}")
    for row in rows:
        if row["seconds"] is None:
            print(f"{row['phase']:<28}{'n/a':>10}{'n/a':>14}{'n/a':>12}   {row['note']}")
            continue
        print(f"{row['phase']:<28}{row['seconds']:>10.2f}{row['peak_rss'] / 2**20:>14.0f}{row['output_bytes'] / 2**20:>12.1f}")
    print(f"input {result['input_bytes'] / 2**20:.1f} MiB; sdadapt vs diffusers folders: max |Δ| {difference:.3g}; "
          f"peak RSS: {rows[0]['peak_rss_method']}; wrote {out_json}")


if __name__ == "__main__":
    main()
