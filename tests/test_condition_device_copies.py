"""A system's ``condition`` (run inside the training step, so inside a captured CUDA graph) makes no
copy between devices: everything it reads is on the device before the step.

The model runs on the ``meta`` device and a TorchDispatchMode records every op that touches tensors
of more than one device (a host -> device copy of ids would be ``aten._to_copy`` cpu -> meta)."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sdadapt.methods.clip_inversion import prepare_clip_inversion
from sdadapt.toy.system import build_toy


class CrossDeviceOps(TorchDispatchMode):
    """Records ``(op, devices)`` of every op whose tensor inputs and outputs lie on more than one device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, list[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {str(t.device) for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.seen.append((str(func), sorted(devices)))
        return out


def _toy_ids(system, prompts: list[str]) -> torch.Tensor:
    return system.tokenizer(prompts).to("meta")


def test_the_toy_condition_reads_bound_image_words_on_the_device_without_a_copy():
    """A CLIP-inversion vector bound on the system's device: the forward copies nothing; bound on the
    host and the system moved after: ``.to()`` took the ids along."""
    system = build_toy(seed=0).to("meta")
    adaptation = prepare_clip_inversion(system, token="sks")
    assert system.image_tokens[0][0].device.type == "meta"
    ids = _toy_ids(system, ["a sks circle", "a red circle"])
    with CrossDeviceOps() as mode:
        out = system.condition(ids)
    assert mode.seen == [] and out["image_embeds"].device.type == "meta"
    adaptation.remove()
    assert system.image_tokens == []

    host = build_toy(seed=0)
    bound = prepare_clip_inversion(host, token="sks")
    host.to("meta")  # (the vector is the adaptation's parameter: it stays where the adaptation made it)
    assert host.image_tokens[0][0].device.type == "meta" and host.image_tokens[0][0].dtype == torch.long
    host.half()  # a dtype change keeps the ids int64
    assert host.image_tokens[0][0].dtype == torch.long
    bound.remove()  # (found by its vector although its ids moved)
    assert host.image_tokens == []


def test_a_binding_on_another_device_is_refused_not_copied():
    system = build_toy(seed=0).to("meta")
    ids = _toy_ids(system, ["a sks circle"])
    system.image_tokens.append((torch.tensor([system.tokenizer.token_id("sks")]), torch.zeros(64, device="meta")))
    with CrossDeviceOps() as mode, pytest.raises(ValueError, match="after moving the system"):
        system.condition(ids)
    assert mode.seen == []


def test_the_toy_condition_with_a_binding_equals_the_reference():
    """The device-checked path computes what it did: the vector added where a bound word occurs."""
    system = build_toy(seed=0)
    adaptation = prepare_clip_inversion(system, token="sks")
    with torch.no_grad():
        adaptation.vector.copy_(torch.linspace(-1, 1, adaptation.vector.numel()))
    ids = system.tokenizer(["a sks circle", "a red circle"])
    out = system.condition(ids)
    assert torch.equal(out["image_embeds"][0], adaptation.vector.detach()) and not out["image_embeds"][1].any()


@pytest.mark.parametrize("sdxl", [False, True])
def test_the_diffusers_condition_makes_no_copy_between_devices(tmp_path, sdxl):
    """Weighted long-prompt ids (and SDXL's time_ids, given or the default ones) on the device: none."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=150, sdxl=sdxl)
    weighted = system.tokenize_weighted(["a (cat:1.2) " * 30, "dog"])
    system.to("meta")
    batch = {k: v.to("meta") for k, v in weighted.items()}
    with CrossDeviceOps() as mode:
        system.condition(batch)
        system.condition(batch["ids"])
        if sdxl:
            system.condition({**batch, "time_ids": torch.zeros(2, 6, device="meta")})
    assert mode.seen == []
