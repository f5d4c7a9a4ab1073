"""DyLoRA training as kohya's ``networks.dylora`` (``network_args = ["unit=N"]``).

kohya's DyLoRA network adapts the same layers as its LoRA (the UNet's transformer blocks, with
``conv_dim`` also the ResNet blocks and down/upsamplers, and the text encoders' attention and MLP
Linears); each layer is a :class:`~sdadapt.adapters.dylora.DyLoRAModule`. The file written is a
plain kohya LoRA file of rank R with ``ss_network_module = "networks.dylora"`` and ``unit`` in
``ss_network_args``; ``cut-dylora --rank r`` cuts it to any multiple of ``unit``.

What kohya's ``create_network`` takes, and what sdadapt refuses instead of ignoring: ``conv_dim``
must equal ``network_dim`` (kohya asserts it); ``conv_alpha`` is read and not used by kohya (the
convolutions get ``network_alpha``), so one that differs from the network alpha is refused; the
LoRA+ ratios are kohya's (``lora_B`` / ``lora_up`` columns); dropout and block-wise args are not
in kohya's DyLoRA and are not options here. ``--network-weights FILE`` starts the rows from a
DyLoRA or plain LoRA file of the same rank and alpha (kohya's ``network.load_weights``, its
``_load_from_state_dict`` splitting ``lora_down`` / ``lora_up`` into the rows); a DyLoRA file
trained with another ``unit`` is refused, and kohya's ``--dim_from_weights`` (which its DyLoRA
builds without the unit) is not an option.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..adapters.dylora import DyLoRAModule
from ..errors import InputError
from .lora import AdapterAdaptation, adaptation_from_weights, prepare_lora
from .loraplus import loraplus_ratios

__all__ = ["DyLoRAAdaptation", "prepare_dylora"]


class DyLoRAAdaptation(AdapterAdaptation):
    """An :class:`AdapterAdaptation` of DyLoRA modules; saved with ``ss_network_module = "networks.dylora"``."""

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        metadata = dict(metadata or {})
        metadata.setdefault("ss_network_module", "networks.dylora")
        return super().save(path, metadata=metadata)


def _to_dylora(adaptation: AdapterAdaptation, unit: int) -> DyLoRAAdaptation:
    """Replace every injected LoRA module of ``adaptation`` by a DyLoRA module of its layer, rank and alpha."""
    for handle in adaptation.handles.values():
        for layer_name, old in list(handle.modules.items()):
            handle.replace(layer_name, DyLoRAModule.from_lora(old, unit=unit))  # type: ignore[arg-type]
    new_adaptation = DyLoRAAdaptation.__new__(DyLoRAAdaptation)
    new_adaptation.__dict__.update(adaptation.__dict__)
    new_adaptation.params = [param for _, _, _, param in new_adaptation._entries()]
    new_adaptation.lr_scales = None
    return new_adaptation


def _file_unit(path: str | os.PathLike) -> int | None:
    """The ``unit`` a kohya DyLoRA file was trained with (:func:`sdadapt.formats.detect.dylora_network`), ``None``
    for any other file."""
    file = Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        return None
    from safetensors import safe_open

    from ..formats.detect import dylora_network

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # (not readable as safetensors: read_network_weights says why)
        return None
    network = dylora_network(metadata)
    return network.unit if network is not None and network.trainer == "kohya networks.dylora" else None


def prepare_dylora(system, *, rank: int = 8, alpha: float | None = None, unit: int = 1, conv_rank: int | None = None,
                   conv_alpha: float | None = None, text_encoder: bool = True, unet: bool = True,
                   loraplus_lr_ratio: float | None = None, loraplus_unet_lr_ratio: float | None = None,
                   loraplus_text_encoder_lr_ratio: float | None = None,
                   network_weights: str | os.PathLike | None = None) -> DyLoRAAdaptation:
    """kohya's DyLoRA network on ``system``: LoRA's layers (``conv_rank``: + the 3x3 convolutions),
    each a :class:`~sdadapt.adapters.dylora.DyLoRAModule` of rank ``rank`` training ``unit`` rows per step.

    ``network_weights``: start every module the file holds from its ``lora_down`` rows and ``lora_up``
    columns (kohya's ``--network_weights``; a DyLoRA or plain LoRA file of rank ``rank`` and the network
    alpha). Loading draws nothing from the RNG, so the slices a run draws are those of a run without it.

    Raises:
        InputError: ``rank`` not a multiple of ``unit``, ``conv_rank`` other than ``rank``, a
            ``conv_alpha`` other than the network alpha (kohya's DyLoRA gives convolutions the network alpha),
            a ``network_weights`` DyLoRA file of another unit, or a module of another rank or alpha.
    """
    if not isinstance(unit, int) or unit < 1:
        raise InputError(f"DyLoRA unit must be a positive int, got {unit!r}")
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"--network-dim (the DyLoRA rank) must be a positive int, got {rank!r}")
    if rank % unit:
        raise InputError(f"DyLoRA: --network-dim {rank} is not a multiple of unit {unit} (kohya asserts 'rank must be "
                         f"a multiple of unit'); use e.g. --network-dim {max(unit, rank - rank % unit)}")
    if conv_rank is not None and conv_rank != rank:
        raise InputError(f"DyLoRA: conv_dim {conv_rank} must equal network_dim {rank} (kohya asserts 'conv_dim must be "
                         "same as network_dim'); give conv_dim = network_dim, or leave it out")
    effective_alpha = float(alpha) if alpha is not None and alpha != 0 else float(rank)
    if conv_alpha is not None and conv_rank is not None and float(conv_alpha) != effective_alpha:
        raise InputError(f"DyLoRA: conv_alpha {conv_alpha:g} differs from the network alpha {effective_alpha:g}; kohya's "
                         "networks/dylora.py reads conv_alpha but gives the convolutions network_alpha: leave "
                         "conv_alpha out (or equal to network_alpha)")
    if network_weights is not None:
        file_unit = _file_unit(network_weights)
        if file_unit is not None and file_unit != unit:
            raise InputError(f"--network-weights {network_weights}: a DyLoRA file trained with unit {file_unit}, the run "
                             f"trains unit {unit}; pass --dylora-unit {file_unit} (network_args unit={file_unit}) so "
                             "its rows keep the ranks it was cut at")

        def build() -> DyLoRAAdaptation:
            return prepare_dylora(system, rank=rank, alpha=alpha, unit=unit, conv_rank=conv_rank, conv_alpha=conv_alpha,
                                  text_encoder=text_encoder, unet=unet, loraplus_lr_ratio=loraplus_lr_ratio,
                                  loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                                  loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio)

        return adaptation_from_weights(system, build, text_encoder=text_encoder, network={},  # type: ignore[return-value]
                                       network_weights=network_weights)
    lora = prepare_lora(system, rank=rank, alpha=effective_alpha, conv_rank=conv_rank,
                        conv_alpha=effective_alpha if conv_rank is not None else None, text_encoder=text_encoder,
                        unet=unet)
    try:
        adaptation = _to_dylora(lora, unit)
        plus = {n: v for n, v in (("loraplus_lr_ratio", loraplus_lr_ratio),
                                  ("loraplus_unet_lr_ratio", loraplus_unet_lr_ratio),
                                  ("loraplus_text_encoder_lr_ratio", loraplus_text_encoder_lr_ratio)) if v is not None}
        args: dict[str, Any] = {"unit": str(unit)}
        if plus:
            unet_ratio, text_ratio = loraplus_ratios(**plus)
            adaptation.use_loraplus(unet_ratio=unet_ratio if unet else None,
                                    text_encoder_ratio=text_ratio if text_encoder else None, family="dylora")
            args.update({n: str(v) for n, v in plus.items()})
    except BaseException:
        lora.remove()
        raise
    adaptation.network_args = args
    return adaptation
