"""``python -m sdadapt inspect FILE``: say what a weights file is (read-only: no output options)."""

from __future__ import annotations

import argparse
import json

from .options import safe_text

__all__ = ["register"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..formats import describe_file

    summary = describe_file(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))  # (ensure_ascii: control characters come out as \u escapes)
        return 0
    print(f"file:       {safe_text(summary['file'])}")
    print(f"kind:       {summary['kind']}")
    print(f"tensors:    {summary['tensors']}")
    print(f"size:       {summary['size_bytes'] / 2**20:.2f} MiB ({summary['size_bytes']} bytes)")
    print(f"dtypes:     {', '.join(f'{k} x{v}' for k, v in summary['dtypes'].items())}")
    fields = ("model", "modules", "components", "family", "algorithms", "ranks", "alphas",  # adapters, checkpoints
              "name", "vectors", "dims", "encoders", "written_by", "step",  # embeddings
              "widths", "layer_structure", "activation_func",  # hypernetworks
              "use")  # the commands that take it
    for field in fields:
        if summary.get(field) is not None:
            value = summary[field]
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
            print(f"{field + ':':<11} {safe_text(text)}")
    metadata = summary["metadata"]
    print(f"metadata:   {len(metadata)} entries")
    for key in sorted(metadata):
        value = safe_text(metadata[key])  # text from the file: control characters (ESC, BEL ...) shown escaped
        if len(value) > 100:
            value = value[:97] + "..."
        print(f"  {safe_text(key)[:200]}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect`` to a CLI."""
    inspect = sub.add_parser(
        "inspect",
        help="say what a weights file is (kohya/diffusers/peft LoRA, LyCORIS, embedding, hypernetwork, checkpoint)",
        description="Detect what a weights file is and print its module count, ranks, alphas, dtypes, size and metadata.",
    )
    inspect.add_argument("file", help=".safetensors (or legacy .pt/.ckpt/.bin, read with weights_only=True)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_cmd_inspect)
