"""Necks, decoders and task heads. They know backbones only through ``feature_info`` (and, for
point clouds, the shared kNN helpers of ``backbones.point_transformer``)."""

from heads.classification import PoolingHead
from heads.decoders import FCN, UNet, UPerNet, build_decoder
from heads.necks import ViTFeaturePyramid, build_neck
from heads.points import PointPropagationHead
from heads.segmentation import PixelHead
from heads.series import FlattenHead, PatchReconstructionHead

__all__ = [
    "FCN", "FlattenHead", "PatchReconstructionHead", "PixelHead", "PointPropagationHead", "PoolingHead", "UNet",
    "UPerNet", "ViTFeaturePyramid", "build_decoder", "build_neck",
]
