"""Workbench: fine-tune domain foundation models and map whole scenes.

Kept import-light on purpose: ``workbench --help`` must not import torch.
"""

__version__ = "0.1.0"
