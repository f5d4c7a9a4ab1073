"""Fine-tune / DreamBooth extras: text-encoder co-training that stops at a step, the EMA saved
beside the raw weights (LDM ``model_ema.*`` keys, diffusers ``unet_ema/``), and ``--extract-lora``
(the LoRA of the change written beside the model)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.finetune import EMAWeights, extracted_lora_path, prepare_full
from sdadapt.toy import load_toy
from sdadapt.toy.evaluate import concept_data

_TE = "text_model.encoder.layers.0.self_attn.q_proj.weight"
_UNET = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _data():
    return concept_data("cross", 4, seed=0)


def _config(**kw):
    return FitConfig(steps=6, batch_size=2, learning_rate=1e-3, warmup_steps=0, schedule="constant", seed=0, **kw)


def _weights(system):
    return {**{f"unet.{k}": v.clone() for k, v in system.unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in system.text_encoder.state_dict().items()}}


def test_text_encoder_stops_at_its_step_while_the_unet_keeps_training():
    system = load_toy()
    adaptation = prepare_full(system, text_encoder=True)
    images, captions = _data()
    seen = [(system.text_encoder.state_dict()[_TE].clone(), system.unet.state_dict()[_UNET].clone())]
    grads = []

    def on_step(info):
        seen.append((system.text_encoder.state_dict()[_TE].clone(), system.unet.state_dict()[_UNET].clone()))
        grads.append(next(system.text_encoder.parameters()).requires_grad)

    fit(system, adaptation, images, captions, config=_config(text_encoder_steps=3), on_step=on_step)
    for step in range(1, 7):
        te_before, unet_before = seen[step - 1]
        te_after, unet_after = seen[step]
        assert not torch.equal(unet_before, unet_after), f"the UNet must train at step {step}"
        if step <= 3:
            assert not torch.equal(te_before, te_after), f"the text encoder must train at step {step}"
        else:
            assert torch.equal(te_before, te_after), f"the text encoder must be frozen at step {step}"
    assert grads == [True, True, True, False, False, False]  # no graph through the text encoder after the stop
    assert all(p.requires_grad for p in system.text_encoder.parameters()), "requires_grad is restored afterwards"


def test_stop_past_the_end_is_plain_co_training_and_zero_never_trains_the_text_encoder():
    images, captions = _data()
    results = {}
    for stop in (None, 6, 0):
        system = load_toy()
        original = system.text_encoder.state_dict()[_TE].clone()
        fit(system, prepare_full(system, text_encoder=True), images, captions, config=_config(text_encoder_steps=stop))
        results[stop] = _weights(system)
        if stop == 0:
            assert torch.equal(system.text_encoder.state_dict()[_TE], original)
    for key, value in results[None].items():
        assert torch.equal(value, results[6][key]), key


def test_stopping_equals_two_phase_training_through_a_saved_state(tmp_path):
    """Phase 1 co-trains 3 steps and saves its state; phase 2 resumes with the text encoder frozen
    (its optimiser state kept): bit-identical to one run with ``text_encoder_steps=3``."""
    images, captions = _data()
    system = load_toy()
    fit(system, prepare_full(system, text_encoder=True), images, captions, config=_config(text_encoder_steps=3))
    one_run = _weights(system)

    class Stop(Exception):
        pass

    def phase_one(info):
        if info.step == 3:
            info.save_state(tmp_path / "state")
            raise Stop

    first = load_toy()
    with pytest.raises(Stop):
        fit(first, prepare_full(first, text_encoder=True), images, captions, config=_config(text_encoder_steps=10**6),
            on_step=phase_one)
    second = load_toy()
    fit(second, prepare_full(second, text_encoder=True), images, captions, config=_config(text_encoder_steps=0),
        resume=tmp_path / "state")
    two_phase = _weights(second)
    for key, value in one_run.items():
        assert torch.equal(value, two_phase[key]), key


def test_dreambooth_co_trains_the_text_encoder_for_the_first_half_unless_told_otherwise():
    images, captions = _data()
    for given, stop in ((None, 3), (5, 5)):
        system = load_toy()
        adaptation = METHODS["dreambooth"].adapt(system)
        assert adaptation.text_encoder_share == 0.5
        seen = [system.text_encoder.state_dict()[_TE].clone()]
        fit(system, adaptation, images, captions, config=_config(text_encoder_steps=given),
            on_step=lambda info, seen=seen, system=system: seen.append(system.text_encoder.state_dict()[_TE].clone()))
        changed = [not torch.equal(a, b) for a, b in itertools.pairwise(seen)]
        assert changed == [True] * stop + [False] * (6 - stop), given
    assert METHODS["dreambooth"].adapt(load_toy(), text_encoder=False).text_encoder_share is None  # UNet only


def test_text_encoder_steps_is_checked():
    with pytest.raises(ValueError, match="text_encoder_steps"):
        FitConfig(text_encoder_steps=-1)
    from types import SimpleNamespace

    system = load_toy()
    text_encoder_only = SimpleNamespace(params=list(system.text_encoder.parameters()))
    images, captions = _data()
    with pytest.raises(ValueError, match="would stop every trained parameter"):
        fit(system, text_encoder_only, images, captions, config=_config(text_encoder_steps=2))


# ------------------------------------------------------------------------------------ EMA beside
@pytest.fixture()
def diffusers_system(tmp_path):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(_tiny_pipeline(tmp_path / "sd"))


def _ema_run(system, decay):
    """fit with EMA kept beside: (raw UNet weights per step incl. the start, the EMA at the end)."""
    adaptation = prepare_full(system)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    history = [{k: v.double().clone() for k, v in system.unet.state_dict().items()}]
    kept = {}

    def on_step(info):
        history.append({k: v.double().clone() for k, v in system.unet.state_dict().items()})
        if info.step == info.total:
            with info.averaged():
                kept["ema"] = EMAWeights(adaptation.unet_weights(), decay, info.ema_updates)

    config = FitConfig(steps=5, batch_size=2, learning_rate=1e-2, warmup_steps=0, schedule="constant",
                       ema_decay=decay, ema_into_weights=False)
    fit(system, adaptation, images, ["a photo"] * 3, config=config, on_step=on_step)
    return adaptation, history, kept["ema"]


def _reference_ema(history, decay):
    """float64 EMA with diffusers' ``EMAModel.get_decay`` (defaults: update_after_step 0, no warm-up;
    huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 src/diffusers/training_utils.py:745-818
    ``get_decay``/``step``): at optimisation step n, k = max(0, n - 1); d = 0 at k = 0 (a copy), else
    min(decay, (1 + k) / (10 + k)); s -= (1 - d)(s - p)."""
    shadow = dict(history[0])
    for n, weights in enumerate(history[1:], 1):
        k = max(0, n - 0 - 1)
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        shadow = {key: shadow[key] - (1 - d) * (shadow[key] - weights[key]) for key in shadow}
    return shadow


def test_ema_beside_in_an_ldm_file_is_the_reference_ema_and_the_raw_weights_read_back(diffusers_system, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    system, decay = diffusers_system, 0.8
    adaptation, history, ema = _ema_run(system, decay)
    path = adaptation.save(tmp_path / "tuned.safetensors", ema=ema)
    ldm = load_file(path)
    assert ldm["model_ema.decay"].dtype == torch.float32 and float(ldm["model_ema.decay"]) == pytest.approx(decay)
    assert ldm["model_ema.num_updates"].dtype == torch.int32 and int(ldm["model_ema.num_updates"]) == 5
    assert any(k.startswith("model_ema.diffusion_modelinput_blocks") for k in ldm)  # CompVis LitEma names
    # diffusers' converter: the raw weights by default, the EMA with extract_ema=True
    raw = convert_ldm_unet_checkpoint(ldm, system.unet.config)
    for key, value in system.unet.state_dict().items():
        assert torch.equal(raw[key], value), key
        assert torch.equal(value.double(), history[-1][key]), "the model holds the last step's raw weights"
    averaged = convert_ldm_unet_checkpoint(ldm, system.unet.config, extract_ema=True)
    reference = _reference_ema(history, decay)
    moved = 0
    for key, value in reference.items():
        torch.testing.assert_close(averaged[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
        moved += not torch.allclose(value, history[-1][key])
    assert moved, "the EMA must differ from the raw weights (else the test proves nothing)"


def test_ema_beside_in_a_diffusers_folder_loads_with_emamodel(diffusers_system, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    system, decay = diffusers_system, 0.8
    adaptation, history, ema = _ema_run(system, decay)
    folder = adaptation.save(tmp_path / "tuned", ema=ema)
    loaded = EMAModel.from_pretrained(str(folder / "unet_ema"), model_cls=UNet2DConditionModel)
    assert loaded.decay == pytest.approx(decay) and loaded.optimization_step == 5
    reference = _reference_ema(history, decay)
    names = [n for n, _ in system.unet.named_parameters()]
    for name, shadow in zip(names, loaded.shadow_params):
        torch.testing.assert_close(shadow.double(), reference[name], rtol=1e-5, atol=1e-6, msg=name)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, system.unet.state_dict()[key]), key


# ------------------------------------------------------------------------------------ extract-lora
def _images(folder, n=3):
    from sdadapt.images import write_png

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = concept_data("cross", n, seed=0)
    for i, image in enumerate(images):
        write_png(folder / f"img{i}.png", image)
        (folder / f"img{i}.txt").write_text("a red cross")
    return folder


def test_extract_lora_after_a_toy_fine_tune_reproduces_the_tuned_unet_within_the_reported_error(tmp_path):
    import sdadapt
    from sdadapt.jobs import TrainOptions, run_train

    out = tmp_path / "tuned.safetensors"
    options = TrainOptions(images=_images(tmp_path / "imgs"), steps=4, learning_rate=1e-3, out=out, extract_lora=4,
                           save_state=False, log_with="csv")
    result = run_train("full", options)
    lora_file = extracted_lora_path(out, 4)
    assert result["lora"]["file"] == str(lora_file) and lora_file.name == "tuned-lora4.safetensors"
    tuned = load_toy(out)
    base = load_toy()
    state, _ = sdadapt.load_lora(lora_file)
    assert set(state) == {"unet"}  # the text encoder did not train
    originals = {k: v.clone() for k, v in base.unet.state_dict().items()}  # (the base before the LoRA goes in)
    sdadapt.apply_lora(base.unet, state["unet"])
    worst = 0.0
    tuned_w, base_w = tuned.unet.state_dict(), base.unet.state_dict()
    layers = {k[: -len(".lora_down.weight")] for k in state["unet"] if k.endswith(".lora_down.weight")}
    assert layers
    for layer in layers:
        original = originals[layer + ".weight"]
        residual = float((base_w[layer + ".weight"] - tuned_w[layer + ".weight"]).norm())
        norm = float((tuned_w[layer + ".weight"] - original).norm())
        worst = max(worst, residual / max(norm, 1e-30))
    assert math.isclose(worst, result["lora"]["max_relative_error"], rel_tol=1e-3, abs_tol=1e-6)
    assert worst < 1.0
    # the overwrite check covers the LoRA file before any training
    out.unlink()
    with pytest.raises(FileExistsError, match="lora4"):
        run_train("full", options)


def test_extract_lora_and_ema_beside_from_the_command_line_on_a_diffusers_folder(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    import sdadapt
    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem

    root = _tiny_pipeline(tmp_path / "sd")
    out = tmp_path / "tuned"
    code = main(["train", "dreambooth", "--images", str(_images(tmp_path / "imgs")), "--model", str(root),
                 "--class-prompt", "a photo", "--class-images", "2", "--steps", "3", "--lr", "1e-2", "--ema-decay", "0.9",
                 "--ema-save", "beside", "--extract-lora", "2", "--stop-text-encoder-training", "1", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tuned-lora2.safetensors: rank-2 LoRA of the change" in captured.out
    assert (out / "unet_ema" / "config.json").is_file()
    state, _ = sdadapt.load_lora(tmp_path / "tuned-lora2.safetensors")
    assert "unet" in state
    # the extracted LoRA applied to the base gets closer to the tuned UNet than the base is
    base, tuned = DiffusersSystem.from_folder(root), DiffusersSystem.from_folder(out)
    before = sum(float((b - t).norm()) for b, t in zip(base.unet.parameters(), tuned.unet.parameters()))
    sdadapt.apply_lora(base.unet, state["unet"])
    after = sum(float((b - t).norm()) for b, t in zip(base.unet.parameters(), tuned.unet.parameters()))
    assert after < before


def test_ema_save_and_extract_lora_are_refused_where_they_do_not_apply(tmp_path):
    from sdadapt.jobs import TrainOptions, run_train

    images = _images(tmp_path / "imgs")
    with pytest.raises(ValueError, match="extract-lora is for the whole-model"):
        run_train("lora", TrainOptions(images=images, steps=1, out=tmp_path / "a.safetensors", extract_lora=4))
    with pytest.raises(ValueError, match="needs --ema-decay"):
        run_train("full", TrainOptions(images=images, steps=1, out=tmp_path / "b.safetensors", ema_save="beside"))
    with pytest.raises(ValueError, match="no place for an EMA"):  # the toy file has no EMA slot: refused before training
        run_train("full", TrainOptions(images=images, steps=1, out=tmp_path / "c.safetensors", ema_save="beside",
                                       ema_decay=0.9))
    assert not (tmp_path / "c.safetensors").exists()
    with pytest.raises(ValueError, match="ema-save"):
        TrainOptions(images=images, ema_save="both")
    assert METHODS["full"].prior == "off"


def test_toml_keys_for_the_extras(tmp_path):
    import dataclasses

    from sdadapt.cli.train import read_config
    from sdadapt.jobs import TrainOptions

    config = tmp_path / "train.toml"
    config.write_text("stop_text_encoder_training = 5\nema_save = 'beside'\nextract_lora = 8\n")
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    options, _, _ = read_config(config, fields=fields, method_options={"text_encoder"})
    assert options == {"text_encoder_steps": 5, "ema_save": "beside", "extract_lora": 8}
