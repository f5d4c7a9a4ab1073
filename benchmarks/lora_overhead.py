"""Training-step overhead of LoRA on a diffusers UNet: no adapter vs peft vs sdadapt.

One process, one random-weight ``UNet2DConditionModel`` (every variant gets an identical copy),
one batch. For each variant it measures forward + backward of an MSE loss:

1. ``none``    – frozen base; only the input latents and the text context require grad, so the
                 backward pass runs through the whole network (and it does in every variant:
                 all three compute the same input gradients, the adapters add their own work);
2. ``peft``    – ``unet.add_adapter(LoraConfig(r, target_modules=[to_q, to_k, to_v, to_out.0]))``;
3. ``sdadapt`` – ``sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, LoRAConfig(rank=r))``;
4. ``sdadapt-qkv`` – the same plus ``sdadapt.batch_shared_input_adapters(handle)``: one
                 down-projection matmul per attention input for the q/k/v LoRAs (attn1: q, k, v
                 read the hidden states; attn2: k, v read the text context).

Before anything is timed, the peft and sdadapt models are given *the same* non-zero LoRA weights
(copied from sdadapt into peft) and must produce the same output and the same gradients, and
the batched sdadapt step must equal the unbatched one.

Op counts ("ops per step"): one forward+backward of each variant under ``torch.profiler``:
``mm`` counts the matmul launches (``aten::mm``/``addmm``/``bmm``/``baddbmm``), ``ops`` the aten
ops called from Python or autograd that are not views, casts to the same dtype or allocations
(about one kernel each on a GPU), ``kernels`` (CUDA) the device kernels.

Timing: the variants run interleaved (step i runs all four, in an order rotated by i) so that
load from other processes and clock drift hit them alike; the reported figure is the median of
``--steps`` steps after ``--warmup`` steps. On CUDA every step is bracketed by
``torch.cuda.synchronize()``.

Peak memory ("peak Δ", activations + gradients of one step, excluding the resident weights):

* CUDA: ``torch.cuda.max_memory_allocated()`` during one step minus ``memory_allocated()`` just
  before it (``reset_peak_memory_stats()`` first); the absolute peak is reported too.
* CPU: peak resident set size (RSS) during one step minus the RSS just before it, sampled every
  0.5 ms by a background thread with ``psutil`` (fallback: ``resource.getrusage().ru_maxrss``,
  a process-lifetime maximum, so only growth beyond every earlier peak shows). Because glibc keeps
  freed heap memory, the memory pass runs *after* the timing pass with
  ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` (+ ``malloc_trim``), so every tensor buffer is an ``mmap``
  that is returned on free and RSS follows live tensor memory. RSS also counts allocator and
  library overhead, so treat CPU numbers as approximate; compare variants with each other.

Usage::

    python benchmarks/lora_overhead.py                       # tiny UNet, CPU or GPU, ~10-40 s
    python benchmarks/lora_overhead.py --config sd15         # SD1.5 UNet, 64x64 latents (GPU)
    python benchmarks/lora_overhead.py --config sd15 --batch 1 --steps 2 --warmup 1   # CPU: slow
    python benchmarks/lora_overhead.py --profile             # + torch.profiler tables
    python benchmarks/lora_overhead.py --config sd15 --latent 8 --batch 1 --steps 2 --warmup 1   # SD1.5 op counts on CPU

Writes ``benchmarks/results/lora_overhead-<config>-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, RssSampler, glibc_return_freed_memory, malloc_trim, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("none", "peft", "sdadapt", "sdadapt-qkv")
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

CONFIGS = {
    # small but not trivial: attention at both resolutions, 16x16 latents
    "tiny": dict(unet=UNET_CONFIGS["tiny"], latent=16, tokens=16, batch=2, steps=30, warmup=3),
    # the public runwayml/stable-diffusion-v1-5 unet/config.json, random weights
    "sd15": dict(unet=UNET_CONFIGS["sd15"], latent=64, tokens=77, batch=4, steps=20, warmup=3),
}
# SD1.5 on a CPU: allowed only this small
CPU_SD15_MAX_BATCH = 2
CPU_SD15_MAX_STEPS = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="UNet size (default: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=None, help="batch size")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="base model dtype (adapters stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables for peft and sdadapt")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent size (default: the config's); op counts do not depend on it, so a small one "
                             "counts SD1.5's ops on a CPU in seconds")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    args.steps = config["steps"] if args.steps is None else args.steps
    args.warmup = config["warmup"] if args.warmup is None else args.warmup
    args.batch = config["batch"] if args.batch is None else args.batch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.config == "sd15" and args.device.type == "cpu":
        user_batch = "--batch" in " ".join(argv if argv is not None else sys.argv)
        if not user_batch:
            args.batch = 1
        if args.batch > CPU_SD15_MAX_BATCH or args.steps > CPU_SD15_MAX_STEPS:
            parser.error(
                f"--config sd15 on CPU is only allowed with --batch <= {CPU_SD15_MAX_BATCH} and --steps <= "
                f"{CPU_SD15_MAX_STEPS} (a step takes many seconds); e.g. --batch 1 --steps 2 --warmup 1"
            )
    if args.steps < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------- models
def build_base(config: dict, dtype: torch.dtype, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config["unet"])
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet.requires_grad_(False)
    unet.train()  # training step semantics (no dropout in a UNet config anyway)
    return unet


def add_sdadapt(unet, rank: int, *, batch_qkv: bool = False):
    import sdadapt

    handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=rank, alpha=rank, init="gaussian"))
    if batch_qkv:
        sdadapt.batch_shared_input_adapters(handle)
    return handle


def add_peft(unet, rank: int):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    return {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


def trainable(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def make_batch(config: dict, batch: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    size, tokens, width = config["latent"], config["tokens"], config["unet"]["cross_attention_dim"]
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype).requires_grad_(True)
    ctx = torch.randn(batch, tokens, width, generator=g).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    target = torch.randn(batch, 4, size, size, generator=g).to(device)
    return x, t, ctx, target


def train_step(unet, params, batch) -> torch.Tensor:
    x, t, ctx, target = batch
    out = unet(x, t, encoder_hidden_states=ctx).sample
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    return out.detach()


def clear_grads(params, batch) -> None:
    for p in params:
        p.grad = None
    batch[0].grad = None
    batch[2].grad = None


# --------------------------------------------------------------------------------------- equivalence
def check_equivalence(base, rank: int, batch, device, dtype) -> dict:
    """peft and sdadapt with identical non-zero LoRA weights compute the same function and gradients
    (and sdadapt with its q/k/v down-projections batched the same as without).

    ``base`` (already on ``device``) is left unchanged; the adapted models are copies of it.
    """
    import sdadapt

    with torch.no_grad():
        plain = base(batch[0], batch[1], encoder_hidden_states=batch[2]).sample
    sd_model = copy.deepcopy(base)
    handle = add_sdadapt(sd_model, rank)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for adapter in handle.modules.values():
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=g) * 0.05)
    peft_model = copy.deepcopy(base)
    peft_layers = add_peft(peft_model, rank)
    if set(peft_layers) != set(handle.names):
        raise SystemExit(
            f"peft and sdadapt adapt different layers: only peft {sorted(set(peft_layers) - set(handle.names))[:5]}, "
            f"only sdadapt {sorted(set(handle.names) - set(peft_layers))[:5]}"
        )
    with torch.no_grad():
        for name, adapter in handle.modules.items():
            layer = peft_layers[name]
            layer.lora_A["default"].weight.copy_(adapter.lora_down.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(adapter.lora_up.reshape(layer.lora_B["default"].weight.shape))
            if abs(layer.scaling["default"] - float(adapter.scale)) > 1e-12:
                raise SystemExit(f"{name}: scales differ (peft {layer.scaling['default']}, sdadapt {float(adapter.scale)})")
    n_sd, n_peft = sum(p.numel() for p in trainable(sd_model)), sum(p.numel() for p in trainable(peft_model))
    if n_sd != n_peft:
        raise SystemExit(f"trainable parameter counts differ: sdadapt {n_sd}, peft {n_peft}")

    results = {}
    for label, model in (("sdadapt", sd_model), ("peft", peft_model), ("sdadapt-qkv", sd_model)):
        if label == "sdadapt-qkv":
            sdadapt.batch_shared_input_adapters(handle)
        params = trainable(model)
        out = train_step(model, params, batch)
        grads = {"x": batch[0].grad.clone(), "ctx": batch[2].grad.clone()}
        if label.startswith("sdadapt"):
            for name, adapter in handle.modules.items():
                grads[f"{name}.down"] = adapter.lora_down.grad.reshape(-1).clone()
                grads[f"{name}.up"] = adapter.lora_up.grad.reshape(-1).clone()
        else:
            for name, layer in peft_layers.items():
                grads[f"{name}.down"] = layer.lora_A["default"].weight.grad.reshape(-1).clone()
                grads[f"{name}.up"] = layer.lora_B["default"].weight.grad.reshape(-1).clone()
        results[label] = (out, grads)
        clear_grads(params, batch)

    def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(floor))

    # a gradient that is zero up to rounding (a 1-token attention: softmax is constant, q and k get
    # none) is compared at the scale of the largest gradient of the step, not at its own
    floor = 1e-3 * max(float(g.float().abs().max()) for g in results["sdadapt"][1].values())

    out_s, grads_s = results["sdadapt"]
    out_p, grads_p = results["peft"]
    out_q, grads_q = results["sdadapt-qkv"]
    report = {
        "output_rel_diff": rel(out_s, out_p),
        "grad_rel_diff_max": max(rel(grads_s[k], grads_p[k], floor) for k in grads_p),
        "qkv_output_rel_diff": rel(out_q, out_s),  # batched q/k/v down-projections vs per adapter
        "qkv_grad_rel_diff_max": max(rel(grads_q[k], grads_s[k], floor) for k in grads_s),
        "adapter_effect_rel": rel(out_s, plain),  # the LoRA really changes the output
        "adapted_layers": len(handle.names),
        "trainable_params": n_sd,
    }
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not (report["output_rel_diff"] < tolerance and report["grad_rel_diff_max"] < 10 * tolerance):
        raise SystemExit(f"peft and sdadapt disagree: {report}")
    if not (report["qkv_output_rel_diff"] < tolerance and report["qkv_grad_rel_diff_max"] < 10 * tolerance):
        raise SystemExit(f"sdadapt with and without q/k/v batching disagree: {report}")
    if report["adapter_effect_rel"] < 1e-4:
        raise SystemExit(f"the LoRA did not change the output, so the comparison is vacuous: {report}")
    del sd_model, peft_model
    return report


# --------------------------------------------------------------------------------------- memory
def measure_memory(models, params, batch, device) -> tuple[dict, str]:
    out: dict[str, dict] = {}
    if device.type == "cuda":
        method = "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
        for name in VARIANTS:
            gc.collect()
            torch.cuda.empty_cache()
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            train_step(models[name], params[name], batch)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            clear_grads(params[name], batch)
            out[name] = {"peak_delta_mib": (peak - before) / 2**20, "peak_allocated_mib": peak / 2**20}
        return out, method
    mmap_ok = glibc_return_freed_memory()
    sampler = RssSampler()
    method = sampler.method + (" with mallopt(M_MMAP_THRESHOLD=64KiB)" if mmap_ok else "")
    for name in VARIANTS:
        deltas = []
        for _ in range(2):  # first call may still touch fresh code/data pages; keep the smaller
            gc.collect()
            malloc_trim()
            with sampler:
                before = sampler.peak
                train_step(models[name], params[name], batch)
                clear_grads(params[name], batch)
            deltas.append(sampler.peak - before)
        out[name] = {"peak_delta_mib": min(deltas) / 2**20}
    return out, method


# --------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    import diffusers
    import peft

    import sdadapt

    config = CONFIGS[args.config]
    if args.latent is not None:
        config = {**config, "latent": args.latent}
    dtype = getattr(torch, args.dtype)
    device = args.device
    base = build_base(config, dtype, args.seed).to(device)
    batch = make_batch(config, args.batch, dtype, device, args.seed)
    print(f"# lora_overhead: config={args.config} device={device} dtype={args.dtype} latent={config['latent']} batch={args.batch} rank={args.rank} "
          f"steps={args.steps} warmup={args.warmup} threads={torch.get_num_threads()}", flush=True)

    equivalence = check_equivalence(base, args.rank, batch, device, dtype)
    print(f"# equivalence ok: output rel diff {equivalence['output_rel_diff']:.2e}, grad rel diff "
          f"{equivalence['grad_rel_diff_max']:.2e}, {equivalence['adapted_layers']} layers, "
          f"{equivalence['trainable_params']} trainable params; q/k/v batched vs not: output "
          f"{equivalence['qkv_output_rel_diff']:.2e}, grads {equivalence['qkv_grad_rel_diff_max']:.2e}", flush=True)

    gc.collect()
    # identical weights: the adapted variants are copies of the base, which is the "none" variant
    models = {"none": base, "peft": copy.deepcopy(base), "sdadapt": copy.deepcopy(base), "sdadapt-qkv": copy.deepcopy(base)}
    add_peft(models["peft"], args.rank)
    add_sdadapt(models["sdadapt"], args.rank)
    add_sdadapt(models["sdadapt-qkv"], args.rank, batch_qkv=True)
    params = {name: trainable(model) for name, model in models.items()}

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.warmup + args.steps):
        order = VARIANTS[step % len(VARIANTS) :] + VARIANTS[: step % len(VARIANTS)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            train_step(models[name], params[name], batch)
            sync(device)
            elapsed = time.perf_counter() - start
            clear_grads(params[name], batch)
            if step >= args.warmup:
                times[name].append(elapsed * 1000)

    memory, memory_method = measure_memory(models, params, batch, device)
    ops = {name: count_ops(models[name], params[name], batch, device) for name in VARIANTS}
    baseline = statistics.median(times["none"])
    rows = []
    for name in VARIANTS:
        median = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "ms_per_step": median,
                "ms_min": min(times[name]),
                "ms_max": max(times[name]),
                "overhead_pct": 100.0 * (median - baseline) / baseline,
                "trainable_params": sum(p.numel() for p in params[name]),
                **memory[name],
                **{f"{key}_per_step": value for key, value in ops[name].items()},
            }
        )
    result = {
        "config": args.config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "latent": config["latent"],
        "batch": args.batch,
        "rank": args.rank,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_method": memory_method,
        "timing_method": "median of interleaved forward+backward steps after warm-up" + (" (cuda synchronized)" if device.type == "cuda" else ""),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "sdadapt": sdadapt.__version__},
        "equivalence": equivalence,
        "results": rows,
    }
    if args.profile:
        result["profile"] = profile(models, params, batch, device)
    return result


# not kernels: views, metadata and allocations (counted as ops they would hide the launches)
_NOT_LAUNCHES = frozenset(
    "aten::" + name for name in (
        "view", "reshape", "_reshape_alias", "t", "transpose", "permute", "as_strided", "expand", "slice", "select",
        "split", "split_with_sizes", "unsqueeze", "squeeze", "_unsafe_view", "detach", "alias", "narrow", "unflatten",
        "flatten", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg", "lift_fresh", "chunk",
        "unbind", "view_as", "contiguous", "numpy_T", "expand_as", "result_type", "is_nonzero", "item", "_local_scalar_dense",
        "conj", "_conj", "set_", "to", "type_as", "zeros", "zeros_like", "ones_like", "full",
    )
)
_MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def count_ops(model, params, batch, device) -> dict[str, int]:
    """Launch counts of one forward+backward (see the module docstring)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train_step(model, params, batch)  # warm (lazy init, autotuning) outside the count
    clear_grads(params, batch)
    sync(device)
    with torch_profile(activities=activities) as prof:
        train_step(model, params, batch)
        sync(device)
    clear_grads(params, batch)
    events = prof.events()
    aten = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    # one dispatcher entry from Python or autograd each (ops they call inside are not counted again)
    outer = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    counts = {
        "mm": sum(e.name in _MATMULS for e in aten),
        "ops": sum(e.name not in _NOT_LAUNCHES for e in outer),
    }
    if device.type == "cuda":
        counts["kernels"] = sum(e.device_type == DeviceType.CUDA for e in events)
    return counts


def profile(models, params, batch, device) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name in ("peft", "sdadapt", "sdadapt-qkv"):
        for _ in range(2):
            train_step(models[name], params[name], batch)
            clear_grads(params[name], batch)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                train_step(models[name], params[name], batch)
                clear_grads(params[name], batch)
            sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=18)
        print(f"\n## torch.profiler: {name} (3 steps)\n{table}")
        tables[name] = table
    return tables


def markdown_table(result: dict) -> str:
    gpu = result["device"].startswith("cuda")
    head = ("| variant | ms/step (median) | overhead vs none | peak Δ mem (MiB) |" + (" peak alloc (MiB) |" if gpu else "")
            + " trainable params | mm per step | ops per step |" + (" kernels per step |" if gpu else ""))
    rule = "|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|---:|" + ("---:|" if gpu else "")
    lines = [head, rule]
    for row in result["results"]:
        overhead = "—" if row["variant"] == "none" else f"{row['overhead_pct']:+.1f}%"
        cells = [row["variant"], f"{row['ms_per_step']:.1f}", overhead, f"{row['peak_delta_mib']:.1f}"]
        if gpu:
            cells.append(f"{row['peak_allocated_mib']:.0f}")
        cells.append(f"{row['trainable_params']:,}")
        cells += [str(row["mm_per_step"]), str(row["ops_per_step"])] + ([str(row["kernels_per_step"])] if gpu else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print()
    print(markdown_table(result))
    print(f"\npeak memory: {result['memory_method']}")
    out = args.out or RESULTS / f"lora_overhead-{args.config}-{args.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
