"""Parameter groups that a backward pass finishes one after another, for an optimiser fused into
backward (:func:`~sdadapt.training.optim.fuse_optimizer_into_backward`'s ``groups``).

A fused group is stepped once all its gradients of the pass have arrived, so the gradients alive
at once are those of the groups still open. Backward walks a network block by block, so one group
per block (a UNet resnet or transformer, a text-encoder layer) closes each group soon after it
opens: about one block's gradients live at a time, with one multi-tensor optimiser step per block
instead of one single-tensor step per parameter (~50 steps instead of ~700 for an SD1.5 UNet).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..targets import NoTargetsError, Target, by_regex, select_outermost
from .grad_checkpointing import UNET_BLOCKS

__all__ = ["TEXT_ENCODER_LAYERS", "TRAINING_BLOCKS", "parameter_groups_by_module"]

#: the transformer layers of a CLIP text encoder (``text_model.encoder.layers.3`` in transformers
#: 4.x, ``encoder.layers.3`` in 5.x; OpenCLIP's ``transformer.resblocks.3`` too)
TEXT_ENCODER_LAYERS = by_regex(r"(^|\.)(encoder\.layers|transformer\.resblocks)\.\d+$")
TEXT_ENCODER_LAYERS.description = "TEXT_ENCODER_LAYERS"

#: the blocks a whole-model fine-tune groups by: the UNet's resnets and transformers
#: (:data:`~sdadapt.training.grad_checkpointing.UNET_BLOCKS`, diffusers and LDM names) and the
#: text encoders' layers (:data:`TEXT_ENCODER_LAYERS`)
TRAINING_BLOCKS = UNET_BLOCKS | TEXT_ENCODER_LAYERS
TRAINING_BLOCKS.description = "TRAINING_BLOCKS"


def parameter_groups_by_module(
    model: nn.Module,
    *,
    blocks: Target | str | Iterable[str] = TRAINING_BLOCKS,
    params: Iterable[nn.Parameter] | None = None,
) -> list[list[nn.Parameter]]:
    """Partition ``model``'s parameters into one group per block, for a fused backward.

    Each outermost module that ``blocks`` selects gives one group (all the parameters inside it);
    every other parameter goes to the group of the module that holds it directly (``conv_in``,
    ``time_embedding.linear_1``, a downsampler's conv, a final norm…), so no group spans the whole
    backward. Groups and their parameters come in registration order; a parameter shared by two
    modules counts once, where it is first registered.

    Args:
        model: any module (a UNet, a text encoder, a user's network).
        blocks: the block modules — a :class:`~sdadapt.targets.Target`, a preset name or globs
            (default :data:`TRAINING_BLOCKS`). Selecting nothing is allowed: every parameter is then
            grouped by the module holding it.
        params: keep only these parameters (default: those of ``model`` that require grad);
            parameters of ``params`` outside ``model`` are left out.

    Returns:
        a list of non-empty parameter lists, each parameter in exactly one.

    Example:
        >>> groups = parameter_groups_by_module(unet)  # SD1.5: 38 blocks + 11 other modules = 49 groups
        >>> fused = fuse_optimizer_into_backward(unet.parameters(),
        ...                                      lambda ps: AdamW(ps, lr=1e-5, state_dtype="int8", foreach=True),
        ...                                      groups=groups)
    """
    wanted = None if params is None else {id(p) for p in params}
    try:
        outermost = {name for name, _ in select_outermost(model, blocks)}
    except NoTargetsError:
        outermost = set()
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if (not p.requires_grad) if wanted is None else id(p) not in wanted:
            continue
        owner = name.rpartition(".")[0]
        parts = owner.split(".")
        key = next((block for block in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if block in outermost), owner)
        groups.setdefault(key, []).append(p)
    return list(groups.values())
