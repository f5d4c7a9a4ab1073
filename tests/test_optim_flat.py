"""AdamW(foreach=True) as a fixed number of ops per chunk: the aten ops of one multi-tensor step do not
grow with the number of parameters (every state dtype, bf16/fp32 weights, capturable or not), the
step stays bit-identical to the per-parameter path on awkward sizes, and the state keeps its
per-parameter layout (own storage per tensor, saved states load either way)."""

from __future__ import annotations

import io

import pytest
import torch
from aten_ops import AtenOps
from optimizer_states import assert_same_optimizer_state

from sdadapt.training import optim
from sdadapt.training.optim import AdamW

STATE_DTYPES = pytest.mark.parametrize("state_dtype", ["int8", torch.bfloat16, torch.float32], ids=["int8", "bf16", "fp32"])


def _ops_of_one_step(n: int, state_dtype, param_dtype, capturable: bool) -> list[str]:
    """The ops of the third foreach step over ``n`` parameters of sizes that are rarely whole blocks
    (the first step creates the state, which is per tensor by nature)."""
    g = torch.Generator().manual_seed(n)
    params = [torch.randn(1 + 37 * i, generator=g).to(param_dtype).requires_grad_() for i in range(n)]
    opt = AdamW(params, lr=torch.tensor(1e-3) if capturable else 1e-3, state_dtype=state_dtype, foreach=True,
                capturable=capturable, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(param_dtype)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(param_dtype)
    with AtenOps() as counter:
        opt.step()
    return counter.launched  # (views left out: on a GPU each other op is about one launch)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@STATE_DTYPES
def test_ops_per_step_do_not_grow_with_the_number_of_parameters(state_dtype, param_dtype, capturable):
    """10 and 100 parameters (one chunk) cost the same number of aten ops: nothing is done per tensor
    (before, the int8 step spent ~11 ops per tensor on padding, block scales and copies)."""
    few = _ops_of_one_step(10, state_dtype, param_dtype, capturable)
    many = _ops_of_one_step(100, state_dtype, param_dtype, capturable)
    assert len(many) <= len(few) + 2, sorted(set(many) - set(few))
    assert len(few) < 100  # a fixed handful: ~45 for int8 states, 10 for fp32 states on fp32 weights


def test_ops_grow_with_the_number_of_chunks_only(monkeypatch):
    """Chunking (which bounds the float32 working copies) multiplies the ops by the chunks, not by
    the tensors: 100 parameters in 4 chunks cost at most 4 one-chunk steps."""
    one_chunk = len(_ops_of_one_step(100, "int8", torch.bfloat16, False))
    total = sum(1 + 37 * i for i in range(100))
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", total // 4 + 1)
    assert len(optim._chunks([torch.empty(1 + 37 * i) for i in range(100)], total // 4 + 1)) <= 5
    four_chunks = len(_ops_of_one_step(100, "int8", torch.bfloat16, False))
    assert one_chunk < four_chunks <= 5 * one_chunk


# shapes whose sizes are not whole 256-blocks, 1-element tensors, conv weights (one channels_last)
SHAPES = [(20, 13), (1,), (256,), (257,), (8, 4, 3, 3), (1, 1, 1, 1), (3,), (4, 2, 3, 3), (1,)]
NO_GRAD_ON_ODD_STEPS = {1, 6}


def _params(kind: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    out = []
    for i, shape in enumerate(SHAPES):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "mixed": (torch.bfloat16, torch.float32)[i % 2]}[kind]
        p = torch.randn(shape).to(dtype)
        if i == 4:
            p = p.to(memory_format=torch.channels_last)
        out.append(p.requires_grad_())
    return out


def _train(foreach: bool, state_dtype, kind: str, capturable: bool, steps: int = 6):
    params = _params(kind)
    gen = torch.Generator().manual_seed(5)
    groups = [{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.3}]
    opt = AdamW(groups, lr=torch.tensor(1e-2) if capturable else 1e-2, state_dtype=state_dtype, generator=gen,
                foreach=foreach, capturable=capturable)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-4, 1, (), generator=g))
            p.grad = None if step % 2 and i in NO_GRAD_ON_ODD_STEPS else grad.to(p.dtype)
        if step == 3:
            optim.set_lr(opt, 3e-3)
        opt.step()
    return params, opt, gen


def _assert_same(a, b) -> None:
    (pa, oa, ga), (pb, ob, gb) = a, b
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert torch.equal(ga.get_state(), gb.get_state())  # the same stochastic-rounding draws


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "mixed"])
@STATE_DTYPES
def test_foreach_is_bit_identical_to_the_per_parameter_path_on_awkward_sizes(state_dtype, kind, capturable):
    """Default 256-element blocks on sizes that are not whole blocks (1, 3, 257, 260 …), a
    channels_last conv weight, bf16 and fp32 weights mixed in one group, parameters without a
    gradient on odd steps, two groups and an LR change: weights, every state tensor and the
    stochastic-rounding generator agree bit for bit."""
    _assert_same(_train(False, state_dtype, kind, capturable), _train(True, state_dtype, kind, capturable))


@pytest.mark.parametrize("capturable", [False, True])
@STATE_DTYPES
def test_state_keeps_its_per_parameter_layout_and_storage(state_dtype, capturable):
    """The batched step reads and writes through shared buffers but every state tensor stays a
    tensor of its own (so ``state_dict`` saves per-parameter tensors, not whole chunks), is updated
    in place, and has the per-parameter step's shape (int8: ``(n,)`` codes, ``(ceil(n/256),)`` absmax)."""
    params, opt, _ = _train(True, state_dtype, "bf16", capturable, steps=2)
    pointers = {(i, k): v.data_ptr() for i, p in enumerate(params) for k, v in opt.state[p].items()
                if isinstance(v, torch.Tensor) and v.numel()}
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    seen: set[int] = set()
    for i, p in enumerate(params):
        state = opt.state[p]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or key == "step":
                continue
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key  # no chunk behind it
            assert value.data_ptr() not in seen
            seen.add(value.data_ptr())
            assert value.data_ptr() == pointers[(i, key)], key  # in place
        if state_dtype == "int8":
            assert state["exp_avg_codes"].shape == (p.numel(),)
            assert state["exp_avg_sq_absmax"].shape == (-(-p.numel() // 256),)
        else:
            assert state["exp_avg"].shape == p.shape


@STATE_DTYPES
def test_a_state_saved_by_the_per_parameter_step_resumes_in_the_batched_one(state_dtype):
    """A state file written by the per-parameter step (the format saved training states have always
    had) loads with ``torch.load(weights_only=True)`` into a ``foreach=True`` optimiser and the run
    continues bit for bit as the per-parameter run does; and back."""
    for saved_foreach in (False, True):
        params, opt, gen = _train(saved_foreach, state_dtype, "mixed", False, steps=3)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        weights = [p.detach().clone() for p in params]
        rng = gen.get_state()
        runs = []
        for foreach in (False, True):
            resumed = [w.clone().requires_grad_() for w in weights]
            resumed_gen = torch.Generator()
            resumed_gen.set_state(rng)
            resumed_opt = AdamW([{"params": resumed[:5]}, {"params": resumed[5:], "weight_decay": 0.3}], lr=1e-2,
                                state_dtype=state_dtype, generator=resumed_gen, foreach=foreach)
            buffer.seek(0)
            resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
            g = torch.Generator().manual_seed(11)
            for _ in range(2):
                for p in resumed:
                    p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
                resumed_opt.step()
            runs.append((resumed, resumed_opt, resumed_gen))
        _assert_same(*runs)


@pytest.mark.parametrize("other", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@STATE_DTYPES
def test_a_group_with_parameters_on_two_devices_steps_each_device_on_its_own(state_dtype, param_dtype, other):
    """One group holding parameters on two devices (a model split across devices; CPU and meta or
    CUDA, interleaved): the batched step concatenates per device, so it runs, and the CPU parameters
    and their state come out as the per-parameter step leaves them (before, the batched casts and
    the int8 code concatenation mixed devices and raised)."""
    def train(foreach: bool):
        torch.manual_seed(0)
        params = [torch.randn(n, dtype=param_dtype).to(device).requires_grad_()
                  for n, device in [(300, "cpu"), (40, other), (7, "cpu"), (260, other), (5, "cpu")]]
        opt = AdamW(params, lr=1e-2, state_dtype=state_dtype, foreach=foreach, stochastic_rounding=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(param_dtype).to(p.device)
            opt.step()
        return [p for p in params if p.device.type == "cpu"], opt

    (per_param, opt_a), (batched, opt_b) = train(False), train(True)
    for p, q in zip(per_param, batched):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b.state[q][key]), key


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@STATE_DTYPES
def test_empty_and_fp16_parameters_step_as_in_the_per_parameter_path(state_dtype, param_dtype):
    """Zero-size parameters (a whole chunk of them too) and fp16 weights with a channels_last conv:
    the batched casts and the int8 padding handle them, bit for bit as one parameter at a time."""
    def train(foreach: bool, shapes):
        torch.manual_seed(0)
        params = [torch.randn(s).to(param_dtype).requires_grad_() for s in shapes]
        params[-1].data = params[-1].data.to(memory_format=torch.channels_last)
        opt = AdamW(params, lr=1e-2, state_dtype=state_dtype, foreach=foreach, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(param_dtype)
            opt.step()
        return params, opt

    for shapes in ([(0, 3), (0, 2, 3, 3)], [(0, 3), (0,), (2, 3, 3, 3)], [(0, 3), (300,), (0,), (7,), (2, 3, 3, 3)]):
        (pa, oa), (pb, ob) = train(False, shapes), train(True, shapes)
        assert_same_optimizer_state(pa, oa, pb, ob)
        assert pb[-1].is_contiguous(memory_format=torch.channels_last)
