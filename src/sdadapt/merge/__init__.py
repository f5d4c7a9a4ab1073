"""Merging: LoRA tools (extract, resize, combine, merge into a checkpoint) and their file jobs.

(Created by the LoRA-tools helper with only its own names; the merge engine adds its operators,
block weights, streaming engine and recipes here.)
"""

from .checkpoint_layers import LayerSlot, checkpoint_layers, detect_base_model, is_lora_target
from .lora_block_weights import BLOCK_IDS, block_slot, expand_block_weights
from .lora_combine import add_delta, combine_lora_states, concat_layers, layer_delta
from .lora_extract import ExtractedLayer, extract_layer, low_rank_factors, select_rank, truncated_svd
from .lora_files import combine_loras, extract_lora, merge_loras_into_checkpoint, resize_lora
from .lora_resize import factored_svd, resize_layer, resize_lora_state

__all__ = [
    # LoRA math
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
    # checkpoints and block weights
    "LayerSlot",
    "checkpoint_layers",
    "detect_base_model",
    "is_lora_target",
    "BLOCK_IDS",
    "block_slot",
    "expand_block_weights",
    # file jobs
    "extract_lora",
    "resize_lora",
    "combine_loras",
    "merge_loras_into_checkpoint",
]
