"""Folds in adapters/: one place registers the ``alpha``/``scale`` buffers of the ``alpha / r`` families
(``AdapterModule._register_alpha_scale``: LoRA, LoHa, LoKr, GLoRA, DyLoRA) and one mixin answers
``rank_alpha_for`` for the configs with conv fields (``ConvRankAlpha``: LoRA, LoHa, LoKr, GLoRA).

Each test states what every family did before the fold, written out here: the buffers' dtype, value
and persistence, the scale refreshed by ``load_state_dict``, the kxk-only fallback to conv_rank/conv_alpha.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdadapt.adapters import (
    GLoRAConfig,
    LoHaConfig,
    LoHaModule,
    LoKrConfig,
    LoKrModule,
    LoRAConfig,
    LoRAModule,
)
from sdadapt.adapters.base import ConvRankAlpha, LayerGeometry, rank_alpha_for
from sdadapt.adapters.dylora import DyLoRAModule
from sdadapt.adapters.glora import GLoRAModule
from sdadapt.adapters.lokr import lokr_layout

F64 = torch.float64
LINEAR = LayerGeometry(12, 8)
CONV = LayerGeometry(12, 8, (3, 3), padding=(1, 1))
WIDE = LayerGeometry(64, 48)


def _modules() -> dict[str, tuple[object, float, float]]:
    """name -> (module, the alpha it must store, its strength-1 scale)."""
    full = lokr_layout(LINEAR, 10_000, factor=4)  # rank above the bound: both factors full
    assert full.rank is None
    low = lokr_layout(WIDE, 2, factor=4, decompose_both=True)
    assert low.rank == 2
    return {
        "lora": (LoRAModule(LINEAR, 4, 2.0, dtype=F64), 2.0, 0.5),
        "lora-rs": (LoRAModule(LINEAR, 4, 3.0, rank_stabilized=True, dtype=F64), 6.0, 1.5),
        "lora-none": (LoRAModule(CONV, 3, None, dtype=F64), 3.0, 1.0),
        "loha": (LoHaModule(CONV, 2, 3.0, use_tucker=True, dtype=F64), 3.0, 1.5),
        "lokr": (LoKrModule(WIDE, low, 1.0, dtype=F64), 1.0, 0.5),
        "lokr-full": (LoKrModule(LINEAR, full, 7.0, dtype=F64), 7.0, 1.0),
        "glora": (GLoRAModule(LINEAR, 2, 5.0, dtype=F64), 5.0, 2.5),
        "dylora": (DyLoRAModule(LINEAR, 4, 1.0, dtype=F64), 1.0, 0.25),
    }


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()


def _delta(module) -> torch.Tensor:
    if isinstance(module, GLoRAModule):
        base = torch.linspace(-1, 1, LINEAR.out_features * LINEAR.in_features, dtype=F64).reshape(LINEAR.weight_shape)
        return module.merge_delta(base)
    return module.delta_weight()


@pytest.mark.parametrize("name", list(_modules()))
def test_alpha_and_scale_buffers_are_what_each_family_registered(name):
    module, alpha, scale = _modules()[name]
    buffers = dict(module.named_buffers())
    assert buffers["alpha"].dtype == torch.float32 and buffers["alpha"].dim() == 0
    assert buffers["scale"].dtype == torch.float32 and buffers["scale"].dim() == 0
    assert float(buffers["alpha"]) == pytest.approx(alpha, rel=1e-6)
    assert float(buffers["scale"]) == pytest.approx(scale, rel=1e-6)
    state = module.state_dict()
    assert "alpha" in state and "scale" not in state  # alpha saved, the cached scale not
    assert module.file_tensors()["alpha"] is buffers["alpha"]


@pytest.mark.parametrize("name", list(_modules()))
def test_load_state_dict_refreshes_the_cached_scale_in_every_family(name):
    module, alpha, scale = _modules()[name]
    _randomise(module)
    before = _delta(module).clone()
    state = module.state_dict()
    state["alpha"] = torch.tensor(3.0 * alpha)
    module.load_state_dict(state)
    factor = 1.0 if name == "lokr-full" else 3.0  # LoKr with both factors full: scale 1 whatever alpha says
    assert float(module.scale) == pytest.approx(factor * scale, rel=1e-6)
    torch.testing.assert_close(_delta(module), factor * before, rtol=1e-6, atol=0)
    module.set_multiplier(0.5)
    torch.testing.assert_close(_delta(module), 0.5 * factor * before, rtol=1e-6, atol=0)


def _old_rank_alpha_for(config, geometry):
    """What each config's own method did before the fold (written out)."""
    if geometry.is_kxk:
        return (config.conv_rank if config.conv_rank is not None else config.rank,
                config.conv_alpha if config.conv_alpha is not None else config.alpha)
    return config.rank, config.alpha


@pytest.mark.parametrize("cls", [LoRAConfig, LoHaConfig, LoKrConfig, GLoRAConfig])
@pytest.mark.parametrize("conv", [(None, None), (8, None), (None, 1.5), (6, 0.5)])
def test_every_conv_config_answers_rank_alpha_as_before(cls, conv):
    config = cls(rank=4, alpha=2.0, conv_rank=conv[0], conv_alpha=conv[1])
    assert isinstance(config, ConvRankAlpha) and dataclasses.is_dataclass(config)
    for geometry in (LINEAR, CONV, LayerGeometry(12, 8, (1, 1)), LayerGeometry(12, 8, (1, 3))):
        got = config.rank_alpha_for(geometry)
        assert got == _old_rank_alpha_for(config, geometry)
        assert got == rank_alpha_for(geometry, 4, 2.0, conv[0], conv[1])
    # the mixin adds no dataclass field and keeps the configs frozen
    assert [f.name for f in dataclasses.fields(config)][:4] == ["rank", "alpha", "conv_rank", "conv_alpha"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 5  # type: ignore[misc]


# ------------------------------------------------------------------ delta_output: one rule in AdapterModule
def _base_weight_modules(geometry: LayerGeometry) -> dict[str, object]:
    from sdadapt.adapters import DoRAConfig, IA3Config, OFTConfig, build_adapter

    configs = {"dora": DoRAConfig(inner=LoRAConfig(rank=2)), "glora": GLoRAConfig(rank=2), "ia3": IA3Config(),
               "oft": OFTConfig(dim=4)}
    modules = {name: build_adapter(config, geometry, dtype=F64) for name, config in configs.items()}
    weight = torch.randn(geometry.weight_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    for module in modules.values():
        _randomise(module)
        module.init_from_base(weight)  # DoRA's magnitude
    return modules


@pytest.mark.parametrize("geometry", [LINEAR, CONV], ids=["linear", "conv"])
def test_delta_output_passes_the_base_weight_to_forward_exactly_for_base_weight_families(geometry):
    weight = torch.randn(geometry.weight_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    shape = (2, geometry.in_features) if not geometry.is_conv else (2, geometry.in_features, 5, 5)
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    for name, module in _base_weight_modules(geometry).items():
        assert module.uses_base_weight, name
        # what each family's own override did: self(x, base_weight), bit for bit
        assert torch.equal(module.delta_output(x, weight), module(x, weight)), name
        with pytest.raises(TypeError, match=f"{type(module).__name__}.forward needs the base layer's weight"):
            module.delta_output(x)
    lora = LoRAModule(geometry, 2, 1.0, dtype=F64)
    _randomise(lora)
    assert not lora.uses_base_weight
    sentinel = object()  # never read: the additive families' forward takes x alone
    assert torch.equal(lora.delta_output(x, sentinel), lora(x))  # type: ignore[arg-type]
