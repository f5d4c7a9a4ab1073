"""A1111's seed ``-1``: "a random seed", drawn once per run and reported so the image can be made again.

A1111 (``modules/processing.py``, ``get_fixed_seed``) turns a seed of ``-1`` (or an empty one) into
``int(random.randrange(4294967294))`` before anything is drawn, for the seed and the variation seed alike
(``p.seed = get_fixed_seed(p.seed)``, ``p.subseed = get_fixed_seed(p.subseed)`` in ``process_images_inner``),
and writes the drawn seed into the image's infotext. Any other value, negative ones included, is used as given.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["RANDOM_SEED", "fixed_seed"]

#: the seed value that means "draw one" (A1111's)
RANDOM_SEED = -1


def fixed_seed(seed: int | None, *, draw: Callable[[int], int] = random.randrange) -> int | None:
    """``seed``, or a seed drawn in ``[0, 4294967294)`` for :data:`RANDOM_SEED` (A1111's ``get_fixed_seed``).

    ``None`` stays ``None`` (sdadapt's "no variation seed"; A1111's empty field has no counterpart here).
    ``draw`` is ``random.randrange`` (A1111's source), a parameter for tests.
    """
    if seed is None or seed != RANDOM_SEED:
        return seed
    return int(draw(4294967294))
