"""Resizing a LoRA: a smaller (or per-layer dynamic) rank with the same effective scale.

Math. A layer's delta is ``ΔW = (alpha / r) · up ⋅ down``. Resizing takes the SVD of the
unscaled product ``P = up ⋅ down`` (out, in·k) — computed from the thin factors, never the dense
matrix: with ``up = Q₁R₁`` and ``downᵀ = Q₂R₂`` (QR), ``P = Q₁ (R₁R₂ᵀ) Q₂ᵀ`` and the SVD of the
small ``r × r`` core gives ``P``'s exactly — then keeps ``r'`` singular triplets (fixed, or
kohya's ``sv_ratio`` / ``sv_cumulative`` / ``sv_fro`` rules, see
:mod:`sdadapt.loratools.extract`) and writes

    alpha' = (alpha / r) · r'      so   alpha' / r' = alpha / r   (kohya's resize_lora.py)

The result is the best rank-r' approximation of the old delta (Eckart–Young); no clamping by
default (kohya's resize does not clamp).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..adapters.lora import lora_scale
from ..formats import save_kohya
from ..formats.layers import group_by_layer
from .extract import check_rank_method, factors_from_svd
from .output import (
    LayerReport,
    LoRAJobReport,
    Progress,
    check_base_model,
    check_output,
    check_save_dtype,
    load_components,
    lora_base_model,
)

__all__ = ["factored_svd", "resize_layer", "resize_lora_state", "ResizedLayer", "resize_lora"]


@dataclass(frozen=True)
class ResizedLayer:
    """A resized layer: ``up`` (out, r'[, 1, 1]), ``down`` (r', in[, kh, kw]), ``alpha``, and
    ``residual_norm`` = ‖old ΔW − new ΔW‖_F before clamping, ``norm`` = ‖old ΔW‖_F."""

    up: Tensor
    down: Tensor
    alpha: float
    residual_norm: float
    norm: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def factored_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``up ⋅ down`` from its factors, without forming the product.

    Args:
        up: (m, r); down: (r, n) — any float dtype (computed in float32, float64 stays float64).

    Returns:
        ``(U (m, q), S (q,), Vh (q, n))`` with ``q = min(r, m, n)``, descending ``S``;
        ``U diag(S) Vh == up ⋅ down``.
    """
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"factored_svd needs up (m, r) and down (r, n), got {tuple(up.shape)} and {tuple(down.shape)}")
    dtype = torch.float64 if up.dtype == torch.float64 and down.dtype == torch.float64 else torch.float32
    up, down = up.to(dtype), down.to(dtype)
    q1, r1 = torch.linalg.qr(up)  # (m, k1), (k1, r)
    q2, r2 = torch.linalg.qr(down.mT)  # (n, k2), (k2, r)
    core = r1 @ r2.mT  # (k1, k2)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (k1, q), (q,), (q, k2)
    return q1 @ u, s, vh @ q2.mT


def resize_layer(
    up: Tensor,
    down: Tensor,
    alpha: float | Tensor | None,
    *,
    rank: int,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
) -> ResizedLayer:
    """Resize one LoRA layer to ``rank`` (or a dynamic rank capped at ``rank``) keeping its scale.

    Args:
        up: (out, r[, 1, 1]); down: (r, in[, kh, kw]); alpha: the file's alpha (``None`` = r).
        rank: new rank (fixed) or cap (dynamic); a rank above the old one keeps the old rank
            (resizing never adds directions).

    Returns:
        :class:`ResizedLayer` with ``(alpha' / r') · up' ⋅ down'`` the best rank-r' approximation of
        ``(alpha / r) · up ⋅ down``.
    """
    old_rank = down.shape[0]
    scale = lora_scale(None if alpha is None else float(alpha), old_rank)
    out_features = up.shape[0]
    # SVD of the delta itself, D = scale · up ⋅ down; factors_from_svd divides the scale back out
    u, s, vh = factored_svd(up.reshape(out_features, old_rank) * scale, down.reshape(old_rank, -1))
    new_up, new_down, new_alpha, residual = factors_from_svd(
        u, s, vh, rank=min(rank, s.numel()), method=method, param=param, scale=scale,
        clamp_quantile=clamp_quantile, split=split,
    )
    norm = float(torch.sqrt((s * s).sum()))
    r = new_down.shape[0]
    if down.dim() == 4:
        new_up = new_up.reshape(out_features, r, 1, 1)
        new_down = new_down.reshape(r, *down.shape[1:])
    return ResizedLayer(new_up, new_down, new_alpha, residual, norm)


def resize_lora_state(
    state: Mapping[str, Tensor],
    *,
    rank: int,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], dict[str, ResizedLayer]]:
    """Resize every layer of one component's canonical LoRA state.

    Args:
        state: ``{"<layer>.lora_down.weight", "<layer>.lora_up.weight"[, "<layer>.alpha"]}``.
        rank: new rank (cap for dynamic methods) for Linear and 1x1 conv layers.
        conv_rank: the same for kxk convolutions (default ``rank``).
        dtype: dtype of the written factors (default: each layer's own).

    Returns:
        ``(new state, {layer: ResizedLayer})``; ``alpha`` tensors are float32 0-dim.

    Raises:
        ValueError: a layer is not a plain LoRA (e.g. LoHa/LoKr tensors), naming it.
    """
    out: dict[str, Tensor] = {}
    report: dict[str, ResizedLayer] = {}
    for layer, tensors in group_by_layer(state).items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise ValueError(
                f"layer {layer!r} has tensors {sorted(tensors)}, not lora_down/lora_up; only plain "
                "LoRA/LoCon layers can be resized"
            )
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if "lora_mid.weight" in tensors:
            raise ValueError(f"layer {layer!r} is a LoCon with a Tucker mid weight; resizing it is not supported")
        is_kxk = down.dim() == 4 and down.shape[2] * down.shape[3] > 1
        target = (conv_rank if conv_rank is not None else rank) if is_kxk else rank
        resized = resize_layer(
            up, down, tensors.get("alpha"), rank=target, method=method, param=param,
            clamp_quantile=clamp_quantile, split=split,
        )
        write_dtype = dtype or down.dtype
        out[f"{layer}.lora_down.weight"] = resized.down.to(write_dtype)
        out[f"{layer}.lora_up.weight"] = resized.up.to(write_dtype)
        out[f"{layer}.alpha"] = torch.tensor(resized.alpha, dtype=torch.float32)
        report[layer] = resized
    return out, report


# -------------------------------------------------------------------------------- the file job
_REGENERATED = {
    "ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.date", "modelspec.implementation_version",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256",
}


def resize_lora(
    lora: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    split: str = "up",
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LoRAJobReport:
    """Resize every layer of a LoRA file to ``rank`` (or a dynamic rank) keeping ``alpha / rank``.

    Args:
        lora: kohya or diffusers LoRA file.
        rank: new rank (cap for dynamic ``method``) for Linear/1x1 layers; ``conv_rank`` for kxk
            convs (default ``rank``).
        base_model: naming of the output; default from the file's metadata/keys.
        dtype: dtype of the written factors (default: each layer's own).

    Returns:
        :class:`LoRAJobReport` with each layer's new rank, alpha and the error it added.
    """
    check_rank_method(method, param)
    check_save_dtype(dtype)
    check_base_model(base_model)
    components, metadata = load_components(lora)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    model = base_model or lora_base_model(lora, components, metadata)
    report = LoRAJobReport(path=Path(out), base_model=model)
    resized: dict[str, dict[str, Tensor]] = {}
    for done, (component, state) in enumerate(components.items(), 1):
        new_state, layers = resize_lora_state(
            state, rank=rank, conv_rank=conv_rank, method=method, param=param,
            clamp_quantile=clamp_quantile, split=split, dtype=dtype,  # type: ignore[arg-type]
        )
        resized[component] = new_state
        for layer, info in layers.items():
            report.layers[f"{component}:{layer}"] = LayerReport(info.rank, info.alpha, info.residual_norm, info.norm)
        if progress is not None:
            progress(done, len(components), component)
    kept = {k: v for k, v in metadata.items() if k not in _REGENERATED}
    note = f"resized by sdadapt to rank {rank}" + (f" ({method} {param})" if method != "fixed" else "")
    kept["ss_training_comment"] = note + (f"; {metadata['ss_training_comment']}" if metadata.get("ss_training_comment") else "")
    if method != "fixed":
        kept.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    needed = sum(t.numel() * t.element_size() for s in resized.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, resized, base_model=model, metadata=kept, title=kept.get("modelspec.title"))
    return report
