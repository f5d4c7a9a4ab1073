"""``generate``'s img2img (``--init-image``) and hires fix (``--hires-scale`` ...): A1111's
``StableDiffusionProcessingImg2Img`` and the txt2img hires pass, on :func:`sdadapt.sampling.generate`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .generate_refiner import check_refiner_hires_pass

__all__ = ["NO_STEP_REFUSED", "HiresRequest", "check_hires_request", "check_img2img_pass", "crop_hires_latents",
           "hires_image_conditioning", "hires_pass_size", "hires_size", "hires_upscale_size", "init_latents_from_image",
           "lanczos_upscale_pixels", "networks_switched", "sample_image", "seeded_encoding"]

#: the samplers whose img2img cannot run at A1111's ``t_enc = 0`` (no step): k-diffusion's DPMSolver takes the
#: ``σ_min = σ_max`` A1111 hands it as reverse sampling and refuses it with ``eta > 0``, which generate runs them with
#: (:func:`sdadapt.samplers.dpm_fast_adaptive.dpm_fast_sample`)
NO_STEP_REFUSED: tuple[str, ...] = ("dpm_fast", "dpm_adaptive")


@dataclass(frozen=True)
class HiresRequest:
    """The hires pass: its image ``size`` (height, width), ``steps`` (0: the first pass's), ``denoising``
    strength and ``upscaler`` (:data:`sdadapt.img2img.HIRES_UPSCALERS`, or an ESRGAN model's
    :class:`sdadapt.esrgan.EsrganUpscaler`: a pixel upscaler); ``upscale_to (height, width): what the
    first pass is enlarged to before A1111's crop to ``size`` (``hr_upscale_to_y/x``, :func:`hires_upscale_size`;
    ``None``: ``size``, no crop); A1111's ``hr_prompt`` /
    ``hr_negative_prompt`` (``prompt``, ``negative``: the second pass's conditioning; ``None``: the first pass's)
    and ``hr_sampler_name`` (``sampler``; ``None``: the first pass's) with its resolved grid (``schedule``, as
    :func:`sdadapt.samplers.resolve_schedule` gives it for that sampler; used with ``sampler``); Forge's "Hires CFG
    Scale" (``guidance``: the second pass's guidance scale; ``None``: the first pass's)."""

    size: tuple[int, int]
    steps: int = 0
    denoising: float = 0.7
    upscaler: object = "latent"
    prompt: str | None = None
    negative: str | None = None
    sampler: str | None = None
    schedule: str | None = None
    upscale_to: tuple[int, int] | None = None
    guidance: float | None = None


def hires_size(height: int, width: int, *, scale: float | None, hires_height: int | None,
               hires_width: int | None) -> tuple[int, int]:
    """A1111's hires target ``(height, width)``, the size of the image written: ``hr_resize_x/y`` when given (one
    of them: the other kept in proportion, A1111's rule; both: exactly them, reached by enlarging to
    :func:`hires_upscale_size` and cropping), else ``int(size · scale)``."""
    if hires_height is None and hires_width is None:
        return int(height * float(scale if scale is not None else 2.0)), int(width * float(scale if scale is not None else 2.0))
    if hires_height is None:
        return hires_width * height // width, int(hires_width)
    if hires_width is None:
        return int(hires_height), hires_height * width // height
    return int(hires_height), int(hires_width)


def hires_upscale_size(height: int, width: int, *, scale: float | None, hires_height: int | None,
                       hires_width: int | None) -> tuple[int, int]:
    """What A1111 enlarges the first pass (``height`` x ``width``) to, ``(hr_upscale_to_y, hr_upscale_to_x)``
    (``calculate_target_resolution``, ``modules/processing.py`` at 0027ce1f6e58): with both ``hires_width`` and
    ``hires_height`` the smallest size in the first pass's proportions that covers them — ``width / height <
    hires_width / hires_height`` (floats, as A1111 compares them): ``(hires_width · height // width,
    hires_width)``, else ``(hires_height, hires_height · width // height)`` — later cropped to them
    (:func:`crop_hires_latents`); otherwise :func:`hires_size` (nothing to crop)."""
    if hires_height is None or hires_width is None:
        return hires_size(height, width, scale=scale, hires_height=hires_height, hires_width=hires_width)
    if width / height < hires_width / hires_height:
        return int(hires_width) * height // width, int(hires_width)
    return int(hires_height), int(hires_height) * width // height


def crop_hires_latents(latents: Tensor, *, upscale_to: tuple[int, int], size: tuple[int, int],
                       factor: int = 8) -> Tensor:
    """A1111's crop of the enlarged first pass (``sample_hr_pass``; ``truncate_x/y`` of
    ``calculate_target_resolution``): ``latents`` (B, C, h, w) of an image enlarged to ``upscale_to`` =
    (H', W') pixels -> (B, C, h − t_y, w − t_x) with ``t = (H' − H) // factor`` latent rows (columns) for
    ``size`` = (H, W), ``t // 2`` of them cut off the top (left) and ``(t + 1) // 2`` off the bottom (right). For
    sizes that are multiples of ``factor`` the result is (H / factor, W / factor)."""
    t_y = (int(upscale_to[0]) - int(size[0])) // factor
    t_x = (int(upscale_to[1]) - int(size[1])) // factor
    h, w = latents.shape[-2:]
    return latents[..., t_y // 2:h - (t_y + 1) // 2, t_x // 2:w - (t_x + 1) // 2]


def hires_pass_size(request: HiresRequest, *, factor: int = 8) -> tuple[int, int]:
    """The size ``(H, W)`` the hires pass samples at and writes: A1111's (``sample_hr_pass``) — the first pass
    enlarged to ``upscale_to`` (its latent upscalers interpolate to ``upscale_to // factor`` latents; its pixel
    path's VAE encoder floors ``upscale_to / factor``), ``(upscale_to − size) // factor`` latent rows (columns)
    cropped (``truncate_y/x``), times ``factor``. ``request.size`` itself for multiples of ``factor``; a side
    that is none comes out rounded down (A1111's 512 x 760 at ``--hires-scale 1.5``: 768 x 1140 asked, 768 x 1136
    written)."""
    up = request.upscale_to or request.size
    height, width = ((u // factor - (u - s) // factor) * factor for u, s in zip(up, request.size))
    return height, width


def check_hires_request(request: HiresRequest, *, multiple: int = 8) -> HiresRequest:
    """``request`` if it can run.

    Raises:
        ValueError: an unknown upscaler, steps < 0, a strength outside (0, 1] or a side below ``multiple``
            (each naming its ``--hires-*`` option). A side that is no multiple of ``multiple`` runs as A1111
            runs it (:func:`hires_pass_size`).
    """
    from ..img2img import HIRES_UPSCALERS

    if isinstance(request.upscaler, str) and request.upscaler not in HIRES_UPSCALERS:  # (else an ESRGAN upscaler)
        raise ValueError(f"--hires-upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {request.upscaler!r}")
    if request.steps < 0:
        raise ValueError(f"--hires-steps must be >= 0 (0: the first pass's steps), got {request.steps}")
    if not 0.0 < request.denoising <= 1.0:
        raise ValueError(f"--hires-denoising must be in (0, 1], got {request.denoising}")
    if request.sampler is not None:
        from ..img2img import check_img2img_sampler
        from ..samplers import canonical_sampler

        try:
            check_img2img_sampler(canonical_sampler(request.sampler))
        except ValueError as exc:
            raise ValueError(f"--hires-sampler: {exc}") from None
    h, w = request.size
    if h < multiple or w < multiple:
        raise ValueError(f"the hires size {w}x{h} must be at least {multiple} in both sides; change --hires-scale, "
                         "or give --hires-width/--hires-height")
    if request.upscale_to is not None and (request.upscale_to[0] < h or request.upscale_to[1] < w):
        up_h, up_w = request.upscale_to
        raise ValueError(f"the hires pass would enlarge to {up_w}x{up_h} and crop to {w}x{h}, which it does not "
                         "cover; build the request with hires_upscale_size (A1111's cover-then-crop size)")
    return request


#: A1111's default "UniPC order" (the fewest steps its UniPC runs: :mod:`sdadapt.samplers.unipc_a1111`)
UNIPC_ORDER = 3


def check_img2img_pass(sampler: str, *, steps: int, strength: float, fixed_steps: int | None = None,
                       sampler_option: str = "--sampler", strength_option: str = "--denoising-strength",
                       steps_option: str = "--steps") -> None:
    """Refuse, from the options alone (before the model loads), an img2img pass that the sampler would refuse:
    A1111's step rule (:func:`sdadapt.img2img.a1111_img2img_steps`) gives ``(total, t_enc)`` for ``steps`` and
    ``strength`` — with ``fixed_steps`` (A1111's ``steps=``: ``--img2img-fix-steps``' ``--steps``, the hires pass's
    ``hr_second_pass_steps or steps``) a grid of ``int(fixed_steps / min(strength, 0.999))`` of which
    ``fixed_steps`` run (``t_enc = fixed_steps − 1``), else ``steps`` of which ``int(min(strength, 0.999) · steps)
    + 1`` run. ``sampler``: the pass's canonical name; the ``*_option`` names say which options to change.

    Raises:
        ValueError: ``fixed_steps`` with strength 0 (no grid, for every sampler); a sampler of
            :data:`NO_STEP_REFUSED` at ``t_enc = 0`` (a strength below ``1 / steps``, ``steps`` 1, or one fixed
            step), naming the strength or steps that run one; A1111's UniPC with fewer steps than its order.
    """
    from ..img2img import a1111_img2img_steps

    total, t_enc = a1111_img2img_steps(steps, strength, requested=fixed_steps)
    if total < 1:
        raise ValueError(f"{strength_option} 0 with a fixed step count ({steps_option} {fixed_steps} run exactly) "
                         f"leaves no grid to run them on (A1111's steps / strength): raise {strength_option}")
    if sampler == "unipc_a1111" and t_enc < UNIPC_ORDER:  # (its steps: timesteps[:t_enc])
        raise ValueError(f"{sampler_option} UniPC: img2img at {strength_option} {strength:g} and {steps_option} "
                         f"{fixed_steps or steps} runs {t_enc} steps, and A1111's UniPC needs at least its order, "
                         f"{UNIPC_ORDER} ('UniPC order must be < sampling steps'): raise {strength_option} or "
                         f"{steps_option}, or choose another sampler")
    if sampler not in NO_STEP_REFUSED or t_enc > 0:
        return
    if fixed_steps is not None:
        cause = f"{steps_option} {fixed_steps} run exactly (t_enc = steps - 1)"
        fix = f"use {steps_option} 2 or more"
    elif steps == 1:
        cause = f"{steps_option} 1 (t_enc = int(strength x 1), 0 at any strength)"
        fix = f"use {steps_option} 2 or more"
    else:
        least = math.ceil(10_000 / steps) / 10_000  # (>= 1/steps: int(least * steps) >= 1)
        cause = (f"{strength_option} {strength:g} and {steps_option} {steps} (t_enc = int(strength x steps): a "
                 f"strength below 1/{steps})")
        fix = f"use {strength_option} {least:g} or more, or more {steps_option}"
    raise ValueError(f"{sampler_option} {sampler}: img2img with {cause} starts at A1111's t_enc = 0, where "
                     "k-diffusion's DPM-Solver is handed sigma_min = sigma_max and refuses it with eta > 0 (A1111's "
                     f"default; 'eta must be 0 for reverse sampling'): {fix}, or choose another sampler")


def init_latents_from_image(system, path: str | os.PathLike, *, height: int, width: int,
                            resize_mode: str = "just", generator: torch.Generator | None = None) -> Tensor:
    """``--init-image``: the image at ``path`` flattened on white and brought to ``width`` x ``height`` by A1111's
    ``resize_mode`` (``just`` stretches, ``crop`` cuts the centre, ``fill`` pads with the edges; Lanczos), as
    A1111's img2img does it on 8-bit PIL images (:func:`sdadapt.resize_modes.init_image_pixels`: the pixels bit for
    bit; without Pillow within ~3 levels), and encoded (``system.encode_images``: the VAE posterior mean × scaling
    factor; ``generator``: a posterior sample drawn from it, :func:`seeded_encoding`) -> (1, C, height/8, width/8).
    ``latent`` (A1111's "Just resize (latent upscale)"): encoded at its own size, the latents resized
    (:func:`sdadapt.resize_modes.latent_resize`).

    Raises:
        FileNotFoundError: no such image.
        ValueError: an unknown resize mode, an unreadable image, a mode that scales a side to 0 pixels.
    """
    from ..resize_modes import IMG2IMG_RESIZE_MODES, init_image_pixels

    if resize_mode not in IMG2IMG_RESIZE_MODES:
        raise ValueError(f"--resize-mode must be one of {', '.join(IMG2IMG_RESIZE_MODES)}, got {resize_mode!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--init-image {file}: no such image file")
    image = init_image_pixels(file, (height, width), mode=resize_mode)
    device = system.alphas_cumprod.device
    with torch.no_grad():
        if generator is None:  # (the mean: encode_images as ever)
            latents = system.encode_images(image[None].to(device)).float()
        else:
            latents = system.encode_images(image[None].to(device), generator=generator).float()
    return sized_init_latents(system, latents, height=height, width=width, resize_mode=resize_mode)


def sized_init_latents(system, latents: Tensor, *, height: int, width: int, resize_mode: str) -> Tensor:
    """An init image's latents (1, C, h, w) at the size being generated: ``resize_mode`` ``latent`` (A1111's "Just
    resize (latent upscale)", the image encoded at its own size) resized to ``system.latent_shape(height, width)``
    (:func:`sdadapt.resize_modes.latent_resize`); any other mode: as they are (the pixels were resized)."""
    from ..resize_modes import LATENT_RESIZE, latent_resize

    if resize_mode != LATENT_RESIZE:
        return latents
    return latent_resize(latents, tuple(system.latent_shape(height, width)[-2:]))


def seeded_encoding(system, encode: Callable[[torch.Generator], Tensor], *, seed: int, a1111_noise: bool,
                    latent_shape: tuple[int, ...]) -> tuple[Tensor, torch.Generator | None]:
    """``--vae-encode sample`` for the image of ``seed``: ``encode(generator)`` (an init image encoded by a VAE
    posterior sample drawn from ``generator``, e.g. ``lambda g: system.encode_images(pixels, generator=g)``) with
    the generator :func:`sdadapt.img2img.init_generator` gives (``a1111_noise``: A1111's noise, ``latent_shape`` the
    (1, C, h, w) the sample is drawn at) -> ``(latents float32, generator)``: the generator to hand
    :func:`sdadapt.sampling.generate` (``generator=``; the start noise drawn after the posterior sample, diffusers'
    order), ``None`` with A1111's noise (which draws its own start noise).

    Raises:
        ValueError: a system whose ``encode_images`` draws no posterior sample (no ``generator=``; the toy's).
    """
    import inspect

    from ..img2img import init_generator

    if "generator" not in inspect.signature(system.encode_images).parameters:
        raise ValueError(f"--vae-encode sample: {type(system).__name__}.encode_images has no VAE posterior to draw "
                         "from (no generator=); use --vae-encode mean")
    g = init_generator(seed, a1111_noise=a1111_noise, shape=latent_shape)
    with torch.no_grad():
        latents = encode(g).float()
    return latents, None if a1111_noise else g


def _pixel_upscaler(image, width: int, height: int, upscaler: object = "Lanczos"):
    """A1111's ``images.resize_image(0, image, width, height, upscaler_name=...)`` on a PIL image, each resize PIL's
    own Lanczos (:func:`sdadapt.inpaint_crop.resize_image`, mode ``just``): with ``scale = max(width / w, height /
    h)`` above 1, the upscaler's ``upscale`` (``modules/upscaler.py``, :func:`sdadapt.sd_upscale.upscale_image`)
    first — ``dest = int((w · scale) // 8 · 8)`` per side; unless the image already covers ``dest`` one
    ``do_upscale`` (Lanczos: to ``(int(w · scale), int(h · scale))``, its loop stopping there; an ESRGAN model: its
    own scale, again until it covers ``dest``), then a resize to ``dest`` where that differs — and last a resize to
    ``width`` x ``height`` where the image still differs. A proportional hires size that the float product hits
    exactly is one Lanczos resize; a stretched one (``--hires-width`` and ``--hires-height`` out of proportion) or
    one the product misses by a rounding is two or three, as in A1111."""
    from ..inpaint_crop import resize_image
    from ..sd_upscale import upscale_image

    scale = max(width / image.width, height / image.height)
    if scale > 1.0 and upscaler != "None":  # ("None": one Lanczos resize to the size, A1111's resize_image)
        image = upscale_image(image, scale, upscaler=upscaler)
    if (image.width, image.height) != (width, height):
        image = resize_image(image, width, height)
    return image


def lanczos_upscale_pixels(decoded: Tensor, size: tuple[int, int], *, upscaler: object = "Lanczos") -> Tensor:
    """The hires pass's ``pixel-lanczos`` input: the first pass's decoded images ``decoded`` (B, 3, h, w) in
    [-1, 1] brought to ``size`` = (H, W) -> (B, 3, H, W) float32 in [-1, 1] on the CPU — the pixels A1111's
    ``sample_hr_pass`` encodes for a non-latent upscaler (``modules/processing.py``, read at commit 0027ce1f6e58),
    bit for bit: ``torch.clamp((x + 1) / 2, 0, 1)`` in float32, ``255. · x`` made ``uint8`` by truncation (not
    rounding), a PIL image resized by the "Lanczos" upscaler — or ``upscaler``, an ESRGAN model's
    (:class:`sdadapt.esrgan.EsrganUpscaler`) — (:func:`_pixel_upscaler`), then ``np.array(image).astype(np.float32)
    / 255.0`` and ``· 2 − 1`` (:func:`sdadapt.resize_modes.pil_pixels`).

    Without Pillow (an optional dependency): one float Lanczos resize of each image
    (:func:`sdadapt.resampling.resample`, PIL's filter and A1111's Pillow 9.5 pass order, no 8-bit steps) — within
    a few levels of 8 bits of A1111's pixels instead of equal to them.
    """
    height, width = (int(v) for v in size)
    images = decoded.detach().float().cpu()
    try:
        import PIL.Image  # noqa: F401  (optional)
    except ImportError:
        if upscaler != "Lanczos":
            raise ImportError("--hires-upscaler: A1111's Nearest / None and ESRGAN models run on 8-bit Pillow "
                              "images: pip install 'sdadapt[images]' (or pillow)") from None
        from ..pillow_resize import A1111_PILLOW
        from ..resampling import resample

        return torch.stack([resample(p, (height, width), interpolation="lanczos", bounds=(-1.0, 1.0),
                                     pillow=A1111_PILLOW) for p in images])
    import numpy as np
    from PIL import Image

    from ..resize_modes import pil_pixels

    unit = torch.clamp((images + 1.0) / 2.0, min=0.0, max=1.0)  # (B, 3, h, w) float32, A1111's lowres_samples
    out = []
    for x in unit:
        eight = (255.0 * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8)  # (h, w, 3): truncated, as A1111
        out.append(pil_pixels(_pixel_upscaler(Image.fromarray(np.ascontiguousarray(eight)), width, height, upscaler)))
    return torch.stack(out)


@contextmanager
def networks_switched(system, *, first: list, apply_first: Callable[[list], object],
                      apply_second: Callable[[list], object]) -> Iterator[None]:
    """A block run with the hires pass's merged networks instead of the first pass's, as A1111's
    ``sample_hr_pass`` runs ``extra_networks.activate(p, hr_extra_network_data)`` before ``calculate_hr_conds``
    (and ``process_images`` activates the first pass's again for the next image).

    Args:
        system: the loaded system; while inside, its conditions cache (:mod:`sdadapt.jobs.generate_conditions`)
            is set aside, so texts are encoded with the hires pass's text-encoder weights.
        first: the first pass's undo handles (:class:`sdadapt.apply.AppliedDelta`), in the order applied; undone
            in reverse on entry (their weights back bit for bit), and refilled on exit.
        apply_first, apply_second: merge the first / hires pass's networks, appending their handles to the list
            given. On exit the hires ones are undone in reverse and the first pass's merged again — the same
            files on the same restored weights, so the same bits.
    """
    from .generate_conditions import conditions_set_aside

    with conditions_set_aside(system):
        for handle in reversed(first):
            handle.undo()
        first.clear()
        second: list = []
        try:
            apply_second(second)
            yield
        finally:
            for handle in reversed(second):
                handle.undo()
            apply_first(first)


def hires_image_conditioning(system, latents: Tensor | None, *, weight: float, seed: int = 0, source: str | None = None,
                             pixels: Tensor | None = None,
                             generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The image conditioning of A1111's txt2img hires pass when its "Inpainting conditioning mask strength"
    ``weight`` is below 1: ``sample_hr_pass`` (``modules/processing.py`` @ 0027ce1) hands
    ``img2img_image_conditioning`` the upscaled first pass — with a latent upscaler ``decode_first_stage`` of the
    upscaled ``latents`` (B, C, h, w) (in [-1, 1], not clamped), with a pixel upscaler its ``decoded_samples``
    (``pixels`` (B, 3, H, W) in [0, 1], given here instead of ``latents``) — and that gives

    * an inpainting model (``hybrid`` / ``concat``): ``inpainting_image_conditioning`` without a mask — a mask of ones
      and the image ``lerp(x, x·(1 − 1), weight) = x·(1 − weight)`` encoded
      (:func:`sdadapt.inpaint.masked_image`, :meth:`~sdadapt.diffusers_system.DiffusersSystem.inpainting_conditioning`:
      the posterior's mean; with ``generator`` a posterior sample drawn from it, as A1111's ``get_first_stage_encoding``
      samples — ``generate --vae-encode sample``, :func:`sample_image`): the first of the pair, (B, 5, h, w);
    * an SD 2.1 unCLIP model (``crossattn-adm``): ``unclip_image_conditioning`` — the embedding of that image at noise
      level 0 (:func:`sdadapt.unclip.unclip_image_of_pixels`, the noise for ``seed`` / ``source``): the second, (B, 2D)
      (the weight's value plays no part; below 1 it switches from zeros to the image);
    * a plain model: neither (A1111's dummy zeros).

    With a weight of 1 A1111 conditions the latent pass as txt2img (``txt2img_image_conditioning``), which
    :func:`sample_image` keeps.

    Raises:
        ValueError: ``weight`` outside [0, 1]; an unCLIP model without an image encoder.
    """
    from .. import inpaint
    from .generate_inpaint import _is_inpainting_model

    inpaint.check_mask_weight(weight)
    unclip = getattr(system, "unclip", None) is not None
    inpainting = not unclip and _is_inpainting_model(system)
    if not (unclip or inpainting):
        return None, None
    with torch.no_grad():
        image = pixels.float() if pixels is not None else system.decode_latents(latents, clamp=False)
        if unclip:
            from ..unclip import unclip_image_of_pixels

            return None, unclip_image_of_pixels(system, image, seed=seed, source=source)
        ones = torch.ones(1, 1, *image.shape[-2:])
        masked = inpaint.masked_image(image, ones, weight)
        drawn = {} if generator is None else {"generator": generator}  # (the mean: as ever)
        return system.inpainting_conditioning(masked, ones, **drawn).float(), None


def _hires_conditioning_draws(system, second: dict, *, vae_encode: str, weighted: bool,
                              pixel_generator: torch.Generator | None,
                              batch: int) -> tuple[torch.Generator | None, dict]:
    """Where ``--vae-encode sample`` draws the posterior sample of an inpainting model's hires conditioning when
    :func:`sample_image` encodes it itself -> ``(generator, options)``: the generator to hand
    :func:`hires_image_conditioning` (or the grey's encode; ``None``: the posterior mean, or the grey left to the
    system's ``sample``) and what to add to the hires pass's ``generate`` options ``second`` (its ``height``,
    ``width``, ``seed``, ``noise`` and ``generator``: the upscaled pixels' posterior generator, if any).

    * sdadapt's noise, mask weight below 1 (``weighted``): the pass's generator (the pixels' or
      ``torch.Generator().manual_seed(seed)``) draws the start noise (``batch``, C, h, w) at the cropped hires size,
      then the conditioning's ε, then the sampler noise — diffusers' inpaint pipeline called on the upscaled image
      (``prepare_latents``: the image's ε, ``randn_tensor``; ``prepare_mask_latents``: the masked image's ε), and the
      draw order of the pass at weight 1, whose grey the system draws after the same start noise
      (:meth:`sdadapt.diffusers_system.DiffusersSystem.sample`). Returned as ``start_noise`` and ``generator``.
    * A1111's noise: the conditioning's ε follows the upscaled pixels' on their generator (``sample_hr_pass``:
      ``images_tensor_to_samples``, then ``img2img_image_conditioning``, both from the global RNG), the grey's at
      weight 1 too, whatever the crop; without pixels (a latent upscaler below weight 1)
      :func:`sdadapt.img2img.init_generator` of the seed past one more draw — where the system draws that pass's
      grey at weight 1 (``DiffusersSystem._conditioning_generator``). A1111's start noise stays its own.
    """
    from ..diffusers_system import DiffusersSystem
    from .generate_inpaint import _is_inpainting_model

    if vae_encode != "sample" or getattr(system, "unclip", None) is not None or not _is_inpainting_model(system):
        return None, {}
    shape = (batch, *system.latent_shape(int(second["height"]), int(second["width"])))
    seed = int(second.get("seed", 0))
    if second.get("noise") is None:
        if not weighted:  # (the grey: the system draws it after the start noise)
            return None, {}
        g = second.get("generator")
        g = torch.Generator().manual_seed(seed) if g is None else g
        return g, {"start_noise": torch.randn(shape, generator=g), "generator": g}
    if pixel_generator is not None:
        return pixel_generator, {}
    if not weighted:
        return None, {}
    # (the place of a pixel pass's ε: where the system draws the weight-1 grey)
    return DiffusersSystem._conditioning_generator(vae_encode, None, seed=seed, shape=shape), {}


def sample_image(system, prompts: list[str], options: dict, *, init_latents: Tensor | None = None,
                 denoising_strength: float = 0.75, hires: HiresRequest | None = None,
                 plan_for: Callable[[int], object] | None = None, fix_steps: bool = False,
                 hires_networks: Callable[[], AbstractContextManager] | None = None, refiner=None,
                 refiner_hires_pass: str = "second", inpainting_mask_weight: float = 1.0,
                 vae_encode: str = "mean", hires_system=None) -> Tensor:
    """One :func:`sdadapt.sampling.generate` call's images (B, 3, H, W) in [-1, 1] with img2img and/or hires fix.

    ``options``: :func:`~sdadapt.sampling.generate`'s keywords (``steps``, ``seed``, ``height``, ``width``, ``plan``,
    ``noise``...). ``init_latents``: img2img from them at ``denoising_strength``. ``hires``: a second pass as
    A1111's txt2img hires fix: the first pass's latents upscaled (a latent upscaler), or decoded, made 8-bit,
    resized by A1111's "Lanczos" upscaler and encoded (``pixel-lanczos``: :func:`lanczos_upscale_pixels`), then
    img2img at ``hires.denoising`` with A1111's ``steps=hr_second_pass_steps or steps`` (the fix-steps rule, :func:`sdadapt.img2img.a1111_img2img_steps`), the start noise drawn for the seed
    at the hires size (A1111 makes a new ImageRNG for the hires latents). ``plan_for(steps)``: the prompt plan for
    the hires pass's steps (A1111 re-plans the schedule for them; of ``hires.prompt`` / ``hires.negative`` when
    given); ``None``: ``options["plan"]``. ``hires.prompt`` / ``hires.negative``: the second pass's texts (a plain
    plan's one text, or its plan); ``hires.sampler``: its sampler. ``fix_steps``: A1111's setting "With img2img, do
    exactly the amount of steps the slider specifies" for the ``init_latents`` pass (``img2img_steps = steps``).
    ``hires_networks()``: a context (:func:`networks_switched`) the hires pass runs in, with its own merged
    networks (A1111's ``hr_extra_network_data``: the hires prompt's tags); ``None``: the first pass's networks.
    ``hires.upscale_to``: the first pass is enlarged (either upscaler) to that size and its latents cropped to
    ``hires.size`` (:func:`crop_hires_latents`, A1111's ``truncate_x/y``) before the noise is drawn at the cropped
    size. The pass runs at :func:`hires_pass_size` (``hires.size``, a side that is no multiple of the VAE factor
    rounded down as A1111's latents round it). An inpainting model's hires pass is conditioned as its txt2img (a grey image under a mask of ones) at
    ``hires.size`` — what A1111's pixel upscalers give it (``img2img_image_conditioning`` of the upscaled pixels
    at mask weight 1: all 0); A1111's latent upscalers hand it the first pass's size and fail (its issue #6281).
    An SD 2.1 unCLIP model's hires pass with ``pixel-lanczos`` is conditioned on the CLIP image embedding of the
    upscaled pixels as A1111 hands them over (:func:`sdadapt.unclip.hires_unclip_image`, the level-0 noise from
    ``options["seed"]``), set on the system for that pass only (:func:`sdadapt.unclip.unclip_image_scope`); with a
    latent upscaler it keeps the first pass's (txt2img: zeros, A1111's ``txt2img_image_conditioning``).
    ``inpainting_mask_weight`` < 1 (A1111's "Inpainting conditioning mask strength"): the hires pass of an inpainting or
    unCLIP model is conditioned on the upscaled first pass instead, as A1111's ``sample_hr_pass`` does
    (:func:`hires_image_conditioning`).
    ``vae_encode``: ``"sample"`` encodes the ``pixel-lanczos`` hires pass's upscaled pixels by a VAE posterior sample
    drawn from the seed's generator before that pass's start noise (:func:`seeded_encoding`; A1111's
    ``images_tensor_to_samples`` samples too); ``"mean"``: the posterior mean. A ``generator`` in ``options`` (the
    first pass's, after its own posterior draw) is not the hires pass's: that pass draws from the seed afresh. An
    inpainting model's hires conditioning is sampled too: at mask weight 1 its grey by the system, through
    ``options["vae_encode"]`` (``second = dict(options)`` carries it into the hires pass; drawn after that pass's
    start noise, :meth:`sdadapt.diffusers_system.DiffusersSystem.sample`); below 1 the weighted upscaled image here
    (:func:`hires_image_conditioning` with a generator), in the same place — with sdadapt's noise that pass's
    generator (the pixels', else ``torch.Generator().manual_seed(seed)``) draws the start noise at the cropped size,
    handed over as ``start_noise``, then the conditioning's ε, then the sampler noise (diffusers'
    ``StableDiffusionInpaintPipeline`` on the upscaled image); with A1111's noise the conditioning's ε (the grey's at
    weight 1 too) follows the pixels' on their generator, cropped pass or not (A1111: the pixels' encode, then
    ``img2img_image_conditioning``, from its global RNG). :func:`_hires_conditioning_draws`; docs/samplers.md,
    "Encoding the init image".
    ``options["before_model_call"]`` with a ``next_pass(sampler=)`` (:class:`.generate_lbw_steps.StepSwitchedLoRAs`)
    is told when the hires pass begins, and with which sampler (the step ranges' hires pass).
    ``refiner``: a :class:`~sdadapt.jobs.generate_refiner.RefinerHandoff` (``generate --refiner``): without ``hires``
    it takes the run's calls below its cut (an img2img run's too: A1111 switches by the timestep whatever the grid);
    with ``hires``, ``refiner_hires_pass`` is A1111's setting "Hires fix: which pass to enable refiner for"
    (``hires_fix_refiner_pass``; sd_samplers_common.apply_refiner): ``"second"`` (A1111's default) the hires pass
    only, ``"first"`` the first pass only, ``"both"`` either; once the refiner took over in the first pass it is the
    loaded model, so the whole hires pass is the refiner's, its pixels decoded and encoded by the refiner's VAE
    (A1111's ``sample`` keeps the model ``current`` after the first pass for ``sample_hr_pass``).
    ``hires_system``: A1111's "Hires checkpoint" (``generate --hires-checkpoint``): the model that runs the hires pass —
    a pixel upscaler's pixels decoded by ``system`` (A1111 decodes before it loads the checkpoint) and encoded by it,
    a latent upscaler's latents handed over as they are, the pass conditioned by its encoders (``options["cond"]``,
    the first model's, left out) and decoded by its VAE. Not with ``refiner``.
    """
    from ..img2img import LATENT_UPSCALERS, upscale_latents
    from ..sampler_tables import PIXEL_UPSCALERS
    from ..sampling import generate

    first = dict(options)
    check_refiner_hires_pass(refiner_hires_pass)
    if hires_system is not None and refiner is not None:
        raise ValueError("a hires checkpoint and the refiner: A1111 loads one model after the other; give one of them")
    if refiner is not None and (hires is None or refiner_hires_pass in ("first", "both")):
        first["refiner"] = refiner
    refined_before = refiner.calls["refiner"] if refiner is not None else 0
    if init_latents is not None:
        first.update(init_latents=init_latents, denoising_strength=denoising_strength)
        if fix_steps:
            first["img2img_steps"] = int(options.get("steps", 25))
    if hires is None:
        return generate(system, prompts, **first)
    latents = generate(system, prompts, **first, output="latents")
    took_over = refiner is not None and refiner.calls["refiner"] > refined_before  # (in the first pass)
    loaded = refiner.refiner if took_over else system  # (A1111's shared.sd_model after the first pass)
    decoder = loaded  # (what decodes the first pass for a pixel upscaler: the model loaded before the hires checkpoint)
    if hires_system is not None:  # (A1111: decode_latent_batch, then reload_model_weights(hr_checkpoint_info))
        loaded = hires_system
    factor = int(getattr(system, "vae_factor", 8))
    height, width = hires_pass_size(hires, factor=factor)  # (hires.size, or A1111's rounding of it down to 8)
    up_h, up_w = hires.upscale_to or hires.size  # (A1111's hr_upscale_to_y/x: covers the size, then cropped)
    unclip_scope: AbstractContextManager = nullcontext()  # (the first pass's unCLIP image, if any, stays)
    seed, source = int(options.get("seed", 0)), getattr(options.get("noise"), "source", None)
    hires_generator = None  # (--vae-encode sample's, for the pixel hires pass: seeded_encoding)
    pixel_generator = None  # (--vae-encode sample: the generator the upscaled pixels' ε came from, either noise)
    weighted = None  # (mask weight < 1: what hires_image_conditioning makes the conditioning of, after the noise)
    if isinstance(hires.upscaler, str) and hires.upscaler in LATENT_UPSCALERS:
        start = upscale_latents(latents.float(), (up_h // factor, up_w // factor), upscaler=hires.upscaler)
        if inpainting_mask_weight < 1.0:  # (A1111: img2img_image_conditioning(decode_first_stage(samples), samples))
            weighted = {"latents": start}
    else:  # pixel-lanczos: decode, resize, encode (A1111's pixel upscalers with Lanczos)
        pixels = lanczos_upscale_pixels(decoder.decode_latents(latents), (up_h, up_w), upscaler=PIXEL_UPSCALERS.get(
            hires.upscaler, hires.upscaler) if isinstance(hires.upscaler, str) else hires.upscaler).to(latents.device)
        if vae_encode == "sample":  # (the seed's generator: the posterior sample, then this pass's start noise)
            spent: list[torch.Generator] = []

            def encode(g: torch.Generator) -> Tensor:
                spent.append(g)
                return loaded.encode_images(pixels, generator=g)

            start, hires_generator = seeded_encoding(
                loaded, encode, seed=seed, a1111_noise=options.get("noise") is not None,
                latent_shape=(len(pixels), *loaded.latent_shape(up_h, up_w)))
            pixel_generator = spent[0]
        else:
            with torch.no_grad():
                start = loaded.encode_images(pixels).float()
        if getattr(loaded, "unclip", None) is not None:  # (A1111: img2img_image_conditioning of those pixels)
            from ..unclip import hires_unclip_image, unclip_image_scope

            unclip_scope = unclip_image_scope(loaded, hires_unclip_image(loaded, pixels, seed=seed, source=source))
        elif inpainting_mask_weight < 1.0:  # (an inpainting model: A1111 weighs its decoded_samples, in [0, 1])
            weighted = {"latents": None, "pixels": (pixels.float() + 1.0) / 2.0}
    start = crop_hires_latents(start, upscale_to=(up_h, up_w), size=hires.size, factor=factor)
    if tuple(start.shape[-2:]) != (height // factor, width // factor):  # (an encoder that does not floor as the VAE)
        raise ValueError(f"the hires pass's latents are {tuple(start.shape[-2:])} after the crop from "
                         f"{up_w}x{up_h}, not the {width}x{height} image's {(height // factor, width // factor)}: "
                         f"this model's encoder does not floor a {up_w}x{up_h} image to "
                         f"{(up_h // factor, up_w // factor)} latents as the VAE does; give a hires size that is a "
                         f"multiple of {factor}")
    steps = hires.steps or int(options.get("steps", 25))
    second = dict(options, height=height, width=width)
    second.pop("generator", None)
    if hires_system is not None:  # (its own conditioning, from its own encoders)
        second.pop("cond", None)  # (the first pass's, spent: the hires pass draws from the seed afresh)
    if hires_generator is not None:
        second["generator"] = hires_generator
    conditioning = None  # (an inpainting model's c_concat for the hires pass; None: its txt2img grey, drawn in sample)
    drawn, noise_options = _hires_conditioning_draws(loaded, second, vae_encode=vae_encode,
                                                     weighted=weighted is not None, pixel_generator=pixel_generator,
                                                     batch=len(start))
    second.update(noise_options)
    if weighted is not None:
        conditioning, unclip_image = hires_image_conditioning(loaded, **weighted, weight=inpainting_mask_weight,
                                                              seed=seed, source=source, generator=drawn)
        if unclip_image is not None:
            from ..unclip import unclip_image_scope

            unclip_scope = unclip_image_scope(loaded, unclip_image)
        if conditioning is not None:  # (cut as the latents; A1111 leaves it uncut and fails on a crop)
            conditioning = crop_hires_latents(conditioning, upscale_to=(up_h, up_w), size=hires.size, factor=factor)
    elif drawn is not None:  # (A1111's noise, a pixel pass at weight 1: the grey's ε after the pixels' own)
        from ..inpaint import txt2img_masked_image

        with torch.no_grad():
            conditioning = loaded.inpainting_conditioning(*txt2img_masked_image(len(start), height, width),
                                                          generator=drawn).float()
    if took_over:  # (the refiner loaded: every call of the hires pass is its own)
        second["refiner"] = refiner.taken_over()
    elif refiner is not None and refiner_hires_pass in ("second", "both"):
        second["refiner"] = refiner
    if conditioning is not None:
        second["inpaint_conditioning"] = conditioning.to(latents.device)
    if (up_h, up_w) != (height, width):  # (A1111's calculate_hr_conds: SDXL told the size it enlarged to)
        second["size_conditioning"] = (up_h, up_w)
    next_pass = getattr(options.get("before_model_call"), "next_pass", None)
    if next_pass is not None:  # (step ranges: the networks on again, spent switches gone, the counter from 0)
        from ..samplers import canonical_sampler

        next_pass(sampler=canonical_sampler(hires.sampler or options.get("sampler", "ddim")))
    second_prompts = prompts
    own_texts = hires.prompt is not None or hires.negative is not None
    if own_texts:  # A1111's hr_prompt / hr_negative_prompt: the second pass's own conditioning
        second.pop("cond", None)
        second_prompts = [hires.prompt] * len(prompts) if hires.prompt is not None else prompts
        if hires.negative is not None:
            second["negative"] = hires.negative
    if hires.guidance is not None:  # (Forge's hr_cfg: the second pass's scale, its refiner's too)
        second["guidance"] = hires.guidance
    if hires.sampler is not None:  # A1111's hr_sampler_name, on --schedule's grid as resolved for it
        second["sampler"] = hires.sampler
        second["schedule"] = hires.schedule
        second.pop("info", None)
        if getattr(second.get("dynamic_thresholding"), "wraps_first_sampler_only", False):
            second.pop("dynamic_thresholding")  # (A1111's extension: plain CFG in a hires pass of its own sampler)
    if plan_for is not None:
        plan = plan_for(steps)
        if isinstance(plan, tuple):  # (a plain hires plan: its text and negative, no plan)
            second_prompts, second["negative"] = [plan[0]] * len(prompts), plan[1]
            second.pop("plan", None)
        else:
            second["plan"] = plan
    with unclip_scope, (nullcontext() if hires_networks is None else hires_networks()):
        return generate(system if hires_system is None else hires_system, second_prompts, **second,
                        init_latents=start.to(latents.dtype), denoising_strength=hires.denoising, img2img_steps=steps)
