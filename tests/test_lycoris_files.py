"""LyCORIS files: written by lycoris-lora's own kohya network on tiny SD1/SDXL models, read by sdadapt.

Each file must (1) load with ``load_lora`` (auto-detected), (2) give the same UNet / text-encoder
outputs as the lycoris network that wrote it, (3) round-trip file -> canonical -> file with
identical keys and bits, and (4) be described by ``sdadapt inspect`` with its family and
per-module algorithms.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs

import sdadapt
from sdadapt.cli import main as cli_main
from sdadapt.formats import describe_file, load_lora, save_lora

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed (pip install lycoris-lora)")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def _lycoris_file(path, unet, text_encoders, *, dim, alpha, preset, seed=5, **kwargs):
    """Train-free LyCORIS file: random adapter weights, saved by lycoris itself; returns outputs."""
    te = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    net = lycoris_kohya.create_network(1.0, dim, alpha, None, te, unet, preset=preset, **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return net


def _loads_applies_and_round_trips(path, inputs, ids, y_unet, y_te, tmp_path):
    """The LyCORIS SD1 file ``path`` loaded into fresh tiny SD1 models (UNet on ``inputs``, CLIP on
    ``ids`` (1,L)) gives LyCORIS' outputs ``y_unet`` / ``y_te``, applied and merged; written back as a
    kohya file it is the same file (:func:`kohya_rewrite_is_the_file`). Returns ``(handles, written)``:
    the adapters in the fresh models and the tensors of the rewritten file ``tmp_path/again.safetensors``."""
    components, _ = load_lora(path)
    fresh_unet, fresh_te = tiny_unet_sd1(), tiny_clip()
    base_unet = run_unet(fresh_unet, inputs)
    handles = [sdadapt.load_adapter(fresh_unet, components["unet"])]
    if "text_encoder" in components:
        handles.append(sdadapt.load_adapter(fresh_te, components["text_encoder"]))
    assert not torch.allclose(y_unet, base_unet, atol=1e-4), "the adapter should change the output"
    assert torch.allclose(run_unet(fresh_unet, inputs), y_unet, atol=2e-5, rtol=1e-4)
    assert torch.allclose(_te_out(fresh_te, ids), y_te, atol=2e-5, rtol=1e-4)
    for handle in handles:  # merged == lycoris' forward
        handle.merge()
    assert torch.allclose(run_unet(fresh_unet, inputs), y_unet, atol=2e-5, rtol=1e-4)

    return handles, kohya_rewrite_is_the_file(path, components, tmp_path)


def kohya_rewrite_is_the_file(path, components, tmp_path) -> dict[str, torch.Tensor]:
    """``components`` (``load_lora`` of the LyCORIS SD1 file ``path``) written back as a kohya file
    ``tmp_path/again.safetensors`` has the file's keys, as the ecosystem spells them (lycoris on a
    transformers-5 CLIPTextModel, no ``text_model``, writes ``lora_te_encoder_...``; sdadapt writes
    ``lora_te_text_model_encoder_...``), and the same bits and dtypes. Returns the written tensors."""
    again = tmp_path / "again.safetensors"
    save_lora(again, components, format="kohya", base_model="sd1")
    original, written = load_file(str(path)), load_file(str(again))
    ecosystem = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in original.items()}
    assert set(written) == set(ecosystem)
    for key, value in ecosystem.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    return written


def _case_id(kwargs) -> str:
    if kwargs.get("train_norm"):
        return "lora-train-norm"
    if kwargs["algo"] == "lokr":
        return "lokr-tucker"
    if kwargs["algo"] == "lora":
        return "locon-tucker-dora"
    if kwargs["algo"] == "loha":
        return "loha-dora-input-axis" if kwargs.get("dora_wd") else "loha"
    return kwargs["algo"]


def _te_out(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


SD1_CASES = [
    pytest.param({"algo": "loha"}, "attn-mlp", 4, {"loha": 1}, id="loha"),
    pytest.param({"algo": "lokr", "factor": 4, "decompose_both": True, "use_tucker": True}, "unet-convblock-only", 2, {"lokr": 1, "lokr-tucker": 1}, id="lokr-tucker"),
    pytest.param({"algo": "lora", "use_tucker": True, "dora_wd": True}, "unet-convblock-only", 2, {"dora": 1, "locon-tucker+dora": 1}, id="locon-tucker-dora"),
    pytest.param({"algo": "loha", "dora_wd": True, "wd_on_output": False}, "attn-mlp", 2, {"loha+dora": 1}, id="loha-dora-input-axis"),
    pytest.param({"algo": "full"}, "attn-mlp", 4, {"full": 1}, id="full"),
    pytest.param({"algo": "glora"}, "attn-mlp", 2, {"glora": 1}, id="glora"),
    pytest.param({"algo": "glora", "conv_dim": 2, "conv_alpha": 3.0}, "unet-convblock-only", 2, {"glora": 1}, id="glora-conv"),
    pytest.param({"algo": "lora", "train_norm": True}, "attn-mlp", 2, {"lora": 1, "norm": 1}, id="lora-train-norm"),
]


@pytest.mark.parametrize("kwargs, preset, dim, algorithms", SD1_CASES)
def test_sd1_lycoris_file_loads_applies_round_trips_and_inspects(kwargs, preset, dim, algorithms, tmp_path, capsys):
    unet, te = tiny_unet_sd1(), tiny_clip()
    inputs = unet_inputs(unet)
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    path = tmp_path / "lyco.safetensors"
    _lycoris_file(path, unet, [te], dim=dim, alpha=1.0, preset=preset, **kwargs)
    y_unet, y_te = run_unet(unet, inputs), _te_out(te, ids)

    # applied and merged == lycoris' forward; file -> canonical -> file: the same bits
    _, written = _loads_applies_and_round_trips(path, inputs, ids, y_unet, y_te, tmp_path)
    twice = tmp_path / "twice.safetensors"
    save_lora(twice, load_lora(tmp_path / "again.safetensors")[0], format="kohya", base_model="sd1")
    rewritten = load_file(str(twice))
    assert set(rewritten) == set(written) and all(torch.equal(rewritten[k], v) for k, v in written.items())

    # inspect: the family and per-module algorithms
    summary = describe_file(path)
    assert summary["kind"] == "lycoris"
    counted = {a: n for a, n in summary["algorithms"].items()}
    assert set(counted) == set(algorithms), counted
    assert summary["modules"] == sum(counted.values())
    expected_family = {"loha": "loha", "lokr-tucker": "lokr", "locon-tucker-dora": "lora+dora",
                       "loha-dora-input-axis": "loha+dora", "full": "full", "glora": "glora",
                       "lora-train-norm": "mixed: lora, norm"}
    assert summary["family"] in expected_family.values()
    assert summary["family"] == expected_family[_case_id(kwargs)]
    cli_main(["inspect", str(path)])
    text = capsys.readouterr().out
    assert "kind:       lycoris" in text and "family:" in text
    for algorithm in algorithms:
        assert algorithm in text


def test_sdxl_lycoris_files_both_namings(tmp_path):
    """lycoris on a diffusers SDXL UNet writes diffusers paths; kohya SDXL files use LDM paths.
    sdadapt reads both, and writes SDXL with LDM paths and lora_te1/lora_te2 prefixes."""
    unet, te1, te2 = tiny_unet_sdxl(), tiny_clip(), tiny_clip(seed=1, with_projection=True)
    inputs = unet_inputs(unet, sdxl=True)
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    path = tmp_path / "xl.safetensors"
    _lycoris_file(path, unet, [te1, te2], dim=2, alpha=2.0, preset="attn-mlp", algo="lokr", factor=4, decompose_both=True)
    y_unet, y1, y2 = run_unet(unet, inputs), _te_out(te1, ids), _te_out(te2, ids)
    assert any(k.startswith("lora_te2_") for k in load_file(str(path)))

    components, _ = load_lora(path)
    assert set(components) == {"unet", "text_encoder", "text_encoder_2"}
    fresh, f1, f2 = tiny_unet_sdxl(), tiny_clip(), tiny_clip(seed=1, with_projection=True)
    sdadapt.load_adapter(fresh, components["unet"])
    sdadapt.load_adapter(f1, components["text_encoder"])
    sdadapt.load_adapter(f2, components["text_encoder_2"])
    assert torch.allclose(run_unet(fresh, inputs), y_unet, atol=2e-5, rtol=1e-4)
    assert torch.allclose(_te_out(f1, ids), y1, atol=2e-5, rtol=1e-4)
    assert torch.allclose(_te_out(f2, ids), y2, atol=2e-5, rtol=1e-4)

    # sdadapt's SDXL writer: LDM UNet paths (kohya's SDXL convention), then a lossless round trip
    xl = tmp_path / "xl_kohya.safetensors"
    save_lora(xl, components, format="kohya", base_model="sdxl")
    written = load_file(str(xl))
    unet_keys = [k for k in written if k.startswith("lora_unet_")]
    assert any(k.startswith("lora_unet_input_blocks_") for k in unet_keys)
    assert not [k for k in unet_keys if k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))]
    assert {k.split("_", 2)[1] for k in written} == {"unet", "te1", "te2"}
    metadata = json.loads(json.dumps(describe_file(xl)["metadata"]))
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    reread, _ = load_lora(xl)
    for component, state in components.items():
        assert set(reread[component]) == set(state)
        assert all(torch.equal(reread[component][k], v) for k, v in state.items())
    twice = tmp_path / "xl_twice.safetensors"
    save_lora(twice, reread, format="kohya", base_model="sdxl")
    again = load_file(str(twice))
    assert set(again) == set(written) and all(torch.equal(again[k], v) for k, v in written.items())


def test_dora_written_as_diffusers_only_per_output_row(tmp_path):
    state = {
        "to_q.lora_down.weight": torch.randn(2, 6),
        "to_q.lora_up.weight": torch.randn(8, 2),
        "to_q.alpha": torch.tensor(2.0),
        "to_q.dora_scale": torch.rand(8, 1) + 0.5,
    }
    save_lora(tmp_path / "d.safetensors", {"unet": state}, format="diffusers")
    back, _ = load_lora(tmp_path / "d.safetensors")
    assert torch.equal(back["unet"]["to_q.dora_scale"], state["to_q.dora_scale"])
    raw = load_file(str(tmp_path / "d.safetensors"))
    assert tuple(raw["unet.to_q.lora_magnitude_vector"].shape) == (8,)
    column = dict(state, **{"to_q.dora_scale": torch.rand(1, 6)})
    with pytest.raises(ValueError, match="per input column"):
        save_lora(tmp_path / "e.safetensors", {"unet": column}, format="diffusers")
    loha = {"x.hada_w1_a": torch.zeros(2, 1), "x.hada_w1_b": torch.zeros(1, 2), "x.hada_w2_a": torch.zeros(2, 1), "x.hada_w2_b": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="hada_w1_a"):
        save_lora(tmp_path / "f.safetensors", {"unet": loha}, format="diffusers")
