"""Self-attention guidance (SAG, Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance"): the regions the UNet's middle self-attention attends to most are blurred in the call's x̂0, the blurred
x̂0 is noised back to the call's noise level with the call's own noise, the model runs on it, and the guided result
is pushed away from what it predicts there::

    out = g + s·(b̂ − b)          g: the guided result, s: the SAG scale

``b̂`` is the branch whose attention is read — the negative's (the conditional one in a call without a negative
pass) — and ``b`` the same branch's prediction at the degraded input. The mask: the middle block's first
self-attention map (``mid_block.attentions.0.transformer_blocks.0.attn1``, diffusers' and ComfyUI's layer) averaged
over its heads and summed over its queries, each token whose total exceeds ``threshold`` (1) blurred (a 9×9 Gaussian
of ``blur_sigma``, reflect-padded), the token grid the latent halved by the UNet's convolutions (Forge's SAG,
diffusers' ``map_size``; ComfyUI's ``create_blur_map`` guesses it from the aspect ratio, the same grid except at some
sides no multiple of 64) and brought to the latent size by nearest neighbours.

Where it combines follows the sampler's home tool (:mod:`sdadapt.denoised_branches`):

- diffusers' grids: diffusers' ``StableDiffusionSAGPipeline`` on the model outputs — x̂0 and ε of the branch from
  ``alphas_cumprod`` at ``t``, the degraded input ``add_noise(blurred, ε, t)``, the term ``s·(out − out_degraded)``
  (its blur σ is fixed at 1: pass ``blur_sigma=1.0``; its default scale 0.75);
- A1111's σ grids: ComfyUI's SelfAttentionGuidance node, which Forge's built-in "SelfAttentionGuidance Integrated"
  follows (with its own grid, above), on x̂0 — the degraded input ``blurred + x − x̂0`` in k-diffusion's space, the term ``s·(blurred − x̂0')``
  (defaults: scale 0.5, blur σ 2). For an ε model the two are one formula; for a v model they differ (ComfyUI's
  reads the degraded call's x̂0 against the blurred one).

A1111's timestep samplers, LCM and EDM models are refused (:func:`check_sag_run`). The layer's input is kept by a
forward hook while :meth:`SelfAttentionGuidance.recording` (nothing rebound, no key changed;
:meth:`~SelfAttentionGuidance.remove`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .module_hooks import ModuleHooks

__all__ = ["SAG_FIELDS", "SAG_LAYER", "SelfAttentionGuidance", "attention_token_mask", "blur_by_attention",
           "check_sag_run", "gaussian_blur_2d"]

#: the layer whose attention map SAG reads (diffusers' pipeline, ComfyUI's ``("middle", 0, 0)`` attn1)
SAG_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"
#: Forge's built-in "SelfAttentionGuidance Integrated" infotext keys: enabled, scale, blur sigma
SAG_FIELDS = ("sag_enabled", "sag_scale", "sag_blur_sigma")


def gaussian_blur_2d(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """``image`` (B, C, H, W) blurred per channel by a ``kernel_size``² Gaussian of ``sigma`` (the separable kernel's
    outer product), reflect-padded: diffusers' / ComfyUI's ``gaussian_blur_2d``."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel1d = (pdf / pdf.sum()).to(device=image.device, dtype=image.dtype)
    kernel = torch.mm(kernel1d[:, None], kernel1d[None, :]).expand(image.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(image, [pad, pad, pad, pad], mode="reflect"), kernel, groups=image.shape[-3])


def attention_token_mask(attn: nn.Module, hidden: Tensor, *, threshold: float = 1.0) -> Tensor:
    """(B, N) bool: the tokens of a self-attention layer's input ``hidden`` (B, N, C) whose attention received —
    the map averaged over heads, summed over queries — exceeds ``threshold``. diffusers' ``get_attention_scores``
    where the layer has it (its bits), else ``softmax(q·kᵀ/√d)`` in float32."""
    b, n, _ = hidden.shape
    heads = int(attn.heads)
    q, k = attn.to_q(hidden), attn.to_k(hidden)
    if hasattr(attn, "get_attention_scores") and hasattr(attn, "head_to_batch_dim"):
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), None)
    else:
        d = q.shape[-1] // heads
        q, k = (z.reshape(b, n, heads, d).transpose(1, 2).reshape(b * heads, n, d).float() for z in (q, k))
        probs = (q @ k.transpose(1, 2) * d ** -0.5).softmax(dim=-1)
    return probs.reshape(b, heads, n, n).mean(1).sum(1) > threshold


def _token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of the middle block's ``tokens`` for a latent of ``height`` x ``width``: the latent halved
    by the UNet's stride-2 convolutions, each rounding up (``⌈h / 2^k⌉ × ⌈w / 2^k⌉``), as Forge's SAG computes it
    and diffusers' pipeline reads it (``map_size``); a layout no halving gives: ComfyUI's ``create_blur_map``
    guess, the divisor of ``tokens`` nearest ``√(tokens·h/w)`` (the same grid wherever ComfyUI is right: it
    guesses wrong at some sides no multiple of 64, e.g. 264 x 512 on SD 1)."""
    for halvings in range(12):
        rows, cols = -(-height // 2 ** halvings), -(-width // 2 ** halvings)
        if rows * cols == tokens:
            return rows, cols
        if rows * cols < tokens:
            break
    guess = round(math.sqrt((height / width) * tokens))
    for i in range(math.floor(math.sqrt(tokens) / 2)):
        for rows in (guess + i, max(1, guess - i)):
            if tokens % rows == 0:
                return rows, tokens // rows
    raise ValueError(f"SAG: {tokens} attention tokens fit no grid of the latent's aspect {height}x{width}")


def blur_by_attention(x0: Tensor, mask: Tensor, *, sigma: float) -> Tensor:
    """``x0`` (B, C, H, W) blurred (:func:`gaussian_blur_2d`, 9×9) where the token ``mask`` (B, N) is set, the token
    grid brought to (H, W) by nearest neighbours; unchanged elsewhere."""
    b, _, height, width = x0.shape
    rows, cols = _token_grid(mask.shape[-1], height, width)
    grid = F.interpolate(mask.reshape(b, 1, rows, cols).to(x0.dtype), (height, width))
    return gaussian_blur_2d(x0, 9, sigma) * grid + x0 * (1 - grid)


def check_sag_run(sampler: str, *, schedule: str | None, edm: bool = False) -> None:
    """Refuse SAG where a call's x̂0 is not what the guidance combines or its noise not VP's.

    Raises:
        ValueError: A1111's timestep samplers (DDIM with a schedule, PLMS, DDIM CFG++, its UniPC), LCM, or an EDM
            model, naming the sampler and what to take instead.
    """
    from .sampler_tables import canonical_sampler, runs_a1111_timesteps

    name = canonical_sampler(sampler)
    if edm:
        raise ValueError("self-attention guidance renoises x̂0 on the model's ᾱ (diffusers' SAG pipeline); an EDM "
                         "model (Playground v2.5) has none: leave SAG out")
    if runs_a1111_timesteps(name, schedule) or name == "lcm":
        raise ValueError(f"self-attention guidance degrades each call's x̂0 (diffusers' SAG pipeline, ComfyUI's / "
                         f"Forge's SAG on A1111's σ samplers); {name} here combines ε on timesteps: take a σ sampler "
                         "(euler, dpmpp_2m...) or diffusers' grid (no schedule)")


class SelfAttentionGuidance(ModuleHooks):
    """SAG on ``network`` (a UNet whose ``layer`` is SD's middle self-attention; module docstring) at ``scale``,
    ``blur_sigma``, ``threshold``; ``alphas_cumprod`` (T,) and ``prediction_type``: the model's, to read x̂0 and ε on
    diffusers' grids and the input's share of x̂0 on A1111's. A hook is installed at once, idle outside
    :meth:`recording`; :meth:`remove` (or leaving the ``with`` block) takes it off. The guidance classes take it as
    ``self_attention_guidance=`` (:class:`sdadapt.training.diffusion.Guided`).

    Raises:
        ValueError: a non-finite scale, a blur σ not above 0, or a ``network`` without ``layer`` (or one that is no
            self-attention with ``to_q``, ``to_k`` and ``heads``).
    """

    def __init__(self, network: nn.Module, *, scale: float = 0.5, blur_sigma: float = 2.0, threshold: float = 1.0,
                 alphas_cumprod: Tensor, prediction_type: str = "epsilon", layer: str = SAG_LAYER) -> None:
        self.scale, self.blur_sigma, self.threshold = float(scale), float(blur_sigma), float(threshold)
        if not math.isfinite(self.scale):
            raise ValueError(f"SAG scale must be a finite number (0.5 ComfyUI's / Forge's, 0.75 diffusers'), got {scale}")
        if not (math.isfinite(self.blur_sigma) and self.blur_sigma > 0):
            raise ValueError(f"SAG blur sigma is the Gaussian's σ in latent pixels, above 0 (2 ComfyUI's / Forge's, 1 "
                             f"diffusers'), got {blur_sigma}")
        try:
            attn = network.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"self-attention guidance reads the attention map of {layer} (SD's middle block); "
                             f"{type(network).__name__} has no such layer") from None
        if not all(hasattr(attn, name) for name in ("to_q", "to_k", "heads")):
            raise ValueError(f"{layer} of {type(network).__name__} is no self-attention with to_q, to_k and heads")
        self.network, self.layer, self.attn = network, layer, attn
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self._kept: list[Tensor] | None = None
        self._handles = [attn.register_forward_hook(self._keep, with_kwargs=True)]

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if self._kept is not None and not self._kept:
            self._kept.append(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))

    @contextmanager
    def recording(self) -> Iterator[list[Tensor]]:
        """Inside the block the layer's input of the first call is kept (the list yielded)."""
        before, self._kept = self._kept, []
        try:
            yield self._kept
        finally:
            self._kept = before

    def outputs(self, run: Callable[[], list[Tensor]], batch: int) -> tuple[list[Tensor], Tensor]:
        """``(run(), the token mask (batch, N) of the first ``batch`` rows of its first call)``: ``run`` computes a
        guided call's branches, the one SAG reads first (its rows first in its first call).

        Raises:
            ValueError: a run whose calls never reached the layer.
        """
        with self.recording() as kept:
            outs = run()
        if not kept:
            raise ValueError(f"SAG: the model never ran {self.layer}; is the guidance's model this UNet's?")
        with torch.no_grad():
            mask = attention_token_mask(self.attn, kept[0][:batch], threshold=self.threshold)
        return outs, mask

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """ᾱ (B,) at the call's timesteps ``t`` (B,): the table's entry at an integer ``t`` (diffusers' SAG pipeline's
        ``alphas_cumprod[t]``); at a fractional one (diffusers' Euler / Heun grids) ``1/(1 + σ²)`` with σ linear in
        log σ between the two steps around it, the inverse of the timestep those schedulers give the model
        (:func:`sdadapt.samplers.sigma_space.t_to_sigma`)."""
        from .samplers.sigma_space import t_to_sigma

        table = self.alphas_cumprod.to(t.device)
        step = t.reshape(-1)
        if not torch.is_floating_point(step) or bool((step == step.round()).all()):
            return table[step.long()]
        sigma = t_to_sigma(step.to(table.dtype), ((1 - table) / table) ** 0.5)
        return 1 / (1 + sigma * sigma)

    def term_on_outputs(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, cond: object, out: Tensor,
                        mask: Tensor) -> Tensor:
        """diffusers' SAG term (B, C, H, W) on the model outputs at a timestep grid: ``s·(out − model(x_deg))``, with
        ``x_deg = √ᾱ·blur(x̂0) + √(1 − ᾱ)·ε`` (its ``add_noise``), x̂0 and ε of the branch's output ``out`` under
        ``cond`` at ``x`` (the VP sample the model sees) and ``t`` (:meth:`alpha_bar_at`), in diffusers' order of
        operations; 0 on a latent of 4 pixels or fewer a side (ComfyUI's rule: the 9×9 blur's padding needs 5)."""
        if min(x.shape[-2:]) <= 4:
            return torch.zeros_like(out)
        alpha = self.alpha_bar_at(t).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        beta = 1 - alpha
        if self.prediction_type == "epsilon":
            x0, noise = (x - beta ** 0.5 * out) / alpha ** 0.5, out
        elif self.prediction_type == "v_prediction":
            x0, noise = alpha ** 0.5 * x - beta ** 0.5 * out, alpha ** 0.5 * out + beta ** 0.5 * x
        else:  # (sample)
            x0, noise = out, (x - alpha ** 0.5 * out) / beta ** 0.5
        degraded = alpha ** 0.5 * blur_by_attention(x0, mask, sigma=self.blur_sigma) + beta ** 0.5 * noise
        return self.scale * (out - model(degraded, t, cond))

    def term_on_denoised(self, model: Callable[..., Tensor], read: Callable[[Tensor], Tensor], x: Tensor, t: Tensor,
                         cond: object, denoised: Tensor, mask: Tensor, *, sigma: float | Tensor) -> Tensor:
        """ComfyUI's SAG term (B, C, H, W) on x̂0 at the call's ``sigma``: ``s·(b − x̂0')`` with ``b`` the branch's x̂0
        ``denoised`` blurred, ``x̂0'`` the model's x̂0 under ``cond`` at the input ``b + x_k − x̂0`` (k-diffusion's
        space; ``x``: the model input ``x_k/√(σ² + 1)``), read by ``read`` and moved by the input's share of x̂0
        (1 for ε, 1/(σ² + 1) for v, 0 for x0); 0 on a latent of 4 pixels or fewer a side (ComfyUI's rule)."""
        if min(denoised.shape[-2:]) <= 4:
            return torch.zeros_like(denoised)
        s = float(sigma.reshape(-1)[0]) if isinstance(sigma, Tensor) else float(sigma)
        blurred = blur_by_attention(denoised, mask, sigma=self.blur_sigma)
        shift = blurred - denoised  # (x_k' − x_k)
        root = math.sqrt(s * s + 1.0)
        skip = {"epsilon": 1.0, "v_prediction": 1.0 / (s * s + 1.0)}.get(self.prediction_type, 0.0)
        out = model(x + shift / root, t, cond)
        return self.scale * (blurred - (read(out) + skip * shift))

