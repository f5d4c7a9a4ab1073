"""A1111 / NovelAI hypernetworks: per context width, two small MLPs (K and V) on the attention context.

``context_k = context + mlp_k(context) · strength`` before ``to_k`` (``mlp_v`` before ``to_v``), in
every attention layer whose context width has a pair — cross-attention (text states) and
self-attention (hidden states) alike, as A1111 applies them. See ``docs/hypernetworks.md``.

* :mod:`.mlp` — the settings (:class:`HypernetworkConfig`), A1111's layer layout as data, the MLP
  as a pure function over tensors, and the thin modules (:class:`HypernetworkMLP`, :class:`Hypernetwork`);
* :mod:`.inject` — :func:`inject_hypernetwork` on any UNet (forward pre-hooks on ``to_k``/``to_v``);
* :mod:`.files` — :func:`load_hypernetwork` / :func:`save_hypernetwork` (A1111 ``.pt``, ``.safetensors``;
  the key translation itself is :mod:`sdadapt.formats.hypernetworks`).
"""

from .files import (
    hypernetwork_from_state,
    hypernetwork_settings,
    load_hypernetwork,
    save_hypernetwork,
)
from .inject import (
    HypernetworkHandle,
    HypernetworkSlot,
    context_widths,
    inject_hypernetwork,
)
from .mlp import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkMLP,
    MLPLayer,
    dropout_structure_for,
    hypernetwork_context,
    hypernetwork_mlp,
    init_hypernetwork_mlp_,
    mlp_layout,
)

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkConfig",
    "HypernetworkMLP",
    "MLPLayer",
    "dropout_structure_for",
    "mlp_layout",
    "hypernetwork_mlp",
    "hypernetwork_context",
    "init_hypernetwork_mlp_",
    "inject_hypernetwork",
    "HypernetworkHandle",
    "HypernetworkSlot",
    "context_widths",
    "load_hypernetwork",
    "save_hypernetwork",
    "hypernetwork_settings",
    "hypernetwork_from_state",
]
