"""``python -m sdadapt train`` with kohya's validation options: the split, the log columns, metadata, resume."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors import safe_open
from train_inputs import captioned_pngs

from sdadapt.cli import main
from sdadapt.jobs import TrainOptions, run_train
from sdadapt.training.validation import VALIDATION_COLUMNS, split_for_validation


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def eight_images(tmp_path):
    """Two kohya subsets: 10_red (5 images) and 2_blue (3 images), 32x32."""
    root = tmp_path / "imgs"
    root.mkdir()
    captioned_pngs(root / "10_red", [(32, 32)] * 5, caption="a red circle")
    captioned_pngs(root / "2_blue", [(32, 32)] * 3, caption="a blue square")
    return root


def test_a_kohya_toml_with_validation_options_trains_and_logs_the_loss(eight_images, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'train_data_dir = "{eight_images.as_posix()}"\nmax_train_steps = 4\ntrain_batch_size = 2\n'
                      'validation_split = 0.4\nvalidation_seed = 7\nvalidate_every_n_steps = 3\n'
                      'max_validation_steps = 1\nlog_with = "csv"\n')
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--config", str(config), "--model", "toy", "--no-prior", "-o", str(out), "-q"]) == 0
    assert "validation loss (3 held-out images): " in capsys.readouterr().out
    rows = _rows(tmp_path / "l-log.csv")
    assert list(rows[0])[-2:] == list(VALIDATION_COLUMNS)
    # step 3 by steps; the last step (4) ends the run's last epoch (every epoch, kohya's default)
    by_step = [r["step"] for r in rows if r["validation_step_loss"]]
    by_epoch = [r["step"] for r in rows if r["validation_epoch_loss"]]
    assert by_step == ["3"] and "4" in by_epoch and all(float(r["validation_step_loss"]) > 0 for r in rows
                                                         if r["validation_step_loss"])
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_validation_split"] == "0.4" and meta["ss_validation_seed"] == "7"
    assert meta["ss_validate_every_n_steps"] == "3" and meta["ss_max_validation_steps"] == "1"
    assert meta["ss_validate_every_n_epochs"] == "None"
    # each subset split by kohya's rule: red keeps ceil(5 × 0.6) = 3, blue ceil(3 × 0.6) = 2: 3 held out
    assert meta["ss_num_validation_images"] == "3"
    assert meta["ss_num_train_images"] == str(3 * 10 + 2 * 2)  # repeats apply to the training images only


def test_the_held_out_images_are_kohyas_draw_and_never_train(eight_images, tmp_path, monkeypatch):
    import sdadapt.jobs.train as train_job

    seen = {}
    real = train_job.fit

    def spying(system, adaptation, dataset, *args, validation=None, **kwargs):
        seen["train"] = [(str(r.path), r.repeats) for r in dataset.records]
        seen["held"] = [(str(r.path), r.repeats) for r in validation.records]
        return real(system, adaptation, dataset, *args, validation=validation, **kwargs)

    monkeypatch.setattr(train_job, "fit", spying)
    result = run_train("lora", TrainOptions(images=str(eight_images), model="toy", steps=2, batch_size=2, prior=False,
                                            validation_split=0.4, validation_seed=7, log_with="csv",
                                            out=str(tmp_path / "a.safetensors")))
    assert result["validation_images"] == 3 and result["images"] == 5
    assert [s for s, _ in result["validation_losses"]] == [2]  # the last step ends the run's epoch
    expected_held = []
    for folder, repeats in (("10_red", 10), ("2_blue", 2)):  # kohya's split_train_val per subset, seed 7
        train, held = split_for_validation([str(p) for p in (eight_images / folder).glob("*.png")], split=0.4, seed=7)
        assert sorted((p, repeats) for p in train) == sorted(t for t in seen["train"] if folder in t[0])
        expected_held += [(p, 1) for p in held]  # repeats do not apply to held-out images
    assert sorted(seen["held"]) == sorted(expected_held)
    assert not {p for p, _ in seen["train"]} & {p for p, _ in seen["held"]}


def test_resume_checks_the_split(eight_images, tmp_path):
    common = {"images": str(eight_images), "model": "toy", "batch_size": 2, "prior": False, "log_with": "csv",
              "out": str(tmp_path / "r.safetensors")}
    run_train("lora", TrainOptions(**common, steps=3, save_every_n_steps=2, validation_split=0.4))
    state = tmp_path / "r-state"
    record = json.loads((state / "run.json").read_text())
    assert record["validation"] == {"validation_split": 0.4, "validation_seed": 0}
    with pytest.raises(ValueError, match="validation_split 0.4 \\(now 0.2\\)"):
        run_train("lora", TrainOptions(**common, steps=3, validation_split=0.2, resume=str(state), overwrite=True))
    with pytest.raises(ValueError, match="validation_seed 0 \\(now 5\\)"):
        run_train("lora", TrainOptions(**common, steps=3, validation_split=0.4, validation_seed=5, resume=str(state),
                                       overwrite=True))
    resumed = run_train("lora", TrainOptions(**common, steps=3, validation_split=0.4, resume=str(state), overwrite=True))
    assert resumed["resumed_from"] == 2 and [s for s, _ in resumed["validation_losses"]] == [3]


@pytest.mark.parametrize("options, words", [
    ({"validation_split": 1.0}, r"--validation-split must be in \[0, 1\)"),
    ({"validation_split": -0.1}, r"--validation-split must be in \[0, 1\)"),
    ({"validate_every_n_steps": 0}, "--validate-every-n-steps must be an integer >= 1"),
    ({"validate_every_n_epochs": 0}, "--validate-every-n-epochs must be an integer >= 1"),
    ({"max_validation_steps": -2}, "--max-validation-steps must be an integer >= 1"),
])
def test_bad_values_are_refused(tmp_path, options, words):
    with pytest.raises(ValueError, match=words):
        TrainOptions(images=str(tmp_path), **options)


def test_a_split_that_holds_out_nothing_is_refused(tmp_path):
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 2)
    with pytest.raises(ValueError, match="holds out no image"):
        run_train("lora", TrainOptions(images=str(images), model="toy", steps=1, batch_size=1, prior=False,
                                       validation_split=0.3, out=str(tmp_path / "n.safetensors")))


def test_a_dataset_toml_sets_the_split_at_its_dataset_level(eight_images, tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nvalidation_seed = 7\n[[datasets]]\nresolution = 32\nbatch_size = 2\n'
                    f'validation_split = 0.4\n[[datasets.subsets]]\nimage_dir = "{(eight_images / "10_red").as_posix()}"\n'
                    f'num_repeats = 3\ncaption_extension = ".txt"\n')
    result = run_train("lora", TrainOptions(dataset_config=str(toml), model="toy", steps=1, prior=False, log_with="csv",
                                            out=str(tmp_path / "t.safetensors")))
    assert result["validation_images"] == 2 and result["images"] == 3


def test_tensorboard_gets_kohyas_validation_tags(tmp_path, tensorboard_scalars):
    from sdadapt.training.monitor import RunLog
    from sdadapt.training.validation import validation_columns

    scalars = tensorboard_scalars
    with RunLog(tmp_path / "log.csv", tensorboard=tmp_path / "tb", extra=VALIDATION_COLUMNS) as log:
        log.step(3, 1, 0.5, 1e-4, validation_columns(0.25, ("step", "epoch")))
        log.step(4, 1, 0.5, 1e-4, validation_columns(None, ()))
    assert scalars[2:] == [("loss/validation/step_average", 0.25, 3), ("loss/validation/epoch_average", 0.25, 3),
                           ("loss", 0.5, 4), ("lr", 1e-4, 4)]
    rows = _rows(tmp_path / "log.csv")
    assert rows[0]["validation_step_loss"] == rows[0]["validation_epoch_loss"] == "0.25"
    assert rows[1]["validation_step_loss"] == rows[1]["validation_epoch_loss"] == ""


def test_a_dataset_tomls_class_images_are_balanced_against_the_images_left_to_train(eight_images, tmp_path, monkeypatch):
    """kohya splits each subset before it counts num_train_images, which its is_reg subsets are balanced
    against: 3 of 10_red's 5 images train (× 1 repeat), so 3 class samples an epoch, not 5."""
    import sdadapt.jobs.train as train_job

    captioned_pngs(tmp_path / "reg", [(32, 32)] * 8, caption="a circle")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 1\nvalidation_split = 0.4\nvalidation_seed = 7\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(eight_images / "10_red").as_posix()}"\nnum_repeats = 1\n'
                    f'caption_extension = ".txt"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "reg").as_posix()}"\nis_reg = true\n'
                    f'caption_extension = ".txt"\n')
    seen = {}
    real = train_job.fit

    def spying(system, adaptation, dataset, *args, prior=None, **kwargs):
        seen["train"] = sum(r.repeats for r in dataset.records)
        seen["class"] = sum(r.repeats for r in prior[0].records)
        return real(system, adaptation, dataset, *args, prior=prior, **kwargs)

    monkeypatch.setattr(train_job, "fit", spying)
    run_train("lora", TrainOptions(dataset_config=str(toml), model="toy", steps=1, log_with="csv",
                                   out=str(tmp_path / "b.safetensors")))
    assert seen == {"train": 3, "class": 3}
