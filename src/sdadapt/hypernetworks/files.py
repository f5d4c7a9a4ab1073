"""Load and save :class:`~sdadapt.hypernetworks.Hypernetwork` objects (A1111 ``.pt`` or ``.safetensors``).

The key and settings translation lives in :mod:`sdadapt.formats.hypernetworks`; this module turns
its ``(tensors, settings)`` into modules and back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..formats.files import WeightFileError, check_finite
from ..formats.hypernetworks import read_hypernetwork_file, write_hypernetwork_file
from .mlp import Hypernetwork, HypernetworkConfig

__all__ = ["load_hypernetwork", "save_hypernetwork", "hypernetwork_settings", "hypernetwork_from_state"]


def hypernetwork_settings(hypernetwork: Hypernetwork) -> dict[str, object]:
    """The A1111 settings dict of ``hypernetwork``, as A1111's ``save`` writes them
    (``use_dropout`` = any dropout; ``last_layer_dropout`` = ``dropout_structure[-2] != 0``)."""
    config = hypernetwork.config
    return {
        "step": hypernetwork.step,
        "name": hypernetwork.name,
        "layer_structure": list(config.layer_structure),
        "activation_func": config.activation,
        "is_layer_norm": config.layer_norm,
        "weight_initialization": config.weight_init,
        "sd_checkpoint": hypernetwork.sd_checkpoint,
        "sd_checkpoint_name": hypernetwork.sd_checkpoint_name,
        "activate_output": config.activate_output,
        "use_dropout": config.use_dropout,
        # zeros as int 0, as A1111 writes them ([0] * n, or parse_dropout_structure's [0, 0.3, ..., 0])
        "dropout_structure": [p if p else 0 for p in config.dropout_structure],  # type: ignore[union-attr]
        "last_layer_dropout": config.last_layer_dropout,
        "optional_info": hypernetwork.optional_info,
    }


def hypernetwork_from_state(tensors: dict[str, torch.Tensor], settings: dict[str, object], *, source: str = "<hypernetwork>",
                            dtype: torch.dtype | None = torch.float32,
                            device: torch.device | str = "cpu") -> Hypernetwork:
    """Build the modules the settings describe and load the canonical ``tensors`` into them.

    Raises:
        WeightFileError: settings A1111 would refuse, or tensors whose names/shapes do not fit the
            layer structure (naming ``source``, the width and the tensor).
    """
    try:
        config = HypernetworkConfig(
            layer_structure=tuple(settings["layer_structure"]),  # type: ignore[arg-type]
            activation=settings["activation_func"] or "linear",  # type: ignore[arg-type]
            layer_norm=bool(settings["is_layer_norm"]),
            dropout_structure=tuple(settings["dropout_structure"]),  # type: ignore[arg-type]
            activate_output=bool(settings["activate_output"]),
            weight_init=settings["weight_initialization"] or "Normal",  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise WeightFileError(f"{source}: {exc}") from None
    widths = list(dict.fromkeys(int(key.split(".", 1)[0]) for key in tensors))  # file order
    if dtype is None:  # keep the file's dtype
        dtype = next(iter(tensors.values())).dtype
    try:
        hypernetwork = Hypernetwork(
            widths, config, name=settings["name"], step=settings["step"],  # type: ignore[arg-type]
            sd_checkpoint=settings["sd_checkpoint"], sd_checkpoint_name=settings["sd_checkpoint_name"],  # type: ignore[arg-type]
            optional_info=settings["optional_info"], init=False, dtype=dtype,  # type: ignore[arg-type]
            device=device,
        )
    except ValueError as exc:
        raise WeightFileError(f"{source}: {exc}") from None
    expected = hypernetwork.file_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightFileError(
            f"{source}: the tensors do not fit the file's settings (layer_structure "
            f"{list(config.layer_structure)}, activation {config.activation!r}, layer norm {config.layer_norm}, "
            f"activate_output {config.activate_output}, dropout {list(config.dropout_structure)}): missing "  # type: ignore[arg-type]
            f"{missing[:4]}, unexpected {unexpected[:4]}; the settings were edited or the file is damaged"
        )
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise WeightFileError(
            f"{source}: {key} has shape {got}, the layer structure {list(config.layer_structure)} gives {want} "
            f"for width {key.split('.', 1)[0]} ({len(wrong)} tensor(s) differ)"
        )
    check_finite(tensors, source=source)
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])
    return hypernetwork.eval()


def load_hypernetwork(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                      device: torch.device | str = "cpu") -> Hypernetwork:
    """Read an A1111 / NovelAI hypernetwork (``.pt``) or sdadapt's ``.safetensors`` twin.

    Legacy ``.pt`` files are read with ``torch.load(weights_only=True)``: one that needs code to
    unpickle is refused, nothing in it runs. Old ``linear1``/``linear2`` keys are read, absent
    settings take A1111's load defaults.

    Args:
        dtype: parameter dtype (``None``: the file's). float32 by default, as A1111 runs them.

    Returns:
        a :class:`Hypernetwork` in eval mode; ``name`` defaults to the file stem.

    Raises:
        WeightFileError: missing, unsafe, corrupt or inconsistent file (the message names it).

    Example::

        hn = sdadapt.load_hypernetwork("anime.pt")
        handle = sdadapt.inject_hypernetwork(unet, hn, strength=0.8)
    """
    tensors, settings = read_hypernetwork_file(path)
    return hypernetwork_from_state(tensors, settings, source=str(path), dtype=dtype, device=device)


def save_hypernetwork(path: str | os.PathLike, hypernetwork: Hypernetwork, *, overwrite: bool = True) -> Path:
    """Write ``hypernetwork`` atomically, by suffix: ``.pt`` — the exact dict A1111 writes (A1111 and
    its forks load it; ``torch.load(weights_only=True)`` reads it) — or ``.safetensors`` (tensors
    ``768.0.linear.0.weight``..., each A1111 setting JSON-encoded in the metadata).

    Args:
        overwrite: replace an existing file (False: :class:`~sdadapt.errors.OutputExistsError`).

    Raises:
        ValueError: another suffix. TypeError: not a :class:`Hypernetwork`.
        NonFiniteError: NaN/inf weights (a diverged training); nothing is written.
    """
    if not isinstance(hypernetwork, Hypernetwork):
        raise TypeError(f"save_hypernetwork needs a sdadapt Hypernetwork, got {type(hypernetwork).__name__}")
    return write_hypernetwork_file(path, hypernetwork.file_tensors(), hypernetwork_settings(hypernetwork), overwrite=overwrite)
