"""The names and option tables of the samplers, schedules, A1111 sampler labels and hires upscalers, without torch.

``python -m sdadapt generate`` and ``train`` build their ``--sampler`` / ``--schedule`` / ``--hires-upscaler`` /
``--sample-sampler`` options and check their values from these at parse time, so ``--help`` and usage errors
import no torch (tests/test_cli_startup.py). This is their one home: :mod:`sdadapt.samplers`,
:mod:`sdadapt.samplers.schedules`, :mod:`sdadapt.samplers.labels` and :mod:`sdadapt.img2img` import them from
here and re-export them under the names they always had (``sdadapt.samplers.SAMPLERS``,
``sdadapt.samplers.labels.sampler_from_label`` ...).

* samplers (:data:`SAMPLERS`, :data:`SAMPLER_ALIASES`, :data:`KARRAS_SAMPLERS`, :data:`SCHEDULE_SAMPLERS`,
  :func:`canonical_sampler`, :func:`check_karras`, :func:`resolve_schedule`): see :mod:`sdadapt.samplers`;
* A1111's "Schedule type" names (:data:`SCHEDULES`, :data:`SCHEDULE_LABELS`, :data:`A1111_AUTOMATIC`,
  :data:`DISCARD_NEXT_TO_LAST_SIGMA`, :func:`canonical_schedule`): see :mod:`sdadapt.samplers.schedules`;
* AUTOMATIC1111's sampler labels ("DPM++ 2M Karras", "Euler a", ...; :data:`A1111_LABELS`,
  :func:`sampler_from_label`, :func:`sampler_schedule_from_label`): see :mod:`sdadapt.samplers.labels`;
* the hires-fix upscalers (:data:`LATENT_UPSCALERS`, :data:`HIRES_UPSCALERS`): see :mod:`sdadapt.img2img`;
* A1111's labels of ``--hires-upscaler`` / ``--resize-mode`` / ``--inpainting-fill`` (:data:`HIRES_UPSCALER_LABELS`,
  :data:`RESIZE_MODE_LABELS`, :data:`INPAINTING_FILL_LABELS`; :func:`canonical_choice` reads either spelling).
"""

from __future__ import annotations

import difflib

__all__ = [
    "A1111_AUTOMATIC",
    "A1111_DISPLAY",
    "A1111_LABELS",
    "A1111_MISSING",
    "A1111_SECOND_ORDER",
    "DISCARD_NEXT_TO_LAST_SIGMA",
    "ETA_SAMPLERS",
    "HIRES_UPSCALERS",
    "HIRES_UPSCALER_LABELS",
    "INPAINTING_FILL_LABELS",
    "KARRAS_SAMPLERS",
    "LATENT_UPSCALERS",
    "NOISE_SCHEDULE_LABELS",
    "PIXEL_UPSCALERS",
    "RESIZE_MODE_LABELS",
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "SCHEDULES",
    "SCHEDULE_LABELS",
    "SCHEDULE_SAMPLERS",
    "SGM_SAMPLERS",
    "TIMESTEP_SAMPLERS",
    "VAE_ENCODE_METHODS",
    "a1111_label",
    "a1111_total_steps",
    "canonical_choice",
    "canonical_sampler",
    "canonical_schedule",
    "check_karras",
    "resolve_schedule",
    "run_schedule",
    "runs_a1111_timesteps",
    "sampler_choices",
    "sampler_from_label",
    "sampler_schedule_from_label",
    "takes_eta_ddim",
]

#: samplers that take A1111's "Eta for ancestral samplers" (``eta=``; k-diffusion's functions with an ``eta``:
#: ``KDiffusionSampler.initialize`` passes ``opts.eta_ancestral`` to them and writes "Eta" when it is not 1)
ETA_SAMPLERS: tuple[str, ...] = ("euler_a", "dpm_2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmsolver++_sde",
                                 "dpmsolver++_sde_heun", "dpmsolver++_3m_sde", "dpm_fast", "dpm_adaptive")

#: the samplers A1111 hands its "Sigma churn" settings (``sampler_extra_params``: ``sample_euler``, ``sample_heun``,
#: ``sample_dpm_2``; :mod:`sdadapt.samplers.churn`)
CHURN_SAMPLERS: tuple[str, ...] = ("euler", "heun", "dpm_2")

# ------------------------------------------------------------------------------------- A1111's timestep samplers
#: A1111's timestep samplers (modules/sd_samplers_timesteps.py: DDIM, PLMS, DDIM CFG++ —
#: :mod:`sdadapt.samplers.a1111_timesteps` — and UniPC, :mod:`sdadapt.samplers.unipc_a1111`): A1111's timesteps
#: ``range(0, T, T // n) + 1``, no σ grid. ``plms``, ``ddim_cfgpp`` and ``unipc_a1111`` are A1111's always; ``ddim``
#: is A1111's given a schedule, diffusers' ``DDIMScheduler`` without one.
TIMESTEP_SAMPLERS: tuple[str, ...] = ("ddim", "plms", "ddim_cfgpp", "unipc_a1111")
#: the timestep samplers with an ``eta``, A1111's "Eta DDIM" (its DDIM and DDIM CFG++)
_ETA_DDIM: tuple[str, ...] = ("ddim", "ddim_cfgpp")


def runs_a1111_timesteps(name: str, schedule: str | None) -> bool:
    """Whether sampler ``name`` (canonical) asked for on ``schedule`` runs as A1111's timestep sampler."""
    return name in TIMESTEP_SAMPLERS and (name != "ddim" or schedule is not None)


def takes_eta_ddim(name: str, schedule: str | None) -> bool:
    """Whether sampler ``name`` (canonical) on ``schedule`` takes A1111's "Eta DDIM" (its DDIM and DDIM CFG++: the
    timestep samplers with an ``eta``; not PLMS or UniPC)."""
    return name in _ETA_DDIM and runs_a1111_timesteps(name, schedule)


# ------------------------------------------------------------------------------------------ A1111's call counts
#: sdadapt's samplers whose A1111 sampler is marked ``"second_order": True`` (A1111 v1.10
#: modules/sd_samplers_kdiffusion.py ``samplers_k_diffusion``: DPM++ SDE, DPM++ 2S a, Heun, DPM2, DPM2 a, Restart):
#: A1111 expects two denoiser calls per step of them (``SamplerData.total_steps``, modules/sd_samplers_common.py:13-18)
A1111_SECOND_ORDER: frozenset[str] = frozenset({"dpmpp_sde", "dpmpp_2s_a", "heun", "dpm_2", "dpm_2_a", "restart"})


def a1111_total_steps(sampler: str, steps: int) -> int:
    """A1111's ``CFGDenoiser.total_steps`` of a sampler run of ``steps`` steps (``launch_sampling``'s argument: the
    txt2img steps, an img2img / hires pass's ``t_enc + 1``): ``2 * steps`` for :data:`A1111_SECOND_ORDER` samplers,
    else ``steps`` (``sampler``: a canonical name, :func:`sdadapt.samplers.canonical_sampler`)."""
    return int(steps) * (2 if sampler in A1111_SECOND_ORDER else 1)


# ------------------------------------------------------------------------------------------------ schedules
#: every schedule name taken (A1111's ``Scheduler.name``), ``automatic`` first
SCHEDULES: tuple[str, ...] = ("automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                              "kl_optimal", "align_your_steps", "align_your_steps_sdxl", "simple", "normal", "ddim",
                              "beta")
#: schedule name -> A1111's label (its infotext "Schedule type: ...")
SCHEDULE_LABELS: dict[str, str] = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                                   "exponential": "Exponential", "polyexponential": "Polyexponential",
                                   "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                                   "align_your_steps": "Align Your Steps",
                                   "align_your_steps_sdxl": "Align Your Steps", "simple": "Simple", "normal": "Normal",
                                   "ddim": "DDIM", "beta": "Beta"}
#: sampler name here -> the schedule A1111 ≥ 1.9 runs it on under "Automatic" (the others: ``uniform``)
A1111_AUTOMATIC: dict[str, str] = {"dpmsolver++": "karras", "dpmpp_sde": "karras", "dpmsolver++_sde": "exponential",
                                   "dpmsolver++_sde_heun": "exponential", "dpmpp_2s_a": "karras",
                                   "dpmsolver++_3m_sde": "exponential", "dpm_2": "karras", "dpm_2_a": "karras",
                                   "restart": "karras"}
#: sampler names here that A1111 marks ``discard_next_to_last_sigma`` (its DPM2, DPM2 a, DPM++ 3M SDE): on a
#: schedule they run the grid of n + 1 steps without its next-to-last σ (:func:`schedule_sigmas`)
DISCARD_NEXT_TO_LAST_SIGMA: tuple[str, ...] = ("dpm_2", "dpm_2_a", "dpmsolver++_3m_sde")
_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's alias


def canonical_schedule(name: str) -> str:
    """A schedule name or A1111 label (any case: ``"SGM Uniform"``, ``"sgm_uniform"``, ``"KL Optimal"``)
    -> its name in :data:`SCHEDULES`.

    Raises:
        ValueError: an unknown schedule, naming those taken.
    """
    key = "_".join(str(name).strip().lower().replace("-", " ").split())
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)} "
                         f"(or A1111's labels {', '.join(repr(v) for v in SCHEDULE_LABELS.values())})")
    return key


# ------------------------------------------------------------------------------------------------- samplers
#: every sampler name ``sdadapt.samplers.sample_latents`` takes (kohya's ``sample_sampler`` spellings), in the order
#: of its function table (``sdadapt.samplers._SAMPLERS``, ``ddim`` first: tests/test_cli_parse_tables.py checks it)
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
                              "dpmsolver", "dpmsolver++", "dpmsingle", "unipc", "dpmsolver++_sde", "lcm", "dpmpp_sde",
                              "dpmpp_2s_a", "dpmsolver++_3m_sde", "dpmsolver++_sde_heun", "dpm_fast", "dpm_adaptive",
                              "restart", "plms", "ddim_cfgpp", "unipc_a1111")
#: other spellings of the same samplers (kohya's ``k_`` names)
SAMPLER_ALIASES: dict[str, str] = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                                   "k_dpm_2_a": "dpm_2_a", "dpm++_2m": "dpmsolver++", "dpmpp_2m": "dpmsolver++",
                                   "dpm++_2m_sde": "dpmsolver++_sde", "dpmpp_2m_sde": "dpmsolver++_sde",
                                   "dpm++_sde": "dpmpp_sde", "k_dpmpp_sde": "dpmpp_sde", "dpmsolversde": "dpmpp_sde",
                                   "dpm++_2s_a": "dpmpp_2s_a", "dpmpp_2s_ancestral": "dpmpp_2s_a",
                                   "k_dpmpp_2s_a": "dpmpp_2s_a", "k_dpmpp_2s_ancestral": "dpmpp_2s_a",
                                   "dpm++_3m_sde": "dpmsolver++_3m_sde", "dpmpp_3m_sde": "dpmsolver++_3m_sde",
                                   "k_dpmpp_3m_sde": "dpmsolver++_3m_sde", "dpm++_2m_sde_heun": "dpmsolver++_sde_heun",
                                   "dpmpp_2m_sde_heun": "dpmsolver++_sde_heun",
                                   "k_dpmpp_2m_sde_heun": "dpmsolver++_sde_heun", "k_dpm_fast": "dpm_fast",
                                   "k_dpm_ad": "dpm_adaptive", "dpm_ad": "dpm_adaptive", "ddim_cfg++": "ddim_cfgpp"}
#: samplers that take ``karras=True`` (σ on Karras et al.'s ρ = 7 grid)
KARRAS_SAMPLERS: tuple[str, ...] = ("lms", "euler", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle",
                                    "unipc", "dpmsolver++_sde", "dpmpp_sde", "dpmpp_2s_a",
                                    "dpmsolver++_3m_sde", "dpmsolver++_sde_heun", "restart")
#: samplers that take a ``schedule`` (A1111's "Schedule type", :mod:`.schedules`): those on a σ grid (``lcm``: A1111's
#: LCM sampler on its 50-entry σ table, sdadapt.samplers.lcm)
SCHEDULE_SAMPLERS: tuple[str, ...] = ("lms", "euler", "heun", "dpm_2", "dpm_2_a", "euler_a", "dpmsolver", "dpmsolver++",
                                      "dpmsingle", "unipc", "dpmsolver++_sde", "dpmpp_sde", "dpmpp_2s_a",
                                      "dpmsolver++_3m_sde", "dpmsolver++_sde_heun", "restart", "lcm")
#: the samplers whose txt2img run starts from ``x_T·σ_0`` on one of A1111's grids (its k-diffusion samplers), where
#: A1111's "SGM noise multiplier" starts them from ``x_T·√(1 + σ_0²)`` (:func:`.samplers.sigma_space.first_sample`)
SGM_SAMPLERS: tuple[str, ...] = tuple(name for name in SCHEDULE_SAMPLERS
                                      if name not in ("dpmsolver", "dpmsingle", "unipc"))
#: samplers without a σ grid -> why no schedule applies
_NO_SCHEDULE: dict[str, str] = {
    "ddim": "DDIM steps the model's integer timesteps (its own alphas), not a σ grid",
    "ddpm": "DDPM steps the model's integer timesteps by its posterior variance, not a σ grid",
    "pndm": "PNDM (PLMS) steps fixed integer timesteps with a multistep rule tied to their spacing",
    "plms": "A1111's PLMS steps its own integer timesteps, not a σ grid",
    "ddim_cfgpp": "A1111's DDIM CFG++ steps its own integer timesteps, not a σ grid",
    "unipc_a1111": "A1111's UniPC steps DPM-Solver's continuous time of the model's discrete schedule, not a σ grid",
    "dpm_fast": "DPM fast spaces its steps evenly in log σ between the model's σ_max and σ_min itself",
    "dpm_adaptive": "DPM adaptive chooses its own steps in log σ between the model's σ_max and σ_min",
}


def canonical_sampler(name: str) -> str:
    """``name`` (any case, kohya's ``k_`` aliases) -> its name in :data:`SAMPLERS`.

    Raises:
        ValueError: an unknown name; the message lists the names taken.
    """
    key = str(name).strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)} "
                         f"(or {', '.join(SAMPLER_ALIASES)})")
    return key


def check_karras(name: str, karras: bool) -> None:
    """Refuse ``karras`` for a sampler (``name``: its name in :data:`SAMPLERS`) without Karras σ
    (its diffusers scheduler has no ``use_karras_sigmas``), before any work.

    Raises:
        ValueError: naming the sampler and :data:`KARRAS_SAMPLERS`.
    """
    if karras and name not in KARRAS_SAMPLERS:
        grid = (f"; A1111's Karras schedule type for it is schedule='karras' (--schedule karras)"
                if name in SCHEDULE_SAMPLERS else "")
        raise ValueError(f"sampler {name!r} has no Karras noise levels (diffusers' scheduler has no "
                         f"use_karras_sigmas); karras works with {', '.join(KARRAS_SAMPLERS)}{grid}")


def run_schedule(name: str, schedule: str | None, karras: bool = False) -> str | None:
    """The grid a run is asked for: :func:`resolve_schedule`'s, but a timestep sampler given any schedule keeps
    ``"automatic"`` — A1111's own DDIM, PLMS, DDIM CFG++ (:data:`TIMESTEP_SAMPLERS`), which A1111 runs on its
    timesteps whatever the schedule type ("Sampler: DDIM, Schedule type: Karras" is A1111's DDIM); without one
    ``ddim`` is diffusers' DDIM.

    Raises:
        ValueError: as :func:`resolve_schedule`.
    """
    if schedule is not None and canonical_sampler(name) in TIMESTEP_SAMPLERS:
        canonical_schedule(schedule)  # (a name A1111 has, which it does not apply to them)
        return "automatic"
    return resolve_schedule(name, schedule, karras)


def resolve_schedule(name: str, schedule: str | None, karras: bool = False) -> str | None:
    """The σ grid a sampler runs on: ``None`` (the sampler's diffusers grid; with ``karras``, its Karras σ) or a
    name in :data:`SCHEDULES` other than ``automatic``. ``schedule``: a schedule name or A1111 label (any case);
    ``"automatic"`` is A1111 ≥ 1.9's choice for the sampler (:data:`A1111_AUTOMATIC`, else
    ``uniform``; on a sampler without a σ grid, ``None``: its own steps, as A1111 runs it). ``name``: a name
    in :data:`SAMPLERS`.

    Raises:
        ValueError: an unknown schedule, a schedule other than ``automatic`` on a sampler without a σ grid
            (``ddim``, ``ddpm``, ``pndm``, ``dpm_fast``, ``dpm_adaptive``: the reason named), or
            ``karras`` with a schedule other than Karras.
    """
    if schedule is None:
        return None
    key = canonical_schedule(schedule)
    if key == "automatic" and name not in SCHEDULE_SAMPLERS:
        return None
    if name not in SCHEDULE_SAMPLERS:
        raise ValueError(f"sampler {name!r} takes no schedule: {_NO_SCHEDULE.get(name, 'it has no σ grid')}; "
                         f"schedules work with {', '.join(SCHEDULE_SAMPLERS)}")
    if key == "automatic":
        key = A1111_AUTOMATIC.get(name, "uniform")
    if karras and key != "karras":
        raise ValueError(f"karras and schedule {schedule!r} both name a σ grid; give one (karras is schedule 'karras')")
    return key


# -------------------------------------------------------------------------------------- A1111 sampler labels
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
    "lcm": "lcm",  # LCMScheduler on LCM's own timesteps; with a schedule A1111's LCM sampler (its σ grid)
    "ddim": "ddim",  # DDIMScheduler; with a schedule A1111's own DDIM (sdadapt.samplers.a1111_timesteps)
    "plms": "plms",  # A1111's PLMS (sd_samplers_timesteps_impl.plms, not diffusers' PNDMScheduler)
    "ddim cfg++": "ddim_cfgpp",  # A1111's DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp)
    # A1111's UniPC (sd_samplers_timesteps_impl.unipc): the label as A1111 writes it, "UniPC" (the name unipc in
    # any other case is diffusers' UniPCMultistepScheduler, sdadapt's unipc)
    "unipc": "unipc_a1111",
    # A1111's lower-case aliases (modules/sd_samplers_kdiffusion.py)
    "k_euler": "euler", "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_lms": "lms", "k_heun": "heun",
    "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a", "k_dpmpp_2m": "dpmsolver++",
    "k_dpmpp_2m_sde": "dpmsolver++_sde", "k_lcm": "lcm",
    "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_2s_a": "dpmpp_2s_a", "k_dpmpp_3m_sde": "dpmsolver++_3m_sde",
    "k_dpmpp_2m_sde_heun": "dpmsolver++_sde_heun", "k_dpm_fast": "dpm_fast", "k_dpm_ad": "dpm_adaptive",
}
# (A1111's k_ aliases are sampler names too, for sample_latents and canonical_sampler as for the labels: one list)
SAMPLER_ALIASES.update({alias: name for alias, name in A1111_LABELS.items()
                        if alias.startswith("k_") and alias not in SAMPLER_ALIASES})
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
    "euler cfg++": "Forge's Euler with CFG++ guidance (not an A1111 sampler)",
}


#: A1111 label (lower case) -> A1111's display name (its ``SamplerData.name``, what its infotext writes)
A1111_DISPLAY: dict[str, str] = {
    "euler a": "Euler a", "dpm2": "DPM2", "dpm2 a": "DPM2 a", "dpm++ 2m": "DPM++ 2M", "ddim": "DDIM",
    "dpm++ 2m sde": "DPM++ 2M SDE", "lcm": "LCM", "dpm++ sde": "DPM++ SDE", "dpm++ 2s a": "DPM++ 2S a",
    "dpm++ 3m sde": "DPM++ 3M SDE", "dpm++ 2m sde heun": "DPM++ 2M SDE Heun",
    "dpm fast": "DPM fast", "dpm adaptive": "DPM adaptive", "restart": "Restart",
    "plms": "PLMS", "ddim cfg++": "DDIM CFG++", "unipc": "UniPC", "lms": "LMS", "euler": "Euler", "heun": "Heun"}
#: A1111 display labels that read as another sampler's name in another case: taken as A1111's only written as A1111
#: writes them ("UniPC": A1111's UniPC; "unipc", "UNIPC": sdadapt's unipc, diffusers')
_EXACT_LABELS: dict[str, str] = {"UniPC": "unipc_a1111"}


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
    if " ".join(str(text).split()) in _EXACT_LABELS:
        return _EXACT_LABELS[" ".join(str(text).split())], False
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


# ------------------------------------------------------------------------------------------- hires upscalers
#: ``--hires-upscaler`` name -> A1111's latent upscale mode (``interpolate`` mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "latent": ("bilinear", False),                   # A1111 "Latent"
    "latent-antialiased": ("bilinear", True),        # "Latent (antialiased)"
    "latent-bicubic": ("bicubic", False),            # "Latent (bicubic)"
    "latent-bicubic-antialiased": ("bicubic", True),  # "Latent (bicubic antialiased)"
    "latent-nearest": ("nearest", False),            # "Latent (nearest)"
    "latent-nearest-exact": ("nearest-exact", False),  # "Latent (nearest-exact)"
}
#: the pixel hires upscalers (decode, enlarge, encode) -> A1111's built-in upscaler each is (modules/upscaler.py:
#: ``UpscalerLanczos``, ``UpscalerNearest``, ``UpscalerNone`` — "None" one Lanczos resize to the size)
PIXEL_UPSCALERS: dict[str, str] = {"pixel-lanczos": "Lanczos", "pixel-nearest": "Nearest", "pixel-none": "None"}
#: every hires upscaler: the latent ones and the pixel ones (or an ESRGAN model file: sdadapt.esrgan)
HIRES_UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
#: ``--hires-upscaler`` -> A1111's upscaler name, the infotext's "Hires upscaler" (modules/shared.py
#: ``latent_upscale_modes``; the pixel ones: :data:`PIXEL_UPSCALERS`)
HIRES_UPSCALER_LABELS: dict[str, str] = {
    "latent": "Latent", "latent-antialiased": "Latent (antialiased)", "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)", "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)", **PIXEL_UPSCALERS}
#: ``--resize-mode`` -> A1111's img2img "Resize mode" radio label (modules/ui.py ``resize_mode``, 0 to 3; the fourth
#: resizes the init image's latents, not its pixels: :func:`sdadapt.resize_modes.latent_resize`)
RESIZE_MODE_LABELS: dict[str, str] = {"just": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill",
                                      "latent": "Just resize (latent upscale)"}
#: ``--noise-schedule`` -> A1111's "Noise schedule for sampling" (``sd_noise_schedule``), the infotext's "Noise
#: Schedule" (modules/sd_models.py ``apply_alpha_schedule_override``)
NOISE_SCHEDULE_LABELS: dict[str, str] = {"default": "Default", "zero-terminal-snr": "Zero Terminal SNR"}
#: ``--inpainting-fill`` -> A1111's "Masked content" radio label (modules/ui.py ``inpainting_fill``)
INPAINTING_FILL_LABELS: dict[str, str] = {"fill": "fill", "original": "original", "latent-noise": "latent noise",
                                          "latent-nothing": "latent nothing"}
#: ``--vae-encode``: how an init image (img2img, inpainting, the pixel hires pass) becomes latents — the VAE
#: posterior's ``mean`` (sdadapt's default) or a ``sample`` drawn from the image's seed generator before its start
#: noise (diffusers' img2img pipelines; :func:`sdadapt.img2img.init_generator`)
VAE_ENCODE_METHODS: tuple[str, ...] = ("mean", "sample")


def canonical_choice(option: str, text: str, labels: dict[str, str]) -> str:
    """``text`` as the option's own name: the name itself, or A1111's label for it as its UI and infotext spell it
    (``"Latent (bicubic antialiased)"`` -> ``latent-bicubic-antialiased``, ``"Crop and resize"`` -> ``crop``,
    ``"latent noise"`` -> ``latent-noise``), case and blanks at the ends ignored.

    Args:
        option: the option's name, for the message (``"--hires-upscaler"``).
        text: the value given.
        labels: the option's names -> A1111 labels (:data:`HIRES_UPSCALER_LABELS`, :data:`RESIZE_MODE_LABELS`,
            :data:`INPAINTING_FILL_LABELS`).

    Raises:
        ValueError: neither a name nor a label; names both lists.
    """
    wanted = " ".join(str(text).split()).casefold()
    for spelling in (lambda name: name, labels.get):  # (the names first: a name is never read as another's label)
        for name in labels:
            if spelling(name).casefold() == wanted:
                return name
    raise ValueError(f"{option} {text!r}: not one of {', '.join(labels)} "
                     f"(or A1111's {', '.join(repr(label) for label in labels.values())})")
