"""The exceptions sdadapt raises on purpose, and the exit code the command line gives each.

Every error a user can cause — a bad argument, a broken or hostile file, a result that would be
NaN, a full disk — is one of these, with a message that names the file (or the option) and says
what to do. ``python -m sdadapt`` prints that message as one ``error: ...`` line and exits with
the class's code (:data:`EXIT_CODES`); ``docs/security.md`` has the same table.

::

    SdadaptError (Exception)                                   exit 1 (only as a base)
    ├── InputError (ValueError)             bad argument/option/pattern/device   2
    ├── WeightFileError (ValueError)        unreadable, corrupt or wrong input   3
    │   ├── UnsafeFileError                 a pickle that would run code         4
    │   └── OutputError (OSError)           the output cannot be written         7
    │       ├── OutputExistsError (FileExistsError)  exists, no --overwrite      8
    │       └── DiskSpaceError              not enough free space                9
    ├── NonFiniteError (ValueError)         NaN/inf or float16 overflow          5
    ├── MergeError (ValueError)             inputs that cannot be merged         6
    ├── ResourceError (MemoryError)         too large for this machine's memory  10
    └── PeerProcessError (RuntimeError)     another torchrun process failed      11
    Interrupted (KeyboardInterrupt)         SIGINT / SIGTERM                     130 / 143

``Interrupted`` is deliberately *not* an :class:`SdadaptError`: like Ctrl-C it derives from
``BaseException`` so that no ``except Exception`` on the way up swallows it (every temporary file
is removed by the ``finally``/``except BaseException`` blocks it passes).

Built-in exceptions keep their meaning for callers (``WeightFileError`` is a ``ValueError``,
``OutputExistsError`` a ``FileExistsError`` ...), so code written against them keeps working.
"""

from __future__ import annotations

import errno
import signal

__all__ = [
    "SdadaptError",
    "InputError",
    "WeightFileError",
    "UnsafeFileError",
    "OutputError",
    "OutputExistsError",
    "DiskSpaceError",
    "NonFiniteError",
    "MergeError",
    "ResourceError",
    "PeerProcessError",
    "Interrupted",
    "EXIT_CODES",
    "INTERNAL_ERROR_CODE",
    "BROKEN_PIPE_CODE",
    "exit_code_for",
    "exit_code_table",
]


class SdadaptError(Exception):
    """Base of every error sdadapt raises on purpose; the message names the file/option and the fix."""


class InputError(SdadaptError, ValueError):
    """A bad argument: an option value out of range or not finite, an invalid pattern, an unknown device."""


class WeightFileError(SdadaptError, ValueError):
    """A weights file (or recipe/config) that cannot be used: missing, not a regular file, truncated,
    corrupt, malformed header, the wrong kind of file; the message names the file and the fix."""


class UnsafeFileError(WeightFileError):
    """A pickle (``.ckpt``/``.pt``/``.bin``) whose loading would run code (it names e.g. ``posix.system``):
    refused without running anything."""


class OutputError(WeightFileError, OSError):
    """The output cannot be written: a bad name, a missing or read-only folder, an I/O error while writing.
    Nothing is left behind: the partial file is removed."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` was not given (checked before the work and again, atomically,
    when the finished file is moved into place)."""


class DiskSpaceError(OutputError):
    """Not enough free disk space for an output; the message gives both sizes."""


class NonFiniteError(SdadaptError, ValueError):
    """A result that would hold NaN/inf (or overflow float16/bfloat16): refused, naming the tensor."""


class MergeError(SdadaptError, ValueError):
    """Inputs that cannot be merged as asked (architectures, shapes, no shared weights); names the keys."""


class ResourceError(SdadaptError, MemoryError):
    """An input or a job too large for the memory (or the limits) sdadapt allows; says how much."""


class PeerProcessError(SdadaptError, RuntimeError):
    """Data-parallel training (torchrun, ``accelerate launch``): a collective with the other processes
    of the run failed — almost always because another process failed first (its own output says
    why) or was stopped; this process stops too. The message names this process's rank and what it
    was doing (:mod:`sdadapt.training.data_parallel`)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the partial output was removed. ``signal_number`` says which."""

    def __init__(self, signal_number: int = signal.SIGINT, message: str | None = None) -> None:
        self.signal_number = int(signal_number)
        name = signal.Signals(self.signal_number).name if self.signal_number in iter(signal.Signals) else str(signal_number)
        super().__init__(message or f"interrupted by {name}; the partial output (if any) was removed")

    @property
    def exit_code(self) -> int:
        """``128 + signal``: 130 for SIGINT, 143 for SIGTERM (what a shell reports for a killed job)."""
        return 128 + self.signal_number


#: exception class -> exit code of ``python -m sdadapt`` (the most specific class wins)
EXIT_CODES: dict[type[BaseException], int] = {
    InputError: 2,
    WeightFileError: 3,
    UnsafeFileError: 4,
    NonFiniteError: 5,
    MergeError: 6,
    OutputError: 7,
    OutputExistsError: 8,
    DiskSpaceError: 9,
    ResourceError: 10,
    PeerProcessError: 11,
}
#: the exit code of an unexpected exception (a bug in sdadapt: one line, "please report")
INTERNAL_ERROR_CODE = 1

_MEANING = {
    InputError: "a bad argument: option value, pattern, device",
    WeightFileError: "an input file that cannot be used (missing, corrupt, wrong kind)",
    UnsafeFileError: "a pickle that would run code when loaded (refused, nothing ran)",
    NonFiniteError: "the result would hold NaN/inf or overflow the output dtype",
    MergeError: "inputs that cannot be merged (architectures, shapes, no shared weights)",
    OutputError: "the output cannot be written (folder, permissions, I/O error)",
    OutputExistsError: "the output exists; pass --overwrite",
    DiskSpaceError: "not enough free disk space",
    ResourceError: "too large for the available memory",
    PeerProcessError: "another process of a torchrun run failed first: read its output",
}


#: ``128 + SIGPIPE``: standard output was closed by its reader (``inspect FILE | head``), as a shell reports a
#: tool killed by SIGPIPE
BROKEN_PIPE_CODE = 141


def exit_code_for(exc: BaseException) -> int:
    """The exit code for ``exc``: its class's entry in :data:`EXIT_CODES` (walking the MRO), 130/143
    for interrupts, and for built-in exceptions the closest meaning (``FileExistsError`` 8, a full
    disk 9, other ``OSError`` 3 — sdadapt's writers raise :class:`OutputError`, so a bare one comes
    from reading — ``MemoryError`` 10, ``ValueError``/``ImportError`` 2); :data:`INTERNAL_ERROR_CODE`
    for anything else."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    if isinstance(exc, FileExistsError):
        return EXIT_CODES[OutputExistsError]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return EXIT_CODES[DiskSpaceError]
    if isinstance(exc, OSError):  # sdadapt's own writers raise OutputError: a bare OSError comes from reading
        return EXIT_CODES[WeightFileError]
    if isinstance(exc, MemoryError):
        return EXIT_CODES[ResourceError]
    if isinstance(exc, (ValueError, ImportError)):
        return EXIT_CODES[InputError]
    return INTERNAL_ERROR_CODE


def exit_code_table() -> str:
    """The exit codes as text lines (``python -m sdadapt --help`` prints it)."""
    lines = ["  0    success", f"  {INTERNAL_ERROR_CODE}    an unexpected internal error (a bug: please report it)"]
    for cls, code in sorted(EXIT_CODES.items(), key=lambda kv: kv[1]):
        lines.append(f"  {code:<4} {cls.__name__}: {_MEANING[cls]}")
    lines.append("  130  Interrupted: Ctrl-C / SIGINT (partial output removed)")
    lines.append(f"  {BROKEN_PIPE_CODE}  the reader of the output closed it (e.g. `| head`): nothing more printed")
    lines.append("  143  Interrupted: SIGTERM (partial output removed)")
    return "\n".join(lines)
