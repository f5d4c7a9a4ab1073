"""The streaming merge engine: plan every key from headers, then read-merge-write one key at a time.

Memory: at any moment the engine holds one key's tensors — each input's copy, their float32
working copies and the result — so peak memory is a small multiple of the largest tensor times
the number of inputs, independent of the model's size. Inputs are read with positioned reads
(:mod:`.sources`), the output is written incrementally (:mod:`.writer`).

Flow for a :class:`~sdadapt.merge.recipe.MergeStep`:

1. open the inputs (files lazily; nested steps become :class:`MergedSource` s — a chain of merges
   needs no intermediate file); inputs in the other naming (LDM vs diffusers) are converted to the
   first input's naming through :func:`sdadapt.formats.model_keys.key_plan`;
2. plan: for every key of the first input decide ``merge`` / ``copy`` / ``reset`` / ``drop`` by the
   :class:`~sdadapt.merge.recipe.KeyPolicy` (and the keys only other inputs have), check shapes
   (dim-1 channel mismatch of inpainting / instruct-pix2pix models merges the shared channels),
   refuse different architectures naming the keys — all before a byte is written;
3. stream: for each output key, in the output file's order, read the inputs' tensors, apply the
   operator (per-key seeded generator for random ones) in ``compute_dtype`` on ``device``, cast
   once to the output dtype, write. Two-pass operators (supermerger's cosine modes: an
   :class:`~sdadapt.merge.operators.PrePass`) first read every merged key once, keep a small
   statistic per key and aggregate them; that runs before the first key is merged, one key in
   memory at a time. Per-key strengths come from ``alpha``, then block weights, then elemental
   rules (:mod:`.elemental`), per-key beta from ``block_beta``; ``weights_clip`` clamps the result to
   the range of A and B; supermerger's Adjust (:mod:`.adjust`) rescales six UNet keys last.
   Include/exclude rules (``KeyPolicy.include`` / ``exclude``) copy the keys they leave out from A.

Everything decided is in the :class:`MergeReport`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..checks import cast_checked, check_device, check_result, has_nonfinite
from ..errors import InputError, MergeError, NonFiniteError
from ..formats.files import WeightFileError, check_output_file, read_safetensors_header, sniff_format
from ..patterns import compile_pattern
from ..formats.model_keys import DIFFUSERS_COMPONENTS, LDM_PARTS
from ..formats.unclip import EMBEDDER_PREFIX, NOISE_AUGMENTOR_PREFIX
from .blocks import block_alpha_fn, key_block, parse_block_weights
from .model_metadata import inherited_metadata
from .sdxl_layers import SDXL_LAYERS
from .elemental import elemental_ratio, parse_elemental
from .operators import ENGINE_OPTIONS, MAX_MERGE_STRENGTH, Operator, get_operator, key_generator
from .recipe import DTYPES, RECIPE_KEY, MergeStep, a1111_metadata, leaf_paths, recipe_to_json
from .sources import legacy_hash, open_source, sha256_of
from .writer import _DISK_MARGIN, planned_size, safetensors_layout, write_streaming

__all__ = [
    "MergeError",
    "MergeReport",
    "MergedSource",
    "DictSource",
    "key_component",
    "resolve_seeds",
    "merge_file",
    "merge_state_dicts",
    "iter_merged",
    "write_source",
]


def _not_models(sources: Sequence[Source], names: list[str]) -> str:
    """What the inputs that are no models are and what takes them ("" when every input looks like one)."""
    from ..formats.detect import ADAPTER_KINDS, detect_kind

    said = []
    for source, name in zip(sources, names):
        kind = detect_kind(list(source.keys()), {})
        if kind in ADAPTER_KINDS:
            said.append(f"{name} is a {kind} file, an adapter: bake it into a checkpoint with "
                        f"`python -m sdadapt merge-lora CHECKPOINT {name} -o OUT`, then merge that")
        elif kind in ("embedding", "aesthetic-embedding", "hypernetwork", "custom-diffusion"):
            said.append(f"{name} is a {kind} file, not a model (`python -m sdadapt inspect {name}` says what takes it)")
    return "; ".join(said)


class Source(Protocol):
    """What the engine reads: the :class:`~sdadapt.merge.sources.TensorSource` API."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> Tensor: ...
    def close(self) -> None: ...


@dataclass
class MergeReport:
    """What the engine did with every key that was not simply merged.

    Attributes:
        merged: keys computed by the operator.
        copied: ``key -> reason`` for keys taken unchanged (dtype aside) from one input.
        dropped: ``key -> reason`` for keys left out of the output.
        channel_merged: keys merged on their shared dim-1 channels only (inpainting/ip2p ``conv_in``).
        reset: ``position_ids`` keys rewritten as ``arange``.
        broken_position_ids: ``position_ids`` keys of the first input that were not ``0..n-1``.
        unmatched_blocks: keys that got the BASE block weight because no block fits them.
        notes: one line per decision worth knowing (conversions, architecture, seeds).
        flags: ``is_inpainting`` / ``is_instruct_pix2pix``.
    """

    merged: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    channel_merged: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    broken_position_ids: list[str] = field(default_factory=list)
    unmatched_blocks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines: counts, and reasons grouped with example keys."""
        lines = [f"merged {len(self.merged)} tensors, copied {len(self.copied)}, dropped {len(self.dropped)}"]
        for label, table in (("copied", self.copied), ("dropped", self.dropped)):
            groups: dict[str, list[str]] = {}
            for key, reason in table.items():
                groups.setdefault(reason, []).append(key)
            for reason, keys in groups.items():
                lines.append(f"  {label} {len(keys)} ({reason}), e.g. {keys[0]}")
        if self.channel_merged:
            lines.append(f"  merged only the shared input channels of {', '.join(self.channel_merged)}")
        if self.broken_position_ids:
            lines.append(f"  position_ids not 0..n-1 in the first input: {', '.join(self.broken_position_ids)}"
                         + ("" if self.reset else " (use reset_position_ids / --reset-position-ids to fix)"))
        if self.reset:
            lines.append(f"  reset {', '.join(self.reset)} to 0..n-1")
        if self.unmatched_blocks:
            lines.append(f"  {len(self.unmatched_blocks)} keys outside the UNet blocks got BASE's weight, "
                         f"e.g. {self.unmatched_blocks[0]}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class DictSource:
    """An in-memory state dict with the :class:`~sdadapt.merge.sources.TensorSource` API."""

    def __init__(self, tensors: Mapping[str, Tensor], *, name: str = "<memory>", metadata: Mapping[str, str] | None = None):
        self.path = Path(name)
        self.metadata = dict(metadata or {})
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach().to("cpu").clone()

    def close(self) -> None:
        pass


class _ConvertedSource:
    """A source seen in another naming through a key plan (targets materialised on demand)."""

    def __init__(self, source: Source, plan: Mapping[str, Any]):
        self.path = source.path
        self.metadata = source.metadata
        self._source = source
        self._plan = dict(plan)

    def keys(self) -> list[str]:
        return list(self._plan)

    def __contains__(self, key: object) -> bool:
        return key in self._plan

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._plan[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._source.dtype(self._plan[key].keys[0])

    def get(self, key: str) -> Tensor:
        from ..formats.model_keys import apply_plan

        ((_, tensor),) = apply_plan({key: self._plan[key]}, self._source.get)
        return tensor.contiguous()

    def close(self) -> None:
        self._source.close()


#: key prefix -> component: the key map's LDM parts, EMA copies, then the diffusers components. SD 2.1 unCLIP's
#: whole LDM embedder (``embedder.model.``: the vision tower and the unused text-tower leftovers) is its
#: image_encoder, merged as A1111 merges every key named ``*model*`` (modules/extras.py ``run_modelmerger``)
_COMPONENT_PREFIXES = (
    *((prefix, component) for prefix, (component, _) in LDM_PARTS.items()),
    (EMBEDDER_PREFIX, "image_encoder"),
    ("model_ema.", "ema"),
    *((f"{component}.", component) for component in DIFFUSERS_COMPONENTS),
)


#: why the unCLIP noise augmentor's buffers are A's (A1111 merges only keys with "model" in the name)
_AUGMENTOR_REASON = ("the unCLIP noise augmentor's fixed schedule buffers: kept A's (A1111 merges only keys named "
                     "'*model*')")


def key_component(key: str) -> str:
    """``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``, ``"vae"``, ``"image_encoder"`` (SD 2.1 unCLIP's
    ``embedder.model.*``), ``"ema"`` or ``"other"`` (LDM or diffusers keys)."""
    for prefix, component in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return "other"


def resolve_seeds(step: MergeStep) -> MergeStep:
    """``step`` with a fresh random seed for every random operator whose seed is ``None`` (recursively)."""
    inputs = tuple(resolve_seeds(i) if isinstance(i, MergeStep) else i for i in step.inputs)
    seed = step.seed
    if seed is None and get_operator(step.operator).random:
        seed = secrets.randbits(31)
    return replace(step, inputs=inputs, seed=seed)


@dataclass(frozen=True)
class _Action:
    kind: str  # "merge" | "copy" | "reset"
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: int = 0  # copy: which input
    inputs: tuple[int, ...] = ()  # merge: the inputs taking part, first one = the first input
    channels: int | None = None  # merge only [:, :channels]
    strength: float | None = None  # per-key alpha (two-model ops) or lam factor (task vectors)
    beta: float | None = None  # per-key beta (block_beta)
    adjust: Any = None  # supermerger's Adjust: a multiplier, or the out.2 bias offset (.adjust)


def _naming(source: Source) -> str | None:
    from ..formats.model_keys import KeyMapError, checkpoint_naming

    try:
        return checkpoint_naming(source.keys())
    except KeyMapError:
        return None


def _architecture(source: Source) -> str | None:
    from ..formats.model_keys import KeyMapError, checkpoint_architecture

    try:
        return checkpoint_architecture({k: source.shape(k) for k in source.keys()})
    except KeyMapError:
        return None


def _ldm_shapes(source) -> dict[str, tuple[int, ...]]:
    """``{LDM key: shape}`` of an input as it was given (a converted input's own keys): a diffusers-named one through
    the key map (:func:`sdadapt.formats.model_keys.key_plan` to LDM), so one detector
    (:func:`sdadapt.formats.unclip.unclip_variant`, LDM names) judges every input whatever its naming."""
    raw = source._source if isinstance(source, _ConvertedSource) else source
    shapes = {k: tuple(raw.shape(k)) for k in raw.keys()}
    if _naming(raw) != "diffusers":
        return shapes
    from ..formats.model_keys import KeyMapError, key_plan

    try:
        plan, _ = key_plan(shapes, to="ldm", architecture=_architecture(raw))
    except KeyMapError:
        return shapes
    return {target: tuple(recipe.shape) for target, recipe in plan.items()}


def _is_position_ids(key: str) -> bool:
    return key.endswith("position_ids")


class MergedSource:
    """The result of a :class:`MergeStep` as a lazy source: ``keys()``, ``shape``, ``dtype``, ``get``.

    ``get(key)`` computes that key's merged tensor (reading only that key from the inputs). Use it
    directly, feed it to another step (chains), or write it with :func:`merge_file`.

    Args:
        step: the recipe step.
        sources: already-open sources for ``step.inputs`` (instead of opening the paths); the
            caller keeps ownership.
        device: where the operators compute (``"cuda"`` to use a GPU per tensor).
        intermediate: this step feeds another: merged floats stay float32 when ``step.dtype`` is None.
        allow_nonfinite: let NaN/inf that an *input* already holds pass through (``get`` otherwise
            refuses them); NaN/inf the merge itself produces is always refused.

    Raises:
        MergeError / WeightFileError: see :func:`merge_file`.
        InputError: a device this torch cannot use, an invalid ``discard`` pattern, bad options.
    """

    def __init__(
        self,
        step: MergeStep,
        *,
        sources: Sequence[Source] | None = None,
        device: str | torch.device = "cpu",
        intermediate: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        self.step = step
        self.path = Path(f"<merge {step.operator}>")
        self.metadata: dict[str, str] = {}
        self.device = check_device(device)
        self.allow_nonfinite = allow_nonfinite
        self.report = MergeReport()
        self.operator: Operator = get_operator(step.operator)
        self._own: list[Source] = []
        self._prepassed: dict[str, Any] | None = None
        self._statistics: dict[str, Any] = {}  # PrePass.per_key: key -> its statistic (CPU) until it is merged
        self._check_arity()
        self._options = self._validated_options()
        if self.operator.random and step.seed is None:
            raise ValueError(f"{step.operator}: a random operator needs a seed (use resolve_seeds to pick and record one)")
        if sources is None:
            opened: list[Source] = []
            try:
                for item in step.inputs:
                    if isinstance(item, MergeStep):
                        opened.append(MergedSource(item, device=device, intermediate=True,
                                                   allow_nonfinite=allow_nonfinite))
                    else:
                        opened.append(open_source(item))
            except BaseException:
                for source in opened:
                    source.close()
                raise
            self._own = opened
            sources = opened
        elif len(sources) != len(step.inputs):
            raise ValueError(f"{len(sources)} sources for {len(step.inputs)} inputs")
        try:
            self._sources: list[Source] = self._align_naming(list(sources))
            self._actions = self._plan(intermediate)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- planning

    def _check_arity(self) -> None:
        n, op = len(self.step.inputs), self.operator
        want = {"a": "1 input (A)", "ab": "2 inputs (A, B)", "abc": "3 inputs (A, B, C)"}
        if op.inputs == "a" and n != 1 or op.inputs == "ab" and n != 2 or op.inputs == "abc" and n != 3:
            raise InputError(f"{self.step.operator} takes {want[op.inputs]}, got {n}")
        if op.inputs == "base+models" and n < 1 + op.min_models:
            raise InputError(f"{self.step.operator} takes a base and at least {op.min_models} model(s), got {n} input(s)")
        if op.inputs in ("a", "ab", "abc") and self.step.alpha is None and self.step.block_weights is None:
            raise InputError(f"{self.step.operator} needs alpha (or block_weights)")
        per_key = [name for name, value in (("block_weights", self.step.block_weights),
                                            ("elemental rules (--elemental)", self.step.elemental)) if value is not None]
        if per_key and op.inputs == "base+models" and "lam" not in op.option_names:
            raise InputError(f"{self.step.operator} has no strength (alpha or lam) to set per key, so "
                             f"{' and '.join(per_key)} cannot apply; leave them out or use task-arithmetic/ties/dare")
        if self.step.weights is not None and op.inputs != "base+models":
            raise InputError(f"{self.step.operator} takes alpha, not per-model weights")
        if self.step.weights is not None and len(self.step.weights) != n - 1:
            raise InputError(f"{self.step.operator}: {len(self.step.weights)} weights for {n - 1} models (one per model after the base)")

    def _validated_options(self) -> dict[str, Any]:
        """The step's keyword options checked against the operator's declaration (typed copies)."""
        from .operators import check_options

        step = self.step
        return check_options(step.operator, step.options, alpha=step.alpha, weights=step.weights, seed=step.seed)

    def _align_naming(self, sources: list[Source]) -> list[Source]:
        first = _naming(sources[0])
        if first is None:
            return sources
        out = [sources[0]]
        for index, source in enumerate(sources[1:], start=1):
            naming = _naming(source)
            if naming is None or naming == first:
                out.append(source)
                continue
            from ..formats.model_keys import key_plan

            plan, report = key_plan(
                {k: source.shape(k) for k in source.keys()}, to=first, architecture=_architecture(sources[0])
            )
            self.report.notes.append(
                f"input {index + 1} ({source.path.name}) is in {naming} naming; converted to {first} "
                f"({len(plan)} keys, {len(report.dropped)} dropped, {len(report.unmatched)} unknown)"
            )
            out.append(_ConvertedSource(source, plan))
        return out

    def _plan(self, intermediate: bool) -> dict[str, _Action]:
        step, policy, report = self.step, self.step.policy, self.report
        sources = self._sources
        primary = sources[0]
        names = [s.path.name for s in sources]
        first_keys = primary.keys()
        first_set = set(first_keys)
        out_dtype = DTYPES[step.dtype] if step.dtype is not None else None
        discard = compile_pattern(policy.discard, what="discard (--discard)") if policy.discard else None

        archs = [_architecture(s) for s in sources]
        known = {a for a in archs if a is not None}
        if len(known) > 1:
            listing = ", ".join(f"{n}: {a}" for n, a in zip(names, archs) if a)
            raise MergeError(f"the inputs are different architectures ({listing}); merge models of one family")
        architecture = archs[0] or next(iter(known), None)
        if architecture == "sdxl":
            from ..formats.model_keys import is_sdxl_refiner

            refiners = [n for n, s in zip(names, sources) if is_sdxl_refiner(s.keys())]
            if refiners and len(refiners) < len(sources):  # (both "sdxl"; the UNets differ in every block's width)
                bases = [n for n in names if n not in refiners]
                raise MergeError(f"{refiners[0]} is an SDXL refiner and {bases[0]} an SDXL base model: their UNets and "
                                 "text encoders differ in shape; merge refiners with refiners, base models with base models")
            from ..formats.edm import has_edm_stats

            edm = [n for n, s in zip(names, sources) if has_edm_stats(s.keys())]
            if edm and len(edm) < len(sources):  # (same shapes: nothing else would stop it)
                plain = [n for n in names if n not in edm]
                raise MergeError(
                    f"{edm[0]} is an EDM model (Playground v2.5: edm_mean / edm_std) and {plain[0]} a plain SDXL one: "
                    "their UNets predict in different formulations (EDM's c_in/c_out-preconditioned σ-space vs. the "
                    "discrete DDPM ε schedule) and read different VAE latent scalings, so a weight average is neither "
                    "model; merge EDM models with EDM models only")
            if refiners and (step.block_weights is not None or step.block_beta is not None or step.elemental is not None):
                # (supermerger reads the refiner as an SD1 UNet: its isxl needs conditioner.embedders.1)
                raise InputError(
                    f"{refiners[0]}: the SDXL refiner has no block-weight layout here (its UNet has SD1's 12 input and "
                    "12 output blocks, SDXL's presets name 9; supermerger reads it as SD1); merge it with one alpha "
                    "(leave out the per-block weights, beta and elemental rules)")
        if architecture == "sd2":
            self._check_unclip(names)
        alpha_fn: Callable[[str], tuple[float, str | None]] | None = None
        if step.block_weights is not None:
            if architecture is None:
                raise MergeError(
                    f"{names[0]}: cannot tell SD1/SD2/SDXL from its keys, so block weights cannot be placed; "
                    "block weights need a full LDM or diffusers checkpoint"
                )
            naming = _naming(primary) or "ldm"
            try:
                weights = parse_block_weights(step.block_weights, architecture=architecture, base_alpha=step.base_alpha)
            except ValueError as exc:  # (which setting: the message of the shared parser does not know)
                flags = ("per-block --lam" if "lam" in self.operator.option_names
                         else "per-block --alpha, block-weighted --weights")
                raise InputError(f"{names[0]}: block_weights ({flags}): {exc}") from None
            alpha_fn = block_alpha_fn(weights, architecture=architecture, naming=naming)
            report.notes.append(f"block weights for {architecture} on {naming} keys")
        beta_fn: Callable[[str], tuple[float, str | None]] | None = None
        if step.block_beta is not None:
            if architecture is None:
                raise MergeError(
                    f"{names[0]}: cannot tell SD1/SD2/SDXL from its keys, so per-block beta cannot be placed; "
                    "it needs a full LDM or diffusers checkpoint"
                )
            try:
                betas = parse_block_weights(step.block_beta, architecture=architecture,
                                            base_alpha=step.options.get("beta"))
            except ValueError as exc:
                raise InputError(f"{names[0]}: block_beta (per-block --beta): {exc}") from None
            beta_fn = block_alpha_fn(betas, architecture=architecture, naming=_naming(primary) or "ldm")
            report.notes.append(f"per-block beta for {architecture}")
        rules = None
        if step.elemental is not None:
            if architecture is None:
                raise MergeError(
                    f"{names[0]}: cannot tell SD1/SD2/SDXL from its keys, so elemental rules cannot be placed; "
                    "they need a full LDM or diffusers checkpoint"
                )
            rules = parse_elemental(step.elemental, architecture=architecture, limit=MAX_MERGE_STRENGTH)
            key_naming = _naming(primary) or "ldm"
            if architecture == "sdxl" and any(v is not None and len(v) == len(SDXL_LAYERS)
                                              for v in (step.block_weights, step.block_beta)):
                raise InputError(f"{names[0]}: elemental rules name blocks (IN04, OUT01, ...), and with "
                                 f"{len(SDXL_LAYERS)} per-layer values supermerger matches them against its layer "
                                 "names instead (IN410, ...), so the two do not mix here; give 20 values, or leave "
                                 "--elemental out")
        selected = self._selection(architecture, names)
        elemental_keys = 0
        skip = self.operator.skip or (self.operator.prepass.skip if self.operator.prepass is not None else None)
        if self.operator.skip is not None and _naming(primary) == "diffusers":
            skip = self._by_ldm_name(self.operator.skip, architecture)

        self._declared: dict[str, torch.dtype] = {}  # the dtype each key would have in a file

        def float_dtype(dtype: torch.dtype, merged: bool) -> torch.dtype:
            if not dtype.is_floating_point:
                return dtype
            if out_dtype is not None:
                return out_dtype
            return torch.float32 if (intermediate and merged) else dtype

        actions: dict[str, _Action] = {}
        mismatched: list[str] = []
        wide_first: list[str] = []
        declared = getattr(primary, "declared_dtype", primary.dtype)
        for key in first_keys:
            component = key_component(key)
            dtype, shape = declared(key), primary.shape(key)
            self._declared[key] = out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype
            if discard is not None and discard.search(key):
                report.dropped[key] = "matches discard pattern"
                continue
            if component == "ema" and policy.ema == "prune":
                report.dropped[key] = "EMA pruned"
                continue
            if _is_position_ids(key):
                value = primary.get(key)
                expected = torch.arange(shape[-1]).expand(shape) if shape else None
                if expected is not None and not torch.equal(value.to(torch.float64), expected.to(torch.float64)):
                    report.broken_position_ids.append(key)
                if policy.reset_position_ids:
                    actions[key] = _Action("reset", torch.int64, shape)
                    report.reset.append(key)
                else:
                    actions[key] = _Action("copy", dtype, shape)
                    report.copied[key] = "position ids are never interpolated"
                continue
            if not dtype.is_floating_point:
                actions[key] = _Action("copy", dtype, shape)
                report.copied[key] = "integer/bool tensor, never interpolated"
                continue
            # (the EMA copy besides the chosen components: ema="merge" merges both, as A1111's 'model' in key)
            wanted = policy.ema == "merge" if component == "ema" else component in policy.components
            if not wanted:
                actions[key] = _Action("copy", float_dtype(dtype, False), shape)
                report.copied[key] = (_AUGMENTOR_REASON if key.startswith(NOISE_AUGMENTOR_PREFIX)
                                      else f"{component} not merged by the policy")
                continue
            left_out = selected(key) if selected is not None else None
            if left_out is not None:
                actions[key] = _Action("copy", float_dtype(dtype, False), shape)
                report.copied[key] = left_out
                continue
            taking, channels, lacking = [0], None, []
            for index, source in enumerate(sources[1:], start=1):
                if key not in source:
                    lacking.append(index)
                    continue
                other = tuple(source.shape(key))
                if other == shape:
                    taking.append(index)
                elif len(other) == len(shape) >= 2 and other[0] == shape[0] and other[2:] == shape[2:]:
                    if other[1] > shape[1]:
                        wide_first.append(f"{key}: {names[0]} {shape}, {names[index]} {other}")
                    elif policy.channel_mismatch == "error":
                        mismatched.append(f"{key}: {names[0]} {shape} vs {names[index]} {other}")
                    else:
                        taking.append(index)
                        channels = min(channels or shape[1], other[1])
                else:
                    mismatched.append(f"{key}: {names[0]} {shape} vs {names[index]} {other}")
            kind = self.operator.inputs
            if kind in ("ab", "abc") and lacking:
                actions[key] = _Action("copy", float_dtype(dtype, False), shape)
                report.copied[key] = f"missing in {', '.join(names[i] for i in lacking)}: kept {names[0]}"
                continue
            if kind == "base+models" and len(taking) - 1 < self.operator.min_models:
                actions[key] = _Action("copy", float_dtype(dtype, False), shape)
                report.copied[key] = "too few models have it: kept the base"
                continue
            reason = skip(key) if skip is not None else None
            if reason is not None:
                actions[key] = _Action("copy", float_dtype(dtype, False), shape)
                report.copied[key] = reason
                continue
            strength = None
            if alpha_fn is not None:
                strength, block = alpha_fn(key)
                if block is None:
                    report.unmatched_blocks.append(key)
            if rules is not None:
                if alpha_fn is None:
                    block = key_block(key, architecture=architecture, naming=key_naming)
                before = strength if strength is not None else (step.alpha if kind in ("a", "ab", "abc") else 1.0)
                strength = elemental_ratio(rules, key, block, float(before))  # type: ignore[arg-type]
                elemental_keys += strength != before
            if strength is not None and "alpha" in self.operator.option_names:  # e.g. extract's alpha in [0, 1]: refused before writing
                self.operator.option("alpha").check(f"{step.operator} (block weights / elemental rules, {key})", strength)
            beta = beta_fn(key)[0] if beta_fn is not None else None
            if beta is not None:
                self.operator.option("beta").check(f"{step.operator} (per-block beta, {key})", beta)
            if channels is not None:
                report.channel_merged.append(key)
                if key.endswith("input_blocks.0.0.weight") or key.endswith("conv_in.weight"):
                    report.flags["is_inpainting"] = shape[1] == 9
                    report.flags["is_instruct_pix2pix"] = shape[1] == 8
            actions[key] = _Action("merge", float_dtype(dtype, True), shape, inputs=tuple(taking),
                                   channels=channels, strength=strength, beta=beta)
            report.merged.append(key)
        if wide_first:
            raise MergeError(
                "the first input must be the model with more input channels (inpainting / instruct-pix2pix "
                f"first, as in A1111): {'; '.join(wide_first[:5])}"
            )
        if mismatched:
            raise MergeError(
                f"{len(mismatched)} tensor(s) differ in shape, so the inputs are not the same architecture: "
                f"{'; '.join(mismatched[:10])}{' ...' if len(mismatched) > 10 else ''}"
            )
        others: dict[str, int] = {}
        for index, source in enumerate(sources[1:], start=1):
            for key in source.keys():
                if key not in first_set and key not in others:
                    others[key] = index
        self._plan_markers(actions, others, names, float_dtype)
        for key, index in others.items():
            if discard is not None and discard.search(key):
                continue
            if key_component(key) == "ema" and policy.ema == "prune":
                continue
            if policy.only_in_others == "copy":
                dtype = sources[index].dtype(key)
                actions[key] = _Action("copy", float_dtype(dtype, False), sources[index].shape(key), source=index)
                report.copied[key] = f"only in {names[index]}: copied"
            else:
                report.dropped[key] = f"not in {names[0]} (only_in_others='drop')"
        if not report.merged:
            raise self._nothing_merged(sources, names, first_set)
        if step.adjust is not None and any(step.adjust):
            self._plan_adjust(actions, architecture, names)
        if rules is not None:
            report.notes.append(f"elemental rules changed the strength of {elemental_keys} of {len(report.merged)} "
                                f"merged keys ({architecture} blocks)")
        return actions

    def _plan_markers(self, actions: dict[str, _Action], others: dict[str, int], names: list[str],
                      float_dtype: Callable[[torch.dtype, bool], torch.dtype]) -> None:
        """The single-file markers ``v_pred`` / ``ztsnr`` and ComfyUI's EDM v-prediction σ range ``edm_vpred.*``
        (CosXL; :mod:`sdadapt.formats.prediction_markers`) as the merge's model metadata (:mod:`.model_metadata`): the
        first input's, a disagreement noted (the σ range copied from the first input where every input has one, not
        averaged); a marker the first input lacks while every other input has it is copied (and taken out of
        ``others``), with a note — as for ModelSpec's prediction type, a v model is not silently turned into ε."""
        from ..formats.prediction_markers import EDM_V_KEYS, V_PRED_KEY, ZTSNR_KEY

        sources, report = self._sources, self.report
        for marker in (V_PRED_KEY, ZTSNR_KEY, *EDM_V_KEYS):
            having = [index for index, source in enumerate(sources) if marker in source]
            if marker in EDM_V_KEYS and having and len(having) == len(sources):  # (one model's range, the first's)
                source = sources[0]
                actions[marker] = _Action("copy", float_dtype(source.dtype(marker), False), source.shape(marker), source=0)
                report.copied[marker] = f"{names[0]}'s (a σ range, not averaged)"
                if marker in report.merged:
                    report.merged.remove(marker)
                continue
            if not having or len(having) == len(sources):
                continue
            if having == list(range(1, len(sources))):
                source = sources[having[0]]
                actions[marker] = _Action("copy", float_dtype(source.dtype(marker), False), source.shape(marker),
                                          source=having[0])
                report.copied[marker] = f"only in {', '.join(names[i] for i in having)}: every other input has it"
                others.pop(marker, None)
                report.notes.append(f"{marker}: {names[0]} has none; every other input has it, so the merge has it too")
                continue
            lacking = [names[i] for i in range(len(sources)) if i not in having]
            kept = 0 in having or self.step.policy.only_in_others == "copy"  # (--copy-extra-keys: copied with others)
            report.notes.append(f"{marker}: {', '.join(names[i] for i in having)} {'has' if len(having) == 1 else 'have'} "
                                f"it, {', '.join(lacking)} not; the merge {'has' if kept else 'lacks'} it"
                                + ("" if kept and 0 not in having else f", as {names[0]}")
                                + ": check that the inputs predict alike"
                                + (" (CosXL's EDM v-prediction: an add-difference of a CosXL model onto another keeps "
                                   "its σ range with --copy-extra-keys)" if marker in EDM_V_KEYS and not kept else ""))

    def _check_unclip(self, names: list[str]) -> None:
        """SD 2.1 unCLIP inputs (:func:`sdadapt.formats.unclip.unclip_variant`): H and L are refused together;
        unCLIP with plain SD2 merges as A1111's merger merges it (every shared key; A's keys that B lacks kept,
        B's that A lacks dropped unless ``only_in_others="copy"``), with a note saying what the result is."""
        from ..formats.unclip import unclip_variant

        variants = [unclip_variant(_ldm_shapes(s)) for s in self._sources]  # (whatever each input's naming)
        found = {v for v in variants if v is not None}
        if not found:
            return
        ldm = _naming(self._sources[0]) != "diffusers"
        parts = ("label_emb, embedder.model.*, noise_augmentor.*" if ldm
                 else "unet.class_embedding.*, image_encoder.*")
        if len(found) > 1:
            h, l = variants.index("h"), variants.index("l")
            raise MergeError(
                f"{names[h]} is an SD 2.1 unCLIP-H model (OpenCLIP ViT-H-14 image embedder, 1024-wide image "
                f"embeddings) and {names[l]} an unCLIP-L one (OpenAI ViT-L/14, 768-wide): their embedders and the "
                "UNets' label_emb differ in shape and in what the embedding means (A1111's merger stops at the first "
                "tensor whose sizes differ); merge unCLIP-H files with unCLIP-H files, L with L")
        variant = next(iter(found)).upper()
        plain = [n for n, v in zip(names, variants) if v is None]
        if not plain:
            self.report.notes.append(
                f"SD 2.1 unCLIP-{variant} inputs: the image embedder ({'embedder.model.*' if ldm else 'image_encoder.*'}) "
                "is merged with the UNet, text encoder and VAE; "
                + ("the noise augmentor's schedule is A's" if ldm else
                   "diffusers naming holds no noise augmentor (a folder's image_noising_scheduler/ config)"))
        elif variants[0] is not None:
            self.report.notes.append(
                f"{names[0]} is SD 2.1 unCLIP-{variant} and {', '.join(plain)} plain SD2: the shared UNet, text encoder "
                f"and VAE tensors are merged and {names[0]}'s unCLIP parts ({parts}) kept, as "
                "A1111's merger does — the result is an unCLIP model (add-difference UNCLIP FINETUNE SD21 gives a "
                "fine-tune's unCLIP variant)")
        elif self.step.policy.only_in_others == "copy":
            self.report.notes.append(
                f"{names[0]} is plain SD2 and {', '.join(n for n, v in zip(names, variants) if v)} SD 2.1 "
                f"unCLIP-{variant}: the unCLIP parts ({parts}) are copied from "
                "it (--copy-extra-keys), so the result is an unCLIP model")
        else:
            self.report.notes.append(
                f"{names[0]} is plain SD2 and {', '.join(n for n, v in zip(names, variants) if v)} SD 2.1 "
                f"unCLIP-{variant}: its unCLIP parts ({parts}) are dropped, as "
                "A1111's merger drops keys the first model lacks — the result is a plain SD2 model; put the unCLIP "
                "file first (or --copy-extra-keys) to keep its image conditioning")

    def _by_ldm_name(self, skip: Callable[[str], str | None], architecture: str | None) -> Callable[[str], str | None]:
        """``skip`` judged on each diffusers key's LDM name: supermerger matches its key substrings
        (``self``'s ``norm``) on LDM names, and diffusers names say ``norm`` where LDM's do not
        (``resnets.0.norm1`` is ``in_layers.0``, ``conv_norm_out`` is ``out.0``)."""
        from ..formats.model_keys import key_plan

        primary = self._sources[0]
        plan, _ = key_plan({k: primary.shape(k) for k in primary.keys()}, to="ldm", architecture=architecture)
        ldm_name = {source: target for target, recipe in plan.items() for source in recipe.keys}

        def by_ldm_name(key: str) -> str | None:
            reason = skip(ldm_name.get(key, key))
            return None if reason is None else f"{reason}; LDM name {ldm_name.get(key, key)}"

        return by_ldm_name

    def _selection(self, architecture: str | None, names: list[str]) -> Callable[[str], str | None] | None:
        """supermerger's Include/Exclude (``policy.include`` / ``policy.exclude``): ``key -> why it is
        not merged`` (``None``: merged), or ``None`` when neither is set."""
        from .elemental import parse_selection

        policy = self.step.policy
        if policy.exclude is None and policy.include is None:
            return None
        if architecture is None:
            raise MergeError(f"{names[0]}: cannot tell SD1/SD2/SDXL from its keys, so include/exclude rules cannot be "
                             "placed; they need a full LDM or diffusers checkpoint")
        exclude = parse_selection(policy.exclude, architecture=architecture) if policy.exclude else ()
        include = parse_selection(policy.include, architecture=architecture) if policy.include else None
        naming = _naming(self._sources[0]) or "ldm"

        def left_out(key: str) -> str | None:
            block = key_block(key, architecture=architecture, naming=naming)
            if include is not None and not any(rule.matches(key, block) for rule in include):
                return "not in the include rules: kept the first input"
            if any(rule.matches(key, block) for rule in exclude):
                return "excluded: kept the first input"
            return None

        return left_out

    def _plan_adjust(self, actions: dict[str, _Action], architecture: str | None, names: list[str]) -> None:
        """Attach supermerger's Adjust changes to the six UNet keys it touches (all must be merged)."""
        from .adjust import ADJUST_KEYS, adjust_factors

        step, report = self.step, self.report
        naming = _naming(self._sources[0])
        if architecture is None or naming is None:
            raise MergeError(f"{names[0]}: cannot tell SD1/SD2/SDXL from its keys, so --adjust (supermerger's Adjust: "
                             "conv_in / out.0 / out.2 of the UNet) cannot be placed; it needs a full checkpoint")
        keys = ADJUST_KEYS[naming]
        problems = []
        for key in keys:
            action = actions.get(key)
            if action is None or action.kind != "merge":
                reason = report.copied.get(key) or report.dropped.get(key) or f"not in {names[0]}"
                problems.append(f"{key} ({reason})")
        if problems:
            raise MergeError(f"--adjust changes the UNet's first and last layers after the merge, but {len(problems)} "
                             f"of its {len(keys)} keys are not merged: {'; '.join(problems)}. Leave --adjust out, or "
                             "merge the unet (--components, --discard) of full checkpoints")
        if tuple(actions[keys[-1]].shape) != (4,):
            raise MergeError(f"--adjust: {keys[-1]} has shape {actions[keys[-1]].shape}; supermerger's colour offset "
                             "needs the 4 latent channels of SD1/SD2/SDXL")
        for key, change in zip(keys, adjust_factors(step.adjust, architecture=architecture)):  # type: ignore[arg-type]
            actions[key] = replace(actions[key], adjust=change)
        report.notes.append(f"adjust {','.join(f'{v:g}' for v in step.adjust)} (supermerger) on {len(keys)} "  # type: ignore[union-attr]
                            f"{architecture} keys")

    def _nothing_merged(self, sources: Sequence[Source], names: list[str], first_set: set[str]) -> MergeError:
        """The error for a plan that merges no tensor (unrelated files, an empty input, a policy
        that excludes everything)."""
        if not first_set:
            return MergeError(f"{names[0]}: holds no tensors; nothing to merge")
        empty = [names[i] for i, s in enumerate(sources) if not s.keys()]
        if empty:
            return MergeError(f"{', '.join(empty)}: hold(s) no tensors; nothing to merge")
        if len(sources) == 1:
            return MergeError(f"nothing to merge: {names[0]} has no floating-point weight of the merged components "
                              f"({', '.join(self.step.policy.components)}) that {self.step.operator} changes; check "
                              "--components, --discard and the input file")
        shared = [i for i, s in enumerate(sources[1:], start=1) if any(k in first_set for k in s.keys())]
        if len(shared) < len(sources) - 1:
            strangers = [names[i] for i in range(1, len(sources)) if i not in shared]
            return MergeError(
                f"{names[0]} and {', '.join(strangers)} share no weights (no tensor name in common): they are not "
                f"the same kind of model, so there is nothing to merge; {_not_models(sources, names) or 'check the input files'}"
            )
        common = first_set.intersection(*(s.keys() for s in sources[1:]))
        not_sd = ("; none of them is a Stable Diffusion checkpoint's (unet, text encoder, VAE: LDM or diffusers "
                  "names), and merge_file / merge_state_dicts merge checkpoints: a bare model's state_dict() needs its "
                  "component first ({f'unet.{k}': v for k, v in unet.state_dict().items()}); for another model's "
                  "state dict apply an operator per tensor, e.g. {k: sdadapt.merge.weighted_sum([a[k], b[k]], 0.3) "
                  "for k in a}"
                  if common and all(key_component(k) == "other" for k in common) else "")
        return MergeError(
            f"nothing to merge: the inputs share {len(first_set & set(sources[1].keys()))} tensor name(s), but none is "
            f"a floating-point weight of the merged components ({', '.join(self.step.policy.components)}) that every "
            f"input has with the same shape{not_sd}; check --components, --discard and the input files"
        )

    # ---------------------------------------------------------------- source API

    def keys(self) -> list[str]:
        return list(self._actions)

    def __contains__(self, key: object) -> bool:
        return key in self._actions

    def shape(self, key: str) -> tuple[int, ...]:
        return self._actions[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._actions[key].dtype

    def declared_dtype(self, key: str) -> torch.dtype:
        """The dtype ``key`` gets in a file (a nested step hands float32 on, but a chain's output
        with ``dtype=None`` takes the dtype of the first file input, as if the steps were files)."""
        return self._declared.get(key, self._actions[key].dtype)

    def plan(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{key: (dtype, shape)}`` of the output (for :func:`~sdadapt.merge.writer.write_streaming`)."""
        return {k: (a.dtype, a.shape) for k, a in self._actions.items()}

    def get(self, key: str) -> Tensor:
        """Compute ``key``'s output tensor (CPU, output dtype).

        Raises:
            NonFiniteError: the tensor would hold NaN/inf (unless they come from an input and
                ``allow_nonfinite``), or values the output dtype cannot hold.
        """
        action = self._actions[key]
        if action.kind == "copy":
            value = self._sources[action.source].get(key)
            if not self.allow_nonfinite and has_nonfinite(value):
                name = self._sources[action.source].path.name
                raise NonFiniteError(
                    f"tensor {key!r} of {name} holds NaN/inf ({int((~torch.isfinite(value)).sum())} values); it would be "
                    "copied into the output — the input is broken. Pass --allow-nonfinite (allow_nonfinite=True) to "
                    "carry it through unchanged"
                )
            return cast_checked(value, action.dtype, key=key, hint="write float32 (--dtype fp32)")
        if action.kind == "reset":
            n = action.shape[-1]
            return torch.arange(n, dtype=torch.int64).expand(action.shape).contiguous()
        return self._merge(key, action)

    def _read(self, key: str, action: _Action) -> tuple[Tensor, list[Tensor]]:
        """``(the first input's full tensor, the inputs' tensors on the device)`` of a merged key
        (channel-mismatched keys: their shared channels)."""
        tensors = [self._sources[i].get(key) for i in action.inputs]
        first = tensors[0]
        if action.channels is not None:
            c = action.channels
            tensors = [t[:, :c] for t in tensors]
        return first, [t.to(self.device) for t in tensors]

    def _prepass_arguments(self) -> dict[str, Any]:
        """The two-pass operator's aggregated statistics (computed once, one key in memory at a time;
        with ``PrePass.per_key`` each key's statistic is kept, on the CPU, until that key is merged)."""
        if self._prepassed is None:
            prepass = self.operator.prepass
            if prepass is None:
                return {}
            compute = DTYPES[self.step.compute_dtype]
            statistics = []
            for key, action in self._actions.items():
                if action.kind == "merge":
                    _, tensors = self._read(key, action)
                    statistic = _moved(prepass.statistic(tensors, compute_dtype=compute), "cpu")
                    statistics.append(statistic)
                    if prepass.per_key:
                        self._statistics[key] = statistic
                    del tensors
            self._prepassed = dict(prepass.aggregate(statistics))
            summary = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else k for k, v in self._prepassed.items())
            self.report.notes.append(f"{self.step.operator} first pass over {len(statistics)} keys: {summary}")
        return self._prepassed

    def _key_statistic(self, key: str, tensors: list[Tensor], *, needed: bool) -> Any:
        """``key``'s first-pass statistic on the device (``PrePass.per_key``), dropped from memory once
        handed out (``None`` when not ``needed``); computed again when a key is read a second time (a
        nested step's output read by two passes)."""
        prepass = self.operator.prepass
        kept = self._statistics.pop(key, None)
        if not needed:
            return None
        if kept is not None:
            return _moved(kept, self.device)
        return prepass.statistic(tensors, compute_dtype=DTYPES[self.step.compute_dtype])  # type: ignore[union-attr]

    def _merge(self, key: str, action: _Action) -> Tensor:
        step, op = self.step, self.operator
        compute = DTYPES[step.compute_dtype]
        first, tensors = self._read(key, action)
        kwargs: dict[str, Any] = {k: v for k, v in self._options.items() if k not in ENGINE_OPTIONS}
        kwargs["compute_dtype"] = compute
        if op.prepass is not None:
            kwargs.update(self._prepass_arguments())
        if op.random:
            kwargs["generator"] = key_generator(int(step.seed), key)  # type: ignore[arg-type]
        if action.beta is not None:
            kwargs["beta"] = action.beta
        kept = op.keep_first(tensors[:2] if op.inputs == "abc" else tensors) if op.keep_first is not None else None
        if op.prepass is not None and op.prepass.per_key:  # this very key's statistic (by name, never another's)
            statistic = self._key_statistic(key, tensors, needed=kept is None)
            if kept is None:
                kwargs["statistic"] = statistic
        if kept is not None:  # fn is undefined on these values: the first input, reported like a copy
            if key in self.report.merged:
                self.report.merged.remove(key)
            self.report.copied[key] = kept
            result = tensors[0].to(compute, copy=True)
        elif op.inputs in ("a", "ab"):
            result = op.fn(tensors, self._alpha(action), **kwargs)
        elif op.inputs == "abc":
            result = op.fn(tensors[:2], self._alpha(action), base=tensors[2], **kwargs)
        else:
            weights = self._model_weights(action)
            if action.strength is not None:
                kwargs["lam"] = float(kwargs.get("lam", 1.0)) * action.strength
            result = op.fn(tensors[1:], weights, base=tensors[0], **kwargs)
        if self._options.get("weights_clip"):  # sd-meh: clamp to [min(A, B), max(A, B)] elementwise
            low, high = torch.minimum(tensors[0], tensors[1]), torch.maximum(tensors[0], tensors[1])
            result = torch.minimum(torch.maximum(result, low.to(result.dtype)), high.to(result.dtype))
            del low, high
        del tensors  # the inputs go before the result is checked and cast: peak memory stays a few tensors
        result = result.to("cpu")
        if action.channels is not None:
            full = first.to(compute)
            full[:, : action.channels] = result
            result = full
        del first
        if action.adjust is not None:  # supermerger's Adjust, on the whole merged tensor
            from .adjust import adjust_tensor

            result = adjust_tensor(result, action.adjust)
        if has_nonfinite(result):  # rare: read the inputs again to say whether they carried the NaN/inf
            check_result(result, key=key, inputs=[self._sources[i].get(key) for i in action.inputs],
                         allow_nonfinite=self.allow_nonfinite, what=f"the {step.operator} merge",
                         hint=self._strength_hint())
        return cast_checked(result, action.dtype, key=key, hint="write float32 (--dtype fp32) or lower the strength")

    def _strength_hint(self) -> str:
        step = self.step
        parts = [f"alpha {step.alpha:g}" if step.alpha is not None else "",
                 f"weights {list(step.weights)}" if step.weights is not None else "",
                 f"lam {step.options['lam']:g}" if "lam" in step.options else ""]
        given = ", ".join(p for p in parts if p)
        return f"check the strengths ({given})" if given else "check the inputs"

    def _alpha(self, action: _Action) -> float:
        return float(action.strength if action.strength is not None else self.step.alpha)  # type: ignore[arg-type]

    def _model_weights(self, action: _Action) -> list[float] | float:
        if self.step.weights is None:
            return 1.0
        return [self.step.weights[i - 1] for i in action.inputs[1:]]

    def close(self) -> None:
        for source in self._own:
            source.close()
        self._own = []

    def __enter__(self) -> MergedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _moved(value: Any, device: str | torch.device) -> Any:
    """A :class:`~sdadapt.merge.operators.PrePass` statistic (a tensor, or a tuple of tensors and
    ``None`` s) on ``device``."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        items = [_moved(item, device) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    raise TypeError(f"a PrePass statistic must be a tensor or a tuple of tensors, got {type(value).__name__}")


def _output_order(plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    _, offsets = safetensors_layout(plan)
    return sorted(offsets, key=lambda k: offsets[k][0])


def write_source(
    out: str | os.PathLike,
    source: Source,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write every key of ``source`` to ``out``: safetensors, atomic, streaming (one tensor in memory).

    The one writer of merged sources: :func:`merge_file` writes a :class:`MergedSource` with it,
    ``merge-lora`` its baked checkpoint (:class:`sdadapt.loratools.bake.BakedCheckpoint`). The plan
    is ``{key: (source.dtype(key), source.shape(key))}``; ``source.get(key)`` must return exactly
    that, and is called once per key in output-file order (the writer appends; sources read with
    positioned reads, so their own order does not matter).

    Args:
        out: output ``.safetensors`` path.
        source: anything with the :class:`Source` API (``keys``, ``shape``, ``dtype``, ``get``).
        metadata: the file's ``__metadata__`` (default: ``source.metadata``).
        overwrite: replace an existing ``out``.
        progress: ``progress(done, total, key)`` after each written tensor.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``.
        OSError: not enough free disk space for the planned file.
        WeightFileError: a tensor that does not match the plan (no file is left behind).
    """
    plan = {key: (source.dtype(key), tuple(source.shape(key))) for key in source.keys()}
    current: list[str] = []

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for key in _output_order(plan):
            current[:] = [key]
            yield key, source.get(key)

    report = None if progress is None else (lambda done, total: progress(done, total, current[0]))
    return write_streaming(
        out, plan, tensors(), metadata=dict(source.metadata or {}) if metadata is None else metadata,
        overwrite=overwrite, progress=report,
    )


def merge_file(
    step: MergeStep,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    save_recipe: bool = True,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    known_hashes: Mapping[str, str] | None = None,
    verify_hashes: bool = False,
    allow_nonfinite: bool = False,
) -> MergeReport:
    """Run ``step`` and write the result to ``out`` (safetensors, atomic, streaming).

    Order: the output is checked (name, folder, existing file), the inputs opened and the whole
    plan made (architectures, shapes, shared weights), the free disk space checked against the
    planned size — and only then are the inputs hashed (minutes for large files) and the tensors
    merged. Every merged tensor is checked before it is written (NaN/inf, float16 overflow).

    Args:
        step: the recipe (random operators without a seed get a fresh one, recorded in the file).
        out: output ``.safetensors`` path.
        overwrite: replace an existing ``out``. Without it, a file that appears at ``out`` while
            the merge runs is not replaced either (the final move refuses).
        save_recipe: write ``sdadapt_merge_recipe`` + A1111 ``sd_merge_recipe``/``sd_merge_models``
            (hashes every input file: one extra read of each); False writes only ``format``.
        device: where the operators compute.
        progress: ``progress(done, total)`` per written tensor.
        known_hashes: ``{input path: sha256}`` recorded earlier (a replayed recipe); with
            ``verify_hashes`` each file is hashed and must match.
        allow_nonfinite: let NaN/inf already in an input pass through (default: refused, naming
            the tensor); NaN/inf produced by the merge is always refused.

    Returns:
        the :class:`MergeReport`.

    Raises:
        OutputExistsError: ``out`` exists and not ``overwrite`` (checked first, and again at the end).
        OutputError: ``out`` is not named ``*.safetensors`` (the file is safetensors; a ``.ckpt`` name misleads
            A1111 and ComfyUI, which choose their loader by the suffix).
        WeightFileError: a missing, corrupt or unreadable input (named), or an input whose sha256
            differs from the recorded one.
        InputError: ``out`` is one of the inputs; a device this torch cannot use; bad options.
        MergeError: inputs of different architectures / shapes, or sharing no weights.
        DiskSpaceError: not enough free disk space for the planned output.
        NonFiniteError: a merged tensor would hold NaN/inf or overflow the output dtype.
    """
    from ..formats.files import check_input_file

    # (.safetensors only: A1111 and ComfyUI pick the loader by the suffix, and torch.load fails on a .ckpt of
    # safetensors bytes)
    target = check_output_file(out, overwrite=overwrite, suffix=".safetensors")
    device = check_device(device)
    step = resolve_seeds(step)
    leaves = leaf_paths(step)
    for path in leaves:
        check_input_file(path)
        if target.exists() and os.path.samefile(path, target):
            raise InputError(f"{target}: is also an input of the merge; write the output to another file")
    with MergedSource(step, device=device, allow_nonfinite=allow_nonfinite) as merged:
        plan = merged.plan()
        estimate = {"format": "pt", "sdadapt_merge_recipe": "x" * 4096}
        check_output_file(target, overwrite=overwrite, needed_bytes=planned_size(plan, estimate),
                          margin_bytes=_DISK_MARGIN, suffix=".safetensors")
        hashes: dict[str, str] = {}
        if verify_hashes and known_hashes:
            for path, expected in known_hashes.items():
                actual = sha256_of(path)
                if actual != expected:
                    raise WeightFileError(
                        f"{path}: sha256 {actual[:12]}... differs from the recipe's {expected[:12]}...; the input "
                        "changed since the merge was made (pass the original file, or skip the check)"
                    )
                hashes[path] = actual
        metadata = {"format": "pt"}
        input_meta = {path: _file_metadata(path) for path in leaves}
        toy = [input_meta[path] for path in leaves if input_meta[path].get("format") == "sdadapt-toy/1"]
        if len(toy) == len(leaves) and len({meta.get("config") for meta in toy}) == 1:
            metadata = {key: toy[0][key] for key in ("format", "config") if key in toy[0]}  # (the toy's loader reads them)
        # what model it is (modelspec.prediction_type = v above all): the first input's, contradictions reported
        kept, notes = inherited_metadata([(Path(path).name, input_meta[path]) for path in leaves])
        metadata.update(kept)
        merged.report.notes.extend(notes)
        if save_recipe:
            for path in leaves:
                if path not in hashes:
                    hashes[path] = sha256_of(path)
            metadata.update(a1111_metadata(
                step, hashes=hashes, legacy_hashes={p: legacy_hash(p) for p in hashes},
                input_metadata=input_meta, flags=merged.report.flags,
            ))
            metadata[RECIPE_KEY] = recipe_to_json(step, hashes=hashes)
        if step.seed is not None:
            merged.report.notes.append(f"seed {step.seed}")
        write_source(target, merged, metadata=metadata, overwrite=overwrite,
                     progress=None if progress is None else (lambda done, total, key: progress(done, total)))
        return merged.report


def _file_metadata(path: str) -> dict[str, str]:
    if sniff_format(path) != "safetensors":
        return {}
    return dict(read_safetensors_header(path)[1])


def merge_state_dicts(
    step: MergeStep, states: Sequence[Mapping[str, Tensor]], *, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], MergeReport]:
    """Run ``step`` over in-memory state dicts (one per input) and return ``(merged, report)``.

    ``step.inputs`` only names the inputs here (any strings); nested steps are not allowed. Each state holds a
    whole checkpoint's tensors, LDM-named or diffusers-named with the component first (``unet.…``,
    ``text_encoder.…``, ``vae.…``): a bare ``unet.state_dict()`` needs that prefix.

    Raises:
        TypeError: a state is not a mapping (a module: pass its ``state_dict()``).
        ValueError: nested steps, or another number of states than ``step.inputs``.
        MergeError: nothing to merge (see its message).
    """
    if any(isinstance(i, MergeStep) for i in step.inputs):
        raise ValueError("merge_state_dicts takes flat steps; run nested steps first")
    for name, state in zip(step.inputs, states):
        if not isinstance(state, Mapping):
            fix = " (a module: pass its state_dict())" if isinstance(state, torch.nn.Module) else ""
            raise TypeError(f"merge_state_dicts: input {name!r} is a {type(state).__name__}, not a state dict{fix}")
    if len(states) != len(step.inputs):
        raise ValueError(f"merge_state_dicts: {len(states)} state dict(s) for the {len(step.inputs)} input(s) of the "
                         f"{step.operator} step ({', '.join(map(str, step.inputs))}); give one per input")
    step = resolve_seeds(step)
    sources = [DictSource(s, name=str(n)) for s, n in zip(states, step.inputs)]
    merged = MergedSource(step, sources=sources, device=device)
    return {k: merged.get(k) for k in merged.keys()}, merged.report


def iter_merged(source: MergedSource) -> Iterator[tuple[str, Tensor]]:
    """``(key, tensor)`` of a merged source in output-file order."""
    for key in _output_order(source.plan()):
        yield key, source.get(key)
