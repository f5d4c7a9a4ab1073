"""`train` on the toy model: everything checked before the first step, NaN stop, Ctrl-C save + resume,
method options, TOML configs; `generate` on the toy model."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from train_inputs import lora_train_args

import sdadapt
from sdadapt.cli import main
from sdadapt.images import read_image


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "must be >= 1"),
        (["--prompt", " "], "--prompt is empty"),
        (["-o", "{tmp}/x.pt"], "name the output *.safetensors"),
        (["--sample-every-n-steps", "2"], "need --sample-prompts"),
        (["--sample-prompts", "{tmp}/none.txt"], "no such sample-prompt file"),
        (["--steps", "3", "--epochs", "1"], "not both"),
        (["--resolution", "30"], "multiples of 4"),
        (["--resume", "{tmp}/nowhere"], "no such folder"),
        (["--text-encoder-lr", "-1"], "must be >= 0"),
        (["--optimizer", "sophia"], "--optimizer must be one of"),
        (["--tokenizer", "{tmp}"], "not the toy"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_fail_before_any_training(three_shapes, tmp_path, capsys, extra, message):
    argv = lora_train_args(three_shapes, "--steps", "2", *[e.format(tmp=tmp_path) for e in extra])
    assert main(argv) != 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last
    assert "step/s" not in err and "caching latents" not in err  # nothing ran


def test_existing_outputs_need_overwrite_and_method_options_their_method(three_shapes, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", out)) == 8
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", out, "--overwrite", "--network-dim", "2", "-q")) == 0
    assert sdadapt.load_lora(out)[1]["ss_network_dim"] == "2"
    capsys.readouterr()
    assert main(["train", "full", "--images", str(three_shapes), "--steps", "1", "--network-dim", "4"]) == 2
    assert "--network-dim is an option of" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text("batch_sise = 2\n")
    assert main(["train", "lora", "--images", str(three_shapes), "--config", str(config)]) == 2
    assert "did you mean batch_size" in capsys.readouterr().err


def test_a_diverged_run_stops_at_the_step_and_names_the_last_save(three_shapes, tmp_path, capsys, monkeypatch):
    fit_module = importlib.import_module("sdadapt.methods.fit")

    real = fit_module.train_step
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        metrics = real(*args, **kwargs)
        return {**metrics, "loss": torch.tensor(float("nan"))} if len(calls) >= 3 else metrics

    monkeypatch.setattr(fit_module, "train_step", diverging)
    out = tmp_path / "n.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "6", "--save-every-n-steps", "2", "-o", out)) == 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 3" in last and "n-step000002.safetensors" in last
    assert not out.exists() and (tmp_path / "n-step000002.safetensors").is_file()


def test_ctrl_c_saves_and_resume_finishes_the_same_run(three_shapes, tmp_path, capsys, monkeypatch):
    fit_module = importlib.import_module("sdadapt.methods.fit")

    straight = tmp_path / "straight.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "4", "--shuffle-caption", "-o", straight, "-q")) == 0
    real = fit_module.train_step
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", interrupted)
    out = tmp_path / "cut.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "4", "--shuffle-caption", "-o", out)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted after step 2 of 4" in last and "--resume" in last
    assert (tmp_path / "cut-step000002.safetensors").is_file() and not out.exists()
    monkeypatch.setattr(fit_module, "train_step", real)
    assert main(lora_train_args(three_shapes, "--steps", "4", "--shuffle-caption", "-o", out, "--resume", tmp_path / "cut-state", "-q")) == 0
    a, b = sdadapt.load_lora(straight)[0], sdadapt.load_lora(out)[0]
    for component in a:
        for key in a[component]:
            assert torch.equal(a[component][key], b[component][key]), key
    # a resume with other settings is refused
    assert main(lora_train_args(three_shapes, "--steps", "5", "--batch-size", "1", "-o", tmp_path / "z.safetensors", "--resume",
                       tmp_path / "cut-state")) == 2
    assert "batch_size" in capsys.readouterr().err
    # so is one whose captions would differ (the caption draws continue where the saved run stopped)
    assert main(lora_train_args(three_shapes, "--steps", "5", "-o", tmp_path / "y.safetensors", "--resume", tmp_path / "cut-state")) == 2
    assert "shuffle_caption True (now False)" in capsys.readouterr().err
    assert main(lora_train_args(three_shapes, "--steps", "5", "--shuffle-caption", "--caption-dropout-rate", "0.1", "-o",
                       tmp_path / "x.safetensors", "--resume", tmp_path / "cut-state")) == 2
    assert "caption_dropout_rate 0.0 (now 0.1)" in capsys.readouterr().err


def test_a_state_recorded_before_the_caption_options_were_still_resumes(three_shapes, tmp_path):
    out = tmp_path / "a.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "2", "--save-every-n-steps", "1", "-o", out, "-q")) == 0
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["captions"]["templates"] == "object" and record["captions"]["shuffle_caption"] is False
    del record["captions"]
    record_file.write_text(json.dumps(record))
    assert main(lora_train_args(three_shapes, "--steps", "3", "-o", tmp_path / "b.safetensors", "--resume", tmp_path / "a-state",
                       "-q")) == 0


def test_generate_on_the_toy_model_with_a_lora_and_unknown_words(three_shapes, tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "2", "-o", lora, "-q")) == 0
    png = tmp_path / "g.png"
    assert main(["generate", "--prompt", "a red zebra", "--lora", f"{lora}:0.7", "--seed", "2", "--steps", "3",
                 "-o", str(png)]) == 0
    err = capsys.readouterr().err
    assert "does not know zebra" in err and "circle" in err  # the vocabulary is listed
    assert read_image(png).shape == (3, 32, 32)
    assert main(["generate", "--prompt", "a red circle", "--sampler", "euler", "--steps", "3", "--count", "2",
                 "-o", str(tmp_path / "e.png"), "-q"]) == 0
    assert (tmp_path / "e-00.png").is_file() and (tmp_path / "e-01.png").is_file()
    # a textual-inversion embedding: its file name is the trigger word the toy tokenizer then knows
    emb = tmp_path / "mytoken.safetensors"
    assert main(["train", "textual-inversion", "--images", str(three_shapes), "--token", "mytoken", "--steps", "1",
                 "-o", str(emb), "-q"]) == 0, capsys.readouterr().err
    assert main(["generate", "--prompt", "a mytoken circle", "--embedding", str(emb), "--steps", "2",
                 "-o", str(tmp_path / "t.png")]) == 0
    err = capsys.readouterr().err
    assert "embedding 'mytoken'" in err and "does not know" not in err
    assert main(["generate", "--prompt", "a", "-o", str(png)]) == 8  # exists
    assert main(["generate", "--prompt", "", "-o", str(tmp_path / "q.png")]) == 2
    assert main(["generate", "--prompt", "a", "--width", "64", "-o", str(tmp_path / "w.png")]) == 2
    assert "32x32" in capsys.readouterr().err.strip().splitlines()[-1]
