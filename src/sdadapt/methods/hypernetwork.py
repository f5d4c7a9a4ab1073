"""Hypernetwork training (A1111 / NovelAI): small K/V MLPs on the attention context, base frozen.

The hypernetwork is injected with :func:`sdadapt.inject_hypernetwork` (forward pre-hooks on every
``to_k``/``to_v``; reversible; base keys unchanged) and saved with
:func:`sdadapt.save_hypernetwork` as the ``.pt`` dict A1111 writes (``.safetensors`` by suffix).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ..hypernetworks import (
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

    def __init__(self, system, *, config: HypernetworkConfig, widths: Iterable[int] | None = None,
                 name: str | None = None) -> None:
        unet: nn.Module = system.unet
        available = sorted(set(context_widths(unet).values()))
        chosen = list(widths) if widths is not None else available
        first = next(unet.parameters(), None)
        self.hypernetwork = Hypernetwork(chosen, config, name=name,
                                         device=first.device if first is not None else None)
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
        for field, value in a1111_training_fields(metadata).items():
            setattr(self.hypernetwork, field, value)
        if metadata:
            self.hypernetwork.optional_info = "; ".join(f"{k}: {v}" for k, v in metadata.items())
        return save_hypernetwork(path, self.hypernetwork)

    def remove(self) -> None:
        self.handle.remove()
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)


def prepare_hypernetwork(
    system,
    *,
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0),
    activation: str = "relu",
    layer_norm: bool = True,
    weight_init: str = "Normal",
    widths: Iterable[int] | None = None,
) -> HypernetworkAdaptation:
    """A1111's hypernetwork on every context width of the UNet (cross- and self-attention, as A1111's
    default module sizes 768/320/640/1280 do for SD1); ``widths`` picks some.

    Defaults: "1, 2, 1" with relu and LayerNorm (a common A1111 choice; on the toy model it kept
    prior accuracy where the plain "linear" default drifted — see docs/hypernetworks.md). A1111's
    LayerNorm gains start near 0, so the method's learning rate is high (3e-2 on the toy).
    """
    config = HypernetworkConfig(layer_structure=layer_structure, activation=activation, layer_norm=layer_norm,
                                weight_init=weight_init)
    return HypernetworkAdaptation(system, config=config, widths=widths)
