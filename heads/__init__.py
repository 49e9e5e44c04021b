"""Necks, decoders and task heads. They know backbones only through ``feature_info``."""

from heads.classification import PoolingHead
from heads.decoders import FCN, UPerNet, build_decoder
from heads.necks import ViTFeaturePyramid, build_neck
from heads.segmentation import PixelHead

__all__ = ["FCN", "PixelHead", "PoolingHead", "UPerNet", "ViTFeaturePyramid", "build_decoder", "build_neck"]
