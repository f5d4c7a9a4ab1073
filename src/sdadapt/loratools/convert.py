"""One LoRA-family file to another format: kohya (LyCORIS naming for the other families), a diffusers
pipeline LoRA file, or a peft adapter folder — then the written file read back and compared.

The conversion is :func:`sdadapt.load_lora` followed by the target's writer
(:func:`~sdadapt.formats.save_kohya`, :func:`~sdadapt.formats.save_diffusers`,
:func:`~sdadapt.formats.save_peft`); nothing is re-factored, so LoRA factors keep their bits (and
dtype, unless ``dtype`` is given). What each target can hold:

=========================  =====================================  ==========================  ===================
family (per layer)         kohya                                  diffusers                   peft
=========================  =====================================  ==========================  ===================
LoRA / LoCon               ``lora_down``/``lora_up``/``alpha``    ``lora_A``/``lora_B``       ``LoraConfig``
DoRA over LoRA             LyCORIS ``dora_scale``                 ``lora_magnitude_vector``   ``use_dora``
LoHa / LoKr (one family)   LyCORIS naming                         refused                     ``LoHaConfig`` /
                                                                                              ``LoKrConfig`` [1]_
Tucker LoRA, full, others  LyCORIS naming                         refused                     refused
(IA)³                      LyCORIS ``weight``/``on_input``        refused                     ``IA3Config``
=========================  =====================================  ==========================  ===================

.. [1] when one peft config rebuilds every layer's tensors
   (:func:`~sdadapt.formats.peft_lycoris.to_peft_lycoris`); a layer it cannot is refused, named.

A peft (IA)³ adapter converts ``--to kohya`` where LyCORIS' (IA)³ means the same scaling: vectors on the
layers' inputs (``feedforward_modules``) and on the outputs of SD UNet layers without a bias (the attention
``to_q``/``to_k``/``to_v``, :data:`~sdadapt.formats.peft_ia3.SD_UNET_BIAS_FREE`). peft also scales the bias
of an output-scaled layer, which a kohya/LyCORIS file cannot say: such layers (CLIP projections, ``to_out.0``
...) stay refused, naming them.

Metadata: a kohya target keeps the input's (its network keys too, when its module writes these tensors: a DyLoRA
stays one; fresh sshs hashes), see :func:`~sdadapt.formats.kohya.kohya_metadata`; diffusers / peft targets carry
it beside their own config (:func:`~sdadapt.formats.kohya.carried_metadata`).

The report is about what was written: the file is read back through sdadapt's own loader and
every layer's dense delta ``ΔW`` (float64, strength 1) is compared with the input's
(:func:`delta_difference`). Layers whose delta needs the base weights (DoRA, (IA)³) or whose
shape the file cannot tell (flattened LoHa/LoKr convolutions) are compared tensor by tensor — the
same numbers, since those families pass through unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..adapters.base import LayerGeometry
from ..adapters.registry import (
    algorithm_of_keys,
    file_layer_delta,
    weight_shape_of_file_tensors,
)
from ..errors import (
    InputError,
    OutputError,
    OutputExistsError,
    SdadaptError,
    WeightFileError,
)
from ..formats import load_lora
from ..formats.clip_keys import add_text_model
from ..formats.detect import describe_file
from ..formats.comfy_lora import save_comfy
from ..formats.diffusers import save_diffusers, save_peft
from ..formats.files import atomic_write, raise_naming_output, staged_outputs
from ..formats.kohya import cast_factors, carried_metadata, save_kohya
from ..formats.layers import COMPONENTS, canonical_state, group_by_layer
from ..formats.peft_ia3 import resolve_sd_bias_free
from .output import (
    check_base_model,
    check_inputs,
    check_not_input,
    check_output,
    check_save_dtype,
    context_widths,
    lora_base_model,
)

__all__ = [
    "LORA_TARGETS",
    "LORA_KINDS",
    "ConvertReport",
    "input_kind",
    "convert_lora",
    "delta_difference",
    "layer_groups",
]

#: the formats :func:`convert_lora` writes
LORA_TARGETS: tuple[str, ...] = ("kohya", "diffusers", "peft", "comfy")
#: :func:`sdadapt.formats.detect_kind` kinds :func:`convert_lora` reads, and the target each already is
LORA_KINDS: dict[str, str] = {
    "kohya-lora": "kohya",
    "lycoris": "kohya",
    "kohya-oft": "kohya",
    "diffusers-lora": "diffusers",
    "comfy-lora": "comfy",
    "peft-lora": "peft",
    "peft-ia3": "peft",
}
# families diffusers/peft LoRA files can hold (algorithm_of_keys labels)
_PEFT_LORA_FAMILIES = {"lora", "locon", "dora"}
_PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class ConvertReport:
    """What :func:`convert_lora` wrote, as read back.

    Attributes:
        path: the written file (peft: the folder).
        source_kind: the input's kind (``kohya-lora``, ``lycoris``, ``diffusers-lora``, ``peft-lora``, ``peft-ia3``).
        target: ``"kohya"``, ``"diffusers"`` or ``"peft"``.
        layers: written layers per component (``"model"`` for a peft folder).
        families: layer count per family label (``lora``, ``locon``, ``loha``, ``dora`` ...).
        max_delta: ``max |ΔW_out − ΔW_in|`` over every layer, float64.
        tensor_compared: layers compared tensor by tensor (their ΔW needs the base weights or a
            shape the file cannot tell).
        base_model: the kohya naming written (kohya target only).
    """

    path: Path
    source_kind: str
    target: str
    layers: dict[str, int] = field(default_factory=dict)
    families: dict[str, int] = field(default_factory=dict)
    max_delta: float = 0.0
    tensor_compared: int = 0
    base_model: str | None = None


def input_kind(path: str | os.PathLike) -> str:
    """The input's kind (:data:`sdadapt.formats.detect.FILE_KINDS`), from its header only.

    Raises:
        WeightFileError: missing/unreadable file.
    """
    return str(describe_file(path)["kind"])


layer_groups = group_by_layer  # ``{"<layer>.<tensor>": t}`` -> ``{layer: {tensor: t}}``


def _families(components: Mapping[str, Mapping[str, Tensor]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in components.values():
        for tensors in layer_groups(state).values():
            label = algorithm_of_keys(tensors)
            counts[label] = counts.get(label, 0) + 1
    return counts


def _check_target_families(families: Mapping[str, int], target: str, source: str) -> None:
    """Refuse families the target format cannot hold, saying why and what to do instead."""
    if target in ("kohya", "comfy"):
        return
    other = {f: n for f, n in families.items() if f not in _PEFT_LORA_FAMILIES}
    if target == "peft" and set(other) == {"ia3"} and len(families) == 1:
        return  # (IA)³ alone: peft's IA3Config adapter
    if target == "peft" and any(set(families) <= {f, f"{f}-tucker"} for f in ("loha", "lokr")):
        return  # LoHa alone / LoKr alone: peft's LoHaConfig / LoKrConfig adapter (save_peft checks each layer)
    if not other:
        return
    names = ", ".join(f"{n} {f}" for f, n in sorted(other.items()))
    why = {"diffusers": "diffusers LoRA files hold LoRA (and DoRA) layers only — diffusers has no loader for them",
           "peft": "peft LoRA adapters hold LoRA (and DoRA) layers only, peft IA3 adapters (IA)³ layers only, and "
                   "peft LoHa / LoKr adapters one of those families only"}[target]
    alternatives = "convert --to kohya keeps them (LyCORIS naming, which A1111/ComfyUI/LyCORIS load)"
    if "ia3" in other and target == "diffusers":
        alternatives += "; (IA)³ alone converts --to peft (an IA3Config adapter)"
    if set(other) - {"ia3"}:
        alternatives += "; resize-lora turns them into a plain LoRA (an SVD, not exact)"
    raise InputError(f"{source}: cannot convert to {target}: the file has {names} layer(s) and {why}; {alternatives}")


def _base_model_for_kohya(path: str | os.PathLike, components: Mapping[str, Mapping[str, Tensor]],
                          metadata: Mapping[str, str], base_model: str | None) -> str:
    """kohya naming: ``base_model``, else the input's metadata or naming, else the layers' structure
    (the text encoder's width its cross-attention/text-encoder layers read: 768 SD1, 1024 SD2, 2048 SDXL;
    SDXL UNets have several transformer blocks per attention); refused when none tells SD1/SD2 from SDXL."""
    if base_model is not None:
        return base_model
    weights = Path(path) / "adapter_model.safetensors" if Path(path).is_dir() else path  # a peft folder
    told = lora_base_model(weights, components, metadata)
    if told != "sd1" or metadata.get("ss_base_model_version", "").startswith("sd_v1"):
        return told
    widths = context_widths(components)
    if 2048 in widths:
        return "sdxl"  # SDXL's cross-attention context (CLIP-L + OpenCLIP-G)
    if 1024 in widths:
        return "sd2"  # OpenCLIP-H: SD2's text encoder width and context; SD1 has 768
    if 768 in widths:
        return "sd1"  # a UNet context of 768 (CLIP-L alone): SD1
    layers = [layer for state in components.values() for layer in layer_groups(state)]
    unet = [layer for layer in layers if layer.startswith(("down_blocks", "up_blocks", "mid_block", "conv_", "time_"))]
    if any(".transformer_blocks." in layer and ".transformer_blocks.0." not in layer for layer in unet):
        return "sdxl"
    if any(layer.startswith("down_blocks.0.attentions") for layer in unet):
        return "sd1"  # SDXL's first down block has no attention; SD1 and SD2 are named alike
    raise InputError(
        f"{path}: neither its metadata nor its layers tell whether it is for SD1/SD2 or SDXL, whose kohya names "
        "differ; pass --base-model sd1|sd2|sd2-v|sdxl"
    )


def _peft_component(components: Mapping[str, Mapping[str, Tensor]], component: str | None, source: str) -> str:
    if component is not None:
        if component not in components:
            raise InputError(f"{source}: --component {component}: the file has {sorted(components)} only")
        return component
    if len(components) == 1:
        return next(iter(components))
    raise InputError(
        f"{source}: a peft adapter holds one model, the file has {len(components)} ({', '.join(components)}); "
        "pass --component NAME and convert once per component"
    )


def _check_peft_folder(out: Path, *, overwrite: bool) -> None:
    if out.suffix.lower() in (".safetensors", ".pt", ".bin", ".ckpt", ".json"):
        raise OutputError(f"{out}: --to peft writes a folder (adapter_model.safetensors + adapter_config.json), not a "
                         f"{out.suffix} file; name a folder, or use --to kohya / --to diffusers for one file")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; --to peft writes a folder")
    existing = [name for name in _PEFT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out}: already holds {', '.join(existing)}; pass --overwrite to replace them")
    parent = out.parent if str(out.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent if not out.exists() else out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: no permission to write there; write elsewhere")


def convert_lora(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str,
    base_model: str | None = None,
    component: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> ConvertReport:
    """Write the LoRA-family file ``source`` as ``to`` (``"kohya"``, ``"diffusers"``, ``"peft"`` or ``"comfy"``:
    ComfyUI's own naming, :mod:`sdadapt.formats.comfy_lora`) at ``out``,
    read it back and report ``max |ΔW_out − ΔW_in|``.

    Args:
        source: kohya/LyCORIS ``.safetensors``/``.pt``, diffusers LoRA file or peft adapter folder.
        out: a ``.safetensors`` file (kohya, diffusers) or a folder (peft).
        to: the target format.
        base_model: kohya naming (``sd1``/``sd2``/``sd2-v``/``sdxl``); default from the input's metadata
            or layers. Also names the text encoders of a peft input's ``component``.
        component: for ``to="peft"``, the pipeline component to write (when the input has several);
            for a peft input, the component it is (default ``unet``).
        dtype: cast the factors (alphas stay float32); ``None`` keeps each tensor's dtype. With the
            input's own format, a ``dtype`` is required (else there is nothing to convert).
        overwrite: replace an existing output.

    Returns:
        :class:`ConvertReport` of the written file, read back.

    Raises:
        InputError: unknown ``to``, a family the target cannot hold (says why), OUT's form not the
            target's, the input's own format without ``dtype``, a kohya target whose base model is unknown.
        WeightFileError: an input that is not a LoRA-family file (checkpoints, embeddings ... : says what to use).
        OutputExistsError: ``out`` exists and not ``overwrite``.
    """
    if to not in LORA_TARGETS:
        raise InputError(f"--to must be one of {list(LORA_TARGETS)} for a LoRA-family file, got {to!r}")
    check_base_model(base_model)
    check_save_dtype(dtype)
    if component is not None and component not in COMPONENTS:
        raise InputError(f"--component must be one of {list(COMPONENTS)}, got {component!r}")
    check_inputs(source)
    kind = input_kind(source)
    if kind not in LORA_KINDS:
        raise WeightFileError(f"{source}: {_not_an_adapter(kind)}")
    if component is not None and to != "peft" and LORA_KINDS[kind] != "peft":
        raise InputError(f"--component picks what a peft adapter holds (--to peft, or a peft IN); {source} is a "
                         f"{kind} file converted to {to}, which keeps every component: leave --component out")
    if LORA_KINDS[kind] == to and dtype is None:
        raise InputError(f"{source}: already a {to} file ({kind}); nothing to convert (give --dtype fp16|bf16|fp32 "
                         "to rewrite it in another dtype)")
    target = Path(out)
    if to == "peft":
        _check_peft_folder(target, overwrite=overwrite)
    else:
        check_output(target, overwrite=overwrite)
    check_not_input(target, source)

    components, metadata = load_lora(source)
    if "model" in components:  # a peft adapter: one model, a pipeline component only by name
        components = {component or _adapted_component(components["model"], source): components["model"]}
    if LORA_KINDS[kind] == "peft" and to != "peft":  # (transformers-5 CLIP paths lack the files' text_model.)
        components = {name: {add_text_model(key, ""): value for key, value in state.items()}
                      if name.startswith("text_encoder") else state for name, state in components.items()}
    if kind == "peft-ia3" and to == "kohya":  # SD's bias-free attention projections convert exactly
        components = {name: resolve_sd_bias_free(state, component=name) for name, state in components.items()}
    families = _families(components)
    _check_target_families(families, to, str(source))
    report = ConvertReport(path=target, source_kind=kind, target=to, families=families)
    # written and read back in a scratch folder first: a failed check leaves OUT as it was. The scratch folder is beside
    # OUT (its disk, not the system's temporary one) and named with this process's pid: a killed run's is removed by
    # the next write there (formats.files.remove_stale_temporaries)
    beside = target.parent if target.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=beside) as scratch:
        staging = Path(scratch) / target.name
        try:
            if to == "kohya":
                model = _base_model_for_kohya(source, components, metadata, base_model)
                save_kohya(staging, components, base_model=model, dtype=dtype, source_metadata=metadata,
                           title=metadata.get("modelspec.title") or metadata.get("ss_output_name") or target.stem)
                report.base_model = model
                written = {c: components[c] for c in components}
            elif to == "diffusers":
                save_diffusers(staging, components, dtype=dtype, metadata=carried_metadata(metadata))
                written = dict(components)
            elif to == "comfy":
                model = _base_model_for_kohya(source, components, metadata, base_model)
                save_comfy(staging, {c: cast_factors(s, dtype) for c, s in components.items()}, base_model=model,
                           metadata=carried_metadata(metadata))
                report.base_model = model
                written = dict(components)
            else:
                name = _peft_component(components, component if kind not in ("peft-lora", "peft-ia3") else None,
                                       str(source))
                written = {name: canonical_state(name, components[name])}
                try:  # (under the names pipeline component `name` has: transformers 5's CLIPTextModel lacks text_model.)
                    save_peft(staging, cast_factors(components[name], dtype), component=name,
                              metadata=carried_metadata(metadata))
                except OutputError:  # (a full disk, a write error: OutputError is a ValueError too; said as it is)
                    raise
                except ValueError as exc:  # (a LoHa/LoKr layer no peft config rebuilds, named)
                    message = (str(exc).replace("(format='kohya')", "(convert --to kohya)")
                               .replace("save it as kohya", "convert --to kohya keeps it"))
                    raise InputError(f"{source}: cannot convert to peft: {message} (on the command line the model's "
                                     "shapes are not known: convert --to kohya keeps every layer)") from exc
            back, _ = load_lora(staging)
        except SdadaptError as exc:
            raise_naming_output(exc, staging, target)
        if "model" in back:
            component_name = next(iter(written))
            back = {component_name: canonical_state(component_name, back["model"])}
        report.layers = {c: len(layer_groups(s)) for c, s in back.items()}
        report.families = _families(written)  # (a peft output of one --component: that component's layers only)
        report.max_delta, report.tensor_compared = delta_difference(written, back, source=str(target))
        _move_checked(staging, target, peft=to == "peft", overwrite=overwrite)
    return report


def _move_checked(staging: Path, target: Path, *, peft: bool, overwrite: bool) -> None:
    """The checked output at ``staging`` (a file, or a peft folder's files) written to ``target`` by the
    atomic writers, a peft folder's files together (:func:`~sdadapt.formats.files.staged_outputs`):
    ``target`` is the new output, or (any failure) as it was."""
    files = [(staging / name, target / name) for name in _PEFT_FILES] if peft else [(staging, target)]
    with staged_outputs() as stage:
        for source, path in files:
            atomic_write(path, lambda tmp, source=source: shutil.copyfile(source, tmp), overwrite=overwrite, stage=stage)


def _not_an_adapter(kind: str) -> str:
    if kind == "checkpoint":
        return ("a model checkpoint, not an adapter: convert_lora handles LoRA-family files; a whole checkpoint "
                "converts with `python -m sdadapt convert IN -o OUT --to diffusers|ldm` "
                "(sdadapt.jobs.convert_model.convert_model), and extract-lora makes a LoRA of a fine-tuned checkpoint")
    if kind == "embedding":
        return "an embedding; convert it with --to a1111|kohya|diffusers"
    hints = {
        "hypernetwork": "an A1111 hypernetwork, which has one format only: nothing to convert",
        "custom-diffusion": "a Custom Diffusion file, which has one format only: nothing to convert",
    }
    return (hints.get(kind, f"a {kind} file") + "; convert handles LoRA-family files (kohya, LyCORIS, diffusers, peft) "
            "and textual-inversion embeddings; run `python -m sdadapt inspect FILE` to see what it holds")


def _tensor_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, layer: str, source: str) -> float:
    keys_a, keys_b = set(a) - {"alpha"}, set(b) - {"alpha"}
    if keys_a != keys_b:
        raise WeightFileError(f"{source}: layer {layer} was read back with tensors {sorted(keys_b)}, "
                              f"written from {sorted(keys_a)}")
    worst = 0.0
    for key in sorted(keys_a):
        if a[key].shape != b[key].shape:
            raise WeightFileError(f"{source}: layer {layer}: {key} read back as {tuple(b[key].shape)}, "
                                  f"written as {tuple(a[key].shape)}")
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()) if a[key].numel() else 0.0)
    rank = next((int(t.shape[0]) for k, t in a.items() if k in ("lora_down.weight", "hada_w1_b")), None)
    alpha_a = float(a["alpha"]) if "alpha" in a else rank
    alpha_b = float(b["alpha"]) if "alpha" in b else rank
    if alpha_a is not None and alpha_b is not None:
        worst = max(worst, abs(alpha_a - alpha_b))
    return worst


def _dense_delta(tensors: Mapping[str, Tensor], name: str) -> Tensor | None:
    """ΔW (float64, strength 1) of one layer, or ``None`` when it needs base weights or an untold shape."""
    try:
        shape = weight_shape_of_file_tensors(tensors, name=name)
        if shape is None:
            return None
        geometry = LayerGeometry.from_weight_shape(tuple(shape))
        return file_layer_delta(dict(tensors), geometry, dtype=torch.float64, name=name)[0]
    except ValueError as exc:
        if "base weight" in str(exc):
            return None
        raise WeightFileError(f"{name}: {exc}") from None


def delta_difference(
    written: Mapping[str, Mapping[str, Tensor]],
    back: Mapping[str, Mapping[str, Tensor]],
    *,
    source: str = "<output>",
) -> tuple[float, int]:
    """``max |ΔW_back − ΔW_written|`` over every layer (float64, strength 1) and how many layers were
    compared tensor by tensor instead (DoRA's ``dora_scale`` always is, beside its inner delta).

    Both arguments are ``{component: canonical state}``; each layer's ΔW is ``(out, in[, k, k])``.

    Raises:
        WeightFileError: a layer missing on one side, or tensors that differ in shape.
    """
    worst, by_tensor = 0.0, 0
    if set(written) != set(back):
        raise WeightFileError(f"{source}: read back with components {sorted(back)}, written {sorted(written)}")
    for component, state in written.items():
        groups_a, groups_b = layer_groups(state), layer_groups(back[component])
        if set(groups_a) != set(groups_b):
            missing = sorted(set(groups_a) ^ set(groups_b))[:5]
            raise WeightFileError(f"{source}: {component}: the layers read back differ from those written, e.g. {missing}")
        for layer, a in groups_a.items():
            b = groups_b[layer]
            name = f"{component}:{layer}"
            inner_a = {k: v for k, v in a.items() if k != "dora_scale"}
            inner_b = {k: v for k, v in b.items() if k != "dora_scale"}
            if ("dora_scale" in a) != ("dora_scale" in b):
                raise WeightFileError(f"{source}: {name}: dora_scale lost or gained on the way")
            if "dora_scale" in a:
                scale_a, scale_b = a["dora_scale"].double(), b["dora_scale"].double()
                if scale_a.numel() != scale_b.numel():
                    raise WeightFileError(f"{source}: {name}: dora_scale has {scale_b.numel()} values, wrote {scale_a.numel()}")
                worst = max(worst, float((scale_a.flatten() - scale_b.flatten()).abs().max()))
            delta_a, delta_b = _dense_delta(inner_a, name), _dense_delta(inner_b, name)
            if delta_a is None or delta_b is None:
                by_tensor += 1
                worst = max(worst, _tensor_difference(inner_a, inner_b, layer=name, source=source))
                continue
            if delta_a.shape != delta_b.shape:
                raise WeightFileError(f"{source}: {name}: ΔW read back as {tuple(delta_b.shape)}, "
                                      f"written {tuple(delta_a.shape)}")
            worst = max(worst, float((delta_a - delta_b).abs().max()) if delta_a.numel() else 0.0)
    return worst, by_tensor


def _adapted_component(state: dict, source: object) -> str:
    """The pipeline component a peft adapter's layer names say it adapts when ``--component`` is not given: a CLIP
    text encoder's (``encoder.layers.N.self_attn`` / ``mlp.fc1``, with or without ``text_model.``) or a UNet's
    (``down_blocks`` / ``mid_block`` / ``up_blocks``); both or neither: the caller must say.

    Raises:
        InputError: the names do not tell (``source`` named, with the flag).
    """
    keys = list(state)
    text = any(".encoder.layers." in f".{key}" for key in keys)
    unet = any(part in key for key in keys for part in ("down_blocks.", "up_blocks.", "mid_block."))
    if text != unet:
        return "text_encoder" if text else "unet"
    raise InputError(f"{source}: its layer names do not tell which pipeline component it adapts (a text encoder's "
                     "encoder.layers.N ... or a UNet's down_blocks / mid_block / up_blocks); give --component "
                     "unet|text_encoder|text_encoder_2")
