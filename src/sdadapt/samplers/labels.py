"""AUTOMATIC1111's sampler labels ("DPM++ 2M Karras", "Euler a", ...) -> a sampler here.

A1111 names its samplers after k-diffusion's functions; diffusers documents which scheduler class
(and which config) is each one. Only labels whose algorithm is one of :data:`sdadapt.samplers.SAMPLERS`
map; the others are refused with the reason and the labels that are taken. A trailing
``" Karras"`` (A1111 before 1.9 listed "LMS Karras", "DPM2 a Karras", ...; later versions put it in a
"Schedule type" menu) is ``karras=True``: σ on Karras et al.'s ρ = 7 grid, diffusers'
``use_karras_sigmas=True``, for the samplers in :data:`sdadapt.samplers.KARRAS_SAMPLERS`. A label
without it is the plain grid, as A1111 before 1.9 read it (1.9 and later run "DPM++ 2M", "DPM2"
and "DPM2 a" on the Karras grid by default: ``schedule="automatic"``); a trailing ``" Exponential"`` (A1111
1.6–1.8's "DPM++ 3M SDE Exponential", ...) is ``schedule="exponential"`` (:func:`sampler_schedule_from_label`).
docs/samplers.md says what else differs from A1111.

The names sdadapt and kohya use (``euler_a``, ``k_dpm_2``, ``dpmsolver++`` ...) are taken too, so
one function reads whatever a user types after ``--sampler``; they come first (``unipc``, where
registered, is sdadapt's diffusers-default UniPC, not A1111's own port).

The tables and functions live in :mod:`sdadapt.sampler_tables` (torch-free, for the command line's
parsers) and are re-exported here.
"""

from __future__ import annotations

from ..sampler_tables import (
    A1111_DISPLAY,
    A1111_LABELS,
    A1111_MISSING,
    a1111_label,
    sampler_choices,
    sampler_from_label,
    sampler_schedule_from_label,
)

__all__ = ["A1111_DISPLAY", "A1111_LABELS", "A1111_MISSING", "a1111_label", "sampler_choices", "sampler_from_label", "sampler_schedule_from_label"]
