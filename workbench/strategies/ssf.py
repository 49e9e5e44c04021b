"""SSF (scale and shift features): a learned per-channel affine after every Linear, LayerNorm and
patch-embedding conv of the backbone, folded into those layers' weights at export."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from workbench.model import BackboneModel
from workbench.strategies.base import Strategy

SSF_TARGETS = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Conv3d)


class ScaleShift(nn.Module):
    """``base(x) * scale + shift`` over the output channels of ``base``.

    Channels are the last dim for Linear/LayerNorm outputs ``(..., C)`` and dim 1 for conv
    outputs ``(B, C, ...)``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        channels = _out_channels(base_layer)
        self.ssf_scale = nn.Parameter(torch.ones(channels))
        self.ssf_shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if isinstance(self.base_layer, (nn.Conv2d, nn.Conv3d)):
            shape = (1, -1) + (1,) * (y.ndim - 2)
            return y * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)
        return y * self.ssf_scale + self.ssf_shift

    @torch.no_grad()
    def merged_layer(self) -> nn.Module:
        """A copy of ``base_layer`` whose weights include the scale and shift."""
        layer = copy.deepcopy(self.base_layer)
        weight = layer.weight
        weight.mul_(self.ssf_scale.view((-1,) + (1,) * (weight.ndim - 1)))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(self.ssf_shift))
        layer.bias.mul_(self.ssf_scale).add_(self.ssf_shift)
        return layer


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[-1]
    return layer.out_channels


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


class SSF(Strategy):
    """Scale-and-shift every Linear, LayerNorm and conv of the backbone; the rest is frozen.

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
            _replace(backbone, name, ScaleShift(layer))

    def merged(self, model: BackboneModel) -> BackboneModel:
        plain = copy.deepcopy(model)
        for name, layer in list(plain.backbone.named_modules()):
            if isinstance(layer, ScaleShift):
                _replace(plain.backbone, name, layer.merged_layer())
        return plain
