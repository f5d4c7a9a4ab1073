"""``--lora`` / ``--hypernetwork`` options written into the infotext's prompt as A1111 tags
(:func:`sdadapt.jobs.infotext.option_network_tags`), so that pasting an sdadapt PNG's text into A1111 — or back
into ``sdadapt generate`` with ``--lora-dir`` / ``--hypernetwork-dir`` — applies the same networks.

A1111's side, transcribed here (stable-diffusion-webui v1.10; not copied):

- modules/infotext_utils.py ``parse_generation_parameters``: the prompt / fields split (tests/test_infotext.py
  ``a1111_parse``), then its old-field rule: a "Hypernet" field (with "Hypernet strength", default "1.0") becomes a
  ``<hypernet:NAME:S>`` appended to the prompt.
- modules/extra_networks.py ``parse_prompt``: ``re_extra_net = <(\\w+):([^>]+)>``, each tag's text split at ``:``
  into ``ExtraNetworkParams`` items (an item with exactly one ``=`` is named); ``lookup_extra_networks``: ``lyco``
  is an alias of ``lora`` (extensions-builtin/Lora/scripts/lora_script.py ``before_ui``).
- extensions-builtin/Lora/extra_networks_lora.py ``activate``: name ``positional[0]``, te = ``positional[1]`` (named
  ``te`` wins, default 1.0), unet = ``positional[2]`` (named ``unet`` wins, default te);
  modules/extra_networks_hypernet.py ``activate``: name ``items[0]``, multiplier ``float(items[1])`` or 1.0.
- lora_script.py ``infotext_pasted``: "Lora hashes" read into ``{name: hash}`` and each ``<lora:NAME:`` whose NAME
  is a key, with the hash of a file on disk, renamed to that file's name — so the hash list's names are the tags'.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_infotext import a1111_parse

from sdadapt.jobs.infotext import InfotextRun, option_network_tags

_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
_RE_LORA = re.compile("<lora:([^:]+):")


def a1111_networks(prompt: str) -> tuple[str, list[tuple[str, float, float]], list[tuple[str, float]]]:
    """What A1111 applies for a pasted prompt: (the prompt without tags, LoRAs ``(name, te, unet)``,
    hypernetworks ``(name, multiplier)``), each in prompt order (transcribed: see the module docstring)."""
    found: dict[str, list[list[str]]] = defaultdict(list)

    def take(m):
        found[m.group(1)].append(m.group(2).split(":"))
        return ""

    text = _RE_EXTRA_NET.sub(take, prompt)
    loras, hypernets = [], []
    for kind, calls in found.items():
        for items in calls:
            positional = [item for item in items if len(item.split("=", 2)) != 2]
            named = dict(item.split("=", 2) for item in items if len(item.split("=", 2)) == 2)
            if kind in ("lora", "lyco"):
                te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
                unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
                loras.append((positional[0], te, unet))
            elif kind == "hypernet":
                hypernets.append((items[0], float(items[1]) if len(items) > 1 else 1.0))
    return text, loras, hypernets


def a1111_paste(infotext: str) -> dict:
    """parse_generation_parameters with its "Hypernet" rule (the rest: test_infotext.a1111_parse)."""
    res = a1111_parse(infotext)
    if res.get("Hypernet") is not None:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    return res


def a1111_infotext_pasted(res: dict, on_disk: dict[str, str]) -> str:
    """lora_script.py ``infotext_pasted`` with A1111's files ``{shorthash: name}``: the prompt it hands on."""
    hashes = res.get("Lora hashes")
    if not hashes:
        return res["Prompt"]
    pairs = [x.strip().split(":", 1) for x in hashes.split(",")]
    table = {x[0].strip().replace(",", ""): x[1].strip() for x in pairs}

    def rename(m):
        short = table.get(m.group(1))
        if short is None or short not in on_disk:
            return m.group(0)
        return f"<lora:{on_disk[short]}:"

    return _RE_LORA.sub(rename, res["Prompt"])


def _safetensors(path: Path, payload: bytes) -> Path:
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


@pytest.fixture()
def files(tmp_path):
    out = {name: _safetensors(tmp_path / f"{name}.safetensors", name.encode() * 8)
           for name in ("ink", "locon_style", "detail")}
    out["hn"] = tmp_path / "anime.pt"
    out["hn"].write_bytes(b"hypernetwork")
    out["hn2"] = tmp_path / "sketch.safetensors"
    out["hn2"].write_bytes(b"x")
    return out


def test_options_read_back_through_a1111s_parser_as_the_networks_the_run_applied(files):
    run = InfotextRun(prompt="a cat, (red:1.2) <lora:detail:0.5:unet=0.25>", negative="blurry", steps=2,
                      loras=[(files["ink"], 0.8), (files["locon_style"], -0.35)],
                      hypernetworks=[(files["hn"], 0.55), files["hn2"]],
                      tag_loras=[("<lora:detail:0.5:unet=0.25>", files["detail"])])
    res = a1111_paste(run.for_image(0))
    text, loras, hypernets = a1111_networks(res["Prompt"])
    assert text == "a cat, (red:1.2) "  # (the prompt the run encoded: tags leave no space behind)
    # options first, in the order given (the order the run merged them), then the prompt's tags
    assert loras == [("ink", 0.8, 0.8), ("locon_style", -0.35, -0.35), ("detail", 0.5, 0.25)]
    assert hypernets == [("anime", 0.55), ("sketch", 1.0)]
    assert "Hypernet" not in res  # (the tag only: the old field too would chain it twice)
    # "Lora hashes" names exactly the tags' names, in their order, so infotext_pasted can rename each by its hash
    assert [pair.split(": ")[0] for pair in res["Lora hashes"].split(", ")] == [name for name, _, _ in loras]
    on_disk = {pair.split(": ")[1]: f"renamed_{i}" for i, pair in enumerate(res["Lora hashes"].split(", "))}
    renamed = a1111_networks(a1111_infotext_pasted(res, on_disk))[1]
    assert renamed == [(f"renamed_{i}", te, unet) for i, (_, te, unet) in enumerate(loras)]


def test_a_hires_prompt_gets_the_option_tags_too(files):
    hires = {"scale": 2.0, "steps": 1, "upscaler": "latent", "prompt": "a cat, sharp <lora:detail:1>",
             "negative": None, "denoising": 0.5}
    run = InfotextRun(prompt="a cat", steps=2, hires=hires, loras=[(files["ink"], 0.7)],
                      tag_loras=[], hires_tag_loras=[("<lora:detail:1>", files["detail"])])
    res = a1111_paste(run.for_image(0))
    assert a1111_networks(res["Prompt"])[1] == [("ink", 0.7, 0.7)]
    assert a1111_networks(res["Hires prompt"])[1] == [("ink", 0.7, 0.7), ("detail", 1.0, 1.0)]
    assert [pair.split(": ")[0] for pair in res["Lora hashes"].split(", ")] == ["ink", "detail"]
    same = InfotextRun(prompt="a cat", steps=2, hires={**hires, "prompt": "a cat"}, loras=[(files["ink"], 0.7)])
    assert "Hires prompt" not in a1111_paste(same.for_image(0))  # (still the first pass's: not written)


def test_files_no_tag_can_name_get_no_tag_and_no_hash(files, tmp_path):
    adapter = tmp_path / "peft_adapter"
    adapter.mkdir()
    odd = _safetensors(tmp_path / "a=b.safetensors", b"1" * 8)
    run = InfotextRun(prompt="a cat", steps=2, loras=[(adapter, 0.5), (odd, 0.5), (files["ink"], 1.0)])
    res = a1111_paste(run.for_image(0))
    assert res["Prompt"] == "<lora:ink:1.0>a cat" and res["Lora hashes"].split(": ")[0] == "ink"
    assert option_network_tags([adapter, odd]) == ""


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_a_scale_reads_back_as_the_same_float(scale):
    tag = option_network_tags([("x/ink.safetensors", scale)], [("x/anime.pt", scale)])
    _, loras, hypernets = a1111_networks(tag)
    assert loras == [("ink", scale, scale)] and hypernets == [("anime", scale)]


# ---- the round trip through generate (the tiny pipeline of test_generate_prompt_syntax) ------------------------

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_generate_prompt_syntax import _cli, _pixels, sd  # noqa: F401  (sd: its module fixture)

from sdadapt.images import read_png_text


def test_an_sdadapt_png_pasted_back_applies_the_options_once(sd, tmp_path, capsys):  # noqa: F811
    root = sd[1]
    ink, style = root / "loras" / "sub" / "ink.safetensors", root / "hn" / "style.pt"
    dirs = ("--lora-dir", str(root / "loras"), "--hypernetwork-dir", str(root / "hn"))
    options = ("--lora", f"{ink}:0.7", "--hypernetwork", f"{style}:0.6")
    assert _cli(sd, tmp_path / "options.png", "a cat", *options) == 0
    written = read_png_text(tmp_path / "options.png")["parameters"]
    prompt = a1111_paste(written)["Prompt"]
    assert prompt == "<lora:ink:0.7><hypernet:style:0.6>a cat"
    # the prompt alone, through sdadapt's tag path: the same image and the same text
    assert _cli(sd, tmp_path / "tags.png", prompt, *dirs) == 0
    # the prompt and the options both (a command line kept, the prompt pasted): each file applied once
    assert _cli(sd, tmp_path / "both.png", prompt, *dirs, *options) == 0
    assert _cli(sd, tmp_path / "plain.png", "a cat") == 0
    image = _pixels(tmp_path / "options.png")
    assert _pixels(tmp_path / "tags.png") == image == _pixels(tmp_path / "both.png")
    assert image != _pixels(tmp_path / "plain.png")
    for name in ("tags.png", "both.png"):
        assert read_png_text(tmp_path / name)["parameters"] == written
    # the same file at another weight both ways: refused, naming the option
    assert _cli(sd, tmp_path / "clash.png", prompt, *dirs, "--lora", f"{ink}:0.5") != 0
    err = capsys.readouterr().err
    assert "--lora" in err and "<lora:ink:0.7>" in err and "at other weights" in err
    assert not (tmp_path / "clash.png").exists()
