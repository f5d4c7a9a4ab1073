"""supermerger's 110-value SDXL list: one merge strength per SDXL layer ("use extended XL").

supermerger (``scripts/mergers/mergers.py`` @ 0b1c491, ``BLOCKIDXLLL`` and ``blockfromkey``) accepts,
on SDXL only, a weights text of 110 values, one per name of :data:`SDXL_LAYERS`: the two text
encoders, then every UNet sub-module ``IN{block}{part}`` / ``MID{part}0`` / ``OUT{block}{part}``,
each transformer block of a spatial transformer on its own (``IN{block}1{t}``, ``MID10{t}``,
``OUT{block}1{t}``), the final ``out`` layers (``OUT9``), ``TIME``, ``LABEL`` and ``VAE``.

How supermerger places a key (and so does :func:`sdxl_layer` with :func:`layer_weight`):

* the layer is named from the LDM key: ``label_emb`` -> LABEL, ``time_embed`` -> TIME,
  ``conditioner.embedders.0`` -> CLIPL, ``.1`` -> CLIPG, ``first_stage_model`` -> VAE, ``out.`` ->
  OUT9, else ``IN``/``MID``/``OUT`` + the key's first two digits (one for MID, then ``0``) + the
  transformer block number when the key is inside one;
* a UNet layer takes its own value; CLIPG its own; CLIPL **and VAE** take the first value (supermerger
  reads BASE-block keys other than CLIPG from ``base_alpha``: the ``VAE`` slot is never read) — kept;
  ``IN0`` is never produced, so its slot is never read either.

Diffusers-named keys (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``vae.``) get the layer of
their LDM name (:func:`sdadapt.formats.unet_names.diffusers_to_ldm_unet`).
"""

from __future__ import annotations

import re

from ..formats.unet_names import diffusers_to_ldm_unet, is_ldm_unet_path

__all__ = ["SDXL_LAYERS", "sdxl_layer", "layer_weight"]

_TRANSFORMER = {  # spatial transformers of the SDXL UNet: LDM (block, part) prefix -> transformer blocks
    **{f"IN{b}1": 2 for b in (4, 5)}, **{f"IN{b}1": 10 for b in (7, 8)},
    "MID10": 10, **{f"OUT{b}1": 10 for b in (0, 1, 2)}, **{f"OUT{b}1": 2 for b in (3, 4, 5)},
}


def _layers() -> tuple[str, ...]:
    names = ["CLIPL", "CLIPG", "IN0"]
    parts = {"IN": {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 1, 7: 2, 8: 2},
             "OUT": {0: 2, 1: 2, 2: 3, 3: 2, 4: 2, 5: 3, 6: 1, 7: 1, 8: 1}}
    for kind in ("IN", "MID", "OUT"):
        blocks = parts[kind].items() if kind != "MID" else [(None, 3)]
        for block, count in blocks:
            for part in range(count):
                stem = f"MID{part}0" if kind == "MID" else f"{kind}{block}{part}"
                names.append(stem)
                names.extend(f"{stem}{t}" for t in range(_TRANSFORMER.get(stem, 0)))
    return (*names, "OUT9", "TIME", "LABEL", "VAE")


#: supermerger's BLOCKIDXLLL: the 110 names of the per-layer SDXL list, in its order
SDXL_LAYERS: tuple[str, ...] = _layers()

_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
_TEXT_DIFFUSERS = {"text_encoder.": "CLIPL", "text_encoder_2.": "CLIPG", "vae.": "VAE"}
_TEXT_LDM = {"conditioner.embedders.0.": "CLIPL", "conditioner.embedders.1.": "CLIPG", "first_stage_model.": "VAE"}
_UNET_OUTSIDE_BLOCKS = {"label_emb": "LABEL", "time_embed": "TIME", "out.": "OUT9"}


def _by_prefix(key: str, layers: dict[str, str]) -> str | None:
    """The layer of the first prefix in ``layers`` (``{prefix: layer}``) that ``key`` starts with, else ``None``."""
    return next((layer for prefix, layer in layers.items() if key.startswith(prefix)), None)


def _ldm_unet_layer(path: str) -> str | None:
    """Layer of a UNet path without the ``model.diffusion_model.`` prefix."""
    outside = _by_prefix(path, _UNET_OUTSIDE_BLOCKS)
    if outside is not None:
        return outside
    parts = path.split(".")
    if len(parts) < 3 or parts[0] not in ("input_blocks", "middle_block", "output_blocks"):
        return None
    if parts[0] == "middle_block":
        name = f"MID{parts[1]}0"
    else:
        if not (parts[1].isdigit() and parts[2].isdigit()):
            return None
        name = f"{'IN' if parts[0] == 'input_blocks' else 'OUT'}{parts[1]}{parts[2]}"
    found = _TRANSFORMER_BLOCK.search(path)
    if found is not None:
        name += found.group(1)
    return name if name in _LAYER_SET else None


_LAYER_SET = frozenset(SDXL_LAYERS)


def sdxl_layer(key: str, *, naming: str) -> str | None:
    """The :data:`SDXL_LAYERS` name of an SDXL checkpoint key (``naming`` ``"ldm"`` or ``"diffusers"``).

    Returns ``None`` for a key in no layer (EMA copies, unknown keys); they get the first value.

    >>> sdxl_layer("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", naming="ldm")
    'IN411'
    """
    if naming == "diffusers":
        layer = _by_prefix(key, _TEXT_DIFFUSERS)
        if layer is not None:
            return layer
        if not key.startswith("unet."):
            return None
        module, _, param = key[len("unet."):].rpartition(".")
        if is_ldm_unet_path(module):
            return None
        converted = diffusers_to_ldm_unet(module, up_blocks_with_attention={0, 1})
        return None if converted is None else _ldm_unet_layer(f"{converted}.{param}")
    if naming != "ldm":
        raise ValueError(f"naming must be 'ldm' or 'diffusers', got {naming!r}")
    layer = _by_prefix(key, _TEXT_LDM)
    if layer is not None:
        return layer
    if key.startswith("model.diffusion_model."):
        return _ldm_unet_layer(key[len("model.diffusion_model."):])
    return None


def layer_weight(values: dict[str, float], layer: str | None) -> float:
    """The strength supermerger gives ``layer`` from a 110-value list (``values``: name -> value):
    its own value for UNet layers and CLIPG, the first (CLIPL's) for CLIPL, VAE and keys in no layer."""
    if layer is None or layer in ("CLIPL", "VAE"):
        return float(values["CLIPL"])
    return float(values[layer])
