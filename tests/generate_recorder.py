"""Watching ``sdadapt.sampling.generate``: each sampler run's options and the latents it made."""

from __future__ import annotations

from typing import Any


def record_generate(monkeypatch: Any) -> list[tuple[dict, Any]]:
    """Patch ``sdadapt.sampling.generate`` so every call runs as before and appends ``(options, latents)`` to the
    returned list (the run asked for latents; images are decoded from them as the caller asked)."""
    import sdadapt.sampling

    calls: list[tuple[dict, Any]] = []
    real = sdadapt.sampling.generate

    def record(system, prompts, **kw):
        out = real(system, prompts, **{**kw, "output": "latents"})
        calls.append((kw, out))
        return out if kw.get("output") == "latents" else system.decode_latents(out)

    monkeypatch.setattr(sdadapt.sampling, "generate", record)
    return calls
