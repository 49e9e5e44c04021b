"""Point clouds: readers, tiling, FPS/kNN tokenizer, Point-MAE weights, a CLI fit."""

from __future__ import annotations

import argparse
from pathlib import Path

import laspy
import numpy as np
import pytest
import timm
import torch
from plyfile import PlyData, PlyElement

from backbones.layers import farthest_point_sample
from backbones.point_transformer import load_point_transformer
from datamodules.points import PointClassificationDataModule, PointSegmentationDataModule, read_cloud
from heads.points import propagate
from tests.conftest import fit_run, write_task_config
from workbench.errors import UserInputError
from workbench.model import PointSegmenter
from workbench.strategies import LoRA

TINY_POINTS = {"num_groups": 16, "group_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def scene(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40 x 40 m scene: ground (code 2) at z≈0, and boxes (building, code 6) 5 m high where
    sin(x/4) > 0.3; intensity higher on roofs."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 39.99, (n, 2))
    roof = np.sin(xy[:, 0] / 4) > 0.3
    z = np.where(roof, 5.0, 0.0) + rng.normal(0, 0.1, n)
    intensity = np.where(roof, 200, 50) + rng.normal(0, 10, n)
    return np.column_stack([xy, z]), intensity, np.where(roof, 6, 2)


def write_las(path: Path, n: int = 6000, seed: int = 0) -> Path:
    xyz, intensity, codes = scene(n, seed)
    las = laspy.create(point_format=1, file_version="1.2")
    las.header.offsets, las.header.scales = [0, 0, 0], [0.001, 0.001, 0.001]
    las.x, las.y, las.z = xyz.T
    las.intensity = intensity.clip(0).astype(np.uint16)
    las.classification = codes.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    las.write(path)
    return path


def test_readers_agree_across_formats(tmp_path: Path) -> None:
    las = read_cloud(write_las(tmp_path / "a.las", 500), ["intensity"])
    vertex = np.array([tuple(r) for r in np.column_stack([las.xyz, las.features[:, 0], las.codes])],
                      dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("intensity", "f4"), ("classification", "u1")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "a.ply"))
    np.save(tmp_path / "a.npy", np.column_stack([las.xyz, las.features[:, 0], las.codes]))
    laspy.read(tmp_path / "a.las").write(tmp_path / "a.laz")  # LAZ: compressed with lazrs
    others = [read_cloud(tmp_path / f"a.{suffix}", ["intensity"]) for suffix in ("ply", "npy", "laz")]
    for other in others:
        np.testing.assert_allclose(other.xyz, las.xyz)
        np.testing.assert_allclose(other.features, las.features)
        np.testing.assert_array_equal(other.codes, las.codes)
    with pytest.raises(UserInputError, match=r"no per-point field\(s\) \['red'\]"):
        read_cloud(tmp_path / "a.las", ["red"])
    (tmp_path / "broken.las").write_bytes(b"LASF" + b"\0" * 20)
    with pytest.raises(UserInputError, match="broken.las could not be read"):
        read_cloud(tmp_path / "broken.las", [])


def test_tiles_split_without_shared_points(tmp_path: Path) -> None:
    write_las(tmp_path / "scene.las")
    dm = PointSegmentationDataModule(str(tmp_path), tile_size=10.0, num_points=256, features=["intensity"])
    assert dm.class_names == ["ground", "building"] and dm.bands == ["x", "y", "z", "intensity"]
    assert len(dm.tiles) == 16 and sum(len(t.xyz) for t in dm.tiles) == 6000
    splits = dm.split_tiles
    assert sorted(i for s in splits.values() for i in s) == list(range(16))
    sample = dm.dataset("val")[0]
    assert sample["points"].shape == (256, 4) and sample["mask"].shape == (256,)
    assert sample["points"][:, :2].abs().max() <= 1.0  # xy scaled into the tile
    torch.testing.assert_close(dm.dataset("val")[0]["points"], sample["points"])  # fixed eval draw
    train = dm.dataset("train")
    draws = []
    for seed in (0, 0, 1):  # training draws: new each time, but repeated by the run's seed
        torch.manual_seed(seed)
        draws.append(torch.stack([train[0]["points"], train[0]["points"]]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0], draws[2])


def test_point_classification_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, shape in (("sphere", lambda p: p / np.linalg.norm(p, axis=1, keepdims=True)), ("cube", np.tanh)):
        (tmp_path / name).mkdir()
        for i in range(5):
            np.save(tmp_path / name / f"{i}.npy", shape(rng.normal(size=(300, 3))) * 10 + rng.uniform(-50, 50, 3))
    dm = PointClassificationDataModule(str(tmp_path), num_points=128)
    assert dm.class_names == ["cube", "sphere"]
    sample = dm.dataset("train")[0]
    assert sample["points"].shape == (128, 3) and sample["points"].norm(dim=1).max() <= 1.0 + 1e-5


def test_fps_knn_and_propagation() -> None:
    xyz = torch.cat([torch.zeros(1, 50, 3), torch.ones(1, 50, 3) * 10], 1)
    chosen = farthest_point_sample(xyz + torch.randn_like(xyz) * 0.01, 2)
    assert {int(i) < 50 for i in chosen[0]} == {True, False}  # one centre per cluster
    centers = torch.tensor([[[0.0, 0, 0], [10.0, 10, 10]]])
    tokens = torch.tensor([[[1.0], [5.0]]])
    out = propagate(torch.tensor([[[0.0, 0, 0], [10.0, 10, 10]]]), centers, tokens, k=2)
    torch.testing.assert_close(out, tokens, atol=1e-4, rtol=0)


def test_point_mae_checkpoint_loads_with_extra_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    official = timm.create_model("point_mae_tiny", **TINY_POINTS)
    state = {}
    for key, value in official.state_dict().items():
        key = key.replace("blocks.", "blocks.blocks.", 1) if key.startswith("blocks.") else key
        state[f"MAE_encoder.{key}"] = value
    state["MAE_decoder.blocks.blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    state["mask_token"] = torch.zeros(1, 1, 32)
    metrics = argparse.Namespace(acc=93.2)  # Point-MAE pickles a metrics object beside the weights
    torch.save({"base_model": state, "epoch": 300, "metrics": metrics}, tmp_path / "pointmae.pth")
    model = timm.create_model("point_mae_tiny", in_chans=4, **TINY_POINTS)
    report = load_point_transformer(model, tmp_path / "pointmae.pth")
    assert "mask_token" in report["ignored"]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, official.blocks[1].attn.qkv.weight)
    first = model.encoder.first_conv[0].weight
    torch.testing.assert_close(first[:, :3], official.encoder.first_conv[0].weight)
    assert torch.all(first[:, 3:] == 0)  # the new intensity input starts switched off
    model.eval(), official.eval()
    xyz = torch.randn(1, 128, 3)
    torch.testing.assert_close(model.forward_intermediates(torch.cat([xyz, torch.randn(1, 128, 1)], -1))[-1],
                               official.forward_intermediates(xyz)[-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserInputError, match="does not fit"):
        load_point_transformer(timm.create_model("point_mae_tiny", **{**TINY_POINTS, "embed_dim": 48}),
                               tmp_path / "pointmae.pth")


def test_lora_keeps_frozen_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    model = PointSegmenter(timm.create_model("point_mae_tiny", **TINY_POINTS), 2)
    LoRA(rank=2).apply(model)
    before = model.backbone.encoder.first_conv[1].running_mean.clone()
    model.train()
    model(torch.randn(2, 128, 3) * 5).sum().backward()
    torch.testing.assert_close(model.backbone.encoder.first_conv[1].running_mean, before)
    assert model.head.point_mlp[1].training  # the head's own BatchNorm still learns


def test_point_segmentation_fits_through_the_cli(tmp_path: Path) -> None:
    write_las(tmp_path / "las" / "scene.las")
    model = {"class_path": "workbench.tasks.PointSegmentationTask", "init_args": {
        "backbone": "point_mae_tiny", "backbone_kwargs": dict(TINY_POINTS),
        "strategy": {"class_path": "workbench.strategies.Full"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}}}
    data = {"class_path": "datamodules.PointSegmentationDataModule", "init_args": {
        "root": str(tmp_path / "las"), "tile_size": 10.0, "num_points": 256, "features": ["intensity"],
        "train_repeats": 4, "batch_size": 8}}
    losses, results = fit_run(write_task_config(tmp_path, model, data, "val/mIoU", "max", 4))
    assert losses[-1] < losses[0]
    assert results["test"]["test/accuracy"] > 0.8  # roofs are 5 m up and brighter
