"""Capture the whole training step in one CUDA graph and replay it (static shapes).

At batch 1 a LoRA step on SD1.5 is launch-bound: hundreds of small kernels for the adapters and
the optimiser, each a Python call. A CUDA graph records forward + loss + backward + clip +
optimiser step once and replays them with one launch::

    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device="cuda"), capturable=True)
    step = CapturedStep(unet_fn, params=params, optimizer=opt, config=StepConfig(mixed_precision="bf16"),
                        alphas_cumprod=ac.cuda())
    for batch in cache.batches(1, seed=0):          # every batch the same shapes (drop_last)
        metrics = step(batch, state=state)

Warm-up: the first ``warmup_steps`` calls (default 3) are ordinary eager steps on a side stream —
they train for real, let ``torch.compile`` (if you compiled the model) and cuDNN pick kernels, and
allocate the optimiser state; call ``warmup_steps + 1`` captures the graph and replays it, and
every later call only copies the new batch into the static input buffers and replays.
Noise and timesteps are drawn eagerly from ``state.generator`` before each replay (so runs are
reproducible and identical to :func:`~sdadapt.training.step.train_step`'s); dropout inside the model
uses the default CUDA generator, which graphs support. Changing the learning rate: give the
optimiser a tensor ``lr`` and ``fill_`` it. Requirements, checked with clear errors: a CUDA
device, a ``capturable`` optimiser, ``accumulation_steps == 1``, no fp16 loss scaler (use bf16),
the same shapes every call. On CPU, or when a requirement is not met and ``strict=False``, the
object runs plain :func:`~sdadapt.training.step.train_step` semantics eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .step import StepConfig, TrainState, clip_and_step, prepare_batch, step_loss

__all__ = ["CapturedStep", "CaptureError", "capture_problems"]


class CaptureError(ValueError):
    """The step cannot be captured in a CUDA graph as configured; the message says why."""


def capture_problems(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, config: StepConfig) -> list[str]:
    """Why this configuration cannot be graph-captured (empty list: it can)."""
    problems = []
    if not torch.cuda.is_available() or params[0].device.type != "cuda":
        problems.append("CUDA graphs need the parameters on a CUDA device")
    if config.accumulation_steps != 1:
        problems.append("accumulation_steps must be 1 (capture one micro-batch = one optimiser step)")
    if config.mixed_precision == "fp16":
        problems.append("fp16 needs a dynamic loss scaler that syncs with the host; use mixed_precision='bf16'")
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        problems.append(f"{type(optimizer).__name__} is not capturable; use torch.optim.AdamW(..., capturable=True)")
    return problems


class CapturedStep:
    """A training step that becomes one CUDA-graph replay after ``warmup_steps`` eager steps."""

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, object], Tensor],
        *,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        config: StepConfig,
        alphas_cumprod: Tensor,
        warmup_steps: int = 3,
        strict: bool = True,
    ) -> None:
        self.model, self.params, self.optimizer = model, params, optimizer
        self.config, self.alphas_cumprod = config, alphas_cumprod
        self.warmup_steps = warmup_steps
        self.problems = capture_problems(params, optimizer, config)
        if self.problems and strict and torch.cuda.is_available():
            raise CaptureError("cannot capture the step: " + "; ".join(self.problems))
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, object] = {}
        self._outputs: dict[str, Tensor] = {}
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _eager(self, prepared: Mapping[str, object], state: TrainState) -> dict[str, Tensor]:
        loss = step_loss(self.model, prepared, self.config)
        loss.backward()
        grad_norm = clip_and_step(self.params, self.optimizer, state, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}

    def _capture(self, prepared: Mapping[str, object], state: TrainState) -> None:
        # nothing may be created or seeded inside capture: the caller's state (and its generator,
        # made before) is used, never a fresh TrainState (a new CUDA generator cannot be built
        # while a graph is being captured)
        self._static = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in prepared.items()}
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step_loss(self.model, self._static, self.config)
            loss.backward()
            grad_norm = clip_and_step(self.params, self.optimizer, state, self.config)
        self.graph = graph
        self._outputs = {"loss": loss.detach(), "grad_norm": grad_norm.detach()}

    def _copy_in(self, prepared: Mapping[str, object]) -> None:
        for key, value in prepared.items():
            static = self._static[key]
            if isinstance(value, Tensor):
                if not isinstance(static, Tensor) or static.shape != value.shape or static.dtype != value.dtype:
                    raise CaptureError(
                        f"batch field {key!r} changed from {getattr(static, 'shape', None)} to {tuple(value.shape)}; "
                        "a captured step needs the same shapes every call (batch within one bucket, drop_last=True)"
                    )
                static.copy_(value)
            elif value != static:
                raise CaptureError(f"batch field {key!r} is not a tensor and changed; captured steps need tensors")

    def __call__(self, batch: Mapping[str, object], *, state: TrainState) -> dict[str, Tensor]:
        """One optimiser step on ``batch`` (same keys as :func:`~sdadapt.training.step.train_step`)."""
        prepared = prepare_batch(batch, state=state, config=self.config, alphas_cumprod=self.alphas_cumprod)
        self.calls += 1
        if self.problems:  # CPU or not capturable: eager, same semantics
            out = self._eager(prepared, state)
        elif self.calls <= self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(prepared, state)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self._capture(prepared, state)
            else:
                self._copy_in(prepared)
            self.graph.replay()  # type: ignore[union-attr]
            out = {k: v.clone() for k, v in self._outputs.items()}
        state.micro_step += 1
        state.step += 1
        if state.ema is not None:
            state.ema.update()
        return {**out, "stepped": torch.tensor(True)}
