"""generate --clip-skip on SDXL: what A1111 does with it, said."""

from __future__ import annotations


def test_clip_skip_past_two_on_sdxl_is_said_not_applied():
    """SDXL's states are both encoders' penultimate layer whatever --clip-skip is (A1111 with its default
    sdxl_clip_l_skip off); a value of 3 or more changed nothing silently, now a note says so."""
    from types import SimpleNamespace

    from sdadapt.jobs.generate import _a1111_clip_skip

    lines: list[str] = []
    xl = SimpleNamespace(base_model="sdxl", is_sdxl=True, clip_skip=1)
    _a1111_clip_skip(xl, "xl.safetensors", 3, lines.append)
    assert len(lines) == 1 and "not applied on SDXL" in lines[0]
    _a1111_clip_skip(xl, "xl.safetensors", 2, lines.append)  # (2 is what SDXL does anyway: no note)
    assert len(lines) == 1
