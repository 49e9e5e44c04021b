"""Reading fit configs: the jsonargparse parser of a config's sections, and the data → model links."""

from __future__ import annotations

from typing import Any

LINKED_DATA_ATTRIBUTES = ("num_classes", "class_names", "bands")


def link_data_to_model(parser: Any) -> None:
    """The model takes its classes and bands from the instantiated datamodule."""
    for attribute in LINKED_DATA_ATTRIBUTES:
        parser.link_arguments(f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate")


def config_parser(prog: str, description: str, sections: tuple[str, ...]) -> Any:
    """A parser reading a fit config's ``sections`` (``data``, ``model``); other keys are ignored."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)  # main() explains errors
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    if "model" in sections:
        from workbench.tasks import BaseTask

        parser.add_subclass_arguments(BaseTask, "model", required=True)
        link_data_to_model(parser)
    for ignored in ("model", "trainer", "seed_everything", "ckpt_path", "test_after_fit", "auto_precision"):
        if ignored not in sections:
            parser.add_argument(f"--{ignored}", type=Any, default=None, help="(not used by this command)")
    return parser
