"""Shared helpers for backbones that wrap timm models as multi-level feature extractors."""

from __future__ import annotations

from torch import Tensor, nn


def to_nchw(features: list[Tensor], channels: list[int]) -> list[Tensor]:
    """Feature maps as ``(B, C, H, W)``; timm's Swin stages return ``(B, H, W, C)``."""
    return [f.permute(0, 3, 1, 2).contiguous() if f.shape[1] != c and f.shape[-1] == c else f
            for f, c in zip(features, channels)]


def call_layers_as_modules(model: nn.Module) -> nn.Module:
    """Make timm's SwinV2 attention call ``qkv(x)`` and add its q/k/v biases after, instead of
    ``F.linear(x, qkv.weight, bias)``: the same numbers, but adapters wrapped around ``qkv``
    (LoRA, SSF, ...) are then used rather than silently bypassed."""
    for module in model.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return model
