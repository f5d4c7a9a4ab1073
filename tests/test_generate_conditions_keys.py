"""``generate``'s conditions cache (:mod:`sdadapt.jobs.generate_conditions`) keys SDXL's size conditioning.

``run_generate`` encodes each distinct ``condition`` input once per run; on SDXL that input holds
``time_ids`` (the image size), which must be part of the key. Every image of a ``--count`` run has one
size (``test_fidelity_fixes``' count tests), so only two sizes in one cached block show a key without
it: the hires fix's second pass conditions the same prompt at the enlarged size (A1111's
``calculate_hr_conds``) and must not get the first pass's entry.
"""

from __future__ import annotations

import torch

from sdadapt.jobs.generate_conditions import conditions_cached


class _SizedSystem:
    """SDXL's ``condition`` contract in miniature: ``{"ids", "time_ids"}`` in, a dict with ``time_ids`` out."""

    def condition(self, ids):
        return {"context": ids["ids"].float().unsqueeze(-1), "time_ids": ids["time_ids"].clone()}


def test_two_sizes_of_one_prompt_in_one_cached_block_are_two_entries():
    system = _SizedSystem()
    ids = torch.tensor([[49406, 320, 49407]])
    first = torch.tensor([[32.0, 32, 0, 0, 32, 32]])  # the first pass's size
    hires = torch.tensor([[48.0, 48, 0, 0, 48, 48]])  # the hires pass's
    with conditions_cached(system) as counts:
        a = system.condition({"ids": ids, "time_ids": first})
        b = system.condition({"ids": ids, "time_ids": hires})
        again = system.condition({"ids": ids.clone(), "time_ids": hires.clone()})
    assert torch.equal(a["time_ids"], first) and torch.equal(b["time_ids"], hires)
    assert torch.equal(again["time_ids"], hires)
    assert counts == {"calls": 3, "encoded": 2}
