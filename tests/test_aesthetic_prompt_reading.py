"""Aesthetic gradients read the prompt as A1111's extension does: the loss at CLIP's ``<eos>`` (not at an added
textual-inversion id a legacy transformers config pools at), and A1111 emphasis parsed, not tokenised as text."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel

from sdadapt.aesthetic import aesthetic_conditioning, personalize_text_encoder
from sdadapt.prompt_guidance import without_emphasis

BOS, EOS, ADDED = 49406, 49407, 49408


def _legacy_clip() -> CLIPTextModel:
    """A tiny CLIP text model with SD1.x diffusers folders' legacy ``eos_token_id`` 2 and CLIP's vocabulary size plus
    two added rows (an added token's id inside the table, as ``resize_token_embeddings`` makes it)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49410, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=2, bos_token_id=BOS,
                            pad_token_id=1)
    return CLIPTextModel(config).eval().double()


def _reference(encoder, ids, e, projection, *, pool_at: int, steps: int, lr: float) -> torch.Tensor:
    """A1111's ``aesthetic_clip.py`` loop in float64 on a copy, CLIP's text embedding read at ``pool_at``."""
    model = copy.deepcopy(encoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    target = e / e.norm(dim=-1, keepdim=True)
    for _ in range(steps):
        features = model(ids).last_hidden_state[:, pool_at] @ projection.T  # (1, E)
        features = features / features.norm(dim=-1, keepdim=True)
        loss = -(features @ target.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_an_added_token_does_not_move_the_loss_off_eos():
    encoder = _legacy_clip()
    projection = torch.randn(24, 32, dtype=torch.float64) / 6
    e = torch.randn(1, 24, dtype=torch.float64)
    ids = torch.tensor([[BOS, 320, 3540, ADDED, 530, 320, 2977, EOS] + [EOS] * 69])
    ours = personalize_text_encoder(encoder, ids, e, steps=5, lr=1e-2, weight=1.0, projection=projection)
    at_eos = _reference(encoder, ids, e, projection, pool_at=7, steps=5, lr=1e-2)
    at_added = _reference(encoder, ids, e, projection, pool_at=3, steps=5, lr=1e-2)
    assert (at_eos - at_added).abs().max() > 0.1  # (the two readings differ: the test can tell them apart)
    torch.testing.assert_close(ours, at_eos, rtol=0, atol=1e-10)
    # the tokenizer's <eos> given explicitly: the same
    again = personalize_text_encoder(encoder, ids, e, steps=5, lr=1e-2, weight=1.0, projection=projection, eos_id=EOS)
    torch.testing.assert_close(again, at_eos, rtol=0, atol=1e-10)


def test_without_an_added_token_the_legacy_reading_is_unchanged():
    """No added id: transformers' largest-id pooling and the <eos> reading are the same state, bit for bit."""
    encoder = _legacy_clip()
    projection = torch.randn(24, 32, dtype=torch.float64) / 6
    e = torch.randn(1, 24, dtype=torch.float64)
    ids = torch.tensor([[BOS, 320, 3540, 530, EOS] + [EOS] * 72])
    ours = personalize_text_encoder(encoder, ids, e, steps=3, lr=1e-2, weight=1.0, projection=projection)
    model = copy.deepcopy(encoder)  # (transformers' own pooled output)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        features = model(ids).pooler_output @ projection.T
        loss = -((features / features.norm(dim=-1, keepdim=True)) @ (e / e.norm()).T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(ours, model(ids).last_hidden_state, rtol=0, atol=1e-10)


def test_emphasis_is_read_not_tokenised(tmp_path):
    """A1111's hook gets the emphasised conditioning ``z`` (weights applied, mean restored) and the ids the emphasis
    leaves; the personalisation runs on those ids (it tokenised the brackets and weights as words before)."""
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=75)
    projection = torch.randn(16, 32) / 6
    e = torch.randn(16)
    prompt = "a (castle:1.3) on a hill, [fog]"
    cond = aesthetic_conditioning(system, [prompt], e, projection=projection, aesthetic_steps=3, lr=1e-2, weight=0.7)
    clean_ids = system.tokenize([without_emphasis(prompt)])
    emphasised = system.prompt_condition(prompt)
    plain = system.condition(clean_ids)
    assert (emphasised - plain).abs().max() > 1e-4  # (the emphasis changes the base: the test can tell)
    expected = personalize_text_encoder(system.text_encoder, clean_ids, e, projection=projection, steps=3, lr=1e-2,
                                        weight=0.7, base=emphasised)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    literal = personalize_text_encoder(system.text_encoder, system.tokenize([prompt]), e, projection=projection,
                                       steps=3, lr=1e-2, weight=0.7, base=system.condition(system.tokenize([prompt])))
    assert (cond - literal).abs().max() > 1e-4


def test_an_aesthetic_folder_reads_the_extensions_image_types(tmp_path):
    """The A1111 extension's folder reader takes png, jpg, jpeg, gif, tiff, webp (``check_is_valid_image_file``):
    a GIF or TIFF is one of the images of the mean (sdadapt skipped them, silently changing the embedding)."""
    from PIL import Image

    from sdadapt.aesthetic import aesthetic_embedding_from_folder, image_files
    from sdadapt.images import read_image

    rng = torch.Generator().manual_seed(0)
    pixels = [(torch.rand(20, 24, 3, generator=rng) * 255).to(torch.uint8).numpy() for _ in range(3)]
    for name, array in zip(("a.png", "b.gif", "c.TIFF"), pixels):
        Image.fromarray(array).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.gif", "c.TIFF"]

    def encoder(images):  # (B, 3, 8, 8) -> (B, 4): any fixed function of the pixels
        return images.flatten(1)[:, :4] * 3 + 1

    mean = aesthetic_embedding_from_folder(tmp_path, encoder, size=8)
    each = torch.cat([encoder(read_image(tmp_path / n, size=8, alpha="drop")[None]) for n in ("a.png", "b.gif", "c.TIFF")])
    torch.testing.assert_close(mean.reshape(-1), each.mean(0).reshape(-1))
