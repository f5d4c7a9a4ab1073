"""Choosing modules to adapt: composable predicates over ``(qualified name, module)``.

A :class:`Target` is a predicate; combine with ``&``, ``|`` and ``~``::

    from sdadapt.targets import by_name, by_type, UNET_ATTENTION
    t = UNET_ATTENTION | (by_name("*proj_in", "*proj_out") & by_type(nn.Linear, nn.Conv2d))
    chosen = select(unet, t)          # [(name, module), ...]; error if nothing matches

Presets select the equivalent modules whether a UNet uses diffusers names
(``down_blocks.0.attentions.0...``) or LDM/"compvis" names (``input_blocks.1.1...``), with or
without a ``model.diffusion_model.`` prefix, for SD1, SD2 and SDXL layouts; text-encoder presets
work on transformers 4.x (``text_model.encoder...``) and 5.x (``encoder...``) CLIP paths alike.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

__all__ = [
    "Target",
    "by_name",
    "by_regex",
    "by_type",
    "everything",
    "select",
    "select_outermost",
    "NoTargetsError",
    "UNET_ATTENTION",
    "UNET_CROSS_ATTENTION_KV",
    "UNET_KOHYA",
    "UNET_LOCON",
    "TEXT_ENCODER",
    "PRESETS",
]


class NoTargetsError(ValueError):
    """A target selected no module; the message lists module names that were seen."""


class Target:
    """A predicate over ``(qualified_name, module)``; compose with ``&``, ``|``, ``~``."""

    def __init__(self, predicate: Callable[[str, nn.Module], bool], description: str) -> None:
        self._predicate = predicate
        self.description = description

    def __call__(self, name: str, module: nn.Module) -> bool:
        return bool(self._predicate(name, module))

    def __and__(self, other: "Target") -> "Target":
        return Target(lambda n, m: self(n, m) and other(n, m), f"({self.description} & {other.description})")

    def __or__(self, other: "Target") -> "Target":
        return Target(lambda n, m: self(n, m) or other(n, m), f"({self.description} | {other.description})")

    def __invert__(self) -> "Target":
        return Target(lambda n, m: not self(n, m), f"~{self.description}")

    def __repr__(self) -> str:
        return f"Target({self.description})"


def by_name(*patterns: str) -> Target:
    """Modules whose qualified name matches any glob (``*`` also matches dots), e.g. ``"*.attn2.to_k"``."""
    if not patterns:
        raise ValueError("by_name needs at least one glob pattern")
    return Target(
        lambda n, m: any(fnmatch.fnmatchcase(n, p) for p in patterns), f"by_name{patterns!r}"
    )


def by_regex(pattern: str) -> Target:
    """Modules whose qualified name contains a match of ``pattern`` (``re.search``)."""
    compiled = re.compile(pattern)
    return Target(lambda n, m: compiled.search(n) is not None, f"by_regex({pattern!r})")


def by_type(*types: type) -> Target:
    """Modules that are instances of any of ``types`` (subclasses count)."""
    if not types:
        raise ValueError("by_type needs at least one module type")
    return Target(lambda n, m: isinstance(m, types), f"by_type({', '.join(t.__name__ for t in types)})")


everything = Target(lambda n, m: True, "everything")

_LINEAR_OR_CONV = by_type(nn.Linear, nn.Conv2d)

# --- presets (names follow diffusers and LDM/compvis UNets, CLIP text encoders) -----------------
# attention projections: identical names in diffusers and LDM transformer blocks
UNET_ATTENTION = by_regex(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$") & _LINEAR_OR_CONV
UNET_ATTENTION.description = "UNET_ATTENTION"

UNET_CROSS_ATTENTION_KV = by_regex(r"(^|\.)attn2\.(to_k|to_v)$") & _LINEAR_OR_CONV
UNET_CROSS_ATTENTION_KV.description = "UNET_CROSS_ATTENTION_KV"

# kohya's default: every Linear/Conv2d inside a Transformer2DModel (SpatialTransformer in LDM):
# proj_in, attn1/attn2 q/k/v/out, ff.net.0.proj, ff.net.2, proj_out (SD1: 1x1 conv; SD2/XL: Linear)
UNET_KOHYA = (
    by_regex(
        r"(^|\.)(attentions\.\d+|(input_blocks|output_blocks)\.\d+\.\d+|middle_block\.1)\."
        r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$"
    )
    & _LINEAR_OR_CONV
)
UNET_KOHYA.description = "UNET_KOHYA"

# LoCon (kohya with conv_dim): every Linear/Conv2d inside the down/mid/up blocks — attention
# blocks, resnets (conv1/conv2/time_emb_proj/conv_shortcut), down- and upsamplers — but not
# conv_in, conv_out, time embedding or norms.
UNET_LOCON = (
    by_regex(r"(^|\.)(down_blocks|mid_block|up_blocks|input_blocks\.[1-9]\d*|middle_block|output_blocks)\.")
    & _LINEAR_OR_CONV
)
UNET_LOCON.description = "UNET_LOCON"

TEXT_ENCODER = by_regex(r"(^|\.)layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$") & by_type(
    nn.Linear
)
TEXT_ENCODER.description = "TEXT_ENCODER"

PRESETS: dict[str, Target] = {
    "unet-attention": UNET_ATTENTION,
    "unet-cross-kv": UNET_CROSS_ATTENTION_KV,
    "unet-kohya": UNET_KOHYA,
    "unet-locon": UNET_LOCON,
    "text-encoder": TEXT_ENCODER,
}


def _as_target(target: Target | str | Iterable[str]) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target in PRESETS:
            return PRESETS[target]
        return by_name(target)
    return by_name(*target)


def _preset_hint(target: object) -> str:
    """`` Did you mean the preset 'unet-kohya'?`` for a string target spelt like a preset name, else ``""``."""
    if not isinstance(target, str) or "." in target:
        return ""
    import difflib

    spelt = target.strip().lower().replace("_", "-")
    aliases = {name.replace("-", ""): name for name in PRESETS}  # ("unetkohya": UNET_KOHYA's spelling without dashes)
    found = spelt if spelt in PRESETS else aliases.get(spelt.replace("-", ""))
    if found is None:
        close = difflib.get_close_matches(spelt, list(PRESETS), n=1, cutoff=0.75)
        found = close[0] if close else None
    return f" Did you mean the preset {found!r}? (preset names: {', '.join(PRESETS)})" if found else ""


def _suffix_hint(target: object, model: nn.Module) -> str:
    """A hint for peft-style names (``"to_q"``, ``"attn2.to_k"``): globs match the *whole* qualified name."""
    patterns = [target] if isinstance(target, str) else list(target) if isinstance(target, (list, tuple)) else []
    if not patterns or not all(isinstance(p, str) for p in patterns):
        return ""
    names = [n for n, _ in model.named_modules() if n]
    suffixed = [f"*.{p}" for p in patterns if not p.startswith("*")]
    if not any(fnmatch.fnmatchcase(n, p) for n in names for p in suffixed):
        return ""
    shown = suffixed[0] if len(suffixed) == 1 else suffixed
    return (f" Globs match whole qualified names (unlike peft's target_modules suffixes): did you mean {shown!r}?")


def select(model: nn.Module, target: Target | str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """All ``(qualified_name, module)`` of ``model`` that ``target`` accepts, in module order.

    ``target`` may be a :class:`Target`, a preset name from :data:`PRESETS`, or glob(s).
    Modules that are sdadapt adapters themselves are never selected.

    Raises:
        NoTargetsError: nothing matched; the message shows some of the model's module names.
    """
    from .adapters.base import AdapterModule  # local: adapters import targets-free modules only
    from .model_args import as_module

    model = as_module(model, caller="select", one_model=False)
    predicate = _as_target(target)
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterModule) or ".sdadapt." in f".{name}.":
            continue
        if predicate(name, module):
            chosen.append((name, module))
    if not chosen:
        names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]
        if not names:
            names = [n for n, _ in model.named_modules() if n]
        sample = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise NoTargetsError(
            f"target {predicate.description} selected no module of {type(model).__name__} "
            f"({len(names)} candidate modules, e.g. {sample or '<none>'}).{_preset_hint(target)}"
            f"{_suffix_hint(target, model)} Pick a preset "
            "that fits this model (UNet presets for UNets, TEXT_ENCODER for CLIP) or build one with by_name/by_regex."
        )
    return chosen


def select_outermost(model: nn.Module, target: Target | str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """What :func:`select` returns, without the modules inside another selected one (a block's
    sub-blocks): the units that checkpointing, FSDP sharding and fused-backward groups work on.

    Raises:
        NoTargetsError: nothing matched (as :func:`select`).
    """
    chosen: list[tuple[str, nn.Module]] = []
    outer_names: set[str] = set()
    for name, module in select(model, target):  # parents come before their children
        if not any(name.startswith(outer + ".") for outer in outer_names):
            chosen.append((name, module))
            outer_names.add(name)
    return chosen
