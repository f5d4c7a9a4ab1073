"""Custom Diffusion weights on a UNet: which layers, apply at a strength, undo bit for bit.

A Custom Diffusion result holds **full replacement weights** (not deltas) of the cross-attention
(``attn2``) projections: ``to_k`` and ``to_v`` always, ``to_q`` and ``to_out.0`` (weight + bias)
with ``train_q_out``. Applying it at strength ``s`` sets, in place, for each of them::

    W ← W0 + s · (W_cd − W0)          (s = 1: W = W_cd exactly, what diffusers' processors compute)

The keys are diffusers' attention-processor names (``unet.save_attn_procs``; the vocabulary is
:mod:`sdadapt.formats.custom_diffusion`)::

    down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight
    ...processor.to_v_custom_diffusion.weight / to_q_custom_diffusion.weight
    ...processor.to_out_custom_diffusion.0.weight / .0.bias

A UNet with LDM names (``input_blocks.1.1.transformer_blocks.0.attn2``, optionally under
``model.diffusion_model.``) is matched through :mod:`sdadapt.formats.unet_names`.
:func:`apply_custom_diffusion` returns a :class:`CustomDiffusionHandle` whose ``remove()`` puts the
original weights back bit for bit; the UNet's ``forward`` and ``state_dict()`` keys never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import WeightFileError
from ..formats.custom_diffusion import KV_PARAMS, Q_OUT_PARAMS, file_key, split_file_key
from ..formats.layers import canonical_layer_path

__all__ = [
    "CrossAttentionLayer",
    "CustomDiffusionHandle",
    "apply_custom_diffusion",
    "blend_weight",
    "cross_attention_layers",
    "custom_diffusion_parameters",
    "save_custom_diffusion",
    "unet_custom_diffusion_state",
]



@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention module of a UNet.

    Attributes:
        name: its diffusers path (the file's layer name), e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        path: its module path in the UNet as given (LDM or diffusers).
        module: the attention module (has ``to_q``, ``to_k``, ``to_v``, ``to_out[0]``).
    """

    name: str
    path: str
    module: nn.Module

    def parameter(self, param: str) -> nn.Parameter | None:
        """The module's parameter ``param`` (``"to_k.weight"`` ...), or ``None`` (e.g. no out bias)."""
        return dict(self.module.named_parameters()).get(param)


def cross_attention_layers(unet: nn.Module) -> dict[str, CrossAttentionLayer]:
    """Every ``attn2`` module (with ``to_k``/``to_v`` Linears) of ``unet``, by diffusers path.

    Works on diffusers-named UNets (``UNet2DConditionModel``, the toy UNet) and LDM-named ones
    (``input_blocks.1.1.transformer_blocks.0.attn2``, with or without ``model.diffusion_model.``).
    """
    found: dict[str, CrossAttentionLayer] = {}
    for path, module in unet.named_modules():
        if path.rsplit(".", 1)[-1] != "attn2":
            continue
        if not isinstance(getattr(module, "to_k", None), nn.Linear) or not isinstance(getattr(module, "to_v", None), nn.Linear):
            continue
        name = canonical_layer_path("unet", path)  # the diffusers path of an LDM- or diffusers-named layer
        found[name] = CrossAttentionLayer(name, path, module)
    return found


def custom_diffusion_parameters(layers: Mapping[str, CrossAttentionLayer], *, train_q_out: bool = False) -> dict[str, nn.Parameter]:
    """``{file key: the layer's own parameter}``: ``to_k``/``to_v`` of every layer in ``layers``, and
    ``to_q``/``to_out.0`` with ``train_q_out`` (what Custom Diffusion trains and its file holds)."""
    params = KV_PARAMS + (Q_OUT_PARAMS if train_q_out else ())
    out: dict[str, nn.Parameter] = {}
    for name, layer in layers.items():
        for param in params:
            value = layer.parameter(param)
            if value is not None:
                out[file_key(name, param)] = value
    return out


def unet_custom_diffusion_state(unet: nn.Module, *, train_q_out: bool = False,
                                layers: Mapping[str, CrossAttentionLayer] | None = None) -> dict[str, Tensor]:
    """The UNet's current ``attn2`` weights as a Custom Diffusion state dict (diffusers keys;
    detached CPU copies, the weights' dtype): ``to_k``/``to_v`` of every cross-attention layer, and
    ``to_q``/``to_out.0`` with ``train_q_out`` (what diffusers' ``save_attn_procs`` writes)."""
    layers = cross_attention_layers(unet) if layers is None else layers
    return {key: value.detach().to("cpu").clone()
            for key, value in custom_diffusion_parameters(layers, train_q_out=train_q_out).items()}


def blend_weight(base: Tensor, replacement: Tensor, scale: float) -> Tensor:
    """``base + scale · (replacement − base)`` in float32 or wider, cast to ``base.dtype``;
    ``scale == 1`` returns ``replacement`` cast (no rounding detour). Shapes: any, equal."""
    if scale == 1.0:
        return replacement.to(device=base.device, dtype=base.dtype)
    wide = torch.promote_types(base.dtype, torch.float32)
    b = base.to(wide)
    return (b + scale * (replacement.to(device=base.device, dtype=wide) - b)).to(base.dtype)


class CustomDiffusionHandle:
    """What :func:`apply_custom_diffusion` changed, and how to undo it.

    Attributes:
        layers: ``{diffusers layer: CrossAttentionLayer}`` the file touched.
        scale: the strength applied.
        embeddings: the modifier-token :class:`~sdadapt.embeddings.EmbeddingHandle` s injected (text side).
        source: where the weights came from (file path or ``"<state dict>"``).
    """

    def __init__(self, unet: nn.Module, *, source: str, scale: float) -> None:
        self.unet, self.source, self.scale = unet, source, scale
        self.layers: dict[str, CrossAttentionLayer] = {}
        self.embeddings: list = []
        self._originals: list[tuple[nn.Parameter, Tensor]] = []
        self._applied: dict[str, nn.Parameter] = {}  # file key -> the UNet parameter it set
        self._removed = False

    def state_dict(self) -> dict[str, Tensor]:
        """The applied weights as a Custom Diffusion state dict (diffusers keys): what
        :func:`sdadapt.save_custom_diffusion` writes for this handle (the UNet's current weights)."""
        self._check_alive()
        return {key: param.detach().to("cpu").clone() for key, param in self._applied.items()}

    def modifier_embeddings(self) -> list:
        """The injected modifier tokens as :class:`~sdadapt.Embedding` values (empty without a text side)."""
        return [h.embedding() for h in self.embeddings]

    @torch.no_grad()
    def remove(self) -> None:
        """Put every original weight back bit for bit and take the modifier tokens out (idempotent)."""
        if self._removed:
            return
        for param, original in reversed(self._originals):
            param.copy_(original)
        for handle in reversed(self.embeddings):
            handle.remove()
        self._removed = True

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError(f"the Custom Diffusion weights of {self.source} were removed; apply them again")

    def __repr__(self) -> str:
        return (f"CustomDiffusionHandle(source={self.source!r}, layers={len(self.layers)}, scale={self.scale}, "
                f"tokens={[h.name for h in self.embeddings]}, removed={self._removed})")


def _check_state(state: Mapping[str, Tensor], layers: Mapping[str, CrossAttentionLayer], source: str) -> dict[str, tuple[str, str]]:
    """``{key: (layer, param)}`` for every key; a :class:`WeightFileError` naming what does not fit."""
    parsed: dict[str, tuple[str, str]] = {}
    foreign = [k for k in state if split_file_key(k) is None]
    if foreign:
        raise WeightFileError(
            f"{source}: {len(foreign)} key(s) are not Custom Diffusion weights (e.g. {foreign[0]!r}); expected "
            "'<layer>.attn2.processor.to_k_custom_diffusion.weight' etc. as diffusers' save_attn_procs writes them"
        )
    if not state:
        raise WeightFileError(f"{source}: no Custom Diffusion weights in it")
    missing: list[str] = []
    wrong: list[str] = []
    for key, value in state.items():
        layer, param = split_file_key(key)  # type: ignore[misc]
        target = layers[layer].parameter(param) if layer in layers else None
        if layer not in layers or target is None:
            missing.append(f"{layer} ({param})")
            continue
        if tuple(value.shape) != tuple(target.shape):
            wrong.append(f"{layer}.{param}: file {tuple(value.shape)}, model {tuple(target.shape)}")
        parsed[key] = (layer, param)
    if missing:
        have = ", ".join(sorted(layers)[:3]) or "none"
        raise WeightFileError(
            f"{source}: {len(missing)} layer(s) of the file are not cross-attention layers of this UNet: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (the UNet's are e.g. {have}): "
            "the file was made for another model"
        )
    if wrong:
        raise WeightFileError(
            f"{source}: {len(wrong)} weight(s) do not fit this UNet: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}: "
            "the file was made for another model (SD1 vs SD2 vs SDXL widths)"
        )
    return parsed


def apply_custom_diffusion(
    unet: nn.Module,
    path_or_state_dict,
    *,
    scale: float = 1.0,
    text_encoder: nn.Module | None = None,
    tokenizer=None,
) -> CustomDiffusionHandle:
    """Put Custom Diffusion weights into ``unet`` in place: ``W ← W0 + scale · (W_cd − W0)``.

    Args:
        unet: a diffusers-named UNet (``UNet2DConditionModel``, the toy UNet) or an LDM-named one.
        path_or_state_dict: a file (diffusers ``pytorch_custom_diffusion_weights.safetensors`` /
            ``.bin``, sdadapt's, adobe's ``delta.bin``), a folder holding one, a
            :class:`~sdadapt.formats.custom_diffusion.CustomDiffusionFile`, or a state dict with
            diffusers keys (full replacement weights: ``(out, in)`` / ``(out,)``).
        scale: strength (1: the trained weights; 0: the base model).
        text_encoder, tokenizer: when both are given and the file has modifier tokens, the tokens
            are injected (:func:`sdadapt.inject_embedding`) and ``remove()`` takes them out too.

    Returns:
        a :class:`CustomDiffusionHandle`; ``handle.remove()`` restores every weight exactly.

    Raises:
        WeightFileError: keys that are not Custom Diffusion weights, layers the UNet does not have,
            or shapes that do not fit (the message names the layers and the file).
    """
    from ..checks import finite_number
    from ..formats.custom_diffusion import (
        CustomDiffusionFile,
        drop_placeholders,
        load_custom_diffusion,
    )

    scale = float(finite_number(scale, name="scale"))  # type: ignore[arg-type]
    if isinstance(path_or_state_dict, Mapping):
        loaded = CustomDiffusionFile(drop_placeholders(path_or_state_dict), source="<state dict>")
    elif isinstance(path_or_state_dict, CustomDiffusionFile):
        loaded = path_or_state_dict
    else:
        loaded = load_custom_diffusion(path_or_state_dict)
    layers = cross_attention_layers(unet)
    parsed = _check_state(loaded.weights, layers, loaded.source)
    handle = CustomDiffusionHandle(unet, source=loaded.source, scale=scale)
    try:
        with torch.no_grad():
            for key, (layer, param) in parsed.items():
                target = layers[layer].parameter(param)
                handle.layers[layer] = layers[layer]
                handle._originals.append((target, target.detach().clone()))  # type: ignore[union-attr]
                handle._applied[key] = target  # type: ignore[assignment]
                target.copy_(blend_weight(target.detach(), loaded.weights[key], scale))  # type: ignore[union-attr]
        if text_encoder is not None and tokenizer is not None:
            from ..embeddings import inject_embedding

            for embedding in loaded.embeddings:
                handle.embeddings.append(inject_embedding(text_encoder, tokenizer, embedding))
    except BaseException:
        handle.remove()
        raise
    return handle


def save_custom_diffusion(
    path,
    handle_or_state_dict,
    *,
    embeddings=(),
    prompts=(),
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
):
    """Write Custom Diffusion weights as diffusers does (``.safetensors`` or ``.bin``) + modifier-token files.

    Args:
        path: the weights file (``pytorch_custom_diffusion_weights.safetensors`` is diffusers' name;
            any name works with sdadapt and with ``load_attn_procs(folder, weight_name=NAME)``).
        handle_or_state_dict: a :class:`CustomDiffusionHandle` (its current weights and injected
            modifier tokens) or a state dict with diffusers keys (full weights).
        embeddings: modifier tokens (:class:`~sdadapt.Embedding`) to write beside it (default: the handle's).
        prompts: training prompts to record in the metadata (the merge uses them).

    Returns:
        the paths written (``list[Path]``), the weights file first; tokens are ``<stem>-token<ext>``
        (:func:`sdadapt.formats.custom_diffusion.token_files`).
    """
    from ..formats.custom_diffusion import save_custom_diffusion_file

    if isinstance(handle_or_state_dict, CustomDiffusionHandle):
        state = handle_or_state_dict.state_dict()
        embeddings = list(embeddings) or handle_or_state_dict.modifier_embeddings()
    elif isinstance(handle_or_state_dict, Mapping):
        state = dict(handle_or_state_dict)
    else:
        raise TypeError(f"save_custom_diffusion takes a CustomDiffusionHandle or a state dict, got {type(handle_or_state_dict).__name__}")
    return save_custom_diffusion_file(path, state, embeddings=list(embeddings), prompts=list(prompts),
                                      metadata=metadata, overwrite=overwrite)
