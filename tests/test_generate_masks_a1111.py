"""``generate --init-image --mask``'s image path against AUTOMATIC1111's, bit for bit on 8-bit PIL images: masks of
another size than the init image (every ``--resize-mode``, with and without ``--inpaint-full-res``), A1111's
``images.resize_image`` and OpenCV's 8-bit ``GaussianBlur`` (``--mask-blur``).

The references are transcribed here from A1111 v1.10 (``modules/processing.py``
``StableDiffusionProcessingImg2Img.init`` / ``apply_overlay`` / ``create_binary_mask``, ``modules/images.py``
``resize_image`` / ``flatten``, ``modules/masking.py`` ``get_crop_region_v2`` / ``expand_crop_region`` / ``fill``) and
OpenCV 4.x (``modules/imgproc/src/smooth.dispatch.cpp``: ``getGaussianKernelBitExact``,
``getGaussianKernelFixedPoint_ED``; ``test_smooth_bitexact.cpp``: its kernel vectors and its ``eval``), and run
with real PIL calls. No model: a stand-in system records what the VAE would encode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter, ImageOps

from sdadapt import inpaint
from sdadapt.inpaint_crop import resize_image
from sdadapt.jobs.generate_inpaint import inpaint_inputs
from sdadapt.pillow_resize import resize_across_first

MODES = {"just": 0, "crop": 1, "fill": 2}


# ------------------------------------------------------------------------------ OpenCV's 8-bit GaussianBlur
def _cv2_taps(sigma, n):
    """getGaussianKernelBitExact + getGaussianKernelFixedPoint_ED (fractionBits 8), transcribed."""
    xs = np.arange(n) - (n - 1) / 2
    w = np.exp(-xs * xs / (2 * sigma * sigma))
    w = w / (2 * w[: n // 2].sum() + 1.0)
    taps, err = np.zeros(n, dtype=np.int64), 0.0
    for i in range(n // 2):
        adjusted = w[i] * 256 + err
        taps[i] = taps[n - 1 - i] = round(adjusted)
        err = adjusted - taps[i]
    taps[n // 2] = 256 - 2 * taps[: n // 2].sum()
    return taps


def _cv2_blur(a, sigma, axis):
    """``cv2.GaussianBlur`` of a uint8 array along one axis (A1111's ``(k, 1)`` / ``(1, k)`` kernels): OpenCV's test
    ``eval`` — ``(Σ kᵢ·vᵢ·256 + 2¹⁵) >> 16``, the other axis' kernel [256] — with BORDER_REFLECT_101."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    taps = _cv2_taps(sigma, n)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (n // 2, n // 2)
    p = np.pad(a.astype(np.int64), pad, mode="reflect")  # (numpy's reflect: OpenCV's REFLECT_101)
    acc = sum(taps[j] * np.take(p, np.arange(j, j + a.shape[axis]), axis=axis) for j in range(n))
    return np.clip((acc * 256 + (1 << 15)) >> 16, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("sigma,size,theirs", [
    (1.75, 3, [81, 94, 81]), (0.875, 3, [65, 126, 65]), (0.375, 5, [0, 7, 242, 7, 0]), (0.75, 5, [4, 56, 136, 56, 4]),
])
def test_blur_kernel_is_opencvs_fixed_point_kernel(sigma, size, theirs):
    """OpenCV's own bit-exact vectors (test_smooth_bitexact.cpp, vU8) and the transcription here agree with sdadapt's
    taps (a float kernel rounded per tap would give [80, 95, 80] for σ 1.75)."""
    assert inpaint._gaussian_kernel(sigma, size) == theirs == _cv2_taps(sigma, size).tolist()


@settings(max_examples=25, deadline=None)
@given(h=st.integers(12, 40), w=st.integers(12, 40), sx=st.sampled_from([0, 0.5, 1, 1.5, 2, 3]),
       sy=st.sampled_from([0, 0.8, 1, 2, 3]), seed=st.integers(0, 2 ** 16), binary=st.booleans())
def test_blur_mask_is_opencvs_8bit_gaussian_blur_bit_for_bit(h, w, sx, sy, seed, binary):
    """A1111's two cv2.GaussianBlur calls (x, then y), each rounded to 8 bits in OpenCV's fixed point: a float64
    Gaussian rounded once per pass differs from it by 1-2 levels on ~10 % of a σ 4 mask's edge pixels."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8) * 255 if binary else rng.integers(0, 256, (h, w), np.uint8)
    theirs = mask
    if sx > 0:
        theirs = _cv2_blur(theirs, sx, 1)
    if sy > 0:
        theirs = _cv2_blur(theirs, sy, 0)
    ours = inpaint.blur_mask(torch.from_numpy(mask.astype(np.float32)), x=sx, y=sy)
    assert np.array_equal(ours.numpy(), theirs.astype(np.float32))


# ------------------------------------------------------------------------------------ A1111, transcribed
# A1111's images.resize_image and masking.expand_crop_region, as transcribed beside their first tests
from test_img2img_resize import _a1111_resize_image  # noqa: E402
from test_inpaint_only_masked import _a1111_expand_crop_region  # noqa: E402


def _a1111_fill(image, mask):
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def _a1111_init(img, image_mask, *, width, height, resize_mode, full_res, padding, blur, fill):
    """StableDiffusionProcessingImg2Img.init's image path (one init image, latent_mask None, inpainting_fill
    ``fill``, no invert): the pixels the VAE gets (1, 3, H, W), latmask (h, w), the overlay and paste_to."""
    if image_mask.mode == "RGBA" and image_mask.getextrema()[-1] != (255, 255):  # create_binary_mask
        image_mask = image_mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        image_mask = image_mask.convert("L")
    if blur > 0:
        image_mask = Image.fromarray(_cv2_blur(np.array(image_mask), blur, 1))
        image_mask = Image.fromarray(_cv2_blur(np.array(image_mask), blur, 0))
    crop_region = paste_to = None
    if full_res:
        mask_for_overlay = image_mask
        mask = image_mask.convert("L")
        box = mask.getbbox()  # get_crop_region_v2
        assert box is not None  # (the cases here have a region)
        crop_region = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, mask.width),
                       min(box[3] + padding, mask.height)) if padding else box
        crop_region = _a1111_expand_crop_region(crop_region, width, height, mask.width, mask.height)
        x1, y1, x2, y2 = crop_region
        mask = mask.crop(crop_region)
        image_mask = _a1111_resize_image(2, mask, width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        image_mask = _a1111_resize_image(resize_mode, image_mask, width, height)
        np_mask = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        mask_for_overlay = Image.fromarray(np_mask)
    latent_mask = image_mask

    if img.mode == "RGBA":  # images.flatten(img, "#ffffff")
        background = Image.new("RGBA", img.size, "#ffffff")
        background.paste(img, mask=img)
        img = background
    image = img.convert("RGB")
    if crop_region is None:
        image = _a1111_resize_image(resize_mode, image, width, height)
    if mask_for_overlay.size != (image.width, image.height):
        mask_for_overlay = _a1111_resize_image(resize_mode, mask_for_overlay, image.width, image.height)
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    overlay = image_masked.convert("RGBA")
    if crop_region is not None:
        image = image.crop(crop_region)
        image = _a1111_resize_image(2, image, width, height)
    if fill != 1:
        image = _a1111_fill(image, latent_mask)
    pixels = torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))[None] * 2 - 1

    latmask = resize_across_first(latent_mask.convert("RGB"), (width // 8, height // 8))  # (A1111's Pillow 9.5)
    latmask = np.around(np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255)[0]
    return pixels, latmask, overlay, paste_to


def _a1111_apply_overlay(image, paste_loc, overlay):
    if paste_loc is not None:
        x, y, w, h = paste_loc
        base_image = Image.new("RGBA", (overlay.width, overlay.height))
        image = _a1111_resize_image(1, image, w, h)
        base_image.paste(image, (x, y))
        image = base_image
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


class _Encoder:
    """A stand-in system: records the pixels the VAE gets and returns an 8x smaller 'latent' (a plain UNet)."""

    alphas_cumprod = torch.ones(1)

    def __init__(self):
        self.seen = []

    def encode_images(self, images):
        self.seen.append(images.detach().clone())
        return torch.nn.functional.avg_pool2d(images, 8)


# ------------------------------------------------------------------------------------- resize_image itself
@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), H=st.integers(1, 40), W=st.integers(1, 40),
       mode=st.sampled_from(list(MODES)), kind=st.sampled_from(["L", "RGB"]), seed=st.integers(0, 2 ** 16))
def test_resize_image_is_a1111s_bit_for_bit(h, w, H, W, mode, kind, seed):
    """PIL's own calls in A1111's order: every mode, any two sizes and aspects, masks (L) and images (RGB); A1111's
    canvas is RGB, whose convert("L") of an L mask gives the mask's values back."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if kind == "L" else (h, w, 3)
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), kind)
    try:
        theirs = _a1111_resize_image(MODES[mode], im, W, H)
    except ValueError:  # (a side scaled to 0 pixels: PIL refuses it in A1111, sdadapt names the fix)
        with pytest.raises(ValueError, match="would be .* pixels; use another --resize-mode"):
            resize_image(im, W, H, mode=mode)
        return
    ours = resize_image(im, W, H, mode=mode)
    assert ours.size == theirs.size == (W, H) and ours.mode == kind
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert(kind)))


def test_resize_image_refuses_an_unknown_mode_and_an_empty_size():
    im = Image.new("L", (4, 4))
    with pytest.raises(ValueError, match="resize mode must be one of just, crop, fill"):
        resize_image(im, 4, 4, mode="latent")
    with pytest.raises(ValueError, match="at least 1 x 1"):
        resize_image(im, 0, 4)


# ------------------------------------------------------------------------- the whole image path, end to end
def _files(tmp_path, image_size, mask_size, box, *, rgba_image=False, rgba_mask=False, seed=0):
    """An init image of ``image_size`` (w, h) (random pixels; RGBA with random alpha if asked) and a mask of
    ``mask_size`` with one box (x1, y1, x2, y2) in its own pixels (L, or RGBA transparent outside the box)."""
    rng = np.random.default_rng(seed)
    w, h = image_size
    pixels = rng.integers(0, 256, (h, w, 4 if rgba_image else 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA" if rgba_image else "RGB").save(tmp_path / "init.png")
    mask = np.zeros(mask_size[::-1], dtype=np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    if rgba_mask:
        alpha = mask
        mask = np.dstack([np.full_like(alpha, 90)] * 3 + [alpha])
    Image.fromarray(mask, "RGBA" if rgba_mask else "L").save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


CASES = [  # (init image (w, h), mask (w, h), mask box, output (w, h))
    ((48, 40), (24, 20), (6, 4, 14, 12), (32, 24)),  # a smaller mask, the same aspect
    ((48, 40), (64, 72), (30, 20, 50, 44), (32, 32)),  # a larger mask, another aspect
    ((40, 56), (56, 40), (8, 10, 20, 30), (24, 40)),  # turned round
    ((48, 40), (48, 40), (10, 6, 22, 20), (40, 16)),  # the same size (a wide output: fill bands, crop cuts)
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("full_res", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_inpaint_inputs_are_a1111s_for_masks_of_any_size(tmp_path, mode, full_res, case):
    """Masks of another size than the init image, each resize mode, whole picture and only masked: the pixels the
    VAE encodes, the latent mask, the crop region and the final overlay of a generated image are A1111's bit for bit
    (blur 2 at the mask's own size; "Only masked" finds the region in the mask's pixels and cuts the image there,
    and brings the mask to the image's size by the resize mode only for the overlay)."""
    image_size, mask_size, box, (width, height) = CASES[case]
    init, mask = _files(tmp_path, image_size, mask_size, box, seed=case)
    system = _Encoder()
    got = inpaint_inputs(system, init, mask, height=height, width=width, mask_blur=2, resize_mode=mode,
                         inpaint_full_res=full_res, inpaint_full_res_padding=5)
    pixels, latmask, overlay, paste_to = _a1111_init(Image.open(init).convert("RGBA"), Image.open(mask),
                                                     width=width, height=height, resize_mode=MODES[mode],
                                                     full_res=full_res, padding=5, blur=2, fill=1)
    assert torch.equal(system.seen[0], pixels)
    assert np.array_equal(got.latmask[0, 0].numpy(), latmask)
    if full_res:
        x, y, w, h = paste_to
        assert got.region == (x, y, x + w, y + h)
    else:
        assert got.region is None

    generated = np.random.default_rng(9).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = got.overlay(torch.from_numpy(generated).permute(2, 0, 1).float() / 127.5 - 1)
    theirs = np.asarray(_a1111_apply_overlay(Image.fromarray(generated), paste_to, overlay))
    assert ours.shape[1:] == theirs.shape[:2] == ((image_size[1], image_size[0]) if full_res else (height, width))
    assert np.array_equal(((ours + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(), theirs)


@pytest.mark.parametrize("full_res", [False, True])
def test_fill_rgba_image_and_alpha_mask_of_another_size_are_a1111s(tmp_path, full_res):
    """"Masked content: fill" (masking.fill on the resized pixels), an RGBA init image flattened on white by PIL's
    paste (images.flatten) and an RGBA mask read from its alpha, the mask larger than the image: A1111's pixels,
    latent mask and overlay bit for bit."""
    init, mask = _files(tmp_path, (40, 32), (60, 48), (20, 12, 41, 30), rgba_image=True, rgba_mask=True, seed=4)
    system = _Encoder()
    got = inpaint_inputs(system, init, mask, height=32, width=24, mask_blur=3, resize_mode="crop",
                         inpainting_fill="fill", inpaint_full_res=full_res, inpaint_full_res_padding=4)
    pixels, latmask, overlay, paste_to = _a1111_init(Image.open(init).convert("RGBA"), Image.open(mask),
                                                     width=24, height=32, resize_mode=1, full_res=full_res,
                                                     padding=4, blur=3, fill=0)
    assert torch.equal(system.seen[0], pixels)
    assert np.array_equal(got.latmask[0, 0].numpy(), latmask)
    generated = np.random.default_rng(2).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    ours = got.overlay(torch.from_numpy(generated).permute(2, 0, 1).float() / 127.5 - 1)
    theirs = np.asarray(_a1111_apply_overlay(Image.fromarray(generated), paste_to, overlay))
    assert np.array_equal(((ours + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(), theirs)


# ------------------------------------------------------------------ review R2: recorded OpenCV, 9-channel models
#: ``cv2.GaussianBlur(row, (k, 1), σ)`` (opencv-python-headless 4.12.0.88, the 8-bit fixed-point path), k = A1111's
#: ``2·int(2.5σ + 0.5) + 1``, of the row ``(i·97 + 13) % 256`` (1 x (k + 3)): σ not whole and up to A1111's slider
#: maximum 64 (a 321-tap kernel), as hex bytes
_OPENCV_ROWS = {
    0.3: "0e6ece3191f1",
    0.75: "3e6d936c91b68c8c",
    1.25: "5d6b7c82919b8f745e52",
    2.6: "75767b8084868483818285898b8b85807978",
    4: "7b7d7d7f818182838486868887878683817d7a7673706f6e",
    5.5: "7f807e8080818382858483858383847f817e7b7d787879757775757774757674",
    8: "847f818280828082837f82827f817f807f7d7e7d7b7c7c7a7b7b7a7c7c7c7f7d7f817f848284858587868689",
    12.4: ("8280818280818080817e80817e807e7f807d7f7e7e7f7e7e7e7e7e7d7f7f7f7e80808080818181828482828383838483"
          "848385838485848383848483838383838283"),
    23.7: ("80807f80807f817e80807f807f7f827e817f81817e818080817f81817e837e80827e8280808280818181828180828081"
          "8181818280828181847f82827f838180847e82827f828180828081817f82817e82807f817f81807e827d7f827d827e7e"
          "807d7f7f7d807d7d7f7c807e7d7f7d7e7e7d807c7d7e7d7d7f7d"),
    64: ("7f8080817f827f837d7f837f81807f847d818180817c83808081827f817c828080827e81817d818181807f81817e8181"
          "827f7e837f80828080817c83807f828081807c827f81817f82807d818081817c83807f827e827f7d847d81827e837d7e"
          "837d827f80827e7f8081817e7f827e7f817e837f7c837e80817f807e7e837d80807f827d7e817f807f80807f7e807f81"
          "7d80817e7f80807f807f807f7e8081807e7e807e817e80817f7e7d80807e807f7f7f7e80807e7f817e7f7f81807d7f7f"
          "7d827d82817d7f7d80807e817f7e807e7f807c81817d7f7f7f817d7d827c807e81827a817f7c837a82817d807d7f817b"
          "837f7d807c827e7e817e7f7f7e827f7e7f7f7f7f7c847f7e807d7f807d817f7e807d817f7d817f7e7f7e837e7e807e7f"
          "807e837e7f807e817e7d82807e7f7e817e7f827d807d80837b817f7f7f7d82817f807d82"),
}


@pytest.mark.parametrize("sigma", list(_OPENCV_ROWS))
def test_blur_mask_equals_recorded_opencv_rows_for_fractional_and_large_sigma(sigma):
    """The taps for σ not whole and for large σ (OpenCV keeps its bit-exact fixed-point kernel for every size on
    8-bit images: no float fallback) — recorded from OpenCV itself, not transcribed."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    row = torch.tensor([[(i * 97 + 13) % 256 for i in range(k + 3)]], dtype=torch.float32)
    ours = inpaint.blur_mask(row, x=sigma, y=0).to(torch.uint8).numpy().tobytes().hex()
    assert ours == _OPENCV_ROWS[sigma]


#: ``cv2.GaussianBlur`` x then y (as A1111) of masks narrower than the kernel (opencv 4.12.0.88): OpenCV reflects
#: (BORDER_REFLECT_101) again and again, a 1-pixel side is left as it is; (σ, h, w, the result's hex bytes), the mask
#: ``(31·y + 57·x + 5) % 256``
_OPENCV_SMALL = [
    (4, 6, 9, "818181818181828282818181818182828383818181828182828282818181"
              "828182828383828282828282828282828282828282828383"),
    (2, 3, 1, "242424"),
    (1.5, 2, 5, "545f798e96545f798e96"),
]


@pytest.mark.parametrize("sigma,h,w,theirs", [pytest.param(*case, id=f"{case[0]}-{case[1]}x{case[2]}")
                                               for case in _OPENCV_SMALL])
def test_blur_mask_of_a_mask_narrower_than_the_kernel_is_opencvs(sigma, h, w, theirs):
    mask = torch.tensor([[(31 * y + 57 * x + 5) % 256 for x in range(w)] for y in range(h)], dtype=torch.float32)
    ours = inpaint.blur_mask(mask, x=sigma, y=sigma).to(torch.uint8).numpy().tobytes().hex()
    assert ours == theirs


class _InpaintingEncoder(_Encoder):
    """The stand-in with a 9-channel UNet: records what the inpainting conditioning gets (masked image, pixel mask)."""

    unet = type("U", (), {"config": type("C", (), {"in_channels": 9})()})()
    vae = type("V", (), {"config": type("C", (), {"latent_channels": 4})()})()

    def inpainting_conditioning(self, masked, mask):
        self.conditioned = (masked.detach().clone(), mask.detach().clone())
        return torch.zeros(1, 5, masked.shape[-2] // 8, masked.shape[-1] // 8)


def _a1111_image_mask(image_mask, *, width, height, resize_mode, full_res, padding, blur):
    """StableDiffusionProcessingImg2Img.init's ``image_mask`` (what img2img_image_conditioning gets): the mask part of
    _a1111_init."""
    image_mask = image_mask.convert("L")
    if blur > 0:
        image_mask = Image.fromarray(_cv2_blur(np.array(image_mask), blur, 1))
        image_mask = Image.fromarray(_cv2_blur(np.array(image_mask), blur, 0))
    if not full_res:
        return _a1111_resize_image(resize_mode, image_mask, width, height)
    box = image_mask.getbbox()
    region = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, image_mask.width),
              min(box[3] + padding, image_mask.height))
    region = _a1111_expand_crop_region(region, width, height, image_mask.width, image_mask.height)
    return _a1111_resize_image(2, image_mask.crop(region), width, height)


@pytest.mark.parametrize("full_res", [False, True])
@pytest.mark.parametrize("fill", ["original", "fill"])
@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_inpainting_model_conditioning_takes_the_resized_mask_of_a_mask_of_another_size(tmp_path, full_res, fill,
                                                                                       mode):
    """A 9-channel UNet's c_concat inputs (A1111's inpainting_image_conditioning(image * 2 − 1, ..., image_mask)):
    the pixel mask is round(image_mask / 255) of the mask at the generation size (the crop fitted by "Resize and
    fill" for only masked, not the overlay's mask at the init image's size — here both are 32 x 24, so a mix-up would
    pass unseen by the shapes), the masked image lerp(x, x·(1 − m), weight) of the pixels the VAE encodes (after
    the fill)."""
    init, mask = _files(tmp_path, (32, 24), (48, 40), (14, 10, 30, 26), seed=7)
    system = _InpaintingEncoder()
    got = inpaint_inputs(system, init, mask, height=24, width=32, mask_blur=2, resize_mode=mode,
                         inpainting_fill=fill, inpainting_mask_weight=0.6, inpaint_full_res=full_res,
                         inpaint_full_res_padding=3)
    assert got.conditioning is not None
    image_mask = _a1111_image_mask(Image.open(mask), width=32, height=24, resize_mode=MODES[mode],
                                   full_res=full_res, padding=3, blur=2)
    m = torch.round(torch.from_numpy(np.array(image_mask.convert("L")).astype(np.float32) / 255.0)[None, None])
    source = system.seen[0]
    masked, pixel_mask = system.conditioned
    assert torch.equal(pixel_mask, m)
    assert torch.equal(masked, torch.lerp(source, source * (1.0 - m), 0.6))



def _mask_file(path, kind, base):
    """``base`` (h, w) uint8 saved as a mask of PIL mode ``kind`` (RGBA: white-ish colour, ``base`` as its alpha)."""
    plain = Image.fromarray(base, "L")
    image = {"L": plain, "1": plain.convert("1"), "P": plain.convert("P"),
             "LA": Image.merge("LA", [plain, Image.fromarray(255 - base, "L")]),
             "RGBA": Image.merge("RGBA", [Image.new("L", plain.size, 200)] * 3 + [plain]),
             "I;16": Image.fromarray(base.astype(np.uint16) * 257)}[kind]
    image.save(path)
    return path


@pytest.mark.parametrize("full_res", [False, True])
@pytest.mark.parametrize("kind", ["L", "1", "P", "LA", "RGBA", "I;16"])
def test_masks_of_every_mode_and_another_size_are_read_as_a1111_reads_them(tmp_path, kind, full_res):
    """create_binary_mask on the file's own mode (an RGBA mask with transparency: its alpha; LA, P, 1, 16-bit:
    convert("L")), a grey band kept grey, at a size of neither the image nor the output: A1111's pixels and latent
    mask."""
    init, _ = _files(tmp_path, (48, 40), (48, 40), (0, 0, 1, 1), seed=3)
    base = np.zeros((30, 36), np.uint8)
    base[5:20, 8:30] = 255
    base[22:28, 2:10] = 140
    mask = _mask_file(tmp_path / "kind.png", kind, base)
    system = _Encoder()
    got = inpaint_inputs(system, init, mask, height=32, width=32, mask_blur=2, resize_mode="crop",
                         inpaint_full_res=full_res, inpaint_full_res_padding=4)
    pixels, latmask, _, _ = _a1111_init(Image.open(init).convert("RGBA"), Image.open(mask), width=32, height=32,
                                        resize_mode=1, full_res=full_res, padding=4, blur=2, fill=1)
    assert Image.open(mask).mode == kind or (kind, Image.open(mask).mode) == ("I;16", "I")  # (Pillow < 10: I)
    assert torch.equal(system.seen[0], pixels)
    assert np.array_equal(got.latmask[0, 0].numpy(), latmask)
