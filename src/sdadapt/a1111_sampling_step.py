"""A1111's ``state.sampling_step`` as a model call sees it: what the scripts that switch something per model call read
(A1111's ``on_cfg_denoiser`` callbacks: ``params.sampling_step``) — the LoRA Block Weight extension's step ranges
(:mod:`sdadapt.jobs.generate_lbw_steps`), Forge's FreeU window (:class:`sdadapt.freeu.FreeUSteps`).

``state.sampling_step`` is 0 when the sampler starts (``launch_sampling``), then ``i`` from the k-diffusion callback
of step ``i``, which comes right after that step's first model call (``KDiffusionSampler.callback_state``): a model
call of step ``i`` sees ``i`` if it is not the step's first call (Heun, DPM2, DPM++ 2S a, DPM++ SDE's second call),
else ``max(i − 1, 0)``. sdadapt's samplers announce each model call to ``before_model_call(steps_done, calls)``
(:func:`sdadapt.samplers.sample_latents`), from which :func:`a1111_sampling_step` reads it.
"""

from __future__ import annotations

__all__ = ["END_REPORTING_SAMPLERS", "LATE_REPORTING_SAMPLERS", "a1111_sampling_step"]

#: samplers whose callback comes after every model call of a step: k-diffusion's DPM adaptive reports each try
#: (accepted or rejected) after its ``order`` calls, so all of a try's calls see ``max(tries done − 1, 0)``
END_REPORTING_SAMPLERS = frozenset({"dpm_adaptive"})
#: samplers whose A1111 counterpart reports a step one model call later than k-diffusion's: A1111's UniPC makes a model
#: call before its first step and calls back after each step's corrector call (the next grid point's model call)
LATE_REPORTING_SAMPLERS = frozenset({"unipc"})


def a1111_sampling_step(steps_done: int, calls: int, *, sampler: str | None = None) -> int:
    """A1111's ``state.sampling_step`` at a model call: ``steps_done`` steps finished before it, ``calls`` model
    calls already made in this step (0: the step's first call, before the k-diffusion callback of the step).
    ``sampler`` (canonical name) in :data:`LATE_REPORTING_SAMPLERS`: ``max(steps_done − 2, 0)`` (A1111's UniPC,
    module docstring); in :data:`END_REPORTING_SAMPLERS` (``steps_done``: the tries done): ``max(steps_done − 1, 0)``
    at every call of the try."""
    if sampler in END_REPORTING_SAMPLERS:
        return max(steps_done - 1, 0)
    if calls > 0:
        return steps_done
    return max(steps_done - (2 if sampler in LATE_REPORTING_SAMPLERS else 1), 0)
