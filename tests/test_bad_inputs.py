"""Bad inputs end in one ``workbench: error:`` line naming the file and the fix (exit 2, no
traceback): corrupt checkpoints wherever a command reads one, an output folder that cannot be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_config, write_geotiff
from tests.test_predict import FULL
from workbench.cli import main
from workbench.tasks import SegmentationTask


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The single ``workbench: error:`` line of stderr (progress bars aside); no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("workbench: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("command", ["predict", "merge", "test", "fit"])
def test_truncated_checkpoint_is_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    config = write_config(tmp_path, model=FULL, trainer={"max_epochs": 1})
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": SegmentationTask(num_classes=2).state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:4096])
    scene = write_geotiff(tmp_path / "scene.tif", np.random.default_rng(0).random((6, 32, 32), dtype=np.float32))
    args = {
        "predict": ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs", str(scene),
                    "--output_dir", str(tmp_path / "out")],
        "merge": ["merge", "soup", "--checkpoints", str(ckpt), str(ckpt), "--output", str(tmp_path / "soup.ckpt")],
        "test": ["test", "--config", str(config), "--ckpt_path", str(ckpt)],
        "fit": ["fit", "--config", str(config), "--ckpt_path", str(ckpt)],
    }[command]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "could not be read" in line
    assert not (tmp_path / "soup.ckpt").exists() and not list(tmp_path.glob("out/*.tif"))


def test_output_folder_that_is_a_file_is_one_line_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_predict import fit_checkpoint

    config, ckpt = fit_checkpoint(tmp_path, model=FULL)
    scenes = [write_geotiff(tmp_path / "scenes" / f"{name}.tif", np.random.default_rng(0).random((6, 32, 32), dtype=np.float32))
              for name in ("a", "b")]
    blocked = tmp_path / "out"
    blocked.write_text("a file where the output folder should be")
    args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--window", "32", "--inputs", *map(str, scenes)]
    assert main([*args, "--output_dir", str(blocked)]) == 2
    line = one_error_line(capsys)
    assert "writing the outputs of a to" in line and str(blocked) in line and "writable --output_dir" in line
    assert blocked.read_text() == "a file where the output folder should be"


def test_unreadable_scenes_are_skipped_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_predict import broken_scenes, fit_checkpoint

    config, ckpt = fit_checkpoint(tmp_path, model=FULL)
    good = write_geotiff(tmp_path / "scenes" / "good.tif", np.random.default_rng(0).random((6, 32, 32), dtype=np.float32))
    bad = broken_scenes(tmp_path / "bad")
    out = tmp_path / "out"
    args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--window", "32", "--output_dir", str(out),
            "--inputs", str(bad["truncated"]), str(good), str(bad["garbage"])]
    assert main(args) == 2  # fail is the default
    assert main([*args, "--bad_files", "skip"]) == 0
    assert sorted(p.name for p in out.glob("*.tif")) == ["good_classes.tif"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping scene"))
    assert str(bad["truncated"]) in warned and str(bad["garbage"]) in warned


def random_scene(path: Path, rng: np.random.Generator) -> dict:
    """A small GeoTIFF of random size, dtype, band count, nodata and (mostly) a CRS; returns its traits."""
    import rasterio
    from rasterio.transform import from_origin

    traits = {"height": int(rng.integers(1, 80)), "width": int(rng.integers(1, 80)), "bands": int(rng.choice([5, 6, 6, 7])),
              "dtype": str(rng.choice(["uint8", "int16", "float32", "float32", "float32", "float64"])),
              "crs": rng.random() > 0.2}
    floating = traits["dtype"].startswith("float")
    traits["nodata"] = rng.choice([None, 0, float("nan")] if floating else [None, 0])
    pixels = (rng.random((traits["bands"], traits["height"], traits["width"])) * 100).astype(traits["dtype"])
    if floating and rng.random() > 0.5:
        pixels[:, : traits["height"] // 2] = np.nan  # a NaN half
    transform = from_origin(float(rng.integers(0, 9e5)), float(rng.integers(1e6, 9e6)), 10.0, 10.0)
    with rasterio.open(path, "w", driver="GTiff", height=traits["height"], width=traits["width"], count=traits["bands"],
                       dtype=traits["dtype"], crs="EPSG:32633" if traits["crs"] else None, transform=transform,
                       nodata=traits["nodata"]) as dst:
        dst.write(pixels)
    return traits


def test_fuzzed_scenes_map_with_their_georeference_or_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import rasterio

    from tests.test_predict import fit_checkpoint

    config, ckpt = fit_checkpoint(tmp_path, model=FULL)  # trained on 6-band float32 chips
    rng = np.random.default_rng(7)
    outcomes = {"mapped": 0, "refused": 0}
    for i in range(20):
        scene = tmp_path / "scenes" / f"s{i}.tif"
        scene.parent.mkdir(exist_ok=True)
        traits = random_scene(scene, rng)
        out = tmp_path / f"out{i}"
        code = main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--window", "32",
                     "--inputs", str(scene), "--output_dir", str(out)])
        fits = traits["bands"] == 6 and traits["dtype"] == "float32" and traits["crs"]
        if code == 0:
            with rasterio.open(scene) as src, rasterio.open(out / f"s{i}_classes.tif") as cls:
                assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape), traits
            capsys.readouterr()
        else:
            assert code == 2 and str(scene) in one_error_line(capsys), traits
            assert not out.exists() or not list(out.iterdir())
        assert (code == 0) == bool(fits), traits
        outcomes["mapped" if code == 0 else "refused"] += 1
    assert min(outcomes.values()) >= 3, outcomes  # the seed exercises both outcomes


@pytest.fixture
def full_disk(tmp_path: Path) -> Path:
    """A 600 kB tmpfs: too small for a checkpoint of the tiny model (skipped where mounting is not allowed)."""
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_during_fit_and_compare_is_one_line(tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    config = write_config(tmp_path, trainer={"max_epochs": 1})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"]["init_args"]["save_dir"] = str(full_disk / "runs")
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(full_disk) in line and "writable folder" in line
    assert not list(full_disk.rglob("*.ckpt"))  # nothing half-written under a checkpoint's name

    args = ["compare", "--base_config", str(config), "--strategies", "frozen", "--output_dir", str(full_disk / "cmp")]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("workbench: error: arm frozen-f1-s0: writing ") and "No space left on device" in line


def test_stats_names_an_unreadable_chip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_bad_files import corrupt

    config = write_config(tmp_path)
    truncated, garbage = corrupt(tmp_path)
    assert main(["stats", "--config", str(config), "--out", str(tmp_path / "stats.json")]) == 2
    line = one_error_line(capsys)
    assert (str(truncated) in line or str(garbage) in line) and "bad_files: skip" in line
    assert not (tmp_path / "stats.json").exists()


def test_merging_checkpoints_of_different_architectures_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import fit_run

    checkpoints = []
    for width in (16, 8):
        run = tmp_path / f"decoder{width}"
        run.mkdir()
        config = write_config(run, model={**FULL, "decoder_channels": width}, trainer={"max_epochs": 1})
        checkpoints.append(fit_run(config)[1]["best_checkpoint"])
    capsys.readouterr()
    assert main(["merge", "soup", "--checkpoints", *checkpoints, "--output", str(tmp_path / "soup.ckpt")]) == 2
    line = one_error_line(capsys)
    assert f"{checkpoints[1]} does not have the architecture of {checkpoints[0]}" in line and "other shapes" in line
    assert not (tmp_path / "soup.ckpt").exists()


def test_a_fit_into_a_run_folder_another_live_fit_writes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    import yaml

    config = write_config(tmp_path, trainer={"max_epochs": 1})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"]["init_args"]["version"] = "shared"
    config.write_text(yaml.safe_dump(settings))
    run = Path(settings["trainer"]["logger"]["init_args"]["save_dir"]) / settings["trainer"]["logger"]["init_args"]["name"] / "shared"
    run.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live process holding it
    try:
        (run.parent / ".shared.workbench.lock").write_text(str(other.pid))
        assert main(["fit", "--config", str(config)]) == 2
        line = one_error_line(capsys)
        assert f"another workbench fit (pid {other.pid}) is writing {run}" in line
        assert not list(run.rglob("*.ckpt"))
    finally:
        other.kill()
        other.wait()
    assert main(["fit", "--config", str(config)]) == 0  # its process gone, the lock is taken over
    assert list(run.rglob("*.ckpt")) and not (run.parent / ".shared.workbench.lock").exists()
