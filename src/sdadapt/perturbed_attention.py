"""Perturbed-attention guidance (PAG, Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance"): a third branch of each guided model call — the conditional one again, with chosen self-attention maps
replaced by the identity — and the guided result pushed away from it::

    out = u + s·(c − u) + p·(c − c̃)          (B, C, H, W); without a negative branch: c + p·(c − c̃)

``u``, ``c``: the negative and conditional outputs, ``c̃``: the conditional output under the perturbation, ``s``: the
guidance scale, ``p``: the PAG scale (3 in diffusers, Forge and ComfyUI). An identity attention map makes a layer's
output ``to_out(to_v(h))``: every token keeps its own value, the attention's structure is gone.

Where the tools agree, and where they differ:

- The layers: diffusers' ``pag_applied_layers`` (default ``"mid"``), each entry a regular expression searched in the
  UNet's module names, every self-attention it finds (``re.search``; a bare number must not match another number:
  its ``is_fake_integral_match``). ``"mid"`` is every ``attn1`` of the middle block — ComfyUI's and Forge's
  ``("middle", 0)`` patch too (SDXL: its ten transformer blocks').
- The combination: diffusers' pipelines (``PAGMixin._apply_perturbed_attention_guidance``) on the model outputs, one
  batch ``[u, c, c̃]``; ComfyUI's PerturbedAttentionGuidance node and Forge's built-in "PerturbedAttentionGuidance
  Integrated" as a post-CFG function on x̂0 (``denoised + (cond_denoised − degraded)·scale``), the perturbed branch its
  own call. The formula is affine, so the two agree up to float rounding; sdadapt's guidance combines where the
  sampler's home tool does (:mod:`sdadapt.denoised_branches`) and batches the three branches where the conditionings
  concatenate.
- diffusers' ``pag_adaptive_scale`` ``a``: the scale at timestep ``t`` is ``max(p − a·(1000 − t), 0)``
  (:meth:`PerturbedAttentionGuidance.scale_at`; SD.Next's "PAG adaptive").
- With guidance rescale (:mod:`sdadapt.guidance_rescale`): diffusers rescales the whole result, PAG term included;
  ComfyUI (RescaleCFG is its CFG function, PAG a post-CFG one) adds the term after the rescale. sdadapt follows
  diffusers on diffusers' grids and ComfyUI on A1111's.

:class:`PerturbedAttentionGuidance` hooks the chosen layers (a forward hook, first in line, that replaces the output
rows of the perturbed branch; nothing rebound, no key changed; :meth:`~PerturbedAttentionGuidance.remove`). The
perturbed rows are the batch's last share — a share, not an index, so a layer whose batch another hook multiplies
(Hypertile's tiles, batch-major) is perturbed on the same images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import reduce

import torch
from torch import Tensor, nn

from .module_hooks import ModuleHooks

__all__ = ["PAG_ADAPTIVE_FIELD", "PAG_FIELDS", "PAG_LAYERS_FIELD", "PAG_SCALE_FIELD_READ", "PerturbedAttentionGuidance",
           "check_pag_scale", "pag_layers"]

#: the infotext keys Forge's built-in "PerturbedAttentionGuidance Integrated" writes: enabled, scale
PAG_FIELDS = ("PerturbedAttentionGuidance_enabled", "PerturbedAttentionGuidance_scale")
#: SD.Next's scale key (its diffusers PAG pipelines), read back as ``--pag-scale`` where Forge's fields are absent
PAG_SCALE_FIELD_READ = "PAG scale"
#: the adaptive scale's key, written where it is not 0 and read back (SD.Next's)
PAG_ADAPTIVE_FIELD = "PAG adaptive"
#: sdadapt's key for layers other than ``mid`` (diffusers' ``pag_applied_layers``, space-separated); no tool writes one
PAG_LAYERS_FIELD = "PAG layers"


def check_pag_scale(scale: float, *, what: str = "PAG scale") -> float:
    """``scale`` as a finite float ≥ 0 (0: off).

    Raises:
        ValueError: a negative or non-finite scale, saying what it is.
    """
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"{what} is a guidance strength ≥ 0 (diffusers' pag_scale, Forge's PerturbedAttentionGuidance "
                         f"scale; 0: off, 3 the usual), got {scale}")
    return scale


def _is_self_attention(name: str, module: nn.Module) -> bool:
    """A self-attention layer PAG can perturb: ``to_v`` and ``to_out`` (diffusers' ``Attention``, LDM's
    ``CrossAttention``, the toy's), and either diffusers' ``is_cross_attention`` False or the name ``attn1`` (a
    transformer block's self-attention where the class says nothing)."""
    if not (isinstance(getattr(module, "to_v", None), nn.Module) and isinstance(getattr(module, "to_out", None),
                                                                               nn.Module)):
        return False
    cross = getattr(module, "is_cross_attention", None)
    return cross is False or (cross is None and name.rsplit(".", 1)[-1] == "attn1")


def pag_layers(network: nn.Module, layers: tuple[str, ...] | list[str] | str = ("mid",)) -> dict[str, nn.Module]:
    """The self-attention layers of ``network`` that diffusers' ``pag_applied_layers`` ``layers`` name, by module
    name, in module order: for each entry (a regular expression) every self-attention whose name it
    ``re.search``-es, except where the entry's and the name's last parts are different numbers — diffusers'
    ``_set_pag_attn_processor`` (``"mid"``: the middle block's; ``"down_blocks.2"``, ``"up_blocks.0.attentions.1"``,
    ``"mid|up"``...).

    Raises:
        ValueError: an entry that is no valid expression, or one that names no self-attention layer (diffusers'
            "Cannot find PAG layer"), saying which and what the network's self-attention layers are called.
    """
    entries = [layers] if isinstance(layers, str) else list(layers)
    if not entries:
        raise ValueError("PAG layers: give at least one (diffusers' pag_applied_layers; 'mid' the default)")
    candidates = [(name, module) for name, module in network.named_modules() if _is_self_attention(name, module)]
    found: dict[str, nn.Module] = {}
    for entry in entries:
        try:
            pattern = re.compile(entry)
        except re.error as exc:
            raise ValueError(f"PAG layer {entry!r} is no regular expression ({exc}); diffusers' pag_applied_layers "
                             "are searched in the UNet's module names, e.g. 'mid', 'down_blocks.2', 'up_blocks.0'") \
                from None
        last = entry.split(".")[-1]
        hits = [(name, module) for name, module in candidates if pattern.search(name) is not None
                and not (last.isnumeric() and name.split(".")[-1].isnumeric() and last == name.split(".")[-1])]
        if not hits:
            example = ", ".join(name for name, _ in candidates[:3]) or "none"
            raise ValueError(f"PAG layer {entry!r} names no self-attention layer of {type(network).__name__} "
                             f"(its self-attention layers: {example}{', ...' if len(candidates) > 3 else ''})")
        found.update(hits)
    return {name: module for name, module in candidates if name in found}


def _identity_attention(attn: nn.Module, hidden: Tensor) -> Tensor:
    """A self-attention layer's output under an identity attention map, for its input ``hidden`` (N, L, C) or
    (N, C, H, W): ``to_out(to_v(h))`` with diffusers' group norm, residual and output rescale where the layer has
    them (``PAGIdentitySelfAttnProcessor2_0``'s perturbed path)."""
    residual, image = hidden, hidden.ndim == 4
    if image:
        n, c, h, w = hidden.shape
        hidden = hidden.view(n, c, h * w).transpose(1, 2)
    norm = getattr(attn, "group_norm", None)
    if norm is not None:
        hidden = norm(hidden.transpose(1, 2)).transpose(1, 2)
    out = attn.to_v(hidden)
    for layer in attn.to_out:  # (diffusers: a ModuleList of Linear, Dropout; LDM: a Sequential)
        out = layer(out)
    if image:
        out = out.transpose(-1, -2).reshape(n, c, h, w)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


class PerturbedAttentionGuidance(ModuleHooks):
    """PAG on ``network`` (a UNet; module docstring): ``scale`` p, diffusers' ``adaptive_scale``, the ``layers``
    (diffusers' ``pag_applied_layers``, :func:`pag_layers`). Hooks installed at once, idle until a call runs
    :meth:`perturbing`; :meth:`remove` (or leaving the ``with`` block) takes them off. ``names``: the hooked layers.
    The guidance classes take it as ``perturbed_attention=`` (:class:`sdadapt.training.diffusion.Guided`,
    :func:`sdadapt.prompt_guidance.composed_guidance`, :func:`sdadapt.samplers.sample_latents`).

    Raises:
        ValueError: a negative scale or adaptive scale, or layers that name no self-attention (:func:`pag_layers`).
    """

    def __init__(self, network: nn.Module, *, scale: float = 3.0, adaptive_scale: float = 0.0,
                 layers: tuple[str, ...] | list[str] | str = ("mid",)) -> None:
        self.scale = check_pag_scale(scale)
        self.adaptive_scale = check_pag_scale(adaptive_scale, what="PAG adaptive scale")
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)
        found = pag_layers(network, self.layers)
        self.network, self.names = network, tuple(found)
        self._share: tuple[int, int] | None = None  # (k, n): the last n − k of every n rows are perturbed
        self._handles = [module.register_forward_hook(self._perturb, with_kwargs=True, prepend=True)
                         for module in found.values()]

    def scale_at(self, t: Tensor | float) -> float:
        """The PAG scale of a model call at timestep ``t`` (a number, or a tensor whose first entry is it): ``scale``,
        or with an adaptive scale ``a`` diffusers' ``max(scale − a·(1000 − t), 0)``."""
        if not self.adaptive_scale:
            return self.scale
        step = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)
        return max(self.scale - self.adaptive_scale * (1000.0 - step), 0.0)

    @contextmanager
    def perturbing(self, first: int = 0, of: int = 1) -> Iterator[None]:
        """Inside the block the hooked layers perturb the rows of every call's batch from share ``first / of`` on
        (``of`` equal chunks, the last ``of − first`` perturbed; the defaults: every row)."""
        if not 0 <= first < of:
            raise ValueError(f"perturbing(first={first}, of={of}): the perturbed chunks are the last of {of}")
        before, self._share = self._share, (first, of)
        try:
            yield
        finally:
            self._share = before

    def _perturb(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        if self._share is None:
            return None
        first, of = self._share
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        rows = output.shape[0]
        if rows % of:
            raise ValueError(f"PAG: a batch of {rows} rows at {type(module).__name__} does not split into the "
                             f"{of} branches of the guided call")
        start = rows // of * first
        if start == 0:
            return _identity_attention(module, hidden).to(output.dtype)
        return torch.cat([output[:start], _identity_attention(module, hidden[start:]).to(output.dtype)])

    def branch_outputs(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, conds: list[object], *,
                       plain: Callable[[list[object]], list[Tensor]]) -> list[Tensor]:
        """``model``'s outputs (B, C, H, W) at ``x`` (B, C, H, W), timesteps ``t`` ((B,) or a scalar) under each of
        ``conds`` and then under ``conds[-1]`` perturbed: one batch when they all concatenate (diffusers' ``[u, c,
        c̃]``), the perturbed rows its last chunk; else ``plain(conds)`` (the caller's calls for them) and the
        perturbed branch its own call (ComfyUI's and Forge's)."""
        from .training.diffusion import _cat_conditions

        everything = [*conds, conds[-1]]
        both = reduce(lambda a, b: None if a is None else _cat_conditions(a, b), everything[1:], everything[0])
        n = len(everything)
        if both is not None:
            with self.perturbing(n - 1, n):
                out = model(torch.cat([x] * n), torch.cat([t] * n) if t.ndim else t, both)
            return list(out.chunk(n))
        outs = plain(conds)
        with self.perturbing():
            return [*outs, model(x, t, conds[-1])]

    def guide(self, combined: Tensor, cond: Tensor, perturbed: Tensor, t: Tensor | float) -> Tensor:
        """``combined + p·(cond − perturbed)`` (B, ...), ``p`` the scale at ``t`` (:meth:`scale_at`), diffusers'
        order of operations; ``combined`` itself at scale 0."""
        p = self.scale_at(t)
        return combined + p * (cond - perturbed) if p else combined

