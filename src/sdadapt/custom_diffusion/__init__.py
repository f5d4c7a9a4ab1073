"""Custom Diffusion (Kumari et al. 2023): fine-tuned cross-attention K/V (optionally Q/out) + modifier tokens.

* :mod:`.weights` — the ``attn2`` layers of any UNet (diffusers or LDM names), applying full
  replacement weights at a strength and undoing them bit for bit (:func:`apply_custom_diffusion`);
* :mod:`.concepts` — diffusers' ``--concepts_list`` JSON read into sdadapt's training records and
  class images (:func:`read_concepts_list`, :func:`concept_records`, :func:`concept_class_images`);
* :mod:`.merge` — the paper's closed-form constrained multi-concept merge
  (:func:`merge_custom_diffusion_weights` over tensors, :func:`solve_concepts` once for every weight that
  reads the same features, :func:`merge_custom_diffusion` over files).

Files (diffusers' ``pytorch_custom_diffusion_weights``, modifier-token files, adobe's ``delta.bin``)
are :mod:`sdadapt.formats.custom_diffusion`; training is the ``custom-diffusion`` method
(:mod:`sdadapt.methods.custom_diffusion`). See ``docs/custom-diffusion.md``.
"""

from .concepts import (
    Concept,
    concept_class_images,
    concept_records,
    read_concepts_list,
)
from .merge import (
    ConceptSolve,
    concept_features,
    merge_custom_diffusion,
    merge_custom_diffusion_weights,
    solve_concepts,
)
from .weights import (
    CrossAttentionLayer,
    CustomDiffusionHandle,
    apply_custom_diffusion,
    blend_weight,
    cross_attention_layers,
    save_custom_diffusion,
    unet_custom_diffusion_state,
)

__all__ = [
    "Concept",
    "ConceptSolve",
    "CrossAttentionLayer",
    "CustomDiffusionHandle",
    "apply_custom_diffusion",
    "blend_weight",
    "concept_class_images",
    "concept_features",
    "concept_records",
    "cross_attention_layers",
    "merge_custom_diffusion",
    "merge_custom_diffusion_weights",
    "read_concepts_list",
    "save_custom_diffusion",
    "solve_concepts",
    "unet_custom_diffusion_state",
]
