"""``generate --hires-checkpoint MODEL``: A1111's "Hires checkpoint" (``hr_checkpoint_name``) — the hires pass run by
another model, loaded after the first pass (A1111's ``sample``: the first pass decoded, then
``reload_model_weights(info=self.hr_checkpoint_info)``, then ``sample_hr_pass``; every batch starts on the first
model again, ``process_images_inner``'s ``reload_model_weights()``). Here both models are held for the run;
:func:`~sdadapt.jobs.generate_hires.sample_image` takes the hires model as ``hires_system``."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["check_hires_checkpoint_request", "check_hires_pair"]

#: run_generate's keyword -> (its value when not set, the option): what patches or personalises one model only
_REFUSED = {"refiner": (None, "--refiner"), "custom_diffusions": ((), "--custom-diffusion"),
            "aesthetic": (None, "--aesthetic"), "hypertile_unet": (False, "--hypertile-unet"),
            "hypertile_vae": (False, "--hypertile-vae"), "hypertile_unet_second_pass": (False, "--hypertile-unet-hr"),
            "token_merging_ratio": (0.0, "--token-merging-ratio"),
            "token_merging_ratio_hr": (0.0, "--token-merging-ratio-hr"), "freeu": (None, "--freeu"),
            "pag_scale": (0.0, "--pag-scale"), "sag_scale": (0.0, "--sag-scale")}


def check_hires_checkpoint_request(given: Mapping[str, object], *, hires: bool, stepped_tag: str | None = None) -> None:
    """Refuse a hires checkpoint without a hires pass (``hires``) or beside an option that patches or personalises one
    model only (``given``: those of ``run_generate``'s arguments; ``stepped_tag``: a prompt LoRA tag with a step
    range, whose switches hook the first model).

    Raises:
        ValueError: naming the option and the fix.
    """
    if not hires:
        raise ValueError("--hires-checkpoint is A1111's model for the hires pass: add --hires-scale or "
                         "--hires-width/--hires-height, or leave it out")
    from .generate_runs import first_set

    option = first_set(given, _REFUSED)
    if option is not None:
        raise ValueError(f"--hires-checkpoint: not with {option}, which is set on the first model only here; "
                         "leave one of them out")
    if stepped_tag is not None:
        raise ValueError(f"--hires-checkpoint: prompt tag {stepped_tag}'s start= / stop= / step= switch the first "
                         "model's UNet per model call, not the hires model's; leave the range out")


def check_hires_pair(system, hires_system, *, upscaler: object, hires_model: str | os.PathLike) -> None:
    """Refuse a hires model that cannot take the first pass: one without a hires pass of its own (the toy model), or
    — with a latent upscaler, whose latents go over undecoded — another latent space (latent channels, VAE scaling
    factor, VAE factor).

    Raises:
        ValueError: naming ``hires_model`` and the fix.
    """
    import inspect

    from ..img2img import LATENT_UPSCALERS

    if not hasattr(hires_system, "encode_images") or "height" not in inspect.signature(hires_system.sample).parameters:
        raise ValueError(f"--hires-checkpoint {hires_model}: it makes images of one size only (the toy model); give "
                         "a Stable Diffusion model")

    def space(held) -> tuple:
        return (int(held.vae.config.latent_channels), float(held.scaling_factor), int(getattr(held, "vae_factor", 8)))

    if isinstance(upscaler, str) and upscaler in LATENT_UPSCALERS and space(system) != space(hires_system):
        raise ValueError(f"--hires-checkpoint {hires_model}: its latent space (channels, VAE scaling factor, VAE "
                         f"factor) {space(hires_system)} is not the first model's {space(system)}, and a latent "
                         "upscaler hands the latents over undecoded (A1111 would sample noise): use --hires-upscaler "
                         "pixel-lanczos (or an ESRGAN model), which decodes and encodes again")

