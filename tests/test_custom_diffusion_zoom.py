"""Custom Diffusion's resize ("zoom") augmentation (``train custom-diffusion --resize-aug``,
``PixelAugment(resize_aug=True)``) against the reference it follows:

* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  examples/custom_diffusion/train_custom_diffusion.py: ``CustomDiffusionDataset.preprocess``
  (L239-258), the draws in ``__getitem__`` (L269-281), the class images unaugmented with an all-ones
  ``class_mask`` (L293-299), the loss ``((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()``
  (L1175-1188).
* adobe-research/custom-diffusion@7c19c9a7820d07389f5390e09d7b85d702bafd7b src/finetune_data.py
  L212-262 and src/model.py L237-240: the same idea (differences listed in docs/custom-diffusion.md).

Transcriptions below are float64 NumPy/PIL, with NumPy's global draws replaced by the numbers given
(``preprocess``) or by the same calls on a ``random.Random`` (the draws), so both sides consume
identical numbers. sdadapt's loss is diffusers' / C (tests/test_custom_diffusion_reference.py).
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.nn import functional as F
from train_inputs import captioned_pngs

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.fit import epoch_batches_of
from sdadapt.toy import build_toy
from sdadapt.training import diffusion
from sdadapt.training.data import Dataset, _load, encode_buckets, find_images, plan_dataset
from sdadapt.training.diffusion import diffusion_loss, region_loss_mask
from sdadapt.training.loss_masks import LossMaskSource
from sdadapt.training.pixel_augment import PixelAugment, ResizeDraw, draw_resize, resize_mask, resize_pixels


# ------------------------------------------------------------------ the reference, transcribed
def diffusers_draws(size: int, rng: random.Random) -> tuple[int, int, int, str]:
    """train_custom_diffusion.py@58eb52c L269-281 (and L244's offsets), each ``np.random`` call made on
    ``rng``: ``np.random.uniform()`` -> ``rng.random()``, ``np.random.randint(a, b)`` -> ``rng.randint(a, b - 1)``,
    ``np.random.choice(l)`` -> ``rng.choice(l)``. Returns (random_scale, top, left, prefix)."""
    random_scale = (
        rng.randint(size // 3, size + 1 - 1)  # np.random.randint(self.size // 3, self.size + 1)
        if rng.random() < 0.66  # np.random.uniform() < 0.66
        else rng.randint(int(1.2 * size), int(1.4 * size) - 1)  # np.random.randint(int(1.2 * size), int(1.4 * size))
    )
    outer, inner = size, random_scale  # preprocess, L240-244
    if random_scale > size:
        outer, inner = random_scale, size
    top, left = rng.randint(0, outer - inner + 1 - 1), rng.randint(0, outer - inner + 1 - 1)
    prefix = ""
    if random_scale < 0.6 * size:  # L278-281
        prefix = rng.choice(["a far away ", "very small "])
    elif random_scale > size:
        prefix = rng.choice(["zoomed in ", "close up "])
    return random_scale, top, left, prefix


def diffusers_preprocess(image: Image.Image, scale: int, *, size: int, mask_size: int, top: int, left: int):
    """``CustomDiffusionDataset.preprocess`` (L239-258) with L244's ``top, left`` given; float64 (diffusers
    casts to float32). -> (instance_image (size, size, 3), mask (size // f, size // f))."""
    outer, inner = size, scale
    factor = size // mask_size
    if scale > size:
        outer, inner = scale, size
    assert 0 <= top <= outer - inner and 0 <= left <= outer - inner
    image = image.resize((scale, scale), resample=Image.BILINEAR)  # self.interpolation = Image.BILINEAR (L194)
    image = np.array(image).astype(np.uint8)
    image = image / 127.5 - 1.0
    instance_image = np.zeros((size, size, 3), dtype=np.float64)
    mask = np.zeros((size // factor, size // factor))
    if scale > size:
        instance_image = image[top: top + inner, left: left + inner, :]
        mask = np.ones((size // factor, size // factor))
    else:
        instance_image[top: top + inner, left: left + inner, :] = image
        mask[top // factor + 1: (top + scale) // factor - 1, left // factor + 1: (left + scale) // factor - 1] = 1.0
    return instance_image, mask


def diffusers_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1186-1188: ``F.mse_loss(reduction="none")``, ``((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()``
    (mask (B, 1, h, w), ``collate_fn``'s ``mask.unsqueeze(1)``); float64."""
    loss = F.mse_loss(pred.double(), target.double(), reduction="none")
    mask = mask.double()
    return ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()


# ------------------------------------------------------------------ (a) draws, pixels, mask, prefix
@pytest.mark.parametrize("size", [32, 48, 512])
def test_the_draws_are_diffusers_in_its_order(size):
    kinds = set()
    for seed in range(300):
        ours = draw_resize((size, size), random.Random(seed))
        scale, top, left, prefix = diffusers_draws(size, random.Random(seed))
        assert (ours.scale, ours.top, ours.left, ours.prefix) == ((scale, scale), top, left, prefix)
        assert ours.larger == (scale > size)
        kinds.add("small" if scale < 0.6 * size else "large" if scale > size else "between")
    assert kinds == {"small", "between", "large"}


def test_two_thirds_of_the_draws_shrink():
    rng = random.Random(0)
    draws = [draw_resize((30, 30), rng) for _ in range(4000)]
    shrunk = sum(not d.larger for d in draws) / len(draws)
    assert abs(shrunk - 0.66) < 0.025
    assert {d.scale[0] for d in draws} == set(range(10, 31)) | set(range(36, 42))  # [h//3, h] and [int(1.2h), int(1.4h))


@pytest.mark.parametrize(("size", "mask_size"), [(32, 16), (48, 6)])  # the toy's factor 2, SD's 8
@pytest.mark.parametrize("scale", ["smallest", "small", "between", "same", "large", "largest"])
def test_pixels_mask_and_prefix_are_diffusers_preprocess(size, mask_size, scale):
    scale = {"smallest": size // 3, "small": int(0.45 * size), "between": int(0.8 * size), "same": size,
             "large": int(1.2 * size), "largest": int(1.4 * size) - 1}[scale]
    rng = np.random.default_rng(scale)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # the bucket-sized image sdadapt rescales
    pixels = torch.from_numpy(array).permute(2, 0, 1).double() / 127.5 - 1  # (3, h, w) in [-1, 1], as read_image
    slack = abs(scale - size)
    for top, left in {(0, 0), (slack, slack), (slack // 2, slack), (slack, 0), (slack // 3, slack // 2)}:
        prefix = "" if 0.6 * size <= scale <= size else ("very small " if scale < size else "close up ")
        draw = ResizeDraw(size=(size, size), scale=(scale, scale), top=top, left=left, prefix=prefix)
        want, want_mask = diffusers_preprocess(Image.fromarray(array), scale, size=size, mask_size=mask_size, top=top, left=left)
        ours = resize_pixels(pixels, draw).permute(1, 2, 0).numpy()
        # PIL resizes in 8-bit (rounded to a level); sdadapt in float: within one level, the canvas exactly 0
        np.testing.assert_allclose(ours, want, rtol=0, atol=1.0001 / 127.5)
        mask = resize_mask(draw, (mask_size, mask_size))
        assert mask.shape == (1, mask_size, mask_size) and mask.dtype == torch.float32
        assert np.array_equal(mask[0].numpy(), want_mask)
        if scale <= size:  # outside the placed image: zeros, as the canvas
            outside = np.ones((size, size), dtype=bool)
            outside[top: top + scale, left: left + scale] = False
            assert (ours[outside] == 0).all()


def test_a_non_square_bucket_draws_the_height_and_scales_the_width_in_proportion():
    for seed in range(60):
        draw = draw_resize((24, 40), random.Random(seed))
        (s, sw), want = draw.scale, diffusers_draws(24, random.Random(seed))
        assert s == want[0] and sw == round(s * 40 / 24) and draw.top == want[1]
        assert 0 <= draw.left <= abs(sw - 40)
        image = resize_pixels(torch.rand(3, 24, 40) * 2 - 1, draw)
        assert image.shape == (3, 24, 40)
        mask = resize_mask(draw, (3, 5))  # factor 8 both ways
        if draw.larger:
            assert mask.all()
        else:
            assert mask[0].sum().item() == (max(0, (draw.top + s) // 8 - 1 - (draw.top // 8 + 1))
                                            * max(0, (draw.left + sw) // 8 - 1 - (draw.left // 8 + 1)))


# ------------------------------------------------------------------ (b) the loss
def test_the_region_loss_is_diffusers_over_c():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    mask[0] = 1  # an enlarged image: everywhere
    mask[1, :, 3, 5] = 1  # a small image: one latent pixel
    mask[2, :, 1:6, 2:4] = 1
    mask[3, :, 2:7, 0:8] = 1
    ours = diffusion_loss(pred, target, mask=region_loss_mask(mask))
    torch.testing.assert_close(ours, diffusers_loss(pred, target, mask) / 4, rtol=1e-12, atol=0)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)  # (min-SNR and the like: per-sample factors)
    per = (F.mse_loss(pred, target, reduction="none") * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3]) / 4
    torch.testing.assert_close(diffusion_loss(pred, target, mask=region_loss_mask(mask), weights=weights),
                               (per * weights).mean(), rtol=1e-12, atol=0)
    # kohya's masked loss (the mask as weights, a mean over every element) is still what a plain mask gives
    torch.testing.assert_close(diffusion_loss(pred, target, mask=mask),
                               (F.mse_loss(pred, target, reduction="none") * mask).mean([1, 2, 3]).mean(), rtol=1e-12, atol=0)


def test_an_empty_region_counts_as_zero_not_nan():
    pred, target = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 1:3, 1:3] = 1
    weights = region_loss_mask(mask)
    assert torch.equal(weights[1], torch.zeros(1, 4, 4)) and torch.equal(weights[0], mask[0] * 4)
    assert diffusion_loss(pred, target, mask=weights).item() == pytest.approx(0.5)  # (1 + 0) / 2
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        region_loss_mask(torch.ones(2, 3, 4, 4))


# ------------------------------------------------------------------ (c) training with it
def _images(tmp_path: Path, caption: str) -> Path:
    return captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption=caption)


def test_fit_trains_on_the_resized_pixels_prefixed_captions_and_region_loss(tmp_path, monkeypatch):
    """One library run: what the VAE encodes, the captions the adaptation tokenizes and the loss mask
    the step weighs are a replay of the seeded draws (the class images: none here)."""
    texts = ["a red circle", "", "a red square"]  # (an empty caption stays empty: no prefix)
    records, _ = find_images(captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption=texts))
    plan_dataset(records, resolution=32, step=4)
    dataset = Dataset(records, augment=PixelAugment(resize_aug=True))
    system = build_toy(seed=1)
    encode_buckets(dataset, system.encode_images)
    assert not dataset.latents and dataset.members  # nothing cached
    adaptation = METHODS["custom-diffusion"].adapt(system, seed=0, token="red")
    seen: dict[str, list] = {"pixels": [], "captions": [], "masks": []}
    encode, tokenize, loss = system.encode_images, adaptation.tokenize, diffusion.diffusion_loss
    monkeypatch.setattr(system, "encode_images", lambda x: (seen["pixels"].append(x.clone()), encode(x))[1])
    monkeypatch.setattr(adaptation, "tokenize", lambda c: (seen["captions"].append(list(c)), tokenize(c))[1])
    monkeypatch.setattr(diffusion, "diffusion_loss", lambda *a, **k: (seen["masks"].append(k.get("mask")), loss(*a, **k))[1])
    config = FitConfig(steps=3, batch_size=2, seed=0, learning_rate=1e-3, warmup_steps=0)
    losses = fit(system, adaptation, dataset, config=config)
    assert len(losses) == 3 and all(np.isfinite(losses))
    per_epoch = len(epoch_batches_of(dataset, config))
    prefixes, empty = set(), False
    for micro in range(3):
        bucket, positions = epoch_batches_of(dataset, config, epoch=micro // per_epoch)[micro % per_epoch]
        batch = [dataset.records[dataset.members[bucket][p]] for p in positions]
        rng = random.Random(f"0/pixels/{micro}")  # (no random crop, colour or flip: the resize's draws only)
        draws = [draw_resize((32, 32), rng) for _ in batch]
        want = torch.stack([resize_pixels(_load(r), d) for r, d in zip(batch, draws)])
        assert torch.equal(seen["pixels"][micro], want)
        assert seen["captions"][micro] == [d.prefix + r.caption if r.caption else "" for r, d in zip(batch, draws)]
        empty |= "" in seen["captions"][micro]
        want_mask = region_loss_mask(torch.stack([resize_mask(d, (16, 16)) for d in draws]))
        assert torch.equal(seen["masks"][micro], want_mask)
        prefixes.update(d.prefix for d in draws)
    assert len(prefixes) > 1 and empty
    adaptation.remove()


def test_fit_refuses_resize_with_loss_masks(tmp_path):
    records, _ = find_images(_images(tmp_path, "a red circle"))
    plan_dataset(records, resolution=32, step=4)
    dataset = Dataset(records, augment=PixelAugment(resize_aug=True), loss_masks=LossMaskSource())
    encode_buckets(dataset, lambda x: x)
    system = build_toy(seed=1)
    with pytest.raises(ValueError, match="loss masks"):
        fit(system, METHODS["lora"].adapt(system, seed=1), dataset, config=FitConfig(steps=1))


def test_train_resize_aug_records_it_resumes_it_and_leaves_class_images_alone(tmp_path, monkeypatch, capsys):
    """``train custom-diffusion --resize-aug`` with class images (--reg-data-dir): one draw per training
    image per step (the class batch is not resized), run.json records it, a resumed run is the straight
    one bit for bit; an older record (no ``resize_aug``) resumes as off and refuses it on."""
    fit_module = importlib.import_module("sdadapt.methods.fit")  # (sdadapt.methods.fit is also the function)

    images = _images(tmp_path, "a <new1> circle")
    reg = captioned_pngs(tmp_path / "reg", [(32, 32)] * 2, caption="a circle")
    drawn: list[tuple[int, int]] = []
    real = fit_module.draw_resize
    monkeypatch.setattr(fit_module, "draw_resize", lambda size, rng: (drawn.append(size), real(size, rng))[1])
    args = ["train", "custom-diffusion", "--images", str(images), "--token", "<new1>", "--model", "toy", "--steps", "3",
            "--batch-size", "1", "--reg-data-dir", str(reg), "--resize-aug", "-q"]
    assert main([*args, "--save-every-n-steps", "1", "-o", str(tmp_path / "a.safetensors")]) == 0, capsys.readouterr().err
    assert drawn == [(32, 32)] * 3
    state = tmp_path / "a-state"
    record = json.loads((state / "run.json").read_text())
    assert record["augmentations"] == {"flip_aug": False, "random_crop": False, "color_aug": False, "resize_aug": True}
    assert main([*args, "--resume", str(state), "-o", str(tmp_path / "b.safetensors")]) == 0, capsys.readouterr().err
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    # a record written before the option: its augmentations table has no resize_aug
    del record["augmentations"]["resize_aug"]
    (state / "run.json").write_text(json.dumps(record))
    plain = [a for a in args if a != "--resize-aug"]
    assert main([*args, "--resume", str(state), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "resize_aug False (now True)" in capsys.readouterr().err
    drawn.clear()
    assert main([*plain, "--resume", str(state), "-o", str(tmp_path / "d.safetensors")]) == 0, capsys.readouterr().err
    assert drawn == []


def test_train_refuses_resize_aug_where_it_does_not_apply(tmp_path, capsys):
    images = _images(tmp_path, "a <new1> circle")
    assert main(["train", "lora", "--images", str(images), "--no-prior", "--resize-aug", "--steps", "1",
                 "-o", str(tmp_path / "l.safetensors")]) == 2
    assert "Custom Diffusion's resize augmentation" in capsys.readouterr().err
    assert main(["train", "custom-diffusion", "--images", str(images), "--token", "<new1>", "--resize-aug", "--alpha-mask",
                 "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "--alpha-mask" in capsys.readouterr().err
