"""Reading and writing weight files safely.

* safetensors first, every header through the one validator (:mod:`.header`); legacy
  ``.pt/.ckpt/.bin`` only through ``torch.load(weights_only=True)`` (never plain unpickling),
  after a size check of the archive (:mod:`.pickles`), and always mapped to CPU; a pickle that
  would run code is an :class:`~sdadapt.errors.UnsafeFileError` however torch words its refusal;
* every write is atomic: a temporary file ``.NAME.<pid>-<random>.tmp`` in the target folder
  (locked while it is written), fsync, then a rename — ``os.replace`` with ``overwrite``, else a
  link that fails if the output appeared meanwhile — so a crash or a signal never leaves a
  half-written file under the final name; the output gets the permissions a normal new file would
  (the umask; an overwritten file keeps its mode); temporary files a killed run left are removed by
  the next run that writes into the same folder;
* a save of several files (Custom Diffusion weights + token files, a DreamArtist pair, a peft
  folder) writes them in a :func:`staged_outputs` block: every temporary file is written first,
  then all are renamed, so a failure or Ctrl-C leaves either all new files or all the old ones,
  never a mix;
* every failure names the file and says what to do (:mod:`sdadapt.errors`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import (
    DiskSpaceError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    ResourceError,
    SdadaptError,
    UnsafeFileError,
    WeightFileError,
)
from ..held_signals import signals_held
from .header import MAX_HEADER_BYTES, parse_header, read_tensor, safetensors_layout

__all__ = [
    "WeightFileError",
    "UnsafeFileError",
    "OutputError",
    "OutputExistsError",
    "DiskSpaceError",
    "check_input_file",
    "check_name_room",
    "check_output_file",
    "check_safetensors_name",
    "make_output_folder",
    "read_safetensors",
    "read_safetensors_header",
    "read_safetensors_tensors",
    "read_safetensors_scalars",
    "read_weights",
    "write_safetensors",
    "atomic_write",
    "staged_outputs",
    "StagedOutputs",
    "remove_stale_temporaries",
    "raise_naming_output",
    "signals_held",
    "check_finite",
    "check_finite_output",
    "sniff_format",
    "WEIGHT_SUFFIXES",
]

_LEGACY_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
#: the suffixes of a weight file: safetensors and the pickled (legacy) ones
WEIGHT_SUFFIXES = (".safetensors", *_LEGACY_SUFFIXES)
#: a temporary file of ours older than this is stale even if its writer cannot be identified
_STALE_AFTER_S = 3600.0


def _output_folder(target: Path) -> Path:
    """The folder ``target`` goes into (it may not exist yet: :func:`make_output_folder` makes it)."""
    return target.parent if str(target.parent) else Path(".")


def _existing_base(target: Path, folder: Path) -> Path:
    """``folder``, or its nearest existing ancestor when it is missing (where it would be made: the
    one whose permissions, file system and free space decide).

    Raises:
        OutputError: a component of ``folder`` is a file, not a folder.
    """
    base = folder
    while not os.path.lexists(base) and base != base.parent:  # (lexists: False, not an error, where not searchable)
        base = base.parent
    if not base.is_dir():
        what = "a link to a missing folder" if os.path.islink(base) else "a file, not a folder"
        raise OutputError(f"{target}: {base} is {what}; write elsewhere")
    return base


def make_output_folder(path: str | os.PathLike) -> Path:
    """Make the folder ``path`` goes into, with its missing parents (as kohya's
    ``os.makedirs(output_dir, exist_ok=True)``); returns it. Writers call it just before their first
    write, after every check passed, so a refused command leaves no folder behind (and a write that
    fails removes the folders it made: :func:`atomic_write`, :func:`staged_outputs`).

    Raises:
        OutputError: a component is a file, or the folder cannot be made (permissions, read-only).
    """
    return _make_folders(Path(path))[0]


def _make_folders(target: Path) -> tuple[Path, list[Path]]:
    """:func:`make_output_folder` -> ``(folder, the folders this call made, outermost first)``: those a
    failed write removes again (:func:`_remove_folders`), never one that was there before."""
    folder = _output_folder(target)
    if folder.is_dir():
        return folder, []
    base = _existing_base(target, folder)
    missing = [folder, *(p for p in folder.parents if p != base and base in p.parents)][::-1]  # below base, outermost first
    made: list[Path] = []
    try:
        with signals_held():  # (a Ctrl-C between a mkdir and its note would leave that folder behind)
            for level in missing:  # one level at a time: a folder another writer made meanwhile is not ours
                try:
                    level.mkdir()
                except FileExistsError:
                    if not level.is_dir():
                        raise
                else:
                    made.append(level)
            if not folder.is_dir():  # (a path form the levels above missed: made untracked, as before)
                folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _remove_folders(made)
        raise OutputError(f"{target}: cannot make folder {folder}: a file is in the way; write elsewhere") from None
    except OSError as exc:
        _remove_folders(made)
        if exc.errno == errno.EROFS:
            raise OutputError(f"{target}: cannot make folder {folder}: {base} is on a read-only file system; "
                              "write elsewhere") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise OutputError(f"{target}: cannot make folder {folder}: no permission to write in {base}; write "
                              "elsewhere, or make the folder yourself") from None
        raise OutputError(f"{target}: cannot make folder {folder} ({exc.strerror or exc}); write elsewhere, or make "
                          "the folder yourself") from None
    except BaseException:  # (a signal held above, delivered as the block ends: Ctrl-C, SIGTERM's Interrupted)
        _remove_folders(made)
        raise
    return folder, made


def _remove_folders(folders: list[Path]) -> None:
    """Remove the folders a failed write made (:func:`_make_folders`), innermost first, each only while
    empty (``os.rmdir``): one that holds anything now — another writer's file — stays, with its parents."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            continue  # (its parents are not empty either; a sibling another staged write made may be)


def raise_naming_output(exc: SdadaptError, staging: Path, target: Path) -> None:
    """Raise ``exc`` again, a message about an output checked at ``staging`` (its scratch copy) naming ``target``, the
    output it becomes (a write failure, :class:`OutputError`, keeps the scratch path: that is where it failed)."""
    text = str(exc)
    if isinstance(exc, OutputError) or str(staging) not in text:
        raise exc
    raise type(exc)(text.replace(str(staging), str(target))) from None


def _size_text(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.1f} KiB" if size >= 2**10 else f"{size} bytes"


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        return False


#: the bytes a run adds to a file's name in the files it makes beside it: the temporary file of the atomic write
#: (``.NAME.<pid>-<random>.tmp``, a 7-digit pid where pids go up to 4194304), the backup of a replaced file
#: (``.NAME.<pid>-<12 hex>.tmp``) and the output lock (``.NAME.sdadapt-lock``)
NAME_ROOM = 28


def check_name_room(target: str | os.PathLike, *, output: str | os.PathLike | None = None) -> None:
    """Refuse a file name too long for the files made beside it (:data:`NAME_ROOM`) before any work: such a name is
    legal itself, but the write's temporary file fails after the work is done. ``output``: the ``-o`` a derived
    name comes from (``NAME-step000001.safetensors``, ``NAME-state``), named in the message with its own limit.

    Raises:
        OutputError: naming the limit and the longest output name that fits.
    """
    target = Path(target)
    folder = _existing_base(target, _output_folder(target))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (no pathconf: Windows' 255 characters)
        limit = 255

    def length(name: str) -> int:  # (NTFS counts UTF-16 units, POSIX file systems bytes)
        return len(name.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(name))

    unit = "characters" if os.name == "nt" else "bytes"
    size = length(target.name)
    if limit <= NAME_ROOM or size <= limit - NAME_ROOM:
        return
    base = Path(output) if output is not None else target
    fits = limit - NAME_ROOM - (size - length(base.name))
    made = f" (the run makes {target.name} from it)" if output is not None else ""
    raise OutputError(f"{base}: a name of {length(base.name)} {unit} is too long to write here{made}: a write makes a "
                      f"temporary file and a lock beside each file (.NAME.<pid>-<random>.tmp, .NAME.sdadapt-lock), "
                      f"which this file system holds up to {limit} {unit}; give an output name of at most {fits} {unit}")


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    needed_bytes: int = 0,
    margin_bytes: int = 0,
    suffix: str | None = ".safetensors",
) -> Path:
    """The one output check, before any work: name, existing file, folder, permissions, free space.

    Args:
        path: the file to be written (atomically: a temporary file beside it, so replacing an
            existing file needs the full size free too).
        overwrite: whether an existing ``path`` may be replaced.
        needed_bytes: the output's size (0: skip the space check, e.g. before the size is known).
        margin_bytes: free space to leave beyond ``needed_bytes``.
        suffix: the required file suffix (``None``: any).

    Returns:
        ``Path(path)``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false (a ``FileExistsError``).
        OutputError: a wrong suffix, ``path`` is a folder, its folder (or, when the folder is
            missing — the writer makes it — the nearest existing parent) is a file, read-only or not
            writable (a :class:`WeightFileError` and an ``OSError``).
        DiskSpaceError: less than ``needed_bytes + margin_bytes`` free (names both sizes).
    """
    target = Path(path)
    if suffix is not None and target.suffix.lower() != suffix:
        raise OutputError(f"{target}: sdadapt writes {suffix} files only; name the output *{suffix}")
    try:
        os.lstat(target)
    except OSError as exc:  # (a name longer than the file system holds: nothing can be written there)
        if exc.errno == errno.ENAMETOOLONG:
            raise OutputError(f"{target}: cannot be written ({exc.strerror}); give a shorter output name") from None
    check_name_room(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give a file name such as {target / ('out' + (suffix or ''))}")
    if os.path.lexists(target) and not overwrite:
        raise OutputExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
    if os.path.lexists(target) and not target.is_file():
        raise OutputError(f"{target}: exists and is not a regular file (a device, pipe or link to one); "
                          "write to a file name")
    folder = _existing_base(target, _output_folder(target))  # (a missing folder: where it will be made)
    if _read_only(folder):
        raise OutputError(f"{target}: folder {folder} is on a read-only file system; write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: no permission to create files in {folder}; write elsewhere")
    if needed_bytes > 0 or margin_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes + margin_bytes:
            margin = f" (plus {_size_text(margin_bytes)} to spare)" if margin_bytes else ""
            raise DiskSpaceError(
                f"{target}: not enough disk space in {folder}: the output needs about {_size_text(needed_bytes)}"
                f"{margin}, {_size_text(free)} are free; free some space or write elsewhere"
            )
    return target


# --------------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if os.name != "posix" or pid <= 0:
        return True  # cannot tell: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _lock(fd: int, *, blocking: bool) -> bool:
    """An exclusive advisory lock on ``fd`` (True: held; always True where locks do not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, the pid and age rules decide
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]{6,}\.tmp\Z")
_OUR_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth", ".json", ".toml", ".png")
_SCANNED: set[str] = set()  # folders this process has already cleaned


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files killed writers left in ``path``'s folder; return what was removed.

    Ours are ``.NAME.<pid>-<random>.tmp`` (and, from older versions, ``.NAME.<random>.tmp`` with a
    weights/JSON ``NAME``). One is stale when no process holds its lock and either its writer's pid
    is gone, or it was last modified over an hour ago. A concurrent writer's file is never touched. A folder of
    that name (a model folder written whole, then renamed) is removed when its writer's pid is gone.
    Each folder is scanned once per process (a folder of 10 000 shards is not listed per write).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        key = str(folder.resolve())
    except OSError:
        return []
    if key in _SCANNED:
        return []
    _SCANNED.add(key)
    if len(_SCANNED) > 10_000:
        _SCANNED.clear()
    removed: list[Path] = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or (match.group("pid") is None and not match.group("name").lower().endswith(_OUR_SUFFIXES)):
            continue
        candidate = folder / name
        try:
            info = candidate.lstat()
            if stat.S_ISDIR(info.st_mode):  # a model folder's (DiffusersSystem._save_folder): its writer's pid gone
                pid = match.group("pid")
                if pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    shutil.rmtree(candidate, ignore_errors=True)
                    removed.append(candidate)
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock(fd, blocking=False):
                continue  # a live writer holds it
            pid = match.group("pid")
            old = now - info.st_mtime > _STALE_AFTER_S
            if (pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid))) or old:
                try:
                    os.unlink(candidate)
                    removed.append(candidate)
                except OSError:
                    pass
        finally:
            os.close(fd)
    return removed


def _write_failure(target: Path, exc: OSError, tmp: str | None) -> OutputError:
    """A one-line :class:`OutputError` for an ``OSError`` raised while writing ``target``."""
    folder = target.parent if str(target.parent) else Path(".")
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        written = 0
        if tmp is not None:
            try:
                written = os.path.getsize(tmp)
            except OSError:
                pass
        try:
            free = _size_text(shutil.disk_usage(folder).free)
        except OSError:
            free = "an unknown amount"
        quota = " (disk quota exceeded)" if code != errno.ENOSPC else ""
        return DiskSpaceError(
            f"{target}: the disk filled up while writing{quota} after {_size_text(written)}; {free} free now in "
            f"{folder}; free some space or write elsewhere (the partial file was removed)"
        )
    if code == errno.EROFS:
        return OutputError(f"{target}: folder {folder} is on a read-only file system; write elsewhere")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(f"{target}: no permission to write in {folder}; write elsewhere")
    if code == errno.EFBIG:
        return OutputError(f"{target}: the file is too large for this file system (e.g. FAT32's 4 GiB limit) "
                           "or for the file-size limit (ulimit -f); write elsewhere (the partial file was removed)")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{target}: writing failed ({reason}); the partial file was removed")


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    overwrite: bool = True,
    stage: StagedOutputs | None = None,
) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path`` atomically.

    A missing folder is made first, with its parents (:func:`make_output_folder`). The temporary
    file lives in the same folder (so the rename is atomic), is locked while it is
    written and is removed if anything goes wrong (an exception, Ctrl-C, a signal turned into
    :class:`~sdadapt.errors.Interrupted`). Stale temporary files a killed earlier run left in the
    folder are removed first (:func:`remove_stale_temporaries`). The result gets the permissions a normal new file would (the
    umask), or keeps those of the file it replaces.

    Args:
        overwrite: replace an existing ``path`` (``os.replace``). False: the final step is a link
            that fails if ``path`` appeared while the file was being written — an existing file is
            never replaced without ``overwrite``, even one created mid-write.
        stage: a :func:`staged_outputs` block: the finished temporary file is kept (locked) and
            moved to ``path`` when the block ends, together with the block's other outputs, or
            removed with them if the block fails.

    Raises:
        OutputExistsError: ``path`` exists and not ``overwrite`` (before or after the write).
        OutputError / DiskSpaceError: the folder cannot be made, is read-only, full, or a write failed.
        ValueError: ``stage`` has ended, or already holds an output for ``path``.
    """
    target = Path(path)
    folder = _output_folder(target)
    if stage is not None:
        stage._check_new(target)
    if not overwrite and os.path.lexists(target):
        raise OutputExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
    made: list[Path] = []  # the folders this write makes: removed again if it fails (a staged write: with its stage)
    fd, tmp = -1, ""
    try:
        _, made = _make_folders(target)  # (a missing folder, with its parents, as kohya's output_dir)
        if stage is not None:
            stage._add_folders(made)
        remove_stale_temporaries(target)
        try:
            with signals_held():  # a signal right after the file is made would leave it unnamed, so unremoved
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise _write_failure(target, exc, None) from None
        if os.name == "posix":
            _lock(fd, blocking=True)
        else:  # (Windows cannot rename an open file; it has no advisory locks either)
            os.close(fd)
            fd = -1
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode) if target.is_file() else 0o666 & ~_umask()
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            if stage is not None:  # the stage owns tmp (and its lock) from here
                stage._add(_StagedFile(tmp, target, overwrite, fd))
                return target
            if overwrite:
                os.replace(tmp, target)
            else:
                _move_no_replace(tmp, target)
        except OSError as exc:
            if isinstance(exc, (OutputError, FileExistsError)):
                raise
            raise _write_failure(target, exc, tmp) from None
    except BaseException:
        try:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
        finally:
            if fd >= 0:
                os.close(fd)
            if stage is None:  # (a stage removes its folders when it ends: other staged files may be in them)
                _remove_folders(made)
        raise
    if fd >= 0:
        os.close(fd)
    return target


def _move_no_replace(tmp: str, target: Path) -> None:
    """Rename ``tmp`` to ``target`` unless ``target`` exists (a hard link: atomic no-replace)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(
            f"{target}: appeared while the output was being written; pass --overwrite (overwrite=True) to "
            "replace it (nothing was changed)"
        ) from None
    except OSError as exc:  # no hard links here (FAT, some network file systems): check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(target):
            raise OutputExistsError(f"{target}: appeared while the output was being written; pass --overwrite "
                                    "(overwrite=True) to replace it (nothing was changed)") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


@dataclass
class _StagedFile:
    """A finished temporary file waiting in a :class:`StagedOutputs` for its rename."""

    tmp: str
    target: Path
    overwrite: bool
    fd: int  # the open, locked temporary (-1 where files are not kept open: Windows)


class StagedOutputs:
    """Outputs written as temporary files and moved into place together: see :func:`staged_outputs`."""

    def __init__(self) -> None:
        self._entries: list[_StagedFile] = []
        self._folders: list[Path] = []  # the folders its writes made, outermost first: removed if the block fails
        self._ended = False
        self._lock = threading.Lock()  # a stage may be shared with worker threads

    def __enter__(self) -> StagedOutputs:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self._commit()
        else:
            self._end()

    @property
    def paths(self) -> list[Path]:
        """The outputs staged so far, in the order they were written (and will be renamed)."""
        return [entry.target for entry in self._entries]

    def _check_new(self, target: Path) -> None:
        if self._ended:
            raise ValueError(f"{target}: this staged_outputs() block has ended; write inside the with-block")
        if any(os.path.abspath(entry.target) == os.path.abspath(target) for entry in self._entries):
            raise ValueError(f"{target}: written twice in one staged_outputs() block")

    def _add_folders(self, folders: list[Path]) -> None:
        with self._lock:
            self._folders.extend(folders)

    def _add(self, entry: _StagedFile) -> None:
        """Take over a finished temporary file; refused (``ValueError``, the caller removes it) when
        the block has ended meanwhile — a write from another thread that outlived the block — or
        another thread staged the same target."""
        with self._lock:
            self._check_new(entry.target)
            self._entries.append(entry)

    def _close(self) -> list[_StagedFile]:
        """End the block (later writes are refused) and hand over the staged files."""
        with self._lock:
            self._ended = True
            entries, self._entries = self._entries, []
        return entries

    def _end(self) -> None:
        """Remove every temporary file still here and release its lock (the targets are untouched),
        then the folders the block's writes made."""
        _remove_temporaries(self._close())
        self._remove_folders()

    def _remove_folders(self) -> None:
        with self._lock:
            folders, self._folders = self._folders, []
        _remove_folders(folders)

    def _commit(self) -> None:
        """Rename every staged file into place, or (on any failure, Ctrl-C included) none."""
        entries = self._close()
        backups: list[str | None] = []
        committed = False
        try:
            for entry in entries:  # checked for all before any rename: a refusal changes nothing
                if not entry.overwrite and os.path.lexists(entry.target):
                    raise OutputExistsError(
                        f"{entry.target}: appeared while the outputs were being written; pass --overwrite "
                        "(overwrite=True) to replace it (nothing was changed)"
                    )
            for entry in entries:  # (appended one by one: an interrupt here still removes those made)
                with signals_held():  # (and none is made unnoted)
                    backups.append(_backup_link(entry.target) if entry.overwrite else None)
            moved: list[tuple[_StagedFile, str | None, bool]] = []
            try:
                for entry, backup in zip(entries, backups):
                    # noted before the rename: Ctrl-C during the system call is raised just after it
                    # returns, and that rename must be undone too (_undo_moves skips one not done)
                    moved.append((entry, backup, os.path.lexists(entry.target)))
                    try:
                        if entry.overwrite:
                            os.replace(entry.tmp, entry.target)
                        else:
                            _move_no_replace(entry.tmp, entry.target)
                    except OSError as exc:
                        if isinstance(exc, (OutputError, FileExistsError)):
                            raise
                        raise _write_failure(entry.target, exc, entry.tmp) from None
            except BaseException:
                _undo_moves(moved)
                raise
            committed = True
        finally:
            for backup in backups:
                if backup is not None and os.path.lexists(backup):
                    try:
                        os.unlink(backup)
                    except OSError:
                        pass
            _remove_temporaries(entries)
            if not committed:  # (after the temporaries: a folder must be empty to go)
                self._remove_folders()


def _remove_temporaries(entries: list[_StagedFile]) -> None:
    """Remove the staged temporary files still there (those not renamed) and release their locks."""
    for entry in entries:
        try:
            if os.path.lexists(entry.tmp):
                os.unlink(entry.tmp)
        except OSError:
            pass
        finally:
            if entry.fd >= 0:
                os.close(entry.fd)


def _backup_link(target: Path) -> str | None:
    """A second name (``.NAME.<pid>-<random>.tmp``, a hard link) for the file at ``target``, so a
    failed :meth:`StagedOutputs._commit` can put it back; ``None`` when there is no file, or the file
    system has no hard links (then a failure after its rename cannot restore it)."""
    if not os.path.isfile(target) or os.path.islink(target):
        return None
    folder = _output_folder(target)
    for _ in range(8):
        name = str(folder / f".{target.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp")
        try:
            os.link(target, name)
        except FileExistsError:
            continue
        except OSError:
            return None
        return name
    return None


def _undo_moves(moved: list[tuple[_StagedFile, str | None, bool]]) -> None:
    """Put back what a failed commit renamed, newest first: the backup over a replaced file, or
    remove a file that did not exist before (best effort: the original error is what is raised).
    An entry whose rename did not happen is left alone (its target may be another writer's file)."""
    for entry, backup, existed in reversed(moved):
        try:
            if not _renamed(entry):
                continue
            if backup is not None:
                os.replace(backup, entry.target)
            elif not existed:
                os.unlink(entry.target)
        except OSError:
            pass


def _renamed(entry: _StagedFile) -> bool:
    """Whether ``entry.target`` is now the staged file: the same inode as its still-open temporary
    (where it is not kept open, Windows: whether the temporary's name is gone)."""
    if entry.fd < 0:
        return not os.path.lexists(entry.tmp)
    try:
        return os.path.samestat(os.fstat(entry.fd), os.lstat(entry.target))
    except OSError:
        return False


def staged_outputs() -> StagedOutputs:
    """A block whose outputs appear all together, or not at all.

    Writers given ``stage=`` (:func:`atomic_write`, :func:`write_safetensors`,
    :func:`sdadapt.save_embedding`) write and fsync their temporary file as usual but keep it; when
    the block ends normally every file is renamed into place (after checking, for each output
    written without ``overwrite``, that its name is still free — else none is renamed). If the
    block raises — a failed write, a full disk, Ctrl-C — every temporary file is removed and no
    output changes. A failure among the renames themselves (Ctrl-C included) puts back what was
    renamed (replaced files from a hard-link backup, new ones removed). Only a kill or a power loss
    during the renames (microseconds) can leave a mix — or, on a file system without hard links
    (FAT, some network shares: no backup), a rename that fails after one that replaced a file::

        with staged_outputs() as stage:
            write_safetensors("cd.safetensors", weights, overwrite=True, stage=stage)
            write_safetensors("cd-token.safetensors", token, overwrite=True, stage=stage)
        # both files are new here, or (the block raised) both are as they were

    Meant for the handful of files one save writes: each temporary stays open (locked) until the
    block ends. Worker threads may write into one stage; a write that finishes after the block
    ended raises ``ValueError`` (its temporary removed), never returns as if staged.

    Returns:
        a :class:`StagedOutputs` context manager (``.paths``: the outputs staged so far).
    """
    return StagedOutputs()


#: suffixes every loader (A1111's ``read_state_dict``, kohya's ``load_file``) opens as a torch pickle
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def check_safetensors_name(path: str | os.PathLike, *, caller: str) -> None:
    """Refuse to write safetensors bytes under a pickle suffix (``lora.pt``): A1111 and kohya choose the loader by
    the suffix and would ``torch.load`` it.

    Raises:
        ValueError: naming the file and the name to use.
    """
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {caller} writes safetensors, but loaders open a {suffix} file as a torch pickle; "
                         f"name it {Path(path).with_suffix('.safetensors').name}")


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    allow_nonfinite: bool = True,
    stage: StagedOutputs | None = None,
) -> Path:
    """Write ``tensors`` (CPU copies) and string ``metadata`` atomically, in the byte layout of
    ``safetensors.torch.save_file`` (one writer for every sdadapt file: I/O errors become
    :class:`~sdadapt.errors.OutputError`/``DiskSpaceError`` naming the file).

    Tensors that share memory (tied weights, views of one buffer) are written as independent
    copies, which safetensors requires.

    Args:
        overwrite: replace an existing file (default True, the historical behaviour of this
            function; commands pass their ``--overwrite``).
        allow_nonfinite: False refuses float tensors holding NaN/inf (:class:`NonFiniteError`).
        stage: a :func:`staged_outputs` block: the file appears when the block ends, with its other outputs.

    Raises:
        WeightFileError: a metadata key or value is not a string, or a dtype safetensors cannot store.
        NonFiniteError: NaN/inf with ``allow_nonfinite=False``.
        OutputExistsError / OutputError / DiskSpaceError: see :func:`atomic_write`.
    """
    from ..checks import has_nonfinite

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise WeightFileError(f"{path}: safetensors metadata must be str -> str; non-strings: {bad}")
    payload: dict[str, Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if not allow_nonfinite and has_nonfinite(value):
            raise NonFiniteError(f"{path}: tensor {key!r} holds NaN or inf; refusing to write it")
        payload[key] = value
    try:
        head, offsets = safetensors_layout({k: (v.dtype, tuple(v.shape)) for k, v in payload.items()}, meta)
    except WeightFileError as exc:
        raise WeightFileError(f"{path}: {exc}") from None
    total = len(head) + max((end for _, end in offsets.values()), default=0)
    check_output_file(path, overwrite=overwrite, needed_bytes=total, suffix=None)

    return atomic_write(path, lambda tmp: _write_payload(tmp, head, offsets, payload), overwrite=overwrite, stage=stage)


def _write_payload(tmp: str, head: bytes, offsets: Mapping[str, tuple[int, int]], payload: Mapping[str, Tensor]) -> None:
    """The bytes of a safetensors file: header, then each tensor's data in offset order."""
    with open(tmp, "wb") as handle:
        handle.write(head)
        for key in sorted(offsets, key=lambda k: offsets[k][0]):
            value = payload[key]
            if value.numel():
                handle.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))


# ------------------------------------------------------------------------------------ reading
def check_input_file(path: str | os.PathLike, *, what: str = "weights file") -> Path:
    """``Path(path)`` if it is a readable, non-empty regular file; else a :class:`WeightFileError`
    that says what it is instead (missing, a folder, a device such as ``/dev/zero``, empty ...)."""
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise WeightFileError(f"{file}: no such file") from None
    except PermissionError:
        raise WeightFileError(f"{file}: permission denied (cannot look at it); check the file's permissions") from None
    except OSError as exc:
        raise WeightFileError(f"{file}: cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise WeightFileError(_folder_message(file, what))
    if not stat.S_ISREG(info.st_mode):
        kind = ("a character device" if stat.S_ISCHR(info.st_mode) else "a block device" if stat.S_ISBLK(info.st_mode)
                else "a pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a file")
        raise WeightFileError(f"{file}: is {kind}, not a regular file; pass a {what}")
    if info.st_size == 0:
        raise WeightFileError(f"{file}: the file is empty (0 bytes); the download or save did not finish")
    if not os.access(file, os.R_OK):
        raise WeightFileError(f"{file}: permission denied (not readable); check the file's permissions")
    return file


def _folder_message(folder: Path, what: str) -> str:
    """Why the folder ``folder`` is not the ``what`` asked for, naming the files inside it to pass."""
    if (folder / "model_index.json").is_file():
        return (f"{folder}: is a diffusers pipeline folder, not a {what}; this command takes one file: a "
                f"single-file checkpoint (.safetensors/.ckpt), or one component's file such as "
                f"{folder / 'unet' / 'diffusion_pytorch_model.safetensors'} (that component only)")
    parts = [name for name in ("unet", "unet_ema", "vae", "text_encoder") if (folder / name).is_dir()]
    if parts:  # (a training checkpoint-N folder: SimpleTuner's, accelerate's — the trained parts only)
        return (f"{folder}: a diffusers model's parts ({', '.join(f'{name}/' for name in parts)}) without "
                "model_index.json, not a pipeline folder: copy the base model's folder and put these parts in it "
                "(unet/, and unet_ema/ for --ema), or pass one component's file such as "
                f"{folder / parts[0] / 'diffusion_pytorch_model.safetensors'}")
    try:
        inside = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    except OSError:
        inside = []
    if inside:
        return f"{folder}: is a folder, not a {what}; pass one of the files inside it ({', '.join(inside[:5])})"
    return f"{folder}: is a folder, not a {what}; pass the file inside it"


_check_is_file = check_input_file  # (the historical name, used across formats/)


def _open(file: Path):
    try:
        return open(file, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise WeightFileError(f"{file}: cannot be read ({exc.strerror or exc})") from None


def sniff_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"pickle"`` (a ``torch.save`` zip archive or legacy pickle) or ``"unknown"``.

    Decided from the first bytes, not the extension. A safetensors file starts with an 8-byte
    little-endian header length followed by ``{``; its first byte is that length's low byte, so
    it can be ``0x80`` or ``"P"`` — which is why "starts with 0x80 -> pickle" alone misreads about
    one safetensors file in 256.

    Raises:
        WeightFileError: ``path`` cannot be read, or is not a regular file (a pipe's read would block).
    """
    file = Path(path)
    try:
        regular = stat.S_ISREG(file.stat().st_mode)
    except OSError:
        regular = True  # (_open says why it cannot be read)
    if not regular:
        check_input_file(file)  # (names what it is instead)
    with _open(file) as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= MAX_HEADER_BYTES:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


_HEADER_CACHE: dict[tuple, tuple[dict[str, dict], dict[str, str], int]] = {}


def _header_and_start(file: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(validated header, metadata, byte offset of the data section); the last few files' headers are
    cached by (path, size, mtime, inode), so a command that reads one file's header several times
    (inspect: summary, then the alphas) parses it once. Callers get copies of the two dicts."""
    info = file.stat()
    key = (str(file.resolve()), info.st_size, info.st_mtime_ns, info.st_ino)
    hit = _HEADER_CACHE.get(key)
    if hit is None:
        hit = _parse_file_header(file, info.st_size)
        if len(_HEADER_CACHE) >= 4:
            _HEADER_CACHE.pop(next(iter(_HEADER_CACHE)))
        _HEADER_CACHE[key] = hit
    header, metadata, start = hit
    return dict(header), dict(metadata), start


def _parse_file_header(file: Path, size: int) -> tuple[dict[str, dict], dict[str, str], int]:
    with _open(file) as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{file}: {size} bytes is too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise WeightFileError(_not_safetensors(file, head))
            from .foreign_files import foreign_content

            if (foreign := foreign_content(file)) is not None:  # a web page, a Git LFS pointer, an image ...
                raise WeightFileError(f"{file}: {foreign}")
            raise WeightFileError(
                f"{file}: not a safetensors file, or a corrupt one (its first 8 bytes give a {header_len}-byte "
                f"header, over the format's {MAX_HEADER_BYTES}-byte limit)"
            )
        if header_len > size - 8:
            if handle.read(1) in (b"{", b""):
                raise WeightFileError(
                    f"{file}: truncated safetensors file (the {header_len}-byte header alone is longer "
                    f"than the {size}-byte file); download or copy it again"
                )
            raise WeightFileError(_not_safetensors(file, head))
        raw = handle.read(header_len)
    if len(raw) != header_len:
        raise WeightFileError(f"{file}: truncated while reading its header; download or copy it again")
    if not raw.startswith(b"{"):
        raise WeightFileError(_not_safetensors(file, head))
    header, metadata = parse_header(raw, file=file, data_size=size - 8 - header_len)
    return header, metadata, 8 + header_len


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate only the header: ``({key: {"dtype", "shape", "data_offsets"}}, metadata)``,
    keys in the order of their data.

    Cheap for multi-GB files (reads 8 bytes + the header). Every rule of the format is checked
    (:func:`sdadapt.formats.header.parse_header`), so a reader may trust the entries.

    Raises:
        WeightFileError: a missing, non-regular, truncated, malformed or non-safetensors file.
    """
    file = check_input_file(path)
    header, metadata, _ = _header_and_start(file)
    return header, metadata


def _not_safetensors(file: Path, head: bytes) -> str:
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        kind = "a pickle/zip (torch.save) file"
    else:
        kind = "not a safetensors file"
    return (
        f"{file}: {kind}. sdadapt reads .safetensors directly and legacy .pt/.ckpt/.bin through "
        "torch.load(weights_only=True); rename it to its real extension, or convert it to .safetensors."
    )


def _check_memory(file: Path, needed: int) -> None:
    from .pickles import available_memory

    available = available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"{file}: reading it whole needs {_size_text(needed)} of memory, {_size_text(available)} are available "
            "(its header claims that much data; check it with `python -m sdadapt inspect`)"
        )


def read_safetensors_tensors(path: str | os.PathLike, keys: list[str]) -> dict[str, Tensor]:
    """Only ``keys`` of a safetensors file (validated header, positioned reads). Keys the file lacks
    are skipped."""
    file = check_input_file(path)
    header, _, start = _header_and_start(file)
    out: dict[str, Tensor] = {}
    with _open(file) as handle:
        for key in keys:
            if key in header:
                out[key] = read_tensor(handle, start, header[key], file=file, key=key)
    return out


_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                   "U8": "<B", "BF16": "bf16"}


def read_safetensors_scalars(path: str | os.PathLike, keys: list[str]) -> dict[str, float]:
    """The values of one-element tensors (e.g. the LoRA alphas ``inspect`` reports) as floats, read
    with a few bytes each (no tensor is built: 100k alphas take a fraction of a second). Keys the
    file lacks, or of other sizes or dtypes, are skipped."""
    file = check_input_file(path)
    header, _, start = _header_and_start(file)
    out: dict[str, float] = {}
    with _open(file) as handle:
        for key in keys:
            entry = header.get(key)
            if entry is None or entry["dtype"] not in _SCALAR_FORMATS:
                continue
            begin, end = entry["data_offsets"]
            fmt = _SCALAR_FORMATS[entry["dtype"]]
            width = 2 if fmt == "bf16" else struct.calcsize(fmt)
            if end - begin != width:
                continue
            handle.seek(start + begin)
            raw = handle.read(width)
            if len(raw) != width:
                continue
            out[key] = struct.unpack("<f", b"\0\0" + raw)[0] if fmt == "bf16" else float(struct.unpack(fmt, raw)[0])
    return out


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a safetensors file, validated first.

    Each tensor is allocated from a validated header entry and filled with positioned reads
    (no ``mmap``, nothing allocated for a claim the file cannot back).

    Raises:
        WeightFileError: see :func:`read_safetensors_header`.
        ResourceError: the tensors need more memory than is available.
    """
    file = check_input_file(path)
    header, metadata, start = _header_and_start(file)
    _check_memory(file, sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values()))
    tensors: dict[str, Tensor] = {}
    with _open(file) as handle:
        for key, entry in header.items():
            tensors[key] = read_tensor(handle, start, entry, file=file, key=key)
    return tensors, dict(metadata)


def _flatten(obj: object, prefix: str, out: dict[str, Tensor], extras: dict[str, object], depth: int = 0) -> None:
    if depth > 64:
        raise WeightFileError(f"{prefix}: nested over 64 levels deep")
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, extras, depth + 1)
    elif isinstance(obj, (list, tuple)) and _holds_tensor(obj):
        # e.g. A1111 hypernetworks: {768: (k_state_dict, v_state_dict), ...} -> "768.0.linear.0.weight"
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), out, extras, depth + 1)
    elif prefix:
        extras[prefix] = obj


def _holds_tensor(obj: object, depth: int = 0) -> bool:
    if isinstance(obj, Tensor):
        return True
    if depth > 64:
        return False
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in obj)
    return False


def _runs_code(name: str, text: str) -> bool:
    from .pickles import runs_code

    module, _, attr = name.rpartition(".")
    if "is blocked" in text:  # torch: "... whose module posix is blocked"
        return True
    return runs_code(module, attr)


def _unsafe_error(file: Path, name: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{file}: this file tries to run code when it is loaded (its pickle calls {name}); "
        "sdadapt refused it without running anything (legacy files are read only with "
        "torch.load(weights_only=True)). Do not open it with plain torch.load or pickle; get the "
        "file from a trusted source, preferably as .safetensors."
    )


def _torch_load_error(file: Path, exc: BaseException) -> WeightFileError:
    """A one-paragraph reason for a failed ``torch.load(weights_only=True)``, without torch's essay
    (and never its advice to retry with ``weights_only=False``).

    The file's pickle stream is scanned (nothing runs, nothing is imported): a file that names
    code is an :class:`~sdadapt.errors.UnsafeFileError` whatever torch's message says.
    """
    from .pickles import scan_pickle_file

    malformed = True
    try:
        malformed = scan_pickle_file(file).malformed is not None
    except UnsafeFileError as unsafe:
        return unsafe
    except (WeightFileError, ResourceError, OSError):
        pass
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)
    if unsafe and _runs_code(unsafe.group(1), text):
        return _unsafe_error(file, unsafe.group(1))
    if unsafe:
        return WeightFileError(
            f"{file}: holds a pickled Python object ({unsafe.group(1)}) that only full unpickling, "
            "i.e. running code from the file, can rebuild; sdadapt reads legacy files only with "
            "torch.load(weights_only=True). If you trust the file, load it yourself and re-save its "
            "tensors as a plain dict or as .safetensors."
        )
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand and not malformed:
        return WeightFileError(
            f"{file}: a pickle that torch.load(weights_only=True) cannot read (pickle opcode {operand.group(1)}: "
            "written by plain pickle.dump with a newer protocol, not by torch.save); if you trust the file, load it "
            "yourself and re-save it with torch.save or as .safetensors"
        )
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    detail = " ".join(detail.split()).split(" Check the documentation")[0]
    detail = detail.split(". ")[0].strip().rstrip(".")[:200]
    if "weights_only" in detail.lower() and "false" in detail.lower():
        detail = type(exc).__name__
    return WeightFileError(
        f"{file}: corrupt or truncated torch.save file ({detail or type(exc).__name__}); "
        "download or copy it again"
    )


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file, or a legacy pickle with ``torch.load(weights_only=True)``.

    Legacy nested dicts are flattened with dots (``{"state_dict": {"a": t}}`` -> ``"state_dict.a"``);
    their non-tensor entries come back JSON-encoded in the metadata dict.

    Raises:
        WeightFileError: missing, not a regular file, truncated, corrupt or unknown file.
        UnsafeFileError: a pickle that would run code (refused unrun).
        ResourceError: the file needs more memory than is available (or a zip bomb's expansion).
    """
    from .pickles import check_archive

    file = check_input_file(path)
    kind = sniff_format(file)
    if kind == "safetensors" or (kind == "unknown" and file.suffix.lower() not in _LEGACY_SUFFIXES):
        return read_safetensors(file)  # (for "unknown": raises the precise safetensors error)
    if kind == "unknown":
        try:
            return read_safetensors(file)
        except WeightFileError:
            from .foreign_files import foreign_content

            if (foreign := foreign_content(file)) is not None:  # a web page, a Git LFS pointer, an image ...
                raise WeightFileError(f"{file}: {foreign}") from None
            raise WeightFileError(
                f"{file}: neither a safetensors file nor a torch.save archive (corrupt, or another format); "
                "download or copy it again"
            ) from None
    import zipfile

    if zipfile.is_zipfile(file):
        check_archive(file)
    else:
        _check_memory(file, file.stat().st_size)
    try:
        # an open handle, not the path: torch >= 2.1x hands any "*.safetensors" *path* to the
        # safetensors reader, which fails on a pickle that carries that extension
        with warnings.catch_warnings(), _open(file) as handle:
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol ..." on garbage
            obj = torch.load(handle, map_location="cpu", weights_only=True)
    except MemoryError:
        raise ResourceError(f"{file}: not enough memory to load it (legacy pickles are read whole); convert it to "
                            ".safetensors on a larger machine") from None
    except RecursionError:
        raise WeightFileError(f"{file}: its pickle is nested too deeply; corrupt or hostile, refused") from None
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError / EOFError variants
        raise _torch_load_error(file, exc) from None
    tensors: dict[str, Tensor] = {}
    extras: dict[str, object] = {}
    try:
        _flatten(obj, "", tensors, extras)
    except WeightFileError as exc:
        raise WeightFileError(f"{file}: {exc}; not a checkpoint layout sdadapt reads") from None
    sparse = next((key for key, value in tensors.items() if value.layout != torch.strided), None)
    if sparse is not None:  # (no weights format holds one; every reader and check assumes dense tensors)
        raise WeightFileError(f"{file}: {sparse or 'its tensor'} is a "
                              f"{str(tensors[sparse].layout).removeprefix('torch.')} tensor, and weights files hold "
                              "dense ones; re-save it with the tensors dense (tensor.to_dense())")
    metadata = {}
    for key, value in extras.items():
        try:
            metadata[key] = json.dumps(value, default=str)
        except (ValueError, RecursionError):
            metadata[key] = f"<{type(value).__name__}>"
    return tensors, metadata


def check_finite(tensors: Mapping[str, Tensor], *, source: str) -> None:
    """Raise :class:`WeightFileError` naming the first tensors of an *input* that contain NaN or inf."""
    from ..checks import has_nonfinite

    bad = [k for k, v in tensors.items() if has_nonfinite(v)]
    if bad:
        raise WeightFileError(
            f"{source}: {len(bad)} tensor(s) contain NaN or inf, e.g. {bad[:5]}; the training that "
            "made this file diverged — use an earlier checkpoint."
        )


def check_finite_output(tensors: Mapping[str, Tensor], *, path: str | os.PathLike) -> None:
    """Raise :class:`~sdadapt.errors.NonFiniteError` naming the tensors of an *output* about to be
    written to ``path`` that hold NaN or inf (nothing is written)."""
    from ..checks import has_nonfinite

    bad = [k for k, v in tensors.items() if has_nonfinite(v)]
    if bad:
        raise NonFiniteError(
            f"{path}: refusing to write it: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[:5]} (a diverged "
            "training, non-finite inputs, or a computation that overflowed); nothing was written"
        )
