"""The command line's parser: what ``python -m sdadapt COMMAND ...`` builds before it runs.

``main`` builds only the parser of the command its command line names (``sdadapt.cli._parser_for``); the
reference column builds every command's (``build_parser()``, as ``main`` did before: the ``merge``
operators' 26 sub-parsers are most of it). Both ways in one process, process CPU milliseconds, median of
``--repeats``; also a whole in-process ``main`` run of a cheap command (``inspect FILE``) each way.

    python benchmarks/cli_parser.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sdadapt.cli as cli


def cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    cli.build_parser()  # (imports every command module once, for both columns)
    rows = []
    for command in ("inspect", "train", "generate", "extract-lora", "convert", "merge"):
        rows.append({"command": command, "whole_ms": cpu_ms(cli.build_parser, args.repeats),
                     "one_ms": cpu_ms(lambda: cli._parser_for([command]), args.repeats)})
    with tempfile.TemporaryDirectory() as folder:
        from sdadapt.formats import save_lora

        file = Path(folder) / "a.safetensors"
        save_lora(file, {"unet": {"down_blocks.0.attentions.0.proj_in.lora_down.weight": torch.zeros(2, 4),
                                  "down_blocks.0.attentions.0.proj_in.lora_up.weight": torch.zeros(4, 2),
                                  "down_blocks.0.attentions.0.proj_in.alpha": torch.tensor(2.0)}}, format="kohya")

        def run_main() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                cli.main(["inspect", str(file)])

        one = cpu_ms(run_main, args.repeats)
        real = cli._parser_for
        cli._parser_for = lambda argv: cli.build_parser()  # the reference: every command's parser
        try:
            whole = cpu_ms(run_main, args.repeats)
        finally:
            cli._parser_for = real
        rows.append({"command": "main(inspect FILE)", "whole_ms": whole, "one_ms": one})
    print(f"{'command':<22} {'whole parser ms':>16} {'its parser ms':>14} {'ratio':>7}")
    for row in rows:
        print(f"{row['command']:<22} {row['whole_ms']:16.1f} {row['one_ms']:14.1f} {row['whole_ms'] / row['one_ms']:7.1f}x")
    out = Path(__file__).parent / "results" / "cli_parser.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
