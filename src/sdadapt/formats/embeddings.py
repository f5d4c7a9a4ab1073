"""Textual-inversion embedding files: A1111, kohya and diffusers, each one bijective translation.

| format | ``.pt`` / ``.bin`` (``torch.save`` of) | ``.safetensors`` |
|---|---|---|
| ``"a1111"`` | ``{"string_to_token": {"*": 265}, "string_to_param": {"*": (k, dim)}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`` (A1111's ``Embedding.save``) | ``{"emb_params": (k, dim)}``, metadata ``name``/``step``/``sd_checkpoint``/``sd_checkpoint_name`` (A1111 reads any one-tensor file) |
| ``"kohya"`` | ``{"emb_params": (k, dim)}`` | the same + ``ss_*``/``modelspec.*`` metadata (architecture ``…/textual-inversion``) |
| ``"diffusers"`` | ``{name: (k, dim)}`` (``learned_embeds.bin``) | the same, metadata ``{"format": "pt"}`` (``learned_embeds.safetensors``) |
| SDXL, every format | ``{"clip_l": (k, 768), "clip_g": (k, 1280)}`` | the same + the format's metadata |

Reading (:func:`embedding_from_state`) follows A1111's loader: a ``string_to_param`` dict (exactly
one tensor), else ``clip_l`` + ``clip_g`` (SDXL), else any dict holding exactly one tensor (kohya
``emb_params``, diffusers ``{token: tensor}``; a 1-D tensor is one vector). Legacy pickles are read
with ``torch.load(weights_only=True)`` only: a file that would run code is refused unrun.

The trigger word (:attr:`Embedding.name`) is the **file stem**, as A1111 uses it — except for
diffusers' default file names ``learned_embeds.{bin,safetensors}``, whose token is their dict key.
sdadapt writes the name into the file too (``name`` field / diffusers key), so a file named
``<name>.<ext>`` has the same trigger in A1111, kohya-based UIs and diffusers.

Round trips: ``file -> Embedding -> file`` gives the same tensors (dtype and bits), fields and
metadata for every file sdadapt writes (an A1111 ``.pt`` whose ``name`` field equals its stem, as
A1111 writes them); ``Embedding -> file -> Embedding`` gives the same name, vectors, step and
metadata plus the format's own metadata fields. Extra metadata of a ``.pt`` goes under
``"sdadapt_metadata"`` (a str -> str dict A1111 ignores).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..checks import has_nonfinite
from ..embeddings.embedding import ENCODER_KEY, SDXL_KEYS, Embedding
from .files import (
    StagedOutputs,
    WeightFileError,
    _check_is_file,
    _torch_load_error,
    read_safetensors,
    sniff_format,
    write_safetensors,
)
from .kohya import STALE_METADATA, modelspec_date
from .torch_files import save_torch_file

__all__ = [
    "A1111_TOKEN",
    "EMBEDDING_FORMATS",
    "OUTPUT_KEYS",
    "PARAM_KEYS",
    "embedding_from_state",
    "embedding_state",
    "embedding_summary",
    "from_a1111",
    "load_embedding",
    "save_embedding",
    "to_a1111",
    "to_diffusers",
    "to_kohya",
]

EMBEDDING_FORMATS = ("a1111", "kohya", "diffusers")
#: A1111's constant ``string_to_token`` value (the id of ``*`` in CLIP's vocabulary)
A1111_TOKEN = 265
_A1111_FIELDS = ("sd_checkpoint", "sd_checkpoint_name")
#: the key of a one-tensor embedding that is no token: kohya's / A1111's ``emb_params``, OneTrainer's ``emp_params``
#: (its SD1/SD2 ``StableDiffusionEmbeddingSaver``)
PARAM_KEYS = ("emb_params", "emp_params")
#: OneTrainer's output embeddings (vectors that replace the text encoder's outputs; the input ones are zeros)
OUTPUT_KEYS = frozenset({"emp_params_out", "clip_l_out", "clip_g_out"})
_SUFFIXES = {"a1111": (".pt", ".safetensors", ".bin"), "kohya": (".safetensors", ".pt"), "diffusers": (".safetensors", ".bin")}
#: diffusers' training scripts' file stems (``learned_embeds``, ``learned_embeds-steps-500``; the SDXL script's second
#: encoder ``learned_embeds_2`` / ``learned_embeds_2-steps-500``): they name no trigger, the file's key does
_DIFFUSERS_DEFAULT_STEM = re.compile(r"learned_embeds(?P<second>_2)?(?P<steps>-steps-\d+)?")
#: the widths of SDXL's two token tables (CLIP-L, OpenCLIP-G)
_SDXL_WIDTHS = (768, 1280)
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
                  "sdxl": "stable-diffusion-xl-v1-base"}
_SS_VERSIONS = {"sd1": ("sd_v1", "False"), "sd2": ("sd_v2", "True"), "sd2-v": ("sd_v2_v", "True"), "sdxl": ("sdxl_base_v1-0", "False")}


def _single(embedding: Embedding) -> Tensor:
    return embedding.vectors[ENCODER_KEY]


def _sdxl_tensors(embedding: Embedding) -> dict[str, Tensor]:
    return {k: embedding.vectors[k] for k in SDXL_KEYS}


def _carried(embedding: Embedding) -> dict[str, str]:
    """The metadata an embedding's file carries over: its own less :data:`~sdadapt.formats.kohya.STALE_METADATA` —
    the sshs / modelspec hashes of the bytes it was read from (a converted or re-cast file's are others; training
    stamps the written file's own), the writer's version and container keys."""
    return {k: v for k, v in embedding.metadata.items() if k not in STALE_METADATA}


# ------------------------------------------------------------------------------ A1111 .pt dict
def to_a1111(embedding: Embedding) -> dict:
    """The dict A1111's ``Embedding.save`` writes (``torch.save`` it); SDXL: ``{"clip_l", "clip_g"}``."""
    if embedding.is_sdxl:
        return _sdxl_tensors(embedding)
    meta = _carried(embedding)
    out: dict = {
        "string_to_token": {"*": A1111_TOKEN},
        "string_to_param": {"*": _single(embedding)},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": meta.pop("sd_checkpoint", None),
        "sd_checkpoint_name": meta.pop("sd_checkpoint_name", None),
    }
    if meta:
        out["sdadapt_metadata"] = meta
    return out


def from_a1111(data: Mapping, *, name: str, source: str = "<state>") -> Embedding:
    """An A1111 ``.pt`` dict (``string_to_param``) -> :class:`Embedding` named ``name`` (the file stem).

    Raises:
        WeightFileError: ``string_to_param`` does not hold exactly one tensor.
    """
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # (an old file's nn.ParameterDict: its parameters, as A1111)
    tensors = [v for v in params.values()] if isinstance(params, Mapping) else []
    if len(tensors) != 1 or not isinstance(tensors[0], Tensor):
        raise WeightFileError(f"{source}: an A1111 embedding's string_to_param must hold exactly one tensor, it holds {len(tensors)}")
    metadata = {k: str(data[k]) for k in _A1111_FIELDS if data.get(k) is not None}
    extra = data.get("sdadapt_metadata")
    if isinstance(extra, Mapping):
        metadata.update({str(k): str(v) for k, v in extra.items()})
    step = data.get("step")
    return Embedding(name, {ENCODER_KEY: tensors[0].detach()}, step=step if isinstance(step, int) else None,
                     metadata=metadata)


# ------------------------------------------------------------------------------ safetensors-style
def _a1111_safetensors(embedding: Embedding) -> tuple[dict[str, Tensor], dict[str, str]]:
    meta = {"name": embedding.name}
    if embedding.step is not None:
        meta["step"] = str(embedding.step)
    meta.update(_carried(embedding))
    tensors = _sdxl_tensors(embedding) if embedding.is_sdxl else {"emb_params": _single(embedding)}
    return tensors, meta


def _guess_base_model(embedding: Embedding) -> str:
    if embedding.is_sdxl:
        return "sdxl"
    return "sd2" if embedding.dims[ENCODER_KEY] == 1024 else "sd1"


def to_kohya(embedding: Embedding, *, base_model: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """kohya's ``save_weights``: ``{"emb_params": (k, dim)}`` (SDXL ``{"clip_l", "clip_g"}``) and
    ModelSpec 1.0.1 + ``ss_*`` metadata; ``embedding.metadata`` is laid over the generated fields."""
    from .. import __version__

    base = base_model or _guess_base_model(embedding)
    if base not in _ARCHITECTURES:
        raise ValueError(f"base_model must be one of {sorted(_ARCHITECTURES)}, got {base_model!r}")
    if (base == "sdxl") != embedding.is_sdxl:  # (a one-table file labelled SDXL: no SDXL loader can use it)
        raise ValueError(f"embedding {embedding.name!r} has {'clip_l and clip_g' if embedding.is_sdxl else 'one encoder'}'s "
                         f"vectors ({', '.join(f'{k} {d}' for k, d in embedding.dims.items())}): it is "
                         f"{'an SDXL' if embedding.is_sdxl else 'not an SDXL'} embedding, base_model {base!r} does not "
                         "fit (diffusers' SDXL script writes two files, learned_embeds.safetensors and "
                         "learned_embeds_2.safetensors: each is one encoder's vectors)")
    version, v2 = _SS_VERSIONS[base]
    meta = {
        "ss_output_name": embedding.name,
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_num_vectors_per_token": str(embedding.count),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{_ARCHITECTURES[base]}/textual-inversion",
        # (kohya's sai_model_spec writes Stability-AI's implementation for every textual-inversion file, SD1 too)
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": embedding.name,
        "modelspec.resolution": {"sdxl": "1024x1024", "sd2-v": "768x768"}.get(base, "512x512"),
        "modelspec.prediction_type": "v" if base == "sd2-v" else "epsilon",  # (kohya's build_metadata writes it too)
        "modelspec.date": modelspec_date(),  # (kohya's local time, no offset: formats.kohya)
        "modelspec.implementation_version": f"sdadapt/{__version__}",
    }
    if embedding.step is not None:
        meta["step"] = str(embedding.step)
    meta.update(_carried(embedding))
    tensors = _sdxl_tensors(embedding) if embedding.is_sdxl else {"emb_params": _single(embedding)}
    return tensors, meta


def to_diffusers(embedding: Embedding) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers' ``save_progress``: ``{token: (k, dim)}`` with metadata ``{"format": "pt"}`` (SDXL:
    ``clip_l``/``clip_g``); the token is ``metadata["token"]`` when set (a loaded file's own), else the name."""
    meta = {"format": "pt"}
    if embedding.step is not None:
        meta["step"] = str(embedding.step)
    meta.update(_carried(embedding))
    token = meta.pop("token", embedding.name)
    tensors = _sdxl_tensors(embedding) if embedding.is_sdxl else {token: _single(embedding)}
    return tensors, meta


def embedding_state(embedding: Embedding, *, format: str = "a1111", suffix: str = ".pt",
                    base_model: str | None = None) -> tuple[dict, dict[str, str]]:
    """``(object to save, safetensors metadata)`` for ``format`` and file ``suffix``.

    For ``.pt``/``.bin`` the object is the dict ``torch.save`` writes (metadata: ``{}``; kohya and
    diffusers pickles carry only tensors, as those tools write them).

    Raises:
        ValueError: unknown format, or a suffix the format does not use.
    """
    if format not in EMBEDDING_FORMATS:
        raise ValueError(f"unknown embedding format {format!r}; choose one of {list(EMBEDDING_FORMATS)}")
    suffix = suffix.lower()
    if suffix not in _SUFFIXES[format]:
        raise ValueError(f"{format} embeddings are written as {' or '.join(_SUFFIXES[format])} files, not {suffix or 'no suffix'!r}")
    if format == "a1111":
        return (to_a1111(embedding), {}) if suffix != ".safetensors" else _a1111_safetensors(embedding)
    tensors, meta = to_kohya(embedding, base_model=base_model) if format == "kohya" else to_diffusers(embedding)
    return (tensors, meta) if suffix == ".safetensors" else (dict(tensors), {})


# ------------------------------------------------------------------------------ reading
def _stem_name(file: Path) -> str:
    return file.stem


def embedding_from_state(obj: object, *, name: str, metadata: Mapping[str, str] | None = None,
                         source: str = "<state>") -> Embedding:
    """A loaded file's object (``torch.load`` result or safetensors dict) -> :class:`Embedding`.

    ``name`` is the trigger (the file stem); ``metadata`` the safetensors metadata. When ``name``
    is diffusers' default stem ``learned_embeds``, the file's token (its dict key) is the name; a
    diffusers token that differs from ``name`` is kept as ``metadata["token"]`` (and written back
    as the key by :func:`to_diffusers`).

    Raises:
        WeightFileError: not an embedding (says what the file holds), or vectors no embedding has (integer or bool,
            no rows, encoders of different counts ...), naming ``source``.
    """
    try:
        return _embedding_from_state(obj, name=name, metadata=metadata, source=source)
    except WeightFileError:
        raise
    except ValueError as exc:  # (Embedding's own checks: say which file)
        raise WeightFileError(f"{source}: {exc}; the file is damaged or was made for another program") from None


def _embedding_from_state(obj: object, *, name: str, metadata: Mapping[str, str] | None, source: str) -> Embedding:
    meta = dict(metadata or {})
    aesthetic = "; a bare (1, D) tensor, or a file of one 'aesthetic_embedding', is an aesthetic embedding: use it " \
                "with `generate --aesthetic FILE`"
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{source}: not a textual-inversion embedding (the file holds a {type(obj).__name__}, not a dict); "
            "expected A1111 string_to_param, kohya emb_params, diffusers {token: tensor} or SDXL clip_l/clip_g"
            + (aesthetic if isinstance(obj, Tensor) else "")
        )
    if set(obj) == {"aesthetic_embedding"}:  # (sdadapt's aesthetic .safetensors: not a token's vectors)
        raise WeightFileError(f"{source}: not a textual-inversion embedding{aesthetic}")
    if "string_to_param" in obj:
        return from_a1111(obj, name=name, source=source)
    bundled = _bundled_alone(obj, source=source)
    if bundled is not None:  # (a file of one bundled embedding: ComfyUI and SD.Next load it as an embedding)
        return embedding_from_state(bundled, name=name, metadata=metadata, source=source)
    outputs = sorted(k for k in obj if isinstance(k, str) and k in OUTPUT_KEYS)
    if outputs:
        raise WeightFileError(
            f"{source}: a OneTrainer output embedding ({', '.join(outputs)}): its vectors replace the text encoder's "
            "*outputs* for the token (its input vectors are zeros), which no input embedding can represent — A1111, "
            "ComfyUI and diffusers cannot use it either; train it in OneTrainer without 'output embedding' for a file "
            "that loads everywhere")
    step = meta.pop("step", None)
    step_value = int(step) if step is not None and step.lstrip("-").isdigit() else None
    if step is not None and step_value is None:
        meta["step"] = step  # not an int: keep it as plain metadata
    if all(k in obj for k in SDXL_KEYS):
        tensors = {k: obj[k] for k in SDXL_KEYS}
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise WeightFileError(f"{source}: SDXL embedding entries {bad} are not tensors")
        meta.pop("name", None)
        return Embedding(name, tensors, step=step_value, metadata=meta)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(tensors) != 1:
        raise WeightFileError(
            f"{source}: not a textual-inversion embedding{_use_instead(list(tensors), meta)}: it holds {len(tensors)} "
            f"tensors ({sorted(tensors)[:5]}); "
            "an embedding file holds string_to_param (A1111), one tensor (kohya emb_params, diffusers {token: tensor}) "
            "or clip_l + clip_g (SDXL). Run `python -m sdadapt inspect FILE` to see what it is."
        )
    (key, value), = tensors.items()
    if _DIFFUSERS_DEFAULT_STEM.fullmatch(name) and key not in PARAM_KEYS:
        name = key  # diffusers' default file name says nothing; its token is the key
    if key not in PARAM_KEYS and key != name:
        meta["token"] = key  # a diffusers token that differs from the trigger
    meta.pop("name", None)
    if value.ndim not in (1, 2):
        raise WeightFileError(f"{source}: the embedding tensor {key!r} has shape {tuple(value.shape)}; expected (vectors, dim) or (dim,)")
    return Embedding(name, {ENCODER_KEY: value}, step=step_value, metadata=meta)


def _load_pickle(file: Path) -> object:
    """A ``.pt`` embedding read with ``torch.load(weights_only=True)``, which here also rebuilds
    ``torch.nn.ParameterDict`` (old embeddings' ``string_to_param``, as the original textual-inversion code saved
    it; A1111 reads them): a container of parameters whose state is only what weights-only unpickling allows."""
    try:
        with warnings.catch_warnings(), open(file, "rb") as handle, \
                torch.serialization.safe_globals([torch.nn.ParameterDict]):
            warnings.simplefilter("ignore")
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError / RuntimeError / EOFError variants
        raise _torch_load_error(file, exc) from exc


def _bundled_alone(obj: Mapping, *, source: str) -> dict | None:
    """The embedding dict of a file holding only ``bundle_emb.<name>.*`` keys of one name (``None`` for other files);
    several names are refused, naming :func:`~sdadapt.formats.bundled_embeddings.bundled_embeddings`."""
    from .bundled_embeddings import BUNDLE_PREFIX, bundle_groups

    if not obj or not all(isinstance(k, str) and k.startswith(BUNDLE_PREFIX) for k in obj):
        return None
    groups = bundle_groups(obj)
    if len(groups) != 1:
        raise WeightFileError(f"{source}: {len(groups)} bundled embeddings ({', '.join(list(groups)[:5])}), not one: "
                              "read them with sdadapt.formats.bundled_embeddings(FILE)")
    return next(iter(groups.values()))


def _use_instead(keys: list[str], metadata: Mapping[str, str]) -> str:
    """What a file of these tensors is and the option that takes it (``""`` when the keys do not tell)."""
    from .detect import ADAPTER_KINDS, detect_kind

    kind = detect_kind([k for k in keys if isinstance(k, str)], metadata)
    if kind in ADAPTER_KINDS:
        return f" (it is a {kind} file: use it with --lora FILE:SCALE)"
    return {"checkpoint": " (it is a model: use it as --model)",
            "hypernetwork": " (it is an A1111 hypernetwork: use it with --hypernetwork FILE:STRENGTH)"}.get(kind, "")


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read a textual-inversion embedding, whichever tool wrote it.

    Reads A1111 ``.pt`` (``string_to_param``), A1111/kohya ``.safetensors``/``.pt``
    (``emb_params``), diffusers ``learned_embeds.safetensors``/``.bin`` (``{token: tensor}``; 1-D
    tensors as one vector) and SDXL ``{clip_l, clip_g}`` files, in any float dtype (kept).
    Pickles go through ``torch.load(weights_only=True)`` only. diffusers' SDXL script's two files
    (``learned_embeds[-steps-N].safetensors`` with CLIP-L's rows, ``learned_embeds_2[-steps-N].safetensors``
    with OpenCLIP-G's, the same token and count) are read together as one SDXL embedding, whichever is named.

    Returns:
        an :class:`~sdadapt.Embedding` named by the file stem (the word A1111 prompts use;
        for ``learned_embeds.*`` the file's token).

    Raises:
        WeightFileError: missing/corrupt file, a pickle that tries to run code (refused, never
            run), or a file that is not an embedding.

    Example::

        emb = sdadapt.load_embedding("embeddings/my-style.pt")
        emb.name, emb.count, emb.dims          # ('my-style', 4, {'text_encoder': 768})
    """
    file = Path(path)
    embedding = _load_one(file)
    partner = _sdxl_partner(file)
    return embedding if partner is None else _sdxl_pair(file, embedding, partner)


def _load_one(file: Path) -> Embedding:
    _check_is_file(file)
    if sniff_format(file) == "pickle":
        obj, metadata = _load_pickle(file), {}
    else:
        obj, metadata = read_safetensors(file)
    embedding = embedding_from_state(obj, name=_stem_name(file), metadata=metadata, source=str(file))
    bad = [k for k, v in embedding.vectors.items() if has_nonfinite(v)]  # (float8 too: isfinite has no kernel)
    if bad:
        raise WeightFileError(f"{file}: the {', '.join(bad)} vectors contain NaN or inf; the training that made it diverged")
    return embedding


def _sdxl_partner(file: Path) -> Path | None:
    """The other file of a diffusers ``textual_inversion_sdxl.py`` pair beside ``file`` (``learned_embeds[-steps-N]``
    <-> ``learned_embeds_2[-steps-N]``, the same suffix), or ``None``."""
    match = _DIFFUSERS_DEFAULT_STEM.fullmatch(file.stem)
    if match is None:
        return None
    other = file.with_name(f"learned_embeds{'' if match['second'] else '_2'}{match['steps'] or ''}{file.suffix}")
    return other if other.is_file() else None


def _sdxl_pair(file: Path, embedding: Embedding, partner: Path) -> Embedding:
    """diffusers' ``textual_inversion_sdxl.py`` writes one SDXL embedding as two files, ``learned_embeds.safetensors``
    (CLIP-L's rows, ``(k, 768)``) and ``learned_embeds_2.safetensors`` (OpenCLIP-G's, ``(k, 1280)``), each
    ``{token: rows}``: read together they are the ``clip_l`` + ``clip_g`` embedding A1111, kohya and ComfyUI use. Files
    that do not make such a pair (another token or vector count, other widths) are each their own embedding."""
    if embedding.is_sdxl:
        return embedding
    other = _load_one(partner)
    first, second = (other, embedding) if _DIFFUSERS_DEFAULT_STEM.fullmatch(file.stem)["second"] else (embedding, other)
    if other.is_sdxl or (first.dims[ENCODER_KEY], second.dims[ENCODER_KEY]) != _SDXL_WIDTHS or \
            first.name != second.name or first.count != second.count:
        return embedding
    return Embedding(first.name, {SDXL_KEYS[0]: first.vectors[ENCODER_KEY], SDXL_KEYS[1]: second.vectors[ENCODER_KEY]},
                     step=first.step, metadata=first.metadata)


def save_embedding(path: str | os.PathLike, embedding: Embedding, *, format: str = "a1111",
                   base_model: str | None = None, stage: StagedOutputs | None = None) -> Path:
    """Write ``embedding`` atomically as ``format`` (``"a1111"``, ``"kohya"`` or ``"diffusers"``).

    The suffix picks the container: A1111 ``.pt`` (the full dict A1111 writes) or ``.safetensors``;
    kohya ``.safetensors`` (with ``ss_``/ModelSpec metadata; ``base_model`` ``"sd1"``/``"sd2"``/``"sdxl"``,
    default from the widths) or ``.pt``; diffusers ``.safetensors`` or ``.bin``. Tensors are
    written as they are (dtype kept; cast with ``embedding.to(torch.float16)`` first to halve the size).
    A1111 prompts use the file stem: name the file ``<embedding.name>.<ext>``. With ``stage`` (a
    :func:`~sdadapt.formats.files.staged_outputs` block) the file appears with the block's other outputs.

    Raises:
        ValueError: unknown format, or a suffix that format does not use.
        WeightFileError: NaN/inf vectors, or a missing output folder.
    """
    target = Path(path)
    obj, metadata = embedding_state(embedding, format=format, suffix=target.suffix, base_model=base_model)
    bad = [k for k, v in embedding.vectors.items() if has_nonfinite(v)]  # (float8 too: isfinite has no kernel)
    if bad:
        raise WeightFileError(f"{target}: embedding {embedding.name!r} has NaN or inf in its {', '.join(bad)} vectors; not written")
    if target.suffix.lower() == ".safetensors":
        return write_safetensors(target, obj, metadata, stage=stage)
    cpu = _to_cpu(obj)
    return save_torch_file(target, cpu, stage=stage)


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu").contiguous().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------ inspect
def embedding_summary(file: Path, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> dict:
    """``inspect`` fields of an embedding file from its key shapes and metadata (no tensor data read):
    ``name``, ``vectors``, ``dims``, ``encoders``, ``written_by``."""
    keys = set(shapes)
    if any(k.startswith("string_to_param") for k in keys):
        blocks = {ENCODER_KEY: next(shapes[k] for k in keys if k.startswith("string_to_param"))}
        writer = "A1111 (.pt string_to_param)"
    elif set(SDXL_KEYS) <= keys:
        blocks = {k: shapes[k] for k in SDXL_KEYS}
        writer = "kohya / A1111 SDXL (clip_l + clip_g)"
    elif len(keys) == 1:
        (key,) = keys
        blocks = {ENCODER_KEY: shapes[key]}
        if key in PARAM_KEYS:
            writer = "kohya / A1111 (emb_params)" if key == "emb_params" else "OneTrainer (emp_params)"
        else:
            writer = f"diffusers ({{token: tensor}}, token {key!r})"
    else:
        return {}
    if any(len(shape) not in (1, 2) for shape in blocks.values()):
        return {}  # one tensor, but not (k, dim) / (dim,): not an embedding after all
    if str(metadata.get("modelspec.implementation_version", "")).startswith("sdadapt"):
        writer += ", sdadapt"
    elif metadata.get("format") == "pt":
        writer += ", diffusers training script" if "diffusers" in writer else ""
    name = file.stem
    if _DIFFUSERS_DEFAULT_STEM.fullmatch(name) and len(keys) == 1 and not keys & set(PARAM_KEYS):
        name = next(iter(keys))
    partner = _sdxl_partner(file)
    if partner is not None and len(blocks) == 1:
        writer += f"; one half of an SDXL pair with {partner.name} (read together as one SDXL embedding)"
    counts = {shape[0] if len(shape) == 2 else 1 for shape in blocks.values()}
    return {
        "name": name,
        "vectors": counts.pop() if len(counts) == 1 else sorted(counts),
        "dims": {k: int(shape[-1]) for k, shape in blocks.items()},
        "encoders": list(blocks),
        "written_by": writer,
        "step": json.loads(metadata["step"]) if str(metadata.get("step", "")).lstrip("-").isdigit() else None,
    }
