"""Every registered method: trains only its parameters, saves a loadable file, and removes exactly."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_saves_and_removes_exactly(name, tmp_path):
    system = build_toy(seed=1)
    originals = {part: {k: v.clone() for k, v in getattr(system, part).state_dict().items()} for part in ("unet", "text_encoder")}
    method = METHODS[name]
    adaptation = method.prepare(system)
    images, captions = concept_data("cross", 4, seed=0)
    prior = (images.flip(0), captions[::-1], 0.5) if method.prior_preservation else None
    before = [p.detach().clone() for p in adaptation.params]
    losses = fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=method.learning_rate),
                 prior=prior)
    assert len(losses) == 2 and all(v == v for v in losses)
    assert any(not torch.equal(p, q) for p, q in zip(adaptation.params, before))  # it trained
    path = adaptation.save(tmp_path / f"out{method.file_suffix}")
    if isinstance(adaptation, sdadapt.methods.AdapterAdaptation):
        state, _ = sdadapt.load_lora(path)
        fresh = build_toy(seed=1)
        for component, handle in adaptation.handles.items():
            loaded = sdadapt.load_adapter(getattr(fresh, component), state[component])
            assert len(loaded) == len(handle)
    else:
        tensors, meta = sdadapt.formats.files.read_safetensors(path)
        assert torch.equal(tensors["unet.conv_in.weight"], system.unet.state_dict()["conv_in.weight"])
    adaptation.remove()
    for part, state in originals.items():
        now = getattr(system, part).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), part


def test_fit_rejects_bad_input():
    system = build_toy()
    adaptation = METHODS["lora"].prepare(system)
    with pytest.raises(ValueError, match="captions"):
        fit(system, adaptation, torch.zeros(2, 3, 32, 32), ["a"], config=FitConfig(steps=1))
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=0)
