"""Two pure-Python paths of a minimal install, against the packages they stand in for, in one process.

- ``sdadapt.clip_text.clip_clean`` (ftfy 6.3.1's ``fix_text`` without mojibake repair, then the slow CLIP
  tokenizer's whitespace clean-up) against ``ftfy.fix_text`` + that clean-up — the reference the slow
  ``CLIPTokenizer`` runs — on 10,000 ASCII tag captions and 10,000 captions with curly quotes, full-width
  punctuation and CJK; the outputs are compared first (they must agree).
- ``sdadapt.images.decode_png`` (its own PNG reader, used without Pillow) against Pillow on a 512x512 RGB image
  Pillow wrote with adaptive row filters (Paeth on most rows, as on photos); the pixels are compared first.

Medians of ``--steps`` after ``--warmup``, interleaved (benchmarks/_bench.py). Needs ftfy and Pillow.

Usage::

    python benchmarks/text_clean_and_png.py    # ~30 s on two cores

Writes ``benchmarks/results/text_clean_and_png-cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch

from sdadapt.clip_text import clip_clean
from sdadapt.images import decode_png

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import environment, median_times, write_result

RESULTS = Path(__file__).resolve().parent / "results"
TAGS = ["1girl", "solo", "long hair", "smile", "outdoors", "sky", "red dress", "holding umbrella", "looking at viewer",
        "masterpiece", "best quality", "detailed background", "city street", "night", "rain"]
FANCY = ["it\u2019s", "\u201cquoted\u201d", "\uff0c", "\uff01", "\u732b", "\u72ac\u306e\u5199\u771f", "\ufb01sh", "&amp;",
         "caf\u00e9", "\u3000", "\u2014", "\uff21\uff22\uff23"]


def _captions(words: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [", ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(count)]


def _png() -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:512, 0:512]
    pixels = np.stack([np.sin(xx / 17) * 127 + 128, np.cos(yy / 13) * 127 + 128, (xx * yy) % 256], -1)
    pixels = (pixels + np.random.default_rng(0).integers(0, 8, pixels.shape)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    import ftfy
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "text_clean_and_png-cpu.json"))
    args = parser.parse_args()
    device = torch.device("cpu")

    def reference(text: str) -> str:  # (transformers' slow CLIPTokenizer: whitespace_clean(ftfy.fix_text(text)))
        return " ".join(ftfy.fix_text(text).split())

    rows = []
    for name, captions in (("ASCII tags", _captions(TAGS, 10_000, 1)),
                           ("curly / full-width / CJK", _captions(TAGS + FANCY * 2, 10_000, 2))):
        if [clip_clean(t) for t in captions] != [reference(t) for t in captions]:
            raise SystemExit(f"{name}: clip_clean differs from ftfy.fix_text")
        times = median_times({"sdadapt clip_clean": lambda c=captions: [clip_clean(t) for t in c],
                              "ftfy.fix_text": lambda c=captions: [reference(t) for t in c]},
                             steps=args.steps, warmup=args.warmup, device=device)
        rows.append({"case": f"10,000 captions, {name}", **{k: v for k, v in times.items()},
                     "speed-up": times["ftfy.fix_text"] / times["sdadapt clip_clean"]})
    data = _png()
    with Image.open(io.BytesIO(data)) as opened:
        want = np.asarray(opened.convert("RGB"))
    if not np.array_equal(decode_png(data), want):
        raise SystemExit("decode_png differs from Pillow")
    times = median_times({"sdadapt decode_png": lambda: decode_png(data),
                          "Pillow": lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))},
                         steps=args.steps, warmup=args.warmup, device=device)
    rows.append({"case": "512x512 PNG, adaptive filters", **times,
                 "speed-up": times["Pillow"] / times["sdadapt decode_png"]})
    for row in rows:
        cells = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in row.items() if k not in ("case", "speed-up"))
        print(f"{row['case']:<45} {cells}  (x{row['speed-up']:.2f})")
    print("wrote", write_result(args.out, {"environment": environment(), "rows": rows}))


if __name__ == "__main__":
    main()
