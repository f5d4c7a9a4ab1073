"""Merge recipes: what to merge and how, as data — JSON in, JSON out, stored in the output file.

A :class:`MergeStep` names an operator, its inputs (file paths or other steps: a chain of merges
runs without intermediate files), its strengths, the seed of random operators, the output dtype
and the :class:`KeyPolicy`. Written outputs carry, unless opted out:

* ``sdadapt_merge_recipe`` — the full machine-readable recipe (every option, the seed, the sha256
  of each input file, the library version); ``python -m sdadapt merge --recipe FILE`` replays it
  bit-exactly (FILE is that JSON or any file whose metadata holds it);
* ``sd_merge_recipe`` / ``sd_merge_models`` — AUTOMATIC1111's convention (read by the webui, civitai
  and supermerger): the primary/secondary/tertiary input sha256, method and multiplier, and a map
  ``sha256 -> {name, legacy_hash, sd_merge_recipe}`` that also folds in the inputs' own maps, so the
  ancestry of a merge of merges stays in the file;
* ``format = "pt"`` (as A1111 writes);
* always, the first input's model-describing fields (``modelspec.prediction_type``, ``.architecture``,
  ``sdadapt.configs`` ...: :mod:`sdadapt.merge.model_metadata`), so an SD2 768-v merge stays v.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import torch

from ..checks import finite_number, finite_numbers
from ..errors import InputError
from ..formats.files import WeightFileError, check_input_file, read_safetensors_header
from ..formats.header import load_json
from ..patterns import compile_pattern
from .operators import MAX_MERGE_STRENGTH, check_options

__all__ = [
    "KeyPolicy",
    "MergeStep",
    "DTYPES",
    "RECIPE_KEY",
    "RECIPE_FORMAT",
    "step_to_dict",
    "step_from_dict",
    "recipe_to_json",
    "load_recipe",
    "leaf_paths",
    "a1111_metadata",
]

RECIPE_KEY = "sdadapt_merge_recipe"
RECIPE_FORMAT = "sdadapt-merge-recipe"
RECIPE_VERSION = 1
#: dtype names used by recipes and the command line
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder")


@dataclass(frozen=True)
class KeyPolicy:
    """Which keys merge and what happens to the others (the engine reports every decision).

    Attributes:
        components: parts whose float tensors are merged: any of ``"unet"``, ``"text_encoder"``,
            ``"text_encoder_2"``, ``"vae"``, ``"image_encoder"`` (SD 2.1 unCLIP's ``embedder.model.*``, a
            diffusers ``image_encoder.*``). Keys of the other parts are copied from the first input (and
            ``"other"`` keys — schedule buffers, unCLIP's ``noise_augmentor.*`` etc. — always are).
        ema: ``"prune"`` (drop ``model_ema.*``), ``"copy"`` (keep the first input's) or ``"merge"``.
        only_in_others: keys the first input lacks: ``"drop"`` (A1111) or ``"copy"`` (from the first
            input that has them, supermerger).
        channel_mismatch: shapes differing only in dim 1 (9-/8-channel inpainting or
            instruct-pix2pix ``conv_in`` against 4): ``"merge-common"`` merges the shared channels and
            keeps the first input's extra ones (A1111), ``"error"`` refuses.
        reset_position_ids: write CLIP ``position_ids`` as ``arange`` int64 (fixes files broken by
            older mergers). They are never interpolated either way.
        discard: regular expression; output keys it matches (``re.search`` semantics) are removed.
            It is validated here and matched in linear time (:mod:`sdadapt.patterns`: no
            backreferences or lookaround), so a hostile recipe cannot hang a merge.
        exclude: supermerger's Exclude as ``BLOCKS:ELEMENTS`` rules
            (:func:`sdadapt.merge.elemental.parse_selection`): matching keys are not merged, the first
            input's tensor is kept. Recorded only when set.
        include: supermerger's Include: only keys matching these rules are merged (``exclude`` still
            applies to them); the others keep the first input's tensor. Recorded only when set.
    """

    components: tuple[str, ...] = _COMPONENTS
    ema: str = "prune"
    only_in_others: str = "drop"
    channel_mismatch: str = "merge-common"
    reset_position_ids: bool = False
    discard: str | None = None
    exclude: str | None = None
    include: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.components, str) or not isinstance(self.components, (list, tuple)):
            raise InputError(f"KeyPolicy.components must be a list of names, got {str(self.components)[:60]!r}")
        object.__setattr__(self, "components", tuple(self.components))
        bad = [c for c in self.components if c not in _COMPONENTS]
        if bad:
            raise InputError(f"unknown components {[str(b)[:40] for b in bad][:5]}; choose from {', '.join(_COMPONENTS)}")
        if not isinstance(self.reset_position_ids, bool):
            raise InputError(f"KeyPolicy.reset_position_ids must be true or false, got {self.reset_position_ids!r}")
        if self.discard is not None:
            compile_pattern(self.discard, what="discard (--discard)")
        for rules in (self.exclude, self.include):
            if rules is not None:
                from .elemental import parse_selection

                parse_selection(rules, architecture="sd1")  # syntax (SDXL block names are a subset)
        for name, value, allowed in (
            ("ema", self.ema, ("prune", "copy", "merge")),
            ("only_in_others", self.only_in_others, ("drop", "copy")),
            ("channel_mismatch", self.channel_mismatch, ("merge-common", "error")),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise InputError(f"KeyPolicy.{name} must be one of {allowed}, got {str(value)[:40]!r}")


Input = Union[str, "MergeStep"]


@dataclass(frozen=True)
class MergeStep:
    """One merge: ``operator`` over ``inputs`` (paths or nested steps), and all its settings.

    Attributes:
        operator: a name in :data:`sdadapt.merge.operators.OPERATORS`; ``alpha``, ``weights`` and
            ``seed`` may only be set when that operator declares them.
        inputs: ``(A, B)``, ``(A, B, C)`` or ``(BASE, M1, M2, ...)`` as the operator takes them; the
            first input decides the output's keys, naming and (with ``dtype=None``) dtypes.
        alpha: strength of the two-model operators (A1111's multiplier: the weight of B).
        weights: per-model weights of the task-vector operators (default 1 each).
        options: the operator's keyword options (``density``, ``drop``, ``lam``, ``consensus``,
            ``normalize``, ``rescale``): only those its :class:`~sdadapt.merge.operators.Operator`
            declares, of the declared types — anything else is refused when the step is made.
        block_weights: per-block strengths (26 SD1/SD2 or 20 SDXL values, BASE first, or 110 on SDXL,
            one per layer; see :mod:`sdadapt.merge.blocks`); they replace ``alpha`` per key (task
            vectors: scale ``lam``).
        base_alpha: BASE weight for a 25/19-value ``block_weights``.
        seed: seed of random operators (per-key generators are derived from it and the key name).
        dtype: output dtype name (``"fp16"``, ``"bf16"``, ``"fp32"``) or ``None`` = the first
            input's dtype per key. Nested steps with ``None`` hand float32 to the next step.
        compute_dtype: dtype the operators compute in.
        policy: the :class:`KeyPolicy`.
        elemental: supermerger's elemental rules (``"IN04 IN05:attn2:0.5"``, see
            :mod:`sdadapt.merge.elemental`): per-key strengths applied after ``block_weights``.
            Recorded in the recipe only when set (older readers refuse fields they do not know).
        adjust: supermerger's Adjust ("fine"): 8 numbers (fewer are padded with 0) that rescale the
            UNet's ``conv_in`` / ``out.0`` / ``out.2`` after the merge (:mod:`sdadapt.merge.adjust`).
            Recorded only when set.
        block_beta: per-block ``beta`` (26 SD1/SD2 or 20 SDXL values, BASE first; 25/19 take BASE
            from ``options["beta"]``) for the operators that declare ``beta``; replaces it per key.
            Recorded only when set.
    """

    operator: str
    inputs: tuple[Input, ...]
    alpha: float | None = None
    weights: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    block_weights: tuple[float, ...] | None = None
    base_alpha: float | None = None
    seed: int | None = None
    dtype: str | None = None
    compute_dtype: str = "fp32"
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    elemental: str | None = None
    adjust: tuple[float, ...] | None = None
    block_beta: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.operator, str):
            raise InputError(f"MergeStep.operator must be a name, got {str(self.operator)[:40]!r}")
        object.__setattr__(self, "inputs", tuple(str(i) if isinstance(i, os.PathLike) else i for i in self.inputs))
        if not isinstance(self.options, Mapping):
            raise InputError(f"MergeStep.options must map option names to values, got {str(self.options)[:40]!r}")
        object.__setattr__(self, "options", dict(self.options))
        if self.weights is not None:
            object.__setattr__(self, "weights", finite_numbers(_sequence(self.weights, "weights"), name="weights",
                                                               low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH))
        if self.block_weights is not None:
            object.__setattr__(self, "block_weights", finite_numbers(
                _sequence(self.block_weights, "block_weights"), name="block_weights", low=-MAX_MERGE_STRENGTH,
                high=MAX_MERGE_STRENGTH))
        if self.base_alpha is not None:
            finite_number(self.base_alpha, name="base_alpha", low=-MAX_MERGE_STRENGTH, high=MAX_MERGE_STRENGTH)
        if self.elemental is not None:
            from .elemental import parse_elemental

            parse_elemental(self.elemental, architecture="sd1", limit=MAX_MERGE_STRENGTH)  # syntax (SDXL names are a subset)
        if self.adjust is not None:
            from .adjust import parse_adjust

            object.__setattr__(self, "adjust", parse_adjust(_sequence(self.adjust, "adjust")))
        if self.block_beta is not None:
            object.__setattr__(self, "block_beta", finite_numbers(
                _sequence(self.block_beta, "block_beta"), name="block_beta", low=-MAX_MERGE_STRENGTH,
                high=MAX_MERGE_STRENGTH))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"MergeStep.seed must be a non-negative integer, got {str(self.seed)[:40]!r}")
        if not isinstance(self.policy, KeyPolicy):
            raise InputError(f"MergeStep.policy must be a KeyPolicy, got {type(self.policy).__name__}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {self.dtype!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(DTYPES)}, got {self.compute_dtype!r}")
        for item in self.inputs:
            if not isinstance(item, (str, MergeStep)):
                raise TypeError(f"MergeStep inputs are paths or MergeSteps, got {type(item).__name__}")
        # the operator's declaration decides which settings exist (the same check the engine and the CLI use)
        check_options(self.operator, self.options, alpha=self.alpha, weights=self.weights, seed=self.seed)
        if self.block_beta is not None and "beta" not in self.options:
            from .operators import OPERATORS

            with_beta = [name for name, op in OPERATORS.items() if "beta" in op.option_names]
            raise InputError(f"{self.operator}: block_beta (per-block --beta) needs options['beta'] (BASE's beta)"
                             if self.operator in with_beta else f"{self.operator} has no beta, so block_beta "
                             f"(per-block --beta) cannot apply; operators with beta: {', '.join(with_beta)}")


def step_to_dict(step: MergeStep, hashes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """JSON-ready dict of ``step``; file inputs become ``{"path", "sha256"}`` when ``hashes`` has them."""
    out: dict[str, Any] = {"operator": step.operator, "inputs": []}
    for item in step.inputs:
        if isinstance(item, MergeStep):
            out["inputs"].append({"step": step_to_dict(item, hashes)})
        else:
            entry: dict[str, Any] = {"path": item}
            if hashes and item in hashes:
                entry["sha256"] = hashes[item]
            out["inputs"].append(entry)
    for f in fields(MergeStep):
        if f.name in ("operator", "inputs"):
            continue
        value = getattr(step, f.name)
        if f.name in _WRITTEN_WHEN_SET and value is None:
            continue
        if f.name == "policy":
            value = {p.name: (list(v) if isinstance(v := getattr(value, p.name), tuple) else v) for p in fields(KeyPolicy)
                     if p.name not in _WRITTEN_WHEN_SET or getattr(value, p.name) is not None}
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(sorted(value.items()))  # canonical: the same options give the same bytes
        out[f.name] = value
    return out


#: step fields newer than recipe version 1: written only when set, so recipes that do not use them
#: stay readable by older sdadapt (which refuses unknown fields) and keep their bytes
_WRITTEN_WHEN_SET = frozenset({"elemental", "adjust", "block_beta", "exclude", "include"})

#: deepest chain of nested steps a recipe may hold
MAX_RECIPE_DEPTH = 16
_STEP_KEYS = frozenset(f.name for f in fields(MergeStep))
_POLICY_KEYS = frozenset(f.name for f in fields(KeyPolicy))


def _sequence(value: Any, name: str) -> Any:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be a list of numbers, got {str(value)[:60]!r}")
    return value


def _typed(data: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str, where: str) -> None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
        raise InputError(f"{where}: {name} must be {what}, got {str(value)[:60]!r}")


def _foreign_fields(names: list[str], operator: Any) -> str:
    """`` (NAME: what a step calls it; ...)`` for the fields another merger's recipe has (supermerger, A1111)."""
    from .operators import OPERATORS
    from .recipe_hints import foreign_field_hint

    options = OPERATORS[operator].option_names if isinstance(operator, str) and operator in OPERATORS else ()
    said = [f"{name}: {hint}" for name in names
            if (hint := foreign_field_hint(name, operator_options=options)) is not None]
    return f" ({'; '.join(said)})" if said else ""


def step_from_dict(data: Mapping[str, Any], *, _depth: int = 0, _where: str = "step") -> MergeStep:
    """Inverse of :func:`step_to_dict` (recorded hashes are ignored here; see :func:`load_recipe`).

    Every field's type is checked (the message names the field and where it sits in the recipe);
    steps nest at most :data:`MAX_RECIPE_DEPTH` deep.

    Raises:
        InputError: a missing or mistyped field, an unknown field, nesting too deep, or a value the
            operator refuses.
    """
    if _depth > MAX_RECIPE_DEPTH:
        raise InputError(f"{_where}: steps are nested more than {MAX_RECIPE_DEPTH} deep")
    if not isinstance(data, Mapping):
        raise InputError(f"{_where}: a step must be an object, got {type(data).__name__}")
    unknown = sorted(str(k)[:40] for k in data if k not in _STEP_KEYS)
    if unknown:
        raise InputError(f"{_where}: unknown field(s) {unknown[:5]}{_foreign_fields(unknown[:5], data.get('operator'))}; "
                         f"a step has {', '.join(sorted(_STEP_KEYS))}")
    if not isinstance(data.get("operator"), str):
        raise InputError(f"{_where}: operator must be a name, got {str(data.get('operator'))[:40]!r}")
    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InputError(f"{_where}: inputs must be a non-empty list, got {str(raw_inputs)[:60]!r}")
    inputs: list[Any] = []
    for index, item in enumerate(raw_inputs, 1):
        place = f"{_where}.inputs[{index}]"
        if isinstance(item, Mapping) and "step" in item:
            inputs.append(step_from_dict(item["step"], _depth=_depth + 1, _where=f"{place}.step"))
        elif isinstance(item, Mapping) and isinstance(item.get("path"), str) and item["path"]:
            inputs.append(item["path"])
        else:
            raise InputError(f"{place}: an input is {{\"path\": \"FILE\"}} or {{\"step\": {{...}}}}, got {str(item)[:60]!r}")
    _typed(data, "alpha", (int, float), "a number", _where)
    _typed(data, "base_alpha", (int, float), "a number", _where)
    _typed(data, "seed", (int,), "a non-negative integer", _where)
    _typed(data, "dtype", (str,), f"one of {', '.join(DTYPES)}", _where)
    _typed(data, "elemental", (str,), "elemental rules (text)", _where)
    _typed(data, "compute_dtype", (str,), f"one of {', '.join(DTYPES)}", _where)
    _typed(data, "options", (dict,), "an object", _where)
    _typed(data, "policy", (dict,), "an object", _where)
    kwargs = {name: data[name] for name in _STEP_KEYS - {"operator", "inputs"} if name in data}
    for name in ("weights", "block_weights", "adjust", "block_beta"):
        if kwargs.get(name) is not None:
            kwargs[name] = tuple(_sequence(kwargs[name], f"{_where}: {name}"))
    if "policy" in kwargs:
        policy = kwargs["policy"]
        bad = sorted(str(k)[:40] for k in policy if k not in _POLICY_KEYS)
        if bad:
            raise InputError(f"{_where}: policy has unknown field(s) {bad[:5]}; it has {', '.join(sorted(_POLICY_KEYS))}")
        _typed(policy, "discard", (str,), "a pattern (a string)", f"{_where}.policy")
        _typed(policy, "exclude", (str,), "include/exclude rules (text)", f"{_where}.policy")
        _typed(policy, "include", (str,), "include/exclude rules (text)", f"{_where}.policy")
        if "components" in policy:
            policy = {**policy, "components": tuple(_sequence(policy["components"], f"{_where}.policy.components"))}
        kwargs["policy"] = KeyPolicy(**policy)
    return MergeStep(operator=data["operator"], inputs=tuple(inputs), **kwargs)


def recipe_to_json(step: MergeStep, *, hashes: Mapping[str, str] | None = None) -> str:
    """The full recipe as compact JSON (format tag, library version, the step tree with input hashes)."""
    from .. import __version__

    return json.dumps(
        {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "library": f"sdadapt {__version__}",
         "step": step_to_dict(step, hashes)},
        separators=(",", ":"),
    )


def leaf_paths(step: MergeStep) -> list[str]:
    """Every file path in the step tree, depth first, without repeats."""
    seen: dict[str, None] = {}
    for item in step.inputs:
        if isinstance(item, MergeStep):
            seen.update(dict.fromkeys(leaf_paths(item)))
        else:
            seen[item] = None
    return list(seen)


def load_recipe(path: str | os.PathLike) -> tuple[MergeStep, dict[str, str]]:
    """``(step, {input path: recorded sha256})`` from a recipe JSON file or a merged file's metadata.

    Input paths are used as recorded when they exist (then a replay writes the same bytes); else
    relative to the recipe's folder, else the file of that name in the recipe's folder (the
    tensors are then still bit-identical; the recorded paths in the new recipe differ).

    Raises:
        WeightFileError: the file holds no sdadapt recipe (an A1111-only recipe cannot be replayed:
            it lacks the operator details), or the JSON is malformed.
    """
    file = Path(path)
    if not file.exists():
        raise WeightFileError(f"{file}: no such recipe file")
    check_input_file(file, what="recipe (.json or merged .safetensors)")
    if file.suffix.lower() == ".json":
        if file.stat().st_size > 16 << 20:
            raise WeightFileError(f"{file}: {file.stat().st_size} bytes is not a merge recipe (recipes are small JSON)")
        try:
            text = file.read_bytes()
        except OSError as exc:
            raise WeightFileError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    else:
        _, metadata = read_safetensors_header(file)
        if RECIPE_KEY not in metadata:
            hint = " (it has an A1111 sd_merge_recipe, which does not record enough to replay)" if "sd_merge_recipe" in metadata else ""
            raise WeightFileError(f"{file}: no {RECIPE_KEY} metadata{hint}; pass the recipe .json instead")
        text = metadata[RECIPE_KEY]
    data = load_json(text, source=str(file), what="the merge recipe", max_depth=4 * MAX_RECIPE_DEPTH + 8)
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        from .recipe_hints import foreign_recipe_hint

        raise WeightFileError(f"{file}: not an sdadapt merge recipe (no \"format\": \"{RECIPE_FORMAT}\")"
                              + (foreign_recipe_hint(data) if isinstance(data, dict) else ""))
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise WeightFileError(f"{file}: malformed recipe (version must be an integer, got {str(version)[:40]!r})")
    if version > RECIPE_VERSION:
        raise WeightFileError(f"{file}: recipe version {version} is newer than this sdadapt reads ({RECIPE_VERSION})")
    hashes: dict[str, str] = {}

    def resolve(node: Any, depth: int) -> Any:
        if not isinstance(node, dict) or depth > MAX_RECIPE_DEPTH or not isinstance(node.get("inputs"), list):
            return node  # step_from_dict names what is wrong
        node = dict(node)
        new_inputs: list[Any] = []
        for item in node["inputs"]:
            if isinstance(item, dict) and "step" in item:
                new_inputs.append({"step": resolve(item["step"], depth + 1)})
                continue
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
                new_inputs.append(item)
                continue
            recorded = Path(item["path"])
            resolved = item["path"]  # as recorded when it exists: then the replay is byte-identical
            try:
                if not recorded.exists():
                    for candidate in (file.parent / recorded, file.parent / recorded.name):
                        if candidate.exists():
                            resolved = str(candidate)
                            break
            except (OSError, ValueError):  # a path the OS cannot look up (NUL byte, too long)
                raise WeightFileError(f"{file}: malformed recipe (input path {item['path'][:80]!r})") from None
            sha = item.get("sha256")
            if sha is not None:
                if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
                    raise WeightFileError(f"{file}: malformed recipe (sha256 of {item['path'][:80]!r} is not 64 hex digits)")
                hashes[resolved] = sha.lower()
            new_inputs.append({"path": resolved})
        node["inputs"] = new_inputs
        return node

    try:
        step = step_from_dict(resolve(data.get("step"), 0))
    except WeightFileError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightFileError(f"{file}: malformed recipe ({' '.join(str(exc).split())})") from None
    return step, hashes


_A1111_METHODS = {"weighted-sum": "Weighted sum", "add-difference": "Add difference",
                  "triple-sum": "Triple sum", "sum-twice": "sum Twice"}


def _supermerger_blocks(values: tuple[float, ...] | None, base: float | None) -> tuple[float | None, list[float] | None, str | None]:
    """``(BASE, blocks, as typed)`` of a per-block list the way supermerger's ``smerge`` records it:
    ``weights.split(',', 1)`` — BASE is the first value, the list the others (SDXL's 19 get a 0
    appended, as ``smerge`` does), ``*_orig`` the whole comma-joined text. sdadapt's 25/19-value
    form (no BASE) takes BASE from ``base``; the 110-value SDXL form has BASE (CLIPL) first too."""
    if values is None:
        return base, None, None
    full = list(values) if len(values) in (26, 20, 110) else [base, *values]
    blocks = full[1:] + ([0] if len(full) - 1 == 19 else [])
    return full[0], blocks, ",".join(str(v) for v in full if v is not None)


def _supermerger_fields(step: MergeStep) -> dict[str, Any]:
    """The fields supermerger's ``sd_merge_recipe`` has that A1111's lacks, under supermerger's names
    (``scripts/mergers/mergers.py``, ``smerge``: ``base_alpha``/``base_beta`` for the BASE α/β,
    ``weights_alpha``/``weights_beta`` the block lists without BASE and ``*_orig`` as typed, ``mbw``,
    ``elemental_merge`` the rules split at commas and new lines). Written only when the step uses
    them, so a plain weighted sum stays A1111's dict. Files of sdadapt ≤ 0.x wrote ``beta`` (and
    ``weights_beta`` BASE first); nothing reads them back — replays use ``sdadapt_merge_recipe``."""
    fields_: dict[str, Any] = {}
    uses_blocks = step.block_weights is not None or step.block_beta is not None
    if "beta" in step.options or uses_blocks:
        base_alpha, weights_alpha, alpha_orig = _supermerger_blocks(
            step.block_weights, step.base_alpha if step.block_weights is not None else step.alpha)
        fields_["base_alpha"] = base_alpha
    if "beta" in step.options or step.block_beta is not None:
        base_beta, weights_beta, beta_orig = _supermerger_blocks(step.block_beta, step.options.get("beta"))
        fields_["base_beta"] = base_beta
    if uses_blocks:
        fields_["mbw"] = True
        fields_["weights_alpha"], fields_["weights_alpha_orig"] = (weights_alpha, alpha_orig)
        if step.block_beta is not None:
            fields_["weights_beta"], fields_["weights_beta_orig"] = (weights_beta, beta_orig)
    if step.elemental is not None:
        fields_["elemental_merge"] = step.elemental.replace("\n", ",").split(",") if step.elemental else ""
    return fields_


def _a1111_metadata_value(value: str | None, *, source: str, what: str) -> Any:
    """One metadata value as A1111's ``read_metadata_from_safetensors`` hands it on: text starting with
    ``{`` parsed as JSON (bounded depth), anything else, or JSON that does not parse, as the text itself."""
    if value is None or not value.startswith("{"):
        return value
    try:
        return load_json(value, source=source, what=what, max_depth=16)
    except ValueError:
        return value


def a1111_metadata(
    step: MergeStep,
    *,
    hashes: Mapping[str, str],
    legacy_hashes: Mapping[str, str],
    input_metadata: Mapping[str, Mapping[str, str]],
    flags: Mapping[str, bool] | None = None,
) -> dict[str, str]:
    """``sd_merge_recipe`` and ``sd_merge_models`` in A1111's shape (values JSON strings).

    ``hashes``/``legacy_hashes``/``input_metadata`` are keyed by input path; nested steps
    contribute their leaf files to ``sd_merge_models`` and ``null`` as a model hash. As A1111's
    ``run_modelmerger`` (modules/extras.py @ 8faafb6): an input's ``name`` is its file name with the
    extension (``CheckpointInfo.name`` of a file outside the webui's model folder), and each input's own
    ``sd_merge_models`` is folded in with ``dict.update`` after its entry, inputs in order, so the last
    record of a hash wins (files of sdadapt before this wrote the stem and kept the first; both read back).
    """
    direct = [None if isinstance(i, MergeStep) else hashes.get(i) for i in step.inputs]
    direct += [None] * (3 - len(direct))
    recipe = {
        "type": "sdadapt",
        "primary_model_hash": direct[0],
        "secondary_model_hash": direct[1],
        "tertiary_model_hash": direct[2],
        "interp_method": _A1111_METHODS.get(step.operator, step.operator),
        "multiplier": step.alpha,
        "save_as_half": step.dtype == "fp16",
        "custom_name": "",
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": step.policy.discard or "",
        "is_inpainting": bool((flags or {}).get("is_inpainting", False)),
        "is_instruct_pix2pix": bool((flags or {}).get("is_instruct_pix2pix", False)),
        "block_weights": list(step.block_weights) if step.block_weights is not None else None,
        "seed": step.seed,
    }
    recipe.update(_supermerger_fields(step))
    for name in ("include", "exclude"):  # supermerger writes "Include"/"Exclude": its lists
        if getattr(step.policy, name) is not None:
            recipe[name] = getattr(step.policy, name)
    models: dict[str, Any] = {}
    for path in leaf_paths(step):  # A1111's add_model_metadata, input by input (modules/extras.py)
        sha = hashes.get(path)
        if sha is None:
            continue
        meta = input_metadata.get(path, {})
        own = _a1111_metadata_value(meta.get("sd_merge_recipe"), source=path, what="sd_merge_recipe")
        models[sha] = {"name": Path(path).name, "legacy_hash": legacy_hashes.get(path), "sd_merge_recipe": own}
        ancestry = _a1111_metadata_value(meta.get("sd_merge_models"), source=path, what="sd_merge_models")
        if isinstance(ancestry, dict):  # dict.update: a later input's record of a hash replaces an earlier one
            models.update(ancestry)
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}

