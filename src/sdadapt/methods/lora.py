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
from ..targets import TEXT_ENCODER, UNET_ATTENTION, UNET_KOHYA, UNET_LOCON, Target

__all__ = ["UNET_PRESETS", "AdapterAdaptation", "prepare_lora", "prepare_locon", "prepare_loha", "prepare_lokr", "prepare_dora"]


#: ``--network-targets`` presets: UNet layers the LoRA family adapts
UNET_PRESETS: dict[str, Target] = {"kohya": UNET_KOHYA, "attention": UNET_ATTENTION, "locon": UNET_LOCON}
#: text encoders a system may have (SDXL: two); the file names them lora_te / lora_te1, lora_te2
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class AdapterAdaptation:
    """Adapters injected into ``system.unet`` (and its text encoder(s)); ``params`` trains them."""

    def __init__(self, system, *, unet_targets: Target, unet_config, text_config=None, name: str = "default") -> None:
        self.base_model = system.base_model  # file naming and metadata (System protocol)
        self.handles: dict[str, AdapterHandle] = {"unet": inject(system.unet, unet_targets, unet_config, name=name)}
        if text_config is not None:
            try:
                for component in _TEXT_ENCODERS:
                    module = getattr(system, component, None)
                    if isinstance(module, nn.Module):
                        self.handles[component] = inject(module, TEXT_ENCODER, text_config, name=name)
            except Exception:
                self.remove()
                raise
        self.params: list[nn.Parameter] = [p for h in self.handles.values() for p in h.parameters()]

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        save_lora(path, {c: h.state_dict() for c, h in self.handles.items()}, format="kohya", base_model=self.base_model,
                  metadata=dict(metadata or {}))
        return Path(path)

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()


def _targets(preset: str | None, conv_rank: int | None, default: Target) -> Target:
    if preset is None:
        return UNET_LOCON if conv_rank is not None and default is UNET_KOHYA else default
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown network targets {preset!r}; choose {', '.join(UNET_PRESETS)}")
    return UNET_PRESETS[preset]


def _check(rank: int, conv_rank: int | None) -> None:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"network ranks must be >= 1, got rank {rank}" + (f", conv rank {conv_rank}" if conv_rank is not None else ""))


def prepare_lora(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None) -> AdapterAdaptation:
    """kohya's default LoRA: transformer-block Linears of the UNet (+ the text encoders').

    ``conv_rank`` adds the 3x3 convolutions of the blocks (kohya's ``conv_dim``: LoCon targets);
    ``targets`` picks a preset of :data:`UNET_PRESETS`.
    """
    return _on_kohya_layers(system, LoRAConfig, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                            text_encoder=text_encoder, targets=targets)


def prepare_locon(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                  conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None) -> AdapterAdaptation:
    """LoCon: LoRA on every Linear and Conv2d of the down/mid/up blocks (ResNets included); convs rank/2 by default."""
    _check(rank, conv_rank)
    conv = conv_rank if conv_rank is not None else max(1, rank // 2)
    config = LoRAConfig(rank=rank, alpha=alpha if alpha is not None else rank, conv_rank=conv,
                        conv_alpha=conv_alpha if conv_alpha is not None else conv)
    text = LoRAConfig(rank=rank, alpha=alpha if alpha is not None else rank) if text_encoder else None
    return AdapterAdaptation(system, unet_targets=_targets(targets, None, UNET_LOCON), unet_config=config, text_config=text)


def _on_kohya_layers(system, make, *, rank: int, alpha, conv_rank, conv_alpha, text_encoder: bool, targets) -> AdapterAdaptation:
    """``make`` (a family's config class) on kohya's layer set (or ``targets``) + the text encoders; alpha defaults to the rank."""
    _check(rank, conv_rank)
    config = make(rank=rank, alpha=alpha if alpha is not None else rank, conv_rank=conv_rank,
                  conv_alpha=conv_alpha if conv_alpha is not None else conv_rank)
    text = make(rank=rank, alpha=alpha if alpha is not None else rank) if text_encoder else None
    return AdapterAdaptation(system, unet_targets=_targets(targets, conv_rank, UNET_KOHYA), unet_config=config, text_config=text)


def prepare_loha(system, *, rank: int = 4, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None) -> AdapterAdaptation:
    """LoHa (Hadamard product of two rank-r pairs; ΔW up to rank r²) on kohya's layer set (LyCORIS file)."""
    return _on_kohya_layers(system, LoHaConfig, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                    text_encoder=text_encoder, targets=targets)


def prepare_lokr(system, *, rank: int = 4, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None) -> AdapterAdaptation:
    """LoKr (Kronecker product, most-square factor) on kohya's layer set (LyCORIS file)."""
    return _on_kohya_layers(system, LoKrConfig, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                    text_encoder=text_encoder, targets=targets)


def prepare_dora(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None) -> AdapterAdaptation:
    """DoRA: LoRA r8 direction + a trained per-output-row magnitude (LyCORIS ``dora_scale`` file)."""
    _check(rank, conv_rank)

    def make(**options):
        return DoRAConfig(inner=LoRAConfig(**options))

    return _on_kohya_layers(system, make, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                    text_encoder=text_encoder, targets=targets)
