"""Training step: the diffusers-example recipe, the UNet-only peft step and sdadapt's steps, same model.

For each mode (``lora``, ``full``, ``ti``) and batch size, one process builds one set of random
weights (UNet, VAE, text encoder(s)) and gives every variant an identical copy:

``reference`` — what ``diffusers/examples`` do per step (train_text_to_image_lora.py,
    train_text_to_image.py, textual_inversion.py): VAE-encode the images and run the frozen text
    encoder *every step*, UNet in the mixed-precision dtype under autocast, peft LoRA r16 on
    to_q/to_k/to_v/to_out.0 (``unet.add_adapter``, LoRA params upcast to fp32), ``torch.optim.AdamW``
    (foreach), grad clipping 1.0; full fine-tune: fp32 UNet + AdamW; textual inversion: the whole
    token-embedding matrix trainable, non-placeholder rows restored after each step.
``peft-unet`` (LoRA) — the same peft UNet step on latents and text states encoded once (what kohya,
    OneTrainer and any latent cache give): the kernel-for-kernel comparison with sdadapt's step.
``sdadapt`` — :func:`sdadapt.training.step.train_step` on cached latents/text states, adapters
    injected by ``sdadapt.inject`` over a frozen base in the compute dtype, channels_last on CUDA,
    fused AdamW. ``sdadapt-captured``: :class:`sdadapt.training.step_capture.CapturedStep` (one CUDA
    graph per step, capturable AdamW; on CPU it falls back to the eager step); ``sdadapt-captured-nchw``:
    the same without channels_last (does NHWC help on this GPU?), ``sdadapt-captured-qkv``: the same with
    ``sdadapt.batch_shared_input_adapters`` (the q/k/v LoRAs of each attention input share one
    down-projection matmul) — both captured, where the device time they change is what the step
    takes (an eager step is bound by the host). A ``-halfnorms`` suffix (``sdadapt-halfnorms``,
    ``sdadapt-captured-halfnorms``, ``-nchw-halfnorms``, ``-qkv-halfnorms``, ``sdadapt-fast-captured-halfnorms``,
    ``sdadapt-lean-captured-halfnorms`` — its checkpointed blocks recomputed under the option):
    that row with ``StepConfig(half_precision_norms=True)`` (GroupNorm/LayerNorm in bf16 instead of CUDA
    autocast's float32). ``sdadapt-captured-nchw-percall-halfnorms``: that row with each kind of attention
    call on the SDPA kernel measured fastest for it (``StepConfig.sdpa_backends_per_call``; the others
    run torch's choice). A ``-fused`` LoRA row (``sdadapt-fused-halfnorms``, ``sdadapt-captured-fused-halfnorms``,
    ``-nchw-fused-halfnorms``, ``-nchw-percall-fused-halfnorms``): that row with
    ``StepConfig(fused_lora_linear=True)`` (each linear LoRA as one autograd function, its delta added inside the
    base GEMM: two kernels fewer per layer). ``sdadapt-compiled``:
    ``torch.compile`` of the injected UNet (``--compile-backend``); ``sdadapt-compiled-captured``: both
    (the compiled kernels replayed inside the step's CUDA graph); ``sdadapt-regional-captured``: each
    transformer and ResNet block compiled on its own (``module.compile()``, blocks of one shape share a
    graph: a shorter cold compile than the whole UNet's), inside the CUDA graph. Full fine-tune:
    ``sdadapt-lean`` — bf16 weights with stochastic rounding, bf16 gradients, int8 AdamW states updated
    with multi-tensor ops (``foreach=True``), gradient checkpointing of the transformer blocks only;
    ``sdadapt-lean-fused`` — int8 AdamW fused into backward (one multi-tensor step per block, no gradient
    buffers, no clipping) with checkpointing on every transformer and ResNet block (the smallest);
    ``sdadapt-fast`` — bf16 weights + stochastic rounding, float32 AdamW moments, ``foreach``, clipping,
    no checkpointing. ``sdadapt-lean-captured``, ``sdadapt-fast-captured``: the same steps captured
    whole in a CUDA graph (:class:`~sdadapt.training.step_capture.CapturedStep`, sdadapt's AdamW with
    ``capturable=True`` and a tensor LR; on CPU the eager step). ``sdadapt-small-captured``: lean
    captured with every transformer and ResNet block recomputed (made when the captured lean step
    seemed to hold 9.6 GB; that was the lean-fused row's leak, since fixed: it holds 6.2 GB). Textual inversion: one trainable row spliced in at the placeholder positions by
    :class:`sdadapt.embeddings.TokenRows` (no gradient for the 38M-entry matrix).

Reported per row: ms/step (median after warm-up), images/s, speed-up over the reference and (LoRA)
over ``peft-unet``, peak memory (CUDA: ``max_memory_allocated`` from before the variant's models
are built, so weights + optimiser state + activations; CPU: peak RSS growth, approximate), on CUDA
also the steady peak (over the second half of the timed steps, when a captured step only replays:
the memory training holds, without the warm-up's and the capture's transients), what the built
models and adapters hold before the first step and the peak reserved from the driver (a CUDA
graph's private pool counts as allocated only while a tensor lives in it), achieved
TFLOP/s (the UNet (+TE) forward+backward FLOPs of one step, counted once per mode and batch with
``torch.utils.flop_counter`` on the benchmark's device, divided by the step time — the reference's
extra per-step encoding is not counted as useful work) and that as a fraction of the device's bf16
peak (measured here with an 8192³ bf16 matmul on CUDA, or ``--peak-tflops``; blank on CPU).

Usage::

    python benchmarks/train_step.py                              # tiny, CPU, batch 1 and 8, ~2 min
    python benchmarks/train_step.py --config sd15 --batch 1 8    # SD1.5 at 512 px (GPU)
    python benchmarks/train_step.py --config sd15 --modes lora --variants peft-unet sdadapt-captured
    python benchmarks/train_step.py --config sdxl --batch 1      # SDXL at 1024 px (GPU)

Writes ``benchmarks/results/train_step-<config>-<device>.json`` (``--out`` to change) and, with
``--markdown``, the table as a file too. ``benchmarks/gpu_check.sh`` runs the GPU rows in one go.
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
from _bench import (  # noqa: E402
    CLIP_CONFIGS,
    UNET_CONFIGS,
    VAE_CONFIGS,
    RssSampler,
    glibc_return_freed_memory,
    malloc_trim,
    sync,
)

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
    """Random-weight UNet, VAE and text encoder(s) on CPU; ``copy()`` hands out identical copies.

    For a GPU the host keeps one copy of them in each dtype asked for, cast once, so a row's copy is a
    copy in its dtype and a transfer: deep-copying the float32 SD1.5 models took ~7 s a row on a 2-core
    host, against ~0.6 s from the bfloat16 cast (the same values: a cast rounds the same on either device).
    On a CPU (where a row's memory is the process's, measured around its build) nothing is kept."""

    def __init__(self, config: dict, seed: int) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import (
            CLIPTextConfig,
            CLIPTextModel,
            CLIPTextModelWithProjection,
        )

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
        self._cast: dict[torch.dtype, tuple] = {}

    def copy(self, device: torch.device, dtype: torch.dtype, *, unet_dtype: torch.dtype | None = None):
        if device.type == "cpu":
            unet = copy.deepcopy(self.unet).to(device, unet_dtype or dtype)
            vae = copy.deepcopy(self.vae).to(device, dtype)
            return unet, vae, [copy.deepcopy(te).to(device, dtype) for te in self.text_encoders]
        unet = copy.deepcopy(self._cast_once(unet_dtype or dtype)[0]).to(device)
        vae, tes = self._cast_once(dtype)[1:]
        return unet, copy.deepcopy(vae).to(device), [copy.deepcopy(te).to(device) for te in tes]

    def _cast_once(self, dtype: torch.dtype) -> tuple:
        """(UNet, VAE, text encoders) in ``dtype`` on the host, cast on first use (float32: the originals)."""
        if dtype == torch.float32:
            return self.unet, self.vae, self.text_encoders
        if dtype not in self._cast:
            self._cast[dtype] = (copy.deepcopy(self.unet).to(dtype), copy.deepcopy(self.vae).to(dtype),
                                 [copy.deepcopy(te).to(dtype) for te in self.text_encoders])
        return self._cast[dtype]


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
def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def build_reference(mode: str, models: Models, device, mp_dtype, batch, *, cached: bool = False):
    """The diffusers-example step; ``cached=True`` (LoRA only): on latents/text states encoded once."""
    sched = _ddpm()
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
    if cached:
        with torch.no_grad(), autocast:
            cached_latents = encode_latents(vae, batch["pixels"]).to(weight_dtype)
            cached_cond = encode_text(tes, batch)
        del vae, tes
        tes = []

    def step():
        if cached:
            latents, cond = cached_latents, cached_cond
        else:
            latents = encode_latents(vae, batch["pixels"]).to(weight_dtype)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            if not cached:
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
def build_ours(mode: str, variant: str, models: Models, device, mp_dtype, batch, args):
    import sdadapt
    from sdadapt.training import diffusion
    from sdadapt.training.optim import AdamW, fuse_optimizer_into_backward
    from sdadapt.training.step import StepConfig, TrainState, train_step

    cuda = device.type == "cuda"
    lean = variant.startswith(("sdadapt-lean", "sdadapt-fast", "sdadapt-small"))  # the bf16-weight full fine-tunes
    weight_dtype = torch.bfloat16 if lean else (mp_dtype or torch.float32)
    unet, vae, tes = models.copy(device, weight_dtype)
    channels_last = cuda and not variant.startswith("sdadapt-captured-nchw")  # is NHWC worth it on this GPU?
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    with torch.no_grad():  # encoded once: what a latent cache gives every later epoch
        latents = encode_latents(vae, batch["pixels"]).to(weight_dtype)
        cond = encode_text(tes, batch)
    del vae
    if mode != "ti":  # (the text encoders served the cache, as peft-unet's: kept, they added ~235 MiB to every
        tes = []      # LoRA and full fine-tune row's memory on the H200 — textual inversion runs one every step)
    ac = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float().to(device)
    state = TrainState(seed=0, device=device)
    max_norm = 1.0
    model = unet_call(unet)
    data = {"latents": latents, "cond": cond}
    capture = "-captured" in variant
    if mode == "lora":
        handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16, alpha=16, init="gaussian"))
        if "-qkv" in variant:  # one down-projection matmul per attention input for the q/k/v LoRAs
            sdadapt.batch_shared_input_adapters(handle)
        params = list(handle.parameters())
        if capture and cuda:  # (CPU optimisers are not capturable: CapturedStep runs eagerly there)
            optimizer = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=device), capturable=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        if variant in ("sdadapt-compiled", "sdadapt-compiled-captured"):
            model = unet_call(torch.compile(unet, backend=args.compile_backend))
        elif "-regional" in variant:  # each transformer and ResNet block compiled on its own: blocks of one shape
            compile_blocks(unet, args.compile_backend)  # share their code, the whole UNet's graph is never built
    elif mode == "full":
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        from sdadapt.training.grad_checkpointing import enable_checkpointing

        unet.requires_grad_(True)
        unet.train()
        params = list(unet.parameters())
        # captured: the step count and LR as device tensors, so the whole optimiser step is in the graph
        lr = dict(lr=torch.tensor(1e-5, device=device), capturable=True) if capture and cuda else dict(lr=1e-5)
        if variant == "sdadapt-lean-fused":  # smallest: one block's gradients at a time, every block recomputed
            from sdadapt.training.param_groups import parameter_groups_by_module

            enable_checkpointing(unet, sdadapt.targets.by_type(BasicTransformerBlock, ResnetBlock2D))
            optimizer = fuse_optimizer_into_backward(params, lambda ps: AdamW(ps, lr=1e-5, state_dtype="int8", foreach=True),
                                                     groups=parameter_groups_by_module(unet, params=params))
            max_norm = None
        elif variant.startswith("sdadapt-lean"):  # bf16 grads, int8 states in multi-tensor steps, attention recomputed
            enable_checkpointing(unet, sdadapt.targets.by_type(BasicTransformerBlock))
            optimizer = AdamW(params, state_dtype="int8", foreach=True, **lr)
        elif variant == "sdadapt-small-captured":  # lean captured, every block recomputed: fewer activations beside the grads
            enable_checkpointing(unet, sdadapt.targets.by_type(BasicTransformerBlock, ResnetBlock2D))
            optimizer = AdamW(params, state_dtype="int8", foreach=True, **lr)
        elif variant.startswith("sdadapt-fast"):  # bf16 weights, float32 moments, multi-tensor AdamW,
            # nothing recomputed (bf16 moments cost two more stochastic roundings of every element: the H200's
            # fast-captured step spent ~80 of its 118 ms in the optimiser with them)
            optimizer = AdamW(params, state_dtype=torch.float32, foreach=True, **lr)
        else:
            raise SystemExit(f"variant {variant} does not apply to mode full")
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
    mixed = "bf16" if (mp_dtype == torch.bfloat16 or lean) else None
    # -percall: each kind of attention call on the kernel measured fastest for it (training.attention)
    per_call = (attention_per_call(model, data, params, device, torch.bfloat16 if mixed else None)
                if "-percall" in variant else None)
    # -halfnorms: GroupNorm/LayerNorm in bf16 instead of CUDA autocast's float32 (training.norm_precision)
    config = StepConfig(mixed_precision=mixed, max_grad_norm=max_norm, channels_last=channels_last,
                        half_precision_norms=variant.endswith("-halfnorms") and mixed is not None,
                        fused_lora_linear=mode == "lora" and "-fused" in variant,  # each LoRA one autograd function
                        sdpa_backends_per_call=per_call)
    if capture:
        from sdadapt.training.step_capture import CapturedStep

        # strict on CUDA: a step that cannot be captured fails the row instead of timing eager steps under this label
        captured = CapturedStep(model, params=params, optimizer=optimizer, config=config, alphas_cumprod=ac, strict=cuda)

        def step():
            return captured(data, state=state)["loss"]
    else:

        def step():
            return train_step(model, data, params=params, optimizer=optimizer, state=state, config=config, alphas_cumprod=ac)["loss"]

    return step, unet, tes


def attention_per_call(model, data: dict, params: list, device: torch.device, dtype: torch.dtype | None) -> dict:
    """The fastest SDPA kernel order for each kind of attention call one forward and backward of
    ``model`` on ``data`` makes (under autocast to ``dtype``), measured on ``device``
    (``training.attention.fastest_sdpa_backends_per_call``); the gradients it leaves are dropped."""
    from contextlib import nullcontext

    from sdadapt.training.attention import (
        fastest_sdpa_backends_per_call,
        record_attention_calls,
    )

    x = data["latents"]
    t = torch.full((x.shape[0],), 500, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def run():
        with autocast:
            out = model(x, t, data["cond"])
        out.float().mean().backward()

    calls = record_attention_calls(run)
    for p in params:
        p.grad = None
    return fastest_sdpa_backends_per_call(calls)


def compile_blocks(unet, backend: str) -> int:
    """``module.compile()`` on each of ``unet``'s transformer and ResNet blocks (regional compilation;
    the module's ``__call__`` compiled, its forward and ``state_dict`` keys unchanged); returns how many.
    The blocks share ``nn.Module._call_impl``'s code, so dynamo's recompile limit (8 graphs per code
    object) is raised to cover every block shape of an SD1.5/SDXL UNet."""
    import torch._dynamo
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


VARIANTS = {
    "lora": ("reference", "peft-unet", "sdadapt", "sdadapt-captured", "sdadapt-captured-nchw", "sdadapt-captured-qkv",
             "sdadapt-regional-captured", "sdadapt-compiled", "sdadapt-compiled-captured", "sdadapt-halfnorms",
             "sdadapt-captured-halfnorms", "sdadapt-captured-nchw-halfnorms", "sdadapt-captured-qkv-halfnorms",
             "sdadapt-captured-nchw-percall-halfnorms", "sdadapt-fused-halfnorms", "sdadapt-captured-fused-halfnorms",
             "sdadapt-captured-nchw-fused-halfnorms", "sdadapt-captured-nchw-percall-fused-halfnorms"),
    "full": ("reference", "sdadapt-lean", "sdadapt-lean-fused", "sdadapt-fast", "sdadapt-lean-captured", "sdadapt-fast-captured",
             "sdadapt-small-captured", "sdadapt-fast-captured-halfnorms", "sdadapt-lean-captured-halfnorms"),
    "ti": ("reference", "sdadapt"),
}


# ------------------------------------------------------------------------------------ measure
def count_flops(models: Models, mode: str, batch: dict, device: torch.device, mp_dtype) -> float:
    """UNet (+ text encoder for TI) forward + backward FLOPs of one step, counted on ``device``
    (FlopCounterMode counts the matmul/conv/attention ops as they run; on a GPU this takes a step,
    on a CPU at 512 px it would take minutes)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, tes = models.copy(device, mp_dtype or torch.float32)
    with torch.no_grad():
        latents = encode_latents(vae, batch["pixels"])
    del vae
    if mode == "full":
        unet.requires_grad_(True)
    elif mode == "lora":
        import sdadapt

        sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16, alpha=16))
    autocast = torch.autocast(device.type, dtype=mp_dtype) if mp_dtype else torch.autocast(device.type, enabled=False)
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        if mode == "ti":
            tes[0].get_input_embeddings().weight.requires_grad_(True)
        cond = encode_text(tes, batch)
        x = latents.clone().requires_grad_(mode == "ti")
        out = unet(x, torch.full((latents.shape[0],), 500, device=device), cond["ehs"], added_cond_kwargs=cond["added"],
                   return_dict=False)[0]
        out.float().pow(2).mean().backward()
    del unet, tes
    return float(counter.get_total_flops())


def measure_bf16_peak(device: torch.device) -> float | None:
    """TFLOP/s of a dense 8192³ bf16 matmul on a CUDA device (mean of 10 after 3 warm-ups); None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def _fresh(device) -> int:
    gc.collect()
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return RssSampler().rss()


def _build(variant, mode, models, device, mp_dtype, batch, args):
    if variant in ("reference", "peft-unet"):
        return build_reference(mode, models, device, mp_dtype, batch, cached=variant == "peft-unet")
    return build_ours(mode, variant, models, device, mp_dtype, batch, args)


def peak_memory_cpu(variant, mode, models, device, mp_dtype, batch, args) -> float:
    """MiB of peak RSS growth over build + 3 steps (CPU only; CUDA peaks come from the timed run)."""
    before = _fresh(device)
    sampler = RssSampler()
    with sampler:
        step, *keep = _build(variant, mode, models, device, mp_dtype, batch, args)
        for _ in range(3):
            step()
    peak = sampler.peak - before
    del step, keep
    _fresh(device)
    return peak / 2**20


def profile_steps(step, device, steps: int) -> dict:
    """``torch.profiler`` over ``steps`` steps: the top ops by device (CUDA) or CPU self time, and
    how busy the device was — kernel time / wall time; the rest is host gaps (launches, Python,
    syncs). The profiler's own overhead lowers the busy fraction a little."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    busy_us = kernel_time_us(averages) if device.type == "cuda" else None
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "device_busy_fraction": None if busy_us is None else busy_us / 1e6 / wall,
            "table": averages.table(sort_by=sort, row_limit=15, max_name_column_width=60),
            "kernel_families": kernel_families(averages, steps)}


# what a kernel does, from its full name (the profiler's table cuts names at 60 characters, and most
# of ATen's elementwise kernels then read alike): the first pattern found names the family
KERNEL_FAMILIES = (
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("matmul/conv", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "conv", "implicit_gemm", "sm90_", "sm80_")),
    ("norm weight gradients", ("GammaBetaBackward",)),  # (group and layer norm name theirs alike)
    ("group norm", ("group_norm", "groupnorm", "GroupNorm", "RowwiseMoments", "ComputeFusedParams")),
    ("layer norm", ("layer_norm", "LayerNorm")),
    ("optimizer (multi-tensor)", ("multi_tensor_apply", "foreach", "fused_adam")),
    ("copy/cast", ("copy_kernel",)),  # (direct_copy_kernel_cuda does both; the path tells: unrolled = a cast)
    ("silu", ("silu",)), ("gelu", ("gelu",)),
    ("add", ("AddFunctor", "add_kernel", "CUDAFunctor_add")), ("mul", ("MulFunctor", "mul_kernel")),
    ("div", ("DivFunctor", "div_true", "div_kernel")),
    ("reduction", ("reduce_kernel", "Reduce")),
    ("fill", ("FillFunctor", "fill_kernel")),
)


def kernel_family(name: str) -> str:
    """``"<family> (<path>)"`` of a CUDA kernel's full name: the family from :data:`KERNEL_FAMILIES`
    (``"other"`` if none), the path for ATen's elementwise kernels — ``contiguous`` (vectorized),
    ``unrolled`` (contiguous, no vector loads: operands of another dtype, e.g. a cast, or misaligned),
    ``strided`` (the generic ``elementwise_kernel<...>``: non-contiguous or broadcast operands, e.g. a
    layout change)."""
    family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
    if "vectorized_elementwise_kernel" in name:
        return f"{family} (contiguous)"
    if "unrolled_elementwise_kernel" in name:
        return f"{family} (unrolled)"
    if "elementwise_kernel<" in name:
        return f"{family} (strided)"
    return family


def kernel_families(averages, steps: int) -> list[dict]:
    """Device kernels of a profile grouped by :func:`kernel_family`: ``[{"family", "calls", "ms"}]``
    per step, the largest first (empty without device events)."""
    from torch.autograd import DeviceType

    groups: dict[str, list[float]] = {}
    for event in averages:
        if event.device_type == DeviceType.CPU or not event.self_device_time_total:
            continue
        calls_us = groups.setdefault(kernel_family(event.key), [0.0, 0.0])
        calls_us[0] += event.count
        calls_us[1] += event.self_device_time_total
    rows = [{"family": f, "calls": calls / steps, "ms": us / steps / 1e3} for f, (calls, us) in groups.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def kernel_time_us(averages) -> float:
    """µs the device spent in kernels: the self device time of the device's own events (the kernels,
    memcpys). A CPU op's self device time is the time of the kernels it launched — counted again if
    summed too (torch's table sums the same way: profiler_util._build_table)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages if e.device_type != DeviceType.CPU)


def measure(mode, variants, models, device, mp_dtype, batch, args,
            on_variant=lambda variant, measured: None) -> dict[str, dict[str, float]]:
    """``{variant: {"ms": median ms/step, "mem": peak MiB}}``. CPU: steps interleaved (alternating
    order) so load from other processes hits all alike; CUDA: one variant after the other, peak
    allocated memory over its build, warm-up and timed steps. ``on_variant(variant, measured)`` after
    each variant's numbers are in (the caller writes its files: a time limit keeps what is done)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, dict[str, float]] = {}

    def timed(step):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        return loss, time.perf_counter() - start

    def check(loss, variant):
        if not torch.isfinite(loss).all():
            raise SystemExit(f"non-finite loss in {variant}: the benchmark is broken")

    if device.type == "cpu":
        steps = {k: _build(k, mode, models, device, mp_dtype, batch, args)[0] for k in variants}
        for _ in range(args.warmup):
            for k in variants:
                steps[k]()
        for i in range(args.steps):
            for k in (variants if i % 2 == 0 else variants[::-1]):
                loss, dt = timed(steps[k])
                times[k].append(dt)
                check(loss, k)
        profiles = {k: profile_steps(steps[k], device, args.profile) for k in variants} if args.profile else {}
        del steps
        for k in variants:
            out[k] = {"ms": statistics.median(times[k]) * 1e3,
                      "mem": peak_memory_cpu(k, mode, models, device, mp_dtype, batch, args)}
            if k in profiles:
                out[k]["profile"] = profiles[k]
            on_variant(k, out[k])
        return out
    for k in variants:
        _fresh(device)
        before = torch.cuda.memory_allocated(device)
        step, *keep = _build(k, mode, models, device, mp_dtype, batch, args)
        built = torch.cuda.memory_allocated(device)
        # the peaks of each warm-up call, of the first timed one (a captured row's capture: CapturedStep's 3 eager
        # warm-up steps end with the benchmark's 3) and of the timed ones up to the second half — where a peak above
        # the steady one is made
        peak, calls = torch.cuda.max_memory_allocated(device), []
        for i in range(args.warmup + args.steps):
            if i <= args.warmup + 1 or i == args.warmup + args.steps // 2:
                if i:
                    calls.append(torch.cuda.max_memory_allocated(device) / 2**20)
                    peak = max(peak, torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)  # (from the second half on: the steady state)
            if i < args.warmup:
                step()
                continue
            loss, dt = timed(step)
            times[k].append(dt)
        check(loss, k)
        steady = torch.cuda.max_memory_allocated(device)
        out[k] = {"ms": statistics.median(times[k]) * 1e3, "mem": max(peak, steady) / 2**20,
                  "steady_mem": steady / 2**20, "built_mem": built / 2**20, "call_peaks_mem": calls,
                  # what the process holds from the driver (a graph's private pool included, which `allocated`
                  # counts only while a tensor lives in it), peak since _fresh emptied the cache
                  "reserved_mem": torch.cuda.max_memory_reserved(device) / 2**20}
        if args.profile:
            out[k]["profile"] = profile_steps(step, device, args.profile)
        del step, keep, loss
        _fresh(device)
        left = (torch.cuda.memory_allocated(device) - before) / 2**20
        out[k]["left_mem"] = left  # (a leak: every later row's memory would start this much higher)
        if left > 64:
            print(f"warning: {k} left {left:.0f} MiB allocated after it was dropped", file=sys.stderr)
        on_variant(k, out[k])
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--variants", nargs="+", default=None,
                        help="subset of: " + ", ".join(sorted({v for vs in VARIANTS.values() for v in vs}))
                        + " (default: all of each mode; sdadapt-compiled only on CUDA); list reference to compare against it")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of sdadapt-compiled")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device (default: measured on CUDA)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (TFLOP/s columns blank)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of every variant (top ops, device busy fraction) into the JSON/markdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    args.steps = args.steps or cfg["steps"]
    args.warmup = cfg["warmup"] if args.warmup is None else args.warmup
    known = {v for vs in VARIANTS.values() for v in vs}
    if args.variants and not set(args.variants) <= known:
        parser.error(f"unknown variants {sorted(set(args.variants) - known)}; choose from {sorted(known)}")
    if args.config != "tiny" and args.device == "cpu":
        parser.error(f"--config {args.config} needs a GPU (a CPU step takes minutes); use --config tiny")
    return args


def variants_of(mode: str, args, device) -> tuple[str, ...]:
    """The mode's variants that ``--variants`` names (all by default; no compile on CPU by default)."""
    if args.variants is not None:
        return tuple(v for v in VARIANTS[mode] if v in args.variants)
    return tuple(v for v in VARIANTS[mode] if device.type == "cuda" or not ("compiled" in v or "regional" in v))


def run(args, on_rows=lambda result: None) -> dict:
    """The benchmark's result (``rows``: one per mode, batch and variant); ``on_rows(result)`` each
    time a row is added (the result so far)."""
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    mp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cpu":
        glibc_return_freed_memory()
    peak = args.peak_tflops or measure_bf16_peak(device)
    models = Models(cfg, args.seed)
    rows: list[dict] = []
    result = {
        "config": args.config,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "mixed_precision": str(mp_dtype),
        "bf16_peak_tflops": peak,
        "rows": rows,
    }
    for mode in args.modes:
        variants = variants_of(mode, args, device)
        if not variants:
            continue
        for b in args.batch:
            batch = make_batch(cfg, b, device, args.seed + 1)
            flops = float("nan")
            if not args.no_flops and (args.config == "tiny" or device.type == "cuda"):
                flops = count_flops(models, mode, batch, device, mp_dtype)
                _fresh(device)

            def add_row(kind, m, mode=mode, b=b, flops=flops):
                tflops = flops / (m["ms"] / 1e3) / 1e12
                rows.append(dict(
                    mode=mode, batch=b, variant=kind, ms_per_step=m["ms"], images_per_s=b / m["ms"] * 1e3,
                    peak_mem_mib=m["mem"], steady_mem_mib=m.get("steady_mem"), built_mem_mib=m.get("built_mem"),
                    reserved_mem_mib=m.get("reserved_mem"), left_mem_mib=m.get("left_mem"),
                    call_peaks_mib=m.get("call_peaks_mem"),
                    flops_per_step=flops, tflops=tflops,
                    peak_fraction=tflops / peak if peak else None,
                    **({"profile": m["profile"]} if "profile" in m else {}),
                ))
                on_rows(result)

            measure(mode, variants, models, device, mp_dtype, batch, args, on_variant=add_row)
    return result


def _ratio(base: dict | None, row: dict) -> str:
    if base is None or base is row:
        return "—"
    return f"{base['ms_per_step'] / row['ms_per_step']:.2f}x"


def markdown_table(result: dict) -> str:
    peak = result.get("bf16_peak_tflops")
    lines = [f"{result['config']} on {result['device_name']} (torch {result['torch']}, {result['mixed_precision']}"
             + (f", bf16 peak {peak:.0f} TFLOP/s measured" if peak else "") + ")", "",
             "| mode | batch | variant | ms/step | images/s | vs reference | vs peft-unet | peak mem (MiB) | steady peak (MiB) "
             "| built (MiB) | peak reserved (MiB) | TFLOP/s | % of bf16 peak |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["mode"], r["batch"], r["variant"]): r for r in result["rows"]}
    for r in result["rows"]:
        ref = by_key.get((r["mode"], r["batch"], "reference"))
        peft = by_key.get((r["mode"], r["batch"], "peft-unet"))
        fraction = "" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.1f}"
        tflops = "" if r["tflops"] != r["tflops"] else f"{r['tflops']:.3f}"
        steady, built, reserved = (("" if r.get(key) is None else f"{r[key]:.0f}")
                                   for key in ("steady_mem_mib", "built_mem_mib", "reserved_mem_mib"))
        lines.append(f"| {r['mode']} | {r['batch']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
                     f"{_ratio(ref, r)} | {_ratio(peft, r)} | {r['peak_mem_mib']:.0f} | {steady} | {built} | {reserved} | "
                     f"{tflops} | {fraction} |")
    warmup = result.get("warmup", 0)
    peaks = [r for r in result["rows"] if r.get("call_peaks_mib")]
    if peaks:  # which call made a row's peak (a captured row: the capture is the first timed call)
        header = "| mode | batch | variant | peak of each warm-up call (MiB) | first timed call | later timed calls | steady |"
        lines += ["", header, "|---|---:|---|---|---:|---|---:|"]
        for r in peaks:
            calls = [f"{c:.0f}" for c in r["call_peaks_mib"]]
            first = calls[warmup] if len(calls) > warmup else ""
            lines.append(f"| {r['mode']} | {r['batch']} | {r['variant']} | {', '.join(calls[:warmup])} | {first} "
                         f"| {', '.join(calls[warmup + 1:])} | {r['steady_mem_mib']:.0f} |")
    for r in result["rows"]:
        prof = r.get("profile")
        if prof:
            busy = prof["device_busy_fraction"]
            lines += ["", f"### profile: {r['mode']} batch {r['batch']} {r['variant']} — {prof['wall_ms_per_step']:.1f} ms/step "
                      f"under the profiler" + ("" if busy is None else f", device busy {100 * busy:.0f} % of the wall time"),
                      "", "```", prof["table"].rstrip(), "```"]
            if prof.get("kernel_families"):
                lines += ["", "| kernel family (per step) | calls | ms |", "|---|---:|---:|"]
                lines += [f"| {k['family']} | {k['calls']:.0f} | {k['ms']:.2f} |" for k in prof["kernel_families"]]
    return "\n".join(lines)


def write_files(result: dict, args) -> Path:
    """The JSON (``--out``, default in benchmarks/results/) and the ``--markdown`` table of ``result``
    as it stands; returns the JSON's path."""
    out = args.out or RESULTS / f"train_step-{args.config}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(result) + "\n")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # the files are rewritten after every row: a run stopped by a time limit keeps the rows it finished
    result = run(args, on_rows=lambda partial: write_files(partial, args))
    print(markdown_table(result))
    print(f"wrote {write_files(result, args)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
