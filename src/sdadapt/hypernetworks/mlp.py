"""The A1111 / NovelAI hypernetwork: per context width, two MLPs (K and V) on the attention context.

Formula (A1111 ``HypernetworkModule.forward``; ``s`` is the strength, A1111's "multiplier")::

    context_k = context + mlp_k(context) · s        k = to_k(context_k)
    context_v = context + mlp_v(context) · s        v = to_v(context_v)

The query is untouched. ``context`` is the text states in cross-attention (``attn2``) and the
hidden states in self-attention (``attn1``): modules are looked up by the context's last
dimension, so in SD1 the 768 pair acts on every ``attn2`` and the 320/640/1280 pairs on the
``attn1`` layers of the blocks with those channel counts.

The MLP is A1111's ``nn.Sequential`` ``linear``: for each step ``i`` of the layer structure
``ls`` (e.g. ``(1, 2, 1)``) a ``Linear(int(dim·ls[i]) → int(dim·ls[i+1]))``, then the activation
(not after the last Linear unless ``activate_output``; never for ``"linear"``), then a
``LayerNorm`` if ``layer_norm`` (**also after the last Linear**), then ``Dropout(p)`` if the
dropout structure's entry ``i+1`` is above 0. Parameters therefore sit at Sequential indices
(``linear.0.weight``, ``linear.3.bias`` ...): :func:`mlp_layout` is that layout as data, and
:func:`hypernetwork_mlp` runs it over a ``{key: tensor}`` dict — the module
(:class:`HypernetworkMLP`) holds the parameters and calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "HypernetworkConfig",
    "MLPLayer",
    "dropout_structure_for",
    "mlp_layout",
    "hypernetwork_mlp",
    "hypernetwork_context",
    "init_hypernetwork_mlp_",
    "HypernetworkMLP",
    "Hypernetwork",
]

#: activation name (A1111's ``activation_func``) -> (function over tensors, the nn class A1111 puts
#: in the Sequential). A1111's own seven names ("swish" is ``Hardswish`` there, not SiLU) plus the
#: parameter-free ``torch.nn`` activations its lower-case class-name lookup also accepts.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], type[nn.Module]]] = {
    "linear": (lambda x: x, nn.Identity),
    "relu": (F.relu, nn.ReLU),
    "leakyrelu": (F.leaky_relu, nn.LeakyReLU),
    "elu": (F.elu, nn.ELU),
    "swish": (F.hardswish, nn.Hardswish),
    "tanh": (torch.tanh, nn.Tanh),
    "sigmoid": (torch.sigmoid, nn.Sigmoid),
    "hardswish": (F.hardswish, nn.Hardswish),
    "gelu": (F.gelu, nn.GELU),
    "silu": (F.silu, nn.SiLU),
    "mish": (F.mish, nn.Mish),
    "softplus": (F.softplus, nn.Softplus),
    "selu": (F.selu, nn.SELU),
    "celu": (F.celu, nn.CELU),
    "relu6": (F.relu6, nn.ReLU6),
    "hardtanh": (F.hardtanh, nn.Hardtanh),
    "hardsigmoid": (F.hardsigmoid, nn.Hardsigmoid),
    "logsigmoid": (F.logsigmoid, nn.LogSigmoid),
    "softsign": (F.softsign, nn.Softsign),
    "tanhshrink": (F.tanhshrink, nn.Tanhshrink),
    "hardshrink": (F.hardshrink, nn.Hardshrink),
    "softshrink": (F.softshrink, nn.Softshrink),
}

#: A1111's ``"prelu"``: ``nn.PReLU()`` in the Sequential, whose one learnt slope (``linear.<index>.weight``,
#: shape (1,), 0.25 at creation: A1111's initialisation leaves it alone) is in the file and trains
PRELU = "prelu"
#: the parameters each layer kind holds in the Sequential (the file's ``linear.<index>.<name>`` tensors)
_LAYER_PARAMETERS = {"linear": ("weight", "bias"), "layer_norm": ("weight", "bias"), PRELU: ("weight",)}

#: A1111's ``weight_initialization`` choices (used when a hypernetwork is created, not on load)
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def dropout_structure_for(layer_structure: Iterable[float], *, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """A1111's ``parse_dropout_structure``: the per-layer dropout probabilities of old settings.

    No dropout → all zeros; else ``[0] + [0.3]·(n-3) + [0.3 if last_layer_dropout else 0] + [0]``
    (``n = len(layer_structure)``; entry ``i+1`` is the dropout after Linear ``i``).
    """
    n = len(tuple(layer_structure))
    if not use_dropout:
        return (0.0,) * n
    return (0.0, *([0.3] * (n - 3)), 0.3 if last_layer_dropout else 0.0, 0.0)


@dataclass(frozen=True, kw_only=True)
class HypernetworkConfig:
    """How each MLP is built (A1111's creation settings; file keys in brackets).

    Args:
        layer_structure: width multipliers, first and last 1, e.g. ``(1, 2, 1)`` or
            ``(1, 1.5, 1.5, 1)`` [``layer_structure``].
        activation: a key of :data:`ACTIVATIONS`, or ``"prelu"`` (a learnt slope per PReLU)
            [``activation_func``; ``None`` in a file reads as ``"linear"``, which A1111 treats the same].
        layer_norm: a LayerNorm after every Linear, the last one included [``is_layer_norm``].
        dropout_structure: one probability in ``[0, 1)`` per entry of ``layer_structure``; entry
            ``i+1`` is the dropout after Linear ``i``. ``None``: no dropout (all zeros)
            [``dropout_structure``; ``use_dropout`` and ``last_layer_dropout`` derive from it, see
            :func:`dropout_structure_for` for A1111's preset].
        activate_output: also apply the activation after the last Linear [``activate_output``].
        weight_init: one of :data:`WEIGHT_INITS`, used when a hypernetwork is created; a loaded file
            keeps whatever it says [``weight_initialization``].

    Raises:
        ValueError: a structure A1111 would refuse (does not start/end with 1, a dropout
            probability outside ``[0, 1)``, lengths that differ) or an unknown activation.
    """

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] | None = field(default=None)
    activate_output: bool = False
    weight_init: str = "Normal"

    def __post_init__(self) -> None:
        structure = tuple(float(v) for v in self.layer_structure)
        if len(structure) < 2 or structure[0] != 1.0 or structure[-1] != 1.0:
            raise ValueError(
                f"layer_structure must start and end with 1 and have at least 2 entries (A1111's rule), "
                f"got {list(self.layer_structure)}; e.g. (1, 2, 1)"
            )
        if not all(math.isfinite(v) and v > 0 for v in structure):
            raise ValueError(f"layer_structure entries must be finite and > 0, got {list(self.layer_structure)}")
        object.__setattr__(self, "layer_structure", structure)
        dropout = (0.0,) * len(structure) if self.dropout_structure is None else tuple(float(p) for p in self.dropout_structure)
        if len(dropout) != len(structure):
            raise ValueError(
                f"dropout_structure needs one entry per layer_structure entry ({len(structure)}), got {list(dropout)}"
            )
        if not all(0.0 <= p < 1.0 for p in dropout):
            raise ValueError(f"dropout probabilities must be in [0, 1), got {list(dropout)}")
        object.__setattr__(self, "dropout_structure", dropout)
        if self.activation not in ACTIVATIONS and self.activation != PRELU:
            raise ValueError(
                f"unknown hypernetwork activation {self.activation!r}; choose one of {', '.join([*ACTIVATIONS, PRELU])}"
            )
        if not isinstance(self.weight_init, str) or not self.weight_init:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")

    @property
    def use_dropout(self) -> bool:
        """A1111's ``use_dropout``: any dropout at all."""
        return any(p > 0 for p in self.dropout_structure)  # type: ignore[union-attr]

    @property
    def last_layer_dropout(self) -> bool:
        """A1111's ``last_layer_dropout`` as its ``save`` writes it: ``dropout_structure[-2] != 0``."""
        return self.dropout_structure[-2] != 0  # type: ignore[index]


class MLPLayer(NamedTuple):
    """One entry of A1111's Sequential: ``kind`` is ``"linear"``, ``"activation"`` (parameter-free),
    ``"prelu"`` (one learnt slope), ``"layer_norm"`` or ``"dropout"``; ``width`` is the output width."""

    kind: str
    width: int
    width_in: int = 0
    activation: str = ""
    p: float = 0.0


def mlp_layout(dim: int, config: HypernetworkConfig) -> tuple[MLPLayer, ...]:
    """The Sequential A1111 builds for context width ``dim``, as data (index = Sequential index).

    Raises:
        ValueError: ``int(dim · multiplier)`` is 0 somewhere (the structure is too thin for ``dim``).
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"a hypernetwork width must be a positive int, got {dim!r}")
    ls, ds = config.layer_structure, config.dropout_structure
    n = len(ls)
    layers: list[MLPLayer] = []
    for i in range(n - 1):
        width_in, width = int(dim * ls[i]), int(dim * ls[i + 1])  # A1111's exact int(dim * mult)
        if width_in < 1 or width < 1:
            raise ValueError(f"layer_structure {list(ls)} gives a 0-wide layer for width {dim}")
        layers.append(MLPLayer("linear", width, width_in))
        if not (config.activation == "linear" or (i >= n - 2 and not config.activate_output)):
            layers.append(MLPLayer(PRELU, width) if config.activation == PRELU
                          else MLPLayer("activation", width, activation=config.activation))
        if config.layer_norm:
            layers.append(MLPLayer("layer_norm", width))
        if ds[i + 1] > 0:  # type: ignore[index]
            layers.append(MLPLayer("dropout", width, p=ds[i + 1]))  # type: ignore[index]
    return tuple(layers)


def hypernetwork_mlp(x: Tensor, params: Mapping[str, Tensor], layout: tuple[MLPLayer, ...], *, training: bool = False) -> Tensor:
    """The MLP alone: ``(..., D) -> (..., D)``.

    Args:
        x: ``(..., D)`` context (``D`` the width the layout was built for).
        params: ``{"linear.<index>.weight" / ".bias": tensor}`` — A1111's state-dict keys:
            Linear weights ``(out, in)`` and biases ``(out,)``, LayerNorm gains/biases ``(width,)``,
            a PReLU's slope ``(1,)`` (weight only).
        layout: from :func:`mlp_layout`.
        training: dropout active (as in ``nn.Dropout`` under ``.train()``).
    """
    for index, layer in enumerate(layout):
        if layer.kind == "linear":
            x = F.linear(x, params[f"linear.{index}.weight"], params[f"linear.{index}.bias"])  # (..., out)
        elif layer.kind == "activation":
            x = ACTIVATIONS[layer.activation][0](x)
        elif layer.kind == PRELU:
            x = F.prelu(x, params[f"linear.{index}.weight"])
        elif layer.kind == "layer_norm":
            x = F.layer_norm(x, (layer.width,), params[f"linear.{index}.weight"], params[f"linear.{index}.bias"])
        else:  # dropout
            x = F.dropout(x, layer.p, training=training)
    return x


def hypernetwork_context(
    context: Tensor, params: Mapping[str, Tensor], layout: tuple[MLPLayer, ...], *, strength: float | Tensor = 1.0,
    training: bool = False,
) -> Tensor:
    """``context + mlp(context) · strength``: ``(B, L, D) -> (B, L, D)`` (any leading dims).

    A number ``strength == 0`` returns ``context`` itself (exact identity, nothing computed); a
    0-dim tensor ``strength`` is only multiplied (never compared: no host sync, no graph break).
    """
    if not isinstance(strength, Tensor) and strength == 0:
        return context
    return context + hypernetwork_mlp(context, params, layout, training=training) * strength


@torch.no_grad()
def init_hypernetwork_mlp_(sequential: nn.Sequential, config: HypernetworkConfig) -> None:
    """A1111's initialisation, in place, from the global torch RNG.

    ``"Normal"`` — and every LayerNorm, whatever the choice — gets weights ~ N(0, 0.01) and zero
    biases (so a LayerNorm's gain starts near 0, as in A1111); Xavier*/Kaiming* initialise
    Linear weights and zero their biases (Kaiming with ``leaky_relu`` gain for ``"leakyrelu"``,
    else ``relu``). The zero biases of the first kind are drawn as A1111 draws them, ``N(0, 0)``,
    which advances the RNG: from one seed, every setting gives A1111's module bit for bit.

    Raises:
        ValueError: ``config.weight_init`` is not one of :data:`WEIGHT_INITS`.
    """
    if config.weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {config.weight_init!r}; choose one of {', '.join(WEIGHT_INITS)}")
    nonlinearity = "leaky_relu" if config.activation == "leakyrelu" else "relu"
    for layer in sequential:
        if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
            continue
        weight, bias = layer.weight, layer.bias
        if config.weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
            nn.init.normal_(weight, mean=0.0, std=0.01)
            nn.init.normal_(bias, mean=0.0, std=0.0)  # zeros, drawn (A1111 draws them)
            continue
        if config.weight_init == "XavierUniform":
            nn.init.xavier_uniform_(weight)
        elif config.weight_init == "XavierNormal":
            nn.init.xavier_normal_(weight)
        elif config.weight_init == "KaimingUniform":
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
        else:
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
        nn.init.zeros_(bias)


def _module_of(layer: MLPLayer, *, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
    if layer.kind == "linear":
        return nn.Linear(layer.width_in, layer.width, dtype=dtype, device=device)
    if layer.kind == "activation":
        return ACTIVATIONS[layer.activation][1]()
    if layer.kind == PRELU:
        return nn.PReLU(dtype=dtype, device=device)
    if layer.kind == "layer_norm":
        return nn.LayerNorm(layer.width, dtype=dtype, device=device)
    return nn.Dropout(p=layer.p)


class HypernetworkMLP(nn.Module):
    """One MLP (A1111's ``HypernetworkModule``): holds ``linear`` (the Sequential, so the state-dict
    keys are A1111's ``linear.<index>.*``) and calls :func:`hypernetwork_context`.

    ``forward(context (..., dim), *, strength=1.0) -> (..., dim)``; ``strength`` is a number or a
    0-dim tensor. Parameters start as A1111's initialisation (:func:`init_hypernetwork_mlp_`)
    unless ``init=False`` (then they are PyTorch's defaults, to be overwritten by a loaded state).
    """

    def __init__(self, dim: int, config: HypernetworkConfig, *, init: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.layout = mlp_layout(dim, config)
        self.linear = nn.Sequential(*(_module_of(layer, dtype=dtype, device=device) for layer in self.layout))
        # (key, Sequential child name, parameter name) for params(): read live on every call, without
        # named_parameters()' module walk (a hypernetwork fit calls it once per hooked layer and step)
        self._param_slots = tuple((f"linear.{index}.{name}", str(index), name) for index, layer in enumerate(self.layout)
                                  for name in _LAYER_PARAMETERS.get(layer.kind, ()))
        if init:
            init_hypernetwork_mlp_(self.linear, config)

    def params(self) -> dict[str, Tensor]:
        """``{"linear.<index>.weight": parameter, ...}`` (live parameters, for the functional path)."""
        modules = self.linear._modules
        return {key: modules[child]._parameters[name] for key, child, name in self._param_slots}

    def forward(self, context: Tensor, *, strength: float | Tensor = 1.0) -> Tensor:
        return hypernetwork_context(context, self.params(), self.layout, strength=strength, training=self.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Hypernetwork(nn.Module):
    """A hypernetwork file's content: a (K, V) :class:`HypernetworkMLP` pair per context width.

    Args:
        widths: the context widths to create pairs for (A1111's "modules" sizes; SD1: 768 for
            cross-attention, 320/640/1280 for self-attention; SD2: 1024 instead of 768).
        config: how each MLP is built (:class:`HypernetworkConfig`).
        name, step, sd_checkpoint, sd_checkpoint_name, optional_info: the file's descriptive
            fields (A1111 keys of the same names), carried through load/save unchanged.
        init: A1111's weight initialisation (``False`` when a state will be loaded into it).

    ``layers["768"]`` is an ``nn.ModuleList`` ``[k_mlp, v_mlp]``, so ``state_dict()`` keys are
    ``layers.768.0.linear.0.weight`` — the file key ``768.0.linear.0.weight`` under ``layers.``.

    Raises:
        ValueError: no widths, a width that is not a positive int, or a structure too thin for one.
    """

    def __init__(self, widths: Iterable[int], config: HypernetworkConfig = HypernetworkConfig(), *,
                 name: str | None = "hypernetwork", step: int = 0, sd_checkpoint: str | None = None,
                 sd_checkpoint_name: str | None = None, optional_info: str | None = None, init: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(config, HypernetworkConfig):
            raise TypeError(f"config must be a HypernetworkConfig, got {type(config).__name__}")
        width_list = list(widths)
        if not width_list:
            raise ValueError("a hypernetwork needs at least one context width, e.g. widths=[768, 320, 640, 1280]")
        bad = [w for w in width_list if isinstance(w, bool) or not isinstance(w, int) or w < 1]
        if bad or len(set(width_list)) != len(width_list):
            raise ValueError(f"widths must be distinct positive ints, got {width_list}")
        self.config = config
        self.name = name
        self.step = int(step)
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.layers = nn.ModuleDict({
            str(w): nn.ModuleList([HypernetworkMLP(w, config, init=init, dtype=dtype, device=device) for _ in range(2)])
            for w in width_list
        })

    @property
    def widths(self) -> tuple[int, ...]:
        """The context widths with a (K, V) pair, in file order."""
        return tuple(int(w) for w in self.layers)

    def pair(self, width: int) -> tuple[HypernetworkMLP, HypernetworkMLP] | None:
        """``(k_mlp, v_mlp)`` for ``width``, or ``None``."""
        mlps = self.layers[str(width)] if str(width) in self.layers else None  # (ModuleDict has no .get)
        return None if mlps is None else (mlps[0], mlps[1])  # type: ignore[index]

    def forward(self, context: Tensor, *, strength: float = 1.0) -> tuple[Tensor, Tensor]:
        """``(context_k, context_v)`` for a context ``(B, L, D)``, looked up by ``D`` (A1111's
        ``apply_single_hypernetwork``); a width without a pair returns ``(context, context)``."""
        pair = self.pair(context.shape[-1])
        if pair is None:
            return context, context
        return pair[0](context, strength=strength), pair[1](context, strength=strength)

    def file_tensors(self) -> dict[str, Tensor]:
        """``{"<width>.<0 = K | 1 = V>.linear.<index>.<weight|bias>": tensor}`` (detached)."""
        return {f"{w}.{key}": value.detach() for w, mlps in self.layers.items() for key, value in mlps.state_dict().items()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, widths={list(self.widths)}, step={self.step}"
