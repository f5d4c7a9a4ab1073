"""Hostile inputs through the command line, one process per run: counts of what must never happen.

Runs every case of ``tests/hostile_files.py`` (broken and hostile safetensors headers, pickle
attacks in every encoding, zip bombs, regex bombs in file metadata and recipes, nested JSON, hostile
recipes, non-finite tensors and arguments, unusable devices, files that are not files, outputs that
cannot be written, terminal escapes) as ``python -m sdadapt ...`` subprocesses with a time limit,
plus signal runs (SIGTERM and SIGINT in the middle of a merge; SIGKILL, then a rerun to the same
output), and prints the counts:

    tracebacks   a Python traceback on stderr
    hangs        a run over the time limit
    nonfinite    an output file written with NaN/inf (without --allow-nonfinite)
    leftovers    temporary files left beside an output (or an output left by a failed run)
    multiline    an error that is not exactly one ``error: ...`` line
    escapes      a raw control character (ESC, BEL) printed from a file
    advice       torch's "weights_only=False" advice shown
    internal     exit code 1 (an unexpected exception)
    inputs       an input file changed
    code_ran     a pickle payload ran
    wrong_code   an exit code other than the documented one for the case (informational)

    python benchmarks/fuzz_cli.py                  # all cases, 2 at a time
    python benchmarks/fuzz_cli.py --jobs 4 --limit 60 --timeout 60
    python benchmarks/fuzz_cli.py --src /path/to/other/checkout/src   # e.g. count an older version

Exit status 0 when every count but ``wrong_code`` is 0. Writes ``benchmarks/results/fuzz_cli.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared hostile inputs
sys.path.insert(0, str(ROOT / "src"))

import hostile_files as H  # noqa: E402

#: judge() problem kind -> the count it adds to
KINDS = {"traceback": "tracebacks", "hang": "hangs", "nonfinite": "nonfinite", "leftover": "leftovers",
         "not-one-line": "multiline", "escape": "escapes", "advice": "advice", "internal": "internal",
         "input-changed": "inputs", "code-ran": "code_ran", "code": "wrong_code"}
MUST_BE_ZERO = [k for k in KINDS.values() if k != "wrong_code"]


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_case(case: H.Case, *, src: Path, timeout: float, marker: Path) -> tuple[H.Case, dict[str, str], float]:
    before = {path: H.sha256(path) for path in case.inputs}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "sdadapt", *case.argv], capture_output=True, text=True,
                              errors="replace", timeout=timeout, env=_env(src), stdin=subprocess.DEVNULL)
        outcome = H.Outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)
    except subprocess.TimeoutExpired:
        outcome = H.Outcome(None, "", "", time.perf_counter() - started)
    return case, H.judge(case, outcome, before, marker), outcome.seconds


def _merge_inputs(folder: Path) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        state = {f"{H.U}input_blocks.{i}.1.proj_in.weight": torch.randn(384, 384, generator=g) for i in range(48)}
        paths.append(str(folder / f"m{seed}.safetensors"))
        save_file(state, paths[-1])
    return paths[0], paths[1]


def signal_runs(root: Path, *, src: Path, timeout: float) -> list[tuple[str, dict[str, str]]]:
    """SIGTERM/SIGINT mid-merge (one line, 143/130, nothing left) and SIGKILL + rerun (stale temp removed)."""
    a, b = _merge_inputs(root / "signal_in")
    results = []
    for name, sig, code in (("SIGTERM", signal.SIGTERM, 143), ("SIGINT", signal.SIGINT, 130), ("SIGKILL", signal.SIGKILL, -9)):
        out_dir = root / f"signal_{name}"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "merged.safetensors"
        argv = [sys.executable, "-m", "sdadapt", "merge", "slerp", a, b, "--alpha", "0.3", "-o", str(out), "--no-recipe",
                "--compute-dtype", "fp64"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(src))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not H.leftovers(out_dir):
            time.sleep(0.005)
        problems: dict[str, str] = {}
        if proc.poll() is not None:
            problems["code"] = "finished before the signal (not counted)"
            results.append((f"signal {name}", problems))
            continue
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            results.append((f"signal {name}", {"hang": "did not stop after the signal"}))
            continue
        if name == "SIGKILL":  # cannot be caught: the rerun must clean up
            rerun = subprocess.run(argv + ["--overwrite"], capture_output=True, text=True, env=_env(src), timeout=timeout)
            err = rerun.stderr
            if rerun.returncode != 0:
                problems["code"] = f"rerun exit {rerun.returncode}: {err[-200:]}"
        else:
            if proc.returncode != code:
                problems["code"] = f"exit {proc.returncode}, expected {code}"
            lines = [line for line in err.splitlines() if line.strip()]
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems["not-one-line"] = err[-300:]
            if out.exists():
                problems["leftover"] = "partial output under the final name"
        if "Traceback (most recent call last)" in err:
            problems["traceback"] = err[-300:]
        if H.leftovers(out_dir):
            problems["leftover"] = f"temporary files left: {H.leftovers(out_dir)}"
        results.append((f"signal {name}", problems))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as a hang")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the sdadapt source to run (PYTHONPATH)")
    parser.add_argument("--no-signals", action="store_true", help="skip the SIGTERM/SIGINT/SIGKILL runs")
    parser.add_argument("--verbose", action="store_true", help="print every problem")
    args = parser.parse_args()

    counts: Counter[str] = Counter({k: 0 for k in KINDS.values()})
    examples: dict[str, list[str]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdadapt-fuzz-") as tmp:
        root = Path(tmp)
        inputs = H.build_inputs(root / "in")
        cases = H.cli_cases(root, inputs) + [H.train_case(root, inputs)]
        cases = cases[: args.limit] if args.limit else cases
        marker = root / "in" / "PWNED"
        slowest = (0.0, "")
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            runs = pool.map(lambda c: run_case(c, src=args.src, timeout=args.timeout, marker=marker), cases)
            for case, problems, seconds in runs:
                slowest = max(slowest, (seconds, case.name))
                for kind, detail in problems.items():
                    counts[KINDS[kind]] += 1
                    examples.setdefault(KINDS[kind], []).append(f"{case.name}: {detail[:240]}")
        signals = [] if args.no_signals else signal_runs(root, src=args.src, timeout=args.timeout * 2)
        for name, problems in signals:
            for kind, detail in problems.items():
                if detail.startswith("finished before"):
                    continue
                counts[KINDS[kind]] += 1
                examples.setdefault(KINDS[kind], []).append(f"{name}: {detail[:240]}")
        code_ran = marker.exists()
    if code_ran:
        counts["code_ran"] += 1
    total = len(cases) + len(signals)
    print(f"{total} command-line runs ({len(cases)} cases + {len(signals)} signal runs) in "
          f"{time.perf_counter() - started:.0f} s; slowest case {slowest[0]:.1f} s ({slowest[1]})")
    for kind in list(KINDS.values()):
        print(f"  {kind:<11} {counts[kind]}")
        if counts[kind] and (args.verbose or kind in MUST_BE_ZERO):
            for line in examples.get(kind, [])[: None if args.verbose else 5]:
                print(f"      {line}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "fuzz_cli.json").write_text(json.dumps(
        {"runs": total, "counts": dict(counts), "src": str(args.src), "timeout_s": args.timeout}, indent=2) + "\n")
    return 0 if all(counts[k] == 0 for k in MUST_BE_ZERO) else 1


if __name__ == "__main__":
    sys.exit(main())
