"""Band names: canonical (HLS-style) names, Sentinel-2 aliases, and band selection."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.errors import UserInputError

HLS_BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
SENTINEL2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# Sentinel-2 band → the HLS name Prithvi-style models are trained with.
SENTINEL2_TO_HLS = {"B2": "BLUE", "B3": "GREEN", "B4": "RED", "B8A": "NIR_NARROW", "B11": "SWIR_1", "B12": "SWIR_2"}
# Landsat 8/9 OLI band → HLS name (HLS L30 keeps OLI's numbering: B5 is NIR there, red edge on Sentinel-2).
LANDSAT_OLI_TO_HLS = {"B2": "BLUE", "B3": "GREEN", "B4": "RED", "B5": "NIR_NARROW", "B6": "SWIR_1", "B7": "SWIR_2"}


def canonical_band(name: str, sensor: dict[str, str] = SENTINEL2_TO_HLS) -> str:
    """``B02``/``b2``/``BLUE`` → one spelling: the HLS name when there is one, else ``B2``-style;
    ``sensor`` says whose numbering ``B<n>`` names follow (Sentinel-2 unless told)."""
    upper = name.strip().upper()
    if upper.startswith("B") and upper[1:].lstrip("0"):
        upper = "B" + upper[1:].lstrip("0")
    return sensor.get(upper, upper)


def select_bands(
    requested: Sequence[str | int] | None,
    file_bands: Sequence[str] | None,
    where: str,
) -> tuple[list[int] | None, list[str] | None]:
    """Resolve a band selection to 0-based layer indices and canonical names.

    Args:
        requested: names or 0-based indices; None selects every band of the file.
        file_bands: names of the file's bands in order (None when unknown).
        where: what to name in errors (e.g. ``data.bands``).

    Returns:
        ``(indices, names)``; indices None means all layers; names None when unknowable.
    """
    known = [canonical_band(b) for b in file_bands] if file_bands else None
    if requested is None:
        return None, known
    indices: list[int] = []
    for band in requested:
        if isinstance(band, int):
            if known is not None and not 0 <= band < len(known):
                raise UserInputError(f"{where}: band index {band} is out of range for the {len(known)} bands {known}")
            indices.append(band)
        elif known is None:
            raise UserInputError(
                f"{where}: band {band!r} is a name but the file's band names are unknown: "
                "set `file_bands` to the names of the file's bands in order, or select bands by 0-based index"
            )
        elif canonical_band(band) not in known:
            raise UserInputError(f"{where}: unknown band {band!r}; the files have {known}")
        else:
            indices.append(known.index(canonical_band(band)))
    names = [known[i] for i in indices] if known is not None else [f"band_{i}" for i in indices]
    return indices, names
