"""Build the shipped toy weights: ``python -m sdadapt.toy.pretrain [--out FILE] [--unet-steps N]``.

1. The judge CLIP, contrastively, on every concept (held-out ones included).
2. The text encoder + UNet jointly, with :func:`sdadapt.training.step.train_step` (ε-prediction, linear
   DDPM schedule, min-SNR-5, EMA 0.999), on every concept *except* the held-out shape and colour;
   10 % of captions dropped (for classifier-free guidance), 25 % of samples also conditioned on the
   judge's image embedding of their own image (image variations / CLIP inversion).

Deterministic for a given seed, torch version and thread count. On the 2-core reference CPU the
defaults (800 CLIP + 4000 UNet steps) take about 40 minutes on one thread; the result is written atomically with the
training recipe and a held-in accuracy check in its metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..training.optim import lr_at, set_lr
from ..training.step import EMA, StepConfig, TrainState, train_step
from .shapes import COLOURS, SHAPES, sample_scenes, scene_batch
from ..formats.files import read_safetensors_header
from .system import DEFAULT_WEIGHTS, ToySystem, build_toy, load_toy, save_toy

__all__ = ["pretrain_clip", "pretrain_generator", "held_in_accuracy", "main"]


def _clip_captions(scenes, captions, g: torch.Generator) -> list[str]:
    out = []
    for scene, text in zip(scenes, captions):
        r = float(torch.rand((), generator=g))
        out.append(f"a {scene.colour} shape" if r < 0.2 else f"a {scene.shape}" if r < 0.4 else text)
    return out


def pretrain_clip(system: ToySystem, *, steps: int, batch: int = 256, seed: int = 0, log=None) -> None:
    clip = system.clip
    clip.train().requires_grad_(True)
    params = list(clip.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_lr(opt, lr_at(step, base_lr=2e-3, schedule="cosine", warmup_steps=50, total_steps=steps))
        scenes = sample_scenes(batch, seed=seed * 100_003 + step, held_out=True)
        images, captions = scene_batch(scenes, seed=step)
        loss = clip.contrastive_loss(images, system.tokenize(_clip_captions(scenes, captions, g)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"clip step {step:5d}/{steps} loss {loss.item():.3f}")
    clip.eval().requires_grad_(False)


def pretrain_generator(system: ToySystem, *, steps: int, batch: int = 32, seed: int = 0, lr: float = 1e-3, log=None) -> None:
    unet, te = system.unet, system.text_encoder
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    system.clip.requires_grad_(False)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state = TrainState(seed=seed, ema=EMA(params, decay=0.999))
    config = StepConfig(min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(seed + 1)
    embed_dim = unet.config["image_embed_dim"]

    def model(x, t, cond):
        return unet(x, t, te(cond["ids"])[0], cond["image_embeds"])

    start = time.perf_counter()
    for step in range(steps):
        set_lr(opt, lr_at(step, base_lr=lr, schedule="cosine", warmup_steps=200, total_steps=steps, min_lr=lr * 0.05))
        scenes = sample_scenes(batch, seed=seed * 100_003 + 7 + step)
        images, captions = scene_batch(scenes, seed=10_000_000 + step)
        drop = torch.rand(batch, generator=g) < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        use_image = (torch.rand(batch, generator=g) < 0.25).float()[:, None]
        with torch.no_grad():
            image_embeds = system.clip.encode_image(images) * use_image if use_image.any() else torch.zeros(batch, embed_dim)
        batch_dict = {"latents": system.encode_images(images), "cond": {"ids": system.tokenize(captions), "image_embeds": image_embeds}}
        metrics = train_step(model, batch_dict, params=params, optimizer=opt, state=state, config=config,
                             alphas_cumprod=system.alphas_cumprod)
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"unet step {step:6d}/{steps} loss {metrics['loss'].item():.4f} ({time.perf_counter() - start:.0f} s)")
    state.ema.copy_to()  # ship the EMA weights
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)


@torch.no_grad()
def held_in_accuracy(system: ToySystem, *, count: int = 48, seed: int = 123, steps: int = 25) -> dict[str, float]:
    """Sample "a {colour} {shape}" for held-in concepts; fraction the judge classifies right."""
    scenes = sample_scenes(count, seed=seed)
    prompts = [f"a {s.colour} {s.shape}" for s in scenes]
    images = system.sample(prompts, seed=seed, steps=steps)
    shapes = system.clip.classify(images, attribute="shape")
    colours = system.clip.classify(images, attribute="colour")
    return {
        "shape_accuracy": sum(p == s.shape for p, s in zip(shapes, scenes)) / count,
        "colour_accuracy": sum(p == s.colour for p, s in zip(colours, scenes)) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdadapt.toy.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="UNet/text-encoder peak learning rate")
    parser.add_argument("--init", default=None, help="continue from these toy weights (use --clip-steps 0 to keep its CLIP)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    previous = None
    if args.init:
        system = load_toy(args.init)
        previous = read_safetensors_header(args.init)[1].get("recipe")
    else:
        system = build_toy(seed=args.seed)
    if args.clip_steps:
        pretrain_clip(system, steps=args.clip_steps, seed=args.seed, log=log)
    clip_time = time.perf_counter() - start
    pretrain_generator(system, steps=args.unet_steps, batch=args.batch, seed=args.seed, lr=args.lr, log=log)
    total = time.perf_counter() - start
    accuracy = held_in_accuracy(system)
    log(f"held-in accuracy {accuracy}; {total / 60:.1f} min")
    recipe = {"seed": args.seed, "clip_steps": args.clip_steps, "unet_steps": args.unet_steps, "batch": args.batch,
              "lr": args.lr, "init": json.loads(previous) if previous else None,
              "clip_seconds": round(clip_time), "total_seconds": round(total), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "held_in": accuracy,
              "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS)}}
    save_toy(system, args.out, metadata={"recipe": json.dumps(recipe)})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
