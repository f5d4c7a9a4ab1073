"""``python -m sdadapt convert IN -o OUT --to FORMAT``: a LoRA-family file or an embedding in another
file format, read back and compared (one line: kind, layers/vectors, max |ΔW|).

Thin argparse shell over :func:`sdadapt.loratools.convert.convert_lora` and
:func:`sdadapt.embeddings.convert.convert_embedding`; heavy imports happen when it runs.
"""

from __future__ import annotations

import argparse

from .options import add_output_options, safe_text, torch_dtype

__all__ = ["register"]

_TARGETS = ("kohya", "diffusers", "peft", "a1111")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..loratools.convert import LORA_KINDS, LORA_TARGETS, convert_lora, input_kind
    from ..loratools.output import check_inputs

    check_inputs(args.input)
    kind = input_kind(args.input)
    dtype = torch_dtype(args.dtype)
    if kind == "embedding":
        from ..embeddings.convert import convert_embedding

        if args.to == "peft":
            raise InputError(f"{args.input}: an embedding converts --to a1111|kohya|diffusers; peft is a LoRA format")
        if args.component is not None:
            raise InputError("--component picks a LoRA's pipeline component; an embedding has none: leave it out")
        report = convert_embedding(args.input, args.out, to=args.to, token=args.token, base_model=args.base_model,
                                   dtype=dtype, overwrite=args.overwrite)
        dims = "+".join(f"{safe_text(k)} {v}" for k, v in report.dims.items())
        print(f"wrote {safe_text(report.path)}: {report.target} embedding {safe_text(report.name)!r} ({report.source_format} "
              f"input), {report.vectors} vector(s) × {dims}, max |Δv| {report.max_delta:.3g} (read back)")
        return 0
    if kind in LORA_KINDS:
        if args.to not in LORA_TARGETS:
            raise InputError(f"{args.input}: a LoRA-family file converts --to kohya|diffusers|peft; {args.to} is an "
                             "embedding format (A1111 loads kohya LoRA files)")
        if args.token is not None:
            raise InputError("--token names an embedding's trigger word; a LoRA has none: leave it out")
    report = convert_lora(args.input, args.out, to=args.to, base_model=args.base_model, component=args.component,
                          dtype=dtype, overwrite=args.overwrite)
    families = ", ".join(f"{safe_text(f)} {n}" for f, n in sorted(report.families.items()))
    layers = sum(report.layers.values())
    parts = ", ".join(f"{safe_text(c)} {n}" for c, n in report.layers.items())
    line = (f"wrote {safe_text(report.path)}: {report.target} "
            f"{'(' + report.base_model + ' naming) ' if report.base_model else ''}from {report.source_kind}, "
            f"{layers} layer{'' if layers == 1 else 's'} ({parts}; {families}), max |ΔW| {report.max_delta:.3g} (float64, read back)")
    if report.tensor_compared:
        line += f"; {report.tensor_compared} layer(s) compared tensor by tensor (their ΔW needs the base weights)"
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` to a CLI."""
    convert = sub.add_parser(
        "convert",
        help="convert a LoRA-family file (kohya/LyCORIS, diffusers, peft) or an embedding to another format",
        description="Write IN in another file format, read the result back and print one line: what was written, "
        "its layers (vectors) and the largest |ΔW| between the input's and the output's dense deltas (float64; 0, "
        "or the rounding of --dtype). LoRA-family files (kohya, LyCORIS LoCon/LoHa/LoKr/full/DoRA/(IA)³, diffusers, "
        "peft folders) convert --to kohya (every family; LyCORIS naming for LyCORIS families), --to diffusers "
        "(LoRA/LoCon and DoRA only) or --to peft (a folder; LoRA/DoRA, or (IA)³ alone). Textual-inversion embeddings "
        "(A1111 .pt/.safetensors, kohya, diffusers learned_embeds, SDXL clip_l/clip_g) convert --to "
        "a1111|kohya|diffusers. Converting to the input's own format is refused unless --dtype (or --token) "
        "changes something. See docs/lora-tools.md.",
    )
    convert.add_argument("input", metavar="IN", help="LoRA-family file, peft adapter folder or embedding file")
    convert.add_argument("--to", required=True, choices=_TARGETS,
                         help="target format: kohya|diffusers|peft for LoRA-family files, a1111|kohya|diffusers for "
                         "embeddings")
    convert.add_argument("--base-model", choices=("sd1", "sd2", "sd2-v", "sdxl"), default=None,
                         help="kohya naming/metadata (LoRA) or kohya metadata (embedding); default: from the input's "
                         "metadata or layers (asked for when they cannot tell SD1/SD2 from SDXL)")
    convert.add_argument("--component", choices=_COMPONENTS, default=None,
                         help="--to peft: the pipeline component to write when IN has several; a peft IN: the "
                         "component it adapts (default unet)")
    convert.add_argument("--token", default=None, help="embeddings: the trigger word to write (default: the input's)")
    add_output_options(convert, out_help="output: a .safetensors file (kohya, diffusers; embeddings also .pt/.bin) or "
                       "a folder (--to peft); written atomically",
                       dtype_help="each tensor's own; LoRA alphas stay float32")
    convert.set_defaults(run=_cmd_convert)
