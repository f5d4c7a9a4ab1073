"""The embedding table: new token rows on any text encoder, only they train, removal is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from embedding_models import (
    LDMTransformerEmbedder,
    OpenCLIPLike,
    ids_of,
    tiny_clip_text,
    tiny_tokenizer,
)
from torch import nn

import sdadapt
from sdadapt.embeddings import (
    Embedding,
    TokenRows,
    expand_prompt,
    find_token_embedding,
    initial_embedding,
    initial_rows,
    inject_embedding,
    splice_rows,
)
from sdadapt.toy import ToyTextEncoder, ToyTokenizer


def _toy_encoder(seed: int = 0) -> ToyTextEncoder:
    torch.manual_seed(seed)
    return ToyTextEncoder(vocab_size=len(ToyTokenizer())).eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def clip_parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(folder)
    return folder


def _fresh_clip_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------ pure functions
def test_splice_rows_matches_a_naive_loop_in_float64():
    g = torch.Generator().manual_seed(0)
    output = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    rows = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(-1, 4, (3, 7), generator=g)
    got = splice_rows(output, slots, rows)
    want = output.clone()
    for b in range(3):
        for i in range(7):
            if slots[b, i] >= 0:
                want[b, i] = rows[slots[b, i]].detach()
    assert torch.equal(got.detach(), want)
    got.sum().backward()  # each row's gradient counts its positions
    counts = torch.bincount(slots[slots >= 0], minlength=4).double()
    assert torch.equal(rows.grad, counts[:, None].expand(4, 5))


def test_initial_rows_cycle_the_init_tokens_and_random_follows_the_table_scale():
    table = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    rows = initial_rows(table, [3, 5], 5)
    assert torch.equal(rows, table[[3, 5, 3, 5, 3]])
    assert torch.equal(initial_rows(table, [6], 3), table[[6, 6, 6]])  # diffusers: one initializer token for all
    big = torch.randn(4000, 16) * 3.0
    random = initial_rows(big, None, 64, generator=torch.Generator().manual_seed(0))
    assert random.shape == (64, 16) and 2.5 < float(random.std()) < 3.5
    with pytest.raises(ValueError, match="at least one vector"):
        initial_rows(table, [1], 0)
    with pytest.raises(ValueError, match="outside"):
        initial_rows(table, [99], 1)


def test_expand_prompt_follows_diffusers_and_is_idempotent():
    assert expand_prompt("a <sks> dog", "<sks>", 3) == "a <sks> <sks>_1 <sks>_2 dog"
    assert expand_prompt("a <sks> dog", "<sks>", 1) == "a <sks> dog"
    once = expand_prompt("<sks>, <sks> and a cat", "<sks>", 2)
    assert once == "<sks> <sks>_1, <sks> <sks>_1 and a cat"
    assert expand_prompt(once, "<sks>", 2) == once


def test_embedding_value_checks_and_normalises():
    e = Embedding("x", {"text_encoder": torch.ones(4)})
    assert e.vectors["text_encoder"].shape == (1, 4) and e.count == 1 and e.dims == {"text_encoder": 4}
    sdxl = Embedding("y", {"clip_g": torch.ones(2, 6), "clip_l": torch.ones(2, 4)})
    assert sdxl.is_sdxl and sdxl.encoders == ("clip_l", "clip_g")
    with pytest.raises(ValueError, match="neither"):
        Embedding("x", {"emb_params": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="same number of vectors"):
        Embedding("x", {"clip_l": torch.ones(1, 4), "clip_g": torch.ones(2, 6)})
    with pytest.raises(ValueError, match="trigger word"):
        Embedding("", {"text_encoder": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="floating-point"):
        Embedding("x", {"text_encoder": torch.ones(1, 4, dtype=torch.long)})


# ------------------------------------------------------------------------------ finding the table
def test_find_token_embedding_on_every_encoder_layout():
    clip = tiny_clip_text()
    for module, expected in [
        (clip, clip.get_input_embeddings()),
        (tiny_clip_text(projection=True), None),
        (_toy_encoder(), None),
        (LDMTransformerEmbedder(clip), clip.get_input_embeddings()),
        (OpenCLIPLike(), None),
    ]:
        name, table = find_token_embedding(module)
        assert isinstance(table, nn.Embedding) and "position" not in name
        if expected is not None:
            assert table is expected
    assert find_token_embedding(OpenCLIPLike())[0] == "model.token_embedding"
    assert find_token_embedding(LDMTransformerEmbedder(clip))[0].startswith("transformer.")
    bare = nn.Embedding(5, 3)
    assert find_token_embedding(bare) == ("", bare)
    both = nn.ModuleDict({"a": LDMTransformerEmbedder(tiny_clip_text()), "b": OpenCLIPLike()})
    with pytest.raises(ValueError, match="several token-embedding tables") as info:
        find_token_embedding(both)
    assert "a.transformer" in str(info.value) and "b.model.token_embedding" in str(info.value)


# ------------------------------------------------------------------------------ the toy encoder
def test_toy_injection_equals_overwritten_rows_and_removes_exactly():
    encoder, tok = _toy_encoder(), ToyTokenizer()
    before = _state(encoder)
    vectors = torch.randn(2, 64)
    handle = inject_embedding(encoder, tok, Embedding("<sks>", {"text_encoder": vectors}))
    spare = tok.free_spare_ids  # the next free ones now exclude <sks>'s
    ids = tok(["a <sks> circle", "a red circle"])
    assert handle.token_ids["text_encoder"] == [tok.token_id("<new0>"), tok.token_id("<new1>")]
    assert ids[0, 2:4].tolist() == handle.token_ids["text_encoder"] and tok.token_id("<new0>") not in spare()
    reference = copy.deepcopy(encoder)
    handle.remove()
    with torch.no_grad():
        reference.get_input_embeddings().weight[[tok.token_id("<new0>"), tok.token_id("<new1>")]] = vectors
    handle = inject_embedding(encoder, tok, Embedding("<sks>", {"text_encoder": vectors}))
    with torch.no_grad():
        got, want = encoder(ids), reference(ids)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert _same_state(encoder, before)  # the table's bits and keys never change
    handle.remove()
    assert _same_state(encoder, before) and tok.added == {}
    assert tok.encode("a <sks> circle")[2] == tok.unk_id


def test_toy_trigger_words_use_their_own_id_then_spare_tokens():
    tok = ToyTokenizer()
    encoder = _toy_encoder()
    existing = inject_embedding(encoder, tok, Embedding("purple", {"text_encoder": torch.zeros(2, 64)}))
    assert existing.token_ids["text_encoder"] == [tok.token_id("purple"), tok.token_id("<new0>")]
    spare = inject_embedding(encoder, tok, Embedding("<new3>", {"text_encoder": torch.zeros(2, 64)}))
    assert spare.token_ids["text_encoder"] == [tok.token_id("<new3>"), tok.token_id("<new1>")]
    with pytest.raises(ValueError, match="spare token"):
        inject_embedding(encoder, tok, Embedding("<sks>", {"text_encoder": torch.zeros(20, 64)}))
    with pytest.raises(ValueError, match="already loaded"):
        inject_embedding(encoder, tok, Embedding("purple", {"text_encoder": torch.zeros(1, 64)}))
    spare.remove()
    existing.remove()
    assert tok.added == {} and len(tok.free_spare_ids()) == 16


def test_only_the_new_rows_get_gradients_and_optimiser_state():
    encoder, tok = _toy_encoder(), ToyTokenizer()
    encoder.requires_grad_(False)
    table = encoder.get_input_embeddings().weight
    bits = table.detach().clone()
    start = initial_embedding(encoder, tok, "<sks>", vectors=3, init_word="red")
    assert torch.equal(start.vectors["text_encoder"], bits[[tok.token_id("red")] * 3])
    handle = inject_embedding(encoder, tok, start, trainable=True)
    params = handle.parameters()
    assert [tuple(p.shape) for p in params] == [(3, 64)] and params[0].dtype == torch.float32
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = tok(["a <sks> circle on the left", "a <sks> square"])
    for _ in range(3):
        loss = encoder(ids)[0].pow(2).mean()
        loss.backward()
        assert table.grad is None and params[0].grad is not None and params[0].grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(table, bits)
    assert not torch.equal(params[0].detach(), start.vectors["text_encoder"])
    assert [tuple(s["exp_avg"].shape) for s in optimizer.state.values()] == [(3, 64)]
    trained = handle.embedding()
    assert torch.equal(trained.vectors["text_encoder"], params[0].detach())
    handle.remove()


# ------------------------------------------------------------------------------ transformers CLIP
def test_clip_injection_equals_a_resized_table_and_restores_the_tokenizer(clip_parts):
    clip, tok = tiny_clip_text(), _fresh_clip_tokenizer(clip_parts)
    before, vocab_before, ids_before = _state(clip), dict(tok.get_vocab()), ids_of(tok, ["a <sks> cat"])
    vectors = torch.randn(3, 32)
    handle = inject_embedding(clip, tok, Embedding("<sks>", {"text_encoder": vectors}))
    assert handle.token_ids["text_encoder"] == [514, 515, 516] and not handle.expands_itself
    prompt = handle.expand("a <sks> cat")
    assert prompt == "a <sks> <sks>_1 <sks>_2 cat"
    ids = ids_of(tok, [prompt])
    assert ids[0, 2:5].tolist() == [514, 515, 516]
    # the naive reference: what diffusers does — a bigger table with the rows written in
    reference = copy.deepcopy(clip)
    reference.resize_token_embeddings(517)
    with torch.no_grad():
        reference.get_input_embeddings().weight[514:517] = vectors
        got, want = clip(ids), reference(ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)
    assert _same_state(clip, before)
    handle.remove()
    assert tok.get_vocab() == vocab_before and len(tok) == 514 and torch.equal(ids_of(tok, ["a <sks> cat"]), ids_before)
    assert _same_state(clip, before)


def test_two_embeddings_on_one_clip_encoder_and_removal_order(clip_parts):
    clip, tok = tiny_clip_text(), _fresh_clip_tokenizer(clip_parts)
    a = inject_embedding(clip, tok, Embedding("<a>", {"text_encoder": torch.randn(1, 32)}))
    b = inject_embedding(clip, tok, Embedding("<b>", {"text_encoder": torch.randn(2, 32)}))
    ids = ids_of(tok, [b.expand("<a> and <b>")])
    reference = copy.deepcopy(clip)
    reference.resize_token_embeddings(len(tok))
    with torch.no_grad():
        w = reference.get_input_embeddings().weight
        w[a.token_ids["text_encoder"]] = a.rows["text_encoder"].rows
        w[b.token_ids["text_encoder"]] = b.rows["text_encoder"].rows
        torch.testing.assert_close(clip(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has the token"):
        inject_embedding(clip, tok, Embedding("<a>", {"text_encoder": torch.randn(1, 32)}))
    with pytest.raises(RuntimeError, match="reverse order"):
        a.remove()
    b.remove()
    a.remove()
    assert len(tok) == 514


def test_ldm_named_encoders_take_rows_too(clip_parts):
    tok = _fresh_clip_tokenizer(clip_parts)
    clip = tiny_clip_text()
    ldm = LDMTransformerEmbedder(clip)
    open_clip = OpenCLIPLike(vocab=514, dim=24, length=12)
    for module, dim in ((ldm, 32), (open_clip, 24)):
        vectors = torch.randn(2, dim)
        handle = inject_embedding(module, tok, Embedding("<sks>", {"text_encoder": vectors}))
        ids = ids_of(tok, [handle.expand("a <sks>")])
        _, table = find_token_embedding(module)
        with torch.no_grad():
            rows = torch.cat([table.weight, vectors])  # the naive bigger table
            want = nn.functional.embedding(ids, rows)
            got = table(ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        handle.remove()


def test_sdxl_rows_for_both_encoders_train_together(clip_parts):
    tok = _fresh_clip_tokenizer(clip_parts)
    clip_l, clip_g = tiny_clip_text(hidden=32), tiny_clip_text(hidden=48, projection=True, seed=1)
    for m in (clip_l, clip_g):
        m.requires_grad_(False)
    with pytest.raises(ValueError, match="both text encoders"):
        inject_embedding(clip_l, tok, Embedding("<s>", {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 48)}))
    start = initial_embedding((clip_l, clip_g), tok, "<s>", vectors=2, init_word="cat", sdxl=True)
    assert start.dims == {"clip_l": 32, "clip_g": 48} and start.count == 2
    handle = inject_embedding({"clip_l": clip_l, "clip_g": clip_g}, tok, start, trainable=True)
    assert handle.token_ids["clip_l"] == handle.token_ids["clip_g"]  # one shared tokenizer: one set of ids
    ids = ids_of(tok, [handle.expand("a <s> photo")])
    loss = clip_l(ids).last_hidden_state.pow(2).mean() + clip_g(ids).text_embeds.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    assert clip_l.get_input_embeddings().weight.grad is None and clip_g.get_input_embeddings().weight.grad is None
    assert set(handle.embedding().vectors) == {"clip_l", "clip_g"}
    handle.remove()
    assert len(tok) == 514


def test_wrong_width_names_both_widths(clip_parts):
    clip, tok = tiny_clip_text(), _fresh_clip_tokenizer(clip_parts)
    with pytest.raises(ValueError) as info:
        inject_embedding(clip, tok, Embedding("<sks>", {"text_encoder": torch.zeros(1, 768)}))
    message = str(info.value)
    assert "768 wide" in message and "514×32" in message and "another model" in message
    assert len(tok) == 514  # nothing was added


def test_token_rows_is_a_thin_holder():
    table = nn.Embedding(6, 3)
    rows = TokenRows(table, [2, 7], torch.ones(2, 3))
    out = table(torch.tensor([[2, 7, 1]]))
    assert torch.equal(out[0, :2], torch.ones(2, 3)) and torch.equal(out[0, 2], table.weight[1])
    rows.remove()
    assert not rows.attached
    with pytest.raises(IndexError):
        table(torch.tensor([[7]]))  # the hooks are gone: id 7 is outside the table again
    with pytest.raises(ValueError, match="6×3"):
        TokenRows(table, [7], torch.ones(1, 4))


def test_top_level_names_are_exported():
    for name in ("Embedding", "load_embedding", "save_embedding", "inject_embedding", "EmbeddingHandle"):
        assert name in sdadapt.__all__ and hasattr(sdadapt, name)
