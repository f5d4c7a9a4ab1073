"""The friction a first-time user met (brief E): each test fails on the behaviour found before its fix."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from train_inputs import captioned_pngs

from sdadapt.cli import main
from sdadapt.errors import WeightFileError
from sdadapt.formats.files import check_input_file
from sdadapt.images import ImageFolderError, check_image_folder
from sdadapt.samplers.labels import sampler_from_label


def _images(folder):
    return captioned_pngs(folder, [(32, 32)] * 2, caption=["a photo 0", "a photo 1"])


# ------------------------------------------------------------------ sampler typos
@pytest.mark.parametrize(("typo", "meant"), [("DPM++ 2M Karas", "DPM++ 2M Karras"), ("eular a", "Euler a"),
                                             ("dpm++ sde karas", "DPM++ SDE Karras")])
def test_a_sampler_typo_names_the_closest_sampler(typo, meant):
    with pytest.raises(ValueError, match=rf"unknown sampler .*did you mean {re.escape(repr(meant))}\?") as info:
        sampler_from_label(typo)
    assert sampler_from_label(meant)[0] in str(info.value)  # (the list of what is taken still follows)


def test_a_name_far_from_every_sampler_gets_no_guess():
    with pytest.raises(ValueError, match="unknown sampler 'xyz'; taken:"):
        sampler_from_label("xyz")


def test_generate_with_a_sampler_typo_says_what_was_meant(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "a", "--sampler", "DPM++ 2M Karas", "-o", str(tmp_path / "x.png")])
    assert "did you mean 'DPM++ 2M Karras'?" in capsys.readouterr().err


# ------------------------------------------------------------------ numbers written as strings in a TOML config
def test_a_config_with_numbers_in_quotes_trains_as_with_the_numbers(tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    outputs = []
    for quote in ('"', ""):
        out = tmp_path / f"o{len(outputs)}.safetensors"
        config = tmp_path / f"train{len(outputs)}.toml"
        config.write_text(f'model = "toy"\nimages = "{images.as_posix()}"\nout = "{out.as_posix()}"\n'
                          f'seed = {quote}7{quote}\nmax_train_steps = {quote}2{quote}\nlearning_rate = {quote}1e-3{quote}\n'
                          f'batch_size = {quote}2{quote}\nflip_aug = {quote}false{quote}\n')
        # before: the string seed reached torch.manual_seed -> "internal error ... this is a bug in sdadapt"
        assert main(["train", "lora", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
        rows = list(csv.DictReader(out.with_name(out.stem + "-log.csv").open()))
        assert [row["step"] for row in rows] == ["1", "2"] and float(rows[0]["lr"]) == pytest.approx(1e-3)
        outputs.append(load_file(out))
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


@pytest.mark.parametrize(("line", "words"), [('seed = "abc"', "seed = 'abc' is not an integer"),
                                             ('seed = "1.5"', "seed = '1.5' is not an integer"),
                                             ('learning_rate = "fast"', "learning_rate = 'fast' is not a number"),
                                             ('flip_aug = "maybe"', "flip_aug = 'maybe' is not true or false")])
def test_a_config_string_that_is_no_number_is_named(tmp_path, capsys, line, words):
    config = tmp_path / "train.toml"
    config.write_text(f'model = "toy"\nimages = "{tmp_path.as_posix()}"\n{line}\n')
    assert main(["train", "lora", "--config", str(config), "-q"]) != 0
    err = capsys.readouterr().err
    assert words in err and str(config) in err and "internal error" not in err


# ------------------------------------------------------------------ folders where a file is expected and back
def test_a_diffusers_pipeline_folder_given_for_a_file_says_what_to_pass(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(WeightFileError, match=r"diffusers pipeline folder.*single-file checkpoint.*unet"):
        check_input_file(tmp_path / "pipe")


def test_a_training_checkpoint_folder_without_model_index_says_how_to_use_it(tmp_path, capsys):
    """SimpleTuner's / accelerate's ``checkpoint-N/`` hold the trained parts only (``unet/``, ``unet_ema/``)."""
    for part in ("unet", "unet_ema"):
        (tmp_path / "checkpoint-500" / part).mkdir(parents=True)
    assert main(["convert", str(tmp_path / "checkpoint-500"), "--to", "ldm", "-o", str(tmp_path / "m.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "(unet/, unet_ema/) without model_index.json, not a pipeline folder: copy the base model's folder" in err


def test_a_folder_given_for_a_file_lists_the_weight_files_inside(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightFileError, match=r"pass one of the files inside it \(diffusion_pytorch_model.safetensors\)"):
        check_input_file(tmp_path / "unet")


def test_an_image_folder_that_is_missing_or_a_file_says_which(tmp_path, capsys):
    with pytest.raises(ImageFolderError, match=r"not a folder of images \(no such folder\)"):
        check_image_folder(tmp_path / "nope")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ImageFolderError, match=r"not a folder of images \(it is a file\)"):
        check_image_folder(tmp_path / "a.png")
    assert main(["train", "lora", "--images", str(tmp_path / "nope"), "--steps", "1", "-q",
                 "-o", str(tmp_path / "o.safetensors")]) != 0
    assert "nope: not a folder of images (no such folder)" in capsys.readouterr().err


# ------------------------------------------------------------------ a file of another kind given as a LoRA
def test_an_embedding_given_as_a_lora_says_how_to_use_it(tmp_path):
    from safetensors.torch import save_file

    from sdadapt.formats import load_lora

    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "sks.safetensors"))
    with pytest.raises(WeightFileError, match=r"embedding file, not a LoRA.*textual-inversion embedding: use it with `generate --embedding FILE`"):
        load_lora(tmp_path / "sks.safetensors")


def test_a_lora_strength_with_a_decimal_comma_is_named_not_a_missing_file(tmp_path, capsys):
    lora = tmp_path / "my_lora.safetensors"
    lora.write_bytes(b"x")
    assert main(["generate", "--lora", f"{lora}:0,8", "--prompt", "a", "-o", str(tmp_path / "g.png")]) != 0
    err = capsys.readouterr().err
    assert "strength '0,8' is not a number" in err and f"{lora}:0.8" in err and "no such file" not in err
    assert main(["generate", "--lora", f"{tmp_path / 'none'}:0.8", "--prompt", "a", "-o", str(tmp_path / "g.png")]) != 0
    assert "none: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------ another run's log beside the output
def test_an_existing_log_beside_a_new_output_is_explained(tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    (tmp_path / "o-log.csv").write_text("step\n")  # (another run's: e.g. -o o.pt after -o o.safetensors)
    assert main(["train", "lora", "--images", str(images), "--steps", "1", "-q", "-o", str(tmp_path / "o.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "o-log.csv: already exists (written beside -o" in err and "exist(s)" not in err and "--overwrite" in err


# ------------------------------------------------------------------ -q silences the libraries' bars too
def test_quiet_library_bars_sets_and_restores_the_hub_switch(monkeypatch):
    import os

    from sdadapt.cli.options import quiet_library_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with quiet_library_bars(True):
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    with quiet_library_bars(False):
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # (the user's own choice stays)
    with quiet_library_bars(True):
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


@pytest.fixture(scope="module")
def eps_pipe(tmp_path_factory):
    """The tiny epsilon pipeline folder, built once: the two quiet tests below only read it (their outputs go to
    their own tmp_path)."""
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("quiet") / "pipe", prediction_type="epsilon")


def test_quiet_generate_on_a_diffusers_folder_prints_no_loading_bar(eps_pipe, tmp_path):
    import subprocess
    import sys

    root = eps_pipe
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run([sys.executable, "-m", "sdadapt", "generate", "--model", str(root), "--prompt", "a", "--steps", "1",
                          "--width", "8", "--height", "8",  # (the smallest job that loads the folder: 1 step, 8x8)
                          "-q", "-o", str(tmp_path / "g.png")], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Loading weights" not in run.stderr and "%|" not in run.stderr, run.stderr  # (before: transformers' bar)


def test_quiet_turns_off_the_bars_of_libraries_imported_before_and_turns_them_back_on(eps_pipe, tmp_path, capsys):
    """``main([..., "-q"])`` in a process that imported transformers and diffusers before (a script, a notebook, this
    test process): their bars no longer read the variable, so ``-q`` turns their own switches off for the run and
    back on after it (before: "Loading weights" and "Writing model shards" bars on stderr of a quiet convert)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    root = eps_pipe
    libraries = (transformers_logging, diffusers_logging)
    was_on = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.enable_progress_bar()
    try:
        capsys.readouterr()
        assert main(["convert", str(root), "--to", "diffusers", "-o", str(tmp_path / "out"), "-q"]) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err and "%|" not in err, err
        assert all(library.is_progress_bar_enabled() for library in libraries)  # (as before the run)
        assert main(["convert", str(root), "--to", "diffusers", "-o", str(tmp_path / "out2")]) == 0
        from transformers_versions import TRANSFORMERS_5

        # (without -q: the bars, as before; transformers 4 draws none when it saves)
        assert ("Writing model shards" in capsys.readouterr().err) == TRANSFORMERS_5
    finally:
        for library, on in zip(libraries, was_on):
            (library.enable_progress_bar if on else library.disable_progress_bar)()


# ------------------------------------------------------------------ a misspelt command-line option
@pytest.mark.parametrize(("argv", "words"), [
    (["train", "lora", "--netwrok-alpha", "2", "-o", "x.safetensors"],
     "python -m sdadapt train: unrecognized arguments: --netwrok-alpha 2 (--netwrok-alpha: did you mean --network-alpha?)"),
    (["merge", "ties", "a", "b", "c", "--densty=0.2", "-o", "x"],
     "python -m sdadapt merge ties: unrecognized arguments: --densty=0.2 (--densty: did you mean --density?)"),
    (["inspect", "x", "--bogus"], "python -m sdadapt inspect: unrecognized arguments: --bogus (see python -m sdadapt inspect"),
])
def test_a_misspelt_option_is_reported_by_its_command_with_the_closest_name(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_config_strings_become_the_fields_types_and_text_fields_keep_theirs(tmp_path):
    from train_inputs import read_train_toml

    values, _, _ = read_train_toml(tmp_path / "c.toml", 'lr_warmup_steps = "100"\nlearning_rate = " 1e-4 "\nsteps = "3.0"\n'
                                   'prompt = "123"\ntext_encoder_2_lr = "learning_rate"\nflip_aug = "True"\nbatch_size = 2\n')
    assert values == {"lr_warmup_steps": 100, "learning_rate": 1e-4, "steps": 3, "prompt": "123",
                      "text_encoder_2_lr": "learning_rate", "flip_aug": True, "batch_size": 2}
    # (an integer, not 100.0: kohya reads a float warm-up as a share of the steps)
    assert type(values["lr_warmup_steps"]) is int and type(values["steps"]) is int


def test_config_numbers_in_quotes_read_as_the_numbers_everywhere(tmp_path):
    import dataclasses

    from train_inputs import read_train_toml

    from sdadapt.cli.train import read_config
    from sdadapt.jobs import TrainOptions

    values, _, _ = read_train_toml(tmp_path / "c.toml", 'text_encoder_2_lr = "1e-5"\n'
                                   'lr_warmup_steps = "1_000"\n')  # (TOML's own 1_000 is an integer)
    assert values == {"text_encoder_2_lr": 1e-5, "lr_warmup_steps": 1000} and type(values["lr_warmup_steps"]) is int
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    config = tmp_path / "c.toml"
    config.write_text('learning_rate_te1 = "1e-5"\nmax_train_steps = "0"\nclip_skip = "0"\n')
    # before: "Unknown format code 'g' for object of type 'str'"; and a quoted "0" was a 0 step count, not unset
    options, _, notes = read_config(config, fields=fields, method_options=set())
    assert options == {"text_encoder_lr": 1e-5, "text_encoder_2_lr": "learning_rate"}
    assert any(note.startswith("learning_rate_te1 = 1e-05 without learning_rate_te2") for note in notes)
    config.write_text('learning_rate_te1 = "fast"\n')
    with pytest.raises(ValueError, match=r"c.toml: learning_rate_te1 = 'fast' is not a number"):
        read_config(config, fields=fields, method_options=set())


# ------------------------------------------------------------------ kohya's save_state = true keeps the end state
@pytest.mark.parametrize("end", ["", "save_state_on_train_end = false\n"])  # (kohya: save_state or ..._on_train_end)
def test_a_kohya_config_with_save_state_saves_the_state_after_the_last_step(tmp_path, capsys, end):
    images = _images(tmp_path / "imgs")
    config = tmp_path / "kohya.toml"
    config.write_text(f'pretrained_model_name_or_path = "toy"\ntrain_data_dir = "{images.as_posix()}"\n'
                      f'caption_extension = ".txt"\nmax_train_steps = 3\nsave_every_n_steps = 2\nsave_state = true\n'
                      f'output_dir = "{tmp_path.as_posix()}"\noutput_name = "k"\nseed = 1\n{end}')
    assert main(["train", "lora", "--config", str(config)]) == 0, capsys.readouterr().err
    assert "the state is also saved after the last step, as kohya's" in capsys.readouterr().err
    record = json.loads((tmp_path / "k-state" / "run.json").read_text())
    assert record["step"] == 3  # (before: 2, the last periodic save's: a --resume redid step 3)
    assert main(["train", "lora", "--config", str(config), "--resume", str(tmp_path / "k-state"), "--steps", "4",
                 "--overwrite", "-q"]) == 0, capsys.readouterr().err
    assert "(resumed at step 3)" in capsys.readouterr().out


# ------------------------------------------------------------------ a LoRA of another model baked into a checkpoint
def test_merge_lora_of_a_wrong_size_lora_names_the_checkpoints_model(tmp_path, capsys):
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.formats import save_kohya

    base = tiny_sd1_file(tmp_path / "sd1.safetensors")
    layer = "mid_block.attentions.0.proj_in"  # (the tiny SD1 UNet's is 64 wide; an SDXL-sized LoRA's 128)
    save_kohya(tmp_path / "xl.safetensors", {"unet": {f"{layer}.lora_down.weight": torch.zeros(4, 128, 1, 1),
                                                      f"{layer}.lora_up.weight": torch.zeros(128, 4, 1, 1),
                                                      f"{layer}.alpha": torch.tensor(4.0)}}, base_model="sdxl")
    assert main(["merge-lora", str(base), str(tmp_path / "xl.safetensors"), "-q", "-o", str(tmp_path / "m.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "do not fit the shapes of" in err and "sd1.safetensors looks like an SD1 checkpoint" in err
