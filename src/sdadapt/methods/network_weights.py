"""Start a LoRA-family run from an adapter file (kohya's ``--network_weights`` / ``--dim_from_weights``).

kohya's ``train_network.py`` builds the network from the options and then loads the file into it
(``network.load_weights``: ``load_state_dict(strict=False)``, missing and unexpected modules only
logged; a shape that does not fit is an error). With ``--dim_from_weights`` it builds the network
from the file instead (``create_network_from_weights``: the file's modules with the file's ranks
and alphas).

Here the same, with the checks kohya leaves out:

* :func:`read_network_weights` reads any LoRA file sdadapt reads (kohya LoRA/LoCon, LyCORIS
  LoHa/LoKr/full/DoRA, diffusers/peft) and refuses a file made for another base model (its
  ``ss_base_model_version`` / ``modelspec.architecture``, or a component the model lacks: an
  SDXL file's second text encoder on SD1).
* :func:`load_network_weights` copies the file into adapters injected from the options. A module
  of another family, rank or alpha than the options give is an error naming the module, the
  file's value and the option (kohya loads the file's ``alpha`` without rescaling — its own FIXME —
  so its ΔW silently differs; here the adapter's ΔW equals the file's, bit for bit in float32).
  File modules the run does not target and targeted modules the file lacks are counted in the
  report (kohya: logged); the latter train from their initialisation.
* :func:`adapters_from_weights` injects exactly the file's modules, family, ranks and alphas
  (``--dim-from-weights``).

A layer of the file that names no layer of the model, or whose shapes do not fit it, is an error
(the file is for another model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.registry import algorithm_of_keys, file_rank, weight_shape_of_file_tensors
from ..errors import InputError
from ..formats.files import WeightFileError
from ..formats.layers import LayerNotFoundError, group_by_layer, resolve_layers
from ..inject import AdapterHandle, load_adapter
from .system import TEXT_ENCODERS

__all__ = ["NetworkWeights", "NetworkWeightsReport", "read_network_weights", "load_network_weights",
           "adapters_from_weights"]

#: relative tolerance of an alpha comparison (half-precision files store alpha in fp16)
_ALPHA_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NetworkWeights:
    """An adapter file read for a run.

    Attributes:
        path: the file.
        components: ``{component: {"<layer path>.<file key>": tensor}}`` (canonical paths;
            ``unet``, ``text_encoder``, ``text_encoder_2``).
        metadata: the file's metadata.
    """

    path: Path
    components: dict[str, dict[str, Tensor]]
    metadata: dict[str, str]


@dataclass
class NetworkWeightsReport:
    """What loading a file into a run did.

    Attributes:
        path: the file.
        loaded: modules whose weights came from the file.
        missing: ``component/layer`` targeted by the run but not in the file (trained from their initialisation).
        unused: ``component/layer`` in the file but not targeted by the run (left out).
    """

    path: Path
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The run report's lines."""
        lines = [f"--network-weights {self.path}: {self.loaded} module(s) start from the file's weights"]
        if self.missing:
            lines.append(f"--network-weights: {len(self.missing)} targeted module(s) are not in the file and train from "
                         f"their initialisation (e.g. {', '.join(self.missing[:3])})")
        if self.unused:
            lines.append(f"--network-weights: {len(self.unused)} module(s) of the file are not targeted by this run and "
                         f"are left out (e.g. {', '.join(self.unused[:3])})")
        return lines


def _base_model_of(metadata: Mapping[str, str]) -> str | None:
    """``sd1``, ``sd2`` or ``sdxl`` from kohya's / modelspec metadata, or ``None`` when it does not say."""
    version = str(metadata.get("ss_base_model_version", "")).lower()
    architecture = str(metadata.get("modelspec.architecture", "")).lower()
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def read_network_weights(path: str | os.PathLike, *, system, flag: str = "--network-weights") -> NetworkWeights:
    """Read the adapter file ``path`` for a run on ``system`` (any format :func:`sdadapt.load_lora` reads).

    A peft adapter (one component) is taken as the UNet's. ``flag`` names the option in errors
    (``--base-weights`` reads its files here too).

    Raises:
        FileNotFoundError: no such file.
        WeightFileError: not a LoRA file, or a file for another base model than ``system.base_model``
            (its metadata says so, or it holds a text encoder the model lacks).
    """
    from ..formats import load_lora

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{flag} {file}: no such file (give the LoRA/LyCORIS file)")
    from ..formats.unet_keys import model_layers_per_block

    # LDM-named UNet layers (SDXL kohya files) map with the model's own UNet layout
    components, metadata = load_lora(file, layers_per_block=model_layers_per_block(getattr(system, "unet", None)))
    if "model" in components:  # a peft adapter: the UNet's
        components = {"unet": components.pop("model"), **components}
    mine = "sd2" if system.base_model.startswith("sd2") else system.base_model
    theirs = _base_model_of(metadata)
    if theirs is not None and theirs != mine:
        raise WeightFileError(f"{flag} {file}: made for {theirs.upper()} (its metadata says "
                              f"{metadata.get('ss_base_model_version') or metadata.get('modelspec.architecture')}), "
                              f"but the model is {mine.upper()}; use a file trained on this base model")
    lacking = sorted(c for c in components if not isinstance(getattr(system, c, None), nn.Module))
    if lacking:
        raise WeightFileError(f"{flag} {file}: holds {', '.join(lacking)} modules the model has no place for "
                              f"(an SDXL file on an SD1/SD2 model?); use a file trained on this base model")
    return NetworkWeights(file, {c: dict(s) for c, s in components.items()}, dict(metadata))


def _resolve(model: nn.Module, component: str, layers: list[str], file: Path) -> dict[str, str]:
    try:
        return resolve_layers(model, layers)
    except LayerNotFoundError as exc:
        raise WeightFileError(f"--network-weights {file}: {component}: {exc}; the file was made for another model "
                              "(another base model or architecture)") from None


def _check_fits(layer: str, component: str, tensors: Mapping[str, Tensor], weight_shape: tuple[int, ...], file: Path) -> None:
    """The file's layer fits the model's layer of ``weight_shape`` (else: another base model)."""
    implied = weight_shape_of_file_tensors(tensors, name=layer)
    if implied is not None and _squeezed(implied) != _squeezed(weight_shape):
        raise WeightFileError(f"--network-weights {file}: {component} module {layer} is for a layer of shape "
                              f"{tuple(implied)}, the model's is {tuple(weight_shape)}; the file was made for another "
                              "base model")


def _squeezed(shape) -> tuple[int, ...]:
    """``(out, in, 1, 1)`` -> ``(out, in)``: a 1x1 convolution and a Linear layer take the same factors."""
    shape = tuple(int(n) for n in shape)
    return shape[:2] if shape[2:] == (1, 1) else shape


def _with_alpha(tensors: Mapping[str, Tensor], own: Mapping[str, Tensor], layer: str) -> dict[str, Tensor]:
    """A layer's file tensors with ``alpha = rank`` added when the file has none (kohya: "old LoRA without alpha")."""
    out = dict(tensors)
    if "alpha" in own and "alpha" not in out:
        rank, _ = file_rank({k: tuple(v.shape) for k, v in out.items()}, name=layer)
        if rank is not None:
            out["alpha"] = torch.tensor(float(rank))
    return out


def _with_kernel_axes(tensors: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A 1x1 convolution's tensors stored as a Linear layer's (``(b, d)`` for the adapter's ``(b, d, 1, 1)``: kohya's
    own LoKr, sd-scripts ``networks/lokr.py``, treats 1x1 convolutions as Linear layers) viewed with the kernel axes."""
    def fitted(key: str, value: Tensor) -> Tensor:
        mine = own.get(key)
        if mine is None or mine.ndim != 4 or tuple(mine.shape[2:]) != (1, 1) or tuple(value.shape) != tuple(mine.shape[:2]):
            return value
        return value.reshape(mine.shape)

    return {key: fitted(key, value) for key, value in tensors.items()}


def _compare(layer: str, component: str, adapter, tensors: Mapping[str, Tensor], own: Mapping[str, Tensor], file: Path) -> None:
    """The file's layer has the adapter's family, rank and alpha (else an error naming both)."""
    where = f"--network-weights {file}: {component} module {layer}"
    theirs, mine = algorithm_of_keys(tensors), algorithm_of_keys(own)
    if set(tensors) != set(own):
        raise InputError(f"{where} is {theirs}, the run trains {mine} (tensors {sorted(tensors)} vs {sorted(own)}); "
                         f"train the file's family, or pass --dim-from-weights to take family and ranks from the file")
    if "on_input" in own and bool(tensors["on_input"]) != bool(own["on_input"]):  # (IA)³: the axis the vector scales
        def axis(flag: Tensor) -> str:
            return "inputs" if bool(flag) else "outputs"

        raise InputError(f"{where} scales the layer's {axis(tensors['on_input'])}, the run's adapter its "
                         f"{axis(own['on_input'])}; pass --train-on-input or --no-train-on-input "
                         "(network_args train_on_input=true|false) as the file was trained")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if any(shapes[k] != tuple(own[k].shape) for k in own):
        rank, kxk = file_rank(shapes, name=layer)
        option = "--conv-dim" if kxk else "--network-dim"
        if rank is not None and rank != adapter.rank and getattr(adapter, "family", None) == "dylora":
            raise InputError(f"{where} has rank {rank}, {option} gives rank {adapter.rank}; pass --network-dim {rank} "
                             "(DyLoRA has no --dim-from-weights: one rank for every module, as kohya's networks.dylora)")
        if rank is not None and rank != adapter.rank:
            raise InputError(f"{where} has rank {rank}, {option} gives rank {adapter.rank}; pass {option} {rank} "
                             f"or --dim-from-weights (with {'conv_block_dims' if kxk else 'block_dims'} in --network-args: "
                             "give this module's block that rank there)")
        detail = ", ".join(f"{k} {shapes[k]} vs {tuple(own[k].shape)}" for k in own if shapes[k] != tuple(own[k].shape))
        if "on_input" in own:  # (IA)³: one scale per channel, no rank to choose
            raise InputError(f"{where}: the file's (IA)³ vector does not fit the layer ({detail}); the file was made "
                             "for another base model")
        raise InputError(f"{where}: the file's tensors do not fit the run's adapter ({detail}); pass --dim-from-weights "
                         "to build the adapters from the file")
    if "alpha" in own:
        file_alpha, own_alpha = float(tensors["alpha"]), float(own["alpha"])
        if abs(file_alpha - own_alpha) > _ALPHA_TOLERANCE * max(abs(file_alpha), abs(own_alpha), 1e-12):
            _, kxk = file_rank(shapes, name=layer)
            option = "--conv-alpha" if kxk else "--network-alpha"
            raise InputError(f"{where} has alpha {file_alpha:g}, {option} gives {own_alpha:g}; pass {option} "
                             f"{file_alpha:g} or --dim-from-weights (the scale alpha/rank must be the file's for its "
                             "weights to mean what they meant; with "
                             f"{'conv_block_alphas' if kxk else 'block_alphas'} in --network-args: give this module's "
                             "block that alpha there)")


def _refuse_stored_rotations(weights: NetworkWeights) -> None:
    """A run cannot start from LyCORIS' old ``oft_diag`` (:mod:`sdadapt.adapters.oft`: the rotation itself, not
    the ``oft_blocks`` generator a diag-oft run trains; trained as it is, R would leave the orthogonal group and
    ``--scale-weight-norms`` would shrink R towards 0 instead of the rotation towards I).

    Raises:
        WeightFileError: the file holds ``oft_diag`` tensors (naming one and what to do instead).
    """
    old = [f"{component}/{key}" for component, state in weights.components.items() for key in state
           if key.endswith(".oft_diag")]
    if old:
        raise WeightFileError(
            f"--network-weights {weights.path}: {len(old)} layer(s) hold LyCORIS' old Diag-OFT 'oft_diag' (e.g. "
            f"{old[0]}): the rotation itself, from LyCORIS builds of Nov 2023 - Feb 2024, not the 'oft_blocks' a "
            "diag-oft run trains (no exact oft_blocks exists for it), so no run can continue it. Merge it into the "
            "model instead (--base-weights FILE, or merge-lora) and train a new adapter on top, or leave "
            "--network-weights out")


def load_network_weights(handles: Mapping[str, AdapterHandle], weights: NetworkWeights, *, system) -> NetworkWeightsReport:
    """Copy ``weights`` into the injected adapters ``handles`` (``{component: handle}``) of ``system``.

    Every targeted module in the file gets the file's tensors (cast to the adapter's dtype), so its
    ΔW is the file's; the rest train from their initialisation.

    Raises:
        InputError: a module of another family, rank or alpha than the adapter (names the module,
            the file's value and the option).
        WeightFileError: a file layer that names no layer of ``system`` or does not fit it; LyCORIS' old
            ``oft_diag`` rotations (no generator to train).
    """
    _refuse_stored_rotations(weights)
    report = NetworkWeightsReport(weights.path)
    loads: list[tuple[object, dict[str, Tensor], dict[str, Tensor]]] = []
    for component, state in weights.components.items():
        model = getattr(system, component)
        groups = group_by_layer(state)
        resolved = _resolve(model, component, list(groups), weights.path)
        handle = handles.get(component)
        targeted = handle.modules if handle is not None else {}
        live_layers = dict(model.named_modules())
        placed = set(resolved.values())
        for layer, live in resolved.items():
            adapter = targeted.get(live)
            if adapter is None:
                base = live_layers[live]
                if isinstance(base, (nn.Linear, nn.Conv2d)):
                    _check_fits(layer, component, groups[layer], tuple(base.weight.shape), weights.path)
                report.unused.append(f"{component}/{layer}")
                continue
            _check_fits(layer, component, groups[layer], adapter.geometry.weight_shape, weights.path)
            own = adapter.file_tensors()
            tensors = _with_kernel_axes(_with_alpha(groups[layer], own, layer), own)
            _compare(layer, component, adapter, tensors, own, weights.path)
            loads.append((adapter, own, tensors))
        report.missing += [f"{component}/{live}" for live in targeted if live not in placed]
    for component, handle in handles.items():
        if component not in weights.components:
            report.missing += [f"{component}/{live}" for live in handle.modules]
    with torch.no_grad():  # only once every module is checked: a refused file leaves the adapters as they were
        for adapter, _, tensors in loads:
            adapter.load_file_tensors(tensors)  # (DyLoRA's rows, a PiSSA LoRA's trained half; else a copy)
            adapter.refresh_scale()  # type: ignore[attr-defined]
    report.loaded = len(loads)
    return report


def adapters_from_weights(system, weights: NetworkWeights, *, text_encoder: bool = True, name: str = "default"
                          ) -> tuple[dict[str, AdapterHandle], NetworkWeightsReport]:
    """Inject the file's own modules (family, ranks, alphas from its tensors) into ``system``:
    kohya's ``--dim_from_weights``. ``text_encoder=False`` leaves the file's text-encoder modules out.

    Returns:
        ``({component: handle}, report)``; the adapters are float32 and trainable.

    Raises:
        WeightFileError: a file layer that names no layer of ``system`` or does not fit it; LyCORIS' old
            ``oft_diag`` rotations (no generator to train).
    """
    _refuse_stored_rotations(weights)
    report = NetworkWeightsReport(weights.path)
    handles: dict[str, AdapterHandle] = {}
    try:
        for component, state in weights.components.items():
            if component in TEXT_ENCODERS and not text_encoder:
                report.unused += [f"{component}/{layer}" for layer in group_by_layer(state)]
                continue
            model = getattr(system, component)
            groups = group_by_layer(state)
            resolved = _resolve(model, component, list(groups), weights.path)
            live_layers = dict(model.named_modules())
            for layer, live in resolved.items():
                base = live_layers[live]
                if isinstance(base, (nn.Linear, nn.Conv2d)):
                    _check_fits(layer, component, groups[layer], tuple(base.weight.shape), weights.path)
            try:
                handles[component] = load_adapter(model, state, name=name)
            except (KeyError, ValueError) as exc:
                raise WeightFileError(f"--network-weights {weights.path}: {component}: {exc}") from None
            report.loaded += len(handles[component])
    except BaseException:
        for handle in handles.values():
            handle.remove()
        raise
    if "unet" not in handles:
        for handle in handles.values():
            handle.remove()
        raise WeightFileError(f"--network-weights {weights.path}: no UNet modules to train (the file holds "
                              f"{', '.join(weights.components) or 'nothing'}); --dim-from-weights takes the modules from the file")
    return handles, report
