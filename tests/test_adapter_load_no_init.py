"""Building an adapter FROM A FILE runs no random init (``init_weights=False`` in ``from_file_tensors``).

The factors a file fills were drawn (``normal_`` / ``kaiming_uniform_``) and then overwritten: pure cost,
and on the meta device (the bake's shape check) ``normal_`` costs milliseconds per call. For every
registered family's examples on a Linear, a 1x1 and a 3x3 convolution layer, the module built from
the file tensors must equal — parameters, buffers and outputs, bit for bit — a freshly initialised
module of the same config with the same tensors loaded into it, and must leave the global torch RNG
where it was (loading a file draws nothing; training builds its adapters under ``fork_rng`` anyway).
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.adapters.base import LayerGeometry
from sdadapt.adapters.registry import FAMILIES, adapter_from_file_tensors, build_adapter

SHAPES = {"linear": (8, 6), "conv1x1": (8, 6, 1, 1), "conv3x3": (8, 6, 3, 3)}
CASES = [
    pytest.param(config, id=f"{name}-{index}")
    for name, family in FAMILIES.items()
    if not family.module_type.adapts_norms  # (norm modules start at zero: no random init to skip)
    for index, config in enumerate(family.examples)
]


@pytest.mark.parametrize("config", CASES)
def test_module_from_file_equals_a_fresh_module_loaded_and_draws_no_rng(config):
    g = torch.Generator().manual_seed(0)
    for kind, shape in SHAPES.items():
        geometry = LayerGeometry.from_weight_shape(shape)
        weight = torch.randn(shape, generator=g)
        trained = build_adapter(config, geometry)
        if trained.uses_base_weight:
            trained.init_from_base(weight)
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        tensors = {k: v.detach().clone() for k, v in trained.file_tensors().items()}

        before = torch.get_rng_state()
        loaded = adapter_from_file_tensors(geometry, tensors, name=kind)
        assert torch.equal(torch.get_rng_state(), before), f"{kind}: loading a file drew from the global RNG"

        fresh = build_adapter(config, geometry)  # the random init runs here, then the file's values go in
        fresh.load_state_dict(trained.state_dict())
        assert type(loaded) is type(fresh)
        want = dict(fresh.state_dict(keep_vars=True), **dict(fresh.named_buffers()))
        got = dict(loaded.state_dict(keep_vars=True), **dict(loaded.named_buffers()))
        assert set(got) == set(want), kind
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{kind}: {key}"
        assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [n for n, _ in fresh.named_parameters()]

        x = torch.randn((3, shape[1]) if len(shape) == 2 else (2, shape[1], 5, 5), generator=g)
        with torch.no_grad():
            base = weight if loaded.uses_base_weight else None
            assert torch.equal(loaded.merge_delta(weight), fresh.merge_delta(weight)), f"{kind}: ΔW"
            assert torch.equal(loaded.delta_output(x, base), fresh.delta_output(x, base)), f"{kind}: Δy"
            assert loaded.merge_delta(weight).abs().max() > 0, f"{kind}: the test needs a non-zero delta"
