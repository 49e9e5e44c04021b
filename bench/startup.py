"""Start-up time of the `workbench` command: `--help` (no heavy imports) and a command's own help.

Prints one JSON line per command: median and min wall seconds over ``--repeats`` fresh processes.

    python bench/startup.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {"help": ["--help"], "fit_help": ["fit", "--help"], "predict_help": ["predict", "--help"]}


def wall_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "workbench.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, argv in COMMANDS.items():
        times = [wall_seconds(argv) for _ in range(args.repeats)]
        print(json.dumps({"command": "workbench " + " ".join(argv), "median_s": round(statistics.median(times), 3),
                          "min_s": round(min(times), 3), "repeats": args.repeats}), flush=True)


if __name__ == "__main__":
    main()
