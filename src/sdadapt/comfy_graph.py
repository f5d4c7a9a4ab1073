"""The generation settings in a ComfyUI image: its PNG ``prompt`` text is the API graph the image was made by
(``{node id: {"class_type", "inputs"}}``, an input either a value or ``[node id, output index]``). For each sampler
node (``KSampler``, ``KSamplerAdvanced``) :func:`comfy_samplers` follows the links back to what a person set: the
checkpoint and the LoRAs on the way (``CheckpointLoaderSimple``, ``LoraLoader``), the positive and negative texts
(``CLIPTextEncode``, SDXL's ``text_g`` / ``text_l``), the latent's size and batch (``EmptyLatentImage``), and the
sampler's own seed, steps, CFG, sampler, scheduler and denoise.

Read only, for ``inspect``: ComfyUI draws its noise and spaces its σ its own way, so these settings given to
``generate`` make a similar image, not ComfyUI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["comfy_samplers"]

_SAMPLERS = ("KSampler", "KSamplerAdvanced")
_SETTINGS = ("seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "start_at_step",
             "end_at_step")


def _linked(graph: Mapping, value: object) -> Mapping | None:
    """The node an input links to (``[id, index]``), else ``None``."""
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
        node = graph[str(value[0])]
        return node if isinstance(node, Mapping) else None
    return None


def _text(graph: Mapping, value: object, seen: int = 0) -> str | None:
    """The text a conditioning input comes from: a ``CLIPTextEncode``'s ``text`` (SDXL's ``text_g`` / ``text_l``; a
    linked text from a node's ``value`` / ``string``), through nodes that pass a conditioning or a text on (the first
    linked input that leads to one)."""
    node = _linked(graph, value)
    if node is None or seen > 32:
        return value if isinstance(value, str) else None
    inputs = node.get("inputs", {})
    for key in ("text", "text_g", "text_l", "value", "string"):  # (the encoders', then text nodes' own)
        if key in inputs:
            found = _text(graph, inputs[key], seen + 1)
            if found is not None:
                return found
    for item in inputs.values():
        found = _text(graph, item, seen + 1) if _linked(graph, item) is not None else None
        if found is not None:
            return found
    return None


def _model(graph: Mapping, value: object) -> tuple[str | None, list[dict]]:
    """``(checkpoint name, [LoRAs, nearest the sampler first])`` along a model input's links."""
    loras: list[dict] = []
    node = _linked(graph, value)
    for _ in range(64):
        if node is None:
            break
        inputs = node.get("inputs", {})
        if "ckpt_name" in inputs:
            return str(inputs["ckpt_name"]), loras
        if "lora_name" in inputs:
            loras.append({"lora": str(inputs["lora_name"]), "strength_model": inputs.get("strength_model"),
                          "strength_clip": inputs.get("strength_clip")})
        node = _linked(graph, inputs.get("model"))
    return None, loras


def comfy_samplers(prompt: str | Mapping) -> list[dict]:
    """Each sampler node of a ComfyUI API graph (the PNG's ``prompt`` text, or the parsed dict) with the settings
    it was run with: ``{"node", "class_type", <its seed / steps / cfg / sampler_name / scheduler / denoise ...>,
    "checkpoint", "loras", "positive", "negative", "width", "height", "batch_size"}`` (what the links reach;
    ``None`` where they lead elsewhere). ``[]`` for a graph without one.

    Raises:
        ValueError: text that is no JSON object.
    """
    graph = json.loads(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(graph, Mapping):  # (bad input, a file's text: not a caller's wrong type)
        raise ValueError("a ComfyUI prompt is a JSON object of nodes")  # noqa: TRY004
    found = []
    for node_id, node in graph.items():
        if not isinstance(node, Mapping) or node.get("class_type") not in _SAMPLERS:
            continue
        inputs = node.get("inputs", {})
        entry: dict = {"node": str(node_id), "class_type": node["class_type"]}
        entry.update({key: inputs[key] for key in _SETTINGS if key in inputs and not isinstance(inputs[key], list)})
        entry["checkpoint"], entry["loras"] = _model(graph, inputs.get("model"))
        entry["positive"] = _text(graph, inputs.get("positive"))
        entry["negative"] = _text(graph, inputs.get("negative"))
        latent = _linked(graph, inputs.get("latent_image"))
        size = latent.get("inputs", {}) if latent is not None else {}
        for key in ("width", "height", "batch_size"):
            entry[key] = size.get(key) if not isinstance(size.get(key), list) else None
        found.append(entry)
    return found
