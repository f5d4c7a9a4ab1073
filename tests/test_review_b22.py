"""Review (b22) of the commits 7b6684e..a91d1aa: tests of what the review found.

* (T) the toy model (no ``tokenize_weighted``: it reads no prompt weights) — ``generate`` takes A1111 emphasis out
  of each scheduled text (``(red:1.3)`` -> ``red``), the inversion read the text as written (``(red:1.3)`` an
  ``<unk>`` word), so an inversion of a prompt with emphasis did not reconstruct what ``generate`` samples. Checked
  against the real ``generate`` job: the texts it hands the sampler, conditioned as :func:`sdadapt.sampling.generate`
  conditions them, equal the inversion's per-step conditions.
* (R) jobs/train.py (failed at a91d1aa): ``--cache-latents-to-disk`` under torchrun shared the training and
  validation images' latent files out across the ranks (kohya's split) but not the ``--reg-data-dir`` class
  images' (every rank wrote every class image's file); each file must be written once.
* (C) ``invert_latents`` with one :class:`~sdadapt.inversion.core.Composed` condition: the plan of it at every step
  (it raised ``TypeError`` after the optimisation).
* (M) the ``invert`` job leaves out A1111 comments as ``generate``'s job does by default.
* (E) kohya_text_files.py (failed at a91d1aa): ``--cache-text-encoder-outputs-to-disk`` under torchrun: every
  rank encoded and wrote every ``_te_outputs.npz`` (kohya splits them across the processes, as the latent files);
  each file must be written once.
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.inversion import invert_image

STEPS = 4


# ------------------------------------------------------------------------------------------------- (T)
@pytest.fixture(scope="module")
def toy():
    from sdadapt.toy import load_toy

    return load_toy()


def _generate_conditions(toy, prompt: str, negative: str, monkeypatch, tmp_path) -> tuple[list, list]:
    """The per-step conditions (prompt, negative) the ``generate`` job samples ``prompt`` with on the toy (ddim,
    ``STEPS`` steps): the sampler's inputs taken at :func:`sdadapt.jobs.generate_hires.sample_image`, conditioned as
    :func:`sdadapt.sampling.generate` conditions them (``system.condition(system.tokenize([text]))``; a plan's text
    of model call ``k`` by its schedules)."""
    import sdadapt.jobs.generate as job
    import sdadapt.jobs.generate_hires as hires

    seen = []

    def sample_image(system, prompts, options, **_):
        seen.append((list(prompts), dict(options)))
        return torch.zeros(len(prompts), 3, 32, 32)

    monkeypatch.setattr(hires, "sample_image", sample_image)
    monkeypatch.setattr(job, "load_system", lambda *a, **k: toy)
    job.run_generate(model="toy", prompt=prompt, negative=negative, out=tmp_path / "g.png", steps=STEPS,
                     sampler="ddim", seed=1, guidance=2.0, log=lambda _: None)
    (prompts, options), = seen

    def condition(text):
        with torch.no_grad():
            return toy.condition(toy.tokenize([text]))

    plan = options["plan"]
    if plan is None:
        return [condition(prompts[0])] * STEPS, [condition(options["negative"])] * STEPS
    texts, negatives = [condition(t) for t in plan.texts], [condition(t) for t in plan.negative_texts]
    (schedule, weight), = plan.parts
    assert weight == 1.0
    return [texts[schedule.at(k)] for k in range(STEPS)], [negatives[plan.negative.at(k)] for k in range(STEPS)]


@pytest.mark.parametrize("prompt, negative", [
    ("a (red:1.3) circle", "(blue:1.2)"),
    ("a [red:(blue:1.2):0.5] circle", "[green|(red)]"),
    ("a [(red:1.4)|blue] circle", ""),
    (r"a \(red\) circle", ""),  # (an escaped bracket: generate's one removal leaves the literal "(red)")
])
def test_toy_inversion_reads_emphasis_as_generate(toy, prompt, negative, monkeypatch, tmp_path):
    conds, negatives = _generate_conditions(toy, prompt, negative, monkeypatch, tmp_path)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = invert_image(toy, image, prompt, negative=negative, method="ddim", num_steps=STEPS, guidance=2.0)
    ours = inv.source_conditions()
    for k in range(STEPS):
        for key in ("context", "image_embeds"):
            assert torch.equal(ours[k][key], conds[k][key]), (k, key)
            # (ddim: the null embedding of step k is the negative's text states of that step)
    assert torch.equal(inv.null_embeddings, torch.stack([u["context"] for u in negatives]))


# ------------------------------------------------------------------------------------------------- (R)
def test_class_image_latent_files_are_shared_out_across_the_ranks(tmp_path, monkeypatch):
    """(R) ``--cache-latents-to-disk`` under torchrun with ``--reg-data-dir``: kohya's ``new_cache_latents`` split
    (image ``i`` by process ``i % num_processes``) covers the reg subsets too (``DatasetGroup.new_cache_latents``
    walks every dataset, sd-scripts@48d368fa library/train_util.py:2625-2629; the reg images are a subset of the
    DreamBooth dataset). The class images' files must be written once across the ranks, as the training images'."""
    from _fast_dist import logged_writes
    from test_disk_latents_data_parallel import _images, _logging_writes
    from test_train_data_parallel import _torchrun

    from sdadapt.training import kohya_latent_files

    images = _images(tmp_path / "imgs")
    reg = _images(tmp_path / "reg")
    for caption in reg.glob("*.txt"):
        caption.write_text("a photo")
    for png in reg.glob("*.png"):
        png.rename(png.with_name("c" + png.name))
    for txt in reg.glob("img*.txt"):
        txt.rename(txt.with_name("c" + txt.name))
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_latent_files, "write_npz_latents", _logging_writes(log))
    args = ["train", "lora", "--model", "toy", "--images", str(images), "--reg-data-dir", str(reg), "--steps", "1",
            "--batch-size", "1", "--seed", "1", "--cache-latents-to-disk", "--rank", "2",
            "-o", str(tmp_path / "a.safetensors")]
    _torchrun(args, tmp_path)  # (each rank's exit status checked)
    names = [name for _, name in logged_writes(log)]
    assert sorted(names) == sorted(set(names)), sorted(names)  # (each file written once, by one rank)
    assert sum(name.startswith("cimg") for name in names) == 5


# ------------------------------------------------------------------------------------------------- (C)
def test_one_composed_condition_is_the_plan_of_it_at_every_step():
    """(C) ``invert_latents(cond=Composed(...))``: the loops take one :class:`Composed` as it is at every step
    (``plan_pivot``, ``per_step``), but the result was built with ``_detach(cond)``, a ``TypeError`` ("a condition
    must be a tensor or a dict of tensors") raised after the whole null-text optimisation. One ``Composed`` is now the
    plan ``[Composed] * n``, bit for bit."""
    from test_inversion import TinyDenoiser, _schedule

    from sdadapt.inversion import invert_latents
    from sdadapt.inversion.core import Composed
    from sdadapt.inversion.invert import sample_inversion

    model, ac = TinyDenoiser(), _schedule(torch.float32)
    g = torch.Generator().manual_seed(3)
    x0, a, b, u = (torch.randn(1, *s, generator=g) for s in ((4, 8, 8), (3, 8), (3, 8), (3, 8)))
    both = Composed(((a, 1.0), (b, 0.5)))
    for method in ("null-text", "ddim"):
        one = invert_latents(model, x0, both, u, alphas_cumprod=ac, num_steps=3, inner_steps=2, method=method)
        listed = invert_latents(model, x0, [both] * 3, u, alphas_cumprod=ac, num_steps=3, inner_steps=2, method=method)
        for name in ("x_T", "null_embeddings"):
            assert torch.equal(getattr(one, name), getattr(listed, name)), (method, name)
        assert torch.equal(sample_inversion(model, one), sample_inversion(model, listed))


# ------------------------------------------------------------------------------------------------- (M)
def test_invert_job_leaves_out_comments_as_generate(tmp_path):
    """(M) A1111's "Enable comments" (``generate``'s default: ``#`` to the end of the line is left out of the prompt
    and the negative, ``run_generate``'s ``strip_comments``): the ``invert`` job read ``# ...`` as caption words,
    so its inversion conditioned on another text than ``generate`` samples. Now the same texts, bit for bit, as
    giving the text without its comments; ``comments=False`` keeps ``#`` as text; an all-comments caption is refused."""
    from sdadapt.images import write_png
    from sdadapt.inversion import load_inversion
    from sdadapt.inversion.job import run_invert

    image = tmp_path / "in.png"
    write_png(image, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)

    def inverted(name, prompt, negative, edit, **kw):
        run_invert(image, prompt=prompt, negative=negative, out=tmp_path / f"{name}.png", method="ddim", steps=2,
                   edit_prompt=edit, **kw)
        return load_inversion(tmp_path / f"{name}.safetensors")

    commented = inverted("c", "a red circle # try 2\non a white background", "# nothing\nblue", "a blue circle # old")
    plain = inverted("p", "a red circle \non a white background", "\nblue", "a blue circle \n")
    kept = inverted("k", "a red circle # try 2\non a white background", "# nothing\nblue", "a blue circle # old",
                    comments=False)
    for key in ("context", "image_embeds"):
        assert torch.equal(commented.cond[key], plain.cond[key])
        assert torch.equal(commented.uncond[key], plain.uncond[key])
    assert torch.equal(commented.null_embeddings, plain.null_embeddings)
    assert not torch.equal(kept.cond["context"], plain.cond["context"])
    edits = {n: (tmp_path / f"{n}-edit.png").read_bytes() for n in ("c", "p", "k")}
    assert edits["c"] == edits["p"] != edits["k"]
    with pytest.raises(ValueError, match="all # comments"):
        run_invert(image, prompt="# only a note", out=tmp_path / "x.png", method="ddim", steps=2)


# ------------------------------------------------------------------------------------------------- (E)
def test_text_encoder_output_files_are_shared_out_across_the_ranks(tmp_path, monkeypatch):
    """(E) ``--cache-text-encoder-outputs-to-disk`` under torchrun: kohya's ``new_cache_text_encoder_outputs``
    (sd-scripts@48d368fa library/train_util.py:1314-1327: ``if i % num_processes != process_index: continue``, then
    ``accelerator.wait_for_everyone()``, 2651) makes each image's file once across the processes, as its latent
    files; sdadapt shares the latent files out that way (``KohyaLatentFiles.share_out``) but not these."""
    from _fast_dist import logged_writes
    from test_cache_files_followups_ranks import _logging_writes
    from test_train_data_parallel import _torchrun
    from tiny_checkpoints import tiny_sdxl_file
    from train_inputs import captioned_pngs

    from sdadapt.training import kohya_text_files

    images = captioned_pngs(tmp_path / "imgs", [(16, 16)] * 4, caption=[f"sks toy, photo {i}" for i in range(4)])
    log = tmp_path / "writes.log"
    monkeypatch.setattr(kohya_text_files, "write_npz_text_outputs", _logging_writes(log))  # (the forks inherit it)
    args = ["train", "lora", "--model", str(tiny_sdxl_file(tmp_path / "sdxl.safetensors")), "--images", str(images),
            "--resolution", "16", "--steps", "1", "--batch-size", "1", "--seed", "1", "--no-text-encoder",
            "--rank", "2", "--cache-text-encoder-outputs-to-disk", "-o", str(tmp_path / "a.safetensors")]
    _torchrun(args, tmp_path)  # (each rank's exit status checked)
    names = [name for _, name in logged_writes(log)]
    assert len(names) == 4 and sorted(set(names)) == sorted(names), sorted(names)


def test_invert_cli_no_comments_reaches_the_job(tmp_path, monkeypatch):
    """``invert --no-comments`` hands ``comments=False`` to the job (``generate``'s flag); without it, ``True``."""
    import sdadapt.inversion.job as job
    from sdadapt.cli import main

    seen = []

    def stop(*args, **kw):
        seen.append(kw["comments"])
        raise ValueError("stop here")

    monkeypatch.setattr(job, "run_invert", stop)
    base = ["invert", str(tmp_path / "in.png"), "--prompt", "a # b", "-o", str(tmp_path / "out.png")]
    assert main(base) == 2 and main([*base, "--no-comments"]) == 2
    assert seen == [True, False]
