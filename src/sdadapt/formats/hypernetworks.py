"""A1111 / NovelAI hypernetwork files: the ``.pt`` dict A1111 writes, and a ``.safetensors`` twin.

**A1111 ``.pt``** (``modules/hypernetworks/hypernetwork.py``, ``Hypernetwork.save``), a
``torch.save`` dict::

    {768: (k_state_dict, v_state_dict), 320: (...), ...,        # int context width -> MLP states
     "step": int, "name": str, "layer_structure": [1.0, 2.0, 1.0], "activation_func": str,
     "is_layer_norm": bool, "weight_initialization": str, "sd_checkpoint": str | None,
     "sd_checkpoint_name": str | None, "activate_output": bool, "use_dropout": bool,
     "dropout_structure": [float, ...], "last_layer_dropout": bool, "optional_info": str | None}

with MLP state keys ``linear.<Sequential index>.weight/bias``. Very old files use
``linear1.*``/``linear2.*`` (read as ``linear.0.*``/``linear.1.*``, as A1111 does) and lack the
later settings, which read with A1111's load defaults (:data:`LOAD_DEFAULTS`; note
``activate_output`` defaults to **True** on load). A1111 also writes an optimizer side file
``<file>.optim``; it is neither read nor written here.

**Canonical form** (what sdadapt passes around): ``(tensors, settings)`` with tensor keys
``"<width>.<0 = K | 1 = V>.linear.<index>.<weight|bias>"`` — exactly the keys
:func:`sdadapt.formats.files.read_weights` flattens a ``.pt`` to — and ``settings`` the thirteen
A1111 setting keys above (:data:`SETTING_KEYS`), defaults filled in.

**safetensors twin**: the canonical tensors, and each setting JSON-encoded as string metadata
under its A1111 key — so ``read_weights`` returns the same tensors and metadata for a ``.pt`` and
its ``.safetensors``.

Reading goes through :func:`~sdadapt.formats.files.read_weights` for both (a ``.pt`` is flattened
to the twin's form there; :func:`flat_to_canonical` then renames old keys and fills defaults);
:func:`a1111_to_canonical` is the same translation on the dict ``torch.load`` returns.

The translations are bijective on files that carry every setting key (all files A1111 1.x
writes): ``canonical_to_a1111(*a1111_to_canonical(d)) == d`` and the other way round; the tests
check both directions. Keys other than the widths and :data:`SETTING_KEYS` are ignored (A1111
ignores them too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from .files import WeightFileError, check_finite_output, read_weights, write_safetensors
from .torch_files import save_torch_file

__all__ = [
    "SETTING_KEYS",
    "LOAD_DEFAULTS",
    "OLD_KEYS",
    "parse_dropout_structure",
    "a1111_to_canonical",
    "canonical_to_a1111",
    "settings_to_metadata",
    "metadata_to_settings",
    "flat_to_canonical",
    "read_hypernetwork_file",
    "write_hypernetwork_file",
    "is_hypernetwork_key",
]

#: A1111 setting keys, in the order ``Hypernetwork.save`` writes them
SETTING_KEYS = (
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
)

#: what A1111's ``Hypernetwork.load`` assumes for an absent key (``dropout_structure``: derived by
#: :func:`parse_dropout_structure`; ``name``: the file stem)
LOAD_DEFAULTS: dict[str, object] = {
    "step": 0,
    "layer_structure": [1, 2, 1],
    "activation_func": None,
    "is_layer_norm": False,
    "weight_initialization": "Normal",
    "sd_checkpoint": None,
    "sd_checkpoint_name": None,
    "activate_output": True,
    "use_dropout": False,
    "last_layer_dropout": False,
    "optional_info": None,
}

#: A1111's ``fix_old_state_dict`` renames
OLD_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}

_TENSOR_KEY = re.compile(r"^(\d+)\.([01])\.(linear\.\d+\.(?:weight|bias))$")
_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "name": (str, type(None)),
    "layer_structure": (list, tuple),
    "activation_func": (str, type(None)),
    "is_layer_norm": (bool,),
    "weight_initialization": (str, type(None)),
    "sd_checkpoint": (str, type(None)),
    "sd_checkpoint_name": (str, type(None)),
    "activate_output": (bool,),
    "use_dropout": (bool,),
    "dropout_structure": (list, tuple),
    "last_layer_dropout": (bool,),
    "optional_info": (str, type(None)),
}


def is_hypernetwork_key(key: str) -> bool:
    """Whether ``key`` is a canonical hypernetwork tensor key (``768.0.linear.0.weight``)."""
    return _TENSOR_KEY.match(key) is not None


def parse_dropout_structure(layer_structure: list, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's ``parse_dropout_structure``: zeros without dropout, else
    ``[0] + [0.3]·(n-3) + [0.3 if last_layer_dropout else 0] + [0]``."""
    n = len(layer_structure)
    if not use_dropout:
        return [0] * n
    return [0, *([0.3] * (n - 3)), 0.3 if last_layer_dropout else 0, 0]


def _check_settings(settings: Mapping[str, object], source: str) -> None:
    for key, types in _TYPES.items():
        value = settings[key]
        if key == "step" and isinstance(value, bool) or not isinstance(value, types):
            raise WeightFileError(
                f"{source}: hypernetwork setting {key!r} is {value!r} ({type(value).__name__}); expected "
                f"{' or '.join('None' if t is type(None) else t.__name__ for t in types)}. Fix or remove the key."
            )
    for key in ("layer_structure", "dropout_structure"):
        values = settings[key]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):  # type: ignore[union-attr]
            raise WeightFileError(f"{source}: hypernetwork setting {key!r} must be a list of numbers, got {values!r}")


def _fill_settings(raw: Mapping[str, object], source: str) -> dict[str, object]:
    """A1111's load defaults for absent keys (``dropout_structure`` derived as A1111 derives it)."""
    settings: dict[str, object] = {}
    for key in SETTING_KEYS:
        if key in raw:
            settings[key] = raw[key]
        elif key == "name":
            settings[key] = Path(source).stem
        elif key != "dropout_structure":
            default = LOAD_DEFAULTS[key]
            settings[key] = list(default) if isinstance(default, list) else default
    if settings.get("dropout_structure") is None:
        settings["dropout_structure"] = parse_dropout_structure(
            list(settings["layer_structure"]), bool(settings["use_dropout"]), bool(settings["last_layer_dropout"])  # type: ignore[arg-type]
        )
    _check_settings(settings, source)
    for key in ("layer_structure", "dropout_structure"):
        settings[key] = list(settings[key])  # type: ignore[call-overload]
    return settings


def _mlp_state(width: int, index: int, state: object, source: str) -> dict[str, Tensor]:
    if not isinstance(state, Mapping):
        raise WeightFileError(
            f"{source}: entry {width} holds a {type(state).__name__} where A1111 writes a (K, V) pair of "
            "state dicts; not an A1111 hypernetwork file"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = OLD_KEYS.get(key, key)
        if not isinstance(value, Tensor) or not re.fullmatch(r"linear\.\d+\.(weight|bias)", str(key)):
            raise WeightFileError(
                f"{source}: MLP {width}/{'kv'[index]} has an unexpected entry {key!r}; A1111 hypernetwork "
                "states hold only linear.<index>.weight/bias tensors (or the old linear1/linear2)"
            )
        out[f"{width}.{index}.{key}"] = value
    return out


def a1111_to_canonical(obj: object, *, source: str = "<hypernetwork>") -> tuple[dict[str, Tensor], dict[str, object]]:
    """An A1111 hypernetwork dict (as ``torch.load`` returns it) -> ``(tensors, settings)``.

    Args:
        obj: ``{int width: (k_state, v_state), "step": ..., ...}``.
        source: the file name, for messages and the default ``name``.

    Returns:
        canonical tensors ``{"768.0.linear.0.weight": tensor}`` (old ``linear1/2`` keys renamed) and
        the :data:`SETTING_KEYS` settings, A1111's load defaults filled in.

    Raises:
        WeightFileError: not a dict, no integer width keys, a malformed pair, or a setting of the
            wrong type — each naming ``source``.
    """
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{source}: holds a {type(obj).__name__}, not the dict an A1111 hypernetwork file holds")
    widths = [k for k in obj if isinstance(k, int) and not isinstance(k, bool)]
    if not widths:
        found = ", ".join(repr(k) for k in list(obj)[:8])
        raise WeightFileError(
            f"{source}: no integer context-width keys (768, 320, ...), so not an A1111 hypernetwork "
            f"(keys: {found or 'none'}); a LoRA or an embedding loads with sdadapt.load_lora / its own loader"
        )
    tensors: dict[str, Tensor] = {}
    for width in widths:
        pair = obj[width]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise WeightFileError(
                f"{source}: entry {width} must be a (K state dict, V state dict) pair, got {type(pair).__name__}"
                f"{f' of {len(pair)}' if isinstance(pair, (tuple, list)) else ''}"
            )
        for index, state in enumerate(pair):
            tensors.update(_mlp_state(width, index, state, source))
    return tensors, _fill_settings({k: v for k, v in obj.items() if isinstance(k, str)}, source)


def canonical_to_a1111(tensors: Mapping[str, Tensor], settings: Mapping[str, object]) -> dict:
    """``(tensors, settings)`` -> the dict A1111's ``Hypernetwork.save`` writes (int width keys to
    ``(k_state, v_state)`` tuples first, then the :data:`SETTING_KEYS` in A1111's order).

    Raises:
        ValueError: a tensor key that is not canonical, or a missing setting.
    """
    missing = [k for k in SETTING_KEYS if k not in settings]
    if missing:
        raise ValueError(f"hypernetwork settings lack {missing}; build them with sdadapt.hypernetworks (or fill A1111's defaults)")
    pairs: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    for key, value in tensors.items():
        match = _TENSOR_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a canonical hypernetwork key ('<width>.<0|1>.linear.<index>.<weight|bias>')")
        width, index, name = int(match.group(1)), int(match.group(2)), match.group(3)
        pairs.setdefault(width, ({}, {}))[index][name] = value
    out: dict = dict(pairs)
    for key in SETTING_KEYS:
        value = settings[key]
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def settings_to_metadata(settings: Mapping[str, object]) -> dict[str, str]:
    """Settings -> safetensors metadata: each :data:`SETTING_KEYS` value JSON-encoded under its key
    (what :func:`~sdadapt.formats.files.read_weights` reports for the ``.pt``)."""
    return {key: json.dumps(settings[key]) for key in SETTING_KEYS}


def metadata_to_settings(metadata: Mapping[str, str], *, source: str = "<hypernetwork>") -> dict[str, object]:
    """Safetensors metadata -> settings (JSON values; absent keys get A1111's load defaults).

    Raises:
        WeightFileError: a value that is not JSON, or of the wrong type.
    """
    raw: dict[str, object] = {}
    for key in SETTING_KEYS:
        if key in metadata:
            try:
                raw[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise WeightFileError(
                    f"{source}: metadata {key!r} = {metadata[key]!r} is not JSON; sdadapt writes each "
                    "hypernetwork setting JSON-encoded (e.g. layer_structure = \"[1.0, 2.0, 1.0]\")"
                ) from None
    return _fill_settings(raw, source)


def flat_to_canonical(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *,
                      source: str = "<hypernetwork>") -> tuple[dict[str, Tensor], dict[str, object]]:
    """What :func:`~sdadapt.formats.files.read_weights` returns for a hypernetwork file (a ``.pt``
    flattened to ``"768.0.linear.0.weight"`` keys with JSON settings, or the ``.safetensors``
    twin as stored) -> ``(tensors, settings)``: old ``linear1/2`` keys renamed, defaults filled.

    Raises:
        WeightFileError: keys that are not a hypernetwork's, a width without both MLPs, or bad settings.
    """
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in tensors.items():
        width, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        canonical = f"{width}.{index}.{OLD_KEYS.get(name, name)}"
        if is_hypernetwork_key(canonical):
            out[canonical] = value
        else:
            bad.append(key)
    if bad or not out:
        raise WeightFileError(
            f"{source}: not an A1111 hypernetwork (tensors {bad[:3] or 'none'}; a hypernetwork holds "
            "{<context width>: (K state, V state)}, i.e. '<width>.<0|1>.linear.<index>.<weight|bias>'); "
            "a LoRA loads with sdadapt.load_lora, an embedding with its own loader"
        )
    halves: dict[str, set[str]] = {}
    for key in out:
        width, index, _ = key.split(".", 2)
        halves.setdefault(width, set()).add(index)
    lopsided = [w for w, found in halves.items() if found != {"0", "1"}]
    if lopsided:
        raise WeightFileError(
            f"{source}: width {lopsided[0]} has only the {'K' if halves[lopsided[0]] == {'0'} else 'V'} MLP; "
            "A1111 writes a (K state dict, V state dict) pair per width"
        )
    return out, metadata_to_settings(metadata, source=source)


def read_hypernetwork_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Read an A1111 ``.pt`` or its ``.safetensors`` twin -> ``(tensors, settings)``.

    Both go through :func:`~sdadapt.formats.files.read_weights`: a ``.pt`` only ever with
    ``torch.load(weights_only=True)`` after its archive is checked — a pickle that would run code is
    refused unrun — and flattened to the twin's form, so one translation serves both.

    Raises:
        WeightFileError: missing, unsafe, corrupt, or not a hypernetwork (naming the file).
    """
    tensors, metadata = read_weights(path)
    return flat_to_canonical(tensors, metadata, source=str(path))


def write_hypernetwork_file(path: str | os.PathLike, tensors: Mapping[str, Tensor], settings: Mapping[str, object], *,
                            overwrite: bool = True) -> Path:
    """Write ``(tensors, settings)`` atomically: ``.pt`` as A1111's dict (loads with
    ``torch.load(weights_only=True)``: only tensors, dicts, tuples, lists and plain values),
    ``.safetensors`` as the twin. Tensors are written as contiguous CPU copies.

    Args:
        overwrite: replace an existing file (False: :class:`~sdadapt.errors.OutputExistsError`).

    Raises:
        ValueError: another suffix. NonFiniteError: a tensor holds NaN/inf (a diverged training).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".pt", ".safetensors"):
        raise ValueError(f"{target}: write hypernetworks as .pt (A1111 reads these) or .safetensors, not {suffix or 'no suffix'!r}")
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    obj = canonical_to_a1111(cpu, settings)  # validates keys and settings before anything is written
    check_finite_output(cpu, path=target)
    if suffix == ".safetensors":
        return write_safetensors(target, cpu, settings_to_metadata(settings), overwrite=overwrite)
    return save_torch_file(target, obj, overwrite=overwrite)
