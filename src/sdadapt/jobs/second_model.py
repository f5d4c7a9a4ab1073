"""A second model of a ``generate`` run — the hires checkpoint, a refiner that is not the SDXL refiner — and the run's
networks on it: A1111's LoRAs, hypernetworks and embeddings act on whatever model is loaded (its networks patch each
layer by name when the layer runs; its embeddings are loaded for each model whose width they fit), so a model
A1111 loads in the middle of a run gets them too."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["embeddings_on_second_model"]


def embeddings_on_second_model(second, files: Mapping[str, Path], handles: Sequence, *, texts: Sequence[str | None],
                               inject: Callable, expand: Callable, option: str) -> list:
    """The run's embeddings (``files``: name -> file, those ``handles`` hold on the first model) injected into
    ``second`` too (``inject(system, path)``), returned as its handles; the run's ``texts`` must read the same on
    both (``expand(text, handles)``: the names spelled as each model's placeholder tokens), since one text goes to
    both.

    Raises:
        ValueError: an embedding that does not fit ``second`` (another width: an SD1 embedding on SDXL), or a text
            spelled otherwise for it, prefixed with ``option`` (``--hires-checkpoint FILE``, ``--refiner FILE``).
    """
    second_handles = []
    for path in files.values():
        try:
            second_handles.append(inject(second, Path(path)))
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    for text in texts:
        if text and expand(text, handles) != expand(text, second_handles):
            raise ValueError(f"{option}: the embeddings in {text!r} are spelled as other tokens for it than for "
                             "--model, and one text goes to both; leave the embedding out")
    return second_handles
