"""A caption becomes the UNet's conditioning at training time as kohya and diffusers do it (float64).

``DiffusersSystem.tokenize`` + ``condition`` against transcriptions, written here, of

* kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16):
  library/strategy_base.py:221-284 ``TokenizeStrategy._get_input_ids`` (the windows of a long caption),
  library/strategy_sd.py:21-41 ``SdTokenizeStrategy`` and :58-106 ``SdTextEncodingStrategy.encode_tokens``
  (clip skip = ``hidden_states[-clip_skip]`` + ``final_layer_norm``; the v1 / v2 joins; the same math as the
  older library/train_util.py:5608-5654 ``get_hidden_states``), library/strategy_sdxl.py:22-38 and :61-169
  ``_pool_workaround`` / ``_get_hidden_states_sdxl`` (TE1 ``hidden_states[11]``, TE2 ``hidden_states[-2]``, the
  pooled output at the first ``<EOS>`` of each caption's first window, projected; clip skip unused:
  library/sdxl_train_util.py:351 warns that it does nothing);
* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951:
  src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py:422-437 (``clip_skip`` = one layer fewer
  than A1111/kohya count: ``hidden_states[-(clip_skip + 1)]`` + ``final_layer_norm``) and
  examples/text_to_image/train_text_to_image_sdxl.py:502-541 ``encode_prompt`` (``hidden_states[-2]`` of each
  encoder, concatenated TE1 | TE2; the pooled output ``text_encoder_2(...)[0]``; an empty caption is encoded as
  ``""``, not zeros).

Tiny random CLIPs (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) built here: 77-token
windows, the tiny byte-level tokenizer (BOS 512, EOS 513, ``!`` 0); SDXL's first encoder has 12 layers so that
kohya's literal ``hidden_states[11]`` is the penultimate layer, as on CLIP-L; its second has SDXL base's legacy
config ``eos_token_id=2`` (kohya's library/sdxl_model_util.py:240-256 builds it so), under which transformers
pools at the largest token id.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from tiny_systems import tiny_diffusers_system
from transformers_versions import float64_clip

from sdadapt.text_chunks import chunk_token_ids

BOS, EOS, BANG = 512, 513, 0  # the tiny tokenizer's <|startoftext|>, <|endoftext|> and "!"


def _caption(words: int) -> str:
    """``words`` two-letter words: 2 byte tokens each (the tiny tokenizer has no merges)."""
    return " ".join("ab" for _ in range(words))


#: 200 tokens (3 windows at 225, cut at 150 / 75), 80 tokens (an almost empty 2nd window), 8, and kohya's
#: caption-dropout caption "" (encoded, as kohya and diffusers' proportion_empty_prompts do)
CAPTIONS = [_caption(100), _caption(40), "ab, cd!", ""]


# ---------------------------------------------------------------------------- kohya, transcribed
def _text_model(text_encoder):
    """``text_encoder.text_model`` of transformers 4 (where kohya and diffusers read ``final_layer_norm``); transformers 5's
    ``CLIPTextModel`` holds the layers itself."""
    return getattr(text_encoder, "text_model", text_encoder)


def kohya_get_input_ids(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """strategy_base.py:221-272 ``_get_input_ids`` (unweighted): (1, 77) or (n, 77)."""
    input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids
    if max_length > tokenizer.model_max_length:
        input_ids = input_ids.squeeze(0)
        iids_list = []
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (input_ids[0].unsqueeze(0), input_ids[i: i + tokenizer.model_max_length - 2],
                             input_ids[-1].unsqueeze(0))
                iids_list.append(torch.cat(ids_chunk))
        else:
            for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i: i + tokenizer.model_max_length - 2],
                                       input_ids[-1].unsqueeze(0)))
                if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                    ids_chunk[-1] = tokenizer.eos_token_id
                if ids_chunk[1] == tokenizer.pad_token_id:
                    ids_chunk[1] = tokenizer.eos_token_id
                iids_list.append(ids_chunk)
        input_ids = torch.stack(iids_list)
    return input_ids


def kohya_tokenize(tokenizer, texts: list[str], max_token_length: int | None) -> torch.Tensor:
    """strategy_sd.py:34-41 / strategy_sdxl.py:28-38: ``max_length`` = 77, or ``max_token_length + 2``; (b, n, 77)."""
    max_length = tokenizer.model_max_length if max_token_length is None else max_token_length + 2
    return torch.stack([kohya_get_input_ids(tokenizer, t, max_length) for t in texts], dim=0)


def kohya_sd_encode_tokens(text_encoder, tokenizer, tokens: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """strategy_sd.py:58-106 ``SdTextEncodingStrategy.encode_tokens`` (v1 and v2 joins)."""
    b_size = tokens.size()[0]
    max_token_length = tokens.size()[1] * tokens.size()[2]
    model_max_length = tokenizer.model_max_length
    tokens = tokens.reshape((-1, model_max_length))
    if clip_skip is None:
        encoder_hidden_states = text_encoder(tokens)[0]
    else:
        enc_out = text_encoder(tokens, output_hidden_states=True, return_dict=True)
        encoder_hidden_states = enc_out["hidden_states"][-clip_skip]
        encoder_hidden_states = _text_model(text_encoder).final_layer_norm(encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states.reshape((b_size, -1, encoder_hidden_states.shape[-1]))
    if max_token_length != model_max_length:
        v1 = tokenizer.pad_token_id == tokenizer.eos_token_id
        if not v1:
            states_list = [encoder_hidden_states[:, 0].unsqueeze(1)]
            for i in range(1, max_token_length, model_max_length):
                chunk = encoder_hidden_states[:, i: i + model_max_length - 2]
                if i > 0:
                    for j in range(len(chunk)):
                        if tokens[j, 1] == tokenizer.eos_token:  # (an id against a string: never true, as in kohya)
                            chunk[j, 0] = chunk[j, 1]
                states_list.append(chunk)
            states_list.append(encoder_hidden_states[:, -1].unsqueeze(1))
            encoder_hidden_states = torch.cat(states_list, dim=1)
        else:
            states_list = [encoder_hidden_states[:, 0].unsqueeze(1)]
            for i in range(1, max_token_length, model_max_length):
                states_list.append(encoder_hidden_states[:, i: i + model_max_length - 2])
            states_list.append(encoder_hidden_states[:, -1].unsqueeze(1))
            encoder_hidden_states = torch.cat(states_list, dim=1)
    return encoder_hidden_states


def kohya_pool_workaround(text_encoder, last_hidden_state, input_ids, eos_token_id: int) -> torch.Tensor:
    """strategy_sdxl.py:61-103 ``_pool_workaround``: the state at the first ``<EOS>``, projected."""
    eos_token_mask = (input_ids == eos_token_id).int()
    eos_token_index = torch.argmax(eos_token_mask, dim=1)
    pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0]), eos_token_index]
    pooled_output = text_encoder.text_projection(pooled_output.to(text_encoder.text_projection.weight.dtype))
    return pooled_output.to(last_hidden_state.dtype)


def kohya_sdxl_hidden_states(input_ids1, input_ids2, tokenizer1, tokenizer2, text_encoder1, text_encoder2):
    """strategy_sdxl.py:105-169 ``_get_hidden_states_sdxl`` (the commented-out v2 copy left out, as there)."""
    b_size = input_ids1.size()[0]
    max_token_length = None if input_ids1.size()[1] == 1 else input_ids1.size()[1] * input_ids1.size()[2]
    input_ids1 = input_ids1.reshape((-1, tokenizer1.model_max_length))
    input_ids2 = input_ids2.reshape((-1, tokenizer2.model_max_length))
    enc_out = text_encoder1(input_ids1, output_hidden_states=True, return_dict=True)
    hidden_states1 = enc_out["hidden_states"][11]
    enc_out = text_encoder2(input_ids2, output_hidden_states=True, return_dict=True)
    hidden_states2 = enc_out["hidden_states"][-2]
    pool2 = kohya_pool_workaround(text_encoder2, enc_out["last_hidden_state"], input_ids2, tokenizer2.eos_token_id)
    n_size = 1 if max_token_length is None else max_token_length // 75
    hidden_states1 = hidden_states1.reshape((b_size, -1, hidden_states1.shape[-1]))
    hidden_states2 = hidden_states2.reshape((b_size, -1, hidden_states2.shape[-1]))
    if max_token_length is not None:
        states_list = [hidden_states1[:, 0].unsqueeze(1)]
        for i in range(1, max_token_length, tokenizer1.model_max_length):
            states_list.append(hidden_states1[:, i: i + tokenizer1.model_max_length - 2])
        states_list.append(hidden_states1[:, -1].unsqueeze(1))
        hidden_states1 = torch.cat(states_list, dim=1)
        states_list = [hidden_states2[:, 0].unsqueeze(1)]
        for i in range(1, max_token_length, tokenizer2.model_max_length):
            states_list.append(hidden_states2[:, i: i + tokenizer2.model_max_length - 2])
        states_list.append(hidden_states2[:, -1].unsqueeze(1))
        hidden_states2 = torch.cat(states_list, dim=1)
        pool2 = pool2[::n_size]
    return hidden_states1, hidden_states2, pool2


# ------------------------------------------------------------------------- diffusers, transcribed
def diffusers_sd_prompt_embeds(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """pipeline_stable_diffusion.py:422-437 ``encode_prompt`` (no attention mask: SD's text encoders)."""
    if clip_skip is None:
        return text_encoder(ids)[0]
    prompt_embeds = text_encoder(ids, output_hidden_states=True)
    prompt_embeds = prompt_embeds[-1][-(clip_skip + 1)]
    return _text_model(text_encoder).final_layer_norm(prompt_embeds)


def diffusers_sdxl_train_encode(texts: list[str], text_encoders, tokenizers) -> tuple[torch.Tensor, torch.Tensor]:
    """train_text_to_image_sdxl.py:516-541 ``encode_prompt`` (the captions already drawn)."""
    prompt_embeds_list = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        text_input_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                   return_tensors="pt").input_ids
        prompt_embeds = text_encoder(text_input_ids, output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = prompt_embeds[0]
        prompt_embeds_list.append(prompt_embeds[-1][-2])
    return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds


# ------------------------------------------------------------------------------------- systems
def _clip(*, layers: int, width: int, eos_token_id: int, vocab: int = 514, projection: bool = False):
    torch.manual_seed(layers * 7 + width)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=eos_token_id, bos_token_id=512,
        projection_dim=32)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval().requires_grad_(False).double()


@pytest.fixture(scope="module")
def sd_systems(tmp_path_factory):
    """SD1 (pads with <EOS>) and SD2-like (pads with "!": kohya's v2 rules) tiny systems, text encoders in float64."""
    out = {}
    for pad in ("eos", "!"):
        system = tiny_diffusers_system(tmp_path_factory.mktemp(f"sd-{pad}"), max_token_length=75, pad=pad)
        system.text_encoder.double()
        out[pad] = system
    return out


def _sdxl(folder, *, vocab: int = 514):
    """The tiny SDXL system with a 12-layer first encoder and a second of SDXL base's legacy config."""
    system = tiny_diffusers_system(folder, max_token_length=75, sdxl=True)
    system.text_encoder = _clip(layers=12, width=16, eos_token_id=EOS, vocab=vocab)
    system.text_encoder_2 = _clip(layers=2, width=16, eos_token_id=2, vocab=vocab, projection=True)
    return system


@float64_clip
@pytest.mark.parametrize("pad", ["eos", "!"])
@pytest.mark.parametrize("max_token_length", [75, 150, 225])
def test_sd1_sd2_conditioning_is_kohyas_encode_tokens(sd_systems, pad, max_token_length):
    """Every clip skip, caption length and both pad rules: kohya's tokenizer windows and its joined states.
    sdadapt's ``clip_skip=1`` is kohya's unset (``None``) and its ``1``; ``2`` is kohya's ``2``."""
    system = sd_systems[pad]
    system.max_token_length = max_token_length
    kohya_ids = kohya_tokenize(system.tokenizer, CAPTIONS, None if max_token_length == 75 else max_token_length)
    ids = system.tokenize(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), max_token_length + 2)
    windows = chunk_token_ids(ids, window=77, eos_id=EOS, pad_id=EOS if pad == "eos" else BANG)
    assert torch.equal(windows, kohya_ids)
    for clip_skip, kohya_skips in ((1, (None, 1)), (2, (2,)), (3, (3,))):
        system.clip_skip = clip_skip
        with torch.no_grad():
            got = system.condition(ids)
            for kohya_skip in kohya_skips:
                want = kohya_sd_encode_tokens(system.text_encoder, system.tokenizer, kohya_ids, kohya_skip)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    system.clip_skip = 1
    assert got[-1].abs().sum() > 0  # the dropped caption "" is its encoding, not zeros


@float64_clip
def test_clip_skip_counts_as_a1111_and_kohya_one_more_than_diffusers(sd_systems):
    """``--clip-skip k`` is diffusers' pipeline ``clip_skip=k - 1`` (``1``: diffusers' unset)."""
    system = sd_systems["eos"]
    system.max_token_length = 75
    ids = system.tokenize(CAPTIONS)
    for clip_skip, theirs in ((1, None), (2, 1), (3, 2)):
        system.clip_skip = clip_skip
        with torch.no_grad():
            torch.testing.assert_close(system.condition(ids), diffusers_sd_prompt_embeds(system.text_encoder, ids, theirs),
                                       rtol=1e-12, atol=1e-12)
    system.clip_skip = 1


@float64_clip
def test_sdxl_conditioning_is_kohyas_get_hidden_states_sdxl_and_diffusers_encode_prompt(tmp_path):
    """Both encoders' penultimate states joined TE1 | TE2, the first window's pooled output at its <EOS>,
    at 75 / 150 / 225 tokens; clip skip changes nothing (kohya ignores it for SDXL); at 75 tokens also
    diffusers' train_text_to_image_sdxl encode_prompt. The default ``time_ids`` are diffusers'
    ``original_size + crops_coords_top_left + target_size`` of the native size."""
    system = _sdxl(tmp_path)
    for max_token_length in (75, 150, 225):
        system.max_token_length = max_token_length
        ids = system.tokenize(CAPTIONS)
        kohya_ids = [kohya_tokenize(t, CAPTIONS, None if max_token_length == 75 else max_token_length)
                     for t in (system.tokenizer, system.tokenizer_2)]
        with torch.no_grad():
            want_1, want_2, want_pool = kohya_sdxl_hidden_states(*kohya_ids, system.tokenizer, system.tokenizer_2,
                                                                 system.text_encoder, system.text_encoder_2)
            for clip_skip in (1, 2):
                system.clip_skip = clip_skip
                cond = system.condition(ids)
                torch.testing.assert_close(cond["context"], torch.cat([want_1, want_2], dim=-1), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(cond["text_embeds"], want_pool, rtol=1e-12, atol=1e-12)
            system.clip_skip = 1
            if max_token_length == 75:
                context, pooled = diffusers_sdxl_train_encode(CAPTIONS, (system.text_encoder, system.text_encoder_2),
                                                              (system.tokenizer, system.tokenizer_2))
                torch.testing.assert_close(cond["context"], context, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-12, atol=1e-12)
    size = float(system.image_size)
    assert cond["time_ids"].tolist() == [[size, size, 0.0, 0.0, size, size]] * len(CAPTIONS)


@float64_clip
def test_sdxl_pooled_output_is_at_eos_with_an_added_token_under_a_legacy_config(tmp_path):
    """A textual-inversion token (an id past <EOS>) in the caption: transformers' legacy pooling
    (``eos_token_id == 2``, SDXL base's config) takes the state at the largest id — the new token's;
    kohya's ``_pool_workaround`` (written for textual inversion) and sdadapt take the first <EOS>'s."""
    system = _sdxl(tmp_path, vocab=515)
    for tokenizer in (system.tokenizer, system.tokenizer_2):
        assert tokenizer.add_tokens(["<emb>"]) == 1 and tokenizer.convert_tokens_to_ids("<emb>") == 514
    captions = ["ab <emb> ab", _caption(30) + " <emb>"]
    for max_token_length in (75, 225):
        system.max_token_length = max_token_length
        ids = system.tokenize(captions)
        assert (ids[:, 1] == 514).any(dim=-1).all()
        kohya_ids = [kohya_tokenize(t, captions, None if max_token_length == 75 else max_token_length)
                     for t in (system.tokenizer, system.tokenizer_2)]
        with torch.no_grad():
            _, _, want = kohya_sdxl_hidden_states(*kohya_ids, system.tokenizer, system.tokenizer_2,
                                                  system.text_encoder, system.text_encoder_2)
            cond = system.condition(ids)
            legacy = system.text_encoder_2(kohya_ids[1][:, 0]).text_embeds  # (the first windows, pooled at argmax id)
        torch.testing.assert_close(cond["text_embeds"], want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(legacy[0], want[0])  # (the case is real: transformers pools elsewhere)
