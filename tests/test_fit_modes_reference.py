"""Which modules ``fit`` runs in training mode (dropout on) and which in eval mode, against the
reference training scripts, and the caller's modes restored afterwards.

References (transcribed below, not imported):

* kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  - ``train_network.py:901-914``: without gradient checkpointing ``unet.eval()`` and ``t_enc.eval()``
    for every text encoder; ``train_network.py:1407`` + ``networks/lora.py:1249-1250``: the network's
    ``on_epoch_start`` calls ``self.train()`` (the LoRA modules check ``self.training`` for their
    dropout, ``networks/lora.py:94-105``);
  - ``fine_tune.py:203-207``: a text encoder that does not train: ``text_encoder.eval()``;
    ``fine_tune.py:353-354``: ``for m in training_models: m.train()`` (the UNet, and the text encoder
    when it trains);
  - ``train_db.py:332-335``: ``unet.train()``, ``text_encoder.train()`` while it trains;
    ``train_db.py:338-343``: at ``stop_text_encoder_training``, ``text_encoder.train(False)``.
* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  ``examples/dreambooth/train_dreambooth.py:1232-1235``: each epoch ``unet.train()`` and, with
  ``--train_text_encoder``, ``text_encoder.train()``.
* A1111's hypernetwork loop switches the hypernetwork to training mode for its steps (docs/hypernetworks.md).

The toy's own dropout layers have p = 0, so these tests watch the modes, not the numbers.
"""

from __future__ import annotations

import pytest
import torch
from _fast_compile import small_toy
from torch import nn

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy.evaluate import concept_data

_CONFIG = FitConfig(steps=2, batch_size=2, learning_rate=1e-3)


def _watch(modules: dict[str, nn.Module]) -> dict[str, list[bool]]:
    """Forward pre-hooks recording ``module.training`` at each call, by name."""
    seen: dict[str, list[bool]] = {name: [] for name in modules}
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(m.training))
    return seen


def _base_dropout(system) -> nn.Module:
    """A dropout layer of the toy UNet's own (an attention's ``to_out[1]``)."""
    return next(m for n, m in system.unet.named_modules() if n.endswith("to_out.1") and isinstance(m, nn.Dropout))


def _text_dropout(system) -> nn.Module:
    """The first submodule of the text encoder that runs in its forward (its embeddings)."""
    return system.text_encoder.text_model.embeddings


def _run(method: str, system, *, config: FitConfig = _CONFIG, **fit_kwargs):
    adaptation = METHODS[method].adapt(system, seed=1)
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=config, **fit_kwargs)
    return adaptation


def _modes(system) -> dict[nn.Module, bool]:
    return {m: m.training for m in system.modules()}


def test_lora_trains_its_adapters_with_the_base_in_eval_mode_as_kohyas_train_network():
    system = small_toy(seed=1)  # built in training mode: kohya's unet.eval() / t_enc.eval() still apply
    adaptation = METHODS["lora"].adapt(system, seed=1)
    lora = next(m for m in system.unet.modules() if type(m).__name__ == "LoRAModule")
    seen = _watch({"unet": system.unet, "dropout": _base_dropout(system), "text": _text_dropout(system), "lora": lora})
    before = _modes(system)
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=_CONFIG)
    assert seen["lora"] and all(seen["lora"])  # network.train()
    assert seen["unet"] and not any(seen["unet"]) and not any(seen["dropout"])  # unet.eval()
    assert seen["text"] and not any(seen["text"])  # t_enc.eval()
    assert _modes(system) == before  # the caller's modes back


def test_a_fine_tuned_unet_trains_in_training_mode_and_a_frozen_text_encoder_in_eval_mode():
    system = small_toy(seed=1).eval()  # as loaded (load_toy, DiffusersSystem): eval mode
    seen = _watch({"unet": system.unet, "dropout": _base_dropout(system), "text": _text_dropout(system)})
    _run("full", system)
    assert seen["unet"] and all(seen["unet"]) and all(seen["dropout"])  # fine_tune.py: m.train()
    assert seen["text"] and not any(seen["text"])  # fine_tune.py: text_encoder.eval()
    assert not any(m.training for m in system.modules())  # back to eval


def test_dreambooth_trains_both_models_until_the_text_encoder_stops_then_evals_it():
    system = small_toy(seed=1).eval()
    seen = _watch({"dropout": _base_dropout(system), "text": _text_dropout(system)})
    _run("dreambooth", system, config=FitConfig(steps=4, batch_size=2, learning_rate=1e-3, text_encoder_steps=2))
    # train_db.py: unet.train(); text_encoder.train() before the stop, text_encoder.train(False) from it
    assert seen["dropout"] == [True] * 4
    assert seen["text"] == [True, True, False, False]
    assert not any(m.training for m in system.modules())


def test_a_hypernetwork_in_eval_mode_trains_in_training_mode_and_goes_back_to_eval():
    system = small_toy(seed=1).eval()
    adaptation = METHODS["hypernetwork"].adapt(system, seed=1)
    adaptation.hypernetwork.eval()  # as a loaded file comes back
    mlp = next(m for m in adaptation.hypernetwork.modules() if type(m).__name__ == "HypernetworkMLP")
    seen = _watch({"mlp": mlp, "dropout": _base_dropout(system)})
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=_CONFIG)
    assert seen["mlp"] and all(seen["mlp"])  # A1111: hypernetwork.train() for the loop
    assert not any(seen["dropout"])  # the UNet's own layers stay in eval mode
    assert not any(m.training for m in adaptation.hypernetwork.modules())


def test_an_on_step_that_switches_to_eval_mode_does_not_change_the_next_steps():
    system = small_toy(seed=1).eval()
    seen = _watch({"dropout": _base_dropout(system)})
    _run("full", system, config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3),
         on_step=lambda info: system.eval())  # (a sample in eval mode)
    assert seen["dropout"] == [True] * 3


def test_the_modes_come_back_when_a_step_fails():
    system = small_toy(seed=1)
    system.unet.eval()
    system.text_encoder.train()
    before = _modes(system)

    def fail(info):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _run("full", system, on_step=fail)
    assert _modes(system) == before


def test_a_unet_dropout_is_drawn_when_the_unet_fine_tunes():
    """The numbers: with p = 0.5 in the UNet's dropout layers a fine-tune's first loss differs from
    the same run with p = 0 (the old loop kept an eval-mode system in eval mode: no dropout)."""
    losses = []
    for p in (0.0, 0.5):
        system = small_toy(seed=1).eval()
        for m in system.unet.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
        adaptation = METHODS["full"].adapt(system, seed=1)
        images, captions = concept_data("cross", 2, seed=0)
        torch.manual_seed(0)
        losses.append(fit(system, adaptation, images, captions, config=FitConfig(steps=1, batch_size=2, learning_rate=1e-3)))
    assert losses[0] != losses[1]


class _ModuleAdaptation(nn.Module):
    """An adaptation that is an ``nn.Module`` of its own (kohya's network object): one parameter
    (which the toy's forward does not read) and a dropout layer."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.ones(()))
        self.params = [self.scale]

    def save(self, path, *, metadata=None):  # pragma: no cover - not saved here
        raise NotImplementedError

    def remove(self) -> None:
        pass


def test_an_adaptation_module_trains_in_training_mode_as_kohyas_network_train():
    system = small_toy(seed=1).eval()
    adaptation = _ModuleAdaptation().eval()
    seen: list[bool] = []
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=_CONFIG,
        on_step=lambda info: seen.extend([adaptation.training, adaptation.drop.training]))
    assert seen == [True, True] * 2  # train_network.py:1407, networks/lora.py:1249-1250: network.train()
    assert not adaptation.training and not adaptation.drop.training


def test_cuda_graph_with_checkpointing_sees_the_run_modes_a_fine_tuned_unets_dropout_refused():
    """The refusal reads the modes the steps run in: a fine-tuned UNet's dropout (p > 0) draws
    there even when the caller's UNet is in eval mode; the modes come back after the refusal."""
    system = small_toy(seed=1).eval()
    for m in system.unet.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    config = FitConfig(steps=1, batch_size=2, learning_rate=1e-3, cuda_graph=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="cannot replay the dropout"):
        _run("full", system, config=config)
    assert not any(m.training for m in system.modules())
