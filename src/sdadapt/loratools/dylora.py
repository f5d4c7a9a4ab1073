"""Cut a DyLoRA file to a lower rank, as kohya's ``networks/extract_lora_from_dylora.py``.

A DyLoRA file (:mod:`sdadapt.adapters.dylora`, kohya's ``networks.dylora``) is a plain LoRA file
of rank R whose leading rows form a usable LoRA at every multiple of the training ``unit``. The
cut keeps ``lora_down.weight[:r]`` and ``lora_up.weight[:, :r]`` of every layer and every other
tensor (``alpha`` included) unchanged — kohya's ``split_lora_model``, which leaves ``alpha`` as
it is (its comment: scaling it made results worse), so the cut file's scale is ``alpha / r``.
Metadata: ``ss_network_dim = r`` and ``ss_training_comment = "split from DyLoRA, rank R to r; <old
comment>"`` as kohya writes them; the rest is kept.

A LyCORIS DyLoRA file (``algo=dylora``, unit ``block_size`` b) was trained at another scale: its
``get_weight(rank)`` (LyCORIS@f49d30d ``lycoris/modules/dylora.py:97-106``) takes ``ceil(rank / b) + 1``
blocks and scales them by ``alpha / blocks`` — so the rank ``r = k·b`` network it trained (``k`` blocks,
``get_random_rank_weight``'s ``get_weight((k - 1)·b)``, ``dylora.py:108-110``) is
``up[:, :r] @ down[:r] · alpha / k``, not ``· alpha / r``. Its cut writes ``alpha · b`` so that a LoRA
loader's ``alpha' / r`` is that ``alpha / k`` (:func:`lycoris_dylora_alpha`); ``ss_network_alpha`` with it.

:func:`a1111_dyn_state` is A1111's ``<lora:NAME:M:dyn=r>`` instead: the same leading rows, but the
scale stays the full file's ``alpha / R`` (A1111's ``NetworkModuleLora.dim`` is the file's rank).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["a1111_dyn_state", "dylora_cut", "dylora_cut_state", "dylora_max_rank", "lycoris_dylora_alpha"]


def dylora_max_rank(state: Mapping[str, Tensor]) -> int:
    """The largest ``lora_down`` rank in ``state`` (kohya's ``max_rank``); 0 when there is none."""
    return max((int(v.shape[0]) for k, v in state.items() if "lora_down" in k), default=0)


def a1111_dyn_state(state: Mapping[str, Tensor], dyn: int) -> dict[str, Tensor]:
    """A1111's ``dyn`` (``<lora:NAME:M:dyn=N>``) on one component's canonical LoRA state.

    Each layer with ``lora_down.weight`` (R, in, *k) and ``lora_up.weight`` (out, R, *1) and no
    ``lora_mid.weight`` keeps ``down[:N]`` and ``up[:, :N]`` with its scale unchanged: ``alpha`` becomes
    ``alpha · N / R`` so ``alpha' / N == alpha / R`` (a layer without ``alpha`` keeps scale 1, as
    A1111's). A1111 (``extensions-builtin/Lora``: ``lyco_helpers.rebuild_conventional`` slices
    ``up[:, :dyn_dim]`` / ``down[:dyn_dim]``, ``network.calc_scale`` divides by the file's rank) leaves
    every other layer whole: Tucker (``lora_mid``), LoHa, LoKr, (IA)³, full, norm, OFT. ``N >= R``: the
    layer as it is. A DoRA layer's ``dora_scale`` is kept (A1111 normalises the cut ΔW).

    Raises:
        InputError: ``dyn`` not a positive int.
    """
    from ..formats.layers import group_by_layer

    if not isinstance(dyn, int) or isinstance(dyn, bool) or dyn < 1:
        raise InputError(f"dyn={dyn!r}: give the number of leading LoRA ranks to keep, a positive int")
    out: dict[str, Tensor] = {}
    for layer, tensors in group_by_layer(state).items():
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is not None and up is not None and "lora_mid.weight" not in tensors and dyn < down.shape[0]:
            rank = int(down.shape[0])
            tensors = dict(tensors)
            tensors["lora_down.weight"] = down[:dyn].contiguous()
            tensors["lora_up.weight"] = up[:, :dyn].contiguous()
            if "alpha" in tensors:
                # (float64: an fp16 file's alpha · N / R would round; A1111 divides the file's alpha by R)
                tensors["alpha"] = tensors["alpha"].double() * dyn / rank
        out.update({f"{layer}.{key}": value for key, value in tensors.items()})
    return out


def dylora_cut_state(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """``state`` cut to ``rank``: ``lora_down[:rank]``, ``lora_up[:, :rank]`` (contiguous), other tensors as given.

    Args:
        state: ``{key: tensor}`` of a kohya LoRA file (``*.lora_down.weight`` (R, in, *k),
            ``*.lora_up.weight`` (out, R, *1), ``*.alpha``).
        rank: the new rank, ``1 <= rank <= R``.

    Raises:
        InputError: ``rank`` outside ``1 … R``, or no ``lora_down`` tensor (not a LoRA file).
    """
    max_rank = dylora_max_rank(state)
    if max_rank == 0:
        raise InputError("not a LoRA/DyLoRA file: it has no lora_down tensor to cut")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise InputError(f"--rank {rank!r}: cut to a rank from 1 to the file's {max_rank}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if "lora_down" in key:
            out[key] = value[:rank].contiguous()
        elif "lora_up" in key:
            out[key] = value[:, :rank].contiguous()
        else:
            out[key] = value
    return out


def lycoris_dylora_alpha(state: Mapping[str, Tensor], block_size: int) -> dict[str, Tensor]:
    """A LyCORIS DyLoRA state (cut or whole) with every ``alpha`` times ``block_size``: the scale LyCORIS
    trained its rank ``r = k·block_size`` network at, ``alpha / k``, as a LoRA file's ``alpha' / r``.

    LyCORIS@f49d30d ``lycoris/modules/dylora.py:97-106``: ``get_weight`` returns the leading blocks
    and ``self.alpha / (blocks)``. ``alpha'`` is computed in float64 and stored in the file's alpha dtype
    (exact for a power-of-two block size, LyCORIS' default 4; otherwise rounded once to that dtype).

    Raises:
        InputError: ``block_size`` not a positive int.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise InputError(f"block_size={block_size!r}: LyCORIS' DyLoRA block size is a positive int")
    return {key: (value.double() * block_size).to(value.dtype) if key.endswith("alpha") and value.is_floating_point()
            else value for key, value in state.items()}


def dylora_cut(path: str | os.PathLike, out: str | os.PathLike, *, rank: int, unit: int | None = None,
               dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``path`` (a DyLoRA file) cut to ``rank`` at ``out``.

    ``unit``: when given (or read from the file's metadata by :func:`sdadapt.formats.detect.dylora_network`:
    kohya's ``unit``, LyCORIS' ``block_size``), ``rank`` must be a multiple of it — the ranks DyLoRA trained;
    kohya's tool writes every multiple of ``--unit`` below R. A LyCORIS file's ``alpha`` becomes
    ``alpha · block_size`` (LyCORIS' own scale at that rank: the module docstring). ``dtype``: the
    floating tensors are written in it (``None``: each tensor's own dtype).

    Raises:
        InputError: a rank out of range or not a multiple of the unit; a LyCORIS file with no readable
            block size and no ``unit``.
    """
    from ..formats.detect import dylora_network
    from ..formats.files import check_output_file, read_weights, write_safetensors
    from ..formats.kohya import _network_args, kohya_hashes
    from ..formats.lora_tensors import check_lora_tensors
    from .output import check_not_input

    check_not_input(out, path)
    target = check_output_file(out, overwrite=overwrite)
    state, metadata = read_weights(path)
    check_lora_tensors({"": state}, source=path)
    metadata = dict(metadata or {})
    network = dylora_network(metadata)
    if unit is None and network is not None:
        unit = network.unit
    lycoris = network is not None and network.trainer.startswith("LyCORIS")
    if lycoris and unit is None:
        raise InputError(f"{path}: a LyCORIS DyLoRA file whose block_size the metadata does not give as a positive int; "
                         "pass --unit with the block size it was trained with (LyCORIS' default is 4)")
    if unit is not None and (unit < 1 or rank % unit):
        raise InputError(f"--rank {rank} is not a multiple of the DyLoRA unit {unit}: only those ranks were trained "
                         f"(e.g. --rank {max(unit, rank - rank % unit)})")
    cut = dylora_cut_state(state, rank)
    if lycoris:  # (LyCORIS' scale alpha / blocks: the module docstring; its block size, whatever --unit says)
        block_size = network.unit if network is not None and network.unit is not None else unit
        cut = lycoris_dylora_alpha(cut, block_size)  # type: ignore[arg-type]
        try:
            metadata["ss_network_alpha"] = str(float(metadata["ss_network_alpha"]) * block_size)
        except (KeyError, ValueError):
            pass  # (absent or not a number: left as it is)
        # the cut is a LyCORIS LoRA (LoCon) at the scale LyCORIS trained, alpha already times block_size: its metadata
        # must no longer say algo=dylora, or inspect would advise strength block_size and a second cut would multiply
        # alpha again
        args = {k: v for k, v in (_network_args(metadata) or {}).items() if k != "block_size"}
        metadata["ss_network_args"] = json.dumps({**args, "algo": "lora"})
    if dtype is not None:
        cut = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cut.items()}
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"split from DyLoRA, rank {dylora_max_rank(state)} to {rank}; {comment}"
    metadata["ss_network_dim"] = str(rank)
    # the cut file's own sshs hashes (extract_lora_from_dylora.py:93-95 computes them, though into the input's dict)
    metadata.update(kohya_hashes(cut, metadata))
    return write_safetensors(target, cut, metadata, overwrite=overwrite)
