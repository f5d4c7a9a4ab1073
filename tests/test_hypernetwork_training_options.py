"""``train hypernetwork``'s A1111 "Create hypernetwork" settings (layer structure, activation, LayerNorm, weight
init, dropout structure, output activation) and continuing a file's training (A1111's "continue training": its
settings and weights, its step counted on)."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.cli import main
from sdadapt.hypernetworks import HypernetworkConfig
from sdadapt.methods import prepare_hypernetwork
from sdadapt.toy import build_toy


def test_settings_as_a1111s_text_fields_build_that_hypernetwork(tmp_path):
    system = build_toy(seed=1)
    adaptation = prepare_hypernetwork(system, layer_structure="1, 1.5, 1.5, 1", activation="elu", layer_norm=False,
                                      weight_init="XavierNormal", dropout_structure="0, 0.3, 0.1, 0",
                                      activate_output=True)
    want = HypernetworkConfig(layer_structure=(1, 1.5, 1.5, 1), activation="elu", layer_norm=False,
                              weight_init="XavierNormal", dropout_structure=(0, 0.3, 0.1, 0), activate_output=True)
    assert adaptation.hypernetwork.config == want
    path = adaptation.save(tmp_path / "hn.pt", metadata={"ss_steps": "7"})
    adaptation.remove()
    saved = torch.load(path, weights_only=True)
    assert (saved["layer_structure"], saved["activation_func"], saved["is_layer_norm"]) == ([1, 1.5, 1.5, 1], "elu", False)
    assert (saved["weight_initialization"], saved["dropout_structure"], saved["activate_output"]) == (
        "XavierNormal", [0, 0.3, 0.1, 0], True)
    assert saved["use_dropout"] and saved["last_layer_dropout"] and saved["step"] == 7
    default = prepare_hypernetwork(system)  # (the defaults: 1, 2, 1 with relu and LayerNorm)
    assert default.hypernetwork.config == HypernetworkConfig(layer_structure=(1, 2, 1), activation="relu", layer_norm=True)
    default.remove()


def test_continuing_a_file_trains_its_weights_and_counts_its_step_on(tmp_path):
    system = build_toy(seed=1)
    first = prepare_hypernetwork(system, layer_structure=(1, 3, 1), activation="tanh")
    with torch.no_grad():
        for p in first.params:
            p.add_(0.01)
    path = first.save(tmp_path / "first.pt", metadata={"ss_steps": "40"})
    first.remove()
    original = {k: v.clone() for k, v in system.unet.state_dict().items()}
    again = prepare_hypernetwork(system, hypernetwork_file=path)
    assert again.hypernetwork.config == sdadapt.load_hypernetwork(path).config
    for mine, theirs in zip(again.params, first.params):
        assert torch.equal(mine, theirs) and mine.requires_grad
    assert again.hypernetwork.training  # (loaded files come back in eval mode: trained in training mode)
    out = again.save(tmp_path / "second.pt", metadata={"ss_steps": "25"})
    assert torch.load(out, weights_only=True)["step"] == 65  # (40 in the file + 25 now: A1111's counter)
    again.remove()
    assert all(torch.equal(system.unet.state_dict()[k], v) for k, v in original.items())


@pytest.mark.parametrize("kwargs, words", [
    ({"hypernetwork_file": "x.pt", "activation": "relu"}, "its settings are the file's; leave out activation"),
    ({"dropout_structure": "0.1, 0.3, 0"}, "must start and end with 0"),
    ({"weight_init": "Uniform"}, "weight_init must be one of Normal"),
    ({"layer_structure": "1, two, 1"}, "comma-separated numbers"),
    ({"layer_structure": "2, 1"}, "must start and end with 1"),
    ({"activation": "bogus"}, "unknown hypernetwork activation"),
])
def test_settings_a1111_refuses_are_refused_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        prepare_hypernetwork(build_toy(seed=1), **kwargs)


def test_a_file_for_another_model_is_refused(tmp_path):
    from sdadapt.hypernetworks import Hypernetwork, save_hypernetwork

    path = save_hypernetwork(tmp_path / "sd1.pt", Hypernetwork([768, 320], HypernetworkConfig()))
    with pytest.raises(ValueError, match=r"context widths \[320, 768\].*made for another model"):
        prepare_hypernetwork(build_toy(seed=1), hypernetwork_file=path)


def test_the_flags_belong_to_train_hypernetwork(tmp_path, capsys):
    assert main(["train", "lora", "--images", str(tmp_path), "--model", "toy", "--layer-structure", "1, 2, 1",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--layer-structure" in capsys.readouterr().err
