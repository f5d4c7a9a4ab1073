"""Textual inversion (Gal et al. 2022): learn ``k`` new token vectors for a trigger word; nothing else trains.

The trigger's rows are injected with :func:`sdadapt.inject_embedding` (hooks on the token
embedding; only the ``(k, dim)`` rows get gradients and optimiser state) and trained with the
shared step on cached latents through the fit loop; the system's UNet and text encoder are frozen
while it trains (their ``requires_grad`` flags come back on ``remove()``). Saved with
:func:`sdadapt.save_embedding`: ``.safetensors`` in kohya's layout (``emb_params``; A1111, ComfyUI,
kohya read it, diffusers with ``token=``) or ``.pt`` as A1111's own dict.

Captions: the images' own captions containing the trigger word, or :func:`template_captions`
(the textual-inversion paper's "a photo of a {}" object templates, or the style templates);
:func:`trigger_captions` mixes both and gives captions without the trigger a caption template
(A1111's ``[name], [filewords]``: ``"{token}, {caption}"``) — or refuses them without one.
On the toy model the trigger may be a held-out word ("purple"): its own (never trained) row is the
starting point and stays the first token; extra vectors take the spare ``<newN>`` tokens.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..embeddings import (
    ENCODER_KEY,
    SDXL_KEYS,
    Embedding,
    EmbeddingHandle,
    find_token_embedding,
    initial_embedding,
    inject_embedding,
)
from ..embeddings.inject import _WIDTHS
from ..errors import InputError
from ..formats.embeddings import load_embedding, save_embedding
from .system import system_models

__all__ = [
    "DEFAULT_CAPTION_TEMPLATE",
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "TEMPLATE_SETS",
    "TextualInversion",
    "caption_template",
    "mentions",
    "norm_penalty",
    "prepare_textual_inversion",
    "starting_embedding",
    "system_text_parts",
    "template_captions",
    "trigger_captions",
]

#: the textual-inversion paper's object templates (``imagenet_templates_small`` in diffusers' and kohya's scripts)
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
    "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
    "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
#: the paper's style templates (``imagenet_style_templates_small``)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def template_captions(token: str, count: int, *, templates: Sequence[str] = OBJECT_TEMPLATES, seed: int = 0) -> list[str]:
    """``count`` captions, each a random template (seeded) with ``{}`` -> ``token``.

    Raises:
        ValueError: no templates, or a template without ``{}``.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be non-empty strings with a '{}' where the trigger word goes")
    rng = random.Random(seed)
    return [rng.choice(list(templates)).format(token) for _ in range(count)]


#: the template sets by name (``train --templates object|style``)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
#: what a caption that lacks the trigger word becomes by default: A1111's ``[name], [filewords]``
DEFAULT_CAPTION_TEMPLATE = "{token}, {caption}"
_A1111_FIELDS = {"[name]": "{token}", "[filewords]": "{caption}"}


def caption_template(text: str) -> str:
    """Check a caption template and return it in ``str.format`` form.

    ``{token}`` is the trigger word, ``{caption}`` the image's own caption (optional: without it
    the caption is replaced). A1111's spelling works too: ``[name]``, ``[filewords]``
    (``"a photo of a [name], [filewords]"`` = ``"a photo of a {token}, {caption}"``).

    Raises:
        ValueError: no ``{token}``, another ``{field}``, or unbalanced braces.
    """
    import string

    for a1111, ours in _A1111_FIELDS.items():
        text = text.replace(a1111, ours)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:
        raise ValueError(f"caption template {text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(set(fields) - {"token", "caption"})
    if unknown or "token" not in fields:
        raise ValueError(f"caption template {text!r}: use {{token}} (the trigger word, required) and {{caption}} (the "
                         f"image's caption){'; unknown field(s) ' + ', '.join(repr(f) for f in unknown) if unknown else ''}; "
                         "e.g. 'a photo of {token}, {caption}' (A1111: '[name], [filewords]')")
    return text


def trigger_captions(
    captions: Sequence[str | None],
    token: str,
    *,
    templates: Sequence[str] = OBJECT_TEMPLATES,
    seed: int = 0,
    template: str | None = None,
) -> list[str]:
    """Training captions for a trigger word, one per image:

    * an image's own caption that mentions ``token``: as it is;
    * an image without a caption (``None`` or empty): a random one of ``templates`` (seeded;
      the textual-inversion paper's "a photo of a {}" set by default) with ``token``;
    * a caption that does not mention ``token``: ``template`` filled in
      (:func:`caption_template`: ``{token}``, ``{caption}``; e.g. :data:`DEFAULT_CAPTION_TEMPLATE`
      ``"{token}, {caption}"``); with ``template=None`` such a caption is refused.

    Raises:
        ValueError: a caption that does not mention ``token`` and no ``template`` (its image would
            not train the vectors; names one), a bad template, or no captions.
    """
    if not captions:
        raise ValueError("no captions: need one per image (None or '' for a template caption)")
    form = caption_template(template) if template is not None else None
    fill = iter(template_captions(token, len(captions), templates=templates, seed=seed))
    out = []
    for caption in captions:
        if not caption:
            out.append(next(fill))
        elif form is not None and not mentions(caption, token):
            out.append(form.format(token=token, caption=caption))
        else:
            out.append(caption)
    missing = [c for c in out if not mentions(c, token)]
    if missing:
        raise ValueError(
            f"{len(missing)} caption(s) do not mention the trigger word {token!r} (e.g. {missing[0]!r}); put the word in "
            "every caption, leave captions out to use template captions, or pass a caption template "
            "(--caption-template '{token}, {caption}')"
        )
    return out


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def mentions(caption: str, token: str) -> bool:
    """Whether ``caption`` uses ``token`` as a word (case-insensitive; ``purple-neg`` does not mention ``purple``)."""
    return _word_pattern(token).search(caption) is not None


def norm_penalty(rows: Tensor, target: float) -> Tensor:
    """``mean_i (‖v_i‖ − target)²`` over the rows ``(k, dim)``: keeps learned vectors at the scale of
    the vocabulary's own (``target`` = mean row norm of the token table), so they stay editable in prompts."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # (k, dim), at least float32
    return (rows.norm(dim=-1) - target).pow(2).mean()


def system_text_parts(system) -> tuple[object, object, bool]:
    """``(text encoder(s), tokenizer(s), is_sdxl)`` of a system: ``text_encoder`` + ``tokenizer``, and
    for an SDXL-style system also ``text_encoder_2`` + ``tokenizer_2`` (as ``{"clip_l", "clip_g"}``).

    Raises:
        TypeError: the system has no ``tokenizer`` (embedding methods add tokens to it).
    """
    tokenizer = getattr(system, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(
            f"{type(system).__name__} has no `tokenizer`: embedding methods (textual inversion, DreamArtist) add the "
            "trigger word to the tokenizer that `tokenize` uses; give the system a `tokenizer` attribute"
        )
    if getattr(system, "text_encoder_2", None) is not None:
        return ({"clip_l": system.text_encoder, "clip_g": system.text_encoder_2},
                {"clip_l": tokenizer, "clip_g": getattr(system, "tokenizer_2", None) or tokenizer}, True)
    return system.text_encoder, tokenizer, False


class _Frozen:
    """Freeze modules' parameters for training; put every ``requires_grad`` flag back on ``restore``."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)

    def restore(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _trained_modules(system) -> list[nn.Module]:
    return [m for _, m in system_models(system)]


def _table_norms(text_encoder) -> dict[str, float]:
    """Each token table's mean row norm, by the embedding handle's row key (``text_encoder``; SDXL ``clip_l`` and
    ``clip_g``: their tables' scales differ, so each encoder's rows keep their own)."""
    encoders = text_encoder if isinstance(text_encoder, dict) else {ENCODER_KEY: text_encoder}
    return {key: float(find_token_embedding(e)[1].weight.detach().float().norm(dim=-1).mean())
            for key, e in encoders.items()}


class TextualInversion:
    """A trigger word's rows injected into a system, trainable, with the fit loop's optional hooks.

    Attributes:
        params: the ``(k, dim)`` row parameter(s) — one per text encoder.
        handle: the :class:`~sdadapt.embeddings.EmbeddingHandle` (``handle.embedding()`` is the current state).
        token: the trigger word.
    """

    def __init__(self, system, embedding: Embedding, *, norm_weight: float = 0.0) -> None:
        if norm_weight < 0:
            raise ValueError(f"norm_weight must be >= 0, got {norm_weight}")
        encoders, tokenizers, _ = system_text_parts(system)
        self.system, self.token, self.base_model = system, embedding.name, system.base_model
        self.norm_weight = norm_weight
        self._target_norms = _table_norms(encoders)
        self._frozen = _Frozen(_trained_modules(system))
        try:
            self.handle: EmbeddingHandle = inject_embedding(encoders, tokenizers, embedding, trainable=True)
        except BaseException:
            self._frozen.restore()
            raise
        self.params: list[nn.Parameter] = self.handle.parameters()
        #: fit-loop hook: an extra loss term (norm regularisation), or None
        self.extra_loss = self._norm_loss if norm_weight > 0 else None

    # ------------------------------------------------------------------ fit-loop hooks
    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids of ``captions`` with the trigger spelled as its ``k`` tokens (captions that do
        not mention the trigger train nothing: see :func:`trigger_captions`)."""
        return self.system.tokenize([self.handle.expand(c) for c in captions])

    def _norm_loss(self, prepared, prediction: Tensor) -> Tensor:
        rows = self.handle.rows.items()
        return self.norm_weight * sum(norm_penalty(r.rows, self._target_norms[key]) for key, r in rows)

    def expand(self, prompt: str) -> str:
        """A prompt as the system's tokenizer must see it (see :meth:`EmbeddingHandle.expand`)."""
        return self.handle.expand(prompt)

    # ------------------------------------------------------------------ results
    def embedding(self, *, step: int | None = None, metadata: dict[str, str] | None = None) -> Embedding:
        return self.handle.embedding(step=step, metadata=metadata)

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None, format: str | None = None) -> Path:
        """Write the embedding: ``.safetensors`` as kohya's layout (``emb_params`` + ModelSpec
        metadata; A1111 reads it), ``.pt`` as A1111's dict, or ``format`` explicitly. The trigger
        A1111 uses is the file stem. A training run's ``ss_steps`` / base-model hash and name become A1111's
        ``step`` / ``sd_checkpoint`` / ``sd_checkpoint_name`` (:func:`~sdadapt.formats.a1111_fields.trained_embedding`;
        A1111's "continue training" starts from that step)."""
        from ..formats.a1111_fields import trained_embedding

        target = Path(path)
        fmt = format or ("kohya" if target.suffix.lower() == ".safetensors" else "a1111")
        emb = trained_embedding(target.stem, self.handle.embedding().vectors, metadata=metadata)
        return save_embedding(target, emb, format=fmt, base_model=self.base_model)

    def remove(self) -> None:
        """Rows out of the encoder, tokens out of the tokenizer, ``requires_grad`` flags back."""
        self.handle.remove()
        self._frozen.restore()


def _width_name(width: int) -> str:
    """``"768 wide: SD1 / SDXL CLIP-L"`` (the usual text encoders' token-table widths: :mod:`sdadapt.embeddings.inject`'s)."""
    return f"{width} wide: {_WIDTHS[width]}" if width in _WIDTHS else f"{width} wide"


def starting_embedding(path: str | os.PathLike, *, token: str, vectors: int, text_encoder, sdxl: bool,
                       flag: str = "--vectors") -> Embedding:
    """kohya's ``--weights`` of textual inversion (``--init-weights``): the vectors of an embedding file to start from.

    Reads what :func:`sdadapt.load_embedding` reads (kohya ``emb_params``, A1111 ``string_to_param``
    ``.pt`` / ``.safetensors``, diffusers ``{token: tensor}``, SDXL ``clip_l`` + ``clip_g``) and
    returns it as the trigger ``token``'s embedding, each block ``(vectors, dim)`` cast to its token
    table's dtype — as kohya copies the rows into the table (``train_textual_inversion.py``
    ``load_weights``; ``sdxl_train_textual_inversion.py`` for the SDXL pair).

    Args:
        text_encoder: the system's text encoder, or ``{"clip_l": ..., "clip_g": ...}`` (``sdxl``).
        flag: the option that sets ``vectors``, for the message.

    Raises:
        WeightFileError: a missing, unreadable or non-embedding file (naming it).
        InputError: a file for another model (an SD1/SD2 file for an SDXL model or the reverse, or
            vectors of another width than the token table's: SD1 768, SD2 1024, SDXL 768 + 1280), or
            another vector count than ``vectors`` (kohya refuses it too: set ``--vectors``, kohya's
            ``num_vectors_per_token``, to the file's count).
    """
    loaded = load_embedding(path)
    if loaded.is_sdxl != sdxl:
        have = "an SDXL embedding (clip_l + clip_g)" if loaded.is_sdxl else \
            f"an SD1/SD2 embedding (one table, {_width_name(next(iter(loaded.vectors.values())).shape[1])})"
        want = "SDXL (clip_l + clip_g vectors)" if sdxl else "SD1/SD2 (one text encoder)"
        raise InputError(f"--init-weights {path}: {have}, but the model is {want}; give an embedding trained on this model "
                         "family")
    encoders = text_encoder if sdxl else {ENCODER_KEY: text_encoder}
    out: dict[str, Tensor] = {}
    for key in (SDXL_KEYS if sdxl else (ENCODER_KEY,)):
        rows = loaded.vectors[key]  # (k, dim)
        table = find_token_embedding(encoders[key])[1].weight
        if rows.shape[1] != table.shape[1]:
            where = f"its {key} vectors" if sdxl else "its vectors"
            raise InputError(f"--init-weights {path}: {where} are {_width_name(rows.shape[1])}, but the model's "
                             f"{'token table' if not sdxl else key + ' token table'} is {_width_name(table.shape[1])}; "
                             "give an embedding trained on this model family")
        if rows.shape[0] != vectors:
            raise InputError(f"--init-weights {path}: it has {rows.shape[0]} vector(s) per token, the run {vectors}; set "
                             f"{flag} {rows.shape[0]} (kohya's num_vectors_per_token, which refuses the mismatch too)")
        out[key] = rows.detach().to(device="cpu", dtype=table.dtype).clone()
    return Embedding(token, out)


def prepare_textual_inversion(
    system,
    *,
    token: str,
    init_word: str | None = None,
    vectors: int = 1,
    norm_weight: float = 0.0,
    init_weights: str | os.PathLike | None = None,
) -> TextualInversion:
    """Textual inversion of ``token`` on ``system`` (the registered method ``textual-inversion``).

    Args:
        token: the trigger word the captions use (a new word such as ``"<sks>"``, or on the toy
            model a held-out word such as ``"purple"``).
        init_word: start every vector from this word's token rows (cycled over its tokens);
            ``None``: the trigger's own row when the vocabulary knows it as one token, else random
            (see :func:`sdadapt.embeddings.initial_embedding`).
        vectors: ``k``, how many tokens the trigger becomes.
        norm_weight: weight of :func:`norm_penalty` (0: off).
        init_weights: start from this embedding file's vectors instead (kohya's ``--weights``;
            ``init_word`` is then unused, as kohya overwrites its rows): :func:`starting_embedding`.
    """
    encoders, tokenizers, sdxl = system_text_parts(system)
    if init_weights is not None:
        embedding = starting_embedding(init_weights, token=token, vectors=vectors, text_encoder=encoders, sdxl=sdxl)
    else:
        embedding = initial_embedding(encoders, tokenizers, token, vectors=vectors, init_word=init_word, sdxl=sdxl)
    return TextualInversion(system, embedding, norm_weight=norm_weight)
