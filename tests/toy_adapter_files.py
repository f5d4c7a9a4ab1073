"""Adapter files on the shipped toy model with random, known weights (what the loading tests read back)."""

from __future__ import annotations

from pathlib import Path

import torch

import sdadapt
from sdadapt.methods import METHODS

__all__ = ["random_adapter_file"]


def random_adapter_file(toy, path: Path, method: str, **options) -> dict[str, dict[str, torch.Tensor]]:
    """Save ``method``'s adapters on ``toy`` (built with seed 1, ``options``) to ``path`` with every parameter set to
    ``0.3 · randn`` from a generator seeded 7, remove them from the toy, and return what :func:`sdadapt.load_lora`
    reads from the file (``{component: {key: tensor}}``)."""
    adaptation = METHODS[method].adapt(toy, seed=1, **options)
    try:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in adaptation.params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adaptation.save(path)
    finally:
        adaptation.remove()
    return sdadapt.load_lora(path)[0]
