"""Cached text conditioning (kohya's ``--cache_text_encoder_outputs``).

When nothing in the text path trains and a caption reads the same at every use, the text
encoder's output for it is the same at every step: it is computed once before training
(:func:`cache_text_conditions`) and each step takes its batch's rows from the cache instead of
running the text encoder (:meth:`TextConditionCache.lookup`). The rows are exactly what
``system.condition(ids)`` gives the step (same autocast, same attention kernels), so a cached run
trains the same weights as an uncached one (bit for bit where the step conditions as many rows as
a cache chunk holds: :func:`cache_text_conditions`).

**What is cached.** One row per distinct caption the data can draw: each image's caption as one
use writes it (prefix, suffix, separators), plus ``""`` when a whole-caption dropout
(``--caption-dropout-rate``, ``--caption-dropout-every-n-epochs``) is on — the caption is then still
drawn at each use with the same random numbers, only its encoding is looked up
(:func:`caption_variants`; a caption the cache lacks is a ``KeyError``, never a silent
difference). Captions that change in other ways at each use (shuffled or dropped tags, the token
warm-up, wildcards, templates drawn per use) cannot be cached: :func:`caption_variants` refuses
them, as kohya refuses ``shuffle_caption`` / ``caption_tag_dropout_rate`` / ``token_warmup_step``.

**Size conditioning (SDXL).** A size-conditioned system's ``condition({"ids", "time_ids"})`` returns
a dict whose ``"time_ids"`` entry is the given ``time_ids`` in float32 (exact sizes; bfloat16 would round
them): the cache
keeps the other entries (``context`` (L, 2048), ``text_embeds`` (1280,)) and each lookup puts the
batch's own ``time_ids`` (each image's size, crop and flip) back in, as kohya keeps the pooled output
and builds the size embedding per batch.

**Memory.** The rows live on the host (as the cached latents) and each batch's rows are copied to
the device without making the host wait (:func:`~sdadapt.training.host_syncs.copy_to_device`).
Per caption in float32: SD1/SD2 77 x 768 x 4 B = 231 KiB (1024 wide for SD2: 308 KiB), SDXL
77 x 2048 x 4 + 1280 x 4 B = 621 KiB; ``--max-token-length 225`` makes L = 227 (about three times).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .host_syncs import copy_to_device

if TYPE_CHECKING:
    from .data import CaptionOptions

__all__ = ["TextConditionCache", "cache_text_conditions", "caption_variants", "conditioning_depends_on"]


class _NoDropout(random.Random):
    """A random source whose every ``random()`` is 1.0: no caption or tag dropout fires."""

    def random(self) -> float:
        return 1.0


def caption_variants(caption: str, options: CaptionOptions) -> tuple[str, ...]:
    """The captions a record with ``caption`` can train on under ``options``
    (:class:`~sdadapt.training.data.CaptionOptions`): the caption as one use writes it (prefix,
    suffix and separators applied), and ``""`` when a whole-caption dropout is on
    (``dropout``, ``dropout_every_n_epochs``).

    Raises:
        ValueError: the caption changes at each use in a way a cache cannot hold (shuffled tags, tag
            dropout, templates, wildcards, token warm-up), naming the option to leave out.
    """
    changing = [what for what, on in (
        ("--shuffle-caption (kohya's shuffle_caption)", options.shuffle),
        ("--caption-tag-dropout-rate (kohya's caption_tag_dropout_rate)", options.tag_dropout > 0),
        ("--token-warmup-step (kohya's token_warmup_step)", options.token_warmup_steps > 0),
        ("wildcards (kohya's enable_wildcard)", options.wildcards),
        ("caption templates drawn at each use (a trigger-word method's --templates)", bool(options.templates)),
    ) if on]
    if changing:
        raise ValueError("cache_text_encoder_outputs (--cache-text-encoder-outputs) encodes each caption once, but with "
                         + " and ".join(changing) + " the caption changes at each use; leave them out or do not cache")
    kept = options.apply(caption, _NoDropout())
    dropped = options.dropout > 0 or options.dropout_every_n_epochs > 0
    return tuple(dict.fromkeys((kept, "") if dropped else (kept,)))


@dataclass
class TextConditionCache:
    """The conditioning of every caption a run can draw.

    Attributes:
        rows: caption -> its row in ``values``.
        values: what ``condition`` gives, one row per caption: a tensor (U, ...) or a dict of them
            (``time_ids`` left out), on the host (or where :func:`cache_text_conditions` put it).
        time_ids_dtype: for a size-conditioned system, the dtype ``condition`` gives ``time_ids``
            (the dtype of its other tensors); ``None`` otherwise.
    """

    rows: dict[str, int]
    values: Any
    time_ids_dtype: torch.dtype | None = None

    def nbytes(self) -> int:
        """Bytes the cached rows take."""
        return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(self.values))

    def row_index(self, texts: Sequence[str]) -> Tensor:
        """(B,) int64 rows of ``texts`` (host).

        Raises:
            KeyError: a caption that was not cached (names it).
        """
        try:
            return torch.tensor([self.rows[text] for text in texts], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"caption {exc.args[0]!r} is not in the text-encoder cache (its captions must be the "
                           "dataset's, fixed before training)") from None

    def lookup(self, texts: Sequence[str], device: torch.device | str, *, time_ids: Tensor | None = None) -> Any:
        """The conditioning of ``texts`` on ``device``: ``condition(tokenize(texts))`` from the cache.

        Args:
            texts: B captions, each one of :attr:`rows`.
            time_ids: (B, 6) a size-conditioned system's per-image size conditioning (on ``device``):
                put back as ``"time_ids"`` in :attr:`time_ids_dtype`.

        Returns:
            a tensor (B, ...) or a dict of them, as ``condition`` gives.
        """
        index = self.row_index(texts)
        out = pytree.tree_map(lambda values: self._rows(values, index, torch.device(device)), self.values)
        if self.time_ids_dtype is not None:
            if time_ids is None:
                raise ValueError("this cache is of a size-conditioned system: pass the batch's time_ids (B, 6)")
            out = {**out, "time_ids": time_ids.to(self.time_ids_dtype)}
        return out

    @staticmethod
    def _rows(values: Tensor, index: Tensor, device: torch.device) -> Tensor:
        if values.device.type == "cpu":  # gathered on the host, one copy to the device that does not wait
            return copy_to_device(values[index], device)
        return values[copy_to_device(index, values.device)].to(device)


def _size_conditioned(system: Any) -> bool:
    return bool(getattr(system, "size_conditioning", False))


def conditioning_depends_on(condition: Callable[[Any], Any], ids: Any, params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether ``condition(ids)`` has a gradient path to any of ``params`` (one forward and, when its
    output needs a gradient, one backward of ``ids``)."""
    wanted = [p for p in params if p.requires_grad]
    if not wanted:
        return False
    with torch.enable_grad():
        leaves = [t for t in pytree.tree_leaves(condition(ids)) if isinstance(t, Tensor) and t.requires_grad]
        if not leaves:
            return False
        total = sum(t.float().sum() for t in leaves)
        grads = torch.autograd.grad(total, wanted, allow_unused=True)
    return any(g is not None for g in grads)


def cache_text_conditions(system: Any, captions: Iterable[str], *, batch: int = 8,
                          mixed_precision: str | None = None, sdpa_backends: Sequence[str] | None = None,
                          store: torch.device | str = "cpu", per_image_sizes: bool | None = None) -> TextConditionCache:
    """Encode every distinct caption once: ``system.condition(system.tokenize(...))`` ``batch`` at a
    time, under the autocast and attention kernels the training step runs the model under.

    Each chunk has ``batch`` rows (the last one filled up with its last caption, those rows
    dropped): a small matrix product's kernel (and so the last bits of a row) can depend on the
    number of rows — on a CPU, SDXL's pooled projection ``(B, 1280) @ (1280, 1280)`` gives other bits
    for B < 4 than for B >= 4 — so with ``batch`` = the training batch size the rows are bit for bit
    those of a full training batch. A smaller (last) batch of a bucket may differ from its cached
    rows in the last bits of such small products, as two uncached batches of different sizes
    differ from each other.

    Args:
        system: a :class:`~sdadapt.methods.system.System`; a size-conditioned one (SDXL) is called
            with ``{"ids", "time_ids"}`` and must return a dict holding ``"time_ids"``.
        captions: the captions (repeats are encoded once, in first-seen order).
        mixed_precision: ``"bf16"`` / ``"fp16"``: encode under that autocast (as the step's
            forward runs); ``None``/``"no"``: as is.
        sdpa_backends: the step's attention-kernel order (:func:`~sdadapt.training.attention.sdpa_backends`).
        store: where the rows are kept (default the host).
        per_image_sizes: a size-conditioned system's ``time_ids`` come with each batch
            (:meth:`TextConditionCache.lookup`'s ``time_ids``); ``False``: cache ``condition(ids)``
            whole, with the system's default size conditioning. Default: ``system.size_conditioning``.

    Returns:
        the cache; its values (U, L, D) per tensor of the conditioning.
    """
    from .attention import sdpa_backends as attention_kernels

    texts = list(dict.fromkeys(captions))
    if not texts:
        raise ValueError("no captions to cache")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = system.alphas_cumprod.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "")
    sized = _size_conditioned(system) if per_image_sizes is None else per_image_sizes and _size_conditioned(system)
    chunks: list[Any] = []
    time_ids_dtype = None
    for start in range(0, len(texts), batch):
        part = texts[start: start + batch]
        rows = len(part)
        part += part[-1:] * (batch - rows)  # every chunk has the training batch's row count (see above)
        ids = system.tokenize(part)
        if sized:
            ids = {"ids": ids, "time_ids": torch.zeros(len(part), 6, device=device)}
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.no_grad(), autocast, attention_kernels(sdpa_backends):
            out = system.condition(ids)
        if sized:
            if not isinstance(out, dict) or "time_ids" not in out:
                raise TypeError(f"{type(system).__name__} has size_conditioning but its condition() returns no dict with "
                                "'time_ids': its text outputs cannot be cached apart from the size conditioning")
            time_ids_dtype = out["time_ids"].dtype
            out = {k: v for k, v in out.items() if k != "time_ids"}
        chunks.append(pytree.tree_map(lambda t, rows=rows: t[:rows].detach().to(store), out))
    values = pytree.tree_map(lambda *parts: torch.cat(parts), *chunks) if len(chunks) > 1 else chunks[0]
    return TextConditionCache({text: i for i, text in enumerate(texts)}, values, time_ids_dtype)
