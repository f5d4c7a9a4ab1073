"""Whole Stable Diffusion checkpoints: LDM ("compvis" single-file) naming <-> diffusers naming.

Top-level rule table (LDM prefix <-> diffusers component; the per-component rules live in
:mod:`.unet_keys`, :mod:`.clip_keys`, :mod:`.vae_keys`)::

    model.diffusion_model.               <-> unet.            (SD1, SD2, SDXL)
    first_stage_model.                   <-> vae.
    cond_stage_model.transformer.        <-> text_encoder.    (SD1, OpenAI CLIP-L)
    cond_stage_model.model.              <-> text_encoder.    (SD2, OpenCLIP-H, fused qkv)
    conditioner.embedders.0.transformer. <-> text_encoder.    (SDXL, CLIP-L)
    conditioner.embedders.1.model.       <-> text_encoder_2.  (SDXL, OpenCLIP-bigG, text_projection)
    conditioner.embedders.0.model.       <-> text_encoder_2.  (the SDXL refiner: OpenCLIP-bigG alone)
    embedder.model.visual.               <-> image_encoder.   (SD 2.1 unCLIP: the CLIP vision tower, :mod:`.unclip`)

SD 2.1 unCLIP files (Stability's ``sd21-unclip-h`` / ``-l``) are SD2 checkpoints in this map whose UNet
``label_emb.0.{0,2}`` is diffusers' ``class_embedding.linear_{1,2}`` (``class_embed_type="projection"``; SDXL's
``label_emb`` is ``add_embedding``), as diffusers' ``convert_ldm_unet_checkpoint`` maps it; the embedder's unused
text tower and the ``noise_augmentor.*`` schedule buffers are dropped towards diffusers (:mod:`.unclip`).

The SDXL refiner (Stability's ``sd_xl_refiner_1.0``) is an SDXL checkpoint in this map: the same UNet
and VAE naming, and its one text encoder (OpenCLIP-bigG, no CLIP-L) is the diffusers refiner's
``text_encoder_2`` (diffusers' ``StableDiffusionXLImg2ImgPipeline`` has no ``text_encoder``; its
single-file loader reads it from ``conditioner.embedders.0.model.``). :func:`is_sdxl_refiner` tells it.

Diffusers-side keys are flat with a component prefix (``unet.conv_in.weight``); text encoders use
the ``text_model.…`` spelling of diffusers' files and single-file loader (transformers 4);
:func:`split_components` adapts it to a transformers-5 ``CLIPTextModel``. Going to diffusers,
LDM-only tensors are dropped and reported: EMA copies (``model_ema.*``), the DDPM schedule buffers
(``betas``, ``alphas_cumprod`` ...), CLIP ``position_ids``, OpenCLIP ``logit_scale``, and SD2's unused
24th OpenCLIP layer and projection. Everything else round-trips exactly.

Plans are made from shapes alone (:func:`key_plan`) and applied lazily (:func:`apply_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from math import prod

import torch
from torch import Tensor

from .clip_keys import add_text_model, plan_clip, plan_open_clip
from .key_source import KeyMapError, KeyReport, KeySource, PlanBuilder, name_keys
from .unclip import EMBEDDER_PREFIX, NOISE_AUGMENTOR_PREFIX, VISUAL_PREFIX, plan_clip_vision, unclip_variant
from .unet_keys import plan_unet
from .vae_keys import plan_vae

__all__ = [
    "DIFFUSERS_COMPONENTS",
    "LDM_PARTS",
    "ARCHITECTURES",
    "KeySource",
    "KeyReport",
    "KeyMapError",
    "checkpoint_naming",
    "checkpoint_architecture",
    "is_sdxl_refiner",
    "key_plan",
    "apply_plan",
    "convert_checkpoint",
    "ldm_to_diffusers",
    "diffusers_to_ldm",
    "ema_key",
    "split_components",
    "join_components",
]

DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder")
ARCHITECTURES = ("sd1", "sd2", "sdxl")

#: LDM prefix -> (diffusers component, key family); SD1/SD2 and SDXL text encoders differ in prefix.
#: The one table of where each part lives in an LDM file (the LoRA tools and the merge engine read it)
LDM_PARTS = {
    "model.diffusion_model.": ("unet", "unet"),
    "first_stage_model.": ("vae", "vae"),
    "cond_stage_model.transformer.": ("text_encoder", "clip"),
    "cond_stage_model.model.": ("text_encoder", "open_clip_sd2"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "clip"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip"),
    "conditioner.embedders.0.model.": ("text_encoder_2", "open_clip"),  # the SDXL refiner's only encoder
    VISUAL_PREFIX: ("image_encoder", "clip_vision"),  # SD 2.1 unCLIP's image embedder (:mod:`.unclip`)
}
#: where the SDXL refiner's OpenCLIP-bigG lives in LDM files (SGM's conditioner, embedder 0)
_REFINER_TEXT = "conditioner.embedders.0.model."
#: diffusers component -> architecture -> LDM prefix
_DIFFUSERS_PARTS = {
    "unet": dict.fromkeys(ARCHITECTURES, "model.diffusion_model."),
    "vae": dict.fromkeys(ARCHITECTURES, "first_stage_model."),
    "text_encoder": {
        "sd1": "cond_stage_model.transformer.",
        "sd2": "cond_stage_model.model.",
        "sdxl": "conditioner.embedders.0.transformer.",
    },
    "text_encoder_2": {"sdxl": "conditioner.embedders.1.model."},
    "image_encoder": {"sd2": VISUAL_PREFIX},
}
#: diffusers' unCLIP class embedding <-> the LDM UNet's label_emb (diffusers' convert_ldm_unet_checkpoint,
#: class_embed_type "projection"); SDXL's label_emb is add_embedding (unet_names)
_CLASS_EMBEDDING = {f"unet.class_embedding.linear_{i}.{p}": f"model.diffusion_model.label_emb.0.{j}.{p}"
                    for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")}
_LDM_CLASS_EMBEDDING = {ldm: diffusers for diffusers, ldm in _CLASS_EMBEDDING.items()}
_LDM_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.",
                EMBEDDER_PREFIX, NOISE_AUGMENTOR_PREFIX)
#: DDPM/LatentDiffusion schedule buffers at the top of LDM files (diffusers keeps them in scheduler config)
_SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod"
    " log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance"
    " posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights"
    " denoiser.sigmas denoiser.log_sigmas".split()
)

_FIX_HINT = (
    "; convert with strict=False to skip them (convert_checkpoint returns the same lists in its"
    " KeyReport), or remove/rename them first. This map covers SD1.x, SD2.x and SDXL base"
    " checkpoints (UNet, CLIP text encoders, VAE)."
)


def _shapes(source: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in source.items()}


def checkpoint_naming(keys: Iterable[str]) -> str:
    """``"ldm"`` or ``"diffusers"`` from key prefixes (see the module's rule table).

    Raises:
        KeyMapError: keys of both namings mixed, or keys of neither.
    """
    keys = list(keys)
    ldm = [k for k in keys if k.startswith(_LDM_MARKERS)]
    diffusers = [k for k in keys if k.split(".", 1)[0] in DIFFUSERS_COMPONENTS]
    if ldm and diffusers:
        raise KeyMapError(
            f"checkpoint mixes LDM keys ({name_keys(ldm, limit=3)}) and diffusers keys"
            f" ({name_keys(diffusers, limit=3)}); convert each part separately"
        )
    if ldm:
        return "ldm"
    if diffusers:
        return "diffusers"
    raise KeyMapError(
        f"cannot tell the naming of keys {name_keys(keys, limit=5)}: LDM keys start with"
        f" {', '.join(_LDM_MARKERS)}; diffusers keys with a component prefix"
        f" ({', '.join(c + '.' for c in DIFFUSERS_COMPONENTS)}). Add the prefix of the part these"
        " tensors belong to (e.g. 'unet.' for a bare diffusers UNet state dict)"
    )


#: key prefixes only SDXL checkpoints have (second text encoder, the UNet's label/add embedding)
_SDXL_MARKERS = (
    "conditioner.embedders.", "model.diffusion_model.label_emb.", "text_encoder_2.", "unet.add_embedding.",
    "add_embedding.",
)
#: where UNet keys live: LDM, component-prefixed diffusers, and a bare diffusers UNet state dict
_UNET_PREFIXES = ("model.diffusion_model.", "unet.", "down_blocks.", "mid_block.", "up_blocks.")


def checkpoint_architecture(shapes: Mapping[str, tuple[int, ...]], *, default: str | None = None) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the keys and shapes of a checkpoint — the one detector.

    Reads LDM files, component-prefixed diffusers states (``unet.…``, ``text_encoder.…``) and bare
    diffusers UNet state dicts (``down_blocks.…``, as diffusers UNet files hold). Evidence, first
    that applies: the LDM text-encoder prefix (``conditioner.embedders`` = SDXL,
    ``cond_stage_model.model`` = OpenCLIP = SD2, ``cond_stage_model.transformer`` = SD1; an SD 2.1
    unCLIP file, whose UNet has a ``label_emb`` too, is SD2); SDXL's second text encoder
    (``text_encoder_2``) or a ``label_emb``/``add_embedding`` in the UNet; the UNet's
    transformer ``proj_in`` (Linear = SD2, 1x1 conv = SD1); the CLIP width (1024 = SD2, 768 = SD1).
    (SD2's v-prediction variant has the same keys and shapes: no detector can tell it.)

    Args:
        shapes: ``{key: shape}`` (tensors work too).
        default: the answer when nothing tells (e.g. ``"sd1"``, whose LoRA naming SD2 shares);
            ``None`` (default) raises instead.

    Raises:
        KeyMapError: no evidence and no ``default`` (e.g. a VAE alone — it is the same in all three).
    """
    if default is not None and default not in ARCHITECTURES:
        raise ValueError(f"default must be one of {ARCHITECTURES} or None, got {default!r}")
    shapes = _shapes(shapes)
    keys = list(shapes)
    # (the LDM text-encoder prefix first: SD 2.1 unCLIP files have a label_emb beside cond_stage_model.model,
    # and diffusers' infer_diffusers_model_type calls them "v2" too)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if unclip_variant(shapes) is not None:  # (an unCLIP file pruned of its text encoder: label_emb + embedder)
        return "sd2"
    if any(k.startswith(_SDXL_MARKERS) for k in keys):
        return "sdxl"
    proj_in = [shapes[k] for k in keys if k.startswith(_UNET_PREFIXES) and k.endswith(".proj_in.weight")]
    if proj_in:
        return "sd2" if len(proj_in[0]) == 2 else "sd1"
    wanted = "text_encoder.text_model.embeddings.token_embedding.weight"
    token = next((k for k in keys if add_text_model(k, "text_encoder.") == wanted), None)
    if token is not None and shapes[token][-1] in (768, 1024):
        return "sd1" if shapes[token][-1] == 768 else "sd2"
    if default is not None:
        return default
    raise KeyMapError(
        f"cannot tell SD1, SD2 or SDXL from keys {name_keys(keys, limit=5)} (no text encoder prefix,"
        " UNet proj_in or CLIP width to go by); pass architecture='sd1', 'sd2' or 'sdxl'"
    )


def is_sdxl_refiner(keys: Iterable[str]) -> bool:
    """Whether checkpoint keys are the SDXL refiner's: an OpenCLIP text encoder and no CLIP-L one.

    LDM: ``conditioner.embedders.0.model.…`` (SGM's refiner config; diffusers'
    ``infer_diffusers_model_type`` "xl_refiner"); diffusers: ``text_encoder_2.…`` without
    ``text_encoder.…``. A bare UNet cannot tell (its add-embedding width only hints at it).
    """
    keys = list(keys)
    if any(k.startswith(_REFINER_TEXT) for k in keys):
        return True
    return any(k.startswith("text_encoder_2.") for k in keys) and not any(k.startswith("text_encoder.") for k in keys)


def key_plan(
    source_shapes: Mapping[str, tuple[int, ...]],
    *,
    to: str,
    architecture: str | None = None,
    target_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, KeySource], KeyReport]:
    """Map every source key to the ``to`` naming (``"ldm"`` or ``"diffusers"``), from shapes only.

    Args:
        source_shapes: ``{key: shape}`` of a whole checkpoint or any part of one (a safetensors
            header's shapes are enough; tensors work too).
        to: target naming. A checkpoint already in it gets an identity plan (with a note).
        architecture: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; only needed going to LDM with a
            ``text_encoder`` and no other evidence (see :func:`checkpoint_architecture`).
        target_shapes: optional ``{target key: shape}`` of the model the result must load into
            (diffusers side: component-prefixed; a transformers-5 CLIP spelling without
            ``text_model.`` is fine). Targets are checked against it: absent ones are
            ``unexpected``, ones it has but the plan does not are ``missing``, and a shape that differs
            only by trailing 1s (1x1 conv vs Linear ``proj_in``) is reshaped to fit (noted); other
            differences are ``mismatched``.

    Returns:
        ``(plan, report)``: ``{target key: KeySource}`` (grouped by component), and what was left out.
    """
    if to not in ("ldm", "diffusers"):
        raise ValueError(f"to must be 'ldm' or 'diffusers', got {to!r}")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    shapes = _shapes(source_shapes)
    builder = PlanBuilder()
    naming = checkpoint_naming(shapes)
    if naming == to:
        for key, shape in shapes.items():
            builder.add(key, KeySource((key,), shape), by=key)
        builder.notes.append(f"the checkpoint is already in {to} naming; keys kept as they are")
    elif to == "diffusers":
        _plan_to_diffusers(shapes, builder)
    else:
        _plan_to_ldm(shapes, builder, architecture)
    if target_shapes is not None:
        _fit_to_target(builder, _shapes(target_shapes), to)
    return builder.plan, builder.report()


#: LDM keys of training that no model runs: the autoencoder's loss module (LPIPS, discriminator, logvar), kept by a
#: careless VAE bake, and the old textual-inversion repository's embedding manager
_TRAINING_LEFTOVERS = ("first_stage_model.loss.", "embedding_manager.")


def _plan_to_diffusers(shapes: dict[str, tuple[int, ...]], builder: PlanBuilder) -> None:
    groups: dict[str, dict] = {prefix: {} for prefix in LDM_PARTS}
    ema, schedule, text_tower, augmentor, leftovers = [], [], [], [], []
    unclip = unclip_variant(shapes) is not None
    for key, shape in shapes.items():
        prefix = next((p for p in LDM_PARTS if key.startswith(p)), None)
        if key.startswith(_TRAINING_LEFTOVERS):
            leftovers.append(key)
        elif unclip and key in _LDM_CLASS_EMBEDDING:  # (unCLIP's label_emb: diffusers' class_embedding)
            builder.add(_LDM_CLASS_EMBEDDING[key], KeySource((key,), shape), by=key)
        elif prefix is not None:
            groups[prefix][key] = shape
        elif key.startswith("model_ema."):
            ema.append(key)
        elif key in _SCHEDULE_BUFFERS:
            schedule.append(key)
        elif key.startswith(EMBEDDER_PREFIX):
            text_tower.append(key)
        elif key.startswith(NOISE_AUGMENTOR_PREFIX):
            augmentor.append(key)
        else:
            builder.unmatched.append(key)
    builder.drop(text_tower, "the unCLIP image embedder's text tower (token/positional embedding, ln_final, text_projection,"
                 " logit_scale; unCLIP-L's whole OpenAI CLIP text transformer): unCLIP runs the vision tower only and"
                 " diffusers' StableUnCLIPImg2ImgPipeline has no place for them")
    builder.drop(augmentor, "the unCLIP noise augmentor's schedule buffers; diffusers keeps the schedule in the"
                 " image_noising_scheduler config (squaredcos_cap_v2, 1000 levels)")
    builder.drop(
        ema,
        "EMA copies of the UNet (model_ema.*, flattened names); diffusers' single-file loader also ignores them"
        " unless extract_ema=True — the live model.diffusion_model.* weights are converted",
    )
    builder.drop(schedule, "noise-schedule buffers of the LDM wrapper; diffusers keeps them in the scheduler config")
    builder.drop(leftovers, "training leftovers no model runs: the VAE's training loss (first_stage_model.loss.*, A1111 "
                 "filters loss keys too) and an old textual-inversion embedding manager (embedding_manager.*)")
    for prefix, part in groups.items():
        if part:
            component, family = LDM_PARTS[prefix]
            _plan_family(family, part, builder, to="diffusers", source_prefix=prefix, target_prefix=component + ".")


def _plan_to_ldm(shapes: dict[str, tuple[int, ...]], builder: PlanBuilder, architecture: str | None) -> None:
    groups: dict[str, dict] = {c: {} for c in DIFFUSERS_COMPONENTS}
    for key, shape in shapes.items():
        component = key.split(".", 1)[0]
        if key in _CLASS_EMBEDDING:  # (unCLIP's projection class embedding)
            builder.add(_CLASS_EMBEDDING[key], KeySource((key,), shape), by=key)
        elif component in groups:
            groups[component][key] = shape
        else:
            builder.unmatched.append(key)
    if groups["text_encoder"] or groups["text_encoder_2"] or groups["image_encoder"]:
        architecture = architecture or checkpoint_architecture(shapes)
        builder.notes.append(f"text encoders written in {architecture} layout")
    refiner = bool(groups["text_encoder_2"]) and not groups["text_encoder"] and architecture == "sdxl"
    for component, part in groups.items():
        if not part:
            continue
        prefix = _DIFFUSERS_PARTS[component].get(architecture or "sd1")
        if refiner and component == "text_encoder_2":  # (the SDXL refiner: its one encoder is SGM's embedder 0)
            prefix = _REFINER_TEXT
        if prefix is None:
            builder.unmatched.extend(part)
            where = "SD2 (SD 2.1 unCLIP)" if component == "image_encoder" else "SDXL"
            builder.notes.append(f"{component} exists only in {where} checkpoints, not in {architecture}")
            continue
        family = LDM_PARTS[prefix][1]
        _plan_family(family, part, builder, to="ldm", source_prefix=component + ".", target_prefix=prefix)


def _plan_family(
    family: str, part: dict, builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str
) -> None:
    if family == "unet":
        plan_unet(part, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix)
    elif family == "vae":
        plan_vae(part, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix)
    elif family == "clip":
        plan_clip(part, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix)
    elif family == "clip_vision":
        plan_clip_vision(part, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix)
    else:
        sd2 = family == "open_clip_sd2"
        plan_open_clip(part, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix, sd2=sd2)


def _fit_to_target(builder: PlanBuilder, target: dict[str, tuple[int, ...]], to: str) -> None:
    if to == "diffusers":
        target = {add_text_model(add_text_model(k, "text_encoder."), "text_encoder_2."): v for k, v in target.items()}
    for key, source in list(builder.plan.items()):
        want = target.get(key)
        if want is None:
            builder.unexpected.append(key)
        elif want != source.shape:
            if prod(want) == prod(source.shape) and _strip_ones(want) == _strip_ones(source.shape):
                builder.plan[key] = KeySource(source.keys, want, source.part, source.transpose)
                builder.notes.append(f"{key}: reshaped {source.shape} -> {want} to fit the target model")
            else:
                builder.mismatched.append(f"{key}: planned shape {source.shape}, target model has {want}")
    builder.missing.extend(k for k in target if k not in builder.plan)


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def apply_plan(plan: Mapping[str, KeySource], get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Materialise the plan's targets one at a time: ``(target key, tensor)`` in plan order.

    ``get(source_key)`` returns a source tensor (e.g. ``state.__getitem__`` or a safetensors
    ``safe_open(...).get_tensor``). Renames and reshapes return views of the source tensor (no copy);
    transposed, split and concatenated targets are new contiguous tensors, so no two targets share
    storage (safetensors refuses shared tensors).

    Raises:
        KeyMapError: a source tensor whose shape does not fit its recipe (names both keys).
    """
    for target, source in plan.items():
        try:
            yield target, _materialise(source, get)
        except RuntimeError as err:
            raise KeyMapError(f"cannot make {target!r} from {source.keys}: {err}") from err


def _materialise(source: KeySource, get: Callable[[str], Tensor]) -> Tensor:
    tensors = [get(key) for key in source.keys]
    if source.transpose:
        if any(t.ndim != 2 for t in tensors):
            raise RuntimeError(f"transpose needs 2-D tensors, got shapes {[tuple(t.shape) for t in tensors]}")
        tensors = [t.t().contiguous() for t in tensors]
    tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    if source.part is not None:
        index, count = source.part
        if tensor.shape[0] % count:
            raise RuntimeError(f"dim 0 of shape {tuple(tensor.shape)} does not split into {count} equal parts")
        size = tensor.shape[0] // count
        tensor = tensor[index * size : (index + 1) * size].clone()
    return tensor if tuple(tensor.shape) == source.shape else tensor.reshape(source.shape)


def convert_checkpoint(
    state: Mapping[str, Tensor],
    *,
    to: str,
    strict: bool = True,
    architecture: str | None = None,
    target_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, Tensor], KeyReport]:
    """Convert a whole state dict to ``to`` naming; returns ``(converted, report)``.

    With ``strict=True`` (default) unknown, missing, mismatched or unexpected keys raise
    :class:`KeyMapError` naming them; with ``strict=False`` they are skipped and listed in the report.
    Dropped keys (see the module docstring) never raise; they are listed with the reason.
    """
    plan, report = key_plan(_shapes(state), to=to, architecture=architecture, target_shapes=target_shapes)
    if strict and not report.ok:
        raise KeyMapError(f"cannot convert the checkpoint to {to} naming: {report.problems()}{_FIX_HINT}", report)
    return dict(apply_plan(plan, state.__getitem__)), report


def ema_key(key: str) -> str:
    """The CompVis ``LitEma`` name of an LDM UNet key: ``model_ema.`` + the key after ``model.`` with
    its dots removed (``model.diffusion_model.out.0.weight`` -> ``model_ema.diffusion_modelout0weight``),
    as CompVis training writes the EMA copy and diffusers' ``extract_ema=True`` reads it."""
    return "model_ema." + "".join(key.split(".")[1:])


def ldm_to_diffusers(
    state: Mapping[str, Tensor], *, strict: bool = True, architecture: str | None = None
) -> dict[str, Tensor]:
    """LDM single-file state dict -> flat diffusers state (``unet.…``, ``text_encoder.…``, ``vae.…``)."""
    return convert_checkpoint(state, to="diffusers", strict=strict, architecture=architecture)[0]


def diffusers_to_ldm(
    state: Mapping[str, Tensor], *, strict: bool = True, architecture: str | None = None
) -> dict[str, Tensor]:
    """Flat diffusers state (component-prefixed) -> LDM single-file state dict."""
    return convert_checkpoint(state, to="ldm", strict=strict, architecture=architecture)[0]


def split_components(
    state: Mapping[str, Tensor], *, expected: Mapping[str, Iterable[str]] | None = None
) -> dict[str, dict[str, Tensor]]:
    """Flat diffusers state -> ``{component: {key without prefix: tensor}}`` for ``load_state_dict``.

    ``expected`` (optional) gives, per component, the keys its model has (e.g.
    ``{"text_encoder": text_encoder.state_dict()}``): text-encoder keys are then respelled to
    match — transformers 5's ``CLIPTextModel`` has no ``text_model.`` level, while
    ``CLIPTextModelWithProjection`` keeps it.

    Raises:
        KeyMapError: keys without a component prefix.
    """
    out: dict[str, dict[str, Tensor]] = {}
    stray = []
    for key, tensor in state.items():
        component, _, local = key.partition(".")
        if component not in DIFFUSERS_COMPONENTS or not local:
            stray.append(key)
            continue
        out.setdefault(component, {})[local] = tensor
    if stray:
        raise KeyMapError(
            f"{len(stray)} key(s) without a component prefix ({', '.join(DIFFUSERS_COMPONENTS)}):"
            f" {name_keys(stray)}; convert LDM checkpoints with ldm_to_diffusers first"
        )
    for component, keys in (expected or {}).items():
        if component.startswith("text_encoder") and component in out:
            flat = not any(k.startswith("text_model.") for k in keys)
            part = out[component]
            if flat:
                out[component] = {k.removeprefix("text_model."): v for k, v in part.items()}
            else:
                out[component] = {add_text_model(k, ""): v for k, v in part.items()}
    return out


def join_components(parts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{component: state_dict}`` -> flat diffusers state (``unet.conv_in.weight`` ...), the inverse of
    :func:`split_components`: CLIP ``position_ids`` are left out, and text-encoder keys get the
    ``text_model.`` level that transformers 5's ``CLIPTextModel`` drops (diffusers' files and LDM keep it).
    Tensors are the parts' own (not copied or detached)."""
    state: dict[str, Tensor] = {}
    for component, part in parts.items():
        for key, value in part.items():
            if key.endswith("position_ids"):
                continue
            if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key
            state[f"{component}.{key}"] = value
    return state
