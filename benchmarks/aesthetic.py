"""Aesthetic gradients: time per prompt, the A1111 extension's deep copy vs sdadapt's functional personalisation.

One process, one text encoder per model, one prompt at a time (what happens per generated
prompt). Two variants compute the *same* conditioning:

1. ``deepcopy`` — the reference, written here as the A1111 extension's ``AestheticCLIP.__call__``
   does it: ``copy.deepcopy`` of the (text) CLIP model, ``requires_grad_(True)``, a default
   ``torch.optim.Adam(text_model.parameters(), lr)``, ``steps`` × (``get_text_features`` of the
   full 77-token prompt, normalised; ``loss = −sim``; ``zero_grad``; ``backward``; ``step``), then
   the personalised ``last_hidden_state`` and ``z·(1 − w) + z'·w``. (Conservative: the extension
   copies the whole ``CLIPModel`` — the 303M-parameter vision tower too — and calls
   ``gc.collect()`` per prompt; this reference copies only the text model + projection and
   does not collect.)
2. ``deepcopy-full`` (with ``--reference full``) — the same, but as the extension really does it:
   ``copy.deepcopy`` of the whole CLIP model, image tower included (for ``clip-l`` a
   ``CLIPVisionModelWithProjection`` with CLIP ViT-L/14's configuration, 303M parameters, random
   weights; for the toy its judge CLIP), then ``gc.collect()`` after each prompt.
3. ``sdadapt`` — :func:`sdadapt.personalize_text_encoder`: no copy (``torch.func.functional_call``
   over cloned tensors), token rows in use only, loss steps up to ``<eos>``, fused Adam.

Both get the unpersonalised conditioning ``z`` precomputed (the pipeline computes it anyway).
Before timing, their outputs must agree to ``--tolerance`` (max |Δ|, default 1e-5) or the run
stops. Timing: the variants alternate (rotated order) so load from other processes hits both
alike; medians and minima over ``--repeats`` after ``--warmup`` (on a shared machine the minimum
is the steadier estimate of the cost itself; both are reported, the speed-up of each too).

Models: ``toy`` — the shipped toy system's text encoder (72k parameters) with its fitted
projection (:func:`sdadapt.aesthetic.toy_text_projection`); ``clip-l`` — a transformers
``CLIPTextModelWithProjection`` with OpenAI CLIP-L's configuration (12 layers, 768 wide, 123M
parameters), random weights (no download). Prompts: a short and a long one per model.

``--quality`` adds the toy quality table: generations of held-in prompts with an aesthetic
embedding of one colour's images, scored by the toy judge CLIP (cosine to the embedding, share
of images of that colour, shape accuracy = content kept), baseline vs personalisation settings.

Usage::

    python benchmarks/aesthetic.py --threads 1              # toy + clip-l, CPU, a few minutes (the docs' numbers)
    python benchmarks/aesthetic.py --models toy --repeats 50
    python benchmarks/aesthetic.py --threads 1 --reference full  # + the extension's full-CLIPModel copy
    python benchmarks/aesthetic.py --models toy --quality   # + quality (~3 min)
    python benchmarks/aesthetic.py --device cuda

Writes ``benchmarks/results/aesthetic-<device>.json`` (``--out`` to change).
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
from _bench import CLIP_CONFIGS, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("deepcopy", "sdadapt")
FULL_VARIANTS = ("deepcopy", "deepcopy-full", "sdadapt")
#: CLIP ViT-L/14's image tower (openai/clip-vit-large-patch14 vision_config)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
CLIP_BOS, CLIP_EOS = 49406, 49407
# plausible CLIP-BPE ids (the weights are random, only the lengths matter): 8 and 40 prompt tokens
CLIP_PROMPTS = {"short": [320, 1125, 539, 320, 3540, 525, 320, 2185],
                "long": [(101 + 37 * i) % 49000 + 256 for i in range(40)]}
TOY_PROMPTS = {"short": "a red circle", "long": "a large red circle on the left on a gray background"}


# ------------------------------------------------------------------------------------ reference
def deepcopy_personalize(model, ids, target, z, *, projection, steps: int, lr: float, weight: float, adam: dict | None = None,
                         image_tower=None):
    """The A1111 extension's per-prompt personalisation (see the module docstring); returns (B, L, D).

    ``image_tower``: copied together with the text model (the extension deep-copies the whole
    ``CLIPModel``), and ``gc.collect()`` runs at the end, as in the extension."""
    if image_tower is not None:
        model, tower = copy.deepcopy((model, image_tower))
    else:
        model = copy.deepcopy(model)
    model.requires_grad_(True)
    tuned = [p for n, p in model.named_parameters() if "text_projection" not in n]
    optimizer = torch.optim.Adam(tuned, lr=lr, **(adam or {}))
    with torch.enable_grad():
        for _ in range(steps):
            out = model(ids)
            feats = out.text_embeds if hasattr(out, "text_embeds") else F.linear(out[1], projection)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            loss = -(feats @ target.T)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
        with torch.no_grad():
            out = model(ids)
            zn = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    del model, optimizer
    if image_tower is not None:
        del tower
        gc.collect()
    return z * (1 - weight) + zn * weight


# ------------------------------------------------------------------------------------ models
def build(name: str, device: torch.device, seed: int, *, image_tower: bool = False):
    """``(encoder, projection or None, {prompt name: ids (1, L)}, image tower or None)``."""
    torch.manual_seed(seed)
    if name == "toy":
        from sdadapt.aesthetic import toy_text_projection
        from sdadapt.toy import load_toy

        system = load_toy(device=device)
        projection = toy_text_projection(system)
        return (system.text_encoder, projection, {k: system.tokenize([p]) for k, p in TOY_PROMPTS.items()},
                system.clip if image_tower else None)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIGS["clip-l"])).eval().to(device)
    model.requires_grad_(False)
    prompts = {}
    for key, body in CLIP_PROMPTS.items():
        ids = [CLIP_BOS] + body + [CLIP_EOS]
        prompts[key] = torch.tensor([ids + [CLIP_EOS] * (77 - len(ids))], device=device)  # A1111 pads with <eos>
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION)).eval().to(device) if image_tower else None
    return model, None, prompts, tower


def hidden_of(encoder, ids):
    with torch.no_grad():
        out = encoder(ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def measure(model_name: str, args, device: torch.device) -> list[dict]:
    import sdadapt

    full = args.reference == "full"
    variants = FULL_VARIANTS if full else VARIANTS
    encoder, projection, prompts, tower = build(model_name, device, args.seed, image_tower=full)
    params = sum(p.numel() for p in encoder.parameters())
    width = encoder.config["dim"] if isinstance(encoder.config, dict) else encoder.config.projection_dim
    g = torch.Generator().manual_seed(args.seed + 1)
    embedding = (torch.randn(1, width, generator=g) * 3.0).to(device)  # an unnormalised "mean image embedding"
    target = embedding / embedding.norm(dim=-1, keepdim=True)
    repeats = args.repeats if args.repeats is not None else (30 if model_name == "toy" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if model_name == "toy" else 1)
    rows = []
    for prompt, ids in prompts.items():
        z = hidden_of(encoder, ids)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}

        def run(variant: str, ids=ids, z=z):
            if variant in ("deepcopy", "deepcopy-full"):
                return deepcopy_personalize(encoder, ids, target, z, projection=projection, steps=args.steps, lr=args.lr,
                                            weight=args.weight, image_tower=tower if variant == "deepcopy-full" else None)
            return sdadapt.personalize_text_encoder(encoder, ids, embedding, steps=args.steps, lr=args.lr, weight=args.weight,
                                                    projection=projection, base=z)

        reference, ours = run("deepcopy"), run("sdadapt")
        diff = float((reference - ours).abs().max())
        effect = float((reference - z).abs().max())
        same = all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
        if not diff <= args.tolerance or not same:
            raise SystemExit(f"{model_name}/{prompt}: sdadapt differs from the deep-copy reference by {diff:.3g} "
                             f"(tolerance {args.tolerance}), encoder unchanged: {same}")
        if effect < 1e-6:
            raise SystemExit(f"{model_name}/{prompt}: the personalisation changed nothing ({effect:.3g}); comparison vacuous")
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(warmup + repeats):
            for variant in (variants if i % 2 == 0 else variants[::-1]):
                sync(device)
                start = time.perf_counter()
                run(variant)
                sync(device)
                if i >= warmup:
                    times[variant].append(time.perf_counter() - start)
        ref_ms, our_ms = (statistics.median(times[v]) * 1e3 for v in VARIANTS)
        extra = {}
        if full:
            full_ms = statistics.median(times["deepcopy-full"]) * 1e3
            extra = {"deepcopy_full_ms": full_ms, "deepcopy_full_ms_min": min(times["deepcopy-full"]) * 1e3,
                     "speedup_full": full_ms / our_ms, "speedup_full_best": min(times["deepcopy-full"]) / min(times["sdadapt"]),
                     "image_tower_parameters": sum(p.numel() for p in tower.parameters())}
        row = {"model": model_name, "parameters": params, "prompt": prompt, "prompt_tokens": int(ids.shape[1]),
               "loss_tokens": int((ids[0] == (encoder.eos_id if model_name == "toy" else CLIP_EOS)).int().argmax()) + 1,
               "deepcopy_ms": ref_ms, "sdadapt_ms": our_ms, "speedup": ref_ms / our_ms,
               "deepcopy_ms_min": min(times["deepcopy"]) * 1e3, "sdadapt_ms_min": min(times["sdadapt"]) * 1e3,
               "speedup_best": min(times["deepcopy"]) / min(times["sdadapt"]),
               "max_abs_diff": diff, "personalisation_effect": effect, "encoder_bit_identical": same, "repeats": repeats,
               **extra}
        rows.append(row)
        print(f"# {model_name:>6} {prompt:>5}: deepcopy {ref_ms:9.1f} ms  sdadapt {our_ms:8.1f} ms  "
              f"x{row['speedup']:.2f}  max|Δ| {diff:.1e}"
              + (f"  deepcopy-full {extra['deepcopy_full_ms']:9.1f} ms x{extra['speedup_full']:.2f}" if full else ""),
              file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------ quality
QUALITY_SETTINGS = (("baseline", 0, 0.0, 0.0), ("published", 5, 1e-4, 0.9), ("lr 1e-3", 10, 1e-3, 0.9),
                    ("lr 3e-3", 10, 3e-3, 0.9), ("lr 1e-2", 10, 1e-2, 0.9))


def quality(args, device: torch.device) -> list[dict]:
    """Toy generations of held-in prompts *without* a colour word ("a circle", "a ring on a gray
    background"), with an aesthetic embedding of ``colour`` images; scored by the judge CLIP."""
    from sdadapt.aesthetic import (
        aesthetic_embedding,
        aesthetic_sample,
        toy_text_projection,
    )
    from sdadapt.toy import load_toy
    from sdadapt.toy.evaluate import concept_data
    from sdadapt.toy.shapes import BACKGROUNDS, HELD_OUT_SHAPES, SHAPES

    system = load_toy(device=device)
    projection = toy_text_projection(system)
    shapes = [s for s in SHAPES if s not in HELD_OUT_SHAPES]
    pairs = [(f"a {s}", s) for s in shapes] + [(f"a {s} on a {b} background", s) for s in shapes for b in BACKGROUNDS]
    prompts, wanted = [p for p, _ in pairs], [s for _, s in pairs]
    rows = []
    for colour in args.colours:
        images, _ = concept_data(colour, 16, seed=0)
        embedding = aesthetic_embedding(images.to(device), system.clip.encode_image)
        unit = embedding / embedding.norm()
        for label, steps, lr, weight in QUALITY_SETTINGS:
            generated = []
            for seed in args.quality_seeds:
                if steps == 0:
                    generated.append(system.sample(prompts, seed=seed, steps=20))
                else:
                    generated.append(aesthetic_sample(system, prompts, embedding, projection=projection, aesthetic_steps=steps,
                                                      lr=lr, weight=weight, seed=seed, steps=20))
            out = torch.cat(generated)
            with torch.no_grad():
                cos = float((system.clip.encode_image(out) @ unit.T).mean())
                colours = system.clip.classify(out, attribute="colour")
                found = system.clip.classify(out, attribute="shape")
            want = wanted * len(args.quality_seeds)
            row = {"colour": colour, "setting": label, "steps": steps, "lr": lr, "weight": weight, "images": len(want),
                   "cos_to_aesthetic": cos, "colour_share": sum(c == colour for c in colours) / len(colours),
                   "shape_accuracy": sum(a == b for a, b in zip(found, want)) / len(want)}
            rows.append(row)
            print(f"# quality {colour:>7} {label:>9}: cos {cos:.3f} {colour} {row['colour_share']:.2f} "
                  f"shape {row['shape_accuracy']:.2f}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("toy", "clip-l"), default=["toy", "clip-l"])
    parser.add_argument("--steps", type=int, default=5, help="personalisation steps (A1111 default 5)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=None, help="timed prompts per variant (default: toy 30, clip-l 5)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |conditioning difference| allowed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", choices=("text", "full"), default="text",
                        help="text: the reference deep-copies the text model only (conservative, default); full: also "
                        "time the extension's own way, the whole CLIP model (image tower too) + gc.collect()")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", action="store_true", help="also run the toy quality table")
    parser.add_argument("--colours", nargs="+", default=["blue", "purple", "green"])
    parser.add_argument("--quality-seeds", nargs="+", type=int, default=[5, 6])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def markdown(rows: list[dict]) -> str:
    header = ("| model | params | prompt (loss tokens / all) | deepcopy (A1111), median (best) | sdadapt, median (best) | "
              "speed-up, median (best) | max abs diff |")
    lines = [header, "|---|---:|---|---:|---:|---:|---:|"]
    full = any("deepcopy_full_ms" in r for r in rows)
    if full:
        lines[0] += " deepcopy of the whole CLIP model + gc (the extension), median (best) | speed-up vs it |"
        lines[1] += "---:|---:|"
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['prompt']} ({r['loss_tokens']}/{r['prompt_tokens']}) | "
                     f"{_ms(r['deepcopy_ms'])} ({_ms(r['deepcopy_ms_min'])}) | {_ms(r['sdadapt_ms'])} ({_ms(r['sdadapt_ms_min'])}) | "
                     f"{r['speedup']:.2f}x ({r['speedup_best']:.2f}x) | {r['max_abs_diff']:.1e} |"
                     + (f" {_ms(r['deepcopy_full_ms'])} ({_ms(r['deepcopy_full_ms_min'])}) | {r['speedup_full']:.2f}x "
                        f"({r['speedup_full_best']:.2f}x) |" if full else ""))
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value / 1e3:.2f} s" if value >= 1e3 else f"{value:.1f} ms"


def quality_markdown(rows: list[dict]) -> str:
    lines = ["| aesthetic set | setting (steps, lr, weight) | cos to embedding | share of that colour | shape accuracy |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        setting = r["setting"] if not r["steps"] else f"{r['setting']} ({r['steps']}, {r['lr']:g}, {r['weight']:g})"
        lines.append(f"| {r['colour']} | {setting} | {r['cos_to_aesthetic']:.3f} | {r['colour_share']:.2f} | {r['shape_accuracy']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"# aesthetic: device={device} threads={torch.get_num_threads()} steps={args.steps} lr={args.lr} weight={args.weight}",
          file=sys.stderr, flush=True)
    rows = [row for name in args.models for row in measure(name, args, device)]
    print(markdown(rows))
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "steps": args.steps, "lr": args.lr, "weight": args.weight,
              "tolerance": args.tolerance, "reference": args.reference, "rows": rows}
    if args.quality:
        result["quality"] = quality(args, device)
        print()
        print(quality_markdown(result["quality"]))
    out = args.out or RESULTS / f"aesthetic-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
