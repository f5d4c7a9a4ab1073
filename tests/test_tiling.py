"""Seamless tiling (A1111's "Tiling", :mod:`sdadapt.tiling`): circular padding against ``F.pad(mode="circular")``
written here, restored after the block (an error too), A1111's exact-type rule; the property that makes images tile —
a tiny diffusers UNet and VAE decoder commute with ``torch.roll`` under it and not without, and so does a whole
sampler run from rolled noise; ``generate --tiling`` end to end, its infotext written and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdadapt.tiling import circular_padding, models_of


def test_a_conv_pads_circularly_inside_the_block_only():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 7, generator=g)
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias)
    plain = conv(x)
    with circular_padding(conv) as changed:
        assert changed == 1
        assert torch.allclose(conv(x), reference, atol=1e-6)
    assert torch.equal(conv(x), plain) and conv.padding_mode == "zeros"


def test_every_plain_conv2d_once_subclasses_and_none_left_alone_and_restored_on_error():
    class OwnConv(nn.Conv2d):
        pass

    shared = nn.Conv2d(1, 1, 3, padding=1)
    reflect = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    first = nn.Sequential(shared, OwnConv(1, 1, 3, padding=1), reflect)
    second = nn.Sequential(shared, nn.Conv1d(1, 1, 3, padding=1))
    with pytest.raises(RuntimeError, match="boom"), circular_padding(first, None, second) as changed:
        assert changed == 2  # (shared once, reflect; not the subclass nor the Conv1d: A1111's type(layer) == Conv2d)
        assert shared.padding_mode == reflect.padding_mode == "circular"
        assert first[1].padding_mode == second[1].padding_mode == "zeros"
        raise RuntimeError("boom")
    assert (shared.padding_mode, reflect.padding_mode) == ("zeros", "reflect")
    assert sum(1 for key in first.state_dict()) == 6  # (keys untouched: weights and biases only)


def test_the_python_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    from sdadapt.sampling import generate
    from sdadapt.toy import build_toy

    scope = run_block_with("samplers.md", "circular_padding(*models_of(toy))")
    plain = generate(build_toy(seed=1), ["a red circle"], sampler="euler", schedule="karras", steps=8, seed=3)
    assert scope["tiled"].shape == plain.shape and not torch.equal(scope["tiled"], plain)
    assert all(m.padding_mode == "zeros" for m in scope["toy"].modules() if type(m) is nn.Conv2d)  # (restored)


# ---- the property that tiles: UNet, VAE decoder and a whole sampler run commute with torch.roll ------------------------
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


import tiny_sd_fixtures

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd  # (module-scoped: the tiny SD folder, loaded)


def _roll(x, shift):
    return torch.roll(x, shifts=(shift, shift), dims=(-2, -1))


def test_the_unet_and_the_vae_decoder_commute_with_a_roll_only_when_tiled(system):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([400])
    states = system.condition(system.tokenize(["a tile"]))
    unet = system.denoiser()
    decode = system.decode_latents
    with torch.no_grad():
        with circular_padding(*models_of(system)) as changed:
            assert changed > 10
            assert torch.allclose(unet(_roll(z, 2), t, states), _roll(unet(z, t, states), 2), atol=1e-5)
            # (the tiny VAE upsamples once: a latent roll of 2 is a pixel roll of 4)
            assert torch.allclose(decode(_roll(z, 2)), _roll(decode(z), 4), atol=1e-5)
        assert not torch.allclose(unet(_roll(z, 2), t, states), _roll(unet(z, t, states), 2), atol=1e-3)
        assert not torch.allclose(decode(_roll(z, 2)), _roll(decode(z), 4), atol=1e-3)


@pytest.mark.parametrize("sampler, schedule", [("ddim", None), ("euler", "karras")])
def test_a_tiled_run_from_rolled_noise_is_the_rolled_run(system, sampler, schedule):
    from sdadapt.sampling import generate

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    run = dict(seed=3, steps=4, guidance=4.0, sampler=sampler, negative="blurry", output="latents", height=16, width=16,
               **({} if schedule is None else {"schedule": schedule}))
    with circular_padding(*models_of(system)):
        plain = generate(system, ["a tile"], start_noise=noise, **run)
        rolled = generate(system, ["a tile"], start_noise=_roll(noise, 2), **run)
    assert torch.allclose(rolled, _roll(plain, 2), atol=1e-4), (rolled - _roll(plain, 2)).abs().max()
    untiled = generate(system, ["a tile"], start_noise=_roll(noise, 2), **run)
    assert (untiled - _roll(plain, 2)).abs().max() > 1e-2


def test_generate_tiling_writes_tiling_true_and_reads_it_back(tiny_sd, tmp_path):
    from PIL import Image

    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    run = {"model": str(tiny_sd), "prompt": "a tile", "steps": 3, "seed": 1, "width": 16, "height": 16,
           "sampler": "Euler", "schedule": "karras"}
    run_generate(out=tmp_path / "t.png", tiling=True, **run)
    run_generate(out=tmp_path / "p.png", **run)
    tiled, plain = Image.open(tmp_path / "t.png"), Image.open(tmp_path / "p.png")
    assert not np.array_equal(np.asarray(tiled), np.asarray(plain))
    text = tiled.text["parameters"]
    assert ", RNG: CPU, Tiling: True, " in text and "Tiling" not in plain.text["parameters"]
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["tiling"] is True and not any("Tiling" in line for line in not_taken)
    run_generate(out=tmp_path / "again.png", **{**run, "tiling": options["tiling"]})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(tiled))


def test_the_toy_tiles_too_and_the_cli_takes_it(tmp_path):
    """The toy is a module itself (``models_of``: the system), its convolutions padded; the CLI's flag."""
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.toy.system import build_toy

    toy = build_toy()
    assert models_of(toy) == [toy] and models_of(object()) == []
    with circular_padding(*models_of(toy)) as changed:
        assert changed == sum(type(m) is nn.Conv2d for m in toy.modules()) > 0
    assert main(["generate", "--prompt", "a red circle", "--steps", "3", "--tiling", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "--prompt", "a red circle", "--steps", "3", "-o", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert "Tiling: True" in a.text["parameters"] and "Tiling" not in b.text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
