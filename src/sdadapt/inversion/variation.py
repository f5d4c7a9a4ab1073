"""Image-variation models (lambdalabs ``sd-image-variations-diffusers``) for CLIP inversion.

diffusers' ``StableDiffusionImageVariationPipeline`` folder holds ``unet/`` (its cross-attention
reads the CLIP image embedding as a 1-token ``encoder_hidden_states``), ``vae/``, ``scheduler/``,
``image_encoder/`` (``CLIPVisionModelWithProjection``) and ``feature_extractor/``, and no text
encoder or tokenizer. :func:`load_image_variation` loads what CLIP inversion needs from it — the
UNet, the VAE and the noise schedule, as :class:`ImageVariationSystem` — rather than bending
:class:`~sdadapt.diffusers_system.DiffusersSystem`, whose prompts, conditioning, sampling and
saving all read a text encoder. The image encoder stays in its folder and is loaded at the first
use by :func:`~sdadapt.inversion.clip.clip_image_encoder` (``image_conditioning(system)`` does so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..optional_packages import require_interop
from ..diffusers_system import DiffusersSystem, ModelFolderError
from ..training import diffusion

__all__ = ["VARIATION_PIPELINE", "ImageVariationSystem", "image_variation_refusal", "is_image_variation_folder",
           "load_image_variation"]

#: the ``model_index.json`` ``_class_name`` of an image-variation folder
VARIATION_PIPELINE = "StableDiffusionImageVariationPipeline"


def is_image_variation_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a diffusers image-variation folder: no ``text_encoder/``, and its
    ``model_index.json`` names :data:`VARIATION_PIPELINE` (or it has ``image_encoder/`` and ``unet/``)."""
    root = Path(folder)
    if not root.is_dir() or (root / "text_encoder").exists():
        return False
    index = root / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        name = None
    return name == VARIATION_PIPELINE or ((root / "image_encoder").is_dir() and (root / "unet").is_dir())


def image_variation_refusal(folder: str | os.PathLike) -> ModelFolderError:
    """The error for an image-variation folder given to a command that needs a text-to-image model
    (every command but ``clip-invert`` and ``generate --image-vectors``): it names the folder's kind and
    the commands that take it, rather than the generic "missing text_encoder". Returned, for the caller to raise."""
    return ModelFolderError(
        f"{folder}: an image-variation model (lambdalabs sd-image-variations-diffusers, {VARIATION_PIPELINE}): "
        "its UNet reads a CLIP image embedding and it has no text encoder or tokenizer, so it takes no prompts and "
        "cannot be trained or converted as a text-to-image model; the commands that take it are "
        "`sdadapt clip-invert` and `sdadapt generate --image-vectors FILE` (docs/clip-inversion.md), or "
        "sdadapt.inversion.load_image_variation(folder) from Python")


class ImageVariationSystem(nn.Module):
    """UNet + VAE + noise schedule of an image-variation model (no text encoder).

    What :func:`~sdadapt.inversion.clip.clip_invert` and
    :func:`~sdadapt.inversion.clip.generate_with_vectors` read: ``unet``, ``vae``,
    ``alphas_cumprod`` (T,), ``prediction_type``, ``image_size``, ``source`` (the folder, whose
    ``image_encoder/`` and ``feature_extractor/`` encode images), :meth:`encode_images`,
    :meth:`decode_latents`. The schedule is built from ``scheduler_config`` as
    :class:`~sdadapt.diffusers_system.DiffusersSystem` builds it (diffusers' defaults for missing keys).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` whose ``cross_attention_dim`` is the image
            embedding width D.
        vae: a diffusers ``AutoencoderKL``.
        scheduler_config: the diffusers scheduler config (schedule, ``prediction_type``).
        source: the folder the model came from.
    """

    def __init__(self, unet, vae, scheduler_config: dict, *, source: str | os.PathLike) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        self.text_encoder = None  # (no text: the image embedding is the whole condition)
        self.scheduler_config = dict(scheduler_config)
        self.source = str(source)
        self.register_buffer("alphas_cumprod", diffusion.scheduler_alphas_cumprod(scheduler_config), persistent=False)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        from ..formats.edm import vae_latent_stats

        #: the VAE config's ``latents_mean`` / ``latents_std`` (``None`` for SD's VAEs), as DiffusersSystem reads them
        self.latent_stats = vae_latent_stats(vae.config)
        #: pixels per latent cell (8 for every SD VAE)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_factor

    # the VAE's way in and out, as every Stable Diffusion system (they read ``vae``, ``scaling_factor`` and
    # ``latent_stats``)
    encode_images = DiffusersSystem.encode_images
    vae_latents = DiffusersSystem.vae_latents
    scale_vae_latents = DiffusersSystem.scale_vae_latents
    decode_latents = DiffusersSystem.decode_latents
    _stats = DiffusersSystem._stats


def load_image_variation(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> ImageVariationSystem:
    """An image-variation diffusers folder (``StableDiffusionImageVariationPipeline.save_pretrained``'s
    layout) as :class:`ImageVariationSystem`, frozen, in eval mode, on ``device`` (float32).

    Raises:
        ModelFolderError: not such a folder, a part missing, or a UNet whose ``cross_attention_dim``
            is not the image encoder's ``projection_dim``.
    """
    root = Path(folder)
    if not is_image_variation_folder(root):
        raise ModelFolderError(f"{root}: not a diffusers image-variation folder ({VARIATION_PIPELINE}: model_index.json, "
                               "unet/ vae/ scheduler/ image_encoder/ feature_extractor/ and no text_encoder/)")
    needed = ["unet/config.json", "vae/config.json", "image_encoder/config.json"]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise ModelFolderError(
            f"{root}: an incomplete image-variation folder ({VARIATION_PIPELINE}; missing {', '.join(missing)}): "
            "save it with save_pretrained (unet/ vae/ scheduler/ image_encoder/ feature_extractor/). For a UNet "
            "built another way: sdadapt.inversion.image_variation_conditioning(unet, encode_image="
            "clip_image_encoder(folder)) with learn_image_vectors / sample_image_vectors (docs/clip-inversion.md)")
    from ..formats.pickles import check_folder_pickles

    check_folder_pickles(root)  # a .bin/.pt that would run code: refused before diffusers sees it
    require_interop("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    width = unet.config.cross_attention_dim
    width = int(width if isinstance(width, int) else width[0])
    projection = json.loads((root / "image_encoder" / "config.json").read_text()).get("projection_dim")
    if projection is not None and int(projection) != width:
        raise ModelFolderError(f"{root}: the UNet reads {width}-wide cross-attention tokens but image_encoder/ makes "
                               f"{projection}-wide image embeddings (projection_dim); not an image-variation pair")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    system = ImageVariationSystem(unet, AutoencoderKL.from_pretrained(root / "vae"), scheduler_config, source=root)
    system.requires_grad_(False)
    return system.eval().to(device)
