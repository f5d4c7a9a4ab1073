"""LyCORIS GLoRA with a Tucker core (``bm.weight``): read, applied, baked, written back, inspected.

LyCORIS 3.0.0 / 3.0.0.post1 (lycoris/modules/glora.py of 3.0.0.post1) builds a GLoRA module with
``use_tucker`` on a kxk convolution as (lines 84-98)::

    a2 (r, in, 1, 1)   a1 (in, r, 1, 1)   b2 (r, in, 1, 1)   bm (r, r, kh, kw) [stride, padding]   b1 (out, r, 1, 1)

and bakes it (``make_weight``, lines 182-199; ``tucker_weight_from_conv``, functional/general.py:82-85)::

    wb = einsum("m n ..., i m, n j -> i j ...", bm, b1.reshape(out, r), b2.reshape(r, in))
    ΔW = (wb + einsum(einsum(W, a1), a2)) · alpha / r · multiplier        (alpha 0 or absent: alpha = r)

No later LyCORIS creates ``bm`` (its constructor clears ``use_tucker`` for kxk kernels first), so
the real module cannot be built here (lycoris-lora 4.1.3 is installed); the reference below is the
3.0.0.post1 math transcribed in float64, and its ``b`` half is checked against the installed
``lycoris.functional.tucker_weight_from_conv`` (unchanged since). A file written by lycoris-lora
3.0.0.post1's own kohya network was checked by hand (see docs/lycoris.md).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs
from torch import nn

import sdadapt
from sdadapt.adapters import geometry_of
from sdadapt.adapters.registry import (
    adapter_from_file_tensors,
    algorithm_of_keys,
    file_layer_delta,
    file_rank,
    scale_file_tensors,
    weight_shape_of_file_tensors,
)
from sdadapt.cli import main as cli_main
from sdadapt.formats import WeightFileError, describe_file, load_lora, save_lora, write_safetensors
from sdadapt.loratools.bake import merge_loras_into_checkpoint

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")


def _tucker_tensors(conv: nn.Conv2d, rank: int, alpha: float | None, *, seed: int,
                    dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """One layer's tensors as LyCORIS 3.0.0 writes them for ``conv`` (random, non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out_c, in_c, *kernel = conv.weight.shape
    shapes = {"a1.weight": (in_c, rank, 1, 1), "a2.weight": (rank, in_c, 1, 1), "b1.weight": (out_c, rank, 1, 1),
              "b2.weight": (rank, in_c, 1, 1), "bm.weight": (rank, rank, *kernel)}
    tensors = {k: (torch.randn(s, generator=g, dtype=torch.float64) * 0.3).to(dtype) for k, s in shapes.items()}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)  # LyCORIS: a 0-dim buffer
    return tensors


def _reference_delta(weight: torch.Tensor, tensors: dict[str, torch.Tensor], multiplier: float) -> torch.Tensor:
    """LyCORIS 3.0.0.post1's ``get_diff_weight`` (glora.py:182-205) in float64, kernel position by
    kernel position: ``ΔW[:, :, p] = (b1 ⋅ bm[:, :, p] ⋅ b2 + W[:, :, p] ⋅ a1 ⋅ a2) · alpha / r · multiplier``."""
    t = {k: v.double() for k, v in tensors.items()}
    rank = t["a2.weight"].shape[0]
    alpha = float(t["alpha"]) if "alpha" in t else 0.0
    alpha = rank if alpha == 0 else alpha  # glora.py:112
    a1, a2 = t["a1.weight"].reshape(-1, rank), t["a2.weight"].reshape(rank, -1)
    b1, b2 = t["b1.weight"].reshape(-1, rank), t["b2.weight"].reshape(rank, -1)
    bm, w = t["bm.weight"], weight.double()
    out = torch.empty_like(w)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            out[:, :, i, j] = b1 @ bm[:, :, i, j] @ b2 + w[:, :, i, j] @ a1 @ a2
    return out * (alpha / rank) * multiplier


LAYERS = {  # (conv, x shape): strided and padded, rectangular kernels, channel counts that differ
    "3x3-stride2": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 9, 8)),
    "3x1-pad": (lambda: nn.Conv2d(4, 7, (3, 1), padding=(1, 0)), (2, 4, 6, 5)),
    "1x5-stride21": (lambda: nn.Conv2d(3, 6, (1, 5), stride=(2, 1), padding=(0, 2)), (1, 3, 7, 9)),
}


@pytest.mark.parametrize("alpha", [1.5, 0.0, None])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_delta_is_lycoris_3_make_weight_and_the_forward_is_op_with_the_baked_weight(kind, alpha):
    make, x_shape = LAYERS[kind]
    torch.manual_seed(0)
    conv = make().double()
    tensors = _tucker_tensors(conv, 3 if kind != "1x5-stride21" else 1, alpha, seed=1)
    want = _reference_delta(conv.weight.detach(), tensors, 0.7)

    # the one delta path (apply_lora, merge-lora, generate --lora)
    delta, bias = file_layer_delta(tensors, geometry_of(conv), base_weight=conv.weight.detach(), scale=0.7,
                                   dtype=torch.float64)
    assert bias is None and delta.shape == conv.weight.shape
    assert torch.allclose(delta, want, atol=1e-12, rtol=1e-10)
    assert want.abs().max() > 1e-2

    # the hook's forward never builds ΔW: it must be op(x, W + ΔW) (LyCORIS' non-bypass forward)
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_y = F.conv2d(x, conv.weight + want, conv.bias, stride=conv.stride, padding=conv.padding)
        twin = nn.Sequential(make().double())
        twin[0].load_state_dict(conv.state_dict())
        handle = sdadapt.load_adapter(twin, {f"0.{k}": v for k, v in tensors.items()}, dtype=torch.float64)
        handle.set_scale(0.7)
        assert torch.allclose(twin(x), want_y, atol=1e-12, rtol=1e-10)
        handle.merge()
        assert torch.allclose(twin[0].weight, conv.weight + want, atol=1e-12, rtol=1e-10)
        handle.unmerge()
        assert torch.equal(twin[0].weight, conv.weight)
        # written back by the module: the same keys and values (alpha absent: written as r, LyCORIS' value)
        back = handle.state_dict()
        assert {k.split(".", 1)[1] for k in back} == {*KEYS, "alpha"}
        assert all(torch.equal(back[f"0.{k}"], tensors[k]) for k in KEYS)
        rank = tensors["a2.weight"].shape[0]
        assert float(back["0.alpha"]) == (rank if not alpha else alpha)


def test_b_half_is_the_installed_lycoris_tucker_weight_from_conv():
    """The installed lycoris' ``tucker_weight_from_conv`` (the function 3.0.0's make_weight calls for ``bm``):
    with ``a2 = 0`` the delta is its ``b`` half alone."""
    functional = pytest.importorskip("lycoris.functional", reason="lycoris-lora is not installed")
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1).double()
    tensors = _tucker_tensors(conv, 2, 4.0, seed=3)
    tensors["a2.weight"] = torch.zeros_like(tensors["a2.weight"])
    want = functional.tucker_weight_from_conv(tensors["b1.weight"], tensors["b2.weight"], tensors["bm.weight"]) * 2.0
    delta, _ = file_layer_delta(tensors, geometry_of(conv), base_weight=conv.weight.detach(), dtype=torch.float64)
    assert torch.allclose(delta, want, atol=1e-13, rtol=1e-11) and want.abs().max() > 0.05


@settings(max_examples=25, deadline=None)
@given(
    in_c=st.integers(1, 6), out_c=st.integers(1, 6), rank=st.integers(1, 4),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)).filter(lambda k: k != (1, 1)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    alpha=st.sampled_from([0.0, 1.0, 2.5]), strength=st.sampled_from([1.0, -0.6, 1.7]), seed=st.integers(0, 2**16),
)
def test_any_shape_rank_and_kernel_bakes_and_runs_as_lycoris(in_c, out_c, rank, kernel, stride, pad, alpha,
                                                             strength, seed):
    conv = nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=pad, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed),
                                      dtype=torch.float64))
    tensors = _tucker_tensors(conv, rank, alpha, seed=seed + 1)
    want = _reference_delta(conv.weight.detach(), tensors, strength)
    geometry = geometry_of(conv)
    delta, _ = file_layer_delta(tensors, geometry, base_weight=conv.weight.detach(), scale=strength,
                                dtype=torch.float64)
    assert torch.allclose(delta, want, atol=1e-12, rtol=1e-10)
    # shapes alone tell the base layer and the rank (resize-lora / combine-loras / inspect)
    assert weight_shape_of_file_tensors(tensors) == tuple(conv.weight.shape)
    assert file_rank({k: tuple(v.shape) for k, v in tensors.items()}) == (rank, True)
    # the factored forward (1x1 b2, then bm with the layer's stride and padding, then b1)
    module = adapter_from_file_tensors(geometry, tensors).double()  # (its 0-dim scale too)
    module.set_multiplier(strength)
    x = torch.randn(2, in_c, kernel[0] + 4, kernel[1] + 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        got = module(x, conv.weight)
    want_y = F.conv2d(x, want, stride=stride, padding=pad)
    assert got.shape == want_y.shape and torch.allclose(got, want_y, atol=1e-11, rtol=1e-9)
    # block weights scale the (a2, b2) pair: the delta scales with them
    scaled = scale_file_tensors(tensors, -0.5)
    half, _ = file_layer_delta(scaled, geometry, base_weight=conv.weight.detach(), scale=strength, dtype=torch.float64)
    assert torch.allclose(half, -0.5 * want, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ files on a tiny SD1 UNet
TUCKER_LAYERS = ("down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv1")  # 3x3 (stride 2; 128 -> 64)
PLAIN_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear GLoRA beside them


def _kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _sd1_file(tmp_path, dtype: torch.dtype = torch.float32):
    """A GLoRA file as lycoris-lora 3.0.0's kohya network writes it (use_tucker, conv_dim): Tucker
    layers on 3x3 convolutions and a plain GLoRA on a Linear; returns (path, raw tensors, unet)."""
    unet = tiny_unet_sd1()
    modules = dict(unet.named_modules())
    raw: dict[str, torch.Tensor] = {}
    for index, name in enumerate(TUCKER_LAYERS):
        for key, value in _tucker_tensors(modules[name], 2, 3.0, seed=10 + index, dtype=dtype).items():
            raw[f"{_kohya(name)}.{key}"] = value
    g = torch.Generator().manual_seed(20)
    linear = modules[PLAIN_LAYER]
    out_f, in_f = linear.weight.shape
    for key, shape in {"a1.weight": (in_f, 2), "a2.weight": (2, in_f), "b1.weight": (out_f, 2),
                       "b2.weight": (2, in_f)}.items():
        raw[f"{_kohya(PLAIN_LAYER)}.{key}"] = (torch.randn(shape, generator=g) * 0.3).to(dtype)
    raw[f"{_kohya(PLAIN_LAYER)}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "glora_tucker.safetensors"
    write_safetensors(path, raw, {"ss_network_module": "lycoris.kohya",
                                  "ss_network_args": json.dumps({"algo": "glora", "use_tucker": "True"})})
    return path, raw, unet


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_file_round_trips_bit_exact_and_inspect_names_it(dtype, tmp_path, capsys):
    path, raw, _ = _sd1_file(tmp_path, dtype)
    components, _ = load_lora(path)
    assert set(components) == {"unet"}
    assert {k for k in components["unet"] if k.endswith(".bm.weight")} == {f"{n}.bm.weight" for n in TUCKER_LAYERS}
    again = tmp_path / "again.safetensors"
    save_lora(again, components, format="kohya", base_model="sd1")
    written = load_file(str(again))
    assert set(written) == set(raw)
    for key, value in raw.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    args = json.loads(describe_file(again)["metadata"]["ss_network_args"])
    assert args["algo"] == "glora" and args["use_tucker"] == "True"

    summary = describe_file(path)
    assert summary["kind"] == "lycoris" and summary["family"] == "glora"
    assert summary["algorithms"] == {"glora-tucker": 2, "glora": 1}
    assert algorithm_of_keys(KEYS) == "glora-tucker"
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "glora-tucker: 2" in out and "family:     glora" in out


def test_hooks_apply_lora_and_merge_lora_agree_on_a_tiny_unet(tmp_path):
    """load_adapter (the forward hooks), apply_lora (generate --lora) and merge-lora (the bake into a
    checkpoint) give the same UNet at a strength; apply_lora's undo restores the weights bit for bit."""
    path, _, unet = _sd1_file(tmp_path)
    components, _ = load_lora(path)
    inputs = unet_inputs(unet)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    y_base = run_unet(unet, inputs)

    hooked = tiny_unet_sd1()
    sdadapt.load_adapter(hooked, components["unet"]).set_scale(0.8)
    y_hooks = run_unet(hooked, inputs)
    assert (y_hooks - y_base).abs().max() > 1e-2, "the adapter should change the output"

    applied = sdadapt.apply_lora(unet, components["unet"], scale=0.8)
    assert torch.allclose(run_unet(unet, inputs), y_hooks, atol=2e-5, rtol=1e-4)
    merged = {k: v.clone() for k, v in unet.state_dict().items()}
    applied.undo()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in base_state.items())

    ckpt = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in base_state.items()}, str(ckpt))
    out = tmp_path / "baked.safetensors"
    report = merge_loras_into_checkpoint(ckpt, [path], out, strengths=0.8)
    assert report.merged and not report.unmatched
    baked = load_file(str(out))
    changed = [k for k in base_state if not torch.equal(base_state[k], merged[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n in (*TUCKER_LAYERS, PLAIN_LAYER))
    for key, value in merged.items():
        assert torch.allclose(baked[key], value, atol=1e-6, rtol=1e-5), key


# ------------------------------------------------------------------------------- refusals
def test_bad_tucker_layers_are_refused_naming_the_layer_and_the_fix():
    conv3, conv1, linear = nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Linear(4, 5)
    good = _tucker_tensors(conv3, 2, 1.0, seed=0)
    # a Tucker core on a layer LyCORIS never gives one (a 1x1 conv, a Linear): another model's file
    on_1x1 = dict(good, **{"bm.weight": torch.zeros(2, 2, 1, 1)})
    with pytest.raises(ValueError, match=r"lyr: GLoRA Tucker core bm.weight .* kxk convolutions only"):
        adapter_from_file_tensors(geometry_of(conv1), on_1x1, name="lyr")
    flat = {k: v.reshape(v.shape[0], -1) for k, v in good.items() if k not in ("bm.weight", "alpha")}
    with pytest.raises(ValueError, match=r"lyr: GLoRA Tucker core"):
        adapter_from_file_tensors(geometry_of(linear), {**flat, "bm.weight": good["bm.weight"]}, name="lyr")
    # a core of the wrong kernel, a b2 with the kernel too (not LyCORIS' layout): the shapes named
    with pytest.raises(ValueError, match=r"lyr: GLoRA shapes \{'bm.weight': \(2, 2, 5, 5\)\}.*\(2, 2, 3, 3\)"):
        adapter_from_file_tensors(geometry_of(conv3), dict(good, **{"bm.weight": torch.zeros(2, 2, 5, 5)}), name="lyr")
    with pytest.raises(ValueError, match=r"lyr: GLoRA shapes \{'b2.weight': \(2, 4, 3, 3\)\}"):
        adapter_from_file_tensors(geometry_of(conv3), dict(good, **{"b2.weight": torch.zeros(2, 4, 3, 3)}), name="lyr")
    # a core without its factors
    with pytest.raises(ValueError, match=r"lyr: GLoRA tensors \['a1.weight', 'a2.weight', 'b1.weight', 'b2.weight'\] "
                                         r"are missing"):
        adapter_from_file_tensors(geometry_of(conv3), {"bm.weight": good["bm.weight"]}, name="lyr")


def test_a_lycoris_algorithm_sdadapt_does_not_read_stays_a_clear_error(tmp_path):
    """T-LoRA (lycoris-lora 4.x ``TLoraModule``: ``q_layer`` / ``p_layer`` / ``lambda_layer``) is not read:
    the file is refused naming itself, the key and LyCORIS."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "tlora.safetensors"
    write_safetensors(path, {f"{layer}.q_layer.weight": torch.zeros(2, 2), f"{layer}.p_layer.weight": torch.zeros(2, 2)},
                      {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(WeightFileError) as info:
        load_lora(path)
    message = str(info.value)
    assert str(path) in message and "q_layer.weight" in message and "LyCORIS" in message
    assert "bm.weight" in message  # the keys read are listed, GLoRA's Tucker core among them
