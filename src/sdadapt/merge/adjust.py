"""supermerger's Adjust ("fine"): eight numbers that rescale the UNet's first and last layers.

hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` (``fineman``, ``colorcalc``,
``FINETUNES``) turns ``a,b,c,d,e,f,g,h`` into factors applied to six keys of the merged model:

=============================  ===========================  =====================================
LDM key (``model.diffusion_model.``)  diffusers key (``unet.``)  change
=============================  ===========================  =====================================
``input_blocks.0.0.weight``    ``conv_in.weight``           ``× (1 − 0.01·a)``   (detail)
``input_blocks.0.0.bias``      ``conv_in.bias``             ``× (1 + 0.02·a)``
``out.0.weight``               ``conv_norm_out.weight``     ``× (1 − 0.01·b)``   (detail)
``out.0.bias``                 ``conv_norm_out.bias``       ``× (1 + 0.02·b)``
``out.2.weight``               ``conv_out.weight``          ``× (1 − 0.01·c)``   (contrast)
``out.2.bias``                 ``conv_out.bias``            ``+ [0.02·d, colour(e, f, g, h)]``
=============================  ===========================  =====================================

``d`` brightens the first latent channel; ``e..h`` (cyan–red, magenta–green, yellow–blue and a
fourth axis) add ``0.02·Σᵢ xᵢ·COLS[i]`` to latent channels 1..3, with supermerger's SD1/SD2
(``COLS``) or SDXL (``COLSXL``) colour table. All zeros is no adjustment (supermerger skips it).

supermerger multiplies in the stored dtype after the merge; here the factors apply to the merged
tensor in the compute dtype before the single cast to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import finite_numbers
from ..errors import InputError

__all__ = ["ADJUST_KEYS", "ADJUST_COUNT", "COLOURS", "parse_adjust", "adjust_factors", "adjust_tensor"]

#: how many numbers supermerger's Adjust takes
ADJUST_COUNT = 8

#: the six keys Adjust changes, in supermerger's FINETUNES order, per naming
ADJUST_KEYS: dict[str, tuple[str, ...]] = {
    "ldm": tuple(f"model.diffusion_model.{name}" for name in (
        "input_blocks.0.0.weight", "input_blocks.0.0.bias", "out.0.weight", "out.0.bias", "out.2.weight",
        "out.2.bias")),
    "diffusers": tuple(f"unet.{name}" for name in (
        "conv_in.weight", "conv_in.bias", "conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight",
        "conv_out.bias")),
}

#: supermerger's colour tables (COLS for SD1/SD2, COLSXL for SDXL): one row per number e..h
COLOURS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd": ((-1.0, 1 / 3, 2 / 3), (1.0, 1.0, 0.0), (0.0, -1.0, -1.0), (1.0, 0.0, 1.0)),
    "sdxl": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (-1.0, -1.0, 0.0), (-1.0, 1.0, 0.0)),
}

#: the largest |value| accepted (supermerger's sliders stay well inside it)
_LIMIT = 100.0


def parse_adjust(values: str | Sequence[float]) -> tuple[float, ...]:
    """``"a,b,c,d,e,f,g,h"`` (or numbers) -> 8 floats; fewer are padded with 0 as supermerger does.

    Raises:
        InputError: more than 8 values, a word, or a value outside ±100 (supermerger silently
            reads a word as 0 and ignores extra values; here they are refused).
    """
    if isinstance(values, str):
        items = [v.strip() for v in values.split(",")]
        try:
            numbers = [float(v) for v in items]
        except ValueError:
            raise InputError(f"adjust: expected up to {ADJUST_COUNT} comma-separated numbers (supermerger's "
                             f"Adjust, e.g. \"0,0,0,0,0,0,0,0\"), got {values[:80]!r}") from None
    else:
        numbers = list(values)
    if not 1 <= len(numbers) <= ADJUST_COUNT:
        raise InputError(f"adjust takes 1 to {ADJUST_COUNT} numbers (detail in, detail out, contrast, brightness, "
                         f"four colours), got {len(numbers)}")
    checked = finite_numbers(numbers, name="adjust", low=-_LIMIT, high=_LIMIT)
    return tuple(float(v) for v in checked) + (0.0,) * (ADJUST_COUNT - len(checked))


def adjust_factors(values: Sequence[float], *, architecture: str) -> tuple[float | tuple[float, ...], ...]:
    """supermerger's ``fineman``: the six changes, in :data:`ADJUST_KEYS` order.

    Returns:
        five multipliers and, last, the 4-vector added to the ``out.2`` bias.
    """
    a = parse_adjust(values)
    table = COLOURS["sdxl" if architecture == "sdxl" else "sd"]
    colour = [sum(table[i][j] * a[4 + i] * 0.02 for i in range(4)) for j in range(3)]
    return (1 - a[0] * 0.01, 1 + a[0] * 0.02, 1 - a[1] * 0.01, 1 + a[1] * 0.02, 1 - a[2] * 0.01,
            (a[3] * 0.02, *colour))


def adjust_tensor(tensor: Tensor, change: float | Sequence[float]) -> Tensor:
    """Apply one change of :func:`adjust_factors` to ``tensor`` (a new tensor, same dtype).

    ``change`` is a multiplier, or the 4-vector added to the ``out.2`` bias (``tensor`` shape ``(4,)``).
    """
    if isinstance(change, (int, float)):
        return tensor * float(change)
    offset = torch.tensor([float(v) for v in change], dtype=tensor.dtype, device=tensor.device)
    if tuple(tensor.shape) != tuple(offset.shape):
        raise InputError(f"adjust: the out.2 bias has shape {tuple(tensor.shape)}, supermerger's colour offset needs "
                         f"{tuple(offset.shape)} (4 latent channels)")
    return tensor + offset
