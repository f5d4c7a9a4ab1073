"""Dynamic thresholding ("CFG Scale Fix", mcmonkey's ``sd-dynamic-thresholding``): classifier-free guidance at a high
scale, its spread brought back to what a lower *mimic* scale would give, so a scale of 20 or 30 keeps the prompt's
pull without burning the image::

    m = u + s_mimic·Δ      g = u + s·Δ            Δ = Σ_i w_i·(c_i − u)   (B, C, H, W)
    ĝ = g − mean(g)        the mean per sample and channel
    AD, MEAN:  ref_m = max|m − mean(m)|,  ref_g = quantile(|ĝ|, p),  r = max(ref_m, ref_g)
               (the references per sample and channel with separate feature channels, else over the whole batch)
               out = clamp(ĝ, −r, r) / r · ref_m + mean(g)
    STD, MEAN: out = ĝ / std(ĝ) · std(m − mean(m)) + mean(g)
    ZERO:      out = g · ref_m / ref_g        (ref: the AD or STD measure above)
    out' = φ·out + (1 − φ)·g                  φ: interpolate phi (1: out)

on the x̂0 of each branch (``u``: the negative's, ``c_i``: the ``AND`` sub-prompts', ``w_i`` their weights), with the
stds unbiased and the quantile linear — the extension's ``DynThresh.dynthresh`` (``dynthres_core.py``), which A1111's
extension, Forge's built-in "DynamicThresholding (CFG-Fix) Integrated" and the ComfyUI node share.
:func:`dynamic_threshold` is that formula; :class:`DynamicThresholding` is the setting a run takes.

Both scales may follow a schedule over the run (``mimic_mode`` / ``cfg_mode``, :data:`DYNAMIC_THRESHOLDING_MODES`):
``scale' = (scale − min)·f(frac) + min`` (:func:`scheduled_scale`). What ``frac`` counts is where the tools differ
(``step_rule``):

- ``"calls"``: A1111's extension — the ``CFGDenoiser``'s call count ``k`` (0-based) over its ``total_steps``
  (the run's expected calls, :func:`sdadapt.samplers.run_total_steps`): ``frac = k / (total_steps − 1)``;
- ``"timesteps"``: Forge's and ComfyUI's — the call's timestep ``t`` (its σ's nearest training step):
  ``frac = (999 − t) / 998``. (The ComfyUI node's newest version also skips thresholding altogether — plain
  guidance, no schedule — on a call whose guidance scale equals the mimic scale; Forge's copy and sdadapt do not.)

The two agree for the ``Constant`` modes (the defaults). Where it runs: A1111's σ samplers (a ``schedule``;
:func:`check_dynamic_thresholding_run`), which read each branch to x̂0 as the tools do
(:mod:`sdadapt.denoised_branches`); A1111's extension refuses DDIM and PLMS, diffusers has no such option, so
A1111's timestep samplers, diffusers' grids (the outputs are combined there, not x̂0), LCM and EDM models are refused.
It replaces the guidance combination, as the tools' CFG function: not with a guidance rescale (each tool runs one
CFG function), before perturbed-attention and self-attention guidance (Forge's post-CFG functions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["COMBINES_OUTPUTS", "DYNAMIC_THRESHOLDING_FIELDS", "DYNAMIC_THRESHOLDING_FORGE_FIELDS",
           "DYNAMIC_THRESHOLDING_MODES", "DYNAMIC_THRESHOLDING_STEP_RULES", "DynamicThresholding", "check_dynamic_thresholding_guidance",
           "check_dynamic_thresholding_run",
           "dynamic_threshold", "dynamic_thresholding_fields", "dynamic_thresholding_from_fields",
           "parse_dynamic_thresholding", "scheduled_scale"]

#: the scale schedules (``DynThresh.Modes``), in the extension's order
DYNAMIC_THRESHOLDING_MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up",
                              "Half Cosine Up", "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating",
                              "Sawtooth")
#: what a schedule's ``frac`` counts: A1111's extension's calls, Forge's / ComfyUI's timesteps (module docstring)
DYNAMIC_THRESHOLDING_STEP_RULES = ("calls", "timesteps")
#: A1111's extension's infotext keys (``p.extra_generation_params``): enabled, mimic scale, separate feature channels,
#: scaling startpoint, variability measure, interpolate phi, threshold percentile (in %), then the schedules' (written
#: when a mode is not Constant): mimic mode, mimic scale minimum, CFG mode, CFG scale minimum, scheduler value
DYNAMIC_THRESHOLDING_FIELDS = ("Dynamic thresholding enabled", "Mimic scale", "Separate Feature Channels",
                               "Scaling Startpoint", "Variability Measure", "Interpolate Phi", "Threshold percentile",
                               "Mimic mode", "Mimic scale minimum", "CFG mode", "CFG scale minimum", "Scheduler value")
#: Forge's built-in script's keys (every one written when enabled; the percentile a portion, the channels
#: ``enable`` / ``disable``), in the same order as :data:`DYNAMIC_THRESHOLDING_FIELDS`
DYNAMIC_THRESHOLDING_FORGE_FIELDS = ("dynthres_enabled", "dynthres_mimic_scale", "dynthres_separate_feature_channels",
                                     "dynthres_scaling_startpoint", "dynthres_variability_measure",
                                     "dynthres_interpolate_phi", "dynthres_threshold_percentile", "dynthres_mimic_mode",
                                     "dynthres_mimic_scale_min", "dynthres_cfg_mode", "dynthres_cfg_scale_min",
                                     "dynthres_sched_val")

#: the order Forge's script writes its keys in (forge_dynamic_thresholding.py ``p.extra_generation_params``)
_FORGE_WRITTEN_ORDER = tuple(DYNAMIC_THRESHOLDING_FORGE_FIELDS[k] for k in (0, 1, 6, 7, 8, 9, 10, 11, 2, 3, 4, 5))

#: samplers that combine the model outputs on any grid (diffusers' solvers, not A1111's): refused
COMBINES_OUTPUTS = ("ddpm", "pndm", "dpmsolver", "dpmsingle", "unipc")

_STARTPOINTS = ("MEAN", "ZERO")
_MEASURES = ("AD", "STD")


def scheduled_scale(scale: float, mode: str, *, minimum: float, frac: float, value: float) -> float:
    """``scale`` at ``frac`` of the run under schedule ``mode`` (:data:`DYNAMIC_THRESHOLDING_MODES`):
    ``(scale − minimum)·f(frac) + minimum``, ``value`` the power of ``Power Up/Down`` and the repeats of the
    repeating ones — the extension's ``interpret_scale``, its constants (1.5707, 6.28318) as written."""
    scale -= minimum
    if mode == "Linear Down":
        scale *= 1.0 - frac
    elif mode == "Half Cosine Down":
        scale *= math.cos(frac)
    elif mode == "Cosine Down":
        scale *= math.cos(frac * 1.5707)
    elif mode == "Linear Up":
        scale *= frac
    elif mode == "Half Cosine Up":
        scale *= 1.0 - math.cos(frac)
    elif mode == "Cosine Up":
        scale *= 1.0 - math.cos(frac * 1.5707)
    elif mode == "Power Up":
        scale *= math.pow(frac, value)
    elif mode == "Power Down":
        scale *= 1.0 - math.pow(frac, value)
    elif mode == "Linear Repeating":
        portion = (frac * value) % 1.0
        scale *= (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    elif mode == "Cosine Repeating":
        scale *= math.cos(frac * 6.28318 * value) * 0.5 + 0.5
    elif mode == "Sawtooth":
        scale *= (frac * value) % 1.0
    return scale + minimum


def dynamic_threshold(uncond: Tensor, delta: Tensor, *, scale: float, mimic_scale: float,
                      threshold_percentile: float = 1.0, separate_feature_channels: bool = True,
                      scaling_startpoint: str = "MEAN", variability_measure: str = "AD",
                      interpolate_phi: float = 1.0) -> Tensor:
    """The guided x̂0 (B, C, H, W) of ``uncond`` (B, C, H, W) and ``delta`` = ``Σ_i w_i·(c_i − uncond)`` (B, C, H, W)
    at ``scale`` with its spread brought to ``mimic_scale``'s (module docstring). ``threshold_percentile``: the
    quantile (a portion in [0, 1]) of the guided result's spread that AD clamps at; ``separate_feature_channels``:
    mean and spread per sample and channel (else over the whole batch, as the extension does); the rest as named
    there. Differentiable."""
    mim_target = uncond + delta * mimic_scale
    cfg_target = uncond + delta * scale
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)  # (B, C, HW)
    cfg_means = cfg_flat.mean(dim=2).unsqueeze(2)  # (B, C, 1)
    mim_centered = mim_flat - mim_flat.mean(dim=2).unsqueeze(2)
    cfg_centered = cfg_flat - cfg_means
    ad = variability_measure == "AD"
    if separate_feature_channels:
        if ad:
            mim_ref = mim_centered.abs().max(dim=2).values.unsqueeze(2)  # (B, C, 1)
            cfg_ref = torch.quantile(cfg_centered.abs(), threshold_percentile, dim=2).unsqueeze(2)
        else:
            mim_ref, cfg_ref = mim_centered.std(dim=2).unsqueeze(2), cfg_centered.std(dim=2).unsqueeze(2)
    elif ad:
        mim_ref, cfg_ref = mim_centered.abs().max(), torch.quantile(cfg_centered.abs(), threshold_percentile)
    else:
        mim_ref, cfg_ref = mim_centered.std(), cfg_centered.std()
    if scaling_startpoint == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref)
    elif ad:
        limit = torch.maximum(mim_ref, cfg_ref)
        result = cfg_centered.clamp(-limit, limit) / limit * mim_ref + cfg_means
    else:
        result = cfg_centered / cfg_ref * mim_ref + cfg_means
    out = result.unflatten(2, mim_target.shape[2:])
    if interpolate_phi != 1.0:
        out = out * interpolate_phi + cfg_target * (1.0 - interpolate_phi)
    return out


def _check_in(what: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"dynamic thresholding's {what} is one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_range(what: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"dynamic thresholding's {what} is in [{low:g}, {high:g}], got {value}")
    return value


@dataclass(frozen=True)
class DynamicThresholding:
    """The dynamic thresholding of a run (module docstring): the options of the extension's panel, its names and
    defaults (Forge's and ComfyUI's: the percentile a portion, ``sched_val`` 1; A1111's panel shows the percentile
    in % and a scheduler value of 4), and ``step_rule`` (:data:`DYNAMIC_THRESHOLDING_STEP_RULES`): what the
    schedules count, A1111's extension's calls or Forge's / ComfyUI's timesteps.

    Raises:
        ValueError: an option outside its range (scales and minimums in [0, 100], the percentile and φ in [0, 1]),
            an unknown mode, startpoint, measure or step rule, naming it.
    """

    mimic_scale: float = 7.0
    threshold_percentile: float = 1.0
    mimic_mode: str = "Constant"
    mimic_scale_min: float = 0.0
    cfg_mode: str = "Constant"
    cfg_scale_min: float = 0.0
    sched_val: float = 1.0
    separate_feature_channels: bool = True
    scaling_startpoint: str = "MEAN"
    variability_measure: str = "AD"
    interpolate_phi: float = 1.0
    step_rule: str = "calls"

    def __post_init__(self) -> None:
        for name, high in (("mimic_scale", 100.0), ("mimic_scale_min", 100.0), ("cfg_scale_min", 100.0),
                           ("sched_val", 100.0), ("threshold_percentile", 1.0), ("interpolate_phi", 1.0)):
            object.__setattr__(self, name, _check_range(name, getattr(self, name), 0.0, high))
        _check_in("mimic_mode", self.mimic_mode, DYNAMIC_THRESHOLDING_MODES)
        _check_in("cfg_mode", self.cfg_mode, DYNAMIC_THRESHOLDING_MODES)
        _check_in("scaling_startpoint", self.scaling_startpoint, _STARTPOINTS)
        _check_in("variability_measure", self.variability_measure, _MEASURES)
        _check_in("step_rule", self.step_rule, DYNAMIC_THRESHOLDING_STEP_RULES)
        object.__setattr__(self, "separate_feature_channels", bool(self.separate_feature_channels))

    @property
    def wraps_first_sampler_only(self) -> bool:
        """Whether a hires pass with a sampler of its own runs plain guidance: A1111's extension (``"calls"``) wraps
        ``p.sampler_name`` only, and A1111 builds the hires pass's own sampler by its plain name; Forge's built-in
        (``"timesteps"``) patches the UNet, every pass."""
        return self.step_rule == "calls"

    @property
    def scheduled(self) -> bool:
        """Whether either scale follows a schedule (a mode other than ``Constant``)."""
        return self.mimic_mode != "Constant" or self.cfg_mode != "Constant"

    def frac(self, *, call: int, total_steps: int, t: Tensor | float) -> float:
        """The schedules' position in the run (module docstring): ``call / (total_steps − 1)`` for ``"calls"`` (0 in
        a run of one call, where the extension divides by zero), ``(999 − round(t)) / 998`` for ``"timesteps"``
        (``t``: the call's model timestep, fractional on A1111's grids; its first entry)."""
        if self.step_rule == "calls":
            return call / (total_steps - 1) if total_steps > 1 else 0.0
        first = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)
        return (999 - round(first)) / 998

    def combine(self, uncond: Tensor, outs: list[tuple[Tensor, float]], scale: float, *, frac: float) -> Tensor:
        """The guided x̂0 (B, C, H, W) of the negative's ``uncond`` and the sub-prompts' ``(c_i, w_i)`` ``outs`` at
        ``scale``, its schedules at ``frac`` (:meth:`frac`): :func:`dynamic_threshold` of ``Δ = Σ_i w_i·(c_i − u)``
        (the weights as float32, as A1111 hands them over)."""
        mimic = scheduled_scale(self.mimic_scale, self.mimic_mode, minimum=self.mimic_scale_min, frac=frac,
                                value=self.sched_val)
        scale = scheduled_scale(float(scale), self.cfg_mode, minimum=self.cfg_scale_min, frac=frac,
                                value=self.sched_val)
        stacked = torch.stack([out for out, _ in outs], dim=1)  # (B, n, C, H, W)
        weights = torch.tensor([w for _, w in outs], dtype=torch.float32, device=uncond.device)
        delta = ((stacked - uncond.unsqueeze(1)) * weights.reshape(1, -1, 1, 1, 1)).sum(1)
        return dynamic_threshold(uncond, delta, scale=scale, mimic_scale=mimic,
                                 threshold_percentile=self.threshold_percentile,
                                 separate_feature_channels=self.separate_feature_channels,
                                 scaling_startpoint=self.scaling_startpoint,
                                 variability_measure=self.variability_measure, interpolate_phi=self.interpolate_phi)


def check_dynamic_thresholding_guidance(setting: DynamicThresholding | None, *, rescale: object = None,
                                        by_branch: bool = True) -> None:
    """Refuse ``setting`` beside a guidance ``rescale`` (each replaces the combination: A1111's
    ``combine_denoised``, Forge's / ComfyUI's CFG function) or on a combination of the model outputs
    (``by_branch`` false: diffusers' grid or solver). Nothing for ``None``.

    Raises:
        ValueError: either, saying what to do.
    """
    if setting is None:
        return
    if rescale is not None:
        raise ValueError("dynamic thresholding (CFG Scale Fix) and a guidance rescale each replace the guidance "
                         "combination (A1111's combine_denoised, Forge's / ComfyUI's CFG function), so no tool runs "
                         "both: leave one out")
    if not by_branch:
        raise ValueError("dynamic thresholding (CFG Scale Fix) combines each branch's x̂0, as A1111 and Forge do; "
                         "this sampler combines the model outputs (diffusers' grid or solver): take an A1111 σ "
                         "sampler (euler, dpmpp_2m...) with a schedule (schedule='automatic' is A1111's default)")


def check_dynamic_thresholding_run(sampler: str, *, schedule: str | None, edm: bool = False) -> None:
    """Refuse dynamic thresholding where the guidance does not combine x̂0 by branch at σ (module docstring).

    Raises:
        ValueError: diffusers' grid (no ``schedule``, for a sampler that has one) or solvers
            (:data:`COMBINES_OUTPUTS`), A1111's timestep samplers (DDIM
            with a schedule, PLMS, DDIM CFG++, its UniPC), LCM, or an EDM model — naming the sampler and what to
            take instead.
    """
    from .sampler_tables import canonical_sampler, runs_a1111_timesteps
    from .samplers import KDIFFUSION_ONLY

    name = canonical_sampler(sampler)
    if edm:
        raise ValueError("dynamic thresholding (CFG Scale Fix) runs on A1111's σ samplers, which an EDM model "
                         "(Playground v2.5, diffusers' EDM schedulers) has none of: leave it out")
    if runs_a1111_timesteps(name, schedule) or name == "lcm":
        raise ValueError(f"dynamic thresholding (CFG Scale Fix) combines each branch's x̂0 at the call's σ; {name} "
                         "here steps on timesteps (A1111's extension refuses DDIM and PLMS): take a σ sampler "
                         "(euler, dpmpp_2m...) with a schedule")
    if name in COMBINES_OUTPUTS or (schedule is None and name not in KDIFFUSION_ONLY):
        raise ValueError(f"dynamic thresholding (CFG Scale Fix) combines each branch's x̂0 as A1111 and Forge do; "
                         f"{name}{'' if name in COMBINES_OUTPUTS else ' without a schedule'} combines the model "
                         "outputs (diffusers' grid or solver): take an A1111 σ sampler (euler, dpmpp_2m...) with a "
                         "schedule (schedule='automatic' is A1111's default)")


#: the options in the order of the fields (:data:`DYNAMIC_THRESHOLDING_FIELDS`, the first their ``enabled``)
_OPTION_NAMES = ("enabled", "mimic_scale", "separate_feature_channels", "scaling_startpoint", "variability_measure",
                 "interpolate_phi", "threshold_percentile", "mimic_mode", "mimic_scale_min", "cfg_mode",
                 "cfg_scale_min", "sched_val")
_NUMBERS = ("mimic_scale", "interpolate_phi", "threshold_percentile", "mimic_scale_min", "cfg_scale_min", "sched_val")
_WORDS = ("scaling_startpoint", "variability_measure", "mimic_mode", "cfg_mode")
#: the schedules that read ``sched_val`` (the extension's ``MODES_WITH_VALUE``: "Scheduler value" written for them)
_MODES_WITH_VALUE = ("Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")


def dynamic_thresholding_fields(setting: DynamicThresholding) -> dict[str, object]:
    """The infotext fields of ``setting``, in the order the tool writes them: A1111's extension's
    (:data:`DYNAMIC_THRESHOLDING_FIELDS`; the percentile in %, the schedules' fields when a mode is not Constant,
    "Scheduler value" for a mode that reads it) for ``step_rule="calls"``, Forge's built-in's
    (:data:`DYNAMIC_THRESHOLDING_FORGE_FIELDS`, every one) for ``"timesteps"``."""
    values = (True, *(getattr(setting, name) for name in _OPTION_NAMES[1:]))  # (the fields' order)
    if setting.step_rule == "timesteps":
        fields = dict(zip(DYNAMIC_THRESHOLDING_FORGE_FIELDS, values))
        fields["dynthres_separate_feature_channels"] = "enable" if setting.separate_feature_channels else "disable"
        return {key: fields[key] for key in _FORGE_WRITTEN_ORDER}
    fields = dict(zip(DYNAMIC_THRESHOLDING_FIELDS[:7], values[:7]))
    fields["Threshold percentile"] = round(setting.threshold_percentile * 100.0, 6)  # (its panel's %)
    if setting.mimic_mode != "Constant":
        fields.update({"Mimic mode": setting.mimic_mode, "Mimic scale minimum": setting.mimic_scale_min})
    if setting.cfg_mode != "Constant":
        fields.update({"CFG mode": setting.cfg_mode, "CFG scale minimum": setting.cfg_scale_min})
    if setting.mimic_mode in _MODES_WITH_VALUE or setting.cfg_mode in _MODES_WITH_VALUE:
        fields["Scheduler value"] = setting.sched_val
    return fields


def dynamic_thresholding_from_fields(fields: dict[str, str]) -> tuple[DynamicThresholding | None, list[str]]:
    """``(setting, keys taken)`` of parsed infotext ``fields``: A1111's extension's (enabled: ``step_rule="calls"``,
    the percentile read from % as it reads it, ``× 0.01``, a missing scheduler value its panel's 4) or Forge's
    (``"timesteps"``); ``None`` when neither is enabled (fields written off are taken, as nothing to run).

    Raises:
        ValueError: a field whose value is not what the tool writes there, naming it.
    """
    def flag(text: object) -> bool:
        return str(text).strip().lower() == "true"

    a1111, forge = DYNAMIC_THRESHOLDING_FIELDS, DYNAMIC_THRESHOLDING_FORGE_FIELDS
    for keys, rule in ((a1111, "calls"), (forge, "timesteps")):
        present = [key for key in keys if key in fields]
        if keys[0] not in fields or not flag(fields[keys[0]]):
            if keys[0] in fields:  # (written off)
                return None, present
            continue
        text = {name: str(fields[key]).strip() for name, key in zip(_OPTION_NAMES, keys) if key in fields}
        try:
            options: dict[str, object] = {name: float(text[name]) for name in _NUMBERS if name in text}
        except ValueError:
            raise ValueError(f"infotext dynamic thresholding fields: {text} are not the numbers "
                             f"{'A1111' if rule == 'calls' else 'Forge'} writes there") from None
        options.update({name: text[name] for name in _WORDS if name in text})
        channels = text.get("separate_feature_channels")
        if channels is not None:
            options["separate_feature_channels"] = channels.lower() in ("true", "enable")
        if rule == "calls":
            options["threshold_percentile"] = float(options.get("threshold_percentile", 100.0)) * 0.01
            options.setdefault("sched_val", 4.0)
        return DynamicThresholding(**options, step_rule=rule), present[1:] + [keys[0]]
    return None, []


def parse_dynamic_thresholding(words: list[str] | tuple[str, ...]) -> DynamicThresholding:
    """``--dynamic-thresholding MIMIC [KEY=VALUE ...]``: the mimic scale, then any :class:`DynamicThresholding`
    option by its name (``threshold_percentile=0.95 cfg_mode="Linear Down" step_rule=timesteps``; booleans
    ``true`` / ``false``).

    Raises:
        ValueError: no mimic scale, a word that is not ``KEY=VALUE``, an unknown key or a value out of range.
    """
    if not words:
        raise ValueError("give the mimic scale first (e.g. 7), then any KEY=VALUE")
    try:
        options: dict[str, object] = {"mimic_scale": float(words[0])}
    except ValueError:
        raise ValueError(f"the first value is the mimic scale, a number; got {words[0]!r}") from None
    known = {f for f in DynamicThresholding.__dataclass_fields__ if f != "mimic_scale"}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{word!r} is not KEY=VALUE with a KEY among {', '.join(sorted(known))}")
        if key == "separate_feature_channels":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"separate_feature_channels is true or false, got {value!r}")
            options[key] = value.lower() == "true"
        elif key in _NUMBERS:
            try:
                options[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} is a number, got {value!r}") from None
        else:
            options[key] = value
    return DynamicThresholding(**options)
