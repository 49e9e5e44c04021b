"""Scene-level head: pool the last feature map, then a linear classifier."""

from __future__ import annotations

from torch import Tensor, nn


class PoolingHead(nn.Module):
    """``(B, C, h, w)`` → global average pool → dropout → linear → ``(B, num_outputs)``."""

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.norm(x.mean(dim=(-2, -1)))))
