"""peft LoHa / LoKr adapters (``LoHaConfig`` / ``LoKrConfig``): ``adapter_model.safetensors`` + ``adapter_config.json``.

peft stores LyCORIS' tensors under LyCORIS' names and layouts, ``base_model.model.<layer>.hada_w1_a``
/ ``.lokr_w1`` ... (the adapter name dropped), and keeps the scale in the config:

    scale = alpha / r          alpha, r: ``alpha`` / ``r`` of the config, or its ``alpha_pattern`` /
                               ``rank_pattern`` entry for the layer (peft's pattern rule)

The canonical state is LyCORIS', whose scale is ``alpha / r`` with ``r`` read from the shapes
(``hada_w1_b.shape[0]``, ``lokr_w*_b.shape[0]``), which is peft's ``r`` for every LoHa and for every
LoKr with a decomposed factor; so ``alpha`` becomes a tensor and nothing else changes. One
difference (docs/lycoris.md): a LoKr whose two factors are both full has no rank in LyCORIS and scale
1, while peft keeps ``alpha / r``; that scale is folded into ``lokr_w2`` (``alpha = r`` is written, as
LyCORIS does), so the delta is peft's exactly.

Writing (:func:`to_peft_lycoris`, used by :func:`sdadapt.formats.save_peft`) is the inverse: the tensors
keep their names and bits, each layer's ``alpha`` goes to ``alpha``/``alpha_pattern`` and its rank to
``r``/``rank_pattern``. peft does not read the layout from the file; it rebuilds every layer from the
config and the base layer (``update_layer``), so the writer picks the one config that rebuilds exactly
the tensors of the state, and refuses (naming the layer) what no config can:

* LoHa: ``use_effective_conv2d`` (one switch) gives Tucker cores to every kxk convolution, to no other
  layer; ``hada_w1_b`` and ``hada_w2_b`` share one rank.
* LoKr: the Kronecker split ``out = a·b``, ``in = c·d`` is peft's ``factorization(dim, decompose_factor)``
  (one factor for all layers; a factor dividing ``dim`` is taken unsorted, unlike LyCORIS); ``w2`` is
  decomposed iff r < max(b, d)/2, ``w1`` iff ``decompose_both`` and r < max(a, c)/2; Tucker (``lokr_t2``)
  iff ``use_effective_conv2d`` on a kxk convolution with decomposed ``w2``. A layer with both factors
  full gets an r that keeps them full and ``alpha = r`` (scale 1, LyCORIS' scale).
* LoKr whose ``lokr_w1_b`` and ``lokr_w2_b`` ranks r1 ≠ r2 differ (A1111 and ComfyUI load such files, scale
  ``alpha / r2``; peft's ``update_layer`` gives both pairs the layer's one ``r``): written at ``r = max(r1, r2)``
  with ``alpha · r / r2``. Each factor takes the form peft builds at that r: a pair peft keeps is zero-padded
  to rank r (the product and the stored entries unchanged, bit for bit), a factor peft keeps full is written
  as the pair's product (computed in float64, rounded once to the tensor's dtype). Without ``model``, a flat
  ``w2`` that peft keeps full is refused (its kernel is unknown).

Which layers are kxk convolutions the flattened factors (``hada_w*_b`` (r, in·kh·kw), ``lokr_w2_b``
(r, d·kh·kw)) do not show. Given ``model``, the writer reads each layer's weight shape from it and the
check is exact. Without it, a flat layer passes when peft rebuilds its tensors for a linear layer or for
a k×k convolution (k = 3, 5, 7) its width allows: exact for every state made by LyCORIS' rules (sdadapt,
LyCORIS, peft), which give each layer the layout peft gives it; pass ``model`` for a hand-made state.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..patterns import own_pattern_entries, peft_pattern_value
from .files import WeightFileError

__all__ = ["PEFT_LYCORIS_TYPES", "from_peft_lycoris", "is_peft_lycoris", "lycoris_family", "to_peft_lycoris"]

#: peft_type -> the tensor names its layers hold.
PEFT_LYCORIS_TYPES = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_PREFIX = "base_model.model."


def is_peft_lycoris(state: Mapping[str, Tensor], config: Mapping | None = None) -> bool:
    """Whether a peft adapter state (+ config) is LoHa or LoKr (``peft_type`` or its tensor names)."""
    if config and isinstance(config, Mapping) and config.get("peft_type") in PEFT_LYCORIS_TYPES:
        return True
    names = {name for names in PEFT_LYCORIS_TYPES.values() for name in names}
    return bool(state) and all(key.rsplit(".", 1)[-1] in names for key in state)


def _number(value: object, *, source: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise WeightFileError(f"{source}: {what} must be a finite number, got {str(value)[:60]!r}")
    return float(value)


def from_peft_lycoris(state: Mapping[str, Tensor], config: Mapping | None, *, source: str = "<state>") -> dict[str, Tensor]:
    """peft LoHa/LoKr state + config -> canonical LyCORIS state ``{"<layer>.<tensor>": tensor}`` with alphas.

    Raises:
        WeightFileError: keys that are not of the family, or a config whose numbers are not numbers.
    """
    config = dict(config or {})
    names = {name for names in PEFT_LYCORIS_TYPES.values() for name in names}
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        rest = key.removeprefix(_PREFIX)
        layer, _, tensor = rest.rpartition(".")
        if not layer or tensor not in names:
            raise WeightFileError(f"{source}: {key!r} is not a peft LoHa/LoKr tensor ({', '.join(sorted(names))})")
        layers.setdefault(layer, {})[tensor] = value
    out: dict[str, Tensor] = {}
    for layer, tensors in layers.items():
        rank = _number(peft_pattern_value(config.get("rank_pattern") or {}, layer, config.get("r", 8),
                                          what=f"{source}: rank_pattern"), source=source, what=f"the rank of {layer}")
        alpha = _number(peft_pattern_value(config.get("alpha_pattern") or {}, layer, config.get("alpha", rank),
                                           what=f"{source}: alpha_pattern"), source=source, what=f"the alpha of {layer}")
        tensors = dict(tensors)
        if alpha == 0:  # peft's scale alpha / r = 0: the layer adds nothing (LyCORIS reads alpha 0 as alpha = r)
            first = next(name for name in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if name in tensors)
            tensors[first] = torch.zeros_like(tensors[first])  # (a factor of the product / Kronecker product)
            alpha = rank
        if "lokr_w1" in tensors and "lokr_w2" in tensors:  # both full: LyCORIS' scale is 1, peft's alpha / r
            tensors["lokr_w2"] = (tensors["lokr_w2"].double() * (alpha / rank)).to(tensors["lokr_w2"].dtype)
            alpha = rank
        for name, value in tensors.items():
            out[f"{layer}.{name}"] = value
        out[f"{layer}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------------------- writing
_KERNELS = (3, 5, 7)  # square kernels a flattened factor's width may hide (without `model`)
_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr"}


def lycoris_family(state: Mapping[str, Tensor]) -> str | None:
    """``"LOHA"`` / ``"LOKR"`` when some layer of the canonical ``state`` holds LoHa / LoKr tensors, else None."""
    for key in state:
        tensor = key.rsplit(".", 1)[-1]
        for peft_type, names in PEFT_LYCORIS_TYPES.items():
            if tensor in names:
                return peft_type
    return None


def _peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """peft's ``lokr.layer.factorization``: a positive factor dividing ``dimension`` is returned as
    ``(factor, dimension / factor)`` unsorted; otherwise the most square split ``m ≤ n`` with ``m ≤ factor``."""
    from ..adapters.lokr import factorization

    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)  # (same loop and final sort as peft's)


def _peft_loha_shapes(weight: tuple[int, ...], r: int, effective: bool) -> dict[str, tuple[int, ...]]:
    """The tensors peft's ``LoHaLayer.update_layer`` builds for a base weight (out, in[, kh, kw])."""
    out_f, in_f, kernel = weight[0], weight[1], weight[2:]
    if len(kernel) == 2 and effective and kernel != (1, 1):
        core = (r, r, *kernel)
        return {"hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f), "hada_w2_a": (r, out_f), "hada_w2_b": (r, in_f),
                "hada_t1": core, "hada_t2": core}
    flat = in_f * math.prod(kernel)
    return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_f, r), "hada_w2_b": (r, flat)}


def _peft_lokr_shapes(weight: tuple[int, ...], r: int, *, factor: int, decompose_both: bool,
                      effective: bool) -> dict[str, tuple[int, ...]]:
    """The tensors peft's ``LoKrLayer.update_layer`` builds for a base weight (out, in[, kh, kw])."""
    kernel = weight[2:]
    a, b = _peft_factorization(weight[0], factor)
    c, d = _peft_factorization(weight[1], factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r), (r, c)
    else:
        shapes["lokr_w1"] = (a, c)
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif len(kernel) == 2 and effective and kernel != (1, 1):
        shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, r, *kernel), (r, b), (r, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
    return shapes


def _rank(family: str, tensors: Mapping[str, Tensor], layer: str) -> int | None:
    """The layer's rank from its shapes (None: a LoKr with both factors full); a LoKr whose ``lokr_w1_b`` and
    ``lokr_w2_b`` ranks differ gets the larger (:func:`_mixed_lokr_ranks`)."""
    if family == "LOHA":
        ranks = {int(tensors[k].shape[0]) for k in ("hada_w1_b", "hada_w2_b") if k in tensors}
        if len(ranks) != 1:
            raise ValueError(f"{layer}: LoHa hada_w1_b and hada_w2_b have ranks {sorted(ranks)}; peft's LoHaConfig "
                             "gives both halves one rank. Save it as a kohya/LyCORIS file (format='kohya') instead.")
        return ranks.pop()
    ranks = {int(tensors[k].shape[0]) for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors}
    return max(ranks) if ranks else None


def _mixed_lokr_ranks(tensors: Mapping[str, Tensor]) -> tuple[int, int] | None:
    """``(r1, r2)``, the ranks of ``lokr_w1_b`` and ``lokr_w2_b`` when a LoKr layer has both and they differ
    (A1111 and ComfyUI load such a file, its scale ``alpha / r2``), else None."""
    if "lokr_w1_b" not in tensors or "lokr_w2_b" not in tensors:
        return None
    r1, r2 = int(tensors["lokr_w1_b"].shape[0]), int(tensors["lokr_w2_b"].shape[0])
    return (r1, r2) if r1 != r2 else None


def _pad_rank(tensor: Tensor, dims: tuple[int, ...], rank: int) -> Tensor:
    """``tensor`` with zeros appended along ``dims`` up to ``rank`` (the rank axes of a low-rank factor): the
    product it enters is unchanged, its own entries keep their bits."""
    for dim in dims:
        missing = rank - tensor.shape[dim]
        if missing:
            shape = list(tensor.shape)
            shape[dim] = missing
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    return tensor


def _fit_mixed_lokr(tensors: Mapping[str, Tensor], weight: tuple[int, ...],
                    built: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor] | None:
    """A LoKr layer whose ``lokr_w1_b`` / ``lokr_w2_b`` ranks differ, in the tensors peft builds for it (``built``,
    at one r ≥ both ranks, for a base weight of shape ``weight``), with the same Kronecker product: a factor peft
    keeps as a low-rank pair is the layer's pair with zero rows/columns appended up to r (its entries' bits kept);
    a factor peft keeps full is the layer's product (float64, rounded once to the layer's dtype). None when peft
    builds another split or another form of ``w2`` (a Tucker core for a flat pair, or the reverse)."""
    from ..adapters.base import LayerGeometry
    from ..adapters.lokr import LoKrModule

    factors = {name: value for name, value in tensors.items() if name != "alpha"}
    dtype = factors["lokr_w1_b"].dtype
    try:
        module = LoKrModule.from_file_tensors(LayerGeometry.from_weight_shape(weight),
                                              {k: v.double() for k, v in factors.items()}, name="<mixed>")
    except ValueError:  # (the tensors do not fit this reading of the base weight)
        return None
    with torch.no_grad():
        w1, w2 = module.factors()  # (a, c), (b, d, *k): float64
    out: dict[str, Tensor] = {}
    if "lokr_w1" in built:
        out["lokr_w1"] = w1.to(dtype)  # (a, c)
    elif "lokr_w1_a" in built:
        r = built["lokr_w1_a"][1]
        out["lokr_w1_a"] = _pad_rank(factors["lokr_w1_a"], (1,), r)  # (a, r1) -> (a, r)
        out["lokr_w1_b"] = _pad_rank(factors["lokr_w1_b"], (0,), r)  # (r1, c) -> (r, c)
    if "lokr_w2" in built:
        out["lokr_w2"] = w2.to(dtype)  # (b, d, *k)
    elif "lokr_t2" in built and "lokr_t2" in factors:
        r = built["lokr_t2"][0]
        out["lokr_t2"] = _pad_rank(factors["lokr_t2"], (0, 1), r)  # (r2, r2, kh, kw) -> (r, r, kh, kw)
        out["lokr_w2_a"] = _pad_rank(factors["lokr_w2_a"], (0,), r)  # (r2, b) -> (r, b)
        out["lokr_w2_b"] = _pad_rank(factors["lokr_w2_b"], (0,), r)  # (r2, d) -> (r, d)
    elif "lokr_w2_a" in built and "lokr_t2" not in built and "lokr_t2" not in factors:
        r = built["lokr_w2_a"][1]
        out["lokr_w2_a"] = _pad_rank(factors["lokr_w2_a"], (1,), r)  # (b, r2) -> (b, r)
        out["lokr_w2_b"] = _pad_rank(factors["lokr_w2_b"], (0,), r)  # (r2, d·kh·kw) -> (r, d·kh·kw)
    return out if _shapes_of(out) == dict(built) else None


def _weights_from_tensors(family: str, tensors: Mapping[str, Tensor]) -> list[tuple[int, ...]]:
    """The base weight shapes a layer's tensors may belong to: one where they show the kernel, else the
    linear reading first and each k×k convolution the flattened width allows."""
    if family == "LOHA":
        if "hada_t1" in tensors:
            return [(int(tensors["hada_w1_a"].shape[1]), int(tensors["hada_w1_b"].shape[1]),
                     *tensors["hada_t1"].shape[2:])]
        out_f, width = int(tensors["hada_w1_a"].shape[0]), int(tensors["hada_w1_b"].shape[1])
        return [(out_f, width)] + [(out_f, width // (k * k), k, k) for k in _KERNELS if width % (k * k) == 0]
    if "lokr_w1" in tensors:
        a, c = (int(n) for n in tensors["lokr_w1"].shape[:2])
    else:
        a, c = int(tensors["lokr_w1_a"].shape[0]), int(tensors["lokr_w1_b"].shape[1])
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
        return [(a * int(w2.shape[0]), c * int(w2.shape[1]), *w2.shape[2:])]
    if "lokr_t2" in tensors:
        return [(a * int(tensors["lokr_w2_a"].shape[1]), c * int(tensors["lokr_w2_b"].shape[1]),
                 *tensors["lokr_t2"].shape[2:])]
    b, width = int(tensors["lokr_w2_a"].shape[0]), int(tensors["lokr_w2_b"].shape[1])
    return [(a * b, c * width)] + [(a * b, c * (width // (k * k)), k, k) for k in _KERNELS if width % (k * k) == 0]


def _weights_from_model(model: nn.Module, layers: list[str]) -> dict[str, list[tuple[int, ...]]]:
    from .layers import resolve_layers

    placed = resolve_layers(model, layers)
    out = {}
    for layer, live in placed.items():
        weight = getattr(model.get_submodule(live), "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
            raise ValueError(f"{layer}: the model's {live} is not a Linear or Conv2d layer; peft's LoHa/LoKr "
                             "adapt those")
        out[layer] = [tuple(int(n) for n in weight.shape)]
    return out


def _shapes_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(n) for n in value.shape) for name, value in tensors.items() if name != "alpha"}


def _misfits(family: str, layers: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, list[tuple[int, ...]]],
             ranks: Mapping[str, int], options: Mapping[str, object]) -> list[str]:
    """Each layer for which peft, under ``options`` and the ranks, builds other tensors for every weight shape
    the layer may have, with what it would build for the first."""
    bad = []
    for layer, tensors in layers.items():
        have = _shapes_of(tensors)
        builds = []
        for weight in weights[layer]:  # (the layer's weight shape; without a model, each reading of the tensors)
            if family == "LOHA":
                built = _peft_loha_shapes(weight, ranks[layer], bool(options["use_effective_conv2d"]))
            else:
                built = _peft_lokr_shapes(weight, ranks[layer], factor=int(options["decompose_factor"]),
                                          decompose_both=bool(options["decompose_both"]),
                                          effective=bool(options["use_effective_conv2d"]))
            builds.append((weight, built))
        if all(built != have for _, built in builds):
            weight, built = builds[0]
            bad.append(f"{layer}: the file has {have}; for a base weight {weight} and r={ranks[layer]} peft "
                       f"would build {built}")
    return bad


def _free_rank(weights: list[tuple[int, ...]], *, factor: int, decompose_both: bool, preferred: int) -> int:
    """An r that keeps both LoKr factors full for the layer's weight (``preferred`` when it does)."""
    need = 1
    for weight in weights[:1]:  # (a full lokr_w2 shows the kernel: one reading)
        a, b = _peft_factorization(weight[0], factor)
        c, d = _peft_factorization(weight[1], factor)
        need = max(need, math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1)
    return preferred if preferred >= need else need


def _number_or_int(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def to_peft_lycoris(state: Mapping[str, Tensor], *, model: nn.Module | None = None) -> tuple[dict[str, Tensor], dict]:
    """Canonical LoHa or LoKr state (``<layer>.hada_w1_a`` ... / ``<layer>.lokr_w1`` ..., ``<layer>.alpha``) ->
    (peft state ``base_model.model.<layer>.<tensor>``, ``adapter_config.json`` dict of a ``LoHaConfig`` /
    ``LoKrConfig``) from which peft rebuilds exactly these tensors and scales (``alpha / r`` per layer).

    Args:
        state: one model's layers, all LoHa or all LoKr (LyCORIS tensor names and layouts).
        model: the model the adapter is for (optional): each layer's base weight shape is read from it
            instead of guessed from the tensors (see the module docs).

    Raises:
        ValueError: a layer of another family, or one no peft config rebuilds (the message names the layer,
            what peft would build, and the fix).
    """
    family = lycoris_family(state)
    if family is None:
        raise ValueError("to_peft_lycoris: the state holds no LoHa (hada_*) or LoKr (lokr_*) tensors")
    own = set(PEFT_LYCORIS_TYPES[family])
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        layer, _, tensor = key.rpartition(".")
        if not layer or (tensor not in own and tensor != "alpha"):
            raise ValueError(
                f"{key}: a peft {_NAMES[family]} adapter holds only {_NAMES[family]} tensors "
                f"({', '.join(sorted(own))}, alpha), not {tensor!r}; peft adapters hold one family: save mixed "
                "adapters as kohya/LyCORIS files (format='kohya')")
        layers.setdefault(layer, {})[tensor] = value
    for layer, tensors in layers.items():
        if not set(tensors) - {"alpha"}:
            raise ValueError(f"{layer}: an alpha without {_NAMES[family]} tensors")
        if family == "LOHA" and not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(tensors):
            raise ValueError(f"{layer}: LoHa needs hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b; have {sorted(tensors)}")
        if family == "LOKR" and not (("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= set(tensors))
                                     and ("lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= set(tensors))):
            raise ValueError(f"{layer}: LoKr needs lokr_w1 or (lokr_w1_a, lokr_w1_b), and lokr_w2 or "
                             f"(lokr_w2_a, lokr_w2_b[, lokr_t2]); have {sorted(tensors)}")
    weights = _weights_from_model(model, list(layers)) if model is not None else {
        layer: _weights_from_tensors(family, tensors) for layer, tensors in layers.items()}
    fixed = {layer: rank for layer in layers if (rank := _rank(family, layers[layer], layer)) is not None}
    mixed = {layer: ranks for layer in layers
             if family == "LOKR" and (ranks := _mixed_lokr_ranks(layers[layer])) is not None}
    r = Counter(fixed.values()).most_common(1)[0][0] if fixed else 8
    tucker = any(name in tensors for tensors in layers.values() for name in ("hada_t1", "lokr_t2"))
    options: dict[str, object] = {"use_effective_conv2d": tucker}
    candidates: list[dict[str, object]] = [options]
    if family == "LOKR":
        decompose_both = any("lokr_w1_a" in tensors for tensors in layers.values())
        sizes = sorted({int(t[name].shape[axis]) for t in layers.values()  # (a, c: w1's sides, peft's factor)
                        for name, axis in (("lokr_w1", 0), ("lokr_w1", 1), ("lokr_w1_a", 0), ("lokr_w1_b", 1))
                        if name in t} - {1})
        both_options = (decompose_both, not decompose_both) if mixed else (decompose_both,)  # (mixed: w1 fits both)
        candidates = [{**options, "decompose_both": both, "decompose_factor": f}
                      for both in both_options for f in (-1, *sizes)]
    misfits: list[str] = []
    ambiguous = ""  # (a mixed-rank layer peft makes full without a model to tell its kernel)
    for chosen in candidates:
        ranks = dict(fixed)
        for layer in layers.keys() - fixed.keys():  # LoKr, both factors full: an r that keeps them so
            ranks[layer] = _free_rank(weights[layer], factor=int(chosen["decompose_factor"]),
                                      decompose_both=bool(chosen["decompose_both"]), preferred=r)
        trial = dict(layers)
        for layer in mixed:  # w1_b / w2_b ranks differ: the tensors peft builds at r = the larger rank, if any
            fits = []
            for weight in weights[layer]:
                built = _peft_lokr_shapes(weight, ranks[layer], factor=int(chosen["decompose_factor"]),
                                          decompose_both=bool(chosen["decompose_both"]),
                                          effective=bool(chosen["use_effective_conv2d"]))
                if (fitted := _fit_mixed_lokr(layers[layer], weight, built)) is not None:
                    fits.append(fitted)
            if len({tuple(sorted(_shapes_of(f).items())) for f in fits}) > 1:  # (w2 made full: which kernel?)
                ambiguous = ambiguous or (
                    f"{layer}: its lokr_w1_b / lokr_w2_b ranks {list(mixed[layer])} differ, and at the one rank "
                    f"peft's LoKrConfig gives a layer (r={ranks[layer]}) peft keeps w2 full, whose shape depends on "
                    "whether the layer is a Linear or a convolution, which its flattened lokr_w2_b does not show: "
                    "pass model= (save_peft(folder, state, model=unet)), or save it as a kohya/LyCORIS file "
                    "(format='kohya')")
            elif fits:
                trial[layer] = {**fits[0], **({"alpha": layers[layer]["alpha"]} if "alpha" in layers[layer] else {})}
        found = _misfits(family, trial, weights, ranks, chosen)
        if not found:
            layers = trial
            break
        misfits = misfits or found  # (the first candidate's, peft's default factor: the clearest message)
    else:
        if ambiguous:
            raise ValueError(ambiguous)
        hint = "" if model is not None else (" If the tensors were read for the wrong kind of layer (a flattened "
                                             "convolution), pass model= (save_peft(folder, state, model=unet)).")
        raise ValueError(
            f"peft's {_NAMES[family]}Config cannot rebuild {len(misfits)} layer(s) of this adapter (peft derives "
            f"every layer's tensors from one config and the base layer), e.g. {misfits[0]}. Save it as a "
            f"kohya/LyCORIS file (format='kohya') instead.{hint}")
    alphas = {}
    for layer, tensors in layers.items():
        alpha = tensors.get("alpha")
        value = float(alpha) if alpha is not None and alpha.numel() == 1 else 0.0
        scale_rank = mixed[layer][1] if layer in mixed else ranks[layer]  # (mixed: alpha / r2, A1111's and ComfyUI's)
        if layer not in fixed or value == 0.0 or not math.isfinite(value):  # both full: scale 1; no alpha: alpha = r
            if alpha is not None and alpha.numel() != 1:
                raise ValueError(f"{layer}: alpha has {alpha.numel()} values, not one")
            if layer in fixed and not math.isfinite(value):
                raise ValueError(f"{layer}: alpha is {value}; the adapter is broken")
            value = float(scale_rank)
        if layer in mixed:  # peft's alpha' / r is the file's alpha / r2
            value = value * ranks[layer] / scale_rank
        alphas[layer] = value
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    peft_state = {f"{_PREFIX}{layer}.{name}": value for layer, tensors in layers.items()
                  for name, value in tensors.items() if name != "alpha"}
    config: dict[str, object] = {
        "peft_type": family, "task_type": None, "base_model_name_or_path": None,
        "r": r, "alpha": _number_or_int(alpha),
        "rank_pattern": own_pattern_entries(ranks, r),
        "alpha_pattern": {layer: _number_or_int(value) for layer, value in own_pattern_entries(alphas, alpha).items()},
        "target_modules": sorted(layers), "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
        **chosen,
    }
    if family == "LOKR":
        config["rank_dropout_scale"] = False
    return peft_state, config
