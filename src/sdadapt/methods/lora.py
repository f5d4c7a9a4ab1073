"""LoRA-family adaptation of a system's UNet and text encoder (LoRA, LoCon; other families by config).

The adapters are injected with :func:`sdadapt.inject` (reversible; base keys unchanged) and saved
with :func:`sdadapt.save_lora` in kohya format (A1111, ComfyUI, kohya, diffusers load it).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..adapters import DoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig
from ..formats import save_lora
from ..inject import AdapterHandle, inject
from ..targets import TEXT_ENCODER, UNET_KOHYA, UNET_LOCON, Target

__all__ = ["AdapterAdaptation", "prepare_lora", "prepare_locon", "prepare_loha", "prepare_lokr", "prepare_dora"]


class AdapterAdaptation:
    """Adapters injected into ``system.unet`` (and ``system.text_encoder``); ``params`` trains them."""

    def __init__(self, system, *, unet_targets: Target, unet_config, text_config=None, name: str = "default") -> None:
        self.base_model = system.base_model  # file naming and metadata (System protocol)
        self.handles: dict[str, AdapterHandle] = {"unet": inject(system.unet, unet_targets, unet_config, name=name)}
        if text_config is not None:
            try:
                self.handles["text_encoder"] = inject(system.text_encoder, TEXT_ENCODER, text_config, name=name)
            except Exception:
                self.handles["unet"].remove()
                raise
        self.params: list[nn.Parameter] = [p for h in self.handles.values() for p in h.parameters()]

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        save_lora(path, {c: h.state_dict() for c, h in self.handles.items()}, format="kohya", base_model=self.base_model,
                  metadata=dict(metadata or {}))
        return Path(path)

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()


def prepare_lora(system, *, rank: int = 8, alpha: float | None = None, text_encoder: bool = True) -> AdapterAdaptation:
    """kohya's default LoRA: transformer-block Linears of the UNet (+ the text encoder's)."""
    config = LoRAConfig(rank=rank, alpha=alpha if alpha is not None else rank)
    return AdapterAdaptation(system, unet_targets=UNET_KOHYA, unet_config=config, text_config=config if text_encoder else None)


def prepare_locon(system, *, rank: int = 8, alpha: float | None = None, text_encoder: bool = True) -> AdapterAdaptation:
    """LoCon: LoRA on every Linear and Conv2d of the down/mid/up blocks (ResNets included)."""
    config = LoRAConfig(rank=rank, alpha=alpha if alpha is not None else rank, conv_rank=max(1, rank // 2), conv_alpha=max(1, rank // 2))
    text = LoRAConfig(rank=rank, alpha=alpha if alpha is not None else rank) if text_encoder else None
    return AdapterAdaptation(system, unet_targets=UNET_LOCON, unet_config=config, text_config=text)


def _kohya_set(system, config, text_encoder: bool) -> AdapterAdaptation:
    return AdapterAdaptation(system, unet_targets=UNET_KOHYA, unet_config=config, text_config=config if text_encoder else None)


def prepare_loha(system, *, rank: int = 4, text_encoder: bool = True) -> AdapterAdaptation:
    """LoHa (Hadamard product of two rank-r pairs; ΔW up to rank r²) on kohya's layer set (LyCORIS file)."""
    return _kohya_set(system, LoHaConfig(rank=rank, alpha=rank), text_encoder)


def prepare_lokr(system, *, rank: int = 4, text_encoder: bool = True) -> AdapterAdaptation:
    """LoKr (Kronecker product, most-square factor) on kohya's layer set (LyCORIS file)."""
    return _kohya_set(system, LoKrConfig(rank=rank, alpha=rank), text_encoder)


def prepare_dora(system, *, rank: int = 8, text_encoder: bool = True) -> AdapterAdaptation:
    """DoRA: LoRA r8 direction + a trained per-output-row magnitude (LyCORIS ``dora_scale`` file)."""
    return _kohya_set(system, DoRAConfig(inner=LoRAConfig(rank=rank, alpha=rank)), text_encoder)
