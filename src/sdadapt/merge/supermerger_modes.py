"""supermerger's merge modes and calculation modes as pure per-key operators.

Transcribed from hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` (``smerge``,
``precosine``/``cosine``, ``extract_super``, ``tensormerge``) and its ``calcmode_en.md``; the
formulas, with ``α``/``β`` the step's alpha/beta (the weight of B / of C):

==============  ===================================================================================
triple_sum      ``(1 − α − β)·A + α·B + β·C``, computed as supermerger does:
                ``lerp(A, lerp(B, C, β/(α+β)), α+β)`` (the plain sum when ``α + β = 0``)
sum_twice       ``(1 − β)·((1 − α)·A + α·B) + β·C`` = ``lerp(lerp(A, B, α), C, β)``
cosine_a/b      ``lerp(B, A, k)``: ``k = clip((s − s_min)/(s_max − s_min) − α, 0, 1)`` per column
                (``cosine_a`` uses ``|α|``); ``s`` is the key's similarity, ``s_min``/``s_max`` come
                from a pre-pass over every key (:func:`cosine_statistic`, :func:`cosine_range`); the
                pre-pass hands each key its :class:`CosineStatistic`, so ``s`` is computed once
smooth_add      ``A + α·gauss₁(median₃(B − C))`` (scipy ``median_filter(size=3)`` then
                ``gaussian_filter(sigma=1)``, mode ``reflect``, over the whole N-D tensor)
extract         ``A + lerp(a, b, α)·lerp(d, 1 − d, β)``, ``a = B − A``, ``b = C − A``,
                ``d = ((cos(a, b) + 1)/2)^γ`` with the cosine along the last dim (subaqua's)
tensor_slice    rows ``[int(β·n), int((α+β)·n))`` of A replaced by B's (wrapping past 1); the
                ``dim=1`` variant (supermerger's ``tensor2``) slices columns
scale_self      ``A·α`` (calcmode ``self``; one model, ``tensors = (A,)``)
plus_random     ``A + α·N(0, 1)`` (calcmode ``plus random``; noise from a per-key generator)
==============  ===================================================================================

Every function takes ``tensors = (A, B)`` and ``base = C`` where there is a third model (the
engine's ``"abc"`` convention), computes in ``compute_dtype`` and never modifies its inputs.
The filters of :func:`smooth_add` are torch code (:func:`median_filter3`, :func:`gaussian_filter`);
scipy is not needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .operator_inputs import _alpha, _count, _difference_inputs, _same_shape, _up

__all__ = [
    "triple_sum",
    "sum_twice",
    "CosineStatistic",
    "cosine_statistic",
    "cosine_key_statistic",
    "cosine_range",
    "cosine_undefined",
    "cosine_merge",
    "median_filter3",
    "gaussian_filter",
    "smooth_add",
    "extract",
    "tensor_slice",
    "percentile_midpoint",
    "SELF_SKIP",
    "self_skip",
    "scale_self",
    "plus_random",
]


def triple_sum(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's Triple sum ``(1 − α − β)·A + α·B + β·C`` of ``tensors = (A, B)``, ``base = C``.

    Computed as supermerger does (``lerp(A, lerp(B, C, β/(α+β)), α+β)``; the plain sum when
    ``α + β = 0``).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "triple_sum", compute_dtype)
    total = alpha + beta
    if total == 0.0:
        return a.mul_(1.0 - alpha - beta).add_(b, alpha=alpha).add_(c, alpha=beta)
    return torch.lerp(a, torch.lerp(b, c, beta / total), total)


def sum_twice(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's sum Twice ``(1 − β)·((1 − α)·A + α·B) + β·C`` = ``lerp(lerp(A, B, α), C, β)``.

    ``tensors = (A, B)``, ``base = C``.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "sum_twice", compute_dtype)
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


# --------------------------------------------------------------------------------------------
# cosineA / cosineB


def _flat_cos(x: Tensor, y: Tensor) -> Tensor:
    """``⟨x, y⟩ / (‖x‖·‖y‖)`` of the flattened tensors (0-d)."""
    return torch.dot(x.reshape(-1), y.reshape(-1)) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))


def _as_columns(t: Tensor) -> Tensor:
    return t.reshape(1) if t.dim() == 0 else t


class CosineStatistic(NamedTuple):
    """One key's similarity from the cosine pre-pass (:func:`cosine_key_statistic`), kept until
    :func:`cosine_merge` merges that key, so the merge pass does not compute it again.

    Attributes:
        columns: ``(*S[1:])`` (0-d for a 1-D tensor), the value :func:`cosine_range` pools
            (:func:`cosine_statistic`): one value per column.
        whole: 0-d, cosineA only: the whole-tensor cosine of ``Â, B̂`` (its merge similarity is
            ``(columns + whole)/2``); ``None`` for cosineB, whose pooled value is its merge similarity.
    """

    columns: Tensor
    whole: Tensor | None


def _key_similarity(a: Tensor, b: Tensor, *, normalize: bool, whole: bool) -> CosineStatistic:
    """:class:`CosineStatistic` of ``a, b`` (``(*S)``, already in the compute dtype); ``whole=False``
    leaves cosineA's whole-tensor term out (the pre-pass pools the column term alone)."""
    x, y = _as_columns(a), _as_columns(b)
    if normalize:
        x, y = F.normalize(x, p=2, dim=0), F.normalize(y, p=2, dim=0)
        return CosineStatistic(F.cosine_similarity(x, y, dim=0), _flat_cos(x, y) if whole else None)
    return CosineStatistic((F.cosine_similarity(x, y, dim=0) + _flat_cos(x, y)) / 2.0, None)


def _checked_inputs(tensors: Sequence[Tensor], name: str, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _count(tensors, 2, name)
    _same_shape(tensors, None, name)
    a, b = (_up(t, compute_dtype) for t in tensors)
    return a, b


def cosine_statistic(tensors: Sequence[Tensor], *, normalize: bool, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The pre-pass similarity of one key (supermerger's ``precosine``), ``tensors = (A, B)`` of ``(*S)``.

    ``normalize=True`` (cosineA): the column cosine ``cos_dim0(Â, B̂)`` of the column-normalised
    tensors. ``normalize=False`` (cosineB): ``(cos_dim0(A, B) + cos(A, B))/2``, the column cosine
    averaged with the whole-tensor cosine.

    Returns:
        ``(*S[1:])`` (one value per column; 0-d for a 1-D tensor) in ``compute_dtype``.
    """
    a, b = _checked_inputs(tensors, "cosine_statistic", compute_dtype)
    return _key_similarity(a, b, normalize=normalize, whole=False).columns


def cosine_key_statistic(
    tensors: Sequence[Tensor], *, normalize: bool, compute_dtype: torch.dtype = torch.float32,
) -> CosineStatistic:
    """What the pre-pass keeps of one key, ``tensors = (A, B)`` of ``(*S)``: its
    :func:`cosine_statistic` (pooled by :func:`cosine_range`) and, for cosineA, the whole-tensor
    cosine of ``Â, B̂`` its merge adds; :func:`cosine_merge` takes it as ``statistic=``.

    Returns:
        a :class:`CosineStatistic`: ``columns`` ``(*S[1:])`` and ``whole`` 0-d (``None`` for
        cosineB), in ``compute_dtype``.
    """
    a, b = _checked_inputs(tensors, "cosine_key_statistic", compute_dtype)
    return _key_similarity(a, b, normalize=normalize, whole=True)


def percentile_midpoint(values: Tensor, q: float) -> float:
    """``numpy.percentile(values, q, method="midpoint")`` of a 1-D tensor (numpy itself: its
    interpolation rounds as ``hi - (hi - lo)/2``, which ``lo + (hi - lo)/2`` misses by an ulp at times,
    and the value is a threshold the pooled similarities are compared with)."""
    flat = values.detach().to("cpu", torch.float64).reshape(-1)
    if flat.numel() == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(flat.numpy(), q, method="midpoint"))


def cosine_range(statistics: Sequence[Tensor]) -> dict[str, float]:
    """``{"s_min", "s_max"}`` from every key's :func:`cosine_statistic` (supermerger's pre-pass).

    All values are pooled, NaN removed, then the values below the 1st percentile dropped, then the
    values above the 99th percentile of the rest (``numpy.percentile(method="midpoint")``, as
    supermerger does); ``s_min``/``s_max`` are the extremes of what is left.

    Raises:
        InputError: no finite similarity at all (nothing to normalise by).
    """
    pooled = torch.cat([s.reshape(-1).to(torch.float64) for s in statistics]) if statistics else torch.zeros(0, dtype=torch.float64)
    pooled = pooled[~torch.isnan(pooled)]
    if pooled.numel() == 0:
        raise InputError("cosine merge: the inputs share no tensor with a finite similarity; nothing to normalise by")
    pooled = pooled[~(pooled < percentile_midpoint(pooled, 1))]
    pooled = pooled[~(pooled > percentile_midpoint(pooled, 99))]
    return {"s_min": float(pooled.min()), "s_max": float(pooled.max())}


#: why :func:`cosine_merge` keeps A for a key (the engine's report says it)
COSINE_UNDEFINED = ("A or B is all zeros there: the similarity is 0/0 (supermerger writes NaN over the key); "
                    "kept A")


def cosine_undefined(tensors: Sequence[Tensor]) -> str | None:
    """Why the cosine similarity of ``tensors = (A, B)`` is undefined (an all-zero A or B), or ``None``.

    supermerger's ``cosine`` adds the whole-tensor cosine ``dot(X, Y)/(torch.norm(X)·torch.norm(Y))``
    with no epsilon (its column term, ``torch.nn.CosineSimilarity(dim=0)``, clamps the norms with
    ``eps=1e-8`` and gives 0 for a zero column), so an all-zero A or B makes ``k = NaN`` and
    ``lerp(B, A, NaN)`` NaN for the whole key; ``F.normalize`` (cosineA) keeps a zero tensor zero.
    :func:`cosine_merge` keeps A there (for A == B == 0 that is what any finite ``k`` gives).
    """
    _count(tensors, 2, "cosine_undefined")
    return COSINE_UNDEFINED if any(not bool(torch.any(t)) for t in tensors) else None


def cosine_merge(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, normalize: bool,
    s_min: float, s_max: float, statistic: CosineStatistic | None = None, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's cosineA (``normalize=True``) / cosineB merge of ``tensors = (A, B)``, ``weights = α``.

    ``s = (cos_dim0(X, Y) + cos(X, Y))/2`` per column with ``X, Y = Â, B̂`` (column-normalised,
    cosineA) or ``A, B`` (cosineB); ``k = clip((s − s_min)/(s_max − s_min) − α', 0, 1)`` with
    ``α' = |α|`` (cosineA) or ``α`` (cosineB), broadcast over dim 0; result ``lerp(B, A, k)`` — the
    more similar a column, the more of A it keeps; α pushes toward B. ``s_min``/``s_max`` come from
    :func:`cosine_range` over the whole model. When ``s_max == s_min`` (every key equally similar;
    supermerger divides by zero there) the normalised similarity counts as 1. Where A or B is all
    zeros the similarity is ``0/0`` (supermerger writes NaN over the key): the result is A
    (:func:`cosine_undefined`).

    Args:
        statistic: this key's :func:`cosine_key_statistic` (same ``normalize`` and
            ``compute_dtype``), computed by the pre-pass: ``s`` is taken from it instead of
            computed again (the same values, bit for bit). ``None`` computes it here.

    Raises:
        ValueError: ``statistic`` does not fit ``tensors`` (its columns' shape or dtype, or a
            cosineA/cosineB mix-up).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b = _checked_inputs(tensors, "cosine_merge", compute_dtype)
    alpha = _alpha(weights, "cosine_merge")
    if cosine_undefined((a, b)) is not None:
        return a  # _up made a copy
    if statistic is None:
        statistic = _key_similarity(a, b, normalize=normalize, whole=True)
    else:
        statistic = _fitting_statistic(statistic, a, normalize=normalize)
    columns, whole = statistic
    similarity = columns if whole is None else (columns + whole) / 2.0  # (*S[1:])
    spread = s_max - s_min
    scaled = (similarity - s_min) / spread if spread != 0 else torch.ones_like(similarity)
    k = (scaled - (abs(alpha) if normalize else alpha)).clip(min=0.0, max=1.0)
    return torch.lerp(b, a, k)  # k (*S[1:]) broadcasts over dim 0


def _fitting_statistic(statistic: CosineStatistic, a: Tensor, *, normalize: bool) -> CosineStatistic:
    """``statistic`` on ``a``'s device, checked against ``a`` (``(*S)`` in the compute dtype)."""
    columns, whole = statistic
    problems = []
    if tuple(columns.shape) != tuple(a.shape[1:]):
        problems.append(f"its columns have shape {tuple(columns.shape)}, the tensors {tuple(a.shape)} need "
                        f"{tuple(a.shape[1:])} (a statistic of another key?)")
    if columns.dtype != a.dtype or (whole is not None and whole.dtype != a.dtype):
        problems.append(f"it was computed in {columns.dtype}, the merge computes in {a.dtype}")
    if (whole is None) == normalize:
        problems.append("it is a cosine" + ("B" if normalize else "A") + " statistic")
    if problems:
        raise ValueError(f"cosine_merge: statistic= does not fit: {'; '.join(problems)}; pass this key's "
                         "cosine_key_statistic(tensors, normalize=..., compute_dtype=...) or None")
    return CosineStatistic(columns.to(a.device), None if whole is None else whole.to(a.device))


# --------------------------------------------------------------------------------------------
# smoothAdd

#: output elements of one median-filter slab (the selection network's intermediates stay near the cache)
_MEDIAN_CHUNK = 1 << 16

_Node = tuple  # ("in", shift, rank) or ("min" | "max", node index, node index)


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of scipy's ``mode="reflect"`` (``d c b a | a b c d | d c b a``) for ``-pad..n+pad-1``."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _odd_even_merge(a: list[int], b: list[int], node: Callable[[str, int, int], int]) -> list[int]:
    """Batcher's odd-even merge of two sorted lists of nodes, any lengths (Knuth, TAOCP 3, 5.3.4).

    Merge the odd-position and the even-position subsequences, then compare-exchange each even
    result with the next odd one: ``v₁, min(w₁, v₂), max(w₁, v₂), min(w₂, v₃), …``.
    """
    if not a or not b:
        return list(a or b)
    if len(a) == 1 and len(b) == 1:
        return [node("min", a[0], b[0]), node("max", a[0], b[0])]
    v = _odd_even_merge(a[0::2], b[0::2], node)
    w = _odd_even_merge(a[1::2], b[1::2], node)
    out, i = [v[0]], 0
    while i < len(w) and i + 1 < len(v):
        out += [node("min", w[i], v[i + 1]), node("max", w[i], v[i + 1])]
        i += 1
    return out + w[i:] + v[i + 1 :]


@functools.cache
def _merge_stage(m: int, ranks: tuple[int, ...]) -> tuple[tuple[_Node, ...], tuple[int, ...]]:
    """The min/max program merging three sorted lists of ``m`` (shifts 0, 1, 2 along one dim) into
    one of ``3m``, pruned to what the output ``ranks`` need.

    Returns ``(program, outputs)``: ``program[k]`` is ``("in", shift, rank)`` or
    ``("min" | "max", i, j)`` over earlier entries, in evaluation order; ``outputs[r]`` indexes
    ``ranks[r]``.
    """
    nodes: list[_Node] = []
    index: dict[_Node, int] = {}

    def node(op: str, x: int, y: int) -> int:
        if (op, x, y) not in index:
            index[(op, x, y)] = len(nodes)
            nodes.append((op, x, y))
        return index[(op, x, y)]

    lists = [[node("in", shift, rank) for rank in range(m)] for shift in range(3)]
    merged = _odd_even_merge(_odd_even_merge(lists[0], lists[1], node), lists[2], node)
    wanted = [merged[r] for r in ranks]
    keep: set[int] = set()
    stack = list(wanted)
    while stack:  # what the wanted ranks depend on
        k = stack.pop()
        if k not in keep:
            keep.add(k)
            if nodes[k][0] != "in":
                stack += [nodes[k][1], nodes[k][2]]
    order = sorted(keep)  # nodes were created after their inputs
    position = {k: i for i, k in enumerate(order)}
    program = tuple(nodes[k] if nodes[k][0] == "in" else (nodes[k][0], position[nodes[k][1]], position[nodes[k][2]])
                    for k in order)
    return program, tuple(position[k] for k in wanted)


@functools.cache
def _median_plan(ndim: int) -> tuple[tuple[int, ...], ...]:
    """The ranks each of the ``ndim`` merge stages must produce for the median of ``3^ndim`` values.

    Stage ``s`` merges sorted lists of ``3^s`` values into ``3^(s+1)``; the last keeps only rank
    ``(3^ndim − 1)/2``, and each earlier stage only the ranks the next one reads.
    """
    ranks: tuple[int, ...] = ((3**ndim - 1) // 2,)
    plan = [ranks]
    for stage in reversed(range(1, ndim)):
        program, _ = _merge_stage(3**stage, ranks)
        ranks = tuple(sorted({step[2] for step in program if step[0] == "in"}))
        plan.append(ranks)
    return tuple(reversed(plan))


def _run_merge_stage(lists: list[Tensor], dim: int, n: int, ranks: tuple[int, ...]) -> list[Tensor]:
    """One merge stage over whole tensors: ``lists`` (``m`` tensors, rank r of the window so far,
    1-padded along ``dim``) -> the ``ranks`` of the windows widened by 3 along ``dim`` (length ``n``)."""
    program, outputs = _merge_stage(len(lists), ranks)
    last_use = {}
    for step_index, (op, x, y) in enumerate(program):
        if op != "in":
            last_use[x] = last_use[y] = step_index
    values: dict[int, Tensor] = {}
    for step_index, (op, x, y) in enumerate(program):
        if op == "in":
            values[step_index] = lists[y].narrow(dim, x, n)  # shift x, rank y: a view
            continue
        values[step_index] = (torch.minimum if op == "min" else torch.maximum)(values[x], values[y])
        for used in {x, y}:  # free what no later step reads
            if last_use[used] == step_index and used not in outputs:
                del values[used]
    return [values[k] for k in outputs]


def median_filter3(x: Tensor) -> Tensor:
    """``scipy.ndimage.median_filter(x, size=3)`` (mode ``reflect``) over every dim of ``x``.

    The exact median of each ``3^N`` neighbourhood (a value of the window; NaN where the window
    holds a NaN), computed as a selection network of elementwise ``torch.minimum``/``maximum`` over
    whole tensors, separably: stage ``s`` merges, for each position, the sorted lists of the three
    neighbours along one dim (Batcher's odd-even merge, pruned to the ranks later stages read), so
    the sorted columns are shared by every window that contains them. Dims are taken smallest
    first (their 1-wide padding is dropped soonest); slabs along dim 0 of ``2^16`` outputs keep the
    intermediates small. Per output value: 4 min/max for a 1-D tensor, 26 for 2-D, 126 for 3-D,
    550 for 4-D (scipy sorts all 81 for a 3×3 conv weight). Same values as the sorted-window median
    (``unfold`` + ``median``) it replaced, which ``benchmarks/merge_filters.py`` keeps and times —
    except the sign of a zero median in a window holding both ``-0.0`` and ``+0.0`` (equal values).

    Args:
        x: ``(*S)``, any float dtype.

    Returns:
        ``(*S)``, same dtype.
    """
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    padded = x
    for dim in range(x.dim()):  # with a 1-wide pad scipy's reflect repeats the edge value
        padded = padded.index_select(dim, _reflect_index(x.shape[dim], 1, x.device))
    dims = sorted(range(x.dim()), key=lambda d: x.shape[d])
    plan = _median_plan(x.dim())
    rows = max(1, _MEDIAN_CHUNK // max(1, x.numel() // x.shape[0]))
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        lists = [padded.narrow(0, start, stop - start + 2)]  # (stop-start+2, *S[1:]+2)
        for dim, ranks in zip(dims, plan):
            lists = _run_merge_stage(lists, dim, stop - start if dim == 0 else x.shape[dim], ranks)
        out[start:stop] = lists[0]
    return out


#: values of one gaussian-pass slab (its float64 copy and sum stay near the cache)
_GAUSSIAN_CHUNK = 1 << 16


def gaussian_filter(x: Tensor, sigma: float = 1.0, *, truncate: float = 4.0) -> Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma, truncate=truncate)`` (mode ``reflect``).

    One 1-D correlation per dim in order, each accumulated in float64 and stored in ``x``'s dtype
    (as scipy stores each pass in the output array); kernel ``exp(−t²/2σ²)`` for
    ``|t| ≤ int(truncate·σ + 0.5)``, normalised to sum 1. Each pass runs in slabs of ``2^16``
    values cut along another dim (the same arithmetic per value; the float64 temporaries stay small).

    Args:
        x: ``(*S)``, any float dtype.

    Returns:
        ``(*S)``, same dtype.
    """
    radius = int(truncate * float(sigma) + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 / (float(sigma) ** 2) * taps**2)
    kernel = (kernel / kernel.sum()).tolist()
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    out = x
    for dim in range(x.dim()):
        n = x.shape[dim]
        index = _reflect_index(n, radius, x.device)
        cut = 1 if dim == 0 and x.dim() > 1 else 0  # the slab dim, never the filtered one
        rows = x.shape[cut] if cut == dim else max(1, _GAUSSIAN_CHUNK // (x.numel() // x.shape[cut]))
        result = torch.empty_like(x)
        for start in range(0, x.shape[cut], rows):
            part = out.narrow(cut, start, min(rows, x.shape[cut] - start))
            padded = part.to(torch.float64).index_select(dim, index)  # (*part, n + 2·radius along dim)
            total = torch.zeros(part.shape, dtype=torch.float64, device=x.device)
            for tap, weight in enumerate(kernel):
                total.add_(padded.narrow(dim, tap, n), alpha=weight)
            result.narrow(cut, start, part.shape[cut]).copy_(total)  # stored in x's dtype, as scipy's pass
        out = result
    return out


def smooth_add(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's smoothAdd ``A + α·gaussian_filter(median_filter(B − C, size=3), sigma=1)``.

    ``tensors = (A, B)``, ``base = C``. Both filters run over the whole N-D tensor (neighbouring
    rows, columns and kernel taps mix), mode ``reflect``.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "smooth_add", compute_dtype)
    smooth = gaussian_filter(median_filter3(b.sub_(c)), 1.0)
    return a.add_(smooth, alpha=alpha)


# --------------------------------------------------------------------------------------------
# extract (subaqua)


def extract(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    gamma: float = 0.3, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """subaqua's extract (supermerger ``extract_super``): ``A + lerp(a, b, α)·lerp(d, 1 − d, β)``.

    ``tensors = (A, B)``, ``base = C``; ``a = B − A``, ``b = C − A``, ``c`` the cosine of ``a`` and
    ``b`` along the last dim (clamped to [−1, 1], one value per row), ``d = ((c + 1)/2)^γ``.
    β = 0 keeps what the two differences share, β = 1 what they do not; γ sharpens.

    Raises:
        InputError: α or β outside [0, 1] or γ < 0 (supermerger's asserts).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a0, b0, c0, alpha = _difference_inputs(tensors, weights, base, "extract", compute_dtype)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"extract: {name} must be in [0, 1], got {value:g}")
    if not gamma >= 0.0:
        raise InputError(f"extract: gamma must be >= 0, got {gamma:g}")
    shape = a0.shape
    a0, b0, c0 = (t.reshape(1) if t.dim() == 0 else t for t in (a0, b0, c0))
    a = b0.sub_(a0)  # (*S) B − A
    b = c0.sub_(a0)  # (*S) C − A
    c = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1).unsqueeze(-1)  # (*S[:-1], 1)
    d = ((c + 1) / 2) ** gamma
    return a0.add_(torch.lerp(a, b, alpha) * torch.lerp(d, 1 - d, beta)).reshape(shape)


# --------------------------------------------------------------------------------------------
# tensor / tensor2


def tensor_slice(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None, beta: float,
    columns: bool = False, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's tensor / tensor2 calc modes: a slice of B pasted into A, no interpolation.

    ``tensors = (A, B)``; ``n = A.shape[0]``. When ``α + β ≤ 1`` the rows
    ``[int(n·β), int(n·(α+β)))`` of A are replaced by B's; otherwise (wrapping) the result is B
    with the rows ``[int(n·(α+β−1)), int(n·β))`` taken from A. Python slice rules apply to the
    bounds, as in supermerger.

    ``columns=True`` (tensor2) cuts dim 1 instead, for tensors of 2+ dims; ``n`` is then
    ``A.shape[1]`` when that is larger than 100, else still ``A.shape[0]`` (supermerger's index
    arithmetic, kept as it is). 0-d tensors are returned as A.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    _count(tensors, 2, "tensor_slice")
    _same_shape(tensors, None, "tensor_slice")
    alpha = _alpha(weights, "tensor_slice")
    a, b = (_up(t, compute_dtype) for t in tensors)
    if a.dim() == 0:
        return a
    n = a.shape[0]
    if columns and a.dim() > 1 and a.shape[1] > 100:
        n = a.shape[1]
    dim = 1 if columns and a.dim() > 1 else 0
    if alpha + beta <= 1:
        start, stop, into, source = int(n * beta), int(n * (alpha + beta)), a, b
    else:
        start, stop, into, source = int(n * (alpha + beta - 1)), int(n * beta), b, a
    index = (slice(None),) * dim + (slice(start, stop),)
    into[index] = source[index]
    return into


# --------------------------------------------------------------------------------------------
# calcmodes "self" and "plus random" (one model)

#: supermerger's SELFKEYS: keys containing one of these keep A in "self" and "plus random"
SELF_SKIP = ("to_out", "proj_out", "norm")


def self_skip(key: str) -> str | None:
    """Why ``key`` keeps A in ``self`` / ``plus-random`` (a :data:`SELF_SKIP` substring), else ``None``.

    ``key`` is an LDM name, as supermerger sees it (the engine passes a diffusers key's LDM name).
    """
    hit = next((part for part in SELF_SKIP if part in key), None)
    return None if hit is None else f"{hit} keys kept as A (supermerger's self / plus random skip them)"


def scale_self(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's calcmode ``self``: ``A·α`` of ``tensors = (A,)``; ``α = 0`` keeps A (supermerger skips it).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    _count(tensors, 1, "self")
    alpha = _alpha(weights, "self")
    a = _up(tensors[0], compute_dtype)
    return a if alpha == 0.0 else a.mul_(alpha)


def plus_random(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    generator: torch.Generator, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's calcmode ``plus random``: ``A + α·N(0, 1)`` of ``tensors = (A,)``.

    The noise comes from ``generator`` (the engine seeds one per key from the step's seed, so the
    result does not depend on key order; supermerger draws from torch's global generator, which
    no seed reproduces). ``α = 0`` keeps A.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    _count(tensors, 1, "plus_random")
    alpha = _alpha(weights, "plus_random")
    a = _up(tensors[0], compute_dtype)
    if alpha == 0.0:
        return a
    noise = torch.randn(a.shape, generator=generator, dtype=compute_dtype)  # (*S), drawn on the generator's CPU
    return a.add_(noise.to(a.device), alpha=alpha)
