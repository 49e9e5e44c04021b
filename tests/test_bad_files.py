"""A corrupt or truncated GeoTIFF in a dataset: reported by path, then skipped or failing per
``data.bad_files`` — never a hang, never a deep traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import fit_run, reference_miou, write_config
from workbench.cli import main


def corrupt(tmp_path: Path) -> tuple[Path, Path]:
    """Chip 3 truncated to its first 1 kB (header readable, pixels not); chip 5 not a TIFF at all."""
    images = tmp_path / "chips" / "images"
    truncated, garbage = images / "chip_003.tif", images / "chip_005.tif"
    truncated.write_bytes(truncated.read_bytes()[:1024])
    garbage.write_bytes(b"this is not a GeoTIFF" * 10)
    return truncated, garbage


def test_bad_files_fail_with_their_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 1})
    truncated, garbage = corrupt(tmp_path)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (str(truncated) in err or str(garbage) in err) and "bad_files: skip" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("chip_size", [None, 32], ids=["whole-files", "windows"])
def test_bad_files_skipped_on_request(tmp_path: Path, chip_size: int | None, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 2}, data={"bad_files": "skip", "chip_size": chip_size})
    _, garbage = corrupt(tmp_path)
    losses, results = fit_run(config)
    assert len(losses) == 2
    assert results["test"]["test/mIoU"] == pytest.approx(reference_miou(results["best_checkpoint"], config), abs=1e-5)
    warned = " ".join(r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage())
    assert str(garbage) in warned
