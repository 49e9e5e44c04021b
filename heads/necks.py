"""Necks: turn a backbone's features into the multi-scale pyramid a decoder expects."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from workbench.errors import UserInputError


def _upsample(channels: int, factor: int, lean: bool) -> nn.Module:
    """Learned ×2 / ×4 upsampling with transposed convs (norm + GELU between two of them); ``lean``
    halves the channels at every ×2 (``C → C/2``, ``C → C/2 → C/4``)."""
    half = channels // 2 if lean else channels
    if factor == 2:
        return nn.ConvTranspose2d(channels, half, 2, stride=2)
    return nn.Sequential(
        nn.ConvTranspose2d(channels, half, 2, stride=2),
        nn.GroupNorm(1, half),
        nn.GELU(),
        nn.ConvTranspose2d(half, half // 2 if lean else half, 2, stride=2),
    )


def _rescale(channels: int, scale: float, lean: bool) -> nn.Module:
    if scale in (2, 4):
        return _upsample(channels, int(scale), lean)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2)
    raise UserInputError(f"neck scale {scale} is not supported: use 4, 2, 1 or 0.5")


class ViTFeaturePyramid(nn.Module):
    """Same-stride ViT maps → a pyramid: level i is resized by ``scales[i]``.

    With the default scales, four stride-16 maps ``(B, C_i, H/16, W/16)`` become maps at
    strides 4, 8, 16 and 32. Channels are unchanged (``out_channels == in_channels``), or with
    ``lean`` divided by the upsampling factor (``C/4, C/2, C, C``: the decoder's costly
    high-resolution levels get fewer channels).
    """

    def __init__(self, in_channels: Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5),
                 lean: bool = False) -> None:
        super().__init__()
        if len(scales) != len(in_channels):
            raise UserInputError(
                f"neck scales {list(scales)} must have one entry per backbone level "
                f"({len(in_channels)} levels): set the backbone's out_indices or the scales to match."
            )
        self.scales = list(scales)
        self.out_channels = [c // int(s) if lean and s in (2, 4) else c for c, s in zip(in_channels, scales)]
        self.levels = nn.ModuleList(_rescale(c, s, lean) for c, s in zip(in_channels, scales))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [level(x) for level, x in zip(self.levels, features)]


def build_neck(feature_info: Sequence[dict], lean: bool = False) -> ViTFeaturePyramid | None:
    """A pyramid neck for single-stride (ViT) backbones (``lean``: see :class:`ViTFeaturePyramid`);
    None for hierarchical ones."""
    if len({info["reduction"] for info in feature_info}) > 1:
        return None
    channels = [info["num_chs"] for info in feature_info]
    scales = (4, 2, 1, 0.5)[-len(channels):] if len(channels) <= 4 else None
    if scales is None:
        raise UserInputError(
            f"a ViT backbone with {len(channels)} output levels needs at most 4: set out_indices"
        )
    return ViTFeaturePyramid(channels, scales, lean)
