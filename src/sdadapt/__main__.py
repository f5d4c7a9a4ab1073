"""``python -m sdadapt``: the jobs a person runs from a shell."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import describe_file

    summary = describe_file(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"file:       {summary['file']}")
    print(f"kind:       {summary['kind']}")
    print(f"tensors:    {summary['tensors']}")
    print(f"size:       {summary['size_bytes'] / 2**20:.2f} MiB ({summary['size_bytes']} bytes)")
    print(f"dtypes:     {', '.join(f'{k} x{v}' for k, v in summary['dtypes'].items())}")
    for field in ("modules", "components", "algorithms", "ranks", "alphas"):
        if field in summary:
            value = summary[field]
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
            print(f"{field + ':':<11} {text}")
    metadata = summary["metadata"]
    print(f"metadata:   {len(metadata)} entries")
    for key in sorted(metadata):
        value = metadata[key]
        if len(value) > 100:
            value = value[:97] + "..."
        print(f"  {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdadapt",
        description="sdadapt: adapt Stable-Diffusion-style models (LoRA family, embeddings, merges).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = sub.add_parser(
        "inspect",
        help="say what a weights file is (kohya/diffusers/peft LoRA, LyCORIS, embedding, hypernetwork, checkpoint)",
        description="Detect what a weights file is and print its module count, ranks, alphas, dtypes, size and metadata.",
    )
    inspect.add_argument("file", help=".safetensors (or legacy .pt/.ckpt/.bin, read with weights_only=True)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    from .formats import WeightFileError

    try:
        return int(args.run(args))
    except (WeightFileError, OSError, ValueError) as exc:
        # one line, no traceback: the message names the file and the fix
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
