"""LoRA-family adaptation of a system's UNet and text encoder (LoRA, LoCon; other families by config).

The adapters are injected with :func:`sdadapt.inject` (reversible; base keys unchanged) and saved
with :func:`sdadapt.save_lora` in kohya format (A1111, ComfyUI, kohya, diffusers load it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import DoRAConfig, GLoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig, NormConfig
from ..errors import InputError
from ..formats import save_lora
from ..formats.kohya import kohya_metadata
from ..formats.layers import canonical_layer_path
from ..formats.unet_keys import model_layers_per_block
from ..formats.unet_names import attention_up_blocks
from ..inject import AdapterHandle, inject
from ..targets import TEXT_ENCODER, UNET_ATTENTION, UNET_KOHYA, UNET_LOCON, Target, select
from .base_weights import BaseWeights, merge_base_weights
from .lora_blocks import BLOCK_ARGS, BlockPlan, block_plan, kohya_block_index
from .loraplus import LORAPLUS_ARGS, loraplus_lr_scales, loraplus_ratios
from .lycoris_presets import LYCORIS_PRESETS, lycoris_preset
from .system import text_encoders
from .train_norm import norm_targets

__all__ = ["UNET_PRESETS", "AdapterAdaptation", "prepare_lora", "prepare_locon", "prepare_loha", "prepare_lokr", "prepare_glora",
           "prepare_dora"]


#: ``--network-targets`` presets: UNet layers the LoRA family adapts
UNET_PRESETS: dict[str, Target] = {"kohya": UNET_KOHYA, "attention": UNET_ATTENTION, "locon": UNET_LOCON}


class AdapterAdaptation:
    """Adapters injected into ``system.unet`` (and its text encoder(s)); ``params`` trains them.

    ``blocks`` (kohya's block-wise ``network_args``, :func:`~sdadapt.methods.lora_blocks.block_plan`)
    gives each UNet layer its block's rank and alpha (``layer_config(rank, alpha)`` builds the
    layer's config; rank 0 leaves the layer out) and each UNet adapter parameter its block's
    learning-rate factor (``lr_scales``, one per entry of ``params``). ``network_args`` are added
    to the file's ``ss_network_args``. ``unet_config=None`` adapts the text encoder(s) only (kohya's
    ``--network_train_text_encoder_only``). :meth:`use_loraplus` gives the up factors LoRA+'s
    ratio; ``base_weights`` (files merged into the model before, :mod:`~sdadapt.methods.base_weights`)
    are taken out again by :meth:`remove`.
    """

    def __init__(self, system, *, unet_targets: Target, unet_config, text_config=None, name: str = "default",
                 blocks: BlockPlan | None = None, layer_config: Callable[[int, float], object] | None = None,
                 network_args: Mapping[str, str] | None = None, text_targets: Target = TEXT_ENCODER,
                 norms: tuple[Target, NormConfig] | None = None) -> None:
        self.base_model = system.base_model  # file naming and metadata (System protocol)
        #: what building the adapters did, for the run report (``--network-weights``: modules loaded, missing, left out)
        self.notes: list[str] = []
        self.network_args: dict[str, str] = dict(network_args or {})
        #: the files merged into the base model before the adapters (kohya's --base_weights); remove() undoes them
        self.base_weights: BaseWeights | None = None
        if unet_config is None and text_config is None:
            raise InputError("neither the UNet nor a text encoder would be adapted: nothing to train")
        weights: dict[str, float] = {}
        if blocks is not None:
            if layer_config is None or unet_config is None:
                raise ValueError("AdapterAdaptation: blocks needs layer_config and a UNet config")
            unet_targets, configs, weights = _block_layers(system.unet, unet_targets, blocks, layer_config)
        else:
            configs = None
        if norms is not None and unet_config is not None:  # LyCORIS' train_norm: the norms beside the layers
            norm_layers = [layer for layer, _ in select(system.unet, norms[0])]
            if not norm_layers:
                raise InputError(f"train_norm: the UNet has no GroupNorm/LayerNorm among {norms[0].description}")
            chosen = set(norm_layers)
            unet_targets = unet_targets | Target(lambda n, m: n in chosen, "train_norm layers")
            configs = {**(configs or {}), **{layer: norms[1] for layer in norm_layers}}
        self.handles: dict[str, AdapterHandle] = {}
        if unet_config is not None:
            self.handles["unet"] = inject(system.unet, unet_targets, unet_config, name=name, layer_configs=configs)
        if text_config is not None:
            try:
                for component, module in text_encoders(system):
                    self.handles[component] = inject(module, text_targets, text_config, name=name)
            except Exception:
                self.remove()
                raise
        self.params: list[nn.Parameter] = [param for _, _, _, param in self._entries()]
        scales = [weights.get(layer, 1.0) if component == "unet" else 1.0 for component, layer, _, _ in self._entries()]
        #: the learning-rate factor of each entry of ``params`` (kohya's block lr weights, LoRA+; else all 1)
        self.lr_scales: list[float] | None = scales if blocks is not None and blocks.lr_weights is not None else None

    def _entries(self):
        """``(component, layer, parameter name in its adapter, parameter)`` of every adapter parameter, in ``params`` order."""
        for component, handle in self.handles.items():
            for layer, adapter in handle.modules.items():
                for param_name, param in adapter.named_parameters():
                    yield component, layer, param_name, param

    def use_loraplus(self, *, unet_ratio: float | None, text_encoder_ratio: float | None, family: str = "the adapters"
                     ) -> None:
        """LoRA+: the ``lora_up`` factors' learning-rate factors times the UNet's / text encoders' ratio
        (:func:`~sdadapt.methods.loraplus.loraplus_lr_scales`; ``None``: no LoRA+ there)."""
        if unet_ratio is None and text_encoder_ratio is None:
            return
        entries = [(component != "unet", param_name) for component, _, param_name, _ in self._entries()]
        self.lr_scales = loraplus_lr_scales(entries, self.lr_scales or [1.0] * len(entries), unet_ratio=unet_ratio,
                                            text_encoder_ratio=text_encoder_ratio, family=family)

    @classmethod
    def injected(cls, system, parts: list[tuple[str, nn.Module, Target]],
                 inject_part: Callable[[nn.Module, Target], AdapterHandle], *,
                 network_args: Mapping[str, str]) -> AdapterAdaptation:
        """The adaptation of ``inject_part(model, targets)`` on each ``(component, model, targets)`` of
        ``parts`` (e.g. :meth:`~sdadapt.methods.lycoris_presets.LycorisPreset.parts`); when one fails,
        those already injected are removed before the error goes on."""
        handles: dict[str, AdapterHandle] = {}
        try:
            for component, model, targets in parts:
                handles[component] = inject_part(model, targets)
        except BaseException:
            for handle in handles.values():
                handle.remove()
            raise
        adaptation = cls.from_handles(system, handles)
        adaptation.network_args = dict(network_args)
        return adaptation

    @classmethod
    def from_handles(cls, system, handles: Mapping[str, AdapterHandle]) -> AdapterAdaptation:
        """The adaptation of adapters already injected into ``system`` (``{component: handle}``, e.g.
        :func:`~sdadapt.methods.network_weights.adapters_from_weights`); every parameter at lr factor 1."""
        adaptation = cls.__new__(cls)
        adaptation.base_model = system.base_model
        adaptation.network_args = {}
        adaptation.handles = dict(handles)
        adaptation.params = [param for _, _, _, param in adaptation._entries()]
        adaptation.lr_scales = None
        adaptation.notes = []
        adaptation.base_weights = None
        return adaptation

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        states = {c: h.state_dict() for c, h in self.handles.items()}
        metadata = dict(metadata or {})
        given = metadata.get("ss_network_args")  # (train's kohya text; None: kohya writes none, nor here unless
        # an option beside --network_dropout came from elsewhere: a top-level key, a flag)
        other = set(self.network_args) - {"dropout"}
        if self.network_args and ("ss_network_args" not in metadata or given is None and other):
            args = json.loads(kohya_metadata(states, base_model=self.base_model)["ss_network_args"])
            metadata["ss_network_args"] = json.dumps({**args, **self.network_args})
        elif self.network_args and isinstance(given, str):  # what was applied beyond the kohya text (a top-level
            written = json.loads(given)  # key, a flag), after it; the text's own values as written
            extra = {k: v for k, v in self.network_args.items() if k not in written}
            if extra:
                metadata["ss_network_args"] = json.dumps({**written, **extra})
        unet = self.handles["unet"].model if "unet" in self.handles else None
        save_lora(path, states, format="kohya", base_model=self.base_model, metadata=metadata,
                  layers_per_block=model_layers_per_block(unet))  # SDXL's LDM names follow the UNet
        return Path(path)

    def remove(self) -> None:
        """Take the adapters out, then undo the ``base_weights`` merge: the system exactly as before."""
        for handle in self.handles.values():
            handle.remove()
        if self.base_weights is not None:
            self.base_weights.undo()


def _block_layers(unet: nn.Module, targets: Target, blocks: BlockPlan, layer_config: Callable[[int, float], object]
                  ) -> tuple[Target, dict[str, object], dict[str, float]]:
    """kohya's blocks on ``targets``' layers -> (the layers kept, their configs, their lr weights)."""
    chosen = select(unet, targets)
    up_attention = None
    if blocks.sdxl:
        up_attention = attention_up_blocks(canonical_layer_path("unet", n) for n, _ in chosen) or {0, 1}
    keep: set[str] = set()
    configs: dict[str, object] = {}
    weights: dict[str, float] = {}
    for layer_name, layer in chosen:
        block = kohya_block_index(layer_name, sdxl=blocks.sdxl, up_blocks_with_attention=up_attention)
        if block < 0:
            raise InputError(f"UNet layer {layer_name!r} is in none of kohya's blocks, so block_dims / block lr weights "
                             "cannot place it; use --network-targets kohya or locon")
        kxk = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
        rank, alpha = blocks.rank_alpha(block, kxk=kxk)
        if rank == 0:
            continue  # kohya: a block of rank 0 or lr weight 0 gets no module
        keep.add(layer_name)
        configs[layer_name] = layer_config(rank, alpha)
        weights[layer_name] = blocks.lr_weight(block)
    if not keep:
        raise InputError("every UNet block has rank 0 or learning-rate weight 0 (block_dims / down, mid, up_lr_weight): "
                         "nothing of the UNet would train")
    return _named(keep), configs, weights


def _named(names: set[str]) -> Target:
    """The layers named exactly in ``names``."""
    return Target(lambda name, module: name in names, f"{len(names)} named layers")


def _targets(preset: str | None, conv_rank: int | None, default: Target) -> Target:
    if preset is None:
        return UNET_LOCON if conv_rank is not None and default is UNET_KOHYA else default
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown network targets {preset!r}; choose {', '.join(UNET_PRESETS)} or a LyCORIS preset "
                         f"({', '.join(LYCORIS_PRESETS)})")
    return UNET_PRESETS[preset]


def _check(rank: int, conv_rank: int | None) -> None:
    for option, value in (("--network-dim (kohya's network_dim; the rank)", rank),
                          ("--conv-dim (kohya's conv_dim; the kxk convolutions' rank)", conv_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")


#: LyCORIS-style network_args that set a field of the family's config (``use_cp`` = ``use_tucker``, LyCORIS' old name;
#: ``factor`` / ``decompose_both``: LoKr's)
_CONFIG_ARGS = ("dropout", "rank_dropout", "module_dropout", "use_tucker", "factor", "decompose_both", "init")
#: the starts a LoRA trains from: kohya's kaiming-uniform down factor, or peft's ``init_lora_weights="gaussian"``
#: (N(0, 1/r), diffusers' DreamBooth LoRA scripts); PiSSA rewrites the base weights, which no LoRA file carries
TRAINING_INITS = ("kaiming", "gaussian")
#: LyCORIS' train_norm: norm modules on the GroupNorm/LayerNorm layers inside the adapted UNet modules
_NORM_ARGS = ("train_norm",)


def _config_extras(make, family: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields ``args`` (dropout, rank_dropout, module_dropout, use_tucker) set; refuses those ``make`` lacks."""
    extras = {name: value for name, value in args.items() if value is not None}
    if not extras:
        return {}
    config_type = make if isinstance(make, type) else LoRAConfig  # DoRA wraps a LoRAConfig
    known = {f.name for f in dataclasses.fields(config_type)}
    missing = sorted(n for n in set(extras) - known if extras[n])  # off (0 / False) they change nothing: kohya_ss writes them
    extras = {n: v for n, v in extras.items() if n in known}
    if missing:
        raise InputError(f"{family} has no {', '.join(missing)} (network_args); it takes "
                         f"{', '.join(n for n in _CONFIG_ARGS if n in known)}")
    return extras


def _network_args(given: Mapping[str, Any]) -> dict[str, str]:
    """The network_args given, as kohya records them in ``ss_network_args`` (strings; lists comma-joined)."""
    out: dict[str, str] = {}
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[name] = str(value)
    return out


#: the keywords that start the adapters from a file (kohya's --network_weights, --dim_from_weights)
_WEIGHT_ARGS = ("network_weights", "dim_from_weights")


def adaptation_from_weights(system, build: Callable[[], AdapterAdaptation], *, text_encoder: bool,
                            network: Mapping[str, Any], network_weights: str | os.PathLike | None = None,
                            dim_from_weights: bool = False) -> AdapterAdaptation:
    """The adaptation ``build()`` makes with the file ``network_weights`` loaded into it, or with
    ``dim_from_weights`` the file's own modules (:mod:`sdadapt.methods.network_weights`); the
    report's lines are in the adaptation's ``notes``. The file is read before ``build()`` runs, and
    the adapters are taken out again when loading it fails. ``network``: the other network_args
    given (refused with ``dim_from_weights``, where the file decides)."""
    from .network_weights import adapters_from_weights, load_network_weights, read_network_weights

    if network_weights is None:
        if dim_from_weights:
            raise InputError("--dim-from-weights takes the ranks from --network-weights FILE: give the file too")
        return build()
    weights = read_network_weights(network_weights, system=system)
    if dim_from_weights:
        given = sorted(n for n, v in network.items() if v is not None)
        if given:
            raise InputError(f"{', '.join(given)}: not used with --dim-from-weights (the file decides the modules, "
                             "ranks and alphas); leave them out, or drop --dim-from-weights")
        handles, report = adapters_from_weights(system, weights, text_encoder=text_encoder)
        adaptation = AdapterAdaptation.from_handles(system, handles)
    else:
        adaptation = build()
        try:
            report = load_network_weights(adaptation.handles, weights, system=system)
        except BaseException:
            adaptation.remove()
            raise
    adaptation.notes = report.notes()
    return adaptation


#: kohya's --base_weights / --base_weights_multiplier (sdadapt.methods.base_weights; not network_args)
_BASE_ARGS = ("base_weights", "base_weights_multiplier")


def _adaptation(system, make, family: str, *, rank: int, alpha, conv_rank, conv_alpha, text_encoder: bool, targets,
                default: Target, network: Mapping[str, Any], unet: bool = True) -> AdapterAdaptation:
    """``make`` (a family's config class) on ``default``'s layers (or ``targets``) + the text encoders.

    ``network`` holds the kohya/LyCORIS network_args keywords (``BLOCK_ARGS``, dropout & co., the
    LoRA+ ratios) and ``base_weights`` / ``base_weights_multiplier`` (merged into the model first);
    alpha defaults to the rank. ``unet=False``: the text encoders only.
    """
    if any(network.get(n) is not None for n in _BASE_ARGS):  # kohya merges them before the network is built
        files = network.get("base_weights")
        if not files:
            raise InputError("--base-weights-multiplier scales the --base-weights files: give the files too")
        rest = {n: v for n, v in network.items() if n not in _BASE_ARGS}
        merged = merge_base_weights(system, [files] if isinstance(files, (str, os.PathLike)) else files,
                                    multipliers=network.get("base_weights_multiplier"))
        try:
            adaptation = _adaptation(system, make, family, rank=rank, alpha=alpha, conv_rank=conv_rank,
                                     conv_alpha=conv_alpha, text_encoder=text_encoder, targets=targets, default=default,
                                     network=rest, unet=unet)
        except BaseException:
            merged.undo()
            raise
        adaptation.base_weights = merged
        adaptation.notes = merged.notes() + list(adaptation.notes)
        return adaptation
    plus = {n: network[n] for n in LORAPLUS_ARGS if network.get(n) is not None}
    if plus:
        unet_ratio, text_ratio = loraplus_ratios(**plus)
        unused = [f"{name} ({flag}: no {part} modules train)" for name, flag, part, off in (
            ("loraplus_unet_lr_ratio", "--no-unet", "UNet", not unet),
            ("loraplus_text_encoder_lr_ratio", "--no-text-encoder", "text-encoder", not text_encoder))
            if off and name in plus]  # (GUIs write every LoRA+ field; kohya keeps the ratio and never reads it)
        rest = {n: v for n, v in network.items() if n not in LORAPLUS_ARGS}
        adaptation = _adaptation(system, make, family, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                                 text_encoder=text_encoder, targets=targets, default=default, network=rest, unet=unet)
        try:
            adaptation.use_loraplus(unet_ratio=unet_ratio if unet else None,
                                    text_encoder_ratio=text_ratio if text_encoder else None, family=family)
        except BaseException:
            adaptation.remove()
            raise
        adaptation.network_args.update(_network_args(plus))  # kohya keeps them in ss_network_args
        adaptation.notes = list(adaptation.notes) + [f"{u}: not used, as kohya leaves it unused" for u in unused]
        return adaptation
    if not unet:
        if not text_encoder:
            raise InputError("--no-unet with --no-text-encoder (kohya's network_train_text_encoder_only and "
                             "network_train_unet_only): nothing would train; leave one of the two out")
        given = sorted(n for n in BLOCK_ARGS if network.get(n) is not None)
        if given or (targets is not None and targets in UNET_PRESETS) or conv_rank is not None:
            named = given + (["--network-targets"] if targets is not None else []) + (["conv_dim"] if conv_rank is not None else [])
            raise InputError(f"{', '.join(named)}: UNet options, but --no-unet (network_train_text_encoder_only) "
                             "adapts the text encoder(s) only; leave them out")
        if network.get("dim_from_weights"):
            raise InputError("--dim-from-weights with --no-unet: the file's modules decide what trains; leave --no-unet "
                             "out (or give --network-dim and drop --dim-from-weights)")
        if not text_encoders(system):
            raise InputError("--no-unet (network_train_text_encoder_only): the model has no text encoder to adapt")
    start = {n: network[n] for n in _WEIGHT_ARGS if n in network}  # --network-weights FILE, --dim-from-weights
    if start:
        rest = {n: v for n, v in network.items() if n not in _WEIGHT_ARGS}
        return adaptation_from_weights(system, lambda: _adaptation(
            system, make, family, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
            text_encoder=text_encoder, targets=targets, default=default, network=rest, unet=unet),
            text_encoder=text_encoder, network=rest, **start)
    unknown = sorted(set(network) - set(BLOCK_ARGS) - set(_CONFIG_ARGS) - set(_NORM_ARGS))
    if unknown:
        raise TypeError(f"unexpected keyword(s) {', '.join(unknown)}")
    extras = _config_extras(make, family, {n: network.get(n) for n in _CONFIG_ARGS})
    if "init" in extras and str(extras["init"]).strip().lower() not in TRAINING_INITS:
        raise InputError(f"init={extras['init']}: a trained LoRA starts from {' or '.join(TRAINING_INITS)} (kaiming: "
                         "kohya's, the default; gaussian: peft's, as diffusers' DreamBooth LoRA scripts)")
    if "init" in extras:
        extras["init"] = str(extras["init"]).strip().lower()
    norms = None
    if network.get("train_norm"):
        if not unet:
            raise InputError("train_norm with --no-unet: LyCORIS' norm modules sit in the UNet; leave one out")
        convs_given = conv_rank is not None or network.get("conv_block_dims") is not None
        norms = (norm_targets(targets, convs=convs_given), NormConfig(module_dropout=extras.get("module_dropout", 0.0)))
    if targets is not None and targets not in UNET_PRESETS:  # a LyCORIS preset: its UNet and text-encoder layers
        preset = lycoris_preset(targets).on(system)  # (a preset file: its layers in these models)
        if text_encoder and preset.text_encoder is None:
            text_encoder = False  # (LyCORIS' unet-* presets list no text-encoder module)
        if unet and preset.unet is None:
            raise InputError(f"LyCORIS preset {targets} adapts no UNet layer")
        if not unet and not text_encoder:
            raise InputError(f"LyCORIS preset {targets} adapts the UNet only, but --no-unet leaves it out: nothing "
                             "would train")
        given = sorted(n for n in BLOCK_ARGS if network.get(n) is not None)
        if given:
            raise InputError(f"{', '.join(given)} with LyCORIS preset {targets}: kohya's block-wise args place "
                             "kohya's LoRA layers only; leave them out or use --network-targets kohya or locon")
        config = make(rank=rank, alpha=alpha if alpha is not None else rank, conv_rank=conv_rank,
                      conv_alpha=conv_alpha if conv_alpha is not None else conv_rank, **extras)
        text = make(rank=rank, alpha=alpha if alpha is not None else rank, **extras) if text_encoder else None
        args = _network_args(network)
        args["preset"] = preset.name
        return AdapterAdaptation(system, unet_targets=preset.unet, unet_config=config if unet else None,
                                 text_config=text, network_args=args, norms=norms,
                                 text_targets=preset.text_encoder if preset.text_encoder is not None else TEXT_ENCODER)
    config = make(rank=rank, alpha=alpha if alpha is not None else rank, conv_rank=conv_rank,
                  conv_alpha=conv_alpha if conv_alpha is not None else conv_rank, **extras)
    text = make(rank=rank, alpha=alpha if alpha is not None else rank, **extras) if text_encoder else None
    blocks = block_plan(sdxl=system.base_model == "sdxl", rank=rank, alpha=alpha, conv_rank=conv_rank,
                        conv_alpha=conv_alpha, **{n: network[n] for n in BLOCK_ARGS if network.get(n) is not None}
                        ) if unet else None
    # kohya adds the convolutions' modules (ResnetBlock2D, down/upsamplers) with conv_dim or conv_block_dims
    convs = conv_rank is not None or (blocks is not None and blocks.conv_dims is not None and any(blocks.conv_dims))
    unet_targets = _targets(targets, 1 if convs else None, default)

    def layer_config(layer_rank: int, layer_alpha: float) -> object:
        return make(rank=layer_rank, alpha=layer_alpha, conv_rank=layer_rank, conv_alpha=layer_alpha, **extras)

    return AdapterAdaptation(system, unet_targets=unet_targets, unet_config=config if unet else None, text_config=text,
                             blocks=blocks, layer_config=layer_config, network_args=_network_args(network), norms=norms)


def prepare_lora(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                 unet: bool = True, **network_args: Any) -> AdapterAdaptation:
    """kohya's default LoRA: transformer-block Linears of the UNet (+ the text encoders').

    ``conv_rank`` adds the 3x3 convolutions of the blocks (kohya's ``conv_dim``: LoCon targets);
    ``targets`` picks a preset of :data:`UNET_PRESETS` or a LyCORIS preset
    (:data:`~sdadapt.methods.lycoris_presets.LYCORIS_PRESETS`: ``"full"`` ..., UNet and text-encoder
    layers as ``lycoris.kohya``; kxk convolutions at ``conv_rank``, default ``rank``). ``network_args``: kohya's block-wise
    options (:data:`~sdadapt.methods.lora_blocks.BLOCK_ARGS`: ``down_lr_weight="sine"``,
    ``block_dims="4,4,..."`` ...), ``dropout``, ``rank_dropout``, ``module_dropout``, ``use_tucker``,
    ``init`` (``"kaiming"``, kohya's, or ``"gaussian"``, peft's: :data:`TRAINING_INITS`),
    the LoRA+ ratios (:data:`~sdadapt.methods.loraplus.LORAPLUS_ARGS`: ``loraplus_lr_ratio=16`` ...),
    ``network_weights`` / ``dim_from_weights`` and ``base_weights=[FILE, ...]`` with
    ``base_weights_multiplier=[M, ...]`` (merged into the model first; :meth:`AdapterAdaptation.remove`
    undoes them). ``unet=False`` adapts the text encoder(s) only (kohya's ``--network_train_text_encoder_only``).
    """
    _check(rank, conv_rank)
    return _adaptation(system, LoRAConfig, "lora", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                       text_encoder=text_encoder, targets=targets, default=UNET_KOHYA, network=network_args, unet=unet)


def prepare_locon(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                  conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                  unet: bool = True, **network_args: Any) -> AdapterAdaptation:
    """LoCon: LoRA on every Linear and Conv2d of the down/mid/up blocks (ResNets included); convs rank/2 by default.

    ``network_args`` as :func:`prepare_lora`.
    """
    _check(rank, conv_rank)
    conv = conv_rank if conv_rank is not None else max(1, rank // 2)
    return _adaptation(system, LoRAConfig, "locon", rank=rank, alpha=alpha, conv_rank=conv, conv_alpha=conv_alpha,
                       text_encoder=text_encoder, targets=targets, default=UNET_LOCON, network=network_args, unet=unet)


def _on_kohya_layers(system, make, family: str, *, rank: int, alpha, conv_rank, conv_alpha, text_encoder: bool, targets,
                     network: Mapping[str, Any], unet: bool = True) -> AdapterAdaptation:
    """``make`` (a family's config class) on kohya's layer set (or ``targets``) + the text encoders; alpha defaults to the rank."""
    _check(rank, conv_rank)
    return _adaptation(system, make, family, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                       text_encoder=text_encoder, targets=targets, default=UNET_KOHYA, network=network, unet=unet)


def prepare_loha(system, *, rank: int = 4, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                 unet: bool = True, **network_args: Any) -> AdapterAdaptation:
    """LoHa (Hadamard product of two rank-r pairs; ΔW up to rank r²) on kohya's layer set (LyCORIS file)."""
    return _on_kohya_layers(system, LoHaConfig, "loha", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                            text_encoder=text_encoder, targets=targets, network=network_args, unet=unet)


def prepare_lokr(system, *, rank: int = 4, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                 unet: bool = True, **network_args: Any) -> AdapterAdaptation:
    """LoKr (Kronecker product) on kohya's layer set (LyCORIS file).

    ``network_args`` as :func:`prepare_lora`, plus LyCORIS' ``factor`` (the split size, ``-1``: the
    most square split) and ``decompose_both`` (:class:`~sdadapt.adapters.LoKrConfig`).
    """
    return _on_kohya_layers(system, LoKrConfig, "lokr", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                            text_encoder=text_encoder, targets=targets, network=network_args, unet=unet)


def prepare_glora(system, *, rank: int = 4, alpha: float | None = None, conv_rank: int | None = None,
                  conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                  unet: bool = True, **network_args: Any) -> AdapterAdaptation:
    """GLoRA (LyCORIS ``algo=glora``: ``ΔW = (W·a1·a2 + b1·b2)·alpha/r``, :class:`~sdadapt.adapters.GLoRAConfig`)
    on kohya's layer set (LyCORIS file); ``network_args`` as :func:`prepare_lora` (module_dropout)."""
    return _on_kohya_layers(system, GLoRAConfig, "glora", rank=rank, alpha=alpha, conv_rank=conv_rank,
                            conv_alpha=conv_alpha, text_encoder=text_encoder, targets=targets, network=network_args,
                            unet=unet)


def prepare_dora(system, *, rank: int = 8, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, text_encoder: bool = True, targets: str | None = None,
                 unet: bool = True, wd_on_output: bool = True, **network_args: Any) -> AdapterAdaptation:
    """DoRA: LoRA r8 direction + a trained magnitude (LyCORIS ``dora_scale`` file) per output row, or with
    ``wd_on_output=False`` (LyCORIS' network arg) per input column — the axis A1111 and InvokeAI apply."""
    _check(rank, conv_rank)

    def make(**options):
        return DoRAConfig(inner=LoRAConfig(**options), wd_on_out=bool(wd_on_output))

    return _on_kohya_layers(system, make, "dora", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                            text_encoder=text_encoder, targets=targets, network=network_args, unet=unet)
