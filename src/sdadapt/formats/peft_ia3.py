"""peft (IA)³ adapters (``IA3Config``): ``adapter_model.safetensors`` + ``adapter_config.json``.

peft stores one vector per layer, ``base_model.model.<layer>.ia3_l``, that *multiplies* the layer
(initialised to ones): ``(out, 1)`` on a Linear's outputs, ``(1, in)`` on the inputs of a
``feedforward_modules`` Linear, ``(1, C, 1, 1)`` on a Conv2d's outputs or (feed-forward) inputs.
sdadapt's canonical (IA)³ tensors are LyCORIS': ``weight`` ``w`` with ``W' = W ⊙ (1 + w)``, so

    w = ia3_l − 1        ia3_l = 1 + w        on_input = the layer is in feedforward_modules

The one difference: on an output-scaled layer *with a bias* peft scales the bias too
(``y = (W x + b) ⊙ ia3_l``), LyCORIS and sdadapt do not (``y = W' x + b``). On SD UNets the
preset layers (``to_k``/``to_v`` have no bias, ``ff.net.2`` is scaled on its inputs) agree exactly; a
CLIP ``k_proj``/``v_proj`` has a bias. :func:`from_peft_ia3` with ``model=`` refuses such layers at
once; without the model (``load_lora(folder)``) each output-scaled vector carries
``scales_bias = 1``, and whatever applies it to a layer (``load_adapter``, ``apply_lora``,
``merge-lora``: the layer's geometry knows its bias) loads it exactly on a bias-free layer and refuses
it, naming the layer, on a biased one. Nothing is applied with another output. The flag never
reaches a file: ``save_peft`` drops it (peft's own semantics) and the kohya/LyCORIS writer refuses
it (other tools do not know the key, and without it the vector means LyCORIS' bias-free (IA)³);
the adapter loaded onto its model saves without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..patterns import compile_pattern
from .files import WeightFileError

__all__ = ["SD_UNET_BIAS_FREE", "from_peft_ia3", "is_peft_ia3", "resolve_sd_bias_free", "to_peft_ia3"]

#: The SD UNet layers that have no bias in every SD1 / SD2 / SDXL UNet: the attention projections
#: ``attn1`` / ``attn2`` ``to_q`` / ``to_k`` / ``to_v`` (diffusers' ``Attention(bias=False)`` in
#: ``BasicTransformerBlock``, LDM's ``CrossAttention``; the same names in both layouts). The layers of
#: peft's usual SD (IA)³ ``target_modules`` (``to_k``, ``to_v``) are among them; ``to_out.0``, the
#: feed-forward, ``proj_in/out``, the convolutions and every CLIP projection have a bias.
SD_UNET_BIAS_FREE = re.compile(r"(?:^|\.)attn[12]\.to_[qkv]$")

_PREFIX = "base_model.model."
_SUFFIX = ".ia3_l"


def is_peft_ia3(state: Mapping[str, Tensor], config: Mapping | None = None) -> bool:
    """Whether a peft adapter state (+ config) is (IA)³: ``peft_type = "IA3"`` or ``.ia3_l`` keys."""
    if config and isinstance(config, Mapping) and config.get("peft_type") == "IA3":
        return True
    return bool(state) and any(k.endswith(_SUFFIX) for k in state)


def _feedforward(modules: object, *, source: str) -> Callable[[str], bool]:
    """peft's ``feedforward_modules`` test (``IA3Model._check_target_module_feedforward``) as
    ``layer name -> bool``, made once per file and asked only for the vectors whose shape does not
    tell the axis: a list entry is a plain suffix of the layer name (``key.endswith(entry)``: ``"ff"``
    also matches ``conv_ff``), a string is a pattern the whole name matches (linear-time,
    :mod:`sdadapt.patterns`; compiled at the first question, once). Another type raises when asked."""
    if modules is None:
        return lambda layer: False
    if isinstance(modules, (list, tuple)):
        names = tuple(n for n in modules if isinstance(n, str))
        return lambda layer: layer.endswith(names)
    compiled: list = []

    def matches(layer: str) -> bool:
        if not isinstance(modules, str):
            raise WeightFileError(f"{source}: feedforward_modules must be a list of names or a pattern, got "
                                  f"{type(modules).__name__}")
        if not compiled:
            compiled.append(compile_pattern(modules, what=f"{source}: feedforward_modules"))
        return compiled[0].fullmatch(layer)  # (SafePattern.fullmatch is a bool)

    return matches


def from_peft_ia3(state: Mapping[str, Tensor], config: Mapping | None, *, source: str = "<state>",
                  model: nn.Module | None = None) -> dict[str, Tensor]:
    """peft (IA)³ state + config -> canonical state (``<layer>.weight`` / ``<layer>.on_input``).

    Which axis a vector scales: a Linear's ``(1, in)`` vs ``(out, 1)`` tells; a convolution's
    ``(1, C, 1, 1)`` is decided by the config's ``feedforward_modules`` (as peft does).

    Args:
        state: ``{"base_model.model.<layer>.ia3_l": (out, 1) | (1, in) | (1, C, 1, 1)}``.
        config: ``adapter_config.json`` (``feedforward_modules``); ``None`` reads the axis from shapes.
        model: the model it is for (layer paths as in the file): layers peft would scale with their
            bias are refused. Without it, output-scaled vectors get ``<layer>.scales_bias = 1`` and
            are checked where they are applied (see the module docstring).

    Raises:
        WeightFileError: keys that are not ``ia3_l``, or a vector of a shape peft never writes.
        InputError: ``model`` has a bias on a layer whose outputs the vector scales.
    """
    modules = dict(model.named_modules()) if model is not None else {}
    feedforward = _feedforward((config or {}).get("feedforward_modules"), source=source)
    out: dict[str, Tensor] = {}
    unknown = [k for k in state if not k.endswith(_SUFFIX)]
    if unknown:
        raise WeightFileError(f"{source}: {len(unknown)} key(s) are not peft IA3 keys (<layer>.ia3_l), e.g. {unknown[:5]}")
    for key, vector in state.items():
        layer = key.removeprefix(_PREFIX)
        layer = layer[: -len(_SUFFIX)]
        if vector.dim() == 2 and (vector.shape[0] == 1) != (vector.shape[1] == 1):
            on_input = vector.shape[0] == 1  # (1, in): a feed-forward layer's inputs
        elif vector.dim() == 2 and tuple(vector.shape) == (1, 1) or vector.dim() == 4 and vector.shape[0] == 1 and vector.shape[2:].numel() == 1:
            on_input = feedforward(layer)
        else:
            raise WeightFileError(f"{source}: {key} has shape {tuple(vector.shape)}; peft IA3 vectors are (out, 1), "
                                  "(1, in) or (1, C, 1, 1)")
        base = modules.get(layer)
        if base is not None and not on_input and getattr(base, "bias", None) is not None:
            raise InputError(f"{source}: {key} scales the outputs of {layer}, which has a bias: peft scales that bias "
                             "too, LyCORIS and sdadapt do not, so the adapter would change the output differently. "
                             "Only bias-free or feed-forward (input-scaled) layers convert exactly.")
        weight = vector.reshape(-1) - 1 if vector.dim() == 2 else vector - 1
        out[f"{layer}.weight"] = weight
        out[f"{layer}.on_input"] = torch.tensor(int(on_input), dtype=torch.int64)
        if model is None and not on_input:  # peft scales a bias too: checked where a layer is known
            out[f"{layer}.scales_bias"] = torch.tensor(1, dtype=torch.int64)
    return out


def to_peft_ia3(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Canonical (IA)³ state (layer paths as in the model) -> (peft state dict, ``IA3Config`` dict).

    Raises:
        ValueError: a key that is not (IA)³'s ``weight`` / ``on_input``, or a layer missing one.
    """
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        layer, _, suffix = key.rpartition(".")
        if suffix == "scales_bias":  # peft's own semantics (read from a peft adapter): nothing to write
            continue
        if suffix not in ("weight", "on_input"):
            raise ValueError(f"{key}: a peft IA3 adapter holds only (IA)³ vectors (weight, on_input), not {suffix!r}")
        layers.setdefault(layer, {})[suffix] = value
    peft_state: dict[str, Tensor] = {}
    feedforward: list[str] = []
    for layer, tensors in layers.items():
        if set(tensors) != {"weight", "on_input"}:
            raise ValueError(f"{layer}: (IA)³ needs both weight and on_input, have {sorted(tensors)}")
        weight, on_input = tensors["weight"], bool(int(tensors["on_input"]))
        if on_input:
            feedforward.append(layer)
        vector = weight + 1
        if weight.dim() == 1:  # Linear: (1, in) on inputs, (out, 1) on outputs
            vector = vector.reshape(1, -1) if on_input else vector.reshape(-1, 1)
        peft_state[f"{_PREFIX}{layer}{_SUFFIX}"] = vector.contiguous()
    config = {
        "peft_type": "IA3",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(layers),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "inference_mode": False,
    }
    return peft_state, config


def resolve_sd_bias_free(state: Mapping[str, Tensor], *, component: str) -> dict[str, Tensor]:
    """``state`` without the ``scales_bias`` flags (:func:`from_peft_ia3` without a model) of the SD UNet
    layers that have no bias (:data:`SD_UNET_BIAS_FREE`, ``component == "unet"``): there peft's
    ``y = (W x) ⊙ ia3_l`` is LyCORIS' (IA)³ exactly, so a kohya/LyCORIS file can hold the vector. Every
    other flag stays (the kohya writer refuses it, naming the layer: a CLIP projection or a biased UNet
    layer scaled on its outputs would get another output).

    Args:
        state: a canonical (IA)³ state, ``{"<layer>.weight" | ".on_input" | ".scales_bias": tensor}``.
        component: the SD pipeline component the state is for (``unet``, ``text_encoder`` ...).

    Returns:
        a new dict (the tensors are shared, not copied).
    """
    if component != "unet":
        return dict(state)
    return {key: value for key, value in state.items()
            if not (key.endswith(".scales_bias") and SD_UNET_BIAS_FREE.search(key[: -len(".scales_bias")]))}
