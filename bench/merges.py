"""Every ``workbench merge`` method on real fine-tuned checkpoints: fit one config at several seeds
(a ``workbench compare`` with the pretrained model as shipped and the fine-tuned arms), merge the
seeds' best checkpoints with each method, test every merged model on the config's test split, and
print one markdown table beside the individual models and the shipped one.

    python bench/merges.py                                     # csmask U-Net on Landsat-8 clouds, full FT, seeds 0-2
    python bench/merges.py --strategy lora --methods soup ties --out runs/merges_lora

Finished fits, merges and tests are reused when the script is run again (delete ``--out`` to redo).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from workbench.compare.arms import parse_strategy

# method → its `workbench merge` options for checkpoints of ONE task fine-tuned at n seeds (task
# vectors are summed, so λ = 1/n makes task arithmetic average them like a soup)
METHODS: dict[str, list[str]] = {
    "soup": [],
    "greedy_soup": ["--config", "{config}", "--metric", "val/mIoU"],
    "fisher": ["--config", "{config}", "--fisher_batches", "8"],
    "task_arithmetic": ["--scale", "{inverse}"],
    "ties": ["--density", "0.2"],
    "dare": ["--density", "0.3", "--scale", "{inverse}", "--seed", "0"],
    "dare_ties": ["--density", "0.3", "--seed", "0"],
    "breadcrumbs": ["--top", "0.01", "--density", "0.9", "--scale", "{inverse}"],
    "lines": ["--alpha", "0.1", "--beta", "{inverse}"],
}


def workbench(*args: str, log: Path) -> None:
    """Run a ``workbench`` subcommand, its output appended to ``log``; stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        code = subprocess.call([sys.executable, "-m", "workbench.cli", *args], stdout=stream, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"workbench {args[0]} failed (exit {code}); see {log}")


def test_scores(config: str, strategy: str, ckpt: Path, out: Path, metrics: list[str]) -> dict[str, float]:
    """Test ``ckpt`` with ``config`` (its model built with ``strategy``); the test metrics, cached in ``out``."""
    scores = out / "test.json"
    if not scores.is_file():
        class_path, init_args = parse_strategy(strategy)
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(out.parent), "name": out.name, "version": "run"}}
        workbench("test", "--config", config, f"--model.init_args.strategy={json.dumps({'class_path': class_path, 'init_args': init_args})}",
                  f"--trainer.logger={json.dumps(logger)}", f"--ckpt_path={ckpt}", log=out / "test.log")
        with (out / "run" / "metrics.csv").open() as stream:
            row = {k: float(v) for k, v in list(csv.DictReader(stream))[-1].items() if k.startswith("test/") and v}
        scores.write_text(json.dumps(row))
    values = json.loads(scores.read_text())
    return {m: values[f"test/{m}"] for m in metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/l8_clouds_csmask.yaml")
    p.add_argument("--strategy", default="full", help="the strategy every seed fine-tunes with (compare syntax)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--metrics", nargs="+", default=["IoU_cloud", "mIoU"])
    p.add_argument("--out", default="runs/merges_l8")
    opts = p.parse_args()
    out = Path(opts.out)

    workbench("compare", "--base_config", opts.config, "--strategies", "zero_shot", opts.strategy,
              "--seeds", *map(str, opts.seeds), "--metric", opts.metrics[0], "--output_dir", str(out / "fits"),
              log=out / "compare.log")
    fits = {d.name: json.loads((d / "run" / "results.json").read_text()) for d in sorted((out / "fits").iterdir())
            if (d / "run" / "results.json").is_file()}
    checkpoints = [fits[name]["best_checkpoint"] for name in sorted(fits) if not name.startswith("zero_shot")]

    header = f"| model | {' | '.join(f'test {m}' for m in opts.metrics)} |"
    rows = [header, "|" + "---|" * (len(opts.metrics) + 1)]
    for name in sorted(fits, key=lambda n: not n.startswith("zero_shot")):
        rows.append(f"| {name} | " + " | ".join(f"{fits[name]['test'][f'test/{m}']:.3f}" for m in opts.metrics) + " |")
    for method in opts.methods:
        merged = out / "merged" / f"{method}.ckpt"
        options = [o.format(config=opts.config, inverse=f"{1 / len(checkpoints):.4g}") for o in METHODS[method]]
        if not merged.is_file():
            workbench("merge", method, "--checkpoints", *checkpoints, *options, "--output", str(merged),
                      log=out / "merged" / f"{method}.log")
        scores = test_scores(opts.config, opts.strategy, merged, out / "tests" / method, opts.metrics)
        label = " ".join(o for o in options if o not in ("--config", opts.config))
        rows.append(f"| {method} ({label or 'uniform'}) | "
                    + " | ".join(f"{scores[m]:.3f}" for m in opts.metrics) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
