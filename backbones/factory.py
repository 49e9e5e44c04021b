"""Building registered backbones whose weights are local files in the family's official layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm.models import register_model
from torch import nn

from workbench.errors import UserInputError

TIMM_INTERNAL = ("pretrained_cfg", "cache_dir")  # passed by timm.create_model, unused here


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


def load_own_layout(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a state dict saved from this very model class (a workbench export or
    ``torch.save(model.state_dict())``); wrapper prefixes such as ``backbone.`` are dropped."""
    from backbones.prithvi import read_state_dict

    state = read_state_dict(Path(path))
    own = set(model.state_dict())
    for prefix in ("module.", "model.", "backbone."):
        if not set(state) & own:
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return load_checked(model, state, path, "check model.backbone_kwargs")


def register_backbone(model_cls: type[nn.Module]) -> Callable[[Callable], Callable]:
    """Decorator: register a model function with timm and record the class it builds
    (``create_backbone`` passes ``bands`` or ``in_chans`` and checks arguments against it)."""

    def register(factory: Callable) -> Callable:
        factory.model_cls = model_cls
        return register_model(factory)

    return register


def load_checked(model: nn.Module, state: dict[str, Any], path: str | Path, hint: str) -> dict[str, Any]:
    """Load ``state`` (already renamed to ``model``'s keys; extra keys are ignored) after checking
    that every key is there with its shape, else a clear error ending with ``hint``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise UserInputError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:5]}, shapes (file, model) "
            f"{wrong[:5]}; {hint}"
        )
    model.load_state_dict({k: state[k] for k in own})
    return {"file": str(path), "loaded": len(own), "ignored": sorted(set(state) - set(own))}
