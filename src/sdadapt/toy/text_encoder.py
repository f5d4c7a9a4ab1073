"""A tiny CLIP-structured text encoder (transformers' ``CLIPTextModel`` module names).

Module paths match transformers' so every sdadapt text-encoder preset, the kohya ``lora_te_``
naming and textual-inversion embedding tables apply unchanged::

    text_model.embeddings.token_embedding / position_embedding
    text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}
    text_model.final_layer_norm

Pre-LayerNorm transformer with a causal mask and quick-GELU, pooled at the first ``<eos>`` — as
CLIP. Returns ``(last_hidden_state (B, L, D), pooled (B, D))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ToyTextEncoder"]


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, d/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = _SelfAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, hidden)
        self.layer_norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_length: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class _Encoder(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, heads, hidden) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, hidden: int, max_length: int) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab_size, dim, max_length)
        self.encoder = _Encoder(dim, layers, heads, hidden)
        self.final_layer_norm = nn.LayerNorm(dim)


class ToyTextEncoder(nn.Module):
    """``encoder(input_ids (B, L)) -> (hidden (B, L, D), pooled (B, D))``."""

    def __init__(self, *, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4, hidden: int = 128,
                 max_length: int = 16, eos_id: int = 3) -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, hidden=hidden, max_length=max_length, eos_id=eos_id)
        self.eos_id = eos_id
        self.text_model = _TextTransformer(vocab_size, dim, layers, heads, hidden, max_length)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        tm = self.text_model
        h = tm.final_layer_norm(tm.encoder(tm.embeddings(input_ids)))  # (B, L, D)
        eos = (input_ids == self.eos_id).int().argmax(dim=1)  # first <eos>
        return h, h[torch.arange(h.shape[0], device=h.device), eos]
