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

Gradients: from its first capture on, the step owns the trained parameters' ``.grad`` tensors:
allocated once (outside every graph's pool), every graph's backward adds into them, and the
optimiser update zeroes them in place. So all batch layouts share one set of gradients (a graph
per layout does not cost a gradient buffer each), eager steps (another layout's warm-up) and
replays can follow each other, and gradient accumulation works: with ``accumulation_steps = k``
each micro-batch replays its layout's graph (forward, ``loss / k``, backward adding into the
gradients) and every k-th also replays one more graph, the update (clip, optimiser
step, ``after_update``, zeroing), captured once after ``warmup_steps`` eager updates. ``k = 1``
keeps forward, backward and update in one graph per layout. A parameter the capture's backward
does not reach (say a LoRA on a text-encoder layer that ``clip_skip`` leaves out) keeps
``grad=None`` and is not stepped, as in eager steps; every later layout's capture must reach the
same parameters (one more, or one less, is refused with :class:`CaptureError`, as is a gradient made
by a nested backward the autograd graph does not show: a reentrant ``torch.utils.checkpoint``).
Do not replace or ``None`` the gradients between calls (``optimizer.zero_grad(set_to_none=True)``):
the graphs would write into the old ones (refused with :class:`CaptureError`); call :meth:`reset`
after changing which parameters train.

Learning rate: give the optimiser a tensor ``lr`` (``capturable=True``) and call :meth:`set_lr`
(an in-place ``fill_``: the graph reads the tensor). Requirements, checked with clear errors: a CUDA
device, a ``capturable`` optimiser (``torch.optim.AdamW(..., capturable=True)`` or sdadapt's
``AdamW`` (float32, bf16 or int8 states), ``Adafactor``, ``Lion``, ``Prodigy``, D-Adaptation or a
schedule-free optimiser built with ``capturable=True``, bf16 weights with stochastic rounding, ``foreach`` or not; an optimiser fused into backward steps through Python hooks and
cannot be captured), no fp16 loss scaler (use bf16). On CPU, or when a requirement is not met and
``strict=False``, the object runs plain :func:`~sdadapt.training.step.train_step` semantics
eagerly (bit-identical; tested).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..adapters.weight_casts import is_batched_cast
from .optim import set_lr
from .step import ExtraLoss, StepConfig, TrainState, clip_and_step, prepare_batch, step_backward, step_loss

__all__ = ["CapturedStep", "CaptureError", "capture_problems", "graph_generators"]


class CaptureError(ValueError):
    """The step cannot be captured in a CUDA graph as configured; the message says why."""


def capture_problems(params: list[nn.Parameter], optimizer: object, config: StepConfig) -> list[str]:
    """Why this configuration cannot be graph-captured (empty list: it can)."""
    problems = []
    if not torch.cuda.is_available() or params[0].device.type != "cuda":
        problems.append("CUDA graphs need the parameters on a CUDA device")
    if config.mixed_precision == "fp16":
        problems.append("fp16 needs a dynamic loss scaler that syncs with the host; use mixed_precision='bf16'")
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        problems.append(f"{type(optimizer).__name__} steps inside backward through Python hooks; "
                        "use torch.optim.AdamW(..., capturable=True) or one of sdadapt's (training.optim.AdamW or "
                        "Adafactor, training.lion.Lion, training.prodigy.Prodigy, training.dadapt.DAdaptAdam/DAdaptLion, "
                        "training.schedule_free.AdamWScheduleFree/SGDScheduleFree) with capturable=True")
    elif not all(group.get("capturable", False) for group in groups):
        problems.append(f"{type(optimizer).__name__} is not capturable; build it with capturable=True "
                        "(torch.optim.AdamW, or sdadapt's AdamW, Adafactor, Lion, Prodigy, D-Adaptation or schedule-free "
                        "optimisers)")
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


def _record(graph: torch.cuda.CUDAGraph, body: Callable[[], dict[str, Tensor]], *,
            stream: torch.cuda.Stream) -> dict[str, Tensor]:
    """Capture ``body()`` into ``graph`` on ``stream``; returns its outputs (the tensors each replay
    rewrites)."""
    with torch.cuda.graph(graph, stream=stream):
        return body()


_RNG_STATE_IN_CAPTURE = (
    "the step read the CUDA generator's state while it was captured, which CUDA graphs refuse. Most likely a "
    "gradient checkpoint that preserves the RNG state: the model's own (diffusers' enable_gradient_checkpointing(), "
    "transformers' gradient_checkpointing_enable(), a torch.utils.checkpoint call in your model). Checkpoint with "
    "sdadapt.training.grad_checkpointing.enable_checkpointing instead (FitConfig.gradient_checkpointing, "
    "train --gradient-checkpointing; it does not preserve the RNG state while capturing: exact without dropout in "
    "the checkpointed blocks), or give the model a checkpoint function with preserve_rng_state=False (diffusers: "
    "enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(torch.utils.checkpoint.checkpoint, "
    "use_reentrant=False, preserve_rng_state=False))). Else torch.compile compiled inside the capture "
    "(a recompile): give CapturedStep more warmup_steps"
)


def _read_rng_state(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or during, is CUDA's refusal to read a
    generator's seed inside a capture (``torch.cuda.get_rng_state()``; a failed capture's own error
    at the graph's end may stand in front of it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if "CUDAGeneratorImpl::current_seed" in str(error):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


def _reached(loss: Tensor) -> set[int]:
    """``id`` of every leaf tensor ``loss.backward()`` accumulates a gradient into (its autograd graph's
    ``AccumulateGrad`` nodes); a Python walk, no device work. Of the weights cast together
    (:func:`~sdadapt.adapters.weight_casts.batched_weight_casts`) only those whose copy some edge reads."""
    seen: set[object] = set()
    reached: set[int] = set()
    read_copies: dict[object, set[int]] = {}  # batched cast node -> the outputs (copies) an edge reads
    pending = [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            reached.add(id(variable))
        for next_node, output in node.next_functions:
            if is_batched_cast(next_node):
                read_copies.setdefault(next_node, set()).add(output)
            else:
                pending.append(next_node)
    for node, outputs in read_copies.items():  # (its next functions: the weights' AccumulateGrad nodes)
        reached.update(id(node.next_functions[i][0].variable) for i in outputs if node.next_functions[i][0] is not None)
    return reached


@dataclass
class _Graph:
    """One captured graph (a batch layout's step, or the update): its static inputs (pytree leaves) and outputs."""

    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    static_leaves: list[object] = field(default_factory=list)
    spec: pytree.TreeSpec | None = None  # (the static inputs' structure)
    outputs: dict[str, Tensor] = field(default_factory=dict)


class CapturedStep:
    """A training step that becomes CUDA-graph replays per batch layout after ``warmup_steps`` eager steps.

    Args:
        model: ``model(x_t (B,C,H,W), t (B,), cond) -> prediction (B,C,H,W)`` (may be ``torch.compile``-d).
        params: the trainable parameters (clipped and stepped).
        optimizer: a capturable optimiser over ``params`` (tensor ``lr`` to change it later):
            ``torch.optim.AdamW(..., capturable=True)`` or sdadapt's ``AdamW(..., capturable=True)``.
        config: the step options (no fp16; ``accumulation_steps = k``: each call is one
            micro-batch, every k-th also updates, as :func:`~sdadapt.training.step.train_step`).
        alphas_cumprod: (T,) noise schedule on the parameters' device.
        warmup_steps: eager steps per batch layout (and eager updates) before its capture (>= 1:
            they create the optimiser state, which a capture would otherwise record, zeroed again
            at every replay).
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
        self._update = _Graph()  # accumulation_steps > 1: the update's own graph
        self._grads: list[tuple[nn.Parameter, Tensor]] | None = None  # owned from the first capture on
        self._dropped: list[tuple[nn.Parameter, Tensor]] = []  # unreached ones, alive until their capture ends
        self._stream: torch.cuda.Stream | None = None  # the side stream of every warm-up and capture
        self.calls = 0

    @property
    def captured(self) -> bool:
        """Whether at least one graph has been captured."""
        return self._update.graph is not None or any(g.graph is not None for g in self._graphs.values())

    @property
    def graph_count(self) -> int:
        """How many batch layouts have a captured graph (the update graph of accumulation not counted)."""
        return sum(g.graph is not None for g in self._graphs.values())

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool) and give the gradients back: each batch
        layout warms up and is captured again — after a change the graphs cannot see, e.g.
        parameters that stopped requiring gradients (a text encoder whose training ends before the
        UNet's; set their ``.grad`` to ``None``) or gradients replaced by other code."""
        self._graphs.clear()
        self._update = _Graph()
        self._grads = None

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

    # ------------------------------------------------------------------ the step's two halves
    def _backward(self, prepared: Mapping[str, object], *, capturing: bool = False) -> dict[str, Tensor]:
        """Forward, loss, ``(loss / k).backward()`` into ``.grad`` (owned gradients: added in place)."""
        loss = step_loss(self.model, prepared, self.config, self.extra_loss, autocast_cache=False, batch_casts=self.params)
        if capturing:
            self._settle_grads(loss)
        step_backward(loss / self.config.accumulation_steps, self.config)
        if capturing:
            self._refuse_unowned_grads()
        return {"loss": loss.detach()}

    def _update_body(self, state: TrainState) -> dict[str, Tensor]:
        """Clip, optimiser step, zero the gradients (owned: in place; else ``None``), ``after_update``."""
        grad_norm = clip_and_step(self.params, self.optimizer, state, self.config)  # type: ignore[arg-type]
        if self._grads is None:
            self.optimizer.zero_grad(set_to_none=True)
        elif self._grads:
            torch._foreach_zero_([grad for _, grad in self._grads])
        return {"grad_norm": grad_norm.detach(), **self._after_update()}

    def _after_update(self) -> dict[str, Tensor]:
        if self.after_update is None:
            return {}
        with torch.no_grad():
            return {k: v.detach() for k, v in self.after_update().items()}

    # ------------------------------------------------------------------ gradients owned by the graphs
    def _own_grads(self) -> None:
        """Before the first capture: a ``.grad`` for every trained parameter (kept if it has one: an
        accumulation cycle's eager part), allocated outside any graph's pool."""
        if self._grads is not None:
            return
        for p in self.params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [(p, p.grad) for p in self.params if p.requires_grad and p.grad is not None]
        for _, grad in self._grads:
            if grad.is_cuda:  # replays use it on this stream (a warm-up may have made it on a side one)
                grad.record_stream(torch.cuda.current_stream())

    def _settle_grads(self, loss: Tensor) -> None:
        """Inside a capture, before backward: at the first capture the owned gradients of parameters
        this backward does not reach go back to ``None`` (not stepped, as in eager steps); a later
        capture must reach exactly the owned ones — one it reaches that has none is refused (its
        backward would write a gradient of the graph's own), and so is one it does not reach (the
        graphs captured before still add into that gradient and step from it: dropped, they would
        write freed memory)."""
        reached = _reached(loss)
        assert self._grads is not None  # (_own_grads ran before the capture)
        owned = {id(p) for p, _ in self._grads}
        new = [i for i, p in enumerate(self.params) if id(p) in reached and id(p) not in owned]
        lost = [i for i, p in enumerate(self.params) if id(p) in owned and id(p) not in reached] if self.captured else []
        if new or lost:
            which = (f"parameter(s) {new[:5]} of params, which an earlier capture's step did not reach" if new
                     else f"not parameter(s) {lost[:5]} of params, which an earlier capture's step trains")
            raise CaptureError(f"this batch layout's step trains {which}: CUDA-graph capture needs every batch layout to "
                               "train the same parameters; call reset() after changing them, or train eagerly")
        kept = [(p, grad) for p, grad in self._grads if id(p) in reached]
        for p, _ in self._grads:
            if id(p) not in reached:
                p.grad = None  # (the tensor stays alive in self._grads until the capture has ended)
        self._dropped, self._grads = self._grads, kept

    def _refuse_unowned_grads(self) -> None:
        """Inside a capture, after backward: a gradient the walk of :func:`_reached` did not foresee
        (a nested backward, as a reentrant ``torch.utils.checkpoint`` runs) is the graph's own —
        rewritten by its replays, never zeroed, added into by eager steps — so it is refused."""
        owned = {id(p) for p, _ in self._grads or ()}
        stray = [i for i, p in enumerate(self.params) if p.requires_grad and p.grad is not None and id(p) not in owned]
        if stray:
            raise CaptureError(f"the captured backward made gradient(s) of parameter(s) {stray[:5]} of params that its "
                               "autograd graph does not show (a nested backward, e.g. torch.utils.checkpoint with "
                               "use_reentrant=True: use use_reentrant=False), so CapturedStep cannot own them; "
                               "train eagerly or checkpoint without reentrance")

    def _check_grads(self) -> None:
        if self._grads and any(p.grad is not grad for p, grad in (self._grads[0], self._grads[-1])):
            raise CaptureError("the trained parameters' gradients were replaced or set to None between captured steps "
                               "(e.g. optimizer.zero_grad(set_to_none=True)); the graphs still write into the old ones. "
                               "Leave .grad to CapturedStep, or call its reset() after changing them")

    # ------------------------------------------------------------------ eager, capture, replay
    def _side_stream(self) -> torch.cuda.Stream:
        """This step's one side stream, made at its first warm-up: every warm-up and capture runs on it.
        (``torch.cuda.Stream()`` hands out torch's 32 pooled streams in turn, and cuBLAS keeps a
        workspace — 32 MiB on Hopper — for every stream it has run on until the process ends: a new
        stream per warm-up left ~4 of them per batch layout, up to 32.)"""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.params[0].device)
        return self._stream

    def _on_side_stream(self, run: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """An eager warm-up on the side stream (as PyTorch asks before a capture)."""
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = run()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, entry: _Graph, leaves: list[object], spec: pytree.TreeSpec, state: TrainState, *,
                 update: bool) -> None:
        # nothing is created or seeded inside capture: the caller's state (its generator made long
        # before) is passed through; the static inputs and the gradients are allocated before the graph begins
        off = _off_device(pytree.tree_unflatten(leaves, spec), self.params[0].device)
        if off:
            raise CaptureError(f"batch field(s) {', '.join(off[:4])} are tensors on another device than the parameters "
                               f"({self.params[0].device}): a CUDA graph would read them only when it is captured; "
                               "move them to the parameters' device before the step")
        entry.static_leaves, entry.spec = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec
        static = pytree.tree_unflatten(entry.static_leaves, spec)
        self._own_grads()

        def body() -> dict[str, Tensor]:
            out = self._backward(static, capturing=True)
            return {**out, **self._update_body(state)} if update else out

        graph = self._new_graph()
        try:
            entry.outputs = _record(graph, body, stream=self._side_stream())
        except RuntimeError as error:
            if not _read_rng_state(error):
                raise
            raise CaptureError(_RNG_STATE_IN_CAPTURE) from error
        entry.graph, self._dropped = graph, []

    def _new_graph(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        for generator in graph_generators(self.optimizer):  # e.g. AdamW's stochastic-rounding generator
            graph.register_generator_state(generator)
        return graph

    def _replay(self, entry: _Graph) -> dict[str, Tensor]:
        entry.graph.replay()  # type: ignore[union-attr]
        return {k: v.clone() for k, v in entry.outputs.items()}

    def _micro(self, prepared: Mapping[str, object], state: TrainState, *, update: bool) -> dict[str, Tensor]:
        """This micro-batch through its layout's graph (warm-up: eagerly); ``update``: the update in
        the same graph (``accumulation_steps == 1``)."""
        leaves, spec = pytree.tree_flatten(dict(prepared))
        # (its str, not the spec: a TreeSpec is hashable only from torch 2.7; the str names each container and key)
        entry = self._graphs.setdefault((str(spec), _layout(leaves)), _Graph())
        entry.calls += 1
        if entry.graph is None and entry.calls <= self.warmup_steps:
            return self._on_side_stream(lambda: {**self._backward(prepared), **(self._update_body(state) if update else {})})
        if entry.graph is None:
            self._capture(entry, leaves, spec, state, update=update)
        else:
            for static, leaf in zip(entry.static_leaves, leaves):
                if isinstance(leaf, Tensor):
                    static.copy_(leaf)  # type: ignore[union-attr]
        return self._replay(entry)

    def _captured_update(self, state: TrainState) -> dict[str, Tensor]:
        """``accumulation_steps > 1``: the update through its own graph, after ``warmup_steps`` eager
        updates and once the gradients are owned (a micro-batch graph exists)."""
        entry = self._update
        entry.calls += 1
        if entry.graph is None and (entry.calls <= self.warmup_steps or self._grads is None):
            return self._on_side_stream(lambda: self._update_body(state))
        if entry.graph is None:
            graph = self._new_graph()
            entry.outputs = _record(graph, lambda: self._update_body(state), stream=self._side_stream())
            entry.graph = graph
        return self._replay(entry)

    def __call__(self, batch: Mapping[str, object], *, state: TrainState,
                 prior: tuple[Mapping[str, object], float] | None = None) -> dict[str, Tensor]:
        """One micro-batch on ``batch`` (same keys as :func:`~sdadapt.training.step.train_step`); every
        ``accumulation_steps``-th call also takes the optimiser step.

        Args:
            prior: ``(class_batch, weight)``: DreamBooth's prior preservation as a second forward of
                ``class_batch`` (same keys), its loss times ``weight`` added — its noise and timesteps
                drawn from ``state.generator`` after the batch's, outside the graph, as ``fit``'s
                eager step draws them; ``weight`` is a constant of the graph.

        Returns:
            ``{"loss": 0-dim (this micro-batch, unscaled), "grad_norm": 0-dim (nan when not stepped),
            "stepped": bool tensor}`` (+ ``after_update``'s when stepped) — tensors, no host sync.
        """
        prepared = prepare_batch(batch, state=state, config=self.config, alphas_cumprod=self.alphas_cumprod, prior=prior)
        self.calls += 1
        state.micro_step += 1
        stepped = state.micro_step % self.config.accumulation_steps == 0
        one_graph = self.config.accumulation_steps == 1
        if self.problems:  # CPU or not capturable: eager, same semantics
            out = self._backward(prepared)
            if stepped:
                out.update(self._update_body(state))
        else:
            self._check_grads()
            out = self._micro(prepared, state, update=one_graph)
            if stepped and not one_graph:
                out.update(self._captured_update(state))
        if not stepped:
            out["grad_norm"] = torch.full((), float("nan"), device=out["loss"].device)
        else:
            state.step += 1
            if state.ema is not None:
                state.ema.update()
        return {**out, "stepped": torch.tensor(stepped)}
