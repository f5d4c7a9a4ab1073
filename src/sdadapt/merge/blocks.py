"""Block weights: one merge strength per UNet block (MBW), on LDM or diffusers keys.

Block lists (supermerger's, BASE first):

* SD1 / SD2 — 26 values: ``BASE, IN00..IN11, M00, OUT00..OUT11``
* SDXL — 20 values: ``BASE, IN00..IN08, M00, OUT00..OUT08``

Also accepted: 25 (SD1/SD2) or 19 (SDXL) values without BASE (bbc-mc's layout; BASE then comes
from ``base_alpha``), a 26-value SD1 vector on an SDXL model, reduced the way supermerger does
(IN00..IN08, M00, OUT00..OUT08 kept; IN09..IN11 and OUT09..OUT11 dropped), and on SDXL supermerger's
110 values, one per layer (:mod:`sdadapt.merge.sdxl_layers`). supermerger's 61 values are its Flux
list (CLIP, T5, IN, D00..D18, S00..S37, OUT) and are refused: sdadapt merges SD1/SD2/SDXL.

Which block a key belongs to (policy, the majority of the tools):

=====================================  =====================================================
``model.diffusion_model.input_blocks.N``  ``IN{N}``  (diffusers ``conv_in``, ``down_blocks.*``)
``model.diffusion_model.middle_block``     ``M00``  (``mid_block``)
``model.diffusion_model.output_blocks.N`` ``OUT{N}`` (``up_blocks.*``)
``time_embed`` / ``label_emb``             ``IN00`` (bbc-mc, sd-meh, supermerger; sd-mecha uses BASE)
``out.0`` / ``out.2``                      the last OUT block: ``OUT11`` (SDXL ``OUT08``)
text encoders, VAE, everything else        ``BASE``
EMA copies (``model_ema.*``), unknown UNet keys  ``BASE``, and listed as unmatched in the report
=====================================  =====================================================

Diffusers keys (``unet.down_blocks.0...``) are mapped to their LDM module path with the shared UNet
name map (:mod:`sdadapt.formats.unet_names`) and get the same block. :func:`unet_block` is the one
layer -> block map: checkpoint block weights (:func:`ldm_block`, :func:`diffusers_block`) and LoRA
block weights (:func:`sdadapt.loratools.block_weights.block_slot`) both call it.

LoRA block-weight vectors (12/17/20/26 values, kohya/hako-mikan layout) are
:mod:`sdadapt.loratools.block_weights`; they use :func:`unet_block` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


from ..formats.unet_names import diffusers_to_ldm_unet, is_ldm_unet_path
from .sdxl_layers import SDXL_LAYERS, layer_weight, sdxl_layer

__all__ = [
    "BLOCKS_SD",
    "BLOCKS_SDXL",
    "block_names",
    "parse_block_weights",
    "unet_block",
    "ldm_block",
    "diffusers_block",
    "key_block",
    "block_alpha_fn",
    "FLUX_VALUES",
]

BLOCKS_SD: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
#: supermerger's Flux list length (CLIP, T5, IN, D00..D18, S00..S37, OUT): refused, named in the message
FLUX_VALUES = 61

BLOCKS_SDXL: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))

_UNET_LDM = "model.diffusion_model."
_UNET_DIFFUSERS = "unet."


def block_names(architecture: str) -> tuple[str, ...]:
    """The block list of ``"sd1"``, ``"sd2"`` (26 names) or ``"sdxl"`` (20 names)."""
    if architecture in ("sd1", "sd2"):
        return BLOCKS_SD
    if architecture == "sdxl":
        return BLOCKS_SDXL
    raise ValueError(f"architecture must be 'sd1', 'sd2' or 'sdxl', got {architecture!r}")


def parse_block_weights(
    weights: str | Sequence[float], *, architecture: str, base_alpha: float | None = None
) -> dict[str, float]:
    """A block-weight vector -> ``{block name: weight}`` for ``architecture``.

    Args:
        weights: comma-separated text (``"0,1,...,1"``) or numbers: 26 (SD1/SD2) / 20 (SDXL) with
            BASE first, 25 / 19 without BASE, 26 on SDXL (reduced as supermerger does), or 110 on
            SDXL (one per layer: the result is keyed by :data:`~sdadapt.merge.sdxl_layers.SDXL_LAYERS`,
            which :func:`block_alpha_fn` recognises by its ``CLIPL`` entry).
        base_alpha: BASE's weight for the 25/19-value forms (required there).

    Raises:
        ValueError: a count that fits neither form (says which counts fit), a non-number, or a
            missing ``base_alpha``.
    """
    if isinstance(weights, str):
        try:
            values = [float(v) for v in weights.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ValueError(f"block weights must be comma-separated numbers, got {weights!r}") from None
    else:
        values = [float(v) for v in weights]
    names = block_names(architecture)
    if len(values) == len(names):
        return dict(zip(names, values))
    if len(values) == len(names) - 1:
        if base_alpha is None:
            raise ValueError(
                f"{len(values)} block weights have no BASE value; pass base_alpha (the text encoder/VAE weight) "
                f"or give {len(names)} values with BASE first"
            )
        return dict(zip(names, [float(base_alpha), *values]))
    if architecture == "sdxl" and len(values) == len(BLOCKS_SD):
        full = dict(zip(BLOCKS_SD, values))
        return {name: full[name] for name in BLOCKS_SDXL}
    if architecture == "sdxl" and len(values) == len(SDXL_LAYERS):
        return dict(zip(SDXL_LAYERS, values))
    if len(values) == FLUX_VALUES:
        raise ValueError(f"{FLUX_VALUES} block weights are supermerger's Flux list (CLIP, T5, IN, D00..D18, "
                         f"S00..S37, OUT); this {architecture} model takes {len(names)} values"
                         + (f", 26 (SD1's, reduced) or {len(SDXL_LAYERS)} (one per layer)" if architecture == "sdxl"
                            else ""))
    raise ValueError(
        f"{len(values)} block weights do not fit {architecture}: give {len(names)} values "
        f"({', '.join(names[:3])}, ..., {names[-1]}) with BASE first"
        + (f" or {len(names) - 1} without BASE (base_alpha given)" if base_alpha is not None else "")
        + (f" (or an SD1 26-value vector, or {len(SDXL_LAYERS)} values, one per layer)" if architecture == "sdxl"
           else f"; {len(SDXL_LAYERS)} values (one per layer) are for SDXL only" if len(values) == len(SDXL_LAYERS)
           else "")
    )


def unet_block(path: str, *, architecture: str) -> str | None:
    """The block of a UNet module (or parameter) path — the one layer -> block map of the package.

    Args:
        path: without the checkpoint prefix; LDM (``input_blocks.4.1.proj_in[.weight]``) or
            diffusers (``down_blocks.1.attentions.0.proj_in``; a module path, as LoRA layers are).
        architecture: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Returns:
        ``IN{N}`` / ``M00`` / ``OUT{N}`` of the LDM block the path lives in; ``IN00`` for the time
        and label embeddings (``time_embed``/``label_emb``; diffusers ``time_embedding``/
        ``add_embedding``), the last OUT block for ``out.*`` (``conv_norm_out``/``conv_out``);
        ``None`` for anything else (not a UNet path, or a block number the architecture lacks).

    >>> unet_block("down_blocks.1.attentions.0.proj_in", architecture="sd1")
    'IN04'
    """
    names = block_names(architecture)
    if not is_ldm_unet_path(path):
        converted = diffusers_to_ldm_unet(path, up_blocks_with_attention={0, 1} if architecture == "sdxl" else None)
        if converted is None:
            return None
        path = converted
    parts = path.split(".")
    if parts[0] in ("time_embed", "label_emb"):
        return "IN00"
    if parts[0] == "out":
        return names[-1]
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1 and parts[1].isdigit():
        name = f"{'IN' if parts[0] == 'input_blocks' else 'OUT'}{int(parts[1]):02d}"
        return name if name in names else None
    return None


def ldm_block(key: str, *, architecture: str) -> str | None:
    """Block of an LDM checkpoint key; ``None`` for a UNet (or EMA) key outside the known blocks.

    >>> ldm_block("model.diffusion_model.input_blocks.4.1.proj_in.weight", architecture="sd1")
    'IN04'
    """
    block_names(architecture)  # checks the name
    if key.startswith("model_ema."):
        return None
    if not key.startswith(_UNET_LDM):
        return "BASE"
    path = key[len(_UNET_LDM) :]
    return unet_block(path, architecture=architecture) if is_ldm_unet_path(path) else None


def diffusers_block(key: str, *, architecture: str) -> str | None:
    """Block of a flat diffusers key (``unet.down_blocks.1.attentions.0.proj_in.weight`` -> ``IN04``)."""
    block_names(architecture)  # checks the name
    if not key.startswith(_UNET_DIFFUSERS):
        return "BASE"
    module, _, _param = key[len(_UNET_DIFFUSERS) :].rpartition(".")
    return None if is_ldm_unet_path(module) else unet_block(module, architecture=architecture)


def key_block(key: str, *, architecture: str, naming: str) -> str | None:
    """Block of ``key`` in a checkpoint of ``naming`` (``"ldm"`` or ``"diffusers"``)."""
    if naming == "ldm":
        return ldm_block(key, architecture=architecture)
    if naming == "diffusers":
        return diffusers_block(key, architecture=architecture)
    raise ValueError(f"naming must be 'ldm' or 'diffusers', got {naming!r}")


def block_alpha_fn(
    weights: Mapping[str, float], *, architecture: str, naming: str
) -> Callable[[str], tuple[float, str | None]]:
    """``key -> (alpha, block)``; unknown keys get BASE's weight and block ``None`` (to report them).

    ``weights`` keyed by :data:`~sdadapt.merge.sdxl_layers.SDXL_LAYERS` (the 110-value SDXL form):
    the alpha is the key's layer's (:func:`~sdadapt.merge.sdxl_layers.layer_weight`), the block still
    its block (elemental rules match blocks); a key in no layer is reported as unmatched.
    """
    names = block_names(architecture)
    if "CLIPL" in weights:
        if architecture != "sdxl" or any(name not in weights for name in SDXL_LAYERS):
            raise ValueError(f"per-layer weights are SDXL's {len(SDXL_LAYERS)} layers: {', '.join(SDXL_LAYERS[:4])}, ...")
        table = {name: float(weights[name]) for name in SDXL_LAYERS}

        def layer_alpha(key: str) -> tuple[float, str | None]:
            layer = sdxl_layer(key, naming=naming)
            return layer_weight(table, layer), (None if layer is None else key_block(key, architecture=architecture,
                                                                                     naming=naming))

        return layer_alpha
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"block weights lack {missing}; give every block of {architecture}: {', '.join(names)}")

    def alpha(key: str) -> tuple[float, str | None]:
        block = key_block(key, architecture=architecture, naming=naming)
        return (float(weights[block]) if block is not None else float(weights["BASE"])), block

    return alpha
