"""OFT training: LyCORIS ``algo=diag-oft`` / ``algo=boft`` on a system's UNet and text encoder(s).

The layers of a LyCORIS preset (``targets``; default ``full``, what LyCORIS' kohya network adapts
without a ``preset`` arg), each given a rotation of its output rows from zero (the layer is unchanged
at step 0; :mod:`sdadapt.adapters.oft`). ``rank`` is LyCORIS' ``network_dim`` for OFT: the block size it
asks for (``conv_rank``, kohya's ``conv_dim``, for kxk convolutions); ``constraint`` (COFT, written
as each layer's ``alpha``) and ``rescaled`` are LyCORIS' network args of the same names. The file
is LyCORIS' (``lora_unet_<layer>.oft_blocks`` / ``.alpha`` [/ ``.rescale``], ``ss_network_module =
lycoris.kohya``, ``algo = diag-oft`` or ``boft``). ``network_alpha`` is not used (LyCORIS' OFT modules
ignore it: ``alpha`` there is the constraint).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..adapters import OFTConfig
from ..errors import InputError
from ..inject import AdapterHandle, LayerFitError, inject
from .lora import AdapterAdaptation, adaptation_from_weights
from .lycoris_presets import lycoris_preset

__all__ = ["prepare_diag_oft", "prepare_boft"]


def _prepare_oft(system, *, butterfly: bool, rank: int, conv_rank: int | None, constraint: float | None,
                 rescaled: bool | None, text_encoder: bool, targets: str | None, module_dropout: float | None,
                 unet: bool, network_weights: str | os.PathLike | None) -> AdapterAdaptation:
    algo = "boft" if butterfly else "diag-oft"
    try:
        config = OFTConfig(dim=rank, conv_dim=conv_rank, butterfly=butterfly, constraint=float(constraint or 0.0),
                           rescaled=bool(rescaled), module_dropout=float(module_dropout or 0.0))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{algo}: {exc}") from None
    preset = lycoris_preset(targets if targets is not None else "full").on(system)
    parts = preset.parts(system, unet=unet, text_encoder=text_encoder)
    args = {"algo": algo, "preset": preset.name}
    if config.constraint:
        args["constraint"] = repr(config.constraint)
    if config.rescaled:
        args["rescaled"] = "True"
    if conv_rank is not None:
        args["conv_dim"] = str(conv_rank)
    if config.module_dropout:
        args["module_dropout"] = str(config.module_dropout)

    def inject_part(model: nn.Module, chosen: Any) -> AdapterHandle:
        try:  # (every layer's layout is checked before anything is injected)
            return inject(model, chosen, config, name="default")
        except LayerFitError as exc:
            raise InputError(f"{exc} (network_dim / --network-dim sets it; conv_dim for kxk convolutions)") from None

    def build() -> AdapterAdaptation:
        return AdapterAdaptation.injected(system, parts, inject_part, network_args=args)

    return adaptation_from_weights(system, build, text_encoder=text_encoder, network={},
                                   network_weights=network_weights)


def prepare_diag_oft(system, *, rank: int = 4, conv_rank: int | None = None, constraint: float | None = None,
                     rescaled: bool | None = None, text_encoder: bool = True, targets: str | None = None,
                     module_dropout: float | None = None, unet: bool = True,
                     network_weights: str | os.PathLike | None = None) -> AdapterAdaptation:
    """Diag-OFT (block-diagonal orthogonal rotations, LyCORIS ``algo=diag-oft``) on a LyCORIS preset's layers.

    Args:
        system: a :class:`~sdadapt.methods.system.System`.
        rank: LyCORIS' ``network_dim``: the block size asked for (``factorization(out, rank)``).
        conv_rank: the same for kxk convolutions (kohya / LyCORIS ``conv_dim``; default ``rank``).
        constraint: COFT, ``‖Q‖ ≤ constraint · out`` (LyCORIS ``constraint``; default 0: none).
        rescaled: also train a per-row scale (LyCORIS ``rescaled``).
        text_encoder: adapt the text encoder(s) too (when the preset names text-encoder layers).
        targets: a LyCORIS preset name or preset file (default ``"full"``, LyCORIS' own default).
        module_dropout: skip each module with this probability per step.
        unet: adapt the UNet (``False``: the text encoders only).
        network_weights: start from this OFT file (kohya's ``--network_weights``).

    Returns:
        an :class:`~sdadapt.methods.lora.AdapterAdaptation`; ``save`` writes a LyCORIS file.

    Raises:
        InputError: an invalid option, an unknown preset, or nothing to adapt.
    """
    return _prepare_oft(system, butterfly=False, rank=rank, conv_rank=conv_rank, constraint=constraint,
                        rescaled=rescaled, text_encoder=text_encoder, targets=targets, module_dropout=module_dropout,
                        unet=unet, network_weights=network_weights)


def prepare_boft(system, *, rank: int = 16, conv_rank: int | None = None, constraint: float | None = None,
                 rescaled: bool | None = None, text_encoder: bool = True, targets: str | None = None,
                 module_dropout: float | None = None, unet: bool = True,
                 network_weights: str | os.PathLike | None = None) -> AdapterAdaptation:
    """BOFT (butterfly orthogonal rotations, LyCORIS ``algo=boft``) on a LyCORIS preset's layers.

    As :func:`prepare_diag_oft`; ``rank`` is the largest even block size ``b`` wanted, ``out / b`` a power of
    two (:func:`~sdadapt.adapters.oft.power2_factorization`). The default, 16, splits every SD1/SD2/SDXL
    width (320 = 10·32, 768 = 12·64 ...); LyCORIS' 4 splits none of SD's 320/640/1280 (a layer that
    cannot be split is refused by name, as LyCORIS refuses it).
    """
    return _prepare_oft(system, butterfly=True, rank=rank, conv_rank=conv_rank, constraint=constraint,
                        rescaled=rescaled, text_encoder=text_encoder, targets=targets, module_dropout=module_dropout,
                        unet=unet, network_weights=network_weights)
