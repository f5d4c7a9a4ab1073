"""AdamW(foreach=True) cuts a parameter larger than a chunk into pieces at block boundaries: every
chunk (counted padded to whole int8 blocks) stays within the limit and no buffer outgrows it, the
step stays bit-identical to the per-parameter one wherever only weights are rounded (float32 or
int8 states), the step count advances once per parameter, the state keeps its per-parameter layout
and resumes either way, capturable agrees with the Python-scalar step (and, on CUDA, a captured
graph with the eager steps), and stochastically rounded writes of cut parameters (bf16 moments,
whose draw order changes) stay within one bf16 ulp of the float32 values and unbiased."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_states import assert_same_optimizer_state
from torch.utils._python_dispatch import TorchDispatchMode

from sdadapt.training import optim
from sdadapt.training.optim import AdamW

# learning rates a float32 lr tensor holds exactly, so capturable and not step with the same value
LR, LR_LATER = float(torch.tensor(1e-2)), float(torch.tensor(3e-3))


def _padded(n: int, block_size: int) -> int:
    return -(-n // block_size) * block_size


def _make_params(shapes, dtype, channels_last: set[int], seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape).to(dtype)
        if i in channels_last:
            p = p.to(memory_format=torch.channels_last)
        params.append(p.requires_grad_())
    return params


def _train(shapes, *, foreach: bool, state_dtype, block_size: int, param_dtype=torch.float32, capturable=False,
           stochastic_rounding=False, channels_last=frozenset(), steps: int = 3, seed: int = 0):
    """``steps`` AdamW steps over fresh parameters of ``shapes`` (gradients of varied scale, one
    parameter without a gradient on odd steps, an LR change): ``(params, optimizer, generator)``."""
    params = _make_params(shapes, param_dtype, set(channels_last), seed)
    gen = torch.Generator().manual_seed(5)
    opt = AdamW(params, lr=torch.tensor(LR) if capturable else LR, state_dtype=state_dtype, block_size=block_size,
                generator=gen, foreach=foreach, capturable=capturable, stochastic_rounding=stochastic_rounding)
    g = torch.Generator().manual_seed(seed + 3)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-4, 1, (), generator=g))
            grad = grad.to(param_dtype)
            if p.is_contiguous(memory_format=torch.channels_last) and p.dim() == 4:
                grad = grad.contiguous(memory_format=torch.channels_last)  # as autograd lays it out
            p.grad = None if step % 2 and i == 1 else grad
        if step == 2:
            optim.set_lr(opt, LR_LATER)
        opt.step()
    return params, opt, gen


def _record_chunks(monkeypatch) -> list[list]:
    """Every chunk ``AdamW._foreach_step`` is called with, from now on."""
    seen: list[list] = []
    inner = AdamW._foreach_step

    def spy(self, group, pieces, kind):
        seen.append(list(pieces))
        return inner(self, group, pieces, kind)

    monkeypatch.setattr(AdamW, "_foreach_step", spy)
    return seen


# ---------------------------------------------------------------------------------- the plan
def test_a_tensor_larger_than_the_chunk_is_cut_at_block_boundaries_into_exact_cover():
    """A 5000-element tensor after a 300-element one (512 padded), chunk 1000, blocks 256: the first
    piece fills the room left (256 = one block), then whole chunks of 768 (three blocks), the last
    piece shares its chunk with the next tensor; pieces cover [0, 5000) once, start on blocks."""
    params = [torch.zeros(300), torch.zeros(5000), torch.zeros(100)]
    chunks = optim._chunks(params, 1000, block_size=256, padded=True,
                           cut=lambda p: optim._cut(p, {}, 256, 1000))
    pieces = [piece for chunk in chunks for piece in chunk if piece.param is params[1]]
    assert [(piece.start, piece.stop) for piece in pieces] == (
        [(0, 256)] + [(256 + 768 * i, 256 + 768 * (i + 1)) for i in range(6)] + [(4864, 5000)])
    assert all(piece.flat and not piece.whole for piece in pieces)
    assert chunks[0][0].param is params[0] and chunks[0][1] is pieces[0]
    assert chunks[-1][-1].param is params[2] and chunks[-1][0] is pieces[-1]
    for chunk in chunks:
        assert sum(_padded(piece.numel(), 256) for piece in chunk) <= 1000


def test_the_chunk_bound_counts_int8_padding():
    """100 three-element tensors under int8 states pad to 256 each: a 1024-element chunk holds four of
    them (counting unpadded elements put all 100 in one chunk: 25,600 padded elements)."""
    params = [torch.zeros(3) for _ in range(100)]
    chunks = optim._chunks(params, 1024, block_size=256, padded=True)
    assert [len(chunk) for chunk in chunks] == [4] * 25
    assert len(optim._chunks(params, 1024, block_size=256)) == 1  # float states: no padding


def test_a_channels_last_tensor_is_cut_between_rows_and_a_contiguous_one_flat():
    """channels_last (40, 16, 3, 3): rows of 144 elements, blocks 64, so pieces of lcm = 576 elements
    (4 rows), taken as row views in the tensor's own layout; contiguous: flat block-sized pieces.
    A row run bigger than the chunk, or a 1-D strided tensor, is left whole."""
    conv = torch.zeros(40, 16, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    conv.grad = torch.zeros_like(conv)
    assert optim._cut(conv, {}, 64, 1500) == (576, False)
    (piece, *_), *_ = optim._chunks([conv], 1500, block_size=64, cut=lambda p: optim._cut(p, {}, 64, 1500))
    assert (piece.start, piece.stop, piece.flat) == (0, 1152, False)
    view = piece.of(conv)
    assert view.shape == (8, 16, 3, 3) and view.data_ptr() == conv.data_ptr()  # a view: writes reach conv
    assert view.is_contiguous(memory_format=torch.channels_last)
    flat = conv.detach().contiguous().requires_grad_()
    flat.grad = torch.zeros_like(flat)
    assert optim._cut(flat, {}, 64, 1500) == (64, True)
    assert optim._cut(conv, {}, 256, 1000) is None  # lcm(144, 256) = 2304 > 1000
    strided = torch.zeros(4000)[::2].requires_grad_()
    strided.grad = torch.zeros(2000)
    assert optim._cut(strided, {}, 64, 1000) is None


# --------------------------------------------------------------------------- bit identity
SHAPE = st.one_of(
    st.tuples(st.integers(1, 5000)),
    st.tuples(st.integers(1, 70), st.integers(1, 80)),
    st.tuples(st.integers(1, 40), st.sampled_from([3, 8, 16]), st.just(3), st.just(3)),
)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(SHAPE, min_size=1, max_size=4), limit=st.integers(200, 3000),
       block_size=st.sampled_from([37, 64, 100, 256]), state_dtype=st.sampled_from(["int8", "float32"]),
       param_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       stochastic_rounding=st.booleans(), channels_last=st.booleans(), capturable=st.booleans())
def test_cut_step_is_bit_identical_to_the_per_parameter_step(shapes, limit, block_size, state_dtype, param_dtype,
                                                             stochastic_rounding, channels_last, capturable):
    """Any sizes, chunk limits and block sizes (ones that do not divide the chunk too), conv weights
    in channels_last, fp32, fp16 or bf16 weights (rounded to nearest or stochastically: with float or
    int8 states only the weights are rounded, piece after piece in the per-parameter order, so the
    CPU draws are the same), int8 or fp32 states, capturable or not: weights, every state tensor
    (per-parameter layout, the step count once per parameter) and the generator equal
    ``foreach=False`` bit for bit after 3 steps."""
    shapes = shapes + [(5000,)]  # one tensor is always larger than the chunk
    four_d = frozenset(i for i, s in enumerate(shapes) if len(s) == 4) if channels_last else frozenset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", limit)
        chunks = _record_chunks(patch)
        kw = {"state_dtype": state_dtype, "block_size": block_size, "param_dtype": param_dtype,
              "channels_last": four_d, "capturable": capturable, "stochastic_rounding": stochastic_rounding}
        pa, oa, ga = _train(shapes, foreach=False, **kw)
        pb, ob, gb = _train(shapes, foreach=True, **kw)
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert torch.equal(ga.get_state(), gb.get_state())
    if block_size <= limit:  # the big one was cut (else no piece of whole blocks fits a chunk)
        assert any(not piece.whole for chunk in chunks for piece in chunk)
    for chunk in chunks:
        if len(chunk) > 1 or not chunk[0].whole:  # only a tensor that cannot be cut may exceed it
            padded = block_size if state_dtype == "int8" else 1
            assert sum(_padded(piece.numel(), padded) for piece in chunk) <= limit
    assert [int(ob.state[p]["step"]) for p in pb] == [2 if i == 1 else 3 for i in range(len(pb))]  # once per step


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-sr"])
@pytest.mark.parametrize("state_dtype", ["int8", torch.bfloat16, torch.float32], ids=["int8", "bf16", "fp32"])
def test_capturable_cut_step_is_bit_identical_to_the_python_scalar_cut_step(state_dtype, param_dtype, monkeypatch):
    """Both cut the same way, so even the stochastic-rounding draws agree: the pieces' bias
    corrections come from their parameter's step tensor (no host read, nothing sized by data)."""
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 700)
    shapes = [(300,), (50,), (2600,), (12, 8, 3, 3)]  # the conv: channels_last, cut into rows (576 = 8 rows)
    kw = {"state_dtype": state_dtype, "block_size": 64, "param_dtype": param_dtype, "stochastic_rounding": True,
          "channels_last": {3}, "steps": 4}
    pa, oa, ga = _train(shapes, foreach=True, capturable=False, **kw)
    pb, ob, gb = _train(shapes, foreach=True, capturable=True, **kw)
    assert_same_optimizer_state(pa, oa, pb, ob, step_as_number=True)
    assert torch.equal(ga.get_state(), gb.get_state())
    assert [float(ob.state[p]["step"]) for p in pb] == [4.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("state_dtype", ["int8", torch.float32], ids=["int8", "fp32"])
def test_a_state_saved_by_a_cut_step_resumes_either_way(state_dtype, monkeypatch):
    """The state dict of a cut run is the per-parameter run's (same keys, shapes, values); saved and
    loaded with ``torch.load(weights_only=True)`` it continues bit for bit with or without cutting."""
    shapes = [(3000,), (20, 13), (9, 4, 3, 3)]
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 1000)
    pa, oa, _ = _train(shapes, foreach=True, state_dtype=state_dtype, block_size=256, steps=2)
    _, ob, _ = _train(shapes, foreach=False, state_dtype=state_dtype, block_size=256, steps=2)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for index, entry in sa["state"].items():
        for key, value in entry.items():
            other = sb["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    buffer = io.BytesIO()
    torch.save(sa, buffer)
    runs = []
    for foreach, limit in ((False, 1 << 24), (True, 1000), (True, 1 << 24)):
        monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", limit)
        resumed = [p.detach().clone().requires_grad_() for p in pa]
        opt = AdamW(resumed, lr=1e-2, state_dtype=state_dtype, block_size=256, foreach=foreach)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
        g = torch.Generator().manual_seed(11)
        for _ in range(2):
            for p in resumed:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append((resumed, opt))
    for resumed, opt in runs[1:]:
        assert_same_optimizer_state(runs[0][0], runs[0][1], resumed, opt)


# ------------------------------------------------------------------------ stochastic rounding
def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values either side of float32 ``x`` (toward zero, away from it), as float32."""
    bits = x.view(torch.int32)
    down = bits & -65536
    up = torch.where(bits == down, down, down + 65536)
    return down.view(torch.float32), up.view(torch.float32)


def test_a_cut_bf16_weight_rounds_stochastically_within_one_ulp_and_unbiased(monkeypatch):
    """bf16 weights cut into pieces, one step: each weight is one of the two bf16 neighbours of the
    float32 update (the per-parameter step on a float32 copy), the mean of an update of 1/78 of an
    ulp survives (round-to-nearest would leave every weight where it was) — and with float32 states
    the rounded tensors are the weights alone, in order, so the pieces' draws are the per-parameter
    step's draws: bit-identical."""
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 4096)
    n = 40_000
    torch.manual_seed(0)
    start = torch.ones(n, dtype=torch.bfloat16) + torch.rand(n).to(torch.bfloat16) * 2 ** -5
    grad = (torch.rand(n) + 0.1).to(torch.bfloat16)  # positive: the first Adam step is -lr for every weight
    reference = start.float().requires_grad_()
    reference.grad = grad.float()
    AdamW([reference], lr=1e-4, weight_decay=0.0).step()
    results = []
    for foreach in (True, False):
        w = start.clone().requires_grad_()
        w.grad = grad.clone()
        gen = torch.Generator().manual_seed(1)
        AdamW([w], lr=1e-4, weight_decay=0.0, foreach=foreach, generator=gen).step()
        results.append((w.detach().float(), gen.get_state()))
    (cut, cut_gen), (whole, whole_gen) = results
    target = reference.detach()
    down, up = _bf16_neighbours(target)
    assert ((cut == down) | (cut == up)).all()
    assert (cut - target).mean().abs() < 4e-6  # unbiased: 5 standard deviations of the mean
    assert -1.1e-4 < (cut - start.float()).mean() < -0.9e-4
    assert torch.equal(cut, whole) and torch.equal(cut_gen, whole_gen)


def test_cut_bf16_moments_round_within_one_ulp_and_the_weights_match_fp32_states(monkeypatch):
    """bf16 states, fp32 weights, cut: after one step the weights equal the fp32-state step's (the
    step uses the float32 moments before they are rounded), every stored moment is one of the two
    bf16 neighbours of the fp32-state moment, and as many draws were made as by the per-parameter
    step (their order differs: m and v piece by piece)."""
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 1024)
    shapes = [(5000,), (30, 70)]
    pa, oa, ga = _train(shapes, foreach=True, state_dtype=torch.bfloat16, block_size=256, steps=1)
    pb, ob, _ = _train(shapes, foreach=False, state_dtype=torch.float32, block_size=256, steps=1)
    _, _, gc = _train(shapes, foreach=False, state_dtype=torch.bfloat16, block_size=256, steps=1)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            stored, exact = oa.state[p][key].float(), ob.state[q][key]
            down, up = _bf16_neighbours(exact)
            assert ((stored == down) | (stored == up)).all(), key
    assert torch.equal(ga.get_state(), gc.get_state())


# ---------------------------------------------------------------------------- memory bound
class _LargestOutput(TorchDispatchMode):
    """The largest tensor a non-view aten op returns while active (in elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in self.inputs(args):
                    self.largest = max(self.largest, t.numel())
        return out

    @staticmethod
    def inputs(args) -> set[int]:
        flat = []
        for a in args:
            flat += a if isinstance(a, (list, tuple)) else [a]
        return {t.data_ptr() for t in flat if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_buffer_of_an_int8_step_outgrows_the_chunk(param_dtype, monkeypatch):
    """A 20,000-element tensor with int8 states and a 2,048-element chunk: no tensor made during a
    step (float32 copies, dequantised moments, codes, rounding noise) has more than 2,048 elements,
    where the uncut step made whole-tensor (20,000-element) ones."""
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 2048)
    p = torch.randn(20_000).to(param_dtype).requires_grad_()
    opt = AdamW([p], lr=1e-3, state_dtype="int8", foreach=True)
    p.grad = torch.randn(p.shape).to(param_dtype)
    opt.step()  # makes the state (whole-tensor allocations, once)
    p.grad = torch.randn(p.shape).to(param_dtype)
    with _LargestOutput() as probe:
        opt.step()
    assert 1000 < probe.largest <= 2048


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state_dtype", ["int8", torch.float32], ids=["int8", "fp32"])
def test_cuda_graph_of_a_cut_capturable_step_replays_as_the_eager_steps(state_dtype, monkeypatch):
    """A capturable step whose parameters are cut into pieces, recorded once in a CUDA graph and
    replayed with new gradients, ends where the eager capturable steps end (fp32 weights: nothing
    stochastic, the same kernels): the pieces are views and slices fixed when captured."""
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 700)
    shapes = [(300,), (2600,), (12, 8, 3, 3), (50,)]
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g).cuda() for s in shapes] for _ in range(4)]
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s).cuda().requires_grad_() for s in shapes]
        params[2].data = params[2].data.to(memory_format=torch.channels_last)  # cut into rows
        opt = AdamW(params, lr=torch.tensor(LR, device="cuda"), state_dtype=state_dtype, block_size=64, foreach=True,
                    capturable=True)
        for p, grad in zip(params, grads[0]):
            p.grad = grad.clone().contiguous(memory_format=torch.preserve_format)
        params[2].grad = params[2].grad.contiguous(memory_format=torch.channels_last)
        opt.step()  # eager: makes the state
        graph = None
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for step_grads in grads[1:]:
            for p, grad in zip(params, step_grads):
                p.grad.copy_(grad)
            if graph is None:
                opt.step()
            else:
                graph.replay()
        torch.cuda.synchronize()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)
