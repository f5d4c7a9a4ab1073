"""``generate --vae-tiling``: the image is diffusers' tiled decode of the run's latents (``AutoencoderKL.enable_tiling``)
— not the whole-image decode —, "VAE tiling: True" is written and read back, the VAE's setting is restored after
the run, and a model without a tiling VAE is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.images import decode_png, read_png_text
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

diffusers = pytest.importorskip("diffusers")


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), "--width", "96", "--height", "64", *extra])


def test_the_image_is_diffusers_tiled_decode_of_the_runs_latents(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    from generate_recorder import record_generate

    from sdadapt.images import to_uint8

    calls = record_generate(monkeypatch)
    assert _cli(plain_sd, tmp_path / "t.png", "--vae-tiling") == 0
    assert _cli(plain_sd, tmp_path / "w.png") == 0
    (_, latents_tiled), (_, latents_whole) = calls
    assert torch.equal(latents_tiled, latents_whole)  # (tiling changes the VAE alone)
    vae = diffusers.AutoencoderKL.from_pretrained(plain_sd / "vae")
    scaling = vae.config.scaling_factor
    assert latents_tiled.shape[-1] > vae.tile_latent_min_size  # (larger than a tile: the tiles are used)
    with torch.no_grad():
        whole = vae.decode(latents_tiled / scaling).sample
        vae.enable_tiling()
        tiled = vae.decode(latents_tiled / scaling).sample
    assert not torch.equal(whole, tiled)
    assert np.array_equal(decode_png((tmp_path / "t.png").read_bytes()), to_uint8(tiled[0].clamp(-1, 1)))
    assert np.array_equal(decode_png((tmp_path / "w.png").read_bytes()), to_uint8(whole[0].clamp(-1, 1)))
    assert "VAE tiling: True" in read_png_text(tmp_path / "t.png")["parameters"]
    assert "VAE tiling" not in read_png_text(tmp_path / "w.png")["parameters"]


def test_the_infotext_makes_the_same_image_and_the_setting_is_restored(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    from sdadapt.cli import main
    from sdadapt.jobs import generate as generate_job

    systems = []
    real_load = generate_job.load_system
    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: systems.append(real_load(*a, **k)) or systems[-1])
    assert _cli(plain_sd, tmp_path / "t.png", "--vae-tiling") == 0
    assert systems[0].vae.use_tiling is False  # (the run's setting taken off its model at the end)
    assert main(["generate", "--model", str(plain_sd), "--infotext", str(tmp_path / "t.png"), "--quiet",
                 "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "t.png").read_bytes()


def test_a_model_without_a_tiling_vae_is_refused(tmp_path, capsys):
    from sdadapt.cli import main

    assert main(["generate", "--prompt", "a", "--steps", "1", "--vae-tiling", "-q", "-o", str(tmp_path / "a.png")]) == 2
    assert "has no diffusers VAE that decodes in tiles" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "tiled_vae(system)")
