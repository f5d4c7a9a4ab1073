"""The toy world: coloured shapes on plain backgrounds, rendered deterministically from a seed.

An image is a 32x32 RGB picture of one shape (circle, square, triangle, diamond, ring, cross) in one
colour, of one size, at one position, on one background; its caption names them in a fixed
grammar ("a large red circle on the left on a gray background"), with parts randomly left out so
short prompts ("a red circle") are in distribution. Rendering supersamples 4x4 per pixel, so
edges are anti-aliased and every image is a pure function of its attributes and jitter.

The pretrained toy model never sees :data:`HELD_OUT_SHAPES` or :data:`HELD_OUT_COLOURS`: they
are what adaptation methods must teach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "HELD_OUT_SHAPES",
    "HELD_OUT_COLOURS",
    "IMAGE_SIZE",
    "Scene",
    "render",
    "caption",
    "random_scene",
    "sample_scenes",
    "scene_batch",
    "is_held_out",
]

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "orange": (0.98, 0.55, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "purple": (0.60, 0.15, 0.80),
}
SIZES = {"small": 5.5, "large": 9.0}  # radius in pixels
POSITIONS = {"center": (16.0, 16.0), "left": (10.0, 16.0), "right": (22.0, 16.0), "top": (16.0, 10.0), "bottom": (16.0, 22.0)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95)}
HELD_OUT_SHAPES = ("cross",)
HELD_OUT_COLOURS = ("purple",)


@dataclass(frozen=True)
class Scene:
    """One image's attributes; ``jitter`` (dx, dy) in pixels moves the shape a little."""

    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    background: str = "black"
    jitter: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
            (self.background, BACKGROUNDS, "background"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {list(allowed)}")


def is_held_out(scene: Scene) -> bool:
    return scene.shape in HELD_OUT_SHAPES or scene.colour in HELD_OUT_COLOURS


def _mask(shape: str, dx: Tensor, dy: Tensor, r: float) -> Tensor:
    """Inside-shape indicator over offset grids (y grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.82
        return (dx.abs() <= s) & (dy.abs() <= s)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= r * 1.1
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (r * 0.55) ** 2)
    if shape == "cross":
        w = r * 0.32
        return ((dx.abs() <= w) & (dy.abs() <= r)) | ((dy.abs() <= w) & (dx.abs() <= r))
    if shape == "triangle":  # upward, apex at top
        h = r * 1.7
        top, bottom = -h * 0.55, h * 0.45
        half_width = (dy - top) / (bottom - top) * r * 1.05
        return (dy >= top) & (dy <= bottom) & (dx.abs() <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, *, supersample: int = 4) -> Tensor:
    """The scene as a (3, 32, 32) float32 image in [-1, 1]."""
    n = IMAGE_SIZE * supersample
    coords = (torch.arange(n, dtype=torch.float64) + 0.5) / supersample  # pixel units
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.jitter[0], cy + scene.jitter[1]
    dy, dx = torch.meshgrid(coords - cy, coords - cx, indexing="ij")
    inside = _mask(scene.shape, dx, dy, SIZES[scene.size]).double()
    cover = inside.reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample).mean(dim=(1, 3))  # (32, 32)
    fg = torch.tensor(COLOURS[scene.colour], dtype=torch.float64)[:, None, None]
    bg = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float64)[:, None, None]
    image = bg * (1 - cover) + fg * cover
    return (image * 2 - 1).float()


def caption(scene: Scene, *, parts: tuple[bool, bool, bool] = (True, True, True)) -> str:
    """"a [size] colour shape [on the position | in the center] [on a bg background]"; ``parts``
    says which of size, position and background to mention."""
    words = ["a"]
    if parts[0]:
        words.append(scene.size)
    words += [scene.colour, scene.shape]
    if parts[1]:
        words += ["in", "the", "center"] if scene.position == "center" else ["on", "the", scene.position]
    if parts[2]:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def random_scene(generator: torch.Generator, *, shapes=SHAPES, colours=tuple(COLOURS), jitter: float = 1.0) -> Scene:
    """A uniformly random scene over the given shapes and colours."""

    def pick(options):
        options = list(options)
        return options[int(torch.randint(len(options), (), generator=generator))]

    j = (torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    return Scene(pick(shapes), pick(colours), pick(SIZES), pick(POSITIONS), pick(BACKGROUNDS), (float(j[0]), float(j[1])))


def sample_scenes(count: int, *, seed: int, held_out: bool = False, shapes=None, colours=None) -> list[Scene]:
    """``count`` random scenes; ``held_out=False`` excludes the held-out shapes and colours."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or tuple(s for s in SHAPES if held_out or s not in HELD_OUT_SHAPES)
    colours = colours or tuple(c for c in COLOURS if held_out or c not in HELD_OUT_COLOURS)
    return [random_scene(g, shapes=shapes, colours=colours) for _ in range(count)]


def scene_batch(scenes: list[Scene], *, seed: int, drop_parts: float = 0.5) -> tuple[Tensor, list[str]]:
    """Images (B, 3, 32, 32) and captions; each optional caption part is dropped with ``drop_parts``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([render(s) for s in scenes])
    keep = (torch.rand(len(scenes), 3, generator=g) >= drop_parts).tolist()
    captions = [caption(s, parts=tuple(k)) for s, k in zip(scenes, keep)]  # type: ignore[arg-type]
    return images, captions

