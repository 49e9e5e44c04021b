"""PatchTST-style encoder for time series: channel-independent patches, encoder only.

A series ``(B, M, L)`` is cut, channel by channel, into patches of ``patch_len`` steps every
``stride`` steps; each patch is embedded linearly, gets a learned position embedding and goes
through the transformer blocks alone (channels share the weights but never attend to each
other). Feature maps are ``(B, D, M, N)`` — channels as rows, patches as columns — so the
pooling heads of the image tasks apply unchanged, and ``heads.FlattenHead`` forecasts or
reconstructs each channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import Tensor, nn
from torch.nn import functional as F

from backbones.factory import load_own_layout, register_backbone
from backbones.features import (
    GradCheckpointing, block_intermediates, checked_out_indices, forward_blocks, vit_blocks, vit_group_matcher,
)
from backbones.layers import init_linear_weights
from workbench.errors import UserInputError


def num_patches(length: int, patch_len: int, stride: int) -> int:
    """Patches of a series of ``length`` steps (the end padded by ``stride``, as PatchTST)."""
    return (length + stride - patch_len) // stride + 1


class PatchTST(GradCheckpointing, nn.Module):
    """Channel-independent patch transformer; see the module docstring.

    Input ``(B, M, L)`` with ``patch_len <= L <= context_length``; :meth:`forward_features`
    returns the normed tokens ``(B * M, N, D)`` (channels independent), :meth:`forward_intermediates`
    one ``(B, D, M, N)`` map per ``out_indices`` (default: the last block, after the final norm),
    ``N = (L + stride - patch_len) // stride + 1``.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        context_length: int = 512,
        patch_len: int = 16,
        stride: int = 8,
        bands: Sequence[str] | None = None,
        embed_dim: int = 128,
        depth: int = 3,
        num_heads: int = 16,
        mlp_ratio: float = 2.0,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """``bands``: channel names (from the datamodule); the weights do not depend on them."""
        super().__init__()
        if not 0 < stride <= patch_len <= context_length:
            raise UserInputError(
                f"PatchTST needs 0 < stride ({stride}) <= patch_len ({patch_len}) <= context_length ({context_length})"
            )
        self.context_length, self.patch_len, self.stride = context_length, patch_len, stride
        self.bands = list(bands) if bands else None
        self.embed_dim = embed_dim
        self.out_indices = checked_out_indices(out_indices, depth, [depth - 1])
        self.patch_embed = nn.Linear(patch_len, embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches(context_length, patch_len, stride), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, norm, qkv_bias=True,
                                 proj_drop=drop_rate)
        self.norm = norm(embed_dim)
        self.feature_info = [{"num_chs": embed_dim, "reduction": stride, "module": f"blocks.{i}"}
                             for i in self.out_indices]
        nn.init.uniform_(self.pos_embed, -0.02, 0.02)
        self.apply(init_linear_weights)

    def patchify(self, series: Tensor) -> Tensor:
        """``(B, M, L)`` → ``(B, M, N, patch_len)``."""
        if series.ndim != 3:
            raise UserInputError(f"PatchTST takes series (batch, channels, length); got shape {tuple(series.shape)}")
        length = series.shape[-1]
        if not self.patch_len <= length <= self.context_length:
            raise UserInputError(
                f"series length {length} is outside [{self.patch_len}, {self.context_length}]: set "
                "model.backbone_kwargs.context_length (or patch_len) to fit the data"
            )
        padded = F.pad(series, (0, self.stride), mode="replicate")
        return padded.unfold(-1, self.patch_len, self.stride)

    def _tokens(self, series: Tensor) -> Tensor:
        """``(B, M, L)`` → patch tokens with positions ``(B * M, N, D)``."""
        patches = self.patchify(series)
        b, m, n, _ = patches.shape
        return self.pos_drop(self.patch_embed(patches.reshape(b * m, n, -1)) + self.pos_embed[:, :n])

    def forward_features(self, series: Tensor) -> Tensor:
        """``(B, M, L)`` → normed tokens ``(B * M, N, D)``."""
        return forward_blocks(self.blocks, self._tokens(series), self.norm, self.recompute)

    def forward_intermediates(self, series: Tensor) -> list[Tensor]:
        """``(B, M, L)`` → list of ``(B, D, M, N)``, one per ``out_indices``."""
        b, m, _ = series.shape
        outputs = block_intermediates(self.blocks, self._tokens(series), self.out_indices, self.norm,
                                      recompute=self.recompute)
        return [out[:, self.num_prefix_tokens:].reshape(b, m, out.shape[1] - self.num_prefix_tokens, -1)
                .permute(0, 3, 1, 2) for out in outputs]

    def forward(self, series: Tensor) -> Tensor:
        return self.forward_features(series)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return vit_group_matcher(r"^pos_embed|^patch_embed", coarse)


default_cfgs = generate_default_cfgs({
    name: {"num_classes": 0, "origin_url": "https://github.com/yuqinie98/PatchTST",
           "paper_name": "A Time Series is Worth 64 Words: Long-term Forecasting with Transformers (ICLR 2023)"}
    for name in ("patchtst_small", "patchtst_tiny")
})
# Weights: a file in this model's own key layout (no public PatchTST checkpoint uses it).
register_backbone(PatchTST, "patchtst_small", load_own_layout,
                  "PatchTST's paper size: D 128, 3 layers, 16 heads, feed-forward 256, patches 16 / stride 8.",
                  embed_dim=128, depth=3, num_heads=16, mlp_ratio=2.0)
register_backbone(PatchTST, "patchtst_tiny", load_own_layout,
                  "A small PatchTST for tests and CPU demos: D 64, 2 layers, 4 heads.",
                  embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
