"""Module-scoped fixtures of a tiny random SD folder (ε) and its loaded system, for the tests of what runs on the
models (tiling, token merging, Hypertile): import them where used (``from tiny_sd_fixtures import system, tiny_sd``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """The folder (diffusers layout, random tiny models, ε prediction), built once per test module."""
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), prediction_type="epsilon")


@pytest.fixture(scope="module")
def system(tiny_sd):
    """``tiny_sd`` loaded on the CPU (a :class:`~sdadapt.diffusers_system.DiffusersSystem`)."""
    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sd), device=torch.device("cpu"))
