"""``python -m sdadapt convert IN -o OUT --to FORMAT``: a LoRA-family file, an embedding or a whole
SD1/SD2/SDXL checkpoint in another format, read back and compared (one line: kind, layers/vectors
or tensors, max |ΔW| / |Δ|).

A second ``convert`` writing the same OUT while one runs stops at once with an error naming the first
(:mod:`sdadapt.jobs.output_lock`). Thin argparse shell over :func:`sdadapt.loratools.convert.convert_lora`,
:func:`sdadapt.embeddings.convert.convert_embedding` and
:func:`sdadapt.jobs.convert_model.convert_model`; heavy imports happen when it runs.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..plurals import plural
from .options import add_clip_stats_option, add_output_options, safe_text, torch_dtype

__all__ = ["register"]

_TARGETS = ("kohya", "diffusers", "peft", "comfy", "a1111", "ldm")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _convert_checkpoint(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..jobs.convert_model import CHECKPOINT_TARGETS, convert_model

    if args.to not in CHECKPOINT_TARGETS:
        raise InputError(f"{args.input}: a whole checkpoint converts --to diffusers (a folder) or --to ldm (one "
                         f".safetensors file, the format A1111/ComfyUI/kohya load); {args.to} is a LoRA/embedding format")
    for option, value, why in (("--component", args.component, "picks a LoRA's pipeline component"),
                               ("--token", args.token, "names an embedding's trigger word"),
                               ("--base-model", args.base_model, ("sets a LoRA's naming (a checkpoint's architecture "
                                "is read from its tensors; SD2-v: --prediction-type v_prediction)"))):
        if value is not None:
            raise InputError(f"{option} {why}; a whole checkpoint has none: leave it out")
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    report = convert_model(args.input, args.out, to=args.to, dtype=torch_dtype(args.dtype),
                           prediction_type=args.prediction_type, vae=args.vae, ema=args.ema, overwrite=args.overwrite,
                           log=log, clip_stats=args.clip_stats)
    what = "diffusers folder" if report.target == "diffusers" else "LDM single file"
    parts = ", ".join(f"{c} {n}" for c, n in report.tensors.items())
    dtypes = " + ".join(f"{n} {d}" for d, n in sorted(report.dtypes.items()))
    source = "an LDM file" if report.source_format == "ldm" else "a diffusers folder"
    model = report.base_model if report.unclip is None else f"SD 2.1 unCLIP-{report.unclip.upper()} ({report.base_model})"
    line = (f"wrote {safe_text(report.path)}: {what} of an {model} model from {source} ({parts} tensors; "
            f"{dtypes}{', as in the input' if args.dtype == 'keep' else ''}), {_size(report.size_in)} -> "
            f"{_size(report.size_out)}")
    if report.ema == "used":
        line += f"; EMA weights written as the UNet ({report.ema_tensors} tensors), the raw UNet dropped"
    elif report.ema == "dropped":
        line += f"; EMA copy dropped ({report.ema_tensors} tensors; --ema writes it as the UNet instead)"
    if report.dropped:
        shown = ", ".join(safe_text(k) for k in report.dropped[:3])
        line += f"; {plural(len(report.dropped), 'other entry', many='other entries')} dropped ({shown}"
        line += " ...)" if len(report.dropped) > 3 else ")"
    for note in report.notes:
        line += f"; {safe_text(note)}"
    delta = report.max_delta
    why = "" if math.isfinite(delta) else (": a NaN appeared or vanished" if math.isnan(delta)
                                           else ": an infinity appeared or vanished, or whole numbers differ")
    print(line + f"; max |Δ| {delta:.3g} (read back{why})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """One run per OUT at a time (:func:`sdadapt.jobs.output_lock.output_lock`): a second run writing the same
    OUT stops at once, naming the first, instead of reading back the other's result."""
    from ..jobs.output_lock import output_lock

    with output_lock(args.out, command="python -m sdadapt convert"):
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..jobs.convert_model import is_model_folder
    from ..loratools.convert import LORA_KINDS, LORA_TARGETS, convert_lora, input_kind
    from ..loratools.output import check_inputs

    if is_model_folder(args.input):
        return _convert_checkpoint(args)
    check_inputs(args.input)
    kind = input_kind(args.input)
    if kind == "checkpoint":
        return _convert_checkpoint(args)
    for option, value in (("--ema", args.ema), ("--vae", args.vae), ("--prediction-type", args.prediction_type),
                          ("--clip-stats", args.clip_stats)):
        if value:
            raise InputError(f"{option} is for whole checkpoints; {args.input} is a {kind} file: leave it out")
    if args.to == "ldm":
        raise InputError(f"{args.input}: --to ldm writes whole checkpoints; a {kind} file converts --to "
                         + ("a1111|kohya|diffusers" if kind == "embedding" else "kohya|diffusers|peft"))
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
            raise InputError(f"{args.input}: a LoRA-family file converts --to kohya|diffusers|peft|comfy; {args.to} is an "
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
            f"{plural(layers, 'layer')} ({parts}; {families}), max |ΔW| {report.max_delta:.3g} (float64, read back)")
    if report.tensor_compared:
        line += f"; {report.tensor_compared} layer(s) compared tensor by tensor (their ΔW needs the base weights)"
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` to a CLI."""
    convert = sub.add_parser(
        "convert",
        help="convert a LoRA-family file (kohya/LyCORIS, diffusers, peft), an embedding or a whole SD checkpoint "
        "(LDM single file <-> diffusers folder) to another format",
        description="Write IN in another file format, read the result back and print one line: what was written, "
        "its layers (vectors) and the largest |ΔW| between the input's and the output's dense deltas (float64; 0, "
        "or the rounding of --dtype). LoRA-family files (kohya, LyCORIS LoCon/LoHa/LoKr/full/DoRA/(IA)³, diffusers, "
        "peft folders) convert --to kohya (every family; LyCORIS naming for LyCORIS families), --to diffusers "
        "(LoRA/LoCon and DoRA only), --to peft (a folder; LoRA/DoRA, or (IA)³, LoHa or LoKr alone) or --to comfy "
        "(ComfyUI's own naming, as its 'Extract and Save Lora' node writes; every family). "
        "Textual-inversion embeddings "
        "(A1111 .pt/.safetensors, kohya, diffusers learned_embeds, SDXL clip_l/clip_g) convert --to "
        "a1111|kohya|diffusers. Converting to the input's own format is refused unless --dtype (or --token) "
        "changes something. See docs/lora-tools.md. Whole SD1/SD2/SDXL checkpoints (an LDM .safetensors/.ckpt or a "
        "diffusers folder) convert --to diffusers (a folder) or --to ldm (one .safetensors), pruned to UNet, text "
        "encoder(s) and VAE; the line gives the sizes in and out and the largest |Δ| of the output read back "
        "(docs/formats.md). One run writes an OUT at a time: a second convert to the same OUT stops at once, naming "
        "the first (lock file .OUT.sdadapt-lock beside it while it runs).",
    )
    convert.add_argument("input", metavar="IN", help="LoRA-family file, peft adapter folder, embedding file, SD "
                         "checkpoint file or diffusers model folder")
    convert.add_argument("--to", required=True, choices=_TARGETS,
                         help="target format: kohya|diffusers|peft|comfy for LoRA-family files, a1111|kohya|diffusers for "
                         "embeddings, diffusers|ldm for whole checkpoints")
    convert.add_argument("--base-model", choices=("sd1", "sd2", "sd2-v", "sdxl"), default=None,
                         help="kohya naming/metadata (LoRA) or kohya metadata (embedding); default: from the input's "
                         "metadata or layers (asked for when they cannot tell SD1/SD2 from SDXL)")
    convert.add_argument("--component", choices=_COMPONENTS, default=None,
                         help="--to peft: the pipeline component to write when IN has several; a peft IN: the "
                         "component it adapts (default: what its layer names say)")
    convert.add_argument("--token", default=None, help="embeddings: the trigger word to write (default: the input's)")
    model = convert.add_argument_group("whole checkpoints")
    model.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                       help="what the UNet predicts (SD2-768-v: v_prediction); default: the input's v_pred marker, "
                       "ModelSpec / predict_key metadata, <stem>.yaml beside it or scheduler config; for SD2 "
                       "otherwise ComfyUI's weight test; else epsilon")
    model.add_argument("--vae", metavar="VAE", default=None,
                       help="bake this VAE in (an LDM or diffusers VAE file or folder, or a full checkpoint's VAE)")
    model.add_argument("--ema", action="store_true",
                       help="write the input's EMA UNet (LDM model_ema.*, a folder's unet_ema/) instead of the raw "
                       "one; default: the raw weights, the EMA copy dropped")
    add_clip_stats_option(model, use="needed to write an unCLIP-L file's diffusers folder (its image_normalizer/), "
                          "as diffusers' converter requires clip_stats_path")
    add_output_options(convert, out_help="output: a .safetensors file (kohya, diffusers; embeddings also .pt/.bin) or "
                       "a folder (--to peft; a checkpoint --to diffusers); written atomically",
                       dtype_help="each tensor's own, as in the input; LoRA alphas stay float32")
    convert.set_defaults(run=_cmd_convert)
