"""The real pretrained ukis-csmask U-Net: official ONNX layout, conversion against onnxruntime,
band and class adaptation, every conv-capable strategy, and the Landsat-8 cloud data.

Tests that need the real weights skip when ``ukis-csmask`` / ``onnxruntime`` are not installed
(``pip install -e ".[dev]"`` installs both)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from backbones.csmask import CSMASK_BANDS, CSMASK_CLASSES, checkpoint_filter_fn, onnx_initializers
from backbones.factory import resolve_weights
from backbones.smp_encoders import SmpEncoder
from datamodules.landsat8 import REFLECTANCE_ADD, REFLECTANCE_MULT, bqa_cloud_mask, build_landsat8_clouds
from tests.conftest import write_geotiff
from workbench.errors import UserInputError
from workbench.strategies import (
    SSF, VPT, AdaptFormer, BitFit, Frozen, Full, HalfFineTuning, LastBlocks, LoRA, NormOnly, count_parameters,
)
from workbench.tasks import SegmentationTask

POINTWISE = ["_expand_conv", "_project_conv", "_se_reduce", "_se_expand"]


def csmask_task(**kwargs) -> SegmentationTask:
    args = {"backbone": "csmask_unet_effb4_s2", "decoder": "unet", "bands": list(CSMASK_BANDS), "num_classes": 2,
            "class_names": ["clear", "cloud"], "head_dropout": 0.0, **kwargs}
    return SegmentationTask(**args)


@pytest.fixture(scope="module")
def onnx_file() -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    try:
        return resolve_weights(timm.models.get_pretrained_cfg("csmask_unet_effb4_s2").to_dict())
    except UserInputError:
        pytest.skip("ukis-csmask is not installed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh ``$WORKBENCH_CACHE`` for this module: the conversion cache is tested too."""
    path, before = tmp_path_factory.mktemp("cache"), os.environ.get("WORKBENCH_CACHE")
    os.environ["WORKBENCH_CACHE"] = str(path)
    yield path
    if before is None:
        del os.environ["WORKBENCH_CACHE"]
    else:
        os.environ["WORKBENCH_CACHE"] = before


@pytest.fixture(scope="module")
def official_state(onnx_file: Path, cache_dir: Path) -> dict[str, torch.Tensor]:
    return onnx_initializers(onnx_file)


def test_official_onnx_names_map_onto_the_model(official_state: dict, onnx_file: Path, cache_dir: Path) -> None:
    """The shipped file's own initializer names (not ours with a prefix): 655 tensors under
    model.encoder / model.decoder / model.segmentation_head, all used, none missing."""
    assert len(official_state) == 655
    assert official_state["model.encoder._conv_stem.weight"].shape == (48, 6, 3, 3)
    assert official_state["model.encoder._blocks.31._project_conv.weight"].shape == (448, 2688, 1, 1)
    assert official_state["model.decoder.blocks.0.conv1.0.weight"].shape == (256, 608, 3, 3)
    assert official_state["model.segmentation_head.0.weight"].shape == (3, 16, 3, 3)
    assert {k.split(".")[1] for k in official_state} == {"encoder", "decoder", "segmentation_head"}
    assert all(v.dtype == torch.float32 for v in official_state.values())  # stored as float16, widened
    cached = list(cache_dir.glob("weights/model_6b_l1c-*.safetensors"))
    assert len(cached) == 1 and not list(cached[0].parent.glob("*.tmp-*"))
    task = csmask_task(pretrained=str(onnx_file), num_classes=3, class_names=list(CSMASK_CLASSES))
    own = {**{f"model.encoder.{k}": v for k, v in task.model.backbone.model.state_dict().items()},
           **{f"model.{k}": v for k, v in task.model.decoder.state_dict().items()},
           **{f"model.segmentation_head.0.{k}": v for k, v in task.model.head.conv.state_dict().items()}}
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    assert set(own) == set(official_state)
    assert all(torch.equal(own[k], official_state[k]) for k in own)


def promoted_to_float32(path: Path) -> bytes:
    """The shipped graph with its float16 weights, constants and casts widened to float32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
    del model.graph.value_info[:]
    return model.SerializeToString()


def test_converted_model_equals_onnxruntime(official_state: dict, onnx_file: Path) -> None:
    """The converted model is the shipped network: to float32 rounding against the same graph
    run in float32 by onnxruntime; against the shipped graph, which computes in float16, it
    differs by no more than that graph's own half-precision rounding (the float32 graph's distance
    to it) — the cause of the ~1e-2 logit differences."""
    import onnxruntime as ort

    task = csmask_task(pretrained=True, num_classes=3, class_names=list(CSMASK_CLASSES)).eval()
    x = np.random.default_rng(0).standard_normal((1, 6, 256, 256)).astype(np.float32)
    with torch.no_grad():
        ours = task(torch.from_numpy(x)).numpy()
    providers = ["CPUExecutionProvider"]
    shipped = ort.InferenceSession(str(onnx_file), providers=providers).run(None, {"input": x})[0]
    widened = ort.InferenceSession(promoted_to_float32(onnx_file), providers=providers).run(None, {"input": x})[0]
    assert np.abs(ours - widened).max() < 1e-4  # float32 vs float32: summation order only
    half_rounding = np.abs(shipped - widened).max()
    assert 1e-3 < half_rounding < 0.2  # the shipped graph really is half precision
    assert np.abs(ours - shipped).max() <= half_rounding + 1e-4
    assert (ours.argmax(1) == shipped.argmax(1)).mean() > 0.99


def test_statistics_and_bands_match_the_package_json(onnx_file: Path) -> None:
    import timm

    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    cfg = timm.create_model("csmask_unet_effb4_s2").pretrained_cfg
    mean, std = meta["data"]["dataset_statistics"]["img"]
    assert np.allclose(cfg["mean"], mean, atol=1e-7) and np.allclose(cfg["std"], std, atol=1e-7)
    assert meta["data"]["dataset_statistics"]["band_names"] == ["blue", "green", "red", "nir", "swir16", "swir22"]
    assert meta["data"]["classes"] == len(CSMASK_CLASSES) == cfg["num_classes"]
    config = Path(__file__).parents[1] / "configs" / "l8_clouds_csmask.yaml"
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    assert np.allclose(data["mean"], mean, atol=1e-7) and np.allclose(data["std"], std, atol=1e-7)


def test_bands_adapt_by_name_and_classes_by_name(official_state: dict) -> None:
    stem = official_state["model.encoder._conv_stem.weight"]
    task = csmask_task(pretrained=True, bands=["RED", "NIR_NARROW", "THERMAL", "BLUE"],
                       num_classes=2, class_names=["cloud", "snow"])
    adapted = task.model.backbone.model._conv_stem.weight
    for i, band in enumerate(["RED", "NIR_NARROW", None, "BLUE"]):
        expected = stem[:, CSMASK_BANDS.index(band)] if band else torch.zeros_like(stem[:, 0])
        assert torch.equal(adapted[:, i], expected)
    head = official_state["model.segmentation_head.0.weight"]
    assert torch.equal(task.model.head.conv.weight[0], head[CSMASK_CLASSES.index("cloud")])
    assert not any(torch.equal(task.model.head.conv.weight[1], row) for row in head)  # snow: new
    decoder = task.model.decoder.state_dict()
    assert all(torch.equal(v, official_state[f"model.{k}"]) for k, v in decoder.items()
               if not k.endswith("num_batches_tracked"))
    with pytest.raises(UserInputError, match="decoder_channels"):
        csmask_task(pretrained=True, decoder_channels=128)


def test_filter_accepts_a_bare_smp_state_dict(official_state: dict) -> None:
    bare = {k.removeprefix("model."): v for k, v in official_state.items()}
    model = csmask_task().model.backbone
    encoder, decoder = checkpoint_filter_fn(bare, model)
    assert torch.equal(encoder["_conv_stem.weight"], official_state["model.encoder._conv_stem.weight"])
    assert decoder.class_names == list(CSMASK_CLASSES) and set(decoder.head) == {"weight", "bias"}


def test_plain_convs_equal_smp_convs_and_keep_names() -> None:
    """Symmetric TF-'same' convs become plain nn.Conv2d: same names, same outputs as smp's own
    encoder; only the 4 asymmetric stride-2 ones (stem + 3 depthwise) stay smp's class."""
    from segmentation_models_pytorch.encoders import get_encoder
    from segmentation_models_pytorch.encoders._efficientnet import Conv2dStaticSamePadding

    torch.manual_seed(0)
    reference = get_encoder("efficientnet-b4", in_channels=6, weights=None).eval()
    ours = SmpEncoder("efficientnet-b4", in_chans=6).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(("_conv_head", "_bn1"))}
    ours.model.load_state_dict(state)
    x = torch.randn(2, 6, 64, 96)
    with torch.no_grad():
        expected = reference(x)[1:]
        got = ours.forward_intermediates(x)
    assert len(got) == len(expected) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got))
    torch.testing.assert_close(ours(x), got[-1])  # forward_features: the deepest map
    kinds = [type(m) for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert kinds.count(Conv2dStaticSamePadding) == 4
    pointwise = sum(1 for n, m in ours.named_modules() if n.rsplit(".", 1)[-1] in POINTWISE)
    assert pointwise == 126  # the ONNX graph has 126 such 1x1 convs


def _params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("name", ["frozen", "full", "lora", "dora", "bitfit", "norm", "ssf", "last_k"])
def test_conv_strategy_counts_are_exact(name: str) -> None:
    """Trainable parameters of each conv-capable strategy against a count from the plain model."""
    plain = csmask_task().model
    encoder = plain.backbone.model
    head = _params([plain.decoder, plain.head])
    convs = [m for n, m in encoder.named_modules() if n.rsplit(".", 1)[-1] in POINTWISE]
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = {
        "frozen": head,
        "full": head + _params([encoder]),
        "lora": head + sum(8 * (c.in_channels + c.out_channels) for c in convs),
        "dora": head + sum(8 * (c.in_channels + c.out_channels) + c.out_channels for c in convs),
        "bitfit": head + sum(p.numel() for n, p in encoder.named_parameters() if n.endswith(".bias")),
        "norm": head + _params(bns),
        "ssf": head + sum(m.out_channels * (1 if m.bias is None else 2)  # scale (+ shift where a bias is)
                          for m in encoder.modules() if isinstance(m, nn.Conv2d)),
        "last_k": head + _params(encoder._blocks[22:]),  # stride-32 stage: blocks 22-31
    }[name]
    strategy = {"frozen": Frozen(), "full": Full(), "lora": LoRA(target_modules=POINTWISE),
                "dora": LoRA(target_modules=POINTWISE, use_dora=True), "bitfit": BitFit(), "norm": NormOnly(),
                "ssf": SSF(), "last_k": LastBlocks(1)}[name]
    task = csmask_task(strategy=strategy)
    assert count_parameters(task.model)[0] == expected
    task.train()
    task(torch.randn(2, 6, 64, 64)).square().mean().backward()  # every strategy runs and trains
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_last_stages_of_a_resnet_encoder() -> None:
    task = SegmentationTask(backbone="smp:resnet18", decoder="unet", bands=list(CSMASK_BANDS), num_classes=2,
                            strategy=LastBlocks(2))
    resnet = task.model.backbone.model
    expected = _params([resnet.layer3, resnet.layer4, task.model.decoder, task.model.head])
    assert count_parameters(task.model)[0] == expected
    with pytest.raises(UserInputError, match="has 5 stages"):
        SegmentationTask(backbone="smp:resnet18", decoder="unet", bands=list(CSMASK_BANDS), strategy=LastBlocks(6))


@pytest.mark.parametrize(("strategy", "message"), [
    (LoRA(target_modules=["_conv_stem"]), "asymmetric padding"),
    (LoRA(target_modules=["attn.qkv"]), "_expand_conv, _project_conv"),
    (VPT(), "needs a plain ViT"),
    (AdaptFormer(), "acts per block"),
    (HalfFineTuning(), "acts per block"),
])
def test_strategies_that_cannot_apply_refuse_in_one_line(strategy, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        csmask_task(strategy=strategy)


def test_bqa_cloud_bits() -> None:
    confidence = np.array([0, 1, 2, 3], dtype=np.uint16) << 14
    bqa = np.array([confidence | 2, confidence | 1])  # second row: fill
    assert bqa_cloud_mask(bqa).tolist() == [[0, 0, 1, 1], [255] * 4]
    assert bqa_cloud_mask(bqa, min_confidence=3).tolist()[0] == [0, 0, 0, 1]


def test_landsat8_build_rescales_to_reflectance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "l8"
    dn = {b: rng.integers(5000, 20000, (1, 40, 48), dtype=np.uint16) for b in ("B2", "B3", "B4", "B5", "B6", "B7")}
    for band, array in dn.items():
        write_geotiff(source / f"l8_{band}.tif", array, crs="EPSG:32616")
    bqa = (rng.integers(0, 4, (1, 40, 48)).astype(np.uint16) << 14) | 2
    write_geotiff(source / "l8_BQA.tif", bqa, crs="EPSG:32616")
    paths = build_landsat8_clouds(source, tmp_path / "out")
    import rasterio

    with rasterio.open(paths["image"]) as src:
        stack = src.read()
        assert src.crs.to_epsg() == 32616 and src.descriptions == tuple(CSMASK_BANDS)
    expected = np.concatenate([dn[b] for b in dn]).astype(np.float32) * REFLECTANCE_MULT + REFLECTANCE_ADD
    assert np.allclose(stack, expected, atol=1e-7)
    with rasterio.open(paths["mask"]) as src:
        assert np.array_equal(src.read(1), (bqa[0] >> 14 >= 2).astype(np.uint8))
    stats = json.loads(paths["stats"].read_text())
    assert np.allclose(stats["mean"], expected.reshape(6, -1).mean(1), rtol=1e-4)


def test_zero_shot_fit_reports_the_shipped_model(onnx_file: Path, tmp_path: Path) -> None:
    """The compare `zero_shot` arm (fit with max_epochs=0, frozen) tests the pretrained model as
    shipped: its test cloud IoU equals the IoU computed here directly from the un-trained model."""
    import yaml
    from torchmetrics.classification import MulticlassJaccardIndex

    from datamodules import Landsat8CloudDataModule
    from workbench.cli import main

    config = Path(__file__).parents[1] / "configs" / "l8_clouds_csmask.yaml"
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "zs", "version": "run"}}
    frozen = {"class_path": "workbench.strategies.Frozen", "init_args": {}}
    assert main(["fit", "--config", str(config), "--trainer.max_epochs=0", "--data.init_args.num_workers=0",
                 f"--trainer.logger={json.dumps(logger)}", f"--model.init_args.strategy={json.dumps(frozen)}",
                 "--trainer.enable_progress_bar=false"]) == 0
    results = json.loads((tmp_path / "zs" / "run" / "results.json").read_text())
    data_args = yaml.safe_load(config.read_text())["data"]["init_args"]
    data = Landsat8CloudDataModule(**{**data_args, "num_workers": 0})
    data.setup("test")
    task = csmask_task(pretrained=True).eval()
    iou = MulticlassJaccardIndex(2, average="none", ignore_index=255)
    with torch.no_grad():
        for batch in data.test_dataloader():
            iou.update(task(batch["image"]).argmax(1), batch["mask"])
    assert results["test"]["test/IoU_cloud"] == pytest.approx(iou.compute()[1].item(), abs=1e-6)


def test_predict_without_checkpoint_maps_zero_shot(onnx_file: Path, tmp_path: Path) -> None:
    """`workbench predict` without --ckpt_path maps with the shipped weights (zero-shot): one
    window covering the scene gives exactly the model's own classes; a random-init model refuses."""
    import rasterio

    from workbench.cli import main

    rng = np.random.default_rng(0)
    scene = (rng.random((6, 64, 64)) * 0.5).astype(np.float32)
    write_geotiff(tmp_path / "scene.tif", scene, crs="EPSG:32616")
    config = Path(__file__).parents[1] / "configs" / "l8_clouds_csmask.yaml"
    args = ["predict", "--config", str(config), "--inputs", str(tmp_path / "scene.tif"), "--output_dir",
            str(tmp_path / "out"), "--window", "64", "--overlap", "0", "--quicklook", "false"]
    assert main(args) == 0
    with rasterio.open(tmp_path / "out" / "scene_classes.tif") as src:
        classes = src.read(1)
    task = csmask_task(pretrained=True).eval()
    mean, std = (np.array(task.model.backbone.pretrained_cfg[k], np.float32)[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        expected = task(torch.from_numpy((scene - mean) / std)[None]).argmax(1)[0].numpy()
    assert np.array_equal(classes, expected)
    assert main([*args, "--model.init_args.pretrained=null"]) == 2  # random weights: refused
