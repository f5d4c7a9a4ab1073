"""Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"):
Adam whose step size ``d`` is estimated from the distance travelled, as ``prodigyopt`` 1.1.2 computes it.

kohya users train LoRAs with ``optimizer_type = "Prodigy"`` and ``learning_rate = 1.0``: the LR is a
multiplier of the estimate, not a step size. This module's :class:`Prodigy` keeps the global
estimate (sums over every parameter of every group) on the parameters' device, so a step reads
nothing back to the host (``prodigyopt`` reads two values per parameter and step), and so the step
can be recorded in a CUDA graph (``capturable=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .optim import (
    _call_closure,
    _flat,
    _float32,
    _float32_many,
    _param_chunks,
    _step_options,
)
from .step_size_estimate import (
    StepSizeEstimator,
    _adam_moments,
    _adam_moments_many,
    _bias_corrected,
    _growth_rate,
    _masked,
    _sum64,
    _total,
)

__all__ = ["Prodigy"]

class Prodigy(StepSizeEstimator):
    r"""Prodigy: Adam with a learned step size ``d``, the arithmetic of ``prodigyopt.Prodigy`` 1.1.2.

    Step ``k`` (0-based) with gradients ``g`` of every parameter ``w``; ``d`` starts at ``d0``,
    ``r = d_numerator`` and ``s`` at 0, ``w₀`` is each weight at its first step, ``lr`` the largest
    group LR, ``β₃ = √β₂`` unless given; sums run over every parameter of every group whose LR is
    not 0, and over every ``slice_p``-th element of each (flat) tensor for ``r`` and ``s``::

        g ← g + λ w                                        (decouple=False: coupled weight decay)
        b = √(1 − β₂^(k+1)) / (1 − β₁^(k+1))  if use_bias_correction else 1
        η = d · lr · b                                     (the step size, from this step's d)
        r ← β₃ r + (d / d0) · η · Σ ⟨g, w₀ − w⟩
        m ← β₁ m + d (1 − β₁) g          v ← β₂ v + d² (1 − β₂) g²
        s ← β₃ s + (d / d0) · (d if safeguard_warmup else η) · g
        d̂ = d_coef · r / Σ ‖s‖₁
        d ← max(d, d̂) if d == d0 (first growth) ;  d_max ← max(d_max, d̂) ;  d ← min(d_max, d · growth_rate)
        w ← w − λ η w                                      (decouple=True: decoupled weight decay)
        w ← w − η · m / (√v + d ε)          (β₁ = 0: w ← w − η d · g / (√v + d ε))

    (the new ``d`` in ``d ε`` and the ``β₁ = 0`` step, this step's in ``η``). When ``Σ ‖s‖₁`` is 0
    (no gradient yet, e.g. every group's LR is 0) the step changes no weight, ``d``, ``r`` nor
    ``k``, as ``prodigyopt`` returns early (the moments still decay).

    Differences from ``prodigyopt`` (same numbers otherwise; the tests compare over 20 steps):

    * The estimate ``d``, ``d_max``, ``r``, ``Σ‖s‖₁``, ``d̂`` and ``k`` are float64 0-dim tensors on
      the parameters' device (float32 on MPS, which has no float64), in every group as in
      ``prodigyopt``'s (``param_groups[0]["d"]``), instead of Python floats: no host read per step
      (``prodigyopt`` calls ``.item()`` twice per parameter: ``⟨g, w₀ − w⟩`` and ``‖s‖₁``, so
      ``2 × parameters`` host syncs per step). The per-tensor sums are float32 as
      ``prodigyopt``'s, their sum float64 (summed in another order: last-bit differences of the
      float64 sum).
    * The moments and ``s`` are float32 whatever the parameter dtype; bf16/fp16 parameters are
      updated in float32 and written back with stochastic rounding (bf16, ``stochastic_rounding``)
      — ``prodigyopt`` keeps states in the parameter's dtype and rounds to nearest.
    * ``w₀`` is stored (float32, sliced) for every parameter; ``prodigyopt`` keeps a 0-dim zero for
      a parameter that is all zero at its first step (a LoRA up weight), which needs a host read.
      The sums are the same.
    * A group whose LR is 0 is left as it is. ``prodigyopt`` leaves it out of the estimate too but
      still applies decoupled weight decay to it at the others' step size ``η`` (and with
      ``β₁ = 0`` a step of ``η d · g / (√v + d ε)``).
    * The gradient is not changed in place by coupled weight decay (``prodigyopt`` adds ``λ w``
      into ``p.grad``).
    * Options the one estimate shares (``betas``, ``beta3``, ``d0``, ``d_coef``, ``growth_rate``,
      ``use_bias_correction``, ``decouple``) must be the same in every group (``prodigyopt`` reads
      group 0's); the LRs of the groups must be equal or 0, as in ``prodigyopt`` (checked when the
      optimiser is built and, with Python-float LRs, at every step).
    * ``fsdp_in_use=True`` (sharded parameters, an all-reduce of the two sums) is refused.

    Args:
        params: parameters or parameter groups (a group may set ``lr``, ``weight_decay``, ``eps``,
            ``slice_p``, ``safeguard_warmup``, ``stochastic_rounding``).
        lr: multiplier of the estimated step size (kohya/prodigyopt: leave it at 1.0).
        betas: ``(β₁, β₂)``, each in ``[0, 1)``; ``beta3``: the estimate's decay (``None``: ``√β₂``).
        eps: added to ``√v`` (times ``d``); > 0.
        weight_decay: ``λ`` ≥ 0; ``decouple``: AdamW-style (True) or added to the gradient (False).
        use_bias_correction: Adam's bias correction in ``η``. safeguard_warmup: ``d`` instead of
            ``η`` in ``s`` (avoids an overestimate during a warm-up).
        d0: the initial estimate (> 0); d_coef: multiplies ``d̂`` (> 0, the knob to tune);
            growth_rate: largest factor ``d`` grows by per step (> 0; ``inf``: unbounded).
        fsdp_in_use: must be False (see above).
        slice_p: use every ``slice_p``-th element for ``r`` and ``s`` (≥ 1; memory).
        stochastic_rounding: stochastic rounding when writing bf16 weights.
        generator: RNG for stochastic rounding (default: torch's global RNG).
        foreach: update each group with multi-tensor (``torch._foreach_*``) ops — a fixed number of
            launches per chunk of ≤ 2²⁴ elements plus one dot product per parameter, instead of ~15
            launches per parameter; bit-identical to ``foreach=False`` on CPU (tested).
        capturable: the step can be recorded in a CUDA graph: ``lr`` may be a 0-dim tensor on the
            parameters' device (filled in place by the schedule), and a group whose LR tensor is 0 is
            masked on the device instead of skipped. Every other scalar is a device tensor in both
            modes, so on CPU both give bit-identical results (tested, LRs exact in float32: a
            tensor LR holds float32).

    Example:
        >>> opt = Prodigy(lora.parameters(), lr=1.0, weight_decay=0.01, use_bias_correction=True,
        ...               safeguard_warmup=True, betas=(0.9, 0.99), d_coef=2.0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.param_groups[0]["d"]  # the estimated step size (a 0-dim tensor)
    """

    _NAME = "Prodigy"
    _PACKAGE = "prodigyopt"
    #: options the one estimate shares: every group must have the same value
    _GLOBAL_OPTIONS = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "decouple")
    #: the estimate's scalars (start values; None: d0), 0-dim tensors on the parameters' device in
    #: every param group (``param_groups[i]["d"]`` is what kohya logs as ``d*lr`` with the group's ``lr``)
    _SCALARS: ClassVar[dict[str, float | None]] = {"d": None, "d_max": None, "d_numerator": 0.0, "d_denom": 0.0,
                                                   "d_hat": None, "k": 0.0}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        if not d_coef > 0.0:
            raise ValueError(f"Prodigy: d_coef must be > 0 (e.g. 0.5, 1 or 2), got {d_coef!r}")
        growth_rate = _growth_rate("Prodigy", growth_rate)
        if beta3 is not None and not 0.0 <= beta3 < 1.0:
            raise ValueError(f"Prodigy: beta3 must be in [0, 1) or None (√β₂), got {beta3!r}")
        defaults = {"lr": lr, "betas": betas,
                    "beta3": None if beta3 is None else float(beta3), "eps": eps, "weight_decay": weight_decay,
                    "decouple": bool(decouple), "use_bias_correction": bool(use_bias_correction),
                    "safeguard_warmup": bool(safeguard_warmup), "d_coef": float(d_coef),
                    "growth_rate": growth_rate, "slice_p": slice_p,
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        super().__init__(params, defaults, d0=d0, fsdp_in_use=fsdp_in_use, generator=generator)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`StepSizeEstimator.add_param_group`, checking ``slice_p`` too."""
        super().add_param_group(param_group)
        slice_p = self.param_groups[-1]["slice_p"]
        if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
            raise ValueError(f"Prodigy: slice_p must be a whole number >= 1 (1: every element), got {slice_p!r}")

    # ------------------------------------------------------------------------------- the step
    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        beta1 = group["betas"][0]
        sliced = _flat(p.detach())[::group["slice_p"]]  # (⌈n / slice_p⌉,)
        state["s"] = torch.zeros(sliced.shape, dtype=torch.float32, device=p.device)  # (⌈n / slice_p⌉,)
        state["p0"] = sliced.to(torch.float32, copy=True)  # w₀: (⌈n / slice_p⌉,)
        if beta1 > 0:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Prodigy step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        groups = self.param_groups
        first = groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        d0, S = first["d0"], self._scalars
        d, k = S["d"], S["k"]
        dlr = _bias_corrected(d * self._lr_max(d.device, d.dtype), first, k)  # η, from this step's d
        # ---- pass 1: moments, s, and the estimate's two sums (float32 per tensor, float64 over tensors)
        dots: list[Tensor] = []  # (d/d0)·η·Σ⟨g, w₀ − w⟩ per group, float64
        norms: list[Tensor] = []  # Σ‖s‖₁ per group, float64
        active = self._active_groups()  # (group, parameters with a gradient, on: True or a 0-dim bool tensor)
        m_factor, v_factor = (d * (1 - beta1)).float(), (d * d * (1 - beta2)).float()  # every group's c_m, c_v
        for group, params, on in active:
            c_s = ((d / d0) * (d if group["safeguard_warmup"] else dlr)).float()
            (c_m, c_v, c_s), (b1, b2, b3) = _masked(on, (m_factor, v_factor, c_s), (beta1, beta2, beta3))
            pass1 = self._foreach_pass1 if group["foreach"] else self._single_pass1
            dot, norm = pass1(group, params, b1, b2, b3, c_m, c_v, c_s)
            dot = dot * ((d / d0) * dlr)
            if isinstance(on, Tensor):
                dot, norm = dot * on, norm * on
            dots.append(dot)
            norms.append(norm)
        if not dots:
            return loss
        # ---- the estimate
        d_numerator = S["d_numerator"] * beta3 + _total(dots)
        d_denom = _total(norms)
        ok = d_denom > 0  # prodigyopt returns before the estimate and the weights when Σ‖s‖₁ is 0
        d_hat = first["d_coef"] * d_numerator / d_denom
        grown = torch.where(d == d0, torch.maximum(d, d_hat), d)
        d_max = torch.maximum(S["d_max"], d_hat)
        d_new = torch.minimum(d_max, grown * first["growth_rate"])
        d_new = torch.where(ok, d_new, d)
        step_size = torch.where(ok, dlr, 0.0)  # η, or 0: no weight changes
        # ---- pass 2: the weights, with the new d in d·ε
        for group, params, on in active:
            eta = step_size * on if isinstance(on, Tensor) else step_size
            decay = group["weight_decay"]
            shrink = (-decay * eta).float() if decay != 0 and first["decouple"] else None
            scale = (-eta).float() if beta1 > 0 else (-eta * d_new).float()
            eps_d = (d_new * group["eps"]).float()
            self._adam_update(group, params, shrink, scale, eps_d)
        # commit the estimate in place (a captured graph reads these tensors)
        S["d_numerator"].copy_(torch.where(ok, d_numerator, S["d_numerator"]))
        S["d_denom"].copy_(torch.where(ok, d_denom, S["d_denom"]))
        S["d_hat"].copy_(torch.where(ok, d_hat, S["d_hat"]))
        S["d_max"].copy_(torch.where(ok, d_max, S["d_max"]))
        S["d"].copy_(d_new)
        S["k"].add_(ok.to(k.dtype))
        return loss

    def _single_pass1(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, b3: Any,
                      c_m: Tensor, c_v: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """Moments and ``s`` of each parameter; returns ``(Σ⟨g, w₀ − w⟩, Σ‖s‖₁)`` as float64 0-dim tensors."""
        sp = group["slice_p"]
        dots, norms = [], []
        for p in params:
            state = self.state[p]
            w = _float32(p)  # (*shape) float32
            g = self._gradient(group, p.grad, w)
            sg = _flat(g)[::sp]  # (n/sp,)
            dots.append(torch.dot(sg, state["p0"] - _flat(w)[::sp]))
            # (g·c, then + m: addcmul_ with a 0-dim factor fuses the two, rounding once, unlike the
            # multi-tensor path's _foreach_mul and _foreach_add)
            _adam_moments(state, g, b1, b2, c_m, c_v)
            state["s"].mul_(b3).add_(sg.mul(c_s))
            norms.append(torch.linalg.vector_norm(state["s"], 1))
        return _sum64(dots), _sum64(norms)

    def _foreach_pass1(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, b3: Any,
                       c_m: Tensor, c_v: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_single_pass1` with multi-tensor ops per chunk (one ``dot`` per parameter)."""
        sp = group["slice_p"]
        dots: list[Tensor] = []
        norms: list[Tensor] = []
        for chunk in _param_chunks(params):
            states = [self.state[p] for p in chunk]
            ws = _float32_many(chunk)  # (the float32 parameters themselves: updated in place)
            gs = self._gradients(group, chunk, ws)
            sgs = [_flat(g)[::sp] for g in gs]
            diffs = torch._foreach_sub([s["p0"] for s in states], [_flat(w)[::sp] for w in ws])
            dots += [torch.dot(a, b) for a, b in zip(sgs, diffs)]
            del diffs
            _adam_moments_many(states, gs, b1, b2, c_m, c_v)
            ss = [s["s"] for s in states]
            torch._foreach_mul_(ss, b3)
            torch._foreach_add_(ss, torch._foreach_mul(sgs, c_s))
            norms += list(torch._foreach_norm(ss, 1))
        return _sum64(dots), _sum64(norms)

    # -------------------------------------------------------------------------- saved states
    def _restore_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        """A loaded parameter state as the step keeps it (float32; ``s`` and ``p0`` sliced by the
        group's ``slice_p``); a ``prodigyopt`` 0-dim ``p0`` (an all-zero parameter) is expanded to
        the parameter's (sliced) shape."""
        sliced = _flat(p.detach())[::group["slice_p"]].shape
        for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
            if key in state:
                value = state[key].to(torch.float32)
                if key == "p0" and value.dim() == 0:
                    value = value.expand(sliced)
                state[key] = value.reshape(sliced if key in ("s", "p0") else p.shape).clone()
