"""Attach a hypernetwork to any UNet, exactly reversibly, without touching its forwards.

How it works (the same principles as :mod:`sdadapt.inject`):

1. every ``nn.Linear`` named ``to_k`` / ``to_v`` (diffusers ``attn1``/``attn2``, LDM/compvis
   ``CrossAttention``, the toy UNet — other names through ``kv_names=``) whose input width has a
   (K, V) pair gets a **forward pre-hook** that replaces its input — which for ``to_k``/``to_v``
   *is* the attention context — by ``context + mlp(context) · strength``. That is A1111's
   ``apply_hypernetworks`` exactly: self-attention layers see their hidden states as context, so
   the block widths select pairs just as the cross-attention width does; q is untouched.
2. the hypernetwork becomes a child ``sdadapt.<name>`` of the model root, so it follows
   ``.to()``/``.half()`` and shows in ``state_dict()`` under ``sdadapt.<name>.*``; the model's own
   keys never change.

Nothing is rebound: layers keep their classes and ``forward``; ``remove()`` takes the hooks and
the child away and the model is exactly as before (same outputs bit for bit, same keys). Several
hypernetworks injected one after another chain in that order, as A1111 chains a prompt's list;
LoRA adapters on ``to_k``/``to_v`` (forward hooks) see the transformed context, as in A1111.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..model_args import as_module, is_compiled, reset_compiled_graphs
from .mlp import Hypernetwork, HypernetworkMLP

__all__ = ["HypernetworkSlot", "HypernetworkHandle", "inject_hypernetwork", "context_widths"]


class HypernetworkSlot(nn.ModuleDict):
    """The ``sdadapt`` child of a model root: its injected hypernetworks, by injection name."""


def context_widths(model: nn.Module, *, kv_names: tuple[str, str] = ("to_k", "to_v")) -> dict[str, int]:
    """``{qualified name: input width}`` of the K/V projections a hypernetwork can act on.

    ``kv_names``: the child names of the key and value projections (diffusers, LDM and the toy
    UNet: ``("to_k", "to_v")``). Layers inside sdadapt adapters are skipped.
    """
    out: dict[str, int] = {}
    for layer_name, module in model.named_modules():
        if ".sdadapt." in f".{layer_name}.":
            continue
        if layer_name.rsplit(".", 1)[-1] in kv_names and isinstance(module, nn.Linear):
            out[layer_name] = module.in_features
    return out


class HypernetworkHandle:
    """What one :func:`inject_hypernetwork` changed, and how to undo it.

    Attributes:
        model: the model hooked.
        hypernetwork: the injected :class:`~sdadapt.hypernetworks.Hypernetwork` (shared, not copied).
        name: the injection name (the child ``model.sdadapt.<name>``).
        layers: ``{layer qualified name: (width, 0 = K | 1 = V)}`` in model order.
        unused_widths: widths of the file no layer of this model takes (e.g. SD2's 1024 on SD1).
        strength: the current multiplier (a float; assigning it is :meth:`set_strength`).

    The hooks read the strength from a 0-dim tensor that :meth:`set_strength` fills in place, so
    a ``torch.compile``'d model neither specialises on it nor recompiles when it changes (only
    switching to or from 0, which skips the MLPs, retraces once).
    """

    def __init__(self, model: nn.Module, hypernetwork: Hypernetwork, name: str, strength: float) -> None:
        self.model = model
        self.hypernetwork = hypernetwork
        self.name = name
        first = next(hypernetwork.parameters())
        # (0-dim) in the hypernetwork's dtype (at least float32) and device; the hooks multiply by it
        self._strength_tensor = _strength_tensor(strength, dtype=torch.promote_types(first.dtype, torch.float32),
                                                 device=first.device)
        self.strength = strength
        self.layers: dict[str, tuple[int, int]] = {}
        self.unused_widths: tuple[int, ...] = ()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removed = False
        self._compiled = False  # (made through a torch.compile'd module: Dynamo's caches reset on remove)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"HypernetworkHandle(name={self.name!r}, layers={len(self.layers)}, strength={self.strength}, "
                f"removed={self._removed})")

    def parameters(self) -> Iterator[nn.Parameter]:
        """The hypernetwork's parameters (for the optimiser)."""
        return self.hypernetwork.parameters()

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = _check_strength(value)
        self._active = self._strength != 0  # the hooks branch on this bool, never on the value
        with torch.no_grad():
            self._strength_tensor.fill_(self._strength)

    def set_strength(self, strength: float) -> None:
        """Set the multiplier (A1111's ``<hypernet:name:multiplier>``); 0 makes the model its base exactly.

        Raises:
            ValueError: not a finite number. RuntimeError: the handle was removed.
        """
        self._check_alive()
        self.strength = strength

    def remove(self) -> None:
        """Take the hooks and the ``sdadapt.<name>`` child away; idempotent."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        slot = self.model._modules.get("sdadapt")
        if isinstance(slot, HypernetworkSlot) and self.name in slot:
            del slot[self.name]
            if len(slot) == 0:
                del self.model._modules["sdadapt"]
        self._removed = True
        if self._compiled:
            reset_compiled_graphs()

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError(f"hypernetwork {self.name!r} was removed; inject it again to use it")

    def _pre_hook(self, mlp: HypernetworkMLP):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self._active:  # strength 0: the base model exactly
                return None
            context: Tensor = args[0] if args else kwargs["input"]
            weight = mlp.linear[0].weight
            dtype = weight.dtype  # A1111 runs hypernetworks in their own (float32) dtype
            strength = self._strength_tensor
            want = torch.promote_types(dtype, torch.float32)
            if strength.device != weight.device or strength.dtype != want:  # moved/cast after injection: follow once
                strength = self._strength_tensor = _strength_tensor(self._strength, dtype=want, device=weight.device)
            out = mlp(context if context.dtype == dtype else context.to(dtype), strength=strength).to(context.dtype)
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "input": out}

        return hook


def _strength_tensor(value: float, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 0-dim tensor the setter can fill in place later: a normal tensor even when made
    under ``torch.inference_mode()`` (an injection or a first forward after ``.to()`` there), which
    could neither be filled outside it nor enter a training step's autograd."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device=device)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number (1.0 = as trained, 0 = off), got {strength!r}")
    return float(strength)


def inject_hypernetwork(
    unet: nn.Module,
    hypernetwork: Hypernetwork,
    *,
    strength: float = 1.0,
    name: str = "default",
    kv_names: tuple[str, str] = ("to_k", "to_v"),
) -> HypernetworkHandle:
    """Apply ``hypernetwork`` to every K/V projection of ``unet`` whose input width it has a pair for.

    For each chosen ``to_k`` (``to_v``) layer the input context becomes
    ``context + mlp_k(context) · strength`` (``mlp_v``), A1111's formula; ``(B, L, D) -> (B, L, D)``.

    Args:
        unet: any ``nn.Module`` with K/V ``nn.Linear`` projections (diffusers, LDM, the toy UNet, yours).
        hypernetwork: from :func:`~sdadapt.load_hypernetwork` or built with
            :class:`~sdadapt.hypernetworks.Hypernetwork`; its parameters are used live (training
            them trains the injected model).
        strength: A1111's multiplier; change later with ``handle.set_strength``.
        name: injection name (no dots); several hypernetworks chain in injection order.
        kv_names: child names of the key and value projections.

    Returns:
        a :class:`HypernetworkHandle` (``remove()``, ``set_strength()``, ``layers``, ``unused_widths``).

    Raises:
        ValueError: no K/V layer has a width the hypernetwork covers (both width lists are named),
            fused QKV projections (unfuse first), a name in use, a bad strength.
        TypeError: ``hypernetwork`` is not a :class:`Hypernetwork`.

    Example::

        hn = sdadapt.load_hypernetwork("style.pt")
        handle = sdadapt.inject_hypernetwork(pipe.unet, hn, strength=0.7)
        images = pipe("a castle").images
        handle.remove()
    """
    if not isinstance(hypernetwork, Hypernetwork):
        raise TypeError(f"inject_hypernetwork needs a sdadapt Hypernetwork (see sdadapt.load_hypernetwork), got {type(hypernetwork).__name__}")
    compiled = is_compiled(unet)
    unet = as_module(unet, caller="inject_hypernetwork")
    strength = _check_strength(strength)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"name must be a non-empty string without dots, got {name!r}")
    if len(kv_names) != 2 or not all(isinstance(n, str) and n for n in kv_names):
        raise ValueError(f"kv_names must be the (key, value) projection child names, e.g. ('to_k', 'to_v'); got {kv_names!r}")
    fused = [n for n, m in unet.named_modules() if getattr(m, "fused_projections", False) is True]
    if fused:
        raise ValueError(
            f"{type(unet).__name__} has fused QKV projections ({fused[0]} ...): its to_k/to_v are not called. "
            "Call unet.unfuse_qkv_projections() before injecting a hypernetwork."
        )
    slot = unet._modules.get("sdadapt")
    if slot is not None and not isinstance(slot, HypernetworkSlot):
        raise TypeError(f"{type(unet).__name__} already has a child called 'sdadapt' that is not sdadapt's hypernetwork slot")
    if slot is not None and name in slot:
        raise ValueError(f"a hypernetwork named {name!r} is already injected; pick another name=... or remove() it first")
    layers = context_widths(unet, kv_names=kv_names)
    own = set(hypernetwork.widths)
    chosen = {layer: width for layer, width in layers.items() if width in own}
    if not chosen:
        model_widths = sorted(set(layers.values()))
        where = (f"its {'/'.join(kv_names)} layers take context widths {model_widths}" if layers else
                 f"it has no nn.Linear layers named {kv_names[0]!r}/{kv_names[1]!r} (pass kv_names= for other names)")
        raise ValueError(
            f"hypernetwork {hypernetwork.name!r} has modules for context widths {list(hypernetwork.widths)}, but "
            f"{type(unet).__name__} matches none: {where}. A hypernetwork only fits the model family it was trained "
            "for (SD1: 768 + 320/640/1280; SD2: 1024 + 320/640/1280)."
        )
    handle = HypernetworkHandle(unet, hypernetwork, name, strength)
    handle.unused_widths = tuple(w for w in hypernetwork.widths if w not in set(chosen.values()))
    if slot is None:
        slot = HypernetworkSlot()
        unet.add_module("sdadapt", slot)
    slot[name] = hypernetwork
    for layer_name, width in chosen.items():
        which = 0 if layer_name.rsplit(".", 1)[-1] == kv_names[0] else 1
        pair = hypernetwork.pair(width)
        layer = unet.get_submodule(layer_name)
        handle._hooks.append(layer.register_forward_pre_hook(handle._pre_hook(pair[which]), with_kwargs=True))  # type: ignore[index]
        handle.layers[layer_name] = (width, which)
    if compiled:  # (Dynamo does not guard on hooks: graphs compiled before them recompile at the next call)
        handle._compiled = True
        reset_compiled_graphs()
    return handle
