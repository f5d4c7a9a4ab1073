"""Custom Diffusion (Kumari et al. 2023): cross-attention K/V (optionally Q/out) + a modifier token.

What trains: every cross-attention (``attn2``) ``to_k`` and ``to_v`` weight of the UNet (with
``train_q_out`` also ``to_q`` and ``to_out.0``), and the modifier token's row (the trigger word,
injected with :func:`sdadapt.inject_embedding`, so the token table's other rows get no gradient);
nothing else. As in the paper and diffusers' processor, the key and value at token position 0
(BOS) are detached: a forward hook on ``to_k``/``to_v`` returns ``cat(out[:, :1].detach(), out[:, 1:])``
— the same values, gradients only from positions ≥ 1. Prior preservation with class images
(``prior="auto"``) as DreamBooth's.

Saved as diffusers' Custom Diffusion file (``.safetensors``; ``.bin`` by suffix) + the token beside it
(``<stem>-token.safetensors``, a diffusers textual-inversion file), the training prompts and token in
the metadata (the multi-concept merge reads them). ``remove()`` puts the UNet weights, the
``requires_grad`` flags, the text encoder and the tokenizer back exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..custom_diffusion.weights import (
    cross_attention_layers,
    custom_diffusion_parameters,
)
from ..formats.custom_diffusion import existing_token_files, save_custom_diffusion_file, token_files
from .textual_inversion import TextualInversion, mentions, prepare_textual_inversion

__all__ = ["CustomDiffusion", "companion_token_files", "detach_first_token", "prepare_custom_diffusion"]

#: the most training prompts recorded in the file's metadata (the merge's target features)
MAX_RECORDED_PROMPTS = 64


def detach_first_token(module: nn.Module, inputs, output: Tensor) -> Tensor:
    """Forward hook: ``output`` (B, L, D) with position 0 detached — values unchanged, no gradient
    flows through the BOS token's key/value (Custom Diffusion's training detail)."""
    if not isinstance(output, Tensor) or output.ndim != 3 or output.shape[1] < 1:
        return output
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def companion_token_files(path: Path) -> tuple[Path, ...]:
    """The token files a save to ``path`` owns: the ``<stem>-token<suffix>`` it writes, and any
    ``<stem>-token<N><suffix>`` already there (an earlier multi-token save; saving removes them), so
    ``train`` refuses to touch them without ``--overwrite``."""
    written = token_files(path, 1)
    return (*written, *(p for p in existing_token_files(path) if p not in written))


class CustomDiffusion:
    """Custom Diffusion training state on a system: the trigger's rows + the ``attn2`` weights.

    Attributes:
        params: ``[token rows…, attn2 weights…]`` (the UNet's own parameters, trained in place).
        lr_scales: the token rows' learning-rate factor, then 1 for each weight.
        token: the modifier token.
    """

    def __init__(self, system, inversion: TextualInversion, *, train_q_out: bool = False, token_lr_scale: float = 1.0) -> None:
        self.system, self.inversion, self.token = system, inversion, inversion.token
        self.train_q_out = train_q_out
        self.prompts: list[str] = []
        self.layers = cross_attention_layers(system.unet)
        if not self.layers:
            inversion.remove()
            raise ValueError(f"{type(system.unet).__name__} has no cross-attention (attn2) layers with to_k/to_v: nothing for Custom Diffusion to train")
        self._weights: list[tuple[str, nn.Parameter]] = list(custom_diffusion_parameters(self.layers, train_q_out=train_q_out).items())
        self._originals = [(p, p.detach().clone()) for _, p in self._weights]
        for _, param in self._weights:
            param.requires_grad_(True)  # the inversion froze everything; its restore() puts every flag back
        self._hooks = [getattr(layer.module, proj).register_forward_hook(detach_first_token)
                       for layer in self.layers.values() for proj in ("to_k", "to_v")]
        rows = inversion.params
        self.params: list[nn.Parameter] = [*rows, *(p for _, p in self._weights)]
        self.lr_scales = [token_lr_scale] * len(rows) + [1.0] * len(self._weights)

    # ------------------------------------------------------------------ fit-loop hooks
    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids with the modifier token spelled out; the (unique) captions that use the token are
        kept for the file (class-image captions are not the concept's)."""
        for caption in captions:
            if len(self.prompts) >= MAX_RECORDED_PROMPTS:
                break
            if caption not in self.prompts and mentions(caption, self.token):
                self.prompts.append(caption)
        return self.inversion.tokenize(captions)

    def expand(self, prompt: str) -> str:
        return self.inversion.expand(prompt)

    # ------------------------------------------------------------------ results
    def state_dict(self) -> dict[str, Tensor]:
        """The trained weights with diffusers' Custom Diffusion keys (detached CPU copies)."""
        return {key: param.detach().to("cpu").clone() for key, param in self._weights}

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the diffusers Custom Diffusion file (``.safetensors``, ``.bin`` by suffix) and the
        modifier token beside it (:func:`companion_token_files`); returns the weights file's path."""
        target = Path(path)
        embedding = self.inversion.embedding()
        from ..embeddings import Embedding

        embedding = Embedding(self.token, embedding.vectors, metadata={})
        prompts = [p for p in self.prompts if p.strip()]
        written = save_custom_diffusion_file(target, self.state_dict(), embeddings=[embedding], prompts=prompts,
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
        self.inversion.remove()


def prepare_custom_diffusion(
    system,
    *,
    token: str,
    init_word: str | None = None,
    train_q_out: bool = False,
    token_lr_scale: float = 10.0,
) -> CustomDiffusion:
    """Custom Diffusion on ``system`` (the registered method ``custom-diffusion``).

    Args:
        token: the modifier token the captions use (``"<new1>"``; on the toy model a held-out word works too).
        init_word: start the token's row from this word's (the paper: a rare word such as ``"ktn"``;
            default: the token's own row when the vocabulary has it, else random).
        train_q_out: also train ``to_q`` and ``to_out.0`` of the cross-attention (diffusers' ``--freeze_model crossattn``).
        token_lr_scale: the token row's learning rate relative to the weights' (the row is a small
            vector that needs larger steps than the projection weights; 1 is diffusers' one rate for both).

    Raises:
        ValueError: ``token_lr_scale`` not a finite number >= 0.
    """
    if isinstance(token_lr_scale, bool) or not isinstance(token_lr_scale, (int, float)) \
            or not math.isfinite(token_lr_scale) or token_lr_scale < 0:
        raise ValueError(f"custom-diffusion: token_lr_scale must be a finite number >= 0 (1 = the weights' rate, "
                         f"diffusers'; default 10), got {token_lr_scale!r}")
    if getattr(system, "text_encoder_2", None) is not None:
        raise ValueError("custom-diffusion supports one-text-encoder models (SD1/SD2, the toy); SDXL's two-encoder "
                         "modifier tokens have no Custom Diffusion file format")
    inversion = prepare_textual_inversion(system, token=token, init_word=init_word, vectors=1)
    return CustomDiffusion(system, inversion, train_q_out=train_q_out, token_lr_scale=token_lr_scale)
