"""With ``auto_precision: true``, a ``trainer.precision`` the config leaves unset is chosen from the
hardware: bfloat16 mixed precision where the chip computes bfloat16 natively (GPUs that support
it; CPUs with AVX512-BF16 or AMX), float16 mixed precision on older GPUs, float32 elsewhere. A
value set in the config or on the command line always wins."""

from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def auto_precision(accelerator: str) -> tuple[str, str]:
    """The Lightning precision for a run on ``accelerator`` (``trainer.accelerator``: ``auto``,
    ``cpu``, ``gpu``, ``cuda``, ...) and the reason, e.g. ``("bf16-mixed", "this CPU has AVX512-BF16")``."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{name} computes bfloat16"
        return "16-mixed", f"{name} has no bfloat16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"no mixed-precision default for accelerator {accelerator!r}"
    found = [name for flag, name in BF16_CPU_FLAGS.items() if flag in cpu_flags()]
    if found:
        return "bf16-mixed", f"this CPU has {' and '.join(found)}"
    return "32-true", "this CPU has no bfloat16 instructions"
