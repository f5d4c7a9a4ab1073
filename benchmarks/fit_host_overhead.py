"""Host time per optimiser step of ``fit`` in dataset mode (cached latents), default options.

Issue 16: on a GPU the training step can be host-bound, so the Python ``fit`` runs per step
(``draw()``: epoch batches, caption draws, flips, size conditioning, tokenizing, host → device
copies; ``train_step``/``prepare_batch``; the one loss read) matters. This measures it on CPU:

``toy``   — the toy system + a LoRA (``METHODS["lora"]``), 16 images 32 px, batch 4;
``sd``    — a tiny random diffusers SD1 system (``tests/embedding_models.py`` tokenizer / CLIP
            text encoder, 2-block UNet and VAE, 16 px images, 8×8 latents) + a LoRA, batch 4;
``null``  — the same data through a trivial system: toy tokenizer, ``condition`` an embedding
            lookup, ``denoiser(x, t, c) = x · p`` with one trained scalar ``p`` — what is left is
            the Python per step (the model costs ~nothing).

Per step (median over the steps after a warm-up) it reports ``total`` (one ``on_step`` to the next),
``pre`` (from ``on_step`` to the call of ``train_step``: ``draw()`` and the loop's own work),
``prepare`` (``sdadapt.training.step.prepare_batch``, timed by a wrapper) and ``rest``
(``train_step`` returning → ``on_step``: the loss read). With ``--profile`` each worker also runs the
``null`` system under cProfile and reports the cumulative µs per step of the per-step functions
(inflated by the profiler: compare trees, not absolute values).

Each tree is measured in its own processes (``PYTHONPATH=<tree>/src``), alternating
base/head/head/base …, ``OMP_NUM_THREADS=1``; the table shows the median over the rounds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fit_host_overhead.py                    # this tree only
    git worktree add /tmp/base <commit>
    OMP_NUM_THREADS=1 python benchmarks/fit_host_overhead.py --base /tmp/base --rounds 5 --profile

Writes ``benchmarks/results/fit_host_overhead-cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SYSTEMS = ("null", "toy", "sd")
STEPS = {"null": (20, 200), "toy": (10, 60), "sd": (10, 60)}  # (warm-up, measured)
#: functions whose cumulative time per step ``--profile`` reports (name, file suffix)
PROFILED = (("draw", "methods/fit.py"), ("dataset_batch", "methods/fit.py"), ("train_step", "training/step.py"),
            ("prepare_batch", "training/step.py"), ("step_loss", "training/step.py"),
            ("clip_and_step", "training/step.py"), ("_read_step", "methods/fit.py"), ("_mean_loss", "methods/fit.py"),
            ("epoch_batches", "training/data.py"), ("apply", "training/data.py"), ("flip_draws", "training/data.py"),
            ("size_conditioning", "training/data.py"), ("batch_latents", "training/data.py"),
            ("tokenize", "fit_host_overhead.py"), ("copy_to_device", "training/host_syncs.py"))


# ------------------------------------------------------------------------------- worker side
def _null_system():
    import torch
    from torch import nn

    from sdadapt.toy.tokenizer import ToyTokenizer
    from sdadapt.training import diffusion
    from sdadapt.training.host_syncs import copy_to_device

    class NullSystem(nn.Module):
        prediction_type = "epsilon"

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = ToyTokenizer()
            betas = diffusion.noise_schedule("linear", beta_start=0.0001, beta_end=0.02)
            self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod_of(betas).float(), persistent=False)
            self.embed = nn.Embedding(len(self.tokenizer), 8).requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(()))

        @staticmethod
        def encode_images(images):
            return torch.nn.functional.pixel_unshuffle(images, 2)

        def tokenize(self, prompts):
            return copy_to_device(self.tokenizer(prompts), self.alphas_cumprod.device)

        def condition(self, ids):
            return self.embed(ids)

        def denoiser(self):
            return lambda x, t, cond: x * self.scale

    class ScalarAdaptation:
        def __init__(self, system: NullSystem) -> None:
            self.params = [system.scale]

        def save(self, path, *, metadata=None):
            return Path(path)

        def remove(self) -> None:
            pass

    system = NullSystem()
    return system, ScalarAdaptation(system), 32


def _toy_system():
    from sdadapt.methods import METHODS
    from sdadapt.toy.system import build_toy

    system = build_toy(seed=1)
    return system, METHODS["lora"].adapt(system, seed=1), 32


def _sd_system(folder: Path):
    import diffusers
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from embedding_models import tiny_clip_text, tiny_tokenizer

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.methods import METHODS

    tokenizer = tiny_tokenizer(folder / "tok", max_length=77)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), cross_attention_dim=32, attention_head_dim=4,
                                          norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text_encoder = tiny_clip_text(hidden=32, seed=1, max_length=77, projection_dim=32)
    extra = {}
    if "max_token_length" in inspect.signature(DiffusersSystem.__init__).parameters:  # (newer trees)
        extra["max_token_length"] = 75
    system = DiffusersSystem(unet, vae, text_encoder, tokenizer, {"prediction_type": "epsilon"}, **extra)
    system.requires_grad_(False)
    system.eval()
    return system, METHODS["lora"].adapt(system, seed=1), 16


def _dataset(system, size: int):
    import torch

    from sdadapt.toy.evaluate import concept_data
    from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

    images, captions = concept_data("cross", 16, seed=0)
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
    dataset = Dataset(records_from_tensors(images, captions))
    encode_buckets(dataset, system.encode_images, images=images)
    return dataset


class _Timer:
    """Per-step timestamps around ``fit``'s call of ``train_step`` and ``prepare_batch``'s time."""

    def __init__(self) -> None:
        import importlib

        fit_module = importlib.import_module("sdadapt.methods.fit")  # (sdadapt.methods.fit is also the function)
        step_module = importlib.import_module("sdadapt.training.step")

        self.step_module, self.fit_module = step_module, fit_module
        self.on_step: list[float] = []
        self.enter: list[float] = []
        self.leave: list[float] = []
        self.prepare: list[float] = []
        self._prepare_now = 0.0
        original_step, original_prepare = fit_module.train_step, step_module.prepare_batch
        self._originals = (original_step, original_prepare)

        def train_step(*args, **kwargs):
            self.enter.append(time.perf_counter())
            self._prepare_now = 0.0
            out = original_step(*args, **kwargs)
            self.prepare.append(self._prepare_now)
            self.leave.append(time.perf_counter())
            return out

        def prepare_batch(*args, **kwargs):
            start = time.perf_counter()
            out = original_prepare(*args, **kwargs)
            self._prepare_now += time.perf_counter() - start
            return out

        fit_module.train_step, step_module.prepare_batch = train_step, prepare_batch

    def restore(self) -> None:
        self.fit_module.train_step, self.step_module.prepare_batch = self._originals

    def medians(self, warmup: int) -> dict[str, float]:
        """ms per step: total, pre (draw + loop), train_step, prepare_batch, rest (loss read → on_step)."""
        rows = []
        for i in range(max(1, warmup), len(self.on_step)):
            rows.append({"total": self.on_step[i] - self.on_step[i - 1], "pre": self.enter[i] - self.on_step[i - 1],
                         "train_step": self.leave[i] - self.enter[i], "prepare": self.prepare[i],
                         "rest": self.on_step[i] - self.leave[i]})
        return {k: 1e3 * statistics.median(r[k] for r in rows) for k in rows[0]}


def _fit_once(name: str, folder: Path, *, profile: bool = False) -> dict:
    import torch

    from sdadapt.methods.fit import FitConfig, fit

    torch.manual_seed(0)
    system, adaptation, size = {"null": _null_system, "toy": _toy_system, "sd": lambda: _sd_system(folder)}[name]()
    dataset = _dataset(system, size)
    warmup, measured = STEPS[name]
    config = FitConfig(steps=warmup + measured, batch_size=4, learning_rate=1e-4)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        fit(system, adaptation, dataset, config=config)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
        steps = warmup + measured
        out = {}
        for func, suffix in PROFILED:
            total = sum(v[3] for (file, _, fname), v in stats.items() if fname == func and file.endswith(suffix))
            out[func] = 1e6 * total / steps
        return {"profile_us_per_step": out}
    timer = _Timer()
    try:
        fit(system, adaptation, dataset, config=config, on_step=lambda progress: timer.on_step.append(time.perf_counter()))
    finally:
        timer.restore()
    return {"ms_per_step": timer.medians(warmup)}


def worker(systems: list[str], profile: bool) -> dict:
    import torch

    import sdadapt

    torch.set_num_threads(1)
    result = {"sdadapt": sdadapt.__file__, "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in systems:
            result["systems"][name] = _fit_once(name, Path(tmp))
            if profile and name == "null":
                result["systems"][name].update(_fit_once(name, Path(tmp), profile=True))
    return result


# ------------------------------------------------------------------------------- driver side
def _run_tree(tree: Path, systems: list[str], profile: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--systems", *systems] + (["--profile"] if profile else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker for {tree} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["sdadapt"]).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"the worker for {tree} imported {result['sdadapt']}: is sdadapt installed non-editable?")
    return result


def _median_of(runs: list[dict], system: str, section: str) -> dict[str, float]:
    values = [r["systems"][system][section] for r in runs if section in r["systems"][system]]
    return {k: statistics.median(v[k] for v in values) for k in values[0]} if values else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="another checkout (e.g. a git worktree) to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree (alternating)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--profile", action="store_true", help="also cProfile the null system's steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_host_overhead-cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.systems, args.profile)))
        return

    trees = {"head": REPO} if args.base is None else {"base": args.base.resolve(), "head": REPO}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    order = list(trees)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):  # base, head, head, base, ...
            started = time.perf_counter()
            runs[name].append(_run_tree(trees[name], args.systems, args.profile))
            print(f"round {r + 1}/{args.rounds} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    summary: dict = {name: {s: {"ms_per_step": _median_of(runs[name], s, "ms_per_step"),
                                "profile_us_per_step": _median_of(runs[name], s, "profile_us_per_step")}
                            for s in args.systems} for name in trees}
    columns = ("total", "pre", "train_step", "prepare", "rest")
    print(f"\nms per optimiser step (median of {args.rounds} processes × the steps' median), OMP_NUM_THREADS=1")
    print(f"{'system':6} {'tree':5} " + " ".join(f"{c:>10}" for c in columns) + "   per-round totals")
    for system in args.systems:
        for name in trees:
            row = summary[name][system]["ms_per_step"]
            totals = " ".join(f"{r['systems'][system]['ms_per_step']['total']:.3f}" for r in runs[name])
            print(f"{system:6} {name:5} " + " ".join(f"{row[c]:10.3f}" for c in columns) + f"   {totals}")
        if "base" in trees:
            b, h = summary["base"][system]["ms_per_step"], summary["head"][system]["ms_per_step"]
            print(f"{system:6} {'Δ':5} " + " ".join(f"{h[c] - b[c]:+10.3f}" for c in columns))
    if args.profile and "null" in args.systems:
        print("\nnull system under cProfile: cumulative µs per step (profiler-inflated; compare trees)")
        print(f"{'function':18} " + " ".join(f"{name:>10}" for name in trees))
        for func, _ in PROFILED:
            print(f"{func:18} " + " ".join(f"{summary[name]['null']['profile_us_per_step'].get(func, 0.0):10.1f}"
                                          for name in trees))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "fit_host_overhead", "machine": platform.platform(), "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "rounds": args.rounds, "steps": STEPS,
              "trees": {name: str(path) for name, path in trees.items()}, "summary": summary, "runs": runs}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
