"""The token-id cache (sdadapt.token_id_cache) behind DiffusersSystem.tokenize / tokenize_weighted:
cached ids equal freshly tokenised ones for every kind of caption, the key is the exact text plus
the tokenizer's state and the length, the rows stay on the host and the cache stays bounded."""

from __future__ import annotations

import random

import pytest
import torch

import sdadapt

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tiny_systems import tiny_diffusers_system

from sdadapt.clip_tokenizer import CLIPTokenizer
from sdadapt.diffusers_system import DiffusersSystem, _token_ids
from sdadapt.prompt_weights import weighted_token_ids
from sdadapt.text_chunks import long_prompt_length
from sdadapt.token_id_cache import TokenIdCache, tokenizer_state

_WORDS = ["a", "red", "Cat", "cat", "photo", "of", "the", "dog", "ö", "ﬁsh", "fish", "!!", "tag_1", "1girl", "sky"]


def _captions(count: int, seed: int) -> list[str]:
    """Plain, weighted, empty, white-space and case variants, and long (> 225 token) captions."""
    rng = random.Random(seed)
    out = ["", " ", "a cat", "a  cat", "a cat ", "A Cat", "a\tcat", "(a cat)", "(a cat:1.5)", "[a cat]", "a (cat)",
           "\\(a cat\\)", " ".join(rng.choice(_WORDS) for _ in range(300))]
    while len(out) < count:
        words = [rng.choice(_WORDS) for _ in range(rng.choice([1, 3, 8, 40, 120]))]
        if rng.random() < 0.4:
            i = rng.randrange(len(words))
            words[i] = rng.choice([f"({words[i]}:{rng.choice([0.5, 1.3])})", f"({words[i]})", f"[{words[i]}]"])
        out.append(rng.choice([" ", ", ", "  "]).join(words))
    return out


def _fast(system: DiffusersSystem, folder) -> DiffusersSystem:
    """``system`` with the fast tokenizer of ``folder`` (transformers 4's ``CLIPTokenizer`` is the slow one; these
    tests change the fast one's backend)."""
    if not getattr(system.tokenizer, "is_fast", False):
        system.tokenizer = transformers.CLIPTokenizerFast.from_pretrained(folder)
    return system


def _uncached(system: DiffusersSystem, prompts: list[str], *, weighted: bool) -> tuple[torch.Tensor, ...]:
    """What tokenize / tokenize_weighted gave before the cache: every prompt tokenised now."""
    length = long_prompt_length(system.max_token_length, window=int(system.tokenizer.model_max_length))
    tokenizers = (system.tokenizer, system.tokenizer_2) if system.is_sdxl else (system.tokenizer,)
    if weighted:
        pairs = [weighted_token_ids(t, prompts, length) for t in tokenizers]
        return tuple(torch.stack(parts, dim=1) if system.is_sdxl else parts[0] for parts in zip(*pairs))
    ids = [_token_ids(t, prompts, length) for t in tokenizers]
    return (torch.stack(ids, dim=1) if system.is_sdxl else ids[0],)


def _cached(system: DiffusersSystem, prompts: list[str], *, weighted: bool) -> tuple[torch.Tensor, ...]:
    if weighted:
        out = system.tokenize_weighted(prompts)
        return out["ids"], out["weights"]
    return (system.tokenize(prompts),)


def _check_batches(system: DiffusersSystem, captions: list[str], *, weighted: bool, batches: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(batches):
        batch = [rng.choice(captions) for _ in range(rng.choice([1, 2, 4, 7]))]
        got, want = _cached(system, batch, weighted=weighted), _uncached(system, batch, weighted=weighted)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), batch


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return tiny_diffusers_system(tmp_path_factory.mktemp("sd1"), max_token_length=225)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("max_token_length", [75, 225])
def test_cached_ids_equal_uncached_for_many_captions_and_the_cache_stays_bounded(sd1, weighted, max_token_length):
    """Shuffled batches (repeats, eviction from a small cache) give the uncached ids; empty, white-space,
    case, emphasis and long captions included; the rows live on the host, never more than the bound."""
    sd1.max_token_length = max_token_length
    cache = TokenIdCache(max_entries=16)
    if weighted:
        sd1.weighted_token_cache = cache
    else:
        sd1.token_cache = cache
    captions = _captions(60, seed=max_token_length)
    _check_batches(sd1, captions, weighted=weighted, batches=60, seed=1)
    assert 0 < len(cache) <= 16
    assert all(t.device.type == "cpu" for t in cache.cached_tensors())
    assert sd1.tokenize(captions[:3]).shape[-1] == long_prompt_length(max_token_length, window=77)


def test_sdxl_pairs_and_sdadapts_own_tokenizer(tmp_path):
    sdxl = tiny_diffusers_system(tmp_path / "xl", max_token_length=150, sdxl=True)
    captions = _captions(30, seed=3)
    for weighted in (False, True):
        _check_batches(sdxl, captions, weighted=weighted, batches=20, seed=2)
    assert sdxl.tokenize(captions[:2]).shape == (2, 2, 152)
    ours = CLIPTokenizer.from_folder(tmp_path / "xl" / "tok")
    other = DiffusersSystem(sdxl.unet, sdxl.vae, sdxl.text_encoder, ours, {"prediction_type": "epsilon"},
                            max_token_length=150)
    for weighted in (False, True):
        _check_batches(other, captions, weighted=weighted, batches=20, seed=4)
    assert len(other.token_cache) > 0  # (sdadapt's tokenizer is cached too)


def test_the_key_is_the_exact_text(tmp_path):
    """A tokenizer that keeps case and white space apart: captions differing only in those give their
    own ids (a key folded to lower case or stripped would hand one caption the other's ids)."""
    from tokenizers import normalizers

    system = _fast(tiny_diffusers_system(tmp_path, max_token_length=75), tmp_path / "tok")
    system.tokenizer._tokenizer.normalizer = normalizers.NFC()  # (no lower case)
    system.tokenizer._tokenizer.pre_tokenizer = transformers.CLIPTokenizerFast(
        str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"))._tokenizer.pre_tokenizer
    pairs = [("a Cat", "a cat"), ("cat", "CAT")]
    for a, b in pairs:
        want_a, want_b = _uncached(system, [a], weighted=False)[0], _uncached(system, [b], weighted=False)[0]
        assert not torch.equal(want_a, want_b)  # (the tokenizer tells them apart)
        assert torch.equal(system.tokenize([a, b, a]), torch.cat([want_a, want_b, want_a]))
        assert torch.equal(system.tokenize([b]), want_b)
    weighted = system.tokenize_weighted(["(cat:1.5)", "cat", "(cat)"])
    assert weighted["weights"][:, 1].tolist() == pytest.approx([1.5, 1.0, 1.1])


def test_a_changed_tokenizer_or_length_is_seen(tmp_path):
    """Added tokens (an embedding), a swapped tokenizer backend of the same size (an embedding removed
    and another added), a new padding token and another max_token_length: ids as tokenised now."""
    from tokenizers import Tokenizer

    system = _fast(tiny_diffusers_system(tmp_path, max_token_length=75), tmp_path / "tok")
    tok = system.tokenizer
    prompts = ["a <zz> cat", "a <yy> dog", "plain"]
    before = system.tokenize(prompts)
    assert torch.equal(before, _uncached(system, prompts, weighted=False)[0])
    plain_backend = tok._tokenizer.to_str()
    tok.add_tokens(["<zz>"])
    with_zz = system.tokenize(prompts)
    assert torch.equal(with_zz, _uncached(system, prompts, weighted=False)[0]) and not torch.equal(with_zz, before)
    tok._tokenizer = Tokenizer.from_str(plain_backend)  # (what removing an embedding does)
    tok.add_tokens(["<yy>"])  # the same vocabulary size as with <zz>
    with_yy = system.tokenize(prompts)
    assert torch.equal(with_yy, _uncached(system, prompts, weighted=False)[0]) and not torch.equal(with_yy, with_zz)
    tok.pad_token = "!"
    assert torch.equal(system.tokenize(prompts), _uncached(system, prompts, weighted=False)[0])
    system.max_token_length = 150
    assert system.tokenize(prompts).shape == (3, 152)
    assert tokenizer_state(object()) is None  # (a tokenizer whose state is unknown is not cached)


def test_a_slow_tokenizers_added_and_removed_tokens_are_seen(tmp_path):
    """transformers 4's slow ``CLIPTokenizer``: an embedding's tokens added in place, removed (its added-token table
    and trie replaced), another of the same count added: ids as tokenised now, each time."""
    system = tiny_diffusers_system(tmp_path, max_token_length=75)
    tok = system.tokenizer
    if getattr(tok, "is_fast", True):
        pytest.skip("transformers 5 has no slow CLIPTokenizer")
    prompts = ["a <zz> cat", "a <yy> dog", "plain"]
    before = system.tokenize(prompts)
    assert tokenizer_state(tok) is not None and len(system.token_cache) == 3
    handle = sdadapt.inject_embedding(system.text_encoder, tok, sdadapt.Embedding("<zz>", {"text_encoder": torch.zeros(1, 32)}))
    with_zz = system.tokenize(prompts)
    assert torch.equal(with_zz, _uncached(system, prompts, weighted=False)[0]) and not torch.equal(with_zz, before)
    handle.remove()
    assert torch.equal(system.tokenize(prompts), before)
    handle = sdadapt.inject_embedding(system.text_encoder, tok, sdadapt.Embedding("<yy>", {"text_encoder": torch.zeros(1, 32)}))
    with_yy = system.tokenize(prompts)  # (the same vocabulary size as with <zz>)
    assert torch.equal(with_yy, _uncached(system, prompts, weighted=False)[0]) and not torch.equal(with_yy, with_zz)
    handle.remove()


def test_a_textual_inversion_run_tokenises_its_trigger(tmp_path):
    """Inject an embedding after captions were cached: the trigger's new ids; removed: the old ones."""
    from sdadapt.methods import prepare_textual_inversion

    system = tiny_diffusers_system(tmp_path, max_token_length=75)
    prompts = ["a photo of sks", "sks"]
    before = system.tokenize(prompts)
    adaptation = prepare_textual_inversion(system, token="sks", init_word="cat", vectors=2)
    during = adaptation.tokenize(prompts)
    assert torch.equal(during, _uncached(system, [adaptation.expand(p) for p in prompts], weighted=False)[0])
    assert not torch.equal(during, before)
    adaptation.remove()
    assert torch.equal(system.tokenize(prompts), before)


def test_the_cache_itself():
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(list(texts))
        ids = torch.tensor([[len(t), ord(t[0]) if t else 0] for t in texts], dtype=torch.long).reshape(len(texts), 2)
        return ids, ids.float() / 2

    cache = TokenIdCache(max_entries=3)
    ids, halves = cache.lookup(["ab", "c", "ab"], encode, state=(1,))
    assert ids.tolist() == [[2, 97], [1, 99], [2, 97]] and torch.equal(halves, ids.float() / 2)
    assert calls == [["ab", "c"]]  # each new caption encoded once
    cache.lookup(["c", "ab"], encode, state=(1,))
    assert calls == [["ab", "c"]]
    cache.lookup(["d", "e"], encode, state=(1,))  # "c" was used before "ab": "c" is dropped first... then "ab"
    assert len(cache) == 3 and "c" not in cache and "ab" in cache
    cache.lookup(["x", "y", "z", "w"], encode, state=(1,))  # a batch larger than the bound still works
    assert len(cache) == 3
    cache.lookup(["ab"], encode, state=(2,))  # another state: everything encoded again
    assert calls[-1] == ["ab"] and len(cache) == 1
    assert [t.shape for t in cache.lookup([], encode, state=(2,))] == [(0, 2), (0, 2)]
    with pytest.raises(ValueError, match="one row per caption"):
        cache.lookup(["q"], lambda texts: (torch.zeros(2, 3),), state=(2,))
    with pytest.raises(ValueError, match="at least one"):
        TokenIdCache(max_entries=0)


def test_the_toy_system_caches_its_ids_and_sees_added_words():
    from sdadapt.toy.system import build_toy

    system = build_toy(seed=0)
    captions = ["a red circle", "A  Red circle", "", "a sks square", "sks", "a blue triangle on the left"]
    rng = random.Random(0)
    for _ in range(20):
        batch = [rng.choice(captions) for _ in range(rng.choice([1, 4]))]
        assert torch.equal(system.tokenize(batch), system.tokenizer(batch))
    before = system.tokenize(["a sks square"])
    system.tokenizer.add_word("sks", system.tokenizer.free_spare_ids()[:2])  # (a toy textual inversion)
    during = system.tokenize(["a sks square"])
    assert torch.equal(during, system.tokenizer(["a sks square"])) and not torch.equal(during, before)
    system.tokenizer.remove_word("sks")
    assert torch.equal(system.tokenize(["a sks square"]), before)
    assert all(t.device.type == "cpu" for t in system.token_cache.cached_tensors())


def test_the_toy_cache_keeps_its_captions_while_a_word_is_added():
    """The toy's state holds its added-word table as nested tuples, built anew per call: equal tables
    are the same state (compared by value), so an added word does not empty the cache at every batch."""
    from sdadapt.toy.system import build_toy

    system = build_toy(seed=0)
    system.tokenizer.add_word("sks", system.tokenizer.free_spare_ids()[:2])
    system.tokenize(["a red circle"])
    system.tokenize(["a sks square"])
    assert len(system.token_cache) == 2
    system.tokenizer.remove_word("sks")
    system.tokenizer.add_word("sks", system.tokenizer.free_spare_ids()[2:4])  # other ids, same word: a new state
    assert torch.equal(system.tokenize(["a sks square"]), system.tokenizer(["a sks square"]))
    assert len(system.token_cache) == 1
