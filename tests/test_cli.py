"""``python -m sdadapt``: inspect says what a file is, with correct numbers; errors are one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdadapt.cli import main
from sdadapt.formats import save_diffusers, save_kohya, save_peft, to_kohya, write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _lora(layers, *, rank, alpha, fan_in=6, fan_out=5, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        state[f"{layer}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g)
        state[f"{layer}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g)
        state[f"{layer}.alpha"] = torch.tensor(float(alpha))
    return state


UNET_LAYERS = [
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.0.proj_in",
]
TE_LAYERS = ["text_model.encoder.layers.0.mlp.fc1"]


def _components():
    return {
        "unet": _lora(UNET_LAYERS, rank=4, alpha=2),
        "text_encoder": _lora(TE_LAYERS, rank=8, alpha=8, seed=1),
    }


def _inspect_json(capsys, path) -> dict:
    code = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def _inspect_text(capsys, path) -> str:
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _line(text: str, field: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(field + ":")]
    return line.split(":", 1)[1].strip()


# ------------------------------------------------------------------------ kinds and numbers
def test_inspect_kohya_file(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    save_kohya(path, _components(), dtype=torch.float16)
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "kohya-lora"
    assert summary["file"] == str(path)
    assert summary["tensors"] == 12
    assert summary["modules"] == 4
    assert summary["components"] == {"unet": 3, "text_encoder": 1}
    assert summary["algorithms"] == {"lora": 4}
    assert summary["ranks"] == {"4": 3, "8": 1}
    assert summary["alphas"] == {"2": 3, "8": 1}
    assert summary["dtypes"] == {"float16": 8, "float32": 4}  # alphas stay float32
    assert summary["size_bytes"] == path.stat().st_size
    assert summary["metadata"]["ss_network_dim"] == "4"
    assert summary["metadata"]["ss_network_alpha"] == "2.0"  # (kohya's str(float))
    assert summary["metadata"]["modelspec.title"] == "style"

    text = _inspect_text(capsys, path)
    assert _line(text, "kind") == "kohya-lora"
    assert _line(text, "modules") == "4"
    assert _line(text, "ranks") == "4: 3, 8: 1"
    assert "ss_network_dim: 4" in text
    assert f"({path.stat().st_size} bytes)" in text


def test_inspect_diffusers_file_reports_alphas_from_the_metadata(tmp_path, capsys):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_diffusers(path, _components())
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "diffusers-lora"
    assert summary["modules"] == 4
    assert summary["components"] == {"unet": 3, "text_encoder": 1}
    assert summary["ranks"] == {"4": 3, "8": 1}
    # no alpha tensors in diffusers files: the scale lives in lora_adapter_metadata
    assert summary["alphas"] == {"2": 3, "8": 1}
    assert summary["dtypes"] == {"float32": 8}
    assert summary["size_bytes"] == path.stat().st_size
    assert "lora_adapter_metadata" in summary["metadata"]


def test_inspect_diffusers_file_without_metadata_says_alpha_is_rank(tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    write_safetensors(
        path,
        {
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 6),
            "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(5, 4),
        },
    )
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "diffusers-lora"
    assert summary["alphas"] == {"absent (alpha = rank)": 1}


def test_inspect_peft_adapter(tmp_path, capsys):
    folder = tmp_path / "adapter"
    save_peft(folder, _lora(UNET_LAYERS, rank=4, alpha=2))
    summary = _inspect_json(capsys, folder / "adapter_model.safetensors")
    assert summary["kind"] == "peft-lora"
    assert summary["modules"] == 3
    assert summary["ranks"] == {"4": 3}
    assert summary["alphas"] == {"2": 3}  # from adapter_config.json
    assert summary["dtypes"] == {"float32": 6}
    # the folder itself works too
    assert _inspect_json(capsys, folder)["kind"] == "peft-lora"


def test_inspect_checkpoint_like_file(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    write_safetensors(
        path,
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3, dtype=torch.float16),
            "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8, dtype=torch.float16),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3, dtype=torch.float16),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
        },
        {"format": "pt"},
    )
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "checkpoint"
    assert summary["tensors"] == 5
    assert summary["dtypes"] == {"float16": 3, "float32": 2}
    assert summary["metadata"] == {"format": "pt"}
    assert "ranks" not in summary and "modules" not in summary


def test_inspect_a1111_embedding_pt(tmp_path, capsys):
    path = tmp_path / "my-style.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, 768)}, "name": "x", "step": 0, "string_to_token": {"*": 265}}, path)
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "embedding"
    assert summary["tensors"] == 1
    assert summary["dtypes"] == {"float32": 1}
    assert summary["metadata"]["name"] == '"x"'
    assert summary["metadata"]["step"] == "0"
    assert summary["metadata"]["string_to_token.*"] == "265"
    assert summary["size_bytes"] == path.stat().st_size


def _hypernetwork_mlp(dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "linear.0.weight": torch.randn(2 * dim, dim, generator=g) * 0.01,
        "linear.0.bias": torch.zeros(2 * dim),
        "linear.1.weight": torch.randn(dim, 2 * dim, generator=g) * 0.01,
        "linear.1.bias": torch.zeros(dim),
    }


def test_inspect_hypernetwork_pt(tmp_path, capsys):
    # A1111 layout: integer keys -> (k_state_dict, v_state_dict) tuples, plus settings
    path = tmp_path / "hn.pt"
    torch.save(
        {
            64: (_hypernetwork_mlp(64, 0), _hypernetwork_mlp(64, 1)),
            32: (_hypernetwork_mlp(32, 2), _hypernetwork_mlp(32, 3)),
            "step": 120,
            "name": "hn",
            "layer_structure": [1, 2, 1],
            "activation_func": "linear",
            "is_layer_norm": False,
            "weight_initialization": "Normal",
            "use_dropout": False,
            "activate_output": False,
            "sd_checkpoint": None,
        },
        path,
    )
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "hypernetwork"
    assert summary["tensors"] == 16
    assert summary["dtypes"] == {"float32": 16}
    assert summary["metadata"]["layer_structure"] == "[1, 2, 1]"
    assert summary["metadata"]["activation_func"] == '"linear"'
    assert summary["metadata"]["step"] == "120"
    assert not any(k.startswith(("64", "32")) for k in summary["metadata"]), "tensors leaked into metadata"
    text = _inspect_text(capsys, path)
    assert _line(text, "kind") == "hypernetwork"
    assert max(len(line) for line in text.splitlines()) < 200


def test_inspect_lycoris_file(tmp_path, capsys):
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    g = torch.Generator().manual_seed(0)
    state = {f"{layer}.{k}": torch.randn(*shape, generator=g) for k, shape in {"hada_w1_a": (8, 4), "hada_w1_b": (4, 6), "hada_w2_a": (8, 4), "hada_w2_b": (4, 6)}.items()}
    state[f"{layer}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "loha.safetensors"
    write_safetensors(path, state, {"ss_network_module": "lycoris.kohya"})
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "lycoris"
    assert summary["algorithms"] == {"loha": 1}
    assert summary["ranks"] == {"4": 1}
    assert summary["alphas"] == {"1": 1}


def test_inspect_legacy_pt_kohya_file(tmp_path, capsys):
    path = tmp_path / "old_lora.pt"
    torch.save(to_kohya(_components()), path)
    summary = _inspect_json(capsys, path)
    assert summary["kind"] == "kohya-lora"
    assert summary["ranks"] == {"4": 3, "8": 1}
    assert summary["alphas"] == {"2": 3, "8": 1}
    assert summary["dtypes"] == {"float32": 12}


# ------------------------------------------------------------------------ errors
class _Payload:  # any class instance needs full unpickling
    pass


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp_path / "missing.safetensors"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    files["empty"] = tmp_path / "empty.safetensors"
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 8)
    files["junk"] = tmp_path / "junk.pt"
    good = tmp_path / "good.safetensors"
    save_kohya(good, _components())
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-40])
    files["truncated"] = tmp_path / "cut.safetensors"

    torch.save({"x": _Payload()}, tmp_path / "unsafe.pt")
    files["unsafe"] = tmp_path / "unsafe.pt"
    (tmp_path / "folder").mkdir()
    files["folder"] = tmp_path / "folder"
    return files


@pytest.mark.parametrize("case", ["missing", "empty", "junk", "truncated", "unsafe", "folder"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_bad_file_exits_3_with_one_line_naming_it(tmp_path, capsys, case, as_json):
    path = _corrupt_files(tmp_path)[case]
    code = main(["inspect", str(path), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 3  # WeightFileError (docs/security.md: the exit-code table)
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert str(path) in err
    assert "Traceback" not in err


def test_cli_help_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "sdadapt", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "inspect" in result.stdout
    assert result.stderr == ""


def test_cli_error_in_a_subprocess(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "sdadapt", "inspect", str(path), "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 3  # WeightFileError
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "inspect" in capsys.readouterr().out


def test_inspect_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
