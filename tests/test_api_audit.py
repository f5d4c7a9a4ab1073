"""A first-time user's mistakes with the Python API: each gets the right result or an error naming the fix.

Found by using the API as the docs show it on tiny diffusers/transformers models (no downloads).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs
from torch import nn

import sdadapt
from sdadapt.formats.detect import describe_file
from sdadapt.targets import UNET_KOHYA, NoTargetsError


def _randomised(handle, seed: int = 3) -> None:
    """Give a fresh (identity) adapter non-zero factors so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _reference_lora_f64(unet: nn.Module, state: dict, inputs) -> torch.Tensor:
    """The UNet's output with ``W + (alpha / r) · up @ down`` written into a float64 copy (the naive reference)."""
    ref = copy.deepcopy(unet).double()
    layers = {k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")}
    with torch.no_grad():
        for layer in layers:
            down = state[f"{layer}.lora_down.weight"].double()
            up = state[f"{layer}.lora_up.weight"].double()
            scale = float(state[f"{layer}.alpha"]) / down.shape[0]
            weight = ref.get_submodule(layer).weight
            delta = up.flatten(1) @ down.flatten(1)  # (out, in·kh·kw)
            weight.add_(scale * delta.reshape(weight.shape))
        (x, t, ctx), kwargs = inputs
        return ref(x.double(), t, ctx.double(), **kwargs).sample


# ------------------------------------------------------------------------ torch.compile'd models


def _small_unet():
    """The tiny SD1 UNet cut to one level (a cross-attention down block, a plain up block, no mid block), one resnet
    and transformer per block: every compiled forward of the tests below is a Dynamo trace of the whole UNet (its cost
    grows with the layers), and one transformer block shows the same (kohya-targeted) names."""
    from tiny_models import _unet

    return _unet(0, layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("UpBlock2D",), mid_block_type=None)


def test_a_compiled_unet_is_adapted_under_its_own_layer_names_and_the_file_loads_back(tmp_path):
    """Found: ``inject(torch.compile(unet), ...)`` named every layer ``_orig_mod.down_blocks...``, so the
    saved kohya file held ``lora_unet__orig_mod_...`` keys no model (nor A1111) could load;
    ``load_adapter``/``apply_lora`` on a compiled UNet refused every layer. Fixed: the compiled
    module's original is adapted (the hooks sit on the shared sub-modules)."""
    torch._dynamo.reset()
    unet = _small_unet()
    inputs = unet_inputs(unet)
    compiled = torch.compile(copy.deepcopy(unet), backend="eager")
    handle = sdadapt.inject(compiled, UNET_KOHYA, sdadapt.LoRAConfig(rank=4, alpha=2))
    _randomised(handle)
    state = handle.state_dict()
    assert not any("_orig_mod" in key for key in state)
    reference = _reference_lora_f64(unet, state, inputs)
    torch.testing.assert_close(run_unet(compiled, inputs).double(), reference, rtol=1e-4, atol=1e-4)

    path = tmp_path / "lora.safetensors"
    sdadapt.formats.save_kohya(path, {"unet": state})
    components, _ = sdadapt.load_lora(path)
    other = torch.compile(copy.deepcopy(unet), backend="eager")
    loaded = sdadapt.load_adapter(other, components["unet"])
    assert sorted(loaded.names) == sorted(handle.names)
    # (run uncompiled: the module the compiled one wraps holds the adapters; that its compiled forward, traced once
    # more, runs them is shown above and after each change of hooks by the swapping test below)
    torch.testing.assert_close(run_unet(other._orig_mod, inputs).double(), reference, rtol=1e-4, atol=1e-4)
    applied_to = torch.compile(copy.deepcopy(unet), backend="eager")
    applied = sdadapt.apply_lora(applied_to, components["unet"])
    torch.testing.assert_close(run_unet(applied_to._orig_mod, inputs).double(), reference, rtol=1e-4, atol=1e-4)
    applied.undo()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in applied_to._orig_mod.state_dict().items())
    torch._dynamo.reset()


def test_a_hypernetwork_on_a_compiled_unet_sits_on_the_unet_itself():
    torch._dynamo.reset()
    unet = tiny_unet_sd1()
    compiled = torch.compile(unet, backend="eager")
    handle = sdadapt.inject_hypernetwork(compiled, sdadapt.Hypernetwork([32, 64], name="s"))
    assert handle.layers and not any(name.startswith("_orig_mod") for name in handle.layers)
    assert "sdadapt" in unet._modules
    handle.remove()
    assert "sdadapt" not in unet._modules
    torch._dynamo.reset()


# ------------------------------------------------------------------------ wrong objects passed


class _Pipeline:
    """What a diffusers pipeline looks like to sdadapt: not a module, models as attributes."""

    def __init__(self) -> None:
        self.unet = nn.Linear(2, 2)
        self.text_encoder = nn.Linear(2, 2)


@pytest.mark.parametrize("call", ["inject", "load_adapter", "apply_lora", "select", "inject_hypernetwork"])
def test_a_pipeline_given_for_the_model_names_its_models(call):
    """Found: ``AttributeError: '...' object has no attribute 'named_modules'``. Fixed: a TypeError naming
    ``pipe.unet`` / ``pipe.text_encoder``."""
    pipe = _Pipeline()
    state = {"a.lora_down.weight": torch.zeros(1, 2), "a.lora_up.weight": torch.zeros(2, 1)}
    calls = {
        "inject": lambda: sdadapt.inject(pipe, UNET_KOHYA, sdadapt.LoRAConfig(rank=1)),
        "load_adapter": lambda: sdadapt.load_adapter(pipe, state),
        "apply_lora": lambda: sdadapt.apply_lora(pipe, state),
        "select": lambda: sdadapt.select(pipe, UNET_KOHYA),
        "inject_hypernetwork": lambda: sdadapt.inject_hypernetwork(pipe, sdadapt.Hypernetwork([2])),
    }
    with pytest.raises(TypeError, match=rf"{call} takes a torch nn.Module.*_Pipeline.*pipe\.unet, pipe\.text_encoder"):
        calls[call]()


def test_a_whole_system_given_for_the_model_is_refused_naming_its_models(tmp_path):
    """Found: ``inject(load_toy(), "unet-kohya", ...)`` (the toy system is an nn.Module holding the UNet and
    the text encoder) adapted ``unet.down_blocks...`` layers; the kohya file then held
    ``lora_unet_unet_down_blocks_...`` keys that no UNet (nor A1111) could load. Fixed: a TypeError
    naming ``system.unet``; nothing is injected."""
    from sdadapt.toy import load_toy

    system = load_toy()
    with pytest.raises(TypeError, match=r"ToySystem holds 2 \(unet, text_encoder\).*inject\(system\.unet"):
        sdadapt.inject(system, "unet-kohya", sdadapt.LoRAConfig(rank=2))
    assert sdadapt.adapter_names(system) == []
    assert len(sdadapt.select(system, "unet-kohya")) == len(sdadapt.select(system.unet, "unet-kohya"))  # select may look


@pytest.mark.parametrize("call", ["load_adapter", "apply_lora"])
def test_load_loras_component_dict_given_for_a_state_says_which_component_to_pick(tmp_path, call):
    """Found: ``ValueError: 'unet' does not end in a known adapter tensor name``. Fixed: a TypeError saying
    to pass ``components['unet']``; the model is left untouched."""
    unet = tiny_unet_sd1()
    handle = sdadapt.inject(copy.deepcopy(unet), UNET_KOHYA, sdadapt.LoRAConfig(rank=2))
    path = tmp_path / "l.safetensors"
    sdadapt.formats.save_kohya(path, {"unet": handle.state_dict()})
    components, _ = sdadapt.load_lora(path)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    function = getattr(sdadapt, call)
    with pytest.raises(TypeError, match=r"components\['unet'\]"):
        function(unet, components)
    assert set(unet.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_savers_given_a_flat_state_or_a_handle_show_the_dict_to_pass(tmp_path):
    """Found: ``save_kohya(path, handle.state_dict())`` raised ``RuntimeError: Boolean value of Tensor
    with more than one value is ambiguous``; ``{"unet": handle}`` an AttributeError. Fixed: TypeErrors
    showing ``{"unet": handle.state_dict()}``; nothing is written."""
    handle = sdadapt.inject(tiny_unet_sd1(), UNET_KOHYA, sdadapt.LoRAConfig(rank=2))
    path = tmp_path / "l.safetensors"
    for save in (sdadapt.formats.save_kohya, sdadapt.save_lora, sdadapt.formats.save_diffusers):
        with pytest.raises(TypeError, match=r"one model's flat state.*\{\"unet\": handle.state_dict\(\)\}"):
            save(path, handle.state_dict())
        with pytest.raises(TypeError, match=r"'unet' got AdapterHandle.*'unet': handle.state_dict\(\)"):
            save(path, {"unet": handle})
    assert not path.exists()


def test_an_sdxl_lora_saved_with_the_default_base_model_is_told_to_say_sdxl(tmp_path):
    """Found: ``component 'text_encoder_2' has no kohya prefix for base_model='sd1'`` without the fix
    (``save_kohya``'s default is SD1). Fixed: the message says ``base_model='sdxl'``."""
    te2 = sdadapt.inject(tiny_clip(with_projection=True), "text-encoder", sdadapt.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"pass base_model='sdxl'"):
        sdadapt.formats.save_kohya(tmp_path / "x.safetensors", {"text_encoder_2": te2.state_dict()})
    sdadapt.formats.save_kohya(tmp_path / "x.safetensors", {"text_encoder_2": te2.state_dict()}, base_model="sdxl")
    components, _ = sdadapt.load_lora(tmp_path / "x.safetensors")
    assert set(components) == {"text_encoder_2"}


@pytest.mark.parametrize(("width", "written_as", "fix"), [(2048, "sd1", "sdxl"), (2048, "sd2", "sdxl"), (768, "sdxl", "sd1"),
                                                       (1024, "sdxl", "sd1")])
def test_a_unet_lora_written_as_the_other_family_is_refused(tmp_path, width, written_as, fix):
    """Found: an SDXL UNet LoRA saved with ``save_kohya``'s default ``base_model="sd1"`` was written with
    diffusers names and ``ss_base_model_version = sd_v1``: A1111/ComfyUI's SDXL loaders find none of its
    layers (and the reverse for an SD1 LoRA written as SDXL). Fixed: the cross-attention context width
    (SD1 768, SD2 1024, SDXL 2048) decides; the message names the base_model to pass."""
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"{layer}.lora_down.weight": torch.zeros(4, width), f"{layer}.lora_up.weight": torch.zeros(640, 4)}
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=rf"pass base_model='{fix}'"):
        sdadapt.formats.save_kohya(path, {"unet": state}, base_model=written_as)
    assert not path.exists()
    right = "sdxl" if width == 2048 else ("sd2" if width == 1024 else "sd1")
    sdadapt.formats.save_kohya(path, {"unet": state}, base_model=right)
    assert sdadapt.load_lora(path)[1]["ss_base_model_version"].startswith("sdxl" if right == "sdxl" else "sd_v")


def test_save_lora_format_peft_points_at_save_peft(tmp_path):
    handle = sdadapt.inject(tiny_unet_sd1(), UNET_KOHYA, sdadapt.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"save_peft\(folder, components\['unet'\]\)"):
        sdadapt.save_lora(tmp_path / "p", {"unet": handle.state_dict()}, format="peft")


@pytest.mark.parametrize("bad", ["0.5", float("nan"), float("inf"), True])
def test_a_strength_that_is_no_finite_number_is_refused_and_changes_nothing(bad):
    """Found: ``handle.set_scale(float("nan"))`` was taken (every output NaN), ``set_scale("0.5")`` parsed
    the string; ``apply_lora(..., scale=nan)`` wrote NaN into the weights. Fixed: a ValueError naming
    the scale; the adapter keeps its strength, the weights their values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    handle = sdadapt.inject(net, sdadapt.by_type(nn.Linear), sdadapt.LoRAConfig(rank=2))
    _randomised(handle)
    x = torch.randn(2, 4)
    with torch.no_grad():
        before = net(x)
    with pytest.raises(ValueError, match=r"set_scale's scale must be a"):
        handle.set_scale(bad)
    with torch.no_grad():
        assert torch.equal(net(x), before)
    state = handle.state_dict()
    handle.remove()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"apply_lora's scale must be a"):
        sdadapt.apply_lora(net, state, scale=bad)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------ targets


@pytest.mark.parametrize("spelling", ["unet_kohya", "UNET_KOHYA", "unet-kohyaa", "unetkohya"])
def test_a_misspelt_preset_name_is_named(spelling):
    """Found: ``"unet_kohya"`` (the Python constant's spelling) silently became a glob that matched
    nothing, and the error did not mention presets. Fixed: the nearest preset is named."""
    with pytest.raises(NoTargetsError, match=r"Did you mean the preset 'unet-kohya'\?"):
        sdadapt.inject(tiny_unet_sd1(), spelling, sdadapt.LoRAConfig(rank=2))


def test_peft_style_target_names_get_the_glob_that_matches_them():
    """Found: peft's ``target_modules=["to_q", "to_k"]`` passed as targets matched nothing (globs match
    whole names). Fixed: the error gives ``['*.to_q', '*.to_k']``, which selects the layers."""
    unet = tiny_unet_sd1()
    with pytest.raises(NoTargetsError, match=r"did you mean \['\*\.to_q', '\*\.to_k'\]\?"):
        sdadapt.select(unet, ["to_q", "to_k"])
    chosen = sdadapt.select(unet, ["*.to_q", "*.to_k"])
    assert chosen and all(name.endswith((".to_q", ".to_k")) for name, _ in chosen)
    with pytest.raises(NoTargetsError) as caught:  # nothing to suggest: no hint
        sdadapt.select(unet, "bogus")
    assert "did you mean" not in str(caught.value).lower()


# ------------------------------------------------------------------------ peft's own LoHa / LoKr folders


def _peft_cases():
    peft = pytest.importorskip("peft")
    convs = ["conv1", "conv2"]  # resnet 3x3 convolutions
    return {
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["to_q", "to_k", "proj_in", *convs]),
        "loha-patterns": lambda: peft.LoHaConfig(r=4, alpha=8, rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3},
                                                 target_modules=["to_q", "to_k", "to_v"]),
        "loha-effective-conv": lambda: peft.LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=convs),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["to_q", "to_k", "ff.net.2", *convs]),
        "lokr-decompose-both": lambda: peft.LoKrConfig(r=2, alpha=5, decompose_both=True, decompose_factor=8,
                                                       target_modules=["to_q", "to_out.0"]),
        "lokr-both-full": lambda: peft.LoKrConfig(r=16, alpha=4, target_modules=["to_k", "to_v"]),  # r ≥ max/2: w2 full
        "lokr-effective-conv": lambda: peft.LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=convs),
    }




def _saved_peft_adapter(peft, base, inputs, config, folder):
    """peft's adapter of ``config`` on a copy of ``base`` with random weights (seed 5), saved by peft itself to
    ``folder``; returns peft's UNet output on ``inputs``."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = run_unet(model, inputs)
    model.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("case", ["loha", "loha-patterns", "loha-effective-conv", "lokr", "lokr-decompose-both",
                                  "lokr-both-full", "lokr-effective-conv"])
def test_a_peft_loha_or_lokr_folder_loads_and_gives_peft_s_own_output(tmp_path, case):
    """Found: ``load_lora(folder)`` of a folder that peft's ``save_pretrained`` wrote for a ``LoHaConfig``
    or ``LoKrConfig`` refused it ("144 key(s) are not peft LoRA keys"). Fixed: read as LyCORIS tensors
    with the config's alpha / r (pattern per layer; both-full LoKr folds peft's scale into ``lokr_w2``);
    ``load_adapter`` and ``apply_lora`` then give peft's output, and the kohya file written from it too."""
    peft = pytest.importorskip("peft")
    base = tiny_unet_sd1()
    inputs = unet_inputs(base)
    theirs = _saved_peft_adapter(peft, base, inputs, _peft_cases()[case](), tmp_path / "adapter")
    components, _ = sdadapt.load_lora(tmp_path / "adapter")
    state = components["model"]
    assert (theirs - run_unet(base, inputs)).abs().max() > 1e-3  # the adapter does something
    injected = copy.deepcopy(base)
    sdadapt.load_adapter(injected, state)
    torch.testing.assert_close(run_unet(injected, inputs), theirs, rtol=1e-4, atol=1e-5)
    applied = copy.deepcopy(base)
    sdadapt.apply_lora(applied, state)
    torch.testing.assert_close(run_unet(applied, inputs), theirs, rtol=1e-4, atol=1e-5)
    described = describe_file(tmp_path / "adapter")  # what `inspect` prints: a peft adapter of the family
    assert described["kind"] == "peft-lora" and described["family"] == case.split("-")[0]
    if case == "loha-patterns":
        assert described["alphas"] == {"8": 24, "3": 12}  # the 12 to_k layers take alpha_pattern's 3
    sdadapt.formats.save_kohya(tmp_path / "k.safetensors", {"unet": state})
    again, _ = sdadapt.load_lora(tmp_path / "k.safetensors")
    from_kohya = copy.deepcopy(base)
    sdadapt.load_adapter(from_kohya, again["unet"])
    torch.testing.assert_close(run_unet(from_kohya, inputs), theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ review R4 additions


_ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _lora_layer(layer: str, down_shape: tuple[int, ...], out: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    rank = down_shape[0]
    return {f"{layer}.lora_down.weight": torch.randn(down_shape, generator=g),
            f"{layer}.lora_up.weight": torch.randn((out, rank, *down_shape[2:]) if len(down_shape) > 2 else (out, rank),
                                                   generator=g),
            f"{layer}.alpha": torch.tensor(float(rank))}


@pytest.mark.parametrize(("components", "base_model"), [
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 1024), 640)}, "sd2"),  # SD2's 1024-wide context
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 1024), 640)}, "sd2-v"),
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 768), 640)}, "sd2"),  # SD1 vs SD2: not decided on
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 1280), 640)}, "sdxl"),  # the SDXL refiner's 1280
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 32), 640)}, "sdxl"),  # a user's own width
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 32), 640)}, "sd1"),
    ({"unet": _lora_layer(f"{_ATTN2}.to_k", (4, 4096), 640)}, "sd1"),  # a wide custom context (T5-XXL)
    ({"unet": _lora_layer(f"{_ATTN2}.to_q", (4, 640), 640)}, "sdxl"),  # no cross-attention K/V layer
    ({"unet": _lora_layer("down_blocks.1.resnets.0.conv1", (4, 320, 3, 3), 640)}, "sdxl"),  # conv-only LoCon
    ({"unet": _lora_layer("down_blocks.1.resnets.0.conv1", (4, 320, 3, 3), 640)}, "sd1"),
    ({"text_encoder": _lora_layer("text_model.encoder.layers.0.self_attn.q_proj", (4, 768), 768)}, "sdxl"),
    ({"text_encoder": _lora_layer("text_model.encoder.layers.0.self_attn.q_proj", (4, 1024), 1024)}, "sd1"),
])
def test_review_the_context_width_check_refuses_no_valid_case(tmp_path, components, base_model):
    """Review (a): SD2 UNets, the refiner's or a custom width, LoRAs without an attn2 K/V layer, conv-only
    LoCon and text encoders are written under the base_model asked for, and load back unchanged."""
    path = tmp_path / "x.safetensors"
    sdadapt.formats.save_kohya(path, components, base_model=base_model)
    loaded, _ = sdadapt.load_lora(path)
    assert set(loaded) == set(components)
    for component, state in components.items():
        assert set(loaded[component]) == set(state)
        assert all(torch.equal(loaded[component][key], value) for key, value in state.items())


def test_review_an_sdxl_lora_on_to_v_only_is_refused_as_sd1(tmp_path):
    """The width is read from ``to_v`` as well as ``to_k`` (a LoRA may adapt only one of them)."""
    with pytest.raises(ValueError, match=r"pass base_model='sdxl'"):
        sdadapt.formats.save_kohya(tmp_path / "x.safetensors", {"unet": _lora_layer(f"{_ATTN2}.to_v", (4, 2048), 640)})


def test_review_a_wrapper_holding_only_a_unet_is_still_one_model():
    """Only a ``unet`` *beside* a text encoder is refused as a whole system (model_args.as_module):
    a wrapper holding a UNet (and a VAE) is adapted as before."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = nn.Sequential(nn.Linear(4, 4))
            self.vae = nn.Sequential(nn.Linear(4, 4))

    wrapper = Wrapper()
    handle = sdadapt.inject(wrapper, "unet.*", sdadapt.LoRAConfig(rank=2))
    assert handle.names == ["unet.0"] or sorted(handle.names) == ["unet.0"]
    handle.remove()


def test_review_peft_lokr_both_full_with_a_rank_pattern_gives_peft_s_output(tmp_path):
    """Both-full LoKr layers fold peft's alpha / r with the layer's own r (rank_pattern), not the config's r."""
    peft = pytest.importorskip("peft")
    base = tiny_unet_sd1()
    inputs = unet_inputs(base)
    config = peft.LoKrConfig(r=16, alpha=4, rank_pattern={"to_k": 24}, alpha_pattern={"to_v": 7},
                             target_modules=["to_k", "to_v"])
    theirs = _saved_peft_adapter(peft, base, inputs, config, tmp_path / "adapter")
    assert (theirs - run_unet(base, inputs)).abs().max() > 1e-3
    state = sdadapt.load_lora(tmp_path / "adapter")[0]["model"]
    assert not any(key.endswith(("lokr_w1_a", "lokr_w2_a")) for key in state)  # both factors full everywhere
    injected = copy.deepcopy(base)
    sdadapt.load_adapter(injected, state)
    torch.testing.assert_close(run_unet(injected, inputs), theirs, rtol=1e-4, atol=1e-5)


def test_review_peft_loha_layer_with_alpha_zero_does_nothing(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_unet_sd1()
    inputs = unet_inputs(base)
    config = peft.LoHaConfig(r=4, alpha=8, alpha_pattern={"to_k": 0}, target_modules=["to_q", "to_k"])
    theirs = _saved_peft_adapter(peft, base, inputs, config, tmp_path / "adapter")
    injected = copy.deepcopy(base)
    sdadapt.load_adapter(injected, sdadapt.load_lora(tmp_path / "adapter")[0]["model"])
    torch.testing.assert_close(run_unet(injected, inputs), theirs, rtol=1e-4, atol=1e-5)


def test_review_swapping_adapters_on_a_compiled_unet_uses_the_new_adapter():
    """Dynamo does not guard on forward hooks: each inject / remove through the compiled UNet must drop its graphs.
    Three traces: adapter 7 (its graph), removed (the plain UNet's, not 7's), adapter 8 (its own, not the plain one)."""
    torch._dynamo.reset()
    try:
        unet = _small_unet()
        inputs = unet_inputs(unet)
        compiled = torch.compile(copy.deepcopy(unet), backend="eager")
        for seed in (7, 8):
            handle = sdadapt.inject(compiled, UNET_KOHYA, sdadapt.LoRAConfig(rank=2))
            _randomised(handle, seed)
            reference = copy.deepcopy(unet)
            sdadapt.load_adapter(reference, handle.state_dict())
            torch.testing.assert_close(run_unet(compiled, inputs), run_unet(reference, inputs), rtol=1e-4, atol=1e-5)
            handle.remove()
            if seed == 7:  # (after 8 the same check again: one more trace that shows nothing new)
                torch.testing.assert_close(run_unet(compiled, inputs), run_unet(unet, inputs), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_review_resizing_a_diffusers_sdxl_unet_lora_still_works(tmp_path):
    from sdadapt.loratools.resize import resize_lora

    state = _lora_layer(f"{_ATTN2}.to_k", (8, 2048), 640)
    sdadapt.formats.save_diffusers(tmp_path / "sdxl.safetensors", {"unet": state})
    report = resize_lora(tmp_path / "sdxl.safetensors", tmp_path / "out.safetensors", rank=4)
    assert report.base_model == "sdxl"


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".PTH"])
def test_safetensors_writers_refuse_a_pickle_suffix(tmp_path, suffix):
    """A1111's read_state_dict and kohya's load_file pick the loader by suffix: safetensors bytes under `.pt` would
    be torch.load'ed. Refused naming the .safetensors name; nothing written. `.safetensors` still writes."""
    state = {"down_blocks.0.attn.to_k.lora_down.weight": torch.zeros(2, 8),
             "down_blocks.0.attn.to_k.lora_up.weight": torch.zeros(8, 2)}
    for save in (sdadapt.formats.save_kohya, sdadapt.formats.save_diffusers):
        target = tmp_path / f"lora{suffix}"
        with pytest.raises(ValueError, match=r"name it lora\.safetensors"):
            save(target, {"unet": state})
        assert not target.exists()
        save(tmp_path / "lora.safetensors", {"unet": state})
        assert (tmp_path / "lora.safetensors").exists()
        (tmp_path / "lora.safetensors").unlink()
