"""A model saved whole after diffusers' textual inversion with several vectors (``--save_as_full_pipeline``: tokens
``<cat>``, ``<cat>_1`` in its tokenizer) reads a bare ``<cat>`` as all its vectors, as diffusers' pipeline does
(``TextualInversionLoaderMixin.maybe_convert_prompt``): sdadapt tokenised it as the first vector only (1.01 off in
the prompt's embeddings), while a prompt spelling them out was right."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from tiny_systems import tiny_diffusers_system

from sdadapt.diffusers_system import DiffusersSystem
from sdadapt.embeddings.tokens import multi_vector_names


def test_a_folders_multi_vector_trigger_is_expanded_as_diffusers(tmp_path):
    base = tiny_diffusers_system(tmp_path, max_token_length=75)
    tokenizer = base.tokenizer
    tokenizer.add_tokens(["<cat>", "<cat>_1", "<cat>_2", "<dog>"])
    base.text_encoder.resize_token_embeddings(len(tokenizer))
    system = DiffusersSystem(base.unet, base.vae, base.text_encoder, tokenizer, {"prediction_type": "epsilon"})
    assert multi_vector_names(tokenizer) == {"<cat>": 3} == system.multi_vector_names
    prompts = ["a photo of <cat> on a sofa", "<cat>, (<cat>:1.2) and <dog>", "<cat> <cat>_1 <cat>_2 spelled out"]
    convert = diffusers.loaders.TextualInversionLoaderMixin._maybe_convert_prompt
    for prompt in prompts:
        want = convert(None, prompt, tokenizer) if "<cat>_1" not in prompt else prompt  # (diffusers expands twice)
        assert torch.equal(system.tokenize([prompt]), base.tokenize([want])), prompt
        weighted = system.tokenize_weighted([prompt], a1111=True)["ids"]
        assert torch.equal(weighted, base.tokenize_weighted([want], a1111=True)["ids"]), prompt
