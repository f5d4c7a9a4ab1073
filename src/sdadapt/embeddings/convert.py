"""One textual-inversion embedding file to another format (A1111, kohya, diffusers), read back and compared.

:func:`sdadapt.load_embedding` then :func:`sdadapt.save_embedding`: the vectors keep their bits
(and dtype unless ``dtype`` is given); the trigger word is the input's (its file stem, or a
diffusers file's token) unless ``token`` renames it. Metadata moves where the target has a place
for it: kohya's ``ss_*``/``modelspec.*`` fields stay in kohya files only, diffusers' ``format``
field in diffusers files only; the rest (A1111's ``sd_checkpoint`` ...) is carried everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, WeightFileError
from ..formats.embeddings import EMBEDDING_FORMATS, load_embedding, save_embedding
from ..formats.files import (
    check_input_file,
    check_output_file,
    read_safetensors_header,
    sniff_format,
)
from .embedding import SDXL_KEYS

__all__ = ["EmbeddingConvertReport", "embedding_format", "convert_embedding"]

_SUFFIXES = {"a1111": (".pt", ".safetensors", ".bin"), "kohya": (".safetensors", ".pt"), "diffusers": (".safetensors", ".bin")}
_KOHYA_PREFIXES = ("ss_", "modelspec.")


@dataclass(frozen=True)
class EmbeddingConvertReport:
    """What :func:`convert_embedding` wrote, as read back: ``name`` (the trigger a prompt uses with
    this file: its stem, or the token of a ``learned_embeds.*`` file), ``vectors`` per encoder
    ``(k, dim)`` count, ``dims`` ``{encoder: width}``, ``max_delta`` = max |v_out − v_in| (float64)."""

    path: Path
    source_format: str
    target: str
    name: str
    vectors: int
    dims: dict[str, int]
    max_delta: float


def embedding_format(path: str | os.PathLike) -> str:
    """Which tool's format an embedding file is: ``"a1111"`` (``string_to_param``, or ``emb_params`` /
    SDXL ``clip_l``+``clip_g`` without kohya metadata), ``"kohya"`` (``ss_*``/``modelspec.*`` metadata)
    or ``"diffusers"`` (``{token: tensor}``, or SDXL tensors with diffusers' ``format`` field only)."""
    file = Path(path)
    if sniff_format(file) == "pickle":
        keys: list[str] = []
        metadata: dict[str, str] = {}
        from ..formats.pickles import pickle_header

        keys = list(pickle_header(file).tensors)
    else:
        header, metadata = read_safetensors_header(file)
        keys = list(header)
    if any(k.startswith(_KOHYA_PREFIXES) for k in metadata):
        return "kohya"
    if any(k.startswith("string_to_param") for k in keys) or "emb_params" in keys:
        return "a1111"
    if set(SDXL_KEYS) <= set(keys):
        return "diffusers" if set(metadata) <= {"format", "step"} and metadata else "a1111"
    return "diffusers"


def _target_metadata(metadata: dict[str, str], target: str) -> dict[str, str]:
    from ..formats.kohya import STALE_METADATA

    kept = {k: v for k, v in metadata.items() if k not in STALE_METADATA or k == "format"}  # (hashes of the old bytes)
    if target != "kohya":
        kept = {k: v for k, v in kept.items() if not k.startswith(_KOHYA_PREFIXES)}
    if target != "diffusers":
        kept.pop("format", None)
    return kept


def convert_embedding(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str,
    token: str | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> EmbeddingConvertReport:
    """Write the embedding file ``source`` as ``to`` (``"a1111"``, ``"kohya"``, ``"diffusers"``) at ``out``,
    read it back and compare the vectors.

    Args:
        source: A1111 ``.pt``/``.safetensors``, kohya, diffusers ``learned_embeds.*`` or SDXL ``clip_l``/``clip_g``.
        out: ``.pt``/``.safetensors``/``.bin`` as the target uses them (A1111 and kohya UIs prompt with
            the file stem: name it ``<token>.<ext>``).
        to: the target format.
        token: the trigger word to write (default: the input's).
        base_model: kohya metadata's base model (default from the vector widths).
        dtype: cast the vectors; ``None`` keeps them. Same format and suffix as the input needs
            ``dtype`` or ``token`` (else there is nothing to convert).
        overwrite: replace an existing output.

    Returns:
        :class:`EmbeddingConvertReport` of the written file as read back.

    Raises:
        InputError: unknown ``to``, a suffix the target does not use, nothing to convert.
        WeightFileError: not an embedding.
        OutputExistsError: ``out`` exists and not ``overwrite``.
    """
    if to not in EMBEDDING_FORMATS:
        raise InputError(f"--to must be one of {list(EMBEDDING_FORMATS)} for an embedding, got {to!r}")
    if token is not None and not token.strip():
        raise InputError("--token: give a non-empty trigger word")
    target = Path(out)
    if target.suffix.lower() not in _SUFFIXES[to]:
        raise InputError(f"{target}: {to} embeddings are {' or '.join(_SUFFIXES[to])} files; name the output "
                         f"*{_SUFFIXES[to][0] if to != 'a1111' else '.pt'}")
    check_input_file(source)
    source_format = embedding_format(source)
    if (source_format == to and Path(source).suffix.lower() == target.suffix.lower() and dtype is None
            and token is None):
        raise InputError(f"{source}: already a {to} {target.suffix} embedding; nothing to convert (give --dtype "
                         "or --token to rewrite it)")
    check_output_file(target, overwrite=overwrite, suffix=None)
    if target.exists() and os.path.samefile(source, target):
        raise InputError(f"{target}: is also the input; write the output to another file")
    embedding = load_embedding(source)
    metadata = _target_metadata(dict(embedding.metadata), to)
    if token is not None:
        metadata.pop("token", None)
    written = dataclasses.replace(embedding, name=token or embedding.name, metadata=metadata)
    if dtype is not None:
        written = written.to(dtype)
    try:
        save_embedding(target, written, format=to, base_model=base_model)
    except ValueError as exc:
        if isinstance(exc, WeightFileError):
            raise
        raise InputError(f"{target}: {exc}") from None
    back = load_embedding(target)
    if set(back.vectors) != set(embedding.vectors):
        raise WeightFileError(f"{target}: read back with encoders {sorted(back.vectors)}, wrote {sorted(embedding.vectors)}")
    worst = 0.0
    for key, vectors in embedding.vectors.items():
        if back.vectors[key].shape != vectors.shape:
            raise WeightFileError(f"{target}: {key} read back as {tuple(back.vectors[key].shape)}, wrote {tuple(vectors.shape)}")
        worst = max(worst, float((back.vectors[key].double() - vectors.double()).abs().max()))
    return EmbeddingConvertReport(path=target, source_format=source_format, target=to, name=back.name,
                                  vectors=back.count, dims=dict(back.dims), max_delta=worst)
