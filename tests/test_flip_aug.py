"""kohya's ``flip_aug`` with cached latents: the mirrored images' latents are cached beside the plain
ones and each use of an image takes one of the two by a seeded coin.

kohya (library/train_util.py): ``cache_batch_latents(..., flip_aug, ...)`` encodes
``torch.flip(img_tensors, dims=[3])`` into ``info.latents_flipped``; ``__getitem__`` draws
``flipped = subset.flip_aug and random.random() < 0.5`` per image and takes
``image_info.latents_flipped`` when it is true; SDXL's crop conditioning of a flipped image is
``(target_w - crop_right, crop_top)``: the crop's left edge as seen in the mirrored image.
sdadapt draws the coin from ``random.Random(f"{seed}/flip/{micro}")`` so that a resumed run
continues the same draws.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from fit_runs import toy_lora_fit
from safetensors import safe_open
from train_inputs import lora_train_args

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import (
    Dataset,
    ImageRecord,
    _load,
    encode_buckets,
    find_images,
    flip_draws,
    plan_dataset,
    records_from_tensors,
    size_conditioning,
)
from sdadapt.training.host_syncs import HostSyncs


def _pixel_unshuffle_reference(image: torch.Tensor) -> torch.Tensor:
    """The toy VAE (pixel_unshuffle by 2) written out in float64: out[4c + 2dy + dx, y, x] = in[c, 2y + dy, 2x + dx]."""
    c, h, w = image.shape
    out = torch.empty(4 * c, h // 2, w // 2, dtype=torch.float64)
    for ch in range(c):
        for dy in range(2):
            for dx in range(2):
                out[4 * ch + 2 * dy + dx] = image[ch, dy::2, dx::2].double()
    return out


def test_the_flipped_cache_is_the_latents_of_the_mirrored_images(three_shapes):
    system = build_toy(seed=1)
    records, _ = find_images(three_shapes)
    plan_dataset(records, resolution=32, step=4)
    assert len({r.bucket for r in records}) >= 2
    flipped = Dataset(records, flip=True)
    encode_buckets(flipped, system.encode_images, batch=2)
    plain = Dataset(records)
    encode_buckets(plain, system.encode_images, batch=2)
    assert not plain.latents_flipped and set(flipped.latents_flipped) == set(flipped.latents)
    for bucket, members in flipped.members.items():
        assert torch.equal(flipped.latents[bucket], plain.latents[bucket])  # the plain cache does not change
        for row, index in enumerate(members):
            pixels = _load(records[index])  # (3, bh, bw)
            mirrored = pixels[:, :, torch.arange(pixels.shape[2] - 1, -1, -1)]  # column x -> width - 1 - x
            want = _pixel_unshuffle_reference(mirrored)
            assert torch.equal(flipped.latents_flipped[bucket][row].double(), want)
            assert not torch.equal(flipped.latents_flipped[bucket][row], flipped.latents[bucket][row])
    assert flipped.latent_bytes() == 2 * plain.latent_bytes()


def test_flip_draws_are_a_fair_seeded_coin_on_their_own_stream():
    draws = [flip_draws(3, micro, 4) for micro in range(500)]
    assert draws == [flip_draws(3, micro, 4) for micro in range(500)]  # a pure function of (seed, micro)
    assert draws != [flip_draws(4, micro, 4) for micro in range(500)]
    heads = sum(map(sum, draws))
    assert abs(heads - 1000) < 5 * (2000 * 0.25) ** 0.5  # 2000 fair coins: within 5 standard deviations
    # kohya's coin, random.random() < 0.5, on the stream "seed/flip/micro" (not the caption stream "seed/captions/micro")
    rng = random.Random("3/flip/7")
    assert flip_draws(3, 7, 4) == [rng.random() < 0.5 for _ in range(4)]


def test_the_size_conditioning_of_a_mirrored_crop_is_the_crop_of_the_mirrored_image():
    """Columns numbered 0..49 in a 50-wide scaled image, cropped 40 wide at left 3 and mirrored: the
    same columns as the mirrored scaled image cropped at the left edge ``size_conditioning`` gives."""
    record = ImageRecord(None, "x", size=(30, 47), bucket=(32, 40), resized=(32, 50), crop=(0, 3))
    columns = torch.arange(50)
    left = record.crop[1]
    mirrored_crop = columns[left: left + 40].flip(0)
    orig_h, orig_w, crop_top, crop_left, target_h, target_w = size_conditioning(record, flipped=True)
    assert torch.equal(columns.flip(0)[crop_left: crop_left + 40], mirrored_crop)
    assert (orig_h, orig_w, crop_top, target_h, target_w) == (30, 47, 0, 32, 40) and crop_left == 7
    assert size_conditioning(record) == (30, 47, 0, 3, 32, 40)  # unflipped: as before
    assert size_conditioning(record, crop=(0, 8), flipped=True) == (30, 47, 0, 2, 32, 40)  # a random crop's window


def _dataset(flip: bool) -> Dataset:
    system = build_toy(seed=1)
    pixels, captions = concept_data("cross", 4, seed=0)
    dataset = Dataset(records_from_tensors(pixels, captions), flip=flip)
    encode_buckets(dataset, system.encode_images, images=pixels)
    return dataset


def test_both_latents_are_trained_on_and_a_resumed_run_makes_the_same_draws(tmp_path, monkeypatch):
    dataset = _dataset(True)
    (bucket,) = dataset.latents
    plain, mirrored = dataset.latents[bucket], dataset.latents_flipped[bucket]
    # 4 steps (8 coins; seed 0 draws both kinds in steps 1-2), saved after step 2: the resumed run takes steps 3-4
    losses, seen = toy_lora_fit(dataset, steps=4, save_at=2, state=tmp_path / "state", monkeypatch=monkeypatch)
    kinds = []
    for batch in seen:
        for row in batch:
            is_plain = any(torch.equal(row, p) for p in plain)
            is_mirrored = any(torch.equal(row, m) for m in mirrored)
            assert is_plain != is_mirrored  # every row is one image's latents, plain or mirrored
            kinds.append(is_mirrored)
    assert 0 < sum(kinds) < len(kinds)  # both occur (8 coins)
    assert toy_lora_fit(dataset, steps=4, monkeypatch=monkeypatch)[0] == losses  # seeded: the same run again
    resumed, resumed_seen = toy_lora_fit(dataset, steps=4, resume=tmp_path / "state", monkeypatch=monkeypatch)
    assert resumed == losses[2:]  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(resumed_seen, seen[2:], strict=True))
    other = toy_lora_fit(dataset, steps=2, seed=5, monkeypatch=monkeypatch)[1]  # another seed: other draws (steps 1-2)
    assert any(not torch.equal(a, b) for a, b in zip(other, seen))


def test_without_flip_aug_the_steps_are_as_before(monkeypatch):
    """flip off: each batch is exactly ``latents[bucket][positions]`` (what fit gave before) and the
    losses are bit for bit those of a flip run whose mirrored cache holds the plain latents — so the
    coin takes no draw from any other stream (noise, timesteps, captions)."""
    from sdadapt.methods.fit import epoch_batches_of

    off = _dataset(False)
    # 2 steps: seed 0 flips images in both (so the mirrored-cache runs below differ from / equal the plain one there)
    losses, seen = toy_lora_fit(off, steps=2, monkeypatch=monkeypatch)
    (bucket,) = off.latents
    order = epoch_batches_of(off, FitConfig(steps=2, batch_size=2, seed=0))
    assert all(torch.equal(batch, off.latents[bucket][positions]) for batch, (_, positions) in zip(seen, order, strict=False))
    same = _dataset(True)
    same.latents_flipped = {k: v.clone() for k, v in same.latents.items()}
    assert toy_lora_fit(same, steps=2, monkeypatch=monkeypatch)[0] == losses
    on = _dataset(True)
    assert toy_lora_fit(on, steps=2, monkeypatch=monkeypatch)[0] != losses


def test_flip_set_after_encoding_is_refused():
    dataset = _dataset(False)
    dataset.flip = True
    system = build_toy(seed=1)
    with pytest.raises(ValueError, match="set it before"):
        fit(system, METHODS["lora"].adapt(system, seed=1), dataset, config=FitConfig(steps=1, batch_size=2))


def test_flipping_adds_no_host_sync_to_the_steps():
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    pixels, captions = concept_data("cross", 4, seed=0)
    per_step: list[list] = []
    with HostSyncs() as syncs:
        dataset = Dataset(records_from_tensors(pixels, captions), flip=True)
        encode_buckets(dataset, system.encode_images, images=pixels)
        fit(system, adaptation, dataset, config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0),
            on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    for events in per_step[1:]:
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))


# ------------------------------------------------------------------------------ train / CLI
def test_train_flip_aug_from_toml_and_flag_metadata_report_and_resume(three_shapes, tmp_path, capsys, train_fit_calls):
    config = tmp_path / "kohya.toml"
    config.write_text("[dataset_arguments]\nflip_aug = true\nrandom_crop = false\ncolor_aug = false\n")
    out = tmp_path / "f.safetensors"
    assert main(lora_train_args(three_shapes, "--config", config, "--steps", "4", "--save-every-n-steps", "2", "-o", out)) == 0
    err = capsys.readouterr().err
    flips = [call.dataset.flip for call in train_fit_calls]
    assert flips == [True] and "--flip-aug: the mirrored images' latents are cached too" in err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_flip_aug"] == "True"
    state = tmp_path / "f-state"
    assert json.loads((state / "run.json").read_text())["augmentations"] == {"flip_aug": True, "random_crop": False,
                                                                         "color_aug": False}
    # resuming needs the same setting (the draws continue); with it, the run ends where the straight one did
    assert main(lora_train_args(three_shapes, "--steps", "4", "-o", tmp_path / "g.safetensors", "--resume", state)) == 2
    assert "flip_aug True (now False)" in capsys.readouterr().err
    resumed = tmp_path / "r.safetensors"
    assert main(lora_train_args(three_shapes, "--flip-aug", "--steps", "4", "-o", resumed, "--resume", state, "-q")) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is not iterable)
    # off (the default): recorded as such
    plain = tmp_path / "p.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", plain, "-q")) == 0
    with safe_open(str(plain), "pt") as f:
        assert f.metadata()["ss_flip_aug"] == "False"
    flips = [call.dataset.flip for call in train_fit_calls]
    assert flips[-1] is False


def test_a_state_recorded_before_flip_aug_resumes_as_unflipped(three_shapes, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "2", "--save-every-n-steps", "1", "-o", out, "-q")) == 0
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    del record["augmentations"]
    record_file.write_text(json.dumps(record))
    assert main(lora_train_args(three_shapes, "--steps", "3", "--flip-aug", "-o", tmp_path / "b.safetensors", "--resume",
                       tmp_path / "a-state")) == 2
    assert "flip_aug False (now True)" in capsys.readouterr().err
    assert main(lora_train_args(three_shapes, "--steps", "3", "-o", tmp_path / "c.safetensors", "--resume", tmp_path / "a-state",
                       "-q")) == 0


def test_face_crop_aug_range_is_read_and_kohyas_off_values_pass(three_shapes, tmp_path, capsys):
    config = tmp_path / "k.toml"
    config.write_text('face_crop_aug_range = "2.0,4.0"\n')  # (with buckets, kohya uses no face: tests/test_face_crop_aug.py)
    assert main(lora_train_args(three_shapes, "--config", config, "--steps", "1", "-o", tmp_path / "x.safetensors")) == 0
    assert "face_crop_aug_range 2,4: unused with bucketing" in capsys.readouterr().err
    config.write_text('face_crop_aug_range = ""\nrandom_crop = false\ncolor_aug = false\nflip_aug = false\n')
    assert main(lora_train_args(three_shapes, "--config", config, "--steps", "1", "-o", tmp_path / "y.safetensors", "-q")) == 0
