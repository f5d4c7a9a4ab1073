"""A local diffusers Stable Diffusion folder as a trainable system (SD1.x / SD2.x layouts).

Needs the optional ``diffusers`` and ``transformers`` packages (``pip install "sdadapt[interop]"``).
It has the toy system's duck type (``encode_images``, ``tokenize``, ``condition``, ``denoiser``,
``alphas_cumprod``, ``prediction_type``, ``image_size``, ``sample``) so every method and the ``train``
command work on it. Latents are the VAE posterior mean times ``scaling_factor``, encoded once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .training import diffusion

__all__ = ["DiffusersSystem", "ModelFolderError"]


class ModelFolderError(ValueError):
    """The folder is not a diffusers Stable Diffusion pipeline this command can train."""


def _require(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"training a diffusers model folder needs `{name}`: pip install \"sdadapt[interop]\"") from None


class DiffusersSystem(nn.Module):
    """UNet + VAE + CLIP text encoder + tokenizer + noise schedule of a diffusers folder."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        betas = diffusion.noise_schedule(
            {"squaredcos_cap_v2": "cosine"}.get(scheduler_config.get("beta_schedule", "scaled_linear"), scheduler_config.get("beta_schedule", "scaled_linear")),
            num_steps=scheduler_config.get("num_train_timesteps", 1000),
            beta_start=scheduler_config.get("beta_start", 0.00085),
            beta_end=scheduler_config.get("beta_end", 0.012),
            zero_terminal_snr=bool(scheduler_config.get("rescale_betas_zero_snr", False)),
        )
        self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod_of(betas).float(), persistent=False)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        # SD2's text encoder is OpenCLIP-H as a CLIPTextModel: gelu and 1024 wide (SD1's CLIP-L:
        # quick_gelu, 768); a v-predicting SD2 is SD2-v (768 px) for file metadata
        config = text_encoder.config
        is_sd2 = getattr(config, "hidden_act", "quick_gelu") == "gelu" or int(getattr(config, "hidden_size", 768)) == 1024
        self.base_model = ("sd2-v" if self.prediction_type == "v_prediction" else "sd2") if is_sd2 else "sd1"
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.image_size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> DiffusersSystem:
        root = Path(folder)
        if not root.is_dir():
            raise ModelFolderError(f"{root}: no such folder; --model takes 'toy' or a diffusers Stable Diffusion folder")
        needed = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        missing = [n for n in needed if not (root / n).exists()]
        if missing:
            raise ModelFolderError(
                f"{root}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}); expected "
                "model_index.json and unet/ vae/ text_encoder/ tokenizer/ scheduler/ as save_pretrained writes them"
            )
        if (root / "text_encoder_2").exists():
            raise ModelFolderError(f"{root}: an SDXL pipeline (text_encoder_2/); `train` handles SD1.x/SD2.x folders so far")
        _require("diffusers")
        _require("transformers")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        system = cls(
            UNet2DConditionModel.from_pretrained(root / "unet"),
            AutoencoderKL.from_pretrained(root / "vae"),
            CLIPTextModel.from_pretrained(root / "text_encoder"),
            CLIPTokenizer.from_pretrained(root / "tokenizer"),
            scheduler_config,
        )
        system.requires_grad_(False)
        return system.eval().to(device)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8)."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.alphas_cumprod.device)

    def condition(self, ids: Tensor) -> Tensor:
        return self.text_encoder(ids)[0]

    def denoiser(self):
        def model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            return self.unet(x, t, cond).sample

        return model

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float = 7.5, negative: str = "") -> Tensor:
        size = self.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), self.unet.config.in_channels, size, size, generator=g).to(self.alphas_cumprod.device)
        latents = diffusion.ddim_sample(
            self.denoiser(), x, self.condition(self.tokenize(prompts)), alphas_cumprod=self.alphas_cumprod,
            num_steps=steps, uncond=self.condition(self.tokenize([negative] * len(prompts))), guidance_scale=guidance,
            prediction_type=self.prediction_type,
        )
        return self.decode_latents(latents)
