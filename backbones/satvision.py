"""SatVision-TOA style SwinV2 (timm's implementation) for 14-band MODIS top-of-atmosphere inputs:
hierarchical feature maps for UPerNet, and loading of the official SatVision checkpoints.

The official checkpoints are SimMIM-pretrained Microsoft SwinV2 weights: a DeepSpeed file whose
``module`` dict holds ``encoder.*`` (the SwinV2, patch merging at the *end* of each stage) and the
SimMIM ``decoder.*``. :func:`load_satvision` keeps the encoder and lets timm's own SwinV2 filter
renumber the patch-merging layers and drop the non-persistent buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import generate_default_cfgs
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block, checkpoint_filter_fn
from torch import Tensor, nn

from backbones.factory import load_checked, register_backbone, select_prefix
from workbench.checkpoints import read_state_dict
from backbones.features import call_layers_as_modules, to_nchw
from workbench.errors import UserInputError

MODIS_TOA_BANDS = tuple(f"MODIS_{b}" for b in (1, 2, 3, 26, 6, 20, 7, 27, 28, 29, 31, 32, 33, 34))
"""The 14 MODIS bands of SatVision-TOA (reflective 1, 2, 3, 26, 6, 7 and emissive bands)."""


class ExtraNormBlock(SwinTransformerV2Block):
    """timm's SwinV2 block followed by the extra post-norm ``norm3`` that SwinV2-G (and so the
    SatVision-TOA giant) puts after every ``extra_norm_period``-th block of a stage: ``(B, H, W, C)``
    → ``(B, H, W, C)``."""

    norm3: nn.LayerNorm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm3(super().forward(x))


def add_extra_norms(model: SwinTransformerV2, period: int) -> None:
    """Give blocks ``period - 1``, ``2 period - 1``, ... of every stage their ``norm3`` (official
    key ``layers.<s>.blocks.<i>.norm3``): those blocks become :class:`ExtraNormBlock` in place,
    so every other weight keeps its name."""
    for stage in model.layers:
        for index, block in enumerate(stage.blocks):
            if (index + 1) % period == 0:
                block.__class__ = ExtraNormBlock
                block.norm3 = nn.LayerNorm(block.norm2.normalized_shape)


class SatVisionSwinV2(nn.Module):
    """SwinV2 encoder → one ``(B, C_i, H/r_i, W/r_i)`` map per stage (``C_i = embed_dim · 2^i``,
    ``r_i = patch · 2^i``), the last through the final norm. Input ``(B, C, H, W)``, H and W a
    multiple of ``patch_size · window_size · 2^(stages-1)``. ``extra_norm_period`` (SatVision's
    ``NORM_PERIOD``: 6 for the giant, 0 for none) adds SwinV2-G's post-norm after every that-many
    blocks of a stage."""

    def __init__(self, img_size: int = 128, patch_size: int = 4, in_chans: int = len(MODIS_TOA_BANDS),
                 embed_dim: int = 512, depths: tuple[int, ...] = (2, 2, 42, 2),
                 num_heads: tuple[int, ...] = (16, 32, 64, 128), window_size: int = 8,
                 drop_path_rate: float = 0.1, extra_norm_period: int = 0, bands: list[str] | None = None) -> None:
        super().__init__()
        if bands is not None:
            in_chans = len(bands)
        self.bands = list(bands) if bands is not None else list(MODIS_TOA_BANDS)[:in_chans]
        self.model = call_layers_as_modules(SwinTransformerV2(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, window_size=window_size, drop_path_rate=drop_path_rate, num_classes=0,
        ))
        if extra_norm_period:
            add_extra_norms(self.model, extra_norm_period)
        self.feature_info = [
            {"num_chs": embed_dim * 2**i, "reduction": patch_size * 2**i, "module": f"layers.{i}"}
            for i in range(len(depths))
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (timm's SwinV2 stages do it per block)."""
        self.model.set_grad_checkpointing(enable)

    @property
    def layers(self) -> nn.ModuleList:
        """The SwinV2 stages (each with ``.blocks``), for per-block strategies."""
        return self.model.layers

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != len(self.bands):
            raise UserInputError(
                f"SatVision expects (B, {len(self.bands)}, H, W) inputs (bands {self.bands}), got {tuple(x.shape)}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → the last stage after the final norm, ``(B, H/r, W/r, C_last)`` (timm's NHWC)."""
        self._check_input(x)
        return self.model.forward_features(x)

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` → one ``(B, C_i, H/r_i, W/r_i)`` map per stage."""
        self._check_input(x)
        x = self.model.patch_embed(x)
        features = []
        for i, layer in enumerate(self.model.layers):
            x = layer(x)
            features.append(self.model.norm(x) if i == len(self.model.layers) - 1 else x)
        return to_nchw(features, [i["num_chs"] for i in self.feature_info])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm SwinV2's matcher under the ``model.`` prefix: stem, each block, the final norm."""
        return {"stem": r"^model\.(?:absolute_pos_embed|patch_embed)",
                "blocks": r"^model\.layers\.(\d+)" if coarse else [
                    (r"^model\.layers\.(\d+)\.downsample", (0,)), (r"^model\.layers\.(\d+)\.\w+\.(\d+)", None),
                    (r"^model\.norm", (99999,))]}


def load_satvision(model: SatVisionSwinV2, path: str | Path) -> dict[str, Any]:
    """Load an official SatVision-TOA checkpoint (or a plain SwinV2 state dict) into ``model``."""
    state = select_prefix(read_state_dict(Path(path)), "encoder.")
    state = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("head")}
    hint = "Pick the size the checkpoint was trained with (embed_dim, depths, num_heads, window_size, in_chans)."
    return load_checked(model.model, checkpoint_filter_fn(state, model.model), path, hint, allow_unexpected=False)


default_cfgs = generate_default_cfgs({
    name: {"input_size": (len(MODIS_TOA_BANDS), 128, 128), "num_classes": 0, "first_conv": "model.patch_embed.proj",
           "origin_url": "https://github.com/nasa-nccs-hpda/pytorch-caney"}
    for name in ("satvision_toa_giant", "satvision_toa_tiny")
})
register_backbone(SatVisionSwinV2, "satvision_toa_giant", load_satvision,
                  "SatVision-TOA giant: SwinV2-G, 14 MODIS TOA bands, 128 px, patch 4, window 8.",
                  embed_dim=512, depths=(2, 2, 42, 2), num_heads=(16, 32, 64, 128), extra_norm_period=6)
register_backbone(SatVisionSwinV2, "satvision_toa_tiny", load_satvision,
                  "A small SwinV2 in the SatVision-TOA layout (for tests and CPU demos).",
                  embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
