"""OFT (LyCORIS Diag-OFT and BOFT, kohya's networks.oft) against the real implementations.

LyCORIS files are written by lycoris-lora itself (``create_lycoris`` + ``save_weights``) and loaded with
sdadapt (``load_lora`` -> ``load_adapter`` / ``apply_lora``); the merged weights are compared with LyCORIS'
``get_merged_weight`` and the outputs with the LyCORIS-applied model. float32 throughout: tolerance
2e-5 relative to the weight's change (two float32 Cayley inverses agree to ~1e-6).

kohya's ``networks/oft.py`` needs sd-scripts' ``library`` package; its two formulas (``get_weight`` and
``merge_to``) are transcribed below and, where the sd-scripts mirror exists, checked against the file itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import sdadapt
from sdadapt.adapters import OFTConfig, geometry_of
from sdadapt.adapters.oft import (
    boft_rotate,
    oft_block_layout,
    power2_factorization,
)
from sdadapt.adapters.registry import lycoris_algo_of_keys
from sdadapt.formats import load_lora, save_lora
from sdadapt.formats.files import read_weights

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
from lycoris import LycorisNetwork, create_lycoris

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Conv2d(4, 16, 3, padding=1, stride=2))


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 6, generator=g), torch.randn(2, 4, 7, 7, generator=g)


def _outputs(model: nn.Sequential) -> list[torch.Tensor]:
    x, z = _inputs()
    with torch.no_grad():
        return [model[0](x), model[1](z)]


@pytest.fixture
def lycoris_preset():
    """LyCORIS keeps its preset on the class: targets both layers, kohya's ``lora_unet`` prefix; restored after."""
    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    LycorisNetwork.apply_preset({"target_name": ["0", "1"], "lora_prefix": "lora_unet"})
    yield
    for key, value in saved.items():
        setattr(LycorisNetwork, key, value)


def _lycoris_file(tmp_path: Path, algo: str, **kwargs) -> tuple[nn.Sequential, object, Path]:
    model = _model()
    net = create_lycoris(model, 1.0, 4, 1.0, algo=algo, **kwargs)
    net.apply_to()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("rescale") else 0.3 * torch.randn_like(p))
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return model, net, path


CASES = [
    pytest.param("diag-oft", {}, id="diag-oft"),
    pytest.param("diag-oft", {"constraint": 1e-2}, id="diag-oft-constraint"),
    pytest.param("diag-oft", {"rescaled": True}, id="diag-oft-rescaled"),
    pytest.param("boft", {}, id="boft"),
    pytest.param("boft", {"constraint": 1e-2, "rescaled": True}, id="boft-constraint-rescaled"),
]


def _rel(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    change = (want - base).norm()
    assert change > 1e-2 * base.norm(), "the adapter barely changes the layer: the test would prove nothing"
    return float((got - want).norm() / change)


@pytest.mark.parametrize("algo, kwargs", CASES)
def test_lycoris_file_merges_and_runs_as_lycoris(algo, kwargs, tmp_path, lycoris_preset):
    lyco_model, net, path = _lycoris_file(tmp_path, algo, **kwargs)
    y_lyco = _outputs(lyco_model)  # LyCORIS' own forward (non-bypass)
    base = _model()
    y_base = _outputs(base)
    components, _ = load_lora(path)
    state = components["unet"]
    assert set(state) >= {"0.oft_blocks", "0.alpha", "1.oft_blocks", "1.alpha"}
    groups = {layer: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(layer + ".")} for layer in "01"}
    assert all(lycoris_algo_of_keys(t) == algo for t in groups.values())

    # merged weights: LyCORIS' get_merged_weight vs sdadapt's delta on the base weight
    for index, module in enumerate(net.loras):
        want, _ = module.get_merged_weight(1.0)
        layer = base[index]
        got = layer.weight + sdadapt.adapters.registry.file_layer_delta(groups[str(index)], geometry_of(layer),
                                                                           base_weight=layer.weight.detach())[0]
        assert _rel(got.detach(), want.detach(), layer.weight.detach()) < 2e-5

    # injected (hook path) and applied (merged path) outputs equal LyCORIS' outputs
    injected = _model()
    handle = sdadapt.load_adapter(injected, state)
    assert {a.family for a in handle.modules.values()} == {"oft"}
    applied = _model()
    undo = sdadapt.apply_lora(applied, state)
    for got_in, got_ap, want, y0 in zip(_outputs(injected), _outputs(applied), y_lyco, y_base):
        assert _rel(got_in, want, y0) < 2e-5
        assert _rel(got_ap, want, y0) < 2e-5
    undo.undo()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(applied), y_base))


def test_lycoris_file_metadata_and_kohya_round_trip(tmp_path, lycoris_preset):
    for algo, kwargs in (("diag-oft", {"rescaled": True}), ("boft", {})):
        _, _, path = _lycoris_file(tmp_path, algo, **kwargs)
        state = load_lora(path)[0]["unet"]
        out = tmp_path / f"again-{algo}.safetensors"
        save_lora(out, {"unet": state}, format="kohya")
        again, metadata = load_lora(out)
        assert metadata["ss_network_module"] == "lycoris.kohya"
        assert f'"algo": "{algo}"' in metadata["ss_network_args"]
        assert all(torch.equal(again["unet"][k], v) for k, v in state.items())


@pytest.mark.parametrize("config", [OFTConfig(dim=2, constraint=1e-2, rescaled=True), OFTConfig(dim=4, butterfly=True)],
                         ids=["diag-oft-constraint-rescaled", "boft"])
def test_oft_only_metadata_is_what_kohya_writes_for_a_lycoris_oft_run(config, tmp_path, lycoris_preset):
    """kohya's train_network writes ss_network_dim = network_dim (LyCORIS' OFT block size) and ss_network_alpha =
    network_alpha (default 1, unused by OFT), the constraint and rescaled in ss_network_args: from those values
    LyCORIS' create_lycoris rebuilds the file's layout, tensor for tensor."""
    model = _model()
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), config)
    path = tmp_path / "oft.safetensors"
    save_lora(path, {"unet": handle.state_dict()}, format="kohya")
    with safe_open(str(path), "pt") as f:
        shapes, metadata = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open)
    args = json.loads(metadata["ss_network_args"])
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(config.dim), "1")
    assert args.get("constraint") == ("0.01" if config.constraint else None)
    assert args.get("rescaled") == ("True" if config.rescaled else None)
    kwargs = {k: (v == "True" if k == "rescaled" else float(v)) for k, v in args.items() if k != "algo"}
    net = create_lycoris(_model(), 1.0, int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"]),
                         algo=args["algo"], **kwargs)
    net.apply_to()
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    with safe_open(str(tmp_path / "lyco.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == shapes  # noqa: SIM118 (safe_open)


def test_strength_scales_the_change_and_matches_lycoris_where_lycoris_is_linear(tmp_path, lycoris_preset):
    """ΔW(s) = s·(W' − W). LyCORIS' Diag-OFT without rescale is linear in its multiplier: equal at s = 0.4.
    BOFT's per-stage interpolation is not, so there sdadapt's ΔW(0.4) is 0.4·ΔW(1) (A1111's reading)."""
    _, net, path = _lycoris_file(tmp_path, "diag-oft")
    state = load_lora(path)[0]["unet"]
    base = _model()
    for index, module in enumerate(net.loras):
        want, _ = module.get_diff_weight(0.4)
        tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{index}.")}
        got = sdadapt.adapters.registry.file_layer_delta(tensors, geometry_of(base[index]), scale=0.4,
                                                          base_weight=base[index].weight.detach())[0]
        assert torch.allclose(got, want.detach(), atol=2e-6, rtol=1e-5)
    _, net, path = _lycoris_file(tmp_path, "boft")
    state = load_lora(path)[0]["unet"]
    tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("0.")}
    full = net.loras[0].get_diff_weight(1.0)[0].detach()
    got = sdadapt.adapters.registry.file_layer_delta(tensors, geometry_of(base[0]), scale=0.4,
                                                      base_weight=base[0].weight.detach())[0]
    assert torch.allclose(got, 0.4 * full, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got, net.loras[0].get_diff_weight(0.4)[0].detach(), atol=1e-4)


def test_trained_module_state_is_what_lycoris_loads(tmp_path, lycoris_preset):
    """sdadapt's own OFT (from OFTConfig) saved as kohya/LyCORIS: LyCORIS' create_lycoris_from_weights
    builds the same modules and its merged weight equals sdadapt's merge."""
    from lycoris import create_lycoris_from_weights

    for config in (OFTConfig(dim=4), OFTConfig(dim=4, butterfly=True, constraint=1e-2, rescaled=True)):
        model = _model()
        handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), config)
        torch.manual_seed(2)
        with torch.no_grad():
            for adapter in handle.modules.values():
                for p in adapter.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        y = _outputs(model)
        path = tmp_path / "mine.safetensors"
        save_lora(path, {"unet": handle.state_dict()}, format="kohya")
        target = _model()
        net, _ = create_lycoris_from_weights(1.0, str(path), target)
        net.apply_to()
        net.load_weights(str(path))
        for got, want, y0 in zip(_outputs(target), y, _outputs(_model())):
            assert _rel(got, want, y0) < 2e-5


def test_layouts_follow_lycoris_factorizations():
    from lycoris.functional.general import factorization, power2factorization

    for out in range(2, 400, 2):
        for dim in (-1, 2, 4, 8, 16, 32):
            if dim > 0:
                b, n = factorization(out, dim)
                assert oft_block_layout(out, dim, butterfly=False) == (n, b, b)
            want = power2factorization(out, dim)
            if want[1] == 0:
                assert power2_factorization(out, dim) == (0, 0)
            else:
                assert power2_factorization(out, dim) == want
    with pytest.raises(ValueError, match="BOFT cannot split"):
        oft_block_layout(37, 2, butterfly=True)


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 4, 2, 2)], ids=["diag-oft", "boft"])
@pytest.mark.parametrize("constraint", [0.0, 0.05], ids=["free", "clamped"])
def test_gradients_through_cayley_clamp_and_rescale_are_exact(shape, constraint):
    """float64 gradcheck (finite differences) of W' = rescale ⊙ rotate(W) in the blocks and the rescale,
    with the COFT clamp off and on (‖Q‖ ≈ 2 > 0.05 · 8): inv_ex's backward and the torch.where branch."""
    from sdadapt.adapters.oft import oft_merged_weight

    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    blocks = (0.3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    rescale = (1 + 0.1 * torch.randn(8, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    if constraint:
        assert (blocks - blocks.transpose(-1, -2)).norm() > constraint * 8  # the clamp is on
    assert torch.autograd.gradcheck(
        lambda b, r: oft_merged_weight(weight, b, rescale=r, constraint=constraint), (blocks, rescale))


def test_boft_stage_is_a_butterfly_of_the_rows():
    """Stage i of a BOFT mixes exactly the rows 2^i·b/2 apart (b = 2: pairs); with all but one
    block the identity, only that block's two rows change."""
    out, b = 8, 2
    rotations = torch.eye(b).repeat(3, out // b, 1, 1)  # (m, n, b, b)
    rotations[1, 0] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # stage 1 (rows 2 apart), first block
    weight = torch.arange(out, dtype=torch.float32).reshape(out, 1)
    moved = boft_rotate(weight, rotations).flatten().tolist()
    assert moved == [-2.0, 1.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_refusals_name_the_layer():
    layer = nn.Linear(6, 16)
    geometry = geometry_of(layer)
    build = sdadapt.adapters.registry.adapter_from_file_tensors
    with pytest.raises(ValueError, match="up.0.*rotate 12 rows.*16 output channels"):
        build(geometry, {"oft_blocks": torch.zeros(3, 4, 4)}, name="up.0")
    with pytest.raises(ValueError, match="no butterfly"):  # 4 stages need 8 blocks
        build(geometry, {"oft_blocks": torch.zeros(4, 4, 4, 4)}, name="x")
    with pytest.raises(ValueError, match="rescale: 8 values"):
        build(geometry, {"oft_blocks": torch.zeros(4, 4, 4), "rescale": torch.ones(8, 1)}, name="x")
    with pytest.raises(ValueError, match="OFTConfig.dim"):
        OFTConfig(dim=0)
    with pytest.raises(TypeError, match="needs the base layer's weight"):
        build(geometry, {"oft_blocks": torch.zeros(4, 4, 4)}).delta_weight()


# ------------------------------------------------------------------------------ kohya's networks.oft
def kohya_rotation(oft_blocks: torch.Tensor, alpha: float, out_dim: int, multiplier: float) -> torch.Tensor:
    """kohya OFTModule.get_weight, transcribed: the norm clamp, the Cayley map, ``m·(R − I) + I``."""
    block_q = oft_blocks - oft_blocks.transpose(1, 2)
    norm_q = torch.norm(block_q.flatten())
    new_norm_q = torch.clamp(norm_q, max=alpha * out_dim)
    block_q = block_q * ((new_norm_q + 1e-8) / (norm_q + 1e-8))
    eye = torch.eye(oft_blocks.shape[1]).unsqueeze(0).repeat(oft_blocks.shape[0], 1, 1)
    block_r = torch.matmul(eye + block_q, (eye - block_q).float().inverse())
    return multiplier * (block_r - eye) + eye


def kohya_merge(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """kohya OFTInfModule.merge_to, transcribed."""
    n, b, _ = rotation.shape
    merged = torch.einsum("k n m, k n ... -> k m ...", rotation, weight.reshape(n, b, -1))
    return merged.reshape(weight.shape)


def _kohya_oft_module():
    """sd-scripts' networks/oft.py from the mirror (``library.utils`` stubbed), or ``None``."""
    repo = Path("/work/.mirror/kohya-ss+sd-scripts/repo")
    if not repo.exists():
        return None
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", "HEAD:networks/oft.py"], capture_output=True,
                                check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    pytest.importorskip("einops")
    library = types.ModuleType("library")
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    library.utils = utils
    saved = {k: sys.modules.get(k) for k in ("library", "library.utils")}
    sys.modules.update({"library": library, "library.utils": utils})
    try:
        spec = importlib.util.spec_from_loader("kohya_oft_under_test", loader=None)
        module = importlib.util.module_from_spec(spec)
        exec(compile(source, "networks/oft.py", "exec"), module.__dict__)  # noqa: S102 (sd-scripts' own file, the spec)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


@pytest.mark.parametrize("alpha", [1e-2, 1.0])
def test_kohya_oft_file_reads_as_kohya_merges_it(alpha, tmp_path):
    """A kohya OFT file (``oft_unet_<layer>.oft_blocks`` / ``.alpha``, 3 blocks per 12 rows): load_lora reads
    it; apply_lora and the injected forward give kohya's merged weight (alpha 1e-2: the clamp is on)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Conv2d(4, 12, 3, padding=1, stride=2))
    blocks = {i: 0.3 * torch.randn(3, 4, 4) for i in range(2)}
    state = {}
    for i in range(2):
        state[f"oft_unet_{i}.oft_blocks"] = blocks[i]
        state[f"oft_unet_{i}.alpha"] = torch.tensor(alpha)
    from safetensors.torch import save_file

    path = tmp_path / "kohya_oft.safetensors"
    save_file(state, str(path), {"ss_network_module": "networks.oft", "ss_network_dim": "3"})
    components, _ = load_lora(path)
    assert set(components) == {"unet"} and set(components["unet"]) == {"0.oft_blocks", "0.alpha", "1.oft_blocks", "1.alpha"}
    # written back as kohya wrote it (LyCORIS would rebuild 12 rows as 4 blocks of 3, not 3 of 4): kohya's prefix,
    # networks.oft, dim = blocks per layer, alpha = the constraint; a LyCORIS layout (b <= n) stays lycoris.kohya
    again = tmp_path / "again.safetensors"
    save_lora(again, components, format="kohya")
    state_again, metadata = read_weights(again)
    assert set(state_again) == set(state) and all(torch.equal(state_again[k], v) for k, v in state.items())
    assert metadata["ss_network_module"] == "networks.oft" and metadata["ss_network_dim"] == "3"
    assert float(metadata["ss_network_alpha"]) == pytest.approx(alpha)
    lycoris_layout = {"0.oft_blocks": torch.zeros(4, 3, 3), "0.alpha": torch.tensor(alpha)}
    save_lora(again, {"unet": lycoris_layout}, format="kohya")
    state_again, metadata = read_weights(again)
    assert set(state_again) == {"lora_unet_0.oft_blocks", "lora_unet_0.alpha"}
    assert metadata["ss_network_module"] == "lycoris.kohya"
    kohya = _kohya_oft_module()
    want = []
    for i in range(2):
        rotation = kohya_rotation(blocks[i], alpha, 12, 1.0)
        merged = kohya_merge(model[i].weight.detach(), rotation)
        if kohya is not None:  # the transcription is sd-scripts' code
            oft = kohya.OFTInfModule(f"oft_unet_{i}", model[i], 1.0, 3, alpha)
            oft.load_state_dict({"oft_blocks": blocks[i], "alpha": torch.tensor(alpha)}, strict=False)
            assert torch.equal(oft.get_weight(), rotation)
        want.append(merged)
    applied = nn.Sequential(nn.Linear(6, 12), nn.Conv2d(4, 12, 3, padding=1, stride=2))
    applied.load_state_dict(model.state_dict())
    sdadapt.apply_lora(applied, components["unet"])
    for i in range(2):
        assert _rel(applied[i].weight.detach(), want[i], model[i].weight.detach()) < 2e-5
    handle = sdadapt.load_adapter(model, components["unet"])
    x = torch.randn(3, 6)
    with torch.no_grad():
        got = model[0](x)
        handle.remove()
        ref = nn.functional.linear(x, want[0], model[0].bias)
        assert _rel(got, ref, model[0](x)) < 2e-5


class CrossAttention(nn.Module):
    """Named as kohya's OFTNetwork looks for (``UNET_TARGET_REPLACE_MODULE_ATTN_ONLY``)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(6, 12)
        self.to_out = nn.ModuleList([nn.Linear(12, 12)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](self.to_q(x))


def test_kohya_oft_state_written_by_sdadapt_loads_in_kohyas_network(tmp_path):
    """save_lora of a kohya-layout OFT state (3 blocks of 4 per 12 rows): kohya's own
    create_network_from_weights + load_state_dict matches every key and its forward equals sdadapt's."""
    kohya = _kohya_oft_module()
    if kohya is None:
        pytest.skip("the sd-scripts mirror is not here")
    torch.manual_seed(0)
    unet = nn.Sequential()
    unet.add_module("attn1", CrossAttention())
    state = {f"attn1.{layer}.{key}": value for layer in ("to_q", "to_out.0")
             for key, value in (("oft_blocks", 0.3 * torch.randn(3, 4, 4)), ("alpha", torch.tensor(0.05)))}
    path = tmp_path / "oft.safetensors"
    save_lora(path, {"unet": state}, format="kohya")
    mine = nn.Sequential()
    mine.add_module("attn1", CrossAttention())
    mine.load_state_dict(unet.state_dict())
    handle = sdadapt.load_adapter(mine, load_lora(path)[0]["unet"])
    assert len(handle) == 2
    network, weights = kohya.create_network_from_weights(1.0, str(path), None, None, unet, for_inference=True)
    network.apply_to(None, unet)
    info = network.load_state_dict(weights, False)
    assert not info.missing_keys and not info.unexpected_keys and len(network.unet_ofts) == 2
    x = torch.randn(2, 6)
    with torch.no_grad():
        y_kohya, y_mine, y0 = unet(x), mine(x), nn.functional.linear(
            nn.functional.linear(x, unet.attn1.to_q.weight, unet.attn1.to_q.bias), unet.attn1.to_out[0].weight,
            unet.attn1.to_out[0].bias)
    assert _rel(y_mine, y_kohya, y0) < 2e-5


def _a1111_oft_diag(weight: torch.Tensor, oft_diag: torch.Tensor, multiplier: float) -> torch.Tensor:
    """float64 transcription of A1111's ``NetworkModuleOFT`` for an old LyCORIS ``oft_diag`` (``is_R``;
    extensions-builtin/Lora/network_oft.py): ``block_size = oft_diag.shape[1]``, ``num_blocks = out //
    block_size``, ``R = oft_diag`` as given, ``merged[k] = einsum("k n m, k n ... -> k m ...")`` (= R_kᵀ · W[k]),
    ``updown = merged − W``, ``finalize_updown``: ``updown · calc_scale() (self.scale = 1.0) · multiplier``."""
    w, r = weight.double(), oft_diag.double()
    b = r.shape[1]
    merged = torch.empty_like(w)
    for k in range(w.shape[0] // b):
        rows = w[k * b:(k + 1) * b].reshape(b, -1)
        merged[k * b:(k + 1) * b] = (r[k].T @ rows).reshape(b, *w.shape[1:])
    return w + (merged - w) * 1.0 * multiplier


def test_lycoris_dev_oft_diag_files_apply_as_a1111_applies_them(tmp_path, capsys):
    """LyCORIS' dev builds of Nov 2023 - Feb 2024 saved the block matrices themselves as ``oft_diag`` (the
    rotation, that build's rescale folded in: no rotation any more). A file in that key layout — blocks that
    are neither orthogonal nor skew — applies (apply_lora), injects (load_adapter's hook, merged and not)
    and inspects as A1111 reads it, at strengths 1 and 0.6; it saves back as it was read."""
    from sdadapt.cli import main

    g = torch.Generator().manual_seed(5)
    blocks = {"0": torch.eye(4).repeat(4, 1, 1) + 0.2 * torch.randn(4, 4, 4, generator=g),  # Linear 6 -> 16
              "1": torch.eye(2).repeat(8, 1, 1) + 0.3 * torch.randn(8, 2, 2, generator=g)}  # Conv 4 -> 16, 3x3
    path = tmp_path / "old.safetensors"
    from safetensors.torch import save_file

    save_file({f"lora_unet_{layer}.oft_diag": value for layer, value in blocks.items()}, str(path))
    state = load_lora(path)[0]["unet"]
    assert set(state) == {"0.oft_diag", "1.oft_diag"}
    for multiplier in (1.0, 0.6):
        model = _model().double()
        want = {layer: _a1111_oft_diag(model[int(layer)].weight, blocks[layer], multiplier) for layer in blocks}
        sdadapt.apply_lora(model, state, scale=multiplier)
        for layer, expected in want.items():
            assert torch.allclose(model[int(layer)].weight, expected, atol=1e-6, rtol=0), layer
        hooked = _model()
        handle = sdadapt.load_adapter(hooked, state)
        handle.set_scale(multiplier)
        merged = _model()
        with torch.no_grad():
            for layer, expected in want.items():
                merged[int(layer)].weight.copy_(expected)
        for got, ref in zip(_outputs(hooked), _outputs(merged)):
            assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5)
        handle.merge()
        for layer, expected in want.items():
            assert torch.allclose(hooked[int(layer)].weight.double(), expected, atol=2e-6), layer
        handle.unmerge()  # (A1111 restores its backup: the base bits come back)
        fresh = _model()
        assert all(torch.equal(hooked[i].weight, fresh[i].weight) for i in (0, 1))
    saved = tmp_path / "again.safetensors"
    save_lora(saved, {"unet": handle.state_dict()}, format="kohya")
    with safe_open(str(saved), "pt") as f:
        assert {k: f.get_tensor(k).shape for k in f.keys()} == {f"lora_unet_{k}.oft_diag": v.shape for k, v in blocks.items()}
        assert torch.equal(f.get_tensor("lora_unet_1.oft_diag"), blocks["1"])
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "family:     diag-oft" in text and "diag-oft blocks of 4): 1" in text and "diag-oft blocks of 2): 1" in text
    with pytest.raises(ValueError, match=r"0: both 'oft_blocks' and the old 'oft_diag'"):
        sdadapt.load_adapter(_model(), {"0.oft_diag": blocks["0"], "0.oft_blocks": blocks["0"]})
    with pytest.raises(ValueError, match=r"0\.oft_diag: .*4-D one is LyCORIS' BOFT of Feb 5-12 2024"):
        sdadapt.load_adapter(_model(), {"0.oft_diag": torch.eye(4).repeat(2, 2, 1, 1)})  # (the dev BOFT's R)
    with pytest.raises(ValueError, match=r"0\.oft_diag: 3 blocks of 4x4 rotate 12 rows"):
        sdadapt.load_adapter(_model(), {"0.oft_diag": torch.eye(4).repeat(3, 1, 1)})


def test_training_from_an_old_oft_diag_file_is_refused(tmp_path):
    """An ``oft_diag`` layer holds R itself, not the generator a diag-oft run trains: --network-weights (and
    --dim-from-weights) refuse the file, naming it and the way out, before any adapter is injected; the max
    norm refuses an OFT module read from one (it would shrink R towards 0)."""
    from types import SimpleNamespace

    from safetensors.torch import save_file
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.errors import WeightFileError
    from sdadapt.methods.network_weights import (
        adapters_from_weights,
        read_network_weights,
    )
    from sdadapt.methods.oft import prepare_diag_oft
    from sdadapt.training.max_norm import scale_weight_norms_

    torch.manual_seed(0)
    system = SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip(), base_model="sd1")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out = system.unet.get_submodule(layer).weight.shape[0]
    path = tmp_path / "old.safetensors"
    save_file({f"lora_unet_{layer.replace('.', '_')}.oft_diag": torch.eye(4).repeat(out // 4, 1, 1)}, str(path))
    for start in (lambda: prepare_diag_oft(system, rank=4, network_weights=path),
                  lambda: adapters_from_weights(system, read_network_weights(path, system=system))):
        with pytest.raises(WeightFileError, match=rf"--network-weights {path}: 1 layer\(s\) hold LyCORIS' old Diag-OFT "
                                                  r"'oft_diag' \(e\.g\. unet/.*attn1\.to_q\.oft_diag\).*--base-weights"):
            start()
        assert not any(n.endswith("sdadapt") for n, _ in system.unet.named_modules())
    handle = sdadapt.load_adapter(_model(), {"0.oft_diag": torch.eye(4).repeat(4, 1, 1)})
    adapter = handle.modules["0"]
    with pytest.raises(ValueError, match="old 'oft_diag' rotation itself"):
        scale_weight_norms_([adapter], 0.1)
    assert torch.equal(adapter.oft_blocks, torch.eye(4).repeat(4, 1, 1))


def test_inspect_names_oft(tmp_path, lycoris_preset, capsys):
    from sdadapt.cli import main

    _, _, path = _lycoris_file(tmp_path, "boft", rescaled=True)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "lycoris" in text and "family:     boft" in text  # LyCORIS names the layout (algo boft)
    assert "none (OFT rotations: boft blocks of 4): 2" in text and "no constraint (OFT): 2" in text


# ------------------------------------------------------------------------------ train, resize, combine
def test_train_diag_oft_with_lycoris_network_args(tmp_path, capsys):
    """``train diag-oft --network-args algo=diag-oft constraint=... rescaled=True`` (a LyCORIS config's args)
    trains rotations and scales and writes a LyCORIS file: ``algo``, ``constraint`` in ss_network_args, each
    layer's alpha the constraint; it loads back and changes the UNet. network_alpha is dropped with a note."""
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline, _unet_outputs_with

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", n=2)
    out = tmp_path / "oft.safetensors"
    code = main(["train", "diag-oft", "--images", str(images), "--model", str(root), "--steps", "2", "--lr", "1e-2",
                 "--network-dim", "4", "--network-args", "algo=diag-oft", "constraint=0.5", "rescaled=True",
                 "preset=attn-only", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    state, metadata = load_lora(out)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = metadata["ss_network_args"]
    assert '"algo": "diag-oft"' in args and '"constraint": "0.5"' in args and '"rescaled": "True"' in args
    blocks = {k: v for k, v in state["unet"].items() if k.endswith(".oft_blocks")}
    assert blocks and all(v.dim() == 3 and v.shape[-1] == 4 for v in blocks.values())
    assert all(float(v) == 0.5 for k, v in state["unet"].items() if k.endswith(".alpha"))
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "1")  # kohya's, not "None"
    assert any(torch.count_nonzero(v) for v in blocks.values())  # it trained
    rescales = [v for k, v in state["unet"].items() if k.endswith(".rescale")]
    assert len(rescales) == len(blocks) and any(not torch.all(v == 1) for v in rescales)  # the scales trained too
    before, after, handle = _unet_outputs_with(root, state["unet"])
    assert len(handle) == len(blocks) and not torch.allclose(before, after)
    # a LoRA method refuses algo=diag-oft, naming the method to use
    assert main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "1",
                 "--network-args", "algo=boft"]) == 2
    assert "train boft" in capsys.readouterr().err
    # BOFT on widths with no even x power-of-two split under the dim: refused by layer name
    code = main(["train", "boft", "--images", str(images), "--model", str(root), "--steps", "1", "--network-dim", "1",
                 "--network-args", "preset=attn-only", "-o", str(tmp_path / "b.safetensors")])
    assert code == 2 and "BOFT cannot split" in capsys.readouterr().err


def test_resize_and_combine_an_oft_file_need_the_base_and_are_exact_at_full_rank(tmp_path):
    """OFT's ΔW = R·W − W comes from the base weight: resize/combine without --base say so, naming OFT; with it
    the dense delta is exact at the numerical rank (a rotation's ΔW is generally full rank, so a smaller rank
    keeps the SVD head, as for any family)."""
    from test_loratools_families import (
        SOME_LAYERS,
        _applied,
        _flat,
        _perturb,
        _rel_error,
        _write_checkpoint,
    )
    from tiny_models import tiny_unet_sd1

    from sdadapt.errors import InputError, WeightFileError
    from sdadapt.loratools import combine_loras, resize_lora

    unet = tiny_unet_sd1()
    base = _flat(unet)
    ckpt = _write_checkpoint(tmp_path / "base.safetensors", base, naming="ldm", arch="sd1")
    files = {}
    for name, config in (("diag", OFTConfig(dim=4, rescaled=True)), ("boft", OFTConfig(dim=4, butterfly=True))):
        model = tiny_unet_sd1()
        handle = sdadapt.inject(model, SOME_LAYERS, config)
        _perturb(handle, seed=len(name))
        files[name] = tmp_path / f"{name}.safetensors"
        save_lora(files[name], {"unet": handle.state_dict()}, base_model="sd1")
    with pytest.raises((InputError, WeightFileError), match=r"OFT.*--base CKPT"):
        resize_lora(files["diag"], tmp_path / "x.safetensors", rank=64)
    exact = tmp_path / "exact.safetensors"
    resize_lora(files["diag"], exact, rank=512, base=ckpt)
    error = _rel_error(_applied(base, [(exact, 1.0)]), _applied(base, [(files["diag"], 1.0)]), base, weights_only=True)
    assert error < 1e-5, error
    both = tmp_path / "both.safetensors"
    combine_loras([files["diag"], files["boft"]], both, strengths=[0.5, -1.0], base=ckpt)
    want = _applied(base, [(files["diag"], 0.5), (files["boft"], -1.0)])  # the BOFT sees W + the first change
    error = _rel_error(_applied(base, [(both, 1.0)]), want, base, weights_only=True)
    assert error < 1e-5, error


def test_compiled_forward_and_backward_is_one_graph_and_strength_does_not_recompile():
    """The Cayley map, the COFT clamp (torch.where on the device, no host branch) and both layouts
    trace into one graph; set_scale fills a buffer in place."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16))
    diag = sdadapt.inject(model, sdadapt.by_regex(r"^0$"), OFTConfig(dim=4, constraint=1e-2, rescaled=True), name="a")
    boft = sdadapt.inject(model, sdadapt.by_regex(r"^2$"), OFTConfig(dim=4, butterfly=True), name="b")
    torch.manual_seed(0)
    params = [p for h in (diag, boft) for p in h.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 6)

    def run(fn):
        for p in params:
            p.grad = None
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for scale in (1.0, 0.4):
        diag.set_scale(scale)
        boft.set_scale(scale)
        with torch._dynamo.config.patch(error_on_recompile=scale != 1.0):
            (y, grads), (y_ref, grads_ref) = run(compiled), run(model)
        assert torch.allclose(y, y_ref, atol=1e-6) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads_ref))
    assert counter.frame_count == 1
