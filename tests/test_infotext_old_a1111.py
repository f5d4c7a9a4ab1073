"""Infotexts of A1111 before v1.0 read as A1111's own paste rewrites them (``parse_generation_parameters``): the old
hires fix's "First pass size" (``restore_old_hires_fix_params``; ``0x0`` through ``old_hires_fix_first_pass_dimensions``)
and a "Hypernet" field (the prompt gets its ``<hypernet:NAME:STRENGTH>`` tag)."""

from __future__ import annotations

import math

import pytest

from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

_OLD = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: {size}, Model hash: 7460a6fa, " \
       "Denoising strength: 0.7, First pass size: {first}"


def _a1111_first_pass(width: int, height: int) -> tuple[int, int]:
    """A1111's processing.old_hires_fix_first_pass_dimensions, transcribed."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


@pytest.mark.parametrize("size,first", [((1024, 1024), (512, 512)), ((1024, 768), (0, 0)), ((768, 1152), (0, 0)),
                                        ((900, 600), (448, 320))])
def test_the_old_hires_fix_is_a_first_pass_and_a_hires_resize(size, first):
    fields = parse_infotext(_OLD.format(size="x".join(map(str, size)), first="x".join(map(str, first))))
    want = first if first != (0, 0) else _a1111_first_pass(*size)
    assert (int(fields["Size-1"]), int(fields["Size-2"])) == want
    assert (int(fields["Hires resize-1"]), int(fields["Hires resize-2"])) == size
    assert "First pass size-1" not in fields
    options, not_taken = infotext_options(fields)
    assert (options["width"], options["height"]) == want
    assert (options["hires_width"], options["hires_height"], options["hires_denoising"]) == (*size, 0.7)
    assert not [n for n in not_taken if n.startswith(("First pass", "Denoising"))], not_taken


def test_a_hypernet_field_becomes_the_prompts_tag():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 7460a6fa, "
            "Hypernet: anime_3, Hypernet hash: 4e5b1bb5, Hypernet strength: 0.8")
    assert parse_infotext(text)["Prompt"] == "a cat<hypernet:anime_3:0.8>"
    assert parse_infotext(text.replace(", Hypernet strength: 0.8", ""))["Prompt"] == "a cat<hypernet:anime_3:1.0>"
    options, _ = infotext_options(parse_infotext(text))
    assert options["prompt"] == "a cat<hypernet:anime_3:0.8>"  # (generate reads the tag with --hypernetwork-dir)
