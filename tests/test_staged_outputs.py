"""Saves of several files are all or nothing: staged_outputs(), the Custom Diffusion save (weights +
token files) and DreamArtist's pair. A failure in any file's writer, Ctrl-C, an output that appears
meanwhile or a failed rename leaves every earlier file byte-identical and no temporary behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import threading
from pathlib import Path

import pytest
import torch

from sdadapt import Embedding
from sdadapt.errors import DiskSpaceError, OutputExistsError
from sdadapt.formats import files
from sdadapt.formats.custom_diffusion import (
    PROMPTS_KEY,
    TOKENS_KEY,
    load_custom_diffusion,
    save_custom_diffusion_file,
)
from sdadapt.formats.diffusers import load_peft, save_peft
from sdadapt.formats.files import atomic_write, staged_outputs, write_safetensors
from sdadapt.methods.dreamartist import load_dreamartist, prepare_dreamartist
from sdadapt.toy import build_toy

safetensors_torch = pytest.importorskip("safetensors.torch")

_FAILURES = [
    pytest.param(lambda: OSError(errno.ENOSPC, "No space left on device"), DiskSpaceError, id="disk-full"),
    pytest.param(lambda: KeyboardInterrupt(), KeyboardInterrupt, id="ctrl-c"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden temporaries included) -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write_bytes(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


def _fail_on_write(monkeypatch, number: int, error) -> None:
    """The ``number``-th file write (1-based; safetensors payloads and torch.save pickles alike) writes
    a few bytes, then raises ``error()``: a disk that fills up, or Ctrl-C, in the middle of that file."""
    from sdadapt.formats import torch_files

    calls = {"n": 0}
    real_payload, real_bytes = files._write_payload, torch_files._write_bytes

    def failing(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == number:
                Path(args[0]).write_bytes(b"partial")
                raise error()
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(files, "_write_payload", failing(real_payload))
    monkeypatch.setattr(torch_files, "_write_bytes", failing(real_bytes))  # (the .pt / .bin writes)


# ------------------------------------------------------------------------------ the mechanism
@pytest.mark.parametrize(("error", "raised"), _FAILURES)
def test_a_failed_second_write_changes_nothing_and_leaves_no_temporaries(tmp_path, error, raised):
    (tmp_path / "a.bin").write_bytes(b"old a")
    (tmp_path / "b.bin").write_bytes(b"old b")
    before = _snapshot(tmp_path)

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise error()

    with pytest.raises(raised), staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"new a"), stage=stage)
        assert (tmp_path / "a.bin").read_bytes() == b"old a"  # staged: not in place yet
        atomic_write(tmp_path / "b.bin", fail, stage=stage)
    assert _snapshot(tmp_path) == before
    with pytest.raises(RuntimeError), staged_outputs() as stage:  # any error in the block: the same
        atomic_write(tmp_path / "c.bin", _write_bytes(b"new c"), stage=stage)
        raise RuntimeError("the caller failed after the writes")
    assert _snapshot(tmp_path) == before


def test_the_files_appear_together_with_a_new_files_mode_or_the_replaced_files(tmp_path):
    old = tmp_path / "old.bin"
    old.write_bytes(b"old")
    os.chmod(old, 0o600)
    with staged_outputs() as stage:
        atomic_write(old, _write_bytes(b"replaced"), stage=stage)
        write_safetensors(tmp_path / "new.safetensors", {"w": torch.arange(6.0).view(2, 3)}, {"k": "v"}, stage=stage)
        assert stage.paths == [old, tmp_path / "new.safetensors"]
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["old.bin"]
    assert old.read_bytes() == b"replaced" and stat.S_IMODE(old.stat().st_mode) == 0o600
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "new.safetensors").read_bytes() == safetensors_torch.save({"w": torch.arange(6.0).view(2, 3)}, {"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors", "old.bin"]  # no temporaries


def test_a_staged_temporary_stays_locked_until_its_rename(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    with staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"a"), stage=stage)
        (temporary,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        with open(temporary, "rb") as handle, pytest.raises(OSError):  # another open file description: not our lock
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert _snapshot(tmp_path) == {"a.bin": b"a"}


def test_an_output_that_appears_before_the_renames_is_refused_and_nothing_moves(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old a")
    with pytest.raises(OutputExistsError, match=r"b\.bin: appeared.*nothing was changed"), staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"new a"), overwrite=True, stage=stage)
        atomic_write(tmp_path / "b.bin", _write_bytes(b"new b"), overwrite=False, stage=stage)
        (tmp_path / "b.bin").write_bytes(b"someone else's")  # appears after b's check, before the renames
    assert _snapshot(tmp_path) == {"a.bin": b"old a", "b.bin": b"someone else's"}
    (tmp_path / "b.bin").unlink()
    with pytest.raises(OutputExistsError, match=r"a\.bin: already exists"), staged_outputs() as stage:
        atomic_write(tmp_path / "b.bin", _write_bytes(b"new b"), overwrite=False, stage=stage)
        atomic_write(tmp_path / "a.bin", _write_bytes(b"new a"), overwrite=False, stage=stage)
    assert _snapshot(tmp_path) == {"a.bin": b"old a"}


@pytest.mark.parametrize(("error", "raised"), [
    pytest.param(lambda: OSError(errno.EIO, "Input/output error"), files.OutputError, id="io-error"),
    pytest.param(lambda: KeyboardInterrupt(), KeyboardInterrupt, id="ctrl-c"),
])
@pytest.mark.parametrize("second_exists", [True, False])
def test_a_failed_rename_puts_back_what_was_already_renamed(tmp_path, monkeypatch, error, raised, second_exists):
    (tmp_path / "a.bin").write_bytes(b"old a")
    (tmp_path / "c.bin").write_bytes(b"old c")
    if second_exists:
        (tmp_path / "b.bin").write_bytes(b"old b")
    before = _snapshot(tmp_path)
    real_replace, real_link = os.replace, os.link

    def fail_for_b(real):
        def move(src, dst, *args, **kwargs):
            if Path(dst).name == "b.bin" and str(src).endswith(".tmp"):
                raise error()
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", fail_for_b(real_replace))
    monkeypatch.setattr(os, "link", fail_for_b(real_link))
    with pytest.raises(raised), staged_outputs() as stage:
        atomic_write(tmp_path / "new.bin", _write_bytes(b"new"), overwrite=False, stage=stage)  # renamed, then removed
        atomic_write(tmp_path / "a.bin", _write_bytes(b"new a"), stage=stage)  # renamed, then restored
        atomic_write(tmp_path / "b.bin", _write_bytes(b"new b"), overwrite=second_exists, stage=stage)
        atomic_write(tmp_path / "c.bin", _write_bytes(b"new c"), stage=stage)  # never renamed
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("second_exists", [True, False])
def test_ctrl_c_right_after_a_rename_also_puts_that_file_back(tmp_path, monkeypatch, second_exists):
    """Python delivers a SIGINT that arrives during a rename system call just after the call
    returns: the rename has happened but the commit has not noted it yet. That file is put back as
    well (before: it stayed new beside the restored old ones — the mix staging exists to prevent)."""
    (tmp_path / "a.bin").write_bytes(b"old a")
    if second_exists:
        (tmp_path / "b.bin").write_bytes(b"old b")
    before = _snapshot(tmp_path)
    real_replace, real_link = os.replace, os.link
    interrupted: list[str] = []

    def interrupted_after_b(real):
        def move(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            if Path(dst).name == "b.bin" and not interrupted:  # once: putting b back is a rename to b too
                interrupted.append(str(src))
                raise KeyboardInterrupt
            return result
        return move

    monkeypatch.setattr(os, "replace", interrupted_after_b(real_replace))
    monkeypatch.setattr(os, "link", interrupted_after_b(real_link))
    with pytest.raises(KeyboardInterrupt), staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"new a"), stage=stage)
        atomic_write(tmp_path / "b.bin", _write_bytes(b"new b"), overwrite=second_exists, stage=stage)
        atomic_write(tmp_path / "c.bin", _write_bytes(b"new c"), overwrite=False, stage=stage)
    assert _snapshot(tmp_path) == before


def test_a_target_twice_or_a_write_after_the_block_is_refused(tmp_path):
    with pytest.raises(ValueError, match="written twice"), staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"1"), stage=stage)
        atomic_write(tmp_path / "." / "a.bin", _write_bytes(b"2"), stage=stage)
    assert _snapshot(tmp_path) == {}
    with staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"1"), stage=stage)
    with pytest.raises(ValueError, match="has ended"):
        atomic_write(tmp_path / "b.bin", _write_bytes(b"2"), stage=stage)
    assert _snapshot(tmp_path) == {"a.bin": b"1"}


def test_a_write_from_another_thread_that_finishes_after_the_block_is_refused_and_removed(tmp_path):
    """A stage shared with a worker thread: a write still running when the block ends (its renames
    done) is refused when it finishes — its temporary removed and its lock released — instead of
    returning as if staged while its file never appears (before: a silent lost output, a leaked
    temporary and an open descriptor)."""
    started, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def slow(tmp: str) -> None:
        started.set()
        release.wait(10)
        Path(tmp).write_bytes(b"late")

    def worker(stage) -> None:
        try:
            outcome["returned"] = atomic_write(tmp_path / "late.bin", slow, stage=stage)
        except ValueError as exc:
            outcome["raised"] = exc

    with staged_outputs() as stage:
        atomic_write(tmp_path / "a.bin", _write_bytes(b"a"), stage=stage)
        thread = threading.Thread(target=worker, args=(stage,))
        thread.start()
        assert started.wait(10)
    release.set()
    thread.join(10)
    assert "returned" not in outcome and "has ended" in str(outcome["raised"])
    assert _snapshot(tmp_path) == {"a.bin": b"a"}  # no temporary left behind


# ------------------------------------------------------------------------------ Custom Diffusion
_LAYERS = ("down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0")


def _cd_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{layer}.attn2.processor.{name}": torch.randn(8, 6, generator=g)
            for layer in _LAYERS for name in ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")}


def _tokens(names, seed: int) -> list[Embedding]:
    g = torch.Generator().manual_seed(seed)
    return [Embedding(name, {"text_encoder": torch.randn(1, 6, generator=g)}) for name in names]


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize(("error", "raised"), _FAILURES)
@pytest.mark.parametrize("failing", [2, 3])
def test_a_custom_diffusion_save_that_fails_on_a_token_file_keeps_the_earlier_save(tmp_path, monkeypatch, suffix,
                                                                                   error, raised, failing):
    """Retraining <sks> into the same name: a failed save must not leave new weights beside the old
    <sks> token (the loader could not tell), nor remove the old save's third token file."""
    path = tmp_path / f"cd{suffix}"
    save_custom_diffusion_file(path, _cd_weights(0), embeddings=_tokens(["<sks>", "<b>", "<c>"], 0))
    (tmp_path / "unrelated.txt").write_bytes(b"x")
    before = _snapshot(tmp_path)
    _fail_on_write(monkeypatch, failing, error)
    with pytest.raises(raised):
        save_custom_diffusion_file(path, _cd_weights(1), embeddings=_tokens(["<sks>", "<b>"], 1))
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    loaded = load_custom_diffusion(path)
    assert all(torch.equal(loaded.weights[k], v) for k, v in _cd_weights(0).items())
    assert loaded.tokens == ["<sks>", "<b>", "<c>"]
    save_custom_diffusion_file(path, _cd_weights(1), embeddings=_tokens(["<sks>", "<b>"], 1))  # then it works
    loaded = load_custom_diffusion(path)
    assert all(torch.equal(loaded.weights[k], v) for k, v in _cd_weights(1).items())
    assert [torch.equal(e.vectors["text_encoder"], t.vectors["text_encoder"])
            for e, t in zip(loaded.embeddings, _tokens(["<sks>", "<b>"], 1))] == [True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["unrelated.txt", f"cd{suffix}", f"cd-token1{suffix}",
                                                                 f"cd-token2{suffix}"])


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("existing", ["weights", "token"])
def test_a_custom_diffusion_save_without_overwrite_and_one_existing_output_writes_nothing(tmp_path, suffix, existing):
    path = tmp_path / f"cd{suffix}"
    (tmp_path / (path.name if existing == "weights" else f"cd-token2{suffix}")).write_bytes(b"mine")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_custom_diffusion_file(path, _cd_weights(0), embeddings=_tokens(["<a>", "<b>"], 0), overwrite=False)
    assert _snapshot(tmp_path) == before


def _parsed(raw: bytes) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of safetensors bytes (the library orders metadata keys as a hash map does)."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def test_a_custom_diffusion_save_writes_what_the_safetensors_library_writes(tmp_path):
    path = tmp_path / "cd.safetensors"
    weights, tokens = _cd_weights(2), _tokens(["<a>", "<b>"], 2)
    written = save_custom_diffusion_file(path, weights, embeddings=tokens, prompts=["a <a> dog"], metadata={"k": "v"})
    assert written == [path, tmp_path / "cd-token1.safetensors", tmp_path / "cd-token2.safetensors"]
    placeholders = {f"{layer}.attn1.processor": torch.zeros(0) for layer in _LAYERS}
    meta = {"format": "pt", "k": "v", TOKENS_KEY: json.dumps(["<a>", "<b>"]), PROMPTS_KEY: json.dumps(["a <a> dog"])}
    assert _parsed(path.read_bytes()) == _parsed(safetensors_torch.save({**placeholders, **weights}, meta))
    for file, token in zip(written[1:], tokens):
        assert file.read_bytes() == safetensors_torch.save({token.name: token.vectors["text_encoder"][0]}, {"format": "pt"})


def test_a_custom_diffusion_bin_save_holds_diffusers_dicts(tmp_path):
    path = tmp_path / "cd.bin"
    weights, tokens = _cd_weights(3), _tokens(["<a>"], 3)
    assert save_custom_diffusion_file(path, weights, embeddings=tokens) == [path, tmp_path / "cd-token.bin"]
    state = torch.load(path, weights_only=True)
    assert list(state) == [f"{layer}.attn1.processor" for layer in _LAYERS] + list(weights)
    assert all(state[f"{layer}.attn1.processor"] == {} for layer in _LAYERS)
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    token = torch.load(tmp_path / "cd-token.bin", weights_only=True)
    assert list(token) == ["<a>"] and torch.equal(token["<a>"], tokens[0].vectors["text_encoder"][0])


# ------------------------------------------------------------------------------ DreamArtist
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(("error", "raised"), _FAILURES)
def test_a_dreamartist_save_that_fails_on_the_second_file_keeps_the_earlier_pair(tmp_path, monkeypatch, suffix,
                                                                                 error, raised):
    torch.manual_seed(0)
    da = prepare_dreamartist(build_toy(seed=5), token="purple", negative_vectors=2)
    path = tmp_path / f"purple{suffix}"
    da.save(path)
    old_positive, old_negative = load_dreamartist(path)
    before = _snapshot(tmp_path)
    with torch.no_grad():
        for param in da.params:
            param.add_(1.0)
    _fail_on_write(monkeypatch, 2, error)
    with pytest.raises(raised):
        da.save(path)
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    assert da.save(path) == path
    positive, negative = load_dreamartist(path)
    for new, old in ((positive, old_positive), (negative, old_negative)):
        torch.testing.assert_close(new.vectors["text_encoder"], old.vectors["text_encoder"] + 1.0, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"purple{suffix}", f"purple-neg{suffix}"])


# ------------------------------------------------------------------------------ peft folder
def _lora_state(rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = "down_blocks.0.attentions.0.proj_in"
    return {f"{layer}.lora_down.weight": torch.randn(rank, 8, generator=g),
            f"{layer}.lora_up.weight": torch.randn(8, rank, generator=g), f"{layer}.alpha": torch.tensor(float(alpha))}


@pytest.mark.parametrize(("error", "raised"), _FAILURES)
def test_a_peft_save_that_fails_on_the_config_keeps_the_earlier_weights_and_config(tmp_path, monkeypatch, error, raised):
    """New rank-2 weights beside the old rank-4 config would load with the wrong alpha/rank scale."""
    save_peft(tmp_path, _lora_state(4, 2.0, 0))
    before = _snapshot(tmp_path)
    real = Path.write_text

    def fail(self, *args, **kwargs):
        real(self, "{", *args[1:], **kwargs)
        raise error()

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(raised):
        save_peft(tmp_path, _lora_state(2, 8.0, 1))
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    loaded = load_peft(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in _lora_state(4, 2.0, 0).items() if not k.endswith("alpha"))
    save_peft(tmp_path, _lora_state(2, 8.0, 1))
    loaded = load_peft(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in _lora_state(2, 8.0, 1).items())


# ------------------------------------------------------------ a signal the moment a temporary appears
@pytest.mark.parametrize("staged", [False, True])
def test_a_signal_just_after_the_temporary_file_is_made_still_removes_it(tmp_path, monkeypatch, staged):
    """The window test_hostile_inputs' SIGTERM-mid-merge test hit under load (1 run in 12): the
    handler ran inside ``mkstemp``, after the file was made and before its name was known, so the
    cleanup could not remove it."""
    import signal
    import tempfile

    from sdadapt.cli.options import terminate_as_interrupt
    from sdadapt.errors import Interrupted

    real = tempfile.mkstemp
    made: list[str] = []

    def mkstemp_then_signal(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once unless held
        for _ in range(1000):  # bytecode boundaries where a pending Python handler runs
            pass
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)
    out = tmp_path / "a.bin"
    with pytest.raises(Interrupted), terminate_as_interrupt():
        if staged:
            with staged_outputs() as stage:
                atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"x"), stage=stage)
        else:
            atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"x"))
    assert made and sorted(os.listdir(tmp_path)) == []


def test_signals_held_delivers_a_held_signal_when_the_block_ends(tmp_path):
    import signal

    from sdadapt.cli.options import terminate_as_interrupt
    from sdadapt.errors import Interrupted

    reached = []
    with pytest.raises(Interrupted), terminate_as_interrupt():
        with files.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            reached.append("end of block")
        reached.append("after the block")  # not reached: the held signal raises as the block ends
    assert reached == ["end of block"]


class _Stop(Exception):
    pass


def _raising(number, frame):
    raise _Stop


def _quiet(number, frame):
    pass


def _signal_blocks():
    from sdadapt.cli.options import terminate_as_interrupt

    return {"signals_held": files.signals_held, "terminate_as_interrupt": terminate_as_interrupt}


@contextlib.contextmanager
def _handlers(sigint, sigterm, sighup):
    """Install these Python handlers for the test, put back what was there after it."""
    saved = {number: signal.signal(number, handler) for number, handler in
             ((signal.SIGINT, sigint), (signal.SIGTERM, sigterm), (signal.SIGHUP, sighup))}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


@pytest.mark.parametrize("block", ["signals_held", "terminate_as_interrupt"])
def test_a_signal_while_the_handlers_are_put_back_still_puts_back_the_others(monkeypatch, block):
    """The block puts SIGINT's handler back first: a SIGINT that arrives right then raises from it
    at once. SIGTERM and SIGHUP must get their handlers back all the same (not stay with the
    block's handler, which would swallow every later SIGTERM)."""
    real = signal.signal
    sent: list[int] = []

    def put_back_then_signal(number, handler):
        previous = real(number, handler)
        if handler is _raising and not sent:
            sent.append(number)
            os.kill(os.getpid(), signal.SIGINT)  # the restored handler runs at once
        return previous

    with _handlers(_raising, _quiet, _quiet):
        try:
            with pytest.raises(_Stop):
                with _signal_blocks()[block]():
                    monkeypatch.setattr(signal, "signal", put_back_then_signal)
        finally:
            monkeypatch.undo()
        assert sent and signal.getsignal(signal.SIGTERM) is _quiet and signal.getsignal(signal.SIGHUP) is _quiet


@pytest.mark.parametrize("block", ["signals_held", "terminate_as_interrupt"])
def test_a_signal_while_the_block_is_set_up_puts_back_the_handlers_already_swapped(monkeypatch, block):
    """The block swaps SIGINT's handler, then SIGTERM's, then SIGHUP's: a SIGHUP arriving between two
    swaps runs its own (raising) handler at once; SIGINT and SIGTERM must get theirs back."""
    real = signal.signal
    sent: list[int] = []

    def swap_then_signal(number, handler):
        previous = real(number, handler)
        if number == signal.SIGTERM and not sent:
            sent.append(number)
            os.kill(os.getpid(), signal.SIGHUP)  # its handler is not swapped yet: raises now
        return previous

    with _handlers(_quiet, _quiet, _raising):
        monkeypatch.setattr(signal, "signal", swap_then_signal)
        try:
            with pytest.raises(_Stop):
                with _signal_blocks()[block]():
                    pass
        finally:
            monkeypatch.undo()
        assert sent and signal.getsignal(signal.SIGINT) is _quiet and signal.getsignal(signal.SIGTERM) is _quiet
