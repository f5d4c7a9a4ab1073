"""``generate``'s A1111 extra-network tags: ``<lora:NAME:...>`` / ``<lyco:...>`` / ``<hypernet:NAME:M>`` in
the prompt, looked up by name in ``--lora-dir`` / ``--hypernetwork-dir`` as A1111 looks them up (the file
stem, anywhere under the folder; a LoRA also by its ``ss_output_name`` alias); and the textual-inversion
embeddings of ``--embeddings-dir`` whose names the prompts use (:func:`prompt_embedding_files`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from ..prompt_schedule import ExtraNetworkTag
    from .generate_lbw_steps import StepRange

__all__ = ["EMBEDDING_SUFFIXES", "HYPERNETWORK_SUFFIXES", "LORA_SUFFIXES", "TagLoRA", "drop_tagged_options",
           "find_network_file", "prompt_embedding_files", "prompt_tag_files", "read_lbw_presets", "tag_block_weights"]

#: the files A1111's Lora extension lists (``--lora-dir``)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
#: A1111 lists ``*.pt`` hypernetworks; sdadapt also reads its own ``.safetensors`` ones
HYPERNETWORK_SUFFIXES = (".pt", ".safetensors")
#: the embedding files A1111 reads from its embeddings folder (it also reads embeddings hidden in images)
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")


@dataclass(frozen=True)
class TagLoRA:
    """One ``<lora:...>`` / ``<lyco:...>`` tag: its ``tag`` text, the ``file`` it names, the text-encoder and UNet
    multipliers (``te``, ``unet``) and the LoRA Block Weight extension's 26 slot weights (``block_weights``:
    BASE, IN00..IN11, M00, OUT00..OUT11; ``None``: no ``lbw=``) and step range (``steps``: ``start=`` / ``stop=`` /
    ``step=A-B``, :mod:`sdadapt.jobs.generate_lbw_steps`; ``None``: none) and A1111's ``dyn`` (the leading LoRA
    ranks kept, :func:`sdadapt.loratools.dylora.a1111_dyn_state`; ``None``: all)."""

    tag: str
    file: Path
    te: float
    unet: float
    block_weights: tuple[float, ...] | None = None
    steps: StepRange | None = None
    dyn: int | None = None


def read_lbw_presets(path: str | os.PathLike) -> dict[str, str]:
    """``--lbw-presets FILE``: the LoRA Block Weight extension's preset file (``lbwpresets.txt``, lines
    ``NAME:w,w,...``; other lines are comments) -> :data:`~sdadapt.loratools.block_weights.LBW_PRESETS` with the
    file's presets added (a file preset of a built-in name replaces it).

    Raises:
        InputError: no such file, or no preset line in it.
    """
    from ..loratools.block_weights import LBW_PRESETS, parse_lbw_presets

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--lbw-presets {file}: no such file")
    own = parse_lbw_presets(file.read_text(encoding="utf-8"))
    if not own:
        raise InputError(f"--lbw-presets {file}: no preset line in it; write lines NAME:w,w,... with 12, 17, 20 or "
                         "26 weights")
    return {**LBW_PRESETS, **own}


#: the extension's other tag options: refused, each with why (the ``<lora:>`` tag is named in the message)
_REFUSED_LBW_OPTIONS = {
    "lbwe": "the extension's elemental weights (lbwe=) are not read here; give per-block weights with lbw= instead",
}


def tag_block_weights(tag: ExtraNetworkTag, *, presets: Mapping[str, str] | None = None) -> tuple[float, ...] | None:
    """The 26 slot weights of a ``<lora:>`` tag's ``lbw=`` (or its alias ``w=``), as hako-mikan's
    sd-webui-lora-block-weight reads it (``scripts/lora_block_weight.py`` ``loradealer``): a preset name
    (``presets``, default the built-in ones) or 12/17/20/26 weights, unnamed slots 0, ``X`` the tag's ``x=`` — only
    when the tag has four or more items (the extension's ``syntaxdealer(items, "x=", 3) if len(items) >= 4 else
    1``), else 1. ``None`` without ``lbw=``.

    Raises:
        InputError: ``lbwe=`` (not built: the message says why), or a bad ``lbw=``
            (:func:`sdadapt.loratools.block_weights.parse_lbw_spec`), each naming the tag.
    """
    from ..loratools.block_weights import parse_lbw_spec

    for option, why in _REFUSED_LBW_OPTIONS.items():
        if option in tag.named:
            raise InputError(f"prompt tag {tag.text}: {why}")
    spec = tag.named.get("lbw", tag.named.get("w"))
    if spec is None:
        return None
    x = 1.0
    if len(tag.positional) + len(tag.named) >= 4 and "x" in tag.named:
        try:
            x = float(tag.named["x"])
        except ValueError:
            raise InputError(f"prompt tag {tag.text}: x={tag.named['x']} is not a number") from None
    try:
        return parse_lbw_spec(spec.strip(), presets=presets, x=x)
    except ValueError as exc:
        raise InputError(f"prompt tag {tag.text}: {exc}") from None


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
                     lbw_presets: Mapping[str, str] | None = None,
                     ) -> tuple[str, list[TagLoRA], list[tuple[Path, float]]]:
    """``prompt`` without its extra-network tags, the LoRA tags (:class:`TagLoRA`, with the LoRA Block Weight
    extension's ``lbw=`` read by :func:`tag_block_weights` from ``lbw_presets``, default the built-in presets, and
    its ``start=`` / ``stop=`` / ``step=`` by :func:`sdadapt.jobs.generate_lbw_steps.tag_step_range`)
    and the hypernetwork tags' ``(file, multiplier)``, in prompt order (:mod:`sdadapt.prompt_schedule`).
    Tags of other kinds are taken out and said on ``log`` (A1111 skips unknown networks)."""
    from ..prompt_schedule import (
        extra_network_tags,
        hypernetwork_multiplier,
        lora_tag_arguments,
    )
    from .generate_lbw_steps import tag_step_range

    say = log or (lambda line: None)
    text, tags = extra_network_tags(prompt)
    loras: list[TagLoRA] = []
    hypernetworks: list[tuple[Path, float]] = []
    for tag in tags:
        if tag.kind in ("lora", "lyco"):
            name, te, unet, dyn = lora_tag_arguments(tag)
            block_weights = tag_block_weights(tag, presets=lbw_presets)
            path = find_network_file(name, lora_dir, suffixes=LORA_SUFFIXES, option="--lora-dir", tag=tag.text,
                                     aliases=True)
            loras.append(TagLoRA(tag.text, path, te, unet, block_weights, tag_step_range(tag), dyn))
        elif tag.kind == "hypernet":
            name, multiplier = hypernetwork_multiplier(tag)
            path = find_network_file(name, hypernetwork_dir, suffixes=HYPERNETWORK_SUFFIXES,
                                     option="--hypernetwork-dir", tag=tag.text)
            hypernetworks.append((path, multiplier))
        else:
            say(f"warning: prompt tag {tag.text}: no extra network {tag.kind!r} here (lora, lyco, hypernet); "
                "taken out of the prompt, as A1111 skips it")
    return text, loras, hypernetworks


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def drop_tagged_options(option: str, specs: list[tuple[Path, float]], passes: list[list[tuple[Path, tuple, str]]],
                        *, option_weights: Callable[[float], tuple], log: Callable[[str], None] | None = None,
                        ) -> list[tuple[Path, float]]:
    """``specs`` (an option's ``(file, scale)``, e.g. ``--lora``) without those the prompt's tags already give.

    The infotext of a run writes its ``--lora`` / ``--hypernetwork`` options as prompt tags
    (:func:`sdadapt.jobs.infotext.option_network_tags`), so a prompt pasted back from a PNG may name a file that is
    also given as an option. Such a file is applied once, as its tag, when every pass's tags (``passes``: each a
    list of ``(file, weights, tag text)``; the first pass's, then the hires prompt's when it has its own) name it
    with exactly ``option_weights(scale)`` — the same effect; said on ``log``.

    Raises:
        InputError: a file given both ways at other weights (or with a tag in one pass only): which one is meant
            is not guessed.
    """
    say = log or (lambda line: None)
    kept = []
    for path, scale in specs:
        found = [[(weights, text) for file, weights, text in items if _same_file(Path(file), path)]
                 for items in passes]
        tags = [text for items in found for _, text in items]
        if not tags:
            kept.append((path, scale))
            continue
        if all(items and all(weights == option_weights(scale) for weights, _ in items) for items in found):
            say(f"{option} {path}:{scale!r}: the prompt's tag {tags[0]} gives the same file at the same weight; "
                "applied once, as the tag")
            continue
        raise InputError(f"{option} {path}:{scale!r} and the prompt tag {tags[0]} name the same file "
                         f"{'at other weights' if all(found) else 'in one pass only'}; give it one way: leave out "
                         f"{option} or the tag (an sdadapt PNG's prompt already holds its {option} files as tags)")
    return kept
