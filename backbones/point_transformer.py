"""Point-BERT / Point-MAE-style point-cloud transformer.

A cloud ``(B, N, 3 + F)`` (xyz, then F per-point features) is tokenized as in Point-BERT and
Point-MAE: ``G`` centres by farthest point sampling, the ``k`` nearest points of each centre
as a group (xyz relative to the centre), a mini-PointNet per group → one token per group, plus
a position embedding of the centre (an MLP, added at every block). Feature maps are
``(B, D, 1, G)``, so the pooling heads of the image tasks apply; ``heads.PointPropagationHead``
brings the tokens back to every point for per-point segmentation.

Weights load from a local Point-MAE checkpoint (``base_model`` with ``MAE_encoder.*`` keys from
pre-training, or the fine-tuned classifier's keys) or a Point-BERT one (``transformer_q.*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from backbones.factory import load_checked, register_backbone, strip_prefixes
from workbench.checkpoints import read_state_dict
from backbones.features import (
    GradCheckpointing, block_intermediates, checked_out_indices, default_out_indices, vit_blocks, vit_group_matcher,
)
from backbones.layers import farthest_point_sample, gather_points, init_linear_weights, knn
from workbench.errors import UserInputError


class MiniPointNet(nn.Module):
    """Group of points ``(B*G, C, k)`` → token ``(B*G, D)``: Point-MAE's two shared MLPs with a
    max-pooled global feature in between (same layer names, so its weights load)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(in_chans, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, embed_dim, 1))

    def forward(self, groups: Tensor) -> Tensor:
        feature = self.first_conv(groups)
        pooled = feature.amax(-1, keepdim=True).expand(-1, -1, feature.shape[-1])
        return self.second_conv(torch.cat([pooled, feature], 1)).amax(-1)


class PointTransformer(GradCheckpointing, nn.Module):
    """Point-cloud encoder; see the module docstring.

    Input ``(B, N, in_chans)`` (xyz first) with ``N >= group_size``; :meth:`forward_features`
    returns the normed group tokens ``(B, G, D)``, :meth:`forward_intermediates` one
    ``(B, D, 1, G)`` map per ``out_indices`` (the last block's after the final norm).
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        num_groups: int = 64,
        group_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        """``in_chans``: 3 (xyz) plus per-point features (intensity, RGB, ...)."""
        super().__init__()
        if in_chans < 3:
            raise UserInputError(f"point clouds need xyz: in_chans must be >= 3, got {in_chans}")
        self.num_groups, self.group_size, self.in_chans = num_groups, group_size, in_chans
        self.embed_dim = embed_dim
        self.out_indices = checked_out_indices(out_indices, depth, default_out_indices(depth, levels=3))
        self.encoder = MiniPointNet(in_chans, embed_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
        self.blocks = vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, qkv_bias=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = [{"num_chs": embed_dim, "reduction": group_size, "module": f"blocks.{i}"}
                             for i in self.out_indices]
        self.apply(init_linear_weights)

    def centers(self, points: Tensor) -> Tensor:
        """Group centres ``(B, G, 3)`` of ``points`` ``(B, N, C)`` (farthest point sampling)."""
        if points.ndim != 3 or points.shape[-1] != self.in_chans:
            raise UserInputError(
                f"point backbone takes (batch, points, {self.in_chans}) with xyz first; got {tuple(points.shape)}"
            )
        if points.shape[1] < self.group_size:
            raise UserInputError(f"clouds of {points.shape[1]} points are smaller than group_size {self.group_size}")
        xyz = points[..., :3].float()
        return gather_points(xyz, farthest_point_sample(xyz, self.num_groups))

    def tokenize(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, N, C)`` → group tokens ``(B, G, D)`` and centres ``(B, G, 3)``."""
        centers = self.centers(points)
        _, index = knn(centers, points[..., :3], self.group_size)
        groups = gather_points(points, index)  # (B, G, k, C)
        groups = torch.cat([groups[..., :3] - centers.unsqueeze(2), groups[..., 3:]], -1)
        b, g, k, c = groups.shape
        tokens = self.encoder(groups.reshape(b * g, k, c).transpose(1, 2))
        return tokens.reshape(b, g, -1), centers

    def _blocks(self, points: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Outputs ``(B, G, D)`` of the blocks in ``indices``; the centre positions are added to
        every block's input, as in Point-BERT/MAE."""
        tokens, centers = self.tokenize(points)
        return block_intermediates(self.blocks, tokens, indices, self.norm, pos=self.pos_embed(centers),
                                   recompute=self.recompute)

    def forward_features(self, points: Tensor) -> Tensor:
        """``(B, N, C)`` → normed group tokens ``(B, G, D)``."""
        return self._blocks(points, [len(self.blocks) - 1])[0]

    def forward_intermediates(self, points: Tensor) -> list[Tensor]:
        """``(B, N, C)`` → list of ``(B, D, 1, G)``, one per ``out_indices``."""
        return [out[:, self.num_prefix_tokens:].transpose(1, 2).unsqueeze(2)
                for out in self._blocks(points, self.out_indices)]

    def forward(self, points: Tensor) -> Tensor:
        return self.forward_features(points)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return vit_group_matcher(r"^encoder|^pos_embed", coarse)


OFFICIAL_PREFIXES = ("module.", "base_model.", "MAE_encoder.", "transformer_q.")


def load_point_transformer(model: PointTransformer, path: str | Path) -> dict[str, Any]:
    """Load a Point-MAE or Point-BERT checkpoint's encoder into ``model``; returns a report.

    Decoder, heads, mask and class tokens are ignored. With extra per-point features
    (``in_chans > 3``) the first layer's xyz weights load and the feature weights start at zero.
    """
    official = strip_prefixes(read_state_dict(Path(path)), OFFICIAL_PREFIXES)
    encoder = {k.replace("blocks.blocks.", "blocks."): v for k, v in official.items()}
    own = model.state_dict()
    first = "encoder.first_conv.0.weight"
    if first in encoder and encoder[first].shape[1] == 3 < model.in_chans:
        padded = own[first].new_zeros(own[first].shape)
        padded[:, :3] = encoder[first]
        encoder[first] = padded
    return load_checked(model, encoder, path, "check embed_dim, depth and num_heads in model.backbone_kwargs")


default_cfgs = generate_default_cfgs({
    name: {"num_classes": 0, "origin_url": "https://github.com/Pang-Yatian/Point-MAE",
           "paper_name": "Masked Autoencoders for Point Cloud Self-supervised Learning (ECCV 2022)"}
    for name in ("point_mae_small", "point_mae_tiny")
})
register_backbone(PointTransformer, "point_mae_small", load_point_transformer,
                  "Point-MAE / Point-BERT as published: D 384, 12 blocks, 6 heads, 64 groups of 32 points.",
                  embed_dim=384, depth=12, num_heads=6)
register_backbone(PointTransformer, "point_mae_tiny", load_point_transformer,
                  "A small point transformer for tests and CPU demos: D 96, 4 blocks, 3 heads.",
                  embed_dim=96, depth=4, num_heads=3)
