"""D-Adaptation (Defazio & Mishchenko 2023, "Learning-Rate-Free Learning by D-Adaptation"): Adam
and Lion whose step size ``d`` is estimated from the gradients seen, as ``dadaptation`` 3.2
computes it (kohya's ``optimizer_type = "DAdaptAdam"`` / ``"DAdaptLion"``), and
:class:`DAdaptAdamPreprint`, dadaptation's experimental first estimate, which kohya's
``optimizer_type = "DAdaptation"`` trains with.

kohya users train with ``learning_rate = 1.0``: the LR multiplies the estimate, it is not a step
size. The classes keep the estimate (sums over every parameter of
every group) on the parameters' device, so a step reads nothing back to the host (``dadaptation``
reads two values per parameter and step, three for the preprint) and can be recorded in a CUDA graph (``capturable=True``).
The machinery (device scalars, one LR for all groups, saved states) is
:class:`~sdadapt.training.step_size_estimate.StepSizeEstimator`'s, shared with
:class:`~sdadapt.training.prodigy.Prodigy` (the same authors' later method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .lion import _lion_direction, _lion_directions
from .optim import (
    _call_closure,
    _flat,
    _float32,
    _float32_many,
    _param_chunks,
    _step_options,
    _write_weight,
    _write_weights_many,
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

__all__ = ["DAdaptAdam", "DAdaptAdamPreprint", "DAdaptLion"]

#: the estimate's scalars (their start values, ``d`` from ``d0``): 0-dim tensors on the parameters'
#: device, in every param group as in ``dadaptation`` (``param_groups[0]["d"]``; kohya logs ``d * lr``)
_SCALARS = {"d": None, "numerator_weighted": 0.0, "k": 0.0}


class _DAdaptation(StepSizeEstimator):
    """What the D-Adaptation optimisers share beyond :class:`StepSizeEstimator`: the estimate of
    DAdaptAdam and DAdaptLion, and its commit."""

    _NAME = "D-Adaptation"
    _PACKAGE = "dadaptation"
    _GLOBAL_OPTIONS: ClassVar[tuple[str, ...]] = ("betas", "d0")
    _SCALARS: ClassVar[dict[str, float | None]] = _SCALARS

    def _estimate(self, dots: list[Tensor], norms: list[Tensor], sqrt_beta2: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(numerator_weighted, d̂, ok)`` from the step's float64 sums (``ok``: ``Σ‖s‖₁ > 0``)."""
        S = self._scalars
        numerator, sk_l1 = _total(dots), _total(norms)
        numerator_weighted = S["numerator_weighted"] * sqrt_beta2 + numerator * (1 - sqrt_beta2)
        d_hat = numerator_weighted / (sk_l1 * (1 - sqrt_beta2))
        return numerator_weighted, d_hat, sk_l1 > 0

    def _commit(self, numerator_weighted: Tensor, d_new: Tensor, ok: Tensor, *, name: str = "numerator_weighted") -> None:
        """The estimate written in place (a captured graph reads these tensors); nothing when ``ok``
        is False (dadaptation returns before storing it)."""
        S = self._scalars
        S[name].copy_(torch.where(ok, numerator_weighted, S[name]))
        S["d"].copy_(torch.where(ok, d_new, S["d"]))
        S["k"].add_(ok.to(S["k"].dtype))


class DAdaptAdam(_DAdaptation):
    r"""D-Adapted Adam, the arithmetic of ``dadaptation.DAdaptAdam`` 3.2 (kohya's ``DAdaptAdam``).

    Step ``k`` (0-based) with gradients ``g`` of every parameter ``w``; ``d`` starts at ``d0``, the
    weighted numerator ``n`` at 0, ``lr`` is the largest group LR, ``ρ`` a group's ``layer_scale``
    (default 1) and ``β̃ = √β₂``; sums run over every parameter of every group whose LR is not 0::

        g ← g + λ w                                        (decouple=False, the default: coupled decay)
        b = √(1 − β₂^(k+1)) / (1 − β₁^(k+1))  if use_bias_correction else 1
        η = d · lr · b                                     (this step's d)
        n_k = Σ ρ η ⟨g, s / (√v + ε)⟩                      (the old s and v)
        m ← β₁ m + ρ η (1 − β₁) g          v ← β₂ v + (1 − β₂) g²          s ← β̃ s + η (1 − β̃) g
        n ← β̃ n + (1 − β̃) n_k
        d̂ = n / ((1 − β̃) Σ ρ ‖s‖₁) ;  d ← max(d, min(d̂, d · growth_rate))
        w ← w − λ η w                                      (decouple=True: decoupled decay)
        w ← w − m / (√v + ε)

    When ``Σ ‖s‖₁`` is 0 (no gradient yet) the step changes no weight, ``d``, ``n`` nor ``k``, as
    ``dadaptation`` returns early (the moments still decay).

    Differences from ``dadaptation`` (same numbers otherwise; the tests compare over 20 steps):

    * ``d``, ``n`` and ``k`` are float64 0-dim tensors on the parameters' device (float32 on MPS),
      in every group as ``dadaptation``'s (``param_groups[0]["d"]``), instead of Python floats: no
      host read per step (``dadaptation`` calls ``.item()`` twice per parameter and step). The
      per-tensor sums are float32 as ``dadaptation``'s, their sum float64.
    * The moments and ``s`` are float32 whatever the parameter dtype; bf16/fp16 parameters are
      updated in float32 and written back with stochastic rounding (bf16, ``stochastic_rounding``).
    * A group whose LR is 0 is left as it is (``dadaptation`` leaves it out of the estimate but
      still applies decoupled weight decay to it). The gradient is not changed in place by coupled
      weight decay (``dadaptation`` adds ``λ w`` into ``p.grad``).
    * ``betas``, ``growth_rate``, ``use_bias_correction``, ``decouple`` and ``d0`` must be the same
      in every group (``dadaptation`` reads group 0's); the LRs equal or 0, as ``dadaptation``
      requires (checked when built and, with Python-float LRs, at every step).
    * ``log_every`` is accepted and ignored (no logging); ``fsdp_in_use=True`` is refused.

    Args:
        params: parameters or parameter groups (a group may set ``lr``, ``eps``, ``weight_decay``,
            ``layer_scale``, ``stochastic_rounding``).
        lr: multiplier of the estimated step size (kohya/dadaptation: leave it at 1.0).
        betas: ``(β₁, β₂)``, each in ``[0, 1)``. eps: added to ``√v`` (> 0).
        weight_decay: ``λ ≥ 0``; decouple: AdamW-style (True) or added to the gradient (False, the
            default as in ``dadaptation``).
        log_every: ignored. use_bias_correction: Adam's bias correction in ``η``.
        d0: the initial estimate (> 0). growth_rate: largest factor ``d`` grows by per step (> 0).
        fsdp_in_use: must be False.
        stochastic_rounding: stochastic rounding when writing bf16 weights.
        generator: RNG for stochastic rounding (default: torch's global RNG).
        foreach: multi-tensor (``torch._foreach_*``) ops per chunk of ≤ 2²⁴ elements plus one sum
            per parameter; bit-identical to ``foreach=False`` on CPU (tested).
        capturable: the step can be recorded in a CUDA graph: ``lr`` may be a 0-dim tensor on the
            parameters' device (filled in place by the schedule), a group whose LR tensor is 0 is
            masked on the device. Every other scalar is a device tensor in both modes, so on CPU both
            give bit-identical results (tested).

    Example:
        >>> opt = DAdaptAdam(lora.parameters(), lr=1.0, decouple=True, weight_decay=0.01)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.param_groups[0]["d"]  # the estimated step size (a 0-dim tensor)
    """

    _NAME = "DAdaptAdam"
    _GLOBAL_OPTIONS = ("betas", "d0", "growth_rate", "use_bias_correction", "decouple")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        log_every: int = 0,
        decouple: bool = False,
        use_bias_correction: bool = False,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        del log_every  # (dadaptation prints every log_every steps; sdadapt logs nothing from the step)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "layer_scale": 1.0,
                    "decouple": bool(decouple), "use_bias_correction": bool(use_bias_correction),
                    "growth_rate": _growth_rate(self._NAME, growth_rate),
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        super().__init__(params, defaults, d0=d0, fsdp_in_use=fsdp_in_use, generator=generator)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        for key in ("s", "exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One DAdaptAdam step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        first, S = self.param_groups[0], self._scalars
        beta1, beta2 = first["betas"]
        sqrt_beta2 = math.sqrt(beta2)
        d = S["d"]
        dlr = _bias_corrected(d * self._lr_max(d.device, d.dtype), first, S["k"])  # η
        active = self._active_groups()
        dots: list[Tensor] = []  # Σ ρ η ⟨g, s/(√v + ε)⟩ per group, float64
        norms: list[Tensor] = []  # Σ ρ ‖s‖₁ per group, float64
        v_factor = torch.full((), 1 - beta2, device=d.device)  # c_v and c_s: every group's, made once a step
        s_factor = (dlr * (1 - sqrt_beta2)).float()
        for group, params, on in active:
            scale = group["layer_scale"]
            c_m = (dlr * (scale * (1 - beta1))).float()
            (c_m, c_v, c_s), (b1, b2, b3) = _masked(on, (c_m, v_factor, s_factor), (beta1, beta2, sqrt_beta2))
            pass1 = self._foreach_pass1 if group["foreach"] else self._single_pass1
            dot, norm = pass1(group, params, b1, b2, b3, c_m, c_v, c_s)
            dot, norm = dot * (dlr * scale), norm * scale
            if isinstance(on, Tensor):
                dot, norm = dot * on, norm * on
            dots.append(dot)
            norms.append(norm)
        if not dots:
            return loss
        numerator_weighted, d_hat, ok = self._estimate(dots, norms, sqrt_beta2)
        self._finish(active, dlr, numerator_weighted, d_hat, ok)
        return loss

    def _finish(self, active: list[tuple[dict[str, Any], list[Tensor], Any]], dlr: Tensor, weighted: Tensor,
                d_hat: Tensor, ok: Tensor, *, name: str = "numerator_weighted") -> None:
        """The end of an Adam step after the sums: ``d ← max(d, min(d̂, d · growth_rate))``, the
        weights (:meth:`_weights`), then the estimate committed with ``weighted`` stored as ``name``
        (its weighted numerator; the preprint's ``gsq_weighted``) — where ``ok``."""
        d = self._scalars["d"]
        d_new = torch.maximum(d, torch.minimum(d_hat, d * self.param_groups[0]["growth_rate"]))
        self._weights(active, ok, dlr)
        self._commit(weighted, d_new, ok, name=name)

    def _weights(self, active: list[tuple[dict[str, Any], list[Tensor], Any]], ok: Tensor, dlr: Tensor) -> None:
        """The weight update of every active group after the estimate: ``w ← w − λ η w`` (decoupled
        decay), then ``w ← w − m / (√v + ε)`` — masked on the device (no branch) where ``ok`` is False
        (``Σ‖s‖₁ = 0``) or a tensor LR is 0."""
        decouple = self.param_groups[0]["decouple"]
        for group, params, on in active:
            live = ok & on if isinstance(on, Tensor) else ok
            decay = group["weight_decay"]
            shrink = torch.where(live, -decay * dlr, 0.0).float() if decay != 0 and decouple else None
            sign = torch.where(live, -1.0, 0.0).float().to(dlr.device)  # (−1: the step; 0: none, without a branch)
            self._adam_update(group, params, shrink, sign, group["eps"])

    def _single_pass1(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, b3: Any,
                      c_m: Tensor, c_v: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """Moments and ``s`` of each parameter; returns ``(Σ⟨g, s/(√v + ε)⟩, Σ‖s‖₁)`` (float64 0-dim)."""
        dots, norms = [], []
        for p in params:
            state = self.state[p]
            w = _float32(p)  # (*shape) float32
            g = self._gradient(group, p.grad, w)  # type: ignore[arg-type]
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            # (a product and a sum, not torch.dot: BLAS sums in an order that depends on the memory
            # alignment, and the multi-tensor path's g of a bf16 weight is a view into one buffer)
            dots.append(g.mul(state["s"].div(denom)).sum())
            _adam_moments(state, g, b1, b2, c_m, c_v)
            state["s"].mul_(b3).add_(g.mul(c_s))
            norms.append(torch.linalg.vector_norm(_flat(state["s"]), 1))
        return _sum64(dots), _sum64(norms)

    def _foreach_pass1(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, b3: Any,
                       c_m: Tensor, c_v: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_single_pass1` with multi-tensor ops per chunk (one sum per parameter)."""
        dots: list[Tensor] = []
        norms: list[Tensor] = []
        for chunk in _param_chunks(params):
            states = [self.state[p] for p in chunk]
            ws = _float32_many(chunk)
            gs = self._gradients(group, chunk, ws)
            vs, ss = ([s[key] for s in states] for key in ("exp_avg_sq", "s"))
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_add_(denoms, group["eps"])
            ratios = torch._foreach_div(ss, denoms)  # s / (√v + ε), the old s and v
            del denoms
            torch._foreach_mul_(ratios, gs)
            dots += [r.sum() for r in ratios]
            del ratios
            _adam_moments_many(states, gs, b1, b2, c_m, c_v)
            torch._foreach_mul_(ss, b3)
            torch._foreach_add_(ss, torch._foreach_mul(gs, c_s))
            norms += list(torch._foreach_norm(ss, 1))
        return _sum64(dots), _sum64(norms)


class DAdaptAdamPreprint(DAdaptAdam):
    r"""D-Adapted Adam as the paper's first version estimated ``d``: ``dadaptation.experimental.
    DAdaptAdamPreprint`` 3.2, what kohya's ``optimizer_type = "DAdaptation"`` (and
    ``"DAdaptAdamPreprint"``) trains with.

    The same moments and weight update as :class:`DAdaptAdam` (no bias correction, no
    ``layer_scale``); ``s`` decays with ``β₂`` and the estimate uses ``Σ s²/(√v + ε)`` and the
    weighted ``Σ g²/(√v + ε)``, both with this step's ``v``::

        η = d · lr ;  m ← β₁ m + η (1 − β₁) g ;  v ← β₂ v + (1 − β₂) g² ;  s ← β₂ s + η (1 − β₂) g
        γ ← β₂ γ + η² (1 − β₂) Σ g² / (√v + ε)
        d̂ = (Σ s² / (√v + ε) / (1 − β₂) − γ) / Σ ‖s‖₁ ;  d ← max(d, min(d̂, d · growth_rate))
        w ← w − λ η w  (decouple=True) ;  w ← w − m / (√v + ε)

    Arguments, defaults, device estimate (``d``, ``gsq_weighted`` = ``γ``, ``k``), paths and the
    differences from ``dadaptation`` are :class:`DAdaptAdam`'s (without ``use_bias_correction``).

    Example:
        >>> opt = DAdaptAdamPreprint(lora.parameters(), lr=1.0, decouple=True, weight_decay=0.01)
    """

    _NAME = "DAdaptAdamPreprint"
    _GLOBAL_OPTIONS = ("betas", "d0", "growth_rate", "decouple")
    _SCALARS: ClassVar[dict[str, float | None]] = {"d": None, "gsq_weighted": 0.0, "k": 0.0}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        log_every: int = 0,
        decouple: bool = False,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        del log_every  # (ignored: see DAdaptAdam)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "decouple": bool(decouple),
                    "growth_rate": _growth_rate(self._NAME, growth_rate),
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        _DAdaptation.__init__(self, params, defaults, d0=d0, fsdp_in_use=fsdp_in_use, generator=generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One DAdaptAdamPreprint step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        first, S = self.param_groups[0], self._scalars
        beta1, beta2 = first["betas"]
        d = S["d"]
        dlr = d * self._lr_max(d.device, d.dtype)  # η
        active = self._active_groups()
        sums: list[list[Tensor]] = [[], [], []]  # Σ g²/(√v+ε), Σ s²/(√v+ε), Σ‖s‖₁ per group (float64)
        factors = ((dlr * (1 - beta1)).float(), torch.full((), 1 - beta2, device=d.device),  # c_m, c_v, c_s: every group's
                   (dlr * (1 - beta2)).float())
        for group, params, on in active:
            (c_m, c_v, c_s), (b1, b2) = _masked(on, factors, (beta1, beta2))
            pass1 = self._foreach_sums if group["foreach"] else self._single_sums
            for total, value in zip(sums, pass1(group, params, b1, b2, c_m, c_v, c_s)):
                total.append(value * on if isinstance(on, Tensor) else value)
        if not sums[0]:
            return loss
        g_sq, sk_sq, sk_l1 = (_total(v) for v in sums)
        gsq_weighted = S["gsq_weighted"] * beta2 + g_sq * (dlr * dlr * (1 - beta2))
        d_hat = (sk_sq / (1 - beta2) - gsq_weighted) / sk_l1
        self._finish(active, dlr, gsq_weighted, d_hat, sk_l1 > 0, name="gsq_weighted")
        return loss

    def _single_sums(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, c_m: Tensor, c_v: Tensor,
                     c_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Moments and ``s`` of each parameter; returns ``(Σ g²/(√v+ε), Σ s²/(√v+ε), Σ‖s‖₁)`` (float64 0-dim)."""
        g_sq, sk_sq, l1 = [], [], []
        for p in params:
            state = self.state[p]
            w = _float32(p)
            g = self._gradient(group, p.grad, w)  # type: ignore[arg-type]
            _adam_moments(state, g, b1, b2, c_m, c_v)
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            g_sq.append(g.mul(g).div_(denom).sum())
            state["s"].mul_(b2).add_(g.mul(c_s))
            sk_sq.append(state["s"].mul(state["s"]).div_(denom).sum())
            l1.append(torch.linalg.vector_norm(_flat(state["s"]), 1))
        return _sum64(g_sq), _sum64(sk_sq), _sum64(l1)

    def _foreach_sums(self, group: dict[str, Any], params: list[Tensor], b1: Any, b2: Any, c_m: Tensor, c_v: Tensor,
                      c_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_single_sums` with multi-tensor ops per chunk (three sums per parameter)."""
        g_sq: list[Tensor] = []
        sk_sq: list[Tensor] = []
        l1: list[Tensor] = []
        for chunk in _param_chunks(params):
            states = [self.state[p] for p in chunk]
            gs = self._gradients(group, chunk, _float32_many(chunk))
            vs, ss = ([s[key] for s in states] for key in ("exp_avg_sq", "s"))
            _adam_moments_many(states, gs, b1, b2, c_m, c_v)
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_add_(denoms, group["eps"])
            squares = torch._foreach_mul(gs, gs)
            torch._foreach_div_(squares, denoms)
            g_sq += [t.sum() for t in squares]
            torch._foreach_mul_(ss, b2)
            torch._foreach_add_(ss, torch._foreach_mul(gs, c_s))
            squares = torch._foreach_mul(ss, ss)
            torch._foreach_div_(squares, denoms)
            sk_sq += [t.sum() for t in squares]
            del squares, denoms
            l1 += list(torch._foreach_norm(ss, 1))
        return _sum64(g_sq), _sum64(sk_sq), _sum64(l1)


class DAdaptLion(_DAdaptation):
    r"""D-Adapted Lion, the arithmetic of ``dadaptation.DAdaptLion`` 3.2 (kohya's ``DAdaptLion``).

    Step with gradients ``g``; ``d`` starts at ``d0``, ``n`` at 0, ``lr`` is the largest group LR,
    ``β̃ = √β₂``; sums over every parameter of every group whose LR is not 0::

        η = d · lr
        w ← w (1 − η λ)                                    (decoupled weight decay, scaled by η)
        u = sign(β₁ m + (1 − β₁) g) ;  w ← w − η u
        m ← β₂ m + η (1 − β₂) g
        n_k = Σ η ⟨u, s⟩                                   (the old s)
        s ← β̃ s + η (1 − β̃) u
        n ← β̃ n + (1 − β̃) n_k ;  d̂ = n / ((1 − β̃) Σ ‖s‖₁) ;  d ← max(d, d̂)

    When ``Σ ‖s‖₁`` is 0 ``d``, ``n`` and ``k`` stay (the weights have moved already, as in
    ``dadaptation``). The differences from ``dadaptation`` are :class:`DAdaptAdam`'s (device
    estimate, no host read, float32 states, stochastic rounding of bf16 weights, one LR or 0 for
    every group), except that ``dadaptation``'s DAdaptLion trains a group whose LR is 0 at the
    others' step size, where this one leaves it as it is.

    Args:
        params: parameters or parameter groups (a group may set ``lr``, ``weight_decay``,
            ``stochastic_rounding``).
        lr: multiplier of the estimated step size (leave it at 1.0).
        betas: ``(β₁, β₂)`` in ``[0, 1)``, default ``(0.9, 0.99)``. weight_decay: ``λ ≥ 0``.
        log_every: ignored. d0: the initial estimate (> 0). fsdp_in_use: must be False.
        stochastic_rounding, generator, foreach, capturable: as :class:`DAdaptAdam`'s.

    Example:
        >>> opt = DAdaptLion(lora.parameters(), lr=1.0, weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    _NAME = "DAdaptLion"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        log_every: int = 0,
        d0: float = 1e-6,
        fsdp_in_use: bool = False,
        stochastic_rounding: bool = True,
        generator: torch.Generator | None = None,
        foreach: bool = False,
        capturable: bool = False,
    ) -> None:
        del log_every  # (ignored: see DAdaptAdam)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    **_step_options(stochastic_rounding=stochastic_rounding, foreach=foreach, capturable=capturable)}
        super().__init__(params, defaults, d0=d0, fsdp_in_use=fsdp_in_use, generator=generator)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        for key in ("exp_avg", "s"):
            state[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One DAdaptLion step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = _call_closure(closure)
        first, S = self.param_groups[0], self._scalars
        beta1, beta2 = first["betas"]
        sqrt_beta2 = math.sqrt(beta2)
        d = S["d"]
        dlr = d * self._lr_max(d.device, d.dtype)  # η
        dots: list[Tensor] = []
        norms: list[Tensor] = []
        factors = ((-dlr).float(), (dlr * (1 - beta2)).float(), (dlr * (1 - sqrt_beta2)).float())  # every group's
        for group, params, on in self._active_groups():
            decay = group["weight_decay"]
            shrink: Any = (1 - dlr * decay).float() if decay != 0 else None
            (neg, c_m, c_s), (b2, b3) = _masked(on, factors, (beta2, sqrt_beta2))
            if shrink is not None and isinstance(on, Tensor):  # (masked too: the weights stay)
                shrink = torch.where(on, shrink, 1.0)
            run = self._foreach_update if group["foreach"] else self._single_update
            dot, norm = run(group, params, beta1, b2, b3, shrink, neg, c_m, c_s)
            dot = dot * dlr
            if isinstance(on, Tensor):
                dot, norm = dot * on, norm * on
            dots.append(dot)
            norms.append(norm)
        if not dots:
            return loss
        numerator_weighted, d_hat, ok = self._estimate(dots, norms, sqrt_beta2)
        self._commit(numerator_weighted, torch.maximum(d, d_hat), ok)
        return loss

    def _single_update(self, group: dict[str, Any], params: list[Tensor], beta1: float, b2: Any, b3: Any,
                       shrink: Tensor | None, neg: Tensor, c_m: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """Weights, momentum and ``s`` of each parameter; returns ``(Σ⟨u, s⟩, Σ‖s‖₁)`` (float64 0-dim)."""
        dots, norms = [], []
        for p in params:
            state = self.state[p]
            m, s = state["exp_avg"], state["s"]
            g = _float32(p.grad)  # type: ignore[arg-type]
            w = _float32(p)
            if shrink is not None:
                w.mul_(shrink)
            u = _lion_direction(m, g, beta1)  # (*shape) in {−1, 0, 1}
            w.add_(u.mul(neg))
            m.mul_(b2).add_(g.mul(c_m))
            dots.append(torch.dot(_flat(u), _flat(s)))
            s.mul_(b3).add_(u.mul(c_s))
            norms.append(torch.linalg.vector_norm(_flat(s), 1))
            _write_weight(p, w, group["stochastic_rounding"], self.generator)
        return _sum64(dots), _sum64(norms)

    def _foreach_update(self, group: dict[str, Any], params: list[Tensor], beta1: float, b2: Any, b3: Any,
                        shrink: Tensor | None, neg: Tensor, c_m: Tensor, c_s: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_single_update` with multi-tensor ops per chunk (one ``dot`` per parameter)."""
        dots: list[Tensor] = []
        norms: list[Tensor] = []
        for chunk in _param_chunks(params):
            states = [self.state[p] for p in chunk]
            ms, ss = [s["exp_avg"] for s in states], [s["s"] for s in states]
            gs = _float32_many([p.grad for p in chunk])  # type: ignore[misc]
            ws = _float32_many(chunk)
            if shrink is not None:
                torch._foreach_mul_(ws, shrink)
            us = _lion_directions(ms, gs, beta1)
            torch._foreach_add_(ws, torch._foreach_mul(us, neg))
            torch._foreach_mul_(ms, b2)
            torch._foreach_add_(ms, torch._foreach_mul(gs, c_m))
            dots += [torch.dot(_flat(u), _flat(s)) for u, s in zip(us, ss)]
            torch._foreach_mul_(ss, b3)
            torch._foreach_add_(ss, torch._foreach_mul(us, c_s))
            norms += list(torch._foreach_norm(ss, 1))
            del us
            _write_weights_many(chunk, ws, group["stochastic_rounding"], self.generator)
        return _sum64(dots), _sum64(norms)
