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
from torch import Tensor, nn
from torch.nn import functional as F

from backbones.factory import create_with_local_weights, load_own_layout, register_backbone
from backbones.features import GradCheckpointing, checked_out_indices, run_blocks, vit_blocks
from backbones.prithvi import init_linear_weights
from workbench.errors import UserInputError


def num_patches(length: int, patch_len: int, stride: int) -> int:
    """Patches of a series of ``length`` steps (the end padded by ``stride``, as PatchTST)."""
    return (length + stride - patch_len) // stride + 1


class PatchTST(GradCheckpointing, nn.Module):
    """Channel-independent patch transformer; see the module docstring.

    Input ``(B, M, L)`` with ``patch_len <= L <= context_length``; :meth:`forward_features`
    returns one ``(B, D, M, N)`` map per ``out_indices`` (default: the last block, after the final norm),
    ``N = (L + stride - patch_len) // stride + 1``.
    """

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

    def forward_features(self, series: Tensor) -> list[Tensor]:
        """``(B, M, L)`` → list of ``(B, D, M, N)``, one per ``out_indices``."""
        patches = self.patchify(series)
        b, m, n, _ = patches.shape
        tokens = self.pos_drop(self.patch_embed(patches.reshape(b * m, n, -1)) + self.pos_embed[:, :n])
        outputs = run_blocks(self.blocks, tokens, self.out_indices, self.norm,
                               checkpointing=self.grad_checkpointing)
        return [out.reshape(b, m, n, -1).permute(0, 3, 1, 2) for out in outputs]

    def forward(self, series: Tensor) -> list[Tensor]:
        return self.forward_features(series)


def _create(arch: dict[str, Any], pretrained: bool, **kwargs: Any) -> PatchTST:
    """Weights: a file in this model's own key layout (no public PatchTST checkpoint uses it)."""
    return create_with_local_weights(PatchTST, arch, load_own_layout, pretrained, **kwargs)


@register_backbone(PatchTST)
def patchtst_small(pretrained: bool = False, **kwargs: Any) -> PatchTST:
    """PatchTST's paper size: D 128, 3 layers, 16 heads, feed-forward 256, patches 16 / stride 8."""
    return _create({"embed_dim": 128, "depth": 3, "num_heads": 16, "mlp_ratio": 2.0}, pretrained, **kwargs)


@register_backbone(PatchTST)
def patchtst_tiny(pretrained: bool = False, **kwargs: Any) -> PatchTST:
    """A small PatchTST for tests and CPU demos: D 64, 2 layers, 4 heads."""
    return _create({"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}, pretrained, **kwargs)
