"""Which pipeline component a peft adapter adapts (``generate --lora FOLDER``; front-ends loading a peft folder).

A peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``, as ``PeftModel.save_pretrained`` and
``convert --to peft`` write it) holds one model's layers and names no pipeline component
(:func:`sdadapt.formats.load_lora` returns it as ``"model"``). diffusers loads such a folder into the model the
caller picks (``unet.load_adapter``); here the component is the one whose modules hold every layer of the
adapter, by name and by the shapes of its tensors (every family: LoRA, peft's LoHa / LoKr, (IA)³).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PEFT_COMPONENTS", "peft_component"]

#: the pipeline components a peft adapter is matched against, in this order
PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _fits(module: nn.Module, state: dict[str, Tensor]) -> bool:
    """Whether every layer of ``state`` (canonical keys ``LAYER.lora_down.weight``, ``LAYER.hada_w1_a``,
    ``LAYER.lokr_w1`` ...) is a module of ``module`` whose weight its tensors fit: the family's own check
    (:func:`~sdadapt.adapters.registry.adapter_from_file_tensors`, factors as meta tensors: shapes only), so a LoRA's
    (rank, in) ``lora_down``, a LoHa's (out, r) ``hada_w1_a`` and (r, in·kh·kw) ``hada_w1_b``, a LoKr's
    ``a·b = out``, ``c·d = in`` all count, not the layer names alone."""
    from ..adapters.base import LayerGeometry
    from ..adapters.registry import adapter_from_file_tensors
    from .layers import LayerNotFoundError, group_by_layer, resolve_layers

    layers = group_by_layer(state)
    try:
        placed = resolve_layers(module, list(layers))
    except (LayerNotFoundError, KeyError, ValueError):
        return False
    for layer, live_name in placed.items():
        weight = getattr(module.get_submodule(live_name), "weight", None)
        if not isinstance(weight, Tensor):
            return False
        shapes = {key: value.to("meta") if value.numel() > 1 else value for key, value in layers[layer].items()}
        try:
            adapter_from_file_tensors(LayerGeometry.from_weight_shape(tuple(weight.shape)), shapes, name=layer)
        except (ValueError, TypeError, RuntimeError):
            return False
    return True


def peft_component(system: object, state: dict[str, Tensor], *, source: str) -> str:
    """The one component of :data:`PEFT_COMPONENTS` on ``system`` that holds every layer of the peft adapter
    ``state`` (canonical keys; each layer's tensor shapes checked against the module's weight).

    ``system``: anything with ``unet`` / ``text_encoder`` / ``text_encoder_2`` modules (a diffusers pipeline,
    :class:`~sdadapt.diffusers_system.DiffusersSystem`). Example::

        components, _ = sdadapt.load_lora("my_peft_adapter/")        # {"model": state}
        name = sdadapt.formats.peft_component(pipe, components["model"], source="my_peft_adapter")
        sdadapt.apply_lora(getattr(pipe, name), components["model"], scale=0.8)

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
