"""Dense decoders (UPerNet, FCN, U-Net) on multi-scale feature maps, from smp building blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn

from workbench.errors import UserInputError


class UPerNet(nn.Module):
    """UPerNet (PSP on the coarsest level + FPN) → ``(B, channels, H/r0, W/r0)``.

    Input: maps from fine to coarse, e.g. strides 4, 8, 16, 32 (at least two levels).
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise UserInputError("the uper decoder needs at least 2 feature levels; use fcn")
        # smp's decoder skips its first two (stride 1 and 2) inputs: pad the list accordingly.
        self.decoder = UPerNetDecoder([0, 0, *in_channels], len(in_channels) + 1, channels)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.decoder([features[0], features[0], *features])


class FCN(nn.Module):
    """``num_convs`` 3×3 conv-BN-ReLU layers on the coarsest level → ``(B, channels, h, w)``."""

    coarsest_only = True  # models feed it only the last level (no unused neck branches)

    def __init__(self, in_channels: Sequence[int], channels: int = 256, num_convs: int = 2) -> None:
        super().__init__()
        widths = [in_channels[-1]] + [channels] * num_convs
        self.convs = nn.Sequential(*(Conv2dReLU(a, b, 3, padding=1) for a, b in zip(widths, widths[1:])))
        self.out_channels = channels if num_convs else in_channels[-1]

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.convs(features[-1])


class UNet(nn.Module):
    """U-Net decoder (smp's ``UnetDecoder``): from the coarsest map, upsample ×2 and fuse the
    skip connection of each finer level, then once more → ``(B, channels / 2**(n-1), 2·H/r0, 2·W/r0)``.

    Input: maps from fine to coarse, e.g. strides 2, 4, 8, 16, 32 (a CNN encoder); block widths
    halve from ``channels`` (256 → 256, 128, 64, 32, 16, smp's default and ukis-csmask's).
    """

    head_kernel_size = 3  # smp's segmentation head: a 3×3 conv

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        widths = [max(channels // 2**i, 1) for i in range(len(in_channels))]
        # smp's decoder drops its first (stride-1) input: a placeholder of 0 channels stands in.
        self.decoder = UnetDecoder([0, *in_channels], widths, n_blocks=len(in_channels))
        self.out_channels = widths[-1]

    def forward(self, features: list[Tensor]) -> Tensor:
        finest = features[0]
        full = finest.new_empty((finest.shape[0], 0, 2 * finest.shape[-2], 2 * finest.shape[-1]))
        return self.decoder([full, *features])


DECODERS: dict[str, type[nn.Module]] = {"uper": UPerNet, "fcn": FCN, "unet": UNet}
DecoderName = Literal["uper", "fcn", "unet"]


def build_decoder(name: str, in_channels: Sequence[int], channels: int = 256) -> nn.Module:
    """Create a decoder by name (``uper``, ``fcn`` or ``unet``)."""
    if name not in DECODERS:
        raise UserInputError(f"unknown decoder {name!r}: choose one of {sorted(DECODERS)}")
    return DECODERS[name](in_channels, channels)
