"""Max-norm regularisation of LoRA-family adapters (kohya's ``--scale_weight_norms``).

After each optimiser step, every adapter whose weight delta is longer than ``max_norm`` (Frobenius
norm of the scaled ΔW, alpha / rank included) is shrunk onto the ball of that radius::

    ‖ΔWᵢ‖ > M:   ratioᵢ = M / ‖ΔWᵢ‖      every one of the nᵢ factors of adapter i ← factor · ratioᵢ^(1/nᵢ)
    otherwise:   ratioᵢ = 1             (factors multiplied by exactly 1: unchanged bit for bit)

ΔW is multilinear in a LoRA-family adapter's factors, each entering once (LoRA ``up ⋅ down``, Tucker
LoCon ``up ⋅ mid ⋅ down``, LoHa ``(w1a w1b) ⊙ (w2a w2b)`` with its Tucker cores, LoKr
``w1 ⊗ w2`` with each side full or factored), so spreading ``ratio`` evenly over the factors scales
ΔW by exactly ``ratio`` and keeps the factors balanced. That is kohya's rule for LoRA
(``networks/lora.py`` ``apply_max_norm_regularization``: ``up`` and ``down`` each times √ratio) and
LyCORIS' for LoKr (each factor times ``ratio^(1/modules)``); LyCORIS' LoCon and LoHa multiply a
scalar of their own instead, which changes ΔW the same way (sdadapt's adapters have no such scalar:
the file stays plain factors).

OFT (Diag-OFT / BOFT) has no ΔW of its own (it rotates the base weight): LyCORIS' ``DiagOFTModule`` /
``ButterflyOFTModule.apply_max_norm`` bound the generator instead, ``‖oft_blocks‖_F`` (all blocks of the layer,
the ``rescale`` scales untouched), with the same ratio: ``oft_blocks ← oft_blocks · M / ‖oft_blocks‖`` when
``‖oft_blocks‖ > M``. sdadapt does the same (:data:`MAX_NORM_OWN_NORM`).

Refused: DoRA (its layer change ``m ⊙ (W + ΔW)/‖W + ΔW‖ − W`` is not ΔW, and shrinking ΔW does not
bound it) and full deltas (``diff``). Skipped (:data:`MAX_NORM_SKIPPED`): GLoRA, (IA)³ and norm modules — LyCORIS
defines no max norm for them (their ``apply_max_norm`` returns ``(None, None)``) and its kohya network skips them,
so a LoKr run with ``train_norm`` bounds its LoKr modules alone.

Everything runs on the device (norms, ratios, in-place multiplies): no host read, nothing that
branches on a value, so the step can be replayed in a CUDA graph. The statistics kohya logs
(``keys_scaled``, ``average_key_norm``, ``max_key_norm``: norms after scaling) come back as 0-dim
tensors to be read with the step's loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..adapters.base import AdapterModule

__all__ = ["MAX_NORM_FAMILIES", "MAX_NORM_OWN_NORM", "MAX_NORM_SKIPPED", "adapters_in", "delta_norms",
           "max_norm_factors", "max_norm_ratios", "scale_weight_norms_"]

#: families whose norm is that of one parameter of theirs, which alone is scaled (LyCORIS' apply_max_norm):
#: OFT's oft_blocks (a rotation's generator; OFT has no ΔW without the base weight)
MAX_NORM_OWN_NORM = {"oft": "oft_blocks"}
#: adapter families whose ΔW is multilinear in their factors (one each), and MAX_NORM_OWN_NORM's: max norm scales these
MAX_NORM_FAMILIES = ("lora", "loha", "lokr", *MAX_NORM_OWN_NORM)
#: adapter families LyCORIS' kohya network skips (no max norm defined: ``apply_max_norm`` returns ``(None, None)``)
MAX_NORM_SKIPPED = ("glora", "ia3", "norm")


def max_norm_factors(adapter: AdapterModule) -> list[nn.Parameter]:
    """The factors of ``adapter`` that ΔW is multilinear in (its own parameters: LoRA ``lora_down``,
    ``lora_up`` [, ``lora_mid``]; LoHa ``hada_*``; LoKr the ``lokr_*`` present).

    Raises:
        ValueError: ``adapter`` is not of :data:`MAX_NORM_FAMILIES` (DoRA, full deltas, GLoRA, norm
            modules, an unknown family), naming its family; an OFT layer read from an old ``oft_diag``.
    """
    if adapter.family not in MAX_NORM_FAMILIES:
        why = {"dora": "DoRA renormalises W + ΔW to its magnitude, so shrinking ΔW does not bound the layer's change",
               "full": "LyCORIS defines no max norm for full deltas",
               "glora": "LyCORIS defines no max norm for GLoRA (its kohya network skips GLoRA modules)",
               "norm": "LyCORIS defines no max norm for its norm modules (train_norm; its kohya network skips them)",
               }.get(adapter.family, "not a LoRA-family adapter")
        raise ValueError(f"scale_weight_norms (kohya's --scale_weight_norms) works on {', '.join(MAX_NORM_FAMILIES)} "
                         f"adapters (train lora, locon, loha, lokr, diag-oft or boft); a "
                         f"{adapter.family or type(adapter).__name__} adapter is not one: {why}")
    if getattr(adapter, "stored_rotation", False):  # (an old LyCORIS oft_diag: R itself, no generator to shrink)
        raise ValueError("scale_weight_norms bounds an OFT layer's generator oft_blocks; this one holds LyCORIS' old "
                         "'oft_diag' rotation itself (read from a file), which it cannot bound: train a new diag-oft")
    if adapter.family in MAX_NORM_OWN_NORM:
        return [getattr(adapter, MAX_NORM_OWN_NORM[adapter.family])]
    factors = list(adapter.parameters(recurse=False))
    if not factors:
        raise ValueError(f"scale_weight_norms: the {adapter.family} adapter {type(adapter).__name__} has no factors")
    return factors


def adapters_in(roots: Iterable[nn.Module], params: Iterable[Tensor]) -> list[AdapterModule]:
    """The adapter modules under ``roots`` that own any of ``params`` (in module order, each once).

    A wrapper and what it wraps (DoRA and its inner LoRA) are both listed: :func:`max_norm_factors`
    then refuses the wrapper."""
    wanted = {id(p) for p in params}
    found: dict[int, AdapterModule] = {}
    for root in roots:
        for module in root.modules():
            if isinstance(module, AdapterModule) and any(id(p) in wanted for p in module.parameters(recurse=False)):
                found.setdefault(id(module), module)
    return list(found.values())


@torch.no_grad()
def delta_norms(adapters: Sequence[AdapterModule]) -> Tensor:
    """(n,): ‖ΔWᵢ‖_F of each adapter's ``delta_weight()`` (alpha / rank and the strength included) —
    for :data:`MAX_NORM_OWN_NORM` families the norm of that parameter (OFT: ‖oft_blocks‖_F, as LyCORIS) —
    in float32 (float64 for float64 adapters), on the first adapter's device."""
    if not adapters:
        raise ValueError("delta_norms needs at least one adapter")
    norms = []
    device = None
    for adapter in adapters:
        own = MAX_NORM_OWN_NORM.get(adapter.family)
        delta = getattr(adapter, own) if own else adapter.delta_weight()  # (out, in, *k) / OFT (…, b, b)
        norm = torch.linalg.vector_norm(delta, dtype=torch.promote_types(delta.dtype, torch.float32))
        device = norm.device if device is None else device
        norms.append(norm.to(device, non_blocking=True))
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.stack([n.to(dtype) for n in norms])


def max_norm_ratios(norms: Tensor, max_norm: float) -> Tensor:
    """(n,) -> (n,): ``max_norm / norm`` where ``norm > max_norm``, else exactly 1 (kohya's
    ``clamp(norm, max_norm/2)`` / ``clamp(·, max=max_norm)`` ratio; a zero or NaN norm gives 1)."""
    return torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))


@torch.no_grad()
def scale_weight_norms_(adapters: Sequence[AdapterModule], max_norm: float) -> dict[str, Tensor]:
    """Shrink, in place, every adapter whose ‖ΔW‖_F exceeds ``max_norm`` onto norm ``max_norm``
    (its nᵢ factors each times ``ratioᵢ^(1/nᵢ)``; OFT: ``oft_blocks`` onto that norm, times ``ratioᵢ``); the
    others are multiplied by exactly 1.

    Args:
        adapters: LoRA-family adapter modules (:data:`MAX_NORM_FAMILIES`).
        max_norm: the largest ‖ΔW‖_F allowed (> 0).

    Returns:
        0-dim tensors on the adapters' device (no host read): ``keys_scaled`` (how many were
        shrunk, int64), ``average_key_norm`` and ``max_key_norm`` (of the norms after scaling,
        over every adapter) — kohya's progress-bar and tracker values.

    Raises:
        ValueError: ``max_norm`` not > 0, no adapters, or an adapter of another family.
    """
    if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm > 0
            and max_norm != float("inf")):
        raise ValueError(f"scale_weight_norms must be a finite number > 0 (the largest ‖ΔW‖ of a layer, e.g. 1.0), "
                         f"got {max_norm!r}")
    factors = [max_norm_factors(adapter) for adapter in adapters]  # refuses other families before any change
    norms = delta_norms(adapters)  # (n,)
    ratios = max_norm_ratios(norms, float(max_norm))  # (n,)
    for ratio, own in zip(ratios.unbind(), factors):
        share = ratio ** (1.0 / len(own))  # 0-dim, on the device (1 ** x == 1 exactly); nothing made on the host
        for factor in own:
            factor.mul_(share.to(factor.device, non_blocking=True))
    scaled = norms * ratios
    return {"keys_scaled": (ratios < 1).sum(), "average_key_norm": scaled.mean(), "max_key_norm": scaled.max()}
