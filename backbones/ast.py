"""AST: Audio Spectrogram Transformer — a ViT over a log-mel spectrogram with overlapping patches.

Input ``(B, 1, F, T)``: ``F`` mel bins by ``T`` frames (``datamodules.audio`` makes them). 16×16
patches are taken every ``fstride`` bins and ``tstride`` frames (10 and 10 in AST, so patches
overlap by 6), prefixed with a class and a distillation token (AST starts from DeiT), and run
through ViT blocks. Feature maps are ``(B, D, f, t)``, ``f = (F - 16) // fstride + 1``.

Weights load from a local checkpoint of the official AST repository (``audio_model.state_dict()``
of ``ASTModel``: ``module.v.*`` for the ViT, ``module.mlp_head.*`` for AudioSet's head, which is
dropped); position embeddings are resampled to the model's spectrogram size.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from backbones.factory import load_checked, register_backbone, strip_prefixes
from workbench.checkpoints import read_state_dict
from backbones.features import (
    GradCheckpointing, block_intermediates, checked_out_indices, default_out_indices, forward_blocks, vit_blocks,
    vit_group_matcher,
)
from backbones.layers import init_linear_weights
from workbench.errors import UserInputError

AUDIOSET_MELS = 128  # the official checkpoints' spectrogram height
PREFIX_TOKENS = 2  # class and distillation tokens


def patch_grid(n_mels: int, num_frames: int, patch_size: int, fstride: int, tstride: int) -> tuple[int, int]:
    """Patches along frequency and time: ``((F - p) // fs + 1, (T - p) // ts + 1)``."""
    return (n_mels - patch_size) // fstride + 1, (num_frames - patch_size) // tstride + 1


class AudioSpectrogramTransformer(GradCheckpointing, nn.Module):
    """AST encoder; see the module docstring. :meth:`forward_features` returns the normed tokens
    ``(B, 2 + N, D)`` (cls and distillation tokens first); :meth:`forward_intermediates` one
    ``(B, D, f, t)`` map per ``out_indices`` (the last block's after the final norm)."""

    num_prefix_tokens = PREFIX_TOKENS

    def __init__(
        self,
        n_mels: int = 128,
        num_frames: int = 1024,
        patch_size: int = 16,
        fstride: int = 10,
        tstride: int = 10,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        """``n_mels`` × ``num_frames``: the spectrogram size the position embeddings are made for
        (other sizes are resampled on the fly)."""
        super().__init__()
        if min(n_mels, num_frames) < patch_size:
            raise UserInputError(f"AST spectrogram {n_mels}x{num_frames} is smaller than one {patch_size}px patch")
        self.patch_size, self.strides = patch_size, (fstride, tstride)
        self.grid = patch_grid(n_mels, num_frames, patch_size, fstride, tstride)
        self.embed_dim = embed_dim
        self.out_indices = checked_out_indices(out_indices, depth, default_out_indices(depth))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=(fstride, tstride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + PREFIX_TOKENS, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, norm, qkv_bias=True)
        self.norm = norm(embed_dim)
        self.feature_info = [{"num_chs": embed_dim, "reduction": fstride, "module": f"blocks.{i}"}
                             for i in self.out_indices]
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_linear_weights)

    def _position_embedding(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid), num_prefix_tokens=PREFIX_TOKENS)

    def _tokens(self, spectrogram: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 1, F, T)`` → tokens with positions ``(B, 2 + f*t, D)`` and the patch grid ``(f, t)``."""
        if spectrogram.ndim != 4 or spectrogram.shape[1] != self.patch_embed.proj.in_channels:
            raise UserInputError(
                f"AST takes spectrograms (batch, {self.patch_embed.proj.in_channels}, mels, frames); "
                f"got shape {tuple(spectrogram.shape)}"
            )
        x = self.patch_embed.proj(spectrogram)
        b, _, f, t = x.shape
        prefix = torch.cat([self.cls_token, self.dist_token], 1).expand(b, -1, -1)
        return torch.cat([prefix, x.flatten(2).transpose(1, 2)], 1) + self._position_embedding((f, t)), (f, t)

    def forward_features(self, spectrogram: Tensor) -> Tensor:
        """``(B, 1, F, T)`` → normed tokens ``(B, 2 + N, D)``."""
        return forward_blocks(self.blocks, self._tokens(spectrogram)[0], self.norm, self.recompute)

    def forward_intermediates(self, spectrogram: Tensor) -> list[Tensor]:
        """``(B, 1, F, T)`` → list of ``(B, D, f, t)``, one per ``out_indices``."""
        tokens, (f, t) = self._tokens(spectrogram)
        outputs = block_intermediates(self.blocks, tokens, self.out_indices, self.norm, recompute=self.recompute)
        return [out[:, self.num_prefix_tokens:].transpose(1, 2).reshape(len(out), -1, f, t) for out in outputs]

    def forward(self, spectrogram: Tensor) -> Tensor:
        return self.forward_features(spectrogram)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return vit_group_matcher(r"^cls_token|^dist_token|^pos_embed|^patch_embed", coarse)


def load_ast(model: AudioSpectrogramTransformer, path: str | Path) -> dict[str, Any]:
    """Load an official AST checkpoint (``module.v.*`` keys) into ``model``.

    The AudioSet head (``mlp_head``) and DeiT's heads are dropped; the position embedding is
    resampled from the checkpoint's 128-mel grid to the model's. Returns a report.
    """
    official = strip_prefixes(read_state_dict(Path(path)), ("module.",))
    vit = {k[2:]: v for k, v in official.items() if k.startswith("v.") and not k.startswith("v.head")}  # DeiT heads
    if "pos_embed" not in vit:
        raise UserInputError(f"{path} is not in the official AST layout (no module.v.pos_embed key)")
    pos = vit["pos_embed"]
    f0 = (AUDIOSET_MELS - model.patch_size) // model.strides[0] + 1
    patches = pos.shape[1] - PREFIX_TOKENS
    if patches % f0:
        raise UserInputError(f"{path}: pos_embed has {patches} patches, not a {f0}-row grid of a 128-mel AST")
    if (f0, patches // f0) != model.grid:
        vit["pos_embed"] = resample_abs_pos_embed(pos, list(model.grid), [f0, patches // f0],
                                                  num_prefix_tokens=PREFIX_TOKENS)
    return load_checked(model, vit, path, "check embed_dim, depth, patch_size and the strides in backbone_kwargs")


default_cfgs = generate_default_cfgs({
    name: {"input_size": (1, AUDIOSET_MELS, 1024), "num_classes": 0, "first_conv": "patch_embed.proj",
           "origin_url": "https://github.com/YuanGongND/ast",
           "paper_name": "AST: Audio Spectrogram Transformer (Gong, Chung, Glass, Interspeech 2021)"}
    for name in ("ast_base", "ast_tiny")
})
register_backbone(AudioSpectrogramTransformer, "ast_base", load_ast,
                  "AST as published: ViT-B/16 (DeiT-base), strides 10×10, 128 mels × 1024 frames.",
                  embed_dim=768, depth=12, num_heads=12)
register_backbone(AudioSpectrogramTransformer, "ast_tiny", load_ast,
                  "A small AST for tests and CPU demos: D 192, 4 blocks, 3 heads.", embed_dim=192, depth=4, num_heads=3)
