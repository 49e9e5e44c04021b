"""Prithvi masked autoencoder: the encoder of :mod:`backbones.prithvi` plus the official MAE
decoder (same key names), for (continued) pretraining and for gap imputation.

Patches are flattened as in the official model: ``(B, C, T, H, W)`` →
``(B, T'·h·w, s·p·q·C)`` with ``s`` frames per tubelet and ``p × q`` pixels per patch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from workbench.checkpoints import read_state_dict
from backbones.layers import init_linear_weights, sincos_3d
from backbones.prithvi import LocationEncoder, PrithviViT, TemporalEncoder


def as_frames(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, C, 1, H, W)``; ``(B, C, T, H, W)`` as it is."""
    return x if x.ndim == 5 else x.unsqueeze(2)


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B, N, s*p*q*C)`` in the official (t h w)(s p q c) order."""
    b, c, t, h, w = x.shape
    s, p, q = patch
    x = x.reshape(b, c, t // s, s, h // p, p, w // q, q)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (t // s) * (h // p) * (w // q), s * p * q * c)


def unpatchify(patches: Tensor, patch: tuple[int, int, int], channels: int, grid: tuple[int, int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, s*p*q*C)`` → ``(B, C, T, H, W)``."""
    b = patches.shape[0]
    (s, p, q), (t, h, w) = patch, grid
    x = patches.reshape(b, t, h, w, s, p, q, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, channels, t * s, h * p, w * q)


def random_keep(batch: int, tokens: int, mask_ratio: float, device: torch.device,
                generator: torch.Generator | None = None) -> Tensor:
    """Indices ``(B, K)`` of the tokens left visible, ``K = round(N * (1 - mask_ratio))``."""
    keep = max(1, round(tokens * (1 - mask_ratio)))
    noise = torch.rand(batch, tokens, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def keep_from_hidden(hidden: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Visible-token indices ``(B, K)`` from a boolean token mask ``(B, N)`` (True = hidden).

    Samples with more visible tokens than the least-visible sample have random extra tokens
    hidden, so every sample keeps the same ``K`` (the encoder runs on equal-length sequences).
    """
    visible = ~hidden
    keep = max(1, int(visible.sum(1).min()))
    noise = torch.rand(hidden.shape, device=hidden.device, generator=generator) + hidden.float() * 2
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


class MAEDecoder(nn.Module):
    """The official Prithvi MAE decoder: embed the visible tokens, insert mask tokens, add 3-D
    sin-cos positions (and coordinate encodings), transformer blocks, per-patch pixel head."""

    def __init__(self, encoder: PrithviViT, dim: int = 512, depth: int = 8, num_heads: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.patch_size = encoder.patch_size
        self.channels = len(encoder.bands)
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_embed_dec = TemporalEncoder(dim) if encoder.temporal_embed_enc is not None else None
        self.location_embed_dec = LocationEncoder(dim) if encoder.location_embed_enc is not None else None
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(Block(dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_size[0] * self.patch_size[1] * self.patch_size[2] * self.channels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_weights)

    def forward(self, latent: Tensor, keep: Tensor, grid: tuple[int, int, int],
                temporal_coords: Tensor | None = None, location_coords: Tensor | None = None) -> Tensor:
        """``latent`` ``(B, 1 + K, D)``, ``keep`` ``(B, K)`` → pixel predictions ``(B, N, s*p*q*C)``."""
        x = self.decoder_embed(latent)
        b, n = x.shape[0], grid[0] * grid[1] * grid[2]
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()  # x is bfloat16 under autocast
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, self.dim), x[:, 1:])
        full = full + sincos_3d(self.dim, grid).unsqueeze(0).to(x)
        if self.temporal_embed_dec is not None and temporal_coords is not None:
            full = full + self.temporal_embed_dec(temporal_coords.to(x.dtype), grid[1] * grid[2])
        if self.location_embed_dec is not None and location_coords is not None:
            full = full + self.location_embed_dec(location_coords.to(x.dtype))
        out = torch.cat([x[:, :1], full], dim=1)
        for block in self.decoder_blocks:
            out = block(out)
        return self.decoder_pred(self.decoder_norm(out))[:, 1:]


class PrithviMAE(nn.Module):
    """Encoder (``backbone``) + :class:`MAEDecoder`. ``forward`` hides tokens and predicts every
    patch's pixels; :meth:`encoder_state_dict` writes the official ``encoder.*``/``decoder.*``
    layout that :func:`backbones.prithvi.load_pretrained` reads."""

    def __init__(self, backbone: PrithviViT, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = MAEDecoder(backbone, decoder_dim, decoder_depth, decoder_heads)

    def forward(self, image: Tensor, keep: Tensor | None = None, mask_ratio: float = 0.75,
                **coords: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        """``image`` ``(B, C, [T,] H, W)`` → predicted patches ``(B, N, s*p*q*C)``, the kept token
        indices ``(B, K)`` (random with ``mask_ratio`` unless given) and the token grid."""
        tokens, grid = self.backbone.embed(image, **coords)
        if keep is None:
            keep = random_keep(tokens.shape[0], tokens.shape[1], mask_ratio, tokens.device)
        latent = self.backbone.forward_visible(tokens, keep)
        return self.decoder(latent, keep, grid, **coords), keep, grid

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Weights in the official Prithvi MAE layout (``encoder.*``, ``decoder.*``)."""
        return {
            **{f"encoder.{k}": v for k, v in self.backbone.state_dict().items()},
            **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()},
        }

    def load_decoder(self, path: str | Path) -> dict[str, Any]:
        """Load an official checkpoint's ``decoder.*`` keys (position embeddings recomputed)."""
        state = {k[len("decoder."):]: v for k, v in read_state_dict(Path(path)).items() if k.startswith("decoder.")}
        state.pop("decoder_pos_embed", None)
        result = self.decoder.load_state_dict(state, strict=False)
        return {"missing": result.missing_keys, "unexpected": result.unexpected_keys}
