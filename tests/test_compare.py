"""`workbench compare` end to end on a tiny config: table, plots, resume without re-running."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from tests.conftest import reference_miou, split_samples, write_config
from workbench.cli import main
from workbench.compare.arms import build_arms, parse_strategy
from workbench.compare.report import seed_summary, table_row
from workbench.compare.trivial import ConstantOutput, class_logits, constant_output, target_mean
from workbench.errors import UserInputError


def test_strategy_specs_parse() -> None:
    assert parse_strategy("lora:rank=4,use_dora=true") == ("workbench.strategies.LoRA", {"rank": 4, "use_dora": True})
    assert [a.name for a in build_arms(["ssf"], [0.5, 1.0], [1])] == ["ssf-f0.5-s1", "ssf-f1-s1"]
    with pytest.raises(UserInputError, match="known: full, frozen"):
        parse_strategy("loar")
    with pytest.raises(UserInputError, match="key=value"):
        parse_strategy("lora:4")
    with pytest.raises(UserInputError, match="trivial takes no options"):
        build_arms(["trivial:rank=4"], [1.0], [0])


def test_compare_writes_table_and_plots_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "compare"
    args = ["compare", "--base_config", str(config), "--strategies", "frozen", "bitfit",
            "--fractions", "0.5", "1.0", "--output_dir", str(out), "--fit_args", "trainer.max_epochs=1"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["strategy"], r["fraction"]) for r in rows] == [
        ("frozen", "0.5"), ("frozen", "1.0"), ("bitfit", "0.5"), ("bitfit", "1.0")]
    frozen, bitfit = rows[1], rows[3]
    assert int(frozen["backbone_trainable"]) == 0 < int(bitfit["backbone_trainable"])
    assert int(bitfit["trainable"]) > int(frozen["trainable"]) and frozen["total"] == bitfit["total"]
    for row in rows:
        assert float(row["test"]) == pytest.approx(reference_miou(row["checkpoint"], config), abs=5e-5)  # 4 decimals
        assert float(row["step_time_s"]) > 0
        assert float(row["peak_memory_mib"]) > 0 and Path(row["checkpoint"]).is_file()
    assert "| frozen | 0.5 |" in (out / "results.md").read_text()
    for plot in ("metric_vs_params.png", "metric_vs_fraction.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # finished arms are not re-run; an arm without results resumes from its last checkpoint
    (out / "bitfit-f1-s0" / "run" / "results.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 3
    assert "resuming bitfit-f1-s0" in printed
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4


def test_seed_summary_averages_seeds() -> None:
    rows = [{"strategy": "lora", "fraction": 1.0, "test": t} for t in (0.5, 0.7)]
    lines = seed_summary(rows + [{"strategy": "full", "fraction": 1.0, "test": 0.9}], "accuracy")
    assert "| lora | 1.0 | 2 | 0.6000 | 0.1414 |" in lines and "| full | 1.0 | 1 | 0.9000 | – |" in lines
    assert seed_summary(rows[:1], "accuracy") == []  # one seed per arm: no summary


def test_baseline_arms() -> None:
    """zero_shot runs once (fraction 0, no training whatever the comparison's overrides say);
    scratch is full fine-tuning from random weights; bracketed lists survive the spec parser."""
    arms = build_arms(["zero_shot", "scratch", "lora:rank=4,target_modules=[a,b]"], [0.5, 1.0], [0, 1])
    assert [(a.strategy, a.fraction, a.seed) for a in arms][:3] == [
        ("zero_shot", 0.0, 0), ("scratch", 0.5, 0), ("scratch", 0.5, 1)]
    assert len(arms) == 1 + 4 + 4
    zero_shot, scratch, lora = arms[0], arms[1], arms[-1]
    args = zero_shot.fit_args("base.yaml", Path("out"), None, ["trainer.max_epochs=3"])
    assert args.index("--trainer.max_epochs=0") > args.index("--trainer.max_epochs=3")
    assert "--data.init_args.train_fraction=1.0" in args and zero_shot.class_path == "workbench.strategies.Frozen"
    assert scratch.class_path == "workbench.strategies.Full"
    assert "--model.init_args.pretrained=null" in scratch.fit_args("base.yaml", Path("out"), None)
    assert lora.init_args == {"rank": 4, "target_modules": ["a", "b"]}
    results = {"trainable": 10, "total": 20, "backbone_trainable": 0, "step_time_s": 0.1,
               "val": {"val/mIoU": 0.5}, "test": {"test/mIoU": 0.4, "test/IoU_cloud": 0.3}}
    row = table_row(zero_shot, results, "IoU_cloud", ["mIoU"])
    assert (row["trainable"], row["step_time_s"], row["test"], row["test mIoU"]) == (0, None, 0.3, 0.4)
    assert table_row(scratch, results, "mIoU")["trainable"] == 10


def test_class_logits_closed_form() -> None:
    """Log class frequencies (ignore_index not counted; argmax the majority class) and per-label
    log-odds (a label predicted where more than half the samples carry it)."""
    masks = [torch.tensor([[0, 1, 1], [255, 1, 2]]), torch.tensor([[1, 0, 255]])]
    logits = class_logits(masks, 3, multi_label=False)
    assert torch.allclose(logits.exp(), torch.tensor([2 / 7, 4 / 7, 1 / 7]))
    labels = [torch.tensor([[1, 0, 1], [1, 0, 0]]), torch.tensor([[1, 1, 0]])]
    logits = class_logits(labels, 3, multi_label=True)
    assert torch.allclose(logits.sigmoid(), torch.tensor([1.0 - 1e-9, 1 / 3, 1 / 3]), atol=1e-6)
    assert (logits > 0).tolist() == [True, False, False]
    with pytest.raises(UserInputError, match="no labelled sample"):
        class_logits([torch.full((2, 2), 255)], 3, multi_label=False)


def test_target_mean_and_constant_shapes() -> None:
    """The mean of the labelled (finite) training targets; the constant takes each target's shape."""
    targets = [torch.tensor([[1.0, float("nan")], [3.0, 4.0]]), torch.tensor([[float("nan"), 8.0]])]
    assert target_mean(targets).item() == pytest.approx((1 + 3 + 4 + 8) / 4)
    value = torch.tensor([0.5, -1.0, 2.0])
    dense = ConstantOutput(value, "mask")({"mask": torch.zeros(2, 5, 7, dtype=torch.long)})
    assert dense.shape == (2, 3, 5, 7) and torch.equal(dense[1, :, 4, 6], value)
    assert ConstantOutput(value, "label")({"label": torch.zeros(4, dtype=torch.long)}).shape == (4, 3)
    assert ConstantOutput(value, "label", per_sample=True)({"label": torch.zeros(4, 3)}).shape == (4, 3)
    with pytest.raises(UserInputError, match="not object"):
        constant_output(object(), [])


def test_trivial_arm_scores_the_training_majority_class(tmp_path: Path) -> None:
    """The ``trivial`` arm's val and test mIoU are those of the training split's majority class
    predicted everywhere, computed here from the split's masks; the plot draws it as a line."""
    config = write_config(tmp_path)
    out = tmp_path / "compare"
    assert main(["compare", "--base_config", str(config), "--strategies", "trivial", "--seeds", "3", "4",
                 "--output_dir", str(out)]) == 0
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    assert (row["strategy"], row["seed"], row["trainable"], row["checkpoint"]) == ("trivial", "3", "0", "")
    train = torch.cat([s["mask"].flatten() for s in split_samples(config, "train")])
    majority = int(torch.bincount(train[train != 255]).argmax())
    for split, column in (("val", "best_val"), ("test", "test")):
        masks = torch.stack([s["mask"] for s in split_samples(config, split)])
        expected = MulticlassJaccardIndex(2, ignore_index=255)(torch.full_like(masks, majority), masks).item()
        assert float(row[column]) == pytest.approx(expected, abs=5e-5)  # 4 decimals in the table
    assert (out / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
