"""Validation loss on held-out images (kohya sd-scripts' ``validation_split`` & co.).

kohya's rule (``train_network.py``, ``library/train_util.py``), which sdadapt follows:

* the split (:func:`split_for_validation`): each subset's (folder's) images, sorted by path, are
  shuffled by ``random.seed(validation_seed); random.shuffle(...)``; the first
  ``ceil(n · (1 − split))`` train, the rest are held out (kohya takes its last ``round(n · split)``,
  which can share one image with the training part when ``n · split`` ends in .5 or more — sdadapt
  keeps the two disjoint). Class (regularisation) images are never held out; repeats do not apply
  to held-out images (each is used once per pass).
* the pass (:func:`validation_loss`): every held-out batch at each of the fixed timesteps
  ``np.linspace(low, high, 4 + 2, dtype=int)[1:-1]`` (:func:`validation_timesteps`: 200, 400,
  600, 800 for 1000 training steps), the noise drawn from a generator seeded with the validation
  seed anew at each pass (the same noise every pass, and nothing of the training run's random draws
  is used), the model in eval mode (adapters' dropout off) under ``no_grad``, the loss the training
  step computes (:func:`~sdadapt.training.step.prepare_batch` + :func:`~sdadapt.training.step.step_loss`:
  min-SNR & co. included, as kohya's ``process_batch``); the pass's loss is the mean of the
  (batch, timestep) losses.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .step import StepConfig, TrainState, prepare_batch, step_loss

__all__ = ["VALIDATION_COLUMNS", "VALIDATION_TIMESTEP_COUNT", "eval_mode", "split_for_validation", "validation_columns",
           "validation_loss", "validation_timesteps"]

#: kohya's ``NUM_VALIDATION_TIMESTEPS``: how many fixed timesteps each held-out batch is scored at
VALIDATION_TIMESTEP_COUNT = 4

#: the run log's validation columns (:class:`~sdadapt.training.monitor.RunLog` ``extra``) and their TensorBoard
#: tags, kohya's: a pass asked for by ``validate_every_n_steps`` / by the end of an epoch
VALIDATION_COLUMNS: Mapping[str, str] = {"validation_step_loss": "loss/validation/step_average",
                                         "validation_epoch_loss": "loss/validation/epoch_average"}

Item = TypeVar("Item")


def validation_columns(loss: float | None, validated: Sequence[str]) -> dict[str, float]:
    """A step's :data:`VALIDATION_COLUMNS` values: ``loss`` under each trigger in ``validated``
    (``"step"``, ``"epoch"``; :attr:`~sdadapt.methods.fit.FitProgress.validated`); ``{}`` without a pass."""
    return {} if loss is None else {f"validation_{kind}_loss": loss for kind in validated}


def validation_timesteps(low: int, high: int, *, count: int = VALIDATION_TIMESTEP_COUNT) -> list[int]:
    """kohya's fixed validation timesteps: ``np.linspace(low, high, count + 2, dtype=int)[1:-1]``
    (the inner ``count`` points of an even grid from ``low`` to ``high``, truncated to integers).

    ``low, high``: the training timestep range (kohya's ``min_timestep`` / ``max_timestep``, default
    0 and the schedule's length). ``validation_timesteps(0, 1000) == [200, 400, 600, 800]``.
    """
    if count < 1 or not 0 <= low < high:
        raise ValueError(f"validation timesteps need count >= 1 and 0 <= low < high, got count={count}, [{low}, {high})")
    # numpy's linspace: low + i·step, step = (high − low) / (count + 1), the last point exactly high; astype(int) truncates
    step = (high - low) / (count + 1)
    return [int(low + i * step) for i in range(1, count + 1)]


def split_for_validation(items: Sequence[Item], *, split: float, seed: int,
                         key: Callable[[Item], str] = str) -> tuple[list[Item], list[Item]]:
    """kohya's ``split_train_val`` of one subset: ``(training, held_out)``.

    ``items`` sorted by ``key`` (kohya sorts the image paths), shuffled with ``random.Random(seed)``
    (what kohya's ``random.seed(validation_seed); random.shuffle(...)`` draws); the first
    ``ceil(n · (1 − split))`` train, the rest are held out (disjoint; at least one image trains).

    Raises:
        ValueError: ``split`` outside [0, 1).
    """
    if not 0 <= split < 1:
        raise ValueError(f"validation_split must be in [0, 1) (the share of each subset's images held out), got {split}")
    ordered = sorted(items, key=key)
    if split == 0:
        return ordered, []
    random.Random(seed).shuffle(ordered)
    cut = math.ceil(len(ordered) * (1 - split))
    return ordered[:cut], ordered[cut:]


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every module in ``modules`` (and each submodule) in eval mode within the block — adapters'
    dropout, rank and module dropout off — each restored to its own mode afterwards (kohya's
    ``network.eval()`` around a validation pass)."""
    modes: dict[nn.Module, bool] = {}
    for module in modules:
        for sub in module.modules():
            modes.setdefault(sub, sub.training)
    try:
        for sub in modes:
            sub.training = False
        yield
    finally:
        for sub, mode in modes.items():
            sub.training = mode


@torch.no_grad()
def validation_loss(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    batches: Iterable[Mapping[str, Any]],
    *,
    config: StepConfig,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int],
    seed: int,
    shard: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Tensor:
    """The mean loss of ``batches`` at each of ``timesteps`` (kohya's validation pass; see the module).

    Args:
        model: ``model(x_t (B, C, H, W), t (B,), cond) -> prediction (B, C, H, W)`` — put it in eval
            mode yourself (:func:`eval_mode`).
        batches: ``{"latents": x0 (B, C, H, W), "cond": ..., "loss_mask": optional (B, 1, h, w)}``
            each; scored in order, each at every timestep in order (batches outer).
        config: the training step's config (prediction type, loss, min-SNR & co., noise options).
        alphas_cumprod: (T,) the schedule the training steps use, on the latents' device.
        timesteps: the fixed timesteps (:func:`validation_timesteps`).
        seed: the noise generator's seed (kohya's ``validation_seed``, else the run's ``seed``); a
            fresh generator on ``alphas_cumprod``'s device, so each pass draws the same noise.
        shard: data parallel (:func:`~sdadapt.training.data_parallel.shard_prepared`): this rank's rows
            of each prepared batch (the noise is drawn for the whole batch, so every rank draws the
            same); the result is then this rank's part, and the mean over the ranks
            (:func:`~sdadapt.training.data_parallel.mean_over_ranks`) is the one-process pass's loss.

    Returns:
        0-dim float32 on the device: the mean of the (batch, timestep) losses (no host read here).

    Raises:
        ValueError: no batches or no timesteps.
    """
    if not timesteps:
        raise ValueError("a validation pass needs at least one timestep")
    state = TrainState(seed=seed, device=alphas_cumprod.device)
    total: Tensor | None = None
    count = 0
    for batch in batches:
        latents: Tensor = batch["latents"]
        for t in timesteps:
            fixed = {**batch, "timesteps": torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)}
            prepared = prepare_batch(fixed, state=state, config=config, alphas_cumprod=alphas_cumprod)
            if shard is not None:  # (data parallel: the noise drawn for the whole batch, the model run on this rank's rows)
                prepared = shard(prepared)
            loss = step_loss(model, prepared, config)
            total = loss if total is None else total + loss
            count += 1
    if total is None:
        raise ValueError("a validation pass needs at least one held-out batch (the validation data is empty)")
    return total / count
