"""The search space of ``workbench tune``: a YAML file mapping dotted fit-config keys to Optuna
distributions (or to fixed values every trial gets), and one trial's config overrides from it.

    model.init_args.optimizer.init_args.lr: loguniform(1e-5, 1e-2)
    model.init_args.strategy: choice(frozen, lora, full)
    model.init_args.strategy.init_args.rank: int(4, 32, log)
    trainer.max_epochs: 4        # not a distribution: the same value in every trial
"""

from __future__ import annotations

import copy
import inspect
import re
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import UserInputError

FORMS = "loguniform(a, b), uniform(a, b), int(a, b), int(a, b, log), choice(x, y, ...) or a fixed value"
STRATEGY_KEY = "model.init_args.strategy"  # its choices are strategy short names (as in `workbench compare`)
STRATEGY_ARG_PREFIX = f"{STRATEGY_KEY}.init_args."
CALL = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


def _number(text: Any, kind: type, key: str, spec: str) -> float | int:
    """``text`` (one argument of ``spec``) as ``kind``; YAML reads ``1e-5`` as a string, so convert."""
    try:
        return kind(str(text))
    except ValueError:
        raise UserInputError(f"search space key {key}: {text!r} in {spec!r} is not {'an integer' if kind is int else 'a number'}; "
                             f"accepted forms: {FORMS}") from None


def _choice_value(item: Any) -> Any:
    """A choice as YAML reads it, with numbers YAML misses (``1e-3``) made floats."""
    if isinstance(item, str):
        try:
            return float(item)
        except ValueError:
            return item
    return item


def parse_distribution(key: str, spec: Any) -> Any:
    """The Optuna distribution of ``spec`` (``loguniform(1e-5, 1e-2)``, ...), or None when ``spec``
    is a fixed value; a malformed form is a :class:`UserInputError` naming ``key``."""
    import optuna

    call = CALL.match(spec) if isinstance(spec, str) else None
    if call is None:
        return None
    name, inner = call.group(1), call.group(2)
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        args = None
    bad = f"search space key {key}: {spec!r} is not a valid form; accepted forms: {FORMS}"
    if not isinstance(args, list):
        raise UserInputError(bad)
    numeric = (name in ("uniform", "loguniform") and len(args) == 2) or (
        name == "int" and len(args) in (2, 3) and args[2:] in ([], ["log"]))
    if numeric:
        kind, log = (int, len(args) == 3) if name == "int" else (float, name == "loguniform")
        low, high = (_number(a, kind, key, spec) for a in args[:2])
        if not low < high or (log and low <= 0):
            raise UserInputError(f"search space key {key}: {spec!r} needs low < high{' and low > 0' if log else ''}")
        distribution = optuna.distributions.IntDistribution if kind is int else optuna.distributions.FloatDistribution
        return distribution(low, high, log=log)
    if name == "choice" and args:
        choices = tuple(_choice_value(a) for a in args)
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserInputError(f"search space key {key}: {spec!r}: choices must be numbers, strings, true/false or null")
        if key == STRATEGY_KEY:
            for choice in choices:
                strategy_config(key, choice)  # an unknown strategy fails before any trial runs
        return optuna.distributions.CategoricalDistribution(choices)
    raise UserInputError(bad)


def strategy_config(key: str, choice: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a strategy short name such as ``lora:rank=4``."""
    from workbench.compare.arms import parse_strategy

    try:
        class_path, init_args = parse_strategy(str(choice))
    except UserInputError as err:
        raise UserInputError(f"search space key {key}: {str(err).removeprefix('--strategies: ')}") from None
    return {"class_path": class_path, "init_args": init_args}


def read_space(path: str | Path) -> dict[str, Any]:
    """Key → distribution (or fixed value) from the YAML file ``path``, the strategy first (its
    arguments depend on which one a trial picks)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--space {path} does not exist; write a YAML file of `dotted.key: {FORMS}`")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserInputError(f"--space {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(entries, dict) or not entries:
        raise UserInputError(f"--space {path}: write one `dotted.key: distribution` per line, e.g. "
                             "`model.init_args.optimizer.init_args.lr: loguniform(1e-5, 1e-2)`")
    space = {}
    for key in sorted(entries, key=lambda k: k != STRATEGY_KEY):
        distribution = parse_distribution(str(key), entries[key])
        space[str(key)] = entries[key] if distribution is None else distribution
    return space


def accepts(class_path: str, argument: str) -> bool:
    """Whether the class at ``class_path`` takes ``argument`` in its constructor."""
    module, _, name = class_path.rpartition(".")
    parameters = inspect.signature(getattr(import_module(module), name)).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def suggest(trial: Any, key: str, spec: Any) -> Any:
    """``trial``'s value of ``key`` from its distribution ``spec``; a fixed value as is."""
    import optuna

    if isinstance(spec, optuna.distributions.FloatDistribution):
        return trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    if isinstance(spec, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, spec.low, spec.high, log=spec.log)
    if isinstance(spec, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, spec.choices)
    return spec


def sample_overrides(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """One trial's config overrides (dotted key → value), each distribution sampled by ``trial``.
    A strategy short name becomes its config; the strategy's arguments in the space go into it, and
    are sampled only when that strategy takes them (``rank`` for lora, not for frozen)."""
    overrides: dict[str, Any] = {}
    for key, spec in space.items():
        strategy = overrides.get(STRATEGY_KEY)
        if key.startswith(STRATEGY_ARG_PREFIX) and isinstance(strategy, dict) and "class_path" in strategy:
            argument = key.removeprefix(STRATEGY_ARG_PREFIX)
            if accepts(strategy["class_path"], argument):
                strategy.setdefault("init_args", {})[argument] = suggest(trial, key, spec)
            continue
        value = copy.deepcopy(suggest(trial, key, spec))  # a fixed dict is filled in per trial
        overrides[key] = strategy_config(key, value) if key == STRATEGY_KEY and isinstance(value, str) else value
    return overrides


def first_overrides(space: dict[str, Any]) -> dict[str, Any]:
    """The overrides of each distribution's first value (low end, first choice): checking the
    config with them finds a misspelt key before any trial runs."""
    import optuna

    first = {key: spec.choices[0] if isinstance(spec, optuna.distributions.CategoricalDistribution) else spec.low
             for key, spec in space.items() if isinstance(spec, optuna.distributions.BaseDistribution)}
    return sample_overrides(optuna.trial.FixedTrial(first), space)
