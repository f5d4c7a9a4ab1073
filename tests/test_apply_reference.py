"""apply_lora (``generate --lora FILE:S``, ``<lora:NAME:S>``) against the two big inference consumers.

For every family of file ``sdadapt.apply_lora`` reads, the weight it leaves is compared with a float64
transcription, written here, of what AUTOMATIC1111's built-in Lora extension and ComfyUI compute from the same
file tensors at the same strength:

* A1111 (AUTOMATIC1111/stable-diffusion-webui ``extensions-builtin/Lora``): ``network.py`` ``NetworkModule``
  (``calc_scale``, ``finalize_updown``, ``apply_weight_decompose``; v1.10 form, stored copy id 19574690607;
  without DoRA at f2844bd0), ``network_lora.py`` @1b7f4308, ``network_hada.py`` @255da37d, ``network_lokr.py``
  @17e14ed2, ``network_ia3.py`` @108f5c73, ``network_full.py`` (``diff_b`` form, stored copy id 823145237),
  ``network_norm.py`` @255da37d, ``lyco_helpers.py`` @255da37d, ``extra_networks_lora.py`` (v1.10 form, stored
  copy id 315484557).
* ComfyUI (comfyanonymous/ComfyUI ``comfy/weight_adapter``): ``base.py`` ``weight_decompose`` (@14c20852: input
  axis only; the current form with ``wd_on_output_axis``, stored copy id 989336144), ``lora.py`` @0323d874,
  ``loha.py`` @17adbb5c, ``lokr.py`` @179c2d35, ``glora.py`` @17adbb5c, ``oft.py`` @3684cff3, ``boft.py``
  @204e96f2; ``comfy/lora.py`` ``load_lora`` (``alpha`` read with ``.item()``, ``w_norm``/``b_norm``/``diff``/
  ``diff_b`` as ``("diff", ...)`` patches: ``W += s · diff``).

Where the two disagree the test says which one sdadapt follows (and docs/lycoris.md / docs/lora.md say why).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdadapt.apply import apply_lora
from sdadapt.prompt_schedule import extra_network_tags, lora_multipliers

F64 = torch.float64


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "linear": lambda: nn.Linear(8, 6),
        "linear8": lambda: nn.Linear(8, 8),
        "conv3": lambda: nn.Conv2d(4, 6, 3, padding=1),
        "conv1": lambda: nn.Conv2d(4, 6, 1),
        "group": lambda: nn.GroupNorm(2, 6),
        "layer": lambda: nn.LayerNorm(6),
    }[kind]()
    layer = layer.to(F64)
    with torch.no_grad():  # a norm layer's affine starts at ones/zeros: make it generic
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def _apply(kind: str, tensors: dict[str, torch.Tensor], strength: float) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                 torch.Tensor, torch.Tensor | None]:
    """(W, b) before and (W', b') after ``apply_lora`` of one layer's ``tensors`` at ``strength``."""
    model = nn.ModuleDict({"layer": _layer(kind)})
    w0 = model["layer"].weight.detach().clone()
    b0 = None if model["layer"].bias is None else model["layer"].bias.detach().clone()
    apply_lora(model, {f"layer.{k}": v for k, v in tensors.items()}, scale=strength)
    b1 = None if model["layer"].bias is None else model["layer"].bias.detach().clone()
    return w0, b0, model["layer"].weight.detach().clone(), b1


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- A1111: extensions-builtin/Lora (float64 transcriptions) -----------------------------------------------------

def a1111_calc_scale(alpha: float | None, dim: int | None) -> float:
    """network.py ``NetworkModule.calc_scale`` (no ``scale`` key here)."""
    if dim is not None and alpha is not None:
        return alpha / dim
    return 1.0


def a1111_weight_decompose(updown: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """network.py ``apply_weight_decompose``: always the INPUT axis (one norm per input column)."""
    merged = updown + orig
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale / norm) - orig


def a1111_finalize(updown, orig, *, dim, alpha, mult, dora_scale=None, ex_bias=None):
    """network.py ``finalize_updown`` (v1.10): ``updown · calc_scale`` -> DoRA -> ``· multiplier``; the
    extra bias only ``· multiplier``."""
    updown = updown.reshape(orig.shape)
    if ex_bias is not None:
        ex_bias = ex_bias * mult
    updown = updown * a1111_calc_scale(alpha, dim)
    if dora_scale is not None:
        updown = a1111_weight_decompose(updown, orig, dora_scale)
    return updown * mult, ex_bias


def a1111_make_weight_cp(t, wa, wb):
    """lyco_helpers.py ``make_weight_cp``."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def a1111_updown(w: dict[str, torch.Tensor], orig: torch.Tensor, mult: float):
    """``calc_updown`` of the module type A1111 picks for ``w`` (network_lora / _hada / _lokr / _ia3 / _full /
    _norm), then ``finalize_updown``. Returns ``(ΔW, Δb)``."""
    alpha = w["alpha"].item() if "alpha" in w else None
    dora = w.get("dora_scale")
    if "lora_up.weight" in w:  # network_lora.py
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        if "lora_mid.weight" in w:  # lyco_helpers.rebuild_cp_decomposition
            updown = torch.einsum("n m k l, i n, m j -> i j k l", w["lora_mid.weight"], up.reshape(up.shape[0], -1),
                                  down.reshape(down.shape[0], -1))
        else:  # lyco_helpers.rebuild_conventional
            updown = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return a1111_finalize(updown, orig, dim=dim, alpha=alpha, mult=mult, dora_scale=dora)
    if "hada_w1_a" in w:  # network_hada.py
        dim = w["hada_w1_b"].shape[0]
        if "hada_t1" in w:
            u1 = a1111_make_weight_cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
            u2 = a1111_make_weight_cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
        else:
            u1, u2 = w["hada_w1_a"] @ w["hada_w1_b"], w["hada_w2_a"] @ w["hada_w2_b"]
        return a1111_finalize(u1 * u2, orig, dim=dim, alpha=alpha, mult=mult, dora_scale=dora)
    if any(k.startswith("lokr_") for k in w):  # network_lokr.py
        dim = None
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else dim
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" not in w:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        else:
            w2 = a1111_make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        if w2.dim() == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(orig.shape)
        return a1111_finalize(updown, orig, dim=dim, alpha=alpha, mult=mult, dora_scale=dora)
    if "on_input" in w:  # network_ia3.py (Linear)
        vec = w["weight"]
        updown = orig * (vec if w["on_input"].item() else vec.reshape(-1, 1))
        return a1111_finalize(updown, orig, dim=None, alpha=alpha, mult=mult)
    if "diff" in w:  # network_full.py (diff_b form)
        return a1111_finalize(w["diff"], orig, dim=None, alpha=alpha, mult=mult, ex_bias=w.get("diff_b"))
    if "w_norm" in w:  # network_norm.py
        return a1111_finalize(w["w_norm"], orig, dim=None, alpha=alpha, mult=mult, ex_bias=w.get("b_norm"))
    raise AssertionError(sorted(w))


# ---- ComfyUI: comfy/weight_adapter (float64 transcriptions) ------------------------------------------------------

def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """base.py ``weight_decompose`` (current form; ``function`` the identity): the axis from ``dora_scale``'s
    first dimension; the OUTPUT-axis branch normalises by ``‖W‖``, not ``‖W + ΔW‖``; ``+ eps``."""
    weight = weight.clone()
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def comfy_weight(w: dict[str, torch.Tensor], weight: torch.Tensor, strength: float) -> torch.Tensor:
    """``calculate_weight`` of the adapter ComfyUI's ``load_lora`` picks for ``w``: the patched weight."""
    weight = weight.clone()
    alpha_value = w["alpha"].item() if "alpha" in w else None
    dora = w.get("dora_scale")

    def finish(lora_diff, alpha):
        if dora is not None:
            return comfy_weight_decompose(dora, weight, lora_diff.reshape(weight.shape), alpha, strength)
        return weight + (strength * alpha) * lora_diff.reshape(weight.shape)

    if "lora_up.weight" in w:  # lora.py
        mat1, mat2 = w["lora_up.weight"], w["lora_down.weight"]
        alpha = alpha_value / mat2.shape[0] if alpha_value is not None else 1.0
        if "lora_mid.weight" in w:
            mat3 = w["lora_mid.weight"]
            final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
            mat2 = (torch.mm(mat2.transpose(0, 1).flatten(start_dim=1), mat3.transpose(0, 1).flatten(start_dim=1))
                    .reshape(final_shape).transpose(0, 1))
        return finish(torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)), alpha)
    if "hada_w1_a" in w:  # loha.py
        alpha = alpha_value / w["hada_w1_b"].shape[0] if alpha_value is not None else 1.0
        if "hada_t1" in w:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t1"], w["hada_w1_b"], w["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t2"], w["hada_w2_b"], w["hada_w2_a"])
        else:
            m1, m2 = torch.mm(w["hada_w1_a"], w["hada_w1_b"]), torch.mm(w["hada_w2_a"], w["hada_w2_b"])
        return finish(m1 * m2, alpha)
    if any(k.startswith("lokr_") for k in w):  # lokr.py
        dim = None
        if "lokr_w1" in w:
            w1 = w["lokr_w1"]
        else:
            dim = w["lokr_w1_b"].shape[0]
            w1 = torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        else:
            dim = w["lokr_w2_b"].shape[0]
            w2 = (torch.mm(w["lokr_w2_a"], w["lokr_w2_b"]) if "lokr_t2" not in w else
                  torch.einsum("i j k l, j r, i p -> p r k l", w["lokr_t2"], w["lokr_w2_b"], w["lokr_w2_a"]))
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        return finish(torch.kron(w1, w2.contiguous()), alpha)  # (.contiguous(): torch's kron of an einsum view)
    if "a1.weight" in w:  # glora.py, the current (not "old_glora") layout
        a1, a2 = w["a1.weight"].flatten(start_dim=1), w["a2.weight"].flatten(start_dim=1)
        b1, b2 = w["b1.weight"].flatten(start_dim=1), w["b2.weight"].flatten(start_dim=1)
        alpha = alpha_value / w["a2.weight"].shape[0] if alpha_value is not None else 1.0
        if weight.dim() > 2:
            lora_diff = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", weight, a1), a2)
        else:
            lora_diff = torch.mm(torch.mm(weight, a1), a2)
        return finish(lora_diff.reshape(weight.shape) + torch.mm(b1, b2).reshape(weight.shape), alpha)
    if "oft_blocks" in w and w["oft_blocks"].dim() == 3:  # oft.py (alpha 0: no constraint; rescale not read)
        blocks = w["oft_blocks"]
        n, b, _ = blocks.shape
        eye = torch.eye(b, dtype=F64)
        q = blocks - blocks.transpose(1, 2)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        lora_diff = torch.einsum("k n m, k n ... -> k m ...", r * strength - strength * eye,
                                 weight.view(n, b, *weight.shape[1:])).view(-1, *weight.shape[1:])
        return weight + strength * lora_diff
    if "oft_blocks" in w:  # boft.py (alpha 0: no constraint)
        blocks = w["oft_blocks"]
        boft_m, _, boft_b, _ = blocks.shape
        eye = torch.eye(boft_b, dtype=F64)
        q = blocks - blocks.transpose(-1, -2)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        inp = org = weight
        r_b = boft_b // 2
        for i in range(boft_m):
            bi, g, k = r[i], 2, 2 ** i * r_b
            if strength != 1:
                bi = bi * strength + (1 - strength) * eye
            inp = inp.unflatten(0, (-1, g, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, boft_b))
            inp = torch.einsum("b i j, b j ...-> b i ...", bi, inp)
            inp = inp.flatten(0, 1).unflatten(0, (-1, k, g)).transpose(1, 2).flatten(0, 2)
        if "rescale" in w:
            inp = inp * w["rescale"]
        return weight + strength * (inp - org)
    if "diff" in w:  # comfy/lora.py: ("diff", (diff,))
        return weight + strength * w["diff"]
    if "w_norm" in w:
        return weight + strength * w["w_norm"]
    raise AssertionError(sorted(w))


def comfy_bias(w: dict[str, torch.Tensor], bias: torch.Tensor, strength: float) -> torch.Tensor:
    """comfy/lora.py: ``diff_b`` / ``b_norm`` as a ``("diff", ...)`` patch of ``<layer>.bias``."""
    extra = w.get("diff_b", w.get("b_norm"))
    return bias + strength * extra


# ---- the files (one layer's tensors) ----------------------------------------------------------------------------

def _lora(kind, *, alpha=3.0, tucker=False, rank=4):
    out_f, in_f, k = (6, 8, ()) if kind == "linear" else (6, 4, (3, 3) if kind == "conv3" else (1, 1))
    up = _rand(out_f, rank, *([1, 1] if k else []), seed=1)
    if tucker:
        w = {"lora_down.weight": _rand(rank, in_f, 1, 1, seed=2), "lora_mid.weight": _rand(rank, rank, *k, seed=3),
             "lora_up.weight": up}
    else:
        w = {"lora_down.weight": _rand(rank, in_f, *k, seed=2), "lora_up.weight": up}
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    return w


def _loha(kind, *, alpha=2.0, tucker=False, rank=3):
    out_f, in_f, k = (6, 8, ()) if kind == "linear" else (6, 4, (3, 3))
    if tucker:
        w = {"hada_w1_a": _rand(rank, out_f, seed=1), "hada_w1_b": _rand(rank, in_f, seed=2),
             "hada_w2_a": _rand(rank, out_f, seed=3), "hada_w2_b": _rand(rank, in_f, seed=4),
             "hada_t1": _rand(rank, rank, *k, seed=5), "hada_t2": _rand(rank, rank, *k, seed=6)}
    else:
        flat = in_f * (9 if k else 1)
        w = {"hada_w1_a": _rand(out_f, rank, seed=1), "hada_w1_b": _rand(rank, flat, seed=2),
             "hada_w2_a": _rand(out_f, rank, seed=3), "hada_w2_b": _rand(rank, flat, seed=4)}
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    return w


def _lokr(layout, *, alpha=3.0):
    """Linear 6x8 as (2x2)⊗(3x4); conv 6x4x3x3 as (2x2)⊗(3x2x3x3)."""
    w = {
        "w1_full+w2_lowrank": {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2_a": _rand(3, 2, seed=2),
                               "lokr_w2_b": _rand(2, 4, seed=3)},
        "both_full": {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2": _rand(3, 4, seed=2)},
        "both_lowrank": {"lokr_w1_a": _rand(2, 1, seed=1), "lokr_w1_b": _rand(1, 2, seed=2),
                         "lokr_w2_a": _rand(3, 1, seed=3), "lokr_w2_b": _rand(1, 4, seed=4)},
        "conv_full": {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2": _rand(3, 2, 3, 3, seed=2)},
        "conv_lowrank_flat": {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2_a": _rand(3, 2, seed=2),
                              "lokr_w2_b": _rand(2, 18, seed=3)},
        "conv_tucker": {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2_a": _rand(2, 3, seed=2),
                        "lokr_w2_b": _rand(2, 2, seed=3), "lokr_t2": _rand(2, 2, 3, 3, seed=4)},
    }[layout]
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    return w


_ADDITIVE = [
    ("lora linear", "linear", lambda: _lora("linear")),
    ("lora linear, no alpha", "linear", lambda: _lora("linear", alpha=None)),
    ("locon 3x3", "conv3", lambda: _lora("conv3", alpha=1.0)),
    ("locon 1x1", "conv1", lambda: _lora("conv1", alpha=2.0)),
    ("locon tucker", "conv3", lambda: _lora("conv3", alpha=5.0, tucker=True)),
    ("loha linear", "linear", lambda: _loha("linear")),
    ("loha linear, no alpha", "linear", lambda: _loha("linear", alpha=None)),
    ("loha 3x3 flattened", "conv3", lambda: _loha("conv3", alpha=1.5)),
    ("loha tucker", "conv3", lambda: _loha("conv3", alpha=4.0, tucker=True)),
    ("lokr w1 full, w2 low-rank", "linear", lambda: _lokr("w1_full+w2_lowrank")),
    ("lokr both full (alpha ignored)", "linear", lambda: _lokr("both_full", alpha=7.0)),
    ("lokr both low-rank", "linear", lambda: _lokr("both_lowrank", alpha=0.5)),
    ("lokr low-rank, no alpha", "linear", lambda: _lokr("w1_full+w2_lowrank", alpha=None)),
    ("lokr conv full", "conv3", lambda: _lokr("conv_full", alpha=2.0)),
    ("lokr conv low-rank flattened", "conv3", lambda: _lokr("conv_lowrank_flat")),
    ("lokr conv tucker", "conv3", lambda: _lokr("conv_tucker", alpha=1.0)),
]


@pytest.mark.parametrize("strength", [1.0, 0.6, -0.4])
@pytest.mark.parametrize("name,kind,make", _ADDITIVE, ids=[c[0] for c in _ADDITIVE])
def test_additive_families_apply_as_a1111_and_comfyui(name, kind, make, strength):
    """LoRA / LoCon (+ Tucker ``lora_mid``), LoHa (+ Tucker), LoKr (every factor layout): ``W + s · scale · ΔW``
    with scale = alpha / rank from ``lora_down`` / ``hada_w1_b`` / ``lokr_w2_b`` (else ``lokr_w1_b``), 1 without
    alpha or, for LoKr, with both factors full — A1111 and ComfyUI agree, and so does sdadapt."""
    w = make()
    w0, _, w1, _ = _apply(kind, w, strength)
    a1111_delta, _ = a1111_updown(w, w0, strength)
    torch.testing.assert_close(w1, w0 + a1111_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, comfy_weight(w, w0, strength), rtol=1e-12, atol=1e-12)


_DORA_INNER = [
    ("lora linear", "linear", lambda: _lora("linear")),
    ("locon 3x3", "conv3", lambda: _lora("conv3", alpha=1.0)),
    ("locon 1x1", "conv1", lambda: _lora("conv1", alpha=2.0)),
    ("loha linear", "linear", lambda: _loha("linear")),
    ("lokr linear", "linear", lambda: _lokr("w1_full+w2_lowrank")),
    ("lora, no alpha", "linear", lambda: _lora("linear", alpha=None)),
]


def _dora_scale(kind: str, *, on_out: bool, seed: int = 9) -> torch.Tensor:
    out_f, in_f = (6, 8) if kind == "linear" else (6, 4)
    ones = [] if kind == "linear" else [1, 1]
    shape = (out_f, 1, *ones) if on_out else (1, in_f, *ones)
    return _rand(*shape, seed=seed).abs() + 0.5


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name,kind,make", _DORA_INNER, ids=[c[0] for c in _DORA_INNER])
def test_dora_on_the_input_axis_applies_as_a1111_and_comfyui(name, kind, make, strength):
    """``dora_scale`` (1, in[, 1, 1]) — the only axis A1111 implements: ``W + s · (W' − W)`` with
    ``W' = m ⊙ (W + scale·ΔW) / ‖W + scale·ΔW‖`` per input column, the alpha/rank scale INSIDE the
    decomposition and the strength outside (A1111 ``finalize_updown``; ComfyUI ``weight_decompose``, whose
    ``+ eps`` on the norm is below float64 noise here)."""
    w = {**make(), "dora_scale": _dora_scale(kind, on_out=False)}
    w0, _, w1, _ = _apply(kind, w, strength)
    a1111_delta, _ = a1111_updown(w, w0, strength)
    torch.testing.assert_close(w1, w0 + a1111_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, comfy_weight(w, w0, strength), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv3"])
def test_dora_on_the_output_axis_follows_lycoris_not_comfyuis_norm_of_w(kind):
    """``dora_scale`` (out, 1[, 1, 1]) (LyCORIS since 2025-04, peft): sdadapt norms each output row of
    ``W + ΔW`` (LyCORIS, peft, the paper). ComfyUI's output-axis branch norms ``W`` instead and A1111 has no
    output axis (its input-axis formula would broadcast an (out, 1) magnitude against (1, in) norms): both
    differ, as docs/lycoris.md says."""
    w = {**_lora(kind, alpha=2.0), "dora_scale": _dora_scale(kind, on_out=True)}
    w0, _, w1, _ = _apply(kind, w, 0.7)
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    directed = w0 + (0.5 * (up.reshape(6, -1) @ down.reshape(4, -1))).reshape(w0.shape)
    norm = directed.reshape(6, -1).norm(dim=1).reshape(6, *[1] * (w0.dim() - 1))
    expected = w0 + 0.7 * (w["dora_scale"] * directed / norm - w0)
    torch.testing.assert_close(w1, expected, rtol=1e-12, atol=1e-12)
    assert (w1 - comfy_weight(w, w0, 0.7)).abs().max() > 1e-3  # ComfyUI: m ⊙ (W + ΔW) / ‖W‖


@pytest.mark.parametrize("strength", [1.0, 0.35])
@pytest.mark.parametrize("on_input", [0, 1])
def test_ia3_applies_as_a1111(on_input, strength):
    """(IA)³ ``weight`` (C,) + ``on_input``: A1111's ``network_ia3.py`` ``W ⊙ w`` along the output (or input)
    axis, scale 1, times the strength (ComfyUI has no (IA)³ adapter)."""
    w = {"weight": _rand(8 if on_input else 6, seed=4), "on_input": torch.tensor(on_input)}
    w0, b0, w1, b1 = _apply("linear", w, strength)
    a1111_delta, _ = a1111_updown(w, w0, strength)
    torch.testing.assert_close(w1, w0 + a1111_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b0, rtol=0, atol=0)  # the bias is not scaled


@pytest.mark.parametrize("strength", [1.0, -0.8])
@pytest.mark.parametrize("kind", ["linear", "conv3"])
def test_full_diff_and_diff_b_apply_as_a1111_and_comfyui(kind, strength):
    """``diff`` / ``diff_b``: ``W + s · diff``, ``b + s · diff_b`` — no alpha, no rank."""
    shape = (6, 8) if kind == "linear" else (6, 4, 3, 3)
    w = {"diff": _rand(*shape, seed=5), "diff_b": _rand(6, seed=6)}
    w0, b0, w1, b1 = _apply(kind, w, strength)
    a1111_delta, a1111_bias = a1111_updown(w, w0, strength)
    torch.testing.assert_close(w1, w0 + a1111_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b0 + a1111_bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, comfy_weight(w, w0, strength), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, comfy_bias(w, b0, strength), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_norm_offsets_apply_as_a1111_and_comfyui(kind):
    """LyCORIS norm modules ``w_norm`` / ``b_norm`` (C,): added to the norm's weight and bias times the strength."""
    w = {"w_norm": _rand(6, seed=7), "b_norm": _rand(6, seed=8)}
    w0, b0, w1, b1 = _apply(kind, w, 0.45)
    a1111_delta, a1111_bias = a1111_updown(w, w0, 0.45)
    torch.testing.assert_close(w1, w0 + a1111_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b0 + a1111_bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, comfy_weight(w, w0, 0.45), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, comfy_bias(w, b0, 0.45), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("kind,alpha", [("linear", 3.0), ("conv3", 1.0), ("conv1", None)])
def test_glora_applies_as_comfyui(kind, alpha, strength):
    """GLoRA (LyCORIS 2+ layout): ``W + s · alpha/r · (W ·ᵢ a1 a2 + b1 b2)``, r = ``a2.weight``'s rows, as
    ComfyUI's ``glora.py`` (A1111's ``network_glora.py`` computes LyCORIS 1.x's formula, which does not chain on
    these shapes)."""
    out_f, in_f, k = (6, 8, ()) if kind == "linear" else (6, 4, (3, 3) if kind == "conv3" else (1, 1))
    ones = [1, 1] if k else []
    r = 3
    w = {"a1.weight": _rand(in_f, r, *ones, seed=1), "a2.weight": _rand(r, in_f, *ones, seed=2),
         "b1.weight": _rand(out_f, r, *ones, seed=3), "b2.weight": _rand(r, in_f, *k, seed=4)}
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    w0, b0, w1, b1 = _apply(kind, w, strength)
    torch.testing.assert_close(w1, comfy_weight(w, w0, strength), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b0, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["diag", "boft"])
def test_oft_without_constraint_or_rescale_applies_as_comfyui_at_strength_1(layout):
    """``oft_blocks`` (n, b, b) / (m, n, b, b) with ``alpha`` 0 (no constraint) and no ``rescale``, at strength 1:
    ComfyUI's ``oft.py`` / ``boft.py`` give sdadapt's weight. (At other strengths ComfyUI applies the
    strength twice, and it bounds ``‖Q‖`` by ``alpha`` rather than ``alpha · out`` and skips ``rescale`` in
    ``oft.py``: docs/lycoris.md; A1111's reading is tests/test_oft.py's.)"""
    blocks = _rand(3, 2, 2, seed=3) * 0.3 if layout == "diag" else _rand(2, 4, 2, 2, seed=3) * 0.3
    w = {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
    kind = "linear" if layout == "diag" else "linear8"
    w0, _, w1, _ = _apply(kind, w, 1.0)
    torch.testing.assert_close(w1, comfy_weight(w, w0, 1.0), rtol=1e-12, atol=1e-12)
    if layout == "diag":  # at s = 0.5: sdadapt (and A1111) move W' − W by s, ComfyUI by s²
        _, _, half, _ = _apply(kind, w, 0.5)
        torch.testing.assert_close(half, w0 + 0.5 * (w1 - w0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(comfy_weight(w, w0, 0.5), w0 + 0.25 * (w1 - w0), rtol=1e-12, atol=1e-12)


def test_alpha_zero_is_read_as_alpha_equal_rank_as_kohya_and_lycoris_write_it():
    """An ``alpha`` tensor of 0: sdadapt (as kohya's and LyCORIS' loaders, ``alpha = r if alpha in (None, 0)``)
    reads scale 1; A1111 (``alpha / dim``) and ComfyUI (``alpha / rank``) give scale 0, i.e. no change. Neither
    trainer writes 0 (both store ``alpha = r`` for "no alpha"), so this is a deliberate, documented difference
    (docs/lora.md)."""
    w = _lora("linear", alpha=0.0)
    w0, _, w1, _ = _apply("linear", w, 1.0)
    without = {k: v for k, v in w.items() if k != "alpha"}
    torch.testing.assert_close(w1, comfy_weight(without, w0, 1.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comfy_weight(w, w0, 1.0), w0, rtol=0, atol=0)
    torch.testing.assert_close(w0 + a1111_updown(w, w0, 1.0)[0], w0, rtol=0, atol=0)


# ---- the <lora:...> tag's multipliers (A1111 extra_networks_lora.py, ExtraNetworkParams) -------------------------

def a1111_tag_multipliers(tag: str) -> tuple[str, float, float, int | None]:
    """modules/extra_networks.py (``<(\\w+):([^>]+)>``, items split at ``:``, ``k=v`` items named,
    ``item.split('=', 2)``) and extra_networks_lora.py ``activate``: (name, te, unet, dyn)."""
    items = tag[1:-1].split(":", 1)[1].split(":")
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    te = float(positional[1]) if len(positional) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(positional[2]) if len(positional) > 2 else te
    unet = float(named.get("unet", unet))
    dyn = int(positional[3]) if len(positional) > 3 else None
    dyn = int(named["dyn"]) if "dyn" in named else dyn
    return positional[0], te, unet, dyn


@pytest.mark.parametrize("tag", [
    "<lora:ink>", "<lora:ink:0.6>", "<lora:ink:0.6:0.3>", "<lora:ink:0.6:unet=0.2>", "<lora:ink:te=0.4>",
    "<lora:ink:te=0.4:unet=1.5>", "<lora:ink:0.7:te=0.1>", "<lyco:ink:-0.5>", "<lora:ink:1e-1:2>",
    "<lora:ink:unet=0>",
])
def test_tag_multipliers_are_a1111s(tag):
    """``<lora:NAME[:TE[:UNET]][:te=..][:unet=..]>``: the named values override the positional ones and the
    UNet's defaults to the (overridden) text encoder's, as A1111's ``activate``."""
    _, tags = extra_network_tags(f"a cat {tag}")
    name, te, unet, dyn = a1111_tag_multipliers(tag)
    assert dyn is None
    assert lora_multipliers(tags[0]) == (name, te, unet)


@pytest.mark.parametrize("tag", ["<lora:ink:1:0.5:8>", "<lora:ink:0.5:dyn=8>", "<lora:ink:0.5:0.2:3:dyn=8>"])
def test_tag_dyn_is_accepted_as_a1111(tag):
    """A1111's ``dyn`` (4th positional or ``dyn=``) keeps the first ``dyn`` ranks with the full-rank alpha/dim
    scale. ``lora_multipliers`` accepts every tag A1111 does (it is ``lora_tag_arguments``' first three: one
    parser) and gives A1111's multipliers; the dyn is ``lora_tag_arguments``' (tests/test_dylora_features.py)."""
    from sdadapt.prompt_schedule import lora_tag_arguments

    _, tags = extra_network_tags(tag)
    name, te, unet, dyn = a1111_tag_multipliers(tag)
    assert dyn == 8
    assert lora_multipliers(tags[0]) == (name, te, unet)
    assert lora_tag_arguments(tags[0]) == (name, te, unet, dyn)
