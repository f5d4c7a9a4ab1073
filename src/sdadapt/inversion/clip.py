"""CLIP inversion: learn vectors in an image-embedding conditioning space from a few images.

Textual inversion learns token vectors in the text encoder's input space; CLIP inversion learns
``K`` vectors (K, D) in the space of the image embedding an image-conditioned model takes, with
the shared :func:`sdadapt.training.step.train_step` (the denoising loss, the model frozen). Where
the model also takes text, the vectors mix with a prompt at generation.

Where the image embedding enters (:class:`ImageConditioning`, ``site``):

| site | models | image input | unconditional | text |
|---|---|---|---|---|
| ``"time-embedding"`` | the shipped toy ``toy-v1`` (weakly: it saw image embeddings on 25 % of its samples) | ``e`` (B, D), projected and added to the time embedding | zeros | yes |
| ``"time-embedding+token"`` | the toy image variant ``toy-image`` | as above, and one extra cross-attention token ``image_token_proj(e)`` after the text | zeros | yes |
| ``"class-labels"`` | SD 2.1 unCLIP UNets (``class_embed_type="projection"``) | ``[noise(e, level) ‖ sinusoid(level)]`` (B, 2D) as ``class_labels`` | zeros (B, 2D) | yes |
| ``"cross-attention"`` | image-variation UNets (lambdalabs ``sd-image-variations``) | ``e`` as a K-token ``encoder_hidden_states`` (B, K, D) | zeros | no |

unCLIP's noise augmentation (``noise_image_embeddings`` of diffusers' unCLIP pipelines, FORMATS §8)
is :func:`noise_image_embeddings`: normalise with the model's image normaliser, ``add_noise`` at
``noise_level`` on the image-noising schedule (cosine, 1000 steps), un-normalise, append the
level's sinusoidal embedding. Training draws fresh noise at the *same* level as generation
(``noise_level``, default 0 as the pipelines), so the vectors are learnt under what the model sees.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..formats.files import WeightFileError, read_safetensors, write_safetensors
from ..training import diffusion
from ..training.optim import lr_at, set_lr
from ..training.step import StepConfig, TrainState, train_step
from .core import Progress
from .variation import ImageVariationSystem

if TYPE_CHECKING:
    from ..samplers.a1111_noise import A1111Noise, A1111Seeds
    from ..samplers.schedules import ScheduleOptions

__all__ = [
    "SITES",
    "NoImageConditioningError",
    "ImageConditioning",
    "ImageVectors",
    "sinusoidal_embedding",
    "noise_image_embeddings",
    "toy_image_conditioning",
    "unclip_image_conditioning",
    "image_variation_conditioning",
    "image_conditioning",
    "clip_pixel_values",
    "clip_image_encoder",
    "load_image_encoder",
    "learn_image_vectors",
    "sample_image_vectors",
    "clip_invert",
    "generate_with_vectors",
    "save_image_vectors",
    "load_image_vectors",
]

SITES = ("time-embedding", "time-embedding+token", "class-labels", "cross-attention")
_FORMAT = "sdadapt-clip-inversion/1"
Model = Callable[[Tensor, Tensor, Any], Tensor]

MODELS_WITH_IMAGE_CONDITIONING = (
    "the toy image variant (`--model toy-image`, sdadapt.toy.image_variant.load_toy_image(); any toy-system file), "
    "SD 2.1 unCLIP UNets (class_embed_type='projection': sdadapt.inversion.unclip_image_conditioning(unet, text=...)) "
    "and image-variation UNets that take CLIP image embeddings as cross-attention tokens (a lambdalabs "
    "sd-image-variations diffusers folder: sdadapt.inversion.load_image_variation(folder); any such UNet: "
    "sdadapt.inversion.image_variation_conditioning(unet))"
)


class NoImageConditioningError(ValueError):
    """The model has no image-embedding input; the message names the models that have one."""


# ------------------------------------------------------------------------------ pure math
def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) -> (B, dim): ``[cos(t·f_j) ‖ sin(t·f_j)]``, ``f_j = 10000^(−j/(dim/2))`` (diffusers'
    ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def noise_image_embeddings(
    embeds: Tensor,
    noise_level: int,
    *,
    noise: Tensor,
    alphas_cumprod: Tensor,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> Tensor:
    """unCLIP's noise augmentation (B, D) -> (B, 2D).

    ``ê = √ᾱ_l·(e − μ)/σ + √(1 − ᾱ_l)·n``, output ``[σ·ê + μ ‖ sinusoid(l)]`` with ``ᾱ`` the
    image-noising schedule, ``l = noise_level`` and ``μ, σ`` (1, D) the model's image normaliser
    (default 0 and 1). ``noise`` is (B, D) standard normal.
    """
    b, d = embeds.shape
    mu = embeds.new_zeros(1, d) if mean is None else mean.to(embeds)
    sigma = embeds.new_ones(1, d) if std is None else std.to(embeds)
    level = torch.full((b,), int(noise_level), dtype=torch.long, device=embeds.device)
    scaled = (embeds - mu) / sigma  # (B, D)
    noised = diffusion.add_noise(scaled, noise.to(scaled), level, alphas_cumprod)
    return torch.cat([noised * sigma + mu, sinusoidal_embedding(level, d).to(embeds.dtype)], dim=1)


# ------------------------------------------------------------------------------ the sites
@dataclass(frozen=True)
class ImageConditioning:
    """How image embeddings (and text) enter one model.

    ``model(x, t, cond)`` takes ``cond = {"context": text states (B, L, E) or None, "image": the
    image input}``; :meth:`condition` builds that from vectors (B, K, D) and prompts.

    Attributes:
        site: one of :data:`SITES`.
        dim: D, the image-embedding width.
        model: the denoiser over the condition dict above.
        text: ``prompts -> (B, L, E)`` text states, or ``None`` when the model takes no text.
        encode_image: ``images (B, 3, H, W) in [-1, 1] -> (B, D)`` when an image encoder is at hand
            (e.g. :func:`clip_image_encoder`; initialises vectors at the training images' mean embedding).
        noise_level: unCLIP's augmentation level used in training and generation (class-labels site).
        noise_alphas_cumprod: (T',) the image-noising schedule (class-labels site).
        normalizer: ``(mean (1, D), std (1, D))`` of the model's image normaliser (class-labels site).
        sampler: extra :func:`~sdadapt.training.diffusion.ddim_sample` options for this model
            (:func:`sample_image_vectors` passes them with ``sampler="ddim"`` only).
        modules: the model's modules; :func:`learn_image_vectors` freezes them while it trains
            (and restores their ``requires_grad`` flags), so no gradient reaches the weights.
    """

    site: str
    dim: int
    model: Model
    text: Callable[[list[str]], Tensor] | None = None
    encode_image: Callable[[Tensor], Tensor] | None = None
    noise_level: int = 0
    noise_alphas_cumprod: Tensor | None = None
    normalizer: tuple[Tensor, Tensor] | None = None
    sampler: Mapping[str, Any] = field(default_factory=dict)
    modules: tuple[nn.Module, ...] = ()

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if self.site == "class-labels":
            if self.noise_alphas_cumprod is None:
                raise ValueError("the class-labels site needs noise_alphas_cumprod (the image-noising schedule)")
            if not 0 <= self.noise_level < self.noise_alphas_cumprod.shape[0]:
                raise ValueError(f"noise_level must be in [0, {self.noise_alphas_cumprod.shape[0] - 1}], got {self.noise_level}")

    @property
    def max_vectors(self) -> int | None:
        """1 where the model takes one embedding per sample; ``None`` (any) for cross-attention tokens."""
        return None if self.site == "cross-attention" else 1

    def check_vectors(self, vectors: Tensor) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"image vectors must be (K, {self.dim}) for this model, got {tuple(vectors.shape)}")
        if self.max_vectors is not None and vectors.shape[0] > self.max_vectors:
            raise ValueError(f"this model ({self.site} site) takes one image embedding per sample; use num_vectors=1 "
                             "(several vectors need a model that reads image embeddings as cross-attention tokens)")

    def image_input(self, vectors: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Vectors (B, K, D) -> the model's image input (see the table in the module docs)."""
        if self.site == "cross-attention":
            return vectors  # (B, K, D)
        e = vectors[:, 0]  # (B, D)
        if self.site in ("time-embedding", "time-embedding+token"):
            return e
        noise = torch.randn(e.shape, generator=generator, device=generator.device if generator else None).to(e)
        mean, std = self.normalizer if self.normalizer is not None else (None, None)
        return noise_image_embeddings(e, self.noise_level, noise=noise, alphas_cumprod=self.noise_alphas_cumprod.to(e.device),  # type: ignore[union-attr]
                                      mean=mean, std=std)

    def null_image_input(self, batch: int, *, like: Tensor) -> Tensor:
        """The unconditional image input: zeros of the image input's shape (unCLIP: the whole (B, 2D))."""
        if self.site == "cross-attention":
            return like.new_zeros(batch, 1, self.dim)
        return like.new_zeros(batch, self.dim * (2 if self.site == "class-labels" else 1))

    def text_states(self, prompts: list[str] | None, batch: int) -> Tensor | None:
        if self.text is None:
            if prompts and any(p for p in prompts):
                raise ValueError("this model takes no text (image embeddings only); leave the prompt out")
            return None
        return self.text(list(prompts) if prompts is not None else [""] * batch)

    def condition(self, vectors: Tensor | None, text: Tensor | None, *, batch: int, like: Tensor,
                  generator: torch.Generator | None = None) -> dict[str, Tensor | None]:
        """``{"context": text, "image": image_input(vectors) or the null input}``."""
        image = self.null_image_input(batch, like=like) if vectors is None else self.image_input(vectors, generator=generator)
        return {"context": text, "image": image}


def toy_image_conditioning(system) -> ImageConditioning:
    """The toy system's image input ``image_embeds``: the toy-CLIP embedding (B, 64), added to the
    time embedding (and, in the image variant, also read as a cross-attention token)."""
    denoiser = system.denoiser()

    def model(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return denoiser(x, t, {"context": cond["context"], "image_embeds": cond["image"]})

    return ImageConditioning(
        site="time-embedding+token" if system.unet.config.get("image_token") else "time-embedding",
        dim=int(system.unet.config["image_embed_dim"]), model=model,
        text=lambda prompts: system.condition(prompts)["context"], encode_image=system.clip.encode_image,
        sampler=dict(system.ddim_options), modules=(system.unet, system.text_encoder),
    )


def _unet_config(unet) -> Any:
    config = getattr(unet, "config", None)
    if config is None:
        raise TypeError(f"expected a diffusers UNet2DConditionModel (with .config), got {type(unet).__name__}")
    return config


def unclip_image_conditioning(
    unet,
    *,
    text: Callable[[list[str]], Tensor] | None = None,
    noise_level: int = 0,
    image_normalizer: nn.Module | tuple[Tensor, Tensor] | None = None,
    noise_schedule: Tensor | None = None,
    encode_image: Callable[[Tensor], Tensor] | None = None,
) -> ImageConditioning:
    """SD 2.1 unCLIP: image embeddings enter as noise-augmented ``class_labels`` (B, 2D).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` with ``class_embed_type="projection"``
            (``projection_class_embeddings_input_dim = 2D``).
        text: prompts -> ``encoder_hidden_states`` (B, L, E) (the pipeline's text encoder);
            ``None`` conditions on zeros of the cross-attention width.
        noise_level: the augmentation level (0..999; the pipelines' default 0).
        image_normalizer: the pipeline's ``StableUnCLIPImageNormalizer`` (or ``(mean, std)``);
            default identity.
        noise_schedule: (T',) ``alphas_cumprod`` of the image-noising scheduler (default: cosine
            ``squaredcos_cap_v2``, 1000 steps, as SD 2.1 unCLIP's).

    Raises:
        NoImageConditioningError: the UNet has no projection class embedding.
    """
    config = _unet_config(unet)
    if getattr(config, "class_embed_type", None) != "projection" or not getattr(config, "projection_class_embeddings_input_dim", None):
        raise NoImageConditioningError(
            f"this UNet has class_embed_type={getattr(config, 'class_embed_type', None)!r}: it takes no unCLIP image "
            f"embedding (needs class_embed_type='projection'). Models with image-embedding conditioning: {MODELS_WITH_IMAGE_CONDITIONING}"
        )
    width = int(config.projection_class_embeddings_input_dim)
    if width % 2:
        raise ValueError(f"projection_class_embeddings_input_dim={width} is odd; unCLIP concatenates [embedding, level] (2D)")
    if isinstance(image_normalizer, nn.Module):
        normalizer = (image_normalizer.mean.detach(), image_normalizer.std.detach())
    else:
        normalizer = image_normalizer
    schedule = noise_schedule if noise_schedule is not None else diffusion.alphas_cumprod_of(
        diffusion.noise_schedule("cosine", num_steps=1000)).float()
    cross = int(config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else config.cross_attention_dim[0])

    def model(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        context = cond["context"]
        if context is None:
            context = x.new_zeros(x.shape[0], 1, cross)
        return unet(x, t, encoder_hidden_states=context, class_labels=cond["image"]).sample

    return ImageConditioning(site="class-labels", dim=width // 2, model=model, text=text, encode_image=encode_image,
                             noise_level=noise_level, noise_alphas_cumprod=schedule, normalizer=normalizer, modules=(unet,))


def image_variation_conditioning(unet, *, encode_image: Callable[[Tensor], Tensor] | None = None) -> ImageConditioning:
    """Image-variation UNets (lambdalabs ``sd-image-variations``): the CLIP image embedding as a
    1-token (here K-token) ``encoder_hidden_states`` (B, K, D), no text; ``D = cross_attention_dim``."""
    config = _unet_config(unet)
    dim = config.cross_attention_dim
    dim = int(dim if isinstance(dim, int) else dim[0])

    def model(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return unet(x, t, encoder_hidden_states=cond["image"]).sample

    return ImageConditioning(site="cross-attention", dim=dim, model=model, text=None, encode_image=encode_image,
                             modules=(unet,))


# ------------------------------------------------------------------- the model's CLIP image encoder
#: CLIPImageProcessor's defaults (what diffusers' convert_from_ckpt builds for unCLIP folders)
_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's BILINEAR, BICUBIC


def _size_pair(value: Any, *, name: str, shortest: bool) -> tuple[str, int, int]:
    """``("short", s, s)`` or ``("exact", h, w)`` from a preprocessor ``size``/``crop_size`` entry
    (an int: the shortest edge for ``size``, a square for ``crop_size``, as transformers reads them)."""
    if isinstance(value, int):
        return ("short", value, value) if shortest else ("exact", value, value)
    if isinstance(value, Mapping):
        if set(value) & {"longest_edge", "max_height", "max_width"}:
            raise ValueError(f"preprocessor {name}={dict(value)}: only shortest_edge or height/width sizes are supported")
        if value.get("shortest_edge") is not None:
            return "short", int(value["shortest_edge"]), int(value["shortest_edge"])
        if value.get("height") is not None and value.get("width") is not None:
            return "exact", int(value["height"]), int(value["width"])
    raise ValueError(f"preprocessor {name}={value!r}: expected an int, {{'shortest_edge': N}} or {{'height': H, 'width': W}}")


def _pil_resize(pixels: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """8-bit pixel values (B, 3, H, W) (floats holding integers) -> (B, 3, h, w) as PIL's
    ``Image.resize`` makes them: antialiased filter (support scaled on downscaling, bicubic
    a = −0.5), the horizontal pass first, each pass clipped and rounded to 8 bits."""
    h, w = size
    if pixels.shape[-1] != w:
        pixels = torch.nn.functional.interpolate(pixels, size=(pixels.shape[-2], w), mode=mode, antialias=True, align_corners=False)
        pixels = torch.floor(pixels.clamp(0, 255) + 0.5)
    if pixels.shape[-2] != h:
        pixels = torch.nn.functional.interpolate(pixels, size=(h, w), mode=mode, antialias=True, align_corners=False)
        pixels = torch.floor(pixels.clamp(0, 255) + 0.5)
    return pixels


def _center_crop(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """transformers' ``center_crop`` (B, 3, H, W) -> (B, 3, h, w): top/left ``(H − h) // 2``;
    zero-padded (the padding centred, ``ceil``) where the image is smaller than the crop."""
    crop_h, crop_w = size
    height, width = pixels.shape[-2:]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    if (new_h, new_w) != (height, width):
        pixels = torch.nn.functional.pad(pixels, (left_pad, new_w - width - left_pad, top_pad, new_h - height - top_pad))
    top, left = (height - crop_h) // 2 + top_pad, (width - crop_w) // 2 + left_pad
    return pixels[..., max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def clip_pixel_values(images: Tensor, *, config: Mapping[str, Any] | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> CLIP ``pixel_values`` (B, 3, h, w) float32, as
    transformers' ``CLIPImageProcessor`` (its PIL backend) makes them from the 8-bit images.

    ``config``: a ``preprocessor_config.json`` (missing keys: ``CLIPImageProcessor``'s defaults —
    shortest side to 224, bicubic, centre crop 224, ×1/255, CLIP mean/std). Steps: the 8-bit pixels
    ``round((x + 1)·127.5)`` (as :func:`sdadapt.images.to_uint8`); resize the shortest side to
    ``size`` (the long side ``int(size·long/short)``) with PIL's antialiased filter, each pass
    rounded to 8 bits; centre crop ``crop_size``; ``·rescale_factor`` (float64, then float32);
    ``(x − image_mean)/image_std`` in float32. Against the real processor (measured in the tests):
    identical where no resize is needed; after a shortest-side resize at most one 8-bit level off
    on a few pixels (Pillow's fixed-point filter weights). An exact ``{"height", "width"}`` size
    that shrinks one side and enlarges the other can differ more (Pillow's pass order there).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    c = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in dict(config or {}).items() if v is not None}}
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()  # (B, 3, H, W) 8-bit values
    if c["do_resize"]:
        mode = _RESAMPLE.get(int(c["resample"]))
        if mode is None:
            raise ValueError(f"preprocessor resample={c['resample']}: only 2 (bilinear) and 3 (bicubic, CLIP's) are supported")
        kind, a, b = _size_pair(c["size"], name="size", shortest=True)
        if kind == "short":
            height, width = pixels.shape[-2:]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(a * long / short)
            new_size = (new_long, a) if width <= height else (a, new_long)
        else:
            new_size = (a, b)
        pixels = _pil_resize(pixels, new_size, mode)
    if c["do_center_crop"]:
        _, crop_h, crop_w = _size_pair(c["crop_size"], name="crop_size", shortest=False)
        pixels = _center_crop(pixels, (crop_h, crop_w))
    if c["do_rescale"]:
        pixels = (pixels.double() * float(c["rescale_factor"])).float()
    if c["do_normalize"]:
        mean = torch.tensor(c["image_mean"], dtype=torch.float32, device=pixels.device).reshape(1, -1, 1, 1)
        std = torch.tensor(c["image_std"], dtype=torch.float32, device=pixels.device).reshape(1, -1, 1, 1)
        pixels = (pixels - mean) / std
    return pixels.float()


def clip_image_encoder(folder: str | os.PathLike) -> Callable[[Tensor], Tensor]:
    """The CLIP image encoder of a diffusers unCLIP / image-variation folder, as its pipeline encodes
    images: ``images (B, 3, H, W) in [-1, 1] -> image_encoder(pixel_values).image_embeds (B, D)``
    float32 (``CLIPVisionModelWithProjection`` from ``image_encoder/``, :func:`clip_pixel_values`
    with ``feature_extractor/preprocessor_config.json``; projected, not normalised — diffusers'
    ``StableUnCLIPImg2ImgPipeline._encode_image`` / ``StableDiffusionImageVariationPipeline._encode_image``).

    The encoder loads (float32, local files only, pickles checked) at the first call, on the
    images' device. Needs ``transformers``.

    Raises:
        ValueError: the folder has no ``image_encoder/``.
    """
    root = Path(folder)
    encoder_dir = root / "image_encoder"
    if not encoder_dir.is_dir():
        raise ValueError(f"{root}: no image_encoder/ folder (a diffusers unCLIP or image-variation folder holds one, "
                         "a CLIPVisionModelWithProjection); use init='zeros' or pass encode_image=")
    config_file = root / "feature_extractor" / "preprocessor_config.json"
    settings = json.loads(config_file.read_text()) if config_file.is_file() else {}
    loaded: dict[str, nn.Module] = {}

    def encode(images: Tensor) -> Tensor:
        if "model" not in loaded:
            try:
                loaded["model"] = load_image_encoder(encoder_dir)
            except ImportError as exc:
                raise ImportError(f"{exc}; or start from zeros (init='zeros')") from None
        model = loaded["model"].to(images.device)
        with torch.no_grad():
            return model(pixel_values=clip_pixel_values(images, config=settings)).image_embeds.float()

    return encode


def load_image_encoder(folder: str | os.PathLike) -> nn.Module:
    """A diffusers ``image_encoder/`` folder's ``CLIPVisionModelWithProjection``: local files only, pickles refused
    first, float32 whatever the folder holds (cast after loading: transformers before 4.56 takes no ``dtype=``, and 5
    deprecates ``torch_dtype=``), frozen, in eval mode.

    Raises:
        ImportError: transformers is not installed.
    """
    try:
        from transformers import CLIPVisionModelWithProjection
    except ImportError:
        raise ImportError(f"{folder}: the CLIP image encoder needs transformers (pip install transformers)") from None
    from ..formats.pickles import check_folder_pickles

    check_folder_pickles(folder)
    model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    return model.float().requires_grad_(False).eval()


def _unclip_folder_parts(folder: Path, *, dim: int | None = None) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
    """The ``image_normalizer/`` ``(mean (1, D), std (1, D))`` and the ``image_noising_scheduler/``
    ``alphas_cumprod`` (T',) of a diffusers unCLIP folder (``None`` for a part the folder lacks).

    The normaliser is read by :func:`sdadapt.formats.unclip.read_clip_stats` (as ``--clip-stats``: equal widths,
    ``dim`` when given, std > 0). The schedule is built as diffusers' ``DDPMScheduler`` builds it from that config
    (its defaults for missing keys: linear, β 1e-4..0.02, 1000 steps).

    Raises:
        WeightFileError: a normaliser file that is not CLIP stats of width ``dim`` with a positive std.
    """
    from ..formats.unclip import normalizer_file, read_clip_stats

    normalizer = None
    if (folder / "image_normalizer").is_dir() and normalizer_file(folder / "image_normalizer") is not None:
        normalizer = read_clip_stats(folder / "image_normalizer", dim=dim)
    schedule = None
    config_file = folder / "image_noising_scheduler" / "scheduler_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("trained_betas") is not None:  # (DDPMScheduler's own rule: the betas as given)
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
            return normalizer, diffusion.alphas_cumprod_of(betas).float()
        name = config.get("beta_schedule", "linear")
        betas = diffusion.noise_schedule(
            {"squaredcos_cap_v2": "cosine"}.get(name, name), num_steps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
        schedule = diffusion.alphas_cumprod_of(betas).float()
    return normalizer, schedule


def image_conditioning(system, *, noise_level: int = 0) -> ImageConditioning:
    """The image-embedding conditioning of a system (toy: time embedding; a diffusers system whose
    UNet has ``class_embed_type="projection"``: unCLIP, with its ``image_normalizer`` — the
    system's attribute, else the ``image_normalizer/`` of the folder it was loaded from — the
    folder's ``image_noising_scheduler/`` schedule, as the unCLIP pipelines load them, and its
    ``image_encoder/`` as ``encode_image`` (:func:`clip_image_encoder`); an
    :class:`~sdadapt.inversion.variation.ImageVariationSystem`: the cross-attention site
    (:func:`image_variation_conditioning`) with its folder's ``image_encoder/``, as
    ``StableDiffusionImageVariationPipeline`` encodes images).

    Raises:
        ValueError: ``noise_level > 0`` on an unCLIP system loaded from a file or folder that
            holds no image normaliser (identity stats would be wrong there), or on an
            image-variation system (it has no noise augmentation).
        NoImageConditioningError: the system's model has no image-embedding input; the message
            lists the models that have one.
    """
    unet = getattr(system, "unet", None)
    if unet is not None and hasattr(unet, "image_embedding") and hasattr(system, "clip"):  # the toy UNet
        return toy_image_conditioning(system)
    if isinstance(system, ImageVariationSystem):
        if noise_level:
            raise ValueError(f"noise_level={noise_level}: image-variation models take the CLIP image embedding as it is "
                             "(no noise augmentation, which is SD unCLIP's); use noise_level=0")
        return image_variation_conditioning(system.unet, encode_image=clip_image_encoder(system.source))
    config = getattr(unet, "config", None)
    if config is not None and getattr(config, "class_embed_type", None) == "projection":
        normalizer, schedule, encode_image = getattr(system, "image_normalizer", None), None, None
        source = getattr(system, "source", None)
        parts = getattr(system, "unclip", None)
        if parts is not None:  # a loaded unCLIP file or folder's parts (sdadapt.unclip.UnclipParts)
            normalizer = normalizer if normalizer is not None else parts.normalizer
            schedule = parts.noise_alphas_cumprod
            encode_image = parts.encode_image if parts.has_encoder else None
        elif source is not None and Path(source).is_dir():  # a diffusers unCLIP folder: its noise-augmentation parts
            folder_normalizer, schedule = _unclip_folder_parts(
                Path(source), dim=int(config.projection_class_embeddings_input_dim) // 2)
            normalizer = normalizer if normalizer is not None else folder_normalizer
            if (Path(source) / "image_encoder").is_dir():  # its CLIP image encoder (loaded at the first use)
                encode_image = clip_image_encoder(source)
        if normalizer is None and noise_level > 0 and source is not None:
            raise ValueError(
                f"{source}: this unCLIP model has no image normaliser (the CLIP-embedding mean/std a diffusers unCLIP "
                "folder keeps in image_normalizer/; LDM holds them in non-persistent noise_augmentor buffers, so a "
                f"single-file checkpoint lacks them): noise_level={noise_level} would noise un-normalised embeddings. "
                "For an SD 2.1 unCLIP-L file pass karlo's ViT-L-14_stats.th as --clip-stats FILE (clip_stats= when "
                "loading), load a diffusers unCLIP folder with image_normalizer/, set system.image_normalizer = "
                "(mean (1, D), std (1, D)), or use noise_level=0")
        return unclip_image_conditioning(
            unet, text=lambda prompts: system.condition(system.tokenize(prompts)), noise_level=noise_level,
            image_normalizer=normalizer, noise_schedule=schedule, encode_image=encode_image,
        )
    raise NoImageConditioningError(
        f"{type(system).__name__} has no image-embedding conditioning: its UNet takes text only, so there is no "
        f"image-embedding space to invert into. Models that have one: {MODELS_WITH_IMAGE_CONDITIONING}"
    )


# ------------------------------------------------------------------------------ training
def learn_image_vectors(
    conditioning: ImageConditioning,
    latents: Tensor,
    *,
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    captions: list[str] | None = None,
    num_vectors: int = 1,
    init: Tensor | None = None,
    steps: int = 300,
    learning_rate: float = 5e-2,
    batch_size: int = 4,
    warmup_steps: int = 20,
    min_snr_gamma: float | None = 5.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Tensor, list[float]]:
    """Learn ``num_vectors`` image-space vectors (K, D) from clean latents (N, C, h, w).

    Each step: a batch of latents, their text states (``captions``, default the empty prompt),
    the vectors through :meth:`ImageConditioning.image_input` (fresh unCLIP noise at
    ``noise_level``), :func:`~sdadapt.training.step.train_step` on the vectors only (AdamW, no
    weight decay, warm-up then cosine, min-SNR-γ). ``init`` (K, D) defaults to zeros (the
    unconditional input). The model's own weights get no gradients.

    Returns:
        (vectors (K, D) float32, losses per step).
    """
    n = latents.shape[0]
    if n < 1 or latents.ndim != 4:
        raise ValueError(f"need latents (N, C, h, w) with N >= 1, got {tuple(latents.shape)}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and learning_rate > 0, got {steps}, {batch_size}, {learning_rate}")
    start = torch.zeros(num_vectors, conditioning.dim) if init is None else init.detach().float().clone()
    conditioning.check_vectors(start)
    vectors = nn.Parameter(start.to(latents.device))
    with torch.no_grad():
        text = conditioning.text_states(captions, n)  # (N, L, E) or None
    optimizer = torch.optim.AdamW([vectors], lr=learning_rate, weight_decay=0.0)
    state = TrainState(seed=seed, device=latents.device)
    config = StepConfig(prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)
    pick = torch.Generator().manual_seed(seed + 1)
    augment = torch.Generator().manual_seed(seed + 2)

    def model(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
        batch_text = None if text is None else text[idx]
        cond = conditioning.condition(vectors[None].expand(x.shape[0], *vectors.shape), batch_text, batch=x.shape[0],
                                      like=x, generator=augment)
        return conditioning.model(x, t, cond)

    losses: list[float] = []
    params = [p for m in conditioning.modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for step in range(steps):
            set_lr(optimizer, lr_at(step, base_lr=learning_rate, schedule="cosine", warmup_steps=min(warmup_steps, steps - 1),
                                    total_steps=steps))
            idx = torch.randint(n, (batch_size,), generator=pick)
            metrics = train_step(model, {"latents": latents[idx.to(latents.device)], "cond": idx.to(latents.device)},
                                 params=[vectors], optimizer=optimizer, state=state, config=config, alphas_cumprod=alphas_cumprod)
            losses.append(float(metrics["loss"]))
            if progress is not None:
                progress(step + 1, steps, "clip-inversion")
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return vectors.detach().float(), losses


@torch.no_grad()
def sample_image_vectors(
    conditioning: ImageConditioning,
    vectors: Tensor | None,
    x_T: Tensor,
    *,
    alphas_cumprod: Tensor,
    prompts: list[str] | None = None,
    negative: str = "",
    guidance: float = 2.0,
    steps: int = 25,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    sampler: str = "ddim",
    karras: bool = False,
    schedule: str | None = None,
    schedule_options: ScheduleOptions | None = None,
    noise: A1111Noise | None = None,
) -> Tensor:
    """CFG sampling from noise ``x_T`` (B, C, h, w) conditioned on ``vectors`` (K, D) (``None``:
    text only) and ``prompts`` (B strings; default ``""``). The unconditional branch is
    ``(negative, zeros)``. ``generator`` draws unCLIP's augmentation noise (class-labels site;
    default: one seeded with 0), then the ancestral samplers' noise. Returns latents (B, C, h, w).

    ``sampler`` / ``karras`` / ``schedule``: :func:`sdadapt.samplers.sample_latents`' (any of its
    samplers and σ grids; default ``"ddim"``), run on ``conditioning.model`` with the image
    conditioning built here as ``cond`` / ``uncond``. ``conditioning.sampler`` (the toy's DDIM
    settings: ``final_alpha_cumprod``, ``clip_sample``) applies to ``ddim`` only. ``schedule_options``:
    A1111's σ settings for ``schedule`` (:class:`~sdadapt.samplers.schedules.ScheduleOptions`). ``noise``: an
    :class:`~sdadapt.samplers.a1111_noise.A1111Noise` whose start noise ``x_T`` is (``generate --noise``): the
    samplers' noise is then its next draws, and ``generator`` draws unCLIP's augmentation noise only.
    """
    from ..samplers import canonical_sampler, sample_latents

    name = canonical_sampler(sampler)
    b = x_T.shape[0]
    if vectors is not None:
        conditioning.check_vectors(vectors)
        vectors = vectors.to(x_T)[None].expand(b, *vectors.shape)
    if prompts is not None and len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
    if conditioning.text is None and negative:
        raise ValueError("this model takes no text (image embeddings only; the unconditional input is zeros): leave the "
                         "negative prompt out")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    cond = conditioning.condition(vectors, conditioning.text_states(prompts, b), batch=b, like=x_T, generator=generator)
    uncond = conditioning.condition(None, conditioning.text_states([negative] * b if conditioning.text else None, b),
                                    batch=b, like=x_T)
    if cond["image"] is not None and uncond["image"] is not None and cond["image"].shape != uncond["image"].shape:
        uncond["image"] = cond["image"].new_zeros(cond["image"].shape)  # K-token contexts: zeros of the same length
    return sample_latents(conditioning.model, x_T, cond, sampler=name, alphas_cumprod=alphas_cumprod, num_steps=steps,
                          uncond=uncond, guidance_scale=guidance, prediction_type=prediction_type, karras=karras,
                          schedule=schedule, generator=generator if noise is None else noise,
                          **({} if schedule_options is None else {"schedule_options": schedule_options}),
                          **(dict(conditioning.sampler) if name == "ddim" else {}))


# ------------------------------------------------------------------------ files and systems
@dataclass(frozen=True)
class ImageVectors:
    """Learnt image-space vectors and what they are for.

    Attributes:
        vectors: (K, D) float32.
        site: where they enter the model (:data:`SITES`).
        noise_level: unCLIP augmentation level they were learnt at (class-labels site).
        tokens: prompt words they are bound to (the toy ``clip-inversion`` method), else empty.
        info: extra string metadata (model, images, steps).
    """

    vectors: Tensor
    site: str
    noise_level: int = 0
    tokens: tuple[str, ...] = ()
    info: Mapping[str, str] = field(default_factory=dict)


def save_image_vectors(path: str | os.PathLike, vectors: ImageVectors, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``{"image_vectors": (K, D)}`` + metadata (``format`` sdadapt-clip-inversion/1, ``site``,
    ``dim``, ``num_vectors``, ``noise_level``, ``tokens`` JSON) as safetensors, atomically."""
    v = vectors.vectors.detach().float().cpu()
    if v.ndim != 2:
        raise ValueError(f"vectors must be (K, D), got {tuple(v.shape)}")
    meta = {**{str(k): str(val) for k, val in vectors.info.items()}, **dict(metadata or {}),
            "format": _FORMAT, "site": vectors.site, "dim": str(v.shape[1]), "num_vectors": str(v.shape[0]),
            "noise_level": str(int(vectors.noise_level)), "tokens": json.dumps(list(vectors.tokens))}
    return write_safetensors(path, {"image_vectors": v}, meta)


def load_image_vectors(path: str | os.PathLike) -> ImageVectors:
    """Read a file written by :func:`save_image_vectors`.

    Raises:
        WeightFileError: not a CLIP-inversion file (the message names the file).
    """
    file = Path(path)
    tensors, meta = read_safetensors(file)
    if meta.get("format") != _FORMAT or "image_vectors" not in tensors:
        raise WeightFileError(f"{file}: not an sdadapt CLIP-inversion file (metadata format {meta.get('format')!r}); "
                              "write one with save_image_vectors or `train clip-inversion`")
    reserved = {"format", "site", "dim", "num_vectors", "noise_level", "tokens"}
    try:
        return ImageVectors(vectors=tensors["image_vectors"].float(), site=meta["site"], noise_level=int(meta.get("noise_level", "0")),
                            tokens=tuple(json.loads(meta.get("tokens", "[]"))),
                            info={k: v for k, v in meta.items() if k not in reserved})
    except (KeyError, ValueError) as exc:
        raise WeightFileError(f"{file}: bad CLIP-inversion metadata ({exc})") from None


def clip_invert(
    system,
    images: Tensor,
    *,
    captions: list[str] | None = None,
    num_vectors: int = 1,
    init: str = "auto",
    steps: int = 300,
    learning_rate: float = 5e-2,
    batch_size: int = 4,
    noise_level: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> ImageVectors:
    """Learn image-space vectors for the concept shown by ``images`` (N, 3, H, W) in [-1, 1].

    ``captions`` (N) train the vectors *with* text (they then carry what the text does not say);
    default: the empty prompt (the vectors carry the whole concept). ``init``: ``"images"`` (the
    mean embedding of the images, needs an image encoder: the toy's CLIP, or the ``image_encoder/``
    of the diffusers unCLIP or image-variation folder the system was loaded from), ``"zeros"``, or
    ``"auto"`` (images when an encoder is at hand). An image-variation model takes no text: no
    ``captions`` there.

    Raises:
        NoImageConditioningError: the system has no image-embedding input.
    """
    conditioning = image_conditioning(system, noise_level=noise_level)
    if init not in ("auto", "images", "zeros"):
        raise ValueError(f"init must be 'auto', 'images' or 'zeros', got {init!r}")
    device = system.alphas_cumprod.device
    images = images.to(device)
    with torch.no_grad():
        latents = system.encode_images(images)
        start = None
        if init == "images" or (init == "auto" and conditioning.encode_image is not None):
            if conditioning.encode_image is None:
                raise ValueError("init='images' needs an image encoder; this model has none at hand: use init='zeros'")
            start = conditioning.encode_image(images).float().mean(0, keepdim=True).expand(num_vectors, -1)
    vectors, losses = learn_image_vectors(
        conditioning, latents, alphas_cumprod=system.alphas_cumprod, prediction_type=system.prediction_type,
        captions=captions, num_vectors=num_vectors, init=start, steps=steps, learning_rate=learning_rate,
        batch_size=batch_size, seed=seed, progress=progress,
    )
    info = {"images": str(images.shape[0]), "steps": str(steps), "learning_rate": repr(learning_rate),
            "init": "images" if start is not None else "zeros", "final_loss": f"{sum(losses[-10:]) / len(losses[-10:]):.5f}"}
    return ImageVectors(vectors=vectors.cpu(), site=conditioning.site, noise_level=noise_level, info=info)


def _latent_shape(system) -> tuple[int, ...]:
    """(C, h, w) of the system's latents: from the UNet and VAE configs, else by encoding a blank image."""
    unet, vae = getattr(system, "unet", None), getattr(system, "vae", None)
    if vae is not None and hasattr(getattr(unet, "config", None), "in_channels"):
        size = system.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        return (int(unet.config.in_channels), size, size)
    blank = torch.zeros(1, 3, system.image_size, system.image_size, device=system.alphas_cumprod.device)
    return tuple(system.encode_images(blank).shape[1:])


@torch.no_grad()
def generate_with_vectors(
    system,
    vectors: ImageVectors | Tensor | None,
    *,
    prompt: str = "",
    count: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 2.0,
    negative: str = "",
    sampler: str = "ddim",
    karras: bool = False,
    schedule: str | None = None,
    schedule_options: ScheduleOptions | None = None,
    noise: A1111Seeds | None = None,
) -> Tensor:
    """Images (count, 3, H, W) in [-1, 1] from image vectors (K, D), mixed with ``prompt`` where
    the model takes text. ``vectors=None`` samples from the prompt alone (same noise: a baseline).
    ``seed`` draws the starting noise, then unCLIP's augmentation noise (class-labels site), then
    the ancestral samplers' noise. ``sampler`` / ``karras`` / ``schedule`` / ``schedule_options``:
    :func:`sample_image_vectors`'. ``noise``: an :class:`~sdadapt.samplers.a1111_noise.A1111Seeds` (``generate
    --noise a1111`` / ``a1111-cpu``, variation seed, resize-from, ENSD): the start noise and the samplers' noise are
    A1111's for ``seed`` (image i: ``seed + i``) as :func:`sdadapt.sampling.generate` draws them with it, and the
    seed's CPU generator draws only unCLIP's augmentation noise (its first draw; A1111 takes that from its global
    RNG, which no setting reproduces: docs/clip-inversion.md)."""
    v = vectors.vectors if isinstance(vectors, ImageVectors) else vectors
    noise_level = vectors.noise_level if isinstance(vectors, ImageVectors) else 0
    conditioning = image_conditioning(system, noise_level=noise_level)
    if conditioning.text is None and (prompt or negative):
        raise ValueError("this model takes no text (an image-variation model: the vectors are the whole condition, the "
                         "unconditional input is zeros, as StableDiffusionImageVariationPipeline's): leave the prompt and "
                         "negative prompt out")
    if isinstance(vectors, ImageVectors) and vectors.site != conditioning.site:
        raise ValueError(f"these vectors were learnt for the {vectors.site} site; this model's image input is {conditioning.site}")
    device = system.alphas_cumprod.device
    shape = _latent_shape(system)
    g = torch.Generator().manual_seed(seed)
    a1111 = None if noise is None else noise.for_batch(seed, count)
    x_T = (torch.randn(count, *shape, generator=g) if a1111 is None else a1111.start_noise((count, *shape))).to(device)
    latents = sample_image_vectors(conditioning, None if v is None else v.to(device), x_T, alphas_cumprod=system.alphas_cumprod,
                                   prompts=[prompt] * count if conditioning.text else None, negative=negative,
                                   guidance=guidance, steps=steps, prediction_type=system.prediction_type, generator=g,
                                   sampler=sampler, karras=karras, schedule=schedule,
                                   schedule_options=schedule_options, noise=a1111)
    return system.decode_latents(latents)
