"""A tiny CLIP: an image tower and a text tower trained contrastively on the toy world.

It is the judge of the toy benchmarks (zero-shot shape and colour accuracy, image-image and
image-text cosine similarity — the DreamBooth and textual-inversion papers' metrics) and the
image-embedding space that aesthetic gradients and CLIP inversion work in. It is trained on every
concept, held-out ones included: the generator is what must not have seen them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .shapes import COLOURS, SHAPES
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer

__all__ = ["ToyCLIP"]


class _ImageTower(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        chans = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1] * 2, dim)

    def forward(self, images: Tensor) -> Tensor:
        h = self.convs(images)  # (B, 128, 4, 4)
        return self.proj(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


class ToyCLIP(nn.Module):
    """``encode_image((B,3,32,32)) -> (B,E)``, ``encode_text(ids (B,L)) -> (B,E)``, both unit-norm."""

    def __init__(self, *, vocab_size: int, dim: int = 64) -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, dim=dim)
        self.vision = _ImageTower(dim)
        self.text = ToyTextEncoder(vocab_size=vocab_size, dim=64, layers=2, heads=4, hidden=128)
        self.text_projection = nn.Linear(64, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # ln(1/0.07), CLIP's init

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.vision(images), dim=-1)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        return F.normalize(self.text_projection(self.text(input_ids)[1]), dim=-1)

    def contrastive_loss(self, images: Tensor, input_ids: Tensor) -> Tensor:
        """Symmetric InfoNCE over the batch (captions that are identical count as positives)."""
        img, txt = self.encode_image(images), self.encode_text(input_ids)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
        same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).float()  # duplicate captions
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2

    @torch.no_grad()
    def classify(self, images: Tensor, *, attribute: str, tokenizer: ToyTokenizer | None = None) -> list[str]:
        """Zero-shot shape (prompts "a circle", ...) or colour ("a red shape", ...) of each image."""
        tokenizer = tokenizer or ToyTokenizer()
        if attribute == "shape":
            names, prompts = list(SHAPES), [f"a {s}" for s in SHAPES]
        elif attribute == "colour":
            names, prompts = list(COLOURS), [f"a {c} shape" for c in COLOURS]
        else:
            raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
        sims = self.encode_image(images) @ self.encode_text(tokenizer(prompts).to(images.device)).T
        return [names[i] for i in sims.argmax(dim=1).tolist()]
