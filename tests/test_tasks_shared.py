"""What the tasks share: per-stage metric clones, per-class IoU names, one target
normalisation, exports, and module dependencies that go one way."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from torchmetrics.classification import MulticlassJaccardIndex

from tests.conftest import TINY_BACKBONE
from workbench.errors import UserInputError
from workbench.export import export_weights
from workbench.tasks import MAEPretrainTask, RegressionTask, ScalarRegressionTask, SegmentationTask
from workbench.tasks.base import ModelInput, model_input

TASKS = Path(__file__).parents[1] / "workbench" / "tasks"
HELPERS = {"base", "dense", "field_scores", "gaps", "mae", "targets"}  # the modules of tasks/ that define no task
TINY_PATCHTST = {"context_length": 48, "patch_len": 8, "stride": 4}


def test_per_class_iou_keeps_its_names_and_matches_torchmetrics() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=2, class_names=["land", "water"], decoder="fcn", decoder_channels=8,
                            backbone_kwargs=TINY_BACKBONE).eval()
    image, mask = torch.randn(2, 6, 32, 32), torch.randint(0, 2, (2, 32, 32))
    mask[:, :4] = 255
    with torch.no_grad():
        task._step({"image": image, "mask": mask}, "val")
        reference = MulticlassJaccardIndex(2, average="none", ignore_index=255)(task(image).argmax(1), mask)
    values = task.val_metrics.compute()
    assert set(values) == {"val/IoU_land", "val/IoU_water", "val/mIoU", "val/F1", "val/accuracy"}
    torch.testing.assert_close(torch.stack([values["val/IoU_land"], values["val/IoU_water"]]), reference)
    torch.testing.assert_close(values["val/mIoU"], reference.mean())
    assert task.test_metrics.prefix == "test/" and not task.test_metrics["mIoU"].update_called  # a clone per stage


def test_regression_tasks_share_one_target_normalisation() -> None:
    torch.manual_seed(0)
    pixel = RegressionTask(decoder="fcn", decoder_channels=8, target_mean=50.0, target_std=20.0,
                           backbone_kwargs=TINY_BACKBONE)
    scalar = ScalarRegressionTask(backbone="patchtst_tiny", backbone_kwargs=TINY_PATCHTST)
    target = torch.tensor([10.0, 50.0, 90.0])
    torch.testing.assert_close(pixel.normalized(target), (target - 50.0) / 20.0)
    torch.testing.assert_close(pixel.in_target_units(pixel.normalized(target)), target)
    assert "target_mean" not in pixel.state_dict()  # from the config: checkpoints keep their keys
    assert scalar.target_mean.isnan() and "target_std" in scalar.state_dict()

    class Data:
        def target_stats(self) -> tuple[float, float]:
            return 3.0, 2.0

    scalar.fill_target_stats(Data())
    torch.testing.assert_close(scalar.normalized(target), (target - 3.0) / 2.0)
    with pytest.raises(UserInputError, match="target_stats"):
        ScalarRegressionTask(backbone="patchtst_tiny", backbone_kwargs=TINY_PATCHTST).fill_target_stats(None)
    for task_class in (RegressionTask, ScalarRegressionTask):
        with pytest.raises(UserInputError, match="model.target_std must be positive, got 0"):
            task_class(target_std=0.0)


def test_model_input_reads_the_declared_entry_only() -> None:
    image, series = torch.zeros(2, 6, 4, 4), torch.zeros(2, 3, 8)
    assert model_input({"image": image, "mask": image}) is image
    assert model_input({"series": series, "target": series}, (ModelInput.SERIES,)) is series
    with pytest.raises(UserInputError, match=r"exactly one of \['points'\]"):
        model_input({"image": image}, (ModelInput.POINTS,))


def test_mae_export_writes_the_encoder_and_a_manifest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = MAEPretrainTask(decoder_dim=32, decoder_depth=1, decoder_heads=2, backbone_kwargs=TINY_BACKBONE)
    paths = export_weights(task, tmp_path)
    assert paths == {"encoder": str(tmp_path / "encoder.safetensors")}
    saved = load_file(paths["encoder"])
    expected = task.model.encoder_state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert json.loads((tmp_path / "export.json").read_text())["files"] == {"encoder": "encoder.safetensors"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_tasks_import_no_other_task_and_not_the_exporter() -> None:
    for path in TASKS.glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = imported_modules(path)
        assert "workbench.export" not in imported, path.name  # export.py depends on the tasks, not back
        tasks = {m.rsplit(".", 1)[1] for m in imported if m.startswith("workbench.tasks.")} - HELPERS
        assert not tasks, f"{path.name} imports task module(s) {tasks}"


@pytest.mark.parametrize("task_class", [SegmentationTask, RegressionTask])
def test_tasks_built_in_python_reload_from_their_checkpoint(task_class: type, tmp_path: Path) -> None:
    """``num_outputs`` is the task's own choice, not an argument saved with the hyper-parameters."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 3} if task_class is SegmentationTask else {"target_mean": 1.0, "target_std": 2.0}
    task = task_class(decoder="fcn", decoder_channels=8, backbone_kwargs=TINY_BACKBONE, **kwargs).eval()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    reloaded = task_class.load_from_checkpoint(tmp_path / "task.ckpt", weights_only=False).eval()
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image), task(image), rtol=0, atol=0)


def test_run_stats_peak_memory_is_taken_when_training_ends() -> None:
    """``results.json``'s peak is training's: memory the process takes after training ends (the
    validation and test of the best checkpoint) raises the process peak but not the recorded one.
    In a fresh process, so that 256 MiB raise its peak."""
    import subprocess
    import sys

    script = """
import json, numpy as np
from workbench.run_stats import RunStats, peak_host_mib
stats = RunStats()
stats.on_train_end(None, None)
after_training = stats.peak_mib
grown = np.ones(256 * 2**20 // 8)  # touched: resident
print(json.dumps({"at_end": after_training, "process": peak_host_mib(), "summary": stats.summary()["peak_memory_mib"]}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1])
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert peaks["process"] >= peaks["at_end"] + 200  # the process peak grew after training
    assert peaks["summary"] == round(peaks["at_end"], 1)
