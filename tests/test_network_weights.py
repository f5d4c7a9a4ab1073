"""`train --network-weights FILE` / `--dim-from-weights` (kohya's ``network_weights`` / ``dim_from_weights``).

kohya (train_network.py): the network is built from the options and ``network.load_weights(file)``
loads the file with ``load_state_dict(strict=False)``: missing / unexpected modules are only
logged, a shape that does not fit is an error; with ``dim_from_weights``
``create_network_from_weights`` builds the file's own modules with the file's ranks
(``lora_down.weight`` axis 0) and alphas (``alpha``, else the rank). Here: the adapters take the
file's tensors exactly, so their ΔW is the file's before the first step.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors import safe_open
from toy_adapter_files import random_adapter_file

from sdadapt.adapters.base import geometry_of
from sdadapt.adapters.registry import file_layer_delta
from sdadapt.cli import main
from sdadapt.formats.files import WeightFileError, read_safetensors, write_safetensors
from sdadapt.formats.layers import group_by_layer, resolve_layers
from sdadapt.jobs.train import TrainOptions
from sdadapt.methods import METHODS
from sdadapt.toy import load_toy


@pytest.fixture(scope="module")
def toy():
    return load_toy()



def _live_layer(model, layer_path: str):
    name = resolve_layers(model, [layer_path])[layer_path]
    return name, dict(model.named_modules())[name]


def test_lora_adapters_start_from_the_files_weights_exactly(toy, tmp_path):
    """Each adapter's tensors are the file's bit for bit, and its ΔW equals a float64 reference
    ``up @ down · alpha / rank`` of the file's tensors (and the registry's file delta exactly)."""
    file = tmp_path / "start.safetensors"
    components = random_adapter_file(toy, file, "lora", rank=4, alpha=2.0)
    adaptation = METHODS["lora"].adapt(toy, seed=3, rank=4, alpha=2.0, network_weights=str(file))
    try:
        compared = 0
        for component, state in components.items():
            handle = adaptation.handles[component]
            model = getattr(toy, component)
            for layer, tensors in group_by_layer(state).items():
                name, base = _live_layer(model, layer)
                adapter = handle.modules[name]
                for key, value in tensors.items():
                    assert torch.equal(adapter.file_tensors()[key], value.float()), (layer, key)
                down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
                reference = (up.flatten(1) @ down.flatten(1)) * (float(tensors["alpha"]) / down.shape[0])
                with torch.no_grad():
                    delta = adapter.delta_weight()
                torch.testing.assert_close(delta.double().reshape(reference.shape), reference, rtol=1e-5, atol=1e-6)
                registry, _ = file_layer_delta(dict(tensors), geometry_of(base, name=name))
                assert torch.equal(delta.reshape(registry.shape), registry)
                compared += 1
        assert compared == sum(len(h) for h in adaptation.handles.values()) > 0
        assert adaptation.notes and "start from the file's weights" in adaptation.notes[0]
    finally:
        adaptation.remove()


@pytest.mark.parametrize("method, options", [("locon", {"rank": 4}), ("loha", {"rank": 2}), ("dora", {"rank": 2}),
                                             ("lokr", {"rank": 2})])
def test_lycoris_and_locon_files_load_exactly(toy, tmp_path, method, options):
    """LoCon (conv modules), LoHa, LoKr and DoRA files: the run's adapters hold the file's tensors
    and the same ΔW as the registry's file delta (DoRA: the merged change W' − W)."""
    file = tmp_path / f"{method}.safetensors"
    components = random_adapter_file(toy, file, method, **options)
    adaptation = METHODS[method].adapt(toy, seed=3, network_weights=str(file), **options)
    try:
        for component, state in components.items():
            model = getattr(toy, component)
            for layer, tensors in group_by_layer(state).items():
                name, base = _live_layer(model, layer)
                adapter = adaptation.handles[component].modules[name]
                for key, value in tensors.items():
                    assert torch.equal(adapter.file_tensors()[key], value.float()), (layer, key)
                expected, _ = file_layer_delta(dict(tensors), geometry_of(base, name=name), base_weight=base.weight)
                with torch.no_grad():
                    delta = adapter.merge_delta(base.weight.reshape(adapter.geometry.weight_shape))
                assert torch.equal(delta.reshape(expected.shape), expected), layer
    finally:
        adaptation.remove()


def test_a_run_starts_from_the_file_before_its_first_step(toy, red_circles, tmp_path, monkeypatch, capsys):
    """Through `train`: what `fit` receives already holds the file's weights, and the report says so."""
    file = tmp_path / "start.safetensors"
    components = random_adapter_file(toy, file, "lora", rank=4, alpha=1.0)
    jobs = importlib.import_module("sdadapt.jobs.train")
    seen: list[dict] = []
    real_fit = jobs.fit

    def fit(system, adaptation, *args, **kwargs):
        seen.append({c: h.state_dict() for c, h in adaptation.handles.items()})
        seen[-1] = {c: {k: v.clone() for k, v in s.items()} for c, s in seen[-1].items()}
        return real_fit(system, adaptation, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit", fit)
    out = tmp_path / "next.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--network-weights", str(file), "--network-dim", "4",
                 "--network-alpha", "1", "--steps", "1", "--batch-size", "2", "--no-prior", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--network-weights {file}: 96 module(s) start from the file's weights" in err
    (state,) = seen
    for component, file_state in components.items():
        model = getattr(toy, component)
        for layer, tensors in group_by_layer(file_state).items():
            name, _ = _live_layer(model, layer)
            for key, value in tensors.items():
                assert torch.equal(state[component][f"{name}.{key}"], value.float())
    assert out.is_file()


def test_rank_alpha_and_family_mismatches_name_module_file_value_and_option(toy, red_circles, tmp_path, capsys):
    file = tmp_path / "r4.safetensors"
    random_adapter_file(toy, file, "lora", rank=4, alpha=1.0)
    base = ["--images", str(red_circles), "--network-weights", str(file), "--steps", "1", "--no-prior",
            "-o", str(tmp_path / "o.safetensors")]
    assert main(["train", "lora", *base, "--network-dim", "8", "--network-alpha", "1"]) == 2
    err = capsys.readouterr().err
    assert "has rank 4, --network-dim gives rank 8; pass --network-dim 4 or --dim-from-weights" in err and "module" in err
    assert main(["train", "lora", *base, "--network-dim", "4"]) == 2
    assert "has alpha 1, --network-alpha gives 4; pass --network-alpha 1" in capsys.readouterr().err
    assert main(["train", "loha", *base, "--network-dim", "4", "--network-alpha", "1"]) == 2
    assert "is lora, the run trains loha" in capsys.readouterr().err
    # nothing was left injected by the refused runs: the toy model is as it was
    assert not any(".sdadapt." in n for n, _ in toy.unet.named_modules())


def test_dim_from_weights_takes_modules_family_ranks_and_alphas_from_the_file(toy, tmp_path):
    """kohya's create_network_from_weights: the file's modules, ranks and alphas (no alpha: the rank)."""
    file = tmp_path / "loha.safetensors"
    components = random_adapter_file(toy, file, "loha", rank=3, alpha=1.5, text_encoder=False)
    # train lora --dim-from-weights on a LoHa file trains the file's LoHa modules
    adaptation = METHODS["lora"].adapt(toy, network_weights=str(file), dim_from_weights=True)
    try:
        assert set(adaptation.handles) == {"unet"}
        modules = list(adaptation.handles["unet"].modules.values())
        assert len(modules) == len(group_by_layer(components["unet"]))
        assert {type(m).__name__ for m in modules} == {"LoHaModule"} and {m.rank for m in modules} == {3}
        assert {float(m.alpha) for m in modules} == {1.5}
        assert all(p.requires_grad and p.dtype == torch.float32 for p in adaptation.params)
    finally:
        adaptation.remove()
    # a LoRA file without alpha tensors: alpha = rank (kohya's "old LoRA without alpha")
    lora = tmp_path / "r2.safetensors"
    random_adapter_file(toy, lora, "lora", rank=2, alpha=2.0, text_encoder=False)
    tensors, meta = read_safetensors(lora)
    write_safetensors(tmp_path / "noalpha.safetensors", {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, meta)
    adaptation = METHODS["lora"].adapt(toy, network_weights=str(tmp_path / "noalpha.safetensors"), dim_from_weights=True)
    try:
        assert {float(m.alpha) for m in adaptation.handles["unet"].modules.values()} == {2.0}
    finally:
        adaptation.remove()


def test_modules_the_run_does_not_target_or_the_file_lacks_are_reported(toy, tmp_path):
    file = tmp_path / "lora.safetensors"
    components = random_adapter_file(toy, file, "lora", rank=4, alpha=4.0, text_encoder=False)
    in_file = len(group_by_layer(components["unet"]))
    adaptation = METHODS["locon"].adapt(toy, rank=4, network_weights=str(file))  # + ResNets and convs, text encoder
    try:
        notes = " ".join(adaptation.notes)
        total = sum(len(h) for h in adaptation.handles.values())
        assert f"{in_file} module(s) start from the file's weights" in notes
        assert f"{total - in_file} targeted module(s) are not in the file and train from their initialisation" in notes
    finally:
        adaptation.remove()
    locon = tmp_path / "locon.safetensors"
    random_adapter_file(toy, locon, "locon", rank=4, alpha=4.0, conv_rank=2, conv_alpha=2.0)
    adaptation = METHODS["lora"].adapt(toy, rank=4, network_weights=str(locon), text_encoder=False)
    try:
        assert any("module(s) of the file are not targeted by this run and are left out" in n for n in adaptation.notes)
    finally:
        adaptation.remove()


def _rewrite(src, dst, *, tensors=None, metadata=None):
    old_tensors, old_meta = read_safetensors(src)
    write_safetensors(dst, tensors(old_tensors) if tensors else old_tensors, {**old_meta, **(metadata or {})})


def test_a_file_for_another_base_model_is_refused(toy, tmp_path):
    file = tmp_path / "sd1.safetensors"
    random_adapter_file(toy, file, "lora", rank=2, alpha=2.0)
    sdxl = tmp_path / "sdxl.safetensors"
    _rewrite(file, sdxl, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(WeightFileError, match="made for SDXL .* the model is SD1"):
        METHODS["lora"].adapt(toy, rank=2, network_weights=str(sdxl))
    te2 = tmp_path / "te2.safetensors"  # an SDXL file's second text encoder, no metadata
    _rewrite(file, te2, tensors=lambda t: {k.replace("lora_te_", "lora_te2_"): v for k, v in t.items()},
             metadata={"ss_base_model_version": ""})
    with pytest.raises(WeightFileError, match="text_encoder_2 modules the model has no place for"):
        METHODS["lora"].adapt(toy, rank=2, network_weights=str(te2))
    wide = tmp_path / "wide.safetensors"  # an SD2-like file: the cross-attention reads a wider context

    def widen(t):
        key = next(k for k in t if "attn2_to_k.lora_down" in k)
        return {**t, key: torch.zeros(t[key].shape[0], t[key].shape[1] + 8)}

    _rewrite(file, wide, tensors=widen, metadata={"ss_base_model_version": ""})
    with pytest.raises(WeightFileError, match="attn2.to_k is for a layer of shape .* made for another base model"):
        METHODS["lora"].adapt(toy, rank=2, network_weights=str(wide))
    assert not any(".sdadapt." in n for n, _ in toy.unet.named_modules())


def test_options_are_checked_before_the_model_loads(red_circles, tmp_path, capsys):
    with pytest.raises(ValueError, match="--dim-from-weights takes the modules and ranks from --network-weights"):
        TrainOptions(images=".", method_options={"dim_from_weights": True})
    assert main(["train", "lora", "--images", str(red_circles), "--network-weights", str(tmp_path / "none.safetensors"),
                 "-o", str(tmp_path / "o.safetensors")]) != 0
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "full", "--images", str(red_circles), "--network-weights", "x.safetensors",
                 "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "is an option of" in capsys.readouterr().err


def test_kohya_toml_keys_and_resume(toy, red_circles, tmp_path, capsys):
    """``network_weights`` / ``dim_from_weights`` in a kohya TOML; a resumed run must name the same file
    (the state's weights win: the report says so)."""
    file = tmp_path / "start.safetensors"
    random_adapter_file(toy, file, "lora", rank=2, alpha=1.0)
    config = tmp_path / "kohya.toml"
    config.write_text(f'network_weights = "{file}"\ndim_from_weights = true\nnetwork_dim = 16\n')
    out = tmp_path / "o.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "2",
                 "--save-every-n-steps", "1", "--batch-size", "2", "--no-prior", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--network-dim: not used with --dim-from-weights" in err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "2"
    state = tmp_path / "o-state"
    assert main(["train", "lora", "--images", str(red_circles), "--steps", "2", "--batch-size", "2", "--no-prior",
                 "-o", str(out), "--overwrite", "--resume", str(state)]) == 2
    assert "method options" in capsys.readouterr().err
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "3", "--batch-size",
                 "2", "--no-prior", "-o", str(out), "--overwrite", "--resume", str(state)]) == 0
    assert "the saved state's weights replace --network-weights" in capsys.readouterr().err
