"""SD 2.1 unCLIP's image-conditioning parts on a loaded model: image encoder, normaliser, noising schedule.

A :class:`~sdadapt.diffusers_system.DiffusersSystem` loaded from an unCLIP single file (Stability's
``sd21-unclip-h`` / ``-l``, :mod:`sdadapt.formats.unclip`) carries them as :class:`UnclipParts`
(``system.unclip``); one loaded from a diffusers unCLIP folder too (its ``image_encoder/``,
``image_normalizer/``, ``image_noising_scheduler/``). They serve generation (A1111's unCLIP img2img /
txt2img conditioning), CLIP inversion (:func:`sdadapt.inversion.image_conditioning`) and conversion
(:meth:`UnclipParts.write_folder` writes a diffusers ``StableUnCLIPImg2ImgPipeline`` folder's parts,
:meth:`UnclipParts.ldm_tensors` an LDM file's extra tensors).

The normaliser follows the LDM model: identity for H (``v2-1-stable-unclip-h-inference.yaml`` gives no
``clip_stats_path``, so ``CLIPEmbeddingNoiseAugmentation`` uses zeros / ones), karlo's
``ViT-L-14_stats.th`` for L — which no file holds (non-persistent buffers): pass it as ``clip_stats``
(diffusers' ``clip_stats_path``). Without it an L model has no normaliser (``None``): noise levels
above 0 are refused (:func:`sdadapt.inversion.image_conditioning`) and writing a diffusers folder is
refused, as diffusers' converter refuses (``stable_unclip_image_noising_components``). A stats file for H is
refused (:func:`check_clip_stats_variant`: H's LDM config names none and diffusers' converter ignores one).
The level-0 noise of generation is drawn per image, for the image's seed (:func:`unclip_level0_noise`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .formats.unclip import (UnclipFile, ldm_clip_pixels, ldm_cosine_alphas_cumprod, noise_augmentor_buffers, read_clip_stats,
                              variant_of_width)

__all__ = ["UnclipParts", "check_clip_stats_variant", "unclip_parts_from_file", "unclip_parts_from_folder", "unclip_image_input",
           "unclip_image_of_pixels", "seeded_unclip_image", "unclip_level0_noise", "img2img_unclip_image",
           "img2img_seeded_unclip_image",
           "hires_unclip_image", "unclip_image_scope", "COSINE_SCHEDULER_CONFIG"]

#: diffusers' converter's image-noising scheduler: DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
COSINE_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def _cosine_schedule() -> Tensor:
    return ldm_cosine_alphas_cumprod(1000).float()


class UnclipParts:
    """The image side of an SD 2.1 unCLIP model.

    Attributes:
        dim: D, the CLIP image-embedding width (the UNet's class input is 2D).
        normalizer: ``(mean (1, D), std (1, D))`` or ``None`` (an L file without its CLIP stats).
        noise_alphas_cumprod: (T',) the image-noising schedule.
        variant: ``"h"`` / ``"l"``: a single file's embedder (A1111's marker), a folder's by its embedding width
            (:func:`~sdadapt.formats.unclip.variant_of_width`: 768 is L), or ``None`` when not given.
        preprocess: ``"ldm"`` (the LDM embedders' squash to 224, :func:`~sdadapt.formats.unclip.ldm_clip_pixels`,
            what A1111 runs) or ``"diffusers"`` (a folder's ``CLIPImageProcessor``, :func:`~sdadapt.inversion.clip_pixel_values`).
        processor_config: the folder's ``feature_extractor/preprocessor_config.json`` (``{}`` for a file).
    """

    def __init__(self, *, dim: int, normalizer: tuple[Tensor, Tensor] | None, noise_alphas_cumprod: Tensor,
                 image_encoder: nn.Module | Callable[[], nn.Module] | None, variant: str | None = None,
                 preprocess: str = "ldm", processor_config: dict | None = None) -> None:
        if preprocess not in ("ldm", "diffusers"):
            raise ValueError(f"preprocess must be 'ldm' or 'diffusers', got {preprocess!r}")
        self.dim, self.normalizer, self.noise_alphas_cumprod = int(dim), normalizer, noise_alphas_cumprod
        self.variant, self.preprocess, self.processor_config = variant, preprocess, dict(processor_config or {})
        self._encoder = image_encoder

    @property
    def has_encoder(self) -> bool:
        """Whether an image encoder is at hand (loaded or loadable)."""
        return self._encoder is not None

    @property
    def image_encoder(self) -> nn.Module | None:
        """The ``CLIPVisionModelWithProjection`` (a folder's loads at the first use)."""
        if self._encoder is not None and not isinstance(self._encoder, nn.Module):
            self._encoder = self._encoder()
        return self._encoder

    def pixel_values(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> CLIP pixel values (B, 3, S, S) by :attr:`preprocess`."""
        if self.preprocess == "ldm":  # (the encoder's own input size: 224 for both files' towers)
            encoder = self.image_encoder
            size = int(getattr(getattr(encoder, "config", None), "image_size", 224) or 224)
            return ldm_clip_pixels(images, size=size)
        from .inversion.clip import clip_pixel_values

        return clip_pixel_values(images, config=self.processor_config)

    def encode_image(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> the projected CLIP image embeddings (B, D) float32, not normalised
        (the LDM embedder's ``model.visual(preprocess(x))``; diffusers' ``_encode_image``'s ``image_embeds``).

        Raises:
            ValueError: no image encoder.
        """
        encoder = self.image_encoder
        if encoder is None:
            raise ValueError("this unCLIP model has no image encoder (neither embedder.model.visual.* in its file nor an "
                             "image_encoder/ folder)")
        encoder = encoder.to(images.device)  # (not a submodule of the system: it follows the images, as clip_image_encoder)
        dtype = next(encoder.parameters()).dtype
        with torch.no_grad():
            return encoder(pixel_values=self.pixel_values(images).to(dtype)).image_embeds.float()

    # ------------------------------------------------------------------------------- writing
    def require_normalizer(self, what: str) -> tuple[Tensor, Tensor]:
        """:attr:`normalizer`, or a ``ValueError`` saying ``what`` needs karlo's CLIP stats."""
        if self.normalizer is None:
            raise ValueError(f"{what} needs this SD 2.1 unCLIP-L model's CLIP-embedding mean/std (karlo's ViT-L-14_stats.th, "
                             "which LDM reads from clip_stats_path and no checkpoint holds): pass it as --clip-stats "
                             "FILE (clip_stats= in Python), as diffusers' converter requires clip_stats_path")
        return self.normalizer

    def write_folder(self, folder: Path) -> dict[str, list]:
        """Write a diffusers unCLIP folder's ``image_normalizer/``, ``image_noising_scheduler/`` and
        ``feature_extractor/`` into ``folder`` (``image_encoder/`` is a component, written with the others);
        returns their ``model_index.json`` entries.

        Raises:
            ValueError: no normaliser (an L file without ``clip_stats``), as diffusers' converter refuses.
        """
        from .formats.files import write_safetensors

        mean, std = self.require_normalizer(f"writing {folder.name} as a diffusers unCLIP folder")
        (folder / "image_normalizer").mkdir()
        (folder / "image_normalizer" / "config.json").write_text(json.dumps(
            {"_class_name": "StableUnCLIPImageNormalizer", "embedding_dim": self.dim}, indent=2))
        write_safetensors(folder / "image_normalizer" / "diffusion_pytorch_model.safetensors",
                          {"mean": mean.detach().float().reshape(1, -1).contiguous(),
                           "std": std.detach().float().reshape(1, -1).contiguous()}, {"format": "pt"})
        (folder / "image_noising_scheduler").mkdir()
        config = self._scheduler_config()
        (folder / "image_noising_scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
        (folder / "feature_extractor").mkdir()
        from .inversion.clip import _PROCESSOR_DEFAULTS

        processor = {**_PROCESSOR_DEFAULTS, "image_processor_type": "CLIPImageProcessor", **self.processor_config}
        (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        return {"feature_extractor": ["transformers", "CLIPImageProcessor"],
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
                "image_noising_scheduler": ["diffusers", "DDPMScheduler"]}

    def _scheduler_config(self) -> dict:
        """diffusers' converter's ``DDPMScheduler`` config when the schedule is its cosine one, else ``trained_betas``."""
        cosine = _cosine_schedule()
        ac = self.noise_alphas_cumprod.detach().float().cpu()
        if ac.shape == cosine.shape and torch.allclose(ac, cosine, rtol=0, atol=1e-6):
            return dict(COSINE_SCHEDULER_CONFIG)
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return {"_class_name": "DDPMScheduler", "num_train_timesteps": int(ac.shape[0]),
                "trained_betas": (1 - ac.double() / prev.double()).tolist()}

    def ldm_tensors(self) -> dict[str, Tensor]:
        """The unCLIP LDM file's tensors outside the key map: the ``noise_augmentor.*`` schedule buffers and A1111's
        marker ``embedder.model.ln_final.{weight,bias}`` (ones / zeros of D: the width A1111 tells H (1024) from L
        (768) by; the text tower it belongs to is never run)."""
        out = noise_augmentor_buffers(self.noise_alphas_cumprod)
        out["embedder.model.ln_final.weight"] = torch.ones(self.dim)
        out["embedder.model.ln_final.bias"] = torch.zeros(self.dim)
        return out


def check_clip_stats_variant(variant: str | None, clip_stats: str | os.PathLike | None, *, what: str = "this model") -> None:
    """Refuse ``clip_stats`` (``--clip-stats``) for an SD 2.1 unCLIP-H model (``variant`` ``"h"``): its noise augmentor
    normalises with no CLIP stats — LDM's ``v2-1-stable-unclip-h-inference.yaml`` gives
    ``CLIPEmbeddingNoiseAugmentation`` no ``clip_stats_path`` (zeros / ones, stablediffusion
    ``ldm/modules/encoders/modules.py:323``), diffusers' converter ignores a ``clip_stats_path`` for it
    (``convert_from_ckpt.py:1075`` reads it only when the config names one) and A1111 has no such setting — so a
    stats file would only move the model off what it was trained with. ``what``: the model, for the message.

    Raises:
        ValueError: ``clip_stats`` given for an H model.
    """
    if clip_stats is not None and variant == "h":
        raise ValueError(
            f"--clip-stats {clip_stats}: {what} is an SD 2.1 unCLIP-H model, whose noise augmentor takes no CLIP "
            "stats (identity: its LDM config v2-1-stable-unclip-h-inference.yaml gives no clip_stats_path, and "
            "diffusers' converter ignores one for it); karlo's ViT-L-14_stats.th is for unCLIP-L models: leave "
            "--clip-stats out")


def unclip_parts_from_file(unclip: UnclipFile, image_encoder: nn.Module | None, *,
                           clip_stats: str | os.PathLike | None = None) -> UnclipParts:
    """The parts of an unCLIP single file (:class:`~sdadapt.formats.unclip.UnclipFile`): the file's schedule (its
    ``noise_augmentor.alphas_cumprod``, else the cosine one), identity stats for H, ``clip_stats`` (karlo's file) for L.

    Raises:
        ValueError: ``clip_stats`` for an H file (:func:`check_clip_stats_variant`).
        WeightFileError: an unreadable stats file, or one of another width.
    """
    check_clip_stats_variant(unclip.variant, clip_stats, what="the checkpoint")
    dim = unclip.dim
    normalizer = None
    if clip_stats is not None:
        normalizer = read_clip_stats(clip_stats, dim=dim)
    elif not unclip.needs_clip_stats:  # (H: LDM's CLIPEmbeddingNoiseAugmentation without clip_stats_path)
        normalizer = (torch.zeros(1, dim), torch.ones(1, dim))
    schedule = unclip.noise_alphas_cumprod if unclip.noise_alphas_cumprod is not None else _cosine_schedule()
    return UnclipParts(dim=dim, normalizer=normalizer, noise_alphas_cumprod=schedule, image_encoder=image_encoder,
                       variant=unclip.variant, preprocess="ldm")


def unclip_parts_from_folder(folder: str | os.PathLike, *, dim: int,
                             clip_stats: str | os.PathLike | None = None) -> UnclipParts:
    """The parts of a diffusers unCLIP folder: ``image_normalizer/`` (or ``clip_stats``), the
    ``image_noising_scheduler/`` schedule (cosine when absent), ``image_encoder/`` (loaded at the first use,
    float32) with ``feature_extractor/preprocessor_config.json``.

    Raises:
        ValueError: ``clip_stats`` for an H folder (an embedding width other than ViT-L/14's 768:
            :func:`check_clip_stats_variant`).
    """
    from .inversion.clip import _unclip_folder_parts, load_image_encoder

    root = Path(folder)
    check_clip_stats_variant(variant_of_width(dim), clip_stats, what=str(root))
    normalizer, schedule = _unclip_folder_parts(root, dim=dim)
    if clip_stats is not None:
        normalizer = read_clip_stats(clip_stats, dim=dim)
    loader = None
    if (root / "image_encoder").is_dir():
        def loader() -> nn.Module:
            return load_image_encoder(root / "image_encoder")
    config_file = root / "feature_extractor" / "preprocessor_config.json"
    processor = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return UnclipParts(dim=dim, normalizer=normalizer, noise_alphas_cumprod=schedule if schedule is not None else _cosine_schedule(),
                       image_encoder=loader, variant=variant_of_width(dim), preprocess="diffusers",
                       processor_config=processor)


def unclip_image_input(parts: UnclipParts, embeds: Tensor, *, noise_level: int = 0,
                       generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """The UNet's class input of image embeddings (B, D) -> (B, 2D): LDM's ``noise_augmentor(c_adm, noise_level)``
    then ``cat`` (A1111's ``unclip_image_conditioning``, noise level 0), by
    :func:`sdadapt.inversion.noise_image_embeddings` with the parts' normaliser (identity when ``None``, level 0
    only) and schedule; the noise ``noise`` (B, D) when given, else drawn on the CPU from ``generator``.

    Raises:
        ValueError: ``noise_level > 0`` without a normaliser; a ``noise`` of another shape than ``embeds``.
    """
    from .inversion.clip import noise_image_embeddings

    if noise_level and parts.normalizer is None:
        parts.require_normalizer(f"noise_level={noise_level}")
    if noise is None:
        noise = torch.randn(embeds.shape, generator=generator)
    elif tuple(noise.shape) != tuple(embeds.shape):
        raise ValueError(f"unCLIP augmentation noise {tuple(noise.shape)} for embeddings {tuple(embeds.shape)}: one row "
                         "per embedding")
    noise = noise.to(embeds)
    mean, std = parts.normalizer if parts.normalizer is not None else (None, None)
    return noise_image_embeddings(embeds, noise_level, noise=noise, alphas_cumprod=parts.noise_alphas_cumprod.to(embeds.device),
                                  mean=mean, std=std)


def unclip_level0_noise(seed: int, shape: tuple[int, ...], *, source: str | None = None) -> Tensor:
    """The noise ``n`` (``shape`` = (B, D), float32, CPU) of an image's level-0 augmentation, drawn for the image's
    ``seed``.

    ``source`` ``None`` (``generate`` without ``--noise``): ``torch.randn(shape)`` from
    ``torch.Generator().manual_seed(seed)``, sdadapt's CPU draw. ``"nv"`` / ``"cpu"`` (A1111's "Random number
    generator source", ``generate --noise a1111`` / ``a1111-cpu``): what A1111 on an NVIDIA GPU draws in its txt2img
    hires pass — LDM's ``q_sample`` takes ``torch.randn_like(x_start)`` (stablediffusion
    ``ldm/modules/diffusionmodules/upscaling.py:45``, from ``CLIPEmbeddingNoiseAugmentation.forward``,
    ``ldm/modules/encoders/modules.py:347``): CUDA's *global* generator, which the batch's ``rng.ImageRNG.first``
    last seeded with ``torch.manual_seed(seed)`` (A1111 ``modules/rng.py`` ``randn`` → ``manual_seed``, for the GPU
    and CPU sources alike; its own draws come from per-image generators and leave the global one untouched), so
    the (B, D) block is the first draw of a CUDA generator seeded with the batch's last seed —
    :func:`sdadapt.samplers.a1111_noise.philox_randn` (``seed``, ``shape``), on any device. (A1111's "NV" source
    never seeds torch's generator; its img2img draws in ``init()``, before any seed reaches it: there the value
    is the session's, and sdadapt draws the same as for its hires pass.)

    Raises:
        ValueError: an unknown ``source``; a negative seed with a ``source``.
    """
    if source is None:
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))
    from .samplers.a1111_noise import check_noise_source, philox_randn

    check_noise_source(source, or_none=True)
    return philox_randn(int(seed), tuple(shape))


def seeded_unclip_image(system, pixels: Tensor, *, source: str | None = None) -> Callable[[int], Tensor] | None:
    """A1111's ``unclip_image_conditioning`` (``modules/processing.py`` @ 0027ce1) of images (B, 3, H, W) in
    [-1, 1] as a function of the image's seed: the embedding through the model's embedder
    (:meth:`UnclipParts.encode_image`) once, then for each ``seed`` the noise augmentor at level 0 with that seed's
    noise (:func:`unclip_level0_noise`, ``source``) — (B, 2D), the conditional branch's class input
    (``system.unclip_image``). ``None`` for a model that is not unCLIP.

    Every image of a ``generate --count N`` run has its own noise row, drawn for its own seed, so an image is made
    again from its seed alone: A1111 draws a row per batch item too (``torch.randn_like`` of the (B, D)
    embeddings), where the level-0 scale is √(1 − ᾱ₀) = 0.0064 on SD 2.1 unCLIP's cosine schedule.

    Raises:
        ValueError: an unCLIP model without an image encoder.
    """
    parts = getattr(system, "unclip", None)
    if parts is None:
        return None
    embeds = parts.encode_image(pixels)  # (B, D)

    def for_seed(seed: int) -> Tensor:
        noise = unclip_level0_noise(seed, tuple(embeds.shape), source=source)
        return unclip_image_input(parts, embeds, noise_level=0, noise=noise)

    return for_seed


def unclip_image_of_pixels(system, pixels: Tensor, *, seed: int = 0, source: str | None = None) -> Tensor | None:
    """A1111's ``unclip_image_conditioning`` (``modules/processing.py``) of images (B, 3, H, W) in [-1, 1]: through the
    model's embedder (:meth:`UnclipParts.encode_image`) and the noise augmentor at level 0 — (B, 2D), the conditional
    branch's class input (``system.unclip_image``); ``None`` for a model that is not unCLIP. The level-0
    augmentation noise (scale √(1 − ᾱ₀), 0.0064 on SD 2.1 unCLIP's cosine schedule) is the (B, D) draw of
    :func:`unclip_level0_noise` for ``seed`` and ``source`` (one image per call in ``generate``: its own seed;
    :func:`seeded_unclip_image` encodes once for many seeds).

    Raises:
        ValueError: an unCLIP model without an image encoder.
    """
    for_seed = seeded_unclip_image(system, pixels, source=source)
    return None if for_seed is None else for_seed(seed)


def img2img_unclip_image(system, image_path: str | os.PathLike, *, height: int, width: int, resize_mode: str = "just",
                         seed: int = 0, source: str | None = None) -> Tensor | None:
    """A1111's unCLIP img2img image conditioning: the init image brought to ``width`` x ``height`` as img2img reads it
    (:func:`sdadapt.resize_modes.init_image_pixels`, in [-1, 1]) through :func:`unclip_image_of_pixels` — (1, 2D),
    ``None`` for a model that is not unCLIP. (Inpainting takes the image it encodes, resized or cut out and filled:
    :attr:`sdadapt.jobs.generate_inpaint.InpaintInputs.pixels`.)

    Raises:
        ValueError: an unCLIP model without an image encoder.
    """
    for_seed = img2img_seeded_unclip_image(system, image_path, height=height, width=width, resize_mode=resize_mode,
                                           source=source)
    return None if for_seed is None else for_seed(seed)


def img2img_seeded_unclip_image(system, image_path: str | os.PathLike, *, height: int, width: int,
                                resize_mode: str = "just", source: str | None = None) -> Callable[[int], Tensor] | None:
    """:func:`img2img_unclip_image` as a function of the image's seed (:func:`seeded_unclip_image`: the init image
    encoded once)."""
    if getattr(system, "unclip", None) is None:
        return None
    from .resize_modes import init_image_pixels

    pixels = init_image_pixels(image_path, (height, width), mode=resize_mode)[None]  # (1, 3, H, W)
    return seeded_unclip_image(system, pixels, source=source)


def hires_unclip_image(system, pixels: Tensor, *, seed: int = 0, source: str | None = None) -> Tensor | None:
    """The class input of A1111's txt2img hires pass with a pixel upscaler on an unCLIP model: ``sample_hr_pass``
    (``modules/processing.py`` at 0027ce1f6e58) hands ``img2img_image_conditioning`` the upscaled first pass as
    ``decoded_samples`` — the 8-bit pixels ``/ 255``, in **[0, 1]** (the VAE encode, ``images_tensor_to_samples``,
    maps them to [−1, 1] itself) — and that runs ``unclip_image_conditioning``, whose LDM embedder reads its input
    as [−1, 1] (``preprocess``: ``(x + 1) / 2``). So the embedding is of the [0, 1] pixels read as [−1, 1] (the
    image squeezed into [0.5, 1], paler); img2img hands it ``image * 2 - 1`` (A1111 before 1.6 did ``2x − 1`` in
    the hires pass too). ``pixels``: the upscaled images (B, 3, H, W) in [−1, 1]
    (:func:`sdadapt.jobs.generate_hires.lanczos_upscale_pixels`, A1111's ``decoded_samples · 2 − 1``); -> (B, 2D)
    through :func:`unclip_image_of_pixels` of ``(pixels + 1) / 2`` (A1111's ``decoded_samples`` to float
    rounding), the level-0 noise for ``seed`` and ``source`` (:func:`unclip_level0_noise`: with an A1111 source,
    A1111's own draw on an NVIDIA GPU); ``None`` for a model that is not unCLIP.

    Raises:
        ValueError: an unCLIP model without an image encoder.
    """
    if getattr(system, "unclip", None) is None:
        return None
    return unclip_image_of_pixels(system, (pixels.float() + 1.0) / 2.0, seed=seed, source=source)


@contextmanager
def unclip_image_scope(system, image: Tensor | None) -> Iterator[None]:
    """A block run with ``system.unclip_image`` = ``image`` ((1 or B, 2D), or ``None``: txt2img's zeros), the value
    it had put back on exit (an exception too) — so a run's image conditioning does not stay on a system that is
    used again. Nothing for a system without the attribute and ``image`` ``None``."""
    if image is None and not hasattr(system, "unclip_image"):
        yield
        return
    before = getattr(system, "unclip_image", None)
    system.unclip_image = image
    try:
        yield
    finally:
        system.unclip_image = before
