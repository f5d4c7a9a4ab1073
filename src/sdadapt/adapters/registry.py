"""Adapter families by name: config type, module type, how to recognise their file tensors.

The injector (:func:`sdadapt.inject`, :func:`sdadapt.load_adapter`), :func:`sdadapt.apply_lora`,
the file formats and ``sdadapt inspect`` all dispatch through here, so a new family is one
:func:`register_family` call. Each family also names a few representative configs
(``examples``): the property suite in ``tests/test_adapter_families.py`` runs over them, so a new
family is tested (identity at init, module == functional, merge/unmerge, save/load) without new
test code.

DoRA is a wrapper: a layer's tensors with ``dora_scale`` are DoRA over the family the remaining
tensors name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry
from .dora import DoRAConfig, DoRAModule
from .full import FullConfig, FullModule
from .glora import GLoRAConfig, GLoRAModule
from .ia3 import IA3Config, IA3Module
from .loha import LoHaConfig, LoHaModule
from .lokr import LoKrConfig, LoKrModule
from .lora import LoRAConfig, LoRAModule
from .norm import NormConfig, NormModule
from .oft import OFTConfig, OFTModule

__all__ = [
    "AdapterFamily",
    "FAMILIES",
    "register_family",
    "family_of_config",
    "family_of_keys",
    "build_adapter",
    "adapter_from_file_tensors",
    "algorithm_of_keys",
    "file_layer_delta",
    "adapter_layer_delta",
    "adapter_working_copy",
    "weight_shape_of_file_tensors",
    "file_keys",
    "file_rank",
    "lycoris_algo_of_keys",
    "scale_file_tensors",
    "unregister_family",
]


@dataclass(frozen=True)
class AdapterFamily:
    """One adapter family: its config, its module, and representative configs.

    The family's file vocabulary lives on its module class (``module_type.file_keys``,
    ``marker_keys``, ``rank_keys``, ``tucker_keys``, ``linear_keys``, ``lycoris_algo``; see
    :class:`~sdadapt.adapters.base.AdapterModule`); recognition, key splitting, kohya metadata,
    ``inspect`` and the LoRA file tools all derive from it, so a new family is one module file
    plus one :func:`register_family` line.

    Attributes:
        name: ``"lora"``, ``"loha"``, ``"lokr"``, ``"full"``, ``"ia3"``, ``"dora"``.
        config_type: its frozen config dataclass.
        module_type: its :class:`AdapterModule` (with ``from_config`` / ``from_file_tensors``).
        examples: representative configs for the property suites and docs.
    """

    name: str
    config_type: type
    module_type: type[AdapterModule]
    examples: tuple = ()

    def recognises(self, keys: set[str]) -> bool:
        """Whether one layer's file keys hold any of this family's marker keys."""
        return not keys.isdisjoint(self.module_type.marker_keys)


#: registered families by name, in recognition order (wrappers such as DoRA first)
FAMILIES: dict[str, AdapterFamily] = {}


def register_family(family: AdapterFamily, *, first: bool = False) -> None:
    """Add (or replace) a family. A wrapper family (``wraps_family``, like DoRA) is put ahead in
    recognition order, so it is recognised before the families it wraps; ``first=True`` does that
    for any family."""
    FAMILIES.pop(family.name, None)
    if first or family.module_type.wraps_family:
        rest = dict(FAMILIES)
        FAMILIES.clear()
        FAMILIES[family.name] = family
        FAMILIES.update(rest)
    else:
        FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Remove a family (tests that register a toy family clean up with this)."""
    FAMILIES.pop(name, None)


#: (the registered families' module types, their file keys sorted): :func:`file_keys` runs once per key of a file
_file_keys_cache: tuple[tuple, tuple[str, ...]] = ((), ())


def file_keys() -> tuple[str, ...]:
    """Every per-layer tensor suffix of every registered family, longest first (for splitting
    ``"<layer>.<suffix>"`` keys)."""
    global _file_keys_cache
    signature = tuple((family.module_type, family.module_type.file_keys) for family in FAMILIES.values())
    if signature != _file_keys_cache[0]:
        keys = {key for family in FAMILIES.values() for key in family.module_type.file_keys}
        _file_keys_cache = (signature, tuple(sorted(keys, key=lambda k: (-len(k), k))))
    return _file_keys_cache[1]


register_family(
    AdapterFamily(
        "dora",
        DoRAConfig,
        DoRAModule,
        (
            DoRAConfig(LoRAConfig(rank=2, alpha=1.0)),
            DoRAConfig(LoRAConfig(rank=2, alpha=3.0), wd_on_out=False),
            DoRAConfig(LoHaConfig(rank=2, alpha=1.0)),
            DoRAConfig(LoKrConfig(rank=2, alpha=1.0, factor=2), wd_on_out=False),
        ),
    )
)
register_family(
    AdapterFamily(
        "lora", LoRAConfig, LoRAModule, (LoRAConfig(rank=2, alpha=1.0), LoRAConfig(rank=3, alpha=2.0, use_tucker=True))
    )
)
register_family(
    AdapterFamily(
        "loha", LoHaConfig, LoHaModule, (LoHaConfig(rank=2, alpha=1.0), LoHaConfig(rank=3, alpha=2.0, use_tucker=True))
    )
)
register_family(
    AdapterFamily(
        "lokr",
        LoKrConfig,
        LoKrModule,
        (
            LoKrConfig(rank=1, alpha=0.5, factor=2),
            LoKrConfig(rank=1, alpha=2.0, factor=2, decompose_both=True),
            LoKrConfig(rank=2, alpha=1.0, full_matrix=True),
            LoKrConfig(rank=1, alpha=3.0, factor=2, use_tucker=True),
        ),
    )
)
register_family(AdapterFamily("full", FullConfig, FullModule, (FullConfig(),)))
register_family(AdapterFamily("ia3", IA3Config, IA3Module, (IA3Config(), IA3Config(train_on_input=True))))
register_family(
    AdapterFamily("glora", GLoRAConfig, GLoRAModule, (GLoRAConfig(rank=2, alpha=1.0), GLoRAConfig(rank=3, alpha=4.5)))
)
register_family(AdapterFamily("norm", NormConfig, NormModule, (NormConfig(),)))
register_family(
    AdapterFamily(
        "oft",
        OFTConfig,
        OFTModule,
        (OFTConfig(dim=2), OFTConfig(dim=4, constraint=1e-2, rescaled=True), OFTConfig(dim=2, butterfly=True, rescaled=True)),
    )
)


def family_of_config(config: object) -> AdapterFamily:
    """The family whose config type ``config`` is.

    Raises:
        TypeError: not a registered config (lists the known ones).
    """
    for family in FAMILIES.values():
        if isinstance(config, family.config_type):
            return family
    known = ", ".join(f.config_type.__name__ for f in FAMILIES.values())
    raise TypeError(f"unsupported adapter config {type(config).__name__}; use one of {known}")


def family_of_keys(keys: Iterable[str], *, name: str = "<module>") -> AdapterFamily:
    """The family one layer's file keys belong to (``dora_scale`` -> DoRA).

    Raises:
        ValueError: no family recognises the keys.
    """
    key_set = set(keys)
    for family in FAMILIES.values():
        if family.recognises(key_set):
            return family
    raise ValueError(
        f"{name}: tensors {sorted(key_set)} belong to no adapter family sdadapt knows "
        f"({', '.join(FAMILIES)})"
    )


def build_adapter(
    config: object,
    geometry: LayerGeometry,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AdapterModule:
    """A fresh adapter module of ``config``'s family for a layer of ``geometry``.

    Raises:
        TypeError: a norm family (``NormConfig``) on a Linear/Conv2d layer, or another family on a
            normalisation layer.
    """
    family = family_of_config(config)
    mismatch = _layer_kind_mismatch(family, geometry)
    if mismatch:
        raise TypeError(f"{type(config).__name__}: {mismatch}")
    return family.module_type.from_config(config, geometry, dtype=dtype, device=device)  # type: ignore[attr-defined]


def _layer_kind_mismatch(family: AdapterFamily, geometry: LayerGeometry) -> str | None:
    """Why ``family`` cannot sit on a layer of ``geometry`` (norm families only on normalisation
    layers, the others only on Linear/Conv2d), or ``None``."""
    if family.module_type.adapts_norms == geometry.is_norm:
        return None
    if geometry.is_norm:
        return (f"cannot adapt a normalisation layer (GroupNorm/LayerNorm, weight {geometry.weight_shape}) with "
                f"{family.name}: sdadapt adapters wrap nn.Linear or nn.Conv2d, LyCORIS norm modules (NormConfig) "
                "the norms. Narrow the targets with by_type(nn.Linear, nn.Conv2d).")
    return (f"{family.name} adapts GroupNorm/LayerNorm layers only, not a layer of weight shape "
            f"{geometry.weight_shape}; target the norms, e.g. by_type(nn.GroupNorm, nn.LayerNorm).")


def adapter_from_file_tensors(
    geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
) -> AdapterModule:
    """An adapter module built from one layer's file tensors (family from the keys).

    Raises:
        ValueError: keys of no family, a norm module's tensors on a Linear/Conv2d layer (or the
            reverse), or tensors that do not fit — naming ``name``.
    """
    family = family_of_keys(tensors, name=name)
    if family.name == "full" and geometry.is_norm:
        # a full delta of a GroupNorm / LayerNorm layer (ComfyUI's LoRA extraction writes ``diff`` / ``diff_b`` for every
        # 1-D weight): the same offsets as LyCORIS' w_norm / b_norm, as ComfyUI, Forge and SD.Next apply it
        diff = tensors.get("diff")
        if diff is None:
            diff = torch.zeros(geometry.out_features, dtype=tensors["diff_b"].dtype, device=tensors["diff_b"].device)
        tensors = {"w_norm": diff, **({"b_norm": tensors["diff_b"]} if "diff_b" in tensors else {})}
        family = family_of_keys(tensors, name=name)
    mismatch = _layer_kind_mismatch(family, geometry)
    if mismatch:
        raise ValueError(f"{name}: {mismatch} The file was made for another model.")
    return family.module_type.from_file_tensors(geometry, tensors, name=name)  # type: ignore[attr-defined]


def file_layer_delta(
    tensors: dict[str, Tensor],
    geometry: LayerGeometry,
    *,
    base_weight: Tensor | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    name: str = "<layer>",
) -> tuple[Tensor, Tensor | None]:
    """What one layer of an adapter file changes: ``(ΔW, Δb)`` at strength ``scale``.

    The ONE delta path for files: the family comes from the keys (:func:`family_of_keys`), the
    module from its ``from_file_tensors`` and the delta from its ``merge_delta`` / ``bias_delta``
    — the code :func:`sdadapt.inject` and :func:`sdadapt.apply_lora` run. For additive families
    ``ΔW = scale · Δ``; for DoRA (not linear in its factors) ``ΔW = scale · (W' − W)``, the
    effective change moved by ``scale``, so ``W + ΔW`` at ``scale = 1`` is exactly DoRA's ``W'``.

    Args:
        tensors: one layer's file tensors by suffix (``{"lora_down.weight": ..., "alpha": ...}``,
            ``hada_*``, ``lokr_*``, ``diff``/``diff_b``, ``dora_scale`` ...).
        geometry: the base layer's shape (``LayerGeometry(out, in, kernel)``).
        base_weight: (out, in, *kernel) the base weight; required by families that read it (DoRA).
        scale: strength (``<lora:name:scale>``, times a block weight).
        dtype: compute dtype (float32; float64 for references). The math runs on
            ``base_weight``'s device when it is given, else on the tensors'.

    Returns:
        ``ΔW`` (out, in, *kernel) and ``Δb`` (out,) or ``None``, in ``dtype``.

    Raises:
        ValueError: keys of no family, tensors that do not fit ``geometry``, or a missing
            ``base_weight`` for DoRA — naming ``name``.
    """
    module = adapter_from_file_tensors(geometry, tensors, name=name)
    delta, bias = adapter_layer_delta(module, base_weight=base_weight, scale=scale, dtype=dtype, name=name)
    return delta, bias  # type: ignore[return-value]


def adapter_layer_delta(
    module: AdapterModule,
    *,
    base_weight: Tensor | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    name: str = "<layer>",
    weight: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`file_layer_delta` for a module already built from a layer's file tensors
    (:func:`adapter_from_file_tensors`), so a caller that checked the layer by building it
    (``merge-lora``) computes its delta without building it again.

    The module is moved to ``dtype`` (and ``base_weight``'s device) **in place** and its
    multiplier set to ``scale``; everything else is :func:`file_layer_delta`'s.

    Args:
        weight: compute ``ΔW``; ``False``: only ``Δb`` (``ΔW`` is ``None``, ``base_weight`` is not read;
            only the module's vectors and scalars, what ``Δb`` reads, are moved to ``dtype``).

    Returns:
        ``ΔW`` (out, in, *kernel) (``None`` when not ``weight``) and ``Δb`` (out,) or ``None``, in ``dtype``.

    Raises:
        ValueError: ``weight`` and a missing ``base_weight`` for a family that reads it (DoRA).
    """
    device = base_weight.device if base_weight is not None else None
    if weight:
        module = module.to(device=device, dtype=dtype)
    else:  # (Δb reads only vectors and scalars: a weight-sized tensor is neither copied nor converted)
        with torch.no_grad():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_floating_point() and tensor.dim() <= 1 and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
    if weight and module.uses_base_weight and base_weight is None:
        raise ValueError(f"{name}: a {module.family} layer needs the base weight to compute its delta")
    module.set_multiplier(scale)
    geometry = module.geometry
    with torch.no_grad():
        delta = None
        if weight:
            base = None if base_weight is None else base_weight.to(dtype).reshape(geometry.weight_shape)
            delta = module.merge_delta(base).reshape(geometry.weight_shape)  # type: ignore[arg-type]
        bias = module.bias_delta()
    return delta, bias


def adapter_working_copy(module: AdapterModule, dtype: torch.dtype, *, vectors_only: bool = False,
                         consumable: bool = False) -> AdapterModule:
    """A copy of ``module`` whose floating parameters and buffers are in ``dtype``, ``module`` untouched.

    For a caller that keeps modules at the file's dtype and computes each delta in float32
    (``merge-lora``): :func:`adapter_layer_delta` moves the module it gets in place, so handing it
    this copy keeps the kept module at the file's dtype (an fp16 file's layers stay half the size
    of float32 ones) and the float32 copy lives only as long as the caller holds it. The values are
    ``module.to(dtype)``'s, bit for bit. A parameter already in ``dtype`` is shared (the delta
    functions read their parameters, never write them); buffers are always copied (the copy's
    ``set_multiplier`` fills its own ``scale``). Other tensors the module holds as plain attributes
    are deep-copied as :func:`copy.deepcopy` does.

    ``vectors_only``: only the vectors and scalars are converted (what a bias delta reads:
    :func:`adapter_layer_delta` with ``weight=False``); the other parameters are shared as they are
    (a full delta's bias costs no float32 copy of its ``diff``). ``consumable``: the copy is for one
    delta, which may hand over the parameters the copy converted (a full delta scales its float32
    ``diff`` in place rather than allocating a second one: :meth:`~sdadapt.adapters.full.FullModule.delta_weight`); a
    parameter shared with ``module`` is never handed over.
    """
    memo: dict[int, object] = {}
    fresh: set[str] = set()
    for name, tensor in module.named_parameters():
        if id(tensor) in memo:
            continue
        if tensor.is_floating_point() and (tensor.dim() <= 1 or not vectors_only):
            memo[id(tensor)] = converted = nn.Parameter(tensor.detach().to(dtype), requires_grad=tensor.requires_grad)
            if converted.data_ptr() != tensor.data_ptr():
                fresh.add(name)
        else:
            memo[id(tensor)] = tensor  # (shared: its delta functions only read it)
    for tensor in module.buffers():
        if id(tensor) not in memo:
            memo[id(tensor)] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    working = copy.deepcopy(module, memo)
    if consumable and hasattr(type(working), "_consumable"):
        working._consumable = frozenset(fresh)  # type: ignore[attr-defined]
    return working


def weight_shape_of_file_tensors(tensors: Mapping[str, Tensor], *, name: str = "<layer>") -> tuple[int, ...] | None:
    """The base layer's weight shape ``(out, in, *kernel)`` one layer's file tensors imply, or ``None``.

    Dispatches to the family's ``weight_shape_from_file_tensors`` (family from the keys). ``None``
    means the file alone cannot tell — e.g. LoHa, or LoKr with a low-rank ``w2``, store a kxk
    convolution's factors flattened ``(r, in·kh·kw)``, the same as a Linear layer's — so the
    caller needs the base model's layer shape (``resize-lora``/``combine-loras --base CKPT``).
    Only tensor shapes are read (meta tensors do).

    Raises:
        ValueError: keys of no family, naming ``name``.
    """
    return family_of_keys(tensors, name=name).module_type.weight_shape_from_file_tensors(dict(tensors))


def algorithm_of_keys(keys: Iterable[str]) -> str:
    """A per-layer label for reports: ``lora``, ``locon-tucker``, ``loha``, ``lokr-tucker``,
    ``full``, ``dora`` (over LoRA), ``loha+dora`` ...; ``unknown`` if no family matches.

    ``lora`` vs ``locon`` needs shapes; callers that have them refine it.
    """
    key_set = set(keys)
    try:
        family = family_of_keys(key_set)
    except ValueError:
        return "unknown"
    module = family.module_type
    if module.wraps_family:  # DoRA: label the wrapped family's layer, then the wrapper
        inner = algorithm_of_keys(key_set - set(module.file_keys))
        if inner == "unknown":
            return "unknown"
        return family.name if inner in ("lora", "locon") else f"{inner}+{family.name}"
    label = "locon" if family.name == "lora" and not key_set.isdisjoint(module.tucker_keys) else family.name
    return f"{label}-tucker" if not key_set.isdisjoint(module.tucker_keys) else label


def file_rank(shapes: dict[str, tuple[int, ...]], *, name: str = "<module>") -> tuple[int | None, bool]:
    """(rank or ``None``, is a kxk conv) of one layer from its file tensors' shapes (any family).

    Raises:
        ValueError: keys of no family.
    """
    return family_of_keys(shapes, name=name).module_type.file_rank(shapes)


def lycoris_algo_of_keys(keys: Iterable[str] | Mapping[str, Tensor]) -> str | None:
    """LyCORIS' ``algo`` for a layer (the wrapped family's for DoRA); ``None`` if unknown. Given the
    layer's tensors (a mapping) rather than names, a family whose layouts differ in shapes only names
    the layout's algo (OFT: ``diag-oft`` or ``boft``)."""
    key_set = set(keys)
    try:
        family = family_of_keys(key_set)
    except ValueError:
        return None
    if family.module_type.wraps_family:  # the wrapped family names the algorithm
        inner = {k: v for k, v in keys.items() if k not in family.module_type.file_keys} if isinstance(keys, Mapping) \
            else key_set - set(family.module_type.file_keys)
        return lycoris_algo_of_keys(inner)
    if isinstance(keys, Mapping):
        return family.module_type.lycoris_algo_of_shapes({k: tuple(v.shape) for k, v in keys.items()})
    return family.module_type.lycoris_algo


def scale_file_tensors(tensors: dict[str, Tensor], factor: float, *, name: str = "<layer>") -> dict[str, Tensor]:
    """One layer's file tensors with the delta scaled by ``factor`` (block weights on a file
    state): the family's :attr:`~AdapterModule.linear_keys` are multiplied, the rest shared.

    Raises:
        ValueError: the family's merged weight is not linear in any tensor (DoRA): bake the file
            with a strength instead (:func:`file_layer_delta` ``scale=``, ``merge-lora``).
    """
    if factor == 1.0:
        return dict(tensors)
    family = family_of_keys(tensors, name=name)
    linear = [k for k in family.module_type.linear_keys if k in tensors]
    if not linear:
        raise ValueError(
            f"{name}: a {family.name} layer's delta is not linear in any of its tensors, so it cannot be "
            "scaled inside the file; apply it with a strength instead (merge-lora --block-weights / "
            "file_layer_delta(scale=...), which scale its effective change W' - W)"
        )
    return {k: (v * factor if k in linear else v) for k, v in tensors.items()}
