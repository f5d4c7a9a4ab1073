"""What the optimisers that estimate one step size ``d`` for every parameter group share
(:class:`~sdadapt.training.prodigy.Prodigy`, :mod:`sdadapt.training.dadapt`'s D-Adaptation): the
estimate's scalars as 0-dim tensors on the parameters' device (in every param group, as the
reference packages keep them), one LR (or 0) for all groups, the options every group must share,
the float32 gradient with coupled weight decay, the weights written back, and a
``load_state_dict`` that keeps the loading optimiser's own mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .optim import (
    _check_lr_device,
    _check_tensor_lr,
    _float32,
    _float32_many,
    _foreach_add_quotient_,
    _load_keeping_mode,
    _lr_value,
    _param_chunks,
    _params_with_grads,
    _state_bytes,
    _write_weight,
    _write_weights_many,
)

__all__ = ["StepSizeEstimator"]


class StepSizeEstimator(torch.optim.Optimizer):
    """Base of the optimisers whose LR multiplies an estimated step size shared by every group.

    A subclass sets :attr:`_NAME` (messages), :attr:`_PACKAGE` (the reference implementation the
    messages name), :attr:`_GLOBAL_OPTIONS` (options every group must share) and :attr:`_SCALARS`
    (the estimate's scalars and their start values, ``None``: ``d0``), and implements
    ``_init_state(state, p, group)`` and ``step``.
    """

    _NAME: ClassVar[str] = "step-size estimator"
    _PACKAGE: ClassVar[str] = ""
    _GLOBAL_OPTIONS: ClassVar[tuple[str, ...]] = ("betas", "d0")
    _SCALARS: ClassVar[dict[str, float | None]] = {"d": None, "k": 0.0}

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any], *,
                 d0: float, fsdp_in_use: bool, generator: torch.Generator | None) -> None:
        name = self._NAME
        if not _lr_value(defaults["lr"]) > 0.0:
            raise ValueError(f"{name}: lr must be > 0 (a multiplier of the estimated step size; kohya uses 1.0), "
                             f"got {defaults['lr']!r}")
        if fsdp_in_use:
            raise ValueError(f"{name}: fsdp_in_use=True (sharded parameters, the estimate's sums all-reduced) is not "
                             "supported; train unsharded parameters or use the adamw optimiser")
        if not d0 > 0.0:
            raise ValueError(f"{name}: d0 must be > 0 (the initial step-size estimate, e.g. 1e-6), got {d0!r}")
        betas = defaults["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
        defaults = {**defaults, "betas": (float(betas[0]), float(betas[1])), "d0": float(d0)}
        self._scalars: dict[str, Tensor] = {}
        super().__init__(params, defaults)
        self.generator = generator
        device = self.param_groups[0]["params"][0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
        self._scalars = {key: torch.tensor(d0 if start is None else start, dtype=dtype, device=device)
                         for key, start in self._SCALARS.items()}
        self._share_scalars()
        self._check_lrs()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, checking the group's own options and that
        the estimate's shared ones equal the first group's."""
        super().add_param_group(param_group)
        group, name = self.param_groups[-1], self._NAME
        if "eps" in group and not group["eps"] > 0.0:
            raise ValueError(f"{name}: eps must be > 0, got {group['eps']!r}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']!r}")
        _check_tensor_lr(group, name)
        first = self.param_groups[0]
        differ = [key for key in self._GLOBAL_OPTIONS if group[key] != first[key]]
        if differ:
            raise ValueError(f"{name}: every parameter group must have the same {', '.join(differ)} (the step-size "
                             "estimate is one for all groups)")
        if self._scalars:
            self._share_scalars()
            self._check_lrs()

    def _share_scalars(self) -> None:
        for group in self.param_groups:
            group.update(self._scalars)

    def _check_lrs(self) -> None:
        """The groups' LRs are equal or 0 (the reference packages' rule: one step size for all)."""
        lrs = {_lr_value(group["lr"]) for group in self.param_groups} - {0.0}
        if len(lrs) > 1:
            raise ValueError(f"{self._NAME}: the parameter groups have learning rates {sorted(lrs)}; {self._NAME} "
                             "estimates one step size for all, so every group's lr must be the same or 0 "
                             f"({self._PACKAGE} refuses the same): give the text encoder and the U-Net one learning "
                             "rate and leave out LoRA+ ratios and block LR weights")

    def _lr_max(self, device: torch.device, dtype: torch.dtype) -> Any:
        """The largest group LR: a Python float (the LRs checked), or a 0-dim ``dtype`` tensor on
        ``device`` when a group's LR is a tensor (no host read)."""
        lrs = [group["lr"] for group in self.param_groups]
        if not any(isinstance(lr, Tensor) for lr in lrs):
            self._check_lrs()
            return max(lrs)
        for lr in lrs:
            _check_lr_device(lr, device, self._NAME)
        if len(lrs) == 1:
            return lrs[0].reshape(()).to(dtype)
        return torch.stack([lr.reshape(()).to(dtype) if isinstance(lr, Tensor) else torch.full((), lr, dtype=dtype,
                                                                                                device=device)
                            for lr in lrs]).amax()

    def _active_groups(self) -> list[tuple[dict[str, Any], list[Tensor], Any]]:
        """``(group, parameters with a gradient, on)`` for every group that may train, their states
        made: ``on`` is True, or with a tensor LR a 0-dim bool tensor (masked on the device: a graph
        cannot branch)."""
        out = []
        for group in self.param_groups:
            lr = group["lr"]
            on = lr > 0 if isinstance(lr, Tensor) else lr > 0.0
            params = _params_with_grads(group, f"sdadapt's {self._NAME}")
            if not params or on is False:
                continue
            for p in params:
                if not self.state[p]:
                    self._init_state(self.state[p], p, group)
            out.append((group, params, on))
        return out

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------ per-tensor pieces
    def _gradient(self, group: dict[str, Any], grad: Tensor, w: Tensor) -> Tensor:
        """``g`` in float32, plus ``λ w`` with coupled weight decay (a new tensor: ``p.grad`` is kept)."""
        g = _float32(grad)
        decay = group["weight_decay"]
        if decay != 0 and not group["decouple"]:
            g = torch.add(g, w, alpha=decay)
        return g

    def _gradients(self, group: dict[str, Any], chunk: list[Tensor], ws: list[Tensor]) -> list[Tensor]:
        """:meth:`_gradient` of every parameter of ``chunk`` (``ws``: their float32 weights)."""
        gs = _float32_many([p.grad for p in chunk])  # type: ignore[misc]
        decay = group["weight_decay"]
        if decay != 0 and not group["decouple"]:
            gs = torch._foreach_add(gs, ws, alpha=decay)
        return gs

    def _adam_update(self, group: dict[str, Any], params: list[Tensor], shrink: Tensor | None, scale: Tensor,
                     eps: float | Tensor) -> None:
        """The weights of the Adam-like estimators (after their estimate), each ``w`` of ``params``::

            w ← w + shrink · w                              (decoupled weight decay, when ``shrink`` is given)
            w ← w + (n · scale) / (√v + eps)                n: the first moment, or without one the gradient

        per parameter, or with the group's ``foreach`` as multi-tensor ops per chunk (the same
        bits on a CPU). ``shrink``, ``scale``: float32 0-dim tensors; ``eps`` a number or one."""
        if not group["foreach"]:
            for p in params:
                state = self.state[p]
                w = _float32(p)
                denom = state["exp_avg_sq"].sqrt().add_(eps)
                if shrink is not None:
                    w.add_(w.mul(shrink))
                numerator = state["exp_avg"] if "exp_avg" in state else self._gradient(group, p.grad, w)  # type: ignore[arg-type]
                w.addcdiv_(numerator.mul(scale), denom)  # w + (n·scale) / denom, as the multi-tensor path
                _write_weight(p, w, group["stochastic_rounding"], self.generator)
            return
        for chunk in _param_chunks(params):
            states = [self.state[p] for p in chunk]
            ws = _float32_many(chunk)  # (the float32 parameters themselves: updated in place)
            denoms = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
            if isinstance(eps, Tensor):  # (alpha: the tensor overload; without it torch reads eps to the host)
                torch._foreach_add_(denoms, eps, alpha=1)
            else:
                torch._foreach_add_(denoms, eps)
            if shrink is not None:
                torch._foreach_add_(ws, torch._foreach_mul(ws, shrink))
            numerators = ([s["exp_avg"] for s in states] if "exp_avg" in states[0]
                          else self._gradients(group, chunk, ws))
            _foreach_add_quotient_(ws, numerators, scale, denoms)
            del denoms
            _write_weights_many(chunk, ws, group["stochastic_rounding"], self.generator)  # (bf16: stochastic rounding)

    # -------------------------------------------------------------------------- saved states
    def state_bytes(self) -> int:
        """Bytes held by the per-parameter state tensors."""
        return _state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping float32 states, this optimiser's
        ``capturable`` mode and tensor ``lr`` (filled with the saved value), each group's ``foreach``
        (a state saved on a CPU resumes multi-tensor on a GPU; the numbers are the same) and its
        estimate tensors (filled with the saved values — numbers or tensors, the reference package's
        state's too), so a captured graph keeps reading the same memory."""
        # options the reference package's state lacks (foreach, capturable, stochastic_rounding): this optimiser's
        saved_groups = [{**{key: value for key, value in group.items() if key not in ("params", *self._SCALARS)}, **saved}
                        for group, saved in zip(self.param_groups, state_dict["param_groups"])]
        _load_keeping_mode(self, {**state_dict, "param_groups": saved_groups}, host_step=lambda step: step)
        for key, tensor in self._scalars.items():
            value = saved_groups[0].get(key)
            if value is not None:
                tensor.copy_(torch.as_tensor(value, dtype=tensor.dtype))
        self._share_scalars()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state.pop("step", None)  # (the reference packages' per-parameter count: not used by the step)
                    self._restore_state(state, p, group)

    def _restore_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        """A loaded parameter state as the step keeps it: float32 tensors of ``p``'s shape."""
        for key, value in list(state.items()):
            if isinstance(value, Tensor):
                state[key] = value.to(torch.float32).reshape(p.shape).clone()


def _sum64(values: Sequence[Tensor]) -> Tensor:
    """Float32 0-dim tensors summed in float64 (float32 on MPS): one stack and one sum."""
    dtype = torch.float32 if values[0].device.type == "mps" else torch.float64
    return torch.stack(list(values)).to(dtype).sum()


def _growth_rate(optimizer: str, growth_rate: float) -> float:
    """``growth_rate`` (the largest factor the estimate ``d`` may grow by in one step) as a float,
    checked: > 0, ``inf`` for unbounded (dadaptation's and prodigyopt's default)."""
    if not growth_rate > 0.0:
        raise ValueError(f"{optimizer}: growth_rate must be > 0 (e.g. 1.02, or inf: unbounded), got {growth_rate!r}")
    return float(growth_rate)


def _bias_corrected(step_size: Tensor, group: dict[str, Any], k: Tensor) -> Tensor:
    """``step_size`` (a 0-dim tensor) times Adam's bias correction ``√(1 − β₂^(k+1)) / (1 − β₁^(k+1))``
    at step ``k`` (0-based, the estimate's 0-dim count) when the group's ``use_bias_correction`` is
    set, else ``step_size`` itself: ``η = d · lr · b`` as dadaptation 3.2 (``dadaptation/dadapt_adam.py``,
    ``DAdaptAdam.step``) and prodigyopt 1.1.2 (``prodigyopt/prodigy.py``, ``Prodigy.step``) compute
    it (their ``bias_correction``, from group 0's betas and ``k``)."""
    if not group["use_bias_correction"]:
        return step_size
    beta1, beta2 = group["betas"]
    t = k + 1
    return step_size * ((1 - torch.pow(beta2, t)).sqrt() / (1 - torch.pow(beta1, t)))


def _adam_moments(state: dict[str, Any], g: Tensor, b1: Any, b2: Any, c_m: Tensor, c_v: Tensor) -> None:
    """The Adam-like estimators' moments of one parameter, in place::

        m ← b1 m + (g · c_m)          (when the state has one)          v ← b2 v + (g · c_v) · g

    (``g·c`` rounded first, then added: the multi-tensor path's rounding, :func:`_adam_moments_many`)."""
    if "exp_avg" in state:
        state["exp_avg"].mul_(b1).add_(g.mul(c_m))
    state["exp_avg_sq"].mul_(b2).addcmul_(g.mul(c_v), g)


def _adam_moments_many(states: Sequence[dict[str, Any]], gs: Sequence[Tensor], b1: Any, b2: Any, c_m: Tensor,
                       c_v: Tensor) -> None:
    """:func:`_adam_moments` of a chunk's parameters as multi-tensor ops (the same bits on a CPU)."""
    if "exp_avg" in states[0]:
        ms = [s["exp_avg"] for s in states]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, torch._foreach_mul(gs, c_m))
    vs = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, torch._foreach_mul(gs, c_v), gs)


def _total(values: Sequence[Tensor]) -> Tensor:
    """The sum of the groups' 0-dim tensors (one stack and one sum; the tensor itself when there is one)."""
    return torch.stack(list(values)).sum() if len(values) > 1 else values[0]


def _masked(on: Any, factors: Sequence[Tensor], decays: Sequence[float]) -> tuple[list[Any], list[Any]]:
    """A group's per-step factors (0-dim tensors) and decay rates for its moments: as given when
    ``on`` is True, or masked on the device with a tensor LR's ``on`` (factors 0 and decays 1 where
    the group is off, so its moments stay as they are without a branch a graph could not record)."""
    if not isinstance(on, Tensor):
        return list(factors), list(decays)
    return [torch.where(on, c, 0.0) for c in factors], [torch.where(on, b, 1.0).float() for b in decays]
