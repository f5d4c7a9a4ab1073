"""Startup of ``python -m sdadapt``: wall time of ``--help``, each command's ``--help`` and a usage error, and of
``import sdadapt``, each in a fresh interpreter, for this tree and (``--before SRC``) another one.

The lazy package (``sdadapt/__init__.py``, PEP 562) and the summary parser (``sdadapt.cli._summary_parser``: a
command line that names no command gets the commands' names and help lines only) keep torch out of these; before,
``import sdadapt`` imported every submodule and torch (~2 s here). Each command line is run ``--repeats`` times,
alternating the trees, and the median wall time kept; whether torch was imported is read from ``-X importtime``.

    mkdir /tmp/before && git archive HEAD src | tar -x -C /tmp/before   # the last commit's tree
    python benchmarks/cli_startup.py --before /tmp/before/src [--repeats 5]

Prints a markdown table and writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench import environment, write_result

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

#: (label, argv after ``python``)
CASES = [
    ("python -c 'import sdadapt'", ["-c", "import sdadapt"]),
    ("python -m sdadapt --help", ["-m", "sdadapt", "--help"]),
    ("python -m sdadapt --version", ["-m", "sdadapt", "--version"]),
    ("python -m sdadapt trian (usage error)", ["-m", "sdadapt", "trian"]),
    ("python -m sdadapt inspect --help", ["-m", "sdadapt", "inspect", "--help"]),
    ("python -m sdadapt extract-lora --help", ["-m", "sdadapt", "extract-lora", "--help"]),
    ("python -m sdadapt extract-lora --net 4 (usage error)", ["-m", "sdadapt", "extract-lora", "a", "b", "-o", "c",
                                                              "--net", "4"]),
    ("python -m sdadapt convert --help", ["-m", "sdadapt", "convert", "--help"]),
    ("python -m sdadapt train --help", ["-m", "sdadapt", "train", "--help"]),
    ("python -m sdadapt generate --help", ["-m", "sdadapt", "generate", "--help"]),
    ("python -m sdadapt merge --help", ["-m", "sdadapt", "merge", "--help"]),
    ("python -m sdadapt merge ties --help", ["-m", "sdadapt", "merge", "ties", "--help"]),
    ("python -m sdadapt merge cosine-a --help", ["-m", "sdadapt", "merge", "cosine-a", "--help"]),
    ("python -m sdadapt merge weighted-sum --beta 1 (usage error)", ["-m", "sdadapt", "merge", "weighted-sum", "a",
                                                                    "b", "--beta", "1"]),
    ("python -m sdadapt merge (no operator: its help, exit 2)", ["-m", "sdadapt", "merge"]),
    ("python -m sdadapt merge weighted-sum --alpha NOPE (unknown preset)", ["-m", "sdadapt", "merge", "weighted-sum",
                                                                          "a", "b", "--alpha", "NOPE", "-o", "c"]),
    ("python -m sdadapt merge weighted-sum (no -o: refused in the run)", ["-m", "sdadapt", "merge", "weighted-sum",
                                                                         "a", "b", "--alpha", "0.3"]),
]


def run_once(src: Path, argv: list[str]) -> tuple[float, bool]:
    """Wall seconds of ``python -X importtime ARGV`` with ``src`` first on the path, and whether it imported torch."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    torch = any(line.startswith("import time:") and line.split("|")[-1].strip() == "torch"
                for line in done.stderr.splitlines())
    return seconds, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--before", type=Path, help="the src folder of the tree to compare with (e.g. the last commit's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cli_startup.json")
    args = parser.parse_args()
    trees = {"now": SRC, **({"before": args.before} if args.before else {})}
    rows = []
    for label, argv in CASES:
        times: dict[str, list[float]] = {name: [] for name in trees}
        torch: dict[str, bool] = {}
        for _ in range(args.repeats):
            for name, src in trees.items():  # (alternating: a load change hits both)
                seconds, torch[name] = run_once(src, argv)
                times[name].append(seconds)
        row = {"command": label, **{f"{name}_s": statistics.median(t) for name, t in times.items()},
               **{f"{name}_torch": torch[name] for name in trees}}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\nmedian of {args.repeats} fresh interpreters, wall seconds (load average {load[0]:.1f})\n")
    head = "| command | " + " | ".join(f"{name} s | torch" for name in trees) + (" | speed-up |" if "before" in trees else "")
    print(head)
    print("|" + "---|" * (1 + 2 * len(trees) + ("before" in trees)))
    for row in rows:
        cells = " | ".join(f"{row[f'{name}_s']:.2f} | {'yes' if row[f'{name}_torch'] else 'no'}" for name in trees)
        speed = f" | {row['before_s'] / row['now_s']:.1f}x |" if "before" in trees else ""
        print(f"| `{row['command']}` | {cells}{speed}")
    write_result(args.out, {"environment": environment(), "load_average": load, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
