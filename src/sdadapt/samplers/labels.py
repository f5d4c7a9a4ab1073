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
"""

from __future__ import annotations

import difflib

from . import KARRAS_SAMPLERS, SAMPLER_ALIASES, SAMPLERS, resolve_schedule

__all__ = ["A1111_DISPLAY", "A1111_LABELS", "A1111_MISSING", "a1111_label", "sampler_choices", "sampler_from_label", "sampler_schedule_from_label"]

#: A1111 label (lower case, without " Karras") -> sampler name here (diffusers' scheduler of the label)
A1111_LABELS: dict[str, str] = {
    "euler": "euler",  # EulerDiscreteScheduler
    "euler a": "euler_a",  # EulerAncestralDiscreteScheduler
    "lms": "lms",  # LMSDiscreteScheduler
    "heun": "heun",  # HeunDiscreteScheduler
    "dpm2": "dpm_2",  # KDPM2DiscreteScheduler
    "dpm2 a": "dpm_2_a",  # KDPM2AncestralDiscreteScheduler
    "dpm++ 2m": "dpmsolver++",  # DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), order 2
    # DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"): A1111's update rule, Gaussian noise per
    # step instead of its Brownian tree (docs/samplers.md)
    "dpm++ 2m sde": "dpmsolver++_sde",
    # the same with solver_type="heun" (k-diffusion's sample_dpmpp_2m_sde(solver_type="heun")); Gaussian noise
    "dpm++ 2m sde heun": "dpmsolver++_sde_heun",
    "dpm++ sde": "dpmpp_sde",  # DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde, Brownian-tree noise)
    "dpm++ 2s a": "dpmpp_2s_a",  # no diffusers class: k-diffusion's sample_dpmpp_2s_ancestral on the Euler σ grid
    # DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++") with its third-order
    # coefficient corrected; Gaussian noise per step instead of A1111's Brownian tree (docs/samplers.md)
    "dpm++ 3m sde": "dpmsolver++_3m_sde",
    "dpm fast": "dpm_fast",  # no diffusers class: k-diffusion's sample_dpm_fast (steps = model calls)
    "dpm adaptive": "dpm_adaptive",  # no diffusers class: k-diffusion's sample_dpm_adaptive (its own step count)
    "restart": "restart",  # no diffusers class: A1111's restart_sampler (Heun steps + restart segments)
    "lcm": "lcm",  # LCMScheduler: A1111's x̂0-then-renoise rule on LCM's own timesteps (docs/samplers.md)
    "ddim": "ddim",  # DDIMScheduler
    "plms": "plms",  # PNDMScheduler(skip_prk_steps=True): only when a sampler named plms is registered
    # A1111's lower-case aliases (modules/sd_samplers_kdiffusion.py)
    "k_euler": "euler", "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_lms": "lms", "k_heun": "heun",
    "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a", "k_dpmpp_2m": "dpmsolver++",
    "k_dpmpp_2m_sde": "dpmsolver++_sde", "k_lcm": "lcm",
    "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_2s_a": "dpmpp_2s_a", "k_dpmpp_3m_sde": "dpmsolver++_3m_sde",
    "k_dpmpp_2m_sde_heun": "dpmsolver++_sde_heun", "k_dpm_fast": "dpm_fast", "k_dpm_ad": "dpm_adaptive",
}
#: A1111's aliases of its " Karras" labels (1.6–1.8: "DPM++ SDE Karras" is ``k_dpmpp_sde_ka``, ...), read as
#: the base alias + " Karras". (A1111 lists ``k_dpmpp_2m_sde_ka`` for both "DPM++ 2M SDE" and its Karras label;
#: its alias map keeps the later, Karras one.)
_KARRAS_ALIASES: frozenset[str] = frozenset({"k_dpmpp_sde_ka", "k_dpmpp_2s_a_ka", "k_dpmpp_3m_sde_ka",
                                             "k_dpmpp_2m_sde_ka", "k_dpmpp_2m_sde_heun_ka"})
#: A1111 1.6–1.8's aliases of its " Exponential" labels ("DPM++ 3M SDE Exponential" is ``k_dpmpp_3m_sde_exp``, ...)
_EXPONENTIAL_ALIASES: frozenset[str] = frozenset({"k_dpmpp_3m_sde_exp", "k_dpmpp_2m_sde_heun_exp",
                                                  "k_dpmpp_2m_sde_exp"})

#: A1111 labels with no sampler here (lower case) -> why
A1111_MISSING: dict[str, str] = {
    "unipc": "its own UniPC port (bh1, order 3), not diffusers' UniPCMultistepScheduler defaults",
    "ddim cfg++": "DDIM with CFG++ guidance",
    "euler cfg++": "Euler with CFG++ guidance",
    "plms": "PNDMScheduler with skip_prk_steps=True; kohya's pndm (the class's defaults) runs PNDM's Runge-Kutta "
            "warm-up steps first, so it is not A1111's PLMS",
}


#: A1111 label (lower case) -> A1111's display name (its ``SamplerData.name``, what its infotext writes)
A1111_DISPLAY: dict[str, str] = {
    "euler a": "Euler a", "dpm2": "DPM2", "dpm2 a": "DPM2 a", "dpm++ 2m": "DPM++ 2M", "ddim": "DDIM",
    "dpm++ 2m sde": "DPM++ 2M SDE", "lcm": "LCM", "dpm++ sde": "DPM++ SDE", "dpm++ 2s a": "DPM++ 2S a",
    "dpm++ 3m sde": "DPM++ 3M SDE", "dpm++ 2m sde heun": "DPM++ 2M SDE Heun",
    "dpm fast": "DPM fast", "dpm adaptive": "DPM adaptive", "restart": "Restart",
    "plms": "PLMS", "lms": "LMS", "euler": "Euler", "heun": "Heun"}


def a1111_label(name: str) -> str | None:
    """A sampler name here (:data:`SAMPLERS`) -> the A1111 display name of the sampler it follows
    (``"dpmsolver++"`` -> ``"DPM++ 2M"``), ``None`` when it follows none (``unipc``, ``ddpm``, ...)."""
    return next((A1111_DISPLAY[key] for key, mapped in A1111_LABELS.items()
                 if mapped == name and key in A1111_DISPLAY), None)


def sampler_choices() -> list[str]:
    """Every name :func:`sampler_from_label` takes without " Karras": the samplers, kohya's aliases
    and the A1111 labels whose sampler is registered (A1111's capitalisation)."""
    labels = [A1111_DISPLAY[k] for k, name in A1111_LABELS.items() if k in A1111_DISPLAY and name in SAMPLERS]
    return [*SAMPLERS, *SAMPLER_ALIASES, *labels]


def _taken() -> str:
    labels = [label for label in sampler_choices() if label[0].isupper()]
    return (f"the samplers {', '.join(SAMPLERS)}; their other names {', '.join(SAMPLER_ALIASES)}; A1111's "
            f"{', '.join(repr(label) for label in labels)}"
            f" (+ ' Karras' for {', '.join(KARRAS_SAMPLERS) or 'none'})")


def _did_you_mean(words: str) -> str:
    """``"; did you mean 'DPM++ 2M Karras'?"`` for the taken name closest to the lower-cased ``words``
    (a typo such as ``"dpm++ 2m karas"``), or ``""`` when none is close."""
    names = {}
    for choice in sampler_choices():
        names.setdefault(choice.lower(), choice)
        if choice[0].isupper() and A1111_LABELS.get(choice.lower()) in KARRAS_SAMPLERS:
            names.setdefault(f"{choice.lower()} karras", f"{choice} Karras")
    close = difflib.get_close_matches(words, list(names), n=1, cutoff=0.7)
    return f"; did you mean {names[close[0]]!r}?" if close else ""


def sampler_schedule_from_label(text: str) -> tuple[str, str | None]:
    """A sampler name, kohya alias or A1111 label, with an optional σ-grid suffix -> ``(name in SAMPLERS,
    schedule)``: ``" Karras"`` is ``"karras"``, ``" Exponential"`` (A1111 1.6–1.8's "DPM++ 3M SDE Exponential",
    "DPM++ 2M SDE Heun Exponential") ``"exponential"``, none ``None``.

    ``"DPM++ 2M SDE Heun Exponential"`` -> ``("dpmsolver++_sde_heun", "exponential")``; ``"Euler a"`` ->
    ``("euler_a", None)``. Case and repeated spaces do not matter.

    Raises:
        ValueError: a label with no sampler here (the message says why and lists what is taken), or a
            suffix on a sampler without that σ grid.
    """
    words = " ".join(str(text).lower().replace("_karras", " karras").split())
    if words in _EXPONENTIAL_ALIASES:
        words = words[: -len("_exp")] + " exponential"
    if words.endswith(" exponential"):
        base = words[: -len(" exponential")].strip()
        name, _ = sampler_from_label(base)
        try:
            return name, resolve_schedule(name, "exponential")
        except ValueError as exc:
            raise ValueError(f"sampler {text!r}: {exc}") from None
    name, karras = sampler_from_label(text)
    return name, ("karras" if karras else None)


def sampler_from_label(text: str) -> tuple[str, bool]:
    """A sampler name, kohya alias or A1111 label -> ``(name in SAMPLERS, karras)``.

    ``"DPM++ 2M Karras"`` -> ``("dpmsolver++", True)``; ``"Euler a"`` -> ``("euler_a", False)``;
    ``"k_euler"`` -> ``("euler", False)``. Case and repeated spaces do not matter.

    Raises:
        ValueError: a label with no sampler here (the message says why and lists what is taken), or
            " Karras" on a sampler without Karras σ.
    """
    words = " ".join(str(text).lower().replace("_karras", " karras").split())
    if words in _KARRAS_ALIASES:
        words = words[: -len("_ka")] + " karras"
    karras = words.endswith(" karras")
    base = words[: -len(" karras")].strip() if karras else words
    key = SAMPLER_ALIASES.get(base, base)
    if key in SAMPLERS:
        name = key
    elif base in A1111_LABELS and A1111_LABELS[base] in SAMPLERS:
        name = A1111_LABELS[base]
    elif base in A1111_MISSING:
        raise ValueError(f"sampler {text!r}: A1111's {base!r} is {A1111_MISSING[base]}; no sampler here matches it. "
                         f"Taken: {_taken()}")
    elif base in A1111_LABELS:
        raise ValueError(f"sampler {text!r} ({A1111_LABELS[base]}) is not available in this sdadapt; taken: {_taken()}")
    else:
        raise ValueError(f"unknown sampler {text!r}{_did_you_mean(words)}; taken: {_taken()}")
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"sampler {text!r}: {name} has no Karras noise levels (diffusers' class has no "
                         f"use_karras_sigmas); ' Karras' works with {', '.join(KARRAS_SAMPLERS) or 'none'}")
    return name, karras
