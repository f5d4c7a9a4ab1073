"""kohya's ``--cache_text_encoder_outputs`` (sdadapt.training.text_cache, FitConfig.cache_text_encoder_outputs).

Reference behaviour (kohya sd-scripts, sdxl_train_network.py ``assert_extra_args`` and
library/train_util.py ``is_text_encoder_output_cacheable``): with the option every caption is
encoded once before training and the UNet trains on the stored outputs; refused when a caption
changes per use ("when caching Text Encoder output, either caption_dropout_rate, shuffle_caption,
token_warmup_step or caption_tag_dropout_rate cannot be used") and when the text encoder trains
("network for Text Encoder cannot be trained with caching Text Encoder outputs"; kohya needs
``network_train_unet_only``). SDXL keeps both encoders' hidden states and the pooled output per
caption and builds the size conditioning per batch. kohya writes no ``ss_*`` key for it.

sdadapt's cache holds exactly what ``system.condition`` gives, so a cached run trains the same
weights bit for bit as an uncached one (checked below on the toy, a tiny SD1 system with
150-token captions, a tiny SDXL system with per-image size conditioning and flips, the tensor path,
generated class images, regularisation images and a whole-caption dropout, whose ``""`` is cached too).
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from _fast_s1 import one_level_toy

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import CaptionOptions, Dataset, encode_buckets, records_from_tensors
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.step import StepConfig
from sdadapt.training.text_cache import cache_text_conditions, caption_variants, conditioning_depends_on


def _fit(system, adaptation, data, captions=None, *, cache: bool, prior=None, steps: int = 3, batch: int = 2, **config):
    losses = fit(system, adaptation, data, captions, prior=prior,
                 config=FitConfig(steps=steps, batch_size=batch, learning_rate=1e-3, warmup_steps=0,
                                  cache_text_encoder_outputs=cache, **config))
    return losses, [p.detach().clone() for p in adaptation.params]


def _same(a, b) -> None:
    assert a[0] == b[0], (a[0], b[0])  # the losses, as Python floats: bit for bit
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def _toy_run(cache: bool, *, mode: str, prior: bool = False, dropout: float = 0.0, **config):
    # (the toy tests run ``one_level_toy``: the toy's condition / denoiser paths, a ninth of the UNet's ops)
    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    images, captions = concept_data("cross", 4, seed=0)
    class_data = (images.flip(0), captions[::-1], 0.5) if prior else None
    if mode == "tensors":
        return _fit(system, adaptation, images, captions, cache=cache, prior=class_data, **config)
    dataset = Dataset(records_from_tensors(images, captions), captions=CaptionOptions(dropout=dropout))
    encode_buckets(dataset, system.encode_images, images=images)
    return _fit(system, adaptation, dataset, cache=cache, prior=class_data, steps=4, **config)


@pytest.mark.parametrize("mode,prior,dropout,config", [
    ("tensors", False, 0.0, {}), ("tensors", True, 0.0, {}), ("dataset", False, 0.0, {}), ("dataset", True, 0.5, {}),
    ("tensors", False, 0.0, {"batch": 4, "steps": 2, "step": StepConfig(min_snr_gamma=5.0, mixed_precision="bf16")}),
    ("dataset", True, 0.0, {"cuda_graph": True}),  # (on a CPU the captured step runs eagerly)
], ids=["tensors", "tensors-prior", "dataset", "dataset-prior-dropout", "bf16-autocast", "cuda-graph-path"])
def test_toy_cached_run_trains_the_same_bits(mode, prior, dropout, config):
    _same(_toy_run(False, mode=mode, prior=prior, dropout=dropout, **config),
          _toy_run(True, mode=mode, prior=prior, dropout=dropout, **config))


def test_a_cached_run_resumes_onto_the_uncached_run(tmp_path):
    """The cache changes no draw: 2 cached steps, saved, resumed (cached) to 4 = 4 uncached steps."""
    def run(cache, steps, *, resume=None, save=None):
        system = one_level_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
        images, captions = concept_data("cross", 4, seed=0)
        dataset = Dataset(records_from_tensors(images, captions), captions=CaptionOptions(dropout=0.5))
        encode_buckets(dataset, system.encode_images, images=images)
        config = FitConfig(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0, cache_text_encoder_outputs=cache)

        def on_step(progress):
            if save is not None and progress.step == steps:
                progress.save_state(save)
                raise KeyboardInterrupt

        try:
            losses = fit(system, adaptation, dataset, config=config, on_step=on_step, resume=resume)
        except KeyboardInterrupt:
            losses = []
        return losses, [p.detach().clone() for p in adaptation.params]

    whole = run(False, 4)
    run(True, 2, save=tmp_path / "state")
    resumed = run(True, 4, resume=tmp_path / "state")
    assert resumed[0] == whole[0][2:]
    assert all(torch.equal(x, y) for x, y in zip(whole[1], resumed[1], strict=True))


def test_a_frozen_text_encoder_lora_may_cache():
    """kohya's ``network_train_unet_only`` is sdadapt's ``--no-text-encoder`` or a text-encoder LR of 0:
    adapters in the text encoder that do not train leave its output fixed."""
    def run(cache):
        system = one_level_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1)  # text-encoder LoRA too, frozen by text_encoder_lr=0
        images, captions = concept_data("cross", 4, seed=0)
        return _fit(system, adaptation, images, captions, cache=cache, text_encoder_lr=0.0)

    _same(run(False), run(True))


def test_regularisation_images_are_cached_too():
    def run(cache):
        system = one_level_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
        images, captions = concept_data("cross", 4, seed=0)
        dataset = Dataset(records_from_tensors(images, captions))
        reg = Dataset(records_from_tensors(images.flip(0)[:3], ["a red circle", "a blue square", "a red circle"]),
                      flip=True)
        encode_buckets(dataset, system.encode_images, images=images)
        encode_buckets(reg, system.encode_images, images=images.flip(0)[:3])
        return _fit(system, adaptation, dataset, cache=cache, prior=(reg, 0.7), steps=4)

    _same(run(False), run(True))


# ------------------------------------------------------------------ tiny diffusers systems
def _diffusers_system(tmp_path, *, sdxl: bool, max_token_length: int):
    from test_long_prompts import _system

    return _system(tmp_path, sdxl=sdxl, max_token_length=max_token_length)


def _diffusers_run(tmp_path, cache: bool, *, sdxl: bool, max_token_length: int = 75, count: int = 3, batch: int = 2):
    system = _diffusers_system(tmp_path, sdxl=sdxl, max_token_length=max_token_length)
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, 16, 16, generator=g) * 2 - 1
    words = 40 if max_token_length > 75 else 3  # 40 two-token words: a second CLIP window
    captions = [" ".join(["ab"] * words) + f" {i}" for i in range(count)]
    records = records_from_tensors(images, captions)
    for r, size in zip(records, [(20, 24), (16, 30), (40, 16), (16, 16)]):  # SDXL size conditioning differs per image
        r.size, r.resized, r.crop = size, (18, 22), (1, 3)
    dataset = Dataset(records, captions=CaptionOptions(dropout=0.3), flip=True)
    encode_buckets(dataset, system.encode_images, images=images)
    return _fit(system, adaptation, dataset, cache=cache, steps=3, batch=batch), system


@pytest.mark.parametrize("sdxl,max_token_length,count,batch", [(False, 150, 3, 2), (True, 75, 4, 4)],
                         ids=["sd1-150-tokens", "sdxl"])
def test_tiny_diffusers_systems_cached_run_trains_the_same_bits(tmp_path, sdxl, max_token_length, count, batch):
    """SD1 with two-window captions (batches of 2 and a last one of 1); SDXL with per-image size
    conditioning, flips and a caption dropout, in full batches of 4 (its pooled projection is a
    (B, 32) product whose CPU kernel — and last bits — change with B < 4: the cache is encoded in
    chunks of the batch size, so full batches match bit for bit; see cache_text_conditions)."""
    plain, _ = _diffusers_run(tmp_path / "a", False, sdxl=sdxl, max_token_length=max_token_length, count=count, batch=batch)
    cached, _ = _diffusers_run(tmp_path / "b", True, sdxl=sdxl, max_token_length=max_token_length, count=count, batch=batch)
    _same(plain, cached)


def test_the_cache_holds_what_condition_gives_and_sdxl_time_ids_come_per_batch(tmp_path):
    system = _diffusers_system(tmp_path, sdxl=True, max_token_length=150)
    captions = ["ab cd", "", " ".join(["ab"] * 40)]
    cache = cache_text_conditions(system, [*captions, "ab cd"], batch=2)
    assert list(cache.rows) == captions and cache.time_ids_dtype == torch.float32
    assert set(cache.values) == {"context", "text_embeds"}  # time_ids are the batch's own
    sizes = torch.tensor([[20.0, 24, 1, 3, 16, 16], [16, 30, 0, 7, 16, 16]])
    got = cache.lookup(["", "ab cd"], "cpu", time_ids=sizes)
    with torch.no_grad():
        want = system.condition({"ids": system.tokenize(["", "ab cd"]), "time_ids": sizes})
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert cache.nbytes() == 3 * (152 * 32 + 32) * 4  # L = 2 * 75 + 2 ids, 16 + 16 wide, 32 pooled, float32
    with pytest.raises(KeyError, match="not in the text-encoder cache"):
        cache.lookup(["never seen"], "cpu", time_ids=sizes[:1])


def test_sd15_memory_per_caption():
    """What a cached SD1.5 caption costs on the host: (77, 768) float32 = 231 KiB (the docs' number)."""
    class Stub:
        alphas_cumprod = torch.zeros(2)

        def tokenize(self, prompts):
            return torch.zeros(len(prompts), 77, dtype=torch.long)

        def condition(self, ids):
            return torch.zeros(ids.shape[0], 77, 768)

    cache = cache_text_conditions(Stub(), [f"caption {i}" for i in range(5)])
    assert cache.nbytes() / 5 == 77 * 768 * 4 == 236_544


# ------------------------------------------------------------------ refusals
def test_caption_variants_are_the_written_caption_and_the_dropped_one():
    assert caption_variants("a, b", CaptionOptions()) == ("a, b",)
    assert caption_variants("a,b", CaptionOptions(dropout=0.2)) == ("a,b", "")  # what one kept draw writes (kohya's)
    assert caption_variants("a,b", CaptionOptions(dropout=0.2, kohya_assembly=False)) == ("a, b", "")  # (runs before)
    for options in (CaptionOptions(shuffle=True), CaptionOptions(tag_dropout=0.1), CaptionOptions(templates=("a <x>",))):
        with pytest.raises(ValueError, match="the caption changes at each use"):
            caption_variants("a, b", options)
    # every caption a dropout run draws is one of them
    options = CaptionOptions(dropout=0.5, keep_tokens=1)
    rng = random.Random(0)
    assert {options.apply("x,y , z", rng) for _ in range(50)} == set(caption_variants("x,y , z", options))


@pytest.mark.parametrize("options", [
    dict(dropout=0.3, prefix="pre", suffix="post"),
    dict(dropout_every_n_epochs=2, keep_tokens_separator="|||", secondary_separator=";;;"),
    dict(dropout=1.0), dict(dropout_every_n_epochs=1), dict(keep_tokens=2, separator=";"),
], ids=["prefix-suffix-dropout", "every-n-epochs-separators", "always-dropped", "every-epoch", "keep-tokens"])
def test_every_caption_a_fixed_caption_run_draws_is_cached(options):
    """Whatever the caption options that leave a caption fixed (apart from a whole-caption drop), the
    texts :meth:`CaptionOptions.apply` draws over many uses and epochs are among :func:`caption_variants`."""
    captions = CaptionOptions(**options)
    for caption in ("a, b ,c", "x ||| y, z ||| w", "p;;;q, r", "single", "a;b;c"):
        rng = random.Random(caption)
        drawn = {captions.apply(caption, rng, epoch=epoch) for epoch in range(6) for _ in range(20)}
        assert drawn <= set(caption_variants(caption, captions)), (caption, drawn)


def test_fit_refuses_what_would_make_the_cache_wrong():
    images, captions = concept_data("cross", 4, seed=0)
    system = build_toy(seed=1)
    training_text = METHODS["lora"].adapt(system, seed=1)  # its text-encoder LoRA trains
    with pytest.raises(ValueError, match="in the text encoder.*--no-text-encoder"):
        _fit(system, training_text, images, captions, cache=True)
    training_text.remove()
    inversion = METHODS["textual-inversion"].adapt(system, seed=1, token="<x>")
    with pytest.raises(ValueError, match="its own tokenize"):
        _fit(system, inversion, images, [f"<x> {c}" for c in captions], cache=True)
    inversion.remove()
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    dataset = Dataset(records_from_tensors(images, captions), captions=CaptionOptions(shuffle=True))
    encode_buckets(dataset, system.encode_images, images=images)
    with pytest.raises(ValueError, match="--shuffle-caption"):
        _fit(system, adaptation, dataset, cache=True)
    dropout = torch.nn.Dropout(0.1)
    system.text_encoder.add_module("drop", dropout)
    try:
        with pytest.raises(ValueError, match="draws dropout"):
            _fit(system, adaptation, images, captions, cache=True)
    finally:
        del system.text_encoder.drop


def test_conditioning_depends_on_finds_a_trained_path():
    encoder = torch.nn.Linear(3, 3)
    other = torch.nn.Parameter(torch.ones(2))
    encoder.requires_grad_(False)
    ids = torch.ones(1, 3)
    assert not conditioning_depends_on(encoder, ids, [other])
    row = torch.nn.Parameter(torch.zeros(3))
    assert conditioning_depends_on(lambda x: encoder(x + row), ids, [other, row])
    assert not conditioning_depends_on(lambda x: encoder(x + row), ids, [other])


def test_fit_with_a_cache_makes_no_host_sync_per_step():
    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    images, captions = concept_data("cross", 4, seed=0)
    per_step: list[list] = []
    with HostSyncs() as syncs:
        dataset = Dataset(records_from_tensors(images, captions), captions=CaptionOptions(dropout=0.5))
        encode_buckets(dataset, system.encode_images, images=images)
        fit(system, adaptation, dataset, prior=(images.flip(0), captions[::-1], 0.5),
            config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0, cache_text_encoder_outputs=True),
            on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    for events in per_step[1:]:
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))


# ------------------------------------------------------------------ train: flag, TOML, refusals before loading
@pytest.mark.parametrize("method,flags,message", [
    ("lora", [], "add --no-text-encoder"),
    ("dreambooth", ["--class-prompt", "a circle"], "add --no-text-encoder"),
    ("textual-inversion", ["--token", "<x>"], "trains the trigger word's embedding"),
    ("lora", ["--no-text-encoder", "--shuffle-caption"], "with --shuffle-caption the captions change"),
    ("lora", ["--no-text-encoder", "--caption-tag-dropout-rate", "0.1"], "--caption-tag-dropout-rate"),
    ("lora", ["--no-text-encoder", "--weighted-captions"], "--weighted-captions"),
    ("lora", ["--no-text-encoder", "--enable-wildcard"], "--enable-wildcard"),
    ("lora", ["--no-text-encoder", "--token-warmup-step", "3"], "--token-warmup-step"),
])
def test_train_refuses_before_the_model_loads(red_circles, tmp_path, capsys, monkeypatch, method, flags, message):
    jobs = importlib.import_module("sdadapt.jobs.train")
    monkeypatch.setattr(jobs, "load_system", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", method, "--images", str(red_circles), "--cache-text-encoder-outputs", *flags,
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_train_cached_writes_the_same_file_as_uncached(red_circles, tmp_path):
    """Generated class images (their class prompts cached too): 2 of them, as few as a batch (each one is
    25 sampler steps of the toy model, the most of a run's time)."""
    from sdadapt.formats.files import read_safetensors

    outs = []
    for cache in (False, True):
        out = tmp_path / f"{cache}.safetensors"
        flags = ["--cache-text-encoder-outputs"] if cache else []
        assert main(["train", "lora", "--images", str(red_circles), "--no-text-encoder", "--steps", "2", "--batch-size", "2",
                     "--class-images", "2", "--caption-dropout-rate", "0.5", "-q", *flags, "-o", str(out)]) == 0
        outs.append(read_safetensors(out)[0])
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_toml_keys(tmp_path):
    from sdadapt.cli.train import read_config
    from sdadapt.jobs.train import TrainOptions

    fields = {f for f in TrainOptions.__dataclass_fields__}
    config = tmp_path / "c.toml"
    config.write_text("cache_text_encoder_outputs = true\nfp8_base = false\n")
    options, _, notes = read_config(config, fields=fields, method_options=set())
    assert options == {"cache_text_encoder_outputs": True, "fp8_base": False} and notes == []
    config.write_text("cache_text_encoder_outputs_to_disk = true\n")  # kohya's files (tests/test_text_cache_disk.py)
    options, _, notes = read_config(config, fields=fields, method_options=set())
    assert options == {"cache_text_encoder_outputs_to_disk": True} and notes == []
    assert TrainOptions(images=str(tmp_path), **options).cache_text_encoder_outputs  # (turned on: sdxl_train_util.py)
    for key in ("fp8_base", "fp8_base_unet"):  # kohya's fp8 base: read (tests/test_fp8_base.py trains with it)
        config.write_text(f"{key} = true\n")
        assert read_config(config, fields=fields, method_options=set())[0] == {key: True}
