"""ukis-csmask's cloud / cloud-shadow U-Net: an EfficientNet-B4 encoder and a U-Net decoder trained
by DLR on Sentinel-2 L1C (and Landsat-8 SPARCS) scenes — a real, pretrained Earth-observation
segmentation network that installs offline (``pip install ukis-csmask``, Apache-2.0).

The package ships the weights as ONNX graphs (``ukis_csmask/model_6b_l1c.onnx`` + ``.json``).
Their initializers carry segmentation-models-pytorch names with a ``model.`` prefix; they are
converted with the ``onnx`` package at load time (float16 values → float32 tensors) and cached as
safetensors. :func:`checkpoint_filter_fn` is the one place the official names are mapped:
``model.encoder.*`` → this backbone, ``model.decoder.*`` / ``model.segmentation_head.0.*`` →
the ``unet`` decoder and the pixel head (:class:`~backbones.factory.PretrainedDecoder`).

The shipped graph computes in float16 (input cast to half, weights stored as half). The
converted model computes the same function in float32: on the same inputs it agrees with the
graph run in float32 by onnxruntime to ~1e-5, and with the shipped half-precision graph to within
half-precision rounding (tested in ``tests/test_csmask.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import Tensor

from backbones.factory import PretrainedDecoder, load_checked, register_backbone
from workbench.checkpoints import read_state_dict
from backbones.features import adapt_input_channels
from backbones.smp_encoders import SmpEncoder
from workbench.atomic import atomic_path, default_cache_dir
from workbench.errors import UserInputError

log = logging.getLogger(__name__)

# The model's bands (blue, green, red, nir, swir16, swir22 in its JSON) under workbench's canonical
# names: Sentinel-2 B2, B3, B4, B8A (narrow NIR, ~865 nm), B11, B12; Landsat-8 B2–B7.
CSMASK_BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
CSMASK_CLASSES = ("clear", "cloud", "cloud_shadow")
PREFIXES = {"encoder": "model.encoder.", "decoder": "model.", "head": "model.segmentation_head.0."}


def onnx_initializers(path: Path) -> dict[str, Tensor]:
    """The initializers of an ONNX file as float32 tensors by name, converted with ``onnx`` once
    and cached as safetensors under ``$WORKBENCH_CACHE/weights`` (keyed by the file's size and
    modification time, so a cache hit reads no ONNX bytes)."""
    stat = path.stat()
    cache = default_cache_dir() / "weights" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.safetensors"
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        return load_file(str(cache))
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserInputError(f"reading {path} needs the onnx package: pip install 'workbench[csmask]'") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:
        raise UserInputError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from None
    state = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype("float32")) for i in graph.initializer}
    with atomic_path(cache) as tmp:
        save_file(state, str(tmp), metadata={"source": str(path)})
    log.info("converted %d ONNX initializers of %s into %s", len(state), path, cache)
    return state


def checkpoint_filter_fn(state: dict[str, Tensor], model: CSMaskEncoder) -> tuple[dict[str, Tensor], PretrainedDecoder]:
    """Official ``model.*`` names → (encoder state for ``model.model``, decoder + head weights).

    The stem is adapted from :data:`CSMASK_BANDS` to the model's bands by name (new bands start
    at zero). Files saved without the ``model.`` prefix (a bare smp ``Unet`` state dict) work too.
    """
    if not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    parts = {part: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for part, p in PREFIXES.items()}
    encoder = parts["encoder"]
    if "_conv_stem.weight" in encoder and encoder["_conv_stem.weight"].shape[1] == len(CSMASK_BANDS):
        stem, new = adapt_input_channels(encoder["_conv_stem.weight"], CSMASK_BANDS, model.bands)
        encoder["_conv_stem.weight"] = stem
        if new:
            log.info("csmask stem: new bands %s start at zero", new)
    decoder = {k: v for k, v in parts["decoder"].items() if k.startswith("decoder.")}
    return encoder, PretrainedDecoder("unet", decoder, parts["head"], list(CSMASK_CLASSES))


def load_csmask(model: CSMaskEncoder, path: str | Path) -> dict[str, Any]:
    """Load the official ONNX file (or a state dict with its names) into ``model``; the decoder
    and head weights are kept on ``model.pretrained_decoder`` for the ``unet`` decoder."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"model.pretrained: {path} does not exist")
    state = onnx_initializers(path) if path.suffix == ".onnx" else read_state_dict(path)
    encoder, decoder = checkpoint_filter_fn(state, model)
    hint = "Is it ukis-csmask's 6-band model (model_6b_l1c.onnx / model_6b_l2a.onnx)?"
    report = load_checked(model.model, encoder, path, hint, allow_unexpected=False)
    if not decoder.decoder_state or set(decoder.head) != {"weight", "bias"}:
        raise UserInputError(f"{path} has no U-Net decoder / segmentation head keys (model.decoder.*). {hint}")
    model.pretrained_decoder = replace(decoder, source=str(path))
    log.info("loaded %d encoder tensors from %s (decoder: %d, head: %d)", report["loaded"], path,
             len(decoder.decoder_state), len(decoder.head))
    return report


class CSMaskEncoder(SmpEncoder):
    """The EfficientNet-B4 encoder of ukis-csmask with named input bands.

    Input ``(B, len(bands), H, W)``, H and W multiples of 32, reflectance normalised with the
    model's statistics (``pretrained_cfg['mean']`` / ``['std']``); features at strides 2 … 32
    (48, 32, 56, 160, 448 channels).
    """

    def __init__(self, bands: Sequence[str] = CSMASK_BANDS, **kwargs: Any) -> None:
        """
        Args:
            bands: names of the input bands; those the model was trained on keep their filters,
                others start at zero.
            **kwargs: :class:`~backbones.SmpEncoder` arguments (``depth``).
        """
        self.bands = list(bands)
        super().__init__("efficientnet-b4", in_chans=len(self.bands), **kwargs)
        self.pretrained_decoder: PretrainedDecoder | None = None

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] != len(self.bands):
            raise UserInputError(
                f"the csmask backbone expects {len(self.bands)} bands {self.bands} but the input has {x.shape[1]} "
                "channels: select those bands in the data config, or set the model bands to match"
            )
        return super().forward_intermediates(x)


default_cfgs = generate_default_cfgs({
    "csmask_unet_effb4_s2.l1c_6b": {
        "file": "ukis_csmask/model_6b_l1c.onnx",
        "source": "package",  # a file of the installed ukis_csmask package
        "input_size": (len(CSMASK_BANDS), 256, 256),
        # reflectance 0–1; the numbers of ukis_csmask/model_6b_l1c.json (tests check they agree)
        "mean": (0.27552253, 0.25566444, 0.26980153, 0.33431220, 0.20851291, 0.15826508),
        "std": (0.24488002, 0.22757471, 0.25371522, 0.23213787, 0.14873883, 0.12604216),
        "num_classes": len(CSMASK_CLASSES),
        "label_names": CSMASK_CLASSES,
        "first_conv": "model._conv_stem",
        "license": "apache-2.0",
        "origin_url": "https://github.com/dlr-eoc/ukis-csmask",
        "paper_name": "Wieland, Li, Martinis: Multi-sensor cloud and cloud shadow segmentation with a "
                      "convolutional neural network (Remote Sensing of Environment, 2019)",
        "description": "U-Net / EfficientNet-B4 cloud and cloud-shadow segmentation, Sentinel-2 L1C, 6 bands "
                       f"{list(CSMASK_BANDS)} (ukis-csmask 1.0.0, version 1.0.0-6BL1C)",
    },
})


register_backbone(CSMaskEncoder, "csmask_unet_effb4_s2", load_csmask,
                  "ukis-csmask 6-band L1C model; ``pretrained`` loads the installed package file (or a local "
                  "file). Use with ``decoder: unet``.", known_bands=CSMASK_BANDS)
