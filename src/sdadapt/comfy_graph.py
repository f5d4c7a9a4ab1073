"""The generation settings in a ComfyUI image: its PNG ``prompt`` text is the API graph the image was made by
(``{node id: {"class_type", "inputs"}}``, an input either a value or ``[node id, output index]``). For each sampler
node (``KSampler``, ``KSamplerAdvanced``, ``SamplerCustom``, ``SamplerCustomAdvanced``) :func:`comfy_samplers`
follows the links back to what a person set: the checkpoint (``ckpt_name``, or a ``UNETLoader``'s ``unet_name``) and
the LoRAs on the way, the positive and negative texts, the latent's size and batch (``EmptyLatentImage``), and the
sampler's seed, steps, CFG, sampler, scheduler and denoise — its own inputs, or for the custom samplers those of
their ``RandomNoise``, ``CFGGuider`` / ``BasicGuider`` / ``DualCFGGuider``, ``KSamplerSelect`` and
``BasicScheduler`` nodes; a setting linked to a ``PrimitiveInt``-like node takes that node's ``value``.

A text is read through the link's output index: a node with several conditioning outputs (``ControlNetApplyAdvanced``,
``InpaintModelConditioning`` ...: outputs positive, negative) passes output *k* on from the input of that name.
Texts are written as ``generate`` reads a prompt: ``ConditioningCombine`` is A1111's ``AND`` (``"a AND b"``),
``ConditioningConcat`` its ``BREAK``, ``StringConcatenate`` is joined with its delimiter, and
``ConditioningZeroOut`` has no text (``None``). An encoder with several texts (SDXL's ``text_g`` / ``text_l``,
``CLIPTextEncodeSD3``'s ``clip_g`` / ``clip_l`` / ``t5xxl``, ``CLIPTextEncodeFlux``'s ``clip_l`` / ``t5xxl``) gives
its main one (``text_g``; ``t5xxl``) as the text, and each other one that differs under its own key.

Read only, for ``inspect``: ComfyUI draws its noise and spaces its σ its own way, so these settings given to
``generate`` make a similar image, not ComfyUI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["comfy_samplers"]

_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
_SETTINGS = ("add_noise", "seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise",
             "start_at_step", "end_at_step")
#: an encoder's (and a text node's) own text inputs, its main text first: CLIPTextEncode's ``text`` (ComfyUI
#: nodes.py:54), CLIPTextEncodeSDXL's ``text_g`` / ``text_l`` (comfy_extras/nodes_clip_sdxl.py:28),
#: CLIPTextEncodeFlux's ``clip_l`` / ``t5xxl`` (nodes_flux.py:7), CLIPTextEncodeSD3's ``clip_l`` / ``clip_g`` /
#: ``t5xxl`` (nodes_sd3.py:63); PrimitiveString's ``value`` (nodes_primitive.py:7), a text node's ``string``
_TEXT_KEYS = ("text", "text_g", "t5xxl", "clip_g", "clip_l", "text_l", "value", "string")
#: the other texts of a several-text encoder, each reported (``positive_text_l`` ...) where it differs from the main
_OTHER_TEXTS = ("text_l", "clip_g", "clip_l")
#: nodes whose output *k* passes on the conditioning of input ``names[k]`` (``None``: no conditioning): their
#: RETURN_NAMES in ComfyUI (a125cd84). Any other node with inputs ``positive`` and ``negative`` is read the same way
#: (outputs positive, negative), as ControlNetInpaintingAliMamaApply (nodes_controlnet.py:27) and the video
#: models' conditioning nodes are.
_OUTPUTS: dict[str, tuple[str | None, ...]] = {
    "ControlNetApplyAdvanced": ("positive", "negative"),  # nodes.py:853, RETURN_NAMES nodes.py:869
    "ControlNetApplySD3": ("positive", "negative"),  # comfy_extras/nodes_sd3.py:109
    "InpaintModelConditioning": ("positive", "negative", None),  # nodes.py:404, RETURN_NAMES nodes.py:416
    "InstructPixToPixConditioning": ("positive", "negative", None),  # comfy_extras/nodes_ip2p.py:7
}
_DEPTH = 128  # (links followed from one sampler input at most: a deeper graph is cut there, not a RecursionError)


def _inputs(node: object) -> Mapping:
    """A node's ``inputs`` (``{}`` where a damaged graph has no object there)."""
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    return inputs if isinstance(inputs, Mapping) else {}


def _link(graph: Mapping, value: object) -> tuple[str, int] | None:
    """``(node id, output index)`` of an input that links to a node of the graph (``[id, index]``), else ``None``."""
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph \
            and isinstance(graph[str(value[0])], Mapping):
        index = value[1]
        return str(value[0]), index if isinstance(index, int) and not isinstance(index, bool) else 0
    return None


def _linked(graph: Mapping, value: object) -> Mapping | None:
    """The node an input links to (``[id, index]``), else ``None``."""
    link = _link(graph, value)
    return graph[link[0]] if link is not None else None


def _value(graph: Mapping, value: object, name: str) -> object:
    """A setting's value: the input's own, or for one linked to a node (``PrimitiveInt``, ComfyUI
    comfy_extras/nodes_primitive.py:47; a custom seed node) that node's ``value`` or its input of the same name —
    ``None`` where the link leads to neither (or goes round)."""
    for _ in range(_DEPTH):
        if _link(graph, value) is None:
            return None if isinstance(value, list) else value  # (a list: a link to a node that is not there)
        inputs = _inputs(_linked(graph, value))
        key = "value" if "value" in inputs else name if name in inputs else None
        if key is None:
            return None
        value = inputs[key]
    return None


def _text(graph: Mapping, value: object, part: str | None, memo: dict, path: tuple[str, ...] = ()) -> str | None:
    """The text a conditioning (or text) input comes from, read through the link's output index (see the module's
    notes); ``part`` one of :data:`_OTHER_TEXTS` reads that text of a several-text encoder instead of its main one.
    ``memo`` holds each ``(node, output, part)`` read in this query (so a graph of many paths costs one read per
    node); a node met again on its own path (a cycle) gives ``None``."""
    link = _link(graph, value)
    if link is None:
        return value if isinstance(value, str) else None
    if link[0] in path or len(path) >= _DEPTH:
        return None
    key = (*link, part)
    if key not in memo:
        memo[key] = _node_text(graph, link, part, memo, (*path, link[0]))
    return memo[key]


def _node_text(graph: Mapping, link: tuple[str, int], part: str | None, memo: dict,
               path: tuple[str, ...]) -> str | None:
    """The text of output ``link[1]`` of node ``link[0]`` (:func:`_text`)."""
    node = graph[link[0]]
    kind, inputs, index = node.get("class_type"), _inputs(node), link[1]

    def read(name: str) -> str | None:
        """The text of this node's input ``name``."""
        return _text(graph, inputs.get(name), part, memo, path)

    if kind == "ConditioningZeroOut":  # (nodes.py:238: the conditioning zeroed — no text reaches the sampler)
        return None
    if kind == "ConditioningCombine":  # (nodes.py:77: both conditionings, each predicted, the results averaged)
        texts = [text for text in (read("conditioning_1"), read("conditioning_2")) if text is not None]
        return " AND ".join(texts) if texts else None
    if kind == "ConditioningConcat":  # (nodes.py:127: the two token sequences one after the other)
        texts = [text for text in (read("conditioning_to"), read("conditioning_from")) if text is not None]
        return " BREAK ".join(texts) if texts else None
    if kind == "StringConcatenate":  # (comfy_extras/nodes_string.py:7: delimiter.join((string_a, string_b)))
        first, second, delimiter = read("string_a"), read("string_b"), read("delimiter")
        return None if first is None or second is None else (delimiter or "").join((first, second))
    names = _OUTPUTS.get(kind) if isinstance(kind, str) else None
    if names is None and "positive" in inputs and "negative" in inputs:
        names = ("positive", "negative")
    if names is not None:  # (output k passes on the input of its name)
        return read(names[index]) if 0 <= index < len(names) and names[index] is not None else None
    keys = ([part] if part is not None and part in inputs else []) + [key for key in _TEXT_KEYS if key in inputs]
    for key in keys:  # (an encoder's or a text node's own text)
        found = read(key)
        if found is not None:
            return found
    for item in ([inputs["conditioning"]] if "conditioning" in inputs else []) + list(inputs.values()):
        found = _text(graph, item, part, memo, path) if _link(graph, item) is not None else None
        if found is not None:  # (a node passing a conditioning or a text on: the first linked input that has one)
            return found
    return None


def _model(graph: Mapping, value: object) -> tuple[str | None, list[dict]]:
    """``(checkpoint name, [LoRAs, nearest the sampler first])`` along a model input's links: a checkpoint loader's
    ``ckpt_name`` or a ``UNETLoader``'s ``unet_name`` (ComfyUI nodes.py:903)."""
    loras: list[dict] = []
    node = _linked(graph, value)
    for _ in range(_DEPTH):
        if node is None:
            break
        inputs = _inputs(node)
        for key in ("ckpt_name", "unet_name"):
            if key in inputs and not isinstance(inputs[key], list):
                return str(inputs[key]), loras
        if "lora_name" in inputs:
            loras.append({"lora": str(inputs["lora_name"]), "strength_model": inputs.get("strength_model"),
                          "strength_clip": inputs.get("strength_clip")})
        node = _linked(graph, inputs.get("model"))
    return None, loras


def _custom(graph: Mapping, inputs: Mapping) -> tuple[dict, dict]:
    """A custom sampler's (ComfyUI comfy_extras/nodes_custom_sampler.py) settings from the nodes it links to, and the
    inputs its model and texts come from: ``({setting: value}, {"model" / "positive" / "negative" / "middle": input})``.
    ``SamplerCustom`` (:615) has its own ``add_noise`` / ``noise_seed`` / ``cfg`` / ``positive`` / ``negative`` /
    ``model``; ``SamplerCustomAdvanced`` (:801) takes them from its ``noise`` (``RandomNoise.noise_seed`` :783,
    ``DisableNoise`` :768) and ``guider`` (``CFGGuider`` :692: model, positive, negative, cfg; ``BasicGuider`` :673:
    model, conditioning, CFG 1 as comfy/samplers.py:947 sets it; ``DualCFGGuider`` :743: cond1, cond2, negative,
    cfg_conds, cfg_cond2_negative, style). Both take ``sampler_name`` from their ``sampler`` (``KSamplerSelect``
    :333) and ``scheduler`` / ``steps`` / ``denoise`` from their ``sigmas`` (``BasicScheduler`` :13; through nodes
    that pass a ``sigmas`` input on)."""
    settings: dict = {}
    sources = {"model": inputs.get("model"), "positive": inputs.get("positive"),
               "negative": inputs.get("negative")}
    noise = _linked(graph, inputs.get("noise"))
    if noise is not None:
        if noise.get("class_type") == "DisableNoise":
            settings["add_noise"] = False
        elif "noise_seed" in _inputs(noise):
            settings["noise_seed"] = _value(graph, _inputs(noise)["noise_seed"], "noise_seed")
    guider = _linked(graph, inputs.get("guider"))
    if guider is not None:
        given = _inputs(guider)
        if guider.get("class_type") == "BasicGuider":
            settings["cfg"] = 1.0
        for key in ("cfg", "cfg_conds", "cfg_cond2_negative", "style"):
            if key in given:
                settings[key] = _value(graph, given[key], key)
        sources.update({"model": given.get("model"), "negative": given.get("negative"),
                        "positive": next((given[key] for key in ("positive", "conditioning", "cond1")
                                          if key in given), None)})
        if "cond2" in given:
            sources["middle"] = given["cond2"]
    chosen = _linked(graph, inputs.get("sampler"))
    if chosen is not None and "sampler_name" in _inputs(chosen):
        settings["sampler_name"] = _value(graph, _inputs(chosen)["sampler_name"], "sampler_name")
    sigmas = _linked(graph, inputs.get("sigmas"))
    for _ in range(_DEPTH):
        given = _inputs(sigmas)
        if sigmas is None or "steps" in given:
            break
        sigmas = _linked(graph, given.get("sigmas"))
    for key in ("scheduler", "steps", "denoise"):
        if key in _inputs(sigmas):
            settings[key] = _value(graph, _inputs(sigmas)[key], key)
    if sources["model"] is None and sigmas is not None:
        sources["model"] = _inputs(sigmas).get("model")
    return settings, sources


def comfy_samplers(prompt: str | Mapping) -> list[dict]:
    """Each sampler node of a ComfyUI API graph (the PNG's ``prompt`` text, or the parsed dict) with the settings
    it was run with: ``{"node", "class_type", <its add_noise / seed / noise_seed / steps / cfg / sampler_name /
    scheduler / denoise ...>, "checkpoint", "loras", "positive", "negative", "width", "height", "batch_size"}`` (what
    the links reach; ``None`` where they lead elsewhere); ``"positive_text_l"`` (``_clip_l``, ``_clip_g``, and the
    same for ``negative``) where a several-text encoder's other text differs from its main one, and ``"middle"``
    (``DualCFGGuider``'s ``cond2``). ``[]`` for a graph without one.

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
        inputs = _inputs(node)
        entry: dict = {"node": str(node_id), "class_type": node["class_type"]}
        settings, sources = ({}, {"model": inputs.get("model"), "positive": inputs.get("positive"),
                                  "negative": inputs.get("negative")})
        if node["class_type"] in ("SamplerCustom", "SamplerCustomAdvanced"):
            settings, sources = _custom(graph, inputs)
        for key in _SETTINGS:
            if key in inputs:
                settings[key] = _value(graph, inputs[key], key)
        entry.update({key: settings[key] for key in (*_SETTINGS, "cfg_conds", "cfg_cond2_negative", "style")
                      if settings.get(key) is not None})
        entry["checkpoint"], entry["loras"] = _model(graph, sources["model"])
        memo: dict = {}
        for side in ("positive", "negative"):
            entry[side] = _text(graph, sources[side], None, memo)
        for side in ("positive", "negative"):
            for part in _OTHER_TEXTS:
                other = _text(graph, sources[side], part, memo)
                if other is not None and other != entry[side]:
                    entry[f"{side}_{part}"] = other
        if "middle" in sources:
            entry["middle"] = _text(graph, sources["middle"], None, memo)
        size = _inputs(_linked(graph, inputs.get("latent_image")))
        for key in ("width", "height", "batch_size"):
            entry[key] = _value(graph, size[key], key) if key in size else None
        found.append(entry)
    return found
