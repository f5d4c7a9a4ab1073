"""A tiny conditional UNet with diffusers' ``UNet2DConditionModel`` module names.

Two resolution levels (16x16 and 8x8 over pixel-unshuffled 32x32 images, 12 channels), a
cross-attention transformer after every ResNet, a time embedding and an optional image-embedding
input (for image variations and CLIP inversion). Names follow diffusers so every sdadapt preset
and file format applies unchanged::

    conv_in, time_embedding.linear_1/linear_2, image_embedding,
    down_blocks.{0,1}.resnets.0.{norm1,conv1,time_emb_proj,norm2,conv2[,conv_shortcut]},
    down_blocks.{0,1}.attentions.0.{norm,proj_in,transformer_blocks.0.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2},proj_out},
    down_blocks.0.downsamplers.0.conv, mid_block.{resnets.0,attentions.0,resnets.1},
    up_blocks.{0,1}.{resnets.{0,1},attentions.{0,1}}, up_blocks.0.upsamplers.0.conv, conv_norm_out, conv_out

``attn1``/``attn2`` have ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` Linears; ``proj_in`` and
``proj_out`` are 1x1 convs as in SD1.

With ``image_token=True`` (the toy image variant, :mod:`sdadapt.toy.image_variant`) the image
embedding also enters every cross-attention as one extra context token
``image_token_proj(image_embeds)`` appended after the text tokens (as image-variation models and
IP-Adapter feed image embeddings); the default ``False`` builds the shipped text-to-image UNet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ToyUNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), diffusers' ``flip_sin_to_cos=True, freq_shift=0``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, out), nn.Linear(out, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out[1](self.to_out[0](out))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, dim, heads)
        self.attn2 = _Attention(dim, context_dim, heads)
        self.ff = _FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class _Transformer2D(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([_TransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class _Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.Module):
    """A down/up block: resnets, one transformer after each, optional down/upsampler."""

    def __init__(self, ins: list[int], out: int, temb: int, context_dim: int, groups: int, *, down: bool, up: bool) -> None:
        super().__init__()
        heads = max(1, out // 16)
        self.resnets = nn.ModuleList(_Resnet(cin, out, temb, groups) for cin in ins)
        self.attentions = nn.ModuleList(_Transformer2D(out, context_dim, heads, groups) for _ in ins)
        if down:
            self.downsamplers = nn.ModuleList([_Downsample(out)])
        if up:
            self.upsamplers = nn.ModuleList([_Upsample(out)])


class _MidBlock(nn.Module):
    def __init__(self, dim: int, temb: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(dim, dim, temb, groups), _Resnet(dim, dim, temb, groups)])
        self.attentions = nn.ModuleList([_Transformer2D(dim, context_dim, max(1, dim // 16), groups)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class ToyUNet(nn.Module):
    """``unet(x (B,12,16,16), t (B,), context (B,L,D), image_embeds=None (B,E)) -> (B,12,16,16)``."""

    def __init__(self, *, in_channels: int = 12, widths: tuple[int, int] = (48, 96), context_dim: int = 64,
                 image_embed_dim: int = 64, groups: int = 16, image_token: bool = False) -> None:
        super().__init__()
        w0, w1 = widths
        temb = w0 * 4
        self.config = dict(in_channels=in_channels, widths=list(widths), context_dim=context_dim, image_embed_dim=image_embed_dim, groups=groups)
        self.time_proj_dim = w0
        self.conv_in = nn.Conv2d(in_channels, w0, 3, padding=1)
        self.time_embedding = _TimestepEmbedding(w0, temb)
        self.image_embedding = nn.Linear(image_embed_dim, temb)
        if image_token:
            self.config["image_token"] = True
            self.image_token_proj = nn.Linear(image_embed_dim, context_dim)
        self.down_blocks = nn.ModuleList([
            _Block([w0], w0, temb, context_dim, groups, down=True, up=False),
            _Block([w0], w1, temb, context_dim, groups, down=False, up=False),
        ])
        self.mid_block = _MidBlock(w1, temb, context_dim, groups)
        # skips (diffusers order): conv_in w0, d0 w0, d0-down w0, d1 w1
        self.up_blocks = nn.ModuleList([
            _Block([w1 + w1, w1 + w0], w1, temb, context_dim, groups, down=False, up=True),
            _Block([w1 + w0, w0 + w0], w0, temb, context_dim, groups, down=False, up=False),
        ])
        self.conv_norm_out = nn.GroupNorm(groups, w0)
        self.conv_out = nn.Conv2d(w0, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, image_embeds: Tensor | None = None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.time_proj_dim).to(x.dtype))
        if image_embeds is not None:
            temb = temb + self.image_embedding(image_embeds.to(temb.dtype))
            if hasattr(self, "image_token_proj"):  # (B, L, D) -> (B, L+1, D)
                context = torch.cat([context, self.image_token_proj(image_embeds.to(context.dtype))[:, None]], dim=1)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for resnet, attn in zip(block.resnets, block.attentions):
                h = attn(resnet(h, temb), context)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            for resnet, attn in zip(block.resnets, block.attentions):
                h = attn(resnet(torch.cat([h, skips.pop()], dim=1), temb), context)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
