"""Steps per epoch on several processes: sdadapt's global batches each hold one bucket; kohya's accelerate deals
per-process batches of any bucket to the processes (``ceil(Σ ceil(n_bucket / b) / N)``, train_network.py with
accelerate's sharding). ``Dataset.batches_per_epoch(..., processes=N)`` is kohya's count, and a run says when the two
differ (with ``--epochs`` it trains more steps than kohya's)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from sdadapt.training.data import Dataset, ImageRecord


def _dataset(counts: list[int]) -> Dataset:
    return Dataset([ImageRecord(None, "x", repeats=n, bucket=(64, 64 + 8 * i)) for i, n in enumerate(counts) if n])


@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(any), batch=st.integers(1, 4),
       processes=st.integers(1, 4))
def test_kohyas_count_and_sdadapts(counts, batch, processes):
    dataset = _dataset(counts)
    # sdadapt: one bucket per global batch of batch × processes images
    assert dataset.batches_per_epoch(batch * processes) == sum(math.ceil(n / (batch * processes)) for n in counts)
    # kohya: per-process batches of `batch` per bucket, dealt to the processes (accelerate pads the last round)
    kohya = math.ceil(sum(math.ceil(n / batch) for n in counts) / processes)
    assert dataset.batches_per_epoch(batch * processes, processes=processes) == kohya
    if processes == 1:
        assert kohya == dataset.batches_per_epoch(batch)


def test_the_audits_example():
    dataset = _dataset([1, 3, 2, 1])  # (7 images in 4 buckets, batch 1, 4 processes)
    assert (dataset.batches_per_epoch(4), dataset.batches_per_epoch(4, processes=4)) == (4, 2)
