"""LoRA key maps on UNets whose ``layers_per_block`` is not SD's 2 (tiny SD1 single files with 1, 2, 3).

The LDM <-> diffusers block arithmetic depends on ``layers_per_block``; the checkpoint (or live model)
knows it, a LoRA file does not. Oracles independent of the key maps under test: the single-file
writer's own key conversion (each random tensor is unique, so LDM key <-> diffusers key pairs are
found by value), and a float64 ``W + scale · up @ down`` written here.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_checkpoints import tiny_sd1_parts, write_single_file

from sdadapt.cli import main
from sdadapt.formats import save_kohya
from sdadapt.formats.files import read_weights, write_safetensors
from sdadapt.formats.kohya import from_kohya, to_kohya
from sdadapt.formats.layers import resolve_layers
from sdadapt.formats.single_file import read_single_file
from sdadapt.formats.unet_names import ldm_to_diffusers_unet
from sdadapt.loratools.checkpoint_layers import checkpoint_layers, unet_layers_per_block

PREFIX = "model.diffusion_model."
RANK, ALPHA, STRENGTH = 2, 3.0, 0.7


def _parts(layers: int) -> dict:
    """tiny_sd1_parts with a UNet of ``layers`` resnets per down block (same blocks otherwise)."""
    import diffusers

    parts = tiny_sd1_parts()
    torch.manual_seed(layers)
    parts["unet"] = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    return parts


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"layers_per_block={n}")
def checkpoint(request, tmp_path_factory):
    """(layers, diffusers UNet, single-file path, {diffusers module path: LDM module path} by tensor value)."""
    layers = request.param
    parts = _parts(layers)
    path = write_single_file(parts, tmp_path_factory.mktemp(f"lpb{layers}") / "base.safetensors", architecture="sd1")
    unet = parts["unet"]
    ldm_state, _ = read_weights(path)
    by_bytes = {}
    for key, value in ldm_state.items():
        if key.startswith(PREFIX) and key.endswith(".weight") and value.dim() in (2, 4):
            by_bytes.setdefault(value.numpy().tobytes(), []).append(key[len(PREFIX) : -len(".weight")])
    pairs = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found = by_bytes[module.weight.detach().numpy().tobytes()]
            assert len(found) == 1, (name, found)
            pairs[name] = found[0]
    return layers, unet, path, pairs


def _lora(unet) -> dict[str, torch.Tensor]:
    """Random nonzero LoRA/LoCon factors over every Linear/Conv2d of ``unet`` (diffusers names)."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = (RANK, module.in_features), (module.out_features, RANK)
        elif isinstance(module, torch.nn.Conv2d):
            down, up = (RANK, module.in_channels, *module.kernel_size), (module.out_channels, RANK, 1, 1)
        else:
            continue
        state[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state


def test_checkpoint_layout_and_slots_match_the_writer(checkpoint):
    layers, unet, path, pairs = checkpoint
    state, _ = read_weights(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert unet_layers_per_block(shapes) == layers == unet.config.layers_per_block
    slots = {layer: slot.key for (component, layer), slot in checkpoint_layers(shapes).items() if component == "unet"}
    # every Linear/Conv of the UNet is found under its own diffusers name, on the writer's LDM key
    assert {name: slots.get(name) for name in pairs} == {n: f"{PREFIX}{ldm}.weight" for n, ldm in pairs.items()}
    if layers == 2:  # SD's layout: the mapping is the default one, as before
        assert all(ldm_to_diffusers_unet(ldm) == name for name, ldm in pairs.items())


@pytest.mark.parametrize("naming", ["sd1", "sdxl"])
def test_merge_lora_bakes_every_layer(checkpoint, tmp_path, capsys, naming):
    """merge-lora of a LoRA over every UNet Linear/Conv (kohya SD1 = diffusers names, SDXL = LDM names)
    read back through the single-file loader == float64 ``W + strength · alpha/r · up @ down``."""
    layers, unet, path, _ = checkpoint
    lora = _lora(unet)
    lora_path, out = tmp_path / "lora.safetensors", tmp_path / "baked.safetensors"
    save_kohya(lora_path, {"unet": lora}, base_model=naming, layers_per_block=layers)
    assert main(["merge-lora", str(path), str(lora_path), "--scale", str(STRENGTH), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    baked = read_single_file(out).components["unet"]
    base = unet.state_dict()
    assert set(baked) == set(base)
    touched = 0
    for key, value in base.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and f"{layer}.lora_down.weight" in lora:
            down = lora[f"{layer}.lora_down.weight"].double().flatten(1)
            up = lora[f"{layer}.lora_up.weight"].double().flatten(1)
            want = value.double() + STRENGTH * ALPHA / RANK * (up @ down).reshape(value.shape)
            torch.testing.assert_close(baked[key].double(), want, rtol=1e-6, atol=1e-6, msg=key)
            assert not torch.equal(baked[key], value), key
            touched += 1
        else:
            assert torch.equal(baked[key], value), key
    assert touched == len(lora) // 3


def test_kohya_ldm_names_follow_the_layout(checkpoint):
    """SDXL-style kohya keys (LDM names) are the checkpoint's own LDM keys, and read back to diffusers names."""
    layers, unet, _, pairs = checkpoint
    lora = _lora(unet)
    flat = to_kohya({"unet": lora}, base_model="sdxl", layers_per_block=layers)
    want = {f"lora_unet_{ldm.replace('.', '_')}.lora_down.weight" for ldm in pairs.values()}
    assert {k for k in flat if k.endswith(".lora_down.weight")} == want
    back = from_kohya(flat, layers_per_block=layers)["unet"]
    assert set(back) == set(lora)
    assert all(torch.equal(back[k], lora[k]) for k in lora)


def test_ldm_named_layers_resolve_on_a_diffusers_unet(checkpoint):
    """LDM layer paths placed on a live diffusers UNet land on the writer's module, not a neighbour."""
    _, unet, _, pairs = checkpoint
    resolved = resolve_layers(unet, list(pairs.values()))
    assert resolved == {ldm: name for name, ldm in pairs.items()}


def _ldm_named(unet, pairs: dict[str, str]) -> torch.nn.Module:
    """A live module tree with the single file's names (``model.diffusion_model.<LDM path>``)."""
    root = torch.nn.Module()
    modules = dict(unet.named_modules())
    for name, ldm in pairs.items():
        parent = root
        *path, leaf = f"{PREFIX}{ldm}".split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, modules[name])
    return root


def test_diffusers_named_layers_resolve_on_an_ldm_named_model(checkpoint):
    """Diffusers layer paths placed on a live LDM-named UNet (the layout read from its names)."""
    _, unet, _, pairs = checkpoint
    resolved = resolve_layers(_ldm_named(unet, pairs), list(pairs))
    assert resolved == {name: f"{PREFIX}{ldm}" for name, ldm in pairs.items()}


def test_extract_lora_writes_the_checkpoints_ldm_names(checkpoint, tmp_path, capsys):
    """extract-lora between two single files, SDXL (LDM) naming: the keys are the files' own LDM paths."""
    _, _, path, pairs = checkpoint
    state, _ = read_weights(path)
    g = torch.Generator().manual_seed(3)
    tuned = {  # a fine-tune of the transformer blocks' Linear layers
        k: v + 0.05 * torch.randn(v.shape, generator=g) if ".transformer_blocks." in k and v.dim() == 2 else v
        for k, v in state.items()
    }
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "extracted.safetensors"
    write_safetensors(tuned_path, tuned, {})
    code = main(["extract-lora", str(path), str(tuned_path), "--rank", "2", "--base-model", "sdxl",
                 "-o", str(out), "--quiet"])
    capsys.readouterr()
    assert code == 0
    written, _ = read_weights(out)
    got = {k[len("lora_unet_") : -len(".lora_down.weight")] for k in written if k.startswith("lora_unet_")
           and k.endswith(".lora_down.weight")}
    want = {ldm.replace(".", "_") for ldm in pairs.values() if ".transformer_blocks." in ldm}
    assert got == want
    # and it bakes back onto every one of those tensors
    baked = tmp_path / "baked.safetensors"
    assert main(["merge-lora", str(path), str(out), "-o", str(baked), "--quiet"]) == 0
    capsys.readouterr()


def _dora(unet) -> dict[str, torch.Tensor]:
    """A DoRA (LoRA + ``dora_scale`` (out, 1)) over the attention Linear layers (its delta needs the base weight)."""
    g = torch.Generator().manual_seed(11)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            state[f"{name}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.1
            state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.1
            state[f"{name}.alpha"] = torch.tensor(ALPHA)
            norm = module.weight.detach().norm(dim=1, keepdim=True)
            state[f"{name}.dora_scale"] = norm * (1 + 0.1 * torch.rand(norm.shape, generator=g))
    return state


@pytest.fixture(scope="module")
def baked_dora(checkpoint, tmp_path_factory):
    """(the SDXL-named (LDM) DoRA file of ``_dora``, the checkpoint's tensors with it baked in by
    merge-lora): written once per layout, read by both jobs' tests."""
    layers, unet, path, _ = checkpoint
    folder = tmp_path_factory.mktemp(f"dora{layers}")
    dora, baked = folder / "dora.safetensors", folder / "baked_dora.safetensors"
    save_kohya(dora, {"unet": _dora(unet)}, base_model="sdxl", layers_per_block=layers)
    assert main(["merge-lora", str(path), str(dora), "-o", str(baked), "--quiet"]) == 0
    return dora, read_weights(baked)[0]


@pytest.mark.parametrize("job", ["resize-lora", "combine-loras"])
def test_jobs_with_base_read_ldm_named_dora_on_the_right_weights(checkpoint, baked_dora, tmp_path, capsys, job):
    """resize-lora / combine-loras --base of an SDXL-named (LDM) DoRA file: DoRA's W' − W is read from
    the base's own tensors; at full rank, baking the result equals baking the DoRA file."""
    _, _, path, _ = checkpoint
    dora, want = baked_dora
    resized, baked = tmp_path / "out.safetensors", tmp_path / "baked_resized.safetensors"
    extra = ["--mode", "svd"] if job == "combine-loras" else []
    assert main([job, str(dora), "--base", str(path), "--rank", "64", *extra, "-o", str(resized), "--quiet"]) == 0
    assert main(["merge-lora", str(path), str(resized), "-o", str(baked), "--quiet"]) == 0
    capsys.readouterr()
    got = read_weights(baked)[0]
    base = read_weights(path)[0]
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert changed
    for key in changed:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)


def test_trained_sdxl_named_lora_saves_the_unets_ldm_names(checkpoint, tmp_path):
    """A training run's kohya save (SDXL = LDM naming) names the layers of the UNet it was trained on."""
    from sdadapt.adapters.lora import LoRAConfig
    from sdadapt.inject import inject
    from sdadapt.methods.lora import AdapterAdaptation
    from sdadapt.targets import UNET_LOCON

    layers, base_unet, _, pairs = checkpoint
    unet = copy.deepcopy(base_unet)  # (the layout's UNet, fresh: injecting changes it)
    handle = inject(unet, UNET_LOCON, LoRAConfig(rank=2))
    adaptation = AdapterAdaptation.__new__(AdapterAdaptation)
    adaptation.base_model, adaptation.network_args, adaptation.handles = "sdxl", {}, {"unet": handle}
    out = adaptation.save(tmp_path / "trained.safetensors")
    written, _ = read_weights(out)
    got = {k[len("lora_unet_") : -len(".lora_down.weight")] for k in written if k.endswith(".lora_down.weight")}
    assert got == {pairs[name].replace(".", "_") for name in handle.names}


def test_layout_reading_falls_back_to_sd_on_partial_key_sets(checkpoint):
    """Whole key sets tell their layout; a few names that do not add up get SD's 2 (as before)."""
    from sdadapt.formats.unet_keys import checked_layers_per_block

    layers, unet, _, pairs = checkpoint
    assert checked_layers_per_block(list(pairs.values()), naming="ldm") == layers
    assert checked_layers_per_block(list(pairs), naming="diffusers") == layers == unet.config.layers_per_block
    assert checked_layers_per_block(["input_blocks.1.1.proj_in", "output_blocks.2.1.conv"], naming="ldm") == 2
    assert checked_layers_per_block(["down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.2.conv1"],
                                    naming="diffusers") == 2
    assert checked_layers_per_block([], naming="diffusers") == 2
    # down blocks without up blocks (a partial list) do not tell the layout either
    assert checked_layers_per_block(["down_blocks.0.resnets.0.conv1"], naming="diffusers") == 2
    assert checked_layers_per_block(["input_blocks.1.0.in_layers.2", "input_blocks.2.0.op"], naming="ldm") == 2


def test_generate_and_network_weights_read_ldm_names_with_the_models_layout(checkpoint, tmp_path):
    """`generate --lora` and `--network-weights` place an SDXL-named (LDM) kohya file with the live UNet's layout."""
    from types import SimpleNamespace

    from sdadapt.jobs.generate import _apply_lora_file
    from sdadapt.methods.network_weights import read_network_weights

    layers, unet, _, pairs = checkpoint
    lora = _lora(unet)
    path = tmp_path / "sdxl_named.safetensors"
    write_safetensors(path, to_kohya({"unet": lora}, base_model="sdxl", layers_per_block=layers), {})
    weights = read_network_weights(path, system=SimpleNamespace(unet=unet, base_model="sdxl"))
    assert set(weights.components["unet"]) == set(lora)
    model = copy.deepcopy(unet)
    assert _apply_lora_file(SimpleNamespace(unet=model), path, 1.0)["layers"] == len(pairs)
    name = next(iter(pairs))
    want = dict(unet.named_modules())[name].weight.double() + ALPHA / RANK * (
        lora[f"{name}.lora_up.weight"].double().flatten(1) @ lora[f"{name}.lora_down.weight"].double().flatten(1)
    ).view_as(dict(unet.named_modules())[name].weight)
    assert torch.allclose(dict(model.named_modules())[name].weight.double(), want, atol=1e-5)
