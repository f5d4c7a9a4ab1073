"""(IA)³ training: LyCORIS ``algo=ia3`` on a system's UNet and text encoder(s).

By default the layers of LyCORIS' ``ia3`` preset: the attention keys and values (UNet ``to_k`` /
``to_v``, CLIP ``k_proj`` / ``v_proj``) scaled on their outputs and the feed-forward output layers
(``ff.net.2`` / ``mlp.fc2``) scaled on their inputs (LyCORIS' ``train_on_input``), as the preset's
``name_algo_map`` does. Any other LyCORIS preset (``targets``: a built-in one or a preset file)
adapts its layers on their outputs, as LyCORIS does without ``train_on_input`` (its other presets have
no ``name_algo_map``; a file's is refused); ``train_on_input`` forces one axis everywhere. One vector
per layer trains, from zero; the file is LyCORIS' (``lora_unet_<layer>.weight`` / ``.on_input``,
``ss_network_module = lycoris.kohya``, ``algo = ia3``). LyCORIS users train it with large learning rates (5e-3 to 1e-2 on SD, 50-100x a
LoRA's); the given one is used as it is. The registered default (1e-1) is tuned on the toy model, as
every method's default is (LoRA's 3e-3 vs ~1e-4 on SD): docs/lycoris.md gives the rates for SD.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..adapters import IA3Config
from ..errors import InputError
from ..inject import AdapterHandle, inject
from ..targets import select
from .lora import AdapterAdaptation, adaptation_from_weights
from .lycoris_presets import IA3_ON_INPUT, lycoris_preset

__all__ = ["prepare_ia3"]

def _inject_ia3(model: nn.Module, targets, *, train_on_input: bool | None, module_dropout: float,
                name: str, ia3_preset: bool) -> AdapterHandle:
    """(IA)³ on ``targets``' layers of ``model``: on ``train_on_input``'s axis; when it is ``None``, on
    outputs, except the inputs of :data:`IA3_ON_INPUT` layers when ``ia3_preset`` (the built-in
    ``ia3`` preset's ``name_algo_map``; LyCORIS' other presets and preset files scale outputs)."""
    config = IA3Config(train_on_input=bool(train_on_input), module_dropout=module_dropout)
    layer_configs = None
    if train_on_input is None and ia3_preset:
        on_input = IA3Config(train_on_input=True, module_dropout=module_dropout)
        layer_configs = {layer: on_input for layer, module in select(model, targets) if IA3_ON_INPUT(layer, module)}
    return inject(model, targets, config, name=name, layer_configs=layer_configs)


def prepare_ia3(system, *, text_encoder: bool = True, targets: str | None = None, train_on_input: bool | None = None,
                module_dropout: float | None = None, unet: bool = True,
                network_weights: str | os.PathLike | None = None) -> AdapterAdaptation:
    """(IA)³ vectors on the layers of LyCORIS' ``ia3`` preset (or the LyCORIS preset ``targets``).

    Args:
        system: a :class:`~sdadapt.methods.system.System` (``unet``, ``text_encoder``[, ``text_encoder_2``],
            ``base_model``).
        text_encoder: adapt the text encoder(s) too (when the preset names text-encoder layers).
        targets: a LyCORIS preset name or preset file (default ``"ia3"``; ``network_args = ["preset=..."]``).
        train_on_input: ``None`` (default): with the ``ia3`` preset its choice (feed-forward output
            layers on their inputs, the rest on outputs), with any other preset or a preset file
            every layer on its outputs (as LyCORIS); ``True`` / ``False``: every layer on its
            inputs / outputs (LyCORIS' ``train_on_input``).
        module_dropout: skip each module with this probability per step.
        unet: adapt the UNet (``False``: the text encoders only).
        network_weights: start from this IA³ file (kohya's ``--network_weights``).

    Returns:
        an :class:`~sdadapt.methods.lora.AdapterAdaptation`; ``save`` writes a LyCORIS file.

    Raises:
        InputError: an unknown preset, or nothing to adapt.
    """
    preset = lycoris_preset(targets if targets is not None else "ia3").on(system)  # (a preset file: its layers here)
    ia3_preset = preset.file is None and preset.name == "ia3"  # (its name_algo_map: IA3_ON_INPUT on inputs)
    dropout = float(module_dropout) if module_dropout is not None else 0.0
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"module_dropout must be in [0, 1), got {module_dropout!r}")
    parts = preset.parts(system, unet=unet, text_encoder=text_encoder)
    args = {"algo": "ia3", "preset": preset.name}
    if train_on_input is not None:
        args["train_on_input"] = str(bool(train_on_input))
    if dropout:
        args["module_dropout"] = str(dropout)

    def inject_part(model: nn.Module, chosen: Any) -> AdapterHandle:
        return _inject_ia3(model, chosen, train_on_input=train_on_input, module_dropout=dropout, name="default",
                           ia3_preset=ia3_preset)

    def build() -> AdapterAdaptation:
        return AdapterAdaptation.injected(system, parts, inject_part, network_args=args)

    return adaptation_from_weights(system, build, text_encoder=text_encoder, network={},
                                   network_weights=network_weights)
