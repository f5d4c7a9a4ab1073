"""DreamArtist (Dong et al. 2022): a positive and a negative embedding trained jointly through CFG.

The positive trigger ``name`` and the negative ``name-neg`` are two textual-inversion embeddings.
Each step runs the UNet on ``[x_t, x_t]`` with the negative caption (the trigger replaced by
``name-neg``) and the positive caption, and trains both embeddings on the classifier-free-guided
prediction — the learned negative plays the unconditional branch::

    ε̂ = ε_neg + s · (ε_pos − ε_neg)                         (cfg_combine)
    s(t) = s_low + (s_high − s_low) · f(t / (T − 1))          (cfg_scale_at; f: ln = r, cos = sin(rπ/2), cos2 = 1 − cos(rπ/2))
    loss = ‖ε̂ − ε‖² (the shared step's loss) [+ λ_rec · |D(x̂0(ε̂)) − D(x0)|₁, through the decoder]

(the DreamArtist repositories' ``p_losses_hook`` / ``DreamArtistPTContext``). Files: two A1111
``.pt`` embeddings, ``<name>.pt`` and ``<name>-neg.pt`` — in A1111 put ``<name>`` in the prompt
and ``<name>-neg`` in the negative prompt, CFG scale near the training value.
:func:`sample_dreamartist` does that with sdadapt.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..embeddings import Embedding, EmbeddingHandle, initial_embedding, inject_embedding
from ..errors import InputError
from ..formats.a1111_fields import trained_embedding
from ..formats.embeddings import load_embedding, save_embedding
from ..formats.files import staged_outputs
from ..training import diffusion
from .textual_inversion import (
    _Frozen,
    _trained_modules,
    _word_pattern,
    starting_embedding,
    system_text_parts,
)

__all__ = [
    "CFG_SCHEDULES",
    "DreamArtist",
    "negative_files",
    "cfg_combine",
    "cfg_scale_at",
    "load_dreamartist",
    "negative_name",
    "parse_dynamic_cfg",
    "prepare_dreamartist",
    "replace_word",
    "sample_dreamartist",
]

CFG_SCHEDULES = ("ln", "cos", "cos2")


def cfg_combine(positive: Tensor, negative: Tensor, scale: Tensor | float) -> Tensor:
    """Classifier-free guidance ``ε_neg + s·(ε_pos − ε_neg)``; ``scale`` a float or ``(B, 1, 1, 1)``
    (:func:`sdadapt.training.diffusion.guidance_combine` with the learned negative as the unconditional)."""
    return diffusion.guidance_combine(negative, positive, scale)


def cfg_scale_at(t: Tensor, *, low: float, high: float | None = None, schedule: str = "ln", num_timesteps: int = 1000) -> Tensor:
    """The guidance scale per sample ``(B,)`` float64: ``low`` when ``high`` is ``None`` or equal;
    else ``low + (high − low)·f(r)``, ``r = t / (T − 1)``, ``f`` = ``r`` (``"ln"``), ``sin(rπ/2)`` (``"cos"``)
    or ``1 − cos(rπ/2)`` (``"cos2"``) — DreamArtist's ``"low-high:type"`` dynamic CFG.

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown CFG schedule {schedule!r}; choose one of {list(CFG_SCHEDULES)}")
    if high is None or high == low:
        return torch.full(t.shape, float(low), dtype=torch.float64, device=t.device)
    r = t.double() / (num_timesteps - 1)
    if schedule == "cos":
        r = torch.sin(r * math.pi / 2)  # = cos((r - 1)·π/2), DreamArtist's spelling
    elif schedule == "cos2":
        r = 1 - torch.cos(r * math.pi / 2)
    return low + (high - low) * r


def parse_dynamic_cfg(text: str | float) -> tuple[float, float | None, str]:
    """The extension's CFG field (``get_cfg_range``): ``"3"`` -> ``(3.0, None, "ln")``, ``"1.5-3.5"`` -> ``(1.5, 3.5,
    "ln")``, ``"1.5-3.5:cos"`` -> ``(1.5, 3.5, "cos")`` — ``(cfg_scale, cfg_high, cfg_schedule)`` of
    :func:`prepare_dreamartist`. A number is ``(number, None, "ln")``.

    Raises:
        ValueError: not of that form, or an unknown schedule (naming the field).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text), None, "ln"
    body, _, schedule = str(text).strip().partition(":")
    schedule = schedule.strip() or "ln"
    low, dash, high = body.partition("-")
    try:
        values = (float(low), float(high) if dash else None)
    except ValueError:
        raise ValueError(f"CFG scale {text!r}: a number (3), or DreamArtist's dynamic 'low-high' with an optional "
                         f"':type' ({', '.join(CFG_SCHEDULES)}), e.g. '1.5-3.5:cos'") from None
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"CFG scale {text!r}: unknown schedule {schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
    return values[0], values[1], schedule


def negative_name(name: str) -> str:
    """DreamArtist's negative trigger: ``<name>-neg``."""
    return f"{name}-neg"


def negative_files(path: Path) -> tuple[Path, ...]:
    """The negative file :meth:`DreamArtist.save` writes beside ``path``: ``<stem>-neg<suffix>``."""
    path = Path(path)
    return (path.with_name(negative_name(path.stem) + path.suffix),)


def replace_word(text: str, word: str, replacement: str) -> str:
    """``text`` with every whole-word ``word`` (case-insensitive) replaced by ``replacement``."""
    return _word_pattern(word).sub(lambda _m: replacement, text)


class DreamArtist:
    """Positive and negative embeddings injected into a system, trained through CFG by the fit loop.

    Attributes:
        params: ``[positive rows…, negative rows…]`` (one per text encoder each).
        lr_scales: ``1`` for the positive rows, ``neg_lr_weight`` for the negative ones.
        positive, negative: the :class:`~sdadapt.embeddings.EmbeddingHandle` s.
    """

    def __init__(self, system, positive: Embedding, negative: Embedding, *, cfg_scale: float = 3.0,
                 cfg_high: float | None = None, cfg_schedule: str = "ln", neg_lr_weight: float = 1.0,
                 rec_weight: float = 0.0) -> None:
        cfg_scale_at(torch.zeros(1), low=cfg_scale, high=cfg_high, schedule=cfg_schedule)  # validates the schedule
        if neg_lr_weight < 0 or rec_weight < 0:
            raise ValueError(f"neg_lr_weight and rec_weight must be >= 0, got {neg_lr_weight} and {rec_weight}")
        encoders, tokenizers, _ = system_text_parts(system)
        self.system, self.token, self.base_model = system, positive.name, system.base_model
        self.negative_token = negative.name
        self.cfg_scale, self.cfg_high, self.cfg_schedule = float(cfg_scale), cfg_high, cfg_schedule
        self.rec_weight = float(rec_weight)
        self._frozen = _Frozen(_trained_modules(system))
        self.positive: EmbeddingHandle | None = None
        try:
            self.positive = inject_embedding(encoders, tokenizers, positive, trainable=True)
            self.negative: EmbeddingHandle = inject_embedding(encoders, tokenizers, negative, trainable=True)
        except BaseException:
            if self.positive is not None:
                self.positive.remove()
            self._frozen.restore()
            raise
        pos, neg = self.positive.parameters(), self.negative.parameters()
        self.params: list[nn.Parameter] = pos + neg
        self.lr_scales = [1.0] * len(pos) + [float(neg_lr_weight)] * len(neg)
        #: fit-loop hook: the reconstruction loss through the system's decoder, or None
        self.extra_loss = self._reconstruction_loss if rec_weight > 0 else None

    # ------------------------------------------------------------------ prompts
    def negative_prompt(self, prompt: str) -> str:
        """The prompt with the trigger replaced by the negative trigger (what the negative branch sees)."""
        return replace_word(prompt, self.token, self.negative_token)

    def expand(self, prompt: str) -> str:
        """A prompt as the system's tokenizer must see it: each trigger spelled as its vectors' tokens."""
        return self.negative.expand(self.positive.expand(prompt))  # type: ignore[union-attr]

    # ------------------------------------------------------------------ fit-loop hooks
    def tokenize(self, captions: list[str]) -> Tensor:
        """``(N, 2, L)``: ids of each caption (``[:, 0]``) and of its negative caption (``[:, 1]``)."""
        pos = self.system.tokenize([self.expand(c) for c in captions])
        neg = self.system.tokenize([self.expand(self.negative_prompt(c)) for c in captions])
        return torch.stack([pos, neg], dim=1)

    def training_model(self, system):
        """``model(x_t, t, ids (B, 2, …)) -> ε̂`` — one UNet batch ``[negative; positive]``, CFG-combined
        (``ids`` may also be ``{"ids": (B, 2, …), "time_ids": …}``, SDXL's size-conditioned batch).

        Raises:
            ValueError: an EDM-formulation system (Playground v2.5): the CFG schedule reads DDPM timesteps.
        """
        if getattr(system, "edm", None) is not None:
            raise ValueError("DreamArtist does not train an EDM-formulation model (Playground v2.5): its dynamic CFG "
                             "scale and reconstruction loss read DDPM timesteps and an ε/v output")
        denoiser = system.denoiser()
        num_timesteps = int(system.alphas_cumprod.shape[0])

        def model(x: Tensor, t: Tensor, ids) -> Tensor:
            positive, negative = _pair(ids)
            cond = system.condition(_batch(negative, positive))
            out_neg, out_pos = denoiser(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
            scale = cfg_scale_at(t, low=self.cfg_scale, high=self.cfg_high, schedule=self.cfg_schedule,
                                 num_timesteps=num_timesteps).to(out_pos.dtype).view(-1, *([1] * (x.ndim - 1)))
            return cfg_combine(out_pos, out_neg, scale)

        return model

    def _reconstruction_loss(self, prepared, prediction: Tensor) -> Tensor:
        system = self.system
        x0_hat = diffusion.predicted_x0(system.prediction_type, prepared["x_t"], prediction, prepared["t"], system.alphas_cumprod)
        with_grad = getattr(system, "decode_latents_with_grad", None)  # (a VAE: unclamped, as A1111's decode_first_stage)
        decoded = with_grad(x0_hat) if with_grad is not None else system.decode_latents(x0_hat)
        if not decoded.requires_grad:
            raise ValueError(
                f"{type(system).__name__}.decode_latents gives no gradients (it runs under no_grad), so the "
                "reconstruction loss cannot train the embeddings; use rec_weight=0 with this system"
            )
        with torch.no_grad():
            target = system.decode_latents(prepared["latents"], clamp=False) if with_grad is not None else \
                system.decode_latents(prepared["latents"])
        return self.rec_weight * (decoded.float() - target.float()).abs().mean()

    # ------------------------------------------------------------------ use
    def sample(self, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float | None = None,
               negative: str | None = None) -> Tensor:
        """Images with the learned negative as the unconditional prompt (see :func:`sample_dreamartist`);
        ``guidance`` defaults to the training scale (with dynamic CFG the mean of ``cfg_scale`` and ``cfg_high``)."""
        return _sample(self.system, prompts, self.expand, negative_token=self.negative_token,
                       guidance=self._guidance(guidance), seed=seed, steps=steps, negative=negative)

    def _guidance(self, guidance: float | None) -> float:
        if guidance is not None:
            return float(guidance)
        return self.cfg_scale if self.cfg_high is None else (self.cfg_scale + self.cfg_high) / 2

    def embeddings(self) -> tuple[Embedding, Embedding]:
        """The current ``(positive, negative)`` embeddings."""
        return self.positive.embedding(), self.negative.embedding()  # type: ignore[union-attr]

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write ``<name>.pt`` (at ``path``) and ``<name>-neg.pt`` beside it, A1111's dicts (``.safetensors``
        by suffix, kohya's layout). Returns the positive file's path.

        The pair appears together or not at all (:func:`~sdadapt.formats.files.staged_outputs`): a
        failed save leaves an earlier pair as it was, never a new positive beside an old negative."""
        target = Path(path)
        fmt = "kohya" if target.suffix.lower() == ".safetensors" else "a1111"
        (negative_path,) = negative_files(target)
        info = dict(metadata or {})
        info["dreamartist_cfg"] = f"{self.cfg_scale:g}" if self.cfg_high is None else f"{self.cfg_scale:g}-{self.cfg_high:g}:{self.cfg_schedule}"
        pos, neg = self.embeddings()
        with staged_outputs() as stage:  # (each with A1111's step / sd_checkpoint fields of a training run)
            save_embedding(negative_path, trained_embedding(negative_path.stem, neg.vectors, metadata=info), format=fmt,
                           base_model=self.base_model, stage=stage)
            save_embedding(target, trained_embedding(target.stem, pos.vectors, metadata=info), format=fmt,
                           base_model=self.base_model, stage=stage)
        return target

    def remove(self) -> None:
        """Both embeddings out (negative first), ``requires_grad`` flags back."""
        self.negative.remove()
        self.positive.remove()  # type: ignore[union-attr]
        self._frozen.restore()


def _pair(ids):
    """``(B, 2, …)`` ids (or ``{"ids": (B, 2, …), …}``) -> ``(positive, negative)`` in the same form."""
    if isinstance(ids, dict):
        positive, negative = _pair(ids["ids"])
        return {**ids, "ids": positive}, {**ids, "ids": negative}
    return ids[:, 0], ids[:, 1]


def _batch(first, second):
    """``first`` and ``second`` (tensors, or dicts of tensors) stacked along the batch."""
    if isinstance(first, dict):
        return {k: _batch(first[k], second[k]) if first[k] is not None else None for k in first}
    return torch.cat([first, second])


def prepare_dreamartist(
    system,
    *,
    token: str,
    init_word: str | None = None,
    vectors: int = 1,
    negative_vectors: int | None = None,
    negative_init_word: str | None = None,
    init_weights: str | os.PathLike | None = None,
    cfg_scale: float | str = 3.0,
    cfg_high: float | None = None,
    cfg_schedule: str | None = None,
    neg_lr_weight: float = 1.0,
    rec_weight: float = 0.0,
    noise: float = 1e-3,
) -> DreamArtist:
    """DreamArtist on ``system`` (the registered method ``dreamartist``).

    Args:
        token: the positive trigger word the captions use; the negative is ``token-neg``.
        init_word, vectors: as textual inversion's; the negative starts from the init word's rows
            by the same rule with its own ``negative_vectors`` (as DreamArtist's ``create_embedding``
            makes ``<name>-neg``) plus ``N(0, noise²)``; without an init word, from the positive's
            start (cycled to ``negative_vectors``) plus the noise.
        negative_vectors: ``k`` of the negative (default: ``vectors``).
        negative_init_word: the negative's own init word (the extension's "Initialization text
            (negative)"); default ``init_word``.
        init_weights: continue a trained pair: the positive's file (any embedding format) and the
            ``<stem>-neg`` file beside it give the starting vectors (no noise added; their counts must be
            ``vectors`` / ``negative_vectors``, as textual inversion's ``--init-weights``); the init words are unused.
        cfg_scale, cfg_high, cfg_schedule: the training guidance scale, or with ``cfg_high`` the
            dynamic schedule from ``cfg_scale`` (t = 0) to ``cfg_high`` (t = T−1), shape ``cfg_schedule``
            (default ``"ln"``). ``cfg_scale`` may be the extension's text ``"low-high:type"``
            (:func:`parse_dynamic_cfg`), then without ``cfg_high`` / ``cfg_schedule``.
        neg_lr_weight: the negative's learning rate relative to the positive's.
        rec_weight: weight of the L1 reconstruction loss through the system's decoder (0: off): a diffusers
            system's ``decode_latents_with_grad`` (the VAE, checkpointed), else ``decode_latents`` if it has
            gradients (the toy's).
    """
    if isinstance(cfg_scale, str):
        try:
            cfg_scale = float(cfg_scale)  # (a number given as text: the command line's)
        except ValueError:
            pass
    if isinstance(cfg_scale, str):
        if cfg_high is not None or cfg_schedule is not None:
            raise ValueError(f"cfg_scale {cfg_scale!r} is the extension's whole CFG field; give cfg_high / cfg_schedule "
                             "only with a number")
        cfg_scale, cfg_high, cfg_schedule = parse_dynamic_cfg(cfg_scale)
    cfg_schedule = cfg_schedule or "ln"
    encoders, tokenizers, sdxl = system_text_parts(system)
    k_neg = negative_vectors or vectors
    if init_weights is not None:  # (the extension trains an existing name / name-neg pair on)
        first = Path(init_weights)
        second = first.with_name(negative_name(first.stem) + first.suffix)
        if not second.is_file():
            raise InputError(f"--init-weights {first}: a DreamArtist pair continues from both embeddings, and "
                             f"{second.name} (the negative) is not beside it")
        positive = starting_embedding(first, token=token, vectors=vectors, text_encoder=encoders, sdxl=sdxl)
        negative = starting_embedding(second, token=negative_name(token), vectors=k_neg, text_encoder=encoders,
                                      sdxl=sdxl, flag="--negative-vectors")
        return DreamArtist(system, positive, negative, cfg_scale=cfg_scale, cfg_high=cfg_high,
                           cfg_schedule=cfg_schedule, neg_lr_weight=neg_lr_weight, rec_weight=rec_weight)
    positive = initial_embedding(encoders, tokenizers, token, vectors=vectors, init_word=init_word, sdxl=sdxl,
                                 repeat_in_place=True)  # (the extension's create_embedding: A1111's i·n // k)
    negative_word = init_word if negative_init_word is None else negative_init_word
    if negative_word is not None:  # the negative's own k rows from its init word (DreamArtist's create_embedding for <name>-neg)
        start = initial_embedding(encoders, tokenizers, negative_name(token), vectors=k_neg, init_word=negative_word,
                                  sdxl=sdxl, repeat_in_place=True).vectors
    else:  # the trigger's own row, or the positive's random rows (cycled): the pair starts together
        start = {key: v[torch.arange(k_neg) % v.shape[0]] for key, v in positive.vectors.items()}
    negative = Embedding(negative_name(token), {key: v + noise * torch.randn_like(v) for key, v in start.items()})
    return DreamArtist(system, positive, negative, cfg_scale=cfg_scale, cfg_high=cfg_high, cfg_schedule=cfg_schedule,
                       neg_lr_weight=neg_lr_weight, rec_weight=rec_weight)


def _sample(system, prompts, expand, *, negative_token: str, guidance: float, seed: int, steps: int,
            negative: str | None) -> Tensor:
    negative_prompt = negative if negative is not None else negative_token
    return system.sample([expand(p) for p in prompts], seed=seed, steps=steps, guidance=guidance,
                         negative=expand(negative_prompt))


@torch.no_grad()
def sample_dreamartist(
    system,
    prompts: list[str],
    positive: Embedding,
    negative: Embedding,
    *,
    guidance: float = 3.0,
    seed: int = 0,
    steps: int = 25,
    negative_prompt: str | None = None,
) -> Tensor:
    """Sample with a DreamArtist pair: ``positive`` injected for the prompts, ``negative`` as the
    unconditional branch (negative prompt = the negative trigger, as in A1111), CFG ``guidance``.

    The embeddings are injected for the call and removed after it (the system is left as it was).

    Args:
        prompts: prompts that use ``positive.name``.
        negative_prompt: the negative prompt (default: ``negative.name`` alone); it should contain
            ``negative.name``.

    Returns:
        images ``(B, 3, H, W)`` in [-1, 1] from ``system.sample``.
    """
    encoders, tokenizers, _ = system_text_parts(system)
    pos = inject_embedding(encoders, tokenizers, positive)
    try:
        neg = inject_embedding(encoders, tokenizers, negative)
        try:
            return _sample(system, prompts, lambda p: neg.expand(pos.expand(p)), negative_token=negative.name,
                           guidance=guidance, seed=seed, steps=steps, negative=negative_prompt)
        finally:
            neg.remove()
    finally:
        pos.remove()


def load_dreamartist(path: str | os.PathLike) -> tuple[Embedding, Embedding]:
    """``(positive, negative)`` from ``<name>.pt`` and the ``<name>-neg.pt`` beside it (any embedding format).

    Raises:
        WeightFileError: either file missing or not an embedding.
    """
    target = Path(path)
    return load_embedding(target), load_embedding(target.with_name(negative_name(target.stem) + target.suffix))
