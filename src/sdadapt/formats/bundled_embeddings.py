"""Textual-inversion embeddings stored inside a LoRA file (``bundle_emb.<name>.<tensor>``): A1111's "bundled
embeddings" (``extensions-builtin/Lora/networks.py``: every such key is set aside from the network, grouped by name,
and each group loaded as an embedding file's dict and registered under that name) — OneTrainer writes them with
its LoRAs ("bundle embeddings"): ``bundle_emb.<name>.clip_l`` (SD1/SD2: the one encoder's vectors), SDXL
``clip_l`` + ``clip_g``; A1111's own form ``bundle_emb.<name>.string_to_param.*``.

The LoRA readers leave these keys out (:func:`without_bundled`); :func:`bundled_embeddings` reads them as
:class:`~sdadapt.embeddings.embedding.Embedding` s, which ``generate`` loads with the LoRA, as A1111 does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from ..embeddings.embedding import Embedding

__all__ = ["BUNDLE_PREFIX", "bundle_groups", "bundled_embeddings", "without_bundled"]

#: the key prefix of a bundled embedding
BUNDLE_PREFIX = "bundle_emb."


def without_bundled(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without its bundled-embedding keys (the LoRA alone)."""
    return {key: value for key, value in state.items() if not key.startswith(BUNDLE_PREFIX)}


def bundled_embeddings(path: str | os.PathLike) -> list[Embedding]:
    """The embeddings a LoRA file bundles, in file order (``[]`` for none).

    A group ``bundle_emb.<name>.*`` becomes the dict an embedding file holds (``clip_l`` → one encoder's tensor,
    ``clip_l`` + ``clip_g`` → SDXL, ``string_to_param.*`` → A1111's) and is read as that file would be
    (:func:`~sdadapt.formats.embeddings.embedding_from_state`), named ``<name>`` — for SD1/SD2 a lone ``clip_l`` (or
    any one tensor) is the vectors, as A1111's ``create_embedding_from_data`` takes a dict's one tensor.

    Raises:
        WeightFileError: the file cannot be read, or a group is no embedding (names the file and the group).
    """
    from .embeddings import embedding_from_state
    from .files import read_safetensors_header, read_safetensors_tensors, read_weights, sniff_format

    if sniff_format(path) == "safetensors":  # (only the bundled tensors read: the LoRA is read by its loader)
        keys = [key for key in read_safetensors_header(path)[0] if key.startswith(BUNDLE_PREFIX)]
        state = read_safetensors_tensors(path, keys) if keys else {}
    else:
        state = read_weights(path)[0]
    return [embedding_from_state(group, name=name, source=f"{path} (bundled embedding {name!r})")
            for name, group in bundle_groups(state).items()]


def bundle_groups(state: Mapping[str, Tensor]) -> dict[str, dict]:
    """``{name: the dict an embedding file of it holds}`` of the ``bundle_emb.<name>.*`` keys of ``state``, in file
    order: ``clip_l`` (+ ``clip_g``), ``string_to_param`` one level down; a lone ``clip_l`` (OneTrainer's SD1/SD2
    form) as ``emb_params``."""
    groups: dict[str, dict] = {}
    for key, value in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
        group = groups.setdefault(name, {})
        head, _, tail = rest.partition(".")
        if tail:  # (A1111's string_to_param.*: one level down)
            group.setdefault(head, {})[tail] = value
        else:
            group[head] = value
    return {name: {"emb_params": group["clip_l"]} if set(group) == {"clip_l"} else group
            for name, group in groups.items()}
