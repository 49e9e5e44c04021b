"""Two-process DDP (gloo, CPU) through the CLI: same outputs as a single-process run, no hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_two_process_ddp_fit_writes_the_same_outputs(tmp_path: Path) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 2})
    cmd = [sys.executable, "-m", "workbench.cli", "fit", "--config", str(config), "--trainer",
           str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # two processes really ran
    run = tmp_path / "runs" / "tiny" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert {"test/mIoU", "test/loss"} <= set(results["test"]) and 0.0 <= results["test"]["test/mIoU"] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "export" / "merged.safetensors").is_file()
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()  # one run, not one per rank
