"""CLIP's byte-level BPE tokenizer in pure Python, offline: what a single-file checkpoint lacks.

A Stable Diffusion single file (``.safetensors``/``.ckpt``) holds the text encoders but not their
tokenizer. Every SD1/SD2/SDXL text encoder uses the same CLIP vocabulary (49408 tokens), shipped
here as package data (``sdadapt/data/bpe_simple_vocab_16e6.txt.gz``, the MIT-licensed file of
OpenAI CLIP / open_clip), so nothing is downloaded. A diffusers/transformers tokenizer folder
(``vocab.json`` + ``merges.txt``) can replace it (``--tokenizer DIR``). :meth:`CLIPTokenizer.to_transformers`
builds the identical transformers tokenizer from it (what the Stable Diffusion systems use, so
embeddings can add tokens); this class tokenizes without transformers.

It tokenizes exactly as transformers' ``CLIPTokenizer`` (the one diffusers pipelines use):

1. normalise: Unicode NFC, every whitespace run -> one space, lower case;
2. split into words with CLIP's pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (letters and numbers by Unicode category; no ``regex`` package needed);
3. each word's UTF-8 bytes as GPT-2's printable stand-ins, ``</w>`` on the last, merged by BPE
   rank;
4. ``<|startoftext|> ids[:L-2] <|endoftext|>`` padded to ``L = 77`` with ``pad_id``.

Padding differs by model (as diffusers' tokenizer folders have it): SD1 and SDXL's first encoder
pad with ``<|endoftext|>`` (49407), SD2 and SDXL's second (OpenCLIP) encoder with ``!`` (0).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_VOCABULARY", "CLIPTokenizer", "bytes_to_unicode", "special_token_ids", "split_words",
           "write_vocabulary_files"]

#: the shipped CLIP BPE vocabulary (merges, one pair a line, first line a version comment)
DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
#: Unicode White_Space (what ``\s`` matches in transformers' regex; Python's ``isspace`` adds U+001C-U+001F)
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B))
#: merges CLIP uses from the 16e6 file: 49152 - 256 - 2 (the vocabulary is 49408 tokens)
_CLIP_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from the 256 byte values to printable characters (BPE works on these)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _kind(ch: str) -> str:
    """``"L"`` letter, ``"N"`` number, ``"S"`` white space, ``"O"`` anything else (Unicode categories)."""
    if ch in _WHITE_SPACE:
        return "S"
    category = unicodedata.category(ch)[0]
    return category if category in ("L", "N") else "O"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of already-normalised ``text`` (see the module docstring, step 2).

    The alternatives are tried in the pattern's order at each position, as a regex engine does:
    special tokens, contractions, a run of letters, one number character, a run of other
    non-space characters; white space separates and is dropped.
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        special = next((s for s in _SPECIAL if text.startswith(s, i)), None)
        if special is not None:
            words.append(special)
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None) if ch == "'" else None
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _kind(ch)
        if kind == "S":
            i += 1
            continue
        if kind == "N":
            words.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]) == kind:
            j += 1
        words.append(text[i:j])
        i = j
    return words


def _collapse(text: str) -> str:
    """Every run of white space -> one space (not stripped, as transformers' normaliser does)."""
    out, space = [], False
    for ch in text:
        if ch in _WHITE_SPACE:
            if not space:
                out.append(" ")
            space = True
        else:
            out.append(ch)
            space = False
    return "".join(out)


def write_vocabulary_files(folder: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` (``{token: id}``) and ``merges.txt`` (``#version: 0.2``, then one ``"a b"`` merge a
    line, highest priority first) in ``folder``: the two files transformers' slow ``CLIPTokenizer``
    (transformers 4, kohya's sd-scripts) reads and openai's CLIP folders hold, byte for byte as its
    ``save_vocabulary`` writes them. No blank line when there are no merges (transformers refuses one)."""
    root = Path(folder)
    text = json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (root / "vocab.json").write_text(text, encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (root / "merges.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@lru_cache(maxsize=4)
def _read_merges(file: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], ...]:
    """The merges of a ``bpe_simple_vocab_16e6.txt(.gz)`` file, read once per file version (the shipped one is
    read by every tokenizer built from it: ~0.15 s of decompressing and splitting each time)."""
    path = Path(file)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        lines = handle.read().split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : _CLIP_MERGES + 1] if line.strip())


class CLIPTokenizer:
    """``tokenizer(["a photo of a cat"]) -> (B, 77) int64`` CLIP token ids.

    Args:
        merges: BPE merges in rank order (pairs of strings).
        vocab: token -> id; ``None`` builds CLIP's (bytes, bytes + ``</w>``, merges, the two
            special tokens).
        max_length: sequence length (77 for every SD text encoder).
        pad: ``"eos"`` (``<|endoftext|>``: SD1, SDXL's first encoder) or ``"!"`` (id of ``!``:
            SD2, SDXL's second encoder), or a token id.
    """

    def __init__(self, merges: list[tuple[str, str]], *, vocab: dict[str, int] | None = None, max_length: int = 77,
                 pad: str | int = "eos") -> None:
        self.byte_encoder = bytes_to_unicode()
        if vocab is None:
            symbols = list(self.byte_encoder.values())
            tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL)
            vocab = {token: i for i, token in enumerate(tokens)}
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
        missing = [s for s in _SPECIAL if s not in self.encoder]
        if missing:
            raise ValueError(f"the CLIP vocabulary lacks {', '.join(missing)}")
        self.bos_id, self.eos_id = self.encoder[_SPECIAL[0]], self.encoder[_SPECIAL[1]]
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model_max_length = max_length
        if pad == "eos":
            self.pad_id = self.eos_id
        elif isinstance(pad, str):
            if pad not in self.encoder:
                raise ValueError(f"pad token {pad!r} is not in the vocabulary")
            self.pad_id = self.encoder[pad]
        else:
            self.pad_id = int(pad)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **options) -> CLIPTokenizer:
        """From a ``bpe_simple_vocab_16e6.txt(.gz)`` merges file (default: the shipped one)."""
        file = Path(path) if path is not None else DEFAULT_VOCABULARY
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no CLIP vocabulary file there")
        stat = file.stat()
        return cls(list(_read_merges(str(file.resolve()), stat.st_mtime_ns, stat.st_size)), **options)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **options) -> CLIPTokenizer:
        """From a transformers/diffusers tokenizer folder (``vocab.json`` + ``merges.txt``).

        ``max_length`` and the pad token come from its ``tokenizer_config.json`` /
        ``special_tokens_map.json`` unless given in ``options``.

        Raises:
            FileNotFoundError: the folder lacks ``vocab.json`` or ``merges.txt`` (names the folder).
        """
        root = Path(folder)
        vocab_file, merges_file = root / "vocab.json", root / "merges.txt"
        if not vocab_file.is_file() or not merges_file.is_file():
            raise FileNotFoundError(f"{root}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, as "
                                    "a diffusers model's tokenizer/ folder has them)")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in merges_file.read_text(encoding="utf-8").split("\n")
                  if line.strip() and not line.startswith("#version")]
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (root / name).is_file():
                config.update(json.loads((root / name).read_text(encoding="utf-8")))
        if "max_length" not in options and isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 10**6:
            options["max_length"] = config["model_max_length"]
        pad = config.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if "pad" not in options and isinstance(pad, str) and pad in vocab:
            options["pad"] = "eos" if pad == _SPECIAL[1] else pad
        return cls(merges, vocab=vocab, **options)  # type: ignore[arg-type]

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, **options) -> CLIPTokenizer:
        """``None`` -> the shipped vocabulary; a folder -> :meth:`from_folder`; a file -> :meth:`from_file`."""
        if source is not None and Path(source).is_dir():
            return cls.from_folder(source, **options)
        return cls.from_file(source, **options)

    def save_folder(self, folder: str | os.PathLike) -> Path:
        """Write ``vocab.json``, ``merges.txt`` and the configs transformers' ``CLIPTokenizer.from_pretrained`` reads."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        write_vocabulary_files(root, self.encoder, sorted(self.ranks, key=self.ranks.get))  # type: ignore[arg-type]
        pad = self.decoder[self.pad_id]
        # (clean_up_tokenization_spaces: transformers >= 4.45's and 5's default, said so that 4.44 decodes the same
        # and does not warn that its default will change)
        config = {"model_max_length": self.model_max_length, "bos_token": _SPECIAL[0], "eos_token": _SPECIAL[1],
                  "unk_token": _SPECIAL[1], "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
                  "clean_up_tokenization_spaces": False}
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        (root / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=1), encoding="utf-8")
        return root

    def to_transformers(self):
        """The same tokenizer as a transformers fast ``CLIPTokenizerFast`` (in transformers 5 the same class as
        ``CLIPTokenizer``, what diffusers pipelines and :func:`sdadapt.inject_embedding` use; transformers 4's
        ``CLIPTokenizer`` is the slow Python one, which gives other ids for some Unicode text); built offline from
        this vocabulary.

        A pad token other than ``<|endoftext|>`` (``!``, id 0: SD2, SDXL's second encoder) is set by id, not made a
        special token, so ``!`` in a text stays an ordinary token, as open_clip (which SD2 and SDXL were trained
        with), A1111, ComfyUI and kohya's SDXL scripts read it: ``"wow!!"`` is ``2781, 748``, not the two pad ids a
        diffusers ``tokenizer_2`` folder splits it into (diffusers issue #4153).

        Raises:
            ImportError: transformers is not installed.
        """
        import tempfile

        try:
            import transformers
            from transformers import CLIPTokenizerFast as TransformersCLIPTokenizer
        except ImportError:
            raise ImportError("a transformers CLIPTokenizer needs `transformers`: pip install \"sdadapt[interop]\"") from None
        if int(transformers.__version__.split(".")[0]) >= 5:  # (it takes the vocabulary and merges themselves: the
            # tokenizer its folder loads as, without writing and parsing 49,408 tokens, ~0.3 s)
            merges = sorted(self.ranks, key=self.ranks.get)  # (the pairs, highest priority first)
            built = TransformersCLIPTokenizer(vocab=dict(self.encoder), merges=merges, unk_token=_SPECIAL[1],
                                              bos_token=_SPECIAL[0], eos_token=_SPECIAL[1], pad_token=_SPECIAL[1],
                                              model_max_length=self.model_max_length,
                                              clean_up_tokenization_spaces=False)  # (as save_folder says)
        else:
            with tempfile.TemporaryDirectory(prefix="sdadapt-tokenizer-") as folder:  # (transformers 4: from files)
                built = TransformersCLIPTokenizer.from_pretrained(self.save_folder(folder), pad_token=_SPECIAL[1])
        if self.pad_id != self.eos_id:  # (by id: the token stays an ordinary one in texts, as in open_clip)
            built.pad_token_id = self.pad_id
        return built

    # ----------------------------------------------------------------------------- encoding
    def __len__(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one word (``</w>`` on the last) by rank, lowest first."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            best_rank, pair = None, None
            for a, b in zip(symbols, symbols[1:]):
                rank = self.ranks.get((a, b))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, pair = rank, (a, b)
            if pair is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode_words(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens, padding or truncation."""
        ids: list[int] = []
        # (transformers cuts the special tokens out of the text first, so punctuation before one cannot take its
        # "<|" into a run of other characters, as CLIP's regex alone would: "x!<|endoftext|>" is x, !, <|endoftext|>)
        pieces = re.split(f"({'|'.join(map(re.escape, _SPECIAL))})", _collapse(unicodedata.normalize("NFC", text)))
        for word in (word for piece in pieces for word in ([piece] if piece in _SPECIAL else split_words(piece.lower()))):
            if word in _SPECIAL:
                ids.append(self.encoder[word])
                continue
            cached = self._cache.get(word)
            if cached is None:
                symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                cached = [self.encoder.get(tok, self.eos_id) for tok in self._bpe(symbols)]
                if len(self._cache) < 100_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def encode(self, text: str, *, max_length: int | None = None) -> list[int]:
        """``<|startoftext|> ids <|endoftext|>``, truncated and padded to ``max_length``
        (default ``model_max_length``; longer for prompts split into windows, :mod:`sdadapt.text_chunks`)."""
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        body = self.encode_words(text)[: length - 2]
        ids = [self.bos_id, *body, self.eos_id]
        return ids + [self.pad_id] * (length - len(ids))

    def __call__(self, texts: list[str] | str, *, max_length: int | None = None) -> Tensor:
        """(B, max_length) int64 ids of ``texts`` (default ``model_max_length``)."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t, max_length=max_length) for t in texts], dtype=torch.long)

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` takes (without start/end): above ``max_length - 2`` it is truncated."""
        return len(self.encode_words(text))

    def decode(self, ids: Tensor | list[int]) -> str:
        """Ids -> text (special tokens and padding dropped)."""
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        tokens = [self.decoder.get(int(i), "") for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        data = bytearray()
        for token in tokens:
            if token in _SPECIAL:
                continue
            end = token.endswith("</w>")
            data.extend(byte_decoder[c] for c in token.removesuffix("</w>") if c in byte_decoder)
            if end:
                data.extend(b" ")
        return " ".join(data.decode("utf-8", errors="replace").split())


def special_token_ids(tokenizer: Any) -> tuple[int, int, int]:
    """``(bos, eos, pad)`` ids of sdadapt's :class:`CLIPTokenizer` or a transformers CLIP tokenizer
    (no pad token: ``eos``, as SD1's)."""
    if isinstance(tokenizer, CLIPTokenizer):
        return int(tokenizer.bos_id), int(tokenizer.eos_id), int(tokenizer.pad_id)
    eos, pad = int(tokenizer.eos_token_id), tokenizer.pad_token_id
    return int(tokenizer.bos_token_id), eos, eos if pad is None else int(pad)
