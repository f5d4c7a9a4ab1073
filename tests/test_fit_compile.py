"""``FitConfig.compile_backend`` / ``train --torch-compile --dynamo-backend``: fit's model compiled.

The ``aot_eager`` backend traces forward and backward as Inductor would (no C++ compiler needed):
the compiled run must train like the eager one, in one graph per layout (no graph break), and
what cannot work is refused before the first step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from _fast_s1 import one_level_toy
from _fast_s2 import two_level_toy

import sdadapt
from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.step import StepConfig


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _run(method: str, config: FitConfig):
    # (cheaper traces, half width, one text layer. LoRA: every UNet layer kind and the toy's down/upsampler and skip
    # concatenations, one resnet + transformer per block; textual inversion, whose own path is the text encoder's
    # token rows: the one-level UNet)
    system = two_level_toy(seed=1) if method == "lora" else one_level_toy(seed=1)
    adaptation = METHODS[method].adapt(system, seed=1, **({"token": "sks"} if method == "textual-inversion" else {}))
    images, captions = concept_data("cross", 4, seed=0)
    if method == "textual-inversion":
        captions = [f"a sks {c}" for c in captions]
    losses = fit(system, adaptation, images, captions, config=config)
    return losses, [p.detach().clone() for p in adaptation.params]


# two steps: the second runs the compiled graph on the weights the first step changed
_BASE = FitConfig(steps=2, batch_size=2, learning_rate=3e-3, warmup_steps=1, step=StepConfig(min_snr_gamma=5.0))


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_a_compiled_fit_trains_like_the_eager_one_without_graph_breaks(method):
    eager = _run(method, _BASE)
    compiled = _run(method, dataclasses.replace(_BASE, compile_backend="aot_eager"))
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile


def test_an_unknown_backend_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'.*inductor"):
        dataclasses.replace(_BASE, compile_backend="nope")


def test_the_train_command_compiles_with_kohyas_options(red_circles, tmp_path, capsys, monkeypatch):
    """kohya's TOML keys (and the flags) reach fit's compile with the backend named. The compile itself is
    spied on (the model is returned uncompiled): that a compiled fit trains like the eager one is the test above's."""
    import importlib

    fit_module = importlib.import_module("sdadapt.methods.fit")  # (the attribute ``methods.fit`` is the function)
    compiles: list[tuple[str, str]] = []

    def spy(model, *, backend, device_type):
        compiles.append((backend, device_type))
        return model

    monkeypatch.setattr(fit_module, "compiled_model", spy)
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "2"]
    assert main([*common, "-q", "-o", str(tmp_path / "plain.safetensors")]) == 0
    assert not compiles  # eager: nothing compiled
    config = tmp_path / "c.toml"
    config.write_text('torch_compile = true\ndynamo_backend = "aot_eager"\n')  # kohya's TOML keys
    assert main([*common, "-q", "--config", str(config), "-o", str(tmp_path / "compiled.safetensors")]) == 0
    assert compiles == [("aot_eager", "cpu")]  # the options reached fit: it compiled, with the backend asked for
    a = sdadapt.load_lora(tmp_path / "plain.safetensors")[0]
    b = sdadapt.load_lora(tmp_path / "compiled.safetensors")[0]
    for component in a:  # (and the option changed nothing else of the run)
        for key in a[component]:
            torch.testing.assert_close(b[component][key], a[component][key], rtol=1e-5, atol=1e-6)
    compiles.clear()
    flags = ["--torch-compile", "--dynamo-backend", "eager"]
    assert main([*common, "-q", *flags, "-o", str(tmp_path / "e.safetensors")]) == 0
    assert compiles == [("eager", "cpu")]  # the flags too
    capsys.readouterr()
    assert main([*common, "--torch-compile", "--dynamo-backend", "nope", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--dynamo-backend: unknown torch.compile backend 'nope'" in capsys.readouterr().err
    from sdadapt.jobs.train import TrainOptions, _inactive_option_notes

    notes = _inactive_option_notes(TrainOptions(images=red_circles, dynamo_backend="aot_eager"))
    assert "--dynamo-backend aot_eager: not used without --torch-compile" in notes
    assert not _inactive_option_notes(TrainOptions(images=red_circles, dynamo_backend="aot_eager", torch_compile=True))
