"""Aesthetic gradients against transcriptions of the reference code (fidelity review).

References (transcribed here, float64, never imported):

* A1111 extension ``AUTOMATIC1111/stable-diffusion-webui-aesthetic-gradients@2624e5dd4902cb731287b426ad483e741ece85bb``
  ``aesthetic_clip.py``: ``slerp`` (lines 138-144), ``load_image_embs`` (191-199),
  ``AestheticCLIP.__call__`` (201-255), ``generate_imgs_embd`` (103-119);
* ``vicgalle/stable-diffusion-aesthetic-gradients@30ca347d39eb7c92dd651a513cf4f795ed995708``
  ``ldm/modules/encoders/modules.py`` ``PersonalizedCLIPEmbedder.forward`` (205-262) and
  ``scripts/gen_aesthetic_embeddings.py`` (16-26).

Both personalise a *float32* ``CLIPModel`` (``from_pretrained`` / ``copy.deepcopy`` of one), whatever
precision the diffusion model runs in.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sdadapt.aesthetic import personalize_text_encoder
from sdadapt.aesthetic import personalize as personalize_module
from transformers_versions import float64_clip

transformers = pytest.importorskip("transformers")


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=99, bos_token_id=97, eos_token_id=98, pad_token_id=98, projection_dim=16,
                                         max_position_embeddings=12)
    return transformers.CLIPTextModelWithProjection(config).eval()


IDS = torch.tensor([[97, 5, 7, 9, 98, 98, 98, 98, 98, 98, 98, 98], [97, 11, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98]])


def _a1111_slerp(low, high, val):
    # aesthetic_clip.py:138-144 (dim 1, unsqueeze(1): the token axis of (B, L, D), the feature axis of (1, E))
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(1))
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def a1111_call(clip_model, z, tokens, image_embs, *, steps, lr, weight, use_slerp=False):
    """aesthetic_clip.py:209-253: a deep copy of the (float32 — here float64) CLIP model, Adam over
    ``text_model.parameters()`` on ``-(text_embs/‖text_embs‖ @ img_embs.T).mean()``, then the mix with ``z``."""
    image_embs = image_embs.reshape(1, -1).double()
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)  # load_image_embs, line 198
    model = copy.deepcopy(clip_model).double()  # line 211 (its dtype: the CLIPModel's float32; float64 here)
    model.requires_grad_(True)
    with torch.enable_grad():
        optimizer = torch.optim.Adam(model.text_model.parameters(), lr=lr)  # lines 226-228
        for _ in range(steps):
            text_embs = model(input_ids=tokens).text_embeds  # get_text_features
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            loss = -(text_embs @ image_embs.T)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
        zn = model.text_model(input_ids=tokens).last_hidden_state  # line 244
    zn = zn.detach()
    z = z.double()
    if use_slerp:
        return _a1111_slerp(z, zn, weight)  # line 251
    return z * (1 - weight) + zn * weight  # line 253


# ------------------------------------------------------------------- half-precision encoders (the fix)
@float64_clip
@pytest.mark.parametrize("splice_rows", [False, True], ids=["whole-table", "row-splice"])
def test_half_precision_encoder_is_personalised_in_float32_like_the_reference(monkeypatch, splice_rows):
    """A float16 text encoder (transformers loads a diffusers ``text_encoder`` in its files' dtype) is
    personalised as the originals do it, on a float32 model: Adam's ``lr·m̂/(√v̂ + ε)`` in float16 lost the
    steps below float16's resolution and underflowed ``v`` (NaN at lr 1e-3) before the fix."""
    if splice_rows:
        monkeypatch.setattr(personalize_module, "_ROWS_FROM", 0)
    half = _encoder(1).half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    e = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        z = half(IDS).last_hidden_state  # what the diffusion model's own (half) encoder gives
    for weight, use_slerp in ((1.0, False), (0.9, True)):
        reference = a1111_call(half, z, IDS, e, steps=5, lr=1e-3, weight=weight, use_slerp=use_slerp)
        ours = personalize_text_encoder(half, IDS, e, steps=5, lr=1e-3, weight=weight, slerp=use_slerp)
        assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
        # float16 rounding of the result (values up to ~4) is ~2e-3; the change itself is ~1
        assert (ours.double() - reference).abs().max() <= 6e-3, (weight, use_slerp)
        assert (reference - z.double()).abs().max() > 0.3
    assert all(torch.equal(before[k], v) for k, v in half.state_dict().items())
    assert all(p.dtype == torch.float16 for p in half.parameters())


@float64_clip
def test_half_precision_aesthetic_text_uses_float32_features():
    """The "aesthetic text" features (aesthetic_clip.py:214-219) come from the float32 model too."""
    half = _encoder(2).half()
    text_ids = torch.tensor([[97, 30, 31, 98, 98, 98, 98, 98, 98, 98, 98, 98]])
    e = torch.randn(16, generator=torch.Generator().manual_seed(3))
    wide = copy.deepcopy(half).double()
    with torch.no_grad():
        z = half(IDS).last_hidden_state
        text = wide(text_ids).text_embeds  # (1, E), unnormalised, from the un-personalised model
    unit = e.double()[None] / e.double().norm()
    for negative in (False, True):
        high = text
        if negative:  # lines 216-218
            high = unit - text
            high = high / high.norm(dim=-1, keepdim=True)
        target = _a1111_slerp(unit, high, 0.3)  # line 219
        model = copy.deepcopy(wide)
        with torch.enable_grad():
            optimizer = torch.optim.Adam(model.text_model.parameters(), lr=1e-3)
            for _ in range(4):
                t = model(input_ids=IDS).text_embeds
                t = t / t.norm(dim=-1, keepdim=True)
                optimizer.zero_grad()
                (-(t @ target.T)).mean().backward()
                optimizer.step()
            zn = model.text_model(input_ids=IDS).last_hidden_state.detach()
        ours = personalize_text_encoder(half, IDS, e, steps=4, lr=1e-3, weight=1.0, text_ids=text_ids, text_angle=0.3,
                                        text_negative=negative)
        assert (ours.double() - zn).abs().max() <= 6e-3, negative
        assert (zn - z.double()).abs().max() > 0.3


def test_half_precision_optimiser_sees_only_float32_leaves(monkeypatch):
    """Every tensor Adam updates is float32 (the token rows of the row-wise path included): float16 Adam
    state underflows (``v = g²`` below 6e-8 is 0, then ``m/(√v + ε)`` explodes)."""
    monkeypatch.setattr(personalize_module, "_ROWS_FROM", 0)  # the CLIP-L path: token rows spliced in
    seen = []
    adam = personalize_module._adam

    def spy(leaves, lr):
        seen.extend(leaf.dtype for leaf in leaves)
        return adam(leaves, lr)

    monkeypatch.setattr(personalize_module, "_adam", spy)
    half = _encoder(4).half()
    out = personalize_text_encoder(half, IDS, torch.randn(16), steps=1, lr=1e-4)
    assert out.dtype == torch.float16 and len(seen) > 3 and set(seen) == {torch.float32}

