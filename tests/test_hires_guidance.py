"""``generate --hires-guidance``: Forge's "Hires CFG Scale" (``hr_cfg``), the hires pass's own guidance scale — the
second pass sampled at it, the first untouched, written in the infotext after the hires texts (Forge's order) and
read back."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("hires_guidance") / "pipe", prediction_type="epsilon")


def test_the_hires_pass_samples_at_its_own_scale_and_the_infotext_says_so(tiny_sd, tmp_path, monkeypatch):
    from PIL import Image

    import sdadapt.sampling as sampling_module
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    scales = []
    real = sampling_module.generate

    def spied(system, prompts, **options):
        scales.append(options.get("guidance"))
        return real(system, prompts, **options)

    monkeypatch.setattr(sampling_module, "generate", spied)
    run = {"model": str(tiny_sd), "prompt": "a cat", "negative": "blurry", "steps": 3, "seed": 2, "sampler": "Euler",
           "schedule": "karras", "width": 32, "height": 32, "guidance": 6.0, "hires_scale": 1.5,
           "hires_denoising": 0.6}
    run_generate(out=tmp_path / "own.png", hires_guidance=3.0, **run)
    assert scales[-2:] == [6.0, 3.0]  # (the first pass at --guidance, the hires pass at its own)
    run_generate(out=tmp_path / "same.png", hires_guidance=6.0, **run)
    run_generate(out=tmp_path / "plain.png", **run)
    assert scales[-2:] == [6.0, 6.0]
    images = {name: Image.open(tmp_path / f"{name}.png") for name in ("own", "same", "plain")}
    pixels = {name: np.asarray(image) for name, image in images.items()}
    assert np.array_equal(pixels["same"], pixels["plain"]) and not np.array_equal(pixels["own"], pixels["plain"])
    text = images["own"].text["parameters"]
    assert "Hires CFG Scale: 3, " in text and "Hires CFG Scale" not in images["plain"].text["parameters"]
    assert text.index("Hires CFG Scale") < text.index("Hires upscale")
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["hires_guidance"] == 3.0 and not any("Hires CFG" in line for line in not_taken)
    with pytest.raises(ValueError, match="--hires-guidance is the hires pass's guidance scale"):
        run_generate(**{**run, "hires_scale": None}, out=tmp_path / "x.png", hires_guidance=3.0)
    assert not (tmp_path / "x.png").exists()


def test_the_cli_takes_it_with_a_hires_pass_only(tiny_sd, tmp_path, capsys):
    from sdadapt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny_sd), "--prompt", "a", "--hires-guidance", "3", "-o",
              str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "--hires-guidance shapes the hires fix's second pass" in capsys.readouterr().err
