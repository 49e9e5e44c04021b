"""The ``workbench`` command: Lightning's fit/validate/test/predict plus workbench commands.

Heavy imports (torch, lightning) happen only once a command that needs them runs, so
``workbench --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from argparse import ArgumentError
from typing import Any

from workbench.config import config_parser, link_data_to_model
from workbench.errors import UserInputError, first_line
from workbench.help_cache import cached_help, print_help

USAGE = """\
usage: workbench <command> [--config CONFIG.yaml] [--section.key value ...]

Fine-tune domain foundation models with frozen, PEFT or full strategies.

commands:
  fit        train (and, by default, validate and test the best checkpoint)
  validate   evaluate a checkpoint on the validation split
  test       evaluate a checkpoint on the test split
  predict    map whole GeoTIFF scenes of any size with a trained checkpoint
  compare    fit one config under several strategies / training fractions / seeds; table + plots
  tune       Optuna hyper-parameter search over a fit config (resumable; trials.csv, best.yaml, plots)
  merge      merged adapter exports, soups, task arithmetic, TIES, DARE, breadcrumbs, LiNeS, Fisher
  export     a fine-tuned checkpoint (adapters merged) as ONNX or torch.export (.pt2), with metadata
  stats      compute per-band mean/std over the training split of a config's data

Run `workbench <command> --help` for a command's options, and
`workbench fit --config configs/flood_lora.yaml --print_config` to see every setting.
`workbench --cache-help` builds every command's help now (the install line runs it), so that
a command's first `--help` prints at once.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test")
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")  # --ckpt_path values that name no file


def _lightning_cli_class() -> tuple[type, type, type]:
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only

    from workbench.atomic import take_lock, write_json
    from workbench.checkpoints import read_lightning_checkpoint
    from workbench.precision import auto_precision
    from workbench.resume import ResumeRNG, continue_metrics, run_version
    from workbench.run_plots import RunPlots
    from workbench.run_stats import RunStats
    from workbench.tasks import BaseTask

    class WorkbenchCLI(LightningCLI):
        """LightningCLI wired for workbench tasks and datamodules."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="After fit, validate and test the best checkpoint and write results.json.",
            )
            parser.add_argument(
                "--auto_precision",
                type=bool,
                default=False,
                help="Choose trainer.precision from the hardware when it is unset: bf16-mixed on GPUs and "
                "CPUs with bfloat16 instructions (AVX512-BF16, AMX), 16-mixed on older GPUs, else 32-true.",
            )
            link_data_to_model(parser)

        def before_instantiate_classes(self) -> None:
            """With ``auto_precision``, an unset ``trainer.precision`` is chosen from the hardware;
            resuming from a run's checkpoint continues that run's folder (logger version)."""
            config = self.config.get(self.subcommand) if self.subcommand else self.config  # run=False: no subcommand
            if config.auto_precision and config.trainer.precision is None:
                config.trainer.precision, why = auto_precision(str(config.trainer.accelerator))
                rank_zero_only(print)(f"workbench: trainer.precision {config.trainer.precision} ({why}); "
                                      "set trainer.precision: 32-true to compute in float32")
            if self.subcommand != "fit" or not config.ckpt_path:
                return
            init = getattr(getattr(config.trainer, "logger", None), "init_args", None)  # a logger given by class
            if init is not None and init.get("version") is None and {"save_dir", "name"} <= set(vars(init)):
                init.version = run_version(config.ckpt_path, init.save_dir, init.name)

        def _parse_ckpt_path(self) -> None:
            """Lightning reads ``--ckpt_path``'s hyper-parameters here, first of all: an unreadable
            file is named in one line instead."""
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
            if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS:
                read_lightning_checkpoint(ckpt_path, "--ckpt_path", mmap=True)
            super()._parse_ckpt_path()

        def before_fit(self) -> None:
            self.run_stats = RunStats()
            self.trainer.callbacks += [self.run_stats, ResumeRNG()]
            self.run_plots = RunPlots()  # first: checkpoints saved at an epoch's end hold that epoch's values
            self.trainer.callbacks.insert(0, self.run_plots)
            ckpt, logger = self.config.fit.ckpt_path, self.trainer.logger
            if ckpt and isinstance(logger, CSVLogger) and run_version(ckpt, logger.save_dir, logger.name) is not None:
                continue_metrics(logger, read_lightning_checkpoint(ckpt, "--ckpt_path", mmap=True)["global_step"])
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
            # beside the run folder, not in it: Lightning warns that a non-empty new run folder's logs will be deleted
            self.run_lock = (Path(log_dir).parent / f".{Path(log_dir).name}.workbench.lock"
                             if log_dir and self.trainer.is_global_zero else None)
            if self.run_lock is not None:  # two fits never write one run folder
                self.run_lock.parent.mkdir(parents=True, exist_ok=True)
                take_lock(self.run_lock, f"workbench fit (pid {{pid}}) is writing {log_dir}",
                          "or set another trainer.logger.init_args.version", own_pid_conflicts=False)

        def after_fit(self) -> None:
            try:
                self.test_and_report()
                self.write_plots()
            finally:
                if self.run_lock is not None:
                    self.run_lock.unlink(missing_ok=True)

        def write_plots(self) -> None:
            """``curves.png`` (+ ``curves.json``) and, after the test, ``samples.png`` in the run folder."""
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
            if self.trainer.is_global_zero and log_dir and not self.trainer.fast_dev_run:
                self.run_plots.write(log_dir)

        def test_and_report(self) -> None:
            """Validate and test the best checkpoint; write ``results.json``."""
            if not self.config.fit.test_after_fit or self.trainer.fast_dev_run:
                return
            ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
            val = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
            test = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
            if self.trainer.is_global_zero and log_dir:
                report = self.model.strategy_report
                write_json(
                    f"{log_dir}/results.json",
                    {
                        "strategy": report.strategy,
                        "summary": str(report),
                        "trainable": report.trainable,
                        "total": report.total,
                        "backbone_trainable": report.backbone_trainable,
                        "backbone_total": report.backbone_total,
                        "precision": str(self.trainer.precision),
                        **self.run_stats.summary(),
                        "best_checkpoint": ckpt,
                        "val": val[0] if val else {},
                        "test": test[0] if test else {},
                    },
                )

    return WorkbenchCLI, BaseTask, LightningDataModule  # the CLI class, the model and data base classes


def lightning_cli(args: list[str] | None, run: bool = True) -> Any:
    """The Workbench LightningCLI over ``args`` (None: ``sys.argv``): with ``run`` a subcommand
    (``fit``, ...) runs; without, ``args`` hold no subcommand and the CLI only builds its model,
    datamodule and trainer."""
    cli_class, task_class, data_class = _lightning_cli_class()
    return cli_class(
        task_class,
        data_class,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # parse errors raise (not print usage and exit), so main() can explain them in one line
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in LIGHTNING_COMMANDS}},
        args=args,
        run=run,
    )


def run_lightning(args: list[str] | None) -> None:
    """Run a Lightning subcommand (``fit``, ...); ``args`` None reads ``sys.argv``."""
    lightning_cli(args)


def run_stats(args: list[str]) -> dict[str, Any]:
    """``workbench stats --config X.yaml [--out stats.json] [--max_samples N]``."""
    from datamodules.normalize import write_band_stats

    parser = config_parser(
        "workbench stats", "Compute per-band mean/std over the training split of the config's data.", ("data",)
    )
    parser.add_argument("--out", type=str, default="band_stats.json", help="JSON file to write")
    parser.add_argument("--max_samples", type=int, default=512, help="chips to read at most")
    cfg = parser.instantiate_classes(parser.parse_args(args))
    stats = write_band_stats(cfg.data, cfg.out, cfg.max_samples)
    print(f"workbench: wrote {cfg.out}; set `data.init_args.stats_file: {cfg.out}` in your config")
    return stats


def user_error(err: BaseException) -> UserInputError | None:
    """The :class:`UserInputError` behind ``err``, if any (jsonargparse wraps init errors); a
    refused config as one, its unknown key named (:func:`explain_config_error`); Lightning refusing
    the trainer's accelerator, devices, strategy or precision on this machine as one."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserInputError):
            return err
        if refused_trainer_setting(err):
            return UserInputError(f"{first_line(err)} (Lightning refused the trainer settings for this machine: "
                                  "check trainer.accelerator, devices, strategy and precision)")
        if isinstance(err, ArgumentError):  # jsonargparse refused the config
            from workbench.config_errors import explain_config_error

            return UserInputError(explain_config_error(str(err)) or str(err))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def refused_trainer_setting(err: BaseException) -> bool:
    """Whether ``err`` is Lightning's accelerator connector refusing the trainer's accelerator,
    devices, strategy or precision (a GPU setting on a machine without one, FSDP on a CPU, ...)."""
    refusals = ("MisconfigurationException", "ValueError", "TypeError")
    return type(err).__name__ in refusals and any(
        Path(frame.filename).name == "accelerator_connector.py" for frame in traceback.extract_tb(err.__traceback__))


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def storage_error(err: BaseException) -> UserInputError | None:
    """A full disk, quota or read-only / forbidden folder behind ``err``, as one line naming the
    file. The half-copied destination of a failed move is removed: Lightning (through fsspec)
    commits a checkpoint by moving it from the system's temporary folder, which across file
    systems is a copy that a full disk cuts short."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRORS:
            target = err.filename2 or err.filename
            if err.filename2 and err.errno in (errno.ENOSPC, errno.EDQUOT):  # a copy cut short, not a refused rename
                Path(err.filename2).unlink(missing_ok=True)
            return UserInputError(
                f"writing {target} failed ({err.strerror}): free disk space or choose a writable folder "
                "(fit/compare: trainer.logger.init_args.save_dir or --output_dir; predict, merge: --output_dir, "
                "--output); files written before are intact"
            )
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# Lightning's first: cache_help builds them in this order in one process, and the subclass lists
# in their help follow the import order, which then matches a fresh `workbench fit --help`
COMMANDS = (*LIGHTNING_COMMANDS, "predict", "compare", "tune", "merge", "export", "stats")


def run_command(command: str, rest: list[str], lightning_args: list[str] | None) -> None:
    """Run one ``workbench`` command with its arguments ``rest`` (Lightning's subcommands parse
    ``lightning_args``, or ``sys.argv`` when None)."""
    if command == "stats":
        run_stats(rest)
    elif command == "predict":
        from workbench.predict.command import run_predict

        run_predict(rest)
    elif command == "compare":
        from workbench.compare.command import run_compare

        run_compare(rest)
    elif command == "tune":
        from workbench.tune.command import run_tune

        run_tune(rest)
    elif command == "merge":
        from workbench.merge.command import run_merge

        run_merge(rest)
    elif command == "export":
        from workbench.export_model import run_export

        run_export(rest)
    else:
        run_lightning(lightning_args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``workbench`` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] == "--version":
        from workbench import __version__

        print(__version__)
        return 0
    if args[0] == "--cache-help":
        return cache_help()
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"workbench: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    lightning_args = None if argv is None else args

    def run() -> None:
        if not print_help(command, rest, lambda: run_command(command, rest, lightning_args)):
            run_command(command, rest, lightning_args)

    return explain_errors(run)


def cache_help() -> int:
    """Build every command's bare ``--help`` text into the help cache, through the same path a
    user's ``workbench <command> --help`` takes; 0 when all were built."""
    status, argv = 0, sys.argv
    try:
        for command in COMMANDS:
            sys.argv = [argv[0], command, "--help"]  # as typed: Lightning's subcommands read sys.argv
            with contextlib.redirect_stdout(io.StringIO()):
                status = status or main()
    finally:
        sys.argv = argv
    folder = cached_help(COMMANDS[0]).parent
    if status == 0 and not all(cached_help(command).is_file() for command in COMMANDS):
        print(f"workbench: error: could not write the help cache in {folder}: set WORKBENCH_CACHE to a writable "
              "folder", file=sys.stderr)
        return 2
    print(f"workbench: the help of {len(COMMANDS)} commands is cached in {folder}")
    return status


def explain_errors(run: Callable[[], object]) -> int:
    """``run()``; a user's mistake (bad input, full disk, ...) is printed as one ``workbench: error:``
    line (exit status 2) instead of a traceback; 0 when it succeeds."""
    try:
        run()
    except Exception as err:
        cause = user_error(err) or storage_error(err)
        if cause is None:
            raise
        print(f"workbench: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
