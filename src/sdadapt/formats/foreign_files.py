"""What a "weights file" that holds no weights is, from its first bytes: the usual download mistakes.

A web page saved instead of the file (a Hugging Face ``/blob/`` link, a Civitai page, a login
page), a Git LFS pointer (a clone without ``git lfs``), an image, a JSON config, a GGUF model, a
text file (a training log or a caption given for the weights):
each is named with the fix, instead of "a corrupt safetensors file".
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["foreign_content"]

_HEAD_BYTES = 512


def foreign_content(path: str | Path) -> str | None:
    """What the file at ``path`` is and what to do, when its first bytes show it is no weights
    file (``"a web page (HTML) ..."``); ``None`` when they do not say (unreadable files too)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return None
    if head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return None  # a safetensors header (its length's low byte can be "{" or "<": 1 file in 256)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return ("a web page (HTML), not weights: the download saved a page instead of the file; on Hugging Face "
                "use the .../resolve/main/FILE link (not .../blob/...), and log in or pass a token for gated models")
    if text.startswith(b"version https://git-lfs"):
        return ("a Git LFS pointer (a few lines of text), not the weights: run `git lfs install` and `git lfs pull` "
                "in the cloned repository, or download the file itself")
    for magic, name in ((b"\x89png", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"gif8", "a GIF image")):
        if head.lower().startswith(magic):
            return f"{name}, not weights: pass the weights file (.safetensors, .pt, .ckpt, .bin)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image, not weights: pass the weights file (.safetensors, .pt, .ckpt, .bin)"
    if head[:4] == b"GGUF":
        return ("a GGUF file (a quantised model for llama.cpp / ComfyUI-GGUF): sdadapt reads .safetensors and "
                ".pt/.ckpt/.bin weights; use the model's .safetensors release")
    if text.startswith((b"{", b"[")):
        return ("a JSON text file (a config or index?), not weights: pass the .safetensors/.bin file it describes "
                "(a sharded model's *.safetensors.index.json lists its shard files)")
    if _is_text(head):
        return ("a text file (a training log, captions, prompts or a config?), not weights: pass the weights file "
                "(.safetensors, .pt, .ckpt, .bin)")
    return None


def _is_text(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) is UTF-8 text: printable characters, tabs and line ends (a character
    cut at the end of ``head`` allowed). Weights never are: a safetensors length, a zip or a pickle starts with
    control bytes."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\r\n" for ch in text)
