"""``train --cache-text-encoder-outputs-to-disk`` (kohya's ``cache_text_encoder_outputs_to_disk``).

Reference (kohya sd-scripts, commit 48d368f): ``library/strategy_sdxl.py``
``SdxlTextEncoderOutputsCachingStrategy`` — the name (l. 223, 235-236:
``os.path.splitext(image_abs_path)[0] + "_te_outputs.npz"``), the check (l. 238-254: the file exists and
has ``hidden_state1`` / ``hidden_state2`` / ``pool2``), the reader (l. 256-261) and the writer (l. 282-301:
a bfloat16 output as float32, ``np.savez(path, hidden_state1=..., hidden_state2=..., pool2=...)`` of one
image's row); ``library/sdxl_train_util.py`` l. 372-373 (the option turns ``cache_text_encoder_outputs``
on); ``sdxl_train_network.py`` l. 88-90 (the only SD-family strategy: SD1/SD2 cache no outputs to disk).
Transcribed below: :func:`_kohya_name`, :func:`_kohya_expected`, :func:`_kohya_load`, :func:`_kohya_save`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors
from sdadapt.training.kohya_text_files import KohyaTextFiles, te_outputs_path_for
from sdadapt.training.step import StepConfig
from sdadapt.training.text_cache import cache_text_conditions

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


# ------------------------------------------------------------------ kohya's code, transcribed
def _kohya_name(image_abs_path: str) -> str:  # strategy_sdxl.py:235-236
    return os.path.splitext(image_abs_path)[0] + "_te_outputs.npz"


def _kohya_expected(npz_path: str) -> bool:  # strategy_sdxl.py:238-254 (cache_to_disk, no skip_cache_check)
    if not os.path.exists(npz_path):
        return False
    npz = np.load(npz_path)
    return not ("hidden_state1" not in npz or "hidden_state2" not in npz or "pool2" not in npz)


def _kohya_load(npz_path: str) -> list[np.ndarray]:  # strategy_sdxl.py:256-261
    data = np.load(npz_path)
    return [data["hidden_state1"], data["hidden_state2"], data["pool2"]]


def _kohya_save(npz_path, hidden_state1, hidden_state2, pool2) -> None:  # strategy_sdxl.py:282-301, one image
    np.savez(npz_path, hidden_state1=hidden_state1, hidden_state2=hidden_state2, pool2=pool2)


# ------------------------------------------------------------------ a tiny SDXL system and its data
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny_systems import tiny_diffusers_system

    return tiny_diffusers_system(tmp_path_factory.mktemp("te_disk"), sdxl=True, max_token_length=75)


CAPTIONS = ["ab cd", "ef gh ij", "ab cd", "kl"]  # (two images share a caption)


def _dataset(system, folder, captions=CAPTIONS):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(captions), 3, 16, 16, generator=g) * 2 - 1
    records = records_from_tensors(images, list(captions))
    for i, (r, size) in enumerate(zip(records, [(20, 24), (16, 30), (40, 16), (16, 16)])):
        r.path = folder / f"img.{i}.png"  # (a dot in the stem: kohya's splitext keeps it)
        r.size, r.resized, r.crop = size, (18, 22), (1, 3)
    dataset = Dataset(records, flip=True)
    encode_buckets(dataset, system.encode_images, images=images)
    return dataset


class _Counted:
    """Counts the rows the text encoders are run on (a forward hook on both)."""

    def __init__(self, system):
        self.rows = 0
        self.handles = [m.register_forward_hook(self._hook) for m in (system.text_encoder, system.text_encoder_2)]

    def _hook(self, module, args, output):
        self.rows += args[0].shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


def _run(system, dataset, *, files: KohyaTextFiles | None, steps: int = 2, mixed_precision: str | None = None):
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    counted = _Counted(system)
    try:
        losses = fit(system, adaptation, dataset, config=FitConfig(
            steps=steps, batch_size=4, learning_rate=1e-3, warmup_steps=0, cache_text_encoder_outputs=True,
            text_encoder_outputs_files=files, step=StepConfig(mixed_precision=mixed_precision)))
        params = [p.detach().clone() for p in adaptation.params]
    finally:
        counted.close()
        adaptation.remove()  # (the module's one system: the next run injects afresh)
    return (losses, params), counted.rows


def _same(a, b) -> None:
    assert a[0] == b[0], (a[0], b[0])  # the losses, as Python floats: bit for bit
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


# ------------------------------------------------------------------ tests
def test_names_are_kohyas():
    for image in ("/d/a.png", "/d/a.b.jpg", "/d/x", "rel/img.0.webp"):
        assert str(te_outputs_path_for(image)) == _kohya_name(image)


@pytest.mark.parametrize("mixed", [None, "bf16"])
def test_files_are_kohyas_and_a_second_run_reads_them_and_trains_the_same_bits(sdxl, tmp_path, mixed):
    """Under a bf16 autocast the in-memory cache holds float32 states and a bfloat16 pooled output:
    the files hold both as float32 (kohya's rule) and the next run casts the pooled output back."""
    dataset = _dataset(sdxl, tmp_path)
    memory, memory_rows = _run(sdxl, dataset, files=None, mixed_precision=mixed)
    first_files = KohyaTextFiles(sdxl)
    first, first_rows = _run(sdxl, dataset, files=first_files, mixed_precision=mixed)
    assert first_files.encoded == 4 and first_files.read == 0 and first_rows == memory_rows > 0
    names = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert names == sorted(os.path.basename(_kohya_name(str(r.path))) for r in dataset.records)
    want = cache_text_conditions(sdxl, CAPTIONS, batch=4, mixed_precision=mixed)
    assert (want.values["text_embeds"].dtype == torch.bfloat16) == (mixed == "bf16")
    for record in dataset.records:
        path = _kohya_name(str(record.path))
        assert _kohya_expected(path)
        with np.load(path) as npz:
            assert set(npz.files) == {"hidden_state1", "hidden_state2", "pool2", "sdadapt"}
        h1, h2, pool2 = _kohya_load(path)
        assert h1.shape == (77, 16) and h2.shape == (77, 16) and pool2.shape == (32,) and h1.dtype == np.float32
        row = want.rows[record.caption]
        assert np.array_equal(np.concatenate([h1, h2], -1), want.values["context"][row].numpy())
        assert pool2.dtype == np.float32 and np.array_equal(pool2, want.values["text_embeds"][row].float().numpy())
    second_files = KohyaTextFiles(sdxl)
    second, second_rows = _run(sdxl, dataset, files=second_files, mixed_precision=mixed)
    # no caption encoded: the encoders see only the one-caption probe of fit's trained-text-path check (both runs make it)
    assert second_files.read == 4 and second_files.encoded == 0 and second_rows == 2 < first_rows
    _same(memory, first)
    _same(memory, second)
    assert "4 image(s)' text-encoder outputs read from their _te_outputs.npz files, 0 encoded" in second_files.report()[0]


def test_the_caption_encoded_is_the_one_a_use_trains_on(sdxl, tmp_path):
    """With a caption prefix the file holds the encoding of the prefixed caption (what the step trains on;
    kohya's cache encodes the bare info.caption), and records it."""
    from sdadapt.training.data import CaptionOptions

    dataset = _dataset(sdxl, tmp_path, captions=CAPTIONS)
    dataset.captions = CaptionOptions(prefix="sks")
    files = KohyaTextFiles(sdxl)
    _run(sdxl, dataset, files=files, steps=1)
    path = _kohya_name(str(dataset.records[1].path))
    with np.load(path) as npz:
        assert json.loads(str(npz["sdadapt"][()]))["caption"] == "sks ef gh ij"
    want = cache_text_conditions(sdxl, ["sks ab cd", "sks ef gh ij", "sks kl"], batch=4)
    h1, h2, _ = _kohya_load(path)
    assert np.array_equal(np.concatenate([h1, h2], -1), want.values["context"][1].numpy())


def test_long_captions_keep_kohyas_n_times_75_plus_2_layout(tmp_path):
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path / "sys", sdxl=True, max_token_length=150)
    long = " ".join(["ab"] * 40) + " 1"  # two windows
    dataset = _dataset(system, tmp_path, captions=[long, "cd"])
    files = KohyaTextFiles(system)
    cache = files(lambda texts: cache_text_conditions(system, texts, batch=2, per_image_sizes=True),
                  [(r.path, r.caption) for r in dataset.records], [long, "cd"])
    h1, h2, pool2 = _kohya_load(_kohya_name(str(dataset.records[0].path)))
    assert h1.shape == h2.shape == (152, 16) and pool2.shape == (32,)
    with torch.no_grad():
        want = system.condition({"ids": system.tokenize([long, "cd"]), "time_ids": torch.zeros(2, 6)})  # (as chunked)
    assert torch.equal(torch.from_numpy(np.concatenate([h1, h2], -1)), want["context"][0])
    assert torch.equal(torch.from_numpy(pool2), want["text_embeds"][0]) and torch.equal(cache.values["text_embeds"][0], want["text_embeds"][0])
    # a 77-token file (written by a run without --max-token-length) does not serve this run
    short = tiny_diffusers_system(tmp_path / "sys77", sdxl=True, max_token_length=75)
    again = KohyaTextFiles(short)
    again(lambda texts: cache_text_conditions(short, texts, batch=2, per_image_sizes=True),
          [(r.path, r.caption) for r in dataset.records], [long, "cd"])
    assert again.encoded == 2 and all("(152, 16)" in why and "(77, 16)" in why for _, why in again.rewritten)


def _encode(system):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return cache_text_conditions(system, texts, batch=4, per_image_sizes=True)

    return encode, calls


def test_a_file_kohya_wrote_is_read_with_its_values(sdxl, tmp_path):
    dataset = _dataset(sdxl, tmp_path)
    g = torch.Generator().manual_seed(5)
    written = {}
    for record in dataset.records[:2]:  # kohya's files for two images (float16: a fp16 run's encoders), none for the others
        arrays = [torch.randn(*shape, generator=g).half().numpy() for shape in ((77, 16), (77, 16), (32,))]
        _kohya_save(_kohya_name(str(record.path)), *arrays)
        written[record.caption] = arrays
    files, (encode, calls) = KohyaTextFiles(sdxl), _encode(sdxl)
    cache = files(encode, [(r.path, r.caption) for r in dataset.records], list(dict.fromkeys(CAPTIONS)))
    assert calls == [["kl"]]  # "ab cd" (img 0's file; img 2 shares it) and "ef gh ij" read; only "kl" encoded
    assert files.read == 3 and files.encoded == 1 and files.trusted == 2
    for caption, (h1, h2, pool2) in written.items():
        row = cache.rows[caption]  # cast to the encode's float32: exact
        assert torch.equal(cache.values["context"][row], torch.from_numpy(np.concatenate([h1, h2], -1)).float())
        assert torch.equal(cache.values["text_embeds"][row], torch.from_numpy(pool2).float())
    assert any("carry no caption (kohya wrote them)" in line for line in files.report())
    # img 2 had no file: written from img 0's (same caption), as kohya's reader reads it
    assert all(np.array_equal(a, b) for a, b in zip(_kohya_load(_kohya_name(str(dataset.records[2].path))), written["ab cd"]))


def test_only_kohya_files_give_their_dtype_and_no_encode(sdxl, tmp_path):
    dataset = _dataset(sdxl, tmp_path, captions=["ab cd", "kl"])
    for record in dataset.records:
        _kohya_save(_kohya_name(str(record.path)), np.ones((77, 16), np.float16), np.zeros((77, 16), np.float16),
                    np.ones(32, np.float16))
    files, (encode, calls) = KohyaTextFiles(sdxl), _encode(sdxl)
    cache = files(encode, [(r.path, r.caption) for r in dataset.records], ["ab cd", "kl"])
    assert calls == [] and cache.values["context"].dtype == torch.float16
    assert cache.time_ids_dtype == torch.float32  # (exact sizes: DiffusersSystem.condition's ids, kohya's float32)


def test_a_broken_wrong_or_stale_file_is_encoded_again_and_rewritten(sdxl, tmp_path):
    dataset = _dataset(sdxl, tmp_path)
    encode, _ = _encode(sdxl)
    KohyaTextFiles(sdxl)(encode, [(r.path, r.caption) for r in dataset.records], list(dict.fromkeys(CAPTIONS)))
    paths = [_kohya_name(str(r.path)) for r in dataset.records]
    good = [_kohya_load(p) for p in paths]
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: len(data) // 2])  # cut short (an interrupted write)
    _kohya_save(paths[1], good[1][0], good[1][1], np.zeros(31, np.float32))  # pool2 of another width
    np.savez(paths[2], hidden_state1=good[2][0], pool2=good[2][2])  # no hidden_state2
    from sdadapt.training.kohya_text_files import write_npz_text_outputs

    write_npz_text_outputs(paths[3], *(torch.from_numpy(a) for a in good[0]), caption="an old caption")  # stale
    files, (encode, calls) = KohyaTextFiles(sdxl), _encode(sdxl)
    cache = files(encode, [(r.path, r.caption) for r in dataset.records], list(dict.fromkeys(CAPTIONS)))
    assert files.encoded == 4 and files.read == 0 and sorted(calls[0]) == sorted(set(CAPTIONS))
    reasons = {str(p): why for p, why in files.rewritten}
    assert set(reasons) == set(paths)
    assert "unreadable" in reasons[paths[0]] and "pool2 of shape (31,)" in reasons[paths[1]]
    assert "'hidden_state2'" in reasons[paths[2]] and "'an old caption'" in reasons[paths[3]]
    for path, want in zip(paths, good):  # rewritten with the right values
        assert _kohya_expected(path) and all(np.array_equal(a, b) for a, b in zip(_kohya_load(path), want))
    assert all(f"{p}:" in "\n".join(files.report()) for p in paths)
    assert torch.equal(cache.values["text_embeds"][cache.rows["kl"]], torch.from_numpy(good[3][2]))


@pytest.mark.parametrize("dtype,stored", [(torch.bfloat16, np.float32), (torch.float16, np.float16)])
def test_half_outputs_are_written_in_kohyas_dtype_and_read_back_exactly(sdxl, tmp_path, dtype, stored):
    """kohya writes a bfloat16 output as float32 and a float16 one (a fp16 run's encoders) as it is
    (strategy_sdxl.py:282-291); the next run casts them back to the in-memory cache's dtype, exactly."""
    from sdadapt.training.text_cache import TextConditionCache

    dataset = _dataset(sdxl, tmp_path, captions=["ab cd", "kl"])
    plain = cache_text_conditions(sdxl, ["ab cd", "kl"], batch=2, per_image_sizes=True)
    values = {"context": plain.values["context"].to(dtype), "text_embeds": plain.values["text_embeds"].to(dtype)}

    def encode(texts):
        return TextConditionCache({t: i for i, t in enumerate(texts)}, {k: v[[plain.rows[t] for t in texts]]
                                                                      for k, v in values.items()}, dtype)

    entries = [(r.path, r.caption) for r in dataset.records]
    first = KohyaTextFiles(sdxl)(encode, entries, ["ab cd", "kl"])
    assert all(a.dtype == stored for a in _kohya_load(_kohya_name(str(dataset.records[0].path))))  # kohya's rule
    second = KohyaTextFiles(sdxl)(lambda texts: pytest.fail("encoded"), entries, ["ab cd", "kl"])
    assert second.values["context"].dtype == second.values["text_embeds"].dtype == dtype
    assert second.time_ids_dtype == torch.float32
    assert all(torch.equal(first.values[k], second.values[k]) for k in values)


def test_sd1_is_refused_and_files_need_the_cache(sdxl, tmp_path):
    from tiny_systems import tiny_diffusers_system

    with pytest.raises(ValueError, match=r"SD1/SD2.*--cache-text-encoder-outputs \(in memory\)"):
        KohyaTextFiles(tiny_diffusers_system(tmp_path, sdxl=False, max_token_length=75))
    with pytest.raises(ValueError, match="cache_text_encoder_outputs=True"):
        FitConfig(steps=1, text_encoder_outputs_files=KohyaTextFiles(sdxl))


# ------------------------------------------------------------------ the train command
def test_train_writes_then_reads_the_files_and_a_kohya_toml_turns_it_on(tmp_path, capsys):
    from tiny_checkpoints import tiny_sdxl_file
    from train_inputs import captioned_pngs

    from sdadapt.cli import main
    from sdadapt.formats.files import read_safetensors

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 2, caption=[f"sks toy, photo {i}" for i in range(2)])
    config = tmp_path / "train.toml"
    config.write_text(f"pretrained_model_name_or_path = '{tiny_sdxl_file(tmp_path / 'sdxl.safetensors')}'\n"
                      f"train_data_dir = '{images}'\nresolution = '16,16'\nmax_train_steps = 1\ntrain_batch_size = 2\n"
                      "network_dim = 2\nnetwork_alpha = 2\nnetwork_train_unet_only = true\ncaption_extension = '.txt'\n"
                      "learning_rate = 1e-3\n"
                      f"cache_text_encoder_outputs_to_disk = true\noutput_dir = '{tmp_path}'\noutput_name = 'xl'\n")
    outs = []
    for i in range(2):
        assert main(["train", "lora", "--config", str(config), "--seed", "3", "--overwrite", "--save-state"]) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert f"{2 * i} image(s)' text-encoder outputs read from their _te_outputs.npz files, {2 - 2 * i} encoded" in err
        outs.append(read_safetensors(tmp_path / "xl.safetensors")[0])
    assert sorted(p.name for p in images.glob("*_te_outputs.npz")) == ["0_te_outputs.npz", "1_te_outputs.npz"]
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])  # (metadata: dates)
    record = json.loads((tmp_path / "xl-state" / "run.json").read_text())
    assert record["text_encoder_outputs"] == "kohya-te-outputs-npz"


@pytest.mark.parametrize("extra,message", [
    ([], "SD1/SD2 train_network.py has no caching strategy"),  # the toy: no SDXL, no kohya file
    (["--shuffle-caption"], "--shuffle-caption"),  # it turns the cache on, whose refusals hold (kohya's too)
])
def test_train_refuses_what_kohya_has_no_file_for_or_refuses(tmp_path, capsys, extra, message):
    from train_inputs import captioned_pngs

    from sdadapt.cli import main

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 2)
    code = main(["train", "lora", "--images", str(images), "--steps", "1", "--no-text-encoder",
                 "--cache-text-encoder-outputs-to-disk", *extra, "-o", str(tmp_path / "o.safetensors")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and message in last, last
    assert not list(images.glob("*.npz"))
