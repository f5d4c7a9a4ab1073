"""Merge operators: pure functions over tensors of one key.

Every operator has the shape ``op(tensors, weights, *, base=None, ...) -> Tensor``:

* ``tensors`` — the models' tensors for one key, all the same shape ``(*S)``;
* ``weights`` — the operator's strength: ``alpha`` (a float) for the two-model operators, one
  weight per model for the task-vector ones (a float means "this for every model");
* ``base`` — the reference the deltas are taken from (``C`` of add-difference, ``θ_base`` of
  TIES/DARE/model stock).

Operators never modify their inputs. They compute in ``compute_dtype`` (default float32; inputs
are up-cast copies) and return that dtype; the engine casts once when writing. Random operators
take a ``torch.Generator``; :func:`key_generator` makes one per (seed, key) so results do not
depend on the order keys are processed or on threads.

Conventions (``alpha`` = weight of the **second** model, A1111's "multiplier M"):

=========================  ===================================================================
weighted_sum               ``(1 − α)·A + α·B`` (α=0 → A, α=1 → B, bit-exact). ComfyUI's
                           ``ModelMergeSimple(ratio)`` is α = 1 − ratio; bbc-mc's ``base_alpha``
                           is the BASE block's α.
add_difference             ``A + α·(B − C)``
train_difference           ``A + 1.8·α·w·(B − C)``, ``w = |B − A| / (|B − C| + |B − A|)`` (0 where 0/0)
slerp                      spherical interpolation of the flattened tensors (lerp when nearly parallel)
task_arithmetic            ``base + λ·Σ wᵢ·δᵢ``, ``δᵢ = θᵢ − base``
ties                       trim each δᵢ to ``density`` by magnitude, elect the sign of Σ wᵢδᵢ,
                           disjoint (weighted) mean of the agreeing entries, ``base + λ·τ``
dare                       drop each δᵢ entry with probability p, rescale survivors by 1/(1 − p),
                           then sum (``consensus="none"``) or TIES-elect (``"sum"``)
model_stock                ``t·mean(θᵢ) + (1 − t)·base``, ``t = k·cos/(1 + (k − 1)·cos)``
=========================  ===================================================================

All task-vector operators are :func:`task_vector_merge` with fixed switches
(sparsify × consensus × rescale), as in mergekit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "weighted_sum",
    "add_difference",
    "train_difference",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare",
    "model_stock",
    "task_vector_merge",
    "sparsify_magnitude",
    "sparsify_random",
    "sparsify_outliers",
    "elect_sign",
    "key_generator",
    "key_seed",
    "Operator",
    "OPERATORS",
    "get_operator",
]

SLERP_PARALLEL = 0.9995  # |cos| above this: lerp (mergekit's threshold)


def _up(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"merge operators take floating-point tensors, got {tensor.dtype}; copy integer tensors instead")
    return tensor.to(dtype, copy=True)  # always a new tensor: operators work in place on it


def _same_shape(tensors: Sequence[Tensor], base: Tensor | None, name: str) -> None:
    shapes = {tuple(t.shape) for t in tensors} | ({tuple(base.shape)} if base is not None else set())
    if len(shapes) > 1:
        raise ValueError(f"{name}: tensors must share one shape, got {sorted(shapes)}")


def _count(tensors: Sequence[Tensor], n: int | tuple[int, int], name: str) -> None:
    low, high = (n, n) if isinstance(n, int) else n
    if not low <= len(tensors) <= high:
        want = str(low) if low == high else f"{low}..{high}"
        raise ValueError(f"{name}: needs {want} tensors, got {len(tensors)}")


def _alpha(weights: float | Sequence[float], name: str) -> float:
    if isinstance(weights, (int, float)):
        return float(weights)
    values = list(weights)
    if len(values) != 1:
        raise ValueError(f"{name}: weights is one alpha (a float), got {values}")
    return float(values[0])


def _model_weights(weights: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(weights, (int, float)):
        return [float(weights)] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} weights for {n} models; give one per model or a single float")
    return values


# --------------------------------------------------------------------------------------------
# two- and three-model operators


def weighted_sum(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A1111 weighted sum ``(1 − α)·A + α·B`` of ``tensors = (A, B)``, ``weights = α``.

    Args:
        tensors: ``(A, B)``, each ``(*S)``.
        weights: ``α``, the weight of the second model (α = 0 returns A, α = 1 returns B exactly).
        base: unused (kept for the common signature).

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    _count(tensors, 2, "weighted_sum")
    _same_shape(tensors, None, "weighted_sum")
    alpha = _alpha(weights, "weighted_sum")
    a, b = (_up(t, compute_dtype) for t in tensors)
    if alpha == 0.0:
        return a
    if alpha == 1.0:
        return b
    return a.mul_(1.0 - alpha).add_(b, alpha=alpha)


def _difference_inputs(tensors: Sequence[Tensor], weights: float | Sequence[float], base: Tensor | None, name: str,
                       compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, float]:
    """Checked ``(A, B, C, α)`` in ``compute_dtype`` for the A/B/C difference operators."""
    _count(tensors, 2, name)
    if base is None:
        raise ValueError(f"{name}: needs base= (the C model the difference B − C is taken from)")
    _same_shape(tensors, base, name)
    alpha = _alpha(weights, name)
    a, b = (_up(t, compute_dtype) for t in tensors)
    return a, b, _up(base, compute_dtype), alpha


def add_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``A + α·(B − C)`` with ``tensors = (A, B)``, ``base = C``, ``weights = α``.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "add_difference", compute_dtype)
    return a.add_(b.sub_(c), alpha=alpha)


def train_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """supermerger's train difference: ``A + 1.8·α·w·(B − C)``, ``w = |B − A| / (|B − C| + |B − A|)``.

    ``w`` is 0 where both distances are 0; where ``B == C`` the result is ``A``.
    ``tensors = (A, B)``, ``base = C``.
    """
    a, b, c, alpha = _difference_inputs(tensors, weights, base, "train_difference", compute_dtype)
    diff = b - c  # (*S) B − C
    far = (b - a).abs_()  # (*S) |B − A|
    denominator = diff.abs() + far
    w = torch.where(denominator > 0, far / denominator.clamp_min(torch.finfo(compute_dtype).tiny), torch.zeros_like(far))
    return a.add_(diff.mul_(w), alpha=1.8 * alpha)


def slerp(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32, parallel: float = SLERP_PARALLEL,
) -> Tensor:
    """Spherical interpolation of ``tensors = (A, B)`` at ``t = weights`` (0 → A, 1 → B).

    Formula (mergekit's, on the flattened tensors): ``cos Ω = ⟨Â, B̂⟩``; when ``|cos Ω| > parallel``
    (or a tensor is zero) plain lerp, else
    ``sin((1 − t)Ω)/sin Ω · A + sin(tΩ)/sin Ω · B`` on the unnormalised tensors.
    """
    _count(tensors, 2, "slerp")
    _same_shape(tensors, None, "slerp")
    t = _alpha(weights, "slerp")
    if t in (0.0, 1.0):
        return weighted_sum(tensors, t, compute_dtype=compute_dtype)
    a, b = (_up(x, compute_dtype) for x in tensors)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(norm_a) == 0.0 or float(norm_b) == 0.0:
        return a.mul_(1.0 - t).add_(b, alpha=t)
    cos = float(torch.dot(a.reshape(-1), b.reshape(-1)) / (norm_a * norm_b))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > parallel:
        return a.mul_(1.0 - t).add_(b, alpha=t)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return a.mul_(math.sin((1.0 - t) * omega) / sin_omega).add_(b, alpha=math.sin(t * omega) / sin_omega)


# --------------------------------------------------------------------------------------------
# randomness


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the merge seed and the tensor key (sha256; stable across runs/platforms)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one key: masks differ across keys but not across runs, orders or threads."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(key_seed(seed, key))
    return generator


# --------------------------------------------------------------------------------------------
# task-vector pieces


def sparsify_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ``round(density·n)`` largest-magnitude entries of ``delta`` (ties at the threshold kept).

    Args:
        delta: ``(*S)``, not modified.
        density: kept fraction in [0, 1].

    Returns:
        ``(*S)``, zeros elsewhere.
    """
    n = delta.numel()
    keep = int(round(density * n))
    if keep >= n:
        return delta.clone()
    if keep <= 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - keep + 1).values  # the keep-th largest
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def sparsify_random(delta: Tensor, drop: float, *, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE: zero each entry with probability ``drop``; survivors × ``1/(1 − drop)`` when ``rescale``.

    The Bernoulli draw is ``torch.rand(shape, generator) >= drop`` on CPU in float32.
    """
    if drop <= 0.0:
        return delta.clone()
    if drop >= 1.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= drop  # (*S) bool
    out = torch.where(keep.to(delta.device), delta, torch.zeros_like(delta))
    return out.mul_(1.0 / (1.0 - drop)) if rescale else out


def sparsify_outliers(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by magnitude and the smallest, keeping ``density``."""
    n = delta.numel()
    top = int(round(gamma * n))
    keep = int(round(density * n))
    if top + keep > n:
        top = n - keep
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[top : top + keep]] = True
    return torch.where(mask.reshape(delta.shape), delta, torch.zeros_like(delta))


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Elementwise sum without stacking (one extra tensor of memory, not n)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


def elect_sign(deltas: Sequence[Tensor]) -> Tensor:
    """TIES sign election: ``sign(Σᵢ δᵢ)``, with +1 where the sum is exactly 0 (mergekit's rule).

    Args:
        deltas: weighted, sparsified deltas, each ``(*S)``.

    Returns:
        ``(*S)`` of ±1 in the deltas' dtype.
    """
    total = _sum(deltas)
    return torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))


def task_vector_merge(
    tensors: Sequence[Tensor],
    weights: float | Sequence[float],
    *,
    base: Tensor | None = None,
    sparsify: str = "none",
    density: float = 1.0,
    drop: float = 0.0,
    gamma: float = 0.01,
    rescale: bool = True,
    consensus: str = "none",
    normalize: bool = False,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The generalized task-vector operator: sparsify × consensus × rescale, then ``base + λ·τ``.

    Steps for ``δᵢ = θᵢ − base`` (each ``(*S)``):

    1. sparsify: ``"none"``; ``"magnitude"`` (top-``density`` by |δ|, TIES); ``"random"`` (DARE: drop
       with probability ``drop``, × 1/(1 − drop) when ``rescale``); ``"outliers"`` (Breadcrumbs:
       drop the top ``gamma`` and keep ``density``).
    2. weight: ``δᵢ ← wᵢ·δᵢ``.
    3. consensus: ``"none"``; ``"sum"`` (TIES: γ = sign(Σ δᵢ), keep entries whose sign is γ);
       ``"count"`` (γ = sign of Σ sign(δᵢ), sd-mecha's default vote).
    4. ``τ = Σ δᵢ``; with ``normalize`` divided elementwise by ``Σ wᵢ·[δᵢ kept]`` (the disjoint mean;
       1 where nothing is kept).
    5. result ``base + λ·τ``.

    Args:
        tensors: fine-tuned models' tensors ``θᵢ``, each ``(*S)``.
        weights: ``wᵢ`` per model (or one float for all).
        base: ``θ_base`` ``(*S)`` (required).
        generator: for ``sparsify="random"``; draws happen model by model in order.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    if base is None:
        raise ValueError("task_vector_merge: needs base= (the model the task vectors are taken from)")
    if not tensors:
        raise ValueError("task_vector_merge: needs at least one model besides the base")
    _same_shape(tensors, base, "task_vector_merge")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if sparsify not in ("none", "magnitude", "random", "outliers"):
        raise ValueError(f"sparsify must be 'none', 'magnitude', 'random' or 'outliers', got {sparsify!r}")
    if consensus not in ("none", "sum", "count"):
        raise ValueError(f"consensus must be 'none', 'sum' or 'count', got {consensus!r}")
    ws = _model_weights(weights, len(tensors), "task_vector_merge")
    theta0 = _up(base, compute_dtype)
    deltas = []
    for w, theta in zip(ws, tensors):
        delta = _up(theta, compute_dtype) - theta0  # (*S)
        if sparsify == "magnitude":
            delta = sparsify_magnitude(delta, density)
        elif sparsify == "random":
            delta = sparsify_random(delta, drop, generator=generator, rescale=rescale)
        elif sparsify == "outliers":
            delta = sparsify_outliers(delta, density, gamma)
        deltas.append(delta.mul_(w))
    if consensus == "none":
        masks = [d != 0 for d in deltas] if normalize else None
    else:
        if consensus == "sum":
            sign = elect_sign(deltas)
        else:
            sign = elect_sign([torch.sign(d) for d in deltas])  # one sign tensor per model, briefly
        masks = [(torch.sign(d) == sign) & (d != 0) for d in deltas]
        deltas = [torch.where(m, d, torch.zeros_like(d)) for m, d in zip(masks, deltas)]
    tau = _sum(deltas)  # (*S)
    if normalize:
        divisor = sum(w * m.to(compute_dtype) for w, m in zip(ws, masks))  # (*S)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        tau = tau / divisor
    return theta0.add_(tau, alpha=lam)


def task_arithmetic(
    tensors: Sequence[Tensor], weights: float | Sequence[float] = 1.0, *, base: Tensor | None = None,
    lam: float = 1.0, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``base + λ·Σ wᵢ·(θᵢ − base)``."""
    return task_vector_merge(tensors, weights, base=base, lam=lam, compute_dtype=compute_dtype)


def ties(
    tensors: Sequence[Tensor], weights: float | Sequence[float] = 1.0, *, base: Tensor | None = None,
    density: float = 0.2, lam: float = 1.0, normalize: bool = True, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim to ``density`` (paper: 0.2) → elect sign → disjoint mean.

    Trimming is per tensor (the paper trims the whole flattened model; per tensor is what the SD and
    LLM tools do and keeps memory bounded). ``normalize=False`` sums the agreeing entries instead
    of averaging them (then density 1 with no sign conflict is plain task arithmetic).
    """
    return task_vector_merge(
        tensors, weights, base=base, sparsify="magnitude", density=density, consensus="sum",
        normalize=normalize, lam=lam, compute_dtype=compute_dtype,
    )


def dare(
    tensors: Sequence[Tensor], weights: float | Sequence[float] = 1.0, *, base: Tensor | None = None,
    drop: float = 0.9, consensus: str = "sum", rescale: bool = True, lam: float = 1.0,
    generator: torch.Generator | None = None, compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DARE (Yu et al. 2023): drop delta entries with probability ``drop`` (paper: 0.9), rescale 1/(1 − p).

    ``consensus="sum"`` is DARE-TIES (sign election, agreeing entries summed); ``"none"`` is
    DARE-linear (plain weighted sum of the rescaled deltas).
    """
    return task_vector_merge(
        tensors, weights, base=base, sparsify="random", drop=drop, rescale=rescale, consensus=consensus,
        lam=lam, generator=generator, compute_dtype=compute_dtype,
    )


def model_stock(
    tensors: Sequence[Tensor], weights: float | Sequence[float] | None = None, *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Model Stock (Jang et al. 2024): ``t·mean(θᵢ) + (1 − t)·base``, ``t = k·cos/(1 + (k − 1)·cos)``.

    ``cos`` is the mean cosine over all pairs of deltas ``θᵢ − base`` (flattened per tensor), clamped
    to [0, 1] (a zero delta counts as cos 0, so unrelated or opposed fine-tunes fall back to the
    base instead of dividing by zero). ``weights`` is unused.
    """
    if base is None:
        raise ValueError("model_stock: needs base= (the pretrained model)")
    if len(tensors) < 2:
        raise ValueError(f"model_stock: needs at least 2 fine-tuned models, got {len(tensors)}")
    _same_shape(tensors, base, "model_stock")
    theta0 = _up(base, compute_dtype)
    thetas = [_up(t, compute_dtype) for t in tensors]
    deltas = [(t - theta0).reshape(-1) for t in thetas]
    norms = [torch.linalg.vector_norm(d) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            denominator = float(norms[i] * norms[j])
            cosines.append(float(torch.dot(deltas[i], deltas[j])) / denominator if denominator > 0 else 0.0)
    cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
    k = len(thetas)
    t = k * cos / (1.0 + (k - 1) * cos)
    mean = torch.stack(thetas).mean(dim=0)
    return mean.mul_(t).add_(theta0, alpha=1.0 - t)


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Operator:
    """A registered operator and how the engine feeds it.

    Attributes:
        fn: the pure function.
        inputs: how to read the input list: ``"ab"`` (A, B), ``"abc"`` (A, B, base=C) or
            ``"base+models"`` (base first, then ≥ ``min_models`` models).
        random: takes a ``generator`` (seeded per key).
        options: keyword options the function accepts beyond ``weights`` (for recipes/CLI).
        min_models: fewest fine-tuned models for ``"base+models"``.
    """

    fn: Callable[..., Tensor]
    inputs: str
    random: bool = False
    options: tuple[str, ...] = ()
    min_models: int = 1


OPERATORS: dict[str, Operator] = {
    "weighted-sum": Operator(weighted_sum, "ab"),
    "slerp": Operator(slerp, "ab"),
    "add-difference": Operator(add_difference, "abc"),
    "train-difference": Operator(train_difference, "abc"),
    "task-arithmetic": Operator(task_arithmetic, "base+models", options=("lam",)),
    "ties": Operator(ties, "base+models", options=("density", "lam", "normalize")),
    "dare": Operator(dare, "base+models", random=True, options=("drop", "consensus", "rescale", "lam")),
    "model-stock": Operator(model_stock, "base+models", min_models=2),
}


def get_operator(name: str) -> Operator:
    """The registered operator ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown merge operator {name!r}; known: {', '.join(sorted(OPERATORS))}") from None
