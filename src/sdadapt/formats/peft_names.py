"""The layer names a peft adapter folder is written with: the module names of the model it is for.

peft matches an adapter's tensors to the model by exact module name (``base_model.model.<name>.lora_A.weight``;
``target_modules`` / patterns as dotted suffixes), so a folder must use the model's own spelling. sdadapt's
canonical text-encoder names (``text_model.encoder.layers.N...``, what :func:`sdadapt.load_lora` returns) are
transformers-4 names: transformers 5's ``CLIPTextModel`` (SD's ``text_encoder``) has no ``text_model`` module
(``encoder.layers.N...``), while ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``) keeps it. Which one
a ``text_model.`` state is for cannot be told from the names: :func:`peft_layer_names` renames onto a given
model, or onto a named pipeline component of the installed transformers; given neither, it writes the names as
they are (right for ``CLIPTextModelWithProjection`` and for a live state of the model itself, as sdadapt always
did), so a transformers-5 ``CLIPTextModel``'s folder needs ``component="text_encoder"`` or ``model=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from torch import Tensor, nn

from .layers import COMPONENTS, canonical_layer_path, resolve_layers, split_key, strip_compiled_segments

__all__ = ["peft_layer_names", "clip_text_model_has_text_model"]

_TEXT_MODEL = "text_model."


@lru_cache(maxsize=1)
def clip_text_model_has_text_model() -> bool:
    """Whether the installed transformers' ``CLIPTextModel`` nests its modules under ``text_model``
    (transformers 4: yes; 5: no). Read from a 1-layer, 8-wide instance (microseconds), not from version numbers;
    without transformers, 5's names (the current release's: what a peft folder written today is read with)."""
    try:
        import transformers
    except ImportError:
        return False

    config = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, vocab_size=4, max_position_embeddings=4)
    return "text_model" in dict(transformers.CLIPTextModel(config).named_children())


def _component_name(component: str, layer: str) -> str:
    """``layer`` as pipeline ``component`` names it with the installed transformers (UNet: diffusers names)."""
    canonical = canonical_layer_path(component, layer)  # text encoders: `text_model.`-prefixed
    if component == "text_encoder" and not clip_text_model_has_text_model() and canonical.startswith(_TEXT_MODEL):
        return canonical[len(_TEXT_MODEL) :]  # transformers 5's CLIPTextModel
    return canonical  # CLIPTextModelWithProjection (text_encoder_2) keeps `text_model.` in 4 and 5


def peft_layer_names(
    state: Mapping[str, Tensor], *, model: nn.Module | None = None, component: str | None = None
) -> dict[str, Tensor]:
    """``state`` with each layer renamed as the model the peft folder is for names it.

    Args:
        state: one model's adapter state ``{"<layer>.<tensor>": tensor}`` (canonical or live names).
        model: the model (UNet or text encoder) the folder is for: its own module names (exact; wins over
            ``component``).
        component: ``"unet"``, ``"text_encoder"`` (``CLIPTextModel``) or ``"text_encoder_2"``
            (``CLIPTextModelWithProjection``): that diffusers pipeline component's names under the installed
            transformers.

    Without either, names are kept as given (less torch.compile's ``_orig_mod`` segments): a ``text_model.`` name
    is right for ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``) and for a transformers-4
    ``CLIPTextModel``, but a transformers-5 ``CLIPTextModel`` (SD1's / SDXL's ``text_encoder``) has no ``text_model``
    module: pass ``component="text_encoder"`` or ``model=`` for it (peft would say "Target modules ... not found").

    Raises:
        ValueError: an unknown ``component``; two keys that become one name.
        LayerNotFoundError: a layer that matches no module of ``model``.
    """
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    layers = {key: split_key(key) for key in state}
    if model is not None:
        placed = resolve_layers(model, list(dict.fromkeys(layer for layer, _ in layers.values())))
        rename = placed.__getitem__
    elif component is not None:
        def rename(layer: str) -> str:
            return _component_name(component, layer)
    else:  # (as given, as sdadapt always wrote them: no regression for callers passing neither)
        rename = strip_compiled_segments
    out: dict[str, Tensor] = {}
    for key, (layer, suffix) in layers.items():
        new = f"{rename(layer)}.{suffix}"
        if new in out:
            raise ValueError(f"{key!r} and another key both name {new!r} in the peft folder")
        out[new] = state[key]
    return out
