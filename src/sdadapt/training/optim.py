"""Memory-lean optimiser pieces in pure torch: low-precision states, bf16 stochastic rounding,
fused backward, Adafactor and LR schedules.

What each piece saves, per trained parameter (fp32 AdamW keeps 4 B weight + 4 B grad + 8 B state):

* ``AdamW(state_dtype="int8")``: the two moments in 8-bit block-wise codes, 2.03 B instead of 8 B.
* ``AdamW(state_dtype=torch.bfloat16)``: 4 B instead of 8 B.
* bf16 weights with stochastic rounding (``stochastic_rounding=True``): no fp32 master copy
  (2 B instead of 4 B + 4 B) without losing updates smaller than half a bf16 ulp.
* ``Adafactor``: a factored second moment, ``O + I·k·k`` floats for an ``(O, I, k, k)`` weight.
* :func:`fuse_optimizer_into_backward`: each gradient is applied and freed as soon as it (or its
  group's last one) is accumulated, so only the open groups' gradients live at a time (no 4 B/param
  grad buffer).

Every optimiser computes its update in float32 whatever the parameter and state dtypes are (a
float64 parameter is updated at float32 precision: use ``torch.optim.AdamW`` for float64 work).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AdamW",
    "Adafactor",
    "FusedBackward",
    "copy_stochastic_",
    "dequantize_blockwise",
    "dynamic_map",
    "fuse_optimizer_into_backward",
    "lr_at",
    "quantize_blockwise",
    "restore_capturable_mode",
    "set_lr",
    "stochastic_round_to_bf16",
]

Schedule = Literal["constant", "warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"]
_SCHEDULES = ("constant", "warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
_STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", "float32": "float32",
                 "bfloat16": "bfloat16", "int8": "int8"}


# ------------------------------------------------------------------------ stochastic rounding
def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 to bfloat16 stochastically: unbiased, ``E[result] = x``.

    bfloat16 is the top 16 bits of a float32. With ``u ~ U{0, …, 2¹⁶−1}``::

        bits(result) = (bits(x) + u) & 0xFFFF0000

    rounds ``|x|`` up to the next bf16 with probability ``low16(x) / 2¹⁶``, which is exactly the
    fraction of the way ``x`` lies between its two bf16 neighbours (the spacing is linear in the
    bit pattern within a binade, and a carry into the exponent lands on the next bf16), so the
    rounding error has mean zero. Updates far below half an ulp (``|Δw| < 2⁻⁹·|w|``), which
    round-to-nearest loses every time, survive on average.

    Args:
        x: float32 tensor, any shape. Infinities and NaNs are kept; finite values above the
            largest bf16 may round to ``±inf`` (as round-to-nearest does slightly higher).
        generator: for reproducible draws (on ``x``'s device); default: torch's global RNG.

    Returns:
        bfloat16 tensor of ``x``'s shape.

    Example:
        >>> w = torch.ones(10_000, dtype=torch.bfloat16)
        >>> step = torch.full((10_000,), -1e-4)          # 1/78 of an ulp at 1.0
        >>> nearest = (w.float() + step).bfloat16()       # all still exactly 1.0
        >>> sr = stochastic_round_to_bf16(w.float() + step)  # mean ≈ 1 - 1e-4
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes float32 input, got {x.dtype}; call x.float() first")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.contiguous().view(torch.int32) + noise  # carries into the exponent are correct
    bits.bitwise_and_(-65536)  # -65536 == 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    rounded = bits.view(torch.float32)
    # a NaN whose payload sits only in the low half would truncate to inf: keep NaNs NaN
    rounded = torch.where(torch.isnan(x), x, rounded)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def copy_stochastic_(target: Tensor, source: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``target ← stochastic_round_to_bf16(source)`` in place; returns ``target``.

    Args:
        target: bfloat16 tensor (e.g. a bf16 weight).
        source: float32 tensor of ``target``'s shape (e.g. the weight after an fp32 update).
    """
    if target.dtype != torch.bfloat16:
        raise ValueError(f"copy_stochastic_ writes into a bfloat16 tensor, got {target.dtype}; use target.copy_(source)")
    if source.shape != target.shape:
        raise ValueError(f"copy_stochastic_: source shape {tuple(source.shape)} != target shape {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(stochastic_round_to_bf16(source.float(), generator))
    return target


def _copy_stochastic_many(targets: Sequence[Tensor], sources: Sequence[Tensor], generator: torch.Generator | None) -> None:
    """:func:`copy_stochastic_` for each pair, as one rounding pass over the concatenated sources.

    On CPU the generator's draws for one ``randint`` of the total equal the draws of one
    ``randint`` per tensor in order, so this is bit-identical to calling :func:`copy_stochastic_`
    on each pair in turn (tested); on CUDA the draws differ but are just as uniform.
    """
    flat = _adjacent(sources)
    if flat is None:
        flat = torch.cat([_flat(s) for s in sources]).float()  # (Σn,) float32
    rounded = stochastic_round_to_bf16(flat, generator)  # (Σn,) bfloat16
    parts = rounded.split([s.numel() for s in sources])
    torch._foreach_copy_(list(targets), [_shaped(part, t.shape) for part, t in zip(parts, targets)])


def _adjacent(tensors: Sequence[Tensor]) -> Tensor | None:
    """The (Σn,) view that ``tensors`` are consecutive pieces of — contiguous float32 parts of one
    buffer, in order, such as :func:`_float32_many`'s working copies — or ``None`` (then the caller
    concatenates: the same values, one copy more)."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.data_ptr() != end:
            return None
        end += t.numel() * 4
    storage = first.untyped_storage()  # (one check for all: memory right after the first piece is its buffer's)
    if end > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided(((end - first.data_ptr()) // 4,), (1,))


def _flat(t: Tensor) -> Tensor:
    """``t.reshape(-1)``, skipping the call for a 1-D tensor (a per-tensor call costs ~1 µs of host time)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _shaped(part: Tensor, shape: torch.Size) -> Tensor:
    """``part.view(shape)``, skipping the call when ``part`` has that shape already."""
    return part if part.shape == shape else part.view(shape)


# --------------------------------------------------------------------- 8-bit block quantisation
def dynamic_map(*, signed: bool) -> Tensor:
    """The 8-bit code book for block-wise quantised optimiser states (after bitsandbytes'
    dynamic tree map, made symmetric).

    Codes are normalised values ``y = x / absmax(block) ∈ [-1, 1]``: ``0``, ``±1`` and, for each
    decade ``i = 0 … 6`` of ``[10⁻⁷, 1]``, the midpoints of ``n_i`` equal bins of
    ``[10^(i-7), 10^(i-6)]`` (``n_i = 2^i`` signed, ``2^(i+1)`` unsigned; the top signed decade
    gives one bin to ``-1``). Large values keep ~2 significant digits, values down to
    ``10⁻⁷·absmax`` keep ~1 — a linear 8-bit map would zero everything below ``absmax/255``.

    Returns:
        float32, sorted ascending: 255 codes (signed) or 256 codes (unsigned).
    """
    magnitudes: list[float] = []
    for i in range(7):
        bins = 2 ** (i + 1) if not signed else (2**i if i < 6 else 63)
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float64) * 10.0 ** (i - 6)
        magnitudes += ((edges[:-1] + edges[1:]) / 2).tolist()
    values = [0.0, 1.0, *magnitudes]
    if signed:
        values += [-v for v in values if v > 0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_blockwise(x: Tensor, code: Tensor, *, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Nearest-code 8-bit quantisation per block of ``block_size`` consecutive elements.

    ``absmax_b = max_{i∈b} |x_i|``, ``codes_i = argmin_c |code[c] − x_i / absmax_b|``.

    Args:
        x: any shape, read flattened (float32 recommended).
        code: sorted code book from :func:`dynamic_map` (its device is used).

    Returns:
        ``(codes (x.numel(),) uint8, absmax (ceil(numel / block_size),) float32)``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    return _quantize_to_boundaries(x, _code_boundaries(code), block_size=block_size)


def _code_boundaries(code: Tensor) -> Tensor:
    """The midpoints between neighbouring codes, ``(len(code) − 1,)``: ``bucketize`` against them
    gives the nearest code."""
    return (code[1:] + code[:-1]) / 2


def _quantize_to_boundaries(x: Tensor, boundaries: Tensor, *, block_size: int) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blockwise` given the code book's :func:`_code_boundaries`."""
    flat = x.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = flat
    if blocks * block_size != n:  # zero-pad the last block
        padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=flat.device)
        padded[:n] = flat
    padded = padded.view(blocks, block_size)  # (nb, bs)
    # max |x| per block as max(max x, −min x): one pass over the block grid, no |x| copy (abs_ on the
    # (nb,) result turns an all −0.0 block's −0.0 into the 0.0 ``abs().amax()`` gives)
    low, high = torch.aminmax(padded, dim=1)  # (nb,), (nb,)
    absmax = torch.maximum(high, low.neg_()).abs_()  # (nb,)
    y = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # (nb, bs) in [-1, 1]
    # int32 bucket indices (half the int64 default's traffic; every index < 256)
    codes = torch.bucketize(y.reshape(-1)[:n], boundaries, out_int32=True).to(torch.uint8)  # (n,)
    return codes, absmax


def _padded_to_blocks(flats: Sequence[Tensor], block_size: int, pad: Tensor) -> list[Tensor]:
    """``flats`` (1-D tensors) each followed by a slice of ``pad`` (≥ ``block_size − 1`` elements)
    up to a whole number of blocks: ``torch.cat`` of the result puts every tensor in blocks of its own."""
    out: list[Tensor] = []
    for flat in flats:
        out.append(flat)
        short = -flat.numel() % block_size
        if short:
            out.append(pad[:short])
    return out


def _unpadded_views(flat: Tensor, sizes: Sequence[int], block_size: int) -> list[Tensor]:
    """Inverse of ``torch.cat(_padded_to_blocks(...))``: views ``(n_i,)`` of each tensor's elements
    in the padded ``flat`` ``(Σ ceil(n_i / bs)·bs,)`` — no copy, no op."""
    spans = [-(-n // block_size) * block_size for n in sizes]
    return [part if n == span else part[:n] for part, n, span in zip(flat.split(spans), sizes, spans)]


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, *, block_size: int = 256) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``x_i ≈ code[codes_i] · absmax_{block(i)}``.

    Returns:
        float32, flat ``(codes.numel(),)``; reshape to the original shape.
    """
    n = codes.numel()
    values = code[codes.int()]  # (n,)
    scale = _block_scales(absmax, block_size, n)  # (n,)
    return values * scale


# --------------------------------------------------------------------------------- AdamW
def _check_common(lr: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be a non-negative float, got {lr!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _step_options(*, stochastic_rounding: bool, foreach: bool, capturable: bool) -> dict[str, bool]:
    """The param-group defaults every sdadapt optimiser takes, as bools: ``stochastic_rounding``
    (bf16 weights written with stochastic rounding), ``foreach`` (multi-tensor ops per chunk) and
    ``capturable`` (the step can be recorded in a CUDA graph)."""
    return {"stochastic_rounding": bool(stochastic_rounding), "foreach": bool(foreach),
            "capturable": bool(capturable)}


def _float32(t: Tensor) -> Tensor:
    """``t`` itself when it is float32 (any layout: a working weight updated in place, which
    :func:`_write_weight` then skips), else a float32 copy (``t.float()``: exact from a narrower
    float). The check skips ``t.float()``'s call, about 0.2 µs of host time per tensor and step;
    :func:`_float32_many` is the multi-tensor path's (contiguous) counterpart."""
    return t if t.dtype == torch.float32 else t.float()


def _float32_many(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Contiguous float32 versions of ``tensors`` (same shapes): contiguous float32 ones as they are
    (not copied), the others (narrower floats, and float32 in another layout such as channels_last)
    copied (cast and laid out row-major) by one multi-tensor copy into one float32 buffer and
    returned as views of it — a fixed number of ops whatever ``len(tensors)`` (``[t.float() for t
    in tensors]`` is one cast per tensor), no intermediate buffer. Exact: every narrower float type
    converts to float32 exactly.

    Why contiguous: CUDA's multi-tensor kernels take their fast route (one launch per op) only when
    corresponding tensors of the lists share sizes *and strides*; a channels_last weight beside its
    row-major int8 moments would send every op of the chunk down the per-tensor route."""
    out = list(tensors)
    low = [i for i, t in enumerate(tensors) if t.dtype != torch.float32 or not t.is_contiguous()]
    if low:
        flat = torch.empty(sum(tensors[i].numel() for i in low), dtype=torch.float32,
                           device=tensors[low[0]].device)  # (Σn,) float32
        parts = [_shaped(part, tensors[i].shape) for i, part in zip(low, flat.split([tensors[i].numel() for i in low]))]
        torch._foreach_copy_(parts, [tensors[i] for i in low])
        for i, part in zip(low, parts):
            out[i] = part
    return out


def _write_weight(p: Tensor, w: Tensor, stochastic: bool, generator: torch.Generator | None) -> None:
    """Write the fp32 working weight ``w`` back into a low-precision parameter ``p``."""
    if w is p:
        return
    if stochastic and p.dtype == torch.bfloat16:
        copy_stochastic_(p, w, generator)
    else:
        p.copy_(w)


def _write_weights_many(params: Sequence[Tensor], weights: Sequence[Tensor], stochastic: bool,
                        generator: torch.Generator | None) -> None:
    """:func:`_write_weight` for each pair as multi-tensor ops: the float32 working ``weights`` that
    are not their parameter itself into ``params``, bf16 ones with ``stochastic`` rounding in one
    pass (:func:`_copy_stochastic_many`: the per-parameter draws on a CPU), the others by one copy."""
    _write_back_many([(p, w, stochastic) for p, w in zip(params, weights)], generator)


def _write_back_many(writes: Sequence[tuple[Tensor, Tensor, bool]], generator: torch.Generator | None) -> None:
    """Float32 working copies back into the tensors they were made from, ``writes``:
    ``(target, work, stochastic)`` in the per-parameter step's order (a weight, then its states).
    A ``work`` that is its ``target`` (updated in place) is skipped; bf16 targets with
    ``stochastic`` go through one stochastic-rounding pass in that order (on a CPU the draws of
    :func:`_write_weight` called on each in turn), the others through one multi-tensor copy."""
    rounded_to: list[Tensor] = []
    rounded_from: list[Tensor] = []
    copied_to: list[Tensor] = []
    copied_from: list[Tensor] = []
    for target, work, stochastic in writes:
        if work is target:
            continue
        if stochastic and target.dtype == torch.bfloat16:
            rounded_to.append(target)
            rounded_from.append(work)
        else:
            copied_to.append(target)
            copied_from.append(work)
    if copied_to:
        torch._foreach_copy_(copied_to, copied_from)
    if rounded_to:
        _copy_stochastic_many(rounded_to, rounded_from, generator)


def _foreach_add_quotient_(weights: list[Tensor], numerators: Sequence[Tensor], scales: Any,
                           denoms: Sequence[Tensor]) -> None:
    """``weights[i] += (numerators[i] · scale) / denoms[i]`` as multi-tensor ops: ``addcdiv_``'s
    update with 0-dim tensor factors (its ``value=`` takes numbers only) and the same rounding (the
    product, then the quotient). ``scales``: one 0-dim tensor or one per tensor."""
    steps = torch._foreach_mul(numerators, scales)
    torch._foreach_div_(steps, denoms)
    torch._foreach_add_(weights, steps)


def _call_closure(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with gradients enabled (``None`` without a closure): the loss a ``step`` returns."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_grads(group: dict[str, Any], optimizer: str, *, hint: str = "") -> list[Tensor]:
    """The group's parameters that have a gradient.

    Raises:
        ValueError: a gradient is sparse (``optimizer``: the class named in the message; ``hint``:
            what to use instead).
    """
    params = [p for p in group["params"] if p.grad is not None]
    if any(p.grad.is_sparse for p in params):  # type: ignore[union-attr]
        raise ValueError(f"{optimizer} does not support sparse gradients{hint}")
    return params


def _new_step_count(p: Tensor, group: dict[str, Any]) -> int | Tensor:
    """A fresh step count: ``0``, or in capturable mode a float32 0-dim tensor on ``p``'s device
    (stepped in place, as torch's)."""
    return torch.zeros((), dtype=torch.float32, device=p.device) if group["capturable"] else 0


def _count_steps(states: Sequence[dict[str, Any]]) -> None:
    """One more step in each of ``states``' ``"step"``: a Python int replaced, device tensors
    (capturable) stepped in place by one multi-tensor add per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for state in states:
        step = state["step"]
        if isinstance(step, Tensor):
            by_device.setdefault(step.device, []).append(step)
        else:
            state["step"] = step + 1
    for steps in by_device.values():
        torch._foreach_add_(steps, 1)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with float32, bfloat16 or 8-bit states.

    Per step ``t`` with gradient ``g`` (all arithmetic in float32)::

        w ← w · (1 − lr·λ)                                   decoupled weight decay
        m ← β₁ m + (1 − β₁) g          v ← β₂ v + (1 − β₂) g²
        w ← w − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    — the same operations in the same order as ``torch.optim.AdamW``, so float32 states on float32
    weights reproduce it to rounding.

    State storage (``state_dtype``):

    * ``torch.float32``: 8 B/param.
    * ``torch.bfloat16``: 4 B/param, written back with stochastic rounding (round-to-nearest would
      freeze ``v``: ``β₂ = 0.999`` changes it by less than half a bf16 ulp).
    * ``"int8"``: 2 B/param + 8 B per block of ``block_size``: ``m`` as signed and ``√v`` as
      unsigned :func:`dynamic_map` codes with one float32 absmax per block (storing ``√v`` spans
      7 decades of gradient magnitude instead of 3.5). Each step dequantises, updates in float32,
      takes the step with the fresh float32 moments, then requantises.

    bf16/fp16 parameters are updated in float32 and written back with stochastic rounding
    (bf16, ``stochastic_rounding=True``) or round-to-nearest — so no fp32 master copy is needed.

    Args:
        params: parameters or parameter groups (a group may override any option below).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        state_dtype: ``torch.float32``, ``torch.bfloat16`` or ``"int8"``.
        stochastic_rounding: stochastic rounding when writing bf16 weights.
        block_size: elements per absmax block of int8 states.
        min_8bit_size: with ``"int8"``, tensors of fewer elements keep float32 moments (bitsandbytes' 8-bit
            optimisers' ``min_8bit_size``, 4096 there: most rank ≤ 8 LoRA factors, which kohya's AdamW8bit therefore
            updates exactly as AdamW); default 0: every tensor in 8 bits.
        generator: RNG for stochastic rounding (default: torch's global RNG).
        foreach: update all of a group's parameters with multi-tensor (``torch._foreach_*``) ops
            instead of one parameter at a time, with the low-precision weights, gradients and bf16
            moments cast to float32 in one batched pass and int8 states de- and re-quantised in one
            batched pass each: a fixed number of ops per chunk whatever the number of parameters
            (~40 with int8 states, 10 with float32 ones on float32 weights; tested), so far fewer
            kernel launches on a GPU. Same arithmetic in the same order and the same
            stochastic-rounding draws, so the result is bit-identical to ``foreach=False`` on CPU
            (tested); on CUDA the multi-tensor kernels may round differently in the last bit.
            Parameters go in chunks of 2²⁴ elements (int8: counted padded to whole blocks) on one
            device each, so the float32 working copies of bf16 weights and low-precision moments
            stay under ~0.7 GB; a parameter larger than a chunk is cut into pieces at
            ``block_size`` boundaries of its row-major flat index (whole dim-0 rows at multiples of
            ``lcm(row, block_size)`` elements when it, its gradient or a moment is not contiguous,
            e.g. channels_last; left whole if a row run does not fit), each updated in a chunk
            (sharing it with other parameters) — its step count still advances once per step and
            its state keeps the per-parameter layout. Without stochastic rounding (float32 weights
            or ``stochastic_rounding=False``, float32 or int8 states) this is bit-identical to
            ``foreach=False`` too (tested); with it, a cut parameter's draws come in another order
            (its weight piece, moment pieces, then the next piece's: the same number of draws), so
            there it matches in distribution — every rounding still unbiased — not bit for bit.
            With :func:`fuse_optimizer_into_backward`, give it ``groups`` (one parameter per
            optimiser leaves nothing to batch).
        capturable: torch's meaning — the step can be recorded in a CUDA graph and replayed
            (:class:`~sdadapt.training.step_capture.CapturedStep`): each parameter's step count is
            a float32 0-dim tensor on its device (``state["step"]``), the bias corrections and step
            sizes are tensor ops on it, ``lr`` may be a 0-dim tensor on the parameters' device
            (change it in place with :func:`set_lr`; the graph reads it), int8 states are
            re-quantised into their existing tensors, and nothing syncs with the host or
            allocates by data. The scalars are computed in float64 and rounded to float32 as the
            Python floats of ``capturable=False`` are, so on CPU both modes give bit-identical
            results (tested); on CUDA ``capturable=False`` divides by a host scalar through its
            reciprocal, so the two may differ in the last bit. Under a CUDA graph the
            stochastic-rounding draws come from ``generator`` — a CUDA generator other than the
            default one must be registered with the graph (``CapturedStep`` does it).
            Saved states resume in either mode (``load_state_dict`` converts the step counts).

    Example:
        >>> opt = AdamW(model.parameters(), lr=1e-4, state_dtype="int8")
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.state_bytes()  # ≈ 2.03 bytes per parameter
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype | str = torch.float32,
        stochastic_rounding: bool = True,
        block_size: int = 256,
        min_8bit_size: int = 0,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        _check_common(_lr_value(lr), weight_decay)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        state_dtype=_state_dtype_name(state_dtype), min_8bit_size=min_8bit_size,
                        block_size=block_size, **_step_options(stochastic_rounding=stochastic_rounding,
                                                               foreach=foreach, capturable=capturable))
        super().__init__(params, defaults)
        self.generator = generator
        self._codes: dict[tuple[torch.device, bool], Tensor] = {}
        self._boundaries: dict[tuple[torch.device, bool], Tensor] = {}
        self._paddings: dict[tuple[torch.device, int, tuple[int, ...]], Tensor | None] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, validating a group's own
        ``state_dtype`` and ``block_size``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        if not isinstance(group["block_size"], int) or group["block_size"] <= 0:
            raise ValueError(f"block_size must be a positive int, got {group['block_size']!r}")
        _check_tensor_lr(group, "AdamW")

    def _code(self, device: torch.device, signed: bool) -> Tensor:
        key = (device, signed)
        if key not in self._codes:
            self._codes[key] = dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def _code_boundaries(self, device: torch.device, signed: bool) -> Tensor:
        key = (device, signed)
        if key not in self._boundaries:
            self._boundaries[key] = _code_boundaries(self._code(device, signed))
        return self._boundaries[key]

    def _padding(self, device: torch.device, block_size: int, sizes: Sequence[int]) -> Tensor | None:
        """Positions of the padding in a chunk's padded flat layout (``torch.cat(_padded_to_blocks(...))``
        of tensors of ``sizes``), ``(P,)`` int64 on ``device``; ``None``: every size is whole blocks.
        Cached per layout: a chunk keeps its layout from step to step, so the warm-up steps make it
        and a captured step only reads it. Made by device ops alone (``arange``, no copy from host
        memory), so a layout first seen inside a CUDA-graph capture is recorded, not refused."""
        key = (device, block_size, tuple(sizes))
        if key not in self._paddings:
            runs: list[Tensor] = []
            offset = 0
            for n in sizes:
                span = -(-n // block_size) * block_size
                if span > n:
                    runs.append(torch.arange(offset + n, offset + span, device=device))
                offset += span
            self._paddings[key] = torch.cat(runs) if runs else None
        return self._paddings[key]

    @staticmethod
    def _kind(group: dict[str, Any], p: Tensor) -> str:
        """The state storage of ``p``: the group's, but float32 for a tensor under ``min_8bit_size`` elements in an
        int8 group (bitsandbytes' rule: its 8-bit optimisers keep small tensors' moments in float32)."""
        kind = group["state_dtype"]
        return "float32" if kind == "int8" and p.numel() < group.get("min_8bit_size", 0) else kind

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        state["step"] = _new_step_count(p, group)
        kind = self._kind(group, p)
        if kind == "int8":
            blocks = -(-p.numel() // group["block_size"])
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            # absmax 0 decodes every code to 0: fresh moments are zeros
        else:
            dtype = torch.float32 if kind == "float32" else torch.bfloat16
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _load_moments(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        kind = self._kind(group, p)
        if kind == "float32":
            return state["exp_avg"], state["exp_avg_sq"]  # updated in place
        if kind == "bfloat16":
            return state["exp_avg"].float(), state["exp_avg_sq"].float()
        bs = group["block_size"]
        m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], self._code(p.device, True), block_size=bs)
        root_v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
                                      self._code(p.device, False), block_size=bs)
        return m.view(p.shape), root_v.square_().view(p.shape)

    def _store_moments(self, state: dict[str, Any], p: Tensor, group: dict[str, Any], m: Tensor, v: Tensor) -> None:
        kind = self._kind(group, p)
        if kind == "bfloat16":
            copy_stochastic_(state["exp_avg"], m, self.generator)
            copy_stochastic_(state["exp_avg_sq"], v, self.generator)
        elif kind == "int8":
            bs = group["block_size"]
            for name, signed, values in (("exp_avg", True, m), ("exp_avg_sq", False, v.sqrt())):
                codes, absmax = quantize_blockwise(values, self._code(p.device, signed), block_size=bs)
                if group["capturable"]:  # into the tensors a captured graph reads on its next replay
                    state[f"{name}_codes"].copy_(codes)
                    state[f"{name}_absmax"].copy_(absmax)
                else:
                    state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        for group in self.param_groups:
            eps = group["eps"]
            beta1, beta2 = group["betas"]
            if group["capturable"]:
                _check_capturable_lr(group)
            params = _params_with_grads(group, "sdadapt.training.optim.AdamW", hint="; use torch.optim.SparseAdam")
            if group.get("foreach"):
                self._foreach_group_step(group, params)
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group)
                state["step"] += 1  # in place for a capturable step tensor
                decay, step_sizes, bias_corrections2_sqrt = _adamw_scalars(group, [state["step"]])
                grad = _float32(p.grad)  # type: ignore[arg-type]
                w = _float32(p)  # fp32 working weight
                m, v = self._load_moments(state, p, group)
                w.mul_(decay)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / bias_corrections2_sqrt[0]).add_(eps)
                if group["capturable"]:  # addcdiv_ takes its value as a number: same (value·m)/denom, same rounding
                    w.add_(m.mul(step_sizes[0]).div_(denom))
                else:
                    w.addcdiv_(m, denom, value=step_sizes[0])
                _write_weight(p, w, group["stochastic_rounding"], self.generator)
                self._store_moments(state, p, group, m, v)
        return loss

    def _foreach_group_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The multi-tensor step of one group's ``params`` (those with a gradient): each gets its
        state and one step count more (once per step, however many pieces it is cut into), then the
        chunks of :func:`_chunks` are updated one at a time."""
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self._init_state(self.state[p], p, group)
        _count_steps([self.state[p] for p in params])
        block_size = group["block_size"]
        # (runs of parameters of one state kind, in order: an int8 group's small tensors keep float32 moments)
        for kind, run in itertools.groupby(params, key=lambda p: self._kind(group, p)):
            for chunk in _chunks(list(run), _FOREACH_CHUNK_ELEMENTS, block_size=block_size, padded=kind == "int8",
                                 cut=lambda p: _cut(p, self.state[p], block_size, _FOREACH_CHUNK_ELEMENTS)):
                self._foreach_step(group, chunk, kind)

    def _foreach_step(self, group: dict[str, Any], pieces: list[_Piece], kind: str) -> None:
        """The per-parameter update of :meth:`step` as multi-tensor ops over one chunk's ``pieces``
        (of parameters with a gradient, their state made and their step counted already)."""
        eps = group["eps"]
        beta1, beta2 = group["betas"]
        states = [self.state[piece.param] for piece in pieces]
        decay, step_sizes, bias_corrections2_sqrt = _adamw_scalars(group, [state["step"] for state in states])
        # what each piece updates: views of the parameter (the tensor itself when whole) and of its
        # state; float32 row-major working copies, each kind in one batched pass (a fixed number of
        # ops per chunk): contiguous float32 tensors are used as they are (updated in place), the
        # others cast or copied in one go and written back below
        targets = [piece.of(piece.param) for piece in pieces]
        grads = _float32_many([piece.of(piece.param.grad) for piece in pieces])  # type: ignore[arg-type]
        weights = _float32_many(targets)
        if kind == "int8":
            ms, vs, flats = self._load_int8_moments(states, pieces, targets, group)
            moment_targets: list[Tensor] = []
        else:
            moment_targets = ([piece.of(state["exp_avg"]) for piece, state in zip(pieces, states)]
                              + [piece.of(state["exp_avg_sq"]) for piece, state in zip(pieces, states)])
            moments = _float32_many(moment_targets)
            ms, vs = moments[:len(pieces)], moments[len(pieces):]
        torch._foreach_mul_(weights, decay)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, bias_corrections2_sqrt)
        torch._foreach_add_(denoms, eps)
        if group["capturable"]:  # no tensor-scalar addcdiv: the same (value·m)/denom, same rounding
            _foreach_add_quotient_(weights, ms, step_sizes, denoms)
        else:
            torch._foreach_addcdiv_(weights, ms, denoms, step_sizes)
        del denoms  # (not alive during the write-back's rounding buffers)
        # write back in the per-parameter path's order (w, m, v of parameter 1, then of parameter 2,
        # ...): bf16 moments always rounded stochastically, float32 ones updated in a row-major copy
        # copied back (int8 moments: re-quantised below)
        writes: list[tuple[Tensor, Tensor, bool]] = []
        count = len(pieces)
        for i, (target, w, m, v) in enumerate(zip(targets, weights, ms, vs)):
            writes.append((target, w, group["stochastic_rounding"]))
            if moment_targets:
                writes += [(moment_targets[i], m, True), (moment_targets[count + i], v, True)]
        _write_back_many(writes, self.generator)
        if kind == "int8":
            self._store_int8_moments(states, pieces, group, *flats)

    def _load_int8_moments(self, states: list[dict[str, Any]], pieces: list[_Piece], targets: list[Tensor],
                           group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], tuple[Tensor, Tensor]]:
        """Dequantise every piece's int8 moments in one batched pass per moment: ``(ms, vs, (m_flat, v_flat))``.

        The codes are concatenated with each piece's padded to whole blocks (so the chunk is a
        ``(Σnb, bs)`` grid of blocks, each scaled by its absmax in one broadcast multiply) and the
        moments returned are views of ``targets[i].shape`` (the piece of the weight) into the padded
        float32 buffers ``m_flat``, ``v_flat`` ``(Σnb·bs,)`` — a fixed number of ops whatever the number
        of parameters. The padding decodes to values nobody reads (:meth:`_store_int8_moments` zeroes
        it before re-quantising the buffers). A piece of a split parameter starts on a block boundary,
        so its codes and absmaxes are slices of the parameter's.
        """
        bs, device = group["block_size"], targets[0].device
        sizes = [piece.numel() for piece in pieces]
        pad = torch.zeros(bs - 1, dtype=torch.uint8, device=device)  # (bs-1,) codes padding every piece
        out = []
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes = torch.cat(_padded_to_blocks([piece.codes(state[f"{name}_codes"]) for piece, state in zip(pieces, states)],
                                                bs, pad))  # (Σnb·bs,)
            absmax = torch.cat([piece.absmax(state[f"{name}_absmax"], bs) for piece, state in zip(pieces, states)])  # (Σnb,)
            values = self._code(device, signed)[codes.int()]  # (Σnb·bs,) float32 (int32 indices: half int64's traffic)
            flat = values.view(-1, bs).mul_(absmax[:, None]).view(-1)  # (Σnb·bs,): code · absmax of its block
            out.append(flat)
        m_flat, root_flat = out
        v_flat = root_flat.square_()
        ms = [_shaped(part, t.shape) for part, t in zip(_unpadded_views(m_flat, sizes, bs), targets)]
        vs = [_shaped(part, t.shape) for part, t in zip(_unpadded_views(v_flat, sizes, bs), targets)]
        return ms, vs, (m_flat, v_flat)

    def _store_int8_moments(self, states: list[dict[str, Any]], pieces: list[_Piece], group: dict[str, Any],
                            m_flat: Tensor, v_flat: Tensor) -> None:
        """Re-quantise every piece's moments in one batched pass per moment and copy the codes and
        absmax into (slices of) the state tensors with one multi-tensor copy: in place, so a captured
        graph reads the new values on its next replay and each state tensor keeps a storage of its
        own (``state_dict`` saves per-parameter tensors, not the chunk).

        ``m_flat``, ``v_flat``: :meth:`_load_int8_moments`' padded buffers, updated in place by the
        step. Their padding is zeroed (one indexed fill) and they are quantised where they are — the
        layout a batched ``torch.cat`` of every moment would build by copying them (blocks never straddle
        pieces; the zeros make each piece's last block the one :func:`quantize_blockwise` sees)."""
        bs, device = group["block_size"], m_flat.device
        sizes = [piece.numel() for piece in pieces]
        blocks = [-(-n // bs) for n in sizes]
        padding = self._padding(device, bs, sizes)
        # one copy per dtype: CUDA's multi-tensor kernels take lists of one dtype (mixed lists run
        # one copy kernel per tensor)
        code_targets: list[Tensor] = []
        code_sources: list[Tensor] = []
        absmax_targets: list[Tensor] = []
        absmax_sources: list[Tensor] = []
        for name, signed, flat in (("exp_avg", True, m_flat), ("exp_avg_sq", False, v_flat.sqrt())):
            if padding is not None:
                flat.index_fill_(0, padding, 0.0)
            codes, absmax = _quantize_to_boundaries(flat, self._code_boundaries(device, signed), block_size=bs)
            code_targets += [piece.codes(state[f"{name}_codes"]) for piece, state in zip(pieces, states)]
            code_sources += _unpadded_views(codes, sizes, bs)
            absmax_targets += [piece.absmax(state[f"{name}_absmax"], bs) for piece, state in zip(pieces, states)]
            absmax_sources += list(absmax.split(blocks))
        torch._foreach_copy_(code_targets, code_sources)
        torch._foreach_copy_(absmax_targets, absmax_sources)

    def state_bytes(self) -> int:
        """Bytes held by optimiser state tensors (moments, codes, absmax)."""
        return _state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but keeps the saved state dtypes
        (torch would cast float32 moments/absmax to a bf16 parameter's dtype) and this optimiser's
        ``capturable`` mode: step counts saved as ints become device tensors and vice versa, and a
        tensor ``lr`` stays the same tensor (filled with the saved value), so a graph that reads it
        keeps working. States saved in either mode resume in either; each group keeps its
        ``foreach`` (:func:`_load_keeping_mode`)."""
        _load_keeping_mode(self, state_dict)


def restore_capturable_mode(optimizer: torch.optim.Optimizer, built: Sequence[tuple[bool | None, object]], *,
                            host_step: Callable[[Tensor], Any]) -> None:
    """After ``load_state_dict`` (which takes every group setting from the file), put back each
    group's ``capturable`` flag and tensor ``lr`` as ``optimizer`` was built — ``built``: ``(capturable
    or None for an optimiser without the mode, lr)`` per group, read before loading — the saved lr
    value kept (a tensor lr stays the tensor a captured graph reads, filled in place), and move the
    step counts where that mode keeps them: capturable, float32 on the parameter's device; not,
    ``host_step(count)`` (sdadapt's AdamW: a Python int; torch's optimisers: a CPU tensor). A
    capturable optimiser left non-capturable cannot be captured, and one left capturable cannot step
    on a CPU; so states saved in either mode resume in either."""
    states = getattr(optimizer, "state", {})
    for group, (capturable, lr) in zip(optimizer.param_groups, built):
        if capturable is None:
            continue
        group["capturable"] = capturable
        if isinstance(lr, Tensor):
            lr.fill_(_lr_value(group["lr"]))
            group["lr"] = lr
        elif isinstance(group["lr"], Tensor) and not capturable:
            group["lr"] = _lr_value(group["lr"])
        for p in group["params"]:
            step = states.get(p, {}).get("step")
            if step is None:
                continue
            if capturable:
                states[p]["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
            elif isinstance(step, Tensor):
                states[p]["step"] = host_step(step)


def _load_keeping_mode(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], *,
                       host_step: Callable[[Tensor], Any] | None = None) -> None:
    """``optimizer.load_state_dict(state_dict)`` for sdadapt's optimisers: the saved state tensors
    keep their dtypes (:func:`_load_keeping_dtypes`), and each group keeps the ``capturable`` mode,
    tensor ``lr`` (filled with the saved value in place, so a captured graph reading it keeps
    working; :func:`restore_capturable_mode`) and ``foreach`` it was built with — a state saved on
    a GPU resumes per parameter on a CPU and vice versa.

    Args:
        host_step: a step count saved as a device tensor, for a non-capturable group; default
            ``int(step.item())`` (one host read per parameter, at load time only).
    """
    built = [(group["capturable"], group["lr"]) for group in optimizer.param_groups]
    foreach = [group.get("foreach", False) for group in optimizer.param_groups]
    _load_keeping_dtypes(optimizer, state_dict)
    restore_capturable_mode(optimizer, built, host_step=host_step or (lambda step: int(step.item())))
    for group, batched in zip(optimizer.param_groups, foreach):
        group["foreach"] = batched


#: elements updated together by one multi-tensor step: the fp32 working copies of bf16 weights and
#: of bf16/int8 moments, the int8 (de)quantisation and the batched stochastic rounding's buffers exist
#: for one chunk at a time — measured ~34 B/element with fp32 weights, ~42 B with bf16 (int8 states),
#: so ~0.55–0.7 GB for a full chunk. Counted padded to whole blocks with int8 states, and a tensor
#: larger than a chunk is cut into pieces at block boundaries (:func:`_cut`), so no chunk exceeds it
#: (before the cut, SD1.5's largest tensor, a 29.5M-element up-block conv, cost ~0.95–1.2 GB alone).
_FOREACH_CHUNK_ELEMENTS = 1 << 24


class _Piece(NamedTuple):
    """Elements ``[start, stop)`` of a parameter's row-major (logical) flat index, updated in one chunk:
    the whole parameter, or one piece of a parameter larger than a chunk (``start`` on a block
    boundary). ``flat``: a slice of the flattened tensors (all contiguous); otherwise whole rows of
    dim 0, which are views in any memory layout (channels_last)."""

    param: Tensor
    start: int
    stop: int
    whole: bool = True
    flat: bool = True

    def numel(self) -> int:
        """Elements in the piece."""
        return self.stop - self.start

    def of(self, t: Tensor) -> Tensor:
        """The piece of ``t`` — the parameter, its gradient or a moment of its shape — as a view
        (``t`` itself when whole): ``(stop − start,)`` flat, or ``(rows, *t.shape[1:])``."""
        if self.whole:
            return t
        if self.flat:
            return t.view(-1)[self.start:self.stop]
        row = t.numel() // t.shape[0]
        return t[self.start // row:self.stop // row]

    def codes(self, t: Tensor) -> Tensor:
        """The piece of an int8 state's ``(n,)`` codes."""
        return t if self.whole else t[self.start:self.stop]

    def absmax(self, t: Tensor, block_size: int) -> Tensor:
        """The piece of an int8 state's ``(ceil(n / block_size),)`` absmaxes: its blocks'."""
        return t if self.whole else t[self.start // block_size:-(-self.stop // block_size)]


def _cut(p: Tensor, state: dict[str, Any], block_size: int, limit: int) -> tuple[int, bool] | None:
    """How a parameter larger than a chunk may be cut: ``(unit, flat)`` — pieces are whole
    multiples of ``unit`` elements (of the row-major flat index), slices of the flattened tensors
    when ``flat`` else runs of dim-0 rows — or ``None`` (not cut: updated alone, as one piece).

    Flat when the parameter, its gradient and its float moments are all contiguous (the unit is then
    ``block_size``). Otherwise (channels_last, strided) a flat slice would be a copy, so the cut runs
    between rows of dim 0 at multiples of ``lcm(row, block_size)`` elements (an int8 block never
    straddles two pieces); ``None`` if that unit is larger than ``limit`` or the tensor is 1-D.
    """
    dense = [t for t in (p, p.grad, state.get("exp_avg"), state.get("exp_avg_sq")) if t is not None]
    if all(t.is_contiguous() for t in dense):
        return (block_size, True) if block_size <= limit else None
    if p.dim() < 2 or p.shape[0] == 0:
        return None
    unit = math.lcm(p.numel() // p.shape[0], block_size)
    return (unit, False) if unit <= limit else None


def _chunks(params: Sequence[Tensor], limit: int, *, block_size: int = 1, padded: bool = False,
            cut: Callable[[Tensor], tuple[int, bool] | None] | None = None) -> list[list[_Piece]]:
    """Consecutive runs of ``params``' pieces of at most ``limit`` elements each, all on one device
    (the batched step concatenates a chunk's tensors). The order stays the per-parameter step's,
    pieces of a cut parameter in turn, so the stochastic-rounding draws stay its draws wherever only
    weights are rounded (bf16 moments are rounded piece by piece with their weight piece).

    Args:
        limit: elements per chunk; with ``padded`` each piece counts ``ceil(n / block_size)·block_size``
            (int8 states pad every piece to whole blocks).
        cut: for a parameter larger than ``limit``, ``(unit, flat)`` as :func:`_cut` gives, or
            ``None``: such a parameter is then a chunk of its own (the default, without ``cut``).
            A cut one fills the room left in the current chunk and whole chunks with pieces of
            multiples of ``unit`` (the last piece shares its chunk with what follows).
    """
    def size_of(n: int) -> int:
        return -(-n // block_size) * block_size if padded else n

    out: list[list[_Piece]] = []
    size = 0
    for p in params:
        n = p.numel()
        if out and p.device != out[-1][0].param.device:
            size = limit + 1  # a new chunk
        how = cut(p) if cut is not None and size_of(n) > limit else None
        if how is None:
            if not out or size + size_of(n) > limit:
                out.append([])
                size = 0
            out[-1].append(_Piece(p, 0, n))
            size += size_of(n)
            continue
        unit, flat = how
        start = 0
        while start < n:
            take = max(0, limit - size) // unit * unit if out else 0
            if take == 0:
                out.append([])
                size = 0
                take = limit // unit * unit
            stop = min(n, start + take)
            out[-1].append(_Piece(p, start, stop, whole=False, flat=flat))
            size += size_of(stop - start)
            start = stop
    return out


def _param_chunks(params: Sequence[Tensor]) -> list[list[Tensor]]:
    """``params`` in runs of at most :data:`_FOREACH_CHUNK_ELEMENTS` elements on one device each (a
    larger tensor alone), for the multi-tensor steps that update whole parameters (all but
    :class:`AdamW`'s, which cuts a large one into pieces)."""
    return [[piece.param for piece in pieces] for pieces in _chunks(params, _FOREACH_CHUNK_ELEMENTS)]


def _lr_value(lr: float | Tensor) -> float:
    """A Python float of ``lr`` (a tensor lr is read once: for validation and loading only)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        return float(lr.item())
    return float(lr)


def _check_tensor_lr(group: dict[str, Any], optimizer: str) -> None:
    """A group's tensor ``lr`` (``optimizer``: the class named in the messages) holds one value and
    has ``capturable=True``.

    Raises:
        ValueError: it holds more than one value, or the group is not capturable.
    """
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{optimizer}: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        if not group["capturable"]:
            raise ValueError(f"a tensor lr needs {optimizer}(..., capturable=True) (the non-capturable step takes lr as "
                             "a Python float); pass lr=float(lr) or capturable=True")


def _check_lr_device(lr: float | Tensor, device: torch.device, optimizer: str) -> None:
    """A tensor ``lr`` is on the parameters' ``device`` (a captured step reads it there)."""
    if isinstance(lr, Tensor) and lr.device != device:
        raise ValueError(f"capturable {optimizer}: the lr tensor is on {lr.device} but the parameters are on {device}; "
                         f"create it there (torch.tensor(lr, device={str(device)!r}))")


def _check_capturable_lr(group: dict[str, Any], optimizer: str = "AdamW") -> None:
    """:func:`_check_lr_device` for a group: its tensor ``lr`` on its parameters' device."""
    if group["params"]:
        _check_lr_device(group["lr"], group["params"][0].device, optimizer)


def _adamw_scalars(group: dict[str, Any], steps: Sequence[int | Tensor]) -> tuple[Any, list[Any], list[Any]]:
    """``(1 − lr·λ, [−lr / (1 − β₁ᵗ)], [√(1 − β₂ᵗ)])`` for the step counts ``steps`` of a group's parameters.

    Not capturable: Python floats (the kernels round them to float32). Capturable: the same values
    from the step-count tensors, computed in float64 on their device and rounded to float32 0-dim
    tensors — one stacked computation for all of ``steps``, no host read. A float64 ``pow`` kernel
    may differ from Python's in the last of its 53 bits; after rounding to float32 no difference
    was found (steps 1–20 000, β ∈ {0.9, 0.99, 0.999}, four LRs from 5e-6 to 1e-2).
    """
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    if not group["capturable"]:
        decay = 1 - lr * wd
        return decay, [-lr / (1 - beta1**t) for t in steps], [(1 - beta2**t) ** 0.5 for t in steps]
    t = torch.stack(list(steps)).to(torch.float64)  # (k,)
    lr64 = lr.detach().reshape(()).to(device=t.device, dtype=torch.float64) if isinstance(lr, Tensor) else lr
    decay = (1 - lr64 * wd).to(torch.float32) if isinstance(lr, Tensor) else 1 - lr * wd
    step_sizes = (-lr64 / (1 - torch.pow(beta1, t))).to(torch.float32)  # (k,)
    bias_corrections2_sqrt = (1 - torch.pow(beta2, t)).sqrt().to(torch.float32)  # (k,)
    return decay, list(step_sizes.unbind(0)), list(bias_corrections2_sqrt.unbind(0))


def _block_scales(absmax: Tensor, block_size: int, n: int) -> Tensor:
    """Each element's block absmax: ``(nb,) -> (n,)`` (``repeat_interleave`` without a host sync)."""
    return absmax[:, None].expand(absmax.numel(), block_size).reshape(-1)[:n]


def _state_dtype_name(state_dtype: torch.dtype | str) -> str:
    if isinstance(state_dtype, (torch.dtype, str)) and state_dtype in _STATE_DTYPES:
        return _STATE_DTYPES[state_dtype]
    raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16 or 'int8', got {state_dtype!r}")


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor))


def _load_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    for index, p in zip(saved_ids, params):
        for key, value in saved_state.get(index, {}).items():
            if isinstance(value, Tensor):
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


# ------------------------------------------------------------------------------ Adafactor
class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with transformers'/kohya's conventions and defaults.

    For a gradient ``G`` viewed as a matrix ``(R, C)`` (see ``factor_conv_as_matrix``), step ``t``::

        β₂ₜ = 1 − t^decay_rate                         (decay_rate = −0.8)
        r ← β₂ₜ r + (1 − β₂ₜ) mean_cols(G² + ε₁)      (R,)
        c ← β₂ₜ c + (1 − β₂ₜ) mean_rows(G² + ε₁)      (C,)
        U = G / √(r cᵀ / mean(r))                      factored second moment
        U ← U / max(1, RMS(U) / d) · ρ                d = clip_threshold
        m ← β₁ m + (1 − β₁) U ;  U ← m               only if beta1 is not None
        w ← w − ρ λ w − U

    1-D parameters keep a full ``v`` (``U = G / √v``). ``ρ = lr`` unless ``relative_step``
    (``ρ = min(10⁻², 1/√t)``, or ``min(10⁻⁶ t, 1/√t)`` with ``warmup_init``); with
    ``scale_parameter`` it is multiplied by ``max(ε₂, RMS(w))``. Updates are computed in float32;
    bf16 weights are written back with stochastic rounding (kohya's fused Adafactor).

    Args:
        params: parameters or parameter groups.
        lr: required unless ``relative_step=True`` (then it must be ``None``); with
            ``capturable=True`` it may be a 0-dim tensor on the parameters' device (change it in
            place with :func:`set_lr`; a captured graph reads it). A float64 one gives the float
            ``lr``'s results bit for bit; a float32 one rounds the LR to float32 first, which with
            ``scale_parameter`` or ``weight_decay`` may move a step's size by a float32 ulp.
        eps: ``(ε₁, ε₂)``, default ``(1e-30, 1e-3)``.
        clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
            warmup_init: as ``transformers.optimization.Adafactor`` (whose defaults for
            ``scale_parameter`` and ``relative_step`` are ``True``; here they are ``False``,
            the usual choice for diffusion fine-tuning with an explicit LR).
        factor_conv_as_matrix: factor a ``≥3``-D weight ``(O, I, k, k)`` as ``(O, I·k·k)``
            (``O + I·k·k`` floats of state). ``False`` factors the last two dims as transformers
            does, which for a 3×3 kernel keeps ``6·O·I`` floats — more than the weight's ``9·O·I``
            only by 3×, i.e. almost no saving.
        stochastic_rounding: stochastic rounding when writing bf16 weights.
        generator: RNG for stochastic rounding (default: torch's global RNG).
        foreach: update a group's parameters with multi-tensor (``torch._foreach_*``) ops instead
            of one parameter at a time: low-precision weights and gradients cast to float32 in one
            batched pass each, bf16 weights written back through one stochastic-rounding pass; per
            parameter only the three means of a factored second moment remain (row and column means
            of ``G² + ε₁``, the row factor's mean). Parameters go in chunks of 2²⁴ elements on one
            device (a larger one alone), as :class:`AdamW`'s. The same operations in the same
            order and the same rounding draws, so bit-identical to ``foreach=False`` on CPU
            (tested; capturable or not, channels_last, parameters skipping steps); on CUDA the
            multi-tensor kernels may round differently in the last bit. Per step over SD1.5's 686
            UNet tensors: ~2.4 k aten ops instead of ~15 k (``benchmarks/adafactor_foreach_ops.py``).
        capturable: torch's meaning — the step can be recorded in a CUDA graph and replayed
            (:class:`~sdadapt.training.step_capture.CapturedStep`): each parameter's step count is
            a float32 0-dim tensor on its device (``state["step"]``), and ``β₂ₜ``, ``1 − β₂ₜ`` and
            the step size ``ρ`` (relative step, warm-up, the weight's RMS scale) are tensor ops on
            the counts (one stacked float64 computation per group and device), rounded to float32
            where ``capturable=False`` rounds its Python floats; the clip ``max(1, RMS(U)/d)`` is a
            device op in both modes. Nothing reads a value back to the host or allocates by data.
            On CPU both modes give bit-identical results (tested); the one place they could part is
            the last float64 bit of torch's ``t^decay_rate`` and ``1/√t`` against Python's, which
            changed no float32 rounding for steps 1–300 000 (decay rates −0.3 … −1). Under a CUDA
            graph the stochastic-rounding draws come from ``generator`` (``CapturedStep`` registers
            a non-default CUDA one with the graph). States saved in either mode resume in either
            (``load_state_dict`` converts the step counts).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
        factor_conv_as_matrix: bool = True,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        if lr is None and not relative_step:
            raise ValueError("Adafactor needs an explicit lr=..., or relative_step=True for the time-dependent step size")
        if lr is not None and relative_step:
            raise ValueError("Adafactor: pass either lr=... or relative_step=True, not both (lr must be None)")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True needs relative_step=True")
        _check_common(0.0 if lr is None else _lr_value(lr), weight_decay)
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor beta1 must be None or in [0, 1), got {beta1!r}")
        if not decay_rate < 0.0:
            raise ValueError(f"Adafactor decay_rate must be negative (β₂ₜ = 1 − t^decay_rate), got {decay_rate!r}")
        if not clip_threshold > 0.0:
            raise ValueError(f"Adafactor clip_threshold must be > 0, got {clip_threshold!r}")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init,
                        factor_conv_as_matrix=factor_conv_as_matrix,
                        **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable))
        super().__init__(params, defaults)
        self.generator = generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, checking a group's tensor ``lr``
        (one value, and only with ``capturable=True``)."""
        super().add_param_group(param_group)
        _check_tensor_lr(self.param_groups[-1], "Adafactor")

    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        return x.norm(2) / (x.numel() ** 0.5)

    @staticmethod
    def _factored_view(x: Tensor, group: dict[str, Any]) -> Tensor:
        """The matrix (or batch of matrices) whose rows/columns are factored."""
        if x.dim() > 2 and group["factor_conv_as_matrix"]:
            return x.reshape(x.shape[0], -1)  # (O, I·k·k)
        return x  # (..., R, C)

    @staticmethod
    def _host_scalars(group: dict[str, Any], step: int) -> tuple[float, float, float]:
        """``(β₂ₜ, 1 − β₂ₜ, ρ before the RMS scale)`` at step count ``step``, as Python floats."""
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        rho = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rho = min(min_step, 1.0 / math.sqrt(step))
        return beta2t, 1.0 - beta2t, rho

    @staticmethod
    def _device_scalars(group: dict[str, Any], steps: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, Any]]:
        """:meth:`_host_scalars` for capturable step counts (float32 0-dim tensors on one device),
        in one stacked float64 computation on that device for all of them — no host read:
        ``β₂ₜ`` and ``1 − β₂ₜ`` rounded to float32 0-dim tensors (as a kernel rounds the Python
        floats), ρ a float64 0-dim tensor (a Python float for a float ``lr`` without relative step)."""
        t = torch.stack(list(steps)).to(torch.float64)  # (k,)
        beta2t = 1.0 - torch.pow(t, group["decay_rate"])  # (k,)
        rest = (1.0 - beta2t).float().unbind(0)
        rho: Any = group["lr"]
        if group["relative_step"]:  # min(…, 1/√t) as Python's, on the device
            inverse_sqrt = t.sqrt().reciprocal()  # (k,)
            rho = (torch.minimum(t * 1e-6, inverse_sqrt) if group["warmup_init"] else inverse_sqrt.clamp(max=1e-2)).unbind(0)
        elif isinstance(rho, Tensor):
            rho = [rho.detach().reshape(()).to(device=t.device, dtype=torch.float64)] * len(steps)
        else:
            rho = [rho] * len(steps)
        return list(zip(beta2t.float().unbind(0), rest, rho))

    def _scalars(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
        """``(β₂ₜ, 1 − β₂ₜ, ρ before the RMS scale)`` for each of ``states`` (their counts stepped
        already): Python floats, or in capturable mode device tensors, one stacked computation per
        device (:meth:`_device_scalars`)."""
        if not group["capturable"]:
            return [self._host_scalars(group, state["step"]) for state in states]
        out: list[Any] = [None] * len(states)
        by_device: dict[torch.device, list[int]] = {}
        for i, state in enumerate(states):
            by_device.setdefault(state["step"].device, []).append(i)
        for indices in by_device.values():
            for i, scalars in zip(indices, self._device_scalars(group, [states[i]["step"] for i in indices])):
                out[i] = scalars
        return out

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        """Fresh float32 state for ``p``: moments of its factored view's shape (:meth:`_factored_view`)."""
        state["step"] = _new_step_count(p, group)
        shape = p.shape
        if len(shape) > 2 and group["factor_conv_as_matrix"]:
            shape = torch.Size((shape[0], p.numel() // shape[0]))  # (O, I·k·k)
        zeros = {"dtype": torch.float32, "device": p.device}
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, **zeros)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **zeros)  # (..., R)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **zeros)  # (..., C)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **zeros)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adafactor step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        for group in self.param_groups:
            params = _params_with_grads(group, "sdadapt.training.optim.Adafactor")
            if not params:
                continue
            if group["capturable"]:
                _check_capturable_lr(group, "Adafactor")
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    self._init_state(state, p, group)
            _count_steps(states)
            scalars = self._scalars(group, states)
            if not group.get("foreach"):
                for p, state, (beta2t, rest, rho) in zip(params, states, scalars):
                    self._update(p, state, group, beta2t, rest, rho)
                continue
            index = {id(p): i for i, p in enumerate(params)}
            for chunk in _param_chunks(params):
                at = [index[id(p)] for p in chunk]
                self._foreach_update(group, chunk, [states[i] for i in at], [scalars[i] for i in at])
        return loss

    def _foreach_update(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
                        scalars: list[tuple[Any, Any, Any]]) -> None:
        """:meth:`_update` of every parameter of one chunk (one device) as multi-tensor ops: the
        same operations on the same values in the same order, so on CPU the same bits (tested).

        What stays per parameter: the three means of the factored second moment (row and column
        means of ``G² + ε₁``, the row factor's mean) — reductions ``torch._foreach_*`` does not have.
        Low-precision weights and gradients are cast to float32 in one batched pass each and the
        bf16 weights written back through one stochastic-rounding pass (the per-parameter draws).
        """
        beta1, weight_decay = group["beta1"], group["weight_decay"]
        beta2ts, rests, rhos = (list(column) for column in zip(*scalars))
        grads = [self._factored_view(g, group) for g in _float32_many([p.grad for p in params])]  # type: ignore[misc]
        weights = _float32_many(params)  # contiguous float32 (the parameters themselves when they are)
        if group["scale_parameter"]:  # max(ε₂, RMS(w))·ρ in float64, as the per-parameter step
            # (the norm of a weight in its own layout, channels_last say, as that step sums it: the order of a sum)
            norms = torch._foreach_norm([w if p.is_contiguous() else _float32(p) for p, w in zip(params, weights)])
            torch._foreach_div_(norms, [w.numel() ** 0.5 for w in weights])
            scaled = torch.stack(norms).double().clamp_(min=group["eps"][1])  # (k,) float64
            if isinstance(rhos[0], Tensor):
                scaled.mul_(torch.stack(rhos))
            elif all(rho == rhos[0] for rho in rhos):
                scaled.mul_(rhos[0])
            else:  # (step counts that differ within a group: a parameter skipped some steps)
                scaled = torch.stack([s * rho for s, rho in zip(scaled.unbind(0), rhos)])
            rhos = list(scaled.unbind(0))
        updates = list(torch._foreach_mul(grads, grads))  # G² + ε₁
        torch._foreach_add_(updates, group["eps"][0])
        factored = [i for i, g in enumerate(grads) if g.dim() >= 2]
        vector = [i for i, g in enumerate(grads) if g.dim() < 2]
        if vector:
            vs = [states[i]["exp_avg_sq"] for i in vector]
            _foreach_decay_add_(vs, [updates[i] for i in vector], [beta2ts[i] for i in vector], [rests[i] for i in vector])
            vector_updates = torch._foreach_rsqrt(vs)
            torch._foreach_mul_(vector_updates, [grads[i] for i in vector])
            for i, u in zip(vector, vector_updates):
                updates[i] = u
        if factored:
            rows = [states[i]["exp_avg_sq_row"] for i in factored]
            cols = [states[i]["exp_avg_sq_col"] for i in factored]
            new = [updates[i].mean(dim=-1) for i in factored] + [updates[i].mean(dim=-2) for i in factored]
            _foreach_decay_add_(rows + cols, new, [beta2ts[i] for i in factored] * 2, [rests[i] for i in factored] * 2)
            r_factors = torch._foreach_div(rows, [row.mean(dim=-1, keepdim=True) for row in rows])
            torch._foreach_rsqrt_(r_factors)
            c_factors = torch._foreach_rsqrt(cols)
            matrix_updates = torch._foreach_mul([r.unsqueeze(-1) for r in r_factors],  # (..., R, 1) · (..., 1, C)
                                                [c.unsqueeze(-2) for c in c_factors])
            torch._foreach_mul_(matrix_updates, [grads[i] for i in factored])
            for i, u in zip(factored, matrix_updates):
                updates[i] = u
        clips = torch._foreach_norm(updates)  # max(1, RMS(U)/d) on the device
        torch._foreach_div_(clips, [u.numel() ** 0.5 for u in updates])
        torch._foreach_div_(clips, group["clip_threshold"])
        torch._foreach_clamp_min_(clips, 1.0)
        torch._foreach_div_(updates, clips)
        torch._foreach_mul_(updates, rhos)
        if beta1 is not None:
            ms = [state["exp_avg"] for state in states]
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, updates, alpha=1 - beta1)
            updates = ms
        if weight_decay != 0:
            if isinstance(rhos[0], Tensor):  # w + w·(−λρ), the factor rounded to float32 as alpha= is
                torch._foreach_addcmul_(weights, weights, list((torch.stack(rhos) * -weight_decay).float().unbind(0)))
            elif all(rho == rhos[0] for rho in rhos):
                torch._foreach_add_(weights, weights, alpha=-weight_decay * rhos[0])
            else:
                for w, rho in zip(weights, rhos):
                    w.add_(w, alpha=-weight_decay * rho)
        torch._foreach_sub_(weights, [u.view(w.shape) for u, w in zip(updates, weights)])  # w − U, as w + (−U)
        _write_weights_many(params, weights, group["stochastic_rounding"], self.generator)

    def _update(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], beta2t: Any, rest: Any, rho: Any) -> None:
        """One parameter's update, given ``β₂ₜ``, ``1 − β₂ₜ`` and ρ before the RMS scale (numbers,
        or device tensors in capturable mode)."""
        grad = _float32(p.grad)  # type: ignore[arg-type]
        g = self._factored_view(grad, group)  # (R, C), (..., R, C) or (n,)
        w = _float32(p)
        if group["scale_parameter"]:  # max(ε₂, RMS(w))·ρ as a float64 device tensor, as Python would: no host read
            rho = self._rms(w).double().clamp(min=group["eps"][1]) * rho
        update = g.square() + group["eps"][0]
        if g.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            _decay_add_(row, update.mean(dim=-1), beta2t, rest)
            _decay_add_(col, update.mean(dim=-2), beta2t, rest)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # (..., R, 1)
            c_factor = col.unsqueeze(-2).rsqrt()  # (..., 1, C)
            update = torch.mul(r_factor, c_factor).mul_(g)  # (..., R, C)
        else:
            v = state["exp_avg_sq"]
            _decay_add_(v, update, beta2t, rest)
            update = v.rsqrt().mul_(g)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))  # max(1, RMS(U)/d) on the device
        update.mul_(rho)
        beta1 = group["beta1"]
        if beta1 is not None:
            m = state["exp_avg"]
            m.mul_(beta1).add_(update, alpha=1 - beta1)
            update = m
        if group["weight_decay"] != 0:
            if isinstance(rho, Tensor):  # w + w·(−λρ), the decay factor rounded to float32 as alpha= is
                w.addcmul_(w, (rho * -group["weight_decay"]).float())
            else:
                w.add_(w, alpha=-group["weight_decay"] * rho)
        w.add_(-update.view(p.shape))
        _write_weight(p, w, group["stochastic_rounding"], self.generator)

    def state_bytes(self) -> int:
        """Bytes held by optimiser state tensors."""
        return _state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but keeps the saved (float32) state dtypes
        and this optimiser's ``capturable`` mode: step counts saved as ints become device tensors
        and vice versa, and a tensor ``lr`` stays the same tensor (filled with the saved value), so
        a graph that reads it keeps working. States saved in either mode resume in either; each
        group keeps its ``foreach`` too (a state saved on a GPU resumes per parameter on a CPU)."""
        _load_keeping_mode(self, state_dict)


def _foreach_decay_add_(states: list[Tensor], news: list[Tensor], beta2ts: list[Any], rests: list[Any]) -> None:
    """:func:`_decay_add_` of each ``states[i]``, as multi-tensor ops: a list of numbers or of 0-dim
    tensors for ``β₂ₜ``; ``1 − β₂ₜ`` as one ``alpha=`` when the numbers agree (the usual case: the
    same step count), per tensor otherwise, and ``addcmul_`` with 0-dim tensors."""
    torch._foreach_mul_(states, beta2ts)
    if isinstance(rests[0], Tensor):
        torch._foreach_addcmul_(states, news, rests)
    elif all(rest == rests[0] for rest in rests):
        torch._foreach_add_(states, news, alpha=rests[0])
    else:
        for state, new, rest in zip(states, news, rests):
            state.add_(new, alpha=rest)


def _decay_add_(state: Tensor, new: Tensor, beta2t: float | Tensor, rest: float | Tensor) -> None:
    """``state ← β₂ₜ·state + (1 − β₂ₜ)·new`` in place, ``rest = 1 − β₂ₜ``. With tensor factors
    (capturable) the second term is ``addcmul_`` with the 0-dim ``rest``: on CPU the same fused
    multiply-add, so the same bits, as ``add_(new, alpha=rest)`` with a Python float."""
    state.mul_(beta2t)
    if isinstance(rest, Tensor):
        state.addcmul_(new, rest)
    else:
        state.add_(new, alpha=rest)


# ---------------------------------------------------------------------------- fused backward
class FusedBackward:
    """Handle of :func:`fuse_optimizer_into_backward`: one optimiser per group of parameters,
    stepped by gradient hooks. ``remove()`` undoes the hooks; the parameters are otherwise untouched.
    Keep the handle while training: the hooks hold it weakly, and once it is garbage they are removed
    (later backward passes accumulate ``.grad`` as usual), so dropping the model, the handle and the
    optimisers frees them all, states included.

    Attributes:
        params: the fused (trainable) parameters, in the order given.
        groups: the parameter groups, one per optimiser (one parameter each by default).
        optimizers: one optimiser per group, in the order of ``groups``.
    """

    def __init__(self, groups: Sequence[Sequence[Tensor]], optimizers: Sequence[torch.optim.Optimizer],
                 params: Sequence[Tensor] | None = None) -> None:
        self.groups = tuple(tuple(group) for group in groups)
        self.params = tuple(params) if params is not None else tuple(p for group in self.groups for p in group)
        self.optimizers = tuple(optimizers)
        self._hooks: list[Any] = []
        # the backward pass being served: its autograd graph task, and per group how many of its
        # parameters have arrived / are awaited (the parameters that require grad when it began)
        self._task: int | None = None
        self._arrived = [0] * len(self.groups)
        self._awaited = [0] * len(self.groups)

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        # the hook (kept by the parameter, where Python's garbage collector cannot see it) holds the handle
        # weakly: a strong reference would keep the handle, its optimisers' states and every parameter alive
        # for ever once the caller drops them all; a dropped handle's hooks are removed (its finalizer)
        owner = weakref.ref(self)

        def _arrive(param: Tensor) -> None:
            handle = owner()
            if handle is not None:
                handle._arrive(index)

        return _arrive

    def _arrive(self, index: int) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._begin(task)
        self._arrived[index] += 1
        if self._arrived[index] == self._awaited[index]:
            self._step(index)

    def _begin(self, task: int) -> None:
        """The first gradient of a backward pass: count what each group awaits, queue its end."""
        self._flush()  # a pass that raised before its end (or a nested, reentrant one) left groups open
        self._task = task
        self._awaited = [sum(p.requires_grad for p in group) for group in self.groups]
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end(task))

    def _end(self, task: int) -> None:
        if task == self._task:
            self._flush()

    def _flush(self) -> None:
        """Step the groups that got some but not all of their gradients (an unused branch)."""
        for index, arrived in enumerate(self._arrived):
            if arrived:
                self._step(index)
        self._task = None

    def _step(self, index: int) -> None:
        self.optimizers[index].step()  # skips the group's parameters without a gradient
        for p in self.groups[index]:
            p.grad = None
        self._arrived[index] = 0

    def remove(self) -> None:
        """Remove the hooks: later backward passes accumulate ``.grad`` as usual. The gradients a
        backward that raised before its end left in its open groups are dropped (not applied), so
        they neither stay alive nor add to the next backward's."""
        _remove_hooks(self._hooks)
        for index, arrived in enumerate(self._arrived):
            if arrived:
                for p in self.groups[index]:
                    p.grad = None
                self._arrived[index] = 0
        self._task = None

    def set_lr(self, lr: float) -> None:
        """Set every optimiser's (every group's) ``lr`` — call it before each backward with
        :func:`lr_at` to run a schedule."""
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": [optimizer.state_dict() for each group, in order]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same parameters, same groups, same order)."""
        saved = state_dict.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            have = "none" if saved is None else len(saved)
            raise ValueError(f"state_dict holds {have} optimisers but this handle has {len(self.optimizers)}; "
                             "fuse the same parameters in the same groups and order before loading")
        for optimizer, sd in zip(self.optimizers, saved):
            optimizer.load_state_dict(sd)

    def state_bytes(self) -> int:
        """Bytes held by all the optimisers' state tensors."""
        return sum(_state_bytes(o) for o in self.optimizers)


def fuse_optimizer_into_backward(
    params: Iterable[Tensor],
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    groups: Iterable[Iterable[Tensor]] | None = None,
) -> FusedBackward:
    """Step the optimiser inside ``backward()``: each group of parameters is updated as soon as
    all its gradients of this pass have accumulated, and those gradients are freed at once
    (``p.grad = None``).

    Peak memory drops by the gradient buffer (4 B/param in fp32): the gradients alive at once are
    those of the groups still open — one parameter's by default; with ``groups`` that close as
    the backward leaves them (one per UNet block, :func:`~sdadapt.training.param_groups.parameter_groups_by_module`)
    about one block's. The update equals the usual ``backward(); step(); zero_grad()`` for any
    per-parameter optimiser (AdamW, Adafactor, SGD…), but anything needing all gradients at once
    is impossible: global gradient-norm clipping, gradient accumulation over micro-batches,
    optimisers coupling parameters (Prodigy, D-Adaptation), AMP ``GradScaler``.

    Groups trade memory for speed: one ``step()`` per group instead of per parameter, so a
    multi-tensor optimiser (``AdamW(foreach=True)``, torch's AdamW on CUDA) launches one set of
    kernels per group — the per-parameter hooks and single-tensor steps are what made a fused
    full fine-tune host-bound on a GPU. A parameter that gets no gradient in a pass (an unused
    branch, a parameter frozen since) does not hold its group back: the groups left partly filled
    are stepped at the end of the backward (an autograd final callback; the optimiser skips
    parameters without a gradient). A backward that raises before its end leaves its open groups'
    gradients in ``.grad``; they are applied at the start of the next backward, or dropped by
    ``remove()`` (an outer backward's open groups are applied the same way when a reentrant
    checkpoint runs a nested one: the same updates, more steps).
    Stochastic rounding (bf16 weights or states) draws from its RNG in the order the groups close,
    so there the result matches the usual loop in distribution, not bit for bit.

    Args:
        params: leaf tensors; those with ``requires_grad=False`` are skipped (a frozen base
            can be passed along with the adapter). Duplicates are fused once.
        make_optimizer: builds one optimiser for one group's parameter list, e.g.
            ``lambda ps: AdamW(ps, lr=1e-4, state_dtype="int8", foreach=True)``.
        groups: a partition of the trainable ``params`` into lists (frozen ones are skipped,
            empty groups dropped); default: one group per parameter.

    Returns:
        :class:`FusedBackward` with ``groups``, ``optimizers``, ``remove()``, ``set_lr(lr)``,
        ``state_dict()``, ``load_state_dict()``, ``state_bytes()``.

    Raises:
        ValueError: a parameter is not a leaf tensor, none requires grad, or ``groups`` is not a
            partition of the trainable ``params`` (a parameter outside ``params``, one in two
            groups, or a trainable one in none).

    Example:
        >>> fused = fuse_optimizer_into_backward(model.parameters(), lambda ps: AdamW(ps, lr=1e-3, foreach=True),
        ...                                      groups=parameter_groups_by_module(model))
        >>> for step, batch in enumerate(loader):
        ...     fused.set_lr(lr_at(step, base_lr=1e-3, schedule="cosine", total_steps=1000))
        ...     loss_fn(model, batch).backward()    # no optimizer.step(), no zero_grad()
    """
    trainable: list[Tensor] = []
    given: set[int] = set()
    for p in params:
        if id(p) in given:
            continue
        given.add(id(p))
        if not p.requires_grad:
            continue
        if not p.is_leaf:
            raise ValueError("fuse_optimizer_into_backward needs leaf tensors (parameters); "
                             "got a tensor computed from others — pass the parameters it came from")
        trainable.append(p)
    if not trainable:
        raise ValueError("fuse_optimizer_into_backward: no parameter requires grad; unfreeze the ones to train")
    partition = [[p] for p in trainable] if groups is None else _checked_groups(groups, trainable, given)
    optimizers = [make_optimizer(list(group)) for group in partition]
    handle = FusedBackward(partition, optimizers, trainable)
    for index, group in enumerate(partition):
        hook = handle._hook(index)
        handle._hooks += [p.register_post_accumulate_grad_hook(hook) for p in group]
    weakref.finalize(handle, _remove_hooks, handle._hooks)  # (dropped: later backwards accumulate .grad as usual)
    return handle


def _remove_hooks(hooks: list[Any]) -> None:
    for hook in hooks:
        hook.remove()
    hooks.clear()


def _checked_groups(groups: Iterable[Iterable[Tensor]], trainable: list[Tensor], given: set[int]) -> list[list[Tensor]]:
    """``groups`` without frozen parameters and empty groups, checked to partition ``trainable``."""
    wanted = {id(p) for p in trainable}
    placed: dict[int, int] = {}
    out: list[list[Tensor]] = []
    for index, group in enumerate(groups):
        kept = []
        for p in group:
            if id(p) not in given:
                raise ValueError(f"fuse_optimizer_into_backward: groups[{index}] holds a parameter of shape "
                                 f"{tuple(p.shape)} that is not in params; build the groups from the same parameters")
            if id(p) in placed:
                raise ValueError(f"fuse_optimizer_into_backward: a parameter of shape {tuple(p.shape)} is in groups "
                                 f"[{placed[id(p)]}] and [{index}]; each parameter belongs to one group")
            placed[id(p)] = index
            if id(p) in wanted:
                kept.append(p)
        if kept:
            out.append(kept)
    missing = [p for p in trainable if id(p) not in placed]
    if missing:
        raise ValueError(f"fuse_optimizer_into_backward: {len(missing)} trainable parameter(s) (the first of shape "
                         f"{tuple(missing[0].shape)}) are in no group; groups must cover every trainable parameter "
                         "(e.g. parameter_groups_by_module(model, params=params))")
    return out


# ------------------------------------------------------------------------------- LR schedules
def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` in every parameter group of ``optimizer`` (a tensor ``lr``, as capturable optimisers
    take, is filled in place so a CUDA graph reading it sees the new value)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(
    step: int,
    *,
    base_lr: float,
    schedule: Schedule = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    num_cycles: int = 1,
    min_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """The learning rate at optimiser step ``step`` (0-based), as diffusers' ``get_scheduler``.

    With ``s = step``, ``W = warmup_steps``, ``T = total_steps``, ``p = (s − W) / max(1, T − W)``
    clamped to ``[0, 1]`` and ``f`` the decay factor, for ``s < W`` every schedule but
    ``"constant"`` warms up linearly, ``lr = base · s / W``; afterwards
    ``lr = min_lr + (base − min_lr) · f``::

        constant, warmup        f = 1
        linear                  f = (T − s) / max(1, T − W)              (= 1 − p when T > W)
        cosine                  f = ½ (1 + cos(π p))                     (one half-wave)
        cosine_with_restarts    f = ½ (1 + cos(π ((num_cycles · p) mod 1))), 0 once p = 1
        polynomial              f = (1 − p) ** power                     (diffusers' polynomial decay with
                                                                 lr_end = min_lr; power 1: linear to min_lr)

    Past ``total_steps`` the rate stays at ``min_lr`` (diffusers' cosine would rise again).

    Raises:
        ValueError: unknown schedule, ``warmup_steps`` with ``"constant"`` (use ``"warmup"``),
            a decaying schedule without ``total_steps``, or negative / inconsistent values.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(_SCHEDULES)}; got {schedule!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr <= base_lr:
        raise ValueError(f"need 0 <= min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}")
    if schedule == "constant":
        if warmup_steps:
            raise ValueError("schedule='constant' has no warmup; use schedule='warmup' for a warmup then constant LR")
        return float(base_lr)
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    if schedule == "warmup":
        return float(base_lr)
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"schedule={schedule!r} needs total_steps=<number of optimiser steps> (> 0)")
    if not isinstance(num_cycles, int) or num_cycles < 1:
        raise ValueError(f"num_cycles must be a positive int, got {num_cycles!r}")
    if schedule == "polynomial" and not 0.0 <= power < math.inf:
        raise ValueError(f"power must be a finite number >= 0 (1: linear decay), got {power!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":  # diffusers' form: 0 already at step W when T == W
        factor = (total_steps - step) / max(1, total_steps - warmup_steps)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "polynomial":
        factor = 0.0 if step > total_steps else (1.0 - progress) ** power  # (diffusers: lr_end past the end)
    else:  # cosine_with_restarts
        factor = 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    return min_lr + (base_lr - min_lr) * max(0.0, factor)
