"""``python -m sdadapt generate``: images from a model with LoRA-family files and embeddings applied."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..dynamic_thresholding import DynamicThresholding
from ..guidance_rescale import GuidanceRescale, as_guidance_rescale
from ..inversion.euler_noise import Img2ImgAlternative
from ..plurals import plural
from ..prompt_styles import PromptStyle
from ..soft_inpainting import SoftInpainting
from ..token_merging import check_token_merging_ratio
from .loaded_models import LoadedModels
from .models import load_system, resolve_device
from .train import _toy_vocabulary

__all__ = ["image_seed", "run_generate"]


def _lora_spec(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (a Windows drive letter is not a scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), 1.0


def _checked_specs(option: str, texts: list[str] | tuple[str, ...], *, folders: bool = False) -> list[tuple[Path, float]]:
    """``option``'s ``FILE[:SCALE]`` values parsed, each file (with ``folders``, or folder) checked to
    exist (a ``FILE:0,8`` is named as such)."""
    parsed = [_lora_spec(text) for text in texts]
    for (path, _), text in zip(parsed, texts):
        if not (path.is_file() or folders and path.is_dir()):
            head, _, scale = str(text).rpartition(":")
            if head and Path(head).is_file():  # (FILE:SCALE with a SCALE that is no number, e.g. 0,8)
                raise ValueError(f"{option} {text}: strength {scale!r} is not a number; write FILE:SCALE as {head}:0.8")
            raise FileNotFoundError(f"{option} {path}: no such file")
    return parsed


def run_generate(
    *,
    prompt: str,
    out: str | os.PathLike,
    model: str = "toy",
    negative: str = "",
    comments: bool = True,
    loras: list[str] | tuple[str, ...] = (),
    embeddings: list[str] | tuple[str, ...] = (),
    embeddings_dir: str | os.PathLike | None = None,
    hypernetworks: list[str] | tuple[str, ...] = (),
    custom_diffusions: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_rescale_space: str = "combined",
    pag_scale: float = 0.0,
    pag_adaptive_scale: float = 0.0,
    pag_layers: Sequence[str] | None = None,
    sag_scale: float = 0.0,
    sag_blur_sigma: float = 2.0,
    dynamic_thresholding: DynamicThresholding | None = None,
    freeu: Sequence[float] | None = None,
    freeu_version: str = "v2",
    freeu_window: Sequence[float] = (0.0, 1.0),
    sampler: str | None = None,
    karras: bool = False,
    schedule: str | None = None,
    noise: str | None = None,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    ensd: int = 0,
    sigma_min: float = 0.0,
    sigma_max: float = 0.0,
    rho: float = 0.0,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
    old_karras_sigmas: bool = False,
    always_discard_next_to_last_sigma: bool = False,
    sgm_noise_multiplier: bool = False,
    skip_early_cfg: float = 0.0,
    ngms: float = 0.0,
    ngms_all_steps: bool = False,
    pad_conds: bool = False,
    pad_conds_v0: bool = False,
    eta: float | None = None,
    eta_ddim: float | None = None,
    noise_multiplier: float = 1.0,
    extra_noise: float = 0.0,
    sigma_churn: float = 0.0,
    sigma_tmin: float = 0.0,
    sigma_tmax: float = 0.0,
    sigma_noise: float = 1.0,
    emphasis: str = "Original",
    noise_schedule: str = "default",
    downcast_alphas_cumprod: bool = False,
    old_prompt_editing_timelines: bool = False,
    tiling: bool = False,
    a1111_upsampling: bool = False,
    vae_tiling: bool = False,
    token_merging_ratio: float = 0.0,
    token_merging_ratio_hr: float | None = None,
    hypertile_unet: object = False,
    hypertile_unet_second_pass: bool = False,
    hypertile_vae: object = False,
    width: int | None = None,
    height: int | None = None,
    count: int = 1,
    overwrite: bool = False,
    jpeg_quality: int = 80,
    webp_lossless: bool = False,
    image_format: str = "png",
    tokenizer: str | None = None,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    max_token_length: int = 75,
    clip_stats: str | os.PathLike | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    refiner: str | os.PathLike | None = None,
    refiner_switch_at: float = 0.8,
    refiner_hires_pass: str | None = None,
    refiner_switch_by_steps: bool = False,
    refiner_empty_negative: str = "encoded",
    vae: str | os.PathLike | None = None,
    device: str = "auto",
    aesthetic: str | os.PathLike | None = None,
    aesthetic_steps: int = 5,
    aesthetic_lr: float = 1e-4,
    aesthetic_weight: float = 0.9,
    aesthetic_slerp: bool = False,
    aesthetic_clip: str | os.PathLike | None = None,
    aesthetic_text: str | None = None,
    aesthetic_text_angle: float = 0.1,
    aesthetic_text_negative: bool = False,
    lora_dir: str | os.PathLike | None = None,
    hypernetwork_dir: str | os.PathLike | None = None,
    lbw_presets: str | os.PathLike | None = None,
    init_image: str | os.PathLike | None = None,
    denoising_strength: float = 0.75,
    hires_scale: float | None = None,
    hires_width: int | None = None,
    hires_height: int | None = None,
    hires_steps: int = 0,
    hires_denoising: float = 0.7,
    hires_upscaler: str = "latent",
    resize_mode: str = "just",
    img2img_fix_steps: bool = False,
    hires_prompt: str | None = None,
    hires_negative: str | None = None,
    hires_sampler: str | None = None,
    hires_schedule: str | None = None,
    hires_guidance: float | None = None,
    hires_checkpoint: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    mask_blur: float | tuple[float, float] | None = None,
    latent_mask: str | os.PathLike | None = None,
    invert_mask: bool = False,
    inpainting_fill: str = "original",
    inpainting_mask_weight: float = 1.0,
    inpaint_full_res: bool = False,
    inpaint_full_res_padding: int | None = None,
    soft_inpainting: SoftInpainting | None = None,
    sd_upscale: float | None = None,
    sd_upscale_overlap: int = 64,
    sd_upscale_upscaler: str = "lanczos",
    loopback: int | None = None,
    loopback_final_denoising: float = 0.5,
    loopback_curve: str = "linear",
    outpaint: int | None = None,
    outpaint_directions: Sequence[str] = ("left", "right", "up", "down"),
    outpaint_mask_blur: int = 4,
    outpaint_fill: str = "fill",
    img2img_alt: Img2ImgAlternative | None = None,
    color_correction: bool = False,
    color_reference: object = None,
    vae_encode: str = "mean",
    styles: Sequence[PromptStyle] = (),
    loaded: LoadedModels | None = None,
    progress: Callable[..., None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Make ``count`` images of ``prompt`` on a model with LoRA-family files and embeddings applied.

    Args:
        loras: ``"FILE"`` or ``"FILE:SCALE"`` (any family sdadapt reads: kohya, LyCORIS, diffusers,
            peft), merged into the weights at that strength.
        embeddings: textual-inversion files; their trigger words (the file names) work in the prompts.
        embeddings_dir: A1111's embeddings folder (``--embeddings-dir``): the embedding files under it whose names
            (file stems) the prompts use (the hires ones too), matched by tokens as A1111 matches them
            (:func:`~sdadapt.jobs.generate_prompt_tags.prompt_embedding_files`); one of another model's width is
            skipped with a warning, as A1111 skips it.
        hypernetworks: A1111 hypernetworks, ``"FILE"`` or ``"FILE:STRENGTH"`` (default 1.0, A1111's),
            injected into the UNet (:func:`sdadapt.inject_hypernetwork`) after the LoRA merges;
            several chain in the order given, as A1111 chains ``<hypernet:...>`` tags. A file for
            another family (an SD1 file's 768 text width on SD2's 1024) is refused.
        custom_diffusions: Custom Diffusion results, ``"FILE"`` or ``"FILE:SCALE"`` (default 1), as
            ``train custom-diffusion`` / ``merge-custom-diffusion`` write them (with their
            ``-token`` files beside) or diffusers' output folder: ``W0 + scale * (W_cd - W0)``
            on the cross-attention K/V (:func:`sdadapt.apply_custom_diffusion`), their modifier
            tokens injected so the prompt can use them.
        seed: the seed of image 0; ``-1`` draws one, as A1111's ``get_fixed_seed`` (also a ``subseed`` of
            ``-1``; :mod:`.generate_seed`), said in the log and returned as ``"seed"`` / ``"subseed"``.
        steps: sampler steps (default 25; the toy 25).
        guidance: the classifier-free guidance scale; ``None``: the model's — the system's own (SD 7.5, the toy 2),
            an EDM model's model-card default for the sampler (Playground v2.5: 3 with ``dpmsolver++``, 5 with
            ``euler``; :func:`sdadapt.sampling.default_guidance`, said in the log and written in the infotext).
        guidance_rescale: φ in [0, 1] of the guidance rescale (:mod:`sdadapt.guidance_rescale`; 0 off): diffusers'
            ``guidance_rescale`` on diffusers' grids, A1111's "CFG Rescale" extension on A1111's (x̂0 on its σ
            samplers, ε on DDIM / PLMS / UniPC), every pass and the refiner; written as "CFG Rescale". Not with
            ``AND``.
        guidance_rescale_space: ``"combined"`` (above) or ``"v"``: ComfyUI's / reForge's RescaleCFG, each branch's
            x̂0 taken to v at the call's σ first (a σ sampler on A1111's grid, or a v model on diffusers' grid);
            written as reForge writes it (``rescale_cfg_enabled: True, rescale_cfg_version: Normal,
            rescale_cfg_multiplier: PHI``).
        pag_scale: perturbed-attention guidance (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`; 0
            off, 3 the usual): diffusers' PAG pipelines' ``pag_scale`` on diffusers' grids, Forge's / ComfyUI's
            PerturbedAttentionGuidance (on x̂0) on A1111's, every pass; written as Forge writes it
            (``PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: S``). Not with ``AND`` or
            ``refiner``.
        pag_adaptive_scale: diffusers' ``pag_adaptive_scale`` (the scale at timestep t: ``max(S − F·(1000 − t),
            0)``), written as SD.Next's "PAG adaptive"; with ``pag_scale``.
        pag_layers: diffusers' ``pag_applied_layers`` (regular expressions searched in the UNet's module names;
            ``None``: ``("mid",)``), written "PAG layers" when not ``mid``; with ``pag_scale``.
        sag_scale: self-attention guidance (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`; 0 off,
            0.5 ComfyUI's / Forge's): diffusers' SAG pipeline on diffusers' grids, ComfyUI's / Forge's on A1111's σ
            grids, every pass; written as Forge writes it (``sag_enabled: True, sag_scale: S, sag_blur_sigma: B``).
            Not with ``AND``, ``refiner``, Hypertile U-Net, A1111's timestep samplers, LCM or an EDM model.
        sag_blur_sigma: the SAG blur's σ (2 ComfyUI's / Forge's; diffusers' pipeline: 1).
        dynamic_thresholding: A1111's / Forge's "CFG Scale Fix"
            (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`; ``None`` off) in place of every guided
            combination, every pass, the refiner's too; A1111's σ samplers only (a schedule). Written as A1111's
            extension writes it ("Dynamic thresholding enabled: True, Mimic scale: ...") for ``step_rule="calls"``,
            as Forge's built-in writes it (``dynthres_enabled: True, dynthres_mimic_scale: ...``) for
            ``"timesteps"``. Not with ``guidance_rescale``.
        freeu: FreeU (:class:`sdadapt.freeu.FreeU`) on the UNet for the run: ``()`` Forge's defaults, or ``(b1, b2,
            s1, s2)``; ``None`` off. Written as Forge writes it (``freeu_enabled: True, freeu_b1: ..., freeu_s2:
            ...``). Not with ``refiner``.
        freeu_version: ``"v2"`` (ComfyUI's FreeU_V2, Forge's) or ``"diffusers"`` (``enable_freeu``; written "FreeU
            version: diffusers").
        freeu_window: newer Forge's ``(freeu_start, freeu_end)``: FreeU on the model calls whose A1111
            ``sampling_step / (steps − 1)`` lies in it, each pass (:class:`sdadapt.freeu.FreeUSteps`); ``(0, 1)``:
            every call. Written as ``freeu_start`` / ``freeu_end`` when not that.
        sampler: a sampler name, kohya alias or A1111 label ("DPM++ 2M Karras", "Euler a"):
            :func:`sdadapt.samplers.labels.sampler_schedule_from_label`; a label's " Karras" is
            ``schedule="karras"``, " Exponential" ``schedule="exponential"``. ``None``: ``ddim``, or an EDM model's
            own scheduler (Playground v2.5: ``dpmsolver++``, as its diffusers pipeline;
            :func:`sdadapt.jobs.model_size.model_default_sampler`, said in the log).
        karras: σ on Karras et al.'s grid (diffusers' ``use_karras_sigmas``), for the samplers in
            :data:`sdadapt.samplers.KARRAS_SAMPLERS`.
        schedule: A1111's "Schedule type" (``"exponential"``, ``"Align Your Steps"``, ``"automatic"``, ...;
            :mod:`sdadapt.samplers.schedules`) for :data:`sdadapt.samplers.SCHEDULE_SAMPLERS`; ``None``: the
            sampler's diffusers grid (docs/samplers.md).
        noise: ``"a1111"`` (A1111's default source, "GPU"/"NV": what an NVIDIA GPU draws, here on any device)
            or ``"a1111-cpu"`` (its "CPU" source): the start noise and the samplers' noise drawn as A1111 draws
            them for the seed (:mod:`sdadapt.samplers.a1111_noise`); ``None``: the CPU generator (unchanged).
            With it: ``subseed``/``subseed_strength`` (A1111's variation seed and strength; image i:
            ``subseed + i``), ``seed_resize_from`` ``(height, width)`` (A1111's "Resize seed from"), ``ensd``
            (A1111's "Eta noise seed delta").
        always_discard_next_to_last_sigma: A1111's "Always discard next-to-last sigma" (with a ``schedule``): every
            pass on A1111's grid runs n + 1 steps less the next-to-last σ (its timestep samplers one step more), as
            DPM2 / DPM2 a / DPM++ 3M SDE do by themselves; "Discard penultimate sigma: True" in the infotext where it
            changed a pass.
        sgm_noise_multiplier: A1111's "SGM noise multiplier" (with a ``schedule``, txt2img): the first pass of its
            σ samplers starts from ``x_T·√(1 + σ_0²)`` instead of ``x_T·σ_0`` (the official SDXL code's start;
            :func:`sdadapt.samplers.sigma_space.first_sample`; a hires pass starts from its image, as A1111's
            ``sample_img2img``); "SGM noise multiplier: True" in the infotext.
        sigma_min, sigma_max, rho, beta_alpha, beta_beta, old_karras_sigmas: A1111's schedule settings
            (:class:`sdadapt.samplers.schedules.ScheduleOptions`; 0 / 0.6 / False: A1111's defaults), with a
            ``schedule`` (or a sampler label that names one).
        skip_early_cfg, ngms, ngms_all_steps: A1111's "Skip Early CFG" (the fraction of each pass's model calls that
            skip the negative prompt) and "Negative Guidance minimum sigma" (odd calls below that σ skip it; every
            call with ``ngms_all_steps``; needs one of A1111's grids: a ``schedule``): :mod:`sdadapt.uncond_skip`,
            written into the infotext as A1111 writes them, once a call skipped.
        pad_conds, pad_conds_v0: A1111's "Pad prompt/negative prompt" and its "(v0)" (:mod:`sdadapt.cond_padding`):
            a prompt and negative of different chunk counts brought to one length (the empty prompt's states; v0:
            the negative's last token), "Pad conds: True" / "Pad conds v0: True" in the infotext when they padded.
        eta: A1111's "Eta for ancestral samplers" (``None``: 1) for the passes whose sampler takes it
            (:data:`sdadapt.sampler_tables.ETA_SAMPLERS`: Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE, the 2M/3M SDEs on
            A1111's grids, DPM fast/adaptive), "Eta: x" in the infotext when it is not 1.
        eta_ddim: A1111's "Eta DDIM" (``None``: 0) for ``ddim`` with a schedule (A1111's own DDIM) and
            ``ddim_cfgpp`` (its DDIM CFG++), "Eta DDIM: x" in the infotext when it is not 0.
        noise_multiplier: A1111's "Noise multiplier for img2img" (default 1): the start noise of the
            ``init_image`` run times it (:attr:`sdadapt.img2img.Img2ImgStart.noise_multiplier`), "Noise multiplier: x"
            in the infotext when it is not 1.
        extra_noise: A1111's "Extra noise multiplier for img2img and hires fix" (default 0): the start noise times it
            added to the first sample of the ``init_image`` run and of the hires pass (:attr:`sdadapt.img2img.
            Img2ImgStart.extra_noise`; A1111's samplers only), "Extra noise: x" in the infotext when not 0.
        sigma_churn, sigma_tmin, sigma_tmax, sigma_noise: A1111's "Sigma churn" (0: off), "Sigma tmin", "Sigma tmax"
            (0: no limit), "Sigma noise" for the passes on Euler, Heun or DPM2 (:class:`sdadapt.samplers.churn.
            SigmaChurn`; churn on A1111's grids only), "Sigma …" in the infotext when not the defaults.
        emphasis: A1111's "Emphasis mode" (:data:`sdadapt.diffusers_system.EMPHASIS_MODES`: "Original", "No norm",
            "Ignore", "None"; its labels in any case), for the model and the refiner; "Emphasis: X" in the infotext when not
            Original and a text encoded has "(" or "[", as A1111 writes it.
        vae_tiling: the VAE decodes and encodes in overlapping tiles (diffusers' ``enable_vae_tiling``: a large
            image in the memory of one tile; :mod:`sdadapt.vae_tiling`), the refiner's too; written "VAE tiling: True".
        tiling: A1111's "Tiling": every ``Conv2d`` of the UNet and VAE (the refiner's too) pads circularly for the
            run, so the image tiles without a seam (:func:`sdadapt.tiling.circular_padding`); "Tiling: True" in the
            infotext.
        a1111_upsampling: A1111's UNet at sizes its halvings do not divide (SD1's 520: latents 65): each upsampler's
            output resized to its skip's size after its convolution (A1111's ``TorchHijackForUnet``), not before it
            (diffusers, ComfyUI, Forge): :class:`sdadapt.a1111_upsampling.A1111Upsampling` on every UNet of the run.
            No change at sizes the halvings divide; nothing in the infotext (A1111 writes nothing of it).
        token_merging_ratio: A1111's "Token merging ratio" (ToMe, :class:`sdadapt.token_merging.TokenMerging`): the share
            of the full-resolution self-attention tokens merged for the first pass (img2img's too); 0 off. Written
            "Token merging ratio" in the infotext. Not with ``refiner``; a model without SD's transformer blocks
            (the toy) is refused.
        hypertile_unet, hypertile_vae: A1111's "Hypertile U-Net" / "Hypertile VAE" (:class:`sdadapt.hypertile.Hypertile`):
            ``True`` (A1111's default depth, tile and swap sizes) or a :class:`~sdadapt.hypertile.HypertileSettings`;
            the tiles' RNG seeded with the run's first seed, and again before each hires pass. Written as A1111's
            Hypertile fields and read back. Not with ``refiner``.
        hypertile_unet_second_pass: A1111's "Hypertile U-Net second pass": the UNet tiled for the hires pass (and,
            as A1111 leaves it, the passes after it).
        token_merging_ratio_hr: A1111's "Token merging ratio for high-res pass": the hires pass's (``None`` or 0: the
            first pass's, A1111's fallback); "Token merging ratio hr" in the infotext when the hires pass merges.
        noise_schedule: A1111's "Noise schedule for sampling": ``"default"`` (the model's own: a checkpoint marked
            ``ztsnr`` or a folder whose scheduler config has ``rescale_betas_zero_snr`` samples on the zero-terminal-SNR
            schedule already) or ``"zero-terminal-snr"`` (or A1111's labels, "Default" / "Zero Terminal SNR"): the
            model's and the refiner's ᾱ rescaled as A1111 rescales them
            (:meth:`sdadapt.diffusers_system.DiffusersSystem.rescale_to_zero_terminal_snr`). A run on that schedule
            writes "Noise Schedule: Zero Terminal SNR" in the infotext.
        downcast_alphas_cumprod: A1111's "Downcast alphas_cumprod" (its setting "Downcast model alphas_cumprod to fp16
            before sampling. For reproducing old seeds."): ᾱ held as float16, every σ table read from it as A1111 reads
            it (:func:`sdadapt.samplers.sigma_space.downcast_alphas_cumprod`) — what every A1111 before v1.7.0-225
            sampled with (its infotext backcompat turns it on for those); A1111's σ samplers with a schedule only,
            not with the zero-terminal-SNR schedule. Written "Downcast alphas_cumprod: True".
        old_prompt_editing_timelines: A1111's "Use old prompt editing timelines" (``use_old_scheduling``): a
            ``[from:to:when]`` below 1 is a fraction of the steps, any other a step number (A1111 before 1.6; since,
            a number with a decimal point is a fraction), and the hires pass planned as the first
            (:func:`sdadapt.prompt_schedule.prompt_schedule`). Written "Old prompt editing timelines: True" where it
            changes a schedule, as A1111 writes it.
        clip_stats: an SD 2.1 unCLIP-L model's CLIP-embedding mean/std (karlo's ``ViT-L-14_stats.th``, ``--clip-stats``;
            :func:`sdadapt.jobs.models.load_system`): the normaliser of its image conditioning (:mod:`sdadapt.unclip`).
        max_token_length: 75 (default): a prompt longer than 75 tokens is laid out as A1111 lays it out (77-token
            chunks encoded one by one, cut at a comma up to 20 tokens back: :mod:`sdadapt.prompt_chunks`); 150 or
            225: up to that many tokens in 75-token windows joined as kohya trains with ``--max_token_length``
            (:mod:`sdadapt.text_chunks`). Stable Diffusion models; not with ``aesthetic``.
        aesthetic_score, negative_aesthetic_score: the SDXL refiner's aesthetic-score conditioning of the prompt
            and of the negative (diffusers' options of those names; ``None``: its 6.0 and 2.5); refiner only
            (``model``, or ``refiner``).
        refiner: an SDXL refiner (file or folder) that takes over from the SDXL base ``model`` in the same sampler
            run once its timesteps fall below ``round(1000 - 1000 * refiner_switch_at)`` (A1111's "Refiner" and "Switch
            at", sd_samplers_common.apply_refiner; diffusers' ensemble of experts, ``denoising_end`` /
            ``denoising_start``): :mod:`sdadapt.jobs.generate_refiner`. Both models are held at once; ``vae`` applies
            to both. As A1111: an img2img / inpaint run switches by the timestep on its shortened grid; the prompt's
            schedule (prompt editing, alternation, ``AND``, ``BREAK``) is encoded again by the refiner's OpenCLIP-G and
            runs on across the switch; embeddings stay the base's (the refiner reads their names as words: A1111
            skips an SDXL embedding on the refiner, whose width is not its 2048); LoRA files and tags act on the base
            (A1111's stay loaded, but no SDXL-base layer fits the refiner's); hypernetworks act on both, each on every
            attention layer whose K/V input width it has a pair for (A1111's ``apply_hypernetworks`` on every
            ``CrossAttention`` of the loaded model: an SDXL file's 1280 pair meets the refiner's 1280-wide text context;
            :func:`sdadapt.jobs.generate_hypernetworks.inject_refiner_hypernetwork`). ``refiner_hires_pass``:
            with the hires fix, A1111's "Hires fix: which pass to enable refiner for": ``"second"`` (``None``:
            A1111's default), ``"first"`` or ``"both"`` (:func:`sdadapt.jobs.generate_hires.sample_image`).
            ``refiner_switch_by_steps``: A1111's "Refiner switch by sampling steps" — the switch at the first model call
            ``k`` of a pass with ``k / total >= refiner_switch_at`` (``total``: the pass's steps, twice that for A1111's
            second-order samplers: :class:`sdadapt.jobs.generate_refiner.RefinerHandoff`) instead of by timestep.
            ``refiner_empty_negative``: ``"encoded"`` (default; diffusers' refiner pipeline encodes an empty negative
            prompt) or ``"zeros"`` (A1111: an empty negative prompt is zeros on the refiner as on the base,
            sd_models_xl.py ``force_zero_negative_prompt``); the SDXL refiner only (``refiner``, or ``model``).
        vae: a VAE file or folder that decodes the images instead of the model's (kohya's ``--vae``;
            LDM or diffusers layout, or a full checkpoint's VAE: :mod:`sdadapt.external_vae`).
        count: images; ``count > 1`` writes ``OUT-00.png``, ``OUT-01.png`` … with seeds ``seed``, ``seed+1`` … (with
            ``noise`` and a ``subseed_strength`` ≠ 0 every image has ``seed``, its variation seed ``subseed + i``:
            A1111's ``all_seeds``: :func:`image_seed`).
        aesthetic: an aesthetic-gradient embedding file (``.pt``/``.safetensors``): the prompt's text
            conditioning is personalised toward it (``aesthetic_steps`` Adam steps at ``aesthetic_lr``,
            mixed in at ``aesthetic_weight``, linearly or by ``aesthetic_slerp``; A1111's defaults 5,
            1e-4, 0.9) once, then every image is sampled with it (``aesthetic_weight=0``: the plain
            images bit for bit). ``aesthetic_clip``: the CLIP model (folder or checkpoint) whose
            ``text_projection`` maps the text into the embedding's space — needed for Stable
            Diffusion models; the toy uses its fitted one. ``aesthetic_text``: A1111's "aesthetic text",
            turning the target ``aesthetic_text_angle`` toward the phrase's CLIP features (away with
            ``aesthetic_text_negative``; A1111's "Slerp angle" 0.1 and "Is negative text").
        comments: A1111's "Enable comments" (on by default, as in A1111 1.8+): ``#`` and the rest of its line are
            left out of ``prompt`` and ``negative`` before anything else reads them
            (:func:`sdadapt.prompt_schedule.strip_comments`); ``False`` keeps ``#`` as text.
        prompt, negative: A1111's prompt syntax is read (docs/prompts.md): emphasis, prompt editing
            ``[from:to:when]``, alternation ``[a|b]``, ``AND`` with ``:weight`` (the prompt only), and in
            the prompt ``<lora:NAME:MULT>`` / ``<lora:NAME:TE:UNET>`` / ``<lyco:...>`` tags (files named
            ``NAME.safetensors|.pt|.ckpt`` anywhere under ``lora_dir``, merged at the text-encoder and
            UNet multipliers, after and besides ``loras``) and ``<hypernet:NAME:MULT>`` tags (``NAME.pt``
            or ``.safetensors`` under ``hypernetwork_dir``, after ``hypernetworks``); tags are taken out
            of the text before it is encoded (a file also given in ``loras`` / ``hypernetworks`` at the tag's weight
            is applied once, as the tag; at another weight it is refused: the PNG's infotext writes the options
            as tags, :func:`sdadapt.jobs.generate_prompt_tags.drop_tagged_options`). A prompt without that syntax
            samples as it always did. A LoRA tag's
            ``lbw=PRESET`` / ``lbw=w,w,...`` (hako-mikan's LoRA Block Weight extension) weighs it per block
            (:func:`sdadapt.jobs.generate_prompt_tags.tag_block_weights`; ``lbw_presets``: the extension's preset
            file, added to its built-in presets). ``hires_prompt``'s tags are the hires pass's networks, as A1111's
            ``hr_extra_network_data`` (:func:`sdadapt.jobs.generate_hires.networks_switched`).
        init_image, denoising_strength: img2img (A1111's): the image brought to ``width`` x ``height`` by
            ``resize_mode`` (Lanczos), VAE-encoded and sampled from at ``denoising_strength`` (A1111's default 0.75;
            :mod:`sdadapt.img2img`: A1111's t_enc rule for the samplers on A1111's grids, diffusers' for those run
            as diffusers' schedulers; :func:`sdadapt.img2img.img2img_rule`).
        mask, mask_blur, invert_mask, inpainting_fill, inpainting_mask_weight: A1111's inpaint tab with
            ``init_image`` (:mod:`sdadapt.jobs.generate_inpaint`, :mod:`sdadapt.inpaint`): the mask image (white =
            repaint), its Gaussian blur (``None``: A1111's 4; a pair: A1111's ``mask_blur_x``, ``mask_blur_y``),
            "Inpaint not masked", what the masked area starts as
            (``fill``, ``original``, ``latent-noise``, ``latent-nothing``; ``latent-noise`` with ``noise``: A1111's
            draw for the seed) and an inpainting model's "Inpainting conditioning mask strength" (also img2img
            without a mask: A1111's conditioning under a mask of ones).
        latent_mask: with ``mask``, A1111's ``p.latent_mask``: a mask image of the generation's size taken as it is
            for the fill and the latent blend (the blurred ``mask`` still makes the final overlay and an inpainting
            model's conditioning), as its outpainting scripts set it (:func:`.generate_inpaint.inpaint_inputs`).
        inpaint_full_res, inpaint_full_res_padding: A1111's "Inpaint area: Only masked" and its padding (``None``:
            A1111's 32 pixels): the mask's region inpainted at ``width`` x ``height`` and pasted back into the init
            image, which keeps its size (:mod:`sdadapt.inpaint_crop`); a blank mask: plain img2img, with a warning.
        soft_inpainting: A1111's soft inpainting (:class:`sdadapt.soft_inpainting.SoftInpainting`; ``None`` off) with
            ``mask``: the mask's grey levels kept (an RGBA mask's alpha not thresholded, the latent mask not
            rounded), the original latents blended in at each model call by the mask scheduled by σ with their
            magnitudes kept, no blend after sampling, and the original composited back where the latents barely
            moved (its difference mask in place of the doubled mask blur). Written as A1111 writes it ("Soft
            inpainting enabled: True, Soft inpainting schedule bias: ..."). Not on an EDM model.
        sd_upscale, sd_upscale_overlap, sd_upscale_upscaler: A1111's "SD upscale" script with ``init_image``
            (:mod:`sdadapt.sd_upscale`, :mod:`sdadapt.jobs.generate_tiles`): the image enlarged ``sd_upscale``
            times by the upscaler (``lanczos``, ``nearest``, ``none``), cut into ``width`` x ``height`` tiles
            overlapping by ``sd_upscale_overlap`` pixels (A1111's 64), each tile img2img'd (seeds ``seed + k``; the
            ``count`` upscales start at ``seed + n``), blended back over the overlaps; one PNG per upscale, with the
            first tile's infotext ("SD upscale overlap", "SD upscale upscaler"). Not with ``mask``.
        loopback, loopback_final_denoising, loopback_curve: A1111's "Loopback" script with ``init_image``
            (:mod:`sdadapt.loopback`): img2img ``loopback`` times, each output the next run's init image, the strength
            moving from ``denoising_strength`` to ``loopback_final_denoising`` (A1111's 0.5) along ``loopback_curve``
            (``linear``, ``aggressive``, ``lazy``); ``count`` batches, each from the init image again; every loop's
            image written (``count · loopback`` files) with its own seed (``seed + i``) and strength and the fields
            "Final denoising strength", "Denoising curve". With ``mask``: loops after the first start from
            "original" content, as A1111. Not with ``sd_upscale``.
        outpaint, outpaint_directions, outpaint_mask_blur, outpaint_fill: A1111's "Poor man's outpainting" script
            with ``init_image`` (:mod:`sdadapt.outpainting`): the image on a canvas grown by ``outpaint`` pixels on
            each of ``outpaint_directions`` (rounded up to multiples of 64), the tiles reaching past it inpainted
            with the border masked (blur ``2·outpaint_mask_blur``, content ``outpaint_fill``: A1111's "fill"), seeds
            ``seed + k``, blended back; one PNG, the first tile's infotext. Not with ``mask``, ``count`` above 1 or
            the other scripts.
        img2img_alt: A1111's "img2img alternative test" script with ``init_image``
            (:class:`~sdadapt.inversion.euler_noise.Img2ImgAlternative`, :mod:`sdadapt.jobs.generate_img2img_alt`):
            each image starts from the init image's Euler-inverted noise (its decode prompt and negative, decode
            steps and CFG scale; once per init image), blended with the seed's start noise by its randomness, as the
            script's ``sample_extra`` hands it to img2img; its six fields ("Decode prompt" ... "Sigma Adjustment") in
            the infotext. The sampler, steps, prompt and strength are the run's own: the script's overrides (Euler,
            the decode steps, the decode prompt, strength 1) are ``generate``'s defaults for ``--img2img-alt``. Not
            with ``mask``, a hires pass, ``refiner``, the other scripts, ``noise_multiplier`` or
            ``downcast_alphas_cumprod``; a plain text-to-image UNet only.
        color_correction: A1111's setting "Apply color correction to img2img results to match original colors"
            (:mod:`sdadapt.color_correction`, OpenCV needed): each image of an ``init_image`` run histogram-matched in
            CIELAB to the run's reference, keeping its own luminosity, before the inpainting overlay. The reference is
            A1111's: the first init image as it was encoded (resized; an inpainting run's after its fill, "Only
            masked"'s region) for the whole run — the later tiles of SD upscale and Poor man's outpainting and the
            later images of a folder too, as A1111 keeps ``p.color_corrections`` — and with Loopback the init image
            as it was given. A1111 writes no field for it. The result's ``color_reference`` is the reference used.
        color_reference: with ``color_correction``, a reference (H, W, 3) uint8 Lab to correct against instead of
            the run's own (a script's later run of the same A1111 ``p``: Outpainting mk2's next sides).
        hires_scale, hires_width, hires_height, hires_steps, hires_denoising, hires_upscaler: A1111's txt2img hires
            fix: a second pass at ``hires_scale`` times the size (or ``hires_width`` x ``hires_height``; one of them
            keeps the proportions; both out of proportion: enlarged to cover them and cropped, as A1111),
            ``hires_steps`` (0: ``steps``) at ``hires_denoising`` (0.7) from the first pass's
            latents upscaled by ``hires_upscaler`` (``latent``, ``latent-nearest``, ``latent-antialiased``,
            ``latent-bicubic``..., or ``pixel-lanczos``: decode, Lanczos resize, encode)
            (:func:`sdadapt.jobs.generate_hires.sample_image`).
        resize_mode: A1111's img2img resize mode for ``init_image``: ``just`` (stretch), ``crop`` (crop and resize),
            ``fill`` (resize and fill) (:func:`sdadapt.resize_modes.init_image_pixels`), ``latent`` ("Just resize
            (latent upscale)": encoded at its own size, the latents stretched bilinearly,
            :func:`sdadapt.resize_modes.latent_resize`; not with ``mask``); with ``inpaint_full_res``
            (as in A1111) it applies only when the mask is blank and the run falls back to plain img2img — the region is
            fitted by "Resize and fill" whatever the mode.
        img2img_fix_steps: A1111's setting "With img2img, do exactly the amount of steps the slider specifies".
        hires_prompt, hires_negative, hires_sampler: A1111's hr_prompt, hr_negative_prompt, hr_sampler_name: the
            hires pass's texts and sampler (``None``, and ``""`` for the texts as in A1111: the first pass's).
        hires_schedule: A1111's "Hires schedule type" (hr_scheduler): the hires pass's grid (``None``: ``schedule``'s).
        hires_guidance: Forge's "Hires CFG Scale" (hr_cfg): the hires pass's guidance scale (``None``: ``guidance``'s),
            "Hires CFG Scale" in the infotext when given.
        hires_checkpoint: A1111's "Hires checkpoint" (hr_checkpoint_name): another model (file or folder) that runs
            the hires pass, loaded as ``model`` is (``vae``, ``clip_skip``, ``prediction_type``, ...) and held beside
            it (:mod:`sdadapt.jobs.generate_hires_checkpoint`). The first pass is ``model``'s; a pixel upscaler's
            pixels are decoded by ``model``'s VAE and encoded by the hires model's, a latent upscaler hands the latents
            over as they are (both must share a latent space); the hires pass is conditioned by the hires model's text
            encoders and its image decoded by its VAE, as A1111 loads the checkpoint between the passes. The run's
            networks act on it as A1111's act on whatever model is loaded: ``loras``, the prompt's tags (the hires
            prompt's when it has its own), hypernetworks, embeddings (each must fit it). "Hires checkpoint: NAME
            [HASH]" in the infotext. Not with ``refiner``, ``custom_diffusions``, ``aesthetic``, a LoRA tag's step
            range, Hypertile, token merging, FreeU, PAG or SAG (each patches the one model they were set on).
        vae_encode: how ``init_image`` (img2img, inpainting) and the ``pixel-lanczos`` hires pass's pixels become
            latents: ``"mean"`` (the default) the VAE posterior's mean, the same latents for every seed; ``"sample"``
            a posterior sample drawn per image from ``torch.Generator().manual_seed(seed)`` before that generator
            draws the start noise — diffusers' img2img pipelines' order, whose images it then gives for the seed
            (:func:`sdadapt.jobs.generate_hires.seeded_encoding`); with ``noise`` (A1111's) the start and sampler
            noise stay A1111's and the sample comes from that generator after one discarded draw
            (:func:`sdadapt.img2img.init_generator`). An inpainting model's masked image is sampled too, after the
            start noise (diffusers' inpaint pipelines' order: :func:`sdadapt.jobs.generate_inpaint.sampled_encodings`),
            and so is the grey image of its txt2img conditioning and of its hires pass's (at mask weight 1), drawn
            after that pass's start noise (``StableDiffusionInpaintPipeline`` at strength 1 under a white mask;
            :meth:`sdadapt.diffusers_system.DiffusersSystem.sample`): on an inpainting model ``"sample"`` needs no
            init image. ``"sample"`` is written in the infotext (``VAE encode: sample``). docs/samplers.md, "Encoding the init
            image".
        styles: A1111's saved styles (:func:`sdadapt.prompt_styles.read_styles`) merged into the prompt and negative
            prompt (and the hires pass's own texts) before anything reads them, as A1111's ``setup_prompts``
            (:func:`sdadapt.prompt_styles.styled_prompts`); the infotext has the merged texts, as A1111's.
        jpeg_quality: an ``out`` named *.jpg / *.jpeg / *.webp is written in that format (Pillow), its infotext as
            the EXIF ``UserComment`` (A1111's ``samples_format``: :func:`sdadapt.images.encode_image`) at this
            quality (A1111's "Quality for saved jpeg and avif images", default 80; WebP's too).
        webp_lossless: a WebP ``out`` written lossless (A1111's "Use lossless compression for webp images").
        image_format: with ``init_image`` a folder (the outputs a folder too), the images' format: ``"png"``,
            ``"jpg"`` or ``"webp"`` (A1111's "File format for images").
        loaded: models kept loaded over several runs (:class:`sdadapt.jobs.loaded_models.LoadedModels`: a
            prompts file's lines): ``model`` and ``refiner`` loaded once, each run given its own copy of them.

    Returns:
        ``{"files": [...], "pixels": [...], "infotexts": [...], "seed": int, "subseed": int | None, "seconds": ...,
        "loras": [...], "hypernetworks": [...], "embeddings": [...], "unknown_words": [...]}`` — ``pixels``: each
        file's ``(H, W, 3)`` uint8 image as encoded (before a JPEG's loss), ``infotexts``: each file's text.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before loading anything).
        ValueError: an empty prompt, a bad size (both ``width`` and ``height`` given: checked before
            the model loads, from its configs or file header, :func:`.model_size.model_size_multiple`)
            or sampler, a LoRA or hypernetwork that does not fit the model. WeightFileError: a ``hypernetworks`` file that is no hypernetwork (its kind named).
    """
    from ..errors import OutputError
    from ..formats.files import check_output_file
    from ..images import (
        OUTPUT_SUFFIXES,
        check_output_suffix,
        check_save_settings,
        numbered,
        to_uint8,
    )
    from ..sampler_tables import (
        CHURN_SAMPLERS,
        HIRES_UPSCALER_LABELS,
        LATENT_UPSCALERS,
        NOISE_SCHEDULE_LABELS,
        TIMESTEP_SAMPLERS,
        canonical_choice,
        run_schedule,
        takes_eta_ddim,
    )
    from ..samplers import canonical_sampler, check_karras
    from ..samplers.labels import sampler_schedule_from_label
    from ..samplers.schedules import canonical_schedule as schedule_name
    from ..sampling import unknown_words

    say = log or (lambda line: None)
    if isinstance(hires_upscaler, str) and hires_upscaler not in HIRES_UPSCALER_LABELS:  # (another spelling of a
        from ..sd_upscale import pixel_upscaler

        # name, or an ESRGAN file: sdadapt.esrgan.EsrganUpscaler)
        hires_upscaler = pixel_upscaler("--hires-upscaler", hires_upscaler, HIRES_UPSCALER_LABELS,
                                        device=resolve_device(device))
        if not isinstance(hires_upscaler, str):
            hires_upscaler.model  # noqa: B018 - read now: a file that is no upscaler is refused before the model loads
    if styles:  # A1111's saved styles (setup_prompts): merged in first, the hires pass's own texts too
        from ..prompt_styles import apply_styles, styled_prompts

        prompt, negative = styled_prompts(prompt, negative, styles)
        if hires_prompt:
            hires_prompt = apply_styles(hires_prompt, [style.prompt for style in styles])
        if hires_negative:
            hires_negative = apply_styles(hires_negative, [style.negative_prompt for style in styles])
    if comments and prompt:  # A1111's "Enable comments": before any other reading of the prompts
        from ..prompt_schedule import strip_comments, strip_prompt_comments

        prompt = strip_prompt_comments(prompt, fix="say what the image should show, or pass comments=False "
                                       "(--no-comments) to keep '#'")
        negative = strip_comments(negative)
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is empty; say what the image should show")
    asked_sampler = sampler
    if sampler is None:  # (an EDM model has no ddim: its own scheduler, told from its header before the load)
        from .model_size import model_default_sampler

        sampler = model_default_sampler(model)
        if sampler != "ddim":
            say(f"--model {model}: an EDM model (Playground v2.5, CosXL); sampling with {sampler}, its own scheduler "
                "(--sampler euler or dpmsolver++_sde for the others)")
    try:
        sampler, label_schedule = sampler_schedule_from_label(sampler)
    except ValueError as exc:
        raise ValueError(f"--sampler: {exc}") from None
    if hires_sampler is not None:  # (A1111's label or a name; its grid is --schedule's, as the first pass's)
        try:
            hires_sampler, hires_label_schedule = sampler_schedule_from_label(hires_sampler)
        except ValueError as exc:
            raise ValueError(f"--hires-sampler: {exc}") from None
        if hires_label_schedule is not None:
            raise ValueError(f"--hires-sampler: give the sampler without its {hires_label_schedule!r} grid; the hires "
                             "pass runs on --schedule's grid, as the first pass")
    try:
        check_karras(sampler, karras)
    except ValueError as exc:
        raise ValueError(f"--karras: {exc}") from None
    if schedule is not None and label_schedule is not None and schedule_name(schedule) != label_schedule:
        raise ValueError(f"--schedule {schedule!r} and the sampler label's {label_schedule!r} grid disagree; give one")
    asked_schedule = schedule if schedule is not None else label_schedule
    try:
        schedule = run_schedule(sampler, asked_schedule, karras)
    except ValueError as exc:
        raise ValueError(f"--schedule: {exc}") from None
    skipped: set[str] = set()  # (the rules that skipped a call: their infotext fields)
    uncond_skip = _uncond_skip(skip_early_cfg, ngms, ngms_all_steps, sampler, schedule, seen=skipped.add)
    if pad_conds and pad_conds_v0:
        raise ValueError("--pad-conds and --pad-conds-v0 are two ways to pad (A1111 takes v0 when both are set): "
                         "give one")
    if eta is not None:
        _check_eta(eta, [s for s in (sampler, hires_sampler) if s is not None])
    emphasis = _emphasis_mode(emphasis)
    noise_schedule = canonical_choice("--noise-schedule", noise_schedule, NOISE_SCHEDULE_LABELS)
    if noise_multiplier != 1.0 and (init_image is None or not 0.0 <= noise_multiplier < math.inf):
        raise ValueError(f"--noise-multiplier is A1111's 'Noise multiplier for img2img' (>= 0): it scales the start "
                         f"noise of an --init-image run; got {noise_multiplier}"
                         + ("" if init_image is not None else " without --init-image"))
    if extra_noise and (not 0.0 <= extra_noise < math.inf or (init_image is None and hires_scale is None
                                                                and hires_width is None and hires_height is None)):
        raise ValueError(f"--extra-noise is A1111's 'Extra noise multiplier for img2img and hires fix' (>= 0): added "
                         f"where a pass starts from an image; give --init-image or a hires pass, got {extra_noise}")
    churn = _sigma_churn(sigma_churn, sigma_tmin, sigma_tmax, sigma_noise)
    if eta_ddim is not None:
        ddim_passes = [s for s in (sampler, hires_sampler)
                       if s is not None and takes_eta_ddim(canonical_sampler(s), schedule)]
        if not eta_ddim >= 0 or not ddim_passes:
            raise ValueError(f"--eta-ddim is A1111's 'Eta DDIM' (>= 0) of its own DDIM and DDIM CFG++: --sampler "
                             f"DDIM --schedule automatic, or --sampler 'DDIM CFG++'; got {eta_ddim} with {sampler}"
                             + ("" if schedule is not None or canonical_sampler(sampler) != "ddim"
                                else " and no --schedule"))
    padded: set[str] = set()  # (the paddings a call took: their infotext fields)
    cond_padding = None
    if pad_conds or pad_conds_v0:
        from ..cond_padding import CondPadding

        cond_padding = CondPadding(v0=pad_conds_v0, seen=padded.add)
    asked_hires_schedule, hires_schedule = hires_schedule, None
    if asked_hires_schedule is not None and hires_sampler is None:  # (A1111's Hires schedule type: its own grid)
        hires_sampler = sampler
    if hires_sampler is not None:  # (its grid resolved for it, as A1111 resolves "automatic" per sampler)
        try:
            check_karras(hires_sampler, karras)
            hires_schedule = run_schedule(hires_sampler, asked_hires_schedule or asked_schedule, karras)
            _uncond_skip(skip_early_cfg, ngms, ngms_all_steps, hires_sampler, hires_schedule)
        except ValueError as exc:
            raise ValueError(f"--hires-sampler {hires_sampler}: {exc}") from None
    # the passes' (sampler, grid): the first, and the hires pass when it has a sampler of its own (else the first's)
    passes = [(canonical_sampler(sampler), schedule),
              *([(canonical_sampler(hires_sampler), hires_schedule)] if hires_sampler is not None else [])]
    if churn is not None:  # (A1111 passes it to Euler, Heun and DPM2: refused where no pass can take it)
        from ..samplers.churn import check_churn

        taking = [(name, grid) for name, grid in passes if name in CHURN_SAMPLERS]
        if churn.active and not taking:
            raise ValueError(f"--sigma-churn is A1111's setting for {', '.join(CHURN_SAMPLERS)}; "
                             f"{sampler} takes none")
        for name, grid in taking:
            try:
                check_churn(name, churn, grid)
            except ValueError as exc:
                raise ValueError(f"--sigma-churn: {exc}") from None
    if extra_noise:  # (A1111 adds it on its own img2img path: refused up front where a pass runs diffusers')
        from ..img2img import img2img_rule

        name, grid = passes[0] if init_image is not None else passes[-1]  # (the pass that starts from an image)
        if img2img_rule(name, grid) != "a1111":
            raise ValueError(f"--extra-noise is added where A1111 starts from an image; {name} runs diffusers' "
                             "img2img here: give it a --schedule (automatic is A1111's default) or take an A1111 "
                             "sampler")
    if canonical_sampler(sampler) == "unipc_a1111" and init_image is None and (steps or 25) < 3:
        raise ValueError(f"--sampler UniPC: A1111's UniPC needs at least its order, 3 steps ('UniPC order must be < "
                         f"sampling steps'); got --steps {steps}")
    if count < 1 or (steps is not None and steps < 1):
        raise ValueError(f"--count and --steps must be >= 1, got {count} and {steps}")
    from .generate_seed import RANDOM_SEED, fixed_seed

    asked_seeds = {"--seed": seed, "--subseed": subseed}
    seed, subseed = fixed_seed(seed), fixed_seed(subseed)  # (said once every option is checked, before the load)
    a1111_seeds, schedule_options = _a1111_noise_and_schedule(
        noise=noise, subseed=subseed, subseed_strength=subseed_strength, seed_resize_from=seed_resize_from,
        ensd=ensd, seed=seed, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        beta_alpha=beta_alpha, beta_beta=beta_beta, old_karras_sigmas=old_karras_sigmas,
        always_discard=always_discard_next_to_last_sigma, sgm=sgm_noise_multiplier)
    if sgm_noise_multiplier and init_image is not None:
        raise ValueError("--sgm-noise-multiplier scales the start noise of a txt2img run (A1111's sample); an "
                         "--init-image run starts from the image (its sample_img2img): leave it out")
    if _is_edm_own_grid(model, sampler=sampler, schedule=schedule, karras=karras, schedule_options=schedule_options):
        say(f"--model {model}: an EDM model (Playground v2.5, CosXL) samples on its own σ grid, which is the "
            f"{schedule or 'karras'} grid asked for (as its infotext's Schedule type names it); nothing changes")
        schedule = label_schedule = schedule_options = None
        karras = False
        hires_schedule = None
    _check_edm_request(model, sampler, hires_sampler, asked_sampler=asked_sampler, label_schedule=label_schedule,
                       karras=karras, schedule=schedule, noise=a1111_seeds, schedule_options=schedule_options,
                       refiner=refiner)
    if schedule_options is not None and hires_sampler is not None and (
            hires_schedule is None or canonical_sampler(hires_sampler) in TIMESTEP_SAMPLERS):  # (A1111's: timesteps)
        raise ValueError(f"--hires-sampler {hires_sampler} runs on no σ grid (its own steps), so --sigma-min, "
                         "--sigma-max, --rho, --beta-alpha, --beta-beta and --old-karras-sigmas cannot shape the hires "
                         "pass; choose a hires sampler with a σ grid or leave those settings out")
    target = Path(out)
    batch = None  # (--init-image FOLDER: A1111's img2img batch, sdadapt.jobs.generate_batch)
    if init_image is not None and Path(init_image).is_dir():
        from .generate_batch import batch_images, batch_masks

        if target.suffix.lower() in OUTPUT_SUFFIXES or target.is_file():
            raise OutputError(f"{target}: --init-image {init_image} is a folder (A1111's img2img batch); --out is the "
                              "folder its images are written into, under their own names")
        if loopback is not None or sd_upscale is not None:
            raise ValueError("--init-image FOLDER (A1111's img2img batch) with --loopback / --sd-upscale: A1111 runs "
                             "the script on each image, which is not built here; run it on one image at a time")
        found = batch_images(init_image)  # ((image, mask, latent mask) as a tiled run's sources: no latent mask)
        batch = [(image, image_mask, None) for image, image_mask in zip(found, batch_masks(mask, found))]
    elif mask is not None and Path(mask).is_dir():
        raise ValueError(f"--mask {mask} is a folder of masks for a folder of images (A1111's batch); --init-image "
                         f"{init_image} is one image: give its mask")
    else:
        try:
            check_output_suffix(target, what="generate's output")
        except ValueError as exc:
            raise OutputError(str(exc)) from None
    if f".{image_format.lower()}" not in OUTPUT_SUFFIXES:  # (the names the written suffixes have)
        raise ValueError(f"image_format must be png, jpg, webp or avif, got {image_format!r}")
    if batch is None and image_format.lower() != "png":
        raise ValueError(f"--image-format {image_format}: for a folder of outputs (--init-image FOLDER); one output's "
                         f"format is its name's suffix ({target.name})")
    if batch is not None:
        check_output_suffix(target / f"image.{image_format.lower()}", what="--image-format")
    save = {"quality": jpeg_quality, "lossless": webp_lossless}
    check_save_settings(**save)
    if batch is None:
        check_output_file(target, overwrite=True, suffix=None)  # (a missing folder is made when the first image is written)
    from ..img2img import check_vae_encode

    check_vae_encode(vae_encode)
    hires = _check_img2img_options(sampler, init_image=init_image, denoising_strength=denoising_strength,
                                   hires_scale=hires_scale, hires_width=hires_width, hires_height=hires_height,
                                   hires_steps=hires_steps, hires_denoising=hires_denoising,
                                   hires_upscaler=hires_upscaler, resize_mode=resize_mode,
                                   hires_texts=(hires_prompt, hires_negative, hires_sampler))
    try:
        rescale = as_guidance_rescale(GuidanceRescale(guidance_rescale, guidance_rescale_space))
    except ValueError as exc:
        raise ValueError(f"--guidance-rescale: {exc}") from None
    from ..perturbed_attention import check_pag_scale

    try:
        pag_scale = check_pag_scale(pag_scale)
        pag_adaptive_scale = check_pag_scale(pag_adaptive_scale, what="PAG adaptive scale")
    except ValueError as exc:
        raise ValueError(f"--pag-scale / --pag-adaptive-scale: {exc}") from None
    if (pag_adaptive_scale or pag_layers is not None) and not pag_scale:
        raise ValueError("--pag-adaptive-scale / --pag-layers shape perturbed-attention guidance, which runs only with "
                         "--pag-scale F: add it, or leave them out")
    pag_layers = ("mid",) if pag_layers is None else tuple(pag_layers)
    if not math.isfinite(sag_scale) or not (math.isfinite(sag_blur_sigma) and sag_blur_sigma > 0):
        raise ValueError(f"--sag-scale / --sag-blur-sigma: a finite scale and a blur σ above 0, got {sag_scale} and "
                         f"{sag_blur_sigma}")
    if freeu is not None:
        from ..freeu import FREEU_DEFAULTS

        if len(freeu) not in (0, 4):
            raise ValueError(f"--freeu takes no value (Forge's defaults) or four, B1 B2 S1 S2; got {len(freeu)}")
        freeu = tuple(map(float, freeu)) or FREEU_DEFAULTS
    freeu_window = tuple(float(v) for v in freeu_window)
    if len(freeu_window) != 2 or not all(0.0 <= v <= 1.0 for v in freeu_window):
        raise ValueError(f"--freeu-window is START END, fractions of each pass in [0, 1] (Forge's freeu_start / "
                         f"freeu_end), got {freeu_window}")
    if freeu is None and freeu_window != (0.0, 1.0):
        raise ValueError("--freeu-window is the part of each pass FreeU runs on; add --freeu, or leave it out")
    if dynamic_thresholding is not None and not isinstance(dynamic_thresholding, DynamicThresholding):
        raise TypeError(f"dynamic_thresholding is a DynamicThresholding (sdadapt.dynamic_thresholding), got "
                        f"{type(dynamic_thresholding).__name__}")
    from ..dynamic_thresholding import check_dynamic_thresholding_guidance

    try:
        check_dynamic_thresholding_guidance(dynamic_thresholding, rescale=rescale)
    except ValueError as exc:
        raise ValueError(f"--dynamic-thresholding and --guidance-rescale: {exc}") from None
    if sag_scale and (hypertile_unet or hypertile_unet_second_pass):
        raise ValueError("--sag-scale reads the middle block's self-attention map, which --hypertile-unet cuts into "
                         "tiles: give one")
    try:
        token_merging_ratio = check_token_merging_ratio(token_merging_ratio)
        hr_merging_ratio = check_token_merging_ratio(token_merging_ratio_hr or 0.0) or token_merging_ratio  # (A1111's
    except ValueError as exc:  # get_token_merging_ratio(for_hr=True): the hires one, else the first pass's)
        raise ValueError(f"--token-merging-ratio: {exc}") from None
    if (token_merging_ratio or token_merging_ratio_hr) and (hypertile_unet or hypertile_unet_second_pass):
        raise ValueError("--token-merging-ratio and --hypertile-unet both reshape the UNet's full-resolution "
                         "self-attention (A1111 would tile the merged tokens as if they were the image's): give one")
    if hypertile_unet_second_pass and not hires:
        raise ValueError("--hypertile-unet-second-pass tiles the hires pass's UNet; give --hires-scale or "
                         "--hires-width/--hires-height too (or --hypertile-unet for every pass)")
    if token_merging_ratio_hr and not hires:
        raise ValueError("--token-merging-ratio-hr is the hires pass's token merging; give --hires-scale or "
                         "--hires-width/--hires-height too")
    if hires_guidance is not None and not hires:
        raise ValueError("--hires-guidance is the hires pass's guidance scale (Forge's 'Hires CFG Scale'); give "
                         "--hires-scale or --hires-width/--hires-height too")
    # (A1111's setup_prompts: an empty hires prompt or negative prompt is the first pass's, tags and all)
    hires_prompt, hires_negative = hires_prompt or None, hires_negative or None
    # (otherwise only an inpainting model's own image conditioning is encoded: checked once the model is loaded)
    encodes_pixels = init_image is not None or (hires is not None and hires_upscaler not in LATENT_UPSCALERS)
    if outpaint is not None:
        from ..inpaint import check_inpainting_fill
        from ..outpainting import check_outpainting

        outpaint_directions = check_outpainting(outpaint, outpaint_mask_blur, outpaint_directions)
        check_inpainting_fill(outpaint_fill)
        if (init_image is None or Path(init_image).is_dir() or mask is not None or inpaint_full_res or count != 1
                or loopback is not None or sd_upscale is not None):
            raise ValueError("--outpaint is A1111's img2img script on one --init-image, run once: not with --mask / "
                             "--inpaint-full-res (it masks the new border itself), --count, --loopback, --sd-upscale "
                             "or a folder of images")
    if color_reference is not None and not color_correction:
        raise ValueError("color_reference is --color-correction's reference: pass color_correction=True with it")
    if color_correction:  # (A1111's img2img_color_correction: sdadapt.color_correction)
        if init_image is None:
            raise ValueError("--color-correction matches an img2img run's colours to its init image: give "
                             "--init-image")
        from ..color_correction import _cv2

        _cv2()  # (OpenCV's Lab conversion: said before any model loads)
    if img2img_alt is not None:  # (A1111's "img2img alternative test": sdadapt.jobs.generate_img2img_alt)
        from .generate_img2img_alt import check_img2img_alt_request

        check_img2img_alt_request({
            "init_image": init_image, "mask": mask, "hires_scale": hires_scale, "hires_width": hires_width,
            "hires_height": hires_height, "refiner": refiner, "sd_upscale": sd_upscale, "loopback": loopback,
            "outpaint": outpaint, "noise_multiplier": noise_multiplier,
            "downcast_alphas_cumprod": downcast_alphas_cumprod})
    loop_strengths = loop_curve = None
    if loopback is not None:
        from ..loopback import LOOPBACK_CURVES, check_loopback, loopback_strengths

        loop_curve = LOOPBACK_CURVES[check_loopback(loopback, loopback_final_denoising, loopback_curve)]
        if init_image is None or sd_upscale is not None:
            raise ValueError("--loopback is A1111's img2img script: give --init-image (the first run's image), and "
                             "not with --sd-upscale")
        loop_strengths = loopback_strengths(denoising_strength, loopback_final_denoising, loopback,
                                            curve=loopback_curve)
    fixed_grids = _check_img2img_passes(sampler, steps=steps or 25, init_image=init_image,
                                        denoising_strength=denoising_strength, fix_steps=img2img_fix_steps,
                                        hires=hires is not None, hires_sampler=hires_sampler, hires_steps=hires_steps,
                                        hires_denoising=hires_denoising, schedule=schedule,
                                        hires_schedule=hires_schedule if hires_sampler is not None else schedule,
                                        karras=karras)
    for strength in sorted(set(loop_strengths or ()) - {denoising_strength}):  # (--loopback: each loop's pass too)
        try:
            fixed_grids += _check_img2img_passes(sampler, steps=steps or 25, init_image=init_image,
                                                 denoising_strength=strength, fix_steps=img2img_fix_steps, hires=False,
                                                 hires_sampler=None, hires_steps=0, hires_denoising=0.0,
                                                 schedule=schedule, karras=karras)
        except ValueError as exc:
            raise ValueError(f"--loopback: its loop at denoising strength {strength:g}: {exc}") from None
    step_grids = [{"sampler": canonical_sampler(sampler), "schedule": schedule, "karras": karras, "steps": steps,
                   "steps_option": "--steps", "sampler_option": "--sampler"}] if steps is not None else []
    if hires is not None and hires_steps:
        step_grids.append({"sampler": canonical_sampler(hires_sampler or sampler), "karras": karras,
                           "schedule": hires_schedule if hires_sampler is not None else schedule,
                           "steps": hires_steps, "steps_option": "--hires-steps",
                           "sampler_option": "--hires-sampler" if hires_sampler else "--sampler"})
    from .generate_inpaint import check_inpaint_options

    if soft_inpainting is not None and not isinstance(soft_inpainting, SoftInpainting):
        raise TypeError(f"soft_inpainting is a SoftInpainting (sdadapt.soft_inpainting), got "
                        f"{type(soft_inpainting).__name__}")
    if soft_inpainting is not None and mask is None:
        raise ValueError("--soft-inpainting blends the original back by an inpainting mask: give --mask (and "
                         "--init-image), or leave it out")
    sd_upscaler = None
    if sd_upscale is not None:
        from ..sd_upscale import check_sd_upscale

        sd_upscaler = check_sd_upscale(sd_upscale, sd_upscale_overlap, sd_upscale_upscaler,
                                       device=resolve_device(device))
        if not isinstance(sd_upscaler, str):
            sd_upscaler.model  # noqa: B018 - read now: a file that is no upscaler is refused before the model loads
        if init_image is None or mask is not None:
            raise ValueError("--sd-upscale is A1111's img2img script: give --init-image (the image to upscale) and no "
                             "--mask")
    if resize_mode == "latent" and mask is not None:
        raise ValueError("--resize-mode latent (A1111's 'Just resize (latent upscale)') with --mask: A1111 resizes "
                         "the mask by 'Resize and fill' but the image's latents by stretching, and its final overlay "
                         "fails for an image of another size; use --resize-mode just / crop / fill")
    if batch is not None:  # (A1111's batch: an image without its mask is skipped, with a warning)
        from .generate_batch import batch_outputs

        for image, found, _ in batch:
            if mask is not None and found is None:
                say(f"warning: --mask {mask} has no mask named as {image.name}; skipping it, as A1111's batch does")
        batch = [item for item in batch if mask is None or item[1] is not None]
        if not batch:
            raise ValueError(f"--mask {mask}: no mask is named as an image of --init-image {init_image} (a mask "
                             "IMAGE.* beside each IMAGE.png, or one mask for all)")
    for image_file, mask_file, _ in batch or [(init_image, mask, None)]:  # (every image and mask, before loading)
        check_inpaint_options(mask=mask_file, init_image=image_file, mask_blur=mask_blur, invert_mask=invert_mask,
                              inpainting_fill=inpainting_fill, inpainting_mask_weight=inpainting_mask_weight,
                              inpaint_full_res=inpaint_full_res, inpaint_full_res_padding=inpaint_full_res_padding,
                              hires=hires is not None)
        if batch is not None:
            from ..resize_modes import open_init_image

            open_init_image(image_file)  # (an unreadable image refused now, naming it: A1111 skips it)
    if outpaint is not None:  # (the script sets p.mask_blur = 2·its blur and p.inpainting_fill to its own)
        mask_blur, inpainting_fill = 2.0 * outpaint_mask_blur, outpaint_fill
    from .generate_inpaint import blur_sides

    blur_xy = blur_sides(4.0 if mask_blur is None else mask_blur)
    if latent_mask is not None and (mask is None or batch is not None or not Path(latent_mask).is_file()):
        raise ValueError(f"latent_mask {latent_mask}: A1111's separate latent mask of one --init-image's --mask: "
                         + ("no such file" if mask is not None and batch is None else "give the image and its mask"))
    images = count * (loopback or 1)  # (--loopback: every loop's image is written)
    files = [target] if images == 1 else [numbered(target, i) for i in range(images)]
    if batch is not None:  # (each image's outputs under its own name in the --out folder)
        files = [file for group in batch_outputs([image for image, *_ in batch], target, count, suffix=image_format)
                 for file in group]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists; pass --overwrite to replace it")
    from ..formats.files import check_name_room

    check_name_room(max(files, key=lambda f: len(os.fsencode(f.name))), output=target)  # (the longest name written)
    from .generate_prompt_tags import prompt_tag_files, read_lbw_presets

    for option, folder in (("--lora-dir", lora_dir), ("--hypernetwork-dir", hypernetwork_dir),
                           ("--embeddings-dir", embeddings_dir)):  # (said before the model's load, tags or not)
        if folder is not None and not Path(folder).is_dir():
            from ..errors import InputError

            raise InputError(f"{option} {folder}: no such folder")
    infotext_texts = (prompt, negative, hires_prompt, hires_negative)  # (tags kept: A1111's infotext, jobs.infotext)
    presets = None if lbw_presets is None else read_lbw_presets(lbw_presets)
    prompt, tag_loras, tag_hypernetworks = prompt_tag_files(prompt, lora_dir=lora_dir,
                                                            hypernetwork_dir=hypernetwork_dir, log=say,
                                                            lbw_presets=presets)
    hires_tag_loras = tag_loras
    if hires_prompt is not None:  # A1111 parses the hires prompt's extra networks too (hr_extra_network_data)
        hires_prompt, hires_tag_loras, hires_tag_hypernetworks = prompt_tag_files(
            hires_prompt, lora_dir=lora_dir, hypernetwork_dir=hypernetwork_dir, log=say, lbw_presets=presets)
        if hires_tag_hypernetworks != tag_hypernetworks:
            raise ValueError("--hires-prompt: its <hypernet:> tags differ from --prompt's; A1111 would switch "
                             "hypernetworks for the hires pass, which is not done here: give both the same ones")
        if _networks(hires_tag_loras) != _networks(tag_loras) and custom_diffusions:
            raise ValueError("--hires-prompt: its <lora:> tags differ from --prompt's, and switching LoRAs for the "
                             "hires pass would undo --custom-diffusion's weights too; give both the same tags or "
                             "leave out --custom-diffusion")
    stepped = [item for item in (*tag_loras, *hires_tag_loras) if item.steps is not None]
    if stepped:  # (the extension's start= / stop= / step=: sdadapt.jobs.generate_lbw_steps)
        from ..samplers import canonical_sampler as _canonical
        from .generate_lbw_steps import check_step_range_sampler

        check_step_range_sampler(_canonical(sampler), stepped[0].tag)
        if hires is not None:  # (the hires pass: generate_lbw_steps.StepSwitchedLoRAs.next_pass)
            if hires_sampler is not None:
                check_step_range_sampler(_canonical(hires_sampler), stepped[0].tag)
            if _networks(hires_tag_loras) != _networks(tag_loras) or (
                    [item.steps for item in hires_tag_loras] != [item.steps for item in tag_loras]):
                odd = next((item for item in hires_tag_loras if item.steps is not None), stepped[0])
                raise ValueError(f"prompt tag {odd.tag}: start= / stop= / step= with a --hires-prompt whose tags or "
                                 "ranges differ is not built for the hires pass (the extension reads the ranges of "
                                 "the first pass's prompt only, by LoRA name); give --hires-prompt the same tags")
    if hires_checkpoint is not None:  # (A1111's "Hires checkpoint": sdadapt.jobs.generate_hires_checkpoint)
        from .generate_hires_checkpoint import check_hires_checkpoint_request

        check_hires_checkpoint_request({
            "refiner": refiner, "custom_diffusions": custom_diffusions, "aesthetic": aesthetic,
            "hypertile_unet": hypertile_unet, "hypertile_vae": hypertile_vae,
            "hypertile_unet_second_pass": hypertile_unet_second_pass, "token_merging_ratio": token_merging_ratio,
            "token_merging_ratio_hr": token_merging_ratio_hr, "freeu": freeu, "pag_scale": pag_scale,
            "sag_scale": sag_scale}, hires=hires is not None, stepped_tag=stepped[0].tag if stepped else None)
        if not Path(hires_checkpoint).exists():  # (A1111's name for it, "NAME [HASH]", found beside the model)
            from .models import checkpoint_by_name

            hires_checkpoint = checkpoint_by_name(str(hires_checkpoint), beside=model, option="--hires-checkpoint")
    parsed = _checked_specs("--lora", loras, folders=True)  # (a folder: a peft adapter)
    # (a file given both as an option and as a prompt tag at the same weight — an sdadapt PNG's prompt pasted back,
    # whose infotext writes the options as tags — is applied once: generate_prompt_tags.drop_tagged_options)
    from .generate_prompt_tags import drop_tagged_options

    tag_passes = [tag_loras, *([hires_tag_loras] if hires is not None and hires_tag_loras is not tag_loras else [])]
    parsed = drop_tagged_options(
        "--lora", parsed, [[(item.file, (item.te, item.unet, item.block_weights, item.steps, item.dyn), item.tag)
                            for item in items] for items in tag_passes],
        option_weights=lambda scale: (scale, scale, None, None, None), log=say)
    hypernetwork_options = drop_tagged_options(
        "--hypernetwork", _checked_specs("--hypernetwork", hypernetworks),
        [[(path, (strength,), f"<hypernet:{path.stem}:{strength!r}>") for path, strength in tag_hypernetworks]],
        option_weights=lambda scale: (scale,), log=say)
    hypernetwork_specs = hypernetwork_options + tag_hypernetworks
    custom_specs = _checked_specs("--custom-diffusion", custom_diffusions, folders=True)
    for path in embeddings:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--embedding {path}: no such file")
    from ..text_chunks import chunk_count
    from .generate_hypernetworks import (
        inject_hypernetwork_option,
        read_hypernetwork_option,
    )

    hypernetwork_modules = [read_hypernetwork_option(path) for path, _ in hypernetwork_specs]  # before the model

    chunk_count(max_token_length)  # 75, 150 or 225
    if refiner is not None:  # (the base -> refiner handoff: sdadapt.jobs.generate_refiner)
        from .generate_refiner import refiner_cutoff

        refiner_cutoff(refiner_switch_at)
        refused = [name for name, given in (
            ("--aesthetic", aesthetic is not None), ("--custom-diffusion", bool(custom_specs))) if given]
        if refused:  # (A1111 cannot either: aesthetic gradients and Custom Diffusion are CLIP-L methods of SD1/SD2)
            raise ValueError(f"--refiner: not with {', '.join(refused)}: aesthetic gradients and Custom Diffusion "
                             "personalise CLIP-L / an SD1-SD2 UNet, and neither the SDXL base nor its refiner takes "
                             "them here (nor in A1111); leave those out or --refiner")
        from .generate_refiner import check_refiner_hires_pass

        if refiner_hires_pass is not None:
            check_refiner_hires_pass(refiner_hires_pass)
        if refiner_hires_pass is not None and hires is None:
            raise ValueError("--refiner-hires-pass picks the hires-fix pass the refiner works in; add --hires-scale or "
                             "--hires-width/--hires-height, or leave it out")
        if not Path(refiner).exists():  # (A1111's name for it, "NAME [HASH]", found beside the model)
            from .models import checkpoint_by_name

            refiner = checkpoint_by_name(str(refiner), beside=model, option="--refiner")
    elif refiner_hires_pass is not None:
        raise ValueError("--refiner-hires-pass picks the hires-fix pass the SDXL refiner works in; add --refiner, or "
                         "leave it out")
    elif refiner_switch_by_steps:
        raise ValueError("--refiner-switch-by-steps counts the SDXL refiner's switch in sampling steps; add --refiner, "
                         "or leave it out")
    if refiner_empty_negative not in ("encoded", "zeros"):
        raise ValueError(f"--refiner-empty-negative must be 'encoded' (diffusers' refiner) or 'zeros' (A1111), got "
                         f"{refiner_empty_negative!r}")
    if aesthetic is not None and max_token_length != 75:
        raise ValueError(f"--aesthetic personalises the text encoder on one 75-token CLIP window; leave out "
                         f"--max-token-length {max_token_length}")
    if aesthetic is not None:
        from .aesthetic import check_aesthetic_request

        check_aesthetic_request(model, aesthetic, clip=aesthetic_clip)
    if width is not None and height is not None:  # a size the model cannot make costs no model load
        from ..diffusers_system import check_image_size
        from .model_size import model_size_multiple

        multiple = model_size_multiple(model)
        if multiple is not None:
            check_image_size(width, height, multiple=multiple)  # (the message the loaded model's sample gives)
    for (option, asked), drawn in zip(asked_seeds.items(), (seed, subseed)):
        if asked == RANDOM_SEED:  # A1111's -1: a random seed (processing.get_fixed_seed), said to make it again
            say(f"{option} -1: drew {drawn} (pass {option} {drawn} to make the same image again)")
    start = time.perf_counter()
    load = load_system if loaded is None else loaded.load  # (a prompts file's lines: loaded once, each a copy)
    system = load(model, device=resolve_device(device), tokenizer=tokenizer, prediction_type=prediction_type,
                  clip_skip=clip_skip, max_token_length=max_token_length, vae=vae, log=say, clip_stats=clip_stats)
    _a1111_clip_skip(system, model, clip_skip, say)
    from .generate_inpaint import _is_inpainting_model

    if vae_encode == "sample" and not encodes_pixels and not _is_inpainting_model(system):
        raise ValueError("--vae-encode sample draws the VAE encoding of an init image or of an inpainting model's "
                         f"image conditioning: {model} is no inpainting model, so it needs --init-image, or a hires fix "
                         "with --hires-upscaler pixel-lanczos (a latent upscaler encodes nothing); leave it out "
                         "otherwise")
    if guidance is None and getattr(system, "edm", None) is not None:  # (said, and one scale for both passes)
        from ..sampling import default_guidance

        guidance = default_guidance(system, sampler)  # (Playground v2.5: its model card's, as the library's default)
        say(f"--model {model}: an EDM model (Playground v2.5, CosXL); guidance {guidance:g}, the EDM default for "
            f"{sampler}, Playground v2.5's model card's (--guidance to change)")
    if (aesthetic is not None or custom_specs) and getattr(system, "is_refiner", False):
        raise ValueError(f"{model} is the SDXL refiner (OpenCLIP-G alone, no CLIP-L): "
                         f"{'--aesthetic' if aesthetic is not None else '--custom-diffusion'} needs a model with the "
                         "first text encoder (SD1/SD2; --custom-diffusion SD1/SD2 only); leave it out with the refiner")
    if emphasis != "Original":  # (A1111's opts.emphasis: every text encoder it hijacks)
        if not hasattr(system, "emphasis"):
            raise ValueError(f"--emphasis {emphasis}: {model} reads no emphasis itself (the toy model drops the "
                             "brackets' weights); leave it out")
        system.emphasis = emphasis
    if noise_schedule != "default" and not hasattr(system, "rescale_to_zero_terminal_snr"):
        raise ValueError(f"--noise-schedule {noise_schedule!r}: {model} has no ᾱ schedule to rescale (the toy model); "
                         "give a Stable Diffusion model or leave it out")
    if rescale is not None and rescale.space == "v":  # (each pass's sampler and grid against the model's prediction)
        from ..samplers import guidance_rescale_for_run

        for name, grid in passes:
            try:
                guidance_rescale_for_run(rescale, name, schedule=grid,
                                         prediction_type=getattr(system, "prediction_type", "epsilon"),
                                         edm=getattr(system, "edm", None) is not None)
            except ValueError as exc:
                raise ValueError(f"--guidance-rescale-space v: {exc}") from None
    if downcast_alphas_cumprod:  # (each pass's sampler and grid; the schedules A1111 downcasts before)
        from ..samplers import check_downcast_run

        try:
            if getattr(system, "edm", None) is not None:
                raise ValueError(f"{model} is an EDM model (Playground v2.5, CosXL), whose σ do not come from ᾱ")
            if noise_schedule == "zero-terminal-snr" or getattr(system, "zero_terminal_snr", False):
                raise ValueError("A1111 rescales the halved ᾱ to zero terminal SNR in float16, which sdadapt does "
                                 "not: leave out one of them")
            for name, grid in passes:
                check_downcast_run(name, schedule=grid)
        except ValueError as exc:
            raise ValueError(f"--downcast-alphas-cumprod: {exc}") from None
    if soft_inpainting is not None and getattr(system, "edm", None) is not None:
        raise ValueError(f"--soft-inpainting is A1111's; {model} is an EDM model (Playground v2.5, CosXL), whose samplers "
                         "blend as diffusers' inpaint pipeline: leave it out")
    if dynamic_thresholding is not None:  # (each pass's sampler and grid it runs on)
        from ..dynamic_thresholding import check_dynamic_thresholding_run

        own_hires_plain = dynamic_thresholding.wraps_first_sampler_only and len(passes) > 1
        try:
            for name, grid in passes[:1] if own_hires_plain else passes:
                check_dynamic_thresholding_run(name, schedule=grid, edm=getattr(system, "edm", None) is not None)
        except ValueError as exc:
            raise ValueError(f"--dynamic-thresholding: {exc}") from None
        if own_hires_plain:
            say(f"--dynamic-thresholding: the hires pass's own sampler ({hires_sampler}) runs plain CFG, as A1111's "
                "extension leaves it (it wraps the first pass's sampler only; leave out --hires-sampler to "
                "threshold both passes)")
    refiner_system = None
    if refiner is not None:  # (both held at once: the base's latents go to the refiner undecoded)
        from .generate_refiner import check_refiner_pair

        refiner_system = load(str(refiner), device=resolve_device(device), prediction_type=prediction_type,
                              clip_skip=clip_skip, max_token_length=max_token_length, vae=vae, log=say)
        _a1111_clip_skip(refiner_system, refiner, clip_skip, say)
        check_refiner_pair(system, refiner_system)
        refiner_system.emphasis = emphasis
        say(f"refiner {refiner}: takes over at {refiner_switch_at:g} of the "
            f"{'sampling steps' if refiner_switch_by_steps else 'schedule'}")
    # (A1111's Refiner takes any checkpoint: one that is not the SDXL refiner gets the run's networks, as A1111's act
    # on whatever model is loaded; the SDXL refiner has no layer an SDXL base's LoRA names, nor its text widths)
    model_refiner = refiner_system is not None and not getattr(refiner_system, "is_refiner", False)
    hires_system = None
    if hires_checkpoint is not None:  # (both held: A1111 loads it between the passes, the first model each batch)
        from .generate_hires_checkpoint import check_hires_pair

        hires_system = load(str(hires_checkpoint), device=resolve_device(device), tokenizer=tokenizer,
                            prediction_type=prediction_type, clip_skip=clip_skip, max_token_length=max_token_length,
                            vae=vae, log=say, clip_stats=clip_stats)
        _a1111_clip_skip(hires_system, hires_checkpoint, clip_skip, say)
        check_hires_pair(system, hires_system, upscaler=hires_upscaler, hires_model=hires_checkpoint)
        hires_system.emphasis = emphasis
        say(f"hires checkpoint {hires_checkpoint}: runs the hires pass")
    run_scope = contextlib.ExitStack()  # (what the run changes on its models, taken off at its end)
    if tiling:  # (A1111's apply_circular, before the init image is encoded: every Conv2d of the models it runs)
        from ..tiling import circular_padding, models_of

        run_scope.enter_context(circular_padding(*(module for held in (system, refiner_system, hires_system)
                                                   if held is not None for module in models_of(held))))
    if a1111_upsampling:  # (A1111's TorchHijackForUnet is LDM's and SGM's torch: every UNet it runs)
        from ..a1111_upsampling import A1111Upsampling

        for holder in (system, refiner_system, hires_system):
            if holder is not None:
                try:
                    run_scope.enter_context(A1111Upsampling(getattr(holder, "unet", None) or torch.nn.Module()))
                except ValueError as exc:
                    raise ValueError(f"--a1111-upsampling: {exc}") from None
    if vae_tiling:  # (diffusers' own tiled decode and encode, for the run)
        from ..vae_tiling import tiled_vae

        run_scope.enter_context(tiled_vae(system, refiner_system, hires_system))
    tiles, tile_settings = None, None
    if hypertile_unet or hypertile_vae or hypertile_unet_second_pass:  # (A1111's Hypertile script's process())
        from ..hypertile import HYPERTILE_DEFAULTS, Hypertile, HypertileSettings

        def settings_of(value: object, default: HypertileSettings) -> HypertileSettings:
            return value if isinstance(value, HypertileSettings) else dataclasses.replace(default, enabled=bool(value))

        tile_settings = (settings_of(hypertile_unet, HYPERTILE_DEFAULTS[0]),
                         settings_of(hypertile_vae, HYPERTILE_DEFAULTS[1]))
        try:
            if refiner_system is not None:
                raise ValueError("A1111 tiles the model it has loaded, and its refiner is loaded in the middle of the "
                                 "run: leave Hypertile out with --refiner")
            tiles = run_scope.enter_context(Hypertile(getattr(system, "unet", None), getattr(system, "vae", None),
                                                      sdxl=bool(getattr(system, "is_sdxl", False))))
        except ValueError as exc:
            raise ValueError(f"--hypertile-unet / --hypertile-vae: {exc}") from None
    merging = None
    if token_merging_ratio or token_merging_ratio_hr:  # (A1111's apply_token_merging: tomesd on the loaded model)
        from ..token_merging import TokenMerging

        try:
            if refiner_system is not None:
                raise ValueError("A1111 patches the model it has loaded, and its refiner is loaded in the middle of "
                                 "the run: leave token merging out with --refiner")
            if getattr(system, "unet", None) is None:
                raise ValueError(f"{model} has no SD UNet (the toy model)")
            merging = run_scope.enter_context(TokenMerging(system.unet, ratio=token_merging_ratio))
        except ValueError as exc:
            raise ValueError(f"--token-merging-ratio: {exc}") from None
    pag = sag = None  # (each hooked on the base UNet for the run, its hooks taken off with run_scope)
    if pag_scale:  # (first in line on each layer, before ToMe's / Hypertile's)
        from ..perturbed_attention import PerturbedAttentionGuidance

        pag = _on_base_unet(run_scope, "--pag-scale", system, refiner_system, model, lambda unet: (
            PerturbedAttentionGuidance(unet, scale=pag_scale, adaptive_scale=pag_adaptive_scale, layers=pag_layers)))
    if freeu is not None:  # (Forge's process_before_every_sampling: the UNet patched for every pass)
        from ..freeu import FreeU

        changed = _on_base_unet(run_scope, "--freeu", system, refiner_system, model, lambda unet: FreeU(
            unet, b1=freeu[0], b2=freeu[1], s1=freeu[2], s2=freeu[3], version=freeu_version, window=freeu_window))
        if not changed.skips:
            raise ValueError(f"--freeu: {model}'s UNet has no skip connection FreeU {freeu_version} changes (v2 acts "
                             "where the decoder is 2 or 4 times its first width; diffusers' needs all four factors "
                             "above 0)")
    if sag_scale:
        from ..self_attention_guidance import SelfAttentionGuidance, check_sag_run

        try:  # (each pass's sampler and grid first)
            for name, grid in passes:
                check_sag_run(name, schedule=grid, edm=getattr(system, "edm", None) is not None)
        except ValueError as exc:
            raise ValueError(f"--sag-scale: {exc}") from None
        sag = _on_base_unet(run_scope, "--sag-scale", system, refiner_system, model, lambda unet: SelfAttentionGuidance(
            unet, scale=sag_scale, blur_sigma=sag_blur_sigma, alphas_cumprod=system.alphas_cumprod,
            prediction_type=getattr(system, "prediction_type", "epsilon")))
    if noise_schedule == "zero-terminal-snr":  # (A1111's apply_alpha_schedule_override: every model it samples)
        for holder in (system, refiner_system, hires_system):
            if holder is not None:
                holder.rescale_to_zero_terminal_snr()
    if downcast_alphas_cumprod:  # (apply_alpha_schedule_override: ᾱ halved, each model it samples, for the run)
        from ..samplers.sigma_space import downcast_alphas_cumprod as halved

        for holder in (system, refiner_system, hires_system):
            if holder is not None:
                original = holder.alphas_cumprod
                try:
                    holder.alphas_cumprod = halved(original)
                except ValueError as exc:
                    raise ValueError(f"--downcast-alphas-cumprod: {model}: {exc}") from None
                run_scope.callback(setattr, holder, "alphas_cumprod", original)
    if aesthetic_score is not None or negative_aesthetic_score is not None:  # (the SDXL refiner's time_ids)
        if refiner_system is not None:
            system, refiner_system = refiner_system, system  # (set on the refiner, below; swapped back after)
        if not getattr(system, "is_refiner", False):
            raise ValueError(f"--aesthetic-score / --negative-aesthetic-score: {model} is not the SDXL refiner; only the "
                             "refiner conditions on an aesthetic score (diffusers' requires_aesthetics_score): leave them out")
        system.aesthetic_score = system.aesthetic_score if aesthetic_score is None else float(aesthetic_score)
        system.negative_aesthetic_score = (system.negative_aesthetic_score if negative_aesthetic_score is None
                                           else float(negative_aesthetic_score))
        if refiner_system is not None:
            system, refiner_system = refiner_system, system
    if refiner_empty_negative == "zeros":  # (A1111's force_zero_negative_prompt on the refiner too)
        holder = refiner_system if refiner_system is not None else system
        if not getattr(holder, "is_refiner", False):
            raise ValueError(f"--refiner-empty-negative zeros: {refiner if refiner_system is not None else model} is "
                             "not the SDXL refiner; the SDXL base zeros an empty negative prompt already, the other "
                             "models encode it: leave it out")
        holder.zero_empty_negative = True
    _check_step_counts(system, step_grids=step_grids, fixed_grids=fixed_grids)
    if pad_conds:  # (A1111 pads with the states of "" it encoded at load, before any LoRA: kept before the merges)
        for holder in (system, refiner_system, hires_system):
            if hasattr(holder, "keep_empty_prompt_states"):
                holder.keep_empty_prompt_states()
    applied = []
    for path, scale in parsed:
        applied.append(_apply_lora_file(system, path, scale))
        say(f"applied {path} at {scale:g} ({_layers_text(applied[-1])})")
    # the hires pass switches the tag LoRAs when its prompt names others (A1111 activates hr_extra_network_data):
    # only then are the undo handles (each a copy of the weights it changed) and the files read kept for the run
    other_hires_tags = hires is not None and _networks(hires_tag_loras) != _networks(tag_loras)
    switch_networks = other_hires_tags and hires_system is None  # (a hires checkpoint gets the hires tags itself)
    tag_handles: list | None = [] if switch_networks else None
    tag_files: dict | None = {} if switch_networks else None

    step_parts: list = []  # (a tag's step range, its UNet groups): merged per model call by StepSwitchedLoRAs

    def apply_tag_loras(items, handles: list | None, *, quiet: bool = False, target=None) -> list:
        reports = []
        for item in items:
            report, unet_groups = _apply_lora_parts(system if target is None else target, item.file, item.te,
                                                    unet_scale=item.unet, option=item.tag,
                                                    block_weights=item.block_weights, handles=handles,
                                                    files=tag_files, hold_unet=item.steps is not None, dyn=item.dyn)
            reports.append(report)
            if item.steps is not None:
                step_parts.append((item.steps, unet_groups))
                reports[-1]["steps"] = {"start": item.steps.start, "stop": item.steps.stop}
            if not quiet:
                blocks = ("" if item.block_weights is None else
                          ", blocks " + ",".join(f"{w:g}" for w in item.block_weights))
                blocks += f", dyn {item.dyn}" if item.dyn is not None else ""
                say(f"applied {item.file} ({item.tag}) at text encoder {item.te:g}, UNet {item.unet:g}{blocks} "
                    f"({_layers_text(reports[-1])})")
        return reports

    applied.extend(apply_tag_loras(tag_loras, tag_handles))
    def loras_on(second, items, where: str) -> None:  # (A1111's networks act on whatever model is loaded)
        for path, scale in parsed:
            report = _apply_lora_file(second, path, scale)
            say(f"applied {path} at {scale:g} on {where} ({_layers_text(report)})")
        for report, item in zip(apply_tag_loras(items, None, quiet=True, target=second), items):
            say(f"applied {item.file} ({item.tag}) on {where} ({_layers_text(report)})")

    if model_refiner:  # (the first pass's tags on the refiner)
        if other_hires_tags or step_parts:
            raise ValueError("--refiner: a model refiner here gets the prompt's LoRA tags as they are; a hires prompt "
                             "with tags of its own, or a tag's start= / stop= / step=, switches LoRAs on --model "
                             "only: leave those out with --refiner")
        loras_on(refiner_system, tag_loras, "the refiner")
    if hires_system is not None:  # (the hires pass's tags on the hires checkpoint)
        loras_on(hires_system, hires_tag_loras if other_hires_tags else tag_loras, "the hires checkpoint")
    step_switch = freeu_steps = None
    if freeu is not None and freeu_window != (0.0, 1.0):  # (Forge's denoiser_callback: FreeU per model call)
        from ..freeu import FreeUSteps

        freeu_steps = FreeUSteps(changed, sampler=canonical_sampler(sampler))
    if step_parts:
        from .generate_lbw_steps import StepSwitchedLoRAs

        step_switch = StepSwitchedLoRAs(step_parts, sampler=canonical_sampler(sampler))
        say("UNet parts switched per model call by start= / stop= / step=: "
            + ", ".join(item.tag for item in tag_loras if item.steps is not None))
    from .generate_call_hooks import model_call_hooks

    model_calls = model_call_hooks(step_switch, freeu_steps)
    hypernetwork_report = []
    for index, ((path, strength), module) in enumerate(zip(hypernetwork_specs, hypernetwork_modules)):
        unet_device = next(system.unet.parameters()).device
        handle = inject_hypernetwork_option(system, module.to(unet_device), path=path, strength=strength, index=index)
        hypernetwork_report.append({"file": str(path), "strength": strength, "layers": len(handle.layers),
                                    "unused_widths": list(handle.unused_widths)})
        unused = f"; widths {list(handle.unused_widths)} unused" if handle.unused_widths else ""
        say(f"hypernetwork {path} at {strength:g} ({plural(len(handle.layers), 'layer')}{unused})")
        if hires_system is not None:  # (and on the hires checkpoint's: A1111 hooks every loaded model's attention)
            on_hires = inject_hypernetwork_option(hires_system, module.to(unet_device), path=path, strength=strength,
                                                  index=index)
            hypernetwork_report[-1]["hires_checkpoint_layers"] = len(on_hires.layers)
        if refiner_system is not None:  # (A1111's loaded hypernetworks act on the refiner's attention too)
            from .generate_hypernetworks import inject_refiner_hypernetwork

            on_refiner = inject_refiner_hypernetwork(refiner_system, module, strength=strength, index=index)
            hypernetwork_report[-1]["refiner_layers"] = 0 if on_refiner is None else len(on_refiner.layers)
            say(f"hypernetwork {path} on the refiner: "
                + ("no layer of its widths" if on_refiner is None else plural(len(on_refiner.layers), 'layer')))
    handles, custom_report = [], []
    for path, scale in custom_specs:
        custom = _apply_custom_diffusion_file(system, path, scale)
        handles.extend(custom.embeddings)
        custom_report.append({"file": str(path), "scale": scale, "layers": len(custom.layers),
                              "tokens": [h.name for h in custom.embeddings]})
        tokens = ", ".join(repr(h.name) for h in custom.embeddings) or "none"
        say(f"custom diffusion {path} at {scale:g} ({plural(len(custom.layers), 'layer')}; tokens {tokens})")
    embedding_files: dict[str, Path] = {}  # (name -> file: A1111's "TI hashes", toy hints)
    for path in embeddings:
        handles.append(_inject_embedding_file(system, Path(path)))
        say(f"embedding {handles[-1].name!r} from {path}")
        embedding_files[handles[-1].name] = Path(path)
    if embeddings_dir is not None:
        from .generate_prompt_tags import prompt_embedding_files

        given = {handle.name.lower() for handle in handles}
        for path in prompt_embedding_files([prompt, negative, hires_prompt, hires_negative], embeddings_dir, tokenize=_token_ids(system), log=say):
            if path.stem.lower() in given:  # (--embedding FILE named it already)
                continue
            try:
                handles.append(_inject_embedding_file(system, path))
            except ValueError as exc:  # (A1111 skips an embedding of another model's width)
                say(f"warning: {exc}; skipped, as A1111 skips it")
                continue
            say(f"embedding {handles[-1].name!r} from {path}")
            embedding_files[handles[-1].name] = Path(path)
    # (the embeddings a LoRA file bundles — OneTrainer's, A1111's bundle_emb.*: loaded with it, as A1111's networks.py
    # does, unless an embedding of that name is loaded already: A1111 keeps the one it has)
    from ..formats.bundled_embeddings import bundled_embeddings

    for path in dict.fromkeys([Path(p) for p, _ in parsed] + [item.file for items in tag_passes for item in items]):
        for embedding in bundled_embeddings(path) if path.is_file() else ():
            if embedding.name.lower() in {handle.name.lower() for handle in handles}:
                say(f"embedding {embedding.name!r} bundled in {path}: one of that name is loaded already; kept that one")
                continue
            handles.append(_inject_embedding(system, embedding, path=f"{path} (bundled)"))
            say(f"embedding {handles[-1].name!r} bundled in {path}")
            embedding_files[handles[-1].name] = path
    if refiner is not None and not model_refiner and not all(getattr(handle, "matched_by_ids", False)
                                                             for handle in handles):
        # (the texts go to both models as written: an embedding spelled out as placeholder tokens for the base's
        # tokenizers would reach the refiner as those words; generate's SDXL embeddings are matched by ids)
        raise ValueError("--refiner: an embedding here is spelled out as placeholder tokens for the base, which the "
                         "refiner would read as words; leave out the embedding or --refiner")
    for second, option in ((refiner_system if model_refiner else None, f"--refiner {refiner}"),
                           (hires_system, f"--hires-checkpoint {hires_checkpoint}")):
        if second is not None and handles:  # (a second model reads the same texts: the same embeddings, each fitting
            # it and spelled the same; A1111 loads its embeddings folder for each model it loads)
            from .second_model import embeddings_on_second_model

            embeddings_on_second_model(second, embedding_files, handles,
                                       texts=[prompt, negative, hires_prompt, hires_negative],
                                       inject=_inject_embedding_file, expand=_expanded, option=option)
    text, negative_text = _expanded(prompt, handles), _expanded(negative, handles)
    alt_run = None
    if img2img_alt is not None:  # (its decode texts read as A1111's get_learned_conditioning reads them, raw)
        from .generate_img2img_alt import Img2ImgAltRun, check_img2img_alt_model

        check_img2img_alt_model(system, model)
        alt_run = Img2ImgAltRun(system, img2img_alt, texts=(_expanded(img2img_alt.decode_prompt, handles) or "",
                                                            _expanded(img2img_alt.decode_negative, handles) or ""),
                                log=say)
    from ..prompt_guidance import plan_prompt, reads_emphasis
    from ..prompt_schedule import schedule_steps

    clean = None
    if not reads_emphasis(system):  # (the toy: A1111 emphasis would reach it as unknown words)
        def clean(piece: str) -> str:
            return _without_emphasis(piece, say)
    plan = plan_prompt(text, negative_text, steps=schedule_steps(canonical_sampler(sampler), steps or 25), clean=clean,
                       old_scheduling=old_prompt_editing_timelines)
    from ..prompt_chunks import has_break, needs_chunks
    from ..prompt_weights import parse_prompt_attention

    def chunked(piece: str) -> bool:  # (A1111's BREAK; with no kohya --max-token-length, its long prompts too)
        if max_token_length == 75 and aesthetic is None and hasattr(system, "tokenizer"):
            first = system.tokenizer if system.tokenizer is not None else system.tokenizer_2  # (the SDXL refiner's one)
            return needs_chunks(first, piece)
        return has_break(piece)

    def kohya_reads_otherwise(piece: str) -> bool:  # ("(cat: 1.2)": a weight in A1111's emphasis, text in kohya's)
        return parse_prompt_attention(piece, a1111=True) != parse_prompt_attention(piece)

    # (a plan's texts take the system's A1111 path: BREAK chunks and A1111's emphasis pattern)
    def needs_plan_path(p) -> bool:
        return clean is None and any(chunked(piece) or (aesthetic is None and kohya_reads_otherwise(piece))
                                     for piece in (*p.texts, *p.negative_texts))

    breaks = needs_plan_path(plan)
    scheduled_text, scheduled_negative = text, negative_text  # (the hires pass re-plans these)
    if plan.plain and not breaks:  # (no prompt editing, alternation, AND or BREAK: the one text, sampled as ever)
        text, negative_text, plan = plan.texts[0], plan.negative_texts[0], None
    else:
        say(f"prompt schedule: {plural(len(plan.texts), 'text')}, {plural(len(plan.parts), 'AND part')}, "
            f"{plural(len(plan.negative_texts), 'negative text')}")
        if rescale is not None and len(plan.parts) > 1:
            raise ValueError(f"--guidance-rescale brings the guided result to the conditional branch's spread; the "
                             f"prompt has {len(plan.parts)} AND sub-prompts, which no tool defines it for (diffusers "
                             "has no AND; A1111's 'CFG Rescale' extension keeps the last sub-prompt's alone): leave "
                             "out --guidance-rescale or the AND")
        for asked, option, what in ((sag_scale, "--sag-scale", "degrades the negative branch of each call"),
                                    (pag_scale, "--pag-scale", "steers away from the prompt's perturbed output")):
            if asked and len(plan.parts) > 1:
                raise ValueError(f"{option} {what}; the prompt has {len(plan.parts)} AND sub-prompts, which no tool "
                                 f"defines it for (diffusers has no AND): leave out {option} or the AND")
        if aesthetic is not None:
            raise ValueError("--aesthetic personalises one prompt's conditioning; leave out prompt editing, "
                             "alternation, AND and BREAK, or --aesthetic")
    unknown = unknown_words(system, " ".join(plan.texts) if plan is not None else text)
    if unknown:
        say(f"warning: the toy model does not know {', '.join(unknown)} (it reads them as <unk>); its words: "
            f"{', '.join(_toy_vocabulary(system))}")
        for word in unknown:  # ("<sks>" for an embedding named sks: its trigger is the file name, A1111's rule)
            name = next((n for n in embedding_files if n.lower() == word.strip("<>").lower() != word.lower()), None)
            if name is not None:
                say(f"  {word}: the embedding {name!r} from {embedding_files[name]} is triggered by its file name, "
                    f"{name}, as A1111 names embeddings; write {name} without the <>")
    from .generate_hires import (
        HiresRequest,
        check_hires_request,
        hires_pass_size,
        hires_size,
        hires_upscale_size,
        init_latents_from_image,
        sample_image,
        sized_init_latents,
    )
    from .generate_inpaint import img2img_pixels, sampled_encodings

    size_h, size_w = height or int(getattr(system, "image_size", 0)), width or int(getattr(system, "image_size", 0))
    if tiles is not None:  # (the job's first seed, the first pass's size: A1111's Hypertile process())
        tiles.seed(image_seed(seed, 0))
        tiles.configure(size_w, size_h, unet=tile_settings[0], vae=tile_settings[1])
    init_latents = None
    inpainting = None
    unclip_image = None  # (an unCLIP model's image conditioning: set on the system while its images are sampled)
    unclip_for_seed = None  # (its level-0 noise drawn per image, for the image's seed: sdadapt.unclip.seeded_unclip_image)
    unclip_source = None if a1111_seeds is None else a1111_seeds.source

    def inpaint_for(image_file, fill: str, mask_file, latent_file=None) -> tuple:
        """An init image's inpainting inputs under ``mask_file`` with ``fill`` (:func:`.generate_inpaint.
        inpaint_inputs`; ``latent_file``: A1111's separate latent mask; ``None`` for "Only masked" with a blank mask)
        and an unCLIP model's seeded image of what it inpaints."""
        from .generate_inpaint import inpaint_inputs

        inputs = inpaint_inputs(system, image_file, mask_file, height=size_h, width=size_w,
                                mask_blur=blur_xy, invert_mask=invert_mask,
                                inpainting_fill=fill, inpainting_mask_weight=inpainting_mask_weight,
                                resize_mode=resize_mode, inpaint_full_res=inpaint_full_res,
                                inpaint_full_res_padding=32 if inpaint_full_res_padding is None
                                else inpaint_full_res_padding, soft_inpainting=soft_inpainting,
                                latent_mask=latent_file)
        seeded = None
        if inputs is not None and getattr(system, "unclip", None) is not None:  # (A1111: the image it inpaints)
            from ..unclip import seeded_unclip_image

            seeded = seeded_unclip_image(system, inputs.pixels[None], source=unclip_source)
        return inputs, seeded

    if batch is not None:  # (the first image's inputs made below, the others' in the loop)
        say(f"img2img batch: {plural(len(batch), 'image')} of {init_image} at denoising strength "
            f"{denoising_strength:g} ({size_w}x{size_h}), written into {target}"
            + ("" if mask is None else f", inpainted with the masks of {mask}"))
    elif init_image is not None and mask is not None:  # A1111's inpaint tab (sdadapt.jobs.generate_inpaint)
        inpainting, seeded = inpaint_for(init_image, inpainting_fill, mask, latent_mask)
        if inpainting is None:  # (A1111: 'Unable to perform "Inpaint Only mask" because mask is blank')
            say(f"warning: --inpaint-full-res: the mask {mask} is blank after --invert-mask / --mask-blur, so there "
                "is no region to inpaint; running plain img2img on the whole image as A1111 does")
        else:
            say(f"inpainting with {mask}: fill {inpainting_fill}, mask blur "
                f"{blur_xy[0]:g}{'' if blur_xy[0] == blur_xy[1] else f' x, {blur_xy[1]:g} y'}"
                f"{', inverted' if invert_mask else ''}"
                f"{', inpainting model' if inpainting.conditioning is not None else ''}"
                + ("" if inpainting.region is None else f", only masked: region {inpainting.region} inpainted at "
                   f"{size_w}x{size_h}"))
            if seeded is not None:  # SD 2.1 unCLIP: A1111 conditions on the encoded image
                unclip_for_seed = seeded
                say("unCLIP: conditioned on the CLIP image embedding of the image it inpaints (noise level 0), as "
                    "A1111's img2img_image_conditioning")
    model_conditioning = None  # (an inpainting model's img2img without a mask)
    tiled = None  # (--sd-upscale, --outpaint: the tiles, each the init image of one img2img run)

    def img2img_inputs(image_file) -> tuple:
        """An init image's ``(latents, an inpainting model's conditioning, an unCLIP model's seeded image)`` (the
        latents ``None`` with ``--vae-encode sample``: encoded per image, from its seed's generator, in the loop)."""
        from .generate_inpaint import img2img_conditioning

        latents = init_latents_from_image(system, image_file, height=size_h, width=size_w,
                                          resize_mode=resize_mode) if vae_encode == "mean" else None
        conditioning = img2img_conditioning(system, image_file, height=size_h, width=size_w,
                                            resize_mode=resize_mode, inpainting_mask_weight=inpainting_mask_weight)
        seeded = None
        if getattr(system, "unclip", None) is not None:  # SD 2.1 unCLIP: A1111's image variation (sdadapt.unclip)
            from ..unclip import img2img_seeded_unclip_image

            seeded = img2img_seeded_unclip_image(system, image_file, height=size_h, width=size_w,
                                                 resize_mode=resize_mode, source=unclip_source)
        return latents, conditioning, seeded

    if sd_upscaler is not None or outpaint is not None:  # (A1111's tiled scripts: the tiles are the init images)
        import tempfile

        from .generate_tiles import outpainting_tiles, sd_upscale_tiles

        folder = run_scope.enter_context(tempfile.TemporaryDirectory(prefix="sdadapt-tiles-"))
        if sd_upscaler is not None:
            tiled = sd_upscale_tiles(init_image, folder, scale=sd_upscale, overlap=sd_upscale_overlap,
                                     upscaler=sd_upscaler, width=size_w, height=size_h)
            say(f"SD upscale of {init_image}: {tiled.grid.size[0]}x{tiled.grid.size[1]} by "
                f"{getattr(sd_upscaler, 'name', sd_upscaler)}, "
                f"{plural(len(tiled.run), 'tile')} of {size_w}x{size_h} overlapping by {sd_upscale_overlap}")
        else:
            tiled = outpainting_tiles(init_image, folder, pixels=outpaint, mask_blur=outpaint_mask_blur,
                                      directions=outpaint_directions, width=size_w, height=size_h)
            say(f"poor man's outpainting of {init_image}: {tiled.grid.size[0]}x{tiled.grid.size[1]}, "
                f"{plural(len(tiled.run), 'tile')} of {size_w}x{size_h} inpainted ({inpainting_fill})")
        if any(tiled.grid.uncovered):  # (A1111's rounding: its output has the same black edge)
            say(f"warning: {'--sd-upscale' if sd_upscaler is not None else '--outpaint'}: A1111's tile places leave "
                f"the last {tiled.grid.uncovered[1]} pixel rows and {tiled.grid.uncovered[0]} columns uncovered at "
                "this size, black in the result as in A1111's; another overlap or size avoids it")
        if any(tiled.grid.faded):  # (an image smaller than a tile: A1111's blend fades its edge into black)
            say(f"warning: --sd-upscale: the {tiled.grid.size[0]}x{tiled.grid.size[1]} image is smaller than a tile, "
                f"and A1111's blend fades its first {tiled.grid.faded[0]} pixel columns and {tiled.grid.faded[1]} "
                "rows from black, as in A1111's result; a smaller overlap or --width/--height avoids it")
    sources = tiled.sources if tiled is not None else batch  # (each image of a tiled run or a batch: its own inputs)
    if sources is not None:  # (the first one's made here: what the run's infotext reads, A1111's first image's)
        if sources[0][1] is not None:
            inpainting, unclip_for_seed = inpaint_for(sources[0][0], inpainting_fill, sources[0][1], sources[0][2])
        if inpainting is None:
            init_latents, model_conditioning, unclip_for_seed = img2img_inputs(sources[0][0])
    elif init_image is not None and inpainting is None:
        init_latents, model_conditioning, unclip_for_seed = img2img_inputs(init_image)
    if init_image is not None and inpainting is None and batch is None:
        say(f"img2img from {init_image} at denoising strength {denoising_strength:g} ({size_w}x{size_h}, "
            f"{resize_mode} resize{', exact steps' if img2img_fix_steps else ''})")
        if getattr(system, "unclip", None) is not None:
            say("unCLIP: conditioned on the init image's CLIP image embedding (noise level 0), as A1111's img2img")
    if hires is not None:
        import inspect

        if "height" not in inspect.signature(system.sample).parameters:
            raise ValueError(f"--hires-*: this model makes {size_w}x{size_h} images only, so it has no hires pass; "
                             "use a Stable Diffusion model")
        hires_sides = dict(scale=hires_scale, hires_height=hires_height, hires_width=hires_width)
        factor = int(getattr(system, "vae_factor", 8))
        hires = check_hires_request(HiresRequest(
            hires_size(size_h, size_w, **hires_sides),
            steps=hires_steps, denoising=hires_denoising, upscaler=hires_upscaler,
            prompt=_expanded(hires_prompt, handles), negative=_expanded(hires_negative, handles), sampler=hires_sampler,
            schedule=hires_schedule, upscale_to=hires_upscale_size(size_h, size_w, **hires_sides),
            guidance=hires_guidance),
            multiple=factor)
        cut = any((up - side) // factor for up, side in zip(hires.upscale_to, hires.size))  # (A1111's truncate_x/y)
        cover = "" if hires.upscale_to == hires.size else (
            f" (enlarged to {hires.upscale_to[1]}x{hires.upscale_to[0]}{' and cropped' if cut else ''}, as A1111)")
        pass_h, pass_w = hires_pass_size(hires, factor=factor)
        if (pass_h, pass_w) != hires.size:
            cover += f", written {pass_w}x{pass_h} (A1111 rounds a side down to a multiple of {factor})"
        say(f"hires fix: {hires.size[1]}x{hires.size[0]}{cover}, {plural(hires.steps or steps or 25, 'step')} at denoising "
            f"{hires.denoising:g}, {getattr(hires.upscaler, 'name', hires.upscaler)}")  # (an ESRGAN model: its name)

    hires_networks = None
    if switch_networks:  # (the same files at the same multipliers: A1111's load_networks changes nothing)
        import functools

        from .generate_hires import networks_switched

        hires_networks = functools.partial(
            networks_switched, system, first=tag_handles,
            apply_first=lambda handles: apply_tag_loras(tag_loras, handles, quiet=True),
            apply_second=lambda handles: apply_tag_loras(hires_tag_loras, handles, quiet=True))
        say("hires pass: the hires prompt's LoRA tags instead of the prompt's: "
            f"{', '.join(item.tag for item in hires_tag_loras) or 'none'}")

    hires_contexts = [] if hires_networks is None else [hires_networks]  # (what the hires pass runs inside)
    if tiles is not None and hires is not None:  # (A1111's Hypertile before_hr: reseeded, the hires size; kept after)
        hr_unet = dataclasses.replace(tile_settings[0], enabled=tile_settings[0].enabled or hypertile_unet_second_pass)

        @contextlib.contextmanager
        def tiled_hires_pass():
            if hr_unet.enabled:
                tiles.seed(image_seed(seed, 0))
            up_h, up_w = hires.upscale_to or hires.size  # (A1111's hr_upscale_to_y / _x)
            tiles.configure(up_w, up_h, unet=hr_unet, vae=tile_settings[1])
            yield

        hires_contexts.append(tiled_hires_pass)
    if merging is not None and hires is not None and hr_merging_ratio != merging.ratio:  # (A1111's
        hires_contexts.append(lambda: merging.at(hr_merging_ratio))  # apply_token_merging(for_hr=True), then back)

    @contextlib.contextmanager
    def hires_scope():
        with contextlib.ExitStack() as scope:
            for context in hires_contexts:
                scope.enter_context(context())
            yield

    def plan_for(hires_steps: int) -> object:  # (A1111 plans the hires pass's schedule for its steps, its
        # timeline continuing the first pass's: calculate_hr_conds passes firstpass_steps as base_steps)
        hr_text = scheduled_text if hires is None or hires.prompt is None else hires.prompt
        hr_negative = scheduled_negative if hires is None or hires.negative is None else hires.negative
        hr_sampler = sampler if hires is None or hires.sampler is None else hires.sampler
        hr_plan = plan_prompt(hr_text, hr_negative, steps=schedule_steps(canonical_sampler(hr_sampler), hires_steps),
                              first_pass_steps=schedule_steps(canonical_sampler(sampler), steps or 25), clean=clean,
                              old_scheduling=old_prompt_editing_timelines)
        if hr_plan.plain and not needs_plan_path(hr_plan):  # (the one text, sampled as ever)
            return hr_plan.texts[0], hr_plan.negative_texts[0]
        return hr_plan

    if hires is not None and aesthetic is not None and not isinstance(plan_for(hires.steps or steps or 25), tuple):
        raise ValueError("--aesthetic personalises one prompt's conditioning; the hires pass's text has prompt "
                         "editing, alternation, AND or BREAK it reaches (e.g. [a:b:1.5]); leave those out, or --aesthetic")

    cond = None
    if aesthetic is not None:
        from .aesthetic import aesthetic_generation_conditioning

        cond = aesthetic_generation_conditioning(system, text, aesthetic, steps=aesthetic_steps, lr=aesthetic_lr,
                                                 weight=aesthetic_weight, slerp=aesthetic_slerp, clip=aesthetic_clip,
                                                 text=aesthetic_text, text_angle=aesthetic_text_angle,
                                                 text_negative=aesthetic_text_negative)
        say(f"aesthetic {aesthetic}: {plural(aesthetic_steps, 'step')} at lr {aesthetic_lr:g}, weight {aesthetic_weight:g}"
            f"{' (slerp)' if aesthetic_slerp else ''}")

    from .infotext import run_infotext

    infotext = run_infotext(
        system, texts=infotext_texts, sampler=sampler, steps=steps or 25, guidance=guidance, seed=seed,
        width=size_w, height=size_h, schedule=schedule, karras=karras, schedule_asked=asked_schedule, model=model,
        vae=vae, subseed=subseed, subseed_strength=subseed_strength if a1111_seeds is not None else 0.0,
        seed_resize_from=seed_resize_from, ensd=ensd, noise=noise, clip_skip=clip_skip,
        init_image=init_image, denoising_strength=denoising_strength, hires=hires,
        hires_options=dict(scale=hires_scale, width=hires_width, height=hires_height, steps=hires_steps,
                           upscaler=hires_upscaler, denoising=hires_denoising, sampler=hires_sampler,
                           guidance=hires_guidance,
                           schedule=hires_schedule),
        mask=mask if mask is not None or sources is None else sources[0][1], inpainting=inpainting,
        # (A1111's is_using_inpainting_conditioning: an init image on an inpainting model, every script's too)
        inpainting_model=init_image is not None and _is_inpainting_model(system),
        mask_options=dict(blur=blur_xy[0] if blur_xy[0] == blur_xy[1] else None,  # (A1111's mask_blur property)
                          invert=invert_mask, fill=inpainting_fill,
                          padding=32 if inpaint_full_res_padding is None else inpaint_full_res_padding,
                          weight=inpainting_mask_weight),
        loras=parsed, hypernetworks=hypernetwork_options, tag_loras=tag_loras,
        hires_tag_loras=hires_tag_loras if hires is not None else (),
        embedding_files=embedding_files, tokenize=_token_ids(system), refiner=refiner,
        refiner_switch_at=refiner_switch_at, refiner_by_steps=refiner_switch_by_steps,
        refiner_hires_pass=refiner_hires_pass or "second",
        aesthetic=None if aesthetic is None else dict(
            embedding=aesthetic, lr=aesthetic_lr, weight=aesthetic_weight, steps=aesthetic_steps,
            slerp=aesthetic_slerp, text=aesthetic_text, text_negative=aesthetic_text_negative,
            slerp_angle=aesthetic_text_angle), vae_encode=vae_encode, uncond_skip=uncond_skip,
        schedule_options=schedule_options, eta=eta, eta_ddim=eta_ddim, noise_multiplier=noise_multiplier,
        extra_noise=extra_noise, churn=churn,
        emphasis=emphasis if emphasis != "Original" and _emphasis_written(plan, text, negative_text, hires, plan_for,
                                                                          steps) else None,
        old_timelines=old_prompt_editing_timelines and _old_timelines_differ(
            scheduled_text, scheduled_negative, sampler=sampler, steps=steps or 25, clean=clean,
            hires=None if hires is None else (hires.sampler or sampler, hires.steps or steps or 25,
                                              hires.prompt, hires.negative)),
        guidance_rescale=rescale, perturbed_attention=None if pag is None else (pag_scale, pag_adaptive_scale, pag_layers),
        self_attention_guidance=None if sag is None else (sag_scale, sag_blur_sigma),
        dynamic_thresholding=dynamic_thresholding,
        freeu=None if freeu is None else (*freeu, freeu_version, *freeu_window),
        tiling=tiling, vae_tiling=vae_tiling, token_merging=(token_merging_ratio, hr_merging_ratio),
        hypertile=None if tiles is None else (*tile_settings, hypertile_unet_second_pass),
        soft_inpainting=soft_inpainting, sd_upscale=None if sd_upscaler is None else (sd_upscale_overlap,
                                                                  getattr(sd_upscaler, "name", sd_upscaler)),
        loopback=None if loop_curve is None else (float(loopback_final_denoising), loop_curve),
        img2img_alt=None if img2img_alt is None else img2img_alt.infotext_fields(), hires_checkpoint=hires_checkpoint)
    _check_jpeg_infotext(files, infotext.for_image(0))  # (before any sampling: a JPEG's EXIF holds 64 KiB)
    written: list[str] = []
    kept: tuple[list, list[str]] = ([], [])  # (each written image's 8-bit pixels and infotext: A1111's grids' cells)
    report: dict = {}  # dpm_adaptive's own step count and model calls, said per image
    from ..unclip import unclip_image_scope
    from .generate_conditions import conditions_cached

    # (each distinct text encoded once over the images: the same images; the refiner's too, whose weights the run
    # never changes: LoRAs, hypernetworks and step switches act on the base)
    # (--sd-upscale, --outpaint: every run tile of each upscale, tile k of upscale n with A1111's seed index n + k;
    # --loopback: loop j of every batch, from the init image (j = 0) or the loop before's image; --init-image FOLDER:
    # each image's outputs, its seeds seed + n as one image's: A1111 keeps p.seed over the batch)
    if tiled is not None:
        jobs = [(n + k, file, source) for n, file in enumerate(files) for k, source in enumerate(tiled.sources)]
    elif batch is not None:
        jobs = [(i % count, file, batch[i // count]) for i, file in enumerate(files)]
    else:
        jobs = [(i, file, None) for i, file in enumerate(files)]
    script_seeds = tiled is not None or loop_strengths is not None
    reference: list = [] if color_reference is None else [color_reference]  # (A1111's p.color_corrections)

    def corrected(image: torch.Tensor, source: object) -> torch.Tensor:
        """The decoded image (3, H, W) in [-1, 1], colour-corrected when asked (A1111: before the overlay), on the 8
        bits it is written in, against the run's one reference: A1111's ``init`` makes ``p.color_corrections`` of
        the first init image it encodes (resized, an inpainting run's filled, "Only masked"'s region) and keeps
        them for every later ``process_images`` of the same ``p`` — the next tiles of SD upscale and Poor man's
        outpainting, the next images of a folder — and Loopback sets them from the uploaded image as it is."""
        if not color_correction:
            return image
        import numpy as np

        from ..color_correction import apply_color_correction, setup_color_correction
        from ..resize_modes import init_image_pixels, open_init_image

        if not reference:
            if loop_strengths is not None:  # (the Loopback script's initial_color_corrections)
                pixels = np.asarray(open_init_image(str(init_image)).convert("RGB"))
            else:
                encoded = inpainting.pixels if inpainting is not None else init_image_pixels(
                    source, (size_h, size_w), mode=resize_mode)
                pixels = to_uint8(encoded[0] if encoded.ndim == 4 else encoded)
            reference.append(setup_color_correction(np.ascontiguousarray(pixels)))
        fixed = apply_color_correction(reference[0], to_uint8(image))
        return (torch.from_numpy(fixed).permute(2, 0, 1).float() / 127.5 - 1.0).to(image)
    with conditions_cached(system), conditions_cached(refiner_system), conditions_cached(hires_system):
        for done, (i, file, source) in enumerate(jobs):
            image_file = init_image if source is None else source[0]
            job_strength = denoising_strength
            if source is not None:  # (a tile or a batch image: the first one's inputs made above, a new one's here)
                if done > 0 and source != jobs[done - 1][2]:
                    if source[1] is not None:
                        inpainting, unclip_for_seed = inpaint_for(source[0], inpainting_fill, source[1], source[2])
                    if source[1] is None or inpainting is None:
                        init_latents, model_conditioning, unclip_for_seed = img2img_inputs(source[0])
            elif loop_strengths is not None:  # (A1111's loopback: "original" content after the first loop)
                loop = i % len(loop_strengths)
                image_file, job_strength = (init_image if loop == 0 else files[i - 1]), loop_strengths[loop]
                if done:  # (the first image's inputs are the run's own, made above)
                    if mask is not None:
                        inpainting, unclip_for_seed = inpaint_for(image_file, "original" if loop else inpainting_fill,
                                                                  mask)
                    if mask is None or inpainting is None:
                        init_latents, model_conditioning, unclip_for_seed = img2img_inputs(image_file)
            # (SD upscale, loopback: A1111's scripts set p.seed = processed.seed + 1 after each run whatever the
            # variation strength, and never move p.subseed: every image's variation seed is SUBSEED)
            varied = a1111_seeds is not None and not script_seeds
            seed_i = image_seed(seed, i, subseed_strength=subseed_strength if varied else 0.0)
            options = dict(negative=negative_text, seed=seed_i, steps=steps or 25, guidance=guidance,
                           sampler=sampler, karras=karras, height=height, width=width, cond=cond, plan=plan,
                           **({"schedule": schedule} if schedule is not None else {}),
                           **({"info": report} if sampler == "dpm_adaptive" else {}),
                           **({} if a1111_seeds is None else {"noise": _image_seeds(a1111_seeds,
                                                                                    0 if script_seeds else i)}),
                           **({} if schedule_options is None else {"schedule_options": schedule_options}),
                           **({} if model_calls is None else {"before_model_call": model_calls}),
                           **({} if uncond_skip is None else {"uncond_skip": uncond_skip}),
                           **({} if cond_padding is None else {"pad_conds": cond_padding}),
                           **({} if eta is None else {"eta": eta}),
                           **({} if eta_ddim is None else {"eta_ddim": eta_ddim}),
                           **({} if noise_multiplier == 1.0 else {"noise_multiplier": noise_multiplier}),
                           **({} if not extra_noise else {"extra_noise": extra_noise}),
                           **({} if churn is None else {"churn": churn}),
                           **({} if rescale is None else {"guidance_rescale": rescale}),
                           **({} if pag is None else {"perturbed_attention": pag}),
                           **({} if sag is None else {"self_attention_guidance": sag}),
                           **({} if dynamic_thresholding is None else {"dynamic_thresholding": dynamic_thresholding}))
            if unclip_for_seed is not None:  # (each image its own level-0 noise row, from its own seed)
                unclip_image = unclip_for_seed(seed_i)
            encoded = None  # (--vae-encode sample: the init image's posterior sample for this seed)
            sampled: dict = {}  # (and generate's options it draws: generator, an inpainting model's start noise
            start_generator = None  # and sampled conditioning; the generator whose next draw is the start noise)
            if vae_encode == "sample" and init_image is not None:
                if inpainting is not None:
                    pixels, masked = inpainting.pixels[None], inpainting.masked
                else:
                    pixels, masked = img2img_pixels(system, image_file, height=size_h, width=size_w,
                                                    resize_mode=resize_mode,
                                                    inpainting_mask_weight=inpainting_mask_weight)
                encoded, sampled, start_generator = sampled_encodings(
                    system, pixels, seed=seed_i, a1111_noise=a1111_seeds is not None, masked=masked)
                if inpainting is None:  # (--resize-mode latent: encoded at the image's size, then resized)
                    init_latents = sized_init_latents(system, encoded, height=size_h, width=size_w,
                                                      resize_mode=resize_mode)
            if inpainting is not None:
                options.update(inpainting.generate_options())
                if inpainting.soft is not None:  # (its composite reads how far the latents moved)
                    options["output"] = "latents"
                init_latents = inpainting.init_latents(seed_i, a1111_seeds, init=encoded, start=start_generator)
            elif model_conditioning is not None:  # (an inpainting model's img2img: A1111's mask of ones)
                options["inpaint_conditioning"] = model_conditioning
            options.update(sampled)  # (after the mean conditioning: an inpainting model's sampled one replaces it)
            if vae_encode == "sample":  # (an inpainting model's txt2img grey, a hires pass's: drawn in sample)
                options["vae_encode"] = vae_encode
            if alt_run is not None:  # (the script's start noise: the image's inverted noise, blended, less init/σ_max)
                options.update(alt_run.start_options(init_latents, options))
            handoff = None
            if refiner_system is not None:  # (the base, then the refiner, in one sampler run per pass)
                from .generate_refiner import RefinerHandoff

                handoff = RefinerHandoff(system, refiner_system, switch_at=refiner_switch_at,
                                         by_steps=refiner_switch_by_steps)
            try:
                with unclip_image_scope(system, unclip_image):  # (the system as it was after each image)
                    result = sample_image(system, [text], options, init_latents=init_latents,
                                          denoising_strength=job_strength, hires=hires, plan_for=plan_for,
                                          fix_steps=img2img_fix_steps,
                                          hires_networks=hires_scope if hires_contexts else None,
                                          refiner=handoff, refiner_hires_pass=refiner_hires_pass or "second",
                                          inpainting_mask_weight=inpainting_mask_weight, vae_encode=vae_encode,
                                          hires_system=hires_system)
            finally:  # (the next image starts from the weights without the step-switched parts)
                if model_calls is not None:
                    model_calls.release()
            if options.get("output") == "latents":  # (soft inpainting: decoded here, by the VAE generate uses)
                decoder = system if handoff is None else handoff.decoder(system)
                decoded = corrected(decoder.decode_latents(result)[0], image_file)
                image = inpainting.overlay(decoded, latents=result, init=init_latents)
            elif inpainting is not None:  # A1111's final overlay: the original pixels outside the mask
                image = inpainting.overlay(corrected(result[0], image_file))
            else:
                image = corrected(result[0], image_file)
            if handoff is not None:
                from .generate_refiner import handoff_report

                say(f"{file.name}: {handoff_report(handoff)}")
                infotext.refiner_took = infotext.refiner_took or handoff.taken  # (A1111's, from its first switch)
            infotext.uncond_skips = frozenset(skipped)  # (A1111's, from the first skipped call on)
            infotext.pads = frozenset(padded)  # (A1111's, after a pass that padded)
            if report:
                say(f"{file.name}: dpm_adaptive took {plural(report['n_accept'], 'step')} ({report['n_reject']} "
                    f"rejected), {plural(report['nfe'], 'model call')}")
                report.clear()
            if tiled is None:
                parameters = infotext.for_image(i, **({} if loop_strengths is None else
                                                      {"denoising": job_strength, "fixed_subseed": True}))
                written.append(_write(file, to_uint8(image), parameters, kept, save, say))
            elif (combined := tiled.add(image)) is not None:  # (A1111 saves each with the first tile's infotext)
                written.append(_write(file, to_uint8(combined), infotext.for_image(0), kept, save, say))
            if progress is not None:
                progress(done + 1, len(jobs), file.name)
    run_scope.close()  # (the run's models as loaded again; they are the run's own, so an error leaves nothing behind)
    return {"files": written, "pixels": kept[0], "infotexts": kept[1], "seed": seed, "subseed": subseed,
            "seconds": time.perf_counter() - start,
            "loras": applied,
            "hypernetworks": hypernetwork_report, "custom_diffusions": custom_report,
            "embeddings": [h.name for h in handles], "unknown_words": unknown,
            "aesthetic": None if aesthetic is None else str(aesthetic),
            **({} if hires_checkpoint is None else {"hires_checkpoint": str(hires_checkpoint)}),
            **({} if not reference else {"color_reference": reference[0]}),
            **({} if refiner is None else {"refiner": str(refiner), "refiner_switch_at": refiner_switch_at,
                                           "refiner_hires_pass": (refiner_hires_pass or "second") if hires else None})}


def _layers_text(report: dict) -> str:
    """``"36 layers"``, with the SD2 text-encoder layers past the model's left out (``unused_layers``) said."""
    text = plural(report["layers"], "layer")
    unused = report.get("unused_layers", 0)
    return text + (f"; {plural(unused, 'layer')} on text-encoder layers SD2 never reads, left out" if unused else "")


def _a1111_clip_skip(system, model, skip: int, say: Callable[[str], None]) -> None:
    """Clip skip on an SD2 model is not applied, as A1111 (``sd_hijack_open_clip.py`` never reads
    ``CLIP_stop_at_last_layers``, yet writes "Clip skip: 2" into the infotext when the setting is 2) and ComfyUI (its SD2
    states are already OpenCLIP's penultimate layer, which "CLIP Set Last Layer -2" keeps): the same image as theirs.
    kohya's training (and its sample images) and Forge apply it; ``train --clip-skip`` does so here."""
    if skip > 1 and str(getattr(system, "base_model", "")).startswith("sd2"):
        system.clip_skip = 1
        say(f"--clip-skip {skip}: not applied on SD2 ({model}), as A1111 and ComfyUI (their SD2 text states are "
            "already the penultimate layer's; the infotext keeps the value, as A1111 writes it)")
    elif skip > 2 and getattr(system, "is_sdxl", False):
        # (SDXL conditions on both encoders' penultimate layer: A1111 with its default "sdxl_clip_l_skip" off reads
        # no other; Forge and diffusers' clip_skip would go further back on both)
        say(f"--clip-skip {skip}: not applied on SDXL ({model}), as A1111 (its SDXL states are both encoders' "
            "penultimate layer; Forge and diffusers would take an earlier one)")


def _check_jpeg_infotext(files: Sequence[Path], parameters: str) -> None:
    """Refuse, before sampling, a run whose JPEG outputs cannot hold its infotext (``parameters``: the first image's,
    as far as it is known before sampling) in their EXIF (:func:`.generate_runs.infotext_too_long`); WebP, AVIF and
    PNG hold any length.

    Raises:
        ValueError: naming the length and the formats that hold it.
    """
    from .generate_runs import infotext_too_long

    problem = next((p for p in (infotext_too_long(file, parameters) for file in files) if p is not None), None)
    if problem is not None:
        raise ValueError(f"{Path(files[0]).name}: {problem} (refused before sampling)")


def _write(file: Path, image, parameters: str, kept: tuple[list, list[str]], save: dict,
           say: Callable[[str], None] = lambda line: None) -> str:
    """Write ``image`` ((H, W, 3) uint8) to ``file`` in its suffix's format with ``parameters`` as its infotext;
    keep both in ``kept`` (pixels, infotexts) for the run's result. A JPEG whose infotext grew past its EXIF's 64 KiB
    while sampling is written without it, said on ``say`` (:func:`.generate_runs.infotext_chunk`); the run's result
    keeps the text."""
    from ..images import write_image
    from .generate_runs import infotext_chunk

    kept[0].append(image)
    kept[1].append(parameters)
    return str(write_image(file, image, text=infotext_chunk(file, parameters, say), **save))


def _expanded(text: str | None, handles) -> str | None:
    """``text`` with the injected embeddings' names expanded (``None`` and ``""`` stay as they are). generate's
    embeddings (``a1111=True``) are found by one A1111 scan over all of them inside each emphasis piece
    (:mod:`sdadapt.embeddings.a1111_match`: left to right, the longest name at each position, ``tom-cat_v2`` before
    ``tom-cat``), each handle writing its own matches where the text can say them; the rest (``atom-cat``,
    ``(tom-)(cat)``, ``easynegative \\(1\\)``) the model's tokenizing matches by token ids. Longest name first for
    any other handle (theirs are text rules); the handles stay in load order for ``remove()``. A handle the model's
    tokenizing matches by ids (:attr:`~sdadapt.embeddings.inject.EmbeddingHandle.matched_by_ids`) is left out: the
    text is scheduled as written and each scheduled text matched, as A1111 (``a cat[:s:0.5]`` is ``a cats`` late)."""
    for handle in sorted(handles, key=lambda h: len(h.name), reverse=True) if text else ():
        if not getattr(handle, "matched_by_ids", False):
            text = handle.expand(text)
    return text


def _is_edm_own_grid(model: str | os.PathLike, *, sampler: str, schedule: str | None, karras: bool,
                     schedule_options: object) -> bool:
    """Whether the σ grid asked for (``schedule``, a resolved schedule name, or ``karras``) is an EDM model's own —
    its scheduler config's ``sigma_schedule``, ``karras`` for Playground v2.5 — with A1111's settings at their
    defaults: what an EDM run's infotext writes ("Schedule type: Karras"; :func:`sdadapt.jobs.infotext._edm_grid`),
    so a pasted infotext (``--sampler "DPM++ 2M" --schedule Karras``, or the label ``"DPM++ 2M Karras"``) runs as
    written. The library's rule (:func:`sdadapt.samplers.edm.edm_own_grid`, which ``DiffusersSystem.sample`` takes
    too) on the config the header names, before the load; ``False`` for a model that is not EDM or another grid."""
    if schedule is None and not karras:
        return False
    from ..samplers.edm import edm_own_grid
    from .model_size import model_edm_scheduler

    config = model_edm_scheduler(model)
    if config is None:
        return False
    return edm_own_grid(str(config.get("sigma_schedule", "karras")), sampler=sampler, karras=karras, schedule=schedule,
                        schedule_options=schedule_options)


def _check_edm_request(model: str | os.PathLike, sampler: str, hires_sampler: str | None, *, asked_sampler: str | None,
                       label_schedule: str | None, karras: bool, schedule: str | None, noise: object,
                       schedule_options: object, refiner: object) -> None:
    """An EDM model's refusals (:func:`sdadapt.samplers.edm.check_edm_request`) before the load, when the header says
    EDM (:func:`~sdadapt.jobs.model_size.model_edm_scheduler`): ``--sampler`` and ``--hires-sampler`` by name; an
    A1111 label's schedule (``'DPM++ 2M Karras'``, A1111's default) named as the label's, with the label to give."""
    from ..samplers import canonical_sampler
    from ..samplers.edm import EDM_SAMPLERS, check_edm_request
    from .model_size import model_edm_scheduler

    if model_edm_scheduler(model) is None:
        return
    for option, name in (("--sampler", sampler), ("--hires-sampler", hires_sampler)):
        if name is None:
            continue
        try:
            check_edm_request(canonical_sampler(name), karras=karras, schedule=schedule, noise=noise,
                              schedule_options=schedule_options, refiner=refiner)
        except ValueError as exc:
            hint = (f"; the label {asked_sampler!r} names A1111's {label_schedule!r} σ grid: give --sampler {name} "
                    f"(the EDM grid is Karras' ρ = 7 grid already)" if option == "--sampler" and label_schedule
                    is not None and canonical_sampler(name) in EDM_SAMPLERS else "")
            raise ValueError(f"{option} {name} on --model {model}: {exc}{hint}") from None


def _check_img2img_options(sampler: str, *, init_image, denoising_strength: float, hires_scale: float | None,
                           hires_width: int | None, hires_height: int | None, hires_steps: int,
                           hires_denoising: float, hires_upscaler: str, resize_mode: str = "just",
                           hires_texts: tuple[str | None, str | None, str | None] = (None, None, None)):
    """``True`` when a hires pass is asked for (its request is built once the model's size is known), else
    ``None``; the img2img and hires options checked before any loading.

    Raises:
        ValueError: a sampler img2img does not run on, a strength outside [0, 1], a bad hires option.
        FileNotFoundError: no ``init_image`` file.
    """
    from ..img2img import HIRES_UPSCALERS, check_img2img_sampler
    from ..resize_modes import IMG2IMG_RESIZE_MODES
    from ..samplers import canonical_sampler

    wants_hires = hires_scale is not None or hires_width is not None or hires_height is not None
    if init_image is not None and not (Path(init_image).is_file() or Path(init_image).is_dir()):
        raise FileNotFoundError(f"--init-image {init_image}: no such image file or folder")
    if resize_mode not in IMG2IMG_RESIZE_MODES:
        raise ValueError(f"--resize-mode must be one of {', '.join(IMG2IMG_RESIZE_MODES)}, got {resize_mode!r}")
    hires_sampler = hires_texts[2]
    if any(v is not None for v in hires_texts) and not wants_hires:
        raise ValueError("--hires-prompt, --hires-negative and --hires-sampler shape the hires pass; give "
                         "--hires-scale or --hires-width/--hires-height too")
    if init_image is not None or wants_hires:  # (the sampler that starts from an image: the hires pass's)
        flag, name = ("--hires-sampler", hires_sampler) if wants_hires and hires_sampler else ("--sampler", sampler)
        try:
            check_img2img_sampler(canonical_sampler(name))
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    if not 0.0 <= denoising_strength <= 1.0:
        raise ValueError(f"--denoising-strength must be in [0, 1], got {denoising_strength}")
    if not wants_hires:
        return None
    if init_image is not None:
        raise ValueError("--hires-* is A1111's txt2img hires fix; leave it out with --init-image")
    if hires_scale is not None and (hires_width is not None or hires_height is not None):
        raise ValueError("give --hires-scale or --hires-width/--hires-height, not both")
    if hires_scale is not None and hires_scale <= 0:
        raise ValueError(f"--hires-scale must be > 0, got {hires_scale}")
    if isinstance(hires_upscaler, str) and hires_upscaler not in HIRES_UPSCALERS:  # (else an ESRGAN upscaler)
        raise ValueError(f"--hires-upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got {hires_upscaler!r}")
    if hires_steps < 0 or not 0.0 < hires_denoising <= 1.0:
        raise ValueError(f"--hires-steps must be >= 0 and --hires-denoising in (0, 1], got {hires_steps} and "
                         f"{hires_denoising}")
    return True


def _check_img2img_passes(sampler: str, *, steps: int, init_image, denoising_strength: float, fix_steps: bool,
                          hires: bool, hires_sampler: str | None, hires_steps: int, hires_denoising: float,
                          schedule: str | None = None, hires_schedule: str | None = None,
                          karras: bool = False) -> list[dict]:
    """The img2img passes (``--init-image``'s, the hires fix's second) checked from the options before any loading
    (:func:`sdadapt.jobs.generate_hires.check_img2img_pass`: a DPM fast / adaptive pass at A1111's ``t_enc = 0``,
    fixed steps at strength 0); returns, for each pass that runs A1111's fixed steps, the keywords of
    :func:`sdadapt.img2img.check_fixed_grid` but ``num_train_steps`` (its sampler and resolved ``schedule``, steps,
    strength and option names), for :func:`_check_step_counts` once the model's timesteps are known.

    Raises:
        ValueError: a pass the sampler would refuse only when it runs (after the load, or the first pass).
    """
    from ..samplers import canonical_sampler
    from .generate_hires import check_img2img_pass

    grids = []
    if init_image is not None:
        fixed = steps if fix_steps else None
        check_img2img_pass(canonical_sampler(sampler), steps=steps, strength=denoising_strength, fixed_steps=fixed)
        if fixed is not None:
            grids.append({"sampler": canonical_sampler(sampler), "schedule": schedule, "karras": karras,
                          "steps": fixed,
                          "strength": denoising_strength, "strength_option": "--denoising-strength",
                          "steps_option": "--steps", "sampler_option": "--sampler"})
    if hires:  # (A1111's hires pass: steps=hr_second_pass_steps or steps, run exactly)
        fixed = hires_steps or steps
        sampler_option = "--hires-sampler" if hires_sampler else "--sampler"
        steps_option = "--hires-steps" if hires_steps else "--steps"
        check_img2img_pass(canonical_sampler(hires_sampler or sampler), steps=fixed, strength=hires_denoising,
                           fixed_steps=fixed, sampler_option=sampler_option, strength_option="--hires-denoising",
                           steps_option=steps_option)
        grids.append({"sampler": canonical_sampler(hires_sampler or sampler), "schedule": hires_schedule,
                      "karras": karras, "steps": fixed, "strength": hires_denoising,
                      "strength_option": "--hires-denoising",
                      "steps_option": steps_option, "sampler_option": sampler_option})
    return grids


def _check_step_counts(system, *, steps: int | None = None, hires_steps: int = 0,
                       fixed_grids: list[dict] | None = None, step_grids: list[dict] | None = None) -> None:
    """``--steps`` / ``--hires-steps`` against the model's training timesteps ``T`` (``len(alphas_cumprod)``, 1000 for
    Stable Diffusion), refused here, by option, before sampling: a grid of more than ``T`` steps on a sampler that
    steps the model's timesteps — A1111's k-diffusion samplers run any count (``step_grids``: the keywords of
    :func:`sdadapt.img2img.check_step_count` but ``num_train_steps``, per pass; without them ``steps`` and
    ``hires_steps`` are at most ``T``) — and an img2img pass of A1111's fixed steps (``fixed_grids``:
    :func:`_check_img2img_passes`) whose grid ``int(steps / min(strength, 0.999))`` would be longer on such a
    sampler (:func:`sdadapt.img2img.check_fixed_grid`), before the first pass rather than after it. An EDM model
    (``system.edm``: Playground v2.5) is refused nothing here: its samplers build a grid of any length on continuous
    σ (:func:`sdadapt.samplers.edm.edm_sigmas`), and the library runs them (``sampling._img2img_request(edm=True)``)."""
    from ..img2img import check_fixed_grid, check_step_count

    if getattr(system, "edm", None) is not None:  # (Playground v2.5: its σ are continuous, any grid length runs,
        return  # as sampling._img2img_request(edm=True) and samplers.edm.edm_sigmas take it)
    limit = len(getattr(system, "alphas_cumprod", ())) or 1000
    for option, value in (("--steps", steps), ("--hires-steps", hires_steps)) if step_grids is None else ():
        if value and value > limit:
            raise ValueError(f"{option} {value}: at most {limit}, the model's training timesteps (the samplers' "
                             "grids are built on them; 20-50 steps are usual)")
    for grid in step_grids or ():
        check_step_count(**grid, num_train_steps=limit)
    for grid in fixed_grids or ():
        check_fixed_grid(**grid, num_train_steps=limit)


def _on_base_unet(run_scope: contextlib.ExitStack, option: str, system, refiner_system, model: str,
                  make: Callable[[torch.nn.Module], object]):
    """``make(system.unet)`` (hooks on the base UNet: PAG, SAG, FreeU) entered in ``run_scope``.

    Raises:
        ValueError: with a refiner (its UNet would run without them below its cut), a model without a UNet, or what
            ``make`` refuses, each prefixed with ``option``.
    """
    try:
        if refiner_system is not None:
            raise ValueError(f"the refiner's UNet would run without it below its cut: leave {option} out with "
                             "--refiner")
        if getattr(system, "unet", None) is None:
            raise ValueError(f"{model} has no UNet")
        return run_scope.enter_context(make(system.unet))
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


def _old_timelines_differ(text: str, negative_text: str, *, sampler: str, steps: int, clean, hires) -> bool:
    """Whether A1111's old prompt editing timelines plan another schedule than its new ones for the run's texts (its
    ``get_conds_with_caching`` writes "Old prompt editing timelines" then): the first pass's, and with ``hires``
    ``(sampler, steps, prompt, negative)`` the hires pass's."""
    from ..prompt_guidance import plan_prompt
    from ..prompt_schedule import schedule_steps
    from ..samplers import canonical_sampler

    first = schedule_steps(canonical_sampler(sampler), steps)

    def differs(prompt: str, negative: str, n: int, base: int | None) -> bool:
        plans = [plan_prompt(prompt, negative, steps=n, first_pass_steps=base, clean=clean, old_scheduling=old)
                 for old in (True, False)]
        return plans[0] != plans[1]

    if differs(text, negative_text, first, None):
        return True
    if hires is None:
        return False
    hr_sampler, hr_steps, hr_prompt, hr_negative = hires
    return differs(text if hr_prompt is None else hr_prompt, negative_text if hr_negative is None else hr_negative,
                   schedule_steps(canonical_sampler(hr_sampler), hr_steps), first)


def _emphasis_written(plan, text: str, negative_text: str, hires, plan_for, steps: int | None) -> bool:
    """Whether a text the run encodes has ``(`` or ``[`` (A1111 writes its "Emphasis" field then, sd_hijack_clip): the
    prompt plan's texts (prompt editing resolved), the negative's, the hires pass's."""
    texts = [*plan.texts, *plan.negative_texts] if plan is not None else [text, negative_text]
    if hires is not None:
        second = plan_for(hires.steps or steps or 25)
        texts += list(second) if isinstance(second, tuple) else [*second.texts, *second.negative_texts]
    return any("(" in t or "[" in t for t in texts)


def _sigma_churn(churn: float, tmin: float, tmax: float, noise: float):
    """The :class:`sdadapt.samplers.churn.SigmaChurn` of ``--sigma-churn`` / ``--sigma-tmin`` / ``--sigma-tmax`` /
    ``--sigma-noise`` (``None``: all at A1111's defaults), checked before any loading.

    Raises:
        ValueError: a value out of range, naming the options.
    """
    if (churn, tmin, tmax, noise) == (0.0, 0.0, 0.0, 1.0):
        return None
    from ..samplers.churn import SigmaChurn

    try:
        return SigmaChurn(churn=churn, tmin=tmin, tmax=tmax, noise=noise)
    except ValueError as exc:
        raise ValueError(f"--sigma-churn / --sigma-tmin / --sigma-tmax / --sigma-noise: {exc}") from None


def _emphasis_mode(emphasis: str) -> str:
    """``--emphasis`` as A1111's label (:data:`sdadapt.diffusers_system.EMPHASIS_MODES`), any case and ``-``/``_``.

    Raises:
        ValueError: another mode, naming them.
    """
    from ..diffusers_system import EMPHASIS_MODES

    key = str(emphasis).strip().lower().replace("-", " ").replace("_", " ")
    for mode in EMPHASIS_MODES:
        if mode.lower() == key:
            return mode
    raise ValueError(f"--emphasis must be one of {', '.join(EMPHASIS_MODES)} (A1111's 'Emphasis mode'), "
                     f"got {emphasis!r}")


def _check_eta(eta: float, samplers: list[str]) -> None:
    """Refuse ``--eta`` out of range or for passes none of whose samplers takes it.

    Raises:
        ValueError: naming the option and the samplers that take it.
    """
    from ..sampler_tables import ETA_SAMPLERS, canonical_sampler

    if not eta >= 0:
        raise ValueError(f"--eta must be >= 0 (A1111's 'Eta for ancestral samplers'; 1: the default), got {eta}")
    if not any(canonical_sampler(s) in ETA_SAMPLERS for s in samplers):
        raise ValueError(f"--eta: {' and '.join(samplers)} {'takes' if len(samplers) == 1 else 'take'} no η; A1111's "
                         f"'Eta for ancestral samplers' is {', '.join(ETA_SAMPLERS)}'s")


def _uncond_skip(skip_early_cfg: float, ngms: float, ngms_all_steps: bool, sampler: str, schedule: str | None, *,
                 seen: Callable[[str], None] | None = None):
    """The :class:`sdadapt.uncond_skip.UncondSkip` of ``--skip-early-cfg`` / ``--ngms`` / ``--ngms-all-steps``
    (``None``: both off), checked before any loading.

    Raises:
        ValueError: a value out of range, ``--ngms-all-steps`` without ``--ngms``, ``--ngms`` on a sampler that runs
            diffusers' grid (no schedule): each names its option.
    """
    from ..sampler_tables import runs_a1111_timesteps
    from ..samplers import KDIFFUSION_ONLY
    from ..uncond_skip import UncondSkip

    if ngms_all_steps and not ngms:
        raise ValueError("--ngms-all-steps applies A1111's NGMS on every call: give --ngms SIGMA too")
    if not skip_early_cfg and not ngms:
        return None
    if ngms and schedule is None and sampler not in KDIFFUSION_ONLY and not runs_a1111_timesteps(sampler, None):
        raise ValueError(f"--ngms compares each model call's σ, which sdadapt reads on A1111's grids: give {sampler} "
                         "a --schedule (automatic is A1111's default) or leave --ngms out")
    try:
        return UncondSkip(ngms=ngms, ngms_all_steps=ngms_all_steps, skip_early=skip_early_cfg, seen=seen)
    except ValueError as exc:
        raise ValueError(f"--skip-early-cfg / --ngms: {exc}") from None


def _a1111_noise_and_schedule(*, noise: str | None, subseed: int | None, subseed_strength: float,
                               seed_resize_from: tuple[int, int] | None, ensd: int, seed: int, schedule: str | None,
                               sigma_min: float, sigma_max: float, rho: float, beta_alpha: float, beta_beta: float,
                               old_karras_sigmas: bool, always_discard: bool = False, sgm: bool = False):
    """``(A1111Seeds or None, ScheduleOptions or None)`` of the generate options, checked before any loading.

    Raises:
        ValueError: a bad ``--noise``, variation/resize/ENSD options without ``--noise``, a negative seed with
            ``--noise``, schedule settings without a schedule (each names its option).
    """
    from ..samplers.a1111_noise import A1111Seeds
    from ..samplers.schedules import ScheduleOptions

    seeds = None
    if noise is not None:
        sources = {"a1111": "nv", "a1111-nv": "nv", "a1111-gpu": "nv", "a1111-cpu": "cpu"}
        if noise.strip().lower() not in sources:
            raise ValueError(f"--noise must be a1111 (A1111's GPU/NV noise) or a1111-cpu, got {noise!r}")
        if seed < 0:
            raise ValueError(f"--seed must be >= 0 with --noise {noise} (A1111's seeds are), got {seed}")
        if seed + int(ensd or 0) < 0:
            raise ValueError(f"--ensd {ensd} with --seed {seed}: the sampler noise's seed SEED + ENSD must be >= 0")
        try:
            seeds = A1111Seeds(source=sources[noise.strip().lower()], subseed=subseed,
                               subseed_strength=subseed_strength, seed_resize_from=seed_resize_from, ensd=ensd)
        except ValueError as exc:
            raise ValueError(f"--subseed/--subseed-strength: {exc}") from None
    elif subseed is not None or subseed_strength or seed_resize_from or ensd:
        raise ValueError("--subseed, --subseed-strength, --seed-resize-from and --ensd shape A1111's noise: "
                         "add --noise a1111 (or a1111-cpu)")
    try:
        options = ScheduleOptions(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, beta_alpha=beta_alpha,
                                  beta_beta=beta_beta, old_karras_sigmas=old_karras_sigmas,
                                  always_discard_next_to_last_sigma=bool(always_discard),
                                  sgm_noise_multiplier=bool(sgm))
    except ValueError as exc:
        raise ValueError(f"--sigma-min/--sigma-max/--rho/--beta-alpha/--beta-beta: {exc}") from None
    if options.is_default:
        return seeds, None
    if schedule is None:
        raise ValueError("--sigma-min, --sigma-max, --rho, --beta-alpha, --beta-beta, --old-karras-sigmas, "
                         "--always-discard-next-to-last-sigma and --sgm-noise-multiplier shape a run on one of A1111's "
                         "schedules: add --schedule (e.g. --schedule karras, or automatic)")
    return seeds, options


def image_seed(seed: int, i: int, *, subseed_strength: float = 0.0) -> int:
    """Image ``i``'s seed of a run from ``seed``: ``seed + i``, or ``seed`` for every image when A1111's variation
    strength ``subseed_strength`` is not 0 (modules/processing.py ``process_images_inner``: ``p.all_seeds =
    [int(seed) + (x if p.subseed_strength == 0 else 0) ...]``; the variations then differ by their variation seed
    ``subseed + i``). ``subseed_strength``: the one in effect (0 without ``--noise``, which alone draws variations)."""
    return int(seed) + (i if not subseed_strength else 0)


def _image_seeds(seeds, i: int):
    """Image i's :class:`~sdadapt.samplers.a1111_noise.A1111Seeds` (its seed is ``SEED + i``, passed apart): the
    variation seed ``SUBSEED + i``, as A1111's ``all_subseeds``."""
    from dataclasses import replace as replaced

    return seeds if seeds.subseed is None else replaced(seeds, subseed=seeds.subseed + i)


def _without_emphasis(text: str, say: Callable[[str], None]) -> str:
    """``text`` with A1111 emphasis taken out (``(red:1.3)`` -> ``red``), said on ``say``, for a
    model that reads no prompt weights (the toy); ``text`` itself when it has none
    (:func:`sdadapt.prompt_guidance.without_emphasis`, the inversion's rule too)."""
    from ..prompt_guidance import without_emphasis

    plain = without_emphasis(text)
    if plain != text:
        say(f"warning: this model reads no prompt weights; {text!r} is read as {plain!r}")
    return plain


def _networks(tag_loras) -> list[tuple]:
    """What a list of tag LoRAs merges (the tag texts aside): ``(file, te, unet, block weights, dyn)`` in order."""
    return [(item.file, item.te, item.unet, item.block_weights, item.dyn) for item in tag_loras]


def _apply_lora_file(system, path: Path, scale: float, *, unet_scale: float | None = None,
                     option: str = "--lora", block_weights: tuple[float, ...] | None = None,
                     handles: list | None = None, files: dict | None = None) -> dict:
    """Merge a LoRA-family file into the system's weights, every component (:func:`_apply_lora_parts` without
    ``hold_unet``); its report ``{"file", "scale", "layers", ...}``."""
    return _apply_lora_parts(system, path, scale, unet_scale=unet_scale, option=option, block_weights=block_weights,
                             handles=handles, files=files)[0]


def _apply_lora_parts(system, path: Path, scale: float, *, unet_scale: float | None = None,
                      option: str = "--lora", block_weights: tuple[float, ...] | None = None,
                      handles: list | None = None, files: dict | None = None,
                      hold_unet: bool = False, dyn: int | None = None) -> tuple[dict, list]:
    """Merge a LoRA-family file into the system's weights (``apply_lora`` per component): the text
    encoders at ``scale``, the UNet at ``unet_scale`` (default ``scale``; A1111's ``<lora:NAME:TE:UNET>``).
    ``option`` names the request in errors (``--lora`` or the prompt tag). ``block_weights``: the LoRA Block
    Weight extension's 26 slot weights, each layer's multiplier times its block's
    (:func:`sdadapt.jobs.generate_lbw.lbw_groups`). ``handles``: gets each ``apply_lora`` undo handle. ``files``: the
    files read so far (path -> what ``load_lora`` returned), read and filled here: a file merged again (the hires
    pass's switch, once per image) is read once per run. ``hold_unet``: the UNet part is not merged but its groups
    returned (a tag's step range: :mod:`sdadapt.jobs.generate_lbw_steps`). ``dyn``: A1111's ``dyn=N``, each LoRA
    layer's first N ranks at the file's scale (:func:`sdadapt.loratools.dylora.a1111_dyn_state`).

    Returns:
        ``(report, unet_groups)``: the report ``{"file", "scale", "layers", ...}`` (``layers``: the merged and the
        held layers) and, with ``hold_unet``, the UNet's groups ``(module, state, scale)`` in merge order (else
        ``[]``).
    """
    from ..apply import apply_lora
    from ..formats import load_lora
    from ..formats.layers import group_by_layer, resolve_layers
    from ..formats.unet_keys import model_layers_per_block
    from .generate_lbw import lbw_groups

    # LDM-named UNet layers (SDXL kohya files) map with the model's own UNet layout
    if files is not None and path in files:
        components, metadata = files[path]
    else:
        components, metadata = load_lora(path, layers_per_block=model_layers_per_block(getattr(system, "unet", None)))
        if "model" in components:  # a peft adapter: one model's layers, its component found by them
            from ..formats.peft_component import peft_component

            components = {peft_component(system, components["model"], source=f"{option} {path}"): components["model"]}
        if files is not None:
            files[path] = components, metadata
    layers = unused = 0
    unet_groups: list = []
    for component, state in components.items():
        module = getattr(system, component, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"{option} {path}: it adapts a {component}, which this model does not have "
                             f"(a LoRA for {metadata.get('ss_base_model_version', 'another model')}?)")
        multiplier = unet_scale if component == "unet" and unet_scale is not None else scale
        if component == "text_encoder" and str(getattr(system, "base_model", "")).startswith("sd2"):
            from ..formats.clip_keys import without_layers_past

            state, past = without_layers_past(state, int(module.config.num_hidden_layers))
            unused += past
        if dyn is not None:
            from ..loratools.dylora import a1111_dyn_state

            state = a1111_dyn_state(state, dyn)
        groups = lbw_groups(state, component, multiplier, block_weights, sdxl=bool(getattr(system, "is_sdxl", False)),
                            tag=option)
        try:
            applied_names = []
            for group_scale, group_state in groups:
                if component == "unet" and hold_unet:  # (its layers found now, merged per model call)
                    applied_names.extend(resolve_layers(module, list(group_by_layer(group_state))).values())
                    unet_groups.append((module, group_state, group_scale))
                    continue
                applied = apply_lora(module, group_state, scale=group_scale)
                applied_names.extend(applied.names)
                if handles is not None:
                    handles.append(applied)
        except (ValueError, KeyError, RuntimeError) as exc:
            details = " ".join(str(exc).split())
            details = details if len(details) <= 300 else details[:300].rsplit(" ", 1)[0] + " ..."
            made_for = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
            model = "SDXL" if getattr(system, "is_sdxl", False) else "an SD1/SD2 model" if hasattr(system, "is_sdxl") else None
            hint = f": the file says it is for {made_for}" if made_for else ""
            hint += f"{', and this is' if hint else ': this model is'} {model}" if model else ""
            raise ValueError(f"{option} {path}: does not fit this model's {component}{hint} ({details})") from None
        layers += len(applied_names)
    report = {"file": str(path), "scale": scale, "layers": layers}
    if unused:
        report["unused_layers"] = unused
    if block_weights is not None:
        report["block_weights"] = list(block_weights)
    if dyn is not None:
        report["dyn"] = dyn
    return (report if unet_scale is None else {**report, "unet_scale": unet_scale, "tag": option}), unet_groups


def _apply_custom_diffusion_file(system, path: Path, scale: float):
    """Apply a Custom Diffusion result to the system's UNet and inject its modifier tokens."""
    from ..custom_diffusion import apply_custom_diffusion
    from ..formats.files import WeightFileError

    if getattr(system, "text_encoder_2", None) is not None:
        raise ValueError(f"--custom-diffusion {path}: Custom Diffusion files are for one-text-encoder models "
                         "(SD1/SD2, the toy); this is an SDXL model")
    try:
        return apply_custom_diffusion(system.unet, path, scale=scale, text_encoder=system.text_encoder,
                                      tokenizer=system.tokenizer)
    except WeightFileError as exc:  # (its message names the file already, as a rule)
        raise WeightFileError(f"--custom-diffusion {exc}" if str(exc).startswith(f"{path}:")
                              else f"--custom-diffusion {path}: {exc}") from None


def _token_ids(system) -> Callable[[str], list[int]]:
    """The model's tokenizer as ``text -> token ids`` without special tokens (the toy: its words)."""
    tokenizer = getattr(system, "tokenizer", None)
    if tokenizer is not None and callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        from ..clip_text import added_tokens, clip_clean

        # (the slow CLIP tokenizer's clean-up, as A1111's tokenizer runs it)
        return lambda text: list(tokenizer(clip_clean(text, added=added_tokens(tokenizer)),
                                           add_special_tokens=False).input_ids)
    vocabulary: dict[str, int] = {}
    return lambda text: [vocabulary.setdefault(word, len(vocabulary)) for word in text.lower().split()]


def _inject_embedding_file(system, path: Path):
    """Load a textual-inversion file and inject it (SDXL: both encoders)."""
    from ..formats.embeddings import load_embedding

    return _inject_embedding(system, load_embedding(path), path=path)


def _inject_embedding(system, embedding, *, path: Path | str):
    """Inject ``embedding`` (read from ``path``: a file, or a LoRA file that bundles it) into the text encoder(s)."""
    from ..embeddings import inject_embedding
    from ..embeddings.tokens import TriggerTakenError

    if getattr(system, "text_encoder_2", None) is not None:
        encoders = (system.text_encoder, system.text_encoder_2)
        tokenizers = (system.tokenizer, system.tokenizer_2)
    else:
        encoders, tokenizers = system.text_encoder, system.tokenizer
    try:
        return inject_embedding(encoders, tokenizers, embedding, a1111=True)  # (A1111's name matching)
    except TriggerTakenError:
        raise ValueError(f"--embedding {path}: another embedding named {embedding.name!r} is loaded already (a file's "
                         "name is its trigger word, A1111's rule); give one of them, or rename one file") from None
    except ValueError as exc:
        holds = ", ".join(f"{key} {tuple(v.shape)}" for key, v in embedding.vectors.items())
        if isinstance(encoders, tuple):
            wanted = "an SDXL embedding (clip_l and clip_g vectors, e.g. kohya's or A1111's SDXL files)"
        else:
            wanted = f"an embedding of width {encoders.get_input_embeddings().weight.shape[1]}"
            if len(embedding.vectors) > 1:  # (the library's advice is Python's: pass both encoders)
                raise ValueError(f"--embedding {path}: an SDXL embedding (it holds {holds}) and this model has one text "
                                 f"encoder, which needs {wanted}: use an embedding made for this model, or an SDXL "
                                 "checkpoint as --model") from None
        raise ValueError(f"--embedding {path}: does not fit this model: the file holds {holds}, this model needs "
                         f"{wanted} ({exc})") from None
