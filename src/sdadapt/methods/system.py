"""The ``System`` protocol: what a trainable text-to-image system provides to the methods.

Methods (:mod:`sdadapt.methods`), the fit loop, the ``demo``/``train`` commands and the quality
benchmark only ever talk to a system through this interface, so a new model family (the shipped
toy model, a diffusers folder, a user's own UNet + text encoder) is one class that implements it.
Implemented by :class:`sdadapt.toy.ToySystem` and :class:`sdadapt.diffusers_system.DiffusersSystem`.

| member | what it is |
|---|---|
| ``unet``, ``text_encoder`` | the ``nn.Module`` s methods inject into or fine-tune |
| ``image_size`` | the pixel size the system trains and samples at (square) |
| ``prediction_type`` | ``"epsilon"`` or ``"v_prediction"``: what the UNet predicts |
| ``base_model`` | the model family files name (``"sd1"``, ``"sd2"``, ``"sd2-v"``, ``"sdxl"``): kohya naming and metadata |
| ``alphas_cumprod`` | (T,) the noise schedule's ᾱ_t |
| ``tokenize(prompts)`` | ``list[str]`` → token ids (B, L) |
| ``condition(ids)`` | token ids → whatever the denoiser takes as conditioning (a tensor or a dict of tensors) |
| ``encode_images(images)`` | (B, 3, H, W) in [-1, 1] → latents (B, C, h, w) |
| ``decode_latents(latents)`` | latents → (B, 3, H, W) in [-1, 1] |
| ``denoiser()`` | ``model(x_t, t, cond) -> prediction``: the UNet call the training step and samplers use |
| ``sample(prompts, *, seed, steps, guidance, negative)`` | DDIM + classifier-free guidance → images (B, 3, H, W) |

Optional:

- ``class_prompts(count, *, seed)`` — default class prompts for prior preservation when the user
  gives none (the toy system draws held-in prompts);
- ``save_model(path, *, dtype, metadata)`` — write the whole (fine-tuned) model the way its users
  load it (the diffusers-folder system: an LDM single-file checkpoint or a diffusers folder; the toy:
  a toy-system file). Fine-tuning and DreamBooth save through it.
- ``size_multiple`` — image sides must be multiples of it (SD: 64; default 4): bucket sizes follow it;
- ``size_conditioning`` — ``True`` when ``condition`` takes ``{"ids": ids, "time_ids": (B, 6)}`` with
  each image's original size, crop and target size (SDXL); the fit loop then passes them per image;
- ``sample(..., sampler=, height=, width=)`` (and ``karras=``) — when ``sample`` takes these keywords,
  ``generate`` and training samples use them (any :mod:`sdadapt.samplers` name, other sizes); else DDIM
  at ``image_size`` (the other samplers through the protocol: ``sdadapt.samplers.sample_latents``);
- ``text_encoder_2`` — a second text encoder (SDXL): the LoRA family adapts it too, ``text_encoder_lr`` covers it.
- ``edm`` — an :class:`~sdadapt.samplers.edm.EDMSchedule` when the model is in the EDM formulation (Playground v2.5;
  ``None`` or absent otherwise): the fit loop's step then takes its EDM branch (:mod:`sdadapt.training.edm`: σ-grid
  noising, ``denoiser()`` called with ``c_in·x`` at ``c_noise``, the x0 target) and ``alphas_cumprod.shape[0]`` is
  the scheduler's ``num_train_timesteps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..formats.kohya import BASE_MODELS

__all__ = ["TEXT_ENCODERS", "System", "check_system", "system_models", "text_encoders"]

#: the text encoders a system may have, in order (SDXL: two; a kohya file names them lora_te / lora_te1, lora_te2)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@runtime_checkable
class System(Protocol):
    """A trainable text-to-image system (see the module docstring for each member)."""

    unet: nn.Module
    text_encoder: nn.Module
    image_size: int
    prediction_type: str
    base_model: str
    alphas_cumprod: Tensor

    def tokenize(self, prompts: list[str]) -> Tensor: ...

    def condition(self, ids: Tensor) -> Any: ...

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode_latents(self, latents: Tensor) -> Tensor: ...

    def denoiser(self) -> Callable[[Tensor, Tensor, Any], Tensor]: ...

    def sample(self, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float = 7.5,
               negative: str = "") -> Tensor: ...


_MEMBERS = ("unet", "text_encoder", "image_size", "prediction_type", "base_model", "alphas_cumprod", "tokenize",
            "condition", "encode_images", "decode_latents", "denoiser", "sample")


def text_encoders(system: object) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each of :data:`TEXT_ENCODERS` that ``system`` has as an ``nn.Module``."""
    found = ((name, getattr(system, name, None)) for name in TEXT_ENCODERS)
    return [(name, module) for name, module in found if isinstance(module, nn.Module)]


def system_models(system: object) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the system's networks: its ``unet`` and :func:`text_encoders` (those
    that are ``nn.Module`` s), in that order."""
    unet = getattr(system, "unet", None)
    return ([("unet", unet)] if isinstance(unet, nn.Module) else []) + text_encoders(system)


def check_system(system: object) -> None:
    """Raise a clear error if ``system`` does not implement :class:`System`.

    Raises:
        TypeError: names the missing members.
        ValueError: an unknown ``base_model`` or ``prediction_type``.
    """
    missing = [m for m in _MEMBERS if not hasattr(system, m)]
    if missing:
        raise TypeError(
            f"{type(system).__name__} is not a sdadapt System: it lacks {', '.join(missing)} "
            "(see sdadapt.methods.system.System for what a trainable text-to-image system provides)"
        )
    if system.base_model not in BASE_MODELS:  # type: ignore[attr-defined]
        raise ValueError(f"{type(system).__name__}.base_model must be one of {sorted(BASE_MODELS)}, got {system.base_model!r}")  # type: ignore[attr-defined]
    if system.prediction_type not in ("epsilon", "v_prediction"):  # type: ignore[attr-defined]
        raise ValueError(
            f"{type(system).__name__}.prediction_type must be 'epsilon' or 'v_prediction', got {system.prediction_type!r}"  # type: ignore[attr-defined]
        )
