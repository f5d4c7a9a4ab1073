"""One writer per output: an exclusive lock file beside ``OUT`` for the commands that write then read back.

Each write of ``convert`` is atomic (a temporary renamed into place), so a reader never sees half a
file. Two runs writing one ``OUT`` at once still go wrong between the writes: a folder that
replaces an existing one takes two renames (``OUT -> .OUT-<pid>-old``, new ``-> OUT``) which the other
run's renames can split (``FileNotFoundError``, "Directory not empty", a leftover ``-old`` copy); and a
peft folder's two files, renamed one after the other, can end up one from each run (every output is read back
from its own scratch copy, so each run's check is of its own write). :func:`output_lock` makes the second
run stop at once, naming the first.

The lock is ``.<OUT name>.sdadapt-lock`` in OUT's folder (made first when missing, as the run would make it:
the lock's place must not move when the first run creates the folder), held with ``flock`` for the whole
command and removed at its end; a killed run's lock file is stale (no process holds it) and is simply taken
over. Where ``flock`` does not exist (Windows) or the filesystem has no locks (``ENOLCK``: NFS without a lock
daemon), the file is created exclusively and a leftover is taken over when the pid it names is gone.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..errors import OutputError

__all__ = ["OutputLockedError", "output_lock", "lock_path"]

_SUFFIX = ".sdadapt-lock"


class _NoLocks(Exception):
    """``flock`` is not supported where OUT is (raised before the lock is held)."""


class OutputLockedError(OutputError):
    """Another live process is writing the same output (the message names its pid and command)."""


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output ``out``: ``.<name>.sdadapt-lock`` beside it (in OUT's folder as the path names it
    through any linked folder: two spellings of one output — ``./x``, ``x``, a linked folder — get one lock).
    :func:`output_lock` makes OUT's folder first, so the lock's place never moves while a run makes it."""
    target = Path(os.path.abspath(out))
    folder = target.parent
    try:
        folder = folder.resolve()
    except OSError:
        pass
    return folder / f".{target.name}{_SUFFIX}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return text.splitlines()[0][:300] if text else "another process (starting)"


def _refuse(out: Path, lock: Path) -> OutputLockedError:
    return OutputLockedError(f"{out}: {_holder(lock)} is writing it now (lock {lock}); two runs writing one output "
                             "would read back each other's result: wait for it to finish, or write elsewhere (if no "
                             f"such run is going on — a process id reused after a restart — delete {lock})")


def _describe(command: str) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    argv = " ".join(sys.argv[1:])[:200]
    return f"{command} (pid {os.getpid()}, started {started}{': ' + argv if argv else ''})\n"


def _pid_of(path: Path) -> int | None:
    text = _holder(path)
    marker = "(pid "
    if marker not in text:
        return None
    digits = text.split(marker, 1)[1].split(",", 1)[0].split(")", 1)[0]
    return int(digits) if digits.isdigit() else None


def _open(out: Path, lock: Path, flags: int) -> int:
    try:
        return os.open(lock, flags, 0o644)
    except FileExistsError:
        raise
    except OSError as exc:
        raise OutputError(f"{out}: cannot make the lock file {lock} ({exc.strerror or exc}); write somewhere "
                          "writable") from None


@contextmanager
def _flock_lock(out: Path, lock: Path, command: str, fcntl) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    while True:
        try:
            fd, created = _open(out, lock, os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, created = _open(out, lock, os.O_RDWR | os.O_CREAT), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refuse(out, lock) from None
            if created:
                os.unlink(lock)
            raise _NoLocks from exc  # (a filesystem without locks: the exclusive-file lock instead)
        try:  # (the file we locked may have been removed by the run that just ended: lock the current one)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _describe(command).encode("utf-8", "replace"))
        yield lock
    finally:
        try:
            os.unlink(lock)  # (while held: a run waiting on this file retries on the next one)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def _exclusive_file_lock(out: Path, lock: Path, command: str) -> Iterator[Path]:
    from ..formats.files import _pid_alive

    for _ in range(2):
        try:
            fd = _open(out, lock, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            pid = _pid_of(lock)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                raise _refuse(out, lock) from None
            try:  # a killed run's leftover
                os.unlink(lock)
            except OSError:
                pass
    else:
        raise _refuse(out, lock)
    try:
        os.write(fd, _describe(command).encode("utf-8", "replace"))
        os.close(fd)
        yield lock
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass


@contextmanager
def output_lock(out: str | os.PathLike, *, command: str) -> Iterator[Path]:
    """Hold the exclusive lock of output ``out`` for the block (``command`` names this run in the lock,
    for the message another run prints).

    Yields:
        the lock file's path (removed when the block ends, however it ends).

    Raises:
        OutputLockedError: another live process holds ``out``'s lock (it names that process's pid,
            start time and command line).
        OutputError: the lock file cannot be made (a read-only folder); the message names it.
    """
    target = Path(out)
    try:
        Path(os.path.abspath(target)).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{target}: cannot make its folder ({exc.strerror or exc}); write somewhere writable") \
            from None
    lock = lock_path(target)
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    with ExitStack() as stack:
        held = None
        if fcntl is not None:
            try:
                held = stack.enter_context(_flock_lock(target, lock, command, fcntl))
            except _NoLocks:
                held = None
        if held is None:
            held = stack.enter_context(_exclusive_file_lock(target, lock, command))
        yield held
