"""Training memory and speed of Prithvi-EO shapes under full / LoRA / frozen, with and without
activation checkpointing (random weights, UPerNet decoder, cross-entropy on random masks), and of
the ukis-csmask U-Net (``--sizes csmask``: EfficientNet-B4 + U-Net decoder, LoRA on its
pointwise convs; no checkpointing switch).

Each case runs in its own process and prints one JSON line: samples/s over the timed steps and
peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS, VmHWM). The
timed steps go through ``--steps`` distinct random batches ``--epochs`` times, set up as
``workbench fit`` sets them up for un-augmented data (a frozen encoder's feature cache is on, so
its epochs after the first run at decoder cost). ``--precision auto`` is ``auto_precision``'s
choice for this machine (bf16 on GPUs and CPUs with AVX512-BF16 / AMX, else fp32).

    python bench/train.py                                   # 100M and 300M, all cases
    python bench/train.py --sizes 100m --batch_size 8 --precision bf16 --device cuda
    python bench/train.py --sizes csmask --img_size 256 --batch_size 2 --checkpointing off \
        --strategies full lora frozen bitfit ssf lokr "flora:target_modules=[_expand_conv,_depthwise_conv]"

Strategies are written as in ``workbench compare`` (``name[:key=value,...]``). On csmask, a
strategy with ``target_modules`` that sets none adapts the pointwise convs. Strategies that read
training batches to initialise (``spt``, ``lora:init=eva|corda|lora_ga``) are not benchmarked here.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"tiny": "prithvi_eo_v2_tiny_tl", "100m": "prithvi_eo_v2_100m_tl", "300m": "prithvi_eo_v2_300m_tl",
         "600m": "prithvi_eo_v2_600m_tl", "csmask": "csmask_unet_effb4_s2"}
CONV_LORA_TARGETS = ["_expand_conv", "_project_conv", "_se_reduce", "_se_expand"]  # csmask's pointwise convs


def run_case(args: argparse.Namespace) -> dict:
    """One training configuration, in this process."""
    import timm
    import torch

    import backbones  # noqa: F401  (registers the models)
    from workbench.compare.arms import parse_strategy
    from workbench.model import build_encoder_decoder
    from workbench.optim import fused_default

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    cnn = args.size == "csmask"
    if cnn:
        backbone = timm.create_model(SIZES[args.size])
    else:
        backbone = timm.create_model(SIZES[args.size], img_size=args.img_size, num_frames=args.frames)
        backbone.set_grad_checkpointing(args.checkpointing)
    model = build_encoder_decoder(backbone, "unet" if cnn else "uper", 256, 2, neck=args.neck)
    class_path, options = parse_strategy(args.strategy)
    module, name = class_path.rsplit(".", 1)
    strategy_class = getattr(importlib.import_module(module), name)
    if cnn and "target_modules" in inspect.signature(strategy_class).parameters:
        options.setdefault("target_modules", CONV_LORA_TARGETS)
    strategy = strategy_class(**options)
    report = strategy.apply(model)
    model.to(device)  # after apply: some strategies add parameters (SSF, prompts, adapters)
    strategy.on_fit_start(model, augmented=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  **fused_default(torch.optim.AdamW))  # as `workbench fit` builds it
    frames = () if cnn else (args.frames,)
    shape = (args.batch_size, len(backbone.bands), *frames, args.img_size, args.img_size)
    batches = [(torch.randn(shape, device=device),
                torch.randint(0, 2, (args.batch_size, args.img_size, args.img_size), device=device))
               for _ in range(args.steps + 1)]  # the first one warms up
    precision = resolved_precision(args.precision, device.type)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    model.set_channels_last(dtype is not None)  # as `workbench fit` does under mixed precision
    if args.compile:
        model.compile()  # as `compile_model: true` does; the warm-up step compiles

    def step(image: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(image), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm_up = time.perf_counter()
    step(*batches[0])  # warm-up (allocations, kernels, compilation)
    warm_up = time.perf_counter() - warm_up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.epochs):
        for image, mask in batches[1:]:
            step(image, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    return {
        "backbone": SIZES[args.size], "strategy": args.strategy, "checkpointing": args.checkpointing,
        "trainable": report.trainable, "total": report.total, "batch_size": args.batch_size,
        "img_size": args.img_size, "frames": args.frames, "precision": precision, "neck": args.neck,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "device": str(device),
        "steps": args.steps, "epochs": args.epochs,
        "samples_per_s": round(args.epochs * args.steps * args.batch_size / seconds, 3),
        "step_s": round(seconds / (args.epochs * args.steps), 3), "compile": args.compile,
        "first_step_s": round(warm_up, 1), "peak_mib": round(peak, 1),
        "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }


def resolved_precision(precision: str, device_type: str) -> str:
    """``fp32`` / ``bf16`` as given; ``auto``: what ``auto_precision: true`` picks on ``device_type``
    (``cpu``, ``cuda``)."""
    if precision != "auto":
        return precision
    from workbench.precision import auto_precision

    return "bf16" if auto_precision(device_type)[0] == "bf16-mixed" else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100m", "300m"], choices=sorted(SIZES))
    parser.add_argument("--strategies", nargs="+", default=["full", "lora", "frozen"],
                        help="strategies in `workbench compare` syntax, e.g. lora:rank=4")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="distinct batches per epoch")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the --steps batches")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision: medium lets fp32 matmuls use bfloat16 inside")
    parser.add_argument("--neck", default="lean", choices=["wide", "lean"],
                        help="ViT pyramid neck (model.init_args.neck)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile_model: true)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: size,on|off,strategy
    args = parser.parse_args()
    if args.case:
        args.size, on, args.strategy = args.case.split(",", 2)
        args.checkpointing = on == "on"
        print(json.dumps(run_case(args)), flush=True)
        return
    common = [f"--batch_size={args.batch_size}", f"--img_size={args.img_size}", f"--frames={args.frames}",
              f"--steps={args.steps}", f"--epochs={args.epochs}", f"--precision={args.precision}",
              f"--device={args.device}", f"--neck={args.neck}", f"--matmul_precision={args.matmul_precision}",
              *(["--compile"] if args.compile else [])]
    for size in args.sizes:
        for strategy in args.strategies:
            for on in args.checkpointing:
                done = subprocess.run([sys.executable, __file__, f"--case={size},{on},{strategy}", *common],
                                      capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode or not lines:
                    print(json.dumps({"backbone": SIZES[size], "strategy": strategy, "checkpointing": on == "on",
                                      "error": (done.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
                else:
                    print(lines[-1], flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
