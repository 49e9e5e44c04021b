"""The model every dense task uses: backbone → (neck) → decoder → head."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from heads import PixelHead, build_decoder, build_neck
from workbench.feature_cache import FeatureCache


class EncoderDecoder(nn.Module):
    """``(B, C, [T,] H, W)`` → ``(B, num_outputs, H, W)`` at the input size.

    ``freeze_backbone()`` stops gradients into the backbone and keeps it in eval mode (no
    dropout, drop-path or BN updates) even when the trainer calls ``.train()`` on the model;
    with ``cache_features`` its features are also cached per sample (see :class:`FeatureCache`).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.decoder = decoder
        self.head = head
        self._backbone_frozen = False
        self.feature_cache: FeatureCache | None = None

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def freeze_backbone(self, cache_features: bool = False, cache_mib: float = 4096) -> None:
        self.backbone.requires_grad_(False)
        self._backbone_frozen = True
        self.feature_cache = FeatureCache(cache_mib) if cache_features else None
        self.train(self.training)

    def train(self, mode: bool = True) -> EncoderDecoder:
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, image: Tensor, **backbone_kwargs: Tensor) -> Tensor:
        if self.feature_cache is not None:
            features = self.feature_cache(self.backbone, image, **backbone_kwargs)
        else:
            features = self.backbone.forward_features(image, **backbone_kwargs)
        features = self.neck(features)
        out = self.head(self.decoder(features))
        return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)


def build_encoder_decoder(
    backbone: nn.Module,
    decoder: str = "uper",
    decoder_channels: int = 256,
    num_classes: int = 2,
    head_dropout: float = 0.1,
) -> EncoderDecoder:
    """Wire neck, decoder and head to ``backbone.feature_info``."""
    neck = build_neck(backbone.feature_info)
    channels = neck.out_channels if neck is not None else [i["num_chs"] for i in backbone.feature_info]
    dec = build_decoder(decoder, channels, decoder_channels)
    return EncoderDecoder(backbone, neck, dec, PixelHead(dec.out_channels, num_classes, head_dropout))
