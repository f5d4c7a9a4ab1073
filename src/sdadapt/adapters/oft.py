"""OFT: an orthogonal rotation of the base weight's output rows (Qiu et al. 2023; LyCORIS ``algo=diag-oft``
and ``algo=boft``; kohya's ``networks.oft``).

OFT is multiplicative: the merged weight is a rotation of ``W`` (out, in, *k), never ``W`` plus a
low-rank delta. Each rotation block comes from a trained ``(b, b)`` matrix ``A`` by the Cayley map::

    Q = A − Aᵀ                                 (skew-symmetric)
    Q ← Q · c / ‖Q‖   when c > 0 and ‖Q‖ > c   (COFT: c = alpha · out, ‖·‖ over ALL blocks at once)
    R = (I + Q)(I − Q)⁻¹                       (orthogonal; A = 0 gives R = I)

One file family, two layouts told apart by ``oft_blocks``' rank (the layer's tensor names are the
same, which is why they are one family here: LyCORIS' ``DiagOFTModule`` and ``ButterflyOFTModule``
share ``oft_blocks`` / ``rescale`` / ``alpha`` and the Cayley map):

* **Diag-OFT** (LyCORIS ``diag-oft``; kohya OFT, same tensors, prefix ``oft_unet_``): ``oft_blocks``
  ``(n, b, b)``, ``n·b = out``. ``R = diag(R_1 … R_n)`` and, block row by block row,
  ``W'[k] = R_kᵀ · W[k]`` (``einsum("k n m, k n ... -> k m ...")``, as LyCORIS, kohya and A1111 compute it).
* **BOFT** (LyCORIS ``boft``): ``oft_blocks`` ``(m, n, b, b)``, ``n·b = out``, ``b`` even. ``m``
  butterfly stages; stage ``i`` permutes the rows so that rows ``2^i·b/2`` apart meet in one block,
  applies ``R_{i,k} · rows`` (not transposed) and permutes back: ``W' = B_{m−1} ⋯ B_0 W``.

Then ``rescale`` (LyCORIS ``rescaled``, ``(out, 1, ...)``) scales each output row: ``W' ← rescale ⊙ W'``.

Strength ``s`` (``<lora:name:s>``, ``multiplier``): ``ΔW = s · (W' − W)`` — the effective change moved
linearly, as A1111 applies a file (``finalize_updown`` scales ``W' − W``) and as sdadapt treats DoRA.
At ``s = 1`` this is exactly LyCORIS' and kohya's merged weight; for Diag-OFT without ``rescale`` it
is theirs at every ``s`` (``s·R + (1 − s)·I`` is linear). LyCORIS interpolates each BOFT stage and keeps
``rescale`` at full strength at ``s ≠ 1``, so there (only) the two differ; at ``s = 0`` sdadapt leaves the
layer unchanged.

Files (``lora_unet_<layer>.<key>``; kohya's own OFT writes ``oft_unet_<layer>``):

* ``oft_blocks``: ``(n, b, b)`` (Diag-OFT / kohya) or ``(m, n, b, b)`` (BOFT); zero at init.
* ``alpha``: 0-dim, the COFT constraint per output channel (``c = alpha · out``; 0 = none). NOT a
  LoRA scale: LyCORIS' ``constraint`` network arg and kohya OFT's ``network_alpha`` write it.
  (kohya clamps even at ``alpha = 0``, which makes its OFT the identity; sdadapt reads 0 as LyCORIS does:
  no constraint.)
* ``rescale``: ``(out, 1[, 1, 1])``, LyCORIS only; ones at init.
* ``oft_diag`` (read, and written back as read): ``(n, b, b)``, the block matrices themselves, from LyCORIS dev
  builds of Nov 2023 – Feb 2024 (``DiagOFTModule.custom_state_dict`` = ``get_r()``: the Cayley rotation, with
  that build's rescale folded into its rows), before ``oft_blocks``. Applied as A1111 applies them
  (``extensions-builtin/Lora/network_oft.py``, ``is_R``): ``W'[k] = R_kᵀ · W[k]`` with ``R = oft_diag`` as given
  (no Cayley map, no constraint; ``b = oft_diag.shape[1]``, ``n = out / b``), ``ΔW = s · (W' − W)``.

The forward of an injected OFT computes ``Δy = op(x, ΔW)``: one rotation of the weight (``O(out·in·b)``,
small beside the matmul) and one matmul, the same cost as a LoRA's dense merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry
from .lokr import factorization

__all__ = [
    "OFTConfig",
    "OFTModule",
    "cayley_rotation",
    "diag_oft_rotate",
    "boft_rotate",
    "oft_merged_weight",
    "oft_delta_weight",
    "oft_block_layout",
    "power2_factorization",
]


def power2_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension = b · n`` with ``b`` even and ``n`` a power of two, ``b`` the largest even divisor
    ≤ ``factor`` that leaves a power of two (LyCORIS ``power2factorization``, same results); ``(0, 0)``
    when no such split exists (an odd ``dimension``, or ``factor`` < 2)."""
    if factor == -1:
        factor = dimension
    m = n = 0
    while m <= factor:
        m += 2
        while dimension % m != 0 and m < dimension:
            m += 2
        if m > factor:
            break
        if (dimension // m).bit_count() == 1:
            n = dimension // m
    if n == 0:
        return 0, 0
    return dimension // n, n


def oft_block_layout(out_features: int, dim: int, *, butterfly: bool) -> tuple[int, ...]:
    """The ``oft_blocks`` shape LyCORIS gives a layer of ``out_features`` rows for ``lora_dim = dim``.

    Diag-OFT: ``(n, b, b)`` with ``(b, n) = factorization(out, dim)`` (``b ≤ n``; ``b = dim`` when ``dim``
    divides ``out`` and ``dim² ≤ out``). BOFT: ``(m, n, b, b)`` with ``(b, n) = power2_factorization(out, dim)``
    and ``m = log2(n) + 1`` stages (LyCORIS' most).

    Raises:
        ValueError: BOFT on a width with no even × power-of-two split under ``dim``.
    """
    if not butterfly:
        b, n = factorization(out_features, dim)
        return (n, b, b)
    b, n = power2_factorization(out_features, dim)
    if n == 0:
        raise ValueError(f"BOFT cannot split a layer of {out_features} output channels with dim={dim}: it needs an even "
                         "block size b <= dim with out / b a power of two; use a larger dim or Diag-OFT")
    m = (n - 1).bit_count() + 1
    return (m, n, b, b)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cayley_rotation(blocks: Tensor, *, max_norm: float | Tensor = 0.0) -> Tensor:
    """Orthogonal blocks ``R = (I + Q)(I − Q)⁻¹`` of ``Q = A − Aᵀ``, ``Q`` scaled to norm ``max_norm``
    when ``max_norm > 0`` and ``‖Q‖ > max_norm`` (LyCORIS ``get_r``: one Frobenius norm over all blocks, plus 1e-8).

    Args:
        blocks: A, (..., b, b), any leading shape.
        max_norm: the COFT bound ``c`` (``alpha · out``); 0 or less: unconstrained. A 0-dim tensor
            is read on the device (no host sync).

    Returns:
        (..., b, b) in float32 (float64 for float64 blocks).
    """
    dtype = _compute_dtype(blocks.dtype)
    a = blocks.to(dtype)
    q = a - a.transpose(-1, -2)  # (..., b, b) skew-symmetric
    bound = torch.as_tensor(max_norm, dtype=dtype, device=q.device)
    norm = torch.linalg.vector_norm(q) + 1e-8
    q = q * torch.where((bound > 0) & (norm > bound), bound / norm, torch.ones((), dtype=dtype, device=q.device))
    eye = torch.eye(q.shape[-1], dtype=dtype, device=q.device)
    # I − Q is invertible for every skew-symmetric Q (eigenvalues 1 − iλ): inv_ex skips inv's singularity
    # check, a host sync per layer per step on CUDA
    return (eye + q) @ torch.linalg.inv_ex(eye - q).inverse


def diag_oft_rotate(weight: Tensor, rotations: Tensor) -> Tensor:
    """Block-diagonal rotation of the output rows: ``W'[k] = R_kᵀ · W[k]`` per block of ``b`` rows.

    Args:
        weight: W, (out, in, *kernel) with ``out = n · b``.
        rotations: R, (n, b, b).

    Returns:
        (out, in, *kernel) in the promoted dtype.
    """
    n, b, _ = rotations.shape
    rows = weight.reshape(n, b, *weight.shape[1:])  # (n, b, in, *k)
    return torch.einsum("knm,kn...->km...", rotations, rows).reshape(weight.shape)


def boft_rotate(weight: Tensor, rotations: Tensor) -> Tensor:
    """The butterfly of LyCORIS' BOFT on the output rows: stage ``i`` pairs rows ``2^i·b/2`` apart into
    blocks of ``b`` and applies ``R_{i,k} · rows`` (``einsum("b i j, b j ... -> b i ...")``).

    Args:
        weight: W, (out, in, *kernel) with ``out = n · b``.
        rotations: R, (m, n, b, b), ``b`` even.

    Returns:
        (out, in, *kernel) in the promoted dtype.
    """
    m, _, b, _ = rotations.shape
    rows = weight
    for i in range(m):
        k = 2**i * (b // 2)
        # (c, 2, k) -> (c, k, 2): rows k apart become neighbours; then blocks of b
        rows = rows.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))  # (n, b, ...)
        rows = torch.einsum("bij,bj...->bi...", rotations[i], rows)
        rows = rows.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)  # (out, ...)
    return rows


def oft_merged_weight(
    base_weight: Tensor, blocks: Tensor, *, rescale: Tensor | None = None, constraint: float | Tensor = 0.0,
    stored_rotation: bool = False,
) -> Tensor:
    """``W' = rescale ⊙ rotate(W)``: the merged weight of one OFT layer at full strength.

    Args:
        base_weight: W, (out, in, *kernel).
        blocks: ``oft_blocks``, (n, b, b) Diag-OFT or (m, n, b, b) BOFT, ``n·b = out``; with
            ``stored_rotation`` an old LyCORIS ``oft_diag``, (n, b, b): the block matrices themselves.
        rescale: (out, 1, ...) or (out,) per-row scales, or ``None``.
        constraint: the file's ``alpha`` (COFT bound per output channel; ``c = alpha · out``; 0: none).
            Not read with ``stored_rotation`` (A1111 ignores it there).
        stored_rotation: ``blocks`` are the rotation ``R`` (``oft_diag``), applied as given.

    Returns:
        (out, in, *kernel) in float32 (float64 when the inputs are).
    """
    if stored_rotation:
        rotations = blocks.to(_compute_dtype(blocks.dtype))
    else:
        rotations = cayley_rotation(blocks, max_norm=constraint * base_weight.shape[0])
    weight = base_weight.to(rotations.dtype)
    merged = diag_oft_rotate(weight, rotations) if blocks.dim() == 3 else boft_rotate(weight, rotations)
    if rescale is not None:
        merged = merged * rescale.to(rotations.dtype).reshape(-1, *(1,) * (weight.dim() - 1))
    return merged


def oft_delta_weight(
    base_weight: Tensor,
    blocks: Tensor,
    *,
    rescale: Tensor | None = None,
    constraint: float | Tensor = 0.0,
    scale: float | Tensor = 1.0,
    stored_rotation: bool = False,
) -> Tensor:
    """``ΔW = scale · (W' − W)`` with ``W'`` from :func:`oft_merged_weight` (see the module docstring
    for how ``scale`` compares with LyCORIS' multiplier).

    Args:
        base_weight: W, (out, in, *kernel).
        blocks: ``oft_blocks``, (n, b, b) Diag-OFT or (m, n, b, b) BOFT with ``n·b = out``: each block's generator
            ``Q``, made a rotation ``R = (I + Q)(I − Q)⁻¹`` (Cayley, ``Q`` skew-symmetrised) that turns its ``b``
            output rows as ``W'[k] = R_kᵀ · W[k]`` (Diag-OFT, :func:`diag_oft_rotate` — the transpose, as LyCORIS;
            BOFT: ``m`` butterfly stages, :func:`boft_rotate`); with ``stored_rotation`` an old ``oft_diag``, ``R``
            itself.
        rescale, constraint, stored_rotation: as :func:`oft_merged_weight`.
        scale: the strength (1: the whole rotation).

    Returns:
        (out, in, *kernel) in float32 (float64 when the inputs are).
    """
    merged = oft_merged_weight(base_weight, blocks, rescale=rescale, constraint=constraint,
                               stored_rotation=stored_rotation)
    return (merged - base_weight.to(merged.dtype)) * scale


@dataclass(frozen=True, kw_only=True)
class OFTConfig:
    """OFT hyper-parameters (LyCORIS ``algo=diag-oft`` / ``algo=boft`` network args).

    Attributes:
        dim: LyCORIS' ``network_dim`` / ``lora_dim`` for OFT: the wanted block size (Diag-OFT: the
            smaller factor of :func:`~sdadapt.adapters.lokr.factorization` of the layer's output width;
            BOFT: the even block size of :func:`power2_factorization`), see :func:`oft_block_layout`.
        butterfly: BOFT (``algo=boft``) instead of Diag-OFT.
        constraint: COFT: ``‖Q‖ ≤ constraint · out`` (LyCORIS ``constraint``, written as ``alpha``); 0: none.
        rescaled: also train a per-row scale (LyCORIS ``rescaled``, written as ``rescale``).
        module_dropout: probability to skip the whole module per training step.
        conv_dim: ``dim`` for kxk convolutions (LyCORIS / kohya ``conv_dim``); ``None``: ``dim``.
    """

    dim: int = 4
    butterfly: bool = False
    constraint: float = 0.0
    rescaled: bool = False
    module_dropout: float = 0.0
    conv_dim: int | None = None

    def __post_init__(self) -> None:
        for field in ("dim", "conv_dim"):
            value = getattr(self, field)
            if field == "conv_dim" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OFTConfig.{field} must be a positive int (the block size), got {value!r}")
        for field in ("butterfly", "rescaled"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"OFTConfig.{field} must be a bool, got {getattr(self, field)!r}")
        if not isinstance(self.constraint, (int, float)) or not 0.0 <= float(self.constraint) < float("inf"):
            raise ValueError(f"OFTConfig.constraint must be a finite number >= 0 (0: no constraint), got {self.constraint!r}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")

    def dim_for(self, geometry: LayerGeometry) -> int:
        """The block size asked for on a layer: :attr:`conv_dim` on kxk convolutions when set, else :attr:`dim`."""
        return self.conv_dim if geometry.is_kxk and self.conv_dim is not None else self.dim


class OFTModule(AdapterModule):
    """One OFT rotation for one base layer (a thin shell over :func:`oft_delta_weight`).

    Parameters ``oft_blocks`` (zero at init: ``R = I``) and, when rescaled, ``rescale`` (ones);
    buffers ``alpha`` (0-dim, the constraint; saved) and ``scale`` (the strength; not saved). The hook
    passes the base weight without merged deltas; ``Δy = op(x, ΔW)``.
    """

    family: ClassVar[str] = "oft"
    file_keys: ClassVar[tuple[str, ...]] = ("oft_blocks", "rescale", "alpha", "oft_diag")
    marker_keys: ClassVar[tuple[str, ...]] = ("oft_blocks", "oft_diag")
    lycoris_algo: ClassVar[str] = "diag-oft"
    uses_base_weight: ClassVar[bool] = True

    def __init__(
        self,
        geometry: LayerGeometry,
        blocks_shape: tuple[int, ...],
        *,
        constraint: float = 0.0,
        rescaled: bool = False,
        module_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        stored_rotation: bool = False,
    ) -> None:
        super().__init__(geometry)
        #: ``oft_blocks`` holds an old LyCORIS ``oft_diag`` (the rotation itself; read from a file only)
        self.stored_rotation = stored_rotation
        self.oft_blocks = nn.Parameter(torch.zeros(blocks_shape, dtype=dtype, device=device))
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(geometry.out_features, 1, *(1 for _ in geometry.kernel),
                                                   dtype=dtype, device=device))
        else:
            self.rescale = None
        self.register_buffer("alpha", torch.tensor(float(constraint), dtype=torch.float32, device=device))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32, device=device), persistent=False)
        self.module_dropout = module_dropout

    @property
    def butterfly(self) -> bool:
        """BOFT (4-D ``oft_blocks``) rather than Diag-OFT."""
        return self.oft_blocks.dim() == 4

    @property
    def rank(self) -> int:
        """The block size ``b`` (OFT has no rank; LyCORIS' ``dim`` asks for this size)."""
        return self.oft_blocks.shape[-1]

    def delta_dtype(self) -> torch.dtype:
        return self.oft_blocks.dtype

    def delta_weight(self) -> Tensor:
        """OFT has no delta without the base weight: use :meth:`merge_delta`."""
        raise TypeError("OFTModule.delta_weight needs the base layer's weight: call merge_delta(base_weight)")

    def merge_delta(self, base_weight: Tensor) -> Tensor:
        """(out, in, *k): ``s · (W' − W)`` for the base weight ``W`` (without merged deltas), in the
        adapter's dtype (computed in float32, float64 for float64 adapters)."""
        base = base_weight.reshape(self.geometry.weight_shape)
        delta = oft_delta_weight(base, self.oft_blocks, rescale=self.rescale, constraint=self.alpha,
                                 scale=self.scale, stored_rotation=self.stored_rotation)
        return delta.to(self.oft_blocks.dtype)

    def forward(self, x: Tensor, base_weight: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Δy = ``op(x, ΔW)`` for input ``x`` (linear: (..., in); conv: (N, in, H, W)), without the bias."""
        if base_weight is None:
            raise TypeError("OFTModule.forward needs the base layer's weight: forward(x, base_weight)")
        return self.geometry.conv(x, self.merge_delta(base_weight))

    def file_tensors(self) -> dict[str, Tensor]:
        if self.stored_rotation:  # written back as read (only A1111 reads it; no exact oft_blocks exists)
            tensors = {"oft_diag": self.oft_blocks}
            if self.rescale is not None:
                tensors["rescale"] = self.rescale
            return tensors
        tensors = {"oft_blocks": self.oft_blocks, "alpha": self.alpha}
        if self.rescale is not None:
            tensors["rescale"] = self.rescale
        return tensors

    @classmethod
    def from_config(
        cls,
        config: OFTConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> OFTModule:
        """A fresh module for one layer (``oft_blocks = 0``, ``rescale = 1``: the layer is unchanged).

        Raises:
            ValueError: BOFT on a layer whose width has no even × power-of-two split under
                :meth:`OFTConfig.dim_for` the layer.
        """
        shape = oft_block_layout(geometry.out_features, config.dim_for(geometry), butterfly=config.butterfly)
        return cls(geometry, shape, constraint=config.constraint, rescaled=config.rescaled,
                   module_dropout=config.module_dropout, dtype=dtype, device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> OFTModule:
        """Build from ``{"oft_blocks"[, "alpha"][, "rescale"]}`` (no ``alpha``: no constraint), or from an old
        LyCORIS ``{"oft_diag"[, "rescale"]}`` (the rotation itself, module docstring; ``alpha`` not read).

        Raises:
            ValueError: shapes that do not fit the layer (naming ``name`` and the layout expected).
        """
        stored = "oft_diag" in tensors
        if stored and "oft_blocks" in tensors:
            raise ValueError(f"{name}: both 'oft_blocks' and the old 'oft_diag': one OFT layer holds one of them")
        blocks = tensors.get("oft_diag" if stored else "oft_blocks")
        if blocks is None:
            raise ValueError(f"{name}: an OFT layer needs 'oft_blocks' (have {sorted(tensors)})")
        shape = tuple(blocks.shape)
        out = geometry.out_features
        if stored and (not blocks.is_floating_point() or len(shape) != 3 or shape[-1] != shape[-2]):
            raise ValueError(f"{name}.oft_diag: expected floating-point (n, b, b) block matrices (LyCORIS' old "
                             f"Diag-OFT), got {blocks.dtype} of shape {shape}" + (
                                 " — a 4-D one is LyCORIS' BOFT of Feb 5-12 2024, which nothing reads (A1111's "
                                 "is_R path fails on it): train it again with a current LyCORIS"
                                 if len(shape) == 4 else ""))
        if not blocks.is_floating_point() or len(shape) not in (3, 4) or shape[-1] != shape[-2]:
            raise ValueError(f"{name}.oft_blocks: expected floating-point (n, b, b) blocks (Diag-OFT, kohya OFT) or "
                             f"(m, n, b, b) (BOFT), got {blocks.dtype} of shape {shape}")
        n, b = shape[-3], shape[-1]
        if n * b != out:
            raise ValueError(f"{name}.{'oft_diag' if stored else 'oft_blocks'}: {n} blocks of {b}x{b} rotate {n * b} rows, but the base layer has "
                             f"{out} output channels (weight shape {geometry.weight_shape}). The file was made for "
                             "another model.")
        if len(shape) == 4 and (b % 2 or n % 2 ** (shape[0] - 1)):
            raise ValueError(f"{name}.oft_blocks: BOFT blocks of shape {shape} are no butterfly: the block size must be "
                             f"even and the {n} blocks divisible by 2^(stages - 1) = {2 ** (shape[0] - 1)}")
        rescale = tensors.get("rescale")
        if rescale is not None and rescale.numel() != out:
            raise ValueError(f"{name}.rescale: {rescale.numel()} values for a layer of {out} output channels")
        alpha = None if stored else tensors.get("alpha")  # (A1111: "self.alpha is unused" for oft_diag)
        constraint = 0.0
        if alpha is not None:
            if alpha.numel() != 1:
                raise ValueError(f"{name}.alpha: the OFT constraint must be one number, got shape {tuple(alpha.shape)}")
            constraint = float(alpha)
        module = cls(geometry, shape, constraint=constraint, rescaled=rescale is not None, dtype=blocks.dtype,
                     device=blocks.device, stored_rotation=stored)
        with torch.no_grad():
            module.oft_blocks.copy_(blocks)
            if rescale is not None:
                module.rescale.copy_(rescale.reshape(module.rescale.shape))
            if alpha is not None:
                module.alpha.copy_(alpha.reshape(()))
        return module

    @classmethod
    def file_rank(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, bool]:
        """OFT has no rank: ``(None, False)`` (its block size is ``oft_blocks``' last axis)."""
        return None, False

    @classmethod
    def lycoris_algo_of_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> str:
        """``boft`` for 4-D ``oft_blocks``, else ``diag-oft`` (an old ``oft_diag`` too)."""
        return "boft" if len(shapes.get("oft_blocks", ())) == 4 else "diag-oft"
