"""Four small gaps closed: output folders made on demand, per-subset ``alpha_mask``, the toy's
image-word ids on the device (tests/test_condition_device_copies.py), schedule-free mode switches
atomic with respect to Ctrl-C."""

from __future__ import annotations

import gc
import importlib
import signal
from pathlib import Path

import pytest
import torch
from train_inputs import lora_train_args, toy_kohya_toml

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.fit import make_optimizer
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.schedule_free import AdamWScheduleFree, switch_mode

_SCHEDULE_FREE = importlib.import_module("sdadapt.training.schedule_free")


# ----------------------------------------------------------------- output folders made on demand
def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_kohya_output_dir_that_does_not_exist_is_made_and_trained_into(three_shapes, tmp_path, capsys):
    """kohya's train_network.py: os.makedirs(args.output_dir, exist_ok=True). The folder (two levels
    missing) is made and holds the LoRA, the log and the step save; the same TOML refused (an
    option check) leaves no folder behind."""
    out = tmp_path / "runs" / "new"
    config = toy_kohya_toml(tmp_path, three_shapes, {"output_dir": str(out), "save_every_n_steps": 1})
    (tmp_path / "refused").mkdir()
    refused = toy_kohya_toml(tmp_path / "refused", three_shapes, {"output_dir": str(out), "full_fp16": True,
                                                                    "mixed_precision": "no"})
    assert main(["train", "lora", "--config", str(refused), "--no-prior", "-q"]) != 0
    assert "--mixed-precision fp16" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["train", "lora", "--config", str(config), "--no-prior", "-q"]) == 0, capsys.readouterr().err
    assert {"kohya.safetensors", "kohya-step000001.safetensors", "kohya-log.csv"} <= set(_tree(out))
    import sdadapt

    assert sdadapt.load_lora(out / "kohya.safetensors")[1]["ss_output_name"] == "kohya"


def test_train_o_into_a_missing_folder_makes_it_only_when_the_run_is_accepted(three_shapes, tmp_path, capsys):
    missing = tmp_path / "missing" / "dir" / "x.safetensors"
    for bad in (["--steps", "0"], ["--resolution", "30"], ["--optimizer", "sophia"]):
        assert main(lora_train_args(three_shapes, "--steps", "1", "-o", missing, *bad)) != 0
        assert not (tmp_path / "missing").exists(), bad
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", blocker / "x.safetensors")) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a file, not a folder" in last and "step/s" not in last
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", missing, "-q")) == 0  # accepted: made
    assert {"x.safetensors", "x-log.csv"} <= set(_tree(missing.parent))


def test_generate_combine_and_invert_make_a_missing_output_folder(three_shapes, tmp_path, capsys):
    """The other commands that write files (through the one atomic writer) make the folder too, and
    make nothing when refused."""
    lora = tmp_path / "a.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "1", "-o", lora, "-q")) == 0
    combined = tmp_path / "c" / "d" / "both.safetensors"
    assert main(["combine-loras", str(lora), str(lora), "-o", str(combined), "-q"]) == 0, capsys.readouterr().err
    assert combined.is_file()
    image = tmp_path / "g" / "h" / "img.png"
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "2", "-o", str(image), "-q",
                 "--lora", str(lora)]) == 0, capsys.readouterr().err
    assert image.is_file()
    assert main(["generate", "--model", "toy", "--prompt", " ", "-o", str(tmp_path / "n" / "x.png"), "-q"]) != 0
    assert not (tmp_path / "n").exists()
    inverted = tmp_path / "i" / "j" / "inv.png"
    assert main(["invert", str(three_shapes / "2.png"), "--prompt", "a red circle", "--method", "ddim", "--steps", "2",
                 "-o", str(inverted), "-q"]) == 0, capsys.readouterr().err
    assert {"inv.png"} <= set(_tree(inverted.parent))


# ------------------------------------------------------------------- schedule-free switch vs Ctrl-C
@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Python's own SIGINT handler (a ``KeyboardInterrupt``) during each test, whatever the runner set,
    and no cyclic garbage collection meanwhile: Python runs a signal's handler at the next bytecode of the
    main thread, and a collection runs Python code of its own — ``gc.callbacks`` (hypothesis installs one
    for its timing, in every worker that ran a hypothesis test) and finalizers — where a
    ``KeyboardInterrupt`` is printed as "Exception ignored" and lost (seen once under load). With the
    collector off and no callbacks, the interrupt can only be raised in the code the test drives."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    collecting, callbacks = gc.isenabled(), list(gc.callbacks)
    gc.disable()
    gc.callbacks.clear()
    try:
        yield
    finally:
        gc.callbacks[:] = callbacks
        if collecting:
            gc.enable()
        signal.signal(signal.SIGINT, before)


def _sigint_after(monkeypatch, name: str, *, calls: int) -> list[int]:
    """Make ``schedule_free.<name>`` (a weight writer) deliver a real SIGINT right after its
    ``calls``-th call (Python's own handler: a ``KeyboardInterrupt`` at the next bytecode)."""
    real = getattr(_SCHEDULE_FREE, name)
    seen = [0]

    def writer(*args, **kwargs):
        out = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == calls:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(_SCHEDULE_FREE, name, writer)
    return seen


def _stepped(foreach: bool) -> tuple[AdamWScheduleFree, list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(4)]
    opt = AdamWScheduleFree([{"params": params[:2]}, {"params": params[2:]}], lr=0.05, betas=(0.8, 0.99), foreach=foreach)
    opt.train()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_sigint_in_the_middle_of_a_switch_is_raised_after_every_group_switched(monkeypatch, mode):
    """The signal arrives after the first parameter of the first group was rewritten: it is raised
    only when all four parameters (two groups) hold the new mode's weights, each group's flag
    flipped — the float64 reference ``lerp(p, z, w)`` — so a second call changes nothing."""
    opt, params = _stepped(foreach=False)
    if mode == "train":
        opt.eval()
    beta1 = 0.8
    weight = 1 - 1 / beta1 if mode == "eval" else 1 - beta1
    expected = [p.detach().double() + weight * (opt.state[p]["z"].double() - p.detach().double()) for p in params]
    seen = _sigint_after(monkeypatch, "_write_weight", calls=1)
    with pytest.raises(KeyboardInterrupt):
        getattr(opt, mode)()
    assert seen[0] == 4  # (without holding: the interrupt after the first of four writes)
    assert [g["train_mode"] for g in opt.param_groups] == [mode == "train"] * 2
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)
    before = [p.detach().clone() for p in params]
    getattr(opt, mode)()  # a no-op now
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_switch_mode_holds_the_signal_for_any_schedule_free_optimiser():
    """A stand-in optimiser whose ``eval()`` is interrupted after its first of two groups:
    through :func:`switch_mode` both groups switch before the ``KeyboardInterrupt``; called bare it
    stops half-way (what the holding prevents)."""

    class HalfInterrupted:
        def __init__(self):
            self.param_groups = [{"train_mode": True}, {"train_mode": True}]

        def eval(self):
            for i, group in enumerate(self.param_groups):
                group["train_mode"] = False
                if i == 0:
                    signal.raise_signal(signal.SIGINT)

    bare = HalfInterrupted()
    with pytest.raises(KeyboardInterrupt):
        bare.eval()
    assert [g["train_mode"] for g in bare.param_groups] == [False, True]
    held = HalfInterrupted()
    with pytest.raises(KeyboardInterrupt):
        switch_mode(held, train=False)
    assert [g["train_mode"] for g in held.param_groups] == [False, False]


def test_switch_mode_to_the_mode_it_is_in_swaps_no_signal_handler(monkeypatch):
    """fit calls ``switch_mode(train=True)`` before every step: in train mode already it must not swap
    the signal handlers (≈40 µs a step); a group left in the other mode still switches."""
    swaps = []
    real_signal = signal.signal
    monkeypatch.setattr(signal, "signal", lambda *a: (swaps.append(a[0]), real_signal(*a))[1])
    opt = AdamWScheduleFree([{"params": [torch.nn.Parameter(torch.ones(3))]}, {"params": [torch.nn.Parameter(torch.ones(2))]}],
                            lr=0.1)
    opt.train()
    swaps.clear()
    switch_mode(opt, train=True)
    opt.train()
    assert swaps == [] and all(g["train_mode"] for g in opt.param_groups)
    opt.param_groups[0]["train_mode"] = False  # (one group in eval mode: the switch runs, held)
    switch_mode(opt, train=True)
    assert swaps and opt.param_groups[0]["train_mode"]


@pytest.mark.parametrize("foreach", [True, False])
def test_ctrl_c_in_fits_train_switch_saves_the_eval_weights(monkeypatch, foreach):
    """fit with AdamWScheduleFree, the weights used (eval) after step 2 as ``train`` does before its
    samples; Ctrl-C arrives while step 3's ``train()`` rewrites the weights. ``train``'s interrupt
    save (``FitProgress.averaged()`` of the last step: ``eval()``, then the file) must hold ``x`` —
    equal bit for bit to an uninterrupted 2-step run whose optimiser went through the same
    train()/eval() pair. Without holding the signal the group's flag stays "eval", the save's
    ``eval()`` is a no-op and ``y`` (or a mix) is saved."""
    made: list = []

    def recording(groups, config):
        made.append(make_optimizer(groups, config))
        for group in made[-1].param_groups:
            group["foreach"] = foreach  # (the multi-tensor switch writes a chunk at a time; the other one a parameter)
        return made[-1]

    monkeypatch.setattr(importlib.import_module("sdadapt.methods.fit"), "make_optimizer", recording)
    images, captions = concept_data("cross", 4, seed=0)
    config = {"batch_size": 2, "learning_rate": 3e-3, "optimizer": "AdamWScheduleFree",
              "optimizer_args": {"betas": (0.9, 0.99)}}

    def run(steps: int):
        system = build_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1)
        last = []

        def on_step(info):
            last.append(info)
            if info.step == 2:
                info.use_weights()  # (train's samples)

        try:
            fit(system, adaptation, images, captions, config=FitConfig(steps=steps, **config), on_step=on_step)
        except KeyboardInterrupt:
            with last[-1].averaged():  # train's interrupt save
                return [p.detach().clone() for p in adaptation.params], last[-1].step
            raise AssertionError("unreachable")
        made[-1].train()
        made[-1].eval()
        return [p.detach().clone() for p in adaptation.params], last[-1].step

    reference, _ = run(2)
    armed = {"on": False}
    name = "_write_weights_many" if foreach else "_write_weight"
    real = getattr(_SCHEDULE_FREE, name)

    def writer(*args, **kwargs):
        out = real(*args, **kwargs)
        if armed["on"] and made[-1].param_groups[0]["train_mode"] is False:  # (inside train(): the flag not yet flipped)
            armed["on"] = False
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(_SCHEDULE_FREE, name, writer)
    real_switch = _SCHEDULE_FREE.switch_mode

    def arming(optimizer, *, train):
        if train and optimizer.param_groups[0]["train_mode"] is False:
            armed["on"] = True
        return real_switch(optimizer, train=train)

    monkeypatch.setattr(importlib.import_module("sdadapt.methods.fit"), "switch_mode", arming)
    interrupted, step = run(5)
    assert step == 2 and armed["on"] is False  # (the signal was delivered, in step 3's switch)
    assert len(interrupted) == len(reference) > 1
    for a, b in zip(interrupted, reference):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ per-subset alpha_mask
def _rgba_folder(folder: Path, seed: int, *, alpha: tuple[bool, ...] = (True, True, False)) -> dict[str, object]:
    """PNGs of random pixels at the toy's 32x32 (RGBA, or RGB where ``alpha`` says no), captioned
    "a red circle": ``{stem: uint8 (32, 32, C) array}``."""
    import numpy as np

    from sdadapt.images import encode_png

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pixels = {}
    for i, has_alpha in enumerate(alpha):
        arr = rng.integers(0, 256, size=(32, 32, 4 if has_alpha else 3), dtype=np.uint8)
        (folder / f"{folder.name}{i}.png").write_bytes(encode_png(arr))
        (folder / f"{folder.name}{i}.txt").write_text("a red circle")
        pixels[f"{folder.name}{i}"] = arr
    return pixels


def _naive_mask(arr, masked: bool):
    """kohya's loss weight of a 32x32 image at the toy latents' 16x16, float64 by hand: alpha/255
    (ones without alpha, or when its subset has no alpha_mask) averaged over 2x2 blocks."""
    import numpy as np

    alpha = arr[..., 3].astype(np.float64) / 255 if masked and arr.shape[-1] == 4 else np.ones(arr.shape[:2])
    return alpha.reshape(16, 2, 16, 2).mean(axis=(1, 3))


def _dataset_toml(path: Path, subsets: list[dict]) -> Path:
    lines = ["[[datasets]]", "resolution = 32", "batch_size = 2", ""]
    for subset in subsets:
        lines.append("[[datasets.subsets]]")
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(str(v))}" for k, v in subset.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_subsets_alpha_mask_trains_as_the_run_level_flag_on_its_images(tmp_path, capsys):
    """One subset with ``alpha_mask = true`` = ``--images`` with ``--alpha-mask`` (the same file, bit
    for bit); the run's ``--alpha-mask`` is the fallback a subset's ``alpha_mask = false`` beats
    (= no mask at all), and the mask changes what trains."""
    folder = tmp_path / "cut"
    _rgba_folder(folder, 0)
    common = ["--steps", "2", "--batch-size", "2", "--no-prior", "--no-bucket", "-q", "--seed", "3"]

    def train(name: str, *args) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{name}.safetensors"
        assert main(["train", "lora", *args, *common, "-o", str(out)]) == 0, capsys.readouterr().err
        return _lora(out)

    flag = train("flag", "--images", str(folder), "--alpha-mask")
    subset = train("subset", "--dataset-config", str(_dataset_toml(tmp_path / "on.toml", [
        {"image_dir": folder, "alpha_mask": True}])))
    plain = train("plain", "--images", str(folder))
    overridden = train("overridden", "--alpha-mask", "--dataset-config", str(_dataset_toml(tmp_path / "off.toml", [
        {"image_dir": folder, "alpha_mask": False}])))
    fallback = train("fallback", "--alpha-mask", "--dataset-config", str(_dataset_toml(tmp_path / "none.toml", [
        {"image_dir": folder}])))
    assert flag.keys() == subset.keys() == plain.keys() == overridden.keys() == fallback.keys()
    assert all(torch.equal(flag[k], subset[k]) and torch.equal(flag[k], fallback[k]) for k in flag)
    assert all(torch.equal(plain[k], overridden[k]) for k in plain)
    assert any(not torch.equal(flag[k], plain[k]) for k in flag if k.endswith("lora_up.weight"))


def test_a_mixed_dataset_weighs_each_image_by_its_subsets_rule(tmp_path, train_fit_calls):
    """Two subsets of RGBA (and one RGB) images, only the first with ``alpha_mask = true``: the
    masks train sends to fit are, per image, its alpha averaged to the latents' size for the first
    subset (ones for its RGB image) and ones for the second — the float64 reference by hand."""
    import numpy as np

    masked = _rgba_folder(tmp_path / "masked", 1)
    unmasked = _rgba_folder(tmp_path / "plain", 2)
    toml = _dataset_toml(tmp_path / "mixed.toml", [{"image_dir": tmp_path / "masked", "alpha_mask": True},
                                                   {"image_dir": tmp_path / "plain"}])
    assert main(["train", "lora", "--dataset-config", str(toml), "--steps", "1", "--no-prior", "--no-bucket", "-q",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    (call,) = train_fit_calls
    dataset = call.dataset
    assert dataset.loss_masks is not None and dataset.loss_masks.folder is None
    checked = 0
    for bucket, members in dataset.members.items():
        for row, index in enumerate(members):
            record = dataset.records[index]
            stem = record.path.stem
            arr, is_masked = (masked[stem], True) if stem in masked else (unmasked[stem], False)
            assert record.alpha_mask is is_masked
            got = dataset.batch_masks(bucket, [row])[0, 0].double().numpy()
            np.testing.assert_allclose(got, _naive_mask(arr, is_masked), rtol=1e-6, atol=1e-7)
            checked += 1
    assert checked == 6
    assert any((dataset.batch_masks(b, list(range(len(m)))) < 0.99).any() for b, m in dataset.members.items())


def test_subset_alpha_mask_resolves_and_is_in_the_resume_record(tmp_path):
    from sdadapt.training.dataset_config import read_dataset_config, record_changes

    folder = tmp_path / "a"
    toml = _dataset_toml(tmp_path / "d.toml", [{"image_dir": folder, "alpha_mask": True}, {"image_dir": tmp_path / "b"},
                                               {"image_dir": tmp_path / "c", "alpha_mask": False}])
    run = {"resolution": None, "batch_size": 1}  # (the run's values the dataset block overrides)
    off = read_dataset_config(toml, fallback=run)
    on = read_dataset_config(toml, fallback={**run, "alpha_mask": True})  # (the run's --alpha-mask)
    assert [s.alpha_mask for s in off.subsets] == [True, False, False]
    assert [s.alpha_mask for s in on.subsets] == [True, True, False]
    assert off.record()["subsets"][0]["alpha_mask"] is True and "alpha_mask" not in off.record()["subsets"][1]
    assert record_changes(off.record(), on.record()) == ["subsets[1].alpha_mask None (now True)"]


def test_a_state_recorded_before_subsets_had_alpha_mask_resumes(tmp_path, capsys):
    """A run with the run-level ``--alpha-mask`` and a dataset TOML whose subset does not set it,
    its ``run.json`` rewritten as sdadapt wrote it before subsets could set ``alpha_mask`` (no
    ``alpha_mask`` anywhere, no ``face_crop_aug_range`` in the dataset's options): it resumes, and
    ends where the straight run did. A record written now names the run's flag: resuming without
    ``--alpha-mask`` is refused; a subset's ``alpha_mask = false`` under the flag resumes."""
    import json

    folder = tmp_path / "cut"
    _rgba_folder(folder, 4)
    toml = _dataset_toml(tmp_path / "d.toml", [{"image_dir": folder}])
    common = ["train", "lora", "--dataset-config", str(toml), "--steps", "3", "--no-prior", "--no-bucket", "--seed", "5"]
    out = tmp_path / "a.safetensors"
    assert main([*common, "--alpha-mask", "--save-every-n-steps", "2", "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    state = tmp_path / "a-state"
    record_file = state / "run.json"
    record = json.loads(record_file.read_text())
    assert record["alpha_mask"] is True and "alpha_mask" not in record["dataset"]["subsets"][0]  # (= the run's flag)
    assert main([*common, "--resume", str(state), "-o", str(tmp_path / "n.safetensors")]) == 2
    assert "alpha_mask True (now False;" in capsys.readouterr().err
    old = json.loads(json.dumps(record))
    del old["alpha_mask"]
    old["dataset"]["options"].pop("face_crop_aug_range", None)
    old["augmentations"].pop("face_crop_aug_range", None)
    record_file.write_text(json.dumps(old))
    resumed = tmp_path / "r.safetensors"
    assert main([*common, "--alpha-mask", "--resume", str(state), "-o", str(resumed), "-q"]) == 0, capsys.readouterr().err
    straight, again = _lora(out), _lora(resumed)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    # a subset's own false under the run's flag: recorded (it differs from the flag) and resumed
    off = _dataset_toml(tmp_path / "off.toml", [{"image_dir": folder, "alpha_mask": False}])
    args = ["train", "lora", "--dataset-config", str(off), "--steps", "2", "--no-prior", "--no-bucket", "--alpha-mask", "-q"]
    assert main([*args, "--save-every-n-steps", "1", "-o", str(tmp_path / "b.safetensors")]) == 0
    assert json.loads((tmp_path / "b-state" / "run.json").read_text())["dataset"]["subsets"][0]["alpha_mask"] is False
    assert main([*args, "--resume", str(tmp_path / "b-state"), "-o", str(tmp_path / "c.safetensors")]) == 0, \
        capsys.readouterr().err


def test_a_switch_in_another_thread_holds_nothing_and_switches(monkeypatch):
    """signal.signal raises ValueError outside the main thread: a fit (or a switch) run in a worker
    thread must switch all the same, holding no signal (the handlers untouched)."""
    import threading

    opt, params = _stepped(foreach=True)
    want = [p.detach().double() + (1 - 1 / 0.8) * (opt.state[p]["z"].double() - p.detach().double()) for p in params]
    swapped: list[int] = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda number, handler: (swapped.append(number), real(number, handler))[1])
    errors: list[BaseException] = []

    def work():
        try:
            switch_mode(opt, train=False)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == [] and swapped == []
    assert [g["train_mode"] for g in opt.param_groups] == [False, False]
    for p, expected in zip(params, want):
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


def test_held_signals_put_back_the_exact_handlers_and_nest(monkeypatch):
    """Each handler comes back as it was (SIG_IGN, SIG_DFL, a function); a SIGINT held by two nested
    blocks reaches the outer handler once, when the outer block ends; a handler that cannot be
    swapped (ValueError) is neither held nor 'put back'."""
    from sdadapt.formats.files import signals_held

    calls: list[int] = []

    def mine(number, frame):
        calls.append(number)

    saved = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGINT, mine)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with signals_held():
            with signals_held():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
            assert calls == []  # (the inner block hands it to the outer one's holding)
        assert calls == [signal.SIGINT]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                signal.getsignal(signal.SIGHUP)) == (mine, signal.SIG_IGN, signal.SIG_DFL)
        real = signal.signal

        def no_sighup(number, handler):
            if number == signal.SIGHUP:
                raise ValueError("signal only works in main thread of the main interpreter")
            return real(number, handler)

        monkeypatch.setattr(signal, "signal", no_sighup)
        with signals_held():
            signal.raise_signal(signal.SIGINT)
        monkeypatch.undo()
        assert calls == [signal.SIGINT] * 2 and signal.getsignal(signal.SIGINT) is mine
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_class_subsets_alpha_mask_weighs_only_the_class_images(tmp_path, monkeypatch):
    """kohya's alpha_mask is a subset setting for class (is_reg) subsets too: a class subset with
    ``alpha_mask = true`` beside a training subset without it — the class images' masks are their
    alpha (the float64 reference), the training images have none (kohya: no mask in such a batch)."""
    import inspect

    import numpy as np

    jobs = importlib.import_module("sdadapt.jobs.train")
    seen: list[dict] = []
    real = jobs.fit
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        seen.append(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    _rgba_folder(tmp_path / "inst", 5)
    cls = _rgba_folder(tmp_path / "cls", 6)
    toml = _dataset_toml(tmp_path / "reg.toml", [{"image_dir": tmp_path / "inst"},
                                                 {"image_dir": tmp_path / "cls", "is_reg": True, "alpha_mask": True}])
    assert main(["train", "lora", "--dataset-config", str(toml), "--steps", "1", "--no-bucket", "-q",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    (call,) = seen
    assert call["images"].loss_masks is None
    reg_dataset, _ = call["prior"]
    assert reg_dataset.loss_masks is not None and reg_dataset.loss_masks.folder is None
    checked = 0
    for bucket, members in reg_dataset.members.items():
        for row, index in enumerate(members):
            stem = reg_dataset.records[index].path.stem
            got = reg_dataset.batch_masks(bucket, [row])[0, 0].double().numpy()
            np.testing.assert_allclose(got, _naive_mask(cls[stem], True), rtol=1e-6, atol=1e-7)
            checked += 1
    assert checked == 3
