"""extract-lora / resize-lora / merge-lora / combine-loras end to end on tiny synthetic checkpoints.

Checkpoints are built here from tiny random diffusers UNets and CLIP text encoders, written in LDM
single-file naming (SD1: ``model.diffusion_model.*`` + ``cond_stage_model.transformer.*``; SDXL:
``conditioner.embedders.0/1.*`` with an OpenCLIP-style fused ``in_proj_weight``) or as diffusers
UNet files. The "fine-tune" adds a known low-rank change to every LoRA target layer, so the
exact answers are known: extraction at rank >= the true rank reproduces the tuned model (checked
through diffusers' own LoRA loader), below it the error is the Eckart–Young bound.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.cli import main  # noqa: E402
from sdadapt.formats import load_lora  # noqa: E402
from sdadapt.formats.unet_names import diffusers_to_ldm_unet, ldm_to_diffusers_unet  # noqa: E402
from sdadapt.loratools.checkpoint_layers import is_lora_target  # noqa: E402
from sdadapt.loratools.combine import layer_delta  # noqa: E402
from sdadapt.formats.layers import group_by_layer  # noqa: E402

LDM = "model.diffusion_model."
TE1_SD1 = "cond_stage_model.transformer."
TE1_SDXL = "conditioner.embedders.0.transformer."
TE2_SDXL = "conditioner.embedders.1.model."


# ------------------------------------------------------------------------------------ builders
def _te_keys(state: dict, prefix: str) -> dict:
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _to_ldm_unet(state: dict, *, sdxl: bool) -> dict:
    out = {}
    up_attention = {0, 1} if sdxl else {1}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        ldm = diffusers_to_ldm_unet(module, up_blocks_with_attention=up_attention)
        assert ldm is not None, module
        out[f"{LDM}{ldm}.{param}"] = value
    return out


def _from_ldm_unet(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith(LDM):
            module, param = key[len(LDM) :].rsplit(".", 1)
            out[f"{ldm_to_diffusers_unet(module)}.{param}"] = value
    return out


def _to_open_clip(state: dict) -> dict:
    """HF CLIP encoder layers -> OpenCLIP resblocks with fused in_proj (what SDXL's bigG stores)."""
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        p = f"encoder.layers.{i}."
        q = f"{TE2_SDXL}transformer.resblocks.{i}."
        out[q + "attn.in_proj_weight"] = torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[q + "attn.in_proj_bias"] = torch.cat([state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[q + oc + ".weight"] = state[p + hf + ".weight"]
            out[q + oc + ".bias"] = state[p + hf + ".bias"]
    out[TE2_SDXL + "token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    return out


def _from_open_clip(state: dict, like: dict) -> dict:
    """The inverse of :func:`_to_open_clip` for the weights it fused (others copied from ``like``)."""
    out = dict(like)
    for key, value in state.items():
        if not key.startswith(TE2_SDXL + "transformer.resblocks."):
            continue
        i, rest = key[len(TE2_SDXL + "transformer.resblocks.") :].split(".", 1)
        p = f"encoder.layers.{i}."
        if rest == "attn.in_proj_weight":
            for j, n in enumerate("qkv"):
                out[p + f"self_attn.{n}_proj.weight"] = value.chunk(3)[j]
        elif rest.endswith(".weight") and rest != "attn.in_proj_weight":
            name = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}[rest[:-7]]
            out[p + name + ".weight"] = value
    return out


def _perturb(state: dict, select, *, rank: int, seed: int, std: float = 0.3) -> dict:
    """Add a random rank-``rank`` change to every weight ``select(key, shape)`` accepts."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, value in state.items():
        if not key.endswith(".weight") or value.dim() not in (2, 4) or not select(key[: -len(".weight")], tuple(value.shape)):
            continue
        o = value.shape[0]
        i = value[0].numel()
        delta = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * (std / math.sqrt(rank * i))
        out[key] = value + delta.reshape(value.shape)
    return out


def _unet_target(conv: bool = False):
    return lambda layer, shape: is_lora_target("unet", layer, shape, conv=conv)


def _te_target(layer, shape):
    return is_lora_target("text_encoder", "text_model." + layer, shape, conv=False)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """Base and tuned SD1 checkpoints (LDM .safetensors, LDM .ckpt, diffusers UNet files)."""
    folder = tmp_path_factory.mktemp("sd1")
    unet_base = {k: v.contiguous() for k, v in tiny_unet_sd1().state_dict().items()}
    te_base = tiny_clip().state_dict()
    unet_tuned = _perturb(unet_base, _unet_target(conv=True), rank=2, seed=1)
    te_tuned = _perturb(te_base, _te_target, rank=2, seed=2, std=3.0)
    files = {}
    for name, unet, te in (("base", unet_base, te_base), ("tuned", unet_tuned, te_tuned)):
        ldm = {**_to_ldm_unet(unet, sdxl=False), **_te_keys(te, TE1_SD1)}
        files[name] = folder / f"{name}.safetensors"
        save_file(ldm, files[name], metadata={"format": "pt"})
        files[name + "_ckpt"] = folder / f"{name}.ckpt"
        torch.save({"state_dict": ldm}, files[name + "_ckpt"])
        files[name + "_unet"] = folder / f"{name}_unet.safetensors"
        save_file(unet, files[name + "_unet"])
    return {"files": files, "unet_base": unet_base, "unet_tuned": unet_tuned, "te_base": te_base, "te_tuned": te_tuned}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _unet_with(state: dict, *, sdxl: bool = False):
    unet = tiny_unet_sdxl() if sdxl else tiny_unet_sd1()
    unet.load_state_dict(state)
    return unet


def _assert_close(got, want, base, atol):
    assert (want - base).abs().max() > 1e-2, "the fine-tune has no visible effect; the test would prove nothing"
    diff = (got - want).abs().max().item()
    assert diff < atol, f"outputs differ by {diff:.3g}"


# ------------------------------------------------------------------- extract -> diffusers loads it
def test_extracted_lora_loads_in_diffusers_and_reproduces_tuned_unet(sd1, tmp_path, capsys):
    out = tmp_path / "extracted.safetensors"
    files = sd1["files"]
    code, stdout, _ = _run(
        capsys, "extract-lora", files["base_unet"], files["tuned_unet"], "--rank", 4, "--conv-rank", 2,
        "--clamp-quantile", 1, "-o", out, "--quiet",
    )
    assert code == 0 and "wrote" in stdout
    with safe_open(str(out), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    # kohya naming (SD1: diffusers paths), LoCon resnets, alphas = rank
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    state = load_file(str(out))
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert float(state["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 4.0  # alpha = rank: scale 1
    # diffusers' own loader, on a fresh base UNet
    inputs = unet_inputs(tiny_unet_sd1())
    base = run_unet(_unet_with(sd1["unet_base"]), inputs)
    want = run_unet(_unet_with(sd1["unet_tuned"]), inputs)
    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out.parent), weight_name=out.name, local_files_only=True)
    unet = _unet_with(sd1["unet_base"])
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet, adapter_name="extracted")
    _assert_close(run_unet(unet, inputs), want, base, atol=1e-4)
    # and sdadapt reads the same file back to the same model
    components, _ = load_lora(out)
    unet2 = _unet_with(sd1["unet_base"])
    sdadapt.load_adapter(unet2, components["unet"])
    _assert_close(run_unet(unet2, inputs), want, base, atol=1e-4)


# ------------------------------------------------------ merge ∘ extract = tuned up to Eckart–Young
def test_merge_of_extract_is_tuned_within_the_svd_bound(sd1, tmp_path, capsys):
    files = sd1["files"]
    lora = tmp_path / "r1.safetensors"
    code, _, _ = _run(capsys, "extract-lora", files["base"], files["tuned"], "--rank", 1, "--clamp-quantile", 1,
                      "-o", lora, "--quiet")
    assert code == 0
    merged_path = tmp_path / "merged.safetensors"
    code, stdout, _ = _run(capsys, "merge-lora", files["base"], lora, "--scale", 1.0, "-o", merged_path, "--quiet")
    assert code == 0 and "tensors changed" in stdout
    base, tuned, merged = load_file(str(files["base"])), load_file(str(files["tuned"])), load_file(str(merged_path))
    assert list(merged) == list(base)  # same keys, same order
    checked = 0
    for key in base:
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        diffusers_path = ldm_to_diffusers_unet(module[len(LDM) :]) if module and module.startswith(LDM) else None
        is_target = diffusers_path and is_lora_target("unet", diffusers_path, tuple(base[key].shape), conv=False)
        is_te = module and module.startswith(TE1_SD1) and _te_target(module[len(TE1_SD1 + "text_model.") :], tuple(base[key].shape))
        if not (is_target or is_te):
            assert torch.equal(merged[key], base[key]), key  # untouched tensors are bit-identical
            continue
        diff = (tuned[key] - base[key]).double().reshape(base[key].shape[0], -1)
        s = torch.linalg.svdvals(diff)
        bound = float(torch.sqrt((s[1:] ** 2).sum()))  # rank 1 kept
        error = float(torch.linalg.norm((tuned[key] - merged[key]).double()))
        assert error == pytest.approx(bound, rel=1e-3, abs=1e-5), key
        assert error > 1e-4  # a real truncation (true rank 2)
        checked += 1
    assert checked > 20


def test_extract_from_ckpt_skips_unchanged_text_encoder_and_reports(sd1, tmp_path, capsys):
    files = sd1["files"]
    # a "tuned" checkpoint whose text encoder barely moved (max |Δ| < 0.01): kohya leaves it out
    tuned = load_file(str(files["tuned"]))
    base = load_file(str(files["base"]))
    for key in tuned:
        if key.startswith(TE1_SD1):
            tuned[key] = base[key] + 0.5 * (tuned[key] - base[key]).clamp(-0.01, 0.01)
    path = tmp_path / "tuned_small_te.ckpt"
    torch.save({"state_dict": tuned}, path)
    out = tmp_path / "unet_only.safetensors"
    code, stdout, stderr = _run(capsys, "extract-lora", files["base_ckpt"], path, "--rank", 2, "-o", out, "--quiet")
    assert code == 0
    assert "text encoder unchanged" in stderr and "skipped" in stderr
    components, _ = load_lora(out)
    assert set(components) == {"unet"}
    # with the threshold lowered, the text encoder comes back
    code, _, _ = _run(capsys, "extract-lora", files["base_ckpt"], path, "--rank", 2, "--min-diff", 0.001, "-o", out,
                      "--overwrite", "--quiet")
    assert code == 0 and set(load_lora(out)[0]) == {"unet", "text_encoder"}


# ---------------------------------------------------------------------------------------- resize
def test_resize_keeps_strength_and_is_best_lower_rank(sd1, tmp_path, capsys):
    files = sd1["files"]
    big = tmp_path / "r4.safetensors"
    assert _run(capsys, "extract-lora", files["base"], files["tuned"], "--rank", 4, "--alpha", 8, "--clamp-quantile", 1,
                "-o", big, "--quiet")[0] == 0
    small = tmp_path / "r1.safetensors"
    code, stdout, _ = _run(capsys, "resize-lora", big, "--rank", 1, "-o", small, "--quiet")
    assert code == 0 and "rank 1" in stdout
    old, meta_old = load_lora(big)
    new, meta = load_lora(small)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_training_comment"].startswith("dimension is resized from 4 to 1; ")
    for component in old:
        old_layers, new_layers = group_by_layer(old[component]), group_by_layer(new[component])
        assert set(old_layers) == set(new_layers)
        for layer, tensors in old_layers.items():
            r_old = tensors["lora_down.weight"].shape[0]
            r_new = new_layers[layer]["lora_down.weight"].shape[0]
            assert r_new == 1
            # alpha'/r' == alpha/r (alpha 8 on rank-2 layers -> scale 4 -> alpha' 4)
            assert float(new_layers[layer]["alpha"]) / r_new == pytest.approx(float(tensors["alpha"]) / r_old)
            want = layer_delta(tensors).double().reshape(tensors["lora_up.weight"].shape[0], -1)
            got = layer_delta(new_layers[layer]).double().reshape(want.shape)
            s = torch.linalg.svdvals(want)
            assert float(torch.linalg.norm(want - got)) == pytest.approx(float(torch.sqrt((s[1:] ** 2).sum())), rel=1e-3, abs=1e-5)
    # dynamic: sv_fro 0.999 needs the 2 true directions of each rank-4 layer, plus kohya's one extra
    dyn = tmp_path / "dyn.safetensors"
    code, _, _ = _run(capsys, "resize-lora", big, "--rank", 8, "--dynamic-method", "sv_fro", "--dynamic-param", 0.999,
                      "-o", dyn, "--quiet")
    assert code == 0
    ranks = {v.shape[0] for k, v in load_lora(dyn)[0]["unet"].items() if k.endswith("lora_down.weight")}
    assert ranks == {3}
    assert load_lora(dyn)[1]["ss_network_dim"] == "Dynamic"


# ----------------------------------------------------------------------- merge several, combine
def test_merge_two_loras_with_scales_matches_naive_sum(sd1, tmp_path, capsys):
    files = sd1["files"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _run(capsys, "extract-lora", files["base_unet"], files["tuned_unet"], "--rank", 2, "-o", a, "--quiet")[0] == 0
    assert _run(capsys, "extract-lora", files["tuned_unet"], files["base_unet"], "--rank", 1, "--alpha", 0.5, "-o", b,
                "--quiet")[0] == 0
    out = tmp_path / "merged_unet.safetensors"
    code, _, _ = _run(capsys, "merge-lora", files["base_unet"], a, b, "--scale", 0.5, -1.5, "--dtype", "fp16",
                      "-o", out, "-q")
    assert code == 0
    base, merged = load_file(str(files["base_unet"])), load_file(str(out))
    la, lb = group_by_layer(load_lora(a)[0]["unet"]), group_by_layer(load_lora(b)[0]["unet"])
    assert all(v.dtype == torch.float16 for v in merged.values())
    for layer in la:
        key = layer + ".weight"
        want = base[key].double() + (0.5 * layer_delta(la[layer]).double() - 1.5 * layer_delta(lb[layer]).double()).reshape(
            base[key].shape
        )
        assert torch.allclose(merged[key].double(), want, atol=2e-3, rtol=1e-3), key
    # combine-loras: one exact LoRA for 0.5·A − 1.5·B, same merge result
    combined = tmp_path / "combined.safetensors"
    code, _, _ = _run(capsys, "combine-loras", a, b, "--scale=0.5,-1.5", "-o", combined, "--quiet")  # the comma form
    assert code == 0
    lc = group_by_layer(load_lora(combined)[0]["unet"])
    for layer in la:
        assert lc[layer]["lora_down.weight"].shape[0] == la[layer]["lora_down.weight"].shape[0] + 1
        want = 0.5 * layer_delta(la[layer]) - 1.5 * layer_delta(lb[layer])
        assert torch.allclose(layer_delta(lc[layer]), want, atol=1e-6)


# -------------------------------------------------------------------------- SDXL: fused OpenCLIP
def test_sdxl_fused_in_proj_extract_merge_and_diffusers(tmp_path, capsys):
    unet_base = {k: v.contiguous() for k, v in tiny_unet_sdxl().state_dict().items()}
    te1 = tiny_clip().state_dict()
    te2_hf = tiny_clip(1, with_projection=True).state_dict()  # keeps `text_model.` on transformers 5
    te2 = {k.removeprefix("text_model."): v for k, v in te2_hf.items()}
    unet_tuned = _perturb(unet_base, _unet_target(), rank=2, seed=3)
    te1_tuned = _perturb(te1, _te_target, rank=2, seed=4, std=3.0)
    te2_tuned = _perturb(te2, _te_target, rank=2, seed=5, std=3.0)
    paths = {}
    for name, u, t1, t2 in (("base", unet_base, te1, te2), ("tuned", unet_tuned, te1_tuned, te2_tuned)):
        paths[name] = tmp_path / f"xl_{name}.safetensors"
        save_file({**_to_ldm_unet(u, sdxl=True), **_te_keys(t1, TE1_SDXL), **_to_open_clip(t2)}, paths[name])
    lora = tmp_path / "xl_lora.safetensors"
    code, _, _ = _run(capsys, "extract-lora", paths["base"], paths["tuned"], "--rank", 2, "--clamp-quantile", 1,
                      "-o", lora, "--quiet")
    assert code == 0
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys  # LDM names for XL
    for n in "qkv":
        assert f"lora_te2_text_model_encoder_layers_0_self_attn_{n}_proj.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    # the te2 LoRA on an unfused HF CLIP reproduces the tuned (unfused) text encoder
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    components, _ = load_lora(lora)
    clip = tiny_clip(1, with_projection=True)
    with torch.no_grad():
        base_out = clip(ids).last_hidden_state
    sdadapt.load_adapter(clip, components["text_encoder_2"])
    tuned_clip = tiny_clip(1, with_projection=True)
    tuned_clip.load_state_dict({("text_model." + k if "text_model." + k in te2_hf else k): v for k, v in te2_tuned.items()})
    with torch.no_grad():
        _assert_close(clip(ids).last_hidden_state, tuned_clip(ids).last_hidden_state, base_out, atol=1e-4)
    # merge back: the fused in_proj gets q/k/v on the right thirds -> equals the tuned checkpoint
    merged = tmp_path / "xl_merged.safetensors"
    assert _run(capsys, "merge-lora", paths["base"], lora, "-o", merged, "--quiet")[0] == 0
    got, want = load_file(str(merged)), load_file(str(paths["tuned"]))
    fused = f"{TE2_SDXL}transformer.resblocks.1.attn.in_proj_weight"
    assert torch.allclose(got[fused], want[fused], atol=1e-5)
    assert not torch.allclose(got[fused], load_file(str(paths["base"]))[fused], atol=1e-3)
    assert torch.equal(got[f"{TE2_SDXL}transformer.resblocks.1.attn.in_proj_bias"], want[f"{TE2_SDXL}transformer.resblocks.1.attn.in_proj_bias"])
    hf = _from_open_clip(got, te2)
    assert all(torch.allclose(hf[k], te2_tuned[k], atol=1e-5) for k in te2 if k.startswith("encoder.layers"))
    # diffusers' SDXL loader reads the LDM-named UNet part
    inputs = unet_inputs(tiny_unet_sdxl(), sdxl=True)
    unet = _unet_with(unet_base, sdxl=True)
    sd, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(lora.parent), weight_name=lora.name, unet_config=unet.config, local_files_only=True)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet, adapter_name="x")
    _assert_close(run_unet(unet, inputs), run_unet(_unet_with(unet_tuned, sdxl=True), inputs),
                  run_unet(_unet_with(unet_base, sdxl=True), inputs), atol=1e-4)
    merged_unet = _unet_with(_from_ldm_unet(got), sdxl=True)
    assert torch.allclose(run_unet(merged_unet, inputs), run_unet(unet, inputs), atol=1e-4)


# ---------------------------------------------------------------------------------------- errors
def test_help_for_every_command(capsys):
    for command in ("extract-lora", "resize-lora", "merge-lora", "combine-loras"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "-o OUT" in capsys.readouterr().out


def test_clear_errors(sd1, tmp_path, capsys, monkeypatch):
    files = sd1["files"]
    out = tmp_path / "out.safetensors"
    # missing input
    code, _, err = _run(capsys, "extract-lora", tmp_path / "nope.safetensors", files["tuned"], "-o", out)
    assert code == 3 and "nope.safetensors: no such file" in err  # WeightFileError
    # different architectures: names the keys
    other = load_file(str(files["tuned"]))
    key = f"{LDM}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    other[key] = torch.zeros(other[key].shape[0], other[key].shape[1] + 1)
    del other[f"{LDM}output_blocks.5.1.proj_out.weight"]
    bad = tmp_path / "other_arch.safetensors"
    save_file(other, bad)
    code, _, err = _run(capsys, "extract-lora", files["base"], bad, "-o", out, "--quiet")
    assert code == 3 and "different architectures" in err
    assert "attn2.to_k.weight: shape" in err and "output_blocks.5.1.proj_out.weight" in err
    # existing output needs --overwrite (and is left untouched)
    out.write_bytes(b"precious")
    code, _, err = _run(capsys, "extract-lora", files["base"], files["tuned"], "-o", out, "--quiet")
    assert code == 8 and "--overwrite" in err and out.read_bytes() == b"precious"  # OutputExistsError
    # not enough disk space: refused before writing anything
    fresh = tmp_path / "fresh.safetensors"

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage())
    code, _, err = _run(capsys, "merge-lora", files["base"], files["base"], "-o", fresh, "--quiet")
    assert code == 3  # (the LoRA argument is a checkpoint: refused as not a LoRA)
    lora = tmp_path / "ok.safetensors"
    monkeypatch.undo()
    assert _run(capsys, "extract-lora", files["base"], files["tuned"], "--rank", 1, "-o", lora, "--quiet")[0] == 0
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage())
    code, _, err = _run(capsys, "merge-lora", files["base"], lora, "-o", fresh, "--quiet")
    assert code == 9 and "not enough disk space" in err and "MiB" in err  # DiskSpaceError
    assert not fresh.exists() and not list(tmp_path.glob(".fresh*"))
    monkeypatch.undo()
    # a LoRA for another model: lists the layers that match nothing
    xl_lora = tmp_path / "xl_like.safetensors"
    components, _ = load_lora(lora)
    one_layer = next(iter(group_by_layer(components["unet"]).values()))
    foreign = {f"down_blocks.2.attentions.0.proj_in.{k}": v for k, v in one_layer.items()}  # SD1 has 2 levels here
    sdadapt.save_lora(xl_lora, {"unet": foreign}, base_model="sd1")
    code, _, err = _run(capsys, "merge-lora", files["base"], xl_lora, "-o", fresh, "--quiet")
    assert code == 3 and "match no tensor" in err and "down_blocks.2.attentions.0.proj_in" in err
    assert "--skip-unmatched" in err
    # bad options
    code, _, err = _run(capsys, "resize-lora", lora, "--dynamic-method", "sv_fro", "-o", fresh)
    assert code == 2 and "needs its parameter" in err
    code, _, err = _run(capsys, "merge-lora", files["base"], lora, lora, "--scale", 1, 2, 3, "-o", fresh)
    assert code == 2 and "one per LoRA" in err


def test_merge_with_block_weights(sd1, tmp_path, capsys):
    from sdadapt.loratools.block_weights import BLOCK_IDS, block_slot

    files = sd1["files"]
    lora = tmp_path / "lbw.safetensors"
    assert _run(capsys, "extract-lora", files["base"], files["tuned"], "--rank", 2, "-o", lora, "--quiet")[0] == 0
    weights = [0.0] + [0.25 * (i % 4) for i in range(1, 26)]  # BASE 0: text encoder untouched
    out = tmp_path / "lbw_merged.safetensors"
    code, _, _ = _run(capsys, "merge-lora", files["base"], lora, "--scale", 2, "--block-weights",
                      ",".join(str(w) for w in weights), "-o", out, "--quiet")
    assert code == 0
    base, merged = load_file(str(files["base"])), load_file(str(out))
    components, _ = load_lora(lora)
    seen = set()
    for layer, tensors in group_by_layer(components["unet"]).items():
        key = f"{LDM}{diffusers_to_ldm_unet(layer)}.weight"
        w = weights[block_slot("unet", layer)]
        seen.add(BLOCK_IDS[block_slot("unet", layer)])
        want = base[key].double() + 2 * w * layer_delta(tensors).double().reshape(base[key].shape)
        assert torch.allclose(merged[key].double(), want, atol=1e-5), key
    assert len(seen) >= 4
    assert all(torch.equal(merged[k], base[k]) for k in base if k.startswith(TE1_SD1))
    code, _, err = _run(capsys, "merge-lora", files["base"], lora, "--block-weights", ",".join(["1"] * 20), "-o",
                        tmp_path / "x.safetensors", "--quiet")
    assert code == 2 and "SDXL" in err


def test_merge_refuses_lora_of_another_size_and_non_safetensors_output(sd1, tmp_path, capsys):
    files = sd1["files"]
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = {f"{layer}.lora_down.weight": torch.randn(2, 48), f"{layer}.lora_up.weight": torch.randn(32, 2)}
    lora = tmp_path / "wrong_size.safetensors"
    sdadapt.save_lora(lora, {"unet": wrong})
    out = tmp_path / "m.safetensors"
    code, _, err = _run(capsys, "merge-lora", files["base"], lora, "-o", out, "--quiet")
    assert code == 3 and "do not fit the shapes" in err and "(32, 48)" in err and "(32, 32)" in err
    assert not out.exists()
    code, _, err = _run(capsys, "merge-lora", files["base"], lora, "-o", tmp_path / "m.ckpt", "--quiet")
    assert code == 7 and ".safetensors files only" in err  # OutputError
