"""Training methods, by name: each builds an :class:`~sdadapt.methods.fit.Adaptation` on a system.

``METHODS[name]`` is a :class:`Method` — how to prepare the adaptation, its default fitting
options, and whether it needs DreamBooth's prior images. The ``demo`` and ``train`` commands and
the quality benchmark iterate this registry, so a method added with :func:`register_method`
gets all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .finetune import FullAdaptation, class_images, prepare_full
from .fit import Adaptation, FitConfig, fit
from .lora import AdapterAdaptation, prepare_dora, prepare_locon, prepare_loha, prepare_lokr, prepare_lora

__all__ = [
    "Method",
    "METHODS",
    "register_method",
    "Adaptation",
    "AdapterAdaptation",
    "FullAdaptation",
    "FitConfig",
    "fit",
    "class_images",
    "prepare_lora",
    "prepare_locon",
    "prepare_full",
    "prepare_loha",
    "prepare_lokr",
    "prepare_dora",
]


@dataclass(frozen=True)
class Method:
    """One training method: ``prepare(system) -> Adaptation`` plus its defaults."""

    name: str
    summary: str
    prepare: Callable[..., Adaptation]
    learning_rate: float
    steps: int
    prior_preservation: bool = False
    file_suffix: str = ".safetensors"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add (or replace) a method in :data:`METHODS`."""
    METHODS[method.name] = method


register_method(Method("lora", "LoRA r8 on the UNet transformer blocks and the text encoder (kohya file)", prepare_lora, 2e-3, 300))
register_method(Method("locon", "LoRA + conv LoRA on every UNet block layer (kohya LoCon file)", prepare_locon, 2e-3, 300))
register_method(Method("loha", "LoHa r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_loha, 2e-3, 300))
register_method(Method("lokr", "LoKr r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_lokr, 2e-3, 300))
register_method(Method("dora", "DoRA (LoRA r8 + magnitude) on the UNet transformer blocks and the text encoder", prepare_dora, 2e-3, 300))
register_method(Method("full", "native fine-tune of the whole UNet", prepare_full, 2e-4, 300))
register_method(Method("dreambooth", "fine-tune of the UNet with prior preservation", prepare_full, 2e-4, 300, prior_preservation=True))
