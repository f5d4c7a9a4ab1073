"""LoRA / LoCon math against naive float64 references, two-path comparisons and invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from sdadapt.adapters import (
    LayerGeometry,
    LoRAConfig,
    LoRAModule,
    geometry_of,
    lora_delta_weight,
    lora_forward,
    lora_scale,
    pissa_factors,
)

SETTINGS = settings(max_examples=30, deadline=None)

#: relative tolerance per dtype, applied to an a-priori bound of the result's magnitude
#: (``Σ |scale| |up| |down| |x|``), so cancellation cannot make a correct result look wrong.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
DTYPES = list(REL_TOL)


def assert_within_bound(actual: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, dtype) -> None:
    """``|actual - reference| <= REL_TOL[dtype] * bound`` elementwise (all float64)."""
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    err = (actual.double() - reference.double()).abs()
    limit = REL_TOL[dtype] * bound.double() + 1e-300
    worst = (err - limit).max()
    assert worst <= 0, f"{dtype}: max error {err.max().item():.3e}, limit there {limit.flatten()[(err - limit).argmax()].item():.3e}"


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _conv_geometry(draw) -> tuple[LayerGeometry, nn.Conv2d | None, int]:
    """Draw a linear or conv base layer; returns (geometry, conv module or None, input size)."""
    out_f = draw(st.integers(1, 7))
    in_f = draw(st.integers(1, 7))
    if draw(st.booleans()):
        return LayerGeometry(out_f, in_f), None, 0
    kh, kw = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3]))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.integers(0, 4)) == 0:
        padding: tuple[int, int] | str = "same"
        stride = (1, 1)
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = draw(st.integers(5, 8))
    conv = nn.Conv2d(
        in_f, out_f, (kh, kw), stride=stride, padding=padding, dilation=dilation,
        padding_mode=mode, bias=False, dtype=torch.float64,
    )
    return geometry_of(conv), conv, size


@st.composite
def lora_case(draw):
    geometry, conv, size = _conv_geometry(draw)
    rank = draw(st.integers(1, 6))
    scale = draw(st.floats(-3, 3, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 3))
    return geometry, conv, size, rank, scale, dtype, seed, batch


def _factors(geometry: LayerGeometry, rank: int, gen: torch.Generator):
    up = _rand(gen, geometry.out_features, rank, *([1] * len(geometry.kernel)))
    down = _rand(gen, rank, geometry.in_features, *geometry.kernel)
    return up, down


def _naive_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 ΔW[o, i, k...] = scale Σ_r up[o, r] down[r, i, k...] by einsum over explicit indices."""
    up2 = up.double().reshape(up.shape[0], up.shape[1])
    if down.dim() == 2:
        return scale * torch.einsum("or,ri->oi", up2, down.double())
    return scale * torch.einsum("or,rihw->oihw", up2, down.double())


# ------------------------------------------------------------------------------------ ΔW


@SETTINGS
@given(lora_case())
def test_delta_weight_matches_naive_reference(case):
    geometry, _, _, rank, scale, dtype, seed, _ = case
    up, down = _factors(geometry, rank, torch.Generator().manual_seed(seed))
    up_t, down_t = up.to(dtype), down.to(dtype)
    delta = lora_delta_weight(up_t, down_t, scale)
    assert delta.shape == geometry.weight_shape
    assert delta.dtype == dtype
    reference = _naive_delta(up_t, down_t, scale)  # from the rounded inputs, in float64
    bound = _naive_delta(up_t.abs(), down_t.abs(), abs(scale))
    assert_within_bound(delta, reference, bound, dtype)
    # a 0-dim tensor scale is the same as a float
    delta_t = lora_delta_weight(up_t, down_t, torch.tensor(scale, dtype=dtype))
    assert_within_bound(delta_t, reference, bound, dtype)


def test_delta_weight_python_loop_reference():
    gen = torch.Generator().manual_seed(0)
    up, down = _rand(gen, 3, 2, 1, 1), _rand(gen, 2, 4, 3, 2)
    delta = lora_delta_weight(up, down, 0.75)
    for o, i, h, w in itertools.product(range(3), range(4), range(3), range(2)):
        expected = 0.75 * sum(up[o, r, 0, 0].item() * down[r, i, h, w].item() for r in range(2))
        assert math.isclose(delta[o, i, h, w].item(), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_delta_weight_rejects_rank_mismatch():
    with pytest.raises(ValueError, match="rank"):
        lora_delta_weight(torch.zeros(3, 2), torch.zeros(4, 5))


@SETTINGS
@given(lora_case())
def test_delta_rank_at_most_r(case):
    geometry, _, _, rank, scale, _, seed, _ = case
    up, down = _factors(geometry, rank, torch.Generator().manual_seed(seed))
    delta = lora_delta_weight(up, down, scale).reshape(geometry.out_features, -1)
    got = int(torch.linalg.matrix_rank(delta))
    assert got <= rank
    # generic (Gaussian) factors reach the full possible rank
    assert got == min(rank, delta.shape[0], delta.shape[1])


# ------------------------------------------------------------------------------------ forward


def _reference_layer(geometry: LayerGeometry, conv: nn.Conv2d | None, weight: torch.Tensor) -> nn.Module:
    """A float64 torch layer (nn.Linear / nn.Conv2d with the same geometry) holding ``weight``."""
    if conv is None:
        layer = nn.Linear(geometry.in_features, geometry.out_features, bias=False, dtype=torch.float64)
    else:
        layer = conv
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _torch_conv_is_right(geometry: LayerGeometry, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's own convolution in ``x``'s dtype is right here for this geometry (a plain layer, no LoRA):
    torch 2.13's CPU oneDNN bfloat16 conv returns wrong numbers for some strided, dilated geometries whose output is
    one column wide on some CPUs (error ~10 where the values are ~2); no LoRA math can be checked through it there."""
    if not geometry.is_conv or x.dtype == torch.float64:
        return True
    got = geometry.conv(x, weight.to(x.dtype)).double()
    reference = geometry.conv(x.double(), weight.to(x.dtype).double())
    bound = geometry.conv(x.double().abs(), weight.to(x.dtype).double().abs())
    return bool(((got - reference).abs() <= REL_TOL[x.dtype] * bound + 1e-300).all())


def _input(geometry: LayerGeometry, size: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    if geometry.is_conv:
        return _rand(gen, batch, geometry.in_features, size, size + 1)
    return _rand(gen, batch, 2, geometry.in_features)  # (B, T, in): leading dims are kept


@SETTINGS
@given(lora_case())
def test_lora_forward_equals_layer_with_delta_weight(case):
    geometry, conv, size, rank, scale, dtype, seed, batch = case
    gen = torch.Generator().manual_seed(seed)
    up, down = _factors(geometry, rank, gen)
    x = _input(geometry, size, batch, gen)
    up_t, down_t, x_t = up.to(dtype), down.to(dtype), x.to(dtype)
    assume(_torch_conv_is_right(geometry, x_t, lora_delta_weight(up, down, scale)))

    got = lora_forward(x_t, up_t, down_t, scale, geometry)
    assert got.dtype == dtype

    # float64 reference: the torch layer itself (nn.Conv2d honours padding_mode) with weight ΔW
    x64 = x_t.double()
    reference = _reference_layer(geometry, conv, _naive_delta(up_t, down_t, scale))(x64)
    bound = _reference_layer(geometry, conv, _naive_delta(up_t.abs(), down_t.abs(), abs(scale)))(x64.abs())
    with torch.no_grad():
        assert_within_bound(got, reference, bound, dtype)
        # second path: the merge path geometry.conv(x, ΔW) in the same dtype
        merged = geometry.conv(x_t, lora_delta_weight(up_t, down_t, scale))
        assert merged.shape == got.shape
        assert_within_bound(merged, reference, bound, dtype)


@SETTINGS
@given(lora_case(), st.sampled_from(["kaiming", "gaussian"]), st.booleans())
def test_module_forward_equals_functional(case, init, rank_stabilized):
    geometry, _, size, rank, _, _, seed, batch = case
    torch.manual_seed(seed)
    alpha = float(rank) / 2
    module = LoRAModule(geometry, rank, alpha, rank_stabilized=rank_stabilized, init=init, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_up.copy_(_rand(gen, *module.lora_up.shape))
        module.set_multiplier(1.5)
    x = _input(geometry, size, batch, gen)
    expected_scale = lora_scale(alpha, rank, rank_stabilized=rank_stabilized) * 1.5
    assert math.isclose(float(module.scale), expected_scale, rel_tol=1e-6)
    with torch.no_grad():
        got = module(x)
        functional = lora_forward(x, module.lora_up, module.lora_down, expected_scale, geometry)
        torch.testing.assert_close(got, functional, rtol=1e-6, atol=1e-10)
        delta = lora_delta_weight(module.lora_up, module.lora_down, expected_scale)
        torch.testing.assert_close(module.delta_weight(), delta, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(geometry.conv(x, module.delta_weight()), got, rtol=1e-6, atol=1e-9)


@SETTINGS
@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_1x1_conv_lora_equals_linear_lora(out_f, in_f, rank, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    up, down = _rand(gen, out_f, rank).to(dtype), _rand(gen, rank, in_f).to(dtype)
    x = _rand(gen, 2, in_f, 3, 4).to(dtype)
    conv_geometry = geometry_of(nn.Conv2d(in_f, out_f, 1))
    linear_geometry = geometry_of(nn.Linear(in_f, out_f))
    conv_out = lora_forward(x, up[:, :, None, None], down[:, :, None, None], 0.5, conv_geometry)
    linear_out = lora_forward(x.permute(0, 2, 3, 1), up, down, 0.5, linear_geometry).permute(0, 3, 1, 2)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(conv_out, linear_out, **tol)
    conv_delta = lora_delta_weight(up[:, :, None, None], down[:, :, None, None], 0.5)
    torch.testing.assert_close(conv_delta.reshape(out_f, in_f), lora_delta_weight(up, down, 0.5), **tol)


@SETTINGS
@given(lora_case(), st.sampled_from(["kaiming", "gaussian"]))
def test_fresh_module_is_exact_identity_on_the_layer(case, init):
    geometry, conv, size, rank, _, _, seed, batch = case
    torch.manual_seed(seed)
    layer = conv.float() if conv is not None else nn.Linear(geometry.in_features, geometry.out_features)
    module = LoRAModule(geometry_of(layer), rank, 3.0, init=init)
    assert torch.count_nonzero(module.lora_down) > 0  # down is random, up is zero
    assert torch.count_nonzero(module.lora_up) == 0
    x = _input(geometry, size, batch, torch.Generator().manual_seed(seed)).float()
    with torch.no_grad():
        base = layer(x)
        assert torch.count_nonzero(module(x)) == 0
        handle = layer.register_forward_hook(module.hook)
        adapted = layer(x)
        handle.remove()
    assert torch.equal(adapted, base)


# ------------------------------------------------------------------------------------ scale


@pytest.mark.parametrize("rank", [1, 2, 4, 7, 64])
def test_lora_scale_semantics(rank):
    assert lora_scale(None, rank) == 1.0
    assert lora_scale(0, rank) == 1.0
    assert lora_scale(None, rank, rank_stabilized=True) == pytest.approx(1.0)
    assert lora_scale(3.0, rank) == pytest.approx(3.0 / rank)
    assert lora_scale(3.0, rank, rank_stabilized=True) == pytest.approx(3.0 / math.sqrt(rank))
    assert lora_scale(float(rank), rank) == 1.0


@pytest.mark.parametrize("rank", [0, -1])
def test_lora_scale_rejects_bad_rank(rank):
    with pytest.raises(ValueError):
        lora_scale(1.0, rank)


@pytest.mark.parametrize("rank_stabilized", [False, True])
def test_module_stores_alpha_in_file_convention(rank_stabilized):
    geometry = LayerGeometry(5, 6)
    module = LoRAModule(geometry, 4, 2.0, rank_stabilized=rank_stabilized)
    scale = 2.0 / (2.0 if rank_stabilized else 4.0)
    # files always mean scale = alpha / r
    assert float(module.alpha) / module.rank == pytest.approx(scale)
    assert float(module.scale) == pytest.approx(scale)
    nn.init.normal_(module.lora_up)
    reloaded = LoRAModule.from_file_tensors(geometry, module.file_tensors())
    torch.testing.assert_close(reloaded.delta_weight(), module.delta_weight())
    # a file without alpha means alpha = r (scale 1)
    tensors = {k: v for k, v in module.file_tensors().items() if k != "alpha"}
    assert float(LoRAModule.from_file_tensors(geometry, tensors).scale) == 1.0


def test_multiplier_scales_delta_linearly():
    geometry = LayerGeometry(4, 3, (3, 3), padding=(1, 1))
    module = LoRAModule(geometry, 2, 1.0, dtype=torch.float64)
    nn.init.normal_(module.lora_up)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        one = module(x)
        module.set_multiplier(-2.5)
        torch.testing.assert_close(module(x), -2.5 * one)
        module.set_multiplier(0.0)
        assert torch.count_nonzero(module(x)) == 0


def test_config_rank_for_kxk_convs_only():
    config = LoRAConfig(rank=4, alpha=2.0, conv_rank=8, conv_alpha=1.0)
    assert config.rank_alpha_for(LayerGeometry(3, 3)) == (4, 2.0)
    assert config.rank_alpha_for(LayerGeometry(3, 3, (1, 1))) == (4, 2.0)
    assert config.rank_alpha_for(LayerGeometry(3, 3, (3, 3))) == (8, 1.0)
    assert config.rank_alpha_for(LayerGeometry(3, 3, (1, 3))) == (8, 1.0)
    assert LoRAConfig(rank=4).rank_alpha_for(LayerGeometry(3, 3, (3, 3))) == (4, None)


@pytest.mark.parametrize(
    "kwargs", [{"rank": 0}, {"rank": 2.5}, {"conv_rank": -1}, {"dropout": 1.0}, {"rank_dropout": -0.1}, {"init": "xavier"}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        LoRAConfig(**kwargs)


# ------------------------------------------------------------------------------------ PiSSA


@SETTINGS
@given(
    st.integers(1, 8), st.integers(1, 6), st.sampled_from([(), (1, 1), (3, 3), (1, 3)]),
    st.integers(1, 8), st.floats(0.05, 4.0), st.integers(0, 2**31 - 1),
)
def test_pissa_factors_best_rank_r_split(out_f, in_f, kernel, rank, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = _rand(gen, out_f, in_f, *kernel).float()
    cols = in_f * math.prod(kernel)
    rank = min(rank, out_f, cols)
    up, down, residual = pissa_factors(weight, rank, scale)
    assert up.shape == (out_f, rank) and down.shape == (rank, in_f, *kernel)
    assert residual.shape == weight.shape
    assert up.dtype == down.dtype == residual.dtype == torch.float32

    w64 = weight.double().reshape(out_f, cols)
    low = scale * up.double() @ down.double().reshape(rank, cols)
    # exact split: scale·up·down + residual == W
    torch.testing.assert_close(low + residual.double().reshape(out_f, cols), w64, rtol=0, atol=2e-5)

    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    # Eckart–Young: the error of the best rank-r approximation is the tail of the spectrum
    tail = s[rank:].square().sum().sqrt()
    assert torch.linalg.matrix_norm(w64 - low) == pytest.approx(tail.item(), abs=1e-4 * (1 + s[0].item()))
    # ... and with a clear spectral gap the approximation is the truncated SVD itself
    if rank == len(s) or s[rank - 1] - s[rank] > 0.1 * s[0]:
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(low, best, rtol=0, atol=1e-4 * (1 + s[0].item()))
    # balanced split: both factors carry sqrt(S / scale)
    gram_up = up.double().T @ up.double()
    gram_down = down.double().reshape(rank, cols) @ down.double().reshape(rank, cols).T
    torch.testing.assert_close(gram_up, torch.diag(s[:rank] / scale), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gram_down, torch.diag(s[:rank] / scale), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_module_init_from_base(kernel):
    torch.manual_seed(0)
    geometry = LayerGeometry(6, 5, kernel, padding=(1, 1))
    weight = torch.randn(geometry.weight_shape)
    module = LoRAModule(geometry, 3, 1.5, init="pissa")
    residual = module.init_from_base(weight)
    torch.testing.assert_close(module.delta_weight() + residual, weight, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ dropout


def _dropout_module(geometry: LayerGeometry, **kwargs) -> LoRAModule:
    torch.manual_seed(0)
    module = LoRAModule(geometry, 3, 3.0, dtype=torch.float64, **kwargs)
    nn.init.normal_(module.lora_up)
    return module


GEOMETRIES = [LayerGeometry(5, 4), LayerGeometry(5, 4, (3, 3), padding=(1, 1))]


def _x(geometry: LayerGeometry) -> torch.Tensor:
    torch.manual_seed(1)
    shape = (4, geometry.in_features, 5, 5) if geometry.is_conv else (4, 3, geometry.in_features)
    return torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["linear", "conv"])
def test_dropouts_are_identity_in_eval(geometry):
    plain = _dropout_module(geometry)
    noisy = _dropout_module(geometry, dropout=0.5, rank_dropout=0.5)
    noisy.load_state_dict(plain.state_dict())
    plain.eval()
    noisy.eval()
    x = _x(geometry)
    with torch.no_grad():
        reference = plain(x)
        assert torch.equal(noisy(x), reference)
        assert torch.equal(noisy(x), reference)  # deterministic
        noisy.train()
        trained = [noisy(x) for _ in range(4)]
    assert any(not torch.allclose(t, reference) for t in trained), "dropout never acted in training mode"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["linear", "conv"])
def test_rank_dropout_drops_whole_ranks_per_sample_and_rescales(geometry):
    p = 0.5
    module = _dropout_module(geometry, rank_dropout=p).train()
    x = _x(geometry)
    rank = module.rank
    up = module.lora_up.detach().reshape(geometry.out_features, rank)
    with torch.no_grad():
        h = geometry.conv(x, module.lora_down)  # per-rank activations
        scale = float(module.scale)
        seen_masks = set()
        per_sample = False  # did samples of one batch ever get different masks?
        for _ in range(6):
            out = module(x)
            batch_masks = set()
            for b in range(x.shape[0]):
                candidates = []
                for mask in itertools.product([0.0, 1.0], repeat=rank):
                    m = torch.tensor(mask, dtype=torch.float64)
                    if geometry.is_conv:
                        pred = torch.einsum("or,rhw->ohw", up * m, h[b])
                    else:
                        pred = h[b] @ (up * m).T
                    if torch.allclose(out[b], scale / (1 - p) * pred, rtol=1e-9, atol=1e-9):
                        candidates.append(mask)
                assert candidates, f"sample {b}: output is not a rank-masked, 1/(1-p)-rescaled delta"
                seen_masks.add(candidates[0])
                batch_masks.add(candidates[0])
            per_sample |= len(batch_masks) > 1
    assert len(seen_masks) > 1, "rank dropout produced the same mask every time"
    assert per_sample, "rank dropout used one mask for the whole batch"


def test_module_dropout_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(4, 5).double()
    module = LoRAModule(geometry_of(layer), 2, 2.0, module_dropout=0.9, dtype=torch.float64)
    nn.init.normal_(module.lora_up)
    layer.register_forward_hook(module.hook)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        base = F.linear(x, layer.weight, layer.bias)
        module.eval()
        evals = [layer(x) for _ in range(10)]
        assert all(torch.equal(e, evals[0]) for e in evals)
        assert not torch.allclose(evals[0], base)
        module.train()
        trains = [layer(x) for _ in range(30)]
    assert any(torch.equal(t, base) for t in trains), "module dropout never skipped the adapter"


# ------------------------------------------------------------------------------------ padding modes


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate", "zeros"])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": (2, 1), "stride": 2, "dilation": (2, 1)},
        {"kernel_size": (3, 1), "padding": "same", "dilation": 2},
        {"kernel_size": (2, 3), "padding": "same"},  # even kernel: asymmetric "same" padding
        {"kernel_size": 3, "padding": "valid"},
    ],
)
def test_padding_modes_match_conv_with_merged_weight(padding_mode, conv_kwargs):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, padding_mode=padding_mode, dtype=torch.float64, **conv_kwargs)
    module = LoRAModule(geometry_of(layer), 2, 2.0, dtype=torch.float64)
    nn.init.normal_(module.lora_up)
    reference = nn.Conv2d(3, 4, padding_mode=padding_mode, dtype=torch.float64, **conv_kwargs)
    with torch.no_grad():
        reference.weight.copy_(layer.weight + module.delta_weight())
        reference.bias.copy_(layer.bias)
    layer.register_forward_hook(module.hook)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-10, atol=1e-10)


def test_loading_alpha_through_state_dict_refreshes_the_cached_scale():
    geometry = LayerGeometry(6, 5)
    module = LoRAModule(geometry, 2, 2.0)
    torch.nn.init.normal_(module.lora_up)
    x = torch.randn(3, 5)
    before = module(x)
    state = module.state_dict()
    state["alpha"] = torch.tensor(6.0)  # scale 1 -> 3
    module.load_state_dict(state)
    assert float(module.scale) == pytest.approx(3.0)
    torch.testing.assert_close(module(x), 3.0 * before)
    module.set_multiplier(0.5)
    torch.testing.assert_close(module(x), 1.5 * before)
