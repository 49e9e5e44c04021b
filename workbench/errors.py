"""The one exception type for bad user input (files, bands, keys, config fields).

The CLI prints these as a one-line error without a traceback; anything else is a bug and keeps
its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file/band/key/field and the fix."""


class UnreadableFile(UserInputError):
    """A data file that cannot be read (truncated, corrupt, not a raster): ``bad_files: skip`` may
    pass over it."""


def first_line(err: BaseException) -> str:
    """The first line of a library error's message (GDAL's can run over several)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
