"""Benchmark `workbench predict`'s tiled predictor: pixels/s and peak memory per scene size.

Prints one JSON line per (backbone, scene size). Each case runs in its own process so peak
memory (VmHWM) is that case's alone. Weights are random: speed and memory do not depend on them.

    python bench/predict.py                       # 2k², 8k², 16k² scenes, small and 100M backbones
    python bench/predict.py --sizes 2048 --backbones small
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKBONES = {
    "small": {"backbone": "prithvi_eo_v2_tiny_tl", "backbone_kwargs": {"num_frames": 1, "img_size": 224}},
    "100m": {"backbone": "prithvi_eo_v2_100m_tl", "backbone_kwargs": {"num_frames": 1, "img_size": 224}},
}


def write_scene(path: Path, side: int) -> None:
    """A 6-band uint16 tiled GeoTIFF of ``side``² pixels, written in row blocks (bounded memory)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=side, height=side, count=6, dtype="uint16", crs="EPSG:32618",
                   transform=from_origin(400000, 4200000, 30, 30), tiled=True, blockxsize=512, blockysize=512)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, side, 1024):
            rows = min(1024, side - row)
            dst.write(rng.integers(0, 5000, (6, rows, side), dtype=np.uint16), window=Window(0, row, side, rows))


def run_case(backbone: str, scene: str, window: int, overlap: int, batch_size: int, device: str, bf16: bool) -> dict:
    """Predict one scene in this process and report throughput and peak memory."""
    import torch

    from datamodules.normalize import Preprocessor
    from workbench.predict import SceneSpec, TiledPredictor
    from workbench.tasks import SegmentationTask

    task = SegmentationTask(num_classes=2, class_names=["land", "water"], **BACKBONES[backbone]).to(device)
    predictor = TiledPredictor(task, Preprocessor([1000.0] * 6, [500.0] * 6), SceneSpec(list(range(6)), 6, None, None),
                               window=window, overlap=overlap, batch_size=batch_size, bf16=bf16)
    start = time.perf_counter()
    predictor.predict_scene([Path(scene)], Path(scene).parent / "out", Path(scene).stem, quicklook=False)
    seconds = time.perf_counter() - start
    side = int(Path(scene).stem.split("_")[-1])
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    return {"backbone": backbone, "scene_px": side * side, "side": side, "window": window, "overlap": overlap,
            "device": device, "precision": "bf16" if bf16 else "fp32",
            "seconds": round(seconds, 1), "px_per_s": round(side * side / seconds), "peak_rss_mib": hwm // 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() >> 20 if device.startswith("cuda") else None,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--window", type=int, default=224)
    parser.add_argument("--overlap", type=int, default=None, help="pixels shared by neighbouring windows "
                        "(default: a quarter of the window)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--case", nargs=2, metavar=("BACKBONE", "SCENE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.overlap = args.window // 4 if args.overlap is None else args.overlap
    if args.case:
        print(json.dumps(run_case(*args.case, args.window, args.overlap, args.batch_size, args.device,
                                  args.precision == "bf16")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            scene = Path(tmp) / f"scene_{side}.tif"
            write_scene(scene, side)
            for backbone in args.backbones:
                cmd = [sys.executable, __file__, "--case", backbone, str(scene), "--window", str(args.window),
                       "--overlap", str(args.overlap), "--batch_size", str(args.batch_size), "--device", args.device,
                       "--precision", args.precision]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                print(out.strip().splitlines()[-1], flush=True)
            scene.unlink()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
