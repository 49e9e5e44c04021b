"""Instant ``workbench <command> --help``: a command's help is built once (importing torch,
Lightning and every registered class takes seconds), kept in the cache folder, and printed from
there while nothing it depends on has changed. It is built on a command's first ``--help``, or
for every command at once by ``workbench --cache-help``, which the README's install line runs.

The key covers what the help text is made of: the versions of the libraries whose signatures it
lists, the size and modification time of every source file of Workbench's packages (an edit or
reinstall invalidates it), the Python version and the terminal width the text was wrapped to.
Only a bare ``<command> --help`` is cached; any other argument (``--config``) builds it afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from workbench.atomic import atomic_path, default_cache_dir

PACKAGES = ("workbench", "backbones", "heads", "datamodules")  # Workbench's own source trees
LIBRARIES = ("torch", "lightning", "jsonargparse", "timm", "peft", "segmentation-models-pytorch", "torchmetrics")
HELP_FLAGS = ("-h", "--help")


def help_key(command: str) -> str:
    """A digest of everything ``command``'s help text depends on."""
    digest = hashlib.sha256(f"{command}|{sys.version}|{shutil.get_terminal_size().columns}".encode())
    for library in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            digest.update(f"{library}={metadata.version(library)}".encode())
    root = Path(__file__).resolve().parents[1]
    for package in PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            stat = source.stat()
            digest.update(f"{source.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def cached_help(command: str) -> Path:
    """The file that holds ``command``'s help while its key holds."""
    return default_cache_dir() / "help" / f"{command}-{help_key(command)}.txt"


def print_help(command: str, args: list[str], build: Callable[[], object]) -> bool:
    """Print ``command``'s help from the cache when ``args`` is a bare help flag (True), building
    and caching it on a miss by calling ``build`` (which prints the help and exits, as argparse
    does); False for any other ``args``, with nothing done."""
    if len(args) != 1 or args[0] not in HELP_FLAGS:
        return False
    cached = cached_help(command)
    if cached.is_file():
        sys.stdout.write(cached.read_text())
        return True
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            build()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    sys.stdout.write(text.getvalue())
    if not text.getvalue():
        return True
    with contextlib.suppress(OSError), atomic_path(cached) as tmp:  # a read-only cache only costs speed
        tmp.write_text(text.getvalue())
    return True
