"""Memory and speed levers: activation checkpointing, fused attention, bf16, gradient
accumulation and torch.compile — same numbers, from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import Attention

from tests.conftest import fit_run, reference_miou, write_config
from tests.test_modalities import TINY


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpointing_gives_the_same_outputs_and_gradients(name: str) -> None:
    kwargs, shape = TINY[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(shape)
    outputs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model.forward_intermediates(x)[-1]
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_attention_is_fused(name: str) -> None:
    attention = [m for m in timm.create_model(name, **TINY[name][0]).modules() if isinstance(m, Attention)]
    assert all(m.fused_attn for m in attention)  # F.scaled_dot_product_attention
    assert attention or name == "satvision_toa_tiny"  # SwinV2 has its own (cosine) attention


def test_bf16_checkpointing_and_accumulation_fit_from_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, model={"activation_checkpointing": True}, trainer={"max_epochs": 4})
    losses, results = fit_run(config, "--trainer.precision", "bf16-mixed", "--trainer.accumulate_grad_batches", "2")
    assert losses[-1] < losses[0]  # the bf16 test mIoU is that of the checkpoint, run here in float32:
    assert results["test"]["test/mIoU"] == pytest.approx(reference_miou(results["best_checkpoint"], config), abs=0.02)


@pytest.mark.timeout(400)
def test_compiled_fit_from_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, model={"compile_model": True}, trainer={"max_epochs": 2})
    losses, results = fit_run(config)
    assert len(losses) == 2  # the compiled model scores as the checkpoint run here uncompiled
    assert results["test"]["test/mIoU"] == pytest.approx(reference_miou(results["best_checkpoint"], config), abs=1e-4)
    assert (Path(results["best_checkpoint"]).parent.parent / "export" / "merged.safetensors").is_file()
