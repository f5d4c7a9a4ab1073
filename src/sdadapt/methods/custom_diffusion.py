"""Custom Diffusion (Kumari et al. 2023): cross-attention K/V (optionally Q/out) + a modifier token.

What trains: every cross-attention (``attn2``) ``to_k`` and ``to_v`` weight of the UNet (with
``train_q_out`` also ``to_q`` and ``to_out.0``), and the modifier token's row (the trigger word,
injected with :func:`sdadapt.inject_embedding`, so the token table's other rows get no gradient);
nothing else. Several modifier tokens train jointly as diffusers' ``--modifier_token "<new1>+<new2>"``
(one row each, all rows and weights in one optimiser; :func:`modifier_tokens`). As in the paper and diffusers' processor, the key and value at token position 0
(BOS) are detached: a forward hook on ``to_k``/``to_v`` returns ``cat(out[:, :1].detach(), out[:, 1:])``
— the same values, gradients only from positions ≥ 1. Prior preservation with class images
(``prior="auto"``) as DreamBooth's.

Saved as diffusers' Custom Diffusion file (``.safetensors``; ``.bin`` by suffix) + the token beside it
(``<stem>-token.safetensors``, a diffusers textual-inversion file; several tokens: ``-token1``,
``-token2`` ... in token order), the training prompts and tokens in the metadata (the multi-concept merge reads them). ``remove()`` puts the UNet weights, the
``requires_grad`` flags, the text encoder and the tokenizer back exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..custom_diffusion.weights import (
    cross_attention_layers,
    custom_diffusion_parameters,
)
from ..formats.custom_diffusion import existing_token_files, save_custom_diffusion_file, token_files
from .textual_inversion import TextualInversion, mentions, prepare_textual_inversion

__all__ = ["CustomDiffusion", "SDXL_REFUSAL", "companion_token_files", "detach_first_token", "modifier_tokens",
           "prepare_custom_diffusion"]

#: why Custom Diffusion refuses an SDXL-layout model (two text encoders; Playground v2.5 and the refiner too): said by
#: :func:`prepare_custom_diffusion` on a loaded system, and by ``train`` from the model's header before the load
#: (:func:`sdadapt.jobs.model_size.model_is_sdxl`)
SDXL_REFUSAL = ("custom-diffusion supports one-text-encoder models (SD1/SD2, the toy); SDXL's two-encoder modifier "
                "tokens have no Custom Diffusion file format")

#: the most training prompts recorded in the file's metadata (the merge's target features)
MAX_RECORDED_PROMPTS = 64


def detach_first_token(module: nn.Module, inputs, output: Tensor) -> Tensor:
    """Forward hook: ``output`` (B, L, D) with position 0 detached — values unchanged, no gradient
    flows through the BOS token's key/value (Custom Diffusion's training detail)."""
    if not isinstance(output, Tensor) or output.ndim != 3 or output.shape[1] < 1:
        return output
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def modifier_tokens(token: str | Sequence[str], init_word: str | Sequence[str] | None = None
                    ) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """The modifier tokens and each one's init word, checked (diffusers' ``--modifier_token "<new1>+<new2>"``
    and ``--initializer_token "ktn+pll"``).

    Args:
        token: one token, several joined with ``+`` (``"<new1>+<new2>"``), or a sequence of them.
        init_word: ``None`` (each token's default start), one word for every token, or one per token
            (``"ktn+pll"`` or a sequence of the tokens' length; ``None`` items: that token's default).

    Returns:
        ``(tokens, init_words)``, tuples of the same length.

    Raises:
        ValueError: an empty token or init word, a token given twice (case-insensitive, as captions
            match it), or an init-word count that is neither 1 nor the tokens' count.
        TypeError: a token or init word that is not a string.
    """
    tokens = _parts(token, "token")
    if not tokens:
        raise ValueError("custom-diffusion: no modifier token; pass one ('<new1>') or several joined with '+' ('<new1>+<new2>')")
    bad = [t for t in tokens if not t or not t.strip() or t != t.strip()]
    if bad:
        raise ValueError(f"custom-diffusion: empty modifier token or one with spaces around it in {token!r}; write the "
                         "tokens joined with '+' and nothing between them, e.g. '<new1>+<new2>'")
    seen: dict[str, str] = {}
    for t in tokens:
        if t.lower() in seen:
            raise ValueError(f"custom-diffusion: the modifier token {t!r} is given twice ({seen[t.lower()]!r}); each concept "
                             "needs its own token, e.g. '<new1>+<new2>'")
        seen[t.lower()] = t
    if init_word is None:
        return tokens, (None,) * len(tokens)
    words = _parts(init_word, "init_word", allow_none=True)
    if any(w is not None and (not w or not w.strip()) for w in words):
        raise ValueError(f"custom-diffusion: empty init word in {init_word!r}; give one word per token joined with '+' "
                         "(e.g. 'ktn+pll'), or one word for all")
    if len(words) == 1:
        return tokens, words * len(tokens)
    if len(words) != len(tokens):
        raise ValueError(f"custom-diffusion: {len(words)} init words ({init_word!r}) for {len(tokens)} modifier tokens "
                         f"({'+'.join(tokens)}); give one per token joined with '+' (e.g. "
                         f"{'+'.join(['ktn', 'pll', 'ucd'][:len(tokens)] + ['xyz'] * max(0, len(tokens) - 3))!r}) or one "
                         "word for all")
    return tokens, words


def _parts(value, what: str, *, allow_none: bool = False) -> tuple:
    if isinstance(value, str):
        return tuple(value.split("+"))
    if isinstance(value, Sequence):
        items = tuple(value)
        wrong = [v for v in items if not isinstance(v, str) and not (allow_none and v is None)]
        if not wrong:
            return items
    raise TypeError(f"custom-diffusion: {what} must be a string ('<new1>', '<new1>+<new2>') or a sequence of strings, "
                    f"got {value!r}")


def companion_token_files(path: Path) -> tuple[Path, ...]:
    """The token files a save to ``path`` owns: the ``<stem>-token<suffix>`` it writes, and any
    ``<stem>-token<N><suffix>`` already there (an earlier multi-token save; saving removes them), so
    ``train`` refuses to touch them without ``--overwrite``."""
    written = token_files(path, 1)
    return (*written, *(p for p in existing_token_files(path) if p not in written))


class CustomDiffusion:
    """Custom Diffusion training state on a system: the modifier tokens' rows + the ``attn2`` weights.

    Attributes:
        params: ``[token rows…, attn2 weights…]`` (the rows in token order; the weights are the UNet's
            own parameters, trained in place).
        lr_scales: the token rows' learning-rate factor, then 1 for each weight.
        inversions: one :class:`TextualInversion` (one ``(1, dim)`` row) per modifier token.
        inversion: the first of them.
        tokens: the modifier tokens.
        token: the first (or only) modifier token.
    """

    def __init__(self, system, inversion: TextualInversion | Sequence[TextualInversion], *, train_q_out: bool = False,
                 token_lr_scale: float = 1.0) -> None:
        inversions = (inversion,) if isinstance(inversion, TextualInversion) else tuple(inversion)
        self.system, self.inversions = system, inversions
        self.inversion, self.token = inversions[0], inversions[0].token
        self.tokens = tuple(inv.token for inv in inversions)
        self.train_q_out = train_q_out
        self.prompts: list[str] = []
        self.layers = cross_attention_layers(system.unet)
        if not self.layers:
            _remove_all(inversions)
            raise ValueError(f"{type(system.unet).__name__} has no cross-attention (attn2) layers with to_k/to_v: nothing for Custom Diffusion to train")
        self._weights: list[tuple[str, nn.Parameter]] = list(custom_diffusion_parameters(self.layers, train_q_out=train_q_out).items())
        self._originals = [(p, p.detach().clone()) for _, p in self._weights]
        for _, param in self._weights:
            param.requires_grad_(True)  # the inversion froze everything; its restore() puts every flag back
        self._hooks = [getattr(layer.module, proj).register_forward_hook(detach_first_token)
                       for layer in self.layers.values() for proj in ("to_k", "to_v")]
        rows = [row for inv in inversions for row in inv.params]
        self.params: list[nn.Parameter] = [*rows, *(p for _, p in self._weights)]
        self.lr_scales = [token_lr_scale] * len(rows) + [1.0] * len(self._weights)

    # ------------------------------------------------------------------ fit-loop hooks
    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids with the modifier tokens spelled out; the (unique) captions that use a token are
        kept for the file (class-image captions are not the concept's)."""
        for caption in captions:
            if len(self.prompts) >= MAX_RECORDED_PROMPTS:
                break
            if caption not in self.prompts and any(mentions(caption, token) for token in self.tokens):
                self.prompts.append(caption)
        return self.system.tokenize([self.expand(c) for c in captions])

    def expand(self, prompt: str) -> str:
        """A prompt as the system's tokenizer must see it (each token's :meth:`TextualInversion.expand`)."""
        for inv in self.inversions:
            prompt = inv.expand(prompt)
        return prompt

    # ------------------------------------------------------------------ results
    def state_dict(self) -> dict[str, Tensor]:
        """The trained weights with diffusers' Custom Diffusion keys (detached CPU copies)."""
        return {key: param.detach().to("cpu").clone() for key, param in self._weights}

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the diffusers Custom Diffusion file (``.safetensors``, ``.bin`` by suffix) and the
        modifier tokens beside it (:func:`sdadapt.formats.custom_diffusion.token_files`: ``-token``, or
        ``-token1`` ... in token order); returns the weights file's path."""
        target = Path(path)
        from ..embeddings import Embedding

        embeddings = [Embedding(inv.token, inv.embedding().vectors, metadata={}) for inv in self.inversions]
        prompts = [p for p in self.prompts if p.strip()]
        written = save_custom_diffusion_file(target, self.state_dict(), embeddings=embeddings, prompts=prompts,
                                             metadata=dict(metadata or {}))
        return written[0]

    @torch.no_grad()
    def remove(self) -> None:
        """Weights back bit for bit, hooks off, token out, every ``requires_grad`` flag back (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for param, original in self._originals:
            param.copy_(original)
        _remove_all(self.inversions)


def _remove_all(inversions: Sequence[TextualInversion]) -> None:
    """Remove the modifier tokens' inversions, the last injected first (each one's flags and tokens back in turn)."""
    for inv in reversed(inversions):
        inv.remove()


def prepare_custom_diffusion(
    system,
    *,
    token: str | Sequence[str],
    init_word: str | Sequence[str | None] | None = None,
    train_q_out: bool = False,
    token_lr_scale: float = 10.0,
) -> CustomDiffusion:
    """Custom Diffusion on ``system`` (the registered method ``custom-diffusion``).

    Args:
        token: the modifier token the captions use (``"<new1>"``; on the toy model a held-out word works too),
            or several trained jointly: ``"<new1>+<new2>"`` (diffusers' ``--modifier_token`` syntax) or a
            sequence of tokens (:func:`modifier_tokens`).
        init_word: start the token's row from this word's (the paper: a rare word such as ``"ktn"``;
            default: the token's own row when the vocabulary has it, else random); with several tokens
            one word for all or one per token (``"ktn+pll"``, diffusers' ``--initializer_token``).
        train_q_out: also train ``to_q`` and ``to_out.0`` of the cross-attention (diffusers' ``--freeze_model crossattn``).
        token_lr_scale: each token row's learning rate relative to the weights' (the row is a small
            vector that needs larger steps than the projection weights; 1 is diffusers' one rate for both).

    Raises:
        ValueError: ``token_lr_scale`` not a finite number >= 0; bad tokens or init words (:func:`modifier_tokens`).
    """
    if isinstance(token_lr_scale, bool) or not isinstance(token_lr_scale, (int, float)) \
            or not math.isfinite(token_lr_scale) or token_lr_scale < 0:
        raise ValueError(f"custom-diffusion: token_lr_scale must be a finite number >= 0 (1 = the weights' rate, "
                         f"diffusers'; default 10), got {token_lr_scale!r}")
    if getattr(system, "text_encoder_2", None) is not None:  # (train refuses it before the load where the header tells)
        raise ValueError(SDXL_REFUSAL)
    tokens, words = modifier_tokens(token, init_word)
    inversions: list[TextualInversion] = []
    try:
        for one, word in zip(tokens, words):
            inversions.append(prepare_textual_inversion(system, token=one, init_word=word, vectors=1))
    except BaseException:
        _remove_all(inversions)
        raise
    return CustomDiffusion(system, inversions, train_q_out=train_q_out, token_lr_scale=token_lr_scale)
