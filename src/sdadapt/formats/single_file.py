"""Single-file Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL, the SDXL refiner): read, split, and the model configs.

A single file (``.safetensors``, or a legacy ``.ckpt`` read with ``torch.load(weights_only=True)``)
holds the UNet, the text encoder(s) and the VAE in LDM naming. This module turns it into
diffusers-named component states through the one key map (:mod:`.model_keys`) and derives each
component's constructor config from the tensor shapes, so the models can be built offline (no
config download, unlike diffusers' own single-file loader):

| component | read from the shapes | fixed by the architecture |
|---|---|---|
| UNet | channels per block, layers per block, which blocks attend, transformer depth per block, cross-attention width, linear/conv ``proj_in``, SDXL's add-embedding | attention heads (SD1: 8; SD2/SDXL: 64-wide heads), GroupNorm groups (32), the add-embedding's size embeddings (SDXL 6, the refiner 5: sizes, crop and aesthetic score) |
| VAE | channels per block, layers per block, latent channels | scaling factor (SD1/SD2 0.18215, SDXL 0.13025) |
| CLIP text encoder(s) | width, depth, MLP width, vocabulary, positions, projection | 64-wide heads, activation (CLIP-L quick-GELU, OpenCLIP GELU) |

Files written by sdadapt carry the exact configs in their ``sdadapt.configs`` metadata (JSON),
which wins over the rules (tiny test models with other head counts round-trip).

Nothing here imports diffusers or transformers: configs are plain dicts for their constructors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from torch import Tensor

from .files import WeightFileError, read_weights
from .key_source import KeyMapError
from .edm import EDM_STAT_KEYS, PLAYGROUND_SCALING_FACTOR, edm_stats
from .model_keys import checkpoint_architecture, convert_checkpoint, is_sdxl_refiner
from .prediction_markers import V_PRED_KEY, ZTSNR_KEY, edm_v_range, read_markers
from .unclip import UnclipFile, unclip_info

__all__ = [
    "SingleFile",
    "read_single_file",
    "split_single_file",
    "unet_config",
    "vae_config",
    "text_encoder_config",
    "file_hashes",
    "unwrap_state_dict",
    "CONFIG_METADATA_KEY",
    "SCALING_FACTORS",
]

#: metadata key of the exact component configs in files sdadapt writes (JSON)
CONFIG_METADATA_KEY = "sdadapt.configs"
#: VAE latent scaling per architecture
SCALING_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
_NATIVE_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}
#: an LDM config's ``model.params.parameterization`` line (``"v"`` / ``"eps"`` / ``"x0"``, quoted or not)
_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?(\w+)["']?\s*(?:#.*)?$""", re.MULTILINE)


@dataclass
class SingleFile:
    """A single-file checkpoint split into diffusers-named components.

    Attributes:
        path: the file.
        architecture: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (the SDXL refiner too: :attr:`refiner`).
        components: ``{"unet" | "vae" | "text_encoder" | "text_encoder_2": {diffusers key: tensor}}``
            (text-encoder keys in the ``text_model.…`` spelling).
        metadata: the file's string metadata.
        configs: the exact configs of a file sdadapt wrote (``{}`` otherwise).
        dropped: keys left out on purpose (EMA copies, schedule buffers, SD2's unused layer ...).
        edm_stats: an EDM model's (Playground v2.5's) VAE latent ``(mean, std)`` per channel, from its
            ``edm_mean`` / ``edm_std`` tensors (:mod:`.edm`); ``None`` for the others.
        markers: the file's prediction marker keys, ``"v_pred"`` / ``"ztsnr"`` (:mod:`.prediction_markers`).
        edm_v: an EDM v-prediction model's (CosXL's) ``(σ_min, σ_max)``, from ComfyUI's ``edm_vpred.*`` keys
            (:func:`.prediction_markers.edm_v_range`); ``None`` for the others.
    """

    path: Path
    architecture: str
    components: dict[str, dict[str, Tensor]]
    metadata: dict[str, str]
    configs: dict[str, dict] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    edm_stats: tuple[list[float], list[float]] | None = None
    #: an SD 2.1 unCLIP file's image-conditioning parts (:mod:`.unclip`; its ``image_encoder`` component), else ``None``
    unclip: UnclipFile | None = None
    markers: frozenset[str] = frozenset()
    edm_v: tuple[float, float] | None = None

    @property
    def refiner(self) -> bool:
        """The SDXL refiner: an ``sdxl`` file whose one text encoder is ``text_encoder_2`` (OpenCLIP-bigG)."""
        return self.architecture == "sdxl" and "text_encoder" not in self.components and "text_encoder_2" in self.components

    @property
    def prediction_type(self) -> str:
        """``"v_prediction"`` when the file says so — its ``v_pred`` marker (:mod:`.prediction_markers`; ComfyUI and
        A1111 read the key alone, so it wins), A1111's config beside it (:attr:`sidecar_prediction_type`), or
        ModelSpec ``prediction_type`` (kohya's) / ``predict_key`` (ComfyUI's) ``v`` —, else ``"epsilon"``; where none
        says anything: the ModelSpec architecture of SD2 (``stable-diffusion-v2-768-v``: v, ``…-v2-512``: ε, as
        kohya writes it), an SD 2.1 unCLIP file ``"v_prediction"`` (its LDM configs' ``parameterization: "v"``), an
        SD2 file by ComfyUI's weight test (:attr:`sd2_v_by_weights`)."""
        if V_PRED_KEY in self.markers:
            return "v_prediction"
        if self.sidecar_prediction_type is not None:
            return self.sidecar_prediction_type
        value = (self.metadata.get("modelspec.prediction_type") or self.metadata.get("modelspec.predict_key", "")).lower()
        architecture = self.metadata.get("modelspec.architecture", "")
        if not value and architecture.startswith("stable-diffusion-v2-"):
            value = "v" if architecture.endswith("-v") else "epsilon"
        if not value and self.unclip is not None:
            return "v_prediction"
        if not value and self.sd2_v_by_weights:
            return "v_prediction"
        return "v_prediction" if value in ("v", "v_prediction", "v-prediction") else "epsilon"

    @property
    def sidecar_config(self) -> Path | None:
        """A1111's model config beside the file, ``<stem>.yaml`` (``sd_models_config.find_checkpoint_config_near_filename``:
        SD2-768-v checkpoints are shared with ``v2-inference-v.yaml`` copied so, and EveryDream2 writes it), or ``None``."""
        config = self.path.with_suffix(".yaml")
        return config if self.path.suffix and config.is_file() else None

    @cached_property
    def sidecar_prediction_type(self) -> str | None:
        """The prediction :attr:`sidecar_config` gives, as A1111 builds the model from it: an LDM config's
        (``ldm.models.diffusion.ddpm`` targets) ``parameterization: "v"`` -> ``"v_prediction"``, none (LDM's default
        ``eps``) or ``"eps"`` -> ``"epsilon"``; an SGM config's (SDXL) denoiser scaling ``VScaling`` /
        ``EpsScaling``. ``None`` without such a file, or with one that cannot be read, is of neither kind or names
        another (``x0``)."""
        config = self.sidecar_config
        if config is None:
            return None
        try:
            text = config.read_text(encoding="utf-8", errors="replace")[:1_000_000]
        except OSError:
            return None
        if "VScaling" in text or "EpsScaling" in text:  # (sgm: denoiser_config.params.scaling_config.target)
            return "v_prediction" if "VScaling" in text else "epsilon"
        if "ldm.models.diffusion.ddpm" not in text:
            return None
        found = _PARAMETERIZATION.findall(text)
        value = found[0] if found else "eps"
        return {"v": "v_prediction", "eps": "epsilon"}.get(value)

    @property
    def sd2_v_by_weights(self) -> bool:
        """ComfyUI's test of an SD2 file that says nothing of its prediction (``supported_models.SD20.model_type``):
        a 4-channel SD2 UNet whose ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` (diffusers'
        ``up_blocks.3.attentions.2…``) has a standard deviation above 0.09 is a 768-v model (SD 2.0/2.1-768: v
        prediction; the 512 base models: ε). Without that layer (another layout, the tiny test models) ``False``."""
        if self.architecture != "sd2" or self.unclip is not None:
            return False
        unet = self.components.get("unet", {})
        bias = unet.get("up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias")
        conv_in = unet.get("conv_in.weight")
        if bias is None or conv_in is None or conv_in.shape[1] != 4 or bias.numel() < 2:  # (inpainting: ε)
            return False
        return float(bias.detach().double().std(unbiased=False)) > 0.09

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the model was trained on the zero-terminal-SNR schedule: the file's ``ztsnr`` marker
        (:mod:`.prediction_markers`; A1111 then rescales ᾱ as its "Zero Terminal SNR" noise schedule does)."""
        return ZTSNR_KEY in self.markers


def unwrap_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``.ckpt`` files nest the weights under ``state_dict`` (flattened by :func:`~.files.read_weights`
    as ``state_dict.KEY``): drop that level; other entries (``global_step`` ...) go with it."""
    if any(k.startswith("state_dict.") for k in state):
        return {k[len("state_dict."):]: v for k, v in state.items() if k.startswith("state_dict.")}
    return state


def read_single_file(path: str | os.PathLike) -> SingleFile:
    """Read and split an SD1/SD2/SDXL single-file checkpoint (see :class:`SingleFile`).

    Raises:
        WeightFileError: unreadable or unsafe file, not a Stable Diffusion checkpoint (names what
            it found), or parts missing (a UNet-only or VAE-only file).
    """
    file = Path(path)
    state, metadata = read_weights(file)
    state = unwrap_state_dict(state)
    return split_single_file(state, metadata=metadata, path=file)


def split_single_file(state: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None,
                      path: str | os.PathLike = "<state>") -> SingleFile:
    """An LDM state dict -> :class:`SingleFile` (the key map, with the report's dropped keys)."""
    file = Path(path)
    meta = dict(metadata or {})
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise WeightFileError(
            f"{file}: not a Stable Diffusion single-file checkpoint (no model.diffusion_model.* UNet keys; "
            f"found e.g. {', '.join(list(state)[:3]) or 'no tensors'}); --model takes 'toy', a diffusers folder "
            "or an SD1/SD2/SDXL .safetensors/.ckpt checkpoint"
        )
    edm_v = edm_v_range(state, source=file)  # (ComfyUI's EDM v-prediction σ range: CosXL)
    markers, state = read_markers(state, source=file)  # (v_pred / ztsnr: read apart, no component's keys)
    stats = None
    if any(k in state for k in EDM_STAT_KEYS):  # (Playground v2.5: read apart, the key map has no rule for them)
        stats = edm_stats(state, source=file)
        state = {k: v for k, v in state.items() if k not in EDM_STAT_KEYS}
    unclip = unclip_info(state)  # (SD 2.1 unCLIP: read before the key map drops its noise-augmentor buffers)
    try:
        architecture = checkpoint_architecture({k: tuple(v.shape) for k, v in state.items()})
        converted, report = convert_checkpoint(state, to="diffusers", strict=False)
    except KeyMapError as exc:
        raise WeightFileError(f"{file}: {exc}") from None
    components: dict[str, dict[str, Tensor]] = {}
    for key, tensor in converted.items():
        component, _, local = key.partition(".")
        components.setdefault(component, {})[local] = tensor
    if architecture == "sdxl" and is_sdxl_refiner(state):  # (the refiner: OpenCLIP-bigG alone)
        needed = ["unet", "vae", "text_encoder_2"]
    else:
        needed = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    missing = [c for c in needed if c not in components]
    if missing:
        raise WeightFileError(
            f"{file}: this {architecture} checkpoint lacks its {', '.join(missing)} (a UNet-only or pruned file?); "
            "training and sampling need a full checkpoint with UNet, text encoder(s) and VAE"
        )
    configs: dict[str, dict] = {}
    if CONFIG_METADATA_KEY in meta:
        try:
            configs = dict(json.loads(meta[CONFIG_METADATA_KEY]))
        except (ValueError, TypeError):
            configs = {}
    if report.unmatched or report.missing or report.mismatched:
        raise WeightFileError(f"{file}: cannot read this {architecture} checkpoint: {report.problems()}")
    if stats is not None and (architecture != "sdxl" or is_sdxl_refiner(state)):
        raise WeightFileError(f"{file}: edm_mean / edm_std (an EDM model's latent statistics, Playground v2.5) in an "
                              f"{architecture}{' refiner' if architecture == 'sdxl' else ''} checkpoint: only SDXL base "
                              "models come in the EDM formulation; remove the two tensors if the file is a plain one")
    if edm_v is not None and (architecture != "sdxl" or is_sdxl_refiner(state) or stats is not None):
        raise WeightFileError(f"{file}: edm_vpred.sigma_max (ComfyUI's EDM v-prediction marker, CosXL's formulation) "
                              + ("beside edm_mean / edm_std (Playground v2.5's EDM formulation): one model is one of "
                                 "the two; remove the markers or the statistics" if stats is not None else
                                 f"in an {architecture}{' refiner' if architecture == 'sdxl' else ''} checkpoint: "
                                 "ComfyUI reads it for SDXL base models only; remove the two markers if the file is "
                                 "a plain one"))
    return SingleFile(file, architecture, components, meta, configs, list(report.dropped), stats, unclip, markers,
                      edm_v)


# ------------------------------------------------------------------------------------- configs
def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def unet_config(state: Mapping[str, Tensor], *, architecture: str, prediction_type: str = "epsilon",
                pooled_dim: int | None = None, refiner: bool = False) -> dict:
    """``UNet2DConditionModel(**config)`` arguments from a diffusers-named UNet state (see the module table).

    ``pooled_dim``: SDXL's pooled text width (the second encoder's projection, 1280): the rest of
    the add-embedding's input is six sinusoidal size/crop embeddings, which gives their width.
    ``refiner``: the SDXL refiner's UNet, whose add-embedding takes five (original size, crop,
    aesthetic score: 1280 + 5 * 256 = 2560, SGM's ``adm_in_channels``).

    Raises:
        WeightFileError: the state lacks the keys every SD UNet has.
    """
    keys = list(state)
    try:
        conv_in = state["conv_in.weight"]  # (C0, in, 3, 3)
        conv_out = state["conv_out.weight"]  # (out, C0, 3, 3)
    except KeyError:
        raise WeightFileError("the checkpoint's UNet has no conv_in/conv_out weights") from None
    downs = _indices(keys, r"down_blocks\.(\d+)\.")
    channels = [int(state[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in downs]
    layers = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    attends = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in downs]
    ups = _indices(keys, r"up_blocks\.(\d+)\.")
    up_attends = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in ups]
    depth = [max(1, len(_indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\."))) for i in downs]
    middle = len(_indices(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    if attends and not attends[-1] and middle:  # (diffusers' mid block takes the last block's depth: the refiner's 4)
        depth[-1] = middle
        if len({d for d, a in zip(depth, attends) if a} | {middle}) == 1:
            depth = [middle] * len(depth)  # (one depth everywhere: the refiner config's transformer_layers_per_block 4)
    to_k = next((state[k] for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((state[k] for k in keys if k.endswith(".proj_in.weight")), None)
    if architecture == "sd1":
        heads: int | list[int] = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    config: dict = {
        "sample_size": 96 if architecture == "sd2" and prediction_type == "v_prediction" else _NATIVE_SIZE.get(architecture, 512) // 8,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "layers_per_block": layers,
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attends],
        "cross_attention_dim": int(to_k.shape[1]) if to_k is not None else 768,
        "attention_head_dim": heads,
        "use_linear_projection": proj_in is not None and proj_in.ndim == 2,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "norm_num_groups": 32,
    }
    if not any(k.startswith("mid_block.attentions.") for k in keys):
        config["mid_block_type"] = "UNetMidBlock2D" if any(k.startswith("mid_block.") for k in keys) else None
    if "add_embedding.linear_1.weight" in state:
        width = int(state["add_embedding.linear_1.weight"].shape[1])
        pooled = pooled_dim if pooled_dim is not None else 1280
        count = 5 if refiner else 6
        if (width - pooled) % count or width <= pooled:
            raise WeightFileError(f"the SDXL{' refiner' if refiner else ''} add-embedding takes {width} inputs, which is "
                                  f"not {pooled} pooled + {count} size embeddings")
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=width,
                      addition_time_embed_dim=(width - pooled) // count)
    if "class_embedding.linear_1.weight" in state:  # (SD 2.1 unCLIP: diffusers' create_unet_diffusers_config)
        config.update(class_embed_type="projection",
                      projection_class_embeddings_input_dim=int(state["class_embedding.linear_1.weight"].shape[1]))
    if architecture == "sd2":
        config["upcast_attention"] = prediction_type == "v_prediction"
    return config


def vae_config(state: Mapping[str, Tensor], *, architecture: str,
               latent_stats: tuple[list[float], list[float]] | None = None) -> dict:
    """``AutoencoderKL(**config)`` arguments from a diffusers-named VAE state. ``latent_stats``: an EDM
    (Playground v2.5) file's ``(mean, std)``: the config's ``latents_mean`` / ``latents_std`` and scaling factor
    0.5, as diffusers' ``create_vae_diffusers_config_from_ldm`` makes them."""
    keys = list(state)
    downs = _indices(keys, r"encoder\.down_blocks\.(\d+)\.")
    channels = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in downs]
    layers = len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    try:
        latent = int(state["decoder.conv_in.weight"].shape[1])
        config = {
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        }
    except KeyError:
        raise WeightFileError("the checkpoint's VAE has no encoder/decoder conv_in/conv_out weights") from None
    config.update({
        "latent_channels": latent,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "norm_num_groups": 32,
        "scaling_factor": SCALING_FACTORS.get(architecture, 0.18215),
        "sample_size": _NATIVE_SIZE.get(architecture, 512),
    })
    if latent_stats is not None:
        config.update(scaling_factor=PLAYGROUND_SCALING_FACTOR, latents_mean=list(latent_stats[0]),
                      latents_std=list(latent_stats[1]))
    return config


def text_encoder_config(state: Mapping[str, Tensor], *, open_clip: bool) -> dict:
    """``CLIPTextConfig(**config)`` arguments from a diffusers-named text-encoder state.

    Args:
        open_clip: OpenCLIP (SD2's encoder, SDXL's second): GELU; else OpenAI CLIP-L: quick-GELU.
    """
    keys = {k.removeprefix("text_model."): v for k, v in state.items()}
    try:
        token = keys["embeddings.token_embedding.weight"]  # (V, D)
        position = keys["embeddings.position_embedding.weight"]  # (L, D)
        fc1 = keys["encoder.layers.0.mlp.fc1.weight"]  # (I, D)
    except KeyError:
        raise WeightFileError("the checkpoint's text encoder lacks its embeddings or layers") from None
    width = int(token.shape[1])
    config = {
        "vocab_size": int(token.shape[0]),
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(_indices(keys, r"encoder\.layers\.(\d+)\.")),
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": int(position.shape[0]),
        "hidden_act": "gelu" if open_clip else "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    if "text_projection.weight" in state:
        config["projection_dim"] = int(state["text_projection.weight"].shape[0])
    return config


def file_hashes(path: str | os.PathLike, *, full: bool = True) -> dict[str, str]:
    """The hashes kohya records for a base model: ``{"legacy": A1111's old 8-hex hash, "sha256": ...}``.

    ``legacy`` (kohya's ``ss_sd_model_hash``): sha256 of the 64 KiB at offset 1 MiB, first 8 hex
    digits. ``sha256`` (``ss_new_sd_model_hash``; its first 10 digits are A1111's "AutoV2"): of the
    whole file — a few seconds per GB, skipped with ``full=False``.
    """
    from ..merge.sources import legacy_hash, sha256_of

    file = Path(path)
    out = {"legacy": legacy_hash(file)}
    if full:
        out["sha256"] = sha256_of(file)
    return out
