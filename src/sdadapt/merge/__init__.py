"""Checkpoint merging: operators, block weights, the streaming engine and recipes.

See docs/merge.md. The LoRA file tools (extract, resize, combine, bake into a checkpoint) are
:mod:`sdadapt.loratools` (docs/lora-tools.md).
"""

from . import meh_modes, operators, supermerger_modes  # operators registers the mode modules
from .blocks import (
    BLOCKS_SD,
    BLOCKS_SDXL,
    block_alpha_fn,
    diffusers_block,
    key_block,
    ldm_block,
    parse_block_weights,
)
from .adjust import adjust_factors, parse_adjust
from .elemental import ElementalRule, elemental_ratio, parse_elemental, parse_selection
from .engine import (
    MergedSource,
    MergeError,
    MergeReport,
    merge_file,
    merge_state_dicts,
    write_source,
)
from .operators import (
    OPERATORS,
    REQUIRED,
    OperatorOption,
    PrePass,
    add_difference,
    check_options,
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

__all__ = [
    # checkpoint merge operators
    "operators",
    "supermerger_modes",
    "meh_modes",
    "OPERATORS",
    "OperatorOption",
    "PrePass",
    "REQUIRED",
    "check_options",
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
    # supermerger's elemental merge
    "ElementalRule",
    "parse_elemental",
    "elemental_ratio",
    "parse_selection",
    # supermerger's Adjust
    "parse_adjust",
    "adjust_factors",
    # streaming engine, files, recipes
    "MergeStep",
    "KeyPolicy",
    "MergedSource",
    "MergeReport",
    "MergeError",
    "merge_file",
    "merge_state_dicts",
    "write_source",
    "load_recipe",
    "TensorSource",
    "open_source",
    "sha256_of",
    "write_streaming",
]
