"""LoRA and LoCon: low-rank deltas on linear and convolution layers.

Math (Hu et al. 2021; kohya's LoCon for convolutions). For a base weight ``W`` of shape
``(out, in, *k)``::

    ΔW = scale · up ⋅ down            up: (out, r, 1..), down: (r, in, *k)
    y  = W x + scale · up(down(x))    scale = alpha / r   (rank-stabilised: alpha / sqrt(r))

For a convolution, ``down`` is a convolution with the base layer's kernel, stride, padding and
dilation and ``up`` is a 1x1 convolution, so ``ΔW[o, i] = Σ_r up[o, r] · down[r, i]`` — the same
formula as the linear case after flattening the kernel into the input axis.

Tucker LoCon (LyCORIS ``use_tucker``, kxk convolutions only): ``down`` (r, in, 1, 1) is a 1x1
convolution, ``mid`` (r, r, kh, kw) carries the kernel, stride, padding and dilation, and ``up`` is
1x1 again; ``ΔW = scale · rebuild_tucker(mid, upᵀ, down)`` (see :mod:`.tucker`), stored in files as
``lora_mid.weight``.

Files store ``alpha`` such that ``alpha / r`` is always the scale (a rank-stabilised adapter stores
``alpha · sqrt(r)``, as LyCORIS does), so readers never need to know how the scale was chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterModule, ConvRankAlpha, LayerGeometry, check_ranks_and_rates, geometry_of
from .tucker import rebuild_tucker
from .weight_casts import cast_scaled_weight, cast_weight, read_through_cast

__all__ = [
    "LoRAConfig",
    "LoRAModule",
    "lora_delta_weight",
    "lora_forward",
    "lora_scale",
    "pissa_factors",
]


def lora_scale(alpha: float | None, rank: int, *, rank_stabilized: bool = False) -> float:
    """The scale a LoRA applies: ``alpha / r`` (``alpha / sqrt(r)`` rank-stabilised).

    ``alpha`` of ``None`` means ``alpha = r`` (scale 1), the convention of kohya, LyCORIS, A1111, ComfyUI
    and diffusers for files without an alpha; ``0`` too, as kohya's and LyCORIS' loaders read it (A1111 and
    ComfyUI compute ``0 / r`` there: no change).
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    if alpha is None or alpha == 0:
        alpha = float(rank) if not rank_stabilized else math.sqrt(rank)
    return float(alpha) / (math.sqrt(rank) if rank_stabilized else rank)


def lora_delta_weight(
    up: Tensor, down: Tensor, scale: float | Tensor = 1.0, *, mid: Tensor | None = None
) -> Tensor:
    """``ΔW = scale · up ⋅ down`` for linear and convolution layers alike.

    Args:
        up: (out, r) or (out, r, 1, 1).
        down: (r, in) or (r, in, kh, kw); (r, in, 1, 1) with a Tucker ``mid``.
        scale: scalar (float or 0-dim tensor).
        mid: optional Tucker core (r, r, kh, kw) (LyCORIS ``lora_mid``).

    Returns:
        (out, in, *kernel): the delta in ``down``'s (or ``mid``'s) kernel layout, dtype of the inputs.

    One allocation of the delta's size: the product is scaled in place, the same rounding as
    ``product * scale`` (bit for bit: the same kernel writes into the product instead of a new
    tensor; a GEMM with ``alpha = scale`` would round differently). ``tests/test_merge_lora_memory.py``
    checks it against the out-of-place formula for float32/float16/bfloat16.
    """
    out_features, rank = up.shape[0], up.shape[1]
    if down.shape[0] != rank:
        raise ValueError(f"LoRA up has rank {rank} but down has rank {down.shape[0]}")
    if mid is not None:
        # W[o, i, *k] = Σ_ab mid[a, b, *k] · up[o, a] · down[b, i]
        w_out = up.reshape(out_features, rank).transpose(0, 1)  # (r, out)
        return _scaled(rebuild_tucker(mid, w_out, down.reshape(rank, -1)), scale)
    # (out, r) @ (r, in*k) -> (out, in*k) -> (out, in, *k)
    delta = up.reshape(out_features, rank) @ down.reshape(rank, -1)
    return _scaled(delta, scale).reshape(out_features, *down.shape[1:])


def _scaled(product: Tensor, scale: float | Tensor) -> Tensor:  # (also LoHa's, LoKr's and full's)
    """``product * scale``, in place in ``product`` (a fresh tensor of the caller's) when that is the
    same tensor: a Python number, or a 0-dim tensor that keeps ``product``'s dtype (an out-of-place
    multiply otherwise). Autograd takes it as it takes ``product * scale`` (a scale that needs a
    gradient: autograd keeps the product's old value itself)."""
    # (a 0-dim float scale never changes a float product's dtype: torch's promotion lets a dimensioned tensor win
    # within its category; checked with is_floating_point, not torch.result_type, which torch.compile cannot trace)
    if isinstance(scale, Tensor) and (scale.dim() != 0 or not (scale.is_floating_point() and product.is_floating_point())):
        return product * scale
    return product.mul_(scale)


def lora_forward(
    x: Tensor,
    up: Tensor,
    down: Tensor,
    scale: float | Tensor,
    geometry: LayerGeometry | nn.Module,
    *,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    training: bool = False,
    mid: Tensor | None = None,
) -> Tensor:
    """The delta output ``scale · up(down(x))`` without forming ``ΔW``, as ``(scale · up)(down(x))``:
    the scale multiplies the small (out, r) weight, not the (..., r) activation (under autocast the
    product is rounded once, with the weight's cast).

    Args:
        x: the base layer's input, (..., in) for linear, (B, in, H, W) for conv.
        up, down: as in :func:`lora_delta_weight`.
        geometry: the base layer's geometry (conv stride/padding/dilation for ``down``), or the base layer itself
            (``nn.Linear`` / ``nn.Conv2d``: :func:`~sdadapt.adapters.base.geometry_of`).
        dropout: dropout on the rank activations (kohya's placement; cheaper than peft's
            dropout on the input, which keeps a second copy of ``x`` alive).
        rank_dropout: drops whole rank channels per sample and rescales by ``1/(1-p)``.
        mid: Tucker core (r, r, kh, kw): then ``down`` is a 1x1 conv and ``mid`` carries the
            layer's kernel, stride, padding and dilation.

    Returns:
        Δy with the base layer's output shape: (..., out) or (B, out, H', W').
    """
    if isinstance(geometry, nn.Module):
        geometry = geometry_of(geometry)
    if mid is None:
        h = geometry.conv(x, down)  # (..., r) or (B, r, H', W')
    else:
        # a pointwise conv commutes with any padding mode, so padding once in `mid` is exact
        h = geometry.conv(F.conv2d(x, down), mid)  # (B, r, H', W')
    if training and dropout > 0:
        h = F.dropout(h, p=dropout, training=True)
    if training and rank_dropout > 0:
        rank = down.shape[0]
        keep = (torch.rand(h.shape[0], rank, device=h.device) > rank_dropout).to(h.dtype)
        if geometry.is_conv:
            keep = keep[:, :, None, None]  # (B, r, 1, 1)
        else:
            keep = keep.view(h.shape[0], *([1] * (h.dim() - 2)), rank)  # (B, 1.., r)
        h = h * keep
        scale = scale / (1.0 - rank_dropout)
    up = _scaled_up(up, scale)
    if geometry.is_conv:
        return F.conv2d(h, up)  # up: (out, r, 1, 1)
    return F.linear(h, up)  # up: (out, r)


def _scaled_up(up: Tensor, scale: float | Tensor) -> Tensor:
    """``scale · up`` (no op for a plain 1; never in place: ``up`` is the caller's factor), the factor
    :func:`lora_forward` applies."""
    if isinstance(scale, (int, float)) and scale == 1:
        return up
    return up * scale


def pissa_factors(weight: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA initialisation (Meng et al. 2024): principal singular directions of ``W``.

    ``W = U S Vᵀ``; ``up = U_r sqrt(S_r) / sqrt(scale)``, ``down = sqrt(S_r) V_rᵀ / sqrt(scale)``,
    so ``scale · up ⋅ down`` is the best rank-r approximation of ``W`` and the base keeps the
    residual.

    Args:
        weight: (out, in, *k) base weight.

    Returns:
        ``(up (out, r), down (r, in, *k), residual (out, in, *k))`` in float32.
    """
    out_features = weight.shape[0]
    w = weight.detach().float().reshape(out_features, -1)  # (out, in*k)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = (s[:rank] / scale).sqrt()  # (r,)
    up = u[:, :rank] * root  # (out, r)
    down = (root[:, None] * vh[:rank]).reshape(rank, *weight.shape[1:])  # (r, in, *k)
    residual = weight.float() - lora_delta_weight(up, down, scale)
    return up, down, residual


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(ConvRankAlpha):
    """LoRA / LoCon hyper-parameters.

    Attributes:
        rank: r for linear and 1x1 conv layers.
        alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
        conv_rank, conv_alpha: r and alpha for kxk convolutions (kohya's ``conv_dim`` /
            ``conv_alpha``); each ``None`` falls back to ``rank`` / ``alpha`` (kohya's own CLI
            default for ``conv_alpha`` is 1.0 — pass it explicitly to match).
        rank_stabilized: scale ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
        dropout, rank_dropout, module_dropout: training-time regularisers (kohya semantics).
        init: ``"kaiming"`` (kohya: down ~ kaiming-uniform(a=sqrt 5), up = 0), ``"gaussian"``
            (peft/diffusers: down ~ N(0, 1/r), up = 0) or ``"pissa"`` (SVD of the base weight;
            the base keeps the residual, restored by ``remove()``).
        use_tucker: kxk convolutions get a Tucker core ``lora_mid`` (r, r, kh, kw) between a 1x1
            ``down`` and ``up`` (LyCORIS LoCon ``use_tucker``); other layers are unaffected.
    """

    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    rank_stabilized: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    use_tucker: bool = False

    def __post_init__(self) -> None:
        check_ranks_and_rates(self, rates=("dropout", "rank_dropout", "module_dropout"))
        if self.init not in ("kaiming", "gaussian", "pissa"):
            raise ValueError(
                f"LoRAConfig.init must be 'kaiming', 'gaussian' or 'pissa', got {self.init!r}"
            )
        if self.use_tucker and self.init == "pissa":
            raise ValueError("LoRAConfig: init='pissa' has no Tucker form; use use_tucker=False with PiSSA")


class LoRAModule(AdapterModule):
    """One LoRA/LoCon adapter for one base layer (a thin shell over the functions above).

    Parameters: ``lora_down`` (r, in, *k), ``lora_up`` (out, r[, 1, 1]) and, for Tucker LoCon,
    ``lora_mid`` (r, r, *k) with ``lora_down`` (r, in, 1, 1); buffer ``alpha`` (0-dim, saved) with
    the file convention ``scale = alpha / r``.

    ``init_weights=False`` leaves the factors uninitialised (``torch.empty``) and draws nothing from
    the global RNG: for a caller that fills every factor next, as :meth:`from_file_tensors` does.
    """

    family: ClassVar[str] = "lora"
    scale_is_alpha_over_rank: ClassVar[bool] = True
    input_cast_by_autocast: ClassVar[bool] = True  # (lora_forward's first op: the down-projection)
    file_keys: ClassVar[tuple[str, ...]] = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "diff_b")
    marker_keys: ClassVar[tuple[str, ...]] = ("lora_down.weight", "lora_up.weight")
    rank_keys: ClassVar[tuple[str, ...]] = ("lora_down.weight",)
    tucker_keys: ClassVar[tuple[str, ...]] = ("lora_mid.weight",)
    linear_keys: ClassVar[tuple[str, ...]] = ("lora_up.weight", "diff_b")
    lycoris_algo: ClassVar[str] = "lora"

    def __init__(
        self,
        geometry: LayerGeometry,
        rank: int,
        alpha: float | None = None,
        *,
        rank_stabilized: bool = False,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init: str = "kaiming",
        use_tucker: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__(geometry)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        scale = lora_scale(alpha, rank, rank_stabilized=rank_stabilized)
        factory = {"dtype": dtype, "device": device}
        up_shape = (geometry.out_features, rank, *([1] * len(geometry.kernel)))
        tucker = use_tucker and geometry.is_kxk
        down_kernel = (1,) * len(geometry.kernel) if tucker else geometry.kernel
        self.lora_down = nn.Parameter(torch.empty(rank, geometry.in_features, *down_kernel, **factory))
        self.lora_up = nn.Parameter((torch.zeros if init_weights else torch.empty)(up_shape, **factory))
        self.lora_mid = nn.Parameter(torch.empty(rank, rank, *geometry.kernel, **factory)) if tucker else None
        read_through_cast(*(p for p in (self.lora_down, self.lora_mid) if p is not None))
        read_through_cast(self.lora_up, scale_of=self)  # (its copy is scale · up: lora_forward's product)
        # a file's bias delta beside the factors (ComfyUI's extraction with bias_diff): added to the bias at the
        # strength alone, not at alpha / r (ComfyUI's loader patches the bias apart); None for trained LoRAs
        self.diff_b: nn.Parameter | None = None
        # PiSSA's starting factors, set by init_from_base (not saved): what file_tensors() subtracts
        self.register_buffer("pissa_up0", None, persistent=False)
        self.register_buffer("pissa_down0", None, persistent=False)
        # stored alpha follows the file convention scale = alpha / r; scale (alpha / r · multiplier) is
        # cached, not saved: one multiply per call on the hot path
        self._register_alpha_scale(scale * rank, scale, device)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.init = init
        if init not in ("kaiming", "gaussian", "pissa"):
            raise ValueError(f"unknown LoRA init {init!r}; use 'kaiming', 'gaussian' or 'pissa'")
        if not init_weights:  # the caller fills every factor (from_file_tensors): no draw, no global RNG use
            return
        if self.lora_mid is not None:  # LyCORIS: mid ~ kaiming-uniform(a=sqrt 5)
            nn.init.kaiming_uniform_(self.lora_mid, a=math.sqrt(5))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_down, std=1.0 / rank)
        # (pissa: the factors are set by the injector, which owns the base weight)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def delta_dtype(self) -> torch.dtype:
        return self.lora_down.dtype

    def delta_weight(self) -> Tensor:
        """(out, in, *k): ``scale · up ⋅ down``."""
        return lora_delta_weight(self.lora_up, self.lora_down, self.scale, mid=self.lora_mid)

    def bias_delta(self) -> Tensor | None:
        """(out,): ``multiplier · diff_b`` of a file's bias delta, or ``None``."""
        return None if self.diff_b is None else self.diff_b * self.multiplier

    def forward(self, x: Tensor) -> Tensor:
        """Δy for base input ``x`` (see :func:`lora_forward`), plus a file's bias delta."""
        out = self._factors_forward(x)
        if self.diff_b is None:
            return out
        bias = self.bias_delta()
        return out + (bias.view(-1, 1, 1) if self.geometry.is_conv else bias)  # type: ignore[union-attr]

    def _factors_forward(self, x: Tensor) -> Tensor:
        mid = self.lora_mid
        if self.training and self.rank_dropout > 0:  # (its 1/(1-p) joins the scale: the factors as they are)
            up, scale = self.lora_up, self.scale
        else:  # scale · up: cast with every trained factor in one go when the step batches them (weight_casts)
            up, scale = cast_scaled_weight(self.lora_up, self.scale), 1.0
        return lora_forward(
            x,
            up,
            cast_weight(self.lora_down),
            scale,
            self.geometry,
            dropout=self.dropout,
            rank_dropout=self.rank_dropout,
            training=self.training,
            mid=None if mid is None else cast_weight(mid),
        )

    def init_from_base(self, weight: Tensor) -> Tensor | None:
        """PiSSA (``init="pissa"``): set ``up``/``down`` from ``weight``'s SVD and return the
        residual base weight; other inits ignore the base weight (``None``)."""
        if self.init != "pissa":
            return None
        scale = self.base_scale()
        up, down, residual = pissa_factors(weight, self.rank, scale)
        with torch.no_grad():
            self.lora_up.copy_(up.reshape(self.lora_up.shape))
            self.lora_down.copy_(down)
        # the starting factors (not saved): the file form of a PiSSA adapter is its change to the original weight
        self.pissa_up0, self.pissa_down0 = self.lora_up.detach().clone(), self.lora_down.detach().clone()
        return residual

    def file_tensors(self) -> dict[str, Tensor]:
        """The file's tensors. A PiSSA adapter (:meth:`init_from_base`) trains over the residual base, so its file is
        its change to the original weight, ``s·(up·down − up₀·down₀)``, as peft's
        ``path_initial_model_for_weight_conversion`` writes it: ``up = [up, −up₀]``, ``down = [down; down₀]``, rank
        2r at the same scale (``alpha`` doubled) — a plain LoRA of the original model for any loader."""
        tensors = {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up, "alpha": self.alpha}
        if self.pissa_up0 is not None:
            tensors = {"lora_down.weight": torch.cat([self.lora_down, self.pissa_down0]),
                       "lora_up.weight": torch.cat([self.lora_up, -self.pissa_up0], dim=1), "alpha": self.alpha * 2}
        if self.lora_mid is not None:
            tensors["lora_mid.weight"] = self.lora_mid
        if self.diff_b is not None:
            tensors["diff_b"] = self.diff_b
        return tensors

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy :meth:`file_tensors`' form back in: a PiSSA adapter takes its trained half of the rank-2r factors
        (the other half must be its starting factors, to the file dtype's rounding); others copy as they are."""
        if self.pissa_up0 is None:  # (file_tensors() are the live tensors)
            super().load_file_tensors(tensors)
            return
        r = self.rank
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        tol = {"rtol": 4 * torch.finfo(down.dtype).eps, "atol": 4 * torch.finfo(down.dtype).eps}
        if (tuple(down.shape) != (2 * r, *self.lora_down.shape[1:]) or tuple(up.shape) != (up.shape[0], 2 * r, *up.shape[2:])
                or not torch.allclose(down[r:].to(self.pissa_down0), self.pissa_down0, **tol)
                or not torch.allclose(-up[:, r:].to(self.pissa_up0), self.pissa_up0, **tol)):
            raise ValueError(f"PiSSA adapter (rank {r}): the state is not this adapter's — its file form has rank {2 * r}, "
                             "the trained factors and then the adapter's own starting factors")
        self.lora_down.copy_(down[:r])
        self.lora_up.copy_(up[:, :r])
        if self.diff_b is not None and "diff_b" in tensors:
            self.diff_b.copy_(tensors["diff_b"])

    @classmethod
    def from_config(
        cls,
        config: LoRAConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "LoRAModule":
        """A fresh module for one layer (rank and alpha per :meth:`LoRAConfig.rank_alpha_for`)."""
        rank, alpha = config.rank_alpha_for(geometry)
        return cls(
            geometry,
            rank,
            alpha,
            rank_stabilized=config.rank_stabilized,
            dropout=config.dropout,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
            init=config.init,
            use_tucker=config.use_tucker,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> "LoRAModule":
        """Build from ``{"lora_down.weight", "lora_up.weight"[, "lora_mid.weight"][, "alpha"][, "diff_b"]}``; rank
        from shapes. ``diff_b`` (out,): a bias delta beside the factors, added at the strength alone (ComfyUI's
        "Extract and Save Lora" with bias_diff writes one for every layer with a bias).

        A convolution's ``lora_up.weight`` may be flat, ``(out, r)``: LyCORIS' DyLoRA saves its
        up blocks concatenated so (``up (out, r)``, ``down (r, in, kh, kw)``, ``alpha``), and A1111
        (``network_lora.py``) and ComfyUI (``weight_adapter/lora.py``) apply it as this LoRA,
        ``alpha / r · up ⋅ down``; the module holds it as ``(out, r, 1, 1)``.

        Raises:
            ValueError: if a tensor is missing or its shape does not fit the base layer.
        """
        missing = [k for k in ("lora_down.weight", "lora_up.weight") if k not in tensors]
        if missing:
            raise ValueError(f"{name}: LoRA tensors {missing} are missing (have {sorted(tensors)})")
        extra = sorted(set(tensors) - set(cls.file_keys))
        if extra:  # (never dropped unsaid)
            raise ValueError(f"{name}: a LoRA layer with {extra} beside its factors, which a LoRA layer does not hold")
        diff_b = tensors.get("diff_b")
        if diff_b is not None and tuple(diff_b.shape) != (geometry.out_features,):
            raise ValueError(f"{name}: the LoRA layer's bias delta diff_b is {tuple(diff_b.shape)}, the layer's bias "
                             f"({geometry.out_features},); the file was made for another model")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        if mid is not None:
            want_mid = (rank, rank, *geometry.kernel)
            if not geometry.is_kxk or tuple(mid.shape) != want_mid:
                raise ValueError(
                    f"{name}: LoRA lora_mid.weight {tuple(mid.shape)} does not fit the base layer of weight "
                    f"shape {geometry.weight_shape}: a Tucker core needs a kxk convolution and shape {want_mid}."
                )
        down_kernel = (1,) * len(geometry.kernel) if mid is not None else geometry.kernel
        want_down = (rank, geometry.in_features, *down_kernel)
        want_up = (geometry.out_features, rank, *([1] * len(geometry.kernel)))
        down_ok = tuple(down.shape) == want_down or (
            not geometry.is_conv and down.dim() == 4 and tuple(down.shape) == (*want_down, 1, 1)
        )
        up_ok = tuple(up.shape) == want_up or (
            not geometry.is_conv and up.dim() == 4 and tuple(up.shape) == (*want_up, 1, 1)
        ) or (  # LyCORIS DyLoRA writes a convolution's up flat, (out, r): A1111 and ComfyUI reshape it
            geometry.is_conv and mid is None and tuple(up.shape) == want_up[:2]
        )
        if not (down_ok and up_ok):
            raise ValueError(
                f"{name}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the "
                f"base layer of weight shape {geometry.weight_shape}; expected down {want_down} and "
                f"up {want_up}. The file was made for a different model (or a different rank/kernel)."
            )
        alpha = tensors.get("alpha")
        alpha_value = float(alpha) if alpha is not None else None
        module = cls(geometry, rank, alpha_value, use_tucker=mid is not None, dtype=down.dtype, device=down.device,
                     init_weights=False)
        with torch.no_grad():
            module.lora_down.copy_(down.reshape(module.lora_down.shape))
            module.lora_up.copy_(up.reshape(module.lora_up.shape))
            if mid is not None:
                module.lora_mid.copy_(mid)  # type: ignore[union-attr]
        if diff_b is not None:
            module.diff_b = nn.Parameter(diff_b.detach().clone())
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape ``(out, in, *kernel)`` one layer's file tensors imply (only shapes are read).

        ``(lora_up.shape[0], lora_down.shape[1], *kernel)`` with the kernel of ``lora_mid.weight``
        (Tucker) or ``lora_down.weight``; a Linear layer saved with 1x1 factors reads as
        ``(out, in, 1, 1)``. ``None`` when a factor is missing.
        """
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None or up is None or down.dim() < 2:
            return None
        mid = tensors.get("lora_mid.weight")
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        return (int(up.shape[0]), int(down.shape[1]), *(int(k) for k in kernel))
