"""``python -m sdadapt``: the jobs a person runs from a shell, one module per command group.

* :mod:`.inspect` — ``inspect``;
* :mod:`.train` — ``demo``, ``train``;
* :mod:`.loratools` — ``extract-lora``, ``resize-lora``, ``merge-lora``, ``combine-loras``;
* :mod:`.merge` — ``merge`` and one sub-command per merge operator;
* :mod:`.options` — the options they all share (``-o/--out``, ``--overwrite``, ``-q/--quiet``,
  ``--dtype``, comma-separated numbers) and the progress bar.

Here: the parser and :func:`main`, which maps errors to one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser with every command (each module's ``register``)."""
    from . import inspect, loratools, merge, train

    parser = argparse.ArgumentParser(
        prog="python -m sdadapt",
        description="sdadapt: adapt Stable-Diffusion-style models (LoRA family, embeddings, merges). Every command "
        "that writes a file takes -o/--out, --overwrite, -q/--quiet and --dtype {keep,fp32,fp16,bf16}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect.register(sub)
    train.register(sub)  # demo, train
    loratools.register(sub)  # extract-lora, resize-lora, merge-lora, combine-loras
    merge.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``error: <one line>`` on stderr and exit code 2 for the errors a user can fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    from ..formats import WeightFileError
    from .options import close_progress

    try:
        return int(args.run(args))
    except (WeightFileError, OSError, ValueError, ImportError) as exc:
        close_progress()  # the message starts its own line, not the end of a half-drawn bar
        # one line, no traceback: the message names the file and the fix
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        close_progress()
