"""``workbench merge``: merged exports, model soups, Fisher merging and task-vector merging (task
arithmetic, TIES, DARE, Model Breadcrumbs, LiNeS) of checkpoints."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from backbones.builder import create_backbone
from workbench.atomic import atomic_path
from workbench.errors import UserInputError
from workbench.merge.checkpoints import load_task, plain_weights, write_merged_checkpoint
from workbench.merge.weights import (
    StateDict,
    breadcrumbs,
    check_compatible,
    dare_pruner,
    fisher_merge,
    greedy_soup,
    lines,
    merge_task_vectors,
    uniform_soup,
)
from workbench.optim import layer_ids
from workbench.tasks.base import BaseTask

METHODS = ("adapters", "soup", "greedy_soup", "fisher", "task_arithmetic", "ties", "dare", "dare_ties",
           "breadcrumbs", "lines")
SOUPS = ("soup", "greedy_soup", "fisher")  # whole models averaged, no base: written as .ckpt only

DESCRIPTION = """\
Merge fine-tuned checkpoints of one base model.

  adapters         fold a checkpoint's LoRA-family / SSF adapters into its weights
  soup             uniform model soup: the mean of several checkpoints' weights
  greedy_soup      add checkpoints (best first) while the soup's validation metric does not drop
  fisher           Fisher merging: weights averaged with their diagonal Fisher information,
                   estimated on --fisher_batches training batches of --config
  task_arithmetic  base + scale * sum of task vectors (checkpoint - base), optional pruning
  ties             TIES merging: pruned task vectors, sign election, disjoint mean
  dare             DARE: drop task-vector entries at random (keep --density, --seed), rescale, sum
  dare_ties        DARE's drop and rescale, then TIES' sign election and disjoint mean
  breadcrumbs      Model Breadcrumbs: drop the --top largest and the smallest entries, keep --density
  lines            LiNeS: task arithmetic, each layer's change scaled from --alpha (first) to --beta (last)

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
    parser.add_argument("--config", nargs="+", help="greedy_soup: the fit config whose validation split scores "
                        "the soups; fisher: the fit config(s) whose training split estimates the Fisher "
                        "(one for all checkpoints, or one per checkpoint)")
    parser.add_argument("--metric", default="val/mIoU", help="greedy_soup: validation metric, higher is better")
    parser.add_argument("--base", help="task vectors: the pretrained backbone checkpoint the runs started from "
                                       "(default: the checkpoints' model.pretrained)")
    parser.add_argument("--scale", type=float, default=1.0, help="task vectors: λ on the merged task vector")
    parser.add_argument("--density", type=float, default=1.0, help="task vectors: fraction of entries kept per tensor "
                        "(ties, task_arithmetic, lines: the largest; dare: at random; breadcrumbs: below --top)")
    parser.add_argument("--seed", type=int, default=0, help="dare, dare_ties: seed of the random drop masks; "
                        "fisher: seed of the training batches' order")
    parser.add_argument("--top", type=float, default=0.01, help="breadcrumbs: fraction of largest-magnitude "
                        "entries (outliers) dropped per tensor; --density + --top must be at most 1")
    parser.add_argument("--alpha", type=float, default=0.5, help="lines: scale of the first layer's (embeddings') "
                        "merged task vector")
    parser.add_argument("--beta", type=float, default=1.0, help="lines: scale of the last layer's merged task "
                        "vector (decoder and head are not task vectors: they come from the first checkpoint)")
    parser.add_argument("--fisher_batches", type=int, default=8, help="fisher: training batches per checkpoint "
                        "that estimate its diagonal Fisher")
    parsed = parser.parse_args(args)
    method = parsed.method
    if method == "adapters" and len(parsed.checkpoints) != 1:
        raise UserInputError("adapters takes exactly one checkpoint")
    if method in SOUPS and not parsed.output.endswith(".ckpt"):
        raise UserInputError(f"{method} writes whole models: the output must be a .ckpt file")
    if method == "greedy_soup" and len(parsed.config or ()) != 1:
        raise UserInputError("greedy_soup needs one --config (its validation split scores the soups)")
    if method == "fisher" and len(parsed.config or ()) not in (1, len(parsed.checkpoints)):
        raise UserInputError("fisher needs --config: one fit config, or one per checkpoint (their training data)")
    if parsed.fisher_batches < 1:
        raise UserInputError("--fisher_batches must be at least 1")
    if not 0.0 < parsed.density <= 1.0:
        raise UserInputError("--density must be in (0, 1]")
    if method == "breadcrumbs" and not (0.0 <= parsed.top < 1.0 and parsed.density + parsed.top <= 1.0 + 1e-9):
        raise UserInputError(f"breadcrumbs keeps --density below the --top outliers: --density + --top must be "
                             f"at most 1 (got {parsed.density} + {parsed.top}), e.g. --top 0.01 --density 0.9")
    return parsed


def fit_data(config: str) -> Any:
    """The datamodule of a fit config."""
    from workbench.config import config_parser

    parser = config_parser("workbench merge", "", ("data",))
    return parser.instantiate_classes(parser.parse_args(["--config", config])).data


def validation_scorer(config: str, metric: str, task: BaseTask):
    """A function scoring plain model weights by ``metric`` on the config's validation split."""
    from lightning.pytorch import Trainer

    data = fit_data(config)
    task.model = task.strategy.merged(task.model)
    trainer = Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # one device: on several GPUs "auto" would relaunch merge per GPU

    def score(weights: StateDict) -> float:
        task.model.load_state_dict(weights)
        results = trainer.validate(task, datamodule=data, verbose=False)[0]
        if metric not in results:
            raise UserInputError(f"--metric {metric} is not logged; logged: {', '.join(sorted(results))}")
        print(f"workbench: soup candidate {metric} = {results[metric]:.4f}")
        return float(results[metric])

    return score


def diagonal_fisher(task: BaseTask, data: Any, batches: int, seed: int) -> StateDict:
    """The task's diagonal Fisher information for :func:`fisher_merge`, ``{name: F}`` over the
    plain model's parameters (each ``F`` shaped like its parameter).

    Empirical Fisher with the true labels (Matena & Raffel 2022, arXiv:2111.09832, use it beside
    the sampled-label Fisher): the mean over the first ``batches`` training batches (order fixed
    by ``seed``) of the squared gradient of the task's training loss, model in eval mode (no
    dropout, BatchNorm statistics untouched). Gradients are of whole batches, the cheap stand-in
    for per-example gradients; a config with ``batch_size: 1`` gives the per-example estimate.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.model = task.strategy.merged(task.model)
    task.to(device).eval()
    task.model.requires_grad_(True)
    params = dict(task.model.named_parameters())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(seed)
    seen = 0
    for index, batch in zip(range(batches), data.train_dataloader()):
        task.batch_idx = index
        task.model.zero_grad(set_to_none=True)
        task.compute_step(move_data_to_device(batch, device), "train").loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.float() ** 2
        seen += 1
    if seen == 0:
        raise UserInputError("fisher: the config's training split has no batches to estimate the Fisher from")
    return {name: (f / seen).cpu() for name, f in fisher.items()}


def base_backbone(task: BaseTask, base: str | None) -> nn.Module:
    """The backbone every checkpoint started from (``base`` or the checkpoints' pretrained weights)."""
    hp = task.hparams
    path = base or hp.pretrained
    if path is None:
        raise UserInputError(
            "task vectors need the weights the runs started from, but the checkpoints were trained from "
            "random init (model.pretrained: null): pass --base <pretrained checkpoint>."
        )
    return create_backbone(hp.backbone, hp.bands, path, hp.backbone_kwargs)


def key_layers(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: layer}, top)`` of ``backbone`` from its ``group_matcher``, numbered as
    :func:`workbench.optim.layer_ids` numbers them (embeddings 0, block ``i`` at ``i + 1``, head ``top``)."""
    layer_of, top = layer_ids(backbone)
    return {name: layer_of[id(p)] for name, p in backbone.named_parameters()}, top


def merge_backbones(opts: argparse.Namespace, backbone: nn.Module, finetuned: list[StateDict]) -> StateDict:
    """The task-vector methods on the backbones ``finetuned`` that started from ``backbone``."""
    base = backbone.state_dict()
    ties = opts.method in ("ties", "dare_ties")
    if opts.method in ("dare", "dare_ties"):
        return merge_task_vectors(base, finetuned, opts.scale, ties=ties, prune=dare_pruner(opts.density, opts.seed))
    if opts.method == "breadcrumbs":
        prune = partial(breadcrumbs, density=opts.density, top=opts.top)
        return merge_task_vectors(base, finetuned, opts.scale, prune=prune)
    merged = merge_task_vectors(base, finetuned, opts.scale, opts.density, ties=ties)
    if opts.method == "lines":
        try:
            layers, top = key_layers(backbone)
        except UserInputError as err:
            raise UserInputError(f"lines: {err}") from None
        merged = lines(base, merged, layers, top, opts.alpha, opts.beta)
    return merged


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
        merged, kept = greedy_soup(weights, validation_scorer(opts.config[0], opts.metric, tasks[0]))
        print(f"workbench: greedy soup keeps {[opts.checkpoints[i] for i in kept]}")
    elif opts.method == "fisher":
        configs = opts.config * len(tasks) if len(opts.config) == 1 else opts.config
        fishers = [diagonal_fisher(t, fit_data(c), opts.fisher_batches, opts.seed) for t, c in zip(tasks, configs)]
        merged = fisher_merge(weights, fishers)
    else:
        prefix = "backbone."
        backbones = [{k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)} for w in weights]
        backbone = merge_backbones(opts, base_backbone(tasks[0], opts.base), backbones)
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
