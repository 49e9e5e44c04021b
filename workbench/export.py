"""Export a fine-tuned model: adapter-only weights and merged plain weights."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import save_file

from workbench.atomic import atomic_path, write_json
from workbench.tasks.base import BaseTask


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def export_weights(task: BaseTask, out_dir: str | Path) -> dict[str, str]:
    """Write the task's :meth:`~workbench.tasks.BaseTask.export_tensors` as
    ``<kind>.safetensors`` into ``out_dir``, with ``export.json`` naming backbone, strategy and
    files; returns ``{kind: path}``.

    For most tasks: ``adapter.safetensors`` holds only what the strategy trained (e.g. LoRA
    matrices plus neck/decoder/head): small, and applied on top of the same pretrained backbone.
    ``merged.safetensors`` is the whole model with adapters merged into the base weights, in the
    plain (un-adapted) key layout, so it loads into the model built with the ``Full`` strategy
    at no extra inference cost; strategies that cannot be merged (VPT, AdaptFormer) write no
    ``merged.safetensors``. MAE pretraining writes ``encoder.safetensors`` (official Prithvi layout).
    """
    out = Path(out_dir)
    paths = {}
    for kind, tensors in task.export_tensors().items():
        paths[kind] = out / f"{kind}.safetensors"
        save_tensors(tensors, paths[kind])
    write_json(
        out / "export.json",
        {
            "backbone": task.hparams.backbone,
            "strategy": str(task.strategy_report),
            "files": {k: p.name for k, p in paths.items()},
        },
    )
    return {k: str(p) for k, p in paths.items()}


class ExportWeights(Callback):
    """At the end of ``fit``, export the best checkpoint's weights to ``<log_dir>/<dirname>``
    (:func:`export_weights`), from a task rebuilt from the checkpoint file alone: the live module
    may be wrapped by the strategy (FSDP shards its parameters, and gathering them would need every
    process), and the file is what ``predict`` and ``merge`` read. Without a best checkpoint,
    from the live module."""

    def __init__(self, dirname: str = "export") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = Path(trainer.log_dir or ".") / self.dirname  # log_dir is a collective: every rank asks
        if not trainer.is_global_zero or not isinstance(pl_module, BaseTask):
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            from workbench.merge.checkpoints import load_task

            pl_module = load_task(best)
        paths = export_weights(pl_module, out_dir)
        print(f"workbench: exported {', '.join(paths.values())}")
