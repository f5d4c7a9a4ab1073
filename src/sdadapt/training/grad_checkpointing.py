"""Gradient checkpointing for any model, chosen by target predicate, exactly reversible.

``enable_checkpointing(unet, by_regex(r"(down|up)_blocks\\.\\d+$"))`` makes each chosen module
recompute its activations in backward (``torch.utils.checkpoint``, non-reentrant) instead of
keeping them: less memory, about one extra forward of compute.

How: like ``torch.nn.utils.parametrize``, each chosen module's class is swapped for a subclass
whose ``__call__`` runs the original call under checkpoint. The module's own ``forward`` is not
touched, its ``state_dict()`` keys and ``isinstance`` checks are unchanged, and ``remove()``
restores the original class. Modules run without checkpointing in eval mode or with grad off.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.utils.checkpoint
from torch import nn

from ..targets import Target, by_regex, select

__all__ = ["UNET_BLOCKS", "CheckpointHandle", "enable_checkpointing"]

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
                return torch.utils.checkpoint.checkpoint(
                    super(sub, self).__call__, *args, use_reentrant=False, **kwargs
                )
            return super(sub, self).__call__(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_sdadapt_base_class": cls})
        _SUBCLASSES[cls] = sub
    return sub


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


def enable_checkpointing(model: nn.Module, targets: Target | str | Iterable[str]) -> CheckpointHandle:
    """Checkpoint every module ``targets`` selects (outermost only: nested picks are skipped).

    Raises:
        NoTargetsError: the target matched nothing.
    """
    chosen: dict[str, nn.Module] = {}
    for name, module in select(model, targets):
        if any(name.startswith(outer + ".") for outer in chosen):
            continue  # already inside a checkpointed module
        if getattr(type(module), "_sdadapt_base_class", None) is None:
            module.__class__ = _checkpointed_class(type(module))
            chosen[name] = module
    return CheckpointHandle(chosen)
