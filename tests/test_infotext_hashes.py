"""The infotext's "Lora hashes" and "TI hashes" as A1111 (v1.10) builds them, against transcriptions of its code:

- A AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/extra_networks_lora.py ``activate``: ``p.lora_hashes``
  is a dict keyed by the mentioned name with ``:`` and ``,`` removed (``remove_symbols``), set afresh for the first
  pass and kept (added to) by the hires pass (``if not is_hr_pass or not hasattr(p, "lora_hashes")``), written as
  ``", ".join(f"{k}: {v}")`` — a LoRA given twice is listed once, where it first came.
- A modules/sd_hijack_clip.py ``FrozenCLIPEmbedderWithCustomWordsBase.forward``: each call lists the embeddings its
  texts use (``used_embeddings``, a dict filled in the order the chunks' fixes come) and appends the field's previous
  value after its own; processing's ``setup_conds`` encodes the negative prompt first, then the prompt, each through
  every hijacked text encoder (modules/sd_hijack.py: SDXL's FrozenCLIPEmbedderForSDXLWithCustomWords and
  FrozenOpenCLIPEmbedder2WithCustomWords, both on that base) — so duplicates across calls stay.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.formats.files import write_safetensors
from sdadapt.jobs.infotext import InfotextRun, run_infotext

NAMES = ["detail", "style.v2", "add,more"]  # (a tag name cannot hold ":": A1111 splits the tag at it)


def _a1111_lora_hashes(passes: list[list[tuple[str, str]]]) -> str | None:
    """A's ``activate`` run once per pass (the first, then the hires pass) on its loaded networks ``(mentioned
    name, shorthash)``: transcribed."""
    lora_hashes: dict[str, str] = {}
    for loaded in passes:
        for mentioned, short in loaded:
            if short and mentioned:
                lora_hashes[mentioned.translate(str.maketrans("", "", ":,"))] = short
    return ", ".join(f"{k}: {v}" for k, v in lora_hashes.items()) or None


def _a1111_ti_hashes(calls: list[list[tuple[str, str]]]) -> str | None:
    """A's ``forward`` TI block over the encoder calls in order, each with the ``(name, shorthash)`` of the
    embeddings it met in text order: transcribed."""
    field = None
    for met in calls:
        used = dict(met)
        hashes = [f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in used.items() if short]
        if hashes:
            if field:
                hashes.append(field)
            field = ", ".join(hashes)
    return field


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for i, name in enumerate(NAMES):
        path = root / f"file{i}.safetensors"
        write_safetensors(path, {"w": torch.zeros(1)}, {"sshs_model_hash": f"{i}" * 64})
        files[name] = path
    return files


def _run(**kw) -> InfotextRun:
    return InfotextRun(prompt="p", negative="", sampler="euler", steps=2, guidance=7.0, seed=1, width=8, height=8,
                       version="v", **kw)


@settings(max_examples=40, deadline=None)
@given(first=st.lists(st.sampled_from(NAMES), max_size=5), second=st.lists(st.sampled_from(NAMES), max_size=5))
def test_lora_hashes_list_each_name_once_over_both_passes_as_a1111(lora_files, first, second):
    tags = [(f"<lora:{n}:0.5>", lora_files[n]) for n in first] + [(f"<lora:{n}:1>", lora_files[n]) for n in second]
    want = _a1111_lora_hashes([[(n, str(NAMES.index(n)) * 12) for n in first],
                               [(n, str(NAMES.index(n)) * 12) for n in second]])
    assert _run(tag_loras=tags)._fixed["Lora hashes"] == want


def test_a_lora_given_twice_is_listed_once(lora_files):
    tags = [("<lora:detail:1>", lora_files["detail"]), ("<lora:detail:0.4>", lora_files["detail"])]
    assert _run(tag_loras=tags)._fixed["Lora hashes"] == "detail: " + "0" * 12


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tis")
    files = {}
    for name in ("sks", "neg:x", "other"):
        path = root / f"{name.replace(':', '_')}.pt"
        path.write_bytes(name.encode() * 7)
        files[name] = (path, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    return files


@settings(max_examples=40, deadline=None)
@given(pos=st.lists(st.sampled_from(["sks", "neg:x", "other"]), unique=True, max_size=3),
       neg=st.lists(st.sampled_from(["sks", "neg:x", "other"]), unique=True, max_size=3),
       encoders=st.sampled_from([1, 2]))
def test_ti_hashes_are_a1111s_encoder_calls_negative_first(embedding_files, pos, neg, encoders):
    run = _run(embeddings=[(n, embedding_files[n][0]) for n in pos],
               negative_embeddings=[(n, embedding_files[n][0]) for n in neg], text_encoders=encoders)
    calls = [[(n, embedding_files[n][1]) for n in neg]] * encoders + [[(n, embedding_files[n][1]) for n in pos]] * encoders
    assert run._fixed["TI hashes"] == _a1111_ti_hashes(calls)


def _infotext_of(system, texts, embedding_files):
    """run_infotext with a word tokenizer (one id per word) and nothing else set."""
    vocab: dict[str, int] = {}

    def tokenize(text: str) -> list[int]:
        return [vocab.setdefault(word, len(vocab)) for word in text.split()]

    return run_infotext(
        system, texts=texts, sampler="euler", steps=2, guidance=7.0, seed=1, width=8, height=8, schedule=None,
        karras=False, schedule_asked=None, model="toy", vae=None, subseed=None, subseed_strength=0.0,
        seed_resize_from=None, ensd=0, noise=None, clip_skip=1, init_image=None, denoising_strength=0.75, hires=None,
        hires_options={}, mask=None, inpainting=None, inpainting_model=False, mask_options={}, loras=[],
        tag_loras=[], embedding_files=embedding_files, tokenize=tokenize, refiner=None, refiner_switch_at=0.8)


def test_run_lists_embeddings_in_text_order_and_twice_per_text_on_sdxl(tmp_path):
    """The prompt "zz then aa" lists zz before aa whatever the files' order (A's used_embeddings fills in text order),
    and an SDXL base writes each text's list twice (its two hijacked encoders); the refiner (one encoder) once."""
    files = {}
    for name in ("aa", "zz"):
        files[name] = tmp_path / f"{name}.pt"
        files[name].write_bytes(name.encode())
    short = {n: hashlib.sha256(Path(f).read_bytes()).hexdigest()[:12] for n, f in files.items()}
    texts = ("a zz then aa", "aa", None, None)
    sd1 = _infotext_of(SimpleNamespace(), texts, files)._fixed["TI hashes"]
    assert sd1 == f"zz: {short['zz']}, aa: {short['aa']}, aa: {short['aa']}"
    sdxl = _infotext_of(SimpleNamespace(is_sdxl=True), texts, files)._fixed["TI hashes"]
    assert sdxl == _a1111_ti_hashes([[("aa", short["aa"])]] * 2 + [[("zz", short["zz"]), ("aa", short["aa"])]] * 2)
    assert sdxl.count("zz") == 2 and sdxl.count("aa") == 4
    refiner = _infotext_of(SimpleNamespace(is_sdxl=True, is_refiner=True), texts, files)._fixed["TI hashes"]
    assert refiner == sd1


def test_generate_lists_the_first_and_the_hires_passs_loras_once_each(tmp_path, monkeypatch):
    """run_generate (the tiny Playground-like SDXL file of tests/test_playground_edm.py: the toy has no hires pass)
    with "<lora:ink:1> <lora:ink:0.5>" and a hires prompt naming dot: "Lora hashes" is "ink: H, dot: H'" — ink once,
    then the hires pass's dot (A's p.lora_hashes kept over the hires pass). The merges are stubbed: only the names
    and files reach the infotext."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from test_infotext import a1111_parse
    from test_playground_edm import playground_files

    import sdadapt.jobs.generate as job
    from sdadapt.images import read_png_text

    root = tmp_path / "loras"
    root.mkdir()
    for i, name in enumerate(("ink", "dot")):
        write_safetensors(root / f"{name}.safetensors", {"w": torch.zeros(1)}, {"sshs_model_hash": f"{i + 5}" * 64})
    monkeypatch.setattr(job, "_apply_lora_parts", lambda *args, **kwargs: ({"layers": 1}, []))
    out = tmp_path / "o.png"
    model = playground_files(tmp_path)[0]
    job.run_generate(model=str(model), prompt="a cat <lora:ink:1> <lora:ink:0.5>", hires_prompt="a cat <lora:dot:1>",
                     out=out, steps=1, width=16, height=16, hires_scale=2.0, hires_steps=1, lora_dir=root)
    fields = a1111_parse(read_png_text(out)["parameters"])
    assert fields["Lora hashes"] == f"ink: {'5' * 12}, dot: {'6' * 12}"
