"""Aesthetic gradients at generation time: a few Adam steps on the text encoder, done functionally.

The published method (Gallego 2022, ``vicgalle/stable-diffusion-aesthetic-gradients``; the A1111
extension ``aesthetic_clip.py``), for token ids ``x`` (B, L) and an aesthetic embedding ``e``:

1. ``ê = e / ‖e‖`` (files store the raw mean; consumers normalise at load);
2. for ``steps`` steps, Adam (lr ``1e-4``) over the text encoder's parameters θ (the projection
   is not trained) on ``loss(θ) = mean_b −cos(f_θ(x_b), ê)`` where ``f_θ(x) = P · pooled_θ(x)`` is
   CLIP's text embedding: the final-layer-normed state at the pooled (``<eos>``) token through
   the text projection ``P`` (``get_text_features``);
3. the personalised conditioning ``z' = h_θ'(x)`` (B, L, D) — the last hidden state, or with
   clip skip ``k > 1`` the ``k``-th from last, final-layer-normed (A1111);
4. the conditioning for sampling: ``z·(1 − w) + z'·w`` (A1111's ``aesthetic_weight`` w, default
   0.9; vicgalle's script is ``w = 1``) or ``slerp(z, z', w)`` — A1111's slerp, which
   interpolates along the *token* axis (each feature channel's L-vector; see :func:`slerp`).

The original deep-copies the whole CLIP model for every prompt and runs everything at full
length. Here, for the *same* result (equal up to float rounding; the benchmark and the tests check
≤ 1e-5):

* **no copy of the encoder.** The tuned parameters are cloned into a dict and the whole
  personalisation runs inside one :func:`torch.func.functional_call`, which swaps the clones in
  and the original parameter objects back (also on an exception); the original tensors are
  never written to, so they are bit-identical afterwards, and they get no ``.grad``;
* **only the token rows in use.** Adam leaves a parameter whose gradient has been exactly zero
  at every step where it was (``m = v = 0`` ⇒ update ``0``), so of the ``V × D`` token table
  (49408 × 768 for CLIP-L) only the rows of the prompt's ids can change: those rows are cloned and
  spliced into the lookup's output by two temporary hooks (removed afterwards); no gradient, no
  optimiser state for the rest;
* **the loss only up to ``<eos>``.** In a causal encoder (CLIP) the pooled ``<eos>`` state does
  not depend on later positions, and their gradients are exactly zero; the loss steps run on
  ``ids[:, :max_eos + 1]`` (7 of 77 tokens for "a photo of a cat"). The final conditioning runs
  at full length;
* **a fused Adam** (one multi-tensor kernel, where the device has one) instead of the per-tensor
  loop the extension gets by default on a CPU.

A half-precision encoder (float16/bfloat16 — transformers loads a text encoder in the dtype its
files hold) is personalised in **float32**, as the originals always do (their personalised model
is a float32 ``CLIPModel``): Adam's ``lr = 1e-4`` steps vanish below float16's resolution and its
second moment underflows to 0, so steps taken in float16 give another (or a NaN) conditioning.
Float32 copies of the encoder's tensors are swapped in for the personalisation only; the result is
returned in the encoder's dtype.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..embeddings.table import find_token_embedding, slot_table, splice_rows
from ..errors import InputError
from ..formats.aesthetic import as_aesthetic_vector

__all__ = ["personalize_text_encoder", "aesthetic_loss", "slerp", "mix_conditioning", "rotate_toward_text",
           "text_features", "normalize_embedding", "default_tune"]


# ----------------------------------------------------------------------------------- pure math
def normalize_embedding(embedding: Tensor) -> Tensor:
    """``e / ‖e‖`` as ``(1, D)`` (what every consumer does with a stored aesthetic embedding).

    Raises:
        ValueError: a shape other than (D,)/(1, D), a zero vector, or NaN/inf.
    """
    vector = as_aesthetic_vector(embedding)
    if not bool(torch.isfinite(vector).all()):
        raise InputError("the aesthetic embedding holds NaN or inf")
    norm = vector.norm(dim=-1, keepdim=True)  # (1, 1)
    if not float(norm) > 0:
        raise InputError("the aesthetic embedding is all zeros; it has no direction to personalise toward")
    return vector / norm


def aesthetic_loss(features: Tensor, target: Tensor) -> Tensor:
    """``mean_b −(f_b / ‖f_b‖) · t`` — the published loss; ``= mean −cos(f_b, t)`` for a unit ``t``.

    Args:
        features: (B, E) text embeddings (pooled, projected).
        target: (1, E) the normalised aesthetic embedding (:func:`normalize_embedding`), or a
            rotated one (:func:`rotate_toward_text`), used as it is — as the original does.

    Returns:
        0-dim loss.
    """
    unit = features / features.norm(dim=-1, keepdim=True)  # (B, E)
    return -(unit @ target.to(unit.dtype).T).mean()  # (B, 1) -> ()


def slerp(low: Tensor, high: Tensor, t: float, *, dim: int = 1) -> Tensor:
    """A1111's spherical interpolation along ``dim``::

        Ω = arccos(⟨low/‖low‖, high/‖high‖⟩)          (norms and dot product along dim)
        slerp = sin((1−t)Ω)/sin Ω · low + sin(tΩ)/sin Ω · high

    The inputs are *not* normalised in the result (the weights are). For the conditioning
    (B, L, D) A1111 uses ``dim=1`` — the token axis: each feature channel's L-vector is
    interpolated; for (1, E) embeddings ``dim=1`` is the feature axis. Where ``sin Ω`` is 0
    (parallel inputs, where A1111 produces NaN) this returns the linear interpolation instead.
    """
    low_n = low / low.norm(dim=dim, keepdim=True)
    high_n = high / high.norm(dim=dim, keepdim=True)
    omega = torch.acos((low_n * high_n).sum(dim, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    out = torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high
    linear = low * (1.0 - t) + high * t
    return torch.where(so.abs() > 1e-7, out, linear)


def mix_conditioning(base: Tensor, personal: Tensor, weight: float, *, use_slerp: bool = False) -> Tensor:
    """The conditioning for sampling: ``base·(1 − w) + personal·w`` (A1111's formula, term for term),
    or ``slerp(base, personal, w, dim=1)``. Shapes (B, L, D)."""
    if use_slerp:
        return slerp(base, personal, weight, dim=1)
    return base * (1 - weight) + personal * weight


def rotate_toward_text(target: Tensor, text: Tensor, *, angle: float = 0.1, negative: bool = False) -> Tensor:
    """A1111's "aesthetic text": turn the unit target (1, E) toward (or away from) a text's features.

    ``negative``: ``text ← (target − text)/‖target − text‖`` first. Result ``slerp(target, text,
    angle)`` along the feature axis (not renormalised, as in A1111).
    """
    text = text.to(target.dtype)
    if negative:
        text = target - text
        text = text / text.norm(dim=-1, keepdim=True)
    return slerp(target, text, angle, dim=-1)


# --------------------------------------------------------------------------------- the encoder
def default_tune(name: str) -> bool:
    """Which text-encoder parameters are personalised by default: all but the text projection
    (the original optimises ``text_model.parameters()``)."""
    return "text_projection" not in name


def _is_transformers_clip(module: nn.Module) -> bool:
    return type(module).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection") and type(module).__module__.startswith("transformers.")


#: CLIP's ``<|endoftext|>`` in its BPE vocabulary (49408 entries, the last two ``<|startoftext|>``, ``<|endoftext|>``):
#: every SD text encoder's (CLIP-L, OpenCLIP-H/bigG share the vocabulary)
CLIP_EOS_ID = 49407


def _config_eos(encoder: nn.Module) -> int | None:
    """A transformers CLIP's ``eos_token_id`` as its text model reads it (the config's), or ``None``."""
    eos = getattr(getattr(encoder, "text_model", encoder), "eos_token_id", None)
    return getattr(getattr(encoder, "config", None), "eos_token_id", None) if eos is None else eos


def _legacy_eos(encoder: nn.Module, eos_id: int | None) -> int | None:
    """The ``<eos>`` id to pool at where transformers would pool elsewhere, else ``None``: a transformers CLIP whose
    config has the legacy ``eos_token_id`` 2 (SD1.x diffusers folders) pools at the *largest* id, which is an added
    (textual-inversion) token's where one is in the prompt; CLIP's text embedding is the first ``<eos>``'s state
    (A1111's extension and vicgalle's script run a CLIP without added tokens; kohya's ``_pool_workaround``).
    ``eos_id`` (the tokenizer's) if given, else :data:`CLIP_EOS_ID` for a table of CLIP's size, else ``None`` (the
    largest id, as transformers: a small test vocabulary)."""
    if not _is_transformers_clip(encoder) or _config_eos(encoder) != 2:
        return None
    if eos_id is not None:
        return int(eos_id)
    vocab = getattr(getattr(encoder, "config", None), "vocab_size", 0) or 0
    return CLIP_EOS_ID if vocab >= CLIP_EOS_ID + 1 else None


def _pooled_positions(encoder: nn.Module, ids: Tensor, eos_id: int | None = None) -> Tensor | None:
    """(B,) position of the pooled token for the encoders known to be causal, else ``None``: each row's first
    ``<eos>`` (:func:`_legacy_eos`)."""
    from ..toy.text_encoder import ToyTextEncoder

    if isinstance(encoder, ToyTextEncoder):
        return (ids == encoder.eos_id).int().argmax(dim=1)
    if _is_transformers_clip(encoder):
        eos = _config_eos(encoder)
        if eos is None:
            return None
        if eos == 2:  # transformers' legacy configs pool at the largest id: the <eos> where no id is added
            legacy = _legacy_eos(encoder, eos_id)
            if legacy is None:
                return ids.to(torch.int).argmax(dim=-1)
            eos = legacy
        return (ids.to(torch.int) == eos).int().argmax(dim=-1)
    return None


class _EncoderView(nn.Module):
    """The text encoder (a child, unchanged) + projection, read two ways, for ``functional_call``.

    ``view(ids, "features")`` → (B, E) CLIP text embeddings; ``view(ids, "hidden")`` → (B, L, D)
    the conditioning.
    """

    def __init__(self, encoder: nn.Module, projection: nn.Module | Tensor | None, clip_skip: int,
                 eos_id: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.legacy_eos = _legacy_eos(encoder, eos_id)
        self.projection = projection if isinstance(projection, nn.Module) else None
        self._projection_weight = projection if isinstance(projection, Tensor) else None
        self.clip_skip = clip_skip
        self.final_norm: str | None = None
        if clip_skip > 1:
            names = [n for n, m in encoder.named_modules() if n.rsplit(".", 1)[-1] == "final_layer_norm"]
            signature = inspect.signature(encoder.forward).parameters
            hidden_states = "output_hidden_states" in signature or any(p.kind is p.VAR_KEYWORD for p in signature.values())
            if len(names) != 1 or not hidden_states:
                raise InputError(
                    f"clip_skip={clip_skip} needs a CLIP text model with one final_layer_norm and hidden_states "
                    f"output (transformers CLIPTextModel); {type(encoder).__name__} has {len(names)} and "
                    f"{'takes' if hidden_states else 'does not take'} output_hidden_states"
                )
            self.final_norm = names[0]

    def forward(self, ids: Tensor, what: str, run: Callable[[_EncoderView], Tensor] | None = None) -> Tensor:
        if what == "features":
            return self._features(ids)
        if what == "run":  # the whole personalisation inside one functional_call (see personalize_text_encoder)
            return run(self)
        return self._hidden(ids)

    def _features(self, ids: Tensor) -> Tensor:
        out = self.encoder(ids)
        projected = getattr(out, "text_embeds", None)
        if projected is not None and (self.projection is not None or self._projection_weight is not None):
            raise InputError(f"{type(self.encoder).__name__} already projects its output (text_embeds); "
                             "do not pass projection=")
        if self.legacy_eos is not None:  # (transformers pools at the largest id: an added token's, if any; without
            # one, the same state) — CLIP's text embedding at each row's first <eos>, the final-normed state there
            states = out.last_hidden_state  # (B, L, D)
            first = (ids == self.legacy_eos).int().argmax(dim=-1)  # (B,)
            pooled = states[torch.arange(states.shape[0], device=states.device), first.to(states.device)]  # (B, D)
            return self.encoder.text_projection(pooled) if projected is not None else self._project(pooled)
        if projected is not None:
            return projected
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            if isinstance(out, (tuple, list)) and len(out) >= 2:
                pooled = out[1]
            else:
                raise InputError(
                    f"{type(self.encoder).__name__} returns no pooled output (pooler_output, or (hidden, pooled)); "
                    "aesthetic gradients need CLIP's pooled text embedding"
                )
        return self._project(pooled)

    def _project(self, pooled: Tensor) -> Tensor:
        """The pooled text state (B, D) through ``projection`` into the image-embedding space (B, E)."""
        if self.projection is not None:
            return self.projection(pooled)
        if self._projection_weight is not None:
            return F.linear(pooled, self._projection_weight.to(pooled))
        # the pooled output of a bare text tower (CLIPTextModel, the toy encoder) is not in the image
        # space even when the widths agree (CLIP-L: 768 and 768): refuse rather than optimise nonsense
        raise InputError(
            f"{type(self.encoder).__name__} has no text projection: pass projection= (CLIP's text_projection — "
            "sdadapt.aesthetic.load_text_projection reads it from a CLIP checkpoint; for the toy system "
            "sdadapt.aesthetic.toy_text_projection), or projection=torch.nn.Identity() if its pooled output "
            "already lies in the image-embedding space"
        )

    def _hidden(self, ids: Tensor) -> Tensor:
        if self.clip_skip > 1:
            out = self.encoder(ids, output_hidden_states=True)
            return self.get_submodule(f"encoder.{self.final_norm}")(out.hidden_states[-self.clip_skip])
        out = self.encoder(ids)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is not None:
            return hidden
        if isinstance(out, (tuple, list)):
            return out[0]
        if isinstance(out, Tensor):
            return out
        raise InputError(f"{type(self.encoder).__name__}: cannot find the hidden states in its output ({type(out).__name__})")


class _TunedRows:
    """Trainable copies of the token-table rows a prompt uses, spliced into the lookup by hooks.

    The pre-hook is *prepended* (it reads the ids before another hook — a textual-inversion
    :class:`~sdadapt.embeddings.TokenRows` — rewrites them) and the splice runs after the other
    hooks, so the rows start from what the encoder really looks up and override it. Ids beyond the
    table (tokens a tokenizer added) are left to whoever owns them.
    """

    def __init__(self, table: nn.Embedding, ids: Tensor, dtype: torch.dtype | None = None) -> None:
        used = torch.unique(ids[(ids >= 0) & (ids < table.num_embeddings)])  # sorted
        self.token_ids = used
        with torch.no_grad():
            start = table(used[None])[0]  # (n, D): the effective rows, through any existing hooks
        start = start if dtype is None else start.to(dtype)
        self.rows = start.detach().clone().requires_grad_(True)  # (n, D) leaf
        self._slots = slot_table(used.tolist(), size=table.num_embeddings, device=ids.device)
        self._pending: Tensor | None = None
        self._hooks = [table.register_forward_pre_hook(self._pre, prepend=True), table.register_forward_hook(self._post)]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        ids = args[0]
        inside = (ids >= 0) & (ids < self._slots.shape[0])
        self._pending = torch.where(inside, self._slots.to(ids.device)[ids.clamp(0, self._slots.shape[0] - 1)], -1)

    def _post(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        pending, self._pending = self._pending, None
        return output if pending is None else splice_rows(output, pending, self.rows)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


#: token tables at least this large (elements) are tuned row-wise (CLIP-L's is 38M); smaller ones
#: (the toy's 4k) are cheaper to clone whole than to splice with hooks
_ROWS_FROM = 1 << 20


def _adam(leaves: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9/0.999, eps 1e-8 — torch's defaults, the original's) fused where possible."""
    try:
        return torch.optim.Adam(leaves, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device/dtype without the fused kernel
        return torch.optim.Adam(leaves, lr=lr)


def _compute_dtype(encoder: nn.Module) -> torch.dtype | None:
    """``torch.float32`` when the encoder holds half-precision (float16/bfloat16) parameters — the
    personalisation then runs on float32 copies, as the originals' float32 CLIP model does —, else
    ``None`` (its own dtype)."""
    half = (torch.float16, torch.bfloat16)
    return torch.float32 if any(p.dtype in half for p in encoder.parameters()) else None


def text_features(text_encoder: nn.Module, input_ids: Tensor, *, projection: nn.Module | Tensor | None = None,
                  eos_id: int | None = None) -> Tensor:
    """CLIP text embeddings (B, E) of ``input_ids`` (B, L) — ``get_text_features`` (not normalised), pooled at
    each row's first ``<eos>`` (``eos_id``: as :func:`personalize_text_encoder`'s)."""
    with torch.no_grad():
        return _EncoderView(text_encoder, projection, 1, eos_id)(input_ids, "features")


def _check_options(steps: int, lr: float, weight: float, clip_skip: int, text_angle: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be an integer >= 0 (the original uses 5-10), got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise InputError(f"lr must be a finite number >= 0 (the original's is 1e-4), got {lr!r}")
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise InputError(f"weight must be in [0, 1] (1 = only the personalised conditioning; A1111's default 0.9), got {weight!r}")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise InputError(f"clip_skip must be an integer >= 1 (1 = the last layer), got {clip_skip!r}")
    if not (isinstance(text_angle, (int, float)) and 0.0 <= text_angle <= 1.0):
        raise InputError(f"text_angle must be in [0, 1] (A1111's default 0.1), got {text_angle!r}")


def personalize_text_encoder(
    text_encoder: nn.Module,
    input_ids: Tensor,
    embedding: Tensor,
    *,
    steps: int = 5,
    lr: float = 1e-4,
    weight: float = 0.9,
    slerp: bool = False,
    projection: nn.Module | Tensor | None = None,
    clip_skip: int = 1,
    base: Tensor | None = None,
    tune: Callable[[str], bool] | None = None,
    truncate: bool | None = None,
    text_ids: Tensor | None = None,
    text_angle: float = 0.1,
    text_negative: bool = False,
    eos_id: int | None = None,
    callback: Callable[[int, int, float], None] | None = None,
) -> Tensor:
    """Personalise ``text_encoder`` toward an aesthetic embedding for ``input_ids``; return the
    conditioning to sample with. The encoder is not modified (see the module docstring).

    Formula: ``z_mix = z·(1 − w) + z'·w`` (or slerp), ``z' = h_θ'(x)``, θ' after ``steps`` Adam
    steps (lr) on ``mean_b −cos(P·pooled_θ(x_b), e/‖e‖)`` from θ.

    Args:
        text_encoder: a CLIP-like text encoder: transformers ``CLIPTextModel`` (pass
            ``projection``: CLIP's ``text_projection``), ``CLIPTextModelWithProjection`` (its own
            ``text_embeds``), the toy encoder (pass a projection, e.g.
            :func:`sdadapt.aesthetic.toy_text_projection`), or any module returning
            ``last_hidden_state``/``pooler_output`` or ``(hidden, pooled)``.
        input_ids: (B, L) token ids of the prompt(s). A batch shares one personalisation (the
            loss is the batch mean, as in the original); call once per prompt for per-prompt results.
        embedding: (D_e,) or (1, D_e) the aesthetic embedding, as stored (normalised here).
        steps: Adam steps (A1111 default 5, vicgalle's script 10); 0 returns ``base``.
        lr: Adam learning rate (1e-4); 0 returns ``base``.
        weight: ``w`` in [0, 1]; 0 returns ``base``, 1 the personalised conditioning alone.
        slerp: interpolate with A1111's :func:`slerp` (token axis) instead of linearly.
        projection: ``nn.Module`` or (E, D) weight applied to the pooled output (not trained);
            required unless the encoder projects itself (``text_embeds``) — a bare text tower's
            pooled output is not in the image space even when the widths agree.
        clip_skip: 1 = last layer; k > 1 = the k-th hidden state from the end, final-layer-normed
            (transformers CLIP models; A1111's "CLIP stop at last layers").
        base: (B, L, D) the unpersonalised conditioning if already computed (else computed here).
        tune: ``tune(name) -> bool`` over ``text_encoder.named_parameters()`` names: which to
            personalise (default :func:`default_tune`: all but ``text_projection``).
        truncate: run the loss steps only up to the last ``<eos>``; default: on for the encoders
            known to be causal (transformers CLIP, the toy encoder), off otherwise.
        text_ids: (1, L) ids of A1111's "aesthetic text": the target is turned toward its
            features by ``text_angle`` (away, with ``text_negative``) — :func:`rotate_toward_text`.
        eos_id: the tokenizer's ``<eos>`` id: the loss pools each row there (CLIP's text embedding). Only read
            for a transformers CLIP with the legacy ``eos_token_id`` 2 (SD1.x diffusers folders), which transformers
            pools at the largest id — an added textual-inversion token's where one is in the prompt; default
            CLIP's 49407 (:data:`CLIP_EOS_ID`) for a table of CLIP's size.
        callback: ``callback(step, steps, loss)`` after each step (one host sync per step).

    Returns:
        (B, L, D) conditioning, in the encoder's dtype, without gradient.

    Raises:
        InputError (a ValueError): options out of range, a bad embedding, no projection for a
            bare text tower, a width mismatch between the text features and the embedding, or
            ``truncate=True`` on an encoder not known to be causal.

    Example::

        ids = tokenizer(["a castle on a hill"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = sdadapt.personalize_text_encoder(clip_text, ids, sdadapt.load_aesthetic_embedding("sac_8plus.pt"),
                                                projection=clip_model.text_projection, steps=5, weight=0.9)
    """
    _check_options(steps, lr, weight, clip_skip, text_angle)
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids must be (B, L) integer token ids, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    tune = tune or default_tune
    with torch.inference_mode(False):  # (tensors made in inference mode cannot enter autograd: copy them)
        ids = input_ids.clone()
        if isinstance(projection, Tensor):
            projection = projection.detach().clone()
        view = _EncoderView(text_encoder, projection, clip_skip, eos_id)
        if base is None:
            with torch.no_grad():
                base = view(ids, "hidden")
        if steps == 0 or lr == 0 or weight == 0:
            return base
        first = next(text_encoder.parameters(), None)
        compute = _compute_dtype(text_encoder)  # float32 for a half-precision encoder, else None (its own dtype)
        # float32 copies of every floating tensor of a half-precision encoder (and projection), swapped in
        # with the tuned clones; empty otherwise
        upcast = ({n: t.detach().to(compute) for n, t in itertools.chain(view.named_parameters(), view.named_buffers())
                   if t.is_floating_point()} if compute is not None else {})
        dtype = compute or (first.dtype if first is not None else torch.float32)
        target = normalize_embedding(embedding.detach().clone()).to(device=ids.device, dtype=dtype)
        if text_ids is not None:
            if upcast:
                with torch.no_grad():
                    text = functional_call(view, upcast, (text_ids.to(ids.device), "features"))
            else:
                text = text_features(text_encoder, text_ids.to(ids.device), projection=projection, eos_id=eos_id)
            target = rotate_toward_text(target, text, angle=text_angle, negative=text_negative)
        positions = _pooled_positions(text_encoder, ids, eos_id)
        if truncate and positions is None:
            raise InputError(f"truncate=True: {type(text_encoder).__name__} is not an encoder sdadapt knows to be causal "
                             "(transformers CLIP, the toy encoder); leave truncate unset")
        loss_ids = ids[:, : int(positions.max()) + 1] if positions is not None and truncate is not False else ids

        tuned = [(n, p) for n, p in text_encoder.named_parameters() if tune(n)]
        if not tuned:
            raise InputError("tune selected no parameter of the text encoder")
        table = _large_token_table(text_encoder)
        splice = table is not None and any(p is table.weight for _, p in tuned)
        params = {f"encoder.{n}": upcast.get(f"encoder.{n}", p.detach()).clone().requires_grad_(True)
                  for n, p in tuned if not (splice and p is table.weight)}
        rows = _TunedRows(table, ids, compute) if splice else None
        leaves = list(params.values()) + ([rows.rows] if rows is not None else [])
        optimizer = _adam(leaves, lr)

        def run(view: _EncoderView) -> Tensor:
            # runs with the clones swapped into the encoder: one swap in and out for the whole
            # personalisation (functional_call restores the originals, also on an exception)
            with torch.enable_grad():
                for step in range(steps):
                    features = view(loss_ids, "features")  # (B, E)
                    if features.shape[-1] != target.shape[-1]:
                        raise InputError(
                            f"the text features are {features.shape[-1]} wide but the aesthetic embedding is "
                            f"{target.shape[-1]}; pass projection= (the CLIP model's text_projection) so the text "
                            "lands in the image-embedding space"
                        )
                    loss = aesthetic_loss(features, target)
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                    for leaf, grad in zip(leaves, grads):
                        leaf.grad = torch.zeros_like(leaf) if grad is None else grad
                    optimizer.step()
                    if callback is not None:
                        callback(step + 1, steps, float(loss.detach()))
            with torch.no_grad():
                return view(ids, "hidden")  # (B, L, D) at full length

        try:
            personal = functional_call(view, {**upcast, **params}, (ids, "run", run))
        finally:
            if rows is not None:
                rows.remove()
        with torch.no_grad():
            if compute is not None:  # mix in float32, round once
                return mix_conditioning(base.to(compute), personal.to(compute), weight, use_slerp=slerp).to(base.dtype)
            return mix_conditioning(base, personal.to(base.dtype), weight, use_slerp=slerp)


def _large_token_table(encoder: nn.Module) -> nn.Embedding | None:
    """The encoder's token table if it is large enough to tune row-wise (:data:`_ROWS_FROM`), else ``None``."""
    getter = getattr(encoder, "get_input_embeddings", None)
    table = None
    if callable(getter):
        try:
            table = getter()
        except (NotImplementedError, AttributeError):
            table = None
    if not isinstance(table, nn.Embedding):
        try:
            table = find_token_embedding(encoder)[1]
        except ValueError:
            return None
    return table if table.weight.numel() >= _ROWS_FROM else None
