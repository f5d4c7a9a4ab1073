"""Aesthetic gradients (Gallego 2022): personalise the text encoder toward a mean CLIP image
embedding for a few steps at generation time (see ``docs/aesthetic-gradients.md``).

* :mod:`.embedding` — :func:`aesthetic_embedding` (the mean image embedding of a set of images)
  and :func:`aesthetic_embedding_from_folder`;
* :mod:`.personalize` — :func:`personalize_text_encoder`, functional (no copy of the encoder),
  the loss, A1111's weight/slerp mixing and "aesthetic text" rotation;
* :mod:`.clip` — a real CLIP's text projection from a local checkpoint
  (:func:`load_text_projection`; SD1 checkpoints lack it) and image preprocessing;
* :mod:`.system` — the same on a whole system: :func:`aesthetic_conditioning`,
  :func:`aesthetic_sample`, and the toy model's fitted text projection :func:`toy_text_projection`.

Files: :func:`sdadapt.load_aesthetic_embedding` / :func:`sdadapt.save_aesthetic_embedding`
(:mod:`sdadapt.formats.aesthetic`).
"""

from ..formats.aesthetic import (
    AESTHETIC_KEY,
    load_aesthetic_embedding,
    save_aesthetic_embedding,
)
from .clip import CLIP_MEAN, CLIP_STD, clip_image_preprocess, load_text_projection
from .embedding import aesthetic_embedding, aesthetic_embedding_from_folder, image_files
from .personalize import (
    aesthetic_loss,
    default_tune,
    mix_conditioning,
    normalize_embedding,
    personalize_text_encoder,
    rotate_toward_text,
    slerp,
    text_features,
)
from .system import (
    aesthetic_conditioning,
    aesthetic_sample,
    system_projection,
    toy_text_projection,
)

__all__ = [
    "AESTHETIC_KEY",
    "load_aesthetic_embedding",
    "save_aesthetic_embedding",
    "aesthetic_embedding",
    "aesthetic_embedding_from_folder",
    "image_files",
    "personalize_text_encoder",
    "aesthetic_loss",
    "slerp",
    "mix_conditioning",
    "rotate_toward_text",
    "normalize_embedding",
    "text_features",
    "default_tune",
    "aesthetic_conditioning",
    "aesthetic_sample",
    "toy_text_projection",
    "system_projection",
    "load_text_projection",
    "clip_image_preprocess",
    "CLIP_MEAN",
    "CLIP_STD",
]
