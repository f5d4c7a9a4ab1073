"""LoRA extraction: the best rank-r factors of a weight difference (truncated SVD).

Math. For a layer with base weight ``W`` and tuned weight ``W'`` (shape ``(out, in, *k)``), the
difference ``Δ = W' − W`` is flattened to ``D`` of shape ``(out, in·kh·kw)`` and decomposed
``D = U S Vᵀ``. Keeping the top ``r`` singular triplets gives the best rank-r approximation in
Frobenius (and spectral) norm (Eckart–Young)::

    ‖D − U_r S_r V_rᵀ‖_F = sqrt(Σ_{i>r} σ_i²)

kohya's layout puts the singular values into ``up``: ``up = U_r S_r`` (out, r), ``down = V_rᵀ``
(r, in·k). Optionally (``clamp_quantile``, off by default) both are then clamped to ``[−h, h]``
where ``h`` is the ``clamp_quantile`` quantile of the signed values of ``up`` and ``down`` together
— kohya's ``extract_lora_from_models.py`` rule (its default 0.99). It trims outliers so
half-precision files do not overflow, but it can cost a lot of accuracy: the clamp is
scale-blind, so when ``up`` carries large singular values most of the clipped entries are ``up``'s
largest (a rank-3 difference extracted at rank 8 can lose a quarter of a layer's ``‖D‖_F``).
``split="sqrt"`` instead moves ``sqrt(S)`` onto each side after clamping (``up = U_r sqrt(S_r)``,
``down = sqrt(S_r) V_rᵀ``): the product and therefore the LoRA are identical, only the balance of
the factors changes.

The error reported for a layer is measured on the factors as returned — after the clamp and the
cast to the output dtype — so it is the error of what is written (:func:`lowrank_error`); without
clamp and cast it is the Eckart–Young bound.

The scale ``alpha / r`` is divided out of the factors, so ``(alpha / r) · up ⋅ down`` is the
approximation whatever ``alpha`` is; ``alpha = None`` writes ``alpha = r`` (scale 1), as kohya's
``extract_lora_from_models.py`` does.

Dynamic rank (kohya's ``resize_lora.py`` rules, capped at ``rank``):

* ``sv_ratio``      keep ``σ_i > σ_0 / param``                            (param ≥ 1)
* ``sv_cumulative`` smallest ``n`` with ``Σ_{i<n} σ_i / Σ σ ≥ param``       (0 < param ≤ 1)
* ``sv_fro``        smallest ``n`` with ``Σ_{i<n} σ_i² / Σ σ² ≥ param²``    (0 < param ≤ 1; param is
  the fraction of the Frobenius norm kept)

each clamped to ``[1, len(σ) − 1]`` and then **plus one**, exactly as kohya does (so files match
kohya's ranks); a zero difference (``σ_0 ≤ 1e-6``) gets rank 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ..checks import cast_checked, check_device, finite_number, has_nonfinite, positive_int
from ..errors import InputError
from ..formats import WeightFileError, save_kohya
from .checkpoint_layers import (
    LayerSlot,
    checkpoint_layers,
    detect_base_model,
    is_lora_target,
    unet_layers_per_block,
)
from .output import (
    LayerReport,
    LoRAJobReport,
    Progress,
    check_base_model,
    check_inputs,
    check_not_input,
    check_output,
    check_save_dtype,
    layer_errors,
    slot_shape,
)

if TYPE_CHECKING:
    from ..merge.sources import TensorSource

__all__ = [
    "RANK_METHODS",
    "ExtractedLayer",
    "truncated_svd",
    "select_rank",
    "clamp_factors",
    "signed_quantile",
    "lowrank_error",
    "factors_from_svd",
    "check_clamp",
    "low_rank_factors",
    "extract_layer",
    "check_rank_method",
    "extract_lora",
    "extract_lora_state",
]

RankMethod = Literal["fixed", "sv_ratio", "sv_cumulative", "sv_fro"]
#: rank-selection methods: a fixed rank, or kohya's three dynamic rules
RANK_METHODS: tuple[str, ...] = ("fixed", "sv_ratio", "sv_cumulative", "sv_fro")
#: a difference whose largest singular value is at most this is "zero" (kohya's MIN_SV)
MIN_SINGULAR_VALUE = 1e-6


@dataclass(frozen=True)
class ExtractedLayer:
    """One layer's LoRA factors and what the truncation cost.

    Attributes:
        up: (out, r) or (out, r, 1, 1).
        down: (r, in) or (r, in, kh, kw).
        alpha: scale numerator; ``(alpha / r) · up ⋅ down`` approximates the difference.
        singular_values: (q,) every singular value computed (all of them for a full SVD, the top
            ``q`` for a randomized one), float32/float64, descending.
        residual_norm: ``‖D − (alpha / r) · up ⋅ down‖_F`` of these very factors — after the clamp
            and the cast to the requested dtype — so the error of what is written (equal to the
            Eckart–Young ``sqrt(Σ_{i≥r} σ_i²)`` without clamp and cast).
        norm: ``‖D‖_F`` (so ``residual / norm`` is the relative error).
    """

    up: Tensor
    down: Tensor
    alpha: float
    singular_values: Tensor
    residual_norm: float
    norm: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    randomized: bool = False,
    niter: int = 2,
    oversample: int = 8,
    seed: int | None = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U (m, q), S (q,), Vh (q, n))`` of a 2-D matrix, descending ``S``.

    Full ``torch.linalg.svd`` (``q = min(m, n)``), or with ``randomized=True`` Halko et al.'s
    randomized range finder (``torch.svd_lowrank`` with ``q = min(rank + oversample, m, n)`` and
    ``niter`` power iterations) — much faster for large matrices when ``rank`` is small. The
    randomized path draws from a private generator seeded with ``seed`` (reproducible; global RNG
    untouched); ``seed=None`` uses the global RNG.

    Args:
        matrix: (m, n), any float dtype; computed in float32 (float64 stays float64).
        rank: how many leading triplets the caller needs (only used by the randomized path).
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    m, n = matrix.shape
    a = matrix.to(_compute_dtype(matrix))
    full = min(m, n)
    q = min(rank + max(oversample, 0), full)
    if not randomized or q >= full:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh
    if seed is None:
        u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
    else:
        devices = [a.device] if a.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
    return u, s, v.mT


def select_rank(
    singular_values: Tensor,
    *,
    method: str = "fixed",
    param: float | None = None,
    max_rank: int,
    total_energy: float | None = None,
) -> int:
    """The rank to keep for one layer (kohya's ``resize_lora.py`` rules, see the module doc).

    Args:
        singular_values: (q,) descending.
        method: ``"fixed"`` (``max_rank``), ``"sv_ratio"``, ``"sv_cumulative"`` or ``"sv_fro"``.
        param: the dynamic method's target (ratio ≥ 1, or a fraction in (0, 1]).
        max_rank: the cap (and the rank for ``"fixed"``); never more than ``len(singular_values)``.
        total_energy: ``Σ σ²`` over *all* singular values for ``sv_fro`` when ``singular_values``
            is a truncated (randomized) spectrum; default ``Σ`` of the given values.

    Returns:
        a rank in ``[1, min(max_rank, q)]``.
    """
    if method not in RANK_METHODS:
        raise ValueError(f"rank method must be one of {RANK_METHODS}, got {method!r}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    s = singular_values.detach().to(torch.float64).flatten()
    count = s.numel()
    if count == 0:
        raise ValueError("select_rank got no singular values")
    cap = min(max_rank, count)
    if method == "fixed":
        return cap
    if param is None:
        raise ValueError(f"rank method {method!r} needs a parameter (e.g. --dynamic-param)")
    if method == "sv_ratio":
        if not param >= 1:
            raise ValueError(f"sv_ratio's parameter is σ_max/σ_min and must be >= 1, got {param}")
        index = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        if not 0 < param <= 1:
            raise ValueError(f"sv_cumulative's parameter is a fraction in (0, 1], got {param}")
        total = float(s.sum())
        cumulative = torch.cumsum(s, 0) / (total if total > 0 else 1.0)
        index = int(torch.searchsorted(cumulative, torch.tensor([param], dtype=torch.float64))[0]) + 1
    else:  # sv_fro
        if not 0 < param <= 1:
            raise ValueError(f"sv_fro's parameter is a Frobenius fraction in (0, 1], got {param}")
        energy = float((s * s).sum()) if total_energy is None else float(total_energy)
        cumulative = torch.cumsum(s * s, 0) / (energy if energy > 0 else 1.0)
        index = int(torch.searchsorted(cumulative, torch.tensor([param * param], dtype=torch.float64))[0]) + 1
    if float(s[0]) <= MIN_SINGULAR_VALUE:
        return 1
    index = max(1, min(index, count - 1)) + 1  # kohya: clamp, then one extra rank
    return max(1, min(index, cap))


def signed_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values.flatten(), q)`` (linear interpolation) without its 16M-element limit."""
    flat = values.flatten()
    if flat.numel() <= 16_000_000:
        return torch.quantile(flat, q)
    ordered = torch.sort(flat).values
    position = q * (ordered.numel() - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def clamp_factors(up: Tensor, down: Tensor, quantile: float | None) -> tuple[Tensor, Tensor]:
    """kohya's outlier clamp: ``h = quantile(cat(up, down), q)``; both clamped to ``[−h, h]``.

    ``quantile`` of ``None`` or ``>= 1`` disables it. The quantile is of the *signed* values, as in
    kohya's ``extract_lora_from_models.py`` (so ``0.99`` clamps roughly the largest 2% of ``|x|``
    for symmetric factors).
    """
    if quantile is None or quantile >= 1.0:
        return up, down
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"clamp_quantile must be in (0, 1] (or None to disable), got {quantile}")
    limit = signed_quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def lowrank_error(
    target: Tensor | tuple[Tensor, Tensor], up: Tensor, down: Tensor, *, scale: float = 1.0
) -> float:
    """``‖target − scale · up ⋅ down‖_F``, computed in float64 from the factors as given.

    Args:
        target: the matrix ``D`` the LoRA should reproduce: dense (m, n), or factored as a pair
            ``(left (m, k), right (k, n))`` with ``D = left ⋅ right`` (never formed: the norm is
            that of ``R_a R_bᵀ`` from the QRs of ``[left, −scale·up]`` and ``[right; down]ᵀ``).
        up: (m, r) or (m, r, 1, 1); down: (r, n) or (r, in, kh, kw) with ``in·kh·kw = n`` —
            any dtype (e.g. the fp16 factors a file holds; they are widened exactly).
        scale: the LoRA scale ``alpha / r``.
    """
    m = up.shape[0]
    r = down.shape[0]
    a = up.reshape(m, r).to(torch.float64) * scale  # (m, r)
    b = down.reshape(r, -1).to(torch.float64)  # (r, n)
    if isinstance(target, Tensor):
        if target.shape != (m, b.shape[1]):
            raise ValueError(f"target {tuple(target.shape)} does not match up ⋅ down ({m}, {b.shape[1]})")
        rows = max(1, (1 << 22) // max(b.shape[1], 1))  # at most ~4M float64 values at a time
        total = 0.0
        for start in range(0, m, rows):
            block = target[start : start + rows].to(torch.float64) - a[start : start + rows] @ b
            total += float(block.square().sum())
        return math.sqrt(total)
    left, right = target
    stacked_left = torch.cat([left.to(torch.float64), -a], dim=1)  # (m, k + r)
    stacked_right = torch.cat([right.to(torch.float64), b], dim=0)  # (k + r, n)
    _, r_left = torch.linalg.qr(stacked_left)
    _, r_right = torch.linalg.qr(stacked_right.mT)
    return float(torch.linalg.matrix_norm(r_left @ r_right.mT))


def factors_from_svd(
    u: Tensor,
    s: Tensor,
    vh: Tensor,
    *,
    rank: int,
    method: str = "fixed",
    param: float | None = None,
    alpha: float | None = None,
    scale: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
    norm_sq: float | None = None,
    dtype: torch.dtype | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, float]:
    """LoRA factors from an SVD ``(U (m, q), S (q,), Vh (q, n))`` of a difference ``D``.

    Args:
        rank: fixed rank, or the cap of a dynamic ``method``.
        alpha: the alpha to write (``None`` → ``alpha = r``, scale 1); or
        scale: the scale ``alpha / r`` to keep (resize: ``alpha = scale · r_new``).
        clamp_quantile: kohya's outlier clamp (e.g. 0.99); ``None`` (default) or ``>= 1``: off.
        split: ``"up"`` (kohya: ``S`` in ``up``) or ``"sqrt"`` (``sqrt(S)`` on both sides).
        norm_sq: ``‖D‖_F²`` when ``S`` is not the whole spectrum (randomized SVD).
        dtype: dtype of the returned factors (what will be written); default the SVD's.
        target: ``D`` itself when at hand — dense (m, n) or factored ``(left, right)`` — the residual
            is then measured against it.

    Returns:
        ``(up (m, r), down (r, n), alpha, residual)`` where ``residual = ‖D − (alpha/r)·up⋅down‖_F``
        of the returned factors (after clamp and cast). Without ``target``, ``D`` is taken as
        ``U S Vh`` (factored, never formed) and, with ``norm_sq``, the energy ``U S Vh`` misses is
        added in quadrature (exact when it is orthogonal to the approximation, as without a clamp).
    """
    if split not in ("up", "sqrt"):
        raise ValueError(f"split must be 'up' or 'sqrt', got {split!r}")
    if alpha is not None and scale is not None:
        raise ValueError("pass alpha or scale, not both")
    kept_sq = float((s.double() ** 2).sum())
    r = select_rank(s, method=method, param=param, max_rank=rank, total_energy=kept_sq if norm_sq is None else norm_sq)
    up = u[:, :r] * s[:r]  # (m, r): kohya layout, singular values in up
    down = vh[:r]  # (r, n)
    up, down = clamp_factors(up, down, clamp_quantile)
    if split == "sqrt":
        root = torch.where(s[:r] > 0, s[:r].sqrt(), torch.ones_like(s[:r]))  # (r,)
        up = up / root
        down = down * root[:, None]
    if scale is not None:
        alpha_value = float(scale) * r
    else:
        alpha_value = float(r) if alpha is None else float(alpha)
    if not alpha_value > 0:
        raise ValueError(f"alpha must be positive, got {alpha_value} (alpha={alpha}, scale={scale})")
    factor = alpha_value / r
    if factor != 1.0:  # the factors absorb 1/scale so that scale · up ⋅ down is the truncation
        if split == "up":
            up = up / factor
        else:
            up, down = up / math.sqrt(factor), down / math.sqrt(factor)
    if dtype is not None:
        hint = "write float32 (--dtype fp32)"
        up, down = cast_checked(up, dtype, key="lora_up", hint=hint), cast_checked(down, dtype, key="lora_down", hint=hint)
    up, down = up.contiguous(), down.contiguous()
    # the error of the factors as returned: after the clamp and the cast
    if target is not None:
        residual = lowrank_error(target, up, down, scale=factor)
    else:
        residual = lowrank_error((u * s, vh), up, down, scale=factor)
        if norm_sq is not None:
            residual = math.sqrt(residual**2 + max(float(norm_sq) - kept_sq, 0.0))
    return up, down, alpha_value, residual


def low_rank_factors(
    matrix: Tensor,
    *,
    rank: int,
    method: str = "fixed",
    param: float | None = None,
    alpha: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
    randomized: bool = False,
    niter: int = 2,
    oversample: int = 8,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, float, Tensor, float, float]:
    """Rank-r LoRA factors of a 2-D matrix (SVD, rank choice, clamp, split, alpha, cast).

    Args:
        matrix: (m, n).
        rank: fixed rank, or the cap for a dynamic method.
        alpha: ``None`` → ``alpha = r``; otherwise the factors absorb ``r / alpha``.
        clamp_quantile: kohya's outlier clamp (e.g. 0.99); ``None`` (default): off.
        dtype: dtype of the returned factors (what will be written); default float32 (float64
            for a float64 matrix).

    Returns:
        ``(up (m, r), down (r, n), alpha, singular values (q,), residual, ‖matrix‖_F)`` with
        ``residual = ‖matrix − (alpha/r)·up⋅down‖_F`` measured directly on the returned factors.
    """
    a = matrix.to(_compute_dtype(matrix))
    norm_sq = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    # sv_cumulative needs Σσ over the whole spectrum, which a randomized SVD does not give
    use_randomized = randomized and method != "sv_cumulative"
    u, s, vh = truncated_svd(a, rank, randomized=use_randomized, niter=niter, oversample=oversample, seed=seed)
    full = s.numel() == min(a.shape)
    up, down, alpha_value, residual = factors_from_svd(
        u, s, vh, rank=rank, method=method, param=param, alpha=alpha, clamp_quantile=clamp_quantile,
        split=split, norm_sq=None if full else norm_sq, dtype=dtype, target=a,
    )
    return up, down, alpha_value, s, residual, math.sqrt(norm_sq)


@torch.no_grad()  # (parameters given: no autograd graph kept for the SVDs)
def extract_layer(
    base: Tensor,
    tuned: Tensor,
    *,
    rank: int,
    method: str = "fixed",
    param: float | None = None,
    alpha: float | None = None,
    clamp_quantile: float | None = None,
    split: Literal["up", "sqrt"] = "up",
    randomized: bool = False,
    niter: int = 2,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ExtractedLayer:
    """LoRA factors of ``tuned − base`` for a Linear or Conv2d weight.

    Args:
        base, tuned: (out, in) or (out, in, kh, kw), equal shapes; any float dtype (computed in
            float32, or float64 if both are float64).
        rank: fixed rank, or the cap of a dynamic ``method``; also capped at ``min(out, in·kh·kw)``.
        clamp_quantile: kohya's outlier clamp (0.99 is kohya's); ``None`` (default): off.
        device: where to run the SVD (e.g. ``"cuda"``); results come back on ``base``'s device.
        dtype: dtype of the returned factors, i.e. of the file they go to (default: the compute
            dtype); ``residual_norm`` is measured after this cast.

    Returns:
        :class:`ExtractedLayer` with ``up`` (out, r[, 1, 1]) and ``down`` (r, in[, kh, kw]) such that
        ``(alpha / r) · up ⋅ down`` (see :func:`sdadapt.lora_delta_weight`) approximates
        ``tuned − base`` to ``residual_norm``.
    """
    if base.shape != tuned.shape:
        raise ValueError(f"base weight {tuple(base.shape)} and tuned weight {tuple(tuned.shape)} differ in shape")
    if base.dim() not in (2, 4):
        raise ValueError(f"LoRA layers are Linear (2-D) or Conv2d (4-D) weights, got shape {tuple(base.shape)}")
    dtype_compute = torch.float64 if base.dtype == torch.float64 and tuned.dtype == torch.float64 else torch.float32
    home = base.device
    target = torch.device(device) if device is not None else home
    out_features = base.shape[0]
    # (out, in, *k) -> (out, in*k)
    diff = (tuned.to(target, dtype_compute) - base.to(target, dtype_compute)).reshape(out_features, -1)
    up, down, alpha_value, s, residual, norm = low_rank_factors(
        diff,
        rank=rank,
        method=method,
        param=param,
        alpha=alpha,
        clamp_quantile=clamp_quantile,
        split=split,
        randomized=randomized,
        niter=niter,
        seed=seed,
        dtype=dtype,
    )
    r = down.shape[0]
    if base.dim() == 4:
        up = up.reshape(out_features, r, 1, 1)
        down = down.reshape(r, *base.shape[1:])
    return ExtractedLayer(
        up=up.to(home), down=down.to(home), alpha=alpha_value, singular_values=s.to(home),
        residual_norm=residual, norm=norm,
    )


def check_rank_method(method: str, param: float | None) -> None:
    """A known rank method with its parameter: finite, and in the method's range."""
    if method not in RANK_METHODS:
        raise InputError(f"rank method must be one of {RANK_METHODS}, got {str(method)[:40]!r}")
    if method != "fixed" and param is None:
        raise InputError(f"rank method {method!r} needs its parameter (dynamic_param / --dynamic-param)")
    if param is not None:
        if method == "sv_ratio":
            finite_number(param, name="--dynamic-param of sv_ratio (sigma_max/sigma_min)", low=1.0, high=1e12)
        elif method in ("sv_cumulative", "sv_fro"):
            finite_number(param, name=f"--dynamic-param of {method} (a fraction)", low=0.0, high=1.0, low_open=True)
        else:
            finite_number(param, name="--dynamic-param")


def check_clamp(clamp_quantile: float | None) -> None:
    """``None`` (off) or a finite quantile in (0, 1]."""
    finite_number(clamp_quantile, name="clamp_quantile (--clamp-quantile)", low=0.0, high=1.0, low_open=True,
                  allow_none=True)


# -------------------------------------------------------------------------------- the file job
def _check_extract_options(*, rank, conv_rank, alpha, conv_alpha, method, param, clamp_quantile, min_diff,
                           min_layer_diff, niter, dtype, base_model, device) -> torch.device:
    check_rank_method(method, param)
    check_save_dtype(dtype)
    check_base_model(base_model)
    positive_int(rank, name="rank (--rank)")
    positive_int(conv_rank, name="conv_rank (--conv-rank)", allow_none=True)
    finite_number(alpha, name="alpha (--alpha)", low=0.0, low_open=True, high=1e6, allow_none=True)
    finite_number(conv_alpha, name="conv_alpha (--conv-alpha)", low=0.0, low_open=True, high=1e6, allow_none=True)
    finite_number(min_diff, name="min_diff (--min-diff)", low=0.0)
    finite_number(min_layer_diff, name="min_layer_diff (--min-layer-diff)", low=0.0)
    check_clamp(clamp_quantile)
    if isinstance(niter, bool) or not isinstance(niter, int) or not 0 <= niter <= 100:
        raise InputError(f"niter (--niter) must be a whole number in [0, 100], got {niter!r}")
    return check_device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))


def extract_lora_state(
    base: str | os.PathLike | Mapping[str, Tensor] | torch.nn.Module,
    tuned: str | os.PathLike | Mapping[str, Tensor] | torch.nn.Module,
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    alpha: float | None = None,
    conv_alpha: float | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    min_diff: float = 0.01,
    min_layer_diff: float = 0.0,
    split: str = "up",
    randomized: bool = False,
    niter: int = 2,
    device: str | torch.device | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, dict[str, Tensor]], LoRAJobReport]:
    """:func:`extract_lora` in memory: the LoRA ``tuned − base`` as sdadapt's canonical state, nothing written.

    ``base`` and ``tuned`` are each a file, a state dict or a module (its ``state_dict()``, read as it is: no
    copy) in the naming :func:`extract_lora` reads — an LDM checkpoint's keys or a diffusers UNet's (a
    ``UNet2DConditionModel`` itself). Write the result with ``sdadapt.save_lora(path, components, format="kohya",
    base_model=report.base_model)`` or apply it with ``sdadapt.apply_lora``.

    The options are :func:`extract_lora`'s (``out`` and ``overwrite`` aside).

    Returns:
        ``({component: {"<layer>.lora_down.weight" (r, in[, kh, kw]), "<layer>.lora_up.weight" (out, r[, 1, 1]),
        "<layer>.alpha" ()}}, report)`` — the report's ``path`` is ``None``, its errors those of the factors returned.

    Raises:
        WeightFileError: unreadable inputs, different architectures, nothing to extract.
        InputError: an option out of range.
    """
    device = _check_extract_options(rank=rank, conv_rank=conv_rank, alpha=alpha, conv_alpha=conv_alpha, method=method,
                                    param=param, clamp_quantile=clamp_quantile, min_diff=min_diff,
                                    min_layer_diff=min_layer_diff, niter=niter, dtype=dtype, base_model=base_model,
                                    device=device)
    with _source(base, "base") as base_src, _source(tuned, "tuned") as tuned_src:
        components, report = _extract(
            base_src, tuned_src, rank=rank, conv_rank=conv_rank, alpha=alpha, conv_alpha=conv_alpha, method=method,
            param=param, clamp_quantile=clamp_quantile, min_diff=min_diff, min_layer_diff=min_layer_diff, split=split,
            randomized=randomized, niter=niter, device=device, base_model=base_model, dtype=dtype, progress=progress)
    return components, report


def _source(value, name: str):
    """A file -> :func:`~sdadapt.merge.sources.open_source`; a state dict or module -> an in-memory source."""
    from ..merge.sources import MemorySource, open_source

    if isinstance(value, torch.nn.Module):
        return MemorySource(value.state_dict(), name=f"<{name} {type(value).__name__}>")
    if isinstance(value, Mapping):
        return MemorySource(value, name=f"<{name} state dict>")
    return open_source(value)


def extract_lora(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    alpha: float | None = None,
    conv_alpha: float | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    min_diff: float = 0.01,
    min_layer_diff: float = 0.0,
    split: str = "up",
    randomized: bool = False,
    niter: int = 2,
    device: str | torch.device | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LoRAJobReport:
    """Extract a LoRA (``tuned − base``) from two checkpoints and write it in kohya format
    (:func:`extract_lora_state` does it in memory).

    Targets are kohya's: every Linear / 1x1 conv in the UNet's transformer blocks, and the text
    encoders' q/k/v/out and MLP layers; with ``conv_rank`` also the resnets, down- and upsamplers
    (LoCon; kxk convs get ``conv_rank``/``conv_alpha``).

    Args:
        base, tuned: LDM single-file checkpoints (``.safetensors`` or ``.ckpt``) or diffusers UNet
            files, same architecture.
        rank: fixed rank, or the cap of a dynamic ``method`` (``sv_ratio``/``sv_cumulative``/
            ``sv_fro`` with ``param``).
        alpha: alpha to write (default ``alpha = rank`` of each layer, scale 1).
        clamp_quantile: kohya's outlier clamp of the factors; ``0.99`` (kohya's default) gives
            kohya's ``extract_lora_from_models.py`` files. Default ``None`` (off): the clamp can cost
            a large part of a layer's accuracy, which the report then shows.
        min_diff: a text encoder whose largest ``|Δ|`` is at most this is left out entirely
            (kohya's rule and default: text encoders barely change in most fine-tunes).
        min_layer_diff: any layer whose largest ``|Δ|`` is at most this is left out (default 0:
            only identical layers).
        randomized, niter: randomized SVD (:func:`torch.svd_lowrank`) for speed on big layers.
        device: run the SVDs there (e.g. ``"cuda"``); default ``"cuda"`` when available.
        base_model: kohya naming/metadata; default detected from the checkpoint's keys.
        dtype: dtype of the factors (default float32; alphas are always float32).

    Returns:
        :class:`LoRAJobReport` (ranks, alphas, skipped layers, and per layer the error
        ``‖Δ − (alpha/r)·up⋅down‖_F`` of the factors as written: after the clamp and the cast to
        ``dtype``).

    Raises:
        WeightFileError: missing/unreadable inputs, different architectures (lists the keys),
            nothing to extract, not enough disk space.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from ..merge.sources import open_source

    _check_extract_options(rank=rank, conv_rank=conv_rank, alpha=alpha, conv_alpha=conv_alpha, method=method, param=param,
                           clamp_quantile=clamp_quantile, min_diff=min_diff, min_layer_diff=min_layer_diff, niter=niter,
                           dtype=dtype, base_model=base_model, device=device)  # (before the files are looked at)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    check_inputs(base, tuned)
    check_not_input(out, base, tuned)
    components, report = extract_lora_state(
        base, tuned, rank=rank, conv_rank=conv_rank, alpha=alpha, conv_alpha=conv_alpha, method=method, param=param,
        clamp_quantile=clamp_quantile, min_diff=min_diff, min_layer_diff=min_layer_diff, split=split,
        randomized=randomized, niter=niter, device=device, base_model=base_model, dtype=dtype, progress=progress)
    with open_source(base) as base_src:  # (the header again: the UNet's layout names the kohya keys)
        layers_per_block = unet_layers_per_block({k: tuple(base_src.shape(k)) for k in base_src})
    report.path = Path(out)
    meta = {
        "ss_training_comment": f"extracted by sdadapt from {Path(tuned).name} - {Path(base).name}",
        "sdadapt.extract": json.dumps(
            {"rank": rank, "conv_rank": conv_rank, "alpha": alpha, "conv_alpha": conv_alpha, "method": method,
             "param": param, "clamp_quantile": clamp_quantile, "min_diff": min_diff, "split": split,
             "randomized": randomized}
        ),
    }
    if method != "fixed":
        meta.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    else:
        meta.update(_kohya_network_metadata(rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha))
    needed = sum(t.numel() * t.element_size() for s in components.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, components, base_model=report.base_model, metadata=meta, overwrite=overwrite,
               layers_per_block=layers_per_block)
    return report


def _extract(base_src, tuned_src, *, rank, conv_rank, alpha, conv_alpha, method, param, clamp_quantile, min_diff,
             min_layer_diff, split, randomized, niter, device, base_model, dtype, progress):
    """The extraction over two open sources: ``(components, report (path None))``."""
    base, tuned = base_src.path, tuned_src.path
    base_shapes = {k: tuple(base_src.shape(k)) for k in base_src.keys()}
    tuned_shapes = {k: tuple(tuned_src.shape(k)) for k in tuned_src.keys()}
    base_layers = checkpoint_layers(base_shapes)
    tuned_layers = checkpoint_layers(tuned_shapes)
    if not base_layers:
        sample = ", ".join(list(base_shapes)[:5])
        raise WeightFileError(
            f"{base}: no UNet or text-encoder weights found (keys look like: {sample}); expected an LDM "
            "checkpoint (model.diffusion_model.*, cond_stage_model.*, conditioner.*) or a diffusers UNet file"
        )
    _check_same_architecture(base, tuned, base_layers, tuned_layers, base_shapes, tuned_shapes)
    model = base_model or detect_base_model(base_shapes)
    conv = conv_rank is not None
    todo = [
        (name, slot)
        for name, slot in base_layers.items()
        if is_lora_target(slot.component, slot.layer, slot_shape(base_shapes[slot.key], slot), conv=conv)
    ]
    if not todo:
        raise WeightFileError(f"{base}: none of its layers is a LoRA target (attention/MLP Linear layers)")
    report = LoRAJobReport(path=None, base_model=model)
    components: dict[str, dict[str, Tensor]] = {}
    max_diff: dict[str, float] = {}
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    for done, ((component, layer), slot) in enumerate(todo, 1):
        base_w, tuned_w = _read_pair(base_src, tuned_src, slot, tuned_layers[(component, layer)], cache)
        for path, weight, key in ((base, base_w, slot.key), (tuned, tuned_w, tuned_layers[(component, layer)].key)):
            if has_nonfinite(weight):
                raise WeightFileError(
                    f"{path}: tensor {key!r} holds NaN/inf ({int((~torch.isfinite(weight)).sum())} values); a LoRA "
                    "cannot be extracted from a broken checkpoint — use an intact copy"
                )
        diff = float((tuned_w.float() - base_w.float()).abs().max()) if base_w.numel() else 0.0
        max_diff[component] = max(max_diff.get(component, 0.0), diff)
        name = f"{component}:{layer}"
        if diff <= min_layer_diff:
            report.skipped[name] = f"max |Δ| = {diff:.3g} <= min_layer_diff {min_layer_diff:g}"
        else:
            is_kxk = base_w.dim() == 4 and base_w.shape[2] * base_w.shape[3] > 1
            # the factors come back in the file's dtype: the reported error is that of the file
            with layer_errors(tuned, name):
                extracted = extract_layer(
                    base_w, tuned_w,
                    rank=conv_rank if is_kxk and conv_rank is not None else rank,
                    alpha=conv_alpha if is_kxk and conv_alpha is not None else alpha,
                    method=method, param=param, clamp_quantile=clamp_quantile, split=split,  # type: ignore[arg-type]
                    randomized=randomized, niter=niter, device=device, dtype=dtype or torch.float32,
                )
            state = components.setdefault(component, {})
            state[f"{layer}.lora_down.weight"] = extracted.down
            state[f"{layer}.lora_up.weight"] = extracted.up
            state[f"{layer}.alpha"] = torch.tensor(extracted.alpha, dtype=torch.float32)
            report.layers[name] = LayerReport(extracted.rank, extracted.alpha, extracted.residual_norm, extracted.norm)
        if progress is not None:
            progress(done, len(todo), layer)
    for component, largest in max_diff.items():
        if component.startswith("text_encoder") and largest <= min_diff and component in components:
            for layer_key in [k for k in components[component] if k.endswith(".alpha")]:
                name = f"{component}:{layer_key[: -len('.alpha')]}"
                report.layers.pop(name, None)
                keep = (f"min_diff / --min-diff {_round_below(largest):g} keeps it" if largest > 0
                        else "its weights are the base's")
                report.skipped[name] = (f"text encoder unchanged: its max |Δ| = {largest:.3g} <= min_diff {min_diff:g} "
                                        f"(kohya's rule; {keep})")
            del components[component]
    if not components:
        raise WeightFileError(
            f"{tuned}: no layer differs from {base} by more than the thresholds (min_diff={min_diff:g}, "
            f"min_layer_diff={min_layer_diff:g}); is it really a fine-tune of that base?"
        )
    return components, report


def _kohya_network_metadata(*, rank: int, alpha: float | None = None, conv_rank: int | None = None,
                                   conv_alpha: float | None = None) -> dict[str, str]:
    """``ss_network_dim`` / ``ss_network_alpha`` / ``ss_network_args`` as kohya's ``extract_lora_from_models.py``
    writes them (sd-scripts@48d368fa networks/extract_lora_from_models.py:242-254): the rank given, ``str(dim)``;
    the alpha as ``str(float)`` (kohya's is the rank, ``str(float(dim))``: ``"4.0"``); ``ss_network_args`` the
    JSON of ``{"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))}`` when convolutions are extracted,
    else ``"{}"``. sdadapt's ``alpha`` / ``conv_alpha`` (kohya has none: alpha = rank) are written the same way;
    a kxk conv's alpha left out is ``alpha``, else its rank (as the layers get them)."""
    args: dict[str, str] = {}
    if conv_rank is not None:
        conv = conv_alpha if conv_alpha is not None else alpha if alpha is not None else conv_rank
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv))}
    return {"ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha if alpha is not None else rank)),
            "ss_network_args": json.dumps(args)}


def _check_same_architecture(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    base_layers: Mapping[tuple[str, str], LayerSlot],
    tuned_layers: Mapping[tuple[str, str], LayerSlot],
    base_shapes: Mapping[str, tuple[int, ...]],
    tuned_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    problems: list[str] = []
    for name, slot in base_layers.items():
        other = tuned_layers.get(name)
        if other is None:
            problems.append(f"{slot.key} (in {Path(base).name} only)")
        elif slot_shape(base_shapes[slot.key], slot) != slot_shape(tuned_shapes[other.key], other):
            problems.append(
                f"{slot.key}: shape {slot_shape(base_shapes[slot.key], slot)} vs {slot_shape(tuned_shapes[other.key], other)}"
            )
    for name, slot in tuned_layers.items():
        if name not in base_layers:
            problems.append(f"{slot.key} (in {Path(tuned).name} only)")
    if problems:
        from ..formats.model_keys import KeyMapError, checkpoint_architecture

        try:
            models = checkpoint_architecture(base_shapes), checkpoint_architecture(tuned_shapes)
        except KeyMapError:
            models = None
        if models is not None and models[0] != models[1]:  # the usual mistake, said first and alone
            raise WeightFileError(
                f"{base} is an {models[0].upper()} model and {tuned} an {models[1].upper()} one "
                f"({len(problems)} layer(s) differ); extract from a fine-tune of the same base model"
            )
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise WeightFileError(
            f"{base} and {tuned} are different architectures ({len(problems)} layer(s) differ):\n  "
            + "\n  ".join(problems[:10]) + more
            + "\nExtract from a fine-tune of the same base model (SD1 vs SD2 vs SDXL, same UNet/text encoders)."
        )


def _read_pair(
    base_src: TensorSource, tuned_src: TensorSource, slot: LayerSlot, tuned_slot: LayerSlot, cache: dict
) -> tuple[Tensor, Tensor]:
    """Base and tuned weights of one layer (fused in_proj weights are read once for q, k and v)."""
    if slot.key not in cache:
        cache.clear()
        cache[slot.key] = (base_src.get(slot.key), tuned_src.get(tuned_slot.key))
    base_w, tuned_w = cache[slot.key]
    if slot.rows is not None:
        base_w = base_w[slot.rows[0] : slot.rows[1]]
        tuned_w = tuned_w[tuned_slot.rows[0] : tuned_slot.rows[1]]  # type: ignore[index]
    return base_w, tuned_w


def _round_below(value: float) -> float:
    """``value`` rounded to 3 significant digits, and strictly below it (a threshold that keeps a layer
    whose largest |difference| is ``value``: the skip rule is ``largest <= min_diff``)."""
    shown = float(f"{value:.3g}")
    return shown if shown < value else float(f"{value * 0.99:.3g}")
