"""The shared fitting loop: images + captions, any adaptation, sdadapt's train step.

A *system* implements :class:`sdadapt.methods.system.System` (``encode_images``, ``tokenize``,
``condition``, ``denoiser``, ``alphas_cumprod``, ``prediction_type`` ...): :class:`sdadapt.toy.ToySystem`,
:class:`sdadapt.diffusers_system.DiffusersSystem`, or your own. An *adaptation* (:class:`Adaptation`)
owns the trainable parameters, can save itself in its method's file format and can be removed,
leaving the system as it was.

Two kinds of data:

* ``images`` (N, 3, H, W) + ``captions``: one size; each step draws a random batch (with
  replacement) — the demo and the quality benchmark use this;
* a :class:`sdadapt.training.data.Dataset`: aspect-ratio buckets with cached latents, epochs of
  shuffled one-bucket batches (kohya-style repeats), captions shuffled/dropped per draw, SDXL size
  and crop conditioning per image.

Latents are encoded once; the text encoder runs inside each step (its LoRA, or a trainable
embedding, gets gradients; when nothing in it trains it costs one forward, which
``FitConfig.cache_text_encoder_outputs`` saves: every caption encoded once, before the first step). Options beyond the
step's (:class:`FitConfig`): optimiser, LR schedule and warm-up, text-encoder LR, gradient
accumulation (``step.accumulation_steps``: a step is one optimiser step), EMA, and what happens
on a non-finite loss. ``on_step`` sees every optimiser step (logs, samples, periodic saves with
:meth:`FitProgress.save_state`), and ``resume`` continues from such a saved state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import PeerProcessError
from ..formats.files import StagedOutputs
from ..method_tables import LR_SCHEDULES
from ..plurals import plural
from ..training import data_parallel
from ..training.diffusion import region_loss_mask, zero_terminal_snr_alphas_cumprod
from ..training.host_syncs import copy_to_device
from ..training.imported_lr_schedule import ImportedSchedule
from ..training.lr_schedules import (
    EXTRA_SCHEDULES,
    check_extra_schedule,
    extra_schedule_factor,
)
from ..training.optim import lr_at
from ..training.pixel_augment import draw_resize, resize_mask, resize_pixels
from ..training.schedule_free import switch_mode
from ..training.step import (
    EMA,
    StepConfig,
    TrainState,
    fused_backward_clashes,
    load_training_state,
    save_training_state,
    train_step,
)
from ..training.torch_lr_schedules import TorchSchedule
from .optimizers import (
    _OPTIMIZER_ALIASES,
    OPTIMIZERS,
    canonical_optimizer,
    cuda_graph_clashes,
    estimates_step_size,
    make_optimizer,
    schedule_free_optimizer,
)
from .system import System, system_models, text_encoders

__all__ = ["DEFAULT_MIN_SNR_GAMMA", "Adaptation", "FitConfig", "FitProgress", "INDUCTOR_CPU_OPTIONS",
           "NonFiniteLossError", "OPTIMIZERS", "SCHEDULES",
           "compiled_model", "cuda_graph_clashes", "fit", "make_optimizer", "micro_batches_of_step", "step_of_micro_batch",
           "zero_terminal_snr_clashes"]

#: LR schedules (``constant_with_warmup`` is kohya's/diffusers' name for ``warmup``; the last four:
#: :mod:`sdadapt.training.lr_schedules`); their one home is :data:`sdadapt.method_tables.LR_SCHEDULES` (torch-free)
SCHEDULES = LR_SCHEDULES


class Adaptation(Protocol):
    """What a method hands the loop: parameters to train, a file to write, a way back.

    Optional members the loop uses when present (embedding methods need them):

    * ``tokenize(captions) -> cond ids`` instead of ``system.tokenize`` (textual inversion spells a
      multi-vector trigger out; DreamArtist stacks positive and negative ids ``(N, 2, L)``);
    * ``training_model(system) -> model(x_t, t, ids)`` instead of ``denoiser ∘ condition``
      (DreamArtist's classifier-free-guided prediction);
    * ``extra_loss(prepared, prediction) -> 0-dim`` added to the step's loss (or ``None``);
    * ``lr_scales``: one learning-rate factor per entry of ``params`` (DreamArtist's negative lr weight);
    * ``text_encoder_share``: when ``FitConfig.text_encoder_steps`` is not given, the text encoder
      trains for the first ``round(share · steps)`` steps (DreamBooth's default co-training).
    """

    params: list[nn.Parameter]

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path: ...

    def remove(self) -> None: ...


try:  # the command line's exit code for NaN/inf results (sdadapt.errors), when present
    from ..errors import NonFiniteError as _NonFinite
except ImportError:  # pragma: no cover
    _NonFinite = ValueError  # type: ignore[misc,assignment]


class NonFiniteLossError(_NonFinite):  # type: ignore[misc,valid-type]
    """The loss became NaN or infinite: the run diverged (``step`` is 1-based)."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"the loss is {loss} at step {step}: training diverged (lower the learning rate, or use "
                         "--mixed-precision no / bf16 instead of fp16)")


#: min-SNR γ of :class:`FitConfig`'s default step (``step=None``) on a DDPM model; an EDM model's default step has
#: none (diffusers refuses min-SNR with EDM training), and ``train``'s ``--min-snr-gamma`` left out is the same rule
DEFAULT_MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Loop options (the step's own options — min-SNR, noise offset, mixed precision, gradient
    accumulation, clipping — are in ``step``).

    Attributes:
        step: the :class:`~sdadapt.training.step.StepConfig` each step runs; ``None`` (default): not
            given, so :func:`fit` takes :meth:`step_config` for its system — ``StepConfig(min_snr_gamma=``
            :data:`DEFAULT_MIN_SNR_GAMMA` ``)`` on a DDPM model, ``StepConfig()`` (no min-SNR) on an EDM
            model (``system.edm``, Playground v2.5), where a γ given is refused as diffusers does.
        steps: optimiser steps (each ``step.accumulation_steps`` batches).
        optimizer: one of :data:`OPTIMIZERS` (``adamw8bit``/``adamw-bf16``: sdadapt's lean AdamW
            with 8-bit / bf16 states; ``adafactor``: factored second moments, fixed LR unless
            ``optimizer_args`` say ``relative_step=True``: then its own step size replaces every
            group's LR, so ``learning_rate``, ``text_encoder_lr``, the schedule and the adaptation's
            ``lr_scales`` — LoRA+, block lr weights, DreamArtist's negative weight — are unused, as in
            kohya; a parameter whose LR is 0 (``text_encoder_lr=0``, an ``lr_scales`` entry of 0)
            is still frozen); ``lion`` / ``lion-bf16``: sdadapt's :class:`~sdadapt.training.lion.Lion`
            with a float32 / bf16 momentum (kohya's ``Lion``; ``Lion8bit`` and ``PagedLion8bit`` train
            as ``lion-bf16``, docs/optim.md says why); ``sgd-nesterov``: ``torch.optim.SGD`` with
            ``nesterov=True`` and momentum 0.9 unless ``optimizer_args`` give one (kohya's
            ``SGDNesterov``; float32 weights only); ``prodigy``: sdadapt's
            :class:`~sdadapt.training.prodigy.Prodigy` (kohya's ``Prodigy``, prodigyopt's algorithm):
            it estimates the step size ``d`` itself and ``learning_rate`` multiplies it (use 1.0, as
            kohya advises); every group's LR must be the same or 0 (no separate ``text_encoder_lr``,
            no LoRA+ or block LR factors), and it cannot be used with ``fused_backward``;
            ``dadapt-adam`` / ``dadapt-lion``: sdadapt's :class:`~sdadapt.training.dadapt.DAdaptAdam` /
            :class:`~sdadapt.training.dadapt.DAdaptLion` (kohya's ``DAdaptAdam`` / ``DAdaptLion``,
            dadaptation 3.2's algorithms; ``dadapt-adam-preprint``, kohya's ``DAdaptation``:
            :class:`~sdadapt.training.dadapt.DAdaptAdamPreprint`), the same rules as ``prodigy``; ``adamw-schedulefree``:
            sdadapt's :class:`~sdadapt.training.schedule_free.AdamWScheduleFree` (kohya's
            ``AdamWScheduleFree``, schedulefree 1.4.1's algorithm): a constant LR (``schedule`` and
            ``warmup_steps`` are unused, as kohya's dummy scheduler leaves them; its own warm-up is
            ``optimizer_args`` ``warmup_steps``), no ``ema_decay``, no ``fused_backward``; ``fit``
            puts it in train mode before each step and in eval mode — the averaged weights — before
            ``on_step`` saves (:meth:`FitProgress.save_state`, :meth:`FitProgress.averaged`,
            :meth:`FitProgress.use_weights`) and when it returns; ``sgd-schedulefree``: the same for
            :class:`~sdadapt.training.schedule_free.SGDScheduleFree` (kohya's ``SGDScheduleFree``). Any other
            optimiser class, as kohya's ``optimizer_type`` takes it: ``"module.Class"`` (``"came_pytorch.CAME"``) or a
            ``torch.optim`` class name (``"RAdam"``), built ``Class(groups, lr=..., **optimizer_args)``
            (:func:`~sdadapt.methods.optimizers.imported_optimizer_class`); eager only (no ``cuda_graph``, no ``fused_backward``); a class
            name ending in ``ScheduleFree`` gets the schedule-free rules above, as kohya's.
        weight_decay: the weight decay; ``None`` (default): the optimiser's own (0.01 for the AdamW
            ones, as ``torch.optim.AdamW``; 0 for Adafactor, Lion, SGD, Prodigy and D-Adaptation, as transformers',
            lion-pytorch's, torch's and prodigyopt's). Decoupled for AdamW and Adafactor, multiplied by the LR
            for Lion (lion-pytorch's), an L2 term added to the gradient for SGD (torch's).
        schedule: one of :data:`SCHEDULES`; ``num_cycles`` for ``cosine_with_restarts``;
            ``lr_power`` and ``lr_end`` for ``polynomial`` (diffusers' / kohya's polynomial decay:
            after the warm-up ``lr = (L − lr_end)·(1 − p)^lr_power + lr_end`` with ``L`` =
            ``schedule_base_lr`` (default ``learning_rate``), ``p`` the share of the decay steps done;
            every group — the text encoder's, LoRA+'s, block weights' — is scaled by the same factor
            ``lr/L``, as kohya's ``LambdaLR``).
        schedule_base_lr: the ``L`` the polynomial schedule's factor is computed from: kohya's
            optimiser LR (``--learning_rate``), which ``--unet_lr`` does not change (``None``:
            ``learning_rate``). ``lr_end`` must be below it, as diffusers requires.
        min_lr_ratio, decay_steps, lr_timescale, step_rules, warmup_type, decay_type: the settings
            of kohya's other schedules (:mod:`sdadapt.training.lr_schedules`, each group's LR its
            base LR times the factor): ``cosine_with_min_lr`` (transformers') needs ``min_lr_ratio``
            (in [0, 1]: the factor it ends at) and reads ``num_cycles`` as half-waves of the cosine;
            ``warmup_stable_decay`` (transformers' WSD) warms up over ``warmup_steps`` (from
            ``min_lr_ratio``, default 0, along ``warmup_type``), holds, then decays over the last
            ``decay_steps`` (``warmup_steps + decay_steps <= steps``) along ``decay_type`` (``linear``,
            ``cosine`` — ``num_cycles`` half-waves — or ``1-sqrt``) to ``min_lr_ratio``;
            ``inverse_sqrt`` is ``1/√((s + τ − W)/τ)`` after the warm-up with ``τ = lr_timescale``
            (default ``warmup_steps``, or 10000 without a warm-up); ``piecewise_constant``
            (diffusers') needs ``step_rules`` (``"1:100,0.1:200,0.01"``: factor 1 before step 100,
            0.1 before step 200, then 0.01) and has no warm-up (``warmup_steps`` unused, as kohya's).
        torch_schedule: kohya's ``--lr_scheduler_type``: a ``torch.optim.lr_scheduler`` class run
            as a function of the step (:class:`~sdadapt.training.torch_lr_schedules.TorchSchedule`;
            each group's curve starts from its own LR, as torch's ``base_lrs``). Given, it replaces
            ``schedule`` and its options, and ``warmup_steps`` must be 0 (kohya refuses a warm-up with it).
            One that moves β1 (``OneCycleLR``'s ``cycle_momentum``) sets every group's ``betas[0]``
            (``momentum`` for SGD) before each step too; not with ``cuda_graph`` (a captured step
            keeps the β1 it was captured with). Any other installed class (kohya's ``module.Class``) is
            an :class:`~sdadapt.training.imported_lr_schedule.ImportedSchedule`: the real class stepped
            on a probe optimiser, its LRs computed for every step before the first.
        text_encoder_lr: LR of parameters inside the text encoder(s) (default: ``learning_rate``;
            0 freezes them — kohya's ``--network_train_unet_only``).
        text_encoder_2_lr: LR of parameters inside the second text encoder (SDXL's
            ``text_encoder_2``; default: ``text_encoder_lr``, so one value trains both at one rate;
            0 freezes that encoder alone — kohya's ``learning_rate_te2``). Given, the second encoder's parameters are their own
            groups (``lr_scales`` such as LoRA+ multiply it as they multiply ``text_encoder_lr``).
        text_encoder_steps: train the parameters inside the text encoder(s) for the first this
            many optimiser steps only (kohya's ``--stop_text_encoder_training``; ``None``: every
            step). From then on they no longer require gradients, so the text encoder builds no
            graph; their optimiser state is kept, and the stop depends only on the step (a resumed
            run stops at the same place).
        ema_decay: keep an exponential moving average of the trained parameters; the adaptation
            holds the averaged weights when ``fit`` returns (with ``ema_into_weights``).
        ema_into_weights: with ``ema_decay``, copy the average into the trained parameters when
            ``fit`` returns (default); ``False`` leaves the last step's raw weights there (the
            average is read inside ``on_step``'s :meth:`FitProgress.averaged`, e.g. to save both).
        stop_on_nonfinite: raise :class:`NonFiniteLossError` at the first NaN/inf loss.
        gradient_checkpointing: recompute the activations of the UNet's resnets and transformers
            (:data:`~sdadapt.training.grad_checkpointing.UNET_BLOCKS`) in backward instead of keeping
            them — less memory for about one more forward. Only the checkpointed wrappers are switched
            to training mode for the run; every module inside keeps its mode (dropout as without),
            so the trained weights are the same as without checkpointing.
        gradient_checkpointing_fraction: with ``gradient_checkpointing``, checkpoint only this share
            (in ``(0, 1]``) of those blocks, the ones keeping the most activations (highest
            resolution first, transformers before resnets:
            :func:`~sdadapt.training.grad_checkpointing.blocks_by_activation_memory`): memory
            between none and all, less recompute than all. Same trained weights either way.
        fused_backward: step the optimiser inside ``backward()``, one block at a time (a UNet
            resnet or transformer, a text-encoder layer:
            :func:`~sdadapt.training.param_groups.parameter_groups_by_module`) as soon as the block's
            gradients have arrived, freeing them at once (kohya's ``--fused_backward_pass``, which
            steps each parameter alone; no gradient buffer of the model's size: about one block's
            gradients live at a time). Same update as the usual loop; needs
            ``step.max_grad_norm=None``, ``step.accumulation_steps=1`` and no fp16 (bf16 works).
        measure_attention: before the first step, time each SDPA kernel (flash, memory-efficient,
            cuDNN, math) on the attention calls of one training forward of the first batch and
            train under the fastest order, each kind of call under its own fastest
            (:mod:`sdadapt.training.attention`; replaces ``step.sdpa_backends`` and
            ``step.sdpa_backends_per_call``; :attr:`FitProgress.sdpa_backends` tells the order). Seconds on a GPU;
            the run's random draws are the same as without it.
        cuda_graph: run each optimiser step — forward, loss, backward, clipping, optimiser — as a
            CUDA-graph replay (:class:`~sdadapt.training.step_capture.CapturedStep`): each batch
            layout (batch size × bucket) trains 3 eager steps, is captured, then replayed with one
            launch. Noise and timesteps are drawn outside the graph from the same generator, so the
            run draws what an eager one draws; the optimiser is built ``capturable`` with tensor
            learning rates (the schedule fills them in place). With ``step.accumulation_steps`` > 1
            each micro-batch is a replay and each optimiser update one more (its own graph). Needs
            any optimiser but ``sgd-nesterov`` (AdamW, Adafactor — relative step too —, Lion, Prodigy,
            D-Adaptation, schedule-free: :func:`cuda_graph_clashes` lists them), no fp16 (bf16 works), no
            ``fused_backward``. A dataset's prior batch (a second forward) is captured with the
            step, its noise drawn before the replay. On a CPU the steps run eagerly (the same results).
        compile_backend: ``torch.compile`` the model the step calls (the UNet with the adapters
            and, where the method trains through it, the text conditioning) with this dynamo
            backend (``"inductor"``, ``"aot_eager"``, ...; kohya's ``--torch_compile
            --dynamo_backend``); ``None``: eager. The first steps compile; a new batch size or
            bucket compiles once more (then dynamic). Every adapter family traces in one graph
            (``tests/test_compile_graphs.py``) but DyLoRA, which is refused (ValueError: its host-side
            slice draw breaks the graph at every layer and recompiles it for every slice). Attention is measured (``measure_attention``) on the
            eager model, before compiling.
        zero_terminal_snr: train on the system's schedule rescaled to zero terminal SNR
            (:func:`~sdadapt.training.diffusion.zero_terminal_snr_alphas_cumprod`, kohya's
            ``--zero_terminal_snr``): the noising, the v target, the SNR loss weights and Huber's
            ``snr`` schedule use the rescaled ᾱ (ᾱ_T = 0, the last step's input pure noise); the
            system's own ``alphas_cumprod`` (samples, class images) stays as it was, as kohya's.
        optimizer_args: extra constructor arguments of the optimiser (kohya's ``--optimizer_args``):
            a mapping or ``((key, value), ...)``, kept as the latter (hashable); the keys each
            optimiser takes are :data:`~sdadapt.training.optimizer_args.OPTIMIZER_ARG_KEYS` (e.g.
            ``betas``, ``eps``, ``weight_decay``), checked when the config is made. A
            ``weight_decay`` here wins over the ``weight_decay`` field (kohya has only this one).
        scale_weight_norms: after each optimiser step, shrink every LoRA-family adapter whose
            ‖ΔW‖_F (alpha / rank included) exceeds this onto that norm
            (:func:`~sdadapt.training.max_norm.scale_weight_norms_`, kohya's ``--scale_weight_norms``;
            lora / LoCon / LoHa / LoKr, refused for DoRA and others); on the device, inside a
            captured CUDA-graph step too. :attr:`FitProgress.max_norm` has kohya's statistics.
        cache_text_encoder_outputs: encode every caption the data can draw once, before the first
            step, and train on the cached conditioning (kohya's ``--cache_text_encoder_outputs``;
            :mod:`sdadapt.training.text_cache`): the steps no longer run the text encoder. Exactly
            what ``system.condition`` gives (same autocast and attention kernels), rows kept on the
            host and copied per batch without a host wait; SDXL's size conditioning stays per image.
            Needs captions fixed before training (no shuffled or dropped tags, no templates or
            wildcards drawn per use; a whole-caption dropout works, ``""`` is cached too) and
            nothing in the text path training (no text-encoder adapters or embeddings unless their
            ``text_encoder_lr`` is 0, no adaptation ``tokenize`` / ``training_model``).
        text_encoder_outputs_files: with ``cache_text_encoder_outputs`` and a dataset, the cache's
            files (kohya's ``cache_text_encoder_outputs_to_disk``):
            ``files(encode, entries, texts) -> TextConditionCache`` with ``entries`` = (image path,
            caption as a use writes it) of every dataset / regularisation / validation image with a file,
            ``texts`` every caption the run can draw and ``encode(captions)`` the in-memory encode
            (:class:`~sdadapt.training.kohya_text_files.KohyaTextFiles`); ``None``: in memory only.
        weighted_captions: kohya's ``--weighted_captions``: a dataset's captions are read with
            A1111 emphasis (``(word:1.2)``, ``[word]``; :mod:`sdadapt.prompt_weights`) and each
            token's text states are multiplied by its weight (``system.tokenize_weighted``, e.g.
            :meth:`~sdadapt.diffusers_system.DiffusersSystem.tokenize_weighted`). Needs a
            :class:`~sdadapt.training.data.Dataset`, a system with ``tokenize_weighted``, no
            adaptation ``tokenize`` / ``training_model`` and no ``cache_text_encoder_outputs``;
            generated class images' prompts stay unweighted.
        validate_every_n_steps, validate_every_n_epochs, max_validation_steps, validation_seed: the
            validation loss of the held-out data ``fit(..., validation=...)`` (kohya's options of the
            same names; :mod:`sdadapt.training.validation`): a pass after every
            ``validate_every_n_steps``-th optimiser step (``None``: none by steps) and at the end of
            every ``validate_every_n_epochs``-th epoch (``None``: every epoch, as kohya; the last step
            ends the last epoch; with image tensors the run is one epoch), over the first
            ``max_validation_steps`` held-out batches (``None``: all), each batch at kohya's 4 fixed
            timesteps with noise drawn from ``validation_seed`` (``None``: ``seed``) anew at each pass,
            the model in eval mode under ``no_grad``. It draws nothing from the training run's
            generators: a run with validation trains bit for bit as one without (a schedule-free
            optimiser apart: the eval()/train() pair around each pass rounds its weights once more).
            :attr:`FitProgress.validation_loss` has the mean.
        initial_step, skip_until_initial_step: kohya's options of the same names: a run that starts
            at optimiser step ``initial_step`` (0 ≤ it < ``steps``) with fresh weights and optimiser
            (or a resumed one's), training steps ``initial_step + 1 … steps``; the step numbers
            (:class:`FitProgress`, epochs, validation, text-encoder stop) count from it, while the LR
            schedule starts at its beginning (kohya's: step ``initial_step + i`` trains at
            ``lr_at(i)``) and the noise generator at ``seed``. ``skip_until_initial_step``: the data
            continues at the batches step ``initial_step + 1`` of a run from step 0 trains (those
            before it are skipped); otherwise the data starts at the first batches.
    """

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    seed: int = 0
    step: StepConfig | None = None  # (None: not given — step_config(), by the system's formulation)
    optimizer: str = "adamw"
    weight_decay: float | None = None
    text_encoder_lr: float | None = None
    text_encoder_2_lr: float | None = None
    num_cycles: int = 1
    ema_decay: float | None = None
    stop_on_nonfinite: bool = True
    text_encoder_steps: int | None = None
    ema_into_weights: bool = True
    gradient_checkpointing: bool = False
    fused_backward: bool = False
    gradient_checkpointing_fraction: float = 1.0
    measure_attention: bool = False
    cuda_graph: bool = False
    compile_backend: str | None = None
    zero_terminal_snr: bool = False
    optimizer_args: Any = ()
    scale_weight_norms: float | None = None
    cache_text_encoder_outputs: bool = False
    text_encoder_outputs_files: Any = None
    weighted_captions: bool = False
    lr_power: float = 1.0
    lr_end: float = 1e-7
    schedule_base_lr: float | None = None
    min_lr_ratio: float | None = None
    decay_steps: int = 0
    lr_timescale: int | None = None
    step_rules: str | None = None
    warmup_type: str = "linear"
    decay_type: str = "cosine"
    torch_schedule: TorchSchedule | ImportedSchedule | None = None
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None
    validation_seed: int | None = None
    initial_step: int = 0
    skip_until_initial_step: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if isinstance(self.initial_step, bool) or not isinstance(self.initial_step, int) or not 0 <= self.initial_step < self.steps:
            raise ValueError(f"initial_step must be an integer in [0, steps={self.steps}) (kohya's: max_train_steps "
                             f"must be greater than initial_step), got {self.initial_step!r}")
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None (kohya's --{name}), got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0 (0 freezes the encoder), got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if isinstance(self.lr_power, bool) or not 0 <= self.lr_power < math.inf:
            raise ValueError(f"lr_power must be a finite number >= 0 (polynomial decay; 1: linear), got {self.lr_power!r}")
        if self.schedule_base_lr is not None and (isinstance(self.schedule_base_lr, bool) or not 0 < self.schedule_base_lr < math.inf):
            raise ValueError(f"schedule_base_lr must be a finite number > 0 (or None: learning_rate), got {self.schedule_base_lr!r}")
        if self.schedule == "polynomial" and not 0 <= self.lr_end < self._schedule_lr:
            raise ValueError(f"lr_end must be >= 0 and below learning_rate (schedule_base_lr when given) {self._schedule_lr} "
                             f"(the polynomial schedule decays from it to lr_end; diffusers refuses the same), got {self.lr_end!r}")
        if self.schedule in EXTRA_SCHEDULES:
            check_extra_schedule(self.schedule, total_steps=self.steps, warmup_steps=self.warmup_steps,
                                 decay_steps=self.decay_steps, min_lr_ratio=self.min_lr_ratio,
                                 lr_timescale=self.lr_timescale, step_rules=self.step_rules,
                                 warmup_type=self.warmup_type, decay_type=self.decay_type)
        if self.torch_schedule is not None and self.warmup_steps:
            raise ValueError(f"torch_schedule {self.torch_schedule.name} takes no warm-up: set warmup_steps=0 (kohya "
                             f"refuses lr_warmup_steps with lr_scheduler_type), got {self.warmup_steps}")
        if self.torch_schedule is not None and self.torch_schedule.cycles_momentum and self.cuda_graph:
            raise ValueError(f"torch_schedule {self.torch_schedule.name} moves beta1 at every step, which a CUDA-graph "
                             "step keeps at its captured value: leave out cuda_graph (--cuda-graph), or give "
                             "cycle_momentum=False (the LR curve alone)")
        if (self.torch_schedule is not None and self.torch_schedule.cycles_momentum
                and _OPTIMIZER_ALIASES.get(self.optimizer.lower()) == "adafactor"):
            raise ValueError(f"torch_schedule {self.torch_schedule.name} moves beta1 / momentum, which Adafactor does not "
                             "have (torch refuses the pair too): give cycle_momentum=False")
        name = canonical_optimizer(self.optimizer)  # (a refused kohya name or an unknown one: ValueError; an imported
        # class is imported and built on a probe by check_optimizer_args below)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), e.g. 0.999; got {self.ema_decay}")
        if self.weight_decay is not None and (isinstance(self.weight_decay, bool) or not self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0 (or None: the optimiser's default), got {self.weight_decay!r}")
        from ..training.optimizer_args import check_optimizer_args

        object.__setattr__(self, "optimizer_args", check_optimizer_args(
            name, self.optimizer_args or (), weight_decay=self.weight_decay))
        if self.scale_weight_norms is not None and (isinstance(self.scale_weight_norms, bool)
                                                    or not 0 < self.scale_weight_norms < math.inf):
            raise ValueError(f"scale_weight_norms must be a number > 0 (the largest ‖ΔW‖ of an adapted layer, e.g. 1.0) "
                             f"or None, got {self.scale_weight_norms!r}")
        if self.text_encoder_steps is not None and (isinstance(self.text_encoder_steps, bool) or self.text_encoder_steps < 0):
            raise ValueError(f"text_encoder_steps must be a step count >= 0 (or None: train the text encoder every step), "
                             f"got {self.text_encoder_steps!r}")
        if not 0.0 < self.gradient_checkpointing_fraction <= 1.0:
            raise ValueError(f"gradient_checkpointing_fraction must be in (0, 1], got {self.gradient_checkpointing_fraction!r}")
        if self.gradient_checkpointing_fraction < 1.0 and not self.gradient_checkpointing:
            raise ValueError("gradient_checkpointing_fraction < 1 chooses which blocks gradient checkpointing recomputes; "
                             "set gradient_checkpointing=True too")
        if self.fused_backward and name not in OPTIMIZERS:
            raise ValueError(f"fused_backward (--fused-backward-pass) steps one optimiser per block; {self.optimizer} is "
                             "an imported class, which may compute over every trained parameter at once (kohya fuses "
                             "Adafactor only): leave out fused_backward or use one of sdadapt's optimizers")
        if self.fused_backward and estimates_step_size(name):
            raise ValueError("fused_backward (--fused-backward-pass) steps one block's optimiser at a time, but "
                             f"{self.optimizer}'s step size is estimated from sums over every trained parameter at once; "
                             "leave out fused_backward or use another optimizer")
        if self.schedule_free:
            clashes = _schedule_free_clashes(self)
            if clashes:
                raise ValueError(f"optimizer {self.optimizer!r} is schedule-free (no LR schedule; its eval-mode weights "
                                 "are the average of its steps), so it cannot work with " + "; ".join(clashes))
        if self.fused_backward:
            clashes = fused_backward_clashes(self.step_config())
            if clashes:
                raise ValueError("fused_backward (--fused-backward-pass) steps each parameter as soon as its gradient "
                                 "arrives, so it cannot work with " + "; ".join(clashes))
        if self.compile_backend is not None:
            _check_compile_backend(self.compile_backend)
        if self.weighted_captions and self.cache_text_encoder_outputs:
            raise ValueError("weighted_captions (--weighted-captions) weights each caption's text states as it is "
                             "encoded, which cache_text_encoder_outputs does once without the weights; give one of "
                             "the two (kohya refuses the pair too)")
        if self.text_encoder_outputs_files is not None and not self.cache_text_encoder_outputs:
            raise ValueError("text_encoder_outputs_files keeps the text-encoder cache's files: set "
                             "cache_text_encoder_outputs=True too (kohya's cache_text_encoder_outputs_to_disk turns it on)")
        if self.cuda_graph:
            clashes = cuda_graph_clashes(fused_backward=self.fused_backward,
                                         mixed_precision=self.step_config().mixed_precision,
                                         optimizer=self.optimizer, compile_backend=self.compile_backend)
            if clashes:
                raise ValueError("cuda_graph (--cuda-graph) captures each optimiser step in a CUDA graph, so it cannot "
                                 "work with " + "; ".join(clashes))

    def step_config(self, *, edm: bool = False) -> StepConfig:
        """The step :func:`fit` runs: ``step`` when given, else the default step of a DDPM model (``edm`` false:
        min-SNR γ :data:`DEFAULT_MIN_SNR_GAMMA`) or of an EDM-formulation model (``edm`` true: no min-SNR, which
        weighs by the DDPM SNR; diffusers' EDM training has no loss weight). Everything else is
        :class:`~sdadapt.training.step.StepConfig`'s default either way."""
        if self.step is not None:
            return self.step
        return StepConfig() if edm else StepConfig(min_snr_gamma=DEFAULT_MIN_SNR_GAMMA)

    def encoder_lrs(self) -> tuple[float | None, float | None]:
        """``(first, second)``: the base LR of the parameters in ``text_encoder`` and in
        ``text_encoder_2`` (``None``: ``learning_rate``, as the UNet's); the second is
        ``text_encoder_2_lr``, else the first."""
        first = self.text_encoder_lr
        return first, (self.text_encoder_2_lr if self.text_encoder_2_lr is not None else first)

    def text_encoder_stop(self, adaptation: Any) -> int | None:
        """The step the text encoder stops training at: ``text_encoder_steps``, else the first
        ``round(share · steps)`` steps of the adaptation's ``text_encoder_share`` (``None``: every step)."""
        share = getattr(adaptation, "text_encoder_share", None)
        if self.text_encoder_steps is None and share is not None:
            return round(float(share) * self.steps)
        return self.text_encoder_steps

    @property
    def relative_step(self) -> bool:
        """Whether the optimiser takes its own step size (Adafactor with ``relative_step=True``): the
        groups' LRs are then unused."""
        return (canonical_optimizer(self.optimizer) == "adafactor"
                and bool(dict(self.optimizer_args).get("relative_step", False)))

    @property
    def schedule_free(self) -> bool:
        """Whether the optimiser is schedule-free (``adamw-schedulefree``, ``sgd-schedulefree``): ``fit`` switches it to train
        mode before each step and to eval mode (the averaged weights) whenever the weights are used. An imported
        optimizer class is schedule-free when its name ends in ``ScheduleFree``, as kohya's rule says."""
        return schedule_free_optimizer(canonical_optimizer(self.optimizer))

    @property
    def _schedule_lr(self) -> float:
        """The LR the polynomial schedule's factor is computed from (``schedule_base_lr`` or ``learning_rate``)."""
        return self.learning_rate if self.schedule_base_lr is None else float(self.schedule_base_lr)

    def lr_at(self, step: int, base: float) -> float:
        """The LR of a group with base LR ``base`` at optimiser step ``step`` (0-based): ``base`` at
        every step for a schedule-free optimiser (kohya's dummy scheduler: ``schedule`` and
        ``warmup_steps`` unused; its own warm-up is ``optimizer_args`` ``warmup_steps``)."""
        if self.schedule_free:
            return base
        if self.torch_schedule is not None:  # (OneCycleLR: accelerate's stop at total_steps; an imported class may read
            # the optimiser's own LR, kohya's learning_rate: transformers' polynomial / cosine-with-min-LR schedules)
            return self.torch_schedule.lr(step, base, reference_lr=self._schedule_lr)
        schedule = {"constant_with_warmup": "warmup"}.get(self.schedule, self.schedule)
        if schedule == "constant" and self.warmup_steps:
            schedule = "warmup"
        if schedule == "polynomial":  # kohya's LambdaLR: one factor from the optimiser's LR, times each group's base
            reference = self._schedule_lr
            factor = lr_at(step, base_lr=reference, schedule="polynomial", warmup_steps=self.warmup_steps,
                           total_steps=self.steps, min_lr=self.lr_end, power=self.lr_power) / reference
            return base * factor
        if schedule in EXTRA_SCHEDULES:  # (kohya's LambdaLR: each group's base LR times one factor)
            return base * extra_schedule_factor(
                schedule, step, total_steps=self.steps, warmup_steps=self.warmup_steps, num_cycles=self.num_cycles,
                decay_steps=self.decay_steps, min_lr_ratio=self.min_lr_ratio, lr_timescale=self.lr_timescale,
                step_rules=self.step_rules, warmup_type=self.warmup_type, decay_type=self.decay_type)
        return lr_at(step, base_lr=base, schedule=schedule, warmup_steps=self.warmup_steps,  # type: ignore[arg-type]
                     total_steps=self.steps, num_cycles=self.num_cycles)


def _set_momentum(group: dict[str, Any], momentum: float | None, optimizer: str) -> None:
    """Put ``momentum`` into a group as torch's ``OneCycleLR`` does: ``betas[0]``, else ``momentum``.

    Raises:
        ValueError: the group has neither (torch refuses such an optimiser with ``cycle_momentum``).
    """
    if "betas" in group:
        group["betas"] = (momentum, *group["betas"][1:])
    elif "momentum" in group:
        group["momentum"] = momentum
    else:
        raise ValueError(f"optimizer {optimizer!r} has no beta1 or momentum for OneCycleLR's cycle_momentum to move "
                         "(torch refuses the pair too); add cycle_momentum=False to lr_scheduler_args")


def _schedule_free_clashes(config: FitConfig) -> list[str]:
    """What a schedule-free optimiser cannot train with (empty: nothing). (The LR schedule is not
    among them: it is unused, as kohya's — :meth:`FitConfig.lr_at`.)"""
    return [what for what, clash in (
        ("ema_decay (its eval-mode weights are already an average of the steps)", config.ema_decay is not None),
        ("fused_backward (one optimiser per block, each with its own train/eval mode and averaging weights)",
         config.fused_backward),
    ) if clash]


def zero_terminal_snr_clashes(step: StepConfig) -> list[str]:
    """What in ``step`` cannot train on a zero-terminal-SNR schedule (empty: nothing).

    Under the rescaled schedule the SNR falls to 0 at the last timestep (about 2e-7 one step before,
    on SD's schedule), so debiased estimation's ε-loss weight ``1/√SNR`` has no bound (≈ 2250 at
    t = 998, infinite at 999). kohya trains it only because its weights read the SNR of the schedule
    *before* the rescale; v-prediction's weight ``1/(SNR + 1)`` stays in (0, 1]. Min-SNR takes its
    limits (ε: 1, v and x0: 0) and Huber's ``snr`` schedule gives ``c`` there, so both train."""
    clashes = []
    if step.debiased_estimation and step.prediction_type == "epsilon":
        clashes.append("debiased estimation with epsilon prediction (its weight 1/sqrt(SNR) is unbounded as the SNR reaches 0; "
                       "use a v-prediction model, which zero terminal SNR needs anyway, or leave out --debiased-estimation-loss)")
    if step.v_pred_like_loss:
        clashes.append(f"v_pred_like_loss {step.v_pred_like_loss} (its weight 1 + X·(SNR + 1)/SNR is infinite at SNR 0; "
                       "leave out --v-pred-like-loss)")
    return clashes


def _check_compile_backend(name: str) -> str:
    """``name`` if it is a ``torch.compile`` backend of this torch (``torch._dynamo.list_backends``),
    else a ``ValueError`` listing them."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        usual = [b for b in ("inductor", "aot_eager", "eager", "cudagraphs") if b in known]
        raise ValueError(f"unknown torch.compile backend {name!r}; this torch has {', '.join(usual)} "
                         f"(and {len(known) - len(usual)} more: torch._dynamo.list_backends())")
    return name


#: Inductor options sdadapt compiles with on a CPU (see :func:`compiled_model`)
INDUCTOR_CPU_OPTIONS: dict[str, Any] = {"max_fusion_size": 1}


def compiled_model(model: Callable[..., Any], *, backend: str, device_type: str) -> Callable[..., Any]:
    """``torch.compile(model, backend=backend)``, with Inductor's fusion off on a CPU.

    Inductor's CPU code computes wrong gradients for diffusers UNets (seen with torch 2.13.0+cpu):
    the backward of ``F.interpolate(scale_factor=2.0, mode="nearest")`` (each up block's
    upsampler) is a zero-filled buffer that a scatter kernel fills, and Inductor fuses the zero
    fill with the kernel that reads the buffer for the next op back, ahead of the scatter, so the
    gradient through every upsampler is read as zeros while the loss is right. With fusion off
    (``max_fusion_size=1``, :data:`INDUCTOR_CPU_OPTIONS`) no reader is fused ahead of the scatter:
    the loss, input gradient and every adapter gradient of the tests' tiny UNet with LoRA equal
    eager ones within 1e-5 (``tests/test_compile_inductor.py`` checks the smallest repro, one up
    block, through this function); on that block it runs as fast as fused Inductor (docs/training.md).
    Other backends, and Inductor on a GPU, compile unchanged.

    Args:
        model: the module (or function) the step calls.
        backend: a ``torch.compile`` backend name (``_check_compile_backend``).
        device_type: where the trained parameters are (``"cpu"``, ``"cuda"``, ...).
    """
    if backend == "inductor" and device_type == "cpu":
        return torch.compile(model, backend="inductor", options=dict(INDUCTOR_CPU_OPTIONS))
    return torch.compile(model, backend=backend)


@dataclass
class FitProgress:
    """What ``on_step`` sees after each optimiser step.

    Attributes:
        step: optimiser steps done (1-based), of ``total``.
        loss: this step's loss: the mean of :attr:`batch_losses` (an epoch's short last step, with
            gradient accumulation not dividing the epoch's batches, the mean of its fewer batches).
        lr: the base group's learning rate at this step.
        epoch: the epoch this step's last batch belongs to (1-based; dataset mode, else 1).
        epoch_end: whether this step finished an epoch.
        epochs_done: complete epochs so far (dataset mode, else 0).
        sdpa_backends: the attention-kernel order the step runs under (``StepConfig.sdpa_backends``,
            or the one ``FitConfig.measure_attention`` measured; ``None``: torch's choice).
        max_norm: with ``FitConfig.scale_weight_norms``, kohya's statistics of this step's max-norm
            pass: ``{"keys_scaled": adapters shrunk, "average_key_norm": mean ‖ΔW‖ after it,
            "max_key_norm": largest ‖ΔW‖ after it}`` (read with the loss: no extra host read);
            ``None`` without it.
        validation_loss: the mean validation loss of the held-out data, computed after this step
            (:class:`FitConfig` ``validate_every_n_*``; one host read per pass); ``None`` when no
            pass ran at this step.
        validated: what asked for this step's pass: ``("step",)``, ``("epoch",)`` or both (kohya
            logs ``loss/validation/step_average`` and ``loss/validation/epoch_average``); ``()``.
        batch_losses: each of this step's batches' loss, in order (``accumulation_steps`` of them; an
            epoch's short last step fewer): kohya logs each batch's (``loss/current``, undivided by
            the accumulation) and the mean of the last epoch's (``loss/average``, its bar's
            ``avr_loss``: :class:`~sdadapt.training.monitor.LossAverage`). Read with ``loss``
            (no extra host read); data parallel: each the mean over the ranks.
        ema_updates: the updates the EMA has averaged (``FitConfig.ema_decay``; 0 without): optimiser
            steps since it started, a resumed run's included, not counting ``initial_step`` (what
            :class:`~sdadapt.methods.finetune.EMAWeights` ``updates`` records).
        sdpa_backends_per_call: ``((call signature, order), ...)``: the kinds of attention call that run
            their own order (``StepConfig.sdpa_backends_per_call``, or those ``FitConfig.measure_attention``
            found faster on another kernel than the order's); ``()``: none.
    """

    step: int
    total: int
    loss: float
    lr: float
    epoch: int
    epoch_end: bool
    epochs_done: int
    _save_state: Callable[..., None]
    _averaged: Callable[[], contextlib.AbstractContextManager]
    sdpa_backends: tuple[str, ...] | None = None
    max_norm: dict[str, float] | None = None
    _use_weights: Callable[[], None] = lambda: None
    validation_loss: float | None = None
    validated: tuple[str, ...] = ()
    ema_updates: int = 0
    batch_losses: tuple[float, ...] = ()
    sdpa_backends_per_call: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def save_state(self, folder: str | os.PathLike, *, stage: StagedOutputs | None = None) -> None:
        """Write the resumable training state (weights, optimiser, RNG, EMA, step) into ``folder``
        (a schedule-free optimiser's in eval mode, as kohya saves it: :meth:`use_weights`); ``stage``: the caller's
        :func:`~sdadapt.formats.files.staged_outputs` block, which more files of the state join."""
        self._use_weights()
        self._save_state(Path(folder), stage=stage)

    def averaged(self) -> contextlib.AbstractContextManager:
        """Within the block the adaptation holds its EMA weights (no-op without EMA) — a schedule-free
        optimiser's eval-mode weights (:meth:`use_weights`): save files here."""
        self._use_weights()
        return self._averaged()

    def use_weights(self) -> None:
        """Put the weights to use into the trained parameters: with a schedule-free optimiser
        (``adamw-schedulefree``, ``sgd-schedulefree``) its eval-mode average ``x`` (``optimizer.eval()``; ``fit`` calls
        ``train()`` again before the next step); nothing for the others. Call it before sampling or
        reading the weights in ``on_step``; :meth:`save_state` and :meth:`averaged` call it."""
        self._use_weights()


def _text_encoder_index(system: System, *, second: bool) -> dict[int, int]:
    """``id(parameter) -> 1`` for the parameters in ``system.text_encoder`` and ``-> 2`` (``second``:
    the second encoder trains at its own LR) or ``-> 1`` for those in ``system.text_encoder_2``."""
    return {id(p): 2 if second and name == "text_encoder_2" else 1
            for name, module in text_encoders(system) for p in module.parameters()}


def _index_on(index: Tensor, data: Tensor) -> Tensor:
    """A host ``index`` (B,) int64 on ``data``'s device, copied without making the host wait
    (:func:`~sdadapt.training.host_syncs.copy_to_device`), for ``data[index]``."""
    return copy_to_device(index, data.device)


def _mean_loss(micro_losses: list[Tensor]) -> float:
    """The mean of an optimiser step's micro-batch losses (each 0-dim, on the device) after ONE
    device → host read, summed in order as Python floats (bit for bit what one ``float()`` per
    micro-batch gave). No float64 tensor is made on the device: MPS has none."""
    return _read_step(micro_losses, {})[0]


def _read_step(micro_losses: list[Tensor], stats: Mapping[str, Tensor]
               ) -> tuple[float, dict[str, float], tuple[float, ...]]:
    """:func:`_mean_loss` of ``micro_losses``, the values of ``stats`` (0-dim tensors on the same
    device, e.g. the max-norm statistics) and each micro-batch's loss, all read in the one device →
    host read of the step."""
    if not stats:  # (the usual step: the losses alone, no extra list or dict made)
        values = torch.stack(micro_losses).tolist()
    else:
        values = torch.stack([*micro_losses, *(v.to(micro_losses[0].dtype) for v in stats.values())]).tolist()
    total = 0.0
    for value in values[:len(micro_losses)]:
        total += value
    return (total / len(micro_losses), dict(zip(stats, values[len(micro_losses):])) if stats else {},
            tuple(values[:len(micro_losses)]))


def _take(tree: Any, rows: Tensor) -> Any:
    """``tree[rows]`` for a tensor or each tensor of a dict (ids, or cached conditioning)."""
    return pytree.tree_map(lambda t: t[rows], tree)


def _cat(first: Any, second: Any) -> Any:
    """Two batches of a tensor (or of each tensor of a dict) joined along the batch."""
    return pytree.tree_map(lambda a, b: torch.cat([a, b]), first, second)


def _first_leaf(tree: Any) -> Tensor:
    return pytree.tree_leaves(tree)[0]


def _device_of(tree: Any) -> torch.device:
    return _first_leaf(tree).device


def _own_text_path(adaptation: Any) -> list[str]:
    """The adaptation's own ``tokenize`` / ``training_model`` (a text path it runs itself, which the
    cached or weighted conditioning cannot reach)."""
    return [name for name in ("tokenize", "training_model") if getattr(adaptation, name, None) is not None]


def _text_cache(system: System, adaptation: Any, trained: list[nn.Parameter], step_config: StepConfig, *,
                batch_size: int, dataset: Any, reg: Any, captions: list[str] | None, prior: Any,
                validation: Any = None, files: Any = None) -> Any:
    """``FitConfig.cache_text_encoder_outputs``: the conditioning of every caption the run can draw
    (:func:`~sdadapt.training.text_cache.cache_text_conditions`), after refusing what would make
    it differ from the text encoder's output at the step.

    Raises:
        ValueError: the text conditioning trains (adapters or embeddings in the text path, the
            adaptation's own ``tokenize`` / ``training_model``), the text encoder draws dropout, or
            a caption changes at each use (:func:`~sdadapt.training.text_cache.caption_variants`).
    """
    from ..training.text_cache import cache_text_conditions, conditioning_depends_on

    what = "cache_text_encoder_outputs (--cache-text-encoder-outputs) encodes each caption once before training"
    own = _own_text_path(adaptation)
    if own:
        raise ValueError(f"{what}, but this method conditions through its own {' and '.join(own)} (it trains token "
                         "embeddings or guides with them), so its conditioning changes as it trains; train without caching")
    in_text = _text_encoder_index(system, second=False)
    training = sum(1 for p in trained if id(p) in in_text)
    if training:
        raise ValueError(f"{what}, but {training} trained parameter tensors are in the text encoder(s) (kohya: 'network "
                         "for Text Encoder cannot be trained with caching Text Encoder outputs'); train the UNet only "
                         "(--no-text-encoder, kohya's network_train_unet_only, or text_encoder_lr=0) or do not cache")
    drawing = [name for _, module in text_encoders(system) for name in _dropout_modules(module)]
    if drawing:
        raise ValueError(f"{what}, but the text encoder draws dropout at each use ({', '.join(drawing[:3])}): put it in "
                         "eval mode or set its dropout to 0, or do not cache")
    if dataset is None:
        texts = [*(captions or []), *(prior[1] if prior is not None else []),
                 *(validation[1] if validation is not None else [])]  # (the held-out captions too)
    else:
        texts = [variant for data in (dataset, reg, validation) if data is not None for record in data.records
                 for variant in _record_variants(record, data)]
        if prior is not None and reg is None:
            texts += list(prior[1])
    if conditioning_depends_on(system.condition, system.tokenize(texts[:1]), trained):
        raise ValueError(f"{what}, but the text conditioning depends on trained parameters (an adapter or embedding "
                         "in the text path); train without caching")
    def encode(captions: list[str]) -> Any:
        return cache_text_conditions(system, captions, batch=batch_size, mixed_precision=step_config.mixed_precision,
                                     sdpa_backends=step_config.sdpa_backends, per_image_sizes=dataset is not None)

    if files is not None and dataset is not None:  # kohya's cache_text_encoder_outputs_to_disk: one file per image
        entries = [(record.path, _record_variants(record, data)[0])
                   for data in (dataset, reg, validation) if data is not None for record in data.records
                   if record.path is not None]
        return files(encode, entries, texts)
    return encode(texts)


def _record_variants(record: Any, data: Any) -> tuple[str, ...]:
    """:func:`~sdadapt.training.text_cache.caption_variants` of one record under its options, a trigger template
    around them as :meth:`~sdadapt.training.data.ImageRecord.draw_caption` puts it."""
    from ..training.text_cache import caption_variants

    options = data.captions if record.captions is None else record.captions
    if record.wrapped is None:
        return caption_variants(record.caption, options)
    before, own, after = record.wrapped
    return tuple(before + text + after if text else "" for text in caption_variants(own, options))


def _condition_batch(system: System, ids: Tensor | dict[str, Tensor], sizes: Tensor | None) -> Any:
    """What the step's ``system.condition`` reads: ``ids`` (or weighted ids ``{"ids", "weights"}``),
    with a size-conditioned system's ``time_ids``."""
    if sizes is not None and getattr(system, "size_conditioning", False):
        return {**ids, "time_ids": sizes} if isinstance(ids, dict) else {"ids": ids, "time_ids": sizes}
    return ids


def _weighted_tokenizer(system: System, adaptation: Any, dataset: Any) -> Callable[[list[str]], dict[str, Tensor]]:
    """``FitConfig.weighted_captions``: the system's ``tokenize_weighted``, after refusing what cannot use it."""
    if dataset is None:
        raise ValueError("weighted_captions (--weighted-captions) reads the captions of a Dataset drawn at each use; "
                         "pass a sdadapt.training.data.Dataset, not image tensors")
    own = _own_text_path(adaptation)
    if own:
        raise ValueError(f"weighted_captions (--weighted-captions): this method encodes its captions itself "
                         f"({' and '.join(own)}), so the token weights cannot reach its text states; leave it off")
    weighted = getattr(system, "tokenize_weighted", None)
    if weighted is None:
        raise ValueError(f"weighted_captions (--weighted-captions) needs a CLIP-conditioned model (a Stable Diffusion "
                         f"folder or file); {type(system).__name__} has no tokenize_weighted")
    return weighted


def _follow_model(params: list[nn.Parameter], device: torch.device) -> None:
    """Move each of ``params`` that is not on ``device`` there, in place (``.data``: the same
    parameter objects, so an adaptation's lists stay valid); its gradient is dropped."""
    for param in params:
        if param.device != device:
            param.grad = None
            param.data = param.data.to(device)


def fit(
    system: System,
    adaptation: Adaptation,
    images: Tensor | Any,
    captions: list[str] | None = None,
    *,
    config: FitConfig,
    prior: tuple[Tensor, list[str], float] | tuple[Any, float] | None = None,
    callback: Callable[[int, int, float], None] | None = None,
    on_step: Callable[[FitProgress], None] | None = None,
    resume: str | os.PathLike | None = None,
    validation: Any = None,
) -> list[float]:
    """Train ``adaptation.params`` on ``images`` with their ``captions``.

    Args:
        images: (N, 3, H, W) in [-1, 1] (with ``captions``), or a
            :class:`~sdadapt.training.data.Dataset` whose latents are encoded
            (:func:`~sdadapt.training.data.encode_buckets`). A dataset's pixel augmentations
            (``dataset.augment``) are drawn at each use, last Custom Diffusion's ``resize_aug``
            (:func:`~sdadapt.training.pixel_augment.draw_resize`): each use rescaled, its caption prefixed
            (an empty one kept empty) and its loss the mean over the image's latent region only
            (:func:`~sdadapt.training.diffusion.region_loss_mask`).
        prior: DreamBooth prior preservation: ``(class_images, class_captions, weight)``, loss
            ``instance + weight · class`` (DreamBooth's formulation, diffusers' ``train_dreambooth.py``): with tensors
            each step joins as many class samples as instance samples into one forward (per-sample weights 2 and
            2·weight over the 2B samples: that mean); with a dataset the class batch runs as a second forward. Or ``(reg_dataset, weight)``
            with ``images`` a dataset: a :class:`~sdadapt.training.data.Dataset` of the user's
            class images (kohya's ``--reg_data_dir``, :mod:`sdadapt.training.reg_data`; latents
            encoded), drawn bucket by bucket in epochs of its own, one class batch per micro-batch.
        callback: ``callback(step, total, loss)`` after each step (the CLI draws a bar with it).
        on_step: ``on_step(FitProgress)`` after each step (logs, samples, periodic saves).
        resume: a folder :meth:`FitProgress.save_state` wrote: weights, optimiser, RNG and EMA
            are restored and training continues at its step (the data order continues too).
        validation: held-out data whose validation loss :attr:`FitProgress.validation_loss` reports
            (``FitConfig.validate_every_n_*``; :mod:`sdadapt.training.validation`): with a dataset as
            ``images``, a :class:`~sdadapt.training.data.Dataset` of the held-out images, latents
            encoded (:func:`~sdadapt.training.validation.split_for_validation` draws kohya's
            ``validation_split``), batched by bucket as one epoch drawn from the validation seed,
            repeats not applied (give its records ``repeats=1``), its captions drawn the same each pass
            under the caption schedule (token warm-up, every-n-epochs dropout) of the step just
            trained, as kohya's validation dataset; with image tensors, ``(images
            (M, 3, H, W), captions)``, batched in order. Nothing of it trains.

    Modes: during the steps what trains is in training mode — each largest module of the system's
    ``unet`` and text encoders (or of the adaptation, when an ``nn.Module``) all of whose parameters
    train: an adapter (kohya's ``network.train()``), a hypernetwork (A1111's), a whole fine-tuned
    model (kohya's ``train_db.py`` / ``fine_tune.py``, diffusers' ``unet.train()``) — and the rest of
    those models in eval mode (kohya's ``.eval()`` of the frozen base); a text encoder whose training
    stops (``text_encoder_steps``) goes to eval mode then (kohya's ``train_db.py``). Set again at each
    step (an ``on_step`` sample may switch them); every module's own mode is restored when ``fit`` returns.

    Data parallel: called on every rank inside an initialised default process group of more than one
    process (torchrun; :mod:`sdadapt.training.data_parallel`), ``config.batch_size`` is the *global*
    batch: every rank draws it (same data order, noise and timesteps), trains on its own rows, and the
    gradients are averaged over the ranks before clipping and the optimiser step — the steps of one
    process with that batch. Rank 0's starting weights are broadcast first; the losses are the mean
    over the ranks. The validation pass is sharded the same way (each rank runs the model on its rows
    of every held-out batch; one all-reduce at the end of the pass), and a dataset's per-step pixel
    augmentation is VAE-encoded for the rank's rows only (``system.encode_images`` must treat rows
    independently, as a VAE's posterior mean does). Not with ``cuda_graph`` or ``fused_backward`` (ValueError).

    Devices: a trained parameter off the model's device is moved there first, in place (the same
    ``nn.Parameter``): an adaptation made before ``system.to(device)`` trains where the model runs.
    Textual-inversion rows (also DreamArtist's and Custom Diffusion's) live in hooks beside the text
    encoder, outside the module tree ``to`` moves; left on the CPU, each step would update them there
    and a ``cuda_graph`` run could not capture.

    Returns:
        the loss of every step run (floats; one host read per optimiser step: docs/training.md#host-syncs).

    Raises:
        NonFiniteLossError: a NaN/inf loss with ``config.stop_on_nonfinite``.
        ValueError: empty data, no trainable parameters, or a state that does not fit; ``resize_aug``
            with loss masks or ``cache_text_encoder_outputs``; ``compile_backend`` with DyLoRA layers
            (:data:`~sdadapt.adapters.dylora.DYLORA_COMPILE_REASON`).
        PeerProcessError: data parallel, a collective failed (another rank failed first); its
            ``trained_steps`` is the optimiser steps the weights have taken (the last ``on_step``'s
            step, or one more when the failure came after this step's update).
    """
    from ..training.data import Dataset, epoch_batches, flip_draws, size_conditioning

    dataset = images if isinstance(images, Dataset) else None
    if dataset is None:
        if captions is None or images.ndim != 4 or images.shape[0] != len(captions) or len(captions) == 0:
            raise ValueError(f"need N >= 1 images (N, 3, H, W) and N captions; got {tuple(getattr(images, 'shape', ()))} "
                             f"and {0 if captions is None else len(captions)} captions")
    elif not dataset.latents and not (dataset.augment.active and dataset.members):
        raise ValueError("the dataset has no latents yet: call sdadapt.training.data.encode_buckets(dataset, system.encode_images)")
    elif dataset.flip and not dataset.augment.active and set(dataset.latents_flipped) != set(dataset.latents):
        raise ValueError("dataset.flip is set but the mirrored images' latents are not cached: set it before "
                         "sdadapt.training.data.encode_buckets(dataset, system.encode_images)")
    reg = prior[0] if prior is not None and isinstance(prior[0], Dataset) else None  # the user's class images
    _check_validation_data(validation, dataset)
    for name, data in (("the dataset", dataset), ("the class images' dataset", reg), ("the validation dataset", validation)):
        if isinstance(data, Dataset) and data.augment.resize_aug:
            if data.loss_masks is not None:
                raise ValueError(f"{name}: the resize augmentation (augment.resize_aug, --resize-aug) makes its own loss "
                                 "mask; it cannot be combined with loss masks (loss_masks: --alpha-mask, --masked-loss)")
            if config.cache_text_encoder_outputs:
                raise ValueError(f"{name}: the resize augmentation (augment.resize_aug, --resize-aug) prefixes the "
                                 "captions at each use, so the text-encoder outputs cannot be cached: leave out "
                                 "cache_text_encoder_outputs (--cache-text-encoder-outputs)")
    parallel = data_parallel.active()  # under torchrun: batch_size is the global batch, each rank trains its rows
    dp_clashes = data_parallel.data_parallel_clashes(cuda_graph=config.cuda_graph, fused_backward=config.fused_backward)
    if parallel is not None and dp_clashes:
        raise ValueError(f"data-parallel training ({parallel.world} processes) cannot work with " + "; ".join(dp_clashes))
    if reg is not None and (dataset is None or not (reg.latents or reg.augment.active) or len(prior) != 2):  # type: ignore[arg-type]
        raise ValueError("prior=(reg_dataset, weight) needs a dataset as the images and the class images' latents encoded "
                         "(sdadapt.training.data.encode_buckets(reg_dataset, system.encode_images))")
    params = adaptation.params
    if not params:
        raise ValueError("the adaptation has no trainable parameters")
    if config.compile_backend is not None:
        _refuse_compiled_dylora(system, adaptation, config.compile_backend)
    tokenize = getattr(adaptation, "tokenize", None) or system.tokenize
    # the dataset's captions (kohya's weighted_captions: emphasis read, weights beside the ids)
    tokenize_captions = _weighted_tokenizer(system, adaptation, dataset) if config.weighted_captions else tokenize
    device = system.alphas_cumprod.device
    with torch.no_grad():
        if dataset is None:
            latents = system.encode_images(images)
            ids = tokenize(captions)
            device = latents.device
        if prior is not None and reg is None:
            prior_latents, prior_ids = system.encode_images(prior[0].to(device)), tokenize(prior[1])  # type: ignore[union-attr,index]
        if validation is not None and dataset is None:  # the held-out images: encoded once, as the training ones
            val_latents, val_ids = system.encode_images(validation[0].to(device)), tokenize(list(validation[1]))
    _follow_model(params, device)
    edm_schedule = getattr(system, "edm", None)  # (an EDM model, Playground v2.5: the step's EDM branch, training.edm)
    step_config = config.step_config(edm=edm_schedule is not None)  # (step=None: min-SNR by the formulation)
    # the schedule the steps train on (the system's own ᾱ keeps serving samples and class images)
    alphas_cumprod = (zero_terminal_snr_alphas_cumprod(system.alphas_cumprod) if config.zero_terminal_snr
                      else system.alphas_cumprod)
    prediction_type = getattr(system, "prediction_type", "epsilon")
    if edm_schedule is not None and config.zero_terminal_snr:
        raise ValueError("zero_terminal_snr (--zero-terminal-snr) rescales the DDPM ᾱ schedule; an EDM-formulation model "
                         "(Playground v2.5) trains on its σ grid, which has no such schedule: leave it out")
    if step_config.prediction_type != prediction_type or step_config.edm != edm_schedule:
        # the system's scheduler decides what it predicts, and whether it is an EDM model (ValueError: what has no EDM form)
        step_config = dataclasses.replace(step_config, prediction_type=prediction_type, edm=edm_schedule)
    own = not config.zero_terminal_snr and edm_schedule is None and float(alphas_cumprod[-1]) == 0.0
    clashes = zero_terminal_snr_clashes(step_config) if config.zero_terminal_snr or own else []
    if clashes:  # (a model on that schedule already: a ztsnr checkpoint, a rescale_betas_zero_snr config)
        raise ValueError(("this model's zero-terminal-SNR schedule (its ztsnr marker or rescale_betas_zero_snr "
                          "config)" if own else "zero_terminal_snr (--zero-terminal-snr)") + " cannot train "
                         + "; ".join(clashes))
    accumulation = step_config.accumulation_steps

    # parameter groups: (lr scale, in a text encoder) -> params
    scales = list(getattr(adaptation, "lr_scales", None) or [1.0] * len(params))
    if len(scales) != len(params):
        raise ValueError(f"the adaptation has {len(params)} parameters but {len(scales)} lr_scales")
    text_encoder_steps = config.text_encoder_stop(adaptation)
    if config.text_encoder_2_lr is not None and not isinstance(getattr(system, "text_encoder_2", None), nn.Module):
        raise ValueError(f"text_encoder_2_lr={config.text_encoder_2_lr:g} (--text-encoder-2-lr or the second value of "
                         "--text-encoder-lr, kohya's learning_rate_te2) is the second text encoder's learning rate, but this "
                         "model has one text encoder (SDXL has two); leave it out")
    split = config.text_encoder_lr is not None or config.text_encoder_2_lr is not None or text_encoder_steps is not None
    encoder_of = _text_encoder_index(system, second=config.text_encoder_2_lr is not None) if split else {}
    encoder_lrs = config.encoder_lrs()  # (text_encoder's, text_encoder_2's) base LR; an LR of 0 freezes that encoder
    frozen = [p for p in params if id(p) in encoder_of and encoder_lrs[encoder_of[id(p)] - 1] == 0]
    if config.relative_step:  # Adafactor's own step size ignores the groups' LRs: a factor of 0 freezes instead
        frozen_text = {id(p) for p in frozen}
        frozen += [p for p, scale in zip(params, scales) if float(scale) == 0 and id(p) not in frozen_text]
    frozen_ids = {id(p) for p in frozen}
    # (lr scale, 0: not in a text encoder / 1: text_encoder / 2: text_encoder_2 with its own text_encoder_2_lr) -> params
    groups: dict[tuple[float, int], list[nn.Parameter]] = {}
    for param, scale in zip(params, scales):
        if id(param) in frozen_ids:
            continue
        groups.setdefault((float(scale), encoder_of.get(id(param), 0)), []).append(param)
    if not groups:
        raise ValueError("nothing to train: every parameter has a learning rate of 0 (text_encoder_lr=0 or an lr_scales "
                         "entry of 0)" if config.relative_step else
                         "nothing to train: every parameter is in the text encoder and its learning rate is 0")
    trained = [p for ps in groups.values() for p in ps]
    if parallel is not None:  # rank 0's starting weights everywhere (before the optimiser and EMA copy them)
        data_parallel.broadcast_parameters(trained)
    bases = {key: (encoder_lrs[key[1] - 1] if key[1] and encoder_lrs[key[1] - 1] is not None else config.learning_rate)
             for key in groups}
    layout = [{"params": ps, "lr": bases[key] * key[0], "lr_scale": key[0], "base_lr": bases[key]} for key, ps in groups.items()]
    optimizer: Any
    if config.fused_backward:  # one optimiser per block, hooked into backward just before the loop
        optimizer = _FusedOptimizers(layout, config, _fused_blocks(system, trained))
    else:
        optimizer = make_optimizer(layout, config)
    ema = EMA(trained, decay=config.ema_decay) if config.ema_decay is not None else None
    state = TrainState(seed=config.seed, device=device, ema=ema)
    named = {f"p{i}": p for i, p in enumerate(trained)}
    if resume is not None:
        saved_record = load_training_state(resume, named_params=named, optimizer=optimizer, state=state)
        if state.step >= config.steps:
            raise ValueError(f"{resume}: the saved state is at step {state.step}, which is not before the last step "
                             f"({config.steps}); raise --steps to train further")
    # a dataset's epochs of per_epoch batches (each ends with a short step when accumulation does not divide it:
    # micro_batches_of_step); image tensors have no epochs (0)
    per_epoch = 0 if dataset is None else len(epoch_batches_of(dataset, config))

    def micro_batches(step: int) -> range:  # the micro-batches optimiser step ``step`` (0-based) accumulates
        return micro_batches_of_step(step, accumulation=accumulation, per_epoch=per_epoch)

    if resume is not None:
        _check_resumed_position(resume, state, micro_batches(state.step).start, accumulation=accumulation,
                                per_epoch=per_epoch, saved=saved_record, processes=1 if parallel is None else parallel.world)
    elif config.initial_step:  # kohya's initial_step: the counters start there (the noise generator does not)
        state.step, state.micro_step = config.initial_step, micro_batches(config.initial_step).start
    # kohya's initial_step: the data position of a micro-batch (skipped to it, or from the first batch) and the
    # LR schedule's step (from its beginning)
    data_offset = 0 if config.skip_until_initial_step else micro_batches(config.initial_step).start
    schedule_offset = config.initial_step

    extra_loss = getattr(adaptation, "extra_loss", None)
    make_model = getattr(adaptation, "training_model", None)
    text_cache = None  # kohya's cache_text_encoder_outputs: every caption encoded once, here
    if config.cache_text_encoder_outputs:
        text_cache = _text_cache(system, adaptation, trained, step_config, batch_size=config.batch_size, dataset=dataset,
                                 reg=reg, captions=captions, prior=prior, validation=validation,
                                 files=config.text_encoder_outputs_files)
        if dataset is None:  # the N captions' conditioning on the device, indexed as the ids were
            ids = text_cache.lookup(captions, device)  # type: ignore[arg-type]
            if prior is not None:
                prior_ids = text_cache.lookup(prior[1], device)  # type: ignore[index]
            if validation is not None:
                val_ids = text_cache.lookup(list(validation[1]), device)
    if make_model is not None:
        model = make_model(system)
    elif text_cache is not None:  # the batches carry the cached conditioning itself
        model = system.denoiser()
    else:
        denoiser = system.denoiser()

        def model(x: Tensor, t: Tensor, token_ids: Any) -> Tensor:
            return denoiser(x, t, system.condition(token_ids))

    # ------------------------------------------------------------------ batches
    if dataset is None:
        g = torch.Generator().manual_seed(config.seed + 1)

        # the prior's per-sample loss weights are the same every step: made once, on the device. 2 and 2·w over the
        # 2B samples of the joined batch: mean = instance + w · class, DreamBooth's loss — the dataset path's (its
        # class batch a second forward), diffusers' train_dreambooth.py (chunked, then instance + w · prior)
        prior_weights = None if prior is None else torch.cat([
            torch.full((config.batch_size,), 2.0, device=latents.device),
            torch.full((config.batch_size,), 2.0 * float(prior[2]), device=latents.device)])

        def batch_of(idx: Tensor, pidx: Tensor | None) -> dict[str, Any]:
            """The batch of the images ``idx`` (B,) and, with a prior, the class images ``pidx`` (B,)
            (host index tensors: copied to the data's device without making the host wait)."""
            rows = _index_on(idx, latents)
            id_rows = rows if _device_of(ids) == latents.device else _index_on(idx, _first_leaf(ids))
            if pidx is None or prior is None:
                return {"latents": latents[rows], "cond": _take(ids, id_rows)}
            prior_rows = _index_on(pidx, prior_latents)
            prior_id_rows = (prior_rows if _device_of(prior_ids) == prior_latents.device
                             else _index_on(pidx, _first_leaf(prior_ids)))
            return {
                "latents": torch.cat([latents[rows], prior_latents[prior_rows]]),
                "cond": _cat(_take(ids, id_rows), _take(prior_ids, prior_id_rows)),
                "loss_weight": prior_weights,
            }

        def draw(micro: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
            """Micro-batch ``micro``: the batch (class images concatenated into it) and no separate prior batch."""
            idx = torch.randint(len(captions), (config.batch_size,), generator=g)  # type: ignore[arg-type]
            pidx = torch.randint(len(prior[1]), (config.batch_size,), generator=g) if prior is not None else None
            return batch_of(idx, pidx), None

        for _ in range(micro_batches(state.step).start - data_offset):  # a resumed run continues the same draws
            draw(0)

        def first_batch() -> dict[str, Any]:  # draw()'s layout (with the prior rows) without advancing its generator
            rows = torch.arange(config.batch_size)
            return batch_of(rows % len(captions), None if prior is None else rows % len(prior[1]))  # type: ignore[arg-type]
    else:
        epoch_cache: dict[int, list] = {}
        prior_sizes = None
        if prior is not None and reg is None and getattr(system, "size_conditioning", False):
            h, w = prior[0].shape[-2:]  # type: ignore[union-attr]
            prior_sizes = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).expand(len(prior[1]), 6)  # type: ignore[arg-type]
        # the user's class images (--reg-data-dir): epochs of their own, on their own streams (seed + 1)
        reg_seed = config.seed + 1
        reg_per_epoch = len(epoch_batches(reg, config.batch_size, seed=reg_seed, epoch=0)) if reg is not None else 0
        reg_cache: dict[int, list] = {}
        # SDXL's size conditioning, built per batch only where something reads it (no host tensor otherwise)
        sized = (getattr(system, "size_conditioning", False) if text_cache is None
                 else text_cache.time_ids_dtype is not None)

        def dataset_batch(data: Dataset, cache: dict[int, list], micro: int, *, batches: int, seed: int,
                          schedule_at: int | None = None) -> dict[str, Any]:
            """Batch ``micro`` of ``data`` (its epochs of ``batches`` batches drawn from ``seed``): latents and
            conditioning, captions (and flips) drawn as a pure function of ``seed`` and ``micro``; the caption
            schedule (epoch, step) that of training micro-batch ``schedule_at`` (default ``micro``)."""
            epoch, position = divmod(micro, batches)
            at = micro if schedule_at is None else schedule_at
            if epoch not in cache:
                cache.clear()
                cache[epoch] = epoch_batches(data, config.batch_size, seed=seed, epoch=epoch)
            bucket, positions = cache[epoch][position]
            members = data.members[bucket]
            records = [data.records[members[p]] for p in positions]
            rng = random.Random(f"{seed}/captions/{micro}")
            # the training epoch (class images too, as kohya's one dataset) and optimiser step: kohya's
            # caption_dropout_every_n_epochs and token_warmup_step
            texts = [r.draw_caption(  # (a record's own options: a dataset TOML subset's)
                data.captions if r.captions is None else r.captions, rng, epoch=at // per_epoch,
                step=step_of_micro_batch(at, accumulation=accumulation, per_epoch=per_epoch)) for r in records]
            # kohya's flip_aug: a seeded coin per image (its own stream; a resumed run draws the same)
            flips = flip_draws(seed, micro, len(positions)) if data.flip else [False] * len(positions)
            crops = [r.crop for r in records]
            mask = None
            if data.augment.active:  # random crop / colour: these pixels, encoded now (nothing cached)
                pixel_rng = random.Random(f"{seed}/pixels/{micro}")
                pixels, crops = data.pixel_batch(records, flips, pixel_rng)
                resized = None
                if data.augment.resize_aug:  # Custom Diffusion's: rescaled, padded or cut (after the mirror, as diffusers)
                    resized = [draw_resize(tuple(image.shape[-2:]), pixel_rng) for image in pixels]
                    pixels = torch.stack([resize_pixels(image, d) for image, d in zip(pixels, resized, strict=True)])
                    texts = [d.prefix + text if text else text for d, text in zip(resized, texts, strict=True)]
                with torch.no_grad():
                    latents = _encode_rows(system.encode_images, copy_to_device(pixels, device), parallel)
                if data.loss_masks is not None:  # kohya's masked loss: cropped and mirrored as these pixels
                    mask = data.pixel_masks(records, crops, flips, tuple(latents.shape[-2:]))
                if resized is not None:  # the loss: each sample's mean over its image's latent region
                    mask = region_loss_mask(torch.stack([resize_mask(d, tuple(latents.shape[-2:])) for d in resized]))
            else:  # host-made tensors (the cached latents are on the host) reach the device without a wait
                latents = copy_to_device(data.batch_latents(bucket, positions, flips), device)
                if data.loss_masks is not None:
                    mask = data.batch_masks(bucket, positions, flips)
            sizes = None
            if sized:
                sizes = copy_to_device(torch.tensor([size_conditioning(r, flipped=f, crop=c) for r, f, c in zip(records, flips, crops)],
                                                    dtype=torch.float32), device)
            cond = (_condition_batch(system, tokenize_captions(texts), sizes) if text_cache is None
                    else text_cache.lookup(texts, device, time_ids=sizes))
            out = {"latents": latents, "cond": cond}
            if mask is not None:
                out["loss_mask"] = copy_to_device(mask, device)
            return out

        def draw(micro: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
            """Micro-batch ``micro``: the batch, and with a prior the class batch (a second forward)."""
            batch = dataset_batch(dataset, epoch_cache, micro, batches=per_epoch, seed=config.seed)
            positions = batch["latents"].shape[0]
            prior_batch = None
            if reg is not None:
                prior_batch = dataset_batch(reg, reg_cache, micro, batches=reg_per_epoch, seed=reg_seed)
            elif prior is not None:
                pick = random.Random(f"{config.seed}/prior/{micro}")
                picks = [pick.randrange(len(prior[1])) for _ in range(positions)]  # type: ignore[arg-type]
                pidx = torch.tensor(picks)
                prior_rows = _index_on(pidx, prior_latents)
                prior_id_rows = prior_rows if prior_ids.device == prior_latents.device else _index_on(pidx, prior_ids)
                prior_sizes_used = None if prior_sizes is None else prior_sizes[prior_rows]
                prior_batch = {"latents": prior_latents[prior_rows],
                               "cond": _condition_batch(system, prior_ids[prior_id_rows], prior_sizes_used)
                               if text_cache is None else
                               text_cache.lookup([prior[1][i] for i in picks], device,  # type: ignore[index]
                                                 time_ids=prior_sizes_used if text_cache.time_ids_dtype is not None else None)}
            return batch, prior_batch

        def first_batch() -> dict[str, Any]:
            return draw(micro_batches(state.step).start - data_offset)[0]  # a dataset's draws depend only on the position

    validate: Callable[[int], float] | None = None  # the validation pass after a step (FitConfig.validate_every_n_*)
    if validation is not None:
        from ..training.step import timestep_bounds
        from ..training.validation import eval_mode, validation_loss, validation_timesteps

        val_seed = config.seed if config.validation_seed is None else config.validation_seed
        # (the training draws' bounds: an EDM model's σ-grid indices for kohya's range, training.edm.edm_index_range)
        val_timesteps = validation_timesteps(*timestep_bounds(step_config, alphas_cumprod.shape[0]))
        if dataset is None:
            starts = list(range(0, val_latents.shape[0], config.batch_size))[:config.max_validation_steps]

            def validation_batches(step: int) -> Iterator[dict[str, Any]]:
                for start in starts:
                    rows = slice(start, start + config.batch_size)
                    yield {"latents": val_latents[rows], "cond": pytree.tree_map(lambda t, rows=rows: t[rows], val_ids)}
        else:
            val_cache: dict[int, list] = {0: epoch_batches(validation, config.batch_size, seed=val_seed, epoch=0)}
            val_count = len(val_cache[0])  # (the one epoch every pass reads: drawn once, here)
            val_count = min(val_count, config.max_validation_steps or val_count)

            def validation_batches(step: int) -> Iterator[dict[str, Any]]:  # one epoch of the held-out data, always the same
                # the captions (their draws the same each pass) under the caption schedule of the step just
                # trained, as kohya's validation dataset: its token warm-up and caption_dropout_every_n_epochs
                last_micro = micro_batches(step).stop - 1
                for index in range(val_count):
                    yield dataset_batch(validation, val_cache, index, batches=val_count, seed=val_seed,
                                        schedule_at=last_micro)
        in_eval = [system] if isinstance(system, nn.Module) else [m for _, m in system_models(system)]
        if isinstance(adaptation, nn.Module):
            in_eval.append(adaptation)

        def validate(step: int) -> float:
            """The validation pass after (0-based) optimiser step ``step``."""
            use_weights()  # (a schedule-free optimiser's averaged weights, as kohya's optimizer_eval_fn)
            devices = [] if device.type == "cpu" else [device.index or 0]
            rows = None if parallel is None else functools.partial(data_parallel.shard_prepared, group=parallel)
            with torch.random.fork_rng(devices=devices, device_type=device.type), eval_mode(in_eval):
                loss = validation_loss(model, validation_batches(step), config=step_config, alphas_cumprod=alphas_cumprod,
                                       timesteps=val_timesteps, seed=val_seed, shard=rows)
            if parallel is not None:  # each rank scored its rows of every batch: one all-reduce of the pass's losses
                loss = data_parallel.mean_over_ranks([loss], parallel)[0]
            return float(loss)  # (the pass's one host read)

    @contextlib.contextmanager
    def averaged() -> Iterator[None]:
        if ema is None:
            yield
            return
        backup = [p.detach().clone() for p in trained]
        ema.copy_to(trained)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(trained, backup):
                    p.copy_(b)

    def save_state(folder: Path, *, stage: StagedOutputs | None = None) -> None:
        save_training_state(folder, named_params=named, optimizer=optimizer, state=state, config=step_config,
                            extra={"batches_per_epoch": per_epoch,  # (what a resume's position check compares,
                                   "processes": 1 if parallel is None else parallel.world},  # and names as its cause)
                            stage=stage)

    switched: list[bool] = [False]  # (data parallel: whether this rank switched to the averaged weights since the step)

    def use_weights() -> None:  # a schedule-free optimiser's averaged weights x: its eval mode (kohya's optimizer_eval_fn)
        if config.schedule_free:  # (signals held: a Ctrl-C mid-switch would save a mix of x and y)
            switched[0] = True
            switch_mode(optimizer, train=False)

    for p in frozen:
        p.requires_grad_(False)
    if config.measure_attention:
        order, per_call = _fastest_attention(model, first_batch(), step_config, alphas_cumprod, device)
        step_config = dataclasses.replace(step_config, sdpa_backends=order, sdpa_backends_per_call=per_call)
    if config.compile_backend is not None:  # (draw()'s prior loss and the captured step call this one)
        model = compiled_model(model, backend=config.compile_backend,
                               device_type=(trained[0].device if trained else device).type)
    # co-trained text encoder: its parameters stop at step text_encoder_steps (kohya's --stop_text_encoder_training)
    stopping = [p for p in trained if id(p) in encoder_of] if text_encoder_steps is not None else []
    stopped: list[nn.Parameter] = []
    if stopping and len(stopping) == len(trained) and text_encoder_steps < config.steps:  # type: ignore[operator]
        raise ValueError(f"text_encoder_steps={text_encoder_steps} would stop every trained parameter (all are in "
                         f"the text encoder) before step {config.steps}; leave it out or train more than the text encoder")
    after_update = _max_norm_pass(system, trained, config.scale_weight_norms)  # None without scale_weight_norms
    losses: list[float] = []
    checkpointed: dict[nn.Module, bool] = {}  # checkpointed block -> its mode before
    undo: list[Callable[[], None]] = []
    caller_modes: dict[nn.Module, bool] = {}  # every submodule of the models -> its mode before fit
    try:
        run_modes = _run_modes(system, adaptation, trained, caller_modes)
        for module, mode in run_modes:
            module.training = mode
        stepper: Any = optimizer
        if config.fused_backward:
            stepper = optimizer.fuse(trained)
            undo.append(stepper.remove)
        if config.gradient_checkpointing:
            handle = _checkpoint_unet(system, config.gradient_checkpointing_fraction)
            undo.append(handle.remove)
            checkpointed = {module: module.training for module in handle.modules.values()}
        captured = None
        if config.cuda_graph:
            from ..training.step_capture import CapturedStep

            drawing = _dropout_modules(system.unet) if checkpointed else []  # (checkpointing needs system.unet)
            if drawing:
                raise ValueError(
                    f"cuda_graph with gradient_checkpointing cannot replay the dropout of {', '.join(drawing[:3])}"
                    f"{f' and {len(drawing) - 3} more' if len(drawing) > 3 else ''}: inside a graph the recompute draws "
                    "other masks than the forward did (wrong gradients); set the adapters' dropout, rank_dropout and "
                    "module_dropout to 0, or train without one of the two")

            captured = CapturedStep(model, params=trained, optimizer=optimizer, config=step_config,
                                    alphas_cumprod=alphas_cumprod, extra_loss=extra_loss,
                                    strict=trained[0].device.type == "cuda",  # elsewhere: eager steps
                                    after_update=after_update)
        # the fp16 loss scaler's skipped steps (a resumed state's too): the LR schedule counts the optimiser steps
        # taken, as accelerate's scheduler (kohya's) does not step after a skipped one; read with each step's loss
        skipped = int(state.skipped_steps)
        parallel_step: dict[str, Any] = {} if parallel is None else {  # this rank's rows; gradients averaged over ranks
            "shard": functools.partial(data_parallel.shard_prepared, group=parallel),
            "before_update": functools.partial(data_parallel.average_gradients, trained, parallel)}
        if config.torch_schedule is not None and not config.schedule_free:  # every group's curve now: an imported
            for group in optimizer.param_groups:  # class that fails or moves the momentum stops the run before a step
                own = group["base_lr"] * group["lr_scale"]
                if own != 0:
                    config.lr_at(max(config.steps - 1 - skipped - schedule_offset, 0), own)
        cycled_momentum = None  # (OneCycleLR's β1, a function of the schedule's step, as its LR)
        if config.torch_schedule is not None and config.torch_schedule.cycles_momentum and not config.schedule_free:
            cycled_momentum = config.torch_schedule.momentum
        for step in range(state.step, config.steps):
            position = step - schedule_offset - skipped  # (the LR schedule's step)
            if stopping and not stopped and step >= text_encoder_steps:  # type: ignore[operator]
                for p in stopping:
                    p.requires_grad_(False)
                    p.grad = None
                stopped = stopping
                if captured is not None:  # the graphs' backward still computes their gradients
                    captured.reset()
                stopped_ids = {id(p) for p in stopped}  # (kohya's train_db.py: text_encoder.train(False) at the stop)
                run_modes = _run_modes(system, adaptation, [p for p in trained if id(p) not in stopped_ids], {})
            for module, mode in run_modes:  # (an on_step sample may have switched them)
                module.training = mode
            for module in checkpointed:  # only the wrappers: what runs inside keeps its mode (an on_step sample may call eval())
                module.training = True
            if config.schedule_free:  # the weights gradients are taken at (y); a no-op when in train mode already
                switch_mode(optimizer, train=True)
            for group in optimizer.param_groups:
                if config.torch_schedule is None:
                    lr = config.lr_at(position, group["base_lr"]) * group["lr_scale"]
                else:  # torch's schedules start from each group's own LR; a group whose LR is 0 stays frozen
                    # (kohya leaves it out of the optimiser, so OneCycleLR's max_lr never reaches it)
                    own = group["base_lr"] * group["lr_scale"]
                    lr = config.lr_at(position, own) if own != 0 else 0.0
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)  # in place: a captured graph reads this tensor
                else:
                    group["lr"] = lr
                if cycled_momentum is not None:
                    _set_momentum(group, cycled_momentum(position), config.optimizer)
            micro_losses: list[Tensor] = []
            micros = micro_batches(step)
            # train_step / CapturedStep step the optimiser when their count reaches a multiple of accumulation: a
            # short step (an epoch's last, fewer batches) starts its count that many batches later, so it steps
            # after its last batch (each batch's loss still divided by accumulation, as accelerate's backward)
            state.micro_step = (step + 1) * accumulation - len(micros)
            for micro in micros:
                batch, prior_batch = draw(micro - data_offset)
                class_batch = None if prior_batch is None else (prior_batch, float(prior[-1]))  # type: ignore[index]
                if captured is not None:
                    metrics = captured(batch, state=state, prior=class_batch)
                else:
                    metrics = train_step(model, batch, params=trained, optimizer=stepper, state=state, config=step_config,
                                         alphas_cumprod=alphas_cumprod, extra_loss=extra_loss, prior=class_batch,
                                         after_update=after_update, **parallel_step)
                micro_losses.append(metrics["loss"])
            state.micro_step = micros.stop  # (the batches seen: what a saved state records)
            stats = {k: metrics[k] for k in _MAX_NORM_STATS} if after_update is not None else {}
            if isinstance(state.skipped_steps, Tensor):  # (an fp16 scaler ran: its count comes with the read)
                stats = {**stats, "skipped_steps": state.skipped_steps}
            if parallel is not None:  # the loss reported: the mean over the ranks (one all-reduce, at this read)
                micro_losses = data_parallel.mean_over_ranks(micro_losses, parallel)
            # the one host read per optimiser step (callbacks, NaN check, result; the max-norm statistics with it)
            loss, read, batch_losses = _read_step(micro_losses, stats)
            skipped = int(read.pop("skipped_steps", skipped))
            losses.append(loss)
            if not math.isfinite(loss) and config.stop_on_nonfinite:
                raise NonFiniteLossError(step + 1, loss)
            validated = _validation_due(config, step + 1, accumulation, per_epoch) if validate is not None else ()
            validation_value = validate(step) if validate is not None and validated else None
            if callback is not None:
                callback(step + 1, config.steps, loss)
            if on_step is not None:
                epoch = (micros.stop - 1) // per_epoch + 1 if per_epoch else 1
                on_step(FitProgress(step + 1, config.steps, loss, config.lr_at(position, config.learning_rate), epoch,
                                    bool(per_epoch) and micros.stop % per_epoch == 0,
                                    micros.stop // per_epoch if per_epoch else 0, save_state, averaged,
                                    step_config.sdpa_backends,
                                    {**read, "keys_scaled": int(read["keys_scaled"])} if read else None,
                                    use_weights, validation_value, validated, ema.updates if ema is not None else 0,
                                    batch_losses=batch_losses,
                                    sdpa_backends_per_call=step_config.sdpa_backends_per_call or ()))
            if parallel is not None and config.schedule_free:  # rank 0 alone may have used its averaged weights
                # (saves, samples): back in train mode its y is rounded once more, so every rank takes rank 0's y
                switch_mode(optimizer, train=True)
                data_parallel.share_switched_weights(trained, switched, parallel)
        use_weights()  # the adaptation leaves fit with the weights to save
        if ema is not None and config.ema_into_weights:
            ema.copy_to(trained)
    except PeerProcessError as exc:  # (data parallel: another rank failed) which step the weights are at now: the
        # last on_step's when the failure came before this step's update (the gradient all-reduce), one more after it
        exc.trained_steps = int(state.step)  # type: ignore[attr-defined]
        raise
    finally:
        for p in [*frozen, *stopped]:
            p.requires_grad_(True)
        for module, mode in checkpointed.items():
            module.training = mode
        for remove in reversed(undo):
            remove()
        for module, mode in caller_modes.items():
            module.training = mode
    return losses


def _run_modes(system: System, adaptation: Any, trained: list[nn.Parameter],
               before: dict[nn.Module, bool]) -> list[tuple[nn.Module, bool]]:
    """``(module, training)`` for every submodule of the system's models (``unet``, text encoders) and of
    the adaptation (when an ``nn.Module``): training mode throughout each largest module all of whose
    parameters are in ``trained`` — an adapter (kohya's ``network.train()``), a hypernetwork (A1111's
    ``hypernetwork.train()``), a whole fine-tuned model (kohya's ``train_db.py`` / ``fine_tune.py``,
    diffusers' ``unet.train()``) — and eval mode everywhere else (kohya's ``unet.eval()`` /
    ``text_encoder.eval()`` of the frozen base). Each submodule's current mode is added to ``before``
    (the first seen kept)."""
    ids = {id(p) for p in trained}
    roots = [model for _, model in system_models(system)]
    if isinstance(adaptation, nn.Module):
        roots.append(adaptation)
    modes: dict[nn.Module, bool] = {}
    for root in roots:
        for sub in root.modules():
            before.setdefault(sub, sub.training)
            modes.setdefault(sub, False)
    for root in roots:
        for sub in root.modules():  # (parents before their children: a trained subtree is marked whole)
            if modes[sub]:
                continue
            params = list(sub.parameters())
            if params and all(id(p) in ids for p in params):
                for inner in sub.modules():
                    modes[inner] = True
    return list(modes.items())


#: what :func:`~sdadapt.training.max_norm.scale_weight_norms_` reports (``FitProgress.max_norm``)
_MAX_NORM_STATS = ("keys_scaled", "average_key_norm", "max_key_norm")


def _max_norm_pass(system: System, trained: list[nn.Parameter], max_norm: float | None) -> Callable[[], dict[str, Tensor]] | None:
    """``scale_weight_norms`` as the step's ``after_update``: the max-norm pass over the adapters
    that own trained parameters (UNet and text encoders), or ``None`` without ``max_norm``.

    Raises:
        ValueError: no adapter trains, or one is not of the LoRA family (DoRA, full deltas). GLoRA, (IA)³ and norm
            modules are skipped, as LyCORIS' kohya network skips them (``None`` when only they train).
    """
    if max_norm is None:
        return None
    from ..training.max_norm import MAX_NORM_SKIPPED, adapters_in, max_norm_factors, scale_weight_norms_

    roots = [m for _, m in system_models(system)]
    adapters = adapters_in(roots, trained)
    if not adapters:
        raise ValueError("scale_weight_norms (--scale-weight-norms) shrinks LoRA-family adapters (lora, locon, loha, lokr); "
                         "this run trains none")
    adapters = [a for a in adapters if a.family not in MAX_NORM_SKIPPED]  # (LyCORIS' kohya network skips them)
    if not adapters:
        return None
    for adapter in adapters:
        max_norm_factors(adapter)  # refuses DoRA / full deltas before the first step

    def after_update() -> dict[str, Tensor]:
        return scale_weight_norms_(adapters, max_norm)

    return after_update


def _fastest_attention(model: Callable[[Tensor, Tensor, Any], Tensor], batch: dict[str, Any], config: StepConfig,
                       alphas_cumprod: Tensor, device: torch.device
                       ) -> tuple[tuple[str, ...] | None, dict[str, tuple[str, ...]] | None]:
    """The SDPA kernel order and the order of each kind of call
    (:func:`~sdadapt.training.attention.fastest_sdpa_orders`) measured on the attention calls of one
    training forward of ``batch`` (own noise generator, the global RNG forked: the run's draws stay as
    they were). Calls of other shapes (another bucket) run under the order."""
    from ..training.attention import fastest_sdpa_orders, record_attention_calls
    from ..training.step import prepare_batch, step_loss

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        prepared = prepare_batch(batch, state=TrainState(seed=0, device=device), config=config, alphas_cumprod=alphas_cumprod)
        calls = record_attention_calls(lambda: step_loss(model, prepared, config))
        if not calls:  # no attention: nothing to choose
            return config.sdpa_backends, dict(config.sdpa_backends_per_call or ()) or None
        return fastest_sdpa_orders(calls)


def _refuse_compiled_dylora(system: System, adaptation: Any, backend: str) -> None:
    """``compile_backend`` with a DyLoRA layer in the system's models (or the adaptation): a ``ValueError``
    naming the layers and :data:`~sdadapt.adapters.dylora.DYLORA_COMPILE_REASON` (``train --torch-compile``
    refuses it with the same reason)."""
    from ..adapters.dylora import DYLORA_COMPILE_REASON, DyLoRAModule

    roots = [model for _, model in system_models(system)]
    roots += [extra for extra in (system, adaptation) if isinstance(extra, nn.Module)]
    seen: dict[int, str] = {}  # (a module reached from two roots named once)
    for root in roots:
        for name, sub in root.named_modules():
            if isinstance(sub, DyLoRAModule):
                seen.setdefault(id(sub), name)
    found = list(seen.values())
    if found:
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        raise ValueError(f"compile_backend={backend!r} (--torch-compile) with DyLoRA layers ({', '.join(found[:2])}"
                         f"{more}): {DYLORA_COMPILE_REASON}; train DyLoRA with compile_backend=None (no --torch-compile)")


def _checkpoint_unet(system: System, fraction: float = 1.0) -> Any:
    """Gradient checkpointing of ``system.unet``'s blocks (``FitConfig.gradient_checkpointing``), the
    ``fraction`` of them keeping the most activations."""
    from ..training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing

    unet = getattr(system, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"gradient_checkpointing checkpoints system.unet's blocks, but {type(system).__name__} has no "
                         "unet module; leave gradient_checkpointing off")
    return enable_checkpointing(unet, UNET_BLOCKS, fraction=fraction)


def _dropout_modules(module: nn.Module) -> list[str]:
    """The submodules of ``module`` that draw random numbers in a training forward: dropout layers
    with ``p > 0`` in training mode, and adapters with a dropout, rank dropout or module dropout."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            if sub.p > 0 and sub.training:
                found.append(name)
        elif any(isinstance(getattr(sub, attr, None), (int, float)) and not isinstance(getattr(sub, attr), bool)
                 and getattr(sub, attr) > 0 for attr in ("dropout", "rank_dropout", "module_dropout")):
            found.append(name)
    return found


def _fused_blocks(system: System, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """``params`` in the blocks a fused backward steps one after another: those of ``system.unet``
    and the text encoder(s) by :func:`~sdadapt.training.param_groups.parameter_groups_by_module`,
    any other parameter alone."""
    from ..training.param_groups import parameter_groups_by_module

    blocks: list[list[nn.Parameter]] = []
    placed: set[int] = set()
    for _, module in system_models(system):
        for block in parameter_groups_by_module(module, params=params):
            block = [p for p in block if id(p) not in placed]
            placed.update(id(p) for p in block)
            if block:
                blocks.append(block)
    return blocks + [[p] for p in params if id(p) not in placed]


class _FusedOptimizers:
    """The optimisers of a fused backward pass — one per block (split where a block spans two of
    ``layout``'s groups), each :func:`make_optimizer` with its group's options — seen as one:
    ``param_groups`` for the LR schedule, and ``state_dict`` / ``load_state_dict`` in the layout
    that one optimiser over the same groups has, so a saved training state resumes with or without
    ``fused_backward``."""

    def __init__(self, layout: list[dict[str, Any]], config: FitConfig, blocks: list[list[nn.Parameter]]) -> None:
        self.layout = [list(group["params"]) for group in layout]
        where = {id(p): i for i, ps in enumerate(self.layout) for p in ps}
        self.groups: list[list[nn.Parameter]] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        for block in blocks:
            split: dict[int, list[nn.Parameter]] = {}
            for p in block:
                split.setdefault(where[id(p)], []).append(p)
            for i, ps in split.items():
                self.groups.append(ps)
                self.optimizers.append(make_optimizer([{**layout[i], "params": ps}], config))
        # parameter -> (its optimiser, its index there)
        self._slot = {id(p): (k, j) for k, ps in enumerate(self.groups) for j, p in enumerate(ps)}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for optimizer in self.optimizers for g in optimizer.param_groups]

    def fuse(self, params: list[nn.Parameter]) -> Any:
        """Hook the optimisers into backward (:func:`~sdadapt.training.optim.fuse_optimizer_into_backward`)."""
        from ..training.optim import fuse_optimizer_into_backward

        return fuse_optimizer_into_backward(params, lambda ps: self.optimizers[self._slot[id(ps[0])][0]], groups=self.groups)

    def state_dict(self) -> dict[str, Any]:
        owns = [optimizer.state_dict() for optimizer in self.optimizers]
        state: dict[int, Any] = {}
        groups = []
        index = 0
        for ps in self.layout:
            for p in ps:
                k, j = self._slot[id(p)]
                if j in owns[k]["state"]:
                    state[index] = owns[k]["state"][j]
                index += 1
            options = owns[self._slot[id(ps[0])][0]]["param_groups"][0]
            groups.append({**options, "params": list(range(index - len(ps), index))})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(ps) for ps in self.layout]:
            raise ValueError(f"the saved optimiser has groups of {[len(g['params']) for g in saved]} parameters, this run "
                             f"{[len(ps) for ps in self.layout]}; resume with the same method and options")
        index_of = {id(p): index for group, ps in zip(saved, self.layout) for index, p in zip(group["params"], ps)}
        group_of = {id(p): group for group, ps in zip(saved, self.layout) for p in ps}
        for ps, optimizer in zip(self.groups, self.optimizers):
            entries = {j: state_dict["state"][index_of[id(p)]] for j, p in enumerate(ps) if index_of[id(p)] in state_dict["state"]}
            optimizer.load_state_dict({"state": entries, "param_groups": [{**group_of[id(ps[0])], "params": list(range(len(ps)))}]})


def _encode_rows(encode: Callable[[Tensor], Tensor], pixels: Tensor,
                 parallel: data_parallel.DataParallel | None) -> Tensor:
    """``encode(pixels (B, 3, H, W)) -> latents (B, C, h, w)`` float32; data parallel: only this rank's rows
    (:func:`~sdadapt.training.data_parallel.rank_rows`, those :func:`~sdadapt.training.data_parallel.shard_prepared`
    keeps) are encoded, the others are zeros — the batch keeps its size, so every rank draws the same noise and
    timesteps for it, and the VAE (its posterior's mean, row by row) gives each row what it gives in the whole
    batch."""
    if parallel is None:
        return encode(pixels).float()
    start, stop, _ = data_parallel.rank_rows(pixels.shape[0], parallel.rank, parallel.world)
    mine = encode(pixels[start:stop]).float()
    latents = mine.new_zeros((pixels.shape[0], *mine.shape[1:]))
    latents[start:stop] = mine
    return latents


def _check_validation_data(validation: Any, dataset: Any) -> None:
    """``fit(validation=...)``: a Dataset beside a dataset, ``(images, captions)`` beside image tensors."""
    from ..training.data import Dataset

    if validation is None:
        return
    if dataset is not None:
        if not isinstance(validation, Dataset):
            raise ValueError(f"validation= with a dataset as the images must be a sdadapt.training.data.Dataset of the "
                             f"held-out images (sdadapt.training.validation.split_for_validation), got {type(validation).__name__}")
        if not validation.records:
            raise ValueError("validation= is an empty dataset: hold out at least one image (or leave validation out)")
        if not validation.latents and not (validation.augment.active and validation.members):
            raise ValueError("the validation dataset has no latents yet: call "
                             "sdadapt.training.data.encode_buckets(validation, system.encode_images)")
        if validation.flip and not validation.augment.active and set(validation.latents_flipped) != set(validation.latents):
            raise ValueError("the validation dataset's flip is set but its mirrored latents are not cached: set flip=False "
                             "(or set it before encode_buckets)")
        return
    if (not isinstance(validation, tuple) or len(validation) != 2 or not isinstance(validation[0], Tensor)
            or validation[0].ndim != 4 or validation[0].shape[0] != len(validation[1]) or len(validation[1]) == 0):
        raise ValueError("validation= with image tensors must be (images (M, 3, H, W), M captions) with M >= 1")


def micro_batches_of_step(step: int, *, accumulation: int, per_epoch: int) -> range:
    """The micro-batches optimiser step ``step`` (0-based) accumulates: positions in the run's stream of
    batches, epoch ``e`` (0-based) being batches ``[e·B, (e+1)·B)`` of ``per_epoch`` = B.

    As accelerate's ``accumulate()`` (kohya's and diffusers' training loops), which syncs the gradients
    every ``accumulation`` = A batches and at the end of the data loader, and restarts its count there:
    an epoch is S = ⌈B/A⌉ optimiser steps, step ``k`` is step ``j = k mod S`` of epoch ``k // S`` and
    takes batches ``[e·B + j·A, e·B + min((j+1)·A, B))`` — the epoch's last step a short one of
    ``B mod A`` batches when A does not divide B (each batch's loss still divided by A, as accelerate's
    ``backward``). ``per_epoch = 0`` (no epochs: image tensors drawn at random): A batches every step,
    ``[k·A, (k+1)·A)``.

    Raises:
        ValueError: ``accumulation < 1``, ``per_epoch < 0`` or ``step < 0``.
    """
    if accumulation < 1 or per_epoch < 0 or step < 0:
        raise ValueError(f"micro_batches_of_step needs step >= 0, accumulation >= 1 and per_epoch >= 0, got step={step}, "
                         f"accumulation={accumulation}, per_epoch={per_epoch}")
    if not per_epoch:
        return range(step * accumulation, (step + 1) * accumulation)
    epoch, j = divmod(step, -(-per_epoch // accumulation))
    start = epoch * per_epoch + j * accumulation
    return range(start, min(start + accumulation, (epoch + 1) * per_epoch))


def step_of_micro_batch(micro: int, *, accumulation: int, per_epoch: int) -> int:
    """The optimiser step (0-based) whose micro-batches (:func:`micro_batches_of_step`) hold batch ``micro``."""
    if not per_epoch:
        return micro // accumulation
    epoch, position = divmod(micro, per_epoch)
    return epoch * -(-per_epoch // accumulation) + position // accumulation


def _check_resumed_position(resume: str | os.PathLike, state: TrainState, expected: int, *, accumulation: int,
                            per_epoch: int, saved: Mapping[str, Any] | None = None, processes: int = 1) -> None:
    """A resumed state's batch count (``micro_step``) must be where step ``state.step`` starts now.

    The cause named: the accumulation the state was saved with (``saved``: its ``state.json``) differs;
    the batches per epoch it recorded differ (images added or removed, another batch size, repeats,
    buckets) — and when it recorded another number of data-parallel ``processes`` (``state.json``'s
    ``processes``; 1 without torchrun), that change first: a caller that makes ``batch_size`` the
    per-process batch × processes (``sdadapt train``, kohya's per-device ``train_batch_size``) has another
    global batch, so other batches an epoch, on another process count; for a state that did not record
    them (saved before they were), a position no sdadapt
    gives for these epochs (the epoch length changed) or ``step × accumulation`` (an sdadapt before
    the epochs' short steps ran one step's batches on across an epoch's end — or the epoch length
    changed: both named).

    Raises:
        ValueError: naming both positions, the cause and the fix.
    """
    if state.micro_step == expected:
        return
    saved = saved or {}
    where = (f"{resume}: the saved state is at step {state.step} after {state.micro_step} batches, but step {state.step} "
             f"now starts at batch {expected} ({per_epoch} batches an epoch, --gradient-accumulation-steps {accumulation})")
    saved_accumulation = (saved.get("config") or {}).get("accumulation_steps")
    if isinstance(saved_accumulation, int) and saved_accumulation != accumulation:
        raise ValueError(f"{where}: the state was saved with --gradient-accumulation-steps {saved_accumulation}; resume "
                         "with the same")
    data = ("images added or removed, another --batch-size, repeats or bucket settings: resume with the data and "
            "options the run was saved with")
    saved_epoch = saved.get("batches_per_epoch")
    if isinstance(saved_epoch, int):
        saved_processes = saved.get("processes")
        if saved_epoch != per_epoch and isinstance(saved_processes, int) and saved_processes != processes:
            raise ValueError(f"{where}: the saved run had {saved_epoch} batches an epoch on "
                             f"{plural(saved_processes, 'data-parallel process', many='data-parallel processes')}, "
                             f"this one runs on {processes} "
                             "(the global batch is the batch per process × processes): resume on "
                             f"{saved_processes} (torchrun --nproc-per-node {saved_processes})")
        if saved_epoch != per_epoch:
            raise ValueError(f"{where}: the saved run had {saved_epoch} batches an epoch ({data})")
        raise ValueError(f"{where}: the saved run had as many batches an epoch; the state folder was edited or mixes "
                         "two runs — resume from an intact one")
    if state.micro_step != state.step * accumulation:  # (no sdadapt without short steps counts so)
        raise ValueError(f"{where}: the number of batches an epoch changed since the save ({data})")
    raise ValueError(
        f"{where}: either the number of batches an epoch changed since the save ({data}), or the state was saved by an "
        "older sdadapt, whose steps ran on across an epoch's end (each epoch now ends with a short step, as kohya's and "
        "accelerate's): finish that run with the version that saved it, or start again (or resume from a state saved "
        "before the first epoch ended)")


def _validation_due(config: FitConfig, step: int, accumulation: int, per_epoch: int) -> tuple[str, ...]:
    """Which of kohya's validation triggers fire after optimiser step ``step`` (1-based): ``"step"``
    every ``validate_every_n_steps`` steps; ``"epoch"`` when the step ends an epoch (or the run: the
    last step ends the last epoch; image tensors are one epoch) whose number is a multiple of
    ``validate_every_n_epochs`` (``None``: every epoch)."""
    micro_done = micro_batches_of_step(step - 1, accumulation=accumulation, per_epoch=per_epoch).stop
    last = step == config.steps
    if per_epoch:  # the epoch this step is in (each epoch's last step ends it: micro_batches_of_step)
        epoch = (micro_done - 1) // per_epoch + 1
        ends = micro_done % per_epoch == 0 or last
    else:
        epoch, ends = 1, last
    every = config.validate_every_n_epochs
    by_step = config.validate_every_n_steps is not None and step % config.validate_every_n_steps == 0
    by_epoch = ends and (every is None or epoch % every == 0)
    return (*(("step",) if by_step else ()), *(("epoch",) if by_epoch else ()))


def epoch_batches_of(dataset: Any, config: FitConfig, *, epoch: int = 0) -> list:
    """The dataset's batches for ``epoch`` (see :func:`sdadapt.training.data.epoch_batches`)."""
    from ..training.data import epoch_batches

    return epoch_batches(dataset, config.batch_size, seed=config.seed, epoch=epoch)


