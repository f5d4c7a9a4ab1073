"""Layer names: splitting canonical keys, undoing kohya's underscores, and finding layers in a model.

Canonical adapter keys are ``"<layer path>.<file key>"`` (``down_blocks.0...to_q.lora_down.weight``)
with the ecosystem's layer paths: diffusers paths for UNets, transformers-4 paths
(``text_model.encoder.layers.N...``) for CLIP text encoders. :func:`resolve_layers` maps those onto
the live module names of *your* model, whichever naming it uses (diffusers or LDM UNet,
transformers 4 or 5 CLIP, an LDM checkpoint's ``model.diffusion_model.`` / ``cond_stage_model.``
prefixes), and reports what it cannot place with the nearest names it saw.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from ..adapters.registry import file_keys
from .unet_keys import checked_layers_per_block
from .unet_names import attention_up_blocks, diffusers_to_ldm_unet, is_ldm_unet_path, ldm_to_diffusers_unet

__all__ = [
    "split_key",
    "group_by_layer",
    "underscore_to_path",
    "resolve_layers",
    "LayerNotFoundError",
    "canonical_layer_path",
    "canonical_state",
    "strip_compiled_segments",
    "COMPONENTS",
]

#: component names used for multi-model adapter files (diffusers pipeline attribute names)
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")

class LayerNotFoundError(KeyError):
    """Adapter layer names that match no module of the model (nearest names in the message)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def split_key(key: str) -> tuple[str, str]:
    """``"a.b.to_q.lora_down.weight"`` -> ``("a.b.to_q", "lora_down.weight")``.

    Raises:
        ValueError: the key ends in no known adapter tensor name.
    """
    suffixes = file_keys()  # every registered family's tensor names, longest first
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"{key!r} does not end in a known adapter tensor name ({', '.join(suffixes[:6])}, ...)")


def group_by_layer(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{key: tensor}`` -> ``{layer path: {file key: tensor}}`` (order preserved)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        layer, suffix = split_key(key)
        groups.setdefault(layer, {})[suffix] = value
    return groups


# Tokens of SD UNet / CLIP module paths that contain an underscore themselves. kohya replaces
# every "." of a path with "_", so "to_q" and "down_blocks" must be recognised as one token.
_UNDERSCORE_TOKENS = (
    "down_blocks up_blocks mid_block attentions resnets transformer_blocks to_q to_k to_v to_out "
    "proj_in proj_out conv_shortcut time_emb_proj conv_in conv_out conv_norm_out time_embedding "
    "linear_1 linear_2 add_embedding input_blocks middle_block output_blocks in_layers out_layers "
    "emb_layers skip_connection time_embed label_emb text_model self_attn q_proj k_proj v_proj "
    "out_proj token_embedding position_embedding final_layer_norm layer_norm1 layer_norm2 "
    "text_projection add_k_proj add_v_proj to_add_out norm_out proj_attn time_proj add_time_proj "
    "conv_act activation_fn"
).split()
#: torch.compile's wrapper attribute (``OptimizedModule._orig_mod``): a path segment in names taken from a compiled
#: model; underscored, ``x__orig_mod_y`` splits into ``x``, ``""``, ``orig``, ``mod``, ``y``
_COMPILED_SEGMENT = "_orig_mod"
_TOKEN_PIECES = sorted([*(t.split("_") for t in _UNDERSCORE_TOKENS), _COMPILED_SEGMENT.split("_")], key=len, reverse=True)
#: the tokens by their first piece, longest first (what :func:`underscore_to_path` tries at each piece)
_TOKENS_BY_FIRST_PIECE: dict[str, list[list[str]]] = {}
for _pieces in _TOKEN_PIECES:
    _TOKENS_BY_FIRST_PIECE.setdefault(_pieces[0], []).append(_pieces)
del _pieces


def strip_compiled_segments(path: str) -> str:
    """Drop torch.compile's ``_orig_mod`` wrapper segments: ``"_orig_mod.down_blocks.0.to_q"`` -> ``"down_blocks.0.to_q"``.

    Only whole dotted segments go (``my_orig_mod.x`` stays); other paths are returned unchanged.
    """
    if _COMPILED_SEGMENT not in path:
        return path
    return ".".join(part for part in path.split(".") if part != _COMPILED_SEGMENT)


def underscore_to_path(name: str) -> str:
    """Undo kohya's ``.`` -> ``_``: ``"down_blocks_0_attentions_0_proj_in"`` -> ``"down_blocks.0.attentions.0.proj_in"``.

    Exact for SD UNet (diffusers and LDM) and CLIP paths, also with torch.compile's ``_orig_mod`` segment
    (``"_orig_mod_down_blocks_0"`` -> ``"_orig_mod.down_blocks.0"``); other names are best-effort (dots at
    every underscore not inside a known token). :func:`resolve_layers` also compares
    underscored forms against the live model, so custom models still resolve.
    """
    pieces = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(pieces):
        for token in _TOKENS_BY_FIRST_PIECE.get(pieces[i], ()):
            if pieces[i : i + len(token)] == token:
                out.append("_".join(token))
                i += len(token)
                break
        else:
            out.append(pieces[i])
            i += 1
    return ".".join(out)


_LDM_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_TE_PREFIXES = ("text_model.", "transformer.text_model.", "cond_stage_model.transformer.text_model.")


def _aliases(path: str, live_attention_up_blocks: set[int] | None, layers_per_block: int = 2) -> Iterable[str]:
    """Other spellings of a canonical layer path that a live model may use (UNet block arithmetic
    with the live model's ``layers_per_block``)."""
    yield path
    # CLIP: transformers 5 CLIPTextModel has no `text_model.`; LDM has `cond_stage_model.transformer.`
    for prefix in _TE_PREFIXES:
        if path.startswith(prefix):
            bare = path[len(prefix) :]
            yield bare
            for other in _TE_PREFIXES:
                yield other + bare
    if path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        for prefix in _TE_PREFIXES:
            yield prefix + path
    # UNet: diffusers <-> LDM names, with or without the LDM checkpoint prefix
    bare = path
    for prefix in _LDM_UNET_PREFIXES:
        if path.startswith(prefix):
            bare = path[len(prefix) :]
            yield bare
    if is_ldm_unet_path(bare):
        converted = ldm_to_diffusers_unet(bare, layers_per_block=layers_per_block)
        if converted:
            yield converted
        ldm = bare
    else:
        ldm = diffusers_to_ldm_unet(
            bare, layers_per_block=layers_per_block, up_blocks_with_attention=live_attention_up_blocks
        )
        if ldm:
            yield ldm
    if ldm:
        for prefix in _LDM_UNET_PREFIXES:
            yield prefix + ldm


def _live_layers_per_block(live: Iterable[str], *, ldm: bool) -> int:
    """The live UNet's resnets per down block, from its module names (2 when it has no UNet blocks)."""
    names = []
    for name in live:
        for prefix in _LDM_UNET_PREFIXES:
            name = name.removeprefix(prefix)
        names.append(name)
    return checked_layers_per_block(names, naming="ldm" if ldm else "diffusers")


def resolve_layers(model: nn.Module, layer_paths: list[str]) -> dict[str, str]:
    """Map each adapter layer path onto a module name of ``model``.

    Tries, in order: the exact name; other spellings of the same layer (CLIP with/without
    ``text_model.``, diffusers <-> LDM UNet paths, LDM prefixes), then those of the path without torch.compile's
    ``_orig_mod`` segments (names an older sdadapt saved from a compiled model); then underscore-equivalence
    (``a.b_c`` == ``a_b.c``, what kohya-named custom models need).

    Returns:
        ``{layer path: live module name}``.

    Raises:
        LayerNotFoundError: listing every unplaced path with the nearest live names.
    """
    live = {name: module for name, module in model.named_modules() if name}
    live_ldm = any(is_ldm_unet_path(n) or n.startswith(_LDM_UNET_PREFIXES) for n in live)
    up_attention = None if live_ldm else attention_up_blocks(live)
    layers = _live_layers_per_block(live, ldm=live_ldm)
    if live_ldm:
        # an LDM model: learn which output blocks have attention from its own weight layers
        # (a bare container like `output_blocks.2.1` may be an upsampler, not an attention block)
        up_attention = set()
        for name, module in live.items():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            bare = name
            for prefix in _LDM_UNET_PREFIXES:
                if bare.startswith(prefix):
                    bare = bare[len(prefix) :]
            converted = ldm_to_diffusers_unet(bare, layers_per_block=layers) if is_ldm_unet_path(bare) else None
            if converted:
                up_attention |= attention_up_blocks([converted])
    by_underscore: dict[str, str] = {}
    for name in live:
        by_underscore.setdefault(name.replace(".", "_"), name)
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for path in layer_paths:
        bare = strip_compiled_segments(path)
        spellings = (path, bare) if bare != path else (path,)
        hit = next((a for p in spellings for a in _aliases(p, up_attention or None, layers) if a in live), None)
        if hit is None:
            hit = next((by_underscore[u] for p in spellings if (u := p.replace(".", "_")) in by_underscore), None)
        if hit is None:
            missing.append(path)
        else:
            resolved[path] = hit
    if missing:
        candidates = [n for n, m in live.items() if isinstance(m, (nn.Linear, nn.Conv2d))] or list(live)
        lines = []
        for path in missing[:10]:
            near = difflib.get_close_matches(path, candidates, n=3, cutoff=0.5)
            lines.append(f"  {path}" + (f"  (nearest: {', '.join(near)})" if near else ""))
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise LayerNotFoundError(
            f"{len(missing)} of {len(layer_paths)} adapter layers match no module of "
            f"{type(model).__name__}:\n" + "\n".join(lines) + more + "\nIs the file for this model "
            "(UNet vs text encoder, SD1 vs SDXL)? Load each component into its own model, e.g. "
            "load_adapter(unet, lora['unet']) and load_adapter(text_encoder, lora['text_encoder'])."
        )
    return resolved



def canonical_layer_path(component: str, path: str, *, layers_per_block: int = 2) -> str:
    """The ecosystem spelling of a live layer path of ``component``.

    Text encoders (``text_encoder``, ``text_encoder_2``): transformers-4 paths with ``text_model.``
    (transformers 5's flattened ``CLIPTextModel`` and LDM's ``cond_stage_model.transformer.`` are
    rewritten). UNet: diffusers paths (LDM ``input_blocks...`` and ``model.diffusion_model.`` are
    rewritten, with the UNet's ``layers_per_block``: 2 in SD1/SD2/SDXL). Every component: torch.compile's
    ``_orig_mod`` segments are dropped (:func:`strip_compiled_segments`). Other components and unknown paths
    pass through otherwise unchanged.
    """
    path = strip_compiled_segments(path)
    if component.startswith("text_encoder"):
        for prefix in _TE_PREFIXES:
            if path.startswith(prefix):
                return "text_model." + path[len(prefix) :]
        if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
            return "text_model." + path
        return path
    if component == "unet":
        bare = path
        for prefix in _LDM_UNET_PREFIXES:
            if bare.startswith(prefix):
                bare = bare[len(prefix) :]
        if is_ldm_unet_path(bare):
            return ldm_to_diffusers_unet(bare, layers_per_block=layers_per_block) or path
        return bare
    return path


def canonical_state(
    component: str, state: Mapping[str, Tensor], *, layers_per_block: int = 2
) -> dict[str, Tensor]:
    """Rewrite every key of an adapter state with :func:`canonical_layer_path`."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        layer, suffix = split_key(key)
        out[f"{canonical_layer_path(component, layer, layers_per_block=layers_per_block)}.{suffix}"] = value
    return out
