"""SD 2.1 unCLIP single files (Stability's ``sd21-unclip-h.ckpt`` / ``sd21-unclip-l.ckpt``): what they hold.

Stability's LDM class ``ImageEmbeddingConditionedLatentDiffusion`` (Stability-AI/stablediffusion
``ldm/models/diffusion/ddpm.py:1804``) is an SD 2.1-v model (``cond_stage_model.model.`` OpenCLIP-H text
encoder, v-prediction, 768 px) plus two parts, and its UNet takes their output as ``c_adm``:

| LDM keys | what | diffusers |
|---|---|---|
| ``model.diffusion_model.label_emb.0.{0,2}`` | the UNet's ``num_classes: "sequential"`` projection, ``adm_in_channels`` = 2D | ``unet.class_embedding.linear_{1,2}`` (``class_embed_type="projection"``) |
| ``embedder.model.visual.*`` | the CLIP vision tower: **H** OpenCLIP ViT-H-14 (``FrozenOpenCLIPImageEmbedder``, GELU), **L** OpenAI ViT-L/14 (``ClipImageEmbedder``, ``clip.load``: QuickGELU) | ``image_encoder.*`` (``CLIPVisionModelWithProjection``) |
| ``embedder.model.{token_embedding, positional_embedding, ln_final, text_projection, logit_scale}``, L also ``embedder.model.transformer.*`` | the embedder's unused text tower (H deletes only ``transformer``; L keeps all of OpenAI CLIP) | dropped (no pipeline part reads them) |
| ``noise_augmentor.{betas, alphas_cumprod, ...}`` | ``CLIPEmbeddingNoiseAugmentation``'s schedule buffers (``squaredcos_cap_v2``, 1000 levels; persistent) | ``image_noising_scheduler/`` config (diffusers' ``DDPMScheduler``) |

``CLIPEmbeddingNoiseAugmentation`` (``ldm/modules/encoders/modules.py:320``) keeps the CLIP-embedding
``data_mean`` / ``data_std`` in **non-persistent** buffers: a file never holds them. The H config gives no
``clip_stats_path``, so they are zeros / ones (identity); the L config reads karlo's
``ViT-L-14_stats.th`` (``torch.save((mean, std))``), which diffusers' ``convert_from_ckpt.py``
``stable_unclip_image_noising_components`` requires as ``clip_stats_path`` and loads into the
``StableUnCLIPImageNormalizer``. diffusers' converter never reads the embedder from the file (it
downloads ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` / ``openai/clip-vit-large-patch14``); A1111
(``modules/sd_models_config.py`` ``guess_model_config_from_state_dict``: ``embedder.model.ln_final.weight``
width 768 → ``config_unclip``, 1024 → ``config_unopenclip``) runs the file's own embedder, as this module does.

OpenCLIP / OpenAI CLIP vision keys -> transformers (``visual.`` dropped): ``conv1`` → ``embeddings.patch_embedding``,
``class_embedding`` → ``embeddings.class_embedding``, ``positional_embedding`` (P, W) →
``embeddings.position_embedding.weight``, ``ln_pre`` → ``pre_layrnorm``, ``transformer.resblocks.N.{ln_1, ln_2,
mlp.c_fc, mlp.c_proj, attn.out_proj}`` → ``encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2,
self_attn.out_proj}``, ``attn.in_proj_{weight,bias}`` (3W, …) → ``self_attn.{q,k,v}_proj`` (row thirds),
``ln_post`` → ``post_layernorm``, ``proj`` (W, D) → ``visual_projection.weight`` (D, W) transposed — the
layout transformers' ``convert_clip_original_pytorch_to_hf.py`` and OpenCLIP's HF export use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .files import WeightFileError, read_weights
from .key_rules import KeyRule, plan_by_rules
from .key_source import PlanBuilder

__all__ = [
    "EMBEDDER_PREFIX",
    "VISUAL_PREFIX",
    "NOISE_AUGMENTOR_PREFIX",
    "VISION_RULES",
    "UnclipFile",
    "unclip_variant",
    "variant_of_width",
    "unclip_info",
    "normalizer_file",
    "plan_clip_vision",
    "image_encoder_config",
    "read_clip_stats",
    "ldm_clip_pixels",
    "noise_augmentor_buffers",
    "ldm_cosine_alphas_cumprod",
    "A1111_MARKER",
]

#: the image embedder of an unCLIP LDM file (``ImageEmbeddingConditionedLatentDiffusion.embedder.model``)
EMBEDDER_PREFIX = "embedder.model."
#: its vision tower: the only part unCLIP runs
VISUAL_PREFIX = "embedder.model.visual."
#: ``CLIPEmbeddingNoiseAugmentation``'s (persistent) schedule buffers
NOISE_AUGMENTOR_PREFIX = "noise_augmentor."
#: the key A1111 tells an unCLIP file by (and H from L by its width)
A1111_MARKER = "embedder.model.ln_final.weight"
#: the buffers ``AbstractLowScaleModel.register_schedule`` writes (stablediffusion ldm/modules/diffusionmodules/upscaling.py:18)
_AUGMENTOR_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                      "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                      "sqrt_recipm1_alphas_cumprod")

_BLOCK = "transformer.resblocks.{n}"
_LAYER = "vision_model.encoder.layers.{n}"
VISION_RULES = (
    KeyRule("conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    KeyRule("class_embedding", "vision_model.embeddings.class_embedding"),
    KeyRule("positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    KeyRule("ln_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    KeyRule(_BLOCK + ".{ln}.{p}", _LAYER + ".{ln}.{p}", words={"ln": {"ln_1": "layer_norm1", "ln_2": "layer_norm2"}}),
    KeyRule(_BLOCK + ".mlp.{fc}.{p}", _LAYER + ".mlp.{fc}.{p}", words={"fc": {"c_fc": "fc1", "c_proj": "fc2"}}),
    KeyRule(_BLOCK + ".attn.out_proj.{p}", _LAYER + ".self_attn.out_proj.{p}"),
    KeyRule(_BLOCK + ".attn.in_proj_{p}", _LAYER + ".self_attn.{qkv}_proj.{p}", kind="fused_qkv"),
    KeyRule("ln_post.{p}", "vision_model.post_layernorm.{p}"),
    KeyRule("proj", "visual_projection.weight", kind="transpose"),
)
#: attention heads of the towers the files hold, by width (ViT-H-14: 16 heads of 80; ViT-L/14: 16 of 64;
#: ViT-B: 12 of 64); other widths: 64-wide heads
_HEADS = {1280: 16, 1024: 16, 768: 12}


@dataclass(frozen=True)
class UnclipFile:
    """What an SD 2.1 unCLIP LDM file says about its image conditioning.

    Attributes:
        variant: ``"h"`` (OpenCLIP ViT-H-14 embedder, identity normaliser) or ``"l"`` (OpenAI ViT-L/14,
            normaliser from karlo's ``ViT-L-14_stats.th``, which the file lacks).
        dim: D, the image-embedding width (the UNet's ``adm_in_channels`` is 2D).
        noise_alphas_cumprod: (T',) the noise augmentor's ``alphas_cumprod`` buffer as the file holds it
            (float32), or ``None`` when the file has none.
        has_encoder: the file holds the embedder's vision tower (``embedder.model.visual.*``).
    """

    variant: str
    dim: int
    noise_alphas_cumprod: Tensor | None
    has_encoder: bool

    @property
    def needs_clip_stats(self) -> bool:
        """The LDM config of this variant reads a CLIP-stats file (``clip_stats_path``): L."""
        return self.variant == "l"


def variant_of_width(width: int) -> str:
    """``"l"`` for a 768-wide CLIP (OpenAI ViT-L/14's text width, and its image embedding), else ``"h"``: A1111's
    rule on ``embedder.model.ln_final.weight`` (``sd_models_config.py`` ``guess_model_config_from_state_dict``)."""
    return "l" if int(width) == 768 else "h"


def unclip_variant(shapes: Mapping[str, Tensor | tuple[int, ...]]) -> str | None:
    """``"h"`` / ``"l"`` for an SD 2.1 unCLIP LDM state dict (whole or partial), ``None`` for any other — the one
    test every reader uses (the key map, ``inspect``, the single-file loader, the merge engine).

    unCLIP: a UNet ``model.diffusion_model.label_emb.0.0.weight`` beside SD2's OpenCLIP text encoder
    (``cond_stage_model.model.``) or beside the unCLIP image embedder / noise augmentor (``embedder.model.`` /
    ``noise_augmentor.``, so a file pruned of its text encoder is still one). SDXL's ``label_emb`` sits beside
    ``conditioner.embedders.``: never unCLIP. The variant: the width of A1111's marker
    ``embedder.model.ln_final.weight`` (768: L, else H), else the image-embedding width D (the ``label_emb``
    input is 2D; :func:`variant_of_width`), else H. ``shapes``: ``{key: shape}`` or ``{key: tensor}``.
    """
    label = shapes.get("model.diffusion_model.label_emb.0.0.weight")
    if label is None or any(k.startswith("conditioner.embedders.") for k in shapes):
        return None
    if not any(k.startswith(("cond_stage_model.model.", EMBEDDER_PREFIX, NOISE_AUGMENTOR_PREFIX)) for k in shapes):
        return None
    marker = shapes.get(A1111_MARKER)
    marker_shape = tuple(marker.shape) if isinstance(marker, Tensor) else tuple(marker or ())
    label_shape = tuple(label.shape) if isinstance(label, Tensor) else tuple(label)
    if marker_shape:
        return variant_of_width(marker_shape[0])
    return variant_of_width(label_shape[1] // 2) if len(label_shape) == 2 else "h"


def unclip_info(state: Mapping[str, Tensor]) -> UnclipFile | None:
    """The unCLIP parts of an LDM state dict, or ``None`` for a file without them (:func:`unclip_variant`).

    Raises:
        WeightFileError: a ``label_emb`` that is no Linear weight, or an odd input width (unCLIP concatenates
            embedding and level: 2D).
    """
    variant = unclip_variant(state)
    if variant is None:
        return None
    label = state["model.diffusion_model.label_emb.0.0.weight"]
    if label.dim() != 2:
        raise WeightFileError(f"model.diffusion_model.label_emb.0.0.weight has shape {tuple(label.shape)}: an unCLIP "
                              "UNet's label_emb.0.0 is a Linear weight (out, 2D); the file is corrupt")
    width = int(label.shape[1])
    if width % 2:
        raise WeightFileError(f"model.diffusion_model.label_emb.0.0.weight takes {width} inputs: an unCLIP UNet takes "
                              "[image embedding ‖ noise-level embedding] (2D, even)")
    schedule = state.get(NOISE_AUGMENTOR_PREFIX + "alphas_cumprod")
    return UnclipFile(variant, width // 2, None if schedule is None else schedule.detach().float().clone(),
                      any(k.startswith(VISUAL_PREFIX) for k in state))


def plan_clip_vision(shapes: Mapping[str, tuple[int, ...]], builder: PlanBuilder, *, to: str, source_prefix: str,
                     target_prefix: str) -> None:
    """Plan CLIP vision-tower keys (LDM ``embedder.model.visual.`` <-> diffusers ``image_encoder.``) by
    :data:`VISION_RULES`; unknown keys go to the report's unmatched. Going to diffusers, transformers'
    ``position_ids`` buffer some writers keep is dropped (a non-persistent buffer there)."""
    if to == "ldm":
        stray = [k for k in shapes if k.endswith("embeddings.position_ids")]
        builder.drop(stray, "a transformers position_ids buffer (OpenCLIP / OpenAI CLIP vision towers have none)")
        shapes = {k: v for k, v in shapes.items() if k not in stray}
    left = plan_by_rules(VISION_RULES, shapes, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix)
    builder.unmatched.extend(left)


def image_encoder_config(state: Mapping[str, Tensor], *, variant: str) -> dict:
    """``CLIPVisionConfig(**config)`` arguments from a diffusers-named image-encoder state (no prefix).

    Read from the shapes: width W (``patch_embedding`` out), patch size, image size (``patch ·
    √(positions − 1)``), depth, MLP width, projection D. Fixed by the variant: the activation (H
    OpenCLIP: GELU; L OpenAI CLIP: QuickGELU); heads: 16 for W 1280 (ViT-H-14's 80-wide heads) and
    1024 (ViT-L/14), 12 for 768, else W / 64.

    Raises:
        WeightFileError: keys every CLIP vision tower has are missing.
    """
    if variant not in ("h", "l"):
        raise ValueError(f"variant must be 'h' or 'l', got {variant!r}")
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]  # (W, 3, p, p)
        positions = state["vision_model.embeddings.position_embedding.weight"]  # (1 + (S/p)², W)
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]  # (I, W)
        projection = state["visual_projection.weight"]  # (D, W)
    except KeyError as exc:
        raise WeightFileError(f"the unCLIP image encoder lacks {exc.args[0]!r} (embedder.model.visual.*)") from None
    width, side = int(patch.shape[0]), int(patch.shape[-1])
    grid = math.isqrt(int(positions.shape[0]) - 1)
    if grid * grid != int(positions.shape[0]) - 1:
        raise WeightFileError(f"the unCLIP image encoder's {positions.shape[0]} positions are not 1 + a square grid")
    layers = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
    return {
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": _HEADS.get(width, max(1, width // 64)),
        "image_size": grid * side,
        "patch_size": side,
        "projection_dim": int(projection.shape[0]),
        "hidden_act": "quick_gelu" if variant == "l" else "gelu",
        "layer_norm_eps": 1e-5,
    }


def normalizer_file(folder: str | os.PathLike) -> Path | None:
    """The ``StableUnCLIPImageNormalizer`` weights of a diffusers unCLIP folder or of its ``image_normalizer/``
    folder (``diffusion_pytorch_model.safetensors``, else ``.bin``), or ``None`` when there are none."""
    root = Path(folder)
    for where in (root, root / "image_normalizer"):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (where / name).is_file():
                return where / name
    return None


def read_clip_stats(path: str | os.PathLike, *, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """The CLIP image-embedding ``(mean (1, D), std (1, D))`` float32 of a stats file.

    Takes karlo's ``ViT-L-14_stats.th`` (``torch.save((mean, std))``, read with
    ``torch.load(weights_only=True)``, as diffusers' ``clip_stats_path`` and the LDM config's
    ``clip_stats_path``), or a ``StableUnCLIPImageNormalizer`` file (``mean`` / ``std``, e.g. a diffusers
    unCLIP folder's ``image_normalizer/diffusion_pytorch_model.safetensors``), or that folder itself.

    Raises:
        WeightFileError: unreadable, not two tensors, widths that differ or differ from ``dim``, or a
            ``std`` with a value <= 0.
    """
    source = Path(path)
    if source.is_dir():
        found = normalizer_file(source)
        if found is None:
            raise WeightFileError(f"{source}: no image_normalizer weights (diffusion_pytorch_model.safetensors) here; "
                                  "--clip-stats takes karlo's ViT-L-14_stats.th or an image_normalizer file/folder")
        source = found
    tensors, _ = read_weights(source)
    if {"mean", "std"} <= set(tensors):
        mean, std = tensors["mean"], tensors["std"]
    elif set(tensors) == {"0", "1"}:  # (karlo's torch.save((mean, std)), flattened by read_weights)
        mean, std = tensors["0"], tensors["1"]
    else:
        raise WeightFileError(f"{source}: not CLIP stats (expected karlo's (mean, std) pair or 'mean' / 'std' tensors, "
                              f"found {', '.join(sorted(tensors)[:5]) or 'nothing'})")
    mean, std = mean.detach().float().reshape(1, -1), std.detach().float().reshape(1, -1)
    if mean.shape != std.shape:
        raise WeightFileError(f"{source}: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in width")
    if dim is not None and mean.shape[1] != dim:
        raise WeightFileError(f"{source}: CLIP stats of width {mean.shape[1]}, this model's image embedding is {dim} wide "
                              "(SD 2.1 unCLIP-L takes karlo's ViT-L-14_stats.th, 768)")
    if not bool((std > 0).all()):
        raise WeightFileError(f"{source}: the std has values <= 0; the embeddings are divided by it")
    return mean, std


def ldm_cosine_alphas_cumprod(steps: int = 1000) -> Tensor:
    """(steps,) float64: LDM's ``make_beta_schedule("squaredcos_cap_v2")`` (``betas_for_alpha_bar``, β capped at
    0.999) cumulated as ``register_schedule`` does, the unCLIP noise augmentor's schedule
    (:func:`sdadapt.training.diffusion.noise_schedule`'s ``"cosine"``)."""
    from ..training import diffusion

    return diffusion.alphas_cumprod_of(diffusion.noise_schedule("cosine", num_steps=steps))


def noise_augmentor_buffers(alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """The ``noise_augmentor.*`` buffers LDM's ``register_schedule`` derives from a schedule (float64 math,
    float32 tensors, ``upscaling.py:18``), for writing an unCLIP LDM file: ``{key: (T',)}``. A float32 schedule
    within 1e-6 of the cosine one is taken as LDM's float64 cosine schedule (:func:`ldm_cosine_alphas_cumprod`)."""
    ac = alphas_cumprod.detach().double().cpu()
    cosine = ldm_cosine_alphas_cumprod(int(ac.shape[0])) if ac.ndim == 1 and ac.shape[0] > 1 else None
    if cosine is not None and torch.allclose(ac, cosine, rtol=0, atol=1e-6):
        ac = cosine
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / prev
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
    }
    return {NOISE_AUGMENTOR_PREFIX + name: values[name].float() for name in _AUGMENTOR_BUFFERS}


def _gaussian_blur(x: Tensor, kernel: tuple[int, int], sigma: tuple[float, float]) -> Tensor:
    """kornia's ``gaussian_blur2d`` (reflect border; a normalised separable kernel, x then y)."""
    def kernel1d(size: int, s: float) -> Tensor:
        t = torch.arange(size, dtype=x.dtype, device=x.device) - size // 2
        if size % 2 == 0:
            t = t + 0.5
        g = torch.exp(-t.pow(2) / (2 * s * s))
        return g / g.sum()

    c = x.shape[1]
    kx, ky = kernel1d(kernel[1], sigma[1]), kernel1d(kernel[0], sigma[0])
    x = F.pad(x, (kernel[1] // 2, (kernel[1] - 1) // 2, 0, 0), mode="reflect")
    x = F.conv2d(x, kx.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, kernel[0] // 2, (kernel[0] - 1) // 2), mode="reflect")
    return F.conv2d(x, ky.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


#: OpenAI CLIP's pixel mean / std (the LDM embedders' ``mean`` / ``std`` buffers)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def ldm_clip_pixels(images: Tensor, *, size: int = 224) -> Tensor:
    """The LDM unCLIP embedders' ``preprocess`` (``FrozenOpenCLIPImageEmbedder`` / ``ClipImageEmbedder``,
    stablediffusion ``ldm/modules/encoders/modules.py:157``, what A1111 feeds): images (B, 3, H, W) in
    [-1, 1] -> CLIP pixel values (B, 3, size, size) float32.

    ``kornia.geometry.resize(x, (size, size), interpolation="bicubic", align_corners=True,
    antialias=True)`` — a squash, no crop: when shrinking, a Gaussian blur first (σ = (factor − 1) / 2
    per side, kernel ``int(max(4σ, 3))`` made odd, reflect border), then ``F.interpolate`` bicubic with
    ``align_corners=True`` — then ``(x + 1) / 2`` and the CLIP mean / std.
    """
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        factors = (h / size, w / size)
        if max(factors) > 1:  # (kornia blurs only when downscaling)
            sigmas = (max((factors[0] - 1.0) / 2.0, 0.001), max((factors[1] - 1.0) / 2.0, 0.001))
            ks = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
            ks = tuple(k + 1 if k % 2 == 0 else k for k in ks)
            x = _gaussian_blur(x, ks, sigmas)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(_CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
