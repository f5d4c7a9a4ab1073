"""LoRA Block Weight (LBW) vectors: a strength per UNet block when merging a LoRA.

The convention of hako-mikan's *sd-webui-lora-block-weight* and kohya's ``svd_merge_lora.py``:
one 26-slot layout for every model,

    slot 0 BASE (text encoders) | 1..12 IN00..IN11 | 13 M00 | 14..25 OUT00..OUT11

where a layer's block is its LDM block number (``input_blocks.n`` -> IN{n},
``middle_block`` -> M00, ``output_blocks.n`` -> OUT{n}); SDXL only has IN00..IN08 and
OUT00..OUT08. Accepted vector lengths name a subset of the slots:

| length | model | slots |
|---|---|---|
| 26 | SD1/SD2 | all |
| 17 | SD1/SD2 | BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11 (blocks with attention) |
| 20 | SDXL | BASE, IN00..IN08, M00, OUT00..OUT08 |
| 12 | SDXL | BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05 (blocks with attention) |

Slots a shorter vector does not name keep weight 1 (kohya's rule). A layer's block is
:func:`sdadapt.merge.blocks.unet_block`'s — the map checkpoint block merges use too: ``conv_in``,
``time_embedding``, ``add_embedding`` -> IN00, ``conv_norm_out``/``conv_out`` -> the last OUT block
(OUT11; SDXL OUT08); text encoders and paths outside the UNet's blocks -> BASE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from ..adapters.registry import scale_file_tensors
from ..formats.layers import group_by_layer
from ..merge.blocks import BLOCKS_SD, BLOCKS_SDXL, unet_block

__all__ = ["BLOCK_IDS", "LBW_PRESETS", "LBW_SLOTS", "block_slot", "expand_block_weights", "lbw_layer_weight",
           "lbw_slot_weights", "lora_block_weight_fn", "lora_block_weights", "parse_lbw_presets", "parse_lbw_spec"]

#: the 26 slot names (the SD1/SD2 block list of checkpoint merges)
BLOCK_IDS: tuple[str, ...] = BLOCKS_SD

_SD1_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
_SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
#: vector length -> (model family, slot names it sets)
LBW_SLOTS: dict[int, tuple[str, tuple[str, ...]]] = {
    26: ("sd1", BLOCK_IDS),
    17: ("sd1", _SD1_17),
    20: ("sdxl", BLOCKS_SDXL),
    12: ("sdxl", _SDXL_12),
}


def expand_block_weights(vector: Sequence[float], *, base_model: str | None = None) -> list[float]:
    """A 12/17/20/26-value vector -> 26 slot weights (unnamed slots 1.0).

    Raises:
        ValueError: another length, or an SDXL vector for an SD1/SD2 model (or the reverse).
    """
    values = [float(v) for v in vector]
    if len(values) not in LBW_SLOTS:
        raise ValueError(
            f"a LoRA block-weight vector has 12 or 20 values (SDXL) or 17 or 26 values (SD1/SD2), got {len(values)}"
        )
    family, slots = LBW_SLOTS[len(values)]
    if base_model is not None:
        model_family = "sdxl" if base_model == "sdxl" else "sd1"
        if model_family != family:
            wanted = "12 or 20" if model_family == "sdxl" else "17 or 26"
            raise ValueError(
                f"a {len(values)}-value block-weight vector is for {'SDXL' if family == 'sdxl' else 'SD1/SD2'}, "
                f"but the checkpoint is {base_model}; give {wanted} values"
            )
    weights = [1.0] * len(BLOCK_IDS)
    for name, value in zip(slots, values):
        weights[BLOCK_IDS.index(name)] = value
    return weights


def block_slot(component: str, layer: str, *, base_model: str = "sd1") -> int:
    """The LBW slot (index into :data:`BLOCK_IDS`) of a canonical LoRA layer path.

    Args:
        component: ``"unet"`` or a text encoder (-> BASE).
        layer: diffusers UNet path (``down_blocks.1.attentions.0.proj_in``) or an LDM one.
        base_model: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"`` (SDXL ends at OUT08).
    """
    if component != "unet":
        return 0
    block = unet_block(layer, architecture="sdxl" if base_model == "sdxl" else "sd1")
    return 0 if block is None else BLOCK_IDS.index(block)  # not a UNet block path: BASE, like the text encoders


def lora_block_weight_fn(vector: Sequence[float], base_model: str) -> Callable[[str, str], float]:
    """``(component, layer) -> block weight`` for one LBW vector on a ``base_model`` checkpoint."""
    weights = expand_block_weights(vector, base_model=base_model)
    return lambda component, layer: weights[block_slot(component, layer, base_model=base_model)]


def lora_block_weights(
    component_state: Mapping[str, Mapping[str, Tensor]], weights: Sequence[float] | str, *, base_model: str | None = None
) -> dict[str, dict[str, Tensor]]:
    """Scale each adapter layer's delta by its block's weight (LoRA Block Weight, 12/17/20/26 values).

    Args:
        component_state: a canonical adapter state ``{component: {"<layer>.<tensor>": ...}}`` of any
            family whose delta is linear in one of its tensors (as :func:`sdadapt.formats.load_lora`
            returns); not modified.
        weights: 17/26 values (SD1/SD2) or 12/20 values (SDXL), see the module docs for the slots;
            slots a short vector does not name keep 1. Text encoders take BASE.
        base_model: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; default: from the vector length.

    Returns:
        A new state in which each layer's family-declared linear tensors
        (:attr:`~sdadapt.adapters.base.AdapterModule.linear_keys`: ``lora_up.weight``, ``hada_w1_a``,
        ``lokr_w1``, ``diff``/``diff_b`` ...) are multiplied by the layer's weight, so its delta
        scales exactly by it; other tensors are shared, not copied.

    Raises:
        ValueError: a vector length other than 12/17/20/26, one for another model family, or a
            layer whose merged weight is not linear in any tensor (DoRA): bake such files with
            ``merge-lora --block-weights``, which scales their effective change instead.
    """
    if isinstance(weights, str):
        weights = [float(v) for v in weights.replace(" ", "").split(",") if v]
    values = [float(v) for v in weights]
    if base_model is None:
        base_model = "sdxl" if len(values) in (12, 20) else "sd1"
    slots = expand_block_weights(values, base_model=base_model)
    out: dict[str, dict[str, Tensor]] = {}
    for component, state in component_state.items():
        new: dict[str, Tensor] = {}
        for layer, tensors in group_by_layer(state).items():
            w = slots[block_slot(component, layer, base_model=base_model)]
            scaled = scale_file_tensors(tensors, w, name=f"{component}:{layer}")
            new.update({f"{layer}.{suffix}": tensor for suffix, tensor in scaled.items()})
        out[component] = new
    return out


# ---- the sd-webui-lora-block-weight extension's ``<lora:NAME:M:lbw=...>`` tag -------------------------------------

#: The extension's built-in presets, copied from hako-mikan/sd-webui-lora-block-weight
#: ``scripts/lora_block_weight.py`` ``DEF_WEIGHT_PRESET`` (commit b403cb7, 2025-06): all 17 values
#: (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11); it ships no SDXL preset (its FLUXALL is for
#: Flux, not read here).
LBW_PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}

# the UNet layers outside the extension's 26 blocks (LDM and diffusers roots): its ``ratiodealer`` matches no
# block in their A1111 names (``diffusion_model_time_embed_0``, ``diffusion_model_out_2``, ``..._label_emb_...``)
# and leaves them at ratio 1
_OUTSIDE_BLOCKS = frozenset({"time_embed", "label_emb", "out", "time_embedding", "add_embedding", "conv_norm_out",
                             "conv_out"})
_INHERITED = re.compile(r"X([+-])?([\d.]+)?")  # the extension's re_inherited_weight


def lbw_slot_weights(values: Sequence[float]) -> tuple[float, ...]:
    """A 12/17/20/26-value vector -> the 26 slot weights, the extension's ``to26``: slots the vector does not
    name get **0** (kohya's :func:`expand_block_weights` gives them 1). Any length goes on any model, as there.

    Raises:
        ValueError: another length.
    """
    values = [float(v) for v in values]
    if len(values) not in LBW_SLOTS:
        raise ValueError(f"a LoRA block-weight vector has 12, 17, 20 or 26 values, got {len(values)}")
    slots = [0.0] * len(BLOCK_IDS)
    for name, value in zip(LBW_SLOTS[len(values)][1], values):
        slots[BLOCK_IDS.index(name)] = value
    return tuple(slots)


def parse_lbw_presets(text: str) -> dict[str, str]:
    """Preset lines ``NAME:w,w,...`` (the extension's ``lbwpresets.txt``) -> ``{NAME: "w,w,..."}``.

    As its ``checkloadcond``: a line counts when it has a ``:``, 11/16/19/25 commas (12/17/20/26 values) and no
    ``#``; every other line is a comment. The name is the text before the first ``:``, stripped.
    """
    presets: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line or "#" in line or line.count(",") + 1 not in LBW_SLOTS:
            continue
        name, weights = line.split(":", 1)
        presets[name.strip()] = weights
    return presets


def parse_lbw_spec(spec: str, *, presets: Mapping[str, str] | None = None, x: float = 1.0) -> tuple[float, ...]:
    """An ``lbw=`` value -> the 26 slot weights, as the extension's ``loradealer`` reads it.

    ``spec`` is a preset name (``presets``, default :data:`LBW_PRESETS`) or 12/17/20/26 comma-separated
    values; a value ``X`` / ``X+d`` / ``X-d`` is ``x`` / ``x + d`` / ``x - d`` (``x``: the tag's ``x=``, else 1);
    slots the vector leaves out are 0 (:func:`lbw_slot_weights`).

    Raises:
        ValueError: an unknown name (the known ones listed), a bad length or value, or ``R`` / ``U`` (the
            extension's random weights: not reproducible, write the numbers instead).
    """
    table = LBW_PRESETS if presets is None else presets
    if spec in table:
        text = table[spec]
    elif spec.count(",") + 1 in LBW_SLOTS:
        text = spec
    else:
        raise ValueError(f"lbw={spec}: no preset of that name (known: {', '.join(table) or 'none'}) and not 12, 17, "
                         "20 or 26 comma-separated weights")
    values: list[float] = []
    for item in (v.strip() for v in text.split(",")):
        if item in ("R", "U"):
            raise ValueError(f"lbw={spec}: {item} is the extension's random weight, drawn anew per image and not "
                             "reproducible; write the numbers you want instead")
        if item.startswith("X"):
            match = _INHERITED.fullmatch(item)
            if match is None or (match.group(1) is not None) != (match.group(2) is not None):
                raise ValueError(f"lbw={spec}: {item!r} is not X, X+number or X-number")
            sign, offset = match.groups()
            values.append(x if sign is None else x + float(offset) if sign == "+" else x - float(offset))
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"lbw={spec}: the weight {item!r} is not a number") from None
    return lbw_slot_weights(values)


def lbw_layer_weight(slots: Sequence[float], component: str, layer: str, *, base_model: str = "sd1") -> float:
    """The extension's ratio (``ratiodealer``) for one layer of a LoRA: text encoders take BASE (slot 0), a UNet
    layer its block's slot (:func:`block_slot`, the package's one block map), and the UNet layers outside the
    26 blocks (time / label embeddings, ``out``: diffusers ``conv_norm_out``/``conv_out``) 1 — there the
    extension finds no block in the A1111 layer name and leaves the ratio at 1 (sdadapt's checkpoint map puts
    them in IN00 / the last OUT block)."""
    if component == "unet" and layer.split(".", 1)[0] in _OUTSIDE_BLOCKS:
        return 1.0
    if component == "unet" and unet_block(layer, architecture="sdxl" if base_model == "sdxl" else "sd1") is None:
        return 1.0  # (no block: the extension's unmatched ratio 1)
    return float(slots[block_slot(component, layer, base_model=base_model)])
