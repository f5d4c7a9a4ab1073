"""An A1111 user's spellings of ``generate``'s img2img / hires options: ``--hires-upscaler``, ``--resize-mode`` and
``--inpainting-fill`` take A1111's labels — what its UI shows and what its infotext (and sdadapt's) writes — as well
as sdadapt's names, as ``--sampler "DPM++ 2M Karras"`` and ``--schedule Karras`` already did.

A1111's lists, transcribed (stable-diffusion-webui 1.10): modules/shared_items.py / shared.py
``latent_upscale_modes`` (the "Latent ..." names; "Lanczos" is modules/upscaler.py ``UpscalerLanczos.name``),
modules/ui.py ``resize_mode`` radio ``["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent
upscale)"]`` (its index is ``p.resize_mode``) and ``inpainting_fill`` radio ``['fill', 'original', 'latent noise',
'latent nothing']`` (``type="index"``: its index is ``p.inpainting_fill``).
"""

from __future__ import annotations

import pytest

from sdadapt.cli import build_parser
from sdadapt.sampler_tables import (
    HIRES_UPSCALER_LABELS,
    HIRES_UPSCALERS,
    INPAINTING_FILL_LABELS,
    RESIZE_MODE_LABELS,
    canonical_choice,
)

#: sdadapt name -> A1111's label, written out from A1111's code (module docstring)
A1111_UPSCALERS = {"latent": "Latent", "latent-antialiased": "Latent (antialiased)", "latent-bicubic": "Latent (bicubic)",
                   "latent-bicubic-antialiased": "Latent (bicubic antialiased)", "latent-nearest": "Latent (nearest)",
                   "latent-nearest-exact": "Latent (nearest-exact)", "pixel-lanczos": "Lanczos",
                   "pixel-nearest": "Nearest", "pixel-none": "None"}  # (A1111's built-in upscalers: modules/upscaler.py)
A1111_RESIZE = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]  # (resize_mode)
A1111_FILLS = ["fill", "original", "latent noise", "latent nothing"]  # (index = A1111's inpainting_fill)

CASES = ([("--hires-upscaler", "hires_upscaler", name, label) for name, label in A1111_UPSCALERS.items()]
         + [("--resize-mode", "resize_mode", name, label) for name, label in zip(("just", "crop", "fill"), A1111_RESIZE)]
         + [("--inpainting-fill", "inpainting_fill", name, label)
            for name, label in zip(("fill", "original", "latent-noise", "latent-nothing"), A1111_FILLS)])


def _parse(option: str, value: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["generate", "--prompt", "x", "--init-image", "a.png", "--mask", "m.png",
                                      "--hires-scale", "2", option, value, "-o", "x.png"])


@pytest.mark.parametrize(("option", "dest", "name", "label"), CASES)
def test_an_a1111_label_and_the_name_parse_to_the_same_name(option, dest, name, label):
    assert getattr(_parse(option, name), dest) == name
    assert getattr(_parse(option, label), dest) == name
    assert getattr(_parse(option, f" {label.upper()} "), dest) == name  # (case and outer blanks: A1111's UI has none)


def test_the_tables_are_a1111s_and_the_jobs_names():
    """The label tables are A1111's lists in A1111's order (their index is A1111's number), and their names are the
    ones the jobs read: the infotext writes these labels, so an infotext's value parses back to its option."""
    from sdadapt.inpaint import INPAINTING_FILLS
    from sdadapt.jobs.infotext import HIRES_UPSCALER_LABELS as infotext_labels
    from sdadapt.resize_modes import LATENT_RESIZE, RESIZE_MODES

    assert HIRES_UPSCALER_LABELS == A1111_UPSCALERS and tuple(HIRES_UPSCALER_LABELS) == HIRES_UPSCALERS
    assert infotext_labels is HIRES_UPSCALER_LABELS  # (one home)
    numbers = {**{name: number for name, (number, _) in RESIZE_MODES.items()}, LATENT_RESIZE: 3}  # (the latents')
    assert {name: A1111_RESIZE[number] for name, number in numbers.items()} == RESIZE_MODE_LABELS
    assert {name: label for name, (_, label) in RESIZE_MODES.items()} == {
        name: label for name, label in RESIZE_MODE_LABELS.items() if name != LATENT_RESIZE}
    assert {name: A1111_FILLS[number] for name, number in INPAINTING_FILLS.items()} == INPAINTING_FILL_LABELS


@pytest.mark.parametrize(("option", "value"), [("--hires-upscaler", "Latent (bicubic)x"), ("--resize-mode", "stretch"),
                                               ("--inpainting-fill", "latent-noyse"), ("--hires-upscaler", "ESRGAN_4x")])
def test_anything_else_is_refused_naming_the_option_and_both_spellings(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(option, value)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {option}: {option} {value!r}: not one of" in message
    assert "or A1111's" in message and message.count("\n") == 1


def test_canonical_choice_reads_names_before_labels_and_inner_blanks_once():
    labels = {"a": "b", "b": "c"}  # a name that is another name's label: the name wins
    assert canonical_choice("--x", "b", labels) == "b"
    assert canonical_choice("--x", "c", labels) == "b" and canonical_choice("--x", "A", labels) == "a"
    assert canonical_choice("--x", "latent   nothing", INPAINTING_FILL_LABELS) == "latent-nothing"
    with pytest.raises(ValueError, match=r"--x 'd': not one of a, b \(or A1111's 'b', 'c'\)"):
        canonical_choice("--x", "d", labels)
