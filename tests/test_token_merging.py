"""Token merging (A1111's "Token merging ratio", :mod:`sdadapt.token_merging`): the matching against tomesd's own
``bipartite_soft_matching_random2d`` (``no_rand``, A1111's) and its invariants; the hooks on a tiny diffusers UNet
against ``tomesd.apply_patch(use_rand=False)`` bit for bit, the tokens the self-attention sees, removal; ``generate
--token-merging-ratio`` end to end (both passes, the infotext written and read back) and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.token_merging import (
    TokenMerging,
    bipartite_soft_matching_2d,
    check_token_merging_ratio,
)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), share=st.floats(0.0, 0.9), seed=st.integers(0, 2**16),
       batch=st.integers(1, 3))
def test_merge_keeps_the_unmerged_tokens_and_averages_the_merged_into_their_dst(h, w, share, seed, batch):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, 6, generator=g, dtype=torch.float64)
    r = int(h * w * share)
    merge, unmerge = bipartite_soft_matching_2d(x, w, h, 2, 2, r)
    merged = merge(x)
    num_dst = (h // 2) * (w // 2)
    kept = min(r, h * w - num_dst)
    assert merged.shape == (batch, h * w - kept, 6)
    back = unmerge(merged)
    assert back.shape == x.shape
    # every token comes back as itself, or (merged) as the mean of its dst's group; the dst are the windows' corners
    corners = torch.zeros(h, w, dtype=torch.bool)
    corners[: (h // 2) * 2: 2, : (w // 2) * 2: 2] = True
    for b in range(batch):
        groups: dict = {}
        for i in range(h * w):
            groups.setdefault(tuple(back[b, i].tolist()), []).append(i)
        assert len(groups) == h * w - kept  # (each merged token joined one group)
        for value, members in groups.items():
            if len(members) > 1:  # (a dst and the src merged into it: their mean, one corner among them)
                assert sum(corners.flatten()[members].tolist()) == 1
                assert torch.allclose(x[b, members].mean(dim=0), torch.tensor(value, dtype=x.dtype))
            else:  # (a token left alone comes back as itself)
                assert torch.equal(back[b, members[0]], x[b, members[0]])


def test_r_0_is_the_identity_and_the_ratio_is_checked():
    x = torch.randn(1, 16, 4)
    merge, unmerge = bipartite_soft_matching_2d(x, 4, 4, 2, 2, 0)
    assert merge(x) is x and unmerge(x) is x
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"token merging ratio .* in \[0, 1\)"):
            check_token_merging_ratio(bad)


tomesd = pytest.importorskip("tomesd")


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 12), w=st.integers(2, 12), share=st.floats(0.0, 0.95), seed=st.integers(0, 2**16),
       sx=st.sampled_from([1, 2, 3]), sy=st.sampled_from([1, 2, 3]))
def test_the_matching_is_tomesds_on_any_grid_stride_and_ratio(h, w, share, seed, sx, sy):
    from tomesd.merge import bipartite_soft_matching_random2d

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h * w, 6, generator=g)
    r = int(h * w * share)
    ours_m, ours_u = bipartite_soft_matching_2d(x, w, h, sx, sy, r)
    if h < sy or w < sx:  # (no window fits: nothing to merge into; tomesd fails on the empty dst set)
        assert ours_m(x) is x and ours_u(x) is x
        return
    theirs_m, theirs_u = bipartite_soft_matching_random2d(x, w, h, sx, sy, r, no_rand=True)
    y = torch.randn(2, h * w, 3, generator=g)
    assert torch.equal(ours_m(y), theirs_m(y))
    assert torch.equal(ours_u(ours_m(y)), theirs_u(theirs_m(y)))


@pytest.mark.parametrize("h, w, r", [(8, 8, 32), (6, 10, 20), (5, 7, 10), (7, 5, 30), (4, 4, 1)])
def test_the_matching_is_tomesds_bit_for_bit(h, w, r):
    from tomesd.merge import bipartite_soft_matching_random2d

    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(2, h * w, 8, generator=g)
    ours_m, ours_u = bipartite_soft_matching_2d(x, w, h, 2, 2, r)
    theirs_m, theirs_u = bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    y = torch.randn(2, h * w, 5, generator=g)
    assert torch.equal(ours_m(y), theirs_m(y))
    assert torch.equal(ours_u(ours_m(y)), theirs_u(theirs_m(y)))


diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


import tiny_sd_fixtures

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd  # (module-scoped: the tiny SD folder, loaded)


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 12, 32, generator=g)


def test_the_hooks_are_tomesds_patch_bit_for_bit_and_come_off(system):
    unet = system.unet
    x, t, ctx = _unet_inputs()
    keys = list(unet.state_dict())
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with TokenMerging(unet, ratio=0.5) as merging:
            ours = unet(x, t, encoder_hidden_states=ctx).sample
            with merging.at(0.0):
                assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)
            assert merging.ratio == 0.5 and merging.blocks == 4
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain) and list(unet.state_dict()) == keys
        tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
        try:
            theirs = unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            tomesd.remove_patch(unet)
    assert torch.equal(ours, theirs)
    assert (ours - plain).abs().max() > 1e-3


def test_only_the_full_resolution_self_attention_sees_fewer_tokens(system):
    unet = system.unet
    seen: dict[str, list[int]] = {}
    x, t, ctx = _unet_inputs()
    with torch.no_grad(), TokenMerging(unet, ratio=0.5):  # (the spies after its hooks: they see what attention gets)
        handles = [module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.setdefault(name, []).append(
                (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
            for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))]
        try:
            unet(x, t, encoder_hidden_states=ctx)
        finally:
            for handle in handles:
                handle.remove()
    assert len(seen) == 8
    full = 16 * 16
    for name, counts in seen.items():
        level_tokens = counts[0]
        if name.endswith("attn1") and name.startswith(("down_blocks.0", "up_blocks.1")):  # (the 16x16 level)
            assert level_tokens == full - int(full * 0.5)
        elif name.endswith("attn1"):
            assert level_tokens in (full // 4,)  # (the 8x8 level: no merging at max_downsample 1)
        else:
            assert level_tokens in (full, full // 4)  # (cross-attention: every token, as A1111's merge_crossattn off)


def test_generate_merges_both_passes_writes_the_ratios_and_reads_them_back(tiny_sd, tmp_path, monkeypatch):
    from PIL import Image

    from sdadapt import token_merging
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    ratios: list[tuple[int, float]] = []
    real = token_merging.bipartite_soft_matching_2d

    def spy(metric, w, h, sx, sy, r):
        ratios.append((h * w, r / metric.shape[1]))
        return real(metric, w, h, sx, sy, r)

    monkeypatch.setattr(token_merging, "bipartite_soft_matching_2d", spy)
    run = {"model": str(tiny_sd), "prompt": "a cat", "negative": "blurry", "steps": 2, "seed": 1, "width": 16,
           "height": 16, "sampler": "Euler", "schedule": "karras", "hires_scale": 2.0, "hires_steps": 2,
           "hires_denoising": 0.5}
    run_generate(out=tmp_path / "m.png", token_merging_ratio=0.5, token_merging_ratio_hr=0.25, **run)
    small, big = sorted({tokens for tokens, _ in ratios})  # (the first pass's full-resolution level, the hires one's)
    assert big == 4 * small
    first = {round(share, 2) for tokens, share in ratios if tokens == small}
    second = {round(share, 2) for tokens, share in ratios if tokens == big}
    assert first == {0.5} and second == {0.25}, ratios
    text = Image.open(tmp_path / "m.png").text["parameters"]
    assert "Token merging ratio: 0.5, Token merging ratio hr: 0.25, " in text
    assert text.index("Token merging ratio") < text.index("RNG")
    options, not_taken = infotext_options(parse_infotext(text))
    assert (options["token_merging_ratio"], options["token_merging_ratio_hr"]) == (0.5, 0.25)
    assert not any("Token merging" in line for line in not_taken)
    ratios.clear()
    run_generate(out=tmp_path / "same.png", token_merging_ratio=0.5, **run)  # (hr: the first pass's, A1111's fallback)
    assert {round(share, 2) for _, share in ratios} == {0.5}
    assert "Token merging ratio: 0.5, Token merging ratio hr: 0.5, " in Image.open(tmp_path / "same.png").text[
        "parameters"]
    run_generate(out=tmp_path / "plain.png", **run)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "same.png")),
                              np.asarray(Image.open(tmp_path / "plain.png")))
    assert "Token merging" not in Image.open(tmp_path / "plain.png").text["parameters"]


def test_generate_refuses_the_toy_a_bad_ratio_and_hr_without_hires(tmp_path):
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="--token-merging-ratio: token merging merges .*ToyUNet has none"):
        run_generate(prompt="a red circle", out=tmp_path / "a.png", token_merging_ratio=0.5)
    with pytest.raises(ValueError, match=r"--token-merging-ratio: token merging ratio .* in \[0, 1\)"):
        run_generate(prompt="a", out=tmp_path / "a.png", token_merging_ratio=1.5)
    with pytest.raises(ValueError, match="--token-merging-ratio-hr is the hires pass's"):
        run_generate(prompt="a", out=tmp_path / "a.png", token_merging_ratio_hr=0.5)
    assert not list(tmp_path.iterdir())
