"""One line for a config the parser refused: jsonargparse reports a misspelt key inside a nested
``class_path``/``init_args`` as a tree of union alternatives; this names the key by its full path,
the class it was given to, and the accepted name it is closest to."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

UNKNOWN_KEY = re.compile(r"Option '([^']+)' is not accepted|does not accept option '([^']+)'|Key '([^']+)' is not expected")
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
CLASS_PATH = re.compile(r"class_path[ =]'([^']+)'")
SECTION_CLASSES = {"trainer": "lightning.pytorch.Trainer"}
"""Top-level config sections given without a ``class_path``."""


def accepted_names(class_path: str) -> list[str]:
    """The keyword arguments of ``class_path``'s ``__init__``, following ``**kwargs`` up its bases."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def explain_config_error(message: str) -> str | None:
    """``'model.init_args.strategy.init_args.rnak': LoRA has no option 'rnak' — did you mean 'rank'?``
    for a parser error naming an unknown key; None for any other error."""
    ancestry: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value) of the enclosing lines
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip(" -"))
        ancestry = [entry for entry in ancestry if entry[0] < indent]
        unknown = UNKNOWN_KEY.search(line)
        for kind, pattern in (("key", PARSER_KEY), ("class", CLASS_PATH)):
            ancestry += [(indent, kind, m.group(1)) for m in pattern.finditer(line)]
        if unknown is None:
            continue
        key = next(group for group in unknown.groups() if group)
        path = [value if kind == "key" else "init_args" for _, kind, value in ancestry]
        classes = [value for _, kind, value in ancestry if kind == "class"]
        section, _, key = key.rpartition(".")
        owner = classes[-1] if classes else SECTION_CLASSES.get(section.split(".")[0], "")
        names = accepted_names(owner) if owner else []
        where = ".".join([*path, *filter(None, [section])])
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"accepted: {', '.join(names)}" if names else "see --help"
        owner_name = owner.rpartition(".")[2] or where
        return f"unknown key '{key}' in {where or 'the config'} ({owner_name} has no such option): {hint}"
    return None
