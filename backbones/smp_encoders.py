"""segmentation-models-pytorch encoders (ResNet, EfficientNet, MiT, ...) as backbones, by name:
``backbone: smp:efficientnet-b4`` — the CNN baselines of remote-sensing segmentation, under the
same decoders, strategies and reports as the foundation models.

Weights: a local file with the encoder's keys, bare or as a whole smp model's ``encoder.*``
(e.g. a U-Net checkpoint); the first convolution is adapted to the data's band count by smp.

EfficientNet encoders pad like TensorFlow ("same", fixed at construction for the reference image
size): the convolutions whose fixed padding is symmetric become plain ``nn.Conv2d`` layers with
that padding (same weights, same names, same outputs), so peft's LoRA & co. can adapt them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from backbones.factory import load_checked, select_prefix
from workbench.checkpoints import read_state_dict
from workbench.errors import UserInputError

PREFIX = "smp:"


class SmpEncoder(nn.Module):
    """``segmentation_models_pytorch.encoders.get_encoder(name)`` behind the backbone interface:
    :meth:`forward_intermediates` ``(B, C, H, W)`` → one map per stage (strides 2 … 32; the
    identity stage and empty stages are dropped), :meth:`forward_features` the last of them, and
    ``feature_info`` with ``num_chs`` / ``reduction``."""

    def __init__(self, name: str, in_chans: int = 3, depth: int = 5, pretrained: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from segmentation_models_pytorch.encoders import encoders, get_encoder

        if name not in encoders:
            close = difflib.get_close_matches(name, list(encoders), n=8, cutoff=0.5)
            raise UserInputError(f"model.backbone: unknown smp encoder {name!r}. Similar: {close or 'none'}")
        self.name = name
        self.model = get_encoder(name, in_channels=in_chans, depth=depth, weights=None, **kwargs)
        for unused in ("_conv_head", "_bn1"):  # EfficientNet's classifier stem: never in the features
            if hasattr(self.model, unused):
                delattr(self.model, unused)
        for block in self.model.modules():  # blocks without expansion hold Identity placeholders
            if getattr(block, "_has_expansion", True) is False:
                del block._expand_conv, block._bn0
        plain_padded_convs(self.model)
        self.feature_levels = [i for i, c in enumerate(self.model.out_channels) if i > 0 and c > 0]
        with torch.no_grad():
            probe = self.model.eval()(torch.zeros(1, in_chans, 64, 64))
        self.model.train()
        self.feature_info = [{"num_chs": self.model.out_channels[i], "reduction": 64 // probe[i].shape[-1],
                              "module": f"stage{i}"} for i in self.feature_levels]
        if pretrained:
            load_smp_encoder(self, pretrained)

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` → ``[(B, C_i, H / r_i, W / r_i)]``, one per stage."""
        features = self.model(x)
        return [features[i] for i in self.feature_levels]

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → the deepest stage's map ``(B, C_last, H / 32, W / 32)``."""
        return self.forward_intermediates(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style parameter groups (layer decay): the stem, then each EfficientNet block or
        ResNet stage in forward order."""
        if self.family() == "efficientnet":
            return {"stem": r"^model\.(?:_conv_stem|_bn0)\.", "blocks": r"^model\._blocks\.(\d+)\."}
        return {"stem": r"^model\.(?:conv1|bn1)\.", "blocks": r"^model\.layer(\d+)\."}

    def family(self) -> str:
        """``efficientnet`` or ``resnet``: the encoder layouts whose stages and layers are known."""
        m = self.model
        if isinstance(getattr(m, "_blocks", None), nn.ModuleList) and hasattr(m, "_out_indexes"):
            return "efficientnet"
        if all(hasattr(m, f"layer{i}") for i in range(1, 5)):
            return "resnet"
        raise UserInputError(f"per-stage strategies and layer decay do not know the stages of smp encoder "
                             f"{self.name!r} (EfficientNet and ResNet-style encoders are known)")

    def stages(self) -> list[list[nn.Module]]:
        """The modules of each feature stage (strides 2, 4, …, 32), for per-stage strategies
        (``LastBlocks``): EfficientNet (stem, then its blocks split at the stage outputs) and
        ResNet-style encoders (stem, ``layer1`` … ``layer4``)."""
        m = self.model
        if self.family() == "efficientnet":
            ends = list(m._out_indexes)[: len(self.feature_levels) - 1]
            starts = [0, *(e + 1 for e in ends[:-1])]
            return [[m._conv_stem, m._bn0], *([*m._blocks[a : b + 1]] for a, b in zip(starts, ends))]
        return [[m.conv1, m.bn1], *([getattr(m, f"layer{i}")] for i in range(1, 5))]


def plain_padded_convs(encoder: nn.Module) -> int:
    """Replace, in place, each TF-"same" ``Conv2dStaticSamePadding`` of ``encoder`` whose fixed
    padding is symmetric by a plain ``nn.Conv2d`` with that padding (same weights and names);
    returns how many were replaced. Those with asymmetric padding (stride-2 layers on even sizes)
    stay as they are. peft builds adapters with the adapted layer's own class, which it cannot do
    for smp's class (its constructor needs the image size)."""
    try:
        from segmentation_models_pytorch.encoders._efficientnet import Conv2dStaticSamePadding
    except ImportError:  # an smp without the vendored EfficientNet: nothing to replace
        return 0
    replaced = 0
    for name, conv in list(encoder.named_modules()):
        if not isinstance(conv, Conv2dStaticSamePadding):
            continue
        pad = conv.static_padding.padding if isinstance(conv.static_padding, nn.ZeroPad2d) else (0, 0, 0, 0)
        left, right, top, bottom = pad
        if left != right or top != bottom:
            continue
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (top, left),
                          conv.dilation, conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(encoder.get_submodule(parent) if parent else encoder, attr, plain)
        replaced += 1
    return replaced


def load_smp_encoder(model: SmpEncoder, path: str | Path) -> dict[str, Any]:
    """Load encoder weights (bare keys or a whole smp model's ``encoder.*``) into ``model``."""
    state = select_prefix(select_prefix(read_state_dict(Path(path)), "model."), "encoder.")
    return load_checked(model.model, state, path, f"is it a {model.name} encoder with the same in_chans?")


def create_smp_encoder(name: str, bands: list[str] | None, pretrained: str | None,
                       backbone_kwargs: dict[str, Any] | None) -> SmpEncoder:
    """``create_backbone`` for ``smp:<encoder>`` names."""
    kwargs = dict(backbone_kwargs or {})
    kwargs.setdefault("in_chans", len(bands) if bands else 3)
    return SmpEncoder(name[len(PREFIX):], pretrained=pretrained, **kwargs)
