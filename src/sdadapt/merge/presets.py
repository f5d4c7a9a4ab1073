"""supermerger's named block-weight presets (MBW ``weights presets``): :mod:`sdadapt.merge_presets` under the
names they always had here (that module is torch-free, so the command line reads presets without torch)."""

from __future__ import annotations

from ..merge_presets import (
    SUPERMERGER_PRESETS,
    parse_presets,
    preset_names,
    read_presets,
    resolve_preset,
)

__all__ = ["SUPERMERGER_PRESETS", "parse_presets", "read_presets", "resolve_preset", "preset_names"]
