"""`workbench export` to ONNX and torch.export, and `workbench predict` with the exported ONNX file:
onnxruntime against PyTorch (atol 1e-4 on class probabilities), dynamic batch and H/W, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
import torch
import yaml

from tests.conftest import write_config, write_geotiff
from workbench import __version__
from workbench.cli import main
from workbench.merge.checkpoints import load_task
from workbench.tasks.base import BaseTask

ATOL = 1e-4  # onnxruntime vs PyTorch on class probabilities (float32; measured ~1e-7)
FULL = {"class_path": "workbench.strategies.Full"}


def fit(root: Path, **model: object) -> tuple[Path, Path]:
    """A tiny segmentation model fitted for one epoch by `workbench fit`: its config and best checkpoint."""
    config = write_config(root, model=model, trainer={"max_epochs": 1})
    assert main(["fit", "--config", str(config)]) == 0
    return config, next((root / "runs" / "tiny" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))


@pytest.fixture(scope="module")
def lora_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Prithvi ViT (depth 2, width 64, 32 px chips) with LoRA, as the test configs fit it."""
    return fit(tmp_path_factory.mktemp("lora_vit"))


@pytest.fixture(scope="module")
def lora_onnx(lora_vit: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lora_vit`` exported by `workbench export` to ONNX."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    assert main(["export", "--checkpoint", str(lora_vit[1]), "--output", str(out), "--chip_size", "32"]) == 0
    return out


def probabilities(task: BaseTask, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return task.eval().predict_step({"image": image}, 0).numpy()


def run_onnx(path: Path, image: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy()})[0]


def onnx_metadata(path: Path) -> dict[str, object]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def test_onnx_export_matches_pytorch_merged_and_unmerged_and_carries_metadata(lora_vit: tuple[Path, Path],
                                                                               lora_onnx: Path) -> None:
    config, ckpt = lora_vit
    out = lora_onnx
    unmerged = load_task(ckpt)
    merged = load_task(ckpt)
    merged.model = merged.strategy.merged(merged.model)
    for batch in (1, 3):  # dynamic batch
        image = torch.randn(batch, 6, 32, 32, generator=torch.Generator().manual_seed(batch))
        exported = run_onnx(out, image)
        np.testing.assert_allclose(exported, probabilities(unmerged, image), atol=ATOL, rtol=0)
        np.testing.assert_allclose(exported, probabilities(merged, image), atol=ATOL, rtol=0)

    meta = onnx_metadata(out)
    saved = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    assert meta["output_names"] == saved["class_names"] and meta["output_kind"] == "classes"
    assert (meta["mean"], meta["std"]) == (data["mean"], data["std"])
    assert meta["bands"] == saved["bands"] and meta["num_frames"] == 1 and meta["chip_size"] == 32
    assert meta["strategy"] == "lora" and meta["merged"] is True and meta["backbone"] == saved["backbone"]
    assert meta["workbench_version"] == __version__
    # the ViT's position embedding is baked in at the chip size: exported for 32 px windows only, said so
    assert meta["dynamic_hw"] is False
    with pytest.raises(Exception, match="dimensions"):
        run_onnx(out, torch.randn(1, 6, 64, 64))


def test_a_conv_unet_exports_with_dynamic_height_and_width(tmp_path: Path) -> None:
    _, ckpt = fit(tmp_path / "fit", backbone="test_resnet", backbone_kwargs={"in_chans": 6}, strategy=FULL)
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--chip_size", "32"]) == 0
    assert onnx_metadata(out)["dynamic_hw"] is True
    task = load_task(ckpt)
    for shape in ((1, 6, 32, 32), (3, 6, 64, 96)):
        image = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(run_onnx(out, image), probabilities(task, image), atol=ATOL, rtol=0)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_predict_with_the_onnx_file_writes_the_checkpoints_rasters(lora_vit: tuple[Path, Path], lora_onnx: Path,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, ckpt = lora_vit
    onnx_file = lora_onnx
    scene = write_geotiff(tmp_path / "scenes" / "scene.tif", np.random.default_rng(0).random((6, 40, 56), np.float32))
    args = ["predict", "--config", str(config), "--inputs", str(scene), "--window", "32", "--probabilities", "true"]
    assert main([*args, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "torch")]) == 0
    assert main([*args, "--ckpt_path", str(onnx_file), "--output_dir", str(tmp_path / "onnx")]) == 0
    np.testing.assert_allclose(read(tmp_path / "onnx" / "scene_probabilities.tif"),
                               read(tmp_path / "torch" / "scene_probabilities.tif"), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(read(tmp_path / "onnx" / "scene_classes.tif"),
                                  read(tmp_path / "torch" / "scene_classes.tif"))

    # a window the fixed-size export does not take, or other statistics than it was exported with: refused
    capsys.readouterr()
    assert main([*args, "--ckpt_path", str(onnx_file), "--output_dir", str(tmp_path / "x"), "--window", "64"]) == 2
    assert "pass --window 32" in capsys.readouterr().err
    other = write_config(tmp_path / "other", data={"mean": [0.4] * 6})
    assert main(["predict", "--config", str(other), "--inputs", str(scene), "--ckpt_path", str(onnx_file),
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "data.mean" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torch_export_program_loads_and_matches(lora_vit: tuple[Path, Path], tmp_path: Path) -> None:
    config, ckpt = lora_vit
    out = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--chip_size", "32"]) == 0
    program = torch.export.load(out).module()
    task = load_task(ckpt)
    for batch in (1, 3):
        image = torch.randn(batch, 6, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            np.testing.assert_allclose(program(image).numpy(), probabilities(task, image), atol=ATOL, rtol=0)
    sidecar = json.loads((tmp_path / "model.pt2.json").read_text())
    assert sidecar["output_names"] == ["0", "1"] and sidecar["mean"] == [0.5] * 6 and sidecar["dynamic_hw"] is False


def test_bad_inputs_fail_in_one_line(lora_vit: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, ckpt = lora_vit
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert main(["export", "--checkpoint", str(not_a_checkpoint), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "notes.ckpt could not be read" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.bin")]) == 2
    assert "--format" in capsys.readouterr().err
    assert not list(tmp_path.glob("m*"))
    # predict: an .onnx file that is not an export
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00" * 64)
    scene = write_geotiff(tmp_path / "scene.tif", np.zeros((6, 32, 32), np.float32))
    assert main(["predict", "--config", str(config), "--inputs", str(scene), "--ckpt_path", str(fake),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "fake.onnx is not a readable ONNX model" in capsys.readouterr().err
