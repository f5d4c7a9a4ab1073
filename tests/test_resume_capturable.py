"""A training state resumes into the optimiser as it was built: ``capturable`` or not.

torch's ``Optimizer.load_state_dict`` takes every group setting from the file, ``capturable``
included, and the state's JSON holds the learning rate as a number. A run saved without
``FitConfig.cuda_graph`` and resumed with it (or the reverse, e.g. a GPU run's state continued on
a CPU) must keep this run's mode: a non-capturable optimiser cannot be captured, a capturable
torch optimiser cannot step on a CPU, and a captured graph reads the lr tensor it was built with.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdadapt.training.step import TrainState, load_training_state, save_training_state


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(3, 2, generator=g)), nn.Parameter(torch.randn(2, generator=g))]


def _stepped(capturable: bool, params: list[nn.Parameter]) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(params, lr=1e-2)  # (a capturable torch AdamW cannot step on a CPU)
    for _ in range(3):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimizer.param_groups[0]["capturable"] = capturable  # as if built so on a GPU
    return optimizer


def test_a_state_saved_without_capture_resumes_into_a_capturable_optimizer_with_its_lr_tensor(tmp_path):
    saved = _params()
    before = _stepped(False, saved)
    save_training_state(tmp_path, named_params={str(i): p for i, p in enumerate(saved)}, optimizer=before,
                        state=TrainState(seed=0))
    params = [nn.Parameter(torch.zeros_like(p)) for p in saved]
    lr = torch.tensor(5e-3)
    after = torch.optim.AdamW(params, lr=lr, capturable=True)
    load_training_state(tmp_path, named_params={str(i): p for i, p in enumerate(params)}, optimizer=after,
                        state=TrainState(seed=0))
    group = after.param_groups[0]
    assert group["capturable"] is True
    assert group["lr"] is lr and lr.item() == pytest.approx(1e-2)  # the saved value, in the built tensor
    for p, q in zip(params, saved):
        assert torch.equal(p, q)
        step = after.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == p.device
        assert step.item() == 3
        assert torch.equal(after.state[p]["exp_avg"], before.state[q]["exp_avg"])


def test_a_capturable_state_resumes_into_a_plain_optimizer_that_steps_on_a_cpu(tmp_path):
    saved = _params()
    save_training_state(tmp_path, named_params={str(i): p for i, p in enumerate(saved)},
                        optimizer=_stepped(True, saved), state=TrainState(seed=0))
    params = [nn.Parameter(torch.zeros_like(p)) for p in saved]
    after = torch.optim.AdamW(params, lr=1e-3)
    load_training_state(tmp_path, named_params={str(i): p for i, p in enumerate(params)}, optimizer=after,
                        state=TrainState(seed=0))
    assert after.param_groups[0]["capturable"] is False and after.param_groups[0]["lr"] == pytest.approx(1e-2)
    sum(p.square().sum() for p in params).backward()
    after.step()  # a capturable torch AdamW raises here on a CPU
    assert all(after.state[p]["step"].item() == 4 for p in params)
