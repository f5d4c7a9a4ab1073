"""Review of DyLoRA's --network-weights (commit cf5dc50): the unit of a file without one in its network args.

kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb: networks/dylora.py ``create_network`` reads
``unit = kwargs.get("unit", None)`` and uses 1 when absent (``if unit is not None: unit = int(unit)`` ...
``unit=unit if unit is not None else 1``), and train_network.py writes ``ss_network_args`` only when
``--network_args`` were given. So a DyLoRA file whose ``ss_network_args`` lacks ``unit`` (or which has none)
was trained with unit 1: loading it into a unit-1 run is fine, into a unit-2 run is refused.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from toy_adapter_files import random_adapter_file

from sdadapt.errors import InputError
from sdadapt.methods import METHODS
from sdadapt.toy import load_toy


def _with_network_args(path, args):
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    assert metadata["ss_network_module"] == "networks.dylora"
    if args is None:
        metadata.pop("ss_network_args", None)
    else:
        metadata["ss_network_args"] = json.dumps(args)
    save_file(load_file(path), str(path), metadata)
    return path


@pytest.mark.parametrize("args", [None, {}, {"conv_dim": "4"}])
def test_a_dylora_file_without_a_unit_was_trained_with_unit_1(tmp_path, args):
    toy = load_toy()
    file = tmp_path / "dy.safetensors"
    random_adapter_file(toy, file, "dylora", rank=4, alpha=2.0, unit=1)
    _with_network_args(file, args)
    adaptation = METHODS["dylora"].adapt(toy, seed=0, rank=4, alpha=2.0, unit=1, network_weights=str(file))
    adaptation.remove()
    with pytest.raises(InputError, match="trained with unit 1, the run trains unit 2"):
        METHODS["dylora"].adapt(toy, seed=0, rank=4, alpha=2.0, unit=2, network_weights=str(file))


def test_kohyas_string_unit_is_read(tmp_path):
    """kohya's --network_args "unit=2" lands in ss_network_args as the string "2"."""
    toy = load_toy()
    file = tmp_path / "dy.safetensors"
    random_adapter_file(toy, file, "dylora", rank=4, alpha=2.0, unit=2)
    _with_network_args(file, {"unit": "2"})
    METHODS["dylora"].adapt(toy, seed=0, rank=4, alpha=2.0, unit=2, network_weights=str(file)).remove()
    with pytest.raises(InputError, match="trained with unit 2, the run trains unit 1"):
        METHODS["dylora"].adapt(toy, seed=0, rank=4, alpha=2.0, unit=1, network_weights=str(file))


def test_peft_conversion_of_a_lycoris_dylora_file_keeps_linear_lora_b_2d(dylora_file, tmp_path):
    """Only a convolution's flat LyCORIS DyLoRA up becomes a 1x1 conv lora_B: peft's Linear lora_B is (out, r), its
    Conv2d lora_B (out, r, 1, 1), each as its lora_A's rank (peft tuners/lora/layer.py ``update_layer``)."""
    from sdadapt import load_lora, save_lora

    path = dylora_file[0]
    components, _ = load_lora(path)
    out = tmp_path / "diffusers.safetensors"
    save_lora(out, components, format="diffusers", base_model="sd1")
    written = load_file(str(out))
    pairs = [(k, k.replace("lora_A", "lora_B")) for k in written if k.endswith("lora_A.weight")]
    assert {written[a].dim() for a, _ in pairs} == {2, 4}  # (linear and convolution layers both)
    for a, b in pairs:
        assert written[b].dim() == written[a].dim(), b
        assert written[b].shape[1] == written[a].shape[0], b


from test_lycoris_dylora_reference import dylora_file  # noqa: E402,F401  (the LyCORIS DyLoRA file fixture)
