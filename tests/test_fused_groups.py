"""Grouped fused backward (``fuse_optimizer_into_backward(..., groups=...)``) and the block grouping
(``sdadapt.training.param_groups``).

Why the comparisons with the usual ``backward(); step(); zero_grad()`` loop are exact on CPU: a
group's optimiser runs the per-parameter update on the same gradients (sdadapt's multi-tensor
AdamW is bit-identical to its per-parameter path; torch's AdamW loops over tensors on CPU), only
earlier — inside backward, once the group's last gradient has arrived. Stochastic rounding draws
from one RNG in the order the groups close, a permutation of the usual loop's order, so there the
comparison is bit for bit only when that order is the same (one group) and statistical otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdadapt.targets import by_regex
from sdadapt.training.grad_checkpointing import enable_checkpointing
from sdadapt.training.optim import AdamW, fuse_optimizer_into_backward
from sdadapt.training.param_groups import TRAINING_BLOCKS, parameter_groups_by_module


class _Branchy(nn.Module):
    """A stem, four blocks (each two Linears and a LayerNorm) and a branch used on odd steps only."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(8, 24)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.LayerNorm(24), nn.Linear(24, 24))
                                    for _ in range(4))
        self.branch = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24))
        self.head = nn.Linear(24, 4)
        self.frozen = nn.Linear(24, 24)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        if use_branch:
            h = h + self.branch(h)
        return self.head(self.frozen(h))


BLOCKS = by_regex(r"^(blocks\.\d+|branch)$")


def _batches(n: int = 5):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen), i % 2 == 1) for i in range(n)]


def _loss(model: _Branchy, batch) -> torch.Tensor:
    x, y, use_branch = batch
    return nn.functional.mse_loss(model(x, use_branch), y)


MAKERS = {
    "adamw-fp32-foreach": lambda ps: AdamW(ps, lr=1e-2, foreach=True),
    "adamw-int8-foreach": lambda ps: AdamW(ps, lr=1e-2, state_dtype="int8", block_size=64, foreach=True),
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}


class _Boom(torch.autograd.Function):
    """Identity forward, a backward that raises: a backward interrupted half-way (stem's gradient never comes)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom")


def _backward_that_raises(model: _Branchy, x, y) -> None:
    """A backward that reaches the head's parameters, then raises before the stem's."""
    with pytest.raises(RuntimeError, match="boom"):
        nn.functional.mse_loss(model.head(model.frozen(_Boom.apply(model.stem(x)))), y).backward()

def _usual_loop(make, batches, lrs):
    model = _Branchy()
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    for batch, lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("grouping", ["blocks", "mixed"])
def test_grouped_fused_backward_equals_the_usual_loop_bit_for_bit(name, grouping):
    make = MAKERS[name]
    batches = _batches()
    lrs = [1e-2, 5e-3, 1e-2, 2e-3, 1e-2]
    want = _usual_loop(make, batches, lrs)
    model = _Branchy()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if grouping == "blocks":
        groups = parameter_groups_by_module(model, blocks=BLOCKS)
    else:  # groups that hold the branch *and* always-used weights: only the end-of-backward callback closes them
        groups = [[model.branch[0].weight, model.blocks[0][0].weight], [model.branch[2].weight, model.head.weight, model.stem.bias]]
        inside = {id(p) for g in groups for p in g}
        groups.append([p for p in trainable if id(p) not in inside])
    steps: list[int] = []  # step() calls per backward

    def counting(ps):
        optimizer = make(ps)
        optimizer.register_step_pre_hook(lambda *_: steps.__setitem__(-1, steps[-1] + 1))
        return optimizer

    handle = fuse_optimizer_into_backward(model.parameters(), counting, groups=groups)
    assert len(handle.optimizers) == len(groups) and len(handle.params) == len(trainable)
    for batch, lr in zip(batches, lrs):
        handle.set_lr(lr)
        steps.append(0)
        _loss(model, batch).backward()
        assert all(p.grad is None for p in model.parameters())
    handle.remove()
    branch = {id(p) for p in model.branch.parameters()}
    without_branch = sum(any(id(p) not in branch for p in g) for g in groups)
    assert steps == [without_branch, len(groups)] * 2 + [without_branch]  # groups with no gradient are not stepped
    start = _Branchy()
    for (key, a), b, s in zip(want.named_parameters(), model.parameters(), start.parameters()):
        assert torch.equal(a, b), key
        assert key.startswith("frozen") or not torch.equal(a, s), key


def test_live_gradients_are_bounded_by_the_largest_group_with_checkpointing():
    model = _Branchy()
    enable_checkpointing(model, BLOCKS)  # recomputation inside backward must not disturb the counting
    groups = parameter_groups_by_module(model, blocks=BLOCKS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    live: list[int] = []
    for p in trainable:  # registered first: runs before the fused hook, with the new gradient still in .grad
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in trainable)))
    handle = fuse_optimizer_into_backward(trainable, lambda ps: AdamW(ps, lr=1e-3, foreach=True), groups=groups)
    model.train()
    for batch in _batches(2):
        _loss(model, batch).backward()
    largest = max(len(g) for g in groups)
    assert largest == 6 and max(live) == largest  # a block: two Linears and a LayerNorm
    assert len(live) == 2 * len(trainable) - len(list(model.branch.parameters()))
    handle.remove()

    # one parameter per group (the default): one gradient at a time
    live.clear()
    per_parameter = fuse_optimizer_into_backward(trainable, lambda ps: AdamW(ps, lr=1e-3))
    _loss(model, _batches(1)[0]).backward()
    assert max(live) == 1 and len(per_parameter.optimizers) == len(trainable)
    per_parameter.remove()


def test_one_group_of_everything_is_the_usual_loop_even_with_stochastic_rounding():
    """One group steps once, at the end of backward, drawing in the usual loop's order: bf16 weights
    and bf16 states come out bit-identical; block groups draw in another order (compared in
    distribution in tests/test_lean_finetune.py)."""

    def make(ps):
        return AdamW(ps, lr=1e-3, state_dtype=torch.bfloat16, foreach=True)

    batches = _batches(3)
    torch.manual_seed(0)
    want = _Branchy().to(torch.bfloat16)
    optimizer = make([p for p in want.parameters() if p.requires_grad])
    torch.manual_seed(123)
    for x, y, use in batches:
        nn.functional.mse_loss(want(x.bfloat16(), use).float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    model = _Branchy().to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    handle = fuse_optimizer_into_backward(trainable, make, groups=[trainable])
    torch.manual_seed(123)
    for x, y, use in batches:
        nn.functional.mse_loss(model(x.bfloat16(), use).float(), y).backward()
    for (key, a), b in zip(want.named_parameters(), model.parameters()):
        assert torch.equal(a, b), key
    handle.remove()


def test_grouped_state_resumes_and_a_backward_that_raised_does_not_stall_the_next():
    batches = _batches(6)
    make = MAKERS["adamw-int8-foreach"]
    model = _Branchy()
    groups = parameter_groups_by_module(model, blocks=BLOCKS)
    handle = fuse_optimizer_into_backward(model.parameters(), make, groups=groups)
    for batch in batches[:3]:
        _loss(model, batch).backward()
    saved, saved_weights = copy.deepcopy(handle.state_dict()), copy.deepcopy(model.state_dict())
    for batch in batches[3:]:
        _loss(model, batch).backward()
    resumed = _Branchy()
    resumed.load_state_dict(saved_weights)
    handle2 = fuse_optimizer_into_backward(resumed.parameters(), make, groups=parameter_groups_by_module(resumed, blocks=BLOCKS))
    handle2.load_state_dict(saved)
    for batch in batches[3:]:
        _loss(resumed, batch).backward()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same groups"):
        handle2.load_state_dict({"optimizers": saved["optimizers"][:-1]})

    # a group whose first gradient arrives before the backward raises, its second never
    model = _Branchy()
    odd = [model.head.weight, model.stem.weight, model.head.bias]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in odd)]
    handle3 = fuse_optimizer_into_backward(model.parameters(), make, groups=[odd[:2], odd[2:], rest])
    x, y, _ = batches[0]
    _backward_that_raises(model, x, y)
    assert model.head.weight.grad is not None and model.head.bias.grad is None  # left open / closed by the count
    head = model.head.weight.detach().clone()
    _loss(model, batches[1]).backward()  # applies what was left, then runs as usual
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.head.weight, head)
    handle3.remove()
    handle.remove()
    handle2.remove()


def test_remove_after_a_backward_that_raised_drops_its_open_gradients():
    """fit removes the hooks in a ``finally``: after an interrupted backward the open groups'
    gradients must not stay alive on the parameters nor leak into a later, unfused backward."""
    model = _Branchy()
    odd = [model.head.weight, model.stem.weight]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in odd)]
    handle = fuse_optimizer_into_backward(model.parameters(), MAKERS["adamw-fp32-foreach"], groups=[odd, rest])
    x, y, _ = _batches(1)[0]
    _backward_that_raises(model, x, y)
    assert model.head.weight.grad is not None  # its group waits for stem.weight, which never comes
    handle.remove()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, (x, y, False)).backward()  # unfused now: a fresh gradient, nothing stale added
    want = torch.autograd.grad(_loss(model, (x, y, False)), model.head.weight)[0]
    assert torch.equal(model.head.weight.grad, want)


def test_groups_must_partition_the_trainable_parameters():
    model = _Branchy()
    make = MAKERS["adamw-fp32-foreach"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"groups\[1\] holds a parameter of shape \(3,\) that is not in params"):
        fuse_optimizer_into_backward(trainable, make, groups=[trainable, [nn.Parameter(torch.zeros(3))]])
    with pytest.raises(ValueError, match=r"is in groups \[0\] and \[1\]"):
        fuse_optimizer_into_backward(trainable, make, groups=[trainable, [model.stem.weight]])
    with pytest.raises(ValueError, match="in no group"):
        fuse_optimizer_into_backward(trainable, make, groups=[trainable[1:]])
    # frozen parameters given in params may sit in a group: skipped, and a group left empty is dropped
    handle = fuse_optimizer_into_backward(model.parameters(), make,
                                          groups=[trainable, list(model.frozen.parameters())])
    assert len(handle.groups) == 1 and len(handle.groups[0]) == len(trainable)
    handle.remove()


def test_parameter_groups_by_module_on_a_unet_a_text_encoder_and_ldm_names():
    from sdadapt.toy import load_toy

    toy = load_toy()
    for model in (toy.unet, toy.text_encoder):
        named = {id(p): name for name, p in model.named_parameters()}
        assert parameter_groups_by_module(model) == []  # the toy loads frozen: nothing requires grad
        groups = parameter_groups_by_module(model, params=model.parameters())
        assert sorted(id(p) for g in groups for p in g) == sorted(named)  # a partition
        blocks = [name for name, _ in model.named_modules() if name and TRAINING_BLOCKS(name, _)]
        for group in groups:
            names = [named[id(p)] for p in group]
            inside = [b for b in blocks if names[0].startswith(b + ".")]
            if inside:  # a block's group holds all of the block and nothing else
                prefix = inside[0] + "."
                assert all(n.startswith(prefix) for n in names)
                assert len(group) == sum(1 for n in named.values() if n.startswith(prefix))
            else:  # any other: the parameters of one module
                assert len({n.rpartition(".")[0] for n in names}) == 1
    toy.unet.requires_grad_(True)
    toy.text_encoder.requires_grad_(True)
    assert len(parameter_groups_by_module(toy.unet)) < len(list(toy.unet.parameters())) / 4
    assert len(parameter_groups_by_module(toy.text_encoder)) == 2 + 2 + 1  # embeddings, 2 layers, final norm

    # LDM ("compvis") names: input_blocks.0 is conv_in (not a block), out.* the head
    def conv():
        return nn.Conv2d(2, 2, 1)

    def pair():  # a resblock-like module: two convs
        return nn.Sequential(conv(), conv())

    ldm = nn.Module()
    ldm.input_blocks = nn.ModuleList([nn.Sequential(conv()), nn.Sequential(pair(), pair())])
    ldm.middle_block = nn.Sequential(pair(), pair(), pair())
    ldm.output_blocks = nn.ModuleList([nn.Sequential(pair(), conv())])
    ldm.out = nn.Sequential(nn.GroupNorm(1, 2), conv())
    groups = parameter_groups_by_module(ldm)
    # conv_in alone; input_blocks.1.0/1.1, middle_block.0/1/2, output_blocks.0.0 and .0.1 as blocks; the head's two modules
    assert [len(g) for g in groups] == [2, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    only = parameter_groups_by_module(ldm, params=[ldm.middle_block[0][1].weight, ldm.out[1].bias, nn.Parameter(torch.ones(1))])
    assert only == [[ldm.middle_block[0][1].weight], [ldm.out[1].bias]]
    assert len(parameter_groups_by_module(ldm, blocks="nothing*")) == 16  # blocks select nothing: one group per module


def test_fit_splits_a_block_across_lr_groups_and_keeps_one_optimisers_state_layout():
    """``fit``'s fused optimisers: a block whose parameters sit in two LR groups becomes two
    optimisers; ``state_dict`` is the one a single optimiser over the LR groups saves (same entries,
    same tensors), and it loads back either way."""
    import importlib

    from sdadapt.methods import FitConfig

    fit_module = importlib.import_module("sdadapt.methods.fit")
    config = FitConfig(optimizer="adamw8bit", learning_rate=1e-2)

    def layout_of(model):
        params = [p for p in model.parameters() if p.requires_grad]
        half = len(params) // 2 + 1  # 17 of 32: inside blocks[2], which then spans both groups
        return [{"params": params[:half], "lr": 1e-2, "lr_scale": 1.0, "base_lr": 1e-2},
                {"params": params[half:], "lr": 5e-3, "lr_scale": 0.5, "base_lr": 1e-2}]

    batches = _batches(4)
    reference = _Branchy()
    optimizer = fit_module.make_optimizer(layout_of(reference), config)
    model = _Branchy()
    layout = layout_of(model)
    blocks = parameter_groups_by_module(model, blocks=BLOCKS)
    fused = fit_module._FusedOptimizers(layout, config, blocks)
    assert len(fused.optimizers) == len(blocks) + 1
    handle = fused.fuse([p for group in layout for p in group["params"]])
    for batch in batches[:2]:
        _loss(reference, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        _loss(model, batch).backward()
    want, got = optimizer.state_dict(), fused.state_dict()
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]
    assert [g["lr"] for g in got["param_groups"]] == [1e-2, 5e-3]
    assert got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(got["state"][index][key]), torch.as_tensor(value)), (index, key)
    # the usual loop's state into a fused run, and the fused state into the usual loop
    resumed = _Branchy()
    resumed.load_state_dict(model.state_dict())
    again = fit_module._FusedOptimizers(layout_of(resumed), config, parameter_groups_by_module(resumed, blocks=BLOCKS))
    again.load_state_dict(want)
    handle2 = again.fuse([p for p in resumed.parameters() if p.requires_grad])
    optimizer.load_state_dict(got)
    for batch in batches[2:]:
        _loss(reference, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        _loss(model, batch).backward()
        _loss(resumed, batch).backward()
    for a, b, c in zip(reference.parameters(), model.parameters(), resumed.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    handle.remove()
    handle2.remove()


def test_dropping_the_model_and_the_handle_frees_the_parameters_and_the_states():
    """The gradient hooks hold the handle weakly: with a strong reference (kept by each parameter, where
    Python's collector cannot see it) a dropped model, handle and int8 states stayed alive for ever —
    the H200 benchmark's next rows started 3.3 GB higher. While kept, the handle steps; once dropped,
    its hooks are gone and backward accumulates ``.grad`` as usual."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    handle = fuse_optimizer_into_backward(params, lambda ps: AdamW(ps, lr=1e-2, state_dtype="int8", foreach=True))
    before = params[0].detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    assert not torch.equal(before, params[0]) and params[0].grad is None  # (stepped by the hook, gradient dropped)
    refs = [weakref.ref(x) for x in (model, params[0], handle, handle.optimizers[0])]
    del handle
    gc.collect()
    assert refs[2]() is None
    model(torch.randn(3, 4)).sum().backward()  # the hooks went with the handle: an ordinary backward
    assert params[0].grad is not None
    del model, params
    gc.collect()
    assert all(ref() is None for ref in refs)
