"""Shared pieces of the tests of the guidance terms added to classifier-free guidance (PAG, SAG): one guided call's
inputs on a loaded system, the sampler paths' keywords, and the check that a prompt plan's guidance is the plain guidance
with the term."""

from __future__ import annotations

import pytest
import torch


def branch_inputs(system, prompt: str = "a photo", negative: str = "blurry", *, seed: int, t: int):
    """``(model, cond, uncond, x, t)`` of one guided call on ``system``: its denoiser, the prompt's and the negative's
    conditionings, seeded latents (1, 4, 8, 8) and the timestep (1,)."""
    model = system.denoiser()
    cond = system.condition(system.tokenize([prompt]))
    uncond = system.condition(system.tokenize([negative]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model, cond, uncond, x, torch.tensor([t])


def diffusers_scheduler(sampler: str, prediction_type: str):
    """The diffusers scheduler sdadapt's ``sampler`` (``ddim`` / ``dpmsolver++``) mimics on diffusers' grid, SD's
    betas: what the pipelines compared against are built with."""
    import diffusers

    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": prediction_type}
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return diffusers.DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++", steps_offset=1)


def check_plan_is_plain_guidance(system, **term) -> None:
    """A plain prompt's plan (:meth:`~sdadapt.prompt_guidance.PromptPlan.guidance`) with the guidance ``term``
    (``perturbed_attention=`` / ``self_attention_guidance=``) equals :func:`~sdadapt.training.diffusion.guided` with it,
    on the outputs and by branch, at guidance 5 and 1 (no negative pass), and the term changes the result; a plan
    with ``AND`` is refused."""
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.training.diffusion import guided

    model, cond, uncond, x, t = branch_inputs(system, "a cat", "", seed=7, t=700)

    def read(out):
        return x * 1.25 - 0.75 * out

    for scale in (5.0, 1.0):
        scheduled = plan_prompt("a cat", "", steps=4).guidance(model, [cond], [uncond], scale, **term)
        plain = guided(model, cond, uncond, scale, **term)
        assert torch.allclose(scheduled(x, t), plain(x, t), atol=1e-6)
        assert torch.allclose(scheduled.denoised_by_branch(read, x, t, sigma=0.75),
                              plain.denoised_by_branch(read, x, t, sigma=0.75), atol=1e-6)
        assert not torch.allclose(plain(x, t), guided(model, cond, uncond, scale)(x, t), atol=1e-3)
    with pytest.raises(ValueError, match="guidance degrades one branch of each call; this prompt has 2 AND"):
        plan_prompt("a cat AND a dog", "", steps=4).guidance(model, [cond, cond], [uncond], 5.0, **term)


def path_options(options: dict) -> dict:
    """``sample_latents`` keywords of a guidance path named by ``options`` (``schedule``; ``img2img`` / ``inpaint``:
    an :class:`~sdadapt.img2img.Img2ImgStart` at index 1 from seeded init latents (1, 4, 8, 8), the mask a centred
    square; ``uncond_skip``: Skip Early CFG 0.4)."""
    from sdadapt.img2img import Img2ImgStart
    from sdadapt.uncond_skip import UncondSkip

    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    kwargs = {"schedule": options.get("schedule")}
    if options.get("img2img"):
        kwargs["start"] = Img2ImgStart(init, index=1)  # (A1111's rule on its grid: a start index)
    if options.get("inpaint"):
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 2:6, 2:6] = 1
        kwargs["start"] = Img2ImgStart(init, index=1, mask=mask)
    if options.get("uncond_skip"):
        kwargs["uncond_skip"] = UncondSkip(skip_early=0.4)
    return kwargs
