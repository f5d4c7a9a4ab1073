"""The toy text-to-image system: UNet + text encoder + tokenizer + judge CLIP + noise schedule.

"Latents" are pixel-unshuffled images: a 32x32 RGB image in [-1, 1] is a (12, 16, 16) tensor
(``pixel_unshuffle(image, 2)``), an exact, free and invertible "VAE" so the toy diffuses at
16x16 like SD diffuses at 64x64. Conditioning is a dict ``{"context": (B, L, D) text states,
"image_embeds": (B, E) toy-CLIP image embedding or zeros}``, so the model callable has the
``model(x, t, cond)`` shape every sdadapt sampler and the training step take.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..token_id_cache import TokenIdCache
from ..training import diffusion
from ..training.host_syncs import copy_to_device
from ..formats.files import WeightFileError, read_safetensors, write_safetensors
from .clip import ToyCLIP
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer
from .unet import ToyUNet

__all__ = ["ToySystem", "build_toy", "load_toy", "save_toy", "DEFAULT_WEIGHTS", "IMAGE_WEIGHTS", "load_toy_image"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "toy-v1.safetensors"
#: the image-embedding-conditioned variant (:mod:`sdadapt.toy.image_variant` builds it)
IMAGE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "toy-image-v1.safetensors"
SCHEDULE = dict(name="linear", beta_start=0.0001, beta_end=0.02)


class ToySystem(nn.Module):
    """All parts of the toy model; ``sample(["a red circle"])`` makes images."""

    image_size = 32
    prediction_type = "epsilon"
    #: files name its layers like SD1's (diffusers UNet paths, CLIP text encoder): kohya "sd1" naming
    base_model = "sd1"
    #: the toy's DDIM settings (x̂0 clamped to ±1 — its "latents" are pixels in [-1, 1] — and the last step to
    #: ᾱ = 1): its own :meth:`sample`, the shared sampler path's ``ddim`` (:func:`sdadapt.sampling.generate`
    #: with any option) and CLIP-inversion sampling all run ``ddim`` with them, so a toy image does not change with
    #: the path; the other samplers run as on every model (docs/samplers.md, "The toy model")
    ddim_options: Mapping[str, float] = MappingProxyType({"final_alpha_cumprod": 1.0, "clip_sample": 1.0})

    def __init__(self, unet: ToyUNet, text_encoder: ToyTextEncoder, clip: ToyCLIP) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.clip = unet, text_encoder, clip
        self.tokenizer = ToyTokenizer()
        betas = diffusion.noise_schedule(SCHEDULE["name"], beta_start=SCHEDULE["beta_start"], beta_end=SCHEDULE["beta_end"])
        self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod_of(betas).float(), persistent=False)
        #: image-embedding words (CLIP inversion, sdadapt.inversion): ``(token ids (k,), vector (E,))`` pairs; a
        #: prompt holding any of a pair's tokens gets ``vector`` added to its ``image_embeds``. Empty: no effect.
        self.image_tokens: list[tuple[Tensor, Tensor]] = []
        #: token ids of captions seen before (a training step tokenises the same captions again)
        self.token_cache = TokenIdCache()

    # --------------------------------------------------------------------------- conversions
    @staticmethod
    def encode_images(images: Tensor) -> Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> latents (B, 12, 16, 16)."""
        return F.pixel_unshuffle(images, 2)

    @staticmethod
    def decode_latents(latents: Tensor) -> Tensor:
        """latents (B, 12, 16, 16) -> images (B, 3, 32, 32) clamped to [-1, 1]."""
        return F.pixel_shuffle(latents, 2).clamp(-1, 1)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, 16) on the system's device; captions seen before (with the same added words)
        come from :attr:`token_cache` (host ids, :mod:`sdadapt.token_id_cache`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        state = (self.tokenizer, tuple(self.tokenizer.added.items()))  # (what else decides the ids: the added words)
        (ids,) = self.token_cache.lookup(prompts, lambda texts: (self.tokenizer(texts),), state=state)
        return copy_to_device(ids, self.alphas_cumprod.device)  # no wait on a GPU

    def condition(self, prompts: list[str] | Tensor, *, image_embeds: Tensor | None = None) -> dict[str, Tensor]:
        """``{"context": (B, L, D), "image_embeds": (B, E)}`` for prompts (or token ids)."""
        ids = prompts if isinstance(prompts, Tensor) else self.tokenize(prompts)
        context = self.text_encoder(ids)[0]
        if image_embeds is None:
            image_embeds = context.new_zeros(ids.shape[0], self.unet.config["image_embed_dim"])
        for token_ids, vector in self.image_tokens:
            # both already on the ids' device (bound there, moved by .to()): no host -> device copy here,
            # which a captured CUDA-graph step would replay with the capture's value
            if token_ids.device != ids.device or vector.device != ids.device:
                raise ValueError(f"an image-word binding (image_tokens) has its ids on {token_ids.device} and its vector "
                                 f"on {vector.device}, the prompt ids are on {ids.device}: bind it (e.g. "
                                 "prepare_clip_inversion) after moving the system to its device")
            hit = torch.isin(ids, token_ids).any(dim=1, keepdim=True)  # (B, 1)
            image_embeds = image_embeds + hit.to(image_embeds.dtype) * vector.to(image_embeds.dtype)  # (B, E)
        return {"context": context, "image_embeds": image_embeds}

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.cuda()`` also move the :attr:`image_tokens` ids, as a buffer's (their
        dtype stays int64; the vectors are the adaptation's parameters and stay where it put them)."""
        out = super()._apply(fn, recurse)
        for i, (token_ids, vector) in enumerate(self.image_tokens):
            device = fn(token_ids).device
            if device != token_ids.device:
                self.image_tokens[i] = (token_ids.to(device), vector)
        return out

    def denoiser(self):
        """``model(x_t, t, cond) -> ε`` over a :meth:`condition` dict."""

        def model(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            return self.unet(x, t, cond["context"], cond.get("image_embeds"))

        return model

    def save_model(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   metadata: dict[str, str] | None = None) -> Path:
        """Write the whole toy system (``unet.*``, ``text_encoder.*``, ``clip.*`` + configs) as
        :func:`save_toy` does; ``load_toy(path)`` and ``--model PATH`` load it. Default float32."""
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"{target}: already exists; remove it or choose another output")
        save_toy(self, target, metadata=metadata, dtype=dtype or torch.float32)
        return target

    @staticmethod
    def class_prompts(count: int, *, seed: int = 0) -> list[str]:
        """Prior-preservation prompts when the user gives no class prompt: random held-in "a {colour} {shape}"."""
        from .evaluate import class_prompts

        return class_prompts(count, seed=seed)

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float = 2.0,
               negative: str = "", image_embeds: Tensor | None = None, model=None, cond: dict | None = None) -> Tensor:
        """DDIM + classifier-free guidance; returns images (B, 3, 32, 32) in [-1, 1].

        ``model`` / ``cond`` override the denoiser and the prompt conditioning (methods that
        change how conditioning is built pass their own).
        """
        device = self.alphas_cumprod.device
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(len(prompts), 12, 16, 16, generator=g).to(device)
        cond = cond if cond is not None else self.condition(prompts, image_embeds=image_embeds)
        uncond = self.condition([negative] * len(prompts))
        latents = diffusion.ddim_sample(
            model or self.denoiser(), x, cond, alphas_cumprod=self.alphas_cumprod, num_steps=steps,
            uncond=uncond, guidance_scale=guidance, **self.ddim_options,
        )
        return self.decode_latents(latents)


def build_toy(*, seed: int = 0) -> ToySystem:
    """A freshly initialised (untrained) toy system."""
    torch.manual_seed(seed)
    vocab = len(ToyTokenizer())
    return ToySystem(ToyUNet(widths=(32, 64)), ToyTextEncoder(vocab_size=vocab), ToyCLIP(vocab_size=vocab))


def save_toy(system: ToySystem, path: str | os.PathLike, *, metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write every part's weights (``unet.*``, ``text_encoder.*``, ``clip.*``) + configs, atomically."""
    tensors = {}
    for part in ("unet", "text_encoder", "clip"):
        for key, value in getattr(system, part).state_dict().items():
            tensors[f"{part}.{key}"] = value.to(dtype) if value.is_floating_point() else value
    meta = {"format": "sdadapt-toy/1", "config": json.dumps({p: getattr(system, p).config for p in ("unet", "text_encoder", "clip")})}
    meta.update(metadata or {})
    write_safetensors(path, tensors, meta)


def load_toy(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> ToySystem:
    """Load the shipped pretrained toy system (or a file written by :func:`save_toy`), float32, eval mode."""
    file = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not file.is_file():
        raise WeightFileError(f"{file}: toy weights not found; run `python -m sdadapt.toy.pretrain --out {file}` to build them")
    tensors, meta = read_safetensors(file)
    if meta.get("format") != "sdadapt-toy/1":
        raise WeightFileError(f"{file}: not a toy-system file (metadata format {meta.get('format')!r})")
    config = json.loads(meta["config"])
    unet_cfg = dict(config["unet"])
    unet_cfg["widths"] = tuple(unet_cfg["widths"])
    tcfg = dict(config["text_encoder"])
    system = ToySystem(
        ToyUNet(**unet_cfg),
        ToyTextEncoder(**tcfg),
        ToyCLIP(**config["clip"]),
    )
    for part in ("unet", "text_encoder", "clip"):
        prefix = f"{part}."
        state = {k[len(prefix):]: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(system, part).load_state_dict(state, strict=True)
    system.requires_grad_(False)
    return system.eval().to(device)


def load_toy_image(*, device: str | torch.device = "cpu") -> ToySystem:
    """The shipped toy image variant (``load_toy(IMAGE_WEIGHTS)``): a :class:`ToySystem` whose UNet
    follows the toy CLIP image embedding passed as ``condition(..., image_embeds=(B, 64))``
    (time embedding + one cross-attention token; see :mod:`sdadapt.toy.image_variant`)."""
    return load_toy(IMAGE_WEIGHTS, device=device)
