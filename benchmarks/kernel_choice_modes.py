"""Host time of the step's kernel-choice modes: each pushed on its own vs sharing one mode.

Half-precision norms, per-call attention orders and fused LoRA linear layers are each a torch function mode
(``sdadapt.training.engine_backward.BackwardKeepingMode``): every torch call of the step goes through their
Python ``__torch_function__``. An eager step on a GPU is host-bound (issue 16), so that Python is step time.
Modes that act on disjoint functions now share one entry of torch's mode stack (one ``__torch_function__`` per
call); before, each was pushed on its own. This times an eager forward+backward (no optimiser) of a diffusers
``UNet2DConditionModel`` in SD1.5's block layout (the real number of torch calls) with narrow channels
(``--channels``, default 32,64,128,128) and small latents (``--latent``, default 16), batch 1, bf16 autocast on
the CPU, LoRA r16 on the attention projections (to_q/k/v/out.0) — so that host work is most of a step:

``hooks``      no kernel-choice mode: the LoRA hooks, torch's attention choice, autocast's float32 norms
``own``        the three choices, each mode pushed on its own (``functions`` set to ``None``: as before)
``shared``     the three choices sharing one mode (what ``train_step`` / ``CapturedStep`` enter now)

The per-call orders: every attention call of the first kind the model makes runs ``math``, the rest
``flash`` then ``math``. Rounds alternate the variants; the table shows medians and the calls that reach a
kernel-choice mode in one step (each mode's count summed for ``own``: a call goes through each mode).
``own`` vs ``shared`` is host time only (the same kernels run); ``hooks`` runs other kernels too (float32
norms, the LoRA's separate delta, torch's attention choice), so its difference is not all host time.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/kernel_choice_modes.py            # ~1 min
    python benchmarks/kernel_choice_modes.py --device cuda --channels 320 640 1280 1280 --latent 64

Prints a Markdown table and writes ``benchmarks/results/kernel_choice_modes[-cuda].json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import environment, sd15_layout_unet, sync, write_result

import sdadapt
from sdadapt.training import attention, fused_lora, norm_precision
from sdadapt.training.attention import record_attention_calls, sdpa_backends
from sdadapt.training.engine_backward import BackwardKeepingMode, _SharedModes
from sdadapt.training.fused_lora import fused_lora_linear
from sdadapt.training.norm_precision import half_precision_norms

VARIANTS = ("hooks", "own", "shared")
_MODES = (norm_precision._HalfPrecisionNorms, attention._PerCallBackends, fused_lora._FusedLoRALinear)


@contextmanager
def _choices(variant: str, device_type: str, per_call: dict) -> Iterator[None]:
    """The step's three kernel choices as ``variant`` enters them (``hooks``: none)."""
    saved = [cls.functions for cls in _MODES]
    with ExitStack() as stack:
        if variant != "hooks":
            if variant == "own":
                for cls in _MODES:
                    cls.functions = None
                stack.callback(lambda: [setattr(cls, "functions", f) for cls, f in zip(_MODES, saved)])
            for context in (sdpa_backends(("flash", "math"), per_call), half_precision_norms(True, device_type),
                            fused_lora_linear()):
                stack.enter_context(context)
        yield


@contextmanager
def _counted_mode_calls(counts: dict[str, int], variant: str) -> Iterator[None]:
    """Counts into ``counts[variant]`` the calls that reach a kernel-choice mode's ``__torch_function__``."""
    patched = ((BackwardKeepingMode, BackwardKeepingMode.__torch_function__),
               (_SharedModes, _SharedModes.__torch_function__))

    def counting(original):
        def wrapper(self, *args, **kwargs):
            counts[variant] = counts.get(variant, 0) + 1
            return original(self, *args, **kwargs)
        return wrapper

    for cls, original in patched:
        cls.__torch_function__ = counting(original)
    try:
        yield
    finally:
        for cls, original in patched:
            cls.__torch_function__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 128])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = sd15_layout_unet(args.channels, args.latent).to(device).requires_grad_(False)
    sdadapt.inject(unet, ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"], sdadapt.LoRAConfig(rank=16, init="gaussian"))
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device)
    t, ehs = torch.tensor([500], device=device), torch.randn(1, 77, 768, generator=gen).to(device)

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return unet(x, t, ehs).sample.float().pow(2).mean()

    with torch.no_grad():
        calls = record_attention_calls(loss)
    per_call = {calls[0].signature: ("math",)}

    def step(variant: str) -> None:
        with _choices(variant, device.type, per_call):
            loss().backward()

    counts: dict[str, int] = {}
    for variant in VARIANTS:
        for _ in range(3):
            step(variant)
        with _counted_mode_calls(counts, variant):
            step(variant)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.steps):
        for variant in (VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]):
            sync(device)
            start = time.perf_counter()
            step(variant)
            sync(device)
            times[variant].append(time.perf_counter() - start)
    medians = {variant: statistics.median(ts) * 1e3 for variant, ts in times.items()}
    rows = [{"variant": v, "ms": round(medians[v], 2), "mode_calls": counts.get(v, 0),
             "vs_hooks_ms": round(medians[v] - medians["hooks"], 2)} for v in VARIANTS]
    saved = medians["own"] - medians["shared"]
    print(f"channels {args.channels}, latent {args.latent}, batch 1, LoRA r16 on attention, {device.type}, "
          f"{torch.get_num_threads()} threads, median of {args.steps}")
    print("| variant | ms / step | vs hooks | calls reaching a mode a step |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['ms']:.2f} | {row['vs_hooks_ms']:+.2f} | {row['mode_calls']} |")
    avoided = counts["own"] - counts["shared"]
    print(f"sharing saves {saved:.2f} ms a step: {avoided} fewer calls reaching a mode, "
          f"{saved * 1e3 / max(avoided, 1):.2f} µs each")
    suffix = "-cuda" if device.type == "cuda" else ""
    out = args.out or Path(__file__).parent / "results" / f"kernel_choice_modes{suffix}.json"
    write_result(out, {"environment": environment(), "channels": args.channels, "latent": args.latent,
                       "steps": args.steps, "rows": rows, "saved_ms": round(saved, 3)})


if __name__ == "__main__":
    main()
