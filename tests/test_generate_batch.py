"""``generate --init-image FOLDER``: A1111's img2img "Batch" tab (``modules/img2img.py`` ``process_batch``): the files
it lists and in which order (``shared.walk_files``, ``natural_sort_key``), the masks it pairs with them, and end to
end on a tiny SD model: each output equals the single-image run of its image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdadapt.jobs.generate_batch import batch_images, batch_masks, batch_outputs
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)


def _save(path, seed, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_images_are_listed_as_a1111s_walk_files(tmp_path):
    """Natural order (frame2 before frame10), subfolders after their parent's files in natural folder order, only
    image suffixes of any case, nothing under a hidden folder."""
    for name in ["frame10.png", "frame2.PNG", "b/frame1.jpg", "a10/x.webp", "a2/y.tif", ".hidden/z.png"]:
        _save(tmp_path / name, 0, (4, 4))
    (tmp_path / "notes.txt").write_text("not an image")
    found = [str(p.relative_to(tmp_path)) for p in batch_images(tmp_path)]
    assert found == ["frame2.PNG", "frame10.png", "a2/y.tif", "a10/x.webp", "b/frame1.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder without images"):
        batch_images(tmp_path / "empty")


def test_hidden_files_are_skipped_and_a_folder_inside_a_hidden_one_is_read(tmp_path):
    """macOS's ``._NAME.png`` AppleDouble files (no image: A1111 fails to open and skips them) are left out; a folder
    given inside a hidden one (``~/.cache/imgs``, absolute) is read — A1111's test of the whole path listed nothing
    there — while a hidden folder below it stays out."""
    root = tmp_path / ".cache" / "imgs"
    _save(root / "a.png", 0, (4, 4))
    _save(root / ".sub" / "b.png", 0, (4, 4))
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert batch_images(root.resolve()) == [root.resolve() / "a.png"]


def test_masks_pair_as_a1111s_batch(tmp_path):
    images = [tmp_path / "in" / name for name in ("a.png", "a.b.png", "c.jpg")]
    one = _save(tmp_path / "one.png", 1, (4, 4))
    assert batch_masks(None, images) == [None] * 3
    assert batch_masks(one, images) == [one] * 3  # (one mask file: for every image)
    single = tmp_path / "single"
    _save(single / "whatever.png", 1, (4, 4))
    assert batch_masks(single, images) == [single / "whatever.png"] * 3  # (a folder of one: for every image)
    masks = tmp_path / "masks"
    for name in ("a.png", "a.b.webp", "c.txt.png"):
        _save(masks / name, 2, (4, 4))
    # (A1111's glob(f"{stem}.*") for "a" matches a.png and a.b.webp, in the folder's order; here the first by name,
    # a.b.webp; "a.b" finds its own; "c" matches c.txt.png)
    assert batch_masks(masks, images) == [masks / "a.b.webp", masks / "a.b.webp", masks / "c.txt.png"]


def test_outputs_are_named_by_the_images_and_a_name_twice_is_refused(tmp_path):
    images = [tmp_path / "x" / "a.png", tmp_path / "b.jpg"]
    assert batch_outputs(images, tmp_path / "out", 1) == [[tmp_path / "out" / "a.png"], [tmp_path / "out" / "b.png"]]
    assert batch_outputs(images[:1], tmp_path / "out", 2) == [[tmp_path / "out" / "a-00.png",
                                                               tmp_path / "out" / "a-01.png"]]
    with pytest.raises(ValueError, match="both be written as a.png"):
        batch_outputs([tmp_path / "x" / "a.png", tmp_path / "y" / "a.jpg"], tmp_path / "out", 1)


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "5", "--quiet", "--out", str(out), "--width", "64", "--height", "64", *extra])


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_batch_outputs_equal_each_images_own_run(plain_sd, tmp_path):  # noqa: F811
    """Every image with the run's seed (A1111 keeps p.seed over the batch), each output the image's single run; with
    a folder of masks the images without one are skipped and the rest inpainted as alone."""
    for k, name in enumerate(["f2.png", "f10.png", "sub/f3.jpg"]):
        _save(tmp_path / "in" / name, k, (48, 40))
    mask = Image.new("L", (40, 48), 0)
    mask.paste(255, (8, 8, 32, 40))
    (tmp_path / "masks").mkdir()
    for name in ("f2.png", "f10.webp"):
        mask.save(tmp_path / "masks" / name)
    assert _cli(plain_sd, tmp_path / "out", "--init-image", str(tmp_path / "in")) == 0
    for name, source in [("f2.png", "f2.png"), ("f10.png", "f10.png"), ("f3.png", "sub/f3.jpg")]:
        assert _cli(plain_sd, tmp_path / "one.png", "--init-image", str(tmp_path / "in" / source), "--overwrite") == 0
        assert np.array_equal(_pixels(tmp_path / "out" / name), _pixels(tmp_path / "one.png")), name
    assert _cli(plain_sd, tmp_path / "masked", "--init-image", str(tmp_path / "in"), "--mask",
                str(tmp_path / "masks"), "--count", "2") == 0
    assert sorted(p.name for p in (tmp_path / "masked").iterdir()) == ["f10-00.png", "f10-01.png", "f2-00.png",
                                                                        "f2-01.png"]
    assert _cli(plain_sd, tmp_path / "one.png", "--init-image", str(tmp_path / "in" / "f10.png"), "--mask",
                str(tmp_path / "masks" / "f10.webp"), "--count", "2", "--overwrite") == 0
    for n in range(2):
        assert np.array_equal(_pixels(tmp_path / "masked" / f"f10-{n:02d}.png"), _pixels(tmp_path / f"one-{n:02d}.png"))
    text = Image.open(tmp_path / "masked" / "f2-01.png").text["parameters"]
    assert "Seed: 6," in text and "Mask blur: 4" in text
    assert _cli(plain_sd, tmp_path / "region", "--init-image", str(tmp_path / "in"), "--mask", str(tmp_path / "masks"),
                "--inpaint-full-res", "--inpainting-fill", "latent-nothing") == 0
    text = Image.open(tmp_path / "region" / "f10.png").text["parameters"]  # (the mask fields, as the single run's)
    assert "Inpaint area: Only masked, Masked area padding: 32, Masked content: latent nothing" in text


def test_cli_batch_refusals(plain_sd, tmp_path, capsys):  # noqa: F811
    _save(tmp_path / "in" / "a.png", 0)
    _save(tmp_path / "masks" / "zz.png", 1)
    _save(tmp_path / "masks" / "yy.png", 1)
    for out, extra, message in [
            (tmp_path / "out.png", [], "is a folder (A1111's img2img batch)"),
            (tmp_path / "out", ["--loopback", "2"], "one image at a time"),
            (tmp_path / "out", ["--mask", str(tmp_path / "masks")], "no mask is named as an image"),
            (tmp_path / "x.png", ["--mask", str(tmp_path / "masks"), "--init-image", str(tmp_path / "in" / "a.png")],
             "is a folder of masks for a folder of images")]:
        args = ["--init-image", str(tmp_path / "in"), *extra]
        assert _cli(plain_sd, out, *args) != 0, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()


def test_cli_count_makes_each_image_as_its_own_seeds_run(plain_sd, tmp_path):  # noqa: F811
    """--count 2: the second image is the run of seed + 1 (nothing of the first image's run leaks into it: its
    prompt, conditioning, noise)."""
    from sdadapt.cli import main

    base = ["generate", "--model", str(plain_sd), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
            "--quiet", "--width", "64", "--height", "64"]
    assert main([*base, "--seed", "5", "--count", "2", "--out", str(tmp_path / "two.png")]) == 0
    assert main([*base, "--seed", "6", "--out", str(tmp_path / "six.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "two-01.png"), _pixels(tmp_path / "six.png"))
    assert Image.open(tmp_path / "two-01.png").text["parameters"].startswith("a photo\n")
