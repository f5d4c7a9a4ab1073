"""Small fidelity fixes against the reference tools.

* kohya's training metadata with a dataset TOML (train_network.py's ``use_user_config`` branch): no
  run-wide ``ss_shuffle_caption`` / ``ss_keep_tokens`` / ``ss_flip_aug`` / ``ss_color_aug`` /
  ``ss_random_crop`` / ``ss_reg_dataset_dirs`` / bucket keys (each dataset's and subset's own are in
  ``ss_datasets``); ``ss_tag_frequency`` keyed by folder name (``set_tag_frequency``: one folder's
  subsets in one dataset add up, a folder in several datasets counted once, the first dataset's);
  each dataset's ``min_bucket_reso`` / ``max_bucket_reso`` the configured values on the bucket step
  (``None`` without buckets).
* ``convert_lora``'s read-back check runs before the output has its final name.
* A1111's ``#`` comment lines (``modules/processing.py`` ``strip_comments``) and one text-encoder
  call per distinct prompt over ``--count`` images.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_inputs import random_png

from sdadapt.cli import main
from sdadapt.errors import WeightFileError
from sdadapt.training.dataset_config import kohya_tag_frequency

ARGS = ["train", "lora", "--network-dim", "2", "--no-prior", "--seed", "5", "--steps", "1"]


def _folder(root: Path, name: str, captions: list[str], seed: int) -> Path:
    """A folder ``root/name`` of 32x32 PNGs, one per caption, each with its ``.txt`` caption."""
    for i, caption in enumerate(captions):
        random_png(root / name / f"{name}{i}.png", seed + i, (32, 32))
        (root / name / f"{name}{i}.txt").write_text(caption)
    return root / name


def _kohya_counts(captions: list[str]) -> dict[str, int]:
    """kohya's ``BaseDataset.set_tag_frequency`` for one subset's captions (transcribed)."""
    out: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                out[tag] = out.get(tag, 0) + 1
    return out


def test_a_dataset_config_writes_kohyas_use_user_config_metadata(tmp_path):
    """Two ``[[datasets]]`` blocks: block 0 has two folders named ``a`` (``x/a``, ``y/a``), block 1
    uses ``x/a`` again and ``b``, with buckets 40..100 on a step of 32. kohya's ss_tag_frequency: ``a``
    is block 0's two folders added up (once: block 1's ``a`` is not added), ``b`` block 1's."""
    xa = ["red, circle", "red, square"]
    ya = ["blue, circle"]
    b = ["green, circle", "green"]
    folders = [_folder(tmp_path / "x", "a", xa, 1), _folder(tmp_path / "y", "a", ya, 10), _folder(tmp_path, "b", b, 20)]
    toml = tmp_path / "datasets.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\nshuffle_caption = true\nkeep_tokens = 1\n'
        "[[datasets]]\nresolution = 32\nbatch_size = 1\nenable_bucket = false\n"
        f'  [[datasets.subsets]]\n  image_dir = "{folders[0]}"\n'
        f'  [[datasets.subsets]]\n  image_dir = "{folders[1]}"\n'
        "[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = true\nmin_bucket_reso = 40\n"
        "max_bucket_reso = 100\nbucket_reso_steps = 32\n"
        f'  [[datasets.subsets]]\n  image_dir = "{folders[0]}"\n'
        f'  [[datasets.subsets]]\n  image_dir = "{folders[2]}"\n')
    out = tmp_path / "out.safetensors"
    assert main([*ARGS, "--dataset-config", str(toml), "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    for key in ("ss_shuffle_caption", "ss_keep_tokens", "ss_flip_aug", "ss_color_aug", "ss_random_crop",
                "ss_reg_dataset_dirs", "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution",
                "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_info"):
        assert key not in meta, key  # (train_network.py writes these without a dataset config only)
    first, second = json.loads(meta["ss_datasets"])
    plus = Counter(_kohya_counts(xa)) + Counter(_kohya_counts(ya))
    assert first["tag_frequency"] == {"a": dict(plus)}
    assert second["tag_frequency"] == {"a": _kohya_counts(xa), "b": _kohya_counts(b)}
    assert json.loads(meta["ss_tag_frequency"]) == {"a": dict(plus), "b": _kohya_counts(b)}
    # kohya's adjust_min_max_bucket_reso_by_steps: 40 -> 32 (down), 100 -> 128 (up); no buckets: None
    assert (first["min_bucket_reso"], first["max_bucket_reso"]) == (None, None)
    assert (second["min_bucket_reso"], second["max_bucket_reso"]) == (32, 128)
    # the subsets' own options are in ss_datasets
    assert [(s["shuffle_caption"], s["keep_tokens"]) for s in first["subsets"]] == [(True, 1), (True, 1)]
    # kohya's ss_dataset_dirs still numbers a repeated folder name
    assert set(json.loads(meta["ss_dataset_dirs"])) == {"a", "a (2)", "a (3)", "b"}


def test_kohya_tag_frequency_keeps_a_folders_first_dataset():
    entries = [{"tag_frequency": {"a": {"x": 2}}}, {"tag_frequency": {"a": {"x": 5, "y": 1}, "b": {"z": 1}}}]
    assert kohya_tag_frequency(entries) == {"a": {"x": 2}, "b": {"z": 1}}


def _kohya_lora(path: Path) -> Path:
    """A one-layer kohya LoRA file (rank 2) at ``path``."""
    from sdadapt.formats import save_kohya

    g = torch.Generator().manual_seed(0)
    layer = "down_blocks.0.attentions.0.proj_in"
    save_kohya(path, {"unet": {f"{layer}.lora_down.weight": torch.randn(2, 8, generator=g),
                               f"{layer}.lora_up.weight": torch.randn(8, 2, generator=g),
                               f"{layer}.alpha": torch.tensor(2.0)}})
    return path


def _failing_check(*args, **kwargs):
    raise WeightFileError("the read-back check failed (forced)")


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft"])
def test_convert_lora_leaves_no_output_when_the_read_back_check_fails(tmp_path, monkeypatch, to):
    """The check runs on a scratch copy: a failed one leaves no file (nor folder) under OUT; with
    ``overwrite`` an existing output is kept byte for byte. A passing check writes OUT as before."""
    from sdadapt.loratools import convert

    source = _kohya_lora(tmp_path / "in.safetensors")
    dtype = torch.float16 if to == "kohya" else None  # (kohya to kohya: a dtype rewrite)
    out = tmp_path / "new" / ("out" if to == "peft" else "out.safetensors")
    with monkeypatch.context() as patch:
        patch.setattr(convert, "delta_difference", _failing_check)
        with pytest.raises(WeightFileError, match="forced"):
            convert.convert_lora(source, out, to=to, dtype=dtype)
        assert not (tmp_path / "new").exists()  # (nor the folder the output would have made)
    report = convert.convert_lora(source, out, to=to, dtype=dtype)
    assert out.exists() and report.max_delta < 1e-2
    before = {p.name: p.read_bytes() for p in ([out] if out.is_file() else sorted(out.iterdir()))}
    with monkeypatch.context() as patch:
        patch.setattr(convert, "delta_difference", _failing_check)
        with pytest.raises(WeightFileError, match="forced"):
            convert.convert_lora(source, out, to=to, dtype=torch.bfloat16, overwrite=True)
    assert {p.name: p.read_bytes() for p in ([out] if out.is_file() else sorted(out.iterdir()))} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # (no temporary left beside it)
    convert.convert_lora(source, out, to=to, dtype=torch.bfloat16, overwrite=True)  # (a passing check replaces it)
    assert {p.name: p.read_bytes() for p in ([out] if out.is_file() else sorted(out.iterdir()))} != before


def _a1111_strip_comments(text: str) -> str:
    """A1111's ``modules/processing_scripts/comments.py`` ``strip_comments`` (transcribed)."""
    import re

    text = re.sub("(^|\n)#[^\n]*(\n|$)", "\n", text)
    text = re.sub("#[^\n]*(\n|$)", "\n", text)
    return text


@pytest.mark.parametrize("text", ["a red circle", "a red circle # was blue", "# idea\na red circle\n# <lora:x:1>",
                                  "x#y#z", "#", "a\n#b\n\n#c\nd # e", "(red:1.2) # [a:b:3]\nAND c", "##\n#\n"])
def test_strip_comments_is_a1111s(text):
    from sdadapt.prompt_schedule import strip_comments

    assert strip_comments(text) == _a1111_strip_comments(text)


def _recording(monkeypatch):
    """Record each written image tensor and count the text encoder's forward calls of ``generate``'s system."""
    import sdadapt.jobs.generate as generate_job
    from sdadapt import images

    written, calls = [], []
    real_write, real_load = images.write_image, generate_job.load_system

    def write_image(path, image, *args, **kwargs):
        written.append(torch.as_tensor(image).clone())
        return real_write(path, image, *args, **kwargs)

    def load_system(*args, **kwargs):
        system = real_load(*args, **kwargs)
        system.text_encoder.register_forward_hook(lambda module, inputs, output: calls.append(1))
        return system

    monkeypatch.setattr(images, "write_image", write_image)
    monkeypatch.setattr(generate_job, "load_system", load_system)
    return written, calls


@pytest.mark.parametrize("prompt", ["a red circle", "[a red circle:a blue square:1]"])
def test_generate_count_encodes_each_text_once_with_the_same_images(tmp_path, monkeypatch, prompt):
    """``--count 3``: the prompt (or the plan's two texts) and the negative prompt encoded once each, not per
    image; every image bit for bit the one ``--count 1`` makes for its seed."""
    from sdadapt.jobs.generate import run_generate

    written, calls = _recording(monkeypatch)
    alone = []
    for i in range(3):
        run_generate(prompt=prompt, negative="a blue square", out=tmp_path / f"one{i}.png", steps=2, seed=4 + i)
        alone.append(len(calls))
        calls.clear()
    assert alone[0] == alone[1] == alone[2] >= 2  # (the prompt's text(s) and the negative)
    single = list(written)
    written.clear()
    run_generate(prompt=prompt, negative="a blue square", out=tmp_path / "n.png", steps=2, seed=4, count=3)
    assert len(calls) == alone[0]  # (before: three times that)
    assert len(written) == 3 and all(torch.equal(a, b) for a, b in zip(written, single))


def test_generate_leaves_comments_out_as_a1111(tmp_path, monkeypatch):
    """A ``#`` comment (and a commented ``<lora:...>`` tag: nothing loads) changes nothing: the image is
    the plain prompt's; ``comments=False`` reads ``#`` as text; a prompt of comments only is refused."""
    from sdadapt.jobs.generate import run_generate

    written, _ = _recording(monkeypatch)
    run_generate(prompt="a red circle", out=tmp_path / "plain.png", steps=2)
    result = run_generate(prompt="a red circle # a blue square\n# <lora:missing:1>", out=tmp_path / "c.png", steps=2,
                          negative="# nothing", lora_dir=tmp_path)
    assert torch.equal(written[0], written[1]) and result["loras"] == []
    run_generate(prompt="a red circle # a blue square", out=tmp_path / "kept.png", steps=2, comments=False)
    assert not torch.equal(written[0], written[2])
    with pytest.raises(ValueError, match="all # comments"):
        run_generate(prompt="# later", out=tmp_path / "none.png", steps=2)


def test_the_prompts_page_comments_example_runs():
    from docs_pages import code_blocks, run_block

    (index,) = [i for i, block in enumerate(code_blocks("prompts.md")) if "strip_comments" in block]
    run_block("prompts.md", index)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_generate_count_encodes_once_on_diffusers_models(tmp_path, monkeypatch, kind):
    """The same on tiny SD1 / SDXL models (the diffusers system's emphasis and prompt-plan paths; SDXL's
    size conditioning is part of the key): ``count=2`` makes the ``count=1`` encoder calls and images."""
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sd1_file, tiny_sdxl_file

    from sdadapt.jobs.generate import run_generate

    import sdadapt.jobs.generate as generate_job

    model = (tiny_sd1_file if kind == "sd1" else tiny_sdxl_file)(tmp_path / f"{kind}.safetensors")
    written, calls = _recording(monkeypatch)
    recorded = generate_job.load_system

    def load_system(*args, **kwargs):  # (the tiny SD1 encoder's final norm has bias 0: its output's mean is ~1e-9,
        system = recorded(*args, **kwargs)  # and A1111's emphasis rescale by original/new mean then overflows to NaN)
        encoder = system.text_encoder
        norm = getattr(getattr(encoder, "text_model", encoder), "final_layer_norm", None)  # (transformers 5: no text_model)
        if norm is not None and norm.bias is not None:
            with torch.no_grad():
                norm.bias.add_(0.5)
        return system

    monkeypatch.setattr(generate_job, "load_system", load_system)
    prompt = "a (red:1.2) [circle:square:1] # comment"
    size = {"width": 32, "height": 32}  # (the smallest size of both tiny models' rules: multiples of 4)
    alone = []
    for i in range(2):
        run_generate(prompt=prompt, negative="blurry", model=str(model), out=tmp_path / f"one{i}.png", steps=2,
                     seed=7 + i, sampler="euler", **size)
        alone.append(len(calls))
        calls.clear()
    single = list(written)
    written.clear()
    run_generate(prompt=prompt, negative="blurry", model=str(model), out=tmp_path / "n.png", steps=2, seed=7,
                 count=2, sampler="euler", **size)
    assert alone[0] == alone[1] > 0 and len(calls) == alone[0]
    assert all(bool(torch.isfinite(image).all()) for image in single)  # (else the comparison says nothing)
    assert all(torch.equal(a, b) for a, b in zip(written, single)) and len(written) == 2


def test_convert_lora_errors_name_out_not_the_scratch_copy(tmp_path, monkeypatch):
    """A check failing on the written file names OUT (the scratch copy is gone when the message is read)."""
    from sdadapt.loratools import convert

    source = _kohya_lora(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"

    real_load = convert.load_lora

    def load_lora(path, *args, **kwargs):  # (the input reads as ever; the written file fails)
        if Path(path).name == out.name:
            raise WeightFileError(f"{path}: unreadable (forced)")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(convert, "load_lora", load_lora)
    with pytest.raises(WeightFileError) as caught:
        convert.convert_lora(source, out, to="diffusers")
    assert str(caught.value) == f"{out}: unreadable (forced)" and not out.exists()
