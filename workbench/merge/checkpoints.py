"""Reading fine-tuned tasks back from their Lightning checkpoints and writing merged ones."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import instantiate_module

from workbench.atomic import atomic_path
from workbench.checkpoints import load_lightning_weights, read_lightning_checkpoint
from workbench.errors import UserInputError
from workbench.merge.weights import StateDict
from workbench.tasks.base import BaseTask


def task_class(ckpt: dict[str, Any], path: str | Path) -> type[BaseTask]:
    """The task class a checkpoint was written by."""
    dotted = ckpt.get("workbench", {}).get("task") or ckpt.get("hyper_parameters", {}).get("_class_path")
    if not dotted:
        raise UserInputError(f"checkpoint {path} does not name its task class; was it written by `workbench fit`?")
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def task_arguments(cls: type[BaseTask]) -> set[str]:
    """The constructor arguments of a task class and of the task bases its ``**kwargs`` go to."""
    return {name for klass in cls.__mro__ if issubclass(klass, BaseTask) and "__init__" in vars(klass)
            for name, p in inspect.signature(klass.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def load_task(path: str | Path) -> BaseTask:
    """Rebuild the task (backbone, strategy, heads) from a checkpoint alone and load its weights.

    Saved hyper-parameters the task does not take are left out: the CLI links ``num_classes``,
    ``class_names`` and ``bands`` from every datamodule, also to tasks without those arguments.
    """
    ckpt = read_lightning_checkpoint(path)
    cls = task_class(ckpt, path)
    saved = ckpt.get("hyper_parameters", {})
    hparams = {k: v for k, v in saved.items() if k in task_arguments(cls) or k == "_class_path"}
    task = instantiate_module(cls, hparams) if "_instantiator" in saved else cls(**hparams)
    load_lightning_weights(task, ckpt, path)
    return task


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
    ckpt = read_lightning_checkpoint(source)
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
