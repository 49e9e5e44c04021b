"""Time series: .ts parsing, datamodules, PatchTST and the four series tasks through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from backbones.patchtst import num_patches
from datamodules.series import ForecastingDataModule, UCRDataModule, fill_gaps, read_ts
from backbones.layers import instance_normalize
from heads.series import PatchReconstructionHead
from tests.conftest import direct_outputs, fit_run, split_samples, write_task_config
from workbench.cli import main
from workbench.errors import UserInputError
from workbench.tasks.series_imputation import sample_gaps

TINY_PATCHTST = {"context_length": 48, "patch_len": 8, "stride": 4}


def write_ts(path: Path, series: np.ndarray, labels: list, header: str) -> Path:
    """A UCR/UEA .ts file of ``series`` ``(n, M, L)``; NaN written as ``?``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [":".join(",".join("?" if np.isnan(v) else f"{v:.5f}" for v in dim) for dim in s) + f":{y}"
            for s, y in zip(series, labels)]
    path.write_text(f"# written by the tests\n@problemName tiny\n{header}\n@data\n" + "\n".join(rows) + "\n")
    return path


def two_class_series(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Class ``up``: a rising ramp plus noise; ``down``: a falling one. 2 channels, 48 steps."""
    rng = np.random.default_rng(seed)
    labels = ["up" if i % 2 else "down" for i in range(n)]
    ramp = np.linspace(-1, 1, 48)
    series = np.stack([np.stack([(1 if y == "up" else -1) * ramp, rng.normal(0, 1, 48)]) for y in labels])
    return (series + rng.normal(0, 0.3, series.shape)).astype(np.float32), labels


def make_ucr(root: Path, name: str = "Ramps") -> Path:
    for part, n, seed in (("TRAIN", 40, 0), ("TEST", 20, 1)):
        series, labels = two_class_series(n, seed)
        write_ts(root / name / f"{name}_{part}.ts", series, labels, "@classLabel true down up")
    return root


def test_read_ts_classes_targets_missing_and_unequal_lengths(tmp_path: Path) -> None:
    series, labels = two_class_series(4)
    data = read_ts(write_ts(tmp_path / "a.ts", series, labels, "@classLabel true down up"))
    assert data.values.shape == (4, 2, 48) and data.classes == labels and data.class_names == ["down", "up"]
    np.testing.assert_allclose(data.values, series, atol=1e-5)
    path = tmp_path / "b.ts"
    path.write_text("@problemName r\n@targetLabel true\n@data\n1,2,?,4:0.5\n5,6:1.5\n")
    reg = read_ts(path)
    np.testing.assert_array_equal(reg.values[:, 0], [[1, 2, 2, 4], [5, 6, 6, 6]])  # gaps and padding filled
    np.testing.assert_array_equal(reg.targets, [0.5, 1.5])
    assert np.array_equal(fill_gaps(np.array([[[np.nan, 3.0, np.nan]]])), [[[3.0, 3.0, 3.0]]])
    bad = tmp_path / "c.ts"
    bad.write_text("@classLabel true a b\n@data\n1,2:c\n")
    with pytest.raises(UserInputError, match=r"labels \['c'\] are not in the @classLabel list"):
        read_ts(bad)


def test_ucr_datamodule_splits_stratified_and_normalizes(tmp_path: Path) -> None:
    dm = UCRDataModule("Ramps", root=str(make_ucr(tmp_path)), val_fraction=0.25, batch_size=8, train_fraction=0.5)
    dm.setup("fit")
    dm.setup("test")
    assert dm.class_names == ["down", "up"] and dm.num_classes == 2 and dm.bands == ["dim_0", "dim_1"]
    split = dm.train_val_indices
    assert not set(split["train"]) & set(split["val"]) and len(split["val"]) == 10 and len(split["train"]) == 15
    val_labels = [int(dm.dataset("val")[i]["label"]) for i in range(10)]
    assert sorted(val_labels) == [0] * 5 + [1] * 5  # stratified
    train = torch.stack([dm.dataset("train")[i]["series"] for i in range(15)])
    torch.testing.assert_close(train.mean((0, 2)), torch.zeros(2), atol=1e-4, rtol=0)
    assert len(dm.dataset("test")) == 20
    with pytest.raises(UserInputError, match="not shipped in aeon"):
        UCRDataModule("NoSuchProblem")


def test_forecasting_windows_split_by_time(tmp_path: Path) -> None:
    t = np.arange(200)
    path = tmp_path / "table.csv"
    with path.open("w") as f:
        f.write("date,a,b\n" + "".join(f"d{i},{np.sin(i / 5):.4f},{i}\n" for i in t))
    dm = ForecastingDataModule(str(path), context_length=24, horizon=6, split_ratios=(0.6, 0.2, 0.2))
    assert dm.bands == ["a", "b"]  # the date column is not a channel
    pd.read_csv(path).to_parquet(tmp_path / "table.parquet")
    parquet = ForecastingDataModule(str(tmp_path / "table.parquet"), context_length=24, horizon=6,
                                    split_ratios=(0.6, 0.2, 0.2))
    torch.testing.assert_close(parquet.table, dm.table)
    sample = dm.dataset("val")[0]
    assert sample["series"].shape == (2, 24) and sample["target"].shape == (2, 6)
    first_val_target_step = int(sample["target"][1, 0])
    assert first_val_target_step == 120  # the forecast starts in the val block
    last_train_target = int(dm.dataset("train")[len(dm.ends["train"]) - 1]["target"][1, -1])
    assert last_train_target < 120  # no training target reaches into val
    too_long = ForecastingDataModule(str(path), context_length=24, horizon=60)  # reads nothing yet
    with pytest.raises(UserInputError, match="no val/test window"):
        too_long.setup("fit")


def test_patchtst_patches_channels_independently() -> None:
    torch.manual_seed(0)
    model = timm.create_model("patchtst_tiny", **TINY_PATCHTST).eval()
    series = torch.randn(2, 3, 40)
    (features,) = model.forward_intermediates(series)
    assert features.shape == (2, 64, 3, num_patches(40, 8, 4))
    changed = series.clone()
    changed[:, 1] += 5.0
    (after,) = model.forward_intermediates(changed)
    torch.testing.assert_close(after[:, :, [0, 2]], features[:, :, [0, 2]])  # channels never mix
    assert not torch.allclose(after[:, :, 1], features[:, :, 1])
    with pytest.raises(UserInputError, match="context_length"):
        model.forward_intermediates(torch.randn(1, 1, 60))


def test_reconstruction_head_and_instance_norm() -> None:
    head = PatchReconstructionHead(16, patch_len=8, stride=4)
    assert head(torch.randn(2, 16, 3, num_patches(37, 8, 4)), 37).shape == (2, 3, 37)
    series = torch.randn(2, 3, 30) * 4 + 7
    observed = sample_gaps(series.shape, 0.3, 5, torch.Generator().manual_seed(0)).expand_as(series)
    assert 0.15 < (~observed).float().mean() < 0.45
    normalized, mean, std = instance_normalize(series, observed)
    assert torch.all(normalized[~observed] == 0)
    torch.testing.assert_close((normalized * std + mean)[observed], series[observed], atol=1e-4, rtol=1e-4)


def amplitude_regression(root: Path) -> dict:
    """Sines of random amplitude with the amplitude as the target (UCR regression ``.ts`` files)."""
    for part, n, seed in (("TRAIN", 40, 0), ("TEST", 20, 1)):
        rng = np.random.default_rng(seed)
        amplitude = rng.uniform(1, 3, n)
        series = amplitude[:, None, None] * np.sin(np.linspace(0, 6, 48))[None, None] + rng.normal(0, 0.05, (n, 1, 48))
        write_ts(root / "Amp" / f"Amp_{part}.ts", series, [f"{a:.4f}" for a in amplitude], "@targetLabel true")
    return {"class_path": "datamodules.UCRDataModule",
            "init_args": {"name": "Amp", "root": str(root), "batch_size": 8, "normalize": False}}


def series_model(task: str, strategy: str = "LoRA", **init: object) -> dict:
    return {"class_path": f"workbench.tasks.{task}", "init_args": {
        "backbone": "patchtst_tiny", "backbone_kwargs": dict(TINY_PATCHTST), **init,
        "strategy": {"class_path": f"workbench.strategies.{strategy}"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}}}


def test_series_classification_fits_through_the_cli(tmp_path: Path) -> None:
    data = {"class_path": "datamodules.UCRDataModule",
            "init_args": {"name": "Ramps", "root": str(make_ucr(tmp_path / "ucr")), "batch_size": 8}}
    config = write_task_config(tmp_path, series_model("ClassificationTask"), data, "val/accuracy", "max", 8)
    losses, results = fit_run(config)
    assert losses[-1] < losses[0]
    assert results["test"]["test/accuracy"] >= 0.8  # the ramp direction is easy to see
    assert results["strategy"] == "lora" and 0 < results["backbone_trainable"] < results["backbone_total"]


def test_forecasting_imputation_and_scalar_regression_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = np.arange(300)
    table = tmp_path / "table.csv"
    with table.open("w") as f:
        f.write("x\n" + "".join(f"{np.sin(2 * np.pi * i / 12) + 0.01 * i:.4f}\n" for i in t))
    forecasting = {"class_path": "datamodules.ForecastingDataModule",
                   "init_args": {"path": str(table), "context_length": 48, "horizon": 12, "batch_size": 16}}
    model = series_model("ForecastingTask", "Full", context_length=48, horizon=12)
    losses, results = fit_run(write_task_config(tmp_path / "f", model, forecasting, "val/MAE"))
    assert losses[-1] < losses[0]
    assert results["test"]["test/MAE"] < results["test"]["test/naive_MAE"]  # beats repeating the last value

    model = series_model("ForecastingTask", context_length=24, horizon=12)
    config = write_task_config(tmp_path / "bad", model, forecasting, "val/MAE")
    assert main(["fit", "--config", str(config)]) == 2
    assert "context_length is 24 but data.init_args.context_length is 48" in capsys.readouterr().err

    ucr = {"class_path": "datamodules.UCRDataModule",
           "init_args": {"name": "Ramps", "root": str(make_ucr(tmp_path / "ucr")), "batch_size": 8}}
    model = series_model("SeriesImputationTask", "Full", mask_ratio=0.25, span=4)
    losses, results = fit_run(write_task_config(tmp_path / "i", model, ucr, "val/MAE"))
    assert losses[-1] < losses[0] and {"test/MAE", "test/mean_fill_MAE"} <= set(results["test"])

    root = tmp_path / "reg"
    data = amplitude_regression(root)
    losses, results = fit_run(write_task_config(tmp_path / "r", series_model("ScalarRegressionTask", "Full"),
                                                data, "val/RMSE"))
    assert losses[-1] < losses[0] and {"test/RMSE", "test/R2"} <= set(results["test"])
    ckpt = torch.load(results["best_checkpoint"], weights_only=True)
    assert float(ckpt["state_dict"]["target_std"]) == pytest.approx(float(np.std(
        [float(line.rsplit(":", 1)[1]) for line in (root / "Amp" / "Amp_TRAIN.ts").read_text().splitlines()[4:]]
    )), rel=0.3)  # taken from the training targets and saved with the model


def test_compare_runs_on_time_series(tmp_path: Path) -> None:
    data = {"class_path": "datamodules.UCRDataModule",
            "init_args": {"name": "Ramps", "root": str(make_ucr(tmp_path / "ucr")), "batch_size": 8}}
    config = write_task_config(tmp_path, series_model("ClassificationTask"), data, "val/accuracy", "max")
    out = tmp_path / "compare"
    assert main(["compare", "--base_config", str(config), "--strategies", "frozen", "lora", "full",
                 "--metric", "accuracy", "--output_dir", str(out), "--fit_args", "trainer.max_epochs=2"]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"frozen", "lora", "full"}
    assert int(rows["frozen"]["backbone_trainable"]) == 0 < int(rows["lora"]["backbone_trainable"])
    assert int(rows["lora"]["backbone_trainable"]) < int(rows["full"]["backbone_trainable"])
    for row in rows.values():  # each arm's test accuracy is that of its checkpoint, run here
        logits, labels = direct_outputs(row["checkpoint"], config)
        assert float(row["test"]) == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)


def test_trivial_arm_predicts_the_training_mean(tmp_path: Path) -> None:
    """``compare --strategies trivial`` on a scalar regression whose target statistics come from the
    data: its test RMSE and R² are those of the training split's mean, computed here."""
    config = write_task_config(tmp_path, series_model("ScalarRegressionTask", "Full"),
                               amplitude_regression(tmp_path / "reg"), "val/RMSE")
    out = tmp_path / "compare"
    assert main(["compare", "--base_config", str(config), "--strategies", "trivial", "--metric", "RMSE",
                 "--extra_metrics", "R2", "--output_dir", str(out)]) == 0
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    mean = torch.stack([s["target"] for s in split_samples(config, "train")]).double().mean()
    test = torch.stack([s["target"] for s in split_samples(config, "test")]).double()
    assert float(row["test"]) == pytest.approx((test - mean).square().mean().sqrt().item(), abs=5e-5)
    assert float(row["test R2"]) == pytest.approx(1 - ((test - mean).square().sum() / (test - test.mean()).square().sum()).item(), abs=5e-5)
