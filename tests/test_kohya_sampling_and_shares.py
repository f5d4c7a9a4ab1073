"""Two kohya behaviours of ``train``: ``--lr-warmup-steps 10%`` (kohya's ``int_or_float``) and
``--sample-every-n-epochs`` replacing ``--sample-every-n-steps`` (kohya's ``sample_images_common``).

kohya-ss/sd-scripts@48d368fa library/train_util.py:3664-3676 (``int_or_float``: ``"N%"`` -> N/100)
and :6379-6391 (``if args.sample_every_n_epochs is not None: ... ignore sample_every_n_steps``)."""

from __future__ import annotations

import argparse

import pytest
from kohya_arguments import int_or_float
from train_inputs import lora_train_args

from sdadapt.cli import build_parser, main
from sdadapt.cli.train import steps_or_share


@pytest.mark.parametrize("text", ["10%", "5.5%", "0%", "0.25", "0", "100", "7"])
def test_warmup_steps_read_as_kohya_reads_them(text):
    ours = steps_or_share(text)
    assert ours == int_or_float(text)
    args = build_parser().parse_args(["train", "lora", "--images", "x", "--lr-warmup-steps", text, "--lr-decay-steps", text])
    assert args.lr_warmup_steps == ours and args.lr_decay_steps == ours


@pytest.mark.parametrize("text", ["100%", "150%", "-1", "-3%", "x%", "nan", "ten"])
def test_bad_warmup_steps_are_refused_naming_the_forms(text):
    with pytest.raises(argparse.ArgumentTypeError, match="percentage"):
        steps_or_share(text)


def _kohya_sample_steps(total_steps: int, steps_per_epoch: int, every_steps, every_epochs) -> list[int]:
    """The steps after which kohya's loop samples (train_network.py calls sample_images at every step with
    epoch=None and at every epoch's end with the epoch; sample_images_common decides), transcribed."""
    points = []
    for step in range(1, total_steps + 1):
        for epoch in ([None, step // steps_per_epoch] if step % steps_per_epoch == 0 else [None]):
            if every_steps is None and every_epochs is None:
                continue
            if every_epochs is not None:
                if epoch is None or epoch % every_epochs != 0:
                    continue
            elif step % every_steps != 0 or epoch is not None:
                continue
            points.append(step)
    return points


def test_sample_every_n_epochs_replaces_the_step_period(three_shapes, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle --d 1\n")
    out = tmp_path / "o.safetensors"
    # 3 images at batch 1: 3 steps an epoch, 2 epochs; the step period alone would sample after steps 1..6
    argv = [*lora_train_args(three_shapes, "--epochs", "2", "--sample-prompts", tmp_path / "prompts.txt",
                             "--sample-every-n-steps", "1", "--sample-every-n-epochs", "1", "--rank", "2", "-o", out)]
    argv[argv.index("--batch-size") + 1] = "1"
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "--sample-every-n-steps 1: not used" in err
    written = sorted(p.name for p in (tmp_path / "o-samples").iterdir())
    expected = _kohya_sample_steps(6, 3, 1, 1)
    assert expected == [3, 6]
    assert written == [f"step{s:06d}-00.png" for s in expected]
