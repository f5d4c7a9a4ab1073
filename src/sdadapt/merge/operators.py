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

:data:`OPERATORS` declares each operator once — its inputs (``A B``, ``A B C`` or
``BASE MODEL...``) and its options (:class:`OperatorOption`: name, type, default, help). The engine
feeds the function from it, :func:`check_options` validates recipes against it (an undeclared
option is refused, naming it), and the ``python -m sdadapt merge`` sub-commands are generated from it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .operator_inputs import _alpha, _count, _difference_inputs, _same_shape, _up

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
    "OperatorOption",
    "OPERATORS",
    "REQUIRED",
    "STEP_FIELDS",
    "ENGINE_OPTIONS",
    "PrePass",
    "check_options",
    "get_operator",
    "MAX_MERGE_STRENGTH",
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


#: the option names that are :class:`~sdadapt.merge.recipe.MergeStep` fields rather than entries of
#: ``MergeStep.options``: the engine turns ``alpha`` / ``weights`` into the operator's ``weights``
#: argument and ``seed`` into per-key generators; every other option is a keyword of ``fn``
STEP_FIELDS: frozenset[str] = frozenset({"alpha", "weights", "seed"})

#: keyword options the engine applies around ``fn`` instead of passing them to it: ``weights_clip``
#: clamps each merged value to ``[min(A, B), max(A, B)]`` of the first two inputs (sd-meh's rule)
ENGINE_OPTIONS: frozenset[str] = frozenset({"weights_clip"})

_INPUT_NAMES: dict[str, tuple[str, ...]] = {"a": ("A",), "ab": ("A", "B"), "abc": ("A", "B", "C"), "base+models": ("BASE", "MODEL")}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


_REQUIRED: Any = _Required()


@dataclass(frozen=True)
class OperatorOption:
    """One setting of an operator, declared once for recipes, their validation and the command line.

    Attributes:
        name: the recipe name (a :data:`STEP_FIELDS` name or a keyword of the operator's ``fn``);
            the command-line flag is ``--name`` with ``_`` as ``-``.
        type: ``float``, ``int``, ``str`` or ``bool``; ``per_model`` options are sequences of it.
        default: the value when not given; :data:`REQUIRED` (no default) makes the flag required.
        help: one line for ``--help``.
        choices: the allowed values (``str`` options).
        per_model: one value per MODEL (``weights``), given as comma-separated numbers.
        low, high: the range of a number (``high_open``: ``high`` itself excluded); every number
            must also be finite. A value outside is an :class:`~sdadapt.errors.InputError`.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    high_open: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, operator: str, value: Any) -> Any:
        """``value`` converted to the declared type; ``ValueError`` naming the option otherwise."""
        if value is None and not self.required and self.default is None:
            return None
        if self.per_model:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise InputError(f"{operator}: option {self.name!r} is a list of numbers (one per model), got {value!r}")
            return tuple(self._in_range(operator, _checked_scalar(operator, self.name, float, v)) for v in value)
        checked = _checked_scalar(operator, self.name, self.type, value)
        if self.choices is not None and checked not in self.choices:
            raise InputError(f"{operator}: option {self.name!r} must be one of {', '.join(map(str, self.choices))}, "
                             f"got {value!r}")
        return self._in_range(operator, checked)

    def _in_range(self, operator: str, value: Any) -> Any:
        if self.type not in (int, float) or isinstance(value, bool):
            return value
        if not math.isfinite(value):
            raise InputError(f"{operator}: option {self.name!r} ({self.flag}) must be a finite number, got {value}")
        low_ok = self.low is None or value >= self.low
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            span = f"[{_g(self.low)}, {_g(self.high)}{')' if self.high_open else ']'}"
            raise InputError(f"{operator}: option {self.name!r} ({self.flag}) must be in {span}, got {value:g}")
        return value


def _g(value: float | None) -> str:
    return "-inf" if value is None else f"{value:g}"


#: :attr:`OperatorOption.default` of an option that must be given
REQUIRED: Any = _REQUIRED


def _checked_scalar(operator: str, name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise InputError(f"{operator}: option {name!r} must be {'a number' if kind in (int, float) else kind.__name__}"
                     f"{' (an integer)' if kind is int else ''}, got {str(value)[:80]!r}")


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
class Operator:
    """A registered operator: its function, its inputs and its options — the one declaration the
    engine, recipe validation and the ``python -m sdadapt merge`` sub-commands are made from.

    Attributes:
        fn: the pure function.
        inputs: how to read the input list: ``"a"`` (A alone), ``"ab"`` (A, B), ``"abc"`` (A, B, base=C) or
            ``"base+models"`` (BASE first, then ≥ ``min_models`` MODELs).
        options: every setting it takes (:class:`OperatorOption`): ``alpha`` / ``weights`` / ``seed``
            (:data:`STEP_FIELDS`) and the keyword options of ``fn``. Anything else is refused.
        min_models: fewest fine-tuned models for ``"base+models"``.
        summary: one line for the command list.
        description: the formula and what the options do (the command's ``--help``).
        prepass: a :class:`PrePass` for operators that need statistics over the whole model first.
        input_help: ``{input name: help}`` where an input means something else than usual
            (C of Triple sum is a third model, not the base of a difference).
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

    def __post_init__(self) -> None:
        if self.inputs not in _INPUT_NAMES:
            raise ValueError(f"Operator.inputs must be one of {', '.join(_INPUT_NAMES)}, got {self.inputs!r}")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"Operator options repeat a name: {names}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """``("A", "B")``, ``("A", "B", "C")`` or ``("BASE", "MODEL")`` (MODEL repeats)."""
        return _INPUT_NAMES[self.inputs]

    @property
    def variadic(self) -> bool:
        """Whether the last input repeats (``BASE MODEL [MODEL ...]``)."""
        return self.inputs == "base+models"

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def keyword_options(self) -> tuple[OperatorOption, ...]:
        """The options of ``MergeStep.options`` (keywords of ``fn``, and :data:`ENGINE_OPTIONS`)."""
        return tuple(o for o in self.options if o.name not in STEP_FIELDS)

    @property
    def random(self) -> bool:
        """Takes a ``generator`` (seeded per key from the step's ``seed``)."""
        return "seed" in self.option_names

    def option(self, name: str) -> OperatorOption:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)


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


#: the largest |alpha|, |lam| and |weight| a merge accepts: beyond it the result is no model, and
#: float16 outputs overflow
MAX_MERGE_STRENGTH = 100.0


def _alpha_option(help_text: str, default: Any = _REQUIRED) -> OperatorOption:
    return OperatorOption("alpha", float, default, help_text, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)


_LAM = OperatorOption("lam", float, 1.0, "scale of the merged task vector", low=-MAX_MERGE_STRENGTH,
                      high=MAX_MERGE_STRENGTH)
_WEIGHTS = OperatorOption("weights", float, None, "one weight per MODEL, comma-separated (default 1 each)",
                          per_model=True, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)

#: sd-meh's weights_clip, an option of the two- and three-model operators (applied by the engine)
WEIGHTS_CLIP = OperatorOption("weights_clip", bool, False,
                              "clamp each merged value to [min(A, B), max(A, B)] (sd-meh's weights_clip)")

OPERATORS: dict[str, Operator] = {
    "weighted-sum": Operator(
        weighted_sum, "ab", (_alpha_option("weight of B: 0 gives A, 1 gives B"), WEIGHTS_CLIP),
        summary="(1-alpha)*A + alpha*B",
        description="A1111 weighted sum: (1 - alpha)*A + alpha*B; alpha is B's weight (0 gives A back, 1 gives B).",
    ),
    "slerp": Operator(
        slerp, "ab", (_alpha_option("interpolation point: 0 = A, 1 = B"), WEIGHTS_CLIP),
        summary="spherical interpolation of A and B",
        description="Spherical interpolation per tensor (lerp when nearly parallel); alpha 0 = A, 1 = B.",
    ),
    "add-difference": Operator(
        add_difference, "abc", (_alpha_option("strength of B - C", 1.0), WEIGHTS_CLIP),
        summary="A + alpha*(B - C)",
        description="A1111 add difference: A + alpha*(B - C). Inpainting recipe: A = sd15-inpainting, B = your "
        "model, C = sd15, alpha 1.",
    ),
    "train-difference": Operator(
        train_difference, "abc", (_alpha_option("strength of B - C", 1.0), WEIGHTS_CLIP),
        summary="A + 1.8*alpha*w*(B - C)",
        description="supermerger train difference: the B - C difference scaled per element by "
        "|B - A| / (|B - C| + |B - A|).",
    ),
    "task-arithmetic": Operator(
        task_arithmetic, "base+models", (_LAM, _WEIGHTS),
        summary="BASE + lam*sum(w_i*(M_i - BASE))",
        description="Task arithmetic: add the weighted task vectors (MODEL - BASE) to BASE.",
    ),
    "ties": Operator(
        ties, "base+models",
        (OperatorOption("density", float, 0.2, "kept fraction of each task vector, by magnitude", low=0.0, high=1.0), _LAM, _WEIGHTS,
         OperatorOption("normalize", bool, True, "average the agreeing entries (TIES' disjoint mean); "
                        "--no-normalize sums them")),
        summary="TIES: trim, elect sign, disjoint mean",
        description="TIES-merging: trim every task vector (MODEL - BASE) to its top --density by magnitude (paper "
        "default 0.2), elect the sign of their sum, average the agreeing entries, add lam times that to BASE.",
    ),
    "dare": Operator(
        dare, "base+models",
        (OperatorOption("drop", float, 0.9, "drop probability p of each task-vector entry", low=0.0, high=1.0,
                        high_open=True),
         OperatorOption("seed", int, 0, "merge seed; recorded in the file", low=0, high=2**63 - 1),
         OperatorOption("consensus", str, "sum", "sum: TIES sign election (DARE-TIES); count: sign of the vote "
                        "count; none: plain sum (DARE-linear)", choices=("sum", "count", "none")),
         OperatorOption("rescale", bool, True, "rescale the kept entries by 1/(1-p); --no-rescale keeps them as "
                        "they are"),
         _LAM, _WEIGHTS),
        summary="DARE: random drop and rescale",
        description="DARE: drop each task-vector entry with probability --drop (paper 0.9), rescale survivors by "
        "1/(1-drop), then TIES sign consensus (or a plain sum). Randomness is seeded per key from --seed, so the "
        "result does not depend on order or threads.",
    ),
    "model-stock": Operator(
        model_stock, "base+models", min_models=2,
        summary="Model Stock: interpolate the mean toward BASE",
        description="Model Stock: t*mean(models) + (1-t)*BASE with t = k*cos/(1+(k-1)*cos) from the angle between "
        "the task vectors, per tensor. Takes no options.",
    ),
}


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


def _beta_option(help_text: str) -> OperatorOption:
    return OperatorOption("beta", float, _REQUIRED, help_text, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)


def _cosine_skip(key: str) -> str | None:
    from .engine import key_component  # the engine imports this module: look the component map up late

    return "VAE kept as A (supermerger's cosine modes skip first_stage_model)" if key_component(key) == "vae" else None


def _cosine_aggregate(statistics: Sequence[_sm.CosineStatistic]) -> dict[str, float]:
    """``s_min``/``s_max`` pooled from the keys' :class:`~.supermerger_modes.CosineStatistic` columns."""
    return _sm.cosine_range([s.columns for s in statistics])


def _cosine_operator(normalize: bool) -> Operator:
    letter = "A" if normalize else "B"
    return Operator(
        lambda tensors, weights, *, base=None, s_min, s_max, statistic=None, compute_dtype=torch.float32: (
            _sm.cosine_merge(tensors, weights, normalize=normalize, s_min=s_min, s_max=s_max, statistic=statistic,
                             compute_dtype=compute_dtype)),
        "ab", (_alpha_option("shift toward B: k = clip(similarity - " + ("|alpha|" if normalize else "alpha")
                             + ", 0, 1)"), WEIGHTS_CLIP),
        summary=f"supermerger cosine{letter}: per-column lerp(B, A, k) from the similarity",
        description=f"supermerger calcmode cosine{letter} (Weight sum): a first pass over every key pools the "
        "similarity of A and B (" + ("the column cosine of the column-normalised tensors" if normalize else
                                     "the mean of the column cosine and the whole-tensor cosine")
        + "), drops the values below the 1st and above the 99th percentile and keeps s_min/s_max; then per key "
        "k = clip((s - s_min)/(s_max - s_min) - " + ("|alpha|" if normalize else "alpha") + ", 0, 1) per column, "
        "result lerp(B, A, k): similar columns keep A, alpha pushes toward B. VAE keys stay A, and so does a key "
        "where A or B is all zeros (the similarity is 0/0 there: supermerger writes NaN; the report lists them).",
        prepass=PrePass(
            lambda tensors, *, compute_dtype=torch.float32: _sm.cosine_key_statistic(
                tensors, normalize=normalize, compute_dtype=compute_dtype),
            _cosine_aggregate, _cosine_skip, per_key=True),
        keep_first=_sm.cosine_undefined,
    )


_THIRD_MODEL = {"C": "third model"}

OPERATORS.update({
    "triple-sum": Operator(
        _sm.triple_sum, "abc",
        (_alpha_option("weight of B"), _beta_option("weight of C"), WEIGHTS_CLIP),
        summary="(1-alpha-beta)*A + alpha*B + beta*C",
        description="supermerger Triple sum: (1 - alpha - beta)*A + alpha*B + beta*C, computed as "
        "lerp(A, lerp(B, C, beta/(alpha+beta)), alpha+beta) in the compute dtype.",
        input_help=_THIRD_MODEL,
    ),
    "sum-twice": Operator(
        _sm.sum_twice, "abc",
        (_alpha_option("weight of B in the first sum"), _beta_option("weight of C in the second sum"), WEIGHTS_CLIP),
        summary="(1-beta)*((1-alpha)*A + alpha*B) + beta*C",
        description="supermerger sum Twice: (1 - beta)*((1 - alpha)*A + alpha*B) + beta*C.",
        input_help=_THIRD_MODEL,
    ),
    "cosine-a": _cosine_operator(True),
    "cosine-b": _cosine_operator(False),
    "smooth-add": Operator(
        _sm.smooth_add, "abc", (_alpha_option("strength of the smoothed B - C", 1.0), WEIGHTS_CLIP),
        summary="A + alpha*gauss(median(B - C))",
        description="supermerger calcmode smoothAdd: A + alpha*gaussian_filter(median_filter(B - C, size=3), "
        "sigma=1) over each whole N-D tensor (scipy's reflect mode; computed in torch). The smoothed difference is "
        "weaker: supermerger suggests alpha up to 2.",
    ),
    "extract": Operator(
        _sm.extract, "abc",
        (OperatorOption("alpha", float, _REQUIRED, "0 takes B - A, 1 takes C - A", low=0.0, high=1.0),
         OperatorOption("beta", float, _REQUIRED, "0 keeps what B - A and C - A share, 1 what they do not",
                        low=0.0, high=1.0),
         OperatorOption("gamma", float, 0.3, "sharpness of the similarity weight", low=0.0,
                        high=MAX_MERGE_STRENGTH),
         WEIGHTS_CLIP),
        summary="A + lerp(B-A, C-A, alpha)*lerp(d, 1-d, beta)",
        description="supermerger calcmode extract (subaqua's): a = B - A, b = C - A, c = row cosine of a and b "
        "(last dim), d = ((c + 1)/2)^gamma; result A + lerp(a, b, alpha)*lerp(d, 1 - d, beta).",
        input_help={"C": "second model whose difference from A is compared with B's"},
    ),
    "tensor": Operator(
        _sm.tensor_slice, "ab",
        (_alpha_option("fraction of rows taken from B"), _beta_option("where the slice starts (fraction of rows)")),
        summary="rows [beta*n, (alpha+beta)*n) of A replaced by B's",
        description="supermerger calcmode tensor: no interpolation; rows [int(beta*n), int((alpha+beta)*n)) of "
        "dim 0 come from B, the rest from A; past alpha + beta > 1 it wraps (B with rows "
        "[int((alpha+beta-1)*n), int(beta*n)) from A).",
    ),
    "tensor2": Operator(
        lambda tensors, weights, *, base=None, beta, compute_dtype=torch.float32: _sm.tensor_slice(
            tensors, weights, beta=beta, columns=True, compute_dtype=compute_dtype),
        "ab",
        (_alpha_option("fraction of columns taken from B"), _beta_option("where the slice starts")),
        summary="columns [beta*n, (alpha+beta)*n) of A replaced by B's",
        description="supermerger calcmode tensor2: as tensor, on dim 1 for tensors of 2+ dims (n = shape[1] when "
        "it is larger than 100, else shape[0], as supermerger computes it).",
    ),
    "self": Operator(
        _sm.scale_self, "a", (_alpha_option("the factor"),),
        summary="A*alpha (supermerger self)",
        description="supermerger calcmode self: every merged key of A times alpha; keys whose LDM name contains "
        "to_out, proj_out or norm keep A, and alpha 0 keeps A (supermerger skips both).",
        skip=_sm.self_skip,
    ),
    "plus-random": Operator(
        _sm.plus_random, "a",
        (_alpha_option("scale of the N(0, 1) noise"),
         OperatorOption("seed", int, 0, "merge seed; recorded in the file", low=0, high=2**63 - 1)),
        summary="A + alpha*N(0,1) (supermerger plus random)",
        description="supermerger calcmode plus random: A + alpha*N(0, 1) per element, keys whose LDM name contains "
        "to_out, proj_out or norm keep A. The noise is seeded per key from --seed (supermerger uses torch's global RNG, "
        "which no seed reproduces).",
        skip=_sm.self_skip,
    ),
})


# --------------------------------------------------------------------------------------------
# sd-meh's merge methods (the math is in .meh_modes)

from . import meh_modes as _meh


def _unit_alpha(help_text: str) -> OperatorOption:
    return OperatorOption("alpha", float, _REQUIRED, help_text, low=0.0, high=1.0)


OPERATORS.update({
    "weighted-subtraction": Operator(
        _meh.weighted_subtraction, "ab",
        (_alpha_option("alpha of alpha*beta, the share of B taken out"), _beta_option("beta of alpha*beta"),
         WEIGHTS_CLIP),
        summary="(A - alpha*beta*B)/(1 - alpha*beta)",
        description="sd-meh weighted_subtraction: (A - alpha*beta*B)/(1 - alpha*beta), the weighted sum solved for "
        "its other input (beta is nudged by 1e-10 when alpha*beta = 1, as sd-meh does for alpha = beta = 1).",
    ),
    "euclidean-add-difference": Operator(
        _meh.euclidean_add_difference, "abc",
        (_unit_alpha("weight of B: 0 gives A, 1 gives B"), WEIGHTS_CLIP),
        summary="C + the RMS of the normalised A-C, B-C, at the norm of lerp(A, B, alpha) - C",
        description="sd-meh euclidean_add_difference: d = sqrt((1-alpha)*a^2 + alpha*b^2) with a, b the "
        "differences A - C, B - C divided by their norms, signed like s = lerp(A, B, alpha) - C; result "
        "C + d*|s|/|d| (norms over each tensor).",
        input_help={"C": "base model both differences are taken from"},
    ),
    "multiply-difference": Operator(
        _meh.multiply_difference, "abc",
        (_unit_alpha("exponent: |A-C|^(1-alpha) * |B-C|^alpha"),
         _beta_option("sign from lerp(A, B, beta) - C"), WEIGHTS_CLIP),
        summary="C + |A-C|^(1-alpha)*|B-C|^alpha, signed by lerp(A, B, beta) - C",
        description="sd-meh multiply_difference: the weighted geometric mean of the two differences from C, "
        "with the sign of the weighted-sum difference lerp(A, B, beta) - C.",
        input_help={"C": "base model both differences are taken from"},
    ),
    "similarity-add-difference": Operator(
        _meh.similarity_add_difference, "abc",
        (_alpha_option("strength of B - C (and 2x the weight of B where A and B agree)"),
         _beta_option("how far agreement moves toward the weighted sum (similarity scale)"), WEIGHTS_CLIP),
        summary="lerp(A + alpha*(B-C), lerp(A, B, alpha/2), beta*similarity(A, B))",
        description="sd-meh similarity_add_difference: s = beta*(A*B/max(|A|,|B|)^2 + 1)/2 per element; result "
        "(1-s)*(A + alpha*(B - C)) + s*((1-alpha/2)*A + alpha/2*B): add difference where A and B disagree, "
        "weighted sum where they agree.",
    ),
    "top-k-tensor-sum": Operator(
        _meh.top_k_tensor_sum, "ab",
        (_alpha_option("width of the magnitude band (fraction of the values)"),
         _beta_option("offset of the band (fraction; wraps past 1)"), WEIGHTS_CLIP),
        summary="A's values rearranged in B's order on a band of magnitudes",
        description="sd-meh top_k_tensor_sum: A's sorted values are given to the elements in B's rank order, on "
        "the values whose magnitude lies in the band [beta, beta+alpha) of A's magnitude ranks (the complement "
        "when it wraps past 1); A elsewhere. The result holds only A's values.",
    ),
    "distribution-crossover": Operator(
        _meh.distribution_crossover, "abc",
        (_alpha_option("crossover frequency (fraction of the spectrum) below which A is kept"),
         _beta_option("width of the crossover (<= 1e-10: a hard step)"), WEIGHTS_CLIP),
        summary="FFT crossover of A and B sorted by C",
        description="sd-meh distribution_crossover: A and B are sorted by C's values, their real FFTs mixed "
        "(low frequencies from A, high from B; filter clip((k/m - alpha)/beta + 1/2, 0, 1)), transformed back and "
        "unsorted.",
        input_help={"C": "model whose value order A and B are sorted by"},
    ),
    "ties-add-difference": Operator(
        _meh.ties_add_difference, "abc",
        (_alpha_option("strength of the merged difference"),
         OperatorOption("beta", float, _REQUIRED, "kept fraction of each difference, by magnitude", low=0.0,
                        high=1.0),
         WEIGHTS_CLIP),
        summary="C + alpha*TIES(top-beta(A-C), top-beta(B-C))",
        description="sd-meh ties_add_difference: keep the top --beta fraction (by magnitude) of A - C and of "
        "B - C, elect the sign by vote count (a conflict zeroes the entry), average the agreeing entries, add "
        "alpha times that to C.",
        input_help={"C": "base model both differences are taken from"},
    ),
    "rotate": Operator(
        _meh.rotate, "ab",
        (_alpha_option("fraction of the rotation of A's neurons onto B's (1: all of it; integers: its powers)"),
         _beta_option("interpolation of the neurons toward B's, rotated into A's frame"), WEIGHTS_CLIP),
        summary="A's neurons turned toward B's by alpha of their Procrustes rotation",
        description="sd-meh rotate (orthogonal Procrustes): the rows of A and B (centred) give the rotation R "
        "= U V^T of the SVD of A^T B; result lerp(A, B R^T, beta) R^alpha + lerp(mean A, mean B, alpha), the "
        "fractional power by eigendecomposition. 1-d tensors and single rows: lerp(A, B, alpha); k x k "
        "convolutions (k > 1) and A ~ B: lerp(A, B, beta). Costs O(d^3) per tensor (d = row width).",
    ),
})
