"""The infotext A1111 writes into JPEG and WebP images: the EXIF ``UserComment`` (``images.save_image_with_geninfo``:
``piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})`` inserted into the file), read
back as its ``read_info_from_image`` reads it — without Pillow or piexif: the JPEG ``APP1`` segment or the WebP
``EXIF`` chunk, the TIFF structure in it, the Exif IFD's ``UserComment`` and its character-code prefix.
"""

from __future__ import annotations

import struct

__all__ = ["exif_user_comment", "image_kind"]

_EXIF_HEADER = b"Exif\x00\x00"
_EXIF_IFD_POINTER = 0x8769
_USER_COMMENT = 0x9286
_PREFIXES = {b"ASCII\x00\x00\x00": "ascii", b"JIS\x00\x00\x00\x00\x00": "shift_jis", b"UNICODE\x00": "utf_16_be"}


def image_kind(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from a file's first 12 bytes, else ``None``."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _jpeg_exif(data: bytes) -> bytes | None:
    """The TIFF bytes of a JPEG's ``APP1`` Exif segment (the first), else ``None``."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # (markers without a length)
            at += 2
            continue
        if marker in (0xDA, 0xD9):  # (the image data, or its end: no metadata after)
            return None
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        body = data[at + 4:at + 2 + length]
        if marker == 0xE1 and body.startswith(_EXIF_HEADER):
            return body[len(_EXIF_HEADER):]
        at += 2 + length
    return None


def _webp_exif(data: bytes) -> bytes | None:
    """The TIFF bytes of a WebP's ``EXIF`` chunk (an ``Exif\\0\\0`` header skipped where a writer put one)."""
    at = 12
    while at + 8 <= len(data):
        kind = data[at:at + 4]
        (size,) = struct.unpack("<I", data[at + 4:at + 8])
        if kind == b"EXIF":
            return data[at + 8:at + 8 + size].removeprefix(_EXIF_HEADER)
        at += 8 + size + (size & 1)  # (chunks are padded to an even size)
    return None


def _user_comment(tiff: bytes) -> bytes | None:
    """The raw ``UserComment`` value in a TIFF (EXIF) structure: IFD0's Exif IFD pointer, then that IFD's entry."""
    if tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
        return None
    order = "<" if tiff[:2] == b"II" else ">"

    def entry(ifd: int, tag: int) -> tuple[int, int, bytes] | None:
        if ifd + 2 > len(tiff):
            return None
        (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
        for k in range(count):
            at = ifd + 2 + 12 * k
            if at + 12 > len(tiff):
                return None
            found, kind, n = struct.unpack(order + "HHI", tiff[at:at + 8])
            if found == tag:
                return kind, n, tiff[at + 8:at + 12]
        return None

    (ifd0,) = struct.unpack(order + "I", tiff[4:8])
    pointer = entry(ifd0, _EXIF_IFD_POINTER)
    if pointer is None:
        return None
    (exif_ifd,) = struct.unpack(order + "I", pointer[2])
    comment = entry(exif_ifd, _USER_COMMENT)
    if comment is None:
        return None
    _, n, value = comment
    if n <= 4:
        return value[:n]
    (offset,) = struct.unpack(order + "I", value)
    return tiff[offset:offset + n] if offset + n <= len(tiff) else None


def exif_user_comment(data: bytes) -> str | None:
    """The EXIF ``UserComment`` text of a JPEG or WebP file's bytes ``data`` (A1111's infotext there), else ``None``.

    Decoded as piexif's ``UserComment.load``: by its 8-byte character-code prefix (``UNICODE``: UTF-16 big-endian,
    piexif's and so A1111's; ``ASCII``; ``JIS``); a value without a known prefix as UTF-8 with errors dropped (A1111's
    fallback), its leading NULs (an "undefined" prefix) left out.
    """
    kind = image_kind(data[:12])
    tiff = _jpeg_exif(data) if kind == "jpeg" else _webp_exif(data) if kind == "webp" else None
    raw = None if tiff is None else _user_comment(tiff)
    if raw is None:
        return None
    encoding = _PREFIXES.get(raw[:8])
    if encoding is not None:
        return raw[8:].decode(encoding, errors="replace")
    return raw.decode("utf-8", errors="ignore").lstrip("\x00")
