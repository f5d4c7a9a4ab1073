"""Data-parallel training with FSDP2: shard a model block by block for :func:`~.step.train_step`.

``train_step`` is plain PyTorch, so DDP needs nothing from sdadapt (wrap the model in
``DistributedDataParallel`` and pass the wrapper). FSDP2 (``torch.distributed.fsdp.fully_shard``)
shards parameters, gradients and optimiser state over the ranks; it works per module, so the
usual recipe is "each transformer / ResNet block is one shard unit, then the root"::

    dist.init_process_group("nccl")                        # torchrun sets rank / world size
    lora = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16))
    fully_shard_blocks(unet, sdadapt.targets.by_regex(r"(down|up)_blocks\\.\\d+|mid_block"))
    params = list(lora.parameters())                       # AFTER sharding: DTensor parameters
    optimizer = torch.optim.AdamW(params, lr=1e-4)

Frozen base weights and trainable adapters may share a shard unit (FSDP2 keeps per-parameter
``requires_grad``); only the trainable ones get gradients and optimiser state. Gradients are
averaged over ranks in backward (reduce-scatter), so each rank passes its own slice of the global
batch and the result equals one process with the whole batch (tested on CPU with 2 gloo ranks).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InputError
from ..targets import Target, select_outermost

__all__ = ["fully_shard_blocks"]


def fully_shard_blocks(model: nn.Module, blocks: Target | str, **fsdp_options: Any) -> list[str]:
    """Apply FSDP2 ``fully_shard`` to every module ``blocks`` selects (outermost only), then to ``model``.

    Call it after injecting adapters (they are sharded with the layer they adapt) and before
    building the optimiser: sharding replaces every parameter by a ``DTensor`` parameter, so
    parameter lists taken earlier are stale — take ``handle.parameters()`` /
    ``model.parameters()`` again afterwards.

    Args:
        model: the model to shard in place (e.g. a diffusers UNet); the default process group
            must be initialised (``torch.distributed.init_process_group``).
        blocks: target predicate / regex of the shard units, e.g.
            ``by_regex(r"(down|up)_blocks\\.\\d+|mid_block")``.
        **fsdp_options: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``).

    Returns:
        The names of the sharded blocks, in module order (the root is sharded too, unnamed).

    Raises:
        InputError: no process group is initialised.
        NoTargetsError: ``blocks`` matched nothing.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise InputError("fully_shard_blocks needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group(...) first (torchrun sets the rank variables)")
    chosen = select_outermost(model, blocks)
    for _, module in chosen:
        fully_shard(module, **fsdp_options)
    fully_shard(model, **fsdp_options)
    return [name for name, _ in chosen]
