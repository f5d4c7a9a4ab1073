"""``train dora --no-wd-on-output`` (LyCORIS' network arg ``wd_on_output=False``): the magnitude per input column,
the axis A1111's and InvokeAI's loaders apply; the file says so in ``ss_network_args`` as LyCORIS' would."""

from __future__ import annotations

import json

from safetensors import safe_open

from sdadapt.formats import load_lora
from sdadapt.methods import METHODS
from sdadapt.toy import build_toy


def _scales(path):
    with safe_open(str(path), "pt") as handle:
        scales = {k: handle.get_tensor(k) for k in handle.keys() if k.endswith(".dora_scale")}  # noqa: SIM118
        downs = {k: handle.get_slice(k.replace("dora_scale", "lora_down.weight")).get_shape() for k in scales}
        return scales, downs, handle.metadata()


def test_the_magnitude_axis_follows_wd_on_output(tmp_path):
    for wd_on_output in (True, False):
        system = build_toy(seed=1)
        adaptation = METHODS["dora"].prepare(system, wd_on_output=wd_on_output)
        path = adaptation.save(tmp_path / f"{wd_on_output}.safetensors")
        adaptation.remove()
        scales, downs, metadata = _scales(path)
        assert scales
        for key, scale in scales.items():
            rank, fan_in = downs[key][0], downs[key][1]
            if wd_on_output:
                assert scale.shape[1] == 1 and scale.shape[0] != 1, key
            else:
                assert tuple(scale.shape[:2]) == (1, fan_in), (key, scale.shape, rank)
        args = json.loads(metadata["ss_network_args"])
        assert args["dora_wd"] == "True" and args.get("wd_on_output") == (None if wd_on_output else "False")
        # (read back: the same tensors, each axis kept)
        back = load_lora(path)[0]
        assert sum(k.endswith(".dora_scale") for s in back.values() for k in s) == len(scales)


def test_the_option_is_doras(tmp_path, capsys):
    from sdadapt.cli import main

    assert main(["train", "lora", "--images", str(tmp_path), "--model", "toy", "--no-wd-on-output",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--wd-on-output is an option of dora, not lora" in capsys.readouterr().err
