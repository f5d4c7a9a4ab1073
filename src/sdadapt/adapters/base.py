"""What every adapter family shares: the base-layer geometry and the adapter module contract.

An adapter module never replaces the layer it adapts. It lives beside it (see ``inject.py``) and
computes the *delta output* ``Δy`` that a forward hook adds to the base layer's output, so the
base layer keeps its class, its ``forward`` and its ``state_dict()`` keys.

Weights are always shaped ``(out, in, *kernel)`` so one formula serves ``nn.Linear``
(``kernel = ()``) and ``nn.Conv2d`` (``kernel = (kh, kw)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerGeometry", "AdapterModule", "adapter_input", "autocast_casts", "autocast_dtype", "geometry_of",
           "graph_capturing", "refresh_scale_after_load", "rank_alpha_for", "ConvRankAlpha", "drop_output_rows"]


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and convolution parameters of the base layer an adapter sits on.

    ``kernel == ()`` means a linear layer; otherwise a 2-D convolution with the given
    ``stride``/``padding``/``dilation``/``padding_mode`` (groups is always 1).

    ``norm`` marks a normalisation layer's affine weights instead (``weight``/``bias`` of shape
    ``(C,)``, ``out_features == in_features == C``): ``"group"`` (``nn.GroupNorm`` of ``norm_groups``
    groups), ``"layer"`` (``nn.LayerNorm`` over the last axis) or ``"affine"`` (a checkpoint's 1-D
    weight, the kind unknown: enough to merge, not to run). Only families with ``adapts_norms``
    (LyCORIS' norm modules) take such a geometry; the others only ``norm == ""``.
    """

    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"
    has_bias: bool = False
    norm: str = ""
    norm_groups: int = 0
    norm_eps: float = 0.0

    @property
    def is_conv(self) -> bool:
        return len(self.kernel) > 0

    @classmethod
    def from_weight_shape(cls, shape: tuple[int, ...], *, has_bias: bool = False) -> LayerGeometry:
        """The geometry of a checkpoint weight of ``shape``: ``(out, in)`` Linear, ``(out, in, kh, kw)``
        Conv2d (stride 1, no padding: enough to merge), ``(C,)`` a normalisation layer's affine weight
        (``norm="affine"``: merges, does not run).

        Raises:
            ValueError: another number of axes.
        """
        if len(shape) == 1:
            return cls(int(shape[0]), int(shape[0]), has_bias=has_bias, norm="affine")
        if len(shape) not in (2, 4):
            raise ValueError(f"a layer weight is (C,), (out, in) or (out, in, kh, kw), got shape {tuple(shape)}")
        return cls(int(shape[0]), int(shape[1]), tuple(int(k) for k in shape[2:]), has_bias=has_bias)

    @property
    def is_norm(self) -> bool:
        """A normalisation layer's affine weights (1-D ``(C,)``), not a Linear/Conv2d weight."""
        return bool(self.norm)

    @property
    def is_kxk(self) -> bool:
        """A convolution with a kernel larger than 1x1 (kohya's ``conv_dim`` layers)."""
        return self.is_conv and any(k != 1 for k in self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.norm:
            return (self.out_features,)
        return (self.out_features, self.in_features, *self.kernel)

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """Apply ``weight`` (r, in, *kernel) with this layer's stride/padding/dilation.

        For a linear layer this is ``x @ weight.T``; for a conv it is ``F.conv2d`` honouring a
        non-zero ``padding_mode`` exactly as ``nn.Conv2d`` does.
        """
        if not self.is_conv:
            return F.linear(x, weight)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            return F.conv2d(x, weight, None, self.stride, 0, self.dilation)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """``F.pad`` amounts (left, right, top, bottom), as ``nn.Conv2d`` pads for a non-zero mode.

        ``padding="same"`` pads ``d·(k-1)`` per axis, the smaller half first (like ``nn.Conv2d``);
        ``"valid"`` pads nothing.
        """
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            pads: list[int] = []
            for k, d in zip(reversed(self.kernel), reversed(self.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        ph, pw = self.padding
        return (pw, pw, ph, ph)


def geometry_of(module: nn.Module, *, name: str = "<module>") -> LayerGeometry:
    """Read the :class:`LayerGeometry` of an ``nn.Linear`` or ``nn.Conv2d`` (subclasses count), or of
    an affine ``nn.GroupNorm`` / 1-D ``nn.LayerNorm`` (``norm`` set: only norm families adapt it).

    Raises:
        TypeError: for any other module type, or a grouped convolution, naming ``name``.
    """
    if isinstance(module, nn.Linear):
        return LayerGeometry(module.out_features, module.in_features, has_bias=module.bias is not None)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError(
                f"{name}: Conv2d with groups={module.groups} is not supported by sdadapt adapters "
                f"(only groups=1); exclude it from the targets, e.g. `targets & ~by_name('{name}')`."
            )
        return LayerGeometry(
            module.out_channels,
            module.in_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
            module.padding_mode,
            module.bias is not None,
        )
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None:
        if isinstance(module, nn.GroupNorm):
            return LayerGeometry(module.num_channels, module.num_channels, has_bias=module.bias is not None,
                                 norm="group", norm_groups=module.num_groups, norm_eps=module.eps)
        if len(module.normalized_shape) == 1:
            channels = module.normalized_shape[0]
            return LayerGeometry(channels, channels, has_bias=module.bias is not None, norm="layer",
                                 norm_eps=module.eps)
    raise TypeError(
        f"{name}: cannot adapt a {type(module).__name__}; sdadapt adapters wrap nn.Linear or "
        "nn.Conv2d (subclasses count), LyCORIS norm modules (NormConfig) an affine nn.GroupNorm or a 1-D "
        "nn.LayerNorm. Narrow the targets with by_type(nn.Linear, nn.Conv2d)."
    )


class AdapterModule(nn.Module):
    """Contract of one adapter family's module.

    Subclasses implement:
      * ``delta_weight()`` -> (out, in, *kernel): the scaled weight delta, via the family's pure
        function (the merge path);
      * ``forward(x)`` -> Δy: the delta *output* for the base layer's input ``x`` (the training
        path), equal to ``geometry.conv(x, delta_weight())`` up to dropout;
      * ``file_tensors()`` / ``from_file_tensors()``: the family's canonical tensors, keyed by
        the suffixes files use (``lora_down.weight``, ``lora_up.weight``, ``alpha`` ...).

    Families whose merged weight is not ``W + ΔW`` (DoRA: ``m · (W + ΔW) / ‖W + ΔW‖``) set
    ``uses_base_weight = True``, override :meth:`merge_delta` and take the weight as ``forward(x,
    base_weight)`` (:meth:`delta_output` passes it on); both get the layer's weight *without* merged
    deltas. A family with a bias delta (``diff_b``) overrides :meth:`bias_delta`. The injector and
    ``apply_lora`` only ever call these three.

    ``multiplier`` is the run-time strength (a Python float, not saved). Families fold it into a
    0-dim ``scale`` buffer (:meth:`refresh_scale`) that ``forward`` reads, so changing the strength
    is an in-place buffer update: no recompilation of a ``torch.compile``'d model, and one multiply
    per layer on the hot path.
    """

    # ---- the family's file vocabulary: everything outside adapters/ derives from these ----
    family: ClassVar[str] = ""
    #: every per-layer tensor suffix this family writes (``"lora_down.weight"``, ``"alpha"`` ...)
    file_keys: ClassVar[tuple[str, ...]] = ()
    #: suffixes whose presence identifies the family (a layer with any of them is this family's)
    marker_keys: ClassVar[tuple[str, ...]] = ()
    #: suffixes whose axis 0 is the layer's rank, in order of preference (none: no rank)
    rank_keys: ClassVar[tuple[str, ...]] = ()
    #: suffixes present only in the Tucker variant (``lora_mid.weight``, ``hada_t1`` ...)
    tucker_keys: ClassVar[tuple[str, ...]] = ()
    #: suffixes the delta is linear in: multiplying each present one by ``s`` scales (ΔW, Δb) by
    #: ``s`` (block weights on a file state); empty when the merged weight is not linear (DoRA)
    linear_keys: ClassVar[tuple[str, ...]] = ()
    #: LyCORIS' ``algo`` name for files of this family (``ss_network_args``)
    lycoris_algo: ClassVar[str] = ""
    #: the family wraps another family's tensors (DoRA: ``dora_scale`` beside LoRA/LoHa/LoKr ones)
    wraps_family: ClassVar[bool] = False
    #: the delta depends on the base weight (DoRA); the hook then passes it to delta_output
    uses_base_weight: ClassVar[bool] = False
    #: the family adapts normalisation layers (``LayerGeometry.norm`` set, 1-D weights) and only those;
    #: every other family adapts only Linear/Conv2d layers (the registry refuses the mix-up)
    adapts_norms: ClassVar[bool] = False
    #: the strength-1 scale is the file's ``alpha / r`` (LoRA, LoHa, LoKr, GLoRA: :meth:`base_scale`);
    #: ``False``: 1 (``alpha`` is absent or means something else, as OFT's constraint)
    scale_is_alpha_over_rank: ClassVar[bool] = False
    #: the delta's first op on the input is a linear or convolution (LoRA's down-projection): under
    #: autocast that op casts a half-precision input to autocast's dtype itself, so the hook leaves
    #: it as it is instead of casting it to the adapter's dtype first (a cast autocast undoes: the
    #: same values, two kernels and a full-size copy less per layer and pass)
    input_cast_by_autocast: ClassVar[bool] = False
    #: ``(group, index)`` while the adapter's down-projection is shared with sibling layers that
    #: read the same input (``shared_input.batch_shared_input_adapters``); ``None`` otherwise
    _shared_input: tuple | None = None
    #: the base layer's output when it already includes this adapter's delta (``adapters.fused_lora`` run
    #: by ``training.fused_lora``): the hook then returns it as it is; one call only
    _served_output: Tensor | None = None

    geometry: LayerGeometry

    def __init__(self, geometry: LayerGeometry) -> None:
        super().__init__()
        self.geometry = geometry
        self.multiplier = 1.0
        self.enabled = True
        self.merged = False
        self.module_dropout = 0.0

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge_delta(self, base_weight: Tensor) -> Tensor:
        """(out, in, *kernel): what merging adds to ``base_weight`` (the weight without merged deltas).

        Additive families return :meth:`delta_weight` and ignore ``base_weight``.
        """
        return self.delta_weight()

    def bias_delta(self) -> Tensor | None:
        """(out,): what merging adds to the layer's bias, or ``None`` (most families)."""
        return None

    def init_from_base(self, weight: Tensor) -> Tensor | None:
        """Initialise from the base layer's weight (out, in, *kernel) at injection.

        The injection hook every family may implement: DoRA sets its magnitude ``‖W‖``; a
        PiSSA-initialised LoRA takes ``W``'s principal directions and returns the residual weight
        the base layer must hold from then on (restored exactly by ``remove()``). Return ``None``
        to leave the base weight alone (the default: most families ignore it).
        """
        return None

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape ``(out, in, *kernel)`` one layer's file tensors imply (shapes
        only), or ``None`` when the file alone cannot tell (the default; the LoRA file tools then
        ask for the base checkpoint)."""
        return None

    @classmethod
    def file_rank(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, bool]:
        """(rank, is a kxk conv) of one layer from its file tensors' shapes, for reports and
        kohya metadata. The rank is axis 0 of the first :attr:`rank_keys` present (``None``
        when the family has no rank, e.g. full deltas or LoKr with two full factors); a layer
        is kxk when a Tucker key is present or a 4-D rank tensor has a kernel larger than 1x1."""
        for key in cls.rank_keys:
            if key in shapes and shapes[key]:
                shape = shapes[key]
                return shape[0], any(k in shapes for k in cls.tucker_keys) or (len(shape) == 4 and shape[2] * shape[3] > 1)
        return None, any(k in shapes for k in cls.tucker_keys)

    @classmethod
    def lycoris_algo_of_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> str:
        """LyCORIS' ``algo`` for one layer from its file tensors' shapes: :attr:`lycoris_algo` unless a
        family's layouts differ in shapes only (OFT: 3-D ``oft_blocks`` ``diag-oft``, 4-D ``boft``)."""
        return cls.lycoris_algo

    def delta_output(self, x: Tensor, base_weight: Tensor | None = None) -> Tensor:
        """Δy for base input ``x``: ``self(x, base_weight)`` when :attr:`uses_base_weight`, else ``self(x)``
        (``base_weight`` unread)."""
        return self(x, base_weight) if self.uses_base_weight else self(x)

    def set_multiplier(self, value: float) -> None:
        """Set the run-time strength and refresh the cached scale."""
        self.multiplier = float(value)
        self.refresh_scale()

    def base_scale(self) -> float:
        """The family's scale at strength 1: ``alpha / r`` (the 0-dim ``alpha`` buffer over :attr:`rank`)
        when :attr:`scale_is_alpha_over_rank`, else 1. A family with another rule overrides it (LoKr:
        1 with both factors full)."""
        if self.scale_is_alpha_over_rank:
            return float(self.alpha) / self.rank  # type: ignore[attr-defined]
        return 1.0

    def refresh_scale(self) -> None:
        """``scale ← base_scale() · multiplier`` in place (compiled graphs see the new value), for a
        family whose ``forward`` reads a 0-dim ``scale`` buffer; nothing for one without it."""
        scale = getattr(self, "scale", None)
        if isinstance(scale, Tensor):
            with torch.no_grad():
                scale.fill_(self.base_scale() * self.multiplier)

    def _register_alpha_scale(self, alpha: float, scale: float, device: torch.device | str | None) -> None:
        """Register the 0-dim float32 buffers of a family whose scale is ``alpha / r``: ``alpha``
        (saved, the file's value) and ``scale`` (the strength-1 scale; not saved, :meth:`refresh_scale`
        keeps it ``base_scale() · multiplier``), and the post-hook that refreshes ``scale`` when
        ``load_state_dict`` brings another ``alpha``."""
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32, device=device), persistent=False)
        self.register_load_state_dict_post_hook(refresh_scale_after_load)

    def file_tensors(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy a layer's file tensors (:meth:`file_tensors`' keys and shapes) into the adapter. Families whose file
        tensors are the live parameters copy into them; others (DyLoRA's row concatenations, a PiSSA LoRA's rank-2r
        file form) override it."""
        own = self.file_tensors()
        for key, value in tensors.items():
            own[key].copy_(value)

    @property
    def rank(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook registered on the base layer: ``y + Δy`` unless merged or disabled.

        Traceable by ``torch.compile`` without a graph break (``tests/test_compile_graphs.py``):
        no tensor is read back to Python on the traced path."""
        served = self._served_output
        if served is not None:  # (set only outside tracing, by training.fused_lora)
            object.__setattr__(self, "_served_output", None)  # (not nn.Module's: a plain attribute)
            if served is output:  # the layer's output has the delta (adapters.fused_lora)
                return output
        if self.merged or not self.enabled:
            return output
        if self.training and self.module_dropout > 0:
            if torch.compiler.is_compiling() or graph_capturing():
                # a traced graph cannot branch on a random draw without a host sync (a graph
                # break per layer), and a CUDA graph would replay the draw made at capture (the
                # same layers dropped at every step): draw on the device and select, same distribution
                keep = torch.rand((), device=output.device) >= self.module_dropout
                return torch.where(keep, self._delta_added(module, args[0], output), output)
            if float(torch.rand(())) < self.module_dropout:
                return output
        return self._delta_added(module, args[0], output)

    def _delta_added(self, module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        """``output + Δy`` for the base layer ``module``'s input ``x`` (the hook past its switches)."""
        shared = self._shared_input
        if shared is not None:  # one matmul for the group's down-projections; None: not this call
            adapted = shared[0].adapted_output(shared[1], x, output)
            if adapted is not None:
                return adapted
        x = adapter_input(x, self.delta_dtype(), cast_by_autocast=self.input_cast_by_autocast)
        if self.uses_base_weight:
            # the weight without merged deltas of other adapters (the slot keeps the original)
            slot = module._modules.get("sdadapt")
            original = getattr(slot, "original_weight", None)
            delta = self.delta_output(x, module.weight if original is None else original)
        else:
            delta = self(x)
        return output + delta.to(output.dtype)

    def delta_dtype(self) -> torch.dtype:
        """dtype the adapter computes in (its parameters')."""
        return next(self.parameters()).dtype


def adapter_input(x: Tensor, dtype: torch.dtype, *, cast_by_autocast: bool) -> Tensor:
    """``x`` (..., in) as an adapter computing in ``dtype`` reads it: cast, unless it already has that
    dtype or (``cast_by_autocast``: the adapter's first op is a linear or convolution) autocast will
    cast it in that op anyway."""
    if x.dtype == dtype or (cast_by_autocast and autocast_casts(x)):
        return x
    return x.to(dtype)


def autocast_casts(x: Tensor) -> bool:
    """Whether a linear or convolution under the current autocast casts ``x`` itself: a float16 or
    bfloat16 tensor while autocast is on for its device (casting it to float32 first would only be
    undone: float16/bfloat16 → float32 is exact)."""
    return x.dtype in (torch.float16, torch.bfloat16) and _autocast_on(x.device.type)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` (``"cuda"``, ``"cpu"``), ``None`` when it is off there."""
    if not _autocast_on(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # pragma: no cover - torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 (no device argument)
        return torch.is_autocast_enabled() if device_type == "cuda" else (
            device_type == "cpu" and torch.is_autocast_cpu_enabled())


def graph_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (a host decision made now
    would be replayed unchanged by every replay)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refresh_scale_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: a loaded ``alpha`` changes the cached scale."""
    module.refresh_scale()  # type: ignore[operator]


def drop_output_rows(delta: Tensor, p: float) -> Tensor:
    """LyCORIS' rank dropout of a weight delta (its LoHa, LoKr and DoRA ``rank_dropout``): ``delta`` (out, in, *k)
    with each output row kept with probability ``1 − p``, one draw for the whole batch, no rescaling (LyCORIS'
    default ``rank_dropout_scale=False``). Drawn from the global RNG on ``delta``'s device."""
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    return delta * keep.view(-1, *[1] * (delta.dim() - 1))


def check_ranks_and_rates(config, *, ranks: tuple[str, ...] = ("rank", "conv_rank"),
                          rates: tuple[str, ...] = ("module_dropout",)) -> None:
    """Validate a family config's rank fields (positive ints or ``None``) and rate fields (in [0, 1)).

    Raises:
        ValueError: naming the config class and field, e.g. ``LoHaConfig.rank must be a positive int``.
    """
    name = type(config).__name__
    for field in ranks:
        value = getattr(config, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    for field in rates:
        value = getattr(config, field)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}.{field} must be in [0, 1), got {value!r}")


class ConvRankAlpha:
    """Mixin of the family configs with ``rank``, ``alpha``, ``conv_rank`` and ``conv_alpha`` fields
    (LoRA, LoHa, LoKr, GLoRA)."""

    def rank_alpha_for(self, geometry: LayerGeometry) -> tuple[int, float | None]:
        """(rank, alpha) for a layer: kxk convolutions use ``conv_rank``/``conv_alpha``."""
        return rank_alpha_for(geometry, self.rank, self.alpha, self.conv_rank, self.conv_alpha)  # type: ignore[attr-defined]


def rank_alpha_for(
    geometry: LayerGeometry,
    rank: int,
    alpha: float | None,
    conv_rank: int | None,
    conv_alpha: float | None,
) -> tuple[int, float | None]:
    """(rank, alpha) for a layer: kxk convolutions use ``conv_rank``/``conv_alpha`` when given."""
    if geometry.is_kxk:
        return (
            conv_rank if conv_rank is not None else rank,
            conv_alpha if conv_alpha is not None else alpha,
        )
    return rank, alpha
