"""The Lightning callback that prunes a ``workbench tune`` trial, given by name in its fit config."""

from __future__ import annotations

import optuna
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from optuna_integration import PyTorchLightningPruningCallback


class TrialPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback for trial ``trial_id`` of the study ``study_name`` in
    ``storage``: after each validation epoch of ``fit`` it reports ``monitor`` and stops the fit
    (raising :class:`optuna.TrialPruned`) when a :class:`optuna.pruners.MedianPruner` says so (never
    before ``startup_trials`` trials finished). The trial is looked up in the storage, so the
    callback can be named in a config like any other."""

    def __init__(self, storage: str, study_name: str, trial_id: int, monitor: str, startup_trials: int = 5) -> None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        super().__init__(optuna.trial.Trial(study, trial_id), monitor)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report during ``fit`` only, not when the best checkpoint is validated after it."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_end(trainer, pl_module)
