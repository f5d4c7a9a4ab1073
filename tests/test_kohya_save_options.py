"""kohya's saving, schedule and metadata options on `train`: save_last_n_steps / save_last_n_epochs
(which files remain), save_n_epoch_ratio, save_state_on_train_end, sample_at_first, the polynomial
schedule (lr_scheduler_power, lr_scheduler_args), modelspec metadata, and the kohya keys that are
notes or refusals here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_inputs import lora_train_args

from sdadapt.cli import main
from sdadapt.jobs.save_rotation import (
    PeriodicSave,
    epoch_removal_bound,
    saves_to_remove,
    step_removal_bound,
)
from sdadapt.methods import FitConfig
from sdadapt.training.optim import lr_at


# ------------------------------------------------------------------------------ rotation rule
def _kohya_kept_steps(every: int, keep: int, total: int) -> list[int]:
    """kohya sd-scripts' stepwise saving, reimplemented: after the save at step s (every `every` steps)
    ``get_remove_step_no`` gives r = s - keep - 1, r -= r % every, and the file at r is removed when
    r >= 0 (``if remove_no is not None: ... os.remove``)."""
    kept: list[int] = []
    for s in range(every, total, every):
        kept.append(s)
        r = s - keep - 1
        r -= r % every
        if r >= 0 and r in kept:
            kept.remove(r)
    return kept


def _kohya_kept_epochs(every: int, keep: int, epochs: int) -> list[int]:
    """kohya's ``get_remove_epoch_no``: after the save at epoch e, the one at e - every * keep goes (if >= 0)."""
    kept: list[int] = []
    for e in range(every, epochs, every):
        kept.append(e)
        r = e - every * keep
        if r >= 0 and r in kept:
            kept.remove(r)
    return kept


def _sdadapt_kept(kind: str, every: int, keep: int, end: int) -> list[int]:
    written: list[PeriodicSave] = []
    for n in range(every, end, every):
        now = PeriodicSave(kind, n, Path(f"out-{kind}{n}.safetensors"))
        for old in saves_to_remove(written, now, every_n_steps=every, every_n_epochs=every,
                                   last_n_steps=keep if kind == "step" else None,
                                   last_n_epochs=keep if kind == "epoch" else None):
            written.remove(old)
        written.append(now)
    return [s.number for s in written]


def test_kept_saves_match_hand_computed_lists_and_kohyas_rule():
    # hand-computed: every 10 steps keeping 30 steps, at step 50: 10 goes, 20..50 stay (kohya's own comment)
    assert step_removal_bound(50, every=10, keep_steps=30) == 10
    assert _sdadapt_kept("step", 10, 30, 51) == [20, 30, 40, 50]
    assert _sdadapt_kept("step", 2, 3, 10) == [6, 8]            # saves 2,4,6,8 of a 10-step run
    assert _sdadapt_kept("step", 5, 5, 40) == [30, 35]          # keep 5 steps at every 5: the last two saves
    assert step_removal_bound(4, every=2, keep_steps=3) == 0 and step_removal_bound(3, every=2, keep_steps=3) is None
    assert _sdadapt_kept("epoch", 2, 2, 11) == [8, 10]          # the last 2 epoch saves
    assert epoch_removal_bound(6, every=2, keep_saves=2) == 2 and epoch_removal_bound(3, every=2, keep_saves=2) is None
    for every in range(1, 7):
        for keep in range(1, 15):
            for total in (every + 1, 13, 40):
                assert _sdadapt_kept("step", every, keep, total) == _kohya_kept_steps(every, keep, total), (every, keep, total)
                assert _sdadapt_kept("epoch", every, keep, total) == _kohya_kept_epochs(every, keep, total)


def test_rotation_never_removes_the_final_output_or_other_kinds_and_records_round_trip(tmp_path):
    final = tmp_path / "out.safetensors"
    written = [PeriodicSave("step", 2, tmp_path / "out-step000002.safetensors"),
               PeriodicSave("epoch", 1, tmp_path / "out-epoch0001.safetensors"), PeriodicSave("step", 4, final)]
    now = PeriodicSave("step", 10, tmp_path / "out-step000010.safetensors")
    gone = saves_to_remove(written, now, every_n_steps=2, every_n_epochs=1, last_n_steps=1, last_n_epochs=1,
                           protected=[final])
    assert gone == [written[0]]                                  # not the epoch save, not the final output
    assert saves_to_remove(written, now, every_n_steps=2, every_n_epochs=1, last_n_steps=None, last_n_epochs=1) == []
    back = [PeriodicSave.from_record(json.loads(json.dumps(s.record()))) for s in (*written[:2], now)]
    assert [(s.kind, s.number, s.path) for s in back] == [(s.kind, s.number, s.path) for s in (*written[:2], now)]
    # an edited run.json cannot point the rotation at other files: only absolute paths named as that save
    for entry in ({"kind": "step", "number": "2", "path": "x"}, written[2].record(),  # (the final output's name)
                  {"kind": "step", "number": 2, "path": "out-step000002.safetensors"},
                  {"kind": "epoch", "number": 2, "path": str(tmp_path / "out-step000002.safetensors")},
                  {"kind": "step", "number": 2, "path": str(tmp_path / "out-step000002-mine.safetensors")}):
        with pytest.raises(ValueError, match="not a periodic-save entry"):
            PeriodicSave.from_record(entry)


# ------------------------------------------------------------------------------ polynomial schedule
def _polynomial64(step: int, *, lr: float, warmup: int, total: int, power: float, lr_end: float) -> float:
    """diffusers' get_polynomial_decay_schedule_with_warmup (what kohya's get_scheduler_fix calls with
    power=args.lr_scheduler_power and **lr_scheduler_args), written out in float64."""
    if step < warmup:
        return lr * step / max(1, warmup)
    if step > total:
        return lr_end
    remaining = 1.0 - (step - warmup) / (total - warmup)
    return (lr - lr_end) * remaining ** power + lr_end


@pytest.mark.parametrize("warmup, total, power, lr_end", [(0, 20, 1.0, 1e-7), (3, 17, 2.0, 1e-5), (5, 30, 0.5, 0.0),
                                                          (2, 9, 3.7, 2e-4)])
def test_polynomial_schedule_matches_a_float64_formula_and_diffusers(warmup, total, power, lr_end):
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    lr = 1e-3
    config = FitConfig(steps=total, learning_rate=lr, warmup_steps=warmup, schedule="polynomial", lr_power=power,
                       lr_end=lr_end)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 4e-4}], lr=lr)
    scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, lr_end=lr_end, power=power)
    for step in range(total + 2):
        want = _polynomial64(step, lr=lr, warmup=warmup, total=total, power=power, lr_end=lr_end)
        unet, text = (group["lr"] for group in optimizer.param_groups)
        assert config.lr_at(step, lr) == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert lr_at(step, base_lr=lr, schedule="polynomial", warmup_steps=warmup, total_steps=total, power=power,
                     min_lr=lr_end) == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert config.lr_at(step, lr) == pytest.approx(unet, rel=1e-12, abs=1e-18)
        # the text encoder's group: the same factor times its own LR (diffusers' LambdaLR, kohya's groups)
        assert config.lr_at(step, 4e-4) == pytest.approx(text, rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_polynomial_config_is_checked():
    with pytest.raises(ValueError, match="lr_end must be >= 0 and below learning_rate"):
        FitConfig(schedule="polynomial", learning_rate=1e-4, lr_end=1e-4)
    with pytest.raises(ValueError, match="lr_power must be a finite number"):
        FitConfig(schedule="polynomial", lr_power=-1.0)


# ------------------------------------------------------------------------------ end to end
_SMALL = ("--batch-size", "1", "--resolution", "16")  # (one 16-px image a step: the options act on steps, not pixels)

def test_train_rotation_end_state_first_samples_polynomial_and_modelspec_then_resume(three_shapes, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 2\n")
    out = tmp_path / "o.safetensors"
    assert main(lora_train_args(three_shapes, *_SMALL, "--steps", "10", "--save-every-n-steps", "2",
                       "--save-last-n-steps", "3", "--save-state-on-train-end", "--sample-prompts", prompts, "--sample-at-first",
                       "--lr", "3e-3", "--lr-warmup-steps", "2", "--lr-scheduler", "polynomial", "--lr-scheduler-power", "2",
                       "--lr-scheduler-args", "lr_end=1e-5", "--metadata-title", "Red circles", "--metadata-author", "me",
                       "--metadata-description", "a test", "--metadata-license", "CC0", "--metadata-tags", "red,circle",
                       "-o", out)) == 0
    err = capsys.readouterr().err
    periodic = sorted(p.name for p in tmp_path.glob("o-step*.safetensors"))
    assert periodic == ["o-step000006.safetensors", "o-step000008.safetensors"]   # 2 and 4 removed (kohya's rule)
    assert "step 6: removed " in err and "o-step000002.safetensors (--save-last-n-steps)" in err
    assert "step 8: removed " in err and out.exists()
    assert sorted(p.name for p in (tmp_path / "o-samples").iterdir()) == ["step000000-00.png", "step000010-00.png"]
    state = tmp_path / "o-state"
    record = json.loads((state / "run.json").read_text())
    assert record["step"] == 10 and "--save-state-on-train-end" in err           # the state after the last step
    assert [(s["kind"], s["number"]) for s in record["periodic_saves"]] == [("step", 6), ("step", 8)]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert {k: meta[f"modelspec.{k}"] for k in ("title", "author", "description", "license", "tags")} == {
        "title": "Red circles", "author": "me", "description": "a test", "license": "CC0", "tags": "red,circle"}
    assert meta["ss_lr_scheduler"] == "polynomial"
    with open(tmp_path / "o-log.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    want = [_polynomial64(s, lr=3e-3, warmup=2, total=10, power=2.0, lr_end=1e-5) for s in range(10)]
    assert rates == pytest.approx(want, rel=1e-5)
    # resumed to 14 steps: the rotation continues over the first run's saves (6 and 8 go at step 12)
    assert main(lora_train_args(three_shapes, *_SMALL, "--steps", "14", "--save-every-n-steps", "2",
                       "--save-last-n-steps", "3", "--sample-prompts", prompts, "--sample-at-first", "--lr", "3e-3",
                       "--lr-warmup-steps", "2",
                       "--lr-scheduler", "polynomial", "--lr-scheduler-power", "2", "--lr-scheduler-args", "lr_end=1e-5",
                       "-o", out, "--overwrite", "--resume", state)) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("o-step*.safetensors")) == ["o-step000012.safetensors"]
    assert "not sampled again when resuming" in err
    assert not (tmp_path / "o-samples" / "step000010-01.png").exists()
    assert [s["number"] for s in json.loads((state / "run.json").read_text())["periodic_saves"]] == [12]


def test_epoch_rotation_and_save_n_epoch_ratio_from_a_kohya_toml(three_shapes, tmp_path, capsys):
    config = tmp_path / "kohya.toml"
    out = tmp_path / "e.safetensors"
    # 3 images, batch 3 (a step a bucket: the saves count epochs, not steps); 7 epochs / ratio 3 -> every 2 epochs
    # (saves at 2, 4, 6); keep the last 2
    config.write_text("[training_arguments]\nmax_train_epochs = 7\ntrain_batch_size = 3\nresolution = 16\n"
                      "save_n_epoch_ratio = 3\n"
                      "save_every_n_epochs = 5\nsave_last_n_epochs = 2\nsave_last_n_epochs_state = 1\n"
                      "save_last_n_steps_state = 4\nno_half_vae = true\nmem_eff_save = true\nconsole_log_level = 'INFO'\n"
                      "ddp_timeout = 30\nlr_scheduler_type = ''\nhuggingface_repo_id = ''\n")
    assert main(["train", "lora", "--images", str(three_shapes), "--no-prior", "--config", str(config), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("e-epoch*.safetensors")) == ["e-epoch0004.safetensors", "e-epoch0006.safetensors"]
    assert "e-epoch0002.safetensors (--save-last-n-epochs)" in err
    assert "--save-n-epoch-ratio 3 replaces --save-every-n-epochs 5" in err
    for key in ("save_last_n_epochs_state", "save_last_n_steps_state", "no_half_vae", "mem_eff_save", "console_log_level"):
        assert f"config: ignored {key} (" in err
    assert "ddp_timeout" not in err  # (read: the process group's timeout under torchrun, unused in one process)
    assert "float32" in err                                      # no_half_vae's reason


@pytest.mark.parametrize("key, value, message", [
    ("huggingface_repo_id", "'me/model'", "uploads nothing"),
    ("async_upload", "true", "uploads nothing"),
    ("save_state_to_huggingface", "true", "uploads nothing"),
    ("resume_from_huggingface", "true", "downloads nothing"),
    ("lr_scheduler_type", "'no_such_package_xyz.Schedule'", "cannot import no_such_package_xyz"),
    ("lr_scheduler_type", "'LambdaLR'", "Python function (lr_lambda)"),
    ("lr_scheduler_args", "['power=2']", "--lr-scheduler-power"),
    ("lr_scheduler_args", "['T_max=100']", "not an argument of --lr-scheduler cosine"),
    ("lr_scheduler_args", "['lr_end=1']", "must be below --learning-rate 0.001"),
    ("save_last_n_steps", "0", "--save-last-n-steps must be a whole number >= 1"),
    ("save_n_epoch_ratio", "1.5", "--save-n-epoch-ratio must be a whole number >= 1"),
    ("lr_scheduler_power", "-1.0", "--lr-scheduler-power must be a finite number >= 0"),
    ("sample_at_first", "true", "--sample-at-first needs --sample-prompts"),
    ("metadata_tags", "['a', 'b']", "--metadata-tags must be text"),
])
def test_refusals_name_the_option_before_training(three_shapes, tmp_path, capsys, key, value, message):
    config = tmp_path / "k.toml"
    scheduler = "lr_scheduler = 'polynomial'\nlearning_rate = 1e-3\n" if "lr_end" in value else ""
    config.write_text(f"{scheduler}{key} = {value}\n")
    assert main(lora_train_args(three_shapes, "--config", config, "--steps", "1", "-o", tmp_path / "x.safetensors")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_options_without_what_they_act_on_are_notes(three_shapes, tmp_path, capsys):
    assert main(lora_train_args(three_shapes, *_SMALL, "--steps", "2", "--save-last-n-steps", "3", "--save-last-n-epochs", "1",
                       "--lr-scheduler-power", "2", "-o", tmp_path / "n.safetensors")) == 0
    err = capsys.readouterr().err
    assert "--save-last-n-steps 3: not used without --save-every-n-steps" in err
    assert "--save-last-n-epochs 1: not used without --save-every-n-epochs" in err
    assert "--lr-scheduler-power 2.0: not used by --lr-scheduler cosine" in err


def test_remove_save_handles_files_folders_and_missing_paths(tmp_path):
    from sdadapt.jobs.save_rotation import remove_save

    file = tmp_path / "a.safetensors"
    file.write_bytes(b"x")
    folder = tmp_path / "diffusers-step000002"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"y")
    assert remove_save(file) and remove_save(folder)
    assert not remove_save(tmp_path / "gone.safetensors")
    assert list(tmp_path.iterdir()) == []                     # nothing renamed aside is left
    # a folder of the same name written again beside an earlier removal's leftover, and a link to a
    # user's folder: the save goes, the leftover and the linked folder stay untouched
    (folder / "unet").mkdir(parents=True)
    leftover = tmp_path / f"{folder.name}.removing-1"
    (leftover / "keep").mkdir(parents=True)
    user = tmp_path / "user-folder"
    (user / "w").mkdir(parents=True)
    link = tmp_path / "linked-step000004"
    link.symlink_to(user, target_is_directory=True)
    assert remove_save(folder) and remove_save(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "user-folder"]
    assert (leftover / "keep").is_dir() and (user / "w").is_dir()


def test_sample_at_first_changes_no_training_draw(three_shapes, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --s 2\n")
    plain, first = tmp_path / "plain.safetensors", tmp_path / "first.safetensors"
    assert main(lora_train_args(three_shapes, *_SMALL, "--steps", "3", "--sample-prompts", prompts, "-o", plain, "-q")) == 0
    assert main(lora_train_args(three_shapes, *_SMALL, "--steps", "3", "--sample-prompts", prompts, "--sample-at-first",
                                "-o", first, "-q")) == 0
    assert (tmp_path / "first-samples" / "step000000-00.png").exists()
    assert not (tmp_path / "plain-samples" / "step000000-00.png").exists()
    with safe_open(str(plain), "pt") as a, safe_open(str(first), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is not iterable)
