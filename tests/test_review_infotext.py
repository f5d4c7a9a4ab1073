"""Review of generate's A1111 infotext (sdadapt.jobs.infotext): the rules the first tests left open, each as A1111
v1.10 writes it — modules/infotext_utils.py ``quote`` (a newline alone quotes too), modules/extra_networks.py
``parse_prompt`` (``<lora:NAME>`` without a multiplier names NAME), modules/processing.py ``create_infotext`` and
``StableDiffusionProcessingTxt2Img.init`` (a hires sampler / schedule / negative prompt equal to the first pass's is
not written), modules/sd_samplers_kdiffusion.py ``get_sigmas`` ("Automatic" that resolves to a scheduler writes
that scheduler's label)."""

from __future__ import annotations

import json
import re

from sdadapt.jobs.infotext import InfotextRun, quote

#: A1111's field pattern (modules/infotext_utils.py ``re_param_code``), quoted values JSON-unquoted as its ``unquote``
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _fields(run: InfotextRun, i: int = 0) -> dict[str, str]:
    """The last line's ``Key: value`` fields as A1111's parse_generation_parameters reads them."""
    line = run.for_image(i).split("\n")[-1]
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _RE_PARAM.findall(line)}


def test_a_newline_alone_is_quoted():
    assert quote("a\nb") == '"a\\nb"' and quote("ab") == "ab"


def test_a_lora_tag_without_multiplier_names_the_file(tmp_path):
    lora = tmp_path / "detail.pt"
    lora.write_bytes(b"lora")
    fields = _fields(InfotextRun(prompt="x <lora:detail>", steps=1, tag_loras=[("<lora:detail>", lora)]))
    assert fields["Lora hashes"].startswith("detail: ")


def test_automatic_writes_the_schedule_it_resolved_to():
    asked = dict(prompt="x", steps=1, sampler="dpmsolver++", schedule_asked=True)
    assert _fields(InfotextRun(schedule="karras", **asked))["Schedule type"] == "Karras"
    assert _fields(InfotextRun(schedule="uniform", **asked))["Schedule type"] == "Automatic"
    assert _fields(InfotextRun(prompt="x", steps=1, schedule="uniform"))["Schedule type"] == "Uniform"


def _hires(**given):
    return {"scale": 2.0, "steps": 0, "upscaler": "latent", "sampler": None, "prompt": None, "negative": None, **given}


def test_hires_fields_equal_to_the_first_passs_are_left_out():
    base = dict(prompt="p", negative="n", steps=1, sampler="euler_a", schedule="karras")
    same = _fields(InfotextRun(**base, hires=_hires(sampler="euler_a", schedule="karras", prompt="p", negative="n")))
    assert not {"Hires sampler", "Hires schedule type", "Hires prompt", "Hires negative prompt"} & set(same)
    assert same["Hires upscale"] == "2" and same["Hires upscaler"] == "Latent"
    other = _fields(InfotextRun(**base, hires=_hires(sampler="dpmsolver++", schedule="exponential", prompt="q",
                                                     negative="m")))
    assert [other[k] for k in ("Hires sampler", "Hires prompt", "Hires negative prompt", "Hires schedule type")] == [
        "DPM++ 2M", "q", "m", "Exponential"]


def test_mask_fields_follow_what_the_run_did():
    """No blur: no "Mask blur"; a mask that was not applied (an inpainting model's own conditioning only): no "Masked
    content"; no region: no "Inpaint area"."""
    run = InfotextRun(prompt="x", steps=1, denoising_strength=0.5,
                      mask={"blur": 0, "invert": False, "fill": "fill", "padding": 32, "applied": False, "region": False})
    fields = _fields(run)
    assert not {"Mask blur", "Masked content", "Mask mode", "Inpaint area", "Masked area padding"} & set(fields)
    applied = _fields(InfotextRun(prompt="x", steps=1, mask={"blur": 2.5, "fill": "fill", "applied": True}))
    assert applied["Mask blur"] == "2.5" and applied["Masked content"] == "fill"


def test_per_image_seeds_and_fields_left_out_by_default(tmp_path):
    run = InfotextRun(prompt="x", steps=1, seed=5, subseed=9, subseed_strength=0.5, clip_skip=1)
    assert [_fields(run, i)["Variation seed"] for i in range(3)] == ["9", "10", "11"] and _fields(run)["Seed"] == "5"
    assert [_fields(InfotextRun(prompt="x", steps=1, seed=5), i)["Seed"] for i in range(3)] == ["5", "6", "7"]
    assert "Clip skip" not in _fields(run) and _fields(InfotextRun(prompt="x", steps=1, clip_skip=2))["Clip skip"] == "2"
    assert "Variation seed" not in _fields(InfotextRun(prompt="x", steps=1, subseed=9))


def test_a_folder_model_given_as_dot_is_named_by_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert _fields(InfotextRun(prompt="x", steps=1, model="."))["Model"] == "my-model"


def _run(tmp_path, **given):
    """run_infotext with a stand-in system (its sample's guidance default 5.0) and a word tokenizer."""
    from sdadapt.jobs.infotext import run_infotext

    class System:
        def sample(self, prompts, *, guidance: float = 5.0):
            raise AssertionError("not called")

    words = {}

    def tokenize(text):
        return [words.setdefault(w, len(words) + 1) for w in text.split()]

    options = dict(texts=("a cat", "", None, None), sampler="euler", steps=4, guidance=None, seed=1, width=64,
                   height=64, schedule=None, karras=False, schedule_asked=None, model="toy", vae=None, subseed=None,
                   subseed_strength=0.0, seed_resize_from=None, ensd=0, noise=None, clip_skip=1, init_image=None,
                   denoising_strength=0.75, hires=None, hires_options={}, mask=None, inpainting=None,
                   inpainting_model=False, mask_options={}, loras=[], tag_loras=[], embedding_files={},
                   tokenize=tokenize, refiner=None, refiner_switch_at=0.8)
    options.update(given)
    return _fields(run_infotext(System(), **options))


def test_run_infotext_maps_generates_options_to_a1111s_fields(tmp_path):
    """The model's default CFG; embeddings listed only when a text uses them (A1111's used_embeddings); the hires
    pass's denoising strength; an inpainting model's "Conditional mask weight"; an init image's strength; the mask
    fields as the run applied them."""
    emb = tmp_path / "sks.pt"
    emb.write_bytes(b"e")
    other = tmp_path / "other.pt"
    other.write_bytes(b"o")
    fields = _run(tmp_path, texts=("a sks cat", "", None, None), embedding_files={"sks": emb, "other": other})
    assert fields["CFG scale"] == "5" and fields["TI hashes"].startswith("sks: ") and "other" not in fields["TI hashes"]
    assert "Denoising strength" not in fields and "Conditional mask weight" not in fields
    hires = _run(tmp_path, hires=object(), hires_options={"scale": 2.0, "steps": 0, "upscaler": "latent",
                                                          "denoising": 0.4})
    assert hires["Denoising strength"] == "0.4"
    img2img = _run(tmp_path, init_image="init.png", denoising_strength=0.6, inpainting_model=True,
                   mask_options={"weight": 0.5})
    assert img2img["Denoising strength"] == "0.6" and img2img["Conditional mask weight"] == "0.5"
    masked = dict(init_image="init.png", mask="mask.png", mask_options={"blur": 4, "fill": "fill", "padding": 32})
    applied = _run(tmp_path, inpainting=SimpleRegion(None), **masked)
    assert applied["Masked content"] == "fill" and "Inpaint area" not in applied
    region = _run(tmp_path, inpainting=SimpleRegion((0, 0, 8, 8)), **masked)
    assert region["Inpaint area"] == "Only masked" and region["Masked area padding"] == "32"
    assert "Masked content" not in _run(tmp_path, inpainting=None, **masked)


class SimpleRegion:
    def __init__(self, region):
        self.region = region


def test_a_files_sha256_and_its_after_header_hash_are_kept_apart(tmp_path):
    """The per-run cache holds both hashes of one file (a safetensors LoRA that is also hashed whole)."""
    import hashlib
    import json
    import struct

    from sdadapt.jobs.infotext import file_sha256

    header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"abcd"
    path = tmp_path / "l.safetensors"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(path, after_header=True) == hashlib.sha256(b"abcd").hexdigest()
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
