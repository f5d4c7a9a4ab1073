"""``generate --infotext``: A1111's infotext read back (sdadapt.jobs.infotext_read). The parser against A1111 v1.10's
``parse_generation_parameters`` (modules/infotext_utils.py; tests/test_infotext.py's transcription), without the UI
defaults it fills; and
round trips: an image ``generate`` wrote, made again from its PNG alone, is the same image with the same text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_infotext import (
    a1111_parse as _a1111_parse,  # (A1111's parse_generation_parameters, transcribed)
)

from sdadapt.cli import main
from sdadapt.jobs import run_generate
from sdadapt.jobs.infotext_read import infotext_options, parse_infotext, read_infotext

TEXTS = [
    ("a castle, (masterpiece:1.2), <lora:style:0.8>\nat night\nNegative prompt: blurry, lowres\nugly\n"
     'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, '
     'Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, Hires upscale: 2, Hires upscaler: Latent, '
     'Lora hashes: "style: 0a1b2c3d4e5f", TI hashes: "easyneg: 9f8e7d6c5b4a, bad: 111", Version: v1.10.1'),
    "just a prompt, no fields: here",
    "a prompt line with style: ink, and mood: calm",  # (two 'Key: value' pairs: A1111 keeps it as the prompt)
    "p\nSteps: 3, Aesthetic text: , Seed: 2, CFG scale: 5",  # (an empty value: A1111 drops the field)
    ('p\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Hires resize: 1024x1536, '
     'Hires prompt: "a \\"quoted\\" prompt, with commas", NGMS: 2, Skip Early CFG: 0.1, Pad conds: True'),
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_parser_is_a1111s(text):
    assert parse_infotext(text) == _a1111_parse(text)
    if "\n" not in text:
        assert parse_infotext(text) == {"Prompt": text, "Negative prompt": ""}


def test_the_fields_become_generates_options_and_the_rest_is_said():
    options, not_taken = infotext_options(parse_infotext(TEXTS[0]))
    assert {k: options[k] for k in ("steps", "sampler", "schedule", "guidance", "seed", "width", "height",
                                    "hires_scale", "hires_upscaler", "hires_denoising", "noise")} == {
        "steps": 30, "sampler": "DPM++ 2M", "schedule": "karras", "guidance": 7.5, "seed": 1234, "width": 512,
        "height": 768, "hires_scale": 2.0, "hires_upscaler": "latent", "hires_denoising": 0.45, "noise": "a1111"}
    assert options["prompt"] == "a castle, (masterpiece:1.2), <lora:style:0.8>\nat night"
    assert options["negative"] == "blurry, lowres\nugly"
    assert [line.split(":")[0] for line in not_taken] == ["Model hash", "Model", "Lora hashes", "TI hashes"]
    assert not_taken[0] == ("Model hash: 6ce0161689 — the run's model files: give them (--model, --vae, --refiner, "
                            "--hires-checkpoint)")
    options, not_taken = infotext_options(parse_infotext(TEXTS[-1]))
    assert (options["hires_width"], options["hires_height"], options["hires_prompt"]) == (
        1024, 1536, 'a "quoted" prompt, with commas')
    assert (options["ngms"], options["skip_early_cfg"], options["pad_conds"]) == (2.0, 0.1, True)
    _, not_taken = infotext_options(parse_infotext("p\nSteps: 2, Eta DDIM: 0.5, Hires upscaler: R-ESRGAN 4x+, "
                                                   "Hires upscale: 2, Mask blur: 4"))
    assert not_taken == ["Eta DDIM: A1111's setting of its DDIM and DDIM CFG++; not taken with Sampler '(none)'",
                         ("Hires upscaler: 'R-ESRGAN 4x+' is an upscaler model: give --upscaler-dir (A1111's "
                          "models/ESRGAN folder) or the model's file"),
                         "Mask blur: needs the init image / mask: give --init-image (--mask)"]


def test_bad_files_and_values_are_named(tmp_path):
    plain = tmp_path / "plain.png"
    run_generate(prompt="a", out=plain, steps=1)
    stripped = tmp_path / "stripped.png"
    Image.open(plain).save(stripped)  # (PIL drops the text chunks)
    with pytest.raises(ValueError, match="stripped.png: this PNG has no 'parameters' text"):
        read_infotext(stripped)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="x.bin: neither a PNG nor a UTF-8 text file"):
        read_infotext(binary)
    with pytest.raises(ValueError, match="infotext field Steps: 'many' is not what A1111 writes there"):
        infotext_options(parse_infotext("p\nSteps: many, Seed: 1, CFG scale: 7"))


ROUND_TRIPS = [
    ["--prompt", "a red circle, (sharp:1.2)", "--negative", "blue, dull", "--sampler", "Euler a", "--schedule",
     "karras", "--steps", "5", "--cfg", "3.5", "--seed", "7", "--noise", "a1111"],
    ["--prompt", "a red circle", "--sampler", "euler", "--steps", "4", "--seed", "3"],  # (RNG: CPU, diffusers' grid)
    ["--prompt", "a [red:blue:0.5] circle AND a square:0.5", "--negative", "green", "--sampler", "DPM++ 2M",
     "--schedule", "beta", "--steps", "4", "--seed", "11", "--skip-early-cfg", "0.2", "--ngms", "2",
     "--ngms-all-steps", "--beta-alpha", "0.5"],
    ["--prompt", "a red circle", "--sampler", "DPM++ 2M Karras", "--steps", "4", "--seed", "5", "--noise",
     "a1111-cpu", "--subseed", "9", "--subseed-strength", "0.3", "--seed-resize-from", "24x40", "--rho", "5",
     "--sigma-min", "0.05"],
]


@pytest.mark.parametrize("args", ROUND_TRIPS)
def test_generate_makes_its_own_image_again_from_the_png(tmp_path, capsys, args):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["generate", *args, "-o", str(first)]) == 0
    assert main(["generate", "--infotext", str(first), "-o", str(again)]) == 0
    assert "settings taken" in capsys.readouterr().err
    a, b = Image.open(first), Image.open(again)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.text["parameters"] == b.text["parameters"]


def test_options_given_win_over_the_infotext(tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    main(["generate", "--prompt", "a red circle", "--steps", "3", "--seed", "4", "-o", str(first)])
    main(["generate", "--infotext", str(first), "--seed", "5", "-o", str(again)])
    assert "given on the command line instead: seed" in capsys.readouterr().err
    assert ", Seed: 5," in Image.open(again).text["parameters"]


# ---- a diffusers model: the hires fix, BREAK chunks padded --------------------------------------------------------
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("infotext_read"), prediction_type="epsilon")


HIRES_RUNS = [
    ["--prompt", "a cat BREAK a [hat:cap:0.5]", "--hires-prompt", "a dog BREAK a hat", "--pad-conds",
     "--hires-upscaler", "Latent (bicubic)"],
    ["--prompt", "a cat", "--hires-schedule", "exponential", "--hires-upscaler", "Lanczos"],
    # (A1111's timestep samplers in the hires pass, the first pass's Karras not applying to them)
    ["--prompt", "a cat", "--hires-sampler", "DDIM CFG++", "--eta-ddim", "0.3"],
    ["--prompt", "a [cat:dog:0.5]", "--hires-sampler", "PLMS", "--skip-early-cfg", "0.3"],
    ["--prompt", "a cat", "--extra-noise", "0.2"],  # (A1111's extra noise on the hires pass's first sample)
    ["--prompt", "a cat", "--hires-sampler", "Euler", "--sigma-churn", "0.3", "--sigma-tmax", "5"],  # (its churn)
]


@pytest.mark.parametrize("extra", HIRES_RUNS)
def test_a_diffusers_hires_run_is_made_again_from_its_png(tiny_sd, tmp_path, extra):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    args = ["--model", str(tiny_sd), "--negative", "blurry", "--sampler", "DPM++ 2M", "--schedule", "karras",
            "--steps", "3", "--seed", "2", "--width", "32", "--height", "32", "--cfg", "5", "--hires-scale", "1.5",
            "--hires-steps", "2", "--hires-denoising", "0.55", "--noise", "a1111", *extra]
    assert main(["generate", *args, "-o", str(first)]) == 0
    assert main(["generate", "--model", str(tiny_sd), "--infotext", str(first), "-o", str(again)]) == 0
    a, b = Image.open(first), Image.open(again)
    text = a.text["parameters"]
    assert "Hires upscale: 1.5" in text and ("Pad conds: True" in text) == ("--pad-conds" in extra)
    assert ("Hires schedule type: Exponential" in text) == ("--hires-schedule" in extra)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and text == b.text["parameters"]


def test_the_hires_schedule_is_the_hires_passs_grid(tiny_sd, tmp_path):
    """``--hires-schedule`` (A1111's Hires schedule type) is the second pass's grid: the first pass's own again is the
    run without it; another changes the image (4 hires steps: with 2, Karras and Exponential are both (σ_max, σ_min))."""
    base = ["--model", str(tiny_sd), "--prompt", "a cat", "--sampler", "Euler", "--schedule", "karras", "--steps",
            "3", "--seed", "2", "--width", "32", "--height", "32", "--hires-scale", "1.5", "--hires-steps", "4"]
    main(["generate", *base, "-o", str(tmp_path / "same.png")])
    main(["generate", *base, "--hires-schedule", "karras", "-o", str(tmp_path / "karras.png")])
    main(["generate", *base, "--hires-schedule", "exponential", "-o", str(tmp_path / "exp.png")])
    same, karras, exp = (Image.open(tmp_path / f"{n}.png") for n in ("same", "karras", "exp"))
    assert np.array_equal(np.asarray(same), np.asarray(karras)) and same.text == karras.text
    assert not np.array_equal(np.asarray(same), np.asarray(exp))


@pytest.mark.parametrize("tail,schedule", [
    (", Version: v1.5.2", "automatic"), ("", "automatic"), (", Version: sdadapt 0.1.0", None),
    (", Schedule type: Karras, Version: v1.10.1", "karras"), (", Version: f0.0.17v1.8.0rc-latest-276-g29be1da7",
                                                               "automatic")])
def test_no_schedule_type_is_automatic_in_a1111s_texts_and_diffusers_grid_in_sdadapts(tail, schedule):
    """A1111's paste reads a missing Schedule type as its first scheduler, Automatic (``get_sampler_and_scheduler``):
    its texts before 1.9 wrote none. sdadapt writes none on a sampler's diffusers grid, so its own texts keep none; a
    label that names a schedule keeps it."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    options, _ = infotext_options(parse_infotext(f"a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7{tail}"))
    assert options.get("schedule") == schedule
    options, _ = infotext_options(parse_infotext("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, "
                                                 "Version: v1.6.0"))
    assert options["sampler"] == "DPM++ 2M Karras" and "schedule" not in options
