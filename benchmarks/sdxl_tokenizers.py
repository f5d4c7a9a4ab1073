"""SDXL's two tokenizers from a one-tokenizer source (a single-file checkpoint, a vocabulary file, a tokenizer folder).

``sdadapt.diffusers_system._tokenizers`` builds the second tokenizer (``!`` its special pad token) from the same
source as the first; the reference column deep-copies the first and sets the pad token on the copy, as it did
before. Both ways in one process, process CPU milliseconds, median of ``--repeats``; the two second tokenizers'
saved files are compared byte for byte.

    python benchmarks/sdxl_tokenizers.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sdadapt.clip_tokenizer import CLIPTokenizer
from sdadapt.diffusers_system import _tokenizers


def cpu_ms(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times), result


def copied_second() -> tuple[object, object]:
    """The reference: the first tokenizer built, then deep-copied for the second."""
    first = CLIPTokenizer.load(None, max_length=77, pad="eos").to_transformers()
    second = copy.deepcopy(first)
    second.add_special_tokens({"pad_token": "!"})
    return first, second


def saved(tokenizer, folder: Path) -> dict[str, bytes]:
    tokenizer.save_pretrained(folder)
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    config = SimpleNamespace(max_position_embeddings=77)
    _tokenizers(None, "sd1", config, CLIPTokenizer)  # (imports transformers and parses the vocabulary once)
    built_ms, (_, built) = cpu_ms(lambda: _tokenizers(None, "sdxl", config, CLIPTokenizer), args.repeats)
    copied_ms, (_, copied) = cpu_ms(copied_second, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        same = saved(built, Path(folder) / "built") == saved(copied, Path(folder) / "copied")
    print(f"{'both SDXL tokenizers':<24} {'deep copy ms':>13} {'built ms':>9} {'ratio':>6}  same files")
    print(f"{'shipped vocabulary':<24} {copied_ms:13.1f} {built_ms:9.1f} {copied_ms / built_ms:5.1f}x  {same}")
    out = Path(__file__).parent / "results" / "sdxl_tokenizers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "repeats": args.repeats, "deep_copy_ms": copied_ms,
                               "built_ms": built_ms, "same_files": same}, indent=1))


if __name__ == "__main__":
    main()
