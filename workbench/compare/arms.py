"""The arms of a comparison: one fit per (strategy, training fraction, seed)."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import UserInputError


# The trivial baseline's name in --strategies: a constant fitted to the training targets
# (workbench.compare.trivial, run in its own process).
TRIVIAL = "trivial"

# Baselines every comparison should carry, written as arms: (strategy they run, fit overrides).
BASELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    # the pretrained model as shipped: no training step, its validation and test scores only
    "zero_shot": ("frozen", ("trainer.max_epochs=0",)),
    # the same architecture from random weights, every parameter trained
    "scratch": ("full", ("model.init_args.pretrained=null",)),
}


@dataclass(frozen=True)
class Arm:
    """One run of the base config: ``strategy`` (label as given), its class path and arguments;
    ``overrides`` are extra fit arguments of a baseline arm (``zero_shot``: fraction 0, no training)."""

    strategy: str
    class_path: str
    init_args: dict[str, Any]
    fraction: float
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Folder-safe unique name, e.g. ``lora_rank=4-f0.25-s0``."""
        label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.strategy.replace(":", "_"))
        return f"{label}-f{self.fraction:g}-s{self.seed}"

    def fit_args(self, base_config: str, out_dir: Path, resume: Path | None, extra: list[str] = ()) -> list[str]:
        """``workbench fit`` arguments: the base config with this arm's strategy, data and seed, then
        the comparison's ``extra`` overrides (``trainer.max_epochs=2``), then the arm's own (a
        zero-shot arm never trains)."""
        strategy = {"class_path": self.class_path, "init_args": self.init_args}
        args = [
            "fit",
            "--config", base_config,
            f"--model.init_args.strategy={json.dumps(strategy)}",
            f"--data.init_args.train_fraction={self.fraction or 1.0}",  # zero-shot: the data as is
            f"--seed_everything={self.seed}",
            run_logger_arg(out_dir, self.name),
            *(f"--{a.lstrip('-')}" for a in (*extra, *self.overrides)),
        ]  # fmt: skip
        return args + ([f"--ckpt_path={resume}"] if resume else [])

    def process_args(self, base_config: str, out_dir: Path, resume: Path | None, extra: list[str] = ()) -> list[str]:
        """The Python arguments of this arm's process: ``workbench fit`` with :meth:`fit_args`; the
        trivial baseline builds the same run in its own module and scores it without fitting."""
        args = self.fit_args(base_config, out_dir, resume, extra)
        if self.strategy == TRIVIAL:
            return ["-m", "workbench.compare.trivial", *args[1:]]  # no subcommand
        return ["-m", "workbench.cli", *args]


def run_logger_arg(out_dir: Path, name: str) -> str:
    """The ``--trainer.logger`` argument that puts a fit's run in ``<out_dir>/<name>/run``."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(out_dir), "name": name, "version": "run"}}
    return f"--trainer.logger={json.dumps(logger)}"


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``lora`` or ``lora:rank=4,target_modules=[a,b]`` → (class path, init args); values are YAML."""
    from workbench.strategies import STRATEGIES

    name, _, options = spec.partition(":")
    if name not in STRATEGIES:
        raise UserInputError(f"--strategies: unknown strategy {name!r}; known: {', '.join([*STRATEGIES, *BASELINES, TRIVIAL])}")
    init_args = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", options)):  # commas inside [...] stay
        key, sep, value = item.partition("=")
        if not sep:
            raise UserInputError(f"--strategies {spec!r}: write options as key=value, e.g. lora:rank=4,alpha=8")
        init_args[key.strip()] = yaml.safe_load(value)
    cls = STRATEGIES[name]
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}", init_args


def build_arms(strategies: list[str], fractions: list[float], seeds: list[int]) -> list[Arm]:
    """Every combination, strategies outermost (the table reads strategy by strategy). The
    :data:`BASELINES` are arms too: ``scratch`` like any strategy, ``zero_shot`` once (fraction
    0: no training data; deterministic, so one seed); ``trivial`` once per fraction (first seed)."""
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise UserInputError(f"--fractions: {fraction} is not in (0, 1]; use e.g. 0.1 0.25 0.5 1.0")
    arms = []
    for spec in strategies:
        name, _, options = spec.partition(":")
        if name == TRIVIAL:  # a constant fitted to each fraction's training targets replaces the model,
            # which is built (frozen, no feature cache) but never run
            if options:
                raise UserInputError(f"--strategies {spec}: {TRIVIAL} takes no options")
            arms += [Arm(spec, "workbench.strategies.Frozen", {"cache_features": False}, f, seeds[0]) for f in fractions]
            continue
        runs, overrides = BASELINES.get(name, (None, ()))
        parsed = parse_strategy(f"{runs}:{options}" if runs else spec)
        if name == "zero_shot":
            arms.append(Arm(spec, *parsed, 0.0, seeds[0], overrides))
            continue
        arms += [Arm(spec, *parsed, f, seed, overrides) for f, seed in itertools.product(fractions, seeds)]
    return arms
