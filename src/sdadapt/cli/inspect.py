"""``python -m sdadapt inspect FILE [FILE ...]``: say what weights files are (read-only: no output options).

Several files are reported in the order given, each under a ``==> FILE <==`` heading (as ``head`` and
``tail`` head theirs); with ``--json`` one file prints its object, several a JSON list of them; with
``--json-lines`` every file prints one compact JSON object on its own line, as it is read, whatever the
number of files (JSON Lines: the stable form for scripts and globs). A file that cannot be read gets its
``error: ...`` line on stderr (in a JSON list and in JSON Lines also ``{"file", "error", "exit_code"}``)
and the others are still reported; the exit code is the highest of the files' codes
(0 when every file was read). A closed standard output (``inspect *.safetensors | head``) ends the
command quietly with 141, an unexpected exception (a bug) stops it as any command's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..plurals import plural
from .options import safe_text

__all__ = ["register"]


def _describe(file: str) -> tuple[dict, int]:
    """``(summary, 0)`` for a file :func:`sdadapt.formats.describe_file` reads, else
    ``({"file", "error", "exit_code"}, exit code)`` with its ``error: ...`` line printed on stderr. An unexpected
    exception (exit code 1: a bug), an interrupt and a broken pipe are raised, for :func:`sdadapt.cli.main` to end
    the command with."""
    from ..errors import INTERNAL_ERROR_CODE, exit_code_for
    from ..formats import describe_file
    from .options import error_line, translate_error

    try:
        image = _image_summary(file)
        return (image, 0) if image is not None else (describe_file(file), 0)
    except Exception as exc:  # noqa: BLE001 - each file's own error, named, then the next file
        error = translate_error(exc)
        code = exit_code_for(error)
        if code == INTERNAL_ERROR_CODE:
            raise
        sys.stdout.flush()  # (the reports before it first, where both streams go to one terminal)
        print(f"error: {error_line(error)}", file=sys.stderr)
        return {"file": file, "error": error_line(error), "exit_code": code}, code


def _image_summary(file: str) -> dict | None:
    """An image's report (A1111's "PNG Info"): ``{"file", "kind", "parameters", "fields", "generate", "not_taken",
    "other_text"}`` — its infotext (a PNG's ``parameters`` text, a JPEG's or WebP's EXIF UserComment; ``None`` for
    a PNG with other text only, e.g. ComfyUI's ``prompt`` / ``workflow``), the fields A1111 reads from it, the
    options ``generate --infotext`` takes from them, the fields it does not take (why) and the PNG's other text
    chunks — or ``None`` for a file that is no PNG, JPEG or WebP.

    Raises:
        ValueError: an image without any of that text.
    """
    from ..image_exif import image_kind
    from ..jobs.infotext_read import infotext_options, parse_infotext, read_infotext

    if file.lower().endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin")):
        return None  # (an image saved under a weights name: describe_file names the mix-up)
    try:
        with open(file, "rb") as handle:
            kind = image_kind(handle.read(12))
    except OSError:
        return None  # (describe_file says what is wrong with it)
    if kind is None:
        return None
    from ..images import read_png_text

    others = {key: value for key, value in read_png_text(file).items() if key != "parameters"} if kind == "png" \
        else {}  # (the PNG's other text: A1111's postprocessing / extras, ComfyUI's prompt / workflow JSON ...)
    comfy = []
    if "prompt" in others:  # (ComfyUI's API graph: the settings its sampler nodes ran with)
        from ..comfy_graph import comfy_samplers

        try:
            comfy = comfy_samplers(others["prompt"])
        except ValueError:  # (another program's "prompt" text)
            comfy = []
    try:
        text = read_infotext(file)
    except ValueError:
        if not others:
            raise
        return {"file": file, "kind": f"{kind.upper()} image without A1111's parameters (its text: "
                f"{', '.join(others)})", "parameters": None, "fields": {}, "generate": {}, "not_taken": [],
                "other_text": others, "comfyui": comfy}
    fields = parse_infotext(text)
    options, not_taken = infotext_options(fields)
    taken = {f"--{name.replace('_', '-')}": list(value) if isinstance(value, (list, tuple)) else value
             if isinstance(value, (str, int, float, bool, type(None))) else str(value)
             for name, value in options.items() if name not in ("prompt", "negative")}
    return {"file": file, "kind": f"{kind.upper()} image with A1111's generation parameters (infotext)",
            "parameters": text, "fields": fields, "generate": taken, "not_taken": not_taken, "other_text": others,
            "comfyui": comfy}


def _print_summary(summary: dict) -> None:
    """One file's report as text lines (``file:``, ``kind:`` ... ``metadata:`` and its entries)."""
    if "parameters" in summary:  # (an image: its infotext, then each field A1111 reads from it)
        print(f"file:       {safe_text(summary['file'])}")
        print(f"kind:       {summary['kind']}")
        print("parameters:" if summary["parameters"] is not None else "parameters: none")
        for line in (summary["parameters"] or "").splitlines():
            print(f"  {safe_text(line)}")
        print(f"fields:     {plural(len(summary['fields']), 'field')}")
        for key, value in summary["fields"].items():
            print(f"  {safe_text(key)}: {safe_text(str(value))}")
        print("generate --infotext takes (besides the prompts):")  # (jobs.infotext_read.infotext_options)
        for option, value in summary["generate"].items():
            words = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            print(f"  {option} {safe_text(shlex.join(words))}")
        for line in summary["not_taken"]:
            print(f"not taken:  {safe_text(line)}")
        for sampler in summary["comfyui"]:  # (read from the graph: generate would not make ComfyUI's image)
            texts = [key for key in sampler if key.startswith(("positive", "negative")) or key == "middle"]
            settings = ", ".join(f"{key} {value}" for key, value in sampler.items()
                                 if key not in ("node", "class_type", "loras", *texts) and value is not None)
            print(f"ComfyUI {sampler['class_type']} (node {sampler['node']}): {safe_text(settings)}")
            for lora in sampler["loras"]:
                print(f"  LoRA {safe_text(lora['lora'])}: model {lora['strength_model']}, "
                      f"clip {lora['strength_clip']}")
            for side in texts:  # (positive, negative; an encoder's other texts: positive_text_l ...)
                if sampler[side] is not None:
                    print(f"  {side}: {safe_text(' '.join(sampler[side].split()))}")
        for key, value in summary["other_text"].items():  # (long JSON cut short: --json has it whole)
            value = " ".join(str(value).split())
            print(f"text {safe_text(key)}: {safe_text(value if len(value) <= 200 else value[:197] + '...')}")
        return
    print(f"file:       {safe_text(summary['file'])}")
    print(f"kind:       {summary['kind']}")
    print(f"tensors:    {summary['tensors']}")
    print(f"size:       {summary['size_bytes'] / 2**20:.2f} MiB ({summary['size_bytes']} bytes)")
    print(f"dtypes:     {', '.join(f'{k} x{v}' for k, v in summary['dtypes'].items())}")
    fields = ("model", "modules", "components", "family", "algorithms", "ranks", "alphas",  # adapters, checkpoints
              "bias_deltas", "dylora", "bundled_embeddings",
              "name", "vectors", "dims", "encoders", "written_by", "step",  # embeddings
              "widths", "layer_structure", "activation_func",  # hypernetworks
              "use")  # the commands that take it
    for field in fields:
        if summary.get(field) is not None:
            value = summary[field]
            text = (", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict)
                    else ", ".join(map(str, value)) if field == "bundled_embeddings" else str(value))
            label = "bundles" if field == "bundled_embeddings" else field  # (embeddings: generate loads them with it)
            print(f"{label + ':':<11} {safe_text(text)}")
    metadata = summary["metadata"]
    print(f"metadata:   {plural(len(metadata), 'entry', many='entries')}")
    for key in sorted(metadata):
        value = safe_text(metadata[key])  # text from the file: control characters (ESC, BEL ...) shown escaped
        if len(value) > 100:
            value = value[:97] + "..."
        print(f"  {safe_text(key)[:200]}: {value}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    files: list[str] = list(args.files)
    several = len(files) > 1
    worst = 0
    reports = []
    for index, file in enumerate(files):
        if several and not (args.json or args.json_lines):
            if index:
                print()
            print(f"==> {safe_text(file)} <==")
        summary, code = _describe(file)
        worst = max(worst, code)
        if args.json_lines:  # (ensure_ascii: one physical line, control characters as \u escapes)
            print(json.dumps(summary, sort_keys=True, separators=(",", ":")), flush=True)
        elif args.json:
            reports.append(summary)
        elif code == 0:
            _print_summary(summary)
    if args.json:  # (ensure_ascii: control characters come out as \u escapes)
        value = reports if several else reports[0]
        if several or worst == 0:
            print(json.dumps(value, indent=2, sort_keys=True))
    return worst


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect`` to a CLI."""
    inspect = sub.add_parser(
        "inspect",
        help="say what weights files are (kohya/diffusers/peft LoRA, LyCORIS, embedding, hypernetwork, checkpoint), "
        "or an image's A1111 generation parameters",
        description="Detect what each weights file is and print its module count, ranks, alphas, dtypes, size and "
        "metadata. Several files: each report under a '==> FILE <==' heading (--json: a list of objects, one per "
        "file, in the order given; an unreadable file's object holds its error and exit_code; --json-lines: one "
        "object per line for any number of files, for scripts); the exit code is "
        "the highest of the files' (0: all were read). A PNG, JPEG or WebP image: its A1111 generation parameters "
        "(A1111's PNG Info) and the fields read from them.",
    )
    inspect.add_argument("files", nargs="+", metavar="FILE",
                         help=".safetensors (or legacy .pt/.ckpt/.bin, read with weights_only=True); several are "
                         "reported in turn")
    machine = inspect.add_mutually_exclusive_group()
    machine.add_argument("--json", action="store_true",
                         help="machine-readable output: one FILE's JSON object, or a JSON list for several")
    machine.add_argument("--json-lines", action="store_true",
                         help="one compact JSON object per FILE, one per line, in the order given (JSON Lines), "
                         "the same shape for one file or many; an unreadable FILE's line holds its error and exit_code")
    inspect.set_defaults(run=_cmd_inspect)
