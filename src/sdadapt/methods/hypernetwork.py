"""Hypernetwork training (A1111 / NovelAI): small K/V MLPs on the attention context, base frozen.

The hypernetwork is injected with :func:`sdadapt.inject_hypernetwork` (forward pre-hooks on every
``to_k``/``to_v``; reversible; base keys unchanged) and saved with
:func:`sdadapt.save_hypernetwork` as the ``.pt`` dict A1111 writes (``.safetensors`` by suffix).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from ..hypernetworks import (
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkConfig,
    context_widths,
    inject_hypernetwork,
    save_hypernetwork,
)

__all__ = ["HypernetworkAdaptation", "prepare_hypernetwork"]


class HypernetworkAdaptation:
    """A fresh :class:`~sdadapt.hypernetworks.Hypernetwork` injected into ``system.unet``.

    ``params`` are the hypernetwork's; the UNet's own parameters are frozen while it trains and
    their ``requires_grad`` flags come back on :meth:`remove`.
    """

    def __init__(self, system, *, config: HypernetworkConfig | None = None, widths: Iterable[int] | None = None,
                 name: str | None = None, hypernetwork: Hypernetwork | None = None) -> None:
        unet: nn.Module = system.unet
        available = sorted(set(context_widths(unet).values()))
        first = next(unet.parameters(), None)
        device = first.device if first is not None else None
        if hypernetwork is not None:  # (a file's, trained on from its step: A1111's "continue training")
            if not set(hypernetwork.widths) & set(available):
                raise ValueError(f"the hypernetwork has modules for context widths {sorted(hypernetwork.widths)}, and "
                                 f"this model's attention contexts are {available}: it was made for another model")
            self.hypernetwork = hypernetwork.to(device).train()
        else:
            chosen = list(widths) if widths is not None else available
            self.hypernetwork = Hypernetwork(chosen, config or HypernetworkConfig(), name=name, device=device)
        self._start_step = int(getattr(self.hypernetwork, "step", 0) or 0) if hypernetwork is not None else 0
        self._name_from_file = name is None
        self._requires_grad = [(p, p.requires_grad) for p in unet.parameters()]
        self.handle = inject_hypernetwork(unet, self.hypernetwork)
        for param, _ in self._requires_grad:
            param.requires_grad_(False)
        self.params: list[nn.Parameter] = list(self.hypernetwork.parameters())

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the A1111 file (``.pt``; ``.safetensors`` by suffix). ``metadata`` goes into A1111's
        ``optional_info`` text (shown by A1111 when it loads the file), and a training run's ``ss_steps`` /
        base-model hash and name become A1111's ``step`` / ``sd_checkpoint`` / ``sd_checkpoint_name``
        (:func:`~sdadapt.formats.a1111_fields.a1111_training_fields`); the name is the file stem unless one was given."""
        from ..formats.a1111_fields import a1111_training_fields

        if self._name_from_file:
            self.hypernetwork.name = Path(path).stem
        for field, value in a1111_training_fields(metadata).items():  # (a continued file: its step counted on)
            setattr(self.hypernetwork, field, self._start_step + value if field == "step" else value)
        if metadata:
            self.hypernetwork.optional_info = "; ".join(f"{k}: {v}" for k, v in metadata.items())
        return save_hypernetwork(path, self.hypernetwork)

    def remove(self) -> None:
        self.handle.remove()
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)


def _numbers(value: str | Sequence[float], *, option: str) -> tuple[float, ...]:
    """``"1, 2, 1"`` (A1111's text field) or a sequence -> floats."""
    if isinstance(value, str):
        try:
            return tuple(float(part) for part in value.replace(" ", "").split(",") if part)
        except ValueError:
            raise ValueError(f"{option} must be comma-separated numbers such as '1, 2, 1', got {value!r}") from None
    return tuple(float(v) for v in value)


def prepare_hypernetwork(
    system,
    *,
    layer_structure: str | Sequence[float] | None = None,
    activation: str | None = None,
    layer_norm: bool | None = None,
    weight_init: str | None = None,
    dropout_structure: str | Sequence[float] | None = None,
    activate_output: bool | None = None,
    widths: Iterable[int] | None = None,
    hypernetwork_file: str | os.PathLike | None = None,
) -> HypernetworkAdaptation:
    """A1111's hypernetwork on every context width of the UNet (cross- and self-attention, as A1111's
    default module sizes 768/320/640/1280 do for SD1); ``widths`` picks some.

    The settings are A1111's "Create hypernetwork" fields (:class:`~sdadapt.hypernetworks.HypernetworkConfig`):
    ``layer_structure`` and ``dropout_structure`` as numbers or A1111's text (``"1, 2, 1"``). Defaults: "1, 2, 1"
    with relu and LayerNorm, Normal init, no dropout, no output activation (a common A1111 choice; on the toy model it
    kept prior accuracy where the plain "linear" default drifted — see docs/hypernetworks.md). A1111's LayerNorm gains
    start near 0, so the method's learning rate is high (3e-2 on the toy).

    ``hypernetwork_file``: continue training an A1111 file (its settings, weights and widths; the ``step`` it
    saves counts on from the file's, as A1111's "continue training" does); the settings are then the file's.

    Raises:
        ValueError: a setting A1111 refuses (names it), a setting given with ``hypernetwork_file``, or a file whose
            widths the model has none of.
    """
    given = {name: value for name, value in (
        ("layer_structure", layer_structure), ("activation", activation), ("layer_norm", layer_norm),
        ("weight_init", weight_init), ("dropout_structure", dropout_structure), ("activate_output", activate_output),
        ("widths", widths)) if value is not None}
    if hypernetwork_file is not None:
        if given:
            raise ValueError(f"hypernetwork_file {hypernetwork_file}: its settings are the file's; leave out "
                             f"{', '.join(sorted(given))}")
        from ..hypernetworks import load_hypernetwork

        return HypernetworkAdaptation(system, hypernetwork=load_hypernetwork(hypernetwork_file))
    structure = _numbers(layer_structure, option="layer_structure") if layer_structure is not None else (1.0, 2.0, 1.0)
    dropout = None if dropout_structure is None else _numbers(dropout_structure, option="dropout_structure")
    if dropout is not None and dropout and (dropout[0] != 0 or dropout[-1] != 0):  # (A1111's HypernetworkModule assert)
        raise ValueError(f"dropout_structure must start and end with 0 (A1111's rule), got {list(dropout)}; e.g. 0, 0.3, 0")
    if weight_init is not None and weight_init not in WEIGHT_INITS:  # (A1111's create raises KeyError for another)
        raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")
    config = HypernetworkConfig(
        layer_structure=structure, activation="relu" if activation is None else activation,
        layer_norm=True if layer_norm is None else layer_norm,
        weight_init="Normal" if weight_init is None else weight_init,
        dropout_structure=dropout,
        activate_output=bool(activate_output))
    return HypernetworkAdaptation(system, config=config, widths=widths)
