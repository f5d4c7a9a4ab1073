"""A training state's files — ``state.safetensors``, ``state.json`` and ``run.json`` — appear together: a kill or a
full disk between the state and its ``run.json`` (a separate write before) left ``run.json`` one save behind, which
``--resume`` refused ("run.json (step 1) and state.json (step 2) disagree") with the previous state already gone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sdadapt.jobs.train as train_job
from sdadapt.jobs import TrainOptions, run_train


def test_a_failed_run_record_leaves_the_previous_state_whole(cross_captions, tmp_path, monkeypatch):
    def options(out, **more):
        return TrainOptions(
            images=cross_captions, steps=4, learning_rate=5e-3, out=out, save_every_n_steps=1, log_with="csv", **more
        )

    run_train("lora", options(tmp_path / "straight" / "a.safetensors"))
    real, calls = train_job._write_run_record, []

    def failing(*args, **kwargs):  # the second state's run.json: the disk is full
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_job, "_write_run_record", failing)
    out = tmp_path / "cut" / "a.safetensors"
    with pytest.raises(OSError):
        run_train("lora", options(out))
    monkeypatch.setattr(train_job, "_write_run_record", real)
    state = next((tmp_path / "cut").rglob("state.json")).parent
    assert (
        json.loads((state / "state.json").read_text())["step"]
        == json.loads((state / "run.json").read_text())["step"]
        == 1
    )
    assert not [p.name for p in state.iterdir() if p.name.startswith(".")]  # (no temporary left)
    run_train("lora", options(out, resume=state, overwrite=True))
    straight, resumed = load_file(tmp_path / "straight" / "a.safetensors"), load_file(out)
    assert set(straight) == set(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_ctrl_c_during_a_periodic_states_save_saves_that_state(cross_captions, tmp_path, monkeypatch):
    """A signal while the state of a periodic save is written (its weights file already there, this run's own): the
    interrupt path re-raised as "another run's output" exists, and the state stayed a save behind; now it saves the
    state, says how to resume, and the resume ends where a straight run does."""
    import importlib

    from sdadapt.errors import Interrupted

    fit_module = importlib.import_module(
        "sdadapt.methods.fit"
    )  # (the module: sdadapt.methods.fit is also its function)

    def options(out, **more):
        return TrainOptions(
            images=cross_captions, steps=4, learning_rate=5e-3, out=out, save_every_n_steps=1, log_with="csv", **more
        )

    run_train("lora", options(tmp_path / "straight" / "a.safetensors"))
    real, calls = fit_module.save_training_state, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # (the second save's state: Ctrl-C)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "save_training_state", interrupted)
    out = tmp_path / "cut" / "a.safetensors"
    with pytest.raises(Interrupted, match="--resume"):
        run_train("lora", options(out))
    monkeypatch.setattr(fit_module, "save_training_state", real)
    state = next((tmp_path / "cut").rglob("state.json")).parent
    assert json.loads((state / "run.json").read_text())["step"] == 2
    run_train("lora", options(out, resume=state))  # (no --overwrite: the saves after step 2 are new)
    straight, resumed = load_file(tmp_path / "straight" / "a.safetensors"), load_file(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_full_disk_in_convert_to_peft_is_said_as_such(tmp_path, monkeypatch, capsys):
    """``convert --to peft`` turned every ValueError of the writer into "cannot convert to peft … convert --to kohya
    keeps every layer" — a full disk (DiskSpaceError is a ValueError too) included; now it is the disk's error."""
    import importlib

    from safetensors.torch import save_file

    from sdadapt.cli import main
    from sdadapt.errors import DiskSpaceError

    convert = importlib.import_module("sdadapt.loratools.convert")
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        },
        str(tmp_path / "a.safetensors"),
    )

    def full(*args, **kwargs):
        raise DiskSpaceError(f"{tmp_path / 'p'}: not enough free disk space (needs 1 MiB, 0 free)")

    monkeypatch.setattr(convert, "save_peft", full)
    code = main(
        ["convert", str(tmp_path / "a.safetensors"), "--to", "peft", "--component", "unet", "-o", str(tmp_path / "p")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "disk space" in err and "cannot convert to peft" not in err


def test_a_safetensors_write_error_is_an_output_error():
    """The safetensors library's errors were all read errors ("an unreadable safetensors file …; download it again"),
    also when it failed writing — a diffusers folder's weights on a full disk (diffusers' save_pretrained)."""
    from safetensors import SafetensorError

    from sdadapt.cli.options import translate_error
    from sdadapt.errors import DiskSpaceError, OutputError, WeightFileError

    full = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    assert isinstance(translate_error(full), DiskSpaceError)
    denied = translate_error(
        SafetensorError("Error while serializing: IoError(Os { code: 13, kind: PermissionDenied })")
    )
    assert isinstance(denied, OutputError) and not isinstance(denied, DiskSpaceError)
    read = translate_error(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert isinstance(read, WeightFileError) and not isinstance(read, OutputError) and "download" in str(read)


def test_a_signal_while_the_progress_bar_closes_is_dropped(tmp_path, monkeypatch, capsys):
    """A Ctrl-C after a command's work ended (while ``main`` closes the progress bar) printed a traceback and exit 1,
    saying the partial output was removed — though the output was whole; now the command's own result stands."""
    from safetensors.torch import save_file

    import sdadapt.cli.options as cli_options
    from sdadapt.cli import main
    from sdadapt.errors import Interrupted

    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
        str(tmp_path / "a.safetensors"),
    )

    def closing():
        raise Interrupted(2)

    monkeypatch.setattr(cli_options, "close_progress", closing)
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    assert "Traceback" not in capsys.readouterr().err
