"""LoRA+ (Hayou et al. 2024): the up (B) factors learn ``ratio``× faster than the down (A) factors.

kohya sd-scripts (``networks/lora.py`` ``prepare_optimizer_params``, and LyCORIS' ``kohya.py`` the
same way) puts every adapter parameter whose name contains ``lora_up`` in a second optimiser group
whose learning rate is the first's times the ratio; everything else (``lora_down``, ``alpha``, a
Tucker core ``lora_mid``, DoRA's ``dora_scale``) keeps the plain rate. The UNet's ratio is
``loraplus_unet_lr_ratio or loraplus_lr_ratio``, the text encoders' ``loraplus_text_encoder_lr_ratio or
loraplus_lr_ratio``. With kohya's block lr weights the up factors of a block get
``unet_lr · block weight · ratio``.

Here the ratio becomes a factor of each parameter's ``lr_scales`` entry (the one grouping path of
:func:`~sdadapt.methods.fit.fit`). LoHa and LoKr have no ``lora_up`` tensor, so LyCORIS trains them
at the plain rate whatever the ratio; sdadapt refuses the ratio for them instead of ignoring it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..errors import InputError

__all__ = ["LORAPLUS_ARGS", "loraplus_ratios", "is_loraplus_up", "loraplus_lr_scales"]

#: the network_args (and method options) of LoRA+, kohya's names
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def _ratio(name: str, value: float | str | None) -> float | None:
    if value is None:
        return None
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: give a number, e.g. {name}=16 (the LoRA+ paper's)") from None
    if not (ratio > 0 and math.isfinite(ratio)):
        raise InputError(f"{name}={value!r}: the LoRA+ ratio multiplies the up factors' learning rate, so it must be a "
                         "finite number > 0 (16 is the paper's; leave it out to train without LoRA+)")
    return ratio


def loraplus_ratios(*, loraplus_lr_ratio: float | str | None = None, loraplus_unet_lr_ratio: float | str | None = None,
                    loraplus_text_encoder_lr_ratio: float | str | None = None) -> tuple[float | None, float | None]:
    """kohya's three LoRA+ options -> ``(UNet ratio, text encoder ratio)`` (``None``: no LoRA+ there).

    ``unet = loraplus_unet_lr_ratio or loraplus_lr_ratio``, ``text encoder =
    loraplus_text_encoder_lr_ratio or loraplus_lr_ratio``.

    Raises:
        InputError: a ratio that is not a finite number > 0 (kohya's ``or`` would take a 0 for "not given").
    """
    common = _ratio("loraplus_lr_ratio", loraplus_lr_ratio)
    unet = _ratio("loraplus_unet_lr_ratio", loraplus_unet_lr_ratio)
    text = _ratio("loraplus_text_encoder_lr_ratio", loraplus_text_encoder_lr_ratio)
    return (unet if unet is not None else common), (text if text is not None else common)


def is_loraplus_up(parameter_name: str) -> bool:
    """Whether LoRA+ speeds up this adapter parameter (kohya/LyCORIS: ``"lora_up" in name``)."""
    return "lora_up" in parameter_name


def loraplus_lr_scales(entries: Iterable[tuple[bool, str]], scales: Sequence[float], *, unet_ratio: float | None,
                       text_encoder_ratio: float | None, family: str = "the adapters") -> list[float]:
    """Each parameter's learning-rate factor with LoRA+ applied.

    Args:
        entries: per parameter ``(in a text encoder, parameter name inside its adapter)``, e.g.
            ``(False, "lora_up")``, in the order of ``scales``.
        scales: the factors before LoRA+ (block lr weights; else 1), one per entry.
        unet_ratio, text_encoder_ratio: :func:`loraplus_ratios`.
        family: named in the error.

    Returns:
        ``scale · ratio`` for the up factors of a part with a ratio, ``scale`` for every other parameter.

    Raises:
        InputError: a ratio is given but no adapter of the parts it acts on has a ``lora_up`` factor
            (LoHa, LoKr: LyCORIS would silently train them at the plain rate).
    """
    entries = list(entries)
    if len(entries) != len(scales):
        raise ValueError(f"{len(entries)} parameters but {len(scales)} lr scales")
    out: list[float] = []
    found = False
    for (text, name), scale in zip(entries, scales):
        ratio = text_encoder_ratio if text else unet_ratio
        if ratio is not None and is_loraplus_up(name):
            out.append(float(scale) * ratio)
            found = True
        else:
            out.append(float(scale))
    if (unet_ratio is not None or text_encoder_ratio is not None) and not found:
        raise InputError(f"LoRA+ (loraplus_*_lr_ratio) speeds up the lora_up (B) factors, and {family} have none in "
                         "the parts it acts on (LoHa's hada_*, LoKr's lokr_* are not up/down pairs; LyCORIS would train "
                         "them at the plain rate): train lora, locon or dora, or leave the LoRA+ ratios out")
    return out
