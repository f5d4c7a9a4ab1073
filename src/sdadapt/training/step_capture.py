"""Capture the whole training step in CUDA graphs and replay them (one graph per batch shape).

At batch 1 a LoRA step on SD1.5 is launch-bound: hundreds of small kernels for the adapters and
the optimiser, each a Python call. A CUDA graph records forward + loss + backward + clip +
optimiser step once and replays them with one launch::

    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device="cuda"), capturable=True)
    step = CapturedStep(unet_fn, params=params, optimizer=opt, config=StepConfig(mixed_precision="bf16"),
                        alphas_cumprod=ac.cuda())
    for i, batch in enumerate(cache.batches(4, seed=0)):
        step.set_lr(lr_at(i, base_lr=1e-4, schedule="cosine", total_steps=n))   # no re-capture
        metrics = step(batch, state=state)

The lean/fast full fine-tune is captured the same way with sdadapt's own optimiser over bf16 weights::

    opt = sdadapt.training.optim.AdamW(unet.parameters(), lr=torch.tensor(1e-5, device="cuda"),
                                       state_dtype="int8", foreach=True, capturable=True)

Shapes: each distinct batch layout (the shapes/dtypes of every tensor the step reads, e.g. one
per batch size and resolution bucket) gets its own graph, captured once and cached; a last,
smaller batch simply captures one more graph. Each graph keeps its own memory pool (its
activations), so many buckets cost memory: keep the number of layouts small. The layout is the
batch's structure too (a ``"loss_mask"`` present or not, the conditioning's dict keys: nested
dicts are copied leaf by leaf) and the value and type of every non-tensor field (a ``prior``
weight). Every tensor of the batch must be on the parameters' device (checked at each capture,
:class:`CaptureError` naming the field): a graph would read a host tensor only while capturing.

Warm-up: the first ``warmup_steps`` calls (default 3) of each layout are ordinary eager steps on a
side stream — they train for real, let ``torch.compile`` (if you compiled the model) and cuDNN pick
kernels, and allocate the optimiser state; the next call of that layout captures its graph and
replays it, and every later call only copies the new batch into the graph's static input buffers
and replays.

Random numbers: nothing is seeded inside a graph. Noise and timesteps are drawn eagerly from
``state.generator`` by :func:`~sdadapt.training.step.prepare_batch` before each replay (so a
captured run draws exactly the noise an eager :func:`~sdadapt.training.step.train_step` run draws,
and a saved generator state resumes it); dropout inside the model uses the default CUDA generator,
whose offsets PyTorch registers with every graph. The optimiser's stochastic-rounding draws
(sdadapt's :class:`~sdadapt.training.optim.AdamW` over bf16 weights or bf16 states) happen inside
the graph: from the default CUDA generator, or from the optimiser's own ``generator``, which is
registered with each graph before its capture (``CUDAGraph.register_generator_state``), so every
replay advances it and draws fresh numbers, as eager steps would. No generator is created while
capturing, and autocast runs without its weight-cast cache (``cache_enabled=False``, as PyTorch
asks for graphs).

Learning rate: give the optimiser a tensor ``lr`` (``capturable=True``) and call :meth:`set_lr`
(an in-place ``fill_``: the graph reads the tensor). Requirements, checked with clear errors: a CUDA
device, a ``capturable`` optimiser (``torch.optim.AdamW(..., capturable=True)`` or sdadapt's
``AdamW(..., capturable=True)`` with float32, bf16 or int8 states, bf16 weights with stochastic
rounding, ``foreach`` or not; an optimiser fused into backward steps through Python hooks and
cannot be captured), ``accumulation_steps == 1``, no fp16 loss scaler (use bf16). On CPU, or when
a requirement is not met and ``strict=False``, the object runs plain
:func:`~sdadapt.training.step.train_step` semantics eagerly (bit-identical; tested).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .optim import set_lr
from .step import ExtraLoss, StepConfig, TrainState, clip_and_step, prepare_batch, step_loss

__all__ = ["CapturedStep", "CaptureError", "capture_problems", "graph_generators"]


class CaptureError(ValueError):
    """The step cannot be captured in a CUDA graph as configured; the message says why."""


def capture_problems(params: list[nn.Parameter], optimizer: object, config: StepConfig) -> list[str]:
    """Why this configuration cannot be graph-captured (empty list: it can)."""
    problems = []
    if not torch.cuda.is_available() or params[0].device.type != "cuda":
        problems.append("CUDA graphs need the parameters on a CUDA device")
    if config.accumulation_steps != 1:
        problems.append("accumulation_steps must be 1 (capture one micro-batch = one optimiser step)")
    if config.mixed_precision == "fp16":
        problems.append("fp16 needs a dynamic loss scaler that syncs with the host; use mixed_precision='bf16'")
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        problems.append(f"{type(optimizer).__name__} steps inside backward through Python hooks; "
                        "use torch.optim.AdamW(..., capturable=True) or sdadapt.training.optim.AdamW(..., capturable=True)")
    elif not all(group.get("capturable", False) for group in groups):
        problems.append(f"{type(optimizer).__name__} is not capturable; build it with capturable=True "
                        "(torch.optim.AdamW or sdadapt.training.optim.AdamW)")
    return problems


def graph_generators(optimizer: object) -> list[torch.Generator]:
    """The CUDA generators ``optimizer`` draws from inside a step that are not a default one
    (PyTorch registers those with every graph itself): they must be registered with a graph before
    its capture. Reads the ``generator`` attribute sdadapt's optimisers keep."""
    generator = getattr(optimizer, "generator", None)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cuda":
        return []
    if any(generator is default for default in torch.cuda.default_generators):
        return []
    return [generator]


def _layout(leaves: list[object]) -> tuple[Hashable, ...]:
    """What a graph is specialised on: every tensor's shape/dtype/device, every other leaf's value."""
    key: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.is_contiguous(memory_format=torch.channels_last)
                        if leaf.ndim == 4 else True))
        else:
            try:
                hash(leaf)
            except TypeError:
                raise CaptureError(f"batch field of type {type(leaf).__name__} is neither a tensor nor hashable; "
                                   "captured steps need tensors (or constants) in the batch") from None
            key.append(("value", type(leaf), leaf))  # (the type too: True == 1 == 1.0 would share a graph)
    return tuple(key)


def _off_device(prepared: Mapping[str, object], device: torch.device) -> list[str]:
    """The fields of ``prepared`` (key paths) holding a tensor on another device than ``device``: a
    graph reads those at capture only (a 0-dim host tensor is baked into a kernel as a constant, a
    larger one is a copy the graph cannot replay), so every replay would see the capture's value."""
    pairs, _ = pytree.tree_flatten_with_path(dict(prepared))
    return [pytree.keystr(path) for path, leaf in pairs if isinstance(leaf, Tensor) and leaf.device != device]


@dataclass
class _Graph:
    """One captured step: its graph, static inputs (pytree leaves) and outputs."""

    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    static_leaves: list[object] = field(default_factory=list)
    outputs: dict[str, Tensor] = field(default_factory=dict)


class CapturedStep:
    """A training step that becomes one CUDA-graph replay per batch layout after ``warmup_steps`` eager steps.

    Args:
        model: ``model(x_t (B,C,H,W), t (B,), cond) -> prediction (B,C,H,W)`` (may be ``torch.compile``-d).
        params: the trainable parameters (clipped and stepped).
        optimizer: a capturable optimiser over ``params`` (tensor ``lr`` to change it later):
            ``torch.optim.AdamW(..., capturable=True)`` or sdadapt's ``AdamW(..., capturable=True)``.
        config: the step options (``accumulation_steps == 1``, no fp16).
        alphas_cumprod: (T,) noise schedule on the parameters' device.
        warmup_steps: eager steps per batch layout before its capture (>= 1: they create the
            optimiser state, which a capture would otherwise record, zeroed again at every replay).
        strict: raise :class:`CaptureError` on a CUDA machine when the step cannot be captured
            (``False``: run eagerly instead).
        extra_loss: as :func:`~sdadapt.training.step.train_step`'s, captured with the loss.
        after_update: as :func:`~sdadapt.training.step.train_step`'s: run after the optimiser step,
            captured with it (so it must only launch device work: no host reads, no allocation
            that depends on values), its 0-dim tensors returned with the step's.
    """

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
        extra_loss: ExtraLoss | None = None,
        after_update: Callable[[], Mapping[str, Tensor]] | None = None,
    ) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CapturedStep needs warmup_steps >= 1, got {warmup_steps!r}: the eager steps before a "
                             "capture create the optimiser state (captured, its creation would reset it at every replay)")
        self.model, self.params, self.optimizer = model, params, optimizer
        self.config, self.alphas_cumprod = config, alphas_cumprod
        self.warmup_steps = warmup_steps
        self.extra_loss = extra_loss
        self.after_update = after_update
        self.problems = capture_problems(params, optimizer, config)
        if self.problems and strict and torch.cuda.is_available():
            raise CaptureError("cannot capture the step: " + "; ".join(self.problems))
        self._graphs: dict[tuple[Hashable, ...], _Graph] = {}
        self.calls = 0

    @property
    def captured(self) -> bool:
        """Whether at least one graph has been captured."""
        return any(g.graph is not None for g in self._graphs.values())

    @property
    def graph_count(self) -> int:
        """How many graphs (batch layouts) have been captured."""
        return sum(g.graph is not None for g in self._graphs.values())

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool): each batch layout warms up and is
        captured again — after a change the graphs cannot see, e.g. parameters that stopped
        requiring gradients (a text encoder whose training ends before the UNet's)."""
        self._graphs.clear()

    def set_lr(self, lr: float) -> None:
        """Set every parameter group's learning rate without re-capturing (``lr`` tensors are
        filled in place; a float ``lr`` is replaced, which only eager steps see).

        Raises:
            CaptureError: a graph is captured and a group's ``lr`` is a Python float (baked in);
                no group is changed then.
        """
        if self.captured and not all(isinstance(group["lr"], Tensor) for group in self.optimizer.param_groups):
            raise CaptureError("the captured graph holds this optimiser's lr as a constant; build it with "
                               "lr=torch.tensor(lr, device='cuda') and capturable=True to change it")
        set_lr(self.optimizer, lr)

    def _eager(self, prepared: Mapping[str, object], state: TrainState) -> dict[str, Tensor]:
        # a replayed graph leaves its static gradients bound to .grad: an eager step after one (another
        # layout's warm-up, a step after reset()) must not add its gradients to them
        self.optimizer.zero_grad(set_to_none=True)
        loss = step_loss(self.model, prepared, self.config, self.extra_loss, autocast_cache=False)
        loss.backward()
        grad_norm = clip_and_step(self.params, self.optimizer, state, self.config)  # type: ignore[arg-type]
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **self._after_update()}

    def _after_update(self) -> dict[str, Tensor]:
        if self.after_update is None:
            return {}
        with torch.no_grad():
            return {k: v.detach() for k, v in self.after_update().items()}

    def _capture(self, entry: _Graph, leaves: list[object], spec: pytree.TreeSpec, state: TrainState) -> None:
        # nothing is created or seeded inside capture: the caller's state (its generator made long
        # before) is passed through; the static inputs are allocated before the graph begins
        off = _off_device(pytree.tree_unflatten(leaves, spec), self.params[0].device)
        if off:
            raise CaptureError(f"batch field(s) {', '.join(off[:4])} are tensors on another device than the parameters "
                               f"({self.params[0].device}): a CUDA graph would read them only when it is captured; "
                               "move them to the parameters' device before the step")
        entry.static_leaves = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        static = pytree.tree_unflatten(entry.static_leaves, spec)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates (and owns) the grads
        graph = torch.cuda.CUDAGraph()
        for generator in graph_generators(self.optimizer):  # e.g. AdamW's stochastic-rounding generator
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            loss = step_loss(self.model, static, self.config, self.extra_loss, autocast_cache=False)
            loss.backward()
            grad_norm = clip_and_step(self.params, self.optimizer, state, self.config)  # type: ignore[arg-type]
            after = self._after_update()
        entry.graph = graph
        entry.outputs = {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **after}

    def __call__(self, batch: Mapping[str, object], *, state: TrainState,
                 prior: tuple[Mapping[str, object], float] | None = None) -> dict[str, Tensor]:
        """One optimiser step on ``batch`` (same keys as :func:`~sdadapt.training.step.train_step`).

        Args:
            prior: ``(class_batch, weight)``: DreamBooth's prior preservation as a second forward of
                ``class_batch`` (same keys), its loss times ``weight`` added — its noise and timesteps
                drawn from ``state.generator`` after the batch's, outside the graph, as ``fit``'s
                eager step draws them; ``weight`` is a constant of the graph.

        Returns:
            ``{"loss": 0-dim, "grad_norm": 0-dim, "stepped": True}`` — tensors, no host sync.
        """
        prepared = prepare_batch(batch, state=state, config=self.config, alphas_cumprod=self.alphas_cumprod, prior=prior)
        self.calls += 1
        if self.problems:  # CPU or not capturable: eager, same semantics
            out = self._eager(prepared, state)
        else:
            leaves, spec = pytree.tree_flatten(dict(prepared))
            key = (spec, _layout(leaves))
            entry = self._graphs.setdefault(key, _Graph())
            entry.calls += 1
            if entry.graph is None and entry.calls <= self.warmup_steps:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._eager(prepared, state)
                torch.cuda.current_stream().wait_stream(side)
            else:
                if entry.graph is None:
                    self._capture(entry, leaves, spec, state)
                else:
                    for static, leaf in zip(entry.static_leaves, leaves):
                        if isinstance(leaf, Tensor):
                            static.copy_(leaf)  # type: ignore[union-attr]
                entry.graph.replay()  # type: ignore[union-attr]
                out = {k: v.clone() for k, v in entry.outputs.items()}
        state.micro_step += 1
        state.step += 1
        if state.ema is not None:
            state.ema.update()
        return {**out, "stepped": torch.tensor(True)}
