"""(IA)³: a learned per-channel rescaling of the base weight (Liu et al. 2022; LyCORIS ``algo=ia3``).

One vector ``w`` per layer scales the base weight along its output axis or, with
``train_on_input``, along its input axis. At strength ``m`` (LyCORIS' ``multiplier``)::

    W' = W ⊙ (1 + m·w)        ΔW = W' − W = m · W ⊙ w
    on output (default):  ΔW[o, i, ...] = m · w[o] · W[o, i, ...]
    on input:             ΔW[o, i, ...] = m · w[i] · W[o, i, ...]

``w`` starts at zero, so ``W' = W`` at init. The bias is NOT scaled: this is LyCORIS' default
(non-bypass) forward, ``y + op(x, W' − W)`` with no bias term.

The forward costs no extra matmul on the output axis: when the hook sees the base layer's own
output ``y = op(x, W) + b`` (torch's own ``nn.Linear`` / ``nn.Conv2d`` forward, the adapter the
layer's only forward hook, no global module hook, nothing merged into ``W``), ``Δy = (y − b) ⊙ m·w``,
one elementwise pass over ``y`` (a second hook, a global one such as a profiler's, a subclass's own
forward or a merged adapter may change ``y``: then ``Δy = op(x, W) ⊙ m·w``, a second matmul). Under
autocast ``y − b`` carries the rounding of ``y`` (bias included), ``|m·w|`` times the output's own
rounding (tests/test_ia3_forward.py). On the input axis
``Δy = op(x ⊙ m·w, W)`` needs its matmul: a hook sees the base's output, not a chance to scale
its input (``benchmarks/ia3_forward.py`` measures both). (LyCORIS' ``bypass_mode`` instead
scales the whole output, bias included; sdadapt follows the default and its merged weights.)
Because ``ΔW`` is the base weight times a vector, the family reads the base weight
(``uses_base_weight``); the delta is linear in ``w``, so block weights scale the file's vector.

Files (LyCORIS, ``lora_unet_<layer>.<key>``):

* ``weight``: ``(C,)`` for ``nn.Linear``, ``(1, C, 1, 1)`` for ``nn.Conv2d``; ``C`` is the
  layer's output width, or its input width when ``on_input`` is 1.
* ``on_input``: a 0-dim int64, 1 when ``w`` scales the input axis (LyCORIS' ``train_on_input``).
  LyCORIS detects the algorithm by this key; so does sdadapt (a lone ``weight`` is no family's).
* ``scales_bias`` (optional, 0-dim int64 1; sdadapt's, from a peft ``IA3Config`` adapter read without
  its model): the vector also scales the layer's bias, as peft's IA3 does on an output-scaled layer
  (``y = (W x + b) ⊙ ia3_l``). On a layer without a bias that is the same adapter, and it loads as
  such; on a layer with a bias :meth:`IA3Module.from_file_tensors` refuses it (the geometry tells),
  rather than apply another change of the output. In memory only: the module does not keep it
  (``file_tensors``), and the kohya writer refuses a state holding it (``formats.kohya.to_kohya``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from .base import AdapterModule, LayerGeometry

__all__ = ["IA3Config", "IA3Module", "ia3_delta_weight", "ia3_vector_shape"]

#: torch's ``register_module_forward_hook`` hooks (a private dict, mutated in place; ``None`` if a torch renames it)
_GLOBAL_FORWARD_HOOKS = getattr(_torch_module, "_global_forward_hooks", None)
#: the forwards computing exactly ``op(x, W) + b``
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward)


def _sees_base_output(module: nn.Module) -> bool:
    """Whether a forward hook of ``module`` receives the layer's own output ``op(x, W) + b``, ``W``
    the unmerged weight: the layer runs torch's own ``nn.Linear`` / ``nn.Conv2d`` forward (a subclass
    overriding it may add more than the bias, e.g. diffusers' ``LoRACompatibleLinear``), this hook is the
    only one (module and global) and no delta is merged.
    (torch's private hook dicts; a torch without them: ``False``, the matmul path.)"""
    if type(module).forward not in _PLAIN_FORWARDS:
        return False
    slot = module._modules.get("sdadapt")
    if slot is not None and getattr(slot, "original_weight", None) is not None:
        return False
    hooks, global_hooks = getattr(module, "_forward_hooks", None), _GLOBAL_FORWARD_HOOKS
    return hooks is not None and global_hooks is not None and len(hooks) == 1 and not global_hooks


def ia3_vector_shape(geometry: LayerGeometry, *, on_input: bool) -> tuple[int, ...]:
    """The file shape of the layer's vector: ``(C,)`` for linear, ``(1, C, 1, 1)`` for a conv.

    ``C`` is ``geometry.in_features`` when ``on_input`` else ``geometry.out_features``.
    """
    channels = geometry.in_features if on_input else geometry.out_features
    if geometry.is_conv:
        return (1, channels, *(1 for _ in geometry.kernel))
    return (channels,)


def ia3_delta_weight(base_weight: Tensor, weight: Tensor, *, on_input: bool, scale: float | Tensor = 1.0) -> Tensor:
    """``ΔW = scale · W ⊙ w`` with ``w`` broadcast along the output (or input) axis.

    Args:
        base_weight: W, (out, in, *kernel).
        weight: w, any shape holding ``out`` values (``in`` with ``on_input``): ``(C,)`` or
            ``(1, C, 1, 1)`` as files store it.
        on_input: scale the input axis (axis 1) instead of the output axis (axis 0).
        scale: the strength ``m`` (float or 0-dim tensor).

    Returns:
        (out, in, *kernel) in the promoted dtype of ``base_weight`` and ``weight``.
    """
    ones = (1,) * (base_weight.dim() - 2)
    if on_input:
        vector = weight.reshape(1, base_weight.shape[1], *ones)  # (1, in, 1, 1)
    else:
        vector = weight.reshape(base_weight.shape[0], 1, *ones)  # (out, 1, 1, 1)
    return base_weight * (vector * scale)


@dataclass(frozen=True, kw_only=True)
class IA3Config:
    """(IA)³ hyper-parameters (LyCORIS ``algo=ia3``).

    Attributes:
        train_on_input: scale each layer's input channels instead of its outputs (LyCORIS
            ``train_on_input``; its ``preset=ia3`` sets it on the feed-forward output layers).
        module_dropout: probability to skip the whole module per training step.
    """

    train_on_input: bool = False
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.train_on_input, bool):
            raise TypeError(f"IA3Config.train_on_input must be a bool, got {self.train_on_input!r}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"IA3Config.module_dropout must be in [0, 1), got {self.module_dropout!r}")


class IA3Module(AdapterModule):
    """One (IA)³ vector for one base layer (a thin shell over :func:`ia3_delta_weight`).

    Parameter ``weight`` (zero at init, the file's shape, see :func:`ia3_vector_shape`) and a saved
    0-dim int64 buffer ``on_input``. ``Δy`` is computed from the base weight the hook passes
    (the weight without merged deltas): ``op(x, W) · m·w`` on outputs, ``op(x · m·w, W)`` on inputs,
    never touching the bias. As the layer's only hook, on outputs the hook takes ``op(x, W)`` from
    the base output itself, ``y − b`` (no second matmul; see the module docstring).
    """

    family: ClassVar[str] = "ia3"
    file_keys: ClassVar[tuple[str, ...]] = ("weight", "on_input", "scales_bias")
    marker_keys: ClassVar[tuple[str, ...]] = ("on_input",)
    linear_keys: ClassVar[tuple[str, ...]] = ("weight",)
    lycoris_algo: ClassVar[str] = "ia3"
    uses_base_weight: ClassVar[bool] = True

    def __init__(
        self,
        geometry: LayerGeometry,
        *,
        on_input: bool = False,
        module_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(geometry)
        self.train_input = bool(on_input)
        self.weight = nn.Parameter(torch.zeros(ia3_vector_shape(geometry, on_input=self.train_input), dtype=dtype,
                                               device=device))
        self.register_buffer("on_input", torch.tensor(int(self.train_input), dtype=torch.int64, device=device))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32, device=device), persistent=False)
        self.module_dropout = module_dropout

    @property
    def rank(self) -> int:
        """The vector's length (IA³ has no rank; reports show its channel count)."""
        return self.weight.numel()

    def delta_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def delta_weight(self) -> Tensor:
        """IA³ has no delta without the base weight: use :meth:`merge_delta`."""
        raise TypeError("IA3Module.delta_weight needs the base layer's weight: call merge_delta(base_weight)")

    def merge_delta(self, base_weight: Tensor) -> Tensor:
        """(out, in, *k): ``m · W ⊙ w`` for the base weight ``W`` (without merged deltas)."""
        base = base_weight.to(self.weight.dtype).reshape(self.geometry.weight_shape)
        return ia3_delta_weight(base, self.weight, on_input=self.train_input, scale=self.scale.to(self.weight.dtype))

    def _delta_added(self, module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        """``y + Δy``; on the output axis from the base output ``y`` itself when the hook sees it
        unchanged: ``y + (y − b) ⊙ m·w`` (no second matmul; see the module docstring)."""
        if self.train_input or not _sees_base_output(module):
            return super()._delta_added(module, x, output)
        dtype = self.weight.dtype
        vector = self.weight.reshape(-1) * self.scale.to(dtype)  # (C,)
        if self.geometry.is_conv:
            vector = vector.reshape(-1, 1, 1)  # (C, 1, 1) on (N, C, H, W)
        plain = output.to(dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            plain = plain - (bias.to(dtype).reshape(-1, 1, 1) if self.geometry.is_conv else bias.to(dtype))
        return output + (plain * vector).to(output.dtype)

    def forward(self, x: Tensor, base_weight: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Δy for input ``x`` (linear: (..., in); conv: (N, in, H, W)), without the bias.

        On outputs ``op(x, W) · m·w`` along the channel axis; on inputs ``op(x · m·w, W)``.
        """
        if base_weight is None:
            raise TypeError("IA3Module.forward needs the base layer's weight: forward(x, base_weight)")
        base = base_weight.to(self.weight.dtype).reshape(self.geometry.weight_shape)
        vector = self.weight.reshape(-1) * self.scale.to(self.weight.dtype)
        if self.geometry.is_conv:
            vector = vector.reshape(-1, 1, 1)  # (C, 1, 1) on (N, C, H, W)
        if self.train_input:
            return self.geometry.conv(x * vector, base)
        return self.geometry.conv(x, base) * vector

    def file_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    @classmethod
    def from_config(
        cls,
        config: IA3Config,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> IA3Module:
        """A fresh module for one layer (``w = 0``: the layer is unchanged)."""
        return cls(geometry, on_input=config.train_on_input, module_dropout=config.module_dropout, dtype=dtype,
                   device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> IA3Module:
        """Build from ``{"weight", "on_input"}`` (+ peft's ``scales_bias``, see the module docstring).

        Raises:
            ValueError: a missing tensor, an ``on_input`` that is not one 0/1 value, a
                ``weight`` whose shape does not fit the layer, or ``scales_bias`` on an output-scaled
                layer with a bias (peft's adapter would change its output otherwise) — naming ``name``.
        """
        missing = [k for k in ("weight", "on_input") if k not in tensors]
        if missing:
            raise ValueError(f"{name}: IA3 tensors {missing} are missing (have {sorted(tensors)})")
        flag = tensors["on_input"]
        if flag.numel() != 1 or float(flag) not in (0.0, 1.0):
            raise ValueError(f"{name}.on_input: must be one value 0 or 1, got a tensor of shape {tuple(flag.shape)}")
        on_input = bool(float(flag))
        weight = tensors["weight"]
        want = ia3_vector_shape(geometry, on_input=on_input)
        if tuple(weight.shape) != want:
            axis = "input" if on_input else "output"
            raise ValueError(
                f"{name}.weight: IA3 vector of shape {tuple(weight.shape)} does not fit the base layer of weight "
                f"shape {geometry.weight_shape}: with on_input={int(on_input)} it scales the {axis} axis and must be "
                f"{want}. The file was made for another model."
            )
        if not weight.is_floating_point():
            raise ValueError(f"{name}.weight: IA3 vector must be floating point, got {weight.dtype}")
        scales_bias = tensors.get("scales_bias")
        if scales_bias is not None and (scales_bias.numel() != 1 or float(scales_bias) not in (0.0, 1.0)):
            raise ValueError(f"{name}.scales_bias: must be one value 0 or 1, got a tensor of shape "
                             f"{tuple(scales_bias.shape)}")
        if scales_bias is not None and float(scales_bias) and not on_input and geometry.has_bias:
            raise ValueError(
                f"{name}: a peft IA3 vector scales this layer's outputs together with its bias (y = (W x + b) * ia3_l); "
                "sdadapt's and LyCORIS' (IA)³ leave the bias alone, so this layer would change differently. peft adapters "
                "convert exactly on bias-free or feed-forward (input-scaled) layers only; apply this one with peft."
            )
        module = cls(geometry, on_input=on_input, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.weight.copy_(weight)
        return module

    @classmethod
    def file_rank(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, bool]:
        """IA³ has no rank: ``(None, False)``."""
        return None, False
