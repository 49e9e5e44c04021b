"""Landsat-8 cloud panels for the README: RGB | USGS BQA cloud (the labels) | the pretrained
ukis-csmask model as shipped (3 classes, zero-shot) | a fine-tuned model's classes.

    python docs/l8_clouds_panels.py --finetuned predictions/l8_toa_reflectance6_classes.tif \
        --out docs/l8_clouds_panels.png

Also prints the shipped model's cloud share and its cloud-class IoU against BQA over the whole
scene (256-px windows, as ukis-csmask tiles), so the README's zero-shot numbers can be re-made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import rasterio
    import torch
    from matplotlib import pyplot as plt

    from backbones.csmask import CSMASK_BANDS, CSMASK_CLASSES
    from datamodules import Landsat8CloudDataModule
    from workbench.atomic import atomic_path
    from workbench.tasks import SegmentationTask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", required=True, help="a `workbench predict` *_classes.tif of the scene")
    parser.add_argument("--out", default="docs/l8_clouds_panels.png")
    args = parser.parse_args()

    data = Landsat8CloudDataModule()
    data.prepare_data()
    with rasterio.open(data.root / "l8_toa_reflectance6.tif") as src:
        stack = src.read()
    with rasterio.open(data.root / "l8_bqa_cloud.tif") as src:
        bqa = src.read(1)
    with rasterio.open(args.finetuned) as src:
        finetuned = src.read(1)

    task = SegmentationTask(backbone="csmask_unet_effb4_s2", pretrained=True, decoder="unet", head_dropout=0.0,
                            bands=list(CSMASK_BANDS), num_classes=3, class_names=list(CSMASK_CLASSES)).eval()
    mean, std = (np.array(task.model.backbone.pretrained_cfg[k], np.float32)[:, None, None] for k in ("mean", "std"))
    image = (stack - mean) / std
    h, w = bqa.shape
    padded = np.pad(image, ((0, 0), (0, -h % 256), (0, -w % 256)), mode="reflect")
    with torch.no_grad():
        logits = task(torch.from_numpy(padded[None]))[0, :, :h, :w]
    shipped = logits.argmax(0).numpy()
    cloud, truth = shipped == 1, bqa == 1
    iou = (cloud & truth).sum() / (cloud | truth).sum()
    print(f"shipped model, whole scene: cloud {cloud.mean():.1%}, shadow {(shipped == 2).mean():.1%}, "
          f"cloud IoU vs BQA {iou:.3f}; BQA cloud {truth.mean():.1%}")

    low, high = np.percentile(stack[[2, 1, 0]], (2, 98))
    rgb = np.clip((stack[[2, 1, 0]].transpose(1, 2, 0) - low) / (high - low), 0, 1)
    colours = np.array([[0.15, 0.45, 0.15], [1.0, 1.0, 1.0], [0.35, 0.2, 0.55]])  # clear, cloud, shadow
    panels = [("RGB (TOA reflectance)", rgb),
              ("BQA cloud ≥ medium (USGS algorithm, not hand labels)", colours[np.minimum(bqa, 1)]),
              ("ukis-csmask as shipped (zero-shot)", colours[shipped]), ("fine-tuned", colours[finetuned.clip(0, 2)])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, picture) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.text(0.5, 0.02, "green clear · white cloud · purple cloud shadow", ha="center", fontsize=9)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=60, bbox_inches="tight", format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
