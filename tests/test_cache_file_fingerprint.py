"""Cache files that know the model that wrote them: the ``made_by`` record of sdadapt's ``sdadapt`` key in the
text-encoder output files (``--cache-text-encoder-outputs-to-disk``) and the latent files (``--cache-latents-to-disk``).

Reference (kohya sd-scripts@48d368fa): ``library/strategy_sdxl.py`` 238-261 (the text files' check and reader take
``hidden_state1`` / ``hidden_state2`` / ``pool2`` by name), ``library/strategy_base.py`` 460-467 (the latents' check),
586-595 (their reader, by name) and 598-639 (their writer, which keeps the keys already in the file): transcribed in
:func:`_kohya_load_latents` and :func:`_kohya_save_latents`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdadapt.training.data import (
    Dataset,
    encode_buckets,
    find_images,
    plan_dataset,
    records_from_tensors,
)
from sdadapt.training.kohya_latent_files import KohyaLatentFiles
from sdadapt.training.kohya_text_files import (
    KohyaTextFiles,
    te_outputs_path_for,
    write_npz_text_outputs,
)
from sdadapt.training.model_fingerprint import module_fingerprint, sample_positions
from sdadapt.training.text_cache import cache_text_conditions

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TESTS = Path(__file__).parent
CAPTIONS = ["ab cd", "ef gh ij", "ab cd", "kl"]


def _system(folder: Path, **kw):
    from tiny_systems import tiny_diffusers_system

    return tiny_diffusers_system(folder, max_token_length=75, **kw)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _system(tmp_path_factory.mktemp("fp_sdxl"), sdxl=True)


def _entries(folder: Path, captions=CAPTIONS):
    folder.mkdir(parents=True, exist_ok=True)
    records = records_from_tensors(torch.zeros(len(captions), 3, 16, 16), list(captions))
    for i, record in enumerate(records):
        record.path = folder / f"img{i}.png"
    return [(r.path, r.caption) for r in records]


def _run(system, entries, texts=None):
    """One pass of the text files: (the hook, the captions encoded, the cache)."""
    calls: list[list[str]] = []

    def encode(captions):
        calls.append(list(captions))
        return cache_text_conditions(system, captions, batch=4, per_image_sizes=True)

    files = KohyaTextFiles(system)
    cache = files(encode, entries, list(dict.fromkeys(texts or [c for _, c in entries])))
    return files, calls, cache


def _own(path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(str(npz["sdadapt"][()])) if "sdadapt" in npz.files else {}


class _Changed:
    """One value of one tensor of ``module`` moved by ``delta`` (at a flat ``position``), put back on exit."""

    def __init__(self, tensor: torch.Tensor, position: int, delta: float = 0.5):
        self.flat, self.position, self.delta = tensor.detach().view(-1), position, delta

    def __enter__(self):
        self.old = self.flat[self.position].clone()
        self.flat[self.position] += self.delta
        return self

    def __exit__(self, *exc):
        self.flat[self.position] = self.old


# ------------------------------------------------------------------ the fingerprint itself
def test_sample_positions_are_evenly_spaced_and_take_the_ends():
    assert sample_positions(3) == [0, 1, 2] and sample_positions(0) == []
    for numel in (9, 10, 77, 1000, 49408 * 768):
        got = sample_positions(numel)
        naive = sorted({int(np.floor(i * (numel - 1) / 7 + 0.5)) for i in range(8)})  # (float64 rounding, half up)
        assert got == naive and got[0] == 0 and got[-1] == numel - 1 and len(got) == 8


def test_every_sampled_value_of_every_tensor_and_the_dtype_change_the_fingerprint(sdxl):
    """Each tensor of both text encoders, moved at each of its sampled positions (one at a time), gives another
    fingerprint, and putting it back gives the first; a change at an unsampled position is not seen (the
    documented limit)."""
    modules = (sdxl.text_encoder, sdxl.text_encoder_2)
    before = module_fingerprint(*modules)
    seen = set()
    tested = 0
    for module in modules:
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            for position in sample_positions(tensor.numel()):
                with _Changed(tensor, position):
                    changed = module_fingerprint(*modules)
                assert changed != before, (name, position)
                seen.add(changed)
                tested += 1
            unsampled = next((p for p in range(tensor.numel()) if p not in set(sample_positions(tensor.numel()))), None)
            if unsampled is not None:
                with _Changed(tensor, unsampled):
                    assert module_fingerprint(*modules) == before, name  # (the limit: not seen)
    assert module_fingerprint(*modules) == before
    assert len(seen) == tested > 100  # every change gave its own digest
    assert module_fingerprint(sdxl.text_encoder_2, sdxl.text_encoder) != before  # (the encoders' order counts)
    half = copy.deepcopy(sdxl.text_encoder).half()
    assert module_fingerprint(half, sdxl.text_encoder_2) != before  # an fp16 copy encodes other values


def test_the_record_is_the_same_in_another_process(sdxl, tmp_path):
    """The same weights (loaded from a file in a fresh interpreter, another PYTHONHASHSEED) give the same
    ``made_by`` records: no per-process state (``hash()``, addresses, iteration order) enters them."""
    from safetensors.torch import save_file

    for name in ("text_encoder", "text_encoder_2", "vae"):
        save_file({k: v.contiguous() for k, v in getattr(sdxl, name).state_dict().items()}, tmp_path / f"{name}.safetensors")
    here = {"text": KohyaTextFiles(sdxl).made_by(), "latents": KohyaLatentFiles(sdxl).made_by()}
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
from safetensors.torch import load_file
from tiny_systems import tiny_diffusers_system
from sdadapt.training.kohya_latent_files import KohyaLatentFiles
from sdadapt.training.kohya_text_files import KohyaTextFiles
torch.manual_seed(123)  # (other random weights first: the file's must replace them all)
system = tiny_diffusers_system(Path({str(tmp_path / 'sub')!r}), sdxl=True, max_token_length=75)
for name in ("text_encoder", "text_encoder_2", "vae"):
    getattr(system, name).load_state_dict(load_file(Path({str(tmp_path)!r}) / (name + ".safetensors")))
print(json.dumps({{"text": KohyaTextFiles(system).made_by(), "latents": KohyaLatentFiles(system).made_by()}}))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert set(here["text"]) == {"text_encoders", "tokenizers", "max_token_length"} and set(here["latents"]) == {"vae"}


# ------------------------------------------------------------------ the text-encoder output files
def test_the_same_model_reads_its_files_back_without_encoding(sdxl, tmp_path):
    entries = _entries(tmp_path)
    first, calls, cache = _run(sdxl, entries)
    assert first.encoded == 4 and len(calls) == 1
    for path, _ in entries:
        assert _own(te_outputs_path_for(path))["made_by"] == first.made_by()
    second, calls, again = _run(sdxl, entries)
    assert calls == [] and (second.read, second.encoded, second.trusted, second.rewritten) == (4, 0, 0, [])
    assert all(torch.equal(cache.values[k], again.values[k]) for k in ("context", "text_embeds"))
    assert not any("carry no" in line for line in second.report())


def test_a_file_for_another_text_encoder_is_encoded_again_reported_and_rewritten(sdxl, tmp_path):
    entries = _entries(tmp_path)
    _run(sdxl, entries)
    paths = [te_outputs_path_for(p) for p, _ in entries]
    tensor = sdxl.text_encoder_2.state_dict()["text_model.encoder.layers.0.mlp.fc1.weight"]
    with _Changed(tensor, sample_positions(tensor.numel())[3], delta=0.25):  # (a sampled position)
        want = cache_text_conditions(sdxl, list(dict.fromkeys(CAPTIONS)), batch=4, per_image_sizes=True)
        files, calls, cache = _run(sdxl, entries)
        assert sorted(calls[0]) == sorted(set(CAPTIONS))  # every caption encoded again, by this model
        assert files.read == 0 and files.encoded == 4 and sorted(str(p) for p, _ in files.rewritten) == sorted(map(str, paths))
        assert all(why.startswith("written for another text encoder") for _, why in files.rewritten)
        report = "\n".join(files.report())
        assert all(f"{p}: written for another text encoder" in report for p in paths)
        for (path, caption), file in zip(entries, paths):  # rewritten with this model's outputs and record
            with np.load(file, allow_pickle=False) as npz:
                assert np.array_equal(npz["pool2"], want.values["text_embeds"][want.rows[caption]].numpy())
            assert _own(file)["made_by"] == files.made_by()
        for key in ("context", "text_embeds"):
            assert torch.equal(cache.values[key], want.values[key])
        again, calls, _ = _run(sdxl, entries)  # the changed model now reads them back
        assert calls == [] and again.read == 4 and again.rewritten == []
    back, calls, _ = _run(sdxl, entries)  # the first model again: its own files are gone
    assert back.encoded == 4 and all(why.startswith("written for another text encoder") for _, why in back.rewritten)


def test_other_tokenizers_are_named(sdxl, tmp_path):
    """The same weights, the first tokenizer padding with "!" instead of its EOS: the ids, hence the outputs, differ."""
    entries = _entries(tmp_path / "imgs")
    _run(sdxl, entries)
    padded = _system(tmp_path / "pad", sdxl=True, pad="!")
    padded.text_encoder.load_state_dict(sdxl.text_encoder.state_dict())
    padded.text_encoder_2.load_state_dict(sdxl.text_encoder_2.state_dict())
    files, _, _ = _run(padded, entries)
    assert files.made_by()["text_encoders"] == KohyaTextFiles(sdxl).made_by()["text_encoders"]
    assert files.encoded == 4 and all(why.startswith("written for other tokenizers") for _, why in files.rewritten)


def test_files_without_a_record_are_trusted_and_counted(sdxl, tmp_path):
    """kohya's files (three keys) and an older sdadapt's (a caption, no ``made_by``) are used as they are, counted
    in the report; a kohya file copied to another image of its caption stays unvouched."""
    entries = _entries(tmp_path)
    paths = [te_outputs_path_for(p) for p, _ in entries]
    g = torch.Generator().manual_seed(4)
    arrays = [torch.randn(*shape, generator=g) for shape in ((77, 16), (77, 16), (32,))]
    np.savez(paths[0], hidden_state1=arrays[0].numpy(), hidden_state2=arrays[1].numpy(), pool2=arrays[2].numpy())
    write_npz_text_outputs(paths[1], *arrays, caption=entries[1][1])  # (an older sdadapt: no made_by)
    files, calls, cache = _run(sdxl, entries)
    assert calls == [["kl"]] and files.rewritten == []
    assert (files.read, files.encoded, files.trusted) == (3, 1, 2)  # img2 copied from img0's file (same caption)
    assert torch.equal(cache.values["text_embeds"][cache.rows["ab cd"]], arrays[2])
    assert torch.equal(cache.values["text_embeds"][cache.rows["ef gh ij"]], arrays[2])
    assert "made_by" not in _own(paths[2])  # the copy of kohya's file: still not vouched for
    assert _own(paths[3])["made_by"] == files.made_by()
    assert any(line.strip().startswith("2 of the files read carry no") for line in files.report())


# ------------------------------------------------------------------ the latent files
def _kohya_load_latents(npz_path):  # strategy_base.py:586-595, SD keys (no resolution suffix)
    npz = np.load(npz_path)
    if "latents" not in npz:
        raise ValueError(f"latents not found in {npz_path}")
    return (npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(),
            npz["latents_flipped"] if "latents_flipped" in npz else None,  # noqa: SIM401 (kohya's code)
            npz["alpha_mask"] if "alpha_mask" in npz else None)  # noqa: SIM401


def _kohya_save_latents(npz_path, latents, original_size, crop_ltrb):  # strategy_base.py:598-639, SD keys
    kwargs = {}
    if os.path.exists(npz_path):  # load existing npz and update it
        npz = np.load(npz_path)
        for key in npz.files:
            kwargs[key] = npz[key]
    kwargs["latents"] = latents.float().cpu().numpy()
    kwargs["original_size"] = np.array(original_size)
    kwargs["crop_ltrb"] = np.array(crop_ltrb)
    np.savez(npz_path, **kwargs)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _system(tmp_path_factory.mktemp("fp_sd1"))


def _latents(system, folder: Path, *, flip=False):
    from sdadapt.images import write_png

    if not folder.exists():
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        for i, (h, w) in enumerate([(16, 24), (16, 16)]):
            write_png(folder / f"img{i}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
            (folder / f"img{i}.txt").write_text(f"a photo {i}")
    records, _ = find_images(folder)
    plan_dataset(records, resolution=16, buckets=False)
    dataset, disk = Dataset(records, flip=flip), KohyaLatentFiles(system)
    encode_buckets(dataset, system.encode_images, latents_of=disk)
    return dataset, disk, sorted(folder.glob("*_sd.npz"))


def test_latent_files_know_their_vae(sd1, tmp_path):
    folder = tmp_path / "imgs"
    first, disk, files = _latents(sd1, folder, flip=True)
    assert disk.encoded == 2 and len(files) == 2
    for file in files:
        own = _own(file)
        assert own["made_by"] == disk.made_by() and set(own) == {"made_by", "latents"}
        latents, size, _, flipped, mask = _kohya_load_latents(file)  # kohya's reader: the extra key is harmless
        assert latents.dtype == np.float32 and flipped is not None and mask is None and len(size) == 2
    _, disk, _ = _latents(sd1, folder, flip=True)
    assert (disk.read, disk.encoded, disk.trusted, disk.rewritten) == (2, 0, 0, [])
    # a decoder-only change (a fine-tuned decoder, sd-vae-ft-mse style): the same latents, read back
    decoder = sd1.vae.decoder.conv_out.weight
    with _Changed(decoder, 0):
        _, disk, _ = _latents(sd1, folder, flip=True)
        assert (disk.read, disk.encoded) == (2, 0)
    # an encoder change at a sampled position: another VAE, encoded again, named, rewritten
    encoder = sd1.vae.encoder.conv_in.weight
    with _Changed(encoder, sample_positions(encoder.numel())[1], delta=0.25):
        changed, disk, _ = _latents(sd1, folder, flip=True)
        assert (disk.read, disk.encoded, len(disk.rewritten)) == (0, 2, 2)
        assert all(why.startswith("written for another VAE") for _, why in disk.rewritten)
        assert all(f"{p}: written for another VAE" in "\n".join(disk.report()) for p in files)
        fresh = Dataset(changed.records, flip=True)
        encode_buckets(fresh, sd1.encode_images)  # the in-memory path of the changed VAE
        for bucket in fresh.latents:
            assert torch.equal(fresh.latents[bucket], changed.latents[bucket])
            assert not torch.equal(fresh.latents[bucket], first.latents[bucket])
        assert all(_own(f)["made_by"] == disk.made_by() for f in files)
    assert disk.made_by() != KohyaLatentFiles(sd1).made_by()  # (the VAE put back: its files are the changed one's)
    _, disk, _ = _latents(sd1, folder, flip=True)
    assert (disk.read, disk.encoded) == (0, 2)


def test_latent_files_without_a_valid_record_are_trusted_and_counted(sd1, tmp_path):
    folder = tmp_path / "imgs"
    _, _, files = _latents(sd1, folder)
    # kohya re-encodes img0 with its own VAE: its writer keeps sdadapt's record, not sdadapt's latents
    latents, size, crop, _, _ = _kohya_load_latents(files[0])
    _kohya_save_latents(files[0], torch.from_numpy(latents) + 1.0, size, crop)
    assert "sdadapt" in np.load(files[0]).files
    # a kohya file without any record
    np.savez(files[1], latents=latents, original_size=np.array(size), crop_ltrb=np.array(crop))
    dataset, disk, _ = _latents(sd1, folder)
    assert (disk.read, disk.encoded, disk.trusted, disk.rewritten) == (2, 0, 2, [])
    assert any(line.strip().startswith("2 of the files read carry no record of the VAE") for line in disk.report())
    bucket = next(iter(dataset.latents))
    scaled = sd1.scale_vae_latents(torch.from_numpy(latents) + 1.0)
    assert any(torch.equal(row, scaled) for row in dataset.latents[bucket])  # kohya's latents, as kohya uses them
