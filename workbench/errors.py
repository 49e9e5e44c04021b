"""The one exception type for bad user input (files, bands, keys, config fields).

The CLI prints these as a one-line error without a traceback; anything else is a bug and keeps
its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file/band/key/field and the fix."""
