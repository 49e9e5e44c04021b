"""Mixed precision: the automatic choice from the hardware, and bf16 training that follows fp32's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import write_config, write_geotiff
from workbench import precision
from workbench.cli import main


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16_gpu", "flags", "expected"),
    [
        ("auto", False, False, {"avx512f", "avx512_bf16"}, "bf16-mixed"),
        ("cpu", False, False, {"avx512f", "amx_bf16"}, "bf16-mixed"),
        ("auto", False, False, {"avx2"}, "32-true"),
        ("auto", True, True, set(), "bf16-mixed"),
        ("gpu", True, False, set(), "16-mixed"),
        ("cpu", True, True, {"avx2"}, "32-true"),  # a CPU run ignores the GPU
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch, accelerator: str, cuda: bool,
                                             bf16_gpu: bool, flags: set[str], expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    chosen, why = precision.auto_precision(accelerator)
    assert chosen == expected and why


def fit(tmp_path: Path, *options: str) -> tuple[dict, list[float]]:
    """results.json and the epoch training losses of a tiny fit with ``options``."""
    config = write_config(tmp_path)
    assert main(["fit", "--config", str(config), "--trainer.max_epochs=4", *options]) == 0
    run = next((tmp_path / "runs" / "tiny").iterdir())
    with (run / "metrics.csv").open() as stream:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(stream) if r.get("train/loss_epoch")]
    return json.loads((run / "results.json").read_text()), losses


def test_bf16_training_follows_fp32_and_auto_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp32, fp32_losses = fit(tmp_path / "fp32")
    assert fp32["precision"] == "32-true"  # nothing chosen without auto_precision
    bf16, bf16_losses = fit(tmp_path / "bf16", "--trainer.precision=bf16-mixed")
    assert bf16["precision"] == "bf16-mixed"
    # the same curve within bf16 rounding: one epoch in, within 1%; after that, nearer to fp32's curve in every
    # epoch than fp32 itself lands from another seed (rounding drift grows as training amplifies differences)
    _, other_seed_losses = fit(tmp_path / "seed1", "--seed_everything=1")
    assert bf16_losses[0] == pytest.approx(fp32_losses[0], rel=0.01)
    for bf16_loss, fp32_loss, seed_loss in zip(bf16_losses, fp32_losses, other_seed_losses, strict=True):
        assert abs(bf16_loss - fp32_loss) < abs(seed_loss - fp32_loss)
    assert bf16_losses[-1] < bf16_losses[0]
    auto, _ = fit(tmp_path / "auto", "--auto_precision=true")
    assert auto["precision"] == precision.auto_precision("cpu")[0]
    assert f"trainer.precision {auto['precision']}" in capsys.readouterr().out


def test_predict_computes_in_the_precision_the_checkpoint_trained_in(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-mixed fit records its precision in the checkpoint; ``predict`` by default maps in
    bfloat16 where the device computes it natively (the same maps as ``--precision bf16``), and in
    float32 elsewhere (the same as ``--precision 32``)."""
    results, _ = fit(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_epochs=1")
    ckpt = results["best_checkpoint"]
    assert torch.load(ckpt, weights_only=False)["workbench"]["precision"] == "bf16-mixed"
    scene = write_geotiff(tmp_path / "scene.tif", np.random.default_rng(0).random((6, 40, 56), dtype=np.float32))

    def probabilities(name: str, *options: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["predict", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", ckpt, "--inputs", str(scene),
                     "--window", "32", "--probabilities", "true", "--quicklook", "false", "--output_dir", str(out),
                     *options]) == 0
        with rasterio.open(out / "scene_probabilities.tif") as src:
            return src.read()

    fp32, bf16 = probabilities("fp32", "--precision", "32"), probabilities("bf16", "--precision", "bf16")
    assert np.abs(fp32 - bf16).max() > 1e-4  # two computations told apart
    for native, expected in ((True, bf16), (False, fp32)):
        choice = ("bf16-mixed", "test: native") if native else ("32-true", "test: emulated")
        monkeypatch.setattr(precision, "auto_precision", lambda accelerator, choice=choice: choice)
        np.testing.assert_array_equal(probabilities(f"default_{native}"), expected)


@pytest.mark.parametrize(("trainer_precision", "nhwc"), [("bf16-mixed", True), ("32-true", False)])
def test_task_layers_are_channels_last_under_mixed_precision_only(trainer_precision: str, nhwc: bool) -> None:
    """``setup`` lays the neck/decoder/head convs out NHWC under mixed precision, NCHW otherwise;
    the backbone is untouched, and outputs and state-dict values do not change."""
    from lightning.pytorch import Trainer

    from tests.conftest import TINY_BACKBONE
    from workbench.tasks import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(num_classes=2, class_names=["land", "water"], decoder="uper", decoder_channels=16,
                            backbone_kwargs=TINY_BACKBONE).eval()
    image = torch.randn(2, 6, 1, 32, 32)
    with torch.no_grad():
        before = task(image)
    state = {k: v.clone() for k, v in task.state_dict().items()}
    task.trainer = Trainer(accelerator="cpu", precision=trainer_precision, logger=False, enable_checkpointing=False)
    task.setup("fit")
    # kernels wider than 1x1 (a 1x1 kernel's strides fit both layouts)
    convs = [m.weight for m in task.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    task_convs = [m.weight for name, m in task.model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1 and not name.startswith("backbone.")]
    assert task_convs and all(w.is_contiguous(memory_format=torch.channels_last) == nhwc for w in task_convs)
    assert all(w.is_contiguous() for w in convs if not any(w is t for t in task_convs))  # the backbone's own
    with torch.no_grad():
        torch.testing.assert_close(task(image), before, rtol=1e-5, atol=1e-6)
    for key, value in task.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_task_outputs_are_float32_under_bf16_autocast() -> None:
    """Regression values and class probabilities leave the task in float32 when the model computes
    in bfloat16: a bf16 output times the 0-d float32 target buffers would stay bfloat16 (values near
    3,000 in steps of 16), and a bf16 softmax sums to 1 only within about 1e-2."""
    from tests.conftest import TINY_BACKBONE
    from workbench.tasks import ClassificationTask, RegressionTask

    regression = RegressionTask(decoder="fcn", decoder_channels=8, target_mean=3000.0, target_std=500.0,
                                backbone_kwargs=TINY_BACKBONE)
    pred = torch.tensor([0.3, -1.1, 2.07, 0.013], dtype=torch.bfloat16)
    values = regression.in_target_units(pred)
    reference = pred.double() * 500.0 + 3000.0
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), reference, rtol=0, atol=1e-3)
    rounded = pred * torch.tensor(500.0) + torch.tensor(3000.0)  # the arithmetic left to bf16 promotion
    assert rounded.dtype == torch.bfloat16 and (rounded.double() - reference).abs().max() > 1

    torch.manual_seed(0)
    classifier = ClassificationTask(num_classes=5, backbone_kwargs=TINY_BACKBONE).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probabilities = classifier.predict_step({"image": torch.randn(4, 6, 32, 32)}, 0)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(1), torch.ones(4), rtol=0, atol=1e-6)


def test_cpu_bf16_training_runs_explicit_attention_with_the_fused_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bfloat16 autocast with gradients, the ViT blocks run timm's explicit attention
    (no scaled_dot_product_attention call); outputs and gradients stay as near float32's as the
    fused kernel's. Inference, float32 and large attention matrices keep the fused kernel, and
    every block is left fused afterwards."""
    import timm
    import torch.nn.functional as F

    import backbones.features as features
    from tests.conftest import TINY_BACKBONE

    fused_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    model = timm.create_model("prithvi_eo_v2_tiny_tl", **TINY_BACKBONE)
    image = torch.randn(4, 6, 32, 32)

    def run(bf16: bool, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
        fused_calls.clear()
        model.zero_grad()
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = model.forward_features(image).float()
        if grad:
            tokens.square().mean().backward()
        grad_of_qkv = model.blocks[0].attn.qkv.weight.grad
        return tokens.detach(), grad_of_qkv, len(fused_calls)

    reference, reference_grad, calls = run(bf16=False)
    assert calls == TINY_BACKBONE["depth"]  # float32: fused
    explicit, explicit_grad, calls = run(bf16=True)
    assert calls == 0
    assert all(block.attn.fused_attn for block in model.blocks)
    assert run(bf16=True, grad=False)[2] == TINY_BACKBONE["depth"]  # inference: fused
    monkeypatch.setattr(features, "EXPLICIT_ATTENTION_MAX_ELEMENTS", 0)  # as if the attention matrix were large
    fused, fused_grad, calls = run(bf16=True)
    assert calls == TINY_BACKBONE["depth"]
    error = lambda x, ref: float((x - ref).abs().mean())  # noqa: E731
    assert error(explicit, reference) <= 2 * error(fused, reference)
    assert error(explicit_grad, reference_grad) <= 2 * error(fused_grad, reference_grad)
