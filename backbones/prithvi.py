"""Prithvi-EO style ViT: 3-D (tubelet) patch embedding, fixed 3-D sin-cos positions, optional
time/location coordinate encodings, multi-level feature maps for dense decoders.

Sizes follow Prithvi-EO-1.0 and 2.0; :func:`load_pretrained` reads the official MAE checkpoint
layouts (``encoder.*`` and the older unprefixed v1 layout).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from backbones.factory import load_checked, register_backbone, strip_prefixes
from workbench.checkpoints import read_state_dict
from backbones.features import (
    GradCheckpointing, adapt_input_channels, block_intermediates, checked_out_indices,
    default_out_indices, forward_blocks, vit_blocks, vit_group_matcher,
)
from backbones.layers import init_linear_weights, sincos_1d, sincos_3d
from datamodules.bands import HLS_BANDS
from workbench.errors import UserInputError

log = logging.getLogger(__name__)

V1_MEAN = (775.2290, 1080.9928, 1228.5855, 2497.2023, 2204.2139, 1610.8325)
V1_STD = (1281.5261, 1270.0298, 1399.4803, 1368.3446, 1291.6764, 1154.5057)
V2_MEAN = (1087.0, 1342.0, 1433.0, 2734.0, 1958.0, 1363.0)
V2_STD = (2248.0, 2179.0, 2178.0, 1850.0, 1242.0, 1049.0)
COORDS = ("time", "location")


# --- time and location encodings ----------------------------------------------------------


class TemporalEncoder(nn.Module):
    """[year, day-of-year] per frame → sin-cos embedding × a learned scale."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.dims = (embed_dim // 2, embed_dim - embed_dim // 2)
        self.scale = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, coords: Tensor, tokens_per_frame: int) -> Tensor:
        """``(B, T, 2)`` → ``(B, T * tokens_per_frame, D)``."""
        b, t, _ = coords.shape
        parts = [sincos_1d(d, coords[..., i].flatten()).reshape(b, t, d) for i, d in enumerate(self.dims)]
        return (self.scale * torch.cat(parts, -1)).repeat_interleave(tokens_per_frame, dim=1)


class LocationEncoder(nn.Module):
    """[latitude, longitude] per sample → sin-cos embedding × a learned scale."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.dims = (embed_dim // 2, embed_dim - embed_dim // 2)
        self.scale = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, coords: Tensor) -> Tensor:
        """``(B, 2)`` → ``(B, 1, D)``."""
        parts = [sincos_1d(d, coords[:, i]) for i, d in enumerate(self.dims)]
        return (self.scale * torch.cat(parts, -1)).unsqueeze(1)


# --- the model -----------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """``(B, C, T, H, W)`` → tokens ``(B, T/t * H/p * W/p, D)`` with a Conv3d tubelet."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PrithviViT(GradCheckpointing, nn.Module):
    """Prithvi-EO encoder returning multi-level feature maps.

    Input ``(B, C, T, H, W)`` or ``(B, C, H, W)`` (one frame), ``C = len(bands)``; H and W any
    multiple of the patch size (position embeddings are recomputed for the token grid).
    :meth:`forward_features` returns the normed tokens ``(B, 1 + N, D)`` (cls first), as timm's
    ViT; :meth:`forward_intermediates` returns, for each block in ``out_indices``, a map
    ``(B, D * T', H/p, W/p)`` with time folded into channels (``T' = T / tubelet``); the last
    block's output goes through the final norm, as in the official encoder.
    """

    num_prefix_tokens = 1  # the cls token; readouts drop the first ``num_prefix_tokens`` tokens

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int | Sequence[int] = (1, 16, 16),
        num_frames: int = 1,
        bands: Sequence[str] = HLS_BANDS,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        coords_encoding: Sequence[str] = (),
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        patch = tuple(patch_size) if isinstance(patch_size, Sequence) else (1, patch_size, patch_size)
        if len(patch) != 3:
            raise UserInputError(f"patch_size must be an int or (t, h, w), got {patch_size}")
        unknown = set(coords_encoding) - set(COORDS)
        if unknown:
            raise UserInputError(f"coords_encoding: unknown {sorted(unknown)}; choose from {COORDS}")
        if num_frames % patch[0]:
            raise UserInputError(f"num_frames {num_frames} is not a multiple of the tubelet {patch[0]}")
        self.bands = list(bands)
        self.img_size = img_size
        self.patch_size = patch
        self.num_frames = num_frames
        self.embed_dim = embed_dim
        self.out_indices = checked_out_indices(out_indices, depth, default_out_indices(depth))
        frames = num_frames // patch[0]
        self.patch_embed = PatchEmbed3D(patch, len(self.bands), embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.temporal_embed_enc = TemporalEncoder(embed_dim) if "time" in coords_encoding else None
        self.location_embed_enc = LocationEncoder(embed_dim) if "location" in coords_encoding else None
        grid = (frames, img_size // patch[1], img_size // patch[2])
        self.register_buffer("pos_embed", sincos_3d(embed_dim, grid).unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, norm, qkv_bias=True)
        self.norm = norm(embed_dim)
        self.feature_info = [
            {"num_chs": embed_dim * frames, "reduction": patch[1], "module": f"blocks.{i}"}
            for i in self.out_indices
        ]
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_weights)

    def _position_embedding(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """``(1, T*h*w, D)`` for the token grid (the cached buffer when it is the default)."""
        if self.pos_embed.shape[1] == math.prod(grid) and grid[1:] == (
            self.img_size // self.patch_size[1],
            self.img_size // self.patch_size[2],
        ):
            return self.pos_embed
        return sincos_3d(self.embed_dim, grid).unsqueeze(0).to(device)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise UserInputError(f"input must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
        _, c, t, h, w = x.shape
        if c != len(self.bands):
            raise UserInputError(
                f"the backbone expects {len(self.bands)} bands {self.bands} but the input has {c} "
                "channels: select those bands in the data config, or set the model bands to match."
            )
        if t != self.num_frames:
            raise UserInputError(
                f"the backbone was built for num_frames={self.num_frames} but the input has {t} "
                "frames: set backbone_kwargs.num_frames to the data's frame count."
            )
        if h % self.patch_size[1] or w % self.patch_size[2]:
            raise UserInputError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size[1:]}: "
                "use a chip/window size that is."
            )
        return x

    def embed(
        self,
        x: Tensor,
        temporal_coords: Tensor | None = None,
        location_coords: Tensor | None = None,
    ) -> tuple[Tensor, tuple[int, int, int]]:
        """``(B, C, [T,] H, W)`` → patch tokens with positions and coordinates ``(B, N, D)`` (no
        cls token) and the token grid ``(T', H/p, W/p)``."""
        x = self._check_input(x)
        _, _, t, h, w = x.shape
        grid = (t // self.patch_size[0], h // self.patch_size[1], w // self.patch_size[2])
        tokens = self.patch_embed(x) + self._position_embedding(grid, x.device)
        if self.temporal_embed_enc is not None and temporal_coords is not None:
            tokens = tokens + self.temporal_embed_enc(temporal_coords.to(x.dtype), grid[1] * grid[2])
        if self.location_embed_enc is not None and location_coords is not None:
            tokens = tokens + self.location_embed_enc(location_coords.to(x.dtype))
        return tokens, grid

    def _tokens(self, x: Tensor, temporal_coords: Tensor | None,
                location_coords: Tensor | None) -> tuple[Tensor, tuple[int, int, int]]:
        """:meth:`embed` with the cls token first: ``(B, 1 + N, D)`` and the token grid."""
        tokens, grid = self.embed(x, temporal_coords, location_coords)
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1), grid

    def forward_features(self, x: Tensor, temporal_coords: Tensor | None = None,
                         location_coords: Tensor | None = None) -> Tensor:
        """``(B, C, [T,] H, W)`` → normed tokens ``(B, 1 + N, D)``."""
        tokens, _ = self._tokens(x, temporal_coords, location_coords)
        return forward_blocks(self.blocks, tokens, self.norm, self.recompute)

    def forward_intermediates(self, x: Tensor, temporal_coords: Tensor | None = None,
                              location_coords: Tensor | None = None) -> list[Tensor]:
        """``(B, C, [T,] H, W)`` → list of ``(B, D*T', H/p, W/p)``, one per ``out_indices``."""
        tokens, grid = self._tokens(x, temporal_coords, location_coords)
        outputs = block_intermediates(self.blocks, tokens, self.out_indices, self.norm, recompute=self.recompute)
        return [self._to_map(out[:, self.num_prefix_tokens:], grid) for out in outputs]

    def forward_visible(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """MAE encoder pass over the kept tokens only: ``tokens`` ``(B, N, D)`` from :meth:`embed`,
        ``keep`` ``(B, K)`` token indices → normed ``(B, 1 + K, D)`` (cls first)."""
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        out = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), visible], dim=1)
        return forward_blocks(self.blocks, out, self.norm, self.recompute)

    @staticmethod
    def _to_map(tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """``(B, T*h*w, D)`` → ``(B, D*T, h, w)``."""
        t, h, w = grid
        b, _, d = tokens.shape
        return tokens.reshape(b, t, h, w, d).permute(0, 4, 1, 2, 3).reshape(b, d * t, h, w)

    def forward(self, x: Tensor, **coords: Tensor) -> Tensor:
        return self.forward_features(x, **coords)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return vit_group_matcher(r"^cls_token|^pos_embed|^patch_embed|^temporal_embed_enc|^location_embed_enc", coarse)


# --- loading official checkpoints ----------------------------------------------------------

DECODER_PREFIXES = ("decoder.", "decoder_", "mask_token")
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def _describe(state: dict[str, Tensor]) -> str:
    """What architecture a checkpoint looks like, from its keys."""
    dim = state.get("cls_token", state.get("norm.weight"))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if dim is None:
        return "it has no Prithvi encoder keys (cls_token, blocks.*)"
    guess = {768: "prithvi_eo_v1_100m / prithvi_eo_v2_100m_tl", 1024: "prithvi_eo_v2_300m(_tl)",
             1280: "prithvi_eo_v2_600m(_tl)", 192: "prithvi_eo_v2_tiny_tl"}.get(dim.shape[-1])
    hint = f" — use {guess}" if guess else ""
    return f"the checkpoint has embed_dim {dim.shape[-1]}, depth {depth}{hint}"


def load_pretrained(model: PrithviViT, path: str | Path) -> dict[str, Any]:
    """Load an official Prithvi checkpoint into ``model``; returns a report of what was done.

    Accepts ``.pt``/``.pth``/``.safetensors`` files in the MAE layout (``encoder.*``), the old
    unprefixed v1 layout, or either wrapped in ``state_dict``/``model``. Decoder keys are dropped;
    ``pos_embed`` is dropped (fixed sin-cos, recomputed for the model's grid); the patch embedding
    is adapted from the checkpoint's :data:`HLS_BANDS` to the model's bands by name. Raises :class:`UserInputError` on missing,
    unexpected or mis-shaped keys.
    """
    path = Path(path)
    state = {k: v for k, v in strip_prefixes(read_state_dict(path), WRAPPER_PREFIXES).items()
             if not k.startswith(DECODER_PREFIXES)}
    report: dict[str, Any] = {"file": str(path), "dropped": [], "new_bands": [], "kept_init": []}
    if state.pop("pos_embed", None) is not None:
        report["dropped"].append("pos_embed (fixed sin-cos, recomputed for the model grid)")
    key = "patch_embed.proj.weight"  # every official Prithvi checkpoint has the six HLS bands
    if key in state and state[key].shape[1] == len(HLS_BANDS):
        state[key], report["new_bands"] = adapt_input_channels(state[key], HLS_BANDS, model.bands)
    own = model.state_dict()
    for name in ("temporal_embed_enc.scale", "location_embed_enc.scale"):
        if name in state and name not in own:
            state.pop(name)
            report["dropped"].append(f"{name} (model built without that coordinate encoding)")
        elif name in own and name not in state:
            state[name] = own[name]
            report["kept_init"].append(name)
    hint = f"{_describe(state)}. Pick the backbone size the checkpoint was trained with."
    report["loaded"] = load_checked(model, state, path, hint, allow_unexpected=False)["loaded"]
    log.info(
        "loaded %d tensors from %s; dropped: %s; new bands (zero-initialised): %s; kept init: %s",
        report["loaded"], path, report["dropped"] or "none", report["new_bands"] or "none",
        report["kept_init"] or "none",
    )
    return report


# --- named sizes ---------------------------------------------------------------------------


def _cfg(hub_id: str, filename: str, mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> dict:
    return {
        "hf_hub_id": hub_id,
        "hf_hub_filename": filename,
        "mean": mean,
        "std": std,
        "input_size": (len(HLS_BANDS), 224, 224),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "prithvi_eo_v1_100m": _cfg("ibm-nasa-geospatial/Prithvi-EO-1.0-100M", "Prithvi_EO_V1_100M.pt", V1_MEAN, V1_STD),
        "prithvi_eo_v2_tiny_tl": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-tiny-TL", "Prithvi_EO_V2_tiny_TL.pt", V2_MEAN, V2_STD),
        "prithvi_eo_v2_100m_tl": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-100M-TL", "Prithvi_EO_V2_100M_TL.pt", V2_MEAN, V2_STD),
        "prithvi_eo_v2_300m": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-300M", "Prithvi_EO_V2_300M.pt", V2_MEAN, V2_STD),
        "prithvi_eo_v2_300m_tl": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL", "Prithvi_EO_V2_300M_TL.pt", V2_MEAN, V2_STD),
        "prithvi_eo_v2_600m": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-600M", "Prithvi_EO_V2_600M.pt", V2_MEAN, V2_STD),
        "prithvi_eo_v2_600m_tl": _cfg("ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL", "Prithvi_EO_V2_600M_TL.pt", V2_MEAN, V2_STD),
    }
)


_TL = ("time", "location")
_SIZES: dict[str, dict[str, Any]] = {
    "prithvi_eo_v1_100m": {"num_frames": 3, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "prithvi_eo_v2_tiny_tl": {"num_frames": 1, "embed_dim": 192, "depth": 12, "num_heads": 3, "coords_encoding": _TL},
    "prithvi_eo_v2_100m_tl": {"num_frames": 4, "embed_dim": 768, "depth": 12, "num_heads": 12, "coords_encoding": _TL},
    "prithvi_eo_v2_300m": {"num_frames": 4, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "prithvi_eo_v2_300m_tl": {"num_frames": 4, "embed_dim": 1024, "depth": 24, "num_heads": 16, "coords_encoding": _TL},
    "prithvi_eo_v2_600m": {"num_frames": 4, "embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": (1, 14, 14)},
    "prithvi_eo_v2_600m_tl": {"num_frames": 4, "embed_dim": 1280, "depth": 32, "num_heads": 16,
                              "patch_size": (1, 14, 14), "coords_encoding": _TL},
}
for _variant, _arch in _SIZES.items():
    register_backbone(PrithviViT, _variant, load_pretrained, f"{_variant}: {_arch}", known_bands=HLS_BANDS, **_arch)
