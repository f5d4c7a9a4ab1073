"""A1111's infotext in JPEG and WebP images (EXIF ``UserComment``, written by piexif as A1111 writes it): read
without Pillow or piexif (``sdadapt.image_exif``), by ``--infotext`` and by ``inspect``."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.image_exif import exif_user_comment, image_kind
from sdadapt.jobs.infotext_read import read_infotext

Image = pytest.importorskip("PIL.Image")
piexif = pytest.importorskip("piexif")
helper = pytest.importorskip("piexif.helper")


def _a1111_image(fmt: str, text: str, *, encoding: str = "unicode") -> bytes:
    """An image saved as A1111's ``save_image_with_geninfo`` saves a JPEG / WebP: Pillow writes it, piexif inserts
    the EXIF with the UserComment."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, format=fmt)
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: helper.UserComment.dump(text,
                                                                                             encoding=encoding)}})
    out = io.BytesIO()
    piexif.insert(exif, buffer.getvalue(), out)
    return out.getvalue()


def _a1111_read(data: bytes) -> str:  # (modules/images.py read_info_from_image, its EXIF branch)
    exif = piexif.load(data)
    exif_comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b'')
    try:
        exif_comment = helper.UserComment.load(exif_comment)
    except ValueError:
        exif_comment = exif_comment.decode('utf8', errors="ignore")
    return exif_comment


_TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(_TEXTS, st.sampled_from(["JPEG", "WEBP"]))
def test_a1111s_exif_comment_reads_back_as_a1111_reads_it(text, fmt):
    data = _a1111_image(fmt, text)
    assert exif_user_comment(data) == _a1111_read(data) == text


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_other_encodings_and_pillows_own_exif(fmt):
    assert exif_user_comment(_a1111_image(fmt, "Steps: 20", encoding="ascii")) == "Steps: 20"
    exif = Image.Exif()  # (Pillow's writer: little-endian TIFF)
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "a cat\nSteps: 5".encode("utf-16-be")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt, exif=exif.tobytes())
    assert exif_user_comment(buffer.getvalue()) == "a cat\nSteps: 5"
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format=fmt)
    assert exif_user_comment(plain.getvalue()) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2000), st.sampled_from(["JPEG", "WEBP"]))
def test_a_cut_file_gives_none_or_the_text_never_an_error(cut, fmt):
    data = _a1111_image(fmt, "a long prompt " * 20)  # (the EXIF comes before the pixels: whole, or cut off)
    assert exif_user_comment(data[:cut]) in (None, "a long prompt " * 20)
    if cut >= len(data):
        assert exif_user_comment(data[:cut]) == "a long prompt " * 20


def test_kinds():
    assert image_kind(b"\x89PNG\r\n\x1a\n\0\0\0\0") == "png" and image_kind(b"\xff\xd8\xff\xe0") == "jpeg"
    assert image_kind(b"RIFF\0\0\0\0WEBP") == "webp" and image_kind(b"PK\x03\x04") is None


def test_infotext_and_inspect_read_a_jpeg(tmp_path, capsys):
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "2", "--seed", "6", "-q",
                 "-o", str(tmp_path / "a.png")]) == 0
    text = read_infotext(tmp_path / "a.png")
    (tmp_path / "a.jpg").write_bytes(_a1111_image("JPEG", text))
    (tmp_path / "a.webp").write_bytes(_a1111_image("WEBP", text))
    assert read_infotext(tmp_path / "a.jpg") == read_infotext(tmp_path / "a.webp") == text
    assert main(["generate", "--model", "toy", "--infotext", str(tmp_path / "a.jpg"), "-q",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path / "a.webp")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == text and report["fields"]["Seed"] == "6" and "WEBP" in report["kind"]
    assert report["generate"]["--steps"] == 2 and report["generate"]["--seed"] == 6 and report["not_taken"] == []
    assert main(["inspect", str(tmp_path / "a.jpg")]) == 0
    out = capsys.readouterr().out
    assert "  Steps: 2" in out and "  --steps 2\n" in out and "  --seed 6\n" in out
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    assert main(["inspect", str(tmp_path / "plain.jpg")]) != 0
    assert "has no EXIF UserComment" in capsys.readouterr().err


def test_inspect_shows_a_pngs_other_text_and_one_without_parameters(tmp_path, capsys):
    import torch as _torch

    from sdadapt.images import write_png

    workflow = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}}})
    write_png(tmp_path / "comfy.png", _torch.zeros(4, 4, 3, dtype=_torch.uint8), text={"prompt": workflow})
    assert main(["inspect", "--json", str(tmp_path / "comfy.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] is None and report["other_text"] == {"prompt": workflow}
    assert "without A1111's parameters (its text: prompt)" in report["kind"]
    assert report["comfyui"] == [{"node": "3", "class_type": "KSampler", "seed": 5, "steps": 20, "checkpoint": None,
                                  "loras": [], "positive": None, "negative": None, "width": None, "height": None,
                                  "batch_size": None}]
    assert main(["inspect", str(tmp_path / "comfy.png")]) == 0
    out = capsys.readouterr().out
    assert 'text prompt: {"3": {"class_type": "KSampler"' in out
    assert "ComfyUI KSampler (node 3): seed 5, steps 20" in out
    write_png(tmp_path / "up.png", _torch.zeros(4, 4, 3, dtype=_torch.uint8),
              text={"parameters": "a cat\nSteps: 3, Seed: 2, CFG scale: 7",
                    "postprocessing": "Postprocess upscale by: 2"})
    assert main(["inspect", "--json", str(tmp_path / "up.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fields"]["Steps"] == "3" and report["other_text"] == {"postprocessing": "Postprocess upscale by: 2"}
    write_png(tmp_path / "bare.png", _torch.zeros(4, 4, 3, dtype=_torch.uint8))
    assert main(["inspect", str(tmp_path / "bare.png")]) != 0
    assert "no 'parameters' text" in capsys.readouterr().err


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "exif_user_comment(")


def _pillow_read(data: bytes) -> str:  # (A1111's read_info_from_image on an opened image: Pillow's info["exif"])
    with Image.open(io.BytesIO(data)) as image:
        return _a1111_read(image.info["exif"])


def test_fill_bytes_before_a_marker_are_skipped_as_pillow_skips_them():
    data = _a1111_image("JPEG", "Steps: 20, Seed: 1")
    assert data[2:4] == b"\xff\xe1"  # (piexif's Exif APP1 right after the start)
    for fill in (b"\xff", b"\xff" * 5):  # (JPEG B.1.1.2: any number of 0xFF before a marker)
        filled = data[:2] + fill + data[2:]
        assert exif_user_comment(filled) == _pillow_read(filled) == "Steps: 20, Seed: 1"
    xmp = b"\xff\xe1" + (2 + 9).to_bytes(2, "big") + b"http://x\x00"  # (fill bytes before a later segment too)
    later = data[:2] + xmp + b"\xff\xff" + data[2:]
    assert exif_user_comment(later) == _pillow_read(later) == "Steps: 20, Seed: 1"


def _webp_chunks(data: bytes) -> dict[bytes, bytes]:
    out, at = {}, 12
    while at + 8 <= len(data):
        size = int.from_bytes(data[at + 4:at + 8], "little")
        out.setdefault(data[at:at + 4], data[at + 8:at + 8 + size])
        at += 8 + size + (size & 1)
    return out


def test_an_animation_whose_last_frame_is_smaller_keeps_its_canvas():
    import numpy as np

    from sdadapt.image_exif import insert_exif, user_comment_exif

    first = Image.fromarray(np.random.default_rng(2).integers(0, 256, (33, 47, 3), dtype=np.uint8))
    last = first.copy()
    last.paste((255, 0, 0), (0, 0, 4, 4))  # (libwebp stores the last frame as a 4x4 sub-rectangle)
    saved = io.BytesIO()
    first.save(saved, format="WEBP", save_all=True, append_images=[last], duration=100, lossless=True)
    data = insert_exif(saved.getvalue(), user_comment_exif("Steps: 20"))
    assert _webp_chunks(data)[b"VP8X"][4:10] == _webp_chunks(saved.getvalue())[b"VP8X"][4:10]  # (47x33, not 4x4)
    assert exif_user_comment(data) == "Steps: 20"
    with Image.open(io.BytesIO(data)) as ours, Image.open(saved) as theirs:
        assert (ours.size, ours.n_frames) == (theirs.size, theirs.n_frames) == ((47, 33), 2)
        for k in range(2):
            ours.seek(k)
            theirs.seek(k)
            assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs.convert("RGB")))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_insert_exif_refuses_a_cut_file_naming_it(fmt):
    import struct

    from sdadapt.image_exif import insert_exif, user_comment_exif

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, format=fmt)
    data, block = buffer.getvalue(), user_comment_exif("hi")
    # (a WebP cut anywhere; a JPEG cut inside the segments piexif reads: its start and the two after it)
    ends = range(12, len(data)) if fmt == "WEBP" else range(3, 4 + int.from_bytes(data[4:6], "big") + 4)
    for end in ends:
        try:
            insert_exif(data[:end], block)
        except ValueError as exc:
            assert "not a whole" in str(exc)
        except struct.error as exc:
            raise AssertionError(f"cut to {end} bytes: {exc!r}") from None
        else:
            raise AssertionError(f"cut to {end} bytes: no error")
