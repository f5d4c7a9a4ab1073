"""SD 2.1 unCLIP's loose ends: merging unCLIP files as A1111's checkpoint merger does, one "is this unCLIP" test,
the folder normaliser read by read_clip_stats, ``generate --clip-stats``, ``convert`` naming the unCLIP variant, and
inpainting on an unCLIP model conditioned as A1111 conditions it.

The tiny random unCLIP files are ``tests/test_unclip_single_file.py``'s (``stability_file``: Stability's LDM layout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdadapt.formats.files import read_weights, write_safetensors

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_unclip_single_file import D, spy_class_labels, stability_file  # noqa: E402  (the shared builders)


def _plain_sd2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unCLIP state without its unCLIP parts: a plain SD2 checkpoint of the same shapes."""
    return {k: v for k, v in state.items()
            if not k.startswith(("embedder.", "noise_augmentor.", "model.diffusion_model.label_emb."))}


def _another(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Another model of the same layout: every float tensor moved by N(0, 0.1²) (the schedule buffers too, so a
    merged buffer would show)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture(scope="module")
def states():
    h0, l0 = stability_file("h", 0), stability_file("l", 0)
    out = {"h0": h0, "h1": _another(h0, 1), "h2": _another(h0, 2), "l0": l0, "l1": _another(l0, 3)}
    out.update(plain1=_plain_sd2(out["h1"]), plain2=_plain_sd2(out["h2"]))
    return out


@pytest.fixture(scope="module")
def files(states, tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip-loose")
    out = {}
    for name, state in states.items():
        out[name] = root / f"{name}.safetensors"
        write_safetensors(out[name], state, {})
    return out


# ------------------------------------------------------------------------------- merging (A1111's merger)
#: A1111 modules/extras.py @ 8faafb6 (run_modelmerger): keys it never merges
_A1111_SKIP = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


def _a1111_merge(a: dict, b: dict, c: dict | None, alpha: float) -> dict:
    """A transcription of A1111's ``run_modelmerger`` key loop (modules/extras.py @ 8faafb6, "Weighted sum" and "Add
    difference"): B - C over B's keys named '*model*' (zeros where C lacks one), then every key of A named '*model*'
    that B has is ``theta_func2(A, B, alpha)``; A's other keys are kept, B's keys A lacks dropped. float64 here."""
    theta_1 = {k: v.double() for k, v in b.items()}
    if c is not None:
        for key in theta_1:
            if key in _A1111_SKIP or "model" not in key:
                continue
            theta_1[key] = theta_1[key] - c[key].double() if key in c else torch.zeros_like(theta_1[key])
    theta_0 = {k: v.double() for k, v in a.items()}
    for key in theta_0:
        if "model" in key and key in theta_1 and key not in _A1111_SKIP:
            x, y = theta_0[key], theta_1[key]
            theta_0[key] = x + alpha * y if c is not None else (1 - alpha) * x + alpha * y
    return theta_0


@pytest.mark.parametrize("a, b, c", [("h0", "h1", None), ("l0", "l1", None), ("h0", "plain1", None),
                                     ("plain1", "h0", None), ("h0", "plain1", "plain2"), ("h0", "h1", "h2")])
def test_merge_follows_a1111s_merger(files, tmp_path, a, b, c):
    """Every key A1111's merger writes, with its value: unCLIP's embedder (vision tower and text leftovers, named
    embedder.model.*) merged, noise_augmentor.* (no 'model' in the name) A's, A's keys B lacks kept, B's A lacks
    dropped — for two unCLIP files, unCLIP + plain SD2 either way round, and add difference (unCLIP + (B - C))."""
    from sdadapt.merge import MergeStep, merge_file

    operator = "weighted-sum" if c is None else "add-difference"
    inputs = tuple(str(files[n]) for n in (a, b) + ((c,) if c else ()))
    out = tmp_path / "merged.safetensors"
    report = merge_file(MergeStep(operator, inputs, alpha=0.3), out, save_recipe=False)
    got, _ = read_weights(out)
    states = [read_weights(files[n])[0] for n in (a, b) + ((c,) if c else ())]
    want = _a1111_merge(states[0], states[1], states[2] if c else None, 0.3)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=0, atol=2e-6, msg=key)
    unclip_a, unclip_b = a.startswith(("h", "l")), b.startswith(("h", "l"))
    if unclip_a:  # (the embedder is merged when both have it, A's when B lacks it; the augmentor always A's)
        assert any(k.startswith("embedder.model.visual.") for k in report.merged) == unclip_b
        assert all("noise augmentor" in report.copied[k] for k in got if k.startswith("noise_augmentor."))
    if unclip_a != unclip_b:
        note = next(n for n in report.notes if "plain SD2" in n)
        assert ("the result is an unCLIP model" in note) == unclip_a
        assert ("the result is a plain SD2 model" in note) == unclip_b


def test_merged_unclip_file_loads_as_unclip(files, tmp_path):
    """The merged file is an unCLIP file again: read with its variant, its image encoder the merged tower."""
    from sdadapt.formats import describe_file
    from sdadapt.formats.single_file import read_single_file
    from sdadapt.merge import MergeStep, merge_file

    out = tmp_path / "l.safetensors"
    merge_file(MergeStep("weighted-sum", (str(files["l0"]), str(files["l1"])), alpha=0.5), out)
    assert describe_file(out)["model"].startswith("Stable Diffusion 2.1 unCLIP, L")
    checkpoint = read_single_file(out)
    assert checkpoint.unclip.variant == "l" and checkpoint.unclip.dim == D
    a, b = read_weights(files["l0"])[0], read_weights(files["l1"])[0]
    conv = checkpoint.components["image_encoder"]["vision_model.embeddings.patch_embedding.weight"]
    key = "embedder.model.visual.conv1.weight"
    torch.testing.assert_close(conv, (a[key] + b[key]) / 2, rtol=0, atol=1e-7)


def test_merge_refuses_unclip_h_with_l(files, tmp_path):
    from sdadapt.errors import MergeError
    from sdadapt.merge import MergeStep, merge_file

    out = tmp_path / "x.safetensors"
    with pytest.raises(MergeError, match=r"h0\.safetensors is an SD 2\.1 unCLIP-H .* l1\.safetensors an unCLIP-L"):
        merge_file(MergeStep("weighted-sum", (str(files["h0"]), str(files["l1"])), alpha=0.5), out)
    assert not out.exists()


def test_merge_policy_and_diffusers_named_input(files, tmp_path):
    """--components without image_encoder keeps A's embedder; a diffusers-named unCLIP input (image_encoder.*,
    unet.class_embedding.*) is converted to LDM names and merged into the same tensors as the LDM file."""
    from sdadapt.formats.model_keys import ldm_to_diffusers
    from sdadapt.merge import KeyPolicy, MergeStep, merge_file

    a, b = str(files["h0"]), str(files["h1"])
    policy = KeyPolicy(components=("unet", "text_encoder", "vae"))
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5, policy=policy), tmp_path / "p.safetensors")
    kept, _ = read_weights(tmp_path / "p.safetensors")
    state_a = read_weights(a)[0]
    assert all(torch.equal(kept[k], state_a[k]) for k in kept if k.startswith("embedder.model."))
    named = tmp_path / "h1-diffusers.safetensors"
    write_safetensors(named, ldm_to_diffusers(read_weights(b)[0]), {})
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "ldm.safetensors")
    report = merge_file(MergeStep("weighted-sum", (a, str(named)), alpha=0.5), tmp_path / "mixed.safetensors")
    ldm, mixed = read_weights(tmp_path / "ldm.safetensors")[0], read_weights(tmp_path / "mixed.safetensors")[0]
    for key in ldm:  # (the text leftovers have no diffusers name: A's; the rest as the LDM-LDM merge)
        if key.startswith("embedder.model.") and not key.startswith("embedder.model.visual."):
            assert torch.equal(mixed[key], state_a[key]), key
        else:
            assert torch.equal(mixed[key], ldm[key]), key
    assert any("unCLIP-H inputs" in n for n in report.notes)


# ------------------------------------------------------------------------------- one unCLIP test
def test_one_unclip_test_for_whole_and_partial_files(states, tmp_path):
    """unclip_variant is what inspect, the single-file reader, the key map and the architecture detector go by:
    whole H / L files, one pruned of its text encoder, one without A1111's marker, diffusers naming; SDXL's label_emb
    and a plain SD2 file are no unCLIP."""
    from sdadapt.formats import describe_file
    from sdadapt.formats.model_keys import checkpoint_architecture, key_plan
    from sdadapt.formats.unclip import unclip_info, unclip_variant

    h, l = states["h0"], states["l0"]
    cases = {
        "h": (h, "h"), "l": (l, "l"),
        "h-no-text-encoder": ({k: v for k, v in h.items() if not k.startswith("cond_stage_model.")}, "h"),
        "l-no-marker": ({k: v for k, v in l.items() if not k.startswith("embedder.model.ln_final")}, "h"),  # (D=16)
        "plain": (_plain_sd2(h), None),
        "sdxl-label-emb": ({**_plain_sd2(h), "conditioner.embedders.0.transformer.x": torch.zeros(1),
                            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 2 * D)}, None),
    }
    for name, (state, variant) in cases.items():
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert unclip_variant(shapes) == unclip_variant(state) == variant, name
        assert (unclip_info(state) is not None) == (variant is not None), name
        if variant is None:
            continue
        assert unclip_info(state).variant == variant
        assert checkpoint_architecture(shapes) == "sd2", name  # (a label_emb alone would say SDXL)
        plan, _ = key_plan(shapes, to="diffusers")
        assert "unet.class_embedding.linear_1.weight" in plan, name  # (not SDXL's add_embedding)
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, state, {})
        assert describe_file(path)["model"].startswith(f"Stable Diffusion 2.1 unCLIP, {variant.upper()}"), name
    wide = {**h, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 2 * 768)}
    wide.pop("embedder.model.ln_final.weight")
    assert unclip_variant(wide) == "l"  # (no marker: the embedding width, 768 = ViT-L/14)
    from sdadapt.formats.model_keys import ldm_to_diffusers

    assert unclip_variant({k: tuple(v.shape) for k, v in ldm_to_diffusers(h).items()}) is None  # (LDM names only)


def test_folder_normaliser_is_read_as_clip_stats(tmp_path):
    """A diffusers unCLIP folder's image_normalizer/ is read by read_clip_stats: a std <= 0 or another width than the
    UNet's is refused, naming the file (before, any mean/std pair was taken)."""
    from sdadapt.errors import WeightFileError
    from sdadapt.unclip import unclip_parts_from_folder

    def folder(name, mean, std):
        root = tmp_path / name
        (root / "image_normalizer").mkdir(parents=True)
        write_safetensors(root / "image_normalizer" / "diffusion_pytorch_model.safetensors",
                          {"mean": mean.reshape(1, -1), "std": std.reshape(1, -1)}, {})
        return root

    mean, std = torch.randn(D), torch.rand(D) + 0.5
    parts = unclip_parts_from_folder(folder("good", mean, std), dim=D)
    assert torch.equal(parts.normalizer[0], mean[None]) and torch.equal(parts.normalizer[1], std[None])
    assert parts.variant == "h"
    with pytest.raises(WeightFileError, match=r"bad-std.*std has values <= 0"):
        unclip_parts_from_folder(folder("bad-std", mean, torch.zeros(D)), dim=D)
    with pytest.raises(WeightFileError, match=r"wide.*width 24.*16 wide"):
        unclip_parts_from_folder(folder("wide", torch.zeros(24), torch.ones(24)), dim=D)
    assert unclip_parts_from_folder(folder("l768", torch.zeros(768), torch.ones(768)), dim=768).variant == "l"


# ------------------------------------------------------------------------------- generate / convert
def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip-pictures")
    rng = np.random.default_rng(0)
    image = _png(root / "init.png", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[8:24, 12:28] = 255
    return image, _png(root / "mask.png", mask)


def test_generate_clip_stats_reaches_the_image_conditioning(files, pictures, tmp_path, monkeypatch):
    """generate --clip-stats FILE on an unCLIP-L file: the init image's class input is LDM's noise augmentor at level 0
    with karlo's mean / std (float64 here): √ᾱ₀·e + (1 − √ᾱ₀)·μ + √(1 − ᾱ₀)·σ·n, n from the seed."""
    import sdadapt.unclip as unclip_module
    from sdadapt.jobs import run_generate

    seen = []
    original = unclip_module.seeded_unclip_image

    def spy(system, pixels, *, source=None):  # (the image encoded once, each image's class input for its seed)
        for_seed = original(system, pixels, source=source)

        def recorded(seed):
            out = for_seed(seed)
            seen.append((system.unclip, pixels, out))
            return out

        return recorded

    monkeypatch.setattr(unclip_module, "seeded_unclip_image", spy)
    g = torch.Generator().manual_seed(11)
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    stats = tmp_path / "ViT-L-14_stats.th"
    torch.save((mean, std), stats)
    init, _ = pictures
    run_generate(model=str(files["l0"]), prompt="a", out=tmp_path / "o.png", steps=1, seed=5, width=32, height=32,
                 init_image=init, clip_stats=stats)
    (parts, pixels, got), = seen
    torch.testing.assert_close(parts.normalizer[0][0], mean, rtol=0, atol=0)
    e = parts.encode_image(pixels).double()
    ac0 = parts.noise_alphas_cumprod[0].double()
    n = torch.randn(e.shape, generator=torch.Generator().manual_seed(5)).double()
    z = ac0.sqrt() * e + (1 - ac0.sqrt()) * mean.double() + (1 - ac0).sqrt() * std.double() * n
    want = torch.cat([z, torch.ones(1, D // 2, dtype=torch.float64), torch.zeros(1, D // 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_generate_clip_stats_refusals(files, tmp_path, capsys):
    """--clip-stats on the toy: a usage error at the parse; on a model that is not unCLIP: the loaders' error."""
    from sdadapt.cli import build_parser
    from sdadapt.jobs import run_generate

    parser = build_parser()
    stats = tmp_path / "s.th"
    torch.save((torch.zeros(D), torch.ones(D)), stats)  # (an existing file: the toy rule, not the path check, refuses)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "a", "-o", str(tmp_path / "a.png"), "--clip-stats", str(stats)])
    assert "the toys have no image normaliser" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--clip-stats is for SD 2.1 unCLIP"):
        run_generate(model=str(files["plain1"]), prompt="a", out=tmp_path / "p.png", steps=1, width=32, height=32,
                     clip_stats=stats)
    helps = {}
    for command in ("generate", "convert", "clip-invert"):
        sub = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions
                   if "--clip-stats" in a.option_strings)
        helps[command] = (sub.metavar, sub.help.split(";")[0])
    assert len(set(helps.values())) == 1, helps  # (one definition: cli/options.py add_clip_stats_option)


@pytest.mark.parametrize("name, variant", [("h0", "H"), ("l0", "L")])
def test_convert_names_the_unclip_variant(files, tmp_path, capsys, name, variant):
    from sdadapt.cli import main

    assert main(["convert", str(files[name]), "--to", "ldm", "-o", str(tmp_path / "out.safetensors"), "-q"]) == 0
    line = capsys.readouterr().out
    assert f"LDM single file of an SD 2.1 unCLIP-{variant} (sd2-v) model" in line, line


# ------------------------------------------------------------------------------- inpainting
@pytest.fixture(scope="module")
def h_system(files):
    from sdadapt.jobs.models import load_system

    return load_system(str(files["h0"]))


def _expected(system, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """LDM's noise augmentor at level 0 on H (identity stats), float64: [√ᾱ₀·e + √(1 − ᾱ₀)·n ‖ cos 0 ‖ sin 0]."""
    e = system.unclip.encode_image(pixels[None]).double()
    ac0 = system.unclip.noise_alphas_cumprod[0].double()
    n = torch.randn(e.shape, generator=torch.Generator().manual_seed(seed)).double()
    z = ac0.sqrt() * e + (1 - ac0).sqrt() * n
    return torch.cat([z, torch.ones(1, D // 2, dtype=torch.float64), torch.zeros(1, D // 2, dtype=torch.float64)], 1)


@pytest.mark.parametrize("fill, full_res", [("original", False), ("fill", False), ("original", True)])
def test_inpainting_conditions_on_the_image_it_inpaints(h_system, pictures, tmp_path, monkeypatch, fill, full_res):
    """A1111's img2img init with a mask on an unCLIP model (modules/processing.py @ 0027ce1: init() →
    img2img_image_conditioning(image * 2 - 1, ...) → unclip_image_conditioning): the embedding is of the image it
    encodes — resized ("whole picture"), cut out of the region ("only masked"), filled (fill modes) — the
    unconditional branch zeros; the conditional branch's class input on every model call is that embedding."""
    import sdadapt.jobs.generate as generate_job
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_inpaint import inpaint_inputs

    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: h_system)
    seen = spy_class_labels(h_system.unet)
    init, mask = pictures
    try:
        h_system.unclip_image = None
        run_generate(model="unclip", prompt="a", out=tmp_path / "o.png", steps=2, seed=7, width=32, height=32,
                     guidance=3.0, init_image=init, mask=mask, inpainting_fill=fill, inpaint_full_res=full_res)
        assert h_system.unclip_image is None  # (set for the run's images only: sdadapt.unclip.unclip_image_scope)
        got = seen[-1].chunk(2)[1]  # (the conditional branch's class input of the last call)
    finally:
        del h_system.unet.forward
        h_system.unclip_image = None
    inputs = inpaint_inputs(h_system, init, mask, height=32, width=32, inpainting_fill=fill, inpaint_full_res=full_res)
    want = _expected(h_system, inputs.pixels, 7)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    from sdadapt.resize_modes import init_image_pixels

    whole = init_image_pixels(init, (32, 32), mode="just")
    assert torch.equal(inputs.pixels, whole) == (fill == "original" and not full_res)  # (the three images differ)
    assert seen
    for labels in seen:  # (uncond first, then cond)
        uncond, cond = labels.chunk(2)
        assert torch.equal(uncond, torch.zeros_like(uncond))
        torch.testing.assert_close(cond.double(), want, rtol=0, atol=1e-5)
    assert math.isfinite(float(got.abs().max()))
