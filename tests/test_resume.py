"""Fault tolerance: a run killed mid-epoch and resumed from its last step checkpoint ends with
exactly the weights, scores and log of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import fit_run, write_config

ROOT = Path(__file__).resolve().parents[1]


def with_step_checkpoints(config: Path, save_dir: Path, crash_at: int | None = None) -> Path:
    """A copy of ``config`` logging to ``save_dir``, saving a checkpoint every 3 steps (and
    crashing at step ``crash_at``)."""
    data = yaml.safe_load(config.read_text())
    data["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    data["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "every_n_train_steps": 3, "save_top_k": -1, "filename": "step-{step}"}})
    if crash_at is not None:
        data["trainer"]["callbacks"].append({"class_path": "tests.crash.CrashAtStep", "init_args": {"step": crash_at}})
    path = save_dir / f"config{'_crash' if crash_at else ''}.yaml"
    save_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.timeout(300)
def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    base = write_config(tmp_path, trainer={"max_epochs": 3}, data={"augment": False})  # dropout stays on
    losses, uninterrupted = fit_run(with_step_checkpoints(base, tmp_path / "a"))

    crashing = with_step_checkpoints(base, tmp_path / "b", crash_at=7)
    cmd = [sys.executable, "-m", "workbench.cli", "fit", "--config", str(crashing)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 137, done.stderr[-2000:]
    checkpoints = tmp_path / "b" / "tiny" / "version_0" / "checkpoints"
    step6 = checkpoints / "step-step=6.ckpt"
    assert step6.is_file() and not (checkpoints / "step-step=9.ckpt").exists()
    assert torch.load(step6, weights_only=False)["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1

    resumed_losses, resumed = fit_run(with_step_checkpoints(base, tmp_path / "b"), "--ckpt_path", str(step6))
    # the run folder continues: epoch 0's logged row is kept and epoch 2 matches; epoch 1's training
    # average covers only the batches after the resume (Lightning does not checkpoint running averages)
    assert len(resumed_losses) == 3 and resumed_losses[0] == losses[0] and resumed_losses[2] == losses[2]
    assert (checkpoints.parent / "metrics.before-resume-step6.csv").is_file()  # the killed run's log, kept
    final = {name: torch.load(Path(r["best_checkpoint"]).with_name("last.ckpt"), weights_only=False)["state_dict"]
             for name, r in (("a", uninterrupted), ("b", resumed))}
    assert final["a"].keys() == final["b"].keys()
    for key in final["a"]:
        torch.testing.assert_close(final["b"][key], final["a"][key], rtol=0, atol=0, msg=key)
    assert resumed["test"] == uninterrupted["test"] and resumed["val"] == uninterrupted["val"]
