"""Sliding-window plans over a scene and the blending weights that hide the seams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.errors import UserInputError


def window_offsets(length: int, size: int, stride: int) -> list[int]:
    """Offsets of windows of ``size`` covering ``[0, length)`` with at most ``stride`` between.

    The last window is aligned to the end, so no window reaches past the scene unless the
    scene is smaller than one window (then a single window at 0 is padded).
    """
    if length <= size:
        return [0]
    offsets = list(range(0, length - size, stride))
    return offsets + [length - size]


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """``(size, size)`` float32 weights: 1 in the middle, tapering linearly over ``overlap`` px.

    The floor is small but positive, so a pixel covered by one window only keeps its value.
    """
    ramp = np.ones(size, dtype=np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        ramp[:overlap] = np.minimum(ramp[:overlap], edge)
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    ramp = np.maximum(ramp, 1e-3)
    return np.outer(ramp, ramp)


@dataclass(frozen=True)
class WindowPlan:
    """Windows of ``size`` px over a ``height``×``width`` scene, grouped in rows of windows."""

    height: int
    width: int
    size: int
    overlap: int

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.size:
            raise UserInputError(f"overlap {self.overlap} px must be in [0, window size {self.size})")

    @property
    def rows(self) -> list[int]:
        return window_offsets(self.height, self.size, self.size - self.overlap)

    @property
    def cols(self) -> list[int]:
        return window_offsets(self.width, self.size, self.size - self.overlap)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def final_rows(self, row_index: int) -> int:
        """Scene rows that no window after window-row ``row_index`` touches."""
        rows = self.rows
        return self.height if row_index == len(rows) - 1 else rows[row_index + 1]
