"""Merging fine-tuned weights: adapter folding, model soups, task arithmetic, TIES, DARE, Model
Breadcrumbs, LiNeS and Fisher merging."""

from workbench.merge.weights import (
    breadcrumbs,
    dare,
    fisher_merge,
    greedy_soup,
    lines,
    merge_task_vectors,
    trim,
    uniform_soup,
)

__all__ = ["breadcrumbs", "dare", "fisher_merge", "greedy_soup", "lines", "merge_task_vectors", "trim", "uniform_soup"]
