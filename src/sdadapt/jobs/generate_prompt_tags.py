"""``generate``'s A1111 extra-network tags: ``<lora:NAME:...>`` / ``<lyco:...>`` / ``<hypernet:NAME:M>`` in
the prompt, looked up by name in ``--lora-dir`` / ``--hypernetwork-dir`` as A1111 looks them up (the file
stem, anywhere under the folder; a LoRA also by its ``ss_output_name`` alias); and the textual-inversion
embeddings of ``--embeddings-dir`` whose names the prompts use (:func:`prompt_embedding_files`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError

__all__ = ["EMBEDDING_SUFFIXES", "HYPERNETWORK_SUFFIXES", "LORA_SUFFIXES", "find_network_file",
           "prompt_embedding_files", "prompt_tag_files"]

#: the files A1111's Lora extension lists (``--lora-dir``)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
#: A1111 lists ``*.pt`` hypernetworks; sdadapt also reads its own ``.safetensors`` ones
HYPERNETWORK_SUFFIXES = (".pt", ".safetensors")
#: the embedding files A1111 reads from its embeddings folder (it also reads embeddings hidden in images)
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")


def _contains(ids: list[int], part: list[int]) -> bool:
    """Whether ``part`` occurs in ``ids`` as a contiguous run."""
    n = len(part)
    return n > 0 and any(ids[i:i + n] == part for i in range(len(ids) - n + 1))


def prompt_embedding_files(texts: list[str], folder: str | os.PathLike, *, tokenize: Callable[[str], list[int]],
                           log: Callable[[str], None] | None = None) -> list[Path]:
    """The embedding files under ``folder`` (A1111's ``--embeddings-dir``) whose names ``texts`` use, in folder
    order.

    As A1111's ``EmbeddingDatabase``: every ``.pt`` / ``.bin`` / ``.safetensors`` file anywhere under the folder
    (symlinks followed, empty files skipped) is an embedding named by its file stem, and a text uses it where
    the name's token ids (``tokenize``: the model's tokenizer, no special tokens) occur in the text's — so the
    match is case-insensitive and by whole tokens (``EasyNegative`` matches ``(easynegative:1.2)`` and
    ``EasyNegative_v2``, not ``EasyNegatives``). Only the used ones are returned: sdadapt adds an embedding's
    name to the tokenizer, which would split other words that contain it. Images with embeddings inside (A1111
    reads ``.png``/``.webp``) are named on ``log`` and skipped.

    Raises:
        InputError: ``folder`` is not a folder, or two files of one used name (A1111 would keep one of them
            silently; the message names both).
    """
    say = log or (lambda line: None)
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--embeddings-dir {root}: no such folder")
    text_ids = [tokenize(text) for text in texts if text]
    used: dict[str, list[Path]] = {}
    for here, _, files in sorted(os.walk(root, followlinks=True)):
        for file in sorted(files):
            path = Path(here, file)
            suffix = path.suffix.lower()
            if suffix in _IMAGE_SUFFIXES:
                if any(_contains(ids, tokenize(path.stem)) for ids in text_ids):
                    say(f"warning: --embeddings-dir {path}: an embedding inside an image is not read here; convert "
                        "it to .safetensors (python -m sdadapt convert) to use it")
                continue
            if suffix not in EMBEDDING_SUFFIXES or path.stat().st_size == 0:
                continue
            if any(_contains(ids, tokenize(path.stem)) for ids in text_ids):
                used.setdefault(path.stem.lower(), []).append(path)
    for paths in used.values():
        if len(paths) > 1:
            raise InputError(f"--embeddings-dir {root}: {len(paths)} embeddings named {paths[0].stem!r}: "
                             f"{', '.join(map(str, paths))}; keep one")
    return [paths[0] for paths in used.values()]


def find_network_file(name: str, folder: str | os.PathLike | None, *, suffixes: tuple[str, ...], option: str,
                      tag: str, aliases: bool = False) -> Path:
    """The file ``NAME`` + one of ``suffixes`` anywhere under ``folder`` (recursive, symlinks followed).
    ``aliases``: when no file has that stem, a ``.safetensors`` file whose ``ss_output_name`` metadata is
    ``NAME`` (A1111's Lora extension also finds a LoRA by that alias).

    Raises:
        InputError: no ``folder`` given (named by ``option``), not a folder, no such file (the names
            there are listed), or several files of that name.
    """
    if folder is None:
        raise InputError(f"prompt tag {tag}: give {option} DIR, the folder its files are looked up in by name")
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{option} {root}: no such folder")
    found: list[Path] = []
    candidates: list[Path] = []
    for here, _, files in sorted(os.walk(root, followlinks=True)):
        for file in sorted(files):
            path = Path(here, file)
            if path.suffix.lower() in suffixes:
                candidates.append(path)
                if path.stem == name:
                    found.append(path)
    names = [path.stem for path in candidates]
    if not found and aliases:
        from ..errors import WeightFileError
        from ..formats.files import read_safetensors_header

        for path in candidates:
            if path.suffix.lower() != ".safetensors":
                continue
            try:
                metadata = read_safetensors_header(path)[1]
            except WeightFileError:  # (a broken file is reported when it is named, not while searching)
                continue
            if metadata.get("ss_output_name") == name:
                found.append(path)
    if not found:
        known = ", ".join(sorted(set(names))[:20]) or "none"
        raise InputError(f"prompt tag {tag}: no {'/'.join(suffixes)} file named {name!r} under {option} {root} "
                         f"(there: {known})")
    if len(found) > 1:
        raise InputError(f"prompt tag {tag}: {len(found)} files named {name!r} under {root}: "
                         f"{', '.join(map(str, found))}; keep one")
    return found[0]


def prompt_tag_files(prompt: str, *, lora_dir: str | os.PathLike | None = None,
                     hypernetwork_dir: str | os.PathLike | None = None,
                     log: Callable[[str], None] | None = None,
                     ) -> tuple[str, list[tuple[str, Path, float, float]], list[tuple[Path, float]]]:
    """``prompt`` without its extra-network tags, the LoRA tags' ``(tag, file, te, unet)`` and the
    hypernetwork tags' ``(file, multiplier)``, in prompt order (:mod:`sdadapt.prompt_schedule`).
    Tags of other kinds are taken out and said on ``log`` (A1111 skips unknown networks)."""
    from ..prompt_schedule import (
        extra_network_tags,
        hypernetwork_multiplier,
        lora_multipliers,
    )

    say = log or (lambda line: None)
    text, tags = extra_network_tags(prompt)
    loras: list[tuple[str, Path, float, float]] = []
    hypernetworks: list[tuple[Path, float]] = []
    for tag in tags:
        if tag.kind in ("lora", "lyco"):
            name, te, unet = lora_multipliers(tag)
            path = find_network_file(name, lora_dir, suffixes=LORA_SUFFIXES, option="--lora-dir", tag=tag.text,
                                     aliases=True)
            loras.append((tag.text, path, te, unet))
        elif tag.kind == "hypernet":
            name, multiplier = hypernetwork_multiplier(tag)
            path = find_network_file(name, hypernetwork_dir, suffixes=HYPERNETWORK_SUFFIXES,
                                     option="--hypernetwork-dir", tag=tag.text)
            hypernetworks.append((path, multiplier))
        else:
            say(f"warning: prompt tag {tag.text}: no extra network {tag.kind!r} here (lora, lyco, hypernet); "
                "taken out of the prompt, as A1111 skips it")
    return text, loras, hypernetworks
