"""Swapping Python's handlers of SIGINT, SIGTERM and SIGHUP for a block, and putting them back.

:func:`signals_held` holds the signals back while an atomic write makes a temporary file and notes its name
(:mod:`sdadapt.formats.files`, which re-exports it); :func:`swap_in` installs a handler for the three and
:func:`put_back` reinstalls the saved ones, every one even when a signal arrives meanwhile (both also for
:func:`sdadapt.cli.options.terminate_as_interrupt`, whose handler raises ``Interrupted``). No torch:
the command line wraps every run in these before it knows whether the run needs torch (a usage error found
in the run, ``python -m sdadapt merge`` without an operator, answers without importing it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["signals_held", "swap_in", "put_back"]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the block runs: each that arrives is noted and
    raised again when the block ends, to whatever handler was there, in the order they arrived, all of
    them even when the first one's handler raises (:func:`_deliver`) (main thread only; elsewhere
    a no-op). For making a temporary file or folder and taking its name in one step — a handler
    raising between the two would leave it behind. (Not a signal mask: a process-directed signal
    goes to any thread that does not block it, and Python runs its handler in the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: list[tuple[int, Any]] = []
    try:  # (from the first swap: a signal to a handler not yet swapped raises with the others put back)
        swap_in(lambda received, frame: pending.append(received), saved)
        yield
    finally:
        put_back(saved)
        _deliver(list(dict.fromkeys(pending)))


def swap_in(handler: Callable[[int, Any], Any], saved: list[tuple[int, Any]]) -> None:
    """Install ``handler`` for SIGINT, SIGTERM and SIGHUP (those this platform has), appending each
    ``(signal number, previous handler)`` to ``saved`` just before its swap, so a signal that arrives
    between two swaps leaves ``saved`` holding every handler to :func:`put_back`. A handler installed
    outside Python (``signal.getsignal`` is ``None``) is left alone; one that cannot be swapped here
    (``ValueError`` / ``OSError``: not the main interpreter) is neither swapped nor noted."""
    for number in _HELD_SIGNALS:
        previous = signal.getsignal(number)
        if previous is None:  # a handler installed outside Python: left alone
            continue
        saved.append((number, previous))  # (noted first: putting back a handler never swapped is harmless)
        try:
            signal.signal(number, handler)
        except (ValueError, OSError):  # (not swapped: not held, not put back)
            saved.pop()


def _deliver(numbers: list[int]) -> None:
    """Raise each held signal, in the order they first arrived, to its handler now back in place —
    every one even when a handler raises (SIGINT's ``KeyboardInterrupt``): the later ones run in a
    ``finally``, so a SIGTERM held behind a SIGINT still ends the process (its default) or raises its
    own exception (the SIGINT's as its ``__context__``). A signal held twice is raised once, as the
    kernel keeps one pending instance of a blocked standard signal."""
    if not numbers:
        return
    try:
        signal.raise_signal(numbers[0])
    finally:
        _deliver(numbers[1:])


def put_back(handlers: list[tuple[int, Any]]) -> None:
    """Install each ``(signal number, handler)``, all of them even when one just put back raises
    (a signal that arrives the moment its handler is back runs it at once)."""
    try:
        while handlers:
            signal.signal(*handlers[0])
            handlers.pop(0)
    finally:
        for number, handler in handlers:  # (cut short: the rest, then the exception goes on)
            signal.signal(number, handler)


_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
