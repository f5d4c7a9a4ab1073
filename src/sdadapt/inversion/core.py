"""Null-text and negative-prompt inversion as pure functions over any ``model(x, t, cond)``.

Notation as in :mod:`sdadapt.training.diffusion`: ``ᾱ_t = alphas_cumprod[t]``, DDIM timesteps
``t_1 > t_2 > … > t_n`` (sampling order, ``ddim_timesteps``), ``t_prev = t − T//n``. A *condition*
is whatever the model takes — a tensor (a diffusers UNet's ``encoder_hidden_states`` (1, L, D))
or a dict of tensors (the toy system's ``{"context", "image_embeds"}``); the *embedding* that
null-text inversion optimises is the condition itself, or its entry ``embedding_key`` for a dict.

* **Pivot** (Mokady et al. 2023, §3.2): DDIM inversion with guidance 1 (the source prompt's
  conditional prediction only), ``z*_0 = encode(image) → z*_{t_1} … → z*_{t_n}`` —
  :func:`sdadapt.training.diffusion.ddim_invert`.
* **Null-text optimisation** (§3.3): for sampling step ``i`` (``t = t_{n-i}`` descending), starting
  from ``z̄_{t_n} = z*_{t_n}``, minimise over the unconditional embedding ``∅_i`` the
  :func:`null_text_objective` ``‖ DDIM_{t→t_prev}(z̄_t; ε_u(∅_i) + s·(ε_c − ε_u(∅_i))) − z*_{t_prev} ‖²``
  with Adam (``lr·(1 − lr_decay·i)``), at most ``inner_steps`` iterations, stopping early when the
  loss falls below ``epsilon + i·epsilon_slope``; then advance ``z̄`` with the optimised ``∅_i``,
  which also starts step ``i+1``. Returns the ``n`` embeddings.
* **Negative-prompt inversion** (Miyake et al. 2023): no optimisation — every ``∅_i`` is the
  source prompt's own conditional embedding, so the guided step collapses to the conditional
  step and retraces the pivot (up to the model's local non-linearity).

Everything here is a function of tensors and the model; :mod:`.invert` adds systems, files and
images on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..training import diffusion

__all__ = [
    "Progress",
    "condition_embedding",
    "with_embedding",
    "default_embedding_key",
    "prev_timestep",
    "guided_ddim_step",
    "null_text_objective",
    "ddim_pivot",
    "null_text_optimize",
    "negative_prompt_embeddings",
    "sample_with_embeddings",
    "psnr",
]

Model = Callable[[Tensor, Tensor, Any], Tensor]
#: ``progress(done, total, label)``
Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------- conditions
def default_embedding_key(cond: object) -> str | None:
    """Which part of a condition null-text inversion optimises: ``None`` for a tensor condition,
    ``"context"`` / ``"encoder_hidden_states"`` for a dict that has one."""
    if isinstance(cond, Tensor):
        return None
    if isinstance(cond, dict):
        for key in ("context", "encoder_hidden_states"):
            if isinstance(cond.get(key), Tensor):
                return key
        raise ValueError(
            f"cannot tell which entry of the condition dict (keys {sorted(cond)}) is the text embedding; "
            "pass embedding_key='<key>'"
        )
    raise TypeError(f"a condition must be a tensor or a dict of tensors, got {type(cond).__name__}")


def condition_embedding(cond: object, key: str | None) -> Tensor:
    """The optimised part of a condition: ``cond`` itself (``key=None``) or ``cond[key]``."""
    if key is None:
        if not isinstance(cond, Tensor):
            raise TypeError(f"embedding_key=None needs a tensor condition, got {type(cond).__name__}; pass embedding_key")
        return cond
    if not isinstance(cond, dict):
        raise TypeError(f"embedding_key={key!r} needs a dict condition, got {type(cond).__name__}")
    if not isinstance(cond.get(key), Tensor):
        raise ValueError(f"the condition has no tensor entry {key!r}; entries: {sorted(cond)}")
    return cond[key]


def with_embedding(cond: object, key: str | None, embedding: Tensor) -> object:
    """``cond`` with its optimised part replaced by ``embedding`` (a new dict; inputs untouched)."""
    return embedding if key is None else {**cond, key: embedding}  # type: ignore[dict-item]


def prev_timestep(t: int, num_steps: int, num_train_steps: int) -> int:
    """DDIM's previous timestep ``t − T//n`` (negative at the last step: ᾱ_0 is used there)."""
    return t - num_train_steps // num_steps


# ------------------------------------------------------------------------------ the step
def guided_ddim_step(
    out_uncond: Tensor,
    out_cond: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    *,
    guidance: float,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | None = None,
) -> Tensor:
    """One guided DDIM step (η = 0) ``x_t → x_{t_prev}`` (B, C, H, W).

    With ``o = u + s·(c − u)`` (ε, v or x0 per ``prediction_type``), ``x̂0`` and ``ε̂`` implied by
    ``o`` at ``x_t``: ``x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂``; for ε-prediction
    ``x̂0 = (x_t − √(1 − ᾱ_t)·o)/√ᾱ_t``, ``ε̂ = o``. ``t_prev < 0`` uses ``final_alpha_cumprod``
    (default ᾱ_0). Differentiable in both outputs.
    """
    out = diffusion.guidance_combine(out_uncond, out_cond, guidance)  # (B, C, H, W)
    return diffusion.ddim_step(out, t, t_prev, x_t, alphas_cumprod, prediction_type=prediction_type,
                               final_alpha_cumprod=final_alpha_cumprod)


def null_text_objective(
    model: Model,
    x_t: Tensor,
    t: int,
    t_prev: int,
    target: Tensor,
    *,
    out_cond: Tensor,
    uncond: object,
    alphas_cumprod: Tensor,
    guidance: float,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | None = None,
) -> Tensor:
    """Null-text inversion's per-step loss (0-dim): ``mean ‖ DDIM(x_t; u(∅) + s·(c − u(∅))) − z*_{t_prev} ‖²``.

    Args:
        x_t: (B, C, H, W) the current latent of the guided trajectory.
        target: (B, C, H, W) the pivot latent ``z*_{t_prev}``.
        out_cond: (B, C, H, W) the model output for the source prompt at ``x_t`` (computed once).
        uncond: the unconditional condition carrying ``∅`` (gradients flow into its tensors).
    """
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out_uncond = model(x_t, tt, uncond)  # (B, C, H, W)
    x_prev = guided_ddim_step(out_uncond, out_cond, x_t, t, t_prev, alphas_cumprod, guidance=guidance,
                              prediction_type=prediction_type, final_alpha_cumprod=final_alpha_cumprod)
    return F.mse_loss(x_prev.float(), target.float())


# ----------------------------------------------------------------------------- inversions
def ddim_pivot(
    model: Model,
    x0: Tensor,
    cond: object,
    *,
    alphas_cumprod: Tensor,
    num_steps: int,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> list[Tensor]:
    """The pivot trajectory: DDIM inversion at guidance 1, ``[z*_0, z*_{t_1'}, …, z*_{t_n}]``
    (n+1 latents (B, C, H, W), ascending t) — :func:`sdadapt.training.diffusion.ddim_invert`."""
    with torch.no_grad():
        return diffusion.ddim_invert(model, x0, cond, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                     prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset)


def null_text_optimize(
    model: Model,
    pivot: list[Tensor],
    cond: object,
    uncond: object,
    *,
    alphas_cumprod: Tensor,
    guidance: float = 7.5,
    embedding_key: str | None = None,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    lr_decay: float = 1e-2,
    epsilon: float = 1e-5,
    epsilon_slope: float = 2e-5,
    init: Tensor | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    progress: Progress | None = None,
) -> Tensor:
    """Per-timestep unconditional embeddings that make guided DDIM retrace ``pivot``.

    Args:
        pivot: the :func:`ddim_pivot` latents ``[z*_0, …, z*_{t_n}]`` (n+1 of (B, C, H, W)).
        cond: the source prompt's condition (its output is computed once per step, no grad).
        uncond: the unconditional condition; its ``embedding_key`` part ``∅`` (B, *E) is optimised.
        init: the starting ``∅`` (B, *E) (default: ``uncond``'s own — the empty prompt, as the
            paper; pass the conditional embedding to start from negative-prompt inversion).
        inner_steps, learning_rate, lr_decay, epsilon, epsilon_slope: Adam with
            ``lr = learning_rate·(1 − lr_decay·i)`` at step ``i``, at most ``inner_steps``
            iterations, stopping after one whose loss is ``< epsilon + i·epsilon_slope``
            (the paper: 10, 1e-2, 1/100, 1e-5, 2e-5).

    Returns:
        (n, B, *E) float32: row ``i`` is the null embedding of sampling step ``i`` (descending t).
    """
    n = len(pivot) - 1
    if n < 1:
        raise ValueError("the pivot trajectory needs at least 2 latents (z*_0 and z*_T)")
    if inner_steps < 1 or not learning_rate > 0:
        raise ValueError(f"inner_steps must be >= 1 and learning_rate > 0, got {inner_steps} and {learning_rate}")
    if not 0 <= lr_decay * (n - 1) < 1:
        raise ValueError(f"lr_decay={lr_decay} makes the learning rate reach 0 within {n} steps; use lr_decay < 1/{n - 1}")
    T = alphas_cumprod.shape[0]
    steps = diffusion.ddim_timesteps(n, num_train_steps=T, spacing=spacing, steps_offset=steps_offset).tolist()
    base = condition_embedding(uncond, embedding_key)
    dtype = base.dtype
    embedding = (base if init is None else init).detach().float().clone()  # (B, *E)
    if embedding.shape != base.shape:
        raise ValueError(f"init has shape {tuple(embedding.shape)}, the unconditional embedding {tuple(base.shape)}")
    out: list[Tensor] = []
    x = pivot[-1]
    for i, t in enumerate(steps):
        t_prev = prev_timestep(t, n, T)
        target = pivot[n - i - 1]  # z*_{t_prev}
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with torch.no_grad():
            out_cond = model(x, tt, cond)
        embedding = embedding.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([embedding], lr=learning_rate * (1.0 - lr_decay * i))
        threshold = epsilon + i * epsilon_slope
        with torch.enable_grad():
            for _ in range(inner_steps):
                loss = null_text_objective(
                    model, x, t, t_prev, target, out_cond=out_cond,
                    uncond=with_embedding(uncond, embedding_key, embedding.to(dtype)), alphas_cumprod=alphas_cumprod,
                    guidance=guidance, prediction_type=prediction_type,
                )
                (embedding.grad,) = torch.autograd.grad(loss, [embedding])  # never touches the model's .grad
                optimizer.step()
                if loss.item() < threshold:
                    break
        embedding = embedding.detach()
        out.append(embedding.clone())
        with torch.no_grad():
            out_uncond = model(x, tt, with_embedding(uncond, embedding_key, embedding.to(dtype)))
            x = guided_ddim_step(out_uncond, out_cond, x, t, t_prev, alphas_cumprod, guidance=guidance,
                                 prediction_type=prediction_type)
        if progress is not None:
            progress(i + 1, n, "null-text")
    return torch.stack(out)


def negative_prompt_embeddings(cond: object, num_steps: int, *, embedding_key: str | None = None) -> Tensor:
    """Negative-prompt inversion's null embeddings: the conditional embedding (B, *E), repeated
    ``num_steps`` times -> (n, B, *E) float32."""
    e = condition_embedding(cond, embedding_key).detach().float()
    return e[None].expand(num_steps, *e.shape).clone()


@torch.no_grad()
def sample_with_embeddings(
    model: Model,
    x_T: Tensor,
    cond: object | list[object],
    uncond: object,
    embeddings: Tensor,
    *,
    alphas_cumprod: Tensor,
    guidance: float,
    embedding_key: str | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    progress: Progress | None = None,
    label: str = "sample",
) -> Tensor:
    """Guided DDIM from ``x_T`` (B, C, H, W) with a per-step null embedding ``embeddings[i]``.

    ``cond`` is one condition, or a list of ``n`` (one per step: prompt switching for edits).
    Each step evaluates ``u`` and ``c`` as one batch of 2B (as :func:`~sdadapt.training.diffusion.guided`);
    the last step uses ᾱ_0 (as the pivot). Returns x_0 (B, C, H, W).
    """
    n = embeddings.shape[0]
    T = alphas_cumprod.shape[0]
    steps = diffusion.ddim_timesteps(n, num_train_steps=T, spacing=spacing, steps_offset=steps_offset).tolist()
    conds = cond if isinstance(cond, list) else [cond] * n
    if len(conds) != n:
        raise ValueError(f"got {len(conds)} per-step conditions for {n} steps")
    dtype = condition_embedding(uncond, embedding_key).dtype
    x = x_T
    for i, t in enumerate(steps):
        u = with_embedding(uncond, embedding_key, embeddings[i].to(device=x.device, dtype=dtype))
        fn = diffusion.guided(model, conds[i], u, guidance)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = fn(x, tt, conds[i])
        x = diffusion.ddim_step(out, t, prev_timestep(t, n, T), x, alphas_cumprod, prediction_type=prediction_type)
        if progress is not None:
            progress(i + 1, n, label)
    return x


def psnr(image: Tensor, reference: Tensor, *, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(range² / mean (a − b)²)`` over all elements
    (images in [-1, 1]: ``data_range`` 2). ``inf`` for identical images."""
    if image.shape != reference.shape:
        raise ValueError(f"images differ in shape: {tuple(image.shape)} vs {tuple(reference.shape)}")
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
