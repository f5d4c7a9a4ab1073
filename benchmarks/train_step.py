"""Training step: the diffusers-example recipe vs sdadapt's step, same model, same batch size.

For each mode (``lora``, ``full``, ``ti``) and batch size, one process builds one set of random
weights (UNet, VAE, text encoder(s)) and gives every variant an identical copy:

``reference`` — what ``diffusers/examples`` do per step (train_text_to_image_lora.py,
    train_text_to_image.py, textual_inversion.py): VAE-encode the images and run the frozen text
    encoder *every step*, UNet in the mixed-precision dtype under autocast, peft LoRA r16 on
    to_q/to_k/to_v/to_out.0 (``unet.add_adapter``, LoRA params upcast to fp32), ``torch.optim.AdamW``
    (foreach), grad clipping 1.0; full fine-tune: fp32 UNet + AdamW; textual inversion: the whole
    token-embedding matrix trainable, non-placeholder rows restored after each step.
``sdadapt`` — :func:`sdadapt.training.step.train_step` on latents and text states encoded once
    (:mod:`sdadapt.training.latent_cache` in real runs), adapters injected by ``sdadapt.inject`` with a
    frozen base in the compute dtype, channels_last on CUDA, fused AdamW on CUDA; batch 1 on CUDA
    uses :class:`sdadapt.training.step_capture.CapturedStep` (one CUDA graph per step). Full fine-tune
    "lean" on CUDA: bf16 weights with stochastic rounding, int8 AdamW states fused into backward
    (no gradient buffers, so no global clipping), gradient checkpointing on transformer and ResNet
    blocks; on CPU fp32 weights and fused ``torch.optim.AdamW`` (time, not memory, is short). Textual
    inversion: one trainable row spliced in at the placeholder positions by
    :class:`sdadapt.embeddings.TokenRows` (hooks on the token embedding; no gradient for the 38M-entry matrix).

Reported per row: ms/step (median after warm-up), images/s, peak memory (CUDA:
``max_memory_allocated`` from before the variant's models are built, so weights + optimiser state
+ activations; CPU: peak RSS growth over the variant's lifetime, approximate), achieved TFLOP/s
(UNet (+TE) forward+backward FLOPs counted once with ``torch.utils.flop_counter`` divided by the
step time — the reference's extra per-step encoding is not counted as useful work).

Usage::

    python benchmarks/train_step.py                              # tiny, CPU, batch 1 and 8, ~1-2 min
    python benchmarks/train_step.py --config sd15 --batch 1 8    # SD1.5 at 512 px (GPU)
    python benchmarks/train_step.py --config sdxl --batch 1      # SDXL at 1024 px (GPU)

Writes ``benchmarks/results/train_step-<config>-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import CLIP_CONFIGS, UNET_CONFIGS, VAE_CONFIGS, RssSampler, glibc_return_freed_memory, malloc_trim, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONFIGS = {
    "tiny": dict(unet="tiny", vae="tiny", clip=("tiny",), image=32, tokens=16, steps=20, warmup=3),
    "sd15": dict(unet="sd15", vae="sd", clip=("clip-l",), image=512, tokens=77, steps=20, warmup=5),
    "sdxl": dict(unet="sdxl", vae="sd", clip=("clip-l", "clip-bigg"), image=1024, tokens=77, steps=10, warmup=4),
}
MODES = ("lora", "full", "ti")
PLACEHOLDER = 7  # token id the TI runs learn


# ------------------------------------------------------------------------------------- models
class Models:
    """Random-weight UNet, VAE and text encoder(s) on CPU; ``copy()`` hands out identical copies."""

    def __init__(self, config: dict, seed: int) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        self.config = config
        self.unet = UNet2DConditionModel(**UNET_CONFIGS[config["unet"]])
        self.vae = AutoencoderKL(**VAE_CONFIGS[config["vae"]])
        encoders = []
        for i, name in enumerate(config["clip"]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**CLIP_CONFIGS[name])))
        self.text_encoders = encoders
        for m in (self.unet, self.vae, *encoders):
            m.requires_grad_(False)

    def copy(self, device: torch.device, dtype: torch.dtype, *, unet_dtype: torch.dtype | None = None):
        unet = copy.deepcopy(self.unet).to(device, unet_dtype or dtype)
        vae = copy.deepcopy(self.vae).to(device, dtype)
        tes = [copy.deepcopy(te).to(device, dtype) for te in self.text_encoders]
        return unet, vae, tes


def make_batch(config: dict, batch: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = config["image"]
    ids = torch.randint(10, 900, (batch, config["tokens"]), generator=g)
    ids[:, 1] = PLACEHOLDER
    out = {"pixels": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device), "ids": ids.to(device)}
    if config["unet"] == "sdxl":
        out["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)
    return out


def encode_text(tes, batch: dict) -> dict:
    """What the UNet is conditioned on: {"ehs": (B,L,D), "added": SDXL pooled + time ids or None}."""
    if len(tes) == 1:
        return {"ehs": tes[0](batch["ids"])[0], "added": None}
    h1 = tes[0](batch["ids"], output_hidden_states=True).hidden_states[-2]
    out2 = tes[1](batch["ids"], output_hidden_states=True)
    ehs = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
    return {"ehs": ehs, "added": {"text_embeds": out2.text_embeds, "time_ids": batch["time_ids"].to(ehs.dtype)}}


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * 0.18215


def unet_call(unet):
    def model(x, t, cond):
        return unet(x, t, cond["ehs"], added_cond_kwargs=cond["added"], return_dict=False)[0]

    return model


# ---------------------------------------------------------------------------------- reference
def build_reference(mode: str, models: Models, device, mp_dtype, batch):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    weight_dtype = mp_dtype or torch.float32
    if mode == "full":
        unet, vae, tes = models.copy(device, weight_dtype, unet_dtype=torch.float32)
        unet.requires_grad_(True)
        unet.train()
        params = list(unet.parameters())
    elif mode == "lora":
        from peft import LoraConfig

        unet, vae, tes = models.copy(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # diffusers.training_utils.cast_training_params
    else:  # ti
        unet, vae, tes = models.copy(device, weight_dtype)
        tes = [te.to(torch.float32) for te in tes]
        emb = tes[0].get_input_embeddings()
        emb.weight.requires_grad_(True)
        tes[0].train()
        params = [emb.weight]
        original = emb.weight.detach().clone()
        keep = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=device)
        keep[PLACEHOLDER] = False
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=mp_dtype) if mp_dtype else torch.autocast(device.type, enabled=False)

    def step():
        latents = encode_latents(vae, batch["pixels"]).to(weight_dtype)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            cond = encode_text(tes, batch)
            pred = unet(noisy, t, cond["ehs"], added_cond_kwargs=cond["added"], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode == "ti":
            with torch.no_grad():
                emb.weight[keep] = original[keep]
        return loss.detach()

    return step, unet, tes


# ------------------------------------------------------------------------------------ sdadapt
def build_ours(mode: str, models: Models, device, mp_dtype, batch, *, capture: bool):
    import sdadapt
    from sdadapt.training import diffusion
    from sdadapt.training.step import StepConfig, TrainState, train_step

    cuda = device.type == "cuda"
    weight_dtype = mp_dtype or torch.float32
    unet, vae, tes = models.copy(device, weight_dtype)
    if cuda:
        unet.to(memory_format=torch.channels_last)
    with torch.no_grad():  # encoded once: what a latent cache gives every later epoch
        latents = encode_latents(vae, batch["pixels"]).to(weight_dtype)
        cond = encode_text(tes, batch)
    del vae
    ac = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float().to(device)
    state = TrainState(seed=0, device=device)
    max_norm = 1.0
    model = unet_call(unet)
    data = {"latents": latents, "cond": cond}
    if mode == "lora":
        handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16, alpha=16, init="gaussian"))
        params = list(handle.parameters())
        if cuda and capture:
            optimizer = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=device), capturable=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif mode == "full":
        from sdadapt.training.optim import AdamW, fuse_optimizer_into_backward

        unet.requires_grad_(True)
        unet.train()
        params = list(unet.parameters())
        if cuda:
            from diffusers.models.attention import BasicTransformerBlock
            from diffusers.models.resnet import ResnetBlock2D

            from sdadapt.training.grad_checkpointing import enable_checkpointing

            enable_checkpointing(unet, sdadapt.targets.by_type(BasicTransformerBlock, ResnetBlock2D))
            optimizer = fuse_optimizer_into_backward(params, lambda ps: AdamW(ps, lr=1e-5, state_dtype="int8"))
            max_norm = None
        else:  # memory is not what a CPU run is short of: plain fused AdamW, fewer Python calls
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        capture = False
    else:  # ti: the text encoder runs every step, its input has one trainable vector
        te = tes[0]
        from sdadapt.embeddings import TokenRows

        table = te.get_input_embeddings()  # the library's token rows: a (1, dim) float32 parameter spliced in by hooks
        rows = TokenRows(table, [PLACEHOLDER], table.weight[PLACEHOLDER:PLACEHOLDER + 1], trainable=True)
        params = [rows.rows]
        optimizer = torch.optim.AdamW(params, lr=5e-4, fused=True)
        ids, extra = batch["ids"], cond["added"]

        def model(x, t, _c, unet=unet, tes=tes):
            c = encode_text(tes, {"ids": ids, "time_ids": batch.get("time_ids")})
            return unet(x, t, c["ehs"], added_cond_kwargs=c["added"] if extra is not None else None, return_dict=False)[0]

        data = {"latents": latents, "cond": None}
        capture = False
    config = StepConfig(mixed_precision={torch.bfloat16: "bf16"}.get(mp_dtype), max_grad_norm=max_norm, channels_last=cuda)
    if cuda and capture:
        from sdadapt.training.step_capture import CapturedStep

        captured = CapturedStep(model, params=params, optimizer=optimizer, config=config, alphas_cumprod=ac)

        def step():
            return captured(data, state=state)["loss"]
    else:

        def step():
            return train_step(model, data, params=params, optimizer=optimizer, state=state, config=config, alphas_cumprod=ac)["loss"]

    return step, unet, tes


# ------------------------------------------------------------------------------------ measure
def count_flops(models: Models, mode: str, batch: dict, config: dict) -> float:
    """UNet (+ text encoder for TI) forward + backward FLOPs of one step, counted on CPU meta-free copies."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, tes = models.copy(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        latents = encode_latents(vae, batch["pixels"].cpu())
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    if mode == "full":
        unet.requires_grad_(True)
    elif mode == "lora":
        import sdadapt

        sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16, alpha=16))
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "ti":
            tes[0].get_input_embeddings().weight.requires_grad_(True)
        cond = encode_text(tes, cpu_batch)
        x = latents.clone().requires_grad_(mode == "ti")
        out = unet(x, torch.full((latents.shape[0],), 500), cond["ehs"], added_cond_kwargs=cond["added"], return_dict=False)[0]
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def _fresh(device) -> int:
    gc.collect()
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return RssSampler().rss()


def _build(kind, mode, models, device, mp_dtype, batch, args):
    if kind == "reference":
        return build_reference(mode, models, device, mp_dtype, batch)
    return build_ours(mode, models, device, mp_dtype, batch, capture=not args.no_capture and batch["ids"].shape[0] == 1)


def peak_memory(kind, mode, models, device, mp_dtype, batch, args) -> float:
    """MiB: CUDA peak allocated over build + 3 steps; CPU peak RSS growth over the same."""
    before = _fresh(device)
    sampler = RssSampler()
    with sampler:
        step, *keep = _build(kind, mode, models, device, mp_dtype, batch, args)
        for _ in range(3):
            step()
        sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.peak - before
    del step, keep
    _fresh(device)
    return peak / 2**20


def timings(mode, models, device, mp_dtype, batch, args) -> dict[str, float]:
    """Median ms/step of both variants. CPU: steps interleaved (alternating order) so load from
    other processes hits both alike; CUDA: one variant after the other (the GPU is not shared)."""
    kinds = ("reference", "sdadapt")
    times: dict[str, list[float]] = {k: [] for k in kinds}

    def timed(step) -> torch.Tensor:
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        return loss, time.perf_counter() - start

    if device.type == "cpu":
        steps = {k: _build(k, mode, models, device, mp_dtype, batch, args)[0] for k in kinds}
        for _ in range(args.warmup):
            for k in kinds:
                steps[k]()
        for i in range(args.steps):
            for k in (kinds if i % 2 == 0 else kinds[::-1]):
                loss, dt = timed(steps[k])
                times[k].append(dt)
                if not torch.isfinite(loss).all():
                    raise SystemExit(f"non-finite loss in {k}: the benchmark is broken")
        del steps
    else:
        for k in kinds:
            step, *keep = _build(k, mode, models, device, mp_dtype, batch, args)
            for _ in range(args.warmup):
                step()
            for _ in range(args.steps):
                loss, dt = timed(step)
                times[k].append(dt)
            if not torch.isfinite(loss).all():
                raise SystemExit(f"non-finite loss in {k}: the benchmark is broken")
            del step, keep
            _fresh(device)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-capture", action="store_true", help="never use the CUDA-graph step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    args.steps = args.steps or cfg["steps"]
    args.warmup = cfg["warmup"] if args.warmup is None else args.warmup
    if args.config != "tiny" and args.device == "cpu":
        parser.error(f"--config {args.config} needs a GPU (a CPU step takes minutes); use --config tiny")
    return args


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    mp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cpu":
        glibc_return_freed_memory()
    models = Models(cfg, args.seed)
    rows = []
    for mode in args.modes:
        for b in args.batch:
            batch = make_batch(cfg, b, device, args.seed + 1)
            flops = count_flops(models, mode, batch, cfg) if args.config == "tiny" or device.type == "cuda" else float("nan")
            ms = timings(mode, models, device, mp_dtype, batch, args)
            for kind in ("reference", "sdadapt"):
                rows.append(dict(
                    mode=mode, batch=b, variant=kind, ms_per_step=ms[kind], images_per_s=b / ms[kind] * 1e3,
                    peak_mem_mib=peak_memory(kind, mode, models, device, mp_dtype, batch, args),
                    tflops=flops / (ms[kind] / 1e3) / 1e12,
                ))
    return {
        "config": args.config,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "mixed_precision": str(mp_dtype),
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    lines = ["| mode | batch | variant | ms/step | images/s | speed-up | peak mem (MiB) | TFLOP/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    ref = {(r["mode"], r["batch"]): r for r in result["rows"] if r["variant"] == "reference"}
    for r in result["rows"]:
        base = ref[(r["mode"], r["batch"])]
        speed = "—" if r["variant"] == "reference" else f"{base['ms_per_step'] / r['ms_per_step']:.2f}x"
        lines.append(f"| {r['mode']} | {r['batch']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
                     f"{speed} | {r['peak_mem_mib']:.0f} | {r['tflops']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown_table(result))
    out = args.out or RESULTS / f"train_step-{args.config}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
