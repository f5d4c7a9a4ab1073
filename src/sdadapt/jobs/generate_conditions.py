"""One text-encoder pass per distinct input over ``generate``'s images (``--count N``).

``generate`` samples image ``i`` with seed ``SEED + i`` from the same prompt and negative prompt (and the
same prompt-plan texts): each image used to encode them again. :func:`conditions_cached` remembers what
the system's ``condition`` returned for each input it was given during the block and hands the same
result back, so ``N`` images cost one encode per distinct text (per batch size and SDXL size
conditioning) and are bit for bit the images each would have been alone.

The key is the exact input: token-id / weight / ``time_ids`` tensors by dtype, shape, device and bytes,
texts by value (the toy system conditions on texts). An input it cannot key (any other object) is
passed through uncached. The cache lives only inside the block, on the system ``generate`` loaded
itself: the system's own ``condition`` is back when the block ends (also on an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["conditions_cached", "conditions_set_aside"]


class _Unkeyable(Exception):
    """An input the cache cannot key: the call goes through uncached."""


def _key(value: Any) -> Any:
    """A hashable stand-in for one ``condition`` argument (tensors by dtype, shape, device and bytes)."""
    if isinstance(value, torch.Tensor):
        raw = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), raw.numpy().tobytes())
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_key(v) for v in value))
    if isinstance(value, Mapping):
        return ("mapping", *sorted((str(k), _key(v)) for k, v in value.items()))
    raise _Unkeyable


def _copied(result: Any) -> Any:
    """A cached result handed out again: a dict (SDXL's conditioning) as a new dict of the same tensors,
    so a caller that sets an entry changes no other image's."""
    return dict(result) if isinstance(result, dict) else result


@contextmanager
def conditions_cached(system: Any) -> Iterator[dict[str, int]]:
    """A block in which ``system.condition`` runs once per distinct input.

    Args:
        system: a loaded system (its ``condition(ids_or_texts, ...)``: SD1/SD2 (B, L, D) states, SDXL
            the dict, the toy (B, L, D)). Without a ``condition`` method nothing changes.

    Yields:
        ``{"calls": n, "encoded": m}``: ``condition`` calls in the block and the ones that ran the encoder.
    """
    counts = {"calls": 0, "encoded": 0}
    original: Callable[..., Any] | None = getattr(system, "condition", None)
    if original is None or "condition" in getattr(system, "__dict__", {}):  # (no method, or already replaced: leave it)
        yield counts
        return
    cache: dict[Any, Any] = {}

    def condition(*args: Any, **kwargs: Any) -> Any:
        counts["calls"] += 1
        try:
            key = (_key(args), _key(kwargs))
        except _Unkeyable:
            counts["encoded"] += 1
            return original(*args, **kwargs)
        if key not in cache:
            counts["encoded"] += 1
            cache[key] = original(*args, **kwargs)
        return _copied(cache[key])

    system.condition = condition  # (an instance attribute over the class's method, removed below)
    try:
        yield counts
    finally:
        del system.condition


@contextmanager
def conditions_set_aside(system: Any) -> Iterator[None]:
    """A block inside a :func:`conditions_cached` one in which ``system.condition`` is the system's own again
    (every input encoded, nothing cached): for texts encoded with other text-encoder weights (the hires pass's
    LoRAs), whose results must neither come from the cache nor go into it. The cache is back when the block ends."""
    cached = system.__dict__.pop("condition", None) if hasattr(system, "__dict__") else None
    try:
        yield
    finally:
        if cached is not None:
            system.condition = cached
