"""Merging fine-tuned weights: adapter folding, model soups, task arithmetic and TIES."""

from workbench.merge.weights import greedy_soup, merge_task_vectors, trim, uniform_soup

__all__ = ["greedy_soup", "merge_task_vectors", "trim", "uniform_soup"]
