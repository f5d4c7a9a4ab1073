"""Adapter families: pure delta math plus a thin ``nn.Module`` each."""

from .base import AdapterModule, LayerGeometry, geometry_of
from .dora import DoRAConfig, DoRAModule, dora_weight, weight_norm
from .full import FullConfig, FullModule
from .glora import GLoRAConfig, GLoRAModule, glora_delta_weight
from .ia3 import IA3Config, IA3Module, ia3_delta_weight
from .loha import LoHaConfig, LoHaModule, loha_delta_weight
from .lokr import LoKrConfig, LoKrModule, factorization, lokr_delta_weight
from .lora import LoRAConfig, LoRAModule, lora_delta_weight, lora_forward, lora_scale, pissa_factors
from .fused_lora import lora_linear
from .norm import NormConfig, NormModule, norm_delta_output
from .oft import OFTConfig, OFTModule, oft_delta_weight, oft_merged_weight
from .registry import FAMILIES, AdapterFamily, adapter_from_file_tensors, build_adapter, register_family
from .shared_input import SharedInputBatching, SharedInputGroup, batch_shared_input_adapters
from .tucker import rebuild_tucker

__all__ = [
    "AdapterModule",
    "LayerGeometry",
    "geometry_of",
    "LoRAConfig",
    "LoRAModule",
    "lora_delta_weight",
    "lora_forward",
    "lora_scale",
    "pissa_factors",
    "lora_linear",
    "LoHaConfig",
    "LoHaModule",
    "loha_delta_weight",
    "LoKrConfig",
    "LoKrModule",
    "lokr_delta_weight",
    "factorization",
    "DoRAConfig",
    "DoRAModule",
    "dora_weight",
    "weight_norm",
    "FullConfig",
    "FullModule",
    "GLoRAConfig",
    "GLoRAModule",
    "glora_delta_weight",
    "IA3Config",
    "IA3Module",
    "ia3_delta_weight",
    "NormConfig",
    "NormModule",
    "norm_delta_output",
    "OFTConfig",
    "OFTModule",
    "oft_delta_weight",
    "oft_merged_weight",
    "rebuild_tucker",
    "FAMILIES",
    "AdapterFamily",
    "register_family",
    "build_adapter",
    "adapter_from_file_tensors",
    "batch_shared_input_adapters",
    "SharedInputBatching",
    "SharedInputGroup",
]
