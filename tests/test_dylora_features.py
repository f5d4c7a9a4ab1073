"""DyLoRA with kohya's ``--network_weights``, A1111's ``<lora:name:w:dyn=N>`` and the speed options.

Reference: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  train_network.py:711-714 (``network.load_weights(args.network_weights)`` after the network is built),
  networks/dylora.py:151-173 (``_load_from_state_dict``: ``lora_down`` rows / ``lora_up`` columns into the
  ParameterLists), networks/dylora.py:379-388 (``load_weights``: ``load_state_dict(weights_sd, False)``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from toy_adapter_files import random_adapter_file

from png_pixels import pixels as _pixels
import sdadapt
from sdadapt.adapters.dylora import DyLoRAModule
from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.formats.files import read_safetensors
from sdadapt.formats.layers import group_by_layer, resolve_layers
from sdadapt.methods import METHODS
from sdadapt.toy import load_toy


@pytest.fixture(scope="module")
def toy():
    return load_toy()



def kohya_load_rows(down: torch.Tensor, up: torch.Tensor, is_conv2d_1x1: bool):
    """networks/dylora.py:161-170: the file's lora_down / lora_up split into kohya's lora_A / lora_B rows."""
    if is_conv2d_1x1:
        down = down.squeeze(-1).squeeze(-1)
        up = up.squeeze(-1).squeeze(-1)
    return ([down[i].unsqueeze(0) for i in range(down.size(0))], [up[:, i].unsqueeze(1) for i in range(up.size(1))])


@pytest.mark.parametrize("method, options", [("dylora", {"unit": 2}), ("lora", {})])
def test_network_weights_fill_the_rows_as_kohyas_load_state_dict(toy, tmp_path, method, options):
    """A DyLoRA file and a plain LoRA file of the same rank/alpha: every DyLoRA row / column is kohya's
    (networks/dylora.py:161-170) bit for bit, and ΔW is a float64 ``up @ down · alpha / R`` of the file."""
    file = tmp_path / "start.safetensors"
    components = random_adapter_file(toy, file, method, rank=4, alpha=2.0, **options)
    adaptation = METHODS["dylora"].adapt(toy, seed=3, rank=4, alpha=2.0, unit=2, network_weights=str(file))
    try:
        compared = 0
        for component, state in components.items():
            model = getattr(toy, component)
            for layer, tensors in group_by_layer(state).items():
                name = resolve_layers(model, [layer])[layer]
                adapter = adaptation.handles[component].modules[name]
                assert isinstance(adapter, DyLoRAModule)
                down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
                rows, cols = kohya_load_rows(down, up, down.dim() == 4 and down.shape[2:] == (1, 1)
                                             and adapter.lora_down[0].dim() == 2)
                for ours, theirs in zip(adapter.lora_down, rows, strict=True):
                    assert torch.equal(ours.detach(), theirs.reshape(ours.shape).float()), layer
                for ours, theirs in zip(adapter.lora_up, cols, strict=True):
                    assert torch.equal(ours.detach(), theirs.reshape(ours.shape).float()), layer
                reference = (up.double().flatten(1) @ down.double().flatten(1)) * (float(tensors["alpha"]) / 4)
                with torch.no_grad():
                    delta = adapter.delta_weight()
                torch.testing.assert_close(delta.double().reshape(reference.shape), reference, rtol=1e-5, atol=1e-6)
                compared += 1
        assert compared == sum(len(h) for h in adaptation.handles.values()) > 0
        assert "start from the file's weights" in adaptation.notes[0]
    finally:
        adaptation.remove()


def test_a_run_from_its_own_start_file_is_the_run_without_it(toy, red_circles, tmp_path, monkeypatch):
    """The weights `fit` starts from, saved and given back as --network-weights, give the same run bit for bit:
    the file is loaded exactly and loading draws nothing from the RNG the slices come from."""
    jobs = importlib.import_module("sdadapt.jobs.train")
    real_fit = jobs.fit
    start = tmp_path / "start.safetensors"

    def fit(system, adaptation, *args, **kwargs):
        if not start.exists():
            adaptation.save(start)
        return real_fit(system, adaptation, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit", fit)
    common = ["train", "dylora", "--images", str(red_circles), "--network-dim", "4", "--network-alpha", "2",
              "--dylora-unit", "2", "--steps", "2", "--batch-size", "2", "--no-prior", "-q", "--seed", "5"]
    plain, again = tmp_path / "plain.safetensors", tmp_path / "again.safetensors"
    # (the slices come from the global torch CPU RNG, which `train` does not seed from --seed: seeded here)
    torch.manual_seed(11)
    assert main([*common, "-o", str(plain)]) == 0
    torch.manual_seed(11)
    assert main([*common, "--network-weights", str(start), "-o", str(again)]) == 0
    first, _ = read_safetensors(plain)
    second, _ = read_safetensors(again)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    initial, _ = read_safetensors(start)
    assert any(not torch.equal(initial[k], first[k]) for k in first if "lora_up" in k)  # (it trained)


def test_mismatched_rank_alpha_or_unit_is_refused_naming_module_and_fix(toy, red_circles, tmp_path, capsys):
    file = tmp_path / "dy.safetensors"
    random_adapter_file(toy, file, "dylora", rank=4, alpha=2.0, unit=2)
    base = ["train", "dylora", "--images", str(red_circles), "--network-weights", str(file), "--steps", "1",
            "--no-prior", "-q", "-o", str(tmp_path / "o.safetensors")]
    assert main([*base, "--network-dim", "8", "--network-alpha", "2", "--dylora-unit", "2"]) == 2
    err = capsys.readouterr().err
    assert "module" in err and "has rank 4, --network-dim gives rank 8; pass --network-dim 4 (DyLoRA has no" in err
    assert main([*base, "--network-dim", "4", "--network-alpha", "1", "--dylora-unit", "2"]) == 2
    assert "has alpha 2, --network-alpha gives 1; pass --network-alpha 2" in capsys.readouterr().err
    assert main([*base, "--network-dim", "4", "--network-alpha", "2", "--dylora-unit", "1"]) == 2
    assert "a DyLoRA file trained with unit 2, the run trains unit 1; pass --dylora-unit 2" in capsys.readouterr().err
    with pytest.raises(InputError, match="the run trains unit 4"):
        METHODS["dylora"].adapt(toy, rank=4, alpha=2.0, unit=4, network_weights=str(file))
    assert not any(".sdadapt." in n for n, _ in toy.unet.named_modules())  # nothing left injected


# ------------------------------------------------------------------ A1111's <lora:NAME:M:dyn=N>
# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora (stored copies): extra_networks_lora.py ``activate``
# (dyn_dim = int(positional[3]) if len > 3, then int(named["dyn"]) if given), networks.py@873edba4 ``load_networks``
# (net.dyn_dim), network_lora.py@ea903819 ``calc_updown`` (rebuild_conventional(up, down, shape,
# self.network.dyn_dim); the CP form ignores it), lyco_helpers.py@f8391b8a ``rebuild_conventional`` (up[:, :dyn_dim],
# down[:dyn_dim, :]), network.py@f2844bd0 ``calc_scale`` (alpha / self.dim, dim = lora_down.shape[0]: the file's).

F64 = torch.float64


def a1111_dyn_updown(w: dict[str, torch.Tensor], orig: torch.Tensor, mult: float, dyn_dim: int | None):
    """network_lora.py ``calc_updown`` + network.py ``finalize_updown`` (no bias, no DoRA) with ``dyn_dim``."""
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    dim = down.shape[0]
    alpha = w["alpha"].item() if "alpha" in w else None
    output_shape = [up.size(0), down.size(1)]
    if "lora_mid.weight" in w:
        mid = w["lora_mid.weight"]
        updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1),
                              down.reshape(down.size(0), -1))
        output_shape += mid.shape[2:]
    else:
        if len(down.shape) == 4:
            output_shape += down.shape[2:]
        up2, down2 = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
        if dyn_dim is not None:
            up2, down2 = up2[:, :dyn_dim], down2[:dyn_dim, :]
        updown = (up2 @ down2).reshape(output_shape)
    scale = alpha / dim if alpha is not None else 1.0
    return updown.reshape(orig.shape) * scale * mult


def a1111_tag_dyn(tag: str) -> int | None:
    """extra_networks_lora.py ``activate``'s dyn_dim (items split at ':', 'k=v' items named)."""
    items = tag[1:-1].split(":", 1)[1].split(":")
    positional = [i for i in items if len(i.split("=", 2)) != 2]
    named = dict(i.split("=", 2) for i in items if len(i.split("=", 2)) == 2)
    dyn = int(positional[3]) if len(positional) > 3 else None
    return int(named["dyn"]) if "dyn" in named else dyn


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


_DYN_LAYERS = {"linear": (lambda: torch.nn.Linear(8, 6), (4, 8), (6, 4)),
               "conv1": (lambda: torch.nn.Conv2d(8, 6, 1), (4, 8, 1, 1), (6, 4, 1, 1)),
               "conv3": (lambda: torch.nn.Conv2d(8, 6, 3, padding=1), (4, 8, 3, 3), (6, 4, 1, 1))}


@pytest.mark.parametrize("kind", list(_DYN_LAYERS))
@pytest.mark.parametrize("dyn", [1, 3, 4, 9])
@pytest.mark.parametrize("alpha", [3.0, None])
def test_dyn_applies_the_leading_ranks_at_the_files_scale_as_a1111(kind, dyn, alpha):
    from sdadapt.apply import apply_lora
    from sdadapt.loratools.dylora import a1111_dyn_state

    make, down_shape, up_shape = _DYN_LAYERS[kind]
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"layer": make().to(F64)})
    w0 = model["layer"].weight.detach().clone()
    tensors = {"lora_down.weight": _rand(*down_shape, seed=1), "lora_up.weight": _rand(*up_shape, seed=2)}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha)
    state = a1111_dyn_state({f"layer.{k}": v for k, v in tensors.items()}, dyn)
    apply_lora(model, state, scale=0.7)
    expected = w0 + a1111_dyn_updown(tensors, w0, 0.7, dyn)
    torch.testing.assert_close(model["layer"].weight.detach(), expected, rtol=1e-12, atol=1e-12)
    assert state["layer.lora_down.weight"].shape[0] == min(dyn, 4)


def test_dyn_leaves_tucker_and_other_families_whole_as_a1111():
    from sdadapt.loratools.dylora import a1111_dyn_state

    tucker = {"t.lora_down.weight": _rand(4, 8, 1, 1, seed=1), "t.lora_up.weight": _rand(6, 4, 1, 1, seed=2),
              "t.lora_mid.weight": _rand(4, 4, 3, 3, seed=3), "t.alpha": torch.tensor(2.0)}
    loha = {"h.hada_w1_a": _rand(6, 4, seed=4), "h.hada_w1_b": _rand(4, 8, seed=5), "h.hada_w2_a": _rand(6, 4, seed=6),
            "h.hada_w2_b": _rand(4, 8, seed=7), "h.alpha": torch.tensor(2.0)}
    for state in (tucker, loha):
        out = a1111_dyn_state(state, 2)
        assert out.keys() == state.keys() and all(out[k] is state[k] for k in state)
    with pytest.raises(InputError, match="positive int"):
        a1111_dyn_state(tucker, 0)


@pytest.mark.parametrize("tag", ["<lora:ink:1:1:2>", "<lora:ink:0.5:dyn=2>", "<lora:ink:0.5:0.4:3:dyn=2>",
                                 "<lyco:ink:dyn=7>", "<lora:ink:0.6>"])
def test_tag_dyn_is_read_as_a1111(tag):
    from sdadapt.prompt_schedule import extra_network_tags, lora_tag_arguments

    _, tags = extra_network_tags(f"a cat {tag}")
    assert lora_tag_arguments(tags[0])[3] == a1111_tag_dyn(tag)


@pytest.mark.parametrize("tag, message", [("<lora:ink:1:dyn=x>", "not an int"), ("<lora:ink:1:dyn=0>", "keeps no rank"),
                                          ("<lora:ink:1:1:2:5>", "one argument too many")])
def test_tag_dyn_refusals(tag, message):
    from sdadapt.prompt_schedule import extra_network_tags, lora_tag_arguments

    with pytest.raises(InputError, match=message):
        lora_tag_arguments(extra_network_tags(tag)[1][0])


def test_generate_tag_dyn_is_the_pre_cut_file_at_the_files_scale(tmp_path):
    """`generate` with <lora:ink:0.7:dyn=2> makes the image a file holding the first 2 ranks with
    alpha · 2 / R makes (A1111's scale alpha / R), and the hires/tag plumbing carries dyn."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.formats.files import write_safetensors
    from sdadapt.jobs.generate_prompt_tags import prompt_tag_files

    g = torch.Generator().manual_seed(0)
    full, cut = {}, {}
    for key in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"):
        down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
        full.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.0)})
        cut.update({f"{key}.lora_down.weight": down[:2].contiguous(), f"{key}.lora_up.weight": up[:, :2].contiguous(),
                    f"{key}.alpha": torch.tensor(1.5)})
    loras = tmp_path / "loras"
    loras.mkdir()
    write_safetensors(loras / "ink.safetensors", full, {})
    write_safetensors(loras / "inkcut.safetensors", cut, {})
    text, tags, _ = prompt_tag_files("a cat <lora:ink:0.7:dyn=2>", lora_dir=loras)
    assert text == "a cat " and tags[0].dyn == 2 and tags[0].te == tags[0].unet == 0.7
    pipe = _tiny_pipeline(tmp_path / "pipe")
    images = []
    for prompt in ("a cat <lora:ink:0.7:dyn=2>", "a cat <lora:inkcut:0.7>", "a cat <lora:ink:0.7>"):
        out = tmp_path / f"{len(images)}.png"
        assert main(["generate", "--model", str(pipe), "--prompt", prompt, "--seed", "1", "--steps", "2",
                     "--sampler", "euler", "--width", "32", "--height", "32", "--lora-dir", str(loras), "-q",
                     "-o", str(out)]) == 0
        images.append(_pixels(out))  # (the image: the PNG's infotext names the tag)
    assert images[0] == images[1] != images[2]


# ------------------------------------------------------------------ the speed / memory options
# kohya runs networks.dylora through train_network.py like any network (train_network.py: fp8_base, full_fp16,
# full_bf16, gradient_checkpointing apply to it; its DyLoRANetwork.enable_gradient_checkpointing is a no-op, the
# UNet's own checkpointing recomputes the DyLoRA forwards).

def _dylora_on(layer: torch.nn.Module, seed: int):
    """``layer`` in a Sequential with a DyLoRA module (rank 4, unit 2) of random known weights injected."""
    import copy

    model = torch.nn.Sequential(copy.deepcopy(layer))
    handle = sdadapt.inject(model, sdadapt.by_type(torch.nn.Linear, torch.nn.Conv2d), sdadapt.LoRAConfig(rank=4, alpha=2.0))
    for name, old in list(handle.modules.items()):
        handle.replace(name, DyLoRAModule.from_lora(old, unit=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (q for module in handle.modules.values() for q in module.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dylora_on_an_fp8_base_is_the_rounded_bf16_base(kind):
    """As the other families (tests/test_fp8_base.py): forward and DyLoRA gradients with the fp8 base equal those
    with the base rounded to fp8 and kept in bf16, the same slice drawn."""
    from sdadapt.training.fp8_base import FP8_DTYPE, cast_base_to_fp8

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8) if kind == "linear" else torch.nn.Conv2d(4, 8, 3, padding=1)
    layer.requires_grad_(False)
    models = [_dylora_on(layer, seed=3) for _ in range(2)]
    cast_base_to_fp8(models[0])
    for v in models[1][0]._parameters.values():
        if v is not None:
            v.data = v.data.to(FP8_DTYPE).to(torch.bfloat16)
    assert models[0][0].weight.dtype == FP8_DTYPE
    x = torch.randn((3, 6) if kind == "linear" else (2, 4, 5, 5), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for model in models:
        model.train()
        torch.manual_seed(4)  # (the slice: the global torch CPU RNG)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2  # (unit 2: two rows, two columns)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)


HALF_FLAGS = {
    "fp8-base": (["--fp8-base", "--mixed-precision", "bf16"], torch.float32),
    "full-fp16": (["--full-fp16", "--mixed-precision", "fp16"], torch.float16),
    "full-bf16": (["--full-bf16", "--mixed-precision", "bf16"], torch.bfloat16),
}


@pytest.mark.parametrize("flag", list(HALF_FLAGS))
def test_dylora_trains_and_saves_with_each_half_flag(flag, red_circles, tmp_path):
    """As tests/test_lycoris_half_and_fp8.py: two steps, the file in the dtype trained (--full-*: the half
    dtype, kohya saves the network as trained; --fp8-base: float32, only the frozen base is fp8), lora_up moved."""
    from safetensors import safe_open

    args, dtype = HALF_FLAGS[flag]
    out = tmp_path / "a.safetensors"
    assert main(["train", "dylora", "--images", str(red_circles), "--network-dim", "4", "--dylora-unit", "2", *args,
                 "--no-prior", "--steps", "2", "--resolution", "8", "--batch-size", "1", "--no-save-state", "-q",
                 "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    weights = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert weights and {v.dtype for v in weights.values()} == {dtype}
    assert any(v.abs().max() > 0 for k, v in weights.items() if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert meta["ss_fp8_base" if flag == "fp8-base" else "ss_" + flag.replace("-", "_")] == "True"
    assert meta["ss_network_module"] == "networks.dylora"


def test_gradient_checkpointing_run_is_the_plain_run_and_compile_is_refused(red_circles, tmp_path, capsys):
    """--gradient-checkpointing recomputes each forward with the slice it drew (the RNG is restored before the
    recompute): the run is the plain one bit for bit. --torch-compile is refused before the model loads."""
    common = ["train", "dylora", "--images", str(red_circles), "--network-dim", "4", "--dylora-unit", "2", "--no-prior",
              "--steps", "2", "--resolution", "16", "--batch-size", "2", "--no-save-state", "-q"]
    files = []
    for extra in ([], ["--gradient-checkpointing"]):
        files.append(tmp_path / f"{len(files)}.safetensors")
        torch.manual_seed(8)
        assert main([*common, *extra, "-o", str(files[-1])]) == 0
    first, _ = read_safetensors(files[0])
    second, _ = read_safetensors(files[1])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    assert main([*common, "--torch-compile", "-o", str(tmp_path / "c.safetensors")]) != 0
    assert "--torch-compile with dylora" in capsys.readouterr().err
