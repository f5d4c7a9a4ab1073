"""Adapter families: pure delta math plus a thin ``nn.Module`` each."""

from .base import AdapterModule, LayerGeometry, geometry_of
from .lora import LoRAConfig, LoRAModule, lora_delta_weight, lora_forward, lora_scale, pissa_factors

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
]
