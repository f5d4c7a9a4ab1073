"""The tokenizer side of an embedding: give a trigger word ``k`` token ids, and take them back.

A small interface, :class:`TokenizerSide`, with two implementations picked by :func:`tokenizer_side`:

* :class:`CLIPTokenizerSide` — transformers tokenizers (``CLIPTokenizer``; anything with
  ``add_tokens``/``convert_tokens_to_ids``). It adds the tokens diffusers adds
  (``name``, ``name_1`` … ``name_{k-1}``, each one id at the end of the vocabulary), and
  :meth:`CLIPTokenizerSide.expand` spells a prompt out as diffusers' ``maybe_convert_prompt`` does
  (:func:`expand_prompt`: ``name name_1 …``) but after each *token* ``name`` (:func:`insert_after_token`): the added
  token matches the name in any case (``easynegative`` for ``EasyNegative``, as A1111 matches the name's token ids), so
  all ``k`` vectors follow wherever the first one stands. A diffusers pipeline around the same tokenizer expands
  exact-case names itself. ``remove()`` restores the tokenizer's
  added-token table exactly as it was (newest addition first).

  A trigger CLIP tokenizes as one vocabulary token (``cat`` -> ``cat</w>``, ``ti``) is used as A1111 uses it
  (``EmbeddingDatabase.find_embedding_at_position`` matches the name's token ids in the tokenized prompt): its first
  vector takes that token's id, so *every* ``cat</w>`` of a prompt is the embedding — the word ``cat`` and the last
  BPE piece of a longer word (``tomcat`` -> ``tom`` + ``cat</w>`` where the vocabulary splits it so), not ``cats`` or
  ``catalog`` (other pieces) — and :meth:`CLIPTokenizerSide.expand` puts the alias tokens ``<emb-cat>_1`` … of the
  further vectors right after each such token (:func:`insert_after_token`). A vocabulary-word trigger of several
  tokens gets the alias tokens ``<emb-name>`` … and expand writes them for each whole-word occurrence
  (:func:`replace_vocabulary_word`). A diffusers pipeline needs the expanded prompt when ``k > 1``.

  With ``a1111=True`` (``inject_embedding(..., a1111=True)``, what ``generate`` uses) a name of several tokens
  (``my-style``, ``easynegative``) is not added as text: its alias tokens ``<emb-my-style>`` … are, and the name is
  registered for A1111's matching by token ids inside each emphasis piece (:mod:`.a1111_match`, which sdadapt's
  tokenizing paths apply; a one-token name of ``k > 1`` vectors too): ``my - style`` is the embedding, ``amy-style``
  and ``my-styles`` (other ids) are not, ``(cat)(s)`` is not ``cat``. :meth:`CLIPTokenizerSide.expand` writes the
  matches into the text where the text can say them exactly (:func:`.a1111_match.expand_a1111`).
* :class:`WordTableSide` — tokenizers with an added-word table (the toy tokenizer:
  ``add_word``/``remove_word``/``free_spare_ids``). A trigger that is already a vocabulary word keeps
  its own id for its first vector; every other vector takes the next free spare token
  (``<new0>``, ``<new1>`` …). The tokenizer expands the word itself, so prompts need no rewriting.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Protocol, runtime_checkable

# (_PROMPT_SYNTAX: a run whose text holds A1111 prompt syntax is not the name as A1111's parser hands it to the
# tokenizer: ``tom (1)`` is ``tom`` + ``1`` at weight 1.1 there)
from .a1111_match import _PROMPT_SYNTAX, expand_a1111, register_name, unregister_name
from .token_offsets import token_spans

__all__ = ["CLIPTokenizerSide", "TokenizerSide", "TriggerTakenError", "WordTableSide", "expand_prompt", "insert_after_token", "multi_vector_names",
           "replace_token_run", "replace_vocabulary_word", "token_strings", "tokenizer_side", "vocabulary_word_alias"]

#: tokenizer -> {vocabulary token id: the name of the loaded embedding holding it} (one embedding per id, as one
#: per added token)
_HELD_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TriggerTakenError(ValueError):
    """The trigger word is held by another embedding already loaded on this tokenizer."""


def token_strings(name: str, count: int) -> list[str]:
    """diffusers' names for a ``count``-vector token: ``[name, name_1, …, name_{count-1}]``."""
    return [name] + [f"{name}_{i}" for i in range(1, count)]


def expand_prompt(prompt: str, name: str, count: int) -> str:
    """Replace the trigger ``name`` by ``"name name_1 … name_{count-1}"`` (diffusers' prompt rule).

    Idempotent: an occurrence already followed by `` name_1`` (or itself ``name_<i>``) is left as is.
    """
    if count <= 1 or name not in prompt:
        return prompt
    escaped = re.escape(name)
    pattern = re.compile(rf"{escaped}(?!_\d)(?! {escaped}_1(?!\d))")
    return pattern.sub(lambda _m: " ".join(token_strings(name, count)), prompt)


def multi_vector_names(tokenizer: object) -> dict[str, int]:
    """``{name: count}`` of the several-vector triggers a tokenizer already holds in diffusers' naming (added tokens
    ``name``, ``name_1``, … ``name_{count-1}``: a textual-inversion model saved whole, diffusers'
    ``--save_as_full_pipeline``, whose pipeline expands a bare ``name`` to all of them: :func:`expand_prompt`)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    names: dict[str, int] = {}
    for token in added:
        if f"{token}_1" not in added:
            continue
        head, _, index = token.rpartition("_")
        if head in added and index.isdigit():  # (itself one of another name's vectors)
            continue
        count = 2
        while f"{token}_{count}" in added:
            count += 1
        names[token] = count
    return names


def vocabulary_word_alias(word: str) -> str:
    """The token added for an embedding whose name is a CLIP vocabulary word (``"cat"`` -> ``"<emb-cat>"``).

    It holds none of the prompt syntax's characters (``\\ [ ] ( ) : |``), so an expanded prompt keeps its emphasis,
    prompt editing (``[cat:dog:0.5]``) and alternation (``[cat|dog]``), and no ``<kind:args>`` extra-network tag."""
    return f"<emb-{word.lower()}>"


def replace_vocabulary_word(prompt: str, word: str) -> str:
    """Each occurrence of ``word`` that CLIP tokenizes as ``word``'s own tokens replaced by its alias
    (:func:`vocabulary_word_alias`): case-insensitive (CLIP lowercases), not inside a longer run of letters (CLIP's
    pre-tokenizer keeps a letter run whole: "cats" is not "cat"), not inside an alias already written.

    This is A1111's rule for an embedding named like a vocabulary word (``modules/textual_inversion/
    textual_inversion.py`` ``EmbeddingDatabase.find_embedding_at_position``: the name's token ids are matched in the
    tokenized prompt, so every ``cat`` of the prompt becomes the embedding), applied to the text.
    """
    pattern = re.compile(rf"(?<!<emb-)(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", re.IGNORECASE)
    return pattern.sub(vocabulary_word_alias(word), prompt)


def insert_after_token(prompt: str, tokenizer, token_id: int, aliases: list[str]) -> str:
    """``aliases`` (added tokens) written after every ``token_id`` of the tokenized ``prompt``, where the token is not
    followed by ``aliases[0]`` already (idempotent).

    The cut is the token's end in the prompt (:func:`.token_offsets.token_spans`), so ``tomcat`` -> ``tom`` +
    ``cat</w>`` becomes ``tomcat <emb-cat>_1 …``: the word keeps its own BPE pieces, and the aliases follow its last
    one, inside any weight syntax around it (``(tomcat:1.2)`` -> ``(tomcat <emb-cat>_1 :1.2)``): A1111's positions and
    weights.
    """
    if not aliases:
        return prompt
    ids, offsets = token_spans(tokenizer, prompt)
    follow = int(tokenizer.convert_tokens_to_ids(aliases[0]))
    cuts = [int(offsets[i][1]) for i, t in enumerate(ids)
            if t == token_id and (i + 1 == len(ids) or ids[i + 1] != follow)]
    insert = " " + " ".join(aliases)
    for cut in reversed(cuts):  # (a blank after the aliases unless one follows: "a <s> cat" -> "a <s> <s>_1 cat")
        blank = "" if cut == len(prompt) or prompt[cut].isspace() else " "
        prompt = prompt[:cut] + insert + blank + prompt[cut:]
    return prompt


def replace_token_run(prompt: str, tokenizer, run: list[int], aliases: list[str]) -> str:
    """Each run of the token ids ``run`` in the tokenized ``prompt`` replaced by ``aliases`` (added tokens), scanning
    from the left and going on after a match, as A1111's ``tokenize_line`` calls ``find_embedding_at_position``.

    The cut is the run's first token's start to its last token's end in the prompt
    (:func:`.token_offsets.token_spans`), so the name's spellings with the same ids match (``my - style`` for
    ``my-style``) and other words do not (``amy-style`` = ``amy`` …, ``my-styles`` = … ``style s``), inside any weight
    syntax around them (``(my-style:1.2)`` -> ``(<emb-my-style>:1.2)``). Idempotent: the aliases are not the run's
    ids.

    Args:
        run: the name's token ids without BOS/EOS (at least one).
        aliases: the tokens written instead, e.g. ``["<emb-my-style>", "<emb-my-style>_1"]``.
    """
    if not run:
        raise ValueError("replace_token_run needs the name's token ids (got none)")
    ids, offsets = token_spans(tokenizer, prompt)
    spans, i, n = [], 0, len(run)
    while i + n <= len(ids):
        start, end = int(offsets[i][0]), int(offsets[i + n - 1][1])
        if ids[i] == run[0] and ids[i : i + n] == run and not _PROMPT_SYNTAX.search(prompt[start:end]):
            spans.append((start, end))
            i += n
        else:
            i += 1
    text = " ".join(aliases)
    for start, end in reversed(spans):
        prompt = prompt[:start] + text + prompt[end:]
    return prompt


@runtime_checkable
class TokenizerSide(Protocol):
    """What :func:`sdadapt.inject_embedding` needs from a tokenizer."""

    #: True when the tokenizer turns the trigger word into its ``k`` ids by itself
    expands_itself: bool

    def add(self, name: str, count: int) -> list[int]:
        """Register ``name`` with ``count`` tokens; their ids, in vector order."""
        ...

    def expand(self, prompt: str) -> str:
        """The prompt as the tokenizer must see it (multi-vector triggers spelled out)."""
        ...

    def word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS/padding (for init words)."""
        ...

    def known_single_token(self, word: str) -> int | None:
        """The id of ``word`` when the vocabulary has it as exactly one token, else ``None``."""
        ...

    def remove(self) -> None:
        """Undo :meth:`add`."""
        ...


class CLIPTokenizerSide:
    """A transformers tokenizer: tokens ``name``, ``name_1`` … appended to the vocabulary."""

    expands_itself = False

    def __init__(self, tokenizer, *, a1111: bool = False) -> None:
        self.tokenizer = tokenizer
        self.a1111 = a1111  # (a name of several tokens matched by its token ids, A1111's rule, not as added text)
        self._run: list[int] | None = None  # (that name's token ids, replaced by its aliases in expand)
        self.name: str | None = None  # (the added token: the trigger, or its alias for a vocabulary word)
        self.count = 0
        self.word: str | None = None  # a trigger that is a vocabulary word, spelled as its alias by expand
        self.own_id: int | None = None  # a one-token trigger's own vocabulary id (its first vector's)
        self._aliases: list[str] = []  # (its further vectors' tokens, written after each own_id by expand)
        self._before: list | None = None
        self._slow_before: tuple | None = None  # (a slow tokenizer's added-token table and trie words)
        self._after: list | None = None
        self._entry = None  # (a1111: its sdadapt.embeddings.a1111_match entry, matched by token ids in each piece)

    def _backend(self):
        """The tokenizers ``Tokenizer`` of a fast tokenizer, else ``None`` for transformers 4's slow (Python)
        ``CLIPTokenizer`` (its added tokens in ``_added_tokens_decoder`` and a ``tokens_trie``, transformers 4.34+)."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            return backend
        table = getattr(self.tokenizer, "_added_tokens_decoder", None)
        if isinstance(table, dict) and hasattr(self.tokenizer, "tokens_trie"):
            return None
        raise TypeError(
            f"cannot add embedding tokens to {type(self.tokenizer).__name__}: sdadapt adds and removes them on "
            "transformers' CLIP tokenizers (fast, or transformers >= 4.34's slow CLIPTokenizer); load it with "
            "transformers.CLIPTokenizerFast.from_pretrained(...)"
        )

    def _added_table(self) -> dict:
        """{id: AddedToken} of the tokens added to the vocabulary (special ones included)."""
        backend = self._backend()
        return dict(self.tokenizer._added_tokens_decoder) if backend is None else backend.get_added_tokens_decoder()

    def _added_tokens(self) -> list:
        """The serialized tokenizer's added-token list (what ``add_tokens`` changes; padding and
        truncation settings, which every call may change, are not part of it), read from the backend's
        added-token table (the serialized list is these entries in id order; serializing the whole
        tokenizer, 49408 tokens and their merges, to read them costs a tenth of a second a call)."""
        table = self._added_table()
        return [{"id": i, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "special": t.special} for i, t in sorted(table.items())]

    def _snapshot(self) -> None:
        """Keep what :meth:`_restore` puts back: the added-token list (and a slow tokenizer's table and trie words)."""
        self._before = self._added_tokens()
        if self._backend() is None:
            self._slow_before = (dict(self.tokenizer._added_tokens_decoder), set(self.tokenizer.tokens_trie._tokens))

    def add(self, name: str, count: int) -> list[int]:
        if self.name is not None:
            raise RuntimeError(f"this tokenizer side already holds {self.name!r}; make one side per embedding")
        vocab = self.tokenizer.get_vocab()
        added = self.tokenizer.get_added_vocab() if hasattr(self.tokenizer, "get_added_vocab") else {}
        own = self._own_token(name, added)
        if own is not None:
            return self._add_own(name, count, own, vocab)
        run = self._name_run(name, added) if self.a1111 else None
        if run is not None:  # (A1111's key: the name's token ids; the vectors go on the alias tokens)
            self.word = name
        elif any(s in vocab and s not in added for s in token_strings(name, count)):
            # a vocabulary word ("cat", "ti"): A1111 matches the word's token ids in the prompt and puts the vectors
            # there; here the word is spelled as an alias token the vocabulary lacks (expand), to the same effect
            self.word = name
        token = vocabulary_word_alias(name) if self.word is not None else name
        strings = token_strings(token, count)
        taken = [s for s in strings if s in vocab]
        if taken:
            self.word = None
            raise TriggerTakenError(
                f"the tokenizer already has the token(s) {taken}: another embedding named {name!r} is loaded; "
                "remove that embedding first or choose another trigger word"
            )
        self._snapshot()
        added = self.tokenizer.add_tokens(strings)
        if added != len(strings):  # pragma: no cover - guarded by the vocabulary check above
            self._restore()
            raise ValueError(f"the tokenizer added {added} of the tokens {strings}")
        self._after = self._added_tokens()
        self.name, self.count, self._run = token, count, run
        ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids(strings)]
        if run is not None:
            self._entry = register_name(self.tokenizer, name, run, ids, " ".join(strings))
        return ids

    def _name_run(self, name: str, added: dict) -> list[int]:
        """The token ids A1111 looks ``name`` up by (its tokens without BOS/EOS), checked: some, none another
        embedding's added token."""
        run = self.word_ids(name)
        if not run:
            raise ValueError(f"the embedding name {name!r} has no tokens in the tokenizer; rename its file")
        held = set(run) & set(added.values())
        if held:
            raise TriggerTakenError(
                f"the embedding name {name!r} tokenizes into another embedding's token(s) "
                f"{self.tokenizer.convert_ids_to_tokens(sorted(held))}; remove that embedding first or rename the file"
            )
        return run

    def _own_token(self, name: str, added: dict) -> int | None:
        """The vocabulary id of a trigger CLIP tokenizes as one (not added) token, else None (A1111 matches the
        name's ids: one id, wherever it stands)."""
        ids = self.word_ids(name)
        if len(ids) != 1 or ids[0] in set(added.values()):
            return None
        return ids[0]

    def _add_own(self, name: str, count: int, own: int, vocab: dict) -> list[int]:
        """A one-token trigger: its first vector on its own id, the others on aliases ``<emb-name>_1`` …"""
        held = _HELD_IDS.setdefault(self.tokenizer, {})
        strings = token_strings(vocabulary_word_alias(name), count)[1:]
        taken = [s for s in strings if s in vocab]
        if own in held or taken:
            holder = f"the embedding {held[own]!r}" if own in held else f"another embedding (its tokens {taken})"
            raise TriggerTakenError(
                f"cannot load the embedding {name!r}: the tokenizer's token {name.lower()!r} is held by {holder}; "
                "remove that embedding first or choose another trigger word"
            )
        self._snapshot()
        if strings and self.tokenizer.add_tokens(strings) != len(strings):  # pragma: no cover - checked above
            self._restore()
            raise ValueError(f"the tokenizer added fewer than the tokens {strings}")
        self._after = self._added_tokens()
        held[own] = name
        self.name, self.count, self.own_id, self._aliases = name, count, own, strings
        ids = [own] + [int(i) for i in self.tokenizer.convert_tokens_to_ids(strings)]
        if self.a1111 and strings:  # (k = 1: the own id is the whole embedding, nothing to match)
            self._entry = register_name(self.tokenizer, name, [own], ids, " ".join(strings), keep=True)
        return ids

    def _restore(self) -> None:
        backend = self._backend()
        if backend is None:  # (a slow tokenizer: its table, the reverse map, the split trie and the cached length)
            table, words = self._slow_before
            self.tokenizer._added_tokens_decoder = dict(table)
            self.tokenizer._added_tokens_encoder = {t.content: i for i, t in table.items()}
            self.tokenizer.tokens_trie = type(self.tokenizer.tokens_trie)(words)
            if hasattr(self.tokenizer, "_update_total_vocab_size"):
                self.tokenizer._update_total_vocab_size()
            return
        from tokenizers import Tokenizer

        # (the serialized tokenizer with its "added_tokens" list swapped for the one before add, spliced in the
        # text: parsing and re-encoding the whole vocabulary would cost most of a remove; the key stands only
        # at the top level of a tokenizer.json, and an escaped quote in a string cannot spell it)
        state = backend.to_str()
        key = '"added_tokens":'
        start = state.index(key) + len(key)
        _, end = json.JSONDecoder().raw_decode(state, start)
        self.tokenizer._tokenizer = Tokenizer.from_str(state[:start] + json.dumps(self._before) + state[end:])

    def expand(self, prompt: str) -> str:
        if self.name is None:
            return prompt
        if self.a1111 and (self._entry is not None or self.own_id is not None):
            # (A1111's scan over every registered name, inside each emphasis piece; only this one's matches written)
            return prompt if self._entry is None else expand_a1111(prompt, self.tokenizer, only=self._entry)
        if self.own_id is not None:
            return insert_after_token(prompt, self.tokenizer, self.own_id, self._aliases)
        if self._run is not None:
            return replace_token_run(prompt, self.tokenizer, self._run, token_strings(self.name, self.count))
        if self.word is not None:
            prompt = replace_vocabulary_word(prompt, self.word)
        # (by token id, not by text: the added token matches the name in any case, "easynegative" for
        # "EasyNegative", as A1111 matches the name's token ids; every one of the k vectors must follow it)
        if self._backend() is None:  # (a slow tokenizer matches added tokens in their exact case: the name spelled so)
            prompt = re.sub(re.escape(self.name), lambda _: self.name, prompt, flags=re.IGNORECASE)
        first = int(self.tokenizer.convert_tokens_to_ids(self.name))
        return insert_after_token(prompt, self.tokenizer, first, token_strings(self.name, self.count)[1:])

    def word_ids(self, text: str) -> list[int]:
        from ..clip_text import added_tokens, clip_clean

        # (as every prompt is tokenized: the slow CLIP tokenizer's clean-up)
        cleaned = clip_clean(text, added=added_tokens(self.tokenizer))
        return [int(i) for i in self.tokenizer(cleaned, add_special_tokens=False)["input_ids"]]

    def known_single_token(self, word: str) -> int | None:
        ids = self.word_ids(word)
        return ids[0] if len(ids) == 1 else None

    def remove(self) -> None:
        if self.name is None:
            return
        if self._added_tokens() != self._after:
            raise RuntimeError(
                f"tokens were added to the tokenizer after the embedding {self.name!r}; remove embeddings "
                "in the reverse order of injection"
            )
        self._restore()
        if self.own_id is not None:
            _HELD_IDS.get(self.tokenizer, {}).pop(self.own_id, None)
        if self._entry is not None:
            unregister_name(self.tokenizer, self._entry)
        self.name, self.count, self.word, self.own_id, self._run, self._entry = None, 0, None, None, None, None


class WordTableSide:
    """A tokenizer with an added-word table (the toy tokenizer)."""

    expands_itself = True

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.word: str | None = None

    def add(self, name: str, count: int) -> list[int]:
        if self.word is not None:
            raise RuntimeError(f"this tokenizer side already holds {self.word!r}; make one side per embedding")
        word = name.lower()
        if word in self.tokenizer.added:
            raise TriggerTakenError(f"{name!r} is already loaded as an embedding trigger; remove that embedding first or choose another word")
        own = self.tokenizer.ids.get(word)
        if own is not None and any(own in ids for ids in self.tokenizer.added.values()):
            raise ValueError(f"{name!r} is a spare token another loaded embedding already uses; choose another trigger word")
        if own is not None and own in self.tokenizer.free_spare_ids():  # the trigger *is* a spare token, e.g. "<new3>"
            spare = [i for i in self.tokenizer.free_spare_ids() if i != own]
        else:
            spare = self.tokenizer.free_spare_ids()
        needed = count - (own is not None)
        if needed > len(spare):
            raise ValueError(
                f"{name!r} needs {needed} spare token(s) but the toy tokenizer has {len(spare)} free "
                f"(16 spare <newN> tokens, the rest held by {sorted(self.tokenizer.added)}); use fewer vectors"
            )
        ids = ([own] if own is not None else []) + spare[:needed]
        self.tokenizer.add_word(word, ids)
        self.word = word
        return ids

    def expand(self, prompt: str) -> str:
        return prompt

    def word_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        body = ids[1 : ids.index(self.tokenizer.eos_id)]
        return body

    def known_single_token(self, word: str) -> int | None:
        return self.tokenizer.ids.get(word.lower())

    def remove(self) -> None:
        if self.word is not None:
            self.tokenizer.remove_word(self.word)
            self.word = None


def tokenizer_side(tokenizer, *, a1111: bool = False) -> TokenizerSide:
    """The :class:`TokenizerSide` for ``tokenizer`` (a new one per embedding).

    ``a1111``: on a transformers tokenizer, a name of several tokens is matched by its token ids as A1111 matches
    it (:class:`CLIPTokenizerSide`), not added as a token diffusers' pipelines match as text; the toy tokenizer
    ignores it.

    Raises:
        TypeError: a tokenizer sdadapt cannot add tokens to (says which kinds work).
    """
    if all(hasattr(tokenizer, a) for a in ("add_word", "remove_word", "free_spare_ids", "added", "ids")):
        return WordTableSide(tokenizer)
    if all(hasattr(tokenizer, a) for a in ("add_tokens", "convert_tokens_to_ids", "get_vocab")):
        return CLIPTokenizerSide(tokenizer, a1111=a1111)
    raise TypeError(
        f"cannot add embedding tokens to a {type(tokenizer).__name__}: sdadapt works with transformers tokenizers "
        "(CLIPTokenizer) and the toy tokenizer (added-word table)"
    )
