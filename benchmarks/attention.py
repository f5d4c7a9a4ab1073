"""Which SDPA kernel is fastest for a UNet's attention, and what the choice is worth per training step.

One process builds a random-weight diffusers UNet (``--config tiny|sd15|sdxl``), records its
attention calls during one training forward (bf16 autocast on CUDA, all weights trainable, so every
call needs its backward) with :func:`sdadapt.training.attention.record_attention_calls`, then:

1. times each distinct call, forward + backward, with each backend (flash, efficient, cudnn, math):
   :func:`~sdadapt.training.attention.time_sdpa_backends` (attention only, per UNet step);
2. times the whole UNet forward + backward under torch's default choice, under the measured order
   (:func:`~sdadapt.training.attention.fastest_sdpa_backends`), with each kind of call on its own
   measured order (:func:`~sdadapt.training.attention.fastest_sdpa_backends_per_call`) and under each
   backend first (math as the fallback): what the choice changes end to end.

Usage::

    python benchmarks/attention.py                           # tiny, CPU (flash vs math)
    python benchmarks/attention.py --config sd15 --batch 1 8 # on the GPU (gpu_check.sh runs it)

Writes ``benchmarks/results/attention-<config>-<device>.json`` (``--out``) and, with ``--markdown``,
the tables as a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, sync  # noqa: E402

from sdadapt.training.attention import (  # noqa: E402
    SDPA_BACKENDS,
    fastest_sdpa_orders,
    record_attention_calls,
    sdpa_backends,
    time_sdpa_backends,
)

RESULTS = Path(__file__).resolve().parent / "results"
LATENT = {"tiny": 16, "sd15": 64, "sdxl": 128}
TOKENS = 77


def build(config: str, device: torch.device, batch: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIGS[config]).to(device).train()
    g = torch.Generator().manual_seed(seed)
    size, dim = LATENT[config], UNET_CONFIGS[config]["cross_attention_dim"]
    x = torch.randn(batch, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ehs = torch.randn(batch, TOKENS, dim, generator=g).to(device)
    added = None
    if config == "sdxl":
        added = {"text_embeds": torch.randn(batch, 1280, generator=g).to(device),
                 "time_ids": torch.randn(batch, 6, generator=g).to(device)}
    return unet, (x, t, ehs, added)


def step_fn(unet, inputs, device: torch.device):
    x, t, ehs, added = inputs
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = unet(x, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    return run


def median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(LATENT), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    results, lines = [], []
    for batch in args.batch:
        unet, inputs = build(args.config, device, batch)
        run = step_fn(unet, inputs, device)
        calls = record_attention_calls(run)
        table = time_sdpa_backends(calls, repeats=args.repeats)
        order, per_call = fastest_sdpa_orders(calls, repeats=args.repeats)
        lines += [f"### {args.config}, batch {batch}, {device.type}: {sum(c.count for c in calls)} attention calls per step, "
                  f"{len(calls)} distinct; measured order {', '.join(order)}", "",
                  "| call (B, H, Lq, Lk, E) | count | " + " | ".join(f"{b} ms" for b in SDPA_BACKENDS) + " |",
                  "|---|---:|" + "---:|" * len(SDPA_BACKENDS)]
        for i, call in enumerate(calls):
            shape = (*call.query[:3], call.key[2], call.query[3])
            cells = [("—" if table[b][f"call{i}"] is None else f"{table[b][f'call{i}'] * 1e3:.3f}") for b in SDPA_BACKENDS]
            lines.append(f"| {shape} {str(call.dtype).replace('torch.', '')} | {call.count} | " + " | ".join(cells) + " |")
        lines.append("| **attention per step** | | " + " | ".join(
            "—" if table[b]["total"] is None else f"**{table[b]['total'] * 1e3:.2f}**" for b in SDPA_BACKENDS) + " |")
        # each call on its own fastest kernel (fastest_sdpa_backends_per_call): the attention a step would take
        fastest = sum(c.count * min(t for b in SDPA_BACKENDS if (t := table[b][f"call{i}"]) is not None)
                      for i, c in enumerate(calls))
        lines += [f"| **each call on its fastest** | | **{fastest * 1e3:.2f}** ms |", ""]
        variants = {"torch default": (None, None), f"measured ({', '.join(order)})": (order, None),
                    "measured, each call its own order": (order, per_call)}
        variants.update({f"{b} first": ((b, "math") if b != "math" else ("math",), None)
                         for b in SDPA_BACKENDS if table[b]["total"] is not None})
        whole = {}
        for name, (backends, orders) in variants.items():
            with sdpa_backends(backends, orders):
                whole[name] = median_ms(run, device, args.repeats, args.warmup)
        base = whole["torch default"]
        lines += ["| UNet forward + backward | ms | vs torch default |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.1f} | {base / ms:.2f}x |" for name, ms in whole.items()]
        lines.append("")
        results.append({"batch": batch, "order": list(order), "per_call": {k: list(v) for k, v in per_call.items()},
                        "attention_each_call_fastest_ms": fastest * 1e3, "whole_step_ms": whole,
                        "calls": [{"query": c.query, "key": c.key, "value": c.value, "dtype": str(c.dtype), "count": c.count}
                                  for c in calls],
                        "attention_ms": {b: {k: (None if v is None else (v if k == "unsupported" else v * 1e3))
                                             for k, v in table[b].items()} for b in SDPA_BACKENDS}})
        del unet, inputs, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    out = args.out or RESULTS / f"attention-{args.config}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "device": str(device), "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                               "results": results}, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
