"""Gradient checkpointing for any model, chosen by target predicate, exactly reversible.

``enable_checkpointing(unet, by_regex(r"(down|up)_blocks\\.\\d+$"))`` makes each chosen module
recompute its activations in backward (``torch.utils.checkpoint``, non-reentrant) instead of
keeping them: less memory, about one extra forward of compute.

How: like ``torch.nn.utils.parametrize``, each chosen module's class is swapped for a subclass
whose ``__call__`` runs the original call under checkpoint. The module's own ``forward`` is not
touched, its ``state_dict()`` keys and ``isinstance`` checks are unchanged, and ``remove()``
restores the original class. Modules run without checkpointing in eval mode or with grad off.

Checkpointing only part of a UNet: ``enable_checkpointing(unet, UNET_BLOCKS, fraction=0.5)``
checkpoints the half of the blocks that keep the most activations — the highest-resolution ones,
transformers before resnets (:func:`blocks_by_activation_memory` gives the order) — so memory drops
most for the least recompute. Inside a CUDA-graph capture the recompute does not save and restore
the CUDA RNG state (PyTorch cannot read it while capturing): exact for UNets without dropout (the
SD/SDXL default); a block with active dropout then recomputes with fresh dropout masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch.utils.checkpoint
from torch import nn

from ..adapters.base import graph_capturing
from ..targets import Target, by_regex, select_outermost
from .engine_backward import recompute_under

__all__ = ["UNET_BLOCKS", "CheckpointHandle", "blocks_by_activation_memory", "enable_checkpointing"]

#: what whole-UNet training checkpoints (``FitConfig.gradient_checkpointing``): each resnet and each
#: transformer (``Transformer2DModel``/``SpatialTransformer``) of the down, mid and up blocks —
#: diffusers names (``down_blocks.0.resnets.1``, ``mid_block.attentions.0``; the toy UNet uses them
#: too) and LDM names (``input_blocks.1.0``, ``middle_block.1``, ``output_blocks.5.2``; ``input_blocks.0``
#: is ``conv_in`` and is left out), with or without a ``model.diffusion_model.`` prefix. The
#: activations kept for backward are then mostly the blocks' inputs; the stem, the time embedding
#: and the output head run as usual.
UNET_BLOCKS = by_regex(
    r"(^|\.)((down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+"
    r"|(input_blocks\.[1-9]\d*|middle_block|output_blocks\.\d+)\.\d+)$"
)
UNET_BLOCKS.description = "UNET_BLOCKS"

_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:

        def __call__(self, *args, **kwargs):  # noqa: N807
            if self.training and torch.is_grad_enabled():
                # the step's half-precision norms, attention-kernel order and fused LoRA layers re-entered for the
                # recompute (it runs inside backward, after the step's contexts ended); none active, or compiling (the
                # traced graph is what recomputes): torch's defaults
                recompute = None if torch.compiler.is_compiling() else recompute_under()
                context = {"context_fn": lambda: (nullcontext(), recompute)} if recompute is not None else {}
                return torch.utils.checkpoint.checkpoint(
                    super(sub, self).__call__, *args, use_reentrant=False, preserve_rng_state=not graph_capturing(),
                    **context, **kwargs
                )
            return super(sub, self).__call__(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_sdadapt_base_class": cls})
        _SUBCLASSES[cls] = sub
    return sub


def _outermost(model: nn.Module, targets: Target | str | Iterable[str]) -> dict[str, nn.Module]:
    return dict(select_outermost(model, targets))


def _base_class(module: nn.Module) -> type:
    """The module's own class (not the checkpointing subclass swapped in)."""
    return getattr(type(module), "_sdadapt_base_class", type(module))


def blocks_by_activation_memory(model: nn.Module, targets: Target | str | Iterable[str] = UNET_BLOCKS) -> list[str]:
    """The outermost modules ``targets`` selects, those keeping the most activations first.

    Order, for a UNet: resolution level first — the level of a block is the number of
    downsamplers minus the number of upsamplers registered before it (modules whose class name
    contains ``Downsample``/``Upsample``: diffusers' ``Downsample2D``, LDM's ``Downsample``), the mid
    block (``mid_block``/``middle_block``) taking the deepest level; at one level transformers
    (class name containing ``Transformer``: they keep attention and the 4x-wide feed-forward) before
    resnets; then forward (registration) order. Each level down halves the activations of a block
    (a quarter of the pixels, twice the channels). A model without samplers is one level.

    Returns:
        module names, e.g. ``["up_blocks.3.attentions.0", ..., "mid_block.resnets.1"]`` for SD1.5.
    """
    return _ranked(model, _outermost(model, targets))


def _ranked(model: nn.Module, chosen: dict[str, nn.Module]) -> list[str]:
    """The names of ``chosen`` (``model``'s modules) in :func:`blocks_by_activation_memory`'s order."""
    levels: dict[str, int] = {}
    level = deepest = 0
    for name, module in model.named_modules():
        if name in chosen:
            levels[name] = level
        kind = _base_class(module).__name__
        if "Downsample" in kind:
            level += 1
            deepest = max(deepest, level)
        elif "Upsample" in kind:
            level -= 1
    order = {name: i for i, name in enumerate(chosen)}

    def key(name: str) -> tuple[int, int, int]:
        mid = any(part in ("mid_block", "middle_block") for part in name.split("."))
        kind = _base_class(chosen[name]).__name__
        return (deepest if mid else levels[name], 0 if "Transformer" in kind else 1, order[name])

    return sorted(chosen, key=key)


class CheckpointHandle:
    """The modules :func:`enable_checkpointing` changed; ``remove()`` restores their classes."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def remove(self) -> None:
        for module in self.modules.values():
            base = getattr(type(module), "_sdadapt_base_class", None)
            if base is not None:
                module.__class__ = base
        self.modules = {}


def enable_checkpointing(model: nn.Module, targets: Target | str | Iterable[str], *, fraction: float = 1.0) -> CheckpointHandle:
    """Checkpoint the modules ``targets`` selects (outermost only: nested picks are skipped).

    Args:
        fraction: in ``(0, 1]``: checkpoint only ``ceil(fraction · n)`` of the ``n`` selected
            modules, those keeping the most activations (:func:`blocks_by_activation_memory`:
            highest resolution first, transformers before resnets). ``1.0``: all of them.

    Raises:
        NoTargetsError: the target matched nothing.
        ValueError: ``fraction`` outside ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1] (the share of the selected blocks to checkpoint), got {fraction!r}")
    picked = _outermost(model, targets)  # (raises NoTargetsError when nothing matches)
    if fraction < 1.0:
        ranked = _ranked(model, picked)
        keep = set(ranked[: max(1, math.ceil(fraction * len(ranked) - 1e-9))])
        picked = {name: module for name, module in picked.items() if name in keep}
    chosen: dict[str, nn.Module] = {}
    for name, module in picked.items():
        if getattr(type(module), "_sdadapt_base_class", None) is None:
            module.__class__ = _checkpointed_class(type(module))
            chosen[name] = module
    return CheckpointHandle(chosen)
