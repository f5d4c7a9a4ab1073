"""Hypertile: A1111's built-in "Hypertile" (after tfernd's HyperTile) — the self-attention of the UNet's (and the
VAE decoder's) attention layers run on tiles of the image instead of all of it, for speed on large images.

A1111 (``modules/hypertile.py``, ``extensions-builtin/hypertile``) wraps the ``forward`` of the layers named in its
tables: per UNet depth (0: full latent resolution, 1, 2, 3: the middle), the first self-attention ``attn1`` of each
transformer block there (SDXL: its own table), and the VAE decoder's middle attention. Each call splits the layer's
input (B, h·w, C) — the grid (h, w) recovered from the token count and the image's aspect ratio — into nh × nw tiles,
runs the layer on each tile as its own batch entry and puts the tiles back. nh and nw are divisors of h and w picked
by a ``random.Random`` seeded with the run's first seed, among the ``swap_size`` largest tile counts whose tiles are
at least ``max(128, tile)/8 · 2^depth`` latent pixels on a side (``tile``: the largest power of two dividing both
image sides, at most the max tile size); the VAE's tiles are ``max(128, tile)/8`` on 4-D activations, norm and
residual included. A1111 seeds that RNG once per job (its first image's seed) and again before every hires pass, and
leaves the hires pass's configuration in place for a job's later images.

:class:`Hypertile` reproduces that with forward hooks (a pre-hook splits the input, a hook joins the output): no
``forward`` is rebound, no key changes, :meth:`Hypertile.remove` takes it off. The layer names are A1111's tables
in diffusers' names (its LDM names mapped for SDXL, whose table lists LDM names only).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache

from torch import Tensor, nn

from .module_hooks import ModuleHooks

__all__ = ["HYPERTILE_DEFAULTS", "Hypertile", "HypertileSettings", "hypertile_fields", "hypertile_layers",
           "hypertile_options", "largest_tile_size", "tile_counts"]

# A1111's DEPTH_LAYERS (SD1/SD2), its diffusers names: the UNet's attn1 per depth, the VAE decoder's middle attention
_SD_LAYERS = {
    0: [*(f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)),
        *(f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1" for i in range(3))],
    1: [*(f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)),
        *(f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn1" for i in range(3))],
    2: [*(f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)),
        *(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(3))],
    3: ["mid_block.attentions.0.transformer_blocks.0.attn1"],
}
# A1111's DEPTH_LAYERS_XL, its LDM names in diffusers' (input_blocks.4/5 -> down_blocks.1.attentions.0/1,
# input_blocks.7/8 -> down_blocks.2, output_blocks.0-2 -> up_blocks.0, 3-5 -> up_blocks.1, middle_block.1 -> mid_block)
_SDXL_LAYERS = {
    0: [*(f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)),
        *(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(3))],
    1: [*(f"down_blocks.1.attentions.{i}.transformer_blocks.1.attn1" for i in range(2)),
        *(f"up_blocks.1.attentions.{i}.transformer_blocks.1.attn1" for i in range(3)),
        *(f"{block}.attentions.{i}.transformer_blocks.{k}.attn1" for k in range(10)
          for block, i in (("down_blocks.2", 0), ("down_blocks.2", 1), ("up_blocks.0", 0), ("up_blocks.0", 1),
                           ("up_blocks.0", 2)))],
    2: [f"mid_block.attentions.0.transformer_blocks.{k}.attn1" for k in range(10)],
    3: [],
}
_VAE_LAYERS = {0: ["decoder.mid_block.attentions.0"]}


@dataclass(frozen=True)
class HypertileSettings:
    """One model's A1111 Hypertile settings: ``enabled``, ``max_depth`` (0-3), ``max_tile_size`` (pixels),
    ``swap_size`` (how many of the tile counts the RNG picks among; 1: always the largest tiles)."""

    enabled: bool = False
    max_depth: int = 3
    max_tile_size: int = 256
    swap_size: int = 3


#: A1111's defaults: (UNet, VAE) settings (``hypertile_*_unet`` / ``hypertile_*_vae``), both off
HYPERTILE_DEFAULTS = (HypertileSettings(), HypertileSettings(max_tile_size=128))


@cache
def _divisors(value: int, min_value: int, max_options: int) -> tuple[int, ...]:
    max_options = max(1, max_options)
    min_value = min(min_value, value)
    divisors = [i for i in range(min_value, value + 1) if value % i == 0]
    return tuple(value // i for i in divisors[:max_options])


def tile_counts(rng: random.Random, value: int, min_tile: int, swap_size: int) -> int:
    """A1111's ``random_divisor``: how many tiles to cut a side of ``value`` latent pixels into — one of the
    ``swap_size`` largest counts whose tiles are at least ``min_tile`` (the whole side when it is shorter), drawn with
    ``rng.randint`` (one draw even when there is one choice, as A1111)."""
    counts = _divisors(value, min_tile, swap_size)
    return counts[rng.randint(0, len(counts) - 1)]


def largest_tile_size(width: int, height: int) -> int:
    """The largest power of two dividing both image sides (A1111's ``largest_tile_size_available``)."""
    gcd = math.gcd(width, height)
    size = 1
    while gcd % (size * 2) == 0:
        size *= 2
    return size


@cache
def _grid(tokens: int, aspect_ratio: float) -> tuple[int, int]:
    """(h, w) with h·w = ``tokens`` closest to the image's aspect ratio w/h (A1111's ``find_hw_candidates``)."""
    h, w = round(math.sqrt(tokens * aspect_ratio)), round(math.sqrt(tokens / aspect_ratio))
    if h * w != tokens:
        if not (tokens / h).is_integer():
            if not (tokens / w).is_integer():
                divisors = [i for i in range(2, tokens + 1) if tokens % i == 0]
                pairs = [(i, tokens // i) for i in divisors]
                ratios = [pw / ph for ph, pw in pairs]
                closest = min(ratios, key=lambda r: abs(r - aspect_ratio))
                return pairs[ratios.index(closest)]
            h = int(tokens / w)
        else:
            w = int(tokens / h)
    return h, w


def hypertile_layers(model: nn.Module, *, vae: bool = False, sdxl: bool = False) -> dict[str, tuple[nn.Module, int]]:
    """``{name: (module, depth)}`` of the layers A1111's tables name in ``model`` (a diffusers UNet, or with ``vae``
    an ``AutoencoderKL``; ``sdxl``: SDXL's UNet table), matched by the end of the module name as A1111 matches."""
    tables = _VAE_LAYERS if vae else (_SDXL_LAYERS if sdxl else _SD_LAYERS)
    found: dict[str, tuple[nn.Module, int]] = {}
    for depth in range(4):
        for name, module in model.named_modules():
            if any(name.endswith(layer) for layer in tables.get(depth, ())):
                found.setdefault(name, (module, depth))
    return found


class Hypertile(ModuleHooks):
    """A1111's Hypertile on a UNet and/or a VAE (module docstring): hooks on the tabled layers, one shared RNG.
    :meth:`configure` sets the pass's image size and the settings (A1111's ``hypertile_hook_model``), :meth:`seed`
    reseeds the RNG (``set_hypertile_seed``); :meth:`remove` takes the hooks off. ``layers``: how many layers it
    hooked.

    Raises:
        ValueError: no tabled layer found in the models given (naming them).
    """

    def __init__(self, unet: nn.Module | None = None, vae: nn.Module | None = None, *, sdxl: bool = False) -> None:
        self.rng = random.Random()
        self._layers: dict[int, dict] = {}
        self._handles = []
        for model, is_vae in ((unet, False), (vae, True)):
            if model is None:
                continue
            for module, depth in hypertile_layers(model, vae=is_vae, sdxl=sdxl).values():
                state = {"depth": depth, "vae": is_vae, "enabled": False, "tile": 0, "swap": 1, "aspect": 1.0,
                         "pending": None}
                self._layers[id(module)] = state
                self._handles.append(module.register_forward_pre_hook(self._split, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._join))
        if not self._layers:
            raise ValueError(f"Hypertile splits the self-attention layers A1111 names (SD1/SD2/SDXL UNets, the VAE "
                             f"decoder's middle attention); {type(unet).__name__} / {type(vae).__name__} have none")
        self.layers = len(self._layers)

    def seed(self, seed: int) -> None:
        """Reseed the tiles' RNG (A1111's ``set_hypertile_seed``: the job's first seed, before each hires pass)."""
        self.rng.seed(int(seed))

    def configure(self, width: int, height: int, *, unet: HypertileSettings | None = None,
                  vae: HypertileSettings | None = None) -> None:
        """The pass's image size (pixels) and each model's settings (``None``: that model's layers left as they
        are), A1111's ``hypertile_hook_model``: tile = min(largest power of two dividing both sides, max tile),
        enabled for the layers at most ``max_depth`` deep."""
        aspect = width / height
        for state in self._layers.values():
            settings = vae if state["vae"] else unet
            if settings is None:
                continue
            state.update(tile=min(largest_tile_size(width, height), settings.max_tile_size),
                         swap=settings.swap_size, aspect=aspect,
                         enabled=settings.enabled and state["depth"] <= settings.max_depth)

    def _split(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._layers[id(module)]
        state["pending"] = None
        if not state["enabled"]:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        latent_tile = max(128, state["tile"]) // 8
        if x.ndim == 4:  # (the VAE's attention: B, C, H, W)
            b, c, h, w = x.shape
            nh = tile_counts(self.rng, h, latent_tile, state["swap"])
            nw = tile_counts(self.rng, w, latent_tile, state["swap"])
            if nh * nw == 1:
                return None
            tiles = x.reshape(b, c, nh, h // nh, nw, w // nw).permute(0, 2, 4, 1, 3, 5)
            tiles = tiles.reshape(b * nh * nw, c, h // nh, w // nw).contiguous()  # (diffusers' processors view it)
        else:  # (a UNet self-attention: B, h·w, C)
            b, tokens, c = x.shape
            h, w = _grid(tokens, state["aspect"])
            if h * w != tokens:
                raise ValueError(f"Hypertile: {tokens} tokens do not fit the image's aspect ratio {state['aspect']}")
            factor = 2 ** state["depth"]
            nh = tile_counts(self.rng, h, latent_tile * factor, state["swap"])
            nw = tile_counts(self.rng, w, latent_tile * factor, state["swap"])
            if nh * nw == 1:
                return None
            tiles = x.reshape(b, nh, h // nh, nw, w // nw, c).permute(0, 1, 3, 2, 4, 5)
            tiles = tiles.reshape(b * nh * nw, (h // nh) * (w // nw), c).contiguous()
        state["pending"] = (b, h, w, nh, nw)
        if args:
            return (tiles, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tiles}

    def _join(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        state = self._layers[id(module)]
        pending, state["pending"] = state["pending"], None
        if pending is None:
            return None
        b, h, w, nh, nw = pending
        if output.ndim == 4:
            c = output.shape[1]
            out = output.reshape(b, nh, nw, c, h // nh, w // nw).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(b, c, h, w).contiguous()
        c = output.shape[-1]
        out = output.reshape(b, nh, nw, h // nh, w // nw, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h * w, c).contiguous()


def hypertile_fields(unet: HypertileSettings, vae: HypertileSettings, second_pass: bool, *,
                     hires: bool) -> dict[str, object]:
    """A1111's infotext fields of a run's Hypertile (its script's ``add_infotext``): "Hypertile U-Net: True" and the
    UNet's depth / tile / swap settings where not the default; the VAE's likewise; "Hypertile U-Net second pass: True"
    (with the UNet's settings) when only the hires pass tiles the UNet and there is one."""
    fields: dict[str, object] = {}
    unet_default, vae_default = HYPERTILE_DEFAULTS

    def settings(label: str, value: HypertileSettings, default: HypertileSettings) -> None:
        fields[f"{label} max depth"] = None if value.max_depth == default.max_depth else value.max_depth
        fields[f"{label} max tile size"] = None if value.max_tile_size == default.max_tile_size else value.max_tile_size
        fields[f"{label} swap size"] = None if value.swap_size == default.swap_size else value.swap_size

    if unet.enabled:
        fields["Hypertile U-Net"] = True
        settings("Hypertile U-Net", unet, unet_default)
    if vae.enabled:
        fields["Hypertile VAE"] = True
        settings("Hypertile VAE", vae, vae_default)
    if second_pass and hires and not unet.enabled:
        fields["Hypertile U-Net second pass"] = True
        settings("Hypertile U-Net", unet, unet_default)
    return {key: value for key, value in fields.items() if value is not None}


def hypertile_options(fields: dict[str, str]) -> tuple[dict[str, object], set[str]]:
    """``generate`` options of an infotext's Hypertile fields (:func:`hypertile_fields` read back) and the fields it
    took: ``hypertile_unet`` / ``hypertile_vae`` as :class:`HypertileSettings`, ``hypertile_unet_second_pass``."""
    options: dict[str, object] = {}
    taken: set[str] = set()

    def settings(label: str, default: HypertileSettings, enabled: bool) -> HypertileSettings:
        values = {}
        for suffix, name in ((" max depth", "max_depth"), (" max tile size", "max_tile_size"),
                             (" swap size", "swap_size")):
            if label + suffix in fields:
                values[name] = int(float(fields[label + suffix]))
                taken.add(label + suffix)
        return HypertileSettings(enabled=enabled, **{**{k: getattr(default, k) for k in
                                                          ("max_depth", "max_tile_size", "swap_size")}, **values})

    unet = str(fields.get("Hypertile U-Net", "")).strip().lower() == "true"
    second = str(fields.get("Hypertile U-Net second pass", "")).strip().lower() == "true"
    if unet or second:
        options["hypertile_unet"] = settings("Hypertile U-Net", HYPERTILE_DEFAULTS[0], unet)
        options["hypertile_unet_second_pass"] = second
        taken.update(key for key in ("Hypertile U-Net", "Hypertile U-Net second pass") if key in fields)
    if str(fields.get("Hypertile VAE", "")).strip().lower() == "true":
        options["hypertile_vae"] = settings("Hypertile VAE", HYPERTILE_DEFAULTS[1], True)
        taken.add("Hypertile VAE")
    return options, taken
