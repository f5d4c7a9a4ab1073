"""The :class:`Embedding` value: a trigger word and its vectors, per text encoder.

A textual-inversion embedding is tiny: for one trigger word, ``k`` vectors of the text encoder's
token-embedding width (``(k, 768)`` for SD1's CLIP-L, ``(k, 1024)`` for SD2's OpenCLIP-H), and for
SDXL one ``(k, 768)`` block for CLIP-L and one ``(k, 1280)`` block for CLIP-G. The files that hold
them (A1111, kohya, diffusers) are translated by :mod:`sdadapt.formats.embeddings`.

Keys of :attr:`Embedding.vectors`:

| model | keys |
|---|---|
| one text encoder (SD1, SD2, the toy model, any CLIP-like encoder) | ``"text_encoder"`` (:data:`ENCODER_KEY`) |
| SDXL | ``"clip_l"`` (``text_encoder``, 768) and ``"clip_g"`` (``text_encoder_2``, 1280) — the file keys A1111 and kohya use |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ENCODER_KEY", "ENCODER_KEYS", "SDXL_KEYS", "Embedding"]

#: the key of a single-text-encoder embedding (SD1, SD2, the toy model)
ENCODER_KEY = "text_encoder"
#: SDXL's keys, in the order of the pipeline's encoders (``text_encoder``, ``text_encoder_2``)
SDXL_KEYS = ("clip_l", "clip_g")
ENCODER_KEYS = (ENCODER_KEY, *SDXL_KEYS)


@dataclass(frozen=True, eq=False)
class Embedding:
    """A trigger word and its learned vectors.

    Attributes:
        name: the trigger word used in prompts (A1111: the file stem).
        vectors: ``{encoder key: (k, dim) tensor}``, one key (:data:`ENCODER_KEY`) or SDXL's two
            (:data:`SDXL_KEYS`), every block with the same ``k``. A 1-D ``(dim,)`` tensor (old
            diffusers concept files) is taken as ``(1, dim)``. Tensors keep their dtype.
        step: the training step recorded in the file (A1111's ``step``), if any.
        metadata: string metadata carried through files (safetensors metadata; A1111's
            ``sd_checkpoint``/``sd_checkpoint_name``).

    Raises:
        ValueError: empty name, unknown keys, tensors that are not ``(k, dim)`` floats, or blocks
            with different ``k``.
    """

    name: str
    vectors: Mapping[str, Tensor]
    step: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an embedding needs a non-empty trigger word as its name, got {self.name!r}")
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError(f"embedding {self.name!r}: vectors must be a non-empty {{encoder key: (k, dim) tensor}} dict")
        keys = set(self.vectors)
        if keys not in ({ENCODER_KEY}, set(SDXL_KEYS)):
            raise ValueError(
                f"embedding {self.name!r}: vector keys {sorted(keys)} are neither {[ENCODER_KEY]} (one text encoder) "
                f"nor {list(SDXL_KEYS)} (SDXL)"
            )
        vectors: dict[str, Tensor] = {}
        for key in (k for k in ENCODER_KEYS if k in keys):
            value = self.vectors[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = str(value.dtype).removeprefix("torch.") if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"embedding {self.name!r}: {key} must be a floating-point tensor, got {got}")
            if value.ndim == 1:
                value = value.unsqueeze(0)  # (dim,) -> (1, dim)
            if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
                raise ValueError(f"embedding {self.name!r}: {key} must be (vectors, dim), got shape {tuple(value.shape)}")
            vectors[key] = value
        counts = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"embedding {self.name!r}: every encoder needs the same number of vectors, got {counts}")
        if self.step is not None and not isinstance(self.step, int):
            raise ValueError(f"embedding {self.name!r}: step must be an int or None, got {self.step!r}")
        bad = {k: type(v).__name__ for k, v in dict(self.metadata).items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"embedding {self.name!r}: metadata must map strings to strings; non-strings: {bad}")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def count(self) -> int:
        """``k``: vectors per encoder (how many prompt tokens the trigger word becomes)."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def dims(self) -> dict[str, int]:
        """``{encoder key: dim}``."""
        return {k: int(v.shape[1]) for k, v in self.vectors.items()}

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoder keys, in pipeline order."""
        return tuple(self.vectors)

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    def to(self, dtype: torch.dtype) -> Embedding:
        """A copy with every block cast to ``dtype``."""
        return dataclasses.replace(self, vectors={k: v.to(dtype) for k, v in self.vectors.items()})

    def equal(self, other: Embedding) -> bool:
        """Same name, step, metadata, keys, shapes, dtypes and bits."""
        return (
            self.name == other.name
            and self.step == other.step
            and dict(self.metadata) == dict(other.metadata)
            and self.vectors.keys() == other.vectors.keys()
            and all(
                self.vectors[k].dtype == other.vectors[k].dtype and torch.equal(self.vectors[k], other.vectors[k])
                for k in self.vectors
            )
        )

    def __repr__(self) -> str:
        blocks = ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in self.vectors.items())
        return f"Embedding(name={self.name!r}, {blocks}, step={self.step})"
