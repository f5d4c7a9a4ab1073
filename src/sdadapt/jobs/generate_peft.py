"""``generate --lora FOLDER``: which pipeline component a peft adapter adapts.

A peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``, as ``PeftModel.save_pretrained`` and
``convert --to peft`` write it) holds one model's layers and names no pipeline component
(:func:`sdadapt.formats.load_lora` returns it as ``"model"``). diffusers loads such a folder into the model the
caller picks (``unet.load_adapter``); here the component is the one whose modules hold every layer of the
adapter, by name and, for LoRA layers, by input width.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PEFT_COMPONENTS", "peft_component"]

#: the pipeline components a peft adapter is matched against, in this order
PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _fits(module: nn.Module, state: dict[str, Tensor]) -> bool:
    """Whether every layer of ``state`` (canonical keys ``LAYER.lora_down.weight`` ...) is a module of ``module``
    and each ``lora_down`` (rank, in, ...) takes that module's input width."""
    from ..formats.layers import LayerNotFoundError, group_by_layer, resolve_layers

    layers = group_by_layer(state)
    try:
        placed = resolve_layers(module, list(layers))
    except (LayerNotFoundError, KeyError, ValueError):
        return False
    for layer, live_name in placed.items():
        down = layers[layer].get("lora_down.weight")
        weight = getattr(module.get_submodule(live_name), "weight", None)
        if down is not None and isinstance(weight, Tensor) and weight.dim() >= 2 and down.shape[1] != weight.shape[1]:
            return False
    return True


def peft_component(system: object, state: dict[str, Tensor], *, source: str) -> str:
    """The one component of :data:`PEFT_COMPONENTS` on ``system`` that holds every layer of the peft adapter
    ``state`` (canonical keys, (rank, in) ``lora_down`` widths checked).

    Raises:
        ValueError: no component, or several, fit (``source`` names the request, e.g. ``--lora FOLDER``); the message
            says how to name the component instead (``convert --to kohya --component ...``).
    """
    present = [name for name in PEFT_COMPONENTS if isinstance(getattr(system, name, None), nn.Module)]
    fitting = [name for name in present if _fits(getattr(system, name), state)]
    if len(fitting) == 1:
        return fitting[0]
    advice = ("name it: python -m sdadapt convert FOLDER --to kohya --component unet|text_encoder|text_encoder_2 "
              "-o NAME.safetensors, and pass that file to --lora")
    if not fitting:
        raise ValueError(f"{source}: a peft adapter whose layers fit none of this model's {', '.join(present)} (an "
                         f"adapter for another model?); if it is for this model, {advice}")
    raise ValueError(f"{source}: a peft adapter whose layers fit both {' and '.join(fitting)}; {advice}")
