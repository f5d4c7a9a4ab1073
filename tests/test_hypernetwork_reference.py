"""Hypernetworks line by line against a transcription of AUTOMATIC1111's code.

Reference: AUTOMATIC1111/stable-diffusion-webui@3157fe28c3d3b075dec53d6c9830bbafd79cec1b,
``modules/hypernetworks/hypernetwork.py`` (line numbers below are of that file):
``HypernetworkModule.__init__`` (l.39-100: the Sequential, l.80-99: the initialisation),
``forward`` (l.118-119: ``x + linear(x) * (multiplier if not training else 1)``),
``parse_dropout_structure`` (l.130-142), ``Hypernetwork.save`` (l.214-233) and ``Hypernetwork.load``
(l.251-262: the settings and their load defaults). Everything runs on tiny widths in float64 (a few CPU seconds in all).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn.init import kaiming_normal_, kaiming_uniform_, normal_, xavier_normal_, xavier_uniform_, zeros_

from sdadapt.formats.hypernetworks import a1111_to_canonical, parse_dropout_structure
from sdadapt.hypernetworks import (
    ACTIVATIONS,
    WEIGHT_INITS,
    HypernetworkConfig,
    HypernetworkMLP,
    dropout_structure_for,
    hypernetwork_from_state,
    hypernetwork_settings,
)

# ------------------------------------------------------------------ the transcription (test-only)
# HypernetworkModule.activation_dict (l.28-37): seven names, then every torch.nn.modules.activation
# class by its lower-case name ("swish" has no class of that name, so it stays Hardswish)
ACTIVATION_DICT = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
                   "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
ACTIVATION_DICT.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
                        if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"})


class RefModule(nn.Module):
    """A1111's ``HypernetworkModule`` (l.39-100, 118-119), the device move left out."""

    def __init__(self, dim, state_dict=None, layer_structure=None, activation_func=None, weight_init="Normal",
                 add_layer_norm=False, activate_output=False, dropout_structure=None):
        super().__init__()
        self.multiplier = 1.0
        linears = []
        for i in range(len(layer_structure) - 1):
            linears.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if activation_func == "linear" or activation_func is None or (i >= len(layer_structure) - 2 and not activate_output):
                pass
            elif activation_func in ACTIVATION_DICT:
                linears.append(ACTIVATION_DICT[activation_func]())
            else:
                raise RuntimeError(f"hypernetwork uses an unsupported activation function: {activation_func}")
            if add_layer_norm:
                linears.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                assert 0 < dropout_structure[i + 1] < 1
                linears.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*linears)
        if state_dict is not None:
            self.load_state_dict(state_dict)
        else:
            for layer in self.linear:
                if type(layer) == nn.Linear or type(layer) == nn.LayerNorm:  # noqa: E721 (as A1111 writes it)
                    w, b = layer.weight.data, layer.bias.data
                    if weight_init == "Normal" or type(layer) == nn.LayerNorm:  # noqa: E721
                        normal_(w, mean=0.0, std=0.01)
                        normal_(b, mean=0.0, std=0)
                    elif weight_init == "XavierUniform":
                        xavier_uniform_(w)
                        zeros_(b)
                    elif weight_init == "XavierNormal":
                        xavier_normal_(w)
                        zeros_(b)
                    elif weight_init == "KaimingUniform":
                        kaiming_uniform_(w, nonlinearity="leaky_relu" if "leakyrelu" == activation_func else "relu")
                        zeros_(b)
                    elif weight_init == "KaimingNormal":
                        kaiming_normal_(w, nonlinearity="leaky_relu" if "leakyrelu" == activation_func else "relu")
                        zeros_(b)
                    else:
                        raise KeyError(f"Key {weight_init} is not defined as initialization!")

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def ref_parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """l.130-142."""
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    if not use_dropout:
        return [0] * len(layer_structure)
    dropout_values = [0]
    dropout_values.extend([0.3] * (len(layer_structure) - 3))
    dropout_values.append(0.3 if last_layer_dropout else 0)
    dropout_values.append(0)
    return dropout_values


def ref_load_settings(state_dict):
    """``Hypernetwork.load``'s settings (l.251-262), in HypernetworkModule's argument order."""
    layer_structure = state_dict.get("layer_structure", [1, 2, 1])
    activation_func = state_dict.get("activation_func", None)
    weight_init = state_dict.get("weight_initialization", "Normal")
    add_layer_norm = state_dict.get("is_layer_norm", False)
    dropout_structure = state_dict.get("dropout_structure", None)
    use_dropout = True if dropout_structure is not None and any(dropout_structure) else state_dict.get("use_dropout", False)
    activate_output = state_dict.get("activate_output", True)
    last_layer_dropout = state_dict.get("last_layer_dropout", False)
    if dropout_structure is None:
        dropout_structure = ref_parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    return layer_structure, activation_func, weight_init, add_layer_norm, activate_output, dropout_structure


def _ref_for(config: HypernetworkConfig, dim: int, state_dict=None) -> RefModule:
    """A1111's module for ``config``: initialised as A1111 does, or (float64) holding ``state_dict``."""
    module = RefModule(dim, None, list(config.layer_structure), config.activation, config.weight_init,
                       config.layer_norm, config.activate_output, list(config.dropout_structure))
    if state_dict is not None:  # (loaded after .double(): a float32 module would round the float64 state)
        module.double().load_state_dict(state_dict)
    return module


def _big_weights(module: nn.Module, seed: int) -> None:
    """Weights large enough that every layer (and every activation's shape) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)


# ------------------------------------------------------------------ the MLP, every activation
@pytest.mark.parametrize("activation", [*sorted(ACTIVATIONS), "prelu"])
def test_every_activation_with_output_activation_and_layer_norms_is_a1111s_module(activation):
    config = HypernetworkConfig(layer_structure=(1, 1.5, 0.5, 1), activation=activation, layer_norm=True,
                                activate_output=True, dropout_structure=(0, 0.2, 0.1, 0))
    dim = 6
    ours = HypernetworkMLP(dim, config).double()
    _big_weights(ours, seed=len(activation))
    theirs = _ref_for(config, dim, {k: v.clone() for k, v in ours.state_dict().items()}).double()
    assert [type(m) for m in ours.linear] == [type(m) for m in theirs.linear]
    x = torch.randn(2, 3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    ours.eval(), theirs.eval()
    theirs.multiplier = 0.45
    torch.testing.assert_close(ours(x, strength=0.45), theirs(x), rtol=1e-12, atol=1e-12)


def test_train_mode_forward_with_dropout_is_a1111s_bit_for_bit():
    """Training: dropout draws the same masks from the same seed; A1111 uses multiplier 1 while training,
    which is what sdadapt's training method injects with."""
    config = HypernetworkConfig(layer_structure=(1, 2, 2, 1), activation="relu", layer_norm=True,
                                dropout_structure=dropout_structure_for((1, 2, 2, 1), use_dropout=True, last_layer_dropout=True))
    ours = HypernetworkMLP(8, config).double().train()
    _big_weights(ours, seed=3)
    theirs = _ref_for(config, 8, {k: v.clone() for k, v in ours.state_dict().items()}).double().train()
    theirs.multiplier = 0.3  # ignored by A1111 in training
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.manual_seed(5)
    got = ours(x, strength=1.0)
    torch.manual_seed(5)
    want = theirs(x)
    assert torch.equal(got, want)
    torch.manual_seed(6)
    assert not torch.equal(ours(x), got)  # (the masks do depend on the seed: dropout is on)


# ------------------------------------------------------------------ the initialisation
@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
@pytest.mark.parametrize(("activation", "layer_norm"), [("relu", False), ("leakyrelu", False), ("relu", True)])
def test_initialisation_is_a1111s_from_the_same_seed(weight_init, activation, layer_norm):
    """Every setting, LayerNorm or not: the same draws from the global RNG, so bit for bit A1111's
    weights (nn.Linear's own init first, then A1111's; ``normal_(b, std=0)`` zero biases under Normal
    and on every LayerNorm still advance the RNG, ``zeros_`` draws nothing)."""
    config = HypernetworkConfig(layer_structure=(1, 2, 1.5, 1), activation=activation, weight_init=weight_init,
                                layer_norm=layer_norm)
    torch.manual_seed(11)
    ours = HypernetworkMLP(16, config)
    torch.manual_seed(11)
    theirs = _ref_for(config, 16)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    biases = [v for k, v in ours.state_dict().items() if k.endswith("bias")]
    assert biases and not any(b.any() for b in biases)  # zero, however drawn


# ------------------------------------------------------------------ loading: settings and their defaults
LOAD_CASES = [
    {},  # a very old file: only the widths
    {"activation_func": "relu"},  # activate_output defaults to True on load: relu after the last Linear too
    {"activation_func": "relu", "activate_output": False, "is_layer_norm": True},
    {"layer_structure": [1, 2, 2, 1], "use_dropout": True},  # derived: [0, 0.3, 0, 0]
    {"layer_structure": [1, 2, 2, 1], "use_dropout": True, "last_layer_dropout": True},  # [0, 0.3, 0.3, 0]
    {"layer_structure": [1, 1.5, 1], "use_dropout": True, "last_layer_dropout": True, "dropout_structure": None},
    {"layer_structure": [1, 2, 1], "use_dropout": False, "dropout_structure": [0, 0.2, 0]},  # the structure wins
    {"layer_structure": [1, 2, 1], "use_dropout": True, "dropout_structure": [0, 0, 0]},
    {"activation_func": None, "weight_initialization": "XavierNormal", "activate_output": False},
]


@pytest.mark.parametrize("settings", LOAD_CASES, ids=range(len(LOAD_CASES)))
def test_loaded_settings_build_the_module_a1111s_loader_builds(settings):
    dim = 8
    ls, act, init, ln, act_out, dropout = ref_load_settings(settings)
    g = torch.Generator().manual_seed(0)
    theirs = RefModule(dim, None, ls, act, init, ln, act_out, dropout).double()
    state = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state)
    tensors, read = a1111_to_canonical({dim: (state, state), **settings}, source="h.pt")
    assert read["dropout_structure"] == dropout
    assert parse_dropout_structure(ls, True, True) == ref_parse_dropout_structure(ls, True, True)
    hn = hypernetwork_from_state(tensors, read, dtype=torch.float64)
    ours = hn.pair(dim)[1]
    assert [type(m) for m in ours.linear] == [type(m) for m in theirs.linear]
    assert [getattr(m, "p", None) for m in ours.linear] == [getattr(m, "p", None) for m in theirs.linear]
    x = torch.randn(3, dim, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-12, atol=1e-12)
    # written back, the settings are what A1111's save writes for that module (l.221-233)
    written = hypernetwork_settings(hn)
    assert written["dropout_structure"] == list(dropout) and written["activate_output"] is act_out
    assert written["last_layer_dropout"] == (dropout[-2] != 0) and written["use_dropout"] == any(dropout)


def test_params_are_live_and_keyed_like_the_state_dict():
    """``HypernetworkMLP.params()`` (read on every forward) sees replaced parameters and moved modules."""
    mlp = HypernetworkMLP(6, HypernetworkConfig(activation="relu", layer_norm=True))
    assert list(mlp.params()) == [f"linear.{k}" for k in dict(mlp.linear.named_parameters())]
    assert all(mlp.params()[k] is v for k, v in mlp.named_parameters())
    mlp.linear[0].weight = nn.Parameter(torch.zeros(12, 6))
    mlp.linear[3] = nn.Linear(12, 6)
    assert mlp.params()["linear.0.weight"] is mlp.linear[0].weight and mlp.params()["linear.3.bias"] is mlp.linear[3].bias
    x = torch.randn(2, 6)
    torch.testing.assert_close(mlp(x), x + mlp.linear(x))
