"""Merging: checkpoint merge operators, block weights, the streaming engine and recipes; LoRA tools.

See docs/merge.md (checkpoint merges) and docs/lora-tools.md (LoRA extract/resize/combine/merge).
"""

from . import operators
from .blocks import (
    BLOCKS_SD,
    BLOCKS_SDXL,
    block_alpha_fn,
    diffusers_block,
    key_block,
    ldm_block,
    lora_block_weights,
    parse_block_weights,
)
from .engine import MergedSource, MergeError, MergeReport, merge_file, merge_state_dicts
from .operators import (
    OPERATORS,
    add_difference,
    dare,
    key_generator,
    model_stock,
    slerp,
    task_arithmetic,
    task_vector_merge,
    ties,
    train_difference,
    weighted_sum,
)
from .recipe import KeyPolicy, MergeStep, load_recipe
from .sources import TensorSource, open_source, sha256_of
from .writer import write_streaming
from .checkpoint_layers import LayerSlot, checkpoint_layers, detect_base_model, is_lora_target
from .lora_block_weights import BLOCK_IDS, block_slot, expand_block_weights
from .lora_combine import add_delta, combine_lora_states, concat_layers, layer_delta
from .lora_extract import ExtractedLayer, extract_layer, low_rank_factors, select_rank, truncated_svd
from .lora_files import combine_loras, extract_lora, merge_loras_into_checkpoint, resize_lora
from .lora_resize import factored_svd, resize_layer, resize_lora_state

__all__ = [
    # checkpoint merge operators
    "operators",
    "OPERATORS",
    "weighted_sum",
    "add_difference",
    "train_difference",
    "slerp",
    "task_arithmetic",
    "task_vector_merge",
    "ties",
    "dare",
    "model_stock",
    "key_generator",
    # block weights
    "BLOCKS_SD",
    "BLOCKS_SDXL",
    "parse_block_weights",
    "ldm_block",
    "diffusers_block",
    "key_block",
    "block_alpha_fn",
    "lora_block_weights",
    # streaming engine, files, recipes
    "MergeStep",
    "KeyPolicy",
    "MergedSource",
    "MergeReport",
    "MergeError",
    "merge_file",
    "merge_state_dicts",
    "load_recipe",
    "TensorSource",
    "open_source",
    "sha256_of",
    "write_streaming",
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
