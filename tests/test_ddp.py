"""Two-process DDP (gloo, CPU) through the CLI: same outputs as a single-process run, no hang;
the FSDP config as far as a CPU can check it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

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


def test_fsdp_config_shards_every_block_of_every_family() -> None:
    """Lightning refuses FSDP on CPU, so the config is checked as far as a CPU can: it builds
    Lightning's FSDPStrategy, whose wrap policy covers each block of each backbone family."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from tests.test_modalities import TINY
    from workbench.strategies.blocks import transformer_blocks

    settings = yaml.safe_load((ROOT / "configs" / "trainer" / "fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": settings["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    wrapped = tuple(strategy.kwargs["auto_wrap_policy"]._module_classes)
    for name, (kwargs, _) in TINY.items():
        blocks = transformer_blocks(timm.create_model(name, **kwargs))
        assert blocks and all(isinstance(b, wrapped) for b in blocks), name
