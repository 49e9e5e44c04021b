"""Atomic file writes (outputs appear under their final name only when complete) and the cache folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the file's suffix (``x.tmp-123.tif``) so writers that pick a
    format by extension still work. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def take_lock(lock: Path, holder: str, fix: str, own_pid_conflicts: bool = True) -> None:
    """Create ``lock`` holding this process's pid, or refuse in one line (``holder`` formatted with
    the ``pid`` holding it, then "wait for it" and ``fix``) while a live process holds it; a lock of
    a process that is gone (killed) is taken over. ``own_pid_conflicts=False``: a lock of this very
    process (an earlier run in it that failed) is taken over too."""
    from workbench.errors import UserInputError

    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock.read_text().strip()
            mine = pid == str(os.getpid())
            if pid.isdigit() and _alive(int(pid)) and (own_pid_conflicts or not mine):
                raise UserInputError(f"another {holder.format(pid=pid)}: wait for it {fix}") from None
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def default_cache_dir() -> Path:
    """Where built data and converted weights are cached: ``$WORKBENCH_CACHE`` or ``~/.cache/workbench``."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))
