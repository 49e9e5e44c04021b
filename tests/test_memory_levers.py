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


def test_adam_is_fused_unless_the_config_says_otherwise() -> None:
    """The task builds torch's AdamW with ``fused=True`` when the config leaves ``fused`` and
    ``foreach`` unset, and the fused update equals the default (foreach) one."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import OptimizerCallable

    from tests.conftest import TINY_BACKBONE
    from workbench.optim import fused_default
    from workbench.tasks import SegmentationTask

    parser = ArgumentParser()
    parser.add_argument("--optimizer", type=OptimizerCallable)

    def callable_of(class_path: str, **init_args: object) -> OptimizerCallable:
        config = parser.parse_object({"optimizer": {"class_path": class_path, "init_args": init_args}})
        return parser.instantiate_classes(config).optimizer

    assert fused_default(torch.optim.AdamW) == {"fused": True}
    assert fused_default(callable_of("torch.optim.AdamW", lr=1e-3)) == {"fused": True}
    assert fused_default(callable_of("torch.optim.AdamW", lr=1e-3, foreach=True)) == {}
    assert fused_default(callable_of("torch.optim.AdamW", lr=1e-3, fused=False)) == {}
    assert fused_default(callable_of("torch.optim.SGD", lr=1e-3)) == {}
    params, initial = [], None
    for optimizer in (callable_of("torch.optim.AdamW", lr=1e-2), callable_of("torch.optim.AdamW", lr=1e-2, foreach=True)):
        torch.manual_seed(0)
        task = SegmentationTask(num_classes=2, decoder="fcn", decoder_channels=8, backbone_kwargs=TINY_BACKBONE,
                                optimizer=optimizer)
        initial = torch.cat([p.detach().flatten() for p in task.parameters()])
        built = task.configure_optimizers()
        assert bool(built.defaults["fused"]) is (not params)  # the first is fused, the second as configured
        image, mask = torch.randn(2, 6, 1, 32, 32), torch.randint(0, 2, (2, 32, 32))
        torch.nn.functional.cross_entropy(task(image), mask).backward()
        built.step()  # one step: later ones amplify rounding where Adam divides near-zero moments
        params.append(torch.cat([p.detach().flatten() for p in task.parameters()]))
    assert (params[1] - initial).abs().max() > 1e-3  # the step moved the weights
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=0)  # the same update
