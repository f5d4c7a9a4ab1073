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
(sparsify × consensus × rescale), as in mergekit. supermerger's modes (``triple-sum``,
``sum-twice``, ``cosine-a``/``cosine-b``, ``smooth-add``, ``extract``, ``tensor``/``tensor2``, and the
one-model ``self`` / ``plus-random``, whose inputs are ``"a"``) live in
:mod:`.supermerger_modes` and are registered at the end of this module; the cosine ones are two-pass
(:class:`PrePass`). sd-meh's methods (``weighted-subtraction``, ``euclidean-add-difference``,
``multiply-difference``, ``similarity-add-difference``, ``top-k-tensor-sum``,
``distribution-crossover``, ``ties-add-difference``, ``rotate``) live in :mod:`.meh_modes`, registered
after them. ``weights_clip`` (:data:`ENGINE_OPTIONS`) is applied by the engine.

:data:`OPERATORS` holds each operator once: its declaration — inputs (``A B``, ``A B C`` or
``BASE MODEL...``) and options (:class:`OperatorOption`: name, type, default, help) — bound to its
function. The built-in declarations live, torch-free, in :data:`sdadapt.merge_tables.OPERATOR_SPECS`
(``merge --help`` reads them without importing torch); this module binds each to its function by
name (:class:`Operator`, :meth:`Operator.bind`). The engine feeds the function from the declaration,
:func:`check_options` validates recipes against it (an undeclared option is refused, naming it), and
the ``python -m sdadapt merge`` sub-commands are generated from it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..merge_tables import (
    ENGINE_OPTIONS,
    MAX_MERGE_STRENGTH,
    OPERATOR_SPECS,
    REQUIRED,
    STEP_FIELDS,
    WEIGHTS_CLIP,
    OperatorDeclaration,
    OperatorOption,
    OperatorSpec,
)
from .operator_inputs import _alpha, _count, _difference_inputs, _same_shape, _up

__all__ = [
    "weighted_sum",
    "add_difference",
    "scaled_add",
    "scaled_difference",
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
    "OperatorOption",
    "OperatorSpec",
    "OPERATORS",
    "REQUIRED",
    "STEP_FIELDS",
    "ENGINE_OPTIONS",
    "PrePass",
    "check_options",
    "get_operator",
    "MAX_MERGE_STRENGTH",
    "WEIGHTS_CLIP",
]

SLERP_PARALLEL = 0.9995  # |cos| above this: lerp (mergekit's threshold)


def _model_weights(weights: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(weights, (int, float)):
        return [float(weights)] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} weights for {n} models; give one per model or a single float")
    return values


# --------------------------------------------------------------------------------------------
# two- and three-model operators


def _two(tensors: Sequence[Tensor], name: str, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of a two-model operator, checked (two, the same shape) and copied to ``compute_dtype``."""
    _count(tensors, 2, name)
    _same_shape(tensors, None, name)
    a, b = (_up(t, compute_dtype) for t in tensors)
    return a, b


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
    a, b = _two(tensors, "weighted_sum", compute_dtype)
    alpha = _alpha(weights, "weighted_sum")
    if alpha == 0.0:
        return a
    if alpha == 1.0:
        return b
    return a.mul_(1.0 - alpha).add_(b, alpha=alpha)


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


def scaled_difference(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ComfyUI's ``ModelSubtract``: ``α·(A − B)`` of ``tensors = (A, B)``, ``weights = α``.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b = _two(tensors, "scaled_difference", compute_dtype)
    return a.sub_(b).mul_(_alpha(weights, "scaled_difference"))


def scaled_add(
    tensors: Sequence[Tensor], weights: float | Sequence[float], *, base: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ComfyUI's ``ModelAdd`` (α = 1): ``A + α·B`` of ``tensors = (A, B)``, ``weights = α``.

    Returns:
        ``(*S)`` in ``compute_dtype``.
    """
    a, b = _two(tensors, "scaled_add", compute_dtype)
    return a.add_(b, alpha=_alpha(weights, "scaled_add"))


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
class PrePass:
    """A first pass over every merged key before any key is merged (two-pass operators).

    The engine calls ``statistic(tensors, compute_dtype=...)`` once per merged key, with that
    key's tensors in the order ``fn`` takes them (``(A, B)``, then C), reading one key at a time;
    then ``aggregate(statistics)`` once, over all keys' results; what it returns is passed to
    ``fn`` as extra keyword arguments for every key. With ``per_key`` the engine also keeps each
    key's statistic (on the CPU) until that key is merged and passes it to ``fn`` as
    ``statistic=`` (moved to the compute device), so ``fn`` need not compute it again; a key read
    a second time (a nested step's output read by two passes) gets it computed again. Keys for
    which ``skip(key)`` gives a reason take part in neither pass and keep the first input (the
    report says why).

    Attributes:
        statistic: ``(tensors, *, compute_dtype) -> Tensor`` or a tuple (a ``NamedTuple``) of
            tensors and ``None`` s, kept until the merge pass: make it small — supermerger's cosine
            keeps one value per column (and a 0-d whole-tensor cosine for cosineA).
        aggregate: ``(statistics) -> {keyword: value}``.
        skip: ``key -> reason`` for keys left as the first input, or ``None``.
        per_key: hand each key its own statistic to ``fn`` as ``statistic=``.
    """

    statistic: Callable[..., Any]
    aggregate: Callable[[Sequence[Any]], Mapping[str, Any]]
    skip: Callable[[str], str | None] | None = None
    per_key: bool = False


@dataclass(frozen=True)
class Operator(OperatorDeclaration):
    """A registered operator: its function, its inputs and its options — the one declaration the
    engine, recipe validation and the ``python -m sdadapt merge`` sub-commands are made from. A
    built-in one is its torch-free :class:`~sdadapt.merge_tables.OperatorSpec` bound to its function
    (:meth:`bind`); the declaration's properties (``input_names``, ``variadic``, ``option_names``,
    ``keyword_options``, ``random``, ``option``) are :class:`~sdadapt.merge_tables.OperatorDeclaration`'s.

    Attributes:
        fn: the pure function; its keyword options are the declared ``options`` that are not
            :data:`STEP_FIELDS`.
        inputs, options, min_models, summary, description, input_help: the declaration, as
            :class:`~sdadapt.merge_tables.OperatorSpec`'s fields of those names.
        prepass: a :class:`PrePass` for operators that need statistics over the whole model first.
        skip: ``key -> reason`` for keys the operator leaves as the first input (supermerger's
            ``self`` skips to_out/proj_out/norm), or ``None``.
        keep_first: ``(tensors) -> reason`` judged on a key's values (in ``fn``'s order): a reason
            means ``fn`` is undefined there and the engine keeps the first input, reporting why
            (supermerger's cosine modes on an all-zero tensor), or ``None``.
    """

    fn: Callable[..., Tensor]
    inputs: str
    options: tuple[OperatorOption, ...] = ()
    min_models: int = 1
    summary: str = ""
    description: str = ""
    prepass: PrePass | None = None
    input_help: Mapping[str, str] | None = None
    skip: Callable[[str], str | None] | None = None
    keep_first: Callable[[Sequence[Tensor]], str | None] | None = None

    @classmethod
    def bind(cls, spec: OperatorSpec, fn: Callable[..., Tensor], *, prepass: PrePass | None = None,
             skip: Callable[[str], str | None] | None = None,
             keep_first: Callable[[Sequence[Tensor]], str | None] | None = None) -> Operator:
        """``spec`` (every field of it: inputs, options, help text) with its function and engine hooks."""
        return cls(fn, **{f.name: getattr(spec, f.name) for f in fields(spec)}, prepass=prepass, skip=skip,
                   keep_first=keep_first)

    @property
    def spec(self) -> OperatorSpec:
        """The declaration without the code (what :data:`~sdadapt.merge_tables.OPERATOR_SPECS` holds for a
        built-in operator)."""
        return OperatorSpec(**{f.name: getattr(self, f.name) for f in fields(OperatorSpec)})


def check_options(
    name: str,
    options: Mapping[str, Any],
    *,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Check a step's settings against operator ``name``'s declaration.

    ``options`` are the keyword options (``MergeStep.options``); ``alpha`` / ``weights`` / ``seed``
    the step's fields (``None`` = not given). Every given name must be declared by the operator
    and every value of the declared type and choices.

    Returns:
        The keyword options, values converted to the declared types (``1`` -> ``1.0``).

    Raises:
        ValueError: an unknown operator, an option it does not declare (the message names it
            and lists the declared ones) or a bad value.
    """
    op = get_operator(name)
    declared = {o.name: o for o in op.options}
    given = dict(options)
    misplaced = sorted(set(given) & STEP_FIELDS)
    if misplaced:
        raise InputError(f"{name}: {', '.join(misplaced)} is a step field (MergeStep.{misplaced[0]}), not an entry "
                         "of options")
    fields = {"alpha": alpha, "weights": weights, "seed": seed}
    unknown = sorted(k for k in given if k not in declared)
    unknown += [k for k, v in fields.items() if v is not None and k not in declared]
    if unknown:
        takes = ", ".join(op.option_names) or "no options"
        raise InputError(f"{name} has no option {', '.join(repr(k) for k in unknown)}; it takes {takes}")
    missing = [o.flag for o in op.keyword_options if o.required and o.name not in given]
    if missing:
        raise InputError(f"{name} needs {', '.join(missing)} (options {', '.join(m[2:] for m in missing)})")
    for key, value in fields.items():
        if value is not None:
            declared[key].check(name, value)
    return {key: declared[key].check(name, value) for key, value in given.items()}


def get_operator(name: str) -> Operator:
    """The registered operator ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise InputError(f"unknown merge operator {str(name)[:60]!r}; known: {', '.join(sorted(OPERATORS))}") from None


# --------------------------------------------------------------------------------------------
# supermerger's modes (the math is in .supermerger_modes; it and .meh_modes take their input checks
# from .operator_inputs, not from this module, so importing them here makes no cycle)

from . import supermerger_modes as _sm


def _cosine_skip(key: str) -> str | None:
    from .engine import key_component  # the engine imports this module: look the component map up late

    return "VAE kept as A (supermerger's cosine modes skip first_stage_model)" if key_component(key) == "vae" else None


def _cosine_aggregate(statistics: Sequence[_sm.CosineStatistic]) -> dict[str, float]:
    """``s_min``/``s_max`` pooled from the keys' :class:`~.supermerger_modes.CosineStatistic` columns."""
    return _sm.cosine_range([s.columns for s in statistics])


def _cosine_hooks(normalize: bool) -> dict[str, Any]:
    """supermerger's cosineA / cosineB: the merge, its first pass over every key and the all-zero rule."""
    return {
        "fn": lambda tensors, weights, *, base=None, s_min, s_max, statistic=None, compute_dtype=torch.float32: (
            _sm.cosine_merge(tensors, weights, normalize=normalize, s_min=s_min, s_max=s_max, statistic=statistic,
                             compute_dtype=compute_dtype)),
        "prepass": PrePass(
            lambda tensors, *, compute_dtype=torch.float32: _sm.cosine_key_statistic(
                tensors, normalize=normalize, compute_dtype=compute_dtype),
            _cosine_aggregate, _cosine_skip, per_key=True),
        "keep_first": _sm.cosine_undefined,
    }


# --------------------------------------------------------------------------------------------
# sd-meh's merge methods (the math is in .meh_modes)

from . import meh_modes as _meh

# --------------------------------------------------------------------------------------------
# the built-in operators: each declaration of sdadapt.merge_tables bound to its function by name

#: each built-in operator's function and engine hooks (:meth:`Operator.bind`'s keywords), by name; its
#: inputs, options and help text are :data:`sdadapt.merge_tables.OPERATOR_SPECS` ``[name]``
_BINDINGS: dict[str, dict[str, Any]] = {
    "weighted-sum": {"fn": weighted_sum},
    "slerp": {"fn": slerp},
    "add-difference": {"fn": add_difference},
    "difference": {"fn": scaled_difference},
    "add": {"fn": scaled_add},
    "train-difference": {"fn": train_difference},
    "task-arithmetic": {"fn": task_arithmetic},
    "ties": {"fn": ties},
    "dare": {"fn": dare},
    "model-stock": {"fn": model_stock},
    # supermerger's modes
    "triple-sum": {"fn": _sm.triple_sum},
    "sum-twice": {"fn": _sm.sum_twice},
    "cosine-a": _cosine_hooks(True),
    "cosine-b": _cosine_hooks(False),
    "smooth-add": {"fn": _sm.smooth_add},
    "extract": {"fn": _sm.extract},
    "tensor": {"fn": _sm.tensor_slice},
    "tensor2": {"fn": lambda tensors, weights, *, base=None, beta, compute_dtype=torch.float32: _sm.tensor_slice(
        tensors, weights, beta=beta, columns=True, compute_dtype=compute_dtype)},
    "self": {"fn": _sm.scale_self, "skip": _sm.self_skip},
    "plus-random": {"fn": _sm.plus_random, "skip": _sm.self_skip},
    # sd-meh's merge methods
    "weighted-subtraction": {"fn": _meh.weighted_subtraction},
    "euclidean-add-difference": {"fn": _meh.euclidean_add_difference},
    "multiply-difference": {"fn": _meh.multiply_difference},
    "similarity-add-difference": {"fn": _meh.similarity_add_difference},
    "top-k-tensor-sum": {"fn": _meh.top_k_tensor_sum},
    "distribution-crossover": {"fn": _meh.distribution_crossover},
    "ties-add-difference": {"fn": _meh.ties_add_difference},
    "rotate": {"fn": _meh.rotate},
}


def _bind_builtins() -> dict[str, Operator]:
    """:data:`OPERATORS` in :data:`~sdadapt.merge_tables.OPERATOR_SPECS`' order; a spec without a function here
    (or a function without a spec) is a bug in this module, named."""
    unbound = [name for name in OPERATOR_SPECS if name not in _BINDINGS]
    undeclared = [name for name in _BINDINGS if name not in OPERATOR_SPECS]
    if unbound or undeclared:
        raise RuntimeError(f"sdadapt.merge.operators: declared without a function: {unbound}; a function without a "
                           f"declaration in sdadapt.merge_tables.OPERATOR_SPECS: {undeclared}")
    return {name: Operator.bind(spec, **_BINDINGS[name]) for name, spec in OPERATOR_SPECS.items()}


#: every registered operator by name (``merge``'s sub-commands, recipes' ``operator``); add one with
#: ``OPERATORS[name] = Operator(fn, inputs, options, summary=..., description=...)``
OPERATORS: dict[str, Operator] = _bind_builtins()
