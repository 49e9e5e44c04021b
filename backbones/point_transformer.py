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
from torch import Tensor, nn

from backbones.factory import create_with_local_weights, load_checked, read_state_dict, register_backbone
from backbones.features import GradCheckpointing, checked_out_indices, run_blocks, vit_blocks
from backbones.prithvi import default_out_indices, init_linear_weights
from workbench.errors import UserInputError


def farthest_point_sample(xyz: Tensor, count: int) -> Tensor:
    """Indices ``(B, count)`` of ``count`` points of ``xyz`` ``(B, N, 3)`` spread by farthest point
    sampling, starting from point 0 (deterministic)."""
    b, n, _ = xyz.shape
    chosen = torch.zeros(b, count, dtype=torch.long, device=xyz.device)
    distance = torch.full((b, n), float("inf"), device=xyz.device)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(count):
        chosen[:, i] = farthest
        distance = torch.minimum(distance, (xyz - xyz[rows, farthest].unsqueeze(1)).square().sum(-1))
        farthest = distance.argmax(-1)
    return chosen


def gather_points(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, N, C)`` at ``index`` ``(B, ...)`` → ``(B, ..., C)``."""
    flat = index.reshape(index.shape[0], -1)
    out = torch.gather(values, 1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])


def knn(query: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Distances and indices ``(B, Q, k)`` of the ``k`` nearest ``points`` ``(B, N, 3)`` of each
    ``query`` ``(B, Q, 3)``."""
    distance, index = torch.cdist(query, points).topk(k, dim=-1, largest=False)
    return distance, index


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
    returns one ``(B, D, 1, G)`` map per ``out_indices`` (the last block's after the final norm).
    """

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

    def forward_features(self, points: Tensor) -> list[Tensor]:
        """``(B, N, C)`` → list of ``(B, D, 1, G)``, one per ``out_indices``."""
        tokens, centers = self.tokenize(points)
        outputs = run_blocks(self.blocks, tokens, self.out_indices, self.norm, pos=self.pos_embed(centers),
                               checkpointing=self.grad_checkpointing)
        return [out.transpose(1, 2).unsqueeze(2) for out in outputs]

    def forward(self, points: Tensor) -> list[Tensor]:
        return self.forward_features(points)


OFFICIAL_PREFIXES = ("module.", "base_model.", "MAE_encoder.", "transformer_q.")


def load_point_transformer(model: PointTransformer, path: str | Path) -> dict[str, Any]:
    """Load a Point-MAE or Point-BERT checkpoint's encoder into ``model``; returns a report.

    Decoder, heads, mask and class tokens are ignored. With extra per-point features
    (``in_chans > 3``) the first layer's xyz weights load and the feature weights start at zero.
    """
    encoder = {}
    for key, value in read_state_dict(Path(path)).items():
        for prefix in OFFICIAL_PREFIXES:
            key = key.removeprefix(prefix)
        encoder[key.replace("blocks.blocks.", "blocks.")] = value
    own = model.state_dict()
    first = "encoder.first_conv.0.weight"
    if first in encoder and encoder[first].shape[1] == 3 < model.in_chans:
        padded = own[first].new_zeros(own[first].shape)
        padded[:, :3] = encoder[first]
        encoder[first] = padded
    return load_checked(model, encoder, path, "check embed_dim, depth and num_heads in model.backbone_kwargs")


def _create(arch: dict[str, Any], pretrained: bool, **kwargs: Any) -> PointTransformer:
    return create_with_local_weights(PointTransformer, arch, load_point_transformer, pretrained, **kwargs)


@register_backbone(PointTransformer)
def point_mae_small(pretrained: bool = False, **kwargs: Any) -> PointTransformer:
    """Point-MAE / Point-BERT as published: D 384, 12 blocks, 6 heads, 64 groups of 32 points."""
    return _create({"embed_dim": 384, "depth": 12, "num_heads": 6}, pretrained, **kwargs)


@register_backbone(PointTransformer)
def point_mae_tiny(pretrained: bool = False, **kwargs: Any) -> PointTransformer:
    """A small point transformer for tests and CPU demos: D 96, 4 blocks, 3 heads."""
    return _create({"embed_dim": 96, "depth": 4, "num_heads": 3}, pretrained, **kwargs)
