"""Images written as JPEG and WebP, as A1111's ``save_image_with_geninfo`` writes them (Pillow encodes, piexif
inserts the infotext as the EXIF ``UserComment``): the EXIF bytes and their insertion against piexif's, the files
against A1111's procedure byte for byte, and ``generate`` / ``upscale`` writing them (the grids still made of the
8-bit images, not of their JPEG decodes)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.image_exif import (
    check_jpeg_comment,
    exif_user_comment,
    insert_exif,
    user_comment_exif,
)
from sdadapt.images import (
    check_output_suffix,
    decode_png,
    encode_image,
    numbered,
    read_png_text,
    write_image,
)

Image = pytest.importorskip("PIL.Image")
piexif = pytest.importorskip("piexif")
helper = pytest.importorskip("piexif.helper")


def _piexif_dump(text: str) -> bytes:  # (A1111's images.save_image_with_geninfo)
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: helper.UserComment.dump(text, encoding="unicode")}})


def _a1111_read(data: bytes) -> str:  # (modules/images.py read_info_from_image: Pillow's info["exif"], piexif)
    with Image.open(io.BytesIO(data)) as image:
        exif = piexif.load(image.info["exif"])
    comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
    try:
        return helper.UserComment.load(comment)
    except ValueError:
        return comment.decode("utf8", errors="ignore")


def _a1111_save(pixels: np.ndarray, fmt: str, text: str | None, *, quality: int = 80, lossless: bool = False) -> bytes:
    """save_image_with_geninfo's JPEG/WebP branch, transcribed: RGBA made RGB, Pillow's save with its quality and
    lossless settings, then ``piexif.insert`` of the dumped comment (when there is an infotext)."""
    image = Image.fromarray(pixels)
    if image.mode == "RGBA":
        image = image.convert("RGB")
    saved = io.BytesIO()
    image.save(saved, format=fmt, quality=quality, lossless=lossless)
    if text is None:
        return saved.getvalue()
    out = io.BytesIO()
    piexif.insert(_piexif_dump(text), saved.getvalue(), out)
    return out.getvalue()


_TEXTS = st.text(max_size=400)  # (lone surrogates too: piexif replaces them, and so does sdadapt)


@settings(max_examples=80, deadline=None)
@given(_TEXTS)
def test_the_exif_block_is_piexifs_byte_for_byte(text):
    assert user_comment_exif(text) == _piexif_dump(text)


def _pixels(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(1, 40), st.sampled_from([3, 4]),
       st.sampled_from([("JPEG", False), ("WEBP", False), ("WEBP", True)]), st.integers(1, 100), _TEXTS)
def test_a_written_file_is_a1111s_byte_for_byte(seed, h, w, c, kind, quality, text):
    fmt, lossless = kind
    pixels = _pixels(seed, (h, w, c))
    ours = encode_image(pixels, kind=fmt.lower(), text={"parameters": text, "other": "x"}, quality=quality,
                        lossless=lossless)
    assert ours == _a1111_save(pixels, fmt, text, quality=quality, lossless=lossless)
    assert exif_user_comment(ours) == _a1111_read(ours) == text.encode("utf-16-be", "replace").decode("utf-16-be")
    assert encode_image(pixels, kind=fmt.lower(), quality=quality, lossless=lossless) == _a1111_save(
        pixels, fmt, None, quality=quality, lossless=lossless)  # (no infotext: no EXIF, as A1111 without geninfo)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_inserting_again_replaces_the_comment_as_piexif_does(fmt):
    first = _a1111_save(_pixels(0, (9, 13, 3)), fmt, "one")
    out = io.BytesIO()
    piexif.insert(_piexif_dump("two"), first, out)
    assert insert_exif(first, user_comment_exif("two")) == out.getvalue()
    assert exif_user_comment(out.getvalue()) == "two"
    exif = Image.Exif()  # (Pillow's own EXIF, little-endian, right after the start: replaced as piexif replaces it)
    exif[0x010E] = "a description"
    saved = io.BytesIO()
    Image.fromarray(_pixels(1, (9, 13, 3))).save(saved, format=fmt, exif=exif.tobytes())
    out = io.BytesIO()
    piexif.insert(_piexif_dump("three"), saved.getvalue(), out)
    assert insert_exif(saved.getvalue(), user_comment_exif("three")) == out.getvalue()


def test_what_is_refused_and_the_names():
    with pytest.raises(ValueError, match="64 KiB"):
        check_jpeg_comment("x" * 40000)
    with pytest.raises(ValueError, match="64 KiB"):
        insert_exif(encode_image(_pixels(0, (2, 2, 3)), kind="jpeg"), user_comment_exif("x" * 40000))
    with pytest.raises(ValueError, match="Exif"):
        insert_exif(b"\xff\xd8\xff\xe0", b"MM\x00*")
    with pytest.raises(ValueError, match="not png"):
        insert_exif(encode_image(_pixels(0, (2, 2, 3)), kind="png"), user_comment_exif("a"))
    with pytest.raises(ValueError, match="1 to 100"):
        encode_image(_pixels(0, (2, 2, 3)), kind="jpeg", quality=0)
    with pytest.raises(ValueError, match="1 to 100"):
        encode_image(_pixels(0, (2, 2, 3)), kind="png", quality=True)  # (checked whatever the format)
    with pytest.raises(ValueError, match="16383 pixels"):
        encode_image(np.zeros((1, 16384, 3), np.uint8), kind="webp")
    with pytest.raises(ValueError, match=r"\*.png, \*.jpg, \*.webp or \*.avif"):
        check_output_suffix("a/b.gif")
    assert [check_output_suffix(f"b.{s}") for s in ("PNG", "jpg", "JPEG", "webp")] == ["png", "jpeg", "jpeg", "webp"]
    assert numbered("a/b.jpg", 3) == Path("a/b-03.jpg")
    assert numbered("b.png", 12) == Path("b-12.png")


def test_write_image_is_atomic_and_keeps_png_text(tmp_path):
    pixels = _pixels(3, (5, 7, 3))
    png = write_image(tmp_path / "a.png", pixels, text={"parameters": "p", "extras": "e"})
    assert np.array_equal(decode_png(png.read_bytes()), pixels)
    assert read_png_text(png) == {"parameters": "p", "extras": "e"}
    jpeg = write_image(tmp_path / "a.jpg", pixels, text={"parameters": "p", "extras": "e"}, comment_key="extras")
    assert exif_user_comment(jpeg.read_bytes()) == "e"
    with pytest.raises(ValueError, match="64 KiB"):
        write_image(tmp_path / "b.jpg", pixels, text={"parameters": "x" * 40000})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png"]  # (nothing half-written)


_BASE = ["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "1", "--seed", "4", "-q"]


def test_generate_writes_jpeg_and_webp_with_the_pngs_pixels_and_infotext(tmp_path):
    assert main([*_BASE, "--count", "3", "--grid", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*_BASE, "--count", "3", "--grid", "--jpeg-quality", "95", "-o", str(tmp_path / "a.jpg")]) == 0
    assert main([*_BASE, "--count", "3", "--grid", "--webp-lossless", "-o", str(tmp_path / "a.webp")]) == 0
    for name in ["a", "a-00", "a-01", "a-02"]:  # (the grid, and each image)
        png = tmp_path / f"{name}.png"
        pixels, text = decode_png(png.read_bytes())[..., :3], read_png_text(png)["parameters"]
        assert (tmp_path / f"{name}.jpg").read_bytes() == _a1111_save(pixels, "JPEG", text, quality=95)
        webp = (tmp_path / f"{name}.webp").read_bytes()
        assert webp == _a1111_save(pixels, "WEBP", text, lossless=True)
        with Image.open(io.BytesIO(webp)) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), pixels)  # (lossless: the grid of the 8-bit cells)


def test_the_scripts_grids_are_made_of_the_images_not_of_their_jpegs(tmp_path):
    xyz = ["--xyz-x", "CFG Scale", "1, 3", "--xyz-y", "Steps", "1, 2", "--xyz-no-legend"]
    assert main([*_BASE, *xyz, "-o", str(tmp_path / "g.png")]) == 0
    assert main([*_BASE, *xyz, "--jpeg-quality", "50", "-o", str(tmp_path / "g.jpg")]) == 0
    png = tmp_path / "g.png"
    assert (tmp_path / "g.jpg").read_bytes() == _a1111_save(decode_png(png.read_bytes())[..., :3], "JPEG",
                                                            read_png_text(png)["parameters"], quality=50)
    assert sorted(p.name for p in tmp_path.glob("g-*.jpg")) == [f"g-{k:02d}.jpg" for k in range(4)]
    assert main(["generate", "--model", "toy", "--prompt", "a red circle|blue", "--steps", "1", "--prompt-matrix",
                 "-q", "-o", str(tmp_path / "m.webp"), "--webp-lossless"]) == 0
    assert sorted(p.name for p in tmp_path.glob("m*.webp")) == ["m-00.webp", "m-01.webp", "m.webp"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n--prompt 'a blue square' --steps 2\n")
    assert main(["generate", "--model", "toy", "--prompt", "", "--prompts-file", str(prompts), "-q",
                 "-o", str(tmp_path / "l.jpg")]) == 0
    assert "a blue square" in exif_user_comment((tmp_path / "l-01.jpg").read_bytes())


def test_a_folder_of_init_images_in_another_format(tmp_path, capsys):
    assert main([*_BASE, "--count", "2", "-o", str(tmp_path / "in" / "a.png")]) == 0
    assert main([*_BASE, "--init-image", str(tmp_path / "in"), "--denoising-strength", "0.5", "--image-format",
                 "webp", "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-00.webp", "a-01.webp"]
    assert main([*_BASE, "--image-format", "jpg", "-o", str(tmp_path / "x.png")]) == 2
    assert "for a folder of outputs" in capsys.readouterr().err
    assert main([*_BASE, "-o", str(tmp_path / "x.gif")]) == 7
    assert "*.png, *.jpg, *.webp or *.avif" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*_BASE, "--jpeg-quality", "101", "-o", str(tmp_path / "x.jpg")])
    assert "--jpeg-quality: a whole number from 1 to 100" in capsys.readouterr().err
    assert not any(tmp_path.glob("x.*"))


def test_upscale_writes_the_postprocessing_text_as_a1111s_jpeg_comment(tmp_path, capsys):
    assert main([*_BASE, "-o", str(tmp_path / "in" / "a.png")]) == 0
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--scale-by", "2", "-q", "-o", str(tmp_path / "a2.png")]) == 0
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--scale-by", "2", "-q", "-o", str(tmp_path / "a2.jpg")]) == 0
    png = tmp_path / "a2.png"
    text = read_png_text(png)
    assert text["parameters"] == read_png_text(tmp_path / "in" / "a.png")["parameters"]
    assert (tmp_path / "a2.jpg").read_bytes() == _a1111_save(decode_png(png.read_bytes())[..., :3], "JPEG",
                                                             text["extras"])  # (A1111's geninfo there: its "extras")
    assert main(["upscale", str(tmp_path / "in"), "--scale-by", "2", "-q", "--image-format", "webp",
                 "-o", str(tmp_path / "up")]) == 0
    assert [p.name for p in (tmp_path / "up").iterdir()] == ["a.webp"]
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--image-format", "webp", "-q",
                 "-o", str(tmp_path / "b.png")]) == 2
    assert "an --out folder" in capsys.readouterr().err


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "encode_image(")


def test_avif_as_a1111_writes_it(tmp_path):
    """A1111's AVIF branch: ``image.save(format="AVIF", quality=jpeg_quality, exif=piexif.dump(...))`` — the same
    bytes here, the comment read back by A1111's reader and by ``--infotext`` / ``inspect``."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF encoder")
    pixels = _pixels(5, (24, 40, 3))
    saved = io.BytesIO()
    Image.fromarray(pixels).save(saved, format="AVIF", quality=70, exif=_piexif_dump("Steps: 3, ünï"))
    ours = encode_image(pixels, kind="avif", text={"parameters": "Steps: 3, ünï"}, quality=70)
    assert ours == saved.getvalue()
    assert exif_user_comment(ours) == _a1111_read(ours) == "Steps: 3, ünï"
    assert main([*_BASE, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*_BASE, "-o", str(tmp_path / "a.avif")]) == 0
    assert main(["generate", "--model", "toy", "--infotext", str(tmp_path / "a.avif"), "-q",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    assert main(["inspect", str(tmp_path / "a.avif")]) == 0


def test_only_a_jpeg_limits_the_infotext_as_piexif_does():
    import struct

    long = "Steps: 20, " + "a castle, " * 10000  # (100,011 characters: A1111 writes and reads them in WebP, AVIF)
    pixels = _pixels(5, (9, 13, 3))
    for fmt, lossless in (("WEBP", False), ("WEBP", True)):
        ours = encode_image(pixels, kind="webp", text={"parameters": long}, lossless=lossless)
        assert ours == _a1111_save(pixels, fmt, long, lossless=lossless)
        assert exif_user_comment(ours) == _a1111_read(ours) == long
    assert user_comment_exif(long) == _piexif_dump(long)
    check_jpeg_comment("x" * 32739)  # (the last length a JPEG holds: piexif's too)
    _a1111_save(pixels, "JPEG", "x" * 32739)
    with pytest.raises(struct.error):  # (A1111's piexif.insert fails one character later)
        _a1111_save(pixels, "JPEG", "x" * 32740)
    with pytest.raises(ValueError, match="64 KiB.*PNG or a WebP"):
        encode_image(pixels, kind="jpeg", text={"parameters": "x" * 32740})
    from PIL import features

    if features.check("avif"):
        avif = encode_image(pixels, kind="avif", text={"parameters": long})
        assert exif_user_comment(avif) == _a1111_read(avif) == long


def test_generate_refuses_a_jpegs_long_infotext_before_sampling(tmp_path, monkeypatch, capsys):
    from sdadapt.jobs import generate_hires, infotext

    sampled = []
    real = generate_hires.sample_image
    monkeypatch.setattr(generate_hires, "sample_image", lambda *a, **k: sampled.append(1) or real(*a, **k))
    long = "x" * 40000  # (the toy's prompts are short: a long infotext as a long prompt would make it)
    monkeypatch.setattr(infotext.InfotextRun, "for_image", lambda self, i, **k: long)
    assert main([*_BASE, "-o", str(tmp_path / "a.jpg")]) != 0
    assert "64 KiB); write a PNG or a WebP, which have no such limit (refused before sampling)" in capsys.readouterr().err
    assert not sampled and not list(tmp_path.iterdir())
    assert main([*_BASE, "-o", str(tmp_path / "a.webp")]) == 0  # (a WebP holds it, as A1111 writes it)
    assert sampled and exif_user_comment((tmp_path / "a.webp").read_bytes()) == long


def test_a_jpeg_whose_infotext_grew_too_long_is_written_without_it(tmp_path):
    from sdadapt.jobs.generate import _write

    said, kept = [], ([], [])
    pixels, long = _pixels(6, (9, 13, 3)), "x" * 40000
    written = _write(tmp_path / "a.jpg", pixels, long, kept, {"quality": 80, "lossless": False}, said.append)
    assert Path(written).read_bytes() == _a1111_save(pixels, "JPEG", None)  # (what A1111's Pillow saved, no EXIF)
    assert kept[1] == [long] and len(said) == 1 and "a.jpg: written without its infotext" in said[0]
    _write(tmp_path / "a.webp", pixels, long, kept, {"quality": 80, "lossless": False}, said.append)
    assert exif_user_comment((tmp_path / "a.webp").read_bytes()) == long and len(said) == 1


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:  # (each chunk's type and its whole bytes, CRC included)
    out, at = [], 8
    while at + 8 <= len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        out.append((data[at + 4:at + 8], data[at:at + 12 + length]))
        at += 12 + length
    return out


@pytest.mark.parametrize("value", ["Steps: 20, Seed: 1", "caf\u00e9 \u00b5 \u00ff", "a\x00b\r\nc", "",
                                   "\u732b, Steps: 20", "\U0001f600", "x" * (1 << 20)])
def test_png_text_chunks_are_pillows_add_text_byte_for_byte(value):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()  # (A1111's save_image_with_geninfo, ComfyUI's SaveImage)
    info.add_text("parameters", value)
    info.add_text("extras", "e")
    saved = io.BytesIO()
    Image.new("RGB", (2, 2)).save(saved, format="PNG", pnginfo=info)
    theirs = [chunk for chunk in _png_chunks(saved.getvalue()) if chunk[0] in (b"tEXt", b"iTXt", b"zTXt")]
    ours = encode_image(_pixels(0, (2, 2, 3)), kind="png", text={"parameters": value, "extras": "e"})
    assert [chunk for chunk in _png_chunks(ours) if chunk[0] in (b"tEXt", b"iTXt", b"zTXt")] == theirs
    assert theirs[0][0] == (b"iTXt" if value[:1] in ("\u732b", "\U0001f600") else b"tEXt")


def test_compressed_png_text_is_read_as_pillow_reads_it(tmp_path):
    import zlib

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "Steps: 20 zTXt caf\u00e9", zip=True)
    info.add_itxt("prompt", '{"3": "\u732b"}', zip=True)
    info.add_text("workflow", "\u732b plain")  # (uncompressed iTXt)
    info.add(b"zTXt", b"big\x00\x00" + zlib.compress(b"x" * ((1 << 20) + 1)))  # (over Pillow's MAX_TEXT_CHUNK)
    info.add(b"zTXt", b"edge\x00\x00" + zlib.compress(b"y" * (1 << 20)))  # (exactly 1 MiB: read)
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png", pnginfo=info)
    text = read_png_text(tmp_path / "a.png")
    assert text == {"parameters": "Steps: 20 zTXt caf\u00e9", "prompt": '{"3": "\u732b"}', "workflow": "\u732b plain",
                    "edge": "y" * (1 << 20)}
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # (Pillow refuses the file; sdadapt skips the chunk)
        Image.open(tmp_path / "a.png")
    info.chunks = [chunk for chunk in info.chunks if not chunk[1].startswith(b"big")]
    Image.new("RGB", (2, 2)).save(tmp_path / "b.png", pnginfo=info)
    with Image.open(tmp_path / "b.png") as image:
        assert read_png_text(tmp_path / "b.png") == {key: str(value) for key, value in image.text.items()}


def test_a_grid_whose_infotext_a_jpeg_cannot_hold_is_written_without_it(tmp_path):
    """A script's grid (a large X/Y/Z plot's infotext lists every axis value) made after its runs: a JPEG whose EXIF
    cannot hold the text is written without it and said — not lost after the runs; WebP keeps the text."""
    from sdadapt.image_exif import JPEG_EXIF_LIMIT, exif_user_comment
    from sdadapt.jobs.generate_runs import write_grid

    grid = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    long_text = "x" * (JPEG_EXIF_LIMIT + 10)
    said: list[str] = []
    path = write_grid(tmp_path / "grid.jpg", grid, parameters=long_text, given={}, say=said.append)
    assert path.is_file() and exif_user_comment(path.read_bytes()) is None
    assert len(said) == 1 and "grid.jpg: written without its infotext" in said[0]
    webp = write_grid(tmp_path / "grid.webp", grid, parameters=long_text, given={}, say=said.append)
    assert exif_user_comment(webp.read_bytes()) == long_text and len(said) == 1
