"""One report of how weights fit a model (formats.key_source.fit_report) and one reader of the
versioned run.json entries (jobs.run_versions.recorded_version), shared by their callers."""

import pytest
import torch
from torch import nn

from sdadapt.errors import WeightFileError
from sdadapt.formats.key_source import fit_report
from sdadapt.jobs.run_versions import recorded_version


def test_fit_report_lists_missing_unexpected_and_mismatched_keys():
    report = fit_report({"a": (2, 3), "b": (1,), "x": (4,)}, {"a": (2, 3), "b": (2,), "c": (5,)})
    assert not report.ok
    assert report.missing == ("c",) and report.unexpected == ("x",)
    assert report.mismatched == ("b: shape (1,), the model's (2,)",)
    assert "1 missing keys: 'c'" in report.problems() and "'x'" in report.problems()
    assert fit_report({"a": (2,)}, {"a": (2,)}).ok


def test_diffusers_loader_names_the_keys_that_do_not_fit(tmp_path):
    from sdadapt.diffusers_system import _load

    module = nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(WeightFileError, match=r"the unet weights do not fit .*1 missing keys: 'bias'.*weight: shape "
                                              r"\(2, 4\), the model's \(2, 3\).*'extra'"):
        _load(module, state, name="unet", source=tmp_path / "model.safetensors")


def test_recorded_version_new_legacy_and_edited():
    assert recorded_version(None, "k", new="n", legacy="l") == "n"
    assert recorded_version({}, "k", new="n", legacy="l") == "l"
    assert recorded_version({"k": "n"}, "k", new="n", legacy="l") == "n"
    with pytest.raises(ValueError, match="run.json's k 'z' is not 'n' or 'l'; the file was edited"):
        recorded_version({"k": "z"}, "k", new="n", legacy="l")
