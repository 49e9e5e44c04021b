"""SSF (scale and shift features): a learned per-channel affine after every Linear, LayerNorm and
patch-embedding conv of the backbone, folded into those layers' weights at export."""

from __future__ import annotations

import copy

import torch
from timm.layers import LayerNorm2d, LayerNorm2dFp32, LayerNormAct2d, LayerNormAct2dFp32
from torch import Tensor, nn

from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import fold_wrappers, replace_module

SSF_TARGETS = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Conv3d)


class ScaleShift(nn.Module):
    """``base(x) * scale + shift`` over the output channels of ``base`` (scale only when ``base``
    has no bias, so that the merged layer keeps its layout).

    Channels are the last dim for Linear/LayerNorm outputs ``(..., C)`` and dim 1 for conv and
    ``LayerNorm2d`` outputs ``(B, C, ...)``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        channels = _out_channels(base_layer)
        self.ssf_scale = nn.Parameter(torch.ones(channels))
        self.ssf_shift = nn.Parameter(torch.zeros(channels)) if getattr(base_layer, "bias", None) is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        shape = (1, -1) + (1,) * (y.ndim - 2) if _channels_first(self.base_layer) else (-1,)
        y = y * self.ssf_scale.view(shape)
        return y if self.ssf_shift is None else y + self.ssf_shift.view(shape)

    @torch.no_grad()
    def merged_layer(self) -> nn.Module:
        """A copy of ``base_layer`` whose weights include the scale and shift."""
        layer = copy.deepcopy(self.base_layer)
        layer.weight.mul_(self.ssf_scale.view((-1,) + (1,) * (layer.weight.ndim - 1)))
        if self.ssf_shift is not None:
            layer.bias.mul_(self.ssf_scale).add_(self.ssf_shift)
        return layer


CHANNELS_FIRST = (nn.Conv2d, nn.Conv3d, LayerNorm2d, LayerNorm2dFp32, LayerNormAct2d, LayerNormAct2dFp32)
"""Layers that put channels on dim 1: convs and timm's 2-D LayerNorms (subclasses of ``nn.LayerNorm``)."""


def _channels_first(layer: nn.Module) -> bool:
    return isinstance(layer, CHANNELS_FIRST)


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[-1]
    return layer.out_channels


class SSF(Strategy):
    """Scale-and-shift every Linear, LayerNorm and conv of the backbone (scale only where a layer
    has no bias); the rest is frozen.

    LayerNorms without affine parameters are skipped (nothing to fold the scale into).
    Merged export folds each ``ScaleShift`` into its layer: no extra inference cost.
    """

    name = "ssf"

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        backbone.requires_grad_(False)
        targets = [
            (n, m)
            for n, m in backbone.named_modules()
            if isinstance(m, SSF_TARGETS) and getattr(m, "weight", None) is not None
        ]
        for name, layer in targets:
            replace_module(backbone, name, ScaleShift(layer))

    def merged(self, model: BackboneModel) -> BackboneModel:
        return fold_wrappers(model, (ScaleShift,))
