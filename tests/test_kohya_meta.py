"""kohya parity leftovers: a resumed run's ``loss/average`` (the mean of its batches; kohya's reads low) and the
bar's ``avr_loss``, a LyCORIS DyLoRA cut's
scale, ``ss_network_alpha`` / ``modelspec.date`` strings, the resumed-position message, the bake's allocations.

Transcribed (not copied) from:

* kohya-ss/sd-scripts@48d368fa ``library/train_util.py:6668-6688`` (``LossRecorder``, in
  ``test_parity_short_steps.KohyaLossRecorder``) and ``train_network.py:1258-1273, 1340-1344, 1405-1419,
  1512-1516`` (the resumed epoch: ``skip_first_batches(dl, r - 1)`` enumerated, its first batch skipped; each
  batch's loss to the recorder, ``avr_loss`` on the bar); ``train_network.py:1022, 1223, 1791-1796``
  (``str(args.network_alpha)``, argparse ``type=float, default=1``), ``library/train_util.py:4746-4761``
  (a TOML's values into the namespace as typed); ``library/sai_model_spec.py:425-427`` (``modelspec.date``);
* KohakuBlueleaf/LyCORIS@f49d30d ``lycoris/modules/dylora.py:97-117`` (``get_weight``, ``get_diff_weight``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_parity_short_steps import KohyaLossRecorder

from sdadapt.training.monitor import LossAverage


# ------------------------------------------------------------------ 1. loss/average of a resumed run
def kohya_resumed_averages(per_epoch: int, initial_step: int, epochs: int, losses: list[float]) -> list[float]:
    """kohya's loop with ``--skip_until_initial_step`` from ``initial_step`` (accumulation 1): the recorder's
    moving average after each batch trained; ``losses[p]`` is the loss of the batch at data position p."""
    recorder = KohyaLossRecorder()
    epoch_to_start = initial_step // per_epoch  # train_network.py:1269 (ceil(len / 1))
    for _ in range(epoch_to_start):  # train_network.py:1340-1344
        initial_step -= per_epoch
    averages = []
    for epoch in range(epoch_to_start, epochs):
        batches = list(range(per_epoch))
        skipped = None
        if initial_step > 0:  # train_network.py:1410-1413
            skipped = batches[initial_step - 1:]
            initial_step = 1
        for step, batch in enumerate(skipped if skipped is not None else batches):
            if initial_step > 0:  # train_network.py:1417-1419
                initial_step -= 1
                continue
            if epoch * per_epoch + batch >= len(losses):  # (max_train_steps reached: kohya's loop breaks)
                return averages
            recorder.add(epoch=epoch, step=step, loss=losses[epoch * per_epoch + batch])
            averages.append(recorder.moving_average)
    return averages


@settings(max_examples=150, deadline=None)
@given(per_epoch=st.integers(1, 6), start=st.integers(0, 20), extra=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_a_resumed_loss_average_is_the_mean_of_the_runs_last_epoch_of_batches(per_epoch, start, extra, seed):
    """From batch 0 the average is kohya's recorder's, float for float; a run resumed at ``start`` averages the
    batches it trained (the last ``per_epoch``), where kohya's recorder reads low (a padded zero, LossAverage)."""
    epochs = (start + extra) // per_epoch + 1
    g = torch.Generator().manual_seed(seed)
    losses = [float(x) for x in torch.rand(epochs * per_epoch, generator=g, dtype=torch.float64)]
    fresh = LossAverage(per_epoch=per_epoch)
    assert [fresh.add([loss]) for loss in losses] == kohya_resumed_averages(per_epoch, 0, epochs, losses)
    average = LossAverage(per_epoch=per_epoch)
    run = losses[start:]
    got = [average.add([loss]) for loss in run]
    want = [math.fsum(run[max(0, i + 1 - per_epoch):i + 1]) / min(i + 1, per_epoch) for i in range(len(run))]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_kohyas_resumed_recorder_reads_half_the_first_loss_and_ours_the_loss():
    """The documented difference: resumed at batch 4 of 3-batch epochs (epoch 1, position 1), kohya's recorder
    gets the batch as index 1 with slot 0 a zero."""
    losses = [0.0] * 4 + [0.8, 0.2]
    assert kohya_resumed_averages(3, 4, 2, losses) == [0.4, pytest.approx(1.0 / 3)]
    average = LossAverage(per_epoch=3)
    assert average.add([0.8]) == 0.8 and average.add([0.2]) == pytest.approx(0.5)


def test_a_resumed_run_logs_and_shows_the_average_of_its_batches(tmp_path, monkeypatch):
    """2 images at batch 1 (2 batches an epoch): a run saves its state after step 3 (epoch 2's first batch), the
    resumed one trains steps 4-5. Its loss/average and the bar's avr_loss are the mean of the batches it trained
    (kohya's recorder would read half the first loss: a padded slot 0, LossAverage)."""
    from train_inputs import captioned_pngs, lora_train_args, record_training

    from sdadapt.cli import main
    from sdadapt.cli import options as cli_options

    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 2)
    common = lora_train_args(images, "--batch-size", "1", "--seed", "3", "--log-with", "csv")
    assert main([*common, "--steps", "3", "--save-state-on-train-end", "-q", "-o", str(tmp_path / "a.safetensors")]) == 0
    batch_losses, logged = record_training(monkeypatch)
    shown = []

    def bar(self, done, total, info=None):
        shown.append((self.info_name, done, total, info))

    monkeypatch.setattr(cli_options.ProgressBar, "__call__", bar)
    assert main([*common, "--steps", "5", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")]) == 0
    want = [batch_losses[0], sum(batch_losses) / 2]
    assert [s for s, _, _ in logged] == [4, 5] and len(batch_losses) == 2
    assert [extra["loss/average"] for _, _, extra in logged] == want
    assert [row for row in shown if row[0] == "avr_loss"] == [("avr_loss", 4, 5, want[0]), ("avr_loss", 5, 5, want[1])]


# ------------------------------------------------------------------ 2. the bar's label
def test_the_bar_names_its_number(capsys):
    from sdadapt.cli.options import ProgressBar

    bar = ProgressBar("lora", unit="step", use_tqdm=False, min_interval=0.0, info_name="avr_loss")
    bar(1, 2, 0.25)
    bar(2, 2, 0.125)
    err = capsys.readouterr().err
    assert "avr_loss=0.25" in err and "avr_loss=0.125" in err and "loss 0" not in err.replace("avr_loss", "")
    pytest.importorskip("tqdm")
    bar = ProgressBar("lora", unit="step", info_name="avr_loss")
    bar(2, 2, 0.25)
    assert "avr_loss=0.25" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. a LyCORIS DyLoRA cut
def lycoris_get_diff_weight(up_list, down_list, alpha, rank, block_size):
    """LyCORIS' ``get_weight(rank)`` + ``get_diff_weight`` (dylora.py:97-117), multiplier 1, linear."""
    b = math.ceil(rank / block_size)
    down = torch.cat(list(down_list[:b]) + list(down_list[b:b + 1]))
    up = torch.cat(list(up_list[:b]) + list(up_list[b:b + 1]), dim=1)
    scale = alpha / (b + 1)
    return up @ (down * scale)


@pytest.mark.parametrize("block_size, blocks, alpha", [(4, 3, 8.0), (2, 4, 1.0), (1, 5, 3.0)])
def test_a_lycoris_dylora_cut_applies_what_lycoris_trained_at_that_rank(tmp_path, block_size, blocks, alpha):
    from safetensors.torch import load_file, save_file

    from sdadapt.loratools.dylora import dylora_cut

    g = torch.Generator().manual_seed(block_size)
    out_f, in_f, rank = 6, 5, block_size * blocks
    ups = [torch.randn(out_f, block_size, generator=g, dtype=torch.float64) for _ in range(blocks)]
    downs = [torch.randn(block_size, in_f, generator=g, dtype=torch.float64) for _ in range(blocks)]
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state = {f"{name}.lora_up.weight": torch.cat(ups, dim=1).float(),  # (custom_state_dict: the blocks in order)
             f"{name}.lora_down.weight": torch.cat(downs).float(), f"{name}.alpha": torch.tensor(alpha)}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"algo": "dylora", "block_size": str(block_size)})}
    save_file(state, str(tmp_path / "dy.safetensors"), meta)
    for k in range(1, blocks + 1):
        r = k * block_size
        out = dylora_cut(tmp_path / "dy.safetensors", tmp_path / f"cut{r}.safetensors", rank=r)
        cut = load_file(str(out))
        up, down, cut_alpha = (cut[f"{name}.{s}"].double() for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        as_lora = up @ down * (float(cut_alpha) / r)  # what every LoRA loader applies
        # the rank-r network LyCORIS trained: get_random_rank_weight's get_weight((k - 1) · block_size)
        trained = lycoris_get_diff_weight([u.float().double() for u in ups], [d.float().double() for d in downs],
                                          alpha, (k - 1) * block_size, block_size)
        torch.testing.assert_close(as_lora, trained, rtol=1e-12, atol=1e-12)
        assert cut[f"{name}.alpha"].dtype == torch.float32
        with open(out, "rb"):
            from sdadapt.formats.files import read_safetensors_header

            assert read_safetensors_header(out)[1]["ss_network_alpha"] == str(alpha * block_size)


def test_a_kohya_dylora_cut_keeps_alpha(tmp_path):
    """kohya's extract_lora_from_dylora.py keeps alpha (scale alpha / r): unchanged."""
    from safetensors.torch import load_file, save_file

    from sdadapt.loratools.dylora import dylora_cut

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state = {f"{name}.lora_up.weight": torch.randn(6, 8), f"{name}.lora_down.weight": torch.randn(8, 5),
             f"{name}.alpha": torch.tensor(4.0)}
    save_file(state, str(tmp_path / "dy.safetensors"),
              {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "4"})})
    cut = load_file(str(dylora_cut(tmp_path / "dy.safetensors", tmp_path / "c.safetensors", rank=4)))
    assert float(cut[f"{name}.alpha"]) == 4.0


# ------------------------------------------------------------------ 4. metadata strings
def kohya_network_alpha_text(*, command_line: str | None = None, toml_value=None) -> str:
    """``str(args.network_alpha)`` as kohya's parser and config reader produce it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--network_alpha", type=float, default=1)
    namespace = argparse.Namespace(**({} if toml_value is None else {"network_alpha": toml_value}))
    argv = [] if command_line is None else ["--network_alpha", command_line]
    return str(parser.parse_args(argv, namespace=namespace).network_alpha)


@pytest.mark.parametrize("given", [dict(command_line="2"), dict(command_line="0.5"), dict(command_line="16"),
                                   dict(toml_value=2), dict(toml_value=2.0), dict(toml_value=0.25),
                                   dict(command_line="4", toml_value=8)])
def test_ss_network_alpha_is_kohyas_str_of_the_value_given(given):
    from sdadapt.cli.train import _kohya_alpha_text

    raw = given.get("command_line", given.get("toml_value"))  # (a flag wins over the config, as in both tools)
    assert _kohya_alpha_text(raw) == kohya_network_alpha_text(**given)
    assert kohya_network_alpha_text() == "1"  # (the default: what a kohya config leaving it out records)
    assert _kohya_alpha_text(None) is None and _kohya_alpha_text(True) is None


def test_generated_alpha_and_date_are_kohyas():
    from sdadapt.formats.kohya import kohya_metadata, modelspec_date

    for stamp in (0.0, 1_700_000_000.75, 1_234_567_890.2):
        assert modelspec_date(stamp) == datetime.datetime.fromtimestamp(int(stamp)).isoformat()  # sai_model_spec.py:425-427
    unet = {"down_blocks.0.attentions.0.proj_in.lora_down.weight": torch.zeros(4, 8),
            "down_blocks.0.attentions.0.proj_in.lora_up.weight": torch.zeros(8, 4),
            "down_blocks.0.attentions.0.proj_in.alpha": torch.tensor(4.0)}
    meta = kohya_metadata({"unet": unet}, title="x")
    assert meta["ss_network_alpha"] == str(float(4)) == "4.0"  # extract_lora_from_models.py:253
    date = meta["modelspec.date"]
    assert datetime.datetime.fromisoformat(date).tzinfo is None and len(date) == 19 and "+" not in date


# ------------------------------------------------------------------ 6. the resumed-position message
def _state(step, micro):
    from types import SimpleNamespace

    return SimpleNamespace(step=step, micro_step=micro)


def test_the_resumed_position_message_names_the_real_cause():
    from sdadapt.methods.fit import _check_resumed_position, micro_batches_of_step

    expected = micro_batches_of_step(4, accumulation=2, per_epoch=5).start  # 4 steps of 5-batch epochs at A = 2
    _check_resumed_position("s", _state(4, expected), expected, accumulation=2, per_epoch=5,
                            saved={"batches_per_epoch": 5})  # (where it should be: nothing)
    with pytest.raises(ValueError, match="had 7 batches an epoch") as info:
        _check_resumed_position("s", _state(4, 8), expected, accumulation=2, per_epoch=5, saved={"batches_per_epoch": 7})
    assert "older sdadapt" not in str(info.value)
    with pytest.raises(ValueError, match="--gradient-accumulation-steps 4; resume with the same"):
        _check_resumed_position("s", _state(4, 16), expected, accumulation=2, per_epoch=5,
                                saved={"config": {"accumulation_steps": 4}, "batches_per_epoch": 5})
    # a state from before batches_per_epoch was recorded: 6 batches after 4 steps is no older sdadapt's 4 · 2
    with pytest.raises(ValueError, match="batches an epoch changed since the save") as info:
        _check_resumed_position("s", _state(4, 6), expected, accumulation=2, per_epoch=5, saved={})
    assert "older sdadapt" not in str(info.value)
    with pytest.raises(ValueError, match="either the number of batches an epoch changed .* or .* older sdadapt"):
        _check_resumed_position("s", _state(4, 8), expected, accumulation=2, per_epoch=5, saved={})


# ------------------------------------------------------------------ 5. one allocation per delta
@pytest.mark.parametrize("family", ["loha", "lokr", "loha_tucker"])
def test_loha_and_lokr_deltas_allocate_what_they_return_and_no_more(family, monkeypatch):
    """Without autograd the product is made in the first factor's buffer and scaled in place: the result is
    one of the tensors the matmul / kron allocated (no extra tensor of the delta's size), bit for bit
    ``a * b * scale`` / ``kron * scale``; with autograd the same values and gradients."""
    from sdadapt.adapters import lokr as lokr_module
    from sdadapt.adapters.loha import loha_delta_weight
    from sdadapt.adapters.lokr import lokr_delta_weight

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if family == "lokr":
        w1, w2 = r(4, 3), r(5, 6, 3, 3)
        made = []
        real = torch.kron
        monkeypatch.setattr(lokr_module.torch, "kron", lambda a, b: made.append(real(a, b)) or made[-1])
        with torch.no_grad():
            delta = lokr_delta_weight(w1, w2, 0.3)
        assert delta.data_ptr() == made[0].data_ptr()
        assert torch.equal(delta, real(w1.reshape(4, 3, 1, 1), w2) * 0.3)
        return
    if family == "loha":
        factors, kw = (r(6, 3), r(3, 10), r(6, 3), r(3, 10)), {}
        ref = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7
    else:
        factors, kw = (r(3, 6), r(3, 4), r(3, 6), r(3, 4)), {"t1": r(3, 3, 3, 3), "t2": r(3, 3, 3, 3), "kernel": (3, 3)}
        from sdadapt.adapters.tucker import rebuild_tucker

        ref = rebuild_tucker(kw["t1"], factors[0], factors[1]) * rebuild_tucker(kw["t2"], factors[2], factors[3]) * 0.7
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewTensors(TorchDispatchMode):
        """Counts the ops that return a new tensor of the delta's size (not a view, not in place)."""

        def __init__(self, numel):
            super().__init__()
            self.numel, self.count = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == self.numel and not func.is_view \
                    and not func._schema.is_mutable:
                self.count += 1
            return out

    counter = NewTensors(ref.numel())
    with torch.no_grad(), counter:
        delta = loha_delta_weight(*factors, 0.7, **kw)
    assert torch.equal(delta, ref.reshape(delta.shape))
    if family == "loha":
        assert counter.count == 2  # (the two matmuls: the product and the scale in place; before, four)
    leaves = [f.clone().requires_grad_() for f in factors]
    delta = loha_delta_weight(*leaves, 0.7, **kw)
    upstream = torch.randn(delta.shape, generator=g)
    grads = torch.autograd.grad(delta, leaves, upstream)
    leaves2 = [f.clone().requires_grad_() for f in factors]
    if family == "loha":
        ref = (leaves2[0] @ leaves2[1]) * (leaves2[2] @ leaves2[3]) * 0.7
    else:
        ref = rebuild_tucker(kw["t1"], leaves2[0], leaves2[1]) * rebuild_tucker(kw["t2"], leaves2[2], leaves2[3]) * 0.7
    for a, b in zip(grads, torch.autograd.grad(ref.reshape(delta.shape), leaves2, upstream)):
        assert torch.equal(a, b)


def test_a_full_delta_working_copy_hands_its_float32_diff_over_and_its_bias_copies_no_diff():
    from sdadapt.adapters.base import LayerGeometry
    from sdadapt.adapters.registry import adapter_from_file_tensors, adapter_layer_delta, adapter_working_copy

    g = torch.Generator().manual_seed(1)
    tensors = {"diff": torch.randn(8, 6, generator=g).half(), "diff_b": torch.randn(8, generator=g).half()}
    module = adapter_from_file_tensors(LayerGeometry.from_weight_shape((8, 6), has_bias=True), tensors, name="x")
    kept = {k: (v.data_ptr(), v.dtype) for k, v in module.named_parameters()}
    copy = adapter_working_copy(module, torch.float32, consumable=True)
    converted = copy.diff.data_ptr()
    delta, bias = adapter_layer_delta(copy, scale=0.8, dtype=torch.float32, name="x")
    assert delta.data_ptr() == converted and copy.diff is None  # (the copy's float32 diff, scaled in place)
    assert torch.equal(delta, tensors["diff"].float() * torch.tensor(0.8)) and torch.equal(bias, tensors["diff_b"].float() * 0.8)
    with pytest.raises(RuntimeError, match="handed over"):
        copy.delta_weight()
    vectors = adapter_working_copy(module, torch.float32, vectors_only=True)
    assert vectors.diff is module.diff and vectors.diff_b.dtype == torch.float32  # (no float32 copy of diff)
    _, bias = adapter_layer_delta(vectors, scale=0.8, dtype=torch.float32, name="x", weight=False)
    assert torch.equal(bias, tensors["diff_b"].float() * torch.tensor(0.8)) and module.diff.dtype == torch.float16
    assert {k: (v.data_ptr(), v.dtype) for k, v in module.named_parameters()} == kept  # (the kept module untouched)
    # a float32 file: the working copy shares diff with the module, so it is not handed over
    module32 = adapter_from_file_tensors(LayerGeometry.from_weight_shape((8, 6)), {"diff": torch.randn(8, 6)}, name="y")
    before = module32.diff.detach().clone()
    delta, _ = adapter_layer_delta(adapter_working_copy(module32, torch.float32, consumable=True), scale=0.5,
                                   dtype=torch.float32, name="y")
    assert torch.equal(module32.diff, before) and delta.data_ptr() != module32.diff.data_ptr()
