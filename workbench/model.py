"""Models around a backbone: dense (backbone → neck → decoder → head), scene-level (backbone →
pooling head), series forecasting and reconstruction, per-point segmentation. All freeze their
backbone the same way."""

from __future__ import annotations

import logging
from typing import Literal
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from backbones.factory import PretrainedDecoder, load_checked
from backbones.patchtst import PatchTST, num_patches
from backbones.point_transformer import PointTransformer
from heads import (
    FlattenHead, PatchReconstructionHead, PixelHead, PointPropagationHead, PoolingHead, build_decoder, build_neck,
)
from heads.decoders import DECODERS
from backbones.layers import instance_normalize
from workbench.errors import UserInputError
from workbench.feature_cache import FeatureCache

log = logging.getLogger(__name__)


class BackboneModel(nn.Module):
    """A ``backbone`` plus task layers.

    ``freeze_backbone()`` stops gradients into the backbone and keeps it in eval mode (no
    dropout, drop-path or BN updates) even when the trainer calls ``.train()`` on the model.
    While a :class:`FeatureCache` is attached (``Frozen`` does so for fitting), features come
    from it.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self._backbone_frozen = False
        self.feature_cache: FeatureCache | None = None

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)
        self._backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> BackboneModel:
        """Also keeps the backbone's frozen BatchNorm layers (no affine parameter trains: LoRA &
        co.) in eval mode, so their running statistics stay the pretrained ones."""
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm) and module.affine and not any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
        return self

    def set_channels_last(self, enabled: bool) -> None:
        """Keep the task layers' (everything but the backbone) conv weights channels-last (NHWC)
        or not. Under bfloat16 autocast oneDNN convolves NHWC faster (the flood run's step 12 %,
        tiled prediction 15 % on an AVX512-BF16 CPU); in float32 NCHW is as fast or faster.
        Outputs and saved weights do not change."""
        layout = torch.channels_last if enabled else torch.contiguous_format
        for name, layers in self.named_children():
            if name != "backbone":
                layers.to(memory_format=layout)

    def features(self, image: Tensor, **backbone_kwargs: Tensor) -> list[Tensor]:
        """``backbone.forward_intermediates`` (one map per level), from the feature cache when there is one."""
        if self.feature_cache is not None:
            return self.feature_cache(self.backbone, image, **backbone_kwargs)
        return self.backbone.forward_intermediates(image, **backbone_kwargs)


class EncoderDecoder(BackboneModel):
    """``(B, C, [T,] H, W)`` → ``(B, num_outputs, H, W)`` at the input size."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, decoder: nn.Module, head: nn.Module,
                 levels: list[int] | None = None, task_layers_pretrained: bool = False) -> None:
        """``levels``: indices of the backbone's feature maps the neck and decoder use (all: None);
        ``task_layers_pretrained``: decoder and head came with the backbone's checkpoint, so the
        model predicts without fine-tuning (zero-shot)."""
        super().__init__(backbone)
        self.task_layers_pretrained = task_layers_pretrained
        self.neck = neck if neck is not None else nn.Identity()
        self.decoder = decoder
        self.head = head
        self.levels = levels

    def forward(self, image: Tensor, **backbone_kwargs: Tensor) -> Tensor:
        features = self.features(image, **backbone_kwargs)
        if self.levels is not None:
            features = [features[i] for i in self.levels]
        features = self.neck(features)
        out = self.head(self.decoder(features))
        return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)


def build_encoder_decoder(
    backbone: nn.Module,
    decoder: str = "uper",
    decoder_channels: int = 256,
    num_classes: int = 2,
    head_dropout: float = 0.1,
    class_names: Sequence[str] | None = None,
    neck: Literal["wide", "lean"] = "lean",
) -> EncoderDecoder:
    """Wire neck, decoder and head to ``backbone.feature_info`` (only the last level for decoders
    that read only the coarsest map, so no parameter goes unused — DDP requires that). A backbone
    whose checkpoint also held a decoder and head (``backbone.pretrained_decoder``) hands them to a
    decoder of that kind, the head's rows matched to ``class_names`` by name. ``neck``: ``lean``
    divides the upsampled ViT levels' channels by their factor (:class:`heads.necks.ViTFeaturePyramid`)."""
    info = backbone.feature_info
    levels = [len(info) - 1] if getattr(DECODERS.get(decoder), "coarsest_only", False) else None
    used = [info[i] for i in levels] if levels else info
    hierarchical = len({i["reduction"] for i in info}) > 1  # maps at several strides need no neck
    pyramid = None if hierarchical else build_neck(used, lean=neck == "lean")
    channels = pyramid.out_channels if pyramid is not None else [i["num_chs"] for i in used]
    dec = build_decoder(decoder, channels, decoder_channels)
    head = PixelHead(dec.out_channels, num_classes, head_dropout, getattr(dec, "head_kernel_size", 1))
    shipped: PretrainedDecoder | None = getattr(backbone, "pretrained_decoder", None)
    loaded = shipped is not None and load_pretrained_decoder(
        shipped, decoder, dec, head, class_names or [str(i) for i in range(num_classes)])
    backbone.pretrained_decoder = None  # loaded or not used: no second copy of the tensors
    return EncoderDecoder(backbone, pyramid, dec, head, levels, task_layers_pretrained=loaded)


def load_pretrained_decoder(shipped: PretrainedDecoder, name: str, decoder: nn.Module, head: PixelHead,
                            class_names: Sequence[str]) -> bool:
    """Load the decoder and head weights that came with the backbone's checkpoint, if ``name`` is
    the kind of decoder they belong to (returns whether it is); head rows by class name (other
    classes start fresh)."""
    if shipped.decoder != name:
        log.warning("the backbone's checkpoint also holds a pretrained %s decoder; model.decoder %r starts "
                    "from scratch (use decoder: %s to keep it)", shipped.decoder, name, shipped.decoder)
        return False
    load_checked(decoder, shipped.decoder_state, shipped.source,
                 f"Set model.init_args.decoder_channels to the pretrained {name} decoder's width (256).")
    new = head.load_class_rows(shipped.head, shipped.class_names, class_names)
    log.info("pretrained %s decoder loaded; head classes %s: pretrained rows for %s, new: %s", name,
             list(class_names), [c for c in class_names if c not in new] or "none", new or "none")
    return True


class EncoderClassifier(BackboneModel):
    """``(B, C, [T,] H, W)`` → ``(B, num_outputs)`` from the backbone's last feature map."""

    def __init__(self, backbone: nn.Module, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        self.head = PoolingHead(backbone.feature_info[-1]["num_chs"], num_outputs, dropout)

    def forward(self, image: Tensor, **backbone_kwargs: Tensor) -> Tensor:
        return self.head(self.features(image, **backbone_kwargs)[-1])


def patch_geometry(backbone: nn.Module) -> tuple[int, int]:
    """``(patch_len, stride)`` of a patch-based series backbone (PatchTST)."""
    if not isinstance(backbone, PatchTST):
        raise UserInputError(
            f"forecasting and series imputation need a patch-based series backbone (patchtst_*), not "
            f"{type(backbone).__name__}"
        )
    return backbone.patch_len, backbone.stride


class SeriesForecaster(BackboneModel):
    """``(B, M, context_length)`` → ``(B, M, horizon)``: each window standardized by its own
    statistics (RevIN), PatchTST features, a flatten head, mapped back to data units."""

    def __init__(self, backbone: nn.Module, context_length: int, horizon: int, dropout: float = 0.0) -> None:
        super().__init__(backbone)
        patch_len, stride = patch_geometry(backbone)
        self.context_length = context_length
        self.head = FlattenHead(backbone.embed_dim, num_patches(context_length, patch_len, stride), horizon, dropout)

    def forward(self, series: Tensor) -> Tensor:
        if series.shape[-1] != self.context_length:
            raise UserInputError(
                f"the forecaster was built for context_length {self.context_length}, got windows of "
                f"{series.shape[-1]} steps: set model.init_args.context_length to the data's"
            )
        normalized, mean, std = instance_normalize(series)
        return self.head(self.features(normalized)[-1]) * std + mean


class SeriesReconstructor(BackboneModel):
    """``(B, M, L)`` with an ``observed`` mask → the whole series ``(B, M, L)``: standardized by
    the observed steps, gaps zeroed, per-patch reconstruction mapped back to data units."""

    def __init__(self, backbone: nn.Module, dropout: float = 0.0) -> None:
        super().__init__(backbone)
        self.head = PatchReconstructionHead(backbone.embed_dim, *patch_geometry(backbone), dropout)

    def forward(self, series: Tensor, observed: Tensor | None = None) -> Tensor:
        normalized, mean, std = instance_normalize(series, observed)
        return self.head(self.features(normalized)[-1], series.shape[-1]) * std + mean


class PointSegmenter(BackboneModel):
    """``(B, N, C)`` points → ``(B, num_classes, N)`` per-point logits from a point transformer's
    group tokens (all its feature levels), propagated back to the points."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__(backbone)
        if not isinstance(backbone, PointTransformer):
            raise UserInputError(f"point segmentation needs a point backbone (point_mae_*), not {type(backbone).__name__}")
        channels = sum(i["num_chs"] for i in backbone.feature_info)
        self.head = PointPropagationHead(channels, backbone.in_chans, num_classes, dropout)

    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.features(points), self.backbone.centers(points), points)


FIELD_INPUTS = ("x", "static", "input_time", "lead_time", "climate")
"""The batch entries a gridded-weather backbone (Prithvi WxC) reads."""


class FieldForecaster(BackboneModel):
    """Gridded fields at the input times ``x`` ``(B, T, C, H, W)`` (with ``static`` ``(B, S, H, W)``,
    ``input_time`` and ``lead_time`` ``(B,)`` hours, ``climate`` ``(B, C, H, W)``) → the fields
    ``lead_time`` later ``(B, C, H, W)``: the backbone is the whole forecaster."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.backbone({key: batch[key] for key in FIELD_INPUTS if key in batch})


class FieldDownscaler(BackboneModel):
    """Coarse fields ``(B, C, h, w)`` → fine fields ``(B, C, factor·h, factor·w)``: bicubic
    interpolation plus the backbone's correction, which reads the interpolated fields as one
    input time (with ``static`` ``(B, S, H, W)`` at the fine grid, zero input and lead time)."""

    def __init__(self, backbone: nn.Module, factor: int) -> None:
        super().__init__(backbone)
        self.factor = factor

    def forward(self, coarse: Tensor, static: Tensor) -> Tensor:
        interpolated = F.interpolate(coarse, scale_factor=self.factor, mode="bicubic", align_corners=False)
        hours = coarse.new_zeros(len(coarse))
        batch = {"x": interpolated[:, None], "static": static, "input_time": hours, "lead_time": hours}
        return interpolated + self.backbone(batch)
