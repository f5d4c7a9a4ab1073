"""Custom Diffusion's closed-form multi-concept merge: the constrained least-squares solution, files, command."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.cli import main
from sdadapt.custom_diffusion import (
    concept_features,
    merge_custom_diffusion,
    merge_custom_diffusion_weights,
    solve_concepts,
)
from sdadapt.custom_diffusion.weights import (
    cross_attention_layers,
    unet_custom_diffusion_state,
)
from sdadapt.errors import MergeError
from sdadapt.formats.custom_diffusion import (
    load_custom_diffusion,
    save_custom_diffusion_file,
    split_file_key,
    token_files,
)

F64 = {"dtype": torch.float64}


def _problem(seed=0, *, out=6, inp=8, sizes=(2, 3), n=20):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, inp, generator=g, **F64)
    ws = [w0 + 0.3 * torch.randn(out, inp, generator=g, **F64) for _ in sizes]
    cs = [torch.randn(s, inp, generator=g, **F64) for s in sizes]
    creg = torch.randn(n, inp, generator=g, **F64)
    return w0, ws, cs, creg


def _objective(w, w0, creg):
    return float(((w - w0) @ creg.T).norm())


def _kkt_reference(w0, ws, cs, creg):
    """Per output row: min (w − w0) M (w − w0)ᵀ s.t. w Cᵀ = v, by the KKT system [[2M, Cᵀ], [C, 0]]."""
    c = torch.cat(cs)
    v = torch.cat([w @ ci.T for w, ci in zip(ws, cs)], dim=1)  # (out, s)
    m = creg.T @ creg
    inp, s = c.shape[1], c.shape[0]
    kkt = torch.zeros(inp + s, inp + s, **F64)
    kkt[:inp, :inp], kkt[:inp, inp:], kkt[inp:, :inp] = 2 * m, c.T, c
    rows = []
    for r in range(w0.shape[0]):
        rhs = torch.cat([2 * m @ w0[r], v[r]])
        rows.append(torch.linalg.solve(kkt, rhs)[:inp])
    return torch.stack(rows)


def test_constraints_hold_and_match_a_kkt_reference():
    w0, ws, cs, creg = _problem()
    w = merge_custom_diffusion_weights(w0, ws, cs, creg, ridge=0.0)
    for wi, ci in zip(ws, cs):
        torch.testing.assert_close(w @ ci.T, wi @ ci.T, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(w, _kkt_reference(w0, ws, cs, creg), atol=1e-9, rtol=1e-9)
    # float32 inputs: solved in float64, returned in float32, constraints to ~1e-6
    w32 = merge_custom_diffusion_weights(w0.float(), [x.float() for x in ws], [x.float() for x in cs], creg.float())
    assert w32.dtype == torch.float32
    for wi, ci in zip(ws, cs):
        torch.testing.assert_close((w32.double() @ ci.T), wi @ ci.T, atol=1e-5, rtol=1e-5)


def test_objective_is_minimal_among_feasible_weights():
    w0, ws, cs, creg = _problem(1)
    w = merge_custom_diffusion_weights(w0, ws, cs, creg, ridge=0.0)
    c = torch.cat(cs)
    null = torch.eye(c.shape[1], **F64) - c.T @ torch.linalg.solve(c @ c.T, c)  # projector onto {x: C x = 0}
    best = _objective(w, w0, creg)
    g = torch.Generator().manual_seed(5)
    for scale in (1e-3, 1e-1, 1.0):
        p = scale * torch.randn(w.shape, generator=g, **F64) @ null
        other = w + p
        torch.testing.assert_close(other @ c.T, w @ c.T, atol=1e-9, rtol=1e-9)  # still feasible
        assert best <= _objective(other, w0, creg) + 1e-12


def test_vanishing_regularisation_gives_the_smallest_change_and_one_full_concept_gives_its_weights():
    w0, ws, cs, _ = _problem(2, sizes=(3,))
    w = merge_custom_diffusion_weights(w0, ws, cs, torch.zeros(4, 8, **F64), ridge=1e-6)
    c = cs[0]
    projector = c.T @ torch.linalg.solve(c @ c.T, c)  # row space of C
    torch.testing.assert_close(w, w0 + (ws[0] - w0) @ projector, atol=1e-9, rtol=1e-9)
    full = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), **F64)  # features span everything
    torch.testing.assert_close(merge_custom_diffusion_weights(w0, ws, [full], torch.randn(30, 8, **F64)), ws[0],
                               atol=1e-8, rtol=1e-8)


def test_coinciding_features_get_the_mean_target_and_bad_shapes_are_refused():
    w0, ws, cs, creg = _problem(4, sizes=(2, 2))
    shared = cs[0][:1]
    cs = [torch.cat([shared, cs[0][1:]]), torch.cat([shared, cs[1][1:]])]  # the same first row in both concepts
    w = merge_custom_diffusion_weights(w0, ws, cs, creg)
    torch.testing.assert_close(w @ shared.T, (ws[0] @ shared.T + ws[1] @ shared.T) / 2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w @ cs[1][1:].T, ws[1] @ cs[1][1:].T, atol=1e-6, rtol=1e-6)
    with pytest.raises(MergeError, match="do not fit"):
        merge_custom_diffusion_weights(w0, [ws[0]], [torch.zeros(2, 7, **F64)], creg)
    with pytest.raises(MergeError, match="one feature block per concept"):
        merge_custom_diffusion_weights(w0, ws, cs[:1], creg)


def _naive_merge(w0, ws, cs, creg, *, ridge, rtol):
    """The module docstring's formula, term by term in float64, for one weight."""
    c = torch.cat(cs)
    vt = torch.cat([w @ ci.T for w, ci in zip(ws, cs)], dim=1)
    m = creg.T @ creg
    m = m + ridge * torch.trace(m) / m.shape[0] * torch.eye(m.shape[0], **F64)
    d = c @ torch.linalg.inv(m)
    return w0 + (vt - w0 @ c.T) @ torch.linalg.pinv(d @ c.T, rtol=rtol, hermitian=True) @ d


def test_one_solve_for_many_weights_equals_the_per_weight_formula():
    """The feature solve is shared by every K/V of a model (same C_i, C_reg, in): reusing it gives each
    weight what the per-weight formula gives, to float64 rounding."""
    g = torch.Generator().manual_seed(11)
    inp, sizes = 24, (3, 5)
    cs = [torch.randn(s, inp, generator=g, **F64) for s in sizes]
    creg = torch.randn(40, inp, generator=g, **F64)
    solve = solve_concepts(cs, creg, ridge=1e-3, rtol=3e-2)
    assert solve.in_features == inp
    for out in (8, 16, 8, 32):  # several layers of different widths, one solve
        w0 = torch.randn(out, inp, generator=g, **F64)
        ws = [w0 + 0.1 * torch.randn(out, inp, generator=g, **F64) for _ in sizes]
        reference = _naive_merge(w0, ws, cs, creg, ridge=1e-3, rtol=3e-2)
        shared = solve.merge(w0, ws)
        torch.testing.assert_close(shared, reference, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(merge_custom_diffusion_weights(w0, ws, cs, creg, ridge=1e-3, rtol=3e-2), reference,
                                   atol=1e-12, rtol=1e-12)
        w32 = solve.merge(w0.float(), [w.float() for w in ws])
        assert w32.dtype == torch.float32  # float32 inputs: solved in float64, returned as float32
        torch.testing.assert_close(w32.double(), shared, atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeError, match=r"\(out, 24\)"):
        solve.merge(torch.zeros(8, 23, **F64), [torch.zeros(8, 23, **F64)] * 2)
    with pytest.raises(MergeError, match="one weight per concept"):
        solve.merge(torch.zeros(8, inp, **F64), [torch.zeros(8, inp, **F64)])
    with pytest.raises(MergeError, match="width 24"):
        solve_concepts([torch.zeros(2, 23, **F64)], creg)


# ------------------------------------------------------------------------------ files and the command (toy model)
@pytest.fixture(scope="module")
def toy():
    from sdadapt.toy import load_toy

    return load_toy(None)


def _concept_file(system, folder, token, seed, prompts):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in unet_custom_diffusion_state(system.unet).items()}
    from sdadapt.embeddings import find_token_embedding

    width = find_token_embedding(system.text_encoder)[1].embedding_dim
    emb = sdadapt.Embedding(token, {"text_encoder": 0.5 * torch.randn(1, width, generator=g)})
    path = folder / f"{token.strip('<>')}.safetensors"
    save_custom_diffusion_file(path, state, embeddings=[emb], prompts=prompts)
    return path


def test_merged_weights_keep_each_concepts_keys_on_its_prompts(toy, tmp_path):
    a = _concept_file(toy, tmp_path, "<new1>", 0, ["<new1> circle", "<new1> square on the left"])
    b = _concept_file(toy, tmp_path, "<new2>", 1, ["<new2> background", "<new2> ring"])
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    merged = merge_custom_diffusion([a, b], system=toy, reg_count=60, ridge=1e-6, rtol=1e-10)  # exact constraints
    assert all(torch.equal(before[k], v) for k, v in toy.unet.state_dict().items())  # the base is not touched
    assert merged.tokens == ["<new1>", "<new2>"] and len(merged.weights) == 2 * len(cross_attention_layers(toy.unet))
    files = [load_custom_diffusion(p) for p in (a, b)]
    for f in files:
        handles = [sdadapt.inject_embedding(toy.text_encoder, toy.tokenizer, e) for g in files for e in g.embeddings]
        try:
            feats = concept_features(toy, f.prompts).float()
        finally:
            for h in reversed(handles):
                h.remove()
        for key, w in merged.weights.items():
            torch.testing.assert_close(feats @ w.T, feats @ f.weights[key].T, atol=2e-4, rtol=1e-3)
    assert {split_file_key(k)[1] for k in merged.weights} == {"to_k.weight", "to_v.weight"}
    # one shared solve for all keys == the per-key formula (features as the merge takes them)
    handles = [sdadapt.inject_embedding(toy.text_encoder, toy.tokenizer, e) for g in files for e in g.embeddings]
    try:
        feats = [concept_features(toy, f.prompts) for f in files]
        reg = concept_features(toy, [*toy.class_prompts(60, seed=0), ""], through="all")
    finally:
        for h in reversed(handles):
            h.remove()
    for key, w in merged.weights.items():
        layer, param = split_file_key(key)
        base = toy.unet.get_parameter(f"{layer}.{param}").detach().double()
        per_key = _naive_merge(base, [f.weights[key].double() for f in files], feats, reg, ridge=1e-6, rtol=1e-10)
        torch.testing.assert_close(w.double(), per_key.to(w.dtype).double(), atol=1e-6, rtol=1e-6)
    # the default (truncated) solve stays near the concepts: no change larger than the concepts' own
    default = merge_custom_diffusion([a, b], system=toy, reg_count=60)
    for key, w in default.weights.items():
        layer, param = split_file_key(key)
        base = toy.unet.get_parameter(f"{layer}.{param}").detach()
        largest = max((f.weights[key] - base).norm() for f in files)
        assert (w - base).norm() <= 2 * largest
    with pytest.raises(sdadapt.errors.InputError, match="rtol"):
        merge_custom_diffusion([a, b], system=toy, reg_count=60, rtol=float("nan"))


def test_merge_command_writes_weights_and_every_token(toy, tmp_path, capsys):
    a = _concept_file(toy, tmp_path, "<new1>", 0, ["<new1> circle"])
    b = _concept_file(toy, tmp_path, "<new2>", 1, ["<new2> ring"])
    out = tmp_path / "merged.safetensors"
    code = main(["merge-custom-diffusion", str(a), str(b), "--model", "toy", "--reg-count", "40", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert all(p.is_file() for p in token_files(out, 2))
    merged = load_custom_diffusion(out)
    assert merged.tokens == ["<new1>", "<new2>"] and merged.prompts == ["<new1> circle", "<new2> ring"]
    handle = sdadapt.apply_custom_diffusion(toy.unet, out, text_encoder=toy.text_encoder, tokenizer=toy.tokenizer)
    handle.remove()
    # refusals: an existing output, clashing tokens, a prompts file per input
    assert main(["merge-custom-diffusion", str(a), str(b), "--model", "toy", "-o", str(out), "-q"]) == 8
    assert main(["merge-custom-diffusion", str(a), str(a), "--model", "toy", "-o", str(tmp_path / "x.safetensors")]) == 6
    assert "clash" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("<new1> circle\n")
    assert main(["merge-custom-diffusion", str(a), str(b), "--model", "toy", "--prompts", str(prompts),
                 "-o", str(tmp_path / "y.safetensors")]) == 2
