"""The one exception type of the data tools, so callers can tell bad data from bugs."""


class DataError(ValueError):
    """Bad input or prepared data. The message names the file (and field) and the fix."""
