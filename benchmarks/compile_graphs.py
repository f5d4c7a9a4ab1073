"""Graph breaks and recompiles of ``torch.compile`` on sdadapt-injected models (a table per config).

For each (model, adapter) case, on a random-weight diffusers UNet / transformers CLIP text model:

* ``breaks``: ``torch._dynamo.explain(model)(*inputs).graph_break_count`` (forward, no grad);
* ``frames``: graphs compiled by the first compiled forward + backward (1 = one graph);
* ``strength``: recompiles over three run-time strength changes (``set_scale`` / ``set_strength``);
* ``batch``: recompiles when the batch size goes 2 → 3 → 4 (1 = Dynamo's automatic dynamic
  batch dimension, then reused).

Dynamo's tracing does not depend on the device, so the CPU numbers hold for CUDA; ``--backend``
picks what compiles the traced graphs (``eager``: tracing only, the fastest).
``tests/test_compile_graphs.py`` pins the same properties on tiny models.

Usage::

    python benchmarks/compile_graphs.py                     # tiny UNet + CLIP, ~1-2 min on a CPU
    python benchmarks/compile_graphs.py --config sd15 --latent 8 --only "LoRA (attention)"   # SD1.5 UNet, CPU
    python benchmarks/compile_graphs.py --config sd15 --device cuda --backend inductor

Writes ``benchmarks/results/compile_graphs-<config>-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import CLIP_CONFIGS, UNET_CONFIGS  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.adapters import DoRAConfig, FullConfig, LoHaConfig, LoKrConfig, LoRAConfig  # noqa: E402
from sdadapt.embeddings import TokenRows, find_token_embedding  # noqa: E402
from sdadapt.hypernetworks import Hypernetwork, context_widths  # noqa: E402
from sdadapt.targets import TEXT_ENCODER, UNET_ATTENTION, UNET_LOCON  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_FOR = {"tiny": "tiny", "sd15": "clip-l", "sdxl": "clip-l"}
TOKENS = 8


def count(model: Callable, inputs: Callable[[int], tuple], change: Callable[[float], None], backend: str,
          params: list[torch.Tensor]) -> dict[str, int]:
    """breaks (explain), frames of the first compiled fwd+bwd, recompiles on strength and batch changes."""
    torch._dynamo.reset()
    with torch.no_grad():
        breaks = torch._dynamo.explain(model)(*inputs(2)).graph_break_count
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)

    def step(batch: int) -> None:
        out = compiled(*inputs(batch))
        if any(p.requires_grad for p in params):
            out.float().square().mean().backward()
        for p in params:
            p.grad = None

    step(2)
    frames = counter.frame_count
    for value in (0.5, 0.25, 1.0):
        change(value)
        step(2)
    strength = counter.frame_count - frames
    step(3)
    step(4)
    batch = counter.frame_count - frames - strength
    torch._dynamo.reset()
    return {"breaks": breaks, "frames": frames, "strength": strength, "batch": batch}


def unet_cases(config: str, latent: int, device: torch.device):
    from diffusers import UNet2DConditionModel

    dim = UNET_CONFIGS[config]["cross_attention_dim"]
    g = torch.Generator().manual_seed(1)
    fixed = {b: (torch.randn(b, 4, latent, latent, generator=g).to(device), torch.arange(b).to(device) * 97 + 10,
                 torch.randn(b, TOKENS, dim, generator=g).to(device)) for b in (2, 3, 4)}
    added = {}
    if UNET_CONFIGS[config].get("addition_embed_type") == "text_time":
        width = UNET_CONFIGS[config]["projection_class_embeddings_input_dim"] - 6 * UNET_CONFIGS[config]["addition_time_embed_dim"]
        added = {b: {"text_embeds": torch.randn(b, width, generator=g).to(device),
                     "time_ids": torch.randn(b, 6, generator=g).to(device)} for b in (2, 3, 4)}

    def build():
        torch.manual_seed(0)
        return UNet2DConditionModel(**UNET_CONFIGS[config]).to(device).eval()

    def run(unet):
        def forward(x, t, ctx, extra=None):
            return unet(x, t, ctx, added_cond_kwargs=extra).sample
        return forward

    def inputs(b):
        return (*fixed[b], added[b]) if added else fixed[b]

    adapters = {
        "LoRA (attention)": (UNET_ATTENTION, LoRAConfig(rank=4), False),
        "LoCon (kohya LoCon targets)": (UNET_LOCON, LoRAConfig(rank=4, conv_rank=2), False),
        "LoCon Tucker": (UNET_LOCON, LoRAConfig(rank=4, use_tucker=True), False),
        "LoHa": (UNET_LOCON, LoHaConfig(rank=2), False),
        "LoKr": (UNET_LOCON, LoKrConfig(rank=2), False),
        "DoRA (LoRA)": (UNET_ATTENTION, DoRAConfig(inner=LoRAConfig(rank=2)), False),
        "full": (UNET_ATTENTION, FullConfig(), False),
        "LoRA, training dropouts": (UNET_ATTENTION, LoRAConfig(rank=4, dropout=0.1, rank_dropout=0.1, module_dropout=0.1), True),
    }
    for label, (targets, adapter, train) in adapters.items():
        unet = build().train(train)
        handle = sdadapt.inject(unet, targets, adapter)
        yield f"UNet / {label}", run(unet), inputs, handle.set_scale, list(handle.parameters())
    unet = build()
    handle = sdadapt.inject(unet, UNET_ATTENTION, LoRAConfig(rank=4))
    sdadapt.batch_shared_input_adapters(handle)
    yield "UNet / LoRA + batch_shared_input_adapters", run(unet), inputs, handle.set_scale, list(handle.parameters())
    unet = build().requires_grad_(False)
    hypernetwork = Hypernetwork(sorted(set(context_widths(unet).values())), device=device)
    hn = sdadapt.inject_hypernetwork(unet, hypernetwork, strength=0.7)
    yield "UNet / hypernetwork", run(unet), inputs, hn.set_strength, list(hypernetwork.parameters())


def clip_cases(config: str, device: torch.device):
    from transformers import CLIPTextConfig, CLIPTextModel

    settings = CLIP_CONFIGS[CLIP_FOR[config]]
    vocab = settings["vocab_size"]
    g = torch.Generator().manual_seed(2)
    ids = {b: torch.randint(0, vocab, (b, TOKENS), generator=g).to(device) for b in (2, 3, 4)}

    def build(train: bool):
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(**settings)).to(device).train(train).requires_grad_(False)

    clip = build(False)
    table = find_token_embedding(clip)[1]
    rows = TokenRows(table, [vocab, vocab + 1], torch.randn(2, table.embedding_dim), trainable=True)
    with_rows = {b: torch.where(i % 3 == 0, vocab + i % 2, i) for b, i in ids.items()}  # new ids beyond the table
    handle = sdadapt.inject(clip, TEXT_ENCODER, LoRAConfig(rank=4))
    yield ("CLIP / textual-inversion rows + LoRA", lambda i: clip(i).last_hidden_state, lambda b: (with_rows[b],),
           handle.set_scale, [*handle.parameters(), rows.rows])
    trained = build(True)
    handle = sdadapt.inject(trained, TEXT_ENCODER, LoRAConfig(rank=4, dropout=0.1, rank_dropout=0.1, module_dropout=0.1))
    yield ("CLIP / LoRA, training dropouts", lambda i: trained(i).last_hidden_state, lambda b: (ids[b],),
           handle.set_scale, list(handle.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="tiny")
    parser.add_argument("--latent", type=int, default=8, help="latent height/width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="eager", help="torch.compile backend (eager, aot_eager, inductor)")
    parser.add_argument("--only", default="", help="run only the cases whose label contains this text")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    cases = itertools.chain(unet_cases(args.config, args.latent, device), clip_cases(args.config, device))  # one model at a time
    print("| model / adapter | graph breaks | graphs (fwd+bwd) | recompiles: strength | recompiles: batch |")
    print("|---|---|---|---|---|")
    for label, model, inputs, change, params in cases:
        if args.only not in label:
            continue
        row = {"case": label, **count(model, inputs, change, args.backend, params)}
        rows.append(row)
        print(f"| {label} | {row['breaks']} | {row['frames']} | {row['strength']} | {row['batch']} |", flush=True)
    out = args.out or RESULTS / f"compile_graphs-{args.config}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "latent": args.latent, "device": str(device),
                               "backend": args.backend, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
