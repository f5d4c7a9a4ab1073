"""Combining adapter files with each other (and the per-layer helpers the LoRA tools share).

Every family's delta comes from the one delta path,
:func:`sdadapt.adapters.registry.file_layer_delta`; this module holds no family math. With
strengths ``s_i`` a layer's combination is ``Σ_i s_i · Δ_i``.

* **exact combination (concat)** of LoRA/LoCon layers, ``Δ_i = (alpha_i / r_i) · up_i ⋅ down_i``
  (the scale from :func:`sdadapt.adapters.lora.lora_scale`); with ``c_i = s_i · alpha_i / r_i``::

      up   = [ sqrt|c_1| · up_1,  ...,  sqrt|c_n| · up_n ]                  (out, R),  R = Σ r_i
      down = [ sign(c_1) sqrt|c_1| · down_1; ...; sign(c_n) sqrt|c_n| · down_n ]   (R, in, *k)
      alpha = R  (scale 1)

  so ``up ⋅ down = Σ_i s_i Δ_i`` exactly — no cross terms (kohya's ``merge_lora.py`` without
  ``--concat`` adds the factors instead, which is exact only for a single LoRA).
  Layers of any other family (LoHa, LoKr, full ``diff``, LoCon-Tucker, DoRA) are densified,
  summed, and factored by SVD at their **numerical rank** (exact up to floating-point error;
  ``rank``/``conv_rank``, when given, cap it — then it is the best rank-r approximation of that
  part), then concatenated with the LoRA factors.
* **SVD re-compression** (``mode="svd"``): the best rank-r factors of ``Σ s_i Δ_i``, ``alpha = r``
  — from the thin factors when every input is LoRA/LoCon
  (:func:`sdadapt.loratools.resize.factored_svd`, kohya's ``svd_merge_lora.py`` without forming
  the dense deltas), else from the dense sum.

DoRA is not additive: its ``Δ = W' − W`` depends on the weight it is applied to. Inputs are taken
in order, each DoRA layer on the base weight plus the earlier inputs' deltas — exactly what
``apply_lora`` of each file in turn (or ``merge-lora`` of them) does; DoRA therefore needs the base
checkpoint (``base=PATH`` / ``--base CKPT``), as do LoHa/LoKr files whose layer shapes the file
alone cannot tell.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..adapters.base import LayerGeometry
from ..adapters.lora import lora_scale
from ..adapters.registry import weight_shape_of_file_tensors
from ..checks import cast_checked, check_result, positive_int
from ..errors import InputError
from ..formats import WeightFileError, save_kohya
from ..formats.layers import group_by_layer
from .extract import check_clamp, check_rank_method, factors_from_svd
from .output import (
    BaseLayers,
    LayerReport,
    LoRAJobReport,
    base_layers_per_block,
    check_base_model,
    check_inputs,
    check_not_input,
    check_output,
    check_save_dtype,
    layer_errors,
    layer_geometry,
    load_components,
    lora_base_model,
    per_file,
    same_layer_shape,
)
from .resize import dense_layer_delta, dense_lora_factors, factored_svd, is_plain_lora, needs_base_weight

__all__ = [
    "layer_delta",
    "add_delta",
    "concat_layers",
    "combine_lora_states",
    "combine_loras",
    "combine_network_metadata",
]


def layer_delta(
    tensors: Mapping[str, Tensor],
    *,
    geometry: LayerGeometry | None = None,
    base_weight: Tensor | None = None,
    scale: float = 1.0,
    name: str = "<layer>",
) -> Tensor:
    """ΔW of one file layer of any family at strength ``scale``, float32 (float64 stays float64).

    A thin user of :func:`sdadapt.adapters.registry.file_layer_delta` (the one delta path).

    Args:
        tensors: one layer's file tensors by suffix (``lora_down.weight``/``lora_up.weight``/``alpha``,
            ``hada_*``, ``lokr_*``, ``diff``, ``dora_scale`` ...).
        geometry: the base layer's shape; default: what the tensors imply
            (:func:`sdadapt.adapters.registry.weight_shape_of_file_tensors`).
        base_weight: (out, in, *kernel) the base weight, for DoRA.

    Returns:
        (out, in, *kernel).

    Raises:
        ValueError: keys of no family, tensors that do not fit, a shape the file cannot tell
            without ``geometry``, or DoRA without ``base_weight`` — naming the layer.
    """
    if geometry is None:
        shape = weight_shape_of_file_tensors(tensors, name=name)
        if shape is None:
            raise ValueError(
                f"{name}: the tensors {sorted(tensors)} do not tell the layer's shape (a convolution's factors "
                "stored flattened); pass geometry= (the base checkpoint's layer shape)"
            )
        geometry = LayerGeometry.from_weight_shape(tuple(shape))
    return dense_layer_delta(tensors, geometry, scale=scale, base_weight=base_weight, name=name)[0]


def add_delta(
    weight: Tensor,
    deltas: Sequence[tuple[Tensor, float, slice | None]],
    *,
    dtype: torch.dtype | None = None,
    name: str = "<weight>",
) -> Tensor:
    """``W + Σ s_i · Δ_i`` in float32, cast once.

    Args:
        weight: (out, in[, kh, kw]) base weight (not modified).
        deltas: ``(Δ_i, s_i, rows_i)``; ``rows_i`` selects the rows of a fused weight the delta
            belongs to (``slice(d, 2d)`` = k of an ``in_proj_weight``), ``None`` = the whole weight.
            A delta whose element count fits but whose shape does not (a Linear LoRA on a 1x1 conv)
            is reshaped.
        dtype: output dtype (default ``weight.dtype``).

    Returns:
        the merged weight, shape of ``weight``.
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.to(compute).clone()
    for delta, strength, rows in deltas:
        target = merged if rows is None else merged[rows]
        if delta.shape != target.shape:
            if delta.numel() != target.numel():
                raise ValueError(
                    f"{name}: LoRA delta of shape {tuple(delta.shape)} does not fit the weight "
                    f"{'rows ' + str((rows.start, rows.stop)) + ' of ' if rows is not None else ''}"
                    f"shape {tuple(target.shape)}; the LoRA was made for another model"
                )
            delta = delta.reshape(target.shape)
        target.add_(delta.to(compute), alpha=float(strength))
    return merged.to(dtype or weight.dtype)


def concat_layers(
    layers: Sequence[Mapping[str, Tensor]], strengths: Sequence[float], *, name: str = "<layer>"
) -> dict[str, Tensor]:
    """Exact combination of one layer's LoRAs by rank concatenation (see the module doc).

    Args:
        layers: each ``{"lora_down.weight", "lora_up.weight"[, "alpha"]}`` of the same layer.
        strengths: ``s_i`` per layer.

    Returns:
        ``{"lora_down.weight": (R, in, *k), "lora_up.weight": (out, R[, 1, 1]), "alpha": R}`` (float32,
        float64 if every input is float64) with ``up ⋅ down == Σ s_i Δ_i``.
    """
    if len(layers) != len(strengths) or not layers:
        raise ValueError(f"{name}: need one strength per LoRA, got {len(layers)} LoRAs and {len(strengths)} strengths")
    ups, downs = [], []
    dtype = torch.float64 if all(t["lora_down.weight"].dtype == torch.float64 for t in layers) else torch.float32
    kernel = None
    for tensors, strength in zip(layers, strengths):
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise ValueError(f"{name}: has {sorted(tensors)}, not lora_down/lora_up; only LoRA/LoCon layers combine")
        down, up = tensors["lora_down.weight"].to(dtype), tensors["lora_up.weight"].to(dtype)
        rank = down.shape[0]
        alpha = tensors.get("alpha")
        c = float(strength) * lora_scale(None if alpha is None else float(alpha), rank)
        root = math.sqrt(abs(c))
        sign = -1.0 if c < 0 else 1.0
        if kernel is None:
            kernel = tuple(down.shape[1:])
        elif tuple(down.shape[1:]) != kernel:
            raise ValueError(
                f"{name}: the LoRAs disagree on the layer's input shape ({kernel} vs {tuple(down.shape[1:])}); "
                "they were made for different models"
            )
        ups.append((up * root).reshape(up.shape[0], rank, *up.shape[2:]))
        downs.append(down * (sign * root))
    out_shapes = {u.shape[0] for u in ups}
    if len(out_shapes) != 1:
        raise ValueError(f"{name}: the LoRAs disagree on the layer's output size {sorted(out_shapes)}")
    up_cat = torch.cat(ups, dim=1)  # (out, R[, 1, 1])
    down_cat = torch.cat(downs, dim=0)  # (R, in[, kh, kw])
    return {
        "lora_down.weight": down_cat,
        "lora_up.weight": up_cat,
        "alpha": torch.tensor(float(down_cat.shape[0]), dtype=torch.float32),
    }


def combine_lora_states(
    states: Sequence[Mapping[str, Tensor]],
    strengths: Sequence[float],
    *,
    mode: Literal["concat", "svd"] = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    dtype: torch.dtype | None = None,
    base: BaseLayers | None = None,
    component: str = "unet",
    dropped: dict[str, str] | None = None,
    source: str = "<states>",
    layers: dict[str, LayerReport] | None = None,
) -> dict[str, Tensor]:
    """Combine several adapters of one component into one LoRA: ``Σ s_i Δ_i`` per layer.

    Errors name ``source`` (the input files) and the layer; factors that are not finite or do not
    fit ``dtype`` are refused (:class:`~sdadapt.errors.NonFiniteError`).

    A layer present in only some of the inputs combines those. ``mode="concat"`` is exact: LoRA
    factors are concatenated (rank = sum of ranks) and the other families' summed dense delta is
    factored at its numerical rank (capped by ``rank``/``conv_rank`` when given). ``mode="svd"``
    re-compresses each layer to ``rank`` (``conv_rank`` for kxk convs; a dynamic ``method`` caps
    at it) with ``alpha = r``. See the module doc for DoRA's order.

    Args:
        states: canonical component states of any family (``{"<layer>.<file key>": tensor}``).
        dtype: dtype of the written factors (default float32).
        base: the base checkpoint's layers, for DoRA and for layers whose shape no input tells.
        component: the component the states belong to (to find layers in ``base``).
        dropped: receives ``{"component:layer.bias": reason}`` for bias deltas (``diff_b``), which
            a LoRA cannot hold and the output leaves out.
        layers: receives ``{"component:layer": LayerReport}``: the written rank and alpha, ``norm`` =
            ``‖Σ s_i Δ_i‖_F`` and ``residual_norm`` = ``‖Σ s_i Δ_i − (alpha/r)·up⋅down‖_F`` of the factors
            as written (after the cast to ``dtype``), float64 — the error ``extract``/``resize`` report.

    Returns:
        the combined canonical LoRA state (``lora_down.weight``, ``lora_up.weight``, ``alpha``).

    Raises:
        ValueError: bad options; layers whose inputs disagree on the shape, or that need ``base``.
    """
    if len(states) != len(strengths):
        raise ValueError(f"need one strength per LoRA, got {len(states)} LoRAs and {len(strengths)} strengths")
    if mode not in ("concat", "svd"):
        raise ValueError(f"mode must be 'concat' or 'svd', got {mode!r}")
    if mode == "svd" and rank is None:
        raise ValueError("mode='svd' needs a target rank")
    per_layer: dict[str, tuple[list[Mapping[str, Tensor]], list[float]]] = {}
    for state, strength in zip(states, strengths):
        for layer, tensors in group_by_layer(state).items():
            entry = per_layer.setdefault(layer, ([], []))
            entry[0].append(tensors)
            entry[1].append(float(strength))
    out: dict[str, Tensor] = {}
    hint = "write float32 (--dtype fp32) or lower --scale"
    for layer, (layer_tensors, layer_strengths) in per_layer.items():
        with layer_errors(source, f"{component}:{layer}"):
            if all(is_plain_lora(t) for t in layer_tensors):
                combined, wanted = _combine_plain(layer_tensors, layer_strengths, mode=mode, rank=rank,
                                                  conv_rank=conv_rank, method=method, param=param,
                                                  clamp_quantile=clamp_quantile, name=layer)
            else:
                combined, wanted = _combine_dense(layer_tensors, layer_strengths, mode=mode, rank=rank,
                                                  conv_rank=conv_rank, method=method, param=param,
                                                  clamp_quantile=clamp_quantile, base=base, component=component,
                                                  layer=layer, dropped=dropped)
            for part in ("lora_down.weight", "lora_up.weight"):
                value = combined[part]
                check_result(value, key=f"{layer}.{part}", what="the combined factors", hint="lower --scale")
                out[f"{layer}.{part}"] = cast_checked(value, dtype or torch.float32, key=f"{layer}.{part}", hint=hint)
        out[f"{layer}.alpha"] = combined["alpha"]
        if layers is not None:
            down, up = out[f"{layer}.lora_down.weight"], out[f"{layer}.lora_up.weight"]
            written = _product({"lora_down.weight": down, "lora_up.weight": up, "alpha": combined["alpha"]})
            layers[f"{component}:{layer}"] = LayerReport(int(down.shape[0]), float(combined["alpha"]),
                                                         float((wanted - written).norm()), float(wanted.norm()))
    return out


def _product(tensors: Mapping[str, Tensor]) -> Tensor:
    """``(alpha / r) · up ⋅ down`` of one LoRA layer as a float64 (out, in · k) matrix."""
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    rank = down.shape[0]
    alpha = tensors.get("alpha")
    scale = lora_scale(None if alpha is None else float(alpha), rank)
    return scale * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))  # (out, in · k)


def _plain_sum(layers: Sequence[Mapping[str, Tensor]], strengths: Sequence[float]) -> Tensor:
    """``Σ s_i Δ_i`` of LoRA/LoCon layers, float64 (out, in · k)."""
    total = _product(layers[0]) * float(strengths[0])
    for tensors, strength in zip(layers[1:], strengths[1:]):
        total = total + _product(tensors) * float(strength)
    return total


def _combine_plain(
    layers: Sequence[Mapping[str, Tensor]], strengths: Sequence[float], *, mode: str, rank: int | None,
    conv_rank: int | None, method: str, param: float | None, clamp_quantile: float | None, name: str,
) -> tuple[dict[str, Tensor], Tensor]:
    """LoRA/LoCon layers only: concatenation, then (svd) the SVD of the product from the thin factors.
    Returns ``(the combined layer, Σ s_i Δ_i float64 (out, in · k))``."""
    combined = concat_layers(layers, strengths, name=name)
    wanted = _plain_sum(layers, strengths)  # (out, in · k)
    down, up = combined["lora_down.weight"], combined["lora_up.weight"]
    if mode == "svd":
        total = down.shape[0]
        is_kxk = down.dim() == 4 and down.shape[2] * down.shape[3] > 1
        target = (conv_rank if conv_rank is not None else rank) if is_kxk else rank
        u, s, vh = factored_svd(up.reshape(up.shape[0], total), down.reshape(total, -1))
        new_up, new_down, alpha, _ = factors_from_svd(
            u, s, vh, rank=min(int(target), s.numel()), method=method, param=param,  # type: ignore[arg-type]
            clamp_quantile=clamp_quantile,
        )
        r = new_down.shape[0]
        if down.dim() == 4:
            new_up = new_up.reshape(up.shape[0], r, 1, 1)
            new_down = new_down.reshape(r, *down.shape[1:])
        combined = {"lora_down.weight": new_down, "lora_up.weight": new_up,
                    "alpha": torch.tensor(alpha, dtype=torch.float32)}
    return combined, wanted


def _combine_dense(
    layers: Sequence[Mapping[str, Tensor]], strengths: Sequence[float], *, mode: str, rank: int | None,
    conv_rank: int | None, method: str, param: float | None, clamp_quantile: float | None,
    base: BaseLayers | None, component: str, layer: str, dropped: dict[str, str] | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """A layer with at least one non-LoRA input: dense deltas through the registry, then SVD.
    Returns ``(the combined layer, Σ s_i Δ_i float64 (out, in · k))``."""
    name = f"{component}:{layer}"
    implied = [weight_shape_of_file_tensors(t, name=name) for t in layers]
    known = [s for s in implied if s is not None]
    if any(not same_layer_shape(known[0], s) for s in known[1:]):
        raise ValueError(f"{name}: the inputs disagree on the layer's shape {sorted(set(known))}; they were made "
                         "for different models")
    # a LoRA input's own shape first, so the dense factors concatenate with its factors
    plain_first = sorted(range(len(layers)), key=lambda i: not is_plain_lora(layers[i]))
    geometry = layer_geometry(layers[plain_first[0]], component=component, layer=layer, base=base,
                              shapes=[implied[i] for i in plain_first])
    target = (conv_rank if conv_rank is not None else rank) if geometry.is_kxk else rank
    uses_base = [needs_base_weight(t, name=name) for t in layers]
    running: Tensor | None = None  # the weight the next DoRA input sees: W + the earlier inputs' deltas
    if any(uses_base):
        weight = base.weight(component, layer) if base is not None else None
        running = None if weight is None else weight.to(torch.float32).reshape(geometry.weight_shape)
    last_dora = max((i for i, u in enumerate(uses_base) if u), default=-1)
    dense: Tensor | None = None
    plain_layers: list[Mapping[str, Tensor]] = []
    plain_strengths: list[float] = []
    for index, (tensors, strength) in enumerate(zip(layers, strengths)):
        keep_factors = mode == "concat" and is_plain_lora(tensors)
        if keep_factors:
            plain_layers.append(tensors)
            plain_strengths.append(strength)
            if index >= last_dora:  # no later DoRA input needs this delta
                continue
        delta, bias = dense_layer_delta(tensors, geometry, scale=strength,
                                        base_weight=running if uses_base[index] else None, name=name)
        if bias is not None and dropped is not None:
            dropped[f"{name}.bias"] = "bias delta (diff_b) not written: a LoRA holds weight deltas only"
        if running is not None and index < last_dora:
            running = running + delta.to(running.dtype)
        if not keep_factors:
            dense = delta if dense is None else dense + delta
    if dense is None:  # pragma: no cover - a dense layer has a non-LoRA input
        raise AssertionError(name)
    if mode == "svd":
        factored = dense_lora_factors(dense, rank=target, method=method, param=param, clamp_quantile=clamp_quantile)
    else:
        factored = dense_lora_factors(dense, rank=target)
    pseudo = {"lora_down.weight": factored.down, "lora_up.weight": factored.up,
              "alpha": torch.tensor(factored.alpha, dtype=torch.float32)}
    wanted = dense.double().reshape(dense.shape[0], -1)  # (out, in · k)
    if not plain_layers:
        return pseudo, wanted
    wanted = wanted + _plain_sum(plain_layers, plain_strengths)
    return concat_layers([*plain_layers, pseudo], [*plain_strengths, 1.0], name=name), wanted


# -------------------------------------------------------------------------------- the file job
def combine_network_metadata(states: Mapping[str, Mapping[str, Tensor]], *, mode: str, rank: int | None = None,
                             conv_rank: int | None = None, method: str = "fixed") -> dict[str, str | None]:
    """``ss_network_dim`` / ``ss_network_alpha`` / ``ss_network_args`` of a combined file as its kohya twin writes
    them (``None``: the key left out; the rest is :func:`~sdadapt.formats.kohya.kohya_metadata`'s).

    * ``mode="svd"``, fixed rank — ``svd_merge_lora.py`` (sd-scripts@48d368fa networks/svd_merge_lora.py:389-396,
      ``new_conv_rank`` defaulting to ``new_rank`` at :426): dim and alpha the rank given (``f"{new_rank}"``:
      ``"4"``), ``ss_network_args`` ``json.dumps({"conv_dim": C, "conv_alpha": C})`` with ``C`` the conv rank as
      a JSON number (``{"conv_dim": 4, "conv_alpha": 4}``), written whether or not a conv was merged.
    * ``mode="concat"`` — ``merge_lora.py``'s LoRA merge (networks/merge_lora.py:205-222): dim and alpha those
      of every layer, convolutions included (``f"{dim}"``, the alpha a float, ``"8.0"``), ``"Dynamic"`` when
      the layers' differ; no ``ss_network_args`` (``network_args=None``).
    * ``mode="svd"`` with a dynamic rank (no kohya twin): dim and alpha as ``concat``'s, ``"Dynamic"`` when
      they differ, and the conv args of :func:`~sdadapt.formats.kohya.kohya_metadata`.
    """
    if mode == "svd" and method == "fixed":
        if rank is None:
            raise ValueError("mode='svd' needs a target rank")
        conv = rank if conv_rank is None else conv_rank
        return {"ss_network_dim": f"{rank}", "ss_network_alpha": f"{rank}",
                "ss_network_args": json.dumps({"conv_dim": conv, "conv_alpha": conv})}
    layers = [layer for s in states.values() for layer in group_by_layer(s).values() if "lora_down.weight" in layer]
    if mode == "svd":  # (dynamic: the Linear / 1x1 layers decide; kxk convs' are conv_dim / conv_alpha in the args)
        layers = [layer for layer in layers if layer["lora_down.weight"].dim() == 2
                  or layer["lora_down.weight"].shape[2:].numel() == 1]
    dims = list(dict.fromkeys(int(layer["lora_down.weight"].shape[0]) for layer in layers))
    alphas = list(dict.fromkeys(float(layer["alpha"]) if "alpha" in layer else int(layer["lora_down.weight"].shape[0])
                                for layer in layers))
    meta: dict[str, str | None] = {}
    if dims:
        meta["ss_network_dim"] = f"{dims[0]}" if len(dims) == 1 else "Dynamic"
    if alphas:
        meta["ss_network_alpha"] = f"{alphas[0]}" if len(alphas) == 1 else "Dynamic"
    if mode == "concat":
        meta["ss_network_args"] = None
    return meta


def combine_loras(
    loras: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    strengths: Sequence[float] | float = 1.0,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
) -> LoRAJobReport:
    """Combine several adapter files of any family into one kohya LoRA that applies ``Σ s_i Δ_i``
    (see :func:`sdadapt.loratools.combine.combine_lora_states`): ``mode="concat"`` exact (LoRA
    ranks concatenated; other families at their numerical rank, capped by ``rank`` if given),
    ``mode="svd"`` re-compressed to ``rank``.

    Args:
        base: the checkpoint the adapters were made for (LDM single file or diffusers UNet file);
            needed for DoRA layers and for layers whose shape no input tells (LoHa, LoKr with a
            low-rank ``w2``: the error says so).

    Returns:
        the :class:`LoRAJobReport`: each written layer's rank, alpha and error ``‖Σ s_i Δ_i − LoRA‖_F``
        (of the factors as written, float64); bias deltas (``diff_b``), which a LoRA cannot hold,
        are listed in ``skipped``.
    """
    check_rank_method(method, param)
    check_save_dtype(dtype)
    check_base_model(base_model)
    if not loras:
        raise InputError("combine_loras needs at least one LoRA file")
    positive_int(rank, name="rank (--rank)", allow_none=True)
    positive_int(conv_rank, name="conv_rank (--conv-rank)", allow_none=True)
    check_clamp(clamp_quantile)
    values = per_file(strengths, len(loras), "strength")
    check_output(out, overwrite=overwrite, needed_bytes=0)
    check_inputs(*loras, *([base] if base is not None else []))
    check_not_input(out, *loras, base)
    layers_per_block = base_layers_per_block(base)  # the LDM names of SDXL files: the base's UNet layout
    loaded = [load_components(path, layers_per_block=layers_per_block) for path in loras]
    models = {lora_base_model(p, c, m) for p, (c, m) in zip(loras, loaded)}
    if base_model is None and len(models) > 1:
        raise WeightFileError(f"the LoRAs are for different base models ({sorted(models)}); combine LoRAs of one model")
    model = base_model or models.pop()
    names = sorted({c for components, _ in loaded for c in components})
    combined: dict[str, dict[str, Tensor]] = {}
    skipped: dict[str, str] = {}
    written_layers: dict[str, LayerReport] = {}
    layers_of_base = BaseLayers(base) if base is not None else None
    try:
        for component in names:
            present = [(c[component], s) for (c, _), s in zip(loaded, values) if component in c]
            combined[component] = combine_lora_states(
                [p[0] for p in present], [p[1] for p in present], mode=mode, rank=rank, conv_rank=conv_rank,  # type: ignore[arg-type]
                method=method, param=param, clamp_quantile=clamp_quantile, dtype=dtype, base=layers_of_base,
                component=component, dropped=skipped, source=", ".join(str(p) for p in loras),
                layers=written_layers,
            )
    finally:
        if layers_of_base is not None:
            layers_of_base.close()
    report = LoRAJobReport(path=Path(out), base_model=model, layers=written_layers, skipped=skipped)
    # a new network: kohya's merge_lora.py / svd_merge_lora.py write fresh metadata, not the inputs' (their base
    # model, "networks.lora", dim, alpha and args; new sshs hashes, which save_kohya computes): combine_network_metadata
    meta = {
        "ss_training_comment": "combined by sdadapt: "
        + ", ".join(f"{s:g} x {Path(p).name}" for p, s in zip(loras, values)) + f" ({mode})",
        **combine_network_metadata(combined, mode=mode, rank=rank, conv_rank=conv_rank, method=method),
    }
    needed = sum(t.numel() * t.element_size() for s in combined.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, combined, base_model=model, metadata=meta, overwrite=overwrite, layers_per_block=layers_per_block)
    return report
