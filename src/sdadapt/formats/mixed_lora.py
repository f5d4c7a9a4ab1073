"""LoRA files holding kohya keys and diffusers keys at once, read as one adapter.

SimpleTuner's ``lora_format: comfyui`` export (``helpers/training/lora_format.py``
``convert_diffusers_to_comfyui_sd_lora``) renames diffusers' ``lora_A`` / ``lora_B`` / ``lora.down`` / ``lora.up``
tensors to kohya's ``lora_unet_*`` / ``lora_te*_`` names (with ``.alpha`` from the adapter config) and leaves every
other key as diffusers wrote it: a DoRA's ``unet.<layer>.lora_magnitude_vector``, a text encoder's
``text_encoder.<layer>.lora_linear_layer.down/up.weight``. ComfyUI reads such a file key by key (dropping the
magnitudes). Here the kohya part is read by :func:`~sdadapt.formats.kohya.from_kohya` (its canonical names are
diffusers' layer paths and ``lora_down`` / ``lora_up`` / ``alpha``), put under its component's prefix beside the
diffusers part, and the whole read by :func:`~sdadapt.formats.diffusers.from_diffusers`: one layer's kohya factors and
diffusers magnitude make one DoRA layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import Tensor

from .diffusers import from_diffusers
from .files import WeightFileError, check_finite, read_weights
from .kohya import _component_of, from_kohya
from .layers import COMPONENTS, underscore_to_path

__all__ = ["diffusers_spelling", "from_mixed_lora", "is_mixed_lora", "load_mixed_lora"]

_KOHYA_LORA_TENSORS = ("lora_down.weight", "lora_up.weight", "alpha")


def _is_diffusers_key(key: str) -> bool:
    return key.partition(".")[0] in COMPONENTS


def is_mixed_lora(keys: Iterable[str]) -> bool:
    """Whether ``keys`` hold both kohya-prefixed (``lora_unet_*``, ``lora_te*_``) and component-prefixed
    (``unet.``, ``text_encoder.`` ...) tensors."""
    kohya = diffusers = False
    for key in keys:
        kohya = kohya or _component_of(key) is not None
        diffusers = diffusers or _is_diffusers_key(key)
        if kohya and diffusers:
            return True
    return False


def from_mixed_lora(state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "<state>",
                    layers_per_block: int = 2) -> dict[str, dict[str, Tensor]]:
    """A mixed kohya + diffusers state (see the module) -> ``{component: canonical state}``.

    Raises:
        WeightFileError: a kohya key of another algorithm than LoRA, a layer given in both spellings, or keys
            neither reader knows (naming them).
    """
    kohya = {k: v for k, v in state.items() if _component_of(k) is not None}
    spelled = {k: v for k, v in state.items() if k not in kohya}
    for component, tensors in from_kohya(kohya, source=source, layers_per_block=layers_per_block).items():
        for key, value in tensors.items():
            if not key.endswith(_KOHYA_LORA_TENSORS):
                raise WeightFileError(f"{source}: mixed kohya and diffusers keys, and the kohya key {key!r} is not a LoRA "
                                      "tensor: only LoRA factors can be joined with diffusers keys (SimpleTuner's "
                                      "comfyui export)")
            name = f"{component}.{key}"
            if name in spelled:
                raise WeightFileError(f"{source}: the layer of {name!r} is given twice (a kohya and a diffusers key)")
            spelled[name] = value
    return from_diffusers(spelled, metadata, source=source)


def load_mixed_lora(path: str | os.PathLike, *, layers_per_block: int = 2
                    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """Read a mixed kohya + diffusers LoRA file: ``({component: canonical state}, metadata)``."""
    state, metadata = read_weights(path)
    check_finite(state, source=str(path))
    return from_mixed_lora(state, metadata, source=str(path), layers_per_block=layers_per_block), metadata


_DIFFUSERS_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def diffusers_spelling(keys: Iterable[str]) -> dict[str, str]:
    """``{diffusers-spelled key: the file's key}`` of a mixed file's keys (``inspect`` counts each layer once): a
    kohya key as ``<component>.<layer path>.lora_A.weight`` / ``lora_B.weight`` / ``alpha``, diffusers keys as they
    are."""
    out = {}
    for key in keys:
        found = _component_of(key)
        if found is None or "." not in key:
            out[key] = key
            continue
        component, name = found
        suffix = key.split(".", 1)[1]
        out[f"{component}.{underscore_to_path(name)}.{_DIFFUSERS_NAMES.get(suffix, suffix)}"] = key
    return out
