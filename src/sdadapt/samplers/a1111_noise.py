"""AUTOMATIC1111's noise: the same seed gives A1111's start noise and sampler noise (``modules/rng.py``).

A1111 gives every image of a batch its own generator, seeded with the image's seed (``seed + i``), and draws
from it (its ``ImageRNG``):

* the start noise (C, H, W) — the image generator's first draw; then, with a variation seed (``subseed``,
  ``subseed_strength`` ≠ 0), the subseed's first draw mixed in by A1111's :func:`slerp`; with
  ``seed_resize_from`` (A1111's "Resize seed from width/height"), the noise of that size pasted into the
  middle of the full-size draw (:func:`paste_centre`);
* every later draw (``ImageRNG.next``: what k-diffusion's ``torch.randn_like`` returns in A1111, the ancestral
  samplers' noise, Restart's, DPM fast/adaptive's) — the next draw of the image generator, or, with an
  "Eta noise seed delta" (ENSD, ``eta_noise_seed_delta``) ≠ 0, of a fresh generator seeded ``seed + ENSD``.

The generator is A1111's setting "Random number generator source" (``randn_source``):

* ``"nv"`` ("NV"; A1111's default "GPU" on an NVIDIA card draws the same numbers): CUDA's
  ``torch.randn`` — Philox4x32-10 keyed by the seed, counter (draw, 0, index, 0), one normal per counter by
  Box–Muller of its first two words (``rng_philox.py``) — drawn here on any device (:class:`PhiloxGenerator`;
  bit for bit A1111's NV, CUDA's own numbers to an ulp or two: CUDA's Box–Muller runs in float32);
* ``"cpu"`` ("CPU"): ``torch.randn`` from ``torch.Generator("cpu").manual_seed(seed)``.

The Brownian-tree samplers (DPM++ SDE, 2M SDE, 3M SDE) take no draws from these generators in A1111: their
trees are seeded with the images' seeds (``BrownianTreeNoiseSampler(x, σ_min, σ_max, seed=seeds)``):
:attr:`A1111Noise.seeds`; every draw inside a tree is A1111's :func:`randn_local` from the same source (A1111
replaces torchsde's ``_randn`` with it), not torchsde's own generator on the sample's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["NOISE_SOURCES", "A1111Noise", "A1111Seeds", "PhiloxGenerator", "check_noise_source", "paste_centre",
           "philox_randn", "randn_local", "slerp"]

#: A1111's "Random number generator source" values taken here (``"nv"``: what A1111's default "GPU" draws on
#: an NVIDIA card, on any device; ``"cpu"``: a CPU ``torch.Generator``)
NOISE_SOURCES: tuple[str, ...] = ("nv", "cpu")


def check_noise_source(source: object, *, or_none: bool = False) -> str:
    """``source`` as a name in :data:`NOISE_SOURCES` (any case, surrounding spaces dropped).

    Raises:
        ValueError: another value, naming the sources (and ``None`` when the caller takes it: ``or_none``).
    """
    key = str(source).strip().lower()
    if key not in NOISE_SOURCES:
        raise ValueError(f"unknown noise source {source!r}; use one of {', '.join(NOISE_SOURCES)}"
                         + (" (or None)" if or_none else ""))
    return key

_MASK32 = np.uint64(0xFFFFFFFF)
_MUL = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))  # Philox4x32's round multipliers
_WEYL = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))  # its key increments (golden ratio, √3 − 1)
# Box–Muller's scales, rounded to float32 as CUDA's curand (and A1111's rng_philox) hold them
_INV_2_32 = float(np.float32(2.3283064e-10))
_INV_2_32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def _mul_hi_lo(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit product of uint32 words ``a`` (n,) and ``m``, as its (high, low) uint32 halves."""
    product = a.astype(np.uint64) * m
    return (product >> np.uint64(32)).astype(np.uint32), (product & _MASK32).astype(np.uint32)


def _philox4x32_10(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
                   k0: np.uint32, k1: np.uint32) -> tuple[np.ndarray, np.ndarray]:
    """Philox4x32 with 10 rounds on the counters (c0, c1, c2, c3) (n,) uint32 and key (k0, k1); returns
    the first two output words (the only ones Box–Muller reads)."""
    with np.errstate(over="ignore"):
        for round_ in range(10):
            if round_:
                k0, k1 = np.uint32(k0 + _WEYL[0]), np.uint32(k1 + _WEYL[1])
            hi0, lo0 = _mul_hi_lo(c0, _MUL[0])
            hi1, lo1 = _mul_hi_lo(c2, _MUL[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1


def philox_randn(seed: int, shape: Sequence[int], *, offset: int = 0) -> Tensor:
    """Unit normal noise of ``shape`` (float32, CPU) as CUDA's ``torch.randn(shape)`` draws it after
    ``torch.manual_seed(seed)`` (A1111's "NV" source): element k is Box–Muller of the first two words of
    Philox4x32-10 at counter ``(offset, 0, k, 0)`` and key ``seed`` (64 bits: low, high words).
    ``offset``: how many tensors the generator drew before (A1111's ``Generator.offset``). Bit for bit A1111's
    ``rng_philox``; CUDA's own numbers to an ulp or two (its Box–Muller runs in float32 ``logf``/``sinf``, this
    one in float64 rounded to float32, as A1111's).

    Raises:
        ValueError: a negative seed or offset, or more than 2³² elements.
    """
    if int(seed) < 0 or int(offset) < 0:
        raise ValueError(f"philox_randn: seed and offset must be >= 0, got seed={seed}, offset={offset}")
    size = 1
    for dim in shape:
        size *= int(dim)
    if size > 2**32:
        raise ValueError(f"philox_randn: at most 2^32 numbers per draw, got {size}")
    key = int(seed) & 0xFFFFFFFFFFFFFFFF
    index = np.arange(size, dtype=np.uint64).astype(np.uint32)
    zeros = np.zeros(size, dtype=np.uint32)
    first = np.full(size, int(offset) & 0xFFFFFFFF, dtype=np.uint32)
    w0, w1 = _philox4x32_10(first, zeros, index, zeros, np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32))
    # Box–Muller, first of the pair (float64 math on the float32 scales, then float32, as A1111's numpy does)
    u = w0.astype(np.float64) * _INV_2_32 + _INV_2_32 / 2
    v = w1.astype(np.float64) * _INV_2_32_2PI + _INV_2_32_2PI / 2
    normal = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)
    return torch.from_numpy(normal.reshape(tuple(int(d) for d in shape)))


class PhiloxGenerator:
    """A1111's ``rng_philox.Generator``: CUDA's ``torch.randn`` stream of one seed on any device; each
    :meth:`randn` is the next tensor (:func:`philox_randn` at the next offset)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> Tensor:
        """The next draw: (shape) float32 CPU."""
        out = philox_randn(self.seed, shape, offset=self.offset)
        self.offset += 1
        return out


def randn_local(seed: int, shape: Sequence[int], *, source: str = "nv") -> Tensor:
    """A1111's ``randn_local``: the first draw (shape) float32 CPU of a generator newly seeded with ``seed`` from
    ``source`` (``"nv"``: :func:`philox_randn`; ``"cpu"``: ``torch.Generator("cpu").manual_seed(seed)``). A1111
    draws its variation and resized-seed noise this way, and every draw of its Brownian trees (it replaces
    torchsde's ``_randn`` with this).

    Raises:
        ValueError: an unknown source.
    """
    if source == "nv":
        return philox_randn(int(seed), shape)
    if source == "cpu":
        return torch.randn(tuple(int(d) for d in shape), generator=torch.Generator("cpu").manual_seed(int(seed)),
                           dtype=torch.float32)
    raise ValueError(f"unknown noise source {source!r}; use one of {', '.join(NOISE_SOURCES)}")


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's ``slerp`` of one image's noises ``low`` (the seed's) and ``high`` (the variation seed's),
    (C, H, W) each, at ``val`` (the variation strength), as A1111 computes it: the norms are taken along
    dim 1 (H), so the angle ω is one per (channel, column), ``(sin((1−val)ω)·low + sin(val·ω)·high)/sin ω``;
    where the mean cosine is above 0.9995 A1111 returns ``low·val + high·(1 − val)`` (its weights, kept)."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1) * low + \
        (torch.sin(val * omega) / sin_omega).unsqueeze(1) * high


def paste_centre(small: Tensor, full: Tensor) -> Tensor:
    """A1111's "Resize seed from": ``small`` (C, h, w) centred on ``full`` (C, H, W) — pasted into its middle
    where smaller, its middle cut out where larger (offsets ``(H − h)//2``, ``(W − w)//2``); a new tensor."""
    out = full.clone()
    H, W = full.shape[1], full.shape[2]
    h, w = small.shape[1], small.shape[2]
    top, left = (H - h) // 2, (W - w) // 2
    rows, cols = (h if top >= 0 else h + 2 * top), (w if left >= 0 else w + 2 * left)
    dst_y, dst_x = max(top, 0), max(left, 0)
    src_y, src_x = max(-top, 0), max(-left, 0)
    out[:, dst_y:dst_y + rows, dst_x:dst_x + cols] = small[:, src_y:src_y + rows, src_x:src_x + cols]
    return out


class A1111Noise:
    """A1111's noise for one batch (its ``ImageRNG``): pass it as the samplers' ``generator``.

    Args:
        seeds: one seed per image (A1111: ``seed + i``).
        source: ``"nv"`` or ``"cpu"`` (:data:`NOISE_SOURCES`).
        subseeds: the variation seeds, one per image (A1111: ``subseed + i``; an image past the list gets 0).
        subseed_strength: A1111's "Variation strength" (0: none).
        seed_resize_from: ``(height, width)`` in pixels (A1111's "Resize seed from"; latent size = pixels // 8);
            ``None`` or a 0 in it: off.
        ensd: A1111's "Eta noise seed delta": the draws after the start noise come from ``seed + ensd``.

    :meth:`start_noise` must come first (A1111's first ``ImageRNG.next``); :meth:`next_noise` gives each
    later draw.

    Raises:
        ValueError: no seeds, an unknown source, a negative seed.
    """

    def __init__(self, seeds: Sequence[int], *, source: str = "nv", subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                 ensd: int = 0) -> None:
        if not seeds:
            raise ValueError("A1111Noise needs one seed per image, got none")
        key = check_noise_source(source)
        if any(int(s) < 0 for s in seeds):
            raise ValueError(f"seeds must be >= 0 (A1111's seeds are), got {list(seeds)}")
        if subseeds is not None and any(int(s) < 0 for s in subseeds):
            raise ValueError(f"subseeds (A1111's variation seeds) must be >= 0, got {list(subseeds)}")
        if any(int(s) + int(ensd or 0) < 0 for s in seeds):
            raise ValueError(f"seed + ensd must be >= 0 for every image (the sampler noise's seeds), got seeds "
                             f"{list(seeds)} and ensd {ensd}")
        self.seeds = tuple(int(s) for s in seeds)
        self.source = key
        self.subseeds = None if subseeds is None else tuple(int(s) for s in subseeds)
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from = tuple(seed_resize_from) if seed_resize_from else (0, 0)
        self.ensd = int(ensd or 0)
        self._generators = [self._generator(s) for s in self.seeds]
        self._shape: tuple[int, ...] | None = None

    def _generator(self, seed: int):
        return PhiloxGenerator(seed) if self.source == "nv" else torch.Generator("cpu").manual_seed(int(seed))

    def _draw(self, generator, shape: Sequence[int]) -> Tensor:
        if isinstance(generator, PhiloxGenerator):
            return generator.randn(shape)
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

    def _fresh(self, seed: int, shape: Sequence[int]) -> Tensor:
        """A1111's ``randn(seed, shape)`` without a generator: the first draw of a newly seeded one."""
        return randn_local(seed, shape, source=self.source)

    def start_noise(self, shape: Sequence[int]) -> Tensor:
        """The start noise (B, C, H, W) float32 CPU (unit variance; the sampler scales it by σ_max), B = the
        number of seeds; sets up the generators for :meth:`next_noise`.

        Raises:
            ValueError: ``shape`` is not (B, C, H, W) with B = ``len(seeds)``.
        """
        if len(shape) != 4 or int(shape[0]) != len(self.seeds):
            raise ValueError(f"A1111Noise: start noise shape must be ({len(self.seeds)}, C, H, W), got {tuple(shape)}")
        image = tuple(int(d) for d in shape[1:])
        rh, rw = self.seed_resize_from
        small = image if rh <= 0 or rw <= 0 else (image[0], rh // 8, rw // 8)
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self._generators)):
            sub = None
            if self.subseeds is not None and self.subseed_strength != 0:
                sub = self._fresh(self.subseeds[i] if i < len(self.subseeds) else 0, small)
            noise = self._fresh(seed, small) if small != image else self._draw(generator, image)
            if sub is not None:
                noise = slerp(self.subseed_strength, noise, sub)
            if small != image:
                noise = paste_centre(noise, self._draw(generator, image))
            images.append(noise)
        if self.ensd:
            self._generators = [self._generator(s + self.ensd) for s in self.seeds]
        self._shape = image
        return torch.stack(images)

    def next_noise(self, like: Tensor | None = None) -> Tensor:
        """The next draw of every image (B, C, H, W) float32 CPU: k-diffusion's ``randn_like`` in A1111.
        ``like``: the sample it is for (its shape is checked).

        Raises:
            RuntimeError: before :meth:`start_noise`.
            ValueError: ``like`` of another shape than the start noise.
        """
        if self._shape is None:
            raise RuntimeError("A1111Noise: draw the start noise (start_noise) before the samplers' noise")
        if like is not None and tuple(like.shape) != (len(self.seeds), *self._shape):
            raise ValueError(f"A1111Noise: noise for shape {tuple(like.shape)} asked, the batch is "
                             f"{(len(self.seeds), *self._shape)}")
        return torch.stack([self._draw(g, self._shape) for g in self._generators])


@dataclass(frozen=True)
class A1111Seeds:
    """How a run draws A1111's noise (the ``generate`` options ``--noise a1111``/``a1111-cpu``, ``--subseed``,
    ``--subseed-strength``, ``--seed-resize-from``, ``--ensd``); :meth:`for_batch` makes a batch's
    :class:`A1111Noise`. ``subseed``: the first image's variation seed (A1111: ``subseed + i`` for image i);
    ``seed_resize_from``: ``(height, width)`` in pixels or ``None``."""

    source: str = "nv"
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    ensd: int = 0

    def __post_init__(self) -> None:
        check_noise_source(self.source)
        if not 0.0 <= float(self.subseed_strength) <= 1.0:
            raise ValueError(f"subseed_strength must be in [0, 1] (A1111's 'Variation strength'), "
                             f"got {self.subseed_strength}")
        if self.subseed_strength and self.subseed is None:
            raise ValueError("subseed_strength needs a subseed (A1111's 'Variation seed')")
        if self.subseed is not None and int(self.subseed) < 0:
            raise ValueError(f"subseed must be >= 0 (A1111's variation seeds are), got {self.subseed}")

    def for_batch(self, seed: int, batch: int) -> A1111Noise:
        """The noise of ``batch`` images with seeds ``seed, seed + 1, …`` — or ``seed`` for every image when the
        variation strength is not 0, the images then differing by their variation seeds ``subseed, subseed + 1, …``
        (A1111's ``process_images_inner``: ``all_seeds = [seed + (x if subseed_strength == 0 else 0) ...]``)."""
        subseeds = None if self.subseed is None else [int(self.subseed) + i for i in range(batch)]
        step = 0 if self.subseed_strength else 1
        return A1111Noise([int(seed) + i * step for i in range(batch)], source=self.source, subseeds=subseeds,
                          subseed_strength=self.subseed_strength, seed_resize_from=self.seed_resize_from,
                          ensd=self.ensd)
