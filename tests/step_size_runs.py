"""Runs of the optimisers that estimate their step size (Prodigy, D-Adaptation) for their tests:
weights with a LoRA-up-like zero tensor, gradients that keep going one way (so ``d`` grows), the
steps, the estimate read back; the paired runs their mode tests compare (per parameter against
multi-tensor, Python-float lr against capturable), the CUDA check of their capturable step, and the
host-sync check of a step (any optimiser's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.optim import set_lr

__all__ = ["assert_cuda_capturable_step_matches", "assert_resumed_run_is_straight", "assert_steps_read_nothing_back",
           "capturable_and_plain_runs", "estimated_d", "foreach_and_per_parameter_runs", "gradients", "params_of", "run",
           "weights"]


def weights(shapes: Sequence[tuple[int, ...]], seed: int = 0, *, zero_first: bool = True) -> list[torch.Tensor]:
    """Float32 weights of ``shapes``; the first all zero unless ``zero_first=False`` (a LoRA up weight:
    prodigyopt keeps its w₀ as a 0-dim zero)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g) for s in shapes]
    if zero_first:
        out[0].zero_()
    return out


def gradients(steps: int, shapes: Sequence[tuple[int, ...]], seed: int = 1) -> list[list[torch.Tensor]]:
    """A fixed direction plus noise per step: the steps keep going one way, so d grows (random
    gradients alone would leave d at d0)."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(s, generator=g) for s in shapes]
    return [[d + 0.5 * torch.randn(s, generator=g) for d, s in zip(direction, shapes)] for _ in range(steps)]


def run(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    """One ``optimizer.step()`` per entry of ``grads``, each parameter's gradient set (in its dtype)."""
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(p.dtype).clone()
        optimizer.step()


def params_of(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Fresh parameters holding copies of ``tensors`` in ``dtype``."""
    return [nn.Parameter(w.to(dtype).clone()) for w in tensors]


def assert_steps_read_nothing_back(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                                   grads: list[list[torch.Tensor]]) -> None:
    """After a first step on ``grads[0]`` (the states made), the steps on the rest make no host sync
    (``HostSyncs``)."""
    run(optimizer, params, grads[:1])
    with HostSyncs() as syncs:
        run(optimizer, params, grads[1:])
    assert syncs.events == [], syncs.report()


#: the parameters of a run and the optimiser that stepped them
Stepped = tuple[list[nn.Parameter], torch.optim.Optimizer]

#: an optimiser made of (parameters, lr, capturable)
OptimizerFactory = Callable[[list[nn.Parameter], "float | torch.Tensor", bool], torch.optim.Optimizer]


def foreach_and_per_parameter_runs(make: Callable[[list[nn.Parameter], bool], torch.optim.Optimizer],
                                   weights: Sequence[torch.Tensor], grads: list[list[torch.Tensor]],
                                   dtype: torch.dtype = torch.float32) -> list[Stepped]:
    """``[(params, optimizer)]`` of ``make(params, foreach)`` stepping ``grads`` over ``dtype`` copies of
    ``weights``, per parameter (``foreach=False``) and then multi-tensor (``foreach=True``)."""
    runs = []
    for foreach in (False, True):
        params = params_of(weights, dtype)
        optimizer = make(params, foreach)
        run(optimizer, params, grads)
        runs.append((params, optimizer))
    return runs


def capturable_and_plain_runs(make: OptimizerFactory, weights: Sequence[torch.Tensor], grads: list[list[torch.Tensor]]
                              ) -> list[Stepped]:
    """``[(params, optimizer)]`` of two runs of ``make(params, lr, capturable)`` over copies of ``weights``:
    lr 1.0 as a Python float (capturable off), then as a float64 0-dim tensor (capturable on); each
    steps ``grads[:4]``, has its lr set to 0.25 (``set_lr``: in place for the tensor) and steps the rest."""
    runs = []
    for capturable in (False, True):
        params = params_of(weights)
        optimizer = make(params, torch.tensor(1.0, dtype=torch.float64) if capturable else 1.0, capturable)
        run(optimizer, params, grads[:4])
        set_lr(optimizer, 0.25)
        run(optimizer, params, grads[4:])
        runs.append((params, optimizer))
    return runs


def estimated_d(optimizer: torch.optim.Optimizer) -> float:
    """The step-size estimate ``d`` (group 0's) as a Python float."""
    return float(optimizer.param_groups[0]["d"])


def assert_resumed_run_is_straight(reference: torch.optim.Optimizer, straight: Sequence[torch.Tensor],
                                   resumed_optimizer: torch.optim.Optimizer, resumed: Sequence[torch.Tensor],
                                   grads: list[list[torch.Tensor]]) -> None:
    """The rest of a run, straight and resumed: ``reference`` steps on ``straight`` and ``resumed_optimizer``
    (loaded from ``reference``'s saved state) on ``resumed`` through ``grads``; the weights and ``d`` end
    equal bit for bit."""
    run(reference, straight, grads)
    run(resumed_optimizer, resumed, grads)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))
    assert estimated_d(resumed_optimizer) == estimated_d(reference)


def assert_cuda_capturable_step_matches(make: OptimizerFactory, weights: Sequence[torch.Tensor],
                                        grads: list[list[torch.Tensor]]) -> None:
    """On a GPU: ``make(params, lr, capturable)`` (``foreach`` multi-tensor) steps ``grads`` on CUDA
    copies of ``weights`` with ``lr`` 1.0 as a float and, capturable, as a float64 CUDA tensor; after the
    first step (the states made) with CUDA's sync debug mode at "error" (a host sync raises), and the
    two runs end within 1e-6."""
    runs = []
    for capturable in (False, True):
        params = [nn.Parameter(w.cuda()) for w in weights]
        lr = torch.tensor(1.0, dtype=torch.float64, device="cuda") if capturable else 1.0
        optimizer = make(params, lr, capturable)
        on_device = [[g.cuda() for g in step] for step in grads]
        run(optimizer, params, on_device[:1])
        with torch.cuda.device(0):
            torch.cuda.set_sync_debug_mode("error")
            try:
                run(optimizer, params, on_device[1:])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
