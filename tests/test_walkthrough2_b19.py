"""Walkthrough 2 (review of the follow-ups): ``jobs.model_size``'s header cache is keyed on the file version — path,
size, mtime *and* inode — so a model replaced by another of the very same size is read anew whether the replacement
kept the mtime (an atomic ``os.replace``: a new inode) or the inode (an in-place rewrite: a new mtime); and
``FitConfig``'s ``step=None`` default is resolved by ``step_config`` without touching a step the caller gave.

The files are tiny safetensors state dicts of scalars under LDM key names (the rules read key names and shapes only);
the two versions differ only in ``edm_mean`` / ``edm_std`` (Playground v2.5's keys, what tells an EDM model) against
keys of the same length, so their sizes are equal byte for byte.
"""

from __future__ import annotations

import os

import pytest
import torch

from sdadapt.jobs import model_size
from sdadapt.jobs.model_size import model_default_sampler, model_edm_scheduler

#: SDXL keys (downsampling layers and both text encoders): what checkpoint_architecture needs to call a file SDXL
_SDXL_KEYS = [*(f"model.diffusion_model.input_blocks.{n}.0.op.weight" for n in (3, 6)),
              *(f"first_stage_model.encoder.down.{n}.downsample.conv.weight" for n in (0, 1, 2)),
              "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
              "conditioner.embedders.1.model.token_embedding.weight", "model.diffusion_model.label_emb.0.0.weight"]
_EDM = ["edm_mean", "edm_std"]
_NOT_EDM = ["edm_meaX", "edm_stX"]  # (the same lengths: the file's size does not change)


def _write(path, extra):
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1) for key in [*_SDXL_KEYS, *extra]}, str(path))
    return path


@pytest.fixture
def fresh_cache():
    model_size._cached_header_shapes.cache_clear()
    yield
    model_size._cached_header_shapes.cache_clear()


def test_an_atomic_replacement_of_the_same_size_and_mtime_is_read_anew(tmp_path, fresh_cache):
    """``os.replace`` of a same-size file whose mtime was set to the old one's: only the inode tells the versions apart
    (a converter or merger writes atomically, so this is how a model file is replaced)."""
    model = _write(tmp_path / "m.safetensors", _NOT_EDM)
    assert model_default_sampler(model) == "ddim" and model_edm_scheduler(model) is None
    before = model.stat()
    new = _write(tmp_path / "new.safetensors", _EDM)
    assert new.stat().st_size == before.st_size
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(new, model)
    after = model.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    assert model_default_sampler(model) == "dpmsolver++" and model_edm_scheduler(model) is not None


def test_an_in_place_rewrite_of_the_same_size_is_read_anew(tmp_path, fresh_cache):
    """The same inode and size, the bytes rewritten in place (a later mtime): read anew."""
    model = _write(tmp_path / "m.safetensors", _EDM)
    assert model_default_sampler(model) == "dpmsolver++"
    before = model.stat()
    data = _write(tmp_path / "other.safetensors", _NOT_EDM).read_bytes()
    assert len(data) == before.st_size
    with open(model, "r+b") as handle:  # (in place: the inode stays)
        handle.write(data)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    after = model.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert model_default_sampler(model) == "ddim" and model_edm_scheduler(model) is None


def test_the_same_version_is_read_once(tmp_path, fresh_cache, monkeypatch):
    """Asked again about an unchanged file: the cached answer, no second header read."""
    import sdadapt.formats.files as files

    reads = []
    real = files.read_safetensors_header
    monkeypatch.setattr(files, "read_safetensors_header", lambda *a, **k: reads.append(1) or real(*a, **k))
    model = _write(tmp_path / "m.safetensors", _EDM)
    for _ in range(3):
        assert model_default_sampler(model) == "dpmsolver++"
    assert model_size.model_size_multiple(model) == 8 and model_size.model_is_sdxl(model) is True
    assert len(reads) == 1


def test_fit_config_step_given_is_returned_as_given_and_none_is_resolved_per_formulation():
    """``step_config`` returns the caller's own step object (whatever the formulation) and resolves only ``None``:
    γ 5 on a DDPM model, none on an EDM one. Library code that read ``FitConfig().step.<field>`` reads
    ``FitConfig().step_config().<field>`` now (``step`` is ``None`` until given)."""
    from sdadapt.methods.fit import DEFAULT_MIN_SNR_GAMMA, FitConfig
    from sdadapt.training.step import StepConfig

    mine = StepConfig(min_snr_gamma=None, noise_offset=0.05)
    for edm in (False, True):
        assert FitConfig(step=mine).step_config(edm=edm) is mine
    assert FitConfig().step is None
    assert FitConfig().step_config().min_snr_gamma == DEFAULT_MIN_SNR_GAMMA == 5.0
    assert FitConfig().step_config(edm=True).min_snr_gamma is None
    rest = {k: v for k, v in vars(FitConfig().step_config()).items() if k != "min_snr_gamma"}
    assert rest == {k: v for k, v in vars(StepConfig()).items() if k != "min_snr_gamma"}
    assert FitConfig().step_config(edm=True) == StepConfig()
