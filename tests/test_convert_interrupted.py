"""``convert`` replacing a model folder renames twice (OUT -> .OUT-pid-old, .OUT-pid-new -> OUT); a
process killed between the two leaves the previous model only as ``.OUT-pid-old``. The next run
puts it back (never deleting the only good copy), or tidies what is stale, and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
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


# ----------------------------------------------------------------------------- what recovery never touches
# (review: each test below fails on a mutant of recover_interrupted / _pid_alive / _remove)


def test_leftovers_of_this_process_or_of_an_unknowable_one_are_kept(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    foreign = _dead_pid()  # stands for another user's process: os.kill says EPERM, not "no such process"
    real_kill = os.kill

    def kill(pid, sig):
        if pid == foreign:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    kept = [tmp_path / f".model-{os.getpid()}-old", tmp_path / f".model-{os.getpid()}-new",
            tmp_path / f".model-{foreign}-old", tmp_path / f".model-{foreign}-new"]
    for path in kept:
        path.mkdir()
    assert cm.recover_interrupted(out) == []
    assert all(p.is_dir() for p in kept)


def test_names_that_merely_look_like_leftovers_are_not_touched(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "model"
    out.mkdir()
    lookalikes = [tmp_path / f".model-{dead}-old.safetensors",  # a file-output name, next to a folder OUT
                  tmp_path / f".model-{dead}-old-backup", tmp_path / f".model-{dead}-older",
                  tmp_path / f".model-x{dead}-old", tmp_path / f"model-{dead}-old",
                  tmp_path / f".model-5-{dead}-old",  # (OUT model-5's leftover, not model's)
                  tmp_path / f".Model-{dead}-old"]
    for path in lookalikes:
        path.write_text("mine") if path.suffix else path.mkdir()
    assert cm.recover_interrupted(out) == []
    assert all(p.exists() for p in lookalikes)


def test_a_file_out_has_no_old_leftovers(tmp_path):
    dead = _dead_pid()
    mine = tmp_path / f".model-{dead}-old.safetensors"
    mine.write_text("mine")
    file_out = tmp_path / "model.safetensors"
    file_out.write_text("model")
    folder_like = tmp_path / f".model-{dead}-new"
    folder_like.mkdir()
    stale = tmp_path / f".model-{dead}-new.safetensors"
    stale.write_text("partial")
    lines = cm.recover_interrupted(file_out)
    assert len(lines) == 1 and not stale.exists() and folder_like.is_dir() and file_out.read_text() == "model"
    assert mine.read_text() == "mine"


def test_a_symlinked_leftover_is_unlinked_never_followed(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "weights").write_text("keep me")
    out = tmp_path / "work" / "model"
    out.mkdir(parents=True)
    for part in ("old", "new"):
        (out.parent / f".model-{dead}-{part}").symlink_to(target, target_is_directory=True)
    assert len(cm.recover_interrupted(out)) == 2
    assert sorted(out.parent.iterdir()) == [out] and (target / "weights").read_text() == "keep me"
    # OUT missing: the symlinked previous copy (OUT was a link when the run was killed) is put back as the link
    out.rmdir()
    (out.parent / f".model-{dead}-old").symlink_to(target, target_is_directory=True)
    cm.recover_interrupted(out)
    assert out.is_symlink() and os.readlink(out) == str(target) and (target / "weights").is_file()


def _snapshot(out):
    return {p.relative_to(out.parent): p.read_bytes() for p in ([out] if out.is_file() else sorted(out.rglob("*")))
            if p.is_file()}


@pytest.mark.parametrize("to", ["diffusers", "ldm"])
@pytest.mark.parametrize("failure", ["read", "prediction"])
def test_a_failed_read_back_leaves_out_as_it_was(tmp_path, monkeypatch, to, failure):
    """The output is written and read back beside OUT before it is renamed into place: a failed check (an error
    reading it, or another prediction type than the model's) makes no OUT (nor the folders it would have made),
    keeps an existing OUT byte for byte, leaves no temporary, and its message names OUT, not the scratch copy."""
    from sdadapt.errors import WeightFileError

    source = _half_sd1_file(tmp_path / "m.safetensors")
    out = tmp_path / "new" / "deeper" / ("model" if to == "diffusers" else "model.safetensors")
    real = cm._read_back

    def failing(target, *args, **kwargs):
        if failure == "prediction":
            return real(target, *args, **kwargs)[0], "v_prediction"
        raise WeightFileError(f"{target}: unreadable (forced)")

    with monkeypatch.context() as patch:
        patch.setattr(cm, "_read_back", failing)
        with pytest.raises(WeightFileError, match=rf"^{out}: ") as caught:
            cm.convert_model(source, out, to=to)
        assert ".model-" not in str(caught.value)
    assert not (tmp_path / "new").exists()
    cm.convert_model(source, out, to=to)
    before = _snapshot(out)
    with monkeypatch.context() as patch:
        patch.setattr(cm, "_read_back", failing)
        with pytest.raises(WeightFileError, match=rf"^{out}: "):
            cm.convert_model(source, out, to=to, dtype=torch.float32, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    cm.convert_model(source, out, to=to, dtype=torch.float32, overwrite=True)  # (a passing check replaces it)
    assert _snapshot(out) != before and sorted(p.name for p in out.parent.iterdir()) == [out.name]
