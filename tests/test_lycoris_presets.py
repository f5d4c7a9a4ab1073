"""LyCORIS presets (``network_args = ["preset=full", ...]``) and LoKr's ``factor`` / ``decompose_both``.

Reference: lycoris-lora's kohya network (``lycoris.kohya.create_network`` -> ``LycorisNetworkKohya``)
walks ``named_modules()``; inside every module whose class a preset lists it adapts each
``nn.Linear`` and ``nn.Conv2d`` (kxk convolutions only when the preset's ``enable_conv``), and it
adapts the modules named in the preset's ``*_target_name``; a module ``prefix.name`` is saved as
``lora_unet_<name with _>`` / ``lora_te_...``. LyCORIS 4.1 added the class ``TimestepEmbedding``
(for Anima) to its presets; on SD UNets that repeats ``time_embedding`` (``preset=full`` then stops
with "duplicated lora name") and adds the time embedding to the transformer-only presets, so
sdadapt follows the presets as LyCORIS 3.x (what kohya_ss installs) has them, and the comparison
drops that class. kohya's own UNet calls its attention class ``CrossAttention`` (the class
``attn-only`` lists), so the test gives the diffusers attention modules that class name.
"""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs
from transformers_versions import lycoris_te_name

from sdadapt.errors import InputError
from sdadapt.formats import load_lora
from sdadapt.methods import prepare_lokr, prepare_lora
from sdadapt.methods.lycoris_presets import LYCORIS_PRESETS, lycoris_preset

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed (pip install lycoris-lora)")
from lycoris.config import PRESET

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


@pytest.fixture
def lycoris_network_class():
    """``LycorisNetworkKohya`` with its class-level preset restored afterwards (apply_preset mutates it)."""
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                           "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    yield cls
    for k, v in saved.items():
        setattr(cls, k, v)


def _kohya_attention_class(unet: torch.nn.Module) -> None:
    """Give diffusers' ``Attention`` modules the class name of kohya's UNet (``CrossAttention``)."""
    for module in unet.modules():
        if type(module).__name__ == "Attention":
            module.__class__ = type("CrossAttention", (type(module),), {})


def _te_canonical(name: str) -> str:
    # lycoris on a transformers-5 CLIPTextModel writes lora_te_encoder_...; the ecosystem's name has text_model
    return name.replace("lora_te_encoder_", "lora_te_text_model_encoder_")  # (on transformers 4 it has it already)


def _lycoris_names(cls, preset_name, unet, te, *, algo="locon", dim=2, conv_dim=2, **kwargs):
    preset = dict(PRESET[preset_name])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    if preset_name == "ia3":  # 4.1.3 re.match-es "to_k" against whole paths (nothing matches): anchor the names
        for key in ("unet_target_name", "text_encoder_target_name"):
            preset[key] = [rf"(.*\.)?{re.escape(n)}$" for n in preset[key]]
    cls.apply_preset(preset)
    net = cls(te, unet, lora_dim=dim, conv_lora_dim=conv_dim, alpha=1.0, conv_alpha=1.0, network_module=algo,
              warn_on_unmatched=False, **kwargs)
    return net, {m.lora_name for m in net.unet_loras}, {_te_canonical(m.lora_name) for m in net.text_encoder_loras}


def _file_modules(path) -> tuple[set[str], set[str]]:
    """The file's modules as LyCORIS names them on diffusers models (SDXL files carry kohya's LDM
    names, ``lora_unet_input_blocks_0_0`` for ``conv_in``: read back through sdadapt's translation)."""
    components, _ = load_lora(path)
    unet = {"lora_unet_" + key.rsplit(".", 2 if ".lora_" in key else 1)[0].replace(".", "_")
            for key in components.get("unet", {})}
    te = {"lora_te_" + key.rsplit(".", 2 if ".lora_" in key else 1)[0].replace(".", "_")
          for key in components.get("text_encoder", {})}
    return unet, te


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", sorted(LYCORIS_PRESETS))
def test_preset_adapts_and_saves_the_modules_lycoris_picks(preset, arch, lycoris_network_class, tmp_path):
    unet = tiny_unet_sd1() if arch == "sd1" else tiny_unet_sdxl()
    _kohya_attention_class(unet)
    te = tiny_clip()
    _, want_unet, want_te = _lycoris_names(lycoris_network_class, preset, unet, te)
    assert want_unet, "every preset adapts some UNet layer"

    system = SimpleNamespace(unet=unet, text_encoder=te, base_model=arch)
    adaptation = prepare_lora(system, rank=2, alpha=1.0, targets=preset)
    path = adaptation.save(tmp_path / "lora.safetensors")
    got_unet, got_te = _file_modules(path)
    if arch == "sd1":  # SD1 files carry the diffusers-derived names LyCORIS writes as they are
        assert {k.split(".")[0] for k in load_file(str(path)) if k.startswith("lora_unet_")} == want_unet
    assert got_unet == want_unet
    assert got_te == want_te
    if preset == "full":  # beyond kohya's LoCon layers: conv_in, conv_out and the time embedding
        assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1"} <= got_unet
    metadata = json.loads(load_file_metadata(path)["ss_network_args"])
    assert metadata["preset"] == preset
    adaptation.remove()


def load_file_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_ldm_names_select_the_same_layers_as_diffusers_names():
    """The presets are name patterns over diffusers and LDM ("compvis") UNets alike."""
    from sdadapt.formats.layers import canonical_layer_path
    from sdadapt.targets import select

    # an LDM-named stand-in: the LDM paths of the diffusers layers the preset picks must be picked too
    cases = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}
    full = LYCORIS_PRESETS["full"].unet
    lin = LYCORIS_PRESETS["full-lin"].unet
    conv3 = torch.nn.Conv2d(4, 4, 3)
    linear = torch.nn.Linear(4, 4)
    for diffusers_name, ldm_name in cases.items():
        module = conv3 if "conv" in diffusers_name else linear
        assert full(diffusers_name, module) and full(ldm_name, module)
        assert lin(ldm_name, module) == (module is linear)
    assert not full("label_emb.0.0", linear) and not full("add_embedding.linear_1", linear)
    assert canonical_layer_path("unet", "conv_in") == "conv_in"
    assert [n for n, _ in select(tiny_unet_sd1(), LYCORIS_PRESETS["unet-convblock-only"].unet)]


@pytest.mark.parametrize("factor, decompose_both", [(4, True), (2, False), (-1, True)])
def test_lokr_factor_and_decompose_both_match_lycoris(factor, decompose_both, lycoris_network_class, tmp_path):
    """Same tensors and shapes as LyCORIS' LokrModule with ``factor`` / ``decompose_both``, and
    LyCORIS applying sdadapt's file gives sdadapt's UNet and text-encoder outputs."""
    unet, te = tiny_unet_sd1(), tiny_clip()
    inputs = unet_inputs(unet)
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    base = run_unet(unet, inputs)
    system = SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1")
    adaptation = prepare_lokr(system, rank=2, alpha=1.0, factor=factor, decompose_both=decompose_both, targets="attn-mlp")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adaptation.params:
            p.copy_(torch.randn_like(p) * 0.3)
    y_unet = run_unet(unet, inputs)
    with torch.no_grad():
        y_te = te(ids).last_hidden_state
    assert (y_unet - base).abs().max() > 1e-3
    path = adaptation.save(tmp_path / "lokr.safetensors")
    adaptation.remove()
    ours = load_file(str(path))

    # LyCORIS' own network with the same options: the same tensor names and shapes
    fresh_unet, fresh_te = tiny_unet_sd1(), tiny_clip()
    net, _, _ = _lycoris_names(lycoris_network_class, "attn-mlp", fresh_unet, fresh_te, algo="lokr", factor=factor,
                               decompose_both=decompose_both)
    theirs = {_te_canonical(f"{m.lora_name}.{k}"): v for m in net.unet_loras + net.text_encoder_loras
              for k, v in m.state_dict().items() if k.startswith("lokr_")}
    assert {k: tuple(v.shape) for k, v in ours.items() if ".lokr_" in k} == {k: tuple(v.shape) for k, v in theirs.items()}

    # LyCORIS applies sdadapt's file: same outputs (lycoris names the transformers-5 text encoder without text_model)
    weights = {lycoris_te_name(k): v for k, v in ours.items()}
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, fresh_te, fresh_unet, weights_sd=weights)
    assert len(loaded.unet_loras) == len([m for m in net.unet_loras])
    loaded.apply_to(fresh_te, fresh_unet, apply_text_encoder=True, apply_unet=True)
    assert torch.allclose(run_unet(fresh_unet, inputs), y_unet, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.allclose(fresh_te(ids).last_hidden_state, y_te, atol=2e-5, rtol=1e-4)


def test_gui_network_args_parse_and_other_methods_drop_lokr_off_values():
    from sdadapt.cli.train import _method_options
    from sdadapt.network_args import check_lycoris_args
    from sdadapt.network_args import parse_network_args

    gui = ["preset=full", "conv_dim=4", "conv_alpha=1", "algo=locon", "factor=-1", "decompose_both=false",
           "use_tucker=False", "rank_dropout_scale=False", "train_norm=false", "use_scalar=False", "bypass_mode=False"]
    chosen = parse_network_args(gui, method_options=set(_method_options()))
    assert chosen == {"targets": "full", "conv_rank": "4", "conv_alpha": "1", "algo": "locon", "factor": "-1",
                      "decompose_both": "false", "use_tucker": "False"}
    check_lycoris_args("locon", chosen)
    assert chosen == {"targets": "full", "conv_rank": "4", "conv_alpha": "1", "use_tucker": "False"}
    lokr = parse_network_args(["algo=lokr", "factor=8", "decompose_both=true"], method_options=set(_method_options()))
    check_lycoris_args("lokr", lokr)
    assert lokr == {"factor": "8", "decompose_both": "true"}


@pytest.mark.parametrize("method, args, message", [
    ("lora", ["train_on_input=true"], "option of ia3"),
    ("lokr", ["preset=my_preset.toml"], "no such file"),
    ("lokr", ["preset=fulll"], "unknown LyCORIS preset"),
    ("locon", ["factor=8"], "option of lokr"),
    ("lora", ["decompose_both=true"], "option of lokr"),
    ("lokr", ["factor=0"], "must be -1 (the most square split"),
    ("lokr", ["train_norm=true", "preset=attn-only"], "hold no GroupNorm/LayerNorm"),
])
def test_cli_refuses_before_the_model_loads(method, args, message, tmp_path, capsys):
    from sdadapt.cli import main as cli_main

    rc = cli_main(["train", method, "--model", str(tmp_path / "no-model"), "--images", str(tmp_path), "--steps", "1",
                   "-o", str(tmp_path / "out.safetensors"), "--network-args", *args])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_preset_refusals_in_the_library():
    unet, te = tiny_unet_sd1(), tiny_clip()
    system = SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1")
    with pytest.raises(InputError, match="block-wise"):
        prepare_lokr(system, rank=2, targets="full", down_lr_weight="sine")
    with pytest.raises(InputError, match="nothing would train"):
        prepare_lora(system, rank=2, targets="unet-only", unet=False)
    with pytest.raises(InputError, match="lora has no factor"):
        prepare_lora(system, rank=2, factor=4)
    assert not any(n for n, m in unet.named_modules() if ".sdadapt" in n)  # nothing left injected


def test_lycoris_preset_lookup():
    assert lycoris_preset(" full ").name == "full"
    with pytest.raises(InputError, match="unet-convblock-only"):
        lycoris_preset("nope")


def _lycoris_gui_config(tmp_path, root, images, network_args: list[str]):
    """A kohya_ss GUI LyCORIS TOML config ``tmp_path/gui.toml``: one step of ``network_module =
    "lycoris.kohya"`` (dim 4, alpha 1) on the model folder ``root`` and ``images``, writing
    ``tmp_path/lokr.safetensors``, with ``network_args``."""
    config = tmp_path / "gui.toml"
    config.write_text(f'''pretrained_model_name_or_path = "{root}"
train_data_dir = "{images}"
output_dir = "{tmp_path}"
output_name = "lokr"
network_module = "lycoris.kohya"
network_dim = 4
network_alpha = 1
max_train_steps = 1
network_args = {json.dumps(network_args)}
''')
    return config


def test_gui_lycoris_config_trains_and_lycoris_loads_the_file(tmp_path, lycoris_network_class):
    """A kohya_ss GUI LyCORIS config (``network_module = "lycoris.kohya"`` with its whole
    ``network_args`` list) trains LoKr on a tiny SD folder; the file holds the modules LyCORIS'
    ``preset=full`` picks on that model, with LyCORIS' LoKr tensor shapes, and LyCORIS loads it."""
    import diffusers
    import transformers
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "model")
    images = _images(tmp_path / "images")
    out = tmp_path / "lokr.safetensors"
    config = _lycoris_gui_config(tmp_path, root, images, [
        "preset=full", "conv_dim=2", "conv_alpha=1", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
        "dora_wd=False", "module_dropout=0", "factor=4", "decompose_both=true", "use_scalar=False",
        "rank_dropout_scale=False", "algo=lokr", "train_norm=False"])
    code = main(["train", "lokr", "--config", str(config), "--images", str(images), "--model", str(root), "-q",
                 "-o", str(out)])
    assert code == 0
    ours = load_file(str(out))
    args = json.loads(load_file_metadata(out)["ss_network_args"])
    assert args["preset"] == "full" and args["factor"] == "4" and args["decompose_both"] in ("True", "true")

    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    te = transformers.CLIPTextModel.from_pretrained(root / "text_encoder")
    net, want_unet, want_te = _lycoris_names(lycoris_network_class, "full", unet, te, algo="lokr", dim=4, conv_dim=2,
                                              factor=4, decompose_both=True)
    theirs = {_te_canonical(f"{m.lora_name}.{k}"): tuple(v.shape) for m in net.unet_loras + net.text_encoder_loras
              for k, v in m.state_dict().items() if k.startswith("lokr_")}
    assert {k: tuple(v.shape) for k, v in ours.items() if ".lokr_" in k} == theirs
    assert {k.split(".")[0] for k in ours if k.startswith("lora_unet_")} == want_unet
    weights = {lycoris_te_name(k): v for k, v in ours.items()}
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=weights)
    assert len(loaded.unet_loras) == len(want_unet) and len(loaded.text_encoder_loras) == len(want_te)

