"""The shipped offline CLIP tokenizer tokenizes exactly like transformers' fast CLIP tokenizer (same vocabulary)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdadapt.clip_tokenizer import DEFAULT_VOCABULARY, CLIPTokenizer, split_words

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "A  PHOTO\tof   sks dog, (masterpiece:1.2), best quality!!",
    "I'm you're they've it's we'll he'd",
    "café naïve résumé 東京 カタカナ 😀 ½ ² ٣ 123,456.78",
    "",
    "   leading and trailing   ",
    "x's !'s ''s '",
    "<|endoftext|> hi <|startoftext|>",
    "word " * 100,  # truncated to 77 with <|endoftext|> last
    "A\u0301 e\u0301",  # NFC
    "don't_stop-the.music/now?",
    "\u00a0nbsp\u2003em\u3000ideographic",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ours = CLIPTokenizer.from_file()
    folder = ours.save_folder(tmp_path_factory.mktemp("tok"))
    return ours, transformers.CLIPTokenizerFast.from_pretrained(folder)


def _theirs(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids


def test_the_shipped_vocabulary_is_clips():
    tokenizer = CLIPTokenizer.from_file()
    assert DEFAULT_VOCABULARY.is_file() and len(tokenizer) == 49408
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, 49407)
    # the ids every SD user has seen: "a photo of a cat" in CLIP-L's vocabulary
    assert tokenizer.encode("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("text", PROMPTS)
def test_same_ids_as_transformers(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == _theirs(theirs, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# (unassigned code points, Cn, are left out: Python's and the tokenizers library's Unicode versions differ there)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")), max_size=40)
       | st.lists(st.sampled_from(["a", "photo", "of", "'s", "'ll", ",", "!!", "1", "23", "é", "東", " ", "\t", "_", "x-y",
                                   "<|endoftext|>", "<|startoftext|>", "''", "<|", "|>"]),
                  max_size=30).map("".join))
def test_same_ids_as_transformers_on_any_text(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == _theirs(theirs, text)


@pytest.mark.parametrize("text", ["''<|endoftext|>", "x!<|endoftext|>", "a <|startoftext|>b!!<|endoftext|>c"])
def test_punctuation_before_a_special_token_is_cut_from_it_as_transformers_cuts_it(pair, text):
    """transformers cuts the special tokens out first; CLIP's regex alone lets a run of punctuation take the "<|"
    (``"x!<|endoftext|>"`` was ``343, 0, 27, ...``: ``!<|`` one run)."""
    ours, theirs = pair
    assert ours.encode(text) == _theirs(theirs, text)


def test_padding_variants_and_round_trips(tmp_path, pair):
    ours, _ = pair
    bang = CLIPTokenizer.from_file(pad="!")  # SD2 / SDXL's second encoder
    ids = bang("a cat")[0].tolist()
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}
    again = CLIPTokenizer.from_folder(bang.save_folder(tmp_path / "t"))
    assert again("a cat").tolist() == bang("a cat").tolist()
    assert ours.decode(ours("a photo of a cat, café")[0]) == "a photo of a cat , café"
    assert split_words("it's 12ab!?") == ["it", "'s", "1", "2", "ab", "!?"]
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_save_folder_without_merges_loads_in_transformers(tmp_path):
    """A byte-level vocabulary with no merges (the tests' tiny tokenizer): ``merges.txt`` is the header
    alone, which transformers reads (a blank line after it was "Merges text file invalid at line 1")."""
    from embedding_models import tiny_tokenizer

    reference = tiny_tokenizer(tmp_path / "ref", max_length=12)
    ours = CLIPTokenizer.from_folder(tmp_path / "ref")
    assert not ours.ranks
    folder = ours.save_folder(tmp_path / "saved")
    assert (folder / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\n"
    theirs = transformers.CLIPTokenizerFast.from_pretrained(folder)
    for text in ("a cat", "", "hello, world!!"):
        expected = reference(text, padding="max_length", max_length=12, truncation=True).input_ids
        assert theirs(text, padding="max_length", max_length=12, truncation=True).input_ids == expected
        assert ours.encode(text) == expected


def test_a_vocabulary_file_is_read_again_when_it_changes(tmp_path):
    """``from_file`` keeps a file's parsed merges (the shipped vocabulary is read by every tokenizer built from it),
    per version of the file: a file rewritten with other merges gives the new ones, a copy of the shipped file
    the shipped merges."""
    import gzip
    import os

    with gzip.open(DEFAULT_VOCABULARY, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    file = tmp_path / "vocab.txt"
    file.write_text("\n".join(lines[:1001]), encoding="utf-8")
    first = CLIPTokenizer.from_file(file)
    assert sorted(first.ranks, key=first.ranks.get) == [tuple(line.split()) for line in lines[1:1001]]
    assert CLIPTokenizer.from_file(DEFAULT_VOCABULARY).ranks == CLIPTokenizer.from_file(DEFAULT_VOCABULARY).ranks
    stat = file.stat()
    file.write_text("\n".join([lines[0], *lines[501:1001], *lines[1:501]]), encoding="utf-8")  # (same size)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = CLIPTokenizer.from_file(file)
    assert sorted(second.ranks, key=second.ranks.get) == [tuple(line.split()) for line in [*lines[501:1001], *lines[1:501]]]


def _backend(tokenizer) -> str:
    """A transformers tokenizer's backend as a digest of its JSON without the padding / truncation state its last call
    left (a failing ``==`` of two 2 MB strings would have pytest diff them for minutes)."""
    import hashlib

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_to_transformers_is_the_tokenizer_its_saved_folder_loads_as(tmp_path, pad):
    """``to_transformers`` (built from the vocabulary in memory on transformers 5) is what transformers reads from the
    folder ``save_folder`` writes: the same backend (vocabulary, merges, added tokens, normaliser, post-processor),
    special tokens, length, ids, and the same files when saved. With the ``!`` pad the folder is read as kohya's SDXL
    scripts read theirs — the pad set by id, ``!`` an ordinary token in texts (open_clip's reading)."""
    import filecmp

    ours = CLIPTokenizer.load(None, pad=pad, max_length=77)
    built = ours.to_transformers()
    read = transformers.CLIPTokenizerFast.from_pretrained(ours.save_folder(tmp_path / "folder"), **(
        {} if pad == "eos" else {"pad_token": "<|endoftext|>"}))
    if pad == "!":
        read.pad_token_id = 0  # (kohya's strategy_sdxl.py: tokenizer2.pad_token_id = 0)
    assert _backend(built) == _backend(read)
    for name in ("pad_token", "pad_token_id", "bos_token", "eos_token", "unk_token", "model_max_length"):
        assert getattr(built, name) == getattr(read, name), name
    assert str(built.added_tokens_decoder) == str(read.added_tokens_decoder)
    text = ["a photo of a cat!! <|endoftext|> café", "", "Zebra-stripes & 3 cats"]
    assert built(text, padding="max_length", max_length=77).input_ids == read(text, padding="max_length", max_length=77).input_ids
    built.save_pretrained(tmp_path / "built")
    read.save_pretrained(tmp_path / "read")
    assert filecmp.cmp(tmp_path / "built" / "tokenizer.json", tmp_path / "read" / "tokenizer.json", shallow=False)
    configs = [json.loads((tmp_path / side / "tokenizer_config.json").read_text()) for side in ("built", "read")]
    for config in configs:  # (what from_pretrained records of where it read from)
        config.pop("is_local", None)
        config.pop("local_files_only", None)
    assert configs[0] == configs[1]


def test_sdxl_second_and_sd2_tokenizers_read_bang_as_open_clip_from_every_source(tmp_path):
    """SD2's and SDXL's second tokenizer pad with ``!`` (id 0) but read a ``!`` in a text as an ordinary token, as
    open_clip (what the models were trained with; ``open_clip.tokenize("! !! !!!")`` is ``49406, 256, 748, 995,
    49407, 0 ...`` — diffusers issue #4153), A1111 (``id_pad = 0``), ComfyUI's clip_g and kohya's SDXL scripts
    (``pad_token_id = 0``) do — from the shipped vocabulary, a vocabulary file, a tokenizer folder, and a diffusers
    model folder whose ``tokenizer_2`` makes ``!`` a special token (transformers then splits ``"!!"`` into two pad
    ids, diffusers' pipelines' ids). Before, every source gave diffusers' split."""
    import gzip
    import types

    from sdadapt.diffusers_system import _tokenizers

    model = tmp_path / "model"
    CLIPTokenizer.load(None).save_folder(model / "tokenizer")
    folder = CLIPTokenizer.load(None, pad="!").save_folder(model / "tokenizer_2")
    config_file = folder / "tokenizer_config.json"  # (as diffusers' SDXL folders carry it: "!" a special token)
    written = json.loads(config_file.read_text())
    written["added_tokens_decoder"] = {"0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True}}
    config_file.write_text(json.dumps(written))
    split = transformers.CLIPTokenizerFast.from_pretrained(folder)  # (what diffusers loads from the SDXL folder)
    vocab_file = tmp_path / "bpe.txt"
    with gzip.open(DEFAULT_VOCABULARY, "rb") as packed:
        vocab_file.write_bytes(packed.read())
    one = CLIPTokenizer.load(None).save_folder(tmp_path / "one")  # (a tokenizer folder: vocab.json + merges.txt)
    config = types.SimpleNamespace(max_position_embeddings=77)
    text = ["! !! !!! a cat!!", "a photo"]
    open_clip_ids = [49406, 256, 748, 995, 320, 2368, 748, 49407] + [0] * 69  # (open_clip's, by its BPE)
    assert split(text, padding="max_length", max_length=77).input_ids[0][1:3] == [0, 0]  # (diffusers' split)
    for source, architecture in ((None, "sdxl"), (vocab_file, "sdxl"), (one, "sdxl"), (model, "sdxl"),
                                 (None, "sd2"), (vocab_file, "sd2")):
        first, second = _tokenizers(source, architecture, config, CLIPTokenizer)
        bang = second if architecture == "sdxl" else first
        assert bang(text, padding="max_length", max_length=77).input_ids[0] == open_clip_ids, source
        assert (bang.pad_token, bang.pad_token_id) == ("!", 0), source
        assert bang(text, padding="max_length", max_length=77).input_ids[0] == [
            bang.bos_token_id, *CLIPTokenizer.load(None).encode_words(text[0]), bang.eos_token_id] + [0] * 69
        if architecture == "sdxl":
            assert first.pad_token == "<|endoftext|>" and first(text).input_ids[0][1] == 256, source
