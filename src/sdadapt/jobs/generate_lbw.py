"""``generate``'s LoRA Block Weight: a ``<lora:NAME:M:lbw=...>`` tag's layers grouped by their multiplier, so each
group merges with one :func:`sdadapt.apply_lora` call (the same delta path and exact undo as ``--lora``).

The weight of a layer is hako-mikan's *sd-webui-lora-block-weight* extension's (``scripts/lora_block_weight.py``:
``lbw`` multiplies each module's up factor by ``ratiodealer``'s ratio, the module keeps the tag's te/unet
multiplier): text encoders ``TE · BASE``, a UNet layer ``UNET · w[block]``
(:func:`sdadapt.loratools.block_weights.lbw_layer_weight`). Scaling the up factor by ``w`` scales a LoRA / LoCon /
LoHa / LoKr / full delta by ``w``, which is what merging at ``M · w`` does; DoRA's normalised weight is not linear
in it (A1111 scales the up factor before DoRA's normalisation), so a DoRA layer with a weight other than 1
is refused. A full or norm layer's bias delta (``diff_b``, ``b_norm``) is not scaled by the block weight, only by the
multiplier (the extension's ``LORAANDSOON`` scales ``weight`` / ``w_norm`` alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..errors import InputError

__all__ = ["lbw_groups"]

#: bias deltas the extension leaves at the tag's multiplier (``LORAANDSOON``: ``NetworkModuleFull`` -> ``"weight"``,
#: ``NetworkModuleNorm`` -> ``"w_norm"``: only the weight is multiplied by the block ratio)
_UNWEIGHTED_BIAS = frozenset({"diff_b", "b_norm"})


def lbw_groups(state: Mapping[str, Tensor], component: str, multiplier: float,
               block_weights: Sequence[float] | None, *, sdxl: bool, tag: str = "<lora>",
               ) -> list[tuple[float, dict[str, Tensor]]]:
    """``[(scale, layers' tensors)]``: ``state`` (one component's canonical LoRA state) split by each layer's
    ``multiplier · block weight``; without ``block_weights`` the whole state at ``multiplier``. Layers whose
    weight is 0 are left out (merging them would add nothing: ``W + 0 · ΔW == W``; the extension's zeroed up factor
adds nothing either).

    Args:
        state: ``{"<layer>.<tensor>": ...}`` of one component (``"unet"``, ``"text_encoder"``, ...).
        component: the component (text encoders take BASE, slot 0).
        multiplier: the tag's text-encoder or UNet multiplier.
        block_weights: 26 slot weights (BASE, IN00..IN11, M00, OUT00..OUT11) or ``None``.
        sdxl: an SDXL UNet (its block numbering).
        tag: the prompt tag, for errors.

    Raises:
        InputError: a DoRA layer with a block weight other than 1 (A1111's result is not linear in the weight).
    """
    if block_weights is None:
        return [(multiplier, dict(state))]
    from ..adapters.registry import family_of_keys, scale_file_tensors
    from ..formats.layers import group_by_layer
    from ..loratools.block_weights import lbw_layer_weight

    groups: dict[float, dict[str, Tensor]] = {}
    for layer, tensors in group_by_layer(state).items():
        weight = lbw_layer_weight(block_weights, component, layer, base_model="sdxl" if sdxl else "sd1")
        if weight != 1.0 and family_of_keys(tensors, name=f"{component}:{layer}").name == "dora":
            raise InputError(f"prompt tag {tag}: {component}:{layer} is a DoRA layer; the extension scales its up "
                             f"factor by the block weight {weight:g} before DoRA's normalisation, which is not done "
                             "here; give its blocks weight 1, or bake the file with merge-lora --block-weights")
        if weight != 1.0 and any(key in _UNWEIGHTED_BIAS for key in tensors):
            # the extension scales only the weight's delta (a LoRA's up factor, a full layer's diff, a norm's w_norm):
            # the bias delta keeps the tag's multiplier (at block weight 0 too), so the layer merges at the
            # multiplier with its weight delta scaled — through the family's linear tensor, once (not every factor)
            rest = {k: v for k, v in tensors.items() if k not in _UNWEIGHTED_BIAS}
            scaled = scale_file_tensors(rest, weight, name=f"{component}:{layer}") if rest else {}
            groups.setdefault(multiplier, {}).update({f"{layer}.{k}": v for k, v in {**tensors, **scaled}.items()})
            continue
        if weight == 0.0:
            continue
        groups.setdefault(multiplier * weight, {}).update({f"{layer}.{k}": v for k, v in tensors.items()})
    return list(groups.items())
