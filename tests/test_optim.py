"""sdadapt.training.optim against torch / transformers / diffusers and naive float64 references, plus
statistical tests of stochastic rounding and invariants of the fused backward pass."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from docs_pages import run_block
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_states import assert_same_optimizer_state
from torch import nn

from sdadapt.training.optim import (
    Adafactor,
    AdamW,
    copy_stochastic_,
    dequantize_blockwise,
    dynamic_map,
    fuse_optimizer_into_backward,
    lr_at,
    quantize_blockwise,
    set_lr,
    stochastic_round_to_bf16,
)

SETTINGS = settings(max_examples=25, deadline=None)
ROOT = Path(__file__).resolve().parents[1]


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward-zero bf16, next bf16 away from zero) of float32 ``x``, both as float32 (naive:
    through the bit pattern, independent of the code under test)."""
    bits = x.view(torch.int32)
    low = bits & -65536
    high = low + 65536
    return low.view(torch.float32), high.view(torch.float32)


# ------------------------------------------------------------------------ stochastic rounding
@SETTINGS
@given(st.lists(st.floats(min_value=-(2.0**127), max_value=2.0**127, width=32, allow_nan=False), min_size=1, max_size=64))
def test_stochastic_rounding_lands_on_a_neighbour(values):
    x = torch.tensor(values, dtype=torch.float32)
    low, high = _bf16_neighbours(x)
    r = stochastic_round_to_bf16(x).float()
    assert torch.all((r == low) | (r == high))
    exact = x == low  # already a bf16: never moves
    assert torch.equal(r[exact], x[exact])


def test_stochastic_rounding_is_unbiased():
    """Each of K values rounded N times: the sample mean's deviation from x, in units of its
    standard error sqrt(p (1 - p) / N) · ulp, is standard normal; nearest rounding fails this."""
    gen = torch.Generator().manual_seed(0)
    k, n = 64, 4000
    x = torch.randn(k, generator=gen) * torch.logspace(-20, 20, k)  # (K,) spread over binades
    low, high = _bf16_neighbours(x)
    ulp = (high - low).double()  # signed step away from zero
    p = ((x - low).double() / ulp)  # P(round away from zero)
    samples = stochastic_round_to_bf16(x.expand(n, k).contiguous(), generator=gen).double()  # (N, K)
    se = (p * (1 - p) / n).sqrt() * ulp.abs()
    z = (samples.mean(0) - x.double()) / se
    assert z.abs().max() < 5.0, z
    assert 0.6 < (z**2).mean() < 1.5  # chi²_K / K
    # the observed rounding frequencies match p as well
    freq = (samples == high.double()).double().mean(0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()
    nearest = x.bfloat16().double()
    assert ((nearest - x.double()) / se).abs().max() > 5.0  # the test can tell a biased rounding


def test_stochastic_rounding_accumulates_tiny_updates():
    gen = torch.Generator().manual_seed(1)
    w_sr = torch.ones(8192, dtype=torch.bfloat16)
    w_nearest = torch.ones(8192, dtype=torch.bfloat16)
    for _ in range(100):
        w_sr = stochastic_round_to_bf16(w_sr.float() - 1e-4, generator=gen)
        w_nearest = (w_nearest.float() - 1e-4).bfloat16()
    assert torch.all(w_nearest == 1.0)  # 1e-4 is under half an ulp (2^-9) below 1.0
    # per element variance <= 100 steps · ulp²/4, ulp = 2^-8 below 1.0
    tol = 6 * math.sqrt(100 * 2.0**-16 / 4 / 8192)
    assert abs(w_sr.double().mean().item() - 0.99) < tol


def test_stochastic_rounding_special_values_and_copy():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0])
    x = torch.cat([x, torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)])  # NaN, low payload
    r = stochastic_round_to_bf16(x)
    assert r.dtype == torch.bfloat16
    assert torch.equal(r[:4].float(), x[:4]) and r[5] == 1.0
    assert torch.isnan(r[4]) and torch.isnan(r[6])
    source = torch.randn(5, 7)
    target = torch.empty(5, 7, dtype=torch.bfloat16)
    out = copy_stochastic_(target, source, torch.Generator().manual_seed(3))
    assert out is target
    assert torch.equal(target, stochastic_round_to_bf16(source, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_to_bf16(source.double())
    with pytest.raises(ValueError, match="bfloat16"):
        copy_stochastic_(torch.empty(5, 7), source)
    with pytest.raises(ValueError, match="shape"):
        copy_stochastic_(target, torch.randn(7, 5))


# --------------------------------------------------------------------- 8-bit block quantisation
def test_dynamic_map_shape():
    signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
    assert len(signed) == 255 and len(unsigned) == 256
    for code in (signed, unsigned):
        assert torch.all(code[1:] > code[:-1])  # sorted, distinct
        assert 0.0 in code and 1.0 in code and code.abs().max() == 1.0
    assert torch.equal(signed, -signed.flip(0))  # symmetric
    assert unsigned.min() == 0.0
    assert signed[signed > 0].min() < 1e-6 and unsigned[unsigned > 0].min() < 1e-6  # 7 decades


@SETTINGS
@given(
    n=st.integers(1, 700),
    block_size=st.sampled_from([8, 64, 256]),
    log_scale=st.floats(-30, 30),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blockwise_quantisation_picks_the_nearest_code(n, block_size, log_scale, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3) * math.exp(log_scale)
    if not signed:
        x = x.abs()
    code = dynamic_map(signed=signed)
    codes, absmax = quantize_blockwise(x, code, block_size=block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.shape == (math.ceil(n / block_size),)
    got = dequantize_blockwise(codes, absmax, code, block_size=block_size).double()
    # naive reference: per element, the code value closest to x / absmax of its block
    xd = x.double()
    scale = torch.stack([xd[i : i + block_size].abs().max() for i in range(0, n, block_size)])
    scale = scale.repeat_interleave(block_size)[:n]  # (n,)
    y = xd / scale.clamp_min(1e-300)
    ref = code.double()[(y[:, None] - code.double()[None, :]).abs().argmin(1)] * scale
    assert torch.all((got - xd).abs() <= (ref - xd).abs() + 1e-6 * scale)
    assert torch.all(got[x == 0] == 0)
    # each block's largest magnitude is stored exactly
    for i in range(0, n, block_size):
        j = i + int(x[i : i + block_size].abs().argmax())
        assert math.isclose(got[j].item(), x[j].item(), rel_tol=1e-6)


# ----------------------------------------------------------------------------------- AdamW
def _grad_sequence(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) + 0.2 for s in shapes] for _ in range(steps)]


def _run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        optimizer.step()


shapes_st = st.lists(
    st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple), min_size=1, max_size=3
)


@SETTINGS
@given(
    shapes=shapes_st,
    lr=st.floats(1e-4, 1e-1),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-3]),
)
def test_adamw_float32_matches_torch(shapes, lr, weight_decay, betas, eps):
    init = [torch.randn(s) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    grads = _grad_sequence(shapes, 40, seed=len(shapes))
    _run(AdamW(ours, **kwargs), ours, grads)
    _run(torch.optim.AdamW(theirs, **kwargs), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adamw_param_groups_and_lr_changes_match_torch():
    init = [torch.randn(6, 5), torch.randn(7)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    groups = lambda ps: [{"params": [ps[0]], "lr": 3e-3}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    a, b = AdamW(groups(ours), lr=1e-2), torch.optim.AdamW(groups(theirs), lr=1e-2)
    for i, step_grads in enumerate(_grad_sequence([(6, 5), (7,)], 30, seed=2)):
        set_lr(a, 1e-2 / (1 + i))
        set_lr(b, 1e-2 / (1 + i))
        _run(a, ours, [step_grads])
        _run(b, theirs, [step_grads])
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=gen)
    w_true = torch.randn(32, 16, generator=gen)
    y = x @ w_true
    return x, y


def _train(state_dtype, steps=150, lr=3e-2, param_dtype=torch.float32, seed=0):
    x, y = _regression(seed)
    w = torch.zeros(32, 16, dtype=param_dtype, requires_grad=True)
    opt = AdamW([w], lr=lr, weight_decay=0.0, state_dtype=state_dtype, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss = ((x @ w.float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return w.detach().float(), ((x @ w.float() - y) ** 2).mean().item(), opt


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
def test_adamw_low_precision_states_track_float32(state_dtype):
    w32, loss32, _ = _train(torch.float32)
    w, loss, _ = _train(state_dtype)
    x, y = _regression()
    start = (y**2).mean().item()
    assert loss < 0.05 * start and loss < 2 * loss32 + 1e-3 * start
    assert (w - w32).norm() < 0.05 * w32.norm()


def test_adamw_bf16_second_moment_decays_like_float32():
    """β₂ = 0.999 moves v by 0.1 %, under half a bf16 ulp (0.2 %): with round-to-nearest a bf16
    v would never decay; stochastic rounding keeps its mean on the float32 trajectory."""
    p32 = torch.zeros(4096, requires_grad=True)
    p16 = torch.zeros(4096, requires_grad=True)
    o32 = AdamW([p32], lr=1e-3)
    o16 = AdamW([p16], lr=1e-3, state_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    for step in range(210):
        g = torch.ones(4096) if step < 10 else torch.zeros(4096)
        for p, opt in ((p32, o32), (p16, o16)):
            p.grad = g.clone()
            opt.step()
    v32, v16 = o32.state[p32]["exp_avg_sq"], o16.state[p16]["exp_avg_sq"].float()
    assert v16.dtype == torch.float32 and o16.state[p16]["exp_avg_sq"].dtype == torch.bfloat16
    # v stays in [2⁻⁷, 2⁻⁶) (ulp 2⁻¹⁴); each write adds variance <= ulp²/4: 6 standard errors
    tol = 6 * math.sqrt(210) * 2.0**-14 / 2 / math.sqrt(4096)
    assert abs(v16.mean().item() - v32[0].item()) < tol  # nearest rounding: off by +22 %


def test_adamw_int8_first_step_equals_float32_and_states_decode_close():
    """The step uses the fresh float32 moments, so the first step is exact; afterwards the
    stored 8-bit moments decode close to the float32 ones."""
    shapes = [(40, 30), (1000,)]
    init = [torch.randn(s) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa, ob = AdamW(a, lr=1e-2, state_dtype="int8"), AdamW(b, lr=1e-2)
    grads = _grad_sequence(shapes, 20, seed=5)
    _run(oa, a, grads[:1])
    _run(ob, b, grads[:1])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
    _run(oa, a, grads[1:])
    _run(ob, b, grads[1:])
    code_m, code_v = dynamic_map(signed=True), dynamic_map(signed=False)
    for p, q in zip(a, b):
        sa, sb = oa.state[p], ob.state[q]
        m = dequantize_blockwise(sa["exp_avg_codes"], sa["exp_avg_absmax"], code_m).view(p.shape)
        root_v = dequantize_blockwise(sa["exp_avg_sq_codes"], sa["exp_avg_sq_absmax"], code_v).view(p.shape)
        assert (m - sb["exp_avg"]).norm() < 0.05 * sb["exp_avg"].norm()
        assert (root_v - sb["exp_avg_sq"].sqrt()).norm() < 0.05 * sb["exp_avg_sq"].sqrt().norm()


def test_adamw_int8_keeps_small_moments_in_a_block_with_an_outlier():
    """A linear 8-bit map would store every moment under absmax/255 as zero."""
    g = torch.full((256,), 1e-3)
    g[0] = 10.0
    p = torch.zeros(256, requires_grad=True)
    opt = AdamW([p], lr=1e-3, weight_decay=0.0, state_dtype="int8")
    for _ in range(10):
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], dynamic_map(signed=True))
    root_v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], dynamic_map(signed=False))
    m_true = 1e-3 * (1 - 0.9**10)
    v_true = 1e-6 * (1 - 0.999**10)
    assert torch.allclose(m[1:], torch.tensor(m_true), rtol=0.3)
    assert torch.allclose(root_v[1:], torch.tensor(math.sqrt(v_true)), rtol=0.3)
    # every small-gradient weight moved by ~lr per step, like the outlier
    torch.testing.assert_close(p.detach(), torch.full((256,), -1e-2), rtol=0.05, atol=0)


@pytest.mark.parametrize("make", [
    lambda ps, **kw: AdamW(ps, lr=1e-4, weight_decay=0.0, **kw),
    lambda ps, **kw: Adafactor(ps, lr=1e-4, **kw),
], ids=["adamw", "adafactor"])
def test_bf16_weights_keep_updates_smaller_than_half_an_ulp(make):
    """Constant gradients give steps of exactly lr = 1e-4, under half a bf16 ulp at 1.0."""
    steps = 50
    w_sr = torch.ones(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w_nearest = torch.ones(64, 128, dtype=torch.bfloat16, requires_grad=True)
    opt_sr = make([w_sr], generator=torch.Generator().manual_seed(0))
    opt_nearest = make([w_nearest], stochastic_rounding=False)
    for _ in range(steps):
        for w, opt in ((w_sr, opt_sr), (w_nearest, opt_nearest)):
            w.grad = torch.ones_like(w)
            opt.step()
    assert torch.all(w_nearest == 1.0)
    tol = 6 * math.sqrt(steps * 2.0**-16 / 4 / w_sr.numel())  # ulp 2^-8 below 1
    assert abs(w_sr.double().mean().item() - (1 - steps * 1e-4)) < tol


def test_adamw_state_bytes_per_param():
    n = 256 * 40
    expected = {torch.float32: 8.0, torch.bfloat16: 4.0, "int8": 2 + 2 * 4 / 256}
    for state_dtype, per_param in expected.items():
        p = torch.zeros(n, requires_grad=True)
        opt = AdamW([p], state_dtype=state_dtype)
        p.grad = torch.ones(n)
        opt.step()
        assert opt.state_bytes() / n == per_param


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adamw_state_dict_resumes_exactly(state_dtype, param_dtype):
    shapes = [(20, 13), (300,)]
    grads = _grad_sequence(shapes, 10, seed=7)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s).to(param_dtype).requires_grad_() for s in shapes]
    opt = AdamW(params, lr=1e-2, state_dtype=state_dtype, generator=gen)
    _run(opt, params, grads[:5])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    saved_rng = gen.get_state()
    _run(opt, params, grads[5:])

    gen2 = torch.Generator()
    gen2.set_state(saved_rng)
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = AdamW(resumed, lr=1e-2, state_dtype=state_dtype, generator=gen2)
    opt2.load_state_dict(saved_opt)
    for p, q in zip(params, resumed):  # torch would have cast float32 states to a bf16 param's dtype
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert opt2.state[q][key].dtype == value.dtype
    _run(opt2, resumed, grads[5:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("chunk", [1 << 24, 300])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adamw_foreach_is_bit_identical_to_the_per_parameter_path(state_dtype, param_dtype, chunk, monkeypatch):
    """Multi-tensor step == one parameter at a time: weights, every state tensor and the
    stochastic-rounding stream, with sizes that are not whole int8 blocks, a parameter whose
    gradient is missing on some steps, two groups, an LR change, and chunks of a few parameters."""
    import sdadapt.training.optim as optim

    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", chunk)
    shapes = [(20, 13), (300,), (7,), (3, 4, 3, 3)]
    grads = _grad_sequence(shapes, 6, seed=3)
    for step, step_grads in enumerate(grads):
        if step % 2:
            step_grads[2] = None  # a parameter without gradient this step: skipped, its step count lags
    runs = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(5)
        torch.manual_seed(0)
        params = [torch.randn(s).to(param_dtype).requires_grad_() for s in shapes]
        opt = AdamW([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.3}], lr=1e-2,
                    state_dtype=state_dtype, block_size=64, generator=gen, foreach=foreach)
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.to(param_dtype)
            if step == 3:
                set_lr(opt, 3e-3)
            opt.step()
        runs.append((params, opt, gen.get_state()))
    (pa, oa, ga), (pb, ob, gb) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert torch.equal(ga, gb)  # the same number of stochastic-rounding draws


def test_foreach_chunks_bound_the_elements():
    from sdadapt.training.optim import _chunks

    params = [torch.zeros(n) for n in (5, 5, 20, 3, 3, 3)]
    assert [[p.numel() for p in c] for c in _chunks(params, 10)] == [[5, 5], [20], [3, 3, 3]]


def test_a_chunks_padded_buffer_quantises_as_each_tensor_alone():
    """The int8 step re-quantises a chunk's moments where the step left them — one padded buffer,
    each tensor's span rounded up to whole blocks — after zeroing the positions ``_padding`` lists:
    each tensor's codes and absmax are then those of :func:`quantize_blockwise` on it alone."""
    from sdadapt.training.optim import (
        _code_boundaries,
        _padded_to_blocks,
        _quantize_to_boundaries,
        _unpadded_views,
    )

    g = torch.Generator().manual_seed(1)
    sizes = (1, 63, 64, 65, 200)
    xs = [torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 2, (n,), generator=g) for n in sizes]
    code = dynamic_map(signed=True)
    garbage = torch.full((63,), 7.0)  # what the decoded padding holds before the fill: anything
    flat = torch.cat(_padded_to_blocks(xs, 64, garbage))
    padding = AdamW([torch.zeros(1, requires_grad=True)], state_dtype="int8")._padding(torch.device("cpu"), 64, sizes)
    assert padding is not None and padding.numel() == sum(-n % 64 for n in sizes)
    flat.index_fill_(0, padding, 0.0)
    codes, absmax = _quantize_to_boundaries(flat, _code_boundaries(code), block_size=64)
    blocks = [-(-n // 64) for n in sizes]
    for x, c, a in zip(xs, _unpadded_views(codes, sizes, 64), absmax.split(blocks)):
        c_ref, a_ref = quantize_blockwise(x, code, block_size=64)
        assert torch.equal(c, c_ref) and torch.equal(a, a_ref)
    whole = AdamW([torch.zeros(1, requires_grad=True)], state_dtype="int8")._padding(torch.device("cpu"), 64, (64, 128))
    assert whole is None  # every tensor whole blocks: nothing to fill


def test_blockwise_absmax_is_the_plain_max_of_the_magnitudes():
    """absmax per block, taken as max(max x, −min x) in one pass, is ``x.abs().amax()`` to the bit —
    +0.0 for a block of −0.0s, and NaN for a block holding one."""
    x = torch.tensor([-0.0] * 4 + [1.0, -3.0, 2.0, 0.5] + [-1e-30, 0.0, 2e-30, -0.0] + [1.0, float("nan"), -2.0, 0.0])
    _, absmax = quantize_blockwise(x, dynamic_map(signed=True), block_size=4)
    expected = x.view(4, 4).abs().amax(dim=1)
    assert torch.equal(absmax[:3], expected[:3]) and not absmax[0].signbit() and absmax[3].isnan()


def test_adamw_rejects_bad_options():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(p, state_dtype="uint4")
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="block_size"):
        AdamW(p, state_dtype="int8", block_size=0)
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW([{"params": p, "state_dtype": "fp8"}])


# ------------------------------------------------------------------------------- Adafactor
def naive_adafactor(w0, grads, *, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                    weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False):
    """Float64 Adafactor from the paper's formulas, with ``V̂ = r cᵀ / mean(r)`` formed
    explicitly and ≥3-D weights viewed as (O, I·k·k)."""
    w = w0.double().clone()
    shape = w.shape
    matrix = lambda t: t.reshape(t.shape[0], -1) if t.dim() >= 2 else t  # noqa: E731
    r = c = v = m = None
    for t, g in enumerate(grads, start=1):
        g = matrix(g.double())
        beta2 = 1 - t**decay_rate
        g2 = g * g + eps[0]
        if g.dim() == 2:
            r = (1 - beta2) * g2.mean(1) if r is None else beta2 * r + (1 - beta2) * g2.mean(1)
            c = (1 - beta2) * g2.mean(0) if c is None else beta2 * c + (1 - beta2) * g2.mean(0)
            v_hat = torch.outer(r, c) / r.mean()
        else:
            v = (1 - beta2) * g2 if v is None else beta2 * v + (1 - beta2) * g2
            v_hat = v
        u = g / v_hat.sqrt()
        rms_u = math.sqrt((u * u).mean().item())
        u = u / max(1.0, rms_u / clip_threshold)
        rho = min(1e-6 * t if warmup_init else 1e-2, 1 / math.sqrt(t)) if relative_step else lr
        if scale_parameter:
            rho *= max(eps[1], math.sqrt((w * w).mean().item()))
        u = rho * u
        if beta1 is not None:
            m = (1 - beta1) * u if m is None else beta1 * m + (1 - beta1) * u
            u = m
        w = w - weight_decay * rho * w - u.reshape(shape)
    return w


ADAFACTOR_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, beta1=0.9, weight_decay=0.05),
    dict(lr=3e-2, clip_threshold=0.3, decay_rate=-0.5),
    dict(lr=None, relative_step=True, scale_parameter=True),
    dict(lr=None, relative_step=True, warmup_init=True, scale_parameter=True, beta1=0.5),
]


@pytest.mark.parametrize("config", ADAFACTOR_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shape", [(17,), (12, 20), (8, 3, 3, 3), (5, 1, 4)])
def test_adafactor_matches_naive_float64(shape, config):
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(shape, generator=gen)
    # gradients of very different row / column scale, so factoring and clipping both matter
    scales = torch.logspace(-2, 1, shape[0])[(...,) + (None,) * (len(shape) - 1)]
    grads = [torch.randn(shape, generator=gen) * scales for _ in range(25)]
    p = w0.clone().requires_grad_()
    _run(Adafactor([p], **config), [p], [[g] for g in grads])
    ref = naive_adafactor(w0, grads, **config)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ADAFACTOR_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_adafactor_matches_transformers(config):
    transformers_optimization = pytest.importorskip("transformers.optimization")
    gen = torch.Generator().manual_seed(4)
    shapes = [(12, 20), (6, 4, 3, 3), (9,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = _grad_sequence(shapes, 25, seed=9)
    theirs = [p.clone().requires_grad_() for p in init]
    theirs_config = {"scale_parameter": False, "relative_step": False, **config}
    _run(transformers_optimization.Adafactor(theirs, **theirs_config), theirs, grads)
    ours = [p.clone().requires_grad_() for p in init]  # transformers factors the last two dims
    _run(Adafactor(ours, factor_conv_as_matrix=False, **config), ours, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adafactor_zero_gradients_stay_finite():
    """ε₁ keeps 1/√V̂ finite where a row, a column or the whole gradient is zero."""
    w = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    start = (w.detach().clone(), b.detach().clone())
    opt = Adafactor([w, b], lr=1e-2, beta1=0.9)
    for _ in range(3):
        w.grad = torch.zeros(6, 5)
        w.grad[0] = 1.0  # one live row: the other rows' and columns' statistics are ε₁-sized
        b.grad = torch.zeros(5)
        opt.step()
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert torch.equal(w[1:], start[0][1:]) and torch.equal(b, start[1])
    assert (w[0] < start[0][0]).all()


def test_adafactor_state_bytes_and_factoring():
    conv = torch.zeros(64, 32, 3, 3, requires_grad=True)
    bias = torch.zeros(64, requires_grad=True)
    for as_matrix, floats in ((True, 64 + 32 * 9 + 64), (False, 2 * 64 * 32 * 3 + 64)):
        opt = Adafactor([conv, bias], lr=1e-3, factor_conv_as_matrix=as_matrix)
        conv.grad, bias.grad = torch.ones_like(conv), torch.ones_like(bias)
        opt.step()
        assert opt.state_bytes() == 4 * floats
    opt = Adafactor([conv], lr=1e-3, beta1=0.9)
    conv.grad = torch.ones_like(conv)
    opt.step()
    assert opt.state_bytes() == 4 * (conv.numel() + 64 + 32 * 9)


def test_adafactor_rejects_bad_options():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        Adafactor(p)
    with pytest.raises(ValueError, match="not both"):
        Adafactor(p, lr=1e-3, relative_step=True)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(p, lr=1e-3, warmup_init=True)
    with pytest.raises(ValueError, match="beta1"):
        Adafactor(p, lr=1e-3, beta1=1.5)
    with pytest.raises(ValueError, match="decay_rate"):
        Adafactor(p, lr=1e-3, decay_rate=0.8)


# --------------------------------------------------------------------------- fused backward
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _batches(n=6):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(n)]


MAKERS = {
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw-int8": lambda ps: AdamW(ps, lr=1e-2, state_dtype="int8"),
    "adamw-bf16-state": lambda ps: AdamW(ps, lr=1e-2, state_dtype=torch.bfloat16,
                                         generator=torch.Generator().manual_seed(0)),
    "adafactor": lambda ps: Adafactor(ps, lr=1e-2, beta1=0.9),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_fused_backward_equals_the_usual_loop_and_frees_grads(name):
    make = MAKERS[name]
    if name == "adamw-bf16-state":  # one generator per optimiser draws differently: compare per-parameter loops
        usual_model = _mlp()
        usual = [make([p]) for p in usual_model.parameters()]
    else:
        usual_model = _mlp()
        usual = [make(list(usual_model.parameters()))]
    fused_model = _mlp()
    alive: list[int] = []

    def make_counting(ps):
        opt = make(ps)
        opt.register_step_pre_hook(lambda *_: alive.append(sum(p.grad is not None for p in fused_model.parameters())))
        return opt

    handle = fuse_optimizer_into_backward(fused_model.parameters(), make_counting)
    for i, (x, y) in enumerate(_batches()):
        lr = lr_at(i, base_lr=1e-2, schedule="cosine", warmup_steps=2, total_steps=6)
        for opt in usual:
            set_lr(opt, lr)
        nn.functional.mse_loss(usual_model(x), y).backward()
        for opt in usual:
            opt.step()
            opt.zero_grad()
        handle.set_lr(lr)
        nn.functional.mse_loss(fused_model(x), y).backward()
        assert all(p.grad is None for p in fused_model.parameters())
    assert max(alive) == 1 and len(alive) == 6 * len(list(fused_model.parameters()))
    for a, b, start in zip(usual_model.parameters(), fused_model.parameters(), _mlp().parameters()):
        assert not torch.equal(a, start)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    handle.remove()


def test_fused_backward_state_dict_remove_and_validation():
    batches = _batches(8)
    make = lambda ps: AdamW(ps, lr=1e-2, state_dtype="int8")  # noqa: E731
    model = _mlp()
    handle = fuse_optimizer_into_backward(model.parameters(), make)
    for x, y in batches[:4]:
        nn.functional.mse_loss(model(x), y).backward()
    saved = copy.deepcopy(handle.state_dict())
    saved_weights = copy.deepcopy(model.state_dict())
    assert handle.state_bytes() > 0
    for x, y in batches[4:]:
        nn.functional.mse_loss(model(x), y).backward()

    resumed = _mlp()
    resumed.load_state_dict(saved_weights)
    handle2 = fuse_optimizer_into_backward(resumed.parameters(), make)
    handle2.load_state_dict(saved)
    for x, y in batches[4:]:
        nn.functional.mse_loss(resumed(x), y).backward()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    handle.remove()  # back to ordinary accumulation, no more steps
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(batches[0][0]), batches[0][1]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    with pytest.raises(ValueError, match="optimisers"):
        handle2.load_state_dict({"optimizers": []})
    with pytest.raises(ValueError, match="leaf"):
        fuse_optimizer_into_backward([model[0].weight * 2], make)
    frozen = _mlp()
    frozen[0].requires_grad_(False)
    partial = fuse_optimizer_into_backward(frozen.parameters(), make)
    assert len(partial.optimizers) == 4
    with pytest.raises(ValueError, match="requires grad"):
        fuse_optimizer_into_backward(frozen[0].parameters(), make)
    partial.remove()
    handle2.remove()


# ---------------------------------------------------------------------------- LR schedules
DIFFUSERS_NAMES = {"constant": "constant", "warmup": "constant_with_warmup", "linear": "linear",
                   "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts"}


@pytest.mark.parametrize("schedule", list(DIFFUSERS_NAMES))
@pytest.mark.parametrize("warmup_steps,total_steps,num_cycles", [(0, 40, 1), (7, 50, 3), (10, 10, 2), (1, 33, 4)])
def test_lr_at_matches_diffusers(schedule, warmup_steps, total_steps, num_cycles):
    optimization = pytest.importorskip("diffusers.optimization")
    base = 2e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    warmup = 0 if schedule == "constant" else warmup_steps
    sched = optimization.get_scheduler(DIFFUSERS_NAMES[schedule], opt, num_warmup_steps=warmup,
                                       num_training_steps=total_steps, num_cycles=num_cycles)
    for step in range(total_steps + 1):
        ours = lr_at(step, base_lr=base, schedule=schedule, warmup_steps=warmup,
                     total_steps=total_steps, num_cycles=num_cycles)
        assert math.isclose(ours, sched.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15), step
        opt.step()
        sched.step()


def test_lr_at_min_lr_matches_transformers():
    optimization = pytest.importorskip("transformers.optimization")
    base, min_lr = 1e-3, 1e-4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = optimization.get_cosine_with_min_lr_schedule_with_warmup(opt, 5, 40, min_lr=min_lr)
    for step in range(41):
        ours = lr_at(step, base_lr=base, schedule="cosine", warmup_steps=5, total_steps=40, min_lr=min_lr)
        assert math.isclose(ours, sched.get_last_lr()[0], rel_tol=1e-12), step
        opt.step()
        sched.step()


@SETTINGS
@given(
    schedule=st.sampled_from(["linear", "cosine", "cosine_with_restarts"]),
    warmup=st.integers(0, 20),
    total=st.integers(1, 200),
    cycles=st.integers(1, 5),
    min_frac=st.floats(0, 1),
)
def test_lr_at_stays_between_min_and_base(schedule, warmup, total, cycles, min_frac):
    base = 1.0
    lrs = [lr_at(s, base_lr=base, schedule=schedule, warmup_steps=warmup, total_steps=total,
                 num_cycles=cycles, min_lr=min_frac) for s in range(total + 30)]
    after = lrs[warmup:]
    assert all(min_frac - 1e-12 <= lr <= base + 1e-12 for lr in after)
    assert lrs[max(total, warmup) + 5] == pytest.approx(min_frac)  # stays at min_lr past the end
    if schedule != "cosine_with_restarts":
        assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # monotone decay


def test_lr_at_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be"):
        lr_at(0, base_lr=1.0, schedule="exponential")
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, base_lr=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="'warmup'"):
        lr_at(5, base_lr=1.0, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(5, base_lr=1.0, schedule="linear", total_steps=10, min_lr=2.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, base_lr=1.0)


# ------------------------------------------------------------------------------------- docs
def test_docs_example_runs():
    namespace = run_block("optim.md")
    assert namespace["final_loss"] < 0.1 * namespace["first_loss"]
    assert all(p.grad is None for p in namespace["model"].parameters())


def test_stochastic_rounding_of_adjacent_pieces_reads_their_buffer_and_draws_as_the_concatenation():
    """Working copies that are consecutive pieces of one float32 buffer (the multi-tensor step's, when
    only weights are rounded) are rounded from that buffer without a concatenated copy: the same draws
    and the same bf16 values as the copy path."""
    from sdadapt.training.optim import _adjacent, _copy_stochastic_many

    buffer = torch.randn(61) * 3
    pieces = [part.view(shape) for part, shape in zip(buffer.split([6, 15, 40]), [(2, 3), (15,), (4, 2, 5)])]
    separate = [p.clone() for p in pieces]  # (same values, apart: concatenated)
    assert _adjacent(pieces) is not None and _adjacent(pieces).data_ptr() == buffer.data_ptr()
    assert _adjacent(separate) is None and _adjacent(pieces[::-1]) is None
    out = [[torch.empty(p.shape, dtype=torch.bfloat16) for p in pieces] for _ in range(2)]
    _copy_stochastic_many(out[0], pieces, torch.Generator().manual_seed(5))
    _copy_stochastic_many(out[1], separate, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert torch.equal(buffer, torch.cat([p.reshape(-1) for p in separate]))  # (the source is not changed)
