"""Any timm model (ViT, Swin, ConvNeXt, ResNet, ...) as a multi-level backbone, for comparing a
foundation model with ImageNet-style baselines under the same decoders and strategies."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import timm
from torch import Tensor, nn

from backbones.features import call_layers_as_modules, to_nchw
from workbench.errors import UserInputError


class TimmFeatures(nn.Module):
    """``timm.create_model(name, features_only=True, in_chans=...)`` behind the workbench backbone
    interface: :meth:`forward_intermediates` ``(B, C, H, W)`` → list of ``(B, C_i, H_i, W_i)``,
    :meth:`forward_features` the last of them, and ``feature_info`` with ``num_chs`` /
    ``reduction`` per level.

    ``pretrained``: a local weights file (timm adapts the first conv to ``in_chans``), or True to
    fetch timm's own weights when online. The wrapped model is ``self.model``.
    """

    def __init__(self, name: str, in_chans: int = 3, pretrained: bool | str = False,
                 out_indices: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.name = name
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

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        return to_nchw(list(self.model(x)), [i["num_chs"] for i in self.feature_info])

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_intermediates(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """A timm group matcher (a callable) for any wrapped model: embeddings and stem first, then
        every member of a ``blocks`` list in forward order (ViT ``blocks``, Swin ``layers[i].blocks``,
        ConvNeXt ``stages[i].blocks``), everything else last. (``features_only`` renames the
        model's modules, so the model's own ``group_matcher`` does not apply.)"""
        blocks = [f"{name}.blocks.{i}." for name, module in self.named_modules()
                  if isinstance(getattr(module, "blocks", None), (nn.ModuleList, nn.Sequential))
                  for i in range(len(module.blocks))]
        if not blocks:
            raise UserInputError(f"{self.name}: no `blocks` lists to give layer-wise learning rates (ViT, Swin, "
                                 "ConvNeXt have them): unset model.layer_decay")
        stem = re.compile(r"^model\.(model\.)?(patch_embed|pos_embed|cls_token|absolute_pos_embed|stem|conv1|bn1)")

        def layer(name: str) -> tuple[float, ...]:
            if stem.match(name):
                return (0,)
            return next(((i + 1,) for i, prefix in enumerate(blocks) if name.startswith(prefix)), (float("inf"),))

        return layer
