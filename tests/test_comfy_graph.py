"""The settings of a ComfyUI image's API graph (``sdadapt.comfy_graph``), read for ``inspect``: ComfyUI's default
workflow with a LoRA chain, SDXL's text_g/text_l encoder, a conditioning passed through, an advanced sampler."""

from __future__ import annotations

import json

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
        "3": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["5", 0]}},
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
    assert (found["width"], found["height"], found["batch_size"]) == (None, None, None)  # (an img2img latent)


def test_not_a_graph():
    assert comfy_samplers({"1": {"class_type": "SaveImage", "inputs": {}}}) == []
    with pytest.raises(ValueError):
        comfy_samplers("[1, 2]")
    with pytest.raises(ValueError):
        comfy_samplers("not json")
