"""sdadapt: every way to adapt Stable-Diffusion-style models, on any UNet or text encoder.

Quick start::

    import sdadapt
    handle = sdadapt.inject(unet, sdadapt.targets.UNET_KOHYA, sdadapt.LoRAConfig(rank=8, alpha=4))
    ...train handle.parameters()...
    sdadapt.formats.save_kohya("my_lora.safetensors", {"unet": handle.state_dict()})

``import sdadapt`` is cheap: the names below are loaded on first use (PEP 562 ``__getattr__``), so
``python -m sdadapt --help`` and library users who need one function do not import torch and every
submodule up front. ``sdadapt.X`` and ``from sdadapt import X`` work as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, for type checkers and IDEs; at run time ``__getattr__`` loads them
    from . import (
        aesthetic as aesthetic,
        custom_diffusion as custom_diffusion,
        embeddings as embeddings,
        formats as formats,
        hypernetworks as hypernetworks,
        inversion as inversion,
        loratools as loratools,
        merge as merge,
        targets as targets,
        training as training,
    )
    from .adapters import (
        DoRAConfig as DoRAConfig,
        FullConfig as FullConfig,
        GLoRAConfig as GLoRAConfig,
        IA3Config as IA3Config,
        LoHaConfig as LoHaConfig,
        LoKrConfig as LoKrConfig,
        LoRAConfig as LoRAConfig,
        LoRAModule as LoRAModule,
        NormConfig as NormConfig,
        OFTConfig as OFTConfig,
        SharedInputBatching as SharedInputBatching,
        batch_shared_input_adapters as batch_shared_input_adapters,
        lora_delta_weight as lora_delta_weight,
        lora_forward as lora_forward,
    )
    from .aesthetic import (
        aesthetic_embedding as aesthetic_embedding,
        aesthetic_sample as aesthetic_sample,
        load_aesthetic_embedding as load_aesthetic_embedding,
        personalize_text_encoder as personalize_text_encoder,
        save_aesthetic_embedding as save_aesthetic_embedding,
    )
    from .apply import AppliedDelta as AppliedDelta, apply_lora as apply_lora
    from .custom_diffusion import (
        CustomDiffusionHandle as CustomDiffusionHandle,
        apply_custom_diffusion as apply_custom_diffusion,
        merge_custom_diffusion as merge_custom_diffusion,
        save_custom_diffusion as save_custom_diffusion,
    )
    from .embeddings import (
        Embedding as Embedding,
        EmbeddingHandle as EmbeddingHandle,
        initial_embedding as initial_embedding,
        inject_embedding as inject_embedding,
    )
    from .formats import WeightFileError as WeightFileError, load_lora as load_lora, save_lora as save_lora
    from .formats.custom_diffusion import load_custom_diffusion as load_custom_diffusion
    from .formats.embeddings import load_embedding as load_embedding, save_embedding as save_embedding
    from .hypernetworks import (
        Hypernetwork as Hypernetwork,
        HypernetworkConfig as HypernetworkConfig,
        HypernetworkHandle as HypernetworkHandle,
        inject_hypernetwork as inject_hypernetwork,
        load_hypernetwork as load_hypernetwork,
        save_hypernetwork as save_hypernetwork,
    )
    from .inject import (
        AdapterHandle as AdapterHandle,
        adapter_names as adapter_names,
        inject as inject,
        load_adapter as load_adapter,
    )
    from .inversion import (
        ImageVectors as ImageVectors,
        Inversion as Inversion,
        clip_invert as clip_invert,
        generate_with_vectors as generate_with_vectors,
        invert_image as invert_image,
        load_image_vectors as load_image_vectors,
        load_inversion as load_inversion,
        regenerate_image as regenerate_image,
        save_image_vectors as save_image_vectors,
        save_inversion as save_inversion,
    )
    from .targets import (
        NoTargetsError as NoTargetsError,
        by_name as by_name,
        by_regex as by_regex,
        by_type as by_type,
        select as select,
    )
    from .training import StepConfig as StepConfig, TrainState as TrainState, train_step as train_step

__version__ = "0.1.0"

#: the public submodules (``sdadapt.formats``, ...)
_MODULES = frozenset({"aesthetic", "custom_diffusion", "embeddings", "formats", "hypernetworks", "inversion",
                      "loratools", "merge", "targets", "training"})

#: every public name of ``__all__`` -> the submodule it is loaded from on first use (a name of :data:`_MODULES` is that
#: submodule itself). The ``TYPE_CHECKING`` block above lists the same names (tests/test_cli_startup.py checks that
#: the three agree).
_LAZY: dict[str, str] = {
    **{name: f".{name}" for name in _MODULES},
    **dict.fromkeys(["DoRAConfig", "FullConfig", "GLoRAConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoRAConfig",
                     "LoRAModule", "NormConfig", "OFTConfig", "SharedInputBatching", "batch_shared_input_adapters",
                     "lora_delta_weight", "lora_forward"], ".adapters"),
    **dict.fromkeys(["aesthetic_embedding", "aesthetic_sample", "load_aesthetic_embedding", "personalize_text_encoder",
                     "save_aesthetic_embedding"], ".aesthetic"),
    **dict.fromkeys(["AppliedDelta", "apply_lora"], ".apply"),
    **dict.fromkeys(["CustomDiffusionHandle", "apply_custom_diffusion", "merge_custom_diffusion",
                     "save_custom_diffusion"], ".custom_diffusion"),
    **dict.fromkeys(["Embedding", "EmbeddingHandle", "initial_embedding", "inject_embedding"], ".embeddings"),
    **dict.fromkeys(["WeightFileError", "load_lora", "save_lora"], ".formats"),
    "load_custom_diffusion": ".formats.custom_diffusion",
    **dict.fromkeys(["load_embedding", "save_embedding"], ".formats.embeddings"),
    **dict.fromkeys(["Hypernetwork", "HypernetworkConfig", "HypernetworkHandle", "inject_hypernetwork",
                     "load_hypernetwork", "save_hypernetwork"], ".hypernetworks"),
    **dict.fromkeys(["AdapterHandle", "adapter_names", "inject", "load_adapter"], ".inject"),
    **dict.fromkeys(["ImageVectors", "Inversion", "clip_invert", "generate_with_vectors", "invert_image",
                     "load_image_vectors", "load_inversion", "regenerate_image", "save_image_vectors",
                     "save_inversion"], ".inversion"),
    **dict.fromkeys(["NoTargetsError", "by_name", "by_regex", "by_type", "select"], ".targets"),
    **dict.fromkeys(["StepConfig", "TrainState", "train_step"], ".training"),
}


def _load(name: str) -> Any:
    """The public ``name``, imported from its submodule (:data:`_LAZY`)."""
    module = importlib.import_module(_LAZY[name], __name__)
    return module if name in _MODULES else getattr(module, name)


def __getattr__(name: str) -> Any:
    """PEP 562: load a public name (:data:`_LAZY`) on first use and keep it. Any other submodule
    (``sdadapt.errors``, ``sdadapt.jobs``) is imported on first use too, as the package's eager imports used to
    make them reachable as attributes."""
    if name in _LAZY:
        value = _load(name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, loaded or not, the dunder attributes and the submodules imported so far (not the names
    this file imports for its own work: ``importlib``, ``sys``, ``types``, ``Any``)."""
    ours = {name for name, value in globals().items()
            if name.startswith("__") or (isinstance(value, types.ModuleType) and value.__name__.startswith(f"{__name__}."))}
    return sorted(ours | set(__all__))


class _Package(types.ModuleType):
    """sdadapt's module type, for the one public name that is also a submodule's: ``sdadapt.inject`` is the
    function :func:`sdadapt.inject.inject`. Importing the submodule ``sdadapt.inject`` (``from sdadapt.inject
    import ...``, or any module that does) makes the import system ``setattr`` the module on its package; an eager
    ``from .inject import inject`` used to overwrite that before anyone looked, a lazy package must ignore it. (A
    module's class may be replaced: Python data model, "Customizing module attribute access".)"""

    @property
    def inject(self) -> Any:
        value = self.__dict__.get("inject")
        if value is None or isinstance(value, types.ModuleType):
            value = self.__dict__["inject"] = _load("inject")
        return value

    @inject.setter
    def inject(self, value: Any) -> None:  # (the import system's submodule is stored, and read as the function)
        self.__dict__["inject"] = value

    @inject.deleter
    def inject(self) -> None:
        self.__dict__.pop("inject", None)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "__version__",
    "targets",
    "formats",
    "merge",
    "loratools",
    "training",
    "hypernetworks",
    "train_step",
    "StepConfig",
    "TrainState",
    "LoRAConfig",
    "LoRAModule",
    "lora_delta_weight",
    "lora_forward",
    "LoHaConfig",
    "LoKrConfig",
    "DoRAConfig",
    "FullConfig",
    "IA3Config",
    "OFTConfig",
    "GLoRAConfig",
    "NormConfig",
    "inject",
    "load_adapter",
    "adapter_names",
    "AdapterHandle",
    "batch_shared_input_adapters",
    "SharedInputBatching",
    "apply_lora",
    "AppliedDelta",
    "load_lora",
    "save_lora",
    "WeightFileError",
    "Hypernetwork",
    "HypernetworkConfig",
    "HypernetworkHandle",
    "load_hypernetwork",
    "save_hypernetwork",
    "inject_hypernetwork",
    "embeddings",
    "Embedding",
    "EmbeddingHandle",
    "load_embedding",
    "save_embedding",
    "inject_embedding",
    "initial_embedding",
    "inversion",
    "Inversion",
    "invert_image",
    "regenerate_image",
    "save_inversion",
    "load_inversion",
    "ImageVectors",
    "clip_invert",
    "generate_with_vectors",
    "save_image_vectors",
    "load_image_vectors",
    "aesthetic",
    "aesthetic_embedding",
    "load_aesthetic_embedding",
    "save_aesthetic_embedding",
    "personalize_text_encoder",
    "aesthetic_sample",
    "custom_diffusion",
    "CustomDiffusionHandle",
    "apply_custom_diffusion",
    "save_custom_diffusion",
    "load_custom_diffusion",
    "merge_custom_diffusion",
    "NoTargetsError",
    "by_name",
    "by_regex",
    "by_type",
    "select",
]
