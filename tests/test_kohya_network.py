"""``sdadapt.kohya_network``: sdadapt's adapters behind kohya's ``--network_module`` interface.

The network is driven here as kohya sd-scripts 48d368fa's ``train_network.py`` drives a network module
(``create_network`` / ``create_network_from_weights`` → ``apply_to`` → ``load_weights`` → its own
``unet.requires_grad_(False)`` and ``unet.to(dtype)`` casts → ``prepare_optimizer_params`` → ``prepare_grad_etc``
→ ``on_epoch_start`` → steps → ``apply_max_norm_regularization`` → ``save_weights``), on tiny diffusers UNets (whose
block classes, ``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, are the class names
kohya's own UNet and ``networks/lora.py`` use) and transformers CLIP text encoders. References written here: the
layer rule and key names of ``networks/lora.py``'s ``create_modules``, its ``apply_max_norm_regularization``
(float64), its parameter groups.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs
from torch import nn

import sdadapt
from sdadapt import kohya_network
from sdadapt.errors import InputError
from sdadapt.formats.files import read_weights

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

#: networks/lora.py's containers: LoRA on every Linear / Conv2d inside them (3x3 convolutions only with conv_dim)
_UNET_CONTAINERS = ("Transformer2DModel",)
_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TEXT_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_modules(root: nn.Module, prefix: str, *, conv_dim: int | None, network_dim: int, text: bool = False
                  ) -> dict[str, int]:
    """networks/lora.py ``create_modules`` restated: ``{lora name: rank}``. Text encoders are named as on
    transformers 4 (``text_model.encoder…``: the names of kohya's files whatever transformers runs)."""
    containers = _TEXT_CONTAINERS if text else _UNET_CONTAINERS + (_CONV_CONTAINERS if conv_dim else ())
    out: dict[str, int] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind not in ("Linear", "Conv2d"):
                continue
            if kind == "Linear" or child.kernel_size == (1, 1):
                rank = network_dim
            elif conv_dim is not None:
                rank = conv_dim
            else:
                continue
            path = f"{name}.{child_name}"
            if text and not path.startswith("text_model."):
                path = "text_model." + path
            out[f"{prefix}.{path}".replace(".", "_")] = rank
    return out


def file_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, _ = read_weights(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, rest = key.partition(".")
        modules.setdefault(module, {})[rest] = value
    return modules


def randomise(network, seed: int = 0, std: float = 0.05) -> None:
    """Every adapter parameter random (a trained network: up factors no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std + (1.0 if param.dim() == 1 else 0.0))


def te_output(te, ids=None) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 2, 1, 1]]) if ids is None else ids
    with torch.no_grad():
        return te(ids).last_hidden_state


@pytest.mark.parametrize("conv_dim", [None, 2])
def test_layers_ranks_alphas_and_keys_are_kohya_networks_lora(tmp_path, conv_dim):
    unet, te = tiny_unet_sd1(), tiny_clip()
    args = {} if conv_dim is None else {"conv_dim": str(conv_dim)}
    network = kohya_network.create_network(1.0, 4, 2.0, None, te, unet, neuron_dropout=None, dropout=None, **args)
    network.apply_to(te, unet, True, True)
    network.save_weights(tmp_path / "net.safetensors", None, {})
    modules = file_modules(tmp_path / "net.safetensors")
    expected = {**kohya_modules(unet, "lora_unet", conv_dim=conv_dim, network_dim=4),
                **kohya_modules(te, "lora_te", conv_dim=None, network_dim=4, text=True)}
    assert set(modules) == set(expected)
    for name, rank in expected.items():
        assert modules[name]["lora_down.weight"].shape[0] == rank, name
        # networks/lora.py: alpha = network_alpha, conv_alpha defaults to 1 when conv_dim is given without it
        alpha = 1.0 if rank == conv_dim and modules[name]["lora_down.weight"].shape[2:] == (3, 3) else 2.0
        assert float(modules[name]["alpha"]) == alpha, name
        assert set(modules[name]) == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_defaults_are_kohya_rank_4_alpha_1(tmp_path):
    unet, te = tiny_unet_sd1(), tiny_clip()
    network = kohya_network.create_network(1.0, None, None, None, te, unet)
    network.apply_to(te, unet, False, True)  # (kohya's --network_train_unet_only)
    network.save_weights(tmp_path / "n.safetensors", None, None)
    modules = file_modules(tmp_path / "n.safetensors")
    assert modules and all(name.startswith("lora_unet_") for name in modules)
    assert {m["lora_down.weight"].shape[0] for m in modules.values()} == {4}
    assert {float(m["alpha"]) for m in modules.values()} == {1.0}


def test_kohya_call_sequence_keeps_float32_trainable_adapters_through_the_casts():
    torch.manual_seed(0)
    unet, te = tiny_unet_sd1(), tiny_clip()
    network = kohya_network.create_network(1.0, 4, 4.0, None, te, unet, neuron_dropout=0.1, conv_dim="2")
    network.apply_to(te, unet, True, True)
    params, descriptions = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    # what train_network.py does after apply_to: freeze and cast the frozen models (fp8 base: float8 weights)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    te.to(dtype=torch.float8_e4m3fn)
    te.to(dtype=torch.bfloat16)  # (and back: the adapters never saw either)
    unet.to(dtype=torch.bfloat16)
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in network.parameters())
    network.prepare_grad_etc(te, unet)
    network.on_epoch_start(te, unet)
    assert all(p.requires_grad for p in network.parameters()) and all(m.training for m in network.adapters.values())
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in params] == [5e-5, 1e-4]
    assert sum(len(list(g["params"])) for g in params) == len(list(network.parameters()))
    optimizer = torch.optim.AdamW(params)
    (x, t, _), _ = unet_inputs(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = te(torch.tensor([[0, 5, 9, 17, 2], [0, 7, 3, 2, 1]])).last_hidden_state
        loss = unet(x.bfloat16(), t, cond).sample.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    assert all(p.grad is None for p in unet.parameters() if not any(p is q for q in network.parameters()))
    ups = [p.detach().clone() for n, p in network.named_parameters() if n.endswith("lora_up")]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, (n, p) in zip(ups, ((n, p) for n, p in network.named_parameters()
                                                                  if n.endswith("lora_up"))))
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    assert next(unet.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("args", [{"conv_dim": "2", "conv_alpha": "1"}, {"algo": "loha", "conv_dim": "2"},
                                  {"algo": "lokr"}, {"algo": "locon", "dora_wd": "True"}])
def test_saved_file_applies_to_the_outputs_the_network_gave(tmp_path, args):
    unet, te = tiny_unet_sd1(seed=3), tiny_clip(seed=3)
    network = kohya_network.create_network(1.0, 4, 2.0, None, te, unet, **args)
    network.apply_to(te, unet, True, True)
    randomise(network, std=0.2)
    inputs = unet_inputs(unet)
    live_unet, live_te = run_unet(unet, inputs), te_output(te)
    base_unet, base_te = run_unet(tiny_unet_sd1(seed=3), inputs), te_output(tiny_clip(seed=3))
    assert (live_unet - base_unet).abs().max() > 1e-3 and (live_te - base_te).abs().max() > 1e-3
    network.save_weights(tmp_path / "n.safetensors", None, {"ss_network_module": "sdadapt.kohya_network"})
    components, metadata = sdadapt.load_lora(tmp_path / "n.safetensors")
    assert metadata["ss_network_module"] == "sdadapt.kohya_network"  # kohya's metadata over sdadapt's
    assert "ss_network_args" not in metadata  # (kohya writes it only with --network_args)
    fresh_unet, fresh_te = tiny_unet_sd1(seed=3), tiny_clip(seed=3)
    sdadapt.apply_lora(fresh_unet, components["unet"])
    sdadapt.apply_lora(fresh_te, components["text_encoder"])
    torch.testing.assert_close(run_unet(fresh_unet, inputs), live_unet, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_output(fresh_te), live_te, atol=2e-5, rtol=1e-4)


def test_load_weights_from_weights_and_merge_to(tmp_path):
    unet, te = tiny_unet_sd1(seed=1), tiny_clip(seed=1)
    network = kohya_network.create_network(1.0, 4, 2.0, None, te, unet, conv_dim="2")
    network.apply_to(te, unet, True, True)
    randomise(network, seed=5)
    network.save_weights(tmp_path / "n.safetensors", None, {})
    inputs = unet_inputs(unet)
    live = run_unet(unet, inputs), te_output(te)
    # --network_weights: the same options, then load_weights
    unet2, te2 = tiny_unet_sd1(seed=1), tiny_clip(seed=1)
    again = kohya_network.create_network(1.0, 4, 2.0, None, te2, unet2, conv_dim="2")
    again.apply_to(te2, unet2, True, True)
    again.load_weights(tmp_path / "n.safetensors")
    assert torch.equal(run_unet(unet2, inputs), live[0]) and torch.equal(te_output(te2), live[1])
    # --dim_from_weights: the file's modules
    unet3, te3 = tiny_unet_sd1(seed=1), tiny_clip(seed=1)
    from_file, tensors = kohya_network.create_network_from_weights(1, tmp_path / "n.safetensors", None, te3, unet3)
    assert set(tensors) == set(read_weights(tmp_path / "n.safetensors")[0])
    from_file.apply_to(te3, unet3, True, True)
    from_file.load_weights(tmp_path / "n.safetensors")
    assert torch.equal(run_unet(unet3, inputs), live[0]) and torch.equal(te_output(te3), live[1])
    # --base_weights: merged into the weights (W + m·ΔW), nothing injected
    unet4, te4 = tiny_unet_sd1(seed=1), tiny_clip(seed=1)
    merged, tensors = kohya_network.create_network_from_weights(0.5, tmp_path / "n.safetensors", None, te4, unet4,
                                                                for_inference=True)
    assert merged.is_mergeable()
    merged.merge_to(te4, unet4, tensors, torch.float32, "cpu")
    assert not any(name.endswith("sdadapt") for name, _ in unet4.named_modules())
    network.set_multiplier(0.5)
    torch.testing.assert_close(run_unet(unet4, inputs), run_unet(unet, inputs), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_output(te4), te_output(te), atol=2e-5, rtol=1e-4)


def test_set_multiplier_and_set_enabled():
    unet, te = tiny_unet_sd1(seed=2), tiny_clip(seed=2)
    base = run_unet(tiny_unet_sd1(seed=2), unet_inputs(unet))
    network = kohya_network.create_network(1.0, 4, 4.0, None, te, unet)
    network.apply_to(te, unet, True, True)
    randomise(network)
    live = run_unet(unet, unet_inputs(unet))
    network.set_multiplier(0.0)  # (kohya's differential output preservation)
    assert torch.equal(run_unet(unet, unet_inputs(unet)), base)
    network.set_multiplier(1.0)
    assert torch.equal(run_unet(unet, unet_inputs(unet)), live)
    network.set_enabled(False)
    assert torch.equal(run_unet(unet, unet_inputs(unet)), base)
    network.set_enabled(True)
    assert torch.equal(run_unet(unet, unet_inputs(unet)), live)


def test_optimizer_groups_loraplus_block_weights_and_sdxl_encoder_rates():
    unet, te = tiny_unet_sd1(), tiny_clip()
    network = kohya_network.create_network(1.0, 4, 4.0, None, te, unet, loraplus_lr_ratio="16")
    network.apply_to(te, unet, True, True)
    params, descriptions = network.prepare_optimizer_params(None, 1e-4, 2e-4)
    by_name = dict(zip(descriptions, params))
    assert set(descriptions) == {"textencoder", "textencoder x16", "unet", "unet x16"}
    assert by_name["unet"]["lr"] == 1e-4 and by_name["unet x16"]["lr"] == pytest.approx(1.6e-3)
    assert by_name["textencoder"]["lr"] == 2e-4 and by_name["textencoder x16"]["lr"] == pytest.approx(3.2e-3)
    ups = {id(p) for n, p in network.named_parameters() if n.endswith("lora_up")}
    assert {id(p) for p in by_name["unet x16"]["params"]} | {id(p) for p in by_name["textencoder x16"]["params"]} == ups
    # kohya leaves a group at lr 0 out (its "NO LR skipping!"): the text encoder here
    params, descriptions = network.prepare_optimizer_params(0.0, 1e-4, 2e-4)
    assert descriptions == ["unet", "unet x16"]
    # SDXL: one rate per text encoder (a list; a missing second is the first's)
    xl_unet, te1, te2 = tiny_unet_sdxl(), tiny_clip(), tiny_clip(seed=1, with_projection=True)
    xl = kohya_network.create_network(1.0, 4, 4.0, None, [te1, te2], xl_unet)
    xl.apply_to([te1, te2], xl_unet, True, True)
    params, descriptions = xl.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], None, 3e-4)
    assert dict(zip(descriptions, [g["lr"] for g in params])) == {"textencoder1": 1e-5, "textencoder2": 2e-5, "unet": 3e-4}
    params, descriptions = xl.prepare_optimizer_params([7e-5], None, 3e-4)
    assert dict(zip(descriptions, [g["lr"] for g in params])) == {"textencoder1": 7e-5, "textencoder2": 7e-5, "unet": 3e-4}


def test_block_lr_weights_scale_the_unet_groups():
    unet, te = tiny_unet_sd1(), tiny_clip()
    network = kohya_network.create_network(1.0, 4, 4.0, None, te, unet, down_lr_weight="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,"
                                           "0.5,0.5,0.5,0.5", mid_lr_weight="1", up_lr_weight="2,2,2,2,2,2,2,2,2,2,2,2")
    network.apply_to(te, unet, False, True)
    params, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    rates = dict(zip(descriptions, [g["lr"] for g in params]))
    assert rates == {"unet x0.5": pytest.approx(5e-5), "unet": pytest.approx(1e-4), "unet x2": pytest.approx(2e-4)}


def test_sdxl_names_two_text_encoders_and_ldm_unet_layers(tmp_path):
    unet, te1, te2 = tiny_unet_sdxl(), tiny_clip(), tiny_clip(seed=1, with_projection=True)
    network = kohya_network.create_network(1.0, 4, 4.0, None, [te1, te2], unet)
    network.apply_to([te1, te2], unet, True, True)
    network.save_weights(tmp_path / "xl.safetensors", torch.float16, {})
    modules = file_modules(tmp_path / "xl.safetensors")
    unet_names = [n for n in modules if n.startswith("lora_unet_")]
    assert len(unet_names) == len(kohya_modules(unet, "lora_unet", conv_dim=None, network_dim=4))
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in unet_names)  # kohya's SDXL files: LDM names
    for index, te in ((1, te1), (2, te2)):
        assert {n for n in modules if n.startswith(f"lora_te{index}_")} == set(
            kohya_modules(te, f"lora_te{index}", conv_dim=None, network_dim=4, text=True))
    assert {m["lora_down.weight"].dtype for m in modules.values()} == {torch.float16}
    assert {m["alpha"].dtype for m in modules.values()} == {torch.float32}


def test_max_norm_regularization_is_kohyas():
    unet, te = tiny_unet_sd1(), tiny_clip()
    network = kohya_network.create_network(1.0, 4, 2.0, None, te, unet, conv_dim="2", conv_alpha="1")
    network.apply_to(te, unet, True, True)
    randomise(network, seed=2, std=0.4)
    before = {name: {k: v.detach().double() for k, v in adapter.file_tensors().items()}
              for name, adapter in network.adapters.items()}

    def delta(t):  # networks/lora.py apply_max_norm_regularization's up·down·scale, in float64
        down, up, alpha = t["lora_down.weight"], t["lora_up.weight"], t["alpha"]
        if up.dim() == 4 and down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up.flatten(1) @ down.flatten(1)
        return updown * (alpha / down.shape[0])

    max_norm = float(sorted(float(delta(t).norm()) for t in before.values())[len(before) // 2])  # (half scaled)
    expected_scaled, expected_norms, ratios = 0, [], {}
    for name, t in before.items():
        updown = delta(t)
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = float(torch.clamp(norm, max=max_norm) / norm)
        expected_scaled += ratio != 1
        ratios[name] = ratio
        expected_norms.append(float(updown.norm()) * ratio)
    keys_scaled, mean_norm, maximum = network.apply_max_norm_regularization(max_norm, "cpu")
    assert 0 < keys_scaled == expected_scaled < len(before)
    assert mean_norm == pytest.approx(sum(expected_norms) / len(expected_norms), rel=1e-5)
    assert maximum == pytest.approx(max(expected_norms), rel=1e-5)
    for name, adapter in network.adapters.items():
        after = adapter.file_tensors()
        for key in ("lora_down.weight", "lora_up.weight"):
            torch.testing.assert_close(after[key].double(), before[name][key] * math.sqrt(ratios[name]),
                                       rtol=1e-5, atol=1e-7)


def test_other_algos_and_bad_input(tmp_path):
    unet, te = tiny_unet_sd1(), tiny_clip()
    # (rank, alpha, conv_dim: what LyCORIS' IA3Module ignores too; the kohya_ss GUI writes them for every algo)
    ia3 = kohya_network.create_network(1.0, 16, 8.0, None, te, unet, algo="ia3", conv_dim="4", conv_alpha="1")
    ia3.apply_to(te, unet, False, True)
    ia3.save_weights(tmp_path / "ia3.safetensors", None, {})
    assert all("weight" in m and "on_input" in m for m in file_modules(tmp_path / "ia3.safetensors").values())
    with pytest.raises(InputError, match="apply_to was called already"):
        ia3.apply_to(te, unet, False, True)
    with pytest.raises(InputError, match="unknown network arg 'conv_dimm'.*did you mean conv_dim"):
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, conv_dimm="4")
    with pytest.raises(InputError, match="factor: not an option of loha"):
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", factor="8")
    with pytest.raises(InputError, match="algo=dylora"):
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, algo="dylora")
    with pytest.raises(InputError, match="rank_dropout='half'"):
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, rank_dropout="half")
    with pytest.raises(InputError, match="network_args conv_dim='x' is not a valid int"):  # (kohya's name, not conv_rank)
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, conv_dim="x")
    with pytest.raises(InputError, match="network_args conv_rank='x' is not a valid int"):  # (as written)
        kohya_network.create_network(1.0, 4, 1.0, None, te, unet, conv_rank="x")
    network = kohya_network.create_network(1.0, 4, 1.0, None, te, tiny_unet_sd1())
    with pytest.raises(InputError, match="apply_to"):
        network.save_weights(tmp_path / "x.safetensors", None, {})
    network.apply_to(te, network._models.unet, False, True)
    import argparse

    with pytest.raises(InputError, match="--save_model_as ckpt: sdadapt writes safetensors only"):
        network.prepare_network(argparse.Namespace(save_model_as="ckpt"))  # (kohya calls it before training)
    network.prepare_network(argparse.Namespace(save_model_as="safetensors"))
    for suffix in (".ckpt", ".pt"):
        with pytest.raises(InputError, match="safetensors only"):
            network.save_weights(tmp_path / f"x{suffix}", None, {})
        assert not (tmp_path / f"x{suffix}").exists()
    with pytest.raises(InputError, match="create_network_from_weights"):
        network.merge_to(te, unet, {}, None, None)


def test_docs_page_example_runs_as_it_says(tmp_path, monkeypatch, capsys):
    from docs_pages import run_block

    monkeypatch.chdir(tmp_path)  # (the example writes my_lora.safetensors into the working folder)
    namespace = run_block("kohya-network.md")
    assert namespace["descriptions"] == ["textencoder", "textencoder x16", "unet", "unet x16"]
    assert {p.dtype for p in namespace["network"].parameters()} == {torch.float32}
    assert namespace["metadata"]["ss_network_module"] == "sdadapt.kohya_network"
    assert sorted(namespace["components"]) == ["text_encoder", "unet"]
    conv = [k for k in namespace["components"]["unet"] if k.endswith("conv1.lora_down.weight")]
    assert conv and all(namespace["components"]["unet"][k].shape[0] == 4 for k in conv)  # conv_dim=4
    ups = [p for n, p in namespace["network"].named_parameters() if n.endswith("lora_up")]
    assert any(float(p.detach().abs().max()) > 0 for p in ups)  # it trained
    out = capsys.readouterr().out
    assert "['textencoder', 'textencoder x16', 'unet', 'unet x16']" in out and "sdadapt.kohya_network" in out


def test_an_ldm_named_sdxl_unet_as_kohyas_own_writes_the_same_keys(tmp_path):
    # kohya's SdxlUNet2DConditionModel names its modules as LDM does (input_blocks.4.1.transformer_blocks...): the
    # network on such a tree writes the keys it writes for the diffusers-named UNet (which test_sdxl_names checks)
    from test_targets import ldm_tree

    files = {}
    for name, unet in (("diffusers", tiny_unet_sdxl()), ("ldm", ldm_tree(tiny_unet_sdxl()))):
        te1, te2 = tiny_clip(), tiny_clip(seed=1, with_projection=True)
        network = kohya_network.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="2")
        network.apply_to([te1, te2], unet, False, True)
        network.save_weights(tmp_path / f"{name}.safetensors", None, {})
        files[name] = {k: tuple(v.shape) for k, v in read_weights(tmp_path / f"{name}.safetensors")[0].items()}
    assert files["ldm"] == files["diffusers"]
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.") for k in files["ldm"])
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in files["ldm"])  # (conv_dim: the upsampler)
