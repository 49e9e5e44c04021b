"""End-to-end: the `workbench` command as a user runs it, on generated GeoTIFF chips."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import TINY_BACKBONE, majority_class_miou, write_config
from workbench import cli, help_cache
from workbench.cli import COMMANDS, main


def epoch_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]


def test_help_is_fast_and_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "workbench.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fit" in out.stdout and "stats" in out.stdout
    assert "torch" not in out.stderr.split(), "workbench --help imported torch"


def test_command_help_is_cached_without_importing_torch(tmp_path: Path) -> None:
    def help_of(command: str, cache: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "workbench.cli", command, "--help"],
                              capture_output=True, text=True, check=True, env={**os.environ, "WORKBENCH_CACHE": str(cache)})

    built, cached = help_of("fit", tmp_path / "a"), help_of("fit", tmp_path / "a")
    assert "torch" in built.stderr.split()  # the first call builds the help from the classes
    assert "--trainer.max_epochs" in built.stdout and cached.stdout == built.stdout
    assert "torch" not in cached.stderr.split(), "the cached help imported torch"
    # `workbench --cache-help` (the install line) builds every command's help in one process, as
    # each command's first --help in its own process would
    subprocess.run([sys.executable, "-m", "workbench.cli", "--cache-help"], capture_output=True, check=True,
                   env={**os.environ, "WORKBENCH_CACHE": str(tmp_path / "b")})
    warmed = help_of("fit", tmp_path / "b")
    assert "torch" not in warmed.stderr.split(), "fit --help was not cached by --cache-help"
    assert warmed.stdout == built.stdout
    assert len(list((tmp_path / "b" / "help").iterdir())) == len(COMMANDS)


def test_cache_help_names_a_cache_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE", str(not_a_folder))
    monkeypatch.setattr(cli, "COMMANDS", ("merge",))  # one quick command is enough
    assert main(["--cache-help"]) == 2
    assert capsys.readouterr().err.strip() == (f"workbench: error: could not write the help cache in "
                                               f"{not_a_folder / 'help'}: set WORKBENCH_CACHE to a writable folder")


def test_help_cache_is_rebuilt_when_a_library_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert main(["merge", "--help"]) == 0
    built = capsys.readouterr().out
    (entry,) = (tmp_path / "help").iterdir()
    assert entry.read_text() == built and "--checkpoints" in built
    entry.write_text("from the cache\n")
    main(["merge", "--help"])
    assert capsys.readouterr().out == "from the cache\n"
    monkeypatch.setattr(help_cache, "LIBRARIES", (*help_cache.LIBRARIES, "pytest"))  # as if a version changed
    main(["merge", "--help"])
    assert capsys.readouterr().out == built
    with pytest.raises(SystemExit):  # help with other arguments is built by argparse, never cached
        main(["merge", "--checkpoints", "a.ckpt", "--help"])
    assert capsys.readouterr().out == built and len(list((tmp_path / "help").iterdir())) == 2


def test_fit_lowers_loss_tests_and_exports(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert main(["fit", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    losses = epoch_losses(run_dir)
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    results = yaml.safe_load((run_dir / "results.json").read_text())
    assert results["test"]["test/mIoU"] > majority_class_miou(config)  # learnt the bands, not the class prior
    assert "lora" in results["strategy"]
    # the export holds the best checkpoint's weights, read from its file
    best = torch.load(results["best_checkpoint"], weights_only=False)["state_dict"]
    adapter = load_file(run_dir / "export" / "adapter.safetensors")
    assert adapter and all(torch.equal(value, best[f"model.{key}"]) for key, value in adapter.items())
    assert (run_dir / "export" / "merged.safetensors").is_file()
    # resume from the last checkpoint and train two more epochs: the run folder continues
    last = run_dir / "checkpoints" / "last.ckpt"
    assert main(["fit", "--config", str(config), "--trainer.max_epochs", "8",
                 "--ckpt_path", str(last), "--test_after_fit", "false"]) == 0
    resumed = epoch_losses(run_dir)
    assert len(resumed) == 8 and resumed[:6] == losses
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()


@pytest.mark.parametrize(
    ("section", "change", "where", "typo", "meant"),
    [
        ("model", {"decoder_chanels": 16}, "model.init_args", "decoder_chanels", "decoder_channels"),
        ("model", {"strategy": {"class_path": "workbench.strategies.LoRA", "init_args": {"rnak": 4}}},
         "model.init_args.strategy.init_args", "rnak", "rank"),
        ("model", {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lrr": 1e-3}}},
         "model.init_args.optimizer.init_args", "lrr", "lr"),
        ("data", {"batch_sise": 4}, "data.init_args", "batch_sise", "batch_size"),
        ("trainer", {"max_epoch": 1}, "trainer", "max_epoch", "max_epochs"),
    ],
)
def test_config_typo_is_one_line_naming_key_section_and_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture, section: str, change: dict, where: str, typo: str, meant: str) -> None:
    config = write_config(tmp_path, **{section: change})
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"workbench: error: unknown key '{typo}' in {where} (")
    assert "\n" not in err and err.endswith(f"did you mean '{meant}'?")


def test_config_typo_in_a_compare_arm_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, trainer={"max_epoch": 1})
    args = ["compare", "--base_config", str(config), "--strategies", "frozen", "--output_dir", str(tmp_path / "cmp")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("workbench: error: arm frozen-f1-s0: unknown key 'max_epoch' in trainer")
    assert "did you mean 'max_epochs'?" in err


def test_backbone_kwarg_typo_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, model={"backbone_kwargs": {**TINY_BACKBONE, "num_frame": 1}})
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "num_frame" in err and "num_frames" in err


@pytest.mark.parametrize("trainer", [
    {"accelerator": "cpu", "devices": -1},
    pytest.param({"accelerator": "gpu"}, marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_trainer_settings_the_machine_refuses_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            trainer: dict) -> None:
    """Lightning's accelerator connector refusing the trainer settings (devices -1 on the CPU, a GPU
    on a machine without one) is one line naming the settings, not a traceback."""
    config = write_config(tmp_path, trainer=trainer)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("workbench: error: ") and "check trainer.accelerator, devices, strategy" in err


def test_missing_pretrained_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, model={"pretrained": str(tmp_path / "nope.pt")})
    assert main(["fit", "--config", str(config)]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_checkpoint_from_other_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import timm
    import torch

    import backbones  # noqa: F401

    other = timm.create_model("prithvi_eo_v2_tiny_tl", **{**TINY_BACKBONE, "embed_dim": 96})
    ckpt = tmp_path / "other.pt"
    torch.save({f"encoder.{k}": v for k, v in other.state_dict().items()}, ckpt)
    config = write_config(tmp_path, model={"pretrained": str(ckpt)})
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "other.pt" in err and "96" in err


def test_stats_command_writes_band_stats(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "stats.json"
    assert main(["stats", "--config", str(config), "--out", str(out)]) == 0
    stats = yaml.safe_load(out.read_text())
    assert len(stats["mean"]) == 6 and len(stats["std"]) == 6
    assert all(s > 0 for s in stats["std"])
    fit_only = {**yaml.safe_load(config.read_text()), "auto_precision": True, "test_after_fit": False}
    (tmp_path / "fit_only.yaml").write_text(yaml.safe_dump(fit_only))  # a fit's own options are ignored
    again = tmp_path / "again.json"
    assert main(["stats", "--config", str(tmp_path / "fit_only.yaml"), "--out", str(again)]) == 0
    assert yaml.safe_load(again.read_text()) == stats


def test_data_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, data={"file_bands": ["B", "G", "R", "N"], "bands": ["B", "G", "R", "N"],
                                          "mean": [0.5] * 4, "std": [0.25] * 4})
    assert main(["fit", "--config", str(config)]) == 2
    assert "has 6 bands but 4 are expected" in capsys.readouterr().err
    config = write_config(tmp_path)
    masks = sorted((tmp_path / "chips" / "masks").glob("*.tif"))
    for mask in masks:
        with rasterio.open(mask, "r+") as dst:
            dst.write(np.full((1, 32, 32), 9, np.uint8))
    assert main(["fit", "--config", str(config), "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert any(mask.name in err for mask in masks) and "[9]" in err
