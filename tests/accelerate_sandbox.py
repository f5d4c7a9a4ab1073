"""Driving accelerate in the test process: its global state, the environment and torch's thread count put back.

A subprocess would cost a fresh torch import; accelerate keeps singletons (``AcceleratorState``,
``GradientState``) and writes environment variables, so each use starts from reset state and restores both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def accelerate_sandbox() -> Iterator[None]:
    """Reset accelerate's global state on entry and exit; restore ``os.environ`` and torch's thread count."""
    from accelerate.state import AcceleratorState, GradientState

    environ, threads = dict(os.environ), torch.get_num_threads()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
