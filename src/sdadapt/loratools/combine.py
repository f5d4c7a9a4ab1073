"""Combining LoRAs with each other and merging them into base weights.

Math. LoRA ``i`` changes a layer by ``Δ_i = (alpha_i / r_i) · up_i ⋅ down_i``. With strengths
``s_i``:

* **merge into a weight**: ``W' = W + Σ_i s_i · Δ_i``, computed in float32 and cast once to the
  output dtype. A fused attention projection (OpenCLIP's ``in_proj_weight`` (3d, d) = [q; k; v])
  takes a q/k/v delta on its third of the rows.
* **exact combination (concat)**: with ``c_i = s_i · alpha_i / r_i``::

      up   = [ sqrt|c_1| · up_1,  ...,  sqrt|c_n| · up_n ]                  (out, R),  R = Σ r_i
      down = [ sign(c_1) sqrt|c_1| · down_1; ...; sign(c_n) sqrt|c_n| · down_n ]   (R, in, *k)
      alpha = R  (scale 1)

  so ``up ⋅ down = Σ_i s_i Δ_i`` exactly — no cross terms (kohya's ``merge_lora.py`` without
  ``--concat`` adds the factors instead, which is exact only for a single LoRA).
* **SVD re-compression**: the concatenation, then the best rank-r factors of ``Σ s_i Δ_i``
  computed from the thin factors (see :func:`sdadapt.loratools.resize.factored_svd`), ``alpha = r``
  (kohya's ``svd_merge_lora.py`` without forming the dense deltas).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..adapters.lora import lora_delta_weight, lora_scale
from ..formats import WeightFileError, save_kohya
from ..formats.layers import group_by_layer
from .extract import check_rank_method, factors_from_svd
from .output import (
    LoRAJobReport,
    check_base_model,
    check_output,
    check_save_dtype,
    load_components,
    lora_base_model,
    per_file,
)
from .resize import factored_svd

__all__ = [
    "layer_delta",
    "add_delta",
    "concat_layers",
    "combine_lora_states",
    "combine_loras",
]


def layer_delta(tensors: Mapping[str, Tensor], *, name: str = "<layer>") -> Tensor:
    """``ΔW = (alpha / r) · up ⋅ down`` of one LoRA layer, float32 (float64 stays float64).

    Args:
        tensors: ``{"lora_down.weight": (r, in[, kh, kw]), "lora_up.weight": (out, r[, 1, 1])[, "alpha"]}``.

    Returns:
        (out, in[, kh, kw]).

    Raises:
        ValueError: missing tensors or a LyCORIS layer (names the layer).
    """
    if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
        raise ValueError(
            f"{name}: has {sorted(tensors)}, not lora_down.weight/lora_up.weight; only LoRA/LoCon layers "
            "can be merged here"
        )
    if "lora_mid.weight" in tensors:
        raise ValueError(f"{name}: LoCon layers with a Tucker mid weight are not supported")
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    dtype = torch.float64 if down.dtype == torch.float64 and up.dtype == torch.float64 else torch.float32
    alpha = tensors.get("alpha")
    scale = lora_scale(None if alpha is None else float(alpha), down.shape[0])
    return lora_delta_weight(up.to(dtype), down.to(dtype), scale)


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
) -> dict[str, Tensor]:
    """Combine several LoRAs of one component into one: ``Σ s_i Δ_i`` per layer.

    A layer present in only some of the LoRAs combines those. ``mode="concat"`` is exact (rank =
    sum of ranks); ``mode="svd"`` re-compresses each layer to ``rank`` (``conv_rank`` for kxk
    convs; a dynamic ``method`` caps at it) with ``alpha = r``.

    Args:
        states: canonical component states (``{"<layer>.lora_down.weight", ...}``).
        dtype: dtype of the written factors (default float32).

    Returns:
        the combined canonical state.
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
    for layer, (layer_tensors, layer_strengths) in per_layer.items():
        combined = concat_layers(layer_tensors, layer_strengths, name=layer)
        down, up = combined["lora_down.weight"], combined["lora_up.weight"]
        if mode == "svd":
            total = down.shape[0]
            is_kxk = down.dim() == 4 and down.shape[2] * down.shape[3] > 1
            target = (conv_rank if conv_rank is not None else rank) if is_kxk else rank
            u, s, vh = factored_svd(up.reshape(up.shape[0], total), down.reshape(total, -1))
            new_up, new_down, alpha, _ = factors_from_svd(
                u, s, vh, rank=min(int(target), s.numel()), method=method, param=param,
                clamp_quantile=clamp_quantile,
            )
            r = new_down.shape[0]
            if down.dim() == 4:
                new_up = new_up.reshape(up.shape[0], r, 1, 1)
                new_down = new_down.reshape(r, *down.shape[1:])
            down, up = new_down, new_up
            combined["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        out[f"{layer}.lora_down.weight"] = down.to(dtype or torch.float32)
        out[f"{layer}.lora_up.weight"] = up.to(dtype or torch.float32)
        out[f"{layer}.alpha"] = combined["alpha"]
    return out


# -------------------------------------------------------------------------------- the file job
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
) -> LoRAJobReport:
    """Combine several LoRA files into one that applies ``Σ s_i Δ_i`` (see
    :func:`sdadapt.loratools.combine.combine_lora_states`): ``mode="concat"`` exact (rank = sum of
    ranks), ``mode="svd"`` re-compressed to ``rank``."""
    check_rank_method(method, param)
    check_save_dtype(dtype)
    check_base_model(base_model)
    if not loras:
        raise ValueError("combine_loras needs at least one LoRA file")
    values = per_file(strengths, len(loras), "strength")
    loaded = [load_components(path) for path in loras]
    check_output(out, overwrite=overwrite, needed_bytes=0)
    models = {lora_base_model(p, c, m) for p, (c, m) in zip(loras, loaded)}
    if base_model is None and len(models) > 1:
        raise WeightFileError(f"the LoRAs are for different base models ({sorted(models)}); combine LoRAs of one model")
    model = base_model or models.pop()
    names = sorted({c for components, _ in loaded for c in components})
    combined: dict[str, dict[str, Tensor]] = {}
    for component in names:
        present = [(c[component], s) for (c, _), s in zip(loaded, values) if component in c]
        combined[component] = combine_lora_states(
            [p[0] for p in present], [p[1] for p in present], mode=mode, rank=rank, conv_rank=conv_rank,  # type: ignore[arg-type]
            method=method, param=param, clamp_quantile=clamp_quantile, dtype=dtype,
        )
    report = LoRAJobReport(path=Path(out), base_model=model)
    meta = {
        "ss_training_comment": "combined by sdadapt: "
        + ", ".join(f"{s:g} x {Path(p).name}" for p, s in zip(loras, values)) + f" ({mode})",
    }
    needed = sum(t.numel() * t.element_size() for s in combined.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, combined, base_model=model, metadata=meta)
    return report
