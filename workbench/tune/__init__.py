"""``workbench tune``: Optuna hyper-parameter search over a fit config."""
