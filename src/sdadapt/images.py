"""Images in and out without requiring PIL: PNG writer, PNG reader, grids, image folders.

PNG is written by a small encoder (zlib + CRC from the standard library), so ``demo`` works on a
bare install; PIL is used for reading when it is installed (JPEG, WebP, 16-bit, palette, interlaced
PNGs...). Without PIL the reader handles 8-bit non-interlaced grayscale / RGB / RGBA PNGs — what
most tools write — and says how to get the rest.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .formats.files import atomic_write

__all__ = ["to_uint8", "write_png", "read_image", "read_image_channels", "scale_image", "image_grid", "load_image_folder", "ImageFolderError",
           "IMAGE_SUFFIXES", "is_image_file", "check_image_folder", "read_png_text", "OUTPUT_SUFFIXES", "check_output_suffix",
           "check_save_settings", "encode_image", "write_image", "numbered"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".avif")  # (what write_image writes: A1111's samples formats)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_CHUNK = 1 << 20  # (a compressed text chunk's most decompressed bytes: Pillow's PngImagePlugin.MAX_TEXT_CHUNK)


def is_image_file(path: Path, *, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    """A training image of a folder: a file with one of :data:`IMAGE_SUFFIXES` (any case) whose name does not start
    with ``.`` — hidden files, such as the ``._name.png`` resource forks macOS leaves on exFAT / SMB copies, are
    not images (kohya's ``glob_images`` never matches them either)."""
    return path.suffix.lower() in suffixes and not path.name.startswith(".") and path.is_file()


class ImageFolderError(ValueError):
    """An image folder is empty, unreadable or lacks captions; the message names the file."""


def check_image_folder(folder: str | os.PathLike) -> Path:
    """``Path(folder)`` if it is a folder; else an :class:`ImageFolderError` saying what it is instead
    (missing, or a file)."""
    root = Path(folder)
    if root.is_dir():
        return root
    if not root.exists():
        raise ImageFolderError(f"{root}: not a folder of images (no such folder); pass the folder that holds your images")
    raise ImageFolderError(f"{root}: not a folder of images (it is a file); pass the folder that holds it")


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] (or (H, W, 3) uint8) -> (H, W, 3) uint8, clamped and rounded (the 8-bit pixels a
    PNG, or a PIL image, holds)."""
    if image.dtype == torch.uint8:
        arr = image.cpu().numpy()
        return arr if arr.shape[-1] in (1, 3, 4) else arr.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected a (C, H, W) image with C in 1/3/4, got {tuple(image.shape)}")
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    """A text chunk as Pillow's ``PngInfo.add_text`` writes it (A1111's and ComfyUI's PNGs): ``tEXt`` where the value
    encodes as Latin-1, else an uncompressed ``iTXt`` (UTF-8, no language tag or translated keyword); the keyword
    1-79 printable ASCII characters."""
    if not 1 <= len(key) <= 79 or not all(32 < ord(ch) < 127 or ch == " " for ch in key) or key != key.strip():
        raise ValueError(f"a PNG text keyword must be 1-79 printable ASCII characters, got {key!r}")
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8"))


def encode_png(pixels: np.ndarray, *, text: Mapping[str, str] | None = None) -> bytes:
    """(H, W, C) uint8, C in 1/3/4 -> PNG bytes (filter 0 on every row, zlib level 6); ``text``: key -> value
    written as text chunks before the pixels, as Pillow's ``PngInfo.add_text`` writes them — ``tEXt`` for Latin-1
    text, else uncompressed ``iTXt`` (:func:`read_png_text` reads them back)."""
    h, w, c = pixels.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    notes = b"".join(_text_chunk(k, v) for k, v in (text or {}).items())
    return (_PNG_SIGNATURE + _chunk(b"IHDR", header) + notes + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, image: Tensor, *, text: Mapping[str, str] | None = None) -> Path:
    """Write one image — (C, H, W) float in [-1, 1] or (H, W, C) uint8 — as PNG, atomically (``text``: key ->
    value, kept in the file as ``tEXt`` / ``iTXt`` chunks: :func:`encode_png`)."""
    data = encode_png(to_uint8(image), text=text)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def numbered(path: str | os.PathLike, index: int) -> Path:
    """The ``index``-th of several images written for ``path``: ``{stem}-{index:02d}{suffix}`` beside it
    (``out.png`` -> ``out-00.png``, ``out-01.png``, ...)."""
    target = Path(path)
    return target.with_name(f"{target.stem}-{index:02d}{target.suffix}")


def check_output_suffix(path: str | os.PathLike, *, what: str = "the output") -> str:
    """``path``'s image format by its suffix: ``"png"``, ``"jpeg"``, ``"webp"`` or ``"avif"``.

    Raises:
        ValueError: another suffix (naming ``path`` and the ones written); ImportError: JPEG, WebP or AVIF without
            a Pillow that encodes it.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: {what} is written as PNG, JPEG, WebP or AVIF; name it *.png, *.jpg, *.webp or "
                         "*.avif")
    if suffix == ".png":
        return "png"
    try:
        from PIL import features
    except ImportError:
        raise ImportError(f"{path}: JPEG, WebP and AVIF images are encoded by Pillow: pip install 'sdadapt[images]' "
                          "(or pillow), or write *.png") from None
    kind = {".webp": "webp", ".avif": "avif"}.get(suffix, "jpeg")
    if kind == "avif" and not features.check("avif"):
        raise ImportError(f"{path}: this Pillow has no AVIF encoder (Pillow 11.3 or newer has one): pip install -U "
                          "pillow, or write *.png / *.webp")
    return kind


def check_save_settings(*, quality: int, lossless: bool) -> None:
    """Refuse a JPEG/WebP ``quality`` that is not a whole number from 1 to 100 (A1111's slider), or a ``lossless``
    that is not a bool.

    Raises:
        ValueError: a quality out of range; TypeError: a ``lossless`` that is not a bool.
    """
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"the JPEG/WebP quality must be a whole number from 1 to 100 (A1111's slider), got "
                         f"{quality!r}")
    if not isinstance(lossless, bool):
        raise TypeError(f"lossless must be True or False, got {lossless!r}")


def encode_image(pixels: np.ndarray, *, kind: str, text: Mapping[str, str] | None = None,
                 comment_key: str = "parameters", quality: int = 80, lossless: bool = False) -> bytes:
    """(H, W, C) uint8, C in 1/3/4 -> the bytes of a ``kind`` (``"png"``, ``"jpeg"``, ``"webp"``, ``"avif"``) image, as
    A1111's ``save_image_with_geninfo`` writes it: a PNG with every ``text`` entry as a text chunk; a JPEG or WebP
    encoded by Pillow (alpha dropped, ``quality`` — A1111's "Quality for saved jpeg and avif images", default 80 —
    and ``lossless`` for WebP) with ``text[comment_key]`` (the infotext) as its EXIF ``UserComment``; an AVIF encoded
    by Pillow at ``quality`` with that EXIF handed to the encoder (A1111's ``exif=``); the other entries left out as
    A1111 leaves them.

    Raises:
        ValueError: ``kind`` or ``quality`` (1-100) out of range, an image too large for the format, an infotext too
            long for a JPEG's EXIF (64 KiB: :func:`sdadapt.image_exif.check_jpeg_comment`; WebP and AVIF have no
            such limit).
    """
    check_save_settings(quality=quality, lossless=lossless)
    if kind == "png":
        return encode_png(pixels, text=text)
    if kind not in ("jpeg", "webp", "avif"):
        raise ValueError(f"kind must be 'png', 'jpeg', 'webp' or 'avif', got {kind!r}")
    import io

    from PIL import Image

    from .image_exif import check_jpeg_comment, insert_exif, user_comment_exif

    comment = (text or {}).get(comment_key)
    if comment is not None and kind == "jpeg":  # (a text too long for a JPEG refused before encoding; WebP and AVIF
        check_jpeg_comment(comment)  # hold any length, as A1111 writes them)
    exif = None if comment is None else user_comment_exif(comment)
    limit = {"jpeg": 65535, "webp": 16383}.get(kind)  # (an AVIF's: the encoder's to say)
    if limit is not None and max(pixels.shape[:2]) > limit:
        raise ValueError(f"a {pixels.shape[1]}x{pixels.shape[0]} image is larger than {kind.upper()} holds "
                         f"({limit} pixels a side); write a PNG")
    channels = pixels.shape[-1]
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels[..., :3] if kind != "avif" else pixels)
    buffer = io.BytesIO()
    if kind == "avif":  # (A1111: image.save(format=..., quality=jpeg_quality, exif=exif_bytes); RGBA kept)
        image.save(buffer, format="AVIF", quality=quality, exif=exif)
        return buffer.getvalue()
    image.save(buffer, format=kind.upper(), quality=quality, **({"lossless": lossless} if kind == "webp" else {}))
    return buffer.getvalue() if exif is None else insert_exif(buffer.getvalue(), exif)


def write_image(path: str | os.PathLike, image: Tensor | np.ndarray, *, text: Mapping[str, str] | None = None,
                comment_key: str = "parameters", quality: int = 80, lossless: bool = False) -> Path:
    """Write one image — (C, H, W) float in [-1, 1], or (H, W, C) uint8 (a tensor or an array) — atomically as
    PNG, JPEG or WebP by
    ``path``'s suffix (:func:`check_output_suffix`), with ``text`` as :func:`encode_image` keeps it.

    Raises:
        ValueError: a suffix other than .png / .jpg / .jpeg / .webp, or as :func:`encode_image`.
        ImportError: JPEG or WebP without Pillow.
    """
    kind = check_output_suffix(path)
    pixels = image if isinstance(image, np.ndarray) else to_uint8(image)
    data = encode_image(pixels, kind=kind, text=text, comment_key=comment_key, quality=quality,
                        lossless=lossless)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _inflate_text(data: bytes) -> bytes | None:
    """A compressed text chunk's zlib stream inflated as Pillow inflates it (at most ``MAX_TEXT_CHUNK``, 1 MiB:
    never unbounded), else ``None`` (larger: Pillow refuses it)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_CHUNK)
    return None if inflater.unconsumed_tail else out


def _png_text(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """A ``tEXt``, ``zTXt`` or ``iTXt`` chunk's key and value as Pillow reads them (A1111's ``image.info``), else
    ``None``: another chunk, a compression other than zlib, a stream larger than 1 MiB or a broken ``iTXt``."""
    key, _, rest = body.partition(b"\x00")
    if kind == b"tEXt":
        value = rest
    elif kind == b"zTXt":  # (a method byte, 0: zlib; a broken stream an empty value, as Pillow's)
        if rest[:1] not in (b"", b"\x00"):
            return None
        try:
            value = _inflate_text(rest[1:])
        except zlib.error:
            value = b""
        if value is None:
            return None
    elif kind == b"iTXt":  # (compression flag, method, language tag, translated keyword, the UTF-8 text)
        if len(rest) < 2 or rest.count(b"\x00", 2) < 2:
            return None
        flag, method = rest[0], rest[1]
        value = rest[2:].split(b"\x00", 2)[2]
        if flag:
            if method != 0:
                return None
            try:
                value = _inflate_text(value)
            except zlib.error:
                return None
            if value is None:
                return None
        return key.decode("latin-1"), value.decode("utf-8", errors="replace")
    else:
        return None
    return key.decode("latin-1"), value.decode("latin-1")


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks (``tEXt``, ``zTXt``, ``iTXt`` — compressed ones inflated up to 1 MiB each, as Pillow reads
    them; larger ones skipped) of a PNG file as key -> value; ``{}`` for a file that is not a PNG (no PIL needed).
    Only the chunks before the pixels are read (where :func:`write_png` puts them, and A1111's ``Image.open`` reads
    them)."""
    out: dict[str, str] = {}
    with open(path, "rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return out
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return out
            (length,) = struct.unpack(">I", head[:4])
            kind = head[4:]
            if kind in (b"IDAT", b"IEND"):
                return out
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                handle.seek(length + 4, os.SEEK_CUR)  # (another chunk, and its CRC)
                continue
            body = handle.read(length)
            handle.seek(4, os.SEEK_CUR)  # (the CRC)
            if len(body) < length:
                return out
            text = _png_text(kind, body)
            if text is not None:
                out[text[0]] = text[1]


def image_grid(images: Tensor, *, columns: int, padding: int = 2, fill: float = 1.0) -> Tensor:
    """(N, C, H, W) -> one (C, rows·(H+p)+p, columns·(W+p)+p) image, row-major."""
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), fill, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def decode_png(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8 for 8-bit non-interlaced gray/gray+alpha/RGB/RGBA images."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageFolderError(f"{source}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ImageFolderError(f"{source}: truncated PNG (chunk {kind!r} cut short)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ImageFolderError(f"{source}: PNG without IHDR/IDAT (corrupt or truncated)")
    w, h, depth, colour_type, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour_type)
    if depth != 8 or channels is None or interlace:
        raise ImageFolderError(
            f"{source}: PNG with bit depth {depth}, colour type {colour_type}, interlace {interlace} needs PIL "
            "(pip install pillow); without it 8-bit non-interlaced gray/RGB/RGBA PNGs are read"
        )
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageFolderError(f"{source}: corrupt PNG data ({exc})") from None
    stride = w * channels
    if len(raw) != h * (stride + 1):
        raise ImageFolderError(f"{source}: PNG data has {len(raw)} bytes, expected {h * (stride + 1)}")
    # (the row filters on plain ints in a bytearray: the Sub / Average / Paeth ones run byte by byte, ~30x faster
    # than numpy scalars; Up is one numpy add)
    out = bytearray()
    prev = bytearray(stride)
    for y in range(h):
        start = y * (stride + 1)
        f, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if f == 1:
            for x in range(channels, stride):
                line[x] = (line[x] + line[x - channels]) & 0xFF
        elif f == 2:
            line = bytearray((np.frombuffer(bytes(line), np.uint8) + np.frombuffer(bytes(prev), np.uint8)).tobytes())
        elif f == 3:
            for x in range(stride):
                left = line[x - channels] if x >= channels else 0
                line[x] = (line[x] + (left + prev[x]) // 2) & 0xFF
        elif f == 4:
            for x in range(stride):
                a = line[x - channels] if x >= channels else 0
                b = prev[x]
                c = prev[x - channels] if x >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        elif f != 0:
            raise ImageFolderError(f"{source}: unknown PNG filter {f} in row {y}")
        out += line
        prev = line
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(h, w, channels).copy()


def read_image_channels(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 4) uint8 RGBA, not composited (gray -> RGB; alpha 255 where the file has none).

    Raises:
        ImageFolderError: unreadable, or not a PNG without PIL.
    """
    file = Path(path)
    try:
        from PIL import Image  # optional

        with Image.open(file) as im:
            return np.asarray(im.convert("RGBA"))
    except ImportError:
        if file.suffix.lower() != ".png":
            raise ImageFolderError(f"{file}: reading {file.suffix} images needs PIL (pip install pillow); PNGs work without it") from None
        arr = decode_png(file.read_bytes(), source=str(file))
    except OSError as exc:
        raise ImageFolderError(f"{file}: unreadable image ({exc})") from None
    rgb = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    alpha = arr[..., -1:] if arr.shape[-1] in (2, 4) else np.full((*arr.shape[:2], 1), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


def read_image(path: str | os.PathLike, *, size: int | None = None, alpha: str = "white") -> Tensor:
    """An image file as (3, H, W) float32 in [-1, 1] (gray -> RGB).

    ``alpha``: ``"white"`` composites a transparent image on white; ``"drop"`` keeps the colour the file stores under
    its alpha and drops the alpha, as PIL's ``convert("RGB")`` — what kohya (``load_image``), diffusers' training
    scripts and A1111's training datasets train on. ``size`` resizes (area/bilinear) the shorter side to ``size`` and
    centre-crops a square.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    x = torch.from_numpy(read_image_channels(path).astype(np.float32) / 255.0)  # (H, W, 4)
    opacity = x[..., -1:] if alpha == "white" else torch.ones_like(x[..., -1:])
    x = x[..., :-1] * opacity + (1 - opacity)  # alpha over white
    image = x.permute(2, 0, 1) * 2 - 1
    if size is not None:
        c, h, w = image.shape
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = scale_image(image, (nh, nw))
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[:, top : top + size, left : left + size]
    return image.contiguous()


def scale_image(image: Tensor, size: tuple[int, int], *, interpolation: str | None = None,
                bounds: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``image`` (C, H, W) scaled to ``size`` (h, w): area-averaged down, bilinear up; unchanged at
    that size. Training images, their loss masks and :func:`read_image` all go through it.

    ``interpolation``: one of kohya's ``resize_interpolation`` names instead
    (:func:`sdadapt.resampling.resample`; ``bounds``: the pixel range its result is clipped to,
    as kohya's 8-bit pixels are — (-1, 1) for images, (0, 1) for masks)."""
    h, w = size
    if (h, w) == tuple(image.shape[1:]):
        return image
    if interpolation is not None:
        from .resampling import resample

        return resample(image, (h, w), interpolation=interpolation, bounds=bounds)
    mode = "area" if h < image.shape[1] else "bilinear"
    return torch.nn.functional.interpolate(image[None], size=(h, w), mode=mode,
                                           **({} if mode == "area" else {"align_corners": False}))[0]


def load_image_folder(folder: str | os.PathLike, *, size: int, default_caption: str | None = None) -> tuple[Tensor, list[str]]:
    """Images of a folder (N, 3, size, size) and their captions.

    A caption is the ``.txt`` (or ``.caption``) file of the same stem, kohya's convention; images
    without one take ``default_caption`` (the ``--prompt``), else it is an error naming them.
    """
    root = check_image_folder(folder)
    files = sorted(p for p in root.iterdir() if is_image_file(p))
    if not files:
        raise ImageFolderError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    images, captions, missing = [], [], []
    for file in files:
        images.append(read_image(file, size=size))
        text = None
        for suffix in (".txt", ".caption"):
            caption_file = file.with_suffix(suffix)
            if caption_file.is_file():
                text = caption_file.read_text(encoding="utf-8").strip()
                break
        if not text:
            if default_caption is None:
                missing.append(file.name)
            text = default_caption or ""
        captions.append(text)
    if missing:
        raise ImageFolderError(
            f"{root}: {len(missing)} image(s) have no caption file ({', '.join(missing[:5])}); "
            "add NAME.txt beside each image or pass --prompt for all of them"
        )
    return torch.stack(images), captions
