"""Whole-scene prediction: window plans and blending, streaming GeoTIFF outputs, the predictor."""

from workbench.predict.outputs import SceneWriter
from workbench.predict.tiled import SceneSpec, TiledPredictor
from workbench.predict.windows import WindowPlan, blend_weights

__all__ = ["SceneSpec", "SceneWriter", "TiledPredictor", "WindowPlan", "blend_weights"]
