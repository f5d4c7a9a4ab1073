"""CLIP inversion as a registered method: one image-space vector bound to the concept's words.

The learnt vector lives in the model's image-embedding space (:mod:`sdadapt.inversion.clip`);
here it is bound to a trigger word (``token=``, as textual inversion takes it; ``demo`` and the
quality benchmark pass the concept's word) so the shared fit loop, ``train``/``demo`` and the
benchmark can use it: a prompt holding the word is conditioned on the text *and* the vector (the
toy system's ``image_tokens``), a prompt without it is untouched — so held-in prompts cannot
drift. Without a word, the vector is bound to every word the toy generator never saw: the spare
tokens ``<new0>`` … ``<new15>``, ``sks`` and the held-out ``cross`` and ``purple``.

Only systems that can bind image embeddings to words (the toy system) run this method; for a
diffusers unCLIP or image-variation UNet use :func:`sdadapt.inversion.clip_invert` /
:func:`sdadapt.inversion.learn_image_vectors` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..inversion.clip import (
    MODELS_WITH_IMAGE_CONDITIONING,
    ImageVectors,
    NoImageConditioningError,
    image_conditioning,
    save_image_vectors,
)

__all__ = ["ClipInversionAdaptation", "prepare_clip_inversion", "default_concept_words"]


def default_concept_words(system) -> tuple[str, ...]:
    """The toy model's words for new concepts: spare tokens, ``sks``, the held-out shape and colour."""
    from ..toy.shapes import HELD_OUT_COLOURS, HELD_OUT_SHAPES
    from ..toy.tokenizer import SPARE_TOKENS

    return tuple(SPARE_TOKENS) + tuple(HELD_OUT_SHAPES) + tuple(HELD_OUT_COLOURS)


class ClipInversionAdaptation:
    """A zero-initialised vector (E,) in the image-embedding space, bound to ``words``."""

    def __init__(self, system, *, words: tuple[str, ...]) -> None:
        if not hasattr(system, "image_tokens"):
            raise NoImageConditioningError(
                f"{type(system).__name__} cannot bind image embeddings to prompt words (no image_tokens); the "
                f"clip-inversion method runs on the toy system. Models with image-embedding conditioning: "
                f"{MODELS_WITH_IMAGE_CONDITIONING} — use sdadapt.inversion.clip_invert for those"
            )
        conditioning = image_conditioning(system)  # raises with the list of models that have one
        self.system, self.words, self.site = system, words, conditioning.site
        try:
            ids = torch.tensor([system.tokenizer.token_id(w) for w in words], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        device = system.alphas_cumprod.device
        self.vector = nn.Parameter(torch.zeros(conditioning.dim, device=device))
        self._binding = (ids.to(device), self.vector)
        system.image_tokens.append(self._binding)
        self.params: list[nn.Parameter] = [self.vector]

    def image_vectors(self) -> ImageVectors:
        return ImageVectors(vectors=self.vector.detach().float().cpu()[None], site=self.site, tokens=self.words)

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the vector (1, E) with its words and site (:func:`sdadapt.inversion.save_image_vectors`)."""
        return save_image_vectors(path, self.image_vectors(), metadata={"base_model": str(self.system.base_model), **(metadata or {})})

    def remove(self) -> None:
        """Unbind the vector: the system conditions exactly as before."""
        self.system.image_tokens[:] = [b for b in self.system.image_tokens if b[1] is not self.vector]  # (ids may have moved)


def prepare_clip_inversion(system, *, token: str | None = None, words: tuple[str, ...] | None = None) -> ClipInversionAdaptation:
    """Bind a new image-space vector to ``words``, or to the one word ``token`` (the trigger word the
    captions use, as ``textual-inversion`` takes it); default :func:`default_concept_words`.

    Raises:
        NoImageConditioningError: the system has no image-embedding input, or cannot bind one to words.
    """
    if token is not None and words is not None:
        raise ValueError("pass token (one trigger word) or words (several), not both")
    chosen = (token,) if token is not None else tuple(words) if words is not None else default_concept_words(system)
    return ClipInversionAdaptation(system, words=chosen)
