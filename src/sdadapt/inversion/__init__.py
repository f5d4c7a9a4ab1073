"""Inversion: find the conditioning that reproduces real images.

* :mod:`.core` — pure functions over any ``model(x, t, cond)``: the guided DDIM step, the
  null-text objective, the pivot, null-text optimisation, negative-prompt embeddings, PSNR; the
  step rules :class:`DDIMSteps` / :class:`EDMSteps` (an EDM model, Playground v2.5: the Euler ODE).
* :mod:`.invert` — one image: :func:`invert_image` / :func:`invert_latents` -> :class:`Inversion`,
  :func:`save_inversion` / :func:`load_inversion`, :func:`regenerate_image` / :func:`sample_inversion`
  (reconstruction and edits, bit-identical on rerun).
* :mod:`.clip` — CLIP inversion: vectors in an image-embedding conditioning space learnt from a
  few images (toy image variant, SD 2.1 unCLIP UNets, image-variation UNets).
* :mod:`.variation` — :func:`load_image_variation`: a lambdalabs image-variation diffusers folder
  (no text encoder) as the system CLIP inversion needs.
* :mod:`.job` — :func:`~.job.run_invert`, the job behind ``python -m sdadapt invert`` (import it
  from ``sdadapt.inversion.job``).
* :mod:`.clip_job` — :func:`~.clip_job.run_clip_invert` / :func:`~.clip_job.run_generate_image_vectors`,
  the jobs behind ``python -m sdadapt clip-invert`` and ``generate --image-vectors`` (import them from
  ``sdadapt.inversion.clip_job``).
"""

from .clip import (
    SITES,
    ImageConditioning,
    ImageVectors,
    NoImageConditioningError,
    clip_image_encoder,
    clip_invert,
    clip_pixel_values,
    generate_with_vectors,
    image_conditioning,
    image_variation_conditioning,
    learn_image_vectors,
    load_image_vectors,
    noise_image_embeddings,
    sample_image_vectors,
    save_image_vectors,
    toy_image_conditioning,
    unclip_image_conditioning,
)
from .core import (
    Composed,
    ConditionPlan,
    DDIMSteps,
    EDMSteps,
    ddim_pivot,
    guided_ddim_step,
    inversion_steps,
    negative_prompt_embeddings,
    null_text_objective,
    null_text_optimize,
    null_text_optimize_entries,
    psnr,
    sample_with_embeddings,
)
from .invert import (
    INVERSION_METHODS,
    Inversion,
    invert_image,
    invert_latents,
    load_inversion,
    regenerate_image,
    sample_inversion,
    save_inversion,
)
from .variation import ImageVariationSystem, load_image_variation

__all__ = [
    # one image (null-text / negative-prompt / DDIM inversion)
    "INVERSION_METHODS",
    "Inversion",
    "invert_image",
    "invert_latents",
    "regenerate_image",
    "sample_inversion",
    "save_inversion",
    "load_inversion",
    # pure pieces
    "Composed",
    "ConditionPlan",
    "guided_ddim_step",
    "null_text_objective",
    "DDIMSteps",
    "EDMSteps",
    "inversion_steps",
    "ddim_pivot",
    "null_text_optimize",
    "null_text_optimize_entries",
    "negative_prompt_embeddings",
    "sample_with_embeddings",
    "psnr",
    # CLIP inversion
    "SITES",
    "ImageConditioning",
    "ImageVectors",
    "NoImageConditioningError",
    "image_conditioning",
    "toy_image_conditioning",
    "unclip_image_conditioning",
    "image_variation_conditioning",
    "ImageVariationSystem",
    "load_image_variation",
    "noise_image_embeddings",
    "learn_image_vectors",
    "sample_image_vectors",
    "clip_invert",
    "clip_image_encoder",
    "clip_pixel_values",
    "generate_with_vectors",
    "save_image_vectors",
    "load_image_vectors",
]
