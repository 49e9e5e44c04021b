"""``workbench compare``: one base config under several strategies, fractions and seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from workbench.compare.arms import BASELINES, TRIVIAL, Arm, build_arms
from workbench.compare.report import table_row, write_csv, write_markdown, write_plots
from workbench.errors import UserInputError


def parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from workbench.strategies import STRATEGIES

    p = ArgumentParser(
        prog="workbench compare",
        description="Fit one base config under a list of strategies (and training fractions and seeds), "
        "then write results.csv, results.md and plots to --output_dir. Finished arms are not re-run; an "
        "interrupted arm resumes from its last checkpoint.",
        exit_on_error=False,  # main() explains errors in one line
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with the options below")
    p.add_argument("--base_config", type=str, required=True, help="the fit config every arm runs")
    p.add_argument("--strategies", type=str, nargs="+", default=["frozen", "lora", "full"],
                   help="short names, optionally with arguments (lora:rank=4,alpha=8); known: " + ", ".join(STRATEGIES)
                   + "; baselines: " + ", ".join([*BASELINES, TRIVIAL])
                   + " (zero_shot: the pretrained model, test only; scratch: full from random init; trivial: one "
                   "constant fitted to the training targets, e.g. the majority class, scored as the arms are)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0], help="training-set fractions, e.g. 0.1 0.5 1.0")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (seed_everything) per arm")
    p.add_argument("--metric", type=str, default="mIoU", help="metric for the table and plots (val/<m>, test/<m>)")
    p.add_argument("--extra_metrics", type=str, nargs="*", default=[],
                   help="more test metrics for the table and the mean ± std summary, e.g. IoU_cloud")
    p.add_argument("--output_dir", type=str, default="runs/compare")
    p.add_argument("--fit_args", type=str, nargs="*", default=[],
                   help="extra `workbench fit` overrides for every arm, as key=value: trainer.max_epochs=2")
    return p


def arm_results(arm_dir: Path) -> dict[str, Any] | None:
    """The finished arm's ``results.json``, or None if the arm has not finished."""
    path = arm_dir / "run" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_arm(arm: Arm, base_config: str, out_dir: Path, fit_args: list[str]) -> dict[str, Any]:
    """Run one arm in its own process (its own peak memory; :meth:`Arm.process_args`), resuming
    from its last checkpoint."""
    last = out_dir / arm.name / "run" / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() else None
    args = arm.process_args(base_config, out_dir, resume, fit_args)
    print(f"workbench compare: {'resuming' if resume else 'running'} {arm.name}", flush=True)
    log = out_dir / arm.name / "fit.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        code = subprocess.call([sys.executable, *args], stdout=stream, stderr=subprocess.STDOUT)
    results = arm_results(out_dir / arm.name)
    if code != 0 or results is None:
        lines = log.read_text().splitlines(keepends=True)
        explained = [line.removeprefix("workbench: error: ").strip() for line in lines if line.startswith("workbench: error: ")]
        if explained:  # the fit's own one-line error
            raise UserInputError(f"arm {arm.name}: {explained[-1]} (log: {log})")
        raise UserInputError(f"arm {arm.name} failed (exit {code}); its log is {log}:\n{''.join(lines[-15:])}")
    return results


def run_compare(args: list[str]) -> list[dict[str, Any]]:
    """Run every arm not yet finished, then write the table and plots; returns the rows."""
    cfg = parser().parse_args(args)
    if not Path(cfg.base_config).is_file():
        raise UserInputError(f"--base_config {cfg.base_config} does not exist")
    out_dir = Path(cfg.output_dir)
    rows = []
    for arm in build_arms(cfg.strategies, cfg.fractions, cfg.seeds):
        results = arm_results(out_dir / arm.name)
        if results is None:
            results = run_arm(arm, cfg.base_config, out_dir, cfg.fit_args)
        else:
            print(f"workbench compare: {arm.name} already finished, not re-run", flush=True)
        rows.append(table_row(arm, results, cfg.metric, cfg.extra_metrics))
    write_csv(rows, out_dir / "results.csv")
    write_markdown(rows, out_dir / "results.md", cfg.metric, cfg.extra_metrics)
    plots = write_plots(rows, out_dir, cfg.metric)
    print((out_dir / "results.md").read_text())
    print(f"workbench compare: wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'}, "
          + ", ".join(str(p) for p in plots))
    return rows
