"""sd-meh's merge methods as pure per-key operators.

Transcribed from s1dlx/meh ``sd_meh/merge_methods.py`` (the methods sd-meh adds to A1111's; its
``weighted_sum``/``add_difference``/``sum_twice``/``triple_sum``/``tensor_sum`` are the existing
operators). ``α``/``β`` are sd-meh's ``alpha``/``beta``; ``A``, ``B``, ``C`` its ``a``, ``b``, ``c``:

==========================  =====================================================================
weighted_subtraction        ``(A − αβ·B)/(1 − αβ)`` (sd-meh nudges β by 1e-10 when α = β = 1; here
                            whenever ``αβ = 1``)
euclidean_add_difference    ``C + d/‖d‖·‖lerp(A, B, α) − C‖``, ``d = ±√((1 − α)·â² + α·b̂²)`` with
                            ``â = (A − C)/‖A − C‖``, ``b̂ = (B − C)/‖B − C‖`` and the sign of
                            ``lerp(A, B, α) − C``
multiply_difference         ``C + |A − C|^(1 − α)·|B − C|^α`` with the sign of ``lerp(A, B, β) − C``
similarity_add_difference   ``lerp(A + α·(B − C), lerp(A, B, α/2), s)``, ``s = β·(AB/max(|A|,|B|)² + 1)/2``
                            (``s = β`` where A = B = 0)
top_k_tensor_sum            A's sorted values redistributed in B's order on the magnitude band
                            :func:`ratio_to_region` ``(α, β)`` selects; A elsewhere
distribution_crossover      sort A and B by C, mix their real FFTs (low frequencies from A, high
                            from B; crossover at ``α``, width ``β``), inverse FFT, unsort
ties_add_difference         ``C + α·mean of the agreeing δ``: ``δ = top-β(A − C), top-β(B − C)`` by
                            magnitude, the elected sign is the sign of the vote count
rotate                      A's centred neurons turned by the fraction ``α`` of their orthogonal
                            Procrustes rotation onto B's (``β`` interpolates toward B's rotated
                            neurons), around ``lerp(mean A, mean B, α)``
==========================  =====================================================================

Every function takes ``tensors = (A, B)`` and, where there is a third model, ``base = C`` (the
engine's ``"abc"`` convention), computes in ``compute_dtype`` (sd-meh computes some in the
checkpoint's dtype and some in float32) and never modifies its inputs. None needs a statistic
over the whole model or randomness: every method works on one tensor at a time, as in sd-meh.
:func:`rotate` is sd-meh's ``rotate`` from s1dlx/meh pull request 50 (ljleb's; never merged into sd-meh's
main branch: transcribed from the PR's head ``81515bd``, the same code as sd-mecha's first copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import NonFiniteError
from .operator_inputs import _alpha, _count, _difference_inputs, _same_shape, _up

__all__ = [
    "EPSILON",
    "weighted_subtraction",
    "euclidean_add_difference",
    "multiply_difference",
    "similarity_add_difference",
    "top_k_tensor_sum",
    "ratio_to_region",
    "distribution_crossover",
    "ties_add_difference",
    "filter_top_k",
    "rotate",
    "fractional_matrix_power",
]

#: sd-meh's ``EPSILON`` (the β nudge of weighted subtraction, the hard-crossover threshold)
EPSILON = 1e-10


def _ab(tensors: Sequence[Tensor], weights: float | Sequence[float], name: str,
        compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    _count(tensors, 2, name)
    _same_shape(tensors, None, name)
    alpha = _alpha(weights, name)
    a, b = (_up(t, compute_dtype) for t in tensors)
    return a, b, alpha


def weighted_subtraction(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's weighted subtraction ``(A − αβ·B)/(1 − αβ)`` of ``tensors = (A, B)``, ``weights = α``.

    sd-meh replaces β by ``β − 1e-10`` when ``α = β = 1`` (the division would be by 0); this does
    the same whenever ``αβ = 1`` (sd-meh divides by zero there). The result is then huge
    (``≈ 1e10·(A − B)``), as in sd-meh.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, alpha = _ab(tensors, weights, "weighted_subtraction", compute_dtype)
    product = alpha * beta
    if product == 1.0:
        product = alpha * (beta - EPSILON)
    return a.sub_(b, alpha=product).div_(1.0 - product)


def euclidean_add_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's Euclidean add difference of ``tensors = (A, B)``, ``base = C``, ``weights = α``.

    ``â = (A − C)/‖A − C‖``, ``b̂ = (B − C)/‖B − C‖`` (0 when the norm is 0; norms over the whole
    tensor), ``d = √((1 − α)·â² + α·b̂²)`` signed like ``s = (1 − α)·A + α·B − C``; the result
    ``C + d·‖s‖/‖d‖`` has the norm of the weighted-sum difference and the direction of the
    elementwise root-mean-square of the normalised differences. ``α`` in [0, 1] (outside, the root
    is of negative numbers). Where ``d = 0`` (A = B = C) the result is C (sd-meh: NaN).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "euclidean_add_difference", compute_dtype)
    a_hat = torch.nan_to_num((a - c) / torch.linalg.vector_norm(a - c))  # (*S)
    b_hat = torch.nan_to_num((b - c) / torch.linalg.vector_norm(b - c))  # (*S)
    distance = a_hat.square_().mul_(1.0 - alpha).add_(b_hat.square_(), alpha=alpha).sqrt_()  # (*S)
    sum_diff = a.mul_(1.0 - alpha).add_(b, alpha=alpha).sub_(c)  # (*S) lerp(A, B, α) − C
    distance = torch.copysign(distance, sum_diff)
    distance_norm = torch.linalg.vector_norm(distance)
    if float(distance_norm) == 0.0:
        return c
    return c.add_(distance.mul_(torch.linalg.vector_norm(sum_diff) / distance_norm))


def multiply_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's multiply difference: ``C + |A − C|^(1 − α)·|B − C|^α`` signed like ``lerp(A, B, β) − C``.

    The magnitude is the weighted geometric mean of the two differences (``0^0 = 1``, as
    ``torch.pow``), ``tensors = (A, B)``, ``base = C``, ``weights = α`` in [0, 1].

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "multiply_difference", compute_dtype)
    magnitude = (a - c).abs_().pow_(1.0 - alpha).mul_((b - c).abs_().pow_(alpha))  # (*S)
    direction = a.mul_(1.0 - beta).add_(b, alpha=beta).sub_(c)  # (*S) lerp(A, B, β) − C
    return c.add_(torch.copysign(magnitude, direction))


def similarity_add_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's similarity add difference of ``tensors = (A, B)``, ``base = C``, ``weights = α``.

    ``s = β·(A·B/max(|A|, |B|)² + 1)/2`` per element (``β`` where A = B = 0): 0 for opposite
    values, β for equal ones. The result is ``(1 − s)·(A + α·(B − C)) + s·((1 − α/2)·A + α/2·B)``:
    add difference where A and B disagree, a weighted sum where they agree. The ratio is taken
    as ``(A/m)·(B/m)`` (sd-meh: ``A·B/m²``, which underflows for values below ~1e-19 in float32).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "similarity_add_difference", compute_dtype)
    threshold = torch.maximum(a.abs(), b.abs())  # (*S)
    similarity = (a / threshold).mul_(b / threshold).add_(1.0).div_(2.0)
    similarity = torch.nan_to_num(similarity.mul_(beta), nan=beta)  # (*S) s
    ab_diff = a + alpha * (b - c)  # (*S)
    ab_sum = a.mul_(1.0 - alpha / 2).add_(b, alpha=alpha / 2)  # (*S)
    return torch.lerp(ab_diff, ab_sum, similarity)


def ratio_to_region(width: float, offset: float, n: int) -> tuple[int, int, bool]:
    """sd-meh's ``ratio_to_region``: ``(start, end, inverted)`` ranks of a band of width ``width``.

    A negative width moves the offset back by it; the width is capped at 1; the offset is taken
    modulo 1 (sd-meh's arithmetic, kept as it is). A band that runs past 1 wraps: it is then
    the complement of ``[start, end)`` (``inverted``).
    """
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        inverted = False
        start = offset * n
        end = (width + offset) * n
    else:
        inverted = True
        start = (width + offset - 1) * n
        end = offset * n
    return round(start), round(end), inverted


def _kth_abs_value(sorted_values: Tensor, k: int) -> Tensor:
    if k <= 0:
        return torch.tensor(-1.0, dtype=sorted_values.dtype, device=sorted_values.device)
    return torch.kthvalue(sorted_values.abs(), k).values


def top_k_tensor_sum(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's top-k tensor sum: A's values, rearranged in B's order on a band of magnitudes.

    ``tensors = (A, B)``, ``weights = α`` (the band's width), ``beta`` (its offset). A's values are
    sorted (``A_sorted``, ``(n,)``); the element of rank ``r`` in B (stable order) would receive
    ``A_sorted[r]``. It does where ``A_sorted[r]`` lies in the magnitude band
    ``(|A|_(start), |A|_(end)]`` (k-th smallest magnitudes, ``start, end`` from
    :func:`ratio_to_region` ``(α, β, n)``; its complement when the band wraps) and keeps A's own
    value elsewhere. The result holds A's values only, in (partly) B's arrangement.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, alpha = _ab(tensors, weights, "top_k_tensor_sum", compute_dtype)
    a_flat = a.reshape(-1)  # (n,)
    a_sorted = torch.sort(a_flat).values  # (n,)
    rank_in_b = torch.argsort(torch.argsort(b.reshape(-1), stable=True))  # (n,) rank of each element of B
    start, end, inverted = ratio_to_region(alpha, beta, a_flat.numel())
    magnitude = a_sorted.abs()
    band = (_kth_abs_value(a_sorted, start) < magnitude) & (magnitude <= _kth_abs_value(a_sorted, end))  # (n,)
    if inverted:
        band = ~band
    take = band[rank_in_b]  # (n,)
    return torch.where(take, a_sorted[rank_in_b], a_flat).reshape(a.shape)


def distribution_crossover(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's distribution crossover of ``tensors = (A, B)``, ``base = C``, ``weights = α``.

    A and B, flattened to ``(n,)``, are ordered by C's values (stable sort here; sd-meh's sort is
    not stable, which only matters where C has equal values); their real FFTs ``(n//2 + 1,)`` are
    mixed with the filter ``f = clip((k/m − α)/β + 1/2, 0, 1)`` (``m = n//2 + 1``; a hard step
    ``k/m ≥ α`` when ``β ≤ 1e-10``) as ``(1 − f)·FFT(A) + f·FFT(B)``, transformed back and put in
    the original order. 0-d tensors give ``α·A + (1 − α)·B`` (sd-meh's, weights swapped). The FFT
    runs in float32 when the compute dtype is a half type (as sd-meh's ``.float()``).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "distribution_crossover", compute_dtype)
    if a.dim() == 0:
        return a.mul_(alpha).add_(b, alpha=1.0 - alpha)
    order = torch.argsort(c.reshape(-1), stable=True)  # (n,)
    fft_dtype = torch.promote_types(compute_dtype, torch.float32)  # sd-meh's .float(); no half FFT on CPU
    a_dft = torch.fft.rfft(a.reshape(-1)[order].to(fft_dtype))  # (m,) complex
    b_dft = torch.fft.rfft(b.reshape(-1)[order].to(fft_dtype))  # (m,)
    m = a_dft.numel()
    frequency = torch.arange(m, dtype=fft_dtype, device=a.device) / m  # (m,)
    if beta > EPSILON:
        dft_filter = ((frequency - alpha) / beta + 0.5).clamp_(0.0, 1.0)
    else:
        dft_filter = (frequency >= alpha).to(fft_dtype)
    mixed = (1 - dft_filter) * a_dft + dft_filter * b_dft  # (m,)
    values = torch.fft.irfft(mixed, order.numel())  # (n,) in C's order
    out = torch.empty_like(values)
    out[order] = values
    return out.reshape(a.shape).to(compute_dtype)


def filter_top_k(delta: Tensor, k: float) -> Tensor:
    """sd-meh's ``filter_top_k``: keep the entries with ``|δ| ≥`` the ``max(int((1 − k)·n), 1)``-th smallest |δ|.

    Args:
        delta: ``(*S)``, not modified.
        k: the kept fraction, in [0, 1] (1 keeps every entry; ties at the threshold are kept).

    Returns:
        ``(*S)``, zeros elsewhere.
    """
    rank = max(int((1 - k) * delta.numel()), 1)
    threshold = torch.kthvalue(delta.abs().reshape(-1), rank).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_add_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's TIES add difference of ``tensors = (A, B)``, ``base = C``, ``weights = α``.

    ``δ_A = top-β(A − C)``, ``δ_B = top-β(B − C)`` (:func:`filter_top_k`, ``β`` the kept fraction);
    the elected sign is ``sign(sign δ_A + sign δ_B)`` (0 where they disagree); the result is
    ``C + α·(Σ δ·[sign δ = elected]) / (number agreeing)`` (0 where none agrees). Unlike
    :func:`~sdadapt.merge.operators.ties`, the vote counts signs, and a conflict zeroes the entry.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "ties_add_difference", compute_dtype)
    deltas = [filter_top_k(a - c, beta), filter_top_k(b.sub_(c), beta)]  # 2 × (*S)
    signs = [torch.sign(d) for d in deltas]
    elected = torch.sign(signs[0] + signs[1])  # (*S)
    agree = [(s == elected).to(compute_dtype) for s in signs]
    total = deltas[0].mul_(agree[0]).add_(deltas[1].mul_(agree[1]))  # (*S)
    merged = torch.nan_to_num(total / (agree[0] + agree[1]))
    return c.add_(merged, alpha=alpha)


# --------------------------------------------------------------------------------------------
# rotate (orthogonal Procrustes)


def fractional_matrix_power(matrix: Tensor, power: float) -> Tensor:
    """``matrix^power`` by eigendecomposition ``V·diag(λ^power)·V⁻¹``, real part (sd-meh's rotate helper).

    Meant for rotations (eigenvalues on the unit circle, principal branch of ``λ^power``).

    Args:
        matrix: ``(d, d)``.

    Returns:
        ``(d, d)`` in ``matrix.dtype``.
    """
    eigenvalues, eigenvectors = torch.linalg.eig(matrix)  # (d,), (d, d) complex
    result = eigenvectors @ torch.diag(eigenvalues.pow(power)) @ torch.linalg.inv(eigenvectors)
    return result.real.to(matrix.dtype)


def rotate(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sd-meh's rotate: turn A's neurons toward B's by the fraction ``α`` of their Procrustes rotation.

    ``tensors = (A, B)``, ``weights = α``. The tensor is read as neurons ``(N, d)`` (rows; ``d`` the
    last dim, or ``in·1·1`` of a 1×1 convolution); with ``Ā``, ``B̄`` the centred neurons and
    ``U·Σ·Vᵀ = Āᵀ·B̄`` the rotation ``R = U·Vᵀ`` (reflection removed, ``det R = 1``, when ``α`` is
    not an integer), the result is ``lerp(Ā, B̄·Rᵀ, β)·R^α + lerp(mean A, mean B, α)`` with the
    fractional power by eigendecomposition (:func:`fractional_matrix_power`). α = 1, β = 0 gives
    A's neurons in B's orientation (orthogonal Procrustes) around the centroid of B.

    As sd-meh: α = β = 0 returns A; 0-d tensors, k×k convolutions (k > 1) and A ≈ B (equal in
    float16) give ``lerp(A, B, β)``; 1-d tensors and single rows give ``lerp(A, B, α)``. The SVD
    and the eigendecomposition are computed in float64 whatever the compute dtype, as sd-meh
    (``.double()``). The reflection is cancelled with the sign of ``slogdet`` where sd-meh divides
    by ``det(U)·det(Vᵀ)``, which underflows to 0 for ``d`` past ~2000 (sd-meh then raises its
    "determinant error"). When A has fewer rows than ``d`` (wide tensors: cross-attention
    ``to_k``/``to_v`` at 320/640 channels, every ``ff.net.2``, CLIP's ``fc2``) the rotation is not
    determined on the null space of ``Āᵀ·B̄``: a fractional α then depends on the basis LAPACK
    picks there, here as in sd-meh (the result can differ between machines and devices).
    Cost ``O(d³)`` per tensor, the eigendecomposition dominating (one busy core, random
    ``(d/4, d)`` float32 tensors: ``d = 1280`` 3.7 s at α = 0.5, 0.6 s at α = 1; ``d = 2560``
    61 s and 18 s; so about 10 min for each 5120-wide SD1 ``ff.net.2`` at a fractional α).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, alpha = _ab(tensors, weights, "rotate", compute_dtype)
    if alpha == 0.0 and beta == 0.0:
        return a
    is_conv = a.dim() == 4 and a.shape[-1] != 1
    if a.dim() == 0 or is_conv or torch.allclose(a.to(torch.float16), b.to(torch.float16)):
        return torch.lerp(a, b, beta) if beta != 1.0 else b
    width = math.prod(a.shape[1:]) if a.dim() == 4 else a.shape[-1]
    a_neurons = a.reshape(-1, width).to(torch.float64)  # (N, d)
    b_neurons = b.reshape(-1, width).to(torch.float64)  # (N, d)
    a_centroid, b_centroid = a_neurons.mean(0), b_neurons.mean(0)  # (d,)
    new_centroid = torch.lerp(a_centroid, b_centroid, alpha)  # (d,)
    if a.dim() == 1 or (a.dim() == 2 and a.shape[0] == 1):
        return new_centroid.reshape(a.shape).to(compute_dtype)
    a_neurons -= a_centroid
    b_neurons -= b_centroid
    alpha_is_float = alpha != round(alpha)
    u, _, v_t = torch.linalg.svd(a_neurons.T @ b_neurons)  # (d, d), (d,), (d, d)
    if alpha_is_float:  # cancel a reflection: a rotation's fractional power is real
        # sd-meh divides by det(U)·det(Vᵀ) (±1); torch.det underflows to 0 past ~2000 wide (the
        # "determinant error" sd-meh raises on CPU), the sign of slogdet does not
        u[:, -1] *= torch.linalg.slogdet(u).sign * torch.linalg.slogdet(v_t).sign
    rotation = u @ v_t  # (d, d)
    if not torch.isfinite(rotation).all():
        raise NonFiniteError("rotate: the SVD of the neurons' cross-covariance is not finite; A or B holds inf/NaN "
                             "weights (check them, or merge this key with another operator)")
    if alpha_is_float:
        transform = fractional_matrix_power(rotation, alpha)
    elif alpha == 0:
        transform = torch.eye(width, dtype=torch.float64, device=a.device)
    elif alpha != 1:
        transform = torch.linalg.matrix_power(rotation, round(alpha))
    else:
        transform = rotation
    if beta != 0:  # interpolate the relationship between the neurons
        a_neurons = torch.lerp(a_neurons, b_neurons @ rotation.T, beta)
    return (a_neurons @ transform).add_(new_centroid).to(compute_dtype).reshape(a.shape)
