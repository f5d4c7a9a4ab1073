"""sdadapt's adapters as a kohya network module: ``train_network.py --network_module sdadapt.kohya_network``.

kohya's trainers (``train_network.py``, ``sdxl_train_network.py``, and the kohya_ss GUI that runs them) build the
trained network through a module named by ``--network_module``: they call its :func:`create_network` (or
:func:`create_network_from_weights`) and then the network's ``apply_to``, ``load_weights``,
``prepare_optimizer_params``, ``prepare_grad_etc``, ``on_epoch_start``, ``get_trainable_params``, ``save_weights``,
``apply_max_norm_regularization``, ``set_multiplier``, ``merge_to`` (sd-scripts 48d368fa ``train_network.py``). This
module is that interface over sdadapt's own LoRA family, so a kohya run trains sdadapt's adapters and writes the
files kohya, LyCORIS, A1111, ComfyUI and diffusers read:

* ``--network_args`` are read as ``python -m sdadapt train`` reads them (:mod:`sdadapt.network_args`): kohya's
  ``conv_dim``, ``conv_alpha``, ``dropout`` (``--network_dropout``), ``rank_dropout``, ``module_dropout``, the
  block-wise ``block_dims`` / ``down_lr_weight`` ..., LoRA+'s ``loraplus_lr_ratio``; LyCORIS' ``algo`` (``lora``,
  ``locon``, ``loha``, ``lokr``, ``glora``, ``ia3``, ``diag-oft``, ``boft``), ``dora_wd``, ``preset``,
  ``use_tucker``, ``factor``, ``decompose_both``, ``train_norm``. No ``algo``: kohya's ``networks.lora`` (its
  layers, and ``conv_dim`` adds the convolutions).
* Defaults are kohya's (``networks/lora.py``): rank 4, alpha 1, ``conv_alpha`` 1 for ``lora`` / ``locon`` and the
  network alpha for the LyCORIS algos.
* The layers are kohya's, by the same names (:mod:`sdadapt.targets`; kohya's own SD1/SD2 UNet names its modules as
  diffusers does, its SDXL UNet as LDM does, and both are read), and the file keys are kohya's and LyCORIS'
  (``lora_unet_…``, ``lora_te_…``, ``lora_te1_`` / ``lora_te2_`` for SDXL's two text encoders).
* The adapters sit in the models by sdadapt's hooks (:func:`sdadapt.inject`), not by replacing ``forward``; they
  keep their float32 when kohya then casts its frozen models to fp16, bf16 or float8
  (:meth:`~sdadapt.inject.AdapterHandle.keep_dtype`) and train under kohya's autocast as its own LoRA does. The
  network is an ``nn.Module`` holding them, so kohya's ``network.to(dtype)`` (``--full_fp16``/``--full_bf16``),
  ``accelerator.prepare(network)``, ``train()`` and ``eval()`` reach them.

What differs from kohya's ``networks.lora``: files are written as safetensors only (no pickles; ``save_model_as`` ckpt
or pt is refused); ``load_weights`` and ``create_network_from_weights`` read any LoRA-family file sdadapt reads
(kohya, LyCORIS, diffusers/peft) and refuse a module whose family, rank or alpha differs from the network's
(:mod:`sdadapt.methods.network_weights`; kohya loads such a file with its alpha unscaled, its own FIXME); the regional
prompting of kohya's ``gen_img.py`` (``set_region``) is not there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .network_args import (
    KOHYA_NETWORK_DEFAULTS,
    LYCORIS_ALGOS,
    NETWORK_ARG_NAMES,
    check_lycoris_args,
    drop_lycoris_ignored,
    kohya_conv_alpha,
    parse_network_args,
)

__all__ = ["KohyaNetwork", "create_network", "create_network_from_weights"]



@dataclass
class _Models:
    """The members of a :class:`~sdadapt.methods.system.System` the LoRA family's ``prepare`` reads, for kohya's
    models: the UNet, the text encoder(s), and the base model their names and metadata follow."""

    unet: nn.Module | None
    text_encoder: nn.Module | None
    text_encoder_2: nn.Module | None
    base_model: str


def _models(text_encoder: Any, unet: nn.Module | None) -> _Models:
    """kohya's ``text_encoder`` (one model, or SDXL's list of two) and ``unet`` as :class:`_Models`."""
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if len(encoders) > 2:
        raise InputError(f"kohya network: {len(encoders)} text encoders; sdadapt adapts one (SD1/SD2) or two (SDXL)")
    first = encoders[0] if encoders else None
    second = encoders[1] if len(encoders) == 2 else None
    if second is not None:
        base_model = "sdxl"
    else:
        width = getattr(getattr(first, "config", None), "hidden_size", None)
        base_model = "sd2" if width == 1024 else "sd1"
    return _Models(unet=unet, text_encoder=first, text_encoder_2=second, base_model=base_model)


def _method_of(kwargs: Mapping[str, Any]) -> str:
    """The sdadapt method ``network_args`` name: LyCORIS' ``algo`` (``dora_wd=True``: DoRA), else kohya's LoRA."""
    algo = str(kwargs.get("algo") or "lora").strip().lower()
    if str(kwargs.get("dora_wd", "")).strip().lower() in ("true", "1", "yes"):
        return "dora"
    if algo not in LYCORIS_ALGOS:
        raise InputError(f"network_args algo={algo}: sdadapt.kohya_network trains the algos {', '.join(LYCORIS_ALGOS)} "
                         "and DoRA (dora_wd=True)")
    return algo


def _typed(option, text: str, spelling: str | None = None) -> Any:
    """A ``network_args`` value (text) through the method option's type; booleans as kohya's configs write them.
    ``spelling``: the key as the user wrote it (kohya's ``conv_dim`` for sdadapt's ``conv_rank``), for messages."""
    if option.type is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off", "none", ""):
            return False
        raise InputError(f"network_args {spelling or option.name}={text!r}: write true or false")
    try:
        return option.type(text)
    except (TypeError, ValueError):
        raise InputError(f"network_args {spelling or option.name}={text!r} is not a valid "
                         f"{getattr(option.type, '__name__', 'value')}") from None


def _network_options(method: str, network_dim: int | None, network_alpha: float | None,
                     neuron_dropout: float | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's ``create_network`` arguments as ``METHODS[method].prepare`` keywords, kohya's defaults filled in."""
    from .methods import METHODS

    options = {option.name: option for option in METHODS[method].options}
    every = {option.name for other in METHODS.values() for option in other.options}
    given = dict(kwargs)
    if neuron_dropout is not None:
        given["dropout"] = neuron_dropout  # (kohya passes --network_dropout as both; the argument wins)
    items = [f"{key}={value}" for key, value in given.items() if value is not None]
    chosen: dict[str, Any] = parse_network_args(items, method_options=every, source="network_args")
    check_lycoris_args(method, chosen)
    drop_lycoris_ignored(method, chosen, keep=set(), notes=[])  # (what LyCORIS' (IA)³ / OFT modules ignore too)
    foreign = sorted(set(chosen) - set(options))
    if foreign:
        raise InputError(f"network_args {', '.join(foreign)}: not an option of {method} (sdadapt's "
                         f"{method} takes {', '.join(sorted(options))})")
    written = {NETWORK_ARG_NAMES.get(key, key): key for key in given}  # (sdadapt's name -> the key as written)
    typed = {name: _typed(options[name], str(text), written.get(name)) for name, text in chosen.items()}
    given_network = {"rank": network_dim, "alpha": network_alpha}
    for name, (default, _) in KOHYA_NETWORK_DEFAULTS.items():
        if name in options:
            typed[name] = options[name].type(given_network[name] if given_network[name] is not None else default)
    if "conv_alpha" in options and "conv_rank" in typed and "conv_alpha" not in typed:
        typed["conv_alpha"] = kohya_conv_alpha(method, typed.get("alpha", KOHYA_NETWORK_DEFAULTS["alpha"][0]))
    return typed


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None, **kwargs: Any
                   ) -> KohyaNetwork:
    """kohya's ``network_module.create_network``: the network its options describe, applied by ``apply_to``.

    Args:
        multiplier: the adapters' strength (kohya passes 1.0 for training).
        network_dim, network_alpha: kohya's ``--network_dim`` / ``--network_alpha`` (``None``: 4 and 1).
        vae: unused (kohya passes its VAE).
        text_encoder: the text encoder, or SDXL's list of two (``CLIPTextModel``, ``CLIPTextModelWithProjection``).
        unet: the UNet (kohya's own, a diffusers ``UNet2DConditionModel`` or an LDM one).
        neuron_dropout: ``--network_dropout``.
        kwargs: ``--network_args`` as ``{key: text}`` (kohya's ``key=value`` split).

    Raises:
        InputError: an unknown network arg, an algo sdadapt does not train, a value of the wrong type.
    """
    del vae
    method = _method_of(kwargs)
    options = _network_options(method, network_dim, network_alpha, neuron_dropout, kwargs)
    return KohyaNetwork(_models(text_encoder, unet), method, options, multiplier=multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike, vae: nn.Module | None, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[KohyaNetwork, dict]:
    """kohya's ``network_module.create_network_from_weights``: the network of ``file``'s own modules (its family,
    ranks and alphas; kohya's ``--dim_from_weights`` and ``--base_weights``), applied by ``apply_to`` (its weights
    loaded) or merged into the models by ``merge_to``.

    Args:
        file: a LoRA-family file (kohya, LyCORIS, diffusers/peft); safetensors, or a pickle read with
            ``torch.load(weights_only=True)``.
        weights_sd: kohya's already-read tensors of ``file`` (returned as given; the file is read again).
        for_inference: unused (the same network serves both).
        kwargs: ``--network_args``; kohya's block lr weights (``down_lr_weight`` ...) are read.

    Returns:
        ``(network, the file's tensors)`` as kohya's.
    """
    del vae, for_inference
    from .formats.files import read_weights

    path = Path(file)
    if weights_sd is None:
        weights_sd, _ = read_weights(path)
    models = _models(text_encoder, unet)
    options: dict[str, Any] = {"network_weights": str(path), "dim_from_weights": True}
    if kwargs:
        from .methods import METHODS
        from .methods.lora_blocks import BLOCK_ARGS

        known = {option.name: option for option in METHODS["lora"].options}
        items = [f"{key}={value}" for key, value in kwargs.items() if value is not None and key in BLOCK_ARGS]
        chosen = parse_network_args(items, method_options=set(known), source="network_args")
        options.update({name: _typed(known[name], str(text)) for name, text in chosen.items()})
    return KohyaNetwork(models, "lora", options, multiplier=multiplier, file=path), dict(weights_sd)


class KohyaNetwork(nn.Module):
    """The network kohya's trainer drives (module docstring): sdadapt adapters, injected by :meth:`apply_to`.

    Attributes:
        method: the sdadapt method (``lora``, ``loha`` ...); ``options`` its ``prepare`` keywords.
        adapters: ``{kohya module name: adapter}`` once applied (the same modules the models' hooks run).
        adaptation: the :class:`~sdadapt.methods.lora.AdapterAdaptation` once applied.
    """

    def __init__(self, models: _Models, method: str, options: Mapping[str, Any], *, multiplier: float = 1.0,
                 file: Path | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_models", models)  # (not submodules: the network holds only its adapters)
        self.method = method
        self.options = dict(options)
        self.multiplier = float(multiplier)
        self.file = file
        self.adapters = nn.ModuleDict()
        self.adaptation = None

    # ------------------------------------------------------------------ building
    def prepare_network(self, args: Any) -> None:
        """kohya's check of its arguments right after ``create_network``: a pickle output (``--save_model_as ckpt`` /
        ``pt``) is refused now rather than at the first save (:meth:`save_weights` writes safetensors only)."""
        save_as = getattr(args, "save_model_as", None)
        if save_as is not None and str(save_as).lower() != "safetensors":
            raise InputError(f"--save_model_as {save_as}: sdadapt writes safetensors only (a {save_as} file would be a "
                             "pickle); use --save_model_as safetensors")

    def apply_to(self, text_encoder: Any, unet: nn.Module, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Inject the adapters into ``unet`` and the text encoder(s) (each only when asked) by sdadapt's hooks.

        Raises:
            InputError: applied twice, neither part asked for, or the options do not fit the models.
        """
        from .methods import METHODS

        if self.adaptation is not None:
            raise InputError("kohya network: apply_to was called already (the adapters are in the models)")
        models = _models(text_encoder, unet)
        object.__setattr__(self, "_models", models)
        options = {**self.options, "text_encoder": bool(apply_text_encoder), "unet": bool(apply_unet)}
        adaptation = METHODS[self.method].prepare(models, **options)
        self.adaptation = adaptation
        for component, handle in adaptation.handles.items():
            handle.keep_dtype()  # (kohya casts its frozen models after apply_to)
            for layer, adapter in handle.modules.items():
                self.adapters[f"{component}_{layer}".replace(".", "_")] = adapter
        self.set_multiplier(self.multiplier)

    def _handles(self) -> Mapping[str, Any]:
        if self.adaptation is None:
            raise InputError("kohya network: call apply_to(text_encoder, unet) first")
        return self.adaptation.handles

    def load_weights(self, file: str | os.PathLike):
        """Copy a LoRA-family file into the applied adapters (kohya's ``--network_weights``).

        Returns:
            the :class:`~sdadapt.methods.network_weights.NetworkWeightsReport` (what was loaded, missing, left out).

        Raises:
            InputError: a module of another family, rank or alpha than the network's.
            WeightFileError: an unreadable file, or one for another model.
        """
        from .methods.network_weights import load_network_weights, read_network_weights

        weights = read_network_weights(Path(file), system=self._models, flag="network_weights")
        return load_network_weights(self._handles(), weights, system=self._models)

    # ------------------------------------------------------------------ training
    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """kohya's parameter groups: the text encoders' adapters at ``text_encoder_lr`` (SDXL: a list, one per
        encoder), the UNet's at ``unet_lr`` (each ``None``: ``default_lr``), times each parameter's block lr weight
        and LoRA+ ratio; a group whose rate is 0 or ``None`` is left out, as kohya's.

        Returns:
            ``(param groups, their descriptions)``: ``"unet"``, ``"textencoder"`` (SDXL: ``"textencoder1"``,
            ``"textencoder2"``), with ``" x<factor>"`` for scaled groups.
        """
        self._handles()  # (applied: else the error saying so)
        self.requires_grad_(True)
        adaptation = self.adaptation
        scales = adaptation.lr_scales or [1.0] * len(adaptation.params)
        groups: dict[tuple[str, float], list[nn.Parameter]] = {}
        rates: dict[tuple[str, float], float | None] = {}
        sdxl = self._models.base_model == "sdxl"
        for (component, _, _, param), scale in zip(adaptation._entries(), scales):
            if component == "unet":
                name, rate = "unet", unet_lr if unet_lr is not None else default_lr
            else:
                index = 1 if component == "text_encoder_2" else 0
                name = f"textencoder{index + 1}" if sdxl else "textencoder"
                rate = _encoder_rate(text_encoder_lr, index)
                rate = rate if rate is not None else default_lr
            key = (name, float(scale))
            groups.setdefault(key, []).append(param)
            rates[key] = None if rate is None else rate * scale
        params, descriptions = [], []
        for key, members in sorted(groups.items(), key=lambda item: item[0][0] == "unet"):  # (kohya: encoders first)
            rate = rates[key]
            if rate is None or rate == 0:
                continue  # (kohya: "NO LR skipping!")
            params.append({"params": members, "lr": rate})
            descriptions.append(key[0] + (f" x{key[1]:g}" if key[1] != 1 else ""))
        return params, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def enable_gradient_checkpointing(self) -> None:
        """Nothing: the adapters run inside the models' own checkpointed blocks (kohya's: the same)."""

    def prepare_grad_etc(self, text_encoder: Any, unet: nn.Module) -> None:
        """The adapters trainable again after kohya froze its models (``requires_grad_(False)`` reaches them)."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: nn.Module) -> None:
        self.train()

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str
                                      ) -> tuple[int, float, float]:
        """kohya's ``--scale_weight_norms``: every adapter whose ‖ΔW‖ exceeds ``max_norm_value`` scaled onto it
        (:func:`sdadapt.training.max_norm.scale_weight_norms_`).

        Returns:
            ``(keys scaled, mean norm, max norm)`` after scaling, as kohya's.
        """
        del device
        from .training.max_norm import scale_weight_norms_

        stats = scale_weight_norms_(list(self.adapters.values()), float(max_norm_value))
        return (int(stats["keys_scaled"]), float(stats["average_key_norm"]), float(stats["max_key_norm"]))

    # ------------------------------------------------------------------ strength, saving, merging
    def set_multiplier(self, multiplier: float) -> None:
        """The adapters' strength (kohya sets 0 for its differential output preservation, then 1 again)."""
        self.multiplier = float(multiplier)
        if self.adaptation is not None:
            for handle in self.adaptation.handles.values():
                handle.set_scale(self.multiplier)

    def set_enabled(self, is_enabled: bool) -> None:
        for handle in self._handles().values():
            if is_enabled:
                handle.enable()
            else:
                handle.disable()

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None,
                     metadata: Mapping[str, str] | None) -> None:
        """Write the adapters as kohya does (``lora_unet_…`` keys, LyCORIS' for its families), atomically, with
        kohya's ``metadata`` over sdadapt's own and the ``sshs`` hashes of the file as written.

        Raises:
            InputError: a file name that does not end in ``.safetensors`` (kohya's ``--save_model_as ckpt`` / ``pt``
                would be a pickle: save as safetensors).
        """
        from .formats import save_lora
        from .formats.unet_keys import model_layers_per_block

        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise InputError(f"{path}: sdadapt writes safetensors only (a {path.suffix or 'suffix-less'} file would "
                             "be a pickle); use --save_model_as safetensors")
        states = {component: handle.state_dict() for component, handle in self._handles().items()}
        unet = self._models.unet if "unet" in states else None
        given = {str(k): None if v is None else str(v) for k, v in (metadata or {}).items()}
        if "ss_network_module" in given:  # kohya's trainer's metadata: its keys as it writes them (no ss_network_args
            given.setdefault("ss_network_args", None)  # without --network_args)
        save_lora(path, states, format="kohya", base_model=self._models.base_model, dtype=dtype, metadata=given,
                  layers_per_block=model_layers_per_block(unet))

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder: Any, unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Merge this network's file into the models' weights, ``W ← W + multiplier · ΔW`` (kohya's
        ``--base_weights``); ``weights_sd``, ``dtype`` and ``device`` are kohya's and unused (the file is read again,
        the weights keep their dtype and device).

        Raises:
            InputError: a network not made by :func:`create_network_from_weights`.
        """
        del weights_sd, dtype, device
        from .methods.base_weights import merge_base_weights

        if self.file is None:
            raise InputError("kohya network: merge_to needs a network made by create_network_from_weights(file)")
        merge_base_weights(_models(text_encoder, unet), [self.file], multipliers=[self.multiplier])


def _encoder_rate(rates: float | Sequence[float] | None, index: int) -> float | None:
    """Text encoder ``index``'s rate of kohya's ``text_encoder_lr`` (one number, or one per encoder: a missing
    second is the first's, as kohya's)."""
    if rates is None or isinstance(rates, (int, float)):
        return rates
    rates = list(rates)
    if not rates:
        return None
    return float(rates[index] if index < len(rates) else rates[0])
