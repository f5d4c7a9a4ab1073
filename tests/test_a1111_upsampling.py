"""A1111's UNet at sides its halvings do not divide (sdadapt.a1111_upsampling): the reference is A1111's own
``TorchHijackForUnet`` (modules/sd_hijack_unet.py, transcribed below) installed as the ``torch`` of diffusers' UNet
blocks, with the UNet calling its upsamplers as LDM's do (no ``output_size``: ``num_upsamplers`` 0 turns diffusers'
``forward_upsample_size`` off) — the same blocks, A1111's ``cat``."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tiny_models import _unet

from sdadapt.a1111_upsampling import A1111Upsampling


class TorchHijackForUnet:  # A1111 v1.10 modules/sd_hijack_unet.py, verbatim but for the f-string's quotes
    """This is torch, but with cat that resizes tensors to appropriate dimensions if they do not match"""

    def __getattr__(self, item):
        if item == 'cat':
            return self.cat

        if hasattr(torch, item):
            return getattr(torch, item)

        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = torch.nn.functional.interpolate(a, b.shape[-2:], mode="nearest")

            tensors = (a, b)

        return torch.cat(tensors, *args, **kwargs)


def _three_halvings(seed: int, sdxl: bool):
    """A tiny UNet that halves three times, as SD's (SD1's block layout, or SDXL's with its added embedding)."""
    if sdxl:
        return _unet(seed, block_out_channels=(16, 16, 32, 32), down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=(
            "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
            use_linear_projection=True, layers_per_block=1, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    return _unet(seed, block_out_channels=(16, 16, 32, 32), down_block_types=(
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=(
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        layers_per_block=1)


def _call(unet, h, w, sdxl, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 5, 32, generator=g)
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                    "time_ids": torch.randn(2, 6, generator=g)}} if sdxl else {}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ctx, **kwargs).sample


def _a1111s(unet, h, w, sdxl, monkeypatch):
    from diffusers.models.unets import unet_2d_blocks

    with monkeypatch.context() as patch:
        patch.setattr(unet_2d_blocks, "torch", TorchHijackForUnet())
        patch.setattr(unet, "num_upsamplers", 0)
        return _call(unet, h, w, sdxl)


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize(("h", "w"), [(13, 9), (11, 16), (8, 8), (17, 15)])
def test_the_hooked_unet_is_a1111s_cat_bit_for_bit(h, w, sdxl, monkeypatch):
    unet = _three_halvings(0, sdxl)
    plain = _call(unet, h, w, sdxl)
    theirs = _a1111s(unet, h, w, sdxl, monkeypatch)
    with A1111Upsampling(unet) as hooks:
        ours = _call(unet, h, w, sdxl)
    assert hooks.upsamplers == 3
    assert torch.equal(ours, theirs)
    assert torch.equal(_call(unet, h, w, sdxl), plain)  # (taken off: diffusers' order again)
    if h % 8 or w % 8:  # (an uneven level: A1111's order is not diffusers', at the last rows / columns first)
        assert not torch.equal(ours, plain)
    else:
        assert torch.equal(ours, plain)


def test_keys_and_forwards_are_left_alone_and_a_unet_without_upsamplers_is_named():
    unet = _three_halvings(0, False)
    keys, forwards = list(unet.state_dict()), {name: m.forward for name, m in unet.named_modules()}
    hooks = A1111Upsampling(unet)
    assert list(unet.state_dict()) == keys
    assert all(m.forward == forwards[name] for name, m in unet.named_modules())
    hooks.remove()
    hooks.remove()  # (idempotent)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    with pytest.raises(ValueError, match="Linear has no diffusers Upsample2D"):
        A1111Upsampling(torch.nn.Linear(2, 2))


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "A1111Upsampling(unet):")
