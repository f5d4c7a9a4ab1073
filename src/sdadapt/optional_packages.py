"""The optional packages: the ``interop`` extra's (``diffusers``, ``transformers``), imported when a Stable Diffusion
model needs them, and Pillow (the ``images`` extra), for the image formats and drawing sdadapt's own PNG codec does not
cover — each with one message saying how to install it when it is missing."""

from __future__ import annotations

from types import ModuleType

__all__ = ["require_interop", "require_pillow"]


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


def require_pillow(reason: str) -> None:
    """Refuse, before any work, what needs Pillow when it is missing; ``reason`` says what needs it
    (``"upscale reads and writes images with Pillow"``).

    Raises:
        ImportError: ``reason`` and how to install it (``pip install 'sdadapt[images]'``).
    """
    try:
        import PIL  # noqa: F401 - only whether it is there
    except ImportError:
        raise ImportError(f"{reason}: pip install 'sdadapt[images]' (or pillow)") from None
