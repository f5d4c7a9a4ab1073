"""``generate --loopback``: A1111's "Loopback" script (``scripts/loopback.py``) against its
``calculate_denoising_strength`` transcribed here, and end to end on a tiny SD model: each loop's init image (the
loop before's PNG), strength and seed, a mask's "original" content after the first loop, the infotexts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdadapt.loopback import check_loopback, loopback_strengths
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)


def _a1111_strengths(initial, final, loops, curve):
    """The script's loop: ``p.denoising_strength = calculate_denoising_strength(i + 1)`` after loop ``i``."""
    def calculate_denoising_strength(loop):
        strength = initial
        if loops == 1:
            return strength
        progress = loop / (loops - 1)
        if curve == "Aggressive":
            strength = math.sin((progress) * math.pi * 0.5)
        elif curve == "Lazy":
            strength = 1 - math.cos((progress) * math.pi * 0.5)
        else:
            strength = progress
        change = (final - initial) * strength
        return initial + change

    out, current = [], initial
    for i in range(loops):
        out.append(current)
        current = calculate_denoising_strength(i + 1)
    return out


@settings(max_examples=60, deadline=None)
@given(initial=st.floats(0, 1), final=st.floats(0, 1), loops=st.integers(1, 12),
       curve=st.sampled_from(["Aggressive", "Linear", "Lazy"]))
def test_strengths_are_a1111s_exactly(initial, final, loops, curve):
    assert loopback_strengths(initial, final, loops, curve=curve) == _a1111_strengths(initial, final, loops, curve)


def test_check_refuses_bad_settings():
    assert check_loopback(3, 0.5, "LAZY") == "lazy"
    for args, message in [((0, 0.5, "linear"), "at least 1"), ((2, 1.5, "linear"), r"\[0, 1\]"),
                          ((2, 0.5, "steep"), "aggressive, linear, lazy")]:
        with pytest.raises(ValueError, match=message):
            check_loopback(*args)


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "5", "--quiet", "--out", str(out), "--width", "64", "--height", "64", *extra])


def _png_pixels(path):
    unit = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(unit).permute(2, 0, 1) * 2 - 1


def test_cli_loopback_is_a1111s_script(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """3 loops x 2 batches: seeds 5..10, strengths 0.75 -> 0.5 (aggressive) in each batch, loop 0 from the init
    image and each later loop from the loop before's PNG; every image written with its own infotext."""
    from generate_recorder import record_generate

    from sdadapt import resize_modes

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    pixels = []
    real_pixels = resize_modes.init_image_pixels
    def spy_pixels(path, size, **kw):
        pixels.append(str(path))
        return real_pixels(path, size, **kw)

    calls = record_generate(monkeypatch)
    monkeypatch.setattr(resize_modes, "init_image_pixels", spy_pixels)
    assert _cli(plain_sd, tmp_path / "loop.png", "--init-image", str(tmp_path / "in.png"), "--loopback", "3",
                "--count", "2", "--denoising-strength", "0.75", "--loopback-curve", "Aggressive") == 0
    strengths = _a1111_strengths(0.75, 0.5, 3, "Aggressive")
    assert [(kw["seed"], kw["denoising_strength"]) for kw, _ in calls] == [(5 + i, strengths[i % 3]) for i in range(6)]
    outs = [tmp_path / f"loop-{i:02d}.png" for i in range(6)]
    # (one encoding per loop, from its init image: the first loop's is the run's own, made before the loop)
    assert pixels == [str(tmp_path / "in.png"), str(outs[0]), str(outs[1]),
                          str(tmp_path / "in.png"), str(outs[3]), str(outs[4])]
    for i, out in enumerate(outs):
        text = Image.open(out).text["parameters"]
        assert f"Seed: {5 + i}," in text and f"Denoising strength: {strengths[i % 3]!r}," in text
        assert "Final denoising strength: 0.5, Denoising curve: Aggressive" in text
    assert not torch.equal(_png_pixels(outs[0]), _png_pixels(outs[3]))  # (batch 2: other seeds)
    from sdadapt.cli import main

    assert main(["generate", "--model", str(plain_sd), "--quiet", "--out", str(tmp_path / "again.png"),
                 "--infotext", str(outs[0]), "--init-image", str(tmp_path / "in.png"), "--loopback", "3"]) == 0
    for i in range(3):  # (loop 0's infotext: the first strength, the final one and the curve; the loops given)
        assert torch.equal(_png_pixels(tmp_path / f"again-{i:02d}.png"), _png_pixels(outs[i]))


def test_cli_loopback_with_a_mask_starts_later_loops_from_original_content(plain_sd, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    from sdadapt.jobs import generate_inpaint

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    fills = []
    real = generate_inpaint.inpaint_inputs

    def spy(system, image_path, mask_path, **kw):
        fills.append((str(image_path), kw["inpainting_fill"]))
        return real(system, image_path, mask_path, **kw)

    monkeypatch.setattr(generate_inpaint, "inpaint_inputs", spy)
    assert _cli(plain_sd, tmp_path / "loop.png", "--init-image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "mask.png"), "--inpainting-fill", "latent-noise", "--loopback", "3") == 0
    assert fills == [(str(tmp_path / "in.png"), "latent-noise"), (str(tmp_path / "loop-00.png"), "original"),
                         (str(tmp_path / "loop-01.png"), "original")]
    outside = np.ones((64, 64), dtype=bool)
    outside[6:58, 6:58] = False  # (past the mask and its blur, 10 pixels: the original's pixels, every loop)
    source = np.asarray(Image.open(tmp_path / "in.png"))
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"loop-{i:02d}.png"))[outside], source[outside])


def test_cli_loopback_refusals(plain_sd, tmp_path, capsys):  # noqa: F811
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "a.png", "--loopback", "2")
    assert "--loopback only applies with --init-image IMAGE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "a.png", "--init-image", str(tmp_path / "in.png"), "--loopback-curve", "lazy")
    assert "--loopback-curve only applies with --loopback N" in capsys.readouterr().err
    for extra, message in [(["--sd-upscale", "2"], "not with --sd-upscale"),
                           (["--loopback-final-denoising", "2"], "[0, 1]"), (["--loopback-curve", "x"], "lazy")]:
        assert _cli(plain_sd, tmp_path / "a.png", "--init-image", str(tmp_path / "in.png"), "--loopback", "2",
                    *extra) != 0, extra
        assert message in capsys.readouterr().err, extra


def test_the_loopback_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "loopback_strengths(0.6")


def test_cli_loopback_with_a_variation_seed_moves_the_seed_not_the_subseed(plain_sd, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """A1111's loopback sets ``p.seed = processed.seed + 1`` after each loop, variation strength or not, and leaves
    ``p.subseed``: each loop draws with its own seed and the one variation seed, and says so in its infotext."""
    from generate_recorder import record_generate

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    calls = record_generate(monkeypatch)
    assert _cli(plain_sd, tmp_path / "loop.png", "--init-image", str(tmp_path / "in.png"), "--loopback", "3",
                "--noise", "a1111-cpu", "--subseed", "7", "--subseed-strength", "0.5") == 0
    assert [(kw["seed"], kw["noise"].subseed) for kw, _ in calls] == [(5, 7), (6, 7), (7, 7)]
    for i in range(3):
        text = Image.open(tmp_path / f"loop-{i:02d}.png").text["parameters"]
        assert f"Seed: {5 + i}," in text and "Variation seed: 7," in text
