"""Aesthetic gradients: files, the mean image embedding, the functional personalisation vs a
deep-copy reference written here (as the A1111 extension does it), the loss and the mixing vs
float64 hand formulas, the encoder left bit-identical, the system-level helpers on the toy model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from docs_pages import run_block
import torch.nn.functional as F
from hostile_files import evil_pickles
from tiny_models import tiny_clip

import sdadapt
from sdadapt.aesthetic import (
    aesthetic_conditioning,
    aesthetic_embedding,
    aesthetic_embedding_from_folder,
    aesthetic_loss,
    mix_conditioning,
    normalize_embedding,
    personalize_text_encoder,
    rotate_toward_text,
    slerp,
    text_features,
    toy_text_projection,
)
from sdadapt.aesthetic import personalize as personalize_module
from sdadapt.errors import UnsafeFileError, WeightFileError
from sdadapt.formats.aesthetic import (
    AESTHETIC_KEY,
    load_aesthetic_embedding,
    save_aesthetic_embedding,
)
from sdadapt.toy import load_toy
from sdadapt.toy.evaluate import concept_data

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "aesthetic"
TOL = 1e-5  # functional vs deep copy, float32


# ----------------------------------------------------------------------------------- references
def deepcopy_reference(encoder, ids, embedding, *, projection=None, steps=5, lr=1e-4, weight=0.9, use_slerp=False,
                       clip_skip=1, target=None):
    """The A1111 extension's ``AestheticCLIP.__call__``: deep copy, default Adam over every
    parameter but the projection, full-length loss steps, then mix with the original conditioning."""
    def hidden(model):
        if clip_skip > 1:
            out = model(ids, output_hidden_states=True)
            norm = getattr(getattr(model, "text_model", model), "final_layer_norm")
            return norm(out.hidden_states[-clip_skip])
        out = model(ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def features(model):
        out = model(ids)
        if hasattr(out, "text_embeds"):
            return out.text_embeds
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return pooled if projection is None else F.linear(pooled, projection)

    if target is None:
        target = embedding.reshape(1, -1).float()
        target = target / target.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        z = hidden(encoder)
    model = copy.deepcopy(encoder)
    model.requires_grad_(True)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "text_projection" not in n], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            t = features(model)
            t = t / t.norm(dim=-1, keepdim=True)
            loss = -(t @ target.T)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
    with torch.no_grad():
        zn = hidden(model)
    if use_slerp:
        return _slerp64(z.double(), zn.double(), weight, dim=1).float()
    return z * (1 - weight) + zn * weight


def _slerp64(low, high, t, *, dim):
    """A1111's ``slerp`` (modules/aesthetic_clip.py), written out along ``dim``."""
    low_norm = low / torch.norm(low, dim=dim, keepdim=True)
    high_norm = high / torch.norm(high, dim=dim, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(dim, keepdim=True))
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high


def clip_with_projection(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=99, bos_token_id=97, eos_token_id=98, pad_token_id=98, projection_dim=16,
                                         max_position_embeddings=12)
    return transformers.CLIPTextModelWithProjection(config).eval()


def legacy_ids():  # tiny_clip: eos_token_id == 2, so transformers pools at the largest id (98 here)
    return torch.tensor([[0, 5, 7, 98, 98, 98, 98, 98, 98, 98], [0, 11, 98, 98, 98, 98, 98, 98, 98, 98]])


def eos_ids():  # clip_with_projection: <bos> 97, <eos>/<pad> 98
    return torch.tensor([[97, 5, 7, 9, 98, 98, 98, 98, 98, 98, 98, 98], [97, 11, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98]])


@pytest.fixture(scope="module")
def toy():
    return load_toy()


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ----------------------------------------------------------------------------------- pure math
@pytest.mark.parametrize("batch, width", [(1, 8), (3, 16)])
def test_loss_is_minus_cosine_in_float64(batch, width):
    g = torch.Generator().manual_seed(batch + width)
    features = torch.randn(batch, width, generator=g, dtype=torch.float64)
    e = normalize_embedding(torch.randn(width, generator=g, dtype=torch.float64) * 7)
    expected = 0.0
    for b in range(batch):
        f = features[b].tolist()
        t = e[0].tolist()
        dot = sum(x * y for x, y in zip(f, t))
        expected += -dot / (math.sqrt(sum(x * x for x in f)) * math.sqrt(sum(y * y for y in t)))
    assert aesthetic_loss(features, e).item() == pytest.approx(expected / batch, abs=1e-12)
    assert aesthetic_loss(features, e).item() == pytest.approx(-F.cosine_similarity(features, e).mean().item(), abs=1e-12)


def test_normalize_embedding_shapes_and_errors():
    assert normalize_embedding(torch.tensor([3.0, 4.0], dtype=torch.float64)).tolist() == [[0.6, 0.8]]
    assert normalize_embedding(torch.tensor([[3.0, 4.0]])).shape == (1, 2)
    with pytest.raises(ValueError, match="all zeros"):
        normalize_embedding(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(D,\) or \(1, D\)"):
        normalize_embedding(torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        normalize_embedding(torch.tensor([1.0, float("nan")]))


def test_mix_and_slerp_match_a1111_formulas():
    g = torch.Generator().manual_seed(0)
    z, zn = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    assert torch.equal(mix_conditioning(z, zn, 0.3), z * (1 - 0.3) + zn * 0.3)
    assert torch.allclose(mix_conditioning(z, zn, 0.3, use_slerp=True), _slerp64(z, zn, 0.3, dim=1), atol=1e-12)
    assert torch.allclose(slerp(z, zn, 0.0), z, atol=1e-12) and torch.allclose(slerp(z, zn, 1.0), zn, atol=1e-12)
    # parallel inputs: A1111 divides by sin(0) = 0; here the linear interpolation
    same = slerp(z, 2 * z, 0.5)
    assert torch.isfinite(same).all() and torch.allclose(same, 1.5 * z)


def test_rotate_toward_text_matches_a1111():
    g = torch.Generator().manual_seed(1)
    e = normalize_embedding(torch.randn(8, generator=g, dtype=torch.float64))
    text = torch.randn(1, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(rotate_toward_text(e, text, angle=0.1), _slerp64(e, text, 0.1, dim=1), atol=1e-12)
    away = e - text
    away = away / away.norm(dim=-1, keepdim=True)
    assert torch.allclose(rotate_toward_text(e, text, angle=0.2, negative=True), _slerp64(e, away, 0.2, dim=1), atol=1e-12)


# ----------------------------------------------------------------------------------- functional == deep copy
def test_functional_equals_deepcopy_on_the_toy_encoder(toy):
    projection = toy_text_projection(toy)
    ids = toy.tokenize(["a red circle", "a large blue square on the left"])
    e = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 5
    before = _state(toy.text_encoder)
    for lr in (1e-4, 1e-3):
        ours = personalize_text_encoder(toy.text_encoder, ids, e, projection=projection, lr=lr)
        reference = deepcopy_reference(toy.text_encoder, ids, e, projection=projection, lr=lr)
        assert (ours - reference).abs().max() <= TOL
        assert (reference - toy.text_encoder(ids)[0]).abs().max() > 1e-3  # it did something
    assert all(torch.equal(before[k], v) for k, v in toy.text_encoder.state_dict().items())


@pytest.mark.parametrize("splice_rows", [False, True], ids=["whole-table", "row-splice"])
@pytest.mark.parametrize("which", ["with-projection", "legacy-eos-plus-projection"])
def test_functional_equals_deepcopy_on_transformers_clip(monkeypatch, splice_rows, which):
    if splice_rows:  # tune the token table row-wise even though it is small (the CLIP-L path)
        monkeypatch.setattr(personalize_module, "_ROWS_FROM", 0)
    if which == "with-projection":
        encoder, ids, projection = clip_with_projection(), eos_ids(), None
    else:
        encoder, ids = tiny_clip(1), legacy_ids()
        projection = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)) * 0.2
    e = torch.randn(16, generator=torch.Generator().manual_seed(4)) * 3
    before, hooks = _state(encoder), _hooks(encoder)
    ours = personalize_text_encoder(encoder, ids, e, projection=projection, lr=1e-3, steps=6)
    reference = deepcopy_reference(encoder, ids, e, projection=projection, lr=1e-3, steps=6)
    assert (ours - reference).abs().max() <= TOL
    assert (reference - deepcopy_reference(encoder, ids, e, projection=projection, steps=0)).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert _hooks(encoder) == hooks


def test_clip_skip_slerp_and_weight_one_equal_the_reference():
    encoder, ids = clip_with_projection(3), eos_ids()
    e = torch.randn(1, 16, generator=torch.Generator().manual_seed(5))
    for options in (dict(clip_skip=2), dict(use_slerp=True, weight=0.7), dict(weight=1.0)):
        reference = deepcopy_reference(encoder, ids, e, lr=1e-3, **options)
        mine = {("slerp" if k == "use_slerp" else k): v for k, v in options.items()}
        ours = personalize_text_encoder(encoder, ids, e, lr=1e-3, **mine)
        assert (ours - reference).abs().max() <= TOL, options


def test_truncation_changes_nothing_but_the_work():
    encoder, ids = clip_with_projection(4), eos_ids()
    e = torch.randn(16, generator=torch.Generator().manual_seed(6))
    short = personalize_text_encoder(encoder, ids, e, lr=1e-3)
    full = personalize_text_encoder(encoder, ids, e, lr=1e-3, truncate=False)
    assert (short - full).abs().max() <= 1e-6


def test_aesthetic_text_rotation_equals_reference():
    encoder, ids = clip_with_projection(5), eos_ids()
    text_ids = torch.tensor([[97, 30, 31, 98, 98, 98, 98, 98, 98, 98, 98, 98]])
    e = torch.randn(16, generator=torch.Generator().manual_seed(7))
    unit = normalize_embedding(e)
    for negative in (False, True):
        target = rotate_toward_text(unit, encoder(text_ids).text_embeds.detach(), angle=0.3, negative=negative)
        reference = deepcopy_reference(encoder, ids, e, lr=1e-3, target=target)
        ours = personalize_text_encoder(encoder, ids, e, lr=1e-3, text_ids=text_ids, text_angle=0.3, text_negative=negative)
        assert (ours - reference).abs().max() <= TOL


# ----------------------------------------------------------------------------------- the encoder is left alone
def test_user_parameters_get_no_grad_and_stay_bit_identical_even_on_error():
    encoder, ids = clip_with_projection(6), eos_ids()
    encoder.requires_grad_(True)  # a user model in training state
    params_before = {n: p for n, p in encoder.named_parameters()}
    before, hooks = _state(encoder), _hooks(encoder)
    e = torch.randn(16)
    personalize_text_encoder(encoder, ids, e, lr=1e-2)
    assert all(p.grad is None for p in encoder.parameters())

    def boom(step, total, loss):
        if step == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        personalize_text_encoder(encoder, ids, e, lr=1e-2, callback=boom)
    assert {n: p for n, p in encoder.named_parameters()} == params_before  # the same Parameter objects
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert _hooks(encoder) == hooks


def test_existing_textual_inversion_rows_are_the_starting_point(monkeypatch):
    # a TokenRows hook already overrides id 5: the personalisation starts from that row, as a
    # deep copy of the hooked encoder would, and leaves the TI hooks in place afterwards
    from sdadapt.embeddings import TokenRows

    monkeypatch.setattr(personalize_module, "_ROWS_FROM", 0)
    encoder, ids = clip_with_projection(7), eos_ids()
    row = torch.randn(1, 32, generator=torch.Generator().manual_seed(8))
    reference_encoder = copy.deepcopy(encoder)  # the same encoder with the TI row written into its table
    with torch.no_grad():
        reference_encoder.get_input_embeddings().weight[5] = row[0]
    ti = TokenRows(encoder.get_input_embeddings(), [5], row)
    try:
        e = torch.randn(16, generator=torch.Generator().manual_seed(9))
        hooks = _hooks(encoder)
        ours = personalize_text_encoder(encoder, ids, e, lr=1e-3)
        assert _hooks(encoder) == hooks and ti.attached
        reference = deepcopy_reference(reference_encoder, ids, e, lr=1e-3)
        assert (ours - reference).abs().max() <= TOL
    finally:
        ti.remove()


def test_skips_return_the_base_exactly_and_inference_mode_works():
    encoder, ids = clip_with_projection(8), eos_ids()
    e = torch.randn(16)
    base = encoder(ids).last_hidden_state.detach()
    for options in (dict(steps=0), dict(lr=0.0), dict(weight=0.0)):
        assert torch.equal(personalize_text_encoder(encoder, ids, e, base=base, **options), base)
    plain = personalize_text_encoder(encoder, ids, e, lr=1e-3)
    with torch.inference_mode():
        inside = personalize_text_encoder(encoder, ids, e, lr=1e-3)
    assert torch.equal(plain, inside)
    legacy = tiny_clip(2)
    with torch.inference_mode():  # ids, embedding and projection all made in inference mode
        ids2, e2, projection = legacy_ids().clone(), torch.randn(16), torch.randn(16, 32)
        inside = personalize_text_encoder(legacy, ids2, e2, projection=projection, lr=1e-3)
    assert torch.equal(inside, personalize_text_encoder(legacy, ids2.clone(), e2.clone(), projection=projection.clone(), lr=1e-3))


def test_bad_options_are_value_errors_that_say_what_to_do(toy):
    ids = toy.tokenize(["a red circle"])
    with pytest.raises(ValueError, match="projection="):  # toy pooled is 64 wide, the embedding 16
        personalize_text_encoder(toy.text_encoder, ids, torch.randn(16))
    for options, needle in ((dict(steps=-1), "steps"), (dict(lr=float("nan")), "lr"), (dict(weight=1.5), "weight"),
                            (dict(clip_skip=0), "clip_skip"), (dict(clip_skip=2), "clip_skip")):
        with pytest.raises(ValueError, match=needle):
            personalize_text_encoder(toy.text_encoder, ids, torch.randn(64), **options)
    with pytest.raises(ValueError, match="input_ids"):
        personalize_text_encoder(toy.text_encoder, ids.float(), torch.randn(64))
    with pytest.raises(ValueError, match="tune selected no"):
        personalize_text_encoder(toy.text_encoder, ids, torch.randn(64), tune=lambda name: False)
    bare = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="causal"):
        personalize_text_encoder(bare, torch.tensor([[1, 2]]), torch.randn(4), truncate=True)


# ----------------------------------------------------------------------------------- files
def _fixture(name):
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent (needs the shared/fixtures folder beside the repo)")
    return path


@pytest.mark.parametrize("name, dtype, norm", [("sac_8plus.pt", torch.float32, 3.26), ("aivazovsky.pt", torch.float16, 17.24)])
def test_real_fixtures_load(name, dtype, norm):
    path = _fixture(name)
    raw = load_aesthetic_embedding(path, dtype=None)
    assert raw.shape == (1, 768) and raw.dtype == dtype and raw.device.type == "cpu"
    assert raw.float().norm().item() == pytest.approx(norm, abs=0.01)
    e = load_aesthetic_embedding(path)
    assert e.dtype == torch.float32 and torch.equal(e, raw.float())
    assert normalize_embedding(e).norm().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (1, 24)), (torch.float16, (1, 24)), (torch.float32, (24,))])
def test_round_trip_exact(tmp_path, suffix, dtype, shape):
    e = (torch.randn(shape) * 5).to(dtype)
    path = save_aesthetic_embedding(tmp_path / f"style{suffix}", e)
    back = load_aesthetic_embedding(path, dtype=None)
    assert back.shape == (1, 24) and back.dtype == dtype and torch.equal(back, e.reshape(1, 24))
    if suffix == ".pt":  # what the A1111 extension does with the file
        plain = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(plain, torch.Tensor) and torch.equal(plain, e.reshape(1, 24))


def test_pt_of_a_view_stores_only_the_vector(tmp_path):
    big = torch.randn(1000, 768)
    path = save_aesthetic_embedding(tmp_path / "v.pt", big[3])
    assert path.stat().st_size < 8 * 1024  # not the 3 MB storage the view points into
    assert torch.equal(load_aesthetic_embedding(path), big[3][None])


def test_safetensors_layout_and_metadata(tmp_path):
    from safetensors import safe_open

    path = save_aesthetic_embedding(tmp_path / "a.safetensors", torch.ones(8), metadata={"images": "12"})
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == [AESTHETIC_KEY] and f.metadata() == {"images": "12"}


def test_bad_files_and_outputs(tmp_path):
    torch.save(torch.ones(3, 8), tmp_path / "many.pt")
    with pytest.raises(WeightFileError, match=r"\(D,\) or \(1, D\)"):
        load_aesthetic_embedding(tmp_path / "many.pt")
    torch.save({"a": torch.ones(8), "b": torch.ones(8)}, tmp_path / "two.pt")
    with pytest.raises(WeightFileError, match="holds 2 tensors"):
        load_aesthetic_embedding(tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": torch.ones(1, 8)}, "x": torch.ones(2)}, tmp_path / "ti2.pt")
    with pytest.raises(WeightFileError, match="textual-inversion"):
        load_aesthetic_embedding(tmp_path / "ti2.pt")
    torch.save(torch.tensor([1.0, float("inf")]), tmp_path / "inf.pt")
    with pytest.raises(WeightFileError, match="NaN or inf"):
        load_aesthetic_embedding(tmp_path / "inf.pt")
    with pytest.raises(WeightFileError, match="no such file"):
        load_aesthetic_embedding(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=".pt"):
        save_aesthetic_embedding(tmp_path / "a.bin", torch.ones(4))
    with pytest.raises(ValueError, match="metadata"):
        save_aesthetic_embedding(tmp_path / "a.pt", torch.ones(4), metadata={"a": "b"})
    save_aesthetic_embedding(tmp_path / "keep.pt", torch.ones(4))
    with pytest.raises(FileExistsError):
        save_aesthetic_embedding(tmp_path / "keep.pt", torch.zeros(4), overwrite=False)
    assert torch.equal(load_aesthetic_embedding(tmp_path / "keep.pt"), torch.ones(1, 4))
    with pytest.raises(WeightFileError, match="NaN or inf"):
        save_aesthetic_embedding(tmp_path / "nan.pt", torch.tensor([float("nan"), 1.0]))
    assert not (tmp_path / "nan.pt").exists()


def test_malicious_pt_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    for kind, path in evil_pickles(tmp_path / "evil", marker).items():
        with pytest.raises(WeightFileError) as info:  # UnsafeFileError is one
            load_aesthetic_embedding(path)
        assert isinstance(info.value, UnsafeFileError), (kind, info.value)
        assert not marker.exists(), f"{kind}: code ran"


# ----------------------------------------------------------------------------------- the embedding
def test_mean_embedding_equals_naive_mean():
    lin = torch.nn.Linear(12, 6)
    images = torch.randn(7, 3, 2, 2)

    def encoder(x):
        return lin(x.flatten(1))

    with torch.no_grad():
        outs = encoder(images).double()
    e = aesthetic_embedding(images, encoder, batch_size=3)
    assert e.shape == (1, 6) and e.dtype == torch.float32
    assert torch.allclose(e.double(), outs.mean(0, keepdim=True), atol=1e-6)
    unit = aesthetic_embedding(images, encoder, batch_size=2, normalize_each=True)
    assert torch.allclose(unit.double(), F.normalize(outs, dim=-1).mean(0, keepdim=True), atol=1e-6)
    as_items = aesthetic_embedding([images[0], images[1:4], images[4:]], encoder)
    assert torch.allclose(as_items, e, atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        aesthetic_embedding(images[:0], encoder)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        aesthetic_embedding(images, lambda x: x)


def test_folder_embedding_reads_pngs_in_batches(tmp_path, toy):
    from sdadapt.images import read_image, write_png

    images, _ = concept_data("blue", 5, seed=0)
    for i, image in enumerate(images):
        write_png(tmp_path / f"{i}.png", image)
    (tmp_path / "notes.txt").write_text("not an image")
    e = aesthetic_embedding_from_folder(tmp_path, toy.clip.encode_image, size=32, batch_size=2)
    expected = aesthetic_embedding(torch.stack([read_image(tmp_path / f"{i}.png", size=32) for i in range(5)]),
                                   toy.clip.encode_image)
    assert torch.allclose(e, expected, atol=1e-6)


# ----------------------------------------------------------------------------------- systems
def test_toy_projection_fits_the_judge_and_conditioning_keeps_the_layout(toy):
    projection = toy_text_projection(toy)
    ids = toy.tokenize(["a green ring", "a red circle on a white background"])
    got = F.normalize(text_features(toy.text_encoder, ids, projection=projection), dim=-1)
    assert (got * toy.clip.encode_text(ids)).sum(-1).min() > 0.9
    images, _ = concept_data("blue", 4, seed=0)
    e = aesthetic_embedding(images, toy.clip.encode_image)
    cond = aesthetic_conditioning(toy, ["a circle", "a ring"], e, lr=1e-3)
    plain = toy.condition(toy.tokenize(["a circle", "a ring"]))
    assert set(cond) == set(plain) and cond["context"].shape == plain["context"].shape
    assert torch.equal(cond["image_embeds"], plain["image_embeds"])
    assert not torch.equal(cond["context"], plain["context"])
    turned = aesthetic_conditioning(toy, ["a circle"], e, lr=1e-3, text="a red shape", text_angle=0.5)
    assert not torch.equal(turned["context"], cond["context"][:1])
    out = sdadapt.aesthetic_sample(toy, ["a circle"], e, aesthetic_steps=2, lr=1e-3, steps=2)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- docs
def test_docs_page_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_block("aesthetic-gradients.md", 0)
    assert (tmp_path / "blue.pt").is_file()
    assert namespace["after"] > namespace["before"] + 0.2  # the generations moved toward the blue set
    namespace = run_block("aesthetic-gradients.md", 1)
    assert namespace["cond"].shape == (1, 16, 64)
    printed = capsys.readouterr().out
    assert "cosine to the blue set" in printed


# ----------------------------------------------------------------------------------- real-CLIP pieces
def test_load_text_projection_from_clip_and_ldm_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from sdadapt.aesthetic import load_text_projection

    weight = torch.randn(16, 32)
    folder = tmp_path / "clip"
    folder.mkdir()
    save_file({"text_model.final_layer_norm.weight": torch.ones(32), "text_projection.weight": weight,
               "visual_projection.weight": torch.randn(16, 24)}, str(folder / "model.safetensors"))
    assert torch.equal(load_text_projection(folder), weight)
    assert torch.equal(load_text_projection(folder / "model.safetensors"), weight)
    torch.save({"state_dict": {"cond_stage_model.model.text_projection": weight.T.clone()}}, tmp_path / "sd2.ckpt")
    assert torch.equal(load_text_projection(tmp_path / "sd2.ckpt"), weight)  # OpenCLIP x @ P, transposed
    save_file({"text_model.embeddings.token_embedding.weight": torch.ones(4, 32)}, str(tmp_path / "sd1_te.safetensors"))
    with pytest.raises(WeightFileError, match="no text_projection"):
        load_text_projection(tmp_path / "sd1_te.safetensors")
    save_file({"a.text_projection.weight": weight, "b.text_projection.weight": weight.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(WeightFileError, match="several"):
        load_text_projection(tmp_path / "two.safetensors")
    # a CLIPTextModel + the loaded projection gives CLIPTextModelWithProjection's text_embeds
    with_projection = clip_with_projection(9)
    plain = with_projection.text_model  # the text tower alone: pooler_output, no projection
    save_file({"text_projection.weight": with_projection.text_projection.weight.detach().clone()}, str(tmp_path / "p.safetensors"))
    ids = eos_ids()
    assert torch.allclose(text_features(plain, ids, projection=load_text_projection(tmp_path / "p.safetensors")),
                          with_projection(ids).text_embeds, atol=1e-6)


def test_clip_image_preprocess():
    from sdadapt.aesthetic import CLIP_MEAN, CLIP_STD, clip_image_preprocess

    white = torch.ones(1, 3, 4, 4)
    out = clip_image_preprocess(white)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]))


def test_mean_embedding_reads_transformers_image_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, image_size=16,
                           patch_size=8),
        projection_dim=12,
    )
    clip = transformers.CLIPModel(config).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).mean(0, keepdim=True)
    assert torch.allclose(aesthetic_embedding(pixels, clip.get_image_features), expected, atol=1e-5)


def test_a_bare_text_tower_needs_a_projection_even_when_widths_agree():
    encoder = tiny_clip(3)  # pooled output 32 wide; an embedding 32 wide would "fit"
    with pytest.raises(ValueError, match="load_text_projection"):
        personalize_text_encoder(encoder, legacy_ids(), torch.randn(32))
    out = personalize_text_encoder(encoder, legacy_ids(), torch.randn(32), projection=torch.nn.Identity(), lr=1e-3)
    assert out.shape == (2, 10, 32)
