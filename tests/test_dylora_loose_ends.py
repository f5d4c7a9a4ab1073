"""DyLoRA's loose ends: ``inspect`` names DyLoRA files from their metadata, ``fit`` refuses to compile a DyLoRA
network, ``lora_multipliers`` reads every tag A1111 reads, and LoKr files whose two ranks differ convert to peft.

References:
- kohya-ss/sd-scripts@48d368fa: train_network.py:664-668 (``--network_args`` split at the first ``=``, values kept as
  strings), 1020 / 1204 (``ss_network_module``, ``ss_network_args = json.dumps(net_kwargs)``), networks/dylora.py:193-205
  (``unit = int(unit)`` when given, else 1).
- KohakuBlueleaf/LyCORIS@f49d30d: lycoris/kohya.py:47 (``algo`` lowercased), 55
  (``block_size = int(kwargs.get("block_size", None) or 4)``).
- AUTOMATIC1111 extensions-builtin/Lora/extra_networks_lora.py ``activate`` (transcribed in test_apply_reference.py as
  ``a1111_tag_multipliers``).
- peft 0.21.2 tuners/lokr/layer.py ``update_layer`` (one ``r`` per layer: ``use_w1 = not (decompose_both and r <
  max(a, c) / 2)``, ``use_w2 = r >= max(b, d) / 2``, ``scaling = alpha / r``), loaded by peft itself here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_apply_reference import a1111_tag_multipliers, a1111_updown  # (A1111's activate / network_*.py, transcribed)
from toy_adapter_files import random_adapter_file

from sdadapt.adapters.dylora import DYLORA_COMPILE_REASON
from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.formats.detect import describe_file, dylora_network
from sdadapt.methods import METHODS
from sdadapt.toy import load_toy

F64 = torch.float64


@pytest.fixture(scope="module")
def toy():
    return load_toy()


def _resave(source, target, metadata: dict[str, str]) -> None:
    """``source``'s tensors under other metadata (what another trainer would have written beside them)."""
    save_file(load_file(str(source)), str(target), metadata)


def _kohya_network_args(*args: str) -> str:
    """train_network.py:664-678: ``--network_args k=v ...`` split at the first ``=`` (values strings), plus the
    ``dropout`` workaround (``args.network_dropout``, None by default), ``json.dumps``'d (l. 1204)."""
    net_kwargs: dict[str, object] = {}
    for net_arg in args:
        key, value = net_arg.split("=", 1)
        net_kwargs[key] = value
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = None
    return json.dumps(net_kwargs)


# ------------------------------------------------------------------------------ 1. inspect names DyLoRA files
def _kohya_unit(kwargs: dict) -> int:
    """networks/dylora.py:193-205."""
    unit = kwargs.get("unit", None)
    if unit is not None:
        unit = int(unit)
    else:
        unit = 1
    return unit


def _lycoris_block_size(kwargs: dict) -> int:
    """lycoris/kohya.py:55."""
    return int(kwargs.get("block_size", None) or 4)


@pytest.mark.parametrize("args", [(), ("unit=4",), ("unit=2", "conv_dim=8"), ("unit= 3",), ("unit=x",), ("unit=0",),
                                  ("unit=2.5",)])
def test_kohya_dylora_unit_is_read_as_kohya_reads_it(args):
    metadata = {"ss_network_module": "networks.dylora", "ss_network_args": _kohya_network_args(*args)}
    kwargs = json.loads(metadata["ss_network_args"])
    try:
        want = _kohya_unit(kwargs)
    except ValueError:  # (kohya fails to build the network: no unit to report)
        want = None
    network = dylora_network(metadata)
    assert network is not None and network.trainer == "kohya networks.dylora"
    assert network.unit == (want if want is not None and want > 0 else None)


@pytest.mark.parametrize("args", [("algo=dylora",), ("algo=dylora", "block_size=2"), ("algo=DyLoRA", "block_size=8"),
                                  ("algo=dylora", "block_size="), ("algo=dylora", "block_size=0"), ("algo=lora",),
                                  ("algo=locon", "block_size=2"), ()])
def test_lycoris_dylora_block_size_is_read_as_lycoris_reads_it(args):
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": _kohya_network_args(*args)}
    kwargs = json.loads(metadata["ss_network_args"])
    network = dylora_network(metadata)
    if (kwargs.get("algo", "lora") or "lora").lower() != "dylora":  # lycoris/kohya.py:47
        assert network is None
        return
    want = _lycoris_block_size(kwargs)
    assert network == ("LyCORIS algo=dylora", want if want > 0 else None)


@pytest.mark.parametrize("metadata", [{}, {"ss_network_module": "networks.lora", "ss_network_args": '{"unit": "4"}'},
                                      {"ss_network_module": "networks.dylora", "ss_network_args": "[1, 2]"},
                                      {"ss_network_module": "networks.dylora", "ss_network_args": "{not json"},
                                      {"ss_network_module": "lycoris.kohya", "ss_network_args": "{not json"}])
def test_other_files_and_malformed_metadata(metadata):
    network = dylora_network(metadata)
    if metadata.get("ss_network_module") == "networks.dylora":
        assert network == ("kohya networks.dylora", None)  # a DyLoRA file whose unit is unreadable
    else:
        assert network is None


def test_inspect_reports_a_kohya_dylora_file_with_its_unit(toy, tmp_path, capsys):
    """sdadapt's train dylora writes kohya's metadata (networks.dylora, unit 2): inspect says dylora, unit 2, and the
    trained ranks; the same tensors written by kohya without a unit are unit 1; under networks.lora they are LoRA."""
    path = tmp_path / "dy.safetensors"
    random_adapter_file(toy, path, "dylora", rank=4, alpha=2.0, unit=2)
    summary = describe_file(path)
    assert summary["family"] == "dylora" and summary["algorithms"] == {"dylora": summary["modules"]}
    assert summary["ranks"] == {"4": summary["modules"]}
    assert summary["dylora"] == {"trained by": "kohya networks.dylora", "unit": 2,
                                 "trained ranks": "every multiple of 2 up to 4"}
    assert "cut-dylora" in summary["use"] and "dyn=" in summary["use"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:     dylora" in out
    assert "dylora:     trained by: kohya networks.dylora, unit: 2, trained ranks: every multiple of 2 up to 4" in out

    no_unit = tmp_path / "kohya.safetensors"
    _resave(path, no_unit, {"ss_network_module": "networks.dylora", "ss_network_args": _kohya_network_args()})
    assert describe_file(no_unit)["dylora"]["unit"] == 1
    plain = tmp_path / "plain.safetensors"
    _resave(path, plain, {"ss_network_module": "networks.lora", "ss_network_args": _kohya_network_args("unit=2")})
    summary = describe_file(plain)
    assert summary["family"] == "lora" and "dylora" not in summary and "dylora" not in summary["algorithms"]


try:  # (LyCORIS' own kohya network on a tiny SD1 UNet + CLIP, block_size 2; lycoris-lora is optional)
    from test_lycoris_dylora_reference import dylora_file
except (ImportError, pytest.skip.Exception):
    dylora_file = None


@pytest.mark.skipif(dylora_file is None, reason="lycoris-lora is not installed")
def test_inspect_reports_a_lycoris_dylora_file_with_its_block_size(dylora_file, tmp_path, capsys):
    """LyCORIS' DyLoRA file under the metadata kohya's train_network writes for ``--network_module lycoris.kohya
    --network_args algo=dylora block_size=2``: dylora, unit 2, and the strength its training forward used."""
    path, *_ = dylora_file
    trained = tmp_path / "lyco.safetensors"
    _resave(path, trained, {"ss_network_module": "lycoris.kohya",
                            "ss_network_args": _kohya_network_args("algo=dylora", "block_size=2", "conv_dim=4")})
    summary = describe_file(trained)
    assert summary["kind"] == "lycoris" and summary["family"] == "dylora"
    assert summary["algorithms"] == {"dylora": summary["modules"]}
    assert summary["dylora"]["trained by"] == "LyCORIS algo=dylora" and summary["dylora"]["unit"] == 2
    assert summary["dylora"]["strength"].startswith("apply at 2 ")
    default = tmp_path / "default.safetensors"
    _resave(path, default, {"ss_network_module": "lycoris.kohya", "ss_network_args": _kohya_network_args("algo=dylora")})
    assert describe_file(default)["dylora"]["unit"] == 4  # LyCORIS' default block_size
    assert describe_file(path)["family"] == "lora"  # (no ss_network_args: the keys cannot tell)

    from sdadapt.loratools.dylora import dylora_cut

    with pytest.raises(InputError, match="not a multiple of the DyLoRA unit 2"):
        dylora_cut(trained, tmp_path / "cut3.safetensors", rank=3)
    out = dylora_cut(trained, tmp_path / "cut2.safetensors", rank=2)
    assert all(v.shape[0] == 2 for k, v in load_file(str(out)).items() if k.endswith("lora_down.weight"))


# ------------------------------------------------------------------------------ 2. fit refuses a compiled DyLoRA
def test_fit_refuses_compile_backend_on_a_dylora_network_before_it_trains(toy):
    from sdadapt.methods.fit import FitConfig, _refuse_compiled_dylora, fit

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    adaptation = METHODS["dylora"].adapt(toy, seed=1, rank=4, unit=2)
    try:
        before = [p.detach().clone() for p in adaptation.params]
        with pytest.raises(ValueError) as caught:
            fit(toy, adaptation, images, ["a red circle"] * 2,
                config=FitConfig(steps=1, batch_size=2, compile_backend="eager"))
        message = str(caught.value)
        assert message.startswith("compile_backend='eager' (--torch-compile) with DyLoRA layers (")
        assert DYLORA_COMPILE_REASON in message and "compile_backend=None" in message
        assert all(torch.equal(p, b) for p, b in zip(adaptation.params, before, strict=True))
    finally:
        adaptation.remove()
    lora = METHODS["lora"].adapt(toy, seed=1, rank=4)
    try:
        _refuse_compiled_dylora(toy, lora, "eager")  # (other families compile: nothing refused)
    finally:
        lora.remove()


def test_train_torch_compile_refusal_gives_the_librarys_reason(red_circles, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["train", "dylora", "--images", str(red_circles), "--network-dim", "4", "--dylora-unit", "2",
                 "--no-prior", "--steps", "1", "--resolution", "16", "--torch-compile", "-q", "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--torch-compile with dylora" in err and DYLORA_COMPILE_REASON in err.replace("\n", " ")
    assert not out.exists()


# ------------------------------------------------------------------------------ 3. one parser of LoRA tags


@pytest.mark.parametrize("tag", ["<lora:ink>", "<lora:ink:0.6>", "<lora:ink:0.6:0.2:4>", "<lora:ink:dyn=8>",
                                 "<lora:ink:0.5:dyn=8>", "<lora:ink:0.5:unet=0.1:dyn=2>", "<lyco:ink:1:0.5:13>",
                                 "<lyco:ink:dyn=13:te=1:unet=0.5>", "<lora:ink:0.5:0.4:3:dyn=2>"])
def test_lora_multipliers_accepts_what_a1111_accepts(tag):
    from sdadapt.prompt_schedule import extra_network_tags, lora_multipliers, lora_tag_arguments

    (parsed,) = extra_network_tags(tag)[1]
    name, te, unet, dyn = a1111_tag_multipliers(tag)
    assert lora_multipliers(parsed) == (name, te, unet)
    assert lora_tag_arguments(parsed) == (name, te, unet, dyn)


@pytest.mark.parametrize("tag", ["<lora:ink:x>", "<lora::1>", "<lora:ink:1:dyn=x>", "<lora:ink:1:dyn=0>",
                                 "<lora:ink:1:1:2:5>", "<lora:ink:1:unet=y>"])
def test_both_tag_readers_refuse_alike(tag):
    from sdadapt.prompt_schedule import extra_network_tags, lora_multipliers, lora_tag_arguments

    (parsed,) = extra_network_tags(tag)[1]
    messages = []
    for reader in (lora_multipliers, lora_tag_arguments):
        with pytest.raises(InputError) as caught:
            reader(parsed)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and tag in messages[0]


# ------------------------------------------------------------------------------ 4. mixed-rank LoKr -> peft


def _rand(g, *shape, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * 0.5).to(dtype)


def _peft_vs_sdadapt(model, state, folder, inputs):
    """{layer: (peft's output, sdadapt's, the base layer's)} for the folder ``save_peft`` wrote (float32)."""
    import sdadapt

    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).base_model.model
    ref = copy.deepcopy(model)
    sdadapt.load_adapter(ref, {k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return {layer: (loaded.get_submodule(layer)(x), ref.get_submodule(layer)(x), model.get_submodule(layer)(x))
                for layer, x in inputs.items()}


def _a1111_delta(tensors, weight_shape) -> torch.Tensor:
    """The layer's ΔW as A1111's network_lokr.py applies it (test_apply_reference's transcription), float64."""
    w = {k: v.double() for k, v in tensors.items()}
    return a1111_updown(w, torch.zeros(weight_shape, dtype=F64), 1.0)[0]


def _check_folder(model, state, folder, inputs, layers):
    """peft's output == sdadapt's (1e-5) for every layer, and the delta is the file's (A1111's reading)."""
    for layer, (got, want, base) in _peft_vs_sdadapt(model, state, folder, inputs).items():
        assert (want - base).abs().max() > 1e-2, layer  # (the adapter shows)
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), layer
    from sdadapt.formats import load_peft

    again = load_peft(folder)
    for layer in layers:
        module = model.get_submodule(layer)
        tensors = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == layer}
        written = {k.rsplit(".", 1)[1]: v for k, v in again.items() if k.rsplit(".", 1)[0] == layer}
        torch.testing.assert_close(_a1111_delta(written, module.weight.shape),
                                   _a1111_delta(tensors, module.weight.shape), rtol=1e-5, atol=1e-6)


def test_mixed_rank_lokr_pairs_are_zero_padded_to_one_rank(tmp_path):
    """Linear(64): peft's split (8, 8) x (8, 8). ``p`` w1 rank 1, w2 rank 2; ``q`` w1 rank 3, w2 rank 1: each written at
    r = the larger rank, the pairs zero-padded (their own entries bit for bit), alpha · r / r2; peft's output is
    sdadapt's."""
    from sdadapt.formats import save_peft

    g = torch.Generator().manual_seed(0)
    model = torch.nn.ModuleDict({"p": torch.nn.Linear(64, 64), "q": torch.nn.Linear(64, 64)})
    state = {"p.lokr_w1_a": _rand(g, 8, 1), "p.lokr_w1_b": _rand(g, 1, 8), "p.lokr_w2_a": _rand(g, 8, 2),
             "p.lokr_w2_b": _rand(g, 2, 8), "p.alpha": torch.tensor(3.0),
             "q.lokr_w1_a": _rand(g, 8, 3), "q.lokr_w1_b": _rand(g, 3, 8), "q.lokr_w2_a": _rand(g, 8, 1),
             "q.lokr_w2_b": _rand(g, 1, 8), "q.alpha": torch.tensor(0.5)}
    save_peft(tmp_path, state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {layer: config["rank_pattern"].get(layer, config["r"]) for layer in ("p", "q")}
    alphas = {layer: config["alpha_pattern"].get(layer, config["alpha"]) for layer in ("p", "q")}
    assert ranks == {"p": 2, "q": 3} and alphas == {"p": 3.0, "q": 0.5 * 3 / 1}
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    for layer, r in ranks.items():
        for name, rank_axis in (("lokr_w1_a", 1), ("lokr_w1_b", 0), ("lokr_w2_a", 1), ("lokr_w2_b", 0)):
            ours, theirs = state[f"{layer}.{name}"], written[f"base_model.model.{layer}.{name}"]
            assert theirs.shape[rank_axis] == r
            kept = theirs.narrow(rank_axis, 0, ours.shape[rank_axis])
            assert torch.equal(kept, ours), (layer, name)  # the file's entries, bit for bit
            assert not theirs.narrow(rank_axis, ours.shape[rank_axis], r - ours.shape[rank_axis]).any()  # zeros
    inputs = {layer: _rand(g, 3, 64) for layer in ("p", "q")}
    _check_folder(model, state, tmp_path, inputs, ["p", "q"])


FULL_CASES = {  # name: (Linear size, {tensor: shape}, alpha, the tensors peft builds at r = max(r1, r2))
    # (4, 4) x (4, 4): r = 3 >= 4/2 keeps both full (peft still scales alpha' / r); no alpha: scale 1 (alpha = r2)
    "both-full": (16, {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (4, 3), "lokr_w2_b": (3, 4)}, None,
                  {"lokr_w1", "lokr_w2"}),
    # decompose_factor 8: (8, 32) x (8, 32); r = 4 >= 8/2 keeps w1 full, 4 < 32/2 keeps w2 a pair (rank 4 already)
    "w1-full": (256, {"lokr_w1_a": (8, 1), "lokr_w1_b": (1, 8), "lokr_w2_a": (32, 4), "lokr_w2_b": (4, 32)}, 1.5,
                {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    # decompose_factor 32: (32, 8) x (32, 8); r = 4 < 32/2 keeps w1 a pair, 4 >= 8/2 makes w2 full
    "w2-full": (256, {"lokr_w1_a": (32, 4), "lokr_w1_b": (4, 32), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}, 2.0,
                {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(FULL_CASES))
def test_a_factor_peft_keeps_full_at_the_larger_rank_is_written_as_the_product(tmp_path, case, dtype):
    """A factor peft keeps full at r = max(r1, r2) is written as its pair's product (float64, rounded once to the
    file's dtype); a pair peft keeps is written as it is, bit for bit; peft's output is sdadapt's."""
    from sdadapt.formats import save_peft

    size, shapes, alpha, built = FULL_CASES[case]
    g = torch.Generator().manual_seed(1)
    model = torch.nn.ModuleDict({"m": torch.nn.Linear(size, size)})
    state = {f"m.{name}": _rand(g, *shape, dtype=dtype) for name, shape in shapes.items()}
    if alpha is not None:
        state["m.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_peft(tmp_path, state, model=model)
    written = {k.rsplit(".", 1)[1]: v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert set(written) == built and {v.dtype for v in written.values()} == {dtype}
    for factor in ("w1", "w2"):
        full = f"lokr_{factor}"
        if full in written:  # (one rounding of the float64 product)
            product = state[f"m.{full}_a"].double() @ state[f"m.{full}_b"].double()
            assert torch.equal(written[full], product.to(dtype)), full
        else:
            for name in (f"{full}_a", f"{full}_b"):
                assert torch.equal(written[name], state[f"m.{name}"]), name
    x = _rand(g, 3, size)
    ((got, want, base),) = _peft_vs_sdadapt(model, state, tmp_path, {"m": x}).values()
    assert (want - base).abs().max() > 1e-2
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3  # (fp16: the full factor is rounded once to fp16)
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_mixed_rank_tucker_conv_and_a_flat_conv_with_and_without_the_model(tmp_path):
    """A 3x3 conv in Tucker form (``use_effective_conv2d``) pads its core; a flat 3x3 conv whose w2 peft keeps full
    needs ``model=`` (the kernel): refused naming the layer without it, exact with it."""
    from sdadapt.formats import save_peft

    g = torch.Generator().manual_seed(2)
    model = torch.nn.ModuleDict({"t": torch.nn.Conv2d(64, 64, 3, padding=1), "f": torch.nn.Conv2d(16, 16, 3, padding=1),
                                 "u": torch.nn.Conv2d(64, 64, 3, padding=1)})
    tucker = {"t.lokr_w1_a": _rand(g, 8, 1), "t.lokr_w1_b": _rand(g, 1, 8), "t.lokr_t2": _rand(g, 2, 2, 3, 3),
              "t.lokr_w2_a": _rand(g, 2, 8), "t.lokr_w2_b": _rand(g, 2, 8), "t.alpha": torch.tensor(2.0),
              "u.lokr_w1_a": _rand(g, 8, 3), "u.lokr_w1_b": _rand(g, 3, 8), "u.lokr_t2": _rand(g, 1, 1, 3, 3),
              "u.lokr_w2_a": _rand(g, 1, 8), "u.lokr_w2_b": _rand(g, 1, 8), "u.alpha": torch.tensor(1.0)}
    save_peft(tmp_path / "t", tucker)
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["use_effective_conv2d"] is True
    written = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    assert written["base_model.model.u.lokr_t2"].shape == (3, 3, 3, 3)
    assert torch.equal(written["base_model.model.u.lokr_t2"][:1, :1], tucker["u.lokr_t2"])
    inputs = {"t": _rand(g, 1, 64, 5, 5), "u": _rand(g, 1, 64, 5, 5)}
    tucker_model = torch.nn.ModuleDict({"t": model["t"], "u": model["u"]})
    _check_folder(tucker_model, tucker, tmp_path / "t", inputs, ["t", "u"])

    # f: Conv2d(16, 16, 3) split (2, 8) x (2, 8) (decompose_factor 2); w1 rank 1, w2 rank 4 >= 8/2: peft keeps w2
    # full (8, 8, 3, 3). Its flat lokr_w2_b (4, 72) also reads as a Linear(144 -> 16), split (2, 8) x (2, 72), where
    # r = 4 < 72/2 keeps w2 a pair: which one peft builds depends on the layer, which only the model tells
    flat = {"f.lokr_w1_a": _rand(g, 2, 1), "f.lokr_w1_b": _rand(g, 1, 2), "f.lokr_w2_a": _rand(g, 8, 4),
            "f.lokr_w2_b": _rand(g, 4, 72), "f.alpha": torch.tensor(2.0)}
    with pytest.raises(ValueError, match=r"^f: its lokr_w1_b / lokr_w2_b ranks \[1, 4\] differ.*pass model="):
        save_peft(tmp_path / "f0", flat)
    assert not (tmp_path / "f0").exists()
    save_peft(tmp_path / "f", flat, model=model)
    written = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert written["base_model.model.f.lokr_w2"].shape == (8, 8, 3, 3)
    assert written["base_model.model.f.lokr_w1"].shape == (2, 2)
    _check_folder(torch.nn.ModuleDict({"f": model["f"]}), flat, tmp_path / "f", {"f": _rand(g, 1, 16, 5, 5)}, ["f"])


def test_a_full_w1_beside_a_mixed_layer_turns_decompose_both_off_and_the_mixed_w1_is_written_full(tmp_path):
    """``a`` keeps a full w1 (8, 8) at r = 1 < 8/2: peft keeps it full only without ``decompose_both``; the mixed
    layer ``b`` (w1 rank 1, w2 rank 2) then has its w1 written full (its product), its w2 padded."""
    from sdadapt.formats import save_peft

    g = torch.Generator().manual_seed(3)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 64), "b": torch.nn.Linear(64, 64)})
    state = {"a.lokr_w1": _rand(g, 8, 8), "a.lokr_w2_a": _rand(g, 8, 1), "a.lokr_w2_b": _rand(g, 1, 8),
             "a.alpha": torch.tensor(1.0),
             "b.lokr_w1_a": _rand(g, 8, 1), "b.lokr_w1_b": _rand(g, 1, 8), "b.lokr_w2_a": _rand(g, 8, 2),
             "b.lokr_w2_b": _rand(g, 2, 8), "b.alpha": torch.tensor(4.0)}
    save_peft(tmp_path, state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["decompose_both"] is False
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in written if ".b." in k} == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    _check_folder(model, state, tmp_path, {"a": _rand(g, 2, 64), "b": _rand(g, 2, 64)}, ["a", "b"])


def test_a_mixed_layer_peft_cannot_split_is_refused_naming_it(tmp_path):
    """Linear(12 -> 8) split w1 (4, 2) x w2 (2, 6): peft's factorization gives 8 -> (2, 4), 12 -> (3, 4) by default,
    and with decompose_factor 4 (w1's side) 8 -> (4, 2) but 12 -> (4, 3), with 2: 8 -> (2, 4): no config builds it."""
    from sdadapt.formats import save_peft

    g = torch.Generator().manual_seed(4)
    model = torch.nn.ModuleDict({"w": torch.nn.Linear(12, 8)})
    state = {"w.lokr_w1_a": _rand(g, 4, 1), "w.lokr_w1_b": _rand(g, 1, 2), "w.lokr_w2_a": _rand(g, 2, 2),
             "w.lokr_w2_b": _rand(g, 2, 6), "w.alpha": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"LoKrConfig cannot rebuild 1 layer.*w: the file has"):
        save_peft(tmp_path / "x", state, model=model)
    assert not (tmp_path / "x").exists()
