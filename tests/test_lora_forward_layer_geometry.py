"""``lora_forward(x, up, down, scale, layer)`` takes the base layer itself as its geometry (a notebook user had to
find ``LayerGeometry``; passing the layer was ``AttributeError: 'Linear' object has no attribute 'conv'``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdadapt.adapters.base import geometry_of
from sdadapt.adapters.lora import lora_forward


def test_the_layer_as_geometry_equals_a_float64_reference_and_the_geometry_itself():
    g = torch.Generator().manual_seed(0)
    cases = [(nn.Linear(8, 6), torch.randn(3, 8, generator=g, dtype=torch.float64), (2, 8), (6, 2)),
             (nn.Conv2d(8, 6, 3, padding=1, stride=2), torch.randn(1, 8, 7, 7, generator=g, dtype=torch.float64),
              (2, 8, 3, 3), (6, 2, 1, 1))]
    for layer, x, down_shape, up_shape in cases:
        layer = layer.double()
        down = torch.randn(*down_shape, generator=g, dtype=torch.float64)
        up = torch.randn(*up_shape, generator=g, dtype=torch.float64)
        got = lora_forward(x, up, down, 0.5, layer)
        delta = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(6, *down_shape[1:])  # (out, in[, kh, kw])
        want = x @ delta.T if isinstance(layer, nn.Linear) else F.conv2d(x, delta, stride=2, padding=1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(got, lora_forward(x, up, down, 0.5, geometry_of(layer)))
