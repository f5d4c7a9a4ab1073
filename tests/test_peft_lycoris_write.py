"""sdadapt LoHa / LoKr states -> peft ``LoHaConfig`` / ``LoKrConfig`` adapter folders (``save_peft``).

peft rebuilds every layer from the config and the base layer, so a wrong ``r``/``alpha`` pattern, a wrong
``decompose_both``/``decompose_factor``/``use_effective_conv2d`` or a dropped layer shows up as missing or
unexpected keys or as a different output: each case loads the written folder with peft 0.21.2's own
loaders and compares peft's output with sdadapt's adapted model's, then reads the folder back with sdadapt.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_clip  # noqa: E402

from png_pixels import pixels as _pixels
import sdadapt  # noqa: E402
from sdadapt.formats import load_lora, load_peft, save_kohya, save_peft  # noqa: E402
from sdadapt.targets import TEXT_ENCODER, UNET_LOCON  # noqa: E402

ATOL = 1e-5

CASES = {  # name: (model, targets, sdadapt config)
    "loha-patterns": ("unet", UNET_LOCON, sdadapt.LoHaConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=3)),
    "loha-tucker": ("unet", UNET_LOCON, sdadapt.LoHaConfig(rank=3, alpha=5, use_tucker=True)),
    "lokr-patterns": ("unet", UNET_LOCON, sdadapt.LoKrConfig(rank=4, alpha=8, conv_rank=2, conv_alpha=1)),
    "lokr-decompose-both": ("unet", UNET_LOCON, sdadapt.LoKrConfig(rank=2, alpha=5, decompose_both=True, factor=4)),
    "lokr-full": ("unet", UNET_LOCON, sdadapt.LoKrConfig(rank=2, alpha=5, full_matrix=True)),
    "lokr-tucker": ("unet", UNET_LOCON, sdadapt.LoKrConfig(rank=2, alpha=3, use_tucker=True)),
    "clip-loha": ("clip", TEXT_ENCODER, sdadapt.LoHaConfig(rank=2, alpha=7)),
    "clip-lokr": ("clip", TEXT_ENCODER, sdadapt.LoKrConfig(rank=2, alpha=3, decompose_both=True)),
}


from test_interop_peft import _model  # noqa: E402  (fresh tiny SD1 UNet / CLIP and a run(model) -> output)


@functools.lru_cache(maxsize=None)
def _adapted(case: str):
    """(base model, run, sdadapt handle on a copy with random non-zero factors, that copy's output). Built once per
    case for the module: the tests only read these (peft loads into deep copies of the base)."""
    kind, targets, config = CASES[case]
    base, run = _model(kind)
    model = copy.deepcopy(base)
    handle = sdadapt.inject(model, targets, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in handle.modules.values():
            for name, p in adapter.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lokr" in name else 0.2))
    return base, run, handle, run(model)


def _peft_adapter_layers(model) -> int:
    from peft.tuners.lycoris_utils import LycorisLayer

    return sum(isinstance(module, LycorisLayer) for module in model.modules())


@pytest.mark.parametrize("loader", ["from_pretrained", "set_peft_model_state_dict"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdadapt_loha_lokr_folder_loads_in_peft_with_the_same_output(tmp_path, case, loader):
    base, run, handle, want = _adapted(case)
    assert (want - run(base)).abs().max() > 1e-2, "the adapter has no visible effect; the test would prove nothing"
    state = handle.state_dict()
    save_peft(tmp_path, state, model=base if case.endswith("tucker") else None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LOHA" if "loha" in case else "LOKR")
    if case.endswith("patterns"):
        assert config["rank_pattern"] and config["alpha_pattern"]  # 3x3 convs take conv_rank / conv_alpha
    fresh = copy.deepcopy(base)  # an untouched tiny model (the same seeded build as a fresh _model)
    if loader == "from_pretrained":
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    else:
        peft_config = peft.PeftConfig.from_pretrained(str(tmp_path))
        loaded = peft.inject_adapter_in_model(peft_config, fresh)
        weights = load_file(str(tmp_path / "adapter_model.safetensors"))
        result = peft.set_peft_model_state_dict(loaded, {k.removeprefix("base_model.model."): v
                                                         for k, v in weights.items()})
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if ".hada_" in k or ".lokr_" in k]
    assert _peft_adapter_layers(loaded) == len(handle)
    got = run(loaded)
    assert (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_write_then_read_gives_the_same_tensors(tmp_path, case):
    """sdadapt write -> sdadapt read is the identity on the factors (bit for bit) and on every ranked layer's alpha;
    a LoKr layer with both factors full comes back with alpha = r and the same (scale-1) delta."""
    base, _, handle, _ = _adapted(case)
    state = handle.state_dict()
    save_peft(tmp_path, state, model=base)
    again = load_peft(tmp_path)
    assert set(again) == set(state)
    for key, value in state.items():
        if key.endswith(".alpha"):
            layer = key.removesuffix(".alpha")
            both_full = f"{layer}.lokr_w1" in state and f"{layer}.lokr_w2" in state
            if not both_full:
                assert float(again[key]) == float(value), key
            continue
        assert torch.equal(again[key], value), key
    assert load_lora(tmp_path)[0]["model"].keys() == state.keys()


def test_with_the_model_a_layer_whose_kernel_the_tensors_hide_is_checked_exactly(tmp_path):
    """``use_effective_conv2d`` gives Tucker cores to every kxk convolution. A flat LoHa layer of width 18 reads as a
    Linear(18) (peft keeps it flat: written) or a 3x3 conv of 2 channels (peft would give it cores). Without the model
    the writer takes the reading LyCORIS' rules give; with ``model=`` it knows the layer is that 3x3 convolution and
    refuses the file peft would fill with fresh cores; a real Linear there is written."""
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(4, 6, 3), "flat": torch.nn.Conv2d(2, 6, 3),
                                 "lin": torch.nn.Linear(18, 6)})
    g = torch.Generator().manual_seed(0)
    state = {
        "conv.hada_w1_a": torch.randn(2, 6, generator=g), "conv.hada_w1_b": torch.randn(2, 4, generator=g),
        "conv.hada_w2_a": torch.randn(2, 6, generator=g), "conv.hada_w2_b": torch.randn(2, 4, generator=g),
        "conv.hada_t1": torch.randn(2, 2, 3, 3, generator=g), "conv.hada_t2": torch.randn(2, 2, 3, 3, generator=g),
        "conv.alpha": torch.tensor(1.0),
        "flat.hada_w1_a": torch.randn(6, 2, generator=g), "flat.hada_w1_b": torch.randn(2, 18, generator=g),
        "flat.hada_w2_a": torch.randn(6, 2, generator=g), "flat.hada_w2_b": torch.randn(2, 18, generator=g),
        "flat.alpha": torch.tensor(1.0),
    }
    save_peft(tmp_path / "a", state)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_effective_conv2d"] is True
    with pytest.raises(ValueError, match=r"flat: the file has .* base weight \(6, 2, 3, 3\) .*hada_t1"):
        save_peft(tmp_path / "b", state, model=model)
    assert not (tmp_path / "b").exists()
    linear_state = {k.replace("flat.", "lin."): v for k, v in state.items()}
    save_peft(tmp_path / "c", linear_state, model=model)  # a Linear beside the Tucker conv: expressible
    linear_model = {"conv": copy.deepcopy(model["conv"]), "lin": copy.deepcopy(model["lin"])}
    loaded = peft.PeftModel.from_pretrained(torch.nn.ModuleDict(linear_model), str(tmp_path / "c"))
    x = torch.randn(1, 4, 5, 5, generator=g)
    ref = copy.deepcopy(torch.nn.ModuleDict(linear_model))
    sdadapt.load_adapter(ref, linear_state)
    with torch.no_grad():
        assert (loaded.base_model.model["conv"](x) - ref["conv"](x)).abs().max().item() <= ATOL
        y = torch.randn(3, 18, generator=g)
        assert (loaded.base_model.model["lin"](y) - ref["lin"](y)).abs().max().item() <= ATOL


def test_what_peft_cannot_express_is_refused_naming_the_layer(tmp_path):
    g = torch.Generator().manual_seed(0)
    lin = "blocks.0.proj"  # a Linear 16 -> 16: peft's split is (4, 4) x (4, 4)
    lokr = {f"{lin}.lokr_w1": torch.randn(4, 4, generator=g), f"{lin}.lokr_w2_a": torch.randn(4, 2, generator=g),
            f"{lin}.lokr_w2_b": torch.randn(2, 4, generator=g), f"{lin}.alpha": torch.tensor(2.0)}
    # r = 2 >= max(4, 4) / 2: peft keeps w2 full, so a decomposed w2 at that rank has no peft config
    with pytest.raises(ValueError, match=r"LoKrConfig cannot rebuild 1 layer.*blocks\.0\.proj: the file has"):
        save_peft(tmp_path / "a", lokr)
    mixed = {**lokr, "other.lora_down.weight": torch.zeros(2, 4), "other.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"other\.lora_down\.weight: a peft LoKr adapter holds only"):
        save_peft(tmp_path / "b", mixed)
    loha = {f"{lin}.hada_w1_a": torch.zeros(16, 2), f"{lin}.hada_w1_b": torch.zeros(2, 16),
            f"{lin}.hada_w2_a": torch.zeros(16, 3), f"{lin}.hada_w2_b": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=r"blocks\.0\.proj: LoHa hada_w1_b and hada_w2_b have ranks \[2, 3\]"):
        save_peft(tmp_path / "c", loha)
    assert not any(tmp_path.iterdir())


def test_a_lokr_split_peft_makes_only_with_a_factor_gets_that_factor(tmp_path):
    """LyCORIS sorts a factor split (factor 8 of 16 -> (2, 8)); peft keeps ``(factor, dim / factor)`` unsorted. A
    layer split (8, 2) x (8, 2) is peft's with ``decompose_factor=8`` and none other: the writer must find it."""
    layer = torch.nn.Linear(16, 16, bias=False)
    model = torch.nn.Sequential(layer)
    g = torch.Generator().manual_seed(3)
    state = {"0.lokr_w1": torch.randn(8, 8, generator=g), "0.lokr_w2": torch.randn(2, 2, generator=g),
             "0.alpha": torch.tensor(1.0)}
    save_peft(tmp_path, state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["decompose_factor"] == 8
    x = torch.randn(3, 16, generator=g)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    with torch.no_grad():
        want = layer(x) + x @ torch.kron(state["0.lokr_w1"], state["0.lokr_w2"]).double().T.float()  # scale 1
        assert (loaded(x) - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("case", ["loha-patterns", "lokr-decompose-both"])
def test_convert_to_peft_of_a_lycoris_file_gives_peft_the_same_output(tmp_path, case):
    """``convert X.safetensors --to peft`` of a LyCORIS LoHa/LoKr file: a folder peft loads with the file's output."""
    from sdadapt.cli import main

    base, run, handle, want = _adapted(case)
    save_kohya(tmp_path / "k.safetensors", {"unet": handle.state_dict()})
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--component", "unet", "-q",
                 "-o", str(tmp_path / "p")]) == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    assert (run(loaded) - want).abs().max().item() <= ATOL


# ------------------------------------------------------------------ generate --lora PEFT_FOLDER (LoHa / LoKr / SDXL)
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_checkpoints import tiny_sd1_file, tiny_sdxl_file

    root = tmp_path_factory.mktemp("ckpt")
    return {"sd1": tiny_sd1_file(root / "sd1.safetensors"), "sdxl": tiny_sdxl_file(root / "sdxl.safetensors")}


@pytest.fixture(scope="module")
def systems(checkpoints):
    """``systems(name)``: the checkpoint's loaded system, loaded once for the module; the tests only read it (the
    adapters are injected into copies; the generate runs load their own)."""
    from sdadapt.jobs.models import load_system

    loaded = {}

    def system_of(name: str):
        if name not in loaded:
            loaded[name] = load_system(str(checkpoints[name]))
        return loaded[name]

    return system_of


def _random_adapter(module, targets, config, seed: int) -> dict:
    handle = sdadapt.inject(copy.deepcopy(module), targets, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in handle.modules.values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return handle.state_dict()


GENERATE_CASES = {  # name: (checkpoint, component, targets, config)
    "sd1-unet-loha": ("sd1", "unet", UNET_LOCON, sdadapt.LoHaConfig(rank=2, alpha=3)),
    "sd1-text-lokr": ("sd1", "text_encoder", TEXT_ENCODER, sdadapt.LoKrConfig(rank=2, alpha=3, decompose_both=True)),
    "sdxl-unet-lora": ("sdxl", "unet", UNET_LOCON, sdadapt.LoRAConfig(rank=2, alpha=3)),
    "sdxl-unet-lokr": ("sdxl", "unet", UNET_LOCON, sdadapt.LoKrConfig(rank=2, alpha=4)),
}


def _generate(model, out, extra) -> bytes:
    from sdadapt.cli import main

    assert main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "2", "--seed", "3",
                 "--width", "32", "--height", "32", *extra, "-o", str(out)]) == 0
    return _pixels(out)  # (the image: the PNG's infotext names the LoRA file)


@pytest.fixture(scope="module")
def plain_image(checkpoints, tmp_path_factory):
    """``plain_image(name)``: the checkpoint's image with no adapter, made once for the module (the cases of one
    checkpoint share it)."""
    made = {}

    def image_of(name: str) -> bytes:
        if name not in made:
            made[name] = _generate(checkpoints[name], tmp_path_factory.mktemp("plain") / "none.png", [])
        return made[name]

    return image_of


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_lora_with_a_peft_folder_gives_the_image_of_its_kohya_twin(tmp_path, capsys, checkpoints, systems,
                                                                          plain_image, case):
    """``generate --lora FOLDER`` with a peft LoHa / LoKr folder (and a peft LoRA folder on SDXL): the folder's
    component is found from its layers' shapes and the image equals the one from the same adapter as a kohya file
    (LyCORIS naming); the adapter changes the image, so a dropped or mis-scaled layer shows."""
    from sdadapt.formats.layers import group_by_layer

    name, component, targets, config = GENERATE_CASES[case]
    model = checkpoints[name]
    system = systems(name)
    state = _random_adapter(getattr(system, component), targets, config, seed=11)
    save_peft(tmp_path / "peft", state, model=getattr(system, component))
    save_kohya(tmp_path / "kohya.safetensors", {component: state}, base_model=name)
    images = []
    for spec in (tmp_path / "kohya.safetensors", tmp_path / "peft"):
        images.append(_generate(model, tmp_path / f"{spec.name}.png", ["--lora", f"{spec}:0.8"]))
        layers = len(group_by_layer(state))
        assert f"applied {spec} at 0.8 ({layers} layers)" in capsys.readouterr().err
    images.append(plain_image(name))  # the same command without --lora
    assert images[0] == images[1]
    assert images[1] != images[2]


def test_a_peft_lokr_folder_is_placed_by_its_shapes_not_its_names(systems):
    """Layer names alone matched a LoHa/LoKr folder to every component that has those names; the shapes decide now:
    a LoKr folder for a 64-wide text encoder fits the SD1 text encoder, not a 32-wide CLIP of the same layer names."""
    from sdadapt.formats import peft_component

    system = systems("sd1")
    state = _random_adapter(system.text_encoder, TEXT_ENCODER, sdadapt.LoKrConfig(rank=2), seed=1)
    assert peft_component(system, state, source="--lora X") == "text_encoder"
    narrow = _random_adapter(tiny_clip(), TEXT_ENCODER, sdadapt.LoKrConfig(rank=2), seed=1)  # same names, 32 wide
    with pytest.raises(ValueError, match="fit none of this model's unet, text_encoder"):
        peft_component(system, narrow, source="--lora X")
    loha = _random_adapter(tiny_clip(), TEXT_ENCODER, sdadapt.LoHaConfig(rank=2), seed=1)
    with pytest.raises(ValueError, match="fit none of this model's unet, text_encoder"):
        peft_component(system, loha, source="--lora X")


# ------------------------------------------------------------------------------------------- review R5 additions
def _peft_and_sdadapt_outputs(model, state, folder, inputs):
    """{layer: (peft's output, sdadapt's output)} of the folder ``save_peft`` wrote for ``state`` (float32 model)."""
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).base_model.model
    ref = copy.deepcopy(model)
    sdadapt.load_adapter(ref, {k: v.float() for k, v in state.items()})
    out = {}
    with torch.no_grad():
        for layer, x in inputs.items():
            out[layer] = (loaded.get_submodule(layer)(x), ref.get_submodule(layer)(x))
    return out


def _loha(out_f: int, in_f: int, r: int, g, *, alpha=None, dtype=torch.float32) -> dict:
    state = {n: (torch.randn(s, generator=g) * 0.5).to(dtype) for n, s in (
        ("hada_w1_a", (out_f, r)), ("hada_w1_b", (r, in_f)), ("hada_w2_a", (out_f, r)), ("hada_w2_b", (r, in_f)))}
    if alpha is not None:
        state["alpha"] = torch.tensor(alpha, dtype=dtype)
    return state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fractional_absent_and_zero_alphas_and_half_factors_keep_their_scale_and_bits(tmp_path, dtype):
    """alpha 0.3 (fractional; rounded by the state's dtype), no alpha and alpha 0 (LyCORIS: alpha = r, scale 1): peft's
    output equals sdadapt's for each, and sdadapt reads the folder back with the same factors, bit for bit and dtype,
    and the same alphas (absent/0 -> r)."""
    g = torch.Generator().manual_seed(4)
    model = torch.nn.ModuleDict({n: torch.nn.Linear(12, 10) for n in ("frac", "none", "zero", "plain")})
    parts = {"frac": _loha(10, 12, 2, g, alpha=0.3, dtype=dtype), "none": _loha(10, 12, 2, g, dtype=dtype),
             "zero": _loha(10, 12, 2, g, alpha=0.0, dtype=dtype), "plain": _loha(10, 12, 2, g, alpha=5.0, dtype=dtype)}
    state = {f"{layer}.{name}": value for layer, tensors in parts.items() for name, value in tensors.items()}
    save_peft(tmp_path, state, model=model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).alpha_pattern.get("frac", config["alpha"]) == float(
        torch.tensor(0.3, dtype=dtype))
    x = torch.randn(4, 12, generator=g)
    for layer, (got, want) in _peft_and_sdadapt_outputs(model, state, tmp_path, dict.fromkeys(parts, x)).items():
        assert (got - want).abs().max().item() <= ATOL, layer
    again = load_peft(tmp_path)
    for key, value in state.items():
        if not key.endswith(".alpha"):
            assert again[key].dtype == dtype and torch.equal(again[key], value), key
    assert float(again["frac.alpha"]) == float(state["frac.alpha"])
    assert float(again["none.alpha"]) == float(again["zero.alpha"]) == 2.0  # alpha = r: scale 1, as LyCORIS reads it


def test_a_lokr_layer_whose_two_factors_have_other_ranks_is_written_at_the_larger_rank(tmp_path):
    """(tests/test_dylora_loose_ends.py checks these folders in peft: padded pairs, full factors, Tucker, refusals.)"""
    g = torch.Generator().manual_seed(0)
    state = {"p.lokr_w1_a": torch.randn(8, 1, generator=g), "p.lokr_w1_b": torch.randn(1, 8, generator=g),
             "p.lokr_w2_a": torch.randn(8, 2, generator=g), "p.lokr_w2_b": torch.randn(2, 8, generator=g),
             "p.alpha": torch.tensor(1.0)}
    save_peft(tmp_path / "a", state)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["alpha"] == 1  # alpha / r2, A1111's and ComfyUI's scale of the file
    assert load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["base_model.model.p.lokr_w1_b"].shape == (2, 8)


def test_a_full_factor_lokr_layer_of_odd_factors_gets_a_rank_that_keeps_them_full(tmp_path):
    """Linear(15 -> 15) splits (3, 5) x (3, 5): peft keeps ``lokr_w2`` full iff r >= 5 / 2, i.e. r >= 3 (not 2). Beside
    rank-1 layers (config r = 1) the full layer needs its own rank_pattern entry of at least 3, and alpha = that r."""
    g = torch.Generator().manual_seed(2)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(16, 16), "b": torch.nn.Linear(16, 16),
                                 "odd": torch.nn.Linear(15, 15)})
    state = {}
    for layer in ("a", "b"):  # (4, 4) x (4, 4), r = 1 < 4 / 2: w2 decomposed
        state.update({f"{layer}.lokr_w1": torch.randn(4, 4, generator=g),
                      f"{layer}.lokr_w2_a": torch.randn(4, 1, generator=g),
                      f"{layer}.lokr_w2_b": torch.randn(1, 4, generator=g), f"{layer}.alpha": torch.tensor(1.0)})
    state.update({"odd.lokr_w1": torch.randn(3, 3, generator=g), "odd.lokr_w2": torch.randn(5, 5, generator=g),
                  "odd.alpha": torch.tensor(7.0)})  # both full: LyCORIS' scale is 1 whatever alpha says
    save_peft(tmp_path, state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["rank_pattern"]["odd"] >= 3
    inputs = {"a": torch.randn(2, 16, generator=g), "b": torch.randn(2, 16, generator=g),
              "odd": torch.randn(2, 15, generator=g)}
    for layer, (got, want) in _peft_and_sdadapt_outputs(model, state, tmp_path, inputs).items():
        assert (got - want).abs().max().item() <= ATOL, layer


def test_convert_to_peft_refuses_a_lokr_file_peft_cannot_express_naming_the_layer(tmp_path, capsys):
    from sdadapt.cli import main

    g = torch.Generator().manual_seed(0)
    lokr = {"blocks.0.proj.lokr_w1": torch.randn(4, 4, generator=g),
            "blocks.0.proj.lokr_w2_a": torch.randn(4, 2, generator=g),
            "blocks.0.proj.lokr_w2_b": torch.randn(2, 4, generator=g), "blocks.0.proj.alpha": torch.tensor(2.0)}
    save_kohya(tmp_path / "k.safetensors", {"unet": lokr})
    code = main(["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--component", "unet", "-q",
                 "-o", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "blocks.0.proj" in err and "LoKrConfig cannot rebuild" in err, err
    assert f"{tmp_path / 'k.safetensors'}: cannot convert to peft" in err, err  # (the input named)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("case", ["loha-tucker", "lokr-tucker"])
def test_convert_to_peft_of_a_tucker_lycoris_file_gives_peft_the_same_output(tmp_path, case):
    from sdadapt.cli import main

    base, run, handle, want = _adapted(case)
    save_kohya(tmp_path / "k.safetensors", {"unet": handle.state_dict()})
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--component", "unet", "-q",
                 "-o", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_effective_conv2d"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    assert (run(loaded) - want).abs().max().item() <= ATOL


def test_a_pattern_key_that_is_a_suffix_of_another_layer_does_not_rescale_it(tmp_path):
    """peft's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)`` (peft 0.21.2 utils/other.py): the key
    ``proj`` matches ``blocks.proj`` too. The writer must give each layer its own rank/alpha in peft (e.g. explicit,
    more specific keys first) or refuse; a silently different scale is a wrong file."""
    g = torch.Generator().manual_seed(1)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 16), "other": torch.nn.Linear(16, 16),
                                 "blocks": torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 16)})})
    parts = {"proj": _loha(16, 16, 2, g, alpha=1.0), "blocks.proj": _loha(16, 16, 2, g, alpha=3.0),
             "other": _loha(16, 16, 2, g, alpha=3.0)}
    state = {f"{layer}.{name}": value for layer, tensors in parts.items() for name, value in tensors.items()}
    try:
        save_peft(tmp_path, state, model=model)
    except ValueError as exc:  # refusing, naming the layer, is also right
        assert "blocks.proj" in str(exc)
        return
    x = torch.randn(3, 16, generator=g)
    for layer, (got, want) in _peft_and_sdadapt_outputs(model, state, tmp_path, dict.fromkeys(parts, x)).items():
        assert (got - want).abs().max().item() <= ATOL, layer
    assert float(load_peft(tmp_path)["blocks.proj.alpha"]) == 3.0


def test_decompose_both_keeps_w1_full_at_exactly_half_its_larger_side(tmp_path):
    """peft: ``use_w1 = not (decompose_both and r < max(a, c) / 2)``: at r == max(a, c) / 2 ``w1`` stays full. With
    ``decompose_factor = 4`` a Linear(64) splits (4, 16) x (4, 16): r = 2 keeps ``w1`` (4, 4) full and decomposes
    ``w2``; beside it a Linear(128) (4, 32) x (4, 32) at r = 1 decomposes both (so ``decompose_both`` is needed)."""
    g = torch.Generator().manual_seed(6)
    model = torch.nn.ModuleDict({"edge": torch.nn.Linear(64, 64), "both": torch.nn.Linear(128, 128)})
    state = {"edge.lokr_w1": torch.randn(4, 4, generator=g), "edge.lokr_w2_a": torch.randn(16, 2, generator=g),
             "edge.lokr_w2_b": torch.randn(2, 16, generator=g), "edge.alpha": torch.tensor(3.0),
             "both.lokr_w1_a": torch.randn(4, 1, generator=g), "both.lokr_w1_b": torch.randn(1, 4, generator=g),
             "both.lokr_w2_a": torch.randn(32, 1, generator=g), "both.lokr_w2_b": torch.randn(1, 32, generator=g),
             "both.alpha": torch.tensor(0.5)}
    save_peft(tmp_path, state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["decompose_both"] is True and config["decompose_factor"] == 4
    inputs = {"edge": torch.randn(2, 64, generator=g), "both": torch.randn(2, 128, generator=g)}
    for layer, (got, want) in _peft_and_sdadapt_outputs(model, state, tmp_path, inputs).items():
        assert (got - want).abs().max().item() <= ATOL, layer


@pytest.mark.parametrize("values, default", [
    ({"proj": 1, "blocks.proj": 3, "other": 3}, 3),  # the short name's entry would catch the long one
    ({"proj": 3, "blocks.proj": 1, "other": 3}, 3),
    ({"a.proj": 2, "x.a.proj": 5, "y.x.a.proj": 2, "proj": 7}, 2),
    ({"to_k": 4, "attn.to_k": 4, "attn.to_k_ip": 8}, 4),
])
def test_own_pattern_entries_give_every_layer_its_value_under_peft_matching(values, default):
    """Each layer resolved by peft's rule (first key matching a dotted suffix) gets its own value — for the LoRA
    writer's config as for LoHa/LoKr's."""
    from sdadapt.formats.diffusers import _config_for
    from sdadapt.patterns import own_pattern_entries, peft_pattern_value

    patterns = own_pattern_entries(values, default)
    assert {name: peft_pattern_value(patterns, name, default) for name in values} == values
    state = {}
    for name, rank in values.items():
        state[f"{name}.lora_down.weight"] = torch.zeros(rank, 4)
        state[f"{name}.lora_up.weight"] = torch.zeros(4, rank)
    config = _config_for(state)
    assert {name: peft_pattern_value(config["rank_pattern"], name, config["r"]) for name in values} == values
