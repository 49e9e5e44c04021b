"""Backbones, one file per family, registered with timm (``timm.create_model`` finds them)."""

from backbones.prithvi import HLS_BANDS, PrithviViT, load_pretrained

__all__ = ["HLS_BANDS", "PrithviViT", "load_pretrained"]
