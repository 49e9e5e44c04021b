"""``workbench tune``: an Optuna study over a fit config; each trial is one fit in its own folder."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.errors import UserInputError

def parser() -> Any:
    from jsonargparse import ArgumentParser

    from workbench.tune.space import FORMS

    p = ArgumentParser(
        prog="workbench tune",
        description="Search hyper-parameters of a fit config with Optuna (TPE sampler, median pruning). Each "
        "trial fits the config with the trial's values in --output_dir/trial_NNNN/run and is scored by --metric "
        "of its best checkpoint's validation. The study lives in --storage: re-running the same command "
        "continues it up to --n_trials finished trials. Writes trials.csv, best.yaml (the config with the best "
        "values, for `workbench fit --config`), history.png and importance.png.",
        exit_on_error=False,  # main() explains errors in one line
    )
    p.add_argument("--config", type=str, required=True, help="the fit config every trial starts from")
    p.add_argument("--space", type=str, required=True,
                   help=f"YAML file mapping dotted config keys to {FORMS}, e.g. "
                   "`model.init_args.optimizer.init_args.lr: loguniform(1e-5, 1e-2)`; "
                   "model.init_args.strategy takes strategy short names: choice(frozen, lora, full)")
    p.add_argument("--n_trials", type=int, default=20, help="finished (complete or pruned) trials to reach in total")
    p.add_argument("--output_dir", type=str, default="runs/tune", help="trial folders, trials.csv, best.yaml, plots")
    p.add_argument("--storage", type=str, default=None,
                   help="Optuna storage URL (default sqlite:///<output_dir>/study.db); give every machine the same "
                   "postgresql:// or mysql:// URL and --study_name to search together")
    p.add_argument("--study_name", type=str, default=None, help="the study in --storage (default: the output folder's name)")
    p.add_argument("--metric", type=str, default="val/mIoU", help="validation metric of the best checkpoint to optimise")
    p.add_argument("--direction", type=Literal["maximize", "minimize"], default="maximize",
                   help="maximize --metric (mIoU, accuracy) or minimize it (loss, RMSE)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--prune", type=bool, default=True, help="stop a trial whose --metric at an epoch is worse than the median of earlier "
                   "trials at that epoch (Optuna's MedianPruner)")
    p.add_argument("--startup_trials", type=int, default=5, help="finished trials before pruning starts")
    p.add_argument("--fit_args", type=str, nargs="*", default=[],
                   help="extra `workbench fit` overrides for every trial, as key=value: trainer.max_epochs=2")
    return p


def config_args(cfg: Any, overrides: dict[str, Any], overrides_file: Path) -> list[str]:
    """``workbench fit`` arguments of the config with a trial's ``overrides`` (dotted key → value),
    written as a second config file ``overrides_file`` (a misspelt key is then explained in one
    line), then ``--fit_args``."""
    from workbench.atomic import write_text

    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    write_text(overrides_file, yaml.safe_dump(nested, sort_keys=False))
    return ["fit", "--config", cfg.config, "--config", str(overrides_file), *(f"--{a.lstrip('-')}" for a in cfg.fit_args)]


def open_study(cfg: Any) -> Any:
    """Create or continue the study in ``cfg.storage``. Trials of a process that died (no heartbeat
    for two minutes) are marked failed and retried once with the same values."""
    import optuna
    import sqlalchemy

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
            storage = RDBStorage(cfg.storage, heartbeat_interval=60, heartbeat_stale_trial_callback=retry)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise UserInputError(f"--storage {cfg.storage}: cannot open it ({str(err).splitlines()[0]}); use e.g. "
                             "sqlite:///runs/tune/study.db or postgresql://user:password@host/db") from None
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        direction=cfg.direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials),
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.direction:
        raise UserInputError(f"study {cfg.study_name} in {cfg.storage} was created to {study.direction.name.lower()}; "
                             f"use that --direction or another --study_name")
    return study


def fit_args(cfg: Any, overrides: dict[str, Any], out_dir: Path, name: str, pruning: dict[str, Any] | None) -> list[str]:
    """``workbench fit`` arguments of one trial: the config, the trial's values (in
    ``<out_dir>/<name>/overrides.yaml``), ``--fit_args``, its own run folder ``<out_dir>/<name>/run``,
    one device (a trial is one process), and the pruning callback."""
    from workbench.compare.arms import run_logger_arg

    args = config_args(cfg, overrides, out_dir / name / "overrides.yaml") + [
        run_logger_arg(out_dir, name), "--trainer.devices=1", "--test_after_fit=true"]
    if pruning is not None:
        args.append(f"--trainer.callbacks+={json.dumps({'class_path': 'workbench.tune.pruning.TrialPruning', 'init_args': pruning})}")
    return args


def trial_value(results: dict[str, Any] | None, metric: str, run_dir: Path) -> float:
    """``metric`` of the best checkpoint's validation, from the trial's ``results.json``."""
    if results is None:
        raise UserInputError(f"the trial wrote no {run_dir / 'results.json'}; remove trainer.fast_dev_run from the config")
    if metric not in results["val"]:
        raise UserInputError(f"--metric {metric} is not among the validation metrics {', '.join(results['val'])}")
    return float(results["val"][metric])


def best_config(cfg: Any, overrides: dict[str, Any]) -> str:
    """The fit config with ``overrides`` applied, as ``workbench fit --print_config`` writes it."""
    from workbench.cli import run_lightning

    text = io.StringIO()
    with tempfile.TemporaryDirectory() as folder:
        args = config_args(cfg, overrides, Path(folder) / "overrides.yaml")
        try:
            with contextlib.redirect_stdout(text), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                run_lightning([*args, "--print_config"])
        except SystemExit as done:  # --print_config prints, then exits
            if done.code not in (0, None):
                raise UserInputError(f"`workbench fit --config {cfg.config} --print_config` with the values "
                                     f"{json.dumps(overrides)} failed (exit {done.code})") from None
    return text.getvalue()


def write_reports(study: Any, cfg: Any, out_dir: Path) -> list[Path]:
    """``trials.csv`` and, once a trial is complete, ``best.yaml`` and the plots (:func:`write_plots`);
    returns the files written."""
    import optuna

    from workbench.atomic import atomic_path, write_text

    table = study.trials_dataframe(attrs=("number", "params", "value", "state", "duration"))
    if table.empty:
        return []
    table["duration"] = table["duration"].dt.total_seconds().round(1)
    table = table.convert_dtypes().rename(  # integers stay integers where some trials have none
        columns={**{c: c.removeprefix("params_") for c in table.columns}, "duration": "duration_s"})
    with atomic_path(out_dir / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
    written = [out_dir / "trials.csv"]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return written
    best = study.best_trial
    write_text(out_dir / "best.yaml", f"# workbench tune: trial {best.number}, {cfg.metric} = {best.value:.4f}; "
               f"values {json.dumps(best.params)}\n" + best_config(cfg, best.user_attrs["overrides"]))
    written.append(out_dir / "best.yaml")
    return written + write_plots(study, cfg.metric, out_dir, len({t.value for t in complete}))


def write_plots(study: Any, metric: str, out_dir: Path, distinct_values: int) -> list[Path]:
    """Optuna's ``history.png`` and, when the complete trials scored ``distinct_values`` > 1 (a
    parameter's importance is its share of their variance), ``importance.png``."""
    import matplotlib
    import optuna
    from optuna.visualization import matplotlib as plots

    from workbench.atomic import atomic_path

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = {"history.png": plots.plot_optimization_history, "importance.png": plots.plot_param_importances}
    if distinct_values < 2:
        del figures["importance.png"]
        print("workbench tune: importance.png needs complete trials with different values; not written yet")
    written = []
    for name, plot in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            figure = plot(study, target_name=metric).figure
        with atomic_path(out_dir / name) as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(figure)
        written.append(out_dir / name)
    return written


def run_tune(args: list[str]) -> Any:
    """Run trials until the study has ``--n_trials`` finished ones, then write the reports;
    returns the study."""
    import optuna

    from workbench.cli import run_lightning
    from workbench.compare.command import arm_results
    from workbench.tune.space import first_overrides, read_space, sample_overrides

    cfg = parser().parse_args(args)
    if not Path(cfg.config).is_file():
        raise UserInputError(f"--config {cfg.config} does not exist")
    space = read_space(cfg.space)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.storage = cfg.storage or f"sqlite:///{out_dir / 'study.db'}"
    cfg.study_name = cfg.study_name or out_dir.resolve().name
    study = open_study(cfg)

    def objective(trial: optuna.Trial) -> float:
        overrides = sample_overrides(trial, space)
        trial.set_user_attr("overrides", overrides)
        name = f"trial_{trial.number:04d}"
        pruning = {"storage": cfg.storage, "study_name": cfg.study_name, "trial_id": trial._trial_id,
                   "monitor": cfg.metric, "startup_trials": cfg.startup_trials} if cfg.prune else None
        print(f"workbench tune: {name}: {json.dumps(trial.params)}", flush=True)
        with warnings.catch_warnings():  # Lightning warns that `args` differ from `sys.argv` (workbench tune ...)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            run_lightning(fit_args(cfg, overrides, out_dir, name, pruning))
        return trial_value(arm_results(out_dir / name), cfg.metric, out_dir / name / "run")

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # finished: count towards --n_trials
    finished = len(study.get_trials(deepcopy=False, states=states))
    missing = max(cfg.n_trials - finished, 0)
    print(f"workbench tune: study {cfg.study_name} in {cfg.storage}: {finished} of {cfg.n_trials} trials finished, "
          f"running {missing}", flush=True)
    if missing > 0:
        best_config(cfg, first_overrides(space))  # a config the space breaks fails here, in one line
    try:
        if missing > 0:
            stop_at_target = optuna.study.MaxTrialsCallback(cfg.n_trials, states=states)  # other machines count too
            study.optimize(objective, n_trials=missing, timeout=cfg.timeout, callbacks=[stop_at_target],
                           catch=(RuntimeError,))  # a diverged or out-of-memory trial fails, the study goes on
    finally:
        written = write_reports(study, cfg, out_dir)
        print("workbench tune: wrote " + ", ".join(str(p) for p in written))
    return study
