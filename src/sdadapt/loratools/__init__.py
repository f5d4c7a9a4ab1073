"""LoRA file tools: extract a LoRA from two checkpoints, resize, combine, bake into a checkpoint.

| module | what it owns |
|---|---|
| :mod:`.extract` | ``extract-lora``: truncated SVD, rank selection (fixed / kohya's dynamic rules), kohya's clamp |
| :mod:`.resize` | ``resize-lora``: re-factoring a LoRA to a new rank from its thin factors |
| :mod:`.combine` | ``combine-loras``: exact (concatenated) and SVD-compressed combinations of LoRAs |
| :mod:`.block_weights` | LoRA Block Weight vectors (12/17/20/26 values) |
| :mod:`.checkpoint_layers` | where each LoRA layer lives in a full checkpoint (LDM / diffusers keys) |
| :mod:`.bake` | ``merge-lora``: bake LoRA files into a checkpoint |
| :mod:`.output` | what the file jobs share: output/input checks, reports, the base-model guess |

Every family's delta comes from :mod:`sdadapt.adapters` (the registry): these tools hold no
family math of their own.
"""

from .bake import BakedCheckpoint, merge_loras_into_checkpoint
from .block_weights import (
    BLOCK_IDS,
    block_slot,
    expand_block_weights,
    lora_block_weights,
)
from .checkpoint_layers import (
    LayerSlot,
    checkpoint_layers,
    detect_base_model,
    is_lora_target,
)
from .combine import (
    add_delta,
    combine_lora_states,
    combine_loras,
    concat_layers,
    layer_delta,
)
from .extract import (
    ExtractedLayer,
    extract_layer,
    extract_lora,
    extract_lora_state,
    low_rank_factors,
    select_rank,
    truncated_svd,
)
from .output import BakeReport, LayerReport, LoRAJobReport, check_output
from .resize import factored_svd, resize_layer, resize_lora, resize_lora_state

__all__ = [
    "extract_layer",
    "ExtractedLayer",
    "low_rank_factors",
    "select_rank",
    "truncated_svd",
    "resize_layer",
    "resize_lora_state",
    "factored_svd",
    "concat_layers",
    "combine_lora_states",
    "layer_delta",
    "add_delta",
    "LayerSlot",
    "checkpoint_layers",
    "detect_base_model",
    "is_lora_target",
    "BLOCK_IDS",
    "block_slot",
    "expand_block_weights",
    "lora_block_weights",
    "extract_lora",
    "extract_lora_state",
    "resize_lora",
    "combine_loras",
    "merge_loras_into_checkpoint",
    "BakedCheckpoint",
    "LayerReport",
    "LoRAJobReport",
    "BakeReport",
    "check_output",
]
