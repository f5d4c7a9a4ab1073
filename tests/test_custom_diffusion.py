"""Custom Diffusion weights: the processors' math, apply/remove, files, and interop with diffusers both ways."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs
from torch import nn

import sdadapt
from sdadapt.custom_diffusion import cross_attention_layers, unet_custom_diffusion_state
from sdadapt.errors import OutputExistsError, WeightFileError
from sdadapt.formats.custom_diffusion import (
    existing_token_files,
    load_custom_diffusion,
    save_custom_diffusion_file,
    split_file_key,
    token_files,
)
from sdadapt.formats.unet_names import diffusers_to_ldm_unet
from sdadapt.methods.custom_diffusion import detach_first_token

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor


def _random_state(unet, *, train_q_out: bool = False, seed: int = 3, spread: float = 0.2) -> dict[str, torch.Tensor]:
    """Full replacement weights near the UNet's own (diffusers keys)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + spread * torch.randn(v.shape, generator=g) for k, v in
            unet_custom_diffusion_state(unet, train_q_out=train_q_out).items()}


def _set_processors(unet, state: dict[str, torch.Tensor], *, train_q_out: bool) -> None:
    """diffusers' Custom Diffusion processors on every attention layer, as its training script sets them."""
    procs = {}
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        if layer.endswith("attn2"):
            module = unet.get_submodule(layer)
            proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=train_q_out, hidden_size=module.to_q.out_features,
                                                cross_attention_dim=module.to_k.in_features)
            own = {split_file_key(k)[1]: v for k, v in state.items() if split_file_key(k)[0] == layer}
            proc.to_k_custom_diffusion.weight.data.copy_(own["to_k.weight"])
            proc.to_v_custom_diffusion.weight.data.copy_(own["to_v.weight"])
            if train_q_out:
                proc.to_q_custom_diffusion.weight.data.copy_(own["to_q.weight"])
                proc.to_out_custom_diffusion[0].weight.data.copy_(own["to_out.0.weight"])
                proc.to_out_custom_diffusion[0].bias.data.copy_(own["to_out.0.bias"])
            procs[name] = proc
        else:
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
    unet.set_attn_processor(procs)


# ------------------------------------------------------------------------------ the math
def _naive_cross_attention(attn, hidden: torch.Tensor, context: torch.Tensor, wk, wv, wq=None, wo=None, bo=None) -> torch.Tensor:
    """float64 multi-head attention with the given projections (out = to_out(softmax(q kᵀ/√d) v))."""
    h = attn.heads
    f = lambda t: t.double()
    wq = f(attn.to_q.weight if wq is None else wq)
    wo = f(attn.to_out[0].weight if wo is None else wo)
    bo = f(attn.to_out[0].bias if bo is None else bo)
    q, k, v = f(hidden) @ wq.T, f(context) @ f(wk).T, f(context) @ f(wv).T  # (B, N, C), (B, L, C)
    b, n, c = q.shape
    d = c // h
    q = q.view(b, n, h, d).transpose(1, 2)
    k = k.view(b, -1, h, d).transpose(1, 2)
    v = v.view(b, -1, h, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return out @ wo.T + bo


@pytest.mark.parametrize("train_q_out", [False, True])
def test_processor_and_applied_weights_equal_a_naive_float64_attention(train_q_out):
    unet = tiny_unet_sd1()
    layer = next(iter(cross_attention_layers(unet).values()))
    state = _random_state(unet, train_q_out=train_q_out)
    own = {split_file_key(k)[1]: v for k, v in state.items() if split_file_key(k)[0] == layer.name}
    g = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    expected = _naive_cross_attention(layer.module, hidden, context, own["to_k.weight"], own["to_v.weight"],
                                      own.get("to_q.weight"), own.get("to_out.0.weight"), own.get("to_out.0.bias"))
    _set_processors(unet, state, train_q_out=train_q_out)
    with torch.no_grad():
        by_processor = layer.module(hidden, encoder_hidden_states=context)
    unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
    handle = sdadapt.apply_custom_diffusion(unet, state)
    with torch.no_grad():
        by_weights = layer.module(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(by_processor.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_weights.double(), expected, atol=1e-5, rtol=1e-5)
    handle.remove()


def test_first_token_detach_changes_gradients_not_values_as_diffusers_processor():
    unet = tiny_unet_sd1()
    layer = next(iter(cross_attention_layers(unet).values()))
    attn = layer.module
    state = unet_custom_diffusion_state(unet)
    g = torch.Generator().manual_seed(1)
    hidden, context = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    target = torch.randn(2, 6, 32, generator=g)

    def loss_and_grads(hooked: bool):
        hooks = [getattr(attn, p).register_forward_hook(detach_first_token) for p in ("to_k", "to_v")] if hooked else []
        attn.zero_grad()
        out = attn(hidden, encoder_hidden_states=context)
        ((out - target) ** 2).sum().backward()
        for h in hooks:
            h.remove()
        return out.detach(), attn.to_k.weight.grad.clone(), attn.to_v.weight.grad.clone()

    plain, gk_plain, _ = loss_and_grads(False)
    detached, gk, gv = loss_and_grads(True)
    torch.testing.assert_close(detached, plain, atol=0, rtol=0)  # values unchanged
    assert (gk - gk_plain).abs().max() > 1e-4  # gradients changed
    # diffusers' processor (its own detach trick) gives the same gradients
    _set_processors(unet, state, train_q_out=False)
    proc = attn.processor
    out = attn(hidden, encoder_hidden_states=context)
    ((out - target) ** 2).sum().backward()
    torch.testing.assert_close(proc.to_k_custom_diffusion.weight.grad, gk, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(proc.to_v_custom_diffusion.weight.grad, gv, atol=1e-5, rtol=1e-4)
    # float64 reference: the position-0 rows of K/V are constants, the others depend on W
    wk = attn.to_k.weight.detach().double().requires_grad_(True)
    wv = attn.to_v.weight.detach().double().requires_grad_(True)
    c = context.double()
    k = torch.cat([c[:, :1] @ wk.detach().T, c[:, 1:] @ wk.T], dim=1)
    v = torch.cat([c[:, :1] @ wv.detach().T, c[:, 1:] @ wv.T], dim=1)
    h = attn.heads
    q = hidden.double() @ attn.to_q.weight.double().T
    b, n, ch = q.shape
    d = ch // h
    split = lambda t: t.view(b, -1, h, d).transpose(1, 2)
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1) @ split(v)
    out64 = a.transpose(1, 2).reshape(b, n, ch) @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    ((out64 - target.double()) ** 2).sum().backward()
    torch.testing.assert_close(gk.double(), wk.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv.double(), wv.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ apply / remove
def test_apply_scales_and_remove_restores_bit_for_bit():
    unet = tiny_unet_sd1()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    state = _random_state(unet, train_q_out=True)
    handle = sdadapt.apply_custom_diffusion(unet, state, scale=0.5)
    assert set(unet.state_dict()) == set(before)  # keys unchanged
    assert all("forward" not in vars(m) for m in unet.modules())  # forward never rebound
    for key, value in state.items():
        layer, param = split_file_key(key)
        base = before[f"{layer}.{param}"]
        torch.testing.assert_close(unet.get_parameter(f"{layer}.{param}"), base + 0.5 * (value - base))
    assert len(handle.layers) == len(cross_attention_layers(unet))
    torch.testing.assert_close(handle.state_dict()[next(iter(state))], unet.get_parameter(
        ".".join(split_file_key(next(iter(state))))))
    handle.remove()
    handle.remove()  # idempotent
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_ldm_named_unet_gets_the_same_weights(tmp_path):
    unet = tiny_unet_sd1()
    state = _random_state(unet)
    # an LDM-named tree (model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2 ...) sharing the modules
    root = nn.Module()
    paths = []
    for name, layer in cross_attention_layers(unet).items():
        ldm = "model.diffusion_model." + diffusers_to_ldm_unet(name, layers_per_block=2)
        paths.append(ldm)
        parent = root
        parts = ldm.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], layer.module)
    assert any(p.startswith("model.diffusion_model.input_blocks.1.1.") for p in paths)
    reference = tiny_unet_sd1()
    expected = sdadapt.apply_custom_diffusion(reference, state)
    handle = sdadapt.apply_custom_diffusion(root, state)
    inputs = unet_inputs(unet)
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(reference, inputs), atol=0, rtol=0)
    handle.remove()
    expected.remove()


def test_errors_name_the_layers_and_the_file(tmp_path):
    unet = tiny_unet_sd1()
    state = _random_state(unet)
    key = next(iter(state))
    wide = dict(state)
    wide[key] = torch.zeros(32, 64)
    path = tmp_path / "other.safetensors"
    save_custom_diffusion_file(path, wide)
    with pytest.raises(WeightFileError, match=r"other\.safetensors.*do not fit.*(\(32, 64\))"):
        sdadapt.apply_custom_diffusion(unet, path)
    foreign = {key.replace("down_blocks.0", "down_blocks.7"): state[key]}
    with pytest.raises(WeightFileError, match=r"down_blocks\.7\.attentions.*another model"):
        sdadapt.apply_custom_diffusion(unet, foreign)
    lora = tmp_path / "lora.safetensors"
    sdadapt.formats.files.write_safetensors(lora, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightFileError, match=r"lora\.safetensors.*no Custom Diffusion weights"):
        sdadapt.apply_custom_diffusion(unet, lora)
    with pytest.raises(WeightFileError, match=r"\.pt"):
        save_custom_diffusion_file(tmp_path / "x.pt", state)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_unet_sd1().state_dict().values()))


# ------------------------------------------------------------------------------ files
_UNET = None


def _unet():
    global _UNET
    if _UNET is None:
        _UNET = tiny_unet_sd1()
    return _UNET


@settings(max_examples=8, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), q_out=st.booleans(),
       suffix=st.sampled_from([".safetensors", ".bin"]), seed=st.integers(0, 100))
def test_round_trip_keeps_keys_values_and_dtype(tmp_path_factory, dtype, q_out, suffix, seed):
    folder = tmp_path_factory.mktemp("rt")
    state = {k: v.to(dtype) for k, v in _random_state(_unet(), train_q_out=q_out, seed=seed).items()}
    token = sdadapt.Embedding("<new1>", {"text_encoder": torch.randn(1, 32, generator=torch.Generator().manual_seed(seed))})
    path = folder / f"cd{suffix}"
    written = sdadapt.save_custom_diffusion(path, state, embeddings=[token], prompts=["photo of a <new1> dog"])
    assert written == [path, *token_files(path)]
    loaded = load_custom_diffusion(path)
    assert set(loaded.weights) == set(state)
    assert all(loaded.weights[k].dtype == dtype and torch.equal(loaded.weights[k], v) for k, v in state.items())
    assert loaded.train_q_out == q_out
    assert loaded.tokens == ["<new1>"]
    assert torch.equal(loaded.embeddings[0].vectors["text_encoder"], token.vectors["text_encoder"])
    if suffix == ".safetensors":
        assert loaded.prompts == ["photo of a <new1> dog"]


def test_overwriting_with_fewer_tokens_reads_only_the_recorded_token_files(tmp_path):
    state = _random_state(_unet())
    path = tmp_path / "cd.safetensors"
    tokens = [sdadapt.Embedding(n, {"text_encoder": torch.randn(1, 32)}) for n in ("<a>", "<b>", "<c>")]
    save_custom_diffusion_file(path, state, embeddings=tokens[:2])
    token_files(path, 1)[0].write_bytes(b"stale")  # a -token file of some older save is in the way
    save_custom_diffusion_file(path, state, embeddings=tokens[2:])  # <a>, <b>'s -token1/-token2 are removed
    assert not any(p.exists() for p in token_files(path, 2))
    assert load_custom_diffusion(path).tokens == ["<c>"]
    save_custom_diffusion_file(path, state)  # no tokens now
    assert load_custom_diffusion(path).embeddings == [] and existing_token_files(path) == []


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_overwriting_three_tokens_with_one_removes_only_the_stale_token_files(tmp_path, suffix):
    """A .bin records no token count: the save owns its <stem>-tokenN files, so an overwrite removes the
    ones it does not rewrite (else the loader read -token2/-token3 as tokens of the new file)."""
    state = _random_state(_unet())
    path = tmp_path / f"cd{suffix}"
    tokens = [sdadapt.Embedding(n, {"text_encoder": torch.randn(1, 32)}) for n in ("<a>", "<b>", "<c>", "<d>")]
    save_custom_diffusion_file(path, state, embeddings=tokens[:3])
    assert [p.name for p in existing_token_files(path)] == [f"cd-token{i}{suffix}" for i in (1, 2, 3)]
    # neighbours that are not this save's token files: other stems, other suffixes, other spellings
    others = [f"cd-token{'.safetensors' if suffix == '.bin' else '.bin'}", f"cd-token01{suffix}", f"cd-tokens{suffix}",
              f"cd2-token1{suffix}", f"xcd-token2{suffix}", f"cd-token2{suffix}.txt", f"<new1>{suffix}", "cd-token3.png"]
    for name in others:
        (tmp_path / name).write_bytes(b"not mine")
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in others}
    with pytest.raises(OutputExistsError):
        save_custom_diffusion_file(path, state, embeddings=tokens[3:], overwrite=False)
    save_custom_diffusion_file(path, state, embeddings=tokens[3:])
    assert load_custom_diffusion(path).tokens == ["<d>"]
    assert [p.name for p in existing_token_files(path)] == [f"cd-token{suffix}"]
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in others} == before  # untouched
    save_custom_diffusion_file(path, state, embeddings=tokens[:2])  # 1 -> 2: the single -token file goes
    assert load_custom_diffusion(path).tokens == ["<a>", "<b>"]
    assert [p.name for p in existing_token_files(path)] == [f"cd-token1{suffix}", f"cd-token2{suffix}"]
    # a fresh name beside orphaned token files: refused without overwrite, cleaned with it
    fresh = tmp_path / f"new{suffix}"
    orphan = tmp_path / f"new-token5{suffix}"
    orphan.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"new-token5.*overwrite"):
        save_custom_diffusion_file(fresh, state, embeddings=tokens[:1], overwrite=False)
    assert not fresh.exists()


def test_a_bin_without_token_metadata_reads_its_token_files_up_to_the_first_gap(tmp_path):
    """Files another writer (or an older sdadapt) left: -token alone is the one token; else -token1,
    -token2 ... until a number is missing."""
    state = _random_state(_unet())
    path = tmp_path / "cd.bin"
    save_custom_diffusion_file(path, state)
    for i, name in ((1, "<a>"), (2, "<b>"), (4, "<stale>")):
        torch.save({name: torch.randn(32)}, tmp_path / f"cd-token{i}.bin")
    assert load_custom_diffusion(path).tokens == ["<a>", "<b>"]
    torch.save({"<one>": torch.randn(32)}, tmp_path / "cd-token.bin")
    assert load_custom_diffusion(path).tokens == ["<one>"]


def test_bin_holds_diffusers_empty_attn1_entries(tmp_path):
    state = _random_state(_unet())
    path = tmp_path / "pytorch_custom_diffusion_weights.bin"
    save_custom_diffusion_file(path, state)
    raw = torch.load(path, weights_only=True)
    empties = sorted(k for k, v in raw.items() if isinstance(v, dict))
    assert empties and all(k.endswith("attn1.processor") and raw[k] == {} for k in empties)
    assert len(empties) == len({split_file_key(k)[0] for k in state})


# ------------------------------------------------------------------------------ interop with diffusers
@pytest.mark.parametrize("train_q_out,suffix", [(False, ".safetensors"), (True, ".bin")])
def test_a_file_diffusers_writes_applies_with_its_processors_output(tmp_path, train_q_out, suffix):
    unet = tiny_unet_sd1()
    state = _random_state(unet, train_q_out=train_q_out)
    _set_processors(unet, state, train_q_out=train_q_out)
    inputs = unet_inputs(unet)
    expected = run_unet(unet, inputs)
    unet.save_attn_procs(tmp_path, weight_name=f"pytorch_custom_diffusion_weights{suffix}",
                         safe_serialization=suffix == ".safetensors")
    fresh = tiny_unet_sd1()
    base = run_unet(fresh, inputs)
    handle = sdadapt.apply_custom_diffusion(fresh, tmp_path)  # the folder
    got = run_unet(fresh, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3
    handle.remove()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_file_sdadapt_writes_loads_into_diffusers_processors(tmp_path, suffix):
    from diffusers.models.model_loading_utils import load_state_dict

    unet = tiny_unet_sd1()
    handle = sdadapt.apply_custom_diffusion(unet, _random_state(unet, train_q_out=True))
    inputs = unet_inputs(unet)
    expected = run_unet(unet, inputs)
    path = tmp_path / f"pytorch_custom_diffusion_weights{suffix}"
    sdadapt.save_custom_diffusion(path, handle)
    fresh = tiny_unet_sd1()
    # what load_attn_procs does through a pipeline: diffusers' reader, its processor builder, set_attn_processor
    procs = fresh._process_custom_diffusion(load_state_dict(str(path)))
    assert set(procs) == set(fresh.attn_processors)  # the attn1 placeholders make the dict complete
    fresh.set_attn_processor(procs)
    torch.testing.assert_close(run_unet(fresh, inputs), expected, atol=1e-5, rtol=1e-5)
    # the state dict diffusers' reader returns (placeholders included) applies as it is
    again = tiny_unet_sd1()
    sdadapt.apply_custom_diffusion(again, load_state_dict(str(path)))
    torch.testing.assert_close(run_unet(again, inputs), expected, atol=0, rtol=0)


def test_adobe_delta_bin_reads_with_its_modifier_token(tmp_path):
    unet = _unet()
    state = _random_state(unet)
    delta = {"unet": {f"{split_file_key(k)[0]}.{split_file_key(k)[1]}": v for k, v in state.items()},
             "modifier_token": {"<new1>": torch.randn(32)}}
    torch.save(delta, tmp_path / "delta.bin")
    loaded = load_custom_diffusion(tmp_path / "delta.bin")
    assert set(loaded.weights) == set(state) and all(torch.equal(loaded.weights[k], v) for k, v in state.items())
    assert loaded.tokens == ["<new1>"]
    torch.testing.assert_close(loaded.embeddings[0].vectors["text_encoder"][0], delta["modifier_token"]["<new1>"])


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    from hostile_files import evil_pickles

    marker = tmp_path / "ran"
    folder = tmp_path / "cd"
    files = evil_pickles(tmp_path / "evil", marker)
    folder.mkdir()
    (folder / "pytorch_custom_diffusion_weights.bin").write_bytes(files["nested"].read_bytes())
    with pytest.raises(sdadapt.errors.UnsafeFileError):
        sdadapt.apply_custom_diffusion(_unet(), folder)
    assert not marker.exists()


def test_diffusers_training_output_folder_reads_with_its_token_file(tmp_path):
    unet = tiny_unet_sd1()
    state = _random_state(unet)
    _set_processors(unet, state, train_q_out=False)
    unet.save_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", safe_serialization=False)
    vector = torch.randn(32)
    torch.save({"<new1>": vector}, tmp_path / "<new1>.bin")  # what train_custom_diffusion.py writes beside it
    loaded = load_custom_diffusion(tmp_path)
    assert set(loaded.weights) == set(state) and loaded.tokens == ["<new1>"]
    torch.testing.assert_close(loaded.embeddings[0].vectors["text_encoder"][0], vector)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_a_save_named_like_a_token_file_is_another_save_not_a_stale_token(tmp_path, suffix):
    """``cd-token`` / ``cd-token3`` holding Custom Diffusion weights are the weights files of saves named so:
    saving ``cd`` (two tokens: -token1, -token2) must neither refuse, delete nor read them as its tokens."""
    state = _random_state(_unet())
    tokens = [sdadapt.Embedding(n, {"text_encoder": torch.randn(1, 32)}) for n in ("<a>", "<b>", "<c>")]
    others = [tmp_path / f"cd-token{suffix}", tmp_path / f"cd-token3{suffix}"]
    for other in others:
        save_custom_diffusion_file(other, state, embeddings=tokens[2:])
    path = tmp_path / f"cd{suffix}"
    assert existing_token_files(path) == []
    save_custom_diffusion_file(path, state, embeddings=tokens[:2], overwrite=False)  # nothing of cd's in the way
    save_custom_diffusion_file(path, state, embeddings=tokens[:2], overwrite=True)
    assert load_custom_diffusion(path).tokens == ["<a>", "<b>"]
    for other in others:
        assert load_custom_diffusion(other).tokens == ["<c>"]  # still there, with its own token file
    # a token file whose token merely contains the words is a token file (removed as stale)
    odd = [sdadapt.Embedding("<custom_diffusion>", {"text_encoder": torch.randn(1, 32)})]
    save_custom_diffusion_file(tmp_path / f"x{suffix}", state, embeddings=odd + tokens[:1])
    save_custom_diffusion_file(tmp_path / f"x{suffix}", state, embeddings=tokens[:1])
    assert not (tmp_path / f"x-token1{suffix}").exists() and not (tmp_path / f"x-token2{suffix}").exists()
    assert load_custom_diffusion(tmp_path / f"x{suffix}").tokens == ["<a>"]


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_a_token_file_never_replaces_the_weights_of_a_save_named_like_it(tmp_path, suffix):
    """Saving ``cd`` with one token writes ``cd-token``: where that is another save's weights file it is
    refused even with ``overwrite`` (before, the token file silently replaced those weights)."""
    state = _random_state(_unet())
    other = tmp_path / f"cd-token{suffix}"
    save_custom_diffusion_file(other, state, embeddings=[sdadapt.Embedding("<c>", {"text_encoder": torch.randn(1, 32)})])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    token = [sdadapt.Embedding("<a>", {"text_encoder": torch.randn(1, 32)})]
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="another save"):
            save_custom_diffusion_file(tmp_path / f"cd{suffix}", state, embeddings=token, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_custom_diffusion(other).tokens == ["<c>"]
