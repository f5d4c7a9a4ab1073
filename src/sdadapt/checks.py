"""Checks shared by every command: numeric arguments, the compute device, and results before writing.

* :func:`finite_number` — an argument (``--alpha``, ``--scale``, ``--rank`` ...) must be a finite
  number in a sensible range; the message names the option and the range.
* :func:`check_device` — ``--device`` names a device this torch build has (``cuda`` on a CPU
  build, ``bogus``: one clear line instead of a torch assertion).
* :func:`check_result` / :func:`cast_checked` — a tensor about to be written must be finite, and
  must fit the output dtype: a float32 value above float16's 65504 is refused *before* the cast
  (naming the key and the largest magnitude) rather than written as ``inf``.

``allow_nonfinite`` lets NaN/inf that were already in an *input* pass through unchanged (a
command's ``--allow-nonfinite``); non-finite values that the operation itself produced are always
refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, NonFiniteError

__all__ = [
    "finite_number",
    "finite_numbers",
    "positive_int",
    "check_device",
    "has_nonfinite",
    "nonfinite_scan",
    "check_result",
    "cast_checked",
    "MAX_STRENGTH",
]

#: the largest |strength| accepted for merge alphas, LoRA scales, task-vector weights: beyond it no
#: model survives, and the output overflows float16
MAX_STRENGTH = 1000.0


def finite_number(
    value: Any, *, name: str, low: float | None = None, high: float | None = None, low_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Raises:
        InputError: not a number, NaN/inf, or out of range — naming ``name`` and the range.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, str, bytes)):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # ints, floats, numpy scalars, 0-dim tensors
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise InputError(f"{name} must be a number, got {str(value)[:80]!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {number}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and number > high
    if too_low or too_high:
        left = "(" if low_open else "["
        span = f"{left}{_g(low) if low is not None else '-inf'}, {_g(high) if high is not None else 'inf'}]"
        raise InputError(f"{name} must be in {span}, got {_g(number)}")
    return number


def _g(value: float | None) -> str:
    return "None" if value is None else f"{value:g}"


def finite_numbers(values: Iterable[Any], *, name: str, low: float | None = None, high: float | None = None) -> tuple[float, ...]:
    """Each of ``values`` through :func:`finite_number` (the message names the position)."""
    out = []
    for index, value in enumerate(values, 1):
        out.append(finite_number(value, name=f"{name} (value {index})", low=low, high=high))
    return tuple(out)  # type: ignore[arg-type]


def positive_int(value: Any, *, name: str, high: int = 1 << 20, allow_none: bool = False) -> int | None:
    """``value`` as an int in ``[1, high]``; :class:`InputError` naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= value <= high:
        raise InputError(f"{name} must be between 1 and {high}, got {value}")
    return int(value)


def check_device(device: Any, *, option: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` this build can use.

    Raises:
        InputError: an unknown device name, or a device type this torch build or machine lacks
            (``cuda`` on a CPU-only build, ``mps`` off a Mac ...).
    """
    if isinstance(device, torch.device):
        parsed = device
    else:
        try:
            parsed = torch.device(str(device))
        except (RuntimeError, ValueError, TypeError):
            raise InputError(f"{option} {device!r}: not a device name; use cpu, cuda, cuda:N or mps") from None
    kind = parsed.type
    if kind == "cpu":
        return parsed
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise InputError(f"{option} {device}: this torch ({torch.__version__}) is {build}; use {option} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return parsed
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
        return parsed
    raise InputError(f"{option} {device}: sdadapt computes on cpu, cuda or mps, not {kind}")


#: the float dtypes whose NaN/inf one ``aminmax`` reduction finds (float8 and complex take ``isfinite``, float8 upcast)
_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_nonfinite(tensor: Tensor) -> bool:
    """Whether a floating (or complex) tensor holds NaN or inf (integer tensors never do).

    One ``aminmax`` reduction for float16/bfloat16/float32/float64: it propagates NaN and reaches ±inf, so the
    tensor holds NaN/inf iff its min or max is not finite (no full-size bool tensor: ~10x faster on CPU than
    ``isfinite(t).all()``, and every tensor read, merged or written goes through here)."""
    return nonfinite_scan(tensor)[0]


def nonfinite_scan(tensor: Tensor) -> tuple[bool, tuple[float, float] | None]:
    """``(holds NaN/inf, (min, max))`` of a tensor in one ``aminmax`` reduction — :func:`has_nonfinite` and
    the range :func:`cast_checked` needs for its overflow check (pass it as ``extremes``), from one pass.

    Returns:
        ``(has_nonfinite, (min, max))`` for a float16/bfloat16/float32/float64 tensor (min and max are NaN
        when it holds a NaN, ±inf when it holds one); ``(has_nonfinite, None)`` for other dtypes (integer,
        complex, float8) and empty tensors.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return False, None
    if tensor.dtype in _MINMAX_DTYPES:
        low, high = (float(v) for v in torch.aminmax(tensor))
        return not (math.isfinite(low) and math.isfinite(high)), (low, high)
    return not bool(torch.isfinite(tensor if tensor.is_complex() else tensor.float()).all()), None  # (float8)


def _describe(tensor: Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
    return " and ".join(parts) + f" of {tensor.numel()} values"


def check_result(
    value: Tensor, *, key: str, inputs: Sequence[Tensor] = (), allow_nonfinite: bool = False, what: str = "the result",
    hint: str = "",
) -> None:
    """Refuse a result tensor holding NaN/inf.

    Args:
        key: the tensor's name (for the message).
        inputs: the input tensors it was computed from: NaN/inf already in them is "from the
            inputs" (passes with ``allow_nonfinite``), otherwise the operation produced it.
        what: what computed it (``"weighted-sum"``, ``"merge-lora"``), for the message.
        hint: what to change (e.g. "lower --scale").

    Raises:
        NonFiniteError: naming the key, how many values, and whether the inputs carried them.
    """
    if not has_nonfinite(value):
        return
    carried = [i for i, t in enumerate(inputs) if has_nonfinite(t)]
    if carried and allow_nonfinite:
        return
    if carried:
        raise NonFiniteError(
            f"tensor {key!r}: the input(s) already hold NaN/inf there ({_describe(value)} in {what}); refusing to "
            "write them — the input is broken (a diverged training?). Pass --allow-nonfinite "
            "(allow_nonfinite=True) to carry them through unchanged"
        )
    raise NonFiniteError(
        f"tensor {key!r}: {what} is not finite ({_describe(value)}) although the inputs are; refusing to write "
        f"it{(' — ' + hint) if hint else ''}"
    )


def cast_checked(
    value: Tensor, dtype: torch.dtype | None, *, key: str, hint: str = "",
    extremes: tuple[float, float] | None = None,
) -> Tensor:
    """``value.to(dtype)``, refusing finite values that the narrower dtype would turn into ±inf.

    Args:
        extremes: ``value``'s ``(min, max)`` when the caller has it already — the range of
            :func:`nonfinite_scan` (which it called to check for NaN/inf) — so the overflow check
            reads no tensor again; ``None``: one ``aminmax`` here.

    Raises:
        NonFiniteError: the largest finite |value| exceeds ``torch.finfo(dtype).max`` (names the key,
            the value and the limit).
    """
    if dtype is None or dtype == value.dtype:
        return value
    if dtype.is_floating_point and value.is_floating_point() and value.numel():
        limit = torch.finfo(dtype).max
        if torch.finfo(value.dtype).max > limit:
            if extremes is None:
                extremes = nonfinite_scan(value)[1]
            low, high = extremes if extremes is not None else (math.nan, math.nan)  # (float8: no aminmax)
            if not (math.isfinite(low) and math.isfinite(high)):  # NaN/inf in it: the range of the finite values
                finite = value[torch.isfinite(value)]
                low, high = (float(v) for v in torch.aminmax(finite)) if finite.numel() else (0.0, 0.0)
            peak = max(-low, high)  # (no full-size |value| copy: merges stream big tensors)
            if peak > limit:
                name = str(dtype).replace("torch.", "")
                raise NonFiniteError(
                    f"tensor {key!r}: max |value| {peak:.4g} overflows {name} (max {limit:.5g}); it would be "
                    f"written as inf — {hint or 'write float32 (--dtype fp32) or lower the strength'}"
                )
    return value.to(dtype)
