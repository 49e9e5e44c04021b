"""Reading fine-tuned tasks back from their Lightning checkpoints and writing merged ones."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from workbench.atomic import atomic_path
from workbench.errors import UserInputError
from workbench.merge.weights import StateDict
from workbench.tasks.base import BaseTask


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a ``workbench fit`` checkpoint (trusted: it may hold pickled hparams)."""
    if not Path(path).is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (any unreadable file gets the same message)
        raise UserInputError(f"checkpoint {path} cannot be read ({err}); is it a `workbench fit` .ckpt?") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserInputError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def task_class(ckpt: dict[str, Any], path: str | Path) -> type[BaseTask]:
    """The task class a checkpoint was written by."""
    dotted = ckpt.get("workbench", {}).get("task") or ckpt.get("hyper_parameters", {}).get("_class_path")
    if not dotted:
        raise UserInputError(f"checkpoint {path} does not name its task class; was it written by `workbench fit`?")
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_task(path: str | Path) -> BaseTask:
    """Rebuild the task (backbone, strategy, heads) from a checkpoint alone and load its weights."""
    cls = task_class(read_checkpoint(path), path)
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)


def plain_weights(task: BaseTask, path: str | Path) -> StateDict:
    """The task model's weights with adapters merged into the base layers."""
    if not task.strategy.mergeable:
        raise UserInputError(
            f"{path} was trained with {task.strategy.name}, whose added modules cannot be merged into the "
            "base weights; merge checkpoints of mergeable strategies (full, lora, ssf, bitfit, ...)."
        )
    return task.strategy.merged(task.model).state_dict()


def write_merged_checkpoint(source: str | Path, model_weights: StateDict, out: str | Path, method: str,
                            sources: list[str]) -> Path:
    """Write ``model_weights`` (plain layout) as a checkpoint of ``source``'s task.

    The result loads like any fit checkpoint (``workbench test/predict --ckpt_path``): its
    ``merged`` flag makes the task merge its own adapters before loading. Optimizer and loop
    states are dropped: it is a model, not a resumable run.
    """
    ckpt = read_checkpoint(source)
    others = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.")}
    ckpt["state_dict"] = {**others, **{f"model.{k}": v for k, v in model_weights.items()}}
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        ckpt.pop(key, None)
    ckpt["workbench"] = {**ckpt.get("workbench", {}), "merged": True, "method": method, "sources": sources}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return out
