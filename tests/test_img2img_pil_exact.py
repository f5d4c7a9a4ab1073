"""``generate --init-image`` without a mask: the pixels the VAE encodes are A1111's bit for bit.

A1111 (AUTOMATIC1111/stable-diffusion-webui ``modules/processing.py`` at 0027ce1f6e58,
``StableDiffusionProcessingImg2Img.init``) takes the img2img tab's RGBA image, ``images.flatten``s it on white,
``images.resize_image(resize_mode, image, width, height)``s it, then ``np.array(image).astype(np.float32) / 255.0``,
``np.moveaxis``, and ``images_tensor_to_samples`` encodes ``image * 2 − 1`` (an inpainting model's conditioning gets
the same ``image * 2 − 1``). That is transcribed below on real PIL calls and compared with what a stand-in VAE is
handed by sdadapt's img2img (``init_latents_from_image``, also the hires job's) and by an inpainting model's img2img
conditioning — for every resize mode, RGBA / LA / P / L / RGB files, sizes up and down and other aspects. The float
path these replaced (``a1111_resize(read_image(...))``) is up to 3 levels of 8 bits off, so ``torch.equal`` fails
for it.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from sdadapt.images import ImageFolderError, read_image  # noqa: E402
from sdadapt.jobs.generate_hires import init_latents_from_image  # noqa: E402
from sdadapt.jobs.generate_inpaint import img2img_conditioning  # noqa: E402
from sdadapt.resize_modes import RESIZE_MODES, a1111_resize, init_image_pixels  # noqa: E402
from tests.test_img2img_resize import _a1111_resize_image  # noqa: E402  (A1111's resize_image, transcribed)


def _a1111_init(path, width: int, height: int, resize_mode: int) -> torch.Tensor:
    """A1111's img2img init (no mask) for one image -> the (1, 3, H, W) float32 tensor the VAE encodes."""
    img = Image.open(path)
    img.load()
    img = img.convert("RGBA")  # (the img2img tab's gr.Image(image_mode="RGBA"))
    if img.mode == "RGBA":  # images.flatten(img, opts.img2img_background_color = "#ffffff")
        background = Image.new("RGBA", img.size, "#ffffff")
        background.paste(img, mask=img)
        img = background
    image = img.convert("RGB")
    image = _a1111_resize_image(resize_mode, image, width, height)
    image = np.array(image).astype(np.float32) / 255.0
    image = np.moveaxis(image, 2, 0)
    batch_images = np.expand_dims(image, axis=0).repeat(1, axis=0)
    return torch.from_numpy(batch_images) * 2 - 1  # (images_tensor_to_samples: image * 2 - 1)


def _write(path, kind: str, h: int, w: int, seed: int):
    """A PNG of ``kind`` (RGBA / LA with every alpha from 0 to 255, P with a transparent index, L, RGB)."""
    rng = np.random.default_rng(seed)
    if kind == "P":
        im = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8), "L").convert("P")
        im.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
        im.save(path, transparency=3)
        return path
    channels = {"RGBA": 4, "LA": 2, "L": 1, "RGB": 3}[kind]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, kind).save(path)
    return path


class _StandIn:
    """A system with a stand-in VAE that records what it is handed (an inpainting UNet's 9 input channels when
    ``inpainting``)."""

    def __init__(self, inpainting: bool = False):
        self.alphas_cumprod = torch.ones(4)
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=9 if inpainting else 4))
        self.vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4))
        self.encoded: list[torch.Tensor] = []
        self.conditioned: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode_images(self, images):
        self.encoded.append(images.detach().clone())
        return images[:, :, ::8, ::8]

    def inpainting_conditioning(self, masked, mask):
        self.conditioned.append((masked.detach().clone(), mask.detach().clone()))
        return torch.cat([mask.expand(masked.shape[0], 1, *masked.shape[2:]), masked], dim=1)


# (file kind, file (h, w), target (height, width)): down, up, wider, taller, same size, odd sizes
CASES = [("RGBA", (20, 44), (32, 32)), ("LA", (40, 24), (32, 48)), ("P", (30, 30), (24, 40)),
         ("L", (17, 23), (16, 16)), ("RGBA", (32, 32), (32, 32)), ("RGBA", (52, 37), (24, 24)),
         ("RGB", (9, 61), (40, 16))]


@pytest.mark.parametrize("mode", list(RESIZE_MODES))
@pytest.mark.parametrize("kind,source,target", CASES)
def test_img2img_encodes_a1111s_init_pixels_bit_for_bit(tmp_path, mode, kind, source, target):
    """init_latents_from_image (img2img and the hires job's --init-image) hands the VAE A1111's tensor exactly:
    a float alpha blend, a float resize, or a wrong band / crop box would differ somewhere."""
    path = _write(tmp_path / "init.png", kind, *source, seed=sum(source) + len(kind))
    system = _StandIn()
    init_latents_from_image(system, path, height=target[0], width=target[1], resize_mode=mode)
    (ours,) = system.encoded
    theirs = _a1111_init(path, target[1], target[0], RESIZE_MODES[mode][0])
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (1, 3, *target)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode,weight", [("just", 1.0), ("crop", 0.35), ("fill", 0.0)])
def test_inpainting_models_img2img_conditioning_takes_a1111s_pixels(tmp_path, mode, weight):
    """An inpainting model's img2img without a mask (A1111's img2img_image_conditioning(image * 2 - 1, ...,
    image_mask=None)): the masked image is torch.lerp(image, image * (1 - ones), W) of A1111's pixels exactly — the
    same pixels the init latents encode."""
    path = _write(tmp_path / "init.png", "RGBA", 36, 20, seed=7)
    system = _StandIn(inpainting=True)
    out = img2img_conditioning(system, path, height=24, width=32, resize_mode=mode, inpainting_mask_weight=weight)
    init_latents_from_image(system, path, height=24, width=32, resize_mode=mode)
    (masked, mask), = system.conditioned
    theirs = _a1111_init(path, 32, 24, RESIZE_MODES[mode][0])
    ones = torch.ones(1, 1, 24, 32)
    assert torch.equal(mask, ones)
    assert torch.equal(masked, torch.lerp(theirs, theirs * (1.0 - ones), weight))
    assert torch.equal(system.encoded[0], theirs)
    assert out.shape == (1, 4, 24, 32)
    assert img2img_conditioning(_StandIn(), path, height=24, width=32) is None  # (a plain model: none)


def test_init_image_pixels_is_the_inpaint_tabs_image_path(tmp_path):
    """One resampler and one flatten: the img2img pixels are the inpaint tab's (PIL) steps composed."""
    from sdadapt.inpaint_crop import resize_image
    from sdadapt.jobs.generate_inpaint import _init_image, _tensor

    path = _write(tmp_path / "init.png", "LA", 26, 41, seed=3)
    for mode in RESIZE_MODES:
        assert torch.equal(init_image_pixels(path, (24, 32), mode=mode),
                           _tensor(resize_image(_init_image(path), 32, 24, mode=mode)))


def test_without_pil_the_float_path_is_taken_and_stays_close(tmp_path, monkeypatch):
    """Without Pillow: an 8-bit PNG is read and resized in float (read_image + a1111_resize), within 3 levels of
    A1111's 8-bit pixels; another format says to install Pillow."""
    path = _write(tmp_path / "init.png", "RGBA", 20, 44, seed=1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "init.jpg")
    theirs = {mode: _a1111_init(path, 32, 32, number)[0] for mode, (number, _) in RESIZE_MODES.items()}
    monkeypatch.setitem(sys.modules, "PIL", None)  # (import PIL -> ImportError)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    for mode in RESIZE_MODES:
        ours = init_image_pixels(path, (32, 32), mode=mode)
        assert torch.equal(ours, a1111_resize(read_image(path), (32, 32), mode=mode))
        assert (ours - theirs[mode]).abs().max() <= 3.0 / 127.5
    with pytest.raises(ImageFolderError, match="pip install pillow"):
        init_image_pixels(tmp_path / "init.jpg", (32, 32))


def test_bad_init_images_are_refused_with_the_option(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="--init-image .*junk.png: unreadable image"):
        init_image_pixels(tmp_path / "junk.png", (16, 16))
    with pytest.raises(ValueError, match="resize mode must be one of"):
        init_image_pixels(tmp_path / "junk.png", (16, 16), mode="pad")
    _write(tmp_path / "thin.png", "RGB", 1, 60, seed=0)
    with pytest.raises(ValueError, match="would be 16x0 pixels"):
        init_image_pixels(tmp_path / "thin.png", (16, 16), mode="fill")


# --- review R7 -----------------------------------------------------------------------------------------------------


def _jpeg_turned(path, orientation: int):
    """A JPEG whose EXIF Orientation tag says how to turn it (6: 90° clockwise, as phones write), 20 x 40 stored."""
    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_oriented_init_image_is_turned_as_a1111_does(tmp_path):
    from PIL import ImageOps

    path = _jpeg_turned(tmp_path / "phone.jpg", 6)
    with Image.open(path) as im:
        turned = ImageOps.exif_transpose(im.convert("RGBA"))  # (images.fix_image after the tab's RGBA)
    assert turned.size == (20, 40)
    turned.save(tmp_path / "turned.png")
    theirs = _a1111_init(tmp_path / "turned.png", 24, 32, 0)[0]
    assert torch.equal(init_image_pixels(path, (32, 24), mode="just"), theirs)


def test_exif_oriented_mask_is_turned_as_a1111_does(tmp_path):
    """A1111's img2img() runs images.fix_image on the mask too: a phone-photo mask is turned upright before it is
    made binary (its region then falls where it was drawn)."""
    from PIL import ImageOps

    from sdadapt import inpaint
    from sdadapt.jobs.generate_inpaint import _prepared_mask

    path = _jpeg_turned(tmp_path / "mask.jpg", 6)
    with Image.open(path) as im:
        theirs = inpaint.binary_mask(ImageOps.exif_transpose(im))
    ours = _prepared_mask(path, mask_blur=0, invert_mask=False)
    assert ours.size == (20, 40) and np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("kind", ["RGB-tRNS", "P-opaque", "CMYK-jpeg", "I;16"])
def test_other_file_modes_match_a1111s_pil_conversion(tmp_path, kind):
    """Files that are not 8-bit RGB(A)/LA/L: an RGB PNG with a tRNS colour (A1111's fix_png_transparency and the
    tab's RGBA: that colour becomes white), an opaque palette, a CMYK JPEG, a 16-bit grey PNG — each is what PIL's
    convert("RGBA") + flatten makes of it, bit for bit."""
    rng = np.random.default_rng(11)
    if kind == "RGB-tRNS":
        px = rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)
        px[::3, ::2] = (1, 2, 3)
        path = tmp_path / "a.png"
        Image.fromarray(px).save(path, transparency=(1, 2, 3))
    elif kind == "P-opaque":
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).convert("P").save(path)
    elif kind == "CMYK-jpeg":
        path = tmp_path / "a.jpg"
        Image.fromarray(rng.integers(0, 256, (18, 22, 4), dtype=np.uint8), "CMYK").save(path)
    else:
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 300, (18, 22), dtype=np.uint16)).save(path)
    for mode, (number, _) in RESIZE_MODES.items():
        assert torch.equal(init_image_pixels(path, (16, 24), mode=mode), _a1111_init(path, 24, 16, number)[0])
    if kind == "RGB-tRNS":  # (the transparent colour is flattened to white, not kept as (1, 2, 3))
        assert torch.equal(init_image_pixels(path, (18, 22))[:, 0, 0], torch.ones(3))


def test_unreadable_image_message_names_the_option_given(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^--hires-image .*junk.png: unreadable image"):
        init_image_pixels(tmp_path / "junk.png", (16, 16), option="--hires-image")


def test_one_init_image_gives_the_same_pixels_every_call(tmp_path):
    """--count N with one init image: A1111 repeats the one flattened, resized image over the batch; sdadapt encodes
    the file once per run — the pixels are a pure function of the file (no state carried between calls)."""
    path = _write(tmp_path / "init.png", "RGBA", 30, 19, seed=5)
    first = [init_image_pixels(path, (24, 16), mode=m) for m in RESIZE_MODES]
    again = [init_image_pixels(path, (24, 16), mode=m) for m in RESIZE_MODES]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
