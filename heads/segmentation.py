"""Task heads: the last layer, from decoder features to per-pixel outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError


class PixelHead(nn.Module):
    """Dropout + ``kernel_size`` conv: ``(B, C, h, w)`` → ``(B, num_outputs, h, w)`` (class logits or values)."""

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.1, kernel_size: int = 1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_channels, num_outputs, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.dropout(x))

    @torch.no_grad()
    def load_class_rows(self, head: dict[str, Tensor], source: Sequence[str], target: Sequence[str]) -> list[str]:
        """Load a pretrained head's ``weight`` / ``bias`` (one row per ``source`` class) for the
        ``target`` classes by name: shared classes keep their pretrained row, others keep this
        head's initialisation. Returns the names of the classes that start from scratch."""
        if head["weight"].shape[1:] != self.conv.weight.shape[1:]:
            raise UserInputError(f"pretrained head weight {tuple(head['weight'].shape)} does not fit "
                                 f"{tuple(self.conv.weight.shape)}")
        new = []
        for row, name in enumerate(target):
            if name in source:
                self.conv.weight[row] = head["weight"][list(source).index(name)]
                self.conv.bias[row] = head["bias"][list(source).index(name)]
            else:
                new.append(name)
        return new
