"""merge-lora's memory and copies: the bake keeps the file's dtype and moves no bit.

* ``lora_delta_weight`` scales the product in place (one allocation): bit-identical to HEAD's
  ``(up @ down) * scale`` (transcribed in ``tests/merge_lora_head.py``) over shapes, Tucker cores, float32/float16/bfloat16 and
  every kind of scale; gradients too.
* ``adapter_working_copy``: the copy holds ``module.to(dtype)``'s values bit for bit, the module is
  left as it was (dtype, storage, values).
* ``checks.nonfinite_scan`` / ``cast_checked(extremes=...)``: one ``aminmax`` per merged tensor (HEAD:
  three), the same overflow and NaN/inf decisions as HEAD's ``cast_checked`` (transcribed).
* The bake (LoRA, Tucker LoCon, LoHa, LoKr, full with ``diff_b``, DoRA; files in float16, bfloat16 and
  float32; checkpoint tensors in float16, bfloat16, float32 and float64; output in each tensor's dtype
  and in float16): every written tensor is bit-identical to 8eb03ad's bake (its ``get``, module moves
  in place, ``has_nonfinite`` + ``cast_checked`` and ``lora_delta_weight``: ``tests/merge_lora_head.py``), and after
  it every module still holds the file's dtype (HEAD's held float32: twice an fp16 file's size).
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("diffusers")

from merge_lora_head import HeadBake, head_cast_checked, head_lora_delta_weight, head_patched  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import tiny_unet_sd1  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.adapters import DoRAConfig, FullConfig, LoHaConfig, LoKrConfig, LoRAConfig  # noqa: E402
from sdadapt.adapters.base import LayerGeometry  # noqa: E402
from sdadapt.adapters.lora import lora_delta_weight  # noqa: E402
from sdadapt.adapters.registry import (  # noqa: E402
    adapter_from_file_tensors,
    adapter_layer_delta,
    adapter_working_copy,
    build_adapter,
)
from sdadapt.checks import cast_checked, nonfinite_scan  # noqa: E402
from sdadapt.errors import NonFiniteError  # noqa: E402
from sdadapt.formats import load_lora, save_lora  # noqa: E402
from sdadapt.formats.model_keys import diffusers_to_ldm  # noqa: E402
from sdadapt.loratools.bake import BakedCheckpoint  # noqa: E402
from sdadapt.merge.engine import write_source  # noqa: E402
from sdadapt.targets import by_regex, by_type  # noqa: E402

INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(_bits(got), _bits(want)), f"{what}: not bit-identical"


# ------------------------------------------------------------------------- lora_delta_weight
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 96), in_features=st.integers(1, 96), rank=st.integers(1, 12),
    kernel=st.sampled_from([(), (1, 1), (3, 3), (2, 3)]), dtype=st.sampled_from(FLOATS),
    scale_kind=st.sampled_from(["float", "tensor32", "tensor-own", "tensor64", "one"]),
    scale=st.floats(-1e3, 1e3, allow_nan=False).filter(lambda s: s != 0), tucker=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lora_delta_weight_is_heads_product_then_scale_bit_for_bit(
    out_features, in_features, rank, kernel, dtype, scale_kind, scale, tucker, seed
):
    g = torch.Generator().manual_seed(seed)
    tucker = tucker and len(kernel) == 2
    up = torch.randn(out_features, rank, *([1] * len(kernel)), generator=g).to(dtype)
    down = torch.randn(rank, in_features, *((1, 1) if tucker else kernel), generator=g).to(dtype)
    mid = torch.randn(rank, rank, *kernel, generator=g).to(dtype) if tucker else None
    scale_value = {
        "float": scale, "one": 1.0, "tensor32": torch.tensor(scale), "tensor-own": torch.tensor(scale, dtype=dtype),
        "tensor64": torch.tensor(scale, dtype=torch.float64),
    }[scale_kind]
    got = lora_delta_weight(up, down, scale_value, mid=mid)
    assert_bit_identical(got, head_lora_delta_weight(up, down, scale_value, mid=mid), f"{dtype} {scale_kind}")


def _run(fn, up, down, scale, *, grad: bool):
    """``fn``'s result and, with ``grad``, the gradients of Σ result² for up, down (and a tensor scale)."""
    leaves = [up.clone().requires_grad_(grad), down.clone().requires_grad_(grad)]
    if isinstance(scale, torch.Tensor):
        leaves.append(scale.clone().requires_grad_(grad))
    result = fn(leaves[0], leaves[1], leaves[2] if len(leaves) == 3 else scale)
    if not grad:
        return [result]
    (result.double() ** 2).sum().backward()
    return [result.detach()] + [leaf.grad for leaf in leaves]


def test_lora_delta_weight_odd_scales_and_gradients_as_head():
    """A scale that needs a gradient (autograd must see the product's old value), a 1-element 1-D float32
    scale on a float16 product (promotes to float32) and a float64 0-dim one: HEAD's results, dtypes and
    gradients."""
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(9, 3, generator=g), torch.randn(3, 7, generator=g)
    for scale in (torch.tensor(0.3), torch.tensor([0.3]), torch.tensor(0.3, dtype=torch.float64), 0.3):
        for dtype, grad in ((torch.float32, True), (torch.float16, False), (torch.bfloat16, False)):
            got = _run(lora_delta_weight, up.to(dtype), down.to(dtype), scale, grad=grad)
            want = _run(head_lora_delta_weight, up.to(dtype), down.to(dtype), scale, grad=grad)
            assert len(got) == len(want)
            for index, (a, b) in enumerate(zip(got, want)):
                assert_bit_identical(a, b, f"{dtype} scale {scale!r}, output {index} (0: ΔW, then gradients)")


# ---------------------------------------------------------------------- adapter_working_copy
def _fp16_modules():
    """Adapter modules of every bake family built from random float16 file tensors (as merge-lora builds them)."""
    g = torch.Generator().manual_seed(0)
    cases = [(LoRAConfig(rank=3, alpha=2.0), (10, 12)), (LoRAConfig(rank=2, use_tucker=True), (8, 6, 3, 3)),
             (LoHaConfig(rank=2, alpha=1.0), (8, 6, 3, 3)), (LoKrConfig(rank=2, factor=2), (10, 12)),
             (FullConfig(), (8, 6, 3, 3)), (DoRAConfig(LoRAConfig(rank=2)), (10, 12))]
    out = []
    for config, shape in cases:
        geometry = LayerGeometry.from_weight_shape(shape, has_bias=True)
        tensors = {k: (torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k == "alpha" else 0.0)).half()
                   for k, v in build_adapter(config, geometry).file_tensors().items()}
        out.append((type(config).__name__, adapter_from_file_tensors(geometry, tensors, name="t")))
    return out


def test_working_copy_is_module_to_dtype_and_leaves_the_module_alone():
    for name, module in _fp16_modules():
        before = {k: (t.dtype, t.data_ptr(), t.clone()) for k, t in (*module.named_parameters(), *module.named_buffers())}
        assert any(t.dtype == torch.float16 for t in module.parameters()), name
        for dtype in (torch.float32, torch.float64):
            work = adapter_working_copy(module, dtype)
            want = copy.deepcopy(module).to(dtype)
            got_tensors = dict((*work.named_parameters(), *work.named_buffers()))
            for key, tensor in (*want.named_parameters(), *want.named_buffers()):
                assert_bit_identical(got_tensors[key], tensor, f"{name} {key}")
                assert isinstance(got_tensors[key], nn.Parameter) == isinstance(tensor, nn.Parameter), key
            delta, _ = adapter_layer_delta(work, base_weight=torch.randn(module.geometry.weight_shape, dtype=dtype),
                                           scale=0.7, dtype=dtype)
            assert delta.dtype == dtype
        for key, tensor in (*module.named_parameters(), *module.named_buffers()):
            dtype, pointer, value = before[key]
            assert tensor.dtype == dtype and tensor.data_ptr() == pointer, f"{name} {key} was moved"
            assert torch.equal(tensor, value), f"{name} {key} was changed (set_multiplier on a shared buffer?)"


# ------------------------------------------------------------------ cast_checked / one aminmax
@pytest.mark.parametrize("values, dtype", [
    ([1.0, -2.0, 3.0], torch.float16), ([1e6, 0.0], torch.float16), ([-7e4, 1.0], torch.float16),
    ([float("nan"), 1e5], torch.float16), ([float("inf"), 1.0], torch.float16), ([float("nan")] * 3, torch.float16),
    ([3e38, 1.0], torch.bfloat16), ([1e300, 1.0], torch.float32), ([65504.0, -65504.0], torch.float16),
])
def test_cast_checked_with_the_scans_range_decides_as_head(values, dtype):
    for source in (torch.float32, torch.float64):
        value = torch.tensor(values, dtype=torch.float64).to(source)
        outcomes = []
        for fn in (lambda: head_cast_checked(value, dtype, key="k"),
                   lambda: cast_checked(value, dtype, key="k"),
                   lambda: cast_checked(value, dtype, key="k", extremes=nonfinite_scan(value)[1])):
            try:
                outcomes.append(fn())
            except NonFiniteError as exc:
                outcomes.append(str(exc).split(" overflows")[0])
        for got in outcomes[1:]:
            if isinstance(outcomes[0], str):
                assert isinstance(got, str) and got == outcomes[0], (values, dtype, outcomes)
            else:
                assert isinstance(got, torch.Tensor) and torch.equal(_bits(got), _bits(outcomes[0])), (values, dtype)


def test_nonfinite_scan_is_has_nonfinite_and_the_range():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for values in ([1.0, -3.0, 2.0], [1.0, float("nan")], [float("-inf"), 0.0]):
            t = torch.tensor(values, dtype=dtype)
            nonfinite, extremes = nonfinite_scan(t)
            assert nonfinite == (not bool(torch.isfinite(t).all()))
            if not nonfinite:
                assert extremes == (float(t.min()), float(t.max()))
    assert nonfinite_scan(torch.arange(4)) == (False, None)
    assert nonfinite_scan(torch.empty(0)) == (False, None)
    assert nonfinite_scan(torch.tensor([1 + 1j, complex("nan")])) == (True, None)


# ------------------------------------------------------------------------------------ the bake
SOME_LAYERS = by_regex(
    r"(attn1\.to_q|attn2\.to_v|ff\.net\.0\.proj|proj_in|resnets\.0\.conv1|conv_shortcut|time_emb_proj|"
    r"downsamplers\.0\.conv)$"
) & by_type(nn.Linear, nn.Conv2d)
FAMILIES = {
    "lora": LoRAConfig(rank=3, alpha=2.0),
    "tucker": LoRAConfig(rank=2, alpha=1.0, use_tucker=True),
    "loha": LoHaConfig(rank=2, alpha=1.0),
    "lokr": LoKrConfig(rank=2, alpha=1.0, factor=4),
    "full": FullConfig(train_bias=True),
    "dora": DoRAConfig(LoRAConfig(rank=2, alpha=1.0)),
}
FILE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CKPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture(scope="module")
def bake_inputs(tmp_path_factory):
    """A tiny SD1 LDM checkpoint whose tensors cycle through float16/bfloat16/float32/float64, and one file per
    family and file dtype (random non-zero weights, DoRA's magnitude off ‖W‖)."""
    folder = tmp_path_factory.mktemp("mergemem")
    unet = tiny_unet_sd1()
    flat = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    state = diffusers_to_ldm(flat, architecture="sd1")
    state = {k: v.to(CKPT_DTYPES[i % len(CKPT_DTYPES)]).contiguous() for i, (k, v) in enumerate(sorted(state.items()))}
    ckpt = folder / "base.safetensors"
    save_file(state, str(ckpt))
    files = {}
    for index, (family, config) in enumerate(FAMILIES.items()):
        model = tiny_unet_sd1()
        handle = sdadapt.inject(model, SOME_LAYERS, config)
        g = torch.Generator().manual_seed(50 + index)
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for tag, dtype in FILE_DTYPES.items():
            files[family, tag] = folder / f"{family}-{tag}.safetensors"
            save_lora(files[family, tag], {"unet": handle.state_dict()}, base_model="sd1", dtype=dtype)
    return ckpt, files


def _bake(cls, ckpt, loras, out, **kwargs):
    with cls(ckpt, loras, **kwargs) as baked:
        write_source(out, baked, overwrite=True)
        modules = [e.module for entries in baked._plan.values() for e in entries]
        modules += [e.module for entries in baked._bias_plan.values() for e in entries]
    return load_file(str(out)), modules


@pytest.mark.parametrize("tag", list(FILE_DTYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bake_is_heads_bit_for_bit_and_keeps_the_files_dtype(bake_inputs, family, tag, tmp_path, monkeypatch):
    ckpt, files = bake_inputs
    path = files[family, tag]
    file_dtype = FILE_DTYPES[tag]
    assert {v.dtype for v in load_lora(path)[0]["unet"].values() if v.dim() > 0} == {file_dtype}
    for dtype in (None, torch.float16):
        new, modules = _bake(BakedCheckpoint, ckpt, [path], tmp_path / "new.safetensors", strengths=0.7, dtype=dtype)
        with head_patched():  # HEAD's product-then-copy inside LoRAModule.delta_weight
            head, head_modules = _bake(HeadBake, ckpt, [path], tmp_path / "head.safetensors", strengths=0.7, dtype=dtype)
        assert list(new) == list(head)
        for key in head:
            assert_bit_identical(new[key], head[key], f"{family} {tag} -> {dtype}: {key}")
        base = load_file(str(ckpt))
        changed = sum(not torch.equal(new[k].to(base[k].dtype), base[k]) for k in base)
        assert changed >= 6, "the file changed (almost) nothing: the comparison would prove little"
        # memory: every module still holds the file's dtype (HEAD's hold float32 after the bake)
        def held(mods):
            return {p.dtype for m in mods for p in m.parameters() if p.dim() > 0}
        assert held(modules) == {file_dtype}, f"{family} {tag}: modules moved to {held(modules)}"
        if file_dtype != torch.float32:
            assert torch.float32 in held(head_modules), "HEAD's bake should hold float32 modules (the transcription?)"


def test_bake_finds_nonfinite_and_overflow_with_one_aminmax_per_tensor(bake_inputs, tmp_path, monkeypatch):
    """HEAD: ``has_nonfinite`` (one aminmax), then ``cast_checked``'s ``has_nonfinite`` and ``aminmax`` (two more)."""
    ckpt, files = bake_inputs
    path = files["full", "fp32"]
    with BakedCheckpoint(ckpt, [path], strengths=0.5, dtype=torch.float16) as baked, \
            HeadBake(ckpt, [path], strengths=0.5, dtype=torch.float16) as head:
        wide = [k for k in baked.keys() if baked._source.dtype(k) in (torch.float32, torch.float64)]
        touched = next(k for k in wide if k in baked._plan)
        untouched = next(k for k in wide if k not in baked._plan and k not in baked._bias_plan)
        want = {key: head.get(key) for key in (touched, untouched)}
        calls = []
        real = torch.aminmax
        monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
        for key in (touched, untouched):
            calls.clear()
            assert_bit_identical(baked.get(key), want[key], key)
            assert len(calls) == 1, f"{key}: {len(calls)} aminmax passes (HEAD: 3 on a merged tensor)"
    # the one pass still refuses an overflow of the output dtype (float32 merge, float16 out)
    with BakedCheckpoint(ckpt, [path], strengths=100.0, dtype=torch.float16) as baked:
        with torch.no_grad():
            for entries in baked._plan.values():
                for entry in entries:
                    for p in entry.module.parameters():
                        p.mul_(1e4)
        with pytest.raises(NonFiniteError, match="overflows float16"):
            write_source(tmp_path / "x.safetensors", baked, overwrite=True)


def test_load_lora_tells_the_kind_from_the_header_and_reads_the_file_once(bake_inputs, monkeypatch):
    """8eb03ad held the whole file it read to tell the kind while ``load_kohya`` read it again: two copies of a
    1.6 GiB full-delta file at once (the bake's peak); later the first read was let go, but the file was still
    read twice. A safetensors file's kind now comes from its header: no tensor is read before the loader's."""
    import sdadapt.formats as formats

    _, files = bake_inputs
    first: list[weakref.ref] = []
    real_read, real_kohya = formats.read_weights, formats.load_kohya

    def read(path):
        state, metadata = real_read(path)
        first.extend(weakref.ref(t) for t in state.values())
        return state, metadata

    def kohya(path, **options):
        assert not first, f"{len(first)} tensors were read to tell the kind"
        return real_kohya(path, **options)

    monkeypatch.setattr(formats, "read_weights", read)
    monkeypatch.setattr(formats, "load_kohya", kohya)
    components, _ = formats.load_lora(files["full", "fp16"])
    assert components["unet"]
