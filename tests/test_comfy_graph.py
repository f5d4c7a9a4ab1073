"""The settings of a ComfyUI image's API graph (``sdadapt.comfy_graph``), read for ``inspect``: ComfyUI's default
workflow with a LoRA chain, SDXL's text_g/text_l encoder, a conditioning passed through, an advanced sampler; the
output a link names (ControlNet, inpaint), a zeroed negative, cycles and long chains, the custom samplers (Flux),
combined and concatenated texts, linked settings and damaged nodes. Node and input names are ComfyUI's (a125cd84),
cited as file:line of its repository."""

from __future__ import annotations

import json
import threading

import pytest

from sdadapt.comfy_graph import comfy_samplers

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                               "model": ["11", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 2}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle, (masterpiece:1.2)", "clip": ["11", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["11", 1]}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 1.0, "model": ["4", 0], "clip": ["4", 1]}},
    "11": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.5,
                                                  "strength_clip": 0.5, "model": ["10", 0], "clip": ["10", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
}


def test_the_default_workflow_with_a_lora_chain():
    (found,) = comfy_samplers(json.dumps(GRAPH))
    assert found == {"node": "3", "class_type": "KSampler", "seed": 156680208700286, "steps": 20, "cfg": 8.0,
                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                     "checkpoint": "v1-5-pruned-emaonly.safetensors",
                     "loras": [{"lora": "detail.safetensors", "strength_model": 0.5, "strength_clip": 0.5},
                               {"lora": "ink.safetensors", "strength_model": 0.8, "strength_clip": 1.0}],
                     "positive": "a castle, (masterpiece:1.2)", "negative": "blurry", "width": 512, "height": 768,
                     "batch_size": 2}


def test_sdxl_texts_a_conditioning_passed_on_and_an_advanced_sampler():
    graph = {
        "1": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 7, "steps": 30, "cfg": 6.5,
                                                           "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                           "start_at_step": 0, "end_at_step": 25,
                                                           "model": ["2", 0], "positive": ["3", 0],
                                                           "negative": ["4", 0], "latent_image": ["9", 0]}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "3": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["5", 0], "start": 0.0,
                                                                       "end": 1.0}},  # (ComfyUI nodes.py:261)
        "5": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a fox", "text_l": "a fox, detailed",
                                                             "width": 1024, "height": 1024, "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["6", 0], "clip": ["2", 1]}},
        "6": {"class_type": "PrimitiveString", "inputs": {"value": "lowres"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["2", 2]}},
    }
    (found,) = comfy_samplers(graph)
    assert found["noise_seed"] == 7 and found["end_at_step"] == 25
    assert found["checkpoint"] == "sd_xl_base_1.0.safetensors"
    assert found["positive"] == "a fox" and found["negative"] == "lowres"  # (a text node's value, linked)
    assert found["positive_text_l"] == "a fox, detailed" and "negative_text_l" not in found  # (SDXL's other text)
    assert (found["width"], found["height"], found["batch_size"]) == (None, None, None)  # (an img2img latent)


def test_not_a_graph():
    assert comfy_samplers({"1": {"class_type": "SaveImage", "inputs": {}}}) == []
    with pytest.raises(ValueError):
        comfy_samplers("[1, 2]")
    with pytest.raises(ValueError):
        comfy_samplers("not json")


def _txt2img(**changes: object) -> dict:
    """ComfyUI's default txt2img graph, API format (nodes.py:1499 KSampler, :54 CLIPTextEncode, :1164
    EmptyLatentImage), ``changes`` replacing the KSampler's inputs."""
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 123, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
    }
    graph["3"]["inputs"].update(changes)
    return graph


def test_a_negative_read_through_the_output_its_link_names():
    graph = _txt2img(positive=["12", 0], negative=["12", 1])
    graph["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    graph["12"] = {"class_type": "ControlNetApplyAdvanced",  # (nodes.py:853; RETURN_NAMES positive, negative :869)
                   "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0],
                              "image": ["11", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["negative"]) == ("a cat", "blurry")
    graph["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}}
    graph["12"] = {"class_type": "InpaintModelConditioning",  # (nodes.py:404; positive, negative, latent :416)
                   "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["13", 0], "pixels": ["11", 0],
                              "mask": ["11", 1], "noise_mask": True}}
    graph["3"]["inputs"]["latent_image"] = ["12", 2]
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["negative"], found["width"]) == ("a cat", "blurry", None)


def test_a_zeroed_negative_has_no_text():
    # (ComfyUI's tests/inference/graphs/default_graph_sdxl1_0.json: the negative is ConditioningZeroOut of the
    # positive's encoder; nodes.py:238)
    graph = _txt2img(negative=["15", 0])
    graph["15"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["negative"]) == ("a cat", None)


def _within(seconds: float, call) -> object:
    """``call()``'s result, failing the test where it takes longer than ``seconds`` (a daemon thread: a hang does
    not hold the test run)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"took over {seconds} s"
    return result[0]


def test_a_cycle_and_a_long_chain_end():
    graph = _txt2img()
    graph["6"]["inputs"]["text"] = ["6", 0]  # (a damaged file: the encoder's text links to itself)
    graph["7"]["inputs"]["text"] = ["8", 0]  # (and a two-node cycle)
    graph["8"] = {"class_type": "StringConcatenate", "inputs": {"string_a": ["7", 0], "string_b": "x",
                                                                "delimiter": ""}}
    (found,) = _within(10, lambda: comfy_samplers(graph))
    assert (found["positive"], found["negative"], found["seed"]) == (None, None, 123)
    graph = _txt2img()
    previous = "4"
    for depth in range(60):  # (conditioning nodes whose two inputs never reach a text: 2**60 paths)
        graph[f"c{depth}"] = {"class_type": "ConditioningCombine",  # (nodes.py:77)
                              "inputs": {"conditioning_1": [previous, 0], "conditioning_2": [previous, 0]}}
        previous = f"c{depth}"
    graph["3"]["inputs"]["positive"] = [previous, 0]
    (found,) = _within(10, lambda: comfy_samplers(graph))
    assert (found["positive"], found["negative"]) == (None, "blurry")


def test_a_flux_graph_on_the_custom_sampler():
    graph = {  # (the Flux dev workflow: comfy_extras/nodes_custom_sampler.py, nodes_flux.py, nodes_sd3.py)
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",  # (nodes.py:903)
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",  # (nodes.py:955)
                                                         "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a fox",  # (nodes_flux.py:7)
                                                             "t5xxl": "a red fox in the snow", "guidance": 3.5}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},  # (:34)
        "12": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "fur.safetensors",  # (nodes.py:681)
                                                               "strength_model": 0.7, "model": ["1", 0]}},
        "5": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["4", 0]}},  # (:673)
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},  # (:333)
        "7": {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 20,  # (:13)
                                                         "denoise": 1.0, "model": ["12", 0]}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},  # (:783)
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768,  # (nodes_sd3.py:39)
                                                              "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["5", 0],  # (:801)
                                                                 "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["9", 0]}},
    }
    (found,) = comfy_samplers(graph)
    assert found == {"node": "10", "class_type": "SamplerCustomAdvanced", "noise_seed": 42, "steps": 20,
                     "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                     "checkpoint": "flux1-dev.safetensors",
                     "loras": [{"lora": "fur.safetensors", "strength_model": 0.7, "strength_clip": None}],
                     "positive": "a red fox in the snow", "positive_clip_l": "a fox", "negative": None,
                     "width": 1024, "height": 768, "batch_size": 1}


def test_the_custom_samplers_guiders_and_noise():
    graph = _txt2img()  # (SamplerCustom, nodes_custom_sampler.py:615: its own noise, cfg and conditionings)
    graph["3"] = {"class_type": "SamplerCustom", "inputs": {"model": ["4", 0], "add_noise": True, "noise_seed": 5,
                                                            "cfg": 6.0, "positive": ["6", 0], "negative": ["7", 0],
                                                            "sampler": ["30", 0], "sigmas": ["32", 0],
                                                            "latent_image": ["5", 0]}}
    graph["30"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    graph["31"] = {"class_type": "BasicScheduler", "inputs": {"scheduler": "karras", "steps": 25, "denoise": 0.6,
                                                              "model": ["4", 0]}}
    graph["32"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["31", 0], "step": 10}}  # (:176, output 0)
    (found,) = comfy_samplers(graph)
    assert {key: found[key] for key in ("add_noise", "noise_seed", "cfg", "sampler_name", "scheduler", "steps",
                                        "denoise", "checkpoint", "positive", "negative", "width")} == {
        "add_noise": True, "noise_seed": 5, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
        "steps": 25, "denoise": 0.6, "checkpoint": "v1-5.safetensors", "positive": "a cat", "negative": "blurry",
        "width": 512}
    graph["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["33", 0], "guider": ["34", 0],
                                                                    "sampler": ["30", 0], "sigmas": ["31", 0],
                                                                    "latent_image": ["5", 0]}}
    graph["33"] = {"class_type": "DisableNoise", "inputs": {}}  # (:768)
    graph["34"] = {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0],  # (:692)
                                                         "negative": ["7", 0], "cfg": 4.5}}
    (found,) = comfy_samplers(graph)
    assert (found["add_noise"], found["cfg"], found["positive"], found["negative"], found["checkpoint"]) == (
        False, 4.5, "a cat", "blurry", "v1-5.safetensors")
    graph["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a hat", "clip": ["4", 1]}}
    graph["34"] = {"class_type": "DualCFGGuider", "inputs": {"model": ["4", 0], "cond1": ["6", 0],  # (:743)
                                                             "cond2": ["8", 0], "negative": ["7", 0],
                                                             "cfg_conds": 8.0, "cfg_cond2_negative": 3.0,
                                                             "style": "regular"}}
    (found,) = comfy_samplers(graph)
    assert {key: found.get(key) for key in ("cfg", "cfg_conds", "cfg_cond2_negative", "style", "positive",
                                            "middle", "negative")} == {
        "cfg": None, "cfg_conds": 8.0, "cfg_cond2_negative": 3.0, "style": "regular", "positive": "a cat",
        "middle": "a hat", "negative": "blurry"}


def test_combined_concatenated_and_several_encoder_texts():
    graph = _txt2img(positive=["9", 0])
    graph["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a hat", "clip": ["4", 1]}}
    graph["9"] = {"class_type": "ConditioningCombine",  # (nodes.py:77: A1111's AND)
                  "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["8", 0]}}
    (found,) = comfy_samplers(graph)
    assert found["positive"] == "a cat AND a hat"
    graph["9"] = {"class_type": "ConditioningConcat",  # (nodes.py:127: the tokens one after the other, A1111's BREAK)
                  "inputs": {"conditioning_to": ["6", 0], "conditioning_from": ["8", 0]}}
    (found,) = comfy_samplers(graph)
    assert found["positive"] == "a cat BREAK a hat"
    graph["8"] = {"class_type": "CLIPTextEncodeSDXL",  # (comfy_extras/nodes_clip_sdxl.py:28)
                  "inputs": {"clip": ["4", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                             "target_width": 1024, "target_height": 1024, "text_g": "a hat", "text_l": "felt"}}
    graph["7"] = {"class_type": "CLIPTextEncodeSD3",  # (comfy_extras/nodes_sd3.py:63)
                  "inputs": {"clip": ["4", 1], "clip_l": "blurry", "clip_g": "blurry", "t5xxl": "a blurry photo",
                             "empty_padding": "none"}}
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["positive_text_l"]) == ("a cat BREAK a hat", "a cat BREAK felt")
    assert (found["negative"], found["negative_clip_l"], found["negative_clip_g"]) == (
        "a blurry photo", "blurry", "blurry")


def test_a_concatenated_text_and_linked_settings():
    graph = _txt2img(seed=["22", 0], steps=["23", 0])
    graph["20"] = {"class_type": "StringConcatenate",  # (comfy_extras/nodes_string.py:7)
                   "inputs": {"string_a": "masterpiece", "string_b": ["21", 0], "delimiter": ", "}}
    graph["21"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a cat"}}  # (nodes_primitive.py:25)
    graph["6"]["inputs"]["text"] = ["20", 0]
    graph["22"] = {"class_type": "PrimitiveInt", "inputs": {"value": 987654321}}  # (nodes_primitive.py:43)
    graph["23"] = {"class_type": "StepsFromSomewhere", "inputs": {"steps": 30}}  # (a custom node: the same name)
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["seed"], found["steps"]) == ("masterpiece, a cat", 987654321, 30)


def test_a_node_whose_inputs_are_no_object(tmp_path, capsys):
    graph = _txt2img()
    graph["6"]["inputs"] = ["a cat"]  # (a damaged file)
    graph["5"]["inputs"] = None
    (found,) = comfy_samplers(graph)
    assert (found["positive"], found["negative"], found["width"]) == (None, "blurry", None)
    graph["3"]["inputs"] = "broken"
    assert comfy_samplers(graph) == [{"node": "3", "class_type": "KSampler", "checkpoint": None, "loras": [],
                                      "positive": None, "negative": None, "width": None, "height": None,
                                      "batch_size": None}]


def test_inspect_shows_an_encoders_other_text(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from sdadapt.cli import main
    from sdadapt.images import write_png

    graph = _txt2img()
    graph["6"] = {"class_type": "CLIPTextEncodeSDXL",  # (comfy_extras/nodes_clip_sdxl.py:28)
                  "inputs": {"clip": ["4", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                             "target_width": 1024, "target_height": 1024, "text_g": "a cat", "text_l": "fur"}}
    graph["9"] = {"class_type": "CLIPTextEncode", "inputs": ["broken"]}
    write_png(tmp_path / "comfy.png", torch.zeros(4, 4, 3, dtype=torch.uint8), text={"prompt": json.dumps(graph)})
    assert main(["inspect", str(tmp_path / "comfy.png")]) == 0
    out = capsys.readouterr().out
    (settings,) = [line for line in out.splitlines() if line.startswith("ComfyUI KSampler (node 3): seed 123,")]
    assert "positive" not in settings and "fur" not in settings  # (the texts have their own lines)
    assert "  positive: a cat\n  negative: blurry\n  positive_text_l: fur\n" in out
