"""The infotext A1111 writes into JPEG and WebP images: the EXIF ``UserComment`` (``images.save_image_with_geninfo``:
``piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})`` inserted into the file), read
back as its ``read_info_from_image`` reads it — without Pillow or piexif: the JPEG ``APP1`` segment or the WebP
``EXIF`` chunk, the TIFF structure in it, the Exif IFD's ``UserComment`` and its character-code prefix.

And written as A1111 writes it: :func:`user_comment_exif` is ``piexif.dump`` of that one entry byte for byte,
:func:`insert_exif` is ``piexif.insert`` (a JPEG's ``APP0`` replaced by the ``APP1`` segment; a WebP made an extended
one, ``VP8X``, with the ``EXIF`` chunk last). Only a JPEG limits the block's size (its segment's 16-bit length: 64 KiB,
an infotext of 32,739 characters, :func:`check_jpeg_comment`); a WebP's chunk and an AVIF's item hold any length, as
piexif and Pillow write them for A1111.
"""

from __future__ import annotations

import struct

__all__ = ["JPEG_EXIF_LIMIT", "check_jpeg_comment", "exif_user_comment", "image_kind", "insert_exif",
           "user_comment_exif"]

_EXIF_HEADER = b"Exif\x00\x00"
_EXIF_IFD_POINTER = 0x8769
_USER_COMMENT = 0x9286
JPEG_EXIF_LIMIT = 0xFFFF - 2  # (the most bytes of an EXIF block a JPEG's APP1 segment holds: its length counts itself)
_PREFIXES = {b"ASCII\x00\x00\x00": "ascii", b"JIS\x00\x00\x00\x00\x00": "shift_jis", b"UNICODE\x00": "utf_16_be"}


def image_kind(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"``, ``"webp"`` or ``"avif"`` from a file's first 12 bytes, else ``None``."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def _avif_exif(data: bytes) -> bytes | None:
    """The TIFF bytes of an AVIF's Exif item, as Pillow reads it (``info["exif"]``; A1111's
    ``read_info_from_image``), else ``None`` (no Exif, or a Pillow without AVIF)."""
    import io

    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            exif = image.info.get("exif")
    except (ImportError, OSError):
        return None
    return None if not exif else bytes(exif).removeprefix(_EXIF_HEADER)


def _jpeg_exif(data: bytes) -> bytes | None:
    """The TIFF bytes of a JPEG's ``APP1`` Exif segment (the first), else ``None``."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        while at + 4 <= len(data) and data[at + 1] == 0xFF:  # (fill bytes before a marker: JPEG B.1.1.2, as Pillow)
            at += 1
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
    """The EXIF ``UserComment`` text of a JPEG, WebP or AVIF file's bytes ``data`` (A1111's infotext there), else
    ``None`` (an AVIF's is read through Pillow).

    Decoded as piexif's ``UserComment.load``: by its 8-byte character-code prefix (``UNICODE``: UTF-16 big-endian,
    piexif's and so A1111's; ``ASCII``; ``JIS``); a value without a known prefix as UTF-8 with errors dropped (A1111's
    fallback), its leading NULs (an "undefined" prefix) left out.
    """
    kind = image_kind(data[:12])
    readers = {"jpeg": _jpeg_exif, "webp": _webp_exif, "avif": _avif_exif}
    tiff = readers[kind](data) if kind in readers else None
    raw = None if tiff is None else _user_comment(tiff)
    if raw is None:
        return None
    encoding = _PREFIXES.get(raw[:8])
    if encoding is not None:
        return raw[8:].decode(encoding, errors="replace")
    return raw.decode("utf-8", errors="ignore").lstrip("\x00")


def user_comment_exif(text: str) -> bytes:
    """``text`` as the EXIF block A1111 inserts into a JPEG or WebP: ``Exif\\0\\0`` and a big-endian TIFF whose IFD0
    points to an Exif IFD holding one ``UserComment`` (``UNICODE\\0`` and UTF-16 big-endian, unencodable characters
    replaced) — the bytes of ``piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})``.

    Any length: only a JPEG's segment limits it (:func:`check_jpeg_comment`; :func:`insert_exif` refuses a block
    too long for a JPEG), a WebP's ``EXIF`` chunk and an AVIF's Exif item do not.
    """
    comment = b"UNICODE\x00" + text.encode("utf_16_be", errors="replace")
    ifd0 = struct.pack(">HHHII", 1, _EXIF_IFD_POINTER, 4, 1, 26) + b"\x00" * 4  # (one entry: the Exif IFD, at 26)
    exif_ifd = struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), 40)  # (piexif writes no next-IFD link here)
    return _EXIF_HEADER + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def check_jpeg_comment(text: str) -> None:
    """Refuse an infotext ``text`` whose :func:`user_comment_exif` block does not fit a JPEG's ``APP1`` segment
    (:data:`JPEG_EXIF_LIMIT`, 64 KiB: 32,739 characters of the Basic Multilingual Plane; A1111's ``piexif.insert``
    fails there too, with a ``struct.error``). WebP and AVIF have no such limit.

    Raises:
        ValueError: ``text`` too long, naming its length and the formats that hold it.
    """
    if len(user_comment_exif(text)) > JPEG_EXIF_LIMIT:
        raise ValueError(f"an infotext of {len(text)} characters does not fit a JPEG's EXIF segment (64 KiB); write "
                         "a PNG or a WebP, which have no such limit")


def _jpeg_insert(data: bytes, segment: bytes) -> bytes:
    """piexif's JPEG ``merge_segments``: ``segment`` (an ``APP1`` Exif) replaces an ``APP0`` right after the start
    (and an Exif ``APP1`` after it), else an Exif ``APP1`` there, else goes in after the start."""
    parts, at = [data[:2]], 2
    while at < len(data) and data[at:at + 2] != b"\xff\xda" and len(parts) < 3:  # (the first two segments)
        if at + 4 > len(data) or data[at] != 0xFF:
            raise ValueError("not a whole JPEG (its header segments end early)")
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if length < 2 or at + 2 + length > len(data):
            raise ValueError("not a whole JPEG (a header segment runs past the end of the file)")
        parts.append(data[at:at + 2 + length])
        at += 2 + length
    rest = data[at:]
    if not rest.startswith(b"\xff"):  # (the image data, or the segments after the first two, must follow)
        raise ValueError("not a whole JPEG (it ends after its header segments)")
    is_app0 = [part[:2] == b"\xff\xe0" for part in parts]
    is_exif = [part[:2] == b"\xff\xe1" and part[4:10] == _EXIF_HEADER for part in parts]
    if len(parts) > 2 and is_app0[1] and is_exif[2]:
        return parts[0] + segment + rest
    if len(parts) > 1 and (is_app0[1] or is_exif[1]):
        return parts[0] + segment + b"".join(parts[2:]) + rest
    return parts[0] + segment + b"".join(parts[1:]) + rest


def _webp_insert(data: bytes, exif: bytes) -> bytes:
    """piexif's WebP ``insert``: the chunks read, any ``EXIF`` chunk dropped, ``exif`` put before an ``XMP`` or ``ANIM``
    chunk (else last), a ``VP8X`` header first with its flags and canvas size, the RIFF size set again. The canvas
    size is the ``VP8X`` chunk's where there is one (piexif takes the last frame's, which breaks an animation whose
    last frame is smaller than its canvas), else the image chunk's."""
    (riff,) = struct.unpack("<I", data[4:8])
    end = 8 + riff
    if end > len(data):
        raise ValueError(f"not a whole WebP (its RIFF header says {end} bytes, the file has {len(data)})")
    chunks, at = [], 12
    while at < end:
        if at + 8 > end:
            raise ValueError("not a whole WebP (a chunk header is cut short)")
        kind, (size,) = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])
        if at + 8 + size > end:
            raise ValueError(f"not a whole WebP (its {kind.decode('latin-1')!r} chunk runs past the end)")
        chunks.append((kind, data[at + 8:at + 8 + size]))
        at += 8 + size + (size & 1)
    chunks = [chunk for chunk in chunks if chunk[0] != b"EXIF"]
    before = next((k for k, (kind, _) in enumerate(chunks) if kind == b"XMP "), None)
    if before is None:
        before = next((k for k, (kind, _) in enumerate(chunks) if kind == b"ANIM"), len(chunks))
    chunks.insert(before, (b"EXIF", exif))
    flags, size, canvas = 0, None, None
    for kind, body in chunks:
        if kind == b"VP8X" and len(body) >= 10:
            canvas = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        elif kind == b"VP8 " and (start := body.find(b"\x9d\x01\x2a")) >= 0 and start + 7 <= len(body):
            size = struct.unpack("<HH", body[start + 3:start + 7])  # (the key frame's start code, then its size)
        elif kind == b"VP8L" and len(body) >= 5:
            flags |= 0x10 if body[4] & 0x10 else 0  # (its alpha bit)
            bits = int.from_bytes(body[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"ANMF" and len(body) >= 12:
            size = (int.from_bytes(body[6:9], "little") + 1, int.from_bytes(body[9:12], "little") + 1)
        flags |= {b"ICCP": 0x20, b"ALPH": 0x10, b"EXIF": 0x08, b"XMP ": 0x04, b"ANIM": 0x02}.get(kind, 0)
    size = canvas or size
    if size is None:
        raise ValueError("a WebP without an image chunk (VP8, VP8L, VP8X or ANMF)")
    header = bytes([flags, 0, 0, 0]) + (size[0] - 1).to_bytes(3, "little") + (size[1] - 1).to_bytes(3, "little")
    chunks = [(b"VP8X", header), *(chunk for chunk in chunks if chunk[0] != b"VP8X")]
    body = b"".join(kind + struct.pack("<I", len(part)) + part + b"\x00" * (len(part) & 1) for kind, part in chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def insert_exif(data: bytes, exif: bytes) -> bytes:
    """The JPEG or WebP file ``data`` with the EXIF block ``exif`` (``Exif\\0\\0`` and a TIFF, as
    :func:`user_comment_exif` makes) put in as ``piexif.insert`` puts it (A1111's ``save_image_with_geninfo``).

    Raises:
        ValueError: ``data`` neither JPEG nor WebP, or cut short (naming where); ``exif`` without its header, or too
            long for a JPEG's segment (:data:`JPEG_EXIF_LIMIT`; a WebP's chunk holds any length).
    """
    if not exif.startswith(_EXIF_HEADER):
        raise ValueError("an EXIF block starts with 'Exif\\0\\0'")
    kind = image_kind(data[:12])
    if kind == "jpeg":
        if len(exif) > JPEG_EXIF_LIMIT:
            raise ValueError(f"an EXIF block of {len(exif)} bytes does not fit a JPEG's segment (64 KiB)")
        return _jpeg_insert(data, b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    if kind == "webp":
        return _webp_insert(data, exif[len(_EXIF_HEADER):])
    raise ValueError(f"EXIF goes into a JPEG or a WebP, not {kind or 'these bytes'}")
