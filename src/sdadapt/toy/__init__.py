"""A tiny but real text-to-image system shipped inside the package (no downloads).

Coloured shapes on plain backgrounds (:mod:`.shapes`), a word-level tokenizer with spare tokens
(:mod:`.tokenizer`), a CLIP-structured text encoder (:mod:`.text_encoder`), a diffusers-named
conditional UNet (:mod:`.unet`), a judge CLIP (:mod:`.clip`) and the system tying them together
(:mod:`.system`). ``load_toy()`` returns the pretrained system; ``python -m sdadapt.toy.pretrain``
rebuilds its weights. ``load_toy_image()`` returns its image-embedding-conditioned variant
(:mod:`.image_variant`, rebuilt by ``python -m sdadapt.toy.image_variant``).
"""

from .clip import ToyCLIP
from .shapes import HELD_OUT_COLOURS, HELD_OUT_SHAPES, Scene, render, sample_scenes, scene_batch
from .system import DEFAULT_WEIGHTS, IMAGE_WEIGHTS, ToySystem, build_toy, load_toy, load_toy_image, save_toy
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer
from .unet import ToyUNet

__all__ = [
    "ToySystem",
    "ToyUNet",
    "ToyTextEncoder",
    "ToyCLIP",
    "ToyTokenizer",
    "Scene",
    "render",
    "sample_scenes",
    "scene_batch",
    "HELD_OUT_SHAPES",
    "HELD_OUT_COLOURS",
    "DEFAULT_WEIGHTS",
    "IMAGE_WEIGHTS",
    "load_toy_image",
    "build_toy",
    "load_toy",
    "save_toy",
]
