"""Token merging (ToMe for SD, Bolya & Hoffman 2023): A1111's "Token merging ratio" — a share of the self-attention
tokens merged into their most similar neighbours before the attention and copied back after it, for speed.

A1111 (``modules/sd_models.py`` ``apply_token_merging``) patches its model with ``tomesd.apply_patch(ratio=...,
use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)`` and the defaults ``max_downsample=1``,
``sx = sy = 2``: in every transformer block at the UNet's full latent resolution (SD1/SD2's first level; SDXL has no
attention there, so nothing merges) the block's input tokens (B, N, C) are split into ``dst`` — the top-left token
of each 2×2 window — and ``src``, the rest; each ``src`` token's most cosine-similar ``dst`` is found, the
``r = int(N·ratio)`` best-matched ``src`` tokens are averaged into their ``dst`` (:func:`bipartite_soft_matching_2d`),
the self-attention runs on the ``N − r`` tokens left, and its output is copied back to all N (each merged token
gets its ``dst``'s). Cross-attention and the MLP see all tokens.

:class:`TokenMerging` does that with hooks (a forward pre-hook on the UNet for the latent size, on each block for the
matching, on each block's ``attn1`` for the merge and a forward hook for the copy back): nothing is rebound or
re-classed (tomesd swaps the blocks' classes), the weights and ``state_dict`` keys stay, and :meth:`TokenMerging.remove`
takes it all off. Only tomesd's deterministic matching (``use_rand=False``, A1111's) is offered: its random one draws
from a fork of the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .module_hooks import ModuleHooks

__all__ = ["TOKEN_MERGING_FIELD", "TOKEN_MERGING_HR_FIELD", "TokenMerging", "bipartite_soft_matching_2d",
           "check_token_merging_ratio"]

#: A1111's infotext keys: the first pass's (img2img's) ratio, the hires pass's
TOKEN_MERGING_FIELD = "Token merging ratio"
TOKEN_MERGING_HR_FIELD = "Token merging ratio hr"

Merge = Callable[[Tensor], Tensor]


def check_token_merging_ratio(ratio: float) -> float:
    """``ratio`` as a float in [0, 0.75] (tomesd's most with 2×2 windows: 1 − 1/(sx·sy); A1111's slider: 0–0.9, the
    rest clamped to the src tokens there are).

    Raises:
        ValueError: a ratio outside [0, 1) or not finite, saying what it is.
    """
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"token merging ratio is the share of self-attention tokens merged, in [0, 1) (A1111's "
                         f"'Token merging ratio'; 0: off, 0.5 the usual), got {ratio}")
    return ratio


def bipartite_soft_matching_2d(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int) -> tuple[Merge, Merge]:
    """``(merge, unmerge)`` of tomesd's ``bipartite_soft_matching_random2d`` with ``no_rand=True`` for tokens
    ``metric`` (B, N, C) of an ``h``×``w`` grid (row-major, N = h·w): ``dst`` the top-left token of each ``sy``×``sx``
    window (of the windows that fit), ``src`` the rest; the ``r`` ``src`` tokens with the highest cosine similarity to
    a ``dst`` are merged into it. ``merge(x)`` (B, N, C') -> (B, N − r, C'): the unmerged ``src`` then the ``dst``,
    each ``dst`` the mean of itself and the ``src`` merged into it; ``unmerge(y)`` (B, N − r, C') -> (B, N, C'): each
    token its own row of ``y``, a merged one its ``dst``'s. ``r <= 0``, or a grid smaller than one window (no ``dst``),
    gives the identity twice; ``r`` is capped at the ``src`` count."""
    batch, n, _ = metric.shape
    hsy, wsx = h // sy, w // sx
    if r <= 0 or hsy * wsx == 0:  # (a grid smaller than one window has no dst to merge into: tomesd fails there)
        return (lambda x: x), (lambda x: x)
    device = metric.device
    with torch.no_grad():
        # dst marked -1 at the top-left of each window that fits, 0 elsewhere; argsort lists dst then src (tomesd's call)
        window = torch.zeros(hsy, wsx, sy * sx, device=device, dtype=torch.int64)
        window[..., 0] = -1
        marks = torch.zeros(h, w, device=device, dtype=torch.int64)
        marks[:hsy * sy, :wsx * sx] = window.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        order = marks.reshape(1, -1, 1).argsort(dim=1)  # (1, N, 1)
        num_dst = hsy * wsx
        a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]  # src, dst

        def split(x: Tensor) -> tuple[Tensor, Tensor]:
            c = x.shape[-1]
            return (torch.gather(x, 1, a_idx.expand(batch, n - num_dst, c)),
                    torch.gather(x, 1, b_idx.expand(batch, num_dst, c)))

        unit = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(unit)
        scores = a @ b.transpose(-1, -2)  # (B, src, dst) cosine similarity
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]  # kept src, merged src
        dst_idx = torch.gather(node_idx[..., None], -2, src_idx)

    def merge(x: Tensor) -> Tensor:
        src, dst = split(x)
        rows, kept, c = src.shape
        unm = torch.gather(src, -2, unm_idx.expand(rows, kept - r, c))
        merged = torch.gather(src, -2, src_idx.expand(rows, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(rows, r, c), merged, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: Tensor) -> Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = torch.gather(dst, -2, dst_idx.expand(batch, r, c))
        out = torch.zeros(batch, n, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, b_idx.expand(batch, num_dst, c), dst)
        kept_at = torch.gather(a_idx.expand(batch, a_idx.shape[1], 1), 1, unm_idx)
        merged_at = torch.gather(a_idx.expand(batch, a_idx.shape[1], 1), 1, src_idx)
        out.scatter_(-2, kept_at.expand(batch, unm_len, c), unm)
        out.scatter_(-2, merged_at.expand(batch, r, c), src)
        return out

    return merge, unmerge


def _is_transformer_block(module: nn.Module) -> bool:
    """A block tomesd patches: a class named ``BasicTransformerBlock`` in its MRO (diffusers' and LDM's), with an
    ``attn1``."""
    return any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__) and \
        isinstance(getattr(module, "attn1", None), nn.Module)


def _first(args: tuple, kwargs: dict, name: str) -> Tensor:
    return args[0] if args else kwargs[name]


class TokenMerging(ModuleHooks):
    """A1111's token merging on ``unet`` (module docstring) at ``ratio`` (:attr:`ratio` may change between runs;
    :meth:`at` for a block), ``max_downsample`` / ``sx`` / ``sy`` tomesd's (A1111 leaves them at 1, 2, 2). Hooks
    installed at once; :meth:`remove` (or leaving the ``with`` block) takes them off. ``blocks``: how many transformer
    blocks it hooked.

    Raises:
        ValueError: a ratio outside [0, 1), or a ``unet`` without SD's transformer blocks (naming what it is).
    """

    def __init__(self, unet: nn.Module, *, ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2) -> None:
        self.ratio = check_token_merging_ratio(ratio)
        self.max_downsample, self.sx, self.sy = int(max_downsample), int(sx), int(sy)
        blocks = [module for module in unet.modules() if _is_transformer_block(module)]
        if not blocks:
            raise ValueError(f"token merging merges the self-attention tokens of SD's transformer blocks "
                             f"(BasicTransformerBlock); {type(unet).__name__} has none")
        self.blocks = len(blocks)
        self._size: tuple[int, int] | None = None
        self._pending: dict[int, tuple[Merge, Merge]] = {}
        self._handles = [unet.register_forward_pre_hook(self._remember_size, with_kwargs=True)]
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._match, with_kwargs=True))
            attn = block.attn1
            self._handles.append(attn.register_forward_pre_hook(self._merge, with_kwargs=True))
            self._handles.append(attn.register_forward_hook(self._unmerge))

    def _remember_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = _first(args, kwargs, "sample")
        self._size = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _match(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first(args, kwargs, "hidden_states")  # (B, N, C): the block's input, tomesd's metric
        self._pending.pop(id(block.attn1), None)
        if self._size is None or not self.ratio:
            return
        height, width = self._size
        downsample = math.ceil(math.sqrt(height * width // x.shape[1]))  # (tomesd's compute_merge)
        if downsample > self.max_downsample:
            return
        w, h = math.ceil(width / downsample), math.ceil(height / downsample)
        self._pending[id(block.attn1)] = bipartite_soft_matching_2d(x, w, h, self.sx, self.sy,
                                                                   int(x.shape[1] * self.ratio))

    def _merge(self, attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pair = self._pending.get(id(attn))
        if pair is None:
            return None
        if args:
            return (pair[0](args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": pair[0](kwargs["hidden_states"])}

    def _unmerge(self, attn: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        pair = self._pending.pop(id(attn), None)
        return None if pair is None else pair[1](output)

    @contextmanager
    def at(self, ratio: float) -> Iterator[TokenMerging]:
        """This merging at ``ratio`` inside the block (A1111's hires pass at its "Token merging ratio hr"), the ratio
        before it after."""
        before, self.ratio = self.ratio, check_token_merging_ratio(ratio)
        try:
            yield self
        finally:
            self.ratio = before

    def remove(self) -> None:
        """Take every hook off (idempotent)."""
        super().remove()
        self._pending.clear()
