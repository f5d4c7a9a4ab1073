"""``generate --vae-tiling``: the memory and time of decoding a large image whole (the reference: what every run did
before) against diffusers' tiled decode (``AutoencoderKL.enable_tiling``, what ``--vae-tiling`` turns on).

A random SD-config VAE (``_bench.VAE_CONFIGS["sd"]``, ``sample_size`` 512: tiles of 64 latents, a quarter
overlapping) decodes one random latent of ``--size`` pixels; each way runs in its own process (so each peak is its
own), its peak RSS above the process's start sampled by ``_bench.RssSampler``. The two images differ only at the
tiles' blended seams (the largest difference is printed). Prints a table and writes
``benchmarks/results/vae_tiling-sd-cpu.json``.

    python benchmarks/vae_tiling.py [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent)]


def _one(way: str, size: int, folder: Path) -> dict:
    """Decode in this process, ``way`` ``"whole"`` or ``"tiled"``: seconds, peak RSS growth, the image saved."""
    import gc

    import torch
    from _bench import VAE_CONFIGS, RssSampler
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIGS["sd"], sample_size=512).eval()
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    if way == "tiled":
        vae.enable_tiling()
    gc.collect()
    with torch.no_grad(), RssSampler() as rss:
        base = rss.rss()
        start = time.perf_counter()
        image = vae.decode(latents).sample
        seconds = time.perf_counter() - start
    torch.save(image, folder / f"{way}.pt")
    return {"way": way, "seconds": seconds, "peak_bytes": rss.peak - base, "rss_method": rss.method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--one", choices=("whole", "tiled"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="/tmp/sdadapt-bench-vae-tiling")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae_tiling-sd-cpu.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(_one(args.one, args.size, folder)))
        return
    import torch
    from _bench import environment, write_result

    rows = []
    for way in ("whole", "tiled"):
        done = subprocess.run([sys.executable, __file__, "--one", way, "--size", str(args.size), "--folder",
                               str(folder)], check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    whole, tiled = (torch.load(folder / f"{way}.pt", weights_only=True) for way in ("whole", "tiled"))
    difference = float((whole - tiled).abs().max())
    print(f"SD-config VAE decode of a {args.size}x{args.size} image, CPU, {torch.get_num_threads()} threads "
          f"(peak RSS growth: {rows[0]['rss_method']})")
    for row in rows:
        print(f"  {row['way']:<6} {row['seconds']:7.2f} s   peak {row['peak_bytes'] / 2**30:6.2f} GiB")
    print(f"  memory ratio {rows[0]['peak_bytes'] / rows[1]['peak_bytes']:.1f}x, time ratio "
          f"{rows[1]['seconds'] / rows[0]['seconds']:.2f}x (tiled / whole); largest pixel difference {difference:.3f} "
          "(the seams)")
    result = {"benchmark": "vae_tiling", "environment": environment(), "size": args.size, "rows": rows,
              "max_abs_difference": difference}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
