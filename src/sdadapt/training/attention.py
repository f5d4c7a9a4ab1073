"""Which scaled-dot-product-attention kernel to use, measured on the model's own attention calls.

``F.scaled_dot_product_attention`` picks a backend by a fixed priority (flash, then memory-efficient,
then cuDNN or math, by torch version and device). Which one is fastest depends on the GPU, the head
size (SD1.5: 40–160, SDXL: 64), the sequence lengths (4096 image tokens against 77 text tokens) and
the dtype, so the choice is measured instead of assumed::

    calls = record_attention_calls(lambda: unet(x, t, ehs).sample.sum().backward())
    order = fastest_sdpa_backends(calls)              # e.g. ("cudnn", "flash", "efficient", "math")
    config = StepConfig(mixed_precision="bf16", sdpa_backends=order)   # the step runs under it

:func:`record_attention_calls` sees every SDPA call a forward makes (diffusers' ``AttnProcessor2_0``,
the toy model, any model calling ``F.scaled_dot_product_attention``) through a torch function mode,
without patching anything; :func:`time_sdpa_backends` replays each distinct call on random tensors of
the same shapes with each backend, forward and backward; :func:`sdpa_backends` is the context the
step enters (a priority list: a call the first backend cannot run falls to the next).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .engine_backward import BackwardKeepingMode, kept_for_recompute

__all__ = [
    "SDPA_BACKENDS",
    "AttentionCall",
    "call_signature",
    "fastest_sdpa_backends",
    "fastest_sdpa_backends_per_call",
    "fastest_sdpa_orders",
    "record_attention_calls",
    "sdpa_backends",
    "time_sdpa_backends",
]

#: the backend names this module takes, in torch's own default priority order
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _backend(name: str) -> object:
    from torch.nn.attention import SDPBackend

    members = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name not in members:
        raise ValueError(f"unknown SDPA backend {name!r}; choose from {', '.join(SDPA_BACKENDS)}")
    return members[name]


def call_signature(query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], dtype: torch.dtype, *,
                   is_causal: bool = False, mask: tuple[int, ...] | None = None) -> str:
    """The text that names an attention call's kind for a per-call backend choice
    (``StepConfig.sdpa_backends_per_call``): its shapes, dtype, mask shape and causality, e.g.
    ``"q(8, 8, 4096, 40) k(8, 8, 77, 40) v(8, 8, 77, 40) torch.bfloat16 mask=None causal=False"``."""
    return f"q{tuple(query)} k{tuple(key)} v{tuple(value)} {dtype} mask={None if mask is None else tuple(mask)} " \
           f"causal={bool(is_causal)}"


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any, bool]:
    """``(query, key, value, attn_mask, is_causal)`` of an ``F.scaled_dot_product_attention`` call."""
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    return q, k, v, mask, bool(causal)


@dataclass(frozen=True)
class AttentionCall:
    """One distinct ``F.scaled_dot_product_attention`` call of a model run and how often it happened.

    ``query`` is ``(B, H, Lq, E)``, ``key`` ``(B, H, Lk, E)``, ``value`` ``(B, H, Lk, Ev)`` (or
    without the head axis); ``mask`` is the attention mask's shape (``None``: no mask).
    """

    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    is_causal: bool = False
    mask: tuple[int, ...] | None = None
    requires_grad: bool = False
    count: int = 1

    @property
    def signature(self) -> str:
        """:func:`call_signature` of this call."""
        return call_signature(self.query, self.key, self.value, self.dtype, is_causal=self.is_causal, mask=self.mask)


class _Recorder(TorchFunctionMode):
    """Counts each distinct ``F.scaled_dot_product_attention`` call (shapes, dtype, device, causal,
    mask shape, gradient need) that runs while it is active; every call goes through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[Any, ...]] = Counter()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, causal = _arguments(args, kwargs)
            self.seen[(tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, causal,
                       None if mask is None else tuple(mask.shape),
                       torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))] += 1
        return func(*args, **kwargs)


def record_attention_calls(run: Callable[[], object]) -> list[AttentionCall]:
    """Run ``run()`` once and return the distinct SDPA calls it made, most frequent first.

    ``run`` is what the step does (e.g. a forward under the step's autocast, so the dtypes are the
    ones training sees). Nothing is patched: a torch function mode watches the calls.
    """
    recorder = _Recorder()
    with recorder:
        run()
    return [AttentionCall(q, k, v, dtype, device, causal, mask, grad, count)
            for (q, k, v, dtype, device, causal, mask, grad), count in recorder.seen.most_common()]


def _seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, workspace allocation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _call_seconds(call: AttentionCall, backend: str, repeats: int) -> float | None:
    generator = torch.Generator(device=call.device).manual_seed(0)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=call.device, dtype=call.dtype).requires_grad_(call.requires_grad)

    q, k, v = tensor(call.query), tensor(call.key), tensor(call.value)
    mask = None if call.mask is None else torch.zeros(call.mask, device=call.device, dtype=call.dtype)
    grad_out = torch.randn((*call.query[:-1], call.value[-1]), generator=generator, device=call.device, dtype=call.dtype)

    def once() -> None:
        with sdpa_backends((backend,)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=call.is_causal)
        if call.requires_grad:
            torch.autograd.grad(out, (q, k, v), grad_out)

    try:
        return _seconds(once, call.device, repeats)
    except RuntimeError:  # this backend cannot run this call (head size, dtype, mask, device)
        return None


def time_sdpa_backends(
    calls: Sequence[AttentionCall],
    *,
    backends: Sequence[str] = SDPA_BACKENDS,
    repeats: int = 5,
) -> dict[str, dict[str, float | None]]:
    """Median seconds of each call (forward, and backward when the call needed gradients) with each backend.

    Returns:
        ``{backend: {"total": seconds for one model run (Σ count × call time; a call the backend
        cannot run counts at the fastest other backend's time, as a priority list falls back),
        "unsupported": number of distinct calls it cannot run, "call0": …, "call1": …}}``;
        ``total`` is ``None`` for a backend that runs none of the calls.
    """
    for name in backends:
        _backend(name)
    per_call = [{name: _call_seconds(call, name, repeats) for name in backends} for call in calls]
    table: dict[str, dict[str, float | None]] = {}
    for name in backends:
        row: dict[str, float | None] = {}
        total, unsupported = 0.0, 0
        for index, (call, times) in enumerate(zip(calls, per_call)):
            row[f"call{index}"] = times[name]
            if times[name] is None:
                unsupported += 1
                others = [t for t in times.values() if t is not None]
                total += call.count * (min(others) if others else float("inf"))
            else:
                total += call.count * times[name]
        row["unsupported"] = float(unsupported)
        row["total"] = None if calls and unsupported == len(calls) else total
        table[name] = row
    return table


def fastest_sdpa_backends(
    calls: Sequence[AttentionCall],
    *,
    backends: Sequence[str] = SDPA_BACKENDS,
    repeats: int = 5,
) -> tuple[str, ...]:
    """The backends that can run at least one of ``calls``, fastest total first (see
    :func:`time_sdpa_backends`), with ``"math"`` kept last as the fallback for any call the
    others cannot run. Pass the result to ``StepConfig(sdpa_backends=...)`` or :func:`sdpa_backends`.
    """
    return _fastest_order(time_sdpa_backends(calls, backends=backends, repeats=repeats), backends)


def fastest_sdpa_backends_per_call(
    calls: Sequence[AttentionCall],
    *,
    backends: Sequence[str] = SDPA_BACKENDS,
    repeats: int = 5,
) -> dict[str, tuple[str, ...]]:
    """For each of ``calls`` its own order, fastest backend first (see :func:`time_sdpa_backends`;
    backends that cannot run it left out, ``"math"`` last as the fallback), keyed by
    :attr:`AttentionCall.signature`. One order for every call (:func:`fastest_sdpa_backends`) gives
    each call the kernel fastest over the whole run; on the H200, SD1.5 at batch 8, cuDNN was fastest
    for the 4096-token self-attention and flash for most of the rest. Pass the result to
    ``StepConfig(sdpa_backends_per_call=...)`` or :func:`sdpa_backends`."""
    return _fastest_per_call(time_sdpa_backends(calls, backends=backends, repeats=repeats), calls, backends)


def fastest_sdpa_orders(
    calls: Sequence[AttentionCall],
    *,
    backends: Sequence[str] = SDPA_BACKENDS,
    repeats: int = 5,
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """:func:`fastest_sdpa_backends` and :func:`fastest_sdpa_backends_per_call` from one timing of
    ``calls``: ``(order, per_call)`` for ``StepConfig(sdpa_backends=order, sdpa_backends_per_call=per_call)``,
    ``per_call`` keeping only the kinds of call whose fastest kernel is not the one ``order`` gives them
    (often none: then no per-call mode runs, and an eager step pays no host cost for it)."""
    table = time_sdpa_backends(calls, backends=backends, repeats=repeats)
    order = _fastest_order(table, backends)
    per_call = {signature: own for signature, own in _fastest_per_call(table, calls, backends).items()
                if own[0] != next(name for name in order if name in own)}  # (own: the backends that run the call)
    return order, per_call


def _fastest_order(table: dict[str, dict[str, float | None]], backends: Sequence[str]) -> tuple[str, ...]:
    usable = [name for name in backends if table[name]["total"] is not None and name != "math"]
    usable.sort(key=lambda name: table[name]["total"])  # type: ignore[arg-type, return-value]
    return (*usable, "math")


def _fastest_per_call(table: dict[str, dict[str, float | None]], calls: Sequence[AttentionCall],
                      backends: Sequence[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for index, call in enumerate(calls):
        times = {name: table[name][f"call{index}"] for name in backends if name != "math"}
        usable = [name for name, t in sorted(times.items(), key=lambda item: item[1] or 0.0) if t is not None]
        out[call.signature] = (*usable, "math")
    return out


def sdpa_backends(names: Sequence[str] | None,
                  per_call: Mapping[str, Sequence[str]] | None = None) -> AbstractContextManager[None]:
    """Context in which ``F.scaled_dot_product_attention`` tries ``names`` in this order (``None``:
    torch's default choice). A call none of them can run raises torch's "no viable backend" error.
    ``per_call``: ``{call signature: order}`` (:func:`call_signature`,
    :func:`fastest_sdpa_backends_per_call`) — a call of a listed kind tries its own order instead (a
    torch function mode sees the calls; nothing is patched).

    Raises:
        ValueError: an unknown backend name, or an empty list.
    """
    if names is None and not per_call:
        return nullcontext()
    orders = {signature: _checked(order) for signature, order in (per_call or {}).items()}
    return _backends(None if names is None else _checked(names), orders)


def _checked(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError(f"sdpa_backends needs at least one backend name ({', '.join(SDPA_BACKENDS)}), "
                         "or None for torch's choice")
    for name in names:
        _backend(name)
    return names


@contextmanager
def _backends(names: tuple[str, ...] | None, per_call: dict[str, tuple[str, ...]]) -> Iterator[None]:
    # (kept for a checkpointed block's recompute, which runs inside backward, maybe after this context ended:
    # under torch's default order a block whose forward ran another kernel recomputes tensors of other shapes)
    with kept_for_recompute(_backends, lambda: _backends(names, per_call)), \
            (_priority(names) if names is not None else nullcontext()), \
            (_PerCallBackends(per_call) if per_call else nullcontext()):
        yield


@contextmanager
def _priority(names: tuple[str, ...]) -> Iterator[None]:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_backend(name) for name in names], set_priority=True):  # type: ignore[list-item]
        yield


class _PerCallBackends(BackwardKeepingMode):
    """Runs each ``F.scaled_dot_product_attention`` call whose :func:`call_signature` is listed under
    its own backend order; every other call as it would run."""

    functions = frozenset({F.scaled_dot_product_attention})

    def __init__(self, orders: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.orders = orders

    def handle(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, causal = _arguments(args, kwargs)
            order = self.orders.get(call_signature(q.shape, k.shape, v.shape, q.dtype, is_causal=causal,
                                                   mask=None if mask is None else mask.shape))
            if order is not None:
                with _priority(order):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)
