"""Per-point head: group tokens of a point transformer brought back to every point."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones.layers import gather_points, knn


def propagate(points: Tensor, centers: Tensor, tokens: Tensor, k: int = 3) -> Tensor:
    """Inverse-distance interpolation of ``tokens`` ``(B, G, C)`` at ``centers`` ``(B, G, 3)`` onto
    ``points`` ``(B, N, 3)`` from their ``k`` nearest centres → ``(B, N, C)`` (PointNet++'s
    feature propagation)."""
    distance, index = knn(points, centers, min(k, centers.shape[1]))
    weight = 1.0 / (distance + 1e-8)
    weight = weight / weight.sum(-1, keepdim=True)
    return (gather_points(tokens, index) * weight.unsqueeze(-1)).sum(2)


class PointPropagationHead(nn.Module):
    """Per-point logits ``(B, K, N)`` from token maps ``(B, D, 1, G)`` (levels concatenated),
    their centres and the points ``(B, N, C)``: propagated tokens + the cloud's max-pooled
    token + a per-point MLP of the raw point → shared MLP classifier."""

    def __init__(self, token_channels: int, point_channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.point_mlp = nn.Sequential(nn.Conv1d(point_channels, 64, 1), nn.BatchNorm1d(64), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Conv1d(2 * token_channels + 64, 256, 1), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Conv1d(256, num_classes, 1),
        )

    def forward(self, features: list[Tensor], centers: Tensor, points: Tensor) -> Tensor:
        tokens = torch.cat([f[:, :, 0] for f in features], 1).transpose(1, 2)  # (B, G, C)
        per_point = propagate(points[..., :3], centers, tokens).transpose(1, 2)  # (B, C, N)
        pooled = tokens.amax(1, keepdim=True).transpose(1, 2).expand_as(per_point)
        raw = self.point_mlp(points.transpose(1, 2))
        return self.classifier(torch.cat([per_point, pooled, raw], 1))
