"""Task heads: the last layer, from decoder features to per-pixel outputs."""

from __future__ import annotations

from torch import Tensor, nn


class PixelHead(nn.Module):
    """Dropout + 1×1 conv: ``(B, C, h, w)`` → ``(B, num_outputs, h, w)`` (class logits or values)."""

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_channels, num_outputs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.dropout(x))
