"""Speed of ``cache_text_encoder_outputs``: a LoRA step (text encoder frozen) with and without the cache.

Same process, same random weights, same data; the two variants alternate (uncached, cached,
uncached, ...) ``--rounds`` times and each round trains ``--steps`` optimiser steps with
:func:`sdadapt.methods.fit` on a cached-latent dataset. The time of a step is the gap between two
``on_step`` calls (each one ends with the step's loss read, so the step has finished); the first
``--warmup`` steps of a round are left out (the cache is built before the first step and not
counted: it is one text-encoder pass over the captions). Reported: median ms/step of each variant
and the speed-up ``uncached / cached``.

Systems:

``toy`` — sdadapt's shipped toy text-to-image model (:func:`sdadapt.toy.build_toy`);
``tiny-sd`` — a diffusers SD1-layout system with random weights: the ``tiny`` UNet and VAE of
    ``benchmarks/_bench.py`` and a CLIP text encoder (``--clip tiny`` or ``clip-l``, SD1.5's shape,
    77 tokens) with sdadapt's offline CLIP tokenizer.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/text_encoder_cache.py --system toy
    OMP_NUM_THREADS=1 python benchmarks/text_encoder_cache.py --system tiny-sd --clip clip-l --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import CLIP_CONFIGS, UNET_CONFIGS, VAE_CONFIGS  # noqa: E402

from sdadapt.methods import METHODS, FitConfig, fit  # noqa: E402
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors  # noqa: E402


def tiny_sd(clip: str):
    """A DiffusersSystem (SD1 layout, random weights) whose text encoder is ``CLIP_CONFIGS[clip]``."""
    import diffusers
    import transformers

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import DiffusersSystem

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.load(max_length=77)
    config = dict(CLIP_CONFIGS[clip], max_position_embeddings=77, vocab_size=max(len(tokenizer.encoder), 1000))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **config, eos_token_id=tokenizer.encoder["<|endoftext|>"], bos_token_id=tokenizer.encoder["<|startoftext|>"]))
    unet = diffusers.UNet2DConditionModel(**dict(UNET_CONFIGS["tiny"], cross_attention_dim=config["hidden_size"]))
    vae = diffusers.AutoencoderKL(**VAE_CONFIGS["tiny"])
    system = DiffusersSystem(unet, vae, text_encoder, tokenizer, {"prediction_type": "epsilon"})
    system.requires_grad_(False)
    return system.eval()


def make_system(name: str, clip: str):
    if name == "toy":
        from sdadapt.toy import build_toy

        return build_toy(seed=1)
    return tiny_sd(clip)


def run(system, images, captions, *, cache: bool, steps: int, batch: int) -> list[float]:
    """Seconds of each optimiser step of one fit."""
    adaptation = METHODS["lora"].adapt(system, seed=1, text_encoder=False)
    dataset = Dataset(records_from_tensors(images, captions))
    encode_buckets(dataset, system.encode_images, images=images)
    stamps: list[float] = []
    start = time.perf_counter()
    fit(system, adaptation, dataset, config=FitConfig(steps=steps, batch_size=batch, learning_rate=1e-4, warmup_steps=0,
                                                      cache_text_encoder_outputs=cache),
        on_step=lambda progress: stamps.append(time.perf_counter()))
    adaptation.remove()
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("toy", "tiny-sd"), default="toy")
    parser.add_argument("--clip", choices=sorted(CLIP_CONFIGS), default="tiny", help="tiny-sd's text encoder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the result as JSON")
    args = parser.parse_args()

    system = make_system(args.system, args.clip)
    size = int(system.image_size) if args.system == "toy" else 32
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, size, size, generator=g) * 2 - 1
    captions = [f"a red circle {i}" if args.system != "toy" else ("a red circle", "a blue square")[i % 2]
                for i in range(args.images)]
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.rounds):
        for name in times:
            times[name] += run(system, images, captions, cache=name == "cached", steps=args.steps,
                               batch=args.batch)[args.warmup:]
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    result = {"system": args.system, "clip": args.clip if args.system != "toy" else None, "batch": args.batch,
              "torch_threads": torch.get_num_threads(), "ms_per_step": ms, "speedup": ms["uncached"] / ms["cached"],
              "steps_timed": len(times["cached"])}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
