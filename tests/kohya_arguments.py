"""kohya's argument types, transcribed for the tests (never imported by sdadapt).

From kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb ``library/train_util.py:3664-3676``.
"""

from __future__ import annotations

__all__ = ["int_or_float"]


def int_or_float(value: str) -> int | float:
    """kohya's ``int_or_float`` (``--lr_warmup_steps``' type): ``"N%"`` -> N/100, a value >= 1 -> ``int``, else
    ``float`` ("20" -> 20, "0.1" -> 0.1, "5%" -> 0.05)."""
    if value.endswith("%"):
        return float(value[:-1]) / 100.0
    float_value = float(value)
    if float_value >= 1:
        return int(value)
    return float(value)
