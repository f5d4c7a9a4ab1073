"""A local diffusers Stable Diffusion folder as a trainable system (SD1.x / SD2.x layouts).

Needs the optional ``diffusers`` and ``transformers`` packages (``pip install "sdadapt[interop]"``).
It implements :class:`sdadapt.methods.system.System`, so every method and the ``train`` command
work on it. Latents are the VAE posterior mean times ``scaling_factor``, encoded once.

:meth:`DiffusersSystem.save_model` writes the whole (fine-tuned) model as users load it: an LDM
single-file checkpoint (``.safetensors``: A1111, ComfyUI, diffusers' ``from_single_file``) or a
diffusers folder (``save_pretrained`` layout: ``from_pretrained``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .training import diffusion

__all__ = ["DiffusersSystem", "ModelFolderError"]


#: the parts :meth:`DiffusersSystem.save_model` writes into a folder
_WRITTEN = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelFolderError(ValueError):
    """The folder is not a diffusers Stable Diffusion pipeline this command can train."""


def _require(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"training a diffusers model folder needs `{name}`: pip install \"sdadapt[interop]\"") from None


class DiffusersSystem(nn.Module):
    """UNet + VAE + CLIP text encoder + tokenizer + noise schedule of a diffusers folder."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *, model_index: dict | None = None) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_index = {  # what save_model writes (the loaded folder's entries win)
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
            **dict(model_index or {}),
        }
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
            model_index=json.loads((root / "model_index.json").read_text()),
        )
        system.requires_grad_(False)
        return system.eval().to(device)

    def save_model(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
    ) -> Path:
        """Write the whole model: UNet, text encoder and VAE (the VAE as loaded).

        ``path`` ending in ``.safetensors`` → one LDM ("compvis") checkpoint, keys through
        :func:`sdadapt.formats.model_keys.diffusers_to_ldm` (``model.diffusion_model.*``,
        ``cond_stage_model.*``, ``first_stage_model.*``) with ModelSpec metadata; any other path → a
        diffusers folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``).
        Both are written atomically (a temporary file or folder beside ``path``, renamed last).

        Args:
            dtype: cast floating tensors (``torch.float16`` / ``bfloat16``); default: as trained.
            metadata: extra string metadata (LDM file) — e.g. the training recipe.

        Raises:
            FileExistsError: ``path`` exists (remove it or write elsewhere).
        """
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"{target}: already exists; remove it or choose another output")
        if target.suffix.lower() == ".safetensors":
            return self._save_ldm(target, dtype, metadata or {})
        if target.suffix:
            raise ValueError(f"{target}: write a .safetensors LDM checkpoint or a folder (a path without a suffix)")
        return self._save_folder(target, dtype)

    def _save_ldm(self, target: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        from .formats.files import write_safetensors
        from .formats.model_keys import diffusers_to_ldm

        state = {}
        for component in ("unet", "text_encoder", "vae"):
            for key, value in getattr(self, component).state_dict().items():
                if component == "text_encoder" and not key.startswith("text_model."):
                    key = "text_model." + key  # transformers 5 drops the prefix; LDM files keep it
                state[f"{component}.{key}"] = value.detach()
        ldm = diffusers_to_ldm(state)
        if dtype is not None:
            ldm = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ldm.items()}
        architecture = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v"}
        meta = {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": architecture.get(self.base_model, self.base_model),
            "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion" if self.base_model != "sd1"
            else "https://github.com/CompVis/stable-diffusion",
            "modelspec.title": target.stem,
            "modelspec.resolution": f"{self.image_size}x{self.image_size}",
            **({"modelspec.prediction_type": "v"} if self.prediction_type == "v_prediction" else {}),
            **metadata,
        }
        return write_safetensors(target, ldm, meta)

    def _save_folder(self, target: Path, dtype: torch.dtype | None) -> Path:
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(f"{target}: folder {folder} does not exist; create it first")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
        try:
            for component in ("unet", "vae", "text_encoder"):
                module = getattr(self, component)
                if dtype is not None:
                    import copy

                    module = copy.deepcopy(module).to(dtype)
                module.save_pretrained(tmp / component)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
            index = {k: v for k, v in self.model_index.items() if k.startswith("_") or k in _WRITTEN}
            if index.get("_class_name", "").startswith("StableDiffusion"):  # parts not written: absent
                index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                             requires_safety_checker=False)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

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
