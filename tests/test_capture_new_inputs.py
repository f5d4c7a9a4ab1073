"""``CapturedStep`` with the per-step inputs fit can send it: a replay must read THIS step's values.

A CUDA graph replays the kernels it recorded on the tensors it recorded: ``CapturedStep`` copies
each new prepared batch into the graph's static buffers (every pytree leaf, nested dicts included)
and keys its graphs on the batch layout (the dict structure and every tensor's shape/dtype), so a
mask present or absent, or a 152-token prompt instead of a 77-token one, warms up and captures a
graph of its own. The inputs checked here: kohya's masked loss (``"loss_mask"``), weighted captions
(``{"ids", "weights"}`` as the conditioning), cached text conditioning, long-prompt ids, the random
noise-offset / ip-noise strengths (drawn before the replay), flipped latents, the class batch
(``prior=``) and the max-norm pass (``after_update``).

Without a GPU the graph API is replaced by stand-ins (conftest's ``fake_cuda_graphs``) and this
file's recording graph: at capture it keeps references to the tensors the step reads (the
``prepared`` mapping :func:`~sdadapt.training.step.step_loss` gets), and at each replay it records
their contents — what a real replay would read. Those reads must equal, step for step, what the
eager step reads (``train_step`` on the same seed and batches). The ``test_cuda_*`` tests (skipped
without CUDA; ``benchmarks/gpu_check.sh`` runs them) compare captured and eager ``fit`` on the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from fit_runs import capturable_optimizers
from tiny_systems import tiny_diffusers_system
from torch import nn
from torch.utils import _pytree as pytree

from sdadapt.images import encode_png
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import diffusion as D
from sdadapt.training import step as step_module
from sdadapt.training import step_capture
from sdadapt.training.data import (
    CaptionOptions,
    Dataset,
    encode_buckets,
    find_images,
    plan_dataset,
    records_from_tensors,
)
from sdadapt.training.loss_masks import LossMaskSource
from sdadapt.training.step import StepConfig, TrainState, train_step

diffusers = pytest.importorskip("diffusers")
# imported now: the graph stand-ins replace torch.cuda.Stream, which diffusers' lazy imports annotate with
_ = diffusers.AutoencoderKL, diffusers.UNet2DConditionModel


# ------------------------------------------------------------------------------ the recording graph
class _Reads:
    """What the steps read, in order: one ``(treespec, leaves)`` per step (``prepared`` as
    ``step_loss`` gets it at the outermost call; the class batch is nested in it)."""

    def __init__(self) -> None:
        self.log: list[tuple[pytree.TreeSpec, list[object]]] = []
        self.capturing: _RecordingGraph | None = None
        self.depth = 0

    def take(self) -> list[tuple[pytree.TreeSpec, list[object]]]:
        out, self.log = self.log, []
        return out


class _RecordingGraph:
    """A stand-in CUDA graph: its capture ran the step eagerly once (conftest's convention) and kept
    references to the tensors the step read; ``replay()`` records their contents now."""

    reads: _Reads

    def __init__(self) -> None:
        self.replays = 0
        self.captured: list[tuple[pytree.TreeSpec, list[object]]] = []

    def register_generator_state(self, generator: torch.Generator) -> None:
        pass

    def replay(self) -> None:
        self.replays += 1
        for spec, leaves in self.captured:
            self.reads.log.append((spec, [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]))


@pytest.fixture()
def graph_reads(fake_cuda_graphs, monkeypatch) -> _Reads:
    """conftest's stand-ins, with a graph that records what each replay would read, and a spy on
    ``step_loss`` (eager steps, the warm-ups and the capture) recording what the step reads."""
    reads = _Reads()
    graph = type("RecordingGraph", (_RecordingGraph,), {"reads": reads})

    @contextlib.contextmanager
    def capture(g, stream=None):
        reads.capturing = g
        try:
            yield
        finally:
            reads.capturing = None

    real = step_module.step_loss

    def spy(model, prepared, config, extra_loss=None, **kwargs):
        if reads.depth == 0:
            leaves, spec = pytree.tree_flatten(dict(prepared))
            if reads.capturing is not None:  # references: what the graph reads at every replay
                reads.capturing.captured.append((spec, leaves))
            else:
                reads.log.append((spec, [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]))
        reads.depth += 1
        try:
            return real(model, prepared, config, extra_loss, **kwargs)
        finally:
            reads.depth -= 1

    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(step_module, "step_loss", spy)
    monkeypatch.setattr(step_capture, "step_loss", spy)
    return reads


def _same_reads(eager: list, captured: list) -> None:
    assert len(eager) == len(captured)
    for i, ((spec_a, a), (spec_b, b)) in enumerate(zip(eager, captured)):
        assert spec_a == spec_b, f"step {i + 1}: the replayed graph has another batch layout\n{spec_a}\n{spec_b}"
        for x, y in zip(a, b, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"step {i + 1}: a replay read another value (stale static input)"
            else:
                assert x == y


def _field(reads: list, path: str) -> list[torch.Tensor]:
    """The reads of one field, e.g. ``"['cond']['weights']"``, of the steps whose batch has it."""
    out = []
    for spec, leaves in reads:
        pairs, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(leaves, spec))
        fields = {pytree.keystr(k): v for k, v in pairs}
        if path in fields:
            out.append(fields[path])
    return out


def _one_warmup(monkeypatch) -> list[step_capture.CapturedStep]:
    """fit's CapturedStep with one warm-up step per layout (fewer steps per test); those made, in order."""
    made: list[step_capture.CapturedStep] = []
    real_init = step_capture.CapturedStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **{**kwargs, "warmup_steps": 1})
        made.append(self)

    monkeypatch.setattr(step_capture.CapturedStep, "__init__", init)
    return made


# ------------------------------------------------------------------------------ CapturedStep, layouts
class _CondModel(nn.Module):
    """``model(x, t, {"ids", "weights"}) -> (B, 4, h, w)``: reads the ids and their weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.emb = nn.Embedding(16, 4)

    def forward(self, x, t, cond):
        text = (self.emb(cond["ids"]) * cond["weights"].unsqueeze(-1)).mean(1)  # (B, 4)
        return self.conv(x) + text[:, :, None, None]


def _batch(seed: int, *, mask: bool, length: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"latents": torch.randn(2, 4, 4, 4, generator=g),
           "cond": {"ids": torch.randint(0, 16, (2, length), generator=g), "weights": 0.5 + torch.rand(2, length, generator=g)}}
    if mask:
        out["loss_mask"] = torch.rand(2, 1, 4, 4, generator=g)
    return out


_LAYOUTS = {"mask77": {"mask": True, "length": 77}, "plain77": {"mask": False, "length": 77},
            "mask152": {"mask": True, "length": 152}}
_ORDER = ["mask77", "mask77", "mask77", "plain77", "mask77", "mask152", "plain77", "mask152", "mask77", "plain77", "mask152"]


def test_each_replay_reads_this_steps_mask_weights_and_class_batch_in_its_own_layouts_graph(graph_reads):
    """Layouts switch mid-run (mask present/absent, 77/152 ids); each batch and class batch differs.
    Every replay must read this call's values, in a graph of this call's layout — as the eager step
    reads them — and draw nothing inside the graph (the generators end where the eager run's end)."""
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float()
    config = StepConfig(noise_offset=0.1, noise_offset_random_strength=True, input_perturbation=0.1,
                        input_perturbation_random_strength=True, loss="huber", huber_schedule="snr", max_grad_norm=1.0)
    torch.manual_seed(0)
    model = _CondModel()
    params = list(model.parameters())
    calls = [(_batch(i, **_LAYOUTS[name]), (_batch(100 + i, **_LAYOUTS[name]), 0.5)) for i, name in enumerate(_ORDER)]

    eager_state = TrainState(seed=3)
    for batch, prior in calls:
        train_step(model, batch, params=params, optimizer=torch.optim.SGD(params, lr=0.0), state=eager_state,
                   config=config, alphas_cumprod=ac, prior=prior)
    eager = graph_reads.take()

    state = TrainState(seed=3)
    step = step_capture.CapturedStep(model, params=params, optimizer=torch.optim.SGD(params, lr=0.0), config=config,
                                     alphas_cumprod=ac, warmup_steps=1)
    for batch, prior in calls:
        step(batch, state=state, prior=prior)
    captured = graph_reads.take()

    assert step.graph_count == 3 and len(step._graphs) == 3
    assert sum(entry.graph.replays for entry in step._graphs.values()) == len(_ORDER) - 3  # all but the warm-ups
    _same_reads(eager, captured)
    # the fields a stale copy would freeze do change from replay to replay (so the check above can fail)
    masks = _field(captured, "['loss_mask']")
    assert not torch.equal(masks[1], masks[2]) and not torch.equal(masks[2], masks[3])  # capture, replays
    weights = _field(captured, "['prior']['cond']['weights']")
    assert not torch.equal(weights[1], weights[2])
    assert torch.equal(state.generator.get_state(), eager_state.generator.get_state())


def test_a_host_tensor_among_the_inputs_of_a_gpu_step_is_refused_at_capture(fake_cuda_graphs, monkeypatch):
    """A graph reads a tensor on another device than its parameters only when it is captured (a
    0-dim host tensor becomes a kernel constant): the capture refuses it, naming the field (which
    field is off the device: :func:`_off_device`, below; here a stand-in says so on a CPU)."""
    model = _CondModel()
    params = list(model.parameters())
    step = step_capture.CapturedStep(model, params=params, optimizer=torch.optim.SGD(params, lr=0.0),
                                     config=StepConfig(), alphas_cumprod=torch.linspace(0.99, 0.01, 1000), warmup_steps=1)
    seen = []
    monkeypatch.setattr(step_capture, "_off_device", lambda prepared, device: seen.append(device) or ["['cond']['weights']"])
    batch = _batch(0, mask=False, length=77)
    step(batch, state=TrainState(seed=0))  # warm-up: eager, not checked
    with pytest.raises(step_capture.CaptureError, match=r"\['cond'\]\['weights'\] are tensors on another device"):
        step(batch, state=TrainState(seed=0))
    assert seen == [params[0].device] and step.graph_count == 0


def test_off_device_names_each_nested_field_on_another_device():
    prepared = {"x_t": torch.zeros(1), "cond": {"ids": torch.zeros(1), "weights": torch.zeros(1, device="meta")},
                "prior": {"loss_mask": torch.zeros(1, device="meta")}, "huber_c": 0.1}
    assert step_capture._off_device(prepared, torch.device("cpu")) == ["['cond']['weights']", "['prior']['loss_mask']"]


def test_batches_of_another_structure_get_a_graph_of_their_own(fake_cuda_graphs):
    """Two conditionings of the same tensor shapes under other names (a graph reads the fields it
    was captured with): one graph each, not one graph fed the other's fields."""
    model = _CondModel()
    params = list(model.parameters())
    step = step_capture.CapturedStep(lambda x, t, c: model(x, t, {"ids": c.get("ids", c.get("tokens")), "weights": c["weights"]}),
                                     params=params, optimizer=torch.optim.SGD(params, lr=0.0), config=StepConfig(),
                                     alphas_cumprod=torch.linspace(0.99, 0.01, 1000), warmup_steps=1)
    state = TrainState(seed=0)
    for i in range(4):
        batch = _batch(i, mask=False, length=77)
        if i >= 2:
            batch["cond"] = {"tokens": batch["cond"]["ids"], "weights": batch["cond"]["weights"]}
        step(batch, state=state)
    assert len(step._graphs) == step.graph_count == 2  # (each: a warm-up, then its capture)


def test_constants_of_another_type_get_a_graph_of_their_own():
    assert step_capture._layout([True]) != step_capture._layout([1]) != step_capture._layout([1.0])


# ------------------------------------------------------------------------------ fit, end to end
_CAPTIONS = ["a (red:1.5) cat, [blue] sky", "plain words", "((x)) " + "ab " * 40, "a [[dim]] (dog:0.7)"]


def _masked_folder(root):
    """Four RGBA 16x16 PNGs (random alpha: the loss masks) with weighted captions."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(_CAPTIONS):
        (root / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)))
        (root / f"{i}.txt").write_text(caption)
    return root


def _sd_dataset(system, folder) -> Dataset:
    records, _ = find_images(folder)
    plan_dataset(records, resolution=16, buckets=False)
    dataset = Dataset(records, flip=True, loss_masks=LossMaskSource())
    encode_buckets(dataset, lambda pixels: system.encode_images(pixels.to(system.alphas_cumprod.device)))
    return dataset


_SD_FIT = FitConfig(steps=6, batch_size=2, learning_rate=1e-3, warmup_steps=0, weighted_captions=True, scale_weight_norms=0.5,
                    step=StepConfig(noise_offset=0.1, noise_offset_random_strength=True, input_perturbation=0.1,
                                    input_perturbation_random_strength=True))


def test_fit_replays_read_each_batchs_masks_weighted_long_ids_and_flips(tmp_path, graph_reads, monkeypatch):
    """Masked loss (alpha masks, flipped with their latents), weighted 150-token captions, random
    noise-offset / ip-noise strengths and the max-norm pass on a tiny SD model: each replay of fit's
    captured step reads the batch fit drew for it, as the eager run's step reads it."""
    folder = _masked_folder(tmp_path / "imgs")

    def run(cuda_graph: bool):
        system = tiny_diffusers_system(tmp_path, max_token_length=150)
        fit(system, METHODS["lora"].adapt(system, seed=1, text_encoder=False), _sd_dataset(system, folder),
            config=dataclasses.replace(_SD_FIT, cuda_graph=cuda_graph))
        return graph_reads.take()

    eager = run(False)
    made = _one_warmup(monkeypatch)
    captured = run(True)
    assert len(made) == 1 and made[0].graph_count == 1 and len(captured) == 6
    _same_reads(eager, captured)
    ids, masks = _field(captured, "['cond']['ids']"), _field(captured, "['loss_mask']")
    assert ids[0].shape[-1] == 152 and len({tuple(w.flatten().tolist()) for w in _field(captured, "['cond']['weights']")}) > 2
    assert not all(torch.equal(masks[1], m) for m in masks[2:])  # the replays' masks differ from the capture's


def test_fit_replays_read_each_batchs_cached_conditioning_and_class_batch(graph_reads, monkeypatch):
    """Cached text conditioning (the batches carry the text encoder's rows, not ids) with a class
    batch of its own (regularisation images): each replay reads this step's rows."""
    def run(cuda_graph: bool):
        system = build_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
        images, captions = concept_data("cross", 4, seed=0)
        dataset = Dataset(records_from_tensors(images, captions), captions=CaptionOptions(dropout=0.5))
        encode_buckets(dataset, system.encode_images, images=images)
        reg = Dataset(records_from_tensors(images.flip(0), captions[::-1]))
        encode_buckets(reg, system.encode_images, images=images.flip(0))
        fit(system, adaptation, dataset, prior=(reg, 0.5),
            config=FitConfig(steps=6, batch_size=2, learning_rate=1e-3, warmup_steps=0, cache_text_encoder_outputs=True,
                             cuda_graph=cuda_graph))
        return graph_reads.take()

    eager = run(False)
    made = _one_warmup(monkeypatch)
    captured = run(True)
    assert made[0].graph_count >= 1 and len(captured) == 6
    _same_reads(eager, captured)
    context = _field(captured, "['cond']['context']")
    assert context[0].dtype.is_floating_point and len({c.sum().item() for c in context[1:]}) > 1


# ------------------------------------------------------------------------------ on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _assert_trains_alike(eager, captured, made) -> None:
    assert made and made[-1].graph_count >= 1  # it did capture (not only eager warm-ups)
    assert captured[0] == pytest.approx(eager[0], rel=2e-3, abs=1e-5)
    for a, b in zip(eager[1], captured[1], strict=True):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4)


def _cuda_sd_run(tmp_path, config: FitConfig, *, max_token_length: int = 75, device: str = "cuda"):
    folder = tmp_path / "imgs"
    if not folder.exists():
        _masked_folder(folder)
    system = tiny_diffusers_system(tmp_path, max_token_length=max_token_length).to(device)
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    losses = fit(system, adaptation, _sd_dataset(system, folder), config=config)
    return losses, [p.detach().cpu().clone() for p in adaptation.params]


@needs_cuda
@pytest.mark.parametrize("what", ["masked-weighted-long", "max-norm-noise-strength", "cached-text"])
def test_cuda_fit_captured_matches_eager_on_the_new_inputs(tmp_path, monkeypatch, what):
    """On a GPU, a tiny SD model: the captured run (warm-ups, capture, replays) trains like the eager
    run on masked loss + weighted 150-token captions, max-norm + random noise-offset / ip-noise
    strengths, and cached text conditioning — to bf16-backward tolerance."""
    base = FitConfig(steps=8, batch_size=2, learning_rate=1e-3, warmup_steps=0, step=StepConfig(mixed_precision="bf16"))
    length = 75
    if what == "masked-weighted-long":
        config, length = dataclasses.replace(base, weighted_captions=True), 150
    elif what == "max-norm-noise-strength":
        config = dataclasses.replace(base, scale_weight_norms=0.05, step=dataclasses.replace(
            base.step, noise_offset=0.1, noise_offset_random_strength=True, input_perturbation=0.1,
            input_perturbation_random_strength=True))
    else:
        config = dataclasses.replace(base, cache_text_encoder_outputs=True)
    capturable_optimizers(monkeypatch)  # (the same AdamW arithmetic on both sides)
    eager = _cuda_sd_run(tmp_path, config, max_token_length=length)
    made = _one_warmup(monkeypatch)
    captured = _cuda_sd_run(tmp_path, dataclasses.replace(config, cuda_graph=True), max_token_length=length)
    _assert_trains_alike(eager, captured, made)


@needs_cuda
def test_cuda_captured_step_switches_graphs_with_the_mask_and_the_prompt_length():
    """On a GPU: layouts switching mid-run (mask present/absent, 77/152 ids) each get their graph,
    and the captured steps train like eager steps (float32, same batches and draws)."""
    ac = D.alphas_cumprod_of(D.noise_schedule("scaled_linear")).float().cuda()
    config = StepConfig(noise_offset=0.1, noise_offset_random_strength=True)

    def run(captured: bool):
        torch.manual_seed(0)
        model = _CondModel().cuda()
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
        state = TrainState(seed=3, device="cuda")
        step = step_capture.CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac,
                                         warmup_steps=1) if captured else None
        losses = []
        for i, name in enumerate(_ORDER):
            batch = pytree.tree_map(lambda t: t.cuda(), _batch(i, **_LAYOUTS[name]))
            out = (step(batch, state=state) if step else
                   train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac))
            losses.append(out["loss"].item())
        return losses, [p.detach().cpu() for p in params], step

    eager, captured = run(False), run(True)
    assert captured[2].graph_count == 3
    assert captured[0] == pytest.approx(eager[0], rel=1e-4, abs=1e-6)
    for a, b in zip(eager[1], captured[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
