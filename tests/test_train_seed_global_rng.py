"""``train --seed`` seeds torch's global RNG, as kohya's ``set_seed(args.seed)`` (accelerate's ``set_seed``:
``random``, ``numpy``, ``torch.manual_seed``) at the start of its scripts
(kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb ``train_network.py:505``). Adapter dropout (kohya's
``network_dropout``, ``rank_dropout``, ``module_dropout``) and DyLoRA's slices draw from that RNG; without the seed
two runs with the same ``--seed`` trained on other masks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return captioned_pngs(tmp_path_factory.mktemp("seed") / "img", [(32, 32)] * 2)


def _train(images, out, seed: int, *extra) -> dict:
    code = main([*lora_train_args(images, "--steps", 2, "--seed", seed, "--learning-rate", "1e-2", *extra),
                 "-q", "-o", str(out)])
    assert code == 0
    return load_file(str(out))


def test_the_same_seed_trains_the_same_dropout_masks(images, tmp_path):
    torch.manual_seed(123)  # (what a caller's process did before: must not matter)
    a = _train(images, tmp_path / "a.safetensors", 5, "--network-dropout", "0.5", "--rank-dropout", "0.3")
    torch.rand(7)  # (the global RNG moved on between the runs)
    b = _train(images, tmp_path / "b.safetensors", 5, "--network-dropout", "0.5", "--rank-dropout", "0.3")
    c = _train(images, tmp_path / "c.safetensors", 6, "--network-dropout", "0.5", "--rank-dropout", "0.3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another seed: other masks (and another init), so other weights
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_up.weight"))


def test_the_masks_follow_the_global_seed(images, tmp_path, monkeypatch):
    """What the global RNG holds when fit starts is torch.manual_seed(--seed)'s state: the dropout draws are
    those of a generator seeded --seed."""
    import sdadapt.jobs.train as train_job

    seen = []
    real_fit = train_job.fit

    def spy(*args, **kwargs):
        seen.append(torch.get_rng_state())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_job, "fit", spy)
    torch.manual_seed(99)
    _train(images, tmp_path / "d.safetensors", 11, "--network-dropout", "0.5")
    assert len(seen) == 1 and torch.equal(seen[0], torch.Generator().manual_seed(11).get_state())
