"""Embedding names of several tokens, matched as A1111 matches them (``generate``'s ``inject_embedding(..., a1111=True)``).

A1111 (``modules/textual_inversion/textual_inversion.py`` ``EmbeddingDatabase.register_embedding_by_name`` /
``find_embedding_at_position``, called from ``modules/sd_hijack_clip.py`` ``tokenize_line``) looks an embedding up by
the token ids of its name in the tokenized prompt, so ``tom - cat`` is ``tom-cat`` (same ids) and ``tom-cats`` is not.
The rows sdadapt feeds the encoder are compared with the transcription in ``test_format_leftovers._a1111_rows``.
"""

from __future__ import annotations

import pytest
import torch
from embedding_models import tokenizer_snapshot
from test_format_leftovers import _a1111_rows, _MERGES

import sdadapt


@pytest.fixture(scope="module")
def tokenizer():
    from sdadapt.clip_tokenizer import CLIPTokenizer

    return CLIPTokenizer(_MERGES, max_length=77).to_transformers()


def _rows(tokenizer, name: str, count: int, prompt: str, *, a1111: bool):
    """(sdadapt's encoder input rows and weights, the transcription's) for ``prompt`` with the embedding ``name``."""
    from sdadapt.prompt_chunks import prompt_chunks

    table = torch.nn.Embedding(len(tokenizer) + 8, 8)
    vectors = torch.randn(count, 8, generator=torch.Generator().manual_seed(count))
    want = _a1111_rows(tokenizer, table, prompt, name, vectors)
    handle = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding(name, {"text_encoder": vectors}), a1111=a1111)
    try:
        expanded = handle.expand(prompt)
        assert handle.expand(expanded) == expanded  # (idempotent)
        ids, weights = prompt_chunks(tokenizer, expanded)
        with torch.no_grad():
            got = table(ids).double()
    finally:
        handle.remove()
    return (got, weights), (want[0], want[1].float())


_CASES = [
    ("tom-cat", "a tom - cat, a tom-cats and tom--cat", 1),  # (the same ids / other ids)
    ("tom-cat", "a tom-cat, (tom-cat:1.2) and [TOM-CAT] tom-cat-cat", 4),  # (weights, case, a run followed by more)
    ("tom-cat", " ".join(["x"] * 73) + " tom-cat and tom - cat", 2),  # (k vectors that do not fit start the next chunk)
    ("TomCat", "a tomcat, (TOMCAT:1.2), tomcats, tom cat", 2),  # (tom + cat</w>; 'tom cat' is tom</w> cat</w>)
]


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(("name", "prompt", "uses"), _CASES, ids=["spellings", "weights", "chunk-edge", "bpe-pieces"])
def test_a_several_token_name_gives_a1111s_rows_and_weights(tokenizer, name, prompt, uses, count):
    (got, weights), (want, want_weights) = _rows(tokenizer, name, count, prompt, a1111=True)
    first = torch.randn(count, 8, generator=torch.Generator().manual_seed(count))[0].double()
    assert sum(torch.equal(row, first) for chunk in want for row in chunk) == uses  # (the transcription's matches)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


def test_the_default_stays_diffusers_added_token_which_differs_from_a1111(tokenizer):
    """Without ``a1111`` the name is diffusers' added token (pipelines match it as text): ``tom-cats`` holds it.
    This is the difference ``a1111=True`` removes (and why generate passes it)."""
    (got, _), (want, _) = _rows(tokenizer, "tom-cat", 1, "a tom-cats", a1111=False)
    assert got.shape == want.shape and not torch.equal(got, want)


def test_a1111_mode_adds_only_the_aliases_and_removes_them_exactly(tokenizer):
    serialized, before = tokenizer_snapshot(tokenizer), set(tokenizer.get_added_vocab())
    table = torch.nn.Embedding(len(tokenizer) + 8, 8)
    for a1111, tokens in ((False, ["tom-cat", "tom-cat_1"]), (True, ["<emb-tom-cat>", "<emb-tom-cat>_1"])):
        handle = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(2, 8)}),
                                          a1111=a1111)
        try:
            assert sorted(set(tokenizer.get_added_vocab()) - before) == tokens
            assert handle.token_ids["text_encoder"] == tokenizer.convert_tokens_to_ids(tokens)
        finally:
            handle.remove()
        assert tokenizer_snapshot(tokenizer) == serialized


def test_generates_embedding_loader_matches_by_token_ids(tokenizer, tmp_path):
    """``python -m sdadapt generate --embedding`` / ``--embeddings-dir`` inject through ``_inject_embedding_file``:
    it must use A1111's matching (a regression to the added-token default would expand ``tom-cats`` too)."""
    from types import SimpleNamespace

    from sdadapt.jobs.generate import _inject_embedding_file

    path = tmp_path / "tom-cat.safetensors"
    sdadapt.save_embedding(path, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(2, 8)}), format="a1111")
    system = SimpleNamespace(text_encoder=torch.nn.Embedding(len(tokenizer) + 8, 8), tokenizer=tokenizer)
    handle = _inject_embedding_file(system, path)
    try:
        assert handle.expand("a tom - cat, (tom-cats:1.1)") == "a <emb-tom-cat> <emb-tom-cat>_1, (tom-cats:1.1)"
    finally:
        handle.remove()


def test_a_name_made_of_another_embeddings_token_is_refused(tokenizer):
    table = torch.nn.Embedding(len(tokenizer) + 8, 8)
    first = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(1, 8)}))
    try:
        with pytest.raises(sdadapt.embeddings.tokens.TriggerTakenError, match="another embedding's token"):
            sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("a tom-cat", {"text_encoder": torch.ones(1, 8)}),
                                     a1111=True)
    finally:
        first.remove()


def test_a_name_that_starts_inside_a_longer_word_keeps_that_words_first_piece(tokenizer):
    """'atom-cat' is a + tom</w> - cat</w>: A1111 keeps the word-inner piece 'a' and matches 'tom-cat' after it; a text
    rewrite 'a<emb-tom-cat>' would end that word ('a</w>'), so sdadapt matches it on the piece's token ids."""
    (got, _), (want, _) = _rows(tokenizer, "tom-cat", 1, "atom-cat", a1111=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- review R8 ---------------------------------------------------------------------------------------------------


def _a1111_scan(tokenizer, prompt: str, names: list[str]) -> list[str]:
    """A1111's tokens for a plain ``prompt`` (no emphasis) with the embeddings ``names`` loaded: a transcription of
    ``EmbeddingDatabase.register_embedding`` (``ids_lookup[first id]`` sorted by the ids' length, longest first) and
    ``find_embedding_at_position`` as ``tokenize_line`` calls it (left to right, going on after a match); an
    embedding is written ``<emb-NAME>``."""
    def tokenize(text):
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    lookup: dict[int, list] = {}
    for name in names:
        ids = tokenize(name)
        lookup[ids[0]] = sorted([*lookup.get(ids[0], []), (ids, name)], key=lambda x: len(x[0]), reverse=True)
    tokens, out, i = tokenize(prompt), [], 0
    while i < len(tokens):
        match = next(((ids, name) for ids, name in lookup.get(tokens[i], []) if tokens[i : i + len(ids)] == ids), None)
        if match is None:
            out.append(tokenizer.convert_ids_to_tokens(tokens[i]))
            i += 1
        else:
            out.append(f"<emb-{match[1].lower()}>")
            i += len(match[0])
    return out


def _chunk_tokens(tokenizer, prompt: str) -> list[str]:
    """The tokens generate's tokenizing gives ``prompt`` (``prompt_chunks``: the A1111 names matched by token ids in
    each emphasis piece), BOS / EOS / padding left out."""
    from sdadapt.prompt_chunks import prompt_chunks

    ids, _ = prompt_chunks(tokenizer, prompt)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.convert_ids_to_tokens([i for i in ids.reshape(-1).tolist() if i not in special])


def _generate_scan(tokenizer, prompt: str, names: list[str]) -> list[str]:
    """sdadapt's tokens for ``prompt`` with ``names`` injected (k = 1) in load order (``--embeddings-dir``:
    ``prompt_embedding_files``' sorted folder order) and expanded by generate's ``_expanded`` (the hires prompt's; the
    main prompt's loop in ``generate`` does the same: a fix must go to both)."""
    from sdadapt.jobs.generate import _expanded

    table = torch.nn.Embedding(len(tokenizer) + 16, 8)
    handles = []
    try:
        for name in names:
            handles.append(sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding(name, {"text_encoder": torch.ones(1, 8)}),
                                                    a1111=True))
        return _chunk_tokens(tokenizer, _expanded(prompt, handles))
    finally:
        for handle in reversed(handles):
            handle.remove()


def test_a_name_whose_ids_repeat_is_matched_left_to_right_without_overlap(tokenizer):
    """``cat-cat`` in ``cat-cat-cat``: A1111 takes the first three ids and goes on after them (no second, overlapping
    match); a scan that steps one token after a match would cut overlapping spans."""
    assert _generate_scan(tokenizer, "a cat-cat-cat, cat - cat - cat - cat", ["cat-cat"]) == \
        _a1111_scan(tokenizer, "a cat-cat-cat, cat - cat - cat - cat", ["cat-cat"])
    (got, weights), (want, want_weights) = _rows(tokenizer, "cat-cat", 2, "a cat-cat-cat, (cat-cat-cat-cat:1.2)", a1111=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


def test_a_name_at_the_very_end_and_start_of_the_prompt_is_matched(tokenizer):
    for prompt in ("tom-cat", "tom-cat, a tom - cat"):
        assert _generate_scan(tokenizer, prompt, ["tom-cat"]) == _a1111_scan(tokenizer, prompt, ["tom-cat"])


def test_names_that_do_not_overlap_are_each_matched_in_any_load_order(tokenizer):
    prompt = "a tom-cat, cat-tom and tom - cat"
    want = _a1111_scan(tokenizer, prompt, ["tom-cat", "cat-tom"])
    assert want.count("<emb-tom-cat>") == 2 and want.count("<emb-cat-tom>") == 1
    assert _generate_scan(tokenizer, prompt, ["tom-cat", "cat-tom"]) == want
    assert _generate_scan(tokenizer, prompt, ["cat-tom", "tom-cat"]) == want


def test_a_name_that_is_a_prefix_of_another_loses_to_the_longer_one_as_in_a1111(tokenizer):
    names = ["tom-cat", "tom-cat_v2"]  # (prompt_embedding_files' order: '-cat.' sorts before '-cat_')
    assert _a1111_scan(tokenizer, "a tom-cat_v2", names) == ["a</w>", "<emb-tom-cat_v2>"]
    assert _generate_scan(tokenizer, "a tom-cat_v2", names) == _a1111_scan(tokenizer, "a tom-cat_v2", names)


def test_a_one_token_embedding_inside_a_longer_name_leaves_no_alias_behind(tokenizer):
    table = torch.nn.Embedding(len(tokenizer) + 16, 8)
    cat = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("cat", {"text_encoder": torch.ones(2, 8)}), a1111=True)
    tomcat = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(1, 8)}),
                                      a1111=True)
    try:
        from sdadapt.jobs.generate import _expanded

        # (generate's order: 'cat.pt' < 'tom-cat.pt')
        assert _chunk_tokens(tokenizer, _expanded("a tom-cat", [cat, tomcat])) == ["a</w>", "<emb-tom-cat>"]
    finally:
        tomcat.remove()
        cat.remove()


def test_a_name_with_parentheses_leaves_the_prompt_as_a1111_parses_it(tokenizer):
    (got, weights), (want, want_weights) = _rows(tokenizer, "tom (1)", 1, "a tom (1) x", a1111=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


def test_sdxl_two_tokenizers_both_see_the_aliases_of_one_expansion():
    """SDXL (generate passes both encoders and both tokenizers): one ``expand`` serves both tokenizers; each must read
    the k aliases (its own added ids, which carry the vectors) where A1111 finds the name in the prompt."""
    from sdadapt.clip_tokenizer import CLIPTokenizer

    toks = [CLIPTokenizer(_MERGES, max_length=77).to_transformers() for _ in range(2)]
    tables = (torch.nn.Embedding(len(toks[0]) + 8, 8), torch.nn.Embedding(len(toks[1]) + 8, 12))
    vectors = {"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 12)}
    handle = sdadapt.inject_embedding(tables, tuple(toks), sdadapt.Embedding("tom-cat", vectors), a1111=True)
    try:
        expanded = handle.expand("a tom - cat, tom-cats")
        assert handle.expand(expanded) == expanded
        for key, tok in zip(("clip_l", "clip_g"), toks):
            ids = tok(expanded, add_special_tokens=False).input_ids
            assert ids[1:3] == handle.token_ids[key] and not set(ids[3:]) & set(handle.token_ids[key])
    finally:
        handle.remove()


@pytest.mark.parametrize("prompt", [
    "a [tom-cat:tom - cat:0.5], [dog|tom-cat] BREAK (tom-cat:1.2) AND [tom-cat::3] tom-cats:0.5",
    "[[tom-cat:dog:2]|tom-cat], \\(tom-cat\\), tom-cat_1 tom-cat",
])
def test_expanding_then_scheduling_is_scheduling_then_expanding(tokenizer, prompt):
    """Prompt editing, alternation, AND, BREAK and emphasis read the expanded prompt as they read the original: every
    scheduled text of ``expand(prompt)`` is ``expand`` of the original's scheduled text (what A1111 matches in)."""
    from sdadapt.prompt_guidance import plan_prompt

    table = torch.nn.Embedding(len(tokenizer) + 8, 8)
    handle = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(2, 8)}),
                                      a1111=True)
    try:
        expanded = handle.expand(prompt)
        assert "<emb-tom-cat> <emb-tom-cat>_1" in expanded
        got = plan_prompt(expanded, expanded, steps=6)
        want = plan_prompt(prompt, prompt, steps=6)
        assert len(got.parts) == len(want.parts)  # (texts equal after expand are encoded once: compare per part)
        for (g, g_weight), (w, w_weight) in zip(got.parts, want.parts):
            assert (g.ends, g_weight) == (w.ends, w_weight)
            assert [got.texts[i] for i in g.texts] == [handle.expand(want.texts[i]) for i in w.texts]
        assert got.negative.ends == want.negative.ends
        assert [got.negative_texts[i] for i in got.negative.texts] == \
            [handle.expand(want.negative_texts[i]) for i in want.negative.texts]
    finally:
        handle.remove()


def test_several_a1111_embeddings_remove_in_reverse_order_exactly_and_refuse_another_order(tokenizer):
    serialized = tokenizer_snapshot(tokenizer)
    table = torch.nn.Embedding(len(tokenizer) + 16, 8)
    handles = [sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding(name, {"text_encoder": torch.ones(k, 8)}),
                                        a1111=True) for name, k in (("cat", 2), ("tom-cat", 2), ("cat-tom", 1))]
    try:
        with pytest.raises(RuntimeError, match="reverse order"):
            handles[1].remove()
        assert handles[2].expand(handles[1].expand("tom-cat cat-tom")) == "<emb-tom-cat> <emb-tom-cat>_1 <emb-cat-tom>"
    finally:
        for handle in reversed(handles):
            handle.remove()
    assert tokenizer_snapshot(tokenizer) == serialized
    assert handles[0].expand("a cat") == "a cat"  # (removed: no aliases written)
