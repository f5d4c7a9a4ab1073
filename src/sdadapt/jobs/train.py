"""``python -m sdadapt train METHOD``: a whole training run from :class:`TrainOptions` (see docs/train.md).

Order of work: every option and output checked (nothing existing replaced without ``overwrite``),
the dataset read and bucketed (one report line per image), the model loaded, latents cached per
bucket, class images made, then :func:`sdadapt.methods.fit` with an ``on_step`` that writes the
CSV/TensorBoard log, periodic saves with the resumable state, and samples; the final file gets
kohya's ``ss_*`` training metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PeerProcessError
from ..formats.files import StagedOutputs, make_output_folder
from ..images import ImageFolderError
from ..methods import FitConfig, fit
from ..plurals import plural
from ..methods.finetune import EMAWeights, extracted_lora_path
from ..methods.fit import DEFAULT_MIN_SNR_GAMMA, FitProgress
from ..training import data_parallel
from ..training.data import (
    ASSEMBLY_KOHYA,
    ASSEMBLY_KOHYA_2,
    BUCKETS_BEFORE,
    BUCKETS_KOHYA,
    EMPTIES_KEPT,
    FIRST_LINE_CAPTIONS,
    TRIGGER_FILLED,
    TRIGGER_WRAPPED,
    dataset_dirs_of,
    kohya_dataset_dirs,
    kohya_folder_names,
    tag_frequency_of,
)
from ..training.half_weights import cast_trainable_
from ..training.loss_masks import LossMaskSource
from ..timestep_tables import TimestepSampling
from ..training.step import StepConfig
from . import train_optimizer, train_schedule
from .demo import Progress, _check_dtype, _method, prior_images
from .initial_step import (
    check_initial_step_options,
    initial_step_notes,
    initial_step_record,
    resolve_initial_step,
)
from .models import load_system, resolve_device
from .save_rotation import PeriodicSave, remove_save, saves_to_remove

__all__ = ["TrainOptions", "run_train", "Bars", "TE2_AT_LEARNING_RATE", "DEFAULT_MIN_SNR_GAMMA",
           "DEFAULT_SAMPLE_SAMPLER"]

#: ``bars(label, unit) -> progress(done, total, info)``: one progress bar per phase (the CLI draws them)
Bars = Callable[[str, str], Callable[..., None]]
#: ``TrainOptions.text_encoder_2_lr`` for kohya's ``learning_rate_te1`` without ``learning_rate_te2``: the second
#: text encoder trains at the run's ``learning_rate``, as ``sdxl_train.py`` (``learning_rate_te2 or learning_rate``)
TE2_AT_LEARNING_RATE = "learning_rate"


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``python -m sdadapt train METHOD`` takes (flag ``--foo-bar`` = field ``foo_bar``,
    also the TOML config key). ``None`` means the method's or the model's default.

    Data: ``images`` (kohya folder layout), ``prompt`` (caption of images without one),
    ``caption_extension``, ``repeats`` (of images outside ``N_name`` folders), ``shuffle_caption``,
    ``keep_tokens``, ``caption_dropout_rate``, ``caption_tag_dropout_rate``, ``resolution``
    ((height, width); default the model's); kohya's caption options with kohya's names and defaults
    (:class:`sdadapt.training.data.CaptionOptions`): ``caption_prefix`` / ``caption_suffix`` (joined
    on with a space), ``caption_dropout_every_n_epochs`` (every N-th epoch, counted from 1, trains on
    empty captions), ``enable_wildcard`` (a caption file's lines: one drawn at each use; ``{a|b}``:
    one choice drawn at each use), ``keep_tokens_separator`` (e.g. ``"|||"``: the tags before it never
    move or drop), ``secondary_separator`` (e.g. ``";;;"``: tags joined by it move as one, then it
    becomes a comma), ``caption_separator`` (the tag separator, default ``","``), ``token_warmup_min`` /
    ``token_warmup_step`` (the movable tags used grow from
    ``min`` to all by that step; below 1 a share of the steps) and ``weighted_captions`` (A1111
    emphasis ``(word:1.2)`` / ``[word]`` in the captions scales each token's text states,
    :mod:`sdadapt.prompt_weights`; Stable Diffusion models, not trigger-word methods);
    ``enable_bucket``, ``min_bucket_reso``,
    ``max_bucket_reso``, ``bucket_reso_steps``, ``bucket_no_upscale``; ``flip_aug`` (kohya's: the
    mirrored images' latents are cached too, twice the latent memory, and each use of an image trains
    on the mirrored one with probability 1/2, drawn from ``seed`` and the step: a resumed run makes the
    same draws; :attr:`sdadapt.training.data.Dataset.flip`); ``random_crop`` and ``color_aug``
    (kohya's pixel augmentations, :mod:`sdadapt.training.pixel_augment`: a random bucket-sized
    window of each scaled image, kohya's hue/gamma change; drawn at each use, so the latents are
    encoded at every step instead of cached); ``face_crop_aug_range`` (kohya's ``(LO, HI)`` or
    ``"LO,HI"``, :mod:`sdadapt.training.face_crop`: without buckets, an image whose name gives a face,
    ``<name>_<cx>_<cy>_<w>_<h>``, is scaled by a drawn factor and cut around it at each use; unused with
    buckets, as kohya's); ``resize_aug`` (``train custom-diffusion`` only: Custom Diffusion's resize
    augmentation as diffusers' ``train_custom_diffusion.py``, :func:`sdadapt.training.pixel_augment.draw_resize`:
    each use of a training image rescaled to 1/3–1.4 of its size, padded or cut, its loss the mean over the
    image's latent region and its caption prefixed, "a far away " / "zoomed in " …; the class images are
    not augmented; encoded at every step, not cached; not with ``alpha_mask`` / ``masked_loss``).
    ``cache_latents_to_disk`` (kohya's: each image's VAE latents kept in a ``.npz`` file beside it, in
    kohya's names and keys, and read back by the next run instead of encoding;
    :mod:`sdadapt.training.kohya_latent_files`; not with the pixel augmentations above).

    Trigger-word methods (textual inversion, DreamArtist, Custom Diffusion): captions must mention
    ``--token``. Images without a caption get a random one of the ``templates`` set (``object``:
    "a photo of a {token}" …, the paper's; ``style``: "a painting in the style of {token}" …), drawn
    anew each time the image is used (seeded by ``seed`` and the step: a resumed run continues the
    same sequence); captions without the token become ``caption_template`` (``{token}``, ``{caption}``;
    A1111's ``[name]``, ``[filewords]`` work too; default ``"{token}, {caption}"``); see
    :func:`sdadapt.methods.textual_inversion.trigger_captions`. ``templates_replace_captions``
    (kohya's ``use_object_template`` / ``use_style_template``, whose TOML keys set it): every training
    and class image trains on one of the ``templates`` drawn at each use (unless its caption is
    dropped), its own caption, ``caption_template``, prefix / suffix and the tag options unused.

    Model: ``model`` (``toy``, a diffusers folder, a single file), ``tokenizer``,
    ``prediction_type``, ``clip_skip`` (``None``: not given, the last layer, kohya's ``None``), ``max_token_length`` (75, 150 or 225 caption tokens: kohya's
    long captions in 75-token CLIP windows, :mod:`sdadapt.text_chunks`), ``vae`` (kohya's ``--vae``: a VAE file or
    folder that replaces the model's for the latents and samples, :mod:`sdadapt.external_vae`), ``device``; ``method_options`` (the method's own, e.g.
    ``{"rank": 16}``; see :class:`sdadapt.methods.MethodOption`).

    Optimisation: ``steps`` or ``epochs``, ``batch_size``, ``gradient_accumulation_steps``,
    ``learning_rate`` (``unet_lr`` overrides it), ``text_encoder_lr``, ``text_encoder_2_lr`` (SDXL's second
    encoder; default ``text_encoder_lr``; kohya's ``learning_rate_te2``; :data:`TE2_AT_LEARNING_RATE`, what
    kohya's ``learning_rate_te1`` alone reads as: the run's ``learning_rate`` on a model with two text encoders,
    as ``sdxl_train.py``, none on a model with one), ``optimizer``,
    ``weight_decay`` (``None``: the optimiser's own, 0.01 for the AdamW ones, 0 for Adafactor, Lion and SGD),
    ``optimizer_args`` (kohya's ``KEY=VALUE`` strings, e.g. ``("betas=0.9,0.99",)``:
    :mod:`sdadapt.training.optimizer_args`; a ``weight_decay`` there wins over the field, which then
    must be left out or agree; Adafactor gets kohya's defaults — ``relative_step=True`` unless the
    arguments say otherwise, the LR and schedule then unused — :mod:`sdadapt.jobs.train_optimizer`),
    ``scale_weight_norms`` (lora, locon, loha, lokr: after
    each step shrink every adapter whose ‖ΔW‖ exceeds it onto that norm; diag-oft, boft: ‖oft_blocks‖, as
    LyCORIS; kohya's max-norm
    regularisation, :mod:`sdadapt.training.max_norm`), ``lr_scheduler``, ``lr_warmup_steps`` (a count, or a fraction of the steps
    when < 1), ``lr_scheduler_num_cycles``, ``max_grad_norm`` (0 = no clipping),
    ``mixed_precision`` (``no``/``fp16``/``bf16``), ``min_snr_gamma`` (0 = off; ``None``: not given,
    :data:`DEFAULT_MIN_SNR_GAMMA`, and off on an EDM model, where a γ given is refused), ``noise_offset``,
    ``ema_decay``, ``seed``, ``stop_on_nan``; ``text_encoder_steps`` (train the text encoder for
    the first N steps only, kohya's ``stop_text_encoder_training``). kohya's loss and noise
    options, with kohya's names and defaults: ``loss_type`` (``l2``, ``l1``, ``huber``,
    ``smooth_l1``) with ``huber_c`` (0.1) and ``huber_schedule`` (``snr``, ``exponential``,
    ``constant``), ``debiased_estimation_loss``, ``multires_noise_iterations`` with
    ``multires_noise_discount`` (0.3; pyramid noise), ``ip_noise_gamma`` (input perturbation),
    ``min_timestep`` / ``max_timestep`` (train on ``[min, max)`` of the model's T timesteps, 1000 for SD/SDXL); the timestep draw's shape
    (:meth:`timestep_sampling`, :mod:`sdadapt.training.timestep_distribution`): diffusers' ``timestep_bias_strategy``
    / ``_multiplier`` / ``_begin`` / ``_end`` / ``_portion`` or OneTrainer's ``timestep_distribution`` with
    ``noising_weight``, ``noising_bias``, ``timestep_shift``;
    ``huber_scale`` (1.0: multiplies ``huber_c`` of the ``constant`` and ``exponential`` schedules, as
    kohya's), ``noise_offset_random_strength`` (each batch's offset strength drawn in
    ``[0, noise_offset)``), ``adaptive_noise_scale`` (needs ``noise_offset``: the offset of each
    latent channel grows by ``scale·|channel mean|``, clamped at 0), ``zero_terminal_snr`` (train on
    the schedule rescaled to zero terminal SNR; samples keep the model's schedule, as kohya's; meant
    for v-prediction models; :attr:`sdadapt.methods.FitConfig.zero_terminal_snr`);
    ``ip_noise_gamma_random_strength`` (each batch's input-perturbation strength drawn in
    ``[0, ip_noise_gamma)``), ``scale_v_pred_loss_like_noise_pred`` (v-prediction models: each
    sample's loss × ``SNR/(SNR + 1)``, the ε-prediction loss's scale), ``v_pred_like_loss`` (ε-prediction
    models: add that many times a v-prediction-like loss, ``loss·(1 + X·(SNR + 1)/SNR)``; SNR capped at
    1000 in both, as kohya's: :func:`sdadapt.training.diffusion.noise_like_scale`). Masked loss
    (:mod:`sdadapt.training.loss_masks`): ``alpha_mask`` (each image's alpha channel weights its
    loss; a dataset TOML's subsets may set their own, this is their fallback), ``masked_loss`` with ``conditioning_data_dir`` (the red channel of the mask image of the
    same name in that folder weights it); the masks follow the images' buckets, crops and flips.
    ``resize_interpolation``: kohya's method of scaling images (and their masks) to their buckets
    (:mod:`sdadapt.resampling`; ``None``: kohya's default, ``area`` when shrinking both ways, else
    ``lanczos``; a dataset TOML's subsets
    may set their own, this is their fallback).

    Memory: ``gradient_checkpointing`` (recompute the UNet blocks' activations in backward; any
    method; ``gradient_checkpointing_fraction`` in ``(0, 1]`` recomputes only that share of the
    blocks, those keeping the most activations, and turns checkpointing on), ``fused_backward_pass`` (full, dreambooth: the optimiser steps inside backward, no
    gradient buffer; needs ``max_grad_norm=0``, no accumulation, no fp16) — see
    :class:`sdadapt.methods.FitConfig`; ``full_bf16`` (full, dreambooth and the adapter methods, with
    ``mixed_precision="bf16"``: the trained parts' weights in bf16, written back with stochastic
    rounding; :meth:`~sdadapt.methods.finetune.FullAdaptation.cast`); ``full_fp16`` (the adapter
    methods, with ``mixed_precision="fp16"``: the adapters' weights in fp16, the loss scaler
    unscaling fp16 gradients, :mod:`sdadapt.training.half_weights`); ``fp8_base`` (kohya's: the frozen
    UNet's and text encoders' Linear / Conv weights stored in float8_e4m3fn, upcast by the
    ``mixed_precision`` autocast op by op; the adapter methods only) and ``fp8_base_unet`` (the UNet's
    only) — :func:`sdadapt.training.fp8_base.cast_base_to_fp8`.

    Speed: ``sdpa_backends`` — ``"measure"`` (time flash / memory-efficient / cuDNN / math attention on
    the first batch's attention calls and train under the fastest order) or a comma list such as
    ``"flash,math"`` (tried in that order); default: torch's choice (:mod:`sdadapt.training.attention`).
    ``half_precision_norms``: GroupNorm/LayerNorm read and write the mixed-precision dtype instead of CUDA
    autocast's float32 (``StepConfig.half_precision_norms``, :mod:`sdadapt.training.norm_precision`).
    ``fused_lora_linear``: each linear LoRA layer runs as one autograd function, its delta added inside the
    base GEMM (two kernels fewer per layer; ``StepConfig.fused_lora_linear``, :mod:`sdadapt.training.fused_lora`).
    ``cache_text_encoder_outputs`` (kohya's: every caption encoded once before training, the steps
    train the UNet on the cached conditioning, bit for bit what the text encoder gives; needs a
    UNet-only run and captions fixed before training — a whole-caption dropout is fine;
    :mod:`sdadapt.training.text_cache`). ``cache_text_encoder_outputs_to_disk`` (kohya's; turns
    ``cache_text_encoder_outputs`` on): SDXL only, each image's caption encoding kept in kohya's
    ``<stem>_te_outputs.npz`` beside it and read back on the next run (kohya's files too),
    :mod:`sdadapt.training.kohya_text_files`. ``cuda_graph`` (each optimiser step replayed as one CUDA graph per batch layout after 3 eager
    steps: :attr:`sdadapt.methods.FitConfig.cuda_graph`; AdamW, Adafactor, Lion, Prodigy or D-Adaptation optimisers, no fp16,
    no fused backward; on a CPU the steps run eagerly). ``ddp_timeout``: under torchrun, the process
    group's timeout in minutes (kohya's; ``None``: torch's, 10 minutes; docs/train.md#several-gpus-torchrun-accelerate-launch). ``torch_compile``
    with ``dynamo_backend`` (default ``"inductor"``; kohya's names): ``torch.compile`` the model
    the step calls (:attr:`sdadapt.methods.FitConfig.compile_backend`).

    Whole-model methods (full, dreambooth): ``ema_save`` (``weights``: the saved weights are the
    EMA; ``beside``: the raw weights, with the EMA beside them — ``model_ema.*`` keys in an LDM file,
    ``unet_ema/`` in a diffusers folder), ``extract_lora`` (also write ``<stem>-lora<RANK>.safetensors``,
    the LoRA of the change).

    Prior preservation: ``class_prompt``, ``class_images``, ``prior``, ``prior_weight``;
    ``class_data_dir`` (diffusers' ``--class_data_dir``: the generated class images kept in that
    folder, the missing ones made and written there, the next run reusing them; bit for bit the
    images made without it: :mod:`sdadapt.training.class_folder`);
    ``reg_data_dir`` (kohya's: a folder of your own class images in kohya's layout, ``N_classname/``,
    read, bucketed and cached as ``images``, balanced against the training images by kohya's rule and
    trained on as the prior batches instead of generated ones; :mod:`sdadapt.training.reg_data`).

    kohya's data descriptions (:mod:`sdadapt.training.dataset_config`): ``dataset_config`` (kohya's
    dataset TOML, in place of ``images`` and ``reg_data_dir``: one ``[[datasets]]`` block whose
    resolution, batch size and bucket keys replace these options, and subsets with their own
    ``num_repeats``, ``class_tokens``, caption files and caption options; ``is_reg`` subsets are the
    prior data as ``reg_data_dir``'s), ``in_json`` (kohya's fine-tuning metadata: image key ->
    caption / tags, the images in ``images``).

    ``concepts_list`` (``train custom-diffusion`` only): diffusers' ``--concepts_list`` JSON in place
    of ``images`` (:mod:`sdadapt.custom_diffusion.concepts`): each concept's images on its
    ``instance_prompt``, its class images (``class_images`` per concept, default diffusers' 200) from
    its ``class_data_dir``, topped up there with generated images of its ``class_prompt``.

    Outputs: ``out``, ``overwrite``, ``dtype``, ``save_every_n_steps``, ``save_every_n_epochs``,
    ``save_state`` (write the resumable state with each save), ``resume`` (a state folder),
    ``initial_step`` / ``initial_epoch`` / ``skip_until_initial_step`` (kohya's: a new run that
    starts at that step, :mod:`sdadapt.jobs.initial_step`),
    ``sample_prompts`` (kohya prompt file), ``sample_every_n_steps``, ``sample_every_n_epochs``,
    ``sample_sampler`` (``None``: not given — :data:`DEFAULT_SAMPLE_SAMPLER` ``ddim``, and an EDM model's own
    scheduler, where a sampler with no EDM form given, ``ddim`` too, is refused), ``sample_steps``,
    ``log_with`` (``auto``/``csv``/``tensorboard``),
    kohya's validation loss: ``validation_split`` (the share of each subset's images held out,
    kohya's seeded draw: :mod:`sdadapt.training.validation`), ``validation_seed`` (default ``seed``),
    ``validate_every_n_steps``, ``validate_every_n_epochs`` (default every epoch),
    ``max_validation_steps`` (the loss in the CSV / TensorBoard log and the report),
    ``training_comment``. kohya's: ``save_last_n_steps`` / ``save_last_n_epochs`` (after each
    periodic save, remove the older saves of the run lineage out of the window, kohya's rule:
    :mod:`sdadapt.jobs.save_rotation`; the state's ``run.json`` lists them so ``resume`` continues),
    ``save_n_epoch_ratio`` (save every ``floor(epochs / N)`` epochs, at least 1, in place of
    ``save_every_n_epochs``), ``save_state_on_train_end`` (the state after the last step too),
    ``sample_at_first`` (samples before step 1, ``step000000-*.png``; not again when resuming),
    ``lr_scheduler_power`` and ``lr_scheduler_args`` (``("lr_end=1e-6",)``) of the ``polynomial``
    schedule (:attr:`sdadapt.methods.FitConfig.schedule`), ``lr_decay_steps`` (count, or share of
    the steps below 1), ``lr_scheduler_timescale``, ``lr_scheduler_min_lr_ratio`` and the other
    ``lr_scheduler_args`` of kohya's other schedules (``cosine_with_min_lr``,
    ``warmup_stable_decay``, ``inverse_sqrt``, ``piecewise_constant``: which schedule reads which,
    :mod:`sdadapt.jobs.train_schedule`), ``lr_scheduler_type`` (kohya's: a ``torch.optim.lr_scheduler``
    class with ``lr_scheduler_args`` as its arguments, in place of ``lr_scheduler``:
    :mod:`sdadapt.training.torch_lr_schedules`), ``metadata_title`` / ``_author`` /
    ``_description`` / ``_license`` / ``_tags`` (written as ``modelspec.*``).

    ``config_defaults``: whose defaults filled the options the run left out, ``"sdadapt"`` (these
    fields') or ``"kohya"`` (a kohya ``--config`` file: kohya's argparse defaults,
    :mod:`sdadapt.cli.kohya_defaults`); recorded in the ``--resume`` record (``run.json``) when
    ``"kohya"``, and a resumed run must have the same.

    ``network_alpha_text``: the ``ss_network_alpha`` string kohya's ``train_network.py`` writes for the
    alpha as it was given (``str(args.network_alpha)``: ``"2.0"`` from its command line, ``"2"`` from a
    TOML integer, ``"1"`` for its default); ``None``: the saved tensors' alpha as ``str(float)``.

    ``kohya_network_args``: the ``ss_network_args`` text kohya's ``train_network.py`` writes (a kohya
    config's run): ``json.dumps`` of its ``network_args`` as written, ``dropout`` (``--network_dropout``)
    added when they lack it (train_network.py:664-677, 1203-1204); ``""``: kohya writes none (no
    ``network_args``); ``None``: the writer's, from the tensors and the options.
    """

    images: str | os.PathLike | None = None
    prompt: str | None = None
    caption_extension: str = ".txt"
    repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_template: str | None = None
    templates: str = "object"
    templates_replace_captions: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_every_n_epochs: int = 0
    enable_wildcard: bool = False
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_separator: str = ","
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    weighted_captions: bool = False
    resolution: tuple[int, int] | None = None
    enable_bucket: bool = True
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    bucket_no_upscale: bool = False
    flip_aug: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    masked_loss: bool = False
    conditioning_data_dir: str | os.PathLike | None = None
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | str | None = None
    resize_aug: bool = False
    cache_latents_to_disk: bool = False
    model: str = "toy"
    tokenizer: str | None = None
    vae: str | os.PathLike | None = None
    prediction_type: str | None = None
    clip_skip: int | None = None  # (None: not given — layer 1 is used; ss_clip_skip "None", as kohya writes)
    max_token_length: int = 75
    device: str = "auto"
    method_options: dict = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    text_encoder_2_lr: float | str | None = None
    optimizer: str = "adamw"
    weight_decay: float | None = None
    optimizer_args: tuple[str, ...] = ()
    scale_weight_norms: float | None = None
    lr_scheduler: str = "cosine"
    lr_warmup_steps: float | None = None
    lr_scheduler_num_cycles: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    min_snr_gamma: float | None = None  # (None: not given — DEFAULT_MIN_SNR_GAMMA, off on an EDM model)
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    zero_terminal_snr: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    timestep_bias_strategy: str = "none"  # diffusers' --timestep_bias_* (train_text_to_image_sdxl.py)
    timestep_bias_multiplier: float = 1.0
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    timestep_bias_portion: float = 0.25
    timestep_distribution: str = "uniform"  # OneTrainer's (ModelSetupNoiseMixin._get_timestep_discrete)
    noising_weight: float = 0.0
    noising_bias: float = 0.0
    timestep_shift: float = 1.0
    ema_decay: float | None = None
    ema_save: str = "weights"
    text_encoder_steps: int | None = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_fraction: float | None = None
    fused_backward_pass: bool = False
    sdpa_backends: str | None = None
    half_precision_norms: bool = False
    fused_lora_linear: bool = False
    cuda_graph: bool = False
    ddp_timeout: int | None = None
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    full_bf16: bool = False
    full_fp16: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    extract_lora: int | None = None
    seed: int = 0
    stop_on_nan: bool = True
    class_prompt: str | None = None
    class_images: int | None = None
    prior: bool | None = None
    prior_weight: float = 1.0
    reg_data_dir: str | os.PathLike | None = None
    class_data_dir: str | os.PathLike | None = None
    dataset_config: str | os.PathLike | None = None
    in_json: str | os.PathLike | None = None
    concepts_list: str | os.PathLike | None = None
    out: str | os.PathLike | None = None
    overwrite: bool = False
    dtype: torch.dtype | None = None
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_state: bool = True
    resume: str | os.PathLike | None = None
    initial_step: int | None = None
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False
    sample_prompts: str | os.PathLike | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_sampler: str | None = None  # (None: not given — DEFAULT_SAMPLE_SAMPLER, an EDM model's own scheduler)
    sample_steps: int = 20
    log_with: str = "auto"
    validation_split: float = 0.0
    validation_seed: int | None = None
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None
    training_comment: str | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_n_epoch_ratio: int | None = None
    save_state_on_train_end: bool = False
    sample_at_first: bool = False
    lr_scheduler_power: float = 1.0
    lr_scheduler_args: tuple[str, ...] = ()
    lr_decay_steps: float = 0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    config_defaults: str = "sdadapt"
    network_alpha_text: str | None = None
    kohya_network_args: str | None = None

    def timestep_range(self, num_train_timesteps: int = 1000) -> tuple[int, int] | None:
        """``[min_timestep, max_timestep)``, or ``None`` for all of them. The defaults are 0 and the model's
        ``num_train_timesteps`` T (kohya's train step: sd-scripts@48d368fa library/train_util.py:6089-6090, ``max_timestep
        = noise_scheduler.config.num_train_timesteps`` when not given). ``min == max``: that one timestep,
        ``[max, max + 1)`` (kohya's ``get_timesteps`` trains at ``max`` then, train_util.py:6062-6068)."""
        if self.min_timestep is None and self.max_timestep is None:
            return None
        low = 0 if self.min_timestep is None else self.min_timestep
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        return (low, high + 1) if low == high else (low, high)

    def timestep_sampling(self) -> TimestepSampling | None:
        """The timestep draw's shape (diffusers' bias or OneTrainer's distribution), ``None`` for kohya's uniform
        draw. Raises ValueError (naming the option) for values with no meaning."""
        sampling = TimestepSampling(
            bias_strategy=self.timestep_bias_strategy, bias_multiplier=self.timestep_bias_multiplier,
            bias_begin=self.timestep_bias_begin, bias_end=self.timestep_bias_end, bias_portion=self.timestep_bias_portion,
            distribution=self.timestep_distribution, noising_weight=self.noising_weight, noising_bias=self.noising_bias,
            shift=self.timestep_shift)
        return None if sampling.is_uniform else sampling

    def __post_init__(self) -> None:
        if self.ddp_timeout is not None and (isinstance(self.ddp_timeout, bool) or not isinstance(self.ddp_timeout, int)
                                             or self.ddp_timeout < 1):
            raise ValueError(f"--ddp-timeout must be a number of minutes >= 1 (the process group's timeout under torchrun), "
                             f"got {self.ddp_timeout!r}")
        from ..methods.fit import SCHEDULES
        from ..methods.optimizers import _OPTIMIZER_ALIASES, OPTIMIZERS, canonical_optimizer
        from ..samplers import canonical_sampler
        from ..training.face_crop import parse_face_crop_range

        object.__setattr__(self, "face_crop_aug_range", parse_face_crop_range(self.face_crop_aug_range,
                                                                              source="--face-crop-aug-range"))

        positive = ("steps", "epochs", "save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps",
                    "sample_every_n_epochs", "class_images", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 1, got {value}" + (" (leave it out for the method's default)" if name == "steps" else ""))
        for name in ("batch_size", "gradient_accumulation_steps", "repeats", "sample_steps", "lr_scheduler_num_cycles", "clip_skip"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # (clip_skip None: not given)
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "unet_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, name)
            if name == "text_encoder_2_lr" and value == TE2_AT_LEARNING_RATE:
                continue
            if isinstance(value, str) or value is not None and not value >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        for name in ("keep_tokens", "max_grad_norm", "min_snr_gamma", "noise_offset", "prior_weight",
                     "multires_noise_iterations", "ip_noise_gamma"):
            if name == "min_snr_gamma" and self.min_snr_gamma is None:  # (not given: DEFAULT_MIN_SNR_GAMMA)
                continue
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay is not None and (isinstance(self.weight_decay, bool) or not self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0 (leave it out for the optimiser's default: 0.01 for AdamW, "
                             f"0 for Adafactor), got {self.weight_decay!r}")
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.huber_schedule not in _HUBER_SCHEDULES:
            raise ValueError(f"--huber-schedule must be one of {', '.join(_HUBER_SCHEDULES)}, got {self.huber_schedule!r}")
        if not self.huber_c > 0:
            raise ValueError(f"--huber-c must be > 0, got {self.huber_c}")
        if not 0 < self.huber_scale < math.inf:
            raise ValueError(f"--huber-scale must be > 0 (it multiplies --huber-c), got {self.huber_scale}")
        if self.adaptive_noise_scale is not None:
            if not math.isfinite(self.adaptive_noise_scale):
                raise ValueError(f"--adaptive-noise-scale must be a finite number, got {self.adaptive_noise_scale}")
            if self.adaptive_noise_scale and not self.noise_offset:
                raise ValueError(f"--adaptive-noise-scale {self.adaptive_noise_scale} adds to the noise offset, so it needs "
                                 "--noise-offset X too (e.g. 0.05), as kohya's")
        if self.zero_terminal_snr and self.method_options.get("rec_weight"):
            raise ValueError("--zero-terminal-snr with --rec-weight: DreamArtist's reconstruction loss recovers x0 with "
                             "the model's own schedule, not the rescaled one the steps train on; use --rec-weight 0")
        if self.zero_terminal_snr and self.prediction_type == "epsilon" and self.debiased_estimation_loss:
            from ..methods.fit import zero_terminal_snr_clashes

            raise ValueError("--zero-terminal-snr cannot train " + "; ".join(zero_terminal_snr_clashes(
                StepConfig(debiased_estimation=True))))
        _check_v_pred_loss(self, self.prediction_type)
        if self.zero_terminal_snr and self.v_pred_like_loss:
            raise ValueError(f"--zero-terminal-snr with --v-pred-like-loss {self.v_pred_like_loss}: its weight "
                             "1 + X·(SNR + 1)/SNR is infinite at the last timestep's SNR 0; leave one of the two out")
        if self.conditioning_data_dir is not None:
            if not self.masked_loss:
                raise ValueError(f"--conditioning-data-dir {self.conditioning_data_dir} holds loss masks, read only with "
                                 "--masked-loss (kohya's): add --masked-loss, or leave the folder out")
            if not Path(self.conditioning_data_dir).is_dir():
                raise FileNotFoundError(f"--conditioning-data-dir {self.conditioning_data_dir}: no such folder (the "
                                        "folder of mask images named as the training images)")
        if self.multires_noise_iterations and not 0 < self.multires_noise_discount <= 1:  # (unused without: noted)
            raise ValueError(f"--multires-noise-discount must be in (0, 1], got {self.multires_noise_discount}")
        # (the model's T is not known before the load: checked against it there, _check_timesteps; here what holds for
        # any T, with 1000 — SD's, SDXL's — or a larger one the options need)
        low, high = self.timestep_range(max(1000, (self.min_timestep or 0) + 1)) or (0, 1000)
        if not 0 <= low < high:
            raise ValueError(f"--min-timestep {low} / --max-timestep {high}: need 0 <= min < max (the range [min, max) "
                             "of the model's training timesteps, 1000 for SD and SDXL)")
        if (sampling := self.timestep_sampling()) is not None:  # (its weights: none all 0)
            from ..training.timestep_distribution import check_timestep_draw
            check_timestep_draw(sampling, max(1000, high, self.timestep_bias_end), low=low, high=high)
        if self.lr_warmup_steps is not None and not self.lr_warmup_steps >= 0:
            raise ValueError(f"--lr-warmup-steps must be >= 0 (a count, or a fraction of the steps below 1), got {self.lr_warmup_steps}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty; give the caption words, or leave it out and put NAME.txt captions beside the images")
        unused_reg = self.dataset_config is not None  # (beside a dataset config --reg-data-dir is unused, as in kohya)
        if self.reg_data_dir is not None and self.class_images is not None and not unused_reg:
            raise ValueError(f"--reg-data-dir {self.reg_data_dir} gives your own class images and --class-images "
                             f"{self.class_images} asks for generated ones: give one of the two")
        if self.reg_data_dir is not None and self.prior is False and not unused_reg:
            raise ValueError(f"--reg-data-dir {self.reg_data_dir} is prior preservation with your class images, so it "
                             "cannot go with --no-prior: leave one of the two out")
        if self.class_data_dir is not None:
            if self.reg_data_dir is not None:
                raise ValueError(f"--class-data-dir {self.class_data_dir} keeps generated class images and --reg-data-dir "
                                 f"{self.reg_data_dir} gives your own (kohya's layout): give one of the two")
            if self.prior is False:
                raise ValueError(f"--class-data-dir {self.class_data_dir} keeps the class images of prior preservation, so "
                                 "it cannot go with --no-prior: leave one of the two out")
            if Path(self.class_data_dir).exists() and not Path(self.class_data_dir).is_dir():
                raise ValueError(f"--class-data-dir {self.class_data_dir}: is a file; give a folder for the class images "
                                 "(made when missing)")
        _check_data_sources(self)
        _check_loraplus_unet_base_weights_block_lr(self.method_options)  # LoRA+, --no-unet, --base-weights, --block-lr
        if self.method_options.get("dim_from_weights") and not self.method_options.get("network_weights"):
            raise ValueError("--dim-from-weights takes the modules and ranks from --network-weights FILE: give the file too")
        if self.class_prompt is not None and not self.class_prompt.strip():
            raise ValueError("--class-prompt is empty; give the class, e.g. 'a photo of a dog'")
        optimizer = canonical_optimizer(self.optimizer, option="--optimizer")
        if optimizer not in OPTIMIZERS:  # (kohya's module.Class: imported and probed by _check_optimizer_args below)
            if self.fused_backward_pass:
                raise ValueError(f"--fused-backward-pass steps one optimiser per block; {self.optimizer} is an imported "
                                 "class, which may compute over every trained parameter at once (kohya fuses Adafactor "
                                 "only): leave out --fused-backward-pass or use one of sdadapt's optimizers")
        _check_optimizer_args(self)  # (after the optimiser name is known good)
        prodigy = train_optimizer.prodigy_clashes(self)
        if prodigy:
            raise ValueError(f"--optimizer {self.optimizer} estimates one step size for every parameter group, so the groups' "
                             "learning rates must be the same or 0; it cannot train with " + "; ".join(prodigy))
        schedule_free = train_optimizer.schedule_free_clashes(self)
        if schedule_free:
            raise ValueError(f"--optimizer {self.optimizer} is schedule-free, so it cannot train with " + "; ".join(schedule_free))
        if self.scale_weight_norms is not None and (isinstance(self.scale_weight_norms, bool)
                                                    or not 0 < self.scale_weight_norms < math.inf):
            raise ValueError(f"--scale-weight-norms must be a number > 0 (the largest ‖ΔW‖ of an adapted layer, e.g. 1), "
                             f"got {self.scale_weight_norms!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        try:
            if self.sample_sampler is not None:  # (not given: DEFAULT_SAMPLE_SAMPLER, or an EDM model's own)
                canonical_sampler(self.sample_sampler)
        except ValueError as exc:
            raise ValueError(f"--sample-sampler: {exc}") from None
        if self.log_with not in ("auto", "csv", "tensorboard"):
            raise ValueError(f"--log-with must be auto, csv or tensorboard, got {self.log_with!r}")
        if isinstance(self.validation_split, bool) or not 0 <= self.validation_split < 1:
            raise ValueError(f"--validation-split must be in [0, 1) (the share of each subset's images held out for the "
                             f"validation loss; 0: none), got {self.validation_split!r}")
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r} (leave it out: "
                                 + ("every epoch)" if name == "validate_every_n_epochs" else
                                    "no validation by steps)" if name == "validate_every_n_steps" else "every held-out batch)"))
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"--prediction-type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if (self.sample_every_n_steps or self.sample_every_n_epochs) and self.sample_prompts is None:
            raise ValueError("--sample-every-n-steps/--sample-every-n-epochs need --sample-prompts FILE (one prompt a line)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), e.g. 0.999; got {self.ema_decay}")
        if self.ema_save not in ("weights", "beside"):
            raise ValueError(f"--ema-save must be weights or beside, got {self.ema_save!r}")
        if self.text_encoder_steps is not None and not self.text_encoder_steps >= 0:
            raise ValueError(f"--text-encoder-steps must be >= 0 (leave it out to train the text encoder every step), "
                             f"got {self.text_encoder_steps}")
        if self.extract_lora is not None and self.extract_lora < 1:
            raise ValueError(f"--extract-lora must be a LoRA rank >= 1, got {self.extract_lora}")
        if self.half_precision_norms and self.mixed_precision not in ("bf16", "fp16"):
            raise ValueError("--half-precision-norms keeps GroupNorm/LayerNorm in the mixed-precision dtype instead of "
                             "autocast's float32, so it needs --mixed-precision bf16 or fp16")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ValueError("--full-bf16 trains bf16 weights, so the forward pass must run under bf16 autocast: add "
                             "--mixed-precision bf16")
        if self.full_fp16 and self.mixed_precision != "fp16":  # (kohya: "full_fp16 requires mixed precision='fp16'")
            raise ValueError("--full-fp16 (kohya's full_fp16) trains fp16 weights, so the forward pass must run under "
                             "fp16 autocast with its loss scaler: add --mixed-precision fp16 (mixed_precision = \"fp16\"), "
                             "as kohya requires")
        if (self.full_fp16 or self.full_bf16) and _OPTIMIZER_ALIASES.get(self.optimizer.lower()) == "sgd-nesterov":
            flag, kept, step, instead = (("--full-fp16", "keeps an fp16 momentum and writes fp16", "an fp16",
                                          "adamw / lion (they update in float32)") if self.full_fp16 else
                                         ("--full-bf16", "writes bf16", "a bf16",
                                          "lion / adamw (they round bf16 weights stochastically)"))
            raise ValueError(f"{flag} with --optimizer sgd-nesterov: torch's SGD {kept} weights with round-to-nearest, "
                             f"which drops every update smaller than half {step} step; leave out {flag} or use {instead}")
        if (self.fp8_base or self.fp8_base_unet) and self.mixed_precision == "no":
            raise ValueError(f"{'--fp8-base' if self.fp8_base else '--fp8-base-unet'} stores the base weights in "
                             "float8, which only autocast's per-op upcast can compute with: add --mixed-precision bf16 "
                             "(or fp16), as kohya requires")
        if self.gradient_checkpointing_fraction is not None and not 0.0 < self.gradient_checkpointing_fraction <= 1.0:
            raise ValueError(f"--gradient-checkpointing-fraction must be in (0, 1] (the share of the UNet blocks to "
                             f"recompute; 1: all of them), got {self.gradient_checkpointing_fraction}")
        _sdpa_order(self.sdpa_backends)  # raises for an unknown name
        if self.fused_backward_pass:
            clashes = [what for what, clash in (
                (f"--max-grad-norm {self.max_grad_norm} (pass --max-grad-norm 0: the global norm needs every gradient at once)",
                 bool(self.max_grad_norm)),
                (f"--gradient-accumulation-steps {self.gradient_accumulation_steps}", self.gradient_accumulation_steps != 1),
                ("--mixed-precision fp16 (its GradScaler needs every gradient at once; use bf16)", self.mixed_precision == "fp16"),
            ) if clash]
            if clashes:
                raise ValueError("--fused-backward-pass steps each weight as soon as its gradient arrives, so it cannot be "
                                 "combined with " + "; ".join(clashes))
        if self.torch_compile:
            from ..methods.fit import _check_compile_backend

            try:
                _check_compile_backend(self.dynamo_backend)
            except ValueError as exc:
                raise ValueError(f"--dynamo-backend: {exc}") from None
        if self.cache_text_encoder_outputs_to_disk:  # kohya: it turns the cache on (sdxl_train_util.py)
            object.__setattr__(self, "cache_text_encoder_outputs", True)
        if self.cache_text_encoder_outputs:
            _check_text_cache_captions(self)
        if self.cuda_graph:
            from ..methods.fit import cuda_graph_clashes

            clashes = cuda_graph_clashes(fused_backward=self.fused_backward_pass,
                                         mixed_precision=self.mixed_precision, optimizer=self.optimizer,
                                         compile_backend=self.dynamo_backend if self.torch_compile else None)
            if clashes:
                raise ValueError("--cuda-graph captures each optimiser step in a CUDA graph, so it cannot be combined "
                                 "with " + "; ".join(clashes))
        from ..methods.textual_inversion import TEMPLATE_SETS, caption_template

        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"--templates must be one of {', '.join(TEMPLATE_SETS)}, got {self.templates!r}")
        if not isinstance(self.templates_replace_captions, bool):
            raise TypeError(f"templates_replace_captions must be True or False, got {self.templates_replace_captions!r}")
        if not isinstance(self.resize_aug, bool):
            raise TypeError(f"resize_aug (--resize-aug) must be True or False, got {self.resize_aug!r}")
        if self.resize_aug and (self.alpha_mask or self.masked_loss):
            raise ValueError("--resize-aug masks the loss to each resized image's region itself; it cannot be combined "
                             f"with {'--alpha-mask' if self.alpha_mask else '--masked-loss'}: leave one out")
        if self.cache_latents_to_disk:
            _check_disk_latents(self)
        if self.resize_aug and self.cache_text_encoder_outputs:
            raise ValueError("--resize-aug prefixes the captions at each use, so the text-encoder outputs cannot be "
                             "cached: leave out --cache-text-encoder-outputs")
        if self.caption_template is not None:
            caption_template(self.caption_template)
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        _check_caption_options(self)
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise ValueError(f"--resolution must be SIZE or WIDTH,HEIGHT, got {self.resolution}")
        from ..text_chunks import MAX_TOKEN_LENGTHS

        if isinstance(self.max_token_length, bool) or self.max_token_length not in MAX_TOKEN_LENGTHS:
            raise ValueError(f"--max-token-length must be 75, 150 or 225 (caption tokens; kohya's choices, 75 = one CLIP "
                             f"window, the default), got {self.max_token_length!r}")
        if self.max_token_length != 75 and str(self.model) in ("toy", "toy-image"):
            raise ValueError(f"--max-token-length {self.max_token_length} is for Stable Diffusion models (CLIP text encoders); "
                             "the toy's text encoder reads at most 14 words: leave it out")
        _check_saving_options(self)
        check_initial_step_options(self)
        if self.config_defaults not in ("sdadapt", "kohya"):
            raise ValueError(f"config_defaults must be sdadapt or kohya, got {self.config_defaults!r}")


def _check_data_sources(options: TrainOptions) -> None:
    """``images``, ``dataset_config``, ``in_json`` and ``concepts_list`` given together sensibly (raises ``ValueError``)."""
    if options.concepts_list is not None:
        given = [flag for flag, value in (("--images", options.images), ("--dataset-config", options.dataset_config),
                                          ("--in-json", options.in_json), ("--reg-data-dir", options.reg_data_dir),
                                          ("--prompt", options.prompt), ("--class-prompt", options.class_prompt),
                                          ("--class-data-dir", options.class_data_dir))
                 if value is not None]
        if given:
            raise ValueError(f"--concepts-list {options.concepts_list} gives each concept's images, prompts and class "
                             f"images, so {', '.join(given)} would not be used: leave {'it' if len(given) == 1 else 'them'} "
                             "out (or write them into the concepts: instance_data_dir, instance_prompt, class_data_dir, "
                             "class_prompt)")
        return
    if options.images is None and options.dataset_config is None and options.in_json is None:
        raise ValueError("no images: pass --images DIR (kohya's train_data_dir) or --dataset-config TOML (kohya's "
                         "dataset_config)")
    if options.in_json is not None and options.reg_data_dir is not None and options.dataset_config is None:
        raise ValueError(f"--in-json {options.in_json} is kohya's fine-tuning data, which has no regularisation images "
                         f"(kohya ignores --reg-data-dir with it): leave --reg-data-dir {options.reg_data_dir} out, or use "
                         "--dataset-config with an is_reg subset and DreamBooth-style training images")


def _data_config_fallback(options: TrainOptions) -> dict[str, object]:
    """The run's options by kohya's dataset-config names: the values a dataset TOML falls back on
    (kohya's command-line arguments); ``resolution`` as kohya's (width, height)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    fallback: dict[str, object] = {name: getattr(options, name) for name in _DATA_CONFIG_NAMES if name in names}
    fallback.update(num_repeats=options.repeats, class_tokens=options.prompt, caption_separator=options.caption_separator,
                    resolution=None if options.resolution is None else (options.resolution[1], options.resolution[0]))
    return fallback


#: kohya dataset-config keys that are TrainOptions fields of the same name (the rest are mapped in _data_config_fallback)
_DATA_CONFIG_NAMES = ("batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                      "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                      "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                      "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
                      "token_warmup_step", "flip_aug", "random_crop", "color_aug", "face_crop_aug_range", "validation_split",
                      "validation_seed", "alpha_mask", "resize_interpolation")


def _read_data_config(options: TrainOptions):
    """``--dataset-config`` / ``--in-json`` read and resolved (:mod:`sdadapt.training.dataset_config`),
    before anything loads, each subset's caption options checked; the options its dataset block
    decides are returned in ``.options`` together with the training subsets' caption options when
    they all agree (so the run's metadata and checks see them)."""
    from ..errors import InputError
    from ..training.dataset_config import in_json_config, read_dataset_config

    fallback = _data_config_fallback(options)
    if options.dataset_config is not None:
        config = read_dataset_config(options.dataset_config, fallback=fallback)
    else:
        config = in_json_config(options.in_json, image_dir=options.images, fallback=fallback)  # type: ignore[arg-type]
    source = f"--dataset-config {options.dataset_config}" if options.dataset_config is not None else f"--in-json {options.in_json}"
    for subset in config.subsets:
        try:
            _subset_caption_options(options, subset, templates=(), total_steps=1)
        except ValueError as exc:
            raise InputError(f"{source}: {subset.where}: {exc}") from None
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    train = config.train_subsets
    for name in train[0].captions:
        values = [s.captions[name] for s in train]
        if name in names and all(v == values[0] for v in values):
            config.options[name] = values[0]
    return config


#: kohya's training-metadata keys of the run's one dataset: with a dataset TOML (train_network.py's
#: ``use_user_config`` branch) kohya leaves them out and writes each dataset's and subset's own in ``ss_datasets``
_ONE_DATASET_KEYS = ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_enable_bucket",
                     "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_reso_steps", "ss_bucket_no_upscale",
                     "ss_bucket_info", "ss_shuffle_caption", "ss_keep_tokens", "ss_flip_aug", "ss_color_aug",
                     "ss_random_crop", "ss_reg_dataset_dirs")


def _block_options(options: TrainOptions, config) -> list[TrainOptions]:
    """A dataset TOML's several ``[[datasets]]`` blocks: each one's run options (its resolution, batch
    size and bucket settings over ``options``); ``[]`` for one block (``options`` is its)."""
    from ..errors import InputError

    out = []
    for index, block in enumerate(config.blocks):
        try:
            out.append(dataclasses.replace(options, **block))
        except ValueError as exc:
            raise InputError(f"--dataset-config {config.source}: datasets[{index}]: {exc}") from None
    return out


def _bucket_plan(options: TrainOptions, *, native: int, multiple: int, where: str = "") -> tuple[int, int, int]:
    """``(height, width, bucket step)`` of ``options`` (its ``resolution``, else the model's ``native``
    size) on a model whose sides are multiples of ``multiple``; ``where`` begins each message (a
    dataset TOML's block).

    Raises:
        ValueError: a side or the bucket step not a multiple of ``multiple``, or the size not a
            multiple of the bucket step with buckets on.
    """
    height, width = options.resolution or (native, native)
    if height % multiple or width % multiple:
        raise ValueError(f"{where}--resolution {width}x{height}: this model needs sides that are multiples of {multiple}")
    side = int((height * width) ** 0.5)
    step_size = options.bucket_reso_steps or max(multiple, min(64, side // 8 // multiple * multiple))
    if step_size % multiple:
        raise ValueError(f"{where}--bucket-reso-steps {step_size} must be a multiple of {multiple} for this model")
    if options.enable_bucket and (height % step_size or width % step_size):
        raise ValueError(f"{where}--resolution {width}x{height} must be a multiple of the bucket step {step_size}")
    low, high = options.min_bucket_reso, options.max_bucket_reso
    # (kohya's adjust_min_max_bucket_reso_by_steps: the limits moved onto the step, then held to the resolution)
    if options.enable_bucket and low is not None and low - low % step_size > min(height, width):
        raise ValueError(f"{where}--min-bucket-reso (min_bucket_reso) {low} is above the resolution's shorter side "
                         f"{min(height, width)}: no bucket could hold a {width}x{height} image's area (kohya refuses it "
                         f"too); give at most {min(height, width)}")
    if options.enable_bucket and high is not None and high + (-high) % step_size < max(height, width):
        raise ValueError(f"{where}--max-bucket-reso (max_bucket_reso) {high} is below the resolution's longer side "
                         f"{max(height, width)}: no bucket could hold a {width}x{height} image's area (kohya refuses it "
                         f"too); give at least {max(height, width)}")
    return height, width, step_size


def _data_config_record(config, options: TrainOptions) -> dict | None:
    """The resolved ``--dataset-config`` / ``--in-json`` (``config``; ``None``: neither) for the
    ``--resume`` record, as JSON reads it back: its subsets decide the images, repeats and caption
    draws a resumed run continues. A subset's ``alpha_mask`` is in it only where it differs from the
    run's ``--alpha-mask`` (recorded on its own, ``run.json``'s ``alpha_mask``): a record written before
    subsets could set it has none, its images followed the run's flag — it resumes."""
    if config is None:
        return None
    record = json.loads(json.dumps(config.record(), default=str))
    for subset, entry in zip(config.subsets, record["subsets"]):
        entry.pop("alpha_mask", None)
        if subset.alpha_mask != bool(options.alpha_mask):
            entry["alpha_mask"] = subset.alpha_mask
    return record


def _subset_caption_options(options: TrainOptions, subset, *, templates: tuple[str, ...], total_steps: int,
                            keep_empty_tags: bool = True, kohya_assembly: bool = True, kohya_order: bool = True):
    """A dataset-TOML subset's :class:`~sdadapt.training.data.CaptionOptions`: the run's options with
    the subset's values, as :func:`_caption_options` builds them, and its ``caption_separator``."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    own = {k: v for k, v in subset.captions.items() if k in names}
    captions = _caption_options(dataclasses.replace(options, **own), templates=templates, total_steps=total_steps,
                                keep_empty_tags=keep_empty_tags, kohya_assembly=kohya_assembly, kohya_order=kohya_order)
    return dataclasses.replace(captions, separator=str(subset.captions.get("caption_separator") or options.caption_separator))


def _subset_captions(options: TrainOptions, subsets: dict, records: list, *, templates: tuple[str, ...],
                     total_steps: int, reg_templates: tuple[str, ...] = (), keep_empty_tags: bool = True,
                     kohya_assembly: bool = True, kohya_order: bool = True) -> None:
    """Give each record its dataset-TOML subset's caption options (in place; ``record.folder`` is
    the subset's label; regularisation images: ``reg_templates``, none unless every caption is a
    template, :func:`_replace_captions`; a fine-tuning caption cut to its first line,
    ``record.suffix_cut``: without ``caption_suffix``, as kohya's)."""
    built = {label: _subset_caption_options(options, subset, templates=reg_templates if subset.is_reg else templates,
                                            total_steps=total_steps, keep_empty_tags=keep_empty_tags,
                                            kohya_assembly=kohya_assembly, kohya_order=kohya_order)
             for label, subset in subsets.items()}
    for record in records:
        own = built[record.folder]
        record.captions = dataclasses.replace(own, suffix="") if record.suffix_cut and own.suffix else own


def _check_caption_options(options: TrainOptions) -> None:
    """kohya's caption options of ``options`` checked (before anything loads); raises ``ValueError``
    naming the flag."""
    for name in ("caption_prefix", "caption_suffix", "secondary_separator"):
        value = getattr(options, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"--{name.replace('_', '-')} must be text, got {value!r}")
    if not isinstance(options.keep_tokens_separator, str):
        raise ValueError(f"--keep-tokens-separator must be text (\"\": none), got {options.keep_tokens_separator!r}")
    for name in ("caption_dropout_every_n_epochs", "token_warmup_min"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
    step = options.token_warmup_step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step < math.inf:
        raise ValueError(f"--token-warmup-step must be >= 0 (the step by which every tag is used, or below 1 a share "
                         f"of the steps; 0: off), got {step!r}")
    tag = options.caption_separator
    if not isinstance(tag, str) or not tag.strip():
        raise ValueError(f"--caption-separator must be text, e.g. ',' (kohya's default) or ';', got {tag!r}")
    separators = {"--keep-tokens-separator": options.keep_tokens_separator, "--secondary-separator": options.secondary_separator}
    for flag, value in separators.items():
        if value and tag in value:
            raise ValueError(f"{flag} {value!r} holds the tag separator {tag!r}; choose a string without it, e.g. "
                             + ("'|||'" if flag == "--keep-tokens-separator" else "';;;'"))
    if options.keep_tokens_separator and options.keep_tokens_separator == options.secondary_separator:
        raise ValueError(f"--keep-tokens-separator and --secondary-separator are both {options.secondary_separator!r}: "
                         "they do different things, give them different strings (e.g. '|||' and ';;;')")
    # (with --cache-text-encoder-outputs: refused by _check_text_cache_captions, which runs first)
    if options.weighted_captions and str(options.model) in ("toy", "toy-image"):
        raise ValueError("--weighted-captions (A1111 emphasis, (word:1.2) / [word], in the captions) cannot work with "
                         "the toy model (its text encoder is no CLIP; use a Stable Diffusion folder or file)")


def _caption_options(options: TrainOptions, *, templates: tuple[str, ...], total_steps: int | None,
                     keep_empty_tags: bool = True, kohya_assembly: bool = True, kohya_order: bool = True):
    """The :class:`~sdadapt.training.data.CaptionOptions` of ``options`` (``total_steps``: the run's
    optimiser steps, for a fractional ``token_warmup_step``; ``None`` while they are not known yet:
    no warm-up; ``keep_empty_tags``: :func:`sdadapt.jobs.caption_lines.recorded_caption_empties`;
    ``kohya_assembly``: :func:`sdadapt.jobs.caption_lines.recorded_caption_assembly` is kohya's, off for a run
    recorded before; ``kohya_order``: its second revision, ``"kohya-2"``: the template last, and so on)."""
    from ..training.data import CaptionOptions, token_warmup_step_count

    return CaptionOptions(shuffle=options.shuffle_caption, keep_tokens=options.keep_tokens,
                          dropout=options.caption_dropout_rate, tag_dropout=options.caption_tag_dropout_rate,
                          templates=templates, prefix=options.caption_prefix or "", suffix=options.caption_suffix or "",
                          dropout_every_n_epochs=options.caption_dropout_every_n_epochs,
                          wildcards=options.enable_wildcard, keep_tokens_separator=options.keep_tokens_separator,
                          secondary_separator=options.secondary_separator or "",
                          separator=options.caption_separator, token_warmup_min=options.token_warmup_min,
                          token_warmup_steps=0 if total_steps is None else
                          token_warmup_step_count(options.token_warmup_step, total_steps),
                          keep_empty_tags=keep_empty_tags, kohya_assembly=kohya_assembly,
                          kohya_order=kohya_order)


def _check_saving_options(options: TrainOptions) -> None:
    """kohya's save-rotation, schedule and modelspec options (:mod:`sdadapt.jobs.save_rotation`)."""
    for name in ("save_last_n_steps", "save_last_n_epochs", "save_n_epoch_ratio"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
    train_schedule.check_schedule_options(options)  # (the power, lr_scheduler_args, kohya's other schedules' options)
    if options.resize_interpolation is not None:
        from ..resampling import check_interpolation

        check_interpolation(options.resize_interpolation, where="--resize-interpolation")
    if options.sample_at_first and options.sample_prompts is None:
        raise ValueError("--sample-at-first needs --sample-prompts FILE (one prompt a line)")
    for name in ("metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags"):
        value = getattr(options, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"--{name.replace('_', '-')} must be text (written as modelspec.{name[9:]}), got {value!r}")


#: kohya's --lr_scheduler_args read (:func:`sdadapt.jobs.train_schedule.lr_scheduler_kwargs`)
_lr_scheduler_kwargs = train_schedule.lr_scheduler_kwargs


def _pixel_changing_flags(options: TrainOptions, *, face_crop: bool) -> list[str]:
    """The options on that change an image's pixels at each use (so its latents cannot be cached), by their flags;
    ``face_crop``: whether ``--face-crop-aug-range`` crops (the option given, or the run's augmentation doing it)."""
    return [flag for flag, on in (("--random-crop", options.random_crop), ("--color-aug", options.color_aug),
                                  ("--face-crop-aug-range", face_crop), ("--resize-aug", options.resize_aug)) if on]


def _check_disk_latents(options: TrainOptions) -> None:
    """``--cache-latents-to-disk`` with an option that changes the pixels at each use: refused, as kohya's
    train_network.py asserts ``is_latent_cacheable`` ("when caching latents, either color_aug or random_crop
    cannot be used"); the dataset TOML's subsets are checked by :func:`_disk_latents`."""
    changing = _pixel_changing_flags(options, face_crop=options.face_crop_aug_range is not None)
    if changing:
        raise ValueError(f"--cache-latents-to-disk keeps each image's latents in a file, but {' and '.join(changing)} "
                         "change the pixels at each use (kohya refuses caching latents with them too): leave one out")


def _disk_latents(options: TrainOptions, system: object, augment: object) -> object:
    """The :class:`~sdadapt.training.kohya_latent_files.KohyaLatentFiles` hook of ``--cache-latents-to-disk``
    (``None`` without it); refused when the dataset's pixel augmentation (a dataset TOML subset's
    ``random_crop`` / ``color_aug``) is on."""
    if not options.cache_latents_to_disk:
        return None
    if getattr(augment, "active", False):
        raise ValueError("--cache-latents-to-disk keeps each image's latents in a file, but the dataset's random_crop / "
                         "color_aug (a --dataset-config subset) change the pixels at each use (kohya refuses caching "
                         "latents with them too): leave one out")
    from ..training.kohya_latent_files import KohyaLatentFiles

    return KohyaLatentFiles(system)


def _disk_text_outputs(options: TrainOptions, system: object, say: Callable[[str], None], *,
                       group: data_parallel.DataParallel | None = None) -> object:
    """The :class:`~sdadapt.training.kohya_text_files.KohyaTextFiles` hook of
    ``--cache-text-encoder-outputs-to-disk`` (``None`` without it; under torchrun, ``group``, each file made by
    one rank); refused for a model kohya writes no such file for (SD1/SD2, the SDXL refiner)."""
    if not options.cache_text_encoder_outputs_to_disk:
        return None
    from ..training.kohya_text_files import KohyaTextFiles

    return KohyaTextFiles(system, log=say, group=group)


def _check_text_cache_captions(options: TrainOptions) -> None:
    """``--cache-text-encoder-outputs`` needs captions that read the same at each use (a whole-caption
    dropout is fine: ``""`` is cached too); kohya refuses the same options
    (``is_text_encoder_output_cacheable``)."""
    changing = [flag for flag, on in (
        ("--shuffle-caption", options.shuffle_caption),
        ("--caption-tag-dropout-rate", options.caption_tag_dropout_rate > 0),
        ("--token-warmup-step", options.token_warmup_step > 0),
        ("--enable-wildcard", options.enable_wildcard),
        ("--weighted-captions (the weights scale the text states as they are encoded)", options.weighted_captions),
    ) if on]
    if changing:
        raise ValueError(f"--cache-text-encoder-outputs encodes each caption once before training, but with {' and '.join(changing)} "
                         "the captions change at each use (kohya refuses them together too); leave them out or do not cache")


def _check_text_cache_method(method: str, spec: object, options: TrainOptions) -> None:
    """``--cache-text-encoder-outputs`` with a method whose text conditioning trains: refused before
    the model loads (kohya: "network for Text Encoder cannot be trained with caching Text Encoder
    outputs"). Trigger-word methods train token embeddings (or draw templates per use); the LoRA
    family and dreambooth train the text encoder unless ``--no-text-encoder`` or ``--text-encoder-lr 0``."""
    if not options.cache_text_encoder_outputs:
        return
    if getattr(spec, "trigger", False):
        raise ValueError(f"--cache-text-encoder-outputs: {method} trains the trigger word's embedding, so the text "
                         "encoder's output changes at every step; train without caching")
    both_frozen = options.text_encoder_lr == 0 and options.text_encoder_2_lr in (None, 0)
    if "text_encoder" in {o.name for o in spec.options} and not both_frozen:
        default = inspect.signature(spec.prepare).parameters.get("text_encoder")
        trains = options.method_options.get("text_encoder", default.default if default is not None else False)
        if trains:
            raise ValueError(f"--cache-text-encoder-outputs: {method} trains the text encoder too (its output changes "
                             "at every step); add --no-text-encoder (kohya's network_train_unet_only) or --text-encoder-lr 0"
                             + (" and --text-encoder-2-lr 0 (kohya's learning_rate_te1 without learning_rate_te2 trains "
                                "the second encoder at learning_rate, as sdxl_train.py)"
                                if options.text_encoder_2_lr == TE2_AT_LEARNING_RATE else
                                f" and --text-encoder-2-lr 0 (it is {options.text_encoder_2_lr:g}: the second encoder trains)"
                                if options.text_encoder_2_lr else ""))


def _key_value_items(options: TrainOptions, name: str) -> tuple[str, ...]:
    """The ``KEY=VALUE`` strings of the field ``name`` (``optimizer_args``, ``lr_scheduler_args``:
    one string split at spaces, or a list), made a tuple in the field too (the options are frozen)."""
    items = getattr(options, name) or ()
    items = tuple(items.split()) if isinstance(items, str) else tuple(str(item) for item in items)
    object.__setattr__(options, name, items)
    return items


def _optimizer_args(options: TrainOptions) -> tuple[tuple[str, object], ...]:
    """``options.optimizer_args`` parsed, as ``((key, value), ...)`` in the order given (checked once,
    as the options are made, by :func:`_check_optimizer_args`)."""
    from ..training.optimizer_args import parse_optimizer_args

    return parse_optimizer_args(_key_value_items(options, "optimizer_args"), where="--optimizer-args")


def _check_optimizer_args(options: TrainOptions) -> None:
    """``options.optimizer_args`` (``KEY=VALUE`` strings; the field is made a tuple) checked against
    the optimiser (:func:`~sdadapt.training.optimizer_args.check_optimizer_args`: built on a probe).
    A ``weight_decay`` there and a ``--weight-decay``
    that disagrees is refused (which would win is not obvious; kohya has only the former). The values
    are checked with kohya's defaults added, as ``train`` builds the optimiser
    (:func:`~sdadapt.training.optimizer_args.kohya_constructor_args`: Adafactor's ``warmup_init=True``
    alone is fine, its relative step being on)."""
    from ..methods.optimizers import canonical_optimizer
    from ..training.optimizer_args import check_optimizer_args, kohya_constructor_args

    name = canonical_optimizer(options.optimizer)
    pairs = _optimizer_args(options)
    check_optimizer_args(name, kohya_constructor_args(name, pairs), where="--optimizer-args",
                         weight_decay=options.weight_decay)
    decay = dict(pairs).get("weight_decay")
    if decay is not None and options.weight_decay is not None and float(decay) != options.weight_decay:  # type: ignore[arg-type]
        raise ValueError(f"--weight-decay {options.weight_decay} and --optimizer-args weight_decay={decay} disagree: "
                         "give the weight decay once (the optimizer_args one is kohya's)")


_LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
#: the methods whose adapters --scale-weight-norms shrinks (sdadapt.training.max_norm.MAX_NORM_FAMILIES)
_MAX_NORM_METHODS = ("lora", "locon", "loha", "lokr", "diag-oft", "boft")
#: the methods kohya's --fp8_base serves (train_network.py): adapters over a frozen base (LyCORIS' OFT and GLoRA
#: read the base weight: OFT's rotation upcasts it to float32 (its Cayley inverse too), GLoRA's W·a1·a2 runs under
#: the run's autocast as the base layer does)
_FP8_BASE_METHODS = ("lora", "locon", "loha", "lokr", "dora", "ia3", "diag-oft", "boft", "glora", "dylora")
_HUBER_SCHEDULES = ("snr", "exponential", "constant")


def _sdpa_order(value: str | None) -> tuple[str, ...] | None:
    """The backend list of ``--sdpa-backends`` (``StepConfig.sdpa_backends``): ``None`` for torch's
    choice and for ``"measure"`` (measured in ``fit``), else the comma list's names in order.

    Raises:
        ValueError: an unknown backend name or an empty list, naming the ones there are.
    """
    if value is None or value == "measure":
        return None
    from ..training.attention import SDPA_BACKENDS

    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names or any(n not in SDPA_BACKENDS for n in names):
        raise ValueError(f"--sdpa-backends must be 'measure' or a comma list of {', '.join(SDPA_BACKENDS)} "
                         f"(tried in that order, e.g. flash,math); got {value!r}")
    return names


def _trigger_captions(records: list, token: str, options: TrainOptions, *,
                      trigger_captions_way: str = TRIGGER_WRAPPED) -> tuple[list[str], tuple[str, ...]]:
    """Give every captioned record a caption that mentions ``token`` (in place; :func:`trigger_captions`);
    returns notes saying what was done, and the template captions the uncaptioned records (``""``)
    draw from at each use (:attr:`~sdadapt.training.data.CaptionOptions.templates`; ``()`` when
    every image has a caption). ``trigger_captions_way`` :data:`~sdadapt.training.data.TRIGGER_WRAPPED`: a caption
    put into ``--caption-template``'s ``{caption}`` keeps the template around each draw of its own caption
    (:attr:`~sdadapt.training.data.ImageRecord.wrapped`: the caption options never move or drop the trigger word);
    :data:`~sdadapt.training.data.TRIGGER_FILLED` (a run recorded before): the filled caption is drawn whole."""
    from ..methods.textual_inversion import DEFAULT_CAPTION_TEMPLATE, TEMPLATE_SETS, caption_template, trigger_captions

    own = [r.caption or None for r in records]  # "": no caption (find_images(uncaptioned=True))
    template = caption_template(options.caption_template if options.caption_template is not None else DEFAULT_CAPTION_TEMPLATE)
    made = trigger_captions(own, token, templates=TEMPLATE_SETS[options.templates], seed=options.seed, template=template)
    filled = sum(c is None for c in own)
    templated = sum(c is not None and c != m for c, m in zip(own, made))
    around = template.format(token=token, caption="\0").split("\0")  # (before, after): the one {caption}
    for record, caption, mine in zip(records, made, own):
        record.caption = caption if mine is not None else ""  # "": a template drawn at each use
        if trigger_captions_way == TRIGGER_WRAPPED and mine is not None and caption != mine and len(around) == 2:
            record.wrapped = (around[0], mine, around[1])
    templates = _template_captions(token, options) if filled else ()
    notes = []
    if filled:
        notes.append(f"{filled} image(s) without a caption: one of the {len(templates)} {options.templates} template "
                     f"captions with {token} drawn at each use (e.g. {templates[0]!r})")
    if templated:
        put_around = any(r.wrapped is not None for r in records)
        notes.append(f"{templated} caption(s) without {token}: written as {template!r} (--caption-template)"
                     + ("; the caption options draw on the caption, never on the template's words" if put_around
                        else ""))
    return notes, templates


def _trigger_words(method: str, options: TrainOptions) -> tuple[str, ...]:
    """The run's trigger word(s): ``--token`` as given, for ``custom-diffusion`` split at ``+`` and checked with
    ``--init-word`` (:func:`sdadapt.methods.custom_diffusion.modifier_tokens`, diffusers' ``--modifier_token
    "<new1>+<new2>"``): several modifier tokens train jointly. A ValueError names the fix."""
    token = options.method_options["token"]
    if method != "custom-diffusion":
        return (token,)
    from ..methods.custom_diffusion import modifier_tokens

    try:
        return modifier_tokens(token, options.method_options.get("init_word"))[0]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--token / --init-word: {exc}") from None


def _read_concepts(method: str, options: TrainOptions):
    """``--concepts-list`` read and checked (:func:`sdadapt.custom_diffusion.concepts.read_concepts_list`, each
    ``instance_prompt`` naming a ``--token`` token); ``None`` without one. Refused: another method than
    ``custom-diffusion`` and the caption-template options (every image trains on its concept's instance_prompt,
    diffusers has no templates)."""
    if options.concepts_list is None:
        return None
    from ..custom_diffusion.concepts import read_concepts_list

    if method != "custom-diffusion":
        raise ValueError(f"--concepts-list is diffusers' train_custom_diffusion.py concepts list, for train "
                         f"custom-diffusion; {method} reads --images or --dataset-config")
    for flag, on in (("--caption-template", options.caption_template is not None),
                     ("--templates", options.templates != "object"),
                     ("--templates-replace-captions", options.templates_replace_captions)):
        if on:
            raise ValueError(f"{flag}: with --concepts-list every image trains on its concept's instance_prompt (as "
                             "diffusers, which has no caption templates); leave it out")
    # (data parallel: the missing class images are made once across the processes, rank 0 writes them)
    return read_concepts_list(options.concepts_list, tokens=_trigger_words(method, options),
                              prior=options.prior is not False)


def _concepts_record(options: TrainOptions, concepts) -> dict:
    """The ``--resume`` record of a ``--concepts-list`` run (:func:`~sdadapt.custom_diffusion.concepts.concepts_record`)."""
    from ..custom_diffusion.concepts import concepts_record

    return json.loads(json.dumps(concepts_record(options.concepts_list, concepts, count=options.class_images)))


def _several_tokens_captions(records: list, tokens: tuple[str, ...], options: TrainOptions) -> list[str]:
    """Several modifier tokens (``train custom-diffusion --token "<new1>+<new2>"``): every image's own caption
    must name one of ``tokens`` (its concept's), from a caption file, its kohya ``N_<token> class`` folder name
    or a dataset TOML subset's ``class_tokens``. An uncaptioned image, a caption naming none of them, a
    ``--caption-template`` or ``--templates-replace-captions`` is refused: neither a template nor a caption can
    say which concept an image is. Returns a note on how many images each token has."""
    from ..methods.textual_inversion import mentions

    listed = "+".join(tokens)
    how = ("give each concept's images captions naming its token: caption files, kohya folders named "
           f"'1_{tokens[0]} <class>' / '1_{tokens[1]} <class>' (the folder name is the caption of images without "
           "one), or --dataset-config subsets with their own class_tokens (docs/custom-diffusion.md)")
    if options.caption_template is not None or options.templates_replace_captions or options.templates != "object":
        flag = ("--caption-template" if options.caption_template is not None else "--templates-replace-captions"
                if options.templates_replace_captions else f"--templates {options.templates}")
        raise ValueError(f"{flag}: with several modifier tokens ({listed}) a template cannot say which concept an "
                         f"image is; leave it out and {how}")
    uncaptioned = [r for r in records if not r.caption]
    if uncaptioned:
        raise ValueError(f"{len(uncaptioned)} image(s) without a caption (e.g. {uncaptioned[0].path}): with several "
                         f"modifier tokens ({listed}) a template caption cannot say which concept an image is; {how}")
    missing = [r for r in records if not any(mentions(r.caption, t) for t in tokens)]
    if missing:
        raise ValueError(f"{len(missing)} caption(s) mention none of the modifier tokens {listed} (e.g. "
                         f"{missing[0].caption!r} of {missing[0].path}); {how}")
    counts = ", ".join(f"{t}: {sum(mentions(r.caption, t) for r in records)}" for t in tokens)
    return [f"{len(tokens)} modifier tokens trained jointly; images whose caption names each: {counts}"]


def _template_captions(token: str, options: TrainOptions) -> tuple[str, ...]:
    """The ``--templates`` set's captions with ``token`` in them (what a template draw picks from)."""
    from ..methods.textual_inversion import TEMPLATE_SETS

    return tuple(t.format(token) for t in TEMPLATE_SETS[options.templates])


def _replace_captions(records: list, reg_records: list, token: str, options: TrainOptions,
                      notes: list[str]) -> tuple[str, ...]:
    """``--templates-replace-captions`` (kohya's ``use_object_template`` / ``use_style_template``): every
    training and class image's caption made ``""`` (in place), so that it trains on one of the returned
    ``templates`` captions with ``token`` drawn at each use, after the caption options (kohya's
    ``train_dataset_group.add_replacement("", templates)``: ``process_caption`` replaces every caption of
    the dataset group, the ``is_reg`` subsets' too, unless it was dropped). The held-out validation images
    keep theirs (kohya's validation dataset group has no replacement). Says so in ``notes``."""
    templates = _template_captions(token, options)
    own = sum(bool(r.caption) for r in records)
    for record in [*records, *reg_records]:
        record.caption, record.wrapped = "", None  # (no caption template around it either)
    notes.append(f"--templates-replace-captions: all {len(records)} training image(s)"
                 + (f" and {len(reg_records)} class image(s)" if reg_records else "")
                 + f" train on one of the {len(templates)} {options.templates} template captions with {token} drawn "
                 f"at each use (e.g. {templates[0]!r}); their own captions ({own} with one), --caption-template, "
                 "the caption prefix / suffix and tag options do not reach the text encoder (kohya's "
                 "use_object_template / use_style_template; a dropped caption stays empty)")
    return templates


def _check_timesteps(options: TrainOptions, num_train_timesteps: int) -> None:
    """``--min-timestep`` / ``--max-timestep`` and the timestep draw's options checked against the loaded model's
    ``num_train_timesteps`` T (before any latent is cached; the option checks before the load assume nothing about
    T): :func:`~sdadapt.training.timestep_distribution.check_timestep_draw`, its error naming the model too."""
    from ..training.timestep_distribution import check_timestep_draw

    low, high = options.timestep_range(num_train_timesteps) or (0, num_train_timesteps)
    try:
        check_timestep_draw(options.timestep_sampling(), num_train_timesteps, low=low, high=high)
    except ValueError as exc:
        raise ValueError(f"--model {options.model}: {exc}") from None


def _timestep_sampling_notes(options: TrainOptions) -> list[str]:
    """The timestep-distribution options the chosen bias strategy / distribution does not read (run report notes)."""
    strategy, distribution, notes = options.timestep_bias_strategy.lower(), options.timestep_distribution.lower(), []
    reads = {"none": (), "earlier": ("multiplier", "portion"), "later": ("multiplier", "portion"),
             "range": ("multiplier", "begin", "end")}.get(strategy, ())
    unused = [f"--timestep-bias-{name} {value}" for name, value, default in (
        ("multiplier", options.timestep_bias_multiplier, 1.0), ("begin", options.timestep_bias_begin, 0),
        ("end", options.timestep_bias_end, 1000), ("portion", options.timestep_bias_portion, 0.25))
        if value != default and name not in reads]
    if unused:
        notes.append(f"{', '.join(unused)}: not used by --timestep-bias-strategy {strategy}")
    reads = {"sigmoid": ("weight", "bias"), "inverted_parabola": ("weight", "bias"), "logit_normal": ("weight", "bias"),
             "beta": ("weight", "bias"), "heavy_tail": ("weight",)}.get(distribution, ())
    unused = [f"--noising-{name} {value}" for name, value in (("weight", options.noising_weight),
                                                              ("bias", options.noising_bias)) if value and name not in reads]
    if unused:
        notes.append(f"{', '.join(unused)}: not used by --timestep-distribution {distribution}")
    return notes


def _inactive_option_notes(options: TrainOptions, *, caption_notes: bool = True) -> list[str]:
    """Options that act only together with another one, given without it: said in the run report, not
    refused — kohya configs (and GUIs writing them) carry these values whatever the other setting is.
    ``caption_notes=False``: not the caption options' (a dataset TOML's subsets that differ decide them)."""
    notes = []
    if not options.enable_bucket:
        unused = [flag for flag, value in (("--min-bucket-reso", options.min_bucket_reso), ("--max-bucket-reso", options.max_bucket_reso),
                                           ("--bucket-reso-steps", options.bucket_reso_steps),
                                           ("--bucket-no-upscale", options.bucket_no_upscale)) if value]
        if unused:
            notes.append(f"{', '.join(unused)}: not used without bucketing (--no-bucket); every image is scaled and "
                         "centre-cropped to the resolution")
    if caption_notes and options.keep_tokens and not (options.shuffle_caption or options.caption_tag_dropout_rate
                                                      or options.token_warmup_step):
        notes.append(f"--keep-tokens {options.keep_tokens}: not used without --shuffle-caption or --caption-tag-dropout-rate "
                     "or --token-warmup-step (it keeps the first tags from moving, dropping or being warmed up)")
    if caption_notes and options.token_warmup_min != 1 and not options.token_warmup_step:
        notes.append(f"--token-warmup-min {options.token_warmup_min}: not used without --token-warmup-step (the step "
                     "by which every tag is used)")
    notes.extend(train_schedule.schedule_notes(options))  # (the schedule options --lr-scheduler does not read)
    if options.loss_type in ("l2", "l1"):
        unused = [f"--{name.replace('_', '-')} {value}" for name, value, default in (
            ("huber_c", options.huber_c, 0.1), ("huber_schedule", options.huber_schedule, "snr"),
            ("huber_scale", options.huber_scale, 1.0)) if value != default]
        if unused:
            notes.append(f"{', '.join(unused)}: not used by --loss-type {options.loss_type} (only huber and smooth_l1)")
    if options.loss_type in ("huber", "smooth_l1") and options.huber_schedule == "snr" and options.huber_scale != 1.0:
        notes.append(f"--huber-scale {options.huber_scale}: not used by --huber-schedule snr (kohya scales only the "
                     "constant and exponential schedules)")
    if not options.noise_offset:
        unused = [flag for flag, value in (("--noise-offset-random-strength", options.noise_offset_random_strength),
                                           ("--adaptive-noise-scale 0", options.adaptive_noise_scale is not None)) if value]
        if unused:
            notes.append(f"{', '.join(unused)}: not used without --noise-offset")
    if options.ip_noise_gamma_random_strength and not options.ip_noise_gamma:
        notes.append("--ip-noise-gamma-random-strength: not used without --ip-noise-gamma")
    notes.extend(_timestep_sampling_notes(options))
    if options.masked_loss and options.conditioning_data_dir is None and not options.alpha_mask and not (
            "conditioning_data_dir" in _dataset_keys(options)):
        notes.append("--masked-loss: no masks to apply without --conditioning-data-dir (mask images) or --alpha-mask; "
                     "every pixel counts fully")
    if options.alpha_mask and options.masked_loss and options.conditioning_data_dir is not None:
        notes.append(f"--alpha-mask: not used; the masks come from --conditioning-data-dir {options.conditioning_data_dir} "
                     "(kohya's masked loss prefers the mask images)")
    if options.multires_noise_discount != 0.3 and not options.multires_noise_iterations:
        notes.append(f"--multires-noise-discount {options.multires_noise_discount}: not used without "
                     "--multires-noise-iterations")
    if options.dynamo_backend != "inductor" and not options.torch_compile:
        notes.append(f"--dynamo-backend {options.dynamo_backend}: not used without --torch-compile")
    if options.method_options.get("dim_from_weights"):  # kohya configs carry network_dim whatever the mode
        unused = [flag for name, flag in (("rank", "--network-dim"), ("alpha", "--network-alpha"), ("conv_rank", "--conv-dim"),
                                          ("conv_alpha", "--conv-alpha"), ("targets", "--network-targets"))
                  if name in options.method_options]
        if unused:
            notes.append(f"{', '.join(unused)}: not used with --dim-from-weights (the modules, ranks and alphas come from "
                         "--network-weights FILE)")
    notes.extend(_inactive_saving_notes(options))
    return notes


def _inactive_saving_notes(options: TrainOptions) -> list[str]:
    """The save-rotation and schedule options given without what they act on (kohya configs carry them)."""
    notes = []
    if options.save_last_n_steps and not options.save_every_n_steps:
        notes.append(f"--save-last-n-steps {options.save_last_n_steps}: not used without --save-every-n-steps (it removes "
                     "older step saves)")
    if options.save_last_n_epochs and not (options.save_every_n_epochs or options.save_n_epoch_ratio):
        notes.append(f"--save-last-n-epochs {options.save_last_n_epochs}: not used without --save-every-n-epochs or "
                     "--save-n-epoch-ratio (it removes older epoch saves)")
    if options.save_n_epoch_ratio and options.save_every_n_epochs:
        notes.append(f"--save-n-epoch-ratio {options.save_n_epoch_ratio} replaces --save-every-n-epochs "
                     f"{options.save_every_n_epochs} (as kohya's)")
    return notes


def _check_v_pred_loss(options: TrainOptions, prediction_type: str | None) -> None:
    """kohya's refusals: ``--scale-v-pred-loss-like-noise-pred`` only with v-prediction, ``--v-pred-like-loss``
    only without (``prediction_type`` None: not known yet, nothing checked)."""
    if options.v_pred_like_loss is not None and not 0 <= options.v_pred_like_loss < math.inf:
        raise ValueError(f"--v-pred-like-loss must be a finite number >= 0 (e.g. 0.1), got {options.v_pred_like_loss}")
    where = f"{options.model} predicts {prediction_type}"
    if options.scale_v_pred_loss_like_noise_pred and prediction_type == "epsilon":
        raise ValueError(f"--scale-v-pred-loss-like-noise-pred scales a v-prediction loss and {where} (kohya: "
                         "only with --v-parameterization); leave it out")
    if options.v_pred_like_loss and prediction_type == "v_prediction":
        raise ValueError(f"--v-pred-like-loss {options.v_pred_like_loss} adds a v-prediction-like loss to an epsilon "
                         f"loss and {where} (kohya: not with --v-parameterization); leave it out")


def _dataset_keys(options: TrainOptions) -> set[str]:
    """The keys ``--dataset-config`` sets (:func:`sdadapt.training.dataset_config.dataset_toml_keys`)."""
    from ..training.dataset_config import dataset_toml_keys

    return dataset_toml_keys(options.dataset_config)


def _loss_mask_source(options: TrainOptions, records: list, method: str = "") -> LossMaskSource | None:
    """Where the loss masks of ``records`` (training images) come from (kohya's order: the mask
    images of ``--conditioning-data-dir`` with ``--masked-loss``, else the alpha channel with
    ``--alpha-mask`` or when a dataset-TOML subset sets ``alpha_mask`` — then each record's
    :attr:`~sdadapt.training.data.ImageRecord.alpha_mask` says whether its alpha or all ones); for ``dreamartist``
    otherwise the extension's attention maps, ``<stem>_att<suffix>`` beside the images, when any image has one)."""
    if options.masked_loss and options.conditioning_data_dir is not None:
        return LossMaskSource(Path(options.conditioning_data_dir))
    if options.masked_loss and any(r.mask_folder is not None for r in records):  # (a dataset TOML's subsets' folders)
        return LossMaskSource(per_subset=True)
    if options.alpha_mask or any(r.alpha_mask for r in records):
        return LossMaskSource()
    if method == "dreamartist":  # (the extension's attention maps beside the images, where there are any)
        from ..training.loss_masks import attention_map_file

        if any(r.path is not None and attention_map_file(r.path) is not None for r in records):
            return LossMaskSource(attention=True)
    return None


def _clip_skip_notes(options: TrainOptions, architecture: str | None) -> list[str]:
    """kohya's warnings about ``--clip-skip`` as run-report notes: SDXL does not read it (each text
    encoder's penultimate layer whatever the value; kohya's ``verify_sdxl_training_args`` warns),
    SD2 reads it but kohya warns it is unusual there (``verify_training_args``). ``architecture``:
    the model's (:attr:`~sdadapt.diffusers_system.DiffusersSystem.architecture`; ``None``: a toy)."""
    if options.clip_skip is None or architecture not in ("sd2", "sdxl"):  # (kohya: `is not None`, 1 included)
        return []
    if architecture == "sdxl":
        return [(f"--clip-skip {options.clip_skip}: does nothing on SDXL ({options.model}); each text encoder's "
                 "penultimate layer is read whatever the value (kohya warns the same and records the value in "
                 "ss_clip_skip, as here)")]
    if options.clip_skip == 1:  # (given as 1: the default layer; kohya warns whenever it is given)
        return [(f"--clip-skip 1 on an SD2 model ({options.model}): the last layer, as without it (nothing changes); "
                 "kohya warns that clip skip with v2 is unexpected whenever the option is given")]
    return [(f"--clip-skip {options.clip_skip} on an SD2 model ({options.model}): used (the text encoder's "
             f"{options.clip_skip}-th last layer), but SD2 was trained on the states it reads without it; kohya warns "
             "that clip skip with v2 is unexpected")]


def _ss_lr_warmup_steps(given: float | None, steps: int) -> str:
    """kohya's ``ss_lr_warmup_steps``: the ``--lr-warmup-steps`` given, as given (a count ``"20"``, a
    share ``"0.1"``: kohya's ``train_network.py`` writes ``args.lr_warmup_steps``, not the steps it
    makes of it); ``steps`` (the warm-up run) when none was given (sdadapt's own default)."""
    if given is None:
        return str(steps)
    return str(int(given)) if given >= 1 or given == 0 else str(float(given))


# DEFAULT_MIN_SNR_GAMMA (methods.fit, the library's FitConfig default step): ``--min-snr-gamma`` when it is not given
# (``TrainOptions.min_snr_gamma`` ``None``) on a DDPM model; off on an EDM model (:func:`_edm_options`), where a γ given
# (this value too) is refused as diffusers does
#: ``--sample-sampler`` when it is not given (``TrainOptions.sample_sampler`` ``None``): kohya's default ``ddim``
#: (train_util.py ``--sample_sampler``) on a DDPM model; an EDM model's own scheduler (:func:`_edm_options`), where
#: a sampler given that has no EDM form (this one too) is refused by name
DEFAULT_SAMPLE_SAMPLER = "ddim"

#: methods an EDM-formulation model (Playground v2.5) does not train, and why
_EDM_REFUSED_METHODS = {
    "dreamartist": "its dynamic CFG scale and its reconstruction loss read DDPM timesteps and an ε/v output, where an "
                   "EDM model's step has σ and a denoised latent",
}


def _edm_options(method: str, options: TrainOptions, notes: list[str], *,
                 sample_samplers: Sequence[str | None] = (), own_sampler: str = "dpmsolver++") -> TrainOptions:
    """``options`` for an EDM-formulation model (:mod:`sdadapt.training.edm`, diffusers' EDM training): sdadapt's default
    min-SNR γ 5 dropped when ``--min-snr-gamma`` is not given (``None``; with a note) and a γ given (≠ 0, 5 too) refused,
    as diffusers refuses min-SNR with EDM; kohya's ``--min-timestep`` / ``--max-timestep`` kept (the step maps them onto
    the σ grid, :func:`sdadapt.training.edm.edm_index_range`); ``--sample-sampler`` not given (``None``: not the
    default ``ddim``, which has no EDM form) made the model's own scheduler ``own_sampler``
    (:func:`sdadapt.training.edm.edm_own_sampler`; a note when a sample image uses it), and a sampler given with no
    EDM form (``ddim`` too) refused by name before any work (ValueError), as everything with no EDM form, the
    samplers of the sample images (``sample_samplers``; ``None``: the command's ``--sample-sampler``) included."""
    from ..samplers import canonical_sampler
    from ..samplers.edm import EDM_SAMPLERS
    from ..training.edm import edm_step_clashes

    where = f"--model {options.model}: an EDM-formulation model (Playground v2.5)"
    if method in _EDM_REFUSED_METHODS:
        raise ValueError(f"{where} is not trained with {method}: {_EDM_REFUSED_METHODS[method]}; LoRA and the LyCORIS "
                         "families, DreamBooth, full fine-tuning and textual inversion train it")
    if options.zero_terminal_snr:
        raise ValueError(f"{where} cannot train with --zero-terminal-snr: it rescales the DDPM ᾱ schedule, and an EDM "
                         "model trains on its σ grid; leave it out")
    if options.min_snr_gamma is None:  # (not given: sdadapt's default γ, not kohya's nor diffusers'; one given is refused)
        notes.append(f"{where}: min-SNR weighting (sdadapt's default --min-snr-gamma {DEFAULT_MIN_SNR_GAMMA:g}) is "
                     "off: it weighs by the DDPM SNR, and diffusers' EDM training has no loss weight")
        options = dataclasses.replace(options, min_snr_gamma=0.0)
    clashes = edm_step_clashes(StepConfig(
        min_snr_gamma=options.min_snr_gamma or None, debiased_estimation=options.debiased_estimation_loss,
        scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=options.v_pred_like_loss or 0.0,
        loss=options.loss_type, huber_schedule=options.huber_schedule, input_perturbation=options.ip_noise_gamma,
        timestep_range=options.timestep_range(), timestep_sampling=options.timestep_sampling()))
    if options.scale_v_pred_loss_like_noise_pred:  # (StepConfig takes it for v-prediction only)
        clashes.insert(0, "--scale-v-pred-loss-like-noise-pred: an EDM model's loss is on x0, not on v")
    if clashes:
        raise ValueError(f"{where} trains on σ and an x0 target, as diffusers' EDM training; these options have no "
                         "meaning for it: " + "; ".join(clashes))
    if options.sample_sampler is None:  # (not given: the model's own scheduler; one given is kept, and checked below)
        if None in sample_samplers:
            notes.append(f"{where}: the sample images use {own_sampler}, its own scheduler (as its diffusers pipeline), "
                         f"not the default --sample-sampler {DEFAULT_SAMPLE_SAMPLER}, which has no EDM form")
        options = dataclasses.replace(options, sample_sampler=own_sampler)
    sample_samplers = [options.sample_sampler if name is None else name for name in sample_samplers]
    discrete = sorted({name for name in sample_samplers if canonical_sampler(name) not in EDM_SAMPLERS})
    if discrete:  # (refused now, not at the first sample after training steps)
        raise ValueError(f"{where} samples with {', '.join(EDM_SAMPLERS)} only (diffusers' EDM schedulers), and the "
                         f"sample images would use {', '.join(discrete)}: leave --sample-sampler out (the model's own "
                         f"scheduler, {own_sampler}) or give one of those, and no other --ss in --sample-prompts")
    return options


def _check_zero_terminal_snr(options: TrainOptions, prediction_type: str, notes: list[str]) -> None:
    """Refuse what cannot train on the rescaled schedule (:func:`~sdadapt.methods.fit.zero_terminal_snr_clashes`);
    note kohya's warning that an ε-prediction model is not what zero terminal SNR is for."""
    from ..methods.fit import zero_terminal_snr_clashes

    clashes = zero_terminal_snr_clashes(StepConfig(prediction_type=prediction_type,
                                                   debiased_estimation=options.debiased_estimation_loss,
                                                   v_pred_like_loss=options.v_pred_like_loss or 0.0))
    if clashes:
        raise ValueError(f"--zero-terminal-snr ({options.model} predicts {prediction_type}) cannot train " + "; ".join(clashes))
    if prediction_type == "epsilon":
        notes.append(f"--zero-terminal-snr on an epsilon-prediction model ({options.model}): at the last timestep the "
                     "input is pure noise and says nothing about the image; zero terminal SNR is meant for v-prediction "
                     "(--v-parameterization; kohya warns the same)")


@dataclass
class _Outputs:
    """Every path a run writes, known before the first step."""

    final: Path
    state: Path
    log: Path
    tensorboard: Path
    samples: Path

    def periodic(self, *, step: int | None = None, epoch: int | None = None) -> Path:
        tag = f"step{step:06d}" if step is not None else f"epoch{epoch:04d}"
        return self.final.with_name(f"{self.final.stem}-{tag}{self.final.suffix}")


def _outputs(spec, options: TrainOptions) -> _Outputs:
    if options.dataset_config is not None or options.images is None:
        data_name = Path(str(options.dataset_config or options.in_json or options.concepts_list)).stem
    else:
        data_name = Path(options.images).name
    final = Path(options.out) if options.out is not None else Path(f"{data_name}-{spec.name}{spec.file_suffix}")
    stem = final.with_suffix("") if final.suffix else final
    state = Path(options.resume) if options.resume is not None else stem.with_name(stem.name + "-state")
    return _Outputs(final, state, stem.with_name(stem.name + "-log.csv"), stem.with_name(stem.name + "-tensorboard"),
                    stem.with_name(stem.name + "-samples"))


def _check_outputs(spec, options: TrainOptions, outputs: _Outputs, *, planned: list[Path]) -> None:
    """Before any work: the folder can be written (a missing one is made just before the first write,
    as kohya's ``os.makedirs(output_dir)``), nothing is silently replaced, the names are valid. An -o
    that cannot be written is an :class:`~sdadapt.errors.OutputError` (exit 7), one that exists an
    :class:`~sdadapt.errors.OutputExistsError` (exit 8), as every other writer's (docs/security.md)."""
    from ..formats.files import OutputError, OutputExistsError, check_output_file

    final = outputs.final
    if final.is_dir():
        raise OutputError(f"{final}: is a folder; give a file name such as {final / ('out' + spec.file_suffix)}")
    # the one output check every writer runs: a file or a dangling link in the path, a read-only or unwritable folder
    check_output_file(final, overwrite=True, suffix=None)  # (existing outputs: below, with the planned ones)
    from ..formats.files import check_name_room

    for derived in (outputs.periodic(step=999_999), outputs.periodic(epoch=9_999), outputs.state, outputs.log):
        check_name_room(derived, output=final)  # (the longest names the run derives from -o, before any step)
    whole_model = _whole_model(spec)  # full / dreambooth: a .safetensors file or a folder
    if not whole_model and options.extract_lora is not None:
        raise ValueError(f"--extract-lora is for the whole-model methods (full, dreambooth); {spec.name} already writes "
                         "a small file")
    if not whole_model and options.fused_backward_pass:
        raise ValueError(f"--fused-backward-pass is for the whole-model methods (full, dreambooth), where the gradients "
                         f"are as large as the model; {spec.name}'s few trained weights gain nothing from it")
    if not whole_model and options.ema_save != "weights":
        raise ValueError(f"--ema-save {options.ema_save} is for the whole-model methods (full, dreambooth); an adapter's "
                         "file holds the EMA as its weights")
    if options.ema_save == "beside" and options.ema_decay is None:
        raise ValueError("--ema-save beside needs --ema-decay D (e.g. 0.999): there is no EMA to save without it")
    suffixes = (spec.file_suffix, *getattr(spec, "other_suffixes", ()))
    if final.suffix.lower() not in suffixes and not (whole_model and not final.suffix):
        kinds = " or ".join(f"{x} files" for x in suffixes) + (" or diffusers folders (a name without a suffix)" if whole_model else "")
        raise OutputError(f"{final}: {spec.name} writes {kinds}; name the output *{spec.file_suffix}")
    existing = [p for p in [*spec.outputs(final), *planned] if p.exists()]
    if options.extract_lora is not None and extracted_lora_path(final, options.extract_lora).exists():
        existing.append(extracted_lora_path(final, options.extract_lora))
    if options.resume is None and outputs.state.exists() and (options.save_state_on_train_end or options.save_state and (
            options.save_every_n_steps or options.save_every_n_epochs or options.save_n_epoch_ratio)):
        existing.append(outputs.state)
    if options.resume is None and outputs.log.exists():
        existing.append(outputs.log)
    if existing and not options.overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        beside = "" if final in existing else (
            f" (saves of the run --resume {options.resume} continues, made after the state it saved: pass --overwrite "
            "to make them again)" if options.resume is not None
            else f" (written beside -o {final}, with its stem: another run's output)")
        raise OutputExistsError(f"{names}: already exist{'s' if len(existing) == 1 else ''}{beside}; pass --overwrite "
                                "to replace, or choose another -o")


def _check_fp8_base_method(method: str, options: TrainOptions) -> None:
    """kohya's --fp8_base is network training's (train_network.py): refuse it for the methods that train the base."""
    if (options.fp8_base or options.fp8_base_unet) and method not in _FP8_BASE_METHODS:
        flag = "--fp8-base" if options.fp8_base else "--fp8-base-unet"
        raise ValueError(f"{flag} stores the frozen base in float8 for adapter training ({', '.join(_FP8_BASE_METHODS)}), "
                         f"as kohya's train_network.py; {method} "
                         + ("trains the base weights themselves (use --mixed-precision bf16 --full-bf16 to halve them)"
                            if method in ("full", "dreambooth") else "is not one of them")
                         + f": leave {flag} out")


def _check_full_half_method(method: str, options: TrainOptions) -> None:
    """--full-fp16 / --full-bf16 (kohya's full_fp16 / full_bf16): the adapter methods (kohya's
    train_network.py casts the network), and --full-bf16 also full / dreambooth; refuse the others."""
    if options.full_fp16 and method not in _FP8_BASE_METHODS:
        raise ValueError(f"--full-fp16 stores the adapters' weights in fp16 for the adapter methods "
                         f"({', '.join(_FP8_BASE_METHODS)}), as kohya's train_network.py; {method} "
                         + ("trains the whole model: use --mixed-precision bf16 --full-bf16 (bf16 weights with "
                            "stochastic rounding)" if method in ("full", "dreambooth") else "is not one of them")
                         + ": leave --full-fp16 out")
    if options.full_bf16 and method not in (*_FP8_BASE_METHODS, "full", "dreambooth"):
        raise ValueError(f"--full-bf16 stores the trained weights in bf16 for full, dreambooth and the adapter methods "
                         f"({', '.join(_FP8_BASE_METHODS)}); {method} is not one of them: leave --full-bf16 out "
                         "(--mixed-precision bf16 alone runs its forward in bf16)")


def _half_weights_record(options: TrainOptions) -> str:
    """The run record's ``half_weights``: ``"fp16"`` (--full-fp16), ``"bf16"`` (--full-bf16) or ``"off"``."""
    return "fp16" if options.full_fp16 else "bf16" if options.full_bf16 else "off"


def _fp8_base_record(options: TrainOptions) -> str:
    """``run.json``'s ``fp8_base``: which base models the run stored in float8 (``off``, ``unet``, ``unet+text``)."""
    return "unet+text" if options.fp8_base and not options.fp8_base_unet else "unet" if options.fp8_base_unet else "off"


def _cast_base_to_fp8(system, options: TrainOptions) -> list[str]:
    """--fp8-base / --fp8-base-unet: the UNet's (and text encoders') frozen Linear / Conv weights to float8_e4m3fn
    (:func:`sdadapt.training.fp8_base.cast_base_to_fp8`); the lines to report."""
    if not (options.fp8_base or options.fp8_base_unet):
        return []
    from ..methods.system import system_models
    from ..training.fp8_base import cast_base_to_fp8

    models = system_models(system)
    lines = []
    if options.fp8_base_unet:
        models = models[:1]
    elif options.cache_text_encoder_outputs:  # (they encode the cache outside autocast)
        models = models[:1]
        lines.append("--fp8-base: the text encoders keep their dtype: --cache-text-encoder-outputs runs them once, "
                     "before the first step, and never again")
    for name, model in models:
        cast = cast_base_to_fp8(model)
        lines.append(f"--fp8-base: {name}'s {len(cast.names)} Linear/Conv weight and bias tensors stored in float8_e4m3fn: "
                     f"{cast.bytes_before / 2**20:.1f} MiB -> {cast.bytes_after / 2**20:.1f} MiB (norms and embeddings "
                     "keep their dtype)")
    return lines


def _whole_model(spec) -> bool:
    """Whether the method saves the whole tuned model (full, dreambooth) rather than an adapter file."""
    return getattr(spec.prepare, "__name__", "") in ("prepare_full", "prepare_dreambooth")


def _stamp(path: Path, *, metadata: dict[str, str], dtype: torch.dtype | None, hashes: bool) -> None:
    """Rewrite a safetensors adapter file: float tensors in ``dtype``, ``metadata`` added, and
    kohya's ``sshs_model_hash``/``sshs_legacy_hash`` of the result (what A1111 shows)."""
    from ..formats.files import read_safetensors, write_safetensors
    from ..formats.kohya import kohya_hashes

    tensors, meta = read_safetensors(path)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v for k, v in tensors.items()}
    meta.update(metadata)
    if hashes:
        meta.update(kohya_hashes(tensors, meta))
    write_safetensors(path, tensors, meta)


def _hashed(path: Path) -> bool:
    """The file already carries kohya's hashes of itself (``save_kohya`` writes them: ``_stamp`` would only
    read, hash and write it again to the same bytes)."""
    from ..formats.files import read_safetensors_header

    return "sshs_model_hash" in read_safetensors_header(path)[1]


def _model_file(model: str) -> Path | None:
    if model == "toy":
        from ..toy.system import DEFAULT_WEIGHTS

        return DEFAULT_WEIGHTS
    path = Path(model)
    return path if path.is_file() else None


class _Hashes:
    """The base model's hashes, computed once at the first save (a big file takes seconds)."""

    def __init__(self, model: str) -> None:
        self.model, self._value = model, None

    def get(self) -> dict[str, str]:
        if self._value is None:
            from ..formats.single_file import file_hashes

            file = _model_file(self.model)
            self._value = file_hashes(file) if file is not None else {}
        return self._value


def _save(adaptation, spec, path: Path, *, metadata: dict[str, str], dtype: torch.dtype | None, ema=None) -> Path:
    """The method's file, with ``metadata``; safetensors adapter files get dtype and kohya hashes; a whole
    model gets ``ema`` (:class:`~sdadapt.methods.finetune.EMAWeights`) beside its weights when given."""
    whole_model = "dtype" in inspect.signature(adaptation.save).parameters
    if whole_model:
        extra = {"ema": ema} if ema is not None else {}
        saved = Path(adaptation.save(path, metadata=metadata, dtype=dtype, **extra))
    else:
        saved = Path(adaptation.save(path, metadata=metadata))
        if saved.suffix.lower() == ".safetensors" and (dtype is not None or not _hashed(saved)):
            _stamp(saved, metadata={}, dtype=dtype, hashes=True)
    return saved


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _replacing(paths) -> Iterator[None]:
    """Around a save that writes ``paths`` anew (the user allowed replacing them; the writers refuse
    existing paths): the existing ones are renamed aside first (``NAME.replaced-<pid>`` in the same
    folder), put back if the save raises (an error, a full disk, Ctrl-C) and removed once it
    succeeded — an interrupted save leaves the previous outputs, not none. Only a kill during the
    save leaves the ``.replaced-<pid>`` names behind (the previous outputs, to rename back)."""
    from ..formats.files import signals_held

    aside: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            if path.exists() or path.is_symlink():
                moved = path.with_name(f"{path.name}.replaced-{os.getpid()}")
                _remove(moved)  # (a leftover of an earlier, killed run of this pid number)
                with signals_held():  # a signal between the rename and the note would lose the way back
                    os.replace(path, moved)
                    aside.append((path, moved))
        yield
    except BaseException:
        for path, moved in reversed(aside):
            _remove(path)  # what the failed save wrote there
            os.replace(moved, path)
        raise
    for _, moved in aside:
        _remove(moved)


def run_train(method: str, options: TrainOptions | None = None, *, progress: Progress | None = None,
              bars: Bars | None = None, log: Callable[[str], None] | None = None, **fields) -> dict:
    """Train ``method`` on a folder of images (see :class:`TrainOptions`); everything is checked
    before the first step, and nothing existing is replaced without ``overwrite``.

    Args:
        options: the run; or give its fields as keywords (``images=..., steps=...``; the old
            ``class_count`` is ``class_images``).
        progress: ``progress(step, total, avr_loss)`` after each step: kohya's moving average of the
            batch losses (:class:`~sdadapt.training.monitor.LossAverage`), what its progress bar shows.
        bars: ``bars(label, unit)`` makes the progress callback of the other phases (caching
            latents, class images, samples).
        log: ``log(line)`` for what the run does (the per-image dataset report, saves, samples).

    Returns:
        ``{"method", "images", "prior_images", "losses", "seconds", "file", "steps", "epochs",
        "report", "saved", "removed", "samples", "log", "state", "resumed_from", "lora", "memory"}`` (``removed``: the
        periodic saves ``save_last_n_steps`` / ``save_last_n_epochs`` removed; ``lora``: with
        ``extract_lora``, ``{"file", "rank", "layers", "max_relative_error", "worst_layer"}``, the
        error measured on the file written; else ``None``; ``memory``: on a CUDA device the run's largest
        ``{"peak_allocated_mib", "reserved_mib"}`` readings (:mod:`~sdadapt.training.memory_watch`), else ``None``).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false.
        NonFiniteLossError: the loss became NaN/inf (the message names the step and the last save).
        KeyboardInterrupt: after saving the weights and the state so far (``--resume`` continues).

    Under torchrun / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process calls this: it joins the
    process group (:func:`~sdadapt.training.data_parallel.launched_process_group`; left as it is when
    you initialised one), trains data-parallel with ``batch_size`` per process, and only rank 0 writes
    files; every rank returns after they exist (docs/train.md#several-gpus-torchrun-accelerate-launch).
    """
    if options is None:
        if "class_count" in fields:
            fields["class_images"] = fields.pop("class_count")
        options = TrainOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    world = data_parallel.launched_world_size()
    refused = data_parallel.data_parallel_clashes(cuda_graph=options.cuda_graph, fused_backward=options.fused_backward_pass)
    if world > 1 and refused:  # (before the process group and the model: every rank raises it)
        raise ValueError(f"training on {world} processes (torchrun) cannot work with " + "; ".join(refused)
                         + ": leave it out, or train in one process")
    with data_parallel.launched_process_group(data_parallel.rank_device(resolve_device(options.device)),
                                              timeout_minutes=options.ddp_timeout):
        result = _run_train(method, options, progress=progress, bars=bars, log=log)
        # (files rank 0 wrote exist when any rank returns)
        data_parallel.wait_for_all_ranks("the wait for rank 0's files at the end")
        return result


def _run_train(method: str, options: TrainOptions, *, progress: Progress | None = None,
               bars: Bars | None = None, log: Callable[[str], None] | None = None) -> dict:
    """:func:`run_train` in this process (in a process group when launched data-parallel), on the
    options :func:`run_train` resolved."""
    from ..methods.fit import NonFiniteLossError
    from ..methods.lora_blocks import check_block_args
    from ..sampling import parse_sample_prompts
    from ..training.data import Dataset, encode_buckets, find_images, plan_dataset
    from ..training.pixel_augment import LARGE_PREFIXES, SMALL_PREFIXES, PixelAugment
    from ..training.memory_watch import MEMORY_COLUMNS, memory_watch
    from ..training.monitor import MAX_NORM_COLUMNS, LossAverage, RunLog, tensorboard_available
    from ..training.validation import VALIDATION_COLUMNS, validation_columns
    from .caption_lines import recorded_caption_assembly, recorded_caption_empties, recorded_caption_lines
    from .run_versions import recorded_version

    data_config = None  # kohya's dataset TOML / fine-tuning metadata, read (no image yet) before any other check
    block_options: list[TrainOptions] = []  # kohya's several [[datasets]]: each block's options (its size, batch, buckets)
    if options.dataset_config is not None or options.in_json is not None:
        data_config = _read_data_config(options)
        try:
            options = dataclasses.replace(options, **data_config.options)
        except ValueError as exc:  # (e.g. batch_size = 0 in the file: name the file, not only the flag)
            from ..errors import InputError

            flag = "--dataset-config" if options.dataset_config is not None else "--in-json"
            raise InputError(f"{flag} {data_config.source}: {exc}") from None
        block_options = _block_options(options, data_config)
    say = log or (lambda line: None)
    spec = _method(method)
    known = {o.name for o in spec.options}
    unknown = sorted(set(options.method_options) - known)
    if unknown:
        flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
        raise ValueError(f"{flags}: not an option of {method} (its options: "
                         f"{', '.join(o.option_strings[0] for o in spec.options) or 'none'})")
    if options.resize_aug and method != "custom-diffusion":
        raise ValueError(f"--resize-aug is Custom Diffusion's resize augmentation (diffusers' train_custom_diffusion.py), "
                         f"for train custom-diffusion; {method} trains without it (kohya's --random-crop and --color-aug "
                         "change the pixels at each use for any method)")
    if getattr(spec, "trigger", False) and not options.method_options.get("token"):
        raise ValueError(f"{method} learns a trigger word: pass --token WORD, the word the captions use (e.g. '<sks>')")
    if options.weighted_captions and getattr(spec, "trigger", False):
        raise ValueError(f"--weighted-captions: {method} encodes its captions itself (the trigger word's vectors go in "
                         "before the text encoder), so the token weights cannot reach its text states; leave it off")
    check_block_args(options.method_options)  # kohya's block-wise network_args, before the model loads
    plus = sorted(n for n in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
                  if options.method_options.get(n) is not None)
    if plus and method in ("loha", "lokr") and not options.method_options.get("dim_from_weights"):
        raise ValueError(f"{', '.join(plus)}: LoRA+ speeds up the lora_up (B) factors and {method} has none (LyCORIS "
                         "would train it at the plain rate): train lora, locon or dora, or leave the ratios out")
    concepts = _read_concepts(method, options)  # diffusers' --concepts-list: checked before anything loads
    dataset_record = _data_config_record(data_config, options) if concepts is None else _concepts_record(options, concepts)
    _check_text_cache_method(method, spec, options)
    _check_fp8_base_method(method, options)
    _check_full_half_method(method, options)
    if method == "dylora" and options.torch_compile:  # (fit refuses it too; here before the model loads)
        from ..adapters.dylora import DYLORA_COMPILE_REASON

        raise ValueError(f"--torch-compile with dylora: {DYLORA_COMPILE_REASON}; leave --torch-compile out")
    _check_dtype(spec, options.dtype)
    outputs = _outputs(spec, options)
    samples = parse_sample_prompts(options.sample_prompts) if options.sample_prompts is not None else []
    if options.log_with == "tensorboard" and not tensorboard_available():
        raise ImportError("--log-with tensorboard needs the tensorboard package: pip install tensorboard (the CSV log "
                          "needs nothing)")
    preset_file = _preset_file_record(options)  # (as the run starts: every state saved records these bytes)
    resume_record = None
    if options.resume is not None:
        resume_record = _check_resume(Path(options.resume), method, options, dataset=dataset_record)
    optimizer_defaults = train_optimizer.recorded_defaults(resume_record)  # (a run recorded before: its own)
    step_shares = train_schedule.recorded_shares(resume_record)  # (a run recorded before rounded its warm-up share)
    caption_lines = recorded_caption_lines(resume_record)  # (a run recorded before joined a caption file's lines)
    caption_empties = recorded_caption_empties(resume_record)  # (a run recorded before dropped empty captions / tags)
    keep_empty_tags = caption_empties == EMPTIES_KEPT
    caption_assembly = recorded_caption_assembly(resume_record)  # (a run recorded before: its suffix / wildcard / dropout ways)
    kohya_assembly = caption_assembly in (ASSEMBLY_KOHYA, ASSEMBLY_KOHYA_2)
    kohya_order = caption_assembly == ASSEMBLY_KOHYA_2  # (a run recorded "kohya": the template first, and so on)
    # (a run recorded before kohya's buckets keeps its own: no square bucket, round-half-even, its no-upscale)
    bucket_rule = recorded_version(resume_record, "bucket_rule", new=BUCKETS_KOHYA, legacy=BUCKETS_BEFORE)
    # (a run recorded before drew its --caption-template filled in once, the trigger word among the tags)
    trigger_way = recorded_version(resume_record, "trigger_captions", new=TRIGGER_WRAPPED, legacy=TRIGGER_FILLED)
    relative_step = train_optimizer.uses_relative_step(options, _optimizer_args(options), optimizer_defaults)
    # the outputs that need no model to name: checked before anything is loaded
    _check_outputs(spec, options, outputs, planned=[])
    unused_sources = [(flag, value) for flag, value in (("--reg-data-dir", options.reg_data_dir),
                                                        ("--in-json", options.in_json),
                                                        ("--conditioning-data-dir", options.conditioning_data_dir))
                      if value is not None]
    if options.dataset_config is not None and unused_sources:  # (the kohya_ss fine-tune tab always writes in_json)
        source_note = (f"{', '.join(f'{flag} {value}' for flag, value in unused_sources)}: not used, --dataset-config "
                       f"{options.dataset_config} lists the images (kohya ignores them with a dataset config too; "
                       "a regularisation folder is a subset with is_reg = true there, metadata a subset's "
                       "metadata_file, mask images a subset's conditioning_data_dir)")
        options = dataclasses.replace(options, reg_data_dir=None, in_json=None, conditioning_data_dir=None)
    else:
        source_note = None
    from ..training.max_norm import MAX_NORM_SKIPPED

    max_norm_note = None  # (LyCORIS' kohya network skips MAX_NORM_SKIPPED's families: a no-op there, said)
    if options.scale_weight_norms is not None and method in MAX_NORM_SKIPPED:  # (GUIs write it for every type)
        max_norm_note = (f"--scale-weight-norms {options.scale_weight_norms}: not used by {method} (LyCORIS' "
                         f"{'IA3' if method == 'ia3' else 'GLoRA'} modules have no max norm: kohya runs it as a no-op)")
        options = dataclasses.replace(options, scale_weight_norms=None)
    elif options.scale_weight_norms is not None and str(options.method_options.get("train_norm", "")).strip().lower() in (
            "true", "1", "yes", "on"):
        max_norm_note = (f"--scale-weight-norms {options.scale_weight_norms}: bounds the {method} modules, not "
                         "train_norm's norm modules (LyCORIS defines no max norm for them: its kohya network skips them)")
    if options.scale_weight_norms is not None and method not in _MAX_NORM_METHODS:
        raise ValueError(f"--scale-weight-norms {options.scale_weight_norms} shrinks LoRA-family and OFT adapters "
                         f"({', '.join(_MAX_NORM_METHODS)}), not {method}"
                         + (" (DoRA renormalises W + ΔW to its magnitude: shrinking ΔW does not bound the change)"
                            if method == "dora" else ""))
    weights_file = options.method_options.get("network_weights")
    if weights_file is not None and not Path(weights_file).exists():  # (a peft adapter is a folder)
        raise FileNotFoundError(f"--network-weights {weights_file}: no such file (give the LoRA/LyCORIS file to start from)")
    # (--base-weights files: checked as the options are made, _check_loraplus_unet_base_weights_block_lr)
    device = data_parallel.rank_device(resolve_device(options.device))  # (under torchrun: cuda:LOCAL_RANK)
    parallel = data_parallel.active()  # every rank runs every check: an error before the first step is raised on all
    world, main = (1, True) if parallel is None else (parallel.world, parallel.main)
    if data_parallel.launched_world_size() > 1 and parallel is None:
        raise ValueError("WORLD_SIZE > 1 but no process group: call run_train itself under torchrun (it joins the group), "
                         "or initialise one with torch.distributed.init_process_group first")
    start_time = time.perf_counter()
    trigger = options.method_options.get("token") if getattr(spec, "trigger", False) else None
    triggers = _trigger_words(method, options) if trigger is not None else ()  # (custom-diffusion: several, '+')
    if trigger is None and (options.caption_template is not None or options.templates != "object"
                            or options.templates_replace_captions):
        raise ValueError(f"--caption-template, --templates and --templates-replace-captions are for methods that learn "
                         f"a trigger word (--token); "
                         f"{method} trains on the captions as they are")
    config_reg, config_subsets = None, {}  # a dataset TOML's is_reg subsets (balanced as --reg-data-dir's), its subsets
    if data_config is not None:
        from ..training.dataset_config import dataset_records

        # (its is_reg subsets balanced against the images left after the validation split, as kohya: the
        # split is a pure function of the records, drawn again below)
        records, config_reg, config_subsets, notes = dataset_records(
            data_config, uncaptioned=trigger is not None,
            kept=lambda train: _hold_out_for_validation(train, options, [], block_options)[0], caption_lines=caption_lines,
            empties=caption_empties, assembly=caption_assembly)
        if config_reg is not None and (options.prior is False or options.class_images is not None
                                       or options.class_data_dir is not None):
            raise ValueError(f"--dataset-config {options.dataset_config}: its is_reg subsets are prior preservation with "
                             "your class images, so they cannot go with "
                             + ("--no-prior" if options.prior is False else f"--class-images {options.class_images} "
                                "(generated ones)" if options.class_images is not None else
                                f"--class-data-dir {options.class_data_dir} (generated ones)") + ": leave one of the two out")
        if options.dataset_config is not None and options.images is not None:
            notes.append(f"--images {options.images}: not used, --dataset-config {options.dataset_config} lists the image "
                         "folders (kohya ignores train_data_dir with a dataset config too)")
    elif concepts is not None:  # each concept's images on its instance_prompt (diffusers' CustomDiffusionDataset)
        from ..custom_diffusion.concepts import concept_records

        records, notes = concept_records(concepts, repeats=options.repeats)
        for record in records:
            record.interpolation = options.resize_interpolation
    else:
        records, notes = find_images(options.images, default_caption=options.prompt, uncaptioned=trigger is not None,
                                     caption_extension=options.caption_extension, repeats=options.repeats,
                                     multiline=options.enable_wildcard, caption_lines=caption_lines, empties=caption_empties)
        for record in records:  # (kohya's resize_interpolation; a dataset TOML's subsets carry their own)
            record.interpolation = options.resize_interpolation
    if method == "dreamartist":  # (the extension's "<name>_att.png" maps weigh their image's loss, never train as images)
        from ..training.loss_masks import is_attention_map

        kept = [r for r in records if r.path is None or not is_attention_map(r.path)]
        if len(kept) < len(records):
            notes.append(f"{plural(len(records) - len(kept), 'attention map')} (*_att.*, the DreamArtist extension's): "
                         "each weighs its image's loss (0 to 5, as the extension's 'Attention Map'), not a training image")
            records = kept
    if len(triggers) > 1:
        notes.extend(_several_tokens_captions(records, triggers, options))
        templates = ()
    elif trigger is not None:
        trigger_notes, templates = _trigger_captions(records, trigger, options, trigger_captions_way=trigger_way)
        if not options.templates_replace_captions:  # (else every caption is a template: _replace_captions says so)
            notes.extend(trigger_notes)
    else:
        templates = ()
    if trigger is not None:  # (the trigger's token rows live in hooks, not in the encoders: one rate, as kohya's TI)
        unused = [f"{flag} {value}" for flag, value in (("--text-encoder-lr", options.text_encoder_lr),
                                                        ("--text-encoder-2-lr", options.text_encoder_2_lr))
                  if value is not None]
        if unused:
            notes.append(f"{', '.join(unused)}: not used by {method}: the trigger's token rows train at the learning "
                         "rate" + (" times --token-lr-scale" if method == "custom-diffusion" else "")
                         + ", as kohya's and diffusers' textual inversion train them (one rate)")
    # (the caption options' notes only where the run's options are every training subset's)
    agreed = data_config is None or all(name in data_config.options for name in (
        "shuffle_caption", "keep_tokens", "caption_tag_dropout_rate", "token_warmup_step", "token_warmup_min"))
    notes.extend(_inactive_option_notes(options, caption_notes=agreed))
    notes.extend(note for note in (source_note, max_norm_note) if note is not None)
    notes.extend(train_optimizer.relative_step_notes(options, _optimizer_args(options), defaults=optimizer_defaults,
                                                     learning_rate=options.unet_lr or options.learning_rate or spec.learning_rate))
    notes.extend(train_optimizer.prodigy_notes(options, learning_rate=options.unet_lr or options.learning_rate
                                               or spec.learning_rate))
    notes.extend(train_optimizer.schedule_free_notes(options, _optimizer_args(options)))
    subset_masks = [str(r.mask_folder) for r in records if r.mask_folder is not None]
    if subset_masks and not options.masked_loss:  # (kohya's DreamBooth dataset schema has no such key without it)
        raise ValueError(f"--dataset-config {options.dataset_config}: conditioning_data_dir {subset_masks[0]} gives "
                         "mask images, read only with --masked-loss (kohya's masked_loss): add it, or leave the key out")
    loss_masks = _loss_mask_source(options, records, method)
    if loss_masks is not None and loss_masks.mask_images and not options.alpha_mask and any(
            r.alpha_mask for r in records):
        notes.append("--dataset-config alpha_mask: not used; the masks come from the mask images (kohya's masked loss "
                     "prefers them)")
    if loss_masks is not None and loss_masks.per_subset and options.alpha_mask:
        notes.append("--alpha-mask: not used; the masks come from the dataset TOML's conditioning_data_dir folders "
                     "(kohya's masked loss prefers the mask images)")
    unmasked = loss_masks.missing(records) if loss_masks is not None else []
    if unmasked and loss_masks is not None and loss_masks.per_subset:  # (kohya asserts the same before training)
        raise ImageFolderError(f"--dataset-config {options.dataset_config}: no mask image in its subset's "
                               f"conditioning_data_dir for {len(unmasked)} training image(s): {', '.join(unmasked[:5])}"
                               f"{' ...' if len(unmasked) > 5 else ''}; give each image a mask of the same name (every "
                               "training subset needs its conditioning_data_dir, as kohya's)")
    if unmasked:  # (kohya asserts the same before training)
        raise ImageFolderError(f"--conditioning-data-dir {options.conditioning_data_dir}: no mask image for "
                               f"{len(unmasked)} training image(s): {', '.join(unmasked[:5])}"
                               f"{' ...' if len(unmasked) > 5 else ''}; give each image a mask of the same name")
    # kohya's validation_split: each subset's held-out images (before the class images are balanced against the rest)
    records, held_out = _hold_out_for_validation(records, options, notes, block_options)
    reg = config_reg  # --reg-data-dir: the user's class images, read and balanced before the model loads
    if options.reg_data_dir is not None:
        from ..training.reg_data import find_reg_images

        reg = find_reg_images(options.reg_data_dir, train_samples=sum(r.repeats for r in records),
                              default_caption=options.class_prompt, caption_extension=options.caption_extension,
                              caption_lines=caption_lines, empties=caption_empties)
        notes.extend(reg.notes)
    reg_templates: tuple[str, ...] = ()  # the class images' templates: none, but kohya's use_*_template replaces theirs too
    if options.templates_replace_captions and trigger is not None:
        templates = reg_templates = _replace_captions(records, reg.records if reg is not None else [], trigger,
                                                      options, notes)
    from ..training.edm import edm_own_sampler
    from .model_size import model_edm_scheduler, model_is_sdxl

    # an SDXL-layout model told by its header or folder: Custom Diffusion refused before the load (what the header
    # cannot tell, prepare_custom_diffusion refuses on the loaded system)
    if method == "custom-diffusion" and model_is_sdxl(options.model):
        from ..methods.custom_diffusion import SDXL_REFUSAL

        raise ValueError(f"--model {options.model} has the SDXL layout (two text encoders): {SDXL_REFUSAL}")
    # an EDM model told by its header or configs (Playground v2.5; a .ckpt by its pickle's key names): its refusals and
    # defaults before the (slow) load; one only the loaded model tells is checked after it (docs/train.md "EDM models")
    edm_config = model_edm_scheduler(options.model)
    if edm_config is not None:
        options = _edm_options(method, options, notes, sample_samplers=[sample.sampler for sample in samples],
                               own_sampler=edm_own_sampler(edm_config))
    say(f"loading {options.model} on {device}")
    system = load_system(options.model, device=device, tokenizer=options.tokenizer,
                         prediction_type=options.prediction_type, clip_skip=options.clip_skip or 1,
                         max_token_length=options.max_token_length, vae=options.vae, log=say)
    num_train_timesteps = int(system.alphas_cumprod.shape[0])  # (the model's T: the range and the draw's table)
    _check_timesteps(options, num_train_timesteps)
    if getattr(system, "is_refiner", False):  # (kohya's sd-scripts train no refiner; its time_ids differ)
        raise ValueError(f"--model {options.model}: the SDXL refiner is not trained here (kohya's sd-scripts train SDXL "
                         "base models only; the refiner's size/aesthetic-score conditioning has no training path); train "
                         "the base model, or use the refiner for generate and convert")
    if getattr(system, "edm", None) is not None and edm_config is None:  # (Playground v2.5: diffusers' EDM training)
        options = _edm_options(method, options, notes, sample_samplers=[sample.sampler for sample in samples],
                               own_sampler=edm_own_sampler(getattr(system, "scheduler_config", None)))
    if options.min_snr_gamma is None:  # (not given, not an EDM model: sdadapt's default γ)
        options = dataclasses.replace(options, min_snr_gamma=DEFAULT_MIN_SNR_GAMMA)
    if options.sample_sampler is None:  # (not given, not an EDM model: kohya's default ddim)
        options = dataclasses.replace(options, sample_sampler=DEFAULT_SAMPLE_SAMPLER)
    if options.ema_save == "beside" and "ema" not in inspect.signature(system.save_model).parameters:
        raise ValueError(f"--ema-save beside: {type(system).__name__} ({options.model}) has no place for an EMA beside its "
                         "weights (LDM files and diffusers folders do); use --ema-save weights")
    _check_v_pred_loss(options, getattr(system, "prediction_type", "epsilon"))  # (the model's prediction is known now)
    if options.zero_terminal_snr:  # what the model predicts is known now: before the latents are cached
        _check_zero_terminal_snr(options, getattr(system, "prediction_type", "epsilon"), notes)
    notes.extend(_clip_skip_notes(options, getattr(system, "architecture", None)))  # (kohya's SDXL / v2 warnings)
    native = int(system.image_size)
    multiple = int(getattr(system, "size_multiple", 4))
    if samples:  # (the model's size multiple is known now: a prompt's size or steps must not stop the run mid-way)
        from ..sampling import fit_sample_prompt

        # (a sample is generated: its sides need only be multiples of the VAE's factor, kohya's 8)
        fitted = [fit_sample_prompt(sample, multiple=int(getattr(system, "vae_factor", multiple))) for sample in samples]
        samples = [sample for sample, _ in fitted]
        notes.extend(note for _, said in fitted for note in said)
    # each [[datasets]] block of a dataset TOML bucketed alone at its own size (kohya's datasets); else the run's options
    plans = [(opts, *_bucket_plan(opts, native=native, multiple=multiple,
                                  where=f"--dataset-config {options.dataset_config}: datasets[{i}]: "))
             for i, opts in enumerate(block_options)] or [(options, *_bucket_plan(options, native=native, multiple=multiple))]
    _, height, width, step_size = plans[0]  # (the run's size: samples, generated class images, metadata)
    if concepts is not None and options.prior is not False:  # each concept's class images, the missing ones made now
        from ..custom_diffusion.concepts import DIFFUSERS_NUM_CLASS_IMAGES, concept_class_images

        reg = concept_class_images(system, concepts, count=options.class_images or DIFFUSERS_NUM_CLASS_IMAGES,
                                   seed=options.seed, size=(height, width), group=parallel,
                                   progress=bars("class images", "image") if bars is not None else None)
        notes.extend(reg.notes)
    # (data parallel: each block's global batch, its batch × world)
    batch_sizes = tuple(opts.batch_size * world for opts, *_ in plans) if block_options else ()

    def plan_blocks(group: list) -> None:
        """``group``'s buckets, scales and crops, each block's images by its own settings."""
        for block, (opts, h, w, step) in enumerate(plans):
            plan_dataset(group if not block_options else [r for r in group if r.dataset == block], resolution=(h, w),
                         buckets=opts.enable_bucket, step=step, min_size=opts.min_bucket_reso,
                         max_size=opts.max_bucket_reso, no_upscale=opts.bucket_no_upscale, rule=bucket_rule,
                         full_size_crop=options.random_crop and not opts.enable_bucket)

    def face_crops(group: list, crop_range, notes: list[str]) -> int:
        """:func:`_face_crop_records` for each block's images (its own ``enable_bucket``; each note once)."""
        said: list[str] = []
        count = 0
        for block, (opts, *_) in enumerate(plans):
            mine = group if not block_options else [r for r in group if r.dataset == block]
            if mine:
                count += _face_crop_records(mine, crop_range, buckets=opts.enable_bucket, loss_masks=loss_masks, notes=said)
        notes.extend(dict.fromkeys(said))
        return count

    plan_blocks(records)
    if held_out:  # bucketed as the training images
        plan_blocks(held_out)
    captions = _caption_options(options, templates=templates, total_steps=None,  # (the warm-up once the steps are known)
                                keep_empty_tags=keep_empty_tags, kohya_assembly=kohya_assembly, kohya_order=kohya_order)
    faces = face_crops(records, options.face_crop_aug_range, notes)
    augment = PixelAugment(random_crop=options.random_crop, color_aug=options.color_aug,
                           face_crop_range=options.face_crop_aug_range if faces else None, resize_aug=options.resize_aug)
    if options.resize_aug and loss_masks is not None:  # (a dataset TOML's alpha_mask subsets)
        raise ValueError("--resize-aug masks the loss to each resized image's region itself; it cannot be combined with "
                         "loss masks (the dataset config's alpha_mask subsets): leave one out")
    dataset = Dataset(records, captions=captions, notes=notes, flip=options.flip_aug, augment=augment, loss_masks=loss_masks,
                      batch_sizes=batch_sizes)
    reg_dataset = None
    if reg is not None:  # bucketed, captioned and flipped as the training images (kohya: one dataset of both)
        plan_blocks(reg.records)
        # (the class images are not resized: diffusers' CustomDiffusionDataset augments the instance images only)
        reg_flip, reg_augment = options.flip_aug, dataclasses.replace(augment, resize_aug=False)
        if data_config is not None and data_config.reg_augment:  # the is_reg subsets' own (one setting for all of them)
            reg_flip = data_config.reg_augment["flip_aug"]
            reg_faces = data_config.reg_augment.get("face_crop_aug_range")
            reg_augment = PixelAugment(random_crop=data_config.reg_augment["random_crop"],
                                       color_aug=data_config.reg_augment["color_aug"],
                                       face_crop_range=reg_faces if face_crops(reg.records, reg_faces, []) else None)
        elif face_crops(reg.records, options.face_crop_aug_range, []):  # (kohya: the class images' faces too)
            reg_augment = dataclasses.replace(reg_augment, face_crop_range=options.face_crop_aug_range)
        reg_dataset = Dataset(reg.records, captions=dataclasses.replace(captions, templates=reg_templates), flip=reg_flip,
                              augment=reg_augment, loss_masks=LossMaskSource() if options.alpha_mask or any(
                                  r.alpha_mask for r in reg.records) else None, batch_sizes=batch_sizes)
    from ..sampling import unknown_words

    zoom_words = (*SMALL_PREFIXES, *LARGE_PREFIXES) if options.resize_aug else ()  # (--resize-aug's caption prefixes)
    unknown_caption_words = sorted({w for c in [*(r.caption for r in records), *templates, *zoom_words]
                                    for w in unknown_words(system, c)}
                                   - {w for t in triggers for w in (t.lower(), f"{t.lower()}-neg")})
    if unknown_caption_words:
        dataset.notes.append(f"the toy tokenizer does not know {', '.join(unknown_caption_words[:8])} (they become <unk>); "
                             f"its words: {', '.join(_toy_vocabulary(system))}")
    per_epoch = dataset.batches_per_epoch(options.batch_size * world)  # (data parallel: the global batch, batch × world)
    kohya_per_epoch = dataset.batches_per_epoch(options.batch_size * world, processes=world)
    if kohya_per_epoch != per_epoch:  # (several buckets on several processes: kohya's steps may mix buckets)
        dataset.notes.append(
            f"{world} processes: an epoch is {per_epoch} global batch(es) here, each of one bucket ({options.batch_size} "
            f"× {world} images, a short bucket's missing rows weighted 0); kohya's accelerate deals per-process batches "
            f"of any bucket to the processes, {kohya_per_epoch} per epoch — with --epochs (max_train_epochs) this run "
            "takes more steps than kohya's would; give --steps to train as many")
    accumulation = options.gradient_accumulation_steps
    # kohya's (accelerate's) epochs: ceil(B / A) optimiser steps each, the last a short one when A does not divide
    # B (sdadapt.methods.fit.micro_batches_of_step)
    steps_per_epoch = math.ceil(per_epoch / accumulation)
    if options.epochs is not None:
        total = max(1, options.epochs * steps_per_epoch)
    else:
        total = options.steps or spec.steps
    epochs = math.ceil(total / steps_per_epoch)
    if options.token_warmup_step:  # kohya's token_warmup_step below 1 is a share of the run's steps: known now
        dataset.captions = _caption_options(options, templates=templates, total_steps=total, keep_empty_tags=keep_empty_tags,
                                            kohya_assembly=kohya_assembly, kohya_order=kohya_order)
        if reg_dataset is not None:
            reg_dataset.captions = dataclasses.replace(dataset.captions, templates=reg_templates)
    if data_config is not None:  # each subset's own caption options on its images (the warm-up's steps known now)
        _subset_captions(options, config_subsets, [*records, *held_out, *(reg.records if reg is not None else ())],
                         templates=templates, reg_templates=reg_templates, total_steps=total,
                         keep_empty_tags=keep_empty_tags, kohya_assembly=kohya_assembly, kohya_order=kohya_order)
    initial_step, skip_until = resolve_initial_step(options, resume_record, batches_per_epoch=per_epoch, total=total)
    start = int(resume_record["step"]) if resume_record else initial_step
    if start >= total:
        raise ValueError(f"{options.resume}: the saved state is at step {start} of {total}; raise --steps to train further")
    dataset.notes.extend(initial_step_notes(options, initial_step, skip_until, total=total))
    # every periodic file is known now: check them all before the first step
    every_epochs = options.save_every_n_epochs
    if options.save_n_epoch_ratio:  # kohya's: floor(epochs / ratio) or 1, in place of --save-every-n-epochs
        every_epochs = max(1, epochs // options.save_n_epoch_ratio)
    periodic: dict[int, PeriodicSave] = {}  # step -> the save made there (its kind decides its rotation)
    if options.save_every_n_steps:
        periodic.update({s: PeriodicSave("step", s, outputs.periodic(step=s))
                         for s in range(options.save_every_n_steps, total, options.save_every_n_steps)})
    if every_epochs:
        for e in range(every_epochs, epochs, every_epochs):
            s = min(total, math.ceil(e * steps_per_epoch))
            if s < total:
                periodic.setdefault(s, PeriodicSave("epoch", e, outputs.periodic(epoch=e)))
    planned = {s: save.path for s, save in periodic.items() if s > start}
    # the periodic saves this run lineage wrote and has not removed (a resumed run continues the rotation)
    written: list[PeriodicSave] = _recorded_saves(resume_record, Path(options.resume)) if resume_record else []
    sample_points = set()
    if samples:
        if options.sample_every_n_epochs:  # (kohya's sample_images_common: the epoch period replaces the step one)
            sample_points.update(min(total, math.ceil(e * steps_per_epoch))
                                 for e in range(options.sample_every_n_epochs, epochs + 1, options.sample_every_n_epochs))
            if options.sample_every_n_steps:
                say(f"--sample-every-n-steps {options.sample_every_n_steps}: not used, --sample-every-n-epochs "
                    f"{options.sample_every_n_epochs} sets when to sample (as kohya, which ignores the step period then)")
        elif options.sample_every_n_steps:
            sample_points.update(range(options.sample_every_n_steps, total + 1, options.sample_every_n_steps))
        if not sample_points:
            sample_points.add(total)
        sample_points = {s for s in sample_points if s > start}
        if options.sample_at_first and options.resume is None:  # kohya's: the untrained adaptation's samples, before step 1
            sample_points.add(0)
        elif options.sample_at_first:
            say("--sample-at-first: not sampled again when resuming (the first run wrote its step-0 samples)")
    sample_files = [outputs.samples / f"step{s:06d}-{i:02d}.png" for s in sorted(sample_points) for i in range(len(samples))]
    _check_outputs(spec, options, outputs, planned=[*(o for p in planned.values() for o in spec.outputs(p)), *sample_files])
    mixed = None if options.mixed_precision == "no" else options.mixed_precision
    second_encoder_lr = _second_encoder_lr(options, system, learning_rate=spec.learning_rate)
    _check_resumed_second_encoder_lr(resume_record, options, second_encoder_lr)
    text_files = _disk_text_outputs(options, system, say, group=parallel)
    config = FitConfig(
        # the schedule as kohya maps its options (Adafactor's relative step: constant, no warm-up, as kohya's adafactor
        # schedule; the polynomial / cosine_with_min_lr reference LR is --learning_rate, not --unet-lr)
        # (a schedule-free optimiser: constant, no warm-up, as kohya's dummy scheduler — its warm-up is its own)
        **train_schedule.schedule_fit_args(options, total=total,
                                           relative_step=relative_step or train_optimizer.uses_schedule_free(options),
                                           shares=step_shares, learning_rate=spec.learning_rate),
        steps=total, batch_size=options.batch_size * world, learning_rate=options.unet_lr or options.learning_rate or spec.learning_rate,
        seed=options.seed,
        optimizer=options.optimizer, scale_weight_norms=options.scale_weight_norms,
        optimizer_args=train_optimizer.fit_optimizer_args(options, _optimizer_args(options), optimizer_defaults),
        weight_decay=train_optimizer.fit_weight_decay(options, optimizer_defaults), text_encoder_lr=options.text_encoder_lr,
        text_encoder_2_lr=second_encoder_lr,
        ema_decay=options.ema_decay, stop_on_nonfinite=options.stop_on_nan, text_encoder_steps=options.text_encoder_steps,
        ema_into_weights=options.ema_save == "weights",
        gradient_checkpointing=options.gradient_checkpointing or options.gradient_checkpointing_fraction is not None,
        gradient_checkpointing_fraction=1.0 if options.gradient_checkpointing_fraction is None else options.gradient_checkpointing_fraction,
        fused_backward=options.fused_backward_pass, measure_attention=options.sdpa_backends == "measure",
        cuda_graph=options.cuda_graph, compile_backend=options.dynamo_backend if options.torch_compile else None,
        zero_terminal_snr=options.zero_terminal_snr, cache_text_encoder_outputs=options.cache_text_encoder_outputs,
        text_encoder_outputs_files=text_files,
        weighted_captions=options.weighted_captions,
        validate_every_n_steps=options.validate_every_n_steps, validate_every_n_epochs=options.validate_every_n_epochs,
        max_validation_steps=options.max_validation_steps, validation_seed=options.validation_seed,
        initial_step=initial_step, skip_until_initial_step=skip_until,
        step=StepConfig(min_snr_gamma=options.min_snr_gamma or None, noise_offset=options.noise_offset,
                        noise_offset_random_strength=options.noise_offset_random_strength,
                        adaptive_noise_scale=options.adaptive_noise_scale,
                        loss=options.loss_type, huber_c=options.huber_c, huber_schedule=options.huber_schedule,
                        huber_scale=options.huber_scale,
                        debiased_estimation=options.debiased_estimation_loss,
                        pyramid_noise_iterations=options.multires_noise_iterations,
                        pyramid_noise_discount=options.multires_noise_discount,
                        input_perturbation=options.ip_noise_gamma,
                        timestep_range=options.timestep_range(num_train_timesteps),
                        timestep_sampling=options.timestep_sampling(),
                        input_perturbation_random_strength=options.ip_noise_gamma_random_strength,
                        prediction_type=getattr(system, "prediction_type", "epsilon"),
                        scale_v_pred_loss_like_noise_pred=options.scale_v_pred_loss_like_noise_pred,
                        v_pred_like_loss=options.v_pred_like_loss or 0.0,
                        max_grad_norm=options.max_grad_norm or None, accumulation_steps=accumulation, mixed_precision=mixed,
                        sdpa_backends=_sdpa_order(options.sdpa_backends), half_precision_norms=options.half_precision_norms,
                        fused_lora_linear=options.fused_lora_linear),
    )
    tensorboard = options.log_with == "tensorboard" or (options.log_with == "auto" and tensorboard_available())
    for line in dataset.report():
        say(line)

    # ------------------------------------------------------------------ the expensive part
    if text_files is not None:  # (before any encode; the captions are checked as fit reads them, before the encoders run)
        text_files.check_images(r.path for data in (dataset.records, held_out, reg.records if reg is not None else ())  # type: ignore[attr-defined]
                                for r in data if r.path is not None)
    disk = _disk_latents(options, system, augment)
    if disk is not None:  # (data parallel: each rank encodes and writes its share of the missing files, then all read)
        # (before any encode: no two images of the run, class images and held-out ones included, share a file)
        disk.claim([*dataset.records, *held_out, *(reg_dataset.records if reg_dataset is not None
                                                   and not reg_dataset.augment.active else ())])
        disk.share_out(dataset.records, flip=dataset.flip, group=parallel)
    encode_buckets(dataset, system.encode_images, latents_of=disk,
                   progress=bars("caching latents", "image") if bars is not None and not augment.active else None)
    if augment.active:
        changing = _pixel_changing_flags(options, face_crop=augment.face_crop_range is not None)
        say(f"{' and '.join(changing)}: "
            "the pixels change at every use, so nothing is cached: each batch's images are read, augmented and "
            "encoded by the VAE before its step")
    elif options.flip_aug:
        cached = dataset.latent_bytes()
        say(f"--flip-aug: the mirrored images' latents are cached too: {cached / 2**20:.1f} MiB of latents in memory "
            f"({cached / 2 / 2**20:.1f} MiB without flips)")
    validation_data = None
    if held_out:  # the held-out images' latents, cached as the others (no flips or pixel augmentation: the same each pass)
        validation_data = Dataset(held_out, captions=dataset.captions, loss_masks=loss_masks, batch_sizes=batch_sizes)
        if disk is not None:
            disk.share_out(validation_data.records, flip=validation_data.flip, group=parallel)
        encode_buckets(validation_data, system.encode_images, latents_of=disk,
                       progress=bars("caching validation latents", "image") if bars is not None else None)
        split = "the blocks' validation_split" if block_options else f"--validation-split {options.validation_split}"
        say(f"{split}: {len(held_out)} image(s) held out for the validation loss "
            f"({validation_data.batches_per_epoch(options.batch_size * world)} batch(es) × 4 timesteps a pass)")
    prior_data: tuple | None
    if reg is not None and reg_dataset is not None:
        if disk is not None and not reg_dataset.augment.active:  # (kohya's split covers the reg subsets too)
            disk.share_out(reg_dataset.records, flip=reg_dataset.flip, group=parallel)
        encode_buckets(reg_dataset, system.encode_images, latents_of=disk,
                       progress=bars("caching class latents", "image") if bars is not None and not augment.active else None)
        reg_source = f"--reg-data-dir {options.reg_data_dir}" if options.reg_data_dir is not None else "the is_reg subsets"
        if concepts is not None:  # (not balanced: diffusers cycles through every class image)
            say(f"--concepts-list: {len(reg.records)} class image(s), each on its concept's class_prompt, each once per "
                "class-image epoch; " + reg_dataset.report()[-1])
        else:
            say(f"{reg_source}: {len(reg.records)} class image(s), {reg_dataset.samples_per_epoch} "
                f"per epoch (kohya's balancing against {dataset.samples_per_epoch} training samples"
                f"{', each block against its own' if block_options else ''}); "
                + reg_dataset.report()[-1])
        prior_data = (reg_dataset, options.prior_weight)
        prior_count = reg.samples
    else:
        count = options.class_images if options.class_images is not None else 2 * len(records)
        prior_data = prior_images(system, spec, class_prompt=options.class_prompt, enabled=options.prior, seed=options.seed,
                                  weight=options.prior_weight, count=count, size=(height, width), group=parallel,
                                  progress=bars("class images", "image") if bars is not None else None,
                                  class_data_dir=options.class_data_dir, log=say)
        prior_count = 0 if prior_data is None else len(prior_data[1])
    for line in disk.report() if disk is not None else ():
        say(line)
    adaptation = spec.adapt(system, seed=options.seed, **options.method_options)
    if options.method_options.get("block_lr") is not None:  # kohya's absolute rates -> factors of the run's rate
        adaptation.use_learning_rate(config.learning_rate)  # type: ignore[attr-defined]
    for note in getattr(adaptation, "notes", ()):  # --network-weights: what the file gave
        say(note)
    if weights_file is not None and options.resume is not None:
        say(f"--resume {options.resume}: the saved state's weights replace --network-weights {weights_file}'s")
    if options.full_bf16 or options.full_fp16:  # (kohya's network.to(weight_dtype): before the optimiser is built)
        half = torch.bfloat16 if options.full_bf16 else torch.float16
        if hasattr(adaptation, "cast"):  # full / dreambooth
            adaptation.cast(half)
        else:  # the adapter methods: their trainable weights
            cast_trainable_(adaptation.params, half)  # type: ignore[attr-defined]
    for line in _cast_base_to_fp8(system, options):  # after the adapters read the base (DoRA's norms, --base-weights)
        say(line)
    # the method's default stop (DreamBooth's text encoder), recorded in the metadata
    config = dataclasses.replace(config, text_encoder_steps=config.text_encoder_stop(adaptation))
    hashes = _Hashes(options.model)
    started_at = time.time()
    saved: list[str] = []
    sample_written: list[str] = []

    def metadata(step: int, epoch: int) -> dict[str, str]:
        meta = _training_metadata(spec, options, config, dataset, system, outputs.final, hashes, steps=step, epoch=epoch,
                                  epochs=epochs, per_epoch=per_epoch, height=height, width=width, started=started_at,
                                  prior=prior_count, buckets=step_size,
                                  reg_dirs=reg.dirs if reg is not None else None,
                                  reg_records=reg.found if reg is not None else (), optimizer_defaults=optimizer_defaults)
        if held_out:  # kohya's validation keys (written here when images are held out)
            meta.update(_validation_metadata(options, len(held_out)))
        if data_config is not None and options.dataset_config is not None:  # kohya's ss_datasets (a dataset config)
            from ..training.dataset_config import (
                kohya_config_dataset_dirs,
                kohya_datasets_metadata,
                kohya_tag_frequency,
            )

            datasets_meta = kohya_datasets_metadata(
                data_config, dataset, reg, batch_size=options.batch_size, resolution=(height, width),
                blocks=[(opts.batch_size, (h, w)) for opts, h, w, _ in plans] if block_options else ())
            meta["ss_datasets"] = json.dumps(datasets_meta)
            meta["ss_tag_frequency"] = json.dumps(kohya_tag_frequency(datasets_meta))
            meta["ss_dataset_dirs"] = json.dumps(kohya_config_dataset_dirs(data_config, dataset.records))  # (no reg)
            for key in _ONE_DATASET_KEYS:  # kohya's keys of the run's one dataset: per dataset in ss_datasets only
                meta.pop(key, None)
        return meta

    def write_samples(step: int) -> None:
        from ..images import write_png
        from ..sampling import generate, kohya_clip_sample, with_defaults

        outputs.samples.mkdir(exist_ok=True)
        for i, sample in enumerate(samples):
            # (no --l: generate's default_guidance for the line's sampler, an EDM model's model card scale)
            sample = with_defaults(sample, seed=options.seed, steps=options.sample_steps, guidance=None)
            sized = "height" in inspect.signature(system.sample).parameters  # else the model's own size only
            bf16 = torch.autocast(system.alphas_cumprod.device.type, dtype=torch.bfloat16) if options.full_bf16 else None
            if options.full_fp16:  # fp16 adapter weights: samples under the run's fp16 autocast
                bf16 = torch.autocast(system.alphas_cumprod.device.type, dtype=torch.float16)
            if options.fp8_base or options.fp8_base_unet:  # fp8 weights compute under the run's autocast only
                bf16 = torch.autocast(system.alphas_cumprod.device.type,
                                      dtype=torch.bfloat16 if options.mixed_precision == "bf16" else torch.float16)
            # (a trained trigger of k vectors spelled as its k tokens, as kohya's sample prompts replace it; the
            # system's tokenizer knows only the embeddings it loaded)
            expand = getattr(adaptation, "expand", None) or (lambda text: text)
            negative = None if sample.negative is None else expand(sample.negative)
            with bf16 or contextlib.nullcontext():  # --full-bf16: the UNet's weights are bf16 now
                image = generate(system, [expand(sample.prompt)], negative=negative, seed=sample.seed, steps=sample.steps,
                                 guidance=sample.guidance, sampler=sample.sampler or options.sample_sampler,
                                 height=sample.height or (height if sized else None),
                                 width=sample.width or (width if sized else None),  # (kohya's Heun clamps x̂0)
                                 clip_sample=kohya_clip_sample(sample.sampler or options.sample_sampler))[0]
            path = write_png(outputs.samples / f"step{step:06d}-{i:02d}.png", image)
            sample_written.append(str(path))
        say(f"step {step}: {plural(len(samples), 'sample image')} in {outputs.samples}")

    def ema_beside(progress_info) -> EMAWeights | None:
        """The UNet's EMA now, when it is saved beside the raw weights (--ema-save beside)."""
        if options.ema_save != "beside":
            return None
        with progress_info.averaged():
            return EMAWeights(adaptation.unet_weights(), float(options.ema_decay), progress_info.ema_updates)  # type: ignore[attr-defined,arg-type]

    def save_state(progress_info) -> None:
        """The resumable state and its ``run.json`` into ``OUT-state/``, all appearing together (a kill between them
        left a run.json one save behind, which --resume refused: the previous state was gone)."""
        from ..formats.files import staged_outputs

        with staged_outputs() as stage:
            progress_info.save_state(outputs.state, stage=stage)
            _write_run_record(outputs.state, method, options, progress_info.step, total, saves=written,
                              dataset=dataset_record, optimizer_defaults=optimizer_defaults,
                              step_shares=step_shares, caption_lines=caption_lines, caption_empties=caption_empties,
                              caption_assembly=caption_assembly, bucket_rule=bucket_rule, trigger_captions=trigger_way,
                              initial=(initial_step, skip_until), preset_file=preset_file, stage=stage)

    def save_now(progress_info, path: Path) -> None:
        ema = ema_beside(progress_info)
        with progress_info.averaged() if ema is None else contextlib.nullcontext(), _replacing(spec.outputs(path)):
            _save(adaptation, spec, path, metadata=metadata(progress_info.step, progress_info.epoch), dtype=options.dtype,
                  ema=ema)
        saved.append(str(path))
        made = periodic.get(progress_info.step)
        if made is not None and made.path == path:  # (not an interrupted run's save: that one stays)
            rotate(made, progress_info.step)
        if options.save_state:
            save_state(progress_info)
        say(f"step {progress_info.step}: saved {path}" + (f" and the state {outputs.state}" if options.save_state else ""))

    removed: list[str] = []

    def rotate(now: PeriodicSave, step: int) -> None:
        """--save-last-n-steps / --save-last-n-epochs: remove the earlier saves of this lineage out of the window."""
        flag = "--save-last-n-steps" if now.kind == "step" else "--save-last-n-epochs"
        for old in saves_to_remove(written, now, every_n_steps=options.save_every_n_steps, every_n_epochs=every_epochs,
                                   last_n_steps=options.save_last_n_steps, last_n_epochs=options.save_last_n_epochs,
                                   protected=spec.outputs(outputs.final)):
            for target in spec.outputs(old.path):
                remove_save(target)
            written.remove(old)
            removed.append(str(old.path))
            say(f"step {step}: removed {old.path} ({flag})")
        written.append(now)

    # (data parallel: every rank has checked the outputs above before rank 0 writes the first file, the log)
    data_parallel.wait_for_all_ranks("the wait for every process's checks before the first write")
    if main:  # (data parallel: rank 0 writes every file)
        make_output_folder(outputs.final)  # (every check passed: the first write is next; kohya's os.makedirs(output_dir))
    watch = memory_watch(device) if main else None  # CUDA: each step's peak and the reserved memory, near-full warnings
    run_log = _NoRunLog() if not main else RunLog(outputs.log, tensorboard=outputs.tensorboard if tensorboard else None, append=options.resume is not None,
                     after_step=start, extra={**(MAX_NORM_COLUMNS if options.scale_weight_norms is not None else {}),
                                              **(VALIDATION_COLUMNS if validation_data is not None else {}),
                                              **(MEMORY_COLUMNS if watch is not None else {})} or None)
    peak_memory = {"peak_allocated_mib": 0.0, "reserved_mib": 0.0}  # the run's largest readings (CUDA)
    validation_losses: list[tuple[int, float]] = []
    # kohya's loss/average (avr_loss: TensorBoard and the bar); a resumed run's starts empty (LossAverage: kohya's
    # recorder reads low there, by a padded zero)
    average_loss = LossAverage(per_epoch=per_epoch)

    last: dict = {}

    def on_step(info) -> None:
        if not main:  # (data parallel: rank 0 logs, saves and samples; fit keeps the ranks' weights equal)
            last["info"] = info
            return
        if "info" not in last and config.measure_attention:
            own = sorted({order[0] for _, order in info.sdpa_backends_per_call})
            say(f"attention kernels measured on the first batch: {', '.join(info.sdpa_backends or ('torch default',))} "
                "(fastest first)" + (f"; {plural(len(info.sdpa_backends_per_call), 'kind')} of call faster on "
                                     f"{' or '.join(own)}, run there" if own else ""))
        last["info"] = info
        if info.step == total and options.ema_save == "beside":
            last["ema"] = ema_beside(info)
        validation = validation_columns(info.validation_loss, info.validated)
        if info.validation_loss is not None:
            validation_losses.append((info.step, info.validation_loss))
            say(f"step {info.step}: validation loss {info.validation_loss:.6g}")
        # (kohya's max-norm statistics and the validation loss, when on)
        average = average_loss.add(info.batch_losses)
        if progress is not None:  # kohya's bar shows avr_loss, the moving average (train_network.py:1513-1516)
            progress(info.step, info.total, average)
        memory: dict[str, float] = {}
        if watch is not None:
            reading = watch.read()
            memory = reading.columns()
            for key, value in memory.items():
                peak_memory[key] = max(peak_memory[key], value)
            for message in watch.warnings(reading):
                say(f"step {info.step}: {message}")
        run_log.step(info.step, info.epoch, info.loss, info.lr, {**(info.max_norm or {}), **validation, **memory,
                                                                "loss/average": average})
        if info.step in planned:
            save_now(info, planned[info.step])
        if info.step == total and options.save_state_on_train_end:  # kohya's: the state at the end, to train further
            save_state(info)
            say(f"step {info.step}: saved the state {outputs.state} (--save-state-on-train-end)")
        if info.step in sample_points:
            if options.ema_save == "weights":  # the weights the saves hold: the EMA (diffusers' validation, OneTrainer)
                with info.averaged():  # (a schedule-free optimiser's averaged weights too, as kohya samples)
                    write_samples(info.step)
            else:
                info.use_weights()
                write_samples(info.step)

    if 0 in sample_points and main:  # --sample-at-first
        write_samples(0)
    # kohya's set_seed(args.seed): torch's global RNG, which adapter dropout and DyLoRA's slices draw from (the
    # noise, timesteps and data order have their own generators); a --resume restores the saved RNG state
    torch.manual_seed(options.seed)
    try:
        losses = fit(system, adaptation, dataset, config=config, prior=prior_data, callback=None, on_step=on_step,
                     resume=options.resume, validation=validation_data)
    except NonFiniteLossError as exc:
        where = (f"the last good save is {saved[-1]}" + (f" (resume from {outputs.state})" if options.save_state else "")
                 if saved else "nothing was saved (use --save-every-n-steps N to keep checkpoints)")
        raise _with_note(exc, where) from None
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: keep what was trained (further signals are ignored meanwhile)
        info = last.get("info")
        if info is None or info.step >= total or not main:
            raise
        path = outputs.periodic(step=info.step)
        own = str(path) in saved  # (this run saved this step's weights: the signal came during its state's save)
        if path.exists() and not options.overwrite and not own:
            raise
        if not own:
            save_now(info, path)
        elif options.save_state:
            save_state(info)
        from ..errors import Interrupted

        raise Interrupted(getattr(exc, "signal_number", 2),
                          f"interrupted after step {info.step} of {total}: saved {path}"
                          + (f"; continue with --resume {outputs.state}" if options.save_state else "")) from None
    except PeerProcessError as exc:  # data parallel, another rank failed: rank 0 keeps what was trained, as on Ctrl-C
        if not main:
            raise
        raise _with_note(exc, _save_after_peer_failure(exc, last.get("info"), total, outputs, options, save_now)) from None
    finally:
        run_log.close()
    if main:
        with _replacing(spec.outputs(outputs.final) if options.overwrite else ()):
            file = _save(adaptation, spec, outputs.final, metadata=metadata(total, epochs), dtype=options.dtype,
                         ema=last.get("ema"))
    else:
        file = outputs.final
    lora = None
    if options.extract_lora is not None and main:
        lora_file = extracted_lora_path(outputs.final, options.extract_lora)
        report = adaptation.extract_lora(lora_file, rank=options.extract_lora, dtype=options.dtype,  # type: ignore[attr-defined]
                                         overwrite=options.overwrite)
        worst_layer, worst_error = report.worst_layer()  # type: ignore[misc]  # extract_lora writes at least one layer
        lora = {"file": str(lora_file), "rank": options.extract_lora, "layers": len(report.layers),
                "max_relative_error": worst_error, "worst_layer": worst_layer}
    return {"method": method, "images": len(records), "prior_images": prior_count,
            "losses": losses, "seconds": time.perf_counter() - start_time, "file": str(file), "steps": total,
            "epochs": epochs, "report": dataset.report(), "saved": saved, "samples": sample_written,
            "log": str(outputs.log), "tensorboard": str(outputs.tensorboard) if tensorboard else None,
            "state": str(outputs.state) if (saved and options.save_state) or options.save_state_on_train_end else None,
            "removed": removed,
            "resumed_from": start if options.resume is not None else None, "lora": lora,
            "validation_images": len(held_out), "validation_losses": validation_losses,
            "memory": peak_memory if watch is not None else None}


def _save_after_peer_failure(exc: PeerProcessError, info: FitProgress | None, total: int, outputs: _Outputs,
                             options: TrainOptions, save_now: Callable[[FitProgress, Path], None]) -> str:
    """Rank 0 after another rank failed (:class:`~sdadapt.errors.PeerProcessError`): save the weights (and
    the state with ``--save-state``) as the Ctrl-C path does — files only, no collective — when they are
    those of the last step reported (``info``: :class:`~sdadapt.methods.FitProgress`); what was done, for
    the message."""
    if info is None or info.step >= total:
        return "rank 0 saved nothing (no step had finished)" if info is None else "rank 0 saved nothing (training had ended)"
    if getattr(exc, "trained_steps", info.step) != info.step:  # (failed after the next step's update: not reported)
        return f"rank 0 saved nothing (the weights were past step {info.step}, mid-way through the next step's report)"
    path = outputs.periodic(step=info.step)
    if path.exists() and not options.overwrite:
        return f"rank 0 saved nothing ({path} exists; --overwrite replaces it)"
    save_now(info, path)
    return (f"rank 0 saved the weights after step {info.step} of {total}: {path}"
            + (f"; continue with --resume {outputs.state}" if options.save_state else ""))


def _with_note(exc: Exception, note: str) -> Exception:
    exc.args = (f"{exc.args[0]}; {note}",)
    return exc


def _toy_vocabulary(system) -> list[str]:
    vocab = getattr(getattr(system, "tokenizer", None), "vocab", ())
    return [w for w in vocab if not w.startswith("<")]


_RUN_RECORD = "run.json"


class _NoRunLog:
    """The run log of a data-parallel rank other than 0: rank 0 writes the CSV and TensorBoard events."""

    def step(self, *args: object, **kwargs: object) -> None:
        pass

    def close(self) -> None:
        pass


def _check_loraplus_unet_base_weights_block_lr(method_options: dict) -> None:
    """LoRA+ ratios, --no-unet, --base-weights and --block-lr: checked before the model loads."""
    from ..methods.base_weights import base_weights_multipliers
    from ..methods.block_lr import parse_block_lr
    from ..methods.loraplus import LORAPLUS_ARGS, loraplus_ratios

    loraplus_ratios(**{n: method_options[n] for n in LORAPLUS_ARGS if method_options.get(n) is not None})
    if method_options.get("unet") is False and method_options.get("text_encoder") is False:
        raise ValueError("--no-unet with --no-text-encoder (kohya's network_train_text_encoder_only and "
                         "network_train_unet_only): nothing would train; leave one of the two out")
    files = method_options.get("base_weights")
    if method_options.get("base_weights_multiplier") is not None and not files:
        raise ValueError("--base-weights-multiplier scales the --base-weights files: give the files too")
    if files:
        files = list(files) if isinstance(files, (list, tuple)) else [files]
        base_weights_multipliers(len(files), method_options.get("base_weights_multiplier"))
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:  # (before the model loads, not after)
            raise FileNotFoundError(f"--base-weights {missing[0]}: no such file (give the LoRA files to merge into the "
                                    "model before training)")
    if method_options.get("block_lr") is not None:
        parse_block_lr(method_options["block_lr"])
    start = method_options.get("init_weights")  # (textual inversion's starting embedding: kohya's weights)
    if start and not Path(start).is_file():
        raise FileNotFoundError(f"--init-weights {start}: no such file (the embedding the run starts from)")


#: ``_write_run_record``'s default ``preset_file``: read the preset file when the record is written
_PRESET_FILE_NOW = object()


def _write_run_record(folder: Path, method: str, options: TrainOptions, step: int, total: int, *,
                      saves: list[PeriodicSave] | None = None, dataset: dict | None = None,
                      optimizer_defaults: str = train_optimizer.KOHYA_DEFAULTS,
                      step_shares: str = train_schedule.FLOOR_SHARES, caption_lines: str = FIRST_LINE_CAPTIONS,
                      caption_empties: str = EMPTIES_KEPT, caption_assembly: str = ASSEMBLY_KOHYA_2,
                      bucket_rule: str = BUCKETS_KOHYA, trigger_captions: str = TRIGGER_WRAPPED,
                      initial: tuple[int, bool] = (0, False),
                      preset_file: dict[str, str] | None | object = _PRESET_FILE_NOW,
                      stage: StagedOutputs | None = None) -> None:
    """``run.json`` of a state folder: what ``--resume`` checks, and ``saves``, the periodic saves the
    run lineage wrote and still has (``--save-last-n-*`` of a resumed run continues removing them);
    ``dataset``: the resolved dataset config (:func:`_data_config_record`); ``optimizer_defaults``:
    the defaults the optimiser was built with (:func:`sdadapt.jobs.train_optimizer.recorded_defaults`;
    a record without it was written before Adafactor took kohya's); ``step_shares``: how the run
    rounds a warm-up share of the steps (:func:`sdadapt.jobs.train_schedule.recorded_shares`; a record
    without it was written before the share was rounded down as kohya's); ``caption_lines``: how a
    caption file of several lines is read (:func:`sdadapt.jobs.caption_lines.recorded_caption_lines`;
    written in every record, ``"joined"`` too, as a record with ``vae`` and without it took the first line);
    ``caption_empties``: whether an empty caption and empty tags are kept
    (:func:`sdadapt.jobs.caption_lines.recorded_caption_empties`); ``caption_assembly``: how a caption is put
    together (:func:`sdadapt.jobs.caption_lines.recorded_caption_assembly`); ``bucket_rule``: how the images
    were bucketed, scaled and cropped (:data:`sdadapt.training.data.BUCKETS_KOHYA`; a record without it planned
    as :data:`~sdadapt.training.data.BUCKETS_BEFORE`); ``trigger_captions``: how a trigger-word method's caption
    template is put around an image's own caption (:data:`sdadapt.training.data.TRIGGER_WRAPPED`; a record without it
    drew the filled template whole, :data:`~sdadapt.training.data.TRIGGER_FILLED`); ``initial``: the
    step the run started at and whether it skipped the data before it (:mod:`sdadapt.jobs.initial_step`);
    ``preset_file``: the LyCORIS preset file's record as the run read it at its start
    (:func:`_preset_file_record`; a file edited during the run does not change it), read now when not given."""
    from ..formats.files import atomic_write

    if preset_file is _PRESET_FILE_NOW:
        preset_file = _preset_file_record(options)

    record = {"format": "sdadapt-train-run/1", "method": method, "model": str(options.model), "step": step,
              "total_steps": total, "batch_size": options.batch_size, "seed": options.seed,
              **({"world_size": data_parallel.launched_world_size()} if data_parallel.launched_world_size() > 1 else {}),
              "images": str(options.images), "method_options": options.method_options,
              **({"ema_decay": options.ema_decay} if options.ema_decay is not None else {}),
              "optimizer": options.optimizer, "optimizer_args": _optimizer_args_record(options),
              **({"optimizer_defaults": optimizer_defaults} if optimizer_defaults != train_optimizer.LEGACY_DEFAULTS else {}),
              **({"step_shares": step_shares} if step_shares != train_schedule.LEGACY_SHARES else {}),
              "caption_lines": caption_lines,  # (always: a record with "vae" and without it took the first line)
              "caption_empties": caption_empties,  # (a record without it dropped empty captions and tags)
              "caption_assembly": caption_assembly,  # (a record without it: the suffix after the cut, and so on)
              "bucket_rule": bucket_rule,  # (a record without it: no square bucket, round-half-even, its no-upscale)
              "trigger_captions": trigger_captions,  # (a record without it: the filled template drawn whole)
              **initial_step_record(*initial),
              "gradient_accumulation_steps": options.gradient_accumulation_steps,
              **({"text_encoder_2_lr": options.text_encoder_2_lr} if options.text_encoder_2_lr is not None else {}),
              **({"preset_file": preset_file} if preset_file is not None else {}),
              "captions": _caption_record(options), "augmentations": _augmentation_record(options),
              "noise": _noise_record(options), "prior": _prior_record(method, options),
              "fp8_base": _fp8_base_record(options), "half_weights": _half_weights_record(options),
              # (recorded, not checked by --resume: the files give the bits an encode gives)
              **({"text_encoder_outputs": "kohya-te-outputs-npz"} if options.cache_text_encoder_outputs_to_disk else {}),
              "alpha_mask": bool(options.alpha_mask),  # (the subsets' fallback: _data_config_record)
              "reg_data_dir": None if options.reg_data_dir is None else str(options.reg_data_dir),
              "vae": _vae_record(options),
              **({"validation": _validation_record(options)} if options.validation_split else {}),
              "dataset": dataset,
              **({"config_defaults": options.config_defaults} if options.config_defaults != "sdadapt" else {}),
              "periodic_saves": [save.record() for save in saves or ()]}
    atomic_write(folder / _RUN_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)),
                 stage=stage)


def _hold_out_for_validation(records: list, options: TrainOptions, notes: list[str],
                             blocks: Sequence[TrainOptions] = ()) -> tuple[list, list]:
    """kohya's ``validation_split``: ``(training records, held-out records)``, each subset (``record.folder``)
    split by :func:`~sdadapt.training.validation.split_for_validation` with ``validation_seed`` (default
    ``seed``); training records keep their order, held-out ones get ``repeats=1`` (each used once a pass).
    ``blocks``: a dataset TOML's several ``[[datasets]]`` blocks' options (:func:`_block_options`): each
    block's subsets split by its own ``validation_split`` / ``validation_seed``, as kohya's datasets."""
    def own(record) -> TrainOptions:
        return blocks[record.dataset] if blocks else options

    if not any(o.validation_split for o in (blocks or [options])):
        if options.validate_every_n_steps or options.validate_every_n_epochs or options.max_validation_steps:
            notes.append("--validate-every-n-* / --max-validation-steps: unused without --validation-split (no "
                         "images are held out)")
        return records, []
    from ..training.validation import split_for_validation

    subsets: dict[str, list] = {}
    for record in records:
        subsets.setdefault(record.folder, []).append(record)
    kept: set[int] = set()
    held_out = []
    for group in subsets.values():
        split = own(group[0])
        seed = split.seed if split.validation_seed is None else split.validation_seed
        train, held = split_for_validation(group, split=split.validation_split, seed=seed, key=lambda r: str(r.path))
        kept.update(id(r) for r in train)
        held_out += [dataclasses.replace(r, repeats=1) for r in held]
    if not held_out:
        split = next(o for o in (blocks or [options]) if o.validation_split).validation_split
        raise ValueError(f"--validation-split {split} holds out no image: each subset keeps "
                         f"ceil(n × {1 - split:g}) of its n images for training; raise the split or "
                         "add images")
    return [r for r in records if id(r) in kept], held_out


def _face_crop_records(records: list, crop_range: tuple[float, float] | None, *, buckets: bool, loss_masks: object,
                       notes: list[str]) -> int:
    """kohya's ``face_crop_aug_range`` (``crop_range``) on the planned ``records`` (training or class images):
    without ``buckets`` each image whose name gives a face (:func:`sdadapt.training.face_crop.face_box_from_name`) gets
    :attr:`~sdadapt.training.data.ImageRecord.face` (cropped around it at each use); returns how many.
    With buckets kohya uses no face (``trim_and_resize_if_required``): a note, nothing set.

    Raises:
        InputError: a face image smaller than the training size, a name with five ``_`` parts or more
            that are not numbers, or a face crop with loss masks (not there yet).
    """
    from ..errors import InputError
    from ..training.face_crop import check_face_image, face_box_from_name

    if crop_range is None:
        return 0
    low, high = crop_range
    if buckets:
        notes.append(f"face_crop_aug_range {low:g},{high:g}: unused with bucketing (kohya crops around the faces only "
                     "with enable_bucket off: --no-bucket)")
        return 0
    faced = []
    for record in records:
        face = face_box_from_name(record.path) if record.path is not None else None
        if face is not None:
            check_face_image(record.path, record.size, record.bucket)
            faced.append((record, face))
    if faced and loss_masks is not None:
        raise InputError("--face-crop-aug-range with --alpha-mask / --masked-loss: the loss masks do not follow a face "
                         "crop here yet; train without one of them")
    for record, face in faced:
        record.face = face
        record.note += (f"; face {face[2]}x{face[3]} at ({face[0]}, {face[1]}): scaled and cropped around it at each use "
                        f"(face_crop_aug_range {low:g},{high:g})")
    notes.append(f"face_crop_aug_range {low:g},{high:g}: {len(faced)} of {len(records)} image(s) have a face in their "
                 "name (<name>_<cx>_<cy>_<w>_<h>), cropped around it at each use" + ("; the others as before" if
                                                                                     len(faced) < len(records) else ""))
    return len(faced)


def _second_encoder_lr(options: TrainOptions, system: object, *, learning_rate: float) -> float | None:
    """``FitConfig.text_encoder_2_lr`` of the run: ``options.text_encoder_2_lr``, or for
    :data:`TE2_AT_LEARNING_RATE` (kohya's ``learning_rate_te1`` alone) the run's ``learning_rate`` (the method's
    ``learning_rate`` when not given) on a model with a second text encoder, as ``sdxl_train.py``
    (``learning_rate_te2 or learning_rate``), and ``None`` on a model with one."""
    if options.text_encoder_2_lr != TE2_AT_LEARNING_RATE:
        return options.text_encoder_2_lr  # type: ignore[return-value]
    if not isinstance(getattr(system, "text_encoder_2", None), torch.nn.Module):
        return None
    return float(options.learning_rate or learning_rate)


def _check_resumed_second_encoder_lr(record: dict | None, options: TrainOptions, second_encoder_lr: float | None) -> None:
    """A resume of a run recorded without ``text_encoder_2_lr`` (its second text encoder at the first's rate, in
    the first's parameter groups) by :data:`TE2_AT_LEARNING_RATE` (kohya's ``learning_rate_te1`` alone) on a model
    with a second encoder (``second_encoder_lr`` not ``None``): refused, the saved optimiser state has no group of
    its own for it (sdadapt read ``learning_rate_te1`` alone that way before)."""
    if record is None or "text_encoder_2_lr" in record or second_encoder_lr is None:
        return
    raise ValueError(f"--resume {options.resume}: the saved run trained the second text encoder at the first's "
                     "learning rate (how sdadapt read kohya's learning_rate_te1 without learning_rate_te2 before), "
                     f"and it now trains at learning_rate {second_encoder_lr:g} as sdxl_train.py; to resume the "
                     "saved run as it trained, write text_encoder_lr = <the learning_rate_te1 value> in place of "
                     "learning_rate_te1 (both encoders at it)")


def _preset_file_record(options: TrainOptions) -> dict[str, str] | None:
    """``run.json``'s ``preset_file``: a LyCORIS preset file given as ``preset=`` (its absolute path and
    the sha256 of its bytes; a resume refuses a changed file), ``None`` for a built-in preset or none."""
    from ..methods.lora import UNET_PRESETS
    from ..methods.lycoris_preset_files import preset_file_sha256
    from ..methods.lycoris_presets import LYCORIS_PRESETS

    targets = options.method_options.get("targets")
    if not isinstance(targets, str) or targets.strip() in LYCORIS_PRESETS or targets in UNET_PRESETS:
        return None
    path = Path(targets.strip())
    if not path.is_file():  # (read and refused before training: nothing to record)
        return None
    return {"path": str(path.resolve()), "sha256": preset_file_sha256(path)}


def _validation_record(options: TrainOptions) -> dict[str, object]:
    """``run.json``'s ``validation``: what decides which images are held out (a resumed run trains on the same)."""
    return {"validation_split": options.validation_split,
            "validation_seed": (options.seed if options.validation_seed is None else options.validation_seed)
            if options.validation_split else None}


#: what a record written without validation held out
_VALIDATION_RECORD_DEFAULTS = {"validation_split": 0.0, "validation_seed": None}


def _validation_metadata(options: TrainOptions, held_out: int) -> dict[str, str]:
    """kohya's ``ss_*`` validation keys (``train_network.py``)."""
    return {"ss_validation_seed": str(options.validation_seed), "ss_validation_split": str(options.validation_split),
            "ss_max_validation_steps": str(options.max_validation_steps),
            "ss_validate_every_n_epochs": str(options.validate_every_n_epochs),
            "ss_validate_every_n_steps": str(options.validate_every_n_steps),
            "ss_num_validation_images": str(held_out)}


def _vae_record(options: TrainOptions) -> dict[str, str] | None:
    """``run.json``'s ``vae``: the ``--vae`` given (its absolute path and the weights file's sha256,
    :func:`sdadapt.formats.vae_file.vae_identity`), ``None`` for the model's own VAE."""
    if options.vae is None:
        return None
    from ..formats.vae_file import vae_identity

    identity = vae_identity(options.vae)
    return {"path": identity["path"], "sha256": identity["sha256"]}


def _vae_changes(saved: object, now: dict[str, str] | None) -> list[str]:
    """The resume mismatch line when the run's VAE differs from the saved one (another VAE encodes other
    latents; the same weights under another path are the same VAE). A record without ``vae`` (written
    before ``--vae`` existed) used the model's own."""
    def sha(entry: object) -> object:
        return entry.get("sha256") if isinstance(entry, dict) else entry

    def name(entry: object) -> str:
        return "the model's own" if entry is None else repr(entry.get("path") if isinstance(entry, dict) else entry)

    if sha(saved) == sha(now):
        return []
    return [f"vae {name(saved)} (now {name(now)}; another VAE encodes other latents)"]


def _vae_metadata(options: TrainOptions) -> dict[str, str]:
    """kohya's ``ss_vae_name`` / ``ss_vae_hash`` / ``ss_new_vae_hash`` (train_network.py: only with ``--vae``)."""
    if options.vae is None:
        return {}
    from ..formats.vae_file import vae_identity

    identity = vae_identity(options.vae)
    return {"ss_vae_name": identity["name"], "ss_vae_hash": identity["legacy"], "ss_new_vae_hash": identity["sha256"]}


def _optimizer_args_record(options: TrainOptions) -> list[str]:
    """``--optimizer-args`` as ``KEY=repr(value)`` strings: the optimiser state a resumed run loads was
    built with them (its hyperparameters come back with it), so resuming with others is refused."""
    return [f"{key}={value!r}" for key, value in _optimizer_args(options)]


def _caption_record(options: TrainOptions) -> dict[str, object]:
    """The options that decide which caption each step trains on (a resumed run continues their draws)."""
    return {"prompt": options.prompt, "caption_extension": options.caption_extension,
            "shuffle_caption": options.shuffle_caption, "keep_tokens": options.keep_tokens,
            "caption_dropout_rate": options.caption_dropout_rate,
            "caption_tag_dropout_rate": options.caption_tag_dropout_rate,
            "caption_template": options.caption_template, "templates": options.templates,
            **{name: getattr(options, name) for name, default in _CAPTION_DEFAULTS.items() if getattr(options, name) != default}}


#: kohya's caption options recorded for --resume only when set (records of runs without them stay as they were)
_CAPTION_DEFAULTS = {"caption_prefix": None, "caption_suffix": None, "caption_dropout_every_n_epochs": 0,
                     "enable_wildcard": False, "keep_tokens_separator": "", "secondary_separator": None,
                     "token_warmup_min": 1, "token_warmup_step": 0, "weighted_captions": False, "caption_separator": ",",
                     "templates_replace_captions": False}


def _augmentation_record(options: TrainOptions) -> dict[str, object]:
    """The image augmentations that decide which latents each step trains on (a resumed run continues their draws)."""
    return {"flip_aug": options.flip_aug, "random_crop": options.random_crop, "color_aug": options.color_aug,
            **({"face_crop_aug_range": list(options.face_crop_aug_range)}  # (recorded when set: older records lack it)
               if options.face_crop_aug_range is not None else {}),
            **({"resize_interpolation": options.resize_interpolation}  # (the same)
               if options.resize_interpolation is not None else {}),
            **({"resize_aug": True} if options.resize_aug else {})}  # (the same)


#: what a record written before these options existed trained with
_AUGMENTATION_DEFAULTS = {"flip_aug": False, "random_crop": False, "color_aug": False, "resize_aug": False}
_NOISE_RECORD_DEFAULTS = {"noise_offset_random_strength": False, "zero_terminal_snr": False,
                          "ip_noise_gamma_random_strength": False, "timestep_sampling": None}


def _prior_record(method: str, options: TrainOptions) -> dict[str, object]:
    """Generated class images (prior preservation without ``--reg-data-dir``): whether they train (the
    class batch's forward draws its own noise, so turning it on or off changes a resumed run's draws),
    their prompt and their count (which class images the steps draw)."""
    spec = _method(method)
    on = options.prior if options.prior is not None else (spec.prior != "off" or options.class_prompt is not None
                                                          or options.class_data_dir is not None)
    # (--class-data-dir: recorded when given, absolute — a relative folder read from another current folder is other images)
    folder = {} if options.class_data_dir is None else {"class_data_dir": str(Path(options.class_data_dir).resolve())}
    return {"prior": bool(on), "class_prompt": options.class_prompt, "class_images": options.class_images, **folder}


def _noise_record(options: TrainOptions) -> dict[str, object]:
    """The noise options that change a resumed run's draws (the random offset strength is one more
    draw per batch) or the schedule its steps train on (zero terminal SNR)."""
    return {"noise_offset_random_strength": options.noise_offset_random_strength,
            "ip_noise_gamma_random_strength": options.ip_noise_gamma_random_strength,
            "zero_terminal_snr": options.zero_terminal_snr,
            # (recorded when set: older records lack it; the draw's shape changes the draws that follow)
            **({"timestep_sampling": sampling.describe()} if (sampling := options.timestep_sampling()) else {})}


def _record_table_changes(folder: Path, record: dict, entry: str, now: dict[str, object], *,
                          defaults: dict[str, object] | None = None, absent: dict | None = None) -> list[str]:
    """The ``"name before (now after)"`` lines where ``run.json``'s table ``entry`` differs from ``now``
    (the same table built from today's options). A name the saved table lacks (a record written before
    that option existed), or that ``now`` leaves out (recorded only when set), reads as its ``defaults``
    value (``None`` without one). ``absent``: the table a record without ``entry`` stands for
    (``None``: such a record, or one whose ``entry`` is ``null``, is not checked; otherwise a ``null``
    entry is damage).

    Raises:
        ValueError: the saved entry is not a table (the file was edited or damaged).
    """
    defaults = defaults or {}
    if entry in record and (record[entry] is not None or absent is not None):
        saved = record[entry]
    elif absent is None:
        return []
    else:
        saved = absent
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {folder}: run.json's {entry} entry is not a table ({type(saved).__name__}); the "
                         "file was edited or damaged — resume from an intact state folder")
    changes = []
    for name in [*now, *(n for n in defaults if n not in now)]:
        before, after = saved.get(name, defaults.get(name)), now.get(name, defaults.get(name))
        if before != after:
            changes.append(f"{name} {before!r} (now {after!r})")
    return changes


def _recorded_saves(record: dict, folder: Path) -> list[PeriodicSave]:
    """The periodic saves a resumed run's lineage wrote and kept (``run.json``'s ``periodic_saves``;
    older records have none: nothing of theirs is removed)."""
    entries = record.get("periodic_saves", [])
    try:
        return [PeriodicSave.from_record(entry) for entry in (entries if isinstance(entries, list) else [entries])]
    except ValueError as exc:
        raise ValueError(f"--resume {folder}: run.json's periodic_saves entry is damaged ({exc}); the file was edited — "
                         "resume from an intact state folder") from None


def _check_resume(folder: Path, method: str, options: TrainOptions, *, dataset: dict | None = None) -> dict:
    """The saved run's record, after checking it is a state of the same method, model and optimiser."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {folder}: no such folder (give the -state folder a run with --save-every-n-steps wrote)")
    record_file = folder / _RUN_RECORD
    if not record_file.is_file() or not (folder / "state.json").is_file():
        raise ValueError(f"--resume {folder}: not a training state folder (it needs run.json, state.json and state.safetensors)")
    record = json.loads(record_file.read_text())
    saved_state = json.loads((folder / "state.json").read_text())
    state_step = saved_state.get("step")
    if state_step != record.get("step"):
        raise ValueError(f"--resume {folder}: run.json (step {record.get('step')}) and state.json (step {state_step}) disagree; "
                         "the save was interrupted")
    mismatches = [f"{name} {record.get(name)!r} (now {value!r})" for name, value in (
        ("method", method), ("model", str(options.model)), ("optimizer", options.optimizer),
        ("batch_size", options.batch_size), ("seed", options.seed),
        ("gradient_accumulation_steps", options.gradient_accumulation_steps)) if record.get(name) != value]
    saved_ema = saved_state.get("ema_updates") is not None  # (the EMA's averages are in the state: state.json says so)
    if saved_ema != (options.ema_decay is not None) or (saved_ema and "ema_decay" in record
                                                        and record["ema_decay"] != options.ema_decay):
        # (absent in records written before it was recorded: the decay given now is used, as before)
        mismatches.append(f"--ema-decay {record.get('ema_decay') if saved_ema else None!r} (now {options.ema_decay!r}; "
                          + ("the saved state holds the EMA's averages" if saved_ema else "the saved state has no EMA")
                          + ")")
    if record.get("world_size", 1) != data_parallel.launched_world_size():  # (the global batch is batch × processes)
        mismatches.append(f"processes {record.get('world_size', 1)} (now {data_parallel.launched_world_size()}; the "
                          "global batch is --batch-size × processes: resume with as many, e.g. torchrun --nproc-per-node)")
    saved_preset, now_preset = record.get("preset_file"), _preset_file_record(options)
    # (a LyCORIS preset file: its content decides the layers the saved weights are on; the same bytes under
    # another path — a relative path from another folder — are the same preset)
    if (saved_preset or {}).get("sha256") != (now_preset or {}).get("sha256"):
        mismatches.append(f"the LyCORIS preset file {(saved_preset or now_preset)['path']} (sha256 "
                          f"{(saved_preset or {}).get('sha256', 'none')[:12]}, now {(now_preset or {}).get('sha256', 'none')[:12]}; "
                          "it changed since the saved run)")
    # (the saved optimiser's groups: absent = not given; absent against learning_rate_te1 alone: checked once the model
    # is known, run_train's _check_resumed_second_encoder_lr — a one-encoder model has no second group either way)
    if record.get("text_encoder_2_lr") != options.text_encoder_2_lr and not (
            "text_encoder_2_lr" not in record and options.text_encoder_2_lr == TE2_AT_LEARNING_RATE):
        mismatches.append(f"text_encoder_2_lr {record.get('text_encoder_2_lr')!r} (now {options.text_encoder_2_lr!r}; "
                          "the second text encoder's own parameter groups are in the saved optimiser state)")
    saved_args = record.get("optimizer_args", [])  # absent in records written before it was recorded: none were given
    if saved_args != (now_args := _optimizer_args_record(options)):
        mismatches.append(f"optimizer_args {saved_args} (now {now_args}; the saved optimiser "
                          "state carries its hyperparameters)")
    if record.get("method_options", {}) != options.method_options:
        mismatches.append(f"method options {record.get('method_options')} (now {options.method_options})")
    # absent captions / prior tables (older records): not checked; absent augmentations / noise: trained without them
    mismatches += _record_table_changes(folder, record, "captions", _caption_record(options), defaults=_CAPTION_DEFAULTS)
    mismatches += _record_table_changes(folder, record, "augmentations", _augmentation_record(options),
                                        defaults=_AUGMENTATION_DEFAULTS, absent={})
    mismatches += _record_table_changes(folder, record, "noise", _noise_record(options),
                                        defaults=_NOISE_RECORD_DEFAULTS, absent={})
    # (which images train: a record without it held none out)
    mismatches += _record_table_changes(folder, record, "validation", _validation_record(options),
                                        defaults=_VALIDATION_RECORD_DEFAULTS, absent={})
    if "alpha_mask" in record and record["alpha_mask"] != bool(options.alpha_mask):  # (older records: not checked)
        mismatches.append(f"alpha_mask {record['alpha_mask']!r} (now {bool(options.alpha_mask)!r}; the alpha-channel "
                          "loss mask weighs every step's loss)")
    if "dataset" in record and record["dataset"] != dataset:  # (older records: not checked)
        from ..training.dataset_config import record_changes

        if isinstance(record["dataset"], dict) and isinstance(dataset, dict):  # name what changed, not both whole records
            # (none: only a null value now where an older record has no entry — a key added since, at its "off" value)
            if changes := record_changes(record["dataset"], dataset):
                mismatches.append("the dataset config / metadata: " + "; ".join(changes))
        else:
            def _source(entry: object) -> object:
                return entry.get("source") if isinstance(entry, dict) else entry

            mismatches.append(f"the dataset config / metadata {_source(record['dataset'])!r} (now {_source(dataset)!r})")
    mismatches += _record_table_changes(folder, record, "prior", _prior_record(method, options),
                                        defaults={"class_data_dir": None})  # (a record without it: no folder)
    reg_now = None if options.reg_data_dir is None else str(options.reg_data_dir)
    if "reg_data_dir" in record and record["reg_data_dir"] != reg_now:  # (older records: not checked)
        mismatches.append(f"reg_data_dir {record['reg_data_dir']!r} (now {reg_now!r})")
    mismatches += _vae_changes(record.get("vae"), _vae_record(options))
    if record.get("fp8_base", "off") != (fp8_now := _fp8_base_record(options)):  # (older records: no fp8 base)
        mismatches.append(f"fp8_base {record.get('fp8_base', 'off')!r} (now {fp8_now!r}; the base's float8 rounding "
                          "changes every step's numbers)")
    # (older records: adapter runs had no fp16/bf16 weights; a whole-model run's is not known, not checked)
    saved_half = record.get("half_weights", "off" if method in _FP8_BASE_METHODS else None)
    if saved_half is not None and saved_half != (half_now := _half_weights_record(options)):
        mismatches.append(f"the trained weights' storage (--full-fp16 / --full-bf16) {saved_half!r} (now {half_now!r}; "
                          "their rounding changes every step's numbers)")
    saved_defaults = record.get("config_defaults", "sdadapt")  # (older records: sdadapt's)
    if saved_defaults != options.config_defaults:
        mismatches.append(f"the defaults of the options left out, {saved_defaults}'s (now {options.config_defaults}'s; "
                          "resume with the same --config file)")
    if mismatches:
        raise ValueError(f"--resume {folder}: the saved run differs: {'; '.join(mismatches)}; resume with the same settings")
    return record


def _text_encoder_lr_metadata(config: FitConfig) -> str:
    """``ss_text_encoder_lr``: the text encoders' LR as ``str(float)``; two different ones (SDXL's
    ``text_encoder_2_lr``) as kohya's multi-encoder networks write their ``text_encoder_lr`` list,
    ``str([te1, te2])`` (``"[0.0001, 5e-05]"``)."""
    first, second = (config.learning_rate if lr is None else lr for lr in config.encoder_lrs())
    return str(first) if float(first) == float(second) else str([float(first), float(second)])


def _training_metadata(spec, options: TrainOptions, config: FitConfig, dataset, system, final: Path, hashes: _Hashes, *,
                       steps: int, epoch: int, epochs: int, per_epoch: int, height: int, width: int, started: float,
                       prior: int, buckets: int, reg_dirs: dict[str, dict[str, int]] | None = None,
                       reg_records: Sequence = (),
                       optimizer_defaults: str = train_optimizer.KOHYA_DEFAULTS) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata (what A1111's and kohya's metadata viewers show);
    ``ss_tag_frequency`` counts the regularisation images' captions too (``reg_records``: every one found,
    before balancing — kohya's ``DreamBoothDataset`` calls ``set_tag_frequency`` for its reg subsets as for
    the others, before it drops the images balancing leaves unused). The images directly in ``--images``
    are keyed by its folder's name, as kohya keys a subset (:func:`~sdadapt.training.data.kohya_folder_names`)."""
    base = hashes.get()
    named = dataset.records if options.images is None else kohya_folder_names(dataset.records, options.images)
    model_file = _model_file(options.model)
    given_args = _optimizer_args(options)
    from ..training.dataset_config import kohya_bucket_range

    bucket_range = kohya_bucket_range({"enable_bucket": options.enable_bucket, "bucket_reso_steps": buckets,
                                       "min_bucket_reso": options.min_bucket_reso, "max_bucket_reso": options.max_bucket_reso},
                                      [r.bucket for r in dataset.records])
    meta = {
        "ss_session_id": str(random.Random(f"{options.seed}/{started}").randrange(2**32)),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": final.stem,
        "modelspec.title": final.stem,  # (every save, the step ones too: kohya's output_name; --metadata-title wins)
        "ss_learning_rate": str(config.schedule_base_lr or config.learning_rate),  # kohya's --learning_rate
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": _text_encoder_lr_metadata(config),
        "ss_num_train_images": str(dataset.samples_per_epoch),
        "ss_num_reg_images": str(prior),
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_num_epochs": str(epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_batch_size_per_device": str(config.batch_size // data_parallel.launched_world_size()),
        "ss_total_batch_size": str(config.batch_size * config.step_config().accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.step_config().accumulation_steps),
        "ss_lr_warmup_steps": _ss_lr_warmup_steps(options.lr_warmup_steps, config.warmup_steps),
        "ss_lr_scheduler": train_optimizer.ss_lr_scheduler(options, given_args, learning_rate=config.learning_rate,
                                                           # (cosine with num_cycles runs as cosine_with_min_lr)
                                                           schedule=options.lr_scheduler if config.schedule == "cosine_with_min_lr"
                                                           else config.schedule, defaults=optimizer_defaults),
        "ss_optimizer": train_optimizer.ss_optimizer(options, given_args, optimizer_defaults),
        "ss_scale_weight_norms": str(options.scale_weight_norms),
        "ss_mixed_precision": options.mixed_precision,
        "ss_full_fp16": str(options.full_fp16),  # (kohya writes ss_full_fp16 only; ss_full_bf16 is sdadapt's)
        "ss_full_bf16": str(options.full_bf16),
        "ss_fp8_base": str(options.fp8_base), "ss_fp8_base_unet": str(options.fp8_base_unet),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_clip_skip": str(options.clip_skip),  # (kohya's args.clip_skip: None unless given, "1" when given as 1)
        "ss_max_token_length": str(None if options.max_token_length == 75 else options.max_token_length),
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": str(options.enable_bucket),
        "ss_min_bucket_reso": str(bucket_range[0]),  # (kohya's: the limits moved onto the step; None without buckets)
        "ss_max_bucket_reso": str(bucket_range[1]),
        "ss_bucket_reso_steps": str(buckets),
        "ss_bucket_no_upscale": str(options.bucket_no_upscale),
        "ss_bucket_info": json.dumps(dataset.bucket_info()),
        "ss_dataset_dirs": json.dumps(dataset_dirs_of(named) if options.images is None
                                      else kohya_dataset_dirs(dataset.records, options.images)),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs or {}),
        "ss_tag_frequency": json.dumps(tag_frequency_of(  # (reg images always have a caption: no template for them)
            [*named, *reg_records], templates=dataset.captions.templates)),
        "ss_caption_dropout_rate": str(options.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(options.caption_tag_dropout_rate),
        "ss_caption_dropout_every_n_epochs": str(options.caption_dropout_every_n_epochs),
        "ss_shuffle_caption": str(options.shuffle_caption),
        "ss_keep_tokens": str(options.keep_tokens),
        "ss_flip_aug": str(options.flip_aug),
        "ss_color_aug": str(options.color_aug),
        "ss_random_crop": str(options.random_crop),
        "ss_cache_latents": str(not (options.random_crop or options.color_aug
                                     or options.face_crop_aug_range is not None and not options.enable_bucket)),
        "ss_face_crop_aug_range": str(options.face_crop_aug_range),  # (kohya's tuple or None, as str)
        "ss_seed": str(options.seed),
        "ss_network_dropout": str(options.method_options.get("dropout")),  # kohya's --network_dropout (None: off)
        "ss_noise_offset": str(options.noise_offset),
        "ss_noise_offset_random_strength": str(options.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(options.adaptive_noise_scale),
        # (what the steps trained on: the option's rescale, or a model on that schedule already, a ztsnr checkpoint)
        "ss_zero_terminal_snr": str(options.zero_terminal_snr or bool(getattr(system, "zero_terminal_snr", False))),
        "ss_min_snr_gamma": str(options.min_snr_gamma or None),
        "ss_max_grad_norm": str(options.max_grad_norm),
        "ss_prior_loss_weight": str(options.prior_weight),
        "ss_loss_type": options.loss_type,
        "ss_huber_schedule": options.huber_schedule,
        "ss_huber_c": str(options.huber_c),
        "ss_huber_scale": str(options.huber_scale),
        "ss_debiased_estimation": str(options.debiased_estimation_loss),
        "ss_multires_noise_iterations": str(options.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(options.multires_noise_discount),
        "ss_ip_noise_gamma": str(options.ip_noise_gamma or None),
        "ss_ip_noise_gamma_random_strength": str(options.ip_noise_gamma_random_strength),
        "ss_ema_decay": str(options.ema_decay),
        "ss_stop_text_encoder_training": str(config.text_encoder_steps),
        "ss_v_parameterization": str(getattr(system, "prediction_type", "epsilon") == "v_prediction"),
        "ss_sd_model_name": model_file.name if model_file is not None else Path(str(options.model)).name,
        "ss_sd_model_hash": base.get("legacy", ""),
        "ss_new_sd_model_hash": base.get("sha256", ""),
        **_vae_metadata(options),
        "ss_training_comment": options.training_comment or "",
        "ss_sdadapt_method": spec.name,
        # (kohya's str(args.network_alpha), train_network.py:1022,1223; else the writer's, from the tensors)
        **({"ss_network_alpha": options.network_alpha_text} if options.network_alpha_text is not None else {}),
        # (kohya's json.dumps(net_kwargs), train_network.py:1203-1204; "" = no network_args: no key, None drops it)
        **({"ss_network_args": options.kohya_network_args or None} if options.kohya_network_args is not None else {}),
        "modelspec.resolution": f"{width}x{height}",
    }
    meta.update(_modelspec_fields(options))
    return meta


def _modelspec_fields(options: TrainOptions) -> dict[str, str]:
    """kohya's ``--metadata_title/author/description/license/tags`` as the ``modelspec.*`` keys it writes
    (``library/sai_model_spec.py``; the tags as given, comma-separated); those not given are left to
    the writer (its title is the output name, kohya's default too)."""
    return {f"modelspec.{name}": value for name in ("title", "author", "description", "license", "tags")
            if (value := getattr(options, f"metadata_{name}")) is not None}
