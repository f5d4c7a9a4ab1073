"""``generate``'s per-model-call hooks as one ``before_model_call``: the LoRA step ranges
(:class:`.generate_lbw_steps.StepSwitchedLoRAs`) and Forge's FreeU window (:class:`sdadapt.freeu.FreeUSteps`), each
told the pass's steps (``launch``), the hires pass's sampler (``next_pass``) and the image's end (``release``)."""

from __future__ import annotations

__all__ = ["ModelCallHooks", "model_call_hooks"]


class ModelCallHooks:
    """``hooks`` called in order before each model call (``(steps_done, calls)``, as
    :func:`sdadapt.samplers.sample_latents` announces them); ``launch`` / ``next_pass`` / ``release`` passed to
    those that have them."""

    def __init__(self, *hooks: object) -> None:
        self.hooks = hooks

    def __call__(self, steps_done: int, calls: int) -> None:
        for hook in self.hooks:
            hook(steps_done, calls)

    def _each(self, name: str, *args: object, **kwargs: object) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(*args, **kwargs)

    def launch(self, sampling_steps: int) -> None:
        self._each("launch", sampling_steps)

    def next_pass(self, *, sampler: str | None = None) -> None:
        self._each("next_pass", sampler=sampler)

    def release(self) -> None:
        self._each("release")


def model_call_hooks(*hooks: object | None) -> object | None:
    """The given hooks (``None``s left out) as one: ``None`` for none, the hook itself for one, else a
    :class:`ModelCallHooks`."""
    given = [hook for hook in hooks if hook is not None]
    if len(given) < 2:
        return given[0] if given else None
    return ModelCallHooks(*given)
