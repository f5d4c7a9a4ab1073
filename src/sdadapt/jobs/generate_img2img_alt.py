"""``generate --init-image IMG --img2img-alt``: A1111's "img2img alternative test" inside
:func:`~sdadapt.jobs.generate.run_generate` — the image's Euler-inverted noise (:mod:`sdadapt.inversion.euler_noise`)
as the start noise of each img2img run (the script's ``sample_extra``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..inversion.euler_noise import Img2ImgAlternative

__all__ = ["Img2ImgAltRun", "check_img2img_alt_model", "check_img2img_alt_request"]

#: run_generate's keyword -> (its value when not set, the option): what the script cannot run with here
_REFUSED = {"mask": (None, "--mask"), "hires_scale": (None, "--hires-scale"), "hires_width": (None, "--hires-width"),
            "hires_height": (None, "--hires-height"), "refiner": (None, "--refiner"),
            "sd_upscale": (None, "--sd-upscale"), "loopback": (None, "--loopback"), "outpaint": (None, "--outpaint"),
            "noise_multiplier": (1.0, "--noise-multiplier"),
            "downcast_alphas_cumprod": (False, "--downcast-alphas-cumprod")}


def check_img2img_alt_request(given: dict[str, object]) -> None:
    """Refuse ``run_generate`` arguments ``given`` the img2img alternative test does not run with: no single
    ``init_image``; a mask, a hires pass, the refiner, another script; "Noise multiplier" (the script's ``sample``
    replaces the one that applies it); a downcast ᾱ.

    Raises:
        ValueError: naming the option and the fix.
    """
    init_image = given.get("init_image")
    if init_image is None or Path(str(init_image)).is_dir():
        raise ValueError("--img2img-alt is A1111's img2img script ('img2img alternative test'): give one --init-image, "
                         "the image whose noise it finds")
    from .generate_runs import first_set

    option = first_set(given, _REFUSED)
    if option is not None:
        raise ValueError(f"--img2img-alt: not with {option} (A1111's script replaces the img2img sampling itself; "
                         f"sdadapt runs it on plain img2img): leave {option} out")


def check_img2img_alt_model(system, model: str | os.PathLike) -> None:
    """Refuse a model the inversion cannot call as A1111's script does: the toy model (no A1111 prompts), an EDM
    model (its σ are not from ᾱ), a UNet taking image conditioning (inpainting, InstructPix2Pix, SD 2.1 unCLIP).

    Raises:
        ValueError: naming ``model`` and why.
    """
    if not hasattr(system, "prompt_condition") or not hasattr(system, "alphas_cumprod"):
        raise ValueError(f"--img2img-alt: {model} has no A1111 prompt conditioning (the toy model); give a Stable "
                         "Diffusion model")
    if getattr(system, "edm", None) is not None:
        raise ValueError(f"--img2img-alt: {model} is an EDM model (Playground v2.5, CosXL), whose σ do not come from ᾱ; the "
                         "script inverts on A1111's discrete σ grid")
    unet_config = system.unet.config
    if (int(unet_config.in_channels) != int(system.vae.config.latent_channels)
            or getattr(unet_config, "class_embed_type", None) == "projection"):
        raise ValueError(f"--img2img-alt: {model}'s UNet takes image conditioning (an inpainting, InstructPix2Pix or "
                         "unCLIP model); the inversion here calls a plain text-to-image UNet")
    prediction = getattr(system, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"--img2img-alt: {model} predicts {prediction}; the script reads ε or v models")


class Img2ImgAltRun:
    """The script over one ``generate`` run: :meth:`start_options` gives each image's start-noise options, the
    inverted noise found once per init latents (A1111's ``Cached``: the same image, settings and prompts).

    Args:
        system: the loaded model (:func:`check_img2img_alt_model`).
        settings: the script's :class:`~sdadapt.inversion.euler_noise.Img2ImgAlternative`.
        texts: the decode prompt and negative as the model reads them (embedding names expanded).
        log: where the inversion is said.
    """

    def __init__(self, system, settings: Img2ImgAlternative, *, texts: tuple[str, str],
                 log: Callable[[str], None] | None = None) -> None:
        from ..samplers.sigma_space import model_sigmas

        self.system, self.settings, self.texts = system, settings, texts
        self.say = log if log is not None else (lambda _line: None)
        self.table = model_sigmas(system.alphas_cumprod, torch.float32, device="cpu")  # (A1111's float32 σ)
        self._cache: tuple[Tensor, Tensor] | None = None  # (init latents, their inverted noise)

    def inverted(self, init_latents: Tensor) -> Tensor:
        """The unit noise (B, C, h, w) of ``init_latents`` (:func:`~sdadapt.inversion.euler_noise.
        euler_noise_inversion`), found once per init latents."""
        from ..inversion.euler_noise import euler_noise_inversion

        if self._cache is not None and self._cache[0] is init_latents:
            return self._cache[1]
        system, settings = self.system, self.settings
        count = int(init_latents.shape[0])
        cond = system.prompt_condition(self.texts[0])
        uncond = system.prompt_condition(self.texts[1])
        cond, uncond = _repeat(cond, count), _repeat(uncond, count)
        dtype = next(system.unet.parameters()).dtype
        noise = euler_noise_inversion(system.denoiser(), init_latents.to(system.alphas_cumprod.device), cond, uncond,
                                      guidance=settings.decode_guidance, steps=settings.decode_steps,
                                      train_sigmas=self.table.to(system.alphas_cumprod.device),
                                      prediction_type=getattr(system, "prediction_type", "epsilon"),
                                      sigma_adjustment=settings.sigma_adjustment, dtype=dtype).cpu()
        self.say(f"img2img alternative test: noise found in {settings.decode_steps} Euler steps at CFG "
                 f"{settings.decode_guidance:g}{', sigma adjustment' if settings.sigma_adjustment else ''}")
        self._cache = (init_latents, noise)
        return noise

    def start_options(self, init_latents: Tensor, options: dict[str, object]) -> dict[str, object]:
        """The ``generate`` options that set one image's start noise (its ``options``: ``seed``, and ``noise`` with
        A1111's noise, or a ``generator``): the inverted noise blended with the seed's start noise by the
        randomness, less ``init/σ_max`` (:func:`~sdadapt.inversion.euler_noise.img2img_alt_noise`) — ``noise`` (a
        :class:`~sdadapt.inversion.euler_noise.GivenStartSeeds`) with A1111's noise, else ``start_noise`` and the
        ``generator`` that drew the seed's start noise (the sampler noise comes after it)."""
        from ..inversion.euler_noise import (
            GivenStartSeeds,
            blend_noise,
            img2img_alt_noise,
            sigma_max_of,
        )

        inverted = self.inverted(init_latents)
        shape = tuple(inverted.shape)
        seeds, generator = options.get("noise"), None
        if seeds is not None:  # (A1111's create_random_tensors: a fresh ImageRNG's first draw)
            random = seeds.for_batch(int(options["seed"]), shape[0]).start_noise(shape)
        else:
            generator = options.get("generator") or torch.Generator().manual_seed(int(options["seed"]))
            random = torch.randn(shape, generator=generator)
        start = img2img_alt_noise(blend_noise(inverted, random, self.settings.randomness), init_latents.cpu().float(),
                                  sigma_max_of(self.table))
        if seeds is not None:
            return {"noise": GivenStartSeeds(seeds, start)}
        return {"start_noise": start, "generator": generator}


def _repeat(cond: object, count: int) -> object:
    """A batch-1 condition (a tensor, or SDXL's dict) repeated to ``count`` rows."""
    if count == 1:
        return cond
    if isinstance(cond, dict):
        return {key: value.expand(count, *value.shape[1:]) for key, value in cond.items()}
    return cond.expand(count, *cond.shape[1:])
