"""merge-lora / resize-lora / combine-loras for every adapter family, through the one delta path.

* A property suite over every registered family's example configs
  (``sdadapt.adapters.registry.FAMILIES[name].examples``, so a new family is covered for free) on
  tiny SD1 and SDXL UNets: inject, perturb, save, bake into an LDM- and (block-weighted) a diffusers-named
  checkpoint, compare with the injected model merged at the same strength; and with a block-weight
  vector against a naive reference that applies each layer with ``apply_lora(scale=s·w)``.
* Files written by lycoris-lora itself (LoHa, LoKr variants, Tucker, full, DoRA) baked into SD1 and
  SDXL checkpoints (text encoders included: SDXL's second one as a fused OpenCLIP ``in_proj``)
  give the UNet / text-encoder outputs of the LyCORIS-applied models.
* resize-lora and combine-loras on LoHa, LoKr, full and DoRA files: the written LoRA reproduces
  ``Σ s_i Δ_i`` (exact at full rank, the SVD tail below it); the ambiguous-shape error and --base.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.adapters import DoRAConfig, FullConfig, GLoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig  # noqa: E402
from sdadapt.adapters.registry import FAMILIES, weight_shape_of_file_tensors  # noqa: E402
from sdadapt.cli import main as cli_main  # noqa: E402
from sdadapt.formats import WeightFileError, load_lora, save_lora  # noqa: E402
from sdadapt.formats.layers import group_by_layer  # noqa: E402
from sdadapt.formats.model_keys import diffusers_to_ldm, ldm_to_diffusers  # noqa: E402
from sdadapt.loratools.bake import merge_loras_into_checkpoint  # noqa: E402
from sdadapt.loratools.block_weights import lora_block_weight_fn  # noqa: E402
from sdadapt.loratools.combine import combine_loras  # noqa: E402
from sdadapt.loratools.resize import resize_lora  # noqa: E402
from sdadapt.targets import by_regex, by_type  # noqa: E402

TINY = {"sd1": tiny_unet_sd1, "sdxl": tiny_unet_sdxl}
#: a few layers of every kind in every block: Linear (attention, MLP, time projection, SDXL's
#: proj_in), 1x1 convs (SD1's proj_in/proj_out, conv_shortcut) and 3x3 convs (resnets, samplers)
SOME_LAYERS = by_regex(
    r"(attn1\.to_q|attn2\.to_v|ff\.net\.0\.proj|proj_in|proj_out|resnets\.0\.conv1|resnets\.1\.conv2|"
    r"conv_shortcut|resnets\.0\.time_emb_proj|downsamplers\.0\.conv|upsamplers\.0\.conv)$"
) & by_type(nn.Linear, nn.Conv2d)
#: the normalisation layers of every kind (the layers LyCORIS' norm modules adapt): resnet GroupNorms,
#: the attention blocks' GroupNorm and LayerNorms, the output GroupNorm
SOME_NORMS = by_regex(r"(resnets\.0\.norm1|resnets\.1\.norm2|attentions\.0\.norm|norm1|norm3|conv_norm_out)$") & by_type(
    nn.GroupNorm, nn.LayerNorm)
#: block-weight vectors with distinct values per block (SD1: 17, SDXL: 12 values; BASE first)
VECTORS = {
    "sd1": [1.0, 0.5, -0.75, 0.0, 1.5, 0.25, 2.0, 0.8, 0.3, -1.0, 0.6, 1.2, 0.4, 0.9, 0.0, 0.7, 1.1],
    "sdxl": [1.0, 0.5, -0.75, 1.5, 0.25, 2.0, 0.8, 0.3, -1.0, 0.6, 1.2, 0.4],
}


# ------------------------------------------------------------------------------------ helpers
def _flat(unet, text_encoders=()) -> dict[str, torch.Tensor]:
    """Flat diffusers keys: ``unet.*``, ``text_encoder.text_model.*``, ``text_encoder_2.*``."""
    out = {f"unet.{k}": v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    for name, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
        for k, v in te.state_dict().items():
            if not k.startswith("text_model.") and k != "text_projection.weight":
                k = "text_model." + k
            out[f"{name}.{k}"] = v.detach().clone().contiguous()
    return out


def _write_checkpoint(path, flat: dict, *, naming: str, arch: str):
    """An LDM single file (UNet as ``model.diffusion_model.*``, SDXL's te2 as fused OpenCLIP) or a
    diffusers-named file (a bare UNet file when there is only a UNet)."""
    if naming == "ldm":
        state = diffusers_to_ldm(flat, architecture=arch)
    elif all(k.startswith("unet.") for k in flat):
        state = {k[len("unet."):]: v for k, v in flat.items()}
    else:
        state = flat
    save_file(state, str(path))
    return path


def _read_back(path, *, naming: str, arch: str) -> dict[str, torch.Tensor]:
    """A written checkpoint back in flat diffusers keys."""
    state = load_file(str(path))
    if naming == "ldm":
        return ldm_to_diffusers(state, architecture=arch)
    return state if any(k.startswith("unet.") for k in state) else {f"unet.{k}": v for k, v in state.items()}


def _perturb(handle, seed: int) -> None:
    """Random non-zero adapter weights (DoRA's magnitude moved off ‖W‖ too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _rel_error(got: dict, want: dict, base: dict, *, weights_only: bool = False) -> float:
    """‖got − want‖ / ‖want − base‖ over every key (float64); untouched keys must be bit-equal."""
    num = den = 0.0
    for key in base:  # (an injected model's state also holds its adapters' tensors)
        if weights_only and not key.endswith(".weight"):
            continue
        value = want[key]
        diff = (got[key].double() - value.double()).norm().item()
        change = (value.double() - base[key].double()).norm().item()
        if change == 0.0:
            assert torch.equal(got[key], base[key]), f"{key} was not to be touched"
        num += diff**2
        den += change**2
    assert den > 0, "the adapter changes nothing; the test would prove nothing"
    return (num / den) ** 0.5


def _load(arch: str, flat: dict):
    unet = TINY[arch]()
    unet.load_state_dict({k[len("unet."):]: v for k, v in flat.items() if k.startswith("unet.")})
    return unet


# ------------------------------------------------------- property suite: every family's examples
def _example_archs(count: int, index: int) -> tuple[str, ...]:
    """The architectures one family example bakes on: every family on both, its examples alternating
    (SD1, SDXL, SD1, ...; a family of one example on both). The layer kinds (Linear, 1x1 and 3x3
    convs) are in both UNets; what differs is family-agnostic (LDM names, block map, add-embedding),
    so a (family example, arch) pair adds nothing another example of that family on that arch has not."""
    return ("sd1", "sdxl") if count == 1 else (("sd1", "sdxl")[index % 2],)


CASES = [
    pytest.param(name, config, arch, id=f"{name}-{index}-{arch}")
    for name, family in FAMILIES.items()
    for index, config in enumerate(family.examples)
    for arch in _example_archs(len(family.examples), index)
]


@pytest.mark.parametrize("family, config, arch", CASES)
def test_bake_equals_injected_merge_and_block_weighted_reference(family, config, arch, tmp_path):
    unet = TINY[arch]()
    base = _flat(unet)
    targets = SOME_NORMS if FAMILIES[family].module_type.adapts_norms else SOME_LAYERS
    handle = sdadapt.inject(unet, targets, config)
    _perturb(handle, seed=len(family) + 7 * len(arch))
    state = handle.state_dict()
    lora = tmp_path / "adapter.safetensors"
    save_lora(lora, {"unet": state}, base_model=arch)
    strength = 0.7
    handle.set_scale(strength)
    handle.merge()
    want = _flat(unet)

    # the plain bake into an LDM-named checkpoint, the block-weighted one (below) into a diffusers-named
    # one: every case covers both namings with two bakes instead of three (test-time budget)
    ckpt = _write_checkpoint(tmp_path / "base_ldm.safetensors", base, naming="ldm", arch=arch)
    out = tmp_path / "baked_ldm.safetensors"
    report = merge_loras_into_checkpoint(ckpt, [lora], out, strengths=strength)
    assert report.merged and not report.unmatched
    got = _read_back(out, naming="ldm", arch=arch)
    assert set(got) == set(base)
    error = _rel_error(got, want, base)
    assert error < 1e-5, f"ldm: baked vs merged relative error {error:.3g}"

    # block weights: each layer at strength × its block's weight, vs apply_lora per layer
    vector = VECTORS[arch]
    weigh = lora_block_weight_fn(vector, arch)
    by_weight: dict[float, dict[str, torch.Tensor]] = {}
    for layer, tensors in group_by_layer(state).items():
        by_weight.setdefault(weigh("unet", layer), {}).update({f"{layer}.{k}": v for k, v in tensors.items()})
    assert len(by_weight) >= 4, "the vector should give the layers several different weights"
    reference = _load(arch, base)
    for w, layers in by_weight.items():  # apply_lora is per file; the layers of one weight at once
        sdadapt.apply_lora(reference, layers, scale=strength * w)
    ckpt = _write_checkpoint(tmp_path / "base_diffusers.safetensors", base, naming="diffusers", arch=arch)
    out = tmp_path / "baked_lbw.safetensors"
    report = merge_loras_into_checkpoint(ckpt, [lora], out, strengths=strength, block_weights=[vector])
    assert report.merged and not report.unmatched
    got = _read_back(out, naming="diffusers", arch=arch)
    assert set(got) == set(base)
    error = _rel_error(got, _flat(reference), base)
    assert error < 1e-5, f"diffusers: block-weighted bake vs per-layer apply_lora: relative error {error:.3g}"


def test_bake_of_two_files_equals_apply_lora_in_turn_dora_included(tmp_path):
    """merge-lora BASE A B == apply_lora(A) then apply_lora(B): B's DoRA sees W + ΔA."""
    unet = tiny_unet_sd1()
    base = _flat(unet)
    files = []
    for index, config in enumerate((LoRAConfig(rank=2, alpha=1.0), DoRAConfig(LoHaConfig(rank=2, alpha=1.0)))):
        model = tiny_unet_sd1()
        handle = sdadapt.inject(model, SOME_LAYERS, config)
        _perturb(handle, seed=40 + index)
        files.append(tmp_path / f"f{index}.safetensors")
        save_lora(files[-1], {"unet": handle.state_dict()}, base_model="sd1")
    strengths = (1.5, 0.6)
    reference = _load("sd1", base)
    for path, s in zip(files, strengths):
        sdadapt.apply_lora(reference, load_lora(path)[0]["unet"], scale=s)
    ckpt = _write_checkpoint(tmp_path / "base.safetensors", base, naming="ldm", arch="sd1")
    out = tmp_path / "baked.safetensors"
    merge_loras_into_checkpoint(ckpt, files, out, strengths=list(strengths))
    got = _read_back(out, naming="ldm", arch="sd1")
    assert _rel_error(got, _flat(reference), base) < 1e-5
    # the other order differs (DoRA is not additive): the order is honoured, not an accident
    swapped = _load("sd1", base)
    for path, s in zip(files[::-1], strengths[::-1]):
        sdadapt.apply_lora(swapped, load_lora(path)[0]["unet"], scale=s)
    assert _rel_error(got, _flat(swapped), base) > 1e-4


def test_bake_reports_every_layer_that_does_not_fit(tmp_path):
    unet = tiny_unet_sd1()
    ckpt = _write_checkpoint(tmp_path / "base.safetensors", _flat(unet), naming="ldm", arch="sd1")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.0.conv1"
    bad = {  # LoHa of the wrong input size, LoKr whose factors do not multiply to the layer, a wrong diff
        f"{layer}.hada_w1_a": torch.randn(32, 2), f"{layer}.hada_w1_b": torch.randn(2, 48),
        f"{layer}.hada_w2_a": torch.randn(32, 2), f"{layer}.hada_w2_b": torch.randn(2, 48),
        f"{conv}.lokr_w1": torch.randn(2, 4), f"{conv}.lokr_w2": torch.randn(16, 7, 3, 3),
        "down_blocks.0.attentions.0.proj_in.diff": torch.randn(32, 16, 1, 1),
    }
    lora = tmp_path / "bad.safetensors"
    save_lora(lora, {"unet": bad}, base_model="sd1")
    with pytest.raises(WeightFileError) as info:
        merge_loras_into_checkpoint(ckpt, [lora], tmp_path / "out.safetensors")
    text = str(info.value)
    assert "3 LoRA layer(s) do not fit the shapes" in text
    assert "LoHa shapes" in text and "attn1.to_q" in text and "resnets.0.conv1" in text and "proj_in" in text
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- files written by lycoris-lora
LYCORIS_CASES = [
    pytest.param({"algo": "loha"}, id="loha"),
    pytest.param({"algo": "loha", "use_tucker": True}, id="loha-tucker"),
    pytest.param({"algo": "lokr", "factor": 4}, id="lokr-factor"),
    pytest.param({"algo": "lokr", "factor": 4, "decompose_both": True}, id="lokr-decompose-both"),
    pytest.param({"algo": "lokr", "full_matrix": True}, id="lokr-full-matrix"),
    pytest.param({"algo": "lokr", "factor": 4, "use_tucker": True}, id="lokr-tucker"),
    pytest.param({"algo": "lora", "use_tucker": True}, id="locon-tucker"),
    pytest.param({"algo": "full"}, id="full"),
    pytest.param({"algo": "lora", "dora_wd": True}, id="dora"),
    pytest.param({"algo": "loha", "dora_wd": True, "wd_on_output": False}, id="loha-dora-input-axis"),
    pytest.param({"algo": "lokr", "factor": 4, "dora_wd": True}, id="lokr-dora"),
    pytest.param({"algo": "diag-oft"}, id="diag-oft"),
    pytest.param({"algo": "diag-oft", "constraint": 1e-3, "rescaled": True}, id="diag-oft-constraint-rescaled"),
    pytest.param({"algo": "glora"}, id="glora"),
    pytest.param({"algo": "lora", "train_norm": True}, id="lora-train-norm"),
]


#: lycoris' "full" preset without its duplicate time_embedding module (diffusers UNets list it twice)
LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _te_out(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


def _rel(got, want, base) -> float:
    assert (want - base).norm() > 1e-3 * base.norm(), "the adapter barely changes the output"
    return float((got - want).norm() / (want - base).norm())


#: the SD1 cases kept: one per algo (lora: each of its variants tucker / DoRA / train_norm) — SD1 runs the API
#: path, SD1's layer names and single text encoder, in both checkpoint namings (dora: diffusers, the rest: LDM);
#: every case runs on SDXL (the CLI path, text_encoder_2, SDXL's layers, the other naming)
SD1_LYCORIS = {"loha", "lokr-factor", "locon-tucker", "full", "dora", "diag-oft", "glora", "lora-train-norm"}


@pytest.mark.parametrize("kwargs, arch", [
    pytest.param(*case.values, arch, id=f"{case.id}-{arch}") for case in LYCORIS_CASES for arch in ("sd1", "sdxl")
    if arch == "sdxl" or case.id in SD1_LYCORIS])
def test_lycoris_written_file_bakes_to_the_lycoris_applied_model(kwargs, arch, tmp_path, capsys):
    lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    sdxl = arch == "sdxl"
    unet = TINY[arch]()
    tes = [tiny_clip(), tiny_clip(seed=1, with_projection=True)] if sdxl else [tiny_clip()]
    base = _flat(unet, tes)
    inputs = unet_inputs(unet, sdxl=sdxl)
    ids = torch.tensor([[0, 5, 7, 9, 2], [0, 11, 3, 4, 2]])
    y_base, te_base = run_unet(unet, inputs), [_te_out(te, ids) for te in tes]

    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, tes if sdxl else tes[0], unet, preset=str(preset), **kwargs)
    net.apply_to(tes if sdxl else tes[0], unet, apply_text_encoder=True, apply_unet=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    lora = tmp_path / "lyco.safetensors"
    net.save_weights(str(lora), torch.float32, {"ss_network_module": "lycoris.kohya"})
    y_lyco, te_lyco = run_unet(unet, inputs), [_te_out(te, ids) for te in tes]

    # SD1 through the API, SDXL through the CLI; LDM for one half of the cases, diffusers for the other
    naming = "ldm" if (sum(map(len, kwargs)) + len(arch)) % 2 else "diffusers"
    ckpt = _write_checkpoint(tmp_path / "base.safetensors", base, naming=naming, arch=arch)
    out = tmp_path / "baked.safetensors"
    if sdxl:
        assert cli_main(["merge-lora", str(ckpt), str(lora), "-o", str(out), "--quiet"]) == 0
        assert "tensors changed" in capsys.readouterr().out
    else:
        merge_loras_into_checkpoint(ckpt, [lora], out)
    baked = _read_back(out, naming=naming, arch=arch)
    assert set(baked) == set(base)
    fresh = _load(arch, baked)
    fresh_tes = [tiny_clip(), tiny_clip(seed=1, with_projection=True)] if sdxl else [tiny_clip()]
    for name, te in zip(("text_encoder", "text_encoder_2"), fresh_tes):
        prefix = f"{name}."
        own = te.state_dict()
        te.load_state_dict({k: baked[prefix + (k if k.startswith("text_model.") or k == "text_projection.weight"
                                               else "text_model." + k)] for k in own})
    # relative to the adapter's change of the output; measured ≤ 2e-5 (float32 order of operations)
    error = _rel(run_unet(fresh, inputs), y_lyco, y_base)
    assert error < 1e-4, f"UNet output: relative error {error:.3g} vs the LyCORIS-applied model"
    for te, want, te0 in zip(fresh_tes, te_lyco, te_base):
        error = _rel(_te_out(te, ids), want, te0)
        assert error < 1e-4, f"text encoder output: relative error {error:.3g}"


# ----------------------------------------------------------------------------- resize / combine
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny SD1 base checkpoint (LDM) and LoHa / LoKr / full / DoRA / LoRA files on it."""
    folder = tmp_path_factory.mktemp("families")
    unet = tiny_unet_sd1()
    base = _flat(unet)
    ckpt = _write_checkpoint(folder / "base.safetensors", base, naming="ldm", arch="sd1")
    configs = {
        "loha": LoHaConfig(rank=2, alpha=1.0),
        "lokr": LoKrConfig(rank=2, alpha=1.0, factor=4),
        "full": FullConfig(),
        "dora": DoRAConfig(LoRAConfig(rank=2, alpha=1.0)),
        "lora": LoRAConfig(rank=3, alpha=2.0),
        "glora": GLoRAConfig(rank=2, alpha=1.5),
    }
    files = {}
    for index, (name, config) in enumerate(configs.items()):
        model = tiny_unet_sd1()
        handle = sdadapt.inject(model, SOME_LAYERS, config)
        _perturb(handle, seed=100 + index)
        files[name] = folder / f"{name}.safetensors"
        save_lora(files[name], {"unet": handle.state_dict()}, base_model="sd1")
    return {"base": base, "ckpt": ckpt, "files": files}


def _applied(base: dict, paths_scales) -> dict:
    """Flat weights of the base UNet after apply_lora of each (file, scale) in turn."""
    unet = _load("sd1", base)
    for path, scale in paths_scales:
        sdadapt.apply_lora(unet, load_lora(path)[0]["unet"], scale=scale)
    return _flat(unet)


def _deltas(base: dict, paths_scales=None, *, applied: dict | None = None) -> dict[str, torch.Tensor]:
    """{layer: Σ s_i Δ_i (out, in·k) float64} of the changed UNet weights (``applied``: the
    ``_applied(base, paths_scales)`` already computed)."""
    applied = _applied(base, paths_scales) if applied is None else applied
    return {
        k[len("unet."):-len(".weight")]: (applied[k].double() - base[k].double()).reshape(base[k].shape[0], -1)
        for k in base if k.endswith(".weight") and not torch.equal(applied[k], base[k])
    }


@pytest.mark.parametrize("family", ["loha", "lokr", "full", "dora", "glora"])
def test_resize_any_family_exact_at_full_rank_and_svd_tail_below(adapters, family, tmp_path):
    base, ckpt, path = adapters["base"], adapters["ckpt"], adapters["files"][family]
    exact = tmp_path / "full_rank.safetensors"
    layers = group_by_layer(load_lora(path)[0]["unet"])
    needs_base = family in ("dora", "glora") or any(weight_shape_of_file_tensors(t) is None for t in layers.values())
    assert needs_base == (family != "full")  # LoHa and low-rank LoKr factors are flattened; DoRA reads W
    if needs_base:
        with pytest.raises(ValueError, match="--base CKPT"):
            resize_lora(path, exact, rank=64)
    report = resize_lora(path, exact, rank=64, base=ckpt if needs_base else None)
    # a full layer's bias delta cannot be a LoRA: left out, and said so
    assert bool(report.skipped) == (family == "full")
    assert all(k.endswith(".bias") and "diff_b" in v for k, v in report.skipped.items())
    components, metadata = load_lora(exact)
    assert metadata["ss_network_module"] == "networks.lora"
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.endswith(".weight") else k.rsplit(".", 1)[-1]
            for k in components["unet"]} == {"lora_down.weight", "lora_up.weight", "alpha"}
    want = _applied(base, [(path, 1.0)])
    error = _rel_error(_applied(base, [(exact, 1.0)]), want, base, weights_only=True)
    assert error < 1e-5, f"full-rank resize of {family}: relative error {error:.3g}"

    small = tmp_path / "rank1.safetensors"
    report = resize_lora(path, small, rank=1, base=ckpt)
    original = _deltas(base, applied=want)  # want = _applied(base, [(path, 1.0)]), not mutated above
    resized = _deltas(base, [(small, 1.0)])
    assert set(resized) <= set(original) and len(original) > 10
    for layer, delta in original.items():
        s = torch.linalg.svdvals(delta)
        tail = float(torch.sqrt((s[1:] ** 2).sum()))
        got = resized.get(layer, torch.zeros_like(delta))
        assert float(torch.linalg.norm(delta - got)) == pytest.approx(tail, rel=1e-3, abs=1e-6), layer
        assert report.layers[f"unet:{layer}"].residual_norm == pytest.approx(tail, rel=1e-3, abs=1e-6)
    assert any(float(torch.linalg.svdvals(d)[1]) > 1e-3 for d in original.values()), "rank 1 should truncate"


def test_weight_shape_from_file_tensors_tells_or_declines(adapters):
    for name, path in adapters["files"].items():
        for layer, tensors in group_by_layer(load_lora(path)[0]["unet"]).items():
            shape = weight_shape_of_file_tensors(tensors, name=layer)
            want = tuple(adapters["base"][f"unet.{layer}.weight"].shape)
            if name == "loha" or (name == "lokr" and "lokr_w2_b" in tensors and "lokr_t2" not in tensors):
                assert shape is None, (name, layer)  # flattened factors: the file cannot tell
            else:
                assert shape == want, (name, layer)


def test_combine_mixed_families_concat_is_exact_and_svd_is_the_tail(adapters, tmp_path, capsys):
    base, ckpt, files = adapters["base"], adapters["ckpt"], adapters["files"]
    inputs = [(files["lora"], 0.5), (files["loha"], -1.5), (files["full"], 0.75), (files["dora"], 1.25)]
    paths, scales = [str(p) for p, _ in inputs], [s for _, s in inputs]
    out = tmp_path / "concat.safetensors"
    code = cli_main(["combine-loras", *paths, "--scale", *map(str, scales), "-o", str(out), "--quiet"])
    assert code == 2 and "--base CKPT" in capsys.readouterr().err  # LoHa shapes / DoRA need the base
    code = cli_main(["combine-loras", *paths, "--scale", *map(str, scales), "--base", str(ckpt), "-o", str(out),
                     "--quiet"])
    assert code == 0
    assert "not written" in capsys.readouterr().err  # the full file's bias deltas
    want = _applied(base, inputs)  # apply_lora of each in turn: the DoRA last sees W + the others
    error = _rel_error(_applied(base, [(out, 1.0)]), want, base, weights_only=True)
    assert error < 1e-5, f"concat combination: relative error {error:.3g}"
    lora_ranks = {layer: t["lora_down.weight"].shape[0] for layer, t in group_by_layer(load_lora(files["lora"])[0]["unet"]).items()}
    combined = group_by_layer(load_lora(out)[0]["unet"])
    assert all(combined[layer]["lora_down.weight"].shape[0] > r for layer, r in lora_ranks.items())

    svd = tmp_path / "svd.safetensors"
    combine_loras([files["loha"], files["lokr"]], svd, strengths=[1.0, -0.5], mode="svd", rank=2, base=ckpt)
    total = _deltas(base, [(files["loha"], 1.0), (files["lokr"], -0.5)])
    got = _deltas(base, [(svd, 1.0)])
    for layer, delta in total.items():
        s = torch.linalg.svdvals(delta)
        tail = float(torch.sqrt((s[2:] ** 2).sum()))
        assert float(torch.linalg.norm(delta - got[layer])) == pytest.approx(tail, rel=1e-3, abs=1e-6), layer


def test_resize_cli_base_option_and_lora_files_keep_their_exact_path(adapters, tmp_path, capsys):
    ckpt, files = adapters["ckpt"], adapters["files"]
    out = tmp_path / "loha_r2.safetensors"
    code = cli_main(["resize-lora", str(files["loha"]), "--rank", "2", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "does not tell the layer's shape" in err and "--base CKPT" in err
    assert cli_main(["resize-lora", str(files["loha"]), "--rank", "2", "--base", str(ckpt), "-o", str(out),
                     "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    # a base that is not the LoRA's model is refused by name
    other = _write_checkpoint(tmp_path / "sdxl.safetensors", _flat(tiny_unet_sdxl()), naming="ldm", arch="sdxl")
    with pytest.raises(ValueError, match="has no such layer|not the model"):
        resize_lora(files["loha"], tmp_path / "x.safetensors", rank=2, base=other)
    # LoRA layers keep alpha/rank and their thin-factor path (no base needed)
    lora = tmp_path / "lora_r1.safetensors"
    resize_lora(files["lora"], lora, rank=1)
    for tensors in group_by_layer(load_lora(lora)[0]["unet"]).values():
        assert float(tensors["alpha"]) / tensors["lora_down.weight"].shape[0] == pytest.approx(2.0 / 3.0)
