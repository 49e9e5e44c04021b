"""Workbench against TerraTorch, same shapes, same machine, same run: training samples/s of
Prithvi-EO 100M + UPerNet 256 (6 bands, 224², one frame, random weights, cross-entropy on random
masks, AdamW) under full fine-tuning, LoRA (r 8, alpha 16 on every block's ``attn.qkv`` and
``attn.proj``) and a frozen encoder, each case in its own process, TerraTorch's in the Python of
an environment where it is installed:

    python -m venv --system-site-packages /tmp/ttenv && /tmp/ttenv/bin/pip install terratorch
    python bench/peers.py --peer_python /tmp/ttenv/bin/python

Ours are ``bench/train.py`` cases (the same step: forward, loss, backward, AdamW step). Prints
one JSON line per case and one ratio line per strategy (Workbench samples/s ÷ TerraTorch's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
LORA_TARGETS = ["attn.qkv", "attn.proj"]


def terratorch_case(args: argparse.Namespace) -> dict:
    """One TerraTorch training case, in this process (run with the peer environment's Python)."""
    from importlib.metadata import version

    import torch
    from terratorch.models import EncoderDecoderFactory

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)  # after the import: terratorch sets "medium" on import
    peft = {"method": "LORA", "peft_config_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS}}
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="prithvi_eo_v2_100_tl", backbone_pretrained=False, backbone_bands=BANDS,
        necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"},
               {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder", decoder_channels=256, num_classes=2,
        peft_config=peft if args.strategy == "lora" else None,
    )
    if args.strategy == "frozen":
        model.encoder.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    image = torch.randn(args.batch_size, len(BANDS), args.img_size, args.img_size)
    mask = torch.randint(0, 2, (args.batch_size, args.img_size, args.img_size))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(image).output, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    return {"tool": f"terratorch {version('terratorch')}", "strategy": args.strategy,
            "trainable": sum(p.numel() for p in trainable),
            "samples_per_s": round(args.steps * args.batch_size / seconds, 3),
            "step_s": round(seconds / args.steps, 3), "matmul_precision": torch.get_float32_matmul_precision()}


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
    parser.add_argument("--strategies", nargs="+", default=["full", "lora", "frozen"],
                        choices=["full", "lora", "frozen"])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--neck", default="lean", choices=["wide", "lean"], help="our ViT pyramid neck")
    parser.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision in both tools' processes (importing terratorch "
                        "sets medium: fp32 matmuls computed in bfloat16 on CPUs and GPUs that have it)")
    parser.add_argument("--peer_case", default=None, help=argparse.SUPPRESS)  # internal: run one TerraTorch case
    args = parser.parse_args()
    if args.peer_case:
        args.strategy = args.peer_case
        print(json.dumps(terratorch_case(args)), flush=True)
        return
    common = [f"--batch_size={args.batch_size}", f"--img_size={args.img_size}", f"--steps={args.steps}",
              f"--matmul_precision={args.matmul_precision}"]
    train = Path(__file__).with_name("train.py")
    for strategy in args.strategies:
        ours_spec = strategy
        if strategy == "lora":
            ours_spec = f"lora:rank=8,alpha=16,target_modules=[{','.join(LORA_TARGETS)}]"
        ours = last_json([sys.executable, str(train), f"--case=100m,off,{ours_spec}", "--device=cpu",
                          f"--neck={args.neck}", *common])
        peer = last_json([args.peer_python, __file__, f"--peer_case={strategy}", f"--peer_python={args.peer_python}",
                          *common])
        print(json.dumps({"tool": "workbench", **ours}), flush=True)
        print(json.dumps(peer), flush=True)
        if "samples_per_s" in ours and "samples_per_s" in peer:
            print(json.dumps({"strategy": strategy, "ratio": round(ours["samples_per_s"] / peer["samples_per_s"], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
