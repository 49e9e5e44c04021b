"""Workbench against TerraTorch, same shapes, same machine, same run: training samples/s of
Prithvi-EO 100M + UPerNet 256 (6 bands, 224², one frame, random weights, cross-entropy on random
masks, AdamW) under full fine-tuning, LoRA (r 8, alpha 16 on every block's ``attn.qkv`` and
``attn.proj``) and a frozen encoder, each case in its own process, TerraTorch's in the Python of
an environment where it is installed:

    python -m venv --system-site-packages /tmp/ttenv && /tmp/ttenv/bin/pip install terratorch
    python bench/peers.py --peer_python /tmp/ttenv/bin/python

Ours are ``bench/train.py`` cases (the same step: forward, loss, backward, AdamW step, over
``--steps`` distinct batches ``--epochs`` times). Prints one JSON line per case and one ratio line
per strategy (Workbench samples/s ÷ TerraTorch's).

``--precision`` chooses what is compared: ``fp32`` or ``bf16`` (autocast), the same arithmetic in
both tools (fp32 matmuls at ``--matmul_precision`` in both processes); ``default``, what each tool
does when the user sets nothing: Workbench's ``auto_precision`` choice for this machine and its
frozen-encoder feature cache, and prediction in the precision such a checkpoint trained in;
TerraTorch's 32-bit training and inference with the matmul precision its import leaves
(``medium``: importing ``terratorch.models`` sets it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
LORA_TARGETS = ["attn.qkv", "attn.proj"]


def terratorch_model(backbone: str, strategy: str) -> nn.Module:
    """TerraTorch's Prithvi-EO + UPerNet 256 with the learned pyramid neck (ours: ``neck: lean``)."""
    from terratorch.models import EncoderDecoderFactory

    peft = {"method": "LORA", "peft_config_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS}}
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone=backbone, backbone_pretrained=False, backbone_bands=BANDS,
        necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"},
               {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder", decoder_channels=256, num_classes=2,
        peft_config=peft if strategy == "lora" else None,
    )
    if strategy == "frozen":
        model.encoder.requires_grad_(False)
    return model


def terratorch_case(args: argparse.Namespace) -> dict:
    """One TerraTorch training case, in this process (run with the peer environment's Python)."""
    from importlib.metadata import version

    import torch

    torch.manual_seed(0)
    model = terratorch_model("prithvi_eo_v2_100_tl", args.strategy)
    if args.precision != "default":  # after the import: terratorch sets "medium" on import
        torch.set_float32_matmul_precision(args.matmul_precision)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batches = [(torch.randn(args.batch_size, len(BANDS), args.img_size, args.img_size),
                torch.randint(0, 2, (args.batch_size, args.img_size, args.img_size))) for _ in range(args.steps + 1)]
    bf16 = args.precision == "bf16"

    def step(image: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(image).output, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    for _ in range(args.epochs):
        for image, mask in batches[1:]:
            step(image, mask)
    seconds = time.perf_counter() - start
    return {"tool": f"terratorch {version('terratorch')}", "strategy": args.strategy,
            "trainable": sum(p.numel() for p in trainable), "precision": "bf16" if bf16 else "fp32",
            "samples_per_s": round(args.epochs * args.steps * args.batch_size / seconds, 3),
            "step_s": round(seconds / (args.epochs * args.steps), 3),
            "matmul_precision": torch.get_float32_matmul_precision()}


def terratorch_predict_case(args: argparse.Namespace) -> dict:
    """TerraTorch's ``tiled_inference`` over the whole GeoTIFF ``args.scene`` (read into memory, as
    its predict step takes it), Prithvi-EO tiny + UPerNet 256, class map by argmax; in this process."""
    from importlib.metadata import version

    import rasterio
    import torch
    from terratorch.tasks.tiled_inference import tiled_inference

    torch.manual_seed(0)
    model = terratorch_model("prithvi_eo_v2_tiny_tl", "full").eval()
    if args.precision != "default":
        torch.set_float32_matmul_precision(args.matmul_precision)
    start = time.perf_counter()
    with rasterio.open(args.scene) as src:
        image = (torch.from_numpy(src.read().astype("float32"))[None] - 1000.0) / 500.0  # bench/predict.py's stats
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        logits = tiled_inference(lambda x: model(x).output, image, out_channels=2, crop=args.window,
                                 stride=args.window - args.overlap, batch_size=args.predict_batch_size)
    classes = logits.argmax(1)
    seconds = time.perf_counter() - start
    return {"tool": f"terratorch {version('terratorch')}", "case": "predict", "scene_px": classes.numel(),
            "window": args.window, "overlap": args.overlap, "seconds": round(seconds, 1),
            "px_per_s": round(classes.numel() / seconds), "peak_rss_mib": peak_rss_mib(),
            "matmul_precision": torch.get_float32_matmul_precision()}


def peak_rss_mib() -> int:
    """This process's peak resident memory (VmHWM), MiB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024


def compare_predict(args: argparse.Namespace) -> None:
    """Tiled prediction of one generated scene: ours from the GeoTIFF to a GeoTIFF (``bench/predict.py``),
    TerraTorch's ``tiled_inference`` from the scene in memory; same model shapes, window and overlap."""
    spec = importlib.util.spec_from_file_location("bench_predict", Path(__file__).with_name("predict.py"))
    bench_predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_predict)
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(tmp) / f"scene_{args.scene_size}.tif"
        bench_predict.write_scene(scene, args.scene_size)
        ours = last_json([sys.executable, spec.origin, "--case", "small", str(scene), f"--window={args.window}",
                          f"--overlap={args.overlap}", f"--batch_size={args.predict_batch_size}", "--device=cpu",
                          f"--precision={ours_predict_precision(args.precision)}"])
        peer = last_json([args.peer_python, __file__, "--peer_case=predict", f"--peer_python={args.peer_python}",
                          f"--scene={scene}", f"--window={args.window}", f"--overlap={args.overlap}",
                          f"--predict_batch_size={args.predict_batch_size}", f"--precision={args.precision}",
                          f"--matmul_precision={args.matmul_precision}"])
    print(json.dumps({"tool": "workbench", "case": "predict", **ours}), flush=True)
    print(json.dumps(peer), flush=True)
    if "px_per_s" in ours and "px_per_s" in peer:
        print(json.dumps({"case": "predict", "ratio": round(ours["px_per_s"] / peer["px_per_s"], 2)}), flush=True)


def ours_predict_precision(precision: str) -> str:
    """``bench/predict.py``'s precision for ``--precision``: ``default`` is what ``workbench predict``
    does with a checkpoint of a default fit on this machine (``auto_precision``'s choice, which
    predict keeps: bf16 where the CPU computes it natively)."""
    if precision == "default":
        from workbench.precision import auto_precision

        return "bf16" if auto_precision("cpu")[0] == "bf16-mixed" else "fp32"
    return precision


def last_json(command: list[str]) -> dict:
    """The last JSON line a case printed, or its error."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_python", required=True, help="Python of an environment with terratorch installed")
    parser.add_argument("--strategies", nargs="+", default=["full", "lora", "frozen", "predict"],
                        choices=["full", "lora", "frozen", "predict"],
                        help="training cases, and predict: tiled prediction of a generated scene")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="distinct batches per epoch")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the --steps batches")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "default"],
                        help="the same arithmetic in both tools (fp32, bf16), or each tool's default")
    parser.add_argument("--neck", default="lean", choices=["wide", "lean"], help="our ViT pyramid neck")
    parser.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision in both tools' processes (importing terratorch "
                        "sets medium: fp32 matmuls computed in bfloat16 on CPUs and GPUs that have it)")
    parser.add_argument("--scene_size", type=int, default=2048, help="predict: side of the generated scene")
    parser.add_argument("--window", type=int, default=224, help="predict: window side")
    parser.add_argument("--overlap", type=int, default=32, help="predict: pixels shared by neighbouring windows "
                        "(TerraTorch's stride is window - overlap)")
    parser.add_argument("--predict_batch_size", type=int, default=8, help="predict: windows per forward pass")
    parser.add_argument("--peer_case", default=None, help=argparse.SUPPRESS)  # internal: run one TerraTorch case
    parser.add_argument("--scene", default=None, help=argparse.SUPPRESS)  # internal: the predict case's scene
    args = parser.parse_args()
    if args.peer_case == "predict":
        print(json.dumps(terratorch_predict_case(args)), flush=True)
        return
    if args.peer_case:
        args.strategy = args.peer_case
        print(json.dumps(terratorch_case(args)), flush=True)
        return
    common = [f"--batch_size={args.batch_size}", f"--img_size={args.img_size}", f"--steps={args.steps}",
              f"--epochs={args.epochs}", f"--matmul_precision={args.matmul_precision}"]
    ours_precision = "auto" if args.precision == "default" else args.precision
    train = Path(__file__).with_name("train.py")
    for strategy in args.strategies:
        if strategy == "predict":
            compare_predict(args)
            continue
        ours_spec = strategy
        if strategy == "lora":
            ours_spec = f"lora:rank=8,alpha=16,target_modules=[{','.join(LORA_TARGETS)}]"
        ours = last_json([sys.executable, str(train), f"--case=100m,off,{ours_spec}", "--device=cpu",
                          f"--neck={args.neck}", f"--precision={ours_precision}", *common])
        peer = last_json([args.peer_python, __file__, f"--peer_case={strategy}", f"--peer_python={args.peer_python}",
                          f"--precision={args.precision}", *common])
        print(json.dumps({"tool": "workbench", **ours}), flush=True)
        print(json.dumps(peer), flush=True)
        if "samples_per_s" in ours and "samples_per_s" in peer:
            print(json.dumps({"strategy": strategy, "ratio": round(ours["samples_per_s"] / peer["samples_per_s"], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
