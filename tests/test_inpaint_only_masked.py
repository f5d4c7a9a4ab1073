"""``generate --inpaint-full-res`` (A1111's "Inpaint area: Only masked"), the img2img conditioning of inpainting
models without a mask (``--inpainting-mask-weight``) and ``--inpainting-fill latent-noise`` under ``--noise a1111``:
against AUTOMATIC1111's ``modules/masking.py`` and ``modules/processing.py`` transcribed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdadapt import inpaint
from sdadapt.inpaint_crop import (
    crop_region,
    expand_crop_region,
    only_masked_region,
    paste_back,
)
from tests.test_img2img_resize import _a1111_resize_image
from tests.test_inpaint import inpainting_sd, plain_sd  # noqa: F401  (module fixtures: the tiny SD folders)


# ---------------------------------------------------------------------------------- A1111's masking.py, transcribed
def _a1111_get_crop_region(mask, pad=0):
    """A1111's ``get_crop_region`` before v2 (the column / row scans over a numpy mask (h, w)), for a mask with a
    non-zero pixel; ``get_crop_region_v2`` gives ``None`` for a blank one (``mask.getbbox()`` is ``None``)."""
    h, w = mask.shape
    if not mask.any():
        return None
    crop_left = 0
    for i in range(w):
        if not (mask[:, i] == 0).all():
            break
        crop_left += 1
    crop_right = 0
    for i in reversed(range(w)):
        if not (mask[:, i] == 0).all():
            break
        crop_right += 1
    crop_top = 0
    for i in range(h):
        if not (mask[i] == 0).all():
            break
        crop_top += 1
    crop_bottom = 0
    for i in reversed(range(h)):
        if not (mask[i] == 0).all():
            break
        crop_bottom += 1
    return (int(max(crop_left - pad, 0)), int(max(crop_top - pad, 0)), int(min(w - crop_right + pad, w)),
            int(min(h - crop_bottom + pad, h)))


def _a1111_expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    """A1111's ``masking.expand_crop_region``, as written there."""
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:  # noqa: PLR1730 - as A1111 writes it
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:  # noqa: PLR1730 - as A1111 writes it
            x2 = image_width
    return x1, y1, x2, y2


def _a1111_paste(generated, original, mask_for_overlay, crop):
    """A1111's ``uncrop`` + ``apply_overlay`` on PIL images: ``generated`` brought to the region by
    ``resize_image(1, ...)``, pasted on a transparent canvas, the original (``RGBa`` paste under the inverted
    mask) composited over it."""
    x1, y1, x2, y2 = crop
    base = Image.new("RGBA", original.size)
    base.paste(_a1111_resize_image(1, generated, x2 - x1, y2 - y1), (x1, y1))
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=Image.eval(mask_for_overlay, lambda v: 255 - v))
    base.alpha_composite(overlay.convert("RGBA"))
    return base.convert("RGB")


@st.composite
def _masks(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["blank", "box", "pixels"]))
    mask = np.zeros((h, w), np.uint8)
    if kind == "box":
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        mask[y0:draw(st.integers(y0 + 1, h)), x0:draw(st.integers(x0 + 1, w))] = draw(st.integers(1, 255))
    elif kind == "pixels":
        for _ in range(draw(st.integers(1, 6))):
            mask[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(st.integers(1, 255))
    return mask


@settings(max_examples=300, deadline=None)
@given(mask=_masks(), pad=st.integers(0, 48), width=st.integers(8, 96), height=st.integers(8, 96))
def test_crop_region_and_its_expansion_are_a1111s(mask, pad, width, height):
    ours = crop_region(torch.from_numpy(mask), pad)
    theirs = _a1111_get_crop_region(mask, pad)
    assert ours == theirs
    v2 = Image.fromarray(mask, "L").getbbox()  # (get_crop_region_v2's box before the padding)
    assert (ours is None) == (v2 is None)
    assert v2 is None or crop_region(torch.from_numpy(mask)) == v2  # (no padding: PIL's box itself)
    if theirs is None:
        assert only_masked_region(torch.from_numpy(mask), padding=pad, width=width, height=height) is None
        return
    h, w = mask.shape
    expanded = expand_crop_region(ours, width=width, height=height, image_width=w, image_height=h)
    assert expanded == _a1111_expand_crop_region(theirs, width, height, w, h)
    assert only_masked_region(torch.from_numpy(mask), padding=pad, width=width, height=height) == expanded
    x1, y1, x2, y2 = expanded
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h  # (clamped to the image, never empty)
    assert x1 <= theirs[0] and y1 <= theirs[1] and x2 >= theirs[2] and y2 >= theirs[3]  # (only ever grown)


def test_crop_region_refuses_a_negative_padding_and_a_non_2d_mask():
    with pytest.raises(ValueError, match="--inpaint-full-res-padding must be >= 0"):
        crop_region(torch.ones(4, 4), -1)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        crop_region(torch.ones(1, 4, 4))


@pytest.mark.parametrize("crop,gen_size", [((5, 3, 29, 21), (32, 24)), ((0, 10, 40, 30), (16, 16)),
                                           ((12, 0, 20, 30), (24, 40))])
def test_paste_back_is_a1111s_uncrop_and_overlay(crop, gen_size):
    """Outside the mask every pixel is the original's, and every pixel is A1111's PIL result bit for bit (its
    8-bit Lanczos "Crop and resize", paste and alpha composite; a float resize was up to 10 levels off on random
    pixels)."""
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    mask = np.zeros((30, 40), np.uint8)
    x1, y1, x2, y2 = crop
    mask[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = rng.integers(0, 256, (y2 - y1 - 4, x2 - x1 - 4), dtype=np.uint8)
    mask_image = Image.fromarray(mask, "L")
    generated = rng.integers(0, 256, (gen_size[1], gen_size[0], 3), dtype=np.uint8)
    tensor = torch.from_numpy(generated).permute(2, 0, 1).float() / 127.5 - 1
    ours = np.asarray(paste_back(tensor, original=original, mask=mask_image, region=crop)).astype(np.int16)
    theirs = np.asarray(_a1111_paste(Image.fromarray(generated), original, mask_image, crop)).astype(np.int16)
    assert ours.shape == theirs.shape == (30, 40, 3)
    keep = mask == 0
    assert np.array_equal(ours[keep], np.asarray(original).astype(np.int16)[keep])
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()


# --------------------------------------------------------------------------------------------- end to end (CLI)
def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "3", "--quiet", "--out", str(out), *extra])


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _scene(tmp_path, mask_box=(20, 12, 27, 19)):
    """A 48 x 40 init image and a mask with one box (x1, y1, x2, y2) white."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:48]
    pixels = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 20, (40, 48, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = Image.new("L", (48, 40), 0)
    if mask_box is not None:
        mask.paste(255, mask_box)
    mask.save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def test_only_masked_end_to_end_is_a1111s_geometry(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """The region is A1111's (crop of the blurred mask, padding, expand to 32:24), the crop fed to the model is the
    "Resize and fill" of the region (latent mask = A1111's latmask of the cropped mask), the output has the init
    image's size, every pixel where the blurred mask is 0 (all outside the region) is the init image's bit for bit,
    and the rest is A1111's uncrop + overlay of the generated crop, bit for bit."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    init, mask_path = _scene(tmp_path)
    seen = {}
    real_overlay = InpaintInputs.overlay

    def spy(self, image):
        seen.update(inputs=self, generated=image.clone())
        return real_overlay(self, image)

    monkeypatch.setattr(InpaintInputs, "overlay", spy)
    assert _cli(plain_sd, tmp_path / "out.png", "--init-image", str(init), "--mask", str(mask_path), "--mask-blur",
                "2", "--inpaint-full-res", "--inpaint-full-res-padding", "3", "--width", "32", "--height", "24") == 0
    out, source = _png(tmp_path / "out.png"), _png(init)
    assert out.shape == source.shape == (40, 48, 3)

    # A1111: binary mask, blur (OpenCV, tested against it in test_inpaint.py), get_crop_region_v2, expand
    raw = np.asarray(Image.open(mask_path).convert("L"), dtype=np.float32)
    blurred = inpaint.blur_mask(torch.from_numpy(raw), x=2, y=2).to(torch.uint8).numpy()
    region = _a1111_expand_crop_region(_a1111_get_crop_region(blurred, 3), 32, 24, 48, 40)
    assert seen["inputs"].region == region
    x1, y1, x2, y2 = region
    assert (blurred[:y1] == 0).all() and (blurred[y2:] == 0).all() and (blurred[:, :x1] == 0).all()
    assert (blurred[:, x2:] == 0).all()
    keep = blurred == 0
    assert np.array_equal(out[keep], source[keep])
    assert not np.array_equal(out, source)

    # the model's crop: A1111's resize_image(2, mask.crop(region)) -> latmask
    cropped_mask = _a1111_resize_image(2, Image.fromarray(blurred, "L").crop(region).convert("RGB"), 32, 24)
    theirs = inpaint.latent_mask(cropped_mask.convert("L"), (12, 16))
    assert torch.equal(seen["inputs"].latmask.cpu(), theirs)

    # the paste: A1111's uncrop + apply_overlay of the generated crop (8-bit, as A1111 has it)
    generated = ((seen["generated"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert generated.shape == (24, 32, 3)
    expected = _a1111_paste(Image.fromarray(generated), Image.open(init).convert("RGB"),
                            Image.fromarray(blurred, "L"), region)
    assert np.array_equal(out, np.asarray(expected).astype(np.int16))


def test_only_masked_with_a_blank_mask_is_plain_img2img_with_a_warning(plain_sd, tmp_path, capsys):  # noqa: F811
    init, blank = _scene(tmp_path, mask_box=None)
    assert _cli(plain_sd, tmp_path / "plain.png", "--init-image", str(init), "--width", "32", "--height", "32") == 0
    capsys.readouterr()
    assert _cli(plain_sd, tmp_path / "blank.png", "--init-image", str(init), "--mask", str(blank),
                "--inpaint-full-res", "--width", "32", "--height", "32") == 0
    err = capsys.readouterr().err
    assert "warning: --inpaint-full-res" in err and "blank" in err
    assert np.array_equal(_png(tmp_path / "blank.png"), _png(tmp_path / "plain.png"))


@pytest.mark.parametrize("extra,message", [
    (["--inpaint-full-res"], "--inpaint-full-res only applies with --mask IMAGE"),
    (["--init-image", "{init}", "--mask", "{mask}", "--inpaint-full-res-padding", "8"],
     "--inpaint-full-res-padding only applies with --inpaint-full-res"),
])
def test_only_masked_flags_need_their_partner(plain_sd, tmp_path, capsys, extra, message):  # noqa: F811
    init, mask = _scene(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # (a usage error, before anything is loaded)
        _cli(plain_sd, tmp_path / "a.png", *[a.format(init=init, mask=mask) for a in extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_only_masked_refuses_a_negative_padding_and_takes_a_mask_of_another_size(tmp_path):
    """(--resize-mode is taken with --inpaint-full-res, as by A1111: tests/test_generate_a1111_leftovers.py; a mask
    of another size is taken as A1111 takes it: tests/test_generate_masks_a1111.py.)"""
    from sdadapt.jobs.generate_inpaint import check_inpaint_options

    init, mask = _scene(tmp_path)
    with pytest.raises(ValueError, match="--inpaint-full-res-padding must be >= 0"):
        check_inpaint_options(mask=mask, init_image=init, mask_blur=None, invert_mask=False, inpainting_fill="original",
                              inpainting_mask_weight=1.0, inpaint_full_res=True, inpaint_full_res_padding=-4)
    Image.new("L", (20, 20), 255).save(tmp_path / "small.png")
    check_inpaint_options(mask=tmp_path / "small.png", init_image=init, mask_blur=None, invert_mask=False,
                          inpainting_fill="original", inpainting_mask_weight=1.0, inpaint_full_res=True)


def test_only_masked_fits_the_crop_by_resize_and_fill_with_a1111s_default_padding(plain_sd, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    """Without --inpaint-full-res-padding the region is A1111's with its default 32 pixels, and the crop the VAE
    encodes is A1111's ``resize_image(2, image.crop(region), width, height)``: a thin mask at the right edge of a
    48 x 40 image, generated at 64 x 16, gives a region clamped to the image (48 x 40, far from 4:1), where
    "Resize and fill", "Crop and resize" and "Just resize" all differ."""
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.jobs.generate_inpaint import InpaintInputs

    init, mask_path = _scene(tmp_path, mask_box=(42, 10, 46, 30))
    seen, encoded = {}, []
    real_overlay, real_encode = InpaintInputs.overlay, DiffusersSystem.encode_images

    def spy_overlay(self, image):
        seen.update(inputs=self)
        return real_overlay(self, image)

    def spy_encode(self, images):
        encoded.append(images.detach().cpu().clone())
        return real_encode(self, images)

    monkeypatch.setattr(InpaintInputs, "overlay", spy_overlay)
    monkeypatch.setattr(DiffusersSystem, "encode_images", spy_encode)
    assert _cli(plain_sd, tmp_path / "out.png", "--init-image", str(init), "--mask", str(mask_path), "--mask-blur",
                "0", "--inpaint-full-res", "--width", "64", "--height", "16") == 0
    raw = np.asarray(Image.open(mask_path).convert("L"))
    region = _a1111_expand_crop_region(_a1111_get_crop_region(raw, 32), 64, 16, 48, 40)
    assert seen["inputs"].region == region == (0, 0, 48, 40)
    theirs = _a1111_resize_image(2, Image.open(init).convert("RGB").crop(region), 64, 16)
    theirs = torch.from_numpy(np.asarray(theirs, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)
    assert encoded[0].shape == (1, 3, 16, 64)
    assert torch.equal(encoded[0][0], theirs)  # (A1111's 8-bit PIL pixels, in its float32 steps)


def test_latent_noise_fill_under_a1111_noise_is_each_images_seed_end_to_end(plain_sd, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    """``generate --noise a1111 --inpainting-fill latent-noise --count 2``: image i's init latent is A1111's
    ``init·mask + create_random_tensors(shape, [SEED + i])·nmask`` (the NV source's first draw for that seed)."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs
    from sdadapt.samplers.a1111_noise import A1111Noise

    init, mask_path = _scene(tmp_path, mask_box=(10, 8, 34, 30))
    made = []
    real = InpaintInputs.init_latents

    def spy(self, seed, *args, **kwargs):
        made.append((self, real(self, seed, *args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(InpaintInputs, "init_latents", spy)
    assert _cli(plain_sd, tmp_path / "out.png", "--init-image", str(init), "--mask", str(mask_path), "--width", "32",
                "--height", "32", "--inpainting-fill", "latent-noise", "--noise", "a1111", "--count", "2") == 0
    assert len(made) == 2
    for i, (inputs, latents) in enumerate(made):
        noise = A1111Noise([3 + i], source="nv").start_noise(tuple(inputs.init.shape))
        expected = inputs.init * (1 - inputs.latmask) + noise.to(inputs.init) * inputs.latmask
        assert inputs.latmask.sum() > 0 and torch.equal(latents, expected), (i, inputs.latmask.sum())


def test_check_inpaint_options_refuses_only_masked_without_its_partners(tmp_path):
    """The library check (``run_generate`` from Python has no argparse ``only_with``): --inpaint-full-res needs a
    --mask, its padding needs --inpaint-full-res."""
    from sdadapt.jobs.generate_inpaint import check_inpaint_options

    init, mask = _scene(tmp_path)
    common = {"init_image": init, "mask_blur": None, "invert_mask": False, "inpainting_fill": "original",
              "inpainting_mask_weight": 1.0}
    with pytest.raises(ValueError, match="--inpaint-full-res shape a --mask"):
        check_inpaint_options(mask=None, inpaint_full_res=True, **common)
    with pytest.raises(ValueError, match="--inpaint-full-res-padding is the margin of --inpaint-full-res"):
        check_inpaint_options(mask=mask, inpaint_full_res=False, inpaint_full_res_padding=8, **common)
    check_inpaint_options(mask=mask, inpaint_full_res=True, inpaint_full_res_padding=0, **common)

# ------------------------------------------------------------------- inpainting models: img2img without a mask
@pytest.mark.parametrize("weight", [0.0, 0.35, 1.0])
def test_img2img_conditioning_without_a_mask_is_a1111s_under_a_mask_of_ones(inpainting_sd, tmp_path,  # noqa: F811
                                                                          weight):
    """A1111's img2img_image_conditioning(image, latent, image_mask=None): conditioning_mask = ones, the masked
    image lerp(image, image·(1 − ones), W), encoded; [mask, latent]. W = 1: txt2img's grey image exactly."""
    from sdadapt.images import read_image
    from sdadapt.jobs.generate_inpaint import img2img_conditioning
    from sdadapt.jobs.models import load_system

    init, _ = _scene(tmp_path)
    system = load_system(str(inpainting_sd), device="cpu")
    ours = img2img_conditioning(system, init, height=40, width=48, inpainting_mask_weight=weight)
    source = read_image(init)[None].double()
    ones = torch.ones(1, 1, 40, 48, dtype=torch.float64)
    conditioning_image = torch.lerp(source, source * (1.0 - ones), weight)  # (A1111's, in float64)
    with torch.no_grad():
        latent = system.encode_images(conditioning_image.float())
    assert ours.shape == (1, 5, 20, 24)
    assert torch.equal(ours[:, :1], torch.ones(1, 1, 20, 24))
    torch.testing.assert_close(ours[:, 1:], latent, atol=1e-5, rtol=1e-5)
    if weight == 1.0:
        grey = system.inpainting_conditioning(*inpaint.txt2img_masked_image(1, 40, 48))
        assert torch.equal(ours, grey)


def test_cli_mask_weight_without_a_mask_changes_an_inpainting_models_img2img(inpainting_sd, tmp_path):  # noqa: F811
    init, _ = _scene(tmp_path)
    size = ["--width", "32", "--height", "32", "--init-image", str(init)]
    assert _cli(inpainting_sd, tmp_path / "w1.png", *size) == 0
    assert _cli(inpainting_sd, tmp_path / "w0.png", *size, "--inpainting-mask-weight", "0") == 0
    assert not np.array_equal(_png(tmp_path / "w1.png"), _png(tmp_path / "w0.png"))



def test_img2img_conditioning_uses_the_init_images_resize(inpainting_sd, tmp_path, monkeypatch):  # noqa: F811
    """A1111 encodes one resized ``image`` for both the init latent and the conditioning: at W = 0 the
    conditioning's latent is the init latent itself, under any --resize-mode (here "fill" of a 48 x 40 image to
    32 x 32)."""
    from sdadapt.jobs import generate_hires

    init, _ = _scene(tmp_path)
    seen = []
    real = generate_hires.sample_image

    def spy(system, texts, options, **kwargs):
        seen.append((options.get("inpaint_conditioning"), kwargs["init_latents"]))
        return real(system, texts, options, **kwargs)

    monkeypatch.setattr(generate_hires, "sample_image", spy)
    assert _cli(inpainting_sd, tmp_path / "out.png", "--init-image", str(init), "--width", "32", "--height", "32",
                "--resize-mode", "fill", "--inpainting-mask-weight", "0") == 0
    conditioning, init_latents = seen[0]
    assert conditioning.shape == (1, 5, 16, 16)
    torch.testing.assert_close(conditioning[:, 1:], init_latents.to(conditioning), atol=1e-5, rtol=1e-5)

# ------------------------------------------------------------------------ latent-noise fill under --noise a1111
@pytest.mark.parametrize("source", ["nv", "cpu"])
def test_latent_noise_fill_with_a1111_noise_is_create_random_tensors_of_the_seed(source):
    """A1111's init: ``init_latent·mask + create_random_tensors(shape[1:], seeds)·nmask`` — an ImageRNG of the seeds
    alone (no variation seed), its first draw: ``A1111Noise([seed]).start_noise`` without subseeds."""
    from sdadapt.jobs.generate_inpaint import InpaintInputs
    from sdadapt.samplers.a1111_noise import A1111Noise, A1111Seeds

    init = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    latmask = torch.zeros(1, 1, 6, 5)
    latmask[..., 2:5, 1:4] = 1
    inputs = InpaintInputs(init, latmask, None, "latent-noise")
    seeds = A1111Seeds(source=source, subseed=77, subseed_strength=0.5)  # (the fill ignores the variation seed)
    ours = inputs.init_latents(1234, seeds)
    noise = A1111Noise([1234], source=source).start_noise((1, 4, 6, 5))
    assert torch.equal(ours, init * (1 - latmask) + noise * latmask)
    cpu_default = inputs.init_latents(1234)
    assert torch.equal(cpu_default, init * (1 - latmask)
                       + torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1234)) * latmask)


def test_the_only_masked_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "only_masked_region")
