"""Training: diffusion math, the compact step, optimisers, step capture, latent cache, gradient checkpointing.

| module | what it owns |
|---|---|
| :mod:`.diffusion` | schedules, noising, ε/v/x0 targets, SNR weights, losses, DDIM/Euler samplers, inversion |
| :mod:`.step` | the one-screen :func:`train_step`, :class:`StepConfig`, resumable :class:`TrainState`, EMA |
| :mod:`.edm` | the step's EDM branch (Playground v2.5): σ grid, c_in / c_noise / c_skip / c_out, x0 target, as diffusers |
| :mod:`.timestep_distribution` | the step's timestep draw shaped as diffusers' timestep bias or OneTrainer's timestep distributions |
| :mod:`.optim` | lean optimisers (fp32/bf16/int8 AdamW states, Adafactor), fused backward, LR schedules |
| :mod:`.lion` | Lion (kohya's ``Lion``): one float32 or bf16 momentum, multi-tensor and capturable steps |
| :mod:`.prodigy` | Prodigy (kohya's ``Prodigy``): prodigyopt's step-size estimate kept on the device, capturable |
| :mod:`.dadapt` | D-Adaptation Adam and Lion (kohya's ``DAdaptAdam``, ``DAdaptLion``, ``DAdaptation``): the estimate on the device, capturable |
| :mod:`.step_size_estimate` | what Prodigy and D-Adaptation share: the estimate's device scalars, one LR for all groups, saved states |
| :mod:`.schedule_free` | schedule-free AdamW and SGD (kohya's ``AdamWScheduleFree``, ``SGDScheduleFree``): train/eval modes, multi-tensor and capturable |
| :mod:`.lr_schedules` | kohya's other LR schedules (cosine_with_min_lr, warmup_stable_decay, inverse_sqrt, piecewise_constant) as factors of the step |
| :mod:`.torch_lr_schedules` | kohya's ``--lr_scheduler_type``: ``torch.optim.lr_scheduler`` classes as pure functions of the step, torch's LRs bit for bit |
| :mod:`.imported_lr_schedule` | kohya's ``--lr_scheduler_type module.Class``: an installed class stepped on a probe optimiser, its LRs as a function of the step |
| :mod:`.imported_classes` | the classes a kohya config names by path (``optimizer_type``, ``lr_scheduler_type``), imported as kohya does |
| :mod:`.optimizer_args` | kohya's ``--optimizer_args KEY=VALUE`` parsed and checked against each optimiser |
| :mod:`.max_norm` | kohya's max-norm regularisation of LoRA-family adapters (``--scale_weight_norms``) |
| :mod:`.fp8_base` | kohya's ``--fp8_base``: a frozen base's Linear / Conv weights stored in float8, upcast by autocast |
| :mod:`.half_weights` | kohya's ``full_fp16`` / ``full_bf16`` for adapters: trainable weights in fp16/bf16, the fp16 loss scaler |
| :mod:`.attention` | which SDPA kernel to use, measured on the model's own attention calls |
| :mod:`.fused_lora` | linear LoRA layers as one autograd function each, the delta added in the base GEMM's output (``StepConfig.fused_lora_linear``) |
| :mod:`.norm_precision` | GroupNorm/LayerNorm in autocast's half dtype instead of CUDA autocast's float32 (``StepConfig.half_precision_norms``) |
| :mod:`.step_capture` | the whole step as CUDA-graph replays, one graph per batch layout (:class:`CapturedStep`) |
| :mod:`.distributed` | FSDP2 sharding block by block for data-parallel runs (:func:`~.distributed.fully_shard_blocks`) |
| :mod:`.latent_cache` | encode latents and text states once into safetensors shards |
| :mod:`.text_cache` | every caption's conditioning encoded once for ``fit`` (kohya's ``--cache_text_encoder_outputs``) |
| :mod:`.validation` | kohya's validation loss: the seeded ``validation_split`` per subset, fixed timesteps, the eval-mode pass ``fit`` runs |
| :mod:`.pixel_augment` | kohya's random crop and colour augmentation, drawn at each use of an image |
| :mod:`.face_crop` | kohya's ``face_crop_aug_range``: the face in a file's name, a drawn scale and window around it |
| :mod:`.dataset_config` | kohya's dataset TOML and fine-tuning metadata (``--in_json``) resolved into subsets |
| :mod:`.grad_checkpointing` | gradient checkpointing for any model chosen by a target predicate |
| :mod:`.param_groups` | parameter groups, one per block, for an optimiser fused into backward |
| :mod:`.engine_backward` | a backward pass that keeps the caller's torch function modes for the Python code backward runs |
| :mod:`.host_syncs` | host syncs found on any device (:class:`~.host_syncs.HostSyncs`), copies that do not wait |
| :mod:`.data` | training data as kohya and OneTrainer lay it out: folders, captions, aspect-ratio buckets |
| :mod:`.data_parallel` | data-parallel training under torchrun / ``accelerate launch``: each rank's slice, averaged gradients |
| :mod:`.loss_masks` | kohya's masked loss: a per-pixel weight in [0, 1] for each image's loss |
| :mod:`.monitor` | a CSV log of every step, TensorBoard scalars, kohya's ``loss/average`` |
| :mod:`.memory_watch` | a CUDA device's memory each step (peak allocated, reserved) and the near-full / sysmem-fallback warning |
| :mod:`.reg_data` | kohya's regularisation images (``--reg-data-dir``): your own class images as the prior data |
| :mod:`.class_folder` | diffusers' ``--class_data_dir``: generated class images kept in a folder, topped up, reused |
"""

from . import (
    attention,
    dadapt,
    diffusion,
    distributed,
    edm,
    fp8_base,
    fused_lora,
    grad_checkpointing,
    half_weights,
    host_syncs,
    imported_classes,
    imported_lr_schedule,
    latent_cache,
    lion,
    lr_schedules,
    max_norm,
    norm_precision,
    optim,
    optimizer_args,
    param_groups,
    prodigy,
    schedule_free,
    step,
    step_capture,
    step_size_estimate,
    text_cache,
    timestep_distribution,
    torch_lr_schedules,
    validation,
)
from .grad_checkpointing import CheckpointHandle, enable_checkpointing
from .step import EMA, StepConfig, TrainState, train_step
from .step_capture import CapturedStep

__all__ = [
    "attention",
    "norm_precision",
    "fused_lora",
    "diffusion",
    "edm",
    "timestep_distribution",
    "step",
    "optim",
    "lr_schedules",
    "torch_lr_schedules",
    "imported_lr_schedule",
    "imported_classes",
    "optimizer_args",
    "prodigy",
    "dadapt",
    "step_size_estimate",
    "lion",
    "schedule_free",
    "max_norm",
    "fp8_base",
    "half_weights",
    "step_capture",
    "distributed",
    "latent_cache",
    "grad_checkpointing",
    "param_groups",
    "host_syncs",
    "text_cache",
    "validation",
    "train_step",
    "StepConfig",
    "TrainState",
    "EMA",
    "CapturedStep",
    "enable_checkpointing",
    "CheckpointHandle",
]
