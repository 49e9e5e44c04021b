"""`workbench tune`: the search-space parser, the pruning callback, and a tiny study end to end
(trials.csv and best.yaml against the SQLite study read back with Optuna; resuming runs only the
missing trials)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn

from tests.conftest import write_config
from workbench.cli import main
from workbench.compare.arms import parse_strategy
from workbench.errors import UserInputError
from workbench.tune.command import write_plots
from workbench.tune.pruning import TrialPruning
from workbench.tune.space import read_space, sample_overrides

LR = "model.init_args.optimizer.init_args.lr"
STRATEGY = "model.init_args.strategy"
RANK = "model.init_args.strategy.init_args.rank"


def write_space(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def test_space_forms_give_optuna_distributions(tmp_path: Path) -> None:
    space = read_space(write_space(tmp_path, {
        LR: "loguniform(1e-5, 1e-2)",
        "model.init_args.optimizer.init_args.weight_decay": "uniform(0, 0.1)",
        RANK: "int(4, 32, log)",
        "data.init_args.batch_size": "int(2, 8)",
        STRATEGY: "choice(frozen, lora, 'lora:rank=4,alpha=8')",
        "model.init_args.decoder_channels": "choice(16, 32)",
        "trainer.max_epochs": 2,
    }))  # fmt: skip
    dist = optuna.distributions
    assert space == {
        STRATEGY: dist.CategoricalDistribution(("frozen", "lora", "lora:rank=4,alpha=8")),
        LR: dist.FloatDistribution(1e-5, 1e-2, log=True),
        "model.init_args.optimizer.init_args.weight_decay": dist.FloatDistribution(0.0, 0.1),
        RANK: dist.IntDistribution(4, 32, log=True),
        "data.init_args.batch_size": dist.IntDistribution(2, 8),
        "model.init_args.decoder_channels": dist.CategoricalDistribution((16, 32)),
        "trainer.max_epochs": 2,
    }
    assert next(iter(space)) == STRATEGY  # sampled first: which arguments apply depends on it


@pytest.mark.parametrize("spec", [
    "loguniform(1e-5)", "loguniform(0, 1)", "uniform(a, b)", "uniform(0.5, 0.1)", "int(4, 32, lg)", "int(1.5, 3)",
    "choice()", "choice([1, 2], 3)", "choise(a, b)", "normal(0, 1)",
])  # fmt: skip
def test_bad_space_entry_names_the_key(tmp_path: Path, spec: str, capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path, {"model.init_args.decoder_channels": spec})
    with pytest.raises(UserInputError, match=r"search space key model\.init_args\.decoder_channels: .*"):
        read_space(space)
    config = write_config(tmp_path)
    assert main(["tune", "--config", str(config), "--space", str(space), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("workbench: error: search space key model.init_args.decoder_channels") and "\n" not in error


def test_misspelt_space_key_fails_in_one_line_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path)
    space = write_space(tmp_path, {"model.init_args.optimzer.init_args.lr": "loguniform(1e-4, 1e-2)"})
    out = tmp_path / "out"
    assert main(["tune", "--config", str(config), "--space", str(space), "--output_dir", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench: error:")]
    assert errors == [errors[0]] and "unknown key 'lr' in model.init_args.optimzer.init_args" in errors[0]
    assert optuna.load_study(study_name="out", storage=f"sqlite:///{out / 'study.db'}").trials == []


def test_unknown_strategy_choice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=rf"search space key {STRATEGY}: unknown strategy 'loar'; known: full"):
        read_space(write_space(tmp_path, {STRATEGY: "choice(frozen, loar)"}))


def test_strategy_arguments_apply_only_to_strategies_taking_them(tmp_path: Path) -> None:
    space = read_space(write_space(tmp_path, {STRATEGY: "choice(frozen, lora)", RANK: "int(4, 32)", LR: 0.01}))
    lora = sample_overrides(optuna.trial.FixedTrial({STRATEGY: "lora", RANK: 8}), space)
    class_path, _ = parse_strategy("lora")
    assert lora == {STRATEGY: {"class_path": class_path, "init_args": {"rank": 8}}, LR: 0.01}
    frozen_trial = optuna.trial.FixedTrial({STRATEGY: "frozen", RANK: 8})
    assert sample_overrides(frozen_trial, space) == {STRATEGY: dict(zip(("class_path", "init_args"), parse_strategy("frozen"))), LR: 0.01}
    assert RANK not in frozen_trial.params  # frozen takes no rank: not sampled


def test_pruning_callback_reports_and_prunes_below_the_median(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    finished = study.ask()
    finished.report(0.9, step=0)
    study.tell(finished, 0.9)

    def validation_end(value: float, fn: TrainerFn = TrainerFn.FITTING) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        callback = TrialPruning(storage, "s", trial._trial_id, "val/mIoU", startup_trials=1)
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/mIoU": torch.tensor(value)},
                                  state=SimpleNamespace(fn=fn))
        callback.on_validation_end(trainer, SimpleNamespace(current_epoch=0))
        return study.trials[trial.number]

    assert validation_end(0.95).intermediate_values == {0: pytest.approx(0.95)}  # above the median: goes on
    with pytest.raises(optuna.TrialPruned):
        validation_end(0.5)
    assert validation_end(0.5, TrainerFn.VALIDATING).intermediate_values == {}  # the best checkpoint's check


def test_tune_writes_table_and_best_config_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 1})
    space = write_space(tmp_path, {LR: "loguniform(1e-4, 3e-2)", STRATEGY: "choice(frozen, bitfit)"})
    out = tmp_path / "tune"
    args = ["tune", "--config", str(config), "--space", str(space), "--output_dir", str(out)]
    assert main([*args, "--n_trials", "2"]) == 0
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    first = study.trials
    assert [t.state for t in first] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in first:  # the value is the best checkpoint's validation, as the fit reported it
        results = json.loads((out / f"trial_{trial.number:04d}" / "run" / "results.json").read_text())
        assert trial.value == pytest.approx(results["val"]["val/mIoU"])
        assert trial.intermediate_values == {0: pytest.approx(trial.value)}  # the pruning callback reported epoch 0

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in first]
    for row, trial in zip(rows, first):
        assert (float(row[LR]), row[STRATEGY]) == (pytest.approx(trial.params[LR]), trial.params[STRATEGY])
        assert (float(row["value"]), row["state"]) == (pytest.approx(trial.value), "COMPLETE")
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = study.best_trial
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert best_yaml["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(best.params[LR])
    assert best_yaml["model"]["init_args"]["strategy"]["class_path"] == parse_strategy(best.params[STRATEGY])[0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(out / "best.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"] == best_yaml["model"]

    # the same command with a larger target runs only the missing trial; finished ones stay as they were
    first_results = (out / "trial_0000" / "run" / "results.json").stat().st_mtime_ns
    assert main([*args, "--n_trials", "3"]) == 0
    assert "2 of 3 trials finished, running 1" in capsys.readouterr().out
    again = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").trials
    assert len(again) == 3 and again[2].state == optuna.trial.TrialState.COMPLETE
    assert [(t.params, t.value, t.datetime_complete) for t in again[:2]] == [
        (t.params, t.value, t.datetime_complete) for t in first]
    assert (out / "trial_0000" / "run" / "results.json").stat().st_mtime_ns == first_results
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3


@pytest.mark.parametrize("values", [(0.5, 0.7, 0.6), (0.5, 0.5, 0.5)])
def test_importance_plot_only_when_complete_trials_differ(tmp_path: Path, values: tuple[float, ...]) -> None:
    """Conditional parameters (rank for lora only) plot too; equal values have no variance to share."""
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions
    for strategy, lr, value in zip(("lora", "full", "lora"), (1e-3, 1e-2, 1e-4), values):
        params, distributions = {STRATEGY: strategy, LR: lr}, {
            STRATEGY: dist.CategoricalDistribution(("lora", "full")), LR: dist.FloatDistribution(1e-4, 1e-2, log=True)}
        if strategy == "lora":
            params[RANK], distributions[RANK] = 8, dist.IntDistribution(4, 32, log=True)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    written = write_plots(study, "val/mIoU", tmp_path, len(set(values)))
    expected = ["history.png", "importance.png"][: 1 + (len(set(values)) > 1)]
    assert [p.name for p in written] == expected == sorted(p.name for p in tmp_path.glob("*.png"))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
