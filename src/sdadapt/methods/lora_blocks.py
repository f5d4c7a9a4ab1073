"""kohya's block-wise LoRA ``network_args``: learning-rate weights and ranks per UNet block.

kohya sd-scripts (``networks/lora.py``) numbers the UNet's blocks the way the LDM UNet lays them
out: SD1/SD2 have 12 "down" blocks (``input_blocks.0`` = ``conv_in`` has no LoRA), 1 mid block and
12 "up" blocks — 25 in all; SDXL has a first block (time/label embeddings, no LoRA), 9 input
blocks, 3 middle blocks, 9 output blocks and a last block (``out``, no LoRA) — 23 in all. A LoRA
module belongs to the block its kohya name says (:func:`kohya_block_index`).

* ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight`` multiply the UNet learning rate per
  block (``up`` runs deep -> shallow). A value is a comma list (an empty item is 0; a short list is
  padded with 1.0, a long one is cut) or, for down/up, a preset ``cosine``, ``sine``, ``linear``,
  ``reverse_linear``, ``zeros`` with an optional ``+N`` added to every weight. A weight not above
  ``block_lr_zero_threshold`` becomes 0, and a block of weight 0 gets no LoRA modules at all.
* ``block_dims`` / ``block_alphas`` (one value per block, 25 or 23) give the rank and alpha of the
  linear and 1x1 layers per block; ``conv_block_dims`` / ``conv_block_alphas`` those of the kxk
  convolutions (and make the convolutions targets). A rank of 0 leaves the block's layers out.

The text encoders are never affected: their modules keep the network rank and the text encoder
learning rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..formats.layers import canonical_layer_path
from ..formats.unet_names import diffusers_to_ldm_unet

__all__ = [
    "SD_BLOCKS",
    "SD_MID_BLOCKS",
    "SDXL_BLOCKS",
    "SDXL_MID_BLOCKS",
    "LR_WEIGHT_PRESETS",
    "BLOCK_ARGS",
    "block_count",
    "preset_lr_weights",
    "block_lr_weights",
    "kohya_block_index",
    "sdxl_block_index",
    "BlockPlan",
    "block_plan",
    "check_block_args",
]

#: kohya's ``LoRANetwork.NUM_OF_BLOCKS`` / ``NUM_OF_MID_BLOCKS`` (SD1/SD2: down and up blocks, mid blocks)
SD_BLOCKS, SD_MID_BLOCKS = 12, 1
#: kohya's ``SDXL_NUM_OF_BLOCKS`` / ``SDXL_NUM_OF_MID_BLOCKS`` (input and output blocks, middle blocks)
SDXL_BLOCKS, SDXL_MID_BLOCKS = 9, 3
#: the ``down_lr_weight`` / ``up_lr_weight`` presets
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
#: the network_args keys this module reads (the ``prepare_*`` keywords of the LoRA family)
BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas")

#: kohya's RE_UPDOWN, on the kohya module name (``lora_unet_down_blocks_1_attentions_0_...``)
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")

Weights = str | Sequence[float] | None


def block_count(*, sdxl: bool) -> int:
    """How many values ``block_dims`` & co. take: 25 (SD1/SD2) or 23 (SDXL)."""
    return 1 + 2 * SDXL_BLOCKS + SDXL_MID_BLOCKS + 1 if sdxl else 2 * SD_BLOCKS + SD_MID_BLOCKS


def preset_lr_weights(spec: str, *, count: int = SD_BLOCKS) -> list[float]:
    """kohya's preset ``NAME`` or ``NAME+N`` -> ``count`` weights (shallow -> deep for down).

    With ``x_i = i / (count - 1)``: ``sine`` = sin(π x_i / 2), ``cosine`` = the same reversed,
    ``linear`` = x_i, ``reverse_linear`` = reversed, ``zeros`` = 0; ``+N`` adds N to each.
    """
    name, plus, offset = spec.strip().partition("+")
    name = name.strip()
    try:
        base = float(offset) if plus else 0.0
    except ValueError:
        raise InputError(f"lr weight preset {spec!r}: the part after '+' must be a number, e.g. 'sine+0.5'") from None
    steps = [i / (count - 1) for i in range(count)]
    if name == "sine":
        values = [math.sin(math.pi * x / 2) for x in steps]
    elif name == "cosine":
        values = [math.sin(math.pi * x / 2) for x in reversed(steps)]
    elif name == "linear":
        values = list(steps)
    elif name == "reverse_linear":
        values = list(reversed(steps))
    elif name == "zeros":
        values = [0.0] * count
    else:
        try:
            float(name)
        except ValueError:
            pass
        else:
            raise InputError(f"lr weight {spec!r}: one number is not a list here (kohya takes it for an unknown preset and "
                             f"ignores it); give the {count} weights as a comma list, e.g. {','.join([name] * 3)},...")
        raise InputError(f"unknown lr weight preset {spec!r}: give a comma list of numbers (e.g. '0,0.5,1') or one of "
                         f"{', '.join(LR_WEIGHT_PRESETS)}, optionally with +N (e.g. 'cosine+0.2')")
    return [v + base for v in values]


def _numbers(text: str | Sequence[float], *, name: str) -> list[float]:
    if not isinstance(text, str):
        return [float(v) for v in text]
    try:
        return [float(s) if s.strip() else 0.0 for s in text.split(",")]
    except ValueError:
        raise InputError(f"{name}={text!r}: give comma-separated numbers") from None


def _fit(values: list[float], length: int) -> list[float]:
    """kohya: a long list is cut, a short one padded with 1.0."""
    return values[:length] + [1.0] * max(0, length - len(values))


def block_lr_weights(*, down: Weights = None, mid: Weights = None, up: Weights = None, zero_threshold: float = 0.0,
                     sdxl: bool = False) -> list[float] | None:
    """kohya's ``get_block_lr_weight``: one learning-rate factor per block (:func:`block_count` of them).

    ``down``/``up``: a comma list (``"0,0.5,,1"``: an empty item is 0), a number sequence, or a preset
    (:func:`preset_lr_weights`); ``mid``: a comma list or sequence. A part not given is all 1.0.
    Returns ``None`` when none is given (no block-wise learning rate).
    """
    if down is None and mid is None and up is None:
        return None
    length, mid_length = (SDXL_BLOCKS, SDXL_MID_BLOCKS) if sdxl else (SD_BLOCKS, SD_MID_BLOCKS)

    def side(value: Weights, name: str) -> list[float]:
        if value is None:
            return [1.0] * length
        if isinstance(value, str) and "," not in value:
            return _fit(preset_lr_weights(value, count=length), length)
        return _fit(_numbers(value, name=name), length)

    parts = [side(down, "down_lr_weight"),
             _fit(_numbers(mid, name="mid_lr_weight"), mid_length) if mid is not None else [1.0] * mid_length,
             side(up, "up_lr_weight")]
    given = (down, mid, up)
    for i, values in enumerate(parts):
        if given[i] is not None:
            parts[i] = [w if w > zero_threshold else 0.0 for w in values]
    weights = parts[0] + parts[1] + parts[2]
    if sdxl:
        weights = [1.0, *weights, 1.0]  # the embeddings and out blocks (no LoRA there)
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise InputError(f"block lr weights must be finite and >= 0 (a weight <= block_lr_zero_threshold becomes 0), got {bad[0]}")
    return weights


def sdxl_block_index(ldm_path: str) -> int:
    """kohya's SDXL block (0..22) of an LDM UNet path (``input_blocks.4.1.proj_in[.weight]``); -1: none.

    kohya's numbering (``networks/lora.py`` ``get_block_index``, ``sdxl_train.py``
    ``get_block_params_to_optimize``): ``time_embed`` / ``label_emb`` -> 0, ``input_blocks.N`` ->
    1 + N, ``middle_block.N`` -> 10 + N, ``output_blocks.N`` -> 13 + N, ``out`` -> 22.
    """
    parts = ldm_path.split(".")
    if parts[0] in ("time_embed", "label_emb"):
        return 0
    if parts[0] == "out":
        return 22
    first = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}.get(parts[0])
    return -1 if first is None or len(parts) < 2 or not parts[1].isdigit() else first + int(parts[1])


def kohya_block_index(path: str, *, sdxl: bool, up_blocks_with_attention: set[int] | None = None) -> int:
    """The kohya block (index into :func:`block_lr_weights` / ``block_dims``) of a UNet layer; -1: none.

    ``path`` is the live layer path in the UNet (diffusers or LDM names). SD1/SD2: ``down_blocks.i``
    ``.resnets/attentions.j`` -> 1 + 3i + j, a downsampler -> 1 + 3i + 2, ``mid_block`` -> 12,
    ``up_blocks.i`` likewise -> 13 + 3i + j. SDXL (LDM names): ``input_blocks.N`` -> 1 + N,
    ``middle_block.N`` -> 10 + N, ``output_blocks.N`` -> 13 + N.
    """
    layer = canonical_layer_path("unet", path)
    if sdxl:
        return sdxl_block_index(diffusers_to_ldm_unet(layer, up_blocks_with_attention=up_blocks_with_attention) or layer)
    name = "lora_unet_" + layer.replace(".", "_")
    match = _UPDOWN.search(name)
    if match:
        kind, i, part, j = match.groups()
        index = 3 * int(i) + (2 if part in ("upsamplers", "downsamplers") else int(j))
        return 1 + index if kind == "down" else SD_BLOCKS + 1 + index
    return SD_BLOCKS if "mid_block_" in name else -1


@dataclass(frozen=True)
class BlockPlan:
    """Per-block settings (each list :func:`block_count` long; ``conv_*`` ``None``: convolutions untouched).

    Attributes:
        lr_weights: learning-rate factor per block, or ``None`` (all 1).
        dims, alphas: rank and alpha of linear / 1x1 layers per block (rank 0: no module).
        conv_dims, conv_alphas: rank and alpha of kxk convolutions per block, or ``None``.
        sdxl: the block numbering is SDXL's.
    """

    lr_weights: list[float] | None
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    sdxl: bool

    def rank_alpha(self, block: int, *, kxk: bool) -> tuple[int, float]:
        """(rank, alpha) of a layer in ``block`` (rank 0: leave it out)."""
        if kxk:
            if self.conv_dims is None or self.conv_alphas is None:
                return 0, 0.0
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]

    def lr_weight(self, block: int) -> float:
        return 1.0 if self.lr_weights is None else self.lr_weights[block]


def _per_block(text: str | Sequence[float], *, name: str, count: int, kind: type) -> list:
    values = text.split(",") if isinstance(text, str) else list(text)
    if len(values) != count:
        raise InputError(f"{name} must have {count} comma-separated values (one per kohya block: "
                         f"{'1 + 9 input + 3 middle + 9 output + 1 for SDXL' if count == 23 else '12 down + 1 mid + 12 up for SD1/SD2'}), "
                         f"got {len(values)}")
    try:
        out = [kind(v.strip()) if isinstance(v, str) else kind(v) for v in values]
    except ValueError:
        raise InputError(f"{name}={text!r}: give comma-separated {'integers' if kind is int else 'numbers'}") from None
    if any(v < 0 for v in out):
        raise InputError(f"{name}: values must be >= 0, got {min(out)}")
    return out


def block_plan(*, sdxl: bool, rank: int, alpha: float | None, conv_rank: int | None, conv_alpha: float | None,
               down_lr_weight: Weights = None, mid_lr_weight: Weights = None, up_lr_weight: Weights = None,
               block_lr_zero_threshold: float | str = 0.0, block_dims: str | Sequence[int] | None = None,
               block_alphas: str | Sequence[float] | None = None, conv_block_dims: str | Sequence[int] | None = None,
               conv_block_alphas: str | Sequence[float] | None = None) -> BlockPlan | None:
    """kohya's ``create_network`` block logic -> a :class:`BlockPlan`, or ``None`` when no block option is given.

    Defaults differ from kohya only where sdadapt's do: an alpha not given is the rank (kohya: 1.0),
    so ``block_alphas`` defaults to ``alpha`` when given, else to each block's rank (and
    ``conv_block_alphas`` likewise with ``conv_alpha`` / the conv ranks).

    Raises:
        InputError: a list of the wrong length, a bad number or preset, an option without the one it needs.
    """
    try:
        threshold = float(block_lr_zero_threshold)
    except (TypeError, ValueError):
        raise InputError(f"block_lr_zero_threshold must be a number, got {block_lr_zero_threshold!r}") from None
    lr_weights = block_lr_weights(down=down_lr_weight, mid=mid_lr_weight, up=up_lr_weight, zero_threshold=threshold,
                                  sdxl=sdxl)
    if block_dims is None and lr_weights is None:
        given = [name for name, value in (("block_alphas", block_alphas), ("conv_block_dims", conv_block_dims),
                                          ("conv_block_alphas", conv_block_alphas)) if value is not None]
        if threshold != 0.0:
            given.append("block_lr_zero_threshold")
        if given:
            raise InputError(f"{', '.join(given)} takes effect only with block_dims or down/mid/up_lr_weight "
                             "(kohya ignores it otherwise); add block_dims=... or leave it out")
        return None
    if conv_block_alphas is not None and conv_block_dims is None:
        raise InputError("conv_block_alphas needs conv_block_dims (kohya ignores it otherwise)")
    count = block_count(sdxl=sdxl)
    dims = _per_block(block_dims, name="block_dims", count=count, kind=int) if block_dims is not None else [rank] * count
    if block_alphas is not None:
        alphas = _per_block(block_alphas, name="block_alphas", count=count, kind=float)
    else:
        alphas = [float(alpha) if alpha is not None else float(d) for d in dims]
    conv_dims: list[int] | None = None
    conv_alphas: list[float] | None = None
    if conv_block_dims is not None:
        conv_dims = _per_block(conv_block_dims, name="conv_block_dims", count=count, kind=int)
    elif conv_rank is not None:
        conv_dims = [conv_rank] * count
    if conv_dims is not None:
        if conv_block_alphas is not None:
            conv_alphas = _per_block(conv_block_alphas, name="conv_block_alphas", count=count, kind=float)
        else:
            conv_alphas = [float(conv_alpha) if conv_alpha is not None else float(d) for d in conv_dims]
    if lr_weights is not None:  # kohya's remove_block_dims_and_alphas: no modules where the lr weight is 0
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    return BlockPlan(lr_weights, dims, alphas, conv_dims, conv_alphas, sdxl)


def check_block_args(options: Mapping[str, Any]) -> None:
    """Check a method's block-wise options (``BLOCK_ARGS`` among ``options``) before any model loads.

    The list lengths are checked against SD1/SD2 (25 blocks) or SDXL (23): the right one is only
    known once the model is loaded, where :func:`block_plan` checks again.

    Raises:
        InputError: the SD1/SD2 reading's error when neither reading accepts the options.
    """
    given = {name: options[name] for name in BLOCK_ARGS if options.get(name) is not None}
    if not given:
        return
    rank = int(options.get("rank") or 4)
    conv_rank = options.get("conv_rank")
    errors: list[InputError] = []
    for sdxl in (False, True):
        try:
            block_plan(sdxl=sdxl, rank=rank, alpha=options.get("alpha"), conv_rank=conv_rank,
                       conv_alpha=options.get("conv_alpha"), **given)
            return
        except InputError as exc:
            errors.append(exc)
    raise errors[0]
