"""Shared maths of the model files: fixed sin-cos embeddings, weight init, point-cloud sampling
and neighbourhoods, per-series (RevIN) normalisation. Model files import these, never each other."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos embedding of positions ``(N,)`` → ``(N, dim)`` (sines first, then cosines)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega.to(positions.device).reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> Tensor:
    """3-D sin-cos position embedding for a ``(T, H, W)`` token grid → ``(T*H*W, dim)``.

    W and H each take 6/16 of ``dim``, time 4/16, concatenated as (w, h, t) with tokens ordered
    time-major, then rows, then columns — the layout of the official Prithvi MAE.
    """
    if dim % 16:
        raise UserInputError(f"embed_dim must be a multiple of 16 for 3-D sin-cos, got {dim}")
    t, h, w = grid
    emb_w = sincos_1d(dim // 16 * 6, torch.arange(w)).repeat(t * h, 1)
    emb_h = sincos_1d(dim // 16 * 6, torch.arange(h)).repeat_interleave(w, 0).repeat(t, 1)
    emb_t = sincos_1d(dim // 16 * 4, torch.arange(t)).repeat_interleave(h * w, 0)
    return torch.cat([emb_w, emb_h, emb_t], dim=1)


def init_linear_weights(module: nn.Module) -> None:
    """Xavier-uniform Linear and Conv3d (patch embedding) weights, zero biases: the official
    MAE initialisation (use with ``model.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))


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


def instance_normalize(series: Tensor, observed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RevIN-style: each channel of each series ``(B, M, L)`` standardized by its own mean and std
    over the ``observed`` steps (all when None); returns the normalized series, mean and std
    ``(B, M, 1)`` to undo it."""
    weight = torch.ones_like(series) if observed is None else observed.to(series.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (series * weight).sum(-1, keepdim=True) / count
    std = (((series - mean) * weight).square().sum(-1, keepdim=True) / count + 1e-5).sqrt()
    return (series - mean) / std * weight, mean, std
