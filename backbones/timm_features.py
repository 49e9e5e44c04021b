"""Any timm model (ViT, Swin, ConvNeXt, ResNet, ...) as a multi-level backbone, for comparing a
foundation model with ImageNet-style baselines under the same decoders and strategies."""

from __future__ import annotations

from typing import Any

import timm
from torch import Tensor, nn

from backbones.features import call_layers_as_modules, to_nchw


class TimmFeatures(nn.Module):
    """``timm.create_model(name, features_only=True, in_chans=...)`` behind the workbench backbone
    interface: :meth:`forward_features` ``(B, C, H, W)`` → list of ``(B, C_i, H_i, W_i)`` and
    ``feature_info`` with ``num_chs`` / ``reduction`` per level.

    ``pretrained``: a local weights file (timm adapts the first conv to ``in_chans``), or True to
    fetch timm's own weights when online. The wrapped model is ``self.model``.
    """

    def __init__(self, name: str, in_chans: int = 3, pretrained: bool | str = False,
                 out_indices: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        super().__init__()
        extra: dict[str, Any] = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        if isinstance(pretrained, str):
            extra["pretrained_cfg_overlay"] = {"file": pretrained}
        self.model = call_layers_as_modules(timm.create_model(
            name, features_only=True, in_chans=in_chans, pretrained=bool(pretrained), **extra, **kwargs
        ))
        self.feature_info = [{"num_chs": i["num_chs"], "reduction": i["reduction"], "module": i["module"]}
                             for i in self.model.feature_info.get_dicts()]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (timm's own switch)."""
        self.model.set_grad_checkpointing(enable)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return to_nchw(list(self.model(x)), [i["num_chs"] for i in self.feature_info])

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)
