"""The one checkpoint reader of the project: backbone weight files (``.pt``/``.pth``/``.ckpt``,
``.safetensors``) and Lightning checkpoints written by ``workbench fit``, each with one clear error
naming the file when it is missing, unreadable or not what the caller expects.

A base module (imports nothing of the project but :mod:`workbench.errors`), so the lower layers
(``backbones``) read their official files through it too.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from workbench.errors import UserInputError

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

log = logging.getLogger(__name__)
CONTAINER_KEYS = ("state_dict", "model_state", "model", "module", "base_model")  # official files nest weights so


def read_file(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """The object stored in ``path``; ``what`` names the file in errors (``--ckpt_path``,
    ``model.pretrained``, ...); ``mmap``: map a ``torch.save`` file instead of reading it (cheap
    when only a few entries are needed).

    ``.safetensors`` files give their tensors. Others are read with ``torch.load(weights_only=True)``;
    files that also pickle Python objects (Lightning hyper-parameters holding a strategy object,
    DeepSpeed configs, Point-MAE metric objects) are unpickled fully, with a warning — only do that
    with files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist: give the path of a local checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            log.warning("%s holds Python objects besides tensors: unpickling it fully", path)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # noqa: BLE001  (truncated, corrupt or not a checkpoint at all: one message)
        raise UserInputError(f"{what} {path} could not be read ({type(err).__name__}: {err})") from None


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a weight file, unwrapped from ``state_dict`` / ``model_state`` / ``model`` /
    ``module`` / ``base_model`` containers."""
    state = read_file(path, what)
    for key in CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserInputError(f"{what} {path} holds no state dict of tensors")
    return state


def read_lightning_checkpoint(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The dict of a Lightning checkpoint (``state_dict``, ``hyper_parameters``, loop state, ...)."""
    ckpt = read_file(path, what, mmap)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserInputError(
            f"{what} {path} is not a Lightning checkpoint (no state_dict): give a .ckpt written by `workbench fit`"
        )
    return ckpt


def load_lightning_weights(module: LightningModule, ckpt: dict[str, Any], path: str | Path,
                           what: str = "checkpoint") -> None:
    """Load the weights of a Lightning checkpoint dict into ``module``, after its
    ``on_load_checkpoint`` hook (which may reshape the model, e.g. merge adapters); a mismatch
    names the keys."""
    module.on_load_checkpoint(ckpt)
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserInputError(
            f"{what} {path} does not match the model built from the config (was it trained with another "
            f"backbone, decoder or strategy?): missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
