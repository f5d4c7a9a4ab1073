"""The optional packages of the ``interop`` extra (``diffusers``, ``transformers``): imported when a
Stable Diffusion model needs them, with one message saying how to install them when they are missing."""

from __future__ import annotations

from types import ModuleType

__all__ = ["require_interop"]


def require_interop(name: str) -> ModuleType:
    """Import the optional package ``name`` of the ``interop`` extra (``"diffusers"``, ``"transformers"``),
    which Stable Diffusion models need.

    Raises:
        ImportError: it is not installed; the message says ``pip install "sdadapt[interop]"``.
    """
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"Stable Diffusion models need `{name}`: pip install \"sdadapt[interop]\"") from None
