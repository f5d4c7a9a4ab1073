"""Schedule-free AdamW and SGD (Defazio et al. 2024, "The Road Less Scheduled"): no LR schedule, the
weights to use are an online average of the iterates.

The optimiser keeps three sequences per parameter; the parameter itself holds ``y`` in train mode
(where gradients are taken) and ``x`` in eval mode (the weights to sample with and to save). With
gradient ``g`` taken at ``y``, step ``t = k + 1`` (``k`` steps done), all arithmetic in float32 and
the per-step scalars in float64 (the order of ``schedulefree.AdamWScheduleFree`` 1.4.1, kohya's
``optimizer_type = "AdamWScheduleFree"``)::

    s      = t / W if k < W else 1                    linear warm-up over W = warmup_steps
    lr_t   = lr · s                                   lr_max = max(lr_max, lr_t)
    c_t    = t^r · lr_max^p / Σ_{i≤t} i^r · lr_max,i^p   the averaging weight (0 while the sum is 0)
    v      ← β₂ v + (1 − β₂) g²
    u      = g / (√(v / (1 − β₂ᵗ)) + ε) + λ y        weight decay taken at y
    y      ← lerp(y, z, c_t) + lr_t (β₁ (1 − c_t) − 1) · u
    z      ← z − lr_t · u

which is, without forming ``x``: ``z ← z − lr_t·u``, ``x ← (1 − c_t) x + c_t z``,
``y = (1 − β₁) z + β₁ x``. :meth:`~AdamWScheduleFree.eval` writes ``x = lerp(y, z, 1 − 1/β₁)``
into the parameters, :meth:`~AdamWScheduleFree.train` writes ``y = lerp(x, z, 1 − β₁)`` back.

:class:`SGDScheduleFree` (kohya's ``"SGDScheduleFree"``, schedulefree's ``SGDScheduleFree``) is the
same with ``u = g + λ y`` (no second moment) and ``momentum`` in place of ``β₁``.

Memory per trained parameter: ``z`` and ``v`` in float32, 8 B (as AdamW's two moments; SGD: ``z``, 4 B). bf16
weights are updated in float32 and written back with sdadapt's stochastic rounding
(:func:`~sdadapt.training.optim.copy_stochastic_`), in the step and in the mode switches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .optim import (
    _call_closure,
    _check_capturable_lr,
    _check_common,
    _check_tensor_lr,
    _float32,
    _float32_many,
    _load_keeping_mode,
    _lr_value,
    _param_chunks,
    _params_with_grads,
    _state_bytes,
    _step_options,
    _write_weight,
    _write_weights_many,
)

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "is_schedule_free", "switch_mode"]

#: the per-group counters the step keeps (schedulefree's names): Python numbers, or in capturable
#: mode float64 0-dim tensors on the parameters' device, changed in place
_COUNTERS = ("k", "weight_sum", "lr_max", "scheduled_lr")
_START = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


def is_schedule_free(optimizer: object) -> bool:
    """Whether ``optimizer`` needs ``train()`` before its steps and ``eval()`` before its weights are
    used (sdadapt's :class:`AdamWScheduleFree` / :class:`SGDScheduleFree`, or any optimiser whose groups carry schedulefree's
    ``train_mode`` flag)."""
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and all("train_mode" in group for group in groups) and callable(getattr(optimizer, "eval", None))


def switch_mode(optimizer: Any, *, train: bool) -> None:
    """``optimizer.train()`` (``train=True``) or ``optimizer.eval()`` with SIGINT / SIGTERM / SIGHUP
    held back until the switch is done (:func:`sdadapt.formats.files.signals_held`; main thread only).

    A switch rewrites every trained parameter (``y`` ↔ ``x``) one group, one chunk at a time, and
    flips each group's ``train_mode`` after its parameters: a Ctrl-C in the middle would leave some
    parameters switched and their group's flag not, so the interrupt save (``train``'s, which calls
    ``eval()`` and writes ``x``) would write a mix of ``x`` and ``y`` — or switch the done ones twice.
    Held, the signal's ``KeyboardInterrupt`` is raised after the last group, with every parameter
    in one mode. sdadapt's own optimisers hold signals in their ``train()`` / ``eval()`` already;
    this covers any schedule-free optimiser (schedulefree's too)."""
    from ..formats.files import signals_held

    if all(group.get("train_mode", not train) == train for group in optimizer.param_groups):
        return  # (already in that mode, as at most steps: no signal handlers swapped)
    with signals_held():
        if train:
            optimizer.train()
        else:
            optimizer.eval()


class _ScheduleFree(torch.optim.Optimizer):
    """What every schedule-free optimiser here shares: the counters, the train/eval modes, the
    ``y``/``z`` updates given a direction ``u`` (the subclass's), the bf16 write-back, resume."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], own: dict[str, Any], *,
                 warmup_steps: int, r: float, weight_lr_power: float, stochastic_rounding: bool,
                 generator: torch.Generator | None, foreach: bool, capturable: bool) -> None:
        """``own``: the subclass's defaults (``lr``, its direction's options, ``weight_decay``),
        followed here by the options and counters every schedule-free optimiser's groups carry
        (eval mode first, as schedulefree's)."""
        defaults = {**own, "warmup_steps": warmup_steps, "r": r, "weight_lr_power": weight_lr_power,
                    "train_mode": False, **_START,
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        super().__init__(params, defaults)
        self.generator = generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, validating the group's options and giving
        it its own counters (device tensors in capturable mode)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check(group)
        for key in _COUNTERS:
            group[key] = _START[key]
        _counters_to_mode(group)

    @torch.no_grad()
    def eval(self) -> None:
        """Eval mode: write ``x = lerp(y, z, 1 − 1/β₁)`` into every parameter that has stepped (a
        no-op for groups already in eval mode). Atomic with respect to Ctrl-C / SIGTERM / SIGHUP
        (:func:`switch_mode`): a signal during the switch is raised when every group has switched."""
        from ..formats.files import signals_held

        if not any(group["train_mode"] for group in self.param_groups):
            return
        with signals_held():
            for group in self.param_groups:
                if group["train_mode"]:
                    self._interpolate(group, 1 - 1 / self._beta1(group))
                    group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Train mode: write ``y = lerp(x, z, 1 − β₁)`` into every parameter that has stepped (a
        no-op for groups already in train mode); atomic with respect to signals, as :meth:`eval`."""
        from ..formats.files import signals_held

        if all(group["train_mode"] for group in self.param_groups):
            return
        with signals_held():
            for group in self.param_groups:
                if not group["train_mode"]:
                    self._interpolate(group, 1 - self._beta1(group))
                    group["train_mode"] = True

    def _interpolate(self, group: dict[str, Any], weight: float) -> None:
        """``p ← lerp(p, z, weight)`` in float32 for the group's parameters that have a ``z``."""
        params = [p for p in group["params"] if "z" in self.state.get(p, {})]
        if not params:
            return
        if not group["foreach"]:
            for p in params:
                w = _float32(p)
                w.lerp_(self.state[p]["z"], weight)
                _write_weight(p, w, group["stochastic_rounding"], self.generator)
            return
        for ps in _param_chunks(params):
            weights = _float32_many(ps)
            torch._foreach_lerp_(weights, [self.state[p]["z"] for p in ps], weight)
            _write_weights_many(ps, weights, group["stochastic_rounding"], self.generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter that has a gradient; returns ``closure()``'s loss.

        Raises:
            RuntimeError: the optimiser is in eval mode (call :meth:`train` first).
        """
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() in eval mode: call optimizer.train() before training steps "
                               "and optimizer.eval() before sampling or saving (the weights differ between the two)")
        loss = _call_closure(closure)
        for group in self.param_groups:
            params = _params_with_grads(group, f"sdadapt.training.schedule_free.{type(self).__name__}")
            if group["capturable"]:
                _check_capturable_lr(group, type(self).__name__)
            # (the counters advance even for a group without gradients, as schedulefree's)
            scalars = _step_scalars(group, self._beta1(group), self._beta2(group))
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().float().clone(memory_format=torch.preserve_format)
                    self._make_state(p, state)
            if group["foreach"]:
                for chunk in _param_chunks(params):
                    self._foreach_step(group, chunk, scalars)
            else:
                for p in params:
                    self._single_step(group, p, scalars)
        return loss

    def _single_step(self, group: dict[str, Any], p: Tensor, scalars: tuple[Any, Any, Any, Any]) -> None:
        """The update of one parameter (its state made already)."""
        ckp1, y_rate, z_rate, bias_correction2 = scalars
        grad = _float32(p.grad)  # type: ignore[arg-type]
        y = _float32(p)
        z = self.state[p]["z"]
        u = self._direction(group, p, grad, y, bias_correction2)  # a new tensor
        y.lerp_(z, ckp1)
        y.add_(u.mul(y_rate))
        z.sub_(u.mul_(z_rate))
        _write_weight(p, y, group["stochastic_rounding"], self.generator)

    def _foreach_step(self, group: dict[str, Any], params: list[Tensor], scalars: tuple[Any, Any, Any, Any]) -> None:
        """:meth:`_single_step` as multi-tensor ops over one chunk's ``params``."""
        ckp1, y_rate, z_rate, bias_correction2 = scalars
        grads = _float32_many([p.grad for p in params])  # type: ignore[misc]
        ys = _float32_many(params)
        zs = [self.state[p]["z"] for p in params]
        us = self._directions(group, params, grads, ys, bias_correction2)  # new tensors
        # (a tensor weight per tensor: the single-Tensor overload reads its value back to the host)
        torch._foreach_lerp_(ys, zs, [ckp1] * len(ys) if isinstance(ckp1, Tensor) else ckp1)
        torch._foreach_add_(ys, torch._foreach_mul(us, y_rate))
        torch._foreach_mul_(us, z_rate)
        torch._foreach_sub_(zs, us)
        _write_weights_many(params, ys, group["stochastic_rounding"], self.generator)

    def _beta1(self, group: dict[str, Any]) -> float:
        """The interpolation ``y = (1 − β₁) z + β₁ x`` of the group."""
        raise NotImplementedError

    def _beta2(self, group: dict[str, Any]) -> float | None:
        """The second-moment decay (``None``: no second moment, no bias correction)."""
        return None

    def _check(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for the group's options out of range."""
        _check_schedule_group(group, type(self).__name__)

    def _make_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """The states a parameter needs besides ``z`` (made at its first step)."""

    def _direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, y: Tensor, bias_correction2: Any) -> Tensor:
        """``u`` of one parameter, a new float32 tensor (``grad`` and ``y`` float32, not to be changed)."""
        raise NotImplementedError

    def _directions(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ys: list[Tensor],
                    bias_correction2: Any) -> list[Tensor]:
        """:meth:`_direction` of a chunk's parameters as multi-tensor ops (new tensors)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes held by the states: ``z`` (and AdamW's ``exp_avg_sq``)."""
        return _state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` — the saved mode (``train_mode``) and counters
        restored, the float32 states kept float32 (torch would cast them to a bf16 parameter's dtype)
        — keeping this optimiser's ``capturable`` mode, tensor ``lr`` (filled in place, as are its
        counter tensors, so a captured graph reading them keeps working) and ``foreach``."""
        counters = [{key: group[key] for key in _COUNTERS} for group in self.param_groups]
        _load_keeping_mode(self, state_dict)  # (no per-parameter step count)
        for group, before in zip(self.param_groups, counters):
            _counters_to_mode(group, before)


class AdamWScheduleFree(_ScheduleFree):
    """Schedule-free AdamW with float32 states, bf16 weights rounded stochastically, a multi-tensor
    step and a capturable mode (update equations: the module docstring).

    Call :meth:`train` before the first step (a step in eval mode raises, as schedulefree's) and
    :meth:`eval` before sampling, evaluating or saving — the weights worth keeping are ``x``, which
    eval mode puts into the parameters. No LR schedule: the warm-up is ``warmup_steps``.

    Args:
        params: parameters or parameter groups (a group may override any option below).
        lr: the step size after warm-up; default ``0.0025`` (schedulefree's). A 0-dim tensor needs
            ``capturable=True`` (a float64 one gives the float ``lr``'s results bit for bit).
        betas: ``(β₁, β₂)``: β₁ the interpolation ``y = (1 − β₁) z + β₁ x`` (in ``(0, 1]``), β₂ the
            second-moment decay (in ``[0, 1)``); default ``(0.9, 0.999)``.
        eps: added to the denominator, default ``1e-8``.
        weight_decay: ``λ ≥ 0`` (default 0), an L2 term added to the normalised gradient at ``y``.
        warmup_steps: linear warm-up of the step size over this many steps (default 0).
        r: polynomial weighting ``tʳ`` of the average (default 0).
        weight_lr_power: the average's weights are ``lr_maxᵖ`` (default 2.0; 0: uniform).
        stochastic_rounding: stochastic rounding when writing bf16 weights (else round-to-nearest).
        generator: RNG of the stochastic rounding (default: torch's global RNG).
        foreach: multi-tensor (``torch._foreach_*``) steps and mode switches over chunks of 2²⁴
            elements: the same arithmetic in the same order and the same rounding draws, so
            bit-identical to ``foreach=False`` on a CPU (tested).
        capturable: the step can be recorded in a CUDA graph: the counters ``k``, ``weight_sum``,
            ``lr_max`` and ``scheduled_lr`` are float64 0-dim tensors on the parameters' device
            changed in place, the warm-up and the averaging weight are computed there with
            ``torch.where`` (no branch on a value, no host read), ``lr`` may be a 0-dim tensor.
            On a CPU both modes give bit-identical results (tested). :meth:`train` / :meth:`eval`
            read only host flags, so they run between replays.

    Raises:
        ValueError: a negative ``lr``, ``weight_decay``, ``eps`` or ``warmup_steps``, betas outside
            their ranges, a tensor ``lr`` without ``capturable=True``.

    Example:
        >>> opt = AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=100)
        >>> opt.train(); loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.eval(); save(model)  # the averaged weights x
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         stochastic_rounding=stochastic_rounding, generator=generator, foreach=foreach,
                         capturable=capturable)

    def _beta1(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _beta2(self, group: dict[str, Any]) -> float | None:
        return group["betas"][1]

    def _check(self, group: dict[str, Any]) -> None:
        super()._check(group)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and 0.0 < betas[0] <= 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamWScheduleFree's betas must be (β₁ in (0, 1], β₂ in [0, 1)), e.g. (0.9, 0.999); got {betas!r}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"eps must be >= 0, got {group['eps']!r}")

    def _make_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def _direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, y: Tensor, bias_correction2: Any) -> Tensor:
        """``u = g / (√(v / (1 − β₂ᵗ)) + ε) + λ y``, ``v`` updated first."""
        beta2 = group["betas"][1]
        v = self.state[p]["exp_avg_sq"]
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        u = grad.div(v.div(bias_correction2).sqrt_().add_(group["eps"]))
        if group["weight_decay"]:
            u.add_(y, alpha=group["weight_decay"])
        return u

    def _directions(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ys: list[Tensor],
                    bias_correction2: Any) -> list[Tensor]:
        beta2 = group["betas"][1]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(vs, bias_correction2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group["eps"])
        us = torch._foreach_div(grads, denoms)
        del denoms
        if group["weight_decay"]:
            torch._foreach_add_(us, ys, alpha=group["weight_decay"])
        return us


class SGDScheduleFree(_ScheduleFree):
    """Schedule-free SGD (schedulefree's ``SGDScheduleFree``, kohya's ``"SGDScheduleFree"``):
    :class:`AdamWScheduleFree`'s sequences with ``u = g + λ y`` and ``momentum`` as ``β₁``; one
    float32 state ``z`` (4 B/param). The same modes, rounding, ``foreach`` and ``capturable``.

    Args:
        lr: default ``1.0`` (schedulefree's); momentum: in ``(0, 1)``, default ``0.9``; the others as
            :class:`AdamWScheduleFree`'s.

    Raises:
        ValueError: a negative ``lr``, ``weight_decay`` or ``warmup_steps``, ``momentum`` outside
            ``(0, 1)``, a tensor ``lr`` without ``capturable=True``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         stochastic_rounding=stochastic_rounding, generator=generator, foreach=foreach,
                         capturable=capturable)

    def _beta1(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _check(self, group: dict[str, Any]) -> None:
        super()._check(group)
        if not 0.0 < group["momentum"] < 1.0:
            raise ValueError(f"SGDScheduleFree's momentum must be in (0, 1), e.g. 0.9; got {group['momentum']!r}")

    def _direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, y: Tensor, bias_correction2: Any) -> Tensor:
        """``u = g + λ y``."""
        return grad.add(y, alpha=group["weight_decay"]) if group["weight_decay"] else grad.clone()

    def _directions(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ys: list[Tensor],
                    bias_correction2: Any) -> list[Tensor]:
        if group["weight_decay"]:
            return torch._foreach_add(grads, ys, alpha=group["weight_decay"])
        return torch._foreach_mul(grads, 1.0)  # (copies: the steps change u in place)


def _check_schedule_group(group: dict[str, Any], name: str) -> None:
    _check_common(_lr_value(group["lr"]), group["weight_decay"])
    if isinstance(group["warmup_steps"], bool) or int(group["warmup_steps"]) != group["warmup_steps"] or group["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be a whole number >= 0, got {group['warmup_steps']!r}")
    _check_tensor_lr(group, name)


def _counters_to_mode(group: dict[str, Any], before: dict[str, Any] | None = None) -> None:
    """Put the group's counters where its mode keeps them: Python numbers, or float64 0-dim tensors on
    the parameters' device (``before``'s tensors filled in place when there are some)."""
    for key in _COUNTERS:
        value = group[key]
        if group["capturable"]:
            old = (before or {}).get(key)
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            if isinstance(old, Tensor):
                old.copy_(torch.as_tensor(value, dtype=torch.float64))
                group[key] = old
            else:
                group[key] = torch.as_tensor(value, dtype=torch.float64).to(device).clone()
        elif isinstance(value, Tensor):  # (a state saved capturable, loaded here: one host read at load time)
            group[key] = int(value.item()) if key == "k" else float(value.item())


def _step_scalars(group: dict[str, Any], beta1: float, beta2: float | None) -> tuple[Any, Any, Any, Any]:
    """Advance the group's counters one step and return ``(c_t, lr_t·(β₁(1 − c_t) − 1), lr_t,
    1 − β₂ᵗ)`` (the last ``None`` without ``beta2``): Python floats, or in capturable mode float32
    0-dim tensors computed in float64 on the counters' device (the values the Python floats round
    to) — no host read."""
    warmup, r, power = group["warmup_steps"], group["r"], group["weight_lr_power"]
    if not group["capturable"]:
        k = group["k"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = group["lr"] * sched
        group["scheduled_lr"] = lr
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
        weight = ((k + 1) ** r) * (lr_max ** power)
        weight_sum = group["weight_sum"] = group["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        group["k"] = k + 1
        return ckp1, lr * (beta1 * (1 - ckp1) - 1), lr, None if beta2 is None else 1 - beta2 ** (k + 1)
    k = group["k"]
    t = k + 1
    lr = group["lr"].detach().reshape(()).to(torch.float64) if isinstance(group["lr"], Tensor) else group["lr"]
    if warmup:
        lr = lr * torch.where(k < warmup, t / warmup, torch.ones_like(t))
    else:
        lr = lr * torch.ones_like(t)
    group["scheduled_lr"].copy_(lr)
    lr_max = group["lr_max"]
    torch.maximum(lr, lr_max, out=lr_max)
    weight = torch.pow(t, r) * torch.pow(lr_max, power)
    weight_sum = group["weight_sum"]
    weight_sum.add_(weight)
    ckp1 = torch.where(weight_sum != 0, weight / weight_sum, torch.zeros_like(weight))
    bias_correction2 = None if beta2 is None else (1 - torch.pow(torch.full_like(t, beta2), t)).to(torch.float32)
    k.add_(1)
    f32 = torch.float32
    return ckp1.to(f32), (lr * (beta1 * (1 - ckp1) - 1)).to(f32), lr.to(f32), bias_correction2
