"""Prithvi WxC (NASA/IBM weather and climate foundation model) in the official key layout.

Inputs are MERRA-2 fields on a lat/lon grid: ``T`` input times of ``C`` variables, static fields,
the input time and the forecast lead time. The grid is cut into patches (tokens) and the patches
into mask units: tokens ``(B, G, L, D)`` with ``G`` mask units of ``L`` tokens each. Every
encoder/decoder stage alternates attention *within* a mask unit (local, over ``L``) and *across*
mask units (global, over ``G``): ``2 n + 1`` transformer layers, local first and last, with an
optional SWIN-style roll of the token grid by half a mask unit after each global layer. The
decoder fills masked units with a learned token, a linear layer unembeds each token to its
``C × p × p`` pixels, and the result is a scaled correction of a residual target (the
climatology, the latest input, or the input mean).

Every parameter and buffer carries the name of the official state dict, so
:func:`load_prithvi_wxc` only unwraps the file (``model_state``) and drops the decoder's SWIN
attention masks, which the official attention never applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import checkpoint, generate_default_cfgs
from torch import Tensor, nn

from backbones.factory import load_checked, register_backbone, strip_prefixes
from backbones.features import GradCheckpointing
from workbench.checkpoints import read_state_dict
from workbench.errors import UserInputError

MERRA2_SURFACE = ("EFLUX", "GWETROOT", "HFLUX", "LAI", "LWGAB", "LWGEM", "LWTUP", "PS", "QV2M", "SLP", "SWGNT",
                  "SWTNT", "T2M", "TQI", "TQL", "TQV", "TS", "U10M", "V10M", "Z0M")
MERRA2_VERTICAL = ("CLOUD", "H", "OMEGA", "PL", "QI", "QL", "QV", "T", "U", "V")
MERRA2_LEVELS = (34.0, 39.0, 41.0, 43.0, 44.0, 45.0, 48.0, 51.0, 53.0, 56.0, 63.0, 68.0, 71.0, 72.0)
WXC_VARIABLES = MERRA2_SURFACE + tuple(f"{v}_level_{lev}" for v in MERRA2_VERTICAL for lev in MERRA2_LEVELS)
"""The 160 input/output channels of Prithvi WxC 2.3B, in order (surface, then variable × level)."""

FOURIER_UNSCALED = 3  # fourier mode: static scalers carry 3 leading entries the model skips (official layout)


# --- token layout --------------------------------------------------------------------------


def grid_to_tokens(x: Tensor, global_shape: tuple[int, int], local_shape: tuple[int, int]) -> Tensor:
    """``(B, D, Gh*Lh, Gw*Lw)`` token grid → ``(B, Gh*Gw, Lh*Lw, D)`` (mask units, tokens in a unit)."""
    b, d = x.shape[:2]
    x = x.reshape(b, d, global_shape[0], local_shape[0], global_shape[1], local_shape[1])
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, math.prod(global_shape), math.prod(local_shape), d)


def tokens_to_grid(x: Tensor, global_shape: tuple[int, int], local_shape: tuple[int, int]) -> Tensor:
    """``(B, Gh*Gw, Lh*Lw, D)`` → ``(B, D, Gh*Lh, Gw*Lw)``, the inverse of :func:`grid_to_tokens`."""
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, *global_shape, *local_shape, d).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, d, global_shape[0] * local_shape[0], global_shape[1] * local_shape[1])


def take(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens`` ``(B, G, L, D)`` at ``index`` ``(B, n)`` (mask units) or ``(B, G, n)`` (tokens of each unit)."""
    dim = index.ndim - 1
    shape = (*index.shape, *tokens.shape[index.ndim:])
    return tokens.gather(dim, index.reshape(*index.shape, *[1] * (tokens.ndim - index.ndim)).expand(shape))


# --- layers --------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis: ``(..., S, D)`` → ``(..., S, D)``.
    ``qkv_layer`` is fused per head: its output is ``H`` blocks of ``[q_h | k_h | v_h]``."""

    def __init__(self, features: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if features % n_heads:
            raise UserInputError(f"embed_dim {features} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv_layer = nn.Linear(features, 3 * features, bias=False)
        self.w_layer = nn.Linear(features, features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        *passengers, s, d = x.shape
        qkv = self.qkv_layer(x.reshape(-1, s, d)).reshape(-1, s, self.n_heads, 3 * d // self.n_heads)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # (B*, H, S, D/H) each
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.w_layer(out.transpose(1, 2).reshape(-1, s, d)).reshape(*passengers, s, d)


class Mlp(nn.Module):
    """``(..., D)`` → ``(..., D)`` through ``D * mlp_multiplier`` GELU units (official ``net`` keys)."""

    def __init__(self, features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, features), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer over ``(..., S, D)``: ``attention`` = (LayerNorm, attention),
    ``ff`` = (LayerNorm, MLP), each a residual branch with drop-path."""

    def __init__(self, features: int, mlp_multiplier: float, n_heads: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.LayerNorm(features), SelfAttention(features, n_heads, dropout))
        self.ff = nn.Sequential(nn.LayerNorm(features), Mlp(features, int(features * mlp_multiplier), dropout))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attention(x))
        return x + self.drop_path(self.ff(x))


class LocalGlobalBlock(nn.Module):
    """``2 n_blocks + 1`` transformer layers over tokens ``(B, G, L, D)``: local (over ``L``),
    global (over ``G``), local, ... With ``shift`` (tokens, lat/lon), the token grid is rolled by
    ``+shift`` after the 1st, 3rd, ... global layer and back by ``-shift`` after the 2nd, 4th, ...
    (SWIN-style; an odd ``n_blocks`` leaves the output rolled, as the official model does)."""

    def __init__(self, features: int, mlp_multiplier: float, n_heads: int, dropout: float, drop_path: float,
                 n_blocks: int, global_shape: tuple[int, int], local_shape: tuple[int, int],
                 shift: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.transformers = nn.ModuleList(
            TransformerLayer(features, mlp_multiplier, n_heads, dropout, drop_path) for _ in range(2 * n_blocks + 1)
        )
        self.global_shape, self.local_shape, self.shift = global_shape, local_shape, shift

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers (the official ``transformers``), for per-block strategies."""
        return self.transformers

    def _roll(self, x: Tensor, sign: int) -> Tensor:
        """Roll tokens ``(B, L, G, D)`` (global layout) on the lat/lon token grid by ``sign * shift``."""
        if x.shape[1:3] != (math.prod(self.local_shape), math.prod(self.global_shape)):
            raise UserInputError("SWIN shifting needs every mask unit and token: set mask_ratio_inputs to 0 "
                                 "or turn encoder_shifting off")
        grid = tokens_to_grid(x.transpose(1, 2), self.global_shape, self.local_shape)
        grid = grid.roll((sign * self.shift[0], sign * self.shift[1]), dims=(-2, -1))
        return grid_to_tokens(grid, self.global_shape, self.local_shape).transpose(1, 2)

    def forward(self, x: Tensor, recompute: bool = False) -> Tensor:
        """``(B, G, L, D)`` → ``(B, G, L, D)``; ``recompute``: each layer through timm's ``checkpoint``."""
        for i, layer in enumerate(self.transformers):
            if i:
                x = x.transpose(1, 2)  # odd i: (B, L, G, D), attention across units; even: back
            x = checkpoint(layer, x) if recompute else layer(x)
            if i % 2 and self.shift is not None:
                x = self._roll(x, 1 if i % 4 == 1 else -1)
        return x


class EncoderDecoder(nn.Module):
    """One stage (encoder or decoder): its :class:`LocalGlobalBlock` under the official ``lgl_block``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.lgl_block = LocalGlobalBlock(**kwargs)

    def forward(self, x: Tensor, recompute: bool = False) -> Tensor:
        return self.lgl_block(x, recompute)


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` → ``(B, D, H/p, W/p)`` with a strided Conv2d (official ``proj``)."""

    def __init__(self, patch_size: tuple[int, int], channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


# --- the model -----------------------------------------------------------------------------


def _scaler(value: Tensor | Sequence[float] | None, size: int, fill: float, name: str) -> Tensor:
    """A ``(size,)`` float tensor: ``value``, or ``fill`` repeated (identity scaling)."""
    if value is None:
        return torch.full((size,), fill)
    tensor = torch.as_tensor(value, dtype=torch.float32).flatten()
    if tensor.numel() != size:
        raise UserInputError(f"{name} has {tensor.numel()} values, the model needs {size}")
    return tensor


class PrithviWxC(GradCheckpointing, nn.Module):
    """Prithvi WxC encoder-decoder (Hiera-style masking, MaxViT-style local/global attention).

    ``forward(batch)`` takes the official batch dict:

    - ``x`` ``(B, T, C, H, W)``: ``T = input_size_time`` input times of ``C = in_channels`` variables
      on the ``H × W = n_lats_px × n_lons_px`` grid (unscaled: the model applies the input scalers);
    - ``static`` ``(B, C_s, H, W)``: ``C_s = in_channels_static``, plus 2 leading channels
      (latitude, longitude in radians) with ``positional_encoding="fourier"``;
    - ``input_time``, ``lead_time`` ``(B,)`` (hours);
    - ``climate`` ``(B, C, H, W)`` with ``residual="climate"``.

    and returns the prediction ``(B, C, H, W)`` = ``output_scalers`` × network output + residual
    target (``climate``; the last input time for ``lead_time > 0`` else the first, for
    ``temporal``; the input mean for ``none``). With ``mask_ratio_inputs > 0`` a random share of
    mask units (``masking_mode="global"``) or of tokens within every unit (``"local"``;
    ``"both"`` alternates on :meth:`swap_masking`) is dropped before the encoder — only in
    training; otherwise tokens keep their grid order (the official ``masked_inference``).
    """

    def __init__(
        self,
        in_channels: int = 160,
        input_size_time: int = 2,
        in_channels_static: int = 8,
        input_scalers_mu: Tensor | Sequence[float] | None = None,
        input_scalers_sigma: Tensor | Sequence[float] | None = None,
        input_scalers_epsilon: float = 0.0,
        static_input_scalers_mu: Tensor | Sequence[float] | None = None,
        static_input_scalers_sigma: Tensor | Sequence[float] | None = None,
        static_input_scalers_epsilon: float = 0.0,
        output_scalers: Tensor | Sequence[float] | None = None,
        n_lats_px: int = 360,
        n_lons_px: int = 576,
        patch_size_px: Sequence[int] = (2, 2),
        mask_unit_size_px: Sequence[int] = (30, 32),
        mask_ratio_inputs: float = 0.0,
        mask_ratio_targets: float = 0.0,
        embed_dim: int = 2560,
        n_blocks_encoder: int = 12,
        n_blocks_decoder: int = 2,
        mlp_multiplier: float = 4,
        n_heads: int = 16,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        parameter_dropout: float = 0.0,
        residual: str = "climate",
        masking_mode: str = "global",
        positional_encoding: str = "fourier",
        encoder_shifting: bool = False,
        decoder_shifting: bool = False,
        bands: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if bands is not None:
            in_channels = len(bands)
        self.bands = list(bands) if bands is not None else [
            *WXC_VARIABLES, *(f"BAND_{i + 1}" for i in range(len(WXC_VARIABLES), in_channels))][:in_channels]
        patch, unit = tuple(patch_size_px), tuple(mask_unit_size_px)
        self._check_config(n_lats_px, n_lons_px, patch, unit, embed_dim, n_blocks_decoder, mask_ratio_targets,
                           residual, masking_mode, positional_encoding, encoder_shifting, mask_ratio_inputs)
        self.in_channels, self.input_size_time = in_channels, input_size_time
        self.in_channels_static = in_channels_static
        self.n_lats_px, self.n_lons_px, self.patch_size_px, self.mask_unit_size_px = n_lats_px, n_lons_px, patch, unit
        self.mask_ratio_inputs, self.embed_dim = mask_ratio_inputs, embed_dim
        self.residual, self.masking_mode, self.positional_encoding = residual, masking_mode.lower(), positional_encoding
        self._mask_local = self.masking_mode != "global"  # "both" starts local, as official
        self.local_shape_mu = (unit[0] // patch[0], unit[1] // patch[1])
        self.global_shape_mu = (n_lats_px // unit[0], n_lons_px // unit[1])

        n_static = in_channels_static + (FOURIER_UNSCALED if positional_encoding == "fourier" else 0)
        self.input_scalers_epsilon = input_scalers_epsilon
        self.static_input_scalers_epsilon = static_input_scalers_epsilon
        self.register_buffer("input_scalers_mu", _scaler(input_scalers_mu, in_channels, 0.0, "input_scalers_mu")
                             .reshape(1, 1, -1, 1, 1))
        self.register_buffer("input_scalers_sigma", _scaler(input_scalers_sigma, in_channels, 1.0,
                                                            "input_scalers_sigma").reshape(1, 1, -1, 1, 1))
        self.register_buffer("static_input_scalers_mu", _scaler(static_input_scalers_mu, n_static, 0.0,
                                                                "static_input_scalers_mu").reshape(1, -1, 1, 1))
        self.register_buffer("static_input_scalers_sigma", _scaler(static_input_scalers_sigma, n_static, 1.0,
                                                                   "static_input_scalers_sigma").reshape(1, -1, 1, 1))
        self.register_buffer("output_scalers", _scaler(output_scalers, in_channels, 1.0, "output_scalers")
                             .reshape(1, -1, 1, 1))

        self.parameter_dropout = nn.Dropout2d(parameter_dropout)
        self.patch_embedding = PatchEmbed(patch, in_channels * input_size_time, embed_dim)
        static_channels = in_channels_static + (in_channels if residual == "climate" else 0)
        self.patch_embedding_static = PatchEmbed(patch, static_channels, embed_dim)
        self.input_time_embedding = nn.Linear(1, embed_dim // 4)
        self.lead_time_embedding = nn.Linear(1, embed_dim // 4)
        self.mask_token = nn.Parameter(torch.randn(1, 1, 1, embed_dim))

        shift = tuple(int(0.5 * u / p) for u, p in zip(unit, patch))
        stage = {"features": embed_dim, "mlp_multiplier": mlp_multiplier, "n_heads": n_heads, "dropout": dropout,
                 "global_shape": self.global_shape_mu, "local_shape": self.local_shape_mu}
        self.encoder = EncoderDecoder(**stage, n_blocks=n_blocks_encoder, drop_path=drop_path,
                                      shift=shift if encoder_shifting else None)
        self.decoder = EncoderDecoder(**stage, n_blocks=n_blocks_decoder, drop_path=0.0,
                                      shift=shift if decoder_shifting else None)
        self.unembed = nn.Linear(embed_dim, in_channels * patch[0] * patch[1])
        self.feature_info = [{"num_chs": embed_dim, "reduction": patch[0], "module": name}
                             for name in ("encoder", "decoder")]

    @staticmethod
    def _check_config(n_lats: int, n_lons: int, patch: tuple[int, ...], unit: tuple[int, ...], embed_dim: int,
                      n_blocks_decoder: int, mask_ratio_targets: float, residual: str, masking_mode: str,
                      positional_encoding: str, encoder_shifting: bool, mask_ratio_inputs: float) -> None:
        problems = [
            (n_lats % unit[0] or n_lons % unit[1], f"grid {n_lats}x{n_lons} is not a multiple of {unit=}"),
            (unit[0] % patch[0] or unit[1] % patch[1], f"mask unit {unit} is not a multiple of {patch=}"),
            (patch[0] != patch[1], f"patch_size_px {patch} must be square (pixel-shuffle unembedding)"),
            (embed_dim % 4, f"embed_dim {embed_dim} must be a multiple of 4 (time and position encodings)"),
            (n_blocks_decoder < 1, "n_blocks_decoder must be at least 1 (the decoder makes the output)"),
            (mask_ratio_targets > 0, "mask_ratio_targets > 0 is not implemented (as in the official model)"),
            (residual not in ("climate", "temporal", "none"), f"residual {residual!r}: use climate, temporal or none"),
            (masking_mode.lower() not in ("local", "global", "both"),
             f"masking_mode {masking_mode!r}: use local, global or both"),
            (positional_encoding not in ("fourier", "absolute"),
             f"positional_encoding {positional_encoding!r}: use fourier or absolute"),
            (encoder_shifting and mask_ratio_inputs > 0,
             "encoder_shifting needs unmasked inputs: set mask_ratio_inputs to 0"),
        ]
        for bad, message in problems:
            if bad:
                raise UserInputError(f"Prithvi WxC: {message}")

    # --- embedding -------------------------------------------------------------------------

    def _check_batch(self, batch: dict[str, Tensor]) -> None:
        grid = (self.n_lats_px, self.n_lons_px)
        static = self.in_channels_static + (2 if self.positional_encoding == "fourier" else 0)
        expected = {"x": (self.input_size_time, self.in_channels, *grid), "static": (static, *grid)}
        if self.residual == "climate":
            expected["climate"] = (self.in_channels, *grid)
        for key, shape in expected.items():
            if key not in batch or tuple(batch[key].shape[1:]) != shape:
                got = tuple(batch[key].shape) if key in batch else "nothing"
                raise UserInputError(f"Prithvi WxC batch[{key!r}] must be (B, {', '.join(map(str, shape))}), got {got}")
        for key in ("input_time", "lead_time"):
            if key not in batch:
                raise UserInputError(f"Prithvi WxC batch needs {key!r} (B,) in hours")

    def fourier_pos_encoding(self, static: Tensor) -> Tensor:
        """Latitude, longitude (channels 0, 1 of ``static``, radians) averaged per patch, at
        frequencies 1..D/4: ``(B, D, H/p, W/p)`` = [sin lat, sin lon, cos lat, cos lon]."""
        lat, lon = (F.avg_pool2d(static[:, [i]], self.patch_size_px, self.patch_size_px) for i in (0, 1))
        modes = torch.arange(1, self.embed_dim // 4 + 1, device=static.device, dtype=static.dtype).view(1, -1, 1, 1)
        return torch.cat([(lat * modes).sin(), (lon * modes).sin(), (lat * modes).cos(), (lon * modes).cos()], 1)

    def time_encoding(self, input_time: Tensor, lead_time: Tensor) -> Tensor:
        """``(B,)`` times → ``(B, 1, 1, D)`` = [cos t_in, cos t_lead, sin t_in, sin t_lead] of learned projections."""
        dtype = self.mask_token.dtype  # the parameters' dtype (the embeddings may be wrapped by a strategy)
        t_in = self.input_time_embedding(input_time.to(dtype).view(-1, 1, 1, 1))
        t_lead = self.lead_time_embedding(lead_time.to(dtype).view(-1, 1, 1, 1))
        return torch.cat([t_in.cos(), t_lead.cos(), t_in.sin(), t_lead.sin()], dim=-1)

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Tokens ``(B, G, L, D)`` (inputs + static + time) and the static tokens ``(B, G, L, D)``
        (static fields, climatology and positions) that mask tokens are placed with."""
        self._check_batch(batch)
        x = (batch["x"] - self.input_scalers_mu) / (self.input_scalers_sigma + self.input_scalers_epsilon)
        x = self.patch_embedding(self.parameter_dropout(x.flatten(1, 2)))  # time-major (T*C) channels
        static = batch["static"]
        mu, sigma = self.static_input_scalers_mu, self.static_input_scalers_sigma
        if self.positional_encoding == "fourier":
            static, mu, sigma = static[:, 2:], mu[:, FOURIER_UNSCALED:], sigma[:, FOURIER_UNSCALED:]
        static = (static - mu) / (sigma + self.static_input_scalers_epsilon)
        if self.residual == "climate":
            climate = (batch["climate"] - self.input_scalers_mu[:, 0]) / (
                self.input_scalers_sigma[:, 0] + self.input_scalers_epsilon)
            static = torch.cat([static, climate], dim=1)
        static = self.patch_embedding_static(static)
        if self.positional_encoding == "fourier":
            static = static + self.fourier_pos_encoding(batch["static"])
        x, static = (grid_to_tokens(t, self.global_shape_mu, self.local_shape_mu) for t in (x, static))
        return x + static + self.time_encoding(batch["input_time"], batch["lead_time"]), static

    def residual_target(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B, C, H, W)`` that the scaled network output is added to."""
        if self.residual == "climate":
            return batch["climate"]
        if self.residual == "temporal":
            x = batch["x"]
            last = torch.where(batch["lead_time"] > 0, x.shape[1] - 1, 0)
            return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]
        return self.input_scalers_mu[:, 0]

    # --- masking ---------------------------------------------------------------------------

    def swap_masking(self) -> None:
        """``masking_mode="both"``: switch between local and global masking (call per step)."""
        if self.masking_mode == "both":
            self._mask_local = not self._mask_local

    def mask_indices(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Random (masked, kept) indices: ``(B, n)`` mask units (global) or ``(B, G, n)`` tokens
        of every unit (local), ``int(mask_ratio_inputs * count)`` of them masked."""
        shape = (batch_size, math.prod(self.global_shape_mu))
        if self._mask_local:
            shape = (*shape, math.prod(self.local_shape_mu))
        order = torch.rand(shape, device=device).argsort(dim=-1)
        n = int(self.mask_ratio_inputs * shape[-1])
        return order[..., :n], order[..., n:]

    def _masking(self) -> bool:
        return self.training and self.mask_ratio_inputs > 0

    # --- forward ---------------------------------------------------------------------------

    def forward_features(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder output tokens ``(B, G, L, D)`` (``G`` or ``L`` reduced to the kept share when
        masking in training)."""
        tokens, _ = self.embed(batch)
        if self._masking():
            tokens = take(tokens, self.mask_indices(tokens.shape[0], tokens.device)[1])
        return self.encoder(tokens, self.recompute)

    def _decode(self, decoded: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Decoder tokens ``(B, G, L, D)`` → prediction ``(B, C, H, W)``."""
        pixels = tokens_to_grid(self.unembed(decoded), self.global_shape_mu, self.local_shape_mu)
        return self.output_scalers * F.pixel_shuffle(pixels, self.patch_size_px[0]) + self.residual_target(batch)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Official batch dict (see the class docstring) → prediction ``(B, C, H, W)``."""
        tokens, static = self.embed(batch)
        if not self._masking():
            return self._decode(self.decoder(self.encoder(tokens, self.recompute), self.recompute), batch)
        masked, kept = self.mask_indices(tokens.shape[0], tokens.device)
        encoded = self.encoder(take(tokens, kept), self.recompute)
        filled = torch.cat([take(self.mask_token + static, masked), encoded], dim=masked.ndim - 1)
        order = torch.cat([masked, kept], dim=-1).argsort(dim=-1)  # back to grid order
        return self._decode(self.decoder(take(filled, order), self.recompute), batch)

    def forward_intermediates(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """Encoder and decoder outputs as maps ``(B, D, H/p, W/p)`` (never masked)."""
        tokens, _ = self.embed(batch)
        encoded = self.encoder(tokens, self.recompute)
        decoded = self.decoder(encoded, self.recompute)
        return [tokens_to_grid(t, self.global_shape_mu, self.local_shape_mu) for t in (encoded, decoded)]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups: embeddings, each encoder layer, then each decoder layer (``unembed``
        with the last); ``coarse``: one group per stage."""
        stem = r"^(?:patch_embedding|patch_embedding_static|input_time_embedding|lead_time_embedding|mask_token)"
        if coarse:
            return {"stem": stem, "blocks": r"^encoder\.", "decoder": r"^(?:decoder\.|unembed)"}
        return {"stem": stem, "blocks": r"^encoder\.lgl_block\.transformers\.(\d+)",
                "decoder": [(r"^decoder\.lgl_block\.transformers\.(\d+)", None), (r"^unembed", (99999,))]}


# --- loading the official checkpoint -------------------------------------------------------

UNUSED = (".local_mask", ".global_mask")  # decoder SWIN attention masks: never applied by the official attention


def load_prithvi_wxc(model: PrithviWxC, path: str | Path) -> dict[str, Any]:
    """Load an official Prithvi WxC file (``prithvi.wxc.2300m.v1.pt``: ``{"model_state": state_dict}``,
    or a plain/wrapped state dict) into ``model``; the SWIN attention-mask buffers are dropped.
    Missing, unexpected or mis-shaped keys raise one :class:`UserInputError`."""
    state = read_state_dict(path, "Prithvi WxC checkpoint")
    state = {k: v for k, v in strip_prefixes(state, ("module.", "model.", "_orig_mod.", "backbone.")).items()
             if not k.endswith(UNUSED)}
    found = state.get("patch_embedding.proj.weight")
    layers = {pre: len({k.split(".")[3] for k in state if k.startswith(f"{pre}.lgl_block.transformers.")})
              for pre in ("encoder", "decoder")}
    desc = (f"the file has embed_dim {found.shape[0]}, {found.shape[1]} input channels (time x variables), "
            f"{layers['encoder']} encoder / {layers['decoder']} decoder transformer layers" if found is not None
            else "the file has no Prithvi WxC patch_embedding")
    hint = (f"{desc}. Use prithvi_wxc_2300m or set backbone_kwargs (in_channels, input_size_time, "
            "in_channels_static, residual, positional_encoding, embed_dim, n_blocks_*) to the checkpoint's.")
    return load_checked(model, state, path, hint, allow_unexpected=False)


# --- named sizes ---------------------------------------------------------------------------

default_cfgs = generate_default_cfgs({
    "prithvi_wxc_2300m": {
        "hf_hub_id": "ibm-nasa-geospatial/Prithvi-WxC-1.0-2300M", "hf_hub_filename": "prithvi.wxc.2300m.v1.pt",
        "license": "mit", "input_size": (160, 360, 576), "num_classes": 0, "first_conv": "patch_embedding.proj",
        "origin_url": "https://github.com/NASA-IMPACT/Prithvi-WxC", "paper_ids": "arXiv:2409.13598",
    },
    "prithvi_wxc_tiny": {"input_size": (4, 16, 32), "num_classes": 0, "first_conv": "patch_embedding.proj",
                         "license": "mit", "origin_url": "https://github.com/NASA-IMPACT/Prithvi-WxC"},
})
register_backbone(PrithviWxC, "prithvi_wxc_2300m", load_prithvi_wxc,
                  "Prithvi WxC 2.3B: 160 MERRA-2 variables x 2 times, 360x576 grid, 2x2 patches, 30x32 mask units, "
                  "2560 wide, 12 encoder / 2 decoder local-global pairs, SWIN shifts, climate residual.",
                  known_bands=WXC_VARIABLES, encoder_shifting=True, decoder_shifting=True)
register_backbone(PrithviWxC, "prithvi_wxc_tiny", load_prithvi_wxc,
                  "A small Prithvi WxC in the official layout (for tests and CPU demos): 16x32 grid, 8x8 mask units.",
                  known_bands=WXC_VARIABLES, in_channels=4, in_channels_static=4, n_lats_px=16, n_lons_px=32,
                  mask_unit_size_px=(8, 8), embed_dim=64, n_blocks_encoder=2, n_blocks_decoder=1, n_heads=2,
                  encoder_shifting=True)
