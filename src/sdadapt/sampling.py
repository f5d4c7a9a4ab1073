"""Making images with any system: prompts files, any sampler of :mod:`sdadapt.samplers` with
classifier-free guidance.

* :func:`generate` — ``prompts -> images (B, 3, H, W)`` in [-1, 1] on any
  :class:`~sdadapt.methods.system.System`, with the sampler, size, steps, guidance and seed the
  ``generate`` command and training samples take.
* :func:`parse_sample_prompts` — kohya's sample-prompt files: ``.txt``, one prompt a line with optional
  ``--n negative``, ``--w width``, ``--h height``, ``--d seed``, ``--l guidance``, ``--s steps``,
  ``--ss sampler`` (``#`` lines and blank lines are skipped); ``.json``, a list of such lines or of
  tables with kohya's keys (``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``, ``scale``,
  ``sample_steps``, ``sample_sampler``);
  ``.toml``, a ``[prompt]`` table of those keys as defaults and one ``[[prompt.subset]]`` per image.
* :func:`unknown_words` — words a word-level tokenizer (the toy's) does not know and would map
  to ``<unk>``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import samplers
from .errors import InputError
from .guidance_rescale import GuidanceRescale, as_guidance_rescale
from .sampler_tables import CHURN_SAMPLERS, ETA_SAMPLERS, run_schedule, takes_eta_ddim

if TYPE_CHECKING:
    from .dynamic_thresholding import DynamicThresholding
    from .perturbed_attention import PerturbedAttentionGuidance
    from .self_attention_guidance import SelfAttentionGuidance
    from .soft_inpainting import SoftInpainting

__all__ = ["SD_GUIDANCE", "SamplePrompt", "SAMPLERS", "default_guidance", "default_sampler", "generate",
           "given_start_noise", "kohya_clip_sample", "parse_sample_prompts", "unknown_words", "with_defaults",
           "fit_sample_prompt", "SAMPLE_STEPS_RANGE"]

#: the classifier-free guidance scale of a system whose ``sample`` names no number of its own: Stable Diffusion's
#: (diffusers' ``StableDiffusionPipeline.__call__`` ``guidance_scale=7.5``; the System protocol's ``sample``)
SD_GUIDANCE = 7.5

#: every sampler name :func:`generate` takes: :data:`sdadapt.samplers.SAMPLERS` and kohya's aliases
SAMPLERS: tuple[str, ...] = (*samplers.SAMPLERS, *samplers.SAMPLER_ALIASES)


@dataclass(frozen=True)
class SamplePrompt:
    """One image to make. ``None`` fields take the command's (or the system's) defaults.

    ``sampler``: this prompt's sampler (kohya's ``--ss`` / ``sample_sampler``), a name in
    :data:`sdadapt.samplers.SAMPLERS`; ``None``: the command's ``--sample-sampler``."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None


_FLAGS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
          "l": ("guidance", float), "s": ("steps", int), "ss": ("sampler", str)}
#: kohya's prompt-table keys (train_util.line_to_prompt_dict / sample_image_inference) -> SamplePrompt fields
_TABLE_KEYS = {"prompt": ("prompt", str), "negative_prompt": ("negative", str), "width": ("width", int),
               "height": ("height", int), "seed": ("seed", int), "scale": ("guidance", float),
               "sample_steps": ("steps", int), "sample_sampler": ("sampler", str)}


def parse_sample_prompts(source: str | os.PathLike) -> list[SamplePrompt]:
    """Read a kohya-style sample-prompt file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        InputError: (a ``ValueError``) no prompt in it, or a bad option or table key (names the line or entry);
            a ``.json`` / ``.toml`` file that does not parse.
    """
    file = Path(source)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such sample-prompt file")
    suffix = file.suffix.lower()
    if suffix == ".json":
        prompts = _json_prompts(file)
    elif suffix == ".toml":
        prompts = _toml_prompts(file)
    else:
        prompts = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                prompts.append(_prompt_line(text, f"{file}:{number}"))
    if not prompts:
        raise InputError(f"{file}: no prompts in the file (one prompt a line)" if suffix not in (".json", ".toml")
                         else f"{file}: no prompts in the file")
    return prompts


def _prompt_line(text: str, where: str) -> SamplePrompt:
    """One ``prompt --n NEG --w W ...`` line -> a :class:`SamplePrompt` (``where`` names it in errors)."""
    parts = text.split(" --")
    prompt, options = parts[0].strip(), {}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        key = key.lower()  # (kohya's line_to_prompt_dict matches the options without case)
        if key not in _FLAGS:
            raise InputError(f"{where}: unknown option --{key} (use --n, --w, --h, --d, --l, --s or --ss)")
        name, kind = _FLAGS[key]
        try:
            options[name] = kind(value.strip()) if kind is not str else value.strip()
        except ValueError:
            raise InputError(f"{where}: --{key} needs {'a whole number' if kind is int else 'a number'}, got "
                             f"{value.strip()!r}") from None
    if not prompt:
        raise InputError(f"{where}: a line with options but no prompt")
    if "sampler" in options:
        options["sampler"] = _sampler_name(options["sampler"], f"{where}: --ss")
    return SamplePrompt(prompt, **options)


def _sampler_name(name: str, where: str) -> str:
    """A prompt's sampler name -> its name in :data:`sdadapt.samplers.SAMPLERS` (kohya reads its own names)."""
    try:
        return samplers.canonical_sampler(name)
    except ValueError:
        raise InputError(f"{where} {name!r} is not a sampler here; use one of {', '.join(SAMPLERS)}") from None


def _prompt_table(table: dict, where: str) -> SamplePrompt:
    """A kohya prompt table (``{"prompt": ..., "negative_prompt": ..., "scale": ...}``) -> a :class:`SamplePrompt`."""
    options = {}
    for key, value in table.items():
        if key not in _TABLE_KEYS:
            raise InputError(f"{where}: {key!r} is not read (kohya's keys read here: {', '.join(_TABLE_KEYS)})")
        name, kind = _TABLE_KEYS[key]
        accepted = {str: (str,), int: (int,), float: (int, float)}[kind]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise InputError(f"{where}: {key} must be {'text' if kind is str else 'a whole number' if kind is int else 'a number'}"
                             f", got {value!r}")
        options[name] = kind(value)
    if not str(options.pop("prompt", "")).strip():
        raise InputError(f"{where}: no prompt (give prompt = '...')")
    if "sampler" in options:
        options["sampler"] = _sampler_name(options["sampler"], f"{where}: sample_sampler")
    return SamplePrompt(str(table["prompt"]).strip(), **options)


def _json_prompts(file: Path) -> list[SamplePrompt]:
    """kohya's ``.json`` prompts: a list of prompt lines and/or prompt tables."""
    from .training.dataset_config import read_config_table  # (one TOML/JSON reader)

    data = read_config_table(file, flag="--sample-prompts", allow_json=True)
    if not isinstance(data, list):
        raise InputError(f"{file}: a JSON sample-prompt file is a list of prompts (lines or tables), got "
                         f"{type(data).__name__}")
    prompts = []
    for i, entry in enumerate(data):
        where = f"{file}[{i}]"
        if isinstance(entry, str):
            prompts.append(_prompt_line(entry.strip(), where))
        elif isinstance(entry, dict):
            prompts.append(_prompt_table(entry, where))
        else:
            raise InputError(f"{where}: a prompt line or a table, got {entry!r}")
    return prompts


def _toml_prompts(file: Path) -> list[SamplePrompt]:
    """kohya's ``.toml`` prompts: ``[prompt]`` defaults and one ``[[prompt.subset]]`` table per image."""
    from .training.dataset_config import read_config_table  # (one TOML/JSON reader)

    table = read_config_table(file, flag="--sample-prompts").get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise InputError(f"{file}: a TOML sample-prompt file has a [prompt] table (defaults) and [[prompt.subset]] "
                         "tables, one per image")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    return [_prompt_table({**defaults, **subset}, f"{file}: prompt.subset[{i}]")
            for i, subset in enumerate(table["subset"])]


def unknown_words(system, prompt: str) -> list[str]:
    """Words of ``prompt`` a word-level tokenizer maps to ``<unk>`` (the toy's); ``[]`` for BPE tokenizers."""
    tokenizer = getattr(system, "tokenizer", None)
    ids, added = getattr(tokenizer, "ids", None), getattr(tokenizer, "added", {})
    if not isinstance(ids, dict):
        return []
    words = prompt.lower().replace(",", " ").split()
    return list(dict.fromkeys(w for w in words if w not in ids and w not in added))


def _takes(method, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def default_sampler(system: object) -> str:
    """The sampler a request that names none runs on ``system``: ``ddim``, or for an EDM-formulation model
    (Playground v2.5: ``system.edm`` set) the model's own scheduler
    (:func:`sdadapt.training.edm.edm_own_sampler` of its ``scheduler_config``: ``dpmsolver++``, what its diffusers
    ``StableDiffusionXLPipeline`` samples with when no scheduler is swapped in), which has no DDIM form."""
    if getattr(system, "edm", None) is None:
        return "ddim"
    from .training.edm import edm_own_sampler

    return edm_own_sampler(getattr(system, "scheduler_config", None))


def default_guidance(system: object, sampler: str | None = None) -> float:
    """The classifier-free guidance scale ``system`` samples ``sampler`` at when none is given — the one answer
    :func:`generate`, :meth:`sdadapt.diffusers_system.DiffusersSystem.sample` and the jobs (``generate``, ``train``'s
    sample images, ``invert``) take. An EDM-formulation model (Playground v2.5: ``system.edm`` set): its model card's
    scale for the diffusers scheduler ``sampler`` is (:func:`sdadapt.training.edm.edm_default_guidance`: 3 for
    ``dpmsolver++`` / ``dpmsolver++_sde``, 5 for ``euler``; ``sampler`` ``None``: :func:`default_sampler`'s, the
    model's own scheduler). Any other system: the ``guidance`` default of its own ``sample`` (the toy's 2), or
    :data:`SD_GUIDANCE` (7.5) where that names no number (``DiffusersSystem.sample``'s ``None``).

    Raises:
        ValueError: a sampler with no EDM form, on an EDM model (named, with the EDM samplers).
    """
    if getattr(system, "edm", None) is not None:
        from .training.edm import edm_default_guidance

        return edm_default_guidance(default_sampler(system) if sampler is None else sampler)
    try:
        own = inspect.signature(system.sample).parameters["guidance"].default  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError, ValueError):
        return SD_GUIDANCE
    return float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) else SD_GUIDANCE


@torch.no_grad()
def generate(system, prompts: list[str], *, negative: str = "", seed: int = 0, steps: int = 25,
             guidance: float | None = None, sampler: str | None = None, karras: bool = False, height: int | None = None,
             width: int | None = None, cond: object | None = None, schedule: str | None = None,
             info: dict | None = None, plan: object | None = None, noise: object | None = None,
             schedule_options: object | None = None, init_latents: Tensor | None = None,
             denoising_strength: float = 0.75, img2img_steps: int | None = None, output: str = "images",
             inpaint_mask: Tensor | None = None, inpaint_conditioning: Tensor | None = None,
             before_model_call: Callable[[int, int], None] | None = None,
             clip_sample: float | None = None, size_conditioning: tuple[int, int] | None = None,
             refiner: object | None = None, generator: torch.Generator | None = None,
             start_noise: Tensor | None = None, vae_encode: str = "mean", uncond_skip: object | None = None,
             pad_conds: object | None = None, eta: float | None = None, eta_ddim: float | None = None,
             noise_multiplier: float = 1.0, extra_noise: float = 0.0, churn: object | None = None,
             guidance_rescale: float | GuidanceRescale = 0.0,
             perturbed_attention: PerturbedAttentionGuidance | None = None,
             self_attention_guidance: SelfAttentionGuidance | None = None,
             dynamic_thresholding: DynamicThresholding | None = None,
             soft_inpainting: SoftInpainting | None = None) -> Tensor:
    """Images for ``prompts``: (B, 3, H, W) in [-1, 1] (``output="latents"``: the latents (B, C, H/8, W/8)).

    ``sampler``: a name in :data:`SAMPLERS` (:mod:`sdadapt.samplers`, kohya's ``k_`` aliases); ``None``: the
    system's :func:`default_sampler` (``ddim``; an EDM model's own scheduler, ``dpmsolver++`` for Playground v2.5);
    ``karras``: σ on Karras et al.'s grid (diffusers' ``use_karras_sigmas``), for
    :data:`sdadapt.samplers.KARRAS_SAMPLERS`. ``schedule``: A1111's "Schedule type" (σ grid), for
    :data:`sdadapt.samplers.SCHEDULE_SAMPLERS` (:func:`sdadapt.samplers.resolve_schedule`; ``None``: the
    sampler's diffusers grid). ``info``: a dict ``dpm_adaptive`` fills with k-diffusion's report (``steps``,
    ``nfe`` model calls, ``n_accept``, ``n_reject``), where the system's sampling passes it on.

    The system's own ``sample`` when it takes the request (every system does DDIM at its own
    size; the Stable Diffusion systems every sampler and other sizes); otherwise the sampler runs
    through the System protocol (``tokenize``, ``condition``, ``denoiser``, ``decode_latents``) by
    :func:`sdadapt.samplers.sample_latents`, the latent shape probed with ``encode_images``, the
    start noise drawn from a CPU ``torch.Generator().manual_seed(seed)`` and the ancestral samplers'
    noise from the same generator after it (as a diffusers pipeline given that generator does).
    ``guidance`` ``None``: the system's default for the sampler, :func:`default_guidance` (SD 7.5, the toy 2; an EDM
    model its model card's: Playground v2.5 3 with ``dpmsolver++``, 5 with ``euler``).

    On an EDM model ``karras`` / ``schedule`` naming the model's own σ grid (Karras' for Playground v2.5, with
    ``schedule_options`` at their defaults: :func:`sdadapt.samplers.edm.edm_own_grid`) give the images without them,
    bit for bit; any other grid is refused (:func:`sdadapt.samplers.edm.check_edm_request`).

    ``cond``: the prompts' conditioning, precomputed — what ``system.condition`` returns for them
    ((B, L, D) text states, or the system's dict), e.g. personalised by aesthetic gradients
    (:func:`sdadapt.aesthetic.aesthetic_sample`); ``None``: ``system.condition`` of ``prompts``.
    The unconditional branch is always the system's own conditioning of ``negative``.

    ``plan``: a :class:`~sdadapt.prompt_guidance.PromptPlan` (A1111's prompt editing, alternation and
    ``AND``, :func:`~sdadapt.prompt_guidance.plan_prompt`) read for every prompt in place of
    ``prompts`` and ``negative``: its texts are encoded once each and the model calls switch between
    them (the system's ``sample`` when it takes ``plan=``, else the System protocol); not with ``cond``.

    ``noise``: an :class:`~sdadapt.samplers.a1111_noise.A1111Seeds` — A1111's start noise and sampler noise
    for ``seed`` (image i: ``seed + i``; NV/CPU source, variation seed, resize-from, ENSD) in place of the CPU
    generator (the system's ``sample`` when it takes ``noise=``, else the System protocol).
    ``schedule_options``: A1111's schedule settings (:class:`~sdadapt.samplers.schedules.ScheduleOptions`)
    for ``schedule``. ``None`` for both: the images are those without them, bit for bit.

    ``init_latents``: img2img — (1 or B, C, H/8, W/8) latents of the init image (``system.encode_images``) the
    sampler starts from at ``denoising_strength`` (:mod:`sdadapt.img2img`: A1111's t_enc rule for the samplers on
    A1111's σ grid and any sampler given a ``schedule``, diffusers' strength rule for the samplers run as diffusers'
    schedulers, :func:`sdadapt.img2img.img2img_rule`; an EDM model's samplers all take diffusers' rule,
    :func:`sdadapt.samplers.edm.edm_start`; the start noise is the noise a txt2img run of ``seed`` draws).
    ``img2img_steps``: A1111's ``steps=`` of ``sample_img2img`` (the hires pass, "img2img does exactly the steps"):
    the grid is then built for ``int(img2img_steps / min(strength, 0.999))`` steps and the last ``img2img_steps`` of
    them run, by either rule. ``None``: ``steps``, of which A1111's rule runs ``int(strength · steps) + 1`` and
    diffusers' ``int(strength · steps)``.

    ``churn``: A1111's "Sigma churn" settings (:class:`sdadapt.samplers.churn.SigmaChurn`) for Euler, Heun and DPM2
    (passed to those samplers only, as A1111 passes them).
    ``noise_multiplier``: A1111's "Noise multiplier for img2img": the start noise times it for the ``init_latents``
    run (:attr:`sdadapt.img2img.Img2ImgStart.noise_multiplier`; 1: off). ``extra_noise``: A1111's "Extra noise
    multiplier for img2img and hires fix" for an ``init_latents`` run (a hires pass's too; ignored without
    ``init_latents``, as A1111 adds it in ``sample_img2img`` only; :attr:`~sdadapt.img2img.Img2ImgStart.extra_noise`;
    0: off).
    ``inpaint_mask``: inpainting with ``init_latents`` — A1111's latent mask (1 or B, 1, H/8, W/8), 1 = repaint
    (:func:`sdadapt.inpaint.latent_mask`; blended by :func:`sdadapt.inpaint.masked_model`);
    ``inpaint_conditioning``: an inpainting model's ``c_concat`` (B, 5, H/8, W/8)
    (:meth:`~sdadapt.diffusers_system.DiffusersSystem.inpainting_conditioning`). Both ride on the
    :class:`~sdadapt.img2img.Img2ImgStart`. ``soft_inpainting``: A1111's soft inpainting with ``inpaint_mask`` (an
    unrounded one, :func:`sdadapt.inpaint.latent_mask` ``rounded=False``) — its blend at each call, no blend after
    sampling (:mod:`sdadapt.soft_inpainting`; its pixel composite is the caller's: :func:`sdadapt.soft_inpainting.
    difference_mask` of the latents).

    ``before_model_call(steps_done, calls)``: told before each sampler model call
    (:func:`sdadapt.samplers.sample_latents`; the system's ``sample`` when it takes ``before_model_call=``, else the
    System protocol).

    ``clip_sample``: ``heun`` with x̂0 clamped to ±``clip_sample`` (diffusers' ``HeunDiscreteScheduler``
    ``clip_sample=True``, ``clip_sample_range``; kohya's sample images: :func:`kohya_clip_sample`); ``None``: no clamp
    (the system's ``sample`` when it takes ``clip_sample=``, else the System protocol).

    ``size_conditioning``: ``(height, width)`` an SDXL UNet is told as its original and target size (its
    ``time_ids``) in place of the image's own — A1111's cropped hires pass, conditioned on the size it enlarged to
    (:func:`sdadapt.jobs.generate_hires.sample_image`); ``None``: the image's size. A system whose ``sample`` takes
    no ``size_conditioning=`` has no size conditioning, and it is not passed.

    ``refiner``: a :class:`~sdadapt.jobs.generate_refiner.RefinerHandoff` — the SDXL refiner takes the model calls
    below its cut (the system's ``sample`` when it takes ``refiner=``: SDXL's).

    ``uncond_skip``: A1111's "Skip Early CFG" / NGMS (:class:`sdadapt.uncond_skip.UncondSkip`): calls that skip the
    negative prompt (the system's ``sample`` when it takes ``uncond_skip=``, else the System protocol).
    ``pad_conds``: A1111's "Pad prompt/negative prompt" (:class:`sdadapt.cond_padding.CondPadding`) for a ``plan``
    (the system's ``sample`` when it takes ``pad_conds=``, else the System protocol, padding with the system's
    conditioning of ``""``). ``eta``: A1111's "Eta for ancestral samplers" for a sampler in
    :data:`sdadapt.sampler_tables.ETA_SAMPLERS` (``None``: theirs, 1; another sampler takes none and it is not passed,
    as A1111 passes it only to the k-diffusion functions that have one); ``eta_ddim``: A1111's "Eta DDIM" for
    ``ddim`` with a schedule (A1111's own DDIM) and ``ddim_cfgpp`` (``None``: 0). ``guidance_rescale``: a
    :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ: diffusers' ``guidance_rescale`` on diffusers' grids,
    A1111's "CFG Rescale" extension on its grids; ``GuidanceRescale(0.7, "v")``: ComfyUI's RescaleCFG) on each
    guided call (:func:`sdadapt.samplers.sample_latents`; the system's ``sample`` when it takes
    ``guidance_rescale=``, else the System protocol); 0 off. ``perturbed_attention``: perturbed-attention guidance
    (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`, hooked on the system's UNet) on each guided
    call (the system's ``sample`` when it takes ``perturbed_attention=``, else the System protocol); ``None`` off.
    ``self_attention_guidance``: self-attention guidance (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`,
    hooked on the system's UNet) likewise. ``dynamic_thresholding``: A1111's / Forge's "CFG Scale Fix"
    (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`) in place of each guided combination, on A1111's σ
    samplers (a ``schedule``), a prompt plan's too.

    ``generator``: a CPU ``torch.Generator`` the start noise and the ancestral samplers' noise are drawn from in
    place of ``torch.Generator().manual_seed(seed)`` (diffusers' pipelines' ``generator=``): diffusers' img2img is
    ``init_latents=system.encode_images(pixels, generator=g)`` then ``generator=g``, the posterior sample drawn
    before the start noise (:func:`sdadapt.img2img.init_generator`); ``None``: the seed's generator, as ever
    (the system's ``sample`` when it takes ``generator=``, else the System protocol).

    ``start_noise``: the unit start noise (B, C, H/8, W/8), float32, in place of the generator's first draw
    (diffusers' pipelines' ``latents=``); the generator (``generator`` or the seed's) then draws only the sampler
    noise. An inpainting model's ``--vae-encode sample`` draws its masked image's posterior sample between the two,
    as diffusers' inpaint pipelines do (:func:`sdadapt.jobs.generate_inpaint.sampled_encodings`); ``None``: drawn
    from the generator, as ever (the system's ``sample`` when it takes ``start_noise=``, else the System protocol).

    ``vae_encode``: ``"sample"``: the image conditioning the system encodes itself (an inpainting model's txt2img
    grey, a hires pass's without ``inpaint_conditioning``) is a VAE posterior sample drawn after the start noise
    (:meth:`sdadapt.diffusers_system.DiffusersSystem.sample`); ``"mean"``: the posterior mean, as ever. Handed to a
    system whose ``sample`` takes ``vae_encode=``; a system without one encodes no conditioning, and it is moot.

    Raises:
        ValueError: an unknown sampler, ``karras`` for a sampler without Karras σ, or a size the
            system cannot make; an inpainting mask or conditioning without ``init_latents``; ``clip_sample`` on a
            sampler other than ``heun``, or not above 0.
        TypeError: ``cond`` given to a system whose ``sample`` takes no ``cond=``, or ``refiner`` to one whose
            ``sample`` takes no ``refiner=``.
        ValueError: ``generator`` or ``start_noise`` with ``noise`` (A1111's noise draws its own); a ``vae_encode``
            other than ``"mean"`` / ``"sample"``.
    """
    if generator is not None and noise is not None:
        raise ValueError("generator= draws the start noise in place of the seed's generator; A1111's noise= draws "
                         "its own: pass one of them")
    if start_noise is not None and noise is not None:
        raise ValueError("start_noise= is the start noise; A1111's noise= draws its own: pass one of them")
    from .img2img import check_vae_encode

    check_vae_encode(vae_encode)
    if refiner is not None and not _takes(system.sample, "refiner"):
        raise TypeError(f"{type(system).__name__}.sample takes no refiner= argument; the SDXL refiner hands over "
                        "inside an SDXL base's sample (DiffusersSystem)")
    if sampler is None:
        sampler = default_sampler(system)
    try:
        name = samplers.canonical_sampler(sampler)
    except ValueError:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}") from None
    samplers.check_karras(name, karras)  # (here too: ddim runs as the system's own sample, which takes no karras)
    if clip_sample is not None and (name != "heun" or not clip_sample > 0):
        raise ValueError(f"clip_sample={clip_sample} clamps x̂0 on the heun sampler only (diffusers' "
                         f"HeunDiscreteScheduler clip_sample), to a range above 0; got sampler {name!r}: leave it out")
    schedule = run_schedule(name, schedule, karras)
    if schedule == "align_your_steps" and getattr(system, "is_sdxl", False):
        schedule = "align_your_steps_sdxl"
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    start = None
    if init_latents is not None:
        start, steps = _img2img_request(name, init_latents, len(prompts), steps, denoising_strength, img2img_steps,
                                        schedule=schedule, karras=karras,
                                        num_train_steps=len(getattr(system, "alphas_cumprod", ())) or 1000,
                                        edm=getattr(system, "edm", None) is not None)
    if inpaint_mask is not None or inpaint_conditioning is not None:
        if start is None:
            raise ValueError("an inpainting mask or conditioning needs init_latents (the image to inpaint)")
        start = replace(start, mask=inpaint_mask, conditioning=inpaint_conditioning, soft_inpainting=soft_inpainting)
    if soft_inpainting is not None and inpaint_mask is None:  # (an EDM model's samplers refuse it: samplers.edm)
        raise ValueError("soft_inpainting blends by an inpainting mask: give inpaint_mask and init_latents")
    if noise_multiplier != 1.0:
        if start is None:
            raise ValueError("noise_multiplier is A1111's 'Noise multiplier for img2img': it scales the start noise "
                             "of an img2img run; give init_latents or leave it at 1")
        start = replace(start, noise_multiplier=float(noise_multiplier))
    if extra_noise and start is not None:
        start = replace(start, extra_noise=float(extra_noise))
    return _generate(system, prompts, name=name, negative=negative, seed=seed, steps=steps, guidance=guidance,
                     karras=karras, height=height, width=width, cond=cond, schedule=schedule, info=info, plan=plan,
                     noise=noise, schedule_options=schedule_options, start=start, output=output,
                     before_model_call=before_model_call, clip_sample=clip_sample,
                     size_conditioning=size_conditioning, refiner=refiner, generator=generator,
                     start_noise=start_noise, vae_encode=vae_encode, uncond_skip=uncond_skip, pad_conds=pad_conds,
                     guidance_rescale=as_guidance_rescale(guidance_rescale), perturbed_attention=perturbed_attention,
                     self_attention_guidance=self_attention_guidance, dynamic_thresholding=dynamic_thresholding,
                     eta=(eta if name in ETA_SAMPLERS else eta_ddim if takes_eta_ddim(name, schedule) else None),
                     churn=churn if name in CHURN_SAMPLERS else None)


def _img2img_request(name: str, init_latents: Tensor, batch: int, steps: int, strength: float,
                     img2img_steps: int | None, *, schedule: str | None = None, num_train_steps: int = 1000,
                     karras: bool = False, edm: bool = False):
    """``(Img2ImgStart, the steps the sampler's grid is built for)`` of an img2img request (module :mod:`.img2img`;
    ``schedule``: the resolved A1111 grid, which takes A1111's rule, :func:`~sdadapt.img2img.img2img_rule`).
    With ``img2img_steps`` (A1111's fixed steps) both rules build a grid of ``int(N / min(S, 0.999))`` and run its
    last ``N`` steps (the diffusers rule then starts at that index: ``add_noise`` there). ``edm``: an EDM model
    (Playground v2.5), whose samplers are diffusers' EDM schedulers: diffusers' rule for every sampler
    (:func:`sdadapt.samplers.edm.edm_start`), any grid length (its σ are continuous).

    Raises:
        ValueError: a strength outside [0, 1]; strength 0 with fixed steps, or fixed steps whose grid would be
            longer than the model's ``num_train_steps`` on a sampler that steps its timesteps
            (:func:`~sdadapt.img2img.check_fixed_grid`: k-diffusion's samplers build any length, as A1111's).
    """
    from .img2img import (
        Img2ImgStart,
        a1111_img2img_steps,
        a1111_start_index,
        check_fixed_grid,
        check_img2img_sampler,
        check_strength,
        img2img_rule,
    )

    check_img2img_sampler(name)
    if init_latents.dim() != 4 or init_latents.shape[0] not in (1, batch):
        raise ValueError(f"init_latents must be (1 or {batch}, C, h, w) latents, got {tuple(init_latents.shape)}")
    init = init_latents.expand(batch, *init_latents.shape[1:])
    a1111 = img2img_rule(name, schedule) == "a1111" and not edm
    if a1111 or img2img_steps is not None:
        total, t_enc = a1111_img2img_steps(steps, strength, requested=img2img_steps)
        if total < 1:
            raise ValueError("denoising strength 0 with a fixed step count leaves no grid (A1111's steps / strength)")
        if img2img_steps is not None and not edm:  # (a grid past the model's timesteps: k-diffusion's samplers only)
            check_fixed_grid(name, schedule, steps=img2img_steps, strength=strength, num_train_steps=num_train_steps,
                             karras=karras)
        if a1111:
            return Img2ImgStart(init, index=a1111_start_index(total, t_enc)), total
        return Img2ImgStart(init, index=total - (t_enc + 1)), total  # (the last N steps of the grid)
    return Img2ImgStart(init, strength=check_strength(strength)), steps


def _generate(system, prompts: list[str], *, name: str, negative: str, seed: int, steps: int, guidance: float | None,
              karras: bool, height: int | None, width: int | None, cond: object | None, schedule: str | None,
              info: dict | None, plan: object | None, noise: object | None, schedule_options: object | None,
              start: object | None, output: str, before_model_call: Callable[[int, int], None] | None = None,
              clip_sample: float | None = None, size_conditioning: tuple[int, int] | None = None,
              refiner: object | None = None, generator: torch.Generator | None = None,
              start_noise: Tensor | None = None, vae_encode: str = "mean", uncond_skip: object | None = None,
              pad_conds: object | None = None, eta: float | None = None, churn: object | None = None,
              guidance_rescale: GuidanceRescale | None = None,
              perturbed_attention: PerturbedAttentionGuidance | None = None,
              self_attention_guidance: SelfAttentionGuidance | None = None,
              dynamic_thresholding: DynamicThresholding | None = None) -> Tensor:
    """:func:`generate` once its request is checked (``start``: img2img's
    :class:`~sdadapt.img2img.Img2ImgStart`, for a system whose ``sample`` takes ``start=`` or through the
    protocol path and :func:`sdadapt.samplers.sample_latents`)."""
    size = int(getattr(system, "image_size", 0))
    custom = (height not in (None, size)) or (width not in (None, size))
    options: dict = {"seed": seed, "steps": steps, "negative": negative}
    if guidance is not None:
        options["guidance"] = guidance
    takes_sampler = (_takes(system.sample, "sampler") and (not karras or _takes(system.sample, "karras"))
                     and (schedule is None or _takes(system.sample, "schedule"))
                     and (noise is None or _takes(system.sample, "noise"))
                     and (schedule_options is None or _takes(system.sample, "schedule_options"))
                     and (output == "images" or _takes(system.sample, "output"))
                     and (start is None or _takes(system.sample, "start"))
                     and (before_model_call is None or _takes(system.sample, "before_model_call"))
                     and (clip_sample is None or _takes(system.sample, "clip_sample"))
                     and (generator is None or _takes(system.sample, "generator"))
                     and (start_noise is None or _takes(system.sample, "start_noise"))
                     and (uncond_skip is None or _takes(system.sample, "uncond_skip"))
                     and (pad_conds is None or _takes(system.sample, "pad_conds"))
                     and (eta is None or _takes(system.sample, "eta"))
                     and (churn is None or _takes(system.sample, "churn"))
                     and (guidance_rescale is None or _takes(system.sample, "guidance_rescale"))
                     and (perturbed_attention is None or _takes(system.sample, "perturbed_attention"))
                     and (self_attention_guidance is None or _takes(system.sample, "self_attention_guidance"))
                     and (dynamic_thresholding is None or _takes(system.sample, "dynamic_thresholding")))
    # (else through the protocol, below)
    # (a plain DDIM request the system's own sample runs whatever it takes)
    plain_ddim = (name == "ddim" and schedule is None and noise is None and start is None and output == "images"
                  and before_model_call is None and generator is None and start_noise is None
                  and uncond_skip is None and pad_conds is None and eta is None and churn is None
                  and guidance_rescale is None and perturbed_attention is None and self_attention_guidance is None
                  and dynamic_thresholding is None)
    own_sampler = takes_sampler or plain_ddim
    if plan is not None:
        if cond is not None:
            raise ValueError("a prompt plan encodes its own texts; pass plan= or cond=, not both")
        if takes_sampler and _takes(system.sample, "plan"):
            options["plan"] = plan
        else:
            own_sampler = takes_sampler = False  # (the protocol path below runs the plan)
    if refiner is not None and not takes_sampler:  # (the protocol path below has no handoff: never drop it)
        raise TypeError(f"{type(system).__name__}.sample takes no refiner= argument with these options; the SDXL "
                        "refiner hands over inside an SDXL base's sample (DiffusersSystem)")
    if cond is not None and own_sampler:
        if not _takes(system.sample, "cond"):
            raise TypeError(f"{type(system).__name__}.sample takes no cond= argument, so a precomputed conditioning "
                            "cannot be passed in; add a cond=None override to its sample method")
        options["cond"] = cond
    if takes_sampler:
        if karras:
            options["karras"] = True
        if schedule is not None:
            options["schedule"] = schedule
        if info is not None and name == "dpm_adaptive" and _takes(system.sample, "info"):
            options["info"] = info
        if noise is not None:
            options["noise"] = noise
        if schedule_options is not None:
            options["schedule_options"] = schedule_options
        if output != "images":
            options["output"] = output
        if start is not None:
            options["start"] = start
        if before_model_call is not None:
            options["before_model_call"] = before_model_call
        if clip_sample is not None:
            options["clip_sample"] = clip_sample
        if size_conditioning is not None and _takes(system.sample, "size_conditioning"):
            options["size_conditioning"] = size_conditioning
        if refiner is not None:
            options["refiner"] = refiner
        if generator is not None:
            options["generator"] = generator
        if start_noise is not None:
            options["start_noise"] = start_noise
        if uncond_skip is not None:
            options["uncond_skip"] = uncond_skip
        if pad_conds is not None:
            options["pad_conds"] = pad_conds
        if eta is not None:
            options["eta"] = eta
        if churn is not None:
            options["churn"] = churn
        if guidance_rescale is not None:
            options["guidance_rescale"] = guidance_rescale
        if perturbed_attention is not None:
            options["perturbed_attention"] = perturbed_attention
        if self_attention_guidance is not None:
            options["self_attention_guidance"] = self_attention_guidance
        if dynamic_thresholding is not None:
            options["dynamic_thresholding"] = dynamic_thresholding
        if vae_encode != "mean" and _takes(system.sample, "vae_encode"):
            options["vae_encode"] = vae_encode
        return system.sample(prompts, sampler=name, height=height, width=width, **options)
    if custom:
        raise ValueError(f"this model makes {size}x{size} images only; leave out the width and height")
    if plain_ddim and plan is None and schedule_options is None:
        return system.sample(prompts, **options)
    height = width = size
    probe = system.encode_images(torch.zeros(1, 3, height, width, device=system.alphas_cumprod.device))
    if noise is not None:  # A1111's: its start noise, then its generators (sdadapt.samplers.a1111_noise)
        g = noise.for_batch(seed, len(prompts))
        x = g.start_noise((len(prompts), *probe.shape[1:])).to(probe.device)
    else:
        g = torch.Generator().manual_seed(seed) if generator is None else generator
        x = (torch.randn(len(prompts), *probe.shape[1:], generator=g) if start_noise is None
             else given_start_noise(start_noise, (len(prompts), *probe.shape[1:]))).to(probe.device)
    scale = guidance if guidance is not None else default_guidance(system, name)
    guidance_rescale = samplers.guidance_rescale_for_run(  # (once, for the prompt plan's guidance too)
        guidance_rescale, name, schedule=run_schedule(name, schedule, karras),
        prediction_type=getattr(system, "prediction_type", "epsilon"))
    model, uncond = system.denoiser(), None
    if pad_conds is not None:  # (the system's states of "", A1111's cond_stage_model_empty_prompt)
        from .cond_padding import condition_states

        pad_conds = pad_conds.for_model(lambda: condition_states(system.condition(system.tokenize([""])))[:1])
    if plan is not None:
        def encode(text: str) -> object:
            return system.condition(system.tokenize([text] * len(prompts)))

        model = plan.guidance(model, [encode(t) for t in plan.texts], [encode(t) for t in plan.negative_texts], scale,
                              uncond_skip=uncond_skip, total_steps=samplers.run_total_steps(
                                  name, steps, start=start, schedule=run_schedule(name, schedule, karras)),
                              pad_conds=pad_conds, guidance_rescale=guidance_rescale,
                              perturbed_attention=perturbed_attention, self_attention_guidance=self_attention_guidance,
                              dynamic_thresholding=dynamic_thresholding)
        if self_attention_guidance is not None:
            from .self_attention_guidance import check_sag_run

            check_sag_run(name, schedule=run_schedule(name, schedule, karras))
        scale, uncond_skip, pad_conds, guidance_rescale = 1.0, None, None, None
        perturbed_attention = self_attention_guidance = None  # (dynamic_thresholding stays: it keeps x̂0 by branch)
    else:
        if cond is None:
            cond = system.condition(system.tokenize(prompts))
        uncond = system.condition(system.tokenize([negative] * len(prompts)))
    latents = samplers.sample_latents(model, x, cond, sampler=name, alphas_cumprod=system.alphas_cumprod,
                                      num_steps=steps, uncond=uncond, guidance_scale=scale, karras=karras,
                                      schedule=schedule, **({"info": info} if info is not None and name == "dpm_adaptive"
                                                             else {}),
                                      **({"schedule_options": schedule_options} if schedule_options is not None
                                         else {}),
                                      prediction_type=getattr(system, "prediction_type", "epsilon"), generator=g,
                                      start=start, before_model_call=before_model_call, uncond_skip=uncond_skip,
                                      pad_conds=pad_conds, guidance_rescale=guidance_rescale,
                                      perturbed_attention=perturbed_attention,
                                      self_attention_guidance=self_attention_guidance,
                                      dynamic_thresholding=dynamic_thresholding,
                                      **({} if eta is None else {"eta": eta}),
                                      **({} if churn is None else {"churn": churn}),
                                      **({} if clip_sample is None else {"clip_sample": clip_sample}),
                                      **(dict(getattr(system, "ddim_options", {})) if name == "ddim" and schedule is None
                                         else {}))
    return latents if output == "latents" else system.decode_latents(latents)


def given_start_noise(start_noise: Tensor, shape: tuple[int, ...]) -> Tensor:
    """:func:`generate`'s ``start_noise`` for a batch whose start noise is ``shape`` (B, C, h, w): the tensor as it
    is (a draw from the generator is float32 on the CPU; the caller moves it to the model's device).

    Raises:
        ValueError: another shape (naming both).
    """
    if tuple(start_noise.shape) != tuple(shape):
        raise ValueError(f"start_noise is {tuple(start_noise.shape)}, the batch's start noise is {tuple(shape)}: "
                         "draw it at the size being generated, one row per prompt")
    return start_noise


def kohya_clip_sample(sampler: str) -> float | None:
    """The x̂0 clamp kohya's sample images run ``sampler`` with (:func:`generate`'s ``clip_sample``): 1.0 for
    ``heun``, else ``None``.

    kohya's ``get_my_scheduler`` (sd-scripts 48d368fa ``library/train_util.py``) sets ``scheduler.config.clip_sample
    = True`` on a scheduler whose config has ``clip_sample`` False: of its classes only ``HeunDiscreteScheduler``
    (range 1.0) and ``DDIMScheduler`` built with its defaults (``clip_sample=True`` already); sdadapt's ``ddim`` is the
    model's own DDIM (docs/samplers.md), and ``ddpm`` clamps by default.

    Raises:
        ValueError: an unknown sampler name.
    """
    return 1.0 if samplers.canonical_sampler(sampler) == "heun" else None


#: kohya's bounds of a sample prompt's steps (sample_image_inference: ``max(1, min(1000, steps))``)
SAMPLE_STEPS_RANGE = (1, 1000)


def fit_sample_prompt(prompt: SamplePrompt, *, multiple: int) -> tuple[SamplePrompt, list[str]]:
    """``prompt`` as kohya's ``sample_image_inference`` takes it, checked before training starts: steps held to
    :data:`SAMPLE_STEPS_RANGE` and each given side rounded down to a multiple of the model's ``multiple`` (kohya:
    of 8, at least 64), at least one ``multiple`` — instead of failing at the first sample point, after training
    steps. Returns the prompt and a note for each change."""
    notes: list[str] = []
    changes: dict[str, int] = {}
    low, high = SAMPLE_STEPS_RANGE
    if prompt.steps is not None and not low <= prompt.steps <= high:
        changes["steps"] = min(high, max(low, prompt.steps))
        notes.append(f"sample prompt {prompt.prompt!r}: --s {prompt.steps} held to {changes['steps']} steps (kohya "
                     f"holds a sample's steps to {low}..{high})")
    for name in ("width", "height"):
        side = getattr(prompt, name)
        if side is not None and (side % multiple or side < multiple):
            changes[name] = max(multiple, side - side % multiple)
            notes.append(f"sample prompt {prompt.prompt!r}: --{name[0]} {side} rounded down to {changes[name]} (this model "
                         f"makes sides that are multiples of {multiple}; kohya rounds down to a multiple of 8)")
    return (replace(prompt, **changes) if changes else prompt), notes


def with_defaults(prompt: SamplePrompt, *, seed: int, steps: int, guidance: float | None) -> SamplePrompt:
    """``prompt`` with its missing seed/steps/guidance filled in."""
    return replace(prompt, seed=prompt.seed if prompt.seed is not None else seed,
                   steps=prompt.steps if prompt.steps is not None else steps,
                   guidance=prompt.guidance if prompt.guidance is not None else guidance)
