"""Loopback (A1111's built-in img2img script ``scripts/loopback.py``): img2img run ``loops`` times, each output the
next run's init image, the denoising strength moving from the first run's to a final one along a curve.

:func:`loopback_strengths` is its ``calculate_denoising_strength``: loop ``j`` (0-based) of ``n`` runs at
``s0 + (s1 − s0)·c(j / (n − 1))`` with ``c`` the curve — ``linear`` ``c(p) = p``, ``aggressive`` ``sin(p·π/2)``
(most of the change early), ``lazy`` ``1 − cos(p·π/2)`` (most of it late); one loop runs at ``s0``. A run
(``generate --loopback N``) samples loop ``j`` of batch ``b`` with seed ``seed + b·N + j`` (A1111's ``p.seed =
processed.seed + 1`` after each loop, never reset), each batch starting again from the init image; with a mask,
loops after the first start from "original" content (A1111 sets ``inpainting_fill = 1``). Every loop's image is
written, with its own infotext: its seed, its "Denoising strength", and the script's "Final denoising strength" /
"Denoising curve" first among the extra fields.
"""

from __future__ import annotations

import math

__all__ = ["LOOPBACK_CURVES", "LOOPBACK_FIELDS", "check_loopback", "loopback_strengths"]

#: ``--loopback-curve`` -> A1111's "Denoising strength curve" label
LOOPBACK_CURVES: dict[str, str] = {"aggressive": "Aggressive", "linear": "Linear", "lazy": "Lazy"}
#: A1111's infotext keys of the script (``p.extra_generation_params``): the final strength, the curve's label
LOOPBACK_FIELDS = ("Final denoising strength", "Denoising curve")


def check_loopback(loops: int, final_strength: float, curve: str) -> str:
    """The curve's name (:data:`LOOPBACK_CURVES`, either spelling), the other settings checked.

    Raises:
        ValueError: fewer than 1 loop, a final strength outside [0, 1], an unknown curve.
    """
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"--loopback is the number of img2img runs, at least 1 (A1111's slider: 1 to 32), got {loops}")
    if not (isinstance(final_strength, (int, float)) and 0.0 <= final_strength <= 1.0):
        raise ValueError(f"--loopback-final-denoising must be in [0, 1], got {final_strength}")
    from .sampler_tables import canonical_choice

    return canonical_choice("--loopback-curve", curve, LOOPBACK_CURVES)


def loopback_strengths(initial: float, final: float, loops: int, *, curve: str = "linear") -> list[float]:
    """Each loop's denoising strength, A1111's ``calculate_denoising_strength`` (module docstring): ``loops``
    values, the first ``initial``, the last ``final`` (for ``loops`` above 1)."""
    curve = check_loopback(loops, final, curve)
    out = [initial]
    for loop in range(1, loops):
        progress = loop / (loops - 1)
        if curve == "aggressive":
            strength = math.sin(progress * math.pi * 0.5)
        elif curve == "lazy":
            strength = 1 - math.cos(progress * math.pi * 0.5)
        else:
            strength = progress
        out.append(initial + (final - initial) * strength)
    return out
