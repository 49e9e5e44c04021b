"""``workbench merge``: merged exports, model soups and task-vector merging of checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from backbones.builder import create_backbone
from workbench.atomic import atomic_path
from workbench.errors import UserInputError
from workbench.merge.checkpoints import load_task, plain_weights, write_merged_checkpoint
from workbench.merge.weights import StateDict, check_compatible, greedy_soup, merge_task_vectors, uniform_soup
from workbench.tasks.base import BaseTask

METHODS = ("adapters", "soup", "greedy_soup", "task_arithmetic", "ties")

DESCRIPTION = """\
Merge fine-tuned checkpoints of one base model.

  adapters         fold a checkpoint's LoRA-family / SSF adapters into its weights
  soup             uniform model soup: the mean of several checkpoints' weights
  greedy_soup      add checkpoints (best first) while the soup's validation metric does not drop
  task_arithmetic  base + scale * sum of task vectors (checkpoint - base), optional pruning
  ties             TIES merging: pruned task vectors, sign election, disjoint mean

Outputs ending in .ckpt load like any fit checkpoint (`workbench test|predict --ckpt_path`);
task-vector methods may also write the merged backbone alone (.safetensors), which a config
loads through `model.init_args.pretrained`.
"""


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="workbench merge", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="fit checkpoints (.ckpt)")
    parser.add_argument("--output", required=True, help="merged .ckpt (or backbone .safetensors for task vectors)")
    parser.add_argument("--config", help="greedy_soup: the fit config whose validation split scores the soups")
    parser.add_argument("--metric", default="val/mIoU", help="greedy_soup: validation metric, higher is better")
    parser.add_argument("--base", help="task vectors: the pretrained backbone checkpoint the runs started from "
                                       "(default: the checkpoints' model.pretrained)")
    parser.add_argument("--scale", type=float, default=1.0, help="task vectors: λ on the merged task vector")
    parser.add_argument("--density", type=float, default=1.0, help="task vectors: fraction of entries kept per tensor")
    parsed = parser.parse_args(args)
    if parsed.method == "adapters" and len(parsed.checkpoints) != 1:
        parser.error("adapters takes exactly one checkpoint")
    if parsed.method in ("soup", "greedy_soup") and not parsed.output.endswith(".ckpt"):
        parser.error("soups are written as .ckpt files")
    if parsed.method == "greedy_soup" and not parsed.config:
        parser.error("greedy_soup needs --config (its validation split scores the soups)")
    if not 0.0 < parsed.density <= 1.0:
        parser.error("--density must be in (0, 1]")
    return parsed


def validation_scorer(config: str, metric: str, task: BaseTask):
    """A function scoring plain model weights by ``metric`` on the config's validation split."""
    from lightning.pytorch import Trainer

    from workbench.config import config_parser

    parser = config_parser("workbench merge", "", ("data",))
    data = parser.instantiate_classes(parser.parse_args(["--config", config])).data
    task.model = task.strategy.merged(task.model)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def score(weights: StateDict) -> float:
        task.model.load_state_dict(weights)
        results = trainer.validate(task, datamodule=data, verbose=False)[0]
        if metric not in results:
            raise UserInputError(f"--metric {metric} is not logged; logged: {', '.join(sorted(results))}")
        print(f"workbench: soup candidate {metric} = {results[metric]:.4f}")
        return float(results[metric])

    return score


def base_backbone_weights(task: BaseTask, base: str | None) -> StateDict:
    """The backbone weights every checkpoint started from, in the model's own layout."""
    hp = task.hparams
    path = base or hp.pretrained
    if path is None:
        raise UserInputError(
            "task vectors need the weights the runs started from, but the checkpoints were trained from "
            "random init (model.pretrained: null): pass --base <pretrained checkpoint>."
        )
    return create_backbone(hp.backbone, hp.bands, path, hp.backbone_kwargs).state_dict()


def run_merge(args: list[str]) -> Path:
    """Run ``workbench merge``; returns the written file."""
    opts = parse_args(args)
    tasks = [load_task(p) for p in opts.checkpoints]
    weights = [plain_weights(t, p) for t, p in zip(tasks, opts.checkpoints)]
    try:
        check_compatible(weights, opts.checkpoints)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    if opts.method == "adapters":
        merged = weights[0]
    elif opts.method == "soup":
        merged = uniform_soup(weights)
    elif opts.method == "greedy_soup":
        merged, kept = greedy_soup(weights, validation_scorer(opts.config, opts.metric, tasks[0]))
        print(f"workbench: greedy soup keeps {[opts.checkpoints[i] for i in kept]}")
    else:
        base = base_backbone_weights(tasks[0], opts.base)
        prefix = "backbone."
        backbones = [{k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)} for w in weights]
        backbone = merge_task_vectors(base, backbones, opts.scale, opts.density, ties=opts.method == "ties")
        if not opts.output.endswith(".ckpt"):
            out = Path(opts.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                save_file({k: v.contiguous() for k, v in backbone.items()}, str(tmp))
            print(f"workbench: wrote merged backbone {out}; use it as model.init_args.pretrained")
            return out
        merged = {**weights[0], **{prefix + k: v for k, v in backbone.items()}}
    out = write_merged_checkpoint(opts.checkpoints[0], merged, opts.output, opts.method, opts.checkpoints)
    print(f"workbench: wrote {out} ({opts.method} of {len(opts.checkpoints)} checkpoint(s))")
    return out
