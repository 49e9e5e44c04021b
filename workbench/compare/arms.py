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


@dataclass(frozen=True)
class Arm:
    """One run of the base config: ``strategy`` (label as given), its class path and arguments."""

    strategy: str
    class_path: str
    init_args: dict[str, Any]
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        """Folder-safe unique name, e.g. ``lora_rank=4-f0.25-s0``."""
        label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.strategy.replace(":", "_"))
        return f"{label}-f{self.fraction:g}-s{self.seed}"

    def fit_args(self, base_config: str, out_dir: Path, resume: Path | None) -> list[str]:
        """``workbench fit`` arguments: the base config with this arm's strategy, data and seed."""
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(out_dir), "name": self.name, "version": "run"},
        }
        strategy = {"class_path": self.class_path, "init_args": self.init_args}
        args = [
            "fit",
            "--config", base_config,
            f"--model.init_args.strategy={json.dumps(strategy)}",
            f"--data.init_args.train_fraction={self.fraction}",
            f"--seed_everything={self.seed}",
            f"--trainer.logger={json.dumps(logger)}",
        ]  # fmt: skip
        return args + ([f"--ckpt_path={resume}"] if resume else [])


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``lora`` or ``lora:rank=4,alpha=8`` → (class path, init args); values are YAML scalars."""
    from workbench.strategies import STRATEGIES

    name, _, options = spec.partition(":")
    if name not in STRATEGIES:
        raise UserInputError(f"--strategies: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    init_args = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserInputError(f"--strategies {spec!r}: write options as key=value, e.g. lora:rank=4,alpha=8")
        init_args[key.strip()] = yaml.safe_load(value)
    cls = STRATEGIES[name]
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}", init_args


def build_arms(strategies: list[str], fractions: list[float], seeds: list[int]) -> list[Arm]:
    """Every combination, strategies outermost (the table reads strategy by strategy)."""
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise UserInputError(f"--fractions: {fraction} is not in (0, 1]; use e.g. 0.1 0.25 0.5 1.0")
    parsed = {spec: parse_strategy(spec) for spec in strategies}
    return [Arm(s, *parsed[s], f, seed) for s, f, seed in itertools.product(strategies, fractions, seeds)]
