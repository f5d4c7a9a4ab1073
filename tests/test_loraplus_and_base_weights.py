"""kohya's LoRA+ ratios, --network_train_text_encoder_only, --base_weights and SDXL's --block_lr.

Reference behaviour (kohya sd-scripts):

* ``networks/lora.py`` ``prepare_optimizer_params`` ``assemble_params``: "if ratio is not None and
  "lora_up" in name" the parameter goes to the "plus" group with ``lr * ratio``; the UNet's ratio is
  ``loraplus_unet_lr_ratio or loraplus_lr_ratio``, the text encoder's ``loraplus_text_encoder_lr_ratio
  or loraplus_lr_ratio``; with block lr weights each block's group has ``unet_lr * get_lr_weight(idx)``
  and its plus group that times the ratio. The ratios are ``network_args`` (since 2024-04; before,
  top-level options) and so land in ``ss_network_args``; kohya writes no other ``ss_*`` key for them.
  LyCORIS' ``kohya.py`` groups the same way by ``"lora_up" in name`` (LoHa/LoKr have none).
* ``train_network.py``: ``train_unet = not args.network_train_text_encoder_only`` and
  ``network.apply_to(..., train_unet)``, whose ``apply_unet=False`` leaves ``unet_loras = []``.
* ``train_network.py``: for each ``base_weights[i]``, ``multiplier = base_weights_multiplier[i]`` or
  1.0 "if args.base_weights_multiplier is None or len(args.base_weights_multiplier) <= i", then
  ``create_network_from_weights(multiplier, ...)`` and ``merge_to`` (W += multiplier · ΔW) before the
  trained network is created.
* ``sdxl_train.py`` ``get_block_params_to_optimize``: ``time_embed./label_emb.`` -> 0,
  ``input_blocks.N`` -> 1 + N, ``middle_block.N`` -> 10 + N, ``output_blocks.N`` -> 13 + N, ``out.`` -> 22;
  "if block_lrs[i] == 0: continue" (not optimised); 23 values or an assertion error.
"""

from __future__ import annotations

import importlib
import json
import types

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sdxl

import sdadapt
from sdadapt.errors import InputError
from sdadapt.formats.layers import group_by_layer, resolve_layers
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.base_weights import base_weights_multipliers, merge_base_weights
from sdadapt.methods.block_lr import parse_block_lr
from sdadapt.methods.finetune import prepare_full
from sdadapt.methods.lora import prepare_loha, prepare_lora
from sdadapt.methods.loraplus import loraplus_ratios
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.step import StepConfig


def _system(sdxl: bool = False, dtype: torch.dtype = torch.float32):
    unet = (tiny_unet_sdxl() if sdxl else tiny_unet_sd1()).to(dtype)
    return types.SimpleNamespace(unet=unet, text_encoder=tiny_clip().to(dtype), base_model="sdxl" if sdxl else "sd1")


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ LoRA+
def test_loraplus_ratios_follow_kohyas_or_and_refuse_non_positive():
    assert loraplus_ratios() == (None, None)
    assert loraplus_ratios(loraplus_lr_ratio=16) == (16.0, 16.0)
    assert loraplus_ratios(loraplus_lr_ratio="16", loraplus_unet_lr_ratio="4") == (4.0, 16.0)
    assert loraplus_ratios(loraplus_text_encoder_lr_ratio=2) == (None, 2.0)
    for bad in (0, -1, float("inf"), "x"):
        with pytest.raises(InputError, match="loraplus_lr_ratio"):
            loraplus_ratios(loraplus_lr_ratio=bad)


def test_lr_scales_multiply_the_up_factors_and_the_block_weights():
    """kohya: a block's plus group has unet_lr · block weight · ratio; text-encoder ups te_lr · te ratio."""
    system = _system()
    blocks = {"down_lr_weight": "0.5,0.25", "mid_lr_weight": "0.2", "up_lr_weight": "1,1,1,0.75"}
    plain = prepare_lora(system, rank=2, **blocks)
    base = list(plain.lr_scales)
    names = [(c, n) for c, _, n, _ in plain._entries()]
    plain.remove()
    plus = prepare_lora(system, rank=2, loraplus_unet_lr_ratio=4, loraplus_text_encoder_lr_ratio=2, **blocks)
    assert [(c, n) for c, _, n, _ in plus._entries()] == names
    want = [s * (1.0 if "lora_up" not in n else 2.0 if c == "text_encoder" else 4.0) for (c, n), s in zip(names, base)]
    assert plus.lr_scales == want
    assert {0.5 * 4, 0.2 * 4, 0.75 * 4, 2.0} <= set(plus.lr_scales)  # the hand-computed up factors are there
    assert plus.network_args["loraplus_unet_lr_ratio"] == "4" and plus.network_args["loraplus_text_encoder_lr_ratio"] == "2"
    plus.remove()


def test_optimiser_group_lrs_and_one_adamw_step_from_zero(monkeypatch):
    """The optimiser's groups (hand-computed LRs) and one AdamW step: lora_up starts at 0, so the first
    step's update is lr·ratio·m̂/(√v̂+ε) with the same gradient as without LoRA+ — exactly ratio× the plain
    run's; lora_down gets no gradient at step 1 (up = 0) and stays where it was in both runs."""
    fit_module = importlib.import_module("sdadapt.methods.fit")  # (sdadapt.methods.fit is also the function)
    layouts = []
    real = fit_module.make_optimizer

    def recording(layout, config):
        layouts.append([(g["lr"], len(g["params"])) for g in layout])
        return real(layout, config)

    monkeypatch.setattr(fit_module, "make_optimizer", recording)
    images, captions = concept_data("cross", 4, seed=0)
    runs = {}
    for label, plus in (("plain", {}), ("plus", {"loraplus_unet_lr_ratio": 8.0, "loraplus_text_encoder_lr_ratio": 2.0})):
        system = build_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1, rank=4, **plus)
        before = [p.detach().clone() for p in adaptation.params]
        fit(system, adaptation, images, captions,
            config=FitConfig(steps=1, batch_size=2, learning_rate=1e-3, text_encoder_lr=5e-4, warmup_steps=0,
                             schedule="constant", weight_decay=0.0, optimizer="adamw", step=StepConfig(max_grad_norm=None)))
        names = [(c, n) for c, _, n, _ in adaptation._entries()]
        runs[label] = (names, before, [p.detach().clone() for p in adaptation.params])
        adaptation.remove()
    plain_layout, plus_layout = layouts
    assert sorted(lr for lr, _ in plain_layout) == [5e-4, 1e-3]
    assert sorted(lr for lr, _ in plus_layout) == pytest.approx(sorted([1e-3, 8e-3, 5e-4, 1e-3]), rel=1e-15)
    assert sum(n for _, n in plus_layout) == sum(n for _, n in plain_layout)
    names, before, plain_after = runs["plain"]
    _, before_plus, plus_after = runs["plus"]
    moved = 0
    for (component, name), b0, b1, a, p in zip(names, before, before_plus, plain_after, plus_after, strict=True):
        assert torch.equal(b0, b1)
        if "lora_up" in name:
            ratio = 2.0 if component == "text_encoder" else 8.0
            assert torch.allclose(p - b1, ratio * (a - b0), rtol=1e-5, atol=1e-9), (component, name)
            moved += int((a - b0).abs().max() > 0)
        else:
            assert torch.equal(p, a) and torch.equal(a, b0), (component, name)
    assert moved > 0


def test_loraplus_is_refused_for_families_without_up_factors():
    system = _system()
    with pytest.raises(InputError, match="lora_up"):
        prepare_loha(system, rank=2, loraplus_lr_ratio=16)
    assert not any("sdadapt" in n for n, _ in system.unet.named_modules())  # nothing left injected


# ------------------------------------------------------------------ text encoder only
def test_text_encoder_only_trains_no_unet_parameter(tmp_path):
    system = build_toy(seed=1)
    unet_before = _state(system.unet)
    adaptation = METHODS["lora"].adapt(system, seed=1, rank=4, unet=False)
    assert set(adaptation.handles) == {"text_encoder"}
    unet_ids = {id(p) for p in system.unet.parameters()}
    assert adaptation.params and not any(id(p) in unet_ids for p in adaptation.params)
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-2, warmup_steps=0))
    assert all(torch.equal(v, unet_before[k]) for k, v in system.unet.state_dict().items())
    out = adaptation.save(tmp_path / "te.safetensors")
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_te") for k in keys)
    adaptation.remove()


def test_text_encoder_only_refusals():
    system = _system()
    with pytest.raises(InputError, match="nothing would train"):
        prepare_lora(system, unet=False, text_encoder=False)
    with pytest.raises(InputError, match="UNet options"):
        prepare_lora(system, unet=False, down_lr_weight="sine")



@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_loraplus_ratio_of_a_part_not_trained_is_unused_as_kohya(part):
    """GUIs write every LoRA+ field into network_args; kohya keeps a ratio of a part it does not train and never reads
    it (networks/lora.py: apply_to empties that part's modules). The run trains, with a note; the rates of what
    trains are plain LoRA's (or the other part's ratio's)."""
    ratio = "loraplus_unet_lr_ratio" if part == "unet" else "loraplus_text_encoder_lr_ratio"
    options = {"unet": False} if part == "unet" else {"text_encoder": False}
    plain = prepare_lora(_system(), rank=2, **options)
    plus = prepare_lora(_system(), rank=2, **options, **{ratio: 4})
    assert plus.lr_scales in (None, [1.0] * len(plus.params)) and len(plus.params) == len(plain.params)
    assert any(n.startswith(f"{ratio} (") and "not used" in n for n in plus.notes), plus.notes
    assert plus.network_args[ratio] == "4"  # (kohya keeps it in ss_network_args)
    other = "loraplus_text_encoder_lr_ratio" if part == "unet" else "loraplus_unet_lr_ratio"
    both = prepare_lora(_system(), rank=2, **options, **{ratio: 4, other: 2})
    want = [2.0 if name == "lora_up" else 1.0 for *_, name, _ in both._entries()]
    assert both.lr_scales == want


# ------------------------------------------------------------------ base weights
def _random_lora_file(system, path, *, seed: int, rank: int = 2, alpha: float = 1.0):
    adaptation = prepare_lora(system, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptation.params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    adaptation.save(path)
    adaptation.remove()


def _reference_merge(system, files_and_multipliers) -> dict[str, dict[str, torch.Tensor]]:
    """float64: W + Σ m_i · (alpha/r) · up @ down for every layer of every file."""
    want = {c: _state(getattr(system, c)) for c in ("unet", "text_encoder")}
    for path, multiplier in files_and_multipliers:
        components, _ = sdadapt.load_lora(path)
        for component, state in components.items():
            model = getattr(system, component)
            groups = group_by_layer(state)
            for layer, live in resolve_layers(model, list(groups)).items():
                t = {k: v.double() for k, v in groups[layer].items()}
                up, down = t["lora_up.weight"], t["lora_down.weight"]
                rank = down.shape[0]
                delta = (up.flatten(1) @ down.flatten(1)) * (float(t["alpha"]) / rank)
                key = f"{live}.weight"
                want[component][key] = want[component][key] + multiplier * delta.reshape(want[component][key].shape)
    return want


def test_base_weights_merge_equals_base_plus_multiplier_delta_and_undo_is_exact(tmp_path):
    system = _system(dtype=torch.float64)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _random_lora_file(system, a, seed=1)
    _random_lora_file(system, b, seed=2, rank=3, alpha=3.0)
    original = {c: _state(getattr(system, c)) for c in ("unet", "text_encoder")}
    want = _reference_merge(system, [(a, 0.7), (b, 1.0)])  # kohya: a missing multiplier is 1.0
    merged = merge_base_weights(system, [a, b], multipliers=[0.7])
    assert merged.multipliers == [0.7, 1.0] and all(n > 0 for n in merged.layers)
    for component, state in want.items():
        got = getattr(system, component).state_dict()
        for key, value in state.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14, msg=key)
    merged.undo()
    for component, state in original.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(system, component).state_dict().items())


def test_a_run_on_base_weights_saves_only_its_own_adapters(tmp_path):
    system = _system()
    base = tmp_path / "base.safetensors"
    _random_lora_file(system, base, seed=3)
    original = {c: _state(getattr(system, c)) for c in ("unet", "text_encoder")}
    adaptation = prepare_lora(system, rank=2, base_weights=[str(base)], base_weights_multiplier=[0.5])
    assert adaptation.notes and "multiplier 0.5" in adaptation.notes[0]
    out = adaptation.save(tmp_path / "run.safetensors")
    with safe_open(str(out), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
        meta = f.metadata()
    assert ups and all(not u.any() for u in ups)  # only the new (zero-initialised) adapters, no base ΔW
    assert "base_weights" not in json.loads(meta.get("ss_network_args", "{}"))
    adaptation.remove()
    for component, state in original.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(system, component).state_dict().items())


def test_base_weights_refusals(tmp_path):
    assert base_weights_multipliers(2, None) == [1.0, 1.0]
    with pytest.raises(InputError, match="one multiplier per file"):
        base_weights_multipliers(1, [1.0, 2.0])
    system = _system()
    sdxl_file = tmp_path / "x.safetensors"
    _random_lora_file(_system(sdxl=True), sdxl_file, seed=4)
    before = _state(system.unet)
    with pytest.raises((InputError, ValueError), match="--base-weights"):
        prepare_lora(system, rank=2, base_weights=[str(sdxl_file)])
    assert all(torch.equal(v, before[k]) for k, v in system.unet.state_dict().items())


# ------------------------------------------------------------------ SDXL block_lr
def _kohya_block_of_tiny_sdxl(name: str) -> int:
    """The tiny SDXL UNet (2 blocks, 2 layers each) by hand: LDM input_blocks.(1 + 3i + j) etc."""
    parts = name.split(".")
    if parts[0] in ("time_embedding", "add_embedding"):
        return 0
    if parts[0] == "conv_in":
        return 1
    if parts[0] in ("conv_norm_out", "conv_out"):
        return 22
    if parts[0] == "mid_block":
        return 11 if parts[1] == "attentions" else 10 + 2 * int(parts[2])
    i, kind, j = int(parts[1]), parts[2], int(parts[3])
    j = 2 if kind in ("downsamplers", "upsamplers") else j
    return (2 + 3 * i + j) if parts[0] == "down_blocks" else 13 + 3 * i + j


def test_block_lr_groups_on_a_tiny_sdxl_unet():
    system = _system(sdxl=True)
    rates = [1e-5 * (k + 1) for k in range(23)]
    rates[11] = 0.0  # the middle attention: frozen
    before = [p.requires_grad for p in system.unet.parameters()]
    adaptation = prepare_full(system, block_lr=",".join(str(r) for r in rates), learning_rate=2e-4)
    unet = {id(p): n for n, p in system.unet.named_parameters()}
    blocks = {n: _kohya_block_of_tiny_sdxl(n) for n in unet.values()}
    assert sorted(set(blocks.values())) == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 22]
    kept = [unet[id(p)] for p in adaptation.params]
    assert kept == [n for n in unet.values() if blocks[n] != 11]
    for name, scale in zip(kept, adaptation.lr_scales, strict=True):
        assert 2e-4 * scale == pytest.approx(rates[blocks[name]], rel=1e-14), name
    assert not any(p.requires_grad for n, p in system.unet.named_parameters() if blocks[n] == 11)
    adaptation.remove()
    assert [p.requires_grad for p in system.unet.parameters()] == before


def test_block_lr_and_block_wise_lora_share_kohyas_sdxl_block_map():
    """One SDXL block map (``lora_blocks.sdxl_block_index``) for --block-lr and the block-wise LoRA
    options: kohya's ``get_block_params_to_optimize`` rule, written out here, on LDM names, and on
    the diffusers layers kohya's LoRA ``get_block_index`` also places (time/label embeddings: 0, out: 22)."""
    from sdadapt.methods.lora_blocks import kohya_block_index, sdxl_block_index

    def kohya(name: str) -> int:
        if name.startswith(("time_embed.", "label_emb.")):
            return 0
        for prefix, first in (("input_blocks.", 1), ("middle_block.", 10), ("output_blocks.", 13)):
            if name.startswith(prefix):
                return first + int(name.split(".")[1])
        return 22 if name.startswith("out.") else -1

    names = ["time_embed.0.weight", "label_emb.0.2.bias", "input_blocks.0.0.weight", "input_blocks.8.1.proj_in.weight",
             "middle_block.0.in_layers.2.weight", "middle_block.2.out_layers.3.bias", "output_blocks.0.1.norm.weight",
             "output_blocks.8.0.skip_connection.weight", "out.0.weight", "out.2.bias", "model_ema.decay"]
    assert [sdxl_block_index(n) for n in names] == [kohya(n) for n in names] == [0, 0, 1, 9, 10, 12, 13, 21, 22, 22, -1]
    diffusers = {"time_embedding.linear_1": 0, "add_embedding.linear_2": 0, "conv_in": 1, "conv_norm_out": 22,
                 "conv_out": 22, "mid_block.resnets.1.conv1": 12, "up_blocks.2.resnets.2.conv2": 21}
    for name, want in diffusers.items():
        assert kohya_block_index(name, sdxl=True, up_blocks_with_attention={0, 1}) == want, name


def test_block_lr_refusals():
    with pytest.raises(InputError, match="takes 23"):
        parse_block_lr("1e-4,1e-4")
    with pytest.raises(InputError, match=">= 0"):
        parse_block_lr(",".join(["1e-4"] * 22 + ["-1"]))
    with pytest.raises(InputError, match="sdxl_train"):
        prepare_full(_system(), block_lr=[1e-4] * 23)
    adaptation = prepare_full(_system(sdxl=True), block_lr=[1e-4] * 23)
    with pytest.raises(ValueError, match="learning rate"):
        adaptation.lr_scales  # noqa: B018 - the property raises without the run's learning rate
    adaptation.remove()


# ------------------------------------------------------------------ TOML, CLI, metadata
def _method_options():
    from sdadapt.cli.train import _method_options

    return set(_method_options())


def test_toml_keys_kohya_names(tmp_path):
    from sdadapt.cli.train import read_config

    config = tmp_path / "train.toml"
    config.write_text('loraplus_unet_lr_ratio = 4\nnetwork_train_text_encoder_only = true\nbase_weights = ["a.safetensors"]\n'
                      'base_weights_multiplier = [0.5]\nblock_lr = "1,2"\n'
                      'network_args = ["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=2"]\n')
    _, methods, _ = read_config(config, fields={"steps"}, method_options=_method_options())
    assert methods == {"loraplus_unet_lr_ratio": 4, "unet": False, "base_weights": ["a.safetensors"],
                       "base_weights_multiplier": [0.5], "block_lr": "1,2", "loraplus_lr_ratio": "16",
                       "loraplus_text_encoder_lr_ratio": "2"}


def test_a_gui_text_encoder_only_config_drops_its_conv_settings_with_a_note(tmp_path):
    """kohya_ss GUIs write conv_dim / conv_alpha in every LoRA config; with network_train_text_encoder_only
    kohya's create_network builds no UNet module, so they act on nothing there (a note, not the
    "UNet options with --no-unet" refusal prepare_lora gives for a conv rank asked for in Python)."""
    from sdadapt.cli.train import read_config

    config = tmp_path / "train.toml"
    config.write_text('network_args = ["conv_dim=8", "conv_alpha=4"]\nnetwork_train_text_encoder_only = true\n')
    _, methods, notes = read_config(config, fields={"steps"}, method_options=_method_options())
    assert methods == {"unet": False}
    assert notes == ["ignored conv_dim, conv_alpha (network_train_text_encoder_only: no UNet convolution is adapted)"]
    config.write_text('network_args = ["conv_dim=8", "conv_alpha=4"]\nnetwork_train_text_encoder_only = false\n')
    _, methods, notes = read_config(config, fields={"steps"}, method_options=_method_options())
    assert methods == {"unet": True, "conv_rank": "8", "conv_alpha": "4"} and notes == []


def test_options_are_checked_before_the_model_loads(red_circles, tmp_path, capsys):
    from sdadapt.cli import main
    from sdadapt.jobs.train import TrainOptions

    for options, message in (({"loraplus_lr_ratio": 0.0}, "loraplus_lr_ratio"),
                             ({"unet": False, "text_encoder": False}, "nothing would train"),
                             ({"base_weights_multiplier": [1.0]}, "give the files too"),
                             ({"block_lr": "1e-4"}, "takes 23")):
        with pytest.raises(ValueError, match=message):
            TrainOptions(images=str(red_circles), method_options=options)
    with pytest.raises(FileNotFoundError, match=r"none\.safetensors: no such file"):  # before the model loads
        TrainOptions(images=str(red_circles), method_options={"base_weights": [str(tmp_path / "none.safetensors")]})
    code = main(["train", "lora", "--images", str(red_circles), "--base-weights", str(tmp_path / "none.safetensors"),
                 "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code != 0 and "--base-weights" in err and "no such file" in err and "loading" not in err
    code = main(["train", "loha", "--images", str(red_circles), "--loraplus-lr-ratio", "4", "-o", str(tmp_path / "h.safetensors")])
    assert code != 0 and "loha has none" in capsys.readouterr().err


def test_cli_run_records_loraplus_in_ss_network_args(red_circles, tmp_path):
    from sdadapt.cli import main

    out = tmp_path / "plus.safetensors"
    config = tmp_path / "train.toml"
    config.write_text('loraplus_unet_lr_ratio = 4\nnetwork_args = ["loraplus_text_encoder_lr_ratio=2"]\n')
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "--batch-size", "2", "--no-prior", "-q", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    # (the network_args as written, kohya's json.dumps(net_kwargs) with its dropout; the top-level key, which sd-scripts
    # would not read, after them as applied)
    assert args == {"loraplus_text_encoder_lr_ratio": "2", "dropout": None, "loraplus_unet_lr_ratio": "4.0"}
