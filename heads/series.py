"""Heads for time-series feature maps ``(B, D, M, N)`` (channels M, patches N) from PatchTST."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class FlattenHead(nn.Module):
    """``(B, D, M, N)`` → each channel's ``D × N`` features flattened → linear → ``(B, M, out_len)``
    (PatchTST's forecasting head)."""

    def __init__(self, embed_dim: int, num_patches: int, out_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(embed_dim * num_patches, out_len)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.dropout(features.permute(0, 2, 1, 3).flatten(2)))


class PatchReconstructionHead(nn.Module):
    """``(B, D, M, N)`` → each token's ``patch_len`` values, overlapping patches averaged →
    ``(B, M, length)``. Works for any series length."""

    def __init__(self, embed_dim: int, patch_len: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.patch_len, self.stride = patch_len, stride
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(embed_dim, patch_len)

    def forward(self, features: Tensor, length: int) -> Tensor:
        b, _, m, n = features.shape
        patches = self.linear(self.dropout(features.permute(0, 2, 3, 1)))  # (B, M, N, P)
        padded = (n - 1) * self.stride + self.patch_len
        cols = patches.reshape(b * m, n, self.patch_len).transpose(1, 2)
        fold = {"output_size": (1, padded), "kernel_size": (1, self.patch_len), "stride": (1, self.stride)}
        summed = F.fold(cols, **fold)
        counts = F.fold(torch.ones_like(cols), **fold)
        return (summed / counts).reshape(b, m, padded)[..., :length]
