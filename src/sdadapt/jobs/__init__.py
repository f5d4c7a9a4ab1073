"""The jobs behind ``python -m sdadapt demo``, ``train`` and ``generate``, as functions.

They return plain dicts (scores, paths, timings) and report progress through callbacks; the
command line draws the bars and prints the tables. Library code here never prints.

* :mod:`.demo` — :func:`run_demo` (the toy model learns a held-out concept), :func:`prior_images`;
* :mod:`.train` — :class:`TrainOptions`, :func:`run_train` (a whole run on your images, docs/train.md);
* :mod:`.generate` — :func:`run_generate`;
* :mod:`.models` — :func:`load_system` (what ``--model`` names), :func:`resolve_device`.
"""

from __future__ import annotations

from .demo import prior_images, run_demo
from .generate import run_generate
from .models import load_system, resolve_device
from .train import TrainOptions, run_train

__all__ = ["run_demo", "run_train", "run_generate", "TrainOptions", "load_system", "prior_images", "resolve_device"]
