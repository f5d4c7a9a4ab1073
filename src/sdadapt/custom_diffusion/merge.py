"""Custom Diffusion's closed-form multi-concept merge (the paper's §3.2, adobe ``composenW.py::gdupdateWexact``).

Per cross-attention ``to_k`` and ``to_v`` weight, several single-concept results ``W_i`` become one
``W`` that keeps every concept's keys/values on its own prompts' text features and otherwise stays as
close to the base ``W0`` as it can on regularisation features::

    min_W ‖(W − W0) C_regᵀ‖_F   subject to   W C_iᵀ = W_i C_iᵀ   for every concept i

    C = [C_1; …; C_m] (s, in),  Vᵀ = [W_1 C_1ᵀ, …, W_m C_mᵀ] (out, s),  M = C_regᵀ C_reg (in, in)
    D = C M⁻¹ (s, in)
    W = W0 + (Vᵀ − W0 Cᵀ) (D Cᵀ)⁻¹ D

(Lagrange: the change ``W − W0 = Λ C M⁻¹``; the constraints fix ``Λ``.) Solved in float64; ``M``
gets a relative ridge (``ridge · tr(M)/in · I``) so fewer regularisation features than ``in``
still give the smallest such change, and ``(D Cᵀ)⁻¹`` is a pseudo-inverse, so feature rows that
coincide (a causal text encoder gives every prompt starting "a photo of" the same first
features) get the mean of their targets instead of an impossible exact fit.

Features are text-encoder outputs at the prompt's tokens ``1 … EOS`` (BOS dropped: its K/V is
detached in training and the same for every prompt): :func:`concept_features`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MergeError
from ..formats.custom_diffusion import (
    KV_PARAMS,
    PROMPTS_KEY,
    CustomDiffusionFile,
    load_custom_diffusion,
    split_file_key,
)

__all__ = [
    "ConceptSolve",
    "concept_features",
    "merge_custom_diffusion",
    "merge_custom_diffusion_weights",
    "solve_concepts",
]


@dataclass(frozen=True)
class ConceptSolve:
    """The part of the closed-form merge that depends only on the features (see the module docstring).

    Every ``to_k``/``to_v`` of a model reads the same text features, so ``M = C_regᵀ C_reg``, its
    solve and the pseudo-inverse of ``D Cᵀ`` — the expensive part, ``O(n·in² + in³)`` — are the same
    for all of them: :func:`solve_concepts` computes them once, :meth:`merge` is then two small
    products per weight. All tensors are float64.

    Attributes:
        features: ``C_i`` (s_i, in) per concept.
        stacked: ``C`` (s, in), the concepts' features stacked.
        solved: ``D = C M⁻¹`` (s, in).
        inverse: ``(D Cᵀ)⁺`` (s, s).
    """

    features: tuple[Tensor, ...]
    stacked: Tensor
    solved: Tensor
    inverse: Tensor

    @property
    def in_features(self) -> int:
        """``in``: the feature width every weight must take."""
        return int(self.stacked.shape[1])

    def merge(self, base: Tensor, concept_weights: Sequence[Tensor]) -> Tensor:
        """The merged weight ``W0 + (Vᵀ − W0 Cᵀ) (D Cᵀ)⁺ D`` (out, in) of one projection.

        Args:
            base: ``W0`` (out, in).
            concept_weights: ``W_i`` (out, in), one per concept, in the order of :attr:`features`.

        Returns:
            ``W`` (out, in) in ``base.dtype``, on ``base.device``.

        Raises:
            MergeError: shapes that do not fit, or not one weight per concept.
        """
        if len(concept_weights) != len(self.features):
            raise MergeError(f"need one weight per concept: {len(self.features)} feature blocks, "
                             f"got {len(concept_weights)} weights")
        if base.ndim != 2 or base.shape[1] != self.in_features:
            raise MergeError(f"the base weight must be (out, {self.in_features}), got {tuple(base.shape)}")
        for i, w in enumerate(concept_weights):
            if w.shape != base.shape:
                raise MergeError(f"concept {i}: weight {tuple(w.shape)} and features {tuple(self.features[i].shape)} "
                                 f"do not fit the base {tuple(base.shape)}")
        f64 = {"dtype": torch.float64, "device": self.stacked.device}
        w0 = base.to(**f64)  # (out, in)
        vt = torch.cat([w.to(**f64) @ f.T for w, f in zip(concept_weights, self.features)], dim=1)  # (out, s)
        merged = w0 + (vt - w0 @ self.stacked.T) @ self.inverse @ self.solved  # (out, in)
        return merged.to(device=base.device, dtype=base.dtype)


def solve_concepts(
    concept_features: Sequence[Tensor],
    reg_features: Tensor,
    *,
    ridge: float = 1e-6,
    rtol: float = 1e-10,
    device: torch.device | str | None = None,
) -> ConceptSolve:
    """The feature-only part of the closed-form merge, once for every weight that reads these features.

    Args:
        concept_features: ``C_i`` (s_i, in) per concept: text features of its prompts.
        reg_features: ``C_reg`` (n, in): text features of regularisation prompts.
        ridge: ``M + ridge·tr(M)/in·I`` (0: exact ``M⁻¹``, needs n ≥ in independent features).
        rtol: relative cut-off of the pseudo-inverse of ``D Cᵀ`` (coinciding feature rows).
        device: where to solve (default: the features' device).

    Returns:
        a :class:`ConceptSolve`; ``solve.merge(W0, [W_1, …])`` is the merged weight.

    Raises:
        MergeError: no concepts, or features of different widths.
    """
    from ..checks import finite_number

    finite_number(ridge, name="ridge", low=0.0)
    finite_number(rtol, name="rtol", low=0.0, high=1.0)
    if not concept_features:
        raise MergeError("no concepts: need one feature block (s_i, in) per concept")
    if reg_features.ndim != 2:
        raise MergeError(f"regularisation features must be (n, in), got {tuple(reg_features.shape)}")
    in_dim = reg_features.shape[1]
    for i, c in enumerate(concept_features):
        if c.ndim != 2 or c.shape[1] != in_dim:
            raise MergeError(f"concept {i}: features {tuple(c.shape)} do not fit the regularisation features' width {in_dim}")
    f64 = {"dtype": torch.float64, "device": device if device is not None else reg_features.device}
    features = tuple(f.to(**f64) for f in concept_features)
    c = torch.cat(features)  # (s, in)
    creg = reg_features.to(**f64)  # (n, in)
    m = creg.T @ creg  # (in, in)
    if ridge:
        m = m + ridge * (torch.trace(m) / in_dim).clamp_min(1e-30) * torch.eye(in_dim, **f64)
    d = torch.linalg.solve(m, c.T).T  # (s, in) = C M⁻¹ (M symmetric)
    gram = d @ c.T  # (s, s) = C M⁻¹ Cᵀ
    inverse = torch.linalg.pinv(gram, rtol=rtol, hermitian=True)  # (s, s)
    return ConceptSolve(features, c, d, inverse)


def merge_custom_diffusion_weights(
    base: Tensor,
    concept_weights: Sequence[Tensor],
    concept_features: Sequence[Tensor],
    reg_features: Tensor,
    *,
    ridge: float = 1e-6,
    rtol: float = 1e-10,
) -> Tensor:
    """The closed-form merged weight of one projection (see the module docstring).

    For many weights reading the same features, :func:`solve_concepts` once and
    :meth:`ConceptSolve.merge` per weight give the same result without repeating the solve.

    Args:
        base: ``W0`` (out, in), the base model's weight.
        concept_weights: ``W_i`` (out, in) per concept (its fine-tuned weight).
        concept_features: ``C_i`` (s_i, in) per concept: text features of its prompts.
        reg_features: ``C_reg`` (n, in): text features of regularisation prompts.
        ridge: ``M + ridge·tr(M)/in·I`` (0: exact ``M⁻¹``, needs n ≥ in independent features).
        rtol: relative cut-off of the pseudo-inverse of ``D Cᵀ`` (coinciding feature rows).

    Returns:
        ``W`` (out, in) in ``base.dtype``, on ``base.device``.

    Raises:
        MergeError: shapes that do not fit, or no concepts.
    """
    if not concept_weights or len(concept_weights) != len(concept_features):
        raise MergeError(f"need one feature block per concept weight, got {len(concept_weights)} weights and {len(concept_features)} feature blocks")
    if base.ndim != 2:
        raise MergeError(f"the base weight must be (out, in), got {tuple(base.shape)}")
    out_dim, in_dim = base.shape
    for i, (w, c) in enumerate(zip(concept_weights, concept_features)):
        if tuple(w.shape) != (out_dim, in_dim) or c.ndim != 2 or c.shape[1] != in_dim:
            raise MergeError(f"concept {i}: weight {tuple(w.shape)} and features {tuple(c.shape)} do not fit the base {tuple(base.shape)}")
    if reg_features.ndim != 2 or reg_features.shape[1] != in_dim:
        raise MergeError(f"regularisation features must be (n, {in_dim}), got {tuple(reg_features.shape)}")
    solve = solve_concepts(concept_features, reg_features, ridge=ridge, rtol=rtol, device=base.device)
    return solve.merge(base, concept_weights)


def _eos_id(tokenizer) -> int:
    for name in ("eos_token_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"{type(tokenizer).__name__} has no eos_token_id/eos_id: cannot tell where a prompt ends")


def _context(cond) -> Tensor:
    if isinstance(cond, Tensor):
        return cond
    if isinstance(cond, dict) and isinstance(cond.get("context"), Tensor):
        return cond["context"]
    raise TypeError(f"the system's condition() gave {type(cond).__name__}; the merge needs the text states (B, L, D)")


@torch.no_grad()
def concept_features(system, prompts: Sequence[str], *, expand=None, through: str = "eos") -> Tensor:
    """Text features ``(s, D)`` of ``prompts``: the conditioning states at tokens ``1 … EOS`` of each
    prompt (BOS dropped; ``through="all"``: every position after BOS, padding included — all the
    UNet attends to), stacked; ``expand(prompt)`` spells multi-vector triggers out first.

    Raises:
        MergeError: no prompts.
        ValueError: ``through`` is neither ``"eos"`` nor ``"all"``.
    """
    if through not in ("eos", "all"):
        raise ValueError(f"through must be 'eos' or 'all', got {through!r}")
    if not prompts:
        raise MergeError("no prompts to take text features from")
    texts = [expand(p) for p in prompts] if expand is not None else list(prompts)
    ids = system.tokenize(texts)
    if getattr(system, "text_encoder_2", None) is not None or ids.ndim != 2:
        raise MergeError("the Custom Diffusion merge supports one-text-encoder models (SD1/SD2, the toy), not SDXL")
    states = _context(system.condition(ids)).double()  # (B, L, D)
    eos = _eos_id(system.tokenizer)
    rows = []
    for i in range(ids.shape[0]):
        hits = (ids[i] == eos).nonzero()
        end = int(hits[0]) if len(hits) and through == "eos" else ids.shape[1] - 1
        rows.append(states[i, 1 : end + 1])
    return torch.cat(rows).cpu()


def _load(source) -> CustomDiffusionFile:
    return source if isinstance(source, CustomDiffusionFile) else load_custom_diffusion(source)


def merge_custom_diffusion(
    sources: Sequence[str | os.PathLike | CustomDiffusionFile],
    *,
    system,
    prompts: Sequence[Sequence[str] | None] | None = None,
    reg_prompts: Sequence[str] | None = None,
    reg_count: int = 200,
    seed: int = 0,
    ridge: float = 1e-3,
    rtol: float = 3e-2,
) -> CustomDiffusionFile:
    """Merge single-concept Custom Diffusion results into one (the closed form per ``to_k``/``to_v``).

    Args:
        sources: Custom Diffusion files/folders (or loaded :class:`CustomDiffusionFile` s), one concept each,
            K/V only (``train_q_out`` results have no closed form here).
        system: the base model (a :class:`~sdadapt.methods.system.System`: its UNet gives ``W0``,
            its text encoder and tokenizer the features).
        prompts: per source, the prompts whose keys to keep (``None``: the prompts recorded in the
            file by sdadapt's training; else ``"photo of a <token>"``).
        reg_prompts: regularisation prompts; default ``system.class_prompts(reg_count, seed=seed)``.
            Their features are every position after BOS (padding included: the UNet attends to it).
        ridge, rtol: as for :func:`merge_custom_diffusion_weights`. The defaults here (1e-3, 3e-2)
            drop constraint directions the features barely determine: with exact constraints
            (``rtol=1e-10``) near-collinear prompt features with conflicting targets (a small
            text encoder, many prompts) demand changes many times the weights' size (on the toy
            model: 10-200x, and a broken model; see docs/custom-diffusion.md).

    Returns:
        a :class:`CustomDiffusionFile` with the merged K/V of every layer any source touches, all
        sources' modifier tokens and prompts (write it with
        :func:`sdadapt.formats.custom_diffusion.save_custom_diffusion_file`).

    Raises:
        MergeError: fewer than two sources, Q/out weights, tokens that clash, no regularisation prompts.
    """
    from ..embeddings import inject_embedding
    from .weights import cross_attention_layers

    files = [_load(s) for s in sources]
    if len(files) < 2:
        raise MergeError("the merge needs at least two Custom Diffusion results (one per concept)")
    for f in files:
        if f.train_q_out:
            raise MergeError(f"{f.source}: it replaces to_q/to_out too (train_q_out); the closed-form merge keeps K/V only")
    tokens = [t for f in files for t in f.tokens]
    if len(set(tokens)) != len(tokens):
        raise MergeError(f"modifier tokens clash: {tokens}; train each concept with its own token (<new1>, <new2> ...)")
    if prompts is None:
        prompts = [None] * len(files)
    if len(prompts) != len(files):
        raise MergeError(f"{len(prompts)} prompt lists for {len(files)} sources")
    if reg_prompts is None:
        make = getattr(system, "class_prompts", None)
        if make is None:
            raise MergeError("no regularisation prompts: pass reg_prompts (--reg-prompts FILE, ~200 captions of ordinary images)")
        reg_prompts = make(reg_count, seed=seed)
    if not reg_prompts:
        raise MergeError("the regularisation prompts are empty")
    layers = cross_attention_layers(system.unet)
    handles = []
    try:
        for f in files:
            for embedding in f.embeddings:
                handles.append(inject_embedding(system.text_encoder, system.tokenizer, embedding))

        def expand(prompt: str) -> str:
            for h in handles:
                prompt = h.expand(prompt)
            return prompt

        features = []
        for f, own in zip(files, prompts):
            chosen = list(own) if own else (f.prompts or [f"photo of a {t}" for t in f.tokens])
            if not chosen:
                raise MergeError(f"{f.source}: no prompts recorded and no modifier token; pass its prompts")
            features.append(concept_features(system, chosen, expand=expand))
        reg = concept_features(system, [*reg_prompts, ""], expand=expand, through="all")
    finally:
        for h in reversed(handles):
            h.remove()
    keys = sorted({k for f in files for k in f.weights})
    merged: dict[str, Tensor] = {}
    solve: ConceptSolve | None = None  # every K/V reads the same features: one solve for all of them
    for key in keys:
        layer, param = split_file_key(key)  # type: ignore[misc]
        if param not in KV_PARAMS:
            continue
        if layer not in layers:
            raise MergeError(f"{key}: the base model has no cross-attention layer {layer}; the files are for another model")
        base = layers[layer].parameter(param).detach().cpu()  # type: ignore[union-attr]
        weights = [f.weights.get(key, base) for f in files]
        if any(tuple(w.shape) != tuple(base.shape) for w in weights):
            raise MergeError(f"{key}: shapes {[tuple(w.shape) for w in weights]} do not fit the base model's {tuple(base.shape)}")
        if base.ndim != 2 or base.shape[1] != reg.shape[1]:
            raise MergeError(f"{key}: a {tuple(base.shape)} weight does not read the text features (width {reg.shape[1]}); "
                             "the files are for another model")
        if solve is None:
            solve = solve_concepts(features, reg, ridge=ridge, rtol=rtol)
        dtype = files[0].weights.get(key, base).dtype
        merged[key] = solve.merge(base.double(), weights).to(dtype)
    all_prompts = list(dict.fromkeys(p for f, own in zip(files, prompts) for p in (list(own) if own else f.prompts)))
    metadata = {PROMPTS_KEY: json.dumps(all_prompts)} if all_prompts else {}
    return CustomDiffusionFile(merged, [e for f in files for e in f.embeddings], metadata,
                               source="<merged " + " + ".join(f.source for f in files) + ">")
