"""``AdapterHandle.load_state_dict`` puts every tensor of a canonical state into the adapters: a DyLoRA handle's
``lora_down`` / ``lora_up`` are concatenations of its row parameters, and the copy went into those temporaries
(only the alphas were loaded, silently) — now through the family's ``load_file_tensors`` as ``--network-weights``."""

from __future__ import annotations

import pytest
import torch

from sdadapt.methods import METHODS
from sdadapt.toy import build_toy


@pytest.mark.parametrize("method", ["lora", "dylora", "loha", "lokr", "dora"])
def test_a_loaded_state_is_the_state(method):
    adaptation = METHODS[method].prepare(build_toy(seed=0))
    g = torch.Generator().manual_seed(1)
    for handle in adaptation.handles.values():
        state = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in handle.state_dict().items()}
        handle.load_state_dict(state)
        back = handle.state_dict()
        assert all(torch.equal(back[k], v) for k, v in state.items()), [k for k, v in state.items()
                                                                        if not torch.equal(back[k], v)][:3]
    adaptation.remove()
