"""kohya's ``--block_lr`` for a full SDXL fine-tune: the UNet's learning rate per block.

kohya ``sdxl_train.py`` (``get_block_params_to_optimize``) takes 23 comma-separated learning rates
and puts each UNet parameter, by its LDM (``sgm``) name, in the group of its block:

========  ==================================  =====================
block     parameters                          index
========  ==================================  =====================
0         ``time_embed.*``, ``label_emb.*``   0
1-9       ``input_blocks.N.*``                1 + N (``conv_in`` is ``input_blocks.0``: block 1)
10-12     ``middle_block.N.*``                10 + N
13-21     ``output_blocks.N.*``               13 + N
22        ``out.*``                           22
========  ==================================  =====================

A block of learning rate 0 is left out of the optimiser (its weights do not change); the text
encoders keep ``--learning_rate`` (``learning_rate_te1/te2``). Only ``sdxl_train.py`` has the
option, so it is refused for SD1/SD2.

The rates are absolute; :func:`~sdadapt.methods.fit.fit` multiplies its learning rate by each
parameter's ``lr_scales`` factor, so :func:`block_lr_scales` divides by the run's learning rate.
Diffusers UNets are read through :func:`sdadapt.formats.unet_names.diffusers_to_ldm_unet`; the block
of an LDM path is :func:`sdadapt.methods.lora_blocks.sdxl_block_index` (the block-wise LoRA options' map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..errors import InputError
from ..formats.unet_names import (
    attention_up_blocks,
    diffusers_to_ldm_unet,
    is_ldm_unet_path,
)
from .lora_blocks import block_count, sdxl_block_index

__all__ = ["SDXL_BLOCK_LR_COUNT", "parse_block_lr", "unet_parameter_blocks", "block_lr_scales"]

#: kohya's ``UNET_NUM_BLOCKS_FOR_BLOCK_LR`` (the block-wise LoRA options' SDXL count)
SDXL_BLOCK_LR_COUNT = block_count(sdxl=True)


def parse_block_lr(value: str | Sequence[float]) -> list[float]:
    """``"1e-5,2e-5,..."`` (or a sequence) -> the 23 learning rates.

    Raises:
        InputError: not 23 values, a value that is not a number, negative or not finite.
    """
    if isinstance(value, str):
        try:
            rates = [float(v) for v in value.split(",")]
        except ValueError:
            raise InputError(f"--block-lr {value!r}: give {SDXL_BLOCK_LR_COUNT} comma-separated learning rates") from None
    else:
        rates = [float(v) for v in value]
    if len(rates) != SDXL_BLOCK_LR_COUNT:
        raise InputError(f"--block-lr has {len(rates)} values; kohya's block_lr takes {SDXL_BLOCK_LR_COUNT}: time/label "
                         "embeddings, 9 input blocks, 3 middle blocks, 9 output blocks, out")
    bad = [r for r in rates if not (r >= 0 and math.isfinite(r))]
    if bad:
        raise InputError(f"--block-lr {bad[0]}: learning rates must be finite and >= 0 (0 freezes the block)")
    if not any(rates):
        raise InputError("--block-lr: every block's learning rate is 0, so nothing of the UNet would train")
    return rates


def unet_parameter_blocks(unet: nn.Module) -> list[int]:
    """kohya's block index of each of ``unet.named_parameters()`` (a diffusers or an LDM-named SDXL UNet).

    Raises:
        InputError: a parameter in none of the blocks (the UNet is not SDXL-shaped).
    """
    named = [name for name, _ in unet.named_parameters()]
    ldm_names: list[str | None] = named  # type: ignore[assignment]
    if not all(is_ldm_unet_path(name) for name in named):
        modules = [name.rpartition(".")[0] for name in named]
        up = attention_up_blocks(modules)
        layers = int(getattr(getattr(unet, "config", None), "layers_per_block", 2))
        ldm_names = [diffusers_to_ldm_unet(module, layers_per_block=layers, up_blocks_with_attention=up)
                     for module in modules]
    blocks = []
    for name, ldm in zip(named, ldm_names):
        block = -1 if ldm is None else sdxl_block_index(ldm)
        if block < 0:
            raise InputError(f"UNet parameter {name!r} is in none of kohya's SDXL blocks, so --block-lr cannot place it")
        blocks.append(block)
    if max(blocks) >= SDXL_BLOCK_LR_COUNT:
        raise InputError(f"the UNet has blocks beyond kohya's {SDXL_BLOCK_LR_COUNT} (block {max(blocks)}): --block-lr is for SDXL's")
    return blocks


def block_lr_scales(blocks: Sequence[int], block_lr: Sequence[float], *, learning_rate: float) -> list[float]:
    """Each parameter's factor of ``learning_rate``: ``block_lr[block] / learning_rate``.

    Args:
        blocks: kohya's block index per parameter (:func:`unet_parameter_blocks`).
        block_lr: the 23 absolute learning rates.
        learning_rate: the run's learning rate (``FitConfig.learning_rate``), > 0.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0 to express --block-lr as its factors, got {learning_rate}")
    return [float(block_lr[b]) / learning_rate for b in blocks]
