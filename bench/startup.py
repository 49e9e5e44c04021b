"""Start-up time of the `workbench` command: `--help` (no heavy imports) and a command's own help.

Prints one JSON line per command: the first call's wall seconds with an empty help cache
(``first_s``: it imports torch, Lightning and the registered classes to build the help) and the
median and min over ``--repeats`` later fresh processes (the help read from the cache). A last
line times ``workbench --cache-help`` (the install line's step that builds every command's help)
and each command's first help after it.

    python bench/startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {"help": ["--help"], "fit_help": ["fit", "--help"], "predict_help": ["predict", "--help"]}


def wall_seconds(args: list[str], cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "workbench.cli", *args], check=True, capture_output=True,
                   env={**os.environ, "WORKBENCH_CACHE": cache})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, argv in COMMANDS.items():
        with tempfile.TemporaryDirectory() as cache:
            first = wall_seconds(argv, cache)
            times = [wall_seconds(argv, cache) for _ in range(args.repeats)]
        print(json.dumps({"command": "workbench " + " ".join(argv), "first_s": round(first, 3),
                          "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                          "repeats": args.repeats}), flush=True)
    with tempfile.TemporaryDirectory() as cache:
        build = wall_seconds(["--cache-help"], cache)
        first = {" ".join(argv): round(wall_seconds(argv, cache), 3) for argv in COMMANDS.values() if len(argv) > 1}
    print(json.dumps({"command": "workbench --cache-help", "seconds": round(build, 3), "first_help_after_s": first}))


if __name__ == "__main__":
    main()
