"""The light decoder on frozen CLIP features (docs/method.md §6).

Per-block MLPs (D→dim→dim) → concat → 1×1 fusion conv → Dropout2d = ``F_u`` → pre-LN
transformer layers (QuickGELU, no positional encoding) → 1×1 classifier. The affinity map
``A_f = sigmoid(F_uᵀ F_u)`` comes from ``F_u`` before the transformer (docs/method.md §6.4).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tensor_ops import attention

__all__ = ["BlockMLP", "DecoderAttention", "DecoderLayer", "WeCLIPDecoder", "count_parameters"]


class BlockMLP(nn.Module):
    """``Linear(D→dim) → ReLU → Linear(dim→dim)`` on the tokens of one CLIP block (docs/method.md §6.2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.proj_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(F.relu(self.proj(x)))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderAttention(nn.Module):
    """Multi-head self-attention with a packed ``in_proj`` (names as in the reference, docs/method.md §15.2).

    ``need_weights`` returns the head-averaged softmax map ``B×N×N``; otherwise SDPA is used
    (export-friendly: the token count stays dynamic)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # docs/method.md §6.3 initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        B, N, D = x.shape
        nh = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, nh, D // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o, attn = attention(q, k, v, need_map=need_weights)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, D)), attn


class DecoderLayer(nn.Module):
    """Pre-LN residual block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` (docs/method.md §6.3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = DecoderAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, dim * mlp_ratio)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(dim * mlp_ratio, dim))]))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        o, attn = self.attn(self.ln_1(x), need_weights)
        x = x + o
        return x + self.mlp(self.ln_2(x)), attn


class WeCLIPDecoder(nn.Module):
    """Decoder of docs/method.md §6 for ``num_inputs`` CLIP blocks of width ``in_dim``.

    ``forward(features)`` with ``features`` a list of ``B×L×D`` block outputs (CLS first) and the
    patch grid ``(h, w)`` → ``(logits B×C×h×w, F_u B×dim×h×w)``; ``affinity(F_u)`` → ``B×hw×hw``.
    """

    def __init__(self, num_inputs: int, in_dim: int, num_classes: int, dim: int = 256, num_layers: int = 3,
                 num_heads: int = 8, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.num_inputs = num_inputs
        self.mlps = nn.ModuleList([BlockMLP(in_dim, dim) for _ in range(num_inputs)])
        self.fuse = nn.Conv2d(num_inputs * dim, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.layers = nn.ModuleList([DecoderLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def fuse_features(self, features: Sequence[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        """Per-block MLPs + concat + fusion conv + Dropout2d → ``F_u`` ``B×dim×h×w`` (docs/method.md §6.2)."""
        if len(features) != self.num_inputs:
            raise ValueError(f"decoder expects {self.num_inputs} feature maps, got {len(features)}")
        h, w = hw
        outs = []
        for mlp, f in zip(self.mlps, features):
            t = mlp(f[:, 1:].float())  # drop CLS; B×hw×dim
            outs.append(t.transpose(1, 2).reshape(t.shape[0], -1, h, w))
        return self.dropout(self.fuse(torch.cat(outs, dim=1)))

    def head(self, fu: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, list]:
        """Transformer layers + classifier on ``F_u`` → ``(logits B×C×h×w, layer attention maps)``."""
        B, D, h, w = fu.shape
        x = fu.flatten(2).transpose(1, 2)
        attns = []
        for layer in self.layers:
            x, a = layer(x, need_weights)
            if a is not None:
                attns.append(a)
        x = x.transpose(1, 2).reshape(B, D, h, w)
        return self.classifier(x), attns

    @staticmethod
    def affinity(fu: torch.Tensor) -> torch.Tensor:
        """``A_f = sigmoid(F_uᵀ F_u)`` with raw dot products (docs/method.md §6.4): ``B×hw×hw``."""
        f = fu.flatten(2)
        return torch.sigmoid(f.transpose(1, 2) @ f)

    def forward(self, features: Sequence[torch.Tensor], hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        fu = self.fuse_features(features, hw)
        logits, _ = self.head(fu)
        return logits, fu


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
