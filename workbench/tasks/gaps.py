"""Gap (cloud) masks for imputation: sampled patches or cloud-like blobs, per frame."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def sample_patch_gaps(shape: tuple[int, ...], patch: tuple[int, int], fraction: float,
                      generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """Boolean gaps ``(B, T, H, W)``: whole ``patch``-sized cells, each hidden with ``fraction``."""
    b, t, h, w = shape
    cells = torch.rand(b, t, h // patch[0], w // patch[1], generator=generator, device=device) < fraction
    return cells.repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)


def sample_blob_gaps(shape: tuple[int, ...], fraction: float, scale: int = 8,
                     generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """Cloud-like boolean gaps ``(B, T, H, W)``: smooth noise (``scale`` cells per side, bicubic)
    thresholded at its ``1 - fraction`` quantile per frame."""
    b, t, h, w = shape
    coarse = torch.rand(b * t, 1, scale, scale, generator=generator, device=device)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).reshape(b, t, h * w)
    threshold = field.quantile(1 - fraction, dim=-1, keepdim=True)
    return (field > threshold).reshape(b, t, h, w)


def hidden_tokens(gaps: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """Token mask ``(B, N)``: a token is hidden when any pixel of its tubelet is a gap.
    ``gaps`` ``(B, T, H, W)``; tokens ordered (t, h, w) as the encoder's."""
    s, p, q = patch
    b, t, h, w = gaps.shape
    cells = gaps.reshape(b, t // s, s, h // p, p, w // q, q).any(dim=(2, 4, 6))
    return cells.reshape(b, -1)
