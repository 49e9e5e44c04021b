"""Whole-scene prediction: blending, georeference, nodata, bad scenes, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin
from torch import Tensor, nn

from datamodules.normalize import Preprocessor
from tests.conftest import TINY_BACKBONE, write_config, write_geotiff
from workbench.cli import main
from workbench.errors import UserInputError
from workbench.predict import SceneSpec, TiledPredictor, WindowPlan, blend_weights
from workbench.tasks import SegmentationTask
from workbench.tasks.dense import PixelOutput, PixelPredictor

MEAN, STD = [0.5] * 6, [0.25] * 6


class PixelwiseTask(nn.Module):
    """A per-pixel model (1×1 conv): tiled and whole-image outputs must agree exactly."""

    output_kind = PixelOutput.CLASSES
    output_names = class_names = ["a", "b", "c"]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(6, 3, 1)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.conv(batch["image"]).softmax(1)


def scene(tmp_path: Path, size: tuple[int, int], nodata: float | None = None, bands: int = 6) -> Path:
    rng = np.random.default_rng(1)
    array = rng.random((bands, *size), dtype=np.float32)
    transform = from_origin(500000.0, 4200000.0, 30.0, 30.0)
    return write_geotiff(tmp_path / "scene.tif", array, crs="EPSG:32633", transform=transform, nodata=nodata)


def predictor(task: nn.Module, window: int, overlap: int, bf16: bool = False) -> TiledPredictor:
    return TiledPredictor(task, Preprocessor(MEAN, STD), SceneSpec(list(range(6)), 6, "float32", [2, 1, 0]),
                          window=window, overlap=overlap, batch_size=3, bf16=bf16)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_window_plan_covers_scene_and_weights_taper() -> None:
    plan = WindowPlan(100, 70, 32, 8)
    assert plan.rows[0] == 0 and plan.rows[-1] == 100 - 32
    assert all(b - a <= 24 for a, b in zip(plan.rows, plan.rows[1:]))
    assert plan.cols[-1] == 70 - 32 and len(plan) == len(plan.rows) * len(plan.cols)
    w = blend_weights(32, 8)
    assert w[16, 16] == 1.0 and 0 < w[0, 0] < w[4, 4] < w[16, 16]
    with pytest.raises(UserInputError, match="overlap"):
        WindowPlan(10, 10, 8, 8)


@pytest.mark.parametrize(("window", "overlap"), [(32, 8), (48, 16), (64, 0)])
def test_blended_tiles_equal_whole_image(tmp_path: Path, window: int, overlap: int) -> None:
    """With a per-pixel model, any tiling must reproduce the whole-image output (no seams)."""
    path = scene(tmp_path, (90, 75))
    task = PixelwiseTask()
    out = predictor(task, window, overlap).predict_scene([path], tmp_path / "out", "s", probabilities=True)
    image, _ = Preprocessor(MEAN, STD)(read(path), None)
    expected = task.predict_step({"image": image[None]}, 0)[0].detach().numpy()
    np.testing.assert_allclose(read(out["probabilities"]), expected, atol=1e-5)
    np.testing.assert_array_equal(read(out["classes"])[0], expected.argmax(0))


@pytest.mark.parametrize("bf16", [False, True])
def test_tiled_equals_model_when_scene_fits_one_window(tmp_path: Path, bf16: bool) -> None:
    """One window: the scene's probabilities are the model's, in float32 or under bfloat16 autocast."""
    path = scene(tmp_path, (64, 64))
    task = SegmentationTask(num_classes=2, class_names=["land", "water"], decoder="fcn", decoder_channels=8,
                            backbone_kwargs=TINY_BACKBONE).eval()
    out = predictor(task, 64, 16, bf16).predict_scene([path], tmp_path / "out", "s", probabilities=True)
    image, _ = Preprocessor(MEAN, STD)(read(path), None)
    with torch.no_grad():
        expected = task(image[None]).softmax(1)[0].numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = task(image[None]).float().softmax(1)[0].numpy()
    assert np.abs(expected_bf16 - expected).max() > 1e-4  # bfloat16 is visibly another computation
    np.testing.assert_allclose(read(out["probabilities"]), expected_bf16 if bf16 else expected, atol=1e-5)


def test_predict_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench import precision
    from workbench.predict.command import predict_in_bf16

    assert not predict_in_bf16("32", "cpu", onnx=False) and predict_in_bf16("bf16", "cpu", onnx=False)
    assert predict_in_bf16("auto", "cpu", onnx=False) == (precision.auto_precision("cpu")[0] == "bf16-mixed")
    assert not predict_in_bf16("auto", "cpu", onnx=True) and not predict_in_bf16("trained", "cpu", onnx=True)
    for native in (True, False):  # trained: bf16 only for a bf16 checkpoint on a device that computes it natively
        choice = ("bf16-mixed", "native") if native else ("32-true", "emulated")
        monkeypatch.setattr(precision, "auto_precision", lambda accelerator, choice=choice: choice)
        assert predict_in_bf16("trained", "cpu", onnx=False, trained="bf16-mixed") == native
        assert predict_in_bf16("auto", "cpu", onnx=False) == native
        for trained in ("32-true", "16-mixed", None):  # float32 checkpoints, and those from before it was recorded
            assert not predict_in_bf16("trained", "cpu", onnx=False, trained=trained)
    with pytest.raises(UserInputError, match="--precision bf16 applies to checkpoints"):
        predict_in_bf16("bf16", "cpu", onnx=True)


@pytest.mark.parametrize("cuda", [True, False])
def test_predict_device_is_each_processes_own(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    """Under torchrun / srun (local rank 3 here) ``auto`` and a bare ``cuda`` mean this process's
    GPU, not every process on cuda:0; a named device is kept; a GPU the machine lacks or a name
    torch does not know is one line."""
    from workbench.predict.command import predict_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if cuda else 0)
    assert predict_device("auto", 3) == ("cuda:3" if cuda else "cpu")
    assert predict_device("cpu", 3) == "cpu"
    if cuda:
        assert predict_device("cuda", 3) == "cuda:3" and predict_device("cuda", 0) == "cuda:0"
        assert predict_device("cuda:1", 3) == "cuda:1"
    for wrong, message in (("cuda:4" if cuda else "cuda", "torch sees"), ("gpu0", "not a device name")):
        with pytest.raises(UserInputError, match=f"--device {wrong}: {message}"):
            predict_device(wrong, 0)


def test_outputs_keep_georeference_nodata_and_metadata(tmp_path: Path) -> None:
    path = scene(tmp_path, (50, 70), nodata=-1.0)
    with rasterio.open(path, "r+") as dst:  # a nodata corner
        corner = dst.read()
        corner[:, :10, :12] = -1.0
        dst.write(corner)
    out = predictor(PixelwiseTask(), 32, 8).predict_scene([path], tmp_path / "out", "s", probabilities=True)
    with rasterio.open(path) as src, rasterio.open(out["classes"]) as cls:
        assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape)
        assert cls.dtypes[0] == "uint8" and cls.nodata == 255
        assert json.loads(cls.tags()["class_names"]) == ["a", "b", "c"]
        assert set(cls.colormap(1)) >= {0, 1, 2}
        classes = cls.read(1)
    assert (classes[:10, :12] == 255).all() and (classes[10:, 12:] != 255).all()
    probs = read(out["probabilities"])
    assert np.isnan(probs[:, :10, :12]).all() and not np.isnan(probs[:, 10:, 12:]).any()
    assert out["quicklook"].is_file() and out["quicklook"].stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*"))  # no partial files left


class CountingTask(PixelwiseTask):
    """Counts the windows it is given."""

    windows = 0

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.windows += len(batch["image"])
        return super().predict_step(batch, batch_idx)


def test_nan_and_nodata_only_windows_are_skipped_and_written_as_nodata(tmp_path: Path) -> None:
    """The top 40 rows are nodata (NaN in one band, the nodata value in the rest): the windows lying
    wholly inside them never reach the model, and the other pixels are the per-pixel model's output."""
    path = scene(tmp_path, (100, 70), nodata=-1.0)
    with rasterio.open(path, "r+") as dst:
        pixels = dst.read()
        pixels[:, :40] = -1.0
        pixels[3, :40] = np.nan
        dst.write(pixels)
    task = CountingTask()
    out = predictor(task, 32, 8).predict_scene([path], tmp_path / "out", "s", probabilities=True)
    plan = WindowPlan(100, 70, 32, 8)
    assert task.windows == len(plan.cols) * sum(top + 32 > 40 for top in plan.rows) < len(plan)
    classes, probs = read(out["classes"])[0], read(out["probabilities"])
    assert (classes[:40] == 255).all() and np.isnan(probs[:, :40]).all()
    image, _ = Preprocessor(MEAN, STD)(pixels[:, 40:], None)
    expected = task.predict_step({"image": image[None]}, 0)[0].detach().numpy()
    np.testing.assert_allclose(probs[:, 40:], expected, atol=1e-5)


def test_a_second_run_writing_the_same_output_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    """Two runs mapping a scene into the same folder never share its files: while one writes it
    (a live process holds ``.<stem>.lock``), the other is refused in one line; afterwards it may."""
    from workbench.predict.outputs import SceneWriter

    profile = {"height": 64, "width": 16, "crs": "EPSG:32633", "transform": from_origin(0, 0, 30, 30)}
    probabilities = np.random.default_rng(0).random((3, 64, 16), dtype=np.float32)
    first = SceneWriter(tmp_path, "s", profile, ["a", "b", "c"], quicklook=False).__enter__()
    with pytest.raises(UserInputError, match=rf"another workbench predict \(pid {os.getpid()}\) is writing s in .*: wait for it or choose another --output_dir"):
        SceneWriter(tmp_path, "s", profile, ["a", "b", "c"], quicklook=False)
    first.write(probabilities, np.ones((64, 16), bool), None)
    first.__exit__(None, None, None)
    np.testing.assert_array_equal(read(tmp_path / "s_classes.tif")[0], probabilities.argmax(0))
    assert [p.name for p in tmp_path.iterdir()] == ["s_classes.tif"]
    (tmp_path / ".s.lock").write_text("999999999")  # left by a killed run: its process is gone
    with SceneWriter(tmp_path, "s", profile, ["a", "b", "c"], quicklook=False) as again:
        again.write(probabilities[::-1].copy(), np.ones((64, 16), bool), None)
    np.testing.assert_array_equal(read(tmp_path / "s_classes.tif")[0], probabilities[::-1].argmax(0))

def test_predict_maps_pixel_predictors_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert isinstance(PixelwiseTask(), PixelPredictor)
    config = yaml.safe_load(write_config(tmp_path).read_text())
    config["model"]["class_path"] = "workbench.tasks.ClassificationTask"
    for key in ("decoder", "decoder_channels"):
        del config["model"]["init_args"][key]
    path = tmp_path / "classification.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["predict", "--config", str(path), "--inputs", str(scene(tmp_path, (32, 32)))]) == 2
    assert "maps per-pixel tasks (SegmentationTask, RegressionTask); the config's model is ClassificationTask" \
        in capsys.readouterr().err


def test_deterministic(tmp_path: Path) -> None:
    path = scene(tmp_path, (40, 40))
    task = SegmentationTask(num_classes=2, decoder="fcn", decoder_channels=8, backbone_kwargs=TINY_BACKBONE)
    runs = [predictor(task, 32, 8).predict_scene([path], tmp_path / f"out{i}", "s", probabilities=True)
            for i in range(2)]
    assert np.array_equal(read(runs[0]["probabilities"]), read(runs[1]["probabilities"]), equal_nan=True)


def test_band_count_mismatch_fails_clearly_without_output(tmp_path: Path) -> None:
    path = scene(tmp_path, (40, 40), bands=4)
    with pytest.raises(UserInputError, match="has 4 bands"):
        predictor(PixelwiseTask(), 32, 8).predict_scene([path], tmp_path / "out", "s")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


FULL = {"strategy": {"class_path": "workbench.strategies.Full"}}


def fit_checkpoint(tmp_path: Path, **changes: dict) -> tuple[Path, Path]:
    """A config and a checkpoint of a Full-strategy (untrained) model, as `workbench fit` saves it."""
    config = write_config(tmp_path, **changes)
    model_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    task = SegmentationTask(num_classes=2, class_names=["0", "1"], decoder=model_args["decoder"],
                            decoder_channels=model_args["decoder_channels"], backbone_kwargs=TINY_BACKBONE)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict()}, ckpt)
    return config, ckpt


def test_cli_predicts_folder_with_distinct_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, ckpt = fit_checkpoint(tmp_path)  # the config's strategy is LoRA
    scenes = tmp_path / "scenes"
    for name in ("north", "south"):
        write_geotiff(scenes / f"{name}.tif", np.random.default_rng(0).random((6, 40, 56), dtype=np.float32))
    # a checkpoint of a Full model does not fit the config's LoRA model: refused clearly
    assert main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs", str(scenes)]) == 2
    config = write_config(tmp_path, model=FULL)
    out = tmp_path / "pred"
    args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs", str(scenes),
            "--output_dir", str(out), "--window", "32"]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*_classes.tif")) == ["north_classes.tif", "south_classes.tif"]

    # launched as two processes (torchrun sets RANK / WORLD_SIZE), each maps its share of the scenes
    write_geotiff(scenes / "west.tif", np.random.default_rng(1).random((6, 40, 56), dtype=np.float32))
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        rank_out = tmp_path / f"rank{rank}"
        assert main([*args[:-4], "--output_dir", str(rank_out), "--window", "32"]) == 0
        shares.append({p.name for p in rank_out.glob("*_classes.tif")})
    assert shares[0] | shares[1] == {"north_classes.tif", "south_classes.tif", "west_classes.tif"}
    assert not shares[0] & shares[1] and len(shares[0]) == 2
    np.testing.assert_array_equal(read(tmp_path / "rank1" / "south_classes.tif"), read(out / "south_classes.tif"))


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, i.e. the test process's own peak.
MEMORY_SCRIPT = """
import re, sys
from pathlib import Path
from workbench.cli import main
assert main(sys.argv[1:]) == 0
print(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
"""


def test_peak_memory_does_not_grow_with_scene_size(tmp_path: Path) -> None:
    """A 4x larger scene must not need 4x the memory: measure peak RSS of two runs."""
    config, ckpt = fit_checkpoint(tmp_path, model=FULL)
    peaks = []
    for side in (1024, 2048):
        path = tmp_path / f"scene_{side}.tif"
        write_geotiff(path, np.random.default_rng(0).random((6, side, side), dtype=np.float32))
        args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs", str(path),
                "--output_dir", str(tmp_path / "pred"), "--window", "128", "--batch_size", "16",
                "--quicklook", "false"]
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks.append(int(result.stdout.split()[-1]) / 1024)  # MiB
    # The larger scene holds 72 MiB more pixels; a whole-scene approach would grow by that much.
    assert peaks[1] - peaks[0] < 25, f"peak RSS {peaks[0]:.0f} MiB -> {peaks[1]:.0f} MiB"


def broken_scenes(folder: Path) -> dict[str, Path]:
    """Scenes predict must refuse in one line: pixels cut off, not a TIFF, empty, no CRS."""
    pixels = np.random.default_rng(2).random((6, 200, 64), dtype=np.float32)
    truncated = write_geotiff(folder / "truncated.tif", pixels)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 5])  # header and top rows
    garbage, empty = folder / "garbage.tif", folder / "empty.tif"
    garbage.write_bytes(b"not a GeoTIFF " * 50)
    empty.write_bytes(b"")
    return {"truncated": truncated, "garbage": garbage, "empty": empty,
            "no_crs": write_geotiff(folder / "no_crs.tif", pixels[:, :40], crs=None)}


@pytest.mark.parametrize("kind,says", [("truncated", "truncated or corrupt"), ("garbage", "not a readable raster"),
                                       ("empty", "not a readable raster"), ("no_crs", "has no CRS")])
def test_unreadable_scene_fails_in_one_line_and_keeps_earlier_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, says: str) -> None:
    config, ckpt = fit_checkpoint(tmp_path, model=FULL)
    good = write_geotiff(tmp_path / "good" / f"{kind}.tif", np.random.default_rng(3).random((6, 40, 40), dtype=np.float32))
    out = tmp_path / "pred"
    args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--output_dir", str(out), "--window", "32"]
    assert main([*args, "--inputs", str(good)]) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    bad = broken_scenes(tmp_path / "bad")[kind]
    assert main([*args, "--inputs", str(bad)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("workbench: error: ")]  # beside progress bars
    assert len(errors) == 1 and str(bad) in errors[0] and says in errors[0] and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # same names: nothing replaced or half-written


def test_predict_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real kill -9 once the first block row (256 rows) is on disk; the same command again
    continues after it, and the maps equal those of a run that was never interrupted."""
    import signal
    import time

    config, ckpt = fit_checkpoint(tmp_path, model=FULL)
    pixels = np.random.default_rng(4).random((6, 2048, 64), dtype=np.float32)
    scene_file = write_geotiff(tmp_path / "scene.tif", pixels, transform=from_origin(500000.0, 4200000.0, 30.0, 30.0))
    args = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs", str(scene_file),
            "--window", "32", "--batch_size", "4", "--probabilities", "true"]
    killed = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, "-m", "workbench.cli", *args, "--output_dir", str(killed)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline = killed / ".scene.progress.json", time.monotonic() + 300
    while not progress.is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    rows = json.loads(progress.read_text())["rows"]
    assert 0 < rows < 2048 and not (killed / "scene_classes.tif").exists()

    assert main([*args, "--output_dir", str(killed)]) == 0
    assert f"resuming scene after row {rows} of 2048" in capsys.readouterr().out
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    for name in ("scene_classes.tif", "scene_probabilities.tif"):
        np.testing.assert_array_equal(read(killed / name), read(tmp_path / "whole" / name))
    from PIL import Image

    quicklooks = [np.asarray(Image.open(folder / "scene_quicklook.png")) for folder in (killed, tmp_path / "whole")]
    np.testing.assert_array_equal(*quicklooks)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
