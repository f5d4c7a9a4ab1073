"""sdadapt: every way to adapt Stable-Diffusion-style models, on any UNet or text encoder.

Quick start::

    import sdadapt
    handle = sdadapt.inject(unet, sdadapt.targets.UNET_KOHYA, sdadapt.LoRAConfig(rank=8, alpha=4))
    ...train handle.parameters()...
    sdadapt.formats.save_kohya("my_lora.safetensors", {"unet": handle.state_dict()})
"""

from . import aesthetic, custom_diffusion, embeddings, formats, hypernetworks, inversion, loratools, merge, targets, training
from .adapters import (
    DoRAConfig,
    FullConfig,
    GLoRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoRAConfig,
    LoRAModule,
    NormConfig,
    OFTConfig,
    SharedInputBatching,
    batch_shared_input_adapters,
    lora_delta_weight,
    lora_forward,
)
from .aesthetic import (
    aesthetic_embedding,
    aesthetic_sample,
    load_aesthetic_embedding,
    personalize_text_encoder,
    save_aesthetic_embedding,
)
from .apply import AppliedDelta, apply_lora
from .custom_diffusion import (
    CustomDiffusionHandle,
    apply_custom_diffusion,
    merge_custom_diffusion,
    save_custom_diffusion,
)
from .embeddings import Embedding, EmbeddingHandle, initial_embedding, inject_embedding
from .formats import WeightFileError, load_lora, save_lora
from .formats.custom_diffusion import load_custom_diffusion
from .formats.embeddings import load_embedding, save_embedding
from .hypernetworks import (
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkHandle,
    inject_hypernetwork,
    load_hypernetwork,
    save_hypernetwork,
)
from .inject import AdapterHandle, adapter_names, inject, load_adapter
from .inversion import (
    ImageVectors,
    Inversion,
    clip_invert,
    generate_with_vectors,
    invert_image,
    load_image_vectors,
    load_inversion,
    regenerate_image,
    save_image_vectors,
    save_inversion,
)
from .targets import NoTargetsError, by_name, by_regex, by_type, select
from .training import StepConfig, TrainState, train_step

__version__ = "0.1.0"

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
