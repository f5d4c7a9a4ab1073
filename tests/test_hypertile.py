"""Hypertile (A1111's built-in "Hypertile", :mod:`sdadapt.hypertile`): the hooks against A1111's ``forward`` wrapper
transcribed here (``modules/hypertile.py``: ``self_attn_forward``, ``random_divisor``, ``find_hw_candidates``) on a
tiny diffusers UNet and VAE — same RNG seed, the same outputs and the same RNG state after; the helpers against their
A1111 definitions; ``generate --hypertile-*`` end to end, the infotext written and read back, the refusals."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from sdadapt.hypertile import (
    Hypertile,
    HypertileSettings,
    hypertile_fields,
    hypertile_layers,
    hypertile_options,
    largest_tile_size,
    tile_counts,
)

# ---- A1111's functions, transcribed (modules/hypertile.py) -----------------------------------------------------------


def _a1111_divisors(value, min_value, max_options=1):
    max_options = max(1, max_options)
    min_value = min(min_value, value)
    divisors = [i for i in range(min_value, value + 1) if value % i == 0]
    return [value // i for i in divisors[:max_options]]


def _a1111_random_divisor(rng, value, min_value, max_options=1):
    ns = _a1111_divisors(value, min_value, max_options=max_options)
    return ns[rng.randint(0, len(ns) - 1)]


def _a1111_find_hw(hw, aspect_ratio):
    h, w = round(math.sqrt(hw * aspect_ratio)), round(math.sqrt(hw / aspect_ratio))
    if h * w != hw:
        w_candidate = hw / h
        if not w_candidate.is_integer():
            h_candidate = hw / w
            if not h_candidate.is_integer():
                divisors = [i for i in range(2, hw + 1) if hw % i == 0]
                pairs = [(i, hw // i) for i in divisors]
                ratios = [w / h for h, w in pairs]
                closest_ratio = min(ratios, key=lambda x: abs(x - aspect_ratio))
                return pairs[ratios.index(closest_ratio)]
            h = int(h_candidate)
        else:
            w = int(w_candidate)
    return h, w


def _a1111_wrap(module, rng, *, depth, tile_size, swap_size, aspect_ratio):
    """A1111's self_attn_forward around ``module.forward`` (its rearranges written with reshape/permute)."""
    forward = module.forward

    def wrapper(*args, **kwargs):
        latent_tile_size = max(128, tile_size) // 8
        x = args[0]
        if x.ndim == 4:
            b, c, h, w = x.shape
            nh = _a1111_random_divisor(rng, h, latent_tile_size, swap_size)
            nw = _a1111_random_divisor(rng, w, latent_tile_size, swap_size)
            if nh * nw > 1:  # "b c (nh h) (nw w) -> (b nh nw) c h w"
                x = x.reshape(b, c, nh, h // nh, nw, w // nw).permute(0, 2, 4, 1, 3, 5).reshape(
                    b * nh * nw, c, h // nh, w // nw).contiguous()  # (diffusers' attention views its input)
            out = forward(x, *args[1:], **kwargs)
            if nh * nw > 1:  # "(b nh nw) c h w -> b c (nh h) (nw w)"
                out = out.reshape(b, nh, nw, c, h // nh, w // nw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        else:
            hw = x.size(1)
            h, w = _a1111_find_hw(hw, aspect_ratio)
            factor = 2 ** depth
            nh = _a1111_random_divisor(rng, h, latent_tile_size * factor, swap_size)
            nw = _a1111_random_divisor(rng, w, latent_tile_size * factor, swap_size)
            b, _, c = x.shape
            if nh * nw > 1:  # "b (nh h nw w) c -> (b nh nw) (h w) c"
                x = x.reshape(b, nh, h // nh, nw, w // nw, c).permute(0, 1, 3, 2, 4, 5).reshape(
                    b * nh * nw, (h // nh) * (w // nw), c).contiguous()
            out = forward(x, *args[1:], **kwargs)
            if nh * nw > 1:  # "(b nh nw) hw c -> b nh nw hw c", "b nh nw (h w) c -> b (nh h nw w) c"
                out = out.reshape(b, nh, nw, h // nh, w // nw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)
        return out

    module.forward = wrapper


def test_the_helpers_are_a1111s():
    for width, height in [(512, 512), (768, 512), (640, 384), (1000, 600), (96, 64)]:
        gcd, expected = math.gcd(width, height), 1
        while gcd % (expected * 2) == 0:
            expected *= 2
        assert largest_tile_size(width, height) == expected
    for value in range(1, 97):
        for min_value in (1, 4, 16, 32):
            for swap in (1, 3, 5):
                ours, theirs = random.Random(value), random.Random(value)
                assert tile_counts(ours, value, min_value, swap) == _a1111_random_divisor(theirs, value, min_value,
                                                                                          swap)
                assert ours.getstate() == theirs.getstate()


diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


import tiny_sd_fixtures

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd  # (module-scoped: the tiny SD folder, loaded)


@pytest.mark.parametrize("width, height, swap, tile", [(64, 64, 3, 0), (96, 64, 3, 0), (64, 64, 1, 0),
                                                       (128, 64, 5, 0), (64, 64, 3, 256)])
def test_the_hooks_are_a1111s_wrapper(system, width, height, swap, tile):
    """The same seed, the same tiles: sdadapt's hooks on the UNet and VAE against A1111's wrapper on copies."""
    unet, vae = system.unet, system.vae
    found = hypertile_layers(unet)
    assert set(found) == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1",  # (depth 0; up_blocks.1's at 2)
                          "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                          "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
                          "mid_block.attentions.0.transformer_blocks.0.attn1"}  # (depth 3)
    assert set(hypertile_layers(vae, vae=True)) == {"decoder.mid_block.attentions.0"}
    f = system.vae_factor
    g = torch.Generator().manual_seed(width + swap)
    x = torch.randn(2, 4, height // f, width // f, generator=g)
    t, ctx = torch.tensor([300, 300]), torch.randn(2, 12, 32, generator=g)
    settings = HypertileSettings(enabled=True, max_depth=3, max_tile_size=tile, swap_size=swap)
    rng = random.Random(7)
    unet_copy, vae_copy = copy.deepcopy(unet), copy.deepcopy(vae)
    tile_size = min(largest_tile_size(width, height), tile)
    for module, depth in hypertile_layers(unet_copy).values():
        _a1111_wrap(module, rng, depth=depth, tile_size=tile_size, swap_size=swap, aspect_ratio=width / height)
    for module, depth in hypertile_layers(vae_copy, vae=True).values():
        _a1111_wrap(module, rng, depth=depth, tile_size=tile_size, swap_size=swap, aspect_ratio=width / height)
    with torch.no_grad():
        theirs = unet_copy(x, t, encoder_hidden_states=ctx).sample
        theirs_image = vae_copy.decode(x[:1]).sample
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with Hypertile(unet, vae) as tiles:
            tiles.seed(7)
            tiles.configure(width, height, unet=settings, vae=settings)
            ours = unet(x, t, encoder_hidden_states=ctx).sample
            ours_image = vae.decode(x[:1]).sample
            assert tiles.layers == 5 and tiles.rng.getstate() == rng.getstate()
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)  # (the hooks are off)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(ours_image, theirs_image, atol=1e-6)
    if tile == 0:  # (tiles of 16 latent pixels: the tiny model's full-resolution grid splits)
        assert (ours - plain).abs().max() > 1e-4


def test_the_fields_round_trip_and_only_what_differs_from_a1111s_defaults_is_written():
    unet = HypertileSettings(enabled=True, max_depth=2, max_tile_size=256, swap_size=1)
    vae = HypertileSettings(enabled=True, max_tile_size=128)
    fields = hypertile_fields(unet, vae, False, hires=False)
    assert fields == {"Hypertile U-Net": True, "Hypertile U-Net max depth": 2, "Hypertile U-Net swap size": 1,
                      "Hypertile VAE": True}
    options, taken = hypertile_options({key: str(value) for key, value in fields.items()})
    assert options == {"hypertile_unet": unet, "hypertile_unet_second_pass": False, "hypertile_vae": vae}
    assert taken == set(fields)
    second = hypertile_fields(HypertileSettings(), HypertileSettings(max_tile_size=128), True, hires=True)
    assert second == {"Hypertile U-Net second pass": True}
    options, _ = hypertile_options({key: str(value) for key, value in second.items()})
    assert options["hypertile_unet_second_pass"] is True and options["hypertile_unet"].enabled is False


def test_generate_tiles_writes_the_fields_and_reads_them_back(tiny_sd, tmp_path):
    from PIL import Image

    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    run = {"model": str(tiny_sd), "prompt": "a cat", "steps": 2, "seed": 2, "width": 64, "height": 64,
           "sampler": "Euler", "schedule": "karras"}
    small = HypertileSettings(enabled=True, max_tile_size=0, swap_size=3)  # (tiles of 16 latent pixels: they split)
    run_generate(out=tmp_path / "t.png", hypertile_unet=small, hypertile_vae=True, **run)
    run_generate(out=tmp_path / "p.png", **run)
    tiled, plain = Image.open(tmp_path / "t.png"), Image.open(tmp_path / "p.png")
    assert not np.array_equal(np.asarray(tiled), np.asarray(plain))
    text = tiled.text["parameters"]
    assert "Hypertile U-Net: True, Hypertile U-Net max tile size: 0, Hypertile VAE: True, " in text
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["hypertile_unet"] == small and options["hypertile_vae"] == HypertileSettings(True, 3, 128, 3)
    assert not any("Hypertile" in line for line in not_taken)
    run_generate(out=tmp_path / "again.png", **{**run, **{k: v for k, v in options.items() if k.startswith("hyper")}})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(tiled))


def test_the_cli_tiles_the_toy_and_a_model_without_the_layers_is_refused(tmp_path):
    """The toy's UNet names its layers as diffusers does: the CLI's flags tile it; none of the tabled layers: refused."""
    from PIL import Image
    from torch import nn

    from sdadapt.cli import main

    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "--hypertile-unet", "-o",
                 str(tmp_path / "a.png")]) == 0
    assert "Hypertile U-Net: True" in Image.open(tmp_path / "a.png").text["parameters"]
    with pytest.raises(ValueError, match="Hypertile splits the self-attention layers A1111 names"):
        Hypertile(nn.Linear(2, 2), None)
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="--token-merging-ratio and --hypertile-unet both reshape"):
        run_generate(prompt="a", out=tmp_path / "b.png", hypertile_unet=True, token_merging_ratio=0.5)
    with pytest.raises(ValueError, match="--hypertile-unet-second-pass tiles the hires pass's UNet"):
        run_generate(prompt="a", out=tmp_path / "b.png", hypertile_unet_second_pass=True)
    assert not (tmp_path / "b.png").exists()


def test_the_hires_pass_reseeds_and_takes_the_hires_size_as_a1111s_before_hr(tiny_sd, tmp_path, monkeypatch):
    from PIL import Image

    from sdadapt import hypertile
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    calls = []
    real_seed, real_configure = hypertile.Hypertile.seed, hypertile.Hypertile.configure
    monkeypatch.setattr(hypertile.Hypertile, "seed", lambda self, s: calls.append(("seed", s)) or real_seed(self, s))
    monkeypatch.setattr(hypertile.Hypertile, "configure", lambda self, w, h, **kw: calls.append(
        ("configure", w, h, kw["unet"].enabled)) or real_configure(self, w, h, **kw))
    run = {"model": str(tiny_sd), "prompt": "a cat", "steps": 2, "seed": 5, "width": 32, "height": 32,
           "sampler": "Euler", "schedule": "karras", "hires_scale": 2.0, "hires_steps": 1, "hires_denoising": 0.5,
           "count": 2}
    run_generate(out=tmp_path / "h.png", hypertile_unet_second_pass=True, **run)
    # (once per run: the first seed and size, the UNet off; before each image's hires pass: reseeded, 64x64, on)
    assert calls == [("seed", 5), ("configure", 32, 32, False),
                     ("seed", 5), ("configure", 64, 64, True), ("seed", 5), ("configure", 64, 64, True)]
    text = Image.open(min(tmp_path.glob("*.png"))).text["parameters"]
    assert "Hypertile U-Net second pass: True" in text and "Hypertile U-Net: True" not in text
    options, _ = infotext_options(parse_infotext(text))
    assert options["hypertile_unet_second_pass"] is True and options["hypertile_unet"].enabled is False
