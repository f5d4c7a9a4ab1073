"""Two text-encoder learning rates (SDXL): ``FitConfig.text_encoder_2_lr``, ``--text-encoder-lr A B`` /
``--text-encoder-2-lr``, kohya's ``text_encoder_lr = [te1, te2]`` and ``learning_rate_te1`` / ``learning_rate_te2``.

kohya (sd-scripts): ``sdxl_train.py`` trains ``text_encoder1`` at ``learning_rate_te1 or learning_rate`` and
``text_encoder2`` at ``learning_rate_te2 or learning_rate``, 0 leaving that encoder out of the optimiser;
its multi-encoder networks (``prepare_optimizer_params_with_multiple_te_lrs``) give each encoder's LoRA
modules the list's own value, LoRA+ ups ``lr × ratio``, an LR of 0 dropping the group ("NO LR skipping").
The tests use a toy system with a second text encoder (``text_encoder_2``) whose output adds to the first's.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from train_inputs import captioned_pngs

from sdadapt.methods import FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.toy.system import ToySystem
from sdadapt.toy.text_encoder import ToyTextEncoder
from sdadapt.training.step import StepConfig


class _TwoEncoderToy(ToySystem):
    """The toy with SDXL's second text encoder: the conditioning is the sum of both encoders' hidden states."""

    def condition(self, prompts, *, image_embeds=None):
        cond = super().condition(prompts, image_embeds=image_embeds)
        ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        return {**cond, "context": cond["context"] + self.text_encoder_2(ids)[0]}


def _system(seed: int = 1) -> _TwoEncoderToy:
    toy = build_toy(seed=seed)
    system = _TwoEncoderToy(toy.unet, toy.text_encoder, toy.clip)
    torch.manual_seed(seed + 10)
    system.text_encoder_2 = ToyTextEncoder(vocab_size=toy.text_encoder.config["vocab_size"])
    return system


@dataclasses.dataclass
class _Weights:
    """A full fine-tune of a few base weights: 2 in the UNet, 2 in each text encoder (``lr_scales`` as given)."""

    params: list[torch.nn.Parameter]
    lr_scales: list[float]
    where: list[str]


def _adaptation(system: _TwoEncoderToy, scales: tuple[float, ...] = (1.0,) * 6) -> _Weights:
    chosen, where = [], []
    for part in ("unet", "text_encoder", "text_encoder_2"):
        weights = [p for n, p in getattr(system, part).named_parameters() if n.endswith("weight") and p.dim() == 2][:2]
        chosen += weights
        where += [part] * len(weights)
    for p in system.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return _Weights(chosen, list(scales), where)


def _config(**changes) -> FitConfig:
    base = {"steps": 1, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant",
            "weight_decay": 0.0, "optimizer": "adamw", "step": StepConfig(max_grad_norm=None, min_snr_gamma=None)}
    return FitConfig(**{**base, **changes})


def _record_layouts(monkeypatch) -> list[list[tuple[float, set[int]]]]:
    fit_module = importlib.import_module("sdadapt.methods.fit")
    layouts: list = []
    real = fit_module.make_optimizer

    def recording(layout, config):
        layouts.append([(g["lr"], {id(p) for p in g["params"]}) for g in layout])
        return real(layout, config)

    monkeypatch.setattr(fit_module, "make_optimizer", recording)
    return layouts


def _lr_of_each(layout, params) -> list[float | None]:
    """Each parameter's group LR in ``layout`` (``None``: in no group — not trained)."""
    found = []
    for p in params:
        lrs = [lr for lr, ids in layout if id(p) in ids]
        assert len(lrs) <= 1
        found.append(lrs[0] if lrs else None)
    return found


@pytest.mark.parametrize("te1, te2, want", [
    (5e-4, 2e-4, [1e-3, 1e-3, 5e-4, 5e-4 * 4, 2e-4, 2e-4 * 4]),  # each encoder at its own, LoRA+-like scale ×4
    (5e-4, None, [1e-3, 1e-3, 5e-4, 5e-4 * 4, 5e-4, 5e-4 * 4]),  # one value: both encoders (as before)
    (None, 2e-4, [1e-3, 1e-3, 1e-3, 1e-3 * 4, 2e-4, 2e-4 * 4]),  # the first at learning_rate (sdxl_train.py)
    (5e-4, 0.0, [1e-3, 1e-3, 5e-4, 5e-4 * 4, None, None]),  # 0: the second encoder is not trained
    (0.0, 2e-4, [1e-3, 1e-3, None, None, 2e-4, 2e-4 * 4]),  # 0: the first encoder is not trained
])
def test_each_parameter_gets_its_encoders_lr(monkeypatch, te1, te2, want):
    layouts = _record_layouts(monkeypatch)
    system = _system()
    adaptation = _adaptation(system, scales=(1.0, 1.0, 1.0, 4.0, 1.0, 4.0))
    images, captions = concept_data("cross", 4, seed=0)
    before = [p.detach().clone() for p in adaptation.params]
    fit(system, adaptation, images, captions, config=_config(text_encoder_lr=te1, text_encoder_2_lr=te2))
    (layout,) = layouts
    got = _lr_of_each(layout, adaptation.params)  # (None: the parameter is in no group; pytest >= 9.2's approx
    assert [lr is None for lr in got] == [lr is None for lr in want]  # takes numbers only)
    assert [lr for lr in got if lr is not None] == pytest.approx([lr for lr in want if lr is not None], rel=1e-15)
    for p, b, lr in zip(adaptation.params, before, want):
        assert torch.equal(p, b) == (lr is None)  # (an encoder at LR 0 is left as it was)
    if te2 is None:  # one value: both encoders share their groups (the layout states saved before load into)
        assert len(layout) == 3
    if te2 is not None and te2 != 0:  # the second encoder has groups of its own, none shared with the first
        te2_ids = {id(p) for p, w in zip(adaptation.params, adaptation.where) if w == "text_encoder_2"}
        assert all(ids <= te2_ids or not ids & te2_ids for _, ids in layout)


def test_one_adamw_step_per_encoder_against_a_float64_reference():
    """AdamW's first step from the step's own gradient g: Δw = −lr_group·ĝ/(√ĝ² + ε) (m̂ = g, v̂ = g²),
    computed in float64, with lr_group the parameter's encoder's LR × its scale."""
    system = _system()
    adaptation = _adaptation(system, scales=(1.0, 2.0, 1.0, 3.0, 1.0, 0.5))
    with torch.no_grad():  # small weights: float32's rounding of w + Δw stays far below the LRs compared
        for p in adaptation.params:
            p.mul_(1e-2)
    before = [p.detach().double().clone() for p in adaptation.params]
    grads: dict[int, torch.Tensor] = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.detach().double().clone()))
               for p in adaptation.params]
    config = _config(text_encoder_lr=3e-4, text_encoder_2_lr=7e-5)
    images, captions = concept_data("cross", 4, seed=0)
    fit(system, adaptation, images, captions, config=config)
    for h in handles:
        h.remove()
    base = {"unet": 1e-3, "text_encoder": 3e-4, "text_encoder_2": 7e-5}
    factor = config.lr_at(0, 1.0)
    assert factor == 1.0
    eps = 1e-8
    for p, b, scale, part in zip(adaptation.params, before, adaptation.lr_scales, adaptation.where):
        g = grads[id(p)]
        assert g.abs().max() > 0, part
        want = b - base[part] * scale * factor * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=base[part] * scale * 2e-3)
        moved = (p.detach().double() - b).abs().max()
        assert moved == pytest.approx(base[part] * scale * factor, rel=2e-3), part


def test_resume_is_bit_exact_with_two_encoder_lrs(tmp_path):
    def run(**kwargs):
        system = _system()
        adaptation = _adaptation(system, scales=(1.0, 1.0, 1.0, 4.0, 1.0, 4.0))
        images, captions = concept_data("cross", 4, seed=0)
        config = _config(steps=4, text_encoder_lr=5e-4, text_encoder_2_lr=1e-4, schedule="cosine", warmup_steps=1)
        losses = fit(system, adaptation, images, captions, config=config, **kwargs)
        return losses, [p.detach().clone() for p in adaptation.params]

    folder = tmp_path / "state"
    straight = run(on_step=lambda info: info.save_state(folder) if info.step == 2 else None)
    resumed = run(resume=folder)
    assert resumed[0] == straight[0][2:]
    for a, b in zip(straight[1], resumed[1]):
        assert torch.equal(a, b)
    saved = json.loads((folder / "state.json").read_text())
    assert len(saved["optimizer"]["param_groups"]) == 5  # unet, te1, te1 ×4, te2, te2 ×4


def test_refusals():
    images, captions = concept_data("cross", 4, seed=0)
    one = build_toy(seed=1)  # one text encoder: a second LR has nothing to act on
    with pytest.raises(ValueError, match="one text encoder"):
        fit(one, _Weights([one.unet.conv_in.weight], [1.0], ["unet"]), images, captions,
            config=_config(text_encoder_2_lr=1e-4))
    system = _system()
    adaptation = _adaptation(system)
    with pytest.raises(ValueError, match="text_encoder_2_lr"):
        _config(text_encoder_2_lr=-1.0)
    with pytest.raises(ValueError):  # Prodigy: one LR for every group (kohya's run fails at its first step)
        fit(system, adaptation, images, captions, config=_config(optimizer="prodigy", learning_rate=1.0,
                                                                 text_encoder_lr=1.0, text_encoder_2_lr=0.5))
    # cached text-encoder outputs need both encoders frozen
    with pytest.raises(ValueError, match="text encoder"):
        fit(system, adaptation, images, captions, config=_config(text_encoder_lr=0.0, text_encoder_2_lr=1e-4,
                                                                 cache_text_encoder_outputs=True))


# ------------------------------------------------------------------ options, kohya TOML, metadata, run.json

def test_cached_text_encoder_outputs_are_refused_before_loading_unless_both_encoders_are_frozen(tmp_path):
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import _check_text_cache_method
    from sdadapt.methods import METHODS

    def options(**lrs):
        return TrainOptions(model="m", images=str(tmp_path), out=str(tmp_path / "o.safetensors"),
                            cache_text_encoder_outputs=True, **lrs)

    _check_text_cache_method("lora", METHODS["lora"], options(text_encoder_lr=0.0))
    _check_text_cache_method("lora", METHODS["lora"], options(text_encoder_lr=0.0, text_encoder_2_lr=0.0))
    with pytest.raises(ValueError, match="--text-encoder-2-lr 0 \\(it is 0.0001"):
        _check_text_cache_method("lora", METHODS["lora"], options(text_encoder_lr=0.0, text_encoder_2_lr=1e-4))
    with pytest.raises(ValueError, match="trains the text encoder too"):
        _check_text_cache_method("lora", METHODS["lora"], options(text_encoder_2_lr=0.0))
    with pytest.raises(ValueError, match="learning_rate_te1 without learning_rate_te2 trains the second encoder at"):
        _check_text_cache_method("lora", METHODS["lora"], options(text_encoder_lr=0.0, text_encoder_2_lr="learning_rate"))



def test_cli_takes_one_or_two_text_encoder_lrs():
    from sdadapt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "lora", "--text-encoder-lr", "1e-4", "5e-5"])
    assert (args.text_encoder_lr, args.text_encoder_2_lr) == (1e-4, 5e-5)
    args = parser.parse_args(["train", "lora", "--text-encoder-lr", "1e-4"])
    assert args.text_encoder_lr == 1e-4 and not isinstance(getattr(args, "text_encoder_2_lr", None), float)
    args = parser.parse_args(["train", "lora", "--text-encoder-lr", "1e-4,5e-5"])  # (sdadapt's comma lists)
    assert (args.text_encoder_lr, args.text_encoder_2_lr) == (1e-4, 5e-5)
    args = parser.parse_args(["train", "lora", "--text-encoder-2-lr", "0"])
    assert args.text_encoder_2_lr == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "lora", "--text-encoder-lr", "1", "2", "3"])


def _read(tmp_path: Path, text: str):
    from train_inputs import read_train_toml

    return read_train_toml(tmp_path / "config.toml", text)


def test_kohya_toml_per_encoder_lrs(tmp_path):
    """kohya's train_network.py hands networks without ``prepare_optimizer_params_with_multiple_te_lrs``
    (networks.lora and lycoris.kohya, the SD1/SDXL ones) ``text_encoder_lr[0]``: both encoders at the first."""
    lycoris_kohya = importlib.import_module("lycoris.kohya")
    assert not hasattr(lycoris_kohya.LycorisNetworkKohya, "prepare_optimizer_params_with_multiple_te_lrs")
    options, _, notes = _read(tmp_path, "text_encoder_lr = [1e-4, 5e-5]\n")
    assert options == {"text_encoder_lr": 1e-4}  # (both encoders: text_encoder_2_lr follows it)
    assert any("networks.lora" in n and "text_encoder_2_lr = 5e-05" in n for n in notes)
    options, _, notes = _read(tmp_path, "text_encoder_lr = [1e-4, 1e-4]\n")
    assert options == {"text_encoder_lr": 1e-4} and not notes
    options, _, _ = _read(tmp_path, "text_encoder_lr = [1e-4, 5e-5]\ntext_encoder_2_lr = 5e-5\n")
    assert (options["text_encoder_lr"], options["text_encoder_2_lr"]) == (1e-4, 5e-5)  # (sdadapt's key: two rates)
    options, _, _ = _read(tmp_path, "learning_rate_te1 = 1e-5\nlearning_rate_te2 = 0\n")
    assert (options["text_encoder_lr"], options["text_encoder_2_lr"]) == (1e-5, 0.0)
    options, _, notes = _read(tmp_path, "learning_rate_te1 = 1e-5\n")  # (sdxl_train.py: te2 at learning_rate)
    assert options == {"text_encoder_lr": 1e-5, "text_encoder_2_lr": "learning_rate"}
    assert any("without learning_rate_te2" in n and "learning_rate, as sdxl_train.py" in n for n in notes)
    options, _, _ = _read(tmp_path, "learning_rate_te2 = 2e-5\n")
    assert options == {"text_encoder_2_lr": 2e-5}  # (the first encoder: learning_rate, as sdxl_train.py)
    with pytest.raises(ValueError, match="at most two"):
        _read(tmp_path, "text_encoder_lr = [1e-4, 5e-5, 1e-5]\n")
    with pytest.raises(ValueError, match="twice"):
        _read(tmp_path, "text_encoder_lr = 1e-4\nlearning_rate_te1 = 2e-4\n")


def test_learning_rate_te1_alone_trains_the_second_encoder_at_learning_rate(tmp_path):
    """kohya's sdxl_train.py: ``lr_te2 = learning_rate_te2 if not None else learning_rate``. The run's
    ``text_encoder_2_lr`` is its ``learning_rate`` (the method's when not given) on a model with a second
    encoder, none on a one-encoder model (no refusal of a second-encoder LR nobody gave)."""
    from types import SimpleNamespace

    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import TE2_AT_LEARNING_RATE, _second_encoder_lr

    options = TrainOptions(model="m", images=str(tmp_path), out=str(tmp_path / "o.safetensors"), learning_rate=3e-4,
                           text_encoder_lr=1e-5, text_encoder_2_lr=TE2_AT_LEARNING_RATE)
    two, one = SimpleNamespace(text_encoder_2=torch.nn.Linear(1, 1)), SimpleNamespace(text_encoder=torch.nn.Linear(1, 1))
    assert _second_encoder_lr(options, two, learning_rate=1e-3) == 3e-4
    assert _second_encoder_lr(options, one, learning_rate=1e-3) is None
    assert _second_encoder_lr(dataclasses.replace(options, learning_rate=None), two, learning_rate=1e-3) == 1e-3
    assert _second_encoder_lr(dataclasses.replace(options, text_encoder_2_lr=0.0), two, learning_rate=1e-3) == 0.0
    with pytest.raises(ValueError, match="text-encoder-2-lr"):
        dataclasses.replace(options, text_encoder_2_lr="unet_lr")


def test_learning_rate_te1_alone_end_to_end(tmp_path, capsys):
    """A kohya SDXL config with ``learning_rate_te1 = 0`` and no ``learning_rate_te2``: sdxl_train.py freezes
    the first encoder and trains the second at ``learning_rate`` (before: both frozen); on the toy (one
    encoder) the same config trains its one encoder's rate and nothing is refused."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_checkpoints import tiny_sdxl_file

    import sdadapt
    from sdadapt.cli import main

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 2, caption=[f"sks toy, photo {i}" for i in range(2)])
    common = (f"train_data_dir = '{images}'\nresolution = '16,16'\nmax_train_steps = 2\ntrain_batch_size = 2\n"
              "learning_rate = 1e-3\nlearning_rate_te1 = 0\nnetwork_dim = 2\nnetwork_alpha = 2\n"
              f"optimizer_type = 'AdamW'\nlr_scheduler = 'constant'\noutput_dir = '{tmp_path}'\n")
    config = tmp_path / "train.toml"
    config.write_text(f"pretrained_model_name_or_path = '{tiny_sdxl_file(tmp_path / 'sdxl.safetensors')}'\n"
                      + common + "output_name = 'xl'\n")
    assert main(["train", "lora", "--config", str(config), "--seed", "3"]) == 0, capsys.readouterr().err
    assert "as sdxl_train.py" in capsys.readouterr().err
    state, metadata = sdadapt.load_lora(tmp_path / "xl.safetensors")
    assert metadata["ss_text_encoder_lr"] == "[0.0, 0.001]"

    def ups(component):
        return [t for k, t in state[component].items() if "lora_up" in k]

    assert ups("text_encoder") and all(not t.any() for t in ups("text_encoder"))
    assert any(t.any() for t in ups("text_encoder_2"))
    config.write_text("pretrained_model_name_or_path = 'toy'\n" + common + "output_name = 'toy'\n")
    assert main(["train", "lora", "--config", str(config), "--seed", "3", "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "toy.safetensors").is_file()


def test_metadata_and_resume_record(tmp_path):
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import (
        _check_resume,
        _text_encoder_lr_metadata,
        _write_run_record,
    )

    assert _text_encoder_lr_metadata(_config(text_encoder_lr=1e-4, text_encoder_2_lr=5e-5)) == "[0.0001, 5e-05]"
    assert _text_encoder_lr_metadata(_config(text_encoder_lr=1e-4)) == "0.0001"
    assert _text_encoder_lr_metadata(_config(text_encoder_lr=1e-4, text_encoder_2_lr=1e-4)) == "0.0001"
    assert _text_encoder_lr_metadata(_config()) == "0.001"
    options = TrainOptions(model="m", images=str(tmp_path), out=str(tmp_path / "o.safetensors"), text_encoder_2_lr=5e-5)
    folder = tmp_path / "state"
    folder.mkdir()
    _write_run_record(folder, "lora", options, 2, 4)
    (folder / "state.json").write_text(json.dumps({"step": 2}))
    assert json.loads((folder / "run.json").read_text())["text_encoder_2_lr"] == 5e-5
    _check_resume(folder, "lora", options)
    with pytest.raises(ValueError, match="text_encoder_2_lr"):
        _check_resume(folder, "lora", dataclasses.replace(options, text_encoder_2_lr=1e-4))
    with pytest.raises(ValueError, match="text_encoder_2_lr"):
        _check_resume(folder, "lora", dataclasses.replace(options, text_encoder_2_lr=None))


def test_sdxl_lora_trains_each_encoder_at_its_own_rate_end_to_end(tmp_path, capsys):
    """``train lora`` on a tiny SDXL single file with kohya's ``text_encoder_lr = [5e-4, 0]`` (kohya's
    SDXL LoRA: both at 5e-4, the run report says so) and ``--text-encoder-2-lr 0``: the first
    encoder's LoRA trains, the second's stays at its zero-initialised ``lora_up`` (LR 0: not trained, as
    kohya's "NO LR skipping"), and ``ss_text_encoder_lr`` is the list as kohya's multi-encoder networks write it."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_checkpoints import tiny_sdxl_file

    import sdadapt
    from sdadapt.cli import main

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 2, caption=[f"sks toy, photo {i}" for i in range(2)])
    out = tmp_path / "xl.safetensors"
    config = tmp_path / "train.toml"
    config.write_text(f"pretrained_model_name_or_path = '{tiny_sdxl_file(tmp_path / 'sdxl.safetensors')}'\n"
                      f"train_data_dir = '{images}'\nresolution = '16,16'\nmax_train_steps = 2\ntrain_batch_size = 2\n"
                      "learning_rate = 1e-3\ntext_encoder_lr = [5e-4, 0]\nnetwork_dim = 2\nnetwork_alpha = 2\n"
                      "optimizer_type = 'AdamW'\nlr_scheduler = 'constant'\n"
                      f"output_dir = '{tmp_path}'\noutput_name = 'xl'\n")
    assert main(["train", "lora", "--config", str(config), "--seed", "3", "--text-encoder-2-lr", "0"]) == 0, \
        capsys.readouterr().err
    assert "networks.lora" in capsys.readouterr().err  # the note: kohya's SD1/SDXL LoRA reads the first value only
    state, metadata = sdadapt.load_lora(out)
    assert metadata["ss_text_encoder_lr"] == "[0.0005, 0.0]" and metadata["ss_unet_lr"] == "0.001"

    def ups(component):
        return [t for k, t in state[component].items() if "lora_up" in k]

    assert ups("text_encoder_2") and all(not t.any() for t in ups("text_encoder_2"))
    assert any(t.any() for t in ups("text_encoder")) and any(t.any() for t in ups("unet"))


def test_every_group_follows_the_schedule(monkeypatch):
    """After each step, every group's LR is the schedule's factor × its own base LR × its scale."""
    from fit_runs import spy_on_built_optimizers

    built = spy_on_built_optimizers(monkeypatch)
    system = _system()
    adaptation = _adaptation(system, scales=(1.0, 1.0, 1.0, 4.0, 1.0, 4.0))
    images, captions = concept_data("cross", 4, seed=0)
    config = _config(steps=5, text_encoder_lr=5e-4, text_encoder_2_lr=1e-4, schedule="cosine", warmup_steps=2)
    seen = []

    def on_step(info):
        (optimizer,) = built
        seen.append(sorted((g["lr"], g["base_lr"] * g["lr_scale"]) for g in optimizer.param_groups))

    fit(system, adaptation, images, captions, config=config, on_step=on_step)
    assert len(seen) == 5
    bases = sorted([1e-3, 5e-4, 2e-3, 1e-4, 4e-4])
    factors = set()
    for groups in seen:
        assert [base for _, base in groups] == pytest.approx(bases, rel=1e-12)
        ratios = {round(lr / base, 12) for lr, base in groups}
        assert len(ratios) == 1  # one schedule factor for all five groups
        factors |= ratios
    assert len(factors) > 2  # (the factor changed along the schedule)


def test_a_run_recorded_before_learning_rate_te1_alone_resumes_on_one_encoder_only(tmp_path):
    """A state saved when ``learning_rate_te1`` alone trained both encoders at it (no ``text_encoder_2_lr``
    recorded): resumed with the same config (now ``TE2_AT_LEARNING_RATE``) on a one-encoder model (nothing
    differs), refused once the model has a second encoder (its optimiser groups differ), naming the fix."""
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import (
        TE2_AT_LEARNING_RATE,
        _check_resume,
        _check_resumed_second_encoder_lr,
        _write_run_record,
    )

    before = TrainOptions(model="m", images=str(tmp_path), out=str(tmp_path / "o.safetensors"), text_encoder_lr=1e-5)
    folder = tmp_path / "state"
    folder.mkdir()
    _write_run_record(folder, "lora", before, 2, 4)
    (folder / "state.json").write_text(json.dumps({"step": 2}))
    now = dataclasses.replace(before, text_encoder_2_lr=TE2_AT_LEARNING_RATE, resume=str(folder))
    record = _check_resume(folder, "lora", now)
    _check_resumed_second_encoder_lr(record, now, None)  # (one text encoder)
    with pytest.raises(ValueError, match="write text_encoder_lr = <the learning_rate_te1 value> in place of"):
        _check_resumed_second_encoder_lr(record, now, 1e-4)
    with pytest.raises(ValueError, match="text_encoder_2_lr None"):  # (any other rate: refused as before)
        _check_resume(folder, "lora", dataclasses.replace(now, text_encoder_2_lr=1e-4))
    _write_run_record(folder, "lora", now, 2, 4)  # (recorded as "learning_rate": the same config resumes)
    assert json.loads((folder / "run.json").read_text())["text_encoder_2_lr"] == "learning_rate"
    _check_resumed_second_encoder_lr(_check_resume(folder, "lora", now), now, 1e-4)
