"""Teaching data and scores for held-out toy concepts (the demo and the quality benchmark).

Scores follow the DreamBooth / textual-inversion papers with the toy judge CLIP in place of
CLIP/DINO: *concept accuracy* (zero-shot: is the generated image's shape — or colour — the taught
one), *image-image* similarity (mean cosine between generated and training images' embeddings),
*image-text* similarity (mean cosine between each generated image and its prompt), and *prior
accuracy* (held-in prompts such as "a red circle": are both attributes still right — drift shows
as a drop).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .shapes import COLOURS, HELD_OUT_COLOURS, HELD_OUT_SHAPES, SHAPES, Scene, sample_scenes, scene_batch
from .tokenizer import ToyTokenizer

__all__ = ["CONCEPTS", "concept_data", "concept_prompts", "class_prompts", "score"]

CONCEPTS = HELD_OUT_SHAPES + HELD_OUT_COLOURS
_HELD_IN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
_HELD_IN_COLOURS = tuple(c for c in COLOURS if c not in HELD_OUT_COLOURS)


def _attribute(concept: str) -> str:
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    raise ValueError(f"unknown concept {concept!r}; toy concepts are the shapes {list(SHAPES)} and colours {list(COLOURS)}")


def concept_data(concept: str, count: int, *, seed: int = 0) -> tuple[Tensor, list[str]]:
    """``count`` images (N, 3, 32, 32) of ``concept`` (with held-in other attributes) + captions."""
    if _attribute(concept) == "shape":
        scenes = sample_scenes(count, seed=seed, shapes=(concept,), colours=_HELD_IN_COLOURS)
    else:
        scenes = sample_scenes(count, seed=seed, shapes=_HELD_IN_SHAPES, colours=(concept,))
    return scene_batch(scenes, seed=seed, drop_parts=0.5)


def concept_prompts(concept: str) -> list[tuple[str, Scene]]:
    """Evaluation prompts: the concept with every held-in value of the other attribute."""
    if _attribute(concept) == "shape":
        return [(f"a {c} {concept}", Scene(concept, c)) for c in _HELD_IN_COLOURS]
    return [(f"a {concept} {s}", Scene(s, concept)) for s in _HELD_IN_SHAPES]


def class_prompts(count: int, *, seed: int = 0) -> list[str]:
    """Prompts for prior-preservation class images on the toy model: random held-in "a {colour} {shape}".

    The toy world has no single class noun ("dog"); its class is "a coloured shape", so the
    regularisation set is what the unadapted model draws for held-in shapes and colours.
    """
    return [f"a {s.colour} {s.shape}" for s in sample_scenes(count, seed=seed + 77)]


@torch.no_grad()
def score(system, concept: str, train_images: Tensor, *, seeds: tuple[int, ...] = (0, 1), steps: int = 25,
          prior_count: int = 12, sampler: Callable[..., Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
    """Scores of ``system`` on ``concept`` and the generated concept images (for grids).

    ``sampler(prompts, seed=, steps=)`` draws the images (default ``system.sample``; an adaptation
    that samples its own way, as DreamArtist with its learned negative, passes its ``sample``).
    The judge reads prompts with its own, unmodified vocabulary (words an embedding method added
    to ``system.tokenizer`` do not reach it).

    Returns ``({"concept_accuracy", "image_image", "image_text", "prior_accuracy"}, images (N,3,32,32))``.
    """
    clip, attribute = system.clip, _attribute(concept)
    sample = sampler or system.sample
    pairs = concept_prompts(concept)
    prompts = [p for p, _ in pairs] * len(seeds)
    images = torch.cat([sample([p for p, _ in pairs], seed=s, steps=steps) for s in seeds])
    predicted = clip.classify(images, attribute=attribute)
    gen = clip.encode_image(images)
    real = clip.encode_image(train_images)
    text = clip.encode_text(ToyTokenizer()(prompts).to(gen.device))
    prior_scenes = sample_scenes(prior_count, seed=1234)
    prior_images = sample([f"a {s.colour} {s.shape}" for s in prior_scenes], seed=99, steps=steps)
    shapes = clip.classify(prior_images, attribute="shape")
    colours = clip.classify(prior_images, attribute="colour")
    scores = {
        "concept_accuracy": sum(p == concept for p in predicted) / len(predicted),
        "image_image": float((gen @ real.T).mean()),
        "image_text": float((gen * text).sum(-1).mean()),
        "prior_accuracy": sum(a == s.shape and b == s.colour for a, b, s in zip(shapes, colours, prior_scenes)) / prior_count,
    }
    return scores, images
