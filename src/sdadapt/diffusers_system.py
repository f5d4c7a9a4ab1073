"""Stable Diffusion (SD1.x, SD2.x, SDXL) as a trainable system: a diffusers folder or a single file.

Needs the optional ``diffusers`` and ``transformers`` packages (``pip install "sdadapt[interop]"``)
for the model classes; nothing is downloaded. It implements :class:`sdadapt.methods.system.System`,
so every method, ``train`` and ``generate`` work on it.

* :meth:`DiffusersSystem.from_folder` — a diffusers pipeline folder (``save_pretrained`` layout),
  SD1/SD2 (``StableDiffusionPipeline``) or SDXL (``text_encoder_2/``, ``tokenizer_2/``; the SDXL
  refiner: those without ``text_encoder/``, ``StableDiffusionXLImg2ImgPipeline``).
* :meth:`DiffusersSystem.from_single_file` — an LDM single-file checkpoint (``.safetensors``, or
  ``.ckpt`` read with ``weights_only``): keys through :mod:`sdadapt.formats.model_keys`, configs
  from the shapes (:mod:`sdadapt.formats.single_file`), the CLIP tokenizer from sdadapt's shipped
  vocabulary (:mod:`sdadapt.clip_tokenizer`) or ``tokenizer=DIR``.
* :func:`load_model` — either, from one path.

Conditioning: SD1 takes CLIP-L's last hidden state (``clip_skip=2``: the penultimate one,
final-normed, as A1111/kohya do), SD2 the 23-layer OpenCLIP-H's. SDXL concatenates both encoders'
penultimate states (768 + 1280 = 2048 wide), adds the second encoder's projected pooled output
(``text_embeds``) and the size/crop conditioning ``time_ids = (orig_h, orig_w, crop_top,
crop_left, target_h, target_w)``; an empty negative prompt is all zeros (diffusers'
``force_zeros_for_empty_prompt``). The SDXL refiner (:attr:`DiffusersSystem.is_refiner`) conditions
on its one encoder (OpenCLIP-bigG: penultimate states, 1280 wide, and its projected pooled output) and
``time_ids = (orig_h, orig_w, crop_top, crop_left, aesthetic_score)`` — 6.0 for the prompt, 2.5 for the
negative (diffusers' ``requires_aesthetics_score``); its empty negative prompt is encoded, not zeroed (diffusers'
refiner config; :attr:`DiffusersSystem.zero_empty_negative` set: zeroed, as A1111 does).
Latents are the VAE posterior mean times its scaling factor
(SD1/SD2 0.18215, SDXL 0.13025; with the VAE config's ``latents_mean`` / ``latents_std``, normalised by them as
diffusers does). An EDM model (Playground v2.5: :mod:`sdadapt.formats.edm`) has :attr:`DiffusersSystem.edm` set and
samples by :mod:`sdadapt.samplers.edm`. ``max_token_length=150`` / ``225`` (kohya's option) keeps that many
prompt tokens, encoded in 75-token windows whose states are joined (:mod:`sdadapt.text_chunks`).

:meth:`DiffusersSystem.save_model` writes the whole (fine-tuned) model as users load it: an LDM
single-file checkpoint (``.safetensors``: A1111, ComfyUI, diffusers' ``from_single_file``) or a
diffusers folder (``save_pretrained`` layout: ``from_pretrained``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import WeightFileError
from .optional_packages import require_interop
from .sampler_tables import run_schedule
from .token_id_cache import TokenIdCache, tokenizer_state
from .training import diffusion
from .training.host_syncs import copy_to_device

__all__ = ["EMPHASIS_MODES", "DiffusersSystem", "ModelFolderError", "check_image_size", "load_model"]


#: the parts :meth:`DiffusersSystem.save_model` writes into a folder
_WRITTEN = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
#: the noise schedule of every SD1/SD2/SDXL base model (the DDPM scaled-linear one), as the scheduler config of a
#: folder converted from a single file: diffusers' own converter's DDIM settings (steps_offset 1, no x̂0 clip, the
#: final ᾱ not 1; DDIMScheduler's own defaults are the other way, and an SDXL pipeline does not correct them)
SD_SCHEDULE = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
               "clip_sample": False, "set_alpha_to_one": False}
#: the same schedule as an SDXL (base or refiner) folder's scheduler config: ``EulerDiscreteScheduler``, as diffusers'
#: converter (``convert_from_ckpt.py``'s SDXL ``scheduler_dict``), its ``from_single_file`` (the hub's
#: stable-diffusion-xl-base-1.0 / -refiner-1.0 config, these values) and kohya's SDXL ``save_diffusers_checkpoint``
#: write it — the pipeline's default sampler, Euler at "leading" spacing, not DDIM's
SDXL_SCHEDULE = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                 "clip_sample": False, "set_alpha_to_one": False, "interpolation_type": "linear",
                 "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0,
                 "skip_prk_steps": True}


class ModelFolderError(WeightFileError):
    """The folder or file is not a Stable Diffusion model this command can train (a missing one too): an input file
    that cannot be used, exit code 3 as every other one (a ``ValueError`` as before)."""


def _token_ids(tokenizer: Any, prompts: list[str], length: int | None = None) -> Tensor:
    """(B, L) ids from sdadapt's :class:`~sdadapt.clip_tokenizer.CLIPTokenizer` or a transformers tokenizer,
    padded and truncated to ``length`` (default: the tokenizer's ``model_max_length``); each prompt cleaned first as
    the slow CLIP tokenizer cleans it (:func:`sdadapt.clip_text.clip_clean`: ftfy's fixes, kohya's and A1111's ids)."""
    from .clip_text import added_tokens, clip_clean
    from .clip_tokenizer import CLIPTokenizer

    length = int(tokenizer.model_max_length) if length is None else length
    added = added_tokens(tokenizer)  # (cut out before the clean-up, as the slow tokenizer cuts them)
    prompts = [clip_clean(prompt, added=added) for prompt in prompts]
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer(prompts, max_length=length)
    from .embeddings.a1111_match import has_a1111_names

    if has_a1111_names(tokenizer):  # (generate's embeddings: matched by token ids, A1111's rule)
        return _a1111_token_ids(tokenizer, prompts, length)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _a1111_token_ids(tokenizer: Any, prompts: list[str], length: int) -> Tensor:
    """:func:`_token_ids` of a transformers tokenizer with embeddings injected with ``a1111=True``: each prompt (one
    emphasis piece: no brackets) tokenized, the embeddings matched in its ids
    (:func:`sdadapt.embeddings.a1111_match.match_token_ids`), then truncated and padded as the tokenizer does,
    (B, L) ``<BOS> ids <EOS> <PAD> …``."""
    from .clip_tokenizer import special_token_ids
    from .embeddings.a1111_match import match_token_ids

    bos, eos, pad = special_token_ids(tokenizer)
    rows = []
    for prompt in prompts:
        ids = match_token_ids(tokenizer, list(tokenizer(prompt, add_special_tokens=False).input_ids))
        ids = ids[len(ids) - (length - 2):] if getattr(tokenizer, "truncation_side", "right") == "left" and \
            len(ids) > length - 2 else ids[: length - 2]
        row, fill = [bos, *ids, eos], [pad] * (length - 2 - len(ids))
        rows.append(fill + row if getattr(tokenizer, "padding_side", "right") == "left" else row + fill)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


def _window_spec(tokenizer: Any) -> dict[str, int]:
    """``window`` (the encoder length), ``eos_id`` and ``pad_id`` of sdadapt's or a transformers CLIP
    tokenizer: :func:`~sdadapt.text_chunks.chunk_token_ids`' keywords."""
    from .clip_tokenizer import special_token_ids

    _, eos, pad = special_token_ids(tokenizer)
    return {"window": int(tokenizer.model_max_length), "eos_id": eos, "pad_id": pad}


def _eos_pooled(encoder: Any, out: Any, ids: Tensor, *, eos_id: int) -> Tensor:
    """SDXL's pooled text embedding: the second encoder's final-normed state at each window's first
    ``<EOS>``, through its ``text_projection``: ``out.last_hidden_state`` (N, C, D) and ``ids`` (N, C)
    -> (N, P). kohya's ``_pool_workaround`` (``library/strategy_sdxl.py``): transformers pools a
    legacy config (``eos_token_id == 2``, SDXL base's) at the largest id, which is an added
    (textual-inversion) token's where one is in the prompt; without one both are the same state.
    An encoder without ``text_projection``: its own ``text_embeds``."""
    projection = getattr(encoder, "text_projection", None)
    if projection is None:
        return out.text_embeds
    states = out.last_hidden_state  # (N, C, D)
    first_eos = (ids == eos_id).int().argmax(dim=-1)  # (N,): 0 where a window has no <EOS>, as kohya
    return projection(states[torch.arange(states.shape[0], device=states.device), first_eos.to(states.device)])


#: A1111's "Emphasis mode" choices (modules/sd_emphasis.py: ``EmphasisOriginal``, ``EmphasisOriginalNoNorm``,
#: ``EmphasisIgnore``, ``EmphasisNone``: the text as it is — brackets and ``BREAK`` literal words, sd_hijack_clip's
#: ``parsed = [[line, 1.0]]``)
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")


def _weighted_only(weighted: Tensor, plain: Tensor) -> Tensor:
    """A1111's "No norm" emphasis: the weighted states (B, L, D) as they are (``plain`` unused)."""
    del plain
    return weighted


def _restore_mean(weighted: Tensor, plain: Tensor, *, over_batch: bool = False) -> Tensor:
    """Emphasis-weighted text states (B, L, D) rescaled so each prompt's mean over (L, D) is its
    unweighted states' ``plain`` (B, L, D) mean again, per prompt, not over the batch (A1111's
    "Original" emphasis; kohya's SD1/SD2 ``lpw_stable_diffusion.get_weighted_text_embeddings``), in
    float32, rounded once to the states' dtype.

    A prompt whose weighted mean is 0 (a ratio ``plain mean / weighted mean`` that is not finite: states all 0, or
    of mean exactly 0) keeps its weighted states unscaled — A1111's "No norm" for that prompt — where A1111's
    ``z * (original_mean / new_mean)`` (``modules/sd_emphasis.py`` ``EmphasisOriginal.after_transformers``, lines
    40-46 at f8391b8a) has no guard and makes every state NaN (0/0) or infinite. A finite ratio is applied as
    A1111 applies it, however large (a weighted mean that is merely near 0).

    ``over_batch``: one mean over the whole batch (B, L, D), as A1111's ``z.mean()`` is — the texts of one prompt's
    schedule are one batch there (:meth:`DiffusersSystem.plan_conditions`), so one text's emphasis rescales the
    others."""
    dims = (0, -2, -1) if over_batch else (-2, -1)
    previous, current = plain.float().mean(dim=dims, keepdim=True), weighted.float().mean(dim=dims, keepdim=True)
    ratio = previous / current
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))  # (weighted mean 0: left unscaled)
    return (weighted.float() * ratio).to(weighted.dtype)


def check_image_size(width: int, height: int, *, multiple: int) -> None:
    """Refuse an image size whose sides are not multiples of ``multiple`` (a model's
    :attr:`DiffusersSystem.size_multiple`), naming the nearest size that is.

    Raises:
        ValueError: ``"image size WxH: both sides must be multiples of M (the nearest: W'xH')"``.
    """
    if height % multiple or width % multiple:
        near = "x".join(str(max(multiple, round(side / multiple) * multiple)) for side in (width, height))
        raise ValueError(f"image size {width}x{height}: both sides must be multiples of {multiple} (the nearest: {near})")


def _weigh_states(states: Tensor, weights: Tensor) -> Tensor:
    """Text states (B, L, D) times per-token weights (B, L), the product in float32 rounded once to
    the states' dtype (kohya multiplies by float32 weights; its half-precision states become
    float32 and the UNet's autocast rounds them back)."""
    return (states.float() * weights.float().unsqueeze(-1)).to(states.dtype)


class DiffusersSystem(nn.Module):
    """UNet + VAE + CLIP text encoder(s) + tokenizer(s) + noise schedule of a Stable Diffusion model.

    Args:
        unet, vae, text_encoder, tokenizer: diffusers/transformers modules; the tokenizer may be
            sdadapt's :class:`~sdadapt.clip_tokenizer.CLIPTokenizer` or a transformers one.
        scheduler_config: the diffusers scheduler config (schedule, ``prediction_type``).
        text_encoder_2, tokenizer_2: SDXL's second (OpenCLIP-bigG, with projection) encoder; with
            ``text_encoder=None, tokenizer=None`` the SDXL refiner's only one (:attr:`is_refiner`).
        model_index: the loaded folder's ``model_index.json`` (what :meth:`save_model` writes).
        clip_skip: 1 = the last layer (default); 2 = the penultimate (A1111/kohya "clip skip"),
            SD1/SD2 only (SDXL always reads the penultimate layers).
        source: the folder or file the model came from (kohya's ``ss_sd_model_name``).
        max_token_length: prompt tokens :meth:`tokenize` keeps: 75 (one CLIP window, default), 150
            or 225 (kohya's ``--max_token_length``: the prompt is encoded in 75-token windows whose
            states are joined, :mod:`sdadapt.text_chunks`).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *, text_encoder_2=None,
                 tokenizer_2=None, model_index: dict | None = None, clip_skip: int = 1,
                 source: str | os.PathLike | None = None, max_token_length: int = 75) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        from .embeddings.tokens import multi_vector_names

        #: several-vector triggers the tokenizer came with (diffusers' whole-pipeline textual inversion: ``<cat>``,
        #: ``<cat>_1`` …): a bare ``<cat>`` in a prompt is expanded to all of them, as diffusers' pipeline does
        self.multi_vector_names = multi_vector_names(tokenizer if tokenizer is not None else tokenizer_2)
        self.is_sdxl = text_encoder_2 is not None
        #: the SDXL refiner: OpenCLIP-bigG alone (no CLIP-L), aesthetic-score conditioning
        self.is_refiner = self.is_sdxl and text_encoder is None
        #: the refiner's ``time_ids`` aesthetic scores for the prompt and the negative (diffusers' defaults)
        self.aesthetic_score, self.negative_aesthetic_score = 6.0, 2.5
        # each tokenizer's window and <EOS>/pad ids, read once: condition() runs inside torch.compile,
        # which cannot trace a tokenizer
        self._window_specs = [_window_spec(t) for t in (tokenizer, tokenizer_2) if t is not None]
        #: token ids of captions seen before, on the host (a training step tokenises the same captions
        #: again: :mod:`sdadapt.token_id_cache`); ``weighted_token_cache``: :meth:`tokenize_weighted`'s
        self.token_cache, self.weighted_token_cache = TokenIdCache(), TokenIdCache()
        self.scheduler_config = dict(scheduler_config)
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        self.clip_skip = int(clip_skip)
        #: A1111's "Emphasis mode" for sampling prompts (:data:`EMPHASIS_MODES`): "Original" (weights, then each
        #: prompt's mean restored), "No norm" (weights only), "Ignore" (the syntax read, the weights not applied),
        #: "None" (no syntax: brackets and ``BREAK`` are words of the text)
        self.emphasis = "Original"
        #: the states of ``""`` kept by :meth:`keep_empty_prompt_states` (``None``: encoded when asked; a buffer outside
        #: the state dict, so that ``.to()`` moves it with the model)
        self.register_buffer("kept_empty_prompt", None, persistent=False)
        self.max_token_length = max_token_length
        self.source = str(source) if source is not None else None
        pipeline = "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"
        if self.is_refiner:
            pipeline = "StableDiffusionXLImg2ImgPipeline"
        elif getattr(getattr(unet, "config", None), "in_channels", 4) == 9:  # (an inpainting UNet: latents, mask, image)
            pipeline = "StableDiffusionXLInpaintPipeline" if self.is_sdxl else "StableDiffusionInpaintPipeline"
        self.model_index = {  # what save_model writes (the loaded folder's entries win)
            "_class_name": pipeline,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
            **({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"]} if self.is_sdxl else {}),
            **({"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True,
                "force_zeros_for_empty_prompt": False} if self.is_refiner else {}),
            **dict(model_index or {}),
        }
        #: SDXL: an empty negative prompt sampled as zeros (its text states and pooled embedding; ``time_ids`` kept,
        #: the refiner's with its negative aesthetic score) instead of the encoded ``""``: diffusers'
        #: ``force_zeros_for_empty_prompt`` of the pipeline config (:attr:`model_index`: the base's True, the
        #: refiner's False). A1111 zeros it on both (modules/sd_models_xl.py ``get_learned_conditioning``:
        #: ``force_zero_negative_prompt``): ``generate --refiner-empty-negative zeros`` sets it on the refiner
        self.zero_empty_negative = self.is_sdxl and bool(self.model_index.get("force_zeros_for_empty_prompt", True))
        self.register_buffer("alphas_cumprod", diffusion.scheduler_alphas_cumprod(scheduler_config), persistent=False)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        from .formats.edm import is_edm_scheduler, vae_latent_stats
        from .samplers.edm import EDMSchedule

        #: the EDM formulation (Playground v2.5: an EDM scheduler class in the config), else ``None``
        #: (:mod:`sdadapt.samplers.edm`)
        self.edm = EDMSchedule.from_config(scheduler_config) if is_edm_scheduler(scheduler_config) else None
        #: the VAE config's ``latents_mean`` / ``latents_std`` (Playground v2.5's), else ``None``
        self.latent_stats = vae_latent_stats(vae.config)
        if self.is_sdxl:
            self.base_model = "sdxl"
        else:
            # SD2's text encoder is OpenCLIP-H as a CLIPTextModel: gelu and 1024 wide (SD1's CLIP-L:
            # quick_gelu, 768); a v-predicting SD2 is SD2-v (768 px) for file metadata
            config = text_encoder.config
            is_sd2 = getattr(config, "hidden_act", "quick_gelu") == "gelu" or int(getattr(config, "hidden_size", 768)) == 1024
            self.base_model = ("sd2-v" if self.prediction_type == "v_prediction" else "sd2") if is_sd2 else "sd1"
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        #: pixels per latent cell (8 for every SD VAE)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_factor
        #: training images' sides must be multiples of this (the VAE's and the UNet's downsampling together: buckets
        #: follow it); a generated image's need only be multiples of :attr:`vae_factor` (:meth:`sample`)
        self.size_multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        #: SDXL takes the original size and crop of each training image (``time_ids``)
        self.size_conditioning = self.is_sdxl
        #: SD 2.1 unCLIP's image side (:class:`sdadapt.unclip.UnclipParts`: encoder, normaliser, noising schedule),
        #: set by the loaders for an unCLIP file or folder; ``None`` otherwise
        self.unclip: Any = None
        #: an unCLIP UNet's class input (1 or B, 2D) for the conditional branch while sampling (A1111's ``c_adm``:
        #: its img2img's noise-augmented embedding of the init image); ``None``: zeros, A1111's txt2img. The
        #: unconditional branch always gets zeros (A1111's ``image_uncond = torch.zeros_like(image_cond)``)
        self.unclip_image: Tensor | None = None

    @property
    def max_token_length(self) -> int:
        """Prompt tokens :meth:`tokenize` keeps: 75, 150 or 225 (kohya's ``max_token_length``)."""
        return self._max_token_length

    @max_token_length.setter
    def max_token_length(self, value: int) -> None:
        from .text_chunks import chunk_count

        chunk_count(value)  # raises for anything but 75, 150, 225
        self._max_token_length = int(value)

    @property
    def _all_tokenizers(self) -> tuple:
        """The tokenizers, in encoder order: (CLIP-L's,), SDXL (CLIP-L's, OpenCLIP-G's), the refiner (OpenCLIP-G's,)."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def _negative_time_ids(self, time_ids: Tensor | None) -> Tensor | None:
        """The refiner's negative ``time_ids``: the prompt's with :attr:`negative_aesthetic_score` last
        (diffusers ``_get_add_time_ids``' ``add_neg_time_ids``); others' unchanged."""
        if not self.is_refiner or time_ids is None:
            return time_ids
        return torch.cat([time_ids[:, :-1], torch.full_like(time_ids[:, -1:], self.negative_aesthetic_score)], dim=1)

    @property
    def architecture(self) -> str:
        """``"sd1"``, ``"sd2"`` or ``"sdxl"`` (the LDM key layout)."""
        return "sdxl" if self.is_sdxl else ("sd1" if self.base_model == "sd1" else "sd2")

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu", clip_skip: int = 1,
                    prediction_type: str | None = None, max_token_length: int = 75,
                    torch_dtypes: dict[str, torch.dtype] | None = None,
                    clip_stats: str | os.PathLike | None = None) -> DiffusersSystem:
        """A diffusers Stable Diffusion folder (SD1/SD2 or SDXL).

        ``torch_dtypes``: ``{"unet"|"vae": dtype}`` to load those in (diffusers' ``torch_dtype``; e.g.
        the dtype their files hold, to write the model out again without a float32 copy); default
        float32 (the text encoders load in the dtype their files hold, as transformers does)."""
        root = Path(folder)
        if not root.is_dir():
            raise ModelFolderError(f"{root}: no such folder; --model takes 'toy', a diffusers Stable Diffusion folder "
                                   "or an SD1/SD2/SDXL .safetensors/.ckpt checkpoint")
        refiner = (root / "text_encoder_2").exists() and not (root / "text_encoder").exists()
        needed = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        if refiner:  # (the SDXL refiner: text_encoder_2/ tokenizer_2/ alone)
            needed = ["model_index.json", "unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"]
        missing = [n for n in needed if not (root / n).exists()]
        if missing:
            raise ModelFolderError(
                f"{root}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}); expected "
                "model_index.json and unet/ vae/ text_encoder/ tokenizer/ scheduler/ as save_pretrained writes them"
            )
        sdxl = (root / "text_encoder_2").exists()
        if sdxl and not (root / "tokenizer_2").exists():
            raise ModelFolderError(f"{root}: an SDXL folder (text_encoder_2/) without tokenizer_2/")
        from .formats.pickles import check_folder_pickles

        check_folder_pickles(root)  # a .bin/.pt that would run code: refused before diffusers sees it (issue 17)
        require_interop("diffusers")
        require_interop("transformers")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        from transformers import CLIPTokenizerFast as CLIPTokenizer  # (transformers 4's CLIPTokenizer is slow)

        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        if prediction_type is not None:
            scheduler_config["prediction_type"] = prediction_type
        extra = {}
        if sdxl:
            extra = {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
                     "tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2")}
        dtypes = {k: {"torch_dtype": v} for k, v in (torch_dtypes or {}).items()}
        system = cls(
            UNet2DConditionModel.from_pretrained(root / "unet", **dtypes.get("unet", {})),
            AutoencoderKL.from_pretrained(root / "vae", **dtypes.get("vae", {})),
            None if refiner else CLIPTextModel.from_pretrained(root / "text_encoder"),
            None if refiner else CLIPTokenizer.from_pretrained(root / "tokenizer"),
            scheduler_config,
            model_index=json.loads((root / "model_index.json").read_text()),
            clip_skip=clip_skip,
            source=root,
            max_token_length=max_token_length,
            **extra,
        )
        unet_config = system.unet.config
        if getattr(unet_config, "class_embed_type", None) == "projection":  # SD 2.1 unCLIP (sdadapt.unclip)
            from .unclip import unclip_parts_from_folder

            system.unclip = unclip_parts_from_folder(
                root, dim=int(unet_config.projection_class_embeddings_input_dim) // 2, clip_stats=clip_stats)
        elif clip_stats is not None:
            raise ValueError(f"{root}: --clip-stats is for SD 2.1 unCLIP models (this UNet takes no image embedding)")
        system.requires_grad_(False)
        return system.eval().to(device)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                         prediction_type: str | None = None, clip_skip: int = 1,
                         device: str | torch.device = "cpu", max_token_length: int = 75,
                         clip_stats: str | os.PathLike | None = None) -> DiffusersSystem:
        """An SD1/SD2/SDXL single-file checkpoint (see the module docstring); SD 2.1 unCLIP files too
        (:mod:`sdadapt.formats.unclip`): ``clip_stats`` is karlo's ``ViT-L-14_stats.th`` an unCLIP-L file's
        normaliser needs (diffusers' ``clip_stats_path``; :class:`sdadapt.unclip.UnclipParts`).

        Args:
            tokenizer: a tokenizer folder (``vocab.json`` + ``merges.txt``; for SDXL a folder
                holding ``tokenizer/`` and ``tokenizer_2/`` works too) or a
                ``bpe_simple_vocab_16e6.txt.gz``; default: sdadapt's shipped CLIP vocabulary.
            prediction_type: ``"epsilon"`` or ``"v_prediction"``; default: the file's ModelSpec
                metadata, else epsilon (SD2-768-v files rarely say so: pass it).

        Raises:
            WeightFileError: not a full SD checkpoint (names what it lacks).
            ImportError: diffusers/transformers missing.
        """
        from .formats.single_file import read_single_file

        checkpoint = read_single_file(path)  # (first: a file that is no SD checkpoint is told so, whatever is installed)
        require_interop("diffusers")
        require_interop("transformers")
        return cls.from_checkpoint(checkpoint, tokenizer=tokenizer, prediction_type=prediction_type,
                                   clip_skip=clip_skip, device=device, max_token_length=max_token_length,
                                   clip_stats=clip_stats)

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, *, tokenizer: str | os.PathLike | None = None,
                        prediction_type: str | None = None, clip_skip: int = 1,
                        device: str | torch.device = "cpu", max_token_length: int = 75,
                        keep_dtypes: bool = False, clip_stats: str | os.PathLike | None = None) -> DiffusersSystem:
        """A single-file checkpoint already read and split (:class:`sdadapt.formats.single_file.SingleFile`,
        e.g. from :func:`~sdadapt.formats.single_file.split_single_file` of a state whose UNet was
        replaced by its EMA copy); the options as :meth:`from_single_file`'s. The modules hold float32
        copies of the file's tensors; ``keep_dtypes=True``: the checkpoint's tensors themselves, each
        in its own dtype (no float32 copy: for writing the model out again, as ``convert`` does; a
        half-precision model is not for running on the CPU)."""
        from .clip_tokenizer import CLIPTokenizer
        from .formats.model_keys import split_components
        from .formats.single_file import text_encoder_config, unet_config, vae_config

        require_interop("diffusers")
        require_interop("transformers")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        architecture = checkpoint.architecture
        prediction = prediction_type or checkpoint.prediction_type
        parts = checkpoint.components
        configs = checkpoint.configs
        refiner = bool(getattr(checkpoint, "refiner", False))
        pooled = parts.get("text_encoder_2", {}).get("text_projection.weight")
        unet = _build(UNet2DConditionModel, configs.get("unet") or unet_config(
            parts["unet"], architecture=architecture, prediction_type=prediction,
            pooled_dim=int(pooled.shape[0]) if pooled is not None else None, refiner=refiner))
        stats = getattr(checkpoint, "edm_stats", None)  # (Playground v2.5: edm_mean / edm_std, sdadapt.formats.edm)
        vae = _build(AutoencoderKL, configs.get("vae") or vae_config(parts["vae"], architecture=architecture,
                                                                     latent_stats=stats))
        modules = {"unet": unet, "vae": vae}
        text_encoder = None
        if not refiner:
            te_config = configs.get("text_encoder") or text_encoder_config(parts["text_encoder"], open_clip=architecture == "sd2")
            with _no_init_weights():  # every weight comes from the file (a CLIP-L random init: ~5 s, OpenCLIP-G several times that)
                text_encoder = modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**te_config))
        extra: dict[str, Any] = {}
        if architecture == "sdxl":
            te2_config = configs.get("text_encoder_2") or text_encoder_config(parts["text_encoder_2"], open_clip=True)
            with _no_init_weights():
                modules["text_encoder_2"] = extra["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
        unclip = getattr(checkpoint, "unclip", None)  # (SD 2.1 unCLIP: the file's image embedder, sdadapt.formats.unclip)
        if clip_stats is not None and unclip is None:
            raise ValueError(f"{checkpoint.path}: --clip-stats is for SD 2.1 unCLIP checkpoints (this one has no image "
                             "embedder / label_emb)")
        if unclip is not None:  # (an unCLIP-H file refuses them before its image encoder is built)
            from .unclip import check_clip_stats_variant

            check_clip_stats_variant(unclip.variant, clip_stats, what=str(checkpoint.path))
        if unclip is not None and "image_encoder" in parts:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            from .formats.unclip import image_encoder_config

            with _no_init_weights():
                modules["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(
                    **(configs.get("image_encoder") or image_encoder_config(parts["image_encoder"], variant=unclip.variant))))
        states = split_components({f"{c}.{k}": v for c, part in parts.items() for k, v in part.items()},
                                  expected={c: m.state_dict().keys() for c, m in modules.items()})
        for name, module in modules.items():
            _load(module, states[name], name=name, source=checkpoint.path, keep_dtypes=keep_dtypes)
        encoder_config = (modules["text_encoder_2"] if refiner else text_encoder).config
        first, second = _tokenizers(tokenizer, architecture, encoder_config, CLIPTokenizer)
        if architecture == "sdxl":
            extra["tokenizer_2"] = second
        schedule = {**(SDXL_SCHEDULE if architecture == "sdxl" else SD_SCHEDULE), "prediction_type": prediction}
        if getattr(checkpoint, "zero_terminal_snr", False):  # (its ztsnr marker: sdadapt.formats.prediction_markers)
            schedule["rescale_betas_zero_snr"] = True
        edm_v = getattr(checkpoint, "edm_v", None)  # (CosXL: ComfyUI's EDM v-prediction σ range)
        if stats is not None or edm_v is not None:  # (diffusers' scheduler config of a Playground v2.5 file, an EDM
            # v-prediction one of a CosXL file; sdadapt's own files say theirs)
            from .formats.edm import PLAYGROUND_SCHEDULER, edm_v_scheduler, is_edm_scheduler

            written = configs.get("scheduler")
            own = PLAYGROUND_SCHEDULER if edm_v is None else edm_v_scheduler(*edm_v)
            schedule = {**(written if isinstance(written, dict) and is_edm_scheduler(written) else own),
                        **({"prediction_type": prediction_type} if prediction_type else {})}
        system = cls(unet, vae, text_encoder, None if refiner else first, schedule, clip_skip=clip_skip, source=checkpoint.path,
                     max_token_length=max_token_length, **extra)
        if unclip is not None:
            from .unclip import unclip_parts_from_file

            system.unclip = unclip_parts_from_file(unclip, modules.get("image_encoder"), clip_stats=clip_stats)
            system.model_index["_class_name"] = "StableUnCLIPImg2ImgPipeline"
        system.requires_grad_(False)
        return system.eval().to(device)

    # ------------------------------------------------------------------------------- saving
    def save_model(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
        ema: Any = None,
    ) -> Path:
        """Write the whole model: UNet, text encoder(s) and VAE (the VAE as loaded).

        ``path`` ending in ``.safetensors`` → one LDM ("compvis") checkpoint, keys through
        :func:`sdadapt.formats.model_keys.diffusers_to_ldm` (``model.diffusion_model.*``,
        ``cond_stage_model.*`` or SDXL's ``conditioner.embedders.*``, ``first_stage_model.*``) with
        ModelSpec metadata and the exact component configs (``sdadapt.configs``); any other path → a
        diffusers folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``, SDXL
        also ``text_encoder_2/ tokenizer_2/``). Both are written atomically.

        Args:
            dtype: cast floating tensors (``torch.float16`` / ``bfloat16``); default: as trained.
            metadata: extra string metadata (LDM file) — e.g. the training recipe.
            ema: an average of the UNet to store *beside* the weights
                (:class:`sdadapt.methods.finetune.EMAWeights`: ``unet`` state dict, ``decay``,
                ``updates``). LDM file: CompVis ``LitEma``'s layout — ``model_ema.<LDM UNet key without
                "model." and without dots>`` plus ``model_ema.decay`` (float32) and
                ``model_ema.num_updates`` (int32); A1111/ComfyUI load the raw weights and ignore them,
                diffusers' converters read them with ``extract_ema=True``. Folder: ``unet_ema/``
                as diffusers' ``EMAModel.save_pretrained`` writes it (a UNet folder whose config also
                holds ``decay``, ``optimization_step`` ...; ``EMAModel.from_pretrained`` reads it; the
                pipeline ignores it).

        Raises:
            FileExistsError: ``path`` exists (remove it or write elsewhere).
        """
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"{target}: already exists; remove it or choose another output")
        if target.suffix.lower() == ".safetensors":
            return self._save_ldm(target, dtype, metadata or {}, ema)
        if target.suffix:
            raise ValueError(f"{target}: write a .safetensors LDM checkpoint or a folder (a path without a suffix)")
        return self._save_folder(target, dtype, ema)

    def components(self) -> dict[str, nn.Module]:
        """The weighted pipeline parts :meth:`save_model` writes, by diffusers folder name:
        ``{"unet", "text_encoder", "vae"}`` (SDXL also ``"text_encoder_2"``); the modules themselves."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}
        if self.is_refiner:  # (the SDXL refiner: no CLIP-L)
            del parts["text_encoder"]
        if self.is_sdxl:
            parts["text_encoder_2"] = self.text_encoder_2
        if self.unclip is not None and self.unclip.has_encoder:  # (SD 2.1 unCLIP's CLIP image encoder)
            parts["image_encoder"] = self.unclip.image_encoder
        return parts

    def _save_ldm(self, target: Path, dtype: torch.dtype | None, metadata: dict[str, str], ema: Any = None) -> Path:
        from .formats.files import write_safetensors
        from .formats.model_keys import diffusers_to_ldm, ema_key, join_components
        from .formats.prediction_markers import marker_tensors
        from .formats.single_file import CONFIG_METADATA_KEY

        state = {k: v.detach() for k, v in join_components({c: m.state_dict() for c, m in self.components().items()}).items()}
        ldm = diffusers_to_ldm(state, architecture=self.architecture)
        if ema is not None:  # CompVis LitEma naming
            averaged = diffusers_to_ldm({f"unet.{k}": v.detach() for k, v in ema.unet.items()}, architecture=self.architecture)
            ldm.update({ema_key(k): v for k, v in averaged.items()})
        if dtype is not None:
            ldm = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ldm.items()}
        edm_v = self.edm is not None and self.latent_stats is None  # (CosXL: ComfyUI's EDM v-prediction markers)
        if self.edm is not None and not edm_v:  # (Playground v2.5: the file says EDM by its latent statistics, float32)
            from .formats.edm import edm_stat_tensors

            ldm.update(edm_stat_tensors(*self.latent_stats))
        elif edm_v:
            from .formats.edm import EDM_V_SIGMA_DATA
            from .formats.prediction_markers import edm_v_tensors

            if self.edm.prediction_type != "v_prediction" or self.edm.sigma_data != EDM_V_SIGMA_DATA:
                raise ValueError(f"{target}: an LDM file tells an EDM model by Playground v2.5's edm_mean / edm_std "
                                 "(this model's VAE config has no latents_mean / latents_std) or by ComfyUI's "
                                 f"edm_vpred.* markers (v-prediction at σ_data {EDM_V_SIGMA_DATA:g}; this one: "
                                 f"{self.edm.prediction_type} at σ_data {self.edm.sigma_data:g}); write a diffusers "
                                 "folder instead")
            ldm.update(edm_v_tensors(self.edm.sigma_min, self.edm.sigma_max))
        if self.unclip is not None:  # (the noise augmentor's schedule buffers and A1111's unCLIP marker)
            ldm.update(self.unclip.ldm_tensors())
        # (v_pred / ztsnr, as ComfyUI and A1111 read them: sdadapt.formats.prediction_markers)
        ldm.update(marker_tensors(architecture=self.architecture, zero_terminal_snr=self.zero_terminal_snr,
                                  v_prediction=self.prediction_type == "v_prediction" and not edm_v))  # (ComfyUI's
        # CheckpointSave writes no v_pred for its EDM v-prediction models: the edm_vpred.* keys say it)
        if ema is not None:
            ldm["model_ema.decay"] = torch.tensor(float(ema.decay), dtype=torch.float32)
            ldm["model_ema.num_updates"] = torch.tensor(int(ema.updates), dtype=torch.int32)
        architecture = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
                        "sdxl": "stable-diffusion-xl-v1-refiner" if self.is_refiner else "stable-diffusion-xl-v1-base"}
        configs = {name: _plain_config(module.config) for name, module in self.components().items()}
        if self.edm is not None:  # (an EDM model's σ range, σ_data, grid: other tools assume Playground's, sdadapt reads these)
            configs["scheduler"] = dict(self.scheduler_config)
        implementation = {"sd1": "https://github.com/CompVis/stable-diffusion",
                          "sdxl": "https://github.com/Stability-AI/generative-models"}
        meta = {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": architecture.get(self.base_model, self.base_model),
            "modelspec.implementation": implementation.get(self.base_model, "https://github.com/Stability-AI/stablediffusion"),
            "modelspec.title": target.stem,
            "modelspec.resolution": f"{self.image_size}x{self.image_size}",
            # (kohya's ModelSpec says it either way: a reader need not guess an SD2 file's from its weights)
            "modelspec.prediction_type": "v" if self.prediction_type == "v_prediction" else "epsilon",
            CONFIG_METADATA_KEY: json.dumps(configs),
            **metadata,
        }
        return write_safetensors(target, ldm, meta)

    def _save_folder(self, target: Path, dtype: torch.dtype | None, ema: Any = None) -> Path:
        from .clip_tokenizer import CLIPTokenizer
        from .formats.files import make_output_folder, remove_stale_temporaries, signals_held

        folder = make_output_folder(target)  # (a missing folder, with its parents, as kohya's output_dir)
        remove_stale_temporaries(target)  # (a killed writer's folder: its pid is in the name)
        tmp = None
        try:
            with signals_held():  # a signal between making the folder and naming it would leave it behind
                tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=folder))
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700: the folder gets the umask's mode like any other
            unclip_index = self.unclip.write_folder(tmp) if self.unclip is not None else {}
            for component, module in self.components().items():
                if dtype is not None:
                    module = copy.deepcopy(module).to(dtype)
                if component.startswith("text_encoder"):  # (transformers 5 saves a CLIPTextModel's keys without
                    # text_model., which transformers 4 — kohya's, A1111's — loads as a random encoder with a warning,
                    # and diffusers' LDM script writes under the wrong names: written with it, as every hub folder is)
                    from .formats.clip_keys import add_text_model

                    module.save_pretrained(tmp / component, state_dict={
                        add_text_model(key, ""): value for key, value in module.state_dict().items()})
                else:
                    module.save_pretrained(tmp / component)
            if ema is not None:
                self._save_ema_folder(tmp / "unet_ema", ema, dtype)
            for name in ("tokenizer", "tokenizer_2") if self.is_sdxl else ("tokenizer",):
                tokenizer = getattr(self, name)
                if tokenizer is None:  # (the SDXL refiner's absent CLIP-L tokenizer)
                    continue
                if isinstance(tokenizer, CLIPTokenizer):
                    tokenizer.save_folder(tmp / name)
                else:
                    tokenizer.save_pretrained(tmp / name)
                    _add_vocabulary_files(tmp / name, tokenizer)
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
            index = {k: v for k, v in self.model_index.items() if k.startswith("_") or k in _WRITTEN}
            if "_diffusers_version" not in index:  # (diffusers' pipeline loaders read it: a KeyError without)
                import diffusers

                index["_diffusers_version"] = diffusers.__version__
            if self.is_refiner:  # (StableDiffusionXLImg2ImgPipeline's registered config of the refiner)
                index.update({k: self.model_index[k] for k in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")
                              if k in self.model_index})
            if index.get("_class_name", "").startswith("StableDiffusion"):  # parts not written: absent
                index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                             requires_safety_checker=False)
                if self.is_sdxl:
                    index.pop("safety_checker")
                    index.pop("requires_safety_checker")
            index.update(unclip_index)  # (SD 2.1 unCLIP: StableUnCLIPImg2ImgPipeline's parts)
            if unclip_index and not self.unclip.has_encoder:
                index["image_encoder"] = [None, None]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _save_ema_folder(self, folder: Path, ema: Any, dtype: torch.dtype | None) -> None:
        """``unet_ema/`` as diffusers' ``EMAModel.save_pretrained``: the UNet config plus the EMA's own fields."""
        from .formats.files import write_safetensors

        folder.mkdir()
        config = json.loads(self.unet.to_json_string())
        # EMAModel.state_dict() minus shadow_params; sdadapt's EMA is diffusers' default warm-up rule
        config.update(decay=float(ema.decay), min_decay=0.0, optimization_step=int(ema.updates), update_after_step=0,
                      use_ema_warmup=False, inv_gamma=1.0, power=2 / 3)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach() for k, v in ema.unet.items()}
        write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors, {"format": "pt"})

    # ------------------------------------------------------------------------------- the protocol
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """:attr:`latent_stats` as (1, C, 1, 1) tensors on ``like``'s device and dtype."""
        mean, std = self.latent_stats
        return (torch.tensor(mean).view(1, -1, 1, 1).to(like.device, like.dtype),
                torch.tensor(std).view(1, -1, 1, 1).to(like.device, like.dtype))

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) (posterior mean × scaling factor; with the VAE
        config's ``latents_mean`` / ``latents_std``, ``(mean − latents_mean) · scaling / latents_std`` as diffusers'
        SDXL img2img pipeline encodes).

        ``generator``: a posterior *sample* in place of the mean, ``mean + std · ε`` with ε (B, 4, H/8, W/8) drawn
        from ``generator`` in the VAE's dtype (diffusers' ``DiagonalGaussianDistribution.sample`` through its img2img
        pipelines' ``retrieve_latents``, :func:`sdadapt.img2img.init_generator`); ``None``: the mean, bit for bit as
        ever."""
        return self.scale_vae_latents(self.vae_latents(images, generator=generator))

    @torch.no_grad()
    def vae_latents(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> the VAE's posterior mean (B, 4, H/8, W/8), not yet scaled: what kohya's
        latent ``.npz`` files hold (:mod:`sdadapt.training.kohya_latent_files`); ``generator``: a posterior sample
        drawn from it in place of the mean (:meth:`encode_images`)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean if generator is None else posterior.sample(generator)

    def scale_vae_latents(self, latents: Tensor) -> Tensor:
        """Unscaled VAE latents (B, C, h, w) -> the latents the UNet takes (× scaling factor; with the VAE config's
        ``latents_mean`` / ``latents_std``, ``(latents − latents_mean) · scaling / latents_std``); elementwise, so
        a latent scales to the same bits alone or in any batch."""
        if self.latent_stats is not None:
            mean, std = self._stats(latents)
            return (latents - mean) * self.scaling_factor / std
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, *, clamp: bool = True) -> Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (with the VAE config's ``latents_mean`` /
        ``latents_std``: ``latents · latents_std / scaling + latents_mean`` first, diffusers' SDXL pipeline's rule).
        ``clamp=False``: the VAE's output as it is (A1111's ``decode_first_stage``, which the hires pass's image
        conditioning takes unclamped)."""
        latents = latents.to(self.vae.dtype)
        if self.latent_stats is not None:
            mean, std = self._stats(latents)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        images = self.vae.decode(latents).sample.float()
        return images.clamp(-1, 1) if clamp else images

    def decode_latents_with_grad(self, latents: Tensor) -> Tensor:
        """:meth:`decode_latents` unclamped with autograd through the decoder (its weights stay frozen): latents
        (B, C, h, w) -> images (B, 3, 8h, 8w), differentiable in ``latents`` — A1111's
        ``decode_first_stage.__wrapped__``, which DreamArtist's reconstruction loss decodes with. Each decoder
        block is gradient-checkpointed for the call (diffusers' ``enable_gradient_checkpointing``), so the
        backward keeps one block's activations at a time."""
        vae = self.vae
        was = bool(getattr(vae, "is_gradient_checkpointing", False))
        if not was:
            vae.enable_gradient_checkpointing()
        try:
            with torch.enable_grad():
                latents = latents.to(vae.dtype)
                if self.latent_stats is not None:
                    mean, std = self._stats(latents)
                    latents = latents * std / self.scaling_factor + mean
                else:
                    latents = latents / self.scaling_factor
                return vae.decode(latents).sample.float()
        finally:
            if not was:
                vae.disable_gradient_checkpointing()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent (C, h, w) of a ``height`` x ``width`` image."""
        # (the VAE's latent channels: an inpainting UNet takes 9 in, the latent's 4 plus its image conditioning)
        return int(self.vae.config.latent_channels), height // self.vae_factor, width // self.vae_factor

    def inpainting_conditioning(self, images: Tensor, mask: Tensor, *,
                                generator: torch.Generator | None = None) -> Tensor:
        """An inpainting UNet's ``c_concat`` (B, 5, h, w) for the masked images ``images`` (B, 3, H, W) in [-1, 1]
        (:func:`sdadapt.inpaint.masked_image`) and their pixel ``mask`` (1, 1, H, W) of 0 / 1
        (:func:`sdadapt.inpaint.image_conditioning`; the latent is the VAE posterior's mean, as
        :meth:`encode_images`; with ``generator`` a posterior sample drawn from it, as diffusers' inpaint pipelines'
        ``prepare_mask_latents`` → ``_encode_vae_image(masked_image, generator=generator)``)."""
        from .inpaint import image_conditioning

        images = images.to(self.alphas_cumprod.device)
        if generator is None:  # (the mean, as ever)
            return image_conditioning(mask, self.encode_images(images))
        return image_conditioning(mask, self.encode_images(images, generator=generator))

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, L); SDXL: both tokenizers' ids stacked, (B, 2, L).

        ``L = 77`` for :attr:`max_token_length` 75; 152 or 227 for 150 or 225 (``n * 75 + 2``:
        :meth:`condition` encodes them in ``n`` windows, :mod:`sdadapt.text_chunks`).
        """
        from .text_chunks import long_prompt_length

        device = self.alphas_cumprod.device
        length = long_prompt_length(self.max_token_length, window=int(self._all_tokenizers[0].model_max_length))
        prompts = self._expand_multi_vector(prompts)

        def encode(texts: list[str]) -> tuple[Tensor]:
            ids = _token_ids(self._all_tokenizers[0], texts, length)  # (B, L) (the refiner: OpenCLIP-G's alone)
            if self.is_sdxl and not self.is_refiner:
                ids = torch.stack([ids, _token_ids(self.tokenizer_2, texts, length)], dim=1)  # (B, 2, L)
            return (ids,)

        (ids,) = self._cached_ids(self.token_cache, prompts, encode, length)
        return copy_to_device(ids, device)  # (a training step tokenises each batch: no wait on a GPU)

    def tokenize_weighted(self, prompts: list[str], *, a1111: bool = False) -> dict[str, Tensor]:
        """kohya's ``--weighted_captions``: prompts with A1111 emphasis (``(word:1.2)``, ``[word]``) ->
        ``{"ids": ids, "weights": weights}`` for :meth:`condition`, both (B, L) (SDXL: (B, 2, L), one
        row per tokenizer); :func:`sdadapt.prompt_weights.weighted_token_ids`. A prompt without
        brackets gives :meth:`tokenize`'s ids and weights of 1. ``a1111``: the emphasis read by A1111's
        pattern (``(cat: 1.2)`` is cat at 1.2; kohya's reads ``: 1.2`` as text), for ``generate``."""
        from .prompt_weights import weighted_token_ids
        from .text_chunks import long_prompt_length

        device = self.alphas_cumprod.device
        length = long_prompt_length(self.max_token_length, window=int(self._all_tokenizers[0].model_max_length))
        prompts = self._expand_multi_vector(prompts)

        def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
            ids, weights = weighted_token_ids(self._all_tokenizers[0], texts, length, a1111=a1111)  # (B, L) each
            if self.is_sdxl and not self.is_refiner:
                ids_2, weights_2 = weighted_token_ids(self.tokenizer_2, texts, length, a1111=a1111)
                ids, weights = torch.stack([ids, ids_2], dim=1), torch.stack([weights, weights_2], dim=1)  # (B, 2, L)
            return ids, weights

        ids, weights = self._cached_ids(self.weighted_token_cache, prompts, encode, length,
                                        rules=("a1111",) if a1111 else ())
        return {"ids": copy_to_device(ids, device), "weights": copy_to_device(weights, device)}

    def _expand_multi_vector(self, prompts: str | list[str]) -> str | list[str]:
        """Each of :attr:`multi_vector_names` written bare expanded to its vectors' tokens (idempotent:
        :func:`~sdadapt.embeddings.tokens.expand_prompt`)."""
        if not self.multi_vector_names:
            return prompts
        from .embeddings.tokens import expand_prompt

        def expand(text: str) -> str:
            for name, count in self.multi_vector_names.items():
                text = expand_prompt(text, name, count)
            return text

        return expand(prompts) if isinstance(prompts, str) else [expand(p) for p in prompts]

    def _cached_ids(self, cache: TokenIdCache, prompts: str | list[str],
                    encode: Callable[[list[str]], tuple[Tensor, ...]], length: int,
                    rules: tuple = ()) -> tuple[Tensor, ...]:
        """``encode(prompts)`` (host tensors, each (B, ...)) with captions seen before taken from
        ``cache``, keyed by what besides a prompt's text decides its ids (the length, ``rules``, the
        tokenizers' state: :func:`~sdadapt.token_id_cache.tokenizer_state`); uncached for a tokenizer
        whose state cannot be read."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        state: tuple = (length, self.is_sdxl, *rules)
        for tokenizer in self._all_tokenizers:
            part = tokenizer_state(tokenizer)
            if part is None:
                return encode(prompts)
            state += part
        return cache.lookup(prompts, encode, state=state)

    def _windows(self, encoder: int, ids: Tensor) -> tuple[Tensor, int]:
        """(B, L) ids of text encoder ``encoder`` (0, SDXL 1) -> ((B * n, C) encoder windows, n);
        ``L = C``: the ids as they are, n = 1."""
        from .text_chunks import chunk_token_ids

        spec = self._window_specs[encoder]
        if ids.shape[-1] == spec["window"]:
            return ids, 1
        chunks = chunk_token_ids(ids, **spec)  # (B, n, C)
        return chunks.reshape(-1, spec["window"]), chunks.shape[1]

    def _hidden(self, encoder, ids: Tensor, *, penultimate: bool) -> Any:
        out = encoder(ids, output_hidden_states=penultimate or self.clip_skip > 1)
        if self.is_sdxl:
            return out
        if self.clip_skip > 1:
            hidden = out.hidden_states[-self.clip_skip]
            final_norm = getattr(getattr(encoder, "text_model", encoder), "final_layer_norm")
            return final_norm(hidden)
        return out[0]

    def condition(self, ids: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Token ids -> the UNet's conditioning.

        SD1/SD2: (B, L, D) text states. SDXL: ``{"context": (B, L, 2048), "text_embeds":
        (B, 1280), "time_ids": (B, 6)}``; pass ``{"ids": (B, 2, L), "time_ids": (B, 6)}`` to set
        the size/crop conditioning (default: the native size, no crop). ``L = 77``, or
        ``n * 75 + 2`` ids of a long prompt (:meth:`tokenize` with :attr:`max_token_length` 150 /
        225): encoded in ``n`` windows whose states are joined as kohya does (clip skip applies to
        each window; SDXL's ``text_embeds`` are the first window's), :mod:`sdadapt.text_chunks`.
        SDXL's ``text_embeds`` are the second encoder's state at the first ``<EOS>``, projected (kohya's
        ``_pool_workaround``: an added textual-inversion token does not move it, :func:`_eos_pooled`).
        A ``"weights"`` entry (the ids' shape, :meth:`tokenize_weighted`) multiplies each token's
        text states (SDXL: each encoder's by its row; not ``text_embeds``), kohya's weighted captions.
        """
        from .text_chunks import merge_chunk_states

        time_ids = weights = None
        if isinstance(ids, dict):
            time_ids, weights, ids = ids.get("time_ids"), ids.get("weights"), ids["ids"]
        if weights is not None and weights.shape != ids.shape:
            raise ValueError(f"token weights {tuple(weights.shape)} must have the ids' shape {tuple(ids.shape)} "
                             "(DiffusersSystem.tokenize_weighted makes both)")
        if not self.is_sdxl:
            windows, n = self._windows(0, ids)
            states = self._hidden(self.text_encoder, windows, penultimate=False)  # (B * n, C, D)
            states = states if n == 1 else merge_chunk_states(states, chunks=n)  # (B, L, D)
            return states if weights is None else _weigh_states(states, weights)
        if self.is_refiner:
            return self._refiner_condition(ids, weights, time_ids)
        if ids.ndim != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXL conditions on (B, 2, L) ids (both tokenizers), got {tuple(ids.shape)}")
        (windows_1, n), (windows_2, _) = self._windows(0, ids[:, 0]), self._windows(1, ids[:, 1])
        first = self.text_encoder(windows_1, output_hidden_states=True)
        second = self.text_encoder_2(windows_2, output_hidden_states=True)
        states_1, states_2 = first.hidden_states[-2], second.hidden_states[-2]
        pooled = _eos_pooled(self.text_encoder_2, second, windows_2, eos_id=self._window_specs[1]["eos_id"])  # (B * n, P)
        if n > 1:  # (B * n, C, D) windows -> (B, n * (C - 2) + 2, D); the pooled output of each prompt's first window
            states_1, states_2 = merge_chunk_states(states_1, chunks=n), merge_chunk_states(states_2, chunks=n)
            pooled = pooled[::n]
        if weights is not None:  # (B, 2, L): each encoder's states by its own tokenizer's weights
            states_1, states_2 = _weigh_states(states_1, weights[:, 0]), _weigh_states(states_2, weights[:, 1])
        context = torch.cat([states_1, states_2], dim=-1)
        if time_ids is None:
            # made on the device (no host copy: this runs inside a captured CUDA-graph step too)
            time_ids = context.new_full((ids.shape[0], 6), float(self.image_size), dtype=torch.float32)
            time_ids[:, 2:4] = 0.0  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
        # float32 whatever the text states' dtype: bfloat16 rounds sizes above 256 (1365 -> 1368); the UNet embeds the
        # ids in float32 and casts the embedding, as kohya's get_size_embeddings
        return {"context": context, "text_embeds": pooled, "time_ids": time_ids.to(device=context.device, dtype=torch.float32)}

    def _refiner_condition(self, ids: Tensor, weights: Tensor | None, time_ids: Tensor | None) -> dict[str, Tensor]:
        """The SDXL refiner's :meth:`condition`: (B, L) OpenCLIP-G ids -> ``{"context": (B, L, 1280)`` penultimate
        states, ``"text_embeds": (B, 1280)`` the projected pooled output, ``"time_ids": (B, 5)}`` (default: the
        native size, no crop, :attr:`aesthetic_score`) — diffusers' ``encode_prompt`` with ``text_encoder=None``."""
        from .text_chunks import merge_chunk_states

        if ids.ndim != 2:
            raise ValueError(f"the SDXL refiner conditions on (B, L) ids of its one tokenizer, got {tuple(ids.shape)}")
        windows, n = self._windows(0, ids)
        out = self.text_encoder_2(windows, output_hidden_states=True)
        states = out.hidden_states[-2]  # (B * n, C, 1280)
        pooled = _eos_pooled(self.text_encoder_2, out, windows, eos_id=self._window_specs[0]["eos_id"])  # (B * n, P)
        if n > 1:
            states, pooled = merge_chunk_states(states, chunks=n), pooled[::n]
        if weights is not None:
            states = _weigh_states(states, weights)
        if time_ids is None:  # (orig_h, orig_w, crop_top, crop_left, aesthetic_score)
            time_ids = states.new_full((ids.shape[0], 5), float(self.image_size), dtype=torch.float32)
            time_ids[:, 2:4] = 0.0
            time_ids[:, 4] = self.aesthetic_score
        return {"context": states, "text_embeds": pooled, "time_ids": time_ids.to(device=states.device, dtype=torch.float32)}

    def denoiser(self):
        """``model(x_t, t, cond) -> prediction`` over :meth:`condition`'s output."""
        width = self._unclip_width()
        if width:  # SD 2.1 unCLIP: a dict condition carries the class input (_unclip_conditions), else zeros
            def model_unclip(x: Tensor, t: Tensor, cond: Any) -> Tensor:
                if isinstance(cond, dict):
                    return self.unet(x, t, cond["context"], class_labels=cond["class_labels"]).sample
                return self.unet(x, t, cond, class_labels=x.new_zeros(x.shape[0], width)).sample

            return model_unclip
        if not self.is_sdxl:
            def model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
                return self.unet(x, t, cond).sample

            return model

        def model_xl(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return self.unet(x, t, cond["context"], added_cond_kwargs=added).sample

        return model_xl

    def _unclip_width(self) -> int | None:
        """2D, an SD 2.1 unCLIP UNet's class input width (``class_embed_type="projection"``), else ``None``."""
        config = self.unet.config
        if getattr(config, "class_embed_type", None) != "projection":
            return None
        return int(config.projection_class_embeddings_input_dim)

    def _unclip_conditions(self, conds: list, *, negative: bool) -> list:
        """Text conditions (B, L, D) as an unCLIP UNet's ``{"context", "class_labels"}``: :attr:`unclip_image` for the
        conditional branch, zeros for the unconditional one (A1111's ``CFGDenoiser``: ``image_uncond =
        torch.zeros_like(image_cond)`` for ``crossattn-adm`` models; its txt2img's ``image_cond`` is zeros too)."""
        width = self._unclip_width()
        if not width or self.unclip_image is None:
            return conds
        out = []
        for cond in conds:
            batch = cond.shape[0]
            image = self.unclip_image.to(device=cond.device, dtype=cond.dtype)
            if image.shape[-1] != width or image.shape[0] not in (1, batch):
                raise ValueError(f"unclip_image {tuple(image.shape)} does not fit this unCLIP UNet: (1 or {batch}, {width})")
            labels = torch.zeros(batch, width, device=cond.device, dtype=cond.dtype) if negative else image.expand(batch, -1)
            out.append({"context": cond, "class_labels": labels})
        return out

    def negative_condition(self, negative: str, cond: Any) -> Any:
        """The unconditional branch's condition that :meth:`sample` pairs with ``cond`` (one :meth:`condition`
        output, batch B) for the negative prompt ``negative``: SDXL's empty negative is zeros — its text states
        and its pooled ``text_embeds`` (``time_ids`` kept) — under ``force_zeros_for_empty_prompt``
        (:attr:`zero_empty_negative`: diffusers' ``StableDiffusionXLPipeline.encode_prompt`` zeroes both
        ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``), else the encoded negative. Used by
        :func:`sdadapt.inversion.invert_image` so that an inversion's null branch is the sampler's."""
        context = cond["context"] if isinstance(cond, dict) else cond
        time_ids = cond.get("time_ids") if isinstance(cond, dict) else None
        # (breaks: BREAK / long negatives in A1111's chunks, as generate's prompt plans read them; :meth:`prompt_condition`)
        return self._uncond(negative, cond, int(context.shape[0]), time_ids, breaks=True)

    def prompt_condition(self, prompt: str) -> Any:
        """The condition (batch 1, native size) that ``generate`` samples ``prompt`` with: A1111 emphasis
        (``(cat:1.3)``, ``[cat]``, blanks around a weight allowed), ``BREAK`` and — with :attr:`max_token_length`
        75 — a prompt longer than 75 tokens in A1111's chunks (:meth:`_prompt_condition` with ``breaks``, the path
        of a prompt plan). A prompt without brackets, backslashes, ``BREAK`` nor over 75 tokens: exactly
        ``condition(tokenize([prompt]))``. Used by :func:`sdadapt.inversion.invert_image` and
        :func:`~sdadapt.inversion.regenerate_image` so that an inversion reconstructs and edits what ``generate``
        samples for that text. One text only: prompt editing ``[a:b:n]``, alternation ``[a|b]`` and ``AND`` are
        plans of several texts switched per model call, which this does not read (it would take their brackets for
        emphasis); the inversion reads them with :func:`sdadapt.prompt_guidance.plan_prompt` and
        :meth:`plan_conditions`, each text conditioned by this same rule."""
        return self._prompt_condition([prompt], None, breaks=True)

    def emphasised_prompt(self, prompt: str) -> tuple[Tensor, Any]:
        """``(ids, condition)`` of one prompt read with A1111's emphasis in one window (batch 1, native size; a
        longer prompt cut as :meth:`tokenize` cuts it, ``BREAK`` a word): the ids the emphasis leaves (the brackets
        and weights taken out, :meth:`tokenize_weighted`) (1, L), and their condition with the weights applied by
        :attr:`emphasis` (:meth:`_emphasised`, A1111's "Original" by default). What A1111's aesthetic-gradients hook
        is handed (``remade_batch_tokens`` and ``z``); with :attr:`emphasis` "None" :meth:`tokenize`'s ids and
        :meth:`condition`."""
        if self._literal_prompts() or not any(mark in prompt for mark in "()[]\\"):
            ids = self.tokenize([prompt])
            return ids, self.condition(ids)
        weighted = self.tokenize_weighted([prompt], a1111=True)
        return weighted["ids"], self._emphasised(weighted["ids"], weighted["weights"], None)

    def _padding(self, pad_conds: Any, time_ids: Tensor | None) -> Any:
        """``pad_conds`` padding with this model's states of ``""`` (A1111's ``cond_stage_model_empty_prompt``: each
        model its own, the refiner's too), or ``None``."""
        return None if pad_conds is None else pad_conds.for_model(lambda: self.empty_prompt_states(time_ids))

    def empty_prompt_states(self, time_ids: Tensor | None = None) -> Tensor:
        """The text states (1, 77, D) of the empty prompt ``""`` as :meth:`sample` encodes a prompt (SDXL: the two
        encoders' joined states, not zeroed): A1111's ``cond_stage_model_empty_prompt``, what its "Pad
        prompt/negative prompt" pads with (:mod:`sdadapt.cond_padding`). Those :meth:`keep_empty_prompt_states`
        kept, once it ran; else encoded now, with the text encoder as it is."""
        from .cond_padding import condition_states

        if self.kept_empty_prompt is not None:
            return self.kept_empty_prompt
        time_ids = self._size_time_ids(1, self.image_size, self.image_size) if time_ids is None else time_ids[:1]
        return condition_states(self._prompt_condition([""], time_ids, breaks=True))[:1]

    def rescale_to_zero_terminal_snr(self) -> None:
        """Sample on the zero-terminal-SNR schedule from here on, as A1111's setting "Noise schedule for sampling: Zero
        Terminal SNR" does (``apply_alpha_schedule_override``): ᾱ rescaled as A1111 rescales it
        (:func:`sdadapt.training.diffusion.a1111_zero_terminal_snr_alphas_cumprod`) and the scheduler config's
        ``rescale_betas_zero_snr`` set (a model saved afterwards says so). Nothing changes on a model that is already
        (:attr:`zero_terminal_snr`: a ``ztsnr`` checkpoint or such a config).

        Raises:
            ValueError: an EDM model (Playground v2.5, CosXL), whose σ do not come from ᾱ.
        """
        if self.zero_terminal_snr:
            return
        if self.edm is not None:
            raise ValueError("the zero-terminal-SNR noise schedule rescales the model's ᾱ; an EDM model (Playground "
                             "v2.5) samples on its own σ range instead: leave it out")
        self.scheduler_config = {**self.scheduler_config, "rescale_betas_zero_snr": True}
        self.alphas_cumprod = diffusion.scheduler_alphas_cumprod(self.scheduler_config).to(self.alphas_cumprod.device)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the model samples on the zero-terminal-SNR schedule (its scheduler config's
        ``rescale_betas_zero_snr``: a diffusers folder's, a single file's ``ztsnr`` marker, or
        :meth:`rescale_to_zero_terminal_snr`): ᾱ rescaled as A1111 rescales it, the last 0."""
        return bool(self.scheduler_config.get("rescale_betas_zero_snr", False))

    @torch.no_grad()
    def keep_empty_prompt_states(self) -> Tensor:
        """Encode ``""`` now (:meth:`empty_prompt_states`, (1, 77, D)) and pad with these states from here on, as A1111
        encodes its ``cond_stage_model_empty_prompt`` once when it loads a checkpoint, with no network active: call it
        before merging a LoRA into the text encoder (``generate --pad-conds`` does) for A1111's padding under a
        text-encoder LoRA. ``kept_empty_prompt = None`` forgets them."""
        self.kept_empty_prompt = None
        self.kept_empty_prompt = self.empty_prompt_states()
        return self.kept_empty_prompt

    def plan_conditions(self, plan: Any, *, count: int = 1, time_ids: Tensor | None = None) -> tuple[list, list]:
        """``(conds, negatives)``: the condition of each text of a :class:`~sdadapt.prompt_guidance.PromptPlan`
        (``plan.texts``, then ``plan.negative_texts``; batch ``count``), as :meth:`sample` conditions a plan —
        A1111 emphasis, ``BREAK`` and long-prompt chunks (:meth:`_prompt_condition` with ``breaks``); the
        negatives with the refiner's negative aesthetic score, SDXL's empty negative zeros only when it is the
        schedule's one text (:meth:`negative_condition`). ``time_ids``: SDXL's size conditioning (default: the
        native size's). Used by :func:`sdadapt.inversion.invert_image` too, so an inversion reads a plan's texts as
        ``generate`` does."""
        if time_ids is None:
            time_ids = self._size_time_ids(count, self.image_size, self.image_size)
        # A1111's get_learned_conditioning encodes the texts of one (sub-)prompt's schedule as one batch: each padded
        # to the batch's chunk count, the "Original" emphasis mean taken over the batch
        conds: list[Any] = [None] * len(plan.texts)
        for schedule, _ in plan.parts:
            order = list(dict.fromkeys(schedule.texts))  # (the schedule's texts, each once, in its order)
            for index, cond in zip(order, self._schedule_conditions([plan.texts[i] for i in order], count, time_ids)):
                conds[index] = cond if conds[index] is None else conds[index]  # (a text two parts share: the first's)
        conds = [self._prompt_condition([text] * count, time_ids, breaks=True) if cond is None else cond
                 for text, cond in zip(plan.texts, conds)]
        # (SDXL zeros an empty negative only when all its schedule's texts are empty: A1111 zeros a batch
        # of texts that are all '', and the schedule's texts are one batch there)
        if len(plan.negative_texts) == 1:
            negatives = [self._uncond(plan.negative_texts[0], conds[0], count, time_ids, breaks=True)]
        else:
            negatives = self._schedule_conditions(list(plan.negative_texts), count, self._negative_time_ids(time_ids))
        return conds, negatives

    def _schedule_conditions(self, texts: list[str], count: int, time_ids: Tensor | None) -> list[Any]:
        """The conditions (batch ``count`` each) of one schedule's ``texts`` encoded as one batch, as A1111 encodes
        them (:meth:`plan_conditions`); one text: :meth:`_prompt_condition` of it."""
        if len(texts) == 1:
            return [self._prompt_condition([texts[0]] * count, time_ids, breaks=True)]
        batch = [text for text in texts for _ in range(count)]
        batch_time_ids = None if time_ids is None else time_ids.repeat(len(texts), 1)
        joined = self._prompt_condition(batch, batch_time_ids, breaks=True, batch_mean=True)

        def rows(k: int) -> Any:
            if isinstance(joined, dict):
                return {key: value[k * count:(k + 1) * count] for key, value in joined.items()}
            return joined[k * count:(k + 1) * count]

        return [rows(k) for k in range(len(texts))]

    def _uncond(self, negative: str, cond: Any, count: int, time_ids: Tensor | None, *, breaks: bool = False) -> Any:
        if self.is_sdxl and not negative and self.zero_empty_negative:  # force_zeros_for_empty_prompt
            # (time_ids kept; the refiner's with its negative aesthetic score, as A1111's is_negative_prompt. A1111's
            # path (breaks) zeros the encoded "", one window, which "Pad prompt/negative prompt" then pads with ""'s
            # states; diffusers' zeros_like(prompt_embeds) has the prompt's length)
            shape = self._prompt_condition([""] * count, cond.get("time_ids"), breaks=True) if breaks else cond
            return {k: (torch.zeros_like(v) if k != "time_ids" else self._negative_time_ids(cond["time_ids"]))
                    for k, v in shape.items()}
        # (the refiner: negative_aesthetic_score in its time_ids)
        return self._prompt_condition([negative] * count, self._negative_time_ids(time_ids), breaks=breaks)

    def _prompt_condition(self, prompts: list[str], time_ids: Tensor | None, *, breaks: bool = False,
                          batch_mean: bool = False) -> Any:
        """:meth:`condition` of prompts to sample, with A1111 emphasis (``(word:1.2)``, ``[word]``;
        ``\\(`` a literal bracket) read as A1111's default ("Original") emphasis: each token's text
        states times its weight (:meth:`tokenize_weighted`), then each prompt's states rescaled so
        their mean over (tokens, channels) is the unweighted states' again (SDXL: each encoder's part
        on its own, as A1111 hooks each encoder). With :attr:`max_token_length` 75 (the default: one
        77-token window) that is exactly A1111's rule, and kohya's SD1/SD2 sample images' for a prompt
        of up to 75 tokens (``lpw_stable_diffusion.get_weighted_text_embeddings``, the same rule);
        kohya's SDXL sample images (``strategy_sdxl.encode_tokens_with_weights``) weigh without the
        rescale. With :attr:`max_token_length` 150/225 the mean is over all of sdadapt's joined
        ``n * 75 + 2`` states (kohya's training layout), as kohya's pipeline takes it over its own
        ``n * 77`` layout; A1111 takes it per 77-token chunk. With ``breaks`` (a prompt plan:
        ``generate``'s A1111 prompts) a prompt with ``BREAK`` — or, with :attr:`max_token_length` 75, one
        longer than 75 tokens — is laid out in A1111's chunks, each emphasised and mean-restored on its own
        (:meth:`_break_condition`; A1111 cuts a long prompt at a comma up to 20 tokens back and keeps every
        token); without it ``BREAK`` is a word, as in kohya's sample prompts. A prompt without brackets or
        backslashes (nor, with
        ``breaks``, ``BREAK``): :meth:`tokenize`'s conditioning, unchanged."""
        from .prompt_chunks import has_break, needs_chunks

        literal = self._literal_prompts()

        def chunked(prompt: str) -> bool:  # (A1111's BREAK, and its long prompts where no kohya length is set)
            if self.max_token_length == 75:
                return needs_chunks(self._all_tokenizers[0], prompt, literal=literal)
            return not literal and has_break(prompt)

        if breaks and any(chunked(prompt) for prompt in prompts):  # (A1111's chunk layout)
            return self._break_condition(prompts, time_ids, batch_mean=batch_mean)
        if literal or not any(mark in prompt for prompt in prompts for mark in "()[]\\"):
            ids = self.tokenize(prompts)
            return self.condition({"ids": ids, "time_ids": time_ids} if self.is_sdxl else ids)
        # (generate's A1111 prompts: A1111's emphasis pattern, blanks around a weight allowed)
        weighted = self.tokenize_weighted(prompts, a1111=breaks)  # {"ids": (B, L) / (B, 2, L), "weights": the same}
        return self._emphasised(weighted["ids"], weighted["weights"], time_ids, batch_mean=batch_mean)

    def _literal_prompts(self) -> bool:
        """Whether :attr:`emphasis` is "None" (the prompts' text as it is).

        Raises:
            ValueError: an :attr:`emphasis` not in :data:`EMPHASIS_MODES`.
        """
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)} (A1111's 'Emphasis mode'), got "
                             f"{self.emphasis!r}")
        return self.emphasis == "None"

    def _emphasised(self, ids: Tensor, weights: Tensor, time_ids: Tensor | None, *, batch_mean: bool = False) -> Any:
        """:meth:`condition` of ids (B, L) / SDXL (B, 2, L) with their emphasis ``weights`` (the same
        shape): the states times the weights, rescaled to the unweighted states' mean per prompt (``batch_mean``:
        over the batch, A1111's for a schedule's texts; SDXL: per encoder part), :meth:`_prompt_condition`'s rule."""
        # one text-encoder pass: the weights multiply the finished states (condition's "weights"), so
        # the weighted states are the plain ones times them — the same numbers as a second, weighted pass
        plain = self.condition({"ids": ids, "time_ids": time_ids} if self.is_sdxl else ids)
        if bool((weights == 1).all()) or self.emphasis == "Ignore":  # (no emphasis: the rescale is × 1, or 0/0
            return plain  # on states of mean 0; A1111's "Ignore": the syntax read, its weights not applied)
        self._literal_prompts()  # (a mode it knows)
        if self.emphasis == "Original":
            def restore(weighted: Tensor, plain: Tensor) -> Tensor:
                return _restore_mean(weighted, plain, over_batch=batch_mean)
        else:
            restore = _weighted_only  # ("No norm": the weights only)
        if not self.is_sdxl:
            return restore(_weigh_states(plain, weights), plain)  # (B, L, D)
        if self.is_refiner:  # (one encoder's states)
            return {**plain, "context": restore(_weigh_states(plain["context"], weights), plain["context"])}
        width = int(self.text_encoder.config.hidden_size)  # context = [CLIP-L states | OpenCLIP-G states]
        parts = (plain["context"][..., :width], plain["context"][..., width:])
        # joined, then sliced: each part's mean reduced over the same memory layout as condition's output
        cond = torch.cat([_weigh_states(part, weights[:, row]) for row, part in enumerate(parts)], dim=-1)
        context = torch.cat([restore(cond[..., :width], parts[0]), restore(cond[..., width:], parts[1])], dim=-1)
        return {**plain, "context": context}  # (text_embeds, the pooled output, unweighted)

    def _break_condition(self, prompts: list[str], time_ids: Tensor | None, *, batch_mean: bool = False) -> Any:
        """Prompts with ``BREAK`` in A1111's layout (:mod:`sdadapt.prompt_chunks`): each prompt cut into
        ``C``-token chunks (shorter prompts of the batch padded with empty chunks, as A1111 does), each
        chunk encoded and emphasised on its own (its mean restored per chunk: A1111's "Original"
        emphasis), the chunks' states joined: (B, n * C, D); SDXL's ``text_embeds`` are the first chunk's.
        :attr:`max_token_length` does not apply (A1111 has no limit)."""
        from .prompt_chunks import prompt_chunks

        device = self.alphas_cumprod.device
        tokenizers = self._all_tokenizers
        literal = self._literal_prompts()
        empty = [prompt_chunks(tokenizer, "") for tokenizer in tokenizers]  # ((1, C), (1, C)) each
        chunked = [[prompt_chunks(tokenizer, prompt, literal=literal) for tokenizer in tokenizers]
                   for prompt in prompts]
        n = max(ids.shape[0] for row in chunked for ids, _ in row)

        def padded(part: int, k: int) -> Tensor:  # (B, n, C) ids (k=0) or weights (k=1) of tokenizer `part`
            rows = [row[part][k] for row in chunked]
            return torch.stack([torch.cat([r, empty[part][k].expand(n - r.shape[0], -1)]) for r in rows])

        ids = [padded(part, 0) for part in range(len(tokenizers))]
        weights = [padded(part, 1) for part in range(len(tokenizers))]
        conds = []
        for j in range(n):
            if len(tokenizers) == 2:
                chunk_ids = torch.stack([ids[0][:, j], ids[1][:, j]], dim=1)  # (B, 2, C)
                chunk_weights = torch.stack([weights[0][:, j], weights[1][:, j]], dim=1)
            else:
                chunk_ids, chunk_weights = ids[0][:, j], weights[0][:, j]  # (B, C)
            conds.append(self._emphasised(chunk_ids.to(device), chunk_weights.to(device), time_ids,
                                          batch_mean=batch_mean))
        if not self.is_sdxl:
            return torch.cat(conds, dim=1)  # (B, n * C, D)
        return {**conds[0], "context": torch.cat([c["context"] for c in conds], dim=1)}

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float | None = None,
               negative: str = "",
               sampler: str | None = None, karras: bool = False, height: int | None = None, width: int | None = None,
               cond: Any = None, schedule: str | None = None, info: dict | None = None, plan: Any = None,
               noise: Any = None, schedule_options: Any = None, output: str = "images", start: Any = None,
               before_model_call: Any = None, clip_sample: float | None = None,
               size_conditioning: tuple[int, int] | None = None, refiner: Any = None,
               generator: torch.Generator | None = None, start_noise: Tensor | None = None,
               vae_encode: str = "mean", uncond_skip: Any = None, pad_conds: Any = None,
               eta: float | None = None, churn: Any = None, guidance_rescale: Any = 0.0,
               perturbed_attention: Any = None, self_attention_guidance: Any = None,
               dynamic_thresholding: Any = None) -> Tensor:
        """Any sampler of :mod:`sdadapt.samplers` with classifier-free guidance -> images (B, 3, H, W)
        in [-1, 1] (``output="latents"``: the latents (B, C, H/8, W/8), not decoded).

        ``sampler``: a name in :data:`sdadapt.samplers.SAMPLERS` (or kohya's ``k_`` alias); ``None``:
        :func:`sdadapt.sampling.default_sampler` (``ddim``; an EDM model's own scheduler, ``dpmsolver++``);
        ``guidance``: the classifier-free guidance scale; ``None``: :func:`sdadapt.sampling.default_guidance` for the
        sampler (7.5; an EDM model its model card's, 3 with ``dpmsolver++``, 5 with ``euler``);
        ``karras``: diffusers' ``use_karras_sigmas`` (the samplers in
        :data:`sdadapt.samplers.KARRAS_SAMPLERS`); ``schedule``: A1111's "Schedule type"
        (:func:`sdadapt.samplers.resolve_schedule`; Align Your Steps takes the SDXL table on SDXL); on an EDM model
        both are refused unless they name its own σ grid (:func:`sdadapt.samplers.edm.edm_own_grid`: Karras' for
        Playground v2.5), which samples as without them;
        ``info``: a dict ``dpm_adaptive`` fills with its steps and model calls (``nfe``).
        ``height``/``width`` default to :attr:`image_size`
        and must be multiples of :attr:`vae_factor` (8: A1111's and diffusers' rule; a latent side the UNet's
        downsampling does not halve evenly is run as diffusers' UNet runs it — each upsampler resizing to its
        skip's size before its convolution, as ComfyUI and Forge do; A1111's ``TorchHijackForUnet`` resizes LDM's
        after the convolution, which differs in the last row / column of each uneven level). The starting noise is drawn on the CPU from
        ``torch.Generator().manual_seed(seed)``; the ancestral samplers draw their noise from that same
        generator after it (what a diffusers pipeline given that generator does). ``cond``: the
        prompts' conditioning, precomputed (as :meth:`condition` returns it: SD1/SD2 (B, L, D),
        SDXL the dict) — methods that build it themselves (aesthetic gradients) pass it; the
        unconditional branch is still made from ``negative``. Prompts and ``negative`` may carry
        A1111 emphasis, ``(word:1.2)``, ``(word)``, ``[word]`` (read as A1111's "Original" emphasis:
        weighted text states rescaled to their unweighted mean; :meth:`_prompt_condition`).
        ``plan``: a :class:`~sdadapt.prompt_guidance.PromptPlan` (A1111's prompt editing, alternation,
        ``AND``) that takes the place of ``prompts`` and ``negative``: each of its texts is encoded once
        (with emphasis, and ``BREAK`` as A1111's chunks: without a plan ``BREAK`` is a word, as kohya's
        sample prompts read it) and the sampler's model calls switch between them
        (:class:`~sdadapt.prompt_guidance.ScheduledGuidance`); not with ``cond``.
        ``noise``: an :class:`~sdadapt.samplers.a1111_noise.A1111Seeds`: A1111's start and sampler noise for
        ``seed`` instead of the CPU generator's; ``schedule_options``: A1111's schedule settings
        (:class:`~sdadapt.samplers.schedules.ScheduleOptions`) for ``schedule``. ``start``: an
        :class:`~sdadapt.img2img.Img2ImgStart` — img2img / hires fix from its init latents
        (:func:`sdadapt.samplers.sample_latents`); its ``conditioning``: an inpainting UNet's ``c_concat``
        (:mod:`sdadapt.inpaint`; without it, A1111's txt2img conditioning: a grey image under a mask of ones).
        ``before_model_call(steps_done, calls)``: told before each sampler model call
        (:func:`sdadapt.samplers.sample_latents`). ``uncond_skip``: A1111's "Skip Early CFG" / NGMS
        (:class:`sdadapt.uncond_skip.UncondSkip`) over this run's calls, the prompt plan's and the refiner's too.
        ``pad_conds``: A1111's "Pad prompt/negative prompt" (:class:`sdadapt.cond_padding.CondPadding`) for a
        ``plan`` whose prompt and negative have different chunk counts (each model pads with its own states of
        ``""``: :meth:`empty_prompt_states`). ``eta``: A1111's "Eta for ancestral samplers" (the sampler's ``eta=``).
        ``churn``: A1111's "Sigma churn" settings (the sampler's ``churn=``: Euler, Heun, DPM2 on A1111's grids).
        ``guidance_rescale``: a :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ) on every guided call,
        the refiner's too (:func:`sdadapt.samplers.sample_latents`; φ alone: diffusers' ``guidance_rescale`` on
        diffusers' grids, A1111's "CFG Rescale" on its own); 0 off. ``perturbed_attention``: perturbed-attention
        guidance (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance` hooked on this model's
        :attr:`unet`) on every guided call, a prompt plan's too; not with ``refiner``. ``self_attention_guidance``:
        self-attention guidance (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance` on :attr:`unet`)
        likewise; not with ``refiner`` or an EDM model. ``dynamic_thresholding``: A1111's / Forge's "CFG Scale Fix"
        (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`) in place of every guided combination, the
        refiner's and a plan's too, on A1111's σ samplers; not on an EDM model. ``clip_sample``: ``heun``'s x̂0
        clamp (kohya's sample images: :func:`sdadapt.sampling.kohya_clip_sample`). ``size_conditioning``: the
        ``(height, width)`` SDXL's ``time_ids`` give as original and target size (A1111's cropped hires pass: the size it enlarged to);
        ``None``: the image's. ``refiner``: a :class:`~sdadapt.jobs.generate_refiner.RefinerHandoff` — the SDXL
        refiner takes the model calls it picks (A1111's "Refiner: switch at"), conditioned as its own ``sample``
        conditions the same ``prompts`` / ``negative`` / ``plan`` (the plan's call count running on across the
        switch, as A1111's ``CFGDenoiser.step``); the images are then decoded by the refiner's VAE once it took a call.
        ``generator``: a CPU ``torch.Generator`` the start noise and the sampler noise are drawn from in place of
        ``torch.Generator().manual_seed(seed)`` (a diffusers pipeline's ``generator=``; e.g. after
        ``encode_images(pixels, generator=generator)`` drew the init image's posterior sample from it); not with
        ``noise``. ``start_noise``: the unit start noise (B, 4, H/8, W/8) in place of the generator's first draw
        (a diffusers pipeline's ``latents=``; :func:`sdadapt.sampling.generate`); not with ``noise``.
        ``vae_encode``: how the image conditioning this call encodes itself — an inpainting model's txt2img grey
        (above; also a hires pass's, which has no ``start.conditioning``) — is encoded: ``"mean"`` the posterior
        mean, the same for every seed; ``"sample"`` a posterior sample (B, 4, h, w) drawn after the start noise and
        before the sampler noise from the run's generator (``generator`` or ``torch.Generator().manual_seed(seed)``):
        diffusers' ``StableDiffusionInpaintPipeline`` at ``strength=1`` with a white mask, whose masked image is all
        0 (``prepare_latents`` draws the start noise, then ``prepare_mask_latents`` encodes the masked image with the
        generator, then the scheduler's noise); with ``noise`` (A1111's, whose start and sampler noise stay its own)
        from :func:`sdadapt.img2img.init_generator` ``(seed, a1111_noise=True)`` after one draw of the latent's shape
        (:meth:`_conditioning_generator`; A1111's ``txt2img_image_conditioning`` samples from its unseeded global
        RNG). A given conditioning is used as it is. B prompts draw B samples at once; diffusers encodes its one
        masked image once and repeats it over the batch — the same for B = 1, what ``generate`` (the command) runs.

        Raises:
            ValueError: a UNet that is neither plain nor an inpainting one (InstructPix2Pix's 8 channels);
                ``generator`` or ``start_noise`` with ``noise``; a ``start_noise`` of another shape.
        """
        height, width = height or self.image_size, width or self.image_size
        check_image_size(width, height, multiple=self.vae_factor)
        from . import samplers

        if sampler is None:  # (an EDM model's own scheduler, else ddim)
            from .sampling import default_sampler

            sampler = default_sampler(self)
        name = samplers.canonical_sampler(sampler)  # (ValueError for an unknown one, before any work)
        if self.edm is not None:  # (Playground v2.5: diffusers' EDM schedulers only, sdadapt.samplers.edm)
            from .samplers.edm import check_edm_request

            check_edm_request(name, karras=karras, schedule=schedule, noise=noise, clip_sample=clip_sample,
                              schedule_options=schedule_options, refiner=refiner, edm=self.edm)
            karras, schedule, schedule_options = False, None, None  # (left: its own grid, which it samples on anyway)
            if eta is not None or churn is not None:
                raise ValueError("eta and sigma churn are A1111's (its k-diffusion samplers'); an EDM model "
                                 "(Playground v2.5) samples with diffusers' EDM schedulers, which take none: leave "
                                 "them out")
            if uncond_skip is not None and not uncond_skip.is_off:
                raise ValueError("Skip Early CFG / NGMS are A1111's settings; an EDM model (Playground v2.5, CosXL) samples "
                                 "with diffusers' EDM schedulers, which A1111 does not run: leave them out")
        if guidance is None:  # (the model's: 7.5, an EDM model's card scale for this sampler)
            from .sampling import default_guidance

            guidance = default_guidance(self, name)
        samplers.check_karras(name, karras)
        schedule = run_schedule(name, schedule, karras)
        if perturbed_attention is not None and getattr(perturbed_attention, "network", None) is not self.unet:
            raise ValueError("perturbed_attention= perturbs the UNet it was made on; build it on this model's unet "
                             "(PerturbedAttentionGuidance(system.unet, ...))")
        if perturbed_attention is not None and refiner is not None:
            raise ValueError("perturbed-attention guidance hooks the base UNet; the refiner's calls would run "
                             "without it: leave PAG out with a refiner")
        if self_attention_guidance is not None:
            from .self_attention_guidance import check_sag_run

            if getattr(self_attention_guidance, "network", None) is not self.unet:
                raise ValueError("self_attention_guidance= reads the UNet it was made on; build it on this model's "
                                 "unet (SelfAttentionGuidance(system.unet, alphas_cumprod=system.alphas_cumprod, ...))")
            if refiner is not None:
                raise ValueError("self-attention guidance hooks the base UNet; the refiner's calls would run without "
                                 "it: leave SAG out with a refiner")
            check_sag_run(name, schedule=run_schedule(name, schedule, karras), edm=self.edm is not None)
        if dynamic_thresholding is not None:
            from .dynamic_thresholding import check_dynamic_thresholding_run

            check_dynamic_thresholding_run(name, schedule=schedule, edm=self.edm is not None)
        asked_rescale = guidance_rescale  # (checked once for the run: a prompt plan's guidance takes it too)
        guidance_rescale = samplers.guidance_rescale_for_run(guidance_rescale, name, schedule=schedule,
                                                             prediction_type=self.prediction_type,
                                                             edm=self.edm is not None)
        if schedule == "align_your_steps" and self.is_sdxl:
            schedule = "align_your_steps_sdxl"
        device = self.alphas_cumprod.device
        if noise is not None:  # A1111's noise (sdadapt.samplers.a1111_noise)
            if generator is not None:
                raise ValueError("generator= draws the start noise in place of the seed's generator; A1111's noise= "
                                 "draws its own: pass one of them")
            if start_noise is not None:
                raise ValueError("start_noise= is the start noise; A1111's noise= draws its own: pass one of them")
            g = noise.for_batch(seed, len(prompts))
            x = g.start_noise((len(prompts), *self.latent_shape(height, width))).to(device)
        else:
            g = torch.Generator().manual_seed(seed) if generator is None else generator
            if start_noise is None:
                x = torch.randn(len(prompts), *self.latent_shape(height, width), generator=g).to(device)
            else:  # (drawn by the caller: the generator draws only the sampler noise)
                from .sampling import given_start_noise

                x = given_start_noise(start_noise, (len(prompts), *self.latent_shape(height, width))).to(device)
        size_h, size_w = size_conditioning or (height, width)
        time_ids = self._size_time_ids(len(prompts), size_h, size_w)
        model = self.denoiser()
        from .inpaint import check_inpainting_unet, concat_conditioning, txt2img_masked_image

        if check_inpainting_unet(int(self.unet.config.in_channels), int(self.vae.config.latent_channels)):
            conditioning = start.conditioning if start is not None else None
            if conditioning is None:  # txt2img on an inpainting model: A1111's txt2img_image_conditioning
                conditioning = self.inpainting_conditioning(
                    *txt2img_masked_image(len(prompts), height, width),
                    generator=self._conditioning_generator(vae_encode, g if noise is None else None, seed=seed,
                                                           shape=tuple(x.shape)))
            model = concat_conditioning(model, conditioning)
        guiding = {} if uncond_skip is None and dynamic_thresholding is None else {  # (the guidance keywords of
            # every model call: skip, rescale...; the run's expected calls for those that count them)
            "uncond_skip": uncond_skip, "total_steps": samplers.run_total_steps(name, steps, start=start,
                                                                                schedule=schedule)}
        if guidance_rescale:  # (a number or a GuidanceRescale: off when 0 or None)
            guiding["guidance_rescale"] = guidance_rescale
        if perturbed_attention is not None:
            guiding["perturbed_attention"] = perturbed_attention
        if self_attention_guidance is not None:
            guiding["self_attention_guidance"] = self_attention_guidance
        if dynamic_thresholding is not None:
            guiding["dynamic_thresholding"] = dynamic_thresholding
        model, cond, uncond, guidance_scale = self._guidance_inputs(model, prompts, negative=negative, cond=cond,
                                                                    plan=plan, time_ids=time_ids, guidance=guidance,
                                                                    pad_conds=pad_conds, **guiding)
        if self.edm is not None:  # (Playground v2.5: diffusers' EDM schedulers, sdadapt.samplers.edm)
            from .samplers.edm import edm_sample_latents

            latents = edm_sample_latents(model, x, cond, sampler=name, schedule=self.edm, num_steps=steps, uncond=uncond,
                                         guidance_scale=guidance_scale, generator=g, before_model_call=before_model_call,
                                         start=start, guidance_rescale=guidance_rescale if uncond is not None else 0.0,
                                         perturbed_attention=perturbed_attention if uncond is not None else None)
            return latents if output == "latents" else self.decode_latents(latents)
        if refiner is not None:  # (the SDXL refiner below the cut: sdadapt.jobs.generate_refiner)
            from .training.diffusion import guided

            other = refiner.refiner
            other_time_ids = other._size_time_ids(len(prompts), size_h, size_w)
            refiner_guiding = dict(guiding)
            if guidance_rescale is not None:  # (the refiner's own outputs: it may predict otherwise than the base)
                refiner_guiding["guidance_rescale"] = samplers.guidance_rescale_for_run(
                    asked_rescale, name, schedule=schedule, prediction_type=other.prediction_type)
            refined = other._guidance_inputs(other.denoiser(), prompts, negative=negative, cond=None, plan=plan,
                                             time_ids=other_time_ids, guidance=guidance, pad_conds=pad_conds,
                                             **refiner_guiding)
            total_steps = None
            if getattr(refiner, "by_steps", False):  # (A1111's "Refiner switch by sampling steps": this run's steps)
                total_steps = samplers.run_total_steps(name, steps, start=start, schedule=schedule)
            # (a plan's ScheduledGuidance as it is: the handoff runs its call count on across the switch)
            model = refiner.switched(
                model if plan is not None else guided(model, cond, uncond, guidance_scale, **guiding,
                                                      pad_conds=self._padding(pad_conds, time_ids)),
                refined[0] if plan is not None else guided(*refined, **refiner_guiding,
                                                           pad_conds=other._padding(pad_conds, other_time_ids)),
                                     a1111_grid=schedule is not None,  # (A1111's schedules: A1111's cut)
                                     **({} if total_steps is None else {"total_steps": total_steps}))
            cond, uncond, guidance_scale = None, None, 1.0
        latents = samplers.sample_latents(model, x, cond, sampler=name, alphas_cumprod=self.alphas_cumprod,
                                          num_steps=steps, uncond=uncond, guidance_scale=guidance_scale,
                                          prediction_type=self.prediction_type, karras=karras, generator=g,
                                          schedule=schedule, schedule_options=schedule_options, start=start,
                                          before_model_call=before_model_call,
                                          uncond_skip=uncond_skip if uncond is not None else None,
                                          pad_conds=self._padding(pad_conds, time_ids) if uncond is not None else None,
                                          guidance_rescale=guidance_rescale if uncond is not None else 0.0,
                                          perturbed_attention=perturbed_attention if uncond is not None else None,
                                          self_attention_guidance=self_attention_guidance if uncond is not None else None,
                                          dynamic_thresholding=dynamic_thresholding,
                                          **({"info": info} if info is not None and name == "dpm_adaptive" else {}),
                                          **({} if clip_sample is None else {"clip_sample": clip_sample}),
                                          **({} if eta is None else {"eta": eta}),
                                          **({} if churn is None else {"churn": churn}))
        decoder = self if refiner is None else refiner.decoder(self)  # (the refiner's VAE once it took a call)
        return latents if output == "latents" else decoder.decode_latents(latents)

    @staticmethod
    def _conditioning_generator(vae_encode: str, run: torch.Generator | None, *, seed: int,
                                shape: tuple[int, ...]) -> torch.Generator | None:
        """The generator :meth:`sample` draws its own image conditioning's posterior sample from under
        ``vae_encode`` (``None``: the mean): ``run``, the run's generator after the start noise (sdadapt's noise), or
        with A1111's noise (``run`` ``None``) :func:`sdadapt.img2img.init_generator` of ``seed`` (past its discarded
        draw of ``shape`` (B, C, h, w)) past one more draw of ``shape``: the place of an image's posterior ε drawn
        from that generator first — A1111 encodes a hires pass's upscaled pixels before their conditioning
        (``sample_hr_pass``), and the ``pixel-lanczos`` hires pass draws that ε there
        (:func:`sdadapt.jobs.generate_hires.seeded_encoding`), so the two are not the same draw.

        Raises:
            ValueError: a ``vae_encode`` that is not ``"mean"`` / ``"sample"``.
        """
        from .img2img import check_vae_encode, init_generator

        if check_vae_encode(vae_encode) == "mean":
            return None
        if run is not None:
            return run
        g = init_generator(seed, a1111_noise=True, shape=shape)
        torch.randn(shape, generator=g)  # (an image's posterior ε: A1111 encodes it before the conditioning)
        return g

    def _size_time_ids(self, count: int, size_h: int, size_w: int) -> Tensor | None:
        """SDXL's ``time_ids`` for ``count`` prompts at size ``(size_h, size_w)``: (count, 6) original size, crop
        (0, 0), target size; the refiner (count, 5) original size, crop, :attr:`aesthetic_score` (diffusers'
        ``requires_aesthetics_score``); ``None`` for SD1/SD2."""
        if not self.is_sdxl:
            return None
        device = self.alphas_cumprod.device
        last = [self.aesthetic_score] if self.is_refiner else [size_h, size_w]
        time_ids = torch.tensor([[size_h, size_w, 0, 0, *last]], dtype=torch.float32, device=device)
        return time_ids.expand(count, time_ids.shape[1])

    def _guidance_inputs(self, model: Any, prompts: list[str], *, negative: str, cond: Any, plan: Any,
                         time_ids: Tensor | None, guidance: float, uncond_skip: Any = None,
                         total_steps: int = 1, pad_conds: Any = None,
                         guidance_rescale: Any = 0.0, perturbed_attention: Any = None,
                         self_attention_guidance: Any = None,
                         dynamic_thresholding: Any = None) -> tuple[Any, Any, Any, float]:
        """``(model, cond, uncond, guidance_scale)`` for :func:`sdadapt.samplers.sample_latents`: the prompts'
        conditioning and the negative's (:meth:`sample`'s rules), or with a ``plan`` its
        :class:`~sdadapt.prompt_guidance.ScheduledGuidance` over every text's conditioning (``cond``/``uncond``
        ``None``, scale 1)."""
        count = len(prompts)
        if plan is not None:  # A1111 prompt syntax: every text once, switched per model call
            if cond is not None:
                raise ValueError("a prompt plan encodes its own texts; pass plan= or cond=, not both")
            conds, negatives = self.plan_conditions(plan, count=count, time_ids=time_ids)
            conds, negatives = self._unclip_conditions(conds, negative=False), self._unclip_conditions(negatives, negative=True)
            return (plan.guidance(model, conds, negatives, guidance, uncond_skip=uncond_skip, total_steps=total_steps,
                                  pad_conds=self._padding(pad_conds, time_ids), guidance_rescale=guidance_rescale,
                                  perturbed_attention=perturbed_attention,
                                  self_attention_guidance=self_attention_guidance,
                                  dynamic_thresholding=dynamic_thresholding),
                    None, None, 1.0)
        if cond is None:
            cond = self._prompt_condition(prompts, time_ids)
        elif self.is_sdxl and isinstance(cond, dict) and "time_ids" in cond:
            time_ids = cond["time_ids"]
        uncond = self._uncond(negative, cond, count, time_ids)
        if self.unclip_image is not None and self._unclip_width():
            (cond,), (uncond,) = self._unclip_conditions([cond], negative=False), self._unclip_conditions([uncond], negative=True)
        return model, cond, uncond, guidance


def _add_vocabulary_files(folder: Path, tokenizer: Any) -> None:
    """``vocab.json`` + ``merges.txt`` beside a transformers-5 tokenizer's ``tokenizer.json`` (it writes only
    that): transformers 4's slow ``CLIPTokenizer`` — kohya's sd-scripts, older diffusers installs, the
    ``model_index.json`` class — reads only these two. Nothing for a tokenizer without a BPE backend."""
    if (folder / "vocab.json").exists() or not hasattr(tokenizer, "backend_tokenizer"):
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return
    from .clip_tokenizer import write_vocabulary_files

    # (tokenizers writes a merge as ["a", "b"], before 0.20 as "a b")
    merges = [tuple(m) if isinstance(m, list) else tuple(str(m).split(" ", 1)) for m in model.get("merges", [])]
    write_vocabulary_files(folder, model["vocab"], merges)


def _plain_config(config: Any) -> dict:
    """A model's constructor config as JSON-able plain values (diffusers FrozenDict / transformers config)."""
    if hasattr(config, "to_diff_dict"):
        raw = config.to_dict()
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
                "projection_dim", "layer_norm_eps", "image_size", "patch_size")
        return {k: raw[k] for k in keep if k in raw}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def _no_init_weights():
    """transformers' context that builds a model without initialising its weights (torch's and its
    own ``init_weights``; non-persistent buffers such as CLIP's ``position_ids`` are still made):
    for a model whose every persistent tensor is loaded next (:func:`_load` checks that)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def _build(cls, config: dict):
    """Construct a diffusers model without its random initialisation (meta device, weights assigned on load)."""
    try:
        with torch.device("meta"):
            return cls(**config)
    except Exception as exc:  # a config the shapes implied but the class refuses
        raise ModelFolderError(f"cannot build {cls.__name__} from the checkpoint's shapes ({exc})") from None


def _load(module: nn.Module, state: dict[str, Tensor], *, name: str, source: Path, keep_dtypes: bool = False) -> None:
    """``state`` into ``module`` (strict): float32 copies, or with ``keep_dtypes`` the tensors themselves
    (assigned; :func:`sdadapt.formats.model_keys.convert_checkpoint` leaves no two sharing storage)."""
    from .formats.files import WeightFileError
    from .formats.key_source import fit_report

    on_meta = any(p.is_meta for p in module.parameters())
    report = fit_report({k: tuple(v.shape) for k, v in state.items()},
                        {k: tuple(v.shape) for k, v in module.state_dict().items()})
    if not report.ok:
        raise WeightFileError(f"{source}: the {name} weights do not fit the model their shapes describe "
                              f"({report.problems()})")
    if not keep_dtypes:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=on_meta or keep_dtypes)
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:  # non-persistent buffers a meta construction could not fill
        raise WeightFileError(f"{source}: the {name} has buffers the file does not hold ({', '.join(leftover[:3])})")


def _tokenizers(source: str | os.PathLike | None, architecture: str, config: Any, cls) -> tuple[Any, Any]:
    """The first (and SDXL's second) transformers tokenizer: from sdadapt's shipped CLIP vocabulary,
    a tokenizer folder, a model folder holding ``tokenizer/`` (+ ``tokenizer_2/``), or a vocabulary file.

    Padding follows the diffusers model folders: ``<|endoftext|>`` for SD1 and SDXL's first
    encoder, ``!`` (id 0) for SD2 and SDXL's second — set by id, ``!`` in a text staying an ordinary token as
    open_clip, A1111, ComfyUI and kohya's SDXL scripts read it (``"wow!!"``: ``2781, 748``), also from a diffusers
    folder whose ``tokenizer_2`` makes ``!`` a special token and so splits ``"!!"`` into two pad ids (diffusers
    issue #4153: its pipelines' ids differ there). SDXL's second, when the source has only one, is the first
    with that pad.
    """
    # (the fast tokenizer on transformers 4, whose CLIPTokenizer is the slow one; on 5 the same class as CLIPTokenizer)
    from transformers import CLIPTokenizerFast as Transformers

    length = int(getattr(config, "max_position_embeddings", 77))
    first_pad = "!" if architecture == "sd2" else "eos"
    root = None if source is None else Path(source)
    if root is not None and not root.exists():
        raise FileNotFoundError(f"{root}: no such tokenizer folder or vocabulary file")
    model_folder = root is not None and root.is_dir() and (root / "tokenizer").is_dir()  # a diffusers model folder
    folder = root / "tokenizer" if model_folder else root if root is not None and root.is_dir() else None
    if folder is not None and not model_folder and (not (folder / "vocab.json").is_file()
                                                    or not (folder / "merges.txt").is_file()):
        raise FileNotFoundError(f"{root}: not a CLIP tokenizer folder (needs vocab.json and merges.txt)")

    def from_folder(where: Path):
        loaded = Transformers.from_pretrained(where)
        if loaded.pad_token != "!" or len(loaded) != loaded.vocab_size:
            return loaded  # (an <|endoftext|> pad; or tokens added to it, e.g. an embedding's, kept as they are)
        return cls.load(where, max_length=length, pad="!").to_transformers()  # ("!" an ordinary token again)

    def build(pad: str):
        if folder is not None:
            return from_folder(folder)
        return cls.load(root, max_length=length, pad=pad).to_transformers()  # (the vocabulary parsed once a process)

    first = build(first_pad)
    second = from_folder(root / "tokenizer_2") if model_folder and (root / "tokenizer_2").is_dir() else None
    if architecture == "sdxl" and second is None:
        # the first built again rather than deep-copied (a copy of a transformers tokenizer ~0.6 s, a build ~0.15 s)
        second = cls.load(folder if folder is not None else root, max_length=length, pad="!").to_transformers()
    return first, second


def load_model(model: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, prediction_type: str | None = None,
               clip_skip: int = 1, device: str | torch.device = "cpu", max_token_length: int = 75,
               clip_stats: str | os.PathLike | None = None) -> DiffusersSystem:
    """A diffusers folder or a single-file checkpoint as a :class:`DiffusersSystem`.

    ``max_token_length``: 75 (default), 150 or 225 prompt tokens (:attr:`DiffusersSystem.max_token_length`).
    ``clip_stats``: an SD 2.1 unCLIP model's CLIP-embedding stats (karlo's ``ViT-L-14_stats.th``, :mod:`sdadapt.unclip`).

    Raises:
        ModelFolderError: neither a folder nor a file.
        WeightFileError: a file that is not a full SD1/SD2/SDXL checkpoint.
    """
    from .text_chunks import chunk_count

    chunk_count(max_token_length)  # refused before anything loads
    path = Path(model)
    if path.is_dir():
        if tokenizer is not None:
            raise ValueError("--tokenizer is for single-file checkpoints; a diffusers folder has its own tokenizer/")
        return DiffusersSystem.from_folder(path, device=device, clip_skip=clip_skip, prediction_type=prediction_type,
                                           max_token_length=max_token_length, clip_stats=clip_stats)
    if path.is_file():
        return DiffusersSystem.from_single_file(path, tokenizer=tokenizer, prediction_type=prediction_type,
                                                clip_skip=clip_skip, device=device, max_token_length=max_token_length,
                                                clip_stats=clip_stats)
    raise ModelFolderError(f"{path}: no such file or folder; --model takes 'toy', a diffusers Stable Diffusion folder "
                           "or an SD1/SD2/SDXL .safetensors/.ckpt checkpoint")
