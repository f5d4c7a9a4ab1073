"""The training fields AUTOMATIC1111 writes into its own textual-inversion and hypernetwork ``.pt`` files, from the
kohya-style metadata a training run records (``ss_*``): A1111's ``Embedding.save`` / ``Hypernetwork.save`` store
``step`` (the optimiser steps taken: A1111's "continue training" starts its step counter there),
``sd_checkpoint`` (the base model's short hash, the first 10 hex digits of its file's sha256, A1111's
``shorthash`` / "AutoV2") and ``sd_checkpoint_name`` (the base model's file name without its suffix,
``model_name``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath

from torch import Tensor

from ..embeddings.embedding import Embedding
from .files import WEIGHT_SUFFIXES

__all__ = ["a1111_training_fields", "trained_embedding"]


def a1111_training_fields(metadata: Mapping[str, str] | None) -> dict[str, object]:
    """``{"step": int, "sd_checkpoint": str, "sd_checkpoint_name": str}`` from a run's metadata (``ss_steps``,
    ``ss_new_sd_model_hash``, ``ss_sd_model_name``); a field whose source is missing, empty or not a number is left
    out (A1111 writes ``None`` then)."""
    metadata = metadata or {}
    fields: dict[str, object] = {}
    steps = str(metadata.get("ss_steps", "")).strip()
    if steps.isdigit():
        fields["step"] = int(steps)
    digest = str(metadata.get("ss_new_sd_model_hash", "")).strip().lower()
    if len(digest) >= 10 and all(c in "0123456789abcdef" for c in digest):
        fields["sd_checkpoint"] = digest[:10]
    name = str(metadata.get("ss_sd_model_name", "")).strip()
    if name:
        fields["sd_checkpoint_name"] = PurePath(name).stem if PurePath(name).suffix in WEIGHT_SUFFIXES else PurePath(name).name
    return fields


def trained_embedding(name: str, vectors: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None) -> Embedding:
    """The :class:`~sdadapt.embeddings.embedding.Embedding` a training run saves: ``metadata`` with A1111's
    ``sd_checkpoint`` / ``sd_checkpoint_name`` added and its ``step`` (:func:`a1111_training_fields`)."""
    fields = a1111_training_fields(metadata)
    step = fields.pop("step", None)
    return Embedding(name, vectors, step=step if isinstance(step, int) else None,
                     metadata={**dict(metadata or {}), **{k: str(v) for k, v in fields.items()}})
