"""Explicit, exactly reversible injection of adapters into any model.

How it works: for each chosen base layer ``layer`` (an ``nn.Linear`` or ``nn.Conv2d``), sdadapt

1. adds one child container ``layer.sdadapt`` (an :class:`AdapterSlot`) holding the adapters by
   name, so they follow ``.to()``/``.cuda()``/``.half()`` and show up in ``state_dict()`` under
   ``<layer>.sdadapt.<name>.*`` — the base keys (``<layer>.weight``, ``<layer>.bias``) never change;
2. registers a forward hook on ``layer`` that adds the adapter's Δy to the output.

The layer keeps its class and its own ``forward`` (nothing is rebound), so code that checks
``isinstance(attn.to_q, nn.Linear)`` keeps working, and ``remove()`` leaves the model exactly as
it was: same module objects, same keys, same weights (bit for bit, PiSSA residuals included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .adapters.base import AdapterModule, LayerGeometry, geometry_of
from .adapters.fused_lora import note_adapted_layer
from .adapters.input_pad import LATENT_CHANNELS, ChannelPadAdapter, is_inpainting_conv_in_delta
from .adapters.registry import adapter_from_file_tensors, build_adapter, family_of_config
from .checks import finite_number
from .errors import SdadaptError
from .model_args import as_module, check_layer_state, is_compiled, reset_compiled_graphs
from .targets import Target, select

__all__ = ["AdapterSlot", "AdapterHandle", "LayerFitError", "inject", "load_adapter", "adapter_names"]


class LayerFitError(ValueError):
    """:func:`inject`'s config does not fit one chosen layer; the message starts with the layer's name."""


class AdapterSlot(nn.ModuleDict):
    """The ``sdadapt`` child of an adapted layer: adapters by name, plus merge bookkeeping.

    While any adapter is merged the slot keeps one copy of the layer's original weight (and bias,
    when a merged adapter changes it); the merged weight is always recomputed as
    ``original + Σ merge deltas`` (in float32, cast once), each adapter's delta taken against the
    *original* weight (what DoRA's norm needs), so merge/unmerge in any order is exact and
    unmerging everything restores the original bits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.original_weight: Tensor | None = None
        self.original_bias: Tensor | None = None
        self.merged_names: list[str] = []
        #: the adapters keep their dtype when the model around them is cast (:meth:`AdapterHandle.keep_dtype`)
        self.keeps_dtype = False

    def _apply(self, fn, recurse: bool = True):  # (what Module.to / .half() / .cuda() run on each tensor)
        return super()._apply(_device_only(fn) if self.keeps_dtype else fn, recurse)

    @torch.no_grad()
    def refresh_weight(self, layer: nn.Module) -> None:
        weight = layer.weight
        bias: Tensor | None = getattr(layer, "bias", None)
        if not self.merged_names:
            if self.original_weight is not None:
                weight.copy_(self.original_weight)
                self.original_weight = None
            if self.original_bias is not None and bias is not None:
                bias.copy_(self.original_bias)
            self.original_bias = None
            return
        if self.original_weight is None:
            self.original_weight = weight.detach().clone()
        # accumulate in at least float32 (float64 weights keep float64 precision)
        acc = torch.promote_types(weight.dtype, torch.float32)
        total = self.original_weight.to(acc)
        bias_total: Tensor | None = None
        for name in self.merged_names:
            adapter: AdapterModule = self[name]  # type: ignore[assignment]
            total = total + adapter.merge_delta(self.original_weight).detach().to(total).reshape(weight.shape)
            bias_delta = adapter.bias_delta()
            if bias_delta is not None and bias is not None:
                if self.original_bias is None:
                    self.original_bias = bias.detach().clone()
                start = bias_total if bias_total is not None else self.original_bias.to(acc)
                bias_total = start + bias_delta.detach().to(start)
        weight.copy_(total.to(weight.dtype))
        if bias_total is not None:
            bias.copy_(bias_total.to(bias.dtype))  # type: ignore[union-attr]
        elif self.original_bias is not None and bias is not None:  # no bias delta merged any more
            bias.copy_(self.original_bias)
            self.original_bias = None


def _device_only(fn):
    """``fn`` (a tensor conversion of ``Module._apply``: ``to``, ``half``, ``cuda``, ``to_empty`` ...) without its
    casts: run as it is where it keeps a tensor's dtype (read on an empty tensor of that dtype and device), else
    only its device move."""
    def moved(tensor: Tensor) -> Tensor:
        probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
        if probe.dtype == tensor.dtype:
            return fn(tensor)
        return tensor if probe.device == tensor.device else tensor.to(probe.device)

    return moved


def _slot_of(layer: nn.Module, *, create: bool) -> AdapterSlot | None:
    slot = layer._modules.get("sdadapt")
    if slot is None and create:
        slot = AdapterSlot()
        layer.add_module("sdadapt", slot)
    if slot is not None and not isinstance(slot, AdapterSlot):
        raise TypeError(f"{type(layer).__name__} already has a child called 'sdadapt' that is not sdadapt's")
    return slot  # type: ignore[return-value]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters currently injected anywhere in ``model``."""
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, AdapterSlot):
            names.extend(n for n in module.keys() if n not in names)
    return names


class AdapterHandle:
    """What one ``inject`` (or ``load_adapter``) changed, and how to undo it.

    Attributes:
        name: the adapter name (several named adapters can live on one model).
        modules: ``{layer qualified name: adapter module}`` in model order.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name
        self.modules: dict[str, AdapterModule] = {}
        self._layers: dict[str, nn.Module] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._base_originals: dict[str, Tensor] = {}
        self._removed = False
        self._compiled = False  # (made through a torch.compile'd module: Dynamo's caches reset on remove)

    # ------------------------------------------------------------------ construction
    def _attach(self, layer_name: str, layer: nn.Module, adapter: AdapterModule) -> None:
        _check_name_free(layer_name, layer, self.name)
        slot = _slot_of(layer, create=True)
        slot[self.name] = adapter  # type: ignore[index]
        self.modules[layer_name] = adapter
        self._layers[layer_name] = layer
        self._hooks[layer_name] = layer.register_forward_hook(adapter.hook)
        note_adapted_layer(layer)

    # ------------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        """Qualified names of the layers this adapter changed."""
        return list(self.modules)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable adapter parameters (for the optimiser)."""
        for adapter in self.modules.values():
            yield from adapter.parameters()

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return f"AdapterHandle(name={self.name!r}, layers={len(self.modules)}, removed={self._removed})"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Canonical adapter state: ``{"<layer name>.<file key>": tensor}`` (detached)."""
        self._check_alive()
        return {
            f"{layer}.{key}": value.detach()
            for layer, adapter in self.modules.items()
            for key, value in adapter.file_tensors().items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy a canonical state (as from :meth:`state_dict`) into the adapters; exact keys."""
        self._check_alive()
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"adapter {self.name!r}: state keys do not match; missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"adapter {self.name!r}: {key} has shape {tuple(value.shape)}, the adapter has "
                    f"{tuple(own[key].shape)}; was it trained with another rank?"
                )
        before = {key: value.clone() for key, value in own.items()}
        try:
            self._load_file_tensors(state)
        except BaseException:  # (a layer refused its tensors, PiSSA's check: the adapters as they were)
            self._load_file_tensors(before)
            raise
        for adapter in self.modules.values():
            adapter.refresh_scale()
        self._refresh_merged()

    @torch.no_grad()
    def _load_file_tensors(self, state: Mapping[str, Tensor]) -> None:
        for layer, adapter in self.modules.items():
            adapter.load_file_tensors({key: state[f"{layer}.{key}"] for key in adapter.file_tensors()})

    # ------------------------------------------------------------------ switches
    def set_scale(self, scale: float) -> None:
        """Set the run-time strength (multiplier) of this adapter; no recompilation needed.

        Raises:
            InputError (a ValueError): ``scale`` is not a finite number (a string, NaN, inf).
        """
        self._check_alive()
        scale = finite_number(scale, name=f"adapter {self.name!r}: set_scale's scale")
        for adapter in self.modules.values():
            adapter.set_multiplier(scale)
        self._refresh_merged()

    def keep_dtype(self, keep: bool = True) -> None:
        """Let the adapters keep their dtype when the model is cast (``model.to(torch.bfloat16)``,
        ``model.half()``, a float8 base): they still move with it to another device. For a trainer that casts
        its frozen model after the adapters are in (kohya's ``train_network.py``); the adapters' own
        ``.to(dtype)`` still casts them. Holds for every adapter on these layers (one slot per layer)."""
        self._check_alive()
        for layer in self._layers.values():
            _slot_of(layer, create=False).keeps_dtype = keep  # type: ignore[union-attr]

    def enable(self) -> None:
        self._check_alive()
        for adapter in self.modules.values():
            adapter.enabled = True

    def disable(self) -> None:
        """Bypass the adapter (the model behaves as its base); merged adapters are unmerged first."""
        self._check_alive()
        self.unmerge()
        for adapter in self.modules.values():
            adapter.enabled = False

    def merge(self) -> None:
        """Fold the deltas into the base weights (faster inference); exact to undo.

        Raises:
            RuntimeError: the adapter is disabled (``enable()`` it first), or a layer's weight is stored
                in float8 (:func:`sdadapt.training.fp8_base.cast_base_to_fp8`: a merged delta would be
                rounded to 3 mantissa bits and could not be undone).
        """
        self._check_alive()
        if any(not adapter.enabled for adapter in self.modules.values()):
            raise RuntimeError(f"adapter {self.name!r} is disabled; enable() it before merge()")
        fp8 = [n for n, layer in self._layers.items() if layer.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if fp8:
            raise RuntimeError(f"adapter {self.name!r}: {fp8[0]}'s weight is stored in {self._layers[fp8[0]].weight.dtype} "
                               "(an fp8 base); merging would round the delta to fp8 and could not be undone — keep the "
                               "adapter unmerged (it runs under autocast), or load the model in full precision to merge")
        self._set_merged(True)

    def unmerge(self) -> None:
        """Take merged deltas out again; with nothing else merged the original bits come back."""
        self._check_alive()
        self._set_merged(False)

    def _refresh_merged(self) -> None:
        """Recompute merged weights after the adapter's tensors or scale changed."""
        for layer_name, adapter in self.modules.items():
            if adapter.merged:
                layer = self._layers[layer_name]
                _slot_of(layer, create=False).refresh_weight(layer)  # type: ignore[union-attr]

    def _set_merged(self, merged: bool) -> None:
        if merged:
            for layer_name, adapter in self.modules.items():
                if adapter.bias_delta() is not None and getattr(self._layers[layer_name], "bias", None) is None:
                    raise RuntimeError(
                        f"adapter {self.name!r}: {layer_name} has a bias delta (diff_b) but the layer has no "
                        "bias to merge it into; keep this adapter unmerged (its hook adds the bias)"
                    )
        for layer_name, adapter in self.modules.items():
            if adapter.merged == merged:
                continue
            layer = self._layers[layer_name]
            slot = _slot_of(layer, create=False)
            adapter.merged = merged
            if merged:
                slot.merged_names.append(self.name)  # type: ignore[union-attr]
            else:
                slot.merged_names.remove(self.name)  # type: ignore[union-attr]
            slot.refresh_weight(layer)  # type: ignore[union-attr]

    def replace(self, layer_name: str, adapter: AdapterModule) -> AdapterModule:
        """Put ``adapter`` in place of this handle's module on ``layer_name`` (its forward hook and its
        ``sdadapt`` slot entry; the same layer and name) and return the old module. For a family made
        from another's modules (DyLoRA from LoRA).

        Raises:
            KeyError: the handle has no module on ``layer_name``.
            RuntimeError: the handle was removed, or the old module is merged (unmerge first).
        """
        self._check_alive()
        if layer_name not in self.modules:
            raise KeyError(f"adapter {self.name!r} has no module on {layer_name!r}")
        old = self.modules[layer_name]
        if old.merged:
            raise RuntimeError(f"adapter {self.name!r}: {layer_name} is merged; unmerge() before replacing its module")
        layer = self._layers[layer_name]
        self._hooks[layer_name].remove()
        _slot_of(layer, create=False)[self.name] = adapter  # type: ignore[index]
        self.modules[layer_name] = adapter
        self._hooks[layer_name] = layer.register_forward_hook(adapter.hook)
        note_adapted_layer(layer)
        return old

    def bake(self) -> None:
        """Merge the adapter into its layers' weights for good and remove it (peft's ``merge_and_unload``): each layer
        keeps ``W + ΔW`` (and its bias ``+ Δb``) where :meth:`remove` alone restores ``W`` — it undoes a
        :meth:`merge` too. The model's modules and ``state_dict()`` keys are its own again.

        Raises:
            RuntimeError: the handle was removed, another adapter is merged on one of its layers (unmerge it first:
                its merge is relative to the weights before this one), or :meth:`merge` refuses (disabled, fp8).
        """
        self._check_alive()
        for layer_name, layer in self._layers.items():
            others = [n for n in (_slot_of(layer, create=False).merged_names or []) if n != self.name]  # type: ignore[union-attr]
            if others:
                raise RuntimeError(f"adapter {self.name!r}: {layer_name} also has {others[0]!r} merged; unmerge() it "
                                   "before baking this one")
        self.merge()
        with torch.no_grad():
            baked = [(layer, layer.weight.detach().clone(),
                      None if getattr(layer, "bias", None) is None else layer.bias.detach().clone())
                     for layer in self._layers.values()]
            self.remove()
            for layer, weight, bias in baked:
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)

    def remove(self) -> None:
        """Undo the injection: hooks, adapter children and PiSSA residuals — and a :meth:`merge` (:meth:`bake` keeps
        the merged weights); idempotent."""
        if self._removed:
            return
        self.unmerge()
        for layer_name, layer in self._layers.items():
            self._hooks[layer_name].remove()
            slot = _slot_of(layer, create=False)
            if slot is not None:
                del slot[self.name]
                if len(slot) == 0:
                    del layer._modules["sdadapt"]
            if layer_name in self._base_originals:
                _set_base_weight(layer, self._base_originals[layer_name])
        self._base_originals.clear()
        self._removed = True
        if self._compiled:
            reset_compiled_graphs()

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError(f"adapter {self.name!r} was removed; inject it again to use it")


def _base_weight(layer: nn.Module) -> Tensor:
    """The layer's weight without merged deltas (other adapters may be merged into it)."""
    slot = _slot_of(layer, create=False)
    if slot is not None and slot.original_weight is not None:
        return slot.original_weight
    return layer.weight.detach()


def _set_base_weight(layer: nn.Module, value: Tensor) -> None:
    """Replace the layer's unmerged weight by ``value``, keeping merged deltas on top of it."""
    slot = _slot_of(layer, create=False)
    with torch.no_grad():
        if slot is not None and slot.original_weight is not None:
            slot.original_weight = value.detach().to(slot.original_weight.dtype).clone()
            slot.refresh_weight(layer)
        else:
            layer.weight.copy_(value)


def _named_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"{type(model).__name__} has no module {name!r}") from exc


def _freeze_base(model: nn.Module) -> None:
    for param_name, param in model.named_parameters():
        if ".sdadapt." not in f".{param_name}":
            param.requires_grad_(False)


def inject(
    model: nn.Module,
    targets: Target | str | Iterable[str],
    config: object,
    *,
    name: str = "default",
    freeze_base: bool = True,
    dtype: torch.dtype | None = torch.float32,
    layer_configs: Mapping[str, object] | None = None,
) -> AdapterHandle:
    """Add one adapter per chosen layer of ``model`` and return the handle naming them.

    Args:
        model: any ``nn.Module`` (a diffusers UNet, an LDM UNet, a CLIP text encoder, your own); a
            ``torch.compile``'d module is adapted through the module it compiles (same layer names).
        targets: a :class:`~sdadapt.targets.Target`, a preset name or glob(s).
        config: the family's config: :class:`~sdadapt.adapters.lora.LoRAConfig`,
            ``LoHaConfig``, ``LoKrConfig``, ``FullConfig`` or ``DoRAConfig`` (see
            :mod:`sdadapt.adapters.registry`).
        name: adapter name; several named adapters can be injected side by side.
        freeze_base: set ``requires_grad=False`` on every existing parameter of ``model``.
        dtype: adapter parameter dtype (``None``: the base layer's dtype). float32 by default,
            the usual choice for training under autocast.
        layer_configs: ``{layer name: config}`` for chosen layers that take another config than
            ``config`` (e.g. kohya's ranks per block); every name must be a chosen layer.

    Returns:
        An :class:`AdapterHandle`; its ``parameters()`` are the trainable adapter weights.

    Raises:
        NoTargetsError: the target matched nothing. TypeError: ``model`` is no ``nn.Module`` (a
            pipeline: pass ``pipe.unet``), a target is not Linear/Conv2d, or the config is of no
            registered family. LayerFitError: the config does not fit a chosen layer (naming it; e.g.
            BOFT on a width with no butterfly split); nothing is injected then.
    """
    compiled = is_compiled(model)
    model = as_module(model, caller="inject")  # (a compiled module: its original, so names stay the model's)
    family_of_config(config)  # an unknown config fails before anything is selected
    overrides = dict(layer_configs or {})
    for override in overrides.values():
        family_of_config(override)
    chosen = select(model, targets)
    unknown = sorted(set(overrides) - {layer_name for layer_name, _ in chosen})
    if unknown:
        raise ValueError(f"layer_configs names {len(unknown)} layer(s) the target does not choose, e.g. {unknown[0]!r}")
    handle = AdapterHandle(model, name)
    built: list[tuple[str, nn.Module, AdapterModule]] = []
    # build (and validate) everything first, so a failure leaves the model untouched
    for layer_name, layer in chosen:
        geometry = geometry_of(layer, name=layer_name)
        _check_name_free(layer_name, layer, name)
        try:
            adapter = _build(overrides.get(layer_name, config), geometry, layer, dtype)
        except ValueError as exc:  # (a config that does not fit this layer: OFT's block layout ...)
            if isinstance(exc, SdadaptError):  # (already says what and where: keep its class and exit code)
                raise
            raise LayerFitError(f"{layer_name}: {exc}") from exc
        built.append((layer_name, layer, adapter))
    if freeze_base:
        _freeze_base(model)
    for layer_name, layer, adapter in built:
        base = _base_weight(layer)  # without other adapters' merged deltas
        residual = adapter.init_from_base(base)  # DoRA: m = ‖W‖; PiSSA: principal factors
        if residual is not None:  # the family replaces the base weight (PiSSA's residual)
            handle._base_originals[layer_name] = base.detach().clone()
            _set_base_weight(layer, residual.to(layer.weight.dtype))
        handle._attach(layer_name, layer, adapter)
    if compiled:
        handle._compiled = True
        reset_compiled_graphs()
    return handle


def _check_name_free(layer_name: str, layer: nn.Module, name: str) -> None:
    slot = _slot_of(layer, create=False)
    if slot is not None and name in slot:
        raise ValueError(
            f"{layer_name}: an adapter named {name!r} is already injected; pick another "
            "name=... or remove() the existing one first"
        )


def _build(config: object, geometry: LayerGeometry, layer: nn.Module, dtype: torch.dtype | None) -> AdapterModule:
    return build_adapter(config, geometry, dtype=dtype or layer.weight.dtype, device=layer.weight.device)


def load_adapter(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    name: str = "default",
    freeze_base: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> AdapterHandle:
    """Inject adapters built from a canonical state dict (ranks and family read from the tensors:
    LoRA/LoCon, LoHa, LoKr, full ``diff``, DoRA over any of them).

    ``state`` keys are ``"<layer name>.<file key>"`` with layer names as :func:`resolve_layers`
    produces them from files (see ``sdadapt.formats``). A ``conv_in`` delta of 4 input channels on an
    inpainting UNet's 9-channel ``conv_in`` acts on the latent channels only, as :func:`sdadapt.apply_lora`'s
    zero-padded merge (A1111's rule; :class:`~sdadapt.adapters.input_pad.ChannelPadAdapter`).

    Raises:
        KeyError: a layer name matches no module of ``model`` (nearest names suggested).
        ValueError: a tensor's shape does not fit its layer.
        TypeError: ``model`` is no ``nn.Module``, or ``state`` is ``{component: state}`` (pass one component's).
    """
    from .formats.layers import group_by_layer, resolve_layers

    compiled = is_compiled(model)
    model = as_module(model, caller="load_adapter")
    check_layer_state(state, caller="load_adapter")
    groups = group_by_layer(state)
    resolved = resolve_layers(model, list(groups))
    handle = AdapterHandle(model, name)
    built = []
    for key_name, layer_name in resolved.items():
        layer = _named_layer(model, layer_name)
        geometry = geometry_of(layer, name=layer_name)
        _check_name_free(layer_name, layer, name)
        if is_inpainting_conv_in_delta(groups[key_name], geometry, layer_name):  # (A1111 pads it 4 -> 9 channels)
            inner = adapter_from_file_tensors(dataclasses.replace(geometry, in_features=LATENT_CHANNELS),
                                              groups[key_name], name=layer_name)
            adapter = ChannelPadAdapter(inner, geometry)
        else:
            adapter = adapter_from_file_tensors(geometry, groups[key_name], name=layer_name)
        if dtype is not None:
            adapter.to(dtype)
        built.append((layer_name, layer, adapter.to(layer.weight.device)))
    if freeze_base:  # only once everything fitted: a failed load leaves the model untouched
        _freeze_base(model)
    for layer_name, layer, adapter in built:
        handle._attach(layer_name, layer, adapter)
    if compiled:
        handle._compiled = True
        reset_compiled_graphs()
    return handle
