"""``generate``'s A1111 extra-network tags: ``<lora:NAME:...>`` / ``<lyco:...>`` / ``<hypernet:NAME:M>`` in
the prompt, looked up by name in ``--lora-dir`` / ``--hypernetwork-dir`` as A1111 looks them up (the file
stem, anywhere under the folder; a LoRA also by its ``ss_output_name`` alias)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError

__all__ = ["HYPERNETWORK_SUFFIXES", "LORA_SUFFIXES", "find_network_file", "prompt_tag_files"]

#: the files A1111's Lora extension lists (``--lora-dir``)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
#: A1111 lists ``*.pt`` hypernetworks; sdadapt also reads its own ``.safetensors`` ones
HYPERNETWORK_SUFFIXES = (".pt", ".safetensors")


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
