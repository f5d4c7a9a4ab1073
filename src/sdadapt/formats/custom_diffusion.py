"""Custom Diffusion files: diffusers' ``pytorch_custom_diffusion_weights`` and the modifier-token files.

Read (:func:`load_custom_diffusion`):

* diffusers ``pytorch_custom_diffusion_weights.safetensors`` / ``.bin`` (``unet.save_attn_procs``):
  ``<layer>.attn2.processor.to_k_custom_diffusion.weight`` ... (**full** replacement weights; the
  ``.bin`` also holds an empty dict per parameter-less processor, which carries nothing);
* a folder holding one of them plus the modifier tokens diffusers' training script writes beside
  it (``<new1>.bin`` / ``<new1>.safetensors``: ``{token: (dim,)}``, a diffusers textual-inversion file);
* sdadapt's files: the weights file plus ``<stem>-token.<ext>`` (``-token1``, ``-token2`` ... for
  several tokens; see :func:`token_files`). A ``.safetensors`` records how many (its
  ``custom_diffusion_tokens`` metadata); beside a ``.bin`` (no metadata) ``<stem>-token.<ext>`` is
  the one token, else ``-token1``, ``-token2`` ... up to the first gap;
* adobe's ``delta.bin`` (``{"unet": {<diffusers param>: tensor}, "modifier_token": {token: tensor}}``).

Written (:func:`save_custom_diffusion_file`): ``.safetensors`` with diffusers' keys (``format: pt``
metadata, plus sdadapt's ``custom_diffusion_tokens`` / ``custom_diffusion_prompts`` JSON lists), or
``.bin`` as diffusers' pickle path writes it (an empty dict per ``<layer>.attn1.processor``). Both hold
a placeholder for the self-attention (``attn1``) beside each ``attn2`` layer — the ``.safetensors`` as a
0-length tensor, which diffusers' loader also takes for "no parameters" (``len(value) == 0``) — so
diffusers' loader builds a processor for every attention layer of an SD UNet: in diffusers 0.42
``unet.load_attn_procs(dir, weight_name=..., _pipeline=pipe)`` refuses a dict that misses layers
(diffusers' own ``.safetensors``, attn2 only, fails there). Each modifier token
as its own diffusers textual-inversion file (``pipe.load_textual_inversion(file)`` reads it). A save
owns the ``<stem>-token*`` files of its name (:func:`existing_token_files`): overwriting removes those
of an earlier save it does not rewrite (3 tokens then 1: ``-token1``…``-token3`` go), without
``overwrite`` any of them is refused; no other file is touched (diffusers' ``<new1>.bin`` in a
folder never matches; a token-file name holding another save's weights — ``cd-token.safetensors``
saved as weights — is refused, even with ``overwrite``). The files of one save appear together or not at all (a failed save leaves the
earlier one as it was); pickles are read only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..embeddings.embedding import Embedding
from ..errors import OutputError, OutputExistsError, WeightFileError
from .files import (
    check_finite,
    check_output_file,
    read_safetensors_header,
    read_weights,
    staged_outputs,
    write_safetensors,
)
from .torch_files import save_torch_file

__all__ = [
    "KV_PARAMS",
    "PARAM_SUFFIXES",
    "PROMPTS_KEY",
    "Q_OUT_PARAMS",
    "TOKENS_KEY",
    "WEIGHT_NAMES",
    "CustomDiffusionFile",
    "drop_placeholders",
    "existing_token_files",
    "file_key",
    "is_custom_diffusion_state",
    "load_custom_diffusion",
    "save_custom_diffusion_file",
    "split_file_key",
    "token_files",
]

#: diffusers' file names (``CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE`` / ``CUSTOM_DIFFUSION_WEIGHT_NAME``)
WEIGHT_NAMES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
#: module parameter (inside an ``attn2``) -> the suffix after ``<layer>.processor.`` in a file
PARAM_SUFFIXES: dict[str, str] = {
    "to_k.weight": "to_k_custom_diffusion.weight",
    "to_v.weight": "to_v_custom_diffusion.weight",
    "to_q.weight": "to_q_custom_diffusion.weight",
    "to_out.0.weight": "to_out_custom_diffusion.0.weight",
    "to_out.0.bias": "to_out_custom_diffusion.0.bias",
}
_SUFFIX_PARAMS = {v: k for k, v in PARAM_SUFFIXES.items()}
#: what ``train_kv`` trains; ``train_q_out`` adds :data:`Q_OUT_PARAMS`
KV_PARAMS = ("to_k.weight", "to_v.weight")
Q_OUT_PARAMS = ("to_q.weight", "to_out.0.weight", "to_out.0.bias")
#: safetensors metadata keys sdadapt adds (JSON lists of strings)
TOKENS_KEY = "custom_diffusion_tokens"
PROMPTS_KEY = "custom_diffusion_prompts"
_SUFFIXES = (".safetensors", ".bin")


def file_key(layer: str, param: str) -> str:
    """The file key of ``param`` (``"to_k.weight"`` ...) of the ``attn2`` layer ``layer``
    (diffusers path, e.g. ``"mid_block.attentions.0.transformer_blocks.0.attn2"``)."""
    return f"{layer}.processor.{PARAM_SUFFIXES[param]}"


def split_file_key(key: str) -> tuple[str, str] | None:
    """``(diffusers layer path, module parameter)`` of a Custom Diffusion key, or ``None``.

    ``"up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias"``
    → ``("up_blocks.1.attentions.2.transformer_blocks.0.attn2", "to_out.0.bias")``.
    """
    head, sep, suffix = key.rpartition(".processor.")
    if not sep or suffix not in _SUFFIX_PARAMS:
        return None
    return head, _SUFFIX_PARAMS[suffix]


def is_custom_diffusion_state(keys) -> bool:
    """Whether a file's keys are Custom Diffusion weights (diffusers' own test: ``custom_diffusion`` in a key)."""
    return any("custom_diffusion" in k for k in keys)


@dataclass
class CustomDiffusionFile:
    """A Custom Diffusion result as read from (or about to be written to) files.

    Attributes:
        weights: ``{file key: full replacement weight}`` (``(out, in)`` weights, ``(out,)`` biases).
        embeddings: the modifier tokens (one :class:`~sdadapt.Embedding` each; its name is the token).
        metadata: the weights file's string metadata.
        source: the path it came from (for messages).
    """

    weights: dict[str, Tensor]
    embeddings: list[Embedding] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"

    @property
    def tokens(self) -> list[str]:
        """The modifier tokens: the embeddings' names, else those the metadata records."""
        if self.embeddings:
            return [e.name for e in self.embeddings]
        return _json_list(self.metadata.get(TOKENS_KEY))

    @property
    def prompts(self) -> list[str]:
        """The training prompts sdadapt recorded (``custom_diffusion_prompts``), or ``[]``."""
        return _json_list(self.metadata.get(PROMPTS_KEY))

    @property
    def train_q_out(self) -> bool:
        """Whether it replaces ``to_q`` / ``to_out`` too."""
        return any(k.endswith(PARAM_SUFFIXES["to_q.weight"]) for k in self.weights)

    def layers(self) -> list[str]:
        """The diffusers layer paths it touches, sorted."""
        return sorted({split_file_key(k)[0] for k in self.weights if split_file_key(k) is not None})  # type: ignore[index]


def _json_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def token_files(path: str | os.PathLike, count: int = 1) -> tuple[Path, ...]:
    """The modifier-token files saved beside the weights file ``path``: ``<stem>-token<ext>`` for one
    token, ``<stem>-token1<ext>`` ... ``<stem>-token<count><ext>`` for several."""
    path = Path(path)
    if count == 1:
        return (path.with_name(f"{path.stem}-token{path.suffix}"),)
    return tuple(path.with_name(f"{path.stem}-token{i}{path.suffix}") for i in range(1, count + 1))


def existing_token_files(path: str | os.PathLike) -> list[Path]:
    """The files beside the weights file ``path`` named as its modifier-token files: exactly
    ``<stem>-token<ext>`` or ``<stem>-token<N><ext>`` (``N`` = 1, 2 …, no leading zeros; ``ext`` as
    in ``path``), sorted (``-token`` first, then by ``N``). Other files never match, nor does one
    holding Custom Diffusion weights: that is another save's weights file (``cd-token.safetensors``
    is the weights of a save named so, not a token of ``cd.safetensors``)."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(path.stem) + r"-token([1-9][0-9]{0,5})?" + re.escape(path.suffix))
    found = []
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is not None and entry.is_file() and not _holds_custom_diffusion_weights(entry):
            found.append((int(match.group(1) or 0), entry))
    return [entry for _, entry in sorted(found)]


def _holds_custom_diffusion_weights(file: Path) -> bool:
    """Whether ``file`` holds Custom Diffusion weights, keys such as
    ``<layer>.attn2.processor.to_k_custom_diffusion.weight`` (a ``.safetensors`` by its header alone;
    a token named ``<custom_diffusion>`` is no such key); an unreadable file does not."""
    try:
        if file.suffix.lower() == ".safetensors":
            keys = read_safetensors_header(file)[0]
        else:
            keys = read_weights(file)[0]
    except (WeightFileError, OSError):
        return False
    return any(split_file_key(k) is not None for k in keys)


def _token_files_beside(target: Path) -> list[Path]:
    """The token files of a weights file without token metadata (a ``.bin``, a foreign file):
    ``<stem>-token<ext>`` alone, else ``-token1``, ``-token2`` … up to the first gap (what a save of
    that many tokens writes; a stale higher number after a gap is not this save's)."""
    single = token_files(target, 1)[0]
    if single.is_file() and not _holds_custom_diffusion_weights(single):
        return [single]
    found = []
    for number in range(1, 10_000):
        file = target.with_name(f"{target.stem}-token{number}{target.suffix}")
        if not file.is_file() or _holds_custom_diffusion_weights(file):
            break
        found.append(file)
    return found


# ------------------------------------------------------------------------------------ reading
def _adobe_state(tensors: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """adobe ``delta.bin`` (flattened: ``unet.<param>``, ``modifier_token.<token>``) -> (file keys, tokens)."""
    weights: dict[str, Tensor] = {}
    tokens: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("modifier_token."):
            tokens[key[len("modifier_token."):]] = value
        elif key.startswith("unet."):
            inner = key[len("unet."):]
            for param in PARAM_SUFFIXES:
                if inner.endswith(".attn2." + param):
                    weights[file_key(inner[: -len(param) - 1], param)] = value
                    break
            else:
                raise WeightFileError(f"{source}: {key!r} is not a cross-attention weight; not a Custom Diffusion delta.bin")
    return weights, tokens


def _token_embedding(token: str, value: Tensor, source: str) -> Embedding:
    try:
        return Embedding(token, {"text_encoder": value.reshape(1, -1) if value.ndim == 1 else value})
    except ValueError as exc:
        raise WeightFileError(f"{source}: modifier token {token!r}: {exc}") from None


def _read_token_file(file: Path) -> list[Embedding]:
    tensors, _ = read_weights(file)
    check_finite(tensors, source=str(file))
    if not tensors or any(v.ndim not in (1, 2) for v in tensors.values()):
        raise WeightFileError(f"{file}: not a modifier-token file (expected {{token: (dim,) tensor}}, diffusers' format)")
    return [_token_embedding(token, value, str(file)) for token, value in tensors.items()]


def drop_placeholders(state: Mapping[str, object]) -> dict:
    """``state`` without diffusers' parameter-less processor entries (``{}`` in a ``.bin``, 0-length
    tensors in sdadapt's ``.safetensors``): they carry nothing."""
    return {k: v for k, v in state.items()
            if not (isinstance(v, Mapping) or (k.endswith(".processor") and v.numel() == 0))}  # type: ignore[attr-defined]


def _read_weights_file(file: Path) -> CustomDiffusionFile:
    tensors, metadata = read_weights(file)
    tensors = drop_placeholders(tensors)
    check_finite(tensors, source=str(file))
    embeddings: list[Embedding] = []
    if any(k.startswith(("unet.", "modifier_token.")) for k in tensors):
        weights, tokens = _adobe_state(tensors, str(file))
        embeddings = [_token_embedding(t, v, str(file)) for t, v in tokens.items()]
    else:
        weights = dict(tensors)
    if not is_custom_diffusion_state(weights):
        raise WeightFileError(
            f"{file}: no Custom Diffusion weights in it (expected keys like "
            "'<layer>.attn2.processor.to_k_custom_diffusion.weight', as diffusers' save_attn_procs writes them)"
        )
    foreign = [k for k in weights if split_file_key(k) is None]
    if foreign:
        raise WeightFileError(f"{file}: {len(foreign)} key(s) are not Custom Diffusion weights, e.g. {foreign[0]!r}")
    return CustomDiffusionFile(weights, embeddings, dict(metadata), str(file))


def load_custom_diffusion(path: str | os.PathLike) -> CustomDiffusionFile:
    """Read a Custom Diffusion result: a weights file, or a folder holding diffusers' weights file.

    The modifier tokens come from the files beside it: sdadapt's ``<stem>-token*.<ext>`` (as many as
    its ``custom_diffusion_tokens`` metadata records, when it has that key; else ``<stem>-token<ext>``
    alone, or ``-token1``, ``-token2`` … up to the first gap), or in a folder without those every
    other ``.safetensors``/``.bin`` holding ``{token: (dim,)}`` (diffusers' ``<new1>.bin``); adobe's
    ``delta.bin`` carries them inside.

    Returns:
        a :class:`CustomDiffusionFile` (weights keep the file's dtype).

    Raises:
        WeightFileError: missing or corrupt files, no Custom Diffusion weights, NaN/inf values.
        UnsafeFileError: a pickle that would run code (refused unrun).
    """
    target = Path(path)
    if target.is_dir():
        found = [target / name for name in WEIGHT_NAMES if (target / name).is_file()]
        if not found:
            raise WeightFileError(f"{target}: a folder without {' or '.join(WEIGHT_NAMES)}; pass the weights file itself")
        loaded = _load_with_token_files(found[0])
        if not loaded.embeddings and TOKENS_KEY not in loaded.metadata:  # diffusers' folder: <new1>.bin ...
            companions = {p for name in WEIGHT_NAMES for p in existing_token_files(target / name)}
            others = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES
                            and p.name not in WEIGHT_NAMES and p not in companions)
            for other in others:
                loaded.embeddings.extend(_read_token_file(other))
        return loaded
    return _load_with_token_files(target)


def _load_with_token_files(target: Path) -> CustomDiffusionFile:
    """The weights file ``target`` with the modifier tokens of its ``<stem>-token*`` files."""
    loaded = _read_weights_file(target)
    if not loaded.embeddings:
        if TOKENS_KEY in loaded.metadata:  # sdadapt's file says how many token files it has (stale others stay out)
            count = len(_json_list(loaded.metadata[TOKENS_KEY]))
            beside = [p for p in token_files(target, count) if p.is_file()] if count else []
        else:
            beside = _token_files_beside(target)
        for file in beside:
            loaded.embeddings.extend(_read_token_file(file))
    return loaded


# ------------------------------------------------------------------------------------ writing
def _attn1_placeholders(weights: Mapping[str, Tensor]) -> dict[str, dict]:
    """``{<layer>.attn1.processor: {}}`` for each ``attn2`` layer: the empty entries diffusers' ``.bin`` holds."""
    out: dict[str, dict] = {}
    for key in weights:
        parts = split_file_key(key)
        if parts is not None and parts[0].endswith(".attn2"):
            out[parts[0][: -len("attn2")] + "attn1.processor"] = {}
    return out


def _token_state(embedding: Embedding) -> dict[str, Tensor]:
    vectors = embedding.vectors.get("text_encoder")
    if vectors is None:
        raise WeightFileError(f"modifier token {embedding.name!r}: SDXL (two-encoder) tokens are not supported in Custom Diffusion files")
    return {embedding.name: vectors[0] if vectors.shape[0] == 1 else vectors}


def save_custom_diffusion_file(
    path: str | os.PathLike,
    weights: Mapping[str, Tensor],
    *,
    embeddings: Sequence[Embedding] = (),
    prompts: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Write the weights file ``path`` (``.safetensors`` or ``.bin``) and one diffusers
    textual-inversion file per modifier token beside it (:func:`token_files`).

    The save owns the token files of its name (:func:`existing_token_files`): with ``overwrite``,
    those an earlier save left that this one does not rewrite are removed after the new files are in
    place (a ``.bin`` records no token count, so a stale ``-token2`` would otherwise be read as a
    token of the new file); without it, any of them is refused. Nothing else is touched.

    All or nothing: every file is written as a temporary first and all are renamed into place only
    once each is complete (:func:`~sdadapt.formats.files.staged_outputs`), so a failed write (a full
    disk, Ctrl-C) leaves the earlier save's weights and token files as they were — never new weights
    beside old token files of the same name.

    Args:
        weights: ``{file key: tensor}`` with diffusers keys (:func:`file_key`); written as given (dtype kept).
        embeddings: the modifier tokens (their names are the tokens).
        prompts: training prompts to record (``custom_diffusion_prompts``; the merge reads them).
        metadata: more string metadata (safetensors only; a ``.bin`` holds tensors only, as diffusers writes).

    Returns:
        the paths written, the weights file first.

    Raises:
        WeightFileError: keys that are not Custom Diffusion weights, NaN/inf values, a suffix other
            than ``.safetensors``/``.bin``.
        OutputExistsError / OutputError: see :func:`sdadapt.formats.files.atomic_write` (all outputs
            are checked before anything is written); a token file of an earlier save without
            ``overwrite``; a token file name that holds another save's weights (even with
            ``overwrite``); a stale token file that cannot be removed (names it).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in _SUFFIXES:
        raise WeightFileError(f"{target}: Custom Diffusion weights are written as .safetensors or .bin, not {suffix or 'no suffix'!r}")
    foreign = [k for k in weights if split_file_key(k) is None]
    if foreign or not weights:
        raise WeightFileError(f"{target}: not Custom Diffusion weights ({'e.g. ' + repr(foreign[0]) if foreign else 'empty'}); "
                              "keys must be '<layer>.attn2.processor.to_k_custom_diffusion.weight' etc.")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    check_finite(tensors, source=f"{target} (to be written)")
    companions = token_files(target, len(embeddings)) if embeddings else ()
    states = [_token_state(e) for e in embeddings]
    for state, file in zip(states, companions):
        check_finite(state, source=f"{file} (to be written)")
    for file in companions:
        if file.is_file() and _holds_custom_diffusion_weights(file):  # even with overwrite: not this save's file
            raise OutputExistsError(f"{file}: holds the Custom Diffusion weights of another save, and {target.name}'s "
                                    "modifier-token file would replace them; save under another name, or move that file")
    for file in (target, *companions):
        check_output_file(file, overwrite=overwrite, suffix=None)
    stale = [p for p in existing_token_files(target) if p not in companions]
    if stale and not overwrite:
        raise OutputExistsError(f"{stale[0]}: a modifier-token file of an earlier save named {target.name} (the loader "
                                "would read it as this file's); pass --overwrite (overwrite=True) to remove it, or delete it")
    with staged_outputs() as stage:  # all files renamed into place together, or none (old ones kept)
        if suffix == ".safetensors":
            meta = {"format": "pt", **dict(metadata or {})}
            meta[TOKENS_KEY] = json.dumps([e.name for e in embeddings])
            if prompts:
                meta[PROMPTS_KEY] = json.dumps(list(prompts))
            placeholders = {k: torch.zeros(0) for k in _attn1_placeholders(tensors)}  # len 0: diffusers' "empty processor"
            write_safetensors(target, {**placeholders, **tensors}, meta, overwrite=overwrite, stage=stage)
            for state, file in zip(states, companions):
                write_safetensors(file, state, {"format": "pt"}, overwrite=overwrite, stage=stage)
        else:
            payload: dict[str, object] = {**_attn1_placeholders(tensors), **tensors}
            save_torch_file(target, payload, overwrite=overwrite, stage=stage)
            for state, file in zip(states, companions):
                cpu = {k: v.detach().to("cpu").clone() for k, v in state.items()}
                save_torch_file(file, cpu, overwrite=overwrite, stage=stage)
        written = stage.paths
    for file in stale:  # only once every new file is in place (a failed save above leaves all as they were)
        try:
            file.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"{file}: cannot remove this modifier-token file of an earlier save ({exc.strerror}); "
                              f"{target} is written, delete {file.name} by hand or it may be read as one of its tokens") from None
    return written
