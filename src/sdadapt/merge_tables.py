"""The merge operators' declarations — names, inputs, options, help text, defaults — without torch.

``python -m sdadapt merge`` builds one sub-command per entry of :data:`OPERATOR_SPECS` (its inputs, its options'
flags, types, defaults and ranges, its ``--help`` text), so ``merge --help``, each operator's ``--help`` and usage
errors import no torch (tests/test_merge_help.py). This is their one home: :mod:`sdadapt.merge.operators` binds
each spec to its function by name (``OPERATORS[name] = Operator.bind(OPERATOR_SPECS[name], fn, ...)``) and
re-exports :class:`OperatorOption`, :data:`REQUIRED`, :data:`STEP_FIELDS`, :data:`ENGINE_OPTIONS`,
:data:`MAX_MERGE_STRENGTH` and :data:`WEIGHTS_CLIP` under the names they always had. An operator registered at
run time (``OPERATORS[name] = Operator(...)``) is not here; the command line reads the registry itself once
:mod:`sdadapt.merge.operators` is imported (:func:`sdadapt.cli.merge.declarations`).

The formulas and which tool each operator follows are in :mod:`sdadapt.merge.operators` (and
:mod:`sdadapt.merge.supermerger_modes`, :mod:`sdadapt.merge.meh_modes`) and docs/merge.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

__all__ = [
    "ENGINE_OPTIONS",
    "INPUT_NAMES",
    "MAX_MERGE_STRENGTH",
    "OPERATOR_SPECS",
    "REQUIRED",
    "STEP_FIELDS",
    "WEIGHTS_CLIP",
    "OperatorDeclaration",
    "OperatorOption",
    "OperatorSpec",
]

#: the largest |alpha|, |lam| and |weight| a merge accepts: beyond it the result is no model, and
#: float16 outputs overflow
MAX_MERGE_STRENGTH = 100.0

#: the option names that are :class:`~sdadapt.merge.recipe.MergeStep` fields rather than entries of
#: ``MergeStep.options``: the engine turns ``alpha`` / ``weights`` into the operator's ``weights``
#: argument and ``seed`` into per-key generators; every other option is a keyword of ``fn``
STEP_FIELDS: frozenset[str] = frozenset({"alpha", "weights", "seed"})

#: keyword options the engine applies around ``fn`` instead of passing them to it: ``weights_clip``
#: clamps each merged value to ``[min(A, B), max(A, B)]`` of the first two inputs (sd-meh's rule)
ENGINE_OPTIONS: frozenset[str] = frozenset({"weights_clip"})

#: an operator's ``inputs`` -> its inputs' names on the command line (``MODEL`` repeats)
INPUT_NAMES: dict[str, tuple[str, ...]] = {"a": ("A",), "ab": ("A", "B"), "abc": ("A", "B", "C"),
                                           "base+models": ("BASE", "MODEL")}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


_REQUIRED: Any = _Required()

#: :attr:`OperatorOption.default` of an option that must be given
REQUIRED: Any = _REQUIRED


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


class OperatorDeclaration:
    """What an operator's declaration answers, from its ``inputs`` and ``options`` attributes: shared by the
    torch-free :class:`OperatorSpec` and the registry's :class:`~sdadapt.merge.operators.Operator` (the spec bound
    to its function), so the command line reads either the same way."""

    __slots__ = ()
    inputs: str
    options: tuple[OperatorOption, ...]

    def __post_init__(self) -> None:  # (the dataclasses' __init__ calls it: the spec's and the registry's alike)
        if self.inputs not in INPUT_NAMES:
            raise ValueError(f"Operator.inputs must be one of {', '.join(INPUT_NAMES)}, got {self.inputs!r}")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"Operator options repeat a name: {names}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """``("A",)``, ``("A", "B")``, ``("A", "B", "C")`` or ``("BASE", "MODEL")`` (MODEL repeats)."""
        return INPUT_NAMES[self.inputs]

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
        """The declared option ``name``; ``KeyError`` otherwise."""
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)


@dataclass(frozen=True)
class OperatorSpec(OperatorDeclaration):
    """A built-in operator's declaration without its function: everything the ``merge`` sub-command, recipe
    validation and the engine's input handling read (the fields of :class:`~sdadapt.merge.operators.Operator`
    that are not code).

    Attributes:
        inputs: how to read the input list: ``"a"`` (A alone), ``"ab"`` (A, B), ``"abc"`` (A, B, base=C) or
            ``"base+models"`` (BASE first, then ≥ ``min_models`` MODELs).
        options: every setting it takes (:class:`OperatorOption`): ``alpha`` / ``weights`` / ``seed``
            (:data:`STEP_FIELDS`) and the keyword options of its function. Anything else is refused.
        min_models: fewest fine-tuned models for ``"base+models"``.
        summary: one line for the command list.
        description: the formula and what the options do (the command's ``--help``).
        input_help: ``{input name: help}`` where an input means something else than usual
            (C of Triple sum is a third model, not the base of a difference).
    """

    inputs: str
    options: tuple[OperatorOption, ...] = ()
    min_models: int = 1
    summary: str = ""
    description: str = ""
    input_help: Mapping[str, str] | None = None


# --------------------------------------------------------------------------------------------
# the options several operators share


def _alpha_option(help_text: str, default: Any = _REQUIRED) -> OperatorOption:
    return OperatorOption("alpha", float, default, help_text, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)


def _beta_option(help_text: str) -> OperatorOption:
    return OperatorOption("beta", float, _REQUIRED, help_text, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)


def _unit_alpha(help_text: str) -> OperatorOption:
    return OperatorOption("alpha", float, _REQUIRED, help_text, low=0.0, high=1.0)


_LAM = OperatorOption("lam", float, 1.0, "scale of the merged task vector", low=-MAX_MERGE_STRENGTH,
                      high=MAX_MERGE_STRENGTH)
_WEIGHTS = OperatorOption("weights", float, None, "one weight per MODEL, comma-separated (default 1 each)",
                          per_model=True, low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)

#: sd-meh's weights_clip, an option of the two- and three-model operators (applied by the engine)
WEIGHTS_CLIP = OperatorOption("weights_clip", bool, False,
                              "clamp each merged value to [min(A, B), max(A, B)] (sd-meh's weights_clip)")


def _cosine_spec(normalize: bool) -> OperatorSpec:
    letter = "A" if normalize else "B"
    return OperatorSpec(
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
    )


_THIRD_MODEL = {"C": "third model"}

# --------------------------------------------------------------------------------------------
# the built-in operators, in the order of ``merge --help``

#: every built-in operator's declaration by name: the two- and three-model operators and the task-vector ones
#: (:mod:`sdadapt.merge.operators`), supermerger's modes (:mod:`sdadapt.merge.supermerger_modes`), sd-meh's
#: methods (:mod:`sdadapt.merge.meh_modes`)
OPERATOR_SPECS: dict[str, OperatorSpec] = {
    "weighted-sum": OperatorSpec(
        "ab", (_alpha_option("weight of B: 0 gives A, 1 gives B"), WEIGHTS_CLIP),
        summary="(1-alpha)*A + alpha*B",
        description="A1111 weighted sum: (1 - alpha)*A + alpha*B; alpha is B's weight (0 gives A back, 1 gives B).",
    ),
    "slerp": OperatorSpec(
        "ab", (_alpha_option("interpolation point: 0 = A, 1 = B"), WEIGHTS_CLIP),
        summary="spherical interpolation of A and B",
        description="Spherical interpolation per tensor (lerp when nearly parallel); alpha 0 = A, 1 = B.",
    ),
    "add-difference": OperatorSpec(
        "abc", (_alpha_option("strength of B - C", 1.0), WEIGHTS_CLIP),
        summary="A + alpha*(B - C)",
        description="A1111 add difference: A + alpha*(B - C). Inpainting recipe: A = sd15-inpainting, B = your "
        "model, C = sd15, alpha 1.",
    ),
    "difference": OperatorSpec(
        "ab", (_alpha_option("scale of A - B", 1.0), WEIGHTS_CLIP),
        summary="alpha*(A - B)",
        description="ComfyUI's ModelSubtract: alpha*(A - B), a difference saved as its own file (add it to another "
        "model later with add); with --components unet the other parts are A's, as ComfyUI's Save Checkpoint wires "
        "them.",
    ),
    "add": OperatorSpec(
        "ab", (_alpha_option("scale of B", 1.0), WEIGHTS_CLIP),
        summary="A + alpha*B",
        description="ComfyUI's ModelAdd (alpha 1): A + alpha*B, e.g. B a difference file made with difference.",
    ),
    "train-difference": OperatorSpec(
        "abc", (_alpha_option("strength of B - C", 1.0), WEIGHTS_CLIP),
        summary="A + 1.8*alpha*w*(B - C)",
        description="supermerger train difference: the B - C difference scaled per element by "
        "|B - A| / (|B - C| + |B - A|).",
    ),
    "task-arithmetic": OperatorSpec(
        "base+models", (_LAM, _WEIGHTS),
        summary="BASE + lam*sum(w_i*(M_i - BASE))",
        description="Task arithmetic: add the weighted task vectors (MODEL - BASE) to BASE.",
    ),
    "ties": OperatorSpec(
        "base+models",
        (OperatorOption("density", float, 0.2, "kept fraction of each task vector, by magnitude", low=0.0, high=1.0), _LAM, _WEIGHTS,
         OperatorOption("normalize", bool, True, "average the agreeing entries (TIES' disjoint mean); "
                        "--no-normalize sums them")),
        summary="TIES: trim, elect sign, disjoint mean",
        description="TIES-merging: trim every task vector (MODEL - BASE) to its top --density by magnitude (paper "
        "default 0.2), elect the sign of their sum, average the agreeing entries, add lam times that to BASE.",
    ),
    "dare": OperatorSpec(
        "base+models",
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
    "model-stock": OperatorSpec(
        "base+models", min_models=2,
        summary="Model Stock: interpolate the mean toward BASE",
        description="Model Stock: t*mean(models) + (1-t)*BASE with t = k*cos/(1+(k-1)*cos) from the angle between "
        "the task vectors, per tensor. Takes no options.",
    ),
    # supermerger's modes
    "triple-sum": OperatorSpec(
        "abc",
        (_alpha_option("weight of B"), _beta_option("weight of C"), WEIGHTS_CLIP),
        summary="(1-alpha-beta)*A + alpha*B + beta*C",
        description="supermerger Triple sum: (1 - alpha - beta)*A + alpha*B + beta*C, computed as "
        "lerp(A, lerp(B, C, beta/(alpha+beta)), alpha+beta) in the compute dtype.",
        input_help=_THIRD_MODEL,
    ),
    "sum-twice": OperatorSpec(
        "abc",
        (_alpha_option("weight of B in the first sum"), _beta_option("weight of C in the second sum"), WEIGHTS_CLIP),
        summary="(1-beta)*((1-alpha)*A + alpha*B) + beta*C",
        description="supermerger sum Twice: (1 - beta)*((1 - alpha)*A + alpha*B) + beta*C.",
        input_help=_THIRD_MODEL,
    ),
    "cosine-a": _cosine_spec(True),
    "cosine-b": _cosine_spec(False),
    "smooth-add": OperatorSpec(
        "abc", (_alpha_option("strength of the smoothed B - C", 1.0), WEIGHTS_CLIP),
        summary="A + alpha*gauss(median(B - C))",
        description="supermerger calcmode smoothAdd: A + alpha*gaussian_filter(median_filter(B - C, size=3), "
        "sigma=1) over each whole N-D tensor (scipy's reflect mode; computed in torch). The smoothed difference is "
        "weaker: supermerger suggests alpha up to 2.",
    ),
    "extract": OperatorSpec(
        "abc",
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
    "tensor": OperatorSpec(
        "ab",
        (_alpha_option("fraction of rows taken from B"), _beta_option("where the slice starts (fraction of rows)")),
        summary="rows [beta*n, (alpha+beta)*n) of A replaced by B's",
        description="supermerger calcmode tensor: no interpolation; rows [int(beta*n), int((alpha+beta)*n)) of "
        "dim 0 come from B, the rest from A; past alpha + beta > 1 it wraps (B with rows "
        "[int((alpha+beta-1)*n), int(beta*n)) from A).",
    ),
    "tensor2": OperatorSpec(
        "ab",
        (_alpha_option("fraction of columns taken from B"), _beta_option("where the slice starts")),
        summary="columns [beta*n, (alpha+beta)*n) of A replaced by B's",
        description="supermerger calcmode tensor2: as tensor, on dim 1 for tensors of 2+ dims (n = shape[1] when "
        "it is larger than 100, else shape[0], as supermerger computes it).",
    ),
    "self": OperatorSpec(
        "a", (_alpha_option("the factor"),),
        summary="A*alpha (supermerger self)",
        description="supermerger calcmode self: every merged key of A times alpha; keys whose LDM name contains "
        "to_out, proj_out or norm keep A, and alpha 0 keeps A (supermerger skips both).",
    ),
    "plus-random": OperatorSpec(
        "a",
        (_alpha_option("scale of the N(0, 1) noise"),
         OperatorOption("seed", int, 0, "merge seed; recorded in the file", low=0, high=2**63 - 1)),
        summary="A + alpha*N(0,1) (supermerger plus random)",
        description="supermerger calcmode plus random: A + alpha*N(0, 1) per element, keys whose LDM name contains "
        "to_out, proj_out or norm keep A. The noise is seeded per key from --seed (supermerger uses torch's global RNG, "
        "which no seed reproduces).",
    ),
    # sd-meh's merge methods
    "weighted-subtraction": OperatorSpec(
        "ab",
        (_alpha_option("alpha of alpha*beta, the share of B taken out"), _beta_option("beta of alpha*beta"),
         WEIGHTS_CLIP),
        summary="(A - alpha*beta*B)/(1 - alpha*beta)",
        description="sd-meh weighted_subtraction: (A - alpha*beta*B)/(1 - alpha*beta), the weighted sum solved for "
        "its other input (beta is nudged by 1e-10 when alpha*beta = 1, as sd-meh does for alpha = beta = 1).",
    ),
    "euclidean-add-difference": OperatorSpec(
        "abc",
        (_unit_alpha("weight of B: 0 gives A, 1 gives B"), WEIGHTS_CLIP),
        summary="C + the RMS of the normalised A-C, B-C, at the norm of lerp(A, B, alpha) - C",
        description="sd-meh euclidean_add_difference: d = sqrt((1-alpha)*a^2 + alpha*b^2) with a, b the "
        "differences A - C, B - C divided by their norms, signed like s = lerp(A, B, alpha) - C; result "
        "C + d*|s|/|d| (norms over each tensor).",
        input_help={"C": "base model both differences are taken from"},
    ),
    "multiply-difference": OperatorSpec(
        "abc",
        (_unit_alpha("exponent: |A-C|^(1-alpha) * |B-C|^alpha"),
         _beta_option("sign from lerp(A, B, beta) - C"), WEIGHTS_CLIP),
        summary="C + |A-C|^(1-alpha)*|B-C|^alpha, signed by lerp(A, B, beta) - C",
        description="sd-meh multiply_difference: the weighted geometric mean of the two differences from C, "
        "with the sign of the weighted-sum difference lerp(A, B, beta) - C.",
        input_help={"C": "base model both differences are taken from"},
    ),
    "similarity-add-difference": OperatorSpec(
        "abc",
        (_alpha_option("strength of B - C (and 2x the weight of B where A and B agree)"),
         _beta_option("how far agreement moves toward the weighted sum (similarity scale)"), WEIGHTS_CLIP),
        summary="lerp(A + alpha*(B-C), lerp(A, B, alpha/2), beta*similarity(A, B))",
        description="sd-meh similarity_add_difference: s = beta*(A*B/max(|A|,|B|)^2 + 1)/2 per element; result "
        "(1-s)*(A + alpha*(B - C)) + s*((1-alpha/2)*A + alpha/2*B): add difference where A and B disagree, "
        "weighted sum where they agree.",
    ),
    "top-k-tensor-sum": OperatorSpec(
        "ab",
        (_alpha_option("width of the magnitude band (fraction of the values)"),
         _beta_option("offset of the band (fraction; wraps past 1)"), WEIGHTS_CLIP),
        summary="A's values rearranged in B's order on a band of magnitudes",
        description="sd-meh top_k_tensor_sum: A's sorted values are given to the elements in B's rank order, on "
        "the values whose magnitude lies in the band [beta, beta+alpha) of A's magnitude ranks (the complement "
        "when it wraps past 1); A elsewhere. The result holds only A's values.",
    ),
    "distribution-crossover": OperatorSpec(
        "abc",
        (_alpha_option("crossover frequency (fraction of the spectrum) below which A is kept"),
         _beta_option("width of the crossover (<= 1e-10: a hard step)"), WEIGHTS_CLIP),
        summary="FFT crossover of A and B sorted by C",
        description="sd-meh distribution_crossover: A and B are sorted by C's values, their real FFTs mixed "
        "(low frequencies from A, high from B; filter clip((k/m - alpha)/beta + 1/2, 0, 1)), transformed back and "
        "unsorted.",
        input_help={"C": "model whose value order A and B are sorted by"},
    ),
    "ties-add-difference": OperatorSpec(
        "abc",
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
    "rotate": OperatorSpec(
        "ab",
        (_alpha_option("fraction of the rotation of A's neurons onto B's (1: all of it; integers: its powers)"),
         _beta_option("interpolation of the neurons toward B's, rotated into A's frame"), WEIGHTS_CLIP),
        summary="A's neurons turned toward B's by alpha of their Procrustes rotation",
        description="sd-meh rotate (orthogonal Procrustes): the rows of A and B (centred) give the rotation R "
        "= U V^T of the SVD of A^T B; result lerp(A, B R^T, beta) R^alpha + lerp(mean A, mean B, alpha), the "
        "fractional power by eigendecomposition. 1-d tensors and single rows: lerp(A, B, alpha); k x k "
        "convolutions (k > 1) and A ~ B: lerp(A, B, beta). Costs O(d^3) per tensor (d = row width).",
    ),
}
