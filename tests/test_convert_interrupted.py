"""``convert`` replacing a model folder renames twice (OUT -> .OUT-pid-old, .OUT-pid-new -> OUT); a
process killed between the two leaves the previous model only as ``.OUT-pid-old``. The next run
puts it back (never deleting the only good copy), or tidies what is stale, and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_convert_checkpoint import _half_sd1_file

from sdadapt.cli import main
from sdadapt.errors import OutputError
from sdadapt.jobs import convert_model as cm


class _Killed(BaseException):
    """Stands for the process dying: nothing after it runs (not even the restoring rename)."""


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _crash_between_renames(monkeypatch, source, out):
    real = os.replace

    def replace(a, b):
        if os.fspath(b) == os.fspath(out) and os.path.basename(a).startswith(".model-"):
            raise _Killed()  # the second rename (.OUT-pid-new -> OUT) and the restore never happen
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        cm.convert_model(source, out, to="diffusers", overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    # the leftovers of "another process": rename them to a pid that is no longer running
    dead = _dead_pid()
    for path in out.parent.iterdir():
        if f"-{os.getpid()}-" in path.name:
            os.rename(path, path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{dead}-")))
    return dead


def test_a_crash_between_the_renames_is_recovered_by_the_next_run(tmp_path, monkeypatch, capsys):
    source = _half_sd1_file(tmp_path / "m.safetensors")
    out = tmp_path / "model"
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(out), "--dtype", "fp32", "-q"]) == 0
    before = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    dead = _crash_between_renames(monkeypatch, source, out)
    old = tmp_path / f".model-{dead}-old"
    assert not out.exists() and old.is_dir()  # the only good copy
    stale_new = tmp_path / f".model-{dead}-new"
    stale_new.mkdir()  # (a real kill also leaves the unfinished write)
    (stale_new / "partial").write_text("x")
    live = tmp_path / f".model-{os.getppid()}-new"  # a leftover of a process still running: not touched
    live.mkdir()

    # without --overwrite: the previous model is put back, then the usual refusal
    code = main(["convert", str(source), "--to", "diffusers", "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "--overwrite" in err and f"restored from .model-{dead}-old" in err
    assert not old.exists() and not stale_new.exists() and live.is_dir()
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)

    # the crash again, then the same run with --overwrite completes
    dead = _crash_between_renames(monkeypatch, source, out)
    result = cm.convert_model(source, out, to="diffusers", overwrite=True)
    assert any(f"restored from .model-{dead}-old" in n for n in result.notes)
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


def test_several_previous_copies_are_named_not_guessed(tmp_path):
    out = tmp_path / "model"
    copies = [tmp_path / f".model-{_dead_pid()}-old" for _ in range(2)]
    for path in copies:
        path.mkdir()
    with pytest.raises(OutputError, match="2 previous copies") as info:
        cm.recover_interrupted(out)
    assert all(str(p) in str(info.value) for p in copies) and all(p.is_dir() for p in copies)
    out.mkdir()  # OUT back: the copies it replaced are stale
    lines = cm.recover_interrupted(out)
    assert len(lines) == 2 and not any(p.exists() for p in copies) and out.is_dir()
    assert cm.recover_interrupted(tmp_path / "other.safetensors") == []
