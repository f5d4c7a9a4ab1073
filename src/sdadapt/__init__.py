"""sdadapt: every way to adapt Stable-Diffusion-style models, on any UNet or text encoder.

Quick start::

    import sdadapt
    handle = sdadapt.inject(unet, sdadapt.targets.UNET_KOHYA, sdadapt.LoRAConfig(rank=8, alpha=4))
    ...train handle.parameters()...
    sdadapt.formats.save_kohya("my_lora.safetensors", {"unet": handle.state_dict()})
"""

from . import formats, loratools, merge, targets, training
from .adapters import (
    DoRAConfig,
    FullConfig,
    LoHaConfig,
    LoKrConfig,
    LoRAConfig,
    LoRAModule,
    lora_delta_weight,
    lora_forward,
)
from .apply import AppliedDelta, apply_lora
from .formats import WeightFileError, load_lora, save_lora
from .inject import AdapterHandle, adapter_names, inject, load_adapter
from .targets import NoTargetsError, by_name, by_regex, by_type, select
from .training import StepConfig, TrainState, train_step

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "targets",
    "formats",
    "merge",
    "loratools",
    "training",
    "train_step",
    "StepConfig",
    "TrainState",
    "LoRAConfig",
    "LoRAModule",
    "lora_delta_weight",
    "lora_forward",
    "LoHaConfig",
    "LoKrConfig",
    "DoRAConfig",
    "FullConfig",
    "inject",
    "load_adapter",
    "adapter_names",
    "AdapterHandle",
    "apply_lora",
    "AppliedDelta",
    "load_lora",
    "save_lora",
    "WeightFileError",
    "NoTargetsError",
    "by_name",
    "by_regex",
    "by_type",
    "select",
]
