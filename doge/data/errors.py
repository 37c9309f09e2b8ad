"""The one exception type of the data tools, so callers can tell bad data from bugs."""
import errno


class DataError(ValueError):
    """Bad input or prepared data. The message names the file (and field) and the fix."""


def from_os_error(exc: OSError, where) -> DataError:
    """An OSError while writing `where` (a full disk, a read-only or vanished location) as a
    one-line DataError naming the path, the system's reason and what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space, then rerun the same command"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose an --output in a writable location"
    else:
        fix = "check the path and the disk, then rerun the same command"
    return DataError(f"{exc.filename or where}: {exc.strerror or exc}; {fix}")
