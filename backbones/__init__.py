"""Backbones, one file per family, registered with timm (``timm.create_model`` finds them)."""

from backbones.ast import AudioSpectrogramTransformer, load_ast
from backbones.csmask import CSMASK_BANDS, CSMaskEncoder, load_csmask
from backbones.patchtst import PatchTST
from backbones.point_transformer import PointTransformer, load_point_transformer
from backbones.prithvi import HLS_BANDS, PrithviViT, load_pretrained
from backbones.prithvi_wxc import WXC_VARIABLES, PrithviWxC, load_prithvi_wxc
from backbones.satvision import MODIS_TOA_BANDS, SatVisionSwinV2, load_satvision
from backbones.smp_encoders import SmpEncoder, load_smp_encoder
from backbones.timm_features import TimmFeatures

__all__ = [
    "CSMASK_BANDS", "HLS_BANDS", "MODIS_TOA_BANDS", "WXC_VARIABLES", "AudioSpectrogramTransformer", "CSMaskEncoder",
    "PatchTST", "PointTransformer", "PrithviViT", "PrithviWxC", "SatVisionSwinV2", "SmpEncoder", "TimmFeatures",
    "load_ast", "load_csmask", "load_point_transformer", "load_pretrained", "load_prithvi_wxc", "load_satvision",
    "load_smp_encoder",
]
