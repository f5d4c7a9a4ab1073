"""Where each LoRA layer lives in a full checkpoint: canonical layer path <-> checkpoint tensor.

A LoRA file names layers canonically (:mod:`sdadapt.formats`): diffusers paths for the UNet,
``text_model.encoder.layers.N...`` for CLIP text encoders, with components ``unet``,
``text_encoder``, ``text_encoder_2``. A checkpoint stores the same weights under other keys:

| checkpoint | keys | component |
|---|---|---|
| LDM single file (SD1/SD2/SDXL) | ``model.diffusion_model.<LDM UNet path>.weight`` | unet |
| SD1 | ``cond_stage_model.transformer.text_model.<path>.weight`` | text_encoder |
| SD2 (OpenCLIP-H) | ``cond_stage_model.model.transformer.resblocks.N.<...>`` | text_encoder |
| SDXL | ``conditioner.embedders.0.transformer.text_model.<path>.weight`` | text_encoder |
| SDXL (OpenCLIP-bigG) | ``conditioner.embedders.1.model.transformer.resblocks.N.<...>`` | text_encoder_2 |
| diffusers UNet file | ``down_blocks.0...weight`` (optionally ``unet.``-prefixed) | unet |
| diffusers text encoder (prefixed) | ``text_encoder[_2].[text_model.]encoder.layers...weight`` | text_encoder[_2] |

OpenCLIP blocks map by the checkpoint converter's own rules
(:data:`sdadapt.formats.clip_keys.OPEN_CLIP_RULES`): ``resblocks.N.attn.out_proj`` ->
``layers.N.self_attn.out_proj``, ``mlp.c_fc`` -> ``mlp.fc1``, ``mlp.c_proj`` -> ``mlp.fc2``; the fused
``attn.in_proj_weight`` ``(3d, d)`` holds ``[q; k; v]``, so the LoRA layers
``q_proj``/``k_proj``/``v_proj`` are its row thirds ``[0, d)``, ``[d, 2d)``, ``[2d, 3d)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..formats.clip_keys import open_clip_to_diffusers
from ..formats.model_keys import LDM_PARTS, checkpoint_architecture
from ..formats.unet_keys import checked_layers_per_block
from ..formats.unet_names import is_ldm_unet_path, ldm_to_diffusers_unet
from ..targets import TEXT_ENCODER, UNET_KOHYA, UNET_LOCON

__all__ = [
    "LayerSlot",
    "checkpoint_layers",
    "detect_base_model",
    "is_lora_target",
    "unet_layers_per_block",
]


@dataclass(frozen=True)
class LayerSlot:
    """One LoRA-able weight of a checkpoint.

    Attributes:
        component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``.
        layer: canonical layer path (diffusers UNet path, or ``text_model.…`` for CLIP).
        key: the checkpoint tensor key holding the weight.
        rows: for fused weights, the ``(start, stop)`` rows of ``key`` that are this layer; else ``None``.
    """

    component: str
    layer: str
    key: str
    rows: tuple[int, int] | None = None

    def row_slice(self) -> slice | None:
        return None if self.rows is None else slice(*self.rows)


_LDM_UNET = tuple(p for p, (component, _) in LDM_PARTS.items() if component == "unet")
_DIFFUSERS_UNET_HEADS = {
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding", "encoder_hid_proj", "class_embedding",
}
#: prefix -> component for HF CLIP text encoders (path after the prefix starts at text_model./encoder.):
#: the LDM prefixes of the key map's "clip" parts, then the diffusers component prefixes
_HF_CLIP = (
    *((p, component) for p, (component, family) in LDM_PARTS.items() if family == "clip"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
#: prefix -> component for OpenCLIP text encoders (path after the prefix starts at transformer.resblocks.)
_OPEN_CLIP = tuple((p, component) for p, (component, family) in LDM_PARTS.items() if family.startswith("open_clip"))
_ENCODER_LAYERS = "text_model.encoder.layers."


def detect_base_model(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``"sdxl"``, ``"sd2"`` or ``"sd1"`` of a checkpoint ``{key: shape}``: the package's one detector,
    :func:`sdadapt.formats.model_keys.checkpoint_architecture`, with ``"sd1"`` when nothing tells
    (SD1 and SD2 LoRAs share their naming)."""
    return checkpoint_architecture(shapes, default="sd1")


def _unet_layer(path: str, layers_per_block: int) -> str | None:
    if is_ldm_unet_path(path):
        return ldm_to_diffusers_unet(path, layers_per_block=layers_per_block)
    return path if path.split(".", 1)[0] in _DIFFUSERS_UNET_HEADS else None


def _ldm_layers_per_block(keys: list[str]) -> dict[str, int]:
    """``{LDM UNet prefix: layers_per_block}`` read from the checkpoint's own UNet keys
    (2 for SD1/SD2/SDXL; tiny or custom UNets may have 1, 3 ...)."""
    return {
        prefix: checked_layers_per_block([k[len(prefix) :] for k in keys if k.startswith(prefix)], naming="ldm")
        for prefix in _LDM_UNET
        if any(k.startswith(prefix) for k in keys)
    }


def unet_layers_per_block(shapes: Mapping[str, tuple[int, ...]] | list[str]) -> int:
    """Resnets per down block of a checkpoint's UNet (2 in SD1/SD2/SDXL), read from its keys.

    LDM single files: from the ``input_blocks`` indices; diffusers UNet files (optionally
    ``unet.``-prefixed): ``1 + max j`` of ``down_blocks.i.resnets.j``; both checked against the up
    blocks (:func:`sdadapt.formats.unet_keys.checked_layers_per_block`); 2 when nothing tells.
    LoRA key maps need it for LDM names (SDXL kohya files).
    """
    keys = list(shapes)
    ldm = _ldm_layers_per_block(keys)
    if ldm:
        return next(iter(ldm.values()))
    bare = [k.removeprefix("unet.") for k in keys]
    return checked_layers_per_block(bare, naming="diffusers")


def _slots_for_key(key: str, shape: tuple[int, ...], ldm_layers: Mapping[str, int], *,
                   norms: bool = False) -> list[LayerSlot]:
    if key.endswith(".weight") and len(shape) in ((1, 2, 4) if norms else (2, 4)):
        path = key[: -len(".weight")]
        for prefix in _LDM_UNET:
            if path.startswith(prefix):
                layer = _unet_layer(path[len(prefix) :], ldm_layers.get(prefix, 2))
                return [LayerSlot("unet", layer, key)] if layer else []
        bare = path[len("unet.") :] if path.startswith("unet.") else path
        if bare.split(".", 1)[0] in _DIFFUSERS_UNET_HEADS:
            return [LayerSlot("unet", bare, key)]
        for prefix, component in _HF_CLIP:
            if path.startswith(prefix):
                rest = path[len(prefix) :]
                if rest.startswith(("encoder.", "embeddings.", "final_layer_norm")):
                    rest = "text_model." + rest
                if rest.startswith("text_model."):
                    return [LayerSlot(component, rest, key)]
                return []
    for prefix, component in _OPEN_CLIP:
        if not key.startswith(prefix + "transformer.resblocks."):
            continue
        mapped = open_clip_to_diffusers(key[len(prefix) :])
        if mapped is None or len(shape) != 2 and not (norms and len(shape) == 1):
            return []
        names, kind = mapped
        # LoRA layers: the encoder layers' Linear weights (renamed, or the row thirds of in_proj)
        if kind not in ("same", "fused_qkv") or not all(n.startswith(_ENCODER_LAYERS) and n.endswith(".weight") for n in names):
            return []
        if kind == "same":
            return [LayerSlot(component, names[0][: -len(".weight")], key)]
        if shape[0] % len(names):
            return []
        d = shape[0] // len(names)
        return [LayerSlot(component, name[: -len(".weight")], key, (i * d, (i + 1) * d)) for i, name in enumerate(names)]
    return []


def checkpoint_layers(shapes: Mapping[str, tuple[int, ...]], *, norms: bool = False) -> dict[tuple[str, str], LayerSlot]:
    """Every Linear/Conv2d weight of a checkpoint that a LoRA could target, by canonical name.

    Args:
        shapes: ``{checkpoint key: shape}`` (e.g. from a lazy source's header).
        norms: also the 1-D weights of the normalisation layers (GroupNorm/LayerNorm: what LyCORIS'
            norm modules adapt; merge-lora bakes them, LoRA extraction does not want them).

    LDM UNet paths map to diffusers paths with the checkpoint's own ``layers_per_block`` (read
    from its ``input_blocks`` keys), so UNets with other than SD's two resnets per block match too.

    Returns:
        ``{(component, canonical layer path): LayerSlot}`` in checkpoint key order.
    """
    ldm_layers = _ldm_layers_per_block(list(shapes))
    out: dict[tuple[str, str], LayerSlot] = {}
    for key, shape in shapes.items():
        for slot in _slots_for_key(key, tuple(shape), ldm_layers, norms=norms):
            out.setdefault((slot.component, slot.layer), slot)
    return out


_LINEAR_STANDIN = nn.Linear(1, 1, device="meta")
_CONV_STANDIN = nn.Conv2d(1, 1, 1, device="meta")


def is_lora_target(component: str, layer: str, shape: tuple[int, ...], *, conv: bool) -> bool:
    """Whether kohya's LoRA (``conv=False``) or LoCon (``conv=True``) target set includes the layer.

    UNet: :data:`sdadapt.targets.UNET_KOHYA` (every Linear/1x1 conv inside the transformer blocks)
    or :data:`~sdadapt.targets.UNET_LOCON` (also resnets, down/upsamplers); kxk convolutions only
    with ``conv=True``. Text encoders: :data:`~sdadapt.targets.TEXT_ENCODER` (q/k/v/out, fc1/fc2).
    """
    standin = _CONV_STANDIN if len(shape) == 4 else _LINEAR_STANDIN
    if component == "unet":
        is_kxk = len(shape) == 4 and shape[2] * shape[3] > 1
        if is_kxk and not conv:
            return False
        return (UNET_LOCON if conv else UNET_KOHYA)(layer, standin)
    return len(shape) == 2 and TEXT_ENCODER(layer, standin)
