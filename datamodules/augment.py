"""Batch augmentations configured in YAML: kornia (or torchgeo) transforms applied on the device to
a batch's image and mask together, one random draw per chip shared by both.

A config lists them as ``class_path``/``init_args`` entries, e.g.::

    augmentations:
      - class_path: kornia.augmentation.RandomHorizontalFlip
        init_args: {p: 0.5}
      - class_path: kornia.augmentation.RandomRotation
        init_args: {degrees: 90.0, p: 0.5}
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from workbench.errors import UserInputError

FIELD = "data.init_args.augmentations"


def class_spec(spec: Any, field: str) -> tuple[type, dict[str, Any]]:
    """``(class, init_args)`` of a ``{class_path, init_args}`` config entry; ``field`` is named in errors."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise UserInputError(f"{field} must be {{class_path: ..., init_args: {{...}}}}, got {spec!r}")
    module, _, name = spec["class_path"].rpartition(".")
    try:
        return getattr(importlib.import_module(module), name), dict(spec.get("init_args") or {})
    except (ImportError, AttributeError, ValueError):
        raise UserInputError(f"{field}.class_path {spec['class_path']!r} is not an importable class") from None


def build_transform(spec: Any, index: int) -> nn.Module:
    """The transform of one ``{class_path, init_args}`` entry (entry ``index`` of the list)."""
    transform_class, init_args = class_spec(spec, f"{FIELD}[{index}]")
    try:
        transform = transform_class(**init_args)
    except (TypeError, ValueError) as err:
        raise UserInputError(f"{FIELD}[{index}] {spec['class_path']}: {err}: check its init_args") from None
    if not isinstance(transform, nn.Module):
        raise UserInputError(f"{FIELD}[{index}] {spec['class_path']} is not a kornia augmentation")
    return transform


def outside_value(dtype: torch.dtype, ignore_index: int) -> float | int | bool:
    """What a per-pixel entry holds where a transform brought pixels in from outside the chip."""
    if dtype == torch.bool:
        return False
    return float("nan") if dtype.is_floating_point else ignore_index


class BatchAugmentation(nn.Module):
    """YAML-configured transforms in one ``kornia.augmentation.AugmentationSequential`` (dict mode).

    ``image`` ``(B, C, [T,] H, W)`` float (frames folded into channels so all share a draw) and
    every per-pixel entry ``(B, H, W)`` — ``mask`` int64, ``valid`` bool, ``target`` float — get the
    same random draw; per-pixel entries are resampled nearest (kornia's default for masks), so classes
    stay integer and keep ``ignore_index``. Pixels that a transform brings in from outside the chip
    (rotation corners, translation, padding) become ``ignore_index`` in ``mask``, ``False`` in
    ``valid`` and NaN in ``target``.
    """

    def __init__(self, specs: Sequence[dict[str, Any]]) -> None:
        super().__init__()
        transforms = [build_transform(spec, i) for i, spec in enumerate(specs)]
        try:
            self.sequence = K.AugmentationSequential(*transforms, data_keys=None, keepdim=True)
        except (TypeError, ValueError, NotImplementedError) as err:
            raise UserInputError(f"{FIELD}: {err}") from None

    def forward(self, batch: dict[str, Tensor], ignore_index: int = 255) -> dict[str, Tensor]:
        """The batch with ``image`` and its per-pixel entries transformed; other entries as they were."""
        image = batch["image"]
        pixel_keys = [k for k, v in batch.items() if k != "image" and isinstance(v, Tensor) and v.ndim == 3
                      and v.shape == (image.shape[0], *image.shape[-2:])]
        inside = torch.ones_like(image[:, 0, 0] if image.ndim == 5 else image[:, 0], dtype=torch.float32)
        # one multi-channel mask: channel 0 marks the chip's own pixels, the others are the entries
        planes = torch.stack([inside, *(batch[k].to(torch.float32) for k in pixel_keys)], 1)
        out = self.sequence({"image": image.flatten(1, 2) if image.ndim == 5 else image, "mask": planes})
        augmented = dict(batch, image=out["image"].unflatten(1, image.shape[1:3]) if image.ndim == 5 else out["image"])
        moved = out["mask"]
        for channel, key in enumerate(pixel_keys, 1):
            dtype = batch[key].dtype
            outside = torch.tensor(outside_value(dtype, ignore_index), dtype=dtype, device=moved.device)
            augmented[key] = torch.where(moved[:, 0] > 0.5, moved[:, channel].to(dtype), outside)
        return augmented
