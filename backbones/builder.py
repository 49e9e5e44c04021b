"""``create_backbone``: every backbone a config names (workbench families, any timm model,
``smp:<encoder>``), built with its bands and optional pretrained weights."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import timm
from torch import nn

import backbones  # noqa: F401  (importing the package registers the families with timm)
from backbones.smp_encoders import PREFIX as SMP_PREFIX
from backbones.smp_encoders import create_smp_encoder
from backbones.timm_features import TimmFeatures
from workbench.errors import UserInputError


def create_backbone(
    name: str,
    bands: list[str] | None = None,
    pretrained: bool | str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a registered timm backbone, optionally loading a local checkpoint.

    Workbench backbones (``prithvi_*``, ``satvision_*``, ``ast_*``, ``patchtst_*``, ``point_mae_*``)
    are built directly; any other timm model (``convnext_tiny``, ``vit_small_patch16_224``, ...)
    is wrapped by :class:`~backbones.TimmFeatures` (its ``features_only`` feature maps), and
    ``smp:<encoder>`` names a segmentation-models-pytorch encoder (``smp:resnet34``, ...).

    Args:
        name: timm model name, e.g. ``prithvi_eo_v2_300m_tl``.
        bands: band names fed to the model (from the datamodule); backbones that know band names
            adapt their patch embedding to them, others get ``in_chans=len(bands)``.
        pretrained: local checkpoint path in the family's official layout; ``True``: the weights
            the backbone's ``pretrained_cfg`` names (an installed package file, e.g. ukis-csmask's,
            or a hub download when online); None / False: random init.
        backbone_kwargs: extra constructor arguments (``num_frames``, ``img_size``, ...).
    """
    if name.startswith(SMP_PREFIX):
        if pretrained is True:
            raise UserInputError(f"model.pretrained: {name} has no packaged weights offline: give a local encoder file")
        return create_smp_encoder(name, bands, pretrained or None, backbone_kwargs)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise UserInputError(
            f"model.backbone: unknown backbone {name!r}. Similar registered names: {close or 'none'}."
        )
    kwargs = dict(backbone_kwargs or {})
    model_cls = getattr(timm.models.model_entrypoint(name), "model_cls", None)
    if bands:
        if model_cls is not None and "bands" in inspect.signature(model_cls).parameters:
            kwargs.setdefault("bands", list(bands))
        else:
            kwargs.setdefault("in_chans", len(bands))
    if pretrained is True:
        kwargs["pretrained"] = True
    elif pretrained:
        if not Path(pretrained).is_file():
            raise UserInputError(
                f"model.pretrained: checkpoint file {pretrained!r} does not exist. "
                "Give the path of a local checkpoint (.pt or .safetensors; .onnx for csmask_unet_effb4_s2), true for "
                "the weights the backbone's package ships, or null for random init."
            )
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
    if model_cls is None:  # any other timm model, as a feature extractor
        weights = kwargs.pop("pretrained_cfg_overlay", {}).get("file", kwargs.pop("pretrained", False))
        try:
            return TimmFeatures(name, pretrained=weights, **kwargs)
        except TypeError as err:  # timm passes unknown keys on to the model class
            raise UserInputError(f"model.backbone_kwargs for {name!r}: {err}. Check the keys' spelling.") from None
    check_kwargs(name, model_cls, backbone_kwargs or {})
    return timm.create_model(name, **kwargs)


def check_kwargs(name: str, model_cls: type, backbone_kwargs: dict[str, Any]) -> None:
    """Every key of ``backbone_kwargs`` must be a constructor argument of the family's class (or of
    the base classes its ``**kwargs`` go to)."""
    valid = set()
    for cls in model_cls.__mro__:
        params = inspect.signature(cls.__init__).parameters if "__init__" in vars(cls) else {}
        valid |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()) and params:
            break
    for key in sorted(set(backbone_kwargs) - valid):
        close = difflib.get_close_matches(key, valid, n=1)
        raise UserInputError(
            f"model.backbone_kwargs for {name!r}: unknown key {key!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f". Valid keys: {', '.join(sorted(valid))}."
        )
