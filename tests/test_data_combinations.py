"""The data path of ``train`` / ``fit`` with several kohya options at once (each was tested alone
elsewhere): flips, loss masks, pixel augmentations, class images (``--reg-data-dir``), cached text
conditioning, weighted and long captions, the per-epoch / per-step caption options, and resume.

kohya keeps the training and the class images in one dataset (``DreamBoothDataset``), so a class
image is flipped (``flip_aug``), masked (``alpha_mask``), augmented and captioned
(``process_caption``: prefix/suffix, dropout every n epochs with ``current_epoch``, token warm-up
with ``current_step``) exactly as a training image; sdadapt draws the class batch as a second
forward but with the same rules (:mod:`sdadapt.training.reg_data`).
"""

from __future__ import annotations

import importlib
import json
import math
import random

import numpy as np
import pytest
import torch
from train_inputs import random_png

from sdadapt.cli import main
from sdadapt.formats.files import read_safetensors
from sdadapt.images import encode_png
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.training.data import (
    CaptionOptions,
    Dataset,
    encode_buckets,
    find_images,
    plan_dataset,
)
from sdadapt.training.loss_masks import LossMaskSource
from sdadapt.training.step import StepConfig


def _rgba(path, seed: int, size=(32, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.random.default_rng(seed).integers(0, 256, size=(*size, 4), dtype=np.uint8)))


@pytest.fixture()
def rgba_data(tmp_path):
    """Three RGBA training images (32x40: a 4 px crop room at resolution 32, no buckets) with tag captions,
    and a kohya reg folder ``2_dog/`` of two RGBA class images (one captioned)."""
    images = tmp_path / "imgs"
    for i in range(3):
        _rgba(images / f"{i}.png", i)
        (images / f"{i}.txt").write_text(f"a red circle, big, shiny, n{i}")
    reg = tmp_path / "reg"
    _rgba(reg / "2_dog" / "r0.png", 10)
    _rgba(reg / "2_dog" / "r1.png", 11)
    (reg / "2_dog" / "r1.txt").write_text("a brown dog, small")
    return images, reg


def _same_files(a, b) -> bool:
    x, y = read_safetensors(a)[0], read_safetensors(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _train(tmp_path, name, images, *flags, steps: int = 3) -> int:
    """A toy LoRA run of ``steps`` steps (3: with ``--save-every-n-steps 2``, a state at step 2 and one
    step after it for a resumed run to redo)."""
    return main(["train", "lora", "--images", str(images), "--steps", str(steps), "--batch-size", "2", "--network-dim",
                 "2", "--no-bucket", "-q", "-o", str(tmp_path / f"{name}.safetensors"), *map(str, flags)])


def _state_step(state) -> int:
    return json.loads((state / "run.json").read_text())["step"]


@pytest.fixture()
def prior_batches(monkeypatch):
    """The class batches (``prior=(batch, weight)``) ``fit`` hands to ``train_step``, one per step."""
    fitting = importlib.import_module("sdadapt.methods.fit")
    seen: list[dict] = []
    real = fitting.train_step

    def spy(model, batch, *, prior=None, **kwargs):
        seen.append(prior[0] if prior is not None else None)
        return real(model, batch, prior=prior, **kwargs)

    monkeypatch.setattr(fitting, "train_step", spy)
    return seen


# ------------------------------------------------------------ flip_aug × alpha_mask × reg × resume
def test_class_images_are_flipped_and_masked_as_their_latents(rgba_data, prior_batches):
    """Each class-batch row's loss mask is its own image's alpha, mirrored exactly when the row's
    latents are the mirrored image's (the flip coin of the class batch decides both)."""
    images, reg_root = rgba_data
    from sdadapt.training.reg_data import find_reg_images

    system = build_toy(seed=1)
    records, _ = find_images(images)
    plan_dataset(records, resolution=32, buckets=False)
    dataset = Dataset(records, flip=True, loss_masks=LossMaskSource())
    reg = find_reg_images(reg_root, train_samples=dataset.samples_per_epoch)
    plan_dataset(reg.records, resolution=32, buckets=False)
    reg_data = Dataset(reg.records, flip=True, loss_masks=LossMaskSource())
    for data in (dataset, reg_data):
        encode_buckets(data, system.encode_images)
    fit(system, METHODS["lora"].adapt(system, seed=1), dataset, prior=(reg_data, 0.5),
        config=FitConfig(steps=3, batch_size=2, warmup_steps=0))  # (3 steps: both flip sides drawn)
    (bucket,) = reg_data.latents
    pairs = {(k, f): ((reg_data.latents_flipped if f else reg_data.latents)[bucket][k], reg_data.masks[bucket][k])
             for k in range(len(reg_data.members[bucket])) for f in (False, True)}
    sides = set()
    assert len(prior_batches) == 3
    for batch in prior_batches:
        assert batch["loss_mask"].shape == (batch["latents"].shape[0], 1, 16, 16)
        for row, mask in zip(batch["latents"], batch["loss_mask"], strict=True):
            (key,) = [key for key, (lat, _) in pairs.items() if torch.equal(row, lat)]
            plain = pairs[key][1]
            assert torch.equal(mask, torch.flip(plain, dims=[2]) if key[1] else plain)
            sides.add(key[1])
    assert sides == {False, True}
    assert any(not torch.equal(m, torch.flip(m, dims=[2])) for m in reg_data.masks[bucket])  # a flip shows


def test_flips_masks_and_class_images_resume_bit_for_bit(rgba_data, tmp_path, prior_batches):
    images, reg = rgba_data
    flags = ["--reg-data-dir", reg, "--alpha-mask", "--flip-aug", "--prior-weight", "0.5"]
    assert _train(tmp_path, "a", images, *flags, "--save-every-n-steps", "2") == 0
    assert _state_step(tmp_path / "a-state") == 2  # (the resumed run redoes step 3)
    assert _train(tmp_path, "b", images, *flags, "--resume", tmp_path / "a-state") == 0
    assert _same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    # mask images (--masked-loss --conditioning-data-dir) name the training images: class images train unmasked
    prior_batches.clear()
    assert _train(tmp_path, "c", images, "--reg-data-dir", reg, "--masked-loss", "--conditioning-data-dir", images,
                  "--flip-aug", steps=2) == 0
    assert len(prior_batches) == 2 and all("loss_mask" not in b for b in prior_batches)


# ------------------------------------------------ random_crop/color_aug × reg × masks × cached text
def test_augmented_class_images_with_masks_and_cached_text_train_the_uncached_bits_and_resume(rgba_data, tmp_path,
                                                                                              prior_batches):
    """Pixel augmentations (nothing cached: each use encoded) on both image sets, their alpha masks
    cropped at each window, and the text encoder's outputs cached: the same file as without the text
    cache (the cache only moves where the conditioning is computed), and a resumed run the same file."""
    images, reg = rgba_data
    flags = ["--reg-data-dir", reg, "--alpha-mask", "--random-crop", "--color-aug", "--flip-aug", "--no-text-encoder",
             "--caption-dropout-rate", "0.3"]
    assert _train(tmp_path, "plain", images, *flags) == 0
    assert all(b is not None and b["loss_mask"].shape == (b["latents"].shape[0], 1, 16, 16) for b in prior_batches)
    assert _train(tmp_path, "cached", images, *flags, "--cache-text-encoder-outputs", "--save-every-n-steps", "2") == 0
    assert _same_files(tmp_path / "plain.safetensors", tmp_path / "cached.safetensors")
    assert _state_step(tmp_path / "cached-state") == 2
    assert _train(tmp_path, "resumed", images, *flags, "--cache-text-encoder-outputs",
                  "--resume", tmp_path / "cached-state") == 0
    assert _same_files(tmp_path / "cached.safetensors", tmp_path / "resumed.safetensors")


# ------------------------------------------- dataset_config subsets × cached text × weighted captions
def test_a_subsets_changing_captions_and_weighted_captions_refuse_the_text_cache_before_the_model_loads(
        rgba_data, tmp_path, capsys, monkeypatch):
    images, reg = rgba_data
    jobs = importlib.import_module("sdadapt.jobs.train")
    monkeypatch.setattr(jobs, "load_system", lambda *a, **k: pytest.fail("the model was loaded"))
    for is_reg, key in ((False, "shuffle_caption = true"), (True, "caption_tag_dropout_rate = 0.2"),
                        (False, "enable_wildcard = true")):
        toml = tmp_path / "dataset.toml"
        toml.write_text(f"""
[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "{images}"
  {'' if is_reg else key}
  [[datasets.subsets]]
  image_dir = "{reg / '2_dog'}"
  is_reg = true
  class_tokens = "a dog"
  {key if is_reg else ''}
""")
        assert main(["train", "lora", "--dataset-config", str(toml), "--cache-text-encoder-outputs", "--no-text-encoder",
                     "-o", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert f"subsets[{1 if is_reg else 0}]" in err and "--cache-text-encoder-outputs" in err, err
    assert _train(tmp_path, "w", images, "--weighted-captions", "--cache-text-encoder-outputs", "--no-text-encoder") == 2
    assert "--weighted-captions" in capsys.readouterr().err
    with pytest.raises(ValueError, match="weighted_captions"):
        FitConfig(weighted_captions=True, cache_text_encoder_outputs=True)


# ---------------------------------------- weighted captions × 225 tokens × SDXL × class images
def test_weighted_long_sdxl_captions_weigh_the_class_captions_and_not_the_generated_class_prompt(tmp_path, monkeypatch):
    """kohya reads every caption of its one dataset with the weights (class captions too). sdadapt's
    generated class images are made from the class prompt as written (generation reads no weights),
    so their forward conditions on the plain ids of that prompt, as the images were made."""
    from tiny_systems import tiny_diffusers_system

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.training.data import records_from_tensors

    system = tiny_diffusers_system(tmp_path, max_token_length=225, sdxl=True)
    seen: list = []
    real = DiffusersSystem.condition
    monkeypatch.setattr(DiffusersSystem, "condition", lambda self, ids: (seen.append(ids), real(self, ids))[1])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    long_tail = " ".join(["ab"] * 90)  # 180 tokens: the third 75-token window
    dataset = Dataset(records_from_tensors(pixels, [f"a (red:1.3) cat {long_tail}", f"[dim] dog {long_tail} (end:1.5)"]))
    reg = Dataset(records_from_tensors(pixels.flip(0), ["a (dog:1.2)", "a (dog:1.2)"]))
    encode_buckets(dataset, system.encode_images, images=pixels)
    encode_buckets(reg, system.encode_images, images=pixels.flip(0))
    config = FitConfig(steps=2, batch_size=2, learning_rate=1e-3, warmup_steps=0, weighted_captions=True)
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    fit(system, adaptation, dataset, prior=(reg, 0.5), config=config)
    adaptation.remove()
    weighted = [ids for ids in seen if isinstance(ids, dict) and "weights" in ids]
    assert len(weighted) == 4  # each step: the batch, then the class batch
    for batch, class_batch in zip(weighted[0::2], weighted[1::2]):
        assert batch["ids"].shape[-1] == 227 and class_batch["ids"].shape[-1] == 227  # 3 windows: <BOS> 225 <EOS>
        assert {round(w, 4) for w in batch["weights"].flatten().tolist()} == {1.0, 1.3, 1.5, round(1 / 1.1, 4)}
        assert {round(w, 4) for w in class_batch["weights"].flatten().tolist()} == {1.0, 1.2}
        assert batch["time_ids"].shape == (2, 6) and class_batch["time_ids"].shape == (2, 6)
    # generated class images (class prompt tensors): the prompt's plain ids, as the images were generated
    seen.clear()
    prompt = "a (dog:1.2)"
    fit(system, METHODS["lora"].adapt(system, seed=1, text_encoder=False), dataset,
        prior=(pixels, [prompt, prompt], 0.5), config=config)
    plain = [ids for ids in seen if not (isinstance(ids, dict) and "weights" in ids)]
    assert len(plain) == 2 and all(torch.equal(p["ids"].cpu(), system.tokenize([prompt] * 2)) for p in plain)


def test_sdxl_long_captions_with_flipped_class_images_cache_to_the_uncached_bits(tmp_path):
    """SDXL, 225-token captions, class images (flipped, their own sizes) and a caption dropout: the
    cached run (each batch's time_ids put back beside the cached rows, class batch included) trains
    the uncached run's bits."""
    from test_cache_text_encoder_outputs import _fit, _same
    from tiny_systems import tiny_diffusers_system

    from sdadapt.training.data import records_from_tensors

    def run(cache: bool):
        system = tiny_diffusers_system(tmp_path / str(cache), max_token_length=225, sdxl=True)
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        long_tail = " ".join(["ab"] * 80)
        records = records_from_tensors(pixels, [f"a cat {long_tail}", f"a dog {long_tail}"])
        class_records = records_from_tensors(pixels.flip(0), ["a dog", "a dog, sitting"])
        for r, size in zip([*records, *class_records], [(20, 24), (16, 30), (40, 16), (24, 20)]):
            r.size, r.resized, r.crop = size, (18, 22), (1, 2)  # (mirrored: crop left 22 - 16 - 2 = 4)
        dataset = Dataset(records, captions=CaptionOptions(dropout=0.3), flip=True)
        reg = Dataset(class_records, captions=CaptionOptions(dropout=0.3), flip=True)
        encode_buckets(dataset, system.encode_images, images=pixels)
        encode_buckets(reg, system.encode_images, images=pixels.flip(0))
        adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
        return _fit(system, adaptation, dataset, cache=cache, prior=(reg, 0.5), steps=3)

    _same(run(False), run(True))


# ----------------------------------- caption_dropout_every_n_epochs × token warm-up × reg × resume
def test_class_captions_use_the_training_epoch_and_step(tmp_path, monkeypatch):
    """kohya's ``process_caption`` reads the dataset's ``current_epoch`` (from 1; dropped when
    ``current_epoch % n == 0``) and ``current_step`` (warm-up: ``⌊step·(len − min)/warmup⌋ + min`` tags):
    one dataset, so the class captions follow the training images' epoch and optimiser step."""
    system = build_toy(seed=1)
    texts: list[list[str]] = []
    real = system.tokenize
    monkeypatch.setattr(system, "tokenize", lambda captions: (texts.append(list(captions)), real(captions))[1])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    from sdadapt.training.data import records_from_tensors

    options = CaptionOptions(dropout_every_n_epochs=2, token_warmup_steps=4, token_warmup_min=1)
    dataset = Dataset(records_from_tensors(pixels, ["t0, t1, t2, t3, t4"] * 4), captions=options)
    reg = Dataset(records_from_tensors(pixels[:1], ["c0, c1, c2, c3, c4, c5, c6"]), captions=options)
    encode_buckets(dataset, system.encode_images, images=pixels)
    encode_buckets(reg, system.encode_images, images=pixels[:1])
    # 2 micro-batches per epoch (4 images, batch 2): epoch = micro // 2 + 1, step = micro // 2; 5 steps see dropped
    # epochs (2, 4), the warm-up's start (step 0), middle (step 2) and its end (step 4: every tag)
    steps, accumulation = 5, 2
    step_config = StepConfig(accumulation_steps=accumulation)
    fit(system, METHODS["lora"].adapt(system, seed=1), dataset, prior=(reg, 0.5),
        config=FitConfig(steps=steps, batch_size=2, warmup_steps=0, step=step_config))
    texts = [t for t in texts if len(t) <= 2]  # (the per-micro-batch calls: batch, then class batch)
    assert len(texts) == 2 * steps * accumulation
    for micro in range(steps * accumulation):
        batch, class_batch = texts[2 * micro], texts[2 * micro + 1]
        epoch, step = micro // 2 + 1, micro // accumulation
        if epoch % 2 == 0:
            assert batch == ["", ""] and class_batch == [""], (micro, batch, class_batch)
            continue
        for caption, tags in ((batch[0], 5), (class_batch[0], 7)):
            want = tags if step >= 4 else math.floor(step * (tags - 1) / 4) + 1
            assert len(caption.split(", ")) == want, (micro, caption)


def test_class_caption_epochs_and_warm_up_resume_bit_for_bit(rgba_data, tmp_path):
    images, reg = rgba_data
    flags = ["--reg-data-dir", reg, "--caption-dropout-every-n-epochs", "2", "--token-warmup-step", "3",
             "--gradient-accumulation-steps", "2", "--steps", "3"]
    assert _train(tmp_path, "a", images, *flags, "--save-every-n-steps", "1") == 0
    assert _train(tmp_path, "b", images, *flags, "--resume", tmp_path / "a-state") == 0
    assert _same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


# ------------------------- in_json × enable_wildcard × caption_prefix/suffix × keep_tokens_separator
def _kohya_process_caption(caption: str, rng: random.Random, *, prefix: str, suffix: str, separator: str = ",",
                           keep: str = "|||") -> str:
    """kohya's ``BaseDataset.process_caption`` (shuffle on, no dropout) by hand: prefix/suffix, wildcards
    (a line, then each ``{a|b}``), the tags before the first ``keep`` fixed, after a second one fixed at
    the end, the rest shuffled, joined with ", "."""
    import re

    caption = f"{prefix} {caption} {suffix}"
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    head, flex = caption.split(keep, 1)
    tail = ""
    if keep in flex:
        flex, tail = flex.split(keep, 1)

    def split(text):
        return [t.strip() for t in text.split(separator) if t.strip()]

    middle = split(flex)
    rng.shuffle(middle)
    return ", ".join(split(head) + middle + split(tail))


def test_in_json_wildcards_prefix_suffix_and_kept_tags(tmp_path):
    """A fine-tuning metadata caption of two lines with wildcards, tags appended to each line (kohya's
    ``enable_wildcard`` in ``FineTuningDataset``), prefix and suffix, and ``keep_tokens_separator``
    with shuffling: each draw is one of kohya's possible captions, and every one of them is drawn."""
    from sdadapt.jobs.train import TrainOptions, _data_config_fallback
    from sdadapt.training.dataset_config import dataset_records, in_json_config

    images = tmp_path / "imgs"
    random_png(images / "a.png", 1)
    caption = "sks ||| {red|blue} circle, big ||| end\nsks ||| square, {small|tiny} ||| end"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": caption, "tags": "t1, t2"}}))
    fallback = _data_config_fallback(TrainOptions(images=str(images), enable_wildcard=True))
    (record,), _, _, _ = dataset_records(in_json_config(meta, image_dir=images, fallback=fallback))
    # the tags go after each line (before the line's ||| end part stays the suffix: kohya appends them to the line)
    assert record.caption == "\n".join(f"{line},t1, t2" for line in caption.split("\n"))
    options = CaptionOptions(shuffle=True, wildcards=True, prefix="pre", suffix="post", keep_tokens_separator="|||")
    reference = {_kohya_process_caption(record.caption, random.Random(seed), prefix="pre", suffix="post")
                 for seed in range(400)}
    drawn = {options.apply(record.caption, random.Random(seed)) for seed in range(400)}
    assert drawn == reference and len(drawn) == 8  # 2 lines x 2 choices x 2 orders
    for text in drawn:  # (as kohya: the prefix joins the first line, the suffix the last, before a line is drawn)
        tags = text.split(", ")
        assert "|||" not in text and (tags[0], tags[-3:]) in (("pre sks", ["end", "t1", "t2"]),
                                                             ("sks", ["end", "t1", "t2 post"]))


# ------------------------------- save_last_n_steps × save_state_on_train_end × Ctrl-C × resume
def test_an_interrupted_rotating_run_resumes_to_the_uninterrupted_files(tmp_path, capsys, monkeypatch):
    """Ctrl-C after step 5 of 7 (saves every 2 steps, the last 3 steps' kept, the state at the end):
    the interrupt's save stays outside the rotation, the resumed run keeps rotating the first run's
    saves (its step-6 save removes step 2's), ends with the uninterrupted run's weights and periodic
    files, and its state is at step 7."""
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption="a red circle, big, shiny")
    fit_module = importlib.import_module("sdadapt.methods.fit")
    real = fit_module.train_step
    flags = ["--steps", "7", "--save-every-n-steps", "2", "--save-last-n-steps", "3", "--save-state-on-train-end",
             "--shuffle-caption", "--flip-aug"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    straight.mkdir(), cut.mkdir()
    assert main(["train", "lora", "--images", str(images), "--batch-size", "2", "--no-prior", "-q", *flags,
                 "-o", str(straight / "o.safetensors")]) == 0
    calls: list[int] = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", interrupted)
    args = ["train", "lora", "--images", str(images), "--batch-size", "2", "--no-prior", "-q", *flags,
            "-o", str(cut / "o.safetensors")]
    assert main(args) == 130
    assert "interrupted after step 5 of 7" in capsys.readouterr().err
    assert sorted(p.name for p in cut.glob("o-step*.safetensors")) == [
        "o-step000002.safetensors", "o-step000004.safetensors", "o-step000005.safetensors"]  # 5: the interrupt's
    assert json.loads((cut / "o-state" / "run.json").read_text())["step"] == 5
    monkeypatch.setattr(fit_module, "train_step", real)
    assert main([*args, "--resume", str(cut / "o-state")]) == 0
    kept = sorted(p.name for p in straight.glob("o-step*.safetensors"))
    assert kept == ["o-step000004.safetensors", "o-step000006.safetensors"]  # (step 2's rotated out)
    assert sorted(p.name for p in cut.glob("o-step*.safetensors")) == sorted([*kept, "o-step000005.safetensors"])
    for name in [*kept, "o.safetensors"]:
        assert _same_files(straight / name, cut / name), name
    record = json.loads((cut / "o-state" / "run.json").read_text())
    want = json.loads((straight / "o-state" / "run.json").read_text())
    assert record["step"] == want["step"] == 7
    assert [(s["kind"], s["number"]) for s in record["periodic_saves"]] == [(s["kind"], s["number"]) for s in want["periodic_saves"]]


# ------------------------------------- network_weights × base_weights × dim_from_weights × block dims
def test_a_block_dims_file_restarts_on_merged_base_weights(tmp_path):
    """A file trained with kohya's ``block_dims`` (some blocks rank 0), restarted with
    ``--network-weights`` on a model with ``--base-weights`` merged: with ``--dim-from-weights`` the
    file's own modules and ranks, or with the same ``block_dims``; both save the file's tensors back
    unchanged, leave the merge in place while training and undo it to the original bits. The file's
    ranks with other block dims, or block dims beside ``--dim-from-weights``, are refused by name."""
    from test_loraplus_and_base_weights import _random_lora_file, _state, _system

    from sdadapt.errors import InputError
    from sdadapt.methods.lora import prepare_lora

    system = _system()
    base = tmp_path / "base.safetensors"
    _random_lora_file(system, base, seed=3)
    dims = ["0"] * 25
    dims[1], dims[2], dims[12], dims[18] = "2", "3", "1", "4"  # (the tiny UNet's blocks with modules)
    blocks = ",".join(dims)
    first = prepare_lora(system, rank=8, block_dims=blocks, text_encoder=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in first.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    start = first.save(tmp_path / "blocks.safetensors")
    first.remove()
    file_tensors = read_safetensors(start)[0]
    original = {c: _state(getattr(system, c)) for c in ("unet", "text_encoder")}
    merged_only = prepare_lora(system, rank=1, text_encoder=False, base_weights=[str(base)])
    merged = {k: v for k, v in _state(system.unet).items() if k in original["unet"]}  # (not the adapter's own)
    merged_only.remove()
    for kwargs in ({"dim_from_weights": True}, {"rank": 8, "block_dims": blocks}):
        adaptation = prepare_lora(system, text_encoder=False, network_weights=str(start), base_weights=[str(base)],
                                  **kwargs)
        try:
            base_now = {k: v for k, v in system.unet.state_dict().items() if k in merged}
            assert base_now.keys() == merged.keys() and all(torch.equal(base_now[k], merged[k]) for k in merged), kwargs
            assert any(not torch.equal(merged[k], original["unet"][k]) for k in merged)
            saved = read_safetensors(adaptation.save(tmp_path / "again.safetensors"))[0]
            assert saved.keys() == file_tensors.keys() and all(torch.equal(saved[k], file_tensors[k]) for k in saved), kwargs
        finally:
            adaptation.remove()
        for component, state in original.items():
            assert all(torch.equal(v, state[k]) for k, v in getattr(system, component).state_dict().items()), kwargs
    with pytest.raises(InputError, match="block_dims.*not used with --dim-from-weights"):
        prepare_lora(system, text_encoder=False, network_weights=str(start), dim_from_weights=True, block_dims=blocks)
    other = list(dims)
    other[2] = "2"
    with pytest.raises(InputError, match="has rank 3, --network-dim gives rank 2.*with block_dims in --network-args: "
                                          "give this module's block that rank there"):
        prepare_lora(system, rank=8, text_encoder=False, network_weights=str(start), block_dims=",".join(other),
                     base_weights=[str(base)])
    for component, state in original.items():  # (a refused start leaves no merge behind)
        assert all(torch.equal(v, state[k]) for k, v in getattr(system, component).state_dict().items())


def test_resuming_with_other_generated_class_images_is_refused(tmp_path, capsys):
    """The class batch's forward draws its own noise: a run resumed with prior preservation turned
    off (or on), or with another class prompt or count, is not the saved run's continuation."""
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3)
    # (one class image, 3 steps with the state at step 2: each run samples one class image, the resumed run one step)
    base = ["train", "lora", "--images", str(images), "--steps", "3", "--batch-size", "2", "--network-dim", "2", "-q"]
    assert main([*base, "--class-images", "1", "--save-every-n-steps", "2", "-o", str(tmp_path / "a.safetensors")]) == 0
    for flags, named in ((["--no-prior"], "prior True (now False)"),
                         (["--class-images", "1", "--class-prompt", "a blue square"], "class_prompt None (now 'a blue square')"),
                         (["--class-images", "2"], "class_images 1 (now 2)")):
        assert main([*base, *flags, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")]) == 2
        assert named in capsys.readouterr().err
    assert main([*base, "--class-images", "1", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")]) == 0
    assert _same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


# ------------------------------------------------ caption_separator × caption_dropout_rate (no shuffle)
def test_a_whole_caption_dropout_keeps_another_separators_caption_as_written():
    """kohya's ``process_caption`` splits a caption only to shuffle, drop tags or warm up: with a
    ``caption_separator`` of ";" and only ``caption_dropout_rate``, a kept caption reads as written
    (joined with ", " it would train other tokens), and the cache holds that caption."""
    from sdadapt.training.text_cache import caption_variants

    options = CaptionOptions(separator=";", dropout=0.5)
    drawn = {options.apply("red; big;shiny", random.Random(seed)) for seed in range(40)}
    assert drawn == {"red; big;shiny", ""}
    assert caption_variants("red; big;shiny", options) == ("red; big;shiny", "")
    shuffled = CaptionOptions(separator=";", dropout=0.5, shuffle=True)  # splitting: kohya's ", " join
    assert {options for options in (shuffled.apply("red; big", random.Random(s)) for s in range(40))} == {
        "red, big", "big, red", ""}
