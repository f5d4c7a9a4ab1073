"""``python -m sdadapt inspect A B ...``: several files in one run, each report as its own run prints it,
under a ``==> FILE <==`` heading; ``--json``: a list; the exit code is the highest of the files'."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hostile_files import evil_pickles, kohya_lora

from sdadapt.cli import main
from sdadapt.errors import BROKEN_PIPE_CODE
from sdadapt.formats.files import write_safetensors


@pytest.fixture()
def files(tmp_path):
    """Two readable kohya LoRAs, a missing file and a pickle that would run code (``torch.save`` of an object)."""
    lora = write_safetensors(tmp_path / "a.safetensors", kohya_lora(0), {"ss_network_dim": "2"})
    other = write_safetensors(tmp_path / "b.safetensors", kohya_lora(1, rank=4, dtype=torch.float16), {})
    evil = evil_pickles(tmp_path / "evil", tmp_path / "marker")["zip"]
    return {"a": str(lora), "b": str(other), "missing": str(tmp_path / "missing.safetensors"), "evil": str(evil)}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_each_file_is_reported_as_its_own_run_under_its_heading(files, capsys):
    """The sections of one run over A, missing, B are A's and B's single-file reports, in order; the missing
    file's section holds nothing (its error is on stderr) and the exit code is its 3."""
    singles = {}
    for name in ("a", "b"):
        code, out, err = _run(capsys, files[name])
        assert code == 0 and err == "", err
        singles[name] = out
    code, out, err = _run(capsys, files["a"], files["missing"], files["b"])
    expected = (f"==> {files['a']} <==\n{singles['a']}\n==> {files['missing']} <==\n\n"
                f"==> {files['b']} <==\n{singles['b']}")
    assert out == expected
    assert code == 3  # (WeightFileError: the missing file's code, not 0 from the last file read)
    assert err.count("error: ") == 1 and files["missing"] in err, err


def test_the_exit_code_is_the_highest_of_the_files_codes(files, capsys):
    """missing (3) and a pickle that would run code (4), in either order: 4; a single file keeps its own code."""
    assert _run(capsys, files["missing"])[0] == 3
    assert _run(capsys, files["evil"])[0] == 4
    for order in ((files["missing"], files["evil"], files["a"]), (files["a"], files["evil"], files["missing"])):
        code, out, err = _run(capsys, *order)
        assert code == 4, (order, err)
        assert err.count("error: ") == 2
        assert out.count("==> ") == 3 and "kind:       kohya-lora" in out


def test_json_of_several_files_is_a_list_of_their_single_file_objects(files, capsys):
    """One file: its object (as before); several: a JSON list in the order given, a failed file's entry naming its
    error and exit code, the code the highest."""
    singles = {}
    for name in ("a", "b"):
        code, out, _ = _run(capsys, "--json", files[name])
        assert code == 0
        singles[name] = json.loads(out)
        assert isinstance(singles[name], dict) and singles[name]["file"] == files[name]
    code, out, err = _run(capsys, "--json", files["b"], files["evil"], files["a"])
    listed = json.loads(out)
    assert code == 4
    assert listed[0] == singles["b"] and listed[2] == singles["a"]
    assert listed[1]["file"] == files["evil"] and listed[1]["exit_code"] == 4
    assert listed[1]["error"] in err and "weights_only" in listed[1]["error"]


def test_json_of_one_unreadable_file_prints_no_object(files, capsys):
    """As before several files were taken: the error on stderr, nothing on stdout, the file's code."""
    code, out, err = _run(capsys, "--json", files["missing"])
    assert (code, out) == (3, "") and err.startswith("error: ") and files["missing"] in err


def test_a_closed_standard_output_ends_a_run_over_several_files_quietly(files, capsys, monkeypatch):
    """``inspect A B | head -1``: the first write fails; 141, no message, and B is never read."""
    import sdadapt.formats as formats

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no file descriptor in this test")

    read, real = [], formats.describe_file
    monkeypatch.setattr(formats, "describe_file", lambda path: read.append(path) or real(path))
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", files["a"], files["b"]]) == BROKEN_PIPE_CODE
    assert capsys.readouterr().err == ""
    assert read == []  # (the heading of A is the first write)
    assert main(["inspect", "--json", files["a"], files["missing"], files["b"]]) == BROKEN_PIPE_CODE


def test_a_bug_while_reading_one_file_stops_the_run_as_any_commands_bug(files, capsys, monkeypatch):
    """(review) An unexpected exception (a bug, exit 1) is not one file's error: it ends the run with the internal-error
    line, and the files after it are not read — where a file's own error (missing: 3) lets the next one be read."""
    from sdadapt import formats

    read, real = [], formats.describe_file

    def describe(path):
        read.append(path)
        if path == files["b"]:
            raise RuntimeError("boom in the reader")
        return real(path)

    monkeypatch.setattr(formats, "describe_file", describe)
    code, out, err = _run(capsys, files["a"], files["b"], files["missing"], files["a"])
    assert code == 1, err
    assert read == [files["a"], files["b"]]
    assert err.startswith("error: internal error (RuntimeError: boom in the reader)") and err.count("error: ") == 1
    assert out.count("==> ") == 2 and "kind:       kohya-lora" in out
    code, out, err = _run(capsys, "--json", files["missing"], files["b"], files["a"])
    assert code == 1 and out == "" and "internal error" in err  # (no half list: the run stopped)


# (A fresh interpreter costs ~4 s of CPU, nearly all of it importing torch: one child imports sdadapt once and forks
# each run from there; the forked run is ``python -m sdadapt``'s own: sdadapt/__main__.py run as __main__, its
# sys.exit and the interpreter's shutdown with its last flush of the closed stdout.)
_FORKED_RUNS = r"""
import json, os, runpy, sys
import sdadapt.cli  # (what python -m sdadapt imports before __main__ runs; done once for every run)
results = []
for argv in json.loads(sys.argv[1]):
    read, write = os.pipe()
    os.close(read)  # (the reader gone before the child's first write: it meets EPIPE)
    err_read, err_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(write, 1)
        os.dup2(err_write, 2)
        for fd in (write, err_read, err_write):
            os.close(fd)
        sys.argv = ["sdadapt", "inspect", *argv]
        runpy.run_module("sdadapt", run_name="__main__", alter_sys=True)  # (ends in sys.exit(main()))
        sys.exit(0)  # (unreached: __main__ exits)
    os.close(write)
    os.close(err_write)
    with os.fdopen(err_read, "rb") as err:
        stderr = err.read().decode()
    results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stderr])
print(json.dumps(results))
"""


def test_a_real_closed_pipe_ends_the_run_quietly_with_141(files):
    """``python -m sdadapt inspect A B ... | true``: the reader is gone before the first write. One file and several,
    text and JSON: exit 141, nothing on stderr (docs/formats.md, the exit-code table)."""
    import os
    import subprocess

    runs = [[files["a"]], [files["a"], files["b"]], ["--json", files["a"], files["b"]]]
    if hasattr(os, "fork"):
        child = subprocess.run([sys.executable, "-c", _FORKED_RUNS, json.dumps(runs)], capture_output=True, text=True,
                               timeout=300, check=False)
        assert child.returncode == 0 and child.stderr == "", child.stderr
        outcomes = json.loads(child.stdout)
    else:  # (no fork: one interpreter per run, as a shell starts it)
        outcomes = []
        for argv in runs:
            proc = subprocess.Popen([sys.executable, "-m", "sdadapt", "inspect", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            proc.stdout.close()  # (before the child has imported anything: its first write meets EPIPE)
            err = proc.stderr.read().decode()
            proc.stderr.close()
            outcomes.append([proc.wait(timeout=120), err])
    assert len(outcomes) == len(runs)
    for argv, (code, err) in zip(runs, outcomes):
        assert (code, err) == (BROKEN_PIPE_CODE, ""), argv


@pytest.mark.parametrize(("raised", "code", "goes_on"), [
    (RecursionError("maximum recursion depth exceeded"), 3, True),  # (translate_error: a file nested too deeply)
    (KeyboardInterrupt(), 130, False),  # (Ctrl-C ends the run, not one file)
])
def test_a_translated_error_is_one_files_and_an_interrupt_ends_the_run(files, capsys, monkeypatch, raised, code,
                                                                        goes_on):
    """(review) What ``python -m sdadapt`` reports for one file it reports per file: a RecursionError from a hostile
    file is that file's WeightFileError (3) and the next file is read; Ctrl-C stops the whole run with 130."""
    from sdadapt import formats

    read, real = [], formats.describe_file

    def describe(path):
        read.append(path)
        if path == files["b"]:
            raise raised
        return real(path)

    monkeypatch.setattr(formats, "describe_file", describe)
    got, _, err = _run(capsys, files["b"], files["a"])
    assert got == code, err
    assert read == ([files["b"], files["a"]] if goes_on else [files["b"]])
    assert err.count("error: ") == 1 and ("nested too deeply" in err if goes_on else "interrupted" in err), err


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_closed_pipe_with_block_buffered_stdout_ends_quietly_with_141(files):
    """The same as a shell starts it without ``PYTHONUNBUFFERED`` (which a CI or a container often sets, and
    which makes every write meet the closed pipe at once): stdout is block-buffered, the report waits in the
    buffer and the pipe breaks at a flush — bytes the interpreter's last flush would try again (``Exception
    ignored ... BrokenPipeError``, exit 120) unless ``main`` flushes it while it can still answer for it and then
    points stdout at the null device. Exit 141, nothing on stderr."""
    import os
    import subprocess

    runs = [[files["a"]], ["--json", files["a"], files["b"]]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.run([sys.executable, "-c", _FORKED_RUNS, json.dumps(runs)], capture_output=True, text=True,
                           timeout=300, check=False, env=env)
    assert child.returncode == 0 and child.stderr == "", child.stderr
    assert json.loads(child.stdout) == [[BROKEN_PIPE_CODE, ""]] * len(runs)
