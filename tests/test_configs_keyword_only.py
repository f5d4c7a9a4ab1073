"""The public ``*Config`` dataclasses take their options by keyword (library hygiene: ``LoRAConfig(4, 2)`` read as
rank 4, alpha 2 silently, and a field added in between would have changed what such a call meant)."""

from __future__ import annotations

import dataclasses

import pytest

import sdadapt
from sdadapt.adapters import DoRAConfig, LoKrConfig


def _public_configs() -> list[type]:
    import sdadapt.methods

    names = {name: getattr(sdadapt, name) for name in sdadapt.__all__ if name.endswith("Config")}
    names.update({name: getattr(sdadapt.methods, name) for name in sdadapt.methods.__all__ if name.endswith("Config")})
    return [cls for cls in names.values() if dataclasses.is_dataclass(cls)]


def test_every_public_config_takes_its_options_by_keyword():
    configs = _public_configs()
    assert len(configs) >= 10
    for cls in configs:
        positional = [f.name for f in dataclasses.fields(cls) if f.init and not f.kw_only]
        assert positional == (["inner"] if cls is DoRAConfig else []), (cls.__name__, positional)


def test_a_positional_option_is_refused_and_dora_keeps_its_inner_first():
    with pytest.raises(TypeError, match="positional argument"):
        sdadapt.LoRAConfig(4, 2)
    assert DoRAConfig(LoKrConfig(rank=2), wd_on_out=False).inner == LoKrConfig(rank=2)
