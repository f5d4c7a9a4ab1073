"""LyCORIS' DyLoRA files (``--network_module lycoris.kohya --network_args algo=dylora``), read as the
ecosystem reads them.

References (lycoris-lora 4.1.3, installed; A1111 and ComfyUI transcribed below):

- ``lycoris/modules/dylora.py``: ``custom_state_dict`` (l. 91-102) writes ``alpha``, ``lora_up.weight`` = the
  up blocks concatenated, ``(out, r)`` — flat even for a convolution — and ``lora_down.weight`` ``(r, in, *k)``.
  Its forward (l. 157-171) runs ``get_diff_weight(rank=None)`` (l. 119-138): a RANDOM block count ``b + 1``
  on every call, training or not, scaled ``alpha / (b + 1)`` (``get_weight``, l. 104-113); the full rank
  (``b + 1 = r / block_size`` blocks) so trains at ``alpha · block_size / r``. ``merge_to`` (base.py l. 397)
  calls ``get_merged_weight`` without a rank: random too. ``get_weight(r)`` asked for the full rank
  gives ``alpha / (r / block_size + 1)`` (an off-by-one). Its ``load_state_dict`` is a no-op (l. 88-89),
  it has no ``make_module_from_state_dict``, and ``modules.get_module`` hands a file's ``lora_up.weight``
  to ``LoConModule`` (its ``algo_check``), which cannot take the flat conv ``up``.
- AUTOMATIC1111/stable-diffusion-webui@1b7f430820d6015ab16881a7353d5fde04b36d0d
  ``extensions-builtin/Lora/network_lora.py`` l. 57-64: a Conv2d's ``lora_up.weight`` becomes a 1x1 conv,
  the flat ``(out, r)`` reshaped to ``(out, r, 1, 1)``; ``calc_updown`` -> ``rebuild_conventional``
  (``up.reshape(out, -1) @ down.reshape(r, -1)``), scale ``alpha / dim`` with ``dim = lora_down.shape[0]`` (l. 33).
- comfyanonymous/ComfyUI@0323d8746da9beb8f3face4b77305af8d58319d6 ``comfy/weight_adapter/lora.py``
  ``LoRAAdapter.calculate_weight``: ``alpha = v[2] / mat2.shape[0]``,
  ``torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)``.

So a DyLoRA file means the plain rank-r LoRA ``alpha / r · up ⋅ down`` (what A1111 and ComfyUI bake; LyCORIS'
own merge is random): sdadapt reads it so; LyCORIS' full-rank training forward is that at strength ``block_size``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.adapters import LayerGeometry
from sdadapt.adapters.registry import file_layer_delta
from sdadapt.formats import describe_file, load_lora, save_lora

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed (pip install lycoris-lora)")
lycoris_dylora = pytest.importorskip("lycoris.modules.dylora")
from test_lycoris_files import kohya_rewrite_is_the_file  # noqa: E402  (the kohya round trip, one copy)
from transformers_versions import float64_clip
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

BLOCK_SIZE = 2


@pytest.fixture(scope="module")
def dylora_file(tmp_path_factory):
    """A DyLoRA file written by LyCORIS' own kohya network on a tiny SD1 UNet + CLIP: dim 4, alpha 1,
    conv_dim 4, conv_alpha 3, block_size 2 (two blocks per layer); kxk convs, 1x1 convs and linears.

    Returns ``(path, unet, te, net)``: the models with LyCORIS' network applied (float64)."""
    folder = tmp_path_factory.mktemp("dylora")
    preset = folder / "preset.toml"  # (LyCORIS' "full" preset names time_embedding twice on the tiny UNet)
    preset.write_text('enable_conv = true\n'
                      'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
                      'unet_target_name = ["conv_in", "conv_out"]\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\n'
                      'text_encoder_target_name = []\n')
    torch.manual_seed(0)
    unet, te = tiny_unet_sd1().double(), tiny_clip().double()
    net = lycoris_kohya.create_network(1.0, 4, 1.0, None, te, unet, preset=str(preset), algo="dylora",
                                       block_size=BLOCK_SIZE, conv_dim=4, conv_alpha=3.0)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    net.to(torch.float64)
    path = folder / "dylora.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path, unet, te, net


def _comfyui_delta(up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor, weight_shape) -> torch.Tensor:
    """ComfyUI LoRAAdapter.calculate_weight (strength 1), float64."""
    mat1, mat2 = up.double(), down.double()
    scale = float(alpha) / mat2.shape[0]
    return scale * torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight_shape)


def _a1111_delta(up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor, weight_shape) -> torch.Tensor:
    """A1111 network_lora.py on a Conv2d: up -> (out, r, 1, 1), rebuild_conventional, alpha / dim; float64."""
    up4 = up.double().reshape(up.shape[0], -1, 1, 1)  # create_module: weight.reshape(module.weight.shape)
    dim = down.shape[0]
    updown = up4.reshape(up4.size(0), -1) @ down.double().reshape(dim, -1)
    return updown.reshape(weight_shape) * (float(alpha) / dim)


def test_every_dylora_layer_is_the_lora_a1111_and_comfyui_bake(dylora_file):
    path, unet, te, net = dylora_file
    state = load_file(str(path))
    modules = {m.lora_name: m for m in net.unet_loras + net.text_encoder_loras}
    flat_conv = 0
    for name, module in modules.items():
        up, down, alpha = (state[f"{name}.{k}"] for k in ("lora_up.weight", "lora_down.weight", "alpha"))
        shape = tuple(module.shape)
        geometry = LayerGeometry(shape[0], shape[1], tuple(shape[2:]))
        flat_conv += len(shape) == 4 and up.dim() == 2
        got, bias = file_layer_delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha}, geometry,
                                     dtype=torch.float64, name=name)
        assert bias is None
        want = _comfyui_delta(up, down, alpha, shape)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        if len(shape) == 4:
            torch.testing.assert_close(got, _a1111_delta(up, down, alpha, shape), rtol=1e-12, atol=1e-14)
        # LyCORIS' own rebuild of its blocks, the full rank (the draw b = block_count - 1):
        # alpha / block_count = block_size · (alpha / r), the file's LoRA at strength block_size
        blocks = module.block_count
        down_all = torch.cat(list(module.down_list)).double()  # (r, in·k): the flat layout
        up_all = torch.cat(list(module.up_list), dim=1).double()  # (out, r)
        assert blocks * BLOCK_SIZE == down.shape[0]
        lyco_full = (up_all @ (down_all * (float(module.alpha) / blocks))).view(shape)  # _dylora_weight
        torch.testing.assert_close(lyco_full, got * BLOCK_SIZE, rtol=1e-6, atol=1e-7)
    assert flat_conv >= 10, "the preset should reach kxk and 1x1 convolutions"


def _lycoris_full_rank_forward(monkeypatch, net, fn):
    """LyCORIS' forward with every module's random draw at the top block (its full rank)."""
    monkeypatch.setattr(lycoris_dylora.random, "randint", lambda lo, hi: hi)
    try:
        return fn()
    finally:
        monkeypatch.undo()


@float64_clip
def test_load_adapter_and_apply_lora_match_lycoris_full_rank_forward_at_block_size(dylora_file, monkeypatch):
    """sdadapt applies the file at strength ``block_size`` == LyCORIS' own network forward at its full rank
    (float64, UNet convs + linears and the text encoder); at strength 1, the readers' ``alpha / r``."""
    path, unet, te, net = dylora_file
    args, kwargs = unet_inputs(unet)
    inputs = (tuple(a.double() if a.is_floating_point() else a for a in args), kwargs)
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    y_unet = _lycoris_full_rank_forward(monkeypatch, net, lambda: run_unet(unet, inputs))
    y_te = _lycoris_full_rank_forward(monkeypatch, net, lambda: te(ids).last_hidden_state.detach())

    components, _ = load_lora(path)
    fresh_unet, fresh_te = tiny_unet_sd1().double(), tiny_clip().double()
    fresh_unet.load_state_dict({k: v for k, v in unet.state_dict().items() if "lora" not in k}, strict=False)
    base = run_unet(fresh_unet, inputs)
    handle = sdadapt.load_adapter(fresh_unet, components["unet"], dtype=torch.float64)
    handle_te = sdadapt.load_adapter(fresh_te, components["text_encoder"], dtype=torch.float64)
    one = run_unet(fresh_unet, inputs)
    handle.set_scale(BLOCK_SIZE)
    handle_te.set_scale(BLOCK_SIZE)
    assert not torch.allclose(y_unet, base, atol=1e-3)
    torch.testing.assert_close(run_unet(fresh_unet, inputs), y_unet, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(fresh_te(ids).last_hidden_state, y_te, rtol=1e-9, atol=1e-10)
    handle.remove()
    handle_te.remove()

    # apply_lora (merge-lora / generate --lora's bake path) at strength 1 == load_adapter at 1
    applied = sdadapt.apply_lora(fresh_unet, components["unet"], scale=1.0)
    torch.testing.assert_close(run_unet(fresh_unet, inputs), one, rtol=1e-7, atol=1e-8)
    applied.undo()
    torch.testing.assert_close(run_unet(fresh_unet, inputs), base, rtol=0, atol=0)


def test_dylora_file_round_trips_bits_and_inspects(dylora_file, tmp_path):
    path, *_ = dylora_file
    components, _ = load_lora(path)
    kohya_rewrite_is_the_file(path, components, tmp_path)
    summary = describe_file(path)
    assert summary["kind"] == "lycoris" and summary["family"] == "lora"
    assert summary["ranks"] == {"4": summary["modules"]}


def test_flat_up_is_read_only_on_a_convolution_of_that_rank():
    """The flat ``(out, r)`` up is LyCORIS DyLoRA's conv layout; other mismatches are still refused."""
    conv = LayerGeometry(6, 5, (3, 3))
    down, alpha = torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.tensor(1.5)
    tensors = {"lora_down.weight": down, "lora_up.weight": torch.randn(6, 2, dtype=torch.float64), "alpha": alpha}
    delta, _ = file_layer_delta(tensors, conv, dtype=torch.float64)
    torch.testing.assert_close(delta, _comfyui_delta(tensors["lora_up.weight"], down, alpha, (6, 5, 3, 3)))
    for bad_up in (torch.randn(6, 3), torch.randn(7, 2)):  # wrong rank / wrong out
        with pytest.raises(ValueError, match="do not fit"):
            file_layer_delta({**tensors, "lora_up.weight": bad_up}, conv)
    with pytest.raises(ValueError, match="do not fit"):  # a flat up with a Tucker core: not a layout anyone writes
        file_layer_delta({**tensors, "lora_down.weight": torch.randn(2, 5, 1, 1),
                          "lora_mid.weight": torch.randn(2, 2, 3, 3)}, conv)


def test_diffusers_conversion_writes_the_flat_conv_up_as_peft_conv(dylora_file, tmp_path):
    """save_lora(format="diffusers"): a conv's flat ``(out, r)`` up becomes peft's 1x1-conv ``lora_B`` (out, r, 1, 1)
    (diffusers/peft load a Conv2d's lora_B by shape); the converted file applies the same."""
    path, unet, *_ = dylora_file
    components, _ = load_lora(path)
    out = tmp_path / "diffusers.safetensors"
    save_lora(out, components, format="diffusers", base_model="sd1")
    written = load_file(str(out))
    kohya_up = load_file(str(path))["lora_unet_conv_in.lora_up.weight"]
    assert kohya_up.dim() == 2
    assert torch.equal(written["unet.conv_in.lora_B.weight"], kohya_up.reshape(*kohya_up.shape, 1, 1))
    again, _ = load_lora(out)
    for key, value in components["unet"].items():
        assert torch.equal(again["unet"][key].reshape(value.shape), value), key
