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

Every other family (LoHa, LoKr, full ``diff``, LoCon with a Tucker core, DoRA over any of them)
goes through the one delta path, :func:`sdadapt.adapters.registry.file_layer_delta`: its dense
delta ``ΔW`` (out, in, *k) is decomposed by a truncated SVD (:mod:`sdadapt.loratools.extract`)
and written as LoRA factors with ``alpha = r'`` (scale 1) — a plain LoRA that every loader reads.
The layer's shape comes from the file when it can tell, else from the base checkpoint
(``base=PATH`` / ``--base CKPT``: LoHa and LoKr store a convolution's factors flattened); DoRA
always needs the base checkpoint, since its delta ``W' − W`` depends on ``W``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..adapters.base import LayerGeometry
from ..adapters.lora import lora_scale
from ..adapters.registry import family_of_keys, file_layer_delta
from ..checks import positive_int
from ..errors import InputError
from ..formats import save_kohya
from ..formats.layers import group_by_layer
from .extract import (
    MIN_SINGULAR_VALUE,
    check_clamp,
    check_rank_method,
    factors_from_svd,
    select_rank,
    truncated_svd,
)
from .output import (
    BaseLayers,
    LayerReport,
    LoRAJobReport,
    Progress,
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
)

__all__ = [
    "factored_svd",
    "resize_layer",
    "resize_lora_state",
    "resize_comment",
    "ResizedLayer",
    "resize_lora",
    "is_plain_lora",
    "needs_base_weight",
    "numerical_rank",
    "dense_lora_factors",
    "dense_layer_delta",
]


@dataclass(frozen=True)
class ResizedLayer:
    """A resized layer: ``up`` (out, r'[, 1, 1]), ``down`` (r', in[, kh, kw]), ``alpha``, and
    ``residual_norm`` = ‖old ΔW − new ΔW‖_F (as :func:`~sdadapt.loratools.extract.factors_from_svd`
    measures it), ``norm`` = ‖old ΔW‖_F;
    ``bias_dropped`` = ‖Δb‖ of a bias delta (``diff_b``) the LoRA cannot hold (0: none)."""

    up: Tensor
    down: Tensor
    alpha: float
    residual_norm: float
    norm: float
    bias_dropped: float = 0.0

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
    dtype: torch.dtype | None = None,
) -> ResizedLayer:
    """Resize one LoRA layer to ``rank`` (or a dynamic rank capped at ``rank``) keeping its scale.

    Args:
        up: (out, r[, 1, 1]); down: (r, in[, kh, kw]); alpha: the file's alpha (``None`` = r).
        rank: new rank (fixed) or cap (dynamic); a rank above the old one keeps the old rank
            (resizing never adds directions). As in kohya's ``resize_lora.py``, the rank rules read
            the spectrum of ``up ⋅ down`` without ``alpha / r``, and a layer whose largest singular
            value there is at most 1e-6 (``MIN_SINGULAR_VALUE``) gets rank 1, fixed rank included.
        dtype: dtype of the factors to write; ``residual_norm`` is the error of those (after the
            clamp and the cast).

    Returns:
        :class:`ResizedLayer` with ``(alpha' / r') · up' ⋅ down'`` the best rank-r' approximation of
        ``(alpha / r) · up ⋅ down``.
    """
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise ValueError(
            f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not fit together (up is (out, r[, 1, 1]), "
            "down (r, in[, kh, kw]) with the same rank r)"
        )
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise ValueError(f"lora_up of a convolution must be (out, r, 1, 1), got {tuple(up.shape)}")
    old_rank = down.shape[0]
    if alpha is not None and (isinstance(alpha, Tensor) and alpha.numel() != 1):
        raise ValueError(f"alpha has {alpha.numel()} values, not one")
    scale = lora_scale(None if alpha is None else float(alpha), old_rank)
    if not math.isfinite(scale):
        raise ValueError(f"alpha {float(alpha):g} is not finite")
    out_features = up.shape[0]
    # SVD of the delta itself, D = scale · up ⋅ down; factors_from_svd divides the scale back out
    left, right = up.reshape(out_features, old_rank) * scale, down.reshape(old_rank, -1)
    u, s, vh = factored_svd(left, right)
    # kohya's resize_lora.py ranks the SVD of up ⋅ down *without* alpha / r, and calls a layer whose
    # largest singular value there is <= 1e-6 zero: rank 1, for a fixed rank as well
    unscaled = s.double() / abs(scale) if scale != 0 else s.double()
    if unscaled.numel() and float(unscaled[0]) <= MIN_SINGULAR_VALUE:
        new_rank = 1
    else:
        new_rank = select_rank(unscaled, method=method, param=param, max_rank=min(rank, s.numel()))
    new_up, new_down, new_alpha, residual = factors_from_svd(
        u, s, vh, rank=new_rank, method="fixed", scale=scale,
        clamp_quantile=clamp_quantile, split=split, dtype=dtype,
        target=(left.double(), right.double()),  # the old delta exactly (factored, never formed)
    )
    norm = float(torch.sqrt((s * s).sum()))
    r = new_down.shape[0]
    if down.dim() == 4:
        new_up = new_up.reshape(out_features, r, 1, 1)
        new_down = new_down.reshape(r, *down.shape[1:])
    return ResizedLayer(new_up, new_down, new_alpha, residual, norm)


def is_plain_lora(tensors: Mapping[str, Tensor]) -> bool:
    """A LoRA/LoCon layer without a Tucker core (and not under DoRA) nor a bias delta (``diff_b``): the layers
    the factored (exact, thin-factor) paths take; the others go the dense path, which reports a bias delta it
    cannot write."""
    try:
        family = family_of_keys(tensors)
    except ValueError:
        return False
    return family.name == "lora" and "lora_down.weight" in tensors and "lora_up.weight" in tensors and (
        "lora_mid.weight" not in tensors and "diff_b" not in tensors
    )


def needs_base_weight(tensors: Mapping[str, Tensor], *, name: str = "<layer>") -> bool:
    """Whether the layer's family computes its delta from the base weight (DoRA)."""
    return bool(family_of_keys(tensors, name=name).module_type.uses_base_weight)


def numerical_rank(singular_values: Tensor, shape: tuple[int, int]) -> int:
    """``#{σ_i > σ_0 · max(m, n) · eps}`` (at least 1): the rank an SVD of an (m, n) matrix can
    resolve in its dtype (``torch.linalg.matrix_rank``'s default tolerance)."""
    s = singular_values
    if s.numel() == 0:
        return 1
    tolerance = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps
    return max(1, int((s > tolerance).sum()))


def dense_lora_factors(
    delta: Tensor,
    *,
    rank: int | None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
    dtype: torch.dtype | None = None,
    zero_rank_one: bool = False,
) -> ResizedLayer:
    """LoRA factors of a dense delta by truncated SVD, ``alpha = r`` (scale 1); ``dtype`` is the
    dtype to write (the reported error is that of the written factors).

    Args:
        delta: ΔW (out, in[, kh, kw]), float32 (float64 stays float64).
        rank: fixed rank, or the cap of a dynamic ``method``; ``None`` keeps the numerical rank
            (:func:`numerical_rank`): ``up ⋅ down == ΔW`` up to floating-point error.
        zero_rank_one: a delta whose largest singular value is at most ``MIN_SINGULAR_VALUE``
            (1e-6) gets rank 1 whatever ``rank`` and ``method`` (kohya's ``resize_lora.py`` zero
            rule, as :func:`resize_layer`); off, a fixed ``rank`` is kept.

    Returns:
        :class:`ResizedLayer` with ``up`` (out, r[, 1, 1]), ``down`` (r, in[, kh, kw]),
        ``residual_norm = ‖ΔW − up ⋅ down‖_F`` (``sqrt(Σ_{i≥r} σ_i²)`` without a clamp) and
        ``norm = ‖ΔW‖_F``.
    """
    out_features = delta.shape[0]
    matrix = delta.reshape(out_features, -1)
    u, s, vh = truncated_svd(matrix, 1)  # the full SVD: every singular value, for the rank rules
    cap = numerical_rank(s, tuple(matrix.shape)) if rank is None else min(int(rank), s.numel())
    if zero_rank_one and s.numel() and float(s[0]) <= MIN_SINGULAR_VALUE:
        cap = 1
    up, down, alpha, residual = factors_from_svd(
        u, s, vh, rank=cap, method=method, param=param, clamp_quantile=clamp_quantile, split=split,
        dtype=dtype, target=matrix,
    )
    r = down.shape[0]
    if delta.dim() == 4:
        up, down = up.reshape(out_features, r, 1, 1), down.reshape(r, *delta.shape[1:])
    return ResizedLayer(up, down, alpha, residual, float(torch.sqrt((s * s).sum())))


def dense_layer_delta(
    tensors: Mapping[str, Tensor],
    geometry: LayerGeometry,
    *,
    scale: float = 1.0,
    base_weight: Tensor | None = None,
    name: str = "<layer>",
) -> tuple[Tensor, Tensor | None]:
    """``(ΔW (out, in, *kernel), Δb (out,) or None)`` of one file layer of any family at strength
    ``scale``, float32 (float64 if the layer's tensors are) —
    :func:`sdadapt.adapters.registry.file_layer_delta`.

    Raises:
        ValueError: tensors that do not fit ``geometry``, or a DoRA layer without ``base_weight``
            (the message asks for the base checkpoint).
    """
    floats = [t for t in tensors.values() if t.is_floating_point() and t.dim() > 0]
    dtype = torch.float64 if floats and all(t.dtype == torch.float64 for t in floats) else torch.float32
    if base_weight is None and needs_base_weight(tensors, name=name):
        family = {"ia3": "an (IA)³", "oft": "an OFT"}.get(family_of_keys(tensors, name=name).name, "a DoRA")
        raise InputError(
            f"{name}: {family} layer's delta W' - W depends on the base weight; pass the base checkpoint the "
            "LoRA was made for: base=PATH (--base CKPT)"
        )
    return file_layer_delta(dict(tensors), geometry, base_weight=base_weight, scale=scale, dtype=dtype, name=name)


@torch.no_grad()  # (parameters given: no autograd graph kept for the SVDs)
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
    base: BaseLayers | None = None,
    component: str = "unet",
    source: str = "<state>",
) -> tuple[dict[str, Tensor], dict[str, ResizedLayer]]:
    """Resize every layer of one component's canonical adapter state to a LoRA of ``rank``.

    LoRA/LoCon layers keep ``alpha / r`` and are re-factored from their thin factors
    (:func:`resize_layer`); every other family (LoHa, LoKr, full, LoCon-Tucker, DoRA) becomes the
    truncated SVD of its dense delta with ``alpha = r'`` (:func:`dense_lora_factors`). A zero layer
    (largest singular value <= 1e-6) gets rank 1 on both paths, as in kohya's ``resize_lora.py``.

    Args:
        state: canonical keys ``"<layer>.<file key>"`` of any family.
        rank: new rank (cap for dynamic methods) for Linear and 1x1 conv layers.
        conv_rank: the same for convolutions, 1x1 included as kohya's ``resize_lora.py`` (default ``rank``).
        dtype: dtype of the written factors (default: each layer's own).
        base: the base checkpoint's layers — needed where the file cannot tell a layer's shape
            (LoHa; LoKr with a low-rank ``w2``) and for DoRA (its delta depends on ``W``).
        component: the component ``state`` belongs to (to find its layers in ``base``).
        source: the file ``state`` came from, for messages.

    Returns:
        ``(new state, {layer: ResizedLayer})``; ``alpha`` tensors are float32 0-dim. A bias delta
        (``diff_b`` of a full layer) is not written — a LoRA holds weight deltas only — and its
        norm is reported as ``ResizedLayer.bias_dropped``.

    Raises:
        WeightFileError: a layer of no known family, one whose shape needs ``base``, tensors that do
            not fit together or the base's layer — naming the file, the layer and the fix.
        NonFiniteError: factors that overflow ``dtype``, or an SVD that does not converge.
    """
    out: dict[str, Tensor] = {}
    report: dict[str, ResizedLayer] = {}
    for layer, tensors in group_by_layer(state).items():
        name = f"{component}:{layer}"
        with layer_errors(source, name):
            out_layer, resized = _resize_one(
                layer, name, tensors, rank=rank, conv_rank=conv_rank, method=method, param=param,
                clamp_quantile=clamp_quantile, split=split, dtype=dtype, base=base, component=component,
            )
        out.update(out_layer)
        report[layer] = resized
    return out, report


def _resize_one(
    layer: str, name: str, tensors: Mapping[str, Tensor], *, rank: int, conv_rank: int | None, method: str,
    param: float | None, clamp_quantile: float | None, split: Literal["up", "sqrt"], dtype: torch.dtype | None,
    base: BaseLayers | None, component: str,
) -> tuple[dict[str, Tensor], ResizedLayer]:
    """One layer of :func:`resize_lora_state`: ``({file key: tensor}, ResizedLayer)``."""
    out: dict[str, Tensor] = {}
    if is_plain_lora(tensors):
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        # (every conv layer, 1x1 included — SD1's proj_in / proj_out: kohya's resize_lora.py tests len(down.size()) == 4)
        target = (conv_rank if conv_rank is not None else rank) if down.dim() == 4 else rank
        resized = resize_layer(
            up, down, tensors.get("alpha"), rank=target, method=method, param=param,
            clamp_quantile=clamp_quantile, split=split, dtype=dtype or down.dtype,
        )
    else:
        geometry = layer_geometry(tensors, component=component, layer=layer, base=base)
        weight = base.weight(component, layer) if base is not None and needs_base_weight(tensors, name=name) else None
        delta, bias = dense_layer_delta(tensors, geometry, base_weight=weight, name=name)
        target = (conv_rank if conv_rank is not None else rank) if geometry.is_conv else rank
        own_dtype = next((t.dtype for t in tensors.values() if t.is_floating_point() and t.dim() > 0), torch.float32)
        resized = dense_lora_factors(
            delta, rank=target, method=method, param=param, clamp_quantile=clamp_quantile, split=split,
            dtype=dtype or own_dtype, zero_rank_one=True,  # (a zero layer: rank 1, as the LoRA layers')
        )
        if bias is not None:
            resized = replace(resized, bias_dropped=float(bias.norm()))
    out[f"{layer}.lora_down.weight"] = resized.down
    out[f"{layer}.lora_up.weight"] = resized.up
    out[f"{layer}.alpha"] = torch.tensor(resized.alpha, dtype=torch.float32)
    return out, resized


# -------------------------------------------------------------------------------- the file job
def resize_comment(metadata: Mapping[str, str], *, old_rank: int | None, rank: int, conv_rank: int | None,
                   method: str, param: float | None) -> str:
    """The ``ss_training_comment`` kohya's ``resize_lora.py`` writes (networks/resize_lora.py:346-356): ``"dimension
    is resized from OLD to NEW[ (conv: C)]; <old comment>"``, or ``"Dynamic resize with METHOD: PARAM from OLD; <old
    comment>"`` (``OLD``: the largest input rank, kohya's ``max_old_rank``; ``C`` only when it differs from NEW)."""
    comment = metadata.get("ss_training_comment", "")
    if method == "fixed":
        conv = rank if conv_rank is None else conv_rank
        conv_desc = "" if conv == rank else f" (conv: {conv})"
        return f"dimension is resized from {old_rank} to {rank}{conv_desc}; {comment}"
    return f"Dynamic resize with {method}: {param} from {old_rank}; {comment}"


def _largest_rank(components: Mapping[str, Mapping[str, Tensor]]) -> int | None:
    """The largest rank of any layer (kohya's ``max_old_rank``); ``None`` when no layer has one (full deltas)."""
    from ..adapters.registry import file_rank
    from ..formats.layers import group_by_layer

    ranks = [file_rank({k: tuple(v.shape) for k, v in tensors.items()}, name=layer)[0]
             for state in components.values() for layer, tensors in group_by_layer(state).items()]
    return max((r for r in ranks if r is not None), default=None)


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
    base: str | os.PathLike | None = None,
) -> LoRAJobReport:
    """Resize every layer of an adapter file of any family to a LoRA of ``rank`` (or a dynamic rank).

    LoRA/LoCon layers keep ``alpha / rank``; LoHa, LoKr, full-diff, LoCon-Tucker and DoRA layers
    become the truncated SVD of their dense delta, ``alpha = rank`` (see the module doc). The
    output is a kohya LoRA.

    Args:
        lora: kohya, LyCORIS or diffusers adapter file.
        rank: new rank (cap for dynamic ``method``) for Linear layers; ``conv_rank`` for conv layers, 1x1
            ones included as kohya's ``resize_lora.py`` (SD1's ``proj_in`` / ``proj_out``; default ``rank``).
        base_model: naming of the output; default from the file's metadata/keys.
        dtype: dtype of the written factors (default: each layer's own).
        base: the checkpoint the adapter was made for (LDM single file or diffusers UNet file);
            needed for DoRA layers and where the file cannot tell a layer's shape (LoHa, LoKr with
            a low-rank ``w2``: the error says so).

    Returns:
        :class:`LoRAJobReport` with each layer's new rank, alpha and the error it added; bias
        deltas (``diff_b``), which a LoRA cannot hold, are listed in ``skipped``.
    """
    check_rank_method(method, param)
    check_save_dtype(dtype)
    check_base_model(base_model)
    positive_int(rank, name="rank (--rank)")
    positive_int(conv_rank, name="conv_rank (--conv-rank)", allow_none=True)
    check_clamp(clamp_quantile)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    check_inputs(lora, *([base] if base is not None else []))
    check_not_input(out, lora, base)
    layers_per_block = base_layers_per_block(base)  # the LDM names of SDXL files: the base's UNet layout
    components, metadata = load_components(lora, layers_per_block=layers_per_block)
    model = base_model or lora_base_model(lora, components, metadata)
    report = LoRAJobReport(path=Path(out), base_model=model)
    resized: dict[str, dict[str, Tensor]] = {}
    layers_of_base = BaseLayers(base) if base is not None else None
    try:
        for done, (component, state) in enumerate(components.items(), 1):
            new_state, layers = resize_lora_state(
                state, rank=rank, conv_rank=conv_rank, method=method, param=param,
                clamp_quantile=clamp_quantile, split=split, dtype=dtype,  # type: ignore[arg-type]
                base=layers_of_base, component=component, source=str(lora),
            )
            resized[component] = new_state
            for layer, info in layers.items():
                report.layers[f"{component}:{layer}"] = LayerReport(info.rank, info.alpha, info.residual_norm, info.norm)
                if info.bias_dropped > 0:
                    report.skipped[f"{component}:{layer}.bias"] = _bias_note(info.bias_dropped)
            if progress is not None:
                progress(done, len(components), component)
    finally:
        if layers_of_base is not None:
            layers_of_base.close()
    # kohya's resize_lora.py keeps the input's metadata and updates what the resize changed (the comment, dim and
    # alpha: "Dynamic" for a dynamic method, resize_lora.py:342-358; the hashes are recomputed by save_kohya)
    updates = {"ss_training_comment": resize_comment(metadata, old_rank=_largest_rank(components), rank=rank,
                                                     conv_rank=conv_rank, method=method, param=param)}
    if method != "fixed":
        updates.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    needed = sum(t.numel() * t.element_size() for s in resized.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(
        out, resized, base_model=model, metadata=updates, title=metadata.get("modelspec.title"), overwrite=overwrite,
        layers_per_block=layers_per_block, source_metadata=metadata, reshaped=True,
    )
    return report


def _bias_note(norm: float) -> str:
    return f"bias delta (diff_b, norm {norm:.3g}) not written: a LoRA holds weight deltas only"
