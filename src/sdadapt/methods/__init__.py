"""Training methods, by name: each builds an :class:`~sdadapt.methods.fit.Adaptation` on a system
(anything implementing the :class:`~sdadapt.methods.system.System` protocol).

``METHODS[name]`` is a :class:`Method` — how to prepare the adaptation, its default fitting
options, and whether it needs DreamBooth's prior images. The ``demo`` and ``train`` commands and
the quality benchmark iterate this registry, so a method added with :func:`register_method`
gets all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .finetune import FullAdaptation, class_images, prepare_full
from .fit import Adaptation, FitConfig, fit
from .lora import (
    AdapterAdaptation,
    prepare_dora,
    prepare_locon,
    prepare_loha,
    prepare_lokr,
    prepare_lora,
)
from .system import System, check_system

__all__ = [
    "Method",
    "System",
    "check_system",
    "Prior",
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


Prior = Literal["off", "auto", "required"]


@dataclass(frozen=True)
class Method:
    """One training method: ``prepare(system) -> Adaptation`` plus its defaults.

    ``prior`` says whether it regularises with *class images* (DreamBooth's prior preservation,
    kohya's "reg images": what the unadapted model makes for a class prompt, trained on alongside
    the instance images): ``"off"`` only when asked, ``"auto"`` whenever class prompts are known
    (always on the toy model; with ``--class-prompt`` on a user's model), ``"required"`` always
    (an error without class prompts).
    """

    name: str
    summary: str
    prepare: Callable[..., Adaptation]
    learning_rate: float
    steps: int
    prior: Prior = "off"
    file_suffix: str = ".safetensors"

    def adapt(self, system, *, seed: int = 0) -> Adaptation:
        """``prepare(system)`` with the adapters' random initialisation drawn from ``seed``.

        The global torch RNG is forked, so the caller's random state is left as it was and the
        same seed gives the same adapters (hence the same training run) every time.
        """
        check_system(system)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.prepare(system)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add (or replace) a method in :data:`METHODS`."""
    METHODS[method.name] = method


register_method(Method("lora", "LoRA r8 on the UNet transformer blocks and the text encoder (kohya file)", prepare_lora, 3e-3, 600, "auto"))
register_method(Method("locon", "LoRA + conv LoRA on every UNet block layer (kohya LoCon file)", prepare_locon, 3e-3, 600, "auto"))
register_method(Method("loha", "LoHa r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_loha, 3e-3, 600, "auto"))
register_method(Method("lokr", "LoKr r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_lokr, 3e-3, 600, "auto"))
register_method(Method("dora", "DoRA (LoRA r8 + magnitude) on the UNet transformer blocks and the text encoder", prepare_dora, 3e-3, 600, "auto"))
register_method(Method("full", "native fine-tune of the whole UNet", prepare_full, 2e-4, 600))
register_method(Method("dreambooth", "fine-tune of the UNet with prior preservation", prepare_full, 2e-4, 600, "required"))
