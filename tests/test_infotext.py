"""A1111's "parameters" PNG text (infotext) written by ``generate`` (:mod:`sdadapt.jobs.infotext`), read back by a
transcription of A1111's own reader."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest
import torch

from sdadapt.images import read_png_text
from sdadapt.jobs.infotext import InfotextRun, file_sha256, format_infotext, quote

# ---- A1111's reader, transcribed (modules/infotext_utils.py at 036500223de0: re_param_code / re_imagesize at
# lines 16-18, unquote at lines 62-69, parse_generation_parameters' prompt / negative / field loop at lines
# 233-281); the defaults it fills in afterwards are left out: they are not in the text.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def _unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parse(x: str) -> dict:
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in _RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = _unquote(v)
            m = _RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
            else:
                res[k] = v
        except Exception:  # (A1111 prints "Error parsing" and drops the field: an empty value's v[0])
            pass
    return res


#: create_infotext's fixed keys in its order (modules/processing.py, v1.10), the ones generate can write
_A1111_ORDER = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
                "VAE", "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
                "Conditional mask weight", "Clip skip", "ENSD", "RNG"]


def _safetensors(path, metadata=None, payload=b"\x00" * 64):
    header = {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def _full_run(tmp_path, **overrides) -> InfotextRun:
    model = tmp_path / "myModel_v1.safetensors"
    model.write_bytes(b"model bytes" * 100)
    vae = tmp_path / "vae-ft-mse.safetensors"
    vae.write_bytes(b"vae bytes")
    refiner = tmp_path / "sd_xl_refiner_1.0.safetensors"
    refiner.write_bytes(b"refiner")
    tagged = _safetensors(tmp_path / "detail.safetensors", {"sshs_model_hash": "ab" * 32})
    plain = _safetensors(tmp_path / "style,v2.safetensors")
    emb = tmp_path / "EasyNeg.pt"
    emb.write_bytes(b"embedding")
    options = dict(
        prompt="a cat, (red:1.2) <lora:detail:0.8>", negative="blurry, EasyNeg", sampler="dpmsolver++", steps=20,
        guidance=7.0, seed=42, width=512, height=768, schedule="karras", model=model, vae=vae, subseed=7,
        subseed_strength=0.35, seed_resize_from=(640, 480), denoising_strength=0.55, clip_skip=2, ensd=31337,
        noise="a1111-cpu", hires={"scale": 2.0, "steps": 10, "upscaler": "latent-bicubic", "sampler": "euler_a",
                                   "schedule": "exponential", "prompt": "a cat: sharp", "negative": None,
                                   "denoising": 0.55},
        loras=[plain], tag_loras=[("<lora:detail:0.8>", tagged)], embeddings=[], negative_embeddings=[("EasyNeg", emb)],
        refiner=refiner, refiner_switch_at=0.8, refiner_took=True)
    options.update(overrides)
    return InfotextRun(**options)


def test_every_field_reads_back_exactly_through_a1111s_parser_in_a1111s_order(tmp_path):
    run = _full_run(tmp_path)
    text = run.for_image(1)
    parsed = a1111_parse(text)
    sha = lambda name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()  # noqa: E731
    addnet = hashlib.sha256(b"\x00" * 64).hexdigest()[:12]
    expected = {
        "Prompt": "<lora:style,v2:1.0>a cat, (red:1.2) <lora:detail:0.8>",  # (--lora as a tag: test_infotext_tags)
        "Negative prompt": "blurry, EasyNeg",
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "42",
        "Size-1": "512", "Size-2": "768", "Model hash": sha("myModel_v1.safetensors")[:10], "Model": "myModel_v1",
        "VAE hash": sha("vae-ft-mse.safetensors")[:10], "VAE": "vae-ft-mse.safetensors",
        "Variation seed": "8", "Variation seed strength": "0.35", "Seed resize from-1": "480",
        "Seed resize from-2": "640", "Denoising strength": "0.55", "Clip skip": "2", "ENSD": None, "RNG": "CPU",
        "Hires sampler": "Euler a", "Hires prompt": "<lora:style,v2:1.0>a cat: sharp", "Hires schedule type": "Exponential",
        "Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent (bicubic)",
        "Lora hashes": f"stylev2: {addnet}, detail: {'ab' * 6}", "TI hashes": f"EasyNeg: {sha('EasyNeg.pt')[:12]}",
        "Refiner": f"sd_xl_refiner_1.0 [{sha('sd_xl_refiner_1.0.safetensors')[:10]}]", "Refiner switch at": "0.8",
        "Version": "sdadapt " + __import__("sdadapt").__version__}
    expected = {k: v for k, v in expected.items() if v is not None}  # (ENSD: DPM++ 2M draws no noise, A1111's rule)
    assert parsed == expected
    keys = [k.split(": ")[0] for k in re.findall(r'(\w[\w \-/]+): (?:"(?:\\.|[^\\"])+"|[^,]*)', text.split("\n")[-1])]
    fixed = [k for k in keys if k in _A1111_ORDER]
    assert fixed == [k for k in _A1111_ORDER if k in fixed]
    assert keys[-1] == "Version" and keys.index("Hires upscale") < keys.index("Lora hashes") < keys.index("Refiner")


def test_quoting_and_numbers_as_a1111_prints_them():
    assert quote("Euler a") == "Euler a" and quote(7) == "7"
    assert quote('a, "b"') == '"a, \\"b\\""' and quote("x: y") == '"x: y"' and quote("é,") == '"é,"'
    text = format_infotext("p", "", {"CFG scale": 7.0, "Denoising strength": 0.35, "Hires upscale": 1.5,
                                     "Model": None, "Tiling": "Tiling", "Steps": 20})
    assert text == "p\nCFG scale: 7, Denoising strength: 0.35, Hires upscale: 1.5, Tiling, Steps: 20"
    assert format_infotext("p", "n", {"Steps": 1}) == "p\nNegative prompt: n\nSteps: 1"


def test_img2img_inpaint_fields_and_samplers_without_an_a1111_name(tmp_path):
    run = InfotextRun(prompt="x", sampler="unipc", steps=5, guidance=7.5, seed=3, width=64, height=64,
                      denoising_strength=0.75, inpainting_conditioning=1.0, schedule="uniform", schedule_asked=True,
                      mask={"blur": 4.0, "invert": True, "fill": "latent-noise", "padding": 32, "applied": True,
                            "region": True}, noise="a1111")
    parsed = a1111_parse(run.for_image(0))
    assert parsed["Sampler"] == "unipc" and parsed["Schedule type"] == "Automatic" and "RNG" not in parsed
    assert [parsed[k] for k in ("Denoising strength", "Conditional mask weight", "Mask mode", "Mask blur",
                                "Inpaint area", "Masked area padding", "Masked content")] == [
        "0.75", "1", "Inpaint not masked", "4", "Only masked", "32", "latent noise"]
    assert "Model" not in parsed and "Model hash" not in parsed  # (no file: the toy)


def test_a_diffusers_folder_gets_its_name_and_no_hash_and_files_are_hashed_once(tmp_path, monkeypatch):
    folder = tmp_path / "my-diffusers-model"
    folder.mkdir()
    parsed = a1111_parse(InfotextRun(prompt="x", model=folder, steps=1).for_image(0))
    assert parsed["Model"] == "my-diffusers-model" and "Model hash" not in parsed
    big = tmp_path / "m.ckpt"
    big.write_bytes(b"1" * 3000)
    assert file_sha256(big) == hashlib.sha256(b"1" * 3000).hexdigest()
    import builtins

    calls = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (calls.append(a[0]), real_open(*a, **k))[1])
    InfotextRun(prompt="x", model=big, steps=1).for_image(0)
    assert not [c for c in calls if str(c).endswith("m.ckpt")]  # (cached: not read again)


def _toy_embedding(path):
    import sdadapt
    from sdadapt.jobs.models import load_system

    width = load_system("toy").text_encoder.get_input_embeddings().weight.shape[1]
    sdadapt.save_embedding(path, sdadapt.Embedding("sks", {"text_encoder": torch.ones(1, width)}))
    return path


def test_generate_writes_the_chunk_pil_reads_it_and_a_golden_run(tmp_path):
    from PIL import Image

    from sdadapt.jobs.generate import run_generate

    emb = _toy_embedding(tmp_path / "sks.pt")
    out = run_generate(prompt="a sks circle # note", negative="sks square", out=tmp_path / "g.png", steps=3,
                       sampler="Euler a", noise="a1111-cpu", ensd=31337, subseed=5, subseed_strength=0.25, count=2,
                       seed=10, embeddings=[str(emb)])
    sha = hashlib.sha256(emb.read_bytes()).hexdigest()[:12]
    # (A1111's comment rule leaves "a sks circle \n": its infotext keeps that text as written, so do we)
    golden = ("a sks circle \n\nNegative prompt: sks square\nSteps: 3, Sampler: Euler a, CFG scale: 2, Seed: 10, "
              "Size: 32x32, Variation seed: 6, Variation seed strength: 0.25, ENSD: 31337, RNG: CPU, "
              f'TI hashes: "sks: {sha}, sks: {sha}", Version: sdadapt ' + __import__("sdadapt").__version__)
    second = out["files"][1]
    with Image.open(second) as image:
        assert image.info["parameters"] == golden
    assert read_png_text(second) == {"parameters": golden}
    assert a1111_parse(golden)["Seed"] == "10"  # (variation strength 0.25: A1111's all_seeds keep the seed)


def test_toy_warning_names_the_embedding_a_bracketed_word_meant(tmp_path):
    from sdadapt.jobs.generate import run_generate

    emb = _toy_embedding(tmp_path / "sks.pt")
    lines = []
    run_generate(prompt="a <sks> circle", out=tmp_path / "w.png", steps=2, embeddings=[str(emb)], log=lines.append)
    hint = [line for line in lines if "<sks>:" in line]
    assert hint and "'sks'" in hint[0] and "without the <>" in hint[0]
    lines.clear()
    run_generate(prompt="a <zzz> circle", out=tmp_path / "v.png", steps=2, embeddings=[str(emb)], log=lines.append)
    assert not [line for line in lines if "without the <>" in line]


def test_lora_hash_rules(tmp_path):
    from sdadapt.jobs.infotext import _lora_hash

    with_meta = _safetensors(tmp_path / "a.safetensors", {"sshs_model_hash": "c" * 64}, payload=b"\x01" * 32)
    without = _safetensors(tmp_path / "b.safetensors", {"x": "y"}, payload=b"\x01" * 32)
    pt = tmp_path / "c.pt"
    pt.write_bytes(b"pickle")
    assert _lora_hash(with_meta) == "c" * 12
    assert _lora_hash(without) == hashlib.sha256(b"\x01" * 32).hexdigest()[:12]  # (after the header: addnet)
    assert _lora_hash(pt) == hashlib.sha256(b"pickle").hexdigest()[:12]
    assert _lora_hash(tmp_path) is None


@pytest.mark.parametrize("hires", [{"width": 1024, "height": None}, {"width": 0, "height": 900}])
def test_hires_resize(hires):
    run = InfotextRun(prompt="x", steps=1, hires={**hires, "scale": None, "steps": 0, "upscaler": "pixel-lanczos",
                                                  "sampler": None, "prompt": "x", "negative": None})  # (the same prompt: not written)
    parsed = a1111_parse(run.for_image(0))
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == (str(hires["width"] or 0),
                                                                   str(hires["height"] or 0))
    assert parsed["Hires upscaler"] == "Lanczos" and "Hires steps" not in parsed and "Hires prompt" not in parsed
