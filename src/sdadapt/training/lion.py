"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): a sign update from one
momentum buffer — half of AdamW's optimiser state.

Per step with gradient ``g`` (all arithmetic in float32, the order of ``lion_pytorch.Lion`` 0.2.5,
kohya's ``optimizer_type = "Lion"``, so float32 runs reproduce it bit for bit)::

    w ← w · (1 − lr·λ)                       weight decay, scaled by the LR (lion-pytorch's default)
    c = β₁ m + (1 − β₁) g                    the interpolation the step follows
    w ← w − lr · sign(c)                     every element moves by exactly lr (or 0 where c = 0)
    m ← β₂ m + (1 − β₂) g                    the momentum (a slower average than c)

Memory per trained parameter: 4 B of momentum in float32, 2 B in bfloat16 (``state_dtype``),
against AdamW's 8 B. bf16 weights and a bf16 momentum are written back with sdadapt's stochastic
rounding (:func:`~sdadapt.training.optim.copy_stochastic_`): a bf16 weight of 1.0 has neighbours
2⁻⁷ ≈ 0.0078 above and 2⁻⁸ ≈ 0.0039 below, so round-to-nearest would drop every Lion step of
``lr < 0.0039`` up and ``lr < 0.002`` down outright; the stochastic rounding keeps each one on average.
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
    _write_back_many,
    _write_weight,
)

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    """Lion with a float32 or bfloat16 momentum, a multi-tensor step and a capturable mode.

    ``w ← w·(1 − lr·λ) − lr·sign(β₁ m + (1 − β₁) g)``, then ``m ← β₂ m + (1 − β₂) g``
    (module docstring). The decay ``λ`` is multiplied by the current LR as in ``lion_pytorch.Lion``
    (its default, ``decoupled_weight_decay=False``), so Lion's usual advice — an LR 3–10× below
    AdamW's and a weight decay 3–10× above it, for the same ``lr·λ`` — carries over.

    Args:
        params: parameters or parameter groups (a group may override any option below).
        lr: the step size (every element moves by ``lr``); default ``1e-4`` (lion-pytorch's). A
            0-dim tensor needs ``capturable=True``; a float64 one gives the float ``lr``'s results
            bit for bit (``make_optimizer`` builds that), a float32 one rounds the LR to float32
            first, which with ``weight_decay`` may move the decay factor ``1 − lr·λ`` by a float32 ulp.
        betas: ``(β₁, β₂)`` in ``[0, 1]``, default ``(0.9, 0.99)``.
        weight_decay: ``λ ≥ 0``, default ``0`` (lion-pytorch's).
        min_8bit_size: with ``torch.bfloat16`` states, tensors of fewer elements keep a float32 momentum
            (bitsandbytes' ``min_8bit_size``: its Lion8bit, which ``Lion8bit`` stands in for, keeps those in float32);
            default 0: every tensor in bfloat16.
        state_dtype: ``torch.float32`` (4 B/param) or ``torch.bfloat16`` (2 B/param, written back
            with stochastic rounding: round-to-nearest would freeze ``m`` once ``(1 − β₂)·g`` falls
            below half its ulp).
        stochastic_rounding: stochastic rounding when writing bf16 weights (otherwise
            round-to-nearest).
        generator: RNG of the stochastic rounding (default: torch's global RNG).
        foreach: update a group's parameters with multi-tensor (``torch._foreach_*``) ops, low
            precision weights, gradients and momenta cast to float32 in one batched pass each and
            every stochastic rounding in one pass: a fixed number of ops per chunk of 2²⁴ elements
            whatever the number of parameters (9 with float32 weights and momenta, 15 with a tensor
            ``lr``, 19 with a bf16 momentum; ``benchmarks/lion_step.py``). The same arithmetic in the same order and the same rounding draws
            (weight then momentum, parameter by parameter), so bit-identical to ``foreach=False`` on
            a CPU (tested).
        capturable: the step can be recorded in a CUDA graph
            (:class:`~sdadapt.training.step_capture.CapturedStep`): ``lr`` may be a 0-dim tensor on
            the parameters' device (changed in place by :func:`~sdadapt.training.optim.set_lr`; the
            graph reads it), the decay factor ``1 − lr·λ`` is computed from it on the device (in
            float64, rounded to float32 as the Python float of the other mode is) and nothing reads
            a value back to the host. Lion keeps no step count, so nothing else changes per step.
            On a CPU both modes give bit-identical results (tested).

    Raises:
        ValueError: a negative ``lr`` or ``weight_decay``, betas outside ``[0, 1]``, another
            ``state_dtype``, a tensor ``lr`` without ``capturable=True`` or of more than one value.

    Example:
        >>> opt = Lion(model.parameters(), lr=3e-5, weight_decay=0.1, state_dtype=torch.bfloat16)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.state_bytes()  # 2 bytes per parameter
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        state_dtype: torch.dtype | str = torch.float32,
        min_8bit_size: int = 0,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        _check_common(_lr_value(lr), weight_decay)
        _check_betas(betas)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "min_8bit_size": min_8bit_size,
                    "state_dtype": _lion_state_dtype(state_dtype),
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        super().__init__(params, defaults)
        self.generator = generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, validating a group's own ``lr``, ``betas``,
        ``weight_decay`` and ``state_dtype``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_dtype"] = _lion_state_dtype(group["state_dtype"])
        _check_betas(group["betas"])
        _check_common(_lr_value(group["lr"]), group["weight_decay"])
        _check_tensor_lr(group, "Lion")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        for group in self.param_groups:
            params = _params_with_grads(group, "sdadapt.training.lion.Lion")
            if not params:
                continue
            _check_capturable_lr(group, "Lion")
            for p in params:
                state = self.state[p]
                if not state:  # (a bf16 group's tensors under min_8bit_size: float32, as bitsandbytes' Lion8bit keeps them)
                    low = group["state_dtype"] != "float32" and p.numel() >= group.get("min_8bit_size", 0)
                    dtype = torch.bfloat16 if low else torch.float32
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            scalars = _lion_scalars(group)  # (once per group and step: device ops in capturable mode)
            if group["foreach"]:
                for chunk in _param_chunks(params):
                    self._foreach_step(group, chunk, scalars)
            else:
                for p in params:
                    self._single_step(group, p, scalars)
        return loss

    def _single_step(self, group: dict[str, Any], p: Tensor, scalars: tuple[float | Tensor | None, float | Tensor]) -> None:
        """The update of one parameter (its state made already; ``scalars``: :func:`_lion_scalars`)."""
        beta1, beta2 = group["betas"]
        decay, neg_lr = scalars
        grad = _float32(p.grad)  # type: ignore[arg-type]
        w = _float32(p)  # fp32 working weight
        stored = self.state[p]["exp_avg"]
        m = _float32(stored)
        if decay is not None:
            w.mul_(decay)
        c = _lion_direction(m, grad, beta1)
        if isinstance(neg_lr, Tensor):  # −lr·sign: exact either way, so the same weights as alpha=
            w.add_(c.mul_(neg_lr))
        else:
            w.add_(c, alpha=neg_lr)
        m.mul_(beta2).add_(grad, alpha=1 - beta2)
        _write_weight(p, w, group["stochastic_rounding"], self.generator)
        if m is not stored:
            _write_weight(stored, m, True, self.generator)

    def _foreach_step(self, group: dict[str, Any], params: list[Tensor],
                      scalars: tuple[float | Tensor | None, float | Tensor]) -> None:
        """:meth:`_single_step` as multi-tensor ops over one chunk's ``params``."""
        beta1, beta2 = group["betas"]
        decay, neg_lr = scalars
        stored = [self.state[p]["exp_avg"] for p in params]
        grads = _float32_many([p.grad for p in params])  # type: ignore[misc]
        weights = _float32_many(params)
        moments = _float32_many(stored)
        if decay is not None:
            torch._foreach_mul_(weights, decay)
        cs = _lion_directions(moments, grads, beta1)
        if isinstance(neg_lr, Tensor):
            torch._foreach_mul_(cs, neg_lr)
            torch._foreach_add_(weights, cs)
        else:
            torch._foreach_add_(weights, cs, alpha=neg_lr)
        del cs
        torch._foreach_mul_(moments, beta2)
        torch._foreach_add_(moments, grads, alpha=1 - beta2)
        # write back in the per-parameter order (weight, then momentum, parameter by parameter): a bf16
        # momentum always rounded stochastically, a float32 one updated in a row-major copy (channels_last) copied
        _write_back_many([write for p, w, s, m in zip(params, weights, stored, moments)
                          for write in ((p, w, group["stochastic_rounding"]), (s, m, True))], self.generator)

    def state_bytes(self) -> int:
        """Bytes held by the momentum buffers."""
        return _state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping the saved momentum dtype (torch
        would cast a float32 momentum to a bf16 parameter's dtype) and this optimiser's
        ``capturable`` mode, tensor ``lr`` (filled with the saved value in place, so a captured
        graph reading it keeps working) and ``foreach`` (:func:`~sdadapt.training.optim._load_keeping_mode`)."""
        _load_keeping_mode(self, state_dict)  # (Lion keeps no step count)


def _lion_state_dtype(state_dtype: torch.dtype | str) -> str:
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}.get(
        state_dtype) if isinstance(state_dtype, (torch.dtype, str)) else None
    if name is None:
        raise ValueError(f"Lion's state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r} "
                         "(no 8-bit momentum: a bf16 one is 2 bytes per parameter)")
    return name


def _check_betas(betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b <= 1.0 for b in betas)):
        raise ValueError(f"Lion's betas must be two numbers in [0, 1], e.g. (0.9, 0.99); got {betas!r}")


def _lion_direction(m: Tensor, g: Tensor, beta1: float) -> Tensor:
    """Lion's update direction ``sign(β₁ m + (1 − β₁) g)``, a new float32 tensor of ``m``'s shape in
    ``{−1, 0, 1}`` (``m``, ``g``: float32, unchanged)."""
    return m.mul(beta1).add_(g, alpha=1 - beta1).sign_()


def _lion_directions(ms: list[Tensor], gs: list[Tensor], beta1: float) -> list[Tensor]:
    """:func:`_lion_direction` of each pair as multi-tensor ops (the same bits)."""
    us = torch._foreach_mul(ms, beta1)
    torch._foreach_add_(us, gs, alpha=1 - beta1)
    torch._foreach_sign_(us)
    return list(us)


def _lion_scalars(group: dict[str, Any]) -> tuple[float | Tensor | None, float | Tensor]:
    """``(1 − lr·λ or None when λ = 0, −lr)``: Python floats, or with a tensor ``lr`` 0-dim float32
    tensors on its device (the decay computed in float64 and rounded once, as the kernels round
    the Python float) — no host read."""
    lr, wd = group["lr"], group["weight_decay"]
    if not isinstance(lr, Tensor):
        return (1 - lr * wd if wd else None), -lr
    lr32 = lr.detach().reshape(())
    decay = (1 - lr32.to(torch.float64) * wd).to(torch.float32) if wd else None
    return decay, -lr32.to(torch.float32)
