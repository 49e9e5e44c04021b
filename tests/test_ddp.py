"""Two-process DDP (gloo, CPU) through the CLI: same outputs as a single-process run, no hang;
the FSDP config as far as a CPU can check it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml

from tests.conftest import fit_run, write_classification_config

ROOT = Path(__file__).resolve().parents[1]


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of ``run``'s last checkpoint."""
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.timeout(300)
def test_two_process_ddp_fit_matches_one_process(tmp_path: Path) -> None:
    """Two gloo processes of 2 chips a step against one process of 4, same seed: the same global
    batches (Lightning deals each step's 4 chips out to the ranks), so the same weights after two
    epochs. Dropout and augmentation are off (each rank would draw its own); the scene classifier
    has no BatchNorm (per-rank batch statistics differ from one process's by design). Without the
    gradient all-reduce each rank would step on its own half of the batch and the weights split."""
    frozen_randomness = {"model": {"head_dropout": 0.0}, "trainer": {"max_epochs": 2}}
    one = write_classification_config(tmp_path / "one", data={"batch_size": 4, "augment": False}, **frozen_randomness)
    _, one_results = fit_run(one)
    two = write_classification_config(tmp_path / "two", data={"batch_size": 2, "augment": False}, **frozen_randomness)
    cmd = [sys.executable, "-m", "workbench.cli", "fit", "--config", str(two), "--trainer",
           str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # two processes really ran
    runs = {name: tmp_path / name / "runs" / "tiny" / "version_0" for name in ("one", "two")}
    weights = {name: last_weights(run) for name, run in runs.items()}
    assert weights["one"].keys() == weights["two"].keys()
    lora_b = [v for k, v in weights["one"].items() if "lora_B" in k]
    assert lora_b and all(v.any() for v in lora_b)  # LoRA's B starts at zero: the compared weights were trained
    for key in weights["one"]:
        torch.testing.assert_close(weights["two"][key], weights["one"][key], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, key=key: f"{key}: {m}")
    two_results = json.loads((runs["two"] / "results.json").read_text())
    assert two_results["test"]["test/accuracy"] == pytest.approx(one_results["test"]["test/accuracy"])
    assert (runs["two"] / "export" / "merged.safetensors").is_file()
    assert not (tmp_path / "two" / "runs" / "tiny" / "version_1").exists()  # one run, not one per rank


@pytest.mark.timeout(300)
def test_two_process_ddp_fit_of_a_data_driven_strategy(tmp_path: Path) -> None:
    """SPT chooses the entries that train from the first training batches, and how many per weight
    (so the parameter shapes) depends on them. Both ranks initialise from rank 0's batches, so they
    choose alike: DDP, which checks that every rank's parameters have the same shapes, starts, and
    the two ranks report the same choice."""
    spt = {"class_path": "workbench.strategies.SPT", "init_args": {"budget": 0.01, "rank": 2, "batches": 2}}
    config = write_classification_config(tmp_path, data={"batch_size": 2, "augment": False},
                                         model={"strategy": spt}, trainer={"max_epochs": 1})
    cmd = [sys.executable, "-m", "workbench.cli", "fit", "--config", str(config), "--trainer",
           str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--test_after_fit", "false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # two processes really ran
    assert (done.stdout + done.stderr).count("workbench: spt initialized from 2 training batches") == 2


def fsdp_config() -> tuple[dict, Any]:
    """``configs/trainer/fsdp.yaml``'s settings and the strategy its ``strategy`` section builds."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    settings = yaml.safe_load((ROOT / "configs" / "trainer" / "fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    return settings, parser.instantiate_classes(parser.parse_object({"strategy": settings["strategy"]})).strategy


def test_fsdp_config_shards_every_block_of_every_family() -> None:
    """Lightning refuses FSDP on CPU, so the config is checked as far as a CPU can: it builds
    Lightning's FSDPStrategy, whose wrap policy covers each block of each backbone family."""
    from lightning.pytorch.strategies import FSDPStrategy

    from tests.test_modalities import TINY
    from workbench.strategies.blocks import transformer_blocks

    _, strategy = fsdp_config()
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    wrapped = tuple(strategy.kwargs["auto_wrap_policy"]._module_classes)
    for name, (kwargs, _) in TINY.items():
        blocks = transformer_blocks(timm.create_model(name, **kwargs))
        assert blocks and all(isinstance(b, wrapped) for b in blocks), name


def test_fsdp_config_keeps_batch_and_buffers_in_float32() -> None:
    """Under FSDP, bf16-mixed computes in bf16 by autocast as on one device, with the batch and
    buffers (regression targets, normalisation statistics, dates) left in float32: Lightning's own
    FSDP policy for that precision would cast them all to bfloat16."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    settings, strategy = fsdp_config()
    plugin = FSDPPrecision(settings["precision"])
    strategy.precision_plugin = plugin
    lightning_policy = plugin.mixed_precision_config
    assert (lightning_policy.param_dtype, lightning_policy.buffer_dtype) == (torch.bfloat16, torch.bfloat16)
    policy = strategy.mixed_precision_config  # what FSDP is given
    assert (policy.param_dtype, policy.buffer_dtype, policy.reduce_dtype) == (None, None, None)
    assert isinstance(plugin.forward_context(), torch.autocast)
