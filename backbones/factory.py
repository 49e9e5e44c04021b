"""Building registered backbones whose weights are local files in the family's official layout."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models import register_model
from torch import Tensor, nn

from workbench.errors import UserInputError

log = logging.getLogger(__name__)
TIMM_INTERNAL = ("pretrained_cfg", "cache_dir")  # passed by timm.create_model, unused here


@dataclass(frozen=True)
class PretrainedDecoder:
    """Task layers that came in a backbone's checkpoint (a whole pretrained segmentation model):
    ``decoder`` is the decoder name they fit (``unet``), ``decoder_state`` that decoder module's
    state dict, ``head`` the pixel head's ``weight`` / ``bias`` with one row per ``class_names``;
    ``source`` the file they were read from (for messages)."""

    decoder: str
    decoder_state: dict[str, Tensor]
    head: dict[str, Tensor]
    class_names: list[str]
    source: str = "the backbone's checkpoint"


def create_with_local_weights(
    model_cls: type[nn.Module],
    arch: dict[str, Any],
    load: Callable[[Any, str | Path], dict[str, Any]],
    pretrained: bool,
    **kwargs: Any,
) -> nn.Module:
    """``model_cls(**arch, **kwargs)``; with ``pretrained``, ``load(model, file)`` reads the file
    that :func:`workbench.tasks.create_backbone` put in ``pretrained_cfg_overlay``."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    for key in TIMM_INTERNAL:
        kwargs.pop(key, None)
    model = model_cls(**{**arch, **kwargs})
    if pretrained:
        if not overlay.get("file"):
            raise UserInputError(
                f"{model_cls.__name__} weights are not on a hub timm can reach: set model.pretrained to a local file"
            )
        load(model, overlay["file"])
    return model


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a local checkpoint (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``), unwrapped
    from ``state_dict`` / ``model`` / ``module`` / ``base_model`` containers.

    Files are read with ``weights_only=True``; official files that also pickle Python objects
    (DeepSpeed configs, Point-MAE metric objects) are unpickled fully, with a warning — only do
    that with files you trust.
    """
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist: give the path of a local .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                log.warning("%s holds Python objects besides tensors: unpickling it fully", path)
                state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unreadable or not a checkpoint at all
        raise UserInputError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "module", "base_model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserInputError(f"checkpoint {path} holds no state dict of tensors")
    return state


def load_checked(model: nn.Module, state: dict[str, Any], path: str | Path, hint: str,
                 allow_unexpected: bool = True) -> dict[str, Any]:
    """Load ``state`` (already renamed to ``model``'s keys) after checking that every key is there
    with its shape (and, unless ``allow_unexpected``, nothing else), else a clear error ending
    with ``hint``. Extra keys are ignored and reported; BatchNorm ``num_batches_tracked``
    counters missing from the file keep the model's own."""
    own = model.state_dict()
    # BatchNorm step counters are not weights (files converted from ONNX or TF lack them): keep ours
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = [] if allow_unexpected else sorted(set(state) - set(own))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = [f"{label} {items[:8]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file, model)", wrong)) if items]
        raise UserInputError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(found)}. {hint}")
    model.load_state_dict({k: state[k] for k in own})
    return {"file": str(path), "loaded": len(own), "ignored": sorted(set(state) - set(own))}


def load_own_layout(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a state dict saved from this very model class (a workbench export or
    ``torch.save(model.state_dict())``); wrapper prefixes such as ``backbone.`` are dropped."""
    state = read_state_dict(Path(path))
    own = set(model.state_dict())
    for prefix in ("module.", "model.", "backbone."):
        if not set(state) & own:
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return load_checked(model, state, path, "Check model.backbone_kwargs.")


def register_backbone(model_cls: type[nn.Module]) -> Callable[[Callable], Callable]:
    """Decorator: register a model function with timm and record the class it builds
    (``create_backbone`` passes ``bands`` or ``in_chans`` and checks arguments against it)."""

    def register(factory: Callable) -> Callable:
        factory.model_cls = model_cls
        return register_model(factory)

    return register
